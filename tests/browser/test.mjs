// The browser test: the tiny fixture converted to shards, served from 127.0.0.1, loaded in headless
// Chromium (SwiftShader WebGPU) through the package's worker API and through the chat demo; the
// browser's greedy tokens must equal the native engine's, token for token.
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = fileURLToPath(new URL("../..", import.meta.url)).replace(/\/$/, "");
const out = join(root, "target/browser-test");
const cli = join(root, "target/release/llama-webgpu");
const PROMPT = "Hello";
const MAX_TOKENS = 8;

function log(...args) {
  console.log(`[${(performance.now() / 1000).toFixed(1)}s]`, ...args);
}

// The Llama 3 tokenizer cut to the fixture's 1003 ids, as tests/common/mod.rs cuts it.
function truncatedTokenizer(vocab) {
  const json = JSON.parse(readFileSync(join(root, "target/models/llama3-tokenizer/tokenizer.json"), "utf8"));
  const kept = Object.fromEntries(Object.entries(json.model.vocab).filter(([, id]) => id < vocab));
  const has = (token) => Object.hasOwn(kept, token);
  const parts = (m) => (typeof m === "string" ? m.split(" ", 2) : m);
  json.model.vocab = kept;
  json.model.merges = json.model.merges.filter((m) => {
    const [a, b] = parts(m);
    return has(a) && has(b) && has(a + b);
  });
  json.added_tokens = [];
  json.post_processor = null;
  return JSON.stringify(json);
}

function prepareFixture() {
  const source = join(out, "tiny-llama31-src");
  const shards = join(out, "tiny-llama31");
  rmSync(out, { recursive: true, force: true });
  mkdirSync(source, { recursive: true });
  const fixture = join(root, "tests/fixtures/tiny-llama31");
  for (const name of readdirSync(fixture)) {
    if (/\.(json|safetensors)$/.test(name) && name !== "golden.json") cpSync(join(fixture, name), join(source, name));
  }
  writeFileSync(join(source, "tokenizer.json"), truncatedTokenizer(1003));
  // Small shards, so the page streams several of them.
  execFileSync(cli, ["-q", "convert", source, "--quant", "q4_0", "--shard-size", "64KiB", "-o", shards], { stdio: "inherit" });
  return shards;
}

function nativeChat(shards) {
  const args = ["-q", "run", "--model", shards, "--prompt", PROMPT, "--chat", "--temperature", "0", "-n", String(MAX_TOKENS), "--json"];
  return JSON.parse(execFileSync(cli, args, { encoding: "utf8" }));
}

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".json": "application/json", ".wasm": "application/wasm" };

// Serves the repository read-only; records the paths asked for.
function serve(requests) {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname));
    requests.push(path);
    const file = join(root, path);
    if (!file.startsWith(root + "/") || !statSync(file, { throwIfNoEntry: false })?.isFile()) {
      res.writeHead(404).end("not found");
      return;
    }
    res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
    createReadStream(file).pipe(res);
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

function assertEqual(actual, expected, what) {
  if (JSON.stringify(actual) !== JSON.stringify(expected)) {
    throw new Error(`${what}: got ${JSON.stringify(actual)}, expected ${JSON.stringify(expected)}`);
  }
  log(`ok: ${what} = ${JSON.stringify(actual)}`);
}

const shards = prepareFixture();
const native = nativeChat(shards);
log("native:", JSON.stringify({ tokens: native.tokens, text: native.text, adapter: native.adapter }));

const requests = [];
const server = await serve(requests);
const origin = `http://127.0.0.1:${server.address().port}`;
const profile = mkdtempSync(join(tmpdir(), "llama-webgpu-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await context.newPage();
  page.on("console", (message) => log(`console.${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => log(`page error: ${error.message}`));
  const model = `/target/browser-test/tiny-llama31/manifest.json`;
  await page.goto(`${origin}/www/index.html?model=${encodeURIComponent(model)}`);

  // 1. The package API in its worker: greedy chat, streamed, token ids and usage.
  const api = await page.evaluate(async ({ model, prompt, maxTokens }) => {
    const { createEngine } = await import("/pkg/index.js");
    const progress = [];
    const engine = await createEngine({ model, onProgress: (p) => progress.push(p.progress) });
    const chunks = [];
    for await (const chunk of engine.chat.completions.create({
      messages: [{ role: "user", content: prompt }], stream: true, temperature: 0, max_tokens: maxTokens,
    })) chunks.push(chunk);
    const again = await engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: maxTokens });
    // Aborted through its signal before the first token.
    const controller = new AbortController();
    const aborted = engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, signal: controller.signal });
    controller.abort();
    const abortError = await aborted.then(() => "none", (e) => e.name);
    const info = engine.info();
    await engine.unload();
    const missing = await createEngine({ model: "/target/browser-test/missing/manifest.json" }).then(() => null, (e) => ({ name: e.name, message: e.message }));
    return {
      tokens: chunks.flatMap((c) => c.choices[0].token_ids),
      text: chunks.map((c) => c.choices[0].delta.content ?? "").join(""),
      usage: chunks.at(-1).usage,
      finish: chunks.at(-1).choices[0].finish_reason,
      again: again.choices[0].token_ids,
      lastProgress: progress.at(-1),
      abortError, info, missing,
    };
  }, { model, prompt: PROMPT, maxTokens: MAX_TOKENS });
  log("browser info:", JSON.stringify(api.info));
  assertEqual(api.tokens, native.tokens, "streamed browser tokens vs native");
  assertEqual(api.text, native.text, "streamed browser text vs native");
  assertEqual(api.again, native.tokens, "second, non-streamed request (KV cache reused)");
  assertEqual(api.usage.completion_tokens, native.tokens.length, "usage.completion_tokens on the last chunk");
  assertEqual(api.lastProgress, 1, "final load progress");
  assertEqual(api.abortError, "AbortError", "aborted request");
  assertEqual(api.missing?.name, "LoadError", "missing model");
  if (!api.missing.message.includes("missing/manifest.json")) throw new Error(`the load error does not name the file: ${api.missing.message}`);
  if (!api.info.adapter || api.info.features.includes("SHADER_F16")) throw new Error(`unexpected adapter info ${JSON.stringify(api.info)}`);

  // 2. The demo page: load (shards now come from the Cache API), chat greedily, screenshot.
  const shardsBefore = requests.filter((p) => p.endsWith(".bin")).length;
  await page.click("#load");
  await page.waitForSelector("#prompt:not([disabled])", { timeout: 120_000 });
  assertEqual(requests.filter((p) => p.endsWith(".bin")).length, shardsBefore, "shard requests after the reload (unchanged: served from the Cache API)");
  await page.click("details summary");
  await page.fill("#temperature", "0");
  await page.fill("#max-tokens", String(MAX_TOKENS));
  await page.fill("#prompt", PROMPT);
  await page.click("#send");
  await page.waitForSelector("#stop[disabled]", { state: "attached", timeout: 120_000 });
  await page.waitForFunction(() => document.querySelector("#send") && !document.querySelector("#send").disabled);
  const reply = await page.textContent(".message.assistant");
  assertEqual(reply, native.text, "demo reply vs native text");
  for (const id of ["model", "load", "progress", "prompt", "send", "stop", "stats"]) {
    if (!(await page.isVisible(`#${id}`))) throw new Error(`#${id} is not visible in the demo`);
  }
  if (await page.isVisible("#error")) throw new Error(`the demo shows an error: ${await page.textContent("#error")}`);
  const screenshot = join(out, "demo.png");
  await page.screenshot({ path: screenshot, fullPage: true });
  log(`screenshot: ${screenshot}`);
  log("browser test passed");
} finally {
  await context.close();
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
