// "Try it": one question answered with the edits and without them (/generate, use_edits true and
// false), which edit fired and its match ratio, and what /explain decides for the same question.

import { api } from "./api.js";
import { h, questionOf, quoted, showError } from "./dom.js";

export function tryIt(section, { onAnswered }) {
  const form = section.querySelector("#try-form");
  const withEdits = section.querySelector("#try-with");
  const withoutEdits = section.querySelector("#try-without");
  const explanation = section.querySelector("#try-explain");
  const explainError = section.querySelector("#try-explain-error");

  function part(article, name) {
    return article.querySelector(`.${name}`);
  }

  function clear() {
    for (const article of [withEdits, withoutEdits]) {
      part(article, "answer").textContent = "";
      showError(part(article, "error"), null);
    }
    part(withEdits, "fired").replaceChildren();
    delete part(withEdits, "fired").dataset.editId;
    explanation.replaceChildren();
    showError(explainError, null);
  }

  // the edit that answered, named by its seq and question when this key may read edits
  async function describeFired(fired, explained) {
    const match = explained?.edit?.id === fired.id ? explained.edit : await api(`edits/${encodeURIComponent(fired.id)}`).catch(() => null);
    const name = match ? `edit #${match.seq} ${quoted(questionOf(match))}` : `edit ${fired.id}`;
    return [h("strong", {}, name), ` answered, match ratio ${fired.match_ratio.toFixed(3)}`];
  }

  function describeExplained(explained) {
    if (explained.best_match === null) return ["no edit is stored: the memory stays off"];
    const best = explained.best_match;
    return [
      `best match: edit #${best.seq} ${quoted(questionOf(best))}, match ratio ${explained.match_ratio.toFixed(3)} `,
      explained.fires ? "≥" : "<",
      ` τ ${explained.threshold.toFixed(3)}: `,
      h("strong", {}, explained.fires ? "the memory fires" : "the memory stays off"),
      ` (memory up to seq ${explained.edit_seq ?? "—"})`,
    ];
  }

  async function ask(event) {
    event.preventDefault();
    const prompt = form.elements.prompt.value;
    const chat = form.elements.chat.checked;
    const request = { prompt, chat, max_new_tokens: Number(form.elements.max_new_tokens.value) };
    const question = chat ? { messages: [{ role: "user", content: prompt }] } : { prompt };
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    section.setAttribute("aria-busy", "true");
    clear();
    const [edited, unedited, explained] = await Promise.allSettled([
      api("generate", { method: "POST", body: { ...request, use_edits: true } }),
      api("generate", { method: "POST", body: { ...request, use_edits: false } }),
      api("explain", { method: "POST", body: question }),
    ]);
    for (const [article, outcome] of [[withEdits, edited], [withoutEdits, unedited]]) {
      if (outcome.status === "fulfilled") part(article, "answer").textContent = outcome.value.text;
      else showError(part(article, "error"), outcome.reason);
    }
    const explainedValue = explained.status === "fulfilled" ? explained.value : null;
    if (explainedValue) explanation.replaceChildren(...describeExplained(explainedValue));
    else showError(explainError, new Error(`explain: ${explained.reason.message}`));
    if (edited.status === "fulfilled") {
      const fired = part(withEdits, "fired");
      if (edited.value.edit) {
        fired.dataset.editId = edited.value.edit.id;
        fired.replaceChildren(...(await describeFired(edited.value.edit, explainedValue)));
      } else {
        fired.replaceChildren("no edit fired: the memory stayed off");
      }
    }
    button.disabled = false;
    section.setAttribute("aria-busy", "false");
    onAnswered(); // an open history counts the generations its edit answered
  }

  form.addEventListener("submit", ask);

  // fill in a question (from a submitted edit) and ask it
  function askAbout(prompt, chat) {
    form.elements.prompt.value = prompt;
    form.elements.chat.checked = chat;
    form.requestSubmit();
    section.scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  return { askAbout };
}
