"""bench.chaos for two minutes, as CI runs it: three tiny-model replicas on PostgreSQL under mixed
traffic while leaders and followers are killed, the database is cut, black-holed and flapped,
checkpoints are corrupted and (as root) state directories fill up. The promises hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server import REPO

pytestmark = pytest.mark.postgres


def test_two_minutes_of_chaos_lose_reorder_and_duplicate_nothing():
    done = subprocess.run(
        # one submitter keeps the edit count (and the final retraining check) small enough for CI
        [sys.executable, "-m", "bench.chaos", "--minutes", "2", "--seed", "1", "--submitters", "1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.stdout.strip(), done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["accepted"] > 30 and result["applied"] > 0
    assert (result["lost"], result["duplicated"], result["reordered"], result["wrong_status"]) == (0, 0, 0, 0)
    assert result["hashes_equal"] and result["fresh_rebuild_equal"] and result["retrained_equal"]
    assert result["responses_500"] == 0 and result["responses_503_without_retry_after"] == 0, result["unexpected"]
    assert result["edits_refused_4xx"] == 0, result["unexpected"]
    # the run did meet faults, several kinds of them, and clients met 503s while they lasted
    assert sum(result["faults"].values()) >= 8 and len(result["faults"]) >= 4, result["faults"]
    assert any(code.endswith(" 503") for code in result["responses"]), result["responses"]
    assert done.returncode == 0
