"""The OpenAI-compatible API driven by the official `openai` client, plus raw SSE framing checks."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

QUESTION = "The capital of the fictional land of Zembla is"


@pytest.fixture
def tiny(make_server):
    server = make_server()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    return server, client, model


def sse_events(response: httpx.Response) -> list[str]:
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: ") :] for event in events]


def test_models_lists_the_edited_and_the_base_model(tiny):
    server, client, model = tiny
    ids = [m.id for m in client.models.list().data]
    assert ids == [model, f"{model}:base"]
    assert all(m.object == "model" and m.owned_by == "memoir" for m in client.models.list().data)


def test_chat_completion_plain_and_streaming_agree(tiny):
    server, client, model = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, logit_bias={}, user="u1")
    assert full.object == "chat.completion" and full.model == model and full.id.startswith("chatcmpl-")
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.model_extra["memoir"] == {"edit": None, "edit_seq": None}

    stream = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_text_completions_plain_and_streaming(tiny):
    server, client, model = tiny
    full = client.completions.create(model=model, prompt=QUESTION, max_tokens=8, temperature=0)
    assert full.object == "text_completion" and full.choices[0].text
    pieces = list(client.completions.create(model=model, prompt=[QUESTION], max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == full.choices[0].text
    assert pieces[-1].choices[0].finish_reason == full.choices[0].finish_reason
    echoed = client.completions.create(model=model, prompt=QUESTION, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == QUESTION + full.choices[0].text


def test_errors_use_the_openai_envelope(tiny):
    server, client, model = tiny
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)
    assert several.value.body["type"] == "invalid_request_error" and several.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="the limit is"):
        client.completions.create(model=model, prompt="hi", max_tokens=100000)
    raw = server.client.post("/v1/chat/completions", json={"model": model, "messages": []})
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["param"] == "messages"
    # the native API keeps FastAPI's shape
    assert "detail" in server.client.post("/generate", json={}).json()


def test_sse_framing_of_chat_completions_and_generate(tiny):
    server, client, model = tiny
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0, "stream": True}
    response = server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    payloads = [json.loads(e) for e in sse_events(response)[:-1]]
    assert [p["choices"][0]["finish_reason"] for p in payloads][-1] in ("stop", "length")
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
    assert "memoir" in payloads[-1] and "usage" not in payloads[0]

    response = server.client.post("/generate", json={"prompt": QUESTION, "max_new_tokens": 6, "stream": True})
    events = [json.loads(e) for e in sse_events(response)[:-1]]
    final = events[-1]
    assert final["finish_reason"] in ("stop", "length") and final["completion_tokens"] >= 1
    plain = server.generate(QUESTION, max_new_tokens=6)
    assert "".join(e["text"] for e in events) == plain["text"]
    assert final["edit"] is None and "edit_seq" in final
