"""Replicas on one PostgreSQL database: one leader trains, followers apply its deltas, failover.

Real server processes on the tiny model, each with its own state directory (as separate pods
would have), on a fresh PostgreSQL database.
"""

from __future__ import annotations

import time

import pytest

from tests.server import create_postgres_database, drop_postgres_database

pytestmark = pytest.mark.postgres

REPLICA_ENV = {
    "MEMOIR_LEADER_POLL_S": "0.3",
    "MEMOIR_FOLLOWER_POLL_S": "1.0",
    "MEMOIR_MIN_EDIT_SEQ_WAIT_S": "1.0",
    "MEMOIR_CHECKPOINT_EVERY": "7",
    "OMP_NUM_THREADS": "1",  # several processes share the cores
    "MEMOIR_EDIT_MAX_ITERATIONS": "12",  # enough for the tiny model's edits; keeps 50 of them short
}


def facts(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"The secret code word of agent {tag}{i} is", "target": f"Word{tag}{i}"} for i in range(n)]


@pytest.fixture
def postgres_url():
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def replicas(make_server, postgres_url):
    """Start replicas (in parallel) on one database; the first started leads."""

    def start(names: list[str]):
        servers = [make_server(name, REPLICA_ENV, postgres_url, start=False) for name in names]
        for server in servers:
            server.start(wait=False)
        for server in servers:
            server.wait_ready()
        return servers

    return start


def state(server) -> dict:
    return server.client.get("/state").json()


def leader_of(servers) -> list:
    return [s for s in servers if s.process.poll() is None and state(s)["replica"]["role"] == "leader"]


def wait_converged(servers, timeout: float = 600) -> dict:
    """Until every live replica serves the same memory with nothing pending; returns that state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [s for s in servers if s.process.poll() is None]
        # the log first, then the memories: states read before an edit turned `applied` would all
        # lack it and still agree (seen under load)
        pending = live[0].client.get("/edits", params={"limit": 1000}).json()["items"]
        busy = [e for e in pending if e["status"] in ("queued", "running") or e["retraction_pending"]]
        states = [state(s) for s in live]
        if not busy and len({(s["weights_sha256"], s["masks_sha256"], tuple(s["keys"])) for s in states}) == 1:
            return states[0]
        time.sleep(0.2)
    raise AssertionError(f"replicas did not converge: {[(s['weights_sha256'][:8], s['replica']) for s in states]}")


def submit_batch(server, edits: list[dict]) -> list[dict]:
    response = server.client.post("/edits", json={"edits": edits})
    assert response.status_code == 202, response.text
    return response.json()["edits"]


def test_three_replicas_serve_one_memory_and_a_late_fourth_catches_up(replicas, make_server, postgres_url):
    servers = replicas(["r0", "r1", "r2"])
    assert len(leader_of(servers)) == 1
    leader = leader_of(servers)[0]
    followers = [s for s in servers if s is not leader]

    # edits submitted to every replica are trained by the leader alone, in seq order
    submitted = []
    for round_ in range(2):
        for i, server in enumerate(servers):
            submitted += submit_batch(server, facts(2, f"{round_}{i}x"))
    seqs = [e["seq"] for e in submitted]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    converged = wait_converged(servers)
    in_seq_order = [e["id"] for e in sorted(submitted, key=lambda e: e["seq"])]
    assert converged["keys"] == in_seq_order
    assert converged["replica"]["settled_seq"] == max(seqs)

    # read your writes on a follower: the answer comes from a memory that holds the edit
    newest = max(submitted, key=lambda e: e["seq"])
    fact = next(f for f in facts(2, "12x") if f["prompt"] == newest["prompt"])
    answer = followers[0].generate(fact["prompt"], max_new_tokens=10, min_edit_seq=newest["seq"])
    assert answer["edit"]["id"] == newest["id"] and answer["edit_seq"] == newest["seq"]
    assert fact["target"] in answer["text"]
    never = followers[1].client.post("/generate", json={"prompt": "Hello", "min_edit_seq": newest["seq"] + 1000})
    assert never.status_code == 422 and "no edit has that seq" in never.json()["detail"]

    # a retraction asked of a follower is done by the leader and reaches every replica
    retracted = submitted[4]
    assert followers[1].client.delete(f"/edits/{retracted['id']}").status_code == 202
    followers[1].wait_edit(retracted["id"], statuses=("retracted",))
    after = wait_converged(servers)
    assert retracted["id"] not in after["keys"] and len(after["keys"]) == len(submitted) - 1
    unedited = followers[0].generate(retracted["prompt"], max_new_tokens=4)
    assert unedited["edit"] is None or unedited["edit"]["id"] != retracted["id"]

    # a fourth replica started after the others (more edits first, past 50) retrains nothing
    late_batch = submit_batch(leader, facts(40, "late"))
    submitted += late_batch
    # asked at once for the last of 40 queued edits, a replica is behind: 503 after a short wait
    behind = followers[0].client.post("/generate", json={"prompt": "Hello", "min_edit_seq": late_batch[-1]["seq"]})
    assert behind.status_code == 503 and behind.headers["retry-after"] == "1"
    assert "min_edit_seq" in behind.json()["detail"]
    before = wait_converged(servers)
    assert len(before["keys"]) >= 50
    late = make_server("r3", REPLICA_ENV, postgres_url)
    ready = late.client.get("/ready").json()
    assert ready["role"] == "follower" and ready["replayed_on_startup"] == 0
    assert wait_converged(servers + [late])["weights_sha256"] == before["weights_sha256"]


def test_leader_killed_while_training_fails_over_without_losing_or_doubling(replicas):
    servers = replicas(["a", "b", "c"])
    leader = leader_of(servers)[0]
    submitted = submit_batch(leader, facts(12, "k"))

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill -9 while an edit is being trained
        running = [e for e in leader.client.get("/edits").json()["items"] if e["status"] == "running"]
        if running and running[0]["seq"] > submitted[1]["seq"]:
            break
        time.sleep(0.02)
    interrupted = running[0]
    leader.kill9()

    survivors = [s for s in servers if s is not leader]
    deadline = time.monotonic() + 60
    while not leader_of(survivors):  # failover: bounded by MEMOIR_LEADER_POLL_S once the lock is free
        assert time.monotonic() < deadline, "no replica took the lead"
        time.sleep(0.2)
    converged = wait_converged(survivors)
    assert converged["keys"] == [e["id"] for e in submitted]  # all, once each, in seq order

    history = survivors[0].client.get(f"/edits/{interrupted['id']}").json()["history"]
    actions = [h["action"] for h in history]
    assert actions.count("applied") == 1 and "requeued" in actions
    statuses = {e["id"]: e["status"] for e in survivors[0].client.get("/edits").json()["items"]}
    assert set(statuses.values()) == {"applied"}

    # the old leader comes back as a follower and reaches the same memory by deltas
    leader.start()
    assert state(leader)["replica"]["role"] == "follower"
    assert wait_converged(servers)["weights_sha256"] == converged["weights_sha256"]


def test_a_cut_off_leader_is_fenced_and_exits(replicas, make_server, postgres_url):
    """The leader loses its database link (its lock goes with it); another replica takes over;
    when the link returns, the old leader's pending write is refused and it stops."""
    from tests.proxy import CuttableProxy

    with CuttableProxy(5432) as proxy:
        proxied = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        old = make_server("old", REPLICA_ENV, proxied)
        assert state(old)["replica"]["role"] == "leader"
        (follower,) = replicas(["new"])
        submitted = submit_batch(old, facts(6, "f"))
        deadline = time.monotonic() + 60
        while not [e for e in old.client.get("/edits").json()["items"] if e["status"] == "running"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proxy.cut()
        deadline = time.monotonic() + 60
        while state(follower)["replica"]["role"] != "leader":
            assert time.monotonic() < deadline, "the follower did not take the lead"
            time.sleep(0.2)
        proxy.restore()
        old.process.wait(60)  # fenced: it exits instead of writing under a stale epoch
        assert old.process.returncode == 3
        assert "no longer the leader" in old.log()
        converged = wait_converged([follower])
        assert converged["keys"] == [e["id"] for e in submitted]


def test_database_outages_keep_the_leader(make_server, postgres_url):
    """Every replica loses the database at once (cut, black-holed, cut again, then once more while
    the leader retrains 40 edits for a retraction): when it returns the leader lock is free, and
    the followers hold back while the leader takes it back, so the lead and its epoch survive every
    outage and the edits and the retraction go on in order. (Without the hold-back the
    fastest-polling replica wins: a hand-over and a fenced restart per blink.)"""
    from tests.proxy import CuttableProxy

    env = {**REPLICA_ENV, "MEMOIR_LEADER_POLL_S": "0.2", "MEMOIR_DATABASE_TIMEOUT_S": "1.5",
           "MEMOIR_LEADER_OUTAGE_GRACE_S": "4"}  # room for a leader on a loaded machine
    with CuttableProxy(5432) as proxy:
        proxied = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        leader = make_server("leader", env, proxied)
        followers = [make_server(f"f{i}", env, proxied) for i in range(2)]
        servers = [leader, *followers]
        epoch = state(leader)["replica"]["epoch"]
        assert epoch is not None and [state(f)["replica"]["role"] for f in followers] == ["follower"] * 2
        submitted = submit_batch(leader, facts(2, "before"))
        wait_converged(servers)
        for round_, fault in enumerate(("cut", "blackhole", "cut")):
            getattr(proxy, fault)()
            time.sleep(2.0)
            proxy.restore()
            deadline = time.monotonic() + 30
            while (response := followers[0].client.post("/edits", json={"edits": facts(1, f"{fault}{round_}")})).status_code == 503:
                assert time.monotonic() < deadline and "retry-after" in response.headers
                time.sleep(0.5)
            assert response.status_code == 202, response.text
            submitted += response.json()["edits"]
            time.sleep(4.0 + 2.0)  # the followers' hold-back, and some
            assert all(s.process.poll() is None for s in servers), "a replica exited"
            assert state(leader)["replica"] == {**state(leader)["replica"], "role": "leader", "epoch": epoch}
            assert [state(f)["replica"]["role"] for f in followers] == ["follower"] * 2
        wait_converged(servers)

        # an outage during a retraction (the worker retrains every later edit, no checkpoint
        # before it, and checks the lock only when done; the lock keeper checks it every second)
        submitted += submit_batch(leader, facts(40, "many"))
        wait_converged(servers)
        first = submitted[0]
        assert leader.client.delete(f"/edits/{first['id']}").status_code == 202
        time.sleep(1.0)  # the worker has read the log and is retraining
        proxy.cut()
        time.sleep(2.0)
        proxy.restore()
        time.sleep(4.0 + 2.0)
        assert all(s.process.poll() is None for s in servers), "a replica exited"
        assert state(leader)["replica"]["epoch"] == epoch
        leader.wait_edit(first["id"], statuses=("retracted",), timeout=600)
        converged = wait_converged(servers)
        kept = [e for e in sorted(submitted, key=lambda e: e["seq"]) if e["id"] != first["id"]]
        assert converged["keys"] == [e["id"] for e in kept]


def test_a_second_process_on_one_sqlite_file_refuses_to_start(make_server, tmp_path):
    first = make_server("shared")
    second = make_server("shared-again", {"MEMOIR_STATE_DIR": str(first.state_dir)}, start=False)
    second.start(wait=False)
    assert second.process.wait(120) == 1
    assert "already served by" in second.log() and "PostgreSQL" in second.log()
    assert first.client.get("/ready").status_code == 200
