// State at a glance: /ready needs no key; /state (admin) adds the model, τ and the applied seq,
// and whatever else it reports (a replica's role and lag, say) is shown as it comes.

import { api } from "./api.js";
import { h } from "./dom.js";

const LABELLED = { model: "model", applied: "edits in memory", threshold: "τ", last_seq: "applied seq" };
const NOT_AT_A_GLANCE = new Set([
  "weights_sha256", "masks_sha256", "keys", "layer", "top_k", "threshold_calibrated",
  "edit_lr", "edit_decay", "edit_protect",
]);

function isDenied(error) {
  return error.status === 401 || error.status === 403;
}

export function serverState(list) {
  // A refusal is not asked again until the key changes (forget): each one counts as an auth
  // failure in the server's metrics, and an idle tab should not raise them every few seconds.
  let refused = {};
  let modelName = null;

  async function ask(path) {
    if (refused[path]) return { error: refused[path] };
    try {
      return { value: await api(path) };
    } catch (error) {
      if (isDenied(error)) refused[path] = error;
      return { error };
    }
  }

  function item(field, label, value, title) {
    return [h("dt", {}, label), h("dd", { dataset: { field }, title }, value)];
  }

  function valueOf(field, value, state) {
    if (value === null || value === undefined) return "—";
    if (field === "threshold") return `${value.toFixed(3)}${state.threshold_calibrated ? " (calibrated)" : ""}`;
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }

  async function refresh() {
    const ready = await api("ready").catch((error) => error.body ?? { status: error.message });
    const items = [item("server", "server", ready.status)];
    const state = await ask("state");
    if (state.value) {
      const body = state.value;
      for (const [field, label] of Object.entries(LABELLED)) items.push(item(field, label, valueOf(field, body[field], body)));
      const replica = body.replica;
      if (replica) {  // several replicas on one database: which one answered, and how far behind it is
        items.push(item("role", "role", replica.role, replica.name));
        items.push(item("lag", "lag", `${replica.lag_changes} changes, ${replica.lag_seconds} s`));
      }
      for (const [field, value] of Object.entries(body)) {
        if (field !== "replica" && !(field in LABELLED) && !NOT_AT_A_GLANCE.has(field)) {
          items.push(item(field, field.replaceAll("_", " "), valueOf(field, value, body)));
        }
      }
    } else {
      if (modelName === null) modelName = (await ask("v1/models")).value?.data[0].id ?? null;
      if (modelName !== null) items.push(item("model", "model", modelName));
      if (ready.edits_in_memory !== undefined) items.push(item("applied", "edits in memory", String(ready.edits_in_memory)));
      const why = isDenied(state.error) ? "need an admin key" : state.error.message;
      items.push(item("state-error", "τ and seq", why, state.error.message));
    }
    list.replaceChildren(...items.flat());
  }

  return {
    refresh,
    forget: () => {
      refused = {};
    },
  };
}
