// @ts-check
/**
 * The admin's dialog (accounts mode, admins only): every account with its usage this month, its limits
 * (set in place), a new password, removal; and a form to add an account. What the server refuses is
 * said in the dialog, in the server's words.
 */
import * as api from "../api.js";
import { $, button, report } from "./dom.js";
import { usageText } from "./keys.js";

export const adminDialog = /** @type {HTMLDialogElement} */ ($("admin-dialog"));
const rows = $("admin-users");
const failure = $("admin-error");
const status = $("admin-status");
const newName = /** @type {HTMLInputElement} */ ($("new-user-name"));
const newPassword = /** @type {HTMLInputElement} */ ($("new-user-password"));
const newAdmin = /** @type {HTMLInputElement} */ ($("new-user-admin"));

/** Opens the dialog with the accounts as the server lists them. */
export async function openAdmin() {
  failure.hidden = true;
  status.hidden = true;
  await showUsers();
  adminDialog.showModal();
}

async function showUsers() {
  const users = await api.adminUsers();
  rows.replaceChildren(...users.map(row));
}

/** @param {any} user */
function row(user) {
  const line = document.createElement("tr");
  line.dataset.name = user.name;
  const name = document.createElement("td");
  name.textContent = user.admin ? `${user.name} (admin)` : user.name;
  const requests = document.createElement("td");
  requests.textContent = String(user.usage.requests);
  const tokens = document.createElement("td");
  tokens.textContent = String(user.usage.prompt_tokens + user.usage.completion_tokens);
  tokens.title = usageText(user.usage);
  const tokensLimit = limitInput(user.tokens_per_day, `Tokens a day for ${user.name}`);
  const streamsLimit = limitInput(user.max_streams, `Streams at once for ${user.name}`);
  const actions = document.createElement("td");
  actions.append(
    button("Save limits", () => saveLimits(user.name, tokensLimit.input, streamsLimit.input).catch(shown)),
    button("New password…", () => newPasswordFor(user.name).catch(shown)),
    button("Remove", () => remove(user.name).catch(shown)),
  );
  line.append(name, requests, tokens, tokensLimit.cell, streamsLimit.cell, actions);
  return line;
}

/** @param {number | null} value @param {string} label */
function limitInput(value, label) {
  const cell = document.createElement("td");
  const input = document.createElement("input");
  input.type = "number";
  input.min = "1";
  input.placeholder = "none";
  input.value = value == null ? "" : String(value);
  input.setAttribute("aria-label", label);
  cell.append(input);
  return { cell, input };
}

/** @param {HTMLInputElement} input */
function limitOf(input) {
  const text = input.value.trim();
  return text === "" ? null : Number(text);
}

/** @param {string} name @param {HTMLInputElement} tokens @param {HTMLInputElement} streams */
async function saveLimits(name, tokens, streams) {
  failure.hidden = true;
  await api.adminChangeUser(name, { tokens_per_day: limitOf(tokens), max_streams: limitOf(streams) });
  said(`Saved the limits of ${name}`);
  await showUsers();
}

/** @param {string} name */
async function newPasswordFor(name) {
  const password = prompt(`A new password for ${name} (at least 8 characters; their sessions end):`);
  if (!password) return;
  failure.hidden = true;
  await api.adminChangeUser(name, { password });
  said(`${name} has a new password`);
}

/** @param {string} name */
async function remove(name) {
  if (!confirm(`Remove ${name}, their keys, sessions and usage? Their conversations stay, closed to everyone.`)) return;
  failure.hidden = true;
  await api.adminRemoveUser(name);
  said(`Removed ${name}`);
  await showUsers();
}

/** Adds the account the form describes. */
export async function addUser() {
  failure.hidden = true;
  const user = await api.adminAddUser(newName.value.trim(), newPassword.value, newAdmin.checked);
  newName.value = "";
  newPassword.value = "";
  newAdmin.checked = false;
  said(`Added ${user.name}`);
  await showUsers();
}

/** @param {string} text */
function said(text) {
  status.textContent = text;
  status.hidden = false;
}

/** @param {unknown} error */
export function shown(error) {
  failure.textContent = error instanceof Error ? error.message : String(error);
  failure.hidden = false;
  status.hidden = true;
  report(error);
}
