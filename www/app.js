// The chat demo: loads a model through the llama-webgpu package and streams replies.
import { createEngine, AbortError, NoWebGpuError } from "../pkg/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
$("model").value = params.get("model") ?? "../target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

let engine = null;
let controller = null;
const history = [];

function showError(error) {
  const hint = error instanceof NoWebGpuError ? " Try a recent Chrome or Edge, or enable WebGPU in your browser's settings." : "";
  $("error").textContent = `${error.name}: ${error.message}${hint}`;
  $("error").hidden = false;
}

function addMessage(role, text = "") {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").append(div);
  return div;
}

$("load-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").hidden = true;
  $("load").disabled = true;
  try {
    await engine?.unload();
    engine = null;
    engine = await createEngine({
      model: $("model").value,
      onProgress: ({ progress, loaded, total, timeElapsed }) => {
        $("progress").value = progress;
        const mb = (bytes) => (bytes / 1e6).toFixed(1);
        $("progress-text").textContent = `${mb(loaded)} / ${mb(total)} MB, ${mb(loaded / Math.max(timeElapsed, 1e-3))} MB/s`;
      },
    });
    const { adapter, model, weights } = engine.info();
    $("progress").value = 1;
    const kept = weights === "cache" ? "cached for the next visit" : weights;
    $("progress-text").textContent = `loaded: ${model.layers} layers on ${adapter.name || adapter.backend}; weights ${kept}`;
    $("prompt").disabled = $("send").disabled = false;
    $("prompt").focus();
  } catch (error) {
    showError(error);
  } finally {
    $("load").disabled = false;
  }
});

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!engine || !text) return;
  $("prompt").value = "";
  $("error").hidden = true;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant");
  const system = $("system").value.trim();
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let tokens = 0;
  try {
    const stream = engine.chat.completions.create({
      messages: system ? [{ role: "system", content: system }, ...history] : history,
      stream: true,
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      max_tokens: Number($("max-tokens").value),
      signal: controller.signal,
    });
    for await (const chunk of stream) {
      reply.textContent += chunk.choices[0].delta.content ?? "";
      tokens += chunk.choices[0].token_ids.length;
      $("stats").textContent = `${(tokens / ((performance.now() - started) / 1000)).toFixed(1)} tok/s`;
    }
    history.push({ role: "assistant", content: reply.textContent });
  } catch (error) {
    if (error instanceof AbortError) {
      // Keep the partial reply: the next turn then reuses the KV cache it left.
      history.push({ role: "assistant", content: reply.textContent });
      reply.textContent += " [stopped]";
    } else {
      showError(error);
      history.pop();
    }
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
  }
});

$("stop").addEventListener("click", () => controller?.abort());
