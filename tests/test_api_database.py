"""The API over a real PostgreSQL primary and streaming replica: /readyz says where reads go
and how far the replica is behind, and a write met by a dead primary is a 503 problem+json with
Retry-After (DatabaseUnavailableError, the same map as every storage error)."""

from __future__ import annotations

import time

import pytest
from postgres_cluster import postgres_available, primary_and_replica
from service_support import make_settings, running_client

from index.errors import DatabaseUnavailableError
from service.api.app import create_app
from service.api.errors import problem_of
from service.runtime.settings import Settings

pytestmark = pytest.mark.skipif(
    not postgres_available(), reason="Debian's PostgreSQL 15 binaries are not installed"
)

WAIT_S = 30.0
WRITE_ROUTE = "/test-only/database-write"


@pytest.fixture(scope="module")
def cluster():
    with primary_and_replica() as servers:
        yield servers


def database_component(client) -> tuple[int, str, dict]:
    answer = client.get("/readyz")
    body = answer.json()
    (database,) = (c for c in body["components"] if c["name"] == "database")
    return answer.status_code, body["status"], database


def wait_for_detail(client, text: str) -> tuple[int, str, dict]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, overall, database = database_component(client)
        if text in database["detail"]:
            return status, overall, database
        if time.monotonic() > deadline:
            raise TimeoutError(f"/readyz never said {text!r}: {database}")
        time.sleep(0.05)


def test_readyz_follows_the_replica_and_the_primary(
    cluster, tmp_path, tiny_retrieval_model, small_grid_extractor
):
    primary, replica = cluster
    settings = make_settings(
        tmp_path / "data", database_url=primary.url, database_read_url=replica.url
    )
    app = create_app(settings, model=tiny_retrieval_model, extractor=small_grid_extractor)

    def write_through_the_router() -> dict:
        router = app.state.service.runtime.read_router
        router.write(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS t (id int)"))
        return {"written": True}

    # A route the service does not have: the one way to send a write through the API's own
    # error handlers before the PostgreSQL stores land.
    app.add_api_route(WRITE_ROUTE, write_through_the_router, methods=["POST"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of the UI's catch-all mount
    with running_client(app) as client:
        status, overall, database = wait_for_detail(client, "reads from the replica")
        assert (status, overall, database["ok"]) == (200, "ready", True)
        assert "0 bytes behind" in database["detail"]
        assert client.post(WRITE_ROUTE).json() == {"written": True}

        replica.kill()
        try:
            status, overall, database = wait_for_detail(client, "replica down")
            assert "reads from the primary" in database["detail"]
            assert (status, overall, database["ok"]) == (200, "ready", True)

            primary.kill()
            try:
                status, overall, database = wait_for_detail(client, "primary down")
                assert (status, overall, database["ok"]) == (503, "unavailable", False)
                answer = client.post(WRITE_ROUTE)
                assert answer.status_code == 503
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.headers["retry-after"] == "2"
                body = answer.json()
                assert body["title"] == "Database unavailable"
                assert "nothing was written" in body["detail"]
                # The replica back, the primary still down: reads work, writes do not.
                replica.start()
                status, overall, database = wait_for_detail(client, "reads from the replica")
                assert (status, overall, database["ok"]) == (200, "degraded", True)
            finally:
                primary.start()
            wait_for_detail(client, "0 bytes behind")
            assert client.post(WRITE_ROUTE).status_code == 200
        finally:
            replica.start()


def test_database_unavailable_maps_to_503_with_retry_after():
    problem = problem_of(DatabaseUnavailableError("primary down", retry_after_s=7))
    assert problem is not None
    assert (problem.status, problem.headers) == (503, {"Retry-After": "7"})


def test_a_read_replica_without_a_primary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set both"):
        Settings(data_dir=tmp_path, database_read_url="postgresql://127.0.0.1:1/x")
