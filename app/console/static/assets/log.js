// The edit log: newest first, filtered by status, paged; each row opens its history, and a queued
// edit can be cancelled or an applied one retracted after a confirmation.

import { api } from "./api.js";
import { h, localTime, secondsBetween, showError } from "./dom.js";

const STATUSES = ["queued", "running", "applied", "failed", "cancelled", "retracted"];
const PAGE_SIZE = 20;

export function isPending(edit) {
  return edit.status === "queued" || edit.status === "running" || edit.retraction_pending;
}

export function editLog(section, { confirm, onChange }) {
  const body = section.querySelector("tbody");
  const error = section.querySelector("#log-error"); // reading the log; cleared by the next read
  const actionError = section.querySelector("#action-error"); // a history, cancel or retract; kept until the next
  const filter = section.querySelector("#log-status");
  const pageNote = section.querySelector("#log-page");
  const newer = section.querySelector("#log-newer");
  const older = section.querySelector("#log-older");
  const view = { status: "", page: 0, total: 0, items: [], shown: "", denied: false };
  const histories = new Map(); // id of an open row -> its GET /edits/{id} (null while loading)

  filter.append(...STATUSES.map((status) => h("option", { value: status }, status)));
  filter.addEventListener("change", () => {
    Object.assign(view, { status: filter.value, page: 0 });
    onChange();
  });
  newer.addEventListener("click", () => {
    view.page = Math.max(0, view.page - 1);
    onChange();
  });
  older.addEventListener("click", () => {
    view.page += 1;
    onChange();
  });

  // the API lists in seq order; page 0 is the newest PAGE_SIZE edits
  function windowOf(total) {
    const lastPage = Math.max(0, Math.ceil(total / PAGE_SIZE) - 1);
    view.page = Math.min(view.page, lastPage);
    const end = total - view.page * PAGE_SIZE;
    const offset = Math.max(0, end - PAGE_SIZE);
    return { offset, limit: Math.max(1, end - offset) };
  }

  async function fetchPage() {
    const query = { status: view.status, ...windowOf(view.total) };
    let page = await api("edits", { query });
    const wanted = windowOf(page.total);
    if (wanted.offset !== query.offset || wanted.limit !== query.limit) {
      page = await api("edits", { query: { status: view.status, ...wanted } }); // edits arrived meanwhile
    }
    return page;
  }

  // Returns whether anything shown changed, so that the caller refreshes what depends on it.
  async function refresh() {
    let page;
    try {
      page = await fetchPage();
      showError(error, null);
    } catch (failure) {
      showError(error, failure);
      view.denied = failure.status === 401 || failure.status === 403;
      if (view.denied) {
        view.items = []; // what another key could read is not left on screen
        render();
      }
      return false; // otherwise (the server restarting, say) the last page stays, under the error
    }
    view.denied = false;
    view.total = page.total;
    view.items = page.items.slice().reverse();
    // open histories are read again: new events, and the count of generations the edit answered
    for (const edit of view.items) if (histories.get(edit.id)) loadHistory(edit.id);
    return render();
  }

  async function loadHistory(id) {
    try {
      const edit = await api(`edits/${encodeURIComponent(id)}`);
      if (histories.has(id)) histories.set(id, edit);
    } catch (failure) {
      showError(actionError, failure);
      histories.delete(id);
    }
    render();
  }

  function toggleHistory(id) {
    showError(actionError, null);
    if (histories.has(id)) {
      histories.delete(id);
      render();
    } else {
      histories.set(id, null);
      render();
      loadHistory(id);
    }
  }

  async function remove(edit) {
    const retract = edit.status === "applied";
    const question = retract
      ? `Retract edit #${edit.seq}? The memory is rebuilt without it (this retrains the edits after the ` +
        `last checkpoint before it); the edit stays in the log as retracted.`
      : `Cancel edit #${edit.seq} before it is trained?`;
    if (!(await confirm(question, retract ? "retract" : "cancel the edit"))) return;
    try {
      await api(`edits/${encodeURIComponent(edit.id)}`, { method: "DELETE" });
      showError(actionError, null);
    } catch (failure) {
      showError(actionError, failure);
    }
    onChange();
  }

  function render() {
    const shown = JSON.stringify([view.items, [...histories]]);
    const first = view.items.length ? view.items.at(-1).seq : null;
    const last = view.items.length ? view.items[0].seq : null;
    pageNote.textContent = view.total ? `#${first}–#${last} · ${view.total} ${view.status || "edits"} in all` : "no edits";
    newer.disabled = view.page === 0;
    older.disabled = (view.page + 1) * PAGE_SIZE >= view.total;
    if (shown === view.shown) return false;
    view.shown = shown;
    body.replaceChildren(
      ...view.items.flatMap((edit) => (histories.has(edit.id) ? [row(edit), historyRow(histories.get(edit.id))] : [row(edit)]))
    );
    return true;
  }

  function row(edit) {
    const status = edit.retraction_pending ? "retracting" : edit.status;
    const took = secondsBetween(edit.started_at, edit.finished_at);
    return h(
      "tr",
      { dataset: { id: edit.id, seq: edit.seq } },
      h("td", { class: "seq" }, `#${edit.seq}`),
      h(
        "td",
        {},
        h("span", { class: `status ${status}` }, status),
        took !== null && edit.status !== "cancelled" && h("div", { class: "note" }, `${took.toFixed(1)} s`),
        edit.error && h("div", { class: "edit-error" }, edit.error)
      ),
      h("td", { class: "prompt" }, question(edit), paraphrases(edit)),
      h("td", { class: "target" }, edit.target),
      h("td", { class: "number" }, edit.loss === null ? "" : edit.loss.toPrecision(3)),
      h("td", { class: "number" }, edit.iterations ?? ""),
      h("td", { title: times(edit) }, localTime(edit.created_at)),
      h("td", { class: "who" }, edit.created_by ?? "—"),
      h("td", { class: "actions" }, actions(edit))
    );
  }

  function question(edit) {
    if (!edit.messages) return h("div", { class: "text" }, edit.prompt);
    return edit.messages.map((message) =>
      h("div", { class: "message" }, h("span", { class: "role" }, message.role), " ", message.content)
    );
  }

  function paraphrases(edit) {
    if (!edit.paraphrases?.length) return null;
    const texts = edit.paraphrases.map((p) => (typeof p === "string" ? p : p.map((m) => m.content).join(" / ")));
    return h("div", { class: "note paraphrases" }, `also: ${texts.join(" · ")}`);
  }

  function times(edit) {
    const moments = [
      ["submitted", edit.created_at],
      ["started", edit.started_at],
      ["finished", edit.finished_at],
      ["retracted", edit.retracted_at],
    ];
    return moments.filter(([, at]) => at).map(([what, at]) => `${what} ${localTime(at)}`).join("\n");
  }

  function actions(edit) {
    const open = histories.has(edit.id);
    return [
      h("button", { type: "button", class: "history", "aria-expanded": String(open), onclick: () => toggleHistory(edit.id) }, "history"),
      edit.status === "queued" && h("button", { type: "button", class: "cancel", onclick: () => remove(edit) }, "cancel"),
      edit.status === "applied" &&
        !edit.retraction_pending &&
        h("button", { type: "button", class: "retract danger", onclick: () => remove(edit) }, "retract"),
    ];
  }

  function historyRow(edit) {
    if (edit === null) return h("tr", { class: "history" }, h("td", { colspan: 9 }, "loading the history…"));
    const events = edit.history.map((event) =>
      h(
        "li",
        { dataset: { action: event.action } },
        h("time", { datetime: event.at }, localTime(event.at)),
        " ",
        h("strong", {}, event.action.replaceAll("_", " ")),
        event.key_id && ` by ${event.key_id}`,
        event.detail && h("span", { class: "note" }, ` ${details(event.detail)}`)
      )
    );
    const fires = edit.fires === null ? null : h("p", { class: "note fires" }, `its memory answered ${edit.fires} generation request(s) since the server started`);
    return h("tr", { class: "history", dataset: { for: edit.id } }, h("td", { colspan: 9 }, h("ol", {}, events), fires));
  }

  return { refresh, pending: () => view.items.some(isPending), denied: () => view.denied };
}

function details(detail) {
  return Object.entries(detail)
    .map(([name, value]) => `${name.replaceAll("_", " ")}: ${shortValue(value)}`)
    .join(", ");
}

function shortValue(value) {
  if (typeof value === "number" && !Number.isInteger(value)) return String(Number(value.toPrecision(4)));
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}
