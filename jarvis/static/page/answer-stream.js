// @ts-check
/**
 * The answer stream: starting an answer, attaching to it, re-attaching after any break, and Stop.
 * The server owns the answer: it saves every answer as it streams, so this page only shows what the
 * server has and what is arriving. Stop asks the server to stop it at its source and stops reading
 * at once; the server keeps the partial answer with status "stopped". A Stop before the answer's first
 * response has come waits for that response (it comes as soon as the server has stopped the answer): it
 * names the question and the answer, which a page that stopped reading would never learn.
 */
import * as api from "../api.js";
import { readEvents } from "../sse.js";
import { button, report } from "./dom.js";
import { state } from "./state.js";

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 30000;
// How long a Stop waits for the answer's first response before it stops reading anyway. The server
// answers at once when it has the answer and stops it; a server that has not answered by then may never.
const STOP_WAITS_FOR_START_MS = 5000;

/** What the rest of the page does when a stream starts or ends; set once by main.js. */
export const hooks = {
  /** @type {(streaming: boolean) => void} */ streaming: () => {},
  /** @type {(conversationId: string) => Promise<void>} */ settle: async () => {},
  /** @type {(conversationId: string) => Promise<void>} */ stopElsewhere: async () => {},
  /** @type {(conversationId: string) => Promise<void>} */ reopen: async () => {},
  /** @type {(view: import("./message-view.js").MessageView, id: number) => void} */ named: () => {},
};

/**
 * Follows one answer until it ends: the server writes it whatever happens to this page, so a stream
 * that breaks without a Stop (a lost network, a suspended tab, a restarted worker) is re-attached from
 * what the page already shows, with back-off. Every way out ends in a status: complete, stopped,
 * error, or interrupted (the server that wrote it died).
 * @param {string} conversationId
 * @param {import("./message-view.js").MessageView} view
 * @param {number | null} messageId known when re-attaching to an answer already running
 * @param {((signal: AbortSignal) => Promise<Response>) | null} start starts a new answer
 * @param {(response: Response) => void} [started] the answer's first response, before its body is read
 */
export async function followAnswer(conversationId, view, messageId, start, started = () => {}) {
  /** @type {import("./state.js").Following} */
  const following = {
    conversationId, view, messageId, traceId: null, controller: null, starting: false, stopping: null, wake: null,
  };
  state.following = following;
  hooks.streaming(true);
  let ending = { status: "interrupted", error: /** @type {string | null} */ (null) };
  let retryMs = RETRY_FIRST_MS;
  /** @type {unknown} */ let lastFailure = null;
  try {
    for (let first = true; ; first = false) {
      following.controller = new AbortController();
      try {
        following.starting = first && !!start;
        const response = first && start
          ? await start(following.controller.signal)
          : await api.attach(conversationId, /** @type {number} */ (following.messageId), view.text.length,
            view.reasoning.length, following.controller.signal);
        if (first && start) {
          following.starting = false;
          following.messageId = Number(response.headers.get("X-Message-Id")) || null;
          following.traceId = response.headers.get("X-Request-Id");
          if (following.messageId) hooks.named(view, following.messageId);
          started(response);
          if (following.stopping) { // Stopped while this response was on its way: it named the messages
            // A Stop that reached the server before the answer had started found nothing to stop: again.
            if (response.ok && (await following.stopping) === false) {
              following.stopping = api.stopAnswer(conversationId).catch(report);
            }
            following.controller.abort();
            break;
          }
        }
        if (!response.ok) {
          const failure = await response.json().catch(() => ({}));
          ending = { status: "error", error: failure?.error?.message ?? `HTTP ${response.status}` };
          break;
        }
        view.setNote(null);
        const ended = await readAnswer(response, view, () => { retryMs = RETRY_FIRST_MS; });
        if (ended) {
          ending = ended;
          break;
        }
      } catch (failure) {
        following.starting = false;
        lastFailure = failure;
        if (!following.stopping && !following.controller.signal.aborted) console.warn("the answer's stream broke", failure);
      }
      if (!following.messageId && !following.stopping) {
        // It never started: nothing on the server to re-attach to.
        ending = { status: "error", error: lastFailure instanceof Error ? lastFailure.message : "the answer could not start" };
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
      ending = { status: "stopped", error: null };
    }
  } finally {
    if (state.following === following || following.stopping) {
      view.finish(ending.status, ending.error, following.traceId);
    }
    if (state.following === following) {
      state.following = null;
      hooks.streaming(false);
    }
    await hooks.settle(conversationId).catch(report);
  }
}

/**
 * Reads one attachment's events into the view. Returns how the answer ended, or null when the body
 * ended without saying (the caller re-attaches).
 * @param {Response} response
 * @param {import("./message-view.js").MessageView} view
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
      if (Array.isArray(chunk.waiting?.for)) showWaiting(view, chunk.waiting.for, chunk.waiting.position);
      const delta = chunk.choices?.[0]?.delta;
      if (delta && (delta.content || delta.reasoning_content)) view.setNote(null);
      view.applyDelta(delta);
      // The tool loop (jarvis.tool_loop): all the steps (a re-attach's catch-up), a step's calls, their news.
      if (chunk.tools) view.setTools(chunk.tools);
      if (chunk.tool_step) view.toolStep(chunk.tool_step);
      if (chunk.tool_progress) view.toolNews(chunk.tool_progress, "progress");
      if (chunk.tool_result) view.toolNews(chunk.tool_result, "result");
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
 * @param {import("./message-view.js").MessageView} view
 * @param {unknown[]} others conversation ids
 */
function showWaiting(view, others, position) {
  const ahead = Number.isInteger(position) && position > 1 ? ` (${position - 1} ahead in line)` : "";
  const other = others.find((id) => typeof id === "string");
  if (!other) {
    view.setNote(`Waiting for the model to be free${ahead}…`);
    return;
  }
  const text = `Waiting for another answer to finish${ahead} —`;
  view.setNote(text, button("Stop it", () => hooks.stopElsewhere(other).catch(report)), `${text}\n${other}`);
}

/** Stop: the server stops the answer at its source; this page stops reading at once. */
export function stop() {
  const following = state.following;
  if (!following || following.stopping) return;
  following.view.setNote("Stopping…");
  following.stopping = api.stopAnswer(following.conversationId).catch(report);
  if (following.starting) {
    const controller = following.controller;
    setTimeout(() => controller?.abort(), STOP_WAITS_FOR_START_MS);
  } else {
    following.controller?.abort();
  }
  following.wake?.();
}

/** Stop reading without stopping the answer (another conversation was opened): it runs on. */
export function detach() {
  const following = state.following;
  if (!following) return;
  state.following = null;
  hooks.streaming(false);
  following.controller?.abort();
  following.wake?.();
}

/** The page came back (a tab made visible, the network back): re-attach at once rather than wait. */
export function reattachNow() {
  const following = state.following;
  if (following) {
    if (following.wake) following.wake();
    else following.controller?.abort(); // a connection that may have died while the page slept
  } else if (state.conversationId) {
    hooks.reopen(state.conversationId).catch(report);
  }
}
