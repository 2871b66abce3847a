// @ts-check
/** The signed-in person's personal API keys (accounts mode): listed, made (shown once) and revoked. */
import * as api from "../api.js";
import { $, button, report } from "./dom.js";

export const keysDialog = /** @type {HTMLDialogElement} */ ($("keys-dialog"));
const list = $("keys-list");
const label = /** @type {HTMLInputElement} */ ($("key-label"));
const made = $("new-key");
const failure = $("keys-error");

/** Opens the dialog with the account's keys as the server lists them. */
export async function openKeys() {
  made.hidden = true;
  made.textContent = "";
  failure.hidden = true;
  await showKeys();
  keysDialog.showModal();
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
