// Building the page from data: every value goes in as text, never as markup.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...children.flat(Infinity).filter((child) => child !== undefined && child !== null && child !== false));
  return element;
}

export function showError(element, error) {
  element.textContent = error ? error.message : "";
  element.hidden = !error;
}

export function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export function secondsBetween(startIso, endIso) {
  return startIso && endIso ? (new Date(endIso) - new Date(startIso)) / 1000 : null;
}

export function quoted(text, length = 80) {
  const flat = text.replace(/\s+/g, " ").trim();
  return `“${flat.length > length ? `${flat.slice(0, length - 1)}…` : flat}”`;
}

// what an edit (or an explained match) was asked as: its prompt, or its last user message
export function questionOf(edit) {
  if (!edit.messages) return edit.prompt;
  return edit.messages.filter((message) => message.role === "user").at(-1).content;
}
