"""Stored edit masks, bit-packed, with vectorised best-overlap search.

Every mask has exactly k ones, so the best overlap is also the smallest Hamming distance. A mask
of D bits takes ceil(D / 64) machine words. The search uses faiss's exact Hamming k-NN on the
packed masks when faiss is installed, and otherwise ANDs the query with every stored mask and
counts bits in cache-sized chunks (numpy's popcount, AVX-512 VPOPCNT where the CPU has it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import hashlib
import os
import unicodedata

import numpy as np
import torch

try:  # optional: faiss's exact binary k-NN beats numpy popcount several times (bench/retrieval.py)
    import faiss
except ImportError:  # pragma: no cover - the numpy path serves without it
    faiss = None

_CHUNK_ROWS = 8192  # rows per step: the AND and popcount buffers stay in cache
_THREADS = min(4, os.cpu_count() or 1)
_WORDS_PER_THREAD = 1 << 21  # below ~16 MiB of masks a second thread costs more than it saves
_TIE_CANDIDATES = 16
_MAX_EXCLUDED_CANDIDATES = 1024  # more superseded rows than this: the exact numpy search instead


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """[B, D] bool -> [B, ceil(D/64)] uint64, bit i of the row = column i."""
    bits = masks.detach().to("cpu", torch.bool).numpy()
    width = bits.shape[-1]
    words = -(-width // 64)
    padded = np.zeros((bits.shape[0], words * 64), dtype=bool)
    padded[:, :width] = bits
    return np.packbits(padded, axis=-1, bitorder="little").view(np.uint64)


def unpack_masks(packed: np.ndarray, width: int) -> torch.Tensor:
    bits = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(bits[:, :width].astype(bool))


def distinct_rows(packed: np.ndarray) -> list[int]:
    """Which rows of a packed mask array to keep so that none repeats: first occurrences, in order."""
    seen: set[bytes] = set()
    return [i for i, row in enumerate(packed) if not (row.tobytes() in seen or seen.add(row.tobytes()))]


def mask_fingerprint(packed_row: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(packed_row).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Match:
    position: int  # row in the index
    key: str  # the edit that owns the mask
    overlap: int
    ratio: float  # overlap / k


class _Buffer:
    """Rows shared by a chain of indexes; `used` rows are written and never change again."""

    def __init__(self, rows: np.ndarray, used: int):
        self.rows = rows
        self.used = used


def _rows_of(keys: tuple[str, ...], wanted: set[str]) -> np.ndarray:
    """The rows stored under any of `wanted`, ascending (int64, empty when none)."""
    if not wanted:
        return np.zeros(0, dtype=np.int64)
    return np.array([i for i, key in enumerate(keys) if key in wanted], dtype=np.int64)


def question_digest(text: str) -> str:
    """What decides that two edits ask the same question: their plain question casefolded, with
    Unicode compatibility forms, runs of whitespace and trailing punctuation evened out."""
    normalised = " ".join(unicodedata.normalize("NFKC", text).casefold().split()).rstrip("?.!:;, ")
    return hashlib.sha256(normalised.encode()).hexdigest()[:16]


def first_rows(keys: tuple[str, ...], offset: int = 0) -> tuple[int, ...]:
    """Per row, the row of the first mask stored under its key (rows numbered from `offset`)."""
    first: dict[str, int] = {}
    return tuple(first.setdefault(key, offset + i) for i, key in enumerate(keys))


class MaskIndex:
    """Immutable view of the first len(keys) rows of a shared, append-only buffer.

    An edit may own several rows (one key per frame it was trained in), stored together, the
    mask it was trained through first: whichever row matches, the memory applies that first one
    (`mask`), recorded per row once when the rows are stored.

    A superseded edit (`superseded`: its key -> the key of the later edit that asked the same
    question, see `same_question`) keeps its rows, so the stored masks and W_m's columns stay as
    they were trained, but no search finds them: `best` skips its rows.

    `appended` writes in place only when this index is the buffer's newest (no other index has
    written past it), so every older index keeps reading exactly the rows it was built with;
    otherwise (growth, or appending to an older index) it copies into a fresh buffer.
    """

    def __init__(
        self,
        width: int,
        top_k: int,
        packed: np.ndarray | None = None,
        keys: tuple[str, ...] = (),
        answers: dict[str, str] | None = None,
        questions: dict[str, str] | None = None,
        superseded: dict[str, str] | None = None,
        router: np.ndarray | None = None,
    ):
        self.width = width
        self.top_k = top_k
        self.words = -(-width // 64)
        if packed is None:
            packed = np.zeros((0, self.words), dtype=np.uint64)
        if packed.shape[1:] != (self.words,) or packed.shape[0] != len(keys):
            raise ValueError("packed masks do not match the index width or key count")
        self.keys = tuple(keys)
        # the target each edit was trained to say, by key: generation releases a row's memory
        # once the row has said it (generation.DecodeBatch)
        self.answers = dict(answers or {})
        # per key, the digest of the edit's normalised plain question (`question_digest`)
        self.questions = dict(questions or {})
        self.superseded = dict(superseded or {})
        # float32 [rows, d] router keys, one per mask row (key_projector): set, retrieval matches
        # these by cosine instead of the masks by overlap
        if router is not None and router.shape[0] != len(keys):
            raise ValueError("router keys do not match the key count")
        self.router = router
        self.applied_rows = first_rows(self.keys)
        self._shared = _Buffer(packed, len(keys))
        self.excluded_rows = _rows_of(self.keys, set(self.superseded))

    @property
    def _buffer(self) -> np.ndarray:
        return self._shared.rows

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def edit_keys(self) -> tuple[str, ...]:
        """Each edit's key once, in the order the edits were stored (an edit may own several masks)."""
        return tuple(dict.fromkeys(self.keys))

    @property
    def packed(self) -> np.ndarray:
        return self._buffer[: len(self)]

    @property
    def bytes_per_mask(self) -> int:
        return self.words * 8

    def appended(
        self,
        packed_rows: np.ndarray,
        keys: list[str],
        answer: str | None = None,
        question: str | None = None,
        supersedes: tuple[str, ...] | list[str] = (),
        router_rows: np.ndarray | None = None,
    ) -> "MaskIndex":
        """A new index with `packed_rows` stored after this one's rows; one edit's rows come in
        one call, the mask it was trained through first, with the target it was trained to say,
        the digest of its question and the stored edits it supersedes (their rows leave the search)."""
        count, extra = len(self), len(keys)
        shared = self._shared
        if shared.used != count or count + extra > shared.rows.shape[0]:
            rows = np.zeros((max(16, 2 * (count + extra)), self.words), dtype=np.uint64)
            rows[:count] = shared.rows[:count]
            shared = _Buffer(rows, count)
        shared.rows[count : count + extra] = packed_rows
        shared.used = count + extra
        index = MaskIndex.__new__(MaskIndex)
        index.width, index.top_k, index.words = self.width, self.top_k, self.words
        index.keys = self.keys + tuple(keys)
        index.answers = {**self.answers, keys[0]: answer} if answer is not None and keys else self.answers
        index.questions = {**self.questions, keys[0]: question} if question is not None and keys else self.questions
        index.applied_rows = self.applied_rows + first_rows(tuple(keys), count)
        if count and (router_rows is None) != (self.router is None):
            raise ValueError("router keys: every row of an index has one, or none does")
        index.router = None if router_rows is None else np.concatenate(
            [self.router if self.router is not None else np.zeros((0, router_rows.shape[1]), np.float32), router_rows]
        ).astype(np.float32)
        index._shared = shared
        if supersedes:
            stored = set(self.edit_keys)
            unknown = {key for key in supersedes if key not in stored or key in self.superseded}
            if unknown or not keys:
                raise ValueError(f"cannot supersede edits that are not stored and active: {sorted(unknown)}")
            index.superseded = {**self.superseded, **{old: keys[0] for old in supersedes}}
            index.excluded_rows = np.union1d(self.excluded_rows, _rows_of(self.keys, set(supersedes)))
        else:
            index.superseded, index.excluded_rows = self.superseded, self.excluded_rows
        return index

    def without(self, keys: set[str]) -> "MaskIndex":
        """The index without these edits' rows; an edit only they superseded is found again."""
        kept = [i for i, key in enumerate(self.keys) if key not in keys]
        answers = {key: answer for key, answer in self.answers.items() if key not in keys}
        questions = {key: digest for key, digest in self.questions.items() if key not in keys}
        superseded = {old: new for old, new in self.superseded.items() if old not in keys and new not in keys}
        return MaskIndex(
            self.width,
            self.top_k,
            self.packed[kept].copy(),
            tuple(self.keys[i] for i in kept),
            answers,
            questions,
            superseded,
            None if self.router is None else self.router[kept].copy(),
        )

    @property
    def active_keys(self) -> tuple[str, ...]:
        """Each edit's key once, in storage order, without the superseded ones."""
        return tuple(key for key in self.edit_keys if key not in self.superseded)

    def same_question(self, packed_rows: np.ndarray, question: str | None) -> tuple[str, ...]:
        """The active stored edits that a new edit with these masks and question digest asks
        again: its normalised plain question is theirs, or one of its masks equals one of
        theirs (match ratio 1.0: the reader could not tell the two apart, and ties already go to
        the newer). Rephrasings are not: their ratios overlap those of different questions about
        the same subject (docs/design.md#superseding)."""
        found = {key for key in self.active_keys if question is not None and self.questions.get(key) == question}
        if len(self):
            identical = (self.overlaps(packed_rows) == self.top_k).any(axis=0)
            identical[self.excluded_rows] = False
            found |= {self.keys[i] for i in np.flatnonzero(identical)}
        return tuple(key for key in self.edit_keys if key in found)

    def overlaps(self, query_packed: np.ndarray) -> np.ndarray:
        """[B, W] packed queries -> [B, N] int32 overlap counts."""
        count = len(self)
        out = np.empty((query_packed.shape[0], count), dtype=np.int32)
        if count == 0:
            return out
        workers = min(_THREADS, max(1, (count * self.words) // _WORDS_PER_THREAD))
        if workers == 1:
            self._overlap_rows(query_packed, out, 0, count)
            return out
        # numpy releases the GIL inside these loops, so row ranges run in parallel
        bounds = np.linspace(0, count, workers + 1, dtype=int)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: self._overlap_rows(query_packed, out, bounds[i], bounds[i + 1]), range(workers)))
        return out

    def column_usage(self, columns: torch.Tensor) -> torch.Tensor:
        """How many stored masks hold each of `columns` ([k] int) -> [k] int64."""
        cols = columns.detach().cpu().numpy().astype(np.uint64)
        words = self.packed[:, (cols // np.uint64(64)).astype(np.intp)]  # [N, k]
        held = (words >> (cols % np.uint64(64))) & np.uint64(1)
        return torch.from_numpy(held.sum(axis=0, dtype=np.int64))

    def _overlap_rows(self, query_packed: np.ndarray, out: np.ndarray, first: int, last: int) -> None:
        rows = min(_CHUNK_ROWS, last - first)
        if rows <= 0:
            return
        anded = np.empty((rows, self.words), dtype=np.uint64)
        bitcounts = np.empty((rows, self.words), dtype=np.uint8)
        stored = self._buffer
        for b, query in enumerate(query_packed):
            for start in range(first, last, rows):
                stop = min(last, start + rows)
                n = stop - start
                np.bitwise_and(stored[start:stop], query, out=anded[:n])
                np.bitwise_count(anded[:n], out=bitcounts[:n])
                bitcounts[:n].sum(axis=1, dtype=np.int32, out=out[b, start:stop])

    def best(self, query_masks: torch.Tensor, backend: str = "auto") -> list[Match | None]:
        """Best stored match per query row, superseded edits skipped (None: nothing searchable);
        ties go to the most recently stored mask.

        backend: "faiss" (exact Hamming k-NN, used when installed: several times faster, see
        bench/retrieval.py), "numpy" (popcount of AND), or "auto".
        """
        count = len(self)
        if count == 0:
            return [None] * query_masks.shape[0]
        packed = pack_masks(query_masks)
        if backend == "faiss" or (backend == "auto" and faiss is not None):
            return self._best_by_hamming(packed)
        return self._best_by_overlap(packed)

    def best_by_router(self, query_keys: torch.Tensor) -> list[Match | None]:
        """Best stored row per query by cosine of router keys (unit vectors), superseded edits
        skipped, ties to the newest; `ratio` is the cosine."""
        if len(self) == 0 or self.router is None:
            return [None] * query_keys.shape[0]
        similarity = query_keys.detach().to("cpu", torch.float32).numpy() @ self.router.T
        similarity[:, self.excluded_rows] = -np.inf
        last, matches = len(self) - 1, []
        for row in similarity:
            position = last - int(np.argmax(row[::-1]))
            matches.append(Match(position, self.keys[position], 0, float(row[position])) if np.isfinite(row[position]) else None)
        return matches

    def _best_by_overlap(self, packed: np.ndarray) -> list[Match | None]:
        last = len(self) - 1
        matches = []
        for row in self.overlaps(packed):
            row[self.excluded_rows] = -1  # superseded: never the best
            position = last - int(np.argmax(row[::-1]))
            matches.append(self._match(position, int(row[position])) if row[position] >= 0 else None)
        return matches

    def _best_by_hamming(self, packed: np.ndarray) -> list[Match | None]:
        # every mask has exactly k ones, so Hamming distance = 2k - 2 * overlap; asking for a few
        # neighbours lets ties (identical masks) go to the newest one, as in the numpy path, and
        # one more per superseded row keeps that many candidates that may be found
        excluded = set(self.excluded_rows.tolist())
        if len(excluded) > _MAX_EXCLUDED_CANDIDATES:
            return self._best_by_overlap(packed)
        neighbours = min(_TIE_CANDIDATES + len(excluded), len(self))
        distances, ids = faiss.knn_hamming(packed.view(np.uint8), self.packed.view(np.uint8), neighbours)
        matches = []
        for query, distance_row, id_row in zip(packed, distances, ids):
            found = [(int(d), int(i)) for d, i in zip(distance_row, id_row) if int(i) not in excluded]
            nearest = min((d for d, _ in found), default=None)
            if nearest is None or (neighbours < len(self) and int(distance_row.max()) == nearest):
                # more ties than candidates: the newest may lie beyond them, so count exactly
                matches.append(self._best_by_overlap(query[None])[0])
                continue
            position = max(i for d, i in found if d == nearest)
            matches.append(self._match(position, (2 * self.top_k - nearest) // 2))
        return matches

    def _match(self, position: int, overlap: int) -> Match:
        return Match(position, self.keys[position], overlap, overlap / self.top_k)

    def mask(self, position: int) -> torch.Tensor:
        """The mask the memory applies when the row at `position` matches: its edit's trained one."""
        row = self.applied_rows[position]
        return unpack_masks(self._buffer[row : row + 1], self.width)[0]
