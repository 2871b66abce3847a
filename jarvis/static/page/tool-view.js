// @ts-check
/**
 * An answer's tool calls on screen: each call a block with the tool's name and arguments, a spinner (and the
 * server's progress) while it runs, then its result, folded. Everything in them is untrusted — arguments
 * a model wrote, results a tool returned — and shown as text (textContent), never as HTML or Markdown.
 */
import { seconds } from "./dom.js";

/**
 * @typedef {{progress?: number, total?: number | null, message?: string | null}} ToolProgress
 * @typedef {{id: string, name: string, server?: string | null, arguments?: string, result?: string | null,
 *   is_error?: boolean, duration_ms?: number | null, progress?: ToolProgress}} ToolCall
 * @typedef {{at: number, reasoning_at?: number, calls: ToolCall[]}} ToolStep
 * @typedef {{name: string, arguments: string}} PendingCall a call the model is still writing
 */

/**
 * One step's calls, as blocks.
 * @param {ToolStep} step
 * @param {boolean} running whether the answer still streams (a call without a result is running)
 * @param {Set<string>} opened the ids of the blocks the reader unfolded (kept across renders)
 */
export function stepView(step, running, opened) {
  const view = document.createElement("div");
  view.className = "tool-step";
  for (const call of step.calls) view.append(callView(call, running, opened));
  return view;
}

/**
 * @param {ToolCall} call
 * @param {boolean} running
 * @param {Set<string>} opened
 */
function callView(call, running, opened) {
  const block = document.createElement("details");
  block.className = "tool-call";
  block.dataset.callId = call.id;
  const done = typeof call.result === "string";
  const state = done ? (call.is_error ? "error" : "done") : running ? "running" : "cancelled";
  block.dataset.state = state;
  const summary = document.createElement("summary");
  const name = document.createElement("span");
  name.className = "tool-name";
  name.textContent = call.name;
  const status = document.createElement("span");
  status.className = "tool-status";
  status.textContent = statusText(call, state);
  summary.append(name, " ", status);
  if (state === "running") {
    const spinner = document.createElement("span");
    spinner.className = "spinner";
    spinner.setAttribute("aria-hidden", "true");
    summary.prepend(spinner);
  }
  const args = document.createElement("pre");
  args.className = "tool-arguments";
  args.textContent = pretty(call.arguments ?? "");
  block.append(summary, args);
  if (done) {
    const result = document.createElement("pre");
    result.className = "tool-result";
    result.textContent = /** @type {string} */ (call.result);
    block.append(result);
  }
  block.open = opened.has(call.id);
  block.addEventListener("toggle", () => (block.open ? opened.add(call.id) : opened.delete(call.id)));
  return block;
}

/**
 * @param {ToolCall} call
 * @param {string} state
 */
function statusText(call, state) {
  const server = call.server ? ` · ${call.server}` : "";
  if (state === "running") {
    const progress = call.progress;
    if (progress && typeof progress.progress === "number") {
      const total = typeof progress.total === "number" ? ` of ${progress.total}` : "";
      return `running… ${progress.progress}${total}${progress.message ? ` — ${progress.message}` : ""}${server}`;
    }
    return `running…${server}`;
  }
  const took = typeof call.duration_ms === "number" ? ` in ${seconds(call.duration_ms)}` : "";
  if (state === "error") return `failed${took}${server}`;
  if (state === "done") return `done${took}${server}`;
  return `cancelled${server}`;
}

/**
 * The calls the model is writing, before they run: their names and arguments so far.
 * @param {PendingCall[]} calls
 */
export function pendingView(calls) {
  const view = document.createElement("div");
  view.className = "tool-step pending";
  for (const call of calls) {
    const block = document.createElement("div");
    block.className = "tool-call";
    block.dataset.state = "writing";
    const name = document.createElement("span");
    name.className = "tool-name";
    name.textContent = call.name || "…";
    const args = document.createElement("pre");
    args.className = "tool-arguments";
    args.textContent = call.arguments;
    const status = document.createElement("span");
    status.className = "tool-status";
    status.textContent = "writing the call…";
    block.append(name, " ", status, args);
    view.append(block);
  }
  return view;
}

/**
 * Applies a model's `delta.tool_calls` to the calls being written.
 * @param {PendingCall[]} pending
 * @param {unknown} pieces
 */
export function addToolDeltas(pending, pieces) {
  if (!Array.isArray(pieces)) return;
  for (const piece of pieces) {
    if (!piece || typeof piece !== "object") continue;
    const index = typeof piece.index === "number" && piece.index >= 0 && piece.index < 64 ? piece.index : pending.length;
    const call = (pending[index] ??= { name: "", arguments: "" });
    const fn = piece.function ?? {};
    if (typeof fn.name === "string") call.name += fn.name;
    if (typeof fn.arguments === "string") call.arguments += fn.arguments;
  }
}

/** @param {string} text a call's arguments: indented when they are JSON */
function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/**
 * Checks a server's tool steps (from a saved message or a catch-up): well-formed ones only.
 * @param {unknown} value
 * @returns {ToolStep[]}
 */
export function checkedSteps(value) {
  if (!Array.isArray(value)) return [];
  return value.filter((step) => step && typeof step.at === "number" && Array.isArray(step.calls)).map((step) => ({
    at: step.at,
    reasoning_at: step.reasoning_at,
    calls: step.calls.filter((/** @type {any} */ call) => call && typeof call.id === "string"
      && typeof call.name === "string"),
  }));
}
