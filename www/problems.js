// What went wrong, in words a visitor can act on: `{title, detail, hint}` for an error of the
// package (by its class) or of the GPU (by what the message says).
import { LimitError, LoadError, NoWebGpuError, RequestError } from "../pkg/index.js";

const NO_WEBGPU_HINT = "Use a browser with WebGPU: Chrome or Edge 113 or later on Windows, macOS or ChromeOS, "
  + "Chrome on Android 12 or later, Safari 26, or Firefox 141 or later on Windows. On Linux, Chrome needs "
  + "chrome://flags/#enable-unsafe-webgpu and a Vulkan driver. Check that hardware acceleration is on in the "
  + "browser's settings.";

/** Before any load: the browser has no `navigator.gpu` at all. */
export const NO_WEBGPU = {
  title: "This browser has no WebGPU",
  detail: "The model runs on your GPU through WebGPU, which this browser does not offer (navigator.gpu is missing).",
  hint: NO_WEBGPU_HINT,
};

export function explain(error) {
  const message = error?.message ?? String(error);
  if (error instanceof NoWebGpuError) {
    return navigator.gpu ? {
      title: "WebGPU offers no GPU",
      detail: message,
      hint: "The browser may block this GPU or its driver. Update the graphics driver, check chrome://gpu, or try another browser.",
    } : NO_WEBGPU;
  }
  if (/out of memory/i.test(message)) {
    return {
      title: "The GPU ran out of memory",
      detail: message,
      hint: "Try a smaller model or a smaller quant, close other tabs and programs that use the GPU, then load again.",
    };
  }
  if (/device (was )?lost/i.test(message)) {
    return {
      title: "The GPU device was lost",
      detail: message,
      hint: "The driver reset or the browser reclaimed the GPU. Load the model again; if it keeps happening, try a smaller model.",
    };
  }
  if (error instanceof LimitError) {
    return {
      title: "This GPU is too weak for the model",
      detail: message,
      hint: "The message names the limit and the numbers. Try a smaller model, or a browser or machine with a stronger GPU.",
    };
  }
  if (error instanceof LoadError) {
    return {
      title: "The model did not load",
      detail: message,
      hint: "Check the URL. The server must answer Range requests for a .gguf file (or serve a shard folder), and "
        + "send CORS headers if it is another site. A load that was cut off resumes with what it had stored.",
    };
  }
  if (error instanceof RequestError) {
    return { title: "The request was refused", detail: message, hint: error.param ? `Check the setting ${error.param}.` : "" };
  }
  return { title: error?.name ?? "Error", detail: message, hint: "Reload the page and load the model again." };
}
