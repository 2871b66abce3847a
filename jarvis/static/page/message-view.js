// @ts-check
/**
 * The message view: one message on screen. Assistant text (and a thinking model's reasoning, in a
 * collapsible block above it) is rendered as sanitised Markdown, at most once per frame and, while it
 * streams, at most every RENDER_EVERY_MS (or four times as long as the last render took). A thinking
 * model's reasoning arrives as `delta.reasoning_content` (whatever shape the upstream used) and shows
 * live in a block above the answer that folds away when the answer starts. An answer that called tools shows
 * each step's calls where they came in its text (./tool-view.js).
 */
import { renderMarkdown } from "../markdown.js";
import { seconds } from "./dom.js";
import { attachedView } from "./attach.js";
import { addToolDeltas, checkedSteps, pendingView, stepView } from "./tool-view.js";

// Each render re-lays out and repaints the message. At one per token, a 400-token answer at 50 tokens a
// second cost headless Chromium 3.0 CPU-seconds in 8 s (37% of a core, under 10% of it in the render
// itself); at most 20 a second, the text still grows smoothly.
const RENDER_EVERY_MS = 50;

/**
 * @typedef {{ttft_ms?: number | null, thinking_ms?: number | null, completion_tokens?: number | null,
 *   tokens_per_second?: number | null, upstream?: string, finish_reason?: string}} AnswerStats
 * @typedef {{id?: number, role: string, content: string, reasoning?: string, status?: string,
 *   error?: string | null, trace_id?: string | null, stats?: AnswerStats | null, parent_id?: number | null,
 *   versions?: number[], tools?: import("./tool-view.js").ToolStep[] | null,
 *   attachments?: import("./attach.js").Attached[] | null}} Message
 */

/**
 * One message on screen. Assistant text (and a thinking model's reasoning, in a collapsible block
 * above it) is rendered as sanitised Markdown, at most once per frame and every RENDER_EVERY_MS.
 */
export class MessageView {
  /** @param {Message} message */
  constructor(message) {
    this.message = message;
    this.element = document.createElement("article");
    this.element.className = `message ${message.role}`;
    this.element.dataset.role = message.role;
    if (typeof message.id === "number") this.element.dataset.id = String(message.id);
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
    /** @type {string | null} what the passing note says now (see setNote) */
    this.noteKey = null;
    this.statsLine = document.createElement("p");
    this.statsLine.className = "stats";
    this.statsLine.hidden = true;
    this.actions = document.createElement("div");
    this.actions.className = "actions";
    this.element.append(this.thinking, this.body, this.errorNote, this.statsLine, this.actions);
    if (message.attachments?.length) this.body.after(attachedView(message.attachments));
    this.text = message.content;
    this.reasoning = message.reasoning ?? "";
    this.tools = checkedSteps(message.tools); // the tool steps: their calls, where they came, their results
    /** @type {import("./tool-view.js").PendingCall[]} */ this.pending = []; // calls the model is writing
    /** @type {Set<string>} */ this.openedCalls = new Set();
    /** @type {{text: string, element: HTMLElement}[]} */ this.segments = []; // the text between the steps
    this.toolsChanged = true;
    this.renderedReasoning = null;
    /** @type {number | null} */ this.thinkingStartedAt = null; // this page's clock, while it watches
    // Whether this page watches the answer from its start: only then does its clock time the thinking
    // (a page that re-attached mid-thought waits for the server's figure, in the final stats).
    this.watchedFromStart = message.status === "streaming" && !message.content && !message.reasoning;
    /** @type {number | null} */ this.thinkingMs = message.stats?.thinking_ms ?? null;
    /** @type {ReturnType<typeof setInterval> | null} */ this.thinkingTimer = null;
    this.renderPending = false;
    this.lastRenderAt = -Infinity;
    this.lastRenderMs = 0;
    this.renderedText = null;
    /** @type {Message | null} */ this.saved = null; // as the server last had it, when it differs
    this.setStatus(message.status ?? "complete", message.error ?? null, message.trace_id ?? null);
    this.setStats(message.stats ?? null);
    this.render();
  }

  /** Whether the server can continue this answer: cut short (stopped, interrupted, an error after some
   * text, or ended at max_tokens). The server checks again. */
  get continuable() {
    const status = this.message.status;
    return this.message.role === "assistant" && (this.saved ? this.saved.content : this.text) !== ""
      && this.tools.length === 0 && (
      status === "stopped" || status === "interrupted" || status === "error"
      || (status === "complete" && this.message.stats?.finish_reason === "length"));
  }

  /**
   * An ended message as the server saved it: the server is the truth (a page stops reading at Stop, so it
   * may show less than was saved; or a worker died before saving what this page had seen).
   * @param {Message} saved
   */
  showSaved(saved, { always = false } = {}) {
    if (saved.status === "streaming" || this.message.role !== "assistant") return;
    const tools = checkedSteps(saved.tools);
    if (saved.content === this.text && (saved.reasoning ?? "") === this.reasoning
        && JSON.stringify(tools) === JSON.stringify(this.tools)) return;
    this.saved = saved;
    // A worker that died before saving the last tokens this page showed: they stay on screen (to read or
    // copy) until the answer is continued from what was saved.
    if (!always && saved.status === "interrupted" && this.text.startsWith(saved.content)) return;
    this.text = saved.content;
    this.reasoning = saved.reasoning ?? "";
    this.setTools(tools);
    this.render();
  }

  /**
   * The answer's tool steps as the server has them (a re-attach's catch-up, a saved answer).
   * @param {unknown} steps
   */
  setTools(steps) {
    this.tools = checkedSteps(steps);
    this.pending = [];
    this.toolsChanged = true;
    this.scheduleRender();
  }

  /**
   * A step's calls are about to run: they replace the calls the model was writing.
   * @param {any} step
   */
  toolStep(step) {
    const [checked] = checkedSteps([step]);
    if (!checked) return;
    this.tools.push(checked);
    this.pending = [];
    this.toolsChanged = true;
    this.scheduleRender();
  }

  /**
   * A call's result, or its progress while it runs.
   * @param {any} news {id, content, is_error, duration_ms} or {id, progress, total, message}
   * @param {"result" | "progress"} kind
   */
  toolNews(news, kind) {
    const call = this.tools.at(-1)?.calls.find((known) => known.id === news?.id);
    if (!call) return;
    if (kind === "result" && typeof news.content === "string") {
      Object.assign(call, { result: news.content, is_error: news.is_error === true, duration_ms: news.duration_ms });
    } else if (kind === "progress") {
      call.progress = { progress: news.progress, total: news.total, message: news.message };
    }
    this.toolsChanged = true;
    this.scheduleRender();
  }

  /** The message's id on the server; null until the server has said it. */
  get id() {
    return typeof this.message.id === "number" ? this.message.id : null;
  }

  /** @param {number} id */
  set id(id) {
    this.message.id = id;
    this.element.dataset.id = String(id);
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
    if (delta.tool_calls) {
      addToolDeltas(this.pending, delta.tool_calls);
      this.toolsChanged = true;
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
    if (this.watchedFromStart) this.thinkingMs ??= performance.now() - this.thinkingStartedAt;
    this.thinkingStartedAt = null;
    if (this.thinkingTimer !== null) clearInterval(this.thinkingTimer);
    this.thinkingTimer = null;
    if (this.text) this.thinking.open = false;
    this.labelThinking();
  }

  labelThinking() {
    if (this.thinkingStartedAt !== null) {
      this.thinkingLabel.textContent = this.watchedFromStart
        ? `Thinking… ${seconds(performance.now() - this.thinkingStartedAt)}` : "Thinking…";
    } else {
      this.thinkingLabel.textContent = this.thinkingMs !== null ? `Thought for ${seconds(this.thinkingMs)}` : "Thoughts";
    }
  }

  scheduleRender() {
    if (this.renderPending) return;
    this.renderPending = true;
    const spacing = Math.max(RENDER_EVERY_MS, 4 * this.lastRenderMs);
    const wait = this.lastRenderAt + spacing - performance.now();
    const inFrame = () => requestAnimationFrame(() => { if (this.renderPending) this.render(); });
    if (wait > 0) setTimeout(inFrame, wait);
    else inFrame();
  }

  render() {
    const started = performance.now();
    this.renderPending = false;
    this.lastRenderAt = started;
    this.show();
    this.lastRenderMs = performance.now() - started;
  }

  show() {
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
    if (this.tools.length || this.pending.length) {
      this.showWithTools();
    } else if (this.text !== this.renderedText) {
      this.renderedText = this.text;
      showMarkdown(this.body, this.text);
    }
  }

  /** The text cut where each tool step came, the step's calls between; a segment is rendered again only when
   * its text changed. */
  showWithTools() {
    if (this.text === this.renderedText && !this.toolsChanged) return;
    this.renderedText = this.text;
    this.toolsChanged = false;
    const running = this.message.status === "streaming";
    /** @type {HTMLElement[]} */ const children = [];
    /** @type {string[]} */ const texts = [];
    let before = 0;
    for (const step of this.tools) {
      const at = Math.min(Math.max(step.at, before), this.text.length);
      texts.push(this.text.slice(before, at));
      before = at;
    }
    texts.push(this.text.slice(before));
    texts.forEach((text, index) => {
      let segment = this.segments[index];
      if (!segment || segment.text !== text) {
        const element = document.createElement("div");
        element.className = "segment";
        showMarkdown(element, text);
        segment = this.segments[index] = { text, element };
      }
      children.push(segment.element);
      if (index < this.tools.length) children.push(stepView(this.tools[index], running, this.openedCalls));
    });
    if (this.pending.length) children.push(pendingView(this.pending));
    this.body.replaceChildren(...children);
  }

  /**
   * The stream ended: show what arrived and how it ended.
   * @param {string} status
   * @param {string | null} error
   * @param {string | null} traceId
   */
  finish(status, error, traceId) {
    this.stopThinking();
    this.setStatus(status, error, traceId);
    this.pending = [];
    this.toolsChanged = true; // a call still without a result was cancelled
    this.render();
  }

  /**
   * @param {string} status
   * @param {string | null} error
   * @param {string | null} traceId
   */
  setStatus(status, error, traceId) {
    this.message.status = status;
    if (this.message.role === "assistant") this.element.dataset.status = status;
    const notes = {
      error: error ? `Error: ${error}` : "Error",
      stopped: error ? `Stopped: ${error}` : "Stopped.",
      interrupted: "Interrupted: the answer was cut short.",
    };
    const note = notes[/** @type {keyof typeof notes} */ (status)];
    this.noteKey = null;
    this.errorNote.hidden = !note;
    this.errorNote.textContent = note ? `${note}${status === "error" && traceId ? ` (trace ${traceId})` : ""}` : "";
  }

  /**
   * A passing note while the answer streams ("Reconnecting…"), or none. A note set again with the same
   * `key` while it shows is left as it is, its button too: the waiting note comes with every heartbeat,
   * and a button replaced between a click's press and its release never got the click.
   * @param {string | null} text
   * @param {HTMLElement | null} [action]
   * @param {string | null} [key]
   */
  setNote(text, action = null, key = null) {
    if (key !== null && key === this.noteKey && !this.errorNote.hidden) return;
    this.noteKey = key;
    if (!text && !action && this.errorNote.hidden && !this.errorNote.firstChild) return; // every delta clears it
    this.errorNote.hidden = !text;
    this.errorNote.replaceChildren(...(text ? [text] : []), ...(action ? [" ", action] : []));
  }

  /** @param {AnswerStats | null} stats numbers from the server; nothing else is trusted */
  setStats(stats) {
    if (!stats || typeof stats !== "object") return;
    this.message.stats = stats;
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
export function showMarkdown(target, markdown) {
  try {
    target.replaceChildren(renderMarkdown(markdown));
  } catch (error) {
    console.warn("rendering Markdown failed; showing plain text", error);
    target.textContent = markdown;
  }
}
