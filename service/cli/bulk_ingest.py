"""Bulk ingest: a manifest or a folder of photos, into a data directory or a running server.

Resumable by design: before a photo is processed its SHA-256 is looked up in the target, so
rerunning the same command after an interrupt skips everything already stored (a photo is
stored with its captions in one commit, so nothing is half-done). A stored photo whose source
brings captions it lacks (a folder ingested first, then its manifest) gets those captions added,
and the report counts them: nothing in the source is dropped without a word. Refused files (not
an image, too large, ...) are reported with the reason and do not stop the run; an unreachable
server or a rejected API key does stop it.

Sources:
* ``manifest.jsonl``: one JSON object per line with ``image`` (a path relative to the manifest)
  and optional ``captions`` (a list of strings), the layout `camp-search extract` reads too;
* a folder: every image file under it (sorted), with optional captions in a sidecar text file
  of the same name (``beach.jpg`` + ``beach.txt``, one caption per line).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from index.corpus import sha256_hex
from model.vision.extract import (
    IMAGE_SUFFIXES,
    ExtractInputError,
    Refusal,
    list_image_folder,
    read_manifest_lines,
)
from service.api.auth import API_KEY_HEADER
from service.api.errors import problem_of
from service.outcomes import ServiceError
from service.runtime.lifecycle import ServiceRuntime

DEFAULT_JOBS = 2
HTTP_TIMEOUT_S = 120.0  # one upload may wait for a CPU extraction behind others
MAX_RETRIES = 5
MAX_RETRY_WAIT_S = 30.0

Outcome = Literal["added", "existing", "refused"]


class IngestSourceError(ValueError):
    """The manifest or folder cannot be read (missing, malformed line, no images)."""


class IngestAbortedError(RuntimeError):
    """The target cannot take writes at all (unreachable server, rejected key, busy data dir)."""


class RefusedError(Exception):
    """The target refused one photo; `status` is the HTTP status (or the local equivalent)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class IngestItem:
    path: Path
    captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Added:
    """What the target did with one photo: stored it (`added`) or had it (`existing`), and
    how many of its captions it stored."""

    outcome: Outcome
    captions_added: int = 0


@dataclass
class IngestReport:
    added: int = 0
    existing: int = 0
    refused: list[Refusal] = field(default_factory=list)
    seconds: float = 0.0
    captions_added: int = 0  # new captions stored on photos that were already stored
    photos_captioned: int = 0  # how many stored photos received them

    @property
    def processed(self) -> int:
        return self.added + self.existing + len(self.refused)


class IngestTarget(Protocol):
    """Where photos go: a local data directory or a server."""

    max_upload_bytes: int

    async def known(self, sha256: str) -> tuple[str, ...] | None:
        """The captions of the stored photo with these bytes, or None when there is none."""
        ...

    async def add(self, data: bytes, captions: Sequence[str], sha256: str) -> Added:
        """Store the photo (`sha256`: its hash, already computed), or add to the stored one the
        captions it lacks."""
        ...


# --- sources ------------------------------------------------------------------------------


def read_source(source: Path, *, max_captions: int | None = None) -> list[IngestItem]:
    """Photos to ingest from a manifest (.jsonl) or a folder; `max_captions` keeps the first
    N captions of each photo (e.g. to hold one out for evaluation)."""
    source = Path(source)
    if source.is_dir():
        items = _folder_items(source)
    elif source.is_file():
        items = _manifest_items(source)
    else:
        raise IngestSourceError(f"{source} is neither a manifest file nor a folder")
    if not items:
        raise IngestSourceError(f"{source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if max_captions is not None:
        items = [IngestItem(i.path, i.captions[:max_captions]) for i in items]
    return items


def _manifest_items(manifest: Path) -> list[IngestItem]:
    def item(number: int, entry: Any) -> IngestItem:
        image = entry["image"]
        captions = entry.get("captions") or []
        if not isinstance(image, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("'image' must be a string and 'captions' a list of strings")
        return IngestItem(manifest.parent / image, tuple(captions))

    def problem(number: int, error: Exception) -> IngestSourceError:
        return IngestSourceError(
            f"{manifest}:{number}: expected {{'image': path, 'captions': [...]}}: {error}"
        )

    return read_manifest_lines(manifest, item, problem)


def _folder_items(folder: Path) -> list[IngestItem]:
    """The same images `camp-search extract` would take, each with the captions of its sidecar
    `photo.txt` (one per line), if any."""
    try:
        records = list_image_folder(folder)
    except ExtractInputError as error:
        raise IngestSourceError(str(error)) from error
    return [IngestItem(record.path, _sidecar_captions(record.path)) for record in records]


def _sidecar_captions(image: Path) -> tuple[str, ...]:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return ()
    lines = sidecar.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


# --- the run ------------------------------------------------------------------------------


async def ingest(
    items: Sequence[IngestItem],
    target: IngestTarget,
    *,
    jobs: int = DEFAULT_JOBS,
    on_done: Callable[[IngestItem, Outcome], None] | None = None,
) -> IngestReport:
    """Send every item to `target` with at most `jobs` in flight; never raises for one bad
    file (it is refused in the report), raises `IngestAbortedError` when the target is gone."""
    report = IngestReport()
    started = time.perf_counter()
    queue: asyncio.Queue[IngestItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            outcome = await _ingest_one(item, target, report)
            if on_done is not None:
                on_done(item, outcome)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, jobs))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        report.seconds = time.perf_counter() - started
    return report


async def _ingest_one(item: IngestItem, target: IngestTarget, report: IngestReport) -> Outcome:
    try:
        size = item.path.stat().st_size
        if size > target.max_upload_bytes:
            raise RefusedError(
                413, f"{size:,} bytes is over the limit of {target.max_upload_bytes:,} bytes"
            )
        data = await asyncio.to_thread(item.path.read_bytes)
        sha256 = sha256_hex(data)
        stored_captions = await target.known(sha256)
        if stored_captions is not None and set(item.captions) <= set(stored_captions):
            result = Added("existing")
        else:  # new, or stored without some of these captions: the target adds what it lacks
            result = await target.add(data, item.captions, sha256)
    except RefusedError as refusal:
        report.refused.append(Refusal(str(item.path), refusal.reason, status=refusal.status))
        return "refused"
    except OSError as error:
        report.refused.append(Refusal(str(item.path), f"cannot read the file: {error}"))
        return "refused"
    if result.outcome == "added":
        report.added += 1
    else:
        report.existing += 1
        if result.captions_added:
            report.captions_added += result.captions_added
            report.photos_captioned += 1
    return result.outcome


def write_refusals(report: IngestReport, path: Path) -> None:
    """One JSON object per refused file, so a later run can retry exactly those."""
    with path.open("w", encoding="utf-8") as out:
        for refusal in report.refused:
            line = {"path": refusal.image, "status": refusal.status, "reason": refusal.reason}
            out.write(json.dumps(line) + "\n")


# --- targets ------------------------------------------------------------------------------


class HttpTarget:
    """A running server: `GET /v1/images?sha256=` to skip, `POST /v1/images` to add.

    429/503 answers are retried after their Retry-After (bounded); 401/403 and connection
    failures abort the run.
    """

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout_s: float = HTTP_TIMEOUT_S
    ) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.max_upload_bytes = 0

    async def open(self) -> HttpTarget:
        info = await self._request("GET", "/v1/info")
        if info.status_code != 200:
            raise IngestAbortedError(
                f"{self.base_url} is not ready ({info.status_code}): {_detail(info)}"
            )
        self.max_upload_bytes = int(info.json()["limits"]["max_upload_bytes"])
        return self

    async def close(self) -> None:
        await self.client.aclose()

    async def known(self, sha256: str) -> tuple[str, ...] | None:
        response = await self._request("GET", "/v1/images", params={"sha256": sha256})
        if response.status_code != 200:
            raise IngestAbortedError(f"lookup failed ({response.status_code}): {_detail(response)}")
        found = response.json()["data"]
        return tuple(caption["text"] for caption in found[0]["captions"]) if found else None

    async def add(self, data: bytes, captions: Sequence[str], sha256: str) -> Added:
        """POST the photo; the server hashes the bytes it receives itself."""
        response = await self._request(
            "POST",
            "/v1/images",
            files={"file": ("upload", data, "application/octet-stream")},
            data={"captions": list(captions)} if captions else None,
        )
        if response.status_code in (200, 201):
            outcome: Outcome = "added" if response.status_code == 201 else "existing"
            return Added(outcome, int(response.json().get("captions_added", 0)))
        if response.status_code in (401, 403):
            raise IngestAbortedError(f"the server refused the API key: {_detail(response)}")
        raise RefusedError(response.status_code, _detail(response))

    async def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        for attempt in range(MAX_RETRIES + 1):
            try:
                response = await self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
            except httpx.TransportError as error:
                raise IngestAbortedError(f"cannot reach {self.base_url}: {error}") from error
            if response.status_code not in (429, 503) or attempt == MAX_RETRIES:
                return response
            await asyncio.sleep(_retry_after_s(response, attempt))
        raise AssertionError("unreachable")


def _retry_after_s(response: httpx.Response, attempt: int) -> float:
    try:
        wait = float(response.headers.get("Retry-After", ""))
    except ValueError:
        wait = 2.0**attempt
    return min(MAX_RETRY_WAIT_S, max(0.1, wait))


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail") or body)


class LocalTarget:
    """A data directory, written in-process through the same `Indexer` as the API (holds the
    data directory's lock, so no server may run on it meanwhile)."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.max_upload_bytes = runtime.settings.max_upload_bytes

    async def known(self, sha256: str) -> tuple[str, ...] | None:
        return await asyncio.to_thread(self._stored_captions, sha256)

    def _stored_captions(self, sha256: str) -> tuple[str, ...] | None:
        corpus = self.runtime.corpus
        record = corpus.find_image_by_sha256(sha256)
        if record is None:
            return None
        return tuple(caption.text for caption in corpus.captions_of(record.id))

    async def add(self, data: bytes, captions: Sequence[str], sha256: str) -> Added:
        try:
            stored = await self.runtime.indexer.add_image(data, captions, sha256=sha256)
        except ServiceError as error:
            problem = problem_of(error)  # the answer the API would give: the same refusal
            assert problem is not None
            reasons = "; ".join(p.reason for p in problem.errors) or problem.detail
            raise RefusedError(problem.status, reasons) from error
        return Added("added" if stored.created else "existing", stored.captions_added)
