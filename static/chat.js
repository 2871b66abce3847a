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

/** @type {{conversationId: string | null, controller: AbortController | null, editId: number | null}} */
const state = { conversationId: null, controller: null, editId: null };

// -- rendering ------------------------------------------------------------

/**
 * @typedef {{ttft_ms?: number | null, thinking_ms?: number | null, completion_tokens?: number | null,
 *   tokens_per_second?: number | null}} AnswerStats
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
      stopped: "Stopped.",
      interrupted: "Interrupted: the answer was cut short.",
    };
    const note = notes[/** @type {keyof typeof notes} */ (status)];
    this.errorNote.hidden = !note;
    this.errorNote.textContent = note ? `${note}${status === "error" && traceId ? ` (trace ${traceId})` : ""}` : "";
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

/** @param {any} message */
function addMessage(message) {
  const view = new MessageView(message);
  messagesView.append(view.element);
  return view;
}

function scrollToEnd() {
  messagesView.scrollTop = messagesView.scrollHeight;
}

/** Adds Edit to user messages and Regenerate to the last answer. */
function refreshActions() {
  const articles = [...messagesView.querySelectorAll("article.message")];
  for (const article of articles) article.querySelector(".actions")?.replaceChildren();
  const lastAssistant = articles.filter((a) => a.getAttribute("data-role") === "assistant").pop();
  if (lastAssistant && !state.controller) {
    lastAssistant.querySelector(".actions")?.append(button("Regenerate", () => regenerate()));
  }
  for (const article of articles) {
    const id = Number(article.getAttribute("data-id"));
    if (article.getAttribute("data-role") === "user" && id && !state.controller) {
      article.querySelector(".actions")?.append(button("Edit", () => startEdit(id, article)));
    }
  }
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
    item.append(open, rename, remove);
    return item;
  }));
  return conversations;
}

/** @param {string} id */
async function openConversation(id) {
  stop();
  const conversation = await api.readConversation(id);
  state.conversationId = id;
  localStorage.setItem(LAST_CONVERSATION, id);
  title.textContent = conversation.title;
  cancelEdit();
  messagesView.replaceChildren();
  for (const message of conversation.messages) {
    addMessage(message).element.dataset.id = String(message.id);
  }
  refreshActions();
  scrollToEnd();
  await refreshConversationList();
  document.body.classList.remove("sidebar-open");
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
  if (id === state.conversationId) stop();
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
  await streamReply(body);
}

async function regenerate() {
  const articles = [...messagesView.querySelectorAll("article.message")];
  const lastUser = articles.filter((a) => a.getAttribute("data-role") === "user").pop();
  while (lastUser?.nextElementSibling) lastUser.nextElementSibling.remove();
  await streamReply({ regenerate: true, model: modelPicker.value || undefined });
}

/**
 * Streams one reply into a new assistant message. Every way out ends in a status:
 * complete, stopped (our own Stop), error (shown inline), or interrupted (no [DONE]).
 * @param {object} body
 */
async function streamReply(body) {
  const conversationId = /** @type {string} */ (state.conversationId);
  const view = addMessage({ role: "assistant", content: "", status: "streaming" });
  scrollToEnd();
  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  let status = "interrupted";
  /** @type {string | null} */ let error = null;
  /** @type {string | null} */ let traceId = null;
  try {
    const response = await api.sendMessage(conversationId, body, controller.signal);
    traceId = response.headers.get("X-Request-Id");
    if (!response.ok) {
      const failure = await response.json().catch(() => ({}));
      status = "error";
      error = failure?.error?.message ?? `HTTP ${response.status}`;
      return;
    }
    for await (const event of readEvents(response)) {
      if (event.type === "chunk") {
        if (event.chunk?.stats) view.setStats(event.chunk.stats);
        view.applyDelta(event.chunk?.choices?.[0]?.delta);
      } else if (event.type === "error") {
        status = "error";
        error = String(event.error?.message ?? "the stream failed");
      } else if (status !== "error") {
        status = "complete";
      }
    }
  } catch (failure) {
    if (controller.signal.aborted) {
      status = "stopped"; // our own Stop: expected, silent
    } else if (status === "interrupted" && traceId !== null) {
      // The body broke off mid-answer (the server or the network went away): keep what arrived.
      console.warn("the reply stream broke off", failure);
    } else {
      status = "error";
      error = failure instanceof Error ? failure.message : String(failure);
      console.warn("the reply stream failed", failure);
    }
  } finally {
    view.finish(status, error, traceId);
    if (state.controller === controller) state.controller = null;
    setStreaming(false);
    await settleWithServer(conversationId).catch(report);
  }
}

/**
 * Re-reads the conversation from the server, which owns it: ids for Edit, and the saved text.
 * @param {string} conversationId
 */
async function settleWithServer(conversationId) {
  if (state.conversationId !== conversationId || state.controller) return;
  const conversation = await api.readConversation(conversationId);
  if (state.conversationId !== conversationId || state.controller) return;
  title.textContent = conversation.title;
  const articles = [...messagesView.querySelectorAll("article.message")];
  conversation.messages.forEach((/** @type {any} */ message, /** @type {number} */ index) => {
    if (articles[index]) articles[index].setAttribute("data-id", String(message.id));
  });
  refreshActions();
  await refreshConversationList();
}

function stop() {
  state.controller?.abort();
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

async function loadModels() {
  try {
    const models = await api.listModels();
    modelPicker.replaceChildren(...models.map((/** @type {string} */ id) => {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      return option;
    }));
    const remembered = localStorage.getItem(LAST_MODEL);
    if (remembered && models.includes(remembered)) modelPicker.value = remembered;
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
  if (!text || state.controller) return;
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
  if (event.key === "Escape") stop();
});
stopButton.addEventListener("click", stop);
$("new-chat").addEventListener("click", () => newConversation().catch(report));
$("cancel-edit").addEventListener("click", cancelEdit);
$("toggle-sidebar").addEventListener("click", () => {
  const open = document.body.classList.toggle("sidebar-open");
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
});
modelPicker.addEventListener("change", () => localStorage.setItem(LAST_MODEL, modelPicker.value));
start().catch(report);
