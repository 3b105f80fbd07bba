"""After a model change, PostgreSQL mode rebuilds the stored rerank tensors once per database,
not once per replica: two real `camp-search serve` processes (a small checkpoint) on one
database; only the one holding the rebuild's advisory lock computes, the other reports the
database's progress; SIGKILLing the holder mid-rebuild lets the other take over and finish
only what is left (resumable). And the lock itself (`index.postgres.SessionLock`).
"""

from __future__ import annotations

import re
import subprocess
import time
from contextlib import closing

import httpx
import psycopg
from service_support import (
    coco_photos,
    make_settings,
    retrained,
    running_client,
    save_small_checkpoint,
)
from test_postgres_api import spawn_replica

from index.corpus import rerank_namespace
from index.postgres import PostgresDatabase, SessionLock
from model.retrieval import RetrievalModel
from service.api.app import create_app

PHOTOS = 4
CAPTIONS = 2
WAIT_S = 90.0  # two processes loading on shared cores, then the rebuild


def rebuild_detail(url: str) -> str:
    ready = httpx.get(f"{url}/readyz", timeout=10)
    if ready.status_code != 200:
        return ""
    return next(c["detail"] for c in ready.json()["components"] if c["name"] == "rerank_tensors")


def built_here(url: str) -> dict[str, int]:
    """This process's campsearch_rerank_tensors_built_total by kind."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'campsearch_rerank_tensors_built_total\{kind="(\w+)"\} ([0-9.e+]+)', text)
    return {kind: int(float(value)) for kind, value in found}


def wait_for(condition, what: str, processes, logs) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for process, log in zip(processes, logs, strict=True):
            assert process.poll() is None, log.read_text()[-3000:]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
        time.sleep(0.1)


def test_one_replica_rebuilds_and_a_killed_holder_is_taken_over(
    tmp_path, shared_dir, postgres_url, tiny_retrieval_model
) -> None:
    old = save_small_checkpoint(tiny_retrieval_model, tmp_path / "old.pt")
    new_model = retrained(tiny_retrieval_model)
    new = save_small_checkpoint(new_model, tmp_path / "new.pt")
    data_dir = tmp_path / "shared"
    app = create_app(make_settings(data_dir, database_url=postgres_url, checkpoint=old))
    with running_client(app) as client:
        for path, captions in coco_photos(shared_dir, PHOTOS):
            added = client.post(
                "/v1/images",
                files={"file": (path.name, path.read_bytes())},
                data={"captions": captions[:CAPTIONS]},
            )
            assert added.status_code == 201, added.text
    total = PHOTOS * CAPTIONS
    version = RetrievalModel.load(new, device="cpu").tensor_version
    assert version != tiny_retrieval_model.tensor_version

    # Hold one caption row: the holder builds every image's tensors, then blocks storing
    # the captions' (its write locks the rows it keeps), mid-rebuild with the lock held.
    blocker = psycopg.connect(postgres_url)
    (caption_id,) = blocker.execute("SELECT min(id) FROM captions").fetchone()
    blocker.execute("SELECT 1 FROM captions WHERE id = %s FOR UPDATE", (caption_id,))

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    replicas = [spawn_replica(data_dir, postgres_url, log, checkpoint=str(new)) for log in logs]
    processes = [process for process, _ in replicas]
    urls = [url for _, url in replicas]
    try:
        here = f"rebuilding on this replica (images {PHOTOS}/{PHOTOS}, captions 0/{total})"
        there = f"rebuilding on another replica (images {PHOTOS}/{PHOTOS}, captions 0/{total})"

        def one_builds_one_waits() -> bool:
            try:
                return sorted(rebuild_detail(url) for url in urls) == sorted([here, there])
            except httpx.TransportError:
                return False

        wait_for(one_builds_one_waits, "one replica building, one waiting", processes, logs)
        holder = next(n for n, url in enumerate(urls) if rebuild_detail(url) == here)
        other = 1 - holder
        assert built_here(urls[holder]) == {"images": PHOTOS, "captions": 0}
        assert built_here(urls[other]) == {"images": 0, "captions": 0}  # it computed nothing

        processes[holder].kill()  # SIGKILL mid-rebuild: its session, and lock, end with it
        processes[holder].wait(timeout=30)
        blocker.rollback()

        complete = f"complete (images {PHOTOS}/{PHOTOS}, captions {total}/{total})"
        wait_for(
            lambda: rebuild_detail(urls[other]) == complete,
            "the other replica finishing the rebuild",
            [processes[other]],
            [logs[other]],
        )
        # Resumed: the images the killed holder stored were not built again.
        assert built_here(urls[other]) == {"images": 0, "captions": total}
        with psycopg.connect(postgres_url) as conn:
            for kind, count in (("images", PHOTOS), ("captions", total)):
                stored = conn.execute(
                    "SELECT count(*) FROM features WHERE namespace = %s",
                    (rerank_namespace(kind, version),),
                ).fetchone()[0]
                assert stored == count
    finally:
        blocker.close()
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_session_lock_is_one_holders_and_ends_with_its_session(postgres_url) -> None:
    """The primitive: one holder at a time; a holder whose session the server ends (as for a
    killed process) holds nothing any more, and another takes the lock."""
    with (
        closing(PostgresDatabase(postgres_url)) as first_db,
        closing(PostgresDatabase(postgres_url)) as second_db,
    ):
        first = SessionLock(first_db, "rerank-tensor-rebuild:m+1")
        second = SessionLock(second_db, "rerank-tensor-rebuild:m+1")
        other_model = SessionLock(second_db, "rerank-tensor-rebuild:m+2")
        try:
            assert first.try_acquire() and first.held()
            assert not second.try_acquire()
            assert other_model.try_acquire()  # another model's rebuild is other work
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                classid, objid = first.key
                ended = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND granted AND classid = %s::oid AND objid = (%s::int4)::oid "
                    "AND objsubid = 2",
                    (classid, objid),
                ).fetchall()
            assert ended == [(True,)]
            deadline = time.monotonic() + 10
            while not second.try_acquire():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert not first.held()
            assert not first.try_acquire()  # reconnects, and waits its turn
            second.release()
            assert first.try_acquire()
        finally:
            for lock in (first, second, other_model):
                lock.close()
