//! Models by name: Hugging Face Hub references (`hf:OWNER/REPO:QUANT`, `hf:OWNER/REPO/FILE.gguf`)
//! and plain URLs, and a catalog of Llama GGUF files on the Hub. Natively files are downloaded
//! into the Hugging Face cache ([`HubClient`]); the browser reads the same references by Range.

mod catalog;
#[cfg(not(target_arch = "wasm32"))]
mod cache;
#[cfg(not(target_arch = "wasm32"))]
mod download;

pub use catalog::{catalog, CatalogEntry};
#[cfg(not(target_arch = "wasm32"))]
pub use cache::{CachedFile, HubCache};
#[cfg(not(target_arch = "wasm32"))]
pub use download::{HubClient, Incoming};

/// The Hub, unless `HF_ENDPOINT` names another (a mirror, or a test server).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The only revision references name for now: the Hub's default branch.
pub const REVISION: &str = "main";
/// The quant llama.cpp picks when a reference names none.
const DEFAULT_QUANT: &str = "Q4_K_M";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{text:?} is not a model reference: {reason} (expected hf:OWNER/REPO:QUANT, hf:OWNER/REPO/FILE.gguf or an https:// URL)")]
    Reference { text: String, reason: &'static str },
    #[error("{repo} has no GGUF file of quant {quant}; its quants: {available}")]
    NoSuchQuant { repo: String, quant: String, available: String },
    #[error("{repo} has several GGUF files of quant {quant} ({files}): name one as hf:{repo}/FILE")]
    AmbiguousQuant { repo: String, quant: String, files: String },
    #[error("{repo} has no {DEFAULT_QUANT} GGUF file: choose a quant as hf:{repo}:QUANT (its quants: {available})")]
    NoDefaultQuant { repo: String, available: String },
    #[error("{repo} holds a model folder of safetensors weights, not GGUF files: natively, name it without a quant or file (hf:{repo}) to download the folder; the browser reads GGUF files only (choose a GGUF repository, or convert the folder with `llama-webgpu convert`)")]
    NotGguf { repo: String },
    #[error("{repo}: {file} is one part of a split GGUF, which is not supported; choose a quant that comes in one file")]
    SplitGguf { repo: String, file: String },
    #[error("{url}: {repo} is gated or private (HTTP {status}): log in on the Hub, accept the model's license at {page}, create an access token with read permission and set HF_TOKEN to it")]
    NeedsToken { url: String, repo: String, page: String, status: u16 },
    #[error("{url}: the Hub refused the token (HTTP {status}): for a gated model, accept its license at {page} with the token's account and wait until access is granted; check that HF_TOKEN is valid and, for a fine-grained token, that it may read gated repositories")]
    TokenRefused { url: String, page: String, status: u16 },
    #[error("{url}: not found (HTTP 404): {what}")]
    NotFound { url: String, what: String },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: {message}")]
    Network { url: String, message: String },
    #[error("{url}: unexpected answer: {message}")]
    Response { url: String, message: String },
    #[error("{file}: the download's sha256 is {actual}, the Hub gives {expected}; the bad copy was deleted, so running the command again downloads it anew")]
    Checksum { file: String, expected: String, actual: String },
    #[error("{path}: the disk is full (the download needs {needed} more bytes): free some space, or set HF_HOME (or HF_HUB_CACHE) to a folder on a larger disk")]
    DiskFull { path: String, needed: u64 },
    // The I/O error in the message, not as a source(): a chain printed whole would say it twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{reference} is not in the cache ({cache}) and the Hub cannot be asked: {why}")]
    NotCached { reference: String, cache: String, why: String },
}

/// A model named by where it lives.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelRef {
    Hub(HubRef),
    /// An `http(s)://` URL of a GGUF file.
    Url(String),
}

/// A file in a Hub model repository.
#[derive(Clone, Debug, PartialEq)]
pub struct HubRef {
    /// `OWNER/REPO`.
    pub repo: String,
    pub file: FileChoice,
}

/// Which of a repository's files a reference means.
#[derive(Clone, Debug, PartialEq)]
pub enum FileChoice {
    /// A path in the repository.
    File(String),
    /// The one GGUF file whose name ends in this quant (`Q4_0`, `Q4_K_M`), in any letter case.
    Quant(String),
    /// [`DEFAULT_QUANT`], or the repository's only GGUF file.
    Default,
}

impl ModelRef {
    /// Whether `text` names a remote model rather than a path on this machine.
    pub fn is_remote(text: &str) -> bool {
        text.starts_with("hf:") || text.starts_with("https://") || text.starts_with("http://")
    }

    pub fn parse(text: &str) -> Result<Self, HubError> {
        let invalid = |reason| HubError::Reference { text: text.to_string(), reason };
        if text.starts_with("https://") || text.starts_with("http://") {
            return Ok(ModelRef::Url(text.to_string()));
        }
        let rest = text.strip_prefix("hf:").ok_or_else(|| invalid("it starts with neither hf: nor http(s)://"))?;
        let (path, quant) = match rest.split_once(':') {
            Some((path, quant)) => (path, Some(quant)),
            None => (rest, None),
        };
        let mut parts = path.splitn(3, '/');
        let (Some(owner), Some(name)) = (parts.next(), parts.next()) else { return Err(invalid("no OWNER/REPO")) };
        let file = parts.next();
        let name_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.');
        if !name_ok(owner) || !name_ok(name) {
            return Err(invalid("OWNER and REPO are letters, digits, '-', '_' and '.'"));
        }
        let file = match (file, quant) {
            (Some(_), Some(_)) => return Err(invalid("it names both a file and a quant")),
            (Some(file), None) => {
                if file.is_empty() || file.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
                    return Err(invalid("the file path is empty or has empty, '.' or '..' parts"));
                }
                FileChoice::File(file.to_string())
            }
            (None, Some(quant)) if quant.is_empty() || !quant.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                return Err(invalid("a quant is letters, digits and '_', e.g. Q4_K_M"));
            }
            (None, Some(quant)) => FileChoice::Quant(quant.to_string()),
            (None, None) => FileChoice::Default,
        };
        Ok(ModelRef::Hub(HubRef { repo: format!("{owner}/{name}"), file }))
    }
}

impl HubRef {
    /// The reference to `file` in this repository, as `list` prints it.
    pub fn to_file(&self, file: &str) -> String {
        format!("hf:{}/{file}", self.repo)
    }

    /// The repository file this reference means among `files` (the repository's listing).
    pub fn pick(&self, files: &[String]) -> Result<String, HubError> {
        let ggufs: Vec<&String> = files.iter().filter(|f| f.to_ascii_lowercase().ends_with(".gguf")).collect();
        let available = || {
            let mut quants: Vec<&str> = ggufs.iter().map(|f| quant_of(f)).collect();
            quants.sort_unstable();
            quants.dedup();
            if quants.is_empty() { "none: it has no GGUF files".to_string() } else { quants.join(", ") }
        };
        let with_quant = |quant: &str| -> Vec<&String> { ggufs.iter().copied().filter(|f| quant_of(f).eq_ignore_ascii_case(quant)).collect() };
        let candidates = match &self.file {
            FileChoice::File(file) => return Ok(file.clone()),
            FileChoice::Quant(quant) => with_quant(quant),
            FileChoice::Default => match with_quant(DEFAULT_QUANT) {
                default if default.is_empty() && ggufs.len() == 1 => ggufs.clone(),
                default => default,
            },
        };
        if model_folder(files).is_some() {
            return Err(HubError::NotGguf { repo: self.repo.clone() });
        }
        if let Some(part) = candidates.iter().find(|f| split_stem(f).is_some()) {
            return Err(HubError::SplitGguf { repo: self.repo.clone(), file: part.to_string() });
        }
        match (candidates.as_slice(), &self.file) {
            ([file], _) => Ok((*file).clone()),
            ([], FileChoice::Quant(quant)) => Err(HubError::NoSuchQuant { repo: self.repo.clone(), quant: quant.clone(), available: available() }),
            (many, FileChoice::Quant(quant)) => Err(HubError::AmbiguousQuant { repo: self.repo.clone(), quant: quant.clone(), files: join(many) }),
            _ => Err(HubError::NoDefaultQuant { repo: self.repo.clone(), available: available() }),
        }
    }
}

/// The Hub's URL of a repository file at `revision`: the web loader reads it by Range, the native
/// client downloads it.
pub fn resolve_url(endpoint: &str, repo: &str, revision: &str, file: &str) -> String {
    format!("{}/{repo}/resolve/{revision}/{file}", endpoint.trim_end_matches('/'))
}

/// An ETag header's value without its quotes and weak mark: `W/"abc"` -> `abc`.
pub fn unquote_etag(etag: &str) -> String {
    etag.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// The Hub's model-info API for a repository at `revision`, with each file's sha256 (`blobs`).
pub fn listing_url(endpoint: &str, repo: &str, revision: &str) -> String {
    format!("{}/api/models/{repo}/revision/{revision}?blobs=true", endpoint.trim_end_matches('/'))
}

/// A repository's files as the model-info API lists them.
#[derive(Clone, Debug, PartialEq)]
pub struct Listing {
    /// The commit the revision points to.
    pub commit: Option<String>,
    pub files: Vec<ListedFile>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListedFile {
    /// The path in the repository.
    pub name: String,
    /// A large (LFS) file's sha256.
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

impl Listing {
    pub fn parse(json: &str) -> Result<Self, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Info {
            sha: Option<String>,
            #[serde(default)]
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
            size: Option<u64>,
            lfs: Option<Lfs>,
        }
        #[derive(serde::Deserialize)]
        struct Lfs {
            sha256: Option<String>,
            size: Option<u64>,
        }
        let info: Info = serde_json::from_str(json)?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| {
                let (sha256, lfs_size) = s.lfs.map_or((None, None), |l| (l.sha256, l.size));
                ListedFile { name: s.rfilename, sha256, size: s.size.or(lfs_size) }
            })
            .collect();
        Ok(Self { commit: info.sha, files })
    }

    pub fn names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }

    pub fn file(&self, name: &str) -> Option<&ListedFile> {
        self.files.iter().find(|f| f.name == name)
    }

    pub fn sha256(&self, name: &str) -> Option<&str> {
        self.file(name).and_then(|f| f.sha256.as_deref())
    }
}

/// The files of a Hugging Face model folder the engine reads besides the weights; those present are
/// downloaded (Meta's repositories also hold `original/` checkpoints and other files, which are not).
pub const FOLDER_FILES: [&str; 5] = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];
/// A sharded folder's list of its weight files.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// An unsharded folder's weights.
pub const SAFETENSORS_FILE: &str = "model.safetensors";

/// Where the repository `files` are a Hugging Face model folder (a config.json beside safetensors
/// weights, at the top level, and no GGUF file, which would be taken instead), the file naming its
/// weights: the index of its shards, or the one safetensors file.
pub fn model_folder(files: &[String]) -> Option<&'static str> {
    let has = |name: &str| files.iter().any(|f| f == name);
    if !has("config.json") || files.iter().any(|f| f.to_ascii_lowercase().ends_with(".gguf")) {
        return None;
    }
    [SAFETENSORS_INDEX, SAFETENSORS_FILE].into_iter().find(|name| has(name))
}

/// A GGUF file's quant as its name ends: `Llama-3.2-1B-Instruct-Q4_K_M.gguf` -> `Q4_K_M` (also for
/// the parts of a split file, `...-Q8_0-00001-of-00002.gguf`).
pub fn quant_of(file: &str) -> &str {
    let name = file.rsplit('/').next().unwrap_or(file);
    let stem = if name.to_ascii_lowercase().ends_with(".gguf") { &name[..name.len() - ".gguf".len()] } else { name };
    let stem = split_stem(stem).unwrap_or(stem);
    stem.rsplit(['-', '.']).next().unwrap_or(stem)
}

/// The name before `-00001-of-00003`, where `name` is a part of a file llama.cpp's gguf-split cut up.
fn split_stem(name: &str) -> Option<&str> {
    let name = name.strip_suffix(".gguf").unwrap_or(name);
    let mut parts = name.rsplitn(4, '-');
    let digits = |s: Option<&str>| s.is_some_and(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()));
    let (total, of, part, stem) = (parts.next(), parts.next(), parts.next(), parts.next());
    (digits(total) && of == Some("of") && digits(part)).then_some(stem).flatten()
}

fn join(files: &[&String]) -> String {
    files.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let hub = |repo: &str, file| ModelRef::Hub(HubRef { repo: repo.into(), file });
        assert_eq!(ModelRef::parse("hf:bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_0").unwrap(), hub("bartowski/Llama-3.2-1B-Instruct-GGUF", FileChoice::Quant("Q4_0".into())));
        assert_eq!(ModelRef::parse("hf:a/b/sub/x.gguf").unwrap(), hub("a/b", FileChoice::File("sub/x.gguf".into())));
        assert_eq!(ModelRef::parse("hf:a/b").unwrap(), hub("a/b", FileChoice::Default));
        assert_eq!(ModelRef::parse("https://example.org/x.gguf").unwrap(), ModelRef::Url("https://example.org/x.gguf".into()));
        for bad in ["hf:a", "hf:/b", "hf:a/b:", "hf:a/b/x.gguf:Q4_0", "hf:a/b/../x.gguf", "hf:a/b:Q4 0", "hf:a b/c", "a/b"] {
            assert!(matches!(ModelRef::parse(bad), Err(HubError::Reference { .. })), "{bad}");
        }
    }

    #[test]
    fn quants_pick_one_file() {
        let files: Vec<String> = ["README.md", "L-Q4_0.gguf", "L-Q4_0_4_4.gguf", "L-Q4_K_M.gguf", "L.Q8_0.gguf", "L-f16-00001-of-00002.gguf"].map(String::from).into();
        let pick = |text: &str| match ModelRef::parse(text).unwrap() {
            ModelRef::Hub(r) => r.pick(&files),
            ModelRef::Url(_) => unreachable!(),
        };
        assert_eq!(pick("hf:a/b:q4_0").unwrap(), "L-Q4_0.gguf");
        assert_eq!(pick("hf:a/b:Q8_0").unwrap(), "L.Q8_0.gguf");
        assert_eq!(pick("hf:a/b").unwrap(), "L-Q4_K_M.gguf");
        assert!(matches!(pick("hf:a/b:Q5_K_M"), Err(HubError::NoSuchQuant { .. })));
        assert!(matches!(pick("hf:a/b:F16"), Err(HubError::SplitGguf { .. })));
        assert!(matches!(pick("hf:a/b:Q4"), Err(HubError::NoSuchQuant { .. })));
    }

    #[test]
    fn a_model_folder_is_config_and_safetensors_without_gguf_files() {
        let files = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let sharded = files(&["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "original/params.json"]);
        assert_eq!(model_folder(&sharded), Some(SAFETENSORS_INDEX));
        assert_eq!(model_folder(&files(&["config.json", "model.safetensors"])), Some(SAFETENSORS_FILE));
        assert_eq!(model_folder(&files(&["config.json", "model.safetensors", "m-Q4_0.gguf"])), None, "GGUF files win");
        assert_eq!(model_folder(&files(&["model.safetensors"])), None, "no config.json");
        let reference = HubRef { repo: "a/b".into(), file: FileChoice::Quant("Q4_0".into()) };
        assert!(matches!(reference.pick(&sharded), Err(HubError::NotGguf { .. })));
    }
}
