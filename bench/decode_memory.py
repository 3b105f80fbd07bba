"""Peak memory of the API while many large photos are searched at once: the decode budget
(CAMPSEARCH_DECODE_MEMORY_MIB) off against on, in one run.

For each setting a fresh `camp-search serve` (shipped default model, empty data dir, its own
process so that its resident memory is its own) gets `--clients` concurrent searches by photo
(POST /v1/search/captions), each a different `--megapixels` JPEG; the server's RSS is sampled
from /proc every 10 ms. Printed and written as JSON: the peak RSS above the idle server, the
wall time for all searches, and the ratios on/off.

    python bench/decode_memory.py --json bench/results/decode_memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MEBIBYTE = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def large_photos(count: int, megapixels: float) -> list[bytes]:
    """`count` different smooth-gradient JPEGs of about `megapixels` (small files, many
    pixels: what a phone camera sends)."""
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    photos = []
    for _ in range(count):
        r, g, b = rng.uniform(0, 255, size=3)
        pixels = np.stack(
            [(r * x + (255 - r) * y), (g * y + (255 - g) * x), np.full_like(x * y, b)], axis=-1
        ).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "JPEG", quality=85)
        photos.append(buffer.getvalue())
    return photos


class Server:
    """`camp-search serve` with a fresh data dir and the given decode budget."""

    def __init__(self, workdir: Path, decode_mib: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPSEARCH_")}
        env.update(
            CAMPSEARCH_DATA_DIR=str(workdir / "data"),
            CAMPSEARCH_DECODE_MEMORY_MIB=str(decode_mib),
            CAMPSEARCH_REQUEST_TIMEOUT_S="300",
            HF_HUB_OFFLINE="1",
        )
        command = [str(Path(sys.executable).parent / "camp-search"), "serve", "--port"]
        self.log = (workdir / "api.log").open("wb")
        self.process = subprocess.Popen(
            [*command, str(self.port), "--log-level", "warning"],
            env=env,
            cwd=workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; see {workdir / 'api.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def run(decode_mib: int, photos: list[bytes]) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    server = Server(workdir, decode_mib)
    try:
        pid = server.process.pid
        idle = rss_bytes(pid)
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def search(photo: bytes) -> int:
            answer = httpx.post(
                f"{server.url}/v1/search/captions",
                files={"file": ("photo.jpg", photo, "image/jpeg")},
                data={"limit": "5"},
                timeout=600,
            )
            return answer.status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(photos)) as pool:
            statuses = list(pool.map(search, photos))
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        if any(status != 200 for status in statuses):
            raise RuntimeError(f"searches failed: {statuses}")
        return {
            "decode_memory_mib": decode_mib,
            "idle_rss_mib": idle / MEBIBYTE,
            "peak_rss_mib": peak / MEBIBYTE,
            "peak_above_idle_mib": (peak - idle) / MEBIBYTE,
            "seconds": seconds,
        }
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--megapixels", type=float, default=20.0)
    parser.add_argument("--budget-mib", type=int, default=512, help="the 'on' setting")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    photos = large_photos(args.clients, args.megapixels)
    print(
        f"{args.clients} concurrent searches by photo, {args.megapixels:g} MP each "
        f"({sum(map(len, photos)) / len(photos) / MEBIBYTE:.1f} MiB JPEG on average)"
    )
    off = run(0, photos)
    on = run(args.budget_mib, photos)
    for result in (off, on):
        print(
            f"  decode budget {result['decode_memory_mib']:>4} MiB: peak RSS "
            f"{result['peak_rss_mib']:7.0f} MiB ({result['peak_above_idle_mib']:6.0f} above idle), "
            f"{result['seconds']:5.1f} s for all"
        )
    ratios = {
        "peak_above_idle_on_over_off": on["peak_above_idle_mib"] / off["peak_above_idle_mib"],
        "seconds_on_over_off": on["seconds"] / off["seconds"],
    }
    print(
        f"  on/off: peak above idle x{ratios['peak_above_idle_on_over_off']:.2f}, "
        f"time x{ratios['seconds_on_over_off']:.2f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "clients": args.clients,
            "megapixels": args.megapixels,
            "off": off,
            "on": on,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
