"""Corrections that travel: applied edits as JSON Lines (GET /edits/export), read back by
POST /edits/import, e.g. on a server with a new base model. One line is one ExportedEdit."""

from __future__ import annotations

from typing import Iterator

from pydantic import ValidationError

from ..schemas import ExportedEdit
from .edit_log import EditLog

JSON_LINES = "application/x-ndjson"
PAGE = 500  # edits read from the database at a time while exporting


class BadImport(ValueError):
    """A line that is not an edit (the API answers 422 naming the line, and queues nothing)."""


def export_lines(edit_log: EditLog) -> Iterator[bytes]:
    """The applied edits in seq order, one JSON object a line, read a page at a time. The first
    page is read now, before the response starts: a database that is down must give a 503, not
    an empty 200 that reads as "no edits". A failure on a later page cuts the stream short, which
    a client sees as a broken transfer."""
    return _lines(edit_log, edit_log.applied_page(0, PAGE))


def _lines(edit_log: EditLog, page: list) -> Iterator[bytes]:
    while page:
        for edit in page:
            yield ExportedEdit.of(edit).model_dump_json(exclude_none=True).encode() + b"\n"
        page = edit_log.applied_page(page[-1].seq, PAGE)


def parse_lines(body: bytes) -> list[tuple[int, ExportedEdit]]:
    """(line number, edit) for every non-blank line; the first bad line raises BadImport."""
    edits: list[tuple[int, ExportedEdit]] = []
    first_seen: dict[str, int] = {}
    for number, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            edit = ExportedEdit.model_validate_json(line)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg']}" for e in error.errors()
            )
            raise BadImport(f"line {number}: {problems}") from None
        if edit.id in first_seen:
            raise BadImport(f"line {number}: id {edit.id!r} is also on line {first_seen[edit.id]}")
        first_seen[edit.id] = number
        edits.append((number, edit))
    if not edits:
        raise BadImport("the file holds no edits")
    return edits
