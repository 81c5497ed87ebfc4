//! The Hugging Face cache on disk, laid out as the Python tools lay it out, so files are shared:
//! `$HF_HUB_CACHE` (default `$HF_HOME/hub`, `~/.cache/huggingface/hub`) holds
//! `models--OWNER--REPO/blobs/<etag>` (the bytes), `snapshots/<commit>/<file>` (links to the blobs)
//! and `refs/<revision>` (the commit a branch pointed to when last asked).

use std::path::{Path, PathBuf};

use super::HubError;

#[derive(Clone, Debug)]
pub struct HubCache {
    root: PathBuf,
}

/// A file in the cache, as `list` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedFile {
    pub repo: String,
    pub file: String,
    pub size: u64,
    pub path: PathBuf,
}

impl HubCache {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`.
    pub fn from_env() -> Self {
        Self::new(std::env::var_os("HF_HUB_CACHE").map_or_else(|| hf_home().join("hub"), PathBuf::from))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join(format!("models--{}", repo.replace('/', "--")))
    }

    pub(super) fn blob_path(&self, repo: &str, etag: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(etag)
    }

    /// The commit `revision` pointed to when last downloaded from.
    pub fn commit(&self, repo: &str, revision: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.repo_dir(repo).join("refs").join(revision)).ok()?;
        Some(text.trim().to_string()).filter(|c| !c.is_empty())
    }

    /// The cached copy of `file` at `revision`, if complete.
    pub fn file(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let path = self.repo_dir(repo).join("snapshots").join(self.commit(repo, revision)?).join(file);
        path.is_file().then_some(path)
    }

    /// The snapshot at `revision` where it holds a whole model folder: config.json and every
    /// safetensors file of its weights.
    pub fn model_folder(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let snapshot = self.repo_dir(repo).join("snapshots").join(self.commit(repo, revision)?);
        let weights = super::model_folder(&self.files(repo, revision))?;
        let shards = match weights {
            super::SAFETENSORS_INDEX => crate::load::index_shards(&std::fs::read_to_string(snapshot.join(weights)).ok()?).ok()?,
            file => vec![file.to_string()],
        };
        shards.iter().all(|shard| snapshot.join(shard).is_file()).then_some(snapshot)
    }

    /// The files cached at `revision`, as repository paths.
    pub fn files(&self, repo: &str, revision: &str) -> Vec<String> {
        let Some(commit) = self.commit(repo, revision) else { return vec![] };
        let snapshot = self.repo_dir(repo).join("snapshots").join(commit);
        let mut files = vec![];
        walk(&snapshot, &mut |path| {
            if let Ok(relative) = path.strip_prefix(&snapshot) {
                files.push(relative.to_string_lossy().replace('\\', "/"));
            }
        });
        files.sort();
        files
    }

    /// Links `snapshots/<commit>/<file>` to the blob `etag` and points `refs/<revision>` at `commit`.
    pub(super) fn link(&self, repo: &str, revision: &str, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        let dir = self.repo_dir(repo);
        let pointer = dir.join("snapshots").join(commit).join(file);
        let parent = pointer.parent().unwrap_or(&dir);
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        // Relative, as huggingface_hub makes them: the cache can move.
        let depth = file.matches('/').count() + 2;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        match std::fs::remove_file(&pointer) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&pointer, e)),
            _ => {}
        }
        link_or_copy(&target, &pointer, &self.blob_path(repo, etag))?;
        let refs = dir.join("refs");
        std::fs::create_dir_all(&refs).map_err(|e| io(&refs, e))?;
        std::fs::write(refs.join(revision), commit).map_err(|e| io(&refs.join(revision), e))?;
        Ok(pointer)
    }

    /// Every complete file of every model repository in the cache, at the commit `main` points to
    /// (else each snapshot's).
    pub fn list(&self) -> Vec<CachedFile> {
        let mut out = vec![];
        let Ok(entries) = std::fs::read_dir(&self.root) else { return out };
        let mut repos: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)))
            .collect();
        repos.sort();
        for repo in repos {
            let snapshots = self.repo_dir(&repo).join("snapshots");
            let main = self.commit(&repo, super::REVISION);
            let commits: Vec<PathBuf> = match &main {
                Some(commit) => vec![snapshots.join(commit)],
                None => std::fs::read_dir(&snapshots).map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect()).unwrap_or_default(),
            };
            let mut files = vec![];
            for snapshot in commits {
                walk(&snapshot, &mut |path| {
                    let (Ok(relative), Ok(metadata)) = (path.strip_prefix(&snapshot), path.metadata()) else { return };
                    files.push(CachedFile { repo: repo.clone(), file: relative.to_string_lossy().replace('\\', "/"), size: metadata.len(), path: path.to_path_buf() });
                });
            }
            files.sort_by(|a, b| a.file.cmp(&b.file));
            out.extend(files);
        }
        out
    }

    /// Deletes `file` from every snapshot of `repo` (the whole repository without `file`), and the
    /// blobs no snapshot links to any more. Returns the bytes freed.
    pub fn remove(&self, repo: &str, file: Option<&str>) -> Result<u64, HubError> {
        let dir = self.repo_dir(repo);
        if !dir.is_dir() {
            return Err(HubError::NotCached { reference: format!("hf:{repo}"), cache: self.root.display().to_string(), why: "nothing to remove".into() });
        }
        let Some(file) = file else {
            let freed = tree_size(&dir.join("blobs"));
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
            return Ok(freed);
        };
        let snapshots = dir.join("snapshots");
        let mut removed = false;
        for snapshot in std::fs::read_dir(&snapshots).map_err(|e| io(&snapshots, e))?.filter_map(|e| Some(e.ok()?.path())) {
            let pointer = snapshot.join(file);
            if pointer.symlink_metadata().is_ok() {
                std::fs::remove_file(&pointer).map_err(|e| io(&pointer, e))?;
                removed = true;
            }
        }
        if !removed {
            return Err(HubError::NotCached { reference: format!("hf:{repo}/{file}"), cache: self.root.display().to_string(), why: "nothing to remove".into() });
        }
        // Blobs still linked from some snapshot stay.
        let mut linked = vec![];
        walk(&snapshots, &mut |path| linked.extend(std::fs::canonicalize(path)));
        let blobs = dir.join("blobs");
        let mut freed = 0;
        for blob in std::fs::read_dir(&blobs).map_err(|e| io(&blobs, e))?.filter_map(|e| Some(e.ok()?.path())) {
            let partial = blob.extension().is_some_and(|e| e == "incomplete");
            if !partial && !linked.iter().any(|l| std::fs::canonicalize(&blob).is_ok_and(|b| &b == l)) {
                freed += blob.metadata().map_or(0, |m| m.len());
                std::fs::remove_file(&blob).map_err(|e| io(&blob, e))?;
            }
        }
        Ok(freed)
    }
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub(super) fn hf_home() -> PathBuf {
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")).map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface")
}

/// Calls `visit` with every file (or link to one) under `dir`.
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, visit);
        } else if path.is_file() {
            visit(&path);
        }
    }
}

fn tree_size(dir: &Path) -> u64 {
    let mut size = 0;
    walk(dir, &mut |path| size += path.metadata().map_or(0, |m| m.len()));
    size
}

/// A symlink where the system allows one (Windows without developer mode does not), else a copy
/// of `blob`, as huggingface_hub falls back.
fn link_or_copy(target: &Path, pointer: &Path, blob: &Path) -> Result<(), HubError> {
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(target, pointer);
    #[cfg(windows)]
    let linked = std::os::windows::fs::symlink_file(target, pointer);
    #[cfg(not(any(unix, windows)))]
    let linked: std::io::Result<()> = Err(std::io::ErrorKind::Unsupported.into());
    match linked {
        Ok(()) => Ok(()),
        Err(_) => std::fs::copy(blob, pointer).map(drop).map_err(|e| io(pointer, e)),
    }
}

pub(super) fn io(path: &Path, source: std::io::Error) -> HubError {
    HubError::Io { path: path.display().to_string(), error: source }
}
