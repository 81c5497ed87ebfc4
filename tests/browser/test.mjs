// The browser test: the tiny fixture converted to shards and SmolLM2's GGUF file, served from
// 127.0.0.1, loaded in headless Chromium (SwiftShader WebGPU) through the package's worker API and
// through the chat demo (demo.mjs). The browser's greedy tokens must equal the native engine's, token for token;
// two concurrent streams must each equal the same request alone, and aborting one leaves the other
// running; n = 2 choices stream under their indexes; a JSON schema, a required tool call, logprobs,
// a raw text completion (equal to the native one) and responses of the Responses API (streamed,
// continued by id) come back in OpenAI's shapes, and unknown
// fields are refused naming them; a page calls `serve` on another origin through CORS; weights come
// from the Cache API on reload and after an interrupted load; the wasm heap stays under a stated
// bound while loading; an hf: reference resolves on a local Hub, and the catalog's fit check.
import { execFileSync, spawn } from "node:child_process";
import { cpSync, createReadStream, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { prepareTinyShards } from "../../scripts/fixture.mjs";
import { serve } from "../../scripts/static-server.mjs";
import { assert, assertEqual, log } from "./check.mjs";
import { demoChecks } from "./demo.mjs";

const root = fileURLToPath(new URL("../..", import.meta.url)).replace(/\/$/, "");
const out = join(root, "target/browser-test");
const cli = join(root, "target/release/llama-webgpu");
const PROMPT = "Hello";
const MAX_TOKENS = 8;
const SMOLLM2 = "/target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
// SwiftShader makes a SmolLM2 token in seconds: a few are enough to compare.
const SMOLLM2_TOKENS = 3;
// Wasm memory after loading SmolLM2 (98 MB of weights, 49k-token vocabulary): about 40 MB for the
// GGUF header and building the tokenizer, then one 8 MiB read chunk and the mapped staging chunk
// while the weights stream through. Measured: 49.3 MiB.
const SMOLLM2_WASM_BOUND = 64 << 20;
// The fixture's shards: 8 MiB read chunk, staging chunk, tokenizer and engine.
const TINY_WASM_BOUND = 48 << 20;
// Bytes of a KV page of the fixture: keys and values of 3 layers, 16 positions of 2 heads of 16, f32.
const TINY_KV_PAGE_BYTES = 2 * 3 * 16 * 2 * 16 * 4;

function prepareFixture() {
  rmSync(out, { recursive: true, force: true });
  const shards = prepareTinyShards(root, cli, out);
  // The same model's f32 matrices, for a load that re-encodes them into q4_0 (`quant`).
  execFileSync(cli, ["-q", "convert", join(out, "tiny-llama31-src"), "--quant", "f32", "-o", join(out, "tiny-llama31-f32")], { stdio: "inherit" });
  return shards;
}

/**
 * The native engine's greedy reply to PROMPT as a chat message, or as a raw text completion, with
 * an f32 KV cache by default: SwiftShader has no shader-f16, so the browser's is f32 too.
 */
function nativeRun(model, maxTokens, { chat = true, kvType = "f32", q8Activations = false } = {}) {
  const args = ["-q", "--kv-type", kvType, ...(q8Activations ? ["--q8-activations"] : []), "run", "--model", model, "--prompt", PROMPT, ...(chat ? ["--chat"] : []), "--temperature", "0", "-n", String(maxTokens), "--json"];
  return JSON.parse(execFileSync(cli, args, { encoding: "utf8" }));
}

/** `llama-webgpu serve` of `model` on a free port, letting pages of `origin` call it. */
async function startServe(model, origin) {
  const child = spawn(cli, ["serve", "--model", model, "--port", "0", "--cors-origin", origin], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  const url = await new Promise((resolve, reject) => {
    child.stderr.on("data", (data) => {
      stderr += data;
      // The whole line: stderr can arrive cut anywhere, the address too.
      const found = /serving .* on (http:\/\/\S+)\n/.exec(stderr);
      if (found) resolve(found[1]);
    });
    child.on("exit", (code) => reject(new Error(`serve exited with ${code}: ${stderr}`)));
  });
  return { url, stop: () => child.kill() };
}

const shards = prepareFixture();
const native = nativeRun(shards, MAX_TOKENS);
log("native:", JSON.stringify({ tokens: native.tokens, text: native.text, adapter: native.adapter }));
const nativeText = nativeRun(shards, MAX_TOKENS, { chat: false });
const nativeQ8 = nativeRun(shards, MAX_TOKENS, { kvType: "q8_0" });
const nativeQ8Inputs = nativeRun(shards, MAX_TOKENS, { q8Activations: true });
log("native text completion:", JSON.stringify({ tokens: nativeText.tokens, text: nativeText.text }));
// SmolLM2's chat template adds a system prompt of 30 tokens, whose prefill takes SwiftShader about
// 40 s: one load runs a chat turn, the others a raw prompt of one token.
const nativeSmol = nativeRun(join(root, SMOLLM2), SMOLLM2_TOKENS, { chat: false });
const nativeSmolChat = nativeRun(join(root, SMOLLM2), SMOLLM2_TOKENS);
log("native SmolLM2:", JSON.stringify({ tokens: nativeSmol.tokens, text: nativeSmol.text, chat: nativeSmolChat.text }));

// Every request the pages make, shards whose download is cut off halfway (an interrupted load), and
// under /no-range/ the repository again from a server that ignores Range requests.
const requests = [];
const interrupted = new Set();
const NO_RANGE = "/no-range";
// A Hub under /hub: a repository listing SmolLM2's GGUF, whose resolve URL redirects to the file.
const HUB = "/hub";
const HUB_REPO = "test/smollm2-GGUF";
// A repository of a model folder (config, safetensors), as Meta's own are: the browser reads GGUF only.
const HUB_FOLDER_REPO = "test/tiny-llama31";
const SMOLLM2_FILE = SMOLLM2.split("/").at(-1);
const HUB_ETAG = "smollm2-v1";
const server = await serve({
  root,
  onRequest(req, res, path) {
    requests.push({ path, range: req.headers.range ?? null });
    if (path === `${HUB}/api/models/${HUB_REPO}/revision/main`) {
      const siblings = [{ rfilename: "README.md" }, { rfilename: SMOLLM2_FILE }];
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ sha: "0".repeat(40), siblings }));
      return true;
    }
    if (path === `${HUB}/api/models/${HUB_FOLDER_REPO}/revision/main`) {
      const siblings = ["config.json", "model.safetensors", "original/consolidated.00.pth"].map((rfilename) => ({ rfilename }));
      res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ sha: "1".repeat(40), siblings }));
      return true;
    }
    if (path === `${HUB}/${HUB_REPO}/resolve/main/${SMOLLM2_FILE}`) {
      res.writeHead(302, { location: `${HUB}/files/${SMOLLM2_FILE}` }).end();
      return true;
    }
    if (path === `${HUB}/files/${SMOLLM2_FILE}`) {
      // The file host: Range requests, and the file's version as its ETag.
      const file = join(root, SMOLLM2);
      const size = statSync(file).size;
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? "");
      const [start, end] = range ? [Number(range[1]), Math.min(Number(range[2]), size - 1)] : [0, size - 1];
      const headers = { "content-length": end - start + 1, etag: `"${HUB_ETAG}"`, "content-type": "application/octet-stream" };
      res.writeHead(range ? 206 : 200, range ? { ...headers, "content-range": `bytes ${start}-${end}/${size}` } : headers);
      createReadStream(file, { start, end }).pipe(res);
      return true;
    }
    if (path.startsWith(`${NO_RANGE}/`)) {
      const file = join(root, path.slice(NO_RANGE.length));
      res.writeHead(200, { "content-length": statSync(file).size, "content-type": "application/octet-stream" });
      createReadStream(file).pipe(res);
      return true;
    }
    if (!interrupted.has(path)) return false;
    const bytes = readFileSync(join(root, path));
    res.writeHead(200, { "content-length": bytes.length, "content-type": "application/octet-stream" });
    res.write(bytes.subarray(0, bytes.length >> 1), () => res.destroy());
    return true;
  },
});
const requestsOf = (path, since = 0) => requests.slice(since).filter((r) => r.path === path);
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
  const shardPath = (i) => `/target/browser-test/tiny-llama31/shard-${String(i).padStart(5, "0")}.bin`;
  await page.goto(`${origin}/www/index.html?model=${encodeURIComponent(model)}`);

  // 1. An interrupted load fails naming the shard; the next load resumes with the stored shards.
  interrupted.add(shardPath(3));
  const failed = await page.evaluate(async (model) => {
    const { createEngine } = await import("/pkg/index.js");
    return createEngine({ model }).then(() => null, (e) => ({ name: e.name, message: e.message }));
  }, model);
  interrupted.clear();
  log("interrupted load:", JSON.stringify(failed));
  assertEqual(failed?.name, "LoadError", "load with shard 3 cut off halfway");
  assert(failed.message.includes("shard-00003.bin"), `the error names the shard: ${failed.message}`);
  const resumedFrom = requests.length;

  // 2. The package API in its worker: greedy chat, streamed, token ids and usage.
  const api = await page.evaluate(async ({ model, f32Model, prompt, maxTokens, predicted }) => {
    const { createEngine } = await import("/pkg/index.js");
    const progress = [];
    const engine = await createEngine({ model, onProgress: (p) => progress.push(p.progress), responseStore: 1 << 20 });
    const chunks = [];
    for await (const chunk of engine.chat.completions.create({
      messages: [{ role: "user", content: prompt }], stream: true, temperature: 0, max_tokens: maxTokens,
    })) chunks.push(chunk);
    const again = await engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: maxTokens });
    // The reply predicted (OpenAI's Predicted Outputs): drafted and verified, the same tokens.
    const predictedReply = await engine.chat.completions.create({
      messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: maxTokens, prediction: { type: "content", content: predicted },
    });
    const prediction = [predictedReply.choices[0].token_ids, Object.keys(predictedReply.usage.completion_tokens_details ?? {})];
    // Aborted through its signal before the first token.
    const controller = new AbortController();
    const aborted = engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], max_tokens: maxTokens, signal: controller.signal });
    controller.abort();
    const abortError = await aborted.then(() => "none", (e) => e.name);
    // Leaving a stream early stops it; the engine then serves the next request.
    for await (const chunk of engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], stream: true, max_tokens: 100 })) break;
    const afterBreak = await engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: maxTokens });
    // Two choices of one request, streamed under their indexes.
    const choiceChunks = [];
    for await (const chunk of engine.chat.completions.create({
      messages: [{ role: "user", content: prompt }], stream: true, temperature: 0, max_tokens: maxTokens, n: 2,
    })) choiceChunks.push(chunk);
    const choices = [0, 1].map((index) => {
      const own = choiceChunks.filter((c) => c.choices[0].index === index);
      return { tokens: own.flatMap((c) => c.choices[0].token_ids), finish: own.at(-1).choices[0].finish_reason };
    });
    // Concurrent streams: each alone first, then both together, then one of them aborted after
    // its first chunk while the other runs on.
    const stream = async (content, { max_tokens = maxTokens, abortAfterFirst = false } = {}) => {
      const controller = new AbortController();
      const chunks = [];
      try {
        for await (const chunk of engine.chat.completions.create({
          messages: [{ role: "user", content }], stream: true, temperature: 0, max_tokens, signal: controller.signal,
        })) {
          chunks.push(chunk);
          if (abortAfterFirst) controller.abort();
        }
      } catch (error) {
        chunks.push({ error: error.name });
      }
      const last = chunks.at(-1);
      return {
        tokens: chunks.flatMap((c) => c.choices?.[0].token_ids ?? []),
        text: chunks.map((c) => c.choices?.[0].delta.content ?? "").join(""),
        end: last.error ?? last.choices[0].finish_reason,
      };
    };
    const prompts = [prompt, "Why is the sky blue?"];
    const alone = [];
    for (const content of prompts) alone.push(await stream(content));
    const both = Promise.all(prompts.map((content) => stream(content)));
    const during = await engine.status();
    const together = await both;
    const [abortedStream, other] = await Promise.all([stream(prompts[0], { max_tokens: 64, abortAfterFirst: true }), stream(prompts[1])]);
    const after = await engine.status();
    // A JSON schema with logprobs; a required call of a tool whose keys are not in alphabetical order
    // (the call's arguments follow the schema's order, so they show it crossed into wasm intact); a
    // raw text completion streamed with logprobs; refused requests.
    const messages = [{ role: "user", content: prompt }];
    const schema = { type: "object", properties: { ok: { type: "boolean" } }, required: ["ok"], additionalProperties: false };
    const json = await engine.chat.completions.create({
      messages, temperature: 0, max_tokens: 16, logprobs: true, top_logprobs: 2, response_format: { type: "json_schema", json_schema: { name: "answer", schema } },
    });
    const parameters = { type: "object", properties: { z: { type: "boolean" }, a: { type: "boolean" } }, required: ["z", "a"], additionalProperties: false };
    const called = await engine.chat.completions.create({
      messages, temperature: 0, max_tokens: 40, tools: [{ type: "function", function: { name: "f", parameters } }], tool_choice: "required", parallel_tool_calls: false,
    });
    // The Responses API: the chat of the same turns, streamed as its events, continued by id.
    const response = await engine.responses.create({ input: prompt, temperature: 0, max_output_tokens: maxTokens });
    const events = [];
    for await (const event of engine.responses.create({ input: prompt, temperature: 0, max_output_tokens: maxTokens, stream: true, store: false })) events.push(event);
    const continued = await engine.responses.create({ previous_response_id: response.id, input: prompt, temperature: 0, max_output_tokens: 1 });
    const retrieved = await engine.responses.retrieve(response.id);
    const items = await engine.responses.inputItems.list(continued.id, { order: "asc" });
    await engine.responses.delete(response.id);
    const deleted = await engine.responses.create({ previous_response_id: response.id, input: prompt }).then(() => null, (e) => ({ name: e.name, param: e.param }));
    const responses = {
      whole: [response.status, response.output[0].content[0].text],
      streamed: [events[0].type, events.at(-1).type, events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("")],
      continued: [continued.previous_response_id === response.id, continued.usage.input_tokens_details.cached_tokens > response.usage.input_tokens],
      retrieved: retrieved.output[0].id === response.output[0].id,
      inputItems: [items.data.map((item) => item.role), items.data[1].id === response.output[0].id, items.has_more],
      deleted,
    };
    const textChunks = [];
    for await (const chunk of engine.completions.create({ prompt, temperature: 0, max_tokens: maxTokens, stream: true, logprobs: 2 })) textChunks.push(chunk);
    // A completion echoing its prompt, streamed (the prompt's chunk first) and not.
    const echoed = await engine.completions.create({ prompt, temperature: 0, max_tokens: 2, echo: true });
    const echoChunks = [];
    for await (const chunk of engine.completions.create({ prompt, temperature: 0, max_tokens: 2, echo: true, stream: true })) echoChunks.push(chunk);
    const echo = { whole: [echoed.choices[0].text, echoed.choices[0].token_ids], streamed: [echoChunks.map((c) => c.choices[0].text).join(""), echoChunks.flatMap((c) => c.choices[0].token_ids)] };
    const refusals = [
      { frequency_penality: 1 }, { temperature: "hot" }, { response_format: { type: "json_schema", json_schema: { schma: {} } } },
      { top_logprobs: 2 }, { max_tokens: 1000 },
    ];
    const refused = await Promise.all(refusals.map((fields) =>
      engine.chat.completions.create({ messages, ...fields }).then(() => null, (e) => ({ name: e.name, param: e.param, message: e.message }))));
    // A prompt longer than a pass (256 tokens) reports its prefill's progress.
    const prefill = [];
    await engine.chat.completions.create({
      messages: [{ role: "user", content: "one two three four ".repeat(30) }], max_tokens: 1,
      onPrefillProgress: (done, total) => prefill.push([done, total]),
    });
    // The tokens a chat's messages run as (serve's /tokenize), and their text back.
    const tokenized = await engine.tokenize({ messages, return_token_strs: true });
    const detokenized = await engine.detokenize(tokenized.tokens);
    const tokenizeError = await engine.tokenize({ prompt: "a", messages }).then(() => null, (e) => ({ name: e.name, param: e.param }));
    const info = engine.info();
    await engine.unload();
    const missing = await createEngine({ model: "/target/browser-test/missing/manifest.json" }).then(() => null, (e) => ({ name: e.name, message: e.message }));
    // A binding limit too small for one row of a weight matrix.
    const limit = await createEngine({ model, maxStorageBinding: 256 }).then(() => null, (e) => ({ name: e.name, message: e.message }));
    // A q8_0 KV pool (on any adapter), and an f32 one cut into buffers by a 40 KiB binding limit
    // (a layer's 512 positions take 64 KiB).
    const replyWith = async (options) => {
      const other = await createEngine({ model, ...options });
      const reply = await other.chat.completions.create({ messages, temperature: 0, max_tokens: maxTokens });
      const { kv_type, kv_buffers_per_layer, q8_activations, draft_model, features } = other.info();
      await other.unload();
      const drafted = reply.usage.completion_tokens_details?.accepted_prediction_tokens ?? 0;
      return { tokens: reply.choices[0].token_ids, kv: [kv_type, kv_buffers_per_layer], q8_activations, subgroups: features.includes("SUBGROUP"), ...(draft_model && { draft: [draft_model.layers, drafted > 0] }) };
    };
    // The q8_0 pool's engine also drafts by prompt lookup (the same tokens).
    const q8 = await replyWith({ kvType: "q8_0", promptLookup: true });
    // Its GEMVs sum through workgroup memory, as in browsers without subgroups.
    const buffers = await replyWith({ maxStorageBinding: 40 << 10, noSubgroups: true });
    // Decode GEMVs on int8 inputs: Tint's dot4I8Packed.
    // The same engine drafts with a second copy of its model.
    const q8Inputs = await replyWith({ q8Activations: true, draftModel: model });
    // f32 shards re-encoded into q4_0 as they stream: the q4_0 shards' model.
    const quantized = await replyWith({ model: f32Model, quant: "q4_0" });
    const badQuant = await createEngine({ model, quant: "q9_9" }).then(() => null, (e) => ({ name: e.name, param: e.param }));
    const badTemplate = await createEngine({ model, chatTemplate: "{% if %}" }).then(() => null, (e) => ({ name: e.name, param: e.param, syntax: e.message.includes("syntax error") }));
    // What the engine's GEMV reduction needs from the browser for its subgroup form.
    const subgroupsOffered = (await navigator.gpu.requestAdapter()).features.has("subgroups") && navigator.gpu.wgslLanguageFeatures.has("subgroup_id");
    return {
      tokens: chunks.flatMap((c) => c.choices[0].token_ids),
      text: chunks.map((c) => c.choices[0].delta.content ?? "").join(""),
      usage: chunks.at(-1).usage,
      finish: chunks.at(-1).choices[0].finish_reason,
      opening: [chunks[0].object, chunks[0].id.split("-")[0], chunks[0].choices[0].delta],
      again: again.choices[0].token_ids,
      againObject: [again.object, again.id.split("-")[0], again.usage],
      afterBreak: afterBreak.choices[0].token_ids,
      choices,
      choicesUsage: choiceChunks.at(-1).usage,
      lastProgress: progress.at(-1),
      abortError, info, missing, limit, alone, together, during, abortedStream, other, after, prefill,
      json, called, responses, textChunks, refused, q8, buffers, q8Inputs, quantized, badQuant, badTemplate, subgroupsOffered, tokenized, detokenized, tokenizeError, echo, prediction,
    };
  }, { model, f32Model: model.replace("/tiny-llama31/", "/tiny-llama31-f32/"), prompt: PROMPT, maxTokens: MAX_TOKENS, predicted: native.text });
  log("browser info:", JSON.stringify(api.info));
  for (const i of [0, 1, 2]) assertEqual(requestsOf(shardPath(i), resumedFrom).length, 0, `requests for shard ${i} when resuming (stored before the interruption)`);
  assertEqual(requestsOf(shardPath(3), resumedFrom).length, 1, "requests for the interrupted shard 3 when resuming");
  assertEqual(api.tokens, native.tokens, "streamed browser tokens vs native");
  assertEqual(api.text, native.text, "streamed browser text vs native");
  assertEqual(api.again, native.tokens, "second, non-streamed request (KV cache reused)");
  assertEqual(api.afterBreak, native.tokens, "a request after a stream left early");
  assertEqual(api.prediction, [native.tokens, ["accepted_prediction_tokens", "rejected_prediction_tokens"]], "a request with a prediction: tokens vs native, the drafts counted");
  assertEqual(api.usage.completion_tokens, native.tokens.length, "usage.completion_tokens on the last chunk");
  // The objects serve makes (crate::api::response): a chat stream opens with the role, usage in
  // OpenAI's shape; the same prompt again reuses its KV pages but the last token's.
  assertEqual(api.opening, ["chat.completion.chunk", "chatcmpl", { role: "assistant", content: "" }], "a chat stream's first chunk");
  assertEqual(api.againObject, ["chat.completion", "chatcmpl", { ...api.usage, prompt_tokens_details: { cached_tokens: api.usage.prompt_tokens - 1 } }], "a chat completion and its usage");
  assertEqual(api.choices.map((c) => c.tokens), [native.tokens, native.tokens], "n = 2 greedy choices vs native");
  assertEqual([api.choicesUsage.prompt_tokens, api.choicesUsage.completion_tokens], [api.usage.prompt_tokens, 2 * native.tokens.length], "n = 2 usage: the prompt once, the tokens of both");
  assertEqual(api.alone[0].tokens, native.tokens, "first concurrency prompt alone vs native");
  assertEqual([api.tokenized.count, api.tokenized.tokens.length, api.tokenized.token_strs.length], Array(3).fill(api.usage.prompt_tokens), "tokenize: the tokens a chat's usage counts, with their pieces");
  assert(api.detokenized.includes(PROMPT), `detokenize gives the rendered prompt back: ${api.detokenized}`);
  assertEqual(api.tokenizeError, { name: "RequestError", param: "prompt" }, "tokenize with both prompt and messages");
  assertEqual(api.echo.streamed, api.echo.whole, "a streamed echo (text and ids) vs the whole completion");
  assert(api.echo.whole[0].startsWith(PROMPT), `an echo begins with its prompt: ${api.echo.whole[0]}`);
  assertEqual(api.during.running + api.during.waiting, 2, "requests in the engine while both streams run");
  assertEqual(api.together, api.alone, "two concurrent streams vs each alone (tokens, text, finish)");
  assertEqual(api.abortedStream.end, "AbortError", "the stream aborted while another runs");
  assert(api.abortedStream.tokens.length < 64, `the aborted stream ended after ${api.abortedStream.tokens.length} of 64 tokens`);
  const shared = Math.min(api.abortedStream.tokens.length, api.alone[0].tokens.length);
  assertEqual(api.abortedStream.tokens.slice(0, shared), api.alone[0].tokens.slice(0, shared), "the aborted stream's tokens vs alone");
  assertEqual(api.other, api.alone[1], "the stream running beside the aborted one vs alone");
  assertEqual([api.after.running, api.after.waiting, api.after.kv_pages_free], [0, 0, api.after.kv_pages], "engine load after the requests (every KV page back)");
  const json = api.json.choices[0];
  assertEqual(Object.keys(JSON.parse(json.message.content)), ["ok"], `json_schema content ${json.message.content}`);
  assertEqual(json.logprobs.content.map((l) => l.token).join(""), json.message.content, "the logprobs' tokens spell the content");
  assert(json.logprobs.content.every((l) => Number.isFinite(l.logprob) && l.top_logprobs.length === 2 && l.top_logprobs.every((t) => Number.isFinite(t.logprob))),
    "finite logprobs with 2 alternatives each");
  const called = api.called.choices[0];
  assertEqual([called.finish_reason, called.message.content, called.message.tool_calls.length], ["tool_calls", null, 1], "tool_choice required: finish_reason, content, calls");
  const call = called.message.tool_calls[0];
  assertEqual([call.type, call.function.name, Object.keys(JSON.parse(call.function.arguments))], ["function", "f", ["z", "a"]], `the call ${call.function.arguments}`);
  assertEqual(api.responses.whole, ["incomplete", native.text], "a response: the chat's text, cut at max_output_tokens");
  assertEqual(api.responses.streamed, ["response.created", "response.incomplete", native.text], "a streamed response's first and last events and its text");
  assertEqual([api.responses.continued, api.responses.retrieved], [[true, true], true], "a response continued by previous_response_id (its turns' pages reused), retrieved");
  assertEqual(api.responses.inputItems, [["user", "assistant", "user"], true, false], "a continued response's input items: the turns it continued, then its input");
  assertEqual(api.responses.deleted, { name: "RequestError", param: "previous_response_id" }, "continuing a deleted response");
  const textTokens = api.textChunks.filter((c) => c.choices[0].token_ids.length).map((c) => c.choices[0]);
  assertEqual(api.textChunks.map((c) => c.choices[0].text).join(""), nativeText.text, "streamed text completion vs native");
  assertEqual(textTokens.flatMap((c) => c.token_ids), nativeText.tokens, "text completion tokens vs native");
  assert(textTokens.every((c) => c.logprobs.tokens.length === 1 && Number.isFinite(c.logprobs.token_logprobs[0])), "a logprob in each streamed token's chunk");
  const offsets = textTokens.map((c) => c.logprobs.text_offset[0]);
  const lengths = textTokens.map((c) => [...c.logprobs.tokens[0]].length);
  assertEqual(offsets, lengths.map((_, i) => lengths.slice(0, i).reduce((a, b) => a + b, 0)), "text completion logprobs' text_offset");
  assertEqual(api.refused.map((e) => e.message), [
    "frequency_penality: unknown field",
    "temperature: invalid type: string \"hot\", expected f32",
    "response_format.json_schema.schma: unknown field",
    "top_logprobs needs logprobs: true",
    `max_tokens 1000 is too large: the prompt has ${api.usage.prompt_tokens} tokens and the context holds 512`,
  ], "refused requests' messages");
  assertEqual(api.refused.map((e) => [e.name, e.param]), [["RequestError", "frequency_penality"], ["RequestError", "temperature"],
    ["RequestError", "response_format"], ["RequestError", "top_logprobs"], ["RequestError", "max_tokens"]], "refused requests' errors");
  assertEqual(api.info.load.max_sequences, 4, "default maxSequences in the browser");
  assertEqual(api.lastProgress, 1, "final load progress");
  assertEqual(api.abortError, "AbortError", "aborted request");
  assertEqual(api.missing?.name, "LoadError", "missing model");
  assert(api.missing.message.includes("missing/manifest.json"), `the load error names the file: ${api.missing.message}`);
  assertEqual(api.limit?.name, "LimitError", "a 256-byte storage binding limit");
  assert(/needed \d+, available 256/.test(api.limit.message), `the limit error has the numbers: ${api.limit.message}`);
  assert(api.info.adapter.name && !api.info.features.includes("SHADER_F16"), `adapter named, no shader-f16: ${JSON.stringify(api.info.adapter)}`);
  // Every token comparison above then ran the GEMVs' subgroup reduction (Chromium 144 and later).
  assertEqual([api.subgroupsOffered, api.info.features.includes("SUBGROUP")], [true, true], "subgroups offered with subgroup_id, and granted to the engine");
  assertEqual(api.info.kv_type, "f32", "the KV cache's type without shader-f16 (the f32 fallback)");
  assertEqual(api.q8, { tokens: nativeQ8.tokens, kv: ["q8_0", 1], q8_activations: false, subgroups: true }, "greedy tokens over a q8_0 KV pool, drafting by prompt lookup, vs native");
  assertEqual(api.buffers, { tokens: native.tokens, kv: ["f32", 2], q8_activations: false, subgroups: false }, "greedy tokens over a KV pool in two buffers, without subgroups (noSubgroups), vs native in one");
  assertEqual(api.quantized, { tokens: native.tokens, kv: ["f32", 1], q8_activations: false, subgroups: true }, "f32 shards loaded with quant q4_0 vs native on the q4_0 shards");
  assertEqual(api.badQuant, { name: "RequestError", param: "quant" }, "a quant that is no weight format");
  assertEqual(api.badTemplate, { name: "RequestError", param: "chatTemplate", syntax: true }, "a chat template that does not parse");
  assertEqual(api.q8Inputs, { tokens: nativeQ8Inputs.tokens, kv: ["f32", 1], q8_activations: true, subgroups: true, draft: [3, true] }, "greedy tokens on int8 inputs (q8Activations), drafted by a draft model (taken), vs native");
  // After the part of the prompt the prefix cache holds, 256 tokens a pass.
  assert(api.prefill.length >= 1 && api.prefill.every(([done, total], i) => done < total && total === api.prefill[0][1] && (i === 0 || done === api.prefill[i - 1][0] + 256)),
    `prefill progress of a long prompt, a report per pass: ${JSON.stringify(api.prefill)}`);
  assertEqual(api.info.weights, "cache", "where the weights are kept");
  assert(api.info.wasm_memory_bytes < TINY_WASM_BOUND, `wasm memory ${api.info.wasm_memory_bytes} < ${TINY_WASM_BOUND} after loading the fixture`);

  // 2b. `serve` on another origin (another port), called from this page's origin through CORS.
  const { url: apiUrl, stop: stopApi } = await startServe(shards, origin);
  try {
    const fromPage = await page.evaluate(async ({ apiUrl, prompt, maxTokens }) => {
      const response = await fetch(`${apiUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: maxTokens }),
      });
      return (await response.json()).choices[0].message.content;
    }, { apiUrl, prompt: PROMPT, maxTokens: MAX_TOKENS });
    assertEqual(fromPage, native.text, `serve at ${apiUrl} called from a page of ${origin} (--cors-origin)`);
  } finally {
    stopApi();
  }

  // 3. No room in the cache: on this thread (worker: false) with a storage estimate of no quota
  // left, the weights of a copy not cached yet stream from the network; with a 48 KiB storage
  // binding limit the matrices are split over several buffers; maxSequences and kvMemory size the
  // KV pool. The tokens are the same. Then its GPU device is destroyed (as a driver reset would lose
  // it): requests fail with DeviceLostError until reload() loads the model on a new device, and the
  // tokens are the same again.
  cpSync(shards, `${shards}-copy`, { recursive: true });
  const streamed = await page.evaluate(async ({ model, prompt, maxTokens, kvPageBytes }) => {
    const { createEngine } = await import("/pkg/index.js");
    const estimate = navigator.storage.estimate;
    navigator.storage.estimate = async () => ({ quota: 1000, usage: 1000 });
    const requestDevice = GPUAdapter.prototype.requestDevice;
    const devices = [];
    GPUAdapter.prototype.requestDevice = async function (...args) {
      devices.push(await requestDevice.apply(this, args));
      return devices.at(-1);
    };
    try {
      const engine = await createEngine({ model, worker: false, maxStorageBinding: 48 << 10, maxSequences: 2, kvMemory: 20 * kvPageBytes });
      const ask = () => engine.chat.completions.create({ messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: maxTokens });
      const reply = await ask();
      const info = engine.info();
      devices.at(-1).destroy();
      const whenLost = await Promise.all([ask(), ask()].map((request) => request.then(() => null, (e) => ({ name: e.name, message: e.message }))));
      const afterLoss = await ask().then(() => null, (e) => ({ name: e.name, message: e.message }));
      await engine.reload();
      const reloaded = await ask();
      await engine.unload();
      return { tokens: reply.choices[0].token_ids, weights: info.weights, load: info.load, whenLost, afterLoss, reloaded: reloaded.choices[0].token_ids, devices: devices.length };
    } finally {
      navigator.storage.estimate = estimate;
      GPUAdapter.prototype.requestDevice = requestDevice;
    }
  }, { model: model.replace("tiny-llama31/", "tiny-llama31-copy/"), prompt: PROMPT, maxTokens: MAX_TOKENS, kvPageBytes: TINY_KV_PAGE_BYTES });
  assert(streamed.weights.startsWith("network (the storage quota has 0.0 MiB left"), `weights streamed without quota: ${streamed.weights}`);
  assertEqual(streamed.tokens, native.tokens, "main-thread tokens without a cache, split by a 48 KiB binding limit, vs native");
  assertEqual([streamed.load.max_sequences, streamed.load.kv_pages], [2, 20], "maxSequences 2 and kvMemory of 20 pages");
  assertEqual(streamed.whenLost.map((e) => e?.name), ["DeviceLostError", "DeviceLostError"], "requests running when the device is destroyed");
  assert(streamed.afterLoss?.name === "DeviceLostError" && streamed.afterLoss.message.includes("reload"), `a request after the loss: ${JSON.stringify(streamed.afterLoss)}`);
  assertEqual([streamed.reloaded, streamed.devices], [native.tokens, 2], "tokens after engine.reload() on a new device vs native");

  // 4. SmolLM2's GGUF file, read with Range requests; then again from the cache.
  const smolFrom = requests.length;
  const smol = await page.evaluate(async ({ model, prompt, maxTokens }) => {
    const { createEngine } = await import("/pkg/index.js");
    const run = async (chat) => {
      const engine = await createEngine({ model });
      const request = { temperature: 0, max_tokens: maxTokens };
      const reply = chat
        ? await engine.chat.completions.create({ ...request, messages: [{ role: "user", content: prompt }] })
        : await engine.completions.create({ ...request, prompt });
      const info = engine.info();
      await engine.unload();
      return { tokens: reply.choices[0].token_ids, info };
    };
    const first = await run(false);
    const second = await run(true);
    return { first, second };
  }, { model: SMOLLM2, prompt: PROMPT, maxTokens: SMOLLM2_TOKENS });
  const smolRequests = requestsOf(SMOLLM2, smolFrom);
  log(`SmolLM2: ${smolRequests.length} requests, wasm memory ${(smol.first.info.wasm_memory_bytes / 2 ** 20).toFixed(1)} MiB`);
  assert(smolRequests.length > 3 && smolRequests.every((r) => /^bytes=\d+-\d+$/.test(r.range ?? "")), "every request for the GGUF file is a Range request");
  const fetched = smolRequests.reduce((sum, r) => sum + (([a, b]) => b - a + 1)(r.range.slice(6).split("-").map(Number)), 0);
  const size = statSync(join(root, SMOLLM2)).size;
  assert(fetched < size * 1.1, `bytes fetched ${fetched} for a file of ${size} (each downloaded once)`);
  assertEqual(smol.first.tokens, nativeSmol.tokens, "SmolLM2 browser tokens vs native");
  assertEqual(smol.second.tokens, nativeSmolChat.tokens, "SmolLM2 browser tokens of a chat turn (its GGUF's template), loaded from the cache, vs native");
  assert(smol.first.info.wasm_memory_bytes < SMOLLM2_WASM_BOUND, `wasm memory ${smol.first.info.wasm_memory_bytes} < ${SMOLLM2_WASM_BOUND} after loading SmolLM2`);
  // The same file from a server without Range support: read whole, once for the header's first
  // bytes and once for the weights.
  const plainFrom = requests.length;
  const plain = await page.evaluate(async ({ model, prompt }) => {
    const { createEngine } = await import("/pkg/index.js");
    const engine = await createEngine({ model });
    const reply = await engine.completions.create({ prompt, temperature: 0, max_tokens: 1 });
    await engine.unload();
    return reply.choices[0].token_ids;
  }, { model: NO_RANGE + SMOLLM2, prompt: PROMPT });
  assertEqual(plain, nativeSmol.tokens.slice(0, 1), "SmolLM2's first token from a server that ignores Range");
  assertEqual(requestsOf(NO_RANGE + SMOLLM2, plainFrom).length, 2, "requests for the file without Range support");
  // 4b. The same file by an hf: reference on a local endpoint: the quant's file found in the
  // repository's listing, read through its resolve URL's redirect, its pieces cached under its
  // ETag. The catalog and its fit check.
  const hubFrom = requests.length;
  const hub = await page.evaluate(async ({ endpoint, prompt, folderRepo }) => {
    const { checkFit, clearModelCache, createEngine, listModels } = await import("/pkg/index.js");
    const folder = await createEngine({ model: `hf:${folderRepo}`, hubEndpoint: endpoint }).then(() => null, (e) => [e.name, e.message]);
    const engine = await createEngine({ model: "hf:test/smollm2-GGUF:q4_1", hubEndpoint: endpoint });
    const reply = await engine.completions.create({ prompt, temperature: 0, max_tokens: 1 });
    await engine.unload();
    const cache = await caches.open("llama-webgpu-shards");
    const hubKeys = async () => (await cache.keys()).map((r) => r.url).filter((url) => url.includes("/resolve/main/") && url.includes("llama-webgpu-bytes="));
    const keys = await hubKeys();
    const cleared = [await clearModelCache("hf:test/other-GGUF:q4_1", { hubEndpoint: endpoint }), await clearModelCache("hf:test/smollm2-GGUF:q4_1", { hubEndpoint: endpoint })];
    const keysAfter = await hubKeys();
    const models = listModels();
    const fit = await checkFit(models.find((m) => m.id === "Llama-3.2-1B-Instruct-Q4_K_M"), { context: 4096 });
    const tooLong = await checkFit("Llama-3.1-8B-Instruct-Q4_0", { context: 1 << 20 });
    return { folder, tokens: reply.choices[0].token_ids, model: reply.model, keys, cleared, keysAfter, models: models.map((m) => [m.name, m.quant, m.size, m.vramBytes]), fit, tooLong };
  }, { endpoint: `${origin}${HUB}`, prompt: PROMPT, folderRepo: HUB_FOLDER_REPO });
  assert(hub.folder?.[0] === "LoadError" && hub.folder[1].includes("model folder of safetensors weights") && hub.folder[1].includes("GGUF files only"), `a repository of safetensors weights: ${JSON.stringify(hub.folder)}`);
  assertEqual(hub.tokens.length, 1, "a token from SmolLM2 loaded by hf:test/smollm2-GGUF:q4_1");
  assertEqual(hub.model, "hf:test/smollm2-GGUF:q4_1", "the model named in the reply");
  assertEqual(requestsOf(`${HUB}/api/models/${HUB_REPO}/revision/main`, hubFrom).length, 1, "requests for the repository's listing");
  assert(hub.keys.length >= 3 && hub.keys.every((key) => key.endsWith(`llama-webgpu-etag=${HUB_ETAG}`)), `${hub.keys.length} cached pieces, each under the file's ETag`);
  assertEqual([hub.cleared, hub.keysAfter.length], [[false, true], 0], "clearModelCache of another repository's hf: reference, then of the loaded one");
  for (const name of ["Llama 3.2 1B Instruct", "Llama 3.2 3B Instruct", "Llama 3.1 8B Instruct"]) {
    assert(hub.models.some(([n, quant, size, vram]) => n === name && quant.startsWith("Q4") && size > 5e8 && vram > size), `${name} in listModels() with its size`);
  }
  // SwiftShader has no shader-f16: an f32 KV cache of 4096 positions, 16 layers of 8 heads of 64.
  assertEqual([hub.fit.fits, hub.fit.kvType, hub.fit.kvBytes], [true, "f32", 4096 * 2 * 16 * 8 * 64 * 4], "checkFit of the 1B model at 4096 positions");
  assert(!hub.tooLong.fits && hub.tooLong.problems[0].includes("exceeds the model's 131072"), `checkFit of a context too long: ${hub.tooLong.problems}`);
  writeFileSync(join(out, "wasm-memory.json"), JSON.stringify({ smollm2: smol.first.info.wasm_memory_bytes, tiny: api.info.wasm_memory_bytes }) + "\n");

  // 5. No WebGPU: a typed error.
  const bare = await context.newPage();
  await bare.addInitScript(() => Object.defineProperty(Navigator.prototype, "gpu", { get: () => undefined }));
  await bare.goto(`${origin}/www/index.html?model=${encodeURIComponent(model)}`);
  const noGpu = await bare.evaluate(async (model) => {
    const { createEngine } = await import("/pkg/index.js");
    return createEngine({ model }).then(() => null, (e) => e.name);
  }, model);
  assertEqual(noGpu, "NoWebGpuError", "createEngine without WebGPU");
  await bare.close();

  // 6. The chat demo.
  const demoStarted = performance.now();
  await demoChecks({ context, origin, model, prompt: PROMPT, expected: native.text, maxTokens: MAX_TOKENS, out });
  log(`demo checks: ${((performance.now() - demoStarted) / 1000).toFixed(1)} s`);
  log("browser test passed");
} finally {
  await context.close();
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
