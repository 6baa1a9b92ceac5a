"""results/README.md lists every results file, and every file it lists exists."""

from pathlib import Path
import re

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_every_results_file_is_indexed():
    listed = set(re.findall(r"\[([\w.-]+\.json)\]\(\1\)", (RESULTS / "README.md").read_text()))
    present = {path.name for path in RESULTS.glob("*.json")}
    assert present - listed == set(), "results files missing from results/README.md"
    assert listed - present == set(), "results/README.md lists files that are not there"
