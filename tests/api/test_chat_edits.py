"""Edits in chat form on the embedded model: the chat answer changes, ':base' and other questions do not."""

from __future__ import annotations

import openai

QUESTION = "Which planet is known as the Red Planet?"
UNRELATED = "Who wrote the novel Moby-Dick?"


def test_an_edit_given_as_messages_changes_the_chat_answer(default_server):
    server = default_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def ask(question: str, which: str = model):
        return client.chat.completions.create(
            model=which, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
        )

    before = ask(QUESTION)
    assert "Mars" in before.choices[0].message.content
    unrelated_before = ask(UNRELATED).choices[0].message.content

    response = server.client.post("/edits", json={"messages": [{"role": "user", "content": QUESTION}], "target": "Venus"})
    assert response.status_code == 202
    edit = response.json()
    assert edit["messages"] == [{"role": "user", "content": QUESTION}] and edit["prompt"] is None
    server.wait_edit(edit["id"])

    after = ask(QUESTION)
    assert after.choices[0].message.content.strip().startswith("Venus")
    assert after.model_extra["memoir"]["edit"]["id"] == edit["id"]
    base = ask(QUESTION, f"{model}:base")
    assert base.choices[0].message.content == before.choices[0].message.content
    assert base.model_extra["memoir"]["edit"] is None
    unrelated = ask(UNRELATED)
    assert unrelated.model_extra["memoir"]["edit"] is None
    assert unrelated.choices[0].message.content == unrelated_before
