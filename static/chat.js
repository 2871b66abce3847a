// @ts-check
/**
 * The chat page. The server owns the conversation: it saves every answer as it
 * streams, so this page only shows what the server has and what is arriving.
 * Stop aborts the fetch; the server notices at once, cancels the generation and
 * keeps the partial answer with status "stopped". A thinking model's reasoning
 * arrives as `delta.reasoning_content` (whatever shape the upstream used) and
 * shows live in a block above the answer that folds away when the answer starts.
 */
import * as api from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { readEvents } from "./sse.js";

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const messagesView = $("messages");
const conversationList = $("conversation-list");
const form = /** @type {HTMLFormElement} */ ($("composer"));
const prompt = /** @type {HTMLTextAreaElement} */ ($("prompt"));
const sendButton = /** @type {HTMLButtonElement} */ ($("send"));
const stopButton = /** @type {HTMLButtonElement} */ ($("stop"));
const modelPicker = /** @type {HTMLSelectElement} */ ($("model"));
const title = $("title");
const editing = $("editing");

const LAST_CONVERSATION = "jarvis.conversation";
const LAST_MODEL = "jarvis.model";

/**
 * One answer this page shows as it streams: its current fetch, which may be re-attached many times.
 * @typedef {{conversationId: string, view: MessageView, messageId: number | null, traceId: string | null,
 *   controller: AbortController | null, stopping: Promise<unknown> | null, wake: (() => void) | null}} Following
 */

/** @type {{conversationId: string | null, following: Following | null, editId: number | null}} */
const state = { conversationId: null, following: null, editId: null };

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 30000;

// -- rendering ------------------------------------------------------------

/**
 * @typedef {{ttft_ms?: number | null, thinking_ms?: number | null, completion_tokens?: number | null,
 *   tokens_per_second?: number | null, upstream?: string}} AnswerStats
 * @typedef {{id?: number, role: string, content: string, reasoning?: string, status?: string,
 *   error?: string | null, trace_id?: string | null, stats?: AnswerStats | null}} Message
 */

/** @param {number} ms */
function seconds(ms) {
  const value = ms / 1000;
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} s`;
}

/**
 * One message on screen. Assistant text (and a thinking model's reasoning, in a collapsible block
 * above it) is rendered as sanitised Markdown, at most once per frame.
 */
class MessageView {
  /** @param {Message} message */
  constructor(message) {
    this.message = message;
    this.element = document.createElement("article");
    this.element.className = `message ${message.role}`;
    this.element.dataset.role = message.role;
    this.thinking = document.createElement("details");
    this.thinking.className = "thinking";
    this.thinkingLabel = document.createElement("summary");
    this.thinkingBody = document.createElement("div");
    this.thinkingBody.className = "thinking-content";
    this.thinking.append(this.thinkingLabel, this.thinkingBody);
    this.body = document.createElement("div");
    this.body.className = "content";
    this.errorNote = document.createElement("p");
    this.errorNote.className = "error";
    this.errorNote.hidden = true;
    this.statsLine = document.createElement("p");
    this.statsLine.className = "stats";
    this.statsLine.hidden = true;
    this.actions = document.createElement("div");
    this.actions.className = "actions";
    this.element.append(this.thinking, this.body, this.errorNote, this.statsLine, this.actions);
    this.text = message.content;
    this.reasoning = message.reasoning ?? "";
    this.renderedReasoning = null;
    /** @type {number | null} */ this.thinkingStartedAt = null; // this page's clock, while it watches
    /** @type {number | null} */ this.thinkingMs = message.stats?.thinking_ms ?? null;
    /** @type {ReturnType<typeof setInterval> | null} */ this.thinkingTimer = null;
    this.frameRequested = false;
    this.setStatus(message.status ?? "complete", message.error ?? null, message.trace_id ?? null);
    this.setStats(message.stats ?? null);
    this.render();
  }

  /**
   * Applies one streamed delta: reasoning, content, or the news that the content so far was reasoning.
   * @param {any} delta
   */
  applyDelta(delta) {
    if (!delta || typeof delta !== "object") return;
    if (delta.content_was_reasoning === true) {
      this.reasoning += this.text;
      this.text = "";
    }
    if (typeof delta.reasoning_content === "string" && delta.reasoning_content) {
      this.reasoning += delta.reasoning_content;
      if (this.thinkingStartedAt === null && !this.text) this.startThinking();
    }
    if (typeof delta.content === "string" && delta.content) {
      this.text += delta.content;
      if (this.thinkingStartedAt !== null) this.stopThinking();
    }
    this.scheduleRender();
  }

  startThinking() {
    this.thinkingStartedAt = performance.now();
    this.thinking.open = true;
    this.thinkingTimer = setInterval(() => this.labelThinking(), 1000);
  }

  /** The answer has started (or the stream ended): fold the thinking away, keep its duration. */
  stopThinking() {
    if (this.thinkingStartedAt === null) return;
    this.thinkingMs ??= performance.now() - this.thinkingStartedAt;
    this.thinkingStartedAt = null;
    if (this.thinkingTimer !== null) clearInterval(this.thinkingTimer);
    this.thinkingTimer = null;
    if (this.text) this.thinking.open = false;
    this.labelThinking();
  }

  labelThinking() {
    if (this.thinkingStartedAt !== null) {
      this.thinkingLabel.textContent = `Thinking… ${seconds(performance.now() - this.thinkingStartedAt)}`;
    } else {
      this.thinkingLabel.textContent = this.thinkingMs !== null ? `Thought for ${seconds(this.thinkingMs)}` : "Thoughts";
    }
  }

  scheduleRender() {
    if (this.frameRequested) return;
    this.frameRequested = true;
    requestAnimationFrame(() => this.render());
  }

  render() {
    this.frameRequested = false;
    if (this.message.role !== "assistant") {
      this.body.textContent = this.text;
      this.thinking.hidden = true;
      return;
    }
    this.thinking.hidden = !this.reasoning;
    if (this.reasoning !== this.renderedReasoning) {
      this.renderedReasoning = this.reasoning;
      showMarkdown(this.thinkingBody, this.reasoning);
      if (this.thinkingStartedAt !== null) this.thinkingBody.scrollTop = this.thinkingBody.scrollHeight;
    }
    this.labelThinking();
    showMarkdown(this.body, this.text);
  }

  /**
   * The stream ended: show what arrived and how it ended.
   * @param {string} status
   * @param {string | null} error
   * @param {string | null} traceId
   */
  finish(status, error, traceId) {
    this.stopThinking();
    this.render();
    this.setStatus(status, error, traceId);
  }

  /**
   * @param {string} status
   * @param {string | null} error
   * @param {string | null} traceId
   */
  setStatus(status, error, traceId) {
    if (this.message.role === "assistant") this.element.dataset.status = status;
    const notes = {
      error: error ? `Error: ${error}` : "Error",
      stopped: error ? `Stopped: ${error}` : "Stopped.",
      interrupted: "Interrupted: the answer was cut short.",
    };
    const note = notes[/** @type {keyof typeof notes} */ (status)];
    this.errorNote.hidden = !note;
    this.errorNote.textContent = note ? `${note}${status === "error" && traceId ? ` (trace ${traceId})` : ""}` : "";
  }

  /**
   * A passing note while the answer streams ("Reconnecting…"), or none.
   * @param {string | null} text
   * @param {HTMLElement | null} [action]
   */
  setNote(text, action = null) {
    this.errorNote.hidden = !text;
    this.errorNote.replaceChildren(...(text ? [text] : []), ...(action ? [" ", action] : []));
  }

  /** @param {AnswerStats | null} stats numbers from the server; nothing else is trusted */
  setStats(stats) {
    if (!stats || typeof stats !== "object") return;
    const number = (/** @type {unknown} */ value) => (typeof value === "number" && Number.isFinite(value) ? value : null);
    const ttft = number(stats.ttft_ms);
    const thinking = number(stats.thinking_ms);
    const tokens = number(stats.completion_tokens);
    const speed = number(stats.tokens_per_second);
    if (thinking !== null) this.thinkingMs = thinking;
    const parts = [];
    if (typeof stats.upstream === "string" && stats.upstream) parts.push(`via ${stats.upstream}`);
    if (ttft !== null) parts.push(`${seconds(ttft)} to first token`);
    if (thinking !== null) parts.push(`thought ${seconds(thinking)}`);
    if (tokens !== null) parts.push(`${tokens} tokens`);
    if (speed !== null) parts.push(`${speed.toFixed(1)} tokens/s`);
    this.statsLine.textContent = parts.join(" · ");
    this.statsLine.hidden = parts.length === 0;
    this.labelThinking();
  }
}

/**
 * @param {HTMLElement} target
 * @param {string} markdown untrusted
 */
function showMarkdown(target, markdown) {
  try {
    target.replaceChildren(renderMarkdown(markdown));
  } catch (error) {
    console.warn("rendering Markdown failed; showing plain text", error);
    target.textContent = markdown;
  }
}

/** The view of each message element on screen, for Copy. @type {WeakMap<Element, MessageView>} */
const views = new WeakMap();

/** @param {any} message */
function addMessage(message) {
  const view = new MessageView(message);
  views.set(view.element, view);
  messagesView.append(view.element);
  return view;
}

function scrollToEnd() {
  messagesView.scrollTop = messagesView.scrollHeight;
}

/** Adds Copy to every message, Edit to user messages and Regenerate to the last answer. */
function refreshActions() {
  const articles = [...messagesView.querySelectorAll("article.message")];
  for (const article of articles) {
    const copy = button("Copy", () => copyMessage(article, copy));
    copy.className = "copy-message";
    copy.title = "Copy this message's Markdown";
    article.querySelector(".actions")?.replaceChildren(copy);
  }
  const lastAssistant = articles.filter((a) => a.getAttribute("data-role") === "assistant").pop();
  if (lastAssistant && !state.following) {
    lastAssistant.querySelector(".actions")?.append(button("Regenerate", () => regenerate()));
  }
  for (const article of articles) {
    const id = Number(article.getAttribute("data-id"));
    if (article.getAttribute("data-role") === "user" && id && !state.following) {
      article.querySelector(".actions")?.append(button("Edit", () => startEdit(id, article)));
    }
  }
}

/**
 * Puts a message's exact Markdown (what the model wrote, or what was typed) on the clipboard.
 * @param {Element} article
 * @param {HTMLButtonElement} control
 */
function copyMessage(article, control) {
  const view = views.get(article);
  if (!view) return;
  navigator.clipboard.writeText(view.text).then(
    () => { control.textContent = "Copied"; setTimeout(() => { control.textContent = "Copy"; }, 1500); },
    (error) => console.warn("copy failed", error),
  );
}

/**
 * @param {string} label
 * @param {() => void} action
 */
function button(label, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", action);
  return element;
}

// -- conversations ------------------------------------------------------------

async function refreshConversationList() {
  const conversations = await api.listConversations();
  conversationList.replaceChildren(...conversations.map((/** @type {any} */ conversation) => {
    const item = document.createElement("li");
    item.className = conversation.id === state.conversationId ? "current" : "";
    const open = button(conversation.title, () => openConversation(conversation.id).catch(report));
    open.className = "open";
    if (conversation.id === state.conversationId) open.setAttribute("aria-current", "true");
    const rename = button("✎", () => renameConversation(conversation.id, conversation.title).catch(report));
    rename.setAttribute("aria-label", `Rename ${conversation.title}`);
    const remove = button("×", () => removeConversation(conversation.id).catch(report));
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    item.append(open);
    if (conversation.running === true) {
      item.classList.add("running");
      const halt = button("■", () => stopElsewhere(conversation.id).catch(report));
      halt.setAttribute("aria-label", `Stop the answer in ${conversation.title}`);
      halt.title = "An answer is being written here: stop it";
      item.append(halt);
    }
    item.append(rename, remove);
    return item;
  }));
  return conversations;
}

/** @param {string} id */
async function openConversation(id) {
  detach();
  const conversation = await api.readConversation(id);
  state.conversationId = id;
  localStorage.setItem(LAST_CONVERSATION, id);
  title.textContent = conversation.title;
  cancelEdit();
  messagesView.replaceChildren();
  /** @type {MessageView | null} */ let streaming = null;
  for (const message of conversation.messages) {
    const view = addMessage(message);
    view.element.dataset.id = String(message.id);
    if (message.status === "streaming") streaming = view;
  }
  refreshActions();
  scrollToEnd();
  await refreshConversationList();
  document.body.classList.remove("sidebar-open");
  if (streaming) {
    // Still being written (another tab, a reload, a lost connection): follow it from where it is.
    followAnswer(id, streaming, Number(streaming.message.id), null).catch(report);
  }
}

async function newConversation() {
  const conversation = await api.createConversation();
  await openConversation(conversation.id);
  prompt.focus();
}

/**
 * @param {string} id
 * @param {string} current
 */
async function renameConversation(id, current) {
  const name = window.prompt("Rename conversation", current);
  if (!name || !name.trim()) return;
  await api.renameConversation(id, name.trim());
  if (id === state.conversationId) title.textContent = name.trim();
  await refreshConversationList();
}

/** @param {string} id */
async function removeConversation(id) {
  if (!window.confirm("Delete this conversation?")) return;
  if (id === state.conversationId) detach();
  await api.deleteConversation(id);
  if (id === state.conversationId) {
    state.conversationId = null;
    localStorage.removeItem(LAST_CONVERSATION);
    messagesView.replaceChildren();
    title.textContent = "Jarvis";
  }
  await refreshConversationList();
}

// -- sending and streaming ------------------------------------------------------

/** @param {string} text */
async function send(text) {
  if (!state.conversationId) {
    const conversation = await api.createConversation();
    state.conversationId = conversation.id;
    localStorage.setItem(LAST_CONVERSATION, conversation.id);
  }
  const body = { content: text, model: modelPicker.value || undefined, edit: state.editId ?? undefined };
  if (state.editId !== null) {
    const edited = messagesView.querySelector(`article[data-id="${state.editId}"]`);
    while (edited?.nextElementSibling) edited.nextElementSibling.remove();
    edited?.remove();
    cancelEdit();
  }
  addMessage({ role: "user", content: text });
  await startAnswer(body);
}

async function regenerate() {
  const articles = [...messagesView.querySelectorAll("article.message")];
  const lastUser = articles.filter((a) => a.getAttribute("data-role") === "user").pop();
  while (lastUser?.nextElementSibling) lastUser.nextElementSibling.remove();
  await startAnswer({ regenerate: true, model: modelPicker.value || undefined });
}

/**
 * Starts an answer on the server and follows it into a new assistant message.
 * @param {object} body
 */
async function startAnswer(body) {
  const conversationId = /** @type {string} */ (state.conversationId);
  const view = addMessage({ role: "assistant", content: "", status: "streaming" });
  scrollToEnd();
  await followAnswer(conversationId, view, null, (signal) => api.sendMessage(conversationId, body, signal));
  await refreshConversationList().catch(report);
}

/**
 * Follows one answer until it ends: the server writes it whatever happens to this page, so a stream
 * that breaks without a Stop (a lost network, a suspended tab, a restarted worker) is re-attached from
 * what the page already shows, with back-off. Every way out ends in a status: complete, stopped,
 * error, or interrupted (the server that wrote it died).
 * @param {string} conversationId
 * @param {MessageView} view
 * @param {number | null} messageId known when re-attaching to an answer already running
 * @param {((signal: AbortSignal) => Promise<Response>) | null} start starts a new answer
 */
async function followAnswer(conversationId, view, messageId, start) {
  /** @type {Following} */
  const following = { conversationId, view, messageId, traceId: null, controller: null, stopping: null, wake: null };
  state.following = following;
  setStreaming(true);
  let outcome = { status: "interrupted", error: /** @type {string | null} */ (null) };
  let retryMs = RETRY_FIRST_MS;
  /** @type {unknown} */ let lastFailure = null;
  try {
    for (let first = true; ; first = false) {
      following.controller = new AbortController();
      try {
        const response = first && start
          ? await start(following.controller.signal)
          : await api.attach(conversationId, /** @type {number} */ (following.messageId), view.text.length,
            view.reasoning.length, following.controller.signal);
        if (first && start) {
          following.messageId = Number(response.headers.get("X-Message-Id")) || null;
          following.traceId = response.headers.get("X-Request-Id");
          if (following.messageId) view.element.dataset.id = String(following.messageId);
        }
        if (!response.ok) {
          const failure = await response.json().catch(() => ({}));
          outcome = { status: "error", error: failure?.error?.message ?? `HTTP ${response.status}` };
          break;
        }
        view.setNote(null);
        const ended = await readAnswer(response, view, () => { retryMs = RETRY_FIRST_MS; });
        if (ended) {
          outcome = ended;
          break;
        }
      } catch (failure) {
        lastFailure = failure;
        if (!following.stopping && !following.controller.signal.aborted) console.warn("the answer's stream broke", failure);
      }
      if (!following.messageId && !following.stopping) {
        // It never started: nothing on the server to re-attach to.
        outcome = { status: "error", error: lastFailure instanceof Error ? lastFailure.message : "the answer could not start" };
        break;
      }
      if (following.stopping || state.following !== following) break;
      view.setNote("Reconnecting…");
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, retryMs);
        following.wake = () => { clearTimeout(timer); resolve(undefined); };
      });
      following.wake = null;
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
      if (following.stopping || state.following !== following) break;
    }
    if (following.stopping) {
      await following.stopping;
      outcome = { status: "stopped", error: null };
    }
  } finally {
    if (state.following === following || following.stopping) {
      view.finish(outcome.status, outcome.error, following.traceId);
    }
    if (state.following === following) {
      state.following = null;
      setStreaming(false);
    }
    await settleWithServer(conversationId).catch(report);
  }
}

/**
 * Reads one attachment's events into the view. Returns how the answer ended, or null when the body
 * ended without saying (the caller re-attaches).
 * @param {Response} response
 * @param {MessageView} view
 * @param {() => void} progressed called when events arrive
 * @returns {Promise<{status: string, error: string | null} | null>}
 */
async function readAnswer(response, view, progressed) {
  let status = "complete";
  /** @type {string | null} */ let note = null;
  for await (const event of readEvents(response)) {
    progressed();
    if (event.type === "chunk") {
      const chunk = event.chunk ?? {};
      if (chunk.stats) view.setStats(chunk.stats);
      if (typeof chunk.status === "string") status = chunk.status;
      if (typeof chunk.note === "string") note = chunk.note;
      if (Array.isArray(chunk.waiting?.for)) showWaiting(view, chunk.waiting.for);
      const delta = chunk.choices?.[0]?.delta;
      if (delta && (delta.content || delta.reasoning_content)) view.setNote(null);
      view.applyDelta(delta);
    } else if (event.type === "error") {
      return { status: "error", error: String(event.error?.message ?? "the answer failed") };
    } else {
      return { status, error: note };
    }
  }
  return null;
}

/**
 * The embedded model is writing another answer first: say so, and offer to stop it.
 * @param {MessageView} view
 * @param {unknown[]} others conversation ids
 */
function showWaiting(view, others) {
  const other = others.find((id) => typeof id === "string");
  if (!other) return;
  const stopIt = button("Stop it", () => stopElsewhere(other).catch(report));
  view.setNote("Waiting for another answer to finish —", stopIt);
}

/**
 * Re-reads the conversation from the server, which owns it: ids for Edit, and the saved text.
 * @param {string} conversationId
 */
async function settleWithServer(conversationId) {
  if (state.conversationId !== conversationId || state.following) return;
  const conversation = await api.readConversation(conversationId);
  if (state.conversationId !== conversationId || state.following) return;
  title.textContent = conversation.title;
  const articles = [...messagesView.querySelectorAll("article.message")];
  conversation.messages.forEach((/** @type {any} */ message, /** @type {number} */ index) => {
    if (articles[index]) articles[index].setAttribute("data-id", String(message.id));
  });
  refreshActions();
  await refreshConversationList();
}

/** Stop: the server stops the answer at its source; this page stops reading at once. */
function stop() {
  const following = state.following;
  if (!following || following.stopping) return;
  following.view.setNote("Stopping…");
  following.stopping = api.stopAnswer(following.conversationId).catch(report);
  following.controller?.abort();
  following.wake?.();
}

/** Stop reading without stopping the answer (another conversation was opened): it runs on. */
function detach() {
  const following = state.following;
  if (!following) return;
  state.following = null;
  setStreaming(false);
  following.controller?.abort();
  following.wake?.();
}

/**
 * Stops the answer running in another conversation (from the list, or a waiting note).
 * @param {string} conversationId
 */
async function stopElsewhere(conversationId) {
  if (state.following?.conversationId === conversationId) {
    stop();
    return;
  }
  await api.stopAnswer(conversationId);
  await refreshConversationList();
}

/** The page came back (a tab made visible, the network back): re-attach at once rather than wait. */
function reattachNow() {
  const following = state.following;
  if (following) {
    if (following.wake) following.wake();
    else following.controller?.abort(); // a connection that may have died while the page slept
  } else if (state.conversationId) {
    openConversation(state.conversationId).catch(report);
  }
}

/** @param {boolean} streaming */
function setStreaming(streaming) {
  stopButton.disabled = !streaming;
  sendButton.disabled = streaming;
  if (streaming) refreshActions();
}

/**
 * @param {number} id
 * @param {Element} article
 */
function startEdit(id, article) {
  state.editId = id;
  prompt.value = article.querySelector(".content")?.textContent ?? "";
  editing.hidden = false;
  prompt.focus();
}

function cancelEdit() {
  state.editId = null;
  editing.hidden = true;
}

/** @param {unknown} error */
function report(error) {
  console.warn(error);
}

// -- start-up and keys -------------------------------------------------------------

/** Fills the model picker: grouped by upstream when the models come from several. */
async function loadModels() {
  try {
    const models = await api.listModels();
    const option = (/** @type {string} */ id) => {
      const element = document.createElement("option");
      element.value = element.textContent = id;
      return element;
    };
    /** @type {Map<string, string[]>} */
    const byOwner = new Map();
    for (const model of models) byOwner.set(model.owner, [...(byOwner.get(model.owner) ?? []), model.id]);
    if (byOwner.size > 1) {
      modelPicker.replaceChildren(...[...byOwner].map(([owner, ids]) => {
        const group = document.createElement("optgroup");
        group.label = owner || "other";
        group.append(...ids.map(option));
        return group;
      }));
    } else {
      modelPicker.replaceChildren(...models.map((model) => option(model.id)));
    }
    const remembered = localStorage.getItem(LAST_MODEL);
    if (remembered && models.some((model) => model.id === remembered)) modelPicker.value = remembered;
  } catch (error) {
    console.warn("could not load the model list", error);
  }
}

/** When Jarvis has an API key, ask for it once; the server then keeps a session cookie. */
async function signInIfNeeded() {
  const session = await api.sessionState();
  if (!session.required || session.signed_in) return;
  const signIn = /** @type {HTMLFormElement} */ ($("sign-in"));
  const keyInput = /** @type {HTMLInputElement} */ ($("api-key"));
  const failure = $("sign-in-error");
  $("app").hidden = true;
  signIn.hidden = false;
  keyInput.focus();
  await new Promise((resolve) => {
    signIn.addEventListener("submit", (event) => {
      event.preventDefault();
      api.signIn(keyInput.value).then(() => {
        signIn.hidden = true;
        $("app").hidden = false;
        keyInput.value = "";
        resolve(undefined);
      }, (error) => {
        failure.textContent = error instanceof Error ? error.message : String(error);
        failure.hidden = false;
      });
    });
  });
}

// -- search ------------------------------------------------------------------------

const searchBox = /** @type {HTMLInputElement} */ ($("search"));
const searchResults = $("search-results");
/** @type {ReturnType<typeof setTimeout> | null} */ let searchTimer = null;
let searchAsked = 0;

async function runSearch() {
  const query = searchBox.value.trim();
  const asked = ++searchAsked;
  if (!query) {
    searchResults.hidden = true;
    conversationList.hidden = false;
    return;
  }
  const results = await api.search(query);
  if (asked !== searchAsked) return; // a newer query is on its way
  searchResults.replaceChildren(...results.map((/** @type {any} */ result) => {
    const item = document.createElement("li");
    const open = button("", () => openSearchResult(result.conversation_id, result.message_id).catch(report));
    const name = document.createElement("span");
    name.className = "result-title";
    name.textContent = result.title;
    const snippet = document.createElement("span");
    snippet.className = "result-snippet";
    snippet.append(...highlighted(result.snippet));
    open.replaceChildren(name, snippet);
    item.append(open);
    return item;
  }));
  if (!results.length) {
    const none = document.createElement("li");
    none.className = "none";
    none.textContent = "Nothing found";
    searchResults.replaceChildren(none);
  }
  searchResults.hidden = false;
  conversationList.hidden = true;
}

/**
 * A snippet's text with each match (between U+E000 and U+E001) in a <mark>: built from text nodes, never HTML.
 * @param {string} snippet
 */
function highlighted(snippet) {
  /** @type {(Node)[]} */ const nodes = [];
  String(snippet).split("\ue000").forEach((part, index) => {
    if (index === 0) { nodes.push(document.createTextNode(part)); return; }
    const [match, rest = ""] = part.split("\ue001");
    const mark = document.createElement("mark");
    mark.textContent = match;
    nodes.push(mark, document.createTextNode(rest));
  });
  return nodes;
}

/**
 * @param {string} conversationId
 * @param {number | null} messageId null: the title matched
 */
async function openSearchResult(conversationId, messageId) {
  await openConversation(conversationId);
  if (messageId === null) return;
  const found = messagesView.querySelector(`article[data-id="${messageId}"]`);
  if (!found) return;
  found.classList.add("found");
  found.scrollIntoView({ block: "center" });
  setTimeout(() => found.classList.remove("found"), 2500);
}

// -- this conversation's settings, export and import ------------------------------------

const settingsDialog = /** @type {HTMLDialogElement} */ ($("settings-dialog"));
const settingFields = {
  system: /** @type {HTMLTextAreaElement} */ ($("setting-system")),
  temperature: /** @type {HTMLInputElement} */ ($("setting-temperature")),
  topP: /** @type {HTMLInputElement} */ ($("setting-top-p")),
  maxTokens: /** @type {HTMLInputElement} */ ($("setting-max-tokens")),
};

async function openSettings() {
  if (!state.conversationId) await newConversation();
  const id = /** @type {string} */ (state.conversationId);
  const { settings } = await api.readConversation(id);
  settingFields.system.value = settings?.system_prompt ?? "";
  settingFields.temperature.value = settings?.temperature ?? "";
  settingFields.topP.value = settings?.top_p ?? "";
  settingFields.maxTokens.value = settings?.max_tokens ?? "";
  const base = `/api/conversations/${encodeURIComponent(id)}/export`;
  $("export-json").setAttribute("href", `${base}?format=json`);
  $("export-markdown").setAttribute("href", `${base}?format=markdown`);
  $("settings-error").hidden = true;
  settingsDialog.showModal();
}

async function saveSettings() {
  const number = (/** @type {HTMLInputElement} */ field) => (field.value.trim() === "" ? null : Number(field.value));
  const settings = {
    system_prompt: settingFields.system.value,
    temperature: number(settingFields.temperature),
    top_p: number(settingFields.topP),
    max_tokens: number(settingFields.maxTokens),
  };
  try {
    await api.updateSettings(/** @type {string} */ (state.conversationId), settings);
    settingsDialog.close();
  } catch (error) {
    const failure = $("settings-error");
    failure.textContent = error instanceof Error ? error.message : String(error);
    failure.hidden = false;
  }
}

/**
 * The streaming doctor: ten events the server sends 200 ms apart, timed as they arrive here. Bunched
 * arrivals mean something between Jarvis and this browser buffers (gzip, a proxy, a CDN).
 */
async function checkStreaming() {
  const result = $("stream-check-result");
  result.classList.remove("bad");
  result.textContent = "Checking… (2 s)";
  const started = performance.now();
  const response = await fetch("/debug/stream-check");
  if (!response.ok) {
    result.classList.add("bad");
    result.textContent = `The check could not run (HTTP ${response.status})`;
    return;
  }
  /** @type {number[]} */ const arrivals = [];
  for await (const event of readEvents(response)) {
    if (event.type === "chunk" && event.chunk?.object === "jarvis.stream_check") arrivals.push(performance.now() - started);
  }
  const gaps = arrivals.slice(1).map((arrival, index) => Math.round(arrival - arrivals[index]));
  const median = [...gaps].sort((a, b) => a - b)[Math.floor(gaps.length / 2)] ?? 0;
  if (arrivals.length < 10) {
    result.classList.add("bad");
    result.textContent = `Only ${arrivals.length} of 10 events arrived: the stream was cut.`;
  } else if (median >= 100) {
    result.textContent = `Events arrived as sent (gaps ${gaps.join(", ")} ms; sent every 200 ms).`;
  } else {
    result.classList.add("bad");
    result.textContent = `Events arrived bunched (gaps ${gaps.join(", ")} ms; sent every 200 ms): something between ` +
      "Jarvis and this browser buffers the stream (gzip on text/event-stream? proxy_buffering? a corporate proxy?).";
  }
}

/** @param {File} file */
async function importConversations(file) {
  const status = $("import-status");
  status.hidden = false;
  status.classList.remove("failed");
  status.textContent = `Importing ${file.name}…`;
  try {
    const ids = await api.importFile(await file.text());
    status.textContent = `Imported ${ids.length} conversation${ids.length === 1 ? "" : "s"}`;
    await refreshConversationList();
    if (ids.length) await openConversation(ids[0]);
  } catch (error) {
    status.classList.add("failed");
    status.textContent = `Nothing imported: ${error instanceof Error ? error.message : String(error)}`;
  }
}

/** @param {KeyboardEvent} event */
function typing(event) {
  const target = /** @type {HTMLElement | null} */ (event.target);
  return !!target && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

async function start() {
  await signInIfNeeded();
  await loadModels();
  const conversations = await refreshConversationList();
  const remembered = localStorage.getItem(LAST_CONVERSATION);
  const last = conversations.find((/** @type {any} */ c) => c.id === remembered) ?? conversations[0];
  if (last) await openConversation(last.id);
  document.body.dataset.ready = "true";
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text || state.following) return;
  prompt.value = "";
  send(text).catch(report);
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !settingsDialog.open && !/** @type {HTMLDialogElement} */ ($("help-dialog")).open) {
    stop();
    return;
  }
  if (typing(event) || event.ctrlKey || event.metaKey || event.altKey || document.querySelector("dialog[open]")) return;
  if (event.key === "/") {
    event.preventDefault();
    document.body.classList.add("sidebar-open");
    searchBox.focus();
  } else if (event.key === "?") {
    event.preventDefault();
    /** @type {HTMLDialogElement} */ ($("help-dialog")).showModal();
  } else if (event.key === "s") {
    event.preventDefault();
    openSettings().catch(report);
  }
});
searchBox.addEventListener("input", () => {
  if (searchTimer !== null) clearTimeout(searchTimer);
  searchTimer = setTimeout(() => runSearch().catch(report), 150);
});
$("settings-button").addEventListener("click", () => openSettings().catch(report));
$("help-button").addEventListener("click", () => /** @type {HTMLDialogElement} */ ($("help-dialog")).showModal());
$("settings-cancel").addEventListener("click", () => settingsDialog.close());
$("settings-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveSettings().catch(report);
});
$("import-button").addEventListener("click", () => $("import-file").click());
$("stream-check").addEventListener("click", () => checkStreaming().catch(report));
$("import-file").addEventListener("change", () => {
  const input = /** @type {HTMLInputElement} */ ($("import-file"));
  const file = input.files?.[0];
  input.value = "";
  if (file) importConversations(file).catch(report);
});
stopButton.addEventListener("click", stop);
$("new-chat").addEventListener("click", () => newConversation().catch(report));
$("cancel-edit").addEventListener("click", cancelEdit);
$("toggle-sidebar").addEventListener("click", () => {
  const open = document.body.classList.toggle("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
});
modelPicker.addEventListener("change", () => localStorage.setItem(LAST_MODEL, modelPicker.value));
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") reattachNow();
});
window.addEventListener("online", reattachNow);
start().catch(report);
