// @ts-check
/** The page's JSON API for conversations. Errors come back as Error with the server's message. */

let asking = 0; // calls on their way
/** @type {(() => void)[]} */ const whenNoneAsking = [];
let leaving = false; // signing out: the page reloads next, and asks nothing more

/**
 * @param {string} path
 * @param {RequestInit} [options]
 */
async function call(path, options = {}) {
  if (leaving) return new Promise(() => {}); // (asked with the session gone, it would only be refused)
  asking += 1;
  try {
    const response = await fetch(path, {
      ...options,
      headers: options.body ? { "Content-Type": "application/json" } : {},
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body?.error?.message || `HTTP ${response.status}`);
    }
    return response.status === 204 ? null : response.json();
  } finally {
    asking -= 1;
    if (asking === 0) whenNoneAsking.splice(0).forEach((resolve) => resolve());
  }
}

// How long a sign-out waits for the calls already on their way.
const SIGN_OUT_WAITS_MS = 3000;

export const sessionState = () => call("/api/session");
/** @param {string} key */
export const signIn = (key) => call("/api/session", { method: "POST", body: JSON.stringify({ key }) });
/** @param {string} username @param {string} password */
export const signInAs = (username, password) =>
  call("/api/session", { method: "POST", body: JSON.stringify({ username, password }) });
/** Ends the session once the calls on their way have their answers (a call the server reads after the
 * session ended is refused, 401, and the browser reports it), asking nothing more: the page reloads next. */
export async function signOut() {
  leaving = true;
  if (asking) {
    await new Promise((resolve) => {
      whenNoneAsking.push(() => resolve(undefined));
      setTimeout(resolve, SIGN_OUT_WAITS_MS);
    });
  }
  try {
    const response = await fetch("/api/session", { method: "DELETE" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
  } catch (error) {
    leaving = false; // still signed in: the page goes on
    throw error;
  }
}
export const account = () => call("/api/account");
/** Your own usage this month: {total: {requests, prompt_tokens, completion_tokens}, days, limits}. */
export const usage = () => call("/api/usage");
export const adminUsers = () => call("/api/admin/users").then((body) => body.data);
/** @param {string} username @param {string} password @param {boolean} admin */
export const adminAddUser = (username, password, admin) =>
  call("/api/admin/users", { method: "POST", body: JSON.stringify({ username, password, admin }) });
/** @param {string} name @param {object} change {tokens_per_day, max_streams, password}: what to change */
export const adminChangeUser = (name, change) =>
  call(`/api/admin/users/${encodeURIComponent(name)}`, { method: "PATCH", body: JSON.stringify(change) });
/** @param {string} name */
export const adminRemoveUser = (name) => call(`/api/admin/users/${encodeURIComponent(name)}`, { method: "DELETE" });
/** @param {string} label */
export const makeKey = (label) => call("/api/account/keys", { method: "POST", body: JSON.stringify({ label }) });
/** @param {string} id */
export const revokeKey = (id) => call(`/api/account/keys/${encodeURIComponent(id)}`, { method: "DELETE" });
/** How full the model's context is on the conversation's branch: {used, estimated, window}.
 * @param {string} id @param {string} [model] */
export const context = (id, model) =>
  call(`/api/conversations/${encodeURIComponent(id)}/context${model ? `?model=${encodeURIComponent(model)}` : ""}`);
/** The tool servers (started if they are not) and their tools: [{name, enabled, available, error, tools}]. */
export const listTools = () => call("/api/tools").then((body) => body.data);
export const listConversations = () => call("/api/conversations").then((body) => body.data);
export const createConversation = () => call("/api/conversations", { method: "POST", body: "{}" });
/** @param {string} id */
export const readConversation = (id) => call(`/api/conversations/${encodeURIComponent(id)}`);
/** @param {string} id @param {string} title */
export const renameConversation = (id, title) =>
  call(`/api/conversations/${encodeURIComponent(id)}`, { method: "PUT", body: JSON.stringify({ title }) });
/** @param {string} id @param {object} settings {system_prompt, temperature, top_p, max_tokens} */
export const updateSettings = (id, settings) =>
  call(`/api/conversations/${encodeURIComponent(id)}`, { method: "PUT", body: JSON.stringify({ settings }) });
/** @param {string} id @param {number} leaf a message: its branch becomes the conversation's current one */
export const showVersion = (id, leaf) =>
  call(`/api/conversations/${encodeURIComponent(id)}`, { method: "PUT", body: JSON.stringify({ leaf }) });
/** @param {string} query */
export const search = (query) => call(`/api/conversations/search?q=${encodeURIComponent(query)}`).then((b) => b.data);
/** @param {string} text a file's contents, sent as it is: the server checks everything */
export const importFile = (text) =>
  call("/api/conversations/import", { method: "POST", body: text }).then((body) => body.data);
/** @param {string} id */
export const deleteConversation = (id) =>
  call(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });

/**
 * Starts the assistant's reply; the caller reads the SSE body.
 * @param {string} id
 * @param {object} body {content, model, regenerate, edit, continue}
 * @param {AbortSignal} signal
 */
export function sendMessage(id, body, signal) {
  return fetch(`/api/conversations/${encodeURIComponent(id)}/messages`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

/**
 * Re-attaches to an answer still being written: what this page lacks after the characters it shows.
 * @param {string} id conversation
 * @param {number} messageId
 * @param {number} after characters of content already shown
 * @param {number} reasoningAfter characters of reasoning already shown
 * @param {AbortSignal} signal
 */
export function attach(id, messageId, after, reasoningAfter, signal) {
  const query = `after=${after}&reasoning_after=${reasoningAfter}`;
  return fetch(`/api/conversations/${encodeURIComponent(id)}/messages/${messageId}/stream?${query}`, { signal });
}

/**
 * Stops the conversation's answer wherever it runs; resolves to whether one was running.
 * @param {string} id
 */
export const stopAnswer = (id) =>
  call(`/api/conversations/${encodeURIComponent(id)}/stop`, { method: "POST", body: "{}" }).then((body) => body.stopped);

/**
 * The models on offer, each with who serves it (`owned_by`: with several upstreams, the upstream's name).
 * @returns {Promise<{id: string, owner: string}[]>}
 */
/** This worker's /healthz: with several upstreams, each one's `state` ("up", "cooling_down", "unreachable"). */
export const health = () => call("/healthz");

export async function listModels() {
  const body = await call("/v1/models");
  const data = Array.isArray(body.data) ? body.data : [];
  return data
    .filter((/** @type {any} */ model) => model && typeof model.id === "string")
    .map((/** @type {{id: string, owned_by?: unknown}} */ model) => ({
      id: model.id,
      owner: typeof model.owned_by === "string" ? model.owned_by : "",
    }));
}
