#!/usr/bin/env bash
# One command for the day a GPU is lent: every `gpu`-marked test, then the GPU benchmarks
# (reranker pairs/s and latency at 1/8/32/128 concurrent queries x K=100 in fp32 and bf16 on
# the GPU and the CPU, a camp_official training step's peak memory, FAISS on the GPU against
# the CPU at 1M vectors), merged into one JSON: ${OUT:-bench/results}/gpu_check.json.
#
#   bash bench/gpu_check.sh            # from anywhere; at most GPU_CHECK_BUDGET_S (480 s)
#
# Python: $GPU_PYTHON, else .venv-gpu or .venv if their torch sees CUDA, else a new .venv-gpu
# (`make setup`, with the system's torch when it has CUDA, else TORCH_SPEC from
# TORCH_INDEX_URL). Never needed for CI: without CUDA the gpu tests skip and this script stops.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
DEADLINE=$((SECONDS + BUDGET_S))
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
export SHARED_DIR="${SHARED_DIR:-$(cd .. && pwd)/shared}"
[ -d "$SHARED_DIR" ] || SHARED_DIR="$PWD/shared"  # a checkout that carries shared/ inside

log() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*" >&2; }
left() { echo $((DEADLINE - SECONDS)); }

has_cuda_torch() {  # the interpreter imports torch and the project, and torch sees CUDA
  [ -x "$1" ] && "$1" -c 'import sys, torch, model, service
sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

pick_python() {
  local candidate
  for candidate in "${GPU_PYTHON:-}" .venv-gpu/bin/python .venv/bin/python; do
    if [ -n "$candidate" ] && has_cuda_torch "$candidate"; then
      echo "$candidate"
      return 0
    fi
  done
  log "no Python with CUDA torch and the project: making .venv-gpu"
  if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    python3 -m venv --system-site-packages .venv-gpu >&2  # the system's CUDA torch
    timeout "$(left)" make setup VENV=.venv-gpu >&2
  else
    PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL" timeout "$(left)" \
      make setup VENV=.venv-gpu TORCH_SPEC="$TORCH_SPEC" >&2
  fi
  echo .venv-gpu/bin/python
}

# GPU_CHECK_CPU_DRY_RUN=1: the same steps on a CPU at small sizes (gpu tests skip), to check
# this script itself where no GPU is lent; its JSON says "dry_run": true.
DRY_RUN="${GPU_CHECK_CPU_DRY_RUN:-0}"
RERANKER_ARGS=(--devices cuda cpu --seconds 2 --train-batches 128 256)
FAISS_VECTORS=1000000
if [ "$DRY_RUN" = 1 ]; then
  PY="${GPU_PYTHON:-.venv/bin/python}"
  RERANKER_ARGS=(--devices cpu --concurrency 1 8 --k 20 --photos 8 --seconds 1 --train-batches 4)
  FAISS_VECTORS=20000
  log "CPU dry run with $PY: small sizes, gpu tests skip"
else
  PY="$(pick_python)"
fi
if [ "$DRY_RUN" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$PY" -c 'import torch; print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device")' >&2 || true
  log "FAILED: no usable CUDA device; nvidia-smi says:"
  nvidia-smi -L >&2 || true
  exit 2
fi
log "python $PY: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')"

declare -A STATUS=()
run_step() {  # name, seconds at most, command...: runs within the budget, records the exit code
  local name="$1" cap="$2"
  shift 2
  local budget
  budget=$(($(left) < cap ? $(left) : cap))
  if [ "$budget" -le 5 ]; then
    log "$name: skipped, the ${BUDGET_S}s budget is spent"
    STATUS[$name]=skipped
    return 0
  fi
  log "$name (at most ${budget}s): $*"
  set +e
  timeout --kill-after=10 "$budget" "$@"
  local rc=$?
  set -e
  STATUS[$name]=$rc
  log "$name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"
}

run_step tests 240 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs \
  --junitxml "$OUT/gpu_tests.xml" tests
run_step reranker_bench 150 "$PY" bench/gpu_bench.py "${RERANKER_ARGS[@]}" \
  --json "$OUT/gpu_bench.json"
run_step faiss_bench 120 "$PY" bench/faiss_gpu.py --vectors "$FAISS_VECTORS" \
  --json "$OUT/faiss_gpu.json"

STATUS_JSON="{"
for name in tests reranker_bench faiss_bench; do
  STATUS_JSON+="\"$name\": \"${STATUS[$name]:-not run}\","
done
STATUS_JSON="${STATUS_JSON%,}}"

"$PY" - "$OUT" "$STATUS_JSON" "$SECONDS" "$DRY_RUN" <<'PYTHON'
"""Merge the junit XML and the bench JSONs into gpu_check.json."""
import json
import platform
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

out, status, seconds = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
dry_run = sys.argv[4] == "1"


def tests(path: Path) -> dict | None:
    if not path.exists():
        return None
    cases = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = child.get("message", "")
                break
        else:
            message = ""
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0)),
                "message": message[:500],
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def bench(name: str) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


result = {
    "host": platform.node(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "dry_run": dry_run,
    "seconds": seconds,
    "steps": status,
    "tests": tests(out / "gpu_tests.xml"),
    "reranker": bench("gpu_bench.json"),
    "faiss": bench("faiss_gpu.json"),
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
counts = (result["tests"] or {}).get("counts")
print(f"gpu_check: steps {status}; tests {counts}; wrote {out / 'gpu_check.json'}")
PYTHON

for name in tests reranker_bench faiss_bench; do
  [ "${STATUS[$name]:-}" = 0 ] || { log "FAILED: $name (${STATUS[$name]:-not run})"; exit 1; }
done
log "all steps passed"
