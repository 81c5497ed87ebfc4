//! The `llama-webgpu` binary end to end: run, bench (JSON checked) and convert.

mod common;

use std::process::Command;

use common::{exact, fixture, golden, gpu, gpu_with};
use llama_webgpu::quant::DType;
use llama_webgpu::GpuOptions;

fn llama_webgpu(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_llama-webgpu")).args(args).arg("--quiet").output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// The error output of a run that must fail.
fn llama_webgpu_fails(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_llama-webgpu")).args(args).arg("--quiet").output().unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn run_prints_the_greedy_continuation() {
    if gpu().is_none() {
        return;
    }
    let golden = golden("tiny-llama31").greedy;
    let prompt: Vec<String> = golden.prompt.iter().map(u32::to_string).collect();
    let model = fixture("tiny-llama31");
    let out = llama_webgpu(&["run", "--model", model.to_str().unwrap(), "--tokens", &prompt.join(","), "-n", "32"]);
    let tokens: Vec<u32> = out.split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(tokens, golden.tokens);
}

#[test]
fn no_display_session_no_loader_noise() {
    if gpu().is_none() {
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_llama-webgpu")).arg("info").env_remove("XDG_RUNTIME_DIR").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && !stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// `--draft-model`: the smaller fixture of the same vocabulary drafts, the tokens are those
/// without; a draft model of another vocabulary is refused, naming both.
#[test]
fn a_draft_model_drafts_and_a_draft_of_another_vocabulary_is_refused() {
    if gpu().is_none() {
        return;
    }
    let model = common::fixture_with_tokenizer("tiny-llama31");
    let run = |extra: &[&str]| {
        let args = [&["run", "--model", model.to_str().unwrap(), "--prompt", "Hello there", "-n", "12", "--temperature", "0", "--json"], extra].concat();
        serde_json::from_str::<serde_json::Value>(&llama_webgpu(&args)).unwrap()
    };
    let plain = run(&[]);
    let drafted = run(&["--draft-model", fixture("tiny-llama32-tied").to_str().unwrap()]);
    assert_eq!(drafted["tokens"], plain["tokens"]);
    let drafts = &drafted["usage"]["drafts"];
    assert!(drafts["accepted"].as_u64().unwrap() + drafts["rejected"].as_u64().unwrap() > 0, "{drafted}");
    let smollm2 = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let args = ["run", "--model", model.to_str().unwrap(), "--prompt", "Hello", "-n", "1", "--draft-model", smollm2.to_str().unwrap()];
    let stderr = llama_webgpu_fails(&args);
    assert!(stderr.contains("the draft model's vocabulary is 49152 but the model's 1003: a draft model must share the model's tokenizer"), "{stderr}");
}

/// `--chat-template` renders chats in place of the model's template, from a file or as given,
/// reading the model's special tokens; a value that is neither is refused.
#[test]
fn a_chat_template_given_replaces_the_models() {
    if gpu().is_none() {
        return;
    }
    let model = common::fixture_with_tokenizer("tiny-llama31");
    let template = "{{ bos_token }}x{{ messages[0]['content'] }}";
    let file = model.join("given.jinja");
    std::fs::write(&file, template).unwrap();
    let expected = common::truncated_llama3_tokenizer(1003).encode("<|begin_of_text|>xhi", true).unwrap().len();
    for given in [template, file.to_str().unwrap()] {
        let out = llama_webgpu(&["run", "--model", model.to_str().unwrap(), "--prompt", "hi", "--chat", "--chat-template", given, "-n", "1", "--json"]);
        let out: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["usage"]["prompt_tokens"], expected, "{given}: {out}");
    }
    let stderr = llama_webgpu_fails(&["run", "--model", model.to_str().unwrap(), "--prompt", "hi", "--chat", "--chat-template", "chatml.jinja"]);
    assert!(stderr.contains("--chat-template \"chatml.jinja\": no such file, and not a template"), "{stderr}");
}

/// A reasoning model's thought goes apart from its answer (stderr, and `reasoning` in the JSON),
/// unless `--reasoning-format none` leaves it in the text.
#[test]
fn a_thought_goes_apart_unless_the_reasoning_format_is_none() {
    if gpu().is_none() {
        return;
    }
    let model = common::fixture_with_tokenizer("tiny-llama31");
    let tokenizer = common::truncated_llama3_tokenizer_with(1003, &[(998, "<think>"), (999, "</think>")]);
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_json().unwrap()).unwrap();
    let run = |extra: &[&str]| {
        let model = model.to_str().unwrap();
        let args = [&["run", "--model", model, "--prompt", "hi", "--chat", "--chat-template", "{{ messages[0].content }}<think>\n", "-n", "6", "--temperature", "0"], extra].concat();
        llama_webgpu(&args)
    };
    let json = |out: String| -> serde_json::Value { serde_json::from_str(&out).unwrap() };
    let (parsed, raw) = (json(run(&["--json"])), json(run(&["--json", "--reasoning-format", "none"])));
    assert_eq!(parsed["tokens"], raw["tokens"]);
    // Greedy, the random model does not end its thought in 6 tokens: all of it is the thought.
    assert_eq!((&parsed["text"], &parsed["reasoning"]), (&serde_json::json!(""), &raw["text"]), "{parsed} {raw}");
    assert!(raw["reasoning"].is_null() && !raw["text"].as_str().unwrap().is_empty());
    assert_eq!(run(&[]).trim(), "", "the thought is not on stdout");
}

/// The grid formats load from GGUF files but are not written here: `--quant` names why (a synthetic
/// model in them still benchmarks, filled on the GPU).
#[test]
fn quant_refuses_a_format_it_cannot_write_by_name() {
    let stderr = llama_webgpu_fails(&["convert", "no-such-model", "--out", "out", "--quant", "iq2_xxs"]);
    assert!(stderr.contains("'iq2_xxs' for '--quant <QUANT>': iq2_xxs: weights are not encoded into this format here (it needs an importance matrix"), "{stderr}");
}

/// A blank `--served-model-name` is refused before anything loads.
#[test]
fn a_blank_served_model_name_is_refused() {
    let stderr = llama_webgpu_fails(&["serve", "--model", "no-such-model", "--served-model-name", "tiny", " "]);
    assert!(stderr.contains("' ' for '--served-model-name <NAME>...': a model name must not be empty or blank"), "{stderr}");
}

/// An I/O error says its cause once when the CLI prints the error's chain (the fixture has no
/// tokenizer.json).
#[test]
fn an_io_error_says_its_cause_once() {
    if gpu().is_none() {
        return;
    }
    let model = fixture("tiny-llama31");
    let stderr = llama_webgpu_fails(&["run", "--model", model.to_str().unwrap(), "--prompt", "Hello", "-n", "1"]);
    assert!(stderr.contains("tokenizer.json") && stderr.matches("(os error 2)").count() == 1, "{stderr}");
}

/// Output into a pipe whose reader has gone (`info | head -1`) ends the process by SIGPIPE, as it
/// does any Unix tool, not with a panic.
#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    if gpu().is_none() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_llama-webgpu")).arg("info").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Closed before the adapters are listed: their first line meets a pipe with no reader.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bench_reports_json_for_a_model_and_a_synthetic_shape() {
    if gpu().is_none() {
        return;
    }
    let model = fixture("tiny-llama31");
    let out = llama_webgpu(&["bench", "--model", model.to_str().unwrap(), "-p", "16", "-n", "4", "-r", "2", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.iter().map(|r| r["test"].as_str().unwrap()).collect::<Vec<_>>(), ["pp16", "tg4"]);
    for r in results {
        assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(r["samples"].as_array().unwrap().len(), 2);
    }
    assert_eq!(report["layers"], 3);
    assert_eq!(report["bounds_checks"], false);
    // The commit the binary was built from, for reports filed under bench/results.
    let commit = report["commit"].as_str().unwrap();
    assert!(commit == "unknown" || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())), "{commit}");
    // The embedding, five per layer (q/k/v with RoPE and the cache write, attention, o, gate/up,
    // down), lm_head and argmax's two passes.
    assert_eq!(report["dispatches_per_token"], 1 + 3 * 5 + 3);

    // One layer of Llama 3.2 1B's shape in q4_0: 1B's lm_head dominates the bytes per token.
    let out = llama_webgpu(&[
        "bench", "--synthetic", "llama3.2-1b", "--layers", "1", "--quant", "q4_0", "-p", "0", "-n", "1", "-r", "1",
        "--bandwidth-gbps", "100", "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layer = (2048 + 2 * 512) * 64 * 18 + 2048 * 64 * 18 + 2 * 8192 * 64 * 18 + 2048 * 256 * 18;
    let head = 128256 * 64 * 18;
    assert_eq!(report["weight_bytes_per_token"].as_u64().unwrap(), (layer + head) as u64);
    let tg = &report["results"][0];
    assert_eq!(tg["test"], "tg1");
    let fraction = tg["bandwidth_fraction"].as_f64().unwrap();
    let implied = (layer + head) as f64 * tg["tokens_per_second"].as_f64().unwrap() / 100e9;
    assert!((fraction - implied).abs() < 1e-12);
}

#[test]
fn bench_profiles_every_dispatch_of_a_decode_step() {
    let Some(gpu) = gpu_with(&GpuOptions { timestamps: true, ..exact() }) else { return };
    let model = fixture("tiny-llama31");
    let args = ["bench", "--model", model.to_str().unwrap(), "-p", "0", "-n", "2", "-r", "1", "--profile", "--json"];
    if !gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
        let output = Command::new(env!("CARGO_BIN_EXE_llama-webgpu")).args(args).arg("--quiet").output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("no timestamp queries"), "{stderr}");
        return;
    }
    let report: serde_json::Value = serde_json::from_str(&llama_webgpu(&args)).unwrap();
    let kernels = report["profile"].as_array().unwrap();
    let names: Vec<&str> = kernels.iter().map(|k| k["kernel"].as_str().unwrap()).collect();
    assert_eq!(names, ["embed", "qkv_proj", "attention", "o_proj", "gate_up_proj", "down_proj", "lm_head", "argmax"]);
    let dispatches: f64 = kernels.iter().map(|k| k["dispatches_per_token"].as_f64().unwrap()).sum();
    assert_eq!(dispatches, report["dispatches_per_token"].as_f64().unwrap());
    for k in kernels {
        assert!(k["us_per_token"].as_f64().unwrap() > 0.0 && k["bytes_per_token"].as_f64().unwrap() > 0.0, "{k}");
    }
    // Per layer, q/k/v reads its (128 + 2 * 32, 128) f32 rows, the input row, the norm weight and
    // the position's 8 (cos, sin) pairs (head_dim 16), and writes 192 outputs.
    let qkv = kernels.iter().find(|k| k["kernel"] == "qkv_proj").unwrap();
    assert_eq!(qkv["bytes_per_token"].as_f64().unwrap(), (3 * (192 * 128 * 4 + 2 * 128 * 4 + 192 * 4 + 8 * 8)) as f64);

    // 40 positions deep a decode step's 41 keys come in six splits, merged by the last to finish
    // (Vulkan) or, as browsers do, in one more dispatch per layer.
    for (flag, merge, merge_dispatches) in [(None, "by the last split", 0), (Some("--separate-split-merge"), "in a dispatch of their own", 1)] {
        let mut args = vec!["bench", "--model", model.to_str().unwrap(), "-p", "0", "-n", "2", "-d", "40", "-r", "1", "--profile", "--json"];
        args.extend(flag);
        let report: serde_json::Value = serde_json::from_str(&llama_webgpu(&args)).unwrap();
        assert_eq!(report["results"][0]["test"], "tg2 @ d40");
        assert_eq!((report["depth"].as_u64(), report["split_merge"].as_str()), (Some(40), Some(merge)));
        assert_eq!(report["dispatches_per_token"], 1 + 3 * (5 + merge_dispatches) + 3);
        let attention = report["profile"].as_array().unwrap().iter().find(|k| k["kernel"] == "attention").unwrap();
        assert_eq!(attention["dispatches_per_token"], 3.0 * (1 + merge_dispatches) as f64);
    }

    // With at most one split there is nothing to merge (and the bounds checks kept change no count).
    let args = ["bench", "--model", model.to_str().unwrap(), "-p", "0", "-n", "2", "-d", "40", "-r", "1", "--max-key-splits", "1", "--separate-split-merge", "--bounds-checks", "--profile", "--json"];
    let report: serde_json::Value = serde_json::from_str(&llama_webgpu(&args)).unwrap();
    assert_eq!(report["bounds_checks"], true);
    assert_eq!((report["max_key_splits"].as_u64(), report["dispatches_per_token"].as_u64()), (Some(1), Some(1 + 3 * 5 + 3)));
    let attention = report["profile"].as_array().unwrap().iter().find(|k| k["kernel"] == "attention").unwrap();
    assert_eq!(attention["dispatches_per_token"], 3.0);

    // A q8_0 pool of the model's whole context: its size and cost in the JSON (3 layers, keys and
    // values of 32 int8 values and a scale per position: 216 bytes a position); a staged pool's
    // kv_store adds a dispatch per layer.
    let args = ["--kv-type", "q8_0", "bench", "--model", model.to_str().unwrap(), "-p", "0", "-n", "2", "-r", "1", "--context", "256", "--json"];
    let report: serde_json::Value = serde_json::from_str(&llama_webgpu(&args)).unwrap();
    assert_eq!((report["kv_type"].as_str(), report["context"].as_u64()), (Some("q8_0"), Some(256)));
    assert_eq!((report["kv_bytes_per_1k_positions"].as_u64(), report["kv_buffers_per_layer"].as_u64()), (Some(216_000), Some(1)));
    assert_eq!(report["dispatches_per_token"], 1 + 3 * 6 + 3);
    let err = llama_webgpu_fails(&["bench", "--model", model.to_str().unwrap(), "-p", "0", "-n", "20", "-r", "1", "--context", "16"]);
    assert!(err.contains("--context 16: the tests reach position 21"), "{err}");

    // On int8 inputs the four products of a layer and lm_head each quantize their input first, a
    // dispatch of their own that the profile lists apart.
    let q4_0 = common::convert("tiny-llama31", DType::Q4_0, 1 << 20);
    let args = ["--q8-activations", "bench", "--model", q4_0.to_str().unwrap(), "-p", "0", "-n", "2", "-r", "1", "--profile", "--json"];
    let report: serde_json::Value = serde_json::from_str(&llama_webgpu(&args)).unwrap();
    assert_eq!((report["q8_activations"].as_bool(), report["dispatches_per_token"].as_u64()), (Some(true), Some(1 + 3 * 9 + 4)));
    let quantize = report["profile"].as_array().unwrap().iter().find(|k| k["kernel"] == "quantize").unwrap();
    assert_eq!(quantize["dispatches_per_token"], 3.0 * 4.0 + 1.0);
}
