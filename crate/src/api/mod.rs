//! OpenAI-shaped request and response types, shared by the engine, the JS API and the HTTP server.

pub mod request;
pub mod responses;
pub mod response;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One message of a conversation. `content` may be absent on an assistant message that only calls
/// tools. Roles: system, user, assistant, tool (OpenAI) or ipython (Llama 3.1's name for tool
/// results).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant's thought, as a reasoning model's response gave it: sent back with the
    /// conversation, for templates that show it (DeepSeek-R1's leave it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: Some(content.to_string()), ..Default::default() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON object (OpenAI sends them as a string holding JSON; both are accepted).
    pub arguments: serde_json::Value,
}

/// A tool the model may call: `{"type": "function", "function": {name, description, parameters}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: serde_json::Value,
}

fn function_type() -> String {
    "function".to_string()
}

/// Stop sequences: one string or several.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `POST /v1/chat/completions` and `engine.chat.completions.create`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Whether the model may, must, or must not call a tool (default: may, when tools are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Whether a forced call may be followed by more (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Llama 3.1's built-in tools to enable: `brave_search`, `wolfram_alpha`, `code_interpreter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin_tools: Option<Vec<String>>,
    /// More variables for the chat template (vLLM's and llama.cpp's `chat_template_kwargs`), e.g.
    /// `{"enable_thinking": false}` for templates that let a reasoning model answer at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub sampling: SamplingParams,
}

/// `tool_choice`: "none", "auto", "required", or `{"type": "function", "function": {"name": ...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Function {
        #[serde(rename = "type", default = "function_type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// The model is not shown the tools.
    None,
    Auto,
    /// The output is one or more calls of the offered tools (constrained decoding).
    Required,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// A call the model made, as OpenAI returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratedToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, keys in the model's order.
    pub arguments: String,
}

/// `POST /v1/completions`: a raw prompt, no chat template.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub sampling: SamplingParams,
}

/// Sampling and stopping options every request shares. Absent fields take the defaults below.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string key, as OpenAI sends it) -> bias added to its logit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<HashMap<String, f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "max_completion_tokens")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// What the output must be: JSON, JSON matching a schema, or text matching a grammar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Chat: `true` to return each output token's log probability; completions: the number of
    /// most likely alternatives to return with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Logprobs>,
    /// Chat: the number of most likely alternatives returned with each token's log probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Text the output is expected to be much like (OpenAI's Predicted Outputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
}

impl SamplingParams {
    /// These parameters with `defaults` where they set none (a model's recommended sampling).
    pub fn with_defaults(&self, defaults: &crate::model::SamplingDefaults) -> Self {
        Self {
            temperature: self.temperature.or(defaults.temperature),
            top_p: self.top_p.or(defaults.top_p),
            top_k: self.top_k.or(defaults.top_k),
            min_p: self.min_p.or(defaults.min_p),
            repetition_penalty: self.repetition_penalty.or(defaults.repetition_penalty),
            ..self.clone()
        }
    }

    /// How many alternatives to return with each token's log probability; None: no logprobs.
    pub fn logprobs_wanted(&self) -> Option<usize> {
        match self.logprobs {
            Some(Logprobs::Enabled(true)) => Some(self.top_logprobs.unwrap_or(0) as usize),
            Some(Logprobs::Alternatives(n)) => Some(n as usize),
            Some(Logprobs::Enabled(false)) | None => None,
        }
    }
}

/// `prediction`: what a request drafts its next tokens from, to verify several in one pass
/// (a file being edited, a document being rewritten).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Prediction {
    Content { content: String },
}

/// `logprobs`: a flag on chat completions, a count of alternatives on text completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Logprobs {
    Enabled(bool),
    Alternatives(u32),
}

/// `response_format`, as OpenAI's, plus `grammar` (the shape of OpenAI's grammar-constrained custom
/// tools) for Lark and regex grammars.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
    Grammar { grammar: GrammarFormat },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// The output always follows the schema exactly, strict or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrammarFormat {
    pub syntax: GrammarSyntax,
    pub definition: String,
}

/// Lark as llguidance reads it (with `%json` for embedded JSON schemas), or a regular expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrammarSyntax {
    Lark,
    Regex,
}

/// The log probability of an output token under the model (the softmax of its raw logits, before
/// sampling options and grammar masks), with the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The bytes the token stands for (a special token's name).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// Why generation ended, as OpenAI reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    #[default]
    Stop,
    /// max_tokens reached, or the context is full.
    Length,
    /// The request was cancelled.
    Abort,
    /// The output is tool calls.
    ToolCalls,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Prompt tokens whose KV cache entries were reused from the previous request.
    pub cached_prompt_tokens: u32,
    /// Generated tokens of the model's thought, its markers included.
    #[serde(default)]
    pub reasoning_tokens: u32,
    /// Drafted tokens (from a prediction or by prompt lookup) the model chose, and those it did
    /// not; None where the request drafted nothing and brought no prediction.
    pub drafts: Option<DraftUsage>,
}

/// OpenAI's `accepted_prediction_tokens` and `rejected_prediction_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftUsage {
    pub accepted: u32,
    pub rejected: u32,
}

impl DraftUsage {
    /// The sum over choices, None where none has any.
    pub fn sum(usages: impl Iterator<Item = Option<DraftUsage>>) -> Option<DraftUsage> {
        usages.flatten().reduce(|a, b| DraftUsage { accepted: a.accepted + b.accepted, rejected: a.rejected + b.rejected })
    }
}
