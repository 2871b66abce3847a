// A stand-in for a list's container element (#messages, #conversation-list) in the page's unit tests:
// it records its children as the element would show them, and counts each change made to them.
import assert from "node:assert/strict";

export function container() {
  return {
    children: [],
    changes: 0,
    append(element) { this.changes += 1; this.children.push(element); },
    insertBefore(element, before) {
      this.changes += 1;
      const at = this.children.indexOf(element);
      if (at >= 0) this.children.splice(at, 1); // moved, as the DOM moves a node already in place elsewhere
      const index = before === null ? this.children.length : this.children.indexOf(before);
      assert.ok(index >= 0, "insertBefore a node that is not a child");
      this.children.splice(index, 0, element);
      return element;
    },
    removeChild(element) {
      this.changes += 1;
      const at = this.children.indexOf(element);
      assert.ok(at >= 0, "removeChild of a node that is not a child");
      this.children.splice(at, 1);
      return element;
    },
  };
}
