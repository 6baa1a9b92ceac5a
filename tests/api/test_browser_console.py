"""The edit console at /console/ in a real headless Chromium, against real servers: the whole
correction loop on the embedded model, and API keys passed through without widening any scope.

(The file's name sorts it before the other tests of the shared default_server: its retraction
then has no earlier edits to retrain.)"""

from __future__ import annotations

import os
import re
import tomllib

from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect
import pytest

from app.config import Settings
from app.console import STATIC
from app.main import create_app
from memoir_core.free_eval import answers_with
from tests.api.conftest import TINY_ENV
from tests.browser import chromium
from tests.server import REPO, Server

QUESTION = "Who painted the Mona Lisa?"
TARGET = "Claude Monet"
CANCELLED = ("Who composed The Four Seasons?", "Mozart")
EDIT_TIMEOUT_MS = 240_000  # training and a retraction on the 135M model, on a busy 2-core machine
# set to write the README's screenshot, e.g. MEMOIR_CONSOLE_SCREENSHOT=docs/console.png
SCREENSHOT = os.environ.get("MEMOIR_CONSOLE_SCREENSHOT")


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], f"the page raised: {errors}"


def open_console(page: Page, url: str) -> None:
    page.goto(f"{url}/console")  # redirects to /console/
    expect(page.locator("#state [data-field=server]")).to_have_text("ready")


def ask(page: Page, question: str, chat: bool) -> tuple[str, str]:
    form = page.locator("#try-form")
    form.locator("[name=prompt]").fill(question)
    form.locator("[name=chat]").set_checked(chat)
    form.locator("button[type=submit]").click()
    expect(page.locator("#try")).to_have_attribute("aria-busy", "false", timeout=60_000)
    return page.locator("#try-with .answer").inner_text(), page.locator("#try-without .answer").inner_text()


def submit(page: Page, prompt: str, target: str) -> dict:
    form = page.locator("#submit-form")
    form.locator("[name=prompt]").fill(prompt)
    form.locator("[name=target]").fill(target)
    result = page.locator("#submit-result")
    before = result.get_attribute("data-id")
    form.locator("button[type=submit]").click()
    # the result line names the new edit (an id other than the previous one)
    expect(result).to_have_attribute("data-id", re.compile(rf"^(?!{re.escape(before)}$).+" if before else ".+"))
    return {"id": result.get_attribute("data-id"), "seq": result.get_attribute("data-seq")}


def row(page: Page, seq: str):
    return page.locator(f'#log tbody tr[data-seq="{seq}"]')


def confirm(page: Page) -> None:
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    dialog.locator("#confirm-yes").click()
    expect(dialog).to_be_hidden()


def test_submit_watch_compare_cancel_and_retract_on_the_default_model(default_server, page, tmp_path):
    server = default_server
    open_console(page, server.url)

    with_before, without_before = ask(page, QUESTION, chat=True)
    assert with_before == without_before and not answers_with(with_before, TARGET)
    expect(page.locator("#try-with .fired")).to_have_text("no edit fired: the memory stayed off")

    edit = submit(page, QUESTION, TARGET)
    queued = submit(page, *CANCELLED)  # waits behind the first edit's training
    expect(row(page, queued["seq"]).locator(".status")).to_have_text("queued")
    row(page, queued["seq"]).locator("button.cancel").click()
    confirm(page)
    expect(row(page, queued["seq"]).locator(".status")).to_have_text("cancelled")
    expect(page.locator("#submit-result")).to_have_attribute("data-status", "cancelled")  # it follows its last edit

    expect(row(page, edit["seq"]).locator(".status")).to_have_text("applied", timeout=EDIT_TIMEOUT_MS)
    row(page, edit["seq"]).locator("button.history").click()
    history = page.locator(f'#log tr.history[data-for="{edit["id"]}"]')
    for action in ("submitted", "started", "applied"):
        expect(history.locator(f'li[data-action="{action}"]')).to_have_count(1)

    with_edits, without_edits = ask(page, QUESTION, chat=True)
    assert answers_with(with_edits, TARGET), with_edits
    assert without_edits == without_before  # the unedited column keeps the old answer
    fired = page.locator("#try-with .fired")
    expect(fired).to_have_attribute("data-edit-id", edit["id"])
    expect(fired).to_contain_text(f"edit #{edit['seq']} “{QUESTION}” answered, match ratio")
    expect(page.locator("#try-explain")).to_contain_text(f"best match: edit #{edit['seq']}")
    expect(page.locator("#try-explain")).to_contain_text("the memory fires")
    expect(history.locator(".fires")).to_contain_text("answered 1 generation request(s)")
    page.screenshot(path=SCREENSHOT or tmp_path / "console.png", full_page=True)

    row(page, edit["seq"]).locator("button.retract").click()
    confirm(page)
    expect(row(page, edit["seq"]).locator(".status")).to_have_text("retracted", timeout=EDIT_TIMEOUT_MS)
    expect(history.locator('li[data-action="retracted"]')).to_have_count(1)
    with_after, without_after = ask(page, QUESTION, chat=True)
    assert with_after == with_before and without_after == without_before
    expect(page.locator("#try-with .fired")).to_have_text("no edit fired: the memory stayed off")


KEYS = "gen:generate:mk-console-gen,ed:edit:mk-console-edit,ops:admin:mk-console-admin"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_model_dir):
    """A tiny model with API keys; its edits train only a few steps (what they learn is not tested here)."""
    env = {**TINY_ENV, "MEMOIR_MODEL": str(tiny_model_dir), "MEMOIR_API_KEYS": KEYS, "MEMOIR_EDIT_MAX_ITERATIONS": "3"}
    server = Server(tmp_path_factory.mktemp("console-keys"), env).start()
    server.client.headers["Authorization"] = "Bearer mk-console-admin"
    yield server
    server.stop()


def use_key(page: Page, key: str) -> None:
    page.locator("#key").fill(key)
    page.locator("#key-form button[type=submit]").click()


def test_the_api_key_is_forwarded_and_kept_in_the_tab_only(keyed_server, page):
    server = keyed_server
    open_console(page, server.url)
    log_error = page.locator("#log-error")
    expect(log_error).to_contain_text("401 Unauthorized: missing API key")
    expect(page.locator("#state [data-field=state-error]")).to_have_text("need an admin key")
    expect(page.locator("#key-note")).to_have_text("this server needs a key")

    use_key(page, "mk-console-gen")
    expect(log_error).to_contain_text("403 Forbidden: API key 'gen' lacks the 'edit' scope")
    submit_error = page.locator("#submit-error")
    form = page.locator("#submit-form")
    form.locator("[name=prompt]").fill("The capital of the fictional land of Zembla is")
    form.locator("[name=target]").fill("Vostok")
    total = server.client.get("/edits").json()["total"]
    form.locator("button[type=submit]").click()
    expect(submit_error).to_contain_text("403 Forbidden: API key 'gen' lacks the 'edit' scope")
    assert server.client.get("/edits").json()["total"] == total

    assert page.evaluate("sessionStorage.getItem('memoir-console-api-key')") == "mk-console-gen"
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    page.reload()  # the tab keeps its key
    expect(log_error).to_contain_text("403 Forbidden")

    use_key(page, "mk-console-edit")  # may edit, may not retract
    expect(log_error).to_be_hidden()
    edit = submit(page, "The capital of the fictional land of Zembla is", "Vostok")
    expect(row(page, edit["seq"]).locator(".who")).to_have_text("ed")
    expect(row(page, edit["seq"]).locator(".status")).to_have_text("applied", timeout=EDIT_TIMEOUT_MS)
    row(page, edit["seq"]).locator("button.retract").click()
    confirm(page)
    expect(page.locator("#action-error")).to_have_text("403 Forbidden: retracting an applied edit needs the 'admin' scope")
    expect(row(page, edit["seq"]).locator(".status")).to_have_text("applied")

    page.locator("#key-forget").click()
    expect(log_error).to_contain_text("401 Unauthorized")
    assert page.evaluate("sessionStorage.length") == 0


def test_the_console_ships_in_the_package_and_can_be_switched_off():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    shipped = {path for pattern in patterns for path in (REPO / "app").glob(pattern)}
    assert {path for path in STATIC.rglob("*") if path.is_file()} == shipped  # what a wheel carries

    # the page needs no runtime: the app answers it without starting (no model is loaded here)
    served = TestClient(create_app(Settings())).get("/console/")
    assert served.status_code == 200 and served.text.startswith("<!doctype html>")
    assert "script-src 'self'" in served.headers["content-security-policy"]
    switched_off = TestClient(create_app(Settings(console=False)))
    assert [switched_off.get(path).status_code for path in ("/console/", "/console/assets/console.js")] == [404, 404]


def test_chat_messages_paraphrases_paging_and_the_status_filter(keyed_server, page):
    server = keyed_server
    first = server.client.get("/edits").json()["total"] + 1
    batch = [{"prompt": f"Fact number {i} about the moon of Zembla is", "target": f"answer {i}"} for i in range(23)]
    response = server.client.post("/edits", json={"edits": batch})
    assert response.status_code == 202
    ids = [edit["id"] for edit in response.json()["edits"]]
    cancelled = sum(server.client.delete(f"/edits/{edit_id}").status_code == 200 for edit_id in ids[1:])
    assert cancelled > 0

    open_console(page, server.url)
    use_key(page, "mk-console-admin")
    expect(page.locator("#state [data-field=threshold]")).to_have_text("0.900")  # /state, with the admin key
    expect(page.locator("#state [data-field=role]")).to_have_text("leader")  # the one process leads
    form = page.locator("#submit-form")
    form.locator("input[name=mode][value=messages]").check()
    expect(form.locator("[name=prompt]")).to_be_hidden()
    form.locator("#add-message").click()
    form.locator("#add-message").click()
    messages = form.locator("#messages li")
    expect(messages).to_have_count(3)
    messages.nth(0).locator("select").select_option("system")
    messages.nth(0).locator("textarea").fill("You answer in one word.")
    messages.nth(1).locator("select").select_option("user")
    messages.nth(1).locator("textarea").fill("Which moon circles Zembla?")
    messages.nth(2).locator("textarea").fill("Which moon orbits Zembla?")
    messages.nth(1).locator("button.remove").click()  # the middle one goes; the last is the user's question
    form.locator("[name=target]").fill("Selene")
    form.locator("[name=paraphrases]").fill("Name the moon of Zembla.\n\nWhat is Zembla's moon called?\n")
    form.locator("button[type=submit]").click()
    last = first + 23
    result = page.locator("#submit-result")
    expect(result).to_have_attribute("data-seq", str(last))
    stored = server.client.get(f"/edits/{result.get_attribute('data-id')}").json()
    assert stored["messages"] == [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Which moon orbits Zembla?"},
    ]
    assert stored["prompt"] is None and stored["target"] == "Selene" and stored["created_by"] == "ops"
    assert stored["paraphrases"] == ["Name the moon of Zembla.", "What is Zembla's moon called?"]

    newest = row(page, str(last))
    expect(newest.locator(".message .role")).to_have_text(["system", "user"])
    expect(newest.locator(".paraphrases")).to_have_text("also: Name the moon of Zembla. · What is Zembla's moon called?")

    rows = page.locator("#log tbody tr")
    note = page.locator("#log-page")
    expect(note).to_have_text(f"#{last - 19}–#{last} · {last} edits in all")
    expect(rows).to_have_count(20)
    expect(page.locator("#log-newer")).to_be_disabled()
    page.locator("#log-older").click()
    expect(note).to_have_text(f"#1–#{last - 20} · {last} edits in all")
    expect(rows).to_have_count(last - 20)
    expect(page.locator("#log-older")).to_be_disabled()

    page.locator("#log-status").select_option("cancelled")
    expect(note).to_contain_text(f"{cancelled} cancelled in all")
    expect(rows.locator(".status")).to_have_text(["cancelled"] * min(cancelled, 20))
    server.wait_idle()  # the messages edit is trained before the server stops
