// @ts-check
/** What the page is showing and doing, shared by its modules. */

export const LAST_CONVERSATION = "jarvis.conversation";
export const LAST_MODEL = "jarvis.model";

/**
 * One answer this page shows as it streams: its current fetch, which may be re-attached many times.
 * @typedef {import("./message-view.js").MessageView} MessageView
 * `starting`: the answer's first response (which names its messages) has yet to come.
 * @typedef {{conversationId: string, view: MessageView, messageId: number | null, traceId: string | null,
 *   controller: AbortController | null, starting: boolean, stopping: Promise<unknown> | null,
 *   wake: (() => void) | null}} Following
 */

/** @type {{conversationId: string | null, following: Following | null, editId: number | null}} */
export const state = { conversationId: null, following: null, editId: null };
