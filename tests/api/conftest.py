"""Fixtures that start real servers: a tiny random Llama for speed, the embedded model for meaning."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import build_tiny
from tests.server import Server, create_postgres_database, drop_postgres_database

TINY_ENV = {
    "MEMOIR_DEVICE": "cpu",
    "MEMOIR_DTYPE": "fp32",
    "MEMOIR_EDIT_LR": "10",  # see tests/conftest.py: TINY_HYPER
    "MEMOIR_THRESHOLD": "0.9",  # random weights separate prompts less than a trained model
    "MEMOIR_CHECKPOINT_EVERY": "3",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    loaded = build_tiny("llama", tokenizer)
    loaded.model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """None: the service's default SQLite file; otherwise a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
        return
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


@pytest.fixture
def make_server(tmp_path, tiny_model_dir):
    """Start servers on the tiny model (or another model via env); all are stopped at the end."""
    servers: list[Server] = []

    def make(name: str = "server", env: dict | None = None, database_url: str | None = None, start: bool = True):
        server = Server(
            tmp_path / name,
            {**TINY_ENV, "MEMOIR_MODEL": str(tiny_model_dir), **(env or {})},
            database_url,
        )
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def default_server(tmp_path_factory, default_model_dir):
    """One server on the embedded SmolLM2 model, shared by the tests that need real language."""
    server = Server(tmp_path_factory.mktemp("default-server"), {"MEMOIR_DEVICE": "cpu"}).start()
    yield server
    server.stop()
