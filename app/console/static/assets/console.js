// The console's wiring: the key form, the confirmation dialog, and one refresh loop that polls
// every second while an edit is queued, running or being retracted, every 5 s otherwise, and not
// at all while the key is refused (until the key changes or the user acts).

import { apiKey } from "./api.js";
import { editLog } from "./log.js";
import { serverState } from "./state.js";
import { submitForm } from "./submit.js";
import { tryIt } from "./tryit.js";

const BUSY_POLL_MS = 1000;
const IDLE_POLL_MS = 5000;

function confirmDialog(dialog) {
  const text = dialog.querySelector("#confirm-text");
  const yes = dialog.querySelector("#confirm-yes");
  return (question, verb) =>
    new Promise((resolve) => {
      text.textContent = question;
      yes.textContent = verb;
      dialog.returnValue = "";
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.showModal();
      dialog.querySelector("#confirm-no").focus(); // the safe choice is the default
    });
}

function keyForm(form, onChange) {
  const input = form.querySelector("#key");
  const note = form.querySelector("#key-note");
  function show(refused = false) {
    if (apiKey.get()) note.textContent = "kept in this tab until it closes";
    else note.textContent = refused ? "this server needs a key" : "no key: fine when the server has none";
  }
  function use(key) {
    apiKey.set(key);
    input.value = key;
    show();
    onChange();
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    use(input.value.trim());
  });
  form.querySelector("#key-forget").addEventListener("click", () => use(""));
  input.value = apiKey.get();
  show();
  return { show };
}

function start() {
  const poll = { timer: 0, running: false, again: false, busy: true, stateDue: true };
  const refreshNow = () => tick();

  const state = serverState(document.querySelector("#state"));
  const log = editLog(document.querySelector("#log"), {
    confirm: confirmDialog(document.querySelector("#confirm")),
    onChange: refreshNow,
  });
  const tryit = tryIt(document.querySelector("#try"), { onAnswered: refreshNow });
  const submit = submitForm(document.querySelector("#submit"), { onSubmitted: refreshNow, onTry: tryit.askAbout });
  const key = keyForm(document.querySelector("#key-form"), () => {
    state.forget();
    poll.stateDue = true;
    tick();
  });

  async function refreshAll() {
    const [changed] = await Promise.all([log.refresh(), submit.refresh()]);
    // /state hashes the memory: while edits move, ask for it only when the log changed
    if (changed || poll.stateDue || !poll.busy) await state.refresh();
    poll.stateDue = false;
    key.show(log.denied());
    return log.pending() || submit.pending();
  }

  async function tick() {
    if (poll.running) {
      poll.again = true;
      return;
    }
    poll.running = true;
    clearTimeout(poll.timer);
    try {
      do {
        poll.again = false;
        poll.busy = await refreshAll();
      } while (poll.again);
    } finally {
      poll.running = false;
      // refused for want of a key: wait for a key or an action rather than raise auth failures
      if (!log.denied()) poll.timer = setTimeout(tick, poll.busy ? BUSY_POLL_MS : IDLE_POLL_MS);
    }
  }

  tick();
}

start();
