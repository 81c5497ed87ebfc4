// The chat demo in headless Chromium: it explains a browser without WebGPU; a load of the fixture
// after "Clear cached weights" reports its stages with sizes, rate and time left; a greedy reply
// streams into the page as the native engine's text rendered; Markdown (a list, a code block, a
// table) renders as HTML, and a reply with HTML in it runs nothing and shows that HTML as text;
// stop, regenerate and edit-and-resend; a conversation with its settings survives a reload, and is
// renamed and deleted. Screenshots at desktop and phone sizes, light and dark, go to `out`.
import { join } from "node:path";
import { assert, assertEqual, log } from "./check.mjs";

const MARKDOWN = `Steps:

1. Load a model
2. Chat

- fast
- private

\`\`\`js
console.log("hi");
\`\`\`

| Model | Size |
| --- | --- |
| SmolLM2 | 98 MB |`;

// Each of these would set window.pwned if the page ran it.
const HOSTILE = `Hi <img src=x onerror="window.pwned = 'img'"> there

<script>window.pwned = 'script'</script>

[click](javascript:window.pwned='link') <svg onload="window.pwned = 'svg'"></svg>`;

/** The demo page's HTML for `content` as a finished assistant message, as the page renders it. */
const renderInPage = (page, content) => page.evaluate(async (content) => {
  const { messageElement } = await import("/www/messages.js");
  return messageElement({ role: "assistant", content }).querySelector(".content").innerHTML;
}, content);

/** Appends `content` as an assistant message through the demo's own renderer; returns its locator. */
async function showInPage(page, content) {
  await page.evaluate(async (content) => {
    const { messageElement } = await import("/www/messages.js");
    document.getElementById("messages").append(messageElement({ role: "assistant", content }));
  }, content);
  return page.locator(".message.assistant").last();
}

/** Waits for `condition` in the page; a timeout says what the page shows. */
async function waitFor(page, condition, arg) {
  try {
    await page.waitForFunction(condition, arg, { timeout: 120_000 });
  } catch (error) {
    const shown = await page.evaluate(() => ["#error", "#stats", "#progress-text", "#messages"].map((s) => document.querySelector(s).textContent.trim()));
    throw new Error(`${error.message}; the page shows ${JSON.stringify(shown)}`);
  }
}

/** Sends `text` with the Enter key and waits for the reply to finish; returns its message element. */
async function sendAndWait(page, text) {
  await page.fill("#prompt", text);
  await page.press("#prompt", "Enter");
  return waitForReply(page);
}

async function waitForReply(page) {
  await waitFor(page, () => !document.querySelector(".message.assistant[aria-busy]"));
  return page.locator(".message.assistant").last();
}

/**
 * `model`: the fixture's URL; `expected`: the native engine's greedy reply to `prompt` in at most
 * `maxTokens` tokens.
 */
export async function demoChecks({ context, origin, model, prompt, expected, maxTokens, out }) {
  const url = `${origin}/www/index.html?model=${encodeURIComponent(model)}`;

  // Without WebGPU the page says so, and what to try, before anything is clicked.
  const bare = await context.newPage();
  await bare.addInitScript(() => Object.defineProperty(Navigator.prototype, "gpu", { get: () => undefined }));
  await bare.goto(url);
  await bare.waitForSelector("#error:not([hidden])");
  const problem = await bare.textContent("#error");
  assert(problem.includes("no WebGPU") && problem.includes("Chrome"), `the demo explains a browser without WebGPU: ${problem}`);
  assert(await bare.isDisabled("#load"), "no Load button without WebGPU");
  await bare.close();

  const page = await context.newPage();
  page.on("console", (message) => log(`demo console.${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => log(`demo page error: ${error.message}`));
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin });
  await page.goto(url);
  await page.waitForSelector("#model-fit li");
  log("fit check:", JSON.stringify(await page.locator("#model-fit li").allTextContents()));

  // The package's catalog in the picker, with sizes: picking a model puts its hf: reference in the
  // URL field and shows its fit check; then the fixture again.
  const choices = await page.locator("#model-choice option").allTextContents();
  for (const name of ["Llama 3.2 1B Instruct", "Llama 3.2 3B Instruct", "Llama 3.1 8B Instruct"]) {
    assert(choices.some((c) => c.startsWith(name) && / \(\d+(\.\d+)? [MG]B\)$/.test(c)), `${name} in the picker with its size`);
  }
  const fixtureUrl = await page.inputValue("#model");
  await page.selectOption("#model-choice", String(choices.findIndex((c) => c.startsWith("Llama 3.2 1B Instruct Q4_K_M"))));
  await page.waitForFunction(() => [...document.querySelectorAll("#model-fit li")].some((li) => li.textContent.includes("of GPU memory")));
  const pickedUrl = await page.inputValue("#model");
  const pickedFit = await page.locator("#model-fit li").allTextContents();
  assertEqual(pickedUrl, "hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf", "the picked catalog model's reference");
  assert(pickedFit.some((n) => n.startsWith("807.7 MB · Q4_K_M · context 131,072")) && pickedFit.some((n) => /needs about 1\.\d+ GB of GPU memory/.test(n)),
    `the catalog model's fit check: ${JSON.stringify(pickedFit)}`);
  await page.fill("#model", fixtureUrl);
  await page.dispatchEvent("#model", "change");

  // "Clear cached weights" deletes the fixture's (stored by the checks before) and no other model's.
  const other = `${origin}/elsewhere/model.gguf?llama-webgpu-bytes=0-4/4`;
  await page.evaluate(async (other) => (await caches.open("llama-webgpu-shards")).put(other, new Response("GGUF")), other);
  await page.click("#clear-cache");
  await page.waitForFunction(() => document.getElementById("progress-text").textContent.startsWith("Cleared the cached weights"));
  const kept = await page.evaluate(async () => (await (await caches.open("llama-webgpu-shards")).keys()).map((r) => new URL(r.url).pathname));
  assert(kept.includes("/elsewhere/model.gguf") && !kept.some((path) => path.startsWith(model.slice(0, model.lastIndexOf("/") + 1))),
    `the cache after clearing the fixture's weights: ${JSON.stringify(kept)}`);

  // The load after: every report of the progress text.
  await page.evaluate(() => {
    window.progressTexts = [];
    new MutationObserver(() => window.progressTexts.push(document.getElementById("progress-text").textContent))
      .observe(document.getElementById("progress-text"), { childList: true, characterData: true, subtree: true });
  });
  await page.click("#load");
  await page.waitForSelector("#prompt:not([disabled])", { timeout: 120_000 });
  const texts = await page.evaluate(() => window.progressTexts);
  log("progress texts:", JSON.stringify(texts));
  assert(texts.some((t) => t.startsWith("Checking the GPU (self-test)")), "the self-test stage is shown");
  const sized = /^Downloading: [\d.]+ kB \/ [\d.]+ kB · [\d.]+ MB\/s · (under 1 s|\d+ s|\d+ min \d+ s) left$/;
  assert(texts.some((t) => sized.test(t)), "download progress shows bytes done / total, MB/s and time left");
  assert(texts.at(-1).startsWith("Loaded in "), `the last progress text: ${texts.at(-1)}`);
  const adapter = await page.textContent("#adapter");
  assert(/f16 (yes|no) · subgroups (yes|no)/.test(adapter), `the adapter and its features: ${adapter}`);

  // A greedy reply, streamed: the native engine's text as the renderer shows it, with its figures.
  await page.click("#settings-panel summary");
  await page.fill("#temperature", "0");
  await page.fill("#max-tokens", String(maxTokens));
  let reply = await sendAndWait(page, prompt);
  assertEqual(await reply.locator(".content").innerHTML(), await renderInPage(page, expected), "the streamed reply vs the native text, rendered");
  const figures = await page.textContent("#stats");
  assert(/prefill [\d.]+ tok\/s .* decode [\d.]+ tok\/s · \d+ \/ 512 tokens in context/.test(figures), `figures after the reply: ${figures}`);

  // Regenerate (greedy: the same reply), then edit the question and send it again.
  await reply.getByRole("button", { name: "Regenerate" }).click();
  reply = await waitForReply(page);
  assertEqual([await page.locator(".message").count(), await reply.locator(".content").innerHTML()], [2, await renderInPage(page, expected)], "messages and reply after Regenerate");
  await page.locator(".message.user").getByRole("button", { name: "Edit" }).click();
  await page.fill(".message.user textarea", "Hi");
  await page.locator(".message.user").getByRole("button", { name: "Send" }).click();
  const edited = await (await waitForReply(page)).locator(".content").innerHTML();
  assertEqual(await page.locator(".message.user .content").allTextContents(), ["Hi"], "the edited question replaced the old one");

  // Esc stops a long reply once tokens come (sampled with a seed: greedy, the fixture ends at once).
  await page.fill("#temperature", "1");
  await page.fill("#seed", "1");
  await page.fill("#max-tokens", "200");
  await page.fill("#prompt", "Tell me more");
  await page.press("#prompt", "Enter");
  await waitFor(page, () => document.querySelector("[aria-busy]") && /· [2-9] tokens$/.test(document.getElementById("stats").textContent));
  await page.keyboard.press("Escape");
  reply = await waitForReply(page);
  const stopped = await reply.locator(".figures").textContent();
  assert(/^stopped · \d+ tokens/.test(stopped) && Number(/(\d+) tokens/.exec(stopped)[1]) < 200, `Esc stopped the reply: ${stopped}`);
  // Markdown renders as HTML through the demo's renderer, code blocks with a copy button.
  const rendered = await showInPage(page, MARKDOWN);
  const html = await rendered.evaluate((element) => ({
    ordered: element.querySelectorAll("ol > li").length,
    bullets: element.querySelectorAll("ul > li").length,
    code: element.querySelector("pre code")?.textContent,
    cells: [...element.querySelectorAll("table th, table td")].map((cell) => cell.textContent),
  }));
  assertEqual(html, { ordered: 2, bullets: 2, code: 'console.log("hi");\n', cells: ["Model", "Size", "SmolLM2", "98 MB"] }, "Markdown rendered as HTML");
  await rendered.getByRole("button", { name: "Copy the code" }).click();
  assertEqual(await page.evaluate(() => navigator.clipboard.readText()), 'console.log("hi");\n', "the copy button copies the code");

  // HTML in a reply runs nothing and shows as the text it is.
  const hostile = await showInPage(page, HOSTILE);
  await page.waitForTimeout(300);
  const safety = await hostile.evaluate((element) => ({
    pwned: window.pwned ?? null,
    elements: element.querySelectorAll("img, script, svg, [onerror], [onload], a[href^='javascript']").length,
    text: element.textContent,
  }));
  log("hostile reply as shown:", JSON.stringify(safety.text));
  assertEqual([safety.pwned, safety.elements], [null, 0], "a reply with <img onerror>, <script>, <svg onload> and a javascript: link ran nothing");
  assert(safety.text.includes(`<img src=x onerror="window.pwned = 'img'">`) && safety.text.includes("<script>window.pwned = 'script'</script>"),
    "the reply's HTML shows as text");

  await page.click("#settings-panel summary");
  for (const [name, viewport] of [["desktop", { width: 1280, height: 800 }], ["phone", { width: 390, height: 844 }]]) {
    for (const colorScheme of ["light", "dark"]) {
      await page.setViewportSize(viewport);
      await page.emulateMedia({ colorScheme });
      const path = join(out, `demo-${name}-${colorScheme}.png`);
      await page.screenshot({ path });
      log(`screenshot: ${path}`);
    }
  }
  await page.emulateMedia({ colorScheme: null });
  await page.setViewportSize({ width: 1280, height: 800 });

  // A reload shows the conversation and its settings again (the Markdown checks were page-only).
  await page.reload();
  await page.waitForSelector(".message.assistant");
  const restored = await page.evaluate(() => ({
    titles: [...document.querySelectorAll("#conversation-list .open")].map((b) => b.textContent),
    messages: [...document.querySelectorAll(".message")].map((m) => m.classList[1]),
    temperature: document.getElementById("temperature").value,
    maxTokens: document.getElementById("max-tokens").value,
    seed: document.getElementById("seed").value,
  }));
  assertEqual(restored, { titles: [prompt], messages: ["user", "assistant", "user", "assistant"], temperature: "1", maxTokens: "200", seed: "1" },
    "the conversation and its settings after a reload");
  assertEqual(await page.locator(".message.assistant .content").first().innerHTML(), edited, "the reply to the edited question after a reload");

  // Rename, then delete.
  await page.getByRole("button", { name: `Rename “${prompt}”` }).click();
  await page.fill("#conversation-list input", "Greetings");
  await page.press("#conversation-list input", "Enter");
  await page.waitForSelector("#conversation-list .open:text('Greetings')");
  page.once("dialog", (dialog) => dialog.accept());
  await page.getByRole("button", { name: "Delete “Greetings”" }).click();
  await page.waitForFunction(() => !document.querySelector("#conversation-list li") && !document.querySelector(".message"));
  await page.reload();
  await page.waitForSelector("#model-fit li");
  assertEqual(await page.locator("#conversation-list li").count(), 0, "conversations after rename, delete and a reload");
  await page.close();
}
