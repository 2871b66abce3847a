// @ts-check
/**
 * The chat page's entry: the conversation on screen (its messages kept by id in a MessageList), sending,
 * regenerating and editing, start-up and sign-in, and the page's keys and buttons. The other modules:
 *
 *   message-view.js       one message on screen          message-list.js   the messages, by id
 *   answer-stream.js      start, attach, re-attach, Stop  conversation-list.js  the sidebar's list
 *   search.js             search as you type             settings.js       settings, import/export, doctor
 *   models.js             the model picker's first choice   keys.js   your account: usage, API keys
 *   admin.js              everyone's accounts (admins)
 *   tool-view.js          an answer's tool calls        attach.js         pictures and files with a message
 */
import * as api from "../api.js";
import { detach, followAnswer, hooks, reattachNow, stop } from "./answer-stream.js";
import { ConversationList, conversationItem } from "./conversation-list.js";
import * as attach from "./attach.js";
import { $, button, report } from "./dom.js";
import { adminDialog, addUser, openAdmin, shown as shownAdminError } from "./admin.js";
import { keysDialog, makeKey, openKeys, shown as shownKeyError } from "./keys.js";
import { MessageList } from "./message-list.js";
import { MessageView } from "./message-view.js";
import { preselectedModel } from "./models.js";
import { searchAsTyped } from "./search.js";
import { checkStreaming, importConversations, openSettings, saveSettings, settingsDialog } from "./settings.js";
import { LAST_CONVERSATION, LAST_MODEL, state } from "./state.js";

const messagesView = $("messages");
const conversationList = $("conversation-list");
const form = /** @type {HTMLFormElement} */ ($("composer"));
const prompt = /** @type {HTMLTextAreaElement} */ ($("prompt"));
const sendButton = /** @type {HTMLButtonElement} */ ($("send"));
const stopButton = /** @type {HTMLButtonElement} */ ($("stop"));
const modelPicker = /** @type {HTMLSelectElement} */ ($("model"));
const title = $("title");
const editing = $("editing");
const searchBox = /** @type {HTMLInputElement} */ ($("search"));
const helpDialog = /** @type {HTMLDialogElement} */ ($("help-dialog"));

/** @type {MessageList<MessageView>} */
const messages = new MessageList(messagesView, (message) => new MessageView(message));
const sidebar = new ConversationList(conversationList, (id) => conversationItem(id, {
  open: openConversation, rename: renameConversation, remove: removeConversation, stop: stopElsewhere,
}));

// -- the messages' actions ---------------------------------------------------------------

/** Adds Copy to every message, Edit to user messages and Regenerate to the last answer. */
function refreshActions() {
  for (const view of messages) {
    const copy = button("Copy", () => copyMessage(view, copy));
    copy.className = "copy-message";
    copy.title = "Copy this message's Markdown";
    view.actions.replaceChildren(copy);
    if (view.message.role === "user" && view.id !== null && !state.following) {
      const id = view.id;
      view.actions.append(button("Edit", () => startEdit(id, view)));
    }
  }
  const lastAnswer = messages.last((view) => view.message.role === "assistant");
  if (lastAnswer && !state.following) lastAnswer.actions.append(button("Regenerate", () => regenerate().catch(report)));
  const last = messages.last();
  if (last && last === lastAnswer && last.id !== null && last.continuable && !state.following) {
    const view = last;
    last.actions.append(button("Continue", () => continueAnswer(view).catch(report)));
  }
  for (const view of messages) {
    const versions = view.message.versions ?? [];
    const at = view.id === null ? -1 : versions.indexOf(view.id);
    if (versions.length < 2 || at < 0 || state.following) continue;
    const previous = button("‹", () => showVersion(versions[at - 1]).catch(report));
    previous.setAttribute("aria-label", "Previous version");
    previous.disabled = at === 0;
    const next = button("›", () => showVersion(versions[at + 1]).catch(report));
    next.setAttribute("aria-label", "Next version");
    next.disabled = at === versions.length - 1;
    const place = document.createElement("span");
    place.className = "version";
    place.textContent = `${at + 1}/${versions.length}`;
    const switcher = document.createElement("span");
    switcher.className = "versions";
    switcher.append(previous, place, next);
    view.actions.prepend(switcher);
  }
}

/**
 * Shows another version of a message: the branch through it becomes the conversation's current one.
 * @param {number} id
 */
async function showVersion(id) {
  const conversationId = state.conversationId;
  if (!conversationId || state.following) return;
  await api.showVersion(conversationId, id);
  await openConversation(conversationId);
}

/**
 * Puts a message's exact Markdown (what the model wrote, or what was typed) on the clipboard.
 * @param {MessageView} view
 * @param {HTMLButtonElement} control
 */
function copyMessage(view, control) {
  navigator.clipboard.writeText(view.text).then(
    () => { control.textContent = "Copied"; setTimeout(() => { control.textContent = "Copy"; }, 1500); },
    (error) => console.warn("copy failed", error),
  );
}

function scrollToEnd() {
  messagesView.scrollTop = messagesView.scrollHeight;
}

// -- conversations ---------------------------------------------------------------------

async function refreshConversationList() {
  const conversations = await api.listConversations();
  sidebar.show(conversations, state.conversationId);
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
  messages.clear();
  /** @type {MessageView | null} */ let streaming = null;
  for (const message of conversation.messages) {
    const view = messages.add(message);
    if (message.status === "streaming") streaming = view;
  }
  refreshActions();
  scrollToEnd();
  showContext(id).catch(report);
  await refreshConversationList();
  document.body.classList.remove("sidebar-open");
  if (streaming) {
    // Still being written (another tab, a reload, a lost connection): follow it from where it is.
    followAnswer(id, streaming, streaming.id, null).catch(report);
  }
}

/** A new conversation: stored only when its first message is sent (no empty rows in the list). */
async function newConversation() {
  detach();
  state.conversationId = null;
  localStorage.removeItem(LAST_CONVERSATION);
  cancelEdit();
  messages.clear();
  contextMeter.hidden = true;
  title.textContent = "New chat";
  refreshActions();
  document.body.classList.remove("sidebar-open");
  await refreshConversationList();
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
    messages.clear();
    title.textContent = "Jarvis";
  }
  await refreshConversationList();
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
  // The worker running it (perhaps another) stops it within a tick; its mark goes when its last save lands.
  for (let tries = 0; tries < 25; tries += 1) {
    const listed = await refreshConversationList();
    if (!listed.some((conversation) => conversation.id === conversationId && conversation.running)) return;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

/**
 * Re-reads the conversation from the server, which owns it: every view matched to its message by id.
 * @param {string} conversationId
 */
async function settleWithServer(conversationId) {
  if (state.conversationId !== conversationId || state.following) return;
  const conversation = await api.readConversation(conversationId);
  if (state.conversationId !== conversationId || state.following) return;
  title.textContent = conversation.title;
  messages.reconcile(conversation.messages);
  for (const message of conversation.messages) { // what the server knows now: versions, how each ended
    const view = messages.find(message.id);
    if (!view) continue;
    view.message.versions = message.versions;
    if (message.status !== "streaming") Object.assign(view.message, { status: message.status, stats: message.stats });
    view.showSaved(message);
  }
  refreshActions();
  showContext(conversationId).catch(report);
  await refreshConversationList();
}

const contextMeter = $("context-meter");

/**
 * How full the model's context is on this branch ("3.1k / 8k tokens"), when the server knows the model's
 * context; hidden otherwise. Past 80% it warns.
 * @param {string} conversationId
 */
async function showContext(conversationId) {
  const { used, estimated, window } = await api.context(conversationId, modelPicker.value || undefined);
  if (state.conversationId !== conversationId) return;
  const known = typeof window === "number" && window > 0 && typeof used === "number";
  contextMeter.hidden = !known;
  if (!known) return;
  const short = (/** @type {number} */ n) => (n >= 1000 ? `${(n / 1000).toFixed(n >= 10000 ? 0 : 1)}k` : String(n));
  contextMeter.textContent = `${estimated ? "≈ " : ""}${short(used)} / ${short(window)} tokens of context`;
  contextMeter.classList.toggle("near", used / window >= 0.8);
  contextMeter.title = used / window >= 0.8
    ? "Nearly full: older messages may be cut off by the model's server. Start a new chat, or edit an earlier message."
    : "What this conversation's branch uses of the model's context window";
}

// -- sending ---------------------------------------------------------------------------

/** @param {string} text */
async function send(text) {
  if (!state.conversationId) await storeConversation();
  const content = attach.takeContent(text);
  const body = { content, model: modelPicker.value || undefined, edit: state.editId ?? undefined };
  if (state.editId !== null) {
    const edited = messages.find(state.editId);
    if (edited) messages.removeFrom(edited);
    cancelEdit();
  }
  const question = messages.add({ role: "user", content: text, attachments: attach.pendingShown(content) });
  await startAnswer(body, question);
}

/**
 * Continues an answer cut short: the same message grows from where it stopped.
 * @param {MessageView} view
 */
async function continueAnswer(view) {
  const conversationId = /** @type {string} */ (state.conversationId);
  const id = /** @type {number} */ (view.id);
  if (view.saved) view.showSaved(view.saved, { always: true }); // it goes on from what the server has
  view.setStatus("streaming", null, null);
  await followAnswer(conversationId, view, null,
    (signal) => api.sendMessage(conversationId, {
      continue: id, after: view.text.length, reasoning_after: view.reasoning.length, model: modelPicker.value || undefined,
    }, signal));
  await refreshConversationList().catch(report);
}

async function regenerate() {
  const lastQuestion = messages.last((view) => view.message.role === "user");
  if (lastQuestion) messages.removeAfter(lastQuestion);
  await startAnswer({ regenerate: true, model: modelPicker.value || undefined }, null);
}

/**
 * Starts an answer on the server and follows it into a new assistant message.
 * @param {object} body
 * @param {MessageView | null} question the user's new message, named when the server answers
 */
async function startAnswer(body, question) {
  const conversationId = /** @type {string} */ (state.conversationId);
  const first = !messages.last((view) => view.message.role === "assistant");
  const view = messages.add({ role: "assistant", content: "", status: "streaming" });
  scrollToEnd();
  await followAnswer(conversationId, view, null, (signal) => api.sendMessage(conversationId, body, signal),
    (response) => {
      const questionId = Number(response.headers.get("X-User-Message-Id"));
      if (question && questionId) messages.name(question, questionId);
      if (response.ok) refreshConversationList().catch(report); // a new conversation is listed at once
    });
  await refreshConversationList().catch(report);
  if (first) setTimeout(() => showTitle(conversationId).catch(report), TITLE_AFTER_MS);
}

// After a conversation's first answer the server asks the model for a title (JARVIS_TITLES): show it.
const TITLE_AFTER_MS = 3000;

/** @param {string} conversationId */
async function showTitle(conversationId) {
  const listed = await refreshConversationList();
  const current = listed.find((conversation) => conversation.id === conversationId);
  if (current && state.conversationId === conversationId) title.textContent = current.title;
}

/** @param {boolean} streaming */
function setStreaming(streaming) {
  stopButton.disabled = !streaming;
  sendButton.disabled = streaming;
  if (streaming) refreshActions();
}

/**
 * @param {number} id
 * @param {MessageView} view
 */
function startEdit(id, view) {
  state.editId = id;
  prompt.value = view.text;
  editing.hidden = false;
  prompt.focus();
}

function cancelEdit() {
  state.editId = null;
  editing.hidden = true;
}

/**
 * @param {string} conversationId
 * @param {number | null} messageId null: the title matched
 */
async function openSearchResult(conversationId, messageId) {
  await openConversation(conversationId);
  if (messageId === null) return;
  if (!messages.find(messageId) && !state.following) { // a version not shown: show its branch
    await api.showVersion(conversationId, messageId);
    await openConversation(conversationId);
  }
  const found = messages.find(messageId)?.element;
  if (!found) return;
  found.classList.add("found");
  found.scrollIntoView({ block: "center" });
  setTimeout(() => found.classList.remove("found"), 2500);
}

// -- start-up and keys -------------------------------------------------------------

/** Fills the model picker: grouped by upstream when the models come from several. */
async function loadModels() {
  try {
    // Asked together: each is a round trip, and the health answer only picks the preselected model.
    const [models, health] = await Promise.all([api.listModels(), api.health().catch(() => ({}))]);
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
    const upstreams = Array.isArray(health.upstreams) ? health.upstreams : [];
    const chosen = preselectedModel(models, upstreams, localStorage.getItem(LAST_MODEL));
    if (chosen) modelPicker.value = chosen;
  } catch (error) {
    console.warn("could not load the model list", error);
  }
}

/**
 * When Jarvis has an API key, ask for it once; with accounts, ask for a name and password. The server
 * then keeps a session cookie.
 */
async function signInIfNeeded() {
  const session = await api.sessionState();
  $("sign-out").hidden = !session.required;
  if (!session.required || session.signed_in) {
    showAccount(session.user);
    return;
  }
  const signIn = /** @type {HTMLFormElement} */ ($("sign-in"));
  const nameInput = /** @type {HTMLInputElement} */ ($("username"));
  const keyInput = /** @type {HTMLInputElement} */ ($("api-key"));
  const failure = $("sign-in-error");
  if (session.accounts) {
    nameInput.hidden = false;
    nameInput.required = true;
    /** @type {HTMLElement} */ (document.querySelector("label[for=username]")).hidden = false;
    /** @type {HTMLElement} */ (document.querySelector("label[for=api-key]")).textContent = "Password";
  }
  $("app").hidden = true;
  signIn.hidden = false;
  (session.accounts ? nameInput : keyInput).focus();
  await new Promise((resolve) => {
    signIn.addEventListener("submit", (event) => {
      event.preventDefault();
      const signedIn = session.accounts ? api.signInAs(nameInput.value, keyInput.value) : api.signIn(keyInput.value);
      signedIn.then(() => {
        signIn.hidden = true;
        $("app").hidden = false;
        keyInput.value = "";
        if (session.accounts) {
          showAccount({ name: nameInput.value.trim(), admin: false });
          api.sessionState().then((now) => showAccount(now.user), report); // (an admin: the Accounts button)
        }
        resolve(undefined);
      }, (error) => {
        failure.textContent = error instanceof Error ? error.message : String(error);
        failure.hidden = false;
      });
    });
  });
}

/**
 * Names the signed-in person in the sidebar, beside their account (usage and keys) and, for an admin,
 * everyone's accounts (accounts mode only).
 * @param {{name: string, admin: boolean} | null} user
 */
function showAccount(user) {
  $("account-name").textContent = user ? user.name : "";
  $("account-name").hidden = !user;
  $("keys-button").hidden = !user;
  $("admin-button").hidden = !user?.admin;
}

/** Signs out on the server (the cookie stops working everywhere) and starts the page afresh. */
async function signOut() {
  await api.signOut();
  localStorage.removeItem(LAST_CONVERSATION);
  location.reload();
}

async function showSettings() {
  if (!state.conversationId) await storeConversation(); // listed once its first message is sent
  await openSettings(/** @type {string} */ (state.conversationId));
}

async function storeConversation() {
  const conversation = await api.createConversation();
  state.conversationId = conversation.id;
  localStorage.setItem(LAST_CONVERSATION, conversation.id);
}

/** @param {KeyboardEvent} event */
function typing(event) {
  const target = /** @type {HTMLElement | null} */ (event.target);
  return !!target && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

async function start() {
  await signInIfNeeded();
  // The model list and the conversation list load together; a conversation opens once both are there (it
  // may choose its model in the picker).
  const [, conversations] = await Promise.all([loadModels(), refreshConversationList()]);
  const remembered = localStorage.getItem(LAST_CONVERSATION);
  const last = conversations.find((/** @type {any} */ c) => c.id === remembered) ?? conversations[0];
  if (last) await openConversation(last.id);
  document.body.dataset.ready = "true";
}

Object.assign(hooks, {
  streaming: setStreaming,
  settle: settleWithServer,
  stopElsewhere,
  reopen: openConversation,
  named: (/** @type {MessageView} */ view, /** @type {number} */ id) => messages.name(view, id),
});

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if ((!text && !attach.waiting()) || state.following) return;
  prompt.value = "";
  send(text).catch(report);
});
attach.wire(form, prompt);
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !settingsDialog.open && !helpDialog.open) {
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
    helpDialog.showModal();
  } else if (event.key === "s") {
    event.preventDefault();
    showSettings().catch(report);
  }
});
searchAsTyped(searchBox, $("search-results"), conversationList, openSearchResult);
$("settings-button").addEventListener("click", () => showSettings().catch(report));
$("help-button").addEventListener("click", () => helpDialog.showModal());
$("settings-cancel").addEventListener("click", () => settingsDialog.close());
$("settings-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveSettings().catch(report);
});
$("import-button").addEventListener("click", () => $("import-file").click());
$("sign-out").addEventListener("click", () => signOut().catch(report));
$("keys-button").addEventListener("click", () => openKeys().catch(report));
$("keys-close").addEventListener("click", () => keysDialog.close());
$("admin-button").addEventListener("click", () => openAdmin().catch(report));
$("admin-close").addEventListener("click", () => adminDialog.close());
$("admin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  addUser().catch(shownAdminError);
});
$("keys-form").addEventListener("submit", (event) => {
  event.preventDefault();
  makeKey().catch(shownKeyError);
});
$("stream-check").addEventListener("click", () => checkStreaming().catch(report));
$("import-file").addEventListener("change", () => {
  const input = /** @type {HTMLInputElement} */ ($("import-file"));
  const file = input.files?.[0];
  input.value = "";
  if (file) {
    importConversations(file, async (ids) => {
      await refreshConversationList();
      if (ids.length) await openConversation(ids[0]);
    }).catch(report);
  }
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
