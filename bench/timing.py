"""What the speed benches share: the GEMM peak a floor divides by, interleaved timing (load from
other jobs on a shared machine then hits every way alike), and code of an older commit imported
beside the current one, so "before" and "after" run in one process."""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GEMM_SIZE = 2048


def gemm_peak(threads: int, repeats: int = 9) -> float:
    """Median GFLOP/s of GEMM_SIZE³ fp32 matmuls on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    out = torch.empty(GEMM_SIZE, GEMM_SIZE)
    torch.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        rates.append(2 * GEMM_SIZE**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def interleaved(
    ways: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """(seconds of every run, the last result) of each way, runs interleaved after one warm-up
    each."""
    results = {name: fn() for name, fn in ways.items()}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


def module_at(ref: str, path: str, name: str) -> ModuleType:
    """The module at `path` as it was at git `ref`, imported as `name` (its temporary file is
    removed once it is loaded)."""
    source = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="bench_") as folder:
        file = Path(folder) / f"{name}.py"
        file.write_text(source)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module
