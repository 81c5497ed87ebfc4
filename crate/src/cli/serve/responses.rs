//! What the server sends beside the shared response objects (`llama_webgpu::api::response`,
//! `llama_webgpu::api::responses`): their streams as server-sent events, and OpenAI-shaped error
//! bodies.

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use llama_webgpu::api::request::RequestError;
use llama_webgpu::api::response::{ChunkStream, ResponseMeta, StreamUsage};
use llama_webgpu::api::responses::{responses_param, ResponseEvents};
use llama_webgpu::engine::{Delta, Echo};
use llama_webgpu::Completion;
use serde_json::{json, Value};

use super::engine_thread::Event;

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

    /// The error of a Responses request: the field it blames by its Responses name (the engine
    /// reads the request as a chat).
    pub fn for_responses(mut self) -> Self {
        self.param = self.param.map(|param| responses_param(&param).to_string());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, [(header::CONTENT_TYPE, "application/json")], self.body().to_string()).into_response()
    }
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        let api_error = ApiError::invalid(error.message);
        match (error.param, error.unsupported) {
            (Some(param), true) => api_error.param(param).code("unsupported_parameter"),
            (Some(param), false) => api_error.param(param),
            (None, _) => api_error,
        }
    }
}

/// A chunk as a server-sent event.
pub fn sse_event(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// What a streamed response makes of its job's events: server-sent events.
pub trait EventFormat: Send {
    /// The events that open the stream.
    fn start(&mut self) -> Vec<Bytes>;
    /// The events of one of the job's, and whether they end the stream.
    fn events(&mut self, event: Event) -> (Vec<Bytes>, bool);
}

/// A streamed completion's server-sent events: the shared chunks ([`ChunkStream`]) as events,
/// then `data: [DONE]`; an error ends the stream with an error event instead.
pub struct SseChunks {
    chunks: ChunkStream,
}

impl SseChunks {
    pub fn new(meta: ResponseMeta, include_usage: bool, choices: usize) -> Self {
        let usage = if include_usage { StreamUsage::OwnChunk } else { StreamUsage::Omitted };
        Self { chunks: ChunkStream::new(meta, usage, choices) }
    }

    pub fn start(&self) -> Vec<Bytes> {
        self.chunks.start().iter().map(sse_event).collect()
    }

    pub fn delta(&mut self, choice: usize, delta: &Delta) -> Bytes {
        sse_event(&self.chunks.delta(choice, delta))
    }

    pub fn echo(&mut self, choice: usize, echo: &Echo) -> Bytes {
        sse_event(&self.chunks.echo(choice, echo))
    }

    /// The events of choice `choice` ending as `completion`, and after the last choice those that
    /// end the stream; true once they have.
    pub fn finish(&mut self, choice: usize, completion: Completion) -> (Vec<Bytes>, bool) {
        let (chunks, completions) = self.chunks.finish(choice, completion);
        let mut events: Vec<Bytes> = chunks.iter().map(sse_event).collect();
        if completions.is_some() {
            events.push(Bytes::from_static(SSE_DONE.as_bytes()));
        }
        (events, completions.is_some())
    }

    /// The openai clients raise an event with an `error` member as an APIError.
    pub fn error(&self, error: &ApiError) -> Vec<Bytes> {
        vec![sse_event(&error.body())]
    }
}

impl EventFormat for SseChunks {
    fn start(&mut self) -> Vec<Bytes> {
        SseChunks::start(self)
    }

    fn events(&mut self, event: Event) -> (Vec<Bytes>, bool) {
        match event {
            Event::Delta { choice, delta } => (vec![self.delta(choice, &delta)], false),
            Event::Echo { choice, echo } => (vec![self.echo(choice, &echo)], false),
            Event::Finished { choice, completion } => self.finish(choice, completion),
            Event::Failed(error) => (self.error(&error), true),
        }
    }
}

/// Called with the whole response and its completion when a streamed response ends.
pub type OnResponse = Box<dyn FnOnce(&Value, &Completion) + Send>;

/// A streamed response of the Responses API: each event as `event: TYPE` and its data.
pub struct ResponseSse {
    events: ResponseEvents,
    on_end: Option<OnResponse>,
}

impl ResponseSse {
    pub fn new(events: ResponseEvents, on_end: Option<OnResponse>) -> Self {
        Self { events, on_end }
    }

    fn sse(events: Vec<Value>) -> Vec<Bytes> {
        events.iter().map(|event| Bytes::from(format!("event: {}\ndata: {event}\n\n", event["type"].as_str().unwrap_or("message")))).collect()
    }
}

impl EventFormat for ResponseSse {
    fn start(&mut self) -> Vec<Bytes> {
        Self::sse(self.events.start())
    }

    fn events(&mut self, event: Event) -> (Vec<Bytes>, bool) {
        match event {
            Event::Delta { delta, .. } => (Self::sse(self.events.delta(&delta)), false),
            // Chats echo nothing.
            Event::Echo { .. } => (vec![], false),
            Event::Finished { completion, .. } => {
                let events = self.events.finish(&completion);
                if let (Some(on_end), Some(last)) = (self.on_end.take(), events.last()) {
                    on_end(&last["response"], &completion);
                }
                (Self::sse(events), true)
            }
            Event::Failed(error) => {
                let error = error.for_responses();
                let code = error.code.unwrap_or(error.kind);
                (Self::sse(self.events.failed(code, &error.message, error.param.as_deref())), true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_webgpu::api::response::Endpoint;
    use llama_webgpu::api::{FinishReason, Usage};

    fn meta() -> ResponseMeta {
        ResponseMeta { endpoint: Endpoint::Chat, id: "chatcmpl-1".into(), created: 7, model: "tiny".into() }
    }

    fn completion() -> Completion {
        let usage = Usage { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7, cached_prompt_tokens: 3, ..Default::default() };
        Completion { text: "Hi there".into(), tokens: vec![1, 2], finish_reason: FinishReason::Length, usage, ..Default::default() }
    }

    fn parse(event: &Bytes) -> Value {
        let text = std::str::from_utf8(event).unwrap();
        let data = text.strip_prefix("data: ").unwrap().strip_suffix("\n\n").unwrap();
        assert!(!data.contains('\n'), "one line of data per event: {text:?}");
        serde_json::from_str(data).unwrap()
    }

    #[test]
    fn a_stream_is_one_event_per_chunk_and_done_after_the_last_choice() {
        let mut stream = SseChunks::new(meta(), true, 2);
        let mut events = stream.start();
        events.push(stream.delta(1, &Delta { text: "Hi\nthere \"x\"".into(), token: Some(4), logprob: None, thought: false }));
        let (end, done) = stream.finish(1, Completion { prompt_shared: true, ..completion() });
        assert!(!done, "the stream goes on while choice 0 runs");
        events.extend(end);
        let (end, done) = stream.finish(0, completion());
        assert!(done);
        events.extend(end);
        let (last, chunks) = events.split_last().unwrap();
        assert_eq!(&last[..], b"data: [DONE]\n\n");
        let chunks: Vec<Value> = chunks.iter().map(parse).collect();
        assert_eq!(chunks.len(), 6);
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "Hi\nthere \"x\"");
        assert_eq!(chunks[5]["usage"]["total_tokens"], 9);
    }

    #[test]
    fn error_body() {
        let error = ApiError::unsupported("n", "n = 2 is not supported");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            parse(&SseChunks::new(meta(), false, 1).error(&error)[0]),
            json!({"error": {"message": "n = 2 is not supported", "type": "invalid_request_error", "param": "n", "code": "unsupported_parameter"}})
        );
    }
}
