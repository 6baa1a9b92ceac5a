// Submitting a correction as a plain prompt or as chat messages, then following it until it is
// applied or fails. The API checks every field; its 422 says what is wrong.

import { api } from "./api.js";
import { h, questionOf, quoted, showError } from "./dom.js";
import { isPending } from "./log.js";

const ROLES = ["system", "user", "assistant"];

export function submitForm(section, { onSubmitted, onTry }) {
  const form = section.querySelector("#submit-form");
  const promptField = section.querySelector("#prompt-field");
  const messagesField = section.querySelector("#messages-field");
  const messages = section.querySelector("#messages");
  const result = section.querySelector("#submit-result");
  const error = section.querySelector("#submit-error");
  let followed = null; // the edit this form submitted last

  function messageRow(role) {
    const remove = h("button", { type: "button", class: "remove", "aria-label": "remove this message" }, "×");
    const item = h(
      "li",
      {},
      h("select", { name: "role", "aria-label": "role" }, ROLES.map((r) => h("option", { value: r, selected: r === role }, r))),
      h("textarea", { name: "content", rows: 1, required: true, "aria-label": "content" }),
      remove
    );
    remove.addEventListener("click", () => {
      if (messages.children.length > 1) item.remove();
    });
    return item;
  }

  function mode() {
    return form.elements.mode.value;
  }

  function showMode() {
    const chat = mode() === "messages";
    // hidden fields are disabled too, so that the browser does not ask for them
    promptField.hidden = chat;
    form.elements.prompt.disabled = chat;
    messagesField.hidden = !chat;
    messagesField.disabled = !chat;
  }

  function bodyOf() {
    const body = { target: form.elements.target.value };
    if (mode() === "messages") {
      body.messages = [...messages.children].map((item) => ({
        role: item.querySelector("select").value,
        content: item.querySelector("textarea").value,
      }));
    } else {
      body.prompt = form.elements.prompt.value;
    }
    const paraphrases = form.elements.paraphrases.value.split("\n").map((line) => line.trim()).filter(Boolean);
    if (paraphrases.length) body.paraphrases = paraphrases;
    return body;
  }

  function show(edit) {
    followed = edit;
    const outcome =
      edit.status === "applied"
        ? `applied: loss ${edit.loss?.toPrecision(3)} after ${edit.iterations} iterations`
        : edit.status === "failed"
          ? `failed: ${edit.error}`
          : edit.status;
    const tryIt = h("button", { type: "button", class: "try" }, "try it");
    tryIt.addEventListener("click", () => onTry(questionOf(edit), Boolean(edit.messages)));
    result.replaceChildren(
      `#${edit.seq} ${quoted(questionOf(edit))} → ${quoted(edit.target)}: `,
      h("strong", { class: `status ${edit.status}` }, outcome),
      " ",
      tryIt
    );
    Object.assign(result.dataset, { id: edit.id, seq: edit.seq, status: edit.status });
    result.hidden = false;
  }

  form.addEventListener("change", (event) => {
    if (event.target.name === "mode") showMode();
  });
  section.querySelector("#add-message").addEventListener("click", () => {
    const last = messages.lastElementChild?.querySelector("select").value;
    messages.append(messageRow(last === "user" ? "assistant" : "user"));
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const edit = await api("edits", { method: "POST", body: bodyOf() });
      showError(error, null);
      show(edit);
      for (const name of ["prompt", "target", "paraphrases"]) form.elements[name].value = "";
      messages.replaceChildren(messageRow("user"));
      onSubmitted();
    } catch (failure) {
      showError(error, failure);
    } finally {
      button.disabled = false;
    }
  });

  messages.append(messageRow("user"));
  showMode();

  // follow the submitted edit until it is applied or fails
  async function refresh() {
    if (followed === null || !isPending(followed)) return;
    try {
      show(await api(`edits/${encodeURIComponent(followed.id)}`));
    } catch (failure) {
      showError(error, failure);
    }
  }

  return { refresh, pending: () => followed !== null && isPending(followed) };
}
