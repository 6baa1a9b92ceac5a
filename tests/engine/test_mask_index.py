"""Bit-packed mask index: exact overlaps, tie-breaking and snapshot isolation."""

from __future__ import annotations

import numpy as np
import torch

from memoir_core.mask_index import MaskIndex, pack_masks, unpack_masks
from memoir_core.tophash import TopHasher


def random_masks(count: int, width: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(count, width, generator=generator)
    hasher = TopHasher(torch.arange(width), k, torch.zeros(width))
    return hasher.masks(scores)


def test_overlaps_equal_a_brute_force_count():
    width, k = 1000, 286  # not a multiple of 64: the padding bits must not count
    stored = random_masks(300, width, k, seed=1)
    queries = random_masks(5, width, k, seed=2)
    index = MaskIndex(width, k).appended(pack_masks(stored), [str(i) for i in range(300)])
    expected = (queries.int() @ stored.int().T).numpy()
    assert np.array_equal(index.overlaps(pack_masks(queries)), expected)
    for backend in ("faiss", "numpy"):
        for query, match in zip(queries, index.best(queries, backend=backend)):
            brute = stored.int() @ query.int()
            assert match.overlap == int(brute.max())
            assert match.position == int(torch.nonzero(brute == brute.max()).max())  # the newest of any ties
            assert match.ratio == match.overlap / k
    assert torch.equal(unpack_masks(pack_masks(stored), width), stored)
    assert index.bytes_per_mask == 16 * 8


def test_column_usage_counts_the_stored_masks_holding_each_column():
    width, k = 1000, 286
    stored = random_masks(300, width, k, seed=4)
    index = MaskIndex(width, k).appended(pack_masks(stored), [str(i) for i in range(300)])
    columns = torch.tensor([0, 63, 64, 500, 998, 999])  # word edges and the last, padded word
    assert torch.equal(index.column_usage(columns), stored.long().sum(dim=0)[columns])
    assert torch.equal(MaskIndex(width, k).column_usage(columns), torch.zeros(6, dtype=torch.long))


def test_ties_go_to_the_latest_mask_and_an_empty_index_matches_nothing():
    width, k = 128, 32
    mask = random_masks(1, width, k, seed=3)
    empty = MaskIndex(width, k)
    assert empty.best(mask) == [None]
    index = empty.appended(pack_masks(mask), ["old"]).appended(pack_masks(mask), ["new"])
    for backend in ("faiss", "numpy"):
        assert index.best(mask, backend=backend)[0].key == "new"
        assert index.best(mask, backend=backend)[0].ratio == 1.0
    # more identical masks than faiss is asked for candidates: the newest still wins
    many = empty.appended(pack_masks(mask.repeat(20, 1)), [f"copy-{i}" for i in range(20)])
    many = many.appended(pack_masks(random_masks(3, width, k, seed=5)), ["x", "y", "z"])
    for backend in ("faiss", "numpy"):
        assert many.best(mask, backend=backend)[0].key == "copy-19"


def test_older_indexes_keep_their_rows_when_a_branch_appends():
    width, k = 256, 64
    masks = random_masks(4, width, k, seed=4)
    base = MaskIndex(width, k).appended(pack_masks(masks[:1]), ["a"])
    newer = base.appended(pack_masks(masks[1:2]), ["b"])
    branch = base.appended(pack_masks(masks[2:3]), ["c"])  # e.g. a rebuild from an older state
    assert newer.keys == ("a", "b") and branch.keys == ("a", "c")
    assert torch.equal(newer.mask(1), masks[1])
    assert torch.equal(branch.mask(1), masks[2])
    grown = newer
    for i in range(40):  # forces buffer growth while `newer` is still read
        grown = grown.appended(pack_masks(masks[3:4]), [f"x{i}"])
    assert torch.equal(newer.mask(1), masks[1]) and len(newer) == 2
    assert grown.without({"b"}).keys[:2] == ("a", "x0")


def test_large_indexes_split_the_search_across_threads_with_the_same_result():
    width, k, count = 6400, 1800, 50_000  # 5M machine words: searched by several threads
    generator = np.random.default_rng(5)
    packed = generator.integers(0, 2**63, size=(count, -(-width // 64)), dtype=np.uint64)
    index = MaskIndex(width, k, packed, tuple(map(str, range(count))))
    query = random_masks(1, width, k, seed=6)
    overlaps = index.overlaps(pack_masks(query))[0]
    sample = generator.choice(count, 200, replace=False)
    expected = (unpack_masks(packed[sample], width).int() @ query[0].int()).numpy()
    assert np.array_equal(overlaps[sample], expected)
    assert index.best(query, backend="numpy")[0].overlap == overlaps.max()  # random words: not k-of-D masks
