"""The corpus in PostgreSQL mode: one transaction per write, replicas that follow the database's
changes (LISTEN/NOTIFY + catch-up by sequence), the change-sequence ordering rule."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest

from index.corpus import Corpus, NewCaption, pooled_namespace, regions_namespace
from index.errors import StorageError
from index.postgres import CHANGES_LOCK, DatabaseUnavailableError, PostgresDatabase

DIM = 16
OPTIONS = {"dim": DIM, "extractor": "grid", "extractor_version": "v1", "model_version": "m1"}
REPLICA_DEADLINE_S = 1.0


def _add(corpus: Corpus, n: int, rng: np.random.Generator, captions: int = 2):
    return corpus.add_image(
        f"image-{n}".encode() * 10,
        width=64,
        height=48,
        region_features=rng.standard_normal((49, 24)),
        region_boxes=rng.random((49, 4)),
        pooled=rng.standard_normal(DIM),
        captions=[
            NewCaption(f"caption {n}.{c}", [1, 4 + c, 2], rng.standard_normal(DIM))
            for c in range(captions)
        ],
        extension=".jpg",
        rerank={"regions": rng.standard_normal((49, 8)).astype(np.float16)},
    )


def _open(tmp_path, url: str, **options) -> Corpus:
    return Corpus.open(tmp_path / "shared", database_url=url, **OPTIONS, **options)


def _eventually(predicate, timeout_s: float) -> float | None:
    """Seconds until `predicate` held, or None when `timeout_s` passed first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def _top_image(corpus: Corpus, vector: np.ndarray) -> int:
    _, ids = corpus.search_images(vector[None], 1)
    return int(ids[0, 0])


@pytest.fixture
def replicas(tmp_path, postgres_url):
    first = _open(tmp_path, postgres_url)
    second = _open(tmp_path, postgres_url)
    yield first, second
    first.close()
    second.close()


def test_round_trip_in_one_transaction(tmp_path, postgres_url):
    rng = np.random.default_rng(0)
    with _open(tmp_path, postgres_url) as corpus:
        added = [_add(corpus, n, rng) for n in range(5)]
        first = added[0]
        assert first.created and (corpus.data_dir / first.image.stored_path).is_file()
        pooled = corpus.get_pooled("images", [first.image.id])[first.image.id]
        assert _top_image(corpus, pooled) == first.image.id
        regions = corpus.get_region_features([first.image.id, 99_999])
        assert list(regions) == [first.image.id]
        assert regions[first.image.id].features.shape == (49, 24)
        assert set(corpus.get_rerank_tensors("images", [first.image.id])) == {first.image.id}
        assert corpus.captions_of(first.image.id) == list(first.captions)
        assert corpus.count_images() == 5 and corpus.count_captions() == 10
        again = _add(corpus, 0, np.random.default_rng(5))
        assert not again.created and again.image == first.image
        sequence = corpus.written_sequence
        assert sequence > 0

        assert corpus.delete_image(first.image.id)
        assert corpus.get_image(first.image.id) is None
        assert not (corpus.data_dir / first.image.stored_path).exists()
        assert corpus.get_region_features([first.image.id]) == {}
        assert first.image.id not in corpus.indexes["images"]
        assert all(c.id not in corpus.indexes["captions"] for c in first.captions)
        assert corpus.written_sequence > sequence
    with psycopg.connect(postgres_url) as conn:  # the delete removed every stored record
        rows = conn.execute(
            "SELECT count(*) FROM features WHERE item_id = %s AND namespace LIKE '%%images%%'",
            (first.image.id,),
        ).fetchone()
        assert rows[0] == 0
        kinds = conn.execute("SELECT kind, op, count(*) FROM changes GROUP BY 1, 2").fetchall()
        assert sorted(kinds) == [
            ("captions", "add", 10),
            ("captions", "delete", 2),
            ("images", "add", 5),
            ("images", "delete", 1),
        ]
    # A fresh replica builds its indexes from the database (there are no index files).
    with _open(tmp_path, postgres_url) as reopened:
        assert len(reopened.indexes["images"]) == 4
        assert len(reopened.indexes["captions"]) == 8
        assert reopened.applied_sequence == corpus.written_sequence
        assert not (tmp_path / "shared" / "index").exists()


def test_failed_transaction_leaves_nothing(tmp_path, postgres_url):
    """A write whose transaction fails (here: a caption of an image that does not exist)
    stores no row, feature or change."""
    rng = np.random.default_rng(1)
    with _open(tmp_path, postgres_url) as corpus:
        image = _add(corpus, 0, rng, captions=0).image
        with psycopg.connect(postgres_url) as conn:
            before = conn.execute(
                "SELECT (SELECT count(*) FROM features), (SELECT count(*) FROM changes)"
            ).fetchone()
        with pytest.raises(StorageError):
            corpus.add_captions(
                [NewCaption("orphan", [1, 2], rng.standard_normal(DIM))], image_id=image.id + 50
            )
        with psycopg.connect(postgres_url) as conn:
            after = conn.execute(
                "SELECT (SELECT count(*) FROM features), (SELECT count(*) FROM changes)"
            ).fetchone()
        assert after == before
        assert corpus.count_captions() == 0


def test_a_duplicate_refused_inside_a_pipelined_write_leaves_nothing(tmp_path, postgres_url):
    """A write's transaction is sent as one pipeline: when a statement in it fails (here:
    another writer committed these bytes first), the statements after it and the COMMIT are
    not run, the error is the duplicate, nothing is stored, and the connection serves the
    next write."""
    from index.catalog import CaptionRecord, ImageRecord
    from index.postgres import DuplicateImageError

    rng = np.random.default_rng(11)
    with _open(tmp_path, postgres_url) as corpus:
        first = _add(corpus, 0, rng).image
        with psycopg.connect(postgres_url) as conn:
            before = conn.execute(
                "SELECT (SELECT count(*) FROM features), (SELECT count(*) FROM changes), "
                "(SELECT count(*) FROM captions)"
            ).fetchone()
        (image_id,) = corpus.catalog.allocate_ids("images", 1)
        (caption_id,) = corpus.catalog.allocate_ids("captions", 1)
        duplicate = ImageRecord(image_id, first.sha256, first.stored_path, 64, 48, 0.0)
        caption = CaptionRecord(caption_id, image_id, "again", (1, 2), 0.0)
        features = {pooled_namespace("images", "m1"): {image_id: {"vector": np.ones(DIM)}}}
        with pytest.raises(DuplicateImageError):
            corpus.catalog.insert([duplicate], [caption], features=features)
        with psycopg.connect(postgres_url) as conn:
            after = conn.execute(
                "SELECT (SELECT count(*) FROM features), (SELECT count(*) FROM changes), "
                "(SELECT count(*) FROM captions)"
            ).fetchone()
        assert after == before
        assert _add(corpus, 1, rng).created
        assert corpus.count_images() == 2


def test_round_trips_of_an_ingest_and_of_a_search_read(tmp_path, postgres_url):
    """An ingest is at most six round trips to the server (content lock, sha256 lookup, two
    id draws, the pipelined transaction, unlock) and a search's read of its hits one, counted
    from libpq's protocol trace (bench/postgres_stores.py counts the same way)."""
    from bench.postgres_stores import RoundTrips

    rng = np.random.default_rng(12)
    with RoundTrips(tmp_path) as trips, _open(tmp_path, postgres_url) as corpus:
        corpus.follower.stop()  # its polls share the pool: count the caller's work alone
        # Pooled connections open and statements prepared (psycopg prepares one, with a round
        # trip of its own, on its 5th run on a connection; the pool takes turns between them).
        for n in range(12):
            _add(corpus, n, rng)
        trips.take()
        added = [_add(corpus, n, rng).image.id for n in range(12, 17)]
        ingest = trips.take() / len(added)
        images = corpus.get_images(added)
        read = trips.take()
    assert sorted(images) == added
    assert 1 <= ingest <= 6
    assert read == 1


def test_a_caption_committed_while_a_delete_waits_goes_with_its_image(tmp_path, postgres_url):
    """Another writer's caption of the image commits while the delete waits for the image's
    row lock (the caption's foreign key holds it): the delete still deletes that caption's
    features and records its delete change (the caption ids are read after the lock)."""
    rng = np.random.default_rng(13)
    namespace = pooled_namespace("captions", "m1")
    with _open(tmp_path, postgres_url) as corpus, psycopg.connect(postgres_url) as other:
        image = _add(corpus, 0, rng, captions=1).image
        late = other.execute(
            "INSERT INTO captions (id, image_id, text, token_ids, created) "
            "VALUES (nextval('caption_ids'), %s, 'late', '{1}', 0) RETURNING id",
            (image.id,),
        ).fetchone()[0]
        other.execute(
            "INSERT INTO features (namespace, item_id, payload) VALUES (%s, %s, 'x')",
            (namespace, late),
        )
        deleted: list[bool] = []
        thread = threading.Thread(target=lambda: deleted.append(corpus.delete_image(image.id)))
        thread.start()
        with psycopg.connect(postgres_url, autocommit=True) as watch:
            waiting = _eventually(
                lambda: (
                    watch.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    ).fetchone()[0]
                    == 1
                ),
                5.0,
            )
        assert waiting is not None, "the delete never waited for the image's row lock"
        other.commit()
        thread.join(10)
        assert deleted == [True]
        with psycopg.connect(postgres_url) as conn:
            left = conn.execute(
                "SELECT count(*) FROM features WHERE namespace = %s AND item_id = %s",
                (namespace, late),
            ).fetchone()[0]
            change = conn.execute(
                "SELECT count(*) FROM changes WHERE kind = 'captions' AND item_id = %s "
                "AND op = 'delete'",
                (late,),
            ).fetchone()[0]
        assert (left, change) == (0, 1)


def test_add_and_delete_reach_the_other_replica_within_a_second(replicas):
    first, second = replicas
    rng = np.random.default_rng(2)
    added = _add(first, 0, rng)
    vector = first.get_pooled("images", [added.image.id])[added.image.id]
    seen = _eventually(lambda: _top_image(second, vector) == added.image.id, REPLICA_DEADLINE_S)
    assert seen is not None, "the add did not reach the other replica within 1 s"
    assert all(c.id in second.indexes["captions"] for c in added.captions)
    assert second.get_region_features([added.image.id])  # read from the shared database

    assert second.delete_image(added.image.id)  # deleted on the OTHER replica
    gone = _eventually(lambda: added.image.id not in first.indexes["images"], REPLICA_DEADLINE_S)
    assert gone is not None, "the delete did not reach the first replica within 1 s"
    assert all(c.id not in first.indexes["captions"] for c in added.captions)
    assert first.get_region_features([added.image.id]) == {}
    assert first.applied_sequence == second.written_sequence


def test_read_your_writes_by_sequence(replicas):
    first, second = replicas
    added = _add(first, 0, np.random.default_rng(3))
    sequence = first.written_sequence
    assert second.wait_for_sequence(sequence, timeout_s=2.0)
    assert added.image.id in second.indexes["images"]
    assert not second.wait_for_sequence(sequence + 1_000, timeout_s=0.2)  # never committed


def test_missed_notification_is_caught_up_by_sequence(replicas, postgres_url):
    """The listen connection is killed on the server (its notifications are lost); what was
    committed meanwhile still reaches the replica through the catch-up by sequence."""
    first, second = replicas
    follower = second.follower
    assert _eventually(lambda: follower.listen_backend_pid is not None, 5.0) is not None
    pid = follower.listen_backend_pid
    reconnects = follower.reconnects
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    rng = np.random.default_rng(4)
    added = [_add(first, n, rng) for n in range(3)]
    caught_up = _eventually(lambda: all(a.image.id in second.indexes["images"] for a in added), 5.0)
    assert caught_up is not None
    assert _eventually(lambda: follower.reconnects > reconnects, 5.0) is not None
    assert follower.listen_backend_pid != pid


def test_polling_alone_delivers_changes(tmp_path, postgres_url):
    """No notification at all (a follower that never hears one): the poll by sequence applies
    the change within its interval."""
    rng = np.random.default_rng(5)
    with _open(tmp_path, postgres_url) as writer, _open(tmp_path, postgres_url) as reader:
        reader.follower.stop()  # replace the follower by one whose LISTEN hears nothing
        from index.follower import ChangeFollower

        follower = ChangeFollower(reader, poll_interval_s=0.3)
        follower._connect = lambda: None  # no LISTEN connection: only the poll remains
        follower.start()
        try:
            added = _add(writer, 0, rng)
            assert _eventually(lambda: added.image.id in reader.indexes["images"], 2.0)
            assert follower.notifications == 0
        finally:
            follower.stop()


def test_change_sequences_follow_commit_order(postgres_url):
    """Sequence numbers are drawn under the changes lock held until commit: a writer that
    draws later commits later, so no follower can read N+1 before N is visible."""
    database = PostgresDatabase(postgres_url)
    try:
        held = threading.Event()
        release = threading.Event()

        def slow_writer():
            with database.write_transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
                conn.execute(
                    "INSERT INTO changes (seq, kind, item_id, op) "
                    "VALUES (nextval('change_seq'), 'images', 1, 'add')"
                )
                held.set()
                release.wait(5)

        thread = threading.Thread(target=slow_writer)
        thread.start()
        assert held.wait(5)
        from index.postgres import record_changes

        done = threading.Event()

        def fast_writer():
            with database.write_transaction() as conn:
                record_changes(conn, [("images", 2, "add")])
            done.set()

        second = threading.Thread(target=fast_writer)
        second.start()
        time.sleep(0.3)
        assert not done.is_set(), "a second writer drew a sequence while the first was open"
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute("SELECT count(*) FROM changes").fetchone()[0] == 0
        release.set()
        thread.join(5)
        second.join(5)
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute("SELECT seq, item_id FROM changes ORDER BY seq").fetchall()
        assert [item for _, item in rows] == [1, 2]
    finally:
        database.close()


def test_concurrent_writers_on_two_replicas_converge(replicas):
    """Writers on both replicas at once: every change gets a distinct sequence in commit
    order and both replicas end with the same indexes as the catalog."""
    first, second = replicas
    errors: list[BaseException] = []

    def write(corpus: Corpus, offset: int) -> None:
        rng = np.random.default_rng(offset)
        try:
            for n in range(offset, offset + 15):
                added = _add(corpus, n, rng, captions=1)
                if n % 5 == 0:
                    corpus.delete_image(added.image.id)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=write, args=(corpus, offset))
        for corpus, offset in ((first, 0), (second, 100), (first, 200), (second, 300))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    catalog_images = set(first.catalog.image_ids().tolist())
    catalog_captions = set(first.catalog.caption_ids().tolist())
    assert len(catalog_images) == 48
    final = first.catalog.sequence

    def converged(corpus: Corpus) -> bool:
        return (
            corpus.applied_sequence == final
            and set(corpus.indexes["images"].ids().tolist()) == catalog_images
            and set(corpus.indexes["captions"].ids().tolist()) == catalog_captions
        )

    assert _eventually(lambda: converged(first) and converged(second), 5.0) is not None
    with first.database.primary_connection() as conn:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM changes ORDER BY seq")]
    assert len(seqs) == len(set(seqs))


def test_writes_refused_while_the_database_is_down(tmp_path, postgres_url):
    """Connections killed and refused: a write raises DatabaseUnavailableError (503) and leaves
    nothing; once the database answers again, writes succeed."""
    rng = np.random.default_rng(6)
    with _open(tmp_path, postgres_url) as corpus:
        _add(corpus, 0, rng)
        name = psycopg.conninfo.conninfo_to_dict(postgres_url)["dbname"]
        admin = postgres_url.rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        try:
            with pytest.raises(DatabaseUnavailableError):
                _add(corpus, 1, rng)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        # The pool reconnects in the background (with backoff): a retrying writer gets through.
        deadline = time.monotonic() + 30
        while True:
            try:
                _add(corpus, 2, rng)
                break
            except DatabaseUnavailableError:
                assert time.monotonic() < deadline, "writes did not resume within 30 s"
                time.sleep(0.5)
        assert corpus.count_images() == 2  # the refused write left nothing


def test_features_are_the_codec_bytes(tmp_path, postgres_url):
    """PostgreSQL holds the same `index.codec` records as LMDB and Redis."""
    from index.codec import decode_arrays

    rng = np.random.default_rng(7)
    with _open(tmp_path, postgres_url) as corpus:
        added = _add(corpus, 0, rng, captions=1)
        with psycopg.connect(postgres_url) as conn:
            payload = conn.execute(
                "SELECT payload FROM features WHERE namespace = %s AND item_id = %s",
                (regions_namespace("grid", "v1"), added.image.id),
            ).fetchone()[0]
            pooled = conn.execute(
                "SELECT payload FROM features WHERE namespace = %s AND item_id = %s",
                (pooled_namespace("captions", "m1"), added.captions[0].id),
            ).fetchone()[0]
        assert bytes(payload[:4]) == b"CSA1"
        assert decode_arrays(payload)["features"].dtype == np.float16
        assert decode_arrays(pooled)["vector"].shape == (DIM,)


def test_orphan_photo_files_are_swept_under_their_content_lock(tmp_path, postgres_url):
    """At open, a photo file no catalog row references (a commit that never happened) is
    removed; files of committed images and unrelated names are kept."""
    rng = np.random.default_rng(8)
    with _open(tmp_path, postgres_url) as corpus:
        kept = _add(corpus, 0, rng, captions=0).image
    orphan_sha = "ab" * 32
    orphan = tmp_path / "shared" / "images" / "ab" / f"{orphan_sha}.jpg"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"never committed")
    fresh_temp = orphan.parent / f".{orphan_sha}.jpg.x1.tmp"  # another replica's write, now
    fresh_temp.write_bytes(b"in flight")
    with _open(tmp_path, postgres_url) as reopened:
        assert reopened.recovery.orphan_files == 1
        assert not orphan.exists()
        assert fresh_temp.exists()
        assert (reopened.data_dir / kept.stored_path).is_file()


def test_items_without_a_vector_of_this_model_are_reported(tmp_path, postgres_url):
    rng = np.random.default_rng(9)
    with _open(tmp_path, postgres_url) as corpus:
        _add(corpus, 0, rng)
    other = {**OPTIONS, "model_version": "m2"}
    with Corpus.open(tmp_path / "shared", database_url=postgres_url, **other) as replica:
        assert replica.recovery.missing_pooled == {"images": 1, "captions": 2}
        assert len(replica.indexes["images"]) == 0


def test_database_settings():
    from pydantic import ValidationError

    from service.runtime.settings import Settings

    settings = Settings(
        database_url="postgresql://app:secret@db/campsearch",
        database_read_url="postgresql://app:secret@replica/campsearch",
    )
    assert settings.database == "postgresql://app:secret@db/campsearch"
    assert "secret" not in repr(settings)
    assert Settings().database is None
    with pytest.raises(ValidationError, match="postgresql://"):
        Settings(database_url="mysql://db/campsearch")


def test_stacked_vectors_match_one_decode_each():
    from index.codec import decode_arrays, encode_arrays
    from index.postgres import stacked_vectors

    rng = np.random.default_rng(10)
    vectors = rng.standard_normal((50, DIM)).astype(np.float32)
    same = [encode_arrays({"vector": v}) for v in vectors]
    np.testing.assert_array_equal(stacked_vectors(same, "vector"), vectors)
    # Records of another layout (a second array, first or last) take the one-by-one path.
    mixed = [encode_arrays({"vector": v, "extra": np.ones(DIM, np.float32)}) for v in vectors]
    mixed[3] = encode_arrays({"extra": np.ones(2, np.float32), "vector": vectors[3]})
    np.testing.assert_array_equal(stacked_vectors(mixed, "vector"), vectors)
    assert decode_arrays(mixed[3])["vector"].shape == (DIM,)


def test_a_trained_index_is_shared_so_later_replicas_do_not_train(
    tmp_path, postgres_url, monkeypatch
):
    from index.shortlist import ShortlistIndex

    rng = np.random.default_rng(11)
    options = {"caption_factory": "IVF4,Flat"}  # trains once 4 x 39 vectors are there
    with _open(tmp_path, postgres_url, **options) as writer:
        writer.add_captions(
            [NewCaption(f"text {n}", [1, n], rng.standard_normal(DIM)) for n in range(200)]
        )
    with _open(tmp_path, postgres_url, **options) as first:  # trains, and shares the result
        assert first.indexes["captions"].is_trained
        query = rng.standard_normal((3, DIM)).astype(np.float32)
        expected = first.search_captions(query, 5)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT kind, factory FROM index_templates").fetchall() == [
            ("captions", "IVF4,Flat")
        ]

    def no_training(self):
        raise AssertionError("a replica trained although a template was shared")

    monkeypatch.setattr(ShortlistIndex, "_train_from_buffer", no_training)
    with _open(tmp_path, postgres_url, **options) as later:
        assert later.indexes["captions"].is_trained and len(later.indexes["captions"]) == 200
        scores, ids = later.search_captions(query, 5)
        np.testing.assert_array_equal(ids, expected[1])
        np.testing.assert_allclose(scores, expected[0], rtol=1e-5)


def test_a_replica_behind_the_pruned_change_log_rebuilds(tmp_path, postgres_url):
    """The log keeps changes for a retention period; a replica whose applied sequence is
    behind the pruned horizon cannot catch up change by change, so it rebuilds from the
    tables and ends equal to the catalog."""
    from index.follower import ChangeFollower

    rng = np.random.default_rng(12)
    with _open(tmp_path, postgres_url) as writer, _open(tmp_path, postgres_url) as lagging:
        lagging.follower.stop()  # offline while the others write and prune
        added = [_add(writer, n, rng) for n in range(6)]
        writer.delete_image(added[0].image.id)
        assert writer.catalog.prune_changes(0.0) == 6 * 3 + 3
        assert writer.catalog.change_horizon() == writer.written_sequence
        assert added[1].image.id not in lagging.indexes["images"]

        follower = ChangeFollower(lagging)
        lagging.follower = follower
        follower.start()
        expected_images = set(writer.catalog.image_ids().tolist())
        expected_captions = set(writer.catalog.caption_ids().tolist())
        assert _eventually(lambda: follower.rebuilds == 1, 5.0) is not None
        assert set(lagging.indexes["images"].ids().tolist()) == expected_images
        assert set(lagging.indexes["captions"].ids().tolist()) == expected_captions
        assert lagging.applied_sequence >= writer.written_sequence
        # And it follows normally from there.
        later = _add(writer, 99, rng)
        assert _eventually(lambda: later.image.id in lagging.indexes["images"], 2.0)
        assert follower.rebuilds == 1


def test_status_shows_the_database_without_its_password(tmp_path, postgres_url):
    from index.postgres import redacted_url

    assert redacted_url("postgresql://app:s3cret@db:5432/cs") == "postgresql://app:***@db:5432/cs"
    assert redacted_url("postgresql://app@db/cs") == "postgresql://app@db/cs"
    with _open(tmp_path, postgres_url) as corpus:
        _add(corpus, 0, np.random.default_rng(13))
        status = corpus.status()
        assert status["database"]["url"] == redacted_url(postgres_url)
        assert status["database"]["applied_sequence"] == corpus.written_sequence
        assert status["images"] == 1


def test_rebuilt_tensors_are_stored_only_for_items_that_exist(tmp_path, postgres_url):
    """The tensor rebuild's writes (`put_rerank_tensors`) lock the catalog rows they keep, so
    an item deleted meanwhile (on any replica) is skipped and nothing is left unowned."""
    from index.corpus import rerank_namespace

    rng = np.random.default_rng(14)
    with _open(tmp_path, postgres_url, tensor_version="t2") as corpus:
        images = [_add(corpus, n, rng, captions=1).image.id for n in range(3)]
        assert corpus.ids_without_rerank_tensors("images").tolist() == []  # stored with them
        corpus.delete_image(images[0])
        tensors = {"regions": rng.standard_normal((49, 8)).astype(np.float16)}
        stored = corpus.put_rerank_tensors("images", {i: tensors for i in images})
        assert stored == 2
        assert sorted(corpus.store.ids(rerank_namespace("images", "t2")).tolist()) == images[1:]
        assert corpus.drop_region_features() == 2  # their tensors are stored
        assert corpus.get_region_features(images[1:]) == {}
