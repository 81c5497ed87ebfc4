// The tiny Llama 3.1 fixture as the browser test and the Dawn check load it: its safetensors with
// the Llama 3 tokenizer cut to its 1003 ids, converted by the CLI to q4_0 shards.
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

// The Llama 3 tokenizer cut to the fixture's 1003 ids, as tests/common/mod.rs cuts it.
function truncatedTokenizer(root, vocab) {
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

/** Writes the fixture's shards to `out`/tiny-llama31 with the CLI at `cli`; returns that folder. */
export function prepareTinyShards(root, cli, out) {
  const source = join(out, "tiny-llama31-src");
  const shards = join(out, "tiny-llama31");
  mkdirSync(source, { recursive: true });
  const fixture = join(root, "tests/fixtures/tiny-llama31");
  for (const name of readdirSync(fixture)) {
    if (/\.(json|safetensors)$/.test(name) && name !== "golden.json") cpSync(join(fixture, name), join(source, name));
  }
  writeFileSync(join(source, "tokenizer.json"), truncatedTokenizer(root, 1003));
  // The Llama 3.1 template's tool preamble alone is about 300 of this tokenizer's tokens: 512
  // positions (the fixture has 256) let a request with a tool fit. Native and browser load this copy.
  const config = JSON.parse(readFileSync(join(source, "config.json"), "utf8"));
  writeFileSync(join(source, "config.json"), JSON.stringify({ ...config, max_position_embeddings: 512 }));
  // Small shards, so a load streams several of them.
  execFileSync(cli, ["-q", "convert", source, "--quant", "q4_0", "--shard-size", "64KiB", "-o", shards], { stdio: "inherit" });
  return shards;
}
