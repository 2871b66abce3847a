// @ts-check
/**
 * The conversation list in the sidebar: each conversation, the current one marked, a running one stoppable.
 *
 * Kept by conversation id. The page lists the conversations again two or three times an answer (sent,
 * ended, titled); each time an item whose conversation is still listed is kept and only what changed in it
 * is changed (its title, its mark, its Stop button), and items are moved only when out of place. Built
 * again from scratch each time (`replaceChildren`), the list took the keyboard's place away from a reader
 * who had tabbed to one of its buttons whenever an answer ended, and laid out every item again.
 *
 * The list knows its items only through `element` and `update`, and its container through `children`,
 * `insertBefore` and `removeChild`: the page passes conversationItem and the #conversation-list
 * element; the unit tests (tests/js/) plain objects.
 */
import { button, placeInOrder, report } from "./dom.js";

/**
 * @typedef {{id: string, title: string, running?: boolean}} ConversationSummary
 * @typedef {{open: (id: string) => Promise<void>, rename: (id: string, title: string) => Promise<void>,
 *   remove: (id: string) => Promise<void>, stop: (id: string) => Promise<void>}} ListActions
 * @typedef {{element: any, update: (title: string, running: boolean, current: boolean) => void}} Item
 */

export class ConversationList {
  /**
   * @param {{children: ArrayLike<any>, insertBefore: (element: any, before: any) => any,
   *   removeChild: (element: any) => any}} container
   * @param {(id: string) => Item} makeItem
   */
  constructor(container, makeItem) {
    this.container = container;
    this.makeItem = makeItem;
    /** @type {Map<string, Item>} */ this.items = new Map();
  }

  /**
   * Shows `conversations` in their order, `currentId` marked.
   * @param {ConversationSummary[]} conversations
   * @param {string | null} currentId
   */
  show(conversations, currentId) {
    /** @type {Map<string, Item>} */ const items = new Map();
    for (const conversation of conversations) {
      const item = this.items.get(conversation.id) ?? this.makeItem(conversation.id);
      item.update(conversation.title, conversation.running === true, conversation.id === currentId);
      items.set(conversation.id, item);
    }
    this.items = items; // a conversation no longer listed (deleted, here or elsewhere) is forgotten
    placeInOrder(this.container, [...items.values()].map((item) => item.element));
  }
}

/**
 * One conversation's item in the page: its title opens it, ✎ renames it, × deletes it, ■ (while an
 * answer is written there) stops that answer. `update` keeps the item and its buttons: it sets the title
 * where it shows when it changed, the marks, and adds or removes the ■.
 * @param {string} id
 * @param {ListActions} actions
 * @returns {Item}
 */
export function conversationItem(id, actions) {
  const item = document.createElement("li");
  /** @type {string | null} */ let title = null;
  const open = button("", () => actions.open(id).catch(report));
  open.className = "open";
  const rename = button("✎", () => actions.rename(id, title ?? "").catch(report));
  const remove = button("×", () => actions.remove(id).catch(report));
  const halt = button("■", () => actions.stop(id).catch(report));
  halt.title = "An answer is being written here: stop it";
  item.append(open, rename, remove);
  return {
    element: item,
    update(newTitle, running, current) {
      if (newTitle !== title) {
        title = newTitle;
        open.textContent = newTitle;
        rename.setAttribute("aria-label", `Rename ${newTitle}`);
        remove.setAttribute("aria-label", `Delete ${newTitle}`);
        halt.setAttribute("aria-label", `Stop the answer in ${newTitle}`);
      }
      item.classList.toggle("current", current);
      item.classList.toggle("running", running);
      if (current) open.setAttribute("aria-current", "true");
      else open.removeAttribute("aria-current");
      if (running && halt.parentNode !== item) item.insertBefore(halt, rename);
      if (!running && halt.parentNode === item) halt.remove();
    },
  };
}
