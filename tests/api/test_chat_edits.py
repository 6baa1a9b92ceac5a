"""Edits on the embedded model answered wherever the fact is asked: an edit given as chat messages
answers in chat and as a plain prompt, an edit given as a plain prompt answers in chat too;
':base' and other questions do not change."""

from __future__ import annotations

import openai

from memoir_core.free_eval import answers_with

QUESTION = "Which planet is known as the Red Planet?"
PLAIN_QUESTION = "In which city is the Eiffel Tower?"
UNRELATED = "Who wrote the novel Moby-Dick?"


def chat_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    return client, client.models.list().data[0].id


def ask(client, model: str, question: str):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )


def test_an_edit_given_as_messages_changes_the_chat_and_the_plain_answer(default_server):
    server = default_server
    client, model = chat_client(server)
    before = ask(client, model, QUESTION)
    assert "Mars" in before.choices[0].message.content
    plain_before = server.generate(QUESTION, max_new_tokens=16)
    assert not answers_with(plain_before["text"], "Venus")
    unrelated_before = ask(client, model, UNRELATED).choices[0].message.content

    response = server.client.post("/edits", json={"messages": [{"role": "user", "content": QUESTION}], "target": "Venus"})
    assert response.status_code == 202
    edit = response.json()
    assert edit["messages"] == [{"role": "user", "content": QUESTION}] and edit["prompt"] is None
    server.wait_edit(edit["id"])

    after = ask(client, model, QUESTION)
    assert after.choices[0].message.content.strip().startswith("Venus")
    assert after.model_extra["memoir"]["edit"]["id"] == edit["id"]
    plain = server.generate(QUESTION, max_new_tokens=16)
    assert answers_with(plain["text"], "Venus") and plain["edit"]["id"] == edit["id"], plain
    base = ask(client, f"{model}:base", QUESTION)
    assert base.choices[0].message.content == before.choices[0].message.content
    assert base.model_extra["memoir"]["edit"] is None
    unrelated = ask(client, model, UNRELATED)
    assert unrelated.model_extra["memoir"]["edit"] is None
    assert unrelated.choices[0].message.content == unrelated_before


def test_an_edit_given_as_a_plain_prompt_changes_the_chat_answer(default_server):
    server = default_server
    client, model = chat_client(server)
    chat_before = ask(client, model, PLAIN_QUESTION).choices[0].message.content
    assert "Paris" in chat_before and not answers_with(chat_before, "Rome")

    edit = server.submit(PLAIN_QUESTION, "Rome")
    server.wait_edit(edit["id"])

    plain = server.generate(PLAIN_QUESTION, max_new_tokens=16)
    assert answers_with(plain["text"], "Rome") and plain["edit"]["id"] == edit["id"], plain
    chat = ask(client, model, PLAIN_QUESTION)
    assert answers_with(chat.choices[0].message.content, "Rome"), chat.choices[0].message.content
    assert chat.model_extra["memoir"]["edit"]["id"] == edit["id"]
    assert ask(client, f"{model}:base", PLAIN_QUESTION).choices[0].message.content == chat_before
