// @ts-check
/**
 * The signed-in person's account (accounts mode): their usage this month and limits, and their personal
 * API keys — listed, made (shown once) and revoked.
 */
import * as api from "../api.js";
import { $, button, report } from "./dom.js";

export const keysDialog = /** @type {HTMLDialogElement} */ ($("keys-dialog"));
const list = $("keys-list");
const label = /** @type {HTMLInputElement} */ ($("key-label"));
const made = $("new-key");
const failure = $("keys-error");
const usageLine = $("account-usage");

/** Opens the dialog with the account's keys as the server lists them. */
export async function openKeys() {
  made.hidden = true;
  made.textContent = "";
  failure.hidden = true;
  await Promise.all([showKeys(), showUsage()]);
  keysDialog.showModal();
}

const number = new Intl.NumberFormat();

/**
 * Requests and tokens, as one line.
 * @param {{requests: number, prompt_tokens: number, completion_tokens: number}} counts
 */
export function usageText(counts) {
  return `${number.format(counts.requests)} request${counts.requests === 1 ? "" : "s"}, ` +
    `${number.format(counts.prompt_tokens)} prompt + ${number.format(counts.completion_tokens)} completion tokens`;
}

async function showUsage() {
  const used = await api.usage();
  const limits = [];
  if (used.limits.tokens_per_day != null) limits.push(`${number.format(used.limits.tokens_per_day)} tokens a day`);
  if (used.limits.max_streams != null) limits.push(`${used.limits.max_streams} answers at once`);
  usageLine.textContent = `This month: ${usageText(used.total)}.` + (limits.length ? ` Your limits: ${limits.join(", ")}.` : "");
}

async function showKeys() {
  const account = await api.account();
  list.replaceChildren(...account.keys.map((/** @type {any} */ key) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = `${key.label || "(no label)"} — ${key.id}, ${key.last_used_at ? "used" : "never used"}`;
    item.append(name, button("Revoke", () => revoke(key.id).catch(shown)));
    return item;
  }));
  if (!account.keys.length) {
    const none = document.createElement("li");
    none.className = "none";
    none.textContent = "No keys yet";
    list.replaceChildren(none);
  }
}

/** Makes a key and shows it, this once. */
export async function makeKey() {
  failure.hidden = true;
  const key = await api.makeKey(label.value.trim());
  label.value = "";
  made.textContent = `Your new key (copy it now: it is not shown again): ${key.key}`;
  made.dataset.key = key.key;
  made.hidden = false;
  await showKeys();
}

/** @param {string} id */
async function revoke(id) {
  await api.revokeKey(id);
  await showKeys();
}

/** @param {unknown} error */
export function shown(error) {
  failure.textContent = error instanceof Error ? error.message : String(error);
  failure.hidden = false;
  report(error);
}
