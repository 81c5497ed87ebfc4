//! OpenAI's Responses API (`POST /v1/responses`) on the chat engine. A request's instructions, its
//! input items and the turns of the stored response it continues become a chat request of one
//! choice; its completion becomes a response object whose output items are a message and function
//! calls, or, streamed, Responses' typed events. A [`ResponseStore`] in each host keeps responses
//! for `previous_response_id` and lists their input items.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Map, Value};

use super::request::{kind_of, read_chat, Parsed, RequestError, UnknownFields, Work};
use super::response::chat_logprobs;
use super::{ChatMessage, FinishReason, FunctionCall, TokenLogprob, ToolCall};
use crate::engine::Delta;
use crate::Completion;

/// The `include` value that asks for the output tokens' log probabilities.
const LOGPROBS_INCLUDE: &str = "message.output_text.logprobs";

/// Request fields passed to the chat request as they are: the sampling options both APIs share,
/// and the chat extensions (top_k, seed, stop, ...) this server takes on either.
const CHAT_FIELDS: [&str; 14] = [
    "model",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "stop",
    "parallel_tool_calls",
    "prediction",
];

/// Responses fields read here and not passed on as they are.
const RESPONSES_FIELDS: [&str; 20] = [
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "max_output_tokens",
    "include",
    "top_logprobs",
    "store",
    "previous_response_id",
    "metadata",
    "user",
    "truncation",
    "reasoning",
    "background",
    "stream_options",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "max_tool_calls",
];

/// A Responses request read for the engine.
pub struct ResponsesRequest {
    /// A chat request of one choice.
    pub parsed: Parsed,
    /// The turns before this response's output: the continued response's, then this input. The
    /// instructions are not among them: OpenAI does not carry them on to the next response.
    pub conversation: Conversation,
    /// Whether the host keeps the response for `previous_response_id` (OpenAI's default: yes).
    pub store: bool,
    /// The request's settings as the response object repeats them.
    pub settings: Map<String, Value>,
}

impl ResponsesRequest {
    /// Whether the response carries its tokens' log probabilities.
    pub fn logprobs(&self) -> bool {
        matches!(&self.parsed.work, Work::Chat(chat) if chat.sampling.logprobs_wanted().is_some())
    }
}

/// Turns of a conversation, as chat messages for the model and as the Responses items they came
/// as (what `input_items` lists; an assistant's message and its calls are one chat turn but
/// several items).
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    items: Vec<Value>,
}

impl Conversation {
    fn extend(&mut self, more: Conversation) {
        self.messages.extend(more.messages);
        self.items.extend(more.items);
    }
}

/// `previous_response_id`: the stored response whose turns the request continues.
pub fn previous_response_id(object: &Map<String, Value>) -> Result<Option<String>, RequestError> {
    match object.get("previous_response_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(other) => Err(RequestError::invalid(format!("previous_response_id: must be a string, got {}", kind_of(other))).param("previous_response_id")),
    }
}

/// Reads a Responses request body; `previous` holds the turns of the response that
/// `previous_response_id` names (its input and output), none without one.
pub fn read_responses(mut object: Map<String, Value>, unknown: UnknownFields, previous: Conversation) -> Result<ResponsesRequest, RequestError> {
    object.retain(|_, value| !value.is_null());
    if unknown == UnknownFields::Refuse {
        if let Some(name) = object.keys().find(|name| !CHAT_FIELDS.contains(&name.as_str()) && !RESPONSES_FIELDS.contains(&name.as_str())) {
            return Err(RequestError::invalid(format!("{name}: unknown field")).param(name.clone()));
        }
    }
    refuse_unsupported(&object)?;

    let mut conversation = previous;
    match object.get("input") {
        Some(input) => conversation.extend(input_turns(input)?),
        None if conversation.messages.is_empty() => return Err(RequestError::invalid("input is required").param("input")),
        None => {}
    }
    let instructions = match object.get("instructions") {
        None => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => return Err(RequestError::invalid(format!("instructions: must be a string, got {}", kind_of(other))).param("instructions")),
    };

    let mut chat = Map::new();
    for name in CHAT_FIELDS {
        if let Some(value) = object.get(name) {
            chat.insert(name.into(), value.clone());
        }
    }
    let messages: Vec<ChatMessage> = instructions.iter().map(|text| ChatMessage::new("system", text)).chain(conversation.messages.iter().cloned()).collect();
    chat.insert("messages".into(), serde_json::to_value(&messages).map_err(|e| RequestError::invalid(e.to_string()))?);
    if let Some(tools) = object.get("tools") {
        chat.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = object.get("tool_choice") {
        chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    if let Some(format) = text_format(&object)? {
        chat.insert("response_format".into(), format);
    }
    if let Some(limit) = object.get("max_output_tokens") {
        if limit.as_u64() == Some(0) {
            return Err(RequestError::invalid("max_output_tokens must be at least 1").param("max_output_tokens"));
        }
        chat.insert("max_tokens".into(), limit.clone());
    }
    let include = match object.get("include") {
        None => vec![],
        Some(value) => serde_json::from_value::<Vec<String>>(value.clone())
            .map_err(|_| RequestError::invalid(format!("include: must be a list of strings, got {}", kind_of(value))).param("include"))?,
    };
    // Log probabilities come back where include asks for them; alternatives alone ask too.
    let top_logprobs = object.get("top_logprobs");
    if include.iter().any(|name| name == LOGPROBS_INCLUDE) || top_logprobs.is_some_and(|top| top.as_u64() != Some(0)) {
        chat.insert("logprobs".into(), Value::Bool(true));
        if let Some(top) = top_logprobs {
            chat.insert("top_logprobs".into(), top.clone());
        }
    }
    let parsed = read_chat(chat, UnknownFields::Ignore).map_err(|mut error| {
        error.param = error.param.map(|param| responses_param(&param).to_string());
        error
    })?;
    let store = match object.get("store") {
        None => true,
        Some(Value::Bool(store)) => *store,
        Some(other) => return Err(RequestError::invalid(format!("store: must be true or false, got {}", kind_of(other))).param("store")),
    };
    Ok(ResponsesRequest { parsed, conversation, store, settings: settings(&object, store) })
}

/// The Responses name of a chat request's field, for errors the chat request or the engine
/// blames on it.
pub fn responses_param(chat_param: &str) -> &str {
    match chat_param {
        "messages" => "input",
        "response_format" => "text",
        "max_tokens" => "max_output_tokens",
        "logprobs" => "top_logprobs",
        other => other,
    }
}

/// Fields that ask for what this server does not do.
fn refuse_unsupported(object: &Map<String, Value>) -> Result<(), RequestError> {
    if object.get("background") == Some(&Value::Bool(true)) {
        return Err(RequestError::unsupported("background", "background: true is not supported: responses run while the request waits (use stream: true to see them as they come)"));
    }
    match object.get("truncation") {
        None => {}
        Some(Value::String(mode)) if mode == "disabled" => {}
        Some(Value::String(mode)) if mode == "auto" => {
            let message = "truncation: \"auto\" is not supported: an input longer than the context is an error (truncation: \"disabled\")";
            return Err(RequestError::unsupported("truncation", message));
        }
        Some(other) => return Err(RequestError::invalid(format!("truncation: must be \"auto\" or \"disabled\", got {other}")).param("truncation")),
    }
    for name in ["conversation", "prompt"] {
        if object.contains_key(name) {
            let what = if name == "conversation" { "conversations are not supported: continue a response with previous_response_id" } else { "stored prompt templates are not supported" };
            return Err(RequestError::unsupported(name, format!("{name}: {what}")));
        }
    }
    if let Some(n) = object.get("n").filter(|n| n.as_u64() != Some(1)) {
        return Err(RequestError::unsupported("n", format!("n = {n}: a response has one output (use chat completions for several choices)")));
    }
    Ok(())
}

/// `input`: a user message as a string, or a list of items: messages (`type` "message" or none),
/// the model's function calls and their outputs. The items are kept as OpenAI lists them (content
/// as parts, a status); their ids are given when the response is kept, where the client gave none.
fn input_turns(input: &Value) -> Result<Conversation, RequestError> {
    let items = match input {
        Value::String(text) => return input_turns(&json!([{"role": "user", "content": text}])),
        Value::Array(items) if items.is_empty() => return Err(RequestError::invalid("input must not be empty").param("input")),
        Value::Array(items) => items,
        other => return Err(RequestError::invalid(format!("input: must be a string or a list of items, got {}", kind_of(other))).param("input")),
    };
    let mut messages: Vec<ChatMessage> = vec![];
    let mut kept = vec![];
    for (i, item) in items.iter().enumerate() {
        let place = format!("input[{i}]");
        let Value::Object(fields) = item else {
            return Err(RequestError::invalid(format!("{place}: must be an object, got {}", kind_of(item))).param("input"));
        };
        let id = fields.get("id").filter(|id| id.is_string());
        match fields.get("type").and_then(Value::as_str).unwrap_or("message") {
            "message" => {
                let given_role = string_member(fields, "role", &place)?;
                let role = match given_role {
                    "developer" => "system",
                    role @ ("system" | "user" | "assistant") => role,
                    role => return Err(RequestError::invalid(format!("{place}.role: {role:?} is not one of user, assistant, system, developer")).param("input")),
                };
                let content = content_text(fields.get("content"), &format!("{place}.content"))?;
                let parts = match fields.get("content") {
                    Some(Value::Array(parts)) => Value::Array(parts.clone()),
                    _ if role == "assistant" => json!([{"type": "output_text", "text": content, "annotations": []}]),
                    _ => json!([{"type": "input_text", "text": content}]),
                };
                kept.push(json!({"type": "message", "id": id, "role": given_role, "content": parts, "status": "completed"}));
                messages.push(ChatMessage::new(role, &content));
            }
            "function_call" => {
                let (call_id, name, arguments) = (string_member(fields, "call_id", &place)?, string_member(fields, "name", &place)?, string_member(fields, "arguments", &place)?);
                kept.push(json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": "completed"}));
                let call = ToolCall {
                    id: Some(call_id.to_string()),
                    kind: "function".into(),
                    function: FunctionCall { name: name.to_string(), arguments: Value::String(arguments.to_string()) },
                };
                // Calls right after the assistant's message, or after each other, are one turn.
                match messages.last_mut().filter(|message| message.role == "assistant") {
                    Some(turn) => turn.tool_calls.get_or_insert_with(Vec::new).push(call),
                    None => messages.push(ChatMessage { role: "assistant".into(), tool_calls: Some(vec![call]), ..Default::default() }),
                }
            }
            "function_call_output" => {
                let call_id = string_member(fields, "call_id", &place)?.to_string();
                let output = content_text(fields.get("output"), &format!("{place}.output"))?;
                kept.push(json!({"type": "function_call_output", "id": id, "call_id": call_id, "output": fields["output"], "status": "completed"}));
                messages.push(ChatMessage { role: "tool".into(), content: Some(output), tool_call_id: Some(call_id), ..Default::default() });
            }
            // A thought given back with the output it led to (as clients pass a response's whole
            // output on): kept as an item, left out of the turns, as reasoning models' templates
            // leave earlier thoughts out of the prompt.
            "reasoning" => kept.push(item.clone()),
            "item_reference" => {
                return Err(RequestError::unsupported("input", format!("{place}: item references are not supported: send the item, or continue its response with previous_response_id")))
            }
            kind => return Err(RequestError::unsupported("input", format!("{place}: items of type {kind:?} are not supported (message, function_call and function_call_output are)"))),
        }
    }
    Ok(Conversation { messages, items: kept })
}

/// A message's content or a call's output: a string, or a list of text parts (input_text,
/// output_text, a refusal's text).
fn content_text(content: Option<&Value>, place: &str) -> Result<String, RequestError> {
    match content {
        None => Err(RequestError::invalid(format!("{place} is required")).param("input")),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let member = if kind == Some("refusal") { "refusal" } else { "text" };
                match (kind, part.get(member).and_then(Value::as_str)) {
                    (Some("input_text" | "output_text" | "refusal"), Some(part_text)) => text.push_str(part_text),
                    (Some(kind @ ("input_image" | "input_file" | "input_audio")), _) => {
                        return Err(RequestError::unsupported("input", format!("{place}[{j}]: {kind} is not supported: Llama 3.1 reads text only")))
                    }
                    _ => return Err(RequestError::invalid(format!("{place}[{j}]: must be a text part ({{\"type\": \"input_text\", \"text\": ...}})")).param("input")),
                }
            }
            Ok(text)
        }
        Some(other) => Err(RequestError::invalid(format!("{place}: must be a string or a list of parts, got {}", kind_of(other))).param("input")),
    }
}

fn string_member<'a>(fields: &'a Map<String, Value>, name: &str, place: &str) -> Result<&'a str, RequestError> {
    match fields.get(name) {
        Some(Value::String(value)) => Ok(value),
        None | Some(Value::Null) => Err(RequestError::invalid(format!("{place}.{name} is required")).param("input")),
        Some(other) => Err(RequestError::invalid(format!("{place}.{name}: must be a string, got {}", kind_of(other))).param("input")),
    }
}

/// Responses' function tools (`{"type": "function", "name", "description", "parameters",
/// "strict"}`) as chat's (`{"type": "function", "function": {...}}`).
fn chat_tools(tools: &Value) -> Result<Value, RequestError> {
    let Value::Array(tools) = tools else {
        return Err(RequestError::invalid(format!("tools: must be a list of tools, got {}", kind_of(tools))).param("tools"));
    };
    let mut chat_tools = vec![];
    for (i, tool) in tools.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(kind) => return Err(RequestError::unsupported("tools", format!("tools[{i}]: tools of type {kind:?} are not supported (function tools are)"))),
            None => return Err(RequestError::invalid(format!("tools[{i}].type is required (\"function\")")).param("tools")),
        }
        let Some(Value::String(_)) = tool.get("name") else {
            return Err(RequestError::invalid(format!("tools[{i}].name is required: the function's name")).param("tools"));
        };
        let mut function = tool.as_object().cloned().unwrap_or_default();
        function.remove("type");
        chat_tools.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(chat_tools))
}

/// `tool_choice`: "none", "auto", "required" or `{"type": "function", "name": ...}`.
fn chat_tool_choice(choice: &Value) -> Result<Value, RequestError> {
    match choice {
        Value::String(mode) if ["none", "auto", "required"].contains(&mode.as_str()) => Ok(choice.clone()),
        Value::Object(fields) if fields.get("type").and_then(Value::as_str) == Some("function") => match fields.get("name") {
            Some(Value::String(name)) => Ok(json!({"type": "function", "function": {"name": name}})),
            _ => Err(RequestError::invalid("tool_choice.name is required: the function's name").param("tool_choice")),
        },
        _ => Err(RequestError::invalid("tool_choice: must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}").param("tool_choice")),
    }
}

/// `text.format` as chat's `response_format`: text, a JSON object, a JSON schema (`name`,
/// `schema`, `strict`, `description` beside the type), or this server's grammars.
fn text_format(object: &Map<String, Value>) -> Result<Option<Value>, RequestError> {
    let Some(format) = object.get("text").and_then(|text| text.get("format")) else { return Ok(None) };
    let Value::Object(fields) = format else {
        return Err(RequestError::invalid(format!("text.format: must be an object, got {}", kind_of(format))).param("text"));
    };
    Ok(Some(match fields.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let mut schema = fields.clone();
            schema.remove("type");
            json!({"type": "json_schema", "json_schema": schema})
        }
        Some("text" | "json_object" | "grammar") => format.clone(),
        _ => {
            let message = "text.format.type: must be \"text\", \"json_object\", \"json_schema\" or \"grammar\"";
            return Err(RequestError::invalid(message).param("text"));
        }
    }))
}

/// What the response object repeats of the request, with OpenAI's defaults.
fn settings(object: &Map<String, Value>, store: bool) -> Map<String, Value> {
    let given = |name: &str, default: Value| object.get(name).cloned().unwrap_or(default);
    let mut settings = Map::new();
    settings.insert("instructions".into(), given("instructions", Value::Null));
    settings.insert("max_output_tokens".into(), given("max_output_tokens", Value::Null));
    settings.insert("metadata".into(), given("metadata", json!({})));
    settings.insert("parallel_tool_calls".into(), given("parallel_tool_calls", Value::Bool(true)));
    settings.insert("previous_response_id".into(), given("previous_response_id", Value::Null));
    settings.insert("reasoning".into(), json!({"effort": null, "summary": null}));
    settings.insert("store".into(), Value::Bool(store));
    settings.insert("temperature".into(), given("temperature", json!(1.0)));
    settings.insert("text".into(), given("text", json!({"format": {"type": "text"}})));
    settings.insert("tool_choice".into(), given("tool_choice", json!("auto")));
    settings.insert("tools".into(), given("tools", json!([])));
    settings.insert("top_logprobs".into(), given("top_logprobs", json!(0)));
    settings.insert("top_p".into(), given("top_p", json!(1.0)));
    settings.insert("truncation".into(), json!("disabled"));
    settings.insert("user".into(), given("user", Value::Null));
    settings
}

/// The assistant's turn a completion adds to its conversation: its text and its calls.
fn output_message(completion: &Completion) -> ChatMessage {
    let calls = completion.tool_calls.iter().map(|call| ToolCall {
        id: Some(call.id.clone()),
        kind: "function".into(),
        function: FunctionCall { name: call.name.clone(), arguments: Value::String(call.arguments.clone()) },
    });
    let calls: Vec<ToolCall> = calls.collect();
    let content = (!completion.text.is_empty() || calls.is_empty()).then(|| completion.text.clone());
    ChatMessage { role: "assistant".into(), content, tool_calls: (!calls.is_empty()).then_some(calls), ..Default::default() }
}

/// What a response's objects and events share: its id, creation time, model and settings.
#[derive(Clone, Debug)]
pub struct ResponseHeader {
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    pub model: String,
    pub settings: Map<String, Value>,
}

impl ResponseHeader {
    /// The id's part after `resp_`, which its items' ids share.
    fn serial(&self) -> &str {
        self.id.strip_prefix("resp_").unwrap_or(&self.id)
    }

    fn message_id(&self) -> String {
        format!("msg_{}", self.serial())
    }

    fn call_item_id(&self, index: usize) -> String {
        format!("fc_{}_{index}", self.serial())
    }

    /// The response object in state `status` with `output`, and its usage once it has ended.
    fn object(&self, status: &str, output: Vec<Value>, completion: Option<&Completion>) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "model": self.model,
            "output": output,
            "usage": null,
        });
        for (name, value) in &self.settings {
            object[name] = value.clone();
        }
        if let Some(completion) = completion {
            if completion.finish_reason == FinishReason::Length {
                object["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
            let usage = &completion.usage;
            object["usage"] = json!({
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                "total_tokens": usage.total_tokens,
            });
        }
        object
    }

    /// The finished response: the model's thought where it wrote one, a message with the text
    /// (none where the output is only calls), then an item per function call.
    pub fn response(&self, completion: &Completion) -> Value {
        let mut output: Vec<Value> = completion.reasoning.iter().map(|thought| self.reasoning_item(Some(thought))).collect();
        if !completion.text.is_empty() || completion.tool_calls.is_empty() {
            let logprobs = completion.logprobs.as_deref().map(logprob_entries);
            output.push(self.message_item("completed", vec![text_part(&completion.text, logprobs)]));
        }
        output.extend(completion.tool_calls.iter().enumerate().map(|(k, call)| self.call_item(k, "completed", &call.id, &call.name, &call.arguments)));
        self.object(status_of(completion.finish_reason), output, Some(completion))
    }

    fn reasoning_id(&self) -> String {
        format!("rs_{}", self.serial())
    }

    /// A reasoning item, its text a `reasoning_text` part (none while it streams).
    fn reasoning_item(&self, text: Option<&str>) -> Value {
        let content: Vec<Value> = text.iter().map(|&text| reasoning_part(text)).collect();
        json!({"type": "reasoning", "id": self.reasoning_id(), "summary": [], "content": content})
    }

    fn message_item(&self, status: &str, content: Vec<Value>) -> Value {
        json!({"type": "message", "id": self.message_id(), "status": status, "role": "assistant", "content": content})
    }

    fn call_item(&self, index: usize, status: &str, call_id: &str, name: &str, arguments: &str) -> Value {
        json!({"type": "function_call", "id": self.call_item_id(index), "call_id": call_id, "name": name, "arguments": arguments, "status": status})
    }
}

/// `object` with the members of `more` set.
fn with(object: &Value, more: Value) -> Value {
    let mut object = object.clone();
    if let (Value::Object(fields), Value::Object(more)) = (&mut object, more) {
        fields.extend(more);
    }
    object
}

/// The response's status for how its generation ended.
fn status_of(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::ToolCalls => "completed",
        FinishReason::Length => "incomplete",
        FinishReason::Abort => "cancelled",
    }
}

fn reasoning_part(text: &str) -> Value {
    json!({"type": "reasoning_text", "text": text})
}

/// An output_text part; its logprobs where the request asked for them.
fn text_part(text: &str, logprobs: Option<Vec<Value>>) -> Value {
    let mut part = json!({"type": "output_text", "text": text, "annotations": []});
    if let Some(logprobs) = logprobs {
        part["logprobs"] = Value::Array(logprobs);
    }
    part
}

/// Tokens' log probabilities as Responses gives them: chat's entries (token, logprob, bytes,
/// top_logprobs).
fn logprob_entries(logprobs: &[TokenLogprob]) -> Vec<Value> {
    match chat_logprobs(logprobs)["content"].take() {
        Value::Array(entries) => entries,
        _ => vec![],
    }
}

/// Where a streamed item stands: not yet sent, sent and taking deltas, or done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ItemState {
    Unopened,
    Open,
    Closed,
}

/// A streamed response's events: `response.created` and `response.in_progress`; a reasoning
/// model's thought as an item opened at its first delta, a `reasoning_text` delta per piece, closed
/// when the answer begins; the message's item and text part opened at its first text, a delta per
/// piece of text, then the finished response's items closed in turn (the message, each function
/// call) and `response.completed` (or `response.incomplete`) with the whole response. Each event
/// carries its type and a sequence number.
pub struct ResponseEvents {
    header: ResponseHeader,
    sequence: u64,
    /// The thought's item, and its text so far while it is open.
    thought_item: ItemState,
    thought: String,
    /// Whether the message's item is open (its text came as deltas).
    message_open: bool,
    logprobs: bool,
}

impl ResponseEvents {
    /// `logprobs`: whether the request asked for log probabilities.
    pub fn new(header: ResponseHeader, logprobs: bool) -> Self {
        Self { header, sequence: 0, thought_item: ItemState::Unopened, thought: String::new(), message_open: false, logprobs }
    }

    /// The message's place in the output: after the thought, where there is one.
    fn message_index(&self) -> usize {
        (self.thought_item != ItemState::Unopened) as usize
    }

    pub fn header(&self) -> &ResponseHeader {
        &self.header
    }

    fn event(&mut self, kind: &str, mut fields: Value) -> Value {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        fields
    }

    pub fn start(&mut self) -> Vec<Value> {
        let response = self.header.object("in_progress", vec![], None);
        vec![self.event("response.created", json!({"response": response})), self.event("response.in_progress", json!({"response": response}))]
    }

    /// The message is the response's first item: the engine holds back text that may start a
    /// call, so deltas are the message's text only.
    fn open_message(&mut self, events: &mut Vec<Value>) {
        if self.message_open {
            return;
        }
        self.close_thought(events);
        self.message_open = true;
        let item = self.header.message_item("in_progress", vec![]);
        let part = text_part("", self.logprobs.then(Vec::new));
        let (item_id, output_index) = (self.header.message_id(), self.message_index());
        events.push(self.event("response.output_item.added", json!({"output_index": output_index, "item": item})));
        events.push(self.event("response.content_part.added", json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "part": part})));
    }

    /// The thought comes first: its item opens at its first delta (a marker's, before any text).
    fn open_thought(&mut self, events: &mut Vec<Value>) {
        if self.thought_item != ItemState::Unopened {
            return;
        }
        self.thought_item = ItemState::Open;
        let item = self.header.reasoning_item(None);
        let item_id = self.header.reasoning_id();
        events.push(self.event("response.output_item.added", json!({"output_index": 0, "item": item})));
        events.push(self.event("response.content_part.added", json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": reasoning_part("")})));
    }

    /// Ends the thought's item, if it is open.
    fn close_thought(&mut self, events: &mut Vec<Value>) {
        if self.thought_item != ItemState::Open {
            return;
        }
        self.thought_item = ItemState::Closed;
        let (item_id, thought) = (self.header.reasoning_id(), std::mem::take(&mut self.thought));
        let place = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
        events.push(self.event("response.reasoning_text.done", with(&place, json!({"text": thought}))));
        events.push(self.event("response.content_part.done", with(&place, json!({"part": reasoning_part(&thought)}))));
        let item = self.header.reasoning_item(Some(&thought));
        events.push(self.event("response.output_item.done", json!({"output_index": 0, "item": item})));
    }

    /// The events of a piece of text (of the thought or of the answer) and the log probability
    /// of the token that completed it.
    pub fn delta(&mut self, delta: &Delta) -> Vec<Value> {
        let mut events = vec![];
        // A marker opens the thought's item (first in the output) even before it has text.
        if delta.thought {
            self.open_thought(&mut events);
            if !delta.text.is_empty() {
                self.thought.push_str(&delta.text);
                let item_id = self.header.reasoning_id();
                events.push(self.event("response.reasoning_text.delta", json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta.text})));
            }
            return events;
        }
        if delta.text.is_empty() && delta.logprob.is_none() {
            return events;
        }
        self.open_message(&mut events);
        let entries = delta.logprob.as_ref().map(|l| logprob_entries(std::slice::from_ref(l))).unwrap_or_default();
        let (item_id, output_index) = (self.header.message_id(), self.message_index());
        events.push(self.event("response.output_text.delta", json!({"item_id": item_id, "output_index": output_index, "content_index": 0, "delta": delta.text, "logprobs": entries})));
        events
    }

    /// The events that end the response as `completion` ends it, the whole response last: each
    /// of its items closed (a call's opened first, its arguments in one delta).
    pub fn finish(&mut self, completion: &Completion) -> Vec<Value> {
        let response = self.header.response(completion);
        let mut events = vec![];
        for (output_index, item) in response["output"].as_array().into_iter().flatten().enumerate() {
            let item_id = &item["id"];
            if item["type"] == "reasoning" {
                // Streamed, it closed before the answer's first text; a thought of no text never opened.
                if self.thought_item != ItemState::Closed {
                    self.thought = item["content"][0]["text"].as_str().unwrap_or_default().to_string();
                }
                self.open_thought(&mut events);
                self.close_thought(&mut events);
                continue;
            }
            if item["type"] == "message" {
                self.open_message(&mut events);
                let part = &item["content"][0];
                let logprobs = part.get("logprobs").cloned().unwrap_or_else(|| json!([]));
                let place = json!({"item_id": item_id, "output_index": output_index, "content_index": 0});
                events.push(self.event("response.output_text.done", with(&place, json!({"text": part["text"], "logprobs": logprobs}))));
                events.push(self.event("response.content_part.done", with(&place, json!({"part": part}))));
            } else {
                let added = with(item, json!({"status": "in_progress", "arguments": ""}));
                let place = json!({"item_id": item_id, "output_index": output_index});
                events.push(self.event("response.output_item.added", json!({"output_index": output_index, "item": added})));
                events.push(self.event("response.function_call_arguments.delta", with(&place, json!({"delta": item["arguments"]}))));
                events.push(self.event("response.function_call_arguments.done", with(&place, json!({"name": item["name"], "arguments": item["arguments"]}))));
            }
            events.push(self.event("response.output_item.done", json!({"output_index": output_index, "item": item})));
        }
        let kind = if response["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
        events.push(self.event(kind, json!({"response": response})));
        events
    }

    /// The events of a response that failed: an `error` event, then `response.failed`.
    pub fn failed(&mut self, code: &str, message: &str, param: Option<&str>) -> Vec<Value> {
        let mut response = self.header.object("failed", vec![], None);
        response["error"] = json!({"code": code, "message": message});
        vec![
            self.event("error", json!({"code": code, "message": message, "param": param})),
            self.event("response.failed", json!({"response": response})),
        ]
    }
}

/// A stored response and the conversation it ends: its input turns (and the turns before them),
/// then its output.
pub struct StoredResponse {
    pub response: Value,
    pub conversation: Conversation,
    /// How many of the conversation's items were its input; its output's follow.
    input_items: usize,
    bytes: usize,
}

impl StoredResponse {
    /// A page of the items the response was given (the turns it continued, then its input) as
    /// OpenAI's list object, `GET /v1/responses/{id}/input_items`.
    pub fn input_items(&self, page: &ItemPage) -> Result<Value, RequestError> {
        let items = &self.conversation.items[..self.input_items];
        let ordered: Vec<&Value> = if page.newest_first { items.iter().rev().collect() } else { items.iter().collect() };
        let start = match &page.after {
            None => 0,
            Some(after) => match ordered.iter().position(|item| item["id"] == after.as_str()) {
                Some(i) => i + 1,
                None => return Err(RequestError::invalid(format!("after: {after:?} is not one of the response's input items")).param("after")),
            },
        };
        let data: Vec<Value> = ordered[start..].iter().take(page.limit).map(|item| if page.logprobs { (*item).clone() } else { without_logprobs(item) }).collect();
        let has_more = start + data.len() < ordered.len();
        let id_at = |item: Option<&Value>| item.map_or(Value::Null, |item| item["id"].clone());
        Ok(json!({"object": "list", "data": data, "first_id": id_at(data.first()), "last_id": id_at(data.last()), "has_more": has_more}))
    }
}

fn json_len(value: &impl serde::Serialize) -> usize {
    serde_json::to_string(value).map_or(0, |text| text.len())
}

/// An item with its text parts' log probabilities left out: they are listed where `include` asks.
fn without_logprobs(item: &Value) -> Value {
    let mut item = item.clone();
    if let Some(Value::Array(parts)) = item.get_mut("content") {
        for part in parts.iter_mut().filter_map(Value::as_object_mut) {
            part.remove("logprobs");
        }
    }
    item
}

/// Which input items a listing returns: OpenAI's `after` (an item id), `limit` (1 to 100, 20 by
/// default), `order` (`desc`, the default, or `asc`) and `include`.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemPage {
    after: Option<String>,
    limit: usize,
    newest_first: bool,
    /// Text parts keep their log probabilities (`include: ["message.output_text.logprobs"]`).
    logprobs: bool,
}

impl ItemPage {
    /// Reads a listing's parameters: a JS options object, or a query's as strings (`include`
    /// gathered into a list). Others are ignored, as OpenAI's server ignores them.
    pub fn read(params: &Map<String, Value>) -> Result<Self, RequestError> {
        let after = match params.get("after") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(other) => return Err(RequestError::invalid(format!("after: must be an item id, got {}", kind_of(other))).param("after")),
        };
        let limit = match params.get("limit") {
            None | Some(Value::Null) => Some(20),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(n)) => n.parse().ok(),
            Some(_) => None,
        };
        let limit = match limit {
            Some(limit @ 1..=100) => limit as usize,
            _ => return Err(RequestError::invalid(format!("limit: must be a whole number from 1 to 100, got {}", params["limit"])).param("limit")),
        };
        let newest_first = match params.get("order").and_then(Value::as_str) {
            None if params.get("order").is_none_or(Value::is_null) => true,
            Some("desc") => true,
            Some("asc") => false,
            _ => return Err(RequestError::invalid(format!("order: must be \"asc\" or \"desc\", got {}", params["order"])).param("order")),
        };
        let include = match params.get("include") {
            None | Some(Value::Null) => vec![],
            Some(Value::String(name)) => vec![name.clone()],
            Some(value) => serde_json::from_value::<Vec<String>>(value.clone())
                .map_err(|_| RequestError::invalid(format!("include: must be a list of strings, got {}", kind_of(value))).param("include"))?,
        };
        Ok(Self { after, limit, newest_first, logprobs: include.iter().any(|name| name == LOGPROBS_INCLUDE) })
    }
}

/// Bytes of responses a host keeps unless told otherwise: a long conversation's text is a few
/// hundred KB.
pub const DEFAULT_STORE_BYTES: usize = 64 << 20;

/// The responses a host keeps (`store`, OpenAI's default) for `previous_response_id` and for
/// retrieving them: in memory, within a budget of bytes, the oldest dropped to make room.
pub struct ResponseStore {
    budget: usize,
    used: usize,
    /// Oldest first.
    order: VecDeque<String>,
    responses: HashMap<String, StoredResponse>,
}

impl Default for ResponseStore {
    fn default() -> Self {
        Self::new(DEFAULT_STORE_BYTES)
    }
}

impl ResponseStore {
    pub fn new(budget: usize) -> Self {
        Self { budget, used: 0, order: VecDeque::new(), responses: HashMap::new() }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Responses kept, and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        (self.responses.len(), self.used)
    }

    /// Why there is no response `id` here.
    pub fn missing(&self, id: &str) -> String {
        format!("no stored response {id:?}: responses are kept when created with store: true, the newest within {} bytes", self.budget)
    }

    /// Keeps a finished response with its conversation, the completion's turn and the response's
    /// output items added to it; false where it is larger than the whole budget. Input items
    /// the client gave no id are named after the response (`msg_<serial>_in<k>`).
    pub fn keep(&mut self, id: String, response: Value, mut conversation: Conversation, completion: &Completion) -> bool {
        let serial = id.strip_prefix("resp_").unwrap_or(&id).to_string();
        for (k, item) in conversation.items.iter_mut().enumerate().filter(|(_, item)| item["id"].is_null()) {
            let prefix = match item["type"].as_str() {
                Some("function_call") => "fc",
                Some("function_call_output") => "fco",
                Some("reasoning") => "rs",
                _ => "msg",
            };
            item["id"] = Value::String(format!("{prefix}_{serial}_in{k}"));
        }
        let input_items = conversation.items.len();
        conversation.messages.push(output_message(completion));
        if let Some(Value::Array(output)) = response.get("output") {
            conversation.items.extend(output.iter().cloned());
        }
        self.insert(id, response, conversation, input_items)
    }

    /// Keeps the response, dropping the oldest ones as its bytes need; one larger than the whole
    /// budget is not kept (false).
    fn insert(&mut self, id: String, response: Value, conversation: Conversation, input_items: usize) -> bool {
        // Their JSON's length: what they hold, near enough.
        let bytes = json_len(&response) + json_len(&conversation.messages) + json_len(&conversation.items);
        if bytes > self.budget {
            return false;
        }
        self.make_room(bytes);
        self.used += bytes;
        self.order.push_back(id.clone());
        self.responses.insert(id, StoredResponse { response, conversation, input_items, bytes });
        true
    }

    /// Drops the oldest responses until `bytes` more fit the budget.
    fn make_room(&mut self, bytes: usize) {
        while self.used + bytes > self.budget {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(dropped) = self.responses.remove(&oldest) {
                self.used -= dropped.bytes;
            }
        }
    }

    /// A new budget; the oldest responses it cannot hold are dropped.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.make_room(0);
    }

    pub fn get(&self, id: &str) -> Option<&StoredResponse> {
        self.responses.get(id)
    }

    pub fn remove(&mut self, id: &str) -> bool {
        let Some(removed) = self.responses.remove(id) else { return false };
        self.used -= removed.bytes;
        self.order.retain(|kept| kept != id);
        true
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::parse_body;
    use crate::api::{GeneratedToolCall, ResponseFormat, ToolChoice, Usage};

    fn read(body: &str) -> Result<ResponsesRequest, RequestError> {
        read_responses(parse_body(body.as_bytes())?, UnknownFields::Refuse, Conversation::default())
    }

    fn chat_of(request: &ResponsesRequest) -> &crate::api::ChatCompletionRequest {
        match &request.parsed.work {
            Work::Chat(chat) => chat,
            Work::Complete { .. } => unreachable!("a response is a chat"),
        }
    }

    fn error(body: &str) -> (Option<String>, String) {
        let e = read(body).err().expect("an error");
        (e.param, e.message)
    }

    #[test]
    fn input_items_become_the_chat_turns() {
        let request = read(
            r#"{"model": "tiny", "instructions": "Be brief.", "max_output_tokens": 9, "temperature": 0, "seed": 3, "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]}]}"#,
        )
        .unwrap_or_else(|e| panic!("{}", e.message));
        let chat = chat_of(&request);
        assert_eq!(chat.messages[0], ChatMessage::new("system", "Be brief."));
        let turns = &request.conversation.messages;
        assert_eq!(chat.messages[1..], turns[..], "the instructions are not carried on");
        let roles: Vec<&str> = turns.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool"]);
        assert_eq!(turns[1].content.as_deref(), Some("Weather in Paris?"));
        let turn = &turns[2];
        assert_eq!(turn.content.as_deref(), Some("Checking."));
        let calls: Vec<(&str, &str)> = turn.tool_calls.iter().flatten().map(|c| (c.id.as_deref().unwrap(), c.function.name.as_str())).collect();
        assert_eq!(calls, [("call_1", "get_weather"), ("call_2", "get_time")]);
        assert_eq!((turns[4].tool_call_id.as_deref(), turns[4].content.as_deref()), (Some("call_2"), Some("noon")));
        // The items as given, one per input item, each with its parts and a status.
        let items = &request.conversation.items;
        let kinds: Vec<(&str, &str)> = items.iter().map(|item| (item["type"].as_str().unwrap(), item["role"].as_str().unwrap_or(""))).collect();
        let calls_and_outputs = [("function_call", ""), ("function_call", ""), ("function_call_output", ""), ("function_call_output", "")];
        assert_eq!(kinds, [[("message", "developer"), ("message", "user"), ("message", "assistant")].as_slice(), &calls_and_outputs].concat());
        assert_eq!(items[0]["content"], json!([{"type": "input_text", "text": "Use tools."}]));
        assert_eq!(items[1]["content"][1], json!({"type": "input_text", "text": "Paris?"}));
        assert_eq!((&items[3]["call_id"], &items[3]["arguments"], &items[3]["status"]), (&json!("call_1"), &json!("{\"city\":\"Paris\"}"), &json!("completed")));
        assert_eq!(items[6]["output"], json!([{"type": "input_text", "text": "noon"}]));
        assert_eq!((chat.sampling.max_tokens, chat.sampling.temperature, chat.sampling.seed), (Some(9), Some(0.0), Some(3)));
        assert!(request.store && !request.parsed.stream && request.parsed.choices == 1);
        assert_eq!(request.settings["instructions"], "Be brief.");
        assert_eq!(request.settings["max_output_tokens"], 9);
    }

    #[test]
    fn a_string_input_continues_the_previous_turns() {
        let previous = read(r#"{"input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#).unwrap().conversation;
        let request = read_responses(parse_body(br#"{"input": "And you?", "stream": true}"#).unwrap(), UnknownFields::Refuse, previous).unwrap();
        let texts: Vec<&str> = request.conversation.messages.iter().filter_map(|m| m.content.as_deref()).collect();
        assert_eq!(texts, ["Hi", "Hello!", "And you?"]);
        let item_texts: Vec<&Value> = request.conversation.items.iter().map(|item| &item["content"][0]["text"]).collect();
        assert_eq!(item_texts, ["Hi", "Hello!", "And you?"]);
        assert_eq!(request.conversation.items[1]["content"][0]["type"], "output_text");
        assert!(request.parsed.stream);
        // With a previous response the input may be left out.
        let previous = read(r#"{"input": "Hi"}"#).unwrap().conversation;
        assert!(read_responses(parse_body(br#"{}"#).unwrap(), UnknownFields::Refuse, previous).is_ok());
    }

    #[test]
    fn tools_choices_and_formats_become_chat_options() {
        let request = read(
            r#"{"input": "x", "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true}],
                "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false,
                "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}},
                "include": ["message.output_text.logprobs"], "top_logprobs": 2, "store": false}"#,
        )
        .unwrap_or_else(|e| panic!("{}", e.message));
        let chat = chat_of(&request);
        let tools = chat.tools.as_ref().unwrap();
        assert_eq!(tools[0].function, json!({"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": true}));
        assert!(matches!(&chat.tool_choice, Some(ToolChoice::Function { function, .. }) if function.name == "f"));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        let Some(ResponseFormat::JsonSchema { json_schema }) = &chat.sampling.response_format else { panic!("{:?}", chat.sampling.response_format) };
        assert_eq!((json_schema.name.as_deref(), json_schema.strict), (Some("answer"), Some(true)));
        assert_eq!(chat.sampling.logprobs_wanted(), Some(2));
        assert!(!request.store);
        assert_eq!(request.settings["tools"][0]["name"], "f", "the response repeats the tools as sent");
        let json_object = read(r#"{"input": "x", "text": {"format": {"type": "json_object"}}}"#).unwrap();
        assert_eq!(chat_of(&json_object).sampling.response_format, Some(ResponseFormat::JsonObject));
        assert_eq!(chat_of(&read(r#"{"input": "x"}"#).unwrap()).sampling.logprobs_wanted(), None);
    }

    #[test]
    fn errors_name_the_responses_field() {
        for (body, param, message) in [
            (r#"{}"#, "input", "input is required"),
            (r#"{"input": []}"#, "input", "input must not be empty"),
            (r#"{"input": 5}"#, "input", "input: must be a string or a list of items, got a number"),
            (r#"{"input": [{"role": "robot", "content": "x"}]}"#, "input", r#"input[0].role: "robot" is not one of user, assistant, system, developer"#),
            (r#"{"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}"#, "input", "input[0].call_id is required"),
            (r#"{"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}"#, "input", "input[0].content[0]: input_image is not supported: Llama 3.1 reads text only"),
            (r#"{"input": "x", "tools": [{"type": "web_search"}]}"#, "tools", r#"tools[0]: tools of type "web_search" are not supported (function tools are)"#),
            (r#"{"input": "x", "max_output_tokens": 0}"#, "max_output_tokens", "max_output_tokens must be at least 1"),
            (r#"{"input": "x", "tool_choice": "sometimes"}"#, "tool_choice", r#"tool_choice: must be "none", "auto", "required" or {"type": "function", "name": ...}"#),
            (r#"{"input": "x", "text": {"format": {"type": "yaml"}}}"#, "text", r#"text.format.type: must be "text", "json_object", "json_schema" or "grammar""#),
            (r#"{"input": "x", "background": true}"#, "background", "background: true is not supported: responses run while the request waits (use stream: true to see them as they come)"),
            (r#"{"input": "x", "temprature": 1}"#, "temprature", "temprature: unknown field"),
            (r#"{"input": "x", "previous_response_id": 3}"#, "previous_response_id", "previous_response_id: must be a string, got a number"),
        ] {
            if param == "previous_response_id" {
                let e = previous_response_id(&parse_body(body.as_bytes()).unwrap()).err().unwrap();
                assert_eq!((e.param.as_deref(), e.message.as_str()), (Some(param), message), "{body}");
                continue;
            }
            assert_eq!(error(body), (Some(param.to_string()), message.to_string()), "{body}");
        }
        let (param, message) = error(r#"{"input": "x", "text": {"format": {"type": "json_schema", "schema": {}, "strict": "yes"}}}"#);
        assert_eq!(param.as_deref(), Some("text"), "{message}");
        // A host that ignores unknown fields takes them.
        assert!(read_responses(parse_body(br#"{"input": "x", "vendor": 1}"#).unwrap(), UnknownFields::Ignore, Conversation::default()).is_ok());
    }

    fn header() -> ResponseHeader {
        ResponseHeader { id: "resp_7_1".into(), created_at: 7, model: "tiny".into(), settings: settings(&Map::new(), true) }
    }

    fn completion(text: &str, calls: Vec<GeneratedToolCall>, reason: FinishReason) -> Completion {
        let usage = Usage { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7, cached_prompt_tokens: 3, ..Default::default() };
        Completion { text: text.into(), tokens: vec![1, 2], finish_reason: reason, usage, tool_calls: calls, ..Default::default() }
    }

    fn delta(text: &str, logprob: Option<&TokenLogprob>, thought: bool) -> Delta {
        Delta { text: text.into(), token: None, logprob: logprob.cloned(), thought }
    }

    fn weather_call() -> GeneratedToolCall {
        GeneratedToolCall { id: "call_9".into(), name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() }
    }

    #[test]
    fn a_completion_becomes_a_response_object() {
        let response = header().response(&completion("Hi there", vec![], FinishReason::Stop));
        assert_eq!((&response["object"], &response["status"], &response["incomplete_details"]), (&json!("response"), &json!("completed"), &Value::Null));
        assert_eq!(
            response["output"],
            json!([{"type": "message", "id": "msg_7_1", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there", "annotations": []}]}])
        );
        assert_eq!(
            response["usage"],
            json!({"input_tokens": 5, "input_tokens_details": {"cached_tokens": 3}, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7})
        );
        assert_eq!((&response["tool_choice"], &response["store"]), (&json!("auto"), &json!(true)));
        let cut = header().response(&completion("Hi", vec![], FinishReason::Length));
        assert_eq!((&cut["status"], &cut["incomplete_details"]), (&json!("incomplete"), &json!({"reason": "max_output_tokens"})));
        // Only calls: no message.
        let called = header().response(&completion("", vec![weather_call()], FinishReason::ToolCalls));
        assert_eq!(
            called["output"],
            json!([{"type": "function_call", "id": "fc_7_1_0", "call_id": "call_9", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}", "status": "completed"}])
        );
        let turn = output_message(&completion("", vec![weather_call()], FinishReason::ToolCalls));
        assert_eq!((turn.content, turn.tool_calls.unwrap()[0].id.as_deref()), (None, Some("call_9")));
    }

    #[test]
    fn a_stream_opens_the_message_at_its_first_text_and_ends_with_the_whole_response() {
        let logprob = TokenLogprob { token: 4, bytes: b"Hi".to_vec(), logprob: -0.5, top: vec![] };
        let mut stream = ResponseEvents::new(header(), true);
        let mut events = stream.start();
        events.extend(stream.delta(&delta("", None, false)));
        events.extend(stream.delta(&delta("Hi", Some(&logprob), false)));
        events.extend(stream.delta(&delta(" there", None, false)));
        let done = Completion { logprobs: Some(vec![logprob.clone()]), ..completion("Hi there", vec![weather_call()], FinishReason::ToolCalls) };
        events.extend(stream.finish(&done));
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (0..14).collect::<Vec<u64>>());
        assert_eq!(events[0]["response"]["status"], "in_progress");
        assert_eq!(events[4]["logprobs"], json!([{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}]));
        assert_eq!((&events[6]["text"], events[6]["logprobs"].as_array().map(Vec::len)), (&json!("Hi there"), Some(1)));
        assert_eq!(events[9]["output_index"], 1);
        let response = &events[13]["response"];
        assert_eq!(response["output"][0]["content"][0]["text"], "Hi there");
        assert_eq!(response["output"][1]["call_id"], "call_9");
        // Nothing generated: an empty message all the same.
        let mut stream = ResponseEvents::new(header(), false);
        let events = stream.finish(&completion("", vec![], FinishReason::Length));
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds[0], "response.output_item.added");
        assert_eq!(kinds.last(), Some(&"response.incomplete"));
    }

    /// A reasoning model's thought is the first output item, streamed as `reasoning_text` and
    /// closed when the answer begins; the answer's message comes after it.
    #[test]
    fn a_thought_is_a_reasoning_item_before_the_message() {
        let usage = Usage { reasoning_tokens: 3, ..completion("", vec![], FinishReason::Stop).usage };
        let thought = Completion { reasoning: Some("Hmm, hi.".into()), usage, ..completion("Hi", vec![], FinishReason::Stop) };
        let response = header().response(&thought);
        assert_eq!(response["output"][0], json!({"type": "reasoning", "id": "rs_7_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Hmm, hi."}]}));
        assert_eq!((&response["output"][1]["type"], &response["usage"]["output_tokens_details"]), (&json!("message"), &json!({"reasoning_tokens": 3})));
        let mut stream = ResponseEvents::new(header(), false);
        let mut events = vec![];
        for (text, is_thought) in [("", true), ("Hmm,", true), (" hi.", true), ("", true), ("Hi", false)] {
            events.extend(stream.delta(&delta(text, None, is_thought)));
        }
        events.extend(stream.finish(&thought));
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!((&events[4]["text"], &events[6]["item"], &events[7]["output_index"]), (&json!("Hmm, hi."), &response["output"][0], &json!(1)));
        assert_eq!((&events[9]["output_index"], &events[12]["output_index"]), (&json!(1), &json!(1)));
        // Not streamed (a thought that ended with the output): opened and closed at the end.
        let events = ResponseEvents::new(header(), false).finish(&thought);
        assert_eq!((&events[0]["item"]["type"], &events[2]["text"], &events[4]["item"]), (&json!("reasoning"), &json!("Hmm, hi."), &response["output"][0]));
        // Given back as input, a thought is an item and no turn.
        let request = read(r#"{"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "x"}]}, {"role": "user", "content": "Hi"}]}"#).unwrap();
        assert_eq!(chat_of(&request).messages.len(), 1);
    }

    #[test]
    fn the_oldest_responses_make_room_within_the_budget() {
        let response = json!({"output": "x".repeat(80)});
        let conversation = read(r#"{"input": "hi"}"#).unwrap().conversation;
        let one = response.to_string().len() + json_len(&conversation.messages) + json_len(&conversation.items);
        let mut store = ResponseStore::new(3 * one);
        for id in ["a", "b", "c", "d"] {
            assert!(store.insert(id.into(), response.clone(), conversation.clone(), 1));
        }
        assert!(store.get("a").is_none(), "the oldest made room");
        assert_eq!(store.get("d").map(|s| s.conversation.messages.len()), Some(1));
        assert!(store.remove("c") && !store.remove("c"));
        assert!(store.insert("e".into(), response.clone(), conversation.clone(), 1));
        assert!(store.get("b").is_some() && store.get("e").is_some(), "a removed response's room is taken first");
        assert_eq!((store.used, store.order.len()), (3 * one, 3));
        let huge = json!({"output": "x".repeat(4 * one)});
        assert!(!store.insert("f".into(), huge, conversation, 1), "larger than the whole budget");
        assert!(store.get("b").is_some());
        // A smaller budget keeps the newest that fit.
        store.set_budget(one + 1);
        assert!(store.get("b").is_none() && store.get("d").is_none() && store.get("e").is_some());
        assert_eq!((store.used, store.order.len()), (one, 1));
    }

    fn page(params: Value) -> Result<ItemPage, RequestError> {
        ItemPage::read(params.as_object().unwrap())
    }

    fn ids(list: &Value) -> Vec<&str> {
        list["data"].as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap()).collect()
    }

    #[test]
    fn a_kept_response_lists_its_input_items_with_the_turns_it_continued() {
        let mut store = ResponseStore::default();
        let first = read(r#"{"input": [{"role": "user", "content": "Hi", "id": "msg_mine"}, {"role": "user", "content": "There?"}]}"#).unwrap();
        let answer = completion("Hello!", vec![], FinishReason::Stop);
        let header = ResponseHeader { id: "resp_1".into(), ..header() };
        let mut response = header.response(&Completion { logprobs: Some(vec![]), ..answer.clone() });
        assert!(response["output"][0]["content"][0].get("logprobs").is_some());
        assert!(store.keep(header.id.clone(), response.clone(), first.conversation, &answer));

        // Continued: the first response's input and output, then the new input (a call's output).
        let previous = store.get("resp_1").unwrap().conversation.clone();
        let input = br#"{"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}, {"type": "function_call_output", "call_id": "c", "output": "done"}]}"#;
        let second = read_responses(parse_body(input).unwrap(), UnknownFields::Refuse, previous).unwrap();
        response["id"] = json!("resp_2");
        assert!(store.keep("resp_2".into(), response, second.conversation, &answer));
        let stored = store.get("resp_2").unwrap();
        let all = stored.input_items(&page(json!({"order": "asc"})).unwrap()).unwrap();
        assert_eq!(ids(&all), ["msg_mine", "msg_1_in1", "msg_1", "fc_2_in3", "fco_2_in4"]);
        assert_eq!((&all["first_id"], &all["last_id"], &all["has_more"]), (&json!("msg_mine"), &json!("fco_2_in4"), &json!(false)));
        assert!(all["data"][2]["content"][0].get("logprobs").is_none(), "log probabilities only where include asks");
        let with_logprobs = stored.input_items(&page(json!({"order": "asc", "include": ["message.output_text.logprobs"]})).unwrap()).unwrap();
        assert_eq!(with_logprobs["data"][2]["content"][0]["logprobs"], json!([]));
        assert_eq!(stored.conversation.items.len(), 6, "its own output is kept to be continued, not listed as input");

        // Newest first by default, in pages after a cursor.
        let newest = stored.input_items(&page(json!({"limit": "2"})).unwrap()).unwrap();
        assert_eq!((ids(&newest), &newest["has_more"]), (vec!["fco_2_in4", "fc_2_in3"], &json!(true)));
        let next = stored.input_items(&page(json!({"limit": 2, "after": "fc_2_in3"})).unwrap()).unwrap();
        assert_eq!((ids(&next), &next["has_more"]), (vec!["msg_1", "msg_1_in1"], &json!(true)));
        let last = stored.input_items(&page(json!({"after": "msg_1_in1"})).unwrap()).unwrap();
        assert_eq!((ids(&last), &last["has_more"], &last["last_id"]), (vec!["msg_mine"], &json!(false), &json!("msg_mine")));
        let past = stored.input_items(&page(json!({"after": "msg_mine"})).unwrap()).unwrap();
        assert_eq!((ids(&past).len(), &past["first_id"]), (0, &Value::Null));

        let error = |params: Value| {
            let e = page(params).and_then(|page| stored.input_items(&page)).expect_err("an error");
            (e.param.unwrap_or_default(), e.message)
        };
        assert_eq!(error(json!({"after": "msg_other"})).0, "after");
        for limit in [json!(0), json!(101), json!("many"), json!(2.5)] {
            let (param, message) = error(json!({"limit": limit}));
            assert!(param == "limit" && message.contains("1 to 100"), "{message}");
        }
        assert_eq!(error(json!({"order": "newest"})).0, "order");
        assert_eq!(error(json!({"include": 3})).0, "include");
    }
}
