"""Concurrent serving: a real server on the default model, 1, 4 and 16 loopback clients.

    python -m bench.serving --seconds 60 --out runs/bench/serving.json

Each client sends /generate requests back to back (ZsRE questions, greedy, up to --max-tokens new
tokens) for a fixed time. Reported per level: requests/s, generated tokens/s, p50 and p99 latency;
once with the server otherwise idle and once while a stream of edits is being applied (one edit
submitted as soon as the previous one is applied).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
from pathlib import Path
import tempfile
import threading
import time

import httpx

from bench.common import percentile, table, write_json
from memoir_core.eval import default_data_file
from tests.server import Server


def client_loop(url: str, prompts: list[str], offset: int, stop_at: float, max_tokens: int) -> list[tuple[float, int]]:
    done = []
    with httpx.Client(base_url=url, timeout=600) as client:
        i = offset
        while time.monotonic() < stop_at:
            started = time.monotonic()
            response = client.post("/generate", json={"prompt": prompts[i % len(prompts)], "max_new_tokens": max_tokens})
            response.raise_for_status()
            done.append((time.monotonic() - started, response.json()["completion_tokens"]))
            i += 7
    return done


def edit_stream(server: Server, records: list[dict], stop: threading.Event, applied: list[str]) -> None:
    for record in records:
        if stop.is_set():
            return
        edit = server.submit(record["src"], record["alt"])
        while not stop.is_set():
            status = server.client.get(f"/edits/{edit['id']}").json()["status"]
            if status == "applied":
                applied.append(edit["id"])
                break
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()
    records = json.loads(default_data_file("zsre").read_text())
    prompts = [r["src"] for r in records[200:400]]
    state = Path(tempfile.mkdtemp(prefix="memoir-bench-"))
    server = Server(state, {"MEMOIR_DEVICE": "cpu", "MEMOIR_MAX_BATCH_SIZE": "16"}).start()
    rows, results = [], []
    try:
        edit_offset = 0
        for with_edits in (False, True):
            for clients in (int(c) for c in args.clients.split(",")):
                stop, applied = threading.Event(), []
                editor = None
                if with_edits:
                    editor = threading.Thread(
                        target=edit_stream, args=(server, records[edit_offset : edit_offset + 50], stop, applied)
                    )
                    editor.start()
                started = time.monotonic()
                stop_at = started + args.seconds
                with ThreadPoolExecutor(clients) as pool:
                    parts = list(
                        pool.map(lambda c: client_loop(server.url, prompts, c, stop_at, args.max_tokens), range(clients))
                    )
                elapsed = time.monotonic() - started
                stop.set()
                if editor is not None:
                    editor.join()
                    edit_offset += len(applied) + 1
                latencies = [s for part in parts for s, _ in part]
                tokens = sum(t for part in parts for _, t in part)
                result = {
                    "clients": clients,
                    "edit_stream": with_edits,
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / elapsed,
                    "tokens_per_s": tokens / elapsed,
                    "p50_s": percentile(latencies, 0.5),
                    "p99_s": percentile(latencies, 0.99),
                    "edits_applied": len(applied),
                }
                results.append(result)
                rows.append(["yes" if with_edits else "no", clients, result["requests_per_s"], result["tokens_per_s"],
                             result["p50_s"], result["p99_s"], len(applied)])
                print(rows[-1], flush=True)
    finally:
        server.stop()
    single = {r["edit_stream"]: r["tokens_per_s"] for r in results if r["clients"] == 1}
    for r in results:
        r["tokens_per_s_vs_one_client"] = r["tokens_per_s"] / single[r["edit_stream"]]
    print(table(["edit stream", "clients", "req/s", "tokens/s", "p50 s", "p99 s", "edits applied"], rows))
    write_json(args.out, {"benchmark": "serving", "seconds": args.seconds, "max_tokens": args.max_tokens, "results": results})


if __name__ == "__main__":
    main()
