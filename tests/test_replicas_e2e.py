"""PostgreSQL mode end to end: three real API processes (`camp-search serve`, the shipped
default model) on one primary with a streaming read replica (both started here from Debian's
binaries), one shared images folder, and Debian's nginx in front with docker/nginx.conf (the
replicas share one name that a test DNS server answers, as compose's DNS does).

The processes are shared by the tests, which run in file order: writes and deletes reach every
replica within 1 s; read-your-writes across replicas by the change sequence; the read replica
killed and restarted under searches; the primary restarted under writes; a replica SIGKILLed
mid-ingest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from dns_server import DnsServer
from postgres_cluster import PostgresServer, current_wal_lsn, postgres_available
from service_support import coco_photos
from test_nginx_replicas import Traffic, wait_for
from ui_stack import API_KEY, NGINX, ApiServer, NginxServer, free_port

from index.corpus import SHA256_NAME
from model.files import TEMP_SUFFIX
from service.api.sequence import MIN_SEQUENCE_HEADER, SEQUENCE_HEADER

# Three model loads on shared cores, then the scenarios: about 80 s on two cores. Not marked
# slow: these are the promises of PostgreSQL mode, so the default suite (and CI) keeps them.
pytestmark = pytest.mark.browser

WRITE_HEADERS = {"X-API-Key": API_KEY}
VISIBLE_WITHIN_S = 1.0  # the bound: acknowledged on one replica, searchable on all
PHOTOS = 40


@dataclass
class Stack:
    primary: PostgresServer
    replica: PostgresServer
    apis: list[ApiServer]
    frontend: NginxServer
    data_dir: Path  # CAMPSEARCH_DATA_DIR of every replica: its images/ folder is shared
    photos: list[tuple[Path, list[str]]]
    acknowledged: dict[int, str] = field(default_factory=dict)  # image id -> first caption
    next_photo: int = 0

    def take_photo(self) -> tuple[Path, list[str]]:
        photo = self.photos[self.next_photo]
        self.next_photo += 1
        return photo


@pytest.fixture(scope="module")
def stack(tmp_path_factory, shared_dir) -> Iterator[Stack]:
    if not Path(NGINX).is_file():
        pytest.skip("nginx is not installed: apt-get install -y nginx (make system-deps)")
    if not postgres_available():
        pytest.skip("no PostgreSQL binaries")
    root = tmp_path_factory.mktemp("e2e")
    primary = PostgresServer.create()
    replica: PostgresServer | None = None
    apis: list[ApiServer] = []
    dns: DnsServer | None = None
    frontend: NginxServer | None = None
    try:
        primary.start()
        replica = PostgresServer.replica_of(primary)
        port = free_port()
        data_dir = root / "shared"
        settings = {
            "CAMPSEARCH_DATA_DIR": str(data_dir),
            "CAMPSEARCH_DATABASE_URL": primary.url,
            "CAMPSEARCH_DATABASE_READ_URL": replica.url,
        }
        hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        for n, host in enumerate(hosts):
            api = ApiServer(root / f"api{n}", host=host, port=port, settings=settings)
            api.workdir.mkdir()
            apis.append(api)
        for api in apis:
            api.start(wait_ready=False)
        for api in apis:
            api.wait_ready()
        dns = DnsServer({"api": hosts}).start()
        frontend = NginxServer(root / "nginx", f"api:{port}", resolver=dns.address).start()
        yield Stack(primary, replica, apis, frontend, data_dir, coco_photos(shared_dir, PHOTOS))
    finally:
        if frontend is not None:
            frontend.stop()
        if dns is not None:
            dns.stop()
        for api in apis:
            api.stop()
        if replica is not None:
            replica.remove()
        primary.remove()


def upload(url: str, photo: tuple[Path, list[str]], timeout_s: float = 120) -> httpx.Response:
    path, captions = photo
    return httpx.post(
        f"{url}/v1/images",
        files={"file": (path.name, path.read_bytes(), "image/jpeg")},
        data={"captions": captions[:2]},
        headers=WRITE_HEADERS,
        timeout=timeout_s,
    )


def applied_sequence(api: ApiServer) -> int:
    info = httpx.get(f"{api.url}/v1/info", timeout=10).json()
    return int(info["database"]["applied_sequence"])


def seconds_until_applied(apis: list[ApiServer], sequence: int, timeout_s: float = 10.0) -> float:
    """From now until every replica's indexes hold every change up to `sequence`."""
    start = time.monotonic()
    waiting = list(apis)
    while waiting:
        waiting = [api for api in waiting if applied_sequence(api) < sequence]
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{[api.url for api in waiting]} did not apply {sequence}")
    return time.monotonic() - start


def search_ids(url: str, text: str, headers: dict[str, str] | None = None) -> list[int]:
    answer = httpx.post(
        f"{url}/v1/search/images", json={"text": text, "limit": 50}, headers=headers, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return [hit["id"] for hit in answer.json()["results"]]


def database_component(api: ApiServer) -> dict:
    ready = httpx.get(f"{api.url}/readyz", timeout=10).json()
    return next(c for c in ready["components"] if c["name"] == "database")


def test_a_write_and_a_delete_reach_every_replica_within_a_second(stack):
    # The replica serves reads once it has replayed what the three starts wrote (its lag is
    # unknown until it replays a sampled primary position), then it stays on it.
    wait_for(
        lambda: "reads from the replica" in database_component(stack.apis[0])["detail"],
        "reads on the read replica",
        timeout_s=30,
    )
    component = database_component(stack.apis[0])
    assert component["ok"] and "reads from the replica" in component["detail"]
    assert "applied change sequence" in component["detail"]
    assert "password" not in component["detail"]

    added = upload(stack.frontend.url, stack.take_photo())
    assert added.status_code == 201, added.text
    image_id, sequence = added.json()["id"], int(added.headers[SEQUENCE_HEADER])
    assert seconds_until_applied(stack.apis, sequence) < VISIBLE_WITHIN_S
    caption = added.json()["captions"][0]["text"]
    for api in stack.apis:
        assert image_id in search_ids(api.url, caption)

    deleted = httpx.delete(
        f"{stack.frontend.url}/v1/images/{image_id}", headers=WRITE_HEADERS, timeout=30
    )
    assert deleted.status_code == 204, deleted.text
    assert seconds_until_applied(stack.apis, int(deleted.headers[SEQUENCE_HEADER])) < (
        VISIBLE_WITHIN_S
    )
    for api in stack.apis:
        assert image_id not in search_ids(api.url, caption)
        assert httpx.get(f"{api.url}/v1/images/{image_id}", timeout=10).status_code == 404


def test_a_replica_reads_another_replicas_write_by_its_sequence(stack):
    writer, reader = stack.apis[0], stack.apis[1]
    added = upload(writer.url, stack.take_photo())
    assert added.status_code == 201, added.text
    image_id = added.json()["id"]
    stack.acknowledged[image_id] = added.json()["captions"][0]["text"]
    # At once, on the other replica: the search waits until it applied the write.
    wait = {MIN_SEQUENCE_HEADER: added.headers[SEQUENCE_HEADER]}
    assert image_id in search_ids(reader.url, stack.acknowledged[image_id], wait)
    record = httpx.get(f"{reader.url}/v1/images/{image_id}", timeout=10)
    assert record.status_code == 200 and record.json()["id"] == image_id


def test_searches_answer_while_the_read_replica_is_killed_and_restarted(stack):
    with Traffic(stack.frontend.url) as traffic:
        traffic.wait_for_answers(20)
        stack.replica.kill()
        traffic.wait_for_answers(30)
        wait_for(
            lambda: "reads from the primary" in database_component(stack.apis[0])["detail"],
            "reads moved to the primary",
            timeout_s=10,
        )
        traffic.wait_for_answers(20)
        stack.replica.start()
        wait_for(
            lambda: all(
                "reads from the replica" in database_component(api)["detail"] for api in stack.apis
            ),
            "reads back on the restarted replica",
            timeout_s=60,
        )
        traffic.wait_for_answers(20)
    assert traffic.failures == []
    assert len(traffic.answers) >= 90


def test_the_primary_restarted_refuses_writes_clearly_and_loses_nothing(stack):
    stack.replica.wait_replayed(current_wal_lsn(stack.primary))
    photo = stack.take_photo()
    stack.primary.kill()  # a crash: fsync on, nothing committed may be lost
    try:
        refused = upload(stack.frontend.url, photo)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["title"] == "Database unavailable"
        # Searches still answer: their reads go to the read replica.
        _, captions = photo
        assert (
            httpx.post(
                f"{stack.frontend.url}/v1/search/images", json={"text": captions[0]}, timeout=60
            ).status_code
            == 200
        )
    finally:
        stack.primary.start()
    # A client honouring Retry-After gets through once the primary is back.
    deadline = time.monotonic() + 60
    while True:
        answer = upload(stack.frontend.url, photo)
        if answer.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(float(answer.headers["Retry-After"]))
    assert answer.status_code == 201, answer.text
    stack.acknowledged[answer.json()["id"]] = answer.json()["captions"][0]["text"]
    seconds_until_applied(stack.apis, int(answer.headers[SEQUENCE_HEADER]))
    with psycopg.connect(stack.primary.url) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM images")}
    assert set(stack.acknowledged) <= stored


class UploadStream:
    """Uploads one photo after another to one replica until it stops answering."""

    def __init__(self, stack: Stack, url: str) -> None:
        self.stack = stack
        self.url = url
        self.acknowledged: dict[int, str] = {}
        self.error = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.stack.next_photo < len(self.stack.photos):
            try:
                answer = upload(self.url, self.stack.take_photo(), timeout_s=60)
            except httpx.TransportError as error:
                self.error = f"{type(error).__name__}: {error}"
                return
            if answer.status_code == 201:
                self.acknowledged[answer.json()["id"]] = answer.json()["captions"][0]["text"]
            else:
                self.error = f"{answer.status_code}: {answer.text}"
                return

    def __enter__(self) -> UploadStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=120)


def test_a_replica_killed_mid_ingest_keeps_every_acknowledged_photo(stack):
    victim, survivors = stack.apis[2], stack.apis[:2]
    with UploadStream(stack, victim.url) as stream:
        wait_for(lambda: len(stream.acknowledged) >= 3 or stream.error, "3 acknowledged uploads")
        time.sleep(0.3)  # the next upload is on its way (extraction, file, commit)
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
    assert len(stream.acknowledged) >= 3, stream.error
    stack.acknowledged.update(stream.acknowledged)

    with psycopg.connect(stack.primary.url) as conn:
        sequence = conn.execute("SELECT max(seq) FROM changes").fetchone()[0]
    seconds_until_applied(survivors, sequence)
    for api in survivors:
        for image_id in stack.acknowledged:
            assert httpx.get(f"{api.url}/v1/images/{image_id}", timeout=10).status_code == 200
        found = set(search_ids(api.url, "a photo"))
        assert set(stack.acknowledged) <= found

    # Nothing half written: no catalog row without its vectors, no vectors without a row.
    with psycopg.connect(stack.primary.url) as conn:
        for table in ("images", "captions"):
            without = conn.execute(
                f"SELECT count(*) FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM features f "
                f"WHERE f.item_id = t.id AND f.namespace LIKE 'pooled:{table}:%%')"
            ).fetchone()[0]
            orphaned = conn.execute(
                f"SELECT count(*) FROM features f WHERE f.namespace LIKE 'pooled:{table}:%%' "
                f"AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.id = f.item_id)"
            ).fetchone()[0]
            assert (table, without, orphaned) == (table, 0, 0)

    # Restarted, the replica finds every acknowledged photo, and its orphan sweep leaves no
    # photo file without a catalog row (only a young temp file of the cut-off upload may stay:
    # the sweep removes those once an hour old, as another replica's write may be in flight).
    victim.start()
    with psycopg.connect(stack.primary.url) as conn:
        referenced = {row[0] for row in conn.execute("SELECT stored_path FROM images")}
        count = conn.execute("SELECT count(*) FROM images").fetchone()[0]
    for image_id in stack.acknowledged:
        assert httpx.get(f"{victim.url}/v1/images/{image_id}", timeout=10).status_code == 200
    info = httpx.get(f"{victim.url}/v1/info", timeout=10).json()
    assert info["corpus"]["images"] == count
    assert set(stack.acknowledged) <= set(search_ids(victim.url, "a photo"))
    files = [path for path in (stack.data_dir / "images").rglob("*") if path.is_file()]
    assert files
    stray = [
        path for path in files if path.relative_to(stack.data_dir).as_posix() not in referenced
    ]
    assert all(path.name.endswith(TEMP_SUFFIX) for path in stray), stray
    assert all(
        SHA256_NAME.match(path.name) for path in files if not path.name.endswith(TEMP_SUFFIX)
    )
