"""The two-stage search: pooled-vector shortlist, then the CAMP reranker (docs/ARCHITECTURE.md).

text -> images:  encode the text -> micro-batched FAISS top-K images -> their rerank tensors
                 (in-process LRU, else ONE feature fetch through the cache for the misses) ->
                 micro-batched rerank -> sort, `min_score`, `limit` -> catalog metadata
                 (+ explanation).
image -> captions: the same with the sides swapped; the image's tensors and shortlist vector
                 come from the corpus (by id) or from `UploadRegions` (an upload).

Per-item rerank tensors are read, never rebuilt, when stored: in-process LRU, then the feature
cache and LMDB in one round trip (`Corpus.get_rerank_tensors`, float16 records of the current
model's tensor version, service/search/stored_tensors.py). Only items without them (a model
change whose background rebuild is not done) are computed on the fly, from region features or
caption texts, so results are never wrong and never mix two models' tensors.

Every blocking step (torch, FAISS, LMDB, SQLite) runs in a worker thread; the shortlist and the
reranker each run on their own micro-batcher's thread. Stage timings go to the response and to
Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from index.corpus import Corpus, Kind
from index.shortlist import SearchResult, l2_normalised
from model.architecture.precompute import CaptionPrecompute, ImagePrecompute
from model.types import RegionFeatures
from service.outcomes import NotFound, TimedOut
from service.runtime.budget import MemoryBudget
from service.runtime.metrics import ServiceMetrics
from service.search.batching import MicroBatcher, OnTheWay
from service.search.encoding import QueryEncoder
from service.search.lru import ByteBoundedLRU
from service.search.regions import FoundRegions
from service.search.rerank import RerankJob
from service.search.results import (
    SCORE_PROBABILITY,
    SCORE_RAW,
    CaptionHit,
    CaptionMatches,
    Explanation,
    ImageMatch,
    ImageMatches,
    SearchParams,
    Timings,
    Verdict,
)
from service.search.shortlist import ShortlistJob
from service.search.stored_tensors import (
    ImageTensors,
    caption_tensors_many,
    image_tensors_many,
)

if TYPE_CHECKING:
    from model.calibration import Direction
    from model.retrieval import EncodedTexts, PairExplanation, RetrievalModel

RETRY_AFTER_TIMEOUT_S = 1
SearchMethod = TypeVar("SearchMethod", bound=Callable[..., Any])
PrecomputeT = TypeVar("PrecomputeT", CaptionPrecompute, ImagePrecompute)


def _held_bytes(item: object) -> int:
    """Bytes a cached dataclass keeps alive: whole tensor storages and array buffers, not only
    the visible elements, since a view pins its base (a byte budget must count what it holds)."""
    total = 0
    for f in fields(item):  # type: ignore[arg-type]
        value = getattr(item, f.name)
        if isinstance(value, torch.Tensor):
            total += value.untyped_storage().nbytes()
        elif isinstance(value, np.ndarray):
            total += _buffer_bytes(value)
        elif hasattr(value, "__dataclass_fields__"):
            total += _held_bytes(value)
    return total


def _buffer_bytes(array: np.ndarray) -> int:
    """Bytes of the buffer `array` views (e.g. a whole feature record for `np.frombuffer`)."""
    owner = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.base is None:
        return owner.nbytes
    try:
        return max(memoryview(owner.base).nbytes, owner.nbytes)
    except TypeError:  # a base without the buffer protocol: count the array itself
        return owner.nbytes


def _compacted(item: PrecomputeT) -> PrecomputeT:
    """A copy whose tensors own exactly their elements: a selected, trimmed item is a view of
    its batch's padded tensors and would otherwise keep the whole batch row alive."""
    return replace(
        item,
        **{
            f.name: getattr(item, f.name).clone(memory_format=torch.contiguous_format)
            for f in fields(item)
        },
    )


def _within_request_timeout(search: SearchMethod) -> SearchMethod:
    """`request_timeout_s` bounds a whole search (tensor building and queueing included): past
    it the caller gets `TimedOut`, and work not yet started in a thread is dropped."""

    @functools.wraps(search)
    async def bounded(self: SearchPipeline, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await search(self, *args, **kwargs)
        except TimeoutError:
            raise TimedOut(
                f"the search did not finish within {self.request_timeout_s:g} s; retry later",
                retry_after_s=RETRY_AFTER_TIMEOUT_S,
            ) from None

    return bounded  # type: ignore[return-value]


class SearchPipeline:
    """Both search directions over one corpus, one model and two micro-batchers (the shortlist's
    and the reranker's)."""

    def __init__(
        self,
        model: RetrievalModel,
        corpus: Corpus,
        batcher: MicroBatcher[RerankJob, np.ndarray],
        metrics: ServiceMetrics,
        *,
        shortlist: MicroBatcher[ShortlistJob, SearchResult],
        request_timeout_s: float,
        image_cache_bytes: int,
        caption_cache_bytes: int,
        search_memory_bytes: int = 0,
        max_regions: int = 100,
        encoder: MicroBatcher[str, EncodedTexts | ValueError] | None = None,
        rerank_on_the_way: OnTheWay | None = None,
    ) -> None:
        """`image_cache_bytes` / `caption_cache_bytes` bound the in-process LRUs of rerank
        tensors (per-image ones cost ~1 MB at d=1024 and ~5 ms to build on a CPU; per-caption
        ones ~20x less); `search_memory_bytes` bounds what searches in flight hold of them
        (service/runtime/budget.py; 0: unbounded), reckoned at `max_regions` regions an image. The
        service takes them from `Settings` and the extractor. `encoder` batches the query
        texts of concurrent searches into shared model calls (None: a batcher of its own that
        never waits). `rerank_on_the_way` counts the searches that will submit to `batcher` (its
        `expected`: it waits for company only while some are on their way)."""
        self.model = model
        self.rerank_on_the_way = rerank_on_the_way or OnTheWay()
        self.encoder = encoder or MicroBatcher(QueryEncoder(model), max_wait_s=0.0, name="encode")
        self.corpus = corpus
        self.batcher = batcher
        self.shortlist = shortlist
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.search_memory = MemoryBudget(search_memory_bytes)
        # What one candidate may cost a search: its rerank tensors and boxes; for a cache miss
        # also its stored region features (float16) while they are turned into tensors.
        self._bytes_per_image = model.image_tensor_bytes(max_regions) + max_regions * 16
        self._bytes_per_image_miss = max_regions * model.region_dim * 2
        self._bytes_per_caption = model.caption_tensor_bytes()
        self.image_tensors: ByteBoundedLRU[int, ImageTensors] = ByteBoundedLRU(
            image_cache_bytes, _held_bytes
        )
        self.caption_tensors: ByteBoundedLRU[int, CaptionPrecompute] = ByteBoundedLRU(
            caption_cache_bytes, _held_bytes
        )

    # --- text -> images ---------------------------------------------------------------------

    @_within_request_timeout
    async def images_for_text(self, text: str, request: SearchParams) -> ImageMatches:
        if not request.rerank:
            return await self._images_for_text(text, request, lambda: None)
        with self.rerank_on_the_way.one() as arrived:
            return await self._images_for_text(text, request, arrived)

    async def _images_for_text(
        self, text: str, request: SearchParams, arrived: Callable[[], None]
    ) -> ImageMatches:
        """The search; `arrived` is called when it no longer heads for the reranker."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        with self.metrics.time_stage("encode", timings):
            encoded = await self.encoder.submit(text)
        if isinstance(encoded, ValueError):
            raise encoded
        query = encoded.precompute.select([0])
        k = max(request.candidates, request.limit)
        with self.metrics.time_stage("shortlist", timings):
            scores, ids = await self._search("images", encoded.pooled, k)
        shortlist = _shortlist(scores[0], ids[0])

        async with contextlib.AsyncExitStack() as held:  # the tensors, until the answer is built
            tensors: dict[int, ImageTensors] = {}
            if request.rerank and shortlist:
                with self.metrics.time_stage("features", timings):
                    tensors = await self._hold_image_tensors([c.id for c in shortlist], held)
                shortlist = [c for c in shortlist if c.id in tensors]  # deleted meanwhile
            final = await self._final_scores(
                shortlist,
                request.rerank,
                timings,
                lambda: (tuple(tensors[c.id].precompute for c in shortlist), (query,)),
                arrived,
            )
            chosen, verdict = self._best(shortlist, final, "t2i", request)

            records = await asyncio.to_thread(self._image_records, [c.id for c, *_ in chosen])
            explanations: dict[int, Explanation] = {}
            if request.explain and chosen:
                with self.metrics.time_stage("explain", timings):
                    if not request.rerank:
                        tensors = await self._hold_image_tensors([c.id for c, *_ in chosen], held)
                    chosen_tensors = {c.id: tensors[c.id] for c, *_ in chosen if c.id in tensors}
                    explanations = await asyncio.to_thread(
                        self._explain_images, chosen_tensors, query, encoded.tokens[0]
                    )
        results = [
            ImageMatch(
                id=c.id,
                score=score,
                raw_score=raw,
                shortlist_score=c.score,
                shortlist_rank=c.rank,
                captions=records[c.id],
                explanation=explanations.get(c.id),
            )
            for c, score, raw in chosen
            if c.id in records
        ]
        return ImageMatches(results=results, timings_ms=_timings(timings, started), verdict=verdict)

    # --- image -> captions ------------------------------------------------------------------

    @_within_request_timeout
    async def captions_for_image_id(self, image_id: int, options: SearchParams) -> CaptionMatches:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        with self.metrics.time_stage("features", timings):
            found = await asyncio.to_thread(self._stored_image, image_id)
        if found is None:
            raise NotFound("image", image_id, field="body.image_id")
        tensors, pooled = found
        return await self._captions_for(pooled, tensors, options, timings, started)

    @_within_request_timeout
    async def captions_for_regions(
        self,
        found: FoundRegions,
        options: SearchParams,
        *,
        timings: dict[str, float],
        started: float,
    ) -> CaptionMatches:
        """Search with an upload's regions; `timings` and `started` (perf_counter) may already
        count its decoding and extraction."""
        regions = found.regions
        if found.image_id is not None:  # the same bytes are in the corpus: its stored tensors
            with self.metrics.time_stage("features", timings):
                stored = await asyncio.to_thread(self._stored_image, found.image_id)
            if stored is not None:
                tensors, pooled = stored
                return await self._captions_for(pooled, tensors, options, timings, started)
        with self.metrics.time_stage("precompute", timings):
            precompute = await asyncio.to_thread(
                self.model.precompute_images, np.asarray(regions.features)[None]
            )
        with self.metrics.time_stage("encode", timings):
            pooled = await asyncio.to_thread(
                self.model.pooled_images, np.asarray(regions.features)[None]
            )
        image = ImageTensors.of(precompute, regions)
        return await self._captions_for(pooled, image, options, timings, started)

    async def _captions_for(
        self,
        pooled: np.ndarray,
        image: ImageTensors,
        options: SearchParams,
        timings: dict[str, float],
        started: float,
    ) -> CaptionMatches:
        """The search of one image (its shortlist vector [1, e] and rerank tensors)."""
        if not options.rerank:
            return await self._captions_of(pooled, image, options, timings, started, lambda: None)
        with self.rerank_on_the_way.one() as arrived:
            return await self._captions_of(pooled, image, options, timings, started, arrived)

    async def _captions_of(
        self,
        pooled: np.ndarray,
        image: ImageTensors,
        options: SearchParams,
        timings: dict[str, float],
        started: float,
        arrived: Callable[[], None],
    ) -> CaptionMatches:
        k = max(options.candidates, options.limit)
        with self.metrics.time_stage("shortlist", timings):
            scores, ids = await self._search("captions", pooled, k)
        shortlist = _shortlist(scores[0], ids[0])

        async with contextlib.AsyncExitStack() as held:  # the tensors, until the answer is built
            captions: dict[int, CaptionPrecompute] = {}
            if (options.rerank or options.explain) and shortlist:
                with self.metrics.time_stage("features", timings):
                    captions = await self._hold_caption_tensors([c.id for c in shortlist], held)
                shortlist = [c for c in shortlist if c.id in captions]
            final = await self._final_scores(
                shortlist,
                options.rerank,
                timings,
                lambda: ((image.precompute,), tuple(captions[c.id] for c in shortlist)),
                arrived,
            )
            chosen, verdict = self._best(shortlist, final, "i2t", options)

            records = await asyncio.to_thread(self.corpus.get_captions, [c.id for c, *_ in chosen])
            explanations: dict[int, Explanation] = {}
            if options.explain and chosen:
                with self.metrics.time_stage("explain", timings):
                    explanations = await asyncio.to_thread(
                        self._explain_captions,
                        image,
                        {c.id: captions[c.id] for c, *_ in chosen if c.id in records},
                        {c.id: records[c.id].text for c, *_ in chosen if c.id in records},
                    )
        results = [
            CaptionHit(
                id=c.id,
                text=records[c.id].text,
                image_id=records[c.id].image_id,
                score=score,
                raw_score=raw,
                shortlist_score=c.score,
                shortlist_rank=c.rank,
                explanation=explanations.get(c.id),
            )
            for c, score, raw in chosen
            if c.id in records
        ]
        return CaptionMatches(
            results=results, timings_ms=_timings(timings, started), verdict=verdict
        )

    # --- per-item tensors (cached) ------------------------------------------------------------

    async def _hold_image_tensors(
        self, ids: Sequence[int], held: contextlib.AsyncExitStack
    ) -> dict[int, ImageTensors]:
        """`tensors_of_images`, once the search's share of `search_memory` is reserved in
        `held` (it waits there, within the request timeout, while the budget is spent). When
        the LRU holds every candidate nothing is read: no worker thread is needed."""
        found = self.image_tensors.get_many(ids)
        misses = len(ids) - len(found)
        await held.enter_async_context(
            self.search_memory.reserve(
                len(ids) * self._bytes_per_image + misses * self._bytes_per_image_miss
            )
        )
        if not misses:
            return self.tensors_of_images(ids, found=found)
        return await asyncio.to_thread(self.tensors_of_images, ids, found=found)

    async def _hold_caption_tensors(
        self, ids: Sequence[int], held: contextlib.AsyncExitStack
    ) -> dict[int, CaptionPrecompute]:
        """`tensors_of_captions`, once the search's share of `search_memory` is reserved; on
        the event loop when the LRU holds every candidate, as for images."""
        await held.enter_async_context(
            self.search_memory.reserve(len(ids) * self._bytes_per_caption)
        )
        found = self.caption_tensors.get_many(ids)
        if len(found) == len(ids):
            return self.tensors_of_captions(ids, found=found)
        return await asyncio.to_thread(self.tensors_of_captions, ids, found=found)

    def tensors_of_images(
        self, ids: Sequence[int], *, found: dict[int, ImageTensors] | None = None
    ) -> dict[int, ImageTensors]:
        """Rerank tensors of the images that exist: LRU hits (or `found`, hits the caller
        already looked up), then the stored tensors of the misses (cache, then LMDB, one round
        trip), and only for images without them (a model change not rebuilt yet) ONE feature
        fetch + ONE precompute call, padded to the most regions among them."""
        return self._read_through(
            "images",
            ids,
            self.image_tensors,
            self.image_tensors.get_many(ids) if found is None else found,
            decode=lambda records, device: image_tensors_many(
                records, device, self.model.reranker.image_precompute
            ),
            compute=lambda unstored: self.computed_image_tensors(
                self.corpus.get_region_features(unstored)
            ),
        )

    def computed_image_tensors(self, stored: dict[int, RegionFeatures]) -> dict[int, ImageTensors]:
        """Rerank tensors computed from region features, in ONE precompute call padded to the
        most regions among them; each entry is trimmed back to its own regions and owns its
        memory (the path of images without stored tensors, and of the rebuild)."""
        if not stored:
            return {}
        group, batch, counts = _padded_regions(stored)
        with self.metrics.time_stage("precompute"):
            precompute = self.model.precompute_images(batch, counts)
        built: dict[int, ImageTensors] = {}
        for row, image_id in enumerate(group):
            own = precompute.select(slice(row, row + 1)).trimmed(int(counts[row]))
            built[image_id] = ImageTensors.of(_compacted(own), stored[image_id])
        return built

    def tensors_of_captions(
        self, ids: Sequence[int], *, found: dict[int, CaptionPrecompute] | None = None
    ) -> dict[int, CaptionPrecompute]:
        """Rerank tensors of the captions that exist: LRU hits (or `found`, hits the caller
        already looked up), then stored tensors (one round trip); only captions without them
        are re-encoded, in one call."""

        def encoded(unstored: list[int]) -> dict[int, CaptionPrecompute]:
            records = self.corpus.get_captions(unstored)
            return self.computed_caption_tensors({i: records[i].text for i in records})

        return self._read_through(
            "captions",
            ids,
            self.caption_tensors,
            self.caption_tensors.get_many(ids) if found is None else found,
            decode=lambda records, device: caption_tensors_many(
                records, device, self.model.reranker.caption_precompute
            ),
            compute=encoded,
        )

    def _read_through(
        self,
        kind: Kind,
        ids: Sequence[int],
        lru: ByteBoundedLRU,
        found: dict[int, Any],
        *,
        decode: Callable[[dict[int, Any], torch.device], dict[int, Any]],
        compute: Callable[[list[int]], dict[int, Any]],
    ) -> dict[int, Any]:
        """`ids`' rerank tensors, in order, of the items that exist: `found` (the LRU's hits),
        then the stored records of the misses (`decode`d all at once), then `compute` for
        items without them. What was read or computed goes into `lru` when it keeps anything:
        both give items whose tensors own their memory, so caching one pins nothing else."""
        label = kind.removesuffix("s")  # the metric's "image" / "caption"
        self.metrics.precompute_cache.labels(label, "hit").inc(len(found))
        missing = [i for i in ids if i not in found]
        if not missing:
            return found
        built = decode(self.corpus.get_rerank_tensors(kind, missing), self.model.device)
        self.metrics.precompute_cache.labels(label, "stored").inc(len(built))
        unstored = [i for i in missing if i not in built]
        if unstored:
            self.metrics.precompute_cache.labels(label, "miss").inc(len(unstored))
            built.update(compute(unstored))
        if lru.max_bytes > 0:
            lru.put_many(built)
        return {i: found[i] if i in found else built[i] for i in ids if i in found or i in built}

    def computed_pooled_images(self, stored: dict[int, RegionFeatures]) -> dict[int, np.ndarray]:
        """Shortlist vectors [e] of images from their region features, in ONE call padded to
        the most regions among them: what ingest stores (`RetrievalModel.pooled_images`,
        zero-shot part included), for the rebuild after a model change."""
        if not stored:
            return {}
        group, batch, counts = _padded_regions(stored)
        with self.metrics.time_stage("encode"):
            pooled = self.model.pooled_images(batch, counts)
        return {image_id: pooled[row] for row, image_id in enumerate(group)}

    def computed_pooled_captions(self, texts: dict[int, str]) -> dict[int, np.ndarray]:
        """Shortlist vectors [e] of caption texts, encoded in one call as ingest does."""
        if not texts:
            return {}
        with self.metrics.time_stage("encode"):
            encoded = self.model.encode_texts(list(texts.values()))
        return {caption_id: encoded.pooled[row] for row, caption_id in enumerate(texts)}

    def computed_caption_tensors(self, texts: dict[int, str]) -> dict[int, CaptionPrecompute]:
        """Rerank tensors of caption texts, encoded in one call; each owns its memory."""
        if not texts:
            return {}
        with self.metrics.time_stage("precompute"):
            encoded = self.model.encode_texts(list(texts.values()))
        return {
            caption_id: _compacted(encoded.precompute.select([row]))
            for row, caption_id in enumerate(texts)
        }

    def _stored_image(self, image_id: int) -> tuple[ImageTensors, np.ndarray] | None:
        """A corpus image's rerank tensors and stored shortlist vector [1, e], or None when it
        does not exist (or has no vector of this model: it is not searchable either)."""
        tensors = self.tensors_of_images([image_id])
        pooled = self.corpus.get_pooled("images", [image_id])
        if image_id not in tensors or image_id not in pooled:
            return None
        return tensors[image_id], pooled[image_id][None]

    def forget(self, image_ids: Sequence[int] = (), caption_ids: Sequence[int] = ()) -> None:
        """Drop cached tensors of deleted items (ids are never reused; this frees memory)."""
        self.image_tensors.discard(image_ids)
        self.caption_tensors.discard(caption_ids)

    # --- internals ----------------------------------------------------------------------------

    async def _search(self, kind: Kind, pooled: np.ndarray, k: int) -> SearchResult:
        """The shortlist of one query, searched in a batch with concurrent ones. The vector is
        checked here, so a bad one fails its own request and never its batch-mates'."""
        job = ShortlistJob(kind, l2_normalised(pooled, self.corpus.dim), k)
        return await self.shortlist.submit(job)

    async def _final_scores(
        self,
        shortlist: Sequence[_Candidate],
        rerank: bool,
        timings: dict[str, float],
        pairs: Callable[[], tuple[tuple[ImagePrecompute, ...], tuple[CaptionPrecompute, ...]]],
        arrived: Callable[[], None],
    ) -> np.ndarray:
        """The reranker's fused scores of the shortlist (`pairs`: the query's per-item tensors
        on one side, the K candidates' on the other, references and not copies), or the
        shortlist's own scores when reranking is off or nothing is left. `arrived` is called
        first: from here on this search is no longer on its way to the reranker."""
        arrived()
        shortlist_scores = np.asarray([c.score for c in shortlist], dtype=np.float32)
        if not (rerank and shortlist):
            return shortlist_scores
        images, captions = pairs()
        job = RerankJob(images=images, captions=captions, shortlist_scores=shortlist_scores)
        with self.metrics.time_stage("rerank", timings):
            return await self.batcher.submit(job)

    def _best(
        self,
        candidates: list[_Candidate],
        final: np.ndarray,
        direction: Direction,
        params: SearchParams,
    ) -> tuple[list[tuple[_Candidate, float, float]], Verdict]:
        """(candidate, score, raw score) best first (ties keep shortlist order), at or above
        `min_score`, at most `limit`, and what the scores mean. The score is the calibrated
        P(match) of the raw final score when the model has a calibration, else the raw score;
        the order is the raw score's (a calibration map is monotone, so the same order)."""
        calibration = self.model.calibration
        if calibration is None:
            scores, kind = np.asarray(final, dtype=np.float32), SCORE_RAW
        else:
            scores = calibration.probability(direction, params.rerank, final)
            kind = SCORE_PROBABILITY
        order = np.argsort(-final, kind="stable")
        ranked = [(candidates[i], float(scores[i]), float(final[i])) for i in order]
        if params.min_score is None or not ranked:
            return ranked[: params.limit], Verdict(score_kind=kind)
        passed = [hit for hit in ranked if hit[1] >= params.min_score]
        if passed:
            return passed[: params.limit], Verdict(score_kind=kind)
        what = "P(match)" if kind == SCORE_PROBABILITY else "score"
        message = (
            f"no good match: the best of {len(ranked)} candidates has {what} "
            f"{ranked[0][1]:.3g}, below min_score {params.min_score:g}"
        )
        return [], Verdict(score_kind=kind, no_match=True, message=message)

    def _image_records(self, ids: Sequence[int]) -> dict[int, list[str]]:
        """{image id: its caption texts} for the ids that still exist (one catalog query)."""
        captions = self.corpus.captions_of_images(ids)
        return {i: [c.text for c in captions[i]] for i in ids if i in captions}

    def _explain_images(
        self, tensors: dict[int, ImageTensors], query: CaptionPrecompute, words: list[str]
    ) -> dict[int, Explanation]:
        """Explanations of all hits against the query, in one batched scorer call."""
        ids = list(tensors)
        if not ids:
            return {}
        images = self.model.reranker.image_precompute.cat([tensors[i].precompute for i in ids])
        pairs = self.model.explain_pairs(images, query)
        return {
            i: _explanation(pair, words, tensors[i]) for i, pair in zip(ids, pairs, strict=True)
        }

    def _explain_captions(
        self, image: ImageTensors, captions: dict[int, CaptionPrecompute], texts: dict[int, str]
    ) -> dict[int, Explanation]:
        """Explanations of all caption hits (`texts`: their catalog texts, already read), in
        one tokenizer call and one batched scorer call."""
        ids = [i for i in captions if i in texts]
        if not ids:
            return {}
        words = self.model.tokenize([texts[i] for i in ids])[1]
        pairs = self.model.explain_pairs(
            image.precompute,
            self.model.reranker.caption_precompute.cat([captions[i] for i in ids]),
        )
        return {
            i: _explanation(pair, tokens, image)
            for i, pair, tokens in zip(ids, pairs, words, strict=True)
        }


@dataclass(frozen=True)
class _Candidate:
    id: int
    score: float
    rank: int


def _shortlist(scores: np.ndarray, ids: np.ndarray) -> list[_Candidate]:
    return [
        _Candidate(int(i), float(s), rank)
        for rank, (s, i) in enumerate(zip(scores, ids, strict=True))
        if i >= 0
    ]


def _explanation(pair: PairExplanation, words: list[str], image: ImageTensors) -> Explanation:
    return Explanation(
        words=list(words[: len(pair.word_region)]),
        boxes=np.asarray(image.boxes, dtype=np.float32).round(5).tolist(),
        image_size=image.image_size,
        word_region=pair.word_region,
        region_pooling=pair.region_pooling,
        word_pooling=pair.word_pooling,
        camp_score=pair.camp_score,
    )


def _timings(stages: dict[str, float], started: float) -> Timings:
    total = (time.perf_counter() - started) * 1000.0
    return Timings(
        encode=stages.get("encode", 0.0),
        shortlist=stages.get("shortlist", 0.0),
        features=sum(stages.get(name, 0.0) for name in ("features", "extract", "precompute")),
        rerank=stages.get("rerank", 0.0),
        total=total,
    )


def _padded_regions(
    stored: dict[int, RegionFeatures],
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, features [B, R_max, D] zero-padded, real region counts [B]) of region records."""
    group = list(stored)
    counts = np.array([stored[i].num_regions for i in group], dtype=np.int64)
    batch = np.zeros(
        (len(group), int(counts.max()), stored[group[0]].feature_dim),
        dtype=stored[group[0]].features.dtype,
    )
    for row, image_id in enumerate(group):
        batch[row, : counts[row]] = stored[image_id].features
    return group, batch, counts
