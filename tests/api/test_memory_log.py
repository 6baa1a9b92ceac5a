"""The memory log's payloads in a blob store: a local directory and a real S3 HTTP endpoint (moto's
standalone server, the code path a MinIO or AWS deployment uses), put-then-commit under kill -9,
blobs whose bytes differ refused, compaction and pruning behind a lagging replica.

Real server processes on the tiny model; SQLite or a fresh PostgreSQL database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import boto3
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from app.services.blobs import LOG_PREFIX, BlobUnusable, LocalBlobs, S3Blobs, decode, encode
from tests.proxy import CuttableProxy
from tests.server import create_postgres_database, drop_postgres_database, free_port, until

BUCKET = "memoir-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a loopback port, and the environment that points boto3 at it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # this process's boto3 clients (the test's own view of the bucket)
    client = boto3.client("s3")

    def bucket_made():
        try:
            client.create_bucket(Bucket=BUCKET)
            return True
        except Exception:  # not listening yet
            return False

    until(bucket_made, "moto's S3 server to answer", timeout=60)
    yield env
    process.terminate()
    process.wait(timeout=30)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def postgres_url():
    """Requested before make_server, so the servers stop before their database is dropped."""
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalBlobs(tmp_path / "blobs")
    request.getfixturevalue("s3_endpoint")
    return S3Blobs(f"s3://{BUCKET}/{request.node.name.replace('[', '-').strip(']')}")


def test_a_blob_store_keeps_payloads_exactly_and_refuses_what_is_not_a_blob(store):
    rng = np.random.default_rng(0)
    payloads = [
        rng.standard_normal(4096).astype(np.float32).tobytes() + b"header",  # a length that is no multiple of 4
        b"",
        bytes(range(256)) * 3,
    ]
    for number, payload in enumerate(payloads):
        store.put(f"{LOG_PREFIX}{number}", encode(payload))
    assert sorted(store.keys(LOG_PREFIX)) == [f"{LOG_PREFIX}{n}" for n in range(3)]
    assert [decode(store.get(f"{LOG_PREFIX}{n}")) for n in range(3)] == payloads
    columns = rng.standard_normal((128, 64)).astype(np.float32).tobytes()
    assert len(encode(columns)) < len(columns)  # float32 columns shrink once their bytes are grouped
    store.delete(f"{LOG_PREFIX}1")
    with pytest.raises(BlobUnusable):
        store.get(f"{LOG_PREFIX}1")
    with pytest.raises(BlobUnusable):
        decode(b"not a blob at all")
    with pytest.raises(BlobUnusable):
        decode(encode(payloads[0])[:-40])  # truncated


def memory_log(server) -> list[dict]:
    url = server.env.get("MEMOIR_DATABASE_URL") or f"sqlite:///{server.state_dir / 'memoir.db'}"
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT position, kind, payload IS NOT NULL AS inline, blob_key, payload_size, payload_sha256 "
                    "FROM memory_log ORDER BY position"
                )
            )
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def s3_keys(prefix: str) -> set[str]:
    return {key for key in S3Blobs(f"s3://{BUCKET}/{prefix}").keys(LOG_PREFIX)}


def facts(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"The vault number of courier {tag}{i} is", "target": f"Vault{tag}{i}"} for i in range(n)]


def submit(server, edits: list[dict]) -> list[str]:
    response = server.client.post("/edits", json={"edits": edits})
    assert response.status_code == 202, response.text
    return [edit["id"] for edit in response.json()["edits"]]


def served(server) -> tuple[str, str, tuple]:
    state = server.client.get("/state").json()
    return state["weights_sha256"], state["masks_sha256"], tuple(state["keys"])


COMPACTING = {"MEMOIR_COMPACT_EVERY_EDITS": "3", "MEMOIR_LOG_RETENTION_S": "0", "MEMOIR_CHECKPOINT_EVERY": "1000"}


def test_deltas_go_to_s3_compaction_prunes_them_and_a_restart_rebuilds_without_training(make_server, s3_endpoint):
    prefix = "compaction"
    env = {**s3_endpoint, **COMPACTING, "MEMOIR_BLOB_URL": f"s3://{BUCKET}/{prefix}"}
    server = make_server("leader", env)
    submit(server, facts(7, "c"))
    server.wait_idle()
    before = served(server)

    rows = memory_log(server)
    kinds = [row["kind"] for row in rows]
    assert kinds == ["state", "edit", "edit", "edit", "state", "edit", "edit", "edit", "state", "edit"]
    newest_state = max(row["position"] for row in rows if row["kind"] == "state")
    for row in rows:
        if row["position"] < newest_state:  # pruned: the row keeps order, size and hash, not the bytes
            assert not row["inline"] and row["blob_key"] is None and row["payload_size"] is not None
        else:  # the newest whole state and the delta after it: in S3, never in the row
            assert not row["inline"] and row["blob_key"].startswith(LOG_PREFIX) and row["payload_size"] > 4096
    assert s3_keys(prefix) == {row["blob_key"] for row in rows if row["blob_key"]}

    # a restart without checkpoints reaches the same memory from the whole state and one delta
    server.kill9()
    for checkpoint in (server.state_dir / "checkpoints").glob("*"):
        checkpoint.unlink()
    server.restart()
    assert served(server) == before
    assert server.client.get("/ready").json()["replayed_on_startup"] == 0

    # a blob whose bytes are not the recorded ones is refused: the leader retrains from the edit log
    last = rows[-1]
    S3Blobs(f"s3://{BUCKET}/{prefix}").put(last["blob_key"], encode(b"\0" * last["payload_size"]))
    server.kill9()
    for checkpoint in (server.state_dir / "checkpoints").glob("*"):
        checkpoint.unlink()
    server.restart()
    assert served(server) == before
    assert server.client.get("/ready").json()["replayed_on_startup"] == 7
    assert "differs from its recorded SHA-256" in server.log()


@pytest.mark.postgres
def test_a_blob_put_before_a_commit_that_never_came_is_an_orphan_the_next_leader_sweeps(
    postgres_url, make_server, s3_endpoint
):
    """kill -9 between the blob's put and its row's commit: the blob is in S3 without a row (never a
    row without its blob); the restart trains the edit again and records it once, and sweeps
    blobs that no row names."""
    with CuttableProxy(5432) as proxy:
        proxied = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        prefix = "orphans"
        env = {
            **s3_endpoint,
            "MEMOIR_BLOB_URL": f"s3://{BUCKET}/{prefix}",
            "MEMOIR_DATABASE_TIMEOUT_S": "2",
            # a slow edit: the database is black-holed while it trains, before its record
            "MEMOIR_EDIT_MAX_ITERATIONS": "250",
            "MEMOIR_EDIT_LR": "1e-6",
        }
        server = make_server("leader", env, proxied)
        first_keys = s3_keys(prefix)
        [edit_id] = submit(server, facts(1, "o"))
        until(lambda: server.client.get(f"/edits/{edit_id}").json()["status"] == "running", "the edit to run")
        proxy.blackhole()
        until(lambda: len(s3_keys(prefix)) > len(first_keys), "the delta's blob to be put", timeout=600)
        server.kill9()
        proxy.restore()
        orphan = (s3_keys(prefix) - first_keys).pop()
        assert orphan not in {row["blob_key"] for row in memory_log(server)}
        planted = f"{LOG_PREFIX}{'0' * 64}"  # as a leader fenced mid-put would leave
        S3Blobs(f"s3://{BUCKET}/{prefix}").put(planted, encode(b"orphan"))

        server.restart()
        server.wait_edit(edit_id)
        rows = memory_log(server)
        assert [row["kind"] for row in rows] == ["state", "edit"]
        assert s3_keys(prefix) == {row["blob_key"] for row in rows if row["blob_key"]}  # the planted one is gone
        assert rows[1]["blob_key"] == orphan  # trained again to the same bytes: the same content address


@pytest.mark.postgres
def test_a_replica_that_lagged_behind_pruning_goes_on_from_the_newest_whole_state(
    postgres_url, make_server, s3_endpoint
):
    prefix = "lagging"
    env = {
        **s3_endpoint,
        **COMPACTING,
        "MEMOIR_BLOB_URL": f"s3://{BUCKET}/{prefix}",
        "MEMOIR_LEADER_POLL_S": "0.3",
        "MEMOIR_FOLLOWER_POLL_S": "0.5",
        "OMP_NUM_THREADS": "1",
    }
    leader = make_server("leader", env, postgres_url)
    follower = make_server("follower", env, postgres_url)
    submit(leader, facts(1, "a"))
    leader.wait_idle()
    until(lambda: served(follower) == served(leader), "the follower to follow")
    os.kill(follower.process.pid, signal.SIGSTOP)  # a live replica that falls behind
    try:
        submit(leader, facts(6, "b"))
        leader.wait_idle()
        rows = memory_log(leader)
        assert sum(row["blob_key"] is None and row["kind"] == "edit" for row in rows) >= 3  # pruned
    finally:
        os.kill(follower.process.pid, signal.SIGCONT)
    until(lambda: served(follower) == served(leader), "the lagging follower to catch up", timeout=120)
    assert "going on from the whole state" in follower.log()
    fresh = make_server("fresh", env, postgres_url)  # a new replica starts from the newest whole state
    assert served(fresh) == served(leader)
    assert fresh.client.get("/ready").json()["replayed_on_startup"] == 0
