//! The fuzz targets' bodies: each takes untrusted bytes as a host does (a model file's header, a
//! shard manifest, a request) and must end in a value or an error, never a panic, a hang or an
//! allocation the input does not pay for. `fuzz/` runs them under libFuzzer (cargo-fuzz, nightly);
//! `tests/fuzz.rs` replays their seed corpus and mutations of it on stable in the test suite.

use crate::api::request::{parse_body, read_chat, read_completion, Parsed, UnknownFields, Work};
use crate::api::{ToolChoice, ToolChoiceMode};
use crate::grammar::Grammar;
use crate::load::manifest::Manifest;
use crate::load::{GgufHeader, Safetensors, WeightSource, WeightStream};
use crate::text::{ChatTemplate, RenderOptions, Tokenizer};

/// The names of the targets, as `fuzz/fuzz_targets/` and the corpus folders name them.
pub const TARGETS: [&str; 4] = ["gguf", "safetensors", "manifest", "request"];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "gguf" => gguf(data),
        "safetensors" => safetensors(data),
        "manifest" => manifest(data),
        "request" => request(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// A GGUF file's header, and what a load reads from it: tensor locations, the model config, the
/// tokenizer and the chat template from its metadata.
pub fn gguf(data: &[u8]) {
    let Ok(header) = GgufHeader::parse("fuzz.gguf", data) else { return };
    let _ = header.hf_locations();
    let _ = header.config(None);
    let _ = Tokenizer::from_gguf(&header);
    let _ = ChatTemplate::from_gguf(&header);
}

/// A safetensors file's header, and every tensor it lists read back.
pub fn safetensors(data: &[u8]) {
    let Ok(file) = Safetensors::new(vec![("fuzz.safetensors".to_string(), data)]) else { return };
    for location in file.locations() {
        let _ = file.tensor(&location.name);
    }
}

/// A shard folder's manifest.json, and the config and files it describes.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(manifest) = Manifest::parse(text) else { return };
    let _ = manifest.model_config();
    let _ = manifest.files();
    let _ = manifest.locations();
}

/// A chat or text completion request's body as the hosts read it (`crate::api::request`, unknown
/// fields ignored as serve does and refused as the JS API does), then as far as it goes without a
/// model: the messages and tools rendered by Llama 3.1's template, and the response format's
/// grammar.
pub fn request(data: &[u8]) {
    let Ok(object) = parse_body(data) else { return };
    for unknown in [UnknownFields::Ignore, UnknownFields::Refuse] {
        if let Ok(Parsed { work: Work::Chat(request), .. }) = read_chat(object.clone(), unknown) {
            let tools = match request.tool_choice {
                Some(ToolChoice::Mode(ToolChoiceMode::None)) => None,
                _ => request.tools.as_deref(),
            };
            let options = RenderOptions { builtin_tools: request.builtin_tools.clone(), ..Default::default() };
            let _ = ChatTemplate::llama31().render(&request.messages, tools, true, &options);
            if let Some(format) = &request.sampling.response_format {
                let _ = Grammar::of_response_format(format);
            }
        }
        let _ = read_completion(object.clone(), unknown);
    }
}
