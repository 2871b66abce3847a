// @ts-check
/**
 * A conversation's settings (system prompt, sampling, the tools it may call), its export, importing files, and
 * the streaming doctor. A tool's switch is saved only where it differs from its server's default (`enabled`).
 */
import * as api from "../api.js";
import { readEvents } from "../sse.js";
import { $ } from "./dom.js";

/** @type {string | null} the conversation whose settings the dialog shows */
let conversationId = null;
/** @type {Record<string, boolean>} the conversation's tool switches, as saved ({"server/tool": on}) */
let toolSwitches = {};
/** @type {{key: string, box: HTMLInputElement, standard: boolean}[]} the switches shown */
let toolBoxes = [];

export const settingsDialog = /** @type {HTMLDialogElement} */ ($("settings-dialog"));
const settingFields = {
  system: /** @type {HTMLTextAreaElement} */ ($("setting-system")),
  temperature: /** @type {HTMLInputElement} */ ($("setting-temperature")),
  topP: /** @type {HTMLInputElement} */ ($("setting-top-p")),
  maxTokens: /** @type {HTMLInputElement} */ ($("setting-max-tokens")),
};

/**
 * Opens the dialog for a conversation's own system prompt, sampling and export.
 * @param {string} id
 */
export async function openSettings(id) {
  conversationId = id;
  const { settings } = await api.readConversation(id);
  settingFields.system.value = settings?.system_prompt ?? "";
  settingFields.temperature.value = settings?.temperature ?? "";
  settingFields.topP.value = settings?.top_p ?? "";
  settingFields.maxTokens.value = settings?.max_tokens ?? "";
  toolSwitches = settings?.tools ?? {};
  toolBoxes = [];
  $("setting-tools").hidden = true;
  showTools(id).catch((error) => console.warn("the tool list could not be read", error));
  const base = `/api/conversations/${encodeURIComponent(id)}/export`;
  $("export-json").setAttribute("href", `${base}?format=json`);
  $("export-markdown").setAttribute("href", `${base}?format=markdown`);
  $("settings-error").hidden = true;
  settingsDialog.showModal();
}

/**
 * The tool servers' tools, each with its switch for this conversation (none configured: nothing shown).
 * @param {string} id
 */
async function showTools(id) {
  const servers = await api.listTools();
  if (conversationId !== id || !Array.isArray(servers) || servers.length === 0) return;
  const list = $("setting-tools-list");
  list.replaceChildren();
  for (const server of servers) {
    const heading = document.createElement("p");
    heading.className = "tool-server";
    heading.textContent = server.available ? server.name : `${server.name} — unavailable: ${server.error ?? "unknown"}`;
    list.append(heading);
    for (const tool of server.tools ?? []) {
      const key = `${server.name}/${tool.name}`;
      const standard = server.enabled !== false;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = toolSwitches[key] ?? standard;
      const label = document.createElement("label");
      label.title = String(tool.description ?? "");
      label.append(box, " ", String(tool.name));
      list.append(label);
      toolBoxes.push({ key, box, standard });
    }
  }
  $("setting-tools").hidden = false;
}

export async function saveSettings() {
  const number = (/** @type {HTMLInputElement} */ field) => (field.value.trim() === "" ? null : Number(field.value));
  const settings = {
    system_prompt: settingFields.system.value,
    temperature: number(settingFields.temperature),
    top_p: number(settingFields.topP),
    max_tokens: number(settingFields.maxTokens),
    tools: { ...toolSwitches },
  };
  for (const { key, box, standard } of toolBoxes) {
    if (box.checked === standard) delete settings.tools[key];
    else settings.tools[key] = box.checked;
  }
  try {
    await api.updateSettings(/** @type {string} */ (conversationId), settings);
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
export async function checkStreaming() {
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

/**
 * @param {File} file
 * @param {(ids: string[]) => Promise<void>} imported
 */
export async function importConversations(file, imported) {
  const status = $("import-status");
  status.hidden = false;
  status.classList.remove("failed");
  status.textContent = `Importing ${file.name}…`;
  try {
    const ids = await api.importFile(await file.text());
    status.textContent = `Imported ${ids.length} conversation${ids.length === 1 ? "" : "s"}`;
    await imported(ids);
  } catch (error) {
    status.classList.add("failed");
    status.textContent = `Nothing imported: ${error instanceof Error ? error.message : String(error)}`;
  }
}
