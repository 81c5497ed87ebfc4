// The engine's Web Worker: one wasm instance behind the protocol of protocol.js.
import init, * as wasm from "./llama_webgpu.js";
import { createHandler } from "./protocol.js";

const ready = init();
const handle = createHandler(wasm, (message) => postMessage(message));

onmessage = async ({ data }) => {
  try {
    await ready;
  } catch (error) {
    return postMessage({ id: data.id, type: "error", name: "LoadError", message: `loading the wasm module: ${error?.message ?? error}` });
  }
  handle(data);
};
