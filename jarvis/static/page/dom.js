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

/**
 * Makes `container` show `elements`, in order: children not among them removed, elements out of place
 * moved, the others left where they are — so a selection, a focused button or a scrolled block in an
 * element that stays is kept (`replaceChildren` would take them all away and lay everything out again).
 * Knows its container only through `children`, `insertBefore` and `removeChild` (tests/js use a fake).
 * @param {{children: ArrayLike<any>, insertBefore: (element: any, before: any) => any,
 *   removeChild: (element: any) => any}} container
 * @param {any[]} elements
 */
export function placeInOrder(container, elements) {
  const wanted = new Set(elements);
  for (const child of Array.from(container.children)) {
    if (!wanted.has(child)) container.removeChild(child);
  }
  elements.forEach((element, index) => {
    const here = container.children[index] ?? null;
    if (here !== element) container.insertBefore(element, here);
  });
}
