"""Hostile input gets a 4xx with a message and changes nothing; a bad generation request among
concurrent good ones fails alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.conftest import TINY_ENV
from tests.server import Server, create_postgres_database, drop_postgres_database

BAD_SEED = 99999999999999999999999


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request, tmp_path_factory, tiny_model_dir):
    url = create_postgres_database() if request.param == "postgres" else None
    # a prompt limit above the tiny model's 512 positions, so that the context check is what answers
    limits = {"MEMOIR_MAX_PROMPT_TOKENS": "2000", "MEMOIR_MAX_NEW_TOKENS": "1000"}
    env = {**TINY_ENV, "MEMOIR_MODEL": str(tiny_model_dir), **limits}
    server = Server(tmp_path_factory.mktemp(f"hostile-{request.param}"), env, database_url=url).start()
    yield server
    server.stop()
    if url is not None:
        drop_postgres_database(url)


def model_name(server) -> str:
    return server.client.get("/v1/models").json()["data"][0]["id"]


def test_bad_edits_are_refused_with_a_message_and_change_nothing(server):
    long_prompt = "The vault " * 300  # ~600 tokens: more than the model's context of 512
    cases = [
        ({"prompt": "The capital of \x00 Zembla is", "target": "Onhava"}, "NUL"),
        ({"prompt": "The capital of Zembla is", "target": "Onh\x00ava"}, "NUL"),
        ({"messages": [{"role": "user", "content": "Capital of Zembla?\x00"}], "target": "Onhava"}, "NUL"),
        ({"messages": [{"role": "user", "content": "   "}], "target": "Onhava"}, "empty"),
        ({"prompt": long_prompt, "target": "Onhava"}, "context"),
    ]
    for body, reason in cases:
        response = server.client.post("/edits", json=body)
        assert response.status_code == 422, response.text
        assert reason in response.text
    lone_surrogate = b'{"prompt": "The capital of Zembla is \\ud800", "target": "Onhava"}'
    response = server.client.post("/edits", content=lone_surrogate, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "surrogate" in response.text
    assert server.client.get("/edits/abc%00def").status_code == 422
    assert server.client.get("/edits").json()["total"] == 0
    assert server.client.get("/ready").status_code == 200


def test_bad_generation_requests_are_refused_with_a_message(server):
    model = model_name(server)
    bad_generate = [
        ({"prompt": "Once upon a time", "temperature": 0.7, "seed": BAD_SEED}, "seed"),
        ({"prompt": "Once upon a time", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "Once upon a \x00 time"}, "NUL"),
        ({"prompt": "Once upon a time", "stop": ["\x00"]}, "NUL"),
        ({"prompt": "Once upon a time", "max_new_tokens": 510}, "context"),
    ]
    for body, reason in bad_generate:
        response = server.client.post("/generate", json=body)
        assert response.status_code == 422, response.text
        assert reason in response.text
    chat = "/v1/chat/completions"
    bad_openai = [
        (chat, {"messages": [{"role": "user"}]}, "content"),
        (chat, {"messages": [{"role": "user", "content": ""}]}, "empty"),
        (chat, {"messages": [{"role": "user", "content": " \n "}]}, "empty"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "empty"),
        (chat, {"messages": [{"role": "system"}, {"role": "user", "content": "Hi"}]}, "content"),
        (chat, {"messages": [{"role": "user", "content": "Hi\x00"}]}, "NUL"),
        (chat, {"messages": [{"role": "user", "content": "Hi"}], "seed": BAD_SEED}, "seed"),
        (chat, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 600}, "context"),
        ("/v1/completions", {"prompt": "Hi", "seed": BAD_SEED}, "seed"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 512}, "context"),
    ]
    for path, body, reason in bad_openai:
        response = server.client.post(path, json={"model": model, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert reason in response.json()["error"]["message"]
    # the edges of what is accepted
    for seed in (2**64 - 1, -(2**63)):
        server.generate("Once upon a time", temperature=0.7, seed=seed, max_new_tokens=2)
    reply = server.client.post(chat, json={"model": model, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200


def test_a_bad_seed_among_concurrent_good_requests_fails_alone(server):
    good = {"prompt": "The capital of France is", "max_new_tokens": 24, "temperature": 0.7, "seed": 1}
    bad = {**good, "seed": BAD_SEED}
    with httpx.Client(base_url=server.url, timeout=120) as http, ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(http.post, "/generate", json=good) for _ in range(4)]
        bads = [pool.submit(http.post, "/generate", json=bad) for _ in range(3)]
        answers = [f.result() for f in goods], [f.result() for f in bads]
    assert [r.status_code for r in answers[0]] == [200] * 4
    assert all(r.json()["completion_tokens"] > 0 for r in answers[0])
    assert [r.status_code for r in answers[1]] == [422] * 3
