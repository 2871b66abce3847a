// @ts-check
/**
 * The conversation's messages on screen, kept by their server id — never matched by position, so a
 * conversation can hold versions of a message, tool messages, or lose one to a regenerate without the
 * page's views and the server's messages drifting apart.
 *
 * The list knows views only through `element` and `id` (null until the server has named the message),
 * and its container only through `children`, `append`, `insertBefore` and `removeChild`: the page passes
 * MessageViews and the #messages element; the unit tests (tests/js/) plain objects.
 *
 * Bringing the screen in line (`show`) moves only the elements out of place. Every answer's end brings
 * the list in line with the server's; putting all the elements back each time (`replaceChildren`) took
 * away a selection the reader had made in an earlier message, scrolled every code block back to its
 * start, and made the browser lay out and paint the whole conversation again.
 */
import { placeInOrder } from "./dom.js";

/** @typedef {{element: any, id: number | null}} View */

/** @template {View} V */
export class MessageList {
  /**
   * @param {{children: ArrayLike<any>, append: (element: any) => void, insertBefore: (element: any, before: any) => any,
   *   removeChild: (element: any) => any}} container
   * @param {(message: any) => V} makeView
   */
  constructor(container, makeView) {
    this.container = container;
    this.makeView = makeView;
    /** @type {V[]} in screen order */ this.order = [];
    /** @type {Map<number, V>} */ this.byId = new Map();
  }

  /** @param {any} message shown at the end; kept by its id once it has one */
  add(message) {
    const view = this.makeView(message);
    this.order.push(view);
    if (view.id !== null) this.byId.set(view.id, view);
    this.container.append(view.element);
    return view;
  }

  /**
   * The server has named a message this page added.
   * @param {V} view
   * @param {number} id
   */
  name(view, id) {
    if (view.id !== null) this.byId.delete(view.id);
    view.id = id;
    this.byId.set(id, view);
  }

  /** @param {number} id */
  find(id) {
    return this.byId.get(id) ?? null;
  }

  /** @param {(view: V) => boolean} [predicate] */
  last(predicate = () => true) {
    for (let index = this.order.length - 1; index >= 0; index -= 1) {
      if (predicate(this.order[index])) return this.order[index];
    }
    return null;
  }

  /**
   * Removes `view` and every view after it (an edit starts a new branch there).
   * @param {V} view
   */
  removeFrom(view) {
    const index = this.order.indexOf(view);
    if (index < 0) return;
    this.order.slice(index).forEach((gone) => { if (gone.id !== null) this.byId.delete(gone.id); });
    this.order = this.order.slice(0, index);
    this.show();
  }

  /**
   * Removes every view after `view`.
   * @param {V} view
   */
  removeAfter(view) {
    const index = this.order.indexOf(view);
    if (index >= 0 && index + 1 < this.order.length) this.removeFrom(this.order[index + 1]);
  }

  clear() {
    this.order = [];
    this.byId.clear();
    this.show();
  }

  /** The container shows `order`'s elements, in order: those not in it removed, those out of place moved,
   * the others left as they are. */
  show() {
    placeInOrder(this.container, this.order.map((view) => view.element));
  }

  /**
   * Brings the list in line with the server's messages, by id: shown in the server's order, views of
   * messages the server no longer has dropped, new ones added. A view the server has not named (a
   * message whose request failed before the server kept it, or one still on its way) stays where it was:
   * before the first named view that followed it, or last when none did. (Kept last whatever came
   * after, a refused question and its error moved below every later answer at that answer's end.)
   * Returns the messages that had no view.
   * @param {{id: number}[]} messages
   */
  reconcile(messages) {
    const wanted = new Set(messages.map((message) => message.id));
    /** @type {V[]} */ const order = [];
    const added = [];
    for (const message of messages) {
      let view = this.byId.get(message.id);
      if (!view) {
        view = this.makeView(message);
        this.byId.set(message.id, view);
        added.push(message);
      }
      order.push(view);
    }
    for (const [id] of this.byId) if (!wanted.has(id)) this.byId.delete(id);
    /** @type {Map<V | null, V[]>} the unnamed views, by the first named view kept that followed them */
    const before = new Map();
    /** @type {V[]} */ let waiting = [];
    for (const view of this.order) {
      if (view.id === null) {
        waiting.push(view);
      } else if (waiting.length && wanted.has(view.id)) {
        before.set(view, waiting);
        waiting = [];
      }
    }
    if (waiting.length) before.set(null, waiting);
    this.order = order.flatMap((view) => [...(before.get(view) ?? []), view]).concat(before.get(null) ?? []);
    this.show();
    return added;
  }

  /** Views in screen order. */
  [Symbol.iterator]() {
    return this.order[Symbol.iterator]();
  }
}
