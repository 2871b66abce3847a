// @ts-check
/**
 * Renders untrusted model output as Markdown, safely.
 *
 * marked turns Markdown into HTML (raw HTML in the source is escaped to text); DOMPurify sanitises that HTML (never the
 * Markdown source) in an inert document; then links are limited to
 * http/https/mailto and open with rel="noopener noreferrer", and images are
 * never loaded: each becomes a button that opens the image only on a click.
 * The whole message is re-rendered and re-sanitised on every update, since a
 * tag can be split across chunks.
 */
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.min.js";
import katex from "./vendor/katex.mjs";

// Raw HTML in model output is shown as text, never parsed as HTML: a chat answer has no need for it,
// and even parsing it inertly makes Chromium log CSP reports for blocked inline handlers.
marked.use({
  renderer: {
    html(/** @type {{text: string}} */ token) {
      return escapeHtml(token.text);
    },
  },
});

// Math: $$…$$ and \[…\] as blocks (or inline, within a line), $…$ and \(…\) inline. marked never runs
// these inside code spans or blocks, so code stays literal. KaTeX writes MathML only — the browser draws
// it; no stylesheet, fonts or inline styles, so the strict CSP holds — without trust (\href, \url,
// \htmlClass… stay inert) and with bounded sizes and macro expansion. A formula KaTeX cannot parse shows
// as its source text; it never stops the rest of the message from rendering.
const MATH_LIMIT = 4000; // characters of one formula; longer ones stay as text
const KATEX_OPTIONS = { output: "mathml", throwOnError: true, trust: false, strict: "ignore", maxSize: 20,
  maxExpand: 200 };

/**
 * @param {string} tex
 * @param {boolean} display
 * @param {string} raw the formula with its delimiters, shown when it cannot be rendered
 */
function renderMath(tex, display, raw) {
  if (tex.length <= MATH_LIMIT) {
    try {
      const mathml = katex.renderToString(tex, { ...KATEX_OPTIONS, displayMode: display });
      // DOMPurify drops <semantics> and <annotation> (keeping their text): take the TeX copy out first.
      return mathml.replace(/<annotation[\s\S]*?<\/annotation>/g, "").replace(/<\/?semantics>/g, "");
    } catch (error) {
      // a parse error, or a formula nested deeper than the stack: shown as written
    }
  }
  return `<span class="math-source">${escapeHtml(raw)}</span>`;
}

const BLOCK_MATH = /^(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n|$)/;
const INLINE_MATH = /^(?:\$\$([^$]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$(?![\s$])([^$\n]+?)(?<![\s\\])\$(?!\d))/;

marked.use({
  extensions: [
    {
      name: "mathBlock",
      level: "block",
      start: (/** @type {string} */ src) => src.match(/\$\$|\\\[/)?.index,
      tokenizer(/** @type {string} */ src) {
        const match = BLOCK_MATH.exec(src);
        if (match) return { type: "mathBlock", raw: match[0], text: (match[1] ?? match[2]).trim() };
        return undefined;
      },
      renderer: (/** @type {{raw: string, text: string}} */ token) => `<p>${renderMath(token.text, true, token.raw.trim())}</p>`,
    },
    {
      name: "mathInline",
      level: "inline",
      start: (/** @type {string} */ src) => src.match(/\$|\\[([]/)?.index,
      tokenizer(/** @type {string} */ src) {
        const match = INLINE_MATH.exec(src);
        if (!match) return undefined;
        const display = match[1] !== undefined || match[2] !== undefined;
        return { type: "mathInline", raw: match[0], text: match[1] ?? match[2] ?? match[3] ?? match[4], display };
      },
      renderer: (/** @type {{raw: string, text: string, display: boolean}} */ token) =>
        renderMath(token.text, token.display, token.raw),
    },
  ],
});

/** @param {string} text */
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const LINK_PROTOCOLS = ["http:", "https:", "mailto:"];
const IMAGE_PROTOCOLS = ["http:", "https:"];

/**
 * @param {string} url
 * @param {string[]} protocols
 */
function hasProtocol(url, protocols) {
  try {
    return protocols.includes(new URL(url, window.location.href).protocol);
  } catch {
    return false;
  }
}

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href");
    if (href === null || !hasProtocol(href, LINK_PROTOCOLS)) {
      node.removeAttribute("href");
    } else {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  }
  if (node.tagName === "IMG") {
    const src = node.getAttribute("src") || "";
    node.removeAttribute("src");
    node.removeAttribute("srcset");
    if (hasProtocol(src, IMAGE_PROTOCOLS)) node.setAttribute("data-remote-src", src);
  }
});

const SANITIZE = {
  USE_PROFILES: { html: true, mathMl: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "frame", "object", "embed",
    "video", "audio", "source", "picture", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "background", "poster"],
  RETURN_DOM_FRAGMENT: true,
};

/**
 * @param {string} markdown untrusted text
 * @returns {DocumentFragment} safe nodes to show
 */
export function renderMarkdown(markdown) {
  const html = /** @type {string} */ (marked.parse(markdown, { async: false, gfm: true, breaks: true }));
  const fragment = /** @type {DocumentFragment} */ (/** @type {unknown} */ (DOMPurify.sanitize(html, SANITIZE)));
  for (const image of fragment.querySelectorAll("img")) image.replaceWith(imagePlaceholder(image));
  for (const code of fragment.querySelectorAll("pre > code")) decorateCode(/** @type {HTMLElement} */ (code));
  return fragment;
}

/** @param {HTMLImageElement} image */
function imagePlaceholder(image) {
  const src = image.getAttribute("data-remote-src");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "image-placeholder";
  const label = image.getAttribute("alt") || "image";
  if (!src) {
    button.disabled = true;
    button.textContent = `[image: ${label}] (blocked)`;
    return button;
  }
  button.textContent = `[image: ${label}] — click to open ${new URL(src, window.location.href).host}`;
  button.title = src;
  button.addEventListener("click", () => window.open(src, "_blank", "noopener,noreferrer"));
  return button;
}

/** @param {HTMLElement} code */
function decorateCode(code) {
  try {
    hljs.highlightElement(code);
  } catch (error) {
    console.warn("syntax highlighting failed", error);
  }
  const pre = /** @type {HTMLElement} */ (code.parentElement);
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => {
    navigator.clipboard.writeText(code.textContent || "").then(
      () => { copy.textContent = "Copied"; },
      (error) => console.warn("copy failed", error),
    );
  });
  pre.prepend(copy);
}
