// @ts-check
/** The conversation list in the sidebar: each conversation, the current one marked, a running one stoppable. */
import { button, report } from "./dom.js";

/**
 * @typedef {{id: string, title: string, running?: boolean}} ConversationSummary
 * @typedef {{open: (id: string) => Promise<void>, rename: (id: string, title: string) => Promise<void>,
 *   remove: (id: string) => Promise<void>, stop: (id: string) => Promise<void>}} ListActions
 */

/**
 * @param {HTMLElement} list
 * @param {ConversationSummary[]} conversations
 * @param {string | null} currentId
 * @param {ListActions} actions
 */
export function showConversations(list, conversations, currentId, actions) {
  list.replaceChildren(...conversations.map((conversation) => {
    const item = document.createElement("li");
    item.className = conversation.id === currentId ? "current" : "";
    const open = button(conversation.title, () => actions.open(conversation.id).catch(report));
    open.className = "open";
    if (conversation.id === currentId) open.setAttribute("aria-current", "true");
    const rename = button("✎", () => actions.rename(conversation.id, conversation.title).catch(report));
    rename.setAttribute("aria-label", `Rename ${conversation.title}`);
    const remove = button("×", () => actions.remove(conversation.id).catch(report));
    remove.setAttribute("aria-label", `Delete ${conversation.title}`);
    item.append(open);
    if (conversation.running === true) {
      item.classList.add("running");
      const halt = button("■", () => actions.stop(conversation.id).catch(report));
      halt.setAttribute("aria-label", `Stop the answer in ${conversation.title}`);
      halt.title = "An answer is being written here: stop it";
      item.append(halt);
    }
    item.append(rename, remove);
    return item;
  }));
}
