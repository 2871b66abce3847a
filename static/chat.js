// @ts-check
/**
 * The chat page: sends the conversation to /v1/chat/completions and renders
 * the streamed answer as plain text. Stop aborts the fetch; the server notices
 * at once and cancels the generation at its source.
 */
import { readEvents } from "./sse.js";

const messagesView = /** @type {HTMLElement} */ (document.getElementById("messages"));
const form = /** @type {HTMLFormElement} */ (document.getElementById("composer"));
const prompt = /** @type {HTMLTextAreaElement} */ (document.getElementById("prompt"));
const sendButton = /** @type {HTMLButtonElement} */ (document.getElementById("send"));
const stopButton = /** @type {HTMLButtonElement} */ (document.getElementById("stop"));
const modelPicker = /** @type {HTMLSelectElement} */ (document.getElementById("model"));

/** @type {{role: string, content: string}[]} */
const history = [];
/** @type {AbortController | null} */
let controller = null;

/**
 * @param {string} role
 * @param {string} text
 * @returns {HTMLElement}
 */
function addMessage(role, text) {
  const element = document.createElement("div");
  element.className = `message ${role}`;
  element.dataset.role = role;
  element.textContent = text;
  messagesView.append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

/** Batches text updates to one DOM write per animation frame. */
class FrameWriter {
  /** @param {HTMLElement} element */
  constructor(element) {
    this.element = element;
    this.text = "";
    this.scheduled = false;
  }
  /** @param {string} text */
  set(text) {
    this.text = text;
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => this.flush());
  }
  flush() {
    this.scheduled = false;
    this.element.textContent = this.text;
    this.element.scrollIntoView({ block: "end" });
  }
}

/** @param {string} text */
async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const element = addMessage("assistant", "");
  element.dataset.status = "streaming";
  const writer = new FrameWriter(element);
  controller = new AbortController();
  setStreaming(true);
  let answer = "";
  let status = "interrupted";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: modelPicker.value || undefined, messages: history, stream: true }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body?.error?.message || `HTTP ${response.status}`);
    }
    for await (const event of readEvents(response)) {
      if (event.type === "chunk") {
        answer += event.chunk?.choices?.[0]?.delta?.content ?? "";
        writer.set(answer);
      } else if (event.type === "error") {
        status = "error";
        showError(element, `${event.error?.message ?? "error"} (trace ${response.headers.get("X-Request-Id")})`);
      } else if (event.type === "done" && status !== "error") {
        status = "complete";
      }
    }
  } catch (error) {
    if (error instanceof DOMException && error.name === "AbortError") {
      status = "stopped";
    } else {
      status = "error";
      showError(element, String(error instanceof Error ? error.message : error));
    }
  } finally {
    writer.flush();
    element.dataset.status = status;
    if (answer) history.push({ role: "assistant", content: answer });
    controller = null;
    setStreaming(false);
  }
}

/**
 * @param {HTMLElement} element
 * @param {string} message
 */
function showError(element, message) {
  const note = document.createElement("div");
  note.className = "error";
  note.textContent = message;
  element.after(note);
}

/** @param {boolean} streaming */
function setStreaming(streaming) {
  stopButton.disabled = !streaming;
  sendButton.disabled = streaming;
}

function stop() {
  controller?.abort();
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) return;
    const list = await response.json();
    for (const model of list.data ?? []) {
      const option = document.createElement("option");
      option.value = option.textContent = String(model.id);
      modelPicker.append(option);
    }
  } catch (error) {
    console.warn("could not load the model list", error);
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text || controller) return;
  prompt.value = "";
  send(text).catch((error) => console.warn("send failed", error));
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  } else if (event.key === "Escape") {
    stop();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") stop();
});
stopButton.addEventListener("click", stop);
loadModels();
