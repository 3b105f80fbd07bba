"""Reproduce the official CAMP outputs (../shared/parity) through the official-checkpoint import.

Every size, batch shape and caption length is read from the files, so any folder produced the
same way (other sizes or seeds) passes too: set PARITY_DIR to it. Tolerances follow the parity
README: scores/embeddings atol 1e-5, losses rtol 1e-5, gradients rtol 1e-4 / atol 1e-6.
"""

from __future__ import annotations

import json

import pytest
import torch
from shared_paths import PARITY_DIR

from model.architecture.precompute import PrecomputedScorer
from model.checkpoints.checkpoint import OFFICIAL_PARTS, import_official_checkpoint
from model.training.losses import bce_hardest_negative_loss, bce_mean_loss

VARIANTS = ("dense", "tiny")
SCORE_ATOL = 1e-5
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6

# Official trace name -> how to read it from our ScoreTrace.
TRACE_FIELDS = {
    "attn_t2v": lambda t: t.attention.attn_t2v,
    "attn_v2t": lambda t: t.attention.attn_v2t,
    "selfattn_v": lambda t: t.attention.selfattn_v,
    "selfattn_t": lambda t: t.attention.selfattn_t,
    "pool_attn_v": lambda t: t.attention.pool_attn_v,
    "pool_attn_t": lambda t: t.attention.pool_attn_t,
    "gate_v": lambda t: t.attention.gate_v,
    "gate_t": lambda t: t.attention.gate_t,
    "img_key_fc.out": lambda t: t.image_keys,
    "txt_key_fc.out": lambda t: t.text_keys,
    "img_query_fc.out": lambda t: t.image_queries,
    "txt_query_fc.out": lambda t: t.text_queries,
    "weighted_txt_query_fc.in": lambda t: t.region_messages,
    "weighted_txt_query_fc.out": lambda t: t.region_message_queries,
    "weighted_txt_key_fc.in": lambda t: t.region_messages,
    "weighted_txt_key_fc.out": lambda t: t.region_message_keys,
    "weighted_img_query_fc.in": lambda t: t.word_messages,
    "weighted_img_query_fc.out": lambda t: t.word_message_queries,
    "weighted_img_key_fc.in": lambda t: t.word_messages,
    "weighted_img_key_fc.out": lambda t: t.word_message_keys,
    "fc_1.in": lambda t: t.image_fusion_input,
    "fc_1.out": lambda t: t.image_fusion_output,
    "fc_2.in": lambda t: t.text_fusion_input,
    "fc_2.out": lambda t: t.text_fusion_output,
    "final_reduce_1.in": lambda t: t.fused_regions,
    "final_reduce_1.out": lambda t: t.pooled_image,
    "final_reduce_2.in": lambda t: t.fused_words,
    "final_reduce_2.out": lambda t: t.pooled_text,
    "fc_out.in": lambda t: t.score_input,
    "fc_out.out": lambda t: t.scores.unsqueeze(-1),
}


def _load(variant: str, what: str):
    path = PARITY_DIR / f"camp_{variant}_{what}"
    if not path.is_file():
        pytest.fail(f"parity file {path} is missing (set PARITY_DIR to a complete folder)")
    return torch.load(path) if path.suffix == ".pt" else json.loads(path.read_text())


class Parity:
    """One variant's files, the imported model, and our forward passes over batches A and B."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.config_file = _load(variant, "config.json")
        self.inputs = _load(variant, "inputs.pt")
        self.outputs = _load(variant, "outputs.pt")
        self.checkpoint = import_official_checkpoint(
            PARITY_DIR / f"camp_{variant}_checkpoint.pth.tar"
        )
        self.model = self.checkpoint.build_model()

    def width(self, batch: str) -> int:
        """Word slots of the official padded layout, read from the mask."""
        return self.inputs[f"{batch}_mask"].shape[1]

    def encode(self, batch: str, pad: bool = True, model=None):
        """Our encoders on batch A or B; words padded to the official width unless pad=False."""
        model = model or self.model
        images = model.encode_images(self.inputs[f"{batch}_images"])
        text = model.encode_text(self.inputs[f"{batch}_captions"], self.inputs[f"{batch}_lengths"])
        return images, (text.padded_to(self.width(batch)) if pad else text)


@pytest.fixture(scope="module", params=VARIANTS)
def parity(request) -> Parity:
    return Parity(request.param)


def test_parity_folder_has_both_variants():
    for variant in VARIANTS:
        assert (PARITY_DIR / f"camp_{variant}_checkpoint.pth.tar").is_file(), PARITY_DIR


def test_imported_config_and_weights_match_the_files(parity: Parity):
    opt, config = parity.config_file["opt"], parity.checkpoint.config
    assert (config.vocab_size, config.word_dim, config.embed_size, config.img_dim) == (
        opt["vocab_size"],
        opt["word_dim"],
        opt["embed_size"],
        opt["img_dim"],
    )
    reference = _load(parity.variant, "state_dict.pt")
    ours = parity.checkpoint.state_dict
    for part, modules in OFFICIAL_PARTS:
        for key, tensor in reference[part].items():
            module, _, param = key.removeprefix("module.").rpartition(".")
            torch.testing.assert_close(ours[f"{modules[module]}.{param}"], tensor, rtol=0, atol=0)
    assert len(ours) == sum(len(reference[part]) for part, _ in OFFICIAL_PARTS)


@pytest.mark.parametrize("batch", ["A", "B"])
def test_encoder_outputs(parity: Parity, batch: str):
    with torch.no_grad():
        images, text = parity.encode(batch)
    torch.testing.assert_close(images, parity.outputs[f"{batch}_img_emb"], rtol=0, atol=SCORE_ATOL)
    torch.testing.assert_close(
        text.words, parity.outputs[f"{batch}_cap_emb"], rtol=0, atol=SCORE_ATOL
    )
    mask = parity.inputs[f"{batch}_mask"].bool()
    assert torch.equal(text.mask, mask)


def test_text_encoder_accepts_any_caption_order(parity: Parity):
    captions, lengths = parity.inputs["A_captions"], parity.inputs["A_lengths"]
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
    width = parity.width("A")
    with torch.no_grad():
        shuffled = parity.model.encode_text(captions[order], lengths[order]).padded_to(width)
    expected = parity.outputs["A_cap_emb"][order]
    torch.testing.assert_close(shuffled.words, expected, rtol=0, atol=SCORE_ATOL)


@pytest.mark.parametrize("key", ["A_scores", "A_scores_evalpath", "A_scores_pairwise"])
def test_scores_batch_a(parity: Parity, key: str):
    with torch.no_grad():
        images, text = parity.encode("A")
        scores = parity.model.scorer(images, text.words, text.mask)
    torch.testing.assert_close(scores, parity.outputs[key], rtol=0, atol=SCORE_ATOL)


def test_scores_batch_b_padded_and_trimmed(parity: Parity):
    with torch.no_grad():
        for pad in (True, False):
            images, text = parity.encode("B", pad=pad)
            scores = parity.model.scorer(images, text.words, text.mask)
            torch.testing.assert_close(scores, parity.outputs["B_scores"], rtol=0, atol=SCORE_ATOL)


def test_traced_intermediates(parity: Parity):
    trace_file = _load(parity.variant, "trace_A.pt")
    unknown = sorted(set(trace_file) - set(TRACE_FIELDS))
    assert not unknown, f"trace names without a counterpart in ScoreTrace: {unknown}"
    with torch.no_grad():
        images, text = parity.encode("A")
        trace = parity.model.scorer.forward_with_trace(images, text.words, text.mask)
    for name, expected in trace_file.items():
        ours = TRACE_FIELDS[name](trace)
        assert ours.shape == expected.shape, name
        torch.testing.assert_close(ours, expected, rtol=0, atol=SCORE_ATOL, msg=name)


def test_losses(parity: Parity):
    with torch.no_grad():
        images, text = parity.encode("B")
        scores = parity.model.scorer(images, text.words, text.mask)
    for loss_fn, key in (
        (bce_hardest_negative_loss, "B_loss_bce_hardest"),
        (bce_mean_loss, "B_loss_bce_mean"),
    ):
        torch.testing.assert_close(loss_fn(scores), parity.outputs[key], rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "trimmed"])
def test_gradients_of_every_parameter(parity: Parity, pad: bool):
    model = parity.checkpoint.build_model().train()
    model.zero_grad()
    images, text = parity.encode("B", pad=pad, model=model)
    bce_hardest_negative_loss(model.scorer(images, text.words, text.mask)).backward()
    reference = _load(parity.variant, "grads_B.pt")
    params = dict(model.named_parameters())
    checked = set()
    for key, expected in reference.items():
        part, official = key.split("/", 1)
        module, _, param = official.removeprefix("module.").rpartition(".")
        name = f"{dict(OFFICIAL_PARTS)[part][module]}.{param}"
        torch.testing.assert_close(
            params[name].grad, expected, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name
        )
        checked.add(name)
    assert checked == set(params), (
        f"parameters without a reference gradient: {set(params) - checked}"
    )


def test_precompute_split_reproduces_official_scores(parity: Parity):
    scorer = PrecomputedScorer(parity.model.scorer)
    with torch.no_grad():
        images, text = parity.encode("A", pad=False)
        scores = scorer.score_grid(
            scorer.precompute_images(images), scorer.precompute_captions(text)
        )
    torch.testing.assert_close(scores, parity.outputs["A_scores"], rtol=0, atol=SCORE_ATOL)
