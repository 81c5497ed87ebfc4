//! OpenAI's response objects and the chunks of a streamed response, made here for every host:
//! `serve` sends them as server-sent events, the JS API hands them to the page as they are.
//! Beside OpenAI's members each choice carries `token_ids`, the ids of the tokens it holds.

use serde_json::{json, Value};

use super::{FinishReason, GeneratedToolCall, TokenLogprob, Usage};
use super::request::TokenizeRequest;
use crate::engine::{ChoiceResults, Delta, Echo, Prompter};
use crate::Completion;

pub use crate::engine::Endpoint;

// The endpoint decides the object names and the choice's shape: chat's `message` / `delta`,
// text completions' `text`.
impl Endpoint {
    /// What its responses' ids start with.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }
    }

    fn object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completion => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }
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
    let mut json = json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    });
    if let Some(drafts) = usage.drafts {
        json["completion_tokens_details"] = json!({"accepted_prediction_tokens": drafts.accepted, "rejected_prediction_tokens": drafts.rejected});
    }
    if usage.reasoning_tokens > 0 {
        json["completion_tokens_details"]["reasoning_tokens"] = usage.reasoning_tokens.into();
    }
    json
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// A call as OpenAI writes one in a message; in a streamed delta it also has its `index`.
fn tool_call_json(call: &GeneratedToolCall) -> Value {
    json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// A chat completion's message: content (null when the output is only calls), the calls, and
/// the model's thought where it wrote one ([`thought_members`]).
fn chat_message(completion: &Completion) -> Value {
    let mut message = json!({"role": "assistant", "content": completion.text});
    if let Some(reasoning) = &completion.reasoning {
        thought_members(&mut message, reasoning);
    }
    if !completion.tool_calls.is_empty() {
        if completion.text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = completion.tool_calls.iter().map(tool_call_json).collect();
    }
    message
}

/// A thought in a message or a delta under both of the names clients read it by: `reasoning`
/// (vLLM's and OpenRouter's, after OpenAI's guidance) and `reasoning_content` (DeepSeek's,
/// llama.cpp's, the Vercel AI SDK's).
fn thought_members<'a>(object: &'a mut Value, text: &str) -> &'a mut Value {
    object["reasoning"] = text.into();
    object["reasoning_content"] = text.into();
    object
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
        "top_logprobs": logprobs.iter().map(top_logprobs).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

/// The `logprobs` of a completion that echoes its prompt: the prompt's tokens first (the first
/// has no log probability: nothing came before it), then the generated ones. Prompt tokens the
/// echoed text does not hold (an added BOS) take none of its characters.
pub fn echoed_logprobs(echo: &Echo, generated: &[TokenLogprob]) -> Value {
    let scores = echo.logprobs.as_deref().unwrap_or_default();
    let texts: Vec<String> = std::iter::once(&echo.first_token_bytes).chain(scores.iter().map(|l| &l.bytes)).map(|bytes| token_text(bytes)).collect();
    let mut text_offset = vec![];
    let mut offset = 0;
    for (i, text) in texts.iter().enumerate() {
        text_offset.push(offset);
        if i >= echo.unwritten {
            offset += text.chars().count();
        }
    }
    let mut logprobs = json!({
        "tokens": texts,
        "token_logprobs": std::iter::once(Value::Null).chain(scores.iter().map(|l| json!(l.logprob))).collect::<Vec<_>>(),
        "top_logprobs": std::iter::once(Value::Null).chain(scores.iter().map(top_logprobs)).collect::<Vec<_>>(),
        "text_offset": text_offset,
    });
    let after = completion_logprobs(generated, echo.text.chars().count());
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(list), Some(more)) = (logprobs[key].as_array_mut(), after[key].as_array()) {
            list.extend(more.iter().cloned());
        }
    }
    logprobs
}

/// `/tokenize`'s answer (vLLM's): the tokens of `request`, their count, the context, and each
/// token's vocabulary piece when asked for.
pub fn tokenized(request: &TokenizeRequest, tokens: &[u32], prompter: &Prompter) -> Value {
    let pieces = request.return_token_strs.then(|| tokens.iter().map(|&id| prompter.tokenizer().piece(id)).collect::<Vec<_>>());
    json!({"count": tokens.len(), "max_model_len": prompter.context(), "tokens": tokens, "token_strs": pieces})
}

/// A token's alternatives as text completions give them: token text -> log probability.
fn top_logprobs(logprob: &TokenLogprob) -> Value {
    Value::Object(logprob.top.iter().map(|t| (token_text(&t.bytes), json!(t.logprob))).collect())
}

impl ResponseMeta {
    fn object(&self, kind: &str, choices: Value) -> Value {
        json!({"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices})
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
                        "token_ids": completion.tokens,
                    }),
                    Endpoint::Completion => json!({
                        "index": index,
                        "text": match &completion.echo {
                            Some(echo) => format!("{}{}", echo.text, completion.text),
                            None => completion.text.clone(),
                        },
                        "logprobs": logprobs.map(|l| match &completion.echo {
                            Some(echo) => echoed_logprobs(echo, l),
                            None => completion_logprobs(l, 0),
                        }),
                        "finish_reason": reason,
                        // The ids of the text, the echoed prompt's first.
                        "token_ids": completion.echo.iter().flat_map(|echo| &echo.tokens).chain(&completion.tokens).collect::<Vec<_>>(),
                    }),
                }
            })
            .collect();
        let mut object = self.object(self.endpoint.object(), Value::Array(choices));
        object["usage"] = usage_json(&Completion::usage_of_choices(completions));
        object
    }
}

/// A delta's text: the answer's, or the model's thought's.
#[derive(Clone, Copy)]
enum Text<'a> {
    Answer(&'a str),
    Thought(&'a str),
}

/// Where a stream reports the usage of its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamUsage {
    /// Nowhere.
    Omitted,
    /// As OpenAI does with `stream_options.include_usage`: `usage: null` on every chunk, then
    /// after the last choice's a chunk without choices that holds it.
    OwnChunk,
    /// On the stream's last chunk (the JS API).
    LastChunk,
}

/// Turns a generation's deltas and results into the chunks of a streamed response: (chat only) a
/// first chunk with the assistant's role for each choice, a chunk per delta, the tool calls and
/// then a chunk with the finish reason as each choice ends, and the usage as [`StreamUsage`] says.
pub struct ChunkStream {
    meta: ResponseMeta,
    usage: StreamUsage,
    results: ChoiceResults,
    /// Characters of each choice's tokens streamed so far, for text completions' `text_offset`.
    offsets: Vec<usize>,
}

impl ChunkStream {
    pub fn new(meta: ResponseMeta, usage: StreamUsage, choices: usize) -> Self {
        Self { meta, usage, results: ChoiceResults::new(choices), offsets: vec![0; choices] }
    }

    pub fn meta(&self) -> &ResponseMeta {
        &self.meta
    }

    /// A chunk of one choice; `usage: null` on every chunk when a chunk of its own carries usage,
    /// as OpenAI does.
    fn chunk(&self, choice: Value) -> Value {
        let mut object = self.meta.object(self.meta.endpoint.chunk_object(), json!([choice]));
        if self.usage == StreamUsage::OwnChunk {
            object["usage"] = Value::Null;
        }
        object
    }

    /// A choice of a chunk: text, the ids of the tokens that completed it and the log probability
    /// of the last (with its character offset, for text completions), or the choice's finish
    /// reason.
    fn content_choice(&self, index: usize, text: Text, token_ids: &[u32], logprob: Option<(&TokenLogprob, usize)>, reason: Option<&str>) -> Value {
        match self.meta.endpoint {
            Endpoint::Chat => {
                let delta = match (reason, text) {
                    (Some(_), _) => json!({}),
                    (None, Text::Answer(text)) => json!({"content": text}),
                    (None, Text::Thought(text)) => thought_members(&mut json!({}), text).clone(),
                };
                let logprobs = logprob.map(|(l, _)| chat_logprobs(std::slice::from_ref(l)));
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason, "token_ids": token_ids})
            }
            Endpoint::Completion => {
                let logprobs = logprob.map(|(l, offset)| completion_logprobs(std::slice::from_ref(l), offset));
                let (Text::Answer(text) | Text::Thought(text)) = text;
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason, "token_ids": token_ids})
            }
        }
    }

    /// The chunks that open the stream.
    pub fn start(&self) -> Vec<Value> {
        match self.meta.endpoint {
            Endpoint::Chat => (0..self.results.len())
                .map(|index| self.chunk(json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null, "token_ids": []})))
                .collect(),
            Endpoint::Completion => vec![],
        }
    }

    /// The chunk that opens choice `choice` of a completion echoing its prompt: the prompt's text,
    /// ids and (with logprobs) scores; the offsets of the choice's tokens then count from its end.
    pub fn echo(&mut self, choice: usize, echo: &Echo) -> Value {
        if let Some(offset) = self.offsets.get_mut(choice) {
            *offset = echo.text.chars().count();
        }
        let logprobs = echo.logprobs.as_ref().map(|_| echoed_logprobs(echo, &[]));
        self.chunk(json!({"index": choice, "text": echo.text, "logprobs": logprobs, "finish_reason": null, "token_ids": echo.tokens}))
    }

    /// The chunk of a delta of choice `choice`: its text (a thought's as `reasoning_content`) and
    /// the token that completed it, if any.
    pub fn delta(&mut self, choice: usize, delta: &Delta) -> Value {
        let offset = self.offsets.get(choice).copied().unwrap_or_default();
        if let (Some(l), Some(offset)) = (&delta.logprob, self.offsets.get_mut(choice)) {
            *offset += token_text(&l.bytes).chars().count();
        }
        let text = if delta.thought { Text::Thought(&delta.text) } else { Text::Answer(&delta.text) };
        self.chunk(self.content_choice(choice, text, delta.token.as_slice(), delta.logprob.as_ref().map(|l| (l, offset)), None))
    }

    /// The chunks of choice `choice` ending as `completion` (and after the last choice, the usage
    /// where it goes), with every choice's completion once the last has ended.
    pub fn finish(&mut self, choice: usize, completion: Completion) -> (Vec<Value>, Option<Vec<Completion>>) {
        let reason = finish_reason(completion.finish_reason);
        let mut chunks: Vec<Value> = completion
            .tool_calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let mut call = tool_call_json(call);
                call["index"] = index.into();
                self.chunk(json!({"index": choice, "delta": {"tool_calls": [call]}, "logprobs": null, "finish_reason": null, "token_ids": []}))
            })
            .collect();
        chunks.push(self.chunk(self.content_choice(choice, Text::Answer(""), &[], None, Some(reason))));
        let Some(completions) = self.results.record(choice, completion) else { return (chunks, None) };
        let usage = usage_json(&Completion::usage_of_choices(&completions));
        match self.usage {
            StreamUsage::Omitted => {}
            StreamUsage::OwnChunk => {
                let mut object = self.meta.object(self.meta.endpoint.chunk_object(), json!([]));
                object["usage"] = usage;
                chunks.push(object);
            }
            StreamUsage::LastChunk => {
                if let Some(last) = chunks.last_mut() {
                    last["usage"] = usage;
                }
            }
        }
        (chunks, Some(completions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DraftUsage;

    fn meta(endpoint: Endpoint) -> ResponseMeta {
        ResponseMeta { endpoint, id: "chatcmpl-1".into(), created: 7, model: "tiny".into() }
    }

    fn answer(text: &str, token: Option<u32>) -> Delta {
        Delta { text: text.into(), token, logprob: None, thought: false }
    }

    fn completion() -> Completion {
        let usage = Usage { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7, cached_prompt_tokens: 3, ..Default::default() };
        Completion { text: "Hi there".into(), tokens: vec![1, 2], finish_reason: FinishReason::Length, usage, ..Default::default() }
    }

    #[test]
    fn chat_completion_object() {
        let body = meta(Endpoint::Chat).completion(&[completion()]);
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "Hi there"}));
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["choices"][0]["token_ids"], json!([1, 2]));
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}})
        );
        // Drafts (a prediction or prompt lookup) are counted as OpenAI counts a prediction's tokens.
        let drafted = Completion { usage: Usage { drafts: Some(DraftUsage { accepted: 4, rejected: 1 }), ..completion().usage }, ..completion() };
        let body = meta(Endpoint::Chat).completion(&[drafted.clone(), drafted]);
        assert_eq!(body["usage"]["completion_tokens_details"], json!({"accepted_prediction_tokens": 8, "rejected_prediction_tokens": 2}));
    }

    #[test]
    fn chat_stream_chunks_with_usage_in_a_chunk_of_its_own() {
        let mut stream = ChunkStream::new(meta(Endpoint::Chat), StreamUsage::OwnChunk, 1);
        let mut chunks = stream.start();
        chunks.push(stream.delta(0, &answer("Hi\nthere \"x\"", Some(9))));
        let (end, completions) = stream.finish(0, completion());
        assert_eq!(completions, Some(vec![completion()]));
        chunks.extend(end);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(chunks[0]["usage"], Value::Null);
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi\nthere \"x\"");
        assert_eq!(chunks[1]["choices"][0]["token_ids"], json!([9]));
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[2]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(chunks[3]["usage"]["total_tokens"], 7);
    }

    #[test]
    fn completion_stream_chunks_without_usage_and_with_usage_on_the_last() {
        let mut stream = ChunkStream::new(meta(Endpoint::Completion), StreamUsage::Omitted, 1);
        assert!(stream.start().is_empty());
        let delta = stream.delta(0, &answer("abc", None));
        assert_eq!(delta["object"], "text_completion");
        assert_eq!(delta["choices"][0]["text"], "abc");
        assert_eq!(delta["choices"][0]["token_ids"], json!([]));
        assert!(delta.get("usage").is_none());
        let (end, completions) = stream.finish(0, completion());
        assert!(completions.is_some());
        assert_eq!(end.len(), 1);
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert!(end[0].get("usage").is_none());

        let mut stream = ChunkStream::new(meta(Endpoint::Completion), StreamUsage::LastChunk, 1);
        assert!(stream.delta(0, &answer("abc", Some(3))).get("usage").is_none());
        let (end, _) = stream.finish(0, completion());
        assert_eq!(end.len(), 1);
        assert_eq!((&end[0]["choices"][0]["finish_reason"], &end[0]["usage"]["prompt_tokens_details"]), (&json!("length"), &json!({"cached_tokens": 3})));
    }

    #[test]
    fn choices_stream_under_their_index_and_usage_counts_the_prompt_once() {
        let mut stream = ChunkStream::new(meta(Endpoint::Chat), StreamUsage::OwnChunk, 2);
        let starts = stream.start();
        assert_eq!(starts.iter().map(|c| c["choices"][0]["index"].clone()).collect::<Vec<_>>(), [json!(0), json!(1)]);
        assert_eq!(stream.delta(1, &answer("b", Some(4)))["choices"][0], json!({"index": 1, "delta": {"content": "b"}, "logprobs": null, "finish_reason": null, "token_ids": [4]}));
        // The second choice of the prompt: its prompt tokens are the first's.
        let second = Completion { prompt_shared: true, ..completion() };
        let (first_end, completions) = stream.finish(1, second.clone());
        assert_eq!(first_end.len(), 1);
        assert!(completions.is_none(), "the stream goes on while choice 0 runs");
        let stop = Completion { finish_reason: FinishReason::Stop, ..completion() };
        let (last_end, completions) = stream.finish(0, stop.clone());
        assert_eq!(completions.map(|c| c.len()), Some(2));
        assert_eq!(last_end[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(last_end[1]["usage"], json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 3}}));

        let body = meta(Endpoint::Completion).completion(&[stop, second]);
        assert_eq!(body["choices"][1], json!({"index": 1, "text": "Hi there", "logprobs": null, "finish_reason": "length", "token_ids": [1, 2]}));
        assert_eq!(body["usage"]["total_tokens"], 9);
    }

    #[test]
    fn tool_calls_stream_as_a_chunk_each_before_the_finish_chunk() {
        let call = GeneratedToolCall { id: "call-1".into(), name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() };
        let called = Completion { text: String::new(), finish_reason: FinishReason::ToolCalls, tool_calls: vec![call], ..completion() };
        let body = meta(Endpoint::Chat).completion(std::slice::from_ref(&called));
        let call_json = json!({"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}});
        assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": null, "tool_calls": [call_json.clone()]}));
        let mut stream = ChunkStream::new(meta(Endpoint::Chat), StreamUsage::LastChunk, 1);
        let (end, _) = stream.finish(0, called);
        let mut indexed = call_json;
        indexed["index"] = json!(0);
        assert_eq!(end[0]["choices"][0]["delta"], json!({"tool_calls": [indexed]}));
        assert_eq!((&end[1]["choices"][0]["finish_reason"], end[1]["usage"]["total_tokens"].as_u64()), (&json!("tool_calls"), Some(7)));
    }

    /// A reasoning model's thought: `reasoning_content` beside the content, in deltas of its own,
    /// its tokens counted in the usage.
    #[test]
    fn a_thought_is_reasoning_content() {
        let usage = Usage { completion_tokens: 6, reasoning_tokens: 4, ..completion().usage };
        let thought = Completion { reasoning: Some("Hmm.".into()), usage, ..completion() };
        let body = meta(Endpoint::Chat).completion(std::slice::from_ref(&thought));
        assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "Hi there", "reasoning": "Hmm.", "reasoning_content": "Hmm."}));
        assert_eq!(body["usage"]["completion_tokens_details"], json!({"reasoning_tokens": 4}));
        assert!(meta(Endpoint::Chat).completion(&[completion()])["usage"].get("completion_tokens_details").is_none());
        let mut stream = ChunkStream::new(meta(Endpoint::Chat), StreamUsage::Omitted, 1);
        let delta = stream.delta(0, &Delta { thought: true, ..answer("Hmm", Some(5)) });
        assert_eq!(delta["choices"][0]["delta"], json!({"reasoning": "Hmm", "reasoning_content": "Hmm"}));
        assert_eq!(stream.delta(0, &answer("Hi", Some(6)))["choices"][0]["delta"], json!({"content": "Hi"}));
    }
}
