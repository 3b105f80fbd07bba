"""Helpers for the service tests: a small real model, a real extractor, real servers.

The API tests run the real stack (FastAPI app, pipeline, micro-batcher, corpus on disk, grid
extractor with its ImageNet weights) around a small `RetrievalModel` with random weights, so
they take seconds; tests/test_e2e_service.py uses the shipped default model.
"""

from __future__ import annotations

import copy
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from model.architecture.network import NetworkSpec, RetrievalNetwork
from model.retrieval import RetrievalModel
from model.text.vocab import Vocabulary
from model.vision.extractors.grid import GridExtractor
from service.runtime.settings import Settings

READY_TIMEOUT_S = 60.0
SMALL_INPUT_SIZE = 64  # 2 x 2 grid regions: the real extractor, 12x fewer pixels than 224
TEST_API_KEY = "test-key-0123456789abcdef"


def tiny_model(words: list[str]) -> RetrievalModel:
    """A real `RetrievalModel` (GRU text side) with seeded random weights."""
    torch.manual_seed(0)
    vocabulary = Vocabulary.build(words, min_count=1)
    spec = NetworkSpec(
        text_encoder="gru", embed_size=32, pooled_dim=16, pooled_hidden=32, word_dim=16
    )
    network = RetrievalNetwork(spec, vocabulary=vocabulary)
    return RetrievalModel(
        network,
        version="tiny-test",
        extractor_name="grid",
        extractor_config={"fit": "squash"},
        device=torch.device("cpu"),
    )


def retrained(model: RetrievalModel, version: str | None = None) -> RetrievalModel:
    """The same model version with other weights (a retrained checkpoint kept its name): a new
    tensor version, what a model change looks like to the stored rerank tensors. With
    `version`, a new model version too: its pooled vectors are keyed apart (an upgrade)."""
    network = copy.deepcopy(model.network)
    with torch.no_grad():
        for parameter in network.camp.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return RetrievalModel(
        network,
        version=model.version if version is None else version,
        extractor_name=model.extractor_name,
        extractor_config=model.extractor_config,
        device=model.device,
    )


def save_small_checkpoint(model: RetrievalModel, path: Path) -> Path:
    """`model` as a checkpoint file that records the small grid extractor, for real
    `camp-search serve` processes that start in seconds (CAMPSEARCH_CHECKPOINT)."""
    record = {"name": "grid", "config": {"fit": "squash", "input_size": SMALL_INPUT_SIZE}}
    metadata = {"version": model.version, "extractor": {**record, "version": ""}}
    return model.network.to_checkpoint(metadata).save(path)


def small_extractor() -> GridExtractor:
    return GridExtractor(input_size=SMALL_INPUT_SIZE, device="cpu")


def readyz_component(client: TestClient, name: str) -> dict:
    """One component of /readyz (e.g. "region_features", "pooled_vectors")."""
    ready = client.get("/readyz").json()
    return next(c for c in ready["components"] if c["name"] == name)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, _env_file=None, **overrides)  # type: ignore[call-arg]


def png_bytes(color: tuple[int, int, int] | str, size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def coco_photos(shared_dir: Path, count: int) -> list[tuple[Path, list[str]]]:
    """The first `count` photos of coco-mini with their captions."""
    manifest = shared_dir / "data" / "coco-mini" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [(manifest.parent / row["image"], row["captions"]) for row in rows[:count]]


def upload_coco_photos(
    client: TestClient, shared_dir: Path, count: int, captions_each: int
) -> list[int]:
    """POST the first `count` coco-mini photos, each with its first `captions_each` captions;
    their ids, in order."""
    ids = []
    for path, captions in coco_photos(shared_dir, count):
        response = client.post(
            "/v1/images",
            files={"file": (path.name, path.read_bytes())},
            data={"captions": captions[:captions_each]},
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


@contextmanager
def running_client(app: FastAPI) -> Iterator[TestClient]:
    """A TestClient whose app finished loading (or failed to)."""
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_loaded(app)
        yield client


def wait_until_loaded(app: FastAPI, timeout_s: float = READY_TIMEOUT_S) -> None:
    state = app.state.service
    deadline = time.monotonic() + timeout_s
    while state.phase == "starting":
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not finish loading")
        time.sleep(0.02)


class ServerThread:
    """uvicorn serving `app` on a free port in a background thread (real HTTP, real sockets)."""

    def __init__(self, app: FastAPI, port: int, **options: object) -> None:
        """`options` go to `uvicorn.Config` (e.g. `forwarded_allow_ips`)."""
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            **options,  # type: ignore[arg-type]
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not become ready")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        if self.thread.is_alive():
            raise RuntimeError("the server did not stop")
