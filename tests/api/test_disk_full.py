"""A full disk under the state directory: checkpoint writes fail with ENOSPC while edits go on.

The state directory is a 4 MiB tmpfs (mounted here; the tests run as root) filled with one big
file until writes fail, then freed by deleting it. The database is an SQLite file on another
disk, as with PostgreSQL or a database volume of its own: what fails is the checkpoint files only
(a full disk under an SQLite file is a database outage, docs/reliability.md). The server's log
also lives outside the tmpfs.

Promises checked: edits submitted while the disk is full are applied and recorded, generation
serves them, /ready stays 200 and reports `checkpoints.writing = "failing"`, the failure counter
and gauge say so, one warning and one `checkpoint_write_failed` event per streak, no partial or
unrecorded file is left and no checkpoint row names a missing or different file; once space
returns the next edit's checkpoint is written, the state clears, and restarts (also one whose
shutdown checkpoint the full disk refused) rebuild the same memory.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
import re
import sqlite3
import subprocess
import time

import pytest

from memoir_core.state import file_sha256
from tests.server import until

FACTS = [(f"The secret code of vault number {i} in the old bank is", f"code {100 + 7 * i}") for i in range(8)]
TMPFS_SIZE = "4m"  # a tiny-model checkpoint is about 0.3 MiB


def mount_tmpfs(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if done.returncode != 0:  # no CAP_SYS_ADMIN (an unprivileged container): nothing to fill safely
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def fill(directory: Path) -> Path:
    """Write one file until the disk refuses more; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    block = b"\0" * (64 * 1024)
    try:
        while True:
            os.write(fd, block)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def metric(server, name: str) -> float:
    text = server.client.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def checkpoints_status(server) -> dict:
    response = server.client.get("/ready")
    assert response.status_code == 200, response.text  # degraded, not down
    return response.json()["checkpoints"]


def query(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


def assert_checkpoints_consistent(database: Path, directory: Path) -> list[int]:
    """Every valid checkpoint row names a whole file with its recorded sha256, every file on disk
    has a row, and no staging file is left; returns the valid rows' seqs."""
    rows = query(database, "SELECT seq, path, sha256 FROM checkpoints WHERE valid ORDER BY seq")
    for seq, path, sha256 in rows:
        assert Path(path).exists(), f"checkpoint row {seq} names a missing file"
        assert file_sha256(path) == sha256, f"checkpoint row {seq} names a file with other bytes"
    on_disk = sorted(str(p) for p in directory.iterdir())
    assert on_disk == sorted(path for _, path, _ in rows), f"files without a row (partial or unrecorded): {on_disk}"
    return [seq for seq, _, _ in rows]


def same_memory(one: dict, other: dict) -> bool:
    return (one["weights_sha256"], one["masks_sha256"]) == (other["weights_sha256"], other["masks_sha256"])


def events(database: Path, action: str) -> list[dict]:
    rows = query(database, f"SELECT detail FROM events WHERE action = '{action}' ORDER BY id")
    return [json.loads(detail) for (detail,) in rows]


def test_a_full_state_disk_fails_checkpoints_not_edits_and_recovers(make_server, tmp_path):
    database = tmp_path / "database" / "memoir.db"
    database.parent.mkdir()
    server = make_server(
        "state",
        env={"MEMOIR_CHECKPOINT_EVERY": "2"},
        database_url=f"sqlite:///{database}",
        start=False,
    )
    server.log_path = tmp_path / "server.log"  # the log must not share the full disk
    mount_tmpfs(server.state_dir)
    directory = server.state_dir / "checkpoints"
    try:
        server.start()
        ids = [server.submit(*fact)["id"] for fact in FACTS[:2]]
        server.wait_idle()
        until(lambda: checkpoints_status(server)["last_written_at"], "no checkpoint at seq 2")
        assert assert_checkpoints_consistent(database, directory) == [2]
        assert checkpoints_status(server)["writing"] == "ok"
        assert metric(server, "memoir:checkpoint_writes_failing") == 0.0

        # ---- the disk fills: edits 3, 4, 5 (checkpoints due at 4, then retried at 5)
        filler = fill(server.state_dir)
        ids += [server.submit(*fact)["id"] for fact in FACTS[2:5]]
        for edit_id in ids:
            assert server.wait_edit(edit_id)["status"] == "applied"
        status = until(lambda: (s := checkpoints_status(server))["failures"] >= 2 and s, "writes never failed")
        assert status["writing"] == "failing" and status["failures"] == 2
        assert "No space left on device" in status["last_error"] and status["failing_since"] is not None
        assert metric(server, "memoir:checkpoint_write_failures_total") == 2.0
        assert metric(server, "memoir:checkpoint_writes_failing") == 1.0
        answer = server.generate(FACTS[3][0], max_new_tokens=4)
        assert answer["edit"] is not None and answer["edit"]["id"] == ids[3]
        served = server.client.get("/state").json()
        assert served["keys"] == ids and served["checkpoints"]["writing"] == "failing"
        assert assert_checkpoints_consistent(database, directory) == [2]  # nothing half-written, no row for 4 or 5
        failed = events(database, "checkpoint_write_failed")
        assert len(failed) == 1 and failed[0]["seq"] == 4 and failed[0]["errno"] == errno.ENOSPC  # once per streak
        assert server.log().count("checkpoint write failed") == 1

        # ---- space returns: the next edit's checkpoint is written and the failing state clears
        filler.unlink()
        ids.append(server.submit(*FACTS[5])["id"])
        server.wait_edit(ids[-1])
        until(lambda: checkpoints_status(server)["writing"] == "ok", "checkpoint writes never recovered")
        status = checkpoints_status(server)
        assert status["failures"] == 2 and status["failing_since"] is None and status["last_written_at"] is not None
        assert metric(server, "memoir:checkpoint_writes_failing") == 0.0
        assert metric(server, "memoir:checkpoint_write_failures_total") == 2.0
        assert assert_checkpoints_consistent(database, directory) == [2, 6]
        assert [e["failures"] for e in events(database, "checkpoint_write_recovered")] == [2]
        assert "checkpoint writes recovered" in server.log()
        expected = server.client.get("/state").json()
        assert expected["keys"] == ids

        server.restart()
        rebuilt = server.client.get("/state").json()
        assert same_memory(rebuilt, expected)

        # ---- full again, and the shutdown checkpoint is refused: the restart applies the delta
        filler = fill(server.state_dir)
        ids.append(server.submit(*FACTS[6])["id"])
        server.wait_edit(ids[-1])
        expected = server.client.get("/state").json()
        server.stop()
        assert "no checkpoint at shutdown" in server.log()
        assert server.log().count("Finished server process") == 2  # a clean exit both times
        server.start()  # on the full disk: a start-up writes nothing there
        rebuilt = server.client.get("/state").json()
        assert rebuilt["keys"] == ids
        assert same_memory(rebuilt, expected)
        assert assert_checkpoints_consistent(database, directory) == [2, 6]
        filler.unlink()
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(server.state_dir)], check=False)


def test_a_state_write_on_a_full_disk_raises_enospc_and_leaves_no_file(tmp_path):
    """memoir_core.state.save_state: safetensors' own error becomes an OSError with its errno, and
    neither the staging file nor the target is left behind."""
    import torch

    from memoir_core.state import save_state

    directory = tmp_path / "disk"
    mount_tmpfs(directory)
    try:
        with pytest.raises(OSError) as raised:
            save_state(directory / "state.safetensors", {"weight": torch.zeros(2 * 1024 * 1024)}, {"format_version": 3})
        assert raised.value.errno == errno.ENOSPC
        assert list(directory.iterdir()) == []
        save_state(directory / "small.safetensors", {"weight": torch.zeros(16)}, {"format_version": 3})
        assert [p.name for p in directory.iterdir()] == ["small.safetensors"]
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
