//! Models by name against a local server that answers as the Hugging Face Hub does: the model-info
//! API listing a repository's files, resolve URLs that redirect to a file host with the file's
//! sha256 as `X-Linked-Etag`, Range requests, 401 for a gated repository without a token, 404s with
//! the Hub's error codes. The served file is the tiny Llama 3.1 fixture converted to GGUF; the
//! fixtures' own folders (config, safetensors) are served as repositories of model folders.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::gguf_writer::convert_to_gguf;
use common::{fixture, fixture_with_tokenizer, golden, gpu};
use llama_webgpu::hub::{HubCache, HubClient, HubError, ModelRef};
use llama_webgpu::load::{open_safetensors_dir, read_hf_config};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "test/tiny-llama31-GGUF";
const FILE: &str = "tiny-llama31-F32.gguf";
const GATED: &str = "meta/gated-GGUF";
const TOKEN: &str = "hf_secret";

struct Served {
    bytes: Arc<Vec<u8>>,
    /// What the Hub says the sha256 is (wrong to test the check).
    sha256: String,
}

#[derive(Default)]
struct State {
    /// Repository -> file name -> the file.
    repos: HashMap<String, HashMap<String, Arc<Served>>>,
    /// Bytes of file bodies sent.
    served: u64,
    /// The Range headers of file requests, in order.
    ranges: Vec<String>,
    /// Drops the next file download's connection after this many bytes.
    drop_after: Option<u64>,
    /// The revision each resolve request named, with its file.
    resolved: Vec<(String, String)>,
}

/// The server, on a thread per connection; it lives as long as the test.
struct FakeHub {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || answer(stream, address, &state));
            }
        });
        let hub = Self { address, state };
        hub.add(REPO, FILE, tiny_gguf(), None);
        hub.add(REPO, "README.md", b"# tiny".to_vec(), None);
        hub.add(GATED, "gated-Q4_0.gguf", tiny_gguf(), None);
        hub
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Serves `bytes` as `repo`'s `file`, advertised with `sha256` (its own when None).
    fn add(&self, repo: &str, file: &str, bytes: Vec<u8>, sha256: Option<&str>) {
        let sha256 = sha256.map_or_else(|| hex(&Sha256::digest(&bytes)), str::to_string);
        let served = Arc::new(Served { bytes: Arc::new(bytes), sha256 });
        self.state.lock().unwrap().repos.entry(repo.to_string()).or_default().insert(file.to_string(), served);
    }

    fn served(&self) -> u64 {
        self.state.lock().unwrap().served
    }

    fn ranges(&self) -> Vec<String> {
        self.state.lock().unwrap().ranges.clone()
    }

    fn resolved(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().resolved.clone()
    }

    /// Serves the files of the model folder `dir`, and `others`, as `repo`.
    fn add_folder(&self, repo: &str, dir: &Path, others: &[(&str, Vec<u8>)]) -> Vec<String> {
        let mut files = vec![];
        for entry in std::fs::read_dir(dir).unwrap() {
            let file = entry.unwrap().file_name().into_string().unwrap();
            if file != "golden.json" {
                self.add(repo, &file, std::fs::read(dir.join(&file)).unwrap(), None);
                files.push(file);
            }
        }
        for (file, bytes) in others {
            self.add(repo, file, bytes.clone(), None);
        }
        files.sort();
        files
    }

    fn drop_after(&self, bytes: u64) {
        self.state.lock().unwrap().drop_after = Some(bytes);
    }

    fn client(&self, cache: &Path, token: Option<&str>) -> HubClient {
        HubClient::new(&self.endpoint(), token.map(str::to_string), HubCache::new(cache.join("hub")), cache.join("urls"))
    }
}

fn answer(mut stream: TcpStream, address: SocketAddr, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let authorized = headers.get("authorization").is_some_and(|a| a == &format!("Bearer {TOKEN}"));
    let respond = |stream: &mut TcpStream, status: &str, extra: &[(&str, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for (name, value) in extra {
            head += &format!("{name}: {value}\r\n");
        }
        let _ = stream.write_all(format!("{head}\r\n").as_bytes());
        if method != "HEAD" {
            let _ = stream.write_all(body);
        }
    };
    let error = |stream: &mut TcpStream, status: &str, code: &str| respond(stream, status, &[("X-Error-Code", code.to_string())], code.as_bytes());

    // The file host: /files/<sha256>, with Range.
    if let Some(sha) = path.strip_prefix("/files/") {
        let file = state.lock().unwrap().repos.values().flat_map(|r| r.values()).find(|f| f.sha256 == sha).cloned();
        let Some(file) = file else { return error(&mut stream, "404 Not Found", "NoSuchKey") };
        let size = file.bytes.len() as u64;
        let range = headers.get("range").cloned();
        let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
            Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().map_or(size, |b| (b + 1).min(size))),
            None => (0, size),
        };
        let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nAccept-Ranges: bytes\r\nETag: \"{sha}\"\r\nContent-Length: {}\r\n", end - start);
        if range.is_some() {
            head += &format!("Content-Range: bytes {start}-{}/{size}\r\n", end - 1);
        }
        let _ = stream.write_all(format!("{head}\r\n").as_bytes());
        if method == "HEAD" {
            return;
        }
        let limit = {
            let mut state = state.lock().unwrap();
            state.ranges.push(range.unwrap_or_default());
            state.drop_after.take()
        };
        let body = &file.bytes[start as usize..end as usize];
        let body = &body[..limit.map_or(body.len(), |l| (l as usize).min(body.len()))];
        for chunk in body.chunks(64 << 10) {
            // Counted before it is sent: once sent, the client may ask for the count first.
            state.lock().unwrap().served += chunk.len() as u64;
            if stream.write_all(chunk).is_err() {
                return;
            }
        }
        // A dropped connection ends here, short of Content-Length.
        let _ = stream.flush();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }

    // The Hub: /api/models/OWNER/REPO/revision/main and /OWNER/REPO/resolve/(main|COMMIT)/FILE.
    let (repo, rest) = match path.strip_prefix("/api/models/") {
        Some(rest) => match rest.split('/').collect::<Vec<_>>().as_slice() {
            [owner, name, "revision", "main"] | [owner, name] => (format!("{owner}/{name}"), None),
            _ => return error(&mut stream, "404 Not Found", "RepoNotFound"),
        },
        None => match path.trim_start_matches('/').splitn(5, '/').collect::<Vec<_>>().as_slice() {
            [owner, name, "resolve", revision @ ("main" | COMMIT), file] => {
                state.lock().unwrap().resolved.push((revision.to_string(), file.to_string()));
                (format!("{owner}/{name}"), Some(file.to_string()))
            }
            _ => return error(&mut stream, "404 Not Found", "RepoNotFound"),
        },
    };
    let files = state.lock().unwrap().repos.get(&repo).cloned();
    let Some(files) = files else { return error(&mut stream, "404 Not Found", "RepoNotFound") };
    if repo == GATED && !authorized {
        let status = if headers.contains_key("authorization") { "403 Forbidden" } else { "401 Unauthorized" };
        return error(&mut stream, status, "GatedRepo");
    }
    match rest {
        None => {
            let siblings: Vec<serde_json::Value> = files
                .iter()
                .map(|(name, f)| serde_json::json!({"rfilename": name, "size": f.bytes.len(), "lfs": {"sha256": f.sha256, "size": f.bytes.len()}}))
                .collect();
            let body = serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings}).to_string();
            respond(&mut stream, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
        }
        Some(file) => {
            let Some(f) = files.get(&file) else { return error(&mut stream, "404 Not Found", "EntryNotFound") };
            let headers = [
                ("Location", format!("http://{address}/files/{}", f.sha256)),
                ("X-Repo-Commit", COMMIT.to_string()),
                ("X-Linked-Etag", format!("\"{}\"", f.sha256)),
                ("X-Linked-Size", f.bytes.len().to_string()),
            ];
            respond(&mut stream, "302 Found", &headers, b"");
        }
    }
}

/// The tiny Llama 3.1 fixture as a GGUF file (f32, ~3 MB), made once.
fn tiny_gguf() -> Vec<u8> {
    static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = fixture("tiny-llama31");
        convert_to_gguf(&read_hf_config(&dir).unwrap(), &open_safetensors_dir(&dir).unwrap())
    })
    .clone()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama-webgpu-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fetch(client: &HubClient, reference: &str) -> Result<PathBuf, llama_webgpu::Error> {
    client.fetch(&ModelRef::parse(reference).unwrap(), &mut |_| Ok(()), &mut |_, _| {})
}

/// The binary with the cache at `home` and the Hub at `endpoint`.
fn cli(home: &Path, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llama-webgpu"));
    command.args(args).env("HF_HOME", home).env("HF_ENDPOINT", endpoint).env("XDG_CACHE_HOME", home).env_remove("HF_TOKEN").env_remove("HF_HUB_OFFLINE").env_remove("HF_HUB_CACHE");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// The model id `serve` announces for `model` (offline, from the cache), the server stopped then.
fn served_model_id(home: &Path, model: &str) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llama-webgpu"));
    command.args(["serve", "--model", model, "--port", "0"]).env("HF_HOME", home).env("HF_HUB_OFFLINE", "1").env_remove("HF_HUB_CACHE");
    let mut child = command.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let announced = lines.map_while(Result::ok).find_map(|line| line.split_once("serving ").and_then(|(_, rest)| rest.split_once(" on http")).map(|(id, _)| id.to_string()));
    child.kill().unwrap();
    child.wait().unwrap();
    announced.expect("serve announces its model")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn pull_fills_the_hugging_face_cache_then_list_and_rm() {
    let hub = FakeHub::start();
    let home = temp_dir("pull");
    let pulled = cli(&home, &hub.endpoint(), &["pull", &format!("hf:{REPO}:f32")], &[]);
    let path = PathBuf::from(stdout(&pulled).trim());
    let repo_dir = home.join("hub/models--test--tiny-llama31-GGUF");
    let sha = hex(&Sha256::digest(tiny_gguf()));
    // The Python tools' layout: the bytes in blobs/<sha256>, a relative link in snapshots/<commit>.
    assert_eq!(path, repo_dir.join("snapshots").join(COMMIT).join(FILE));
    assert_eq!(std::fs::read_link(&path).unwrap(), Path::new("../../blobs").join(&sha));
    assert_eq!(std::fs::read(&path).unwrap(), tiny_gguf());
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(hub.served(), tiny_gguf().len() as u64);
    if gpu().is_some() {
        // Before the weights: what the model will take on the GPU.
        let stderr = String::from_utf8_lossy(&pulled.stderr);
        assert!(stderr.contains(&format!("{FILE}: about ")) && stderr.contains("of GPU memory"), "{stderr}");
    }

    // Cached: asked about, not fetched again.
    assert_eq!(PathBuf::from(stdout(&cli(&home, &hub.endpoint(), &["pull", &format!("hf:{REPO}/{FILE}"), "-q"], &[])).trim()), path);
    assert_eq!(hub.served(), tiny_gguf().len() as u64);

    let listed = stdout(&cli(&home, &hub.endpoint(), &["list"], &[]));
    assert!(listed.starts_with(&format!("hf:{REPO}/{FILE}\t")), "{listed}");
    let removed = stdout(&cli(&home, &hub.endpoint(), &["rm", &format!("hf:{REPO}:F32")], &[]));
    assert!(removed.starts_with(&format!("removed hf:{REPO}:F32")), "{removed}");
    assert_eq!(stdout(&cli(&home, &hub.endpoint(), &["list"], &[])), "");
    assert!(!repo_dir.join("blobs").join(&sha).exists());
    let again = cli(&home, &hub.endpoint(), &["rm", &format!("hf:{REPO}/{FILE}")], &[]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("is not in the cache"));
}

#[test]
fn an_interrupted_download_resumes_without_fetching_bytes_again() {
    let hub = FakeHub::start();
    let home = temp_dir("resume");
    let size = tiny_gguf().len() as u64;
    let half = size / 2;
    let mut client = hub.client(&home, None);
    client.retries = 0;
    hub.drop_after(half);
    let error = fetch(&client, &format!("hf:{REPO}:F32")).unwrap_err();
    assert!(matches!(error, llama_webgpu::Error::Hub(HubError::Network { .. })), "{error}");
    let sha = hex(&Sha256::digest(tiny_gguf()));
    let blobs = home.join("hub/models--test--tiny-llama31-GGUF/blobs");
    assert_eq!(std::fs::metadata(blobs.join(format!("{sha}.incomplete"))).unwrap().len(), half);
    assert!(!blobs.join(&sha).exists() && client.cache.list().is_empty(), "a partial file is not a cached one");

    let path = fetch(&client, &format!("hf:{REPO}:F32")).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), tiny_gguf());
    assert_eq!(hub.served(), size, "bytes served over both attempts");
    assert_eq!(hub.ranges().last().unwrap(), &format!("bytes={half}-{}", size.min(4 << 20) - 1));

    // Within one call, a broken connection is resumed at once.
    let home = temp_dir("retry");
    let mut client = hub.client(&home, None);
    client.retries = 2;
    hub.drop_after(size / 3);
    let path = fetch(&client, &format!("hf:{REPO}/{FILE}")).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), tiny_gguf());
    assert_eq!(hub.served(), 2 * size);
}

#[test]
fn a_file_whose_sha256_differs_from_the_hubs_is_refused_and_deleted() {
    let hub = FakeHub::start();
    hub.add("test/corrupt-GGUF", "corrupt-Q8_0.gguf", tiny_gguf(), Some(&"ab".repeat(32)));
    let home = temp_dir("sha");
    let client = hub.client(&home, None);
    let error = fetch(&client, "hf:test/corrupt-GGUF:Q8_0").unwrap_err();
    assert!(matches!(&error, llama_webgpu::Error::Hub(HubError::Checksum { expected, .. }) if *expected == "ab".repeat(32)), "{error}");
    assert!(error.to_string().contains("deleted"), "{error}");
    let blobs = home.join("hub/models--test--corrupt-GGUF/blobs");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0, "nothing left in {}", blobs.display());
    assert!(client.cache.list().is_empty());
}

#[test]
fn gated_and_missing_models_say_what_to_do() {
    let hub = FakeHub::start();
    let home = temp_dir("errors");
    let message = |client: &HubClient, reference: &str| fetch(client, reference).unwrap_err().to_string();

    let anonymous = hub.client(&home, None);
    let gated = message(&anonymous, &format!("hf:{GATED}:Q4_0"));
    assert!(gated.contains("gated") && gated.contains(&format!("{}/{GATED}", hub.endpoint())) && gated.contains("HF_TOKEN"), "{gated}");
    let refused = message(&hub.client(&home, Some("hf_wrong")), &format!("hf:{GATED}:Q4_0"));
    assert!(refused.contains("refused the token") && refused.contains("HTTP 403"), "{refused}");
    assert!(fetch(&hub.client(&home, Some(TOKEN)), &format!("hf:{GATED}:Q4_0")).is_ok());

    let no_repo = message(&anonymous, "hf:test/nothing-here:Q4_0");
    assert!(no_repo.contains("HTTP 404") && no_repo.contains("no repository test/nothing-here"), "{no_repo}");
    let no_file = message(&anonymous, &format!("hf:{REPO}/missing.gguf"));
    assert!(no_file.contains("HTTP 404") && no_file.contains(&format!("{REPO} has no file missing.gguf")), "{no_file}");
    let no_quant = message(&anonymous, &format!("hf:{REPO}:Q4_K_M"));
    assert!(no_quant.contains("no GGUF file of quant Q4_K_M; its quants: F32"), "{no_quant}");
    // Without a quant: Q4_K_M, or the only GGUF file.
    assert!(fetch(&anonymous, &format!("hf:{REPO}")).unwrap().ends_with(FILE));
}

#[test]
fn offline_runs_come_from_the_cache() {
    let hub = FakeHub::start();
    let home = temp_dir("offline");
    let reference = format!("hf:{REPO}:F32");
    stdout(&cli(&home, &hub.endpoint(), &["pull", &reference, "-q"], &[]));
    // A port nobody listens on.
    let unreachable = format!("http://{}", TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let path = stdout(&cli(&home, &unreachable, &["pull", &reference, "-q"], &[("HF_HUB_OFFLINE", "1")]));
    let fallback = cli(&home, &unreachable, &["pull", &reference, "-q"], &[]);
    assert_eq!(stdout(&fallback), path, "the network failed: the cached file");
    assert!(String::from_utf8_lossy(&fallback.stderr).contains("using the cached"), "{}", String::from_utf8_lossy(&fallback.stderr));
    let missing = cli(&home, &unreachable, &["pull", &format!("hf:{REPO}:Q4_0"), "-q"], &[("HF_HUB_OFFLINE", "1")]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is not in the cache"), "{}", String::from_utf8_lossy(&missing.stderr));

    if gpu().is_none() {
        return;
    }
    let golden = golden("tiny-llama31").greedy;
    let prompt: Vec<String> = golden.prompt.iter().map(u32::to_string).collect();
    let out = stdout(&cli(&home, &unreachable, &["run", "--model", &reference, "--tokens", &prompt.join(","), "-n", "8", "-q"], &[("HF_HUB_OFFLINE", "1")]));
    let tokens: Vec<u32> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(tokens, golden.tokens[..8]);
}

#[test]
fn urls_download_into_a_cache_of_their_own() {
    let hub = FakeHub::start();
    let home = temp_dir("url");
    let client = hub.client(&home, None);
    let url = format!("{}/{REPO}/resolve/main/{FILE}", hub.endpoint());
    let path = fetch(&client, &url).unwrap();
    assert!(path.starts_with(home.join("urls")) && path.ends_with(FILE), "{}", path.display());
    assert_eq!(std::fs::read(&path).unwrap(), tiny_gguf());
    assert_eq!(fetch(&client, &url).unwrap(), path);
    assert_eq!(hub.served(), tiny_gguf().len() as u64);
}

/// A full disk, as /dev/full behaves: the download stops with an error that says so.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_named() {
    let hub = FakeHub::start();
    let home = temp_dir("full");
    let blobs = home.join("hub/models--test--tiny-llama31-GGUF/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let sha = hex(&Sha256::digest(tiny_gguf()));
    std::os::unix::fs::symlink("/dev/full", blobs.join(format!("{sha}.incomplete"))).unwrap();
    let error = fetch(&hub.client(&home, None), &format!("hf:{REPO}:F32")).unwrap_err();
    assert!(matches!(error, llama_webgpu::Error::Hub(HubError::DiskFull { needed, .. }) if needed == tiny_gguf().len() as u64), "{error}");
    assert!(error.to_string().contains("the disk is full") && error.to_string().contains("HF_HOME"), "{error}");
}

#[test]
fn a_repository_of_safetensors_weights_comes_down_as_a_model_folder() {
    let hub = FakeHub::start();
    let repo = "test/tiny-llama31";
    // As Meta's repositories: the folder, and the original checkpoint, which the engine does not read.
    let source = fixture_with_tokenizer("tiny-llama31");
    let folder = hub.add_folder(repo, &source, &[("original/consolidated.00.pth", vec![7; 1 << 20]), ("README.md", b"# tiny".to_vec())]);
    let home = temp_dir("folder");
    let pulled = cli(&home, &hub.endpoint(), &["pull", &format!("hf:{repo}")], &[]);
    let snapshot = home.join("hub/models--test--tiny-llama31/snapshots").join(COMMIT);
    assert_eq!(PathBuf::from(stdout(&pulled).trim()), snapshot);
    let folder_bytes: u64 = folder.iter().map(|f| std::fs::metadata(source.join(f)).unwrap().len()).sum();
    assert_eq!(hub.served(), folder_bytes, "only the folder's files are downloaded");
    let listed: Vec<String> = stdout(&cli(&home, &hub.endpoint(), &["list"], &[])).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect();
    assert_eq!(listed, folder.iter().map(|f| format!("hf:{repo}/{f}")).collect::<Vec<_>>());
    // Every file at the listing's commit, so a push between requests cannot mix two versions.
    assert!(hub.resolved().iter().all(|(revision, _)| revision == COMMIT), "{:?}", hub.resolved());
    if let Some(_gpu) = gpu() {
        let stderr = String::from_utf8_lossy(&pulled.stderr);
        assert!(stderr.contains(&format!("{repo}: about ")) && stderr.contains("of GPU memory"), "{stderr}");
        // Offline, from the cache: the greedy tokens of the transformers golden.
        let golden = golden("tiny-llama31").greedy;
        let prompt: Vec<String> = golden.prompt.iter().map(u32::to_string).collect();
        let out = stdout(&cli(&home, &hub.endpoint(), &["run", "--model", &format!("hf:{repo}"), "--tokens", &prompt.join(","), "-n", "8", "-q"], &[("HF_HUB_OFFLINE", "1")]));
        let tokens: Vec<u32> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
        assert_eq!(tokens, golden.tokens[..8]);
        // Served under the repository's name, as vLLM names it, not the snapshot's commit.
        assert_eq!(served_model_id(&home, &format!("hf:{repo}")), repo);
    }
    let quant = cli(&home, &hub.endpoint(), &["pull", &format!("hf:{repo}:Q4_0")], &[]);
    let message = String::from_utf8_lossy(&quant.stderr);
    assert!(!quant.status.success() && message.contains("model folder of safetensors weights") && message.contains(&format!("(hf:{repo})")), "{message}");
    let removed = stdout(&cli(&home, &hub.endpoint(), &["rm", &format!("hf:{repo}")], &[]));
    assert!(removed.starts_with(&format!("removed hf:{repo}")), "{removed}");
    assert_eq!(stdout(&cli(&home, &hub.endpoint(), &["list"], &[])), "");

    // One safetensors file, no index; offline, a folder missing its weights is not a cached model.
    let single = "test/tiny-llama32-tied";
    hub.add_folder(single, &fixture("tiny-llama32-tied"), &[]);
    let client = hub.client(&home, None);
    let path = fetch(&client, &format!("hf:{single}")).unwrap();
    assert_eq!(read_hf_config(&path).unwrap(), read_hf_config(&fixture("tiny-llama32-tied")).unwrap());
    std::fs::remove_file(path.join("model.safetensors")).unwrap();
    let mut offline = hub.client(&home, None);
    offline.offline = true;
    let error = fetch(&offline, &format!("hf:{single}")).unwrap_err();
    assert!(error.to_string().contains("is not in the cache"), "{error}");

    // An index naming a shard the repository lacks: said before any weights download.
    let broken = "test/broken-folder";
    for file in ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"] {
        hub.add(broken, file, std::fs::read(fixture("tiny-llama31").join(file)).unwrap(), None);
    }
    let served = hub.served();
    let error = fetch(&client, &format!("hf:{broken}")).unwrap_err().to_string();
    assert!(error.contains("lists model-00002-of-00002.safetensors, which the repository does not have"), "{error}");
    let index_bytes = std::fs::metadata(fixture("tiny-llama31").join("model.safetensors.index.json")).unwrap().len() + std::fs::metadata(fixture("tiny-llama31").join("config.json")).unwrap().len();
    assert_eq!(hub.served() - served, index_bytes);
}
