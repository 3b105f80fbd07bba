"""The shortlist on a device: which parameters apply where, batched == one-by-one search, and
what a write does to the device copy.

The device copy logic runs here against a CPU stand-in backend (`faiss.clone_index` as "copy to
the device", faiss.ParameterSpace for its parameters), so every rule is checked without a GPU;
the `gpu` test at the end runs the same checks on a real FAISS GPU.
"""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np
import pytest
from device_support import CpuStandIn, WatchedStandIn

from index import device as device_module
from index.device import HIDDEN_RECOPY_FRACTION, FaissGpu, faiss_gpu_id
from index.shortlist import (
    FLAT,
    ShortlistIndex,
    device_capable,
    l2_normalised,
    search_parameters,
)

DIM = 32
FACTORIES = [FLAT, "IVF16,Flat", "HNSW16", "IVF16_HNSW8,PQ8x4", "PQ8x4"]


def _clustered(count: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    points = centres[rng.integers(0, clusters, count)] + 0.3 * rng.standard_normal((count, DIM))
    return l2_normalised(points, DIM)


def _filled(factory: str, count: int = 2000, device=None, **options) -> ShortlistIndex:
    index = ShortlistIndex(DIM, factory, nprobe=8, ef_search=64, device=device, **options)
    index.add(np.arange(count), _clustered(count))
    return index


def _same_hits(expected, got, atol: float = 1e-5) -> None:
    """Same scores, and the same ids wherever a score is not tied with a neighbour's."""
    (expected_scores, expected_ids), (got_scores, got_ids) = expected, got
    np.testing.assert_allclose(got_scores, expected_scores, atol=atol)
    gaps = np.abs(np.diff(expected_scores, axis=1))
    clear = np.ones_like(expected_ids, dtype=bool)
    clear[:, 1:] &= gaps > atol
    clear[:, :-1] &= gaps > atol
    np.testing.assert_array_equal(got_ids[clear], expected_ids[clear])


# --- which parameters apply where -----------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "on_cpu", "on_device"),
    [
        (FLAT, {}, {}),
        ("IVF16,Flat", {"nprobe": 8}, {"nprobe": 8}),
        ("HNSW16", {"efSearch": 64}, {}),
        ("IVF16_HNSW8,PQ8x4", {"nprobe": 8, "quantizer_efSearch": 64}, {"nprobe": 8}),
        ("PQ8x4", {}, {}),
    ],
)
def test_parameters_apply_only_where_the_index_has_them(factory, on_cpu, on_device):
    index = _filled(factory)
    assert index.is_trained
    raw = index._index
    assert search_parameters(raw, nprobe=8, ef_search=64) == on_cpu
    assert search_parameters(raw, nprobe=8, ef_search=64, on_device=True) == on_device
    assert {name: _parameter(raw, name) for name in on_cpu} == on_cpu
    index.nprobe, index.ef_search = 12, 20
    expected = {"nprobe": 12, "efSearch": 20, "quantizer_efSearch": 20}
    assert {name: _parameter(raw, name) for name in on_cpu} == {n: expected[n] for n in on_cpu}
    if "quantizer_efSearch" in on_cpu:  # the quantizer's beam is at least the lists it returns
        assert search_parameters(raw, nprobe=100, ef_search=64)["quantizer_efSearch"] == 100


def _parameter(index: faiss.Index, name: str) -> int:
    """What FAISS holds now for `name` in `index` (an IVF, or an id-mapped HNSW)."""
    if name == "efSearch":
        return faiss.downcast_index(index.index).hnsw.efSearch
    ivf = faiss.extract_index_ivf(index)
    if name == "nprobe":
        return ivf.nprobe
    return faiss.downcast_index(ivf.quantizer).hnsw.efSearch


@pytest.mark.parametrize("factory", FACTORIES)
def test_the_device_takes_what_it_can_and_a_small_flat_start_keeps_it(factory):
    backend = CpuStandIn()
    index = ShortlistIndex(DIM, factory, nprobe=8, ef_search=64, device=backend)
    data = _clustered(2000)
    index.add(np.arange(100), data[:100])  # IVF/PQ: still the exact flat buffer
    index.search(data[:2], 5)
    buffered_device = index.device
    index.add(np.arange(100, 2000), data[100:])
    _, found = index.search(data[:3], 5)
    capable = factory in (FLAT, "IVF16,Flat", "IVF16_HNSW8,PQ8x4")
    assert device_capable(index._index) is capable
    assert index.device == ("cuda:5" if capable else "cpu")
    if factory != "HNSW16":  # the buffer is flat and goes to the device until trained
        assert buffered_device == "cuda:5"
    if capable:
        copy = index._replica.index
        assert copy is backend.copies[-1] and copy.ntotal == 2000
        if "IVF" in factory:  # the trained index was copied, and nprobe set on the copy
            assert _parameter(copy, "nprobe") == 8
    if factory in (FLAT, "IVF16,Flat"):
        assert found[:, 0].tolist() == [0, 1, 2]


# --- batched search == one-by-one search --------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("on_device", [False, True])
def test_batched_search_equals_one_by_one(factory, on_device):
    index = _filled(factory, device=CpuStandIn() if on_device else None)
    index.remove(np.arange(0, 2000, 97))  # HNSW: tombstones; device: hidden ids
    jobs = [
        (_clustered(rows, seed=10 + n), k)
        for n, (rows, k) in enumerate([(1, 10), (3, 100), (1, 1), (2, 64), (1, 65), (4, 10)])
    ]
    batched = index.search_batch(jobs)
    for (queries, k), result in zip(jobs, batched, strict=True):
        assert result[0].shape == result[1].shape == (len(queries), k)
        _same_hits(index.search(queries, k), result)
    if factory == "HNSW16":  # k + 21 tombstones past ef_search 64 widens the beam: k 1 and 10
        assert len({index._result_group(k) for _, k in jobs}) == 4  # share, 64, 65, 100 do not


@pytest.mark.parametrize("factory", [FLAT, "IVF16,Flat", "IVF16_HNSW8,PQ8x4"])
def test_device_copy_answers_like_the_cpu_index_through_writes(factory):
    device = _filled(factory, device=CpuStandIn())
    cpu = _filled(factory)
    queries = _clustered(20, seed=4)
    extra = _clustered(300, seed=5)
    for step in range(3):
        ids = np.arange(5000 + 100 * step, 5100 + 100 * step)
        for target in (device, cpu):
            target.add(ids, extra[100 * step : 100 * step + 100])
            target.remove(np.arange(step * 50, step * 50 + 30))
        _same_hits(cpu.search(queries, 50), device.search(queries, 50))
    assert device.device_stats.full_copies <= 2  # the first copy, one after hidden ids pile up


# --- what a write does to the copy ----------------------------------------------------------


@pytest.mark.parametrize("factory", [FLAT, "IVF16,Flat"])
def test_an_add_grows_the_same_copy_by_exactly_the_new_vectors(factory):
    backend = CpuStandIn()
    index = _filled(factory, device=backend)
    index.search(_clustered(1), 5)
    copy = index._replica.index
    new = _clustered(7, seed=8)
    index.add(np.arange(9000, 9007), new)
    assert copy.ntotal == 2000  # recorded, not yet applied: the writer never touches the copy
    _, found = index.search(new, 1)
    assert index._replica.index is copy and len(backend.copies) == 1
    assert copy.ntotal == 2007 and index.device_stats.vectors_added == 7
    assert found[:, 0].tolist() == list(range(9000, 9007))


@pytest.mark.parametrize("factory", [FLAT, "IVF16,Flat"])
def test_a_remove_hides_the_id_without_a_copy_until_the_fraction(factory):
    backend = CpuStandIn()
    index = _filled(factory, device=backend)
    data = _clustered(2000)
    index.search(data[:1], 5)
    copy = index._replica.index
    index.remove([3, 4])
    _, found = index.search(data[3:5], 5)
    assert not np.isin(found, [3, 4]).any()
    assert index._replica.index is copy and copy.ntotal == 2000  # still there, hidden
    assert index._replica.hidden == {3, 4} and len(backend.copies) == 1
    limit = int(HIDDEN_RECOPY_FRACTION * 2000)
    index.remove(np.arange(10, 10 + limit - 40))  # still under the fraction
    index.search(data[:1], 5)
    assert len(backend.copies) == 1
    index.remove(np.arange(1000, 1100))  # now past it: the next search re-copies
    _, found = index.search(data[1000:1010], 3)
    assert len(backend.copies) == 2 and not index._replica.hidden
    assert index._replica.index.ntotal == len(index) and not np.isin(found, range(1000, 1100)).any()


def test_a_copy_is_made_exactly_when_the_rule_says(monkeypatch):
    monkeypatch.setattr(device_module, "PENDING_FLOOR", 100)
    backend = CpuStandIn(max_k=60)
    index = ShortlistIndex(DIM, "IVF16,Flat", nprobe=8, device=backend)
    data = _clustered(2000)
    index.add(np.arange(500), data[:500])
    index.search(data[:1], 5)
    assert len(backend.copies) == 1 and not index.is_trained  # the flat buffer
    index.add(np.arange(500, 700), data[500:700])  # training: a new structure
    index.search(data[:1], 5)
    assert index.is_trained and len(backend.copies) == 2
    index.add(np.arange(700, 750), data[700:750])
    index.remove([700])
    index.search(data[:1], 5)
    assert len(backend.copies) == 2  # an add and a remove: incremental
    index.add([700], data[700:701])  # an id back after its remove: its old vector is there
    _, found = index.search(data[700:701], 1)
    assert len(backend.copies) == 3 and found[0, 0] == 700
    index.remove([1, 2, 3])
    index.search(data[:1], 57)  # 57 + 3 hidden <= max_k 60: over-fetch on the copy
    assert len(backend.copies) == 3
    index.search(data[:1], 58)  # 58 + 3 > 60: re-copy rather than ask past the device's k
    assert len(backend.copies) == 4
    index.add(np.arange(800, 800 + 760), data[800:1560])  # more waiting than the copy holds
    index.search(data[:1], 5)
    assert len(backend.copies) == 5
    index.search(data[:1], 100)  # k beyond the device: this search runs on the CPU
    assert len(backend.copies) == 5 and index.device == "cuda:5"


def test_hnsw_never_goes_to_the_device_and_nothing_is_copied():
    backend = CpuStandIn()
    index = _filled("HNSW16", device=backend)
    index.remove([5])
    index.search(_clustered(2), 10)
    assert index.device == "cpu" and not backend.copies


def test_a_failed_copy_falls_back_to_the_cpu_until_the_structure_changes(caplog):
    class Refusing(CpuStandIn):
        def copy(self, index):
            raise RuntimeError("not implemented on this device")

    index = ShortlistIndex(DIM, "IVF16,Flat", nprobe=8, device=Refusing())
    data = _clustered(2000)
    index.add(np.arange(100), data[:100])
    with caplog.at_level(logging.WARNING):
        _, found = index.search(data[:2], 1)
    assert found[:, 0].tolist() == [0, 1] and index.device == "cpu"
    assert "searching on the CPU" in caplog.text
    index.add(np.arange(100, 2000), data[100:])  # trained: a new structure, tried again
    assert index.device == "cuda:5"


def test_the_device_copy_is_searched_by_one_thread_at_a_time_while_writes_go_on():
    backend = WatchedStandIn()
    index = _filled(FLAT, count=1000, device=backend)
    queries = _clustered(8, seed=3)
    errors: list[BaseException] = []

    def search_many() -> None:
        try:
            for _ in range(30):
                _, found = index.search(queries, 10)
                assert (found >= 0).all()
        except BaseException as error:  # reported below
            errors.append(error)

    added = _clustered(200, seed=6)

    def write_many(target: ShortlistIndex) -> None:
        for n in range(40):
            target.add(np.arange(20_000 + 5 * n, 20_005 + 5 * n), added[5 * n : 5 * n + 5])
            target.remove([2 * n])

    threads = [threading.Thread(target=search_many) for _ in range(6)]
    threads.append(threading.Thread(target=write_many, args=(index,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and backend.record["most"] == 1
    reference = _filled(FLAT, count=1000)  # the same writes, one thread, no device
    write_many(reference)
    _same_hits(reference.search(queries, 10), index.search(queries, 10))
    assert backend.record["most"] == 1


# --- the device setting ---------------------------------------------------------------------


def test_the_faiss_gpu_follows_the_device_setting(monkeypatch, caplog):
    monkeypatch.setattr(device_module, "faiss_gpu_count", lambda: 0)  # faiss-cpu
    assert faiss_gpu_id("cpu") is None and faiss_gpu_id("auto") is None
    with caplog.at_level(logging.WARNING):
        assert faiss_gpu_id("cuda:1") is None
    assert "faiss-gpu" in caplog.text
    monkeypatch.setattr(device_module, "faiss_gpu_count", lambda: 2)
    assert faiss_gpu_id("cpu") is None  # never the GPU, even when faiss sees one
    assert faiss_gpu_id("auto") == 0 and faiss_gpu_id("cuda") == 0
    assert faiss_gpu_id("cuda:1") == 1 and FaissGpu(1).name == "cuda:1"
    with pytest.raises(ValueError, match="only 2"):
        faiss_gpu_id("cuda:2")
    with pytest.raises(ValueError, match="'auto', 'cpu'"):
        faiss_gpu_id("tpu:0")


# --- a real GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [FLAT, "IVF64,Flat", "IVF64_HNSW32,PQ16"])
def test_the_shortlist_on_a_real_gpu_returns_the_cpu_ids(factory):
    gpu = faiss_gpu_id("cuda:0")
    assert gpu == 0, "a GPU test needs the faiss GPU build (faiss-gpu-cu12)"
    dim, count = 64, 20_000  # PQ16 (8 bits) trains on 39 * 256 vectors
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, dim))
    data = l2_normalised(
        centres[rng.integers(0, 200, count + 600)] + 0.3 * rng.standard_normal((count + 600, dim)),
        dim,
    )
    on_gpu = ShortlistIndex(dim, factory, nprobe=16, device=FaissGpu(gpu))
    on_cpu = ShortlistIndex(dim, factory, nprobe=16)
    queries = data[:32] + 0.01
    for target in (on_gpu, on_cpu):
        target.add(np.arange(count), data[:count])
    assert on_gpu.device == "cuda:0"
    lossy = "PQ" in factory
    _close_hits(on_cpu.search(queries, 100), on_gpu.search(queries, 100), lossy)
    copy = on_gpu._replica.index
    for step in range(3):  # incremental writes: adds applied to the copy, removes hidden
        start = count + 200 * step
        for target in (on_gpu, on_cpu):
            target.add(np.arange(start, start + 200), data[start : start + 200])
            target.remove(np.arange(step * 40, step * 40 + 40))
        found = on_gpu.search(queries, 100)
        _close_hits(on_cpu.search(queries, 100), found, lossy)
        assert not np.isin(found[1], np.arange(step * 40 + 40)).any()  # hidden on the copy
        _, own = on_gpu.search(data[start : start + 5], 100)  # the adds are on the copy
        assert all(start + row in own[row] for row in range(5))
    assert on_gpu._replica.index is copy and on_gpu.device_stats.full_copies == 1
    batched = on_gpu.search_batch([(queries[:3], 10), (queries[3:4], 100)])
    _close_hits(on_gpu.search(queries[:3], 10), batched[0], lossy)


def _close_hits(expected, got, lossy: bool) -> None:
    """GPU and CPU round differently: the same ids above the k-th score's tie band."""
    if not lossy:
        _same_hits(expected, got, atol=1e-4)
        return
    overlap = [len(set(e) & set(g)) / len(e) for e, g in zip(expected[1], got[1], strict=True)]
    assert np.mean(overlap) > 0.95  # PQ distances from GPU lookup tables differ in rounding


def test_parameter_changes_reach_the_copy():
    backend = CpuStandIn()
    ivf = _filled("IVF16,Flat", device=backend)
    ivf.search(_clustered(1), 5)
    ivf.nprobe = 3  # set on the copy before the next search, no re-copy
    ivf.search(_clustered(1), 5)
    assert _parameter(ivf._replica.index, "nprobe") == 3 and len(backend.copies) == 1
    quantized = _filled("IVF16_HNSW8,PQ8x4", device=backend)
    quantized.search(_clustered(1), 5)
    quantized.ef_search = 99  # the HNSW quantizer's beam travels inside the copy: re-copy
    quantized.search(_clustered(1), 5)
    assert _parameter(quantized._replica.index, "quantizer_efSearch") == 99
    assert len(backend.copies) == 3
