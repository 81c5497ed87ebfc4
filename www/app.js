// The chat demo: picks and loads a model through the llama-webgpu package, streams replies into
// rendered Markdown, and keeps conversations in IndexedDB.
import { AbortError, clearModelCache, createEngine } from "../pkg/index.js";
import { DEFAULT_SETTINGS, deleteConversation, listConversations, newConversation, saveConversation } from "./conversations.js";
import { formatBytes, formatRate, formatSeconds } from "./format.js";
import { streamingRenderer } from "./markdown.js";
import { actionButton, figuresText, foldThought, messageElement, thoughtElement } from "./messages.js";
import { checkFit, describeAdapter, describeUrl, pickerModels } from "./models.js";
import { explain, NO_WEBGPU } from "./problems.js";

const $ = (id) => document.getElementById(id);

let engine = null;
/** The stop control of the reply being generated, or null. */
let generation = null;
let conversation = newConversation();
let conversations = [];
let models = [];

// Problems.

function showProblem({ title, detail, hint }) {
  $("error-title").textContent = title;
  $("error-detail").textContent = detail;
  $("error-hint").textContent = hint;
  $("error").hidden = false;
}

const hideProblem = () => ($("error").hidden = true);

// Conversations: the sidebar and the messages.

const titleOf = (text) => (text.length > 40 ? `${text.slice(0, 40).trimEnd()}…` : text);

async function save(c = conversation) {
  await saveConversation(c);
  conversations = await listConversations();
  renderSidebar();
}

function renderSidebar() {
  const list = $("conversation-list");
  list.replaceChildren(...conversations.map((c) => {
    const item = document.createElement("li");
    const open = actionButton(c.title, () => openConversation(c), { className: "open" });
    if (c.id === conversation.id) open.setAttribute("aria-current", "true");
    const rename = actionButton("✎", () => startRenaming(item, c), { className: "rename", ariaLabel: `Rename “${c.title}”` });
    const remove = actionButton("✕", () => removeConversation(c), { className: "delete", ariaLabel: `Delete “${c.title}”` });
    item.append(open, rename, remove);
    return item;
  }));
}

function startRenaming(item, c) {
  const input = document.createElement("input");
  input.value = c.title;
  input.setAttribute("aria-label", "Conversation name");
  let done = false;
  const finish = async (keep) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (!keep || !title) return renderSidebar();
    // The open conversation's own record: the listed copy may lack a reply still streaming.
    const renamed = c.id === conversation.id ? conversation : c;
    renamed.title = title;
    await save(renamed);
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.select();
}

async function removeConversation(c) {
  if (!confirm(`Delete “${c.title}”?`)) return;
  await deleteConversation(c.id);
  conversations = await listConversations();
  if (c.id === conversation.id) openConversation(conversations[0] ?? newConversation());
  else renderSidebar();
}

function openConversation(c) {
  generation?.abort();
  conversation = c;
  hideProblem();
  const settings = { ...DEFAULT_SETTINGS, ...c.settings };
  $("system").value = c.system;
  $("temperature").value = settings.temperature;
  $("top-p").value = settings.top_p;
  $("max-tokens").value = settings.max_tokens;
  $("seed").value = settings.seed ?? "";
  renderMessages();
  renderSidebar();
  document.body.classList.remove("sidebar-open");
  $("sidebar-toggle").setAttribute("aria-expanded", "false");
}

/** Every message of the conversation, the last one with its actions. */
function renderMessages() {
  const messages = conversation.messages;
  $("messages").replaceChildren(...messages.map((message, index) => {
    const actions = {};
    if (message.role === "user") actions.Edit = (event) => startEditing(event.target.closest(".message"), index);
    if (index === messages.length - 1) actions[message.role === "user" ? "Send again" : "Regenerate"] = regenerate;
    return messageElement(message, actions);
  }));
  updateControls();
  $("messages").lastElementChild?.scrollIntoView({ block: "end" });
}

function startEditing(article, index) {
  if (generation) return;
  const editor = document.createElement("textarea");
  editor.value = conversation.messages[index].content;
  editor.rows = Math.min(12, editor.value.split("\n").length + 1);
  editor.setAttribute("aria-label", "Edit the message");
  const resend = actionButton("Send", () => {
    const content = editor.value.trim();
    if (!content) return;
    conversation.messages = [...conversation.messages.slice(0, index), { role: "user", content }];
    renderMessages();
    generate();
  });
  const cancel = actionButton("Cancel", renderMessages);
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      resend.click();
    }
  });
  article.replaceChildren(editor, cancel, resend);
  editor.focus();
}

function regenerate() {
  if (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  renderMessages();
  generate();
}

// Generation.

function updateControls() {
  const ready = Boolean(engine) && !generation;
  $("prompt").disabled = !engine;
  $("prompt").placeholder = engine ? "Message (Enter sends, Shift+Enter for a new line, Esc stops)" : "Load a model to chat";
  $("send").disabled = !ready;
  $("stop").disabled = !generation;
  for (const action of document.querySelectorAll(".message .meta button")) action.disabled = !ready;
}

/** A conversation's sampling settings as request fields. */
function samplingOf({ settings }) {
  const { temperature, top_p, max_tokens, seed } = { ...DEFAULT_SETTINGS, ...settings };
  return { temperature, top_p, max_tokens, ...(seed === null ? {} : { seed }) };
}

/**
 * Saves the conversation and streams the model's reply to it into a new message, which is on the
 * page, busy, when this returns its promise.
 */
async function generate() {
  hideProblem();
  // The conversation may be switched away from mid-reply: it keeps what came.
  const owner = conversation;
  const history = owner.messages.map(({ role, content }) => ({ role, content }));
  const messages = owner.system.trim() ? [{ role: "system", content: owner.system }, ...history] : history;
  const article = messageElement({ role: "assistant", content: "" });
  article.setAttribute("aria-busy", "true");
  $("messages").append(article);
  // Follows the reply down unless the reader scrolls up.
  let following = true;
  const follow = () => (following = $("messages").scrollHeight - $("messages").scrollTop - $("messages").clientHeight < 48);
  $("messages").addEventListener("scroll", follow);
  const renderer = streamingRenderer(article.querySelector(".content"));
  const controller = new AbortController();
  generation = controller;
  updateControls();
  const reply = { role: "assistant", content: "" };
  const contextLength = engine.info().model.context_length;
  await save(owner);
  const started = performance.now();
  let first = null;
  let tokens = 0;
  let usage = null;
  let failure = null;
  // A reasoning model's thought, shown as it comes and folded once, when the answer begins.
  let thought = null;
  let answering = false;
  try {
    const stream = engine.chat.completions.create({ messages, stream: true, signal: controller.signal, ...samplingOf(owner) });
    for await (const chunk of stream) {
      const choice = chunk.choices[0];
      if (choice.delta.reasoning) {
        if (!thought) article.querySelector(".content").before((thought = thoughtElement("", true)));
        thought.querySelector(".thought-text").append(choice.delta.reasoning);
      }
      if (choice.delta.content && thought && !answering) foldThought(thought);
      answering ||= Boolean(choice.delta.content);
      renderer.append(choice.delta.content ?? "");
      tokens += choice.token_ids.length;
      first ??= choice.token_ids.length ? performance.now() : null;
      usage = chunk.usage ?? usage;
      if (first && tokens > 1) $("stats").textContent = `decode ${formatRate((tokens - 1) / ((performance.now() - first) / 1000), "tok")} · ${tokens} tokens`;
      if (following) article.scrollIntoView({ block: "end" });
    }
  } catch (error) {
    if (error instanceof AbortError) reply.stopped = true;
    else failure = error;
  }
  reply.content = renderer.finish();
  if (thought) reply.reasoning = thought.querySelector(".thought-text").textContent;
  $("messages").removeEventListener("scroll", follow);
  generation = null;
  const ended = performance.now();
  reply.figures = {
    tokens,
    decodeSeconds: first ? (ended - first) / 1000 : 0,
    ...(usage && {
      prefillTokens: usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens,
      prefillSeconds: ((first ?? ended) - started) / 1000,
      contextTokens: usage.total_tokens,
      contextLength,
    }),
  };
  if (reply.content || !failure) owner.messages.push(reply);
  if (owner === conversation) {
    $("stats").textContent = failure ? "" : figuresText(reply.figures);
    renderMessages();
  }
  updateControls();
  await save(owner);
  if (failure) fail(failure);
}

/** Shows `error`; a GPU that is gone takes the engine with it. */
function fail(error) {
  const problem = explain(error);
  showProblem(problem);
  if (/device (was )?lost|out of memory/i.test(error?.message ?? "")) {
    engine?.unload().catch(() => {});
    engine = null;
    $("progress-text").textContent = "The model is unloaded: load it again.";
    updateControls();
  }
}

$("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("prompt").value.trim();
  if (!engine || generation || !content) return;
  $("prompt").value = "";
  conversation.messages.push({ role: "user", content });
  if (conversation.messages.length === 1) conversation.title = titleOf(content);
  renderMessages();
  generate();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && generation) generation.abort();
});
$("stop").addEventListener("click", () => generation?.abort());
$("new-chat").addEventListener("click", () => {
  openConversation(newConversation());
  $("prompt").focus();
});
$("sidebar-toggle").addEventListener("click", () => {
  const open = document.body.classList.toggle("sidebar-open");
  $("sidebar-toggle").setAttribute("aria-expanded", String(open));
});

// Settings, kept with the conversation (saved once it has a message).

$("settings-panel").addEventListener("input", async () => {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  conversation.system = $("system").value;
  conversation.settings = {
    temperature: number("temperature") ?? DEFAULT_SETTINGS.temperature,
    top_p: number("top-p") ?? DEFAULT_SETTINGS.top_p,
    max_tokens: number("max-tokens") ?? DEFAULT_SETTINGS.max_tokens,
    seed: number("seed"),
  };
  if (conversation.messages.length) await save();
});

// Models: the picker, the fit check, loading with its progress.

const URL_CHOICE = "url";

function selectedModel() {
  const choice = $("model-choice").value;
  return choice === URL_CHOICE ? null : models[Number(choice)];
}

async function showFit() {
  const model = selectedModel() ?? (await describeUrl($("model").value.trim()));
  const { notes, warnings } = await checkFit(model, await adapter);
  const item = (text, className) => Object.assign(document.createElement("li"), { textContent: text, className });
  $("model-fit").replaceChildren(...notes.map((n) => item(n, "note")), ...warnings.map((w) => item(w, "warning")));
}

const STAGES = {
  "self-test": "Checking the GPU (self-test)",
  download: "Downloading",
  cache: "Reading from the cache",
  prepare: "Allocating the KV cache",
};

/** Reports progress as text: the stage, bytes done of the total, the rate and the time left. */
function progressReporter() {
  let from = null;
  return ({ stage, loaded, total, timeElapsed, progress }) => {
    $("progress").value = progress;
    if (stage !== "download" && stage !== "cache") {
      $("progress-text").textContent = `${STAGES[stage] ?? stage}…`;
      return;
    }
    // The rate counts from the first chunk of weights, after the self-test.
    from ??= { loaded, timeElapsed };
    const seconds = timeElapsed - from.timeElapsed;
    const rate = seconds > 0 ? (loaded - from.loaded) / seconds : 0;
    const figures = [`${formatBytes(loaded)} / ${formatBytes(total)}`];
    if (rate > 0) figures.push(formatRate(rate / 1e6, "MB"), `${formatSeconds((total - loaded) / rate)} left`);
    $("progress-text").textContent = `${STAGES[stage]}: ${figures.join(" · ")}`;
  };
}

async function load() {
  hideProblem();
  generation?.abort();
  $("load").disabled = true;
  const model = $("model").value.trim();
  try {
    await engine?.unload();
    engine = null;
    updateControls();
    $("progress").value = 0;
    $("progress-text").textContent = "Opening the model (its header and tokenizer)…";
    const started = performance.now();
    engine = await createEngine({ model, onProgress: progressReporter() });
    const info = engine.info();
    const seconds = (performance.now() - started) / 1000;
    const kept = info.weights === "cache" ? "kept in the browser's cache" : `from the ${info.weights}`;
    $("progress").value = 1;
    $("progress-text").textContent = `Loaded in ${formatSeconds(seconds)}: ${info.model.layers} layers, `
      + `context ${info.model.context_length.toLocaleString("en")} tokens, KV cache ${info.kv_type}; weights ${kept}.`;
    const has = (feature) => (info.features.includes(feature) ? "yes" : "no");
    $("adapter").textContent = `${info.adapter.name || info.adapter.backend} · the engine uses f16 ${has("SHADER_F16")} · subgroups ${has("SUBGROUP")}`;
    $("model-panel").open = false;
    updateControls();
    $("prompt").focus();
  } catch (error) {
    $("progress-text").textContent = "";
    fail(error);
  } finally {
    $("load").disabled = !navigator.gpu;
  }
}

$("load-form").addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
$("model-choice").addEventListener("change", () => {
  const model = selectedModel();
  if (model) $("model").value = model.model;
  else $("model").focus();
  showFit();
});
$("model").addEventListener("change", () => {
  const index = models.findIndex((m) => m.model === $("model").value.trim());
  $("model-choice").value = index >= 0 ? String(index) : URL_CHOICE;
  showFit();
});
$("clear-cache").addEventListener("click", async () => {
  const model = $("model").value.trim();
  const cleared = await clearModelCache(model);
  $("progress-text").textContent = cleared ? `Cleared the cached weights of ${model}.` : `No cached weights of ${model}.`;
  showFit();
});

// Start: the models, the last conversation, and whether this browser can run anything at all.

const adapter = describeAdapter();
models = await pickerModels();
$("model-choice").replaceChildren(
  ...models.map((m, i) => new Option(`${m.name}${m.size ? ` (${formatBytes(m.size)})` : ""}`, String(i))),
  new Option("Another model: the URL below", URL_CHOICE),
);
$("model").value = new URLSearchParams(location.search).get("model") ?? models[0].model;
$("model").dispatchEvent(new Event("change"));
conversations = await listConversations();
openConversation(conversations[0] ?? conversation);
if (!navigator.gpu) {
  showProblem(NO_WEBGPU);
  $("load").disabled = true;
}
