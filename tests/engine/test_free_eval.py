"""The free-generation yardstick's text checks, on crafted answers."""

from memoir_core.free_eval import answers_with, latest_targets, repeats_a_word, rescored, summary_of


def test_a_word_three_times_in_a_row_counts_as_a_repetition_and_two_do_not():
    assert repeats_a_word(" Lewis Lewis Lewis")
    assert repeats_a_word("Rome, rome. ROME!")  # case and punctuation do not hide it
    assert not repeats_a_word(" Lewis Lewis, the author")
    assert not repeats_a_word(" Rome, Italy. The Eiffel Tower is in Rome")  # the same word apart is fine
    assert not repeats_a_word("")


def test_the_summary_reports_the_repetition_rate_per_probe():
    rows = [
        {"edit": {"text": " Lewis Lewis Lewis", "ok": True, "fired": True, "repeats": True}},
        {"edit": {"text": " Vostok, a city", "ok": True, "fired": True, "repeats": False}},
    ]
    summary = summary_of(rows)
    assert summary["edit"] == 1.0 and summary["repeats"]["edit"] == 0.5
    assert answers_with(" Vostok, a city", "Vostok") and not answers_with(" it lies far to the east of Vostok", "Vostok")


def test_contested_records_are_scored_against_their_subjects_newest_target():
    subjects = ["Danube", "Rhine", "Danube", None]
    targets = ["Vienna", "Basel", "Budapest", "Oslo"]
    assert latest_targets(subjects, targets) == ["Budapest", "Basel", "Budapest", "Oslo"]
    rows = [
        {"edit": {"text": " Vienna, then", "ok": True}, "loc": {"text": "x", "ok": False}},
        {"edit": {"text": " Basel", "ok": True}},
        {"edit": {"text": " Budapest", "ok": True}},
        {"edit": {"text": " Oslo", "ok": True}},
    ]
    again = rescored(rows, latest_targets(subjects, targets))
    assert [row["edit"]["ok"] for row in again] == [False, True, True, True]
    assert again[0]["loc"] == rows[0]["loc"]  # locality is judged against the unedited answer, not a target
    assert summary_of(again)["edit"] == 0.75
