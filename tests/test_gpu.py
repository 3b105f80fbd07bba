"""The GPU paths against the CPU: reranker (fp32, bf16, fp16, one host sync per call), grid
extractor, a whole search through the app, a training step. Marked `gpu`: they skip without
CUDA and run in bench/gpu_check.sh on a GPU host. Each compares the device's results with the
CPU's on the same real inputs; the CPU halves run in CI (tests/test_precision.py,
tests/test_training.py, tests/test_rerank.py).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import warnings

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from redis_server import RedisServer, free_port
from rerank_support import (
    BF16_MAX_SCORE_DIFF,
    BF16_ORDER_TOLERANCE,
    coco_shortlists,
    max_abs_diff,
    order_violations,
    rerank,
    rerank_jobs,
)
from service_support import ServerThread, coco_photos, make_settings
from training_support import loss_and_grads, official_batch

from model.retrieval import RetrievalModel
from model.training.official import batch_logits
from model.vision.extractors.grid import GridExtractor
from service.api.app import create_app
from service.cli.bulk_ingest import HttpTarget, ingest, read_source
from service.search.rerank import PairReranker, RerankJob

pytestmark = pytest.mark.gpu

# fp32 on the GPU against the CPU: the same math summed in another order (scores span ~-5..25).
FP32_MAX_SCORE_DIFF = 5e-3
APP_PHOTOS = 24
TOP_K = 5


@pytest.fixture(scope="module")
def shortlists(shared_dir):
    return coco_shortlists(shared_dir)


@pytest.fixture(scope="module")
def cpu_fp32_scores(shortlists):
    return rerank(RetrievalModel.load(device="cpu"), shortlists)


@pytest.fixture
def exact_fp32_on_cuda():
    """No TF32 in matmuls and convolutions while a test compares fp32 with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_reranker_on_the_gpu_in_fp32_equals_the_cpu(
    shortlists, cpu_fp32_scores, exact_fp32_on_cuda
) -> None:
    model = RetrievalModel.load(device="cuda")
    assert model.network.fusion.camp_weight.device.type == "cuda"
    scores = rerank(model, shortlists)
    assert max_abs_diff(cpu_fp32_scores, scores) < FP32_MAX_SCORE_DIFF


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reranker_on_the_gpu_in_half_precision_keeps_the_cpu_fp32_ranking(
    shortlists, cpu_fp32_scores, precision
) -> None:
    model = RetrievalModel.load(device="cuda", precision=precision)
    scores = rerank(model, shortlists)
    assert max_abs_diff(cpu_fp32_scores, scores) < BF16_MAX_SCORE_DIFF
    assert order_violations(cpu_fp32_scores, scores, BF16_ORDER_TOLERANCE) == []


def test_the_reranker_synchronises_once_per_model_call_on_the_gpu(shortlists) -> None:
    """CUDA's sync debug mode flags every host synchronisation: 40 queries' jobs in one model
    call synchronise once, when the scores come back."""
    model = RetrievalModel.load(device="cuda", precision="bf16")
    jobs = rerank_jobs(model, shortlists)
    reranker = PairReranker(model, memory_budget_bytes=2**40)  # one call for all the jobs
    reranker(jobs)  # warm-up: kernels loaded, pinned blocks cached
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            reranker(jobs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


def test_mixed_region_counts_share_one_call_and_one_sync_on_the_gpu(
    shortlists, exact_fp32_on_cuda
) -> None:
    """Candidates cut to 5..49 regions (as a detector's boxes vary) are padded on the device in
    one call: CUDA's sync debug mode sees one synchronisation, and the scores are the CPU's."""
    counts = [5 + (11 * row) % 45 for row in range(len(shortlists.regions))]

    def jobs_on(model: RetrievalModel) -> list[RerankJob]:
        images = tuple(
            model.precompute_images(shortlists.regions[row : row + 1, :count])
            for row, count in enumerate(counts)
        )
        queries = model.encode_texts(shortlists.first_captions).precompute
        shortlist = np.linspace(0.0, 0.2, len(images), dtype=np.float32)
        return [
            RerankJob(images=images, captions=(queries.select([q]),), shortlist_scores=shortlist)
            for q in range(len(queries))
        ]

    on_cpu = PairReranker(RetrievalModel.load(device="cpu"), memory_budget_bytes=2**40)(
        jobs_on(RetrievalModel.load(device="cpu"))
    )
    model = RetrievalModel.load(device="cuda")
    jobs = jobs_on(model)
    reranker = PairReranker(model, memory_budget_bytes=2**40)
    reranker(jobs)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            on_gpu = reranker(jobs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert max_abs_diff(on_cpu, on_gpu) < FP32_MAX_SCORE_DIFF


def test_grid_extractor_on_the_gpu_equals_the_cpu(shared_dir, exact_fp32_on_cuda) -> None:
    images = [Image.open(path).convert("RGB") for path, _ in coco_photos(shared_dir, 6)]
    on_cpu = GridExtractor(device="cpu").extract(images)
    on_gpu = GridExtractor(device="cuda").extract(images)
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert gpu.features.shape == cpu.features.shape == (49, 1280)
        np.testing.assert_allclose(gpu.features, cpu.features, rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(gpu.boxes, cpu.boxes)
    assert max(float(np.abs(f.features).max()) for f in on_cpu) > 1.0


def test_a_whole_search_through_the_app_on_the_gpu(shared_dir, tmp_path) -> None:
    """CAMPSEARCH_DEVICE=cuda with bf16 reranking: ingest real photos over HTTP, then search
    by a held-out caption and by an uploaded photo; the photo's own entries come first."""
    manifest = shared_dir / "data" / "coco-mini" / "manifest.jsonl"
    redis = RedisServer(tmp_path / "redis").start()
    settings = make_settings(
        tmp_path / "data",
        redis_url=redis.url,
        port=free_port(),
        device="cuda",
        rerank_precision="bf16",
    )
    server = ServerThread(create_app(settings), settings.port).start(timeout_s=300)
    try:
        client = httpx.Client(base_url=server.url, timeout=120)
        items = read_source(manifest, max_captions=4)[:APP_PHOTOS]

        async def ingest_all():
            target = await HttpTarget(server.url).open()
            try:
                return await ingest(items, target, jobs=2)
            finally:
                await target.close()

        report = asyncio.run(ingest_all())
        assert (report.added, report.refused) == (APP_PHOTOS, [])
        info = client.get("/v1/info").json()
        assert info["device"].startswith("cuda")
        assert info["corpus"] == {"images": APP_PHOTOS, "captions": 4 * APP_PHOTOS}
        rows = [json.loads(line) for line in manifest.read_text().splitlines()][:APP_PHOTOS]
        text_hits = photo_hits = 0
        for row in rows:
            data = (manifest.parent / row["image"]).read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            image_id = client.get("/v1/images", params={"sha256": sha}).json()["data"][0]["id"]
            found = client.post(
                "/v1/search/images", json={"text": row["captions"][4], "limit": TOP_K}
            )
            assert found.status_code == 200, found.text
            text_hits += image_id in [hit["id"] for hit in found.json()["results"]]
            upload = client.post(
                "/v1/search/captions", files={"file": ("q.jpg", data)}, data={"limit": "4"}
            )
            assert upload.status_code == 200, upload.text
            photo_hits += upload.json()["results"][0]["image_id"] == image_id
        assert text_hits > APP_PHOTOS // 2, text_hits
        assert photo_hits > APP_PHOTOS // 2, photo_hits
        client.close()
    finally:
        server.stop()
        redis.kill()


def test_a_training_step_on_the_gpu_matches_the_cpu(exact_fp32_on_cuda) -> None:
    """The official recipe's chunked B x B step: fp32 loss and gradients equal the CPU's; the
    bf16 autocast the recipe uses on CUDA keeps the loss and the gradient's direction."""
    network, regions, ids, lengths = official_batch(16)
    gpu_network = copy.deepcopy(network).cuda()

    def scores(net, device, autocast=False):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = batch_logits(net.camp, regions.to(device), ids.to(device), lengths, 64)
            return torch.sigmoid(logits.float())

        return run

    cpu_loss, cpu_grads = loss_and_grads(network, scores(network, "cpu"))
    gpu_loss, gpu_grads = loss_and_grads(gpu_network, scores(gpu_network, "cuda"))
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-4)
    assert gpu_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name].cpu(), grad, rtol=1e-3, atol=1e-4, msg=name)

    bf16_loss, bf16_grads = loss_and_grads(gpu_network, scores(gpu_network, "cuda", True))
    torch.testing.assert_close(bf16_loss.cpu(), cpu_loss, rtol=1e-2, atol=1e-2)
    flat_cpu = torch.cat([g.flatten() for g in cpu_grads.values()])
    flat_bf16 = torch.cat([bf16_grads[n].cpu().flatten() for n in cpu_grads])
    assert torch.nn.functional.cosine_similarity(flat_cpu, flat_bf16, dim=0) > 0.99
