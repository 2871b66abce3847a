// @ts-check
/** Small helpers every module of the page uses. */

/** @param {string} id */
export const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/**
 * @param {string} label
 * @param {() => void} action
 */
export function button(label, action) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = label;
  element.addEventListener("click", action);
  return element;
}

/** @param {unknown} error */
export function report(error) {
  console.warn(error);
}

/** @param {number} ms */
export function seconds(ms) {
  const value = ms / 1000;
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} s`;
}
