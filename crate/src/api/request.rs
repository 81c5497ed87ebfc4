//! Reading OpenAI request bodies into the engine's request types, the same for every host (serve,
//! the JS API), with errors that say what is wrong and where. The body is parsed as JSON first (so a
//! syntax error gives its line and column), then each known field is checked on its own (serde's
//! message for a flattened struct would not name the field), then the whole object becomes the
//! typed request. Fields that ask for what the engine cannot do are rejected; unknown fields are
//! ignored, as most OpenAI-compatible servers do, or refused ([`UnknownFields`]).

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ChatCompletionRequest, ChatMessage, CompletionRequest, Prediction, ResponseFormat, SamplingParams, Tool, ToolChoice};
use crate::engine::{Endpoint, EngineError, MAX_CHOICES, MAX_TOP_LOGPROBS};
use crate::text::TextError;

/// A request the host refuses, naming the field at fault (`param`, OpenAI's name) where one is.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestError {
    pub message: String,
    pub param: Option<String>,
    /// The field asks for what the engine does not do (OpenAI's `unsupported_parameter`), rather
    /// than holding a wrong value.
    pub unsupported: bool,
}

impl RequestError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { message: message.into(), param: None, unsupported: false }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self { message: message.into(), param: Some(param.into()), unsupported: true }
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
}

/// What a request asks the engine to do.
#[derive(Clone, Debug)]
pub enum Work {
    Chat(ChatCompletionRequest),
    /// A text completion of each prompt, its choices numbered prompt by prompt as OpenAI numbers
    /// them (choice i is prompt i / n's); with `echo`, each choice gives its prompt back first.
    Complete { prompts: Vec<Prompt>, sampling: SamplingParams, echo: bool },
}

/// A text completion's prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// After the model's BOS token, with special-token text parsed.
    Text(String),
    /// Token ids, run as given.
    Tokens(Vec<u32>),
}

impl Work {
    /// A completion of one prompt of token ids.
    pub fn tokens(prompt: Vec<u32>, sampling: SamplingParams) -> Self {
        Work::Complete { prompts: vec![Prompt::Tokens(prompt)], sampling, echo: false }
    }

    pub fn endpoint(&self) -> Endpoint {
        match self {
            Work::Chat(_) => Endpoint::Chat,
            Work::Complete { .. } => Endpoint::Completion,
        }
    }

    /// The request field at fault when the engine refused the work with `error`, if the error is
    /// the client's.
    pub fn blamed_field(&self, error: &crate::Error) -> Option<&'static str> {
        let crate::Error::Engine(engine_error) = error else { return None };
        match engine_error {
            // Token ids given as the prompt are the client's.
            EngineError::Text(TextError::UnknownTokenId { .. }) if matches!(self, Work::Complete { .. }) => Some("prompt"),
            other => other.blamed_field(self.endpoint()),
        }
    }
}

/// What a host does with the fields no request type knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownFields {
    /// As OpenAI-compatible servers do (clients send vendor extras).
    Ignore,
    /// As the JS API does: a misspelt option is a mistake to report, not to drop.
    Refuse,
}

/// A request ready for the engine.
pub struct Parsed {
    pub work: Work,
    /// Choices to generate (`n`).
    pub choices: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: end the stream with a usage chunk.
    pub include_usage: bool,
}

impl Parsed {
    /// The choices of the response: `n` for each prompt.
    pub fn all_choices(&self) -> usize {
        match &self.work {
            Work::Chat(_) => self.choices,
            Work::Complete { prompts, .. } => prompts.len() * self.choices,
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The variables a chat template gets from the request and the model, which
/// `chat_template_kwargs` may not set.
const TEMPLATE_VARIABLES: [&str; 6] = ["messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"];

/// A chat completion request (`POST /v1/chat/completions`'s body as a JSON object).
pub fn read_chat(mut object: Map<String, Value>, unknown: UnknownFields) -> Result<Parsed, RequestError> {
    let Common { stream, include_usage, choices } = common_fields(&mut object, false)?;
    if object.get("logprobs").is_some_and(Value::is_number) {
        return Err(RequestError::invalid("logprobs: chat completions take true or false (top_logprobs counts the alternatives)").param("logprobs"));
    }
    let logprobs = field::<bool>(&object, "logprobs")?.unwrap_or(false);
    if let Some(top) = field::<u32>(&object, "top_logprobs")? {
        if !logprobs {
            return Err(RequestError::invalid("top_logprobs needs logprobs: true").param("top_logprobs"));
        }
        if top as usize > MAX_TOP_LOGPROBS {
            return Err(RequestError::invalid(format!("top_logprobs = {top}: at most {MAX_TOP_LOGPROBS}")).param("top_logprobs"));
        }
    }

    match object.get_mut("messages") {
        None | Some(Value::Null) => return Err(RequestError::invalid("messages is required").param("messages")),
        Some(Value::Array(messages)) => {
            if messages.is_empty() {
                return Err(RequestError::invalid("messages must not be empty").param("messages"));
            }
            for (i, message) in messages.iter_mut().enumerate() {
                normalize_message(message, i)?;
            }
        }
        Some(other) => {
            return Err(RequestError::invalid(format!("messages: must be a list of messages, got {}", kind_of(other))).param("messages"))
        }
    }
    field::<Vec<ChatMessage>>(&object, "messages")?;

    field::<Option<Vec<Tool>>>(&object, "tools")?;
    if let Some(choice) = object.get("tool_choice") {
        if serde_json::from_value::<ToolChoice>(choice.clone()).is_err() {
            return Err(RequestError::invalid(
                "tool_choice: must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )
            .param("tool_choice"));
        }
    }
    field::<bool>(&object, "parallel_tool_calls")?;
    field::<Vec<String>>(&object, "builtin_tools")?;
    if let Some(kwargs) = field::<Map<String, Value>>(&object, "chat_template_kwargs")? {
        if let Some(name) = kwargs.keys().find(|name| TEMPLATE_VARIABLES.contains(&name.as_str())) {
            let message = format!("chat_template_kwargs.{name}: the request itself gives the template its {name}");
            return Err(RequestError::invalid(message).param("chat_template_kwargs"));
        }
    }

    let request: ChatCompletionRequest = typed(object, unknown)?;
    Ok(Parsed { work: Work::Chat(request), choices, stream, include_usage })
}

/// A text completion request (`POST /v1/completions`'s body as a JSON object).
pub fn read_completion(mut object: Map<String, Value>, unknown: UnknownFields) -> Result<Parsed, RequestError> {
    let echo = field::<Option<bool>>(&object, "echo")?.flatten().unwrap_or(false);
    object.remove("echo");
    // No token after the prompt: the prompt alone comes back (scored, with logprobs).
    let Common { stream, include_usage, choices } = common_fields(&mut object, echo)?;
    if field::<Option<String>>(&object, "suffix")?.flatten().is_some_and(|s| !s.is_empty()) {
        return Err(RequestError::unsupported("suffix", "suffix (fill-in-the-middle) is not supported: Llama 3.1 has no infill format"));
    }
    if let Some(n) = field::<Option<u32>>(&object, "best_of")?.flatten().filter(|&n| n != 1) {
        return Err(RequestError::unsupported("best_of", format!("best_of = {n} is not supported: every generated choice is returned (use n)")));
    }
    if object.get("logprobs").is_some_and(Value::is_boolean) {
        return Err(RequestError::invalid("logprobs: text completions take the number of alternatives to return with each token").param("logprobs"));
    }
    if object.contains_key("top_logprobs") {
        return Err(RequestError::invalid("top_logprobs: text completions take the number of alternatives in logprobs").param("top_logprobs"));
    }
    if let Some(alternatives) = field::<u32>(&object, "logprobs")? {
        if alternatives as usize > MAX_TOP_LOGPROBS {
            return Err(RequestError::invalid(format!("logprobs = {alternatives}: at most {MAX_TOP_LOGPROBS}")).param("logprobs"));
        }
    }

    let prompts = match object.remove("prompt").unwrap_or(Value::Null) {
        Value::Null => return Err(RequestError::invalid("prompt is required").param("prompt")),
        Value::String(text) => vec![Prompt::Text(text)],
        Value::Array(items) if items.is_empty() => return Err(RequestError::invalid("prompt must not be empty").param("prompt")),
        Value::Array(items) if items.iter().all(Value::is_number) => vec![Prompt::Tokens(token_ids(&items, "prompt")?)],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(Prompt::Text(text.clone())),
                Value::Array(ids) => Ok(Prompt::Tokens(token_ids(ids, &format!("prompt[{i}]"))?)),
                other => Err(RequestError::invalid(format!("prompt[{i}]: must be a string or a list of token ids, got {}", kind_of(other))).param("prompt")),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(RequestError::invalid(format!("prompt: must be a string or a list of token ids, got {}", kind_of(&other))).param("prompt"))
        }
    };
    if prompts.len() * choices > MAX_CHOICES {
        let message = format!("{} prompts with n = {choices}: a request takes at most {MAX_CHOICES} choices in all", prompts.len());
        return Err(RequestError::invalid(message).param("prompt"));
    }
    object.insert("prompt".into(), Value::String(String::new()));
    let request: CompletionRequest = typed(object, unknown)?;
    Ok(Parsed { work: Work::Complete { prompts, sampling: request.sampling, echo }, choices, stream, include_usage })
}

/// What `POST /tokenize` tokenizes (vLLM's request): a text completion's prompt, or a chat
/// request's messages (and tools) as its template renders them.
#[derive(Clone, Debug)]
pub enum TokenizeInput {
    /// With `add_special_tokens` (default true), after the model's BOS token, as a completion's.
    Text { text: String, add_special_tokens: bool },
    /// The prompt of this chat request, its generation prompt added unless `add_generation_prompt`
    /// is false.
    Chat { request: Box<ChatCompletionRequest>, add_generation_prompt: bool },
}

impl TokenizeInput {
    /// The field an error of its tokenizing blames.
    pub fn field(&self) -> &'static str {
        match self {
            TokenizeInput::Text { .. } => "prompt",
            TokenizeInput::Chat { .. } => "messages",
        }
    }
}

/// A tokenize request: its input, and whether each token's vocabulary piece is returned too.
#[derive(Clone, Debug)]
pub struct TokenizeRequest {
    pub input: TokenizeInput,
    pub return_token_strs: bool,
}

/// `POST /tokenize`'s body: `prompt` (a string) or `messages`, not both.
pub fn read_tokenize(mut object: Map<String, Value>) -> Result<TokenizeRequest, RequestError> {
    object.retain(|_, value| !value.is_null());
    let return_token_strs = field::<bool>(&object, "return_token_strs")?.unwrap_or(false);
    let add_special_tokens = field::<bool>(&object, "add_special_tokens")?;
    let add_generation_prompt = field::<bool>(&object, "add_generation_prompt")?;
    field::<String>(&object, "model")?;
    let input = match (object.remove("prompt"), object.contains_key("messages")) {
        (Some(_), true) => return Err(RequestError::invalid("prompt and messages: give one of them").param("prompt")),
        (None, false) => return Err(RequestError::invalid("prompt (a text) or messages (a chat) is required").param("prompt")),
        (Some(Value::String(text)), false) => {
            if add_generation_prompt.is_some() {
                return Err(RequestError::invalid("add_generation_prompt: only messages take it").param("add_generation_prompt"));
            }
            TokenizeInput::Text { text, add_special_tokens: add_special_tokens.unwrap_or(true) }
        }
        (Some(other), false) => return Err(RequestError::invalid(format!("prompt: must be a string, got {}", kind_of(&other))).param("prompt")),
        (None, true) => {
            if add_special_tokens == Some(true) {
                let message = "add_special_tokens: messages are tokenized as the chat template renders them, its special tokens included";
                return Err(RequestError::invalid(message).param("add_special_tokens"));
            }
            for name in ["return_token_strs", "add_special_tokens", "add_generation_prompt"] {
                object.remove(name);
            }
            let Work::Chat(request) = read_chat(object, UnknownFields::Ignore)?.work else { unreachable!("read_chat reads a chat") };
            TokenizeInput::Chat { request: Box::new(request), add_generation_prompt: add_generation_prompt.unwrap_or(true) }
        }
    };
    Ok(TokenizeRequest { input, return_token_strs })
}

/// `POST /detokenize`'s body: the token ids in `tokens`.
pub fn read_detokenize(object: Map<String, Value>) -> Result<Vec<u32>, RequestError> {
    match object.get("tokens") {
        None | Some(Value::Null) => Err(RequestError::invalid("tokens is required").param("tokens")),
        Some(Value::Array(items)) => ids(items, "tokens", "tokens"),
        Some(other) => Err(RequestError::invalid(format!("tokens: must be a list of token ids, got {}", kind_of(other))).param("tokens")),
    }
}

/// The token ids of the prompt at `path` ("prompt" or "prompt[i]").
fn token_ids(items: &[Value], path: &str) -> Result<Vec<u32>, RequestError> {
    if items.is_empty() {
        return Err(RequestError::invalid(format!("{path} must not be empty")).param("prompt"));
    }
    ids(items, path, "prompt")
}

/// The token ids of the list at `path`, of field `param`.
fn ids(items: &[Value], path: &str, param: &str) -> Result<Vec<u32>, RequestError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| RequestError::invalid(format!("{path}[{i}]: {v} is not a token id")).param(param))
        })
        .collect()
}

/// A request body as the JSON object the readers take.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, RequestError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(RequestError::invalid(format!("the request body must be a JSON object, got {}", kind_of(&other)))),
        Err(error) => Err(RequestError::invalid(format!("the request body is not valid JSON: {error}"))),
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

/// Fields both endpoints share: stream, n, stream_options, model, and the sampling parameters;
/// `max_tokens` may be 0 only where `zero_tokens` (a completion's echo).
fn common_fields(object: &mut Map<String, Value>, zero_tokens: bool) -> Result<Common, RequestError> {
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
        "chat_template_kwargs",
        "prediction",
    ] {
        if object.get(name).is_some_and(Value::is_null) {
            object.remove(name);
        }
    }
    let stream = field::<bool>(object, "stream")?.unwrap_or(false);
    let choices = field::<u32>(object, "n")?.unwrap_or(1) as usize;
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(RequestError::invalid(format!("n = {choices}: a request takes 1 to {MAX_CHOICES} choices")).param("n"));
    }
    let include_usage = field::<StreamOptions>(object, "stream_options")?.and_then(|o| o.include_usage).unwrap_or(false);
    // Read here, and no field of the request types.
    object.remove("n");
    object.remove("stream_options");
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
        return Err(RequestError::invalid("give max_tokens or max_completion_tokens, not both").param("max_tokens"));
    }
    for name in ["max_tokens", "max_completion_tokens"] {
        if field::<u32>(object, name)? == Some(0) && !zero_tokens {
            return Err(RequestError::invalid(format!("{name} must be at least 1 (0 only with a completion's echo)")).param(name));
        }
    }
    // The newer name of the same limit (SamplingParams reads it as an alias).
    if let Some(limit) = object.remove("max_completion_tokens") {
        object.insert("max_tokens".into(), limit);
    }
    field::<ResponseFormat>(object, "response_format")?;
    if let Some(Value::Array(parts)) = object.get("prediction").and_then(|p| p.get("content")) {
        let text = joined_text_parts(parts, "prediction.content", "prediction")?;
        object["prediction"]["content"] = Value::String(text);
    }
    field::<Prediction>(object, "prediction")?;
    match object.get("stop") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => {}
        Some(Value::Array(_)) => return Err(RequestError::invalid("stop: a list of stop sequences must hold only strings").param("stop")),
        Some(other) => {
            return Err(RequestError::invalid(format!("stop: must be a string or a list of strings, got {}", kind_of(other))).param("stop"))
        }
    }
    Ok(Common { stream, include_usage, choices })
}

/// Accepts what OpenAI clients send in a message beyond the engine's fields: content as a list of
/// text parts, and the null or empty members a response message carries when sent back.
fn normalize_message(message: &mut Value, index: usize) -> Result<(), RequestError> {
    let Value::Object(fields) = message else {
        return Err(RequestError::invalid(format!("messages[{index}]: must be an object, got {}", kind_of(message))).param("messages"));
    };
    fields.retain(|name, value| !value.is_null() && !matches!(name.as_str(), "refusal" | "annotations"));
    // A thought under its newer name (vLLM's `reasoning`); both come where a client sends back a
    // message of ours as it came.
    if let Some(reasoning) = fields.remove("reasoning") {
        fields.entry("reasoning_content").or_insert(reasoning);
    }
    if let Some(Value::Array(parts)) = fields.get("content") {
        let text = joined_text_parts(parts, &format!("messages[{index}].content"), "messages")?;
        fields.insert("content".into(), Value::String(text));
    }
    Ok(())
}

/// The text of content given as a list of text parts (`{"type": "text", "text": ...}`), as
/// OpenAI clients may send it; `place` names it and `param` is blamed for another kind of part.
fn joined_text_parts(parts: &[Value], place: &str, param: &str) -> Result<String, RequestError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
            (Some("text"), Some(part_text)) => text.push_str(part_text),
            _ => return Err(RequestError::unsupported(param, format!("{place}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"))),
        }
    }
    Ok(text)
}

/// Checks one field's type, naming the field (and the place inside it) when it is wrong.
fn field<T: DeserializeOwned>(object: &Map<String, Value>, name: &str) -> Result<Option<T>, RequestError> {
    let Some(value) = object.get(name) else { return Ok(None) };
    serde_path_to_error::deserialize::<_, T>(value).map(Some).map_err(|error| {
        let inner = error.path().to_string();
        let place = match inner.as_str() {
            "." => name.to_string(),
            path if path.starts_with('[') => format!("{name}{path}"),
            path => format!("{name}.{path}"),
        };
        RequestError::invalid(format!("{place}: {}", error.into_inner())).param(name)
    })
}

/// The whole object as a typed request (the field checks above catch nearly everything first), a
/// wrong value naming its field and its place in it; refusing unknown fields, the first one.
fn typed<T: DeserializeOwned + Serialize>(object: Map<String, Value>, unknown: UnknownFields) -> Result<T, RequestError> {
    let object = Value::Object(object);
    let read: T = serde_path_to_error::deserialize(&object).map_err(|error| {
        let field = match error.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
            _ => None,
        };
        let message = match error.path().to_string().as_str() {
            "." => error.inner().to_string(),
            place => format!("{place}: {}", error.inner()),
        };
        RequestError { message, param: field, unsupported: false }
    })?;
    if unknown == UnknownFields::Refuse {
        // Serde skips unknown members, so they are what the value read does not give back when
        // serialized again.
        let kept = serde_json::to_value(&read).map_err(|error| RequestError::invalid(error.to_string()))?;
        if let Some(place) = dropped_member(&object, &kept) {
            let place = place.trim_start_matches('.');
            let field = place.split(['.', '[']).next().unwrap_or_default().to_string();
            return Err(RequestError::invalid(format!("{place}: unknown field")).param(field));
        }
    }
    Ok(read)
}

/// Options of a host's own (the JS API's load and bench options) as a `T`, read as requests are:
/// a wrong value or an unknown member is an error naming the field.
pub fn read_options<T: DeserializeOwned + Serialize>(object: Map<String, Value>) -> Result<T, RequestError> {
    typed(object, UnknownFields::Refuse)
}

/// The place (`.key`, `[index]`, ...) of the first member of `sent` that `kept` lacks; null members
/// count as absent.
fn dropped_member(sent: &Value, kept: &Value) -> Option<String> {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => sent.iter().filter(|(_, value)| !value.is_null()).find_map(|(key, value)| match kept.get(key) {
            None => Some(format!(".{key}")),
            Some(kept) => dropped_member(value, kept).map(|place| format!(".{key}{place}")),
        }),
        (Value::Array(sent), Value::Array(kept)) => {
            sent.iter().zip(kept).enumerate().find_map(|(i, (sent, kept))| dropped_member(sent, kept).map(|place| format!("[{i}]{place}")))
        }
        _ => None,
    }
}

/// What kind of JSON value `value` is, for messages.
pub(crate) fn kind_of(value: &Value) -> &'static str {
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
    use crate::api::Stop;

    fn parse_chat(body: &[u8]) -> Result<Parsed, RequestError> {
        read_chat(parse_body(body)?, UnknownFields::Ignore)
    }

    fn parse_completion(body: &[u8]) -> Result<Parsed, RequestError> {
        read_completion(parse_body(body)?, UnknownFields::Ignore)
    }

    fn chat_error(body: &str) -> RequestError {
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
        // A reasoning model's message sent back as it came: its thought under either name, or both.
        for thought in [r#""reasoning": "t""#, r#""reasoning_content": "t""#, r#""reasoning": "t", "reasoning_content": "t""#] {
            let request = chat(&format!(r#"{{"messages": [{{"role": "assistant", "content": "ok", {thought}}}]}}"#));
            assert_eq!(request.messages[0], ChatMessage { reasoning_content: Some("t".into()), ..ChatMessage::new("assistant", "ok") });
        }
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
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}}"#);
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("chat_template_kwargs"), "chat_template_kwargs.messages: the request itself gives the template its messages"));
        let e = chat_error(r#"{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": true}"#);
        assert_eq!(e.param.as_deref(), Some("chat_template_kwargs"));
        let request = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": false}}"#);
        assert_eq!(request.chat_template_kwargs.unwrap()["enable_thinking"], false);
    }

    #[test]
    fn malformed_json_says_where() {
        let e = chat_error("{\"messages\": [}");
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
        for (body, message) in [
            (r#"["a", 5]"#, "prompt[1]: must be a string or a list of token ids, got a number"),
            (r#"[[1, 2], []]"#, "prompt[1] must not be empty"),
            (r#"[[1, -2]]"#, "prompt[0][1]: -2 is not a token id"),
            (r#"[]"#, "prompt must not be empty"),
        ] {
            let e = parse_completion(format!(r#"{{"prompt": {body}}}"#).as_bytes()).err().unwrap();
            assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("prompt"), message), "{body}");
        }
        let e = parse_completion(br#"{"prompt": ["a", "b", "c"], "n": 50}"#).err().unwrap();
        assert_eq!(e.message, "3 prompts with n = 50: a request takes at most 128 choices in all");
        // OpenAI's legacy completion options: refused when they ask for something, taken at their
        // defaults.
        for (body, param) in [(r#""suffix": "}""#, "suffix"), (r#""best_of": 3"#, "best_of")] {
            let e = parse_completion(format!(r#"{{"prompt": "a", {body}}}"#).as_bytes()).err().unwrap();
            assert_eq!((e.param.as_deref(), e.unsupported), (Some(param), true), "{body}");
        }
        assert!(parse_completion(br#"{"prompt": "a", "echo": false, "suffix": "", "best_of": 1}"#).is_ok());
        assert!(parse_completion(br#"{"prompt": "a", "echo": true, "stream": true}"#).is_ok());
    }

    #[test]
    fn completion_prompts() {
        let parsed = parse_completion(br#"{"prompt": [1, 2, 3], "stream": true, "stream_options": {"include_usage": true}}"#).unwrap();
        assert!(parsed.stream && parsed.include_usage);
        let prompts = |parsed: &Parsed| match &parsed.work {
            Work::Complete { prompts, sampling, .. } => (prompts.clone(), sampling.max_tokens),
            Work::Chat(_) => panic!("a completion read as a chat"),
        };
        assert_eq!(prompts(&parsed), (vec![Prompt::Tokens(vec![1, 2, 3])], None));
        let parsed = parse_completion(br#"{"prompt": ["Once"], "max_tokens": 3}"#).unwrap();
        assert_eq!(prompts(&parsed), (vec![Prompt::Text("Once".into())], Some(3)));
        // OpenAI's batches: several prompts, as text or as token ids.
        let parsed = parse_completion(br#"{"prompt": ["Once", "Twice"], "n": 2}"#).unwrap();
        assert_eq!((prompts(&parsed).0, parsed.choices), (vec![Prompt::Text("Once".into()), Prompt::Text("Twice".into())], 2));
        let parsed = parse_completion(br#"{"prompt": [[1, 2], [3], "x"]}"#).unwrap();
        assert_eq!(prompts(&parsed).0, vec![Prompt::Tokens(vec![1, 2]), Prompt::Tokens(vec![3]), Prompt::Text("x".into())]);
    }

    #[test]
    fn tokenize_takes_a_prompt_or_messages() {
        let text = read_tokenize(parse_body(br#"{"prompt": "hi", "model": null}"#).unwrap()).unwrap();
        assert!(matches!(text.input, TokenizeInput::Text { ref text, add_special_tokens: true } if text == "hi") && !text.return_token_strs);
        let chat = br#"{"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": false, "return_token_strs": true, "temperature": 0.5}"#;
        let chat = read_tokenize(parse_body(chat).unwrap()).unwrap();
        assert!(matches!(chat.input, TokenizeInput::Chat { add_generation_prompt: false, ref request } if request.messages[0] == ChatMessage::new("user", "hi")) && chat.return_token_strs);
        let e = read_tokenize(parse_body(br#"{"messages": "hi"}"#).unwrap()).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert_eq!(read_detokenize(parse_body(br#"{"tokens": []}"#).unwrap()), Ok(vec![]));
        let e = read_detokenize(parse_body(br#"{"tokens": [3, 4.5]}"#).unwrap()).err().unwrap();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("tokens"), "tokens[1]: 4.5 is not a token id"));
    }

    #[test]
    fn a_prediction_is_text_or_text_parts() {
        let prediction = |body: &str| match read_chat(parse_body(body.as_bytes()).unwrap(), UnknownFields::Refuse) {
            Ok(Parsed { work: Work::Chat(request), .. }) => Ok(request.sampling.prediction),
            Ok(_) => unreachable!(),
            Err(e) => Err((e.param, e.message)),
        };
        let messages = r#""messages": [{"role": "user", "content": "hi"}]"#;
        let content = |text: &str| Ok(Some(Prediction::Content { content: text.into() }));
        assert_eq!(prediction(&format!(r#"{{{messages}, "prediction": {{"type": "content", "content": "fn main() {{}}"}}}}"#)), content("fn main() {}"));
        let parts = r#"{"type": "content", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}"#;
        assert_eq!(prediction(&format!(r#"{{{messages}, "prediction": {parts}}}"#)), content("ab"));
        assert_eq!(prediction(&format!(r#"{{{messages}, "prediction": null}}"#)), Ok(None));
        let e = prediction(&format!(r#"{{{messages}, "prediction": {{"type": "diff", "content": "a"}}}}"#)).unwrap_err();
        assert_eq!(e.0.as_deref(), Some("prediction"), "{}", e.1);
        assert!(e.1.starts_with("prediction.type: unknown variant `diff`"), "{}", e.1);
        let e = prediction(&format!(r#"{{{messages}, "prediction": {{"type": "content", "content": [{{"type": "image_url"}}]}}}}"#)).unwrap_err();
        assert_eq!(e, (Some("prediction".into()), r#"prediction.content[0]: only text parts ({"type": "text", "text": ...}) are supported"#.into()));
    }

    #[test]
    fn unknown_fields_are_ignored_or_refused_by_name() {
        let body = br#"{"messages": [{"role": "user", "content": "hi"}], "user": "u", "n": 2, "stream": true,
            "stream_options": {"include_usage": true}, "max_completion_tokens": 4}"#;
        let parsed = read_chat(parse_body(body).unwrap(), UnknownFields::Ignore).unwrap();
        assert_eq!((parsed.choices, parsed.stream, parsed.include_usage), (2, true, true));
        let e = read_chat(parse_body(body).unwrap(), UnknownFields::Refuse).err().unwrap();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("user"), "user: unknown field"));
        let known = br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "n": 2, "stream": true, "max_completion_tokens": 4, "seed": -1}"#;
        let parsed = read_chat(parse_body(known).unwrap(), UnknownFields::Refuse).unwrap_or_else(|e| panic!("{}", e.message));
        assert!(matches!(parsed.work, Work::Chat(ref r) if r.sampling.max_tokens == Some(4) && r.messages[0] == ChatMessage::new("user", "hi")));
        let nested = br#"{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"schma": {}}}}"#;
        let e = read_chat(parse_body(nested).unwrap(), UnknownFields::Refuse).err().unwrap();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("response_format"), "response_format.json_schema.schma: unknown field"));
        let e = read_completion(parse_body(br#"{"prompt": "a", "echoes": 1}"#).unwrap(), UnknownFields::Refuse).err().unwrap();
        assert_eq!(e.param.as_deref(), Some("echoes"));
    }
}
