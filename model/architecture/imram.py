"""IMRAM (Chen et al., "IMRAM: Iterative Matching with Recurrent Attention Memory for Cross-Modal
Image-Text Retrieval", CVPR 2020), exactly as the authors' code computes it
(github:HuiChen24/IMRAM at acada5c, `model.py`).

Both encoders map into a joint space of width d and l2-normalise every fragment:
regions V = l2norm(W_fc r + b) [R, d] and words T = l2norm((h_fwd + h_bwd) / 2) [L, d] from a
bidirectional GRU. The scorer then runs K matching steps in each direction (paper §3.2-3.4):

* Text-IMRAM: the query is the caption's words, the context the image's regions;
  Image-IMRAM: the query is the regions, the context the words.
* Cross-modal attention (RAM, eq. 2-4): a_ij = LeakyReLU_0.1(c_i · q_j), l2-normalised, then
  α = softmax_i(λ · a_ij) over the context, and the attended context c*_j = Σ_i α_ij c_i.
* Step similarity (eq. 8): F_k = mean_j cos(q⁰_j, c*_j), always against the *original*
  fragments q⁰ (the encoder's words or regions), not against the updated memory.
* Memory distillation (MDU, eq. 5-7): with x = [q_j ; c*_j],
  g = σ(W_g x + b_g), c̃ = tanh(W_c x + b_c), q_j ← g ⊙ q_j + (1 - g) ⊙ c̃.
* Score: S = Σ_k F_k (Text-IMRAM), Σ_k F'_k (Image-IMRAM), or both summed (full IMRAM).

Where the official code departs from the paper, this module follows the code:

* The l2-normalisation of the attention runs over the **query** axis (for each context
  fragment, across the words of the caption in Text-IMRAM or the regions in Image-IMRAM), not
  over the context axis as eq. 3 reads. Padded query slots are kept out of that norm.
* Each F_k is computed in float32 and cast to **float64** before the sum over steps and
  directions: scores are float64 tensors.
* The memory update after the last step is computed by the official code but read by
  nothing; `score_pairs` skips it (same scores, same gradients), `trace` records it.
* `memory_norm` (the code's `not no_IMRAM_norm`) l2-normalises the query after each update;
  the released training scripts pass `--no_IMRAM_norm`, so it is off by default.
* The official loop runs over captions one at a time; here every (image, caption) pair is
  scored in one batch per step, with padded words and regions masked exactly.

The memory update's layers read [q; c*], so they split: W [q; c*] + b = (W_q q + b) + W_c c*,
and W_c c* = α (C W_cᵀ) because the attended context is c* = α C. `MemoryProjections` holds,
per item, C W_cᵀ of the context and W_q q⁰ + b of the first query: the reranker computes them
once per image and caption (model/architecture/imram_precompute.py), and a pair's update then
costs a small [Q, C] x [C, 2d] product instead of a [Q, 2d] x [2d, 2d] one (steps after the
first still project the updated query).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.architecture.cross_modal import CrossModalModel
from model.architecture.encoders import EncodedText, GRUTextEncoder, length_mask
from model.architecture.scorer import L2NORM_EPS, l2norm, masked_logits, wide
from model.checkpoints.config import CampConfig, ConfigError, config_from_dict
from model.text.minilm import MiniLMWordEncoder

IMRAM_MODES = ("full", "text", "image")
# LeakyReLU slope of the "clipped_l2norm" attention (`nn.LeakyReLU(0.1)` in func_attention).
ATTENTION_LEAKY_SLOPE = 0.1
# cosine_similarity(x1, x2) = x1·x2 / max(||x1||·||x2||, eps), as coded.
COSINE_EPS = 1e-8
# Pairs the CPU inference path scores at a time: a block's intermediates (~120 KB a pair at the
# shipped sizes, ~8 MB a block) stay in the caches and in the worker's arena instead of being
# mapped afresh (1,000 pairs in one piece took 1.5x the time of blocks of 64 to 128).
CPU_INFERENCE_BLOCK_PAIRS = 64


@dataclass(frozen=True)
class ImramOptions:
    """The scorer's own settings (the sizes live in `CampConfig`).

    iteration_steps: K, matching steps per direction (3 in the released COCO script).
    lambda_softmax: λ, inverse temperature of the attention softmax (9 in the scripts).
    mode: "full" (both directions summed), "text" (Text-IMRAM) or "image" (Image-IMRAM).
    memory_norm: l2-normalise the query after each memory update (`not no_IMRAM_norm`).
    """

    iteration_steps: int = 3
    lambda_softmax: float = 9.0
    mode: str = "full"
    memory_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.iteration_steps, int) or self.iteration_steps < 1:
            raise ConfigError(f"iteration_steps must be >= 1, got {self.iteration_steps!r}")
        if self.mode not in IMRAM_MODES:
            raise ConfigError(f"IMRAM mode must be one of {IMRAM_MODES}, got {self.mode!r}")
        if not float(self.lambda_softmax) > 0:
            raise ConfigError(f"lambda_softmax must be positive, got {self.lambda_softmax!r}")

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions the mode sums: "text" (words query regions), "image" (the reverse)."""
        return ("text", "image") if self.mode == "full" else (self.mode,)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImramOptions:
        return config_from_dict(cls, data, what="IMRAM options")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ImramImageEncoder(nn.Module):
    """regions [..., R, img_dim] -> l2norm(fc(regions)) [..., R, d] (`EncoderImagePrecomp`)."""

    def __init__(self, *, img_dim: int, embed_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)

    @property
    def embed_size(self) -> int:
        return self.fc.out_features

    def forward(self, regions: Tensor) -> Tensor:
        return l2norm(self.fc(regions))


class ImramTextEncoder(GRUTextEncoder):
    """The CAMP GRU encoder (bi-GRU, directions averaged) followed by an l2norm of every word
    (`EncoderText` with `no_txtnorm=False`); padded slots stay zero."""

    def forward(self, token_ids: Tensor, lengths: Tensor) -> EncodedText:
        text = super().forward(token_ids, lengths)
        return EncodedText(words=l2norm(text.words), lengths=text.lengths)


class ImramMiniLMWordEncoder(MiniLMWordEncoder):
    """The shipped model's text side for IMRAM: frozen all-MiniLM-L6-v2 token features projected
    to d (`MiniLMWordEncoder`, as CAMP's minilm text encoder), then IMRAM's l2norm of every
    word, as its own encoder ends; padded slots stay zero."""

    def project(self, features: Tensor, lengths: Tensor) -> EncodedText:
        width = int(lengths.max())
        padding = ~length_mask(lengths.to(features.device), width).unsqueeze(-1)
        # Padded slots are set to a constant before the norm (a zero row's norm has a 0/0
        # gradient, NaN through the sqrt) and to zero after it.
        projected = self.projection(features[:, :width]).masked_fill(padding, 1.0)
        words = l2norm(projected).masked_fill(padding, 0.0)
        return EncodedText(words=words, lengths=lengths.to(words.device))


@dataclass
class MemoryProjections:
    """One direction's memory-update layers applied ahead, for P pairs: first_query [P, Q, 2d]
    = W_q q⁰ + b of the encoder's fragments, context [P, C, 2d] = C W_cᵀ of the context (the
    candidate layer's d outputs, then the gate layer's)."""

    first_query: Tensor
    context: Tensor


@dataclass
class ImramStepTrace:
    """The intermediates of one direction, stacked over the K steps: [K, P, ...] for P pairs
    (or [K, Nc, Ni, ...] from `ImramScorer.trace_grid`). Q query slots, C context slots;
    positions past a caption's length or an image's region count are zero.

    query [K, P, Q, d] the memory entering step k (k=0: the encoder's fragments);
    attention_norm [K, P, C, Q] LeakyReLU(c·q) l2-normalised over the query axis;
    attention [K, P, Q, C] softmax over the context of λ·attention_norm;
    context [K, P, Q, d] attended context; gate, candidate, new_query [K, P, Q, d] the MDU;
    cosine [K, P, Q] cos(q⁰, context); step_similarity [K, P] float64.
    """

    query: Tensor
    attention_norm: Tensor
    attention: Tensor
    context: Tensor
    gate: Tensor
    candidate: Tensor
    new_query: Tensor
    cosine: Tensor
    step_similarity: Tensor

    def map(self, function) -> ImramStepTrace:
        return ImramStepTrace(
            **{f.name: function(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


@dataclass
class ImramTrace:
    """Scores [P] (or [Ni, Nc]) float64 and the per-direction traces of the mode's directions."""

    scores: Tensor
    directions: dict[str, ImramStepTrace]


def cosine_rows(x1: Tensor, x2: Tensor) -> Tensor:
    """Row-wise cosine along the last axis, x1·x2 / max(||x1||·||x2||, 1e-8) (as coded)."""
    products = (x1 * x2).sum(-1)
    return products / (x1.norm(dim=-1) * x2.norm(dim=-1)).clamp(min=COSINE_EPS)


class ImramScorer(nn.Module):
    """The recurrent attention memory of both directions: four linear layers over [q; c*].

    Parameter names say their role; `model.checkpoints.checkpoint.OFFICIAL_IMRAM_MODULES` maps
    them to the official ones (`linear_t2i`, `gate_t2i`, `linear_i2t`, `gate_i2t`).
    """

    def __init__(self, *, embed_size: int, options: ImramOptions | None = None) -> None:
        super().__init__()
        self.options = options or ImramOptions()
        self.embed_size = embed_size
        self.text_memory_candidate = nn.Linear(2 * embed_size, embed_size)
        self.text_memory_gate = nn.Linear(2 * embed_size, embed_size)
        self.image_memory_candidate = nn.Linear(2 * embed_size, embed_size)
        self.image_memory_gate = nn.Linear(2 * embed_size, embed_size)

    # -- the math --------------------------------------------------------------------------------
    def attend(
        self, query: Tensor, query_mask: Tensor | None, context: Tensor, context_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`func_attention` with "clipped_l2norm": query [P, Q, d], context [P, C, d], masks
        [P, Q] / [P, C] bool (None: all real) -> (attended context [P, Q, d], the normalised
        attention [P, C, Q], its softmax over the context [P, Q, C])."""
        raw = F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), ATTENTION_LEAKY_SLOPE)
        if query_mask is not None:  # padded query slots must not enter the norm over queries
            raw = raw.masked_fill(~query_mask.unsqueeze(1), 0.0)
        if context_mask is not None:  # padded context rows: a constant (not a 0/0 gradient);
            raw = raw.masked_fill(~context_mask.unsqueeze(2), 1.0)  # the softmax skips them
        normalised = l2norm(raw, dim=2)
        logits = self.options.lambda_softmax * normalised.transpose(1, 2)
        if context_mask is not None:
            logits = masked_logits(logits, context_mask.unsqueeze(1))
        weights = logits.softmax(dim=-1)
        return torch.bmm(weights, context), normalised, weights

    def memory_update(self, direction: str, query: Tensor, context: Tensor) -> dict[str, Tensor]:
        """The MDU of `direction`: gate, candidate and the new query [P, Q, d]."""
        joint = torch.cat((query, context), dim=-1)
        candidate_layer, gate_layer = self._memory_layers(direction)
        candidate = torch.tanh(candidate_layer(joint))
        gate = torch.sigmoid(gate_layer(joint))
        new_query = query * gate + candidate * (1 - gate)
        if self.options.memory_norm:
            new_query = l2norm(new_query)
        return {"gate": gate, "candidate": candidate, "new_query": new_query}

    def memory_weights(self, direction: str) -> tuple[Tensor, Tensor, Tensor]:
        """The candidate and gate layers of `direction` stacked ([2d, 2d]) and split by what
        they read: (W_query [2d, d] on q, W_context [2d, d] on c*, bias [2d])."""
        candidate, gate = self._memory_layers(direction)
        weight = torch.cat((candidate.weight, gate.weight))
        d = self.embed_size
        return weight[:, :d], weight[:, d:], torch.cat((candidate.bias, gate.bias))

    def query_projection(self, direction: str, query: Tensor) -> Tensor:
        """W_q q + b [.., 2d]: the memory update's query half (with both biases)."""
        weight, _, bias = self.memory_weights(direction)
        return F.linear(query, weight, bias)

    def context_projection(self, direction: str, context: Tensor) -> Tensor:
        """C W_cᵀ [.., 2d]: the memory update's context half, before the attention mixes it."""
        return F.linear(context, self.memory_weights(direction)[1])

    def projected_memory_update(
        self,
        direction: str,
        query: Tensor,
        weights: Tensor,
        projections: MemoryProjections,
        *,
        first_step: bool,
    ) -> Tensor:
        """`memory_update`'s new query from the split layers: (W_q q + b) + α (C W_cᵀ), with
        α the attention [P, Q, C]; the first step reads W_q q⁰ + b from `projections`."""
        query_half = (
            projections.first_query if first_step else self.query_projection(direction, query)
        )
        joint = query_half + torch.bmm(weights.to(projections.context.dtype), projections.context)
        candidate, gate = joint.chunk(2, dim=-1)
        gate = torch.sigmoid(gate)
        new_query = query * gate + torch.tanh(candidate) * (1 - gate)
        if self.options.memory_norm:
            new_query = l2norm(new_query)
        return new_query

    def _memory_layers(self, direction: str) -> tuple[nn.Linear, nn.Linear]:
        if direction == "text":
            return self.text_memory_candidate, self.text_memory_gate
        if direction == "image":
            return self.image_memory_candidate, self.image_memory_gate
        raise ValueError(f"unknown IMRAM direction {direction!r}; expected 'text' or 'image'")

    def _run_direction(
        self,
        direction: str,
        regions: Tensor,
        region_mask: Tensor | None,
        words: Tensor,
        word_mask: Tensor,
        *,
        keep_trace: bool,
        projections: MemoryProjections | None = None,
    ) -> tuple[Tensor, ImramStepTrace | None]:
        """K steps of one direction over P pairs: step similarities [K, P] float64.
        `projections`: the memory layers applied ahead per item (same scores to float
        rounding, far fewer FLOPs); the trace always runs the layers as coded."""
        fragments, fragment_mask, context, context_mask = _direction_sides(
            direction, regions, region_mask, words, word_mask
        )
        counts = _fragment_counts(fragments, fragment_mask)
        query = fragments
        similarities: list[Tensor] = []
        steps: list[dict[str, Tensor]] = []
        last = self.options.iteration_steps - 1
        for step in range(self.options.iteration_steps):
            attended, normalised, weights = self.attend(query, fragment_mask, context, context_mask)
            cosine = cosine_rows(fragments, attended)
            if fragment_mask is not None:
                cosine = cosine.masked_fill(~fragment_mask, 0.0)
            similarity = (cosine.sum(dim=1) / counts.to(cosine.dtype)).double()
            similarities.append(similarity)
            if keep_trace:
                update = self.memory_update(direction, query, attended)
                steps.append(
                    {
                        "query": query,
                        "attention_norm": normalised,
                        "attention": weights,
                        "context": attended,
                        "cosine": cosine,
                        "step_similarity": similarity,
                        **update,
                    }
                )
                query = update["new_query"]
            elif step < last:  # the official code also updates after the last step, unread
                if projections is None:
                    query = self.memory_update(direction, query, attended)["new_query"]
                else:
                    query = self.projected_memory_update(
                        direction, query, weights, projections, first_step=step == 0
                    )
        step_similarities = torch.stack(similarities)
        if not keep_trace:
            return step_similarities, None
        trace = ImramStepTrace(**{k: torch.stack([s[k] for s in steps]) for k in steps[0]})
        return step_similarities, _zero_padding(trace, fragment_mask, context_mask)

    def _run_direction_inference(
        self,
        direction: str,
        sides: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
        projections: MemoryProjections | None,
        first_products: Tensor,
    ) -> Tensor:
        """`_run_direction` without autograd, for the reranker and evaluation. Step
        similarities [K, P] float64, equal to `_run_direction`'s to float rounding.

        The same steps, arranged for a CPU (bench/pair_floor.py): the element-wise work runs in
        place, the memory update into buffers reused from step to step, its biases and query
        half added by the products themselves (`baddbmm`, `addmm`), written lerp(c̃, q, g) =
        c̃ + g ⊙ (q - c̃) with tanh(x) = 2σ(2x) - 1 (torch's CPU tanh is several times slower
        than its sigmoid); masks and the fragments' norms are taken once, and on a CPU a mask
        that keeps every slot (one caption against K grid images) is not applied at all.
        Where the context is short next to the width (Image-IMRAM: a caption's words against
        d = 128), the attended context c* = α C is never formed: its cosine with q⁰ needs only
        q⁰·c* = α (C q⁰) and ||c*||² = α (C Cᵀ) αᵀ, products of [Q, C] and [C, C] tensors
        instead of [Q, d] ones.
        `sides`: the direction's (fragments, their mask, context, its mask); `first_products`
        [P, C, Q] = C q⁰ (any layout): the first step's attention before its LeakyReLU, one
        product that serves both directions."""
        fragments, fragment_mask, context, context_mask = sides
        if projections is None:
            projections = MemoryProjections(
                first_query=self.query_projection(direction, fragments),
                context=self.context_projection(direction, context),
            )
        steps = self.options.iteration_steps
        queries, dim = fragments.shape[1:]
        contexts = context.shape[1]
        gram = (
            torch.bmm(context, context.transpose(1, 2))
            if attends_by_gram(contexts, queries, dim, steps)
            else None
        )
        query_padding = None if fragment_mask is None else ~fragment_mask.unsqueeze(1)
        context_keep = None if context_mask is None else context_mask.unsqueeze(2)
        counts = _fragment_counts(fragments, fragment_mask)
        fragment_norms = fragments.norm(dim=-1)
        query_weight, _, query_bias = self.memory_weights(direction)
        memory = joint = None
        query = fragments
        similarities: list[Tensor] = []
        for step in range(steps):
            if step == 0:
                attention = F.leaky_relu(first_products, ATTENTION_LEAKY_SLOPE)
            else:
                attention = torch.bmm(context, query.transpose(1, 2))
                F.leaky_relu_(attention, ATTENTION_LEAKY_SLOPE)
            if query_padding is not None:  # updated memories of padded slots are not zero
                attention.masked_fill_(query_padding, 0.0)
            norms = torch.linalg.vector_norm(attention, dim=2, keepdim=True, dtype=wide(attention))
            attention.mul_(norms.add_(L2NORM_EPS).reciprocal_().mul_(self.options.lambda_softmax))
            if context_keep is not None:
                masked_logits(attention, context_keep, inplace=True)
            weights = attention.softmax(dim=1).transpose(1, 2)  # [P, Q, C], a view
            if gram is not None:
                alpha = weights.to(gram.dtype)
                dots = (alpha * first_products.transpose(1, 2)).sum(dim=-1)
                squared = (torch.bmm(alpha, gram) * alpha).sum(dim=-1).clamp_(min=0)
                attended_norms = squared.sqrt_()
            else:
                attended = torch.bmm(weights.to(context.dtype), context)
                dots = (fragments * attended).sum(dim=-1)
                attended_norms = attended.norm(dim=-1)
            cosine = dots.div_((fragment_norms * attended_norms).clamp_(min=COSINE_EPS))
            if fragment_mask is not None:
                cosine.masked_fill_(~fragment_mask, 0.0)
            similarities.append((cosine.sum(dim=1) / counts.to(cosine.dtype)).double())
            if step == steps - 1:  # the official code also updates after the last step, unread
                break
            if joint is None:  # W_q q⁰ + b (once per item) + α (C W_cᵀ); autocast picks the dtype
                joint = torch.baddbmm(
                    projections.first_query,
                    weights.to(projections.context.dtype),
                    projections.context,
                )
            else:  # products with out= run in its dtype: the operands are cast to it
                work = joint.dtype
                torch.addmm(
                    query_bias.to(work),
                    query.reshape(-1, dim).to(work),
                    query_weight.t().to(work),
                    out=joint.view(-1, joint.shape[-1]),
                )
                joint.baddbmm_(weights.to(work), projections.context.to(work))
            candidate, gate = joint.chunk(2, dim=-1)
            candidate.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)  # tanh
            gate.sigmoid_()
            # q ← g ⊙ q + (1 - g) ⊙ c̃ = c̃ + g ⊙ (q - c̃), in the query's dtype
            memory = torch.lerp(candidate.to(query.dtype), query, gate.to(query.dtype), out=memory)
            query = l2norm(memory) if self.options.memory_norm else memory
        return torch.stack(similarities)

    def _step_similarities_inference(
        self,
        regions: Tensor,
        region_mask: Tensor | None,
        words: Tensor,
        word_mask: Tensor | None,
        projections: Mapping[str, MemoryProjections],
    ) -> dict[str, Tensor]:
        """`step_similarities` of one block of pairs on the inference path."""
        if not regions.is_cuda:  # a mask that keeps every slot only costs passes to apply
            region_mask, word_mask = _unless_full(region_mask), _unless_full(word_mask)
        products = torch.bmm(regions, words.transpose(1, 2))  # [P, R, L], both directions'
        return {
            direction: self._run_direction_inference(
                direction,
                _direction_sides(direction, regions, region_mask, words, word_mask),
                projections.get(direction),
                products if direction == "text" else products.transpose(1, 2),
            )
            for direction in self.options.directions
        }

    # -- public forms -------------------------------------------------------------------------
    def step_similarities(
        self,
        regions: Tensor,
        region_mask: Tensor | None,
        words: Tensor,
        word_mask: Tensor,
        projections: Mapping[str, MemoryProjections] | None = None,
    ) -> dict[str, Tensor]:
        """Per direction of the mode, F_k for P aligned pairs: {direction: [K, P] float64}."""
        _check_pairs(regions, region_mask, words, word_mask)
        projections = projections or {}
        if not torch.is_grad_enabled():
            block = max(1, len(regions)) if regions.is_cuda else CPU_INFERENCE_BLOCK_PAIRS
            blocks = [
                self._step_similarities_inference(
                    *_pair_rows(
                        slice(start, start + block), regions, region_mask, words, word_mask
                    ),
                    {
                        d: _projection_rows(slice(start, start + block), p)
                        for d, p in projections.items()
                    },
                )
                for start in range(0, max(len(regions), 1), block)
            ]
            return {d: torch.cat([b[d] for b in blocks], dim=1) for d in self.options.directions}
        return {
            direction: self._run_direction(
                direction,
                regions,
                region_mask,
                words,
                word_mask,
                keep_trace=False,
                projections=projections.get(direction),
            )[0]
            for direction in self.options.directions
        }

    def score_pairs(
        self,
        regions: Tensor,
        region_mask: Tensor | None,
        words: Tensor,
        word_mask: Tensor,
        projections: Mapping[str, MemoryProjections] | None = None,
    ) -> Tensor:
        """Scores [P] float64 of P aligned pairs: regions [P, R, d] (l2-normalised encoder
        output), region_mask [P, R] bool or None, words [P, L, d], word_mask [P, L] bool;
        `projections` {direction: MemoryProjections} of these pairs, when precomputed."""
        steps = self.step_similarities(regions, region_mask, words, word_mask, projections)
        return _sum_steps(steps)

    def trace_pairs(
        self, regions: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor
    ) -> ImramTrace:
        """`score_pairs` with every intermediate (`ImramStepTrace`) of every step."""
        _check_pairs(regions, region_mask, words, word_mask)
        traces, steps = {}, {}
        for direction in self.options.directions:
            steps[direction], traces[direction] = self._run_direction(
                direction, regions, region_mask, words, word_mask, keep_trace=True
            )
        return ImramTrace(scores=_sum_steps(steps), directions=traces)

    def forward(
        self,
        regions: Tensor,
        words: Tensor,
        word_mask: Tensor,
        region_mask: Tensor | None = None,
    ) -> Tensor:
        """The direct form: every image [Ni, R, d] against every caption [Nc, L, d] ->
        scores [Ni, Nc] float64 (the official eval-mode layout)."""
        pairs = _grid_pairs(regions, region_mask, words, word_mask)
        num_images, num_captions = regions.shape[0], words.shape[0]
        return self.score_pairs(*pairs).view(num_captions, num_images).t()

    def trace_grid(
        self,
        regions: Tensor,
        words: Tensor,
        word_mask: Tensor,
        region_mask: Tensor | None = None,
    ) -> ImramTrace:
        """`forward` with its trace: scores [Ni, Nc]; step tensors [K, Nc, Ni, ...] (caption
        first, as the official loop over captions lays them out)."""
        num_images, num_captions = regions.shape[0], words.shape[0]
        trace = self.trace_pairs(*_grid_pairs(regions, region_mask, words, word_mask))

        def unflatten(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], num_captions, num_images, *x.shape[2:])

        return ImramTrace(
            scores=trace.scores.view(num_captions, num_images).t(),
            directions={name: t.map(unflatten) for name, t in trace.directions.items()},
        )


def attends_by_gram(contexts: int, queries: int, dim: int, steps: int) -> bool:
    """Whether the inference path takes the attended context's cosine in its Gram form
    (C Cᵀ once, then [Q, C] x [C, C] a step) rather than forming c* ([Q, C] x [C, d] a step):
    whichever multiplies less."""
    return contexts * (dim + steps * queries) < steps * queries * dim


def _direction_sides(
    direction: str,
    regions: Tensor,
    region_mask: Tensor | None,
    words: Tensor,
    word_mask: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(query fragments, their mask, context, its mask) of a direction: Text-IMRAM's words
    query the regions, Image-IMRAM's regions query the words."""
    if direction == "text":
        return words, word_mask, regions, region_mask
    return regions, region_mask, words, word_mask


def _unless_full(mask: Tensor | None) -> Tensor | None:
    """None for a mask that keeps every slot (a host read: CPU tensors only)."""
    return None if mask is None or bool(mask.all()) else mask


def _fragment_counts(fragments: Tensor, mask: Tensor | None) -> Tensor:
    """Real query fragments per pair [P] (all of them without a mask)."""
    if mask is None:
        return torch.full(fragments.shape[:1], fragments.shape[1], device=fragments.device)
    return mask.sum(dim=1)


def _pair_rows(
    rows: slice, regions: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """A block of pairs: views of every pair tensor's rows."""
    return (
        regions[rows],
        None if region_mask is None else region_mask[rows],
        words[rows],
        word_mask[rows],
    )


def _projection_rows(rows: slice, projections: MemoryProjections) -> MemoryProjections:
    return MemoryProjections(projections.first_query[rows], projections.context[rows])


def _sum_steps(steps: Mapping[str, Tensor]) -> Tensor:
    """Σ over steps, then over directions, in float64 (as the official `.double()` casts do)."""
    total = None
    for step_similarities in steps.values():
        direction_sum = step_similarities.sum(dim=0)
        total = direction_sum if total is None else total + direction_sum
    assert total is not None
    return total


def _check_pairs(
    regions: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor
) -> None:
    pairs = regions.shape[0]
    if regions.dim() != 3 or words.dim() != 3 or words.shape[0] != pairs:
        raise ValueError(
            f"expected regions [P, R, d] and words [P, L, d], got {tuple(regions.shape)} and "
            f"{tuple(words.shape)}"
        )
    if word_mask.shape != words.shape[:2]:
        raise ValueError(f"word_mask {tuple(word_mask.shape)} does not fit {tuple(words.shape)}")
    if region_mask is not None and region_mask.shape != regions.shape[:2]:
        raise ValueError(
            f"region_mask {tuple(region_mask.shape)} does not fit {tuple(regions.shape)}"
        )


def _grid_pairs(
    regions: Tensor, region_mask: Tensor | None, words: Tensor, word_mask: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Every (caption, image) pair, caption-major: P = Nc·Ni rows."""
    num_images, num_captions = regions.shape[0], words.shape[0]

    def per_image(x: Tensor) -> Tensor:
        return x.unsqueeze(0).expand(num_captions, *x.shape).reshape(-1, *x.shape[1:])

    def per_caption(x: Tensor) -> Tensor:
        return x.unsqueeze(1).expand(x.shape[0], num_images, *x.shape[1:]).reshape(-1, *x.shape[1:])

    return (
        per_image(regions),
        per_image(region_mask) if region_mask is not None else None,
        per_caption(words),
        per_caption(word_mask),
    )


def _zero_padding(
    trace: ImramStepTrace, query_mask: Tensor | None, context_mask: Tensor | None
) -> ImramStepTrace:
    """Zero the trace past each pair's real query and context slots (the parity layout)."""

    def keep(x: Tensor, mask: Tensor | None, axis: int) -> Tensor:
        if mask is None:
            return x
        shape = [1] * x.dim()
        shape[1], shape[axis] = mask.shape[0], mask.shape[1]
        return x.masked_fill(~mask.view(shape), 0.0)

    per_query = {
        name: keep(getattr(trace, name), query_mask, 2)
        for name in ("query", "context", "gate", "candidate", "new_query", "cosine")
    }
    norm = keep(keep(trace.attention_norm, context_mask, 2), query_mask, 3)
    attention = keep(keep(trace.attention, query_mask, 2), context_mask, 3)
    return dataclasses.replace(trace, attention_norm=norm, attention=attention, **per_query)


class ImramModel(CrossModalModel):
    """`image_encoder`, `text_encoder` and `scorer` of IMRAM under one state dict.

    `forward` is the training/evaluation direct form, scores [Ni, Nc] float64 (the official
    training mode returns the transpose, [Nc, Ni]; the hinge loss is the same on both).
    """

    @classmethod
    def from_config(cls, config: CampConfig, options: ImramOptions | None = None) -> ImramModel:
        return cls(
            image_encoder=ImramImageEncoder(img_dim=config.img_dim, embed_size=config.embed_size),
            text_encoder=ImramTextEncoder(
                vocab_size=config.vocab_size,
                word_dim=config.word_dim,
                embed_size=config.embed_size,
                num_layers=config.num_gru_layers,
            ),
            scorer=ImramScorer(embed_size=config.embed_size, options=options),
            config=config,
        )

    @property
    def options(self) -> ImramOptions:
        return self.scorer.options

    def forward_with_trace(
        self,
        regions: Tensor,
        token_ids: Tensor,
        lengths: Tensor,
        region_mask: Tensor | None = None,
    ) -> ImramTrace:
        text = self.encode_text(token_ids, lengths)
        return self.scorer.trace_grid(
            self.encode_images(regions), text.words, text.mask, region_mask
        )


__all__ = [
    "IMRAM_MODES",
    "ImramImageEncoder",
    "ImramMiniLMWordEncoder",
    "ImramModel",
    "ImramOptions",
    "ImramScorer",
    "ImramStepTrace",
    "ImramTextEncoder",
    "ImramTrace",
    "MemoryProjections",
    "attends_by_gram",
    "cosine_rows",
]
