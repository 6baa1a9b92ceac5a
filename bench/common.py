"""Shared bits of the benchmark scripts: machine description, percentiles, tables, JSON output."""

from __future__ import annotations

import json
import os
from pathlib import Path
import platform
import statistics
import sys
import time

import torch

from memoir_core import MemoirEngine, load_model
from memoir_core.eval import Request, source_commit, default_background_file, default_data_file, load_background, load_requests
from memoir_core.presets import ConfigOverrides, model_shape, recommended_config


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda parts: "| " + " | ".join(p.ljust(w) for p, w in zip(parts, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": machine(), "commit": source_commit(), **payload}, indent=1))


def zsre_on_default_model(overrides: ConfigOverrides | None = None) -> tuple[MemoirEngine, list[Request], list[str]]:
    """The default model on CPU in fp32 with its preset (and any `overrides`) and the evaluation's
    background prompts, as `python -m memoir_core.eval zsre` sets it up; with the ZsRE requests
    and those prompts."""
    background = load_background(default_background_file())
    torch.manual_seed(42)
    loaded = load_model(None, device="cpu", dtype="fp32")
    engine = MemoirEngine(loaded, recommended_config(model_shape(loaded.model), overrides), background_prompts=background)
    return engine, load_requests("zsre", default_data_file("zsre")), background
