// Calls to the API beside this page. The key is the user's own and is sent as they typed it, so
// the API's scopes decide every request; it lives in sessionStorage, gone when the tab closes.

const KEY_ITEM = "memoir-console-api-key";
const API_ROOT = new URL("../", document.baseURI); // the page is <root>/console/, the API is <root>/

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_ITEM) || "",
  set: (value) => (value ? sessionStorage.setItem(KEY_ITEM, value) : sessionStorage.removeItem(KEY_ITEM)),
};

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, API_ROOT);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json" };
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(0, `the server did not answer (${error.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: the text itself is the message
  }
  if (!response.ok) {
    const status = [response.status, response.statusText].filter(Boolean).join(" ");
    throw new ApiError(response.status, `${status}: ${detailOf(data, text)}`, data);
  }
  return data;
}

// FastAPI's {"detail": "..."} or its list of field errors, or the OpenAI envelope under /v1
function detailOf(data, text) {
  const detail = data?.detail ?? data?.error?.message ?? data?.error ?? data?.status ?? text;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        const where = (item.loc || []).filter((part) => part !== "body").join(".");
        return where ? `${where}: ${item.msg}` : item.msg;
      })
      .join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}
