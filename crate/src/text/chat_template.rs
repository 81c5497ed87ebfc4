use std::collections::BTreeMap;
use std::fmt;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

use super::json::{dumps, DumpOptions};
use super::strftime::{strftime, unix_now};
use super::{TextError, Tokenizer};
use crate::api::{ChatMessage, Tool};

/// Meta's Llama 3.1 Instruct template, verbatim from the `chat_template` of
/// Meta-Llama-3.1-8B-Instruct's tokenizer_config.json.
const LLAMA31_SOURCE: &str = include_str!("llama31_chat_template.jinja");
const TEMPLATE_NAME: &str = "chat_template";

/// The most instructions one render may run: a template comes with a model file, and one whose
/// loops never end would otherwise hold a thread for good on every request. About 0.7 s on a
/// 2-core machine; Meta's Llama 3.1 template takes about 34 a message.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// The widest `tojson` indent: each nesting level repeats it, and Python's own limit is memory.
const MAX_TOJSON_INDENT: usize = 1_000;

/// A chat template (Jinja), rendered as transformers' `apply_chat_template` renders it: blocks
/// trimmed and left-stripped, Python string methods available, and the helpers transformers adds
/// (`raise_exception`, `strftime_now`, a `tojson` that is Python's `json.dumps`).
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special_tokens: SpecialTokens,
}

/// The texts a template reads as `bos_token` and `eos_token`: its model's, as transformers
/// passes its tokenizer's (tokenizer_config.json) and llama.cpp its vocabulary's. One the model
/// does not name is left undefined, which renders as nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
}

impl SpecialTokens {
    /// These tokens, and `other`'s where these name none.
    fn or(self, other: SpecialTokens) -> SpecialTokens {
        SpecialTokens { bos: self.bos.or(other.bos), eos: self.eos.or(other.eos) }
    }
}

/// What a template reads besides the messages, the tools and its model's special tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// "Today Date" of the Llama 3.1 system header. `None` leaves it to the template: Meta's 3.1
    /// template then writes its fixed "26 Jul 2024", templates that call `strftime_now` today's
    /// date. [`today_date_string`] gives today's in the same format.
    pub date_string: Option<String>,
    /// Llama 3.1: put custom tool definitions in the first user message (the template's default,
    /// true) or in the system message (false).
    pub tools_in_user_message: Option<bool>,
    /// Llama 3.1's built-in tools, e.g. `["brave_search", "wolfram_alpha"]`; calls to them are
    /// rendered as `<|python_tag|>name.call(...)` ending in `<|eom_id|>`.
    pub builtin_tools: Option<Vec<String>>,
    /// Encode special-token text inside message content as the special token (as transformers
    /// does). Off by default: content is encoded as the text it is, so a user or a document
    /// cannot forge turns with `<|eot_id|><|start_header_id|>system...`. The template's own markup
    /// keeps its special tokens either way.
    pub special_tokens_in_content: bool,
    /// More variables the template reads (a request's `chat_template_kwargs`).
    pub variables: serde_json::Map<String, serde_json::Value>,
}

/// `n` private-use characters that do not occur in `conversation` (as JSON).
fn unused_private_chars(n: usize, conversation: &impl serde::Serialize) -> Result<Vec<char>, TextError> {
    let json = serde_json::to_string(conversation).map_err(|e| TextError::Encode { reason: e.to_string() })?;
    let used: std::collections::HashSet<char> = json.chars().filter(|&c| c >= '\u{F0000}').collect();
    let private = ('\u{100000}'..='\u{10FFFD}').chain('\u{F0000}'..='\u{FFFFD}');
    let chosen: Vec<char> = private.filter(|c| !used.contains(c)).take(n).collect();
    if chosen.len() < n {
        return Err(TextError::NoPlaceholders);
    }
    Ok(chosen)
}

/// Today's date (UTC) as Llama templates write it: "26 Jul 2024".
pub fn today_date_string() -> String {
    strftime("%d %b %Y", unix_now()).unwrap_or_default()
}

impl ChatTemplate {
    /// Compiles a template, e.g. the `chat_template` of a model's tokenizer_config.json.
    pub fn new(source: &str) -> Result<Self, TextError> {
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| TextError::TemplateSyntax { reason: describe(&e) })?;
        Ok(Self { env, source: source.to_string(), special_tokens: SpecialTokens::default() })
    }

    /// The template `source` in place of this one (a host's `--chat-template`), reading the same
    /// special tokens.
    pub fn replaced_by(&self, source: &str) -> Result<Self, TextError> {
        Ok(Self::new(source)?.with_special_tokens(self.special_tokens.clone()))
    }

    /// The template reading the special tokens `named` names as its model's (the others as
    /// before).
    pub fn with_special_tokens(mut self, named: SpecialTokens) -> Self {
        self.special_tokens = named.or(std::mem::take(&mut self.special_tokens));
        self
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Names the special tokens the model's files left unnamed (`fallback`: the texts of its
    /// configuration's ids).
    pub fn fill_special_tokens(&mut self, fallback: SpecialTokens) {
        self.special_tokens = std::mem::take(&mut self.special_tokens).or(fallback);
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Meta's official Llama 3.1 Instruct template, reading Llama 3's special tokens unless its
    /// model names others.
    pub fn llama31() -> Self {
        let special_tokens = SpecialTokens { bos: Some("<|begin_of_text|>".into()), eos: Some("<|eot_id|>".into()) };
        Self::new(LLAMA31_SOURCE).expect("the built-in Llama 3.1 template parses").with_special_tokens(special_tokens)
    }

    /// The prompt text for a conversation. It already holds BOS when the template writes it (as
    /// Llama's does), so encode it with `parse_special = true` and add nothing.
    /// The prompt tokens of a conversation: rendered, then encoded with the template's special
    /// tokens parsed, and special-token text inside message content encoded as text unless
    /// `options.special_tokens_in_content`. The content's special-token text is swapped for
    /// private-use characters while the template renders, and put back as text after the split
    /// at the template's special tokens.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        tools: Option<&[Tool]>,
        add_generation_prompt: bool,
        options: &RenderOptions,
    ) -> Result<Vec<u32>, TextError> {
        if options.special_tokens_in_content {
            return tokenizer.encode(&self.render(messages, tools, add_generation_prompt, options)?, true);
        }
        let mut specials = tokenizer.special_token_texts();
        // Longest first, so that a special token holding another is swapped whole.
        specials.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let placeholders = unused_private_chars(specials.len(), &(messages, tools))?;
        let swapped: Vec<ChatMessage> = messages
            .iter()
            .map(|message| {
                let swap = |text: &Option<String>| {
                    text.as_ref().map(|text| {
                        specials.iter().zip(&placeholders).fold(text.clone(), |text, (special, placeholder)| {
                            if text.contains(special.as_str()) {
                                text.replace(special.as_str(), placeholder.encode_utf8(&mut [0; 4]))
                            } else {
                                text
                            }
                        })
                    })
                };
                ChatMessage { content: swap(&message.content), reasoning_content: swap(&message.reasoning_content), ..message.clone() }
            })
            .collect();
        let text = self.render(&swapped, tools, add_generation_prompt, options)?;
        let plain: Vec<(char, String)> = placeholders.into_iter().zip(specials).collect();
        tokenizer.encode_with_plain_text(&text, &plain)
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Tool]>,
        add_generation_prompt: bool,
        options: &RenderOptions,
    ) -> Result<String, TextError> {
        let mut context: BTreeMap<&str, Value> = options.variables.iter().map(|(name, value)| (name.as_str(), Value::from_serialize(value))).collect();
        context.insert("messages", Value::from_serialize(template_messages(messages)));
        context.insert("tools", tools.map_or(Value::from(()), Value::from_serialize));
        context.insert("documents", Value::from(()));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        if let Some(bos) = &self.special_tokens.bos {
            context.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.special_tokens.eos {
            context.insert("eos_token", Value::from(eos.as_str()));
        }
        if let Some(date) = &options.date_string {
            context.insert("date_string", Value::from(date.as_str()));
        }
        if let Some(in_user_message) = options.tools_in_user_message {
            context.insert("tools_in_user_message", Value::from(in_user_message));
        }
        if let Some(builtin) = &options.builtin_tools {
            context.insert("builtin_tools", Value::from_serialize(builtin));
        }
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| TextError::TemplateRender { reason: describe(&e) })?;
        template.render(context).map_err(|e| match raised_message(&e) {
            Some(message) => TextError::TemplateRaised { message },
            None if e.kind() == ErrorKind::OutOfFuel => {
                TextError::TemplateRender { reason: format!("it ran past {TEMPLATE_FUEL} instructions (a loop that does not end?)") }
            }
            None => TextError::TemplateRender { reason: describe(&e) },
        })
    }
}

/// Messages as templates expect them: OpenAI sends tool-call arguments as a string holding JSON,
/// but templates iterate and re-serialize them as an object.
fn template_messages(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut messages = messages.to_vec();
    for call in messages.iter_mut().flat_map(|m| m.tool_calls.iter_mut().flatten()) {
        if let serde_json::Value::String(text) = &call.function.arguments {
            if let Ok(parsed) = serde_json::from_str(text) {
                call.function.arguments = parsed;
            }
        }
    }
    messages
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(indent) if indent.is_integer() => match usize::try_from(indent.clone()).unwrap_or(0) {
            width if width > MAX_TOJSON_INDENT => {
                let message = format!("tojson: indent {width} is wider than {MAX_TOJSON_INDENT}");
                return Err(Error::new(ErrorKind::InvalidOperation, message));
            }
            width => Some(" ".repeat(width)),
        },
        Some(indent) if indent.as_str().is_some() => indent.as_str().map(str::to_string),
        Some(indent) if !indent.is_none() => {
            let message = format!("tojson: indent must be an integer or a string, not {indent}");
            return Err(Error::new(ErrorKind::InvalidOperation, message));
        }
        _ => None,
    };
    let mut options = DumpOptions::new(indent);
    options.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    options.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    if let Some(separators) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key]: [String; 2] = separators.try_into().map_err(|given: Vec<String>| {
            let message = format!("tojson: separators must be (item, key), got {} strings", given.len());
            Error::new(ErrorKind::InvalidOperation, message)
        })?;
        options.item_separator = item;
        options.key_separator = key;
    }
    kwargs.assert_all_used()?;
    Ok(Value::from(dumps(value, &options)?))
}

/// Marks an error as the template's own `raise_exception`, so it maps to `TemplateRaised`.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

fn strftime_now(format: &str) -> Result<String, Error> {
    strftime(format, unix_now()).map_err(|message| Error::new(ErrorKind::InvalidOperation, message))
}

fn raised_message(error: &Error) -> Option<String> {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(raised) = cause.downcast_ref::<Raised>() {
            return Some(raised.0.clone());
        }
        source = cause.source();
    }
    None
}

/// The error with its causes, which minijinja keeps apart from its own message.
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
