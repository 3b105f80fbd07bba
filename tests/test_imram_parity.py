"""Reproduce the official IMRAM outputs (../shared/parity/imram) through the official-checkpoint
import: encoders, the scores of the three modes, every traced step intermediate, the
training-mode scores, the loss and every parameter gradient.

Sizes and batches are read from the files. Tolerances (the parity README): the official code
runs in float32 and casts the step similarities to float64, and its own float32 output differs
from a float64 run by up to 1.5e-7 (embeddings), 3.6e-7 (scores) and 2e-4 (gradients, 6.2e-5 of
a tensor's largest entry; imram_float32_vs_float64.json). So: embeddings, step similarities,
scores and losses atol 1e-5; gradients |g - g_ref| <= 1e-3·max|g_ref| + 1e-6 per tensor. Trace
tensors atol 1e-5, except the normalised attention of Text-IMRAM and its softmax: that norm
runs over the caption's words, where a region whose products with every word are small has a
small norm, so float32 rounding of the products is amplified (seen up to 1.3e-5) and λ = 9
carries it into the softmax; those two get 1e-4, still far below what a change of the math
moves (normalising over the regions instead moves them by more than 0.1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from shared_paths import PARITY_DIR

from model.architecture.imram import ImramModel, ImramOptions, ImramStepTrace
from model.checkpoints.checkpoint import (
    IMRAM_MAX_WORDS,
    CheckpointError,
    import_official_checkpoint,
    load_checkpoint,
)
from model.training.losses import vse_hinge_loss

IMRAM_DIR = PARITY_DIR / "imram"
VARIANTS = ("dense", "official")
# official mode name -> ours
MODES = {"full": "full", "text": "text", "image": "image"}
ATOL = 1e-5
NOISY_TRACE_ATOL = 1e-4
GRAD_RTOL_OF_MAX, GRAD_ATOL = 1e-3, 1e-6
# official trace name -> our ImramStepTrace field
TRACE_FIELDS = {
    "query": "query",
    "attn_norm": "attention_norm",
    "attn_softmax": "attention",
    "context": "context",
    "gate": "gate",
    "cand": "candidate",
    "new_query": "new_query",
    "cos": "cosine",
}
NOISY_TRACES = {("text", "attn_norm"), ("text", "attn_softmax")}


def _load(variant: str, what: str):
    path = IMRAM_DIR / f"imram_{variant}_{what}"
    if not path.is_file():
        pytest.fail(f"parity file {path} is missing (set PARITY_DIR to a complete folder)")
    return torch.load(path) if path.suffix == ".pt" else json.loads(path.read_text())


class Parity:
    """One variant's files and the model imported from its official checkpoint."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.inputs = _load(variant, "inputs.pt")
        self.outputs = _load(variant, "outputs.pt")
        self.check = _load(variant, "check.json")
        self.checkpoint = import_official_checkpoint(
            IMRAM_DIR / f"imram_{variant}_checkpoint.pth.tar"
        )

    def model(self, mode: str = "full", **changes) -> ImramModel:
        options = ImramOptions.from_dict(self.checkpoint.scorer_options | changes | {"mode": mode})
        model = ImramModel.from_config(self.checkpoint.config, options)
        model.load_state_dict(self.checkpoint.state_dict)
        return model.eval()

    def batch(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.inputs[f"{name}_{key}"] for key in ("images", "captions", "lengths"))


@pytest.fixture(scope="module", params=VARIANTS)
def parity(request) -> Parity:
    return Parity(request.param)


def _close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=0, msg=what)


def test_the_import_records_the_scorer_and_the_options_of_the_run(parity):
    checkpoint = parity.checkpoint
    assert checkpoint.scorer == "imram"
    assert checkpoint.config.max_words == IMRAM_MAX_WORDS  # the official code cuts no caption
    assert checkpoint.scorer_options == {
        "iteration_steps": 3,
        "lambda_softmax": 9.0,
        "mode": "full",
        "memory_norm": False,
    }
    config = _load(parity.variant, "config.json")["opt"]
    assert (checkpoint.config.vocab_size, checkpoint.config.word_dim) == (
        config["vocab_size"],
        config["word_dim"],
    )
    assert (checkpoint.config.embed_size, checkpoint.config.img_dim) == (
        config["embed_size"],
        config["img_dim"],
    )
    # Every official tensor arrived: the official state dict has exactly as many values.
    official = _load(parity.variant, "state_dict.pt")
    assert sum(t.numel() for t in checkpoint.state_dict.values()) == sum(
        t.numel() for t in official.values()
    )


@pytest.mark.parametrize("batch", ["A", "B"])
def test_encoders_match(parity, batch):
    model = parity.model()
    images, captions, lengths = parity.batch(batch)
    with torch.no_grad():
        regions = model.encode_images(images)
        text = model.encode_text(captions, lengths)
    _close(regions, parity.outputs[f"{batch}_img_emb"], ATOL, f"{batch}_img_emb")
    _close(text.words, parity.outputs[f"{batch}_cap_emb"], ATOL, f"{batch}_cap_emb")


@pytest.mark.parametrize("mode", MODES)
def test_eval_scores_of_every_mode_match_in_float64(parity, mode):
    model = parity.model(MODES[mode])
    with torch.no_grad():
        scores = model(*parity.batch("A"))
    assert scores.dtype == torch.float64
    _close(scores, parity.outputs[f"A_scores_{mode}"], ATOL, f"A_scores_{mode}")
    _close(scores, parity.outputs[f"A_scores_{mode}_evalpath"], ATOL, f"evalpath {mode}")


@pytest.mark.parametrize("memory_norm", [False, True], ids=["no_IMRAM_norm", "IMRAM_norm"])
def test_step_similarities_match_with_and_without_the_memory_norm(parity, memory_norm):
    model = parity.model("full", memory_norm=memory_norm)
    images, captions, lengths = parity.batch("A")
    suffix = "_IMRAMnorm" if memory_norm else ""
    with torch.no_grad():
        trace = model.forward_with_trace(images, captions, lengths)
        scores = model(images, captions, lengths)  # the inference path, no trace
    total = 0
    for direction in ("text", "image"):
        steps = trace.directions[direction].step_similarity.transpose(1, 2)  # [K, Ni, Nc]
        want = parity.outputs[f"A_step_sims_{direction}{suffix}"]
        assert steps.dtype == torch.float64
        _close(steps, want, ATOL, f"A_step_sims_{direction}{suffix}")
        total = total + want.sum(0)
    _close(scores, total, ATOL, f"inference-path scores{suffix}")


def test_every_traced_intermediate_of_every_step_matches(parity):
    model = parity.model("full")
    official = _load(parity.variant, "trace_A.pt")
    with torch.no_grad():
        trace = model.forward_with_trace(*parity.batch("A"))
    for direction in ("text", "image"):
        ours: ImramStepTrace = trace.directions[direction]
        for name, field in TRACE_FIELDS.items():
            atol = NOISY_TRACE_ATOL if (direction, name) in NOISY_TRACES else ATOL
            _close(
                getattr(ours, field), official[f"{direction}_{name}"], atol, f"{direction}_{name}"
            )
        _close(
            ours.step_similarity.transpose(1, 2),
            official[f"{direction}_step_sims"],  # [K, Ni, Nc]
            ATOL,
            f"{direction}_step_sims",
        )
    # full = Σ_k text + Σ_k image, in float64
    total = sum(trace.directions[d].step_similarity.sum(0) for d in ("text", "image"))
    _close(trace.scores, total.t(), 1e-12, "the sum of the step similarities")


def test_each_pair_scored_alone_equals_the_batch(parity):
    """Padding to the longest caption of a batch is masked exactly."""
    model = parity.model("full")
    images, captions, lengths = parity.batch("A")
    with torch.no_grad():
        batch = model(images, captions, lengths)
        for caption in range(captions.shape[0]):
            length = int(lengths[caption])
            alone = model(
                images, captions[caption : caption + 1, :length], lengths[caption : caption + 1]
            )
            _close(alone[:, 0], batch[:, caption], 1e-6, f"caption {caption} alone")


@pytest.mark.parametrize("mode", MODES)
def test_training_scores_loss_and_every_gradient_match(parity, mode):
    model = parity.model(MODES[mode]).train()
    grads = _load(parity.variant, "grads_B.pt")
    scores = model(*parity.batch("B"))
    # The official training mode returns [n_cap, n_img]; ours is always [n_img, n_cap].
    _close(scores.t(), parity.outputs[f"B_scores_{mode}_trainmode"], ATOL, f"train {mode}")
    loss = vse_hinge_loss(scores, margin=0.2, max_violation=True)
    _close(loss, parity.outputs[f"B_loss_hardest_{mode}"], ATOL, f"loss {mode}")
    summed = vse_hinge_loss(scores.detach(), margin=0.2, max_violation=False)
    _close(summed, parity.outputs[f"B_loss_sum_{mode}"], ATOL, f"summed loss {mode}")
    loss.backward()
    ours = {name: p.grad for name, p in model.named_parameters()}
    official = _official_names(parity.checkpoint.state_dict, _load(parity.variant, "state_dict.pt"))
    unused = 0
    for our_name, official_name in official.items():
        want = grads[f"{mode}/{official_name}"]
        got = ours[our_name]
        if got is None:  # the other direction's memory layers: no gradient, zeros stored
            assert not want.any(), f"{our_name} has no gradient but the official one is not zero"
            unused += 1
            continue
        bound = GRAD_RTOL_OF_MAX * want.abs().max().item() + GRAD_ATOL
        error = (got - want).abs().max().item()
        assert error <= bound, f"{mode} grad {our_name}: {error:.3g} > {bound:.3g}"
    assert unused == (0 if mode == "full" else 4)


def _official_names(ours: dict, official: dict) -> dict[str, str]:
    """Our parameter name -> the official key, paired by the import's own mapping."""
    from model.checkpoints.checkpoint import OFFICIAL_IMRAM_MODULES

    pairs = {}
    for key in official:
        module, _, param = key.removeprefix("module.").rpartition(".")
        pairs[f"{OFFICIAL_IMRAM_MODULES[module]}.{param}"] = key
    assert set(pairs) == set(ours)
    return pairs


def test_the_memory_norm_option_matters_here():
    """Switching the query l2norm after each update (`no_IMRAM_norm` off) moves the scores far
    beyond the tolerance, so the tests above would catch the option being read wrongly."""
    parity = Parity("dense")
    images, captions, lengths = parity.batch("A")
    want = parity.outputs["A_scores_full"]
    with torch.no_grad():
        normed = parity.model("full", memory_norm=True)(images, captions, lengths)
    assert (normed - want).abs().max() > 100 * ATOL


# -- the checkpoint file ---------------------------------------------------------------------
def _namespace_checkpoint(tmp_path: Path, variant: str = "dense", **opt_changes) -> Path:
    """The official layout as `train_gpus.save_checkpoint` writes it: `opt` an argparse
    Namespace (the parity file holds a plain dict)."""
    payload = torch.load(IMRAM_DIR / f"imram_{variant}_checkpoint.pth.tar")
    opt = argparse.Namespace(**(payload["opt"] | opt_changes))
    path = tmp_path / "model_best.pth.tar"
    torch.save({**payload, "opt": opt}, path)
    return path


def test_a_namespace_opt_loads_safely_and_round_trips_through_our_format(tmp_path):
    checkpoint = import_official_checkpoint(_namespace_checkpoint(tmp_path))
    saved = load_checkpoint(checkpoint.save(tmp_path / "imram.pt"))
    assert saved.scorer == "imram" and saved.scorer_options == checkpoint.scorer_options
    model = saved.build_model()
    assert isinstance(model, ImramModel)
    outputs = _load("dense", "outputs.pt")
    inputs = _load("dense", "inputs.pt")
    with torch.no_grad():
        scores = model(inputs["A_images"], inputs["A_captions"], inputs["A_lengths"])
    _close(scores, outputs["A_scores_full"], ATOL, "scores after the round trip")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"raw_feature_norm": "softmax"}, "does not reproduce"),
        ({"no_txtnorm": True}, "does not reproduce"),
        ({"model_mode": "vse"}, "model_mode"),
        ({"embed_size": 64}, "disagrees with the weights"),
    ],
)
def test_options_that_change_the_math_are_refused(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        import_official_checkpoint(_namespace_checkpoint(tmp_path, **changes))


def test_camp_checkpoints_without_a_scorer_record_still_read_as_camp(tmp_path):
    camp = import_official_checkpoint(PARITY_DIR / "camp_tiny_checkpoint.pth.tar")
    path = camp.save(tmp_path / "camp.pt")
    raw = torch.load(path, weights_only=True)
    del raw["scorer"]
    torch.save(raw, path)
    loaded = load_checkpoint(path)
    assert loaded.scorer == "camp" and loaded.scorer_options == {}
    assert type(loaded.build_model()).__name__ == "CampModel"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("extra", "unexpected keys"),
        ("missing", "missing keys"),
        ("misshapen", "mismatched shapes"),
        ("no_mode", "model_mode"),
    ],
)
def test_a_damaged_imram_checkpoint_is_refused_naming_what_is_wrong(tmp_path, damage, message):
    payload = torch.load(IMRAM_DIR / "imram_dense_checkpoint.pth.tar")
    state, opt = dict(payload["model"]), dict(payload["opt"])
    if damage == "extra":
        state["module.fc_global.weight"] = torch.zeros(32, 64)
    elif damage == "missing":
        del state["module.gate_i2t.bias"]
    elif damage == "misshapen":
        state["module.gate_t2i.weight"] = torch.zeros(32, 65)
    else:
        del opt["model_mode"]
    path = tmp_path / "damaged.pth.tar"
    torch.save({**payload, "model": state, "opt": opt}, path)
    with pytest.raises(CheckpointError, match=message):
        import_official_checkpoint(path)
