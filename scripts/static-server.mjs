// A static file server for the chat demo and the browser test: serves a folder read-only on
// 127.0.0.1 with HTTP Range support (the engine reads GGUF files by ranges).
//   node scripts/static-server.mjs [--port N] [--root DIR] [--open PATH]
import { createReadStream, statSync } from "node:fs";
import { createServer } from "node:http";
import { extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const TYPES = {
  ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png", ".svg": "image/svg+xml",
};

/** The byte range a `Range: bytes=a-b` header asks for within a file of `size` bytes, or null. */
function parseRange(header, size) {
  const match = /^bytes=(\d*)-(\d*)$/.exec(header ?? "");
  if (!match || (match[1] === "" && match[2] === "")) return null;
  let start, end;
  if (match[1] === "") {
    start = Math.max(0, size - Number(match[2]));
    end = size - 1;
  } else {
    start = Number(match[1]);
    end = match[2] === "" ? size - 1 : Math.min(Number(match[2]), size - 1);
  }
  return start <= end ? { start, end } : { unsatisfiable: true };
}

/**
 * Serves `root` on 127.0.0.1:`port` (0 for any free port). `onRequest(request, path)` sees each
 * request first and may answer it itself by returning true (tests use it to inject failures).
 */
export function serve({ root, port = 0, onRequest }) {
  root = resolve(root);
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://127.0.0.1").pathname));
    if (onRequest?.(req, res, path)) return;
    let file = join(root, path);
    let stat = file.startsWith(root + "/") || file === root ? statSync(file, { throwIfNoEntry: false }) : undefined;
    if (stat?.isDirectory()) {
      file = join(file, "index.html");
      stat = statSync(file, { throwIfNoEntry: false });
    }
    if (!stat?.isFile()) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found");
      return;
    }
    const headers = { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "accept-ranges": "bytes", "cache-control": "no-cache" };
    const range = parseRange(req.headers.range, stat.size);
    if (range?.unsatisfiable) {
      res.writeHead(416, { "content-range": `bytes */${stat.size}` }).end();
    } else if (range) {
      res.writeHead(206, { ...headers, "content-length": range.end - range.start + 1, "content-range": `bytes ${range.start}-${range.end}/${stat.size}` });
      createReadStream(file, range).pipe(res);
    } else {
      res.writeHead(200, { ...headers, "content-length": stat.size });
      if (req.method === "HEAD") res.end();
      else createReadStream(file).pipe(res);
    }
  });
  return new Promise((ok, fail) => {
    server.once("error", fail);
    server.listen(port, "127.0.0.1", () => ok(server));
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const option = (name, fallback) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : fallback;
  };
  const root = resolve(option("--root", fileURLToPath(new URL("..", import.meta.url))));
  const server = await serve({ root, port: Number(option("--port", 8000)) });
  console.log(`serving ${root} on http://127.0.0.1:${server.address().port}${option("--open", "/")}`);
}
