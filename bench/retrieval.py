"""Retrieval at scale: time of one memory decision and bytes per stored mask, 1e2 .. 1e6 masks.

    python -m bench.retrieval --out runs/bench/retrieval.json

Masks are random k-of-D sets (retrieval cost does not depend on which bits are set), at the
default model's width (D 1536, k 439) and at LLaMA-3-8B's (D 14336, k 4096). One decision = best
overlap of one query against every stored mask. If faiss is installed, its exact binary index
(IndexBinaryFlat, Hamming distance) is timed on the same data for comparison.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import median, table, write_json
from memoir_core.mask_index import MaskIndex, pack_masks

WIDTHS = {"SmolLM2-135M (D 1536)": (1536, 439), "LLaMA-3-8B (D 14336)": (14336, 4096)}


def random_masks(count: int, width: int, k: int, generator: torch.Generator) -> np.ndarray:
    packed = []
    for start in range(0, count, 20000):
        n = min(20000, count - start)
        top = torch.rand(n, width, generator=generator).topk(k, dim=1).indices
        packed.append(pack_masks(torch.zeros(n, width, dtype=torch.bool).scatter_(1, top, True)))
    return np.concatenate(packed)


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100,10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    try:
        import faiss
    except ImportError:
        faiss = None
    generator = torch.Generator().manual_seed(0)
    rows, results = [], []
    for name, (width, k) in WIDTHS.items():
        for count in (int(c) for c in args.counts.split(",")):
            stored = random_masks(count, width, k, generator)
            index = MaskIndex(width, k, stored, tuple(map(str, range(count))))
            query = torch.zeros(1, width, dtype=torch.bool)
            query[0, torch.randperm(width, generator=generator)[:k]] = True
            seconds = time_call(lambda: index.best(query), args.repeats)
            result = {"model": name, "width": width, "top_k": k, "masks": count, "decision_ms": seconds * 1e3,
                      "bytes_per_mask": index.bytes_per_mask, "index_mib": stored.nbytes / 2**20}
            if faiss is not None:
                flat = faiss.IndexBinaryFlat(index.words * 64)
                flat.add(stored.view(np.uint8))
                packed_query = pack_masks(query).view(np.uint8)
                result["faiss_ms"] = time_call(lambda: flat.search(packed_query, 1), args.repeats) * 1e3
                _, ids = flat.search(packed_query, 1)
                ours = index.best(query)[0]
                assert index.overlaps(pack_masks(query))[0, ids[0, 0]] == ours.overlap  # same best overlap
            results.append(result)
            rows.append([name, count, f"{result['decision_ms']:.3f}", result.get("faiss_ms", "-"),
                         result["bytes_per_mask"], f"{result['index_mib']:.1f}"])
            print(rows[-1], flush=True)
    print(table(["model", "masks", "decision ms", "faiss ms", "bytes/mask", "index MiB"], rows))
    write_json(args.out, {"benchmark": "retrieval", "results": results})


if __name__ == "__main__":
    main()
