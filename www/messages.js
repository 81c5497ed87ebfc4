// A message as the page shows it: the user's as plain text, the model's as rendered Markdown, with
// a line of figures under a reply and the buttons the message offers.
import { renderMarkdown } from "./markdown.js";
import { formatRate } from "./format.js";

/**
 * A reply's figures in words. `figures`: {tokens, prefillTokens?, prefillSeconds?, decodeSeconds,
 * contextTokens?, contextLength?}; the fields after a stop are only those the page measured.
 */
export function figuresText({ tokens, prefillTokens, prefillSeconds, decodeSeconds, contextTokens, contextLength }) {
  const parts = [`${tokens} tokens`];
  if (prefillTokens && prefillSeconds > 0) parts.push(`prefill ${formatRate(prefillTokens / prefillSeconds, "tok")} (${prefillTokens} tokens)`);
  if (tokens > 1 && decodeSeconds > 0) parts.push(`decode ${formatRate((tokens - 1) / decodeSeconds, "tok")}`);
  if (contextTokens) parts.push(`${contextTokens.toLocaleString("en")} / ${contextLength.toLocaleString("en")} tokens in context`);
  return parts.join(" · ");
}

/** A button that runs `action`; `ariaLabel` where the label alone does not say what it acts on. */
export function actionButton(label, action, { className = "", ariaLabel } = {}) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = label;
  if (ariaLabel) button.setAttribute("aria-label", ariaLabel);
  button.addEventListener("click", action);
  return button;
}

/**
 * A reasoning model's thought, folded under a summary: open while it is being written (`thinking`)
 * until `foldThought`, when the answer begins.
 */
export function thoughtElement(text, thinking = false) {
  const details = document.createElement("details");
  details.className = "thought";
  const summary = document.createElement("summary");
  const body = document.createElement("div");
  body.className = "thought-text";
  body.textContent = text;
  details.append(summary, body);
  if (thinking) {
    details.open = true;
    summary.textContent = "Thinking…";
  } else {
    foldThought(details);
  }
  return details;
}

/** Folds a thought whose answer has begun. */
export function foldThought(details) {
  details.open = false;
  details.querySelector("summary").textContent = "Thought";
}

/**
 * The element of `message` ({role, content, reasoning?, stopped?, figures?}); `actions` maps button
 * labels to what they do (e.g. {Edit: () => ...}).
 */
export function messageElement(message, actions = {}) {
  const article = document.createElement("article");
  article.className = `message ${message.role}`;
  article.setAttribute("aria-label", message.role === "user" ? "You said" : "The model said");
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") renderMarkdown(content, message.content);
  else content.textContent = message.content;
  const meta = document.createElement("div");
  meta.className = "meta";
  const notes = [message.stopped && "stopped", message.figures && figuresText(message.figures)].filter(Boolean);
  if (notes.length) {
    const figures = document.createElement("span");
    figures.className = "figures";
    figures.textContent = notes.join(" · ");
    meta.append(figures);
  }
  for (const [label, action] of Object.entries(actions)) meta.append(actionButton(label, action));
  if (message.reasoning) article.append(thoughtElement(message.reasoning));
  article.append(content, meta);
  return article;
}
