// @ts-check
/** Search: the words typed, found in titles and ended messages; a result opens its conversation there. */
import * as api from "../api.js";
import { button, report } from "./dom.js";

/** @type {ReturnType<typeof setTimeout> | null} */ let searchTimer = null;
let searchAsked = 0;

/**
 * Searches as the user types (150 ms after the last key).
 * @param {HTMLInputElement} searchBox
 * @param {HTMLElement} searchResults
 * @param {HTMLElement} conversationList hidden while results show
 * @param {(conversationId: string, messageId: number | null) => Promise<void>} openResult
 */
export function searchAsTyped(searchBox, searchResults, conversationList, openResult) {
  searchBox.addEventListener("input", () => {
    if (searchTimer !== null) clearTimeout(searchTimer);
    searchTimer = setTimeout(() => runSearch(searchBox, searchResults, conversationList, openResult).catch(report), 150);
  });
}

/**
 * @param {HTMLInputElement} searchBox
 * @param {HTMLElement} searchResults
 * @param {HTMLElement} conversationList
 * @param {(conversationId: string, messageId: number | null) => Promise<void>} openResult
 */
async function runSearch(searchBox, searchResults, conversationList, openResult) {
  const query = searchBox.value.trim();
  const asked = ++searchAsked;
  if (!query) {
    searchResults.hidden = true;
    conversationList.hidden = false;
    return;
  }
  const results = await api.search(query);
  if (asked !== searchAsked) return; // a newer query is on its way
  searchResults.replaceChildren(...results.map((/** @type {any} */ result) => {
    const item = document.createElement("li");
    const open = button("", () => openResult(result.conversation_id, result.message_id).catch(report));
    const name = document.createElement("span");
    name.className = "result-title";
    name.textContent = result.title;
    const snippet = document.createElement("span");
    snippet.className = "result-snippet";
    snippet.append(...highlighted(result.snippet));
    open.replaceChildren(name, snippet);
    item.append(open);
    return item;
  }));
  if (!results.length) {
    const none = document.createElement("li");
    none.className = "none";
    none.textContent = "Nothing found";
    searchResults.replaceChildren(none);
  }
  searchResults.hidden = false;
  conversationList.hidden = true;
}

/**
 * A snippet's text with each match (between U+E000 and U+E001) in a <mark>: built from text nodes, never HTML.
 * @param {string} snippet
 */
function highlighted(snippet) {
  /** @type {(Node)[]} */ const nodes = [];
  String(snippet).split("\ue000").forEach((part, index) => {
    if (index === 0) { nodes.push(document.createTextNode(part)); return; }
    const [match, rest = ""] = part.split("\ue001");
    const mark = document.createElement("mark");
    mark.textContent = match;
    nodes.push(mark, document.createTextNode(rest));
  });
  return nodes;
}
