// The engine's message protocol, the same in a Web Worker and on the main thread:
//   in:  {id, type: "load", url, options} | {id, type: "chat", request, response}
//        | {id, type: "complete", request, response} | {id, type: "respond", request, response}
//        | {id, type: "retrieveResponse", responseId} | {id, type: "deleteResponse", responseId}
//        | {id, type: "responseInputItems", responseId, options}
//        | {id, type: "info"} | {id, type: "unload"}
//        | {id, type: "tokenize", request} | {id, type: "detokenize", request}
//        | {type: "abort", id?}   (response: {uuid, model})
//   out: {id, type: "progress", done, total, tensor, stage} | {id, type: "chunk", chunk}
//        | {id, type: "chunk", prefill: {done, total}}
//        | {id, type: "result", value} | {id, type: "error", name, message, param}
// Requests (chat, text completions, responses) run together; each streams under its own id. "abort" stops
// the request of that id, or every one without an id, and answers nothing.

/** What the browser says about its adapter (wgpu leaves the name empty on the web). */
async function adapterInfo() {
  try {
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    const { vendor, architecture, device, description } = adapter?.info ?? {};
    const name = description || [vendor, architecture, device].filter(Boolean).join(" ");
    return name ? { name, vendor, architecture, description } : {};
  } catch {
    return {};
  }
}

/** Returns a function that runs one incoming message against the wasm exports, answering with `post`. */
export function createHandler(wasm, post) {
  let adapter = {};
  const info = () => {
    const info = wasm.info();
    return info && { ...info, adapter: { ...info.adapter, ...adapter } };
  };
  const postChunks = (id) => (chunk) => post({ id, type: "chunk", ...chunk });
  async function run(message) {
    const { id, type } = message;
    switch (type) {
      case "load":
        await wasm.load(message.url, message.options ?? {}, (done, total, tensor, stage) =>
          post({ id, type: "progress", done, total, tensor, stage }));
        adapter = await adapterInfo();
        return info();
      case "chat":
        return wasm.chat(id, message.request, message.response, postChunks(id));
      case "complete":
        return wasm.complete(id, message.request, message.response, postChunks(id));
      case "respond":
        return wasm.respond(id, message.request, message.response, postChunks(id));
      case "retrieveResponse":
        return wasm.stored_response(message.responseId);
      case "deleteResponse":
        return wasm.delete_response(message.responseId);
      case "responseInputItems":
        return wasm.response_input_items(message.responseId, message.options);
      case "tokenize":
        return wasm.tokenize(message.request);
      case "detokenize":
        return wasm.detokenize(message.request);
      case "info":
        return info();
      case "unload":
        return wasm.unload();
      default:
        throw new Error(`unknown message type ${type}`);
    }
  }
  return async (message) => {
    // Abort answers nothing and must not wait behind the running requests.
    if (message.type === "abort") return wasm.abort(message.id);
    try {
      post({ id: message.id, type: "result", value: await run(message) });
    } catch (error) {
      post({ id: message.id, type: "error", name: error?.name ?? "Error", message: error?.message ?? String(error), param: error?.param });
    }
  };
}
