"""Switching which rule finds edits (MEMOIR_KEY_PROJECTOR) on a running deployment: the stored
memory was keyed by the old rule and cannot be re-keyed without its prompts, so the restart
retrains the edit log once, as after a model upgrade, and the edits are found by the new rule."""

from __future__ import annotations

import torch

from memoir_core import MemoirConfig, MemoirEngine, load_model
from memoir_core.key_projector import load_projector, save_projector


def test_turning_the_key_projector_on_retrains_once_and_routes_by_it(make_server, tiny_model_dir, tmp_path):
    engine = MemoirEngine(load_model(str(tiny_model_dir), device="cpu", dtype="fp32"), MemoirConfig())
    path = tmp_path / "projector.safetensors"
    save_projector(path, torch.randn(engine.width, 32, generator=torch.Generator().manual_seed(0)), engine.weights_fingerprint, "test")

    server = make_server(env={"MEMOIR_CHECKPOINT_EVERY": "1"})
    edits = [server.submit(f"The secret code word of agent {i} is", f"Word{i}") for i in range(3)]
    for edit in edits:
        server.wait_edit(edit["id"])
    before = server.client.get("/state").json()

    server.env["MEMOIR_KEY_PROJECTOR"] = str(path)
    server.restart()
    ready = server.client.get("/ready").json()
    assert ready["replayed_on_startup"] == 3  # checkpoints and log were keyed by masks: retrained
    after = server.client.get("/state").json()
    assert after["keys"] == before["keys"] and after["weights_sha256"] == before["weights_sha256"]
    for i, edit in enumerate(edits):
        explained = server.client.post("/explain", json={"prompt": f"The secret code word of agent {i} is"}).json()
        assert explained["fires"] and explained["edit"]["id"] == edit["id"]
        assert abs(explained["match_ratio"] - 1.0) < 1e-4  # a cosine of the question with itself
    server.restart()  # now the checkpoints carry router keys: nothing retrained
    assert server.client.get("/ready").json()["replayed_on_startup"] == 0
    assert server.client.get("/state").json()["weights_sha256"] == before["weights_sha256"]
    assert load_projector(path).digest  # the file the server read is a projector
