//! Downloads into the Hugging Face cache: a reference is resolved against the repository's listing,
//! its file's ETag (the sha256 of a large file) names the blob, and the bytes stream to
//! `<blob>.incomplete` with Range requests that resume where an earlier attempt stopped. A file is
//! moved into place only after its size and sha256 check out. A repository of safetensors weights
//! (Meta's own) comes down as a model folder: its config and tokenizer files, then its weights, all
//! at the listing's commit. Without the network, files come from the cache.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::cache::{hf_home, io};
use super::{listing_url, model_folder, resolve_url, unquote_etag, FileChoice, HubCache, HubError, HubRef, Listing, ModelRef, DEFAULT_ENDPOINT, FOLDER_FILES, REVISION, SAFETENSORS_INDEX};
use crate::load::{index_shards, read_hf_config, GgufHeader, LoadError};
use crate::Config;

/// The first guess at a GGUF header's size (Llama 3's vocabulary takes ~8 MiB), multiplied by four
/// until the header parses.
const HEADER_GUESS: u64 = 4 << 20;
/// Headers beyond this are refused rather than read into memory.
const MAX_HEADER: u64 = 256 << 20;
/// Bytes read from the network per write to disk.
const CHUNK: usize = 1 << 20;
/// Redirects followed to find a file (the Hub: renamed repositories, then the file host).
const MAX_REDIRECTS: usize = 10;

/// A client for one Hub endpoint and cache, configured as the Python tools are: `HF_ENDPOINT`,
/// `HF_TOKEN` (or the token file under `HF_HOME`), `HF_HUB_CACHE`/`HF_HOME`, `HF_HUB_OFFLINE`.
pub struct HubClient {
    pub endpoint: String,
    token: Option<String>,
    pub cache: HubCache,
    /// Where `http(s)://` URLs are kept.
    pub url_cache: PathBuf,
    /// Answer from the cache only.
    pub offline: bool,
    /// Attempts to resume a download after the connection breaks, with growing pauses.
    pub retries: u32,
    agent: ureq::Agent,
}

/// A model whose weights are about to download: enough to tell whether it will fit.
pub struct Incoming<'a> {
    /// The GGUF file, or the repository of a model folder.
    pub name: &'a str,
    /// The model's shapes. A GGUF's RoPE factors lie past its header, not downloaded yet: factors
    /// of 1 stand in for them (they scale RoPE only).
    pub config: &'a Config,
    pub weights_bytes: u64,
}

/// Called once a model's configuration has downloaded, before its weights: an error stops the
/// download (what arrived stays, to resume from).
pub type FitCheck<'a> = dyn FnMut(&Incoming) -> Result<(), crate::Error> + 'a;
/// Called with the bytes downloaded and the file's size.
pub type Progress<'a> = dyn FnMut(u64, u64) + 'a;

/// A repository file to download: the revision its URL names (a branch, or the listing's commit),
/// and what the listing says of it.
struct RepoFile<'a> {
    name: &'a str,
    revision: &'a str,
    sha256: Option<&'a str>,
    commit: Option<&'a str>,
}

impl<'a> RepoFile<'a> {
    /// A file named by the caller: at the branch's head, nothing known about it yet.
    fn at_head(name: &'a str) -> Self {
        Self { name, revision: REVISION, sha256: None, commit: None }
    }
}

/// What a server says about a file before its bytes are fetched.
struct Remote {
    /// Where the bytes are (after redirects).
    url: String,
    /// The Hub's commit of the revision (`X-Repo-Commit`).
    commit: Option<String>,
    /// The Hub's `X-Linked-Etag`: the sha256 of a large file.
    linked_etag: Option<String>,
    /// The server's `ETag`.
    server_etag: Option<String>,
    size: Option<u64>,
}

impl Remote {
    /// The version of the file: the Hub's ETag, else the server's.
    fn etag(&self) -> Option<&str> {
        self.linked_etag.as_deref().or(self.server_etag.as_deref())
    }
}

/// Why a request failed: worth another try, or not.
enum Failure {
    Transient(HubError),
    Final(crate::Error),
}

impl From<HubError> for Failure {
    fn from(error: HubError) -> Self {
        Failure::Final(error.into())
    }
}

impl HubClient {
    pub fn new(endpoint: &str, token: Option<String>, cache: HubCache, url_cache: PathBuf) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .user_agent(concat!("llama-webgpu/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { endpoint: endpoint.trim_end_matches('/').to_string(), token, cache, url_cache, offline: false, retries: 5, agent }
    }

    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH").map_or_else(|| hf_home().join("token"), PathBuf::from);
            std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let cache_home = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let mut client = Self::new(&endpoint, token, HubCache::from_env(), cache_home.join("llama-webgpu").join("urls"));
        client.offline = var("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        client
    }

    /// The local path of the model `reference` names, downloaded first unless the cache has it.
    pub fn fetch(&self, reference: &ModelRef, check: &mut FitCheck, progress: &mut Progress) -> Result<PathBuf, crate::Error> {
        match reference {
            ModelRef::Hub(r) => self.fetch_hub(r, check, progress),
            ModelRef::Url(url) => self.fetch_url(url, check, progress),
        }
    }

    fn fetch_hub(&self, reference: &HubRef, check: &mut FitCheck, progress: &mut Progress) -> Result<PathBuf, crate::Error> {
        if self.offline {
            return Ok(self.cached(reference, "HF_HUB_OFFLINE is set")?);
        }
        match self.download_hub(reference, check, progress) {
            // Without the network the cache answers, if it can.
            Err(crate::Error::Hub(error @ HubError::Network { .. })) => match self.cached(reference, &error.to_string()) {
                Ok(path) => {
                    log::warn!("{error}; using the cached {}", path.display());
                    Ok(path)
                }
                Err(_) => Err(error.into()),
            },
            other => other,
        }
    }

    fn download_hub(&self, reference: &HubRef, check: &mut FitCheck, progress: &mut Progress) -> Result<PathBuf, crate::Error> {
        let repo = &reference.repo;
        let listing = match &reference.file {
            FileChoice::File(file) => return self.download_file(repo, &RepoFile::at_head(file), Some(check), progress),
            _ => self.listing(repo)?,
        };
        let names = listing.names();
        if let (FileChoice::Default, Some(weights)) = (&reference.file, model_folder(&names)) {
            return self.download_folder(repo, &listing, weights, check, progress);
        }
        let file = reference.pick(&names)?;
        let listed = RepoFile { name: &file, revision: REVISION, sha256: listing.sha256(&file), commit: listing.commit.as_deref() };
        self.download_file(repo, &listed, Some(check), progress)
    }

    /// A model folder's files at the listing's commit: the configuration and tokenizer, then (after
    /// `check`) the weights, `weights` naming them (the shards' index, or the one file).
    fn download_folder(&self, repo: &str, listing: &Listing, weights: &str, check: &mut FitCheck, progress: &mut Progress) -> Result<PathBuf, crate::Error> {
        let listing_url = listing_url(&self.endpoint, repo, REVISION);
        let commit = listing.commit.as_deref().ok_or_else(|| response_error(&listing_url, "the model info has no commit (sha)"))?;
        let at_commit = |name| RepoFile { name, revision: commit, sha256: listing.sha256(name), commit: Some(commit) };
        let small: Vec<&str> = FOLDER_FILES.into_iter().chain([SAFETENSORS_INDEX]).filter(|name| listing.file(name).is_some()).collect();
        let mut snapshot = None;
        for name in small {
            let path = self.download_file(repo, &at_commit(name), None, &mut |_, _| {})?;
            snapshot = path.parent().map(Path::to_path_buf);
        }
        let snapshot = snapshot.ok_or_else(|| response_error(&listing_url, "no config.json"))?;
        let shards = if weights == SAFETENSORS_INDEX {
            let index = snapshot.join(SAFETENSORS_INDEX);
            index_shards(&std::fs::read_to_string(&index).map_err(|e| io(&index, e))?)?
        } else {
            vec![weights.to_string()]
        };
        let mut sizes = vec![];
        for shard in &shards {
            let listed = listing.file(shard).ok_or_else(|| response_error(&listing_url, &format!("{SAFETENSORS_INDEX} lists {shard}, which the repository does not have")))?;
            sizes.push(listed.size.unwrap_or(0));
        }
        let total: u64 = sizes.iter().sum();
        let config = read_hf_config(&snapshot)?;
        check(&Incoming { name: repo, config: &config, weights_bytes: total })?;
        let mut done = 0;
        for (shard, size) in shards.iter().zip(sizes) {
            self.download_file(repo, &at_commit(shard), None, &mut |bytes, _| progress(done + bytes, total))?;
            done += size;
        }
        Ok(snapshot)
    }

    /// Downloads `file` of `repo` into the cache unless it is there, and links it into the snapshot
    /// of its commit. A GGUF file's header is read first, for `check`.
    fn download_file(&self, repo: &str, file: &RepoFile, check: Option<&mut FitCheck>, progress: &mut Progress) -> Result<PathBuf, crate::Error> {
        let name = file.name;
        let url = resolve_url(&self.endpoint, repo, file.revision, name);
        let remote = self.probe(&url, &format!("{repo} has no file {name}"), repo)?;
        let commit = remote.commit.as_deref().or(file.commit).ok_or_else(|| response_error(&url, "no X-Repo-Commit header"))?.to_string();
        let etag = remote.etag().ok_or_else(|| response_error(&url, "no ETag or X-Linked-Etag header"))?.to_string();
        // The Hub names a large file by its sha256; a small one by a git hash, not checked here.
        let sha256 = file.sha256.map(str::to_string).or_else(|| is_sha256(&etag).then(|| etag.clone()));
        let blob = self.cache.blob_path(repo, &etag);
        if !blob.is_file() {
            let partial = with_suffix(&blob, ".incomplete");
            self.download(&remote, name, &partial, sha256.as_deref(), check, progress)?;
            std::fs::rename(&partial, &blob).map_err(|e| io(&blob, e))?;
        }
        Ok(self.cache.link(repo, REVISION, &commit, name, &etag)?)
    }

    fn cached(&self, reference: &HubRef, why: &str) -> Result<PathBuf, HubError> {
        let not_cached = |reference: String| HubError::NotCached { reference, cache: self.cache.root().display().to_string(), why: why.to_string() };
        let files = self.cache.files(&reference.repo, REVISION);
        if let (FileChoice::Default, Some(snapshot)) = (&reference.file, self.cache.model_folder(&reference.repo, REVISION)) {
            return Ok(snapshot);
        }
        let file = reference.pick(&files).map_err(|_| not_cached(format!("hf:{}", reference.repo)))?;
        self.cache.file(&reference.repo, REVISION, &file).ok_or_else(|| not_cached(reference.to_file(&file)))
    }

    /// A URL's file, kept under [`HubClient::url_cache`] by the URL's hash.
    fn fetch_url(&self, url: &str, check: &mut FitCheck, progress: &mut Progress) -> Result<PathBuf, crate::Error> {
        let name = url.split(['?', '#']).next().unwrap_or(url).rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("model.gguf");
        let key = hex(&Sha256::digest(url.as_bytes())[..8]);
        let path = self.url_cache.join(key).join(name);
        if path.is_file() {
            return Ok(path);
        }
        if self.offline {
            let why = "HF_HUB_OFFLINE is set".to_string();
            return Err(HubError::NotCached { reference: url.to_string(), cache: self.url_cache.display().to_string(), why }.into());
        }
        let remote = self.probe(url, "no such file", url)?;
        // Only the Hub's own header is known to be a sha256.
        let sha256 = remote.linked_etag.as_deref().filter(|e| is_sha256(e));
        // One partial download per version of the file.
        let version = remote.etag().map_or("0".into(), |etag| hex(&Sha256::digest(etag.as_bytes())[..4]));
        let partial = with_suffix(&path, &format!(".{version}.incomplete"));
        let parent = path.parent().unwrap_or(&self.url_cache);
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        self.download(&remote, name, &partial, sha256, Some(check), progress)?;
        std::fs::rename(&partial, &path).map_err(|e| io(&path, e))?;
        Ok(path)
    }

    /// The repository's files, with their sha256 where the Hub gives one, and its commit.
    fn listing(&self, repo: &str) -> Result<Listing, HubError> {
        let url = listing_url(&self.endpoint, repo, REVISION);
        let response = self.request("GET", &url).map_err(|e| network_error(&url, &e))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.status_error(&url, status, error_code(&response), repo, &format!("no repository {repo} (a private one needs HF_TOKEN)")));
        }
        let text = response.into_body().read_to_string().map_err(|e| network_error(&url, &e))?;
        Listing::parse(&text).map_err(|e| response_error(&url, &format!("the model info is not the Hub's JSON: {e}")))
    }

    /// HEADs `url` for the file's commit, ETag, size and location, following redirects on its host
    /// (a renamed repository) but not to another: a file host's signed URL may allow GET only.
    fn probe(&self, url: &str, missing: &str, repo: &str) -> Result<Remote, HubError> {
        let mut remote = Remote { url: url.to_string(), commit: None, linked_etag: None, server_etag: None, size: None };
        for _ in 0..MAX_REDIRECTS {
            let response = self.request("HEAD", &remote.url).map_err(|e| network_error(&remote.url, &e))?;
            let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            // The Hub's own headers come with its redirect; the file host's are second choice.
            remote.commit = remote.commit.or(header("x-repo-commit"));
            remote.linked_etag = remote.linked_etag.or(header("x-linked-etag").map(|e| unquote_etag(&e)));
            remote.size = remote.size.or(header("x-linked-size").and_then(|s| s.parse().ok()));
            let status = response.status().as_u16();
            match status {
                200..=299 => {
                    remote.server_etag = header("etag").map(|e| unquote_etag(&e));
                    remote.size = remote.size.or(header("content-length").and_then(|s| s.parse().ok()));
                    return Ok(remote);
                }
                300..=399 => {
                    let location = header("location").ok_or_else(|| response_error(&remote.url, &format!("HTTP {status} without a Location")))?;
                    let elsewhere = location.contains("://");
                    remote.url = join_url(&remote.url, &location);
                    if elsewhere {
                        return Ok(remote);
                    }
                }
                _ => return Err(self.status_error(&remote.url, status, error_code(&response), repo, missing)),
            }
        }
        Err(response_error(url, &format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// Downloads `remote` into `partial`, resuming what is there: where there is a `check`, the GGUF
    /// header first (for it), then the rest; then checks the size and sha256. A file that fails its check is
    /// deleted, so it is never taken for a complete one.
    fn download(&self, remote: &Remote, file: &str, partial: &Path, sha256: Option<&str>, check: Option<&mut FitCheck>, progress: &mut Progress) -> Result<(), crate::Error> {
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(partial).map_err(|e| io(partial, e))?;
        let mut size = remote.size;
        if let Some(check) = check {
            let mut header_end = HEADER_GUESS;
            loop {
                self.append(&remote.url, &mut out, partial, Some(header_end), &mut size, progress)?;
                let total = size.unwrap_or(0);
                let prefix = read_prefix(partial, header_end.min(total))?;
                match GgufHeader::parse(file, &prefix) {
                    Ok(header) => {
                        let ones = header.tensor("rope_freqs.weight").map(|t| 1f32.to_le_bytes().repeat(t.shape.iter().product()));
                        let config = header.config(ones.as_deref())?;
                        check(&Incoming { name: file, config: &config, weights_bytes: total })?;
                        break;
                    }
                    Err(LoadError::Truncated { .. }) if header_end < total && header_end < MAX_HEADER => header_end *= 4,
                    Err(error) => return Err(error.into()),
                }
            }
        }
        self.append(&remote.url, &mut out, partial, None, &mut size, progress)?;
        drop(out);
        let got = partial.metadata().map_err(|e| io(partial, e))?.len();
        if let Some(expected) = size.filter(|&s| s != got) {
            std::fs::remove_file(partial).map_err(|e| io(partial, e))?;
            return Err(response_error(&remote.url, &format!("the download has {got} bytes, the server said {expected}; it was deleted")).into());
        }
        if let Some(expected) = sha256 {
            let actual = file_sha256(partial)?;
            if !actual.eq_ignore_ascii_case(expected) {
                std::fs::remove_file(partial).map_err(|e| io(partial, e))?;
                return Err(HubError::Checksum { file: file.to_string(), expected: expected.to_string(), actual }.into());
            }
        }
        Ok(())
    }

    /// Appends bytes from where `out` ends up to `end` (the whole file without one), retrying
    /// broken connections. Learns the file's size from the answers when `size` is unknown.
    fn append(&self, url: &str, out: &mut File, path: &Path, end: Option<u64>, size: &mut Option<u64>, progress: &mut Progress) -> Result<(), crate::Error> {
        let mut failures = 0;
        loop {
            let start = out.metadata().map_err(|e| io(path, e))?.len();
            if size.is_some_and(|s| start > s) {
                // Not a prefix of this file: start over.
                out.set_len(0).map_err(|e| io(path, e))?;
                continue;
            }
            let end = match (end, *size) {
                (Some(end), Some(size)) => end.min(size),
                (end, size) => end.or(size).unwrap_or(u64::MAX),
            };
            if start >= end {
                return Ok(());
            }
            match self.fetch_range(url, out, path, start, end, size, progress) {
                Ok(0) | Err(Failure::Transient(_)) if failures < self.retries => {
                    failures += 1;
                    std::thread::sleep(Duration::from_millis(250 << failures.min(5)));
                }
                Ok(0) => return Err(response_error(url, &format!("the server sent nothing from byte {start}")).into()),
                Ok(_) => {}
                Err(Failure::Transient(error)) => return Err(error.into()),
                Err(Failure::Final(error)) => return Err(error),
            }
        }
    }

    /// One Range request for bytes `start..end`, appended to `out`; returns the bytes written.
    #[allow(clippy::too_many_arguments)]
    fn fetch_range(&self, url: &str, out: &mut File, path: &Path, start: u64, end: u64, size: &mut Option<u64>, progress: &mut Progress) -> Result<u64, Failure> {
        let range = if end == u64::MAX { format!("bytes={start}-") } else { format!("bytes={start}-{}", end - 1) };
        let mut request = self.agent.get(url).header("Range", &range);
        if let Some(token) = self.token_for(url) {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let response = request.call().map_err(|e| Failure::Transient(network_error(url, &e)))?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        match status {
            206 => {
                let content_range = header("content-range").unwrap_or_default();
                let answered = content_range.strip_prefix("bytes ").and_then(|r| {
                    let (span, total) = r.split_once('/')?;
                    Some((span.split_once('-')?.0.parse::<u64>().ok()?, total.parse::<u64>().ok()))
                });
                match answered {
                    Some((first, total)) if first == start => {
                        if let (Some(known), Some(total)) = (*size, total) {
                            if known != total {
                                let message = format!("the file changed size during the download ({known} -> {total} bytes); run the command again");
                                return Err(response_error(url, &message).into());
                            }
                        }
                        *size = size.or(total);
                    }
                    _ => return Err(response_error(url, &format!("asked for {range}, the server answered Content-Range {content_range:?}")).into()),
                }
            }
            // The server ignores Range: the whole file comes again.
            200 => {
                if start > 0 {
                    log::warn!("{url}: the server ignores Range requests, so the download starts over");
                    out.set_len(0).map_err(|e| io(path, e))?;
                }
                *size = size.or(header("content-length").and_then(|s| s.parse().ok()));
            }
            416 if *size == Some(start) => return Ok(0),
            429 | 500..=599 => return Err(Failure::Transient(HubError::Http { url: url.to_string(), status })),
            _ => return Err(self.status_error(url, status, header("x-error-code"), url, "the file is gone").into()),
        }
        let from = if status == 200 { 0 } else { start };
        let total = size.unwrap_or(0);
        let mut body = response.into_body().into_reader();
        let mut buffer = vec![0; CHUNK];
        let mut written = 0u64;
        loop {
            let n = match body.read(&mut buffer) {
                Ok(0) => return Ok(written),
                Ok(n) => n,
                Err(e) => {
                    let message = format!("the connection broke after {} bytes: {e}", from + written);
                    return Err(Failure::Transient(HubError::Network { url: url.to_string(), message }));
                }
            };
            if let Err(e) = out.write_all(&buffer[..n]) {
                let needed = total.saturating_sub(from + written);
                return Err(match e.kind() {
                    std::io::ErrorKind::StorageFull => HubError::DiskFull { path: path.display().to_string(), needed },
                    _ => io(path, e),
                }
                .into());
            }
            written += n as u64;
            progress(from + written, total);
        }
    }

    /// HEAD or GET without following redirects, with the token where the URL is the endpoint's.
    fn request(&self, method: &str, url: &str) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        if let Some(token) = self.token_for(url) {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        self.agent.run(request.body(())?)
    }

    /// The token goes to the Hub only, never to the host a file redirects to.
    fn token_for(&self, url: &str) -> Option<&str> {
        self.token.as_deref().filter(|_| url.starts_with(&format!("{}/", self.endpoint)))
    }

    fn status_error(&self, url: &str, status: u16, code: Option<String>, repo: &str, missing: &str) -> HubError {
        let url = url.to_string();
        let page = format!("{}/{repo}", self.endpoint);
        match (status, code.as_deref()) {
            (_, Some("RepoNotFound")) => HubError::NotFound { url, what: format!("no repository {repo} (a private one needs HF_TOKEN)") },
            (404, _) | (_, Some("EntryNotFound" | "RevisionNotFound")) => HubError::NotFound { url, what: missing.to_string() },
            (401 | 403, _) if self.token.is_none() => HubError::NeedsToken { url, repo: repo.to_string(), page, status },
            (401 | 403, _) => HubError::TokenRefused { url, page, status },
            _ => HubError::Http { url, status },
        }
    }
}

fn error_code(response: &ureq::http::Response<ureq::Body>) -> Option<String> {
    response.headers().get("x-error-code").and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn network_error(url: &str, error: &ureq::Error) -> HubError {
    HubError::Network { url: url.to_string(), message: error.to_string() }
}

fn response_error(url: &str, message: &str) -> HubError {
    HubError::Response { url: url.to_string(), message: message.to_string() }
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `location` (absolute, or a path on `url`'s host) as an absolute URL.
fn join_url(url: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = url.find("://").map_or(0, |i| i + 3);
    let host_end = url[origin_end..].find('/').map_or(url.len(), |i| origin_end + i);
    format!("{}/{}", &url[..host_end], location.trim_start_matches('/'))
}

/// The first `len` bytes of `path` (fewer where it is shorter).
fn read_prefix(path: &Path, len: u64) -> Result<Vec<u8>, HubError> {
    let mut bytes = vec![];
    File::open(path).and_then(|f| f.take(len).read_to_end(&mut bytes)).map_err(|e| io(path, e))?;
    Ok(bytes)
}

fn file_sha256(path: &Path) -> Result<String, HubError> {
    let mut file = File::open(path).map_err(|e| io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        match file.read(&mut buffer).map_err(|e| io(path, e))? {
            0 => break,
            n => hasher.update(&buffer[..n]),
        }
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_join_and_etags_unquote() {
        assert_eq!(join_url("http://h:1/a/resolve/main/x", "/files/y"), "http://h:1/files/y");
        assert_eq!(join_url("http://h:1/a", "https://cdn/x?s=1"), "https://cdn/x?s=1");
        assert_eq!(unquote_etag("W/\"abc\""), "abc");
    }
}
