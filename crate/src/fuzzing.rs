//! The fuzz targets' bodies: each takes untrusted bytes as a host does (a model file's header, a
//! shard manifest, a request, a model's output) and must end in a value or an error, never a
//! panic, a hang or an allocation the input does not pay for. `fuzz/` runs them under libFuzzer (cargo-fuzz, nightly);
//! `tests/fuzz.rs` replays their seed corpus and mutations of it on stable in the test suite.

use crate::api::request::{parse_body, read_chat, read_completion, read_detokenize, read_tokenize, Parsed, UnknownFields, Work};
use crate::api::{ToolChoice, ToolChoiceMode};
use crate::engine::StopStrings;
use crate::grammar::Grammar;
use crate::load::manifest::Manifest;
use crate::load::{GgufHeader, Safetensors, WeightSource, WeightStream};
use crate::text::tool_calls::{self, ToolCallFormat, ToolCallStream, ToolSet, BUILTIN_TOOLS};
use crate::text::{ChatTemplate, RenderOptions, Tokenizer};

/// The names of the targets, as `fuzz/fuzz_targets/` and the corpus folders name them.
pub const TARGETS: [&str; 5] = ["gguf", "safetensors", "manifest", "request", "output"];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "gguf" => gguf(data),
        "safetensors" => safetensors(data),
        "manifest" => manifest(data),
        "request" => request(data),
        "output" => output(data),
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

/// A chat, text completion, tokenize or detokenize request's body as the hosts read it
/// (`crate::api::request`, unknown fields ignored as serve does and refused as the JS API does),
/// then as far as it goes without a model: the messages and tools rendered by Llama 3.1's
/// template, and the response format's grammar.
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
    let _ = read_tokenize(object.clone());
    let _ = read_detokenize(object);
}

/// Separates the pieces of an `output` input (a token's text each), and its stop strings.
pub const OUTPUT_PIECE_END: char = '\u{1}';
/// Ends an `output` input's stop strings, when it has any.
pub const OUTPUT_STOPS_END: char = '\u{2}';

/// A model's output as the engine streams it: stop strings (before OUTPUT_STOPS_END), then the
/// output's pieces, each through the stop strings and the tool-call stream of each format, as
/// `Engine::accept` and `Engine::end` run them. What streams must be what the text gives at once:
/// the text up to the first stop string, and its content and calls as parsed whole.
pub fn output(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else { return };
    let (stops, pieces) = input.split_once(OUTPUT_STOPS_END).unwrap_or(("", input));
    let stops: Vec<String> = stops.split(OUTPUT_PIECE_END).filter(|s| !s.is_empty()).map(String::from).collect();
    let pieces: Vec<&str> = pieces.split(OUTPUT_PIECE_END).collect();
    let until_stop = text_until_stop(&pieces, &stops);
    let until_stop = until_stop.as_str();
    let tools = output_tools();
    for format in [ToolCallFormat::Llama3, ToolCallFormat::Hermes, ToolCallFormat::Mistral, ToolCallFormat::MistralArgs] {
        let mut stop_strings = StopStrings::new(stops.clone());
        let mut stream = ToolCallStream::new(format, tools.clone());
        let (mut passed, mut streamed) = (String::new(), String::new());
        let mut stopped = false;
        for piece in &pieces {
            let (emit, hit) = stop_strings.push(piece);
            passed.push_str(&emit);
            streamed.push_str(&stream.push(&emit));
            if hit {
                stopped = true;
                break;
            }
        }
        if !stopped {
            let tail = stop_strings.flush("");
            passed.push_str(&tail);
            streamed.push_str(&stream.push(&tail));
        }
        assert_eq!(passed, until_stop, "text through stop strings {stops:?}");
        let end = stream.finish();
        streamed.push_str(&end.content);
        let parsed = tool_calls::parse(format, until_stop, &tools);
        assert_eq!(streamed, parsed.content, "{format:?} content streamed from {pieces:?}");
        assert_eq!(end.tool_calls, parsed.tool_calls, "{format:?} calls streamed from {pieces:?}");
    }
}

/// The tools the `output` target's outputs may call: the seeds' function and the built-ins.
pub fn output_tools() -> ToolSet {
    ToolSet { functions: vec!["get_weather".to_string()], builtin: BUILTIN_TOOLS.map(String::from).to_vec() }
}

/// The text of `pieces` up to the first of `stops` in it, as generation ends: at the first piece
/// that completes a stop string, cut where the earliest one it then holds begins (as llama.cpp's
/// server cuts; a longer stop string that began earlier and would complete later is not awaited).
fn text_until_stop(pieces: &[&str], stops: &[String]) -> String {
    let mut text = String::new();
    for piece in pieces {
        text.push_str(piece);
        if let Some(cut) = stops.iter().filter_map(|stop| text.find(stop.as_str())).min() {
            text.truncate(cut);
            break;
        }
    }
    text
}
