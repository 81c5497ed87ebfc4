//! Constrained decoding through llguidance: a request's `response_format` (any JSON object, a JSON
//! schema, a Lark or regex grammar) becomes a matcher over the vocabulary, and before each token is
//! sampled the tokens the grammar cannot take next are masked out of the logits.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::api::{GrammarSyntax, ResponseFormat, Tool};
use crate::text::tool_calls::{ToolCallFormat, MISTRAL_ARGS, MISTRAL_TOOL_CALLS};
use crate::text::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("constrained decoding is not available for this tokenizer: {0}")]
    Tokenizer(String),
    #[error("response_format: {0}")]
    Invalid(String),
    #[error("the output cannot follow its grammar: {0}")]
    Stuck(String),
}

/// What a request that must call a tool allows, and how the model writes calls.
#[derive(Clone, Copy)]
pub struct RequiredCalls<'a> {
    pub format: ToolCallFormat,
    /// The request's function tools.
    pub tools: &'a [Tool],
    /// Llama 3.1's built-in tools enabled.
    pub builtin: &'a [String],
    /// The one function to call; None: any offered.
    pub only: Option<&'a str>,
    /// Several calls allowed.
    pub parallel: bool,
    /// The id of a control token by its text (Mistral's `[TOOL_CALLS]` and `[ARGS]`), where the
    /// vocabulary has it: the grammar then takes the token, not its text spelled out.
    pub control_token: &'a dyn Fn(&str) -> Option<u32>,
}

/// What a generation must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    JsonSchema(Value),
    Lark(String),
    Regex(String),
}

impl Grammar {
    /// The grammar a `response_format` asks for; None for plain text.
    pub fn of_response_format(format: &ResponseFormat) -> Result<Option<Self>, GrammarError> {
        Ok(match format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(Self::JsonObject),
            ResponseFormat::JsonSchema { json_schema } => match &json_schema.schema {
                Some(schema @ Value::Object(_)) => Some(Self::JsonSchema(schema.clone())),
                Some(Value::Bool(true)) | None => Some(Self::JsonObject),
                Some(_) => return Err(GrammarError::Invalid("json_schema.schema must be a JSON schema object".into())),
            },
            ResponseFormat::Grammar { grammar } => Some(match grammar.syntax {
                GrammarSyntax::Lark => Self::Lark(grammar.definition.clone()),
                GrammarSyntax::Regex => Self::Regex(grammar.definition.clone()),
            }),
        })
    }

    /// The Lark grammar of an output that is only calls, as `required.format` writes them: of the
    /// function `only` (a custom or built-in tool), or else of any tool offered, one or (with
    /// `parallel`) several. Arguments follow each function's `parameters` schema.
    pub fn tool_calls(required: &RequiredCalls) -> Result<Self, String> {
        let RequiredCalls { format, tools, builtin, only, parallel, control_token } = *required;
        let chosen = |name: &str| only.is_none_or(|only| only == name);
        // A control token where the vocabulary has it, else its text spelled out.
        let marker = |text: &str| control_token(text).map_or_else(|| format!("{text:?}"), |id| format!("<[{id}]>"));
        let arguments_key = match format {
            ToolCallFormat::Llama3 => "parameters",
            ToolCallFormat::Hermes | ToolCallFormat::Mistral | ToolCallFormat::MistralArgs => "arguments",
        };
        let functions: Vec<(&str, Value)> = tools
            .iter()
            .filter_map(|tool| {
                let name = tool.function.get("name")?.as_str()?;
                let parameters = match tool.function.get("parameters") {
                    Some(schema @ Value::Object(fields)) if !fields.is_empty() => schema.clone(),
                    _ => json!({"type": "object"}),
                };
                chosen(name).then_some((name, parameters))
            })
            .collect();
        let builtin: Vec<&str> = match format {
            ToolCallFormat::Llama3 => builtin.iter().map(String::as_str).filter(|name| chosen(name)).collect(),
            ToolCallFormat::Hermes | ToolCallFormat::Mistral | ToolCallFormat::MistralArgs => vec![],
        };
        if let Some(name) = only.filter(|_| functions.is_empty() && builtin.is_empty()) {
            return Err(format!("the function {name:?} is not among the tools offered"));
        }
        let mut rules = vec![];
        let mut start = vec![];
        if !functions.is_empty() {
            let call = match format {
                // The marker, the name as text, [ARGS], the arguments: a rule per function.
                ToolCallFormat::MistralArgs => {
                    let (calls, args) = (marker(MISTRAL_TOOL_CALLS), marker(MISTRAL_ARGS));
                    let each = functions.iter().map(|(name, parameters)| {
                        let name = Value::from(*name); // a JSON string is a Lark string
                        format!("{calls} {name} {args} %json {}", with_default_layout(parameters.clone()))
                    });
                    each.collect::<Vec<_>>().join(" | ")
                }
                _ => {
                    let objects = functions.iter().map(|(name, parameters)| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, arguments_key: parameters},
                            "required": ["name", arguments_key],
                            "additionalProperties": false,
                        })
                    });
                    let schema = with_default_layout(json!({"anyOf": objects.collect::<Vec<_>>()}));
                    match format {
                        ToolCallFormat::Hermes => format!("\"<tool_call>\\n\" %json {schema} \"\\n</tool_call>\""),
                        _ => format!("%json {schema}"),
                    }
                }
            };
            rules.push(format!("call: {call}"));
            let separator = match format {
                ToolCallFormat::Llama3 => "\"; \" ",
                ToolCallFormat::Hermes => "\"\\n\" ",
                ToolCallFormat::Mistral => "\", \" ",
                ToolCallFormat::MistralArgs => "",
            };
            let calls = if parallel { format!("call ({separator}call)*") } else { "call".into() };
            start.push(match format {
                ToolCallFormat::Mistral => format!("{} \" [\" {calls} \"]\"", marker(MISTRAL_TOOL_CALLS)),
                _ => calls,
            });
        }
        for name in builtin {
            // Meta's built-in call syntax: a query in a Python string (JSON's is one), or code.
            let body = match name {
                "code_interpreter" => "CODE".to_string(),
                _ => format!("\"{name}.call(query=\" %json {{\"type\": \"string\"}} \")\""),
            };
            start.push(format!("<|python_tag|> {body}"));
        }
        if start.is_empty() {
            return Err("no tools are offered, so none can be required".into());
        }
        rules.insert(0, format!("start: {}", start.join(" | ")));
        rules.push("CODE: /(.|\\n)+/".into());
        Ok(Self::Lark(rules.join("\n")))
    }

    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Self::JsonObject => TopLevelGrammar::from_json_schema(with_default_layout(json!({"type": "object"}))),
            Self::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_default_layout(schema.clone())),
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Self::Regex(regex) => TopLevelGrammar::from_regex(regex),
        }
    }
}

/// JSON laid out as `json.dumps` writes it (", " and ": ", no other whitespace) unless the schema
/// says otherwise under llguidance's `x-guidance`: what models are trained on, and a model cannot
/// spend its tokens on whitespace.
fn with_default_layout(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

/// The vocabulary as llguidance sees it: each token's bytes in a trie.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(bytes, |text| self.tokenizer.encode(text, false).unwrap_or_default())
    }
}

/// Compiles grammars against one model's vocabulary. Built once per engine, on first use: the trie
/// and its token classes take a while for a 128K vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// `token_bytes` has an entry per id of the model's vocabulary (its logits' length):
    /// [`Tokenizer::token_bytes`], padded; `stop_tokens` end a generation and are what a finished
    /// grammar allows.
    pub fn new(tokenizer: &Tokenizer, token_bytes: &[Option<Vec<u8>>], stop_tokens: &[u32]) -> Result<Self, GrammarError> {
        let vocab = token_bytes.len();
        let mut words = token_bytes.to_vec();
        // A stop token ends the output, so it is never text, whatever its vocabulary entry says.
        for &stop in stop_tokens {
            if let Some(word) = words.get_mut(stop as usize) {
                *word = None;
            }
        }
        // Special tokens and unused ids are spelled as llguidance spells special tokens: a marker
        // byte and the name, so no text can produce them.
        let words: Vec<Vec<u8>> = words
            .into_iter()
            .enumerate()
            .map(|(id, bytes)| {
                bytes.unwrap_or_else(|| {
                    let name = tokenizer.decode(&[id as u32], false).ok().filter(|t| t.starts_with('<')).unwrap_or_else(|| format!("<|unnamed_{id}|>"));
                    [&[TokTrie::SPECIAL_TOKEN_MARKER], name.as_bytes()].concat()
                })
            })
            .collect();
        let &first_stop = stop_tokens.first().ok_or_else(|| GrammarError::Tokenizer("the model has no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(vocab as u32, first_stop);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(stop_tokens);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh matcher at the start of `grammar`; an invalid grammar or schema is an error here.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let parser = self.factory.create_parser(grammar.to_llguidance()).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        Ok(Constraint { matcher: Matcher::new(Ok(parser)) })
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

/// The tokens a grammar allows next.
pub struct Mask(SimpleVob);

impl Mask {
    pub fn allows(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }

    /// Allows `token` too (one the grammar does not see, such as a thought's start marker).
    pub fn allow(&mut self, token: u32) {
        self.0.allow_token(token);
    }

    /// Sets every disallowed token's logit to minus infinity.
    pub fn apply(&self, logits: &mut [f32]) {
        for (token, logit) in logits.iter_mut().enumerate() {
            if !self.0.is_allowed(token as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

impl Constraint {
    /// The same grammar and place, for another choice of the same request.
    pub fn fork(&self) -> Self {
        Self { matcher: self.matcher.deep_clone() }
    }

    /// Tokens allowed next (only the stop tokens once the grammar is complete).
    pub fn mask(&mut self) -> Result<Mask, GrammarError> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| GrammarError::Stuck(e.to_string()))?;
        if mask.is_zero() {
            return Err(GrammarError::Stuck("no token can continue it".into()));
        }
        Ok(Mask(mask))
    }

    /// The tokens the grammar forces next, as llguidance tokenizes its forced bytes (none where
    /// it forces none, or where more bytes could join the last of them into another token). The
    /// next mask allows only the first of them.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// How many of `tokens`, in turn from here, the grammar allows (none taken). llguidance checks
    /// their bytes, so a tokenization other than the one a mask allows may count too.
    pub fn allowed_run(&mut self, tokens: &[u32]) -> usize {
        // An id past the vocabulary would stop the matcher for good.
        let vocab = self.matcher.tok_env().map_or(0, |env| env.tok_trie().vocab_size());
        let known = tokens.iter().take_while(|&&token| (token as usize) < vocab).count();
        self.matcher.validate_tokens(&tokens[..known]).unwrap_or(0)
    }

    /// Advances past a sampled token (which the last mask allowed).
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        self.matcher.consume_token(token).map_err(|e| GrammarError::Stuck(e.to_string()))
    }
}
