"""Run the real service (`python -m app`) as a subprocess and talk to it over HTTP."""

from __future__ import annotations

import os
import random
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN = "postgresql://root@127.0.0.1:5432/postgres"


def until(condition, what: str, timeout: float = 300):
    """Poll `condition` until it returns something true (returned), or raise TimeoutError(what)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


_HANDED_OUT: set[int] = set()  # ports this process gave to servers and proxies


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that is free now, below the kernel's ephemeral range and never handed out
    before by this process. Asking the kernel for port 0 can give two servers made one after the
    other the same port, and a server's port inside the ephemeral range can be taken by an outgoing
    connection while the server is down for a restart (both seen in bench.chaos)."""
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(20000, _ephemeral_floor())
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


class Server:
    """One service process; `restart()` starts a new process on the same state and database."""

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None, database_url: str | None = None):
        self.state_dir = state_dir
        self.port = free_port()
        self.env = {
            **os.environ,
            "MEMOIR_HOST": "127.0.0.1",
            "MEMOIR_PORT": str(self.port),
            "MEMOIR_STATE_DIR": str(state_dir),
            "PYTHONUNBUFFERED": "1",
            **({"MEMOIR_DATABASE_URL": database_url} if database_url else {}),
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None
        self.log_path = state_dir / f"server-{self.port}.log"
        self.client = httpx.Client(base_url=self.url, timeout=120)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout: float = 300) -> "Server":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                if self.client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-5000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        return self.process.returncode if self.process else None

    def restart(self, wait: bool = True) -> "Server":
        self.stop()
        return self.start(wait)

    # ---- helpers --------------------------------------------------------------------------------

    def submit(self, prompt: str, target: str) -> dict:
        response = self.client.post("/edits", json={"prompt": prompt, "target": target})
        assert response.status_code == 202, response.text
        return response.json()

    def wait_edit(self, edit_id: str, statuses=("applied",), timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            edit = self.client.get(f"/edits/{edit_id}").json()
            if edit["status"] in statuses:
                return edit
            if edit["status"] == "failed":
                raise AssertionError(f"edit failed: {edit}")
            time.sleep(0.1)
        raise TimeoutError(f"edit {edit_id} still {edit['status']}:\n{self.log()[-5000:]}")

    def wait_idle(self, timeout: float = 600) -> None:
        """Until no edit is queued or running and no retraction is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [
                e
                for e in self.client.get("/edits", params={"limit": 1000}).json()["items"]
                if e["status"] in ("queued", "running") or e["retraction_pending"]
            ]
            if not busy:
                return
            time.sleep(0.2)
        raise TimeoutError(f"edits still pending:\n{self.log()[-5000:]}")

    def generate(self, prompt: str, **options) -> dict:
        response = self.client.post("/generate", json={"prompt": prompt, **options})
        assert response.status_code == 200, response.text
        return response.json()


def create_postgres_database() -> str:
    name = f"memoir_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://root@127.0.0.1:5432/{name}"


def drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
