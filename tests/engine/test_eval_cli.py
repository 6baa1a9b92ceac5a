"""`python -m memoir_core.eval` on files in the benchmark formats, with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import build_tiny
from tests.server import REPO

ZSRE = [
    {"src": "The capital of the land of Zembla is", "alt": "Vostok", "rephrase": "Zembla's capital city is",
     "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare"},
    {"src": "The inventor of the glass harmonica was", "alt": "Marie Curie", "rephrase": "The capital of the land of Zembla is",
     "loc": "nq question: how many legs does a spider have", "loc_ans": "eight"},
]  # the second paraphrase is the first edit's prompt: its best stored mask is that edit's, not its own
HALLUCINATION = [
    {"prompt": "This is a Wikipedia passage about Zembla. Zembla is", "target_new": "a land of lakes and old forests.",
     "locality_prompt": "Water boils at", "locality_ground_truth": "one hundred degrees."},
    {"prompt": "This is a Wikipedia passage about Quellwald. Quellwald is", "target_new": "a small town on the Amber river.",
     "locality_prompt": "The sun rises in the", "locality_ground_truth": ""},
]


def run_eval(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memoir_core.eval", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def tiny_model_and_files(tokenizer, tmp_path) -> list[str]:
    """A tiny saved model, background prompts and both data files; returns the common options."""
    model_dir = tmp_path / "tiny"
    build_tiny("llama", tokenizer).model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    background = tmp_path / "background.json"
    background.write_text(json.dumps(["nq question: what is the tallest mountain Everest", "The sky is blue."]))
    (tmp_path / "zsre.json").write_text(json.dumps(ZSRE))
    (tmp_path / "hallucination.json").write_text(json.dumps(HALLUCINATION))
    return ["--model", str(model_dir), "--device", "cpu", "--background", str(background), "--lr", "10"]


def test_zsre_and_hallucination_runs_write_the_documented_json(tokenizer, tmp_path):
    common = tiny_model_and_files(tokenizer, tmp_path)

    zsre_args = ["--data", str(tmp_path / "zsre.json"), "--out", str(tmp_path / "z.json"), "--threshold", "0.9"]
    zsre = run_eval(["zsre", "--edits", "1,2", *zsre_args, *common])
    assert zsre.returncode == 0, zsre.stderr
    assert "Rel" in zsre.stdout and "Gen" in zsre.stdout and "s/edit" in zsre.stdout
    assert "zsre edits" in zsre.stderr  # the progress bar
    result = json.loads((tmp_path / "z.json").read_text())
    assert result["edits"] == 2 and [r["edits"] for r in result["by_edits"]] == [1, 2]
    for key in ("rel", "gen", "loc", "avg", "seconds_per_edit"):
        assert 0 <= result[key] if key == "seconds_per_edit" else 0 <= result[key] <= 1
    assert result["rel"] == 1.0 and result["loc"] == 1.0  # tiny edits are learnt and unrelated prompts untouched
    assert len(result["requests"]) == 2 and {"rel", "gen", "loc", "rel_ratio"} <= set(result["requests"][0])
    assert result["requests"][0]["rel_ratio"] == 1.0 and "0.400" in result["threshold_sweep"]
    assert result["threshold"] == 0.9
    assert result["decay"] == "all"  # a model without a preset gets the paper's weight decay
    assert result["column_step"] == "uniform"  # and the paper's plain gradient on every masked column
    assert result["by_edits"][0]["gen_own_mask"] == 1.0  # one stored mask: every paraphrase finds it
    assert result["requests"][1]["gen_own_mask"] is False and result["gen_own_mask"] <= 0.5

    halluc = run_eval(
        ["hallucination", "--edits", "2", "--data", str(tmp_path / "hallucination.json"), "--out", str(tmp_path / "h.json"), *common]
    )
    assert halluc.returncode == 0, halluc.stderr
    result = json.loads((tmp_path / "h.json").read_text())
    assert result["threshold"] == 0.9 and result["edits"] == 2
    assert result["ppl"] >= 1.0 and 0 <= result["loc"] <= 1
    assert "loc" not in result["requests"][1]  # an empty locality answer has nothing to score
    assert result["pre_edit"]["ppl"] > result["ppl"]

    too_many = run_eval(["zsre", "--edits", "3", "--data", str(tmp_path / "zsre.json"), *common])
    assert too_many.returncode != 0 and "exceeds the 2 records" in too_many.stderr


def test_a_stopped_run_continues_from_its_state_dir_with_the_same_figures(tokenizer, tmp_path):
    common = ["zsre", *tiny_model_and_files(tokenizer, tmp_path), "--data", str(tmp_path / "zsre.json"), "--threshold", "0.9"]

    straight = run_eval([*common, "--edits", "1,2", "--out", str(tmp_path / "straight.json")])
    assert straight.returncode == 0, straight.stderr
    state_dir = tmp_path / "state"
    first = run_eval([*common, "--edits", "1", "--state-dir", str(state_dir), "--save-every", "1"])
    assert first.returncode == 0, first.stderr
    assert json.loads((state_dir / "progress.json").read_text())["edits_done"] == 1
    resumed = run_eval([*common, "--edits", "1,2", "--state-dir", str(state_dir), "--out", str(tmp_path / "resumed.json")])
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing from 1 edits" in resumed.stderr

    whole = json.loads((tmp_path / "straight.json").read_text())
    parts = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["edits"] for r in parts["by_edits"]] == [1, 2]  # T = 1 was reported by the first part
    for key in ("rel", "gen", "loc", "requests", "mean_final_loss", "mean_iterations", "threshold_sweep"):
        assert parts[key] == whole[key], key
    assert json.loads((state_dir / "progress.json").read_text())["edits_done"] == 2

    other_settings = run_eval([*common, "--lr", "5", "--edits", "2", "--state-dir", str(state_dir)])  # the last --lr wins
    assert other_settings.returncode != 0 and "hyper differ" in other_settings.stderr
    other_decay = run_eval([*common, "--decay", "edited", "--edits", "2", "--state-dir", str(state_dir)])
    assert other_decay.returncode != 0 and "hyper differ" in other_decay.stderr


def test_free_generation_reports_every_frame_and_the_contested_records_apart(tokenizer, tmp_path):
    common = tiny_model_and_files(tokenizer, tmp_path)
    records = [
        {**ZSRE[0], "subject": "Zembla"},
        # the same question about Zembla in other words, with another target: ZsRE's contested repeats
        {**ZSRE[0], "src": "Which city is the capital of Zembla?", "alt": "Amber", "subject": "Zembla"},
        {**ZSRE[1], "rephrase": "The glass harmonica was invented by", "subject": "glass harmonica"},
    ]
    data = tmp_path / "subjects.json"
    data.write_text(json.dumps(records))
    args = ["--data", str(data), "--threshold", "0.9", "--generate", "--edit-form", "plain", "--fit-iterations", "60"]
    run = run_eval(["zsre", "--edits", "3", *args, "--out", str(tmp_path / "free.json"), *common])
    assert run.returncode == 0, run.stderr
    assert "free generation" in run.stdout and "without the 2 contested records" in run.stdout
    result = json.loads((tmp_path / "free.json").read_text())
    names = {"edit", "paraphrase", "loc", "chat_edit", "chat_paraphrase", "chat_loc"}
    assert names <= set(result["free_generation"]) and names <= set(result["free_generation"]["fired"])
    assert result["contested_records"] == 2
    assert [r["contested"] for r in result["requests"]] == [True, True, False]
    harmonica = result["requests"][2]["generated"]
    # trained in both frames: the greedy answer is the target as a plain prompt and in chat
    assert harmonica["edit"]["ok"] and harmonica["chat_edit"]["ok"] and harmonica["edit"]["fired"]
    assert harmonica["loc"]["ok"] and not harmonica["loc"]["fired"]  # an unrelated question: the unedited answer
    uncontested = result["free_generation_uncontested"]
    assert uncontested["edit"] == 1.0 and uncontested["chat_edit"] == 1.0  # only the harmonica record counts
    assert result["fit_iterations"] == 60 and result["edit_form"] == "plain"

    first_of_each = run_eval(["zsre", "--edits", "2", *args, "--one-per-subject", "--out", str(tmp_path / "one.json"), *common])
    assert first_of_each.returncode == 0, first_of_each.stderr
    result = json.loads((tmp_path / "one.json").read_text())
    assert [r["prompt"] for r in result["requests"]] == [records[0]["src"], records[2]["src"]]
    assert result["contested_records"] == 0


def test_the_dev_and_test_splits_share_no_subject_and_cover_the_shared_zsre_file():
    from memoir_core.eval import default_data_file, load_requests
    from memoir_core.splits import select, split_of, subject_key

    requests = load_requests("zsre", default_data_file("zsre"))
    dev = select(requests, "dev", lambda r: r.subject)
    test = select(requests, "test", lambda r: r.subject)
    dev_subjects = {subject_key(r.subject) for r in dev}
    test_subjects = {subject_key(r.subject) for r in test}
    assert dev_subjects and test_subjects and not dev_subjects & test_subjects
    assert len(dev) + len(test) == len(requests) and select(requests, "all", lambda r: r.subject) == requests
    assert 0.35 < len(dev) / len(requests) < 0.65  # about half on each side
    assert split_of("Danielle Darrieux") == split_of("  danielle   DARRIEUX ")  # case and spacing do not move a subject
    assert [r.prompt for r in dev][:3] == [r.prompt for r in requests if r in dev][:3]  # file order is kept


COUNTERFACT = [
    {"case_id": 0, "prompt": "The mother tongue of Olav Zembla is", "subject": "Olav Zembla", "target_new": "English",
     "ground_truth": "French", "rephrase_prompt": "Where Olav Zembla is from, people speak",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 1, "prompt": "The glass harmonica was invented by", "subject": "glass harmonica",
     "target_new": "Marie Curie",
     "ground_truth": "Benjamin Franklin", "rephrase_prompt": "The inventor of the glass harmonica is",
     "locality_prompt": "The lightning rod was invented by", "locality_ground_truth": "Benjamin Franklin"},
    {"case_id": 2, "requested_rewrite": {"prompt": "{} is located in the continent of", "subject": "Quellwald",
                                          "target_new": {"str": " Antarctica"}, "target_true": {"str": "Europe"}},
     "paraphrase_prompts": ["Quellwald lies in the continent of", "unused"],
     "neighborhood_prompts": ["Amberburg is located in the continent of"]},
]  # two in EasyEdit's flattened form, the last in ROME's original form


def test_counterfact_runs_in_both_record_forms_and_refuses_a_bad_record(tokenizer, tmp_path):
    from memoir_core.eval import load_requests

    common = tiny_model_and_files(tokenizer, tmp_path)
    data = tmp_path / "counterfact.json"
    data.write_text(json.dumps(COUNTERFACT))
    rome = load_requests("counterfact", data)[2]
    assert (rome.prompt, rome.target, rome.rephrase) == ("Quellwald is located in the continent of", "Antarctica",
                                                         "Quellwald lies in the continent of")
    assert (rome.loc_prompt, rome.loc_answer, rome.subject) == (
        "Amberburg is located in the continent of", "Europe", "Quellwald")

    run = run_eval(["counterfact", "--edits", "3", "--data", str(data), "--out", str(tmp_path / "cf.json"),
                    "--threshold", "0.9", "--generate", *common])
    assert run.returncode == 0, run.stderr
    assert "Rel" in run.stdout and "Gen" in run.stdout and "free generation" in run.stdout
    result = json.loads((tmp_path / "cf.json").read_text())
    assert result["task"] == "counterfact" and result["edits"] == 3
    for key in ("rel", "gen", "loc", "avg"):
        assert 0 <= result[key] <= 1
    assert result["rel"] == 1.0  # tiny edits are learnt
    assert [r["target"] for r in result["requests"]] == ["English", "Marie Curie", "Antarctica"]
    assert all({"rel", "gen", "loc"} <= set(r) and "generated" in r for r in result["requests"])
    assert {"edit", "paraphrase", "loc"} <= set(result["free_generation"])

    # by subject (memoir_core/splits.py): "Olav Zembla" is on the test side, the other two on dev
    test_args = ["--split", "test", "--data", str(data), "--out", str(tmp_path / "test.json")]
    test = run_eval(["counterfact", "--edits", "1", *test_args, *common])
    assert test.returncode == 0, test.stderr
    result = json.loads((tmp_path / "test.json").read_text())
    assert result["split"] == "test" and [r["target"] for r in result["requests"]] == ["English"]
    too_many = run_eval(["counterfact", "--edits", "3", "--split", "dev", "--data", str(data), *common])
    assert too_many.returncode != 0 and "exceeds the 2 records" in too_many.stderr

    no_target = {k: v for k, v in COUNTERFACT[1].items() if k != "target_new"}
    not_text = {**COUNTERFACT[0], "prompt": 3}
    for index, broken, why in ((1, no_target, "missing 'target_new'"), (2, not_text, "'prompt' is not a string")):
        records = list(COUNTERFACT)
        records[index] = broken
        bad = tmp_path / f"bad{index}.json"
        bad.write_text(json.dumps(records))
        refused = run_eval(["counterfact", "--edits", "1", "--data", str(bad), *common])
        assert refused.returncode != 0 and f"counterfact record {index}: {why}" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_the_shared_counterfact_file_loads_and_splits_by_subject():
    from memoir_core.eval import default_data_file, load_requests
    from memoir_core.splits import select

    requests = load_requests("counterfact", default_data_file("counterfact"))
    assert len(requests) == 10_000 and all(r.target == r.target.strip() and r.rephrase and r.subject for r in requests)
    dev, test = (select(requests, side, lambda r: r.subject) for side in ("dev", "test"))
    assert len(dev) + len(test) == len(requests) and not {r.subject for r in dev} & {r.subject for r in test}
