//! The fuzz targets (crate::fuzzing) in the test suite, on stable: every seed of fuzz/corpus reaches
//! its target's last stage, then mutations of the seeds (bit flips, edge values, cuts, repeats,
//! splices, numbers in the text turned huge) run for a time box per target (2 s, or
//! LLAMA_WEBGPU_FUZZ_SECONDS). A panic or an input slower than a second fails the test, and the
//! input is kept under target/fuzz-failures for `cargo fuzz run TARGET FILE`. The inputs that
//! once failed (fuzz/regressions/<target>) run first. The coverage-guided runs are cargo-fuzz's
//! (fuzz/, nightly); their figures are in the README.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_webgpu::api::request::{parse_body, read_chat, read_completion, UnknownFields};
use llama_webgpu::fuzzing::{self, TARGETS};
use llama_webgpu::load::manifest::Manifest;
use llama_webgpu::load::{GgufHeader, Safetensors, WeightStream};
use llama_webgpu::text::tool_calls::{self, ToolCallFormat};
use llama_webgpu::text::{ChatTemplate, Tokenizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SLOW: Duration = Duration::from_secs(1);

/// The files of fuzz/`folder`/`target` (none if it does not exist), sorted.
fn inputs(folder: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(folder).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return vec![] };
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    files.sort();
    files
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let seeds = inputs("corpus", target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    seeds
}

/// Inputs the fuzzers once failed on (kept where the fix is tested) end in errors now.
#[test]
fn past_failures_end_in_errors() {
    let mut replayed = 0;
    for target in TARGETS {
        for (_, input) in inputs("regressions", target) {
            run_one(target, &input);
            replayed += 1;
        }
    }
    assert!(replayed > 0);
    // An overflowing tensor shape (found by the manifest fuzzer) is refused, not wrapped around.
    let (_, overflow) = &inputs("regressions", "manifest")[0];
    let error = Manifest::parse(std::str::from_utf8(overflow).unwrap()).expect_err("a shape whose size passes usize is an error");
    assert!(error.to_string().contains("do not hold shape"), "{error}");
}

/// The seeds are valid inputs that every stage of their target accepts, so that mutations start
/// from deep inside the parsers.
#[test]
fn every_seed_reaches_the_last_stage_of_its_target() {
    for (path, bytes) in corpus("gguf") {
        let header = GgufHeader::parse("seed", &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        header.hf_locations().unwrap();
        header.config(None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tokenizer::from_gguf(&header).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        ChatTemplate::from_gguf(&header).unwrap();
    }
    for (path, bytes) in corpus("safetensors") {
        Safetensors::new(vec![("seed".to_string(), bytes.as_slice())]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    for (path, bytes) in corpus("manifest") {
        let manifest = Manifest::parse(std::str::from_utf8(&bytes).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        manifest.model_config().unwrap();
        assert!(!manifest.locations().is_empty());
    }
    // Read as serve reads a body (content given as text parts too), refusing unknown fields.
    for (path, bytes) in corpus("request") {
        let object = parse_body(&bytes).unwrap_or_else(|e| panic!("{}: {}", path.display(), e.message));
        let parsed = read_chat(object.clone(), UnknownFields::Refuse).is_ok() || read_completion(object, UnknownFields::Refuse).is_ok();
        assert!(parsed, "{} is no request", path.display());
    }
    assert!(Safetensors::new(vec![("seed".to_string(), corpus("safetensors")[1].1.as_slice())]).unwrap().locations().len() == 3);
    // Model outputs in pieces: between them, calls in each format and a stop string that ends one.
    let tools = fuzzing::output_tools();
    let (mut calls, mut stops) = (HashSet::new(), 0);
    for (path, bytes) in corpus("output") {
        let input = std::str::from_utf8(&bytes).unwrap();
        let (stop_strings, pieces) = input.split_once(fuzzing::OUTPUT_STOPS_END).unwrap_or(("", input));
        assert!(pieces.contains(fuzzing::OUTPUT_PIECE_END), "{}: one piece", path.display());
        let whole: String = pieces.split(fuzzing::OUTPUT_PIECE_END).collect();
        stops += stop_strings.split(fuzzing::OUTPUT_PIECE_END).any(|stop| !stop.is_empty() && whole.contains(stop)) as usize;
        for format in [ToolCallFormat::Llama3, ToolCallFormat::Hermes, ToolCallFormat::Mistral, ToolCallFormat::MistralArgs] {
            if !tool_calls::parse(format, &whole, &tools).tool_calls.is_empty() {
                calls.insert(format!("{format:?}"));
            }
        }
    }
    assert_eq!(calls.len(), 4, "calls in every format: {calls:?}");
    assert!(stops > 0, "an output that a stop string ends");
}

/// One mutation of `input`, drawing on `other` (another seed) for splices.
fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let at = |rng: &mut StdRng, len: usize| if len == 0 { 0 } else { rng.random_range(0..len) };
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..7) {
            0 if !out.is_empty() => {
                let i = at(rng, out.len());
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !out.is_empty() => {
                let i = at(rng, out.len());
                out[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][rng.random_range(0..7)];
            }
            2 if out.len() >= 8 => {
                // A little-endian u32 or u64 field made huge or zero.
                let i = at(rng, out.len() - 8);
                let value: u64 = [0, u64::MAX, u32::MAX as u64, 1 << 40, 0x8000_0000][rng.random_range(0..5)];
                out[i..i + 8].copy_from_slice(&value.to_le_bytes());
            }
            3 => out.truncate(at(rng, out.len() + 1)),
            4 if !out.is_empty() => {
                let start = at(rng, out.len());
                let end = (start + rng.random_range(1..64)).min(out.len());
                let piece = out[start..end].to_vec();
                let i = at(rng, out.len());
                out.splice(i..i, piece.iter().cycle().take(piece.len() * rng.random_range(1..8)).copied());
            }
            5 if !other.is_empty() => {
                let start = at(rng, other.len());
                let end = (start + rng.random_range(1..256)).min(other.len());
                let i = at(rng, out.len());
                out.splice(i..i, other[start..end].iter().copied());
            }
            _ => {
                // A number in JSON text made huge, negative or fractional.
                if let Some(i) = out.iter().position(|b| b.is_ascii_digit()).map(|first| first + at(rng, out.len() - first)) {
                    if out[i].is_ascii_digit() {
                        let replacement: &[u8] = [b"99999999999999999999".as_slice(), b"-1", b"1e308", b"0.5", b"4294967296"][rng.random_range(0..5)];
                        out.splice(i..i + 1, replacement.iter().copied());
                    }
                }
            }
        }
    }
    out
}

/// Runs `target` on `input`: a panic or a slow input fails, keeping the input.
fn run_one(target: &str, input: &[u8]) {
    let started = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| fuzzing::run(target, input)));
    let slow = started.elapsed() > SLOW;
    if result.is_err() || slow {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{target}-{:016x}", fxhash(input)));
        std::fs::write(&file, input).unwrap();
        let what = if slow { format!("took {:?}", started.elapsed()) } else { "panicked".to_string() };
        panic!("fuzz target {target} {what} on {} ({} bytes)", file.display(), input.len());
    }
}

fn fxhash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

#[test]
fn mutated_seeds_end_in_values_or_errors() {
    let seconds: f64 = std::env::var("LLAMA_WEBGPU_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    for target in TARGETS {
        let seeds = corpus(target);
        let mut rng = StdRng::seed_from_u64(fxhash(target.as_bytes()));
        let started = Instant::now();
        let mut runs = 0;
        for (_, seed) in &seeds {
            run_one(target, seed);
        }
        while started.elapsed().as_secs_f64() < seconds {
            let (_, input) = &seeds[rng.random_range(0..seeds.len())];
            let (_, other) = &seeds[rng.random_range(0..seeds.len())];
            let mutated = mutate(&mut rng, input, other);
            run_one(target, &mutated);
            runs += 1;
        }
        println!("{target}: {runs} mutated inputs in {seconds} s");
    }
}
