// @ts-check
/**
 * Pictures and files with a message: attached by the 📎 button, by pasting, or by dropping them on the page;
 * shown as removable thumbnails and chips before sending, sent as OpenAI content parts (data: URLs), and shown
 * in the conversation from the server's same-origin URLs (/api/files/<id>): pictures as thumbnails that open
 * whole, files as chips that download. The server checks everything again (jarvis/attachments.py); the page's
 * CSP (`img-src 'self' data:`) is unchanged. A name or a note is only ever text.
 */
import { $ } from "./dom.js";

/** @typedef {{name: string, type: string, url: string, size: number}} Pending a file read, waiting to be sent */
/**
 * @typedef {{id?: string, url?: string, name: string, type?: string, kind: string, size?: number, note?: string}}
 *   Attached a file the server keeps (`id`), or one this page is sending (`url`: its data: URL)
 */

const MAX_BYTES = 10 * 1024 * 1024; // the server's default (JARVIS_MAX_ATTACHMENT_BYTES): it says so if it differs

/** @type {Pending[]} */
const pending = [];
const tray = $("attachments");
const input = /** @type {HTMLInputElement} */ ($("attach-input"));

/** Wires the button, paste and drop. @param {HTMLElement} composer @param {HTMLTextAreaElement} prompt */
export function wire(composer, prompt) {
  $("attach").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles([...(input.files ?? [])]);
    input.value = "";
  });
  prompt.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  for (const target of [composer, document.body]) {
    target.addEventListener("dragover", (event) => {
      if (event.dataTransfer?.types.includes("Files")) event.preventDefault();
    });
    target.addEventListener("drop", (event) => {
      if (!event.dataTransfer?.files.length) return;
      event.preventDefault();
      event.stopPropagation();
      addFiles([...event.dataTransfer.files]);
    });
  }
}

/** @param {File[]} files */
function addFiles(files) {
  for (const file of files) {
    if (file.size > MAX_BYTES) {
      showProblem(`${file.name} is larger than 10 MB`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      pending.push({ name: file.name || "pasted", type: file.type, url: String(reader.result), size: file.size });
      showTray();
    };
    reader.onerror = () => showProblem(`${file.name} could not be read`);
    reader.readAsDataURL(file);
  }
}

/** @param {string} text */
function showProblem(text) {
  const problem = document.createElement("span");
  problem.className = "attach-problem";
  problem.textContent = text;
  tray.append(problem);
  tray.hidden = false;
  setTimeout(() => { problem.remove(); tray.hidden = !tray.childElementCount; }, 5000);
}

function showTray() {
  tray.replaceChildren(...pending.map((file, index) => {
    const item = document.createElement("span");
    item.className = "attach-pending";
    if (file.type.startsWith("image/") && file.url.startsWith("data:image/")) {
      const thumbnail = document.createElement("img");
      thumbnail.src = file.url;
      thumbnail.alt = file.name;
      item.append(thumbnail);
    } else {
      item.append(file.name);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "attach-remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${file.name}`);
    remove.addEventListener("click", () => {
      pending.splice(index, 1);
      showTray();
    });
    item.append(remove);
    return item;
  }));
  tray.hidden = pending.length === 0;
}

/**
 * What a message being sent shows of its attachments until the server has them: the parts' own data: URLs.
 * @param {string | object[]} content
 * @returns {Attached[]}
 */
export function pendingShown(content) {
  if (!Array.isArray(content)) return [];
  return content.flatMap((/** @type {any} */ part) => (part.type === "image_url"
    ? [{ kind: "image", name: "picture", url: part.image_url.url }]
    : part.type === "file" ? [{ kind: "file", name: part.file.filename, url: part.file.file_data }] : []));
}

/** Whether anything waits to be sent. */
export const waiting = () => pending.length > 0;

/**
 * The message's content for the server: the text alone, or content parts with what is attached (then cleared).
 * @param {string} text
 * @returns {string | object[]}
 */
export function takeContent(text) {
  if (!pending.length) return text;
  const parts = [
    ...(text ? [{ type: "text", text }] : []),
    ...pending.map((file) => (file.type.startsWith("image/") && file.type !== "image/svg+xml"
      ? { type: "image_url", image_url: { url: file.url } }
      : { type: "file", file: { filename: file.name, file_data: file.url } })),
  ];
  pending.length = 0;
  showTray();
  return parts;
}

/**
 * A user message's attachments, shown under its text: pictures as thumbnails opening whole, files as chips.
 * @param {Attached[] | undefined} attached
 */
export function attachedView(attached) {
  const view = document.createElement("div");
  view.className = "attached";
  for (const file of attached ?? []) {
    const url = typeof file?.id === "string" ? `/api/files/${encodeURIComponent(file.id)}`
      : typeof file?.url === "string" && file.url.startsWith("data:") ? file.url : null;
    if (!url) continue;
    const link = document.createElement("a");
    link.href = url;
    if (file.kind === "image") {
      link.target = "_blank";
      link.rel = "noopener";
      const thumbnail = document.createElement("img");
      thumbnail.src = url;
      thumbnail.alt = String(file.name);
      thumbnail.loading = "lazy";
      link.append(thumbnail);
    } else {
      link.className = "attach-chip";
      link.download = String(file.name);
      link.textContent = String(file.name);
      if (file.note) link.title = String(file.note);
    }
    view.append(link);
    if (file.note) {
      const note = document.createElement("span");
      note.className = "attach-note";
      note.textContent = String(file.note);
      view.append(note);
    }
  }
  return view;
}
