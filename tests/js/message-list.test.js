// Unit tests of the page's message list (static/page/message-list.js), run by Node's built-in test
// runner (tests/test_javascript.py). The list knows views and its container only through a few
// members, so plain objects stand in for MessageViews and the #messages element.
import assert from "node:assert/strict";
import { test } from "node:test";

import { MessageList } from "../../jarvis/static/page/message-list.js";
import { container } from "./fake-container.js";

/** A view of a message: its element is a label the test can read. */
function view(message) {
  return { message, element: `${message.role}:${message.content}`, id: typeof message.id === "number" ? message.id : null };
}

const CONVERSATION = [
  { id: 1, role: "user", content: "a" },
  { id: 2, role: "assistant", content: "b" },
  { id: 3, role: "user", content: "c" },
  { id: 4, role: "assistant", content: "d" },
];

test("a message view is found by its id after the list was re-ordered", () => {
  const shown = container();
  const list = new MessageList(shown, view);
  const views = CONVERSATION.map((message) => list.add(message));
  const reordered = [CONVERSATION[2], CONVERSATION[0], CONVERSATION[3], CONVERSATION[1]];
  assert.deepEqual(list.reconcile(reordered), []); // nothing new: every view kept
  assert.equal(list.find(2), views[1]);
  assert.equal(list.find(3), views[2]);
  assert.deepEqual(shown.children, ["user:c", "user:a", "assistant:d", "assistant:b"]);
  assert.deepEqual([...list].map((shownView) => shownView.id), [3, 1, 4, 2]);
});

test("reconcile drops what the server no longer has, adds what it has new, and keeps unnamed views in place", () => {
  const shown = container();
  const list = new MessageList(shown, view);
  CONVERSATION.forEach((message) => list.add(message));
  const failed = list.add({ role: "user", content: "refused" }); // a send the server refused: never named
  const added = list.reconcile([CONVERSATION[0], CONVERSATION[1], CONVERSATION[2], { id: 7, role: "assistant", content: "e" }]);
  assert.deepEqual(added.map((message) => message.id), [7]);
  assert.equal(list.find(4), null);
  assert.equal(list.find(7).element, "assistant:e");
  assert.deepEqual(shown.children, ["user:a", "assistant:b", "user:c", "assistant:e", "user:refused"]);
  assert.equal(failed.id, null);
});

test("an unnamed question stays where it was asked: a later answer's end does not move it below that answer", () => {
  const shown = container();
  const list = new MessageList(shown, view);
  list.add(CONVERSATION[0]);
  list.add(CONVERSATION[1]);
  list.add({ role: "user", content: "refused" }); // refused before the server kept it: never named
  list.add({ role: "assistant", content: "its error" });
  const question = list.add({ role: "user", content: "c" }); // sent again: named, answered
  const answer = list.add({ role: "assistant", content: "d" });
  list.name(question, 3);
  list.name(answer, 4);
  assert.deepEqual(list.reconcile(CONVERSATION), []);
  assert.deepEqual(shown.children, ["user:a", "assistant:b", "user:refused", "assistant:its error", "user:c", "assistant:d"]);
  const next = list.add({ role: "user", content: "on its way" }); // sent, not yet named
  list.reconcile(CONVERSATION);
  assert.deepEqual(shown.children.slice(-3), ["user:c", "assistant:d", "user:on its way"]);
  assert.equal(list.last(), next);
});

test("a view named by the server is found by that id; removeFrom drops it and what follows", () => {
  const shown = container();
  const list = new MessageList(shown, view);
  list.add(CONVERSATION[0]);
  const question = list.add({ role: "user", content: "new" });
  const answer = list.add({ role: "assistant", content: "" });
  list.name(question, 9);
  list.name(answer, 10);
  assert.equal(list.find(9), question);
  assert.equal(list.last((shownView) => shownView.message.role === "user"), question);
  list.removeFrom(question);
  assert.equal(list.find(9), null);
  assert.equal(list.find(10), null);
  assert.deepEqual(shown.children, ["user:a"]);
});

test("bringing the list in line with an unchanged conversation touches no element; a change moves only what moved", () => {
  const shown = container();
  const list = new MessageList(shown, view);
  CONVERSATION.forEach((message) => list.add(message));
  shown.changes = 0;
  assert.deepEqual(list.reconcile(CONVERSATION), []);
  assert.equal(shown.changes, 0); // each answer's end: a selection or a scrolled code block elsewhere is left alone
  list.reconcile([...CONVERSATION, { id: 5, role: "user", content: "e" }]);
  assert.equal(shown.changes, 1); // the new one, added
  assert.deepEqual(shown.children, ["user:a", "assistant:b", "user:c", "assistant:d", "user:e"]);
  shown.changes = 0;
  list.reconcile([CONVERSATION[0], CONVERSATION[1], { id: 5, role: "user", content: "e" }]);
  assert.equal(shown.changes, 2); // two dropped; the three kept not moved
  assert.deepEqual(shown.children, ["user:a", "assistant:b", "user:e"]);
  shown.changes = 0;
  list.removeFrom(list.find(2));
  assert.deepEqual([shown.children, shown.changes], [["user:a"], 2]);
  list.clear();
  assert.deepEqual(shown.children, []);
});
