// Unit tests of the sidebar's conversation list (static/page/conversation-list.js), run by Node's built-in
// test runner (tests/test_javascript.py). The list knows its items and container only through a few
// members, so plain objects stand in for the <li> items and the #conversation-list element.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ConversationList } from "../../jarvis/static/page/conversation-list.js";
import { container } from "./fake-container.js";

/** Items that record what they were made for and every update, their element an object named by id. */
function items() {
  const made = [];
  const make = (id) => {
    const item = { element: { id }, updates: [], update(...values) { this.updates.push(values); } };
    made.push(item);
    return item;
  };
  return { made, make };
}

const LISTED = [
  { id: "c", title: "third", running: true },
  { id: "b", title: "second" },
  { id: "a", title: "first" },
];

test("listed again unchanged, the list touches no element and makes no item", () => {
  const shown = container();
  const { made, make } = items();
  const list = new ConversationList(shown, make);
  list.show(LISTED, "c");
  assert.deepEqual(shown.children.map((element) => element.id), ["c", "b", "a"]);
  assert.deepEqual(made.map((item) => item.updates), [[["third", true, true]], [["second", false, false]],
    [["first", false, false]]]);
  const changes = shown.changes;
  list.show(LISTED.map((conversation) => ({ ...conversation })), "c"); // the same list, read again
  assert.equal(shown.changes, changes);
  assert.equal(made.length, 3);
});

test("an answer's end: each conversation keeps its item, told its new state", () => {
  const shown = container();
  const { made, make } = items();
  const list = new ConversationList(shown, make);
  list.show(LISTED, "c");
  const elements = [...shown.children];
  list.show([{ id: "c", title: "Third, titled" }, LISTED[1], LISTED[2]], "c");
  assert.deepEqual(shown.children, elements); // the very same elements, where they were
  assert.equal(made.length, 3);
  assert.deepEqual(made[0].updates.at(-1), ["Third, titled", false, true]);
});

test("a conversation answered moves to the top alone; a deleted one goes; a new one is made", () => {
  const shown = container();
  const { made, make } = items();
  const list = new ConversationList(shown, make);
  list.show(LISTED, "c");
  const changes = shown.changes;
  list.show([LISTED[2], LISTED[0], LISTED[1]], "a"); // "a" answered: now the newest
  assert.deepEqual(shown.children.map((element) => element.id), ["a", "c", "b"]);
  assert.equal(shown.changes - changes, 1); // one move, not three
  assert.deepEqual(made[2].updates.at(-1), ["first", false, true]);
  list.show([{ id: "d", title: "new" }, LISTED[2], LISTED[1]], "d"); // "c" deleted, "d" started
  assert.deepEqual(shown.children.map((element) => element.id), ["d", "a", "b"]);
  assert.equal(made.length, 4);
  list.show([LISTED[0], LISTED[2]], "a"); // "c" listed again (restored elsewhere): a new item, not the old
  assert.equal(made.length, 5);
  assert.deepEqual(shown.children.map((element) => element.id), ["c", "a"]);
});
