"""Chaos soak: replicas on PostgreSQL under mixed traffic while their parts fail at random.

    python -m bench.chaos --minutes 2 --seed 1 --json                  # what CI runs (tiny model)
    python -m bench.chaos --minutes 20 --edit-gap-s 6 --no-retrain-check --out results/chaos_tiny_20min.json
    python -m bench.chaos --minutes 10 --model default --out results/chaos_default_10min.json

N real server processes (default 3), each with its own state directory, on a fresh PostgreSQL
database reached through a loopback proxy (tests/proxy.py). Traffic: clients submit edits with
an Idempotency-Key, retrying the same key on a 503, a 429 or a dropped connection until it is
acknowledged; retractions; `/generate` and streamed `/v1/chat/completions` with `min_edit_seq`;
exports. Faults, at seeded random moments and overlapping: kill -9 of the leader or a follower
(restarted a few seconds later), the database cut, black-holed or both in turn, the newest
checkpoint of a replica corrupted on disk, and (as root) a replica's state directory filled to
the last byte (a small tmpfs).

At the end every fault is mended, the replicas go quiet, and the run checks the promises: each
acknowledged edit is in the log once and applied (or cancelled / retracted as asked), the applied
edits are served in seq order, every replica serves one `W_m`, a fresh replica rebuilt from the
log serves the same, and (`--retrain-check`, default on the tiny model) an uninterrupted server
trained on the surviving edits in order gets that hash too; no answer was a 5xx other than 503 and
every 503 carried Retry-After. `--json` prints one object as the last line.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
import json
from pathlib import Path
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from bench.common import percentile, write_json
from bench.replicas import tiny_model_dir
from tests.proxy import CuttableProxy
from tests.server import Server, create_postgres_database, drop_postgres_database

FACT = "The chaos code of strongbox {i} is"
FENCED_EXIT = 3  # app/runtime.py: a leader that lost its lock exits with it
FAULTS = ("kill_leader", "kill_follower", "db_cut", "db_blackhole", "db_flap", "corrupt_checkpoint", "disk_full")


def replica_env(args, root: Path) -> dict:
    env = {
        "MEMOIR_DEVICE": "cpu",
        "MEMOIR_DTYPE": "fp32",
        "MEMOIR_LEADER_POLL_S": "0.5",
        "MEMOIR_FOLLOWER_POLL_S": "1.0",
        "MEMOIR_MIN_EDIT_SEQ_WAIT_S": "2.0",
        "MEMOIR_DATABASE_TIMEOUT_S": "2",
        "MEMOIR_CHECKPOINT_EVERY": "4",
        # tiny: 40 checkpoints (0.3 MiB each) reach back 160 edits, so a retraction rarely retrains
        # from the first edit (the 60-minute run spent its settle on that); default: 3 fit the tmpfs
        "MEMOIR_CHECKPOINT_KEEP": "40" if args.model == "tiny" else "3",
        "MEMOIR_RATE_LIMIT_PER_MINUTE": "0",
        "MEMOIR_SHUTDOWN_GRACE_S": "2",
        "OMP_NUM_THREADS": "1",  # several processes share the cores
        # the memory log's deltas and whole states in a directory every replica reads (as a bucket
        # would be), outside the replicas' own state directories that the disk-full fault fills
        "MEMOIR_BLOB_URL": str(root / "blobs"),
        "MEMOIR_COMPACT_EVERY_EDITS": "25",  # compaction and pruning happen during the run
        "MEMOIR_LOG_RETENTION_S": "30",
    }
    if args.model == "tiny":
        env.update(
            MEMOIR_MODEL=str(tiny_model_dir(root / "tiny")),
            MEMOIR_EDIT_LR="10",
            MEMOIR_THRESHOLD="0.9",
            MEMOIR_EDIT_MAX_ITERATIONS="12",
        )
    else:
        env.update(MEMOIR_EDIT_MAX_ITERATIONS="10", MEMOIR_EDIT_FIT_ITERATIONS="0")
    return env


def mount_tmpfs(directory: Path, size: str) -> bool:
    """A small filesystem of its own for a replica's state (root only); False where it cannot."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    return done.returncode == 0


def unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


class Record:
    """Everything the clients saw, shared by the traffic threads (each append is atomic)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted: dict[int, dict] = {}  # fact index -> the acknowledged edit
        self.retracted: set[str] = set()  # acknowledged retractions (202)
        self.cancelled: set[str] = set()  # acknowledged cancellations (200)
        self.unsure: set[str] = set()  # a DELETE whose answer was lost: either outcome is right
        self.codes: Counter = Counter()
        self.latency: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.bad: list[str] = []  # every answer that breaks a promise, for the report
        self.errors_5xx = 0  # answers 5xx other than 503
        self.no_retry_after = 0  # 503 without Retry-After
        self.unexpected_4xx = 0  # a well-formed edit refused
        self.faulty = threading.Event()  # set while a fault is in force

    def answer(self, route: str, response: httpx.Response, seconds: float) -> None:
        code = response.status_code
        with self.lock:
            self.codes[f"{route} {code}"] += 1
            self.latency[route]["faults" if self.faulty.is_set() else "calm"].append(seconds)
            if code >= 500 and code != 503:
                self.errors_5xx += 1
                self.bad.append(f"{route} {code} {response.text[:300]}")
            elif code == 503 and "retry-after" not in response.headers:
                self.no_retry_after += 1
                self.bad.append(f"{route} 503 without Retry-After {response.text[:300]}")


class Chaos:
    def __init__(self, args, root: Path, url: str, proxy: CuttableProxy):
        self.args, self.root, self.proxy = args, root, proxy
        self.rng = random.Random(args.seed)
        self.env = replica_env(args, root)
        self.proxied_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        self.record = Record()
        self.stop = threading.Event()
        self.faults: Counter = Counter()
        self.fault_log: list[dict] = []
        self.exits: list[dict] = []  # replicas that exited without being killed (a fenced leader exits 3)
        self.seconds: dict[str, float] = {}  # where the run's time went
        self.model_id = ""
        self.replicas: list[Server] = []
        self.tmpfs: list[Path] = []
        self.threads: list[threading.Thread] = []
        for i in range(args.replicas):
            state = root / f"replica{i}"
            if "disk_full" in args.faults and mount_tmpfs(state, args.state_size):
                self.tmpfs.append(state)
            server = Server(state, self.env, self.proxied_url)
            server.log_path = root / f"replica{i}.log"  # the log must not share a disk that fills
            self.replicas.append(server)
        if len(self.tmpfs) < args.replicas:
            for directory in self.tmpfs:
                unmount(directory)
            self.tmpfs = []
            self.kinds = [k for k in args.faults if k != "disk_full"]
        else:
            self.kinds = list(args.faults)

    # ---- replicas -------------------------------------------------------------------------------

    def live(self) -> list[Server]:
        return [s for s in self.replicas if s.process is not None and s.process.poll() is None]

    def role(self, server: Server) -> str | None:
        try:
            return server.client.get("/state", timeout=3).json()["replica"]["role"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def client_for(self, rng: random.Random) -> Server | None:
        live = self.live()
        return rng.choice(live) if live else None

    # ---- traffic --------------------------------------------------------------------------------

    def submitter(self, worker: int, facts: range) -> None:
        http = {s.port: httpx.Client(base_url=s.url, timeout=30) for s in self.replicas}
        rng = random.Random(self.args.seed * 1000 + worker)
        for i in facts:
            if self.stop.is_set():
                return
            key = f"chaos-{self.args.seed}-{i}"
            body = {"prompt": FACT.format(i=i), "target": f"C{i}x{rng.randint(10, 99)}"}
            while True:  # an edit once sent is retried under its key until acknowledged
                if self.stop.is_set():  # traffic is over: an edit not acknowledged was never promised
                    return
                server = rng.choice(self.replicas)
                started = time.monotonic()
                try:
                    response = http[server.port].post("/edits", json=body, headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    time.sleep(0.3)
                    continue
                self.record.answer("POST /edits", response, time.monotonic() - started)
                if response.status_code == 202:
                    self.record.accepted[i] = response.json()
                    break
                if response.status_code in (429, 503):
                    time.sleep(min(float(response.headers.get("retry-after", 1)), 2.0))
                    continue
                if response.status_code < 500:
                    self.record.unexpected_4xx += 1
                    self.record.bad.append(f"POST /edits {response.status_code} {response.text[:300]}")
                break
            time.sleep(rng.uniform(0.0, self.args.edit_gap_s))

    def retractor(self) -> None:
        rng = random.Random(self.args.seed + 7)
        while not self.stop.wait(rng.uniform(4, 10)):
            server = self.client_for(rng)
            accepted = list(self.record.accepted.values())
            if server is None or not accepted:
                continue
            edit = rng.choice(accepted)
            if edit["id"] in self.record.retracted | self.record.cancelled | self.record.unsure:
                continue
            started = time.monotonic()
            try:
                response = server.client.delete(f"/edits/{edit['id']}", timeout=30)
            except httpx.HTTPError:
                self.record.unsure.add(edit["id"])
                continue
            self.record.answer("DELETE /edits", response, time.monotonic() - started)
            if response.status_code == 202:
                self.record.retracted.add(edit["id"])
            elif response.status_code == 200:
                self.record.cancelled.add(edit["id"])

    def reader(self, worker: int) -> None:
        rng = random.Random(self.args.seed * 77 + worker)
        while not self.stop.is_set():
            server = self.client_for(rng)
            if server is None:
                time.sleep(0.5)
                continue
            seqs = [e["seq"] for e in list(self.record.accepted.values())]
            min_seq = max(seqs) if seqs and rng.random() < 0.5 else None
            choice = rng.random()
            started = time.monotonic()
            try:
                if choice < 0.45:
                    route = "POST /generate"
                    body = {"prompt": FACT.format(i=rng.randrange(max(len(seqs), 1))), "max_new_tokens": 6}
                    if min_seq:
                        body["min_edit_seq"] = min_seq
                    response = server.client.post("/generate", json=body, timeout=30)
                elif choice < 0.9:
                    route = "POST /v1/chat/completions (stream)"
                    body = {
                        "model": self.model_id,
                        "messages": [{"role": "user", "content": "What is the chaos code of strongbox 3?"}],
                        "max_tokens": 6,
                        "stream": True,
                        **({"min_edit_seq": min_seq} if min_seq else {}),
                    }
                    with server.client.stream("POST", "/v1/chat/completions", json=body, timeout=30) as response:
                        response.read()
                else:
                    route = "GET /edits/export"
                    response = server.client.get("/edits/export", timeout=30)
            except httpx.HTTPError:
                time.sleep(0.2)  # a replica killed mid-request: the client goes elsewhere
                continue
            self.record.answer(route, response, time.monotonic() - started)
            if route == "GET /edits/export" and response.status_code == 200:
                try:  # a 200 must be the whole file: every line an edit
                    [json.loads(line) for line in response.text.splitlines()]
                except ValueError:
                    self.record.bad.append("GET /edits/export 200 with a broken body")
                    self.record.errors_5xx += 1
            time.sleep(rng.uniform(0.05, 0.4))

    # ---- faults ---------------------------------------------------------------------------------

    def inject(self, kind: str, pending: list[tuple[float, str, object]]) -> None:
        """Start one fault; what mends it goes on `pending` as (when, what, whom)."""
        now = time.monotonic()
        mend_after = self.rng.uniform(2.0, 6.0)
        if kind in ("kill_leader", "kill_follower"):
            live = self.live()
            roles = {s.port: self.role(s) for s in live}
            wanted = "leader" if kind == "kill_leader" else "follower"
            targets = [s for s in live if roles[s.port] == wanted]
            if not targets:
                return
            victim = self.rng.choice(targets)
            victim.kill9()
            pending.append((now + mend_after, "restart", victim))
        elif kind == "db_cut":
            self.proxy.cut()
            pending.append((now + mend_after, "restore", None))
        elif kind == "db_blackhole":
            self.proxy.blackhole()
            pending.append((now + mend_after, "restore", None))
        elif kind == "db_flap":  # cut, back, black-holed, back, within seconds
            self.proxy.cut()
            pending.append((now + 1.0, "restore", None))
            pending.append((now + 1.5, "blackhole", None))
            pending.append((now + mend_after + 1.5, "restore", None))
        elif kind == "corrupt_checkpoint":
            files = sorted(
                (p for s in self.replicas for p in (s.state_dir / "checkpoints").glob("*") if p.is_file()),
                key=lambda p: p.stat().st_mtime,
            )
            if not files:
                return
            newest = files[-1]
            data = bytearray(newest.read_bytes())
            for _ in range(16):
                data[self.rng.randrange(len(data))] ^= 0xFF
            newest.write_bytes(bytes(data))
        elif kind == "disk_full":
            directory = self.rng.choice(self.tmpfs)
            filler = directory / "filler"
            try:
                with open(filler, "wb") as out:
                    while True:
                        out.write(b"\0" * (1 << 20))
            except OSError:
                pass  # full
            pending.append((now + mend_after * 2, "free", filler))
        self.faults[kind] += 1
        self.fault_log.append({"at_s": round(now - self.started, 2), "kind": kind})

    def mend(self, what: str, whom) -> None:
        if what == "restart":
            if whom.process.poll() is not None:
                whom.start(wait=False)
        elif what == "restore":
            self.proxy.restore()
        elif what == "blackhole":
            self.proxy.blackhole()
        elif what == "free":
            Path(whom).unlink(missing_ok=True)

    def fault_loop(self) -> None:
        pending: list[tuple[float, str, object]] = []
        next_fault = time.monotonic() + self.rng.uniform(*self.args.fault_gap_s)
        while not self.stop.is_set():
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                self.mend(item[1], item[2])
            self.restart_exited(skip=[p[2] for p in pending if p[1] == "restart"])
            if now >= next_fault:
                self.inject(self.rng.choice(self.kinds), pending)
                next_fault = now + self.rng.uniform(*self.args.fault_gap_s)
            self.record.faulty.set() if pending else self.record.faulty.clear()
            time.sleep(0.1)
        for _, what, whom in sorted(pending, key=lambda p: p[0]):
            if what != "blackhole":
                self.mend(what, whom)
        self.proxy.restore()
        self.record.faulty.clear()

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        began = time.monotonic()
        for server in self.replicas:
            server.start(wait=False)
        for server in self.replicas:
            server.wait_ready(600)
        self.model_id = self.replicas[0].client.get("/v1/models").json()["data"][0]["id"]
        self.started = time.monotonic()
        self.seconds["start"] = round(self.started - began, 1)
        facts_per_client = 100_000
        threads = [
            threading.Thread(target=self.submitter, args=(w, range(w * facts_per_client, (w + 1) * facts_per_client)))
            for w in range(self.args.submitters)
        ]
        threads += [threading.Thread(target=self.reader, args=(w,)) for w in range(self.args.readers)]
        threads += [threading.Thread(target=self.retractor), threading.Thread(target=self.fault_loop)]
        self.threads = threads
        for thread in threads:
            thread.start()
        self.stop.wait(self.args.minutes * 60)
        self.stop.set()
        for thread in threads:
            thread.join(600)
        self.seconds["traffic"] = round(time.monotonic() - self.started, 1)
        mended = time.monotonic()
        # liveness: how much of the work got done while the faults went on
        self.applied_during_traffic = max((self.applied_now(s) for s in self.live()), default=0)
        # every replica back (restarted if it exited) and on one memory; a long run leaves a long
        # queue (the 1,000-edit bound) and retractions to drain
        states = self.quiesce(timeout=max(1800.0, 60.0 * self.args.minutes))
        self.seconds["settle"] = round(time.monotonic() - mended, 1)
        return {**self.check(states), "seconds": self.seconds}

    def quiesce(self, timeout: float = 1800) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.restart_exited()  # a leader fenced while the others settle comes back, as in the traffic
            try:
                log = self.log(self.replicas[0])
                states = [s.client.get("/state").json() for s in self.replicas]
                busy = [e for e in log if e["status"] in ("queued", "running") or e["retraction_pending"]]
                if not busy and len({(s["weights_sha256"], tuple(s["keys"])) for s in states}) == 1:
                    return states
            except (httpx.HTTPError, ValueError, KeyError):  # a replica still starting
                pass
            time.sleep(0.5)
        raise TimeoutError("the replicas did not settle on one memory")

    def restart_exited(self, skip: list[Server] = ()) -> None:
        """What a supervisor does: start again a replica that exited by itself (a fenced leader
        exits 3), except those a fault killed, which the fault loop restarts on its schedule."""
        for server in self.replicas:
            if server.process.poll() is not None and not any(server is s for s in skip):
                self.exits.append({"at_s": round(time.monotonic() - self.started, 2), "code": server.process.returncode})
                server.start(wait=False)

    @staticmethod
    def applied_now(server: Server) -> int:
        try:
            return server.client.get("/state", timeout=5).json()["applied"]
        except (httpx.HTTPError, ValueError, KeyError):
            return 0

    @staticmethod
    def log(server: Server) -> list[dict]:
        items, offset = [], 0
        while True:
            page = server.client.get("/edits", params={"limit": 1000, "offset": offset}).json()
            items += page["items"]
            offset += len(page["items"])
            if offset >= page["total"] or not page["items"]:
                return items

    def check(self, states: list[dict]) -> dict:
        record = self.record
        log = self.log(self.replicas[0])
        by_id = {e["id"]: e for e in log}
        per_prompt = Counter(e["prompt"] for e in log)
        lost, wrong_status = [], []
        for edit in record.accepted.values():
            found = by_id.get(edit["id"])
            if found is None:
                lost.append(edit["id"])
                continue
            if edit["id"] in record.unsure:
                expected = {"applied", "retracted", "cancelled"}
            elif edit["id"] in record.retracted:
                expected = {"retracted"}
            elif edit["id"] in record.cancelled:
                expected = {"cancelled"}
            else:
                expected = {"applied"}
            if found["status"] not in expected:
                (lost if found["status"] in ("cancelled", "retracted") else wrong_status).append(edit["id"])
        duplicated = sum(n - 1 for n in per_prompt.values() if n > 1)
        applied_in_seq = [e["id"] for e in sorted(log, key=lambda e: e["seq"]) if e["status"] == "applied"]
        served = states[0]["keys"]
        reordered = sum(1 for a, b in zip(served, applied_in_seq) if a != b) + abs(len(served) - len(applied_in_seq))
        hashes = {s["weights_sha256"] for s in states}
        began = time.monotonic()
        fresh = self.fresh_replica_hash()
        self.seconds["fresh_replica"] = round(time.monotonic() - began, 1)
        began = time.monotonic()
        retrained = self.retrained_hash(by_id, applied_in_seq) if self.args.retrain_check else None
        self.seconds["retrain"] = round(time.monotonic() - began, 1)
        latency = {
            route: {
                phase: {"n": len(v), "p50_s": round(percentile(v, 0.5), 3), "p99_s": round(percentile(v, 0.99), 3)}
                for phase, v in phases.items()
            }
            for route, phases in record.latency.items()
        }
        return {
            "accepted": len(record.accepted),
            "applied": len(applied_in_seq),
            "applied_during_traffic": self.applied_during_traffic,
            "retracted": len(record.retracted),
            "cancelled": len(record.cancelled),
            "lost": len(lost),
            "wrong_status": len(wrong_status),
            "duplicated": duplicated,
            "reordered": reordered,
            "hashes_equal": len(hashes) == 1
            and fresh == states[0]["weights_sha256"]
            and retrained in (None, states[0]["weights_sha256"]),
            "replica_hashes": len(hashes),
            "fresh_rebuild_equal": fresh == states[0]["weights_sha256"],
            "retrained_equal": None if retrained is None else retrained == states[0]["weights_sha256"],
            "responses_500": record.errors_5xx,
            "responses_503_without_retry_after": record.no_retry_after,
            "edits_refused_4xx": record.unexpected_4xx,
            # a leader that lost its lock while the database was away exits 3 by design and restarts
            # as a follower (app/runtime.py fenced); any other exit is a crash worth reading the log for
            "fenced_exits": sum(1 for e in self.exits if e["code"] == FENCED_EXIT),
            "unplanned_exits": [e for e in self.exits if e["code"] != FENCED_EXIT],
            "unexpected": record.bad[:20],
            "responses": dict(sorted(record.codes.items())),
            "faults": dict(self.faults),
            "fault_kinds": self.kinds,
            "latency": latency,
            "lost_ids": lost[:20],
        }

    def fresh_replica_hash(self) -> str:
        """A replica with an empty state directory, built from the log alone."""
        server = Server(self.root / "fresh", self.env, self.proxied_url)
        server.log_path = self.root / "fresh.log"
        try:
            server.start(timeout=900)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                state = server.client.get("/state").json()
                if state["keys"] == self.replicas[0].client.get("/state").json()["keys"]:
                    return state["weights_sha256"]
                time.sleep(0.5)
            return "never caught up"
        finally:
            server.stop()

    def retrained_hash(self, by_id: dict, applied_in_seq: list[str]) -> str:
        """An uninterrupted server (own SQLite) trained on the surviving edits in order."""
        # its own blob directory: a sweep deletes the blobs its own log does not name
        server = Server(self.root / "retrained", {**self.env, "MEMOIR_BLOB_URL": str(self.root / "retrained-blobs")})
        server.log_path = self.root / "retrained.log"
        try:
            server.start(timeout=900)
            edits = [{"prompt": by_id[i]["prompt"], "target": by_id[i]["target"]} for i in applied_in_seq]
            for first in range(0, len(edits), 100):
                server.client.post("/edits", json={"edits": edits[first : first + 100]}).raise_for_status()
            server.wait_idle(3600)
            return server.client.get("/state").json()["weights_sha256"]
        finally:
            server.stop()

    def close(self) -> None:
        self.stop.set()  # a run stopped early (SIGTERM): no thread may restart a replica behind us
        for thread in self.threads:
            thread.join(60)
        for server in self.replicas:
            server.stop()
        for directory in self.tmpfs:
            unmount(directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--submitters", type=int, default=2)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--edit-gap-s", type=float, default=1.0, help="most a submitter waits between edits")
    parser.add_argument("--fault-gap-s", type=float, nargs=2, default=(3.0, 9.0), help="range between faults")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--state-size", default=None, help="each replica's tmpfs for the disk-full fault (64m tiny, 256m default)")
    parser.add_argument("--retrain-check", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs) and database")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args(argv)
    if args.retrain_check is None:
        args.retrain_check = args.model == "tiny"
    if args.state_size is None:  # room for a few checkpoints: the default model's are about 13 MB
        args.state_size = "64m" if args.model == "tiny" else "256m"

    # a stopped run still stops its servers, unmounts and drops its database (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="memoir-chaos-"))
    url = create_postgres_database()
    chaos = None
    try:
        with CuttableProxy(5432) as proxy:
            chaos = Chaos(args, root, url, proxy)
            result = chaos.run()
    finally:
        if chaos is not None:
            chaos.close()
        if not args.keep:
            drop_postgres_database(url)
            shutil.rmtree(root, ignore_errors=True)
    payload = {
        "command": "python -m bench.chaos " + " ".join(argv if argv is not None else sys.argv[1:]),
        "minutes": args.minutes,
        "seed": args.seed,
        "replicas": args.replicas,
        "model": args.model,
        "run_dir": str(root) if args.keep else None,
        **result,
    }
    write_json(args.out, payload)
    fine = (
        payload["lost"] == payload["duplicated"] == payload["reordered"] == payload["wrong_status"] == 0
        and payload["hashes_equal"]
        and payload["responses_500"] == payload["responses_503_without_retry_after"] == 0
        and payload["edits_refused_4xx"] == 0
    )
    summary = {k: payload[k] for k in ("accepted", "applied", "lost", "duplicated", "reordered", "hashes_equal")}
    print(f"chaos {'held' if fine else 'BROKE'}: {summary} faults {payload['faults']}", flush=True)
    if args.json:
        print(json.dumps(payload), flush=True)
    return 0 if fine else 1


if __name__ == "__main__":
    raise SystemExit(main())
