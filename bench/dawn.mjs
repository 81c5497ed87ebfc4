// The web build on Dawn, Chrome's WebGPU implementation, under Node (the npm package `webgpu`,
// dawn.node): the package's wasm engine on a machine without a browser, with Chrome's shader
// compiler (Tint) and robustness checks. First the tiny fixture's greedy chat tokens against the
// native CLI's (they must be equal), then synthetic models timed by the wasm `bench` export, the
// same code the native `bench` runs. Prints one JSON object (also written to --out).
//   node bench/dawn.mjs --webgpu DIR [--pkg pkg] [--cli target/release/llama-webgpu]
//        [--check SHARDS_DIR] [--synthetic llama3.2-1b,llama3.1-8b] [--quant q4_0] [--layers N]
//        [-p 512] [-n 128] [-r 3] [--q8-activations] [--no-subgroups] [--dawn-flag NAME=VALUE]... [--out FILE]
// --q8-activations: each model's decode again on int8 inputs (the q8Activations option).
// --no-subgroups: and again with the GEMVs reducing through workgroup memory, as in browsers
// without subgroups (the noSubgroups option).
// DIR holds the `webgpu` package (node_modules/webgpu). Dawn needs a Vulkan adapter it accepts:
// lavapipe is refused; Chromium's SwiftShader (VK_ICD_FILENAMES=.../vk_swiftshader_icd.json)
// works on a CPU machine, for a rehearsal.
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";
import { serve } from "../scripts/static-server.mjs";

const { values: args } = parseArgs({
  options: {
    webgpu: { type: "string" },
    pkg: { type: "string", default: "pkg" },
    cli: { type: "string", default: "target/release/llama-webgpu" },
    check: { type: "string" },
    synthetic: { type: "string", default: "llama3.2-1b,llama3.1-8b" },
    quant: { type: "string", default: "q4_0" },
    layers: { type: "string" },
    prompt: { type: "string", short: "p", default: "512" },
    generate: { type: "string", short: "n", default: "128" },
    repetitions: { type: "string", short: "r", default: "3" },
    "q8-activations": { type: "boolean", default: false },
    "no-subgroups": { type: "boolean", default: false },
    "dawn-flag": { type: "string", multiple: true, default: [] },
    out: { type: "string" },
  },
});
if (!args.webgpu) throw new Error("--webgpu DIR: the folder holding the `webgpu` package is required");

const PROMPT = "Hello";
const MAX_TOKENS = 8;

function log(...parts) {
  console.error(`[${(performance.now() / 1000).toFixed(1)}s]`, ...parts);
}

// The Vulkan loader inside dawn.node complains on headless machines without it.
process.env.XDG_RUNTIME_DIR ??= tmpdir();

/** The values of an object's getters (GPUAdapterInfo and GPUSupportedLimits keep theirs on the prototype). */
function getters(object) {
  const descriptors = Object.getOwnPropertyDescriptors(Object.getPrototypeOf(object));
  return Object.fromEntries(Object.entries(descriptors).filter(([, d]) => d.get).map(([name]) => [name, object[name]]));
}

// Dawn's navigator.gpu where the wasm build looks for it: wgpu reads `navigator` from the global
// scope of a window or a worker, told apart by their constructors, so a worker's is declared.
const { create, globals } = await import(pathToFileURL(resolve(args.webgpu, "webgpu/index.js")).href);
Object.assign(globalThis, globals);
const gpu = create(args["dawn-flag"]);
Object.defineProperty(globalThis, "navigator", { value: { gpu, userAgent: `node ${process.version} (dawn.node)` }, configurable: true });
globalThis.WorkerGlobalScope ??= class WorkerGlobalScope {};

const adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
if (!adapter) throw new Error("Dawn found no adapter (set VK_ICD_FILENAMES, or see --dawn-flag)");
const dawn = { adapter: { ...getters(adapter.info), ...adapter.info }, features: [...adapter.features].sort(), limits: getters(adapter.limits) };
log("Dawn adapter:", JSON.stringify(dawn.adapter));

const pkg = resolve(args.pkg);
const wasm = await import(pathToFileURL(join(pkg, "llama_webgpu.js")).href);
await wasm.default({ module_or_path: readFileSync(join(pkg, "llama_webgpu_bg.wasm")) });

const report = { dawn, check: null, results: [] };

if (args.check) {
  // The native CLI's greedy reply, then the wasm engine's on Dawn, from the same shards over HTTP.
  // An f32 KV cache on both sides: with shader-f16 both would take f16, and f32 leaves no margin for
  // rounding to tip a token.
  const native = JSON.parse(execFileSync(resolve(args.cli), ["-q", "--kv-type", "f32", "run", "--model", args.check, "--prompt", PROMPT, "--chat", "--temperature", "0", "-n", String(MAX_TOKENS), "--json"], { encoding: "utf8" }));
  const server = await serve({ root: args.check });
  try {
    await wasm.load(`http://127.0.0.1:${server.address().port}/manifest.json`, { kvType: "f32" }, () => {});
    const request = { messages: [{ role: "user", content: PROMPT }], max_tokens: MAX_TOKENS, temperature: 0 };
    const reply = await wasm.chat(1, request, { uuid: "dawn-check", model: "tiny" }, () => {});
    const tokens = reply.choices[0].token_ids;
    const equal = JSON.stringify(tokens) === JSON.stringify(native.tokens);
    report.check = { model: args.check, native: native.tokens, dawn: tokens, equal };
    log(`tokens on Dawn ${equal ? "equal" : "DIFFER from"} native:`, JSON.stringify(tokens), JSON.stringify(native.tokens));
    wasm.unload();
  } finally {
    server.close();
  }
}

// Int8 inputs and the reduction change decode only: their runs skip the prompt.
const variants = [
  { prompt: Number(args.prompt) },
  ...(args["q8-activations"] ? [{ q8Activations: true, prompt: 0 }] : []),
  ...(args["no-subgroups"] ? [{ noSubgroups: true, prompt: 0 }] : []),
];
for (const synthetic of args.synthetic.split(",").filter(Boolean)) {
  for (const variant of variants) {
    const options = {
      synthetic,
      quant: args.quant,
      generate: Number(args.generate),
      repetitions: Number(args.repetitions),
      ...(args.layers ? { layers: Number(args.layers) } : {}),
      ...variant,
    };
    log("bench", JSON.stringify(options));
    const result = await wasm.bench(options);
    for (const r of result.results) {
      const rates = r.tokens_per_second;
      log(`${synthetic}${variant.q8Activations ? " on q8 inputs" : ""}${variant.noSubgroups ? " without subgroups" : ""} ${r.test}: ${(rates.reduce((a, b) => a + b, 0) / rates.length).toFixed(1)} tok/s`, JSON.stringify(rates.map((x) => Number(x.toFixed(1)))));
    }
    report.results.push(result);
  }
}

const text = JSON.stringify(report);
if (args.out) writeFileSync(args.out, text + "\n");
console.log(text);
process.exit(report.check && !report.check.equal ? 1 : 0);
