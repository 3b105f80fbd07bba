"""`RetrievalModel`: everything the service needs from the learned side, from ONE checkpoint.

The service never touches encoders, vocabularies or fusion weights: it encodes texts and
images into shortlist vectors and rerank precomputes, and asks for fused scores of aligned
(image, caption) pairs. See docs/MODEL_CARD.md for the shipped default.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from model.architecture.encoders import pad_token_ids
from model.architecture.network import RetrievalNetwork
from model.architecture.precompute import CaptionPrecompute, ImagePrecompute, PrecomputedScorer
from model.calibration import ScoreCalibration
from model.checkpoints.checkpoint import CampCheckpoint, load_checkpoint
from model.checkpoints.extractor import ExtractorRecord
from model.devices import DEVICE_AUTO, has_native_bf16, resolve_device
from model.text.minilm import MiniLMBackbone
from model.types import region_counts_problem
from model.vision.efficientnet_lite import DEFAULT_VARIANT
from model.zeroshot import (
    GRID_EXTRACTOR,
    ZeroShotChannel,
    ZeroShotError,
    ZeroShotSettings,
    imagenet_classifier,
    load_class_names,
    sentence_vectors,
    stored_class_embeddings,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "default.pt"
# `default-v3`, the last default with the CAMP reranker: selectable with CAMPSEARCH_CHECKPOINT
# (docs/MODEL_CARD.md, "Second-stage scorers compared").
CAMP_CHECKPOINT = WEIGHTS_DIR / "camp.pt"
# The reranker's arithmetic on the model's device (CUDA or CPU): fp32, or torch.autocast in
# bf16/fp16 (matmuls in the low precision, softmaxes and the fused score in fp32).
Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A search query's text encoder (the MiniLM backbone): fp32, or a copy whose linear layers
# multiply in bf16 (`Bf16Linear`). "auto" is bf16 where the device multiplies bf16 in hardware.
# Stored captions are always encoded in fp32, so the stored data never depends on this setting.
QueryPrecision = Literal["auto", "fp32", "bf16"]
# Host dtypes copied to the device as they are (float16 features travel at half the bytes).
_DEVICE_COPY_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


@dataclass
class EncodedTexts:
    """Texts encoded for both stages.

    pooled: float32 [B, e] l2-normalised shortlist vectors; token_ids: what the catalog stores;
    tokens: display words aligned with the word features (explanations); precompute: CAMP's
    per-caption tensors on the model's device (`.select(i)` gives one caption).
    """

    pooled: np.ndarray
    token_ids: list[list[int]]
    tokens: list[list[str]]
    precompute: CaptionPrecompute


@dataclass(frozen=True)
class PairExplanation:
    """Why one (image, caption) pair scored as it did, in plain floats.

    word_region [L][R]: how much each word attends to each region (rows sum to 1), over the
    image's real regions only (a padded image's padding is left out);
    region_pooling [R] and word_pooling [L]: how much each fragment counts in the score (CAMP:
    its attention pooling, averaged over heads; IMRAM: regions by the words' mean attention,
    words uniform, as it weighs them);
    camp_score: the reranker's own score (CAMP: in (0, 1); IMRAM: its summed similarities).
    """

    word_region: list[list[float]]
    region_pooling: list[float]
    word_pooling: list[float]
    camp_score: float


class RetrievalModel:
    """Inference facade over a `RetrievalNetwork`: shortlist vectors, rerank tensors, fusion.

    All methods run under `torch.inference_mode` and are safe to call from one worker thread.
    """

    def __init__(
        self,
        network: RetrievalNetwork,
        *,
        version: str,
        extractor_name: str,
        extractor_config: dict[str, Any],
        device: torch.device,
        metadata: dict[str, Any] | None = None,
        precision: Precision = "fp32",
        extractor_version: str = "",
        class_embeddings: dict[str, torch.Tensor] | None = None,
        query_precision: QueryPrecision = "fp32",
    ) -> None:
        """class_embeddings: the zero-shot channel's E per prompt, when the checkpoint stores
        it (else computed from the class names on first use); query_precision: see
        `QueryPrecision` (bf16 needs the MiniLM text side)."""
        if precision != "fp32" and precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.network = network.to(device).eval()
        self.precision: Precision = precision
        self.query_precision, self._query_backbone = self._query_text_side(query_precision, device)
        self.version = version
        self.extractor_name = extractor_name
        self.extractor_config = dict(extractor_config)
        self.extractor_version = extractor_version  # "" when the checkpoint does not say
        self.region_dim = network.spec.region_dim
        self.device = device
        self.metadata = dict(metadata or {})
        self.reranker = network.spec.reranker_kind
        # The pair scorer over per-item tensors of the checkpoint's scorer (CAMP's is a
        # `PrecomputedScorer`); every method below goes through it or through `self.reranker`.
        self.scorer: PrecomputedScorer = network.pair_scorer()
        # P(match) maps fitted on dev (`camp-search calibrate`); None: an uncalibrated model
        self.calibration = ScoreCalibration.from_metadata(self.metadata)
        spec = network.spec
        self._tokenizer = spec.text_kind.tokenizer(
            spec, network.vocabulary, max_words=network.camp_config().max_words
        )
        # The zero-shot channel (model/zeroshot.py) the checkpoint asks for; None: off
        self.zero_shot: ZeroShotChannel | None = None
        self._base_version = version
        # prompt -> E [1000, 384]: stored in the checkpoint, or built once here
        self._class_embeddings: dict[str, torch.Tensor] = dict(class_embeddings or {})
        self.set_zero_shot(ZeroShotSettings.from_metadata(self.metadata), from_checkpoint=True)

    # -- loading --------------------------------------------------------------------------------
    def _query_text_side(
        self, precision: QueryPrecision, device: torch.device
    ) -> tuple[Literal["fp32", "bf16"], MiniLMBackbone | None]:
        """The resolved query precision and, for bf16, the backbone copy queries run on."""
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"query precision must be auto, fp32 or bf16, got {precision!r}")
        backbone = getattr(self.network.camp.text_encoder, "backbone", None)
        if precision == "auto":
            precision = "bf16" if backbone is not None and has_native_bf16(device) else "fp32"
        if precision == "fp32":
            return "fp32", None
        if backbone is None:
            raise ValueError(
                "query precision bf16 needs the MiniLM text side; this checkpoint's is "
                f"{self.network.spec.text_encoder!r}"
            )
        return "bf16", backbone.with_bf16_linears()

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        device: str = DEVICE_AUTO,
        precision: Precision = "fp32",
        query_precision: QueryPrecision = "fp32",
    ) -> RetrievalModel:
        """None -> the shipped default model (model/weights/default.pt); weights only."""
        checkpoint = load_checkpoint(path or DEFAULT_CHECKPOINT)
        return cls.from_checkpoint(
            checkpoint, device=device, precision=precision, query_precision=query_precision
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: CampCheckpoint,
        *,
        device: str | torch.device = DEVICE_AUTO,
        precision: Precision = "fp32",
        query_precision: QueryPrecision = "fp32",
    ) -> RetrievalModel:
        meta = checkpoint.metadata
        extractor = ExtractorRecord.from_metadata(meta)
        version = meta.get("version") or checkpoint.config.name or "unversioned"
        return cls(
            RetrievalNetwork.from_checkpoint(checkpoint),
            version=str(version),
            extractor_name=extractor.name,
            extractor_config=extractor.config,
            extractor_version=extractor.version,
            device=resolve_device(device),
            metadata=meta,
            precision=precision,
            class_embeddings=stored_class_embeddings(checkpoint.extras),
            query_precision=query_precision,
        )

    # -- zero-shot channel -------------------------------------------------------------------
    def set_zero_shot(
        self, settings: ZeroShotSettings | None, *, from_checkpoint: bool = False
    ) -> None:
        """Turn the zero-shot channel on with `settings` (weight 0 or None: off).

        Only grid (EfficientNet-Lite ImageNet) features with a MiniLM text side can carry it.
        Settings other than the checkpoint's change `version` ("+zs-w..-t.."), so shortlist
        vectors of two settings never share a namespace or an index.
        """
        if settings is None or settings.weight == 0:
            self.zero_shot = None
        else:
            self._check_zero_shot_fits()
            prompt = settings.prompt
            if prompt not in self._class_embeddings:
                self._class_embeddings[prompt] = self._embed_class_names(prompt)
            weight, bias = imagenet_classifier(
                self.extractor_config.get("variant", DEFAULT_VARIANT)
            )
            self.zero_shot = ZeroShotChannel(
                weight, bias, self._class_embeddings[prompt], settings
            ).to(self.device)
        self.version = self._base_version
        if not from_checkpoint:
            stored = ZeroShotSettings.from_metadata(self.metadata)
            if settings != stored and not (_off(settings) and _off(stored)):
                self.version += (
                    "+zs-off"
                    if _off(settings)
                    else f"+zs-w{settings.weight:g}-t{settings.temperature:g}"
                )

    def _check_zero_shot_fits(self) -> None:
        spec = self.network.spec
        if self.extractor_name != GRID_EXTRACTOR or spec.region_dim != 1280:
            raise ZeroShotError(
                "the zero-shot channel reads EfficientNet-Lite grid features; this model's "
                f"extractor is {self.extractor_name!r} ({spec.region_dim}-d regions)"
            )
        if spec.text_encoder != "minilm":
            raise ZeroShotError(
                f"the zero-shot channel needs the MiniLM text side, not {spec.text_encoder!r}"
            )
        if self.extractor_config.get("weights", "imagenet") != "imagenet":
            raise ZeroShotError("the zero-shot channel needs the ImageNet grid weights")

    def _embed_class_names(self, prompt: str) -> torch.Tensor:
        """E [1000, 384]: the class names in `prompt`, embedded as queries are."""
        texts = [prompt.format(name) for name in load_class_names()]
        out = []
        for start in range(0, len(texts), 250):
            token_ids, _ = self.tokenize(texts[start : start + 250])
            features, lengths = self.text_features(token_ids)
            out.append(sentence_vectors(features, lengths))
        return torch.cat(out)

    @property
    def pooled_dim(self) -> int:
        """Width of the shortlist vectors: e, plus 384 with the zero-shot channel on."""
        extra = self.zero_shot.dim if self.zero_shot is not None else 0
        return self.network.pooled_dim + extra

    @functools.cached_property
    def tensor_version(self) -> str:
        """The identity of the stored rerank tensors: the version and a digest of the weights,
        so a retrained checkpoint that kept its version string still gets its own tensors."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return f"{self.version}+{digest.hexdigest()[:12]}"

    # -- text side --------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[str]]]:
        """Token ids and display tokens, one list per text; refuses empty texts."""
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {index} is empty; give at least one word")
        return self._tokenizer(texts)

    def text_features(
        self, token_ids: list[list[int]], *, query: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad ids and run the text side up to CAMP's projection: ([B, L, h] float32, lengths
        [B]); `query`: in `query_precision` (stored captions keep fp32)."""
        padded, lengths = pad_token_ids(token_ids)
        padded, lengths = self._to_device(padded), self._to_device(lengths)
        with torch.inference_mode():
            if query and self._query_backbone is not None:
                features = self.network.camp.text_encoder.features(
                    padded, lengths, backbone=self._query_backbone
                )
            else:
                features = self.network.text_features(padded, lengths)
        return features, lengths

    def encode_texts(self, texts: Sequence[str], *, query: bool = False) -> EncodedTexts:
        """Both stages' vectors of `texts`; `query`: search queries, encoded in
        `query_precision` (what is stored, captions, always in fp32)."""
        token_ids, tokens = self.tokenize(texts)
        features, lengths = self.text_features(token_ids, query=query)
        with torch.inference_mode():
            pooled = self.network.pooled_text(features, lengths)
            if self.zero_shot is not None:
                pooled = self.zero_shot.augment(pooled, sentence_vectors(features, lengths))
            words = self.network.words_from_features(features, lengths)
            precompute = self.scorer.precompute_captions(words)
        return EncodedTexts(
            pooled=pooled.float().cpu().numpy(),
            token_ids=token_ids,
            tokens=tokens,
            precompute=precompute,
        )

    # -- image side -------------------------------------------------------------------------------
    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the model's device; on CUDA through pinned memory, non-blocking."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _regions(self, regions: np.ndarray) -> torch.Tensor:
        """Host features -> float32 [B, R, D] on the device.

        On CUDA the features (float16 as stored, or float32) are staged in pinned memory and
        copied with non_blocking=True, then widened on the device: the copy does not block the
        host, and the kernels that use it queue behind it on the same stream.
        """
        array = np.asarray(regions)
        if array.ndim != 3 or array.shape[-1] != self.region_dim:
            raise ValueError(
                f"expected region features [B, R, {self.region_dim}], got {array.shape}"
            )
        if self.device.type == "cuda":
            dtype = _DEVICE_COPY_DTYPES.get(array.dtype, torch.float32)
            staging = torch.empty(array.shape, dtype=dtype, pin_memory=True)
            staging.numpy()[...] = array  # one host copy, straight into the pinned buffer
            return staging.to(self.device, non_blocking=True).float()
        if array.dtype != np.float32 or not array.flags.writeable:  # memmaps are read-only
            array = array.astype(np.float32)
        return torch.from_numpy(array).to(self.device)

    def _region_counts(self, counts: np.ndarray | None, regions: np.ndarray) -> torch.Tensor | None:
        """Real regions per image [B] int64 on the device, checked against the padded width."""
        if counts is None:
            return None
        counts = np.asarray(counts)
        if counts.shape != (len(regions),):
            raise ValueError(
                f"need one region count per image: {len(regions)} images, counts of shape "
                f"{counts.shape}"
            )
        problem = region_counts_problem(counts, np.shape(regions)[1])
        if problem:
            raise ValueError(problem)
        counts = counts.astype(np.int64)
        return self._to_device(torch.from_numpy(counts))

    def pooled_images(
        self, regions: np.ndarray, region_counts: np.ndarray | None = None
    ) -> np.ndarray:
        """[B, R, D] float16/32 region features -> [B, e] float32 unit shortlist vectors.

        `region_counts` [B]: real regions per image when `regions` is padded to R; None: all R
        are real."""
        counts = self._region_counts(region_counts, regions)
        with torch.inference_mode():
            features = self._regions(regions)
            pooled = self.network.pooled_images(features, counts)
            if self.zero_shot is not None:
                zero_shot = self.zero_shot.image_vectors(features, counts)
                pooled = self.zero_shot.augment(pooled, zero_shot)
            return pooled.float().cpu().numpy()

    def precompute_images(
        self, regions: np.ndarray, region_counts: np.ndarray | None = None
    ) -> ImagePrecompute:
        """[B, R, D] -> per-image rerank tensors on self.device (cache them per image id).

        `region_counts` [B]: real regions per image when `regions` is padded to R (the padding
        is masked when scoring); None: all R are real."""
        counts = self._region_counts(region_counts, regions)
        with torch.inference_mode():
            encoded = self.network.camp.image_encoder(self._regions(regions))
            return self.scorer.precompute_images(encoded, counts)

    # -- memory ----------------------------------------------------------------------------------
    def image_tensor_bytes(self, regions: int) -> int:
        """Bytes of one image's rerank tensors (`precompute_images`) with `regions` regions."""
        return self.reranker.image_precompute.bytes_of_one(
            regions, self._embed_size, self._element_size
        )

    def caption_tensor_bytes(self) -> int:
        """Bytes of one caption's rerank tensors at the longest caption the model reads."""
        return self.reranker.caption_precompute.bytes_of_one(
            self.max_caption_tokens, self._embed_size, self._element_size
        )

    @property
    def max_caption_tokens(self) -> int:
        return self._tokenizer.max_tokens

    @property
    def _embed_size(self) -> int:
        return self.scorer.scorer.embed_size

    @property
    def _element_size(self) -> int:
        return next(self.network.camp.scorer.parameters()).element_size()

    # -- second stage -----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The reranker's precision on the model's device: nothing for fp32, else torch.autocast.

        Only the pair scoring runs under it; the cached per-item tensors stay float32.
        """
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def camp_logits(self, images: ImagePrecompute, captions: CaptionPrecompute) -> torch.Tensor:
        """CAMP's pre-sigmoid scores [K] of aligned pairs, in the model's precision.

        Captions are not re-trimmed: the cached per-item tensors are trimmed already and `cat`
        pads only to the widest of them, and padding is masked exactly, so trimming here would
        only cost a host synchronisation (reading the lengths) per call.
        """
        with torch.inference_mode(), self.autocast():
            return self.scorer.score_pairs(images, captions, trim=False)

    def fuse(self, shortlist_scores: torch.Tensor, camp_logits: torch.Tensor) -> torch.Tensor:
        """Fused float32 scores; bf16/fp16 logits are widened first, so the shortlist score is
        never rounded to the reranker's precision. With the zero-shot channel the shortlist
        score is (pooled + w zs) / (1 + w); it is scaled back to pooled + w zs here."""
        shortlist = shortlist_scores.to(device=camp_logits.device, dtype=torch.float32)
        if self.zero_shot is not None:
            shortlist = shortlist * self.zero_shot.shortlist_scale
        with torch.inference_mode():
            return self.network.fusion(shortlist, camp_logits.float())

    def rerank_pairs(
        self,
        images: ImagePrecompute,
        captions: CaptionPrecompute,
        shortlist_scores: np.ndarray,
    ) -> np.ndarray:
        """Aligned (images[k], captions[k], shortlist_scores[k]) -> K fused scores, float32.

        Higher is better. One call may hold the candidates of several queries. The host waits
        for the device once, when the scores come back.
        """
        shortlist = torch.as_tensor(np.asarray(shortlist_scores, dtype=np.float32))
        if shortlist.shape != (len(images),):
            raise ValueError(
                f"need one shortlist score per pair: {len(images)} pairs, "
                f"scores of shape {tuple(shortlist.shape)}"
            )
        logits = self.camp_logits(images, captions)
        return self.fuse(self._to_device(shortlist), logits).cpu().numpy()

    def explain_pair(self, image: ImagePrecompute, caption: CaptionPrecompute) -> PairExplanation:
        """Attention of one (image, caption) pair, as plain lists (JSON-ready)."""
        if len(image) != 1 or len(caption) != 1:
            raise ValueError(f"explain one pair: got {len(image)} images, {len(caption)} captions")
        return self.explain_pairs(image, caption)[0]

    def explain_pairs(
        self, images: ImagePrecompute, captions: CaptionPrecompute
    ) -> list[PairExplanation]:
        """Attention of one caption against K images, or of one image against K captions, in
        ONE scorer call and one copy back to the host: K explanations, in the many side's
        order. Each covers only its own words and real regions (padding is left out)."""
        if len(captions) == 1:
            with torch.inference_mode():
                logits, maps = self.scorer.score_text_against_images(captions, images, True)
            pick = [(k, 0) for k in range(len(images))]
            logits = logits[:, None]
        elif len(images) == 1:
            with torch.inference_mode():
                logits, maps = self.scorer.score_image_against_captions(images, captions, True)
            pick = [(0, k) for k in range(len(captions))]
            logits = logits[None]
        else:
            raise ValueError(
                f"explain one caption x K images or one image x K captions: got {len(images)} "
                f"images, {len(captions)} captions"
            )
        word_region, region_weights, word_weights = self.reranker.explanation(maps)
        word_region = word_region.float().cpu()
        region_pooling = region_weights.float().cpu()
        word_pooling = word_weights.float().cpu()
        scores = self.reranker.display_score(logits).float().cpu()
        lengths = captions.lengths.tolist()
        regions = images.region_counts.tolist()
        explanations = []
        for i, j in pick:
            length, count = int(lengths[j]), int(regions[i])
            explanations.append(
                PairExplanation(
                    word_region=word_region[i, j, :length, :count].tolist(),
                    region_pooling=region_pooling[i, j, :count].tolist(),
                    word_pooling=word_pooling[i, j, :length].tolist(),
                    camp_score=float(scores[i, j]),
                )
            )
        return explanations


def _off(settings: ZeroShotSettings | None) -> bool:
    return settings is None or settings.weight == 0
