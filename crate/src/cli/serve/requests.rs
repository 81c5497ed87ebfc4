//! Reading request bodies into the engine's request types, with errors that say what is wrong and
//! where. The body is parsed as JSON first (so a syntax error gives its line and column), then each
//! known field is checked on its own (serde's message for a flattened struct would not name the
//! field), then the whole object becomes the typed request. Unknown fields are ignored, as most
//! OpenAI-compatible servers do; fields that ask for what this server cannot do are rejected.

use std::collections::HashMap;

use llama_webgpu::api::{ChatCompletionRequest, ChatMessage, CompletionRequest, ResponseFormat, Tool, ToolChoice};
use llama_webgpu::engine::{MAX_CHOICES, MAX_TOP_LOGPROBS};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::engine_thread::Work;
use super::responses::ApiError;

/// A request ready for the engine.
pub struct Parsed {
    pub work: Work,
    /// Choices to generate (`n`).
    pub choices: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a usage chunk.
    pub include_usage: bool,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

pub fn parse_chat(body: &[u8]) -> Result<Parsed, ApiError> {
    let mut object = json_object(body)?;
    let Common { stream, include_usage, choices } = common_fields(&mut object)?;
    let logprobs = field::<bool>(&object, "logprobs")?.unwrap_or(false);
    if let Some(top) = field::<u32>(&object, "top_logprobs")? {
        if !logprobs {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true").param("top_logprobs"));
        }
        if top as usize > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(format!("top_logprobs = {top}: at most {MAX_TOP_LOGPROBS}")).param("top_logprobs"));
        }
    }

    match object.get_mut("messages") {
        None | Some(Value::Null) => return Err(ApiError::invalid("messages is required").param("messages")),
        Some(Value::Array(messages)) => {
            if messages.is_empty() {
                return Err(ApiError::invalid("messages must not be empty").param("messages"));
            }
            for (i, message) in messages.iter_mut().enumerate() {
                normalize_message(message, i)?;
            }
        }
        Some(other) => {
            return Err(ApiError::invalid(format!("messages: must be a list of messages, got {}", kind_of(other))).param("messages"))
        }
    }
    field::<Vec<ChatMessage>>(&object, "messages")?;

    field::<Option<Vec<Tool>>>(&object, "tools")?;
    if let Some(choice) = object.get("tool_choice") {
        if serde_json::from_value::<ToolChoice>(choice.clone()).is_err() {
            return Err(ApiError::invalid(
                "tool_choice: must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )
            .param("tool_choice"));
        }
    }
    field::<bool>(&object, "parallel_tool_calls")?;
    field::<Vec<String>>(&object, "builtin_tools")?;

    let request: ChatCompletionRequest = typed(object)?;
    Ok(Parsed { work: Work::Chat(request), choices, stream, include_usage })
}

pub fn parse_completion(body: &[u8]) -> Result<Parsed, ApiError> {
    let mut object = json_object(body)?;
    let Common { stream, include_usage, choices } = common_fields(&mut object)?;
    if let Some(true) = field::<Option<bool>>(&object, "echo")?.flatten() {
        return Err(ApiError::unsupported("echo", "echo is not supported by this server"));
    }
    if field::<Option<String>>(&object, "suffix")?.flatten().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix (fill-in-the-middle) is not supported by this server"));
    }
    if let Some(n) = field::<Option<u32>>(&object, "best_of")?.flatten().filter(|&n| n != 1) {
        return Err(ApiError::unsupported("best_of", format!("best_of = {n} is not supported: this server returns every choice it generates (use n)")));
    }
    if let Some(alternatives) = field::<u32>(&object, "logprobs")? {
        if alternatives as usize > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(format!("logprobs = {alternatives}: at most {MAX_TOP_LOGPROBS}")).param("logprobs"));
        }
    }

    let prompt = object.remove("prompt").unwrap_or(Value::Null);
    let one_prompt_only = || {
        ApiError::unsupported("prompt", "one prompt per request is supported: send a string, a list of one string, or a list of token ids")
    };
    let prompt = match prompt {
        Value::Null => return Err(ApiError::invalid("prompt is required").param("prompt")),
        Value::String(text) => Prompt::Text(text),
        Value::Array(items) => match items.as_slice() {
            [Value::String(text)] => Prompt::Text(text.clone()),
            [Value::Array(ids)] => Prompt::Tokens(token_ids(ids)?),
            [] => return Err(ApiError::invalid("prompt must not be empty").param("prompt")),
            ids if ids.iter().all(Value::is_number) => Prompt::Tokens(token_ids(ids)?),
            _ => return Err(one_prompt_only()),
        },
        other => {
            return Err(ApiError::invalid(format!("prompt: must be a string or a list of token ids, got {}", kind_of(&other))).param("prompt"))
        }
    };
    object.insert("prompt".into(), Value::String(String::new()));
    let mut request: CompletionRequest = typed(object)?;
    let work = match prompt {
        Prompt::Text(text) => {
            request.prompt = text;
            Work::Complete(request)
        }
        Prompt::Tokens(prompt) => Work::Tokens { prompt, sampling: request.sampling },
    };
    Ok(Parsed { work, choices, stream, include_usage })
}

enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid("prompt must not be empty").param("prompt"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| ApiError::invalid(format!("prompt[{i}]: {v} is not a token id")).param("prompt"))
        })
        .collect()
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(ApiError::invalid(format!("the request body must be a JSON object, got {}", kind_of(&other)))),
        Err(error) => Err(ApiError::invalid(format!("the request body is not valid JSON: {error}"))),
    }
}

/// What the fields both endpoints share decide beyond the sampling parameters.
struct Common {
    stream: bool,
    /// `stream_options.include_usage`.
    include_usage: bool,
    /// `n`.
    choices: usize,
}

/// Fields both endpoints share: stream, n, stream_options, model, and the sampling parameters.
fn common_fields(object: &mut Map<String, Value>) -> Result<Common, ApiError> {
    // Null means absent for every optional field, as OpenAI treats it.
    for name in [
        "stream",
        "n",
        "stream_options",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "response_format",
        "tool_choice",
        "parallel_tool_calls",
        "builtin_tools",
    ] {
        if object.get(name).is_some_and(Value::is_null) {
            object.remove(name);
        }
    }
    let stream = field::<bool>(object, "stream")?.unwrap_or(false);
    let choices = field::<u32>(object, "n")?.unwrap_or(1) as usize;
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(ApiError::invalid(format!("n = {choices}: a request takes 1 to {MAX_CHOICES} choices")).param("n"));
    }
    let include_usage = field::<StreamOptions>(object, "stream_options")?.and_then(|o| o.include_usage).unwrap_or(false);
    field::<Option<String>>(object, "model")?;

    for name in ["temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"] {
        field::<Option<f32>>(object, name)?;
    }
    field::<Option<u32>>(object, "top_k")?;
    field::<Option<HashMap<String, f32>>>(object, "logit_bias")?;
    // OpenAI's seed is any 64-bit integer; the engine's is unsigned, and the bits are what matter.
    if let Some(seed) = object.get("seed").and_then(Value::as_i64).filter(|&s| s < 0) {
        object.insert("seed".into(), Value::from(seed as u64));
    }
    field::<u64>(object, "seed")?;
    if object.contains_key("max_tokens") && object.contains_key("max_completion_tokens") {
        return Err(ApiError::invalid("give max_tokens or max_completion_tokens, not both").param("max_tokens"));
    }
    for name in ["max_tokens", "max_completion_tokens"] {
        if field::<u32>(object, name)? == Some(0) {
            return Err(ApiError::invalid(format!("{name} must be at least 1")).param(name));
        }
    }
    field::<ResponseFormat>(object, "response_format")?;
    match object.get("stop") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => {}
        Some(Value::Array(_)) => return Err(ApiError::invalid("stop: a list of stop sequences must hold only strings").param("stop")),
        Some(other) => {
            return Err(ApiError::invalid(format!("stop: must be a string or a list of strings, got {}", kind_of(other))).param("stop"))
        }
    }
    Ok(Common { stream, include_usage, choices })
}

/// Accepts what OpenAI clients send in a message beyond the engine's fields: content as a list of
/// text parts, and the null or empty members a response message carries when sent back.
fn normalize_message(message: &mut Value, index: usize) -> Result<(), ApiError> {
    let Value::Object(fields) = message else {
        return Err(ApiError::invalid(format!("messages[{index}]: must be an object, got {}", kind_of(message))).param("messages"));
    };
    fields.retain(|name, value| !value.is_null() && !matches!(name.as_str(), "refusal" | "annotations"));
    if let Some(Value::Array(parts)) = fields.get("content") {
        let mut text = String::new();
        for (j, part) in parts.iter().enumerate() {
            match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(part_text)) => text.push_str(part_text),
                _ => {
                    return Err(ApiError::unsupported(
                        "messages",
                        format!("messages[{index}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                    ))
                }
            }
        }
        fields.insert("content".into(), Value::String(text));
    }
    Ok(())
}

/// Checks one field's type, naming the field (and the place inside it) when it is wrong.
fn field<T: DeserializeOwned>(object: &Map<String, Value>, name: &str) -> Result<Option<T>, ApiError> {
    let Some(value) = object.get(name) else { return Ok(None) };
    serde_path_to_error::deserialize::<_, T>(value).map(Some).map_err(|error| {
        let inner = error.path().to_string();
        let place = match inner.as_str() {
            "." => name.to_string(),
            path if path.starts_with('[') => format!("{name}{path}"),
            path => format!("{name}.{path}"),
        };
        ApiError::invalid(format!("{place}: {}", error.into_inner())).param(name)
    })
}

/// The whole object as a typed request; the field checks above catch nearly everything first.
fn typed<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(object)).map_err(|error| ApiError::invalid(format!("invalid request: {error}")))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_webgpu::api::Stop;

    fn chat_error(body: &str) -> ApiError {
        parse_chat(body.as_bytes()).err().expect("an error")
    }

    fn chat(body: &str) -> ChatCompletionRequest {
        match parse_chat(body.as_bytes()).unwrap_or_else(|e| panic!("{}", e.message)).work {
            Work::Chat(request) => request,
            _ => unreachable!(),
        }
    }

    #[test]
    fn chat_request_with_openai_extras() {
        let parsed = parse_chat(br#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#).unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(parsed.choices, 3);
        let request = chat(
            r#"{"model": "x", "messages": [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
                {"role": "assistant", "content": "ok", "refusal": null, "tool_calls": null}],
                "temperature": 0, "max_completion_tokens": 5, "stop": "\n", "seed": -1, "n": 1, "user": "u"}"#,
        );
        assert_eq!(request.messages[0], ChatMessage::new("system", "Be brief."));
        assert_eq!(request.messages[1], ChatMessage::new("assistant", "ok"));
        assert_eq!(request.sampling.temperature, Some(0.0));
        assert_eq!(request.sampling.max_tokens, Some(5));
        assert_eq!(request.sampling.stop, Some(Stop::One("\n".into())));
        assert_eq!(request.sampling.seed, Some(u64::MAX));
    }

    #[test]
    fn tools_keep_the_key_order_the_client_sent() {
        let request = chat(
            r#"{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function":
                {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"z": {}, "a": {}}}}}]}"#,
        );
        let function = serde_json::to_string(&request.tools.unwrap()[0].function).unwrap();
        assert_eq!(function, r#"{"name":"f","description":"d","parameters":{"type":"object","properties":{"z":{},"a":{}}}}"#);
    }

    #[test]
    fn errors_name_the_field() {
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#);
        assert!(e.message.starts_with("temperature: invalid type: string \"hot\""), "{}", e.message);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = chat_error(r#"{"messages": [{"role": "user", "content": 5}]}"#);
        assert!(e.message.starts_with("messages[0].content: invalid type"), "{}", e.message);
        let e = chat_error(r#"{"messages": "hi"}"#);
        assert_eq!(e.message, "messages: must be a list of messages, got a string");
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}"#);
        assert!(e.message.starts_with("max_tokens: invalid value: integer `-3`"), "{}", e.message);
    }

    #[test]
    fn malformed_json_says_where() {
        let e = chat_error("{\"messages\": [}");
        assert_eq!(e.status, 400);
        assert!(e.message.contains("line 1 column 15"), "{}", e.message);
    }

    #[test]
    fn unsupported_features_are_explicit() {
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "n": 0}"#);
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("n"), "n = 0: a request takes 1 to 128 choices"));
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}"#);
        assert_eq!(e.param.as_deref(), Some("response_format"));
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}"#);
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("top_logprobs"), "top_logprobs needs logprobs: true"));
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}"#);
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "sometimes"}"#);
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = parse_completion(br#"{"prompt": "a", "logprobs": true}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
        let e = parse_completion(br#"{"prompt": ["a", "b"]}"#).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn completion_prompts() {
        let parsed = parse_completion(br#"{"prompt": [1, 2, 3], "stream": true, "stream_options": {"include_usage": true}}"#).unwrap();
        assert!(parsed.stream && parsed.include_usage);
        assert!(matches!(parsed.work, Work::Tokens { ref prompt, .. } if prompt == &[1, 2, 3]));
        let parsed = parse_completion(br#"{"prompt": ["Once"], "max_tokens": 3}"#).unwrap();
        assert!(matches!(parsed.work, Work::Complete(ref r) if r.prompt == "Once" && r.sampling.max_tokens == Some(3)));
    }
}
