"""Dev and test splits of an edit set, by subject, fixed in code.

Defaults and presets are chosen on `dev`; reported figures come from `test`. A record's side is a
function of its subject alone (SHA-256 of the normalised subject), so no subject is on both sides,
a record keeps its side whatever file or order it comes in, and no seed or list has to travel with
the data. About half of the subjects fall on each side.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, TypeVar

SPLITS = ("dev", "test", "all")

Record = TypeVar("Record")


def subject_key(subject: str) -> str:
    """Case and spacing do not make another subject."""
    return " ".join(subject.lower().split())


def split_of(subject: str) -> str:
    """'dev' or 'test' for a subject (an even / odd first byte of its hash)."""
    digest = hashlib.sha256(subject_key(subject).encode("utf-8")).digest()
    return "dev" if digest[0] % 2 == 0 else "test"


def select(records: Iterable[Record], split: str, subject: Callable[[Record], str | None]) -> list[Record]:
    """The records of one split, in their order; 'all' keeps every record. A record without a
    subject is keyed by the text `subject` falls back to, so it still has one side."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    records = list(records)
    if split == "all":
        return records
    return [r for r in records if split_of(subject(r) or "") == split]
