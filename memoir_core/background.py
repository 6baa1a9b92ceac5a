"""Irrelevant prompts whose mean activation de-centres TopHash features (spec §2.2).

The evaluation uses the paper's set (the first 100 ZsRE training locality prompts); the service
uses the 100 generic prompts shipped with the package.
"""

from __future__ import annotations

from importlib import resources
import json

BACKGROUND_SIZE = 100


def default_background_prompts() -> list[str]:
    text = resources.files("memoir_core").joinpath("data/background_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)[:BACKGROUND_SIZE]
