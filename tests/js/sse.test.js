// Unit tests of the page's SSE reader, run by Node's built-in test runner (tests/test_javascript.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import { readEvents, SSEDecoder } from "../../jarvis/static/sse.js";

const encoder = new TextEncoder();

/** A fetch Response whose body arrives in the given byte chunks. */
function responseOf(chunks) {
  const body = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
  return new Response(body);
}

async function collect(chunks) {
  const events = [];
  for await (const event of readEvents(responseOf(chunks))) events.push(event);
  return events;
}

const STREAM =
  ': ok\n\n' +
  'data: {"choices":[{"delta":{"content":"héllo 😀"}}]}\n\n' +
  ': ping\n\n' +
  'data: {"choices":[{"delta":{"content":" wörld"}}]}\n\n' +
  'data: [DONE]\n\n';

const EXPECTED = [
  { type: "chunk", chunk: { choices: [{ delta: { content: "héllo 😀" } }] } },
  { type: "chunk", chunk: { choices: [{ delta: { content: " wörld" } }] } },
  { type: "done" },
];

test("split at every byte offset, multi-byte characters included", async () => {
  const bytes = encoder.encode(STREAM);
  for (let offset = 0; offset <= bytes.length; offset++) {
    assert.deepEqual(await collect([bytes.slice(0, offset), bytes.slice(offset)]), EXPECTED, `offset ${offset}`);
  }
});

test("one byte at a time, with CRLF line ends", async () => {
  const bytes = encoder.encode(STREAM.replaceAll("\n", "\r\n"));
  assert.deepEqual(await collect([...bytes].map((byte) => new Uint8Array([byte]))), EXPECTED);
});

test("CR-only line ends and a CRLF split between chunks", async () => {
  const bytes = encoder.encode(STREAM.replaceAll("\n", "\r"));
  assert.deepEqual(await collect([bytes]), EXPECTED);
  const crlf = encoder.encode('data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n');
  const cut = crlf.indexOf(13) + 1; // between \r and \n
  assert.deepEqual(await collect([crlf.slice(0, cut), crlf.slice(cut)]), [
    { type: "chunk", chunk: { a: 1 } },
    { type: "done" },
  ]);
});

test("an error event, then [DONE]", async () => {
  const events = await collect([encoder.encode(
    'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' +
    'data: {"error":{"message":"boom","type":"server_error","param":null,"code":"stream_inactivity"}}\n\n' +
    "data: [DONE]\n\n")]);
  assert.equal(events[1].type, "error");
  assert.equal(events[1].error.code, "stream_inactivity");
  assert.deepEqual(events[2], { type: "done" });
});

test("a stream that ends without [DONE] yields no done event", async () => {
  const events = await collect([encoder.encode('data: {"choices":[]}\n\n')]);
  assert.deepEqual(events, [{ type: "chunk", chunk: { choices: [] } }]);
});

test("events after [DONE] are not read", async () => {
  const events = await collect([encoder.encode('data: [DONE]\n\ndata: {"late":true}\n\n')]);
  assert.deepEqual(events, [{ type: "done" }]);
});

test("comments, unknown fields and malformed data are skipped; multi-line data is joined", () => {
  const decoder = new SSEDecoder();
  assert.deepEqual(decoder.push(": c\nevent: x\nid: 3\nretry: 9\n\n"), []);
  assert.deepEqual(decoder.push("data: a\ndata: b\n\n"), ["a\nb"]);
  assert.deepEqual(decoder.push("data:x\n\n"), ["x"]);
});

test("the body is cancelled (its connection freed) when the consumer stops early", async () => {
  let cancelled = false;
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(encoder.encode(STREAM));
    },
    cancel() {
      cancelled = true;
    },
  });
  for await (const event of readEvents(new Response(body))) {
    assert.equal(event.type, "chunk");
    break;
  }
  assert.equal(cancelled, true);
});

test("an abort while reading rejects once and leaves no unhandled rejection", async () => {
  const controller = new AbortController();
  const body = new ReadableStream({
    start(stream) {
      stream.enqueue(encoder.encode('data: {"a":1}\n\n'));
      controller.signal.addEventListener("abort", () => stream.error(new DOMException("aborted", "AbortError")));
    },
  });
  const unhandled = [];
  const listener = (reason) => unhandled.push(reason);
  process.on("unhandledRejection", listener);
  await assert.rejects(async () => {
    for await (const event of readEvents(new Response(body))) {
      assert.equal(event.type, "chunk");
      controller.abort();
    }
  }, { name: "AbortError" });
  await new Promise((resolve) => setTimeout(resolve, 10));
  process.off("unhandledRejection", listener);
  assert.deepEqual(unhandled, []);
});
