// @ts-check
/**
 * Reads an OpenAI-style SSE stream from a fetch Response.
 *
 * Handles chunk boundaries anywhere (inside a line, inside a multi-byte UTF-8
 * character), LF/CRLF/CR line ends, comment lines and multi-line `data:`.
 * Stops at `[DONE]`. Never leaves the body locked: `finally` cancels the
 * reader and swallows the AbortError that cancel() rejects with after a Stop.
 */

/** Incremental SSE decoder: push text, get complete `data` payloads. */
export class SSEDecoder {
  constructor() {
    /** @type {string} */ this.buffer = "";
    /** @type {string[]} */ this.data = [];
    this.pendingCR = false;
  }

  /**
   * @param {string} text decoded text, possibly a fragment
   * @returns {string[]} payloads of the events completed by this text
   */
  push(text) {
    if (this.pendingCR) {
      text = "\r" + text;
      this.pendingCR = false;
    }
    if (text.endsWith("\r")) {
      text = text.slice(0, -1);
      this.pendingCR = true;
    }
    this.buffer += text.replace(/\r\n?/g, "\n");
    /** @type {string[]} */ const events = [];
    let newline;
    while ((newline = this.buffer.indexOf("\n")) !== -1) {
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + 1);
      if (line === "") {
        if (this.data.length) events.push(this.data.join("\n"));
        this.data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let value = colon === -1 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") this.data.push(value);
      }
    }
    return events;
  }

  /** At end of input: a held-back CR still ends its line. @returns {string[]} */
  finish() {
    if (!this.pendingCR) return [];
    this.pendingCR = false;
    return this.push("\n");
  }
}

/**
 * @typedef {{type: "chunk", chunk: any} | {type: "error", error: any} | {type: "done"}} StreamEvent
 */

/**
 * Yields parsed events from a streaming response until `[DONE]`.
 * Ends without a "done" event when the body ends early (the caller shows it as interrupted).
 * @param {Response} response
 * @returns {AsyncGenerator<StreamEvent>}
 */
export async function* readEvents(response) {
  if (!response.body) throw new Error("the response has no body");
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  const sse = new SSEDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
      const payloads = sse.push(text);
      if (done) payloads.push(...sse.finish());
      for (const payload of payloads) {
        if (payload === "[DONE]") {
          yield { type: "done" };
          return;
        }
        let parsed;
        try {
          parsed = JSON.parse(payload);
        } catch {
          continue; // a malformed event: skip it, as the server does
        }
        yield parsed && parsed.error ? { type: "error", error: parsed.error } : { type: "chunk", chunk: parsed };
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
