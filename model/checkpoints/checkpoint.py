"""Checkpoints: our single-file format, and import of the official CAMP and IMRAM releases.

Our format is one `torch.save`d dict that loads with `torch.load(..., weights_only=True)`:
`{"format_version", "config", "vocabulary", "state_dict", "extras", "metadata", "scorer"}`.
`extras` holds tensors or dicts of tensors for later additions (pooled shortlist heads, a
score-fusion weight) without a format change. `scorer` = `{"name", "options"}` says which
second-stage scorer the weights belong to (model/architecture/rerankers.py); files written
before it existed hold CAMP, so a missing record reads as `{"name": "camp", "options": {}}`.

The official release is `{'model': [img_enc_sd, txt_enc_sd, sim_sd], 'opt': EasyDict, ...}` with
`module.` prefixes (nn.DataParallel). `opt` is an `easydict.EasyDict`; it is read through
torch's weights-only unpickler with an inert stand-in for that one class, so no pickled code
runs and easydict need not be installed.

The official IMRAM release (`train_gpus.save_checkpoint`) is `{'model': state_dict, 'opt':
argparse.Namespace, 'epoch', 'best_rsum'}`: one flat `DataParallel(SCAN)` state dict. Its
`Namespace` is rebuilt by the same weights-only unpickler (the class only holds attributes).
"""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.architecture.camp import CampModel
from model.checkpoints.config import CampConfig, ConfigError
from model.files import write_atomically
from model.text.vocab import Vocabulary

FORMAT_VERSION = 1
_FORMAT_KEYS = ("format_version", "config", "state_dict")

# official module path (without `module.`) -> ours, per part of the official state-dict list.
OFFICIAL_IMAGE_ENCODER_MODULES = {"fc": "image_encoder.fc"}
OFFICIAL_TEXT_ENCODER_MODULES = {"embed": "text_encoder.embed", "rnn": "text_encoder.rnn"}
OFFICIAL_SCORER_MODULES = {
    "img_key_fc": "scorer.image_key",
    "txt_key_fc": "scorer.text_key",
    "img_query_fc": "scorer.image_query",
    "txt_query_fc": "scorer.text_query",
    "weighted_txt_query_fc": "scorer.region_message_query",
    "weighted_txt_key_fc": "scorer.region_message_key",
    "weighted_img_query_fc": "scorer.word_message_query",
    "weighted_img_key_fc": "scorer.word_message_key",
    "fc_1.0": "scorer.image_fusion",
    "fc_2.0": "scorer.text_fusion",
    "fc_out.0": "scorer.score_hidden",
    "fc_out.3": "scorer.score_out",
    "final_reduce_1.linear.0": "scorer.image_pool.hidden",
    "final_reduce_1.linear.2": "scorer.image_pool.heads",
    "final_reduce_2.linear.0": "scorer.text_pool.hidden",
    "final_reduce_2.linear.2": "scorer.text_pool.heads",
}
OFFICIAL_PARTS = (
    ("img_enc", OFFICIAL_IMAGE_ENCODER_MODULES),
    ("txt_enc", OFFICIAL_TEXT_ENCODER_MODULES),
    ("sim", OFFICIAL_SCORER_MODULES),
)
# Options of the released CAMP configs this implementation reproduces; others are refused.
SUPPORTED_OFFICIAL_OPTIONS = {
    "measure": "gate_fusion_new",
    "fusion_func": "concat",
    "bi_gru": True,
    "no_imgnorm": True,
    "no_txtnorm": True,
    "self_attention": False,
}


# official IMRAM module path (without `module.`) -> ours (model/architecture/imram.py).
OFFICIAL_IMRAM_MODULES = {
    "img_enc.fc_local": "image_encoder.fc",
    "txt_enc.embed": "text_encoder.embed",
    "txt_enc.rnn": "text_encoder.rnn",
    "linear_t2i": "scorer.text_memory_candidate",
    "gate_t2i": "scorer.text_memory_gate",
    "linear_i2t": "scorer.image_memory_candidate",
    "gate_i2t": "scorer.image_memory_gate",
}
# Options of the official IMRAM code this implementation reproduces (opts.py defaults apart
# from bi_gru, which the released scripts set); others are refused.
SUPPORTED_OFFICIAL_IMRAM_OPTIONS = {
    "raw_feature_norm": "clipped_l2norm",
    "precomp_enc_type": "basic",
    "bi_gru": True,
    "no_imgnorm": False,
    "no_txtnorm": False,
}
OFFICIAL_IMRAM_MODES = {"full_IMRAM": "full", "text_IMRAM": "text", "image_IMRAM": "image"}
# The official IMRAM code keeps every word of a caption (CAMP's cuts at 47); the service still
# bounds what one caption costs, far above the longest Flickr30K or COCO caption.
IMRAM_MAX_WORDS = 128
CAMP_SCORER = "camp"


class CheckpointError(ValueError):
    """A file is not a checkpoint this code can load; the message says what is wrong."""


@dataclass
class CampCheckpoint:
    """Everything needed to rebuild a model: config, weights, vocabulary, extra state."""

    config: CampConfig
    state_dict: dict[str, Tensor]
    vocabulary: Vocabulary | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    scorer: str = CAMP_SCORER
    scorer_options: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: torch.device | str | None = None) -> nn.Module:
        """The scorer's whole model (`CampModel`, `ImramModel`, ...) in eval mode with these
        weights (strict: every key must match)."""
        from model.architecture.rerankers import reranker_kind

        try:
            model = reranker_kind(self.scorer).build_model(self.config, self.scorer_options)
        except (KeyError, ConfigError) as exc:
            raise CheckpointError(f"the checkpoint's scorer record: {exc}") from exc
        _check_state_dict(model, self.state_dict, source="checkpoint")
        model.load_state_dict(self.state_dict)
        return model.to(device).eval() if device is not None else model.eval()

    def save(self, path: str | Path) -> Path:
        """Write atomically (model/files.py: temp file, fsync, rename, fsync folder)."""
        payload = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "vocabulary": self.vocabulary.to_dict() if self.vocabulary is not None else None,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "extras": self.extras,
            "metadata": self.metadata,
            "scorer": {"name": self.scorer, "options": dict(self.scorer_options)},
        }
        return _atomic_torch_save(payload, Path(path))


def checkpoint_from_model(
    model: CampModel,
    vocabulary: Vocabulary | None = None,
    extras: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> CampCheckpoint:
    if model.config is None:
        raise CheckpointError("the model has no config; build it with CampModel.from_config")
    return CampCheckpoint(
        config=model.config,
        state_dict=dict(model.state_dict()),
        vocabulary=vocabulary,
        extras=dict(extras or {}),
        metadata=dict(metadata or {}),
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> CampCheckpoint:
    """Load our format (weights only: no pickled code runs)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a camp-search checkpoint (it needs a full unpickler: {exc}); "
            "use import_official_checkpoint for official CAMP files"
        ) from exc
    if not isinstance(payload, dict) or any(k not in payload for k in _FORMAT_KEYS):
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a camp-search checkpoint: expected keys {list(_FORMAT_KEYS)}, "
            f"found {keys}; use import_official_checkpoint for official CAMP files"
        )
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {payload['format_version']}; "
            f"this code reads {FORMAT_VERSION}"
        )
    vocabulary = payload.get("vocabulary")
    scorer = payload.get("scorer") or {"name": CAMP_SCORER, "options": {}}
    return CampCheckpoint(
        config=CampConfig.from_dict(payload["config"]),
        state_dict=dict(payload["state_dict"]),
        vocabulary=Vocabulary.from_dict(vocabulary) if vocabulary is not None else None,
        extras=dict(payload.get("extras") or {}),
        metadata=dict(payload.get("metadata") or {}),
        scorer=str(scorer.get("name", CAMP_SCORER)),
        scorer_options=dict(scorer.get("options") or {}),
    )


# -- the official release -------------------------------------------------------------------
class _EasyDictStandIn(dict):
    """Inert stand-in for `easydict.EasyDict` while unpickling `opt`.

    torch's weights-only unpickler fills only plain dict types, so "creating" one returns an
    OrderedDict: the pickled items and attribute state land in it and nothing else runs.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return OrderedDict()


_EasyDictStandIn.__module__ = "easydict"
_EasyDictStandIn.__name__ = "EasyDict"
_EasyDictStandIn.__qualname__ = "EasyDict"


def _plain(value: Any) -> Any:
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _load_official_payload(path: Path, map_location: str | torch.device) -> Any:
    try:
        with torch.serialization.safe_globals([_EasyDictStandIn, argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a CAMP checkpoint this code can read safely: {exc}"
        ) from exc
    except Exception as exc:  # torch.load raises many types on foreign or truncated files
        raise CheckpointError(
            f"{path} could not be read as a torch file ({type(exc).__name__}: {exc})"
        ) from exc


def _official_state_dict(payload: Any, path: Path) -> dict[str, Tensor]:
    """Flatten `[img_sd, txt_sd, sim_sd]` into our key space, naming everything that is off."""
    parts = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(parts, list | tuple) or len(parts) != 3:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a CAMP checkpoint: expected {{'model': [img_enc, txt_enc, sim] state "
            f"dicts, 'opt': ...}}, found {found}"
        )
    ours: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for (part, modules), part_state in zip(OFFICIAL_PARTS, parts, strict=True):
        if not isinstance(part_state, Mapping):
            raise CheckpointError(f"{path}: model[{part}] is not a state dict")
        for key, tensor in part_state.items():
            name = key.removeprefix("module.")
            module, _, param = name.rpartition(".")
            if module not in modules:
                unexpected.append(f"{part}/{key}")
                continue
            ours[f"{modules[module]}.{param}"] = tensor
    if unexpected:
        raise CheckpointError(f"{path} is not a CAMP checkpoint: unexpected keys {unexpected}")
    return ours


def _config_from_official(state: Mapping[str, Tensor], opt: Mapping[str, Any], path: Path):
    try:
        vocab_size, word_dim = state["text_encoder.embed.weight"].shape
        embed_size, img_dim = state["image_encoder.fc.weight"].shape
        num_heads = state["scorer.image_pool.heads.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{path} is not a CAMP checkpoint: missing key {exc}") from exc
    num_layers = _gru_layers(state)
    wrong = {k: opt[k] for k, v in SUPPORTED_OFFICIAL_OPTIONS.items() if k in opt and opt[k] != v}
    if wrong:
        raise CheckpointError(
            f"{path} was trained with options this implementation does not reproduce: {wrong} "
            f"(supported: {SUPPORTED_OFFICIAL_OPTIONS})"
        )
    _check_options_match_weights(
        path,
        opt,
        vocab_size=vocab_size,
        word_dim=word_dim,
        embed_size=embed_size,
        img_dim=img_dim,
        num_layers=num_layers,
    )
    try:
        return CampConfig(
            vocab_size=int(vocab_size),
            word_dim=int(word_dim),
            embed_size=int(embed_size),
            img_dim=int(img_dim),
            num_heads=int(num_heads),
            num_gru_layers=max(1, num_layers),
            max_words=int(opt.get("max_length", CampConfig.max_words)),
            name=str(opt.get("data_name", "camp_official")),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def import_official_checkpoint(
    path: str | Path,
    vocabulary: Vocabulary | None = None,
    map_location: str | torch.device = "cpu",
) -> CampCheckpoint:
    """Convert an official CAMP `*.pth.tar` into our checkpoint (sizes read from the weights).

    Raises CheckpointError naming missing, unexpected and shape-mismatched keys when the file
    is not a CAMP checkpoint, and refusing options (e.g. sum fusion) that change the math.
    """
    path = Path(path)
    payload = _load_official_payload(path, map_location)
    if _is_official_imram(payload):
        return _import_official_imram(payload, path, vocabulary)
    state = _official_state_dict(payload, path)
    opt = _plain(payload.get("opt") or {})
    config = _config_from_official(state, opt, path)
    if vocabulary is not None and len(vocabulary) != config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(vocabulary)} words but the checkpoint embeds {config.vocab_size}"
        )
    _check_state_dict(CampModel.from_config(config), state, source=str(path))
    metadata = {k: payload[k] for k in ("epoch", "best_rsum", "Eiters") if k in payload} | {
        "source": "official",
        "opt": {k: v for k, v in opt.items() if _is_simple(v)},
    }
    return CampCheckpoint(config=config, state_dict=state, vocabulary=vocabulary, metadata=metadata)


def _is_official_imram(payload: Any) -> bool:
    """An IMRAM release holds one flat state dict whose keys name IMRAM's memory layers."""
    state = payload.get("model") if isinstance(payload, dict) else None
    return isinstance(state, Mapping) and any(
        str(key).removeprefix("module.").startswith(("linear_t2i.", "gate_t2i.")) for key in state
    )


def _import_official_imram(
    payload: dict[str, Any], path: Path, vocabulary: Vocabulary | None
) -> CampCheckpoint:
    """An official IMRAM `*.pth.tar` as our checkpoint with scorer "imram" and its options."""
    from model.architecture.imram import ImramModel

    ours: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in payload["model"].items():
        module, _, param = str(key).removeprefix("module.").rpartition(".")
        if module in OFFICIAL_IMRAM_MODULES:
            ours[f"{OFFICIAL_IMRAM_MODULES[module]}.{param}"] = tensor
        else:
            unexpected.append(str(key))
    if unexpected:
        raise CheckpointError(f"{path} is not an IMRAM checkpoint: unexpected keys {unexpected}")
    opt = _plain(payload.get("opt") or {})
    options = _imram_options_from_official(opt, path)
    config = _imram_config_from_weights(ours, opt, path)
    if vocabulary is not None and len(vocabulary) != config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(vocabulary)} words but the checkpoint embeds {config.vocab_size}"
        )
    _check_state_dict(ImramModel.from_config(config, options), ours, source=str(path))
    metadata = {k: payload[k] for k in ("epoch", "best_rsum", "Eiters") if k in payload} | {
        "source": "official",
        "opt": {k: v for k, v in opt.items() if _is_simple(v)},
    }
    return CampCheckpoint(
        config=config,
        state_dict=ours,
        vocabulary=vocabulary,
        metadata=metadata,
        scorer="imram",
        scorer_options=options.to_dict(),
    )


def _imram_options_from_official(opt: Mapping[str, Any], path: Path):
    """`ImramOptions` from the official `opt`; a missing option takes opts.py's default, except
    `model_mode` (its default "vse" scores nothing in the released code)."""
    from model.architecture.imram import ImramOptions

    wrong = {
        k: opt[k] for k, v in SUPPORTED_OFFICIAL_IMRAM_OPTIONS.items() if k in opt and opt[k] != v
    }
    if wrong:
        raise CheckpointError(
            f"{path} was trained with options this implementation does not reproduce: {wrong} "
            f"(supported: {SUPPORTED_OFFICIAL_IMRAM_OPTIONS})"
        )
    mode = opt.get("model_mode")
    if mode not in OFFICIAL_IMRAM_MODES:
        raise CheckpointError(
            f"{path}: opt.model_mode is {mode!r}; an IMRAM checkpoint needs one of "
            f"{sorted(OFFICIAL_IMRAM_MODES)}"
        )
    try:
        return ImramOptions(
            iteration_steps=int(opt.get("iteration_step", 3)),
            lambda_softmax=float(opt.get("lambda_softmax", 9.0)),
            mode=OFFICIAL_IMRAM_MODES[mode],
            memory_norm=not bool(opt.get("no_IMRAM_norm", False)),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _imram_config_from_weights(
    state: Mapping[str, Tensor], opt: Mapping[str, Any], path: Path
) -> CampConfig:
    try:
        vocab_size, word_dim = state["text_encoder.embed.weight"].shape
        embed_size, img_dim = state["image_encoder.fc.weight"].shape
    except KeyError as exc:
        raise CheckpointError(f"{path} is not an IMRAM checkpoint: missing key {exc}") from exc
    num_layers = _gru_layers(state)
    _check_options_match_weights(
        path,
        opt,
        vocab_size=vocab_size,
        word_dim=word_dim,
        embed_size=embed_size,
        img_dim=img_dim,
        num_layers=num_layers,
    )
    try:
        return CampConfig(
            vocab_size=int(vocab_size),
            word_dim=int(word_dim),
            embed_size=int(embed_size),
            img_dim=int(img_dim),
            num_gru_layers=max(1, num_layers),
            max_words=IMRAM_MAX_WORDS,
            pad_width=IMRAM_MAX_WORDS + 3,
            name=str(opt.get("data_name", "imram_official")),
        )
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _is_simple(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_simple(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_is_simple(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append(f"mismatched shapes {mismatched}")
        name = type(model).__name__
        raise CheckpointError(f"{source} does not fit the {name}: " + "; ".join(problems))


def _atomic_torch_save(payload: dict[str, Any], path: Path) -> Path:
    return write_atomically(path, lambda temp: torch.save(payload, temp))


def _gru_layers(state: Mapping[str, Any]) -> int:
    """Layers of an official checkpoint's text GRU, counted from its weights."""
    return sum(
        1
        for key in state
        if key.startswith("text_encoder.rnn.weight_ih_l") and not key.endswith("_reverse")
    )


def _check_options_match_weights(path: Path, opt: Mapping[str, Any], **sizes: int) -> None:
    """An official checkpoint's recorded options must agree with its weights' shapes."""
    for option, value in sizes.items():
        if option in opt and int(opt[option]) != int(value):
            raise CheckpointError(
                f"{path}: opt.{option}={opt[option]} disagrees with the weights ({value})"
            )
