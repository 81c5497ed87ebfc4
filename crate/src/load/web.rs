//! Shard folders over HTTP in the browser: `manifest.json`, `tokenizer.json` and the shards are
//! fetched relative to the manifest's URL; shards stream from the response body chunk by chunk
//! (never whole in wasm memory) and are stored in the Cache API so a reload does not download them.

use js_sys::{Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, CacheStorage, ReadableStreamDefaultReader, Response};

use super::manifest::Manifest;
use super::{ChunkReader, LoadError, LoadFuture, SourceFile, TensorLocation, WeightStream};
use crate::engine::EngineError;
use crate::text::{ChatTemplate, Tokenizer};

/// The Cache API bucket shards are kept in.
pub const CACHE_NAME: &str = "llama-webgpu-shards";

#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    // The global `fetch`: the same function in a window and in a worker.
    #[wasm_bindgen(js_name = fetch)]
    fn fetch_url(url: &str) -> Promise;
}

pub struct WebShards {
    pub manifest_url: String,
    pub manifest: Manifest,
    files: Vec<SourceFile>,
    locations: Vec<TensorLocation>,
    /// None where the page has no Cache API (an insecure context) or it failed to open.
    cache: Option<Cache>,
}

impl WebShards {
    /// Fetches and checks the manifest at `manifest_url` (absolute) and opens the shard cache.
    pub async fn open(manifest_url: &str) -> Result<Self, LoadError> {
        let text = fetch_text(manifest_url).await?;
        let manifest = Manifest::parse(&text)?;
        let (files, locations) = (manifest.files(), manifest.locations());
        Ok(Self { manifest_url: manifest_url.to_string(), manifest, files, locations, cache: open_cache().await })
    }

    /// The URL of a file beside the manifest.
    pub fn url(&self, name: &str) -> Result<String, LoadError> {
        web_sys::Url::new_with_base(name, &self.manifest_url)
            .map(|u| u.href())
            .map_err(|e| io_error(name, &describe(&e)))
    }

    pub async fn text(&self) -> Result<(Tokenizer, ChatTemplate), crate::Error> {
        let json = fetch_text(&self.url(&self.manifest.tokenizer)?).await?;
        let tokenizer = Tokenizer::from_json_bytes(json.as_bytes()).map_err(EngineError::from)?;
        let template = match &self.manifest.chat_template {
            Some(source) => ChatTemplate::new(source).map_err(EngineError::from)?,
            None => ChatTemplate::llama31(),
        };
        Ok((tokenizer, template))
    }

    /// Drops a shard from the cache, e.g. after it failed its checksum.
    pub async fn forget(&self, file: &str) {
        if let (Some(cache), Ok(url)) = (&self.cache, self.url(file)) {
            let _ = JsFuture::from(cache.delete_with_str(&url)).await;
        }
    }

    /// A cached response for `url`, or a fresh one that is stored in the cache as it streams.
    async fn shard_response(&self, url: &str) -> Result<Response, LoadError> {
        if let Some(cache) = &self.cache {
            if let Ok(hit) = JsFuture::from(cache.match_with_str(url)).await {
                if let Ok(response) = hit.dyn_into::<Response>() {
                    return Ok(response);
                }
            }
        }
        let response = fetch(url).await?;
        if let Some(cache) = &self.cache {
            // The body is teed: the cache and the loader read it side by side. A failed put (quota,
            // an interrupted download) stores nothing, so the next load fetches the shard again.
            if let Ok(copy) = response.clone() {
                let _ = cache.put_with_str(url, &copy);
            }
        }
        Ok(response)
    }
}

impl WeightStream for WebShards {
    fn files(&self) -> &[SourceFile] {
        &self.files
    }

    fn locations(&self) -> &[TensorLocation] {
        &self.locations
    }

    fn open(&self, index: usize) -> LoadFuture<'_, Box<dyn ChunkReader + '_>> {
        Box::pin(async move {
            let url = self.url(&self.files[index].name)?;
            let response = self.shard_response(&url).await?;
            let body = response.body().ok_or_else(|| io_error(&url, "the response has no body"))?;
            let reader = body.get_reader().unchecked_into::<ReadableStreamDefaultReader>();
            Ok(Box::new(StreamReader { url, reader, pending: None, offset: 0 }) as Box<dyn ChunkReader>)
        })
    }
}

/// Reads a response body through its stream reader, keeping what did not fit the caller's buffer.
struct StreamReader {
    url: String,
    reader: ReadableStreamDefaultReader,
    pending: Option<Uint8Array>,
    offset: u32,
}

impl ChunkReader for StreamReader {
    fn read<'a>(&'a mut self, buf: &'a mut [u8]) -> LoadFuture<'a, usize> {
        Box::pin(async move {
            let mut filled = 0;
            while filled < buf.len() {
                let chunk = match &self.pending {
                    Some(chunk) if self.offset < chunk.length() => chunk.clone(),
                    _ => {
                        let result = JsFuture::from(self.reader.read()).await.map_err(|e| io_error(&self.url, &describe(&e)))?;
                        if Reflect::get(&result, &"done".into()).is_ok_and(|d| d.is_truthy()) {
                            break;
                        }
                        let value = Reflect::get(&result, &"value".into()).map_err(|e| io_error(&self.url, &describe(&e)))?;
                        self.pending = Some(value.unchecked_into::<Uint8Array>());
                        self.offset = 0;
                        continue;
                    }
                };
                let n = (chunk.length() - self.offset).min((buf.len() - filled) as u32);
                chunk.subarray(self.offset, self.offset + n).copy_to(&mut buf[filled..filled + n as usize]);
                self.offset += n;
                filled += n as usize;
            }
            Ok(filled)
        })
    }
}

async fn fetch(url: &str) -> Result<Response, LoadError> {
    let response = JsFuture::from(fetch_url(url)).await.map_err(|e| io_error(url, &describe(&e)))?;
    let response: Response = response.dyn_into().map_err(|_| io_error(url, "fetch did not return a Response"))?;
    if !response.ok() {
        return Err(io_error(url, &format!("HTTP {} {}", response.status(), response.status_text())));
    }
    Ok(response)
}

async fn fetch_text(url: &str) -> Result<String, LoadError> {
    let response = fetch(url).await?;
    let text = response.text().map_err(|e| io_error(url, &describe(&e)))?;
    let text = JsFuture::from(text).await.map_err(|e| io_error(url, &describe(&e)))?;
    text.as_string().ok_or_else(|| io_error(url, "the body is not text"))
}

async fn open_cache() -> Option<Cache> {
    let caches = Reflect::get(&js_sys::global(), &"caches".into()).ok()?.dyn_into::<CacheStorage>().ok()?;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok()?.dyn_into::<Cache>().ok()
}

fn io_error(path: &str, message: &str) -> LoadError {
    LoadError::Io { path: path.to_string(), source: std::io::Error::other(message.to_string()) }
}

/// A thrown JS value as text (an Error's message, else its string form).
pub(crate) fn describe(value: &JsValue) -> String {
    value
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}
