//! Models over HTTP in the browser: a shard folder (`manifest.json` beside its shards and
//! `tokenizer.json`) or a GGUF file read with HTTP Range requests.
//!
//! Weights travel in pieces (a shard, or a range of the GGUF file) that are fetched a few at a time
//! ahead of the uploader straight into the Cache API, and read back from there chunk by chunk: a
//! model is never whole in wasm memory, a reload does not download it again, and an interrupted
//! load resumes with the pieces it had stored. Without a usable cache (an insecure context, or too
//! little quota) the pieces stream from the network one after another instead.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use js_sys::{Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{Cache, CacheStorage, Headers, ReadableStreamDefaultReader, Request, RequestCache, RequestInit, Response, ResponseInit};

use super::gguf::GgufHeader;
use super::manifest::Manifest;
use super::{ChunkReader, LoadError, LoadFuture, SourceFile, TensorLocation, WeightStream};
use crate::engine::EngineError;
use crate::hub::{self, FileChoice, Listing, ModelRef};
use crate::model::Config;
use crate::text::{ChatTemplate, Tokenizer};

/// The Cache API bucket model files are kept in.
pub const CACHE_NAME: &str = "llama-webgpu-shards";
/// The size of a GGUF file's pieces: big enough that requests are few, small enough that an
/// interrupted load loses little.
const GGUF_PIECE_BYTES: u64 = 32 << 20;
/// Pieces downloading at once, ahead of the one being uploaded.
const FETCHES_AHEAD: usize = 4;
/// The first guess at a GGUF header's size (metadata with the vocabulary, and the tensor table);
/// multiplied by four until the header parses.
const GGUF_HEADER_GUESS: u64 = 4 << 20;
/// Attempts per request: network errors and 5xx/429 answers are retried after a pause.
const ATTEMPTS: u32 = 3;
/// The header of cached GGUF prefixes that records the whole file's size.
const FILE_SIZE_HEADER: &str = "x-llama-webgpu-file-size";
/// The header of cached GGUF prefixes that records the file's ETag, where the server gave one.
const ETAG_HEADER: &str = "x-llama-webgpu-etag";

thread_local! {
    /// A rejection handler that does nothing, made once.
    static IGNORE: Closure<dyn FnMut(JsValue)> = Closure::new(|_| {});
}

#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    // The global `fetch` and `setTimeout`: the same functions in a window and in a worker.
    #[wasm_bindgen(js_name = fetch)]
    fn fetch_request(request: &Request) -> Promise;
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(callback: &Function, milliseconds: i32) -> JsValue;
}

/// The URL of the file an `hf:` reference names on the Hub at `endpoint` (default the Hub's own),
/// read by Range like any other; a quant's file is found in the repository's listing. A URL
/// stays as it is.
pub async fn resolve_reference(text: &str, endpoint: Option<&str>) -> Result<String, crate::Error> {
    let endpoint = endpoint.unwrap_or(hub::DEFAULT_ENDPOINT);
    let reference = match ModelRef::parse(text)? {
        ModelRef::Url(url) => return Ok(url),
        ModelRef::Hub(reference) => reference,
    };
    let file = match &reference.file {
        FileChoice::File(file) => file.clone(),
        _ => {
            let url = hub::listing_url(endpoint, &reference.repo, hub::REVISION);
            let listing = Listing::parse(&fetch_text(&url).await?).map_err(|e| io_error(&url, &format!("the model info is not the Hub's JSON: {e}")))?;
            reference.pick(&listing.names())?
        }
    };
    Ok(hub::resolve_url(endpoint, &reference.repo, hub::REVISION, &file))
}

/// A model at a URL: GGUF when the path ends in `.gguf`, else a shard folder's `manifest.json`.
pub enum WebModel {
    Shards(WebShards),
    Gguf(WebGguf),
}

impl WebModel {
    /// Opens the model at `url` (absolute): fetches the manifest or the GGUF header and checks them.
    pub async fn open(url: &str) -> Result<Self, crate::Error> {
        let path = web_sys::Url::new(url).map(|u| u.pathname()).map_err(|e| io_error(url, &describe(&e)))?;
        Ok(if path.to_ascii_lowercase().ends_with(".gguf") {
            WebModel::Gguf(WebGguf::open(url).await?)
        } else {
            WebModel::Shards(WebShards::open(url).await?)
        })
    }

    pub fn config(&self) -> Result<Config, crate::Error> {
        match self {
            WebModel::Shards(shards) => shards.manifest.model_config(),
            WebModel::Gguf(gguf) => gguf.config(),
        }
    }

    pub async fn text(&self) -> Result<(Tokenizer, ChatTemplate), crate::Error> {
        match self {
            WebModel::Shards(shards) => shards.text().await,
            WebModel::Gguf(gguf) => {
                let tokenizer = Tokenizer::from_gguf(&gguf.header).map_err(EngineError::from)?;
                let template = ChatTemplate::from_gguf(&gguf.header).map_err(EngineError::from)?;
                Ok((tokenizer, template))
            }
        }
    }

    fn pieces(&self) -> &Pieces {
        match self {
            WebModel::Shards(shards) => &shards.pieces,
            WebModel::Gguf(gguf) => &gguf.pieces,
        }
    }

    /// Drops a file's stored pieces, e.g. after it failed its checksum, so the next load fetches it.
    pub async fn forget(&self, file: &str) {
        self.pieces().forget_file(file).await;
    }

    /// How the weights are kept: "cache" or why not.
    pub fn storage(&self) -> String {
        self.pieces().storage()
    }

    /// Where the weights being read come from: "cache" when stored by an earlier load, else
    /// "download".
    pub fn stage(&self) -> &'static str {
        self.pieces().stage()
    }
}

/// Both kinds stream through their pieces.
impl WeightStream for WebModel {
    fn files(&self) -> &[SourceFile] {
        match self {
            WebModel::Shards(shards) => &shards.files,
            WebModel::Gguf(gguf) => &gguf.files,
        }
    }

    fn locations(&self) -> &[TensorLocation] {
        match self {
            WebModel::Shards(shards) => &shards.locations,
            WebModel::Gguf(gguf) => &gguf.locations,
        }
    }

    fn open(&self, index: usize, from: u64) -> LoadFuture<'_, Box<dyn ChunkReader + '_>> {
        let reader = self.pieces().reader(index, from);
        Box::pin(std::future::ready(Ok(Box::new(reader) as Box<dyn ChunkReader>)))
    }
}

/// A shard folder over HTTP: the files are named relative to the manifest's URL.
pub struct WebShards {
    pub manifest_url: String,
    pub manifest: Manifest,
    files: Vec<SourceFile>,
    locations: Vec<TensorLocation>,
    pieces: Pieces,
}

impl WebShards {
    /// Fetches and checks the manifest at `manifest_url` (absolute) and opens the cache.
    pub async fn open(manifest_url: &str) -> Result<Self, LoadError> {
        let text = fetch_text(manifest_url).await?;
        let manifest = Manifest::parse(&text)?;
        let (files, locations) = (manifest.files(), manifest.locations());
        let pieces = files
            .iter()
            .enumerate()
            .map(|(file_index, file)| {
                let url = resolve(&file.name, manifest_url)?;
                Ok(Piece { file_index, file: file.name.clone(), key: url.clone(), etag: None, url, range: None, file_offset: 0, size: file.size })
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let pieces = Pieces::new(pieces, files.len()).await;
        Ok(Self { manifest_url: manifest_url.to_string(), manifest, files, locations, pieces })
    }

    pub async fn text(&self) -> Result<(Tokenizer, ChatTemplate), crate::Error> {
        let url = resolve(&self.manifest.tokenizer, &self.manifest_url)?;
        let json = self.pieces.cached_text(&url).await?;
        let tokenizer = Tokenizer::from_json_bytes(json.as_bytes()).map_err(EngineError::from)?;
        let template = self.manifest.template().map_err(EngineError::from)?;
        Ok((tokenizer, template))
    }
}

/// A GGUF file over HTTP: the header from a prefix of the file, the tensor data in ranges.
pub struct WebGguf {
    header: GgufHeader,
    rope_freqs: Option<Vec<u8>>,
    files: [SourceFile; 1],
    locations: Vec<TensorLocation>,
    pieces: Pieces,
}

impl WebGguf {
    pub async fn open(url: &str) -> Result<Self, crate::Error> {
        let name = url.rsplit('/').next().unwrap_or(url).split(['?', '#']).next().unwrap_or(url).to_string();
        let cache = open_cache().await;
        let mut guess = GGUF_HEADER_GUESS;
        let (prefix, header) = loop {
            let prefix = fetch_prefix(url, guess, cache.as_ref()).await?;
            match GgufHeader::parse(&name, &prefix.bytes) {
                Ok(header) => break (prefix, header),
                Err(LoadError::Truncated { .. }) if (prefix.bytes.len() as u64) < prefix.file_size => guess *= 4,
                Err(error) => return Err(error.into()),
            }
        };
        let file_size = prefix.file_size;
        if let Some(t) = header.tensors().iter().find(|t| t.range.end > file_size) {
            return Err(LoadError::TensorOutOfBounds {
                file: name,
                tensor: t.name.clone(),
                start: t.range.start,
                end: t.range.end,
                file_size: file_size as usize,
            }
            .into());
        }
        let rope_freqs = match header.tensor("rope_freqs.weight") {
            Some(t) => Some(match prefix.bytes.get(t.range.start as usize..t.range.end as usize) {
                Some(bytes) => bytes.to_vec(),
                None => fetch_range(url, t.range.clone()).await?,
            }),
            None => None,
        };
        let pieces = if prefix.ranged {
            let data = header.data_offset()..file_size;
            (data.start..data.end)
                .step_by(GGUF_PIECE_BYTES as usize)
                .map(|start| {
                    let range = start..(start + GGUF_PIECE_BYTES).min(data.end);
                    Piece {
                        file_index: 0,
                        file: name.clone(),
                        key: range_key(url, &range, file_size, prefix.etag.as_deref()),
                        etag: prefix.etag.clone(),
                        url: url.to_string(),
                        file_offset: range.start,
                        size: range.end - range.start,
                        range: Some(range),
                    }
                })
                .collect()
        } else {
            // The server ignores Range requests: the whole file is one piece.
            let key = range_key(url, &(0..file_size), file_size, prefix.etag.as_deref());
            vec![Piece { file_index: 0, file: name.clone(), key, etag: prefix.etag.clone(), url: url.to_string(), range: None, file_offset: 0, size: file_size }]
        };
        let locations = header.hf_locations()?;
        let files = [SourceFile { name, size: file_size, sha256: None }];
        Ok(Self { header, rope_freqs, files, locations, pieces: Pieces::new(pieces, 1).await })
    }

    pub fn config(&self) -> Result<Config, crate::Error> {
        self.header.config(self.rope_freqs.as_deref())
    }
}

/// Bytes of a file fetched and cached as one unit.
#[derive(Clone)]
struct Piece {
    /// The file's index in the stream and its name (as errors and `forget` name it).
    file_index: usize,
    file: String,
    url: String,
    /// The bytes of the file at `url` to ask for; None for all of it.
    range: Option<Range<u64>>,
    /// The Cache API key.
    key: String,
    /// The file's ETag when its first bytes came: a piece fetched later must have the same.
    etag: Option<String>,
    /// Where the piece starts in its file, and its length.
    file_offset: u64,
    size: u64,
}

/// The pieces of a model's files in load order, with their downloads.
struct Pieces {
    pieces: Vec<Piece>,
    /// Per file, its pieces.
    by_file: Vec<Range<usize>>,
    /// None without a Cache API, or when the browser's quota cannot hold the model.
    cache: Option<Cache>,
    /// Why there is no cache, for `info()`.
    no_cache_reason: RefCell<Option<String>>,
    /// Per piece, its download into the cache once started: resolves true once stored, false when
    /// the cache refused it (quota).
    downloads: RefCell<Vec<Option<Promise>>>,
    /// Set when the cache refused a piece: the rest stream from the network.
    cache_full: Cell<bool>,
    /// Per piece, whether the cache held it when the load began (empty without a cache).
    stored_before: Vec<bool>,
    /// The piece read last.
    reading: Cell<usize>,
}

impl Pieces {
    async fn new(pieces: Vec<Piece>, files: usize) -> Self {
        let by_file = (0..files)
            .map(|f| pieces.partition_point(|p| p.file_index < f)..pieces.partition_point(|p| p.file_index <= f))
            .collect();
        let mut stored_before = vec![];
        let (cache, reason) = match open_cache().await {
            None => (None, Some("no Cache API in this context".to_string())),
            Some(cache) => {
                // Only what is not stored yet needs room (a reload of a cached model needs none).
                let mut missing = 0;
                for piece in &pieces {
                    let stored = cached(&cache, &piece.key).await.is_some();
                    if !stored {
                        missing += piece.size;
                    }
                    stored_before.push(stored);
                }
                match storage_left().await {
                    Some(left) if left < missing => {
                        (None, Some(format!("the storage quota has {:.1} MiB left, the model needs {:.1} MiB more", mib(left), mib(missing))))
                    }
                    _ => (Some(cache), None),
                }
            }
        };
        if let Some(reason) = &reason {
            web_sys::console::warn_1(&format!("llama-webgpu: weights are not cached ({reason}); they stream from the network").into());
        }
        let downloads = RefCell::new(vec![None; pieces.len()]);
        Self { pieces, by_file, cache, no_cache_reason: RefCell::new(reason), downloads, cache_full: Cell::new(false), stored_before, reading: Cell::new(0) }
    }

    fn stage(&self) -> &'static str {
        match self.stored_before.get(self.reading.get()) {
            Some(true) => "cache",
            _ => "download",
        }
    }

    fn storage(&self) -> String {
        match &*self.no_cache_reason.borrow() {
            None => "cache".into(),
            Some(reason) => format!("network ({reason})"),
        }
    }

    fn reader(&self, file: usize, from: u64) -> PieceReader<'_> {
        let range = self.by_file[file].clone();
        let first = range.clone().find(|&i| self.pieces[i].file_offset + self.pieces[i].size > from).unwrap_or(range.end);
        let skip = self.pieces.get(first).filter(|_| first < range.end).map_or(0, |p| from.saturating_sub(p.file_offset));
        PieceReader { pieces: self, next: first, end: range.end, current: None, skip }
    }

    /// Starts the downloads of pieces `index..index + FETCHES_AHEAD` not yet started.
    fn prefetch(&self, index: usize) {
        let Some(cache) = self.cache.as_ref().filter(|_| !self.cache_full.get()) else { return };
        let mut downloads = self.downloads.borrow_mut();
        for i in index..(index + FETCHES_AHEAD).min(self.pieces.len()) {
            if downloads[i].is_none() {
                let (cache, piece) = (cache.clone(), self.pieces[i].clone());
                let promise = wasm_bindgen_futures::future_to_promise(async move {
                    // Rejects with the message alone: `body` names the file.
                    download(&cache, &piece).await.map(JsValue::from).map_err(|e| match e {
                        LoadError::Io { error, .. } => error.to_string().into(),
                        other => other.to_string().into(),
                    })
                });
                // A failure is reported when the piece is read; one never read (the load failed
                // before it) is no unhandled rejection.
                let _ = IGNORE.with(|ignore| promise.catch(ignore));
                downloads[i] = Some(promise);
            }
        }
    }

    /// Piece `index`'s body: from the cache once its download is stored, else from the network.
    async fn body(&self, index: usize) -> Result<Response, LoadError> {
        self.reading.set(index);
        self.prefetch(index);
        let piece = &self.pieces[index];
        let download = self.downloads.borrow()[index].clone();
        if let (Some(download), Some(cache)) = (download, &self.cache) {
            let stored = JsFuture::from(download).await.map_err(|e| io_error(&piece.url, &describe(&e)))?;
            if stored.is_truthy() {
                if let Some(response) = cached(cache, &piece.key).await {
                    return Ok(response);
                }
            } else if !self.cache_full.replace(true) {
                let reason = "the storage quota ran out while storing the model".to_string();
                web_sys::console::warn_1(&format!("llama-webgpu: {reason}; the rest streams from the network").into());
                *self.no_cache_reason.borrow_mut() = Some(reason);
            }
        }
        fetch_piece(piece).await
    }

    async fn forget_file(&self, file: &str) {
        for piece in self.pieces.iter().filter(|p| p.file == file) {
            self.forget(piece).await;
        }
    }

    async fn forget(&self, piece: &Piece) {
        if let Some(cache) = &self.cache {
            let _ = JsFuture::from(cache.delete_with_str(&piece.key)).await;
        }
    }

    /// A small text file beside the model (the tokenizer), from the cache or stored there.
    async fn cached_text(&self, url: &str) -> Result<String, LoadError> {
        if let Some(cache) = &self.cache {
            if let Some(response) = cached(cache, url).await {
                return response_text(url, response).await;
            }
            let response = fetch(url, None).await?;
            if let Ok(copy) = response.clone() {
                // Not storing it only costs a download on the next load.
                let _ = JsFuture::from(cache.put_with_str(url, &copy)).await;
            }
            return response_text(url, response).await;
        }
        fetch_text(url).await
    }
}

/// Downloads `piece` into `cache` unless it is there; false when the cache refused it for quota.
async fn download(cache: &Cache, piece: &Piece) -> Result<bool, LoadError> {
    if cached(cache, &piece.key).await.is_some() {
        return Ok(true);
    }
    let response = match fetch_piece(piece).await {
        Err(error @ LoadError::Changed { .. }) => {
            forget_url(cache, &piece.url).await;
            return Err(error);
        }
        other => other?,
    };
    match JsFuture::from(cache.put_with_str(&piece.key, &response)).await {
        Ok(_) => Ok(true),
        Err(error) if error_name(&error) == "QuotaExceededError" => Ok(false),
        Err(error) => Err(io_error(&piece.url, &format!("downloading {}: {}", describe_range(piece), describe(&error)))),
    }
}

/// Reads a file's pieces one after another, checking each one's length.
struct PieceReader<'a> {
    pieces: &'a Pieces,
    next: usize,
    end: usize,
    current: Option<(usize, BodyReader)>,
    /// Bytes at the start of the next piece the caller did not ask for.
    skip: u64,
}

impl ChunkReader for PieceReader<'_> {
    fn read<'a>(&'a mut self, buf: &'a mut [u8]) -> LoadFuture<'a, usize> {
        Box::pin(async move {
            let mut filled = 0;
            while filled < buf.len() {
                let Some((index, body)) = &mut self.current else {
                    if self.next == self.end {
                        break;
                    }
                    let response = self.pieces.body(self.next).await?;
                    let piece = &self.pieces.pieces[self.next];
                    let body = BodyReader::new(&piece.url, &response)?;
                    self.current = Some((self.next, body));
                    self.next += 1;
                    continue;
                };
                let piece = &self.pieces.pieces[*index];
                let skipping = self.skip > 0;
                let want = if skipping { self.skip.min((buf.len() - filled) as u64) as usize } else { buf.len() - filled };
                let n = body.read(&mut buf[filled..filled + want]).await?;
                if n == 0 {
                    if body.read_total != piece.size {
                        let message = format!("{} ended after {} of {} bytes", describe_range(piece), body.read_total, piece.size);
                        self.pieces.forget(piece).await;
                        return Err(io_error(&piece.url, &message));
                    }
                    self.current = None;
                } else if skipping {
                    self.skip -= n as u64;
                } else {
                    filled += n;
                }
            }
            Ok(filled)
        })
    }
}

/// A response body read through its stream reader, keeping what did not fit the caller's buffer.
struct BodyReader {
    url: String,
    reader: ReadableStreamDefaultReader,
    pending: Option<Uint8Array>,
    offset: u32,
    read_total: u64,
}

impl BodyReader {
    fn new(url: &str, response: &Response) -> Result<Self, LoadError> {
        let body = response.body().ok_or_else(|| io_error(url, "the response has no body"))?;
        let reader = body.get_reader().unchecked_into::<ReadableStreamDefaultReader>();
        Ok(Self { url: url.to_string(), reader, pending: None, offset: 0, read_total: 0 })
    }

    /// Fills `buf` as far as the body goes; 0 at its end.
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, LoadError> {
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
        self.read_total += filled as u64;
        Ok(filled)
    }

    /// Stops the download; what was not read is dropped.
    fn cancel(&self) {
        let _ = self.reader.cancel();
    }
}

/// A piece's bytes as a plain 200 response (the Cache API refuses 206 answers).
async fn fetch_piece(piece: &Piece) -> Result<Response, LoadError> {
    let response = fetch(&piece.url, piece.range.clone()).await?;
    if let (Some(was), Some(now)) = (&piece.etag, response_etag(&response)) {
        if *was != now {
            let _ = response.body().map(|b| b.cancel());
            return Err(LoadError::Changed { file: piece.file.clone(), was: was.clone(), now });
        }
    }
    if piece.range.is_none() {
        return Ok(response);
    }
    let headers = Headers::new().map_err(|e| io_error(&piece.url, &describe(&e)))?;
    let _ = headers.set("content-length", &piece.size.to_string());
    let init = ResponseInit::new();
    init.set_status(200);
    init.set_headers(&headers);
    Response::new_with_opt_readable_stream_and_init(response.body().as_ref(), &init).map_err(|e| io_error(&piece.url, &describe(&e)))
}

/// The start of a GGUF file: up to `len` bytes, and the file's size.
struct Prefix {
    bytes: Vec<u8>,
    etag: Option<String>,
    file_size: u64,
    /// Whether the server answers Range requests.
    ranged: bool,
}

async fn fetch_prefix(url: &str, len: u64, cache: Option<&Cache>) -> Result<Prefix, LoadError> {
    let key = format!("{url}{}llama-webgpu-prefix={len}", if url.contains('?') { '&' } else { '?' });
    let hit = match cache {
        Some(cache) => cached(cache, &key).await,
        None => None,
    };
    if let Some(response) = hit {
        let file_size = response.headers().get(FILE_SIZE_HEADER).ok().flatten().and_then(|s| s.parse().ok());
        if let Some(file_size) = file_size {
            let etag = response.headers().get(ETAG_HEADER).ok().flatten();
            return Ok(Prefix { bytes: response_bytes(url, &response).await?, etag, file_size, ranged: true });
        }
    }
    let response = fetch(url, Some(0..len)).await?;
    if response.status() == 206 {
        let file_size = response
            .headers()
            .get("content-range")
            .ok()
            .flatten()
            .and_then(|range| range.rsplit('/').next()?.parse::<u64>().ok())
            .ok_or_else(|| io_error(url, "the Range answer has no file size in Content-Range"))?;
        let bytes = response_bytes(url, &response).await?;
        let etag = response_etag(&response);
        if let Some(cache) = cache {
            let headers = Headers::new().map_err(|e| io_error(url, &describe(&e)))?;
            let _ = headers.set(FILE_SIZE_HEADER, &file_size.to_string());
            if let Some(etag) = &etag {
                let _ = headers.set(ETAG_HEADER, etag);
            }
            let init = ResponseInit::new();
            init.set_headers(&headers);
            if let Ok(copy) = Response::new_with_opt_u8_array_and_init(Some(&mut bytes.clone()), &init) {
                let _ = JsFuture::from(cache.put_with_str(&key, &copy)).await;
            }
        }
        return Ok(Prefix { bytes, etag, file_size, ranged: true });
    }
    // A 200 answer carries the whole file: keep its first `len` bytes and stop the download.
    let file_size = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| io_error(url, "the server neither answers Range requests nor says the file's size (Content-Length)"))?;
    let etag = response_etag(&response);
    let mut body = BodyReader::new(url, &response)?;
    let mut bytes = vec![0; len.min(file_size) as usize];
    let n = body.read(&mut bytes).await?;
    bytes.truncate(n);
    body.cancel();
    Ok(Prefix { bytes, etag, file_size, ranged: false })
}

/// A few bytes of a file, by a Range request.
async fn fetch_range(url: &str, range: Range<u64>) -> Result<Vec<u8>, LoadError> {
    let response = fetch(url, Some(range.clone())).await?;
    let bytes = response_bytes(url, &response).await?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(io_error(url, &format!("asked for bytes {}..{}, got {}", range.start, range.end, bytes.len())));
    }
    Ok(bytes)
}

/// GETs `url` (the bytes of `range` when given), retrying network errors and 5xx/429 answers.
async fn fetch(url: &str, range: Option<Range<u64>>) -> Result<Response, LoadError> {
    let mut attempt = 1;
    loop {
        match fetch_once(url, range.clone()).await {
            Err(Failure::Transient(message)) if attempt < ATTEMPTS => {
                web_sys::console::warn_1(&format!("llama-webgpu: {url}: {message}; retrying").into());
                sleep(500 << attempt).await;
                attempt += 1;
            }
            Err(Failure::Transient(message) | Failure::Final(message)) => return Err(io_error(url, &message)),
            Ok(response) => return Ok(response),
        }
    }
}

enum Failure {
    Transient(String),
    Final(String),
}

async fn fetch_once(url: &str, range: Option<Range<u64>>) -> Result<Response, Failure> {
    let init = RequestInit::new();
    // The Cache API keeps what is worth keeping; the HTTP cache would hold a second copy of the
    // weights (and, with an ETag, revalidate ranges by fetching them again).
    init.set_cache(RequestCache::NoStore);
    if let Some(range) = &range {
        let headers = Headers::new().map_err(|e| Failure::Final(describe(&e)))?;
        let _ = headers.set("range", &format!("bytes={}-{}", range.start, range.end - 1));
        init.set_headers(&headers);
    }
    let request = Request::new_with_str_and_init(url, &init).map_err(|e| Failure::Final(describe(&e)))?;
    let response = JsFuture::from(fetch_request(&request)).await.map_err(|e| Failure::Transient(describe(&e)))?;
    let response: Response = response.dyn_into().map_err(|_| Failure::Final("fetch did not return a Response".into()))?;
    let status = response.status();
    let http = || format!("HTTP {} {}", status, response.status_text());
    match (status, &range) {
        (206, Some(range)) => {
            // The answer may end early (at the end of the file), never start elsewhere.
            let content_range = response.headers().get("content-range").ok().flatten().unwrap_or_default();
            let answered = content_range
                .strip_prefix("bytes ")
                .and_then(|r| r.split('/').next()?.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
            match answered {
                Some((start, last)) if start == range.start && last < range.end => Ok(response),
                _ => Err(Failure::Final(format!(
                    "asked for bytes {}-{}, the server answered Content-Range {content_range:?}",
                    range.start,
                    range.end - 1
                ))),
            }
        }
        // A server that ignores Range sends the whole file; the caller asked for part of it.
        (200, Some(range)) if range.start > 0 => {
            let _ = response.body().map(|b| b.cancel());
            Err(Failure::Final(format!("the server ignored a Range request for bytes {}..{} (answered 200)", range.start, range.end)))
        }
        (200..=299, _) => Ok(response),
        (429 | 500..=599, _) => Err(Failure::Transient(http())),
        _ => Err(Failure::Final(http())),
    }
}

/// Resolves after `milliseconds` (0: the next task).
pub(crate) async fn sleep(milliseconds: i32) {
    let promise = Promise::new(&mut |resolve, _| {
        let _ = set_timeout(&resolve, milliseconds);
    });
    let _ = JsFuture::from(promise).await;
}

async fn fetch_text(url: &str) -> Result<String, LoadError> {
    response_text(url, fetch(url, None).await?).await
}

async fn response_text(url: &str, response: Response) -> Result<String, LoadError> {
    let text = response.text().map_err(|e| io_error(url, &describe(&e)))?;
    let text = JsFuture::from(text).await.map_err(|e| io_error(url, &describe(&e)))?;
    text.as_string().ok_or_else(|| io_error(url, "the body is not text"))
}

async fn response_bytes(url: &str, response: &Response) -> Result<Vec<u8>, LoadError> {
    let buffer = response.array_buffer().map_err(|e| io_error(url, &describe(&e)))?;
    let buffer = JsFuture::from(buffer).await.map_err(|e| io_error(url, &describe(&e)))?;
    Ok(Uint8Array::new(&buffer).to_vec())
}

async fn cached(cache: &Cache, key: &str) -> Option<Response> {
    JsFuture::from(cache.match_with_str(key)).await.ok()?.dyn_into::<Response>().ok()
}

/// Deletes everything cached of the file at `url`: its first bytes and its pieces.
async fn forget_url(cache: &Cache, url: &str) {
    let Ok(keys) = JsFuture::from(cache.keys()).await else { return };
    for request in js_sys::Array::from(&keys).iter().filter_map(|r| r.dyn_into::<Request>().ok()) {
        if request.url().starts_with(url) {
            let _ = JsFuture::from(cache.delete_with_request(&request)).await;
        }
    }
}

async fn open_cache() -> Option<Cache> {
    let caches = Reflect::get(&js_sys::global(), &"caches".into()).ok()?.dyn_into::<CacheStorage>().ok()?;
    JsFuture::from(caches.open(CACHE_NAME)).await.ok()?.dyn_into::<Cache>().ok()
}

/// Bytes the origin may still store (`navigator.storage.estimate()`), where the browser says.
async fn storage_left() -> Option<u64> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let storage = Reflect::get(&navigator, &"storage".into()).ok()?;
    let estimate = Reflect::get(&storage, &"estimate".into()).ok()?.dyn_into::<Function>().ok()?;
    let promise = estimate.call0(&storage).ok()?.dyn_into::<Promise>().ok()?;
    let estimate = JsFuture::from(promise).await.ok()?;
    let number = |key: &str| Reflect::get(&estimate, &key.into()).ok()?.as_f64();
    Some((number("quota")? - number("usage").unwrap_or(0.0)).max(0.0) as u64)
}

/// The cache key of a GGUF range: the file's size and ETag are part of it, so a changed file is
/// not mixed with pieces of the old one.
fn range_key(url: &str, range: &Range<u64>, file_size: u64, etag: Option<&str>) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let version = etag.map_or(String::new(), |etag| format!("&llama-webgpu-etag={}", js_sys::encode_uri_component(etag)));
    format!("{url}{separator}llama-webgpu-bytes={}-{}/{file_size}{version}", range.start, range.end)
}

/// A response's ETag: the Hub's `X-Linked-Etag` (the sha256 of a large file) where it is exposed,
/// else `ETag`, without quotes.
fn response_etag(response: &Response) -> Option<String> {
    let headers = response.headers();
    let etag = headers.get("x-linked-etag").ok().flatten().or_else(|| headers.get("etag").ok().flatten())?;
    Some(hub::unquote_etag(&etag)).filter(|e| !e.is_empty())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn describe_range(piece: &Piece) -> String {
    match &piece.range {
        Some(range) => format!("bytes {}..{}", range.start, range.end),
        None => "the file".into(),
    }
}

/// `name` resolved against `base`.
fn resolve(name: &str, base: &str) -> Result<String, LoadError> {
    web_sys::Url::new_with_base(name, base).map(|u| u.href()).map_err(|e| io_error(name, &describe(&e)))
}

fn io_error(path: &str, message: &str) -> LoadError {
    LoadError::Io { path: path.to_string(), error: std::io::Error::other(message.to_string()) }
}

fn error_name(value: &JsValue) -> String {
    Reflect::get(value, &"name".into()).ok().and_then(|n| n.as_string()).unwrap_or_default()
}

/// A thrown JS value as text (an Error's message, else its string form).
pub(crate) fn describe(value: &JsValue) -> String {
    value
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}
