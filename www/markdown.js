// A model's reply as HTML: Markdown parsed by marked, then sanitised by DOMPurify. The reply is
// untrusted text, so HTML inside it is shown as the text it is, and an image becomes a link to it
// (a page that loads what the model names could leak the conversation through the URL).
import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const marked = new Marked({
  gfm: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

// Defence in depth behind the renderer: no script, no styles, nothing that loads or submits.
const SANITISE = {
  FORBID_TAGS: ["style", "img", "video", "audio", "picture", "source", "form", "button", "textarea", "select"],
  FORBID_ATTR: ["style"],
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Renders `markdown` into `element`, each code block with a copy button. */
export function renderMarkdown(element, markdown) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(markdown), SANITISE);
  for (const pre of element.querySelectorAll("pre")) {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy the code");
    copy.addEventListener("click", () => copyText(pre.querySelector("code")?.textContent ?? pre.textContent, copy));
    const block = document.createElement("div");
    block.className = "code-block";
    pre.replaceWith(block);
    block.append(copy, pre);
  }
}

/** Copies `text`, saying so on `button` for a moment. */
async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

/**
 * Renders a reply as it grows: the whole Markdown again once per animation frame at most, so a
 * fast stream costs one parse per frame and a half-written table or code fence settles as it ends.
 */
export function streamingRenderer(element) {
  let text = "";
  let frame = 0;
  const render = () => {
    frame = 0;
    renderMarkdown(element, text);
  };
  return {
    append(delta) {
      text += delta;
      frame ||= requestAnimationFrame(render);
    },
    /** Renders what came, now (a hidden tab runs no animation frames). */
    finish() {
      cancelAnimationFrame(frame);
      render();
      return text;
    },
  };
}
