//! What the server sends: OpenAI's response objects, their streamed chunks as server-sent events,
//! and OpenAI-shaped error bodies.

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use llama_webgpu::api::{FinishReason, GeneratedToolCall, TokenLogprob, Usage};
use llama_webgpu::engine::ChoiceResults;
use llama_webgpu::Completion;
use serde_json::{json, Value};

/// An error as OpenAI reports one: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: invalid_request_error or server_error.
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }

    /// 400: a parameter asks for something this server does not do.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).param(param).code("unsupported_parameter")
    }

    /// 500: the server failed.
    pub fn server(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, [(header::CONTENT_TYPE, "application/json")], self.body().to_string()).into_response()
    }
}

/// Which endpoint a response belongs to: it decides the object names and the choice's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`: `message` / `delta` objects.
    Chat,
    /// `/v1/completions`: `text`.
    Completion,
}

/// What every object of one response shares.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
}

pub fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    })
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // Only a client that has gone could be told this.
        FinishReason::Abort => "abort",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// A call as OpenAI writes one in a message; in a streamed delta it also has its `index`.
fn tool_call_json(call: &GeneratedToolCall) -> Value {
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// A chat completion's message: content (null when the output is only calls) and the calls.
fn chat_message(completion: &Completion) -> Value {
    let mut message = json!({"role": "assistant", "content": completion.text});
    if !completion.tool_calls.is_empty() {
        if completion.text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = completion.tool_calls.iter().map(tool_call_json).collect();
    }
    message
}

/// A token's text for logprobs: its bytes, with a character cut in half shown as U+FFFD (the exact
/// bytes are given beside it).
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
pub fn chat_logprobs(logprobs: &[TokenLogprob]) -> Value {
    let entry = |token: &[u8], logprob: f32| json!({"token": token_text(token), "logprob": logprob, "bytes": token});
    let content: Vec<Value> = logprobs
        .iter()
        .map(|l| {
            let mut item = entry(&l.bytes, l.logprob);
            item["top_logprobs"] = l.top.iter().map(|t| entry(&t.bytes, t.logprob)).collect();
            item
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Text completions' `logprobs`: parallel lists of tokens, their log probabilities, their
/// alternatives (token text -> log probability) and their character offsets from `offset` on.
pub fn completion_logprobs(logprobs: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = vec![];
    for l in logprobs {
        text_offset.push(offset);
        offset += token_text(&l.bytes).chars().count();
    }
    json!({
        "tokens": logprobs.iter().map(|l| token_text(&l.bytes)).collect::<Vec<_>>(),
        "token_logprobs": logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": logprobs.iter().map(|l| l.top.iter().map(|t| (token_text(&t.bytes), json!(t.logprob))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

impl ResponseMeta {
    fn object(&self, kind: &str, choices: Value) -> Value {
        json!({"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices})
    }

    fn chunk_object(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }

    /// The whole response of a request that did not stream, a choice per completion.
    pub fn completion(&self, completions: &[Completion]) -> Value {
        let choices: Vec<Value> = completions
            .iter()
            .enumerate()
            .map(|(index, completion)| {
                let reason = finish_reason(completion.finish_reason);
                let logprobs = completion.logprobs.as_deref();
                match self.endpoint {
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": chat_message(completion),
                        "logprobs": logprobs.map(chat_logprobs),
                        "finish_reason": reason,
                    }),
                    Endpoint::Completion => json!({
                        "index": index,
                        "text": completion.text,
                        "logprobs": logprobs.map(|l| completion_logprobs(l, 0)),
                        "finish_reason": reason,
                    }),
                }
            })
            .collect();
        let kind = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        };
        let mut object = self.object(kind, Value::Array(choices));
        object["usage"] = usage_json(&Completion::usage_of_choices(completions));
        object
    }

    /// A chunk with one choice; `usage: null` on every chunk when the final one carries usage, as
    /// OpenAI does.
    fn chunk(&self, choice: Value, include_usage: bool) -> Value {
        let mut object = self.object(self.chunk_object(), json!([choice]));
        if include_usage {
            object["usage"] = Value::Null;
        }
        object
    }

    /// A choice of a chunk: text and the log probability of the token that completed it (with the
    /// character offset of that token, for text completions), or the choice's finish reason.
    fn content_choice(&self, index: usize, text: &str, logprob: Option<(&TokenLogprob, usize)>, reason: Option<&str>) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let delta = if reason.is_some() { json!({}) } else { json!({"content": text}) };
                let logprobs = logprob.map(|(l, _)| chat_logprobs(std::slice::from_ref(l)));
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason})
            }
            Endpoint::Completion => {
                let logprobs = logprob.map(|(l, offset)| completion_logprobs(std::slice::from_ref(l), offset));
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
            }
        }
    }
}

/// Turns a generation's deltas and results into the server-sent events of a streamed response:
/// (chat only) a first chunk with the assistant's role for each choice, a chunk per delta, a chunk
/// with each choice's finish reason as it ends, then after the last a usage chunk when asked for
/// and `data: [DONE]`. An error ends the stream with an error event instead.
pub struct ChunkStream {
    meta: ResponseMeta,
    include_usage: bool,
    results: ChoiceResults,
    /// Characters of each choice's tokens streamed so far, for text completions' `text_offset`.
    offsets: Vec<usize>,
}

pub const SSE_DONE: &str = "data: [DONE]\n\n";

pub fn sse_event(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

impl ChunkStream {
    pub fn new(meta: ResponseMeta, include_usage: bool, choices: usize) -> Self {
        Self { meta, include_usage, results: ChoiceResults::new(choices), offsets: vec![0; choices] }
    }

    pub fn start(&self) -> Vec<Bytes> {
        match self.meta.endpoint {
            Endpoint::Chat => (0..self.results.len())
                .map(|index| {
                    let choice = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    sse_event(&self.meta.chunk(choice, self.include_usage))
                })
                .collect(),
            Endpoint::Completion => vec![],
        }
    }

    pub fn delta(&mut self, choice: usize, text: &str, logprob: Option<&TokenLogprob>) -> Bytes {
        let offset = self.offsets.get(choice).copied().unwrap_or_default();
        if let (Some(l), Some(offset)) = (logprob, self.offsets.get_mut(choice)) {
            *offset += token_text(&l.bytes).chars().count();
        }
        sse_event(&self.meta.chunk(self.meta.content_choice(choice, text, logprob.map(|l| (l, offset)), None), self.include_usage))
    }

    /// The events of choice `choice` ending as `completion`, and after the last choice those that
    /// end the stream; true once they have.
    pub fn finish(&mut self, choice: usize, completion: Completion) -> (Vec<Bytes>, bool) {
        let reason = finish_reason(completion.finish_reason);
        let mut events: Vec<Bytes> = completion
            .tool_calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let mut call = tool_call_json(call);
                call["index"] = index.into();
                let choice = json!({"index": choice, "delta": {"tool_calls": [call]}, "logprobs": null, "finish_reason": null});
                sse_event(&self.meta.chunk(choice, self.include_usage))
            })
            .collect();
        events.push(sse_event(&self.meta.chunk(self.meta.content_choice(choice, "", None, Some(reason)), self.include_usage)));
        let Some(completions) = self.results.record(choice, completion) else { return (events, false) };
        if self.include_usage {
            let mut object = self.meta.object(self.meta.chunk_object(), json!([]));
            object["usage"] = usage_json(&Completion::usage_of_choices(&completions));
            events.push(sse_event(&object));
        }
        events.push(Bytes::from_static(SSE_DONE.as_bytes()));
        (events, true)
    }

    /// The openai clients raise an event with an `error` member as an APIError.
    pub fn error(&self, error: &ApiError) -> Vec<Bytes> {
        vec![sse_event(&error.body())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(endpoint: Endpoint) -> ResponseMeta {
        ResponseMeta { endpoint, id: "chatcmpl-1".into(), created: 7, model: "tiny".into() }
    }

    fn completion() -> Completion {
        Completion {
            text: "Hi there".into(),
            tokens: vec![1, 2],
            finish_reason: FinishReason::Length,
            usage: Usage { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7, cached_prompt_tokens: 3 },
            logprobs: None,
            tool_calls: vec![],
        }
    }

    fn parse(event: &Bytes) -> Value {
        let text = std::str::from_utf8(event).unwrap();
        let data = text.strip_prefix("data: ").unwrap().strip_suffix("\n\n").unwrap();
        assert!(!data.contains('\n'), "one line of data per event: {text:?}");
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn chat_completion_object() {
        let body = meta(Endpoint::Chat).completion(&[completion()]);
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "Hi there"}));
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}})
        );
    }

    #[test]
    fn chat_stream_events() {
        let mut stream = ChunkStream::new(meta(Endpoint::Chat), true, 1);
        let mut events = stream.start();
        events.push(stream.delta(0, "Hi\nthere \"x\"", None));
        let (end, done) = stream.finish(0, completion());
        assert!(done);
        events.extend(end);
        assert_eq!(events.len(), 5);
        let first = parse(&events[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["usage"], Value::Null);
        assert_eq!(parse(&events[1])["choices"][0]["delta"]["content"], "Hi\nthere \"x\"");
        let last = parse(&events[2]);
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        let usage = parse(&events[3]);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(&events[4][..], b"data: [DONE]\n\n");
    }

    #[test]
    fn completion_stream_events_without_usage() {
        let mut stream = ChunkStream::new(meta(Endpoint::Completion), false, 1);
        assert!(stream.start().is_empty());
        let delta = parse(&stream.delta(0, "abc", None));
        assert_eq!(delta["object"], "text_completion");
        assert_eq!(delta["choices"][0]["text"], "abc");
        assert!(delta.get("usage").is_none());
        let (end, done) = stream.finish(0, completion());
        assert!(done);
        assert_eq!(end.len(), 2);
        assert_eq!(parse(&end[0])["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn choices_stream_under_their_index_and_usage_counts_the_prompt_once() {
        let mut stream = ChunkStream::new(meta(Endpoint::Chat), true, 2);
        let starts = stream.start();
        assert_eq!(starts.iter().map(|e| parse(e)["choices"][0]["index"].clone()).collect::<Vec<_>>(), [json!(0), json!(1)]);
        assert_eq!(parse(&stream.delta(1, "b", None))["choices"][0], json!({"index": 1, "delta": {"content": "b"}, "logprobs": null, "finish_reason": null}));
        let (first_end, done) = stream.finish(1, completion());
        assert_eq!(first_end.len(), 1);
        assert!(!done, "the stream goes on while choice 0 runs");
        let stop = Completion { finish_reason: FinishReason::Stop, ..completion() };
        let (last_end, done) = stream.finish(0, stop.clone());
        assert!(done);
        assert_eq!(parse(&last_end[0])["choices"][0]["finish_reason"], "stop");
        assert_eq!(parse(&last_end[1])["usage"], json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 3}}));
        assert_eq!(&last_end[2][..], b"data: [DONE]\n\n");

        let body = meta(Endpoint::Completion).completion(&[stop, completion()]);
        assert_eq!(body["choices"][1], json!({"index": 1, "text": "Hi there", "logprobs": null, "finish_reason": "length"}));
        assert_eq!(body["usage"]["total_tokens"], 9);
    }

    #[test]
    fn error_body() {
        let error = ApiError::unsupported("n", "n = 2 is not supported");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            parse(&ChunkStream::new(meta(Endpoint::Chat), false, 1).error(&error)[0]),
            json!({"error": {"message": "n = 2 is not supported", "type": "invalid_request_error", "param": "n", "code": "unsupported_parameter"}})
        );
    }
}
