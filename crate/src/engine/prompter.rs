//! Requests turned into what the engine runs: prompts rendered and tokenized, grammars
//! compiled, on any thread.

use std::sync::{Arc, Mutex, PoisonError};

use super::{EngineError, Echo};
use crate::api::request::{Prompt, TokenizeInput, Work};
use crate::api::{ChatCompletionRequest, Prediction, ResponseFormat, SamplingParams, Tool, ToolChoice, ToolChoiceMode};
use crate::grammar::{Constraint, Grammar, GrammarCompiler, RequiredCalls};
use crate::text::reasoning::{ThinkTokens, ThoughtSplit};
use crate::text::tool_calls::{ToolCallFormat, ToolSet, BUILTIN_TOOLS};
use crate::text::{ChatTemplate, RenderOptions, SpecialTokens, TextError, Tokenizer};
use crate::{Config, Result};

/// Each token's bytes for log probabilities (`token_bytes`, built when a request wanting them
/// was prepared); a special token's are its name.
pub(super) fn token_bytes_of<'a>(token_bytes: &'a TokenBytes, tokenizer: &'a Tokenizer) -> impl Fn(u32) -> Vec<u8> + 'a {
    move |token| match token_bytes.get(token as usize) {
        Some(Some(bytes)) => bytes.clone(),
        _ => tokenizer.decode(&[token], false).unwrap_or_default().into_bytes(),
    }
}

/// A request made ready for the engine: its prompts rendered and tokenized (ids within the
/// model's vocabulary; one for a chat), its grammar compiled, and how its tool calls are told apart.
/// [`Prompter::prepare`] makes it on any thread, so that a long prompt's rendering and tokenizing
/// (0.8 s for 100,000 tokens on a 2-core machine) or a large grammar's compiling (15 ms for 30
/// tools) does not hold up the sequences the engine runs, which all wait for its thread.
pub struct Prepared {
    pub(super) prompts: Vec<Vec<u32>>,
    /// Each prompt to give back, when the request asked (`echo`).
    pub(super) echoes: Option<Vec<Echo>>,
    pub(super) sampling: SamplingParams,
    pub(super) constraint: Option<Constraint>,
    pub(super) calling: Option<ToolCalling>,
    /// Tells the output's thought from its answer, for a chat of a reasoning model; the grammar
    /// (if any) shapes the answer after the thought.
    pub(super) thought: Option<ThoughtSplit>,
    /// The predicted output's tokens (none without a prediction).
    pub(super) prediction: Vec<u32>,
}

/// Turns requests into prompts: an engine's tokenizer and chat template (both cheap to clone and
/// shared across threads), its model's vocabulary and the tables built from it.
#[derive(Clone)]
pub struct Prompter {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    bos_token_id: Option<u32>,
    vocab_size: usize,
    /// Positions a sequence may reach.
    context: usize,
    stop_tokens: Vec<u32>,
    /// The thought markers of a reasoning model, when its chats' thoughts are told apart.
    think_tokens: Option<ThinkTokens>,
    tables: Arc<VocabularyTables>,
}

/// Built from the vocabulary on first use and shared by every clone of a [`Prompter`]: each
/// token's bytes (for grammars and log probabilities) and the grammar compiler (0.4 s for Llama
/// 3's 128K tokens on a 2-core machine), so neither is built on the engine's thread.
#[derive(Default)]
struct VocabularyTables {
    token_bytes: Mutex<Option<Arc<TokenBytes>>>,
    grammars: Mutex<Option<Arc<GrammarCompiler>>>,
}

/// Each token's bytes, by id; None for special tokens and ids without any.
pub type TokenBytes = Vec<Option<Vec<u8>>>;

/// The value in `cell`, built the first time; callers at the same time wait for that one build.
fn built_once<T>(cell: &Mutex<Option<Arc<T>>>, build: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    let mut value = cell.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(built) = &*value {
        return Ok(built.clone());
    }
    let built = Arc::new(build()?);
    *value = Some(built.clone());
    Ok(built)
}

impl Prompter {
    /// The prompter of a model of `config` that reaches `context` positions: its stop tokens are
    /// the config's end-of-sequence ids and the tokenizer's end-of-turn tokens; the template's
    /// special tokens, where the model's files did not name them, the texts of the config's BOS and
    /// first EOS ids.
    pub(super) fn new(tokenizer: Tokenizer, mut template: ChatTemplate, config: &Config, context: usize) -> Self {
        let text_of = |id: Option<&u32>| id.and_then(|&id| tokenizer.decode(&[id], false).ok());
        template.fill_special_tokens(SpecialTokens { bos: text_of(config.bos_token_id.as_ref()), eos: text_of(config.eos_token_ids.first()) });
        let mut stop_tokens = config.eos_token_ids.clone();
        for name in ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"] {
            if let Some(id) = tokenizer.token_id(name).filter(|id| !stop_tokens.contains(id)) {
                stop_tokens.push(id);
            }
        }
        let think_tokens = ThinkTokens::detect(template.source(), &tokenizer);
        Self { tokenizer, template, bos_token_id: config.bos_token_id, vocab_size: config.vocab_size, context, stop_tokens, think_tokens, tables: Arc::default() }
    }

    /// With `on` (the default), a reasoning model's chats give its thought apart from its answer
    /// (`reasoning_content`); without, the thought stays in the content as the model wrote it.
    pub(super) fn parse_reasoning(&mut self, on: bool) {
        self.think_tokens = if on { ThinkTokens::detect(self.template.source(), &self.tokenizer) } else { None };
    }

    /// The thought markers whose text chats leave out of their content, if any.
    pub fn think_tokens(&self) -> Option<ThinkTokens> {
        self.think_tokens
    }

    /// What a host read from a request ([`crate::api::request`]), ready for [`super::Engine::add_prepared`].
    pub fn prepare(&self, work: &Work, options: &RenderOptions) -> Result<Prepared> {
        let (prompts, sampling, echo) = match work {
            Work::Chat(request) => return self.prepare_chat(request, options),
            Work::Complete { prompts, sampling, echo } => (prompts, sampling, *echo),
        };
        if prompts.is_empty() {
            return Err(EngineError::EmptyPrompt.into());
        }
        let ids = prompts
            .iter()
            .map(|prompt| match prompt {
                Prompt::Text(text) => self.text_prompt(text),
                Prompt::Tokens(ids) => match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
                    Some(&id) => Err(EngineError::Text(TextError::UnknownTokenId { id, vocab_size: self.vocab_size }).into()),
                    None => Ok(ids.clone()),
                },
            })
            .collect::<Result<Vec<_>>>()?;
        let grammar = response_format_grammar(sampling)?;
        let mut prepared = self.finish(ids, sampling, grammar, None, None)?;
        if echo {
            let logprobs = sampling.logprobs_wanted().map(|_| vec![]);
            let token_bytes = if logprobs.is_some() { self.token_bytes()? } else { Arc::default() };
            let bytes = token_bytes_of(&token_bytes, &self.tokenizer);
            let echoes = prompts.iter().zip(&prepared.prompts).map(|(prompt, ids)| {
                let (text, unwritten) = match prompt {
                    Prompt::Text(text) => (text.clone(), self.bos_token_id.is_some() as usize),
                    Prompt::Tokens(given) => (self.tokenizer.decode(given, false).map_err(EngineError::from)?, 0),
                };
                let first_token_bytes = ids.first().filter(|_| logprobs.is_some()).map(|&id| bytes(id)).unwrap_or_default();
                Ok(Echo { text, tokens: vec![], unwritten, first_token_bytes, logprobs: logprobs.clone() })
            });
            prepared.echoes = Some(echoes.collect::<Result<_>>()?);
        }
        Ok(prepared)
    }

    /// A prepared request: its grammar compiled and, when it wants log probabilities, the
    /// tokens' bytes built.
    fn finish(&self, prompts: Vec<Vec<u32>>, sampling: &SamplingParams, grammar: Option<Grammar>, calling: Option<ToolCalling>, thought: Option<ThoughtSplit>) -> Result<Prepared> {
        let constraint = match grammar {
            Some(grammar) => Some(self.grammars()?.compile(&grammar).map_err(EngineError::from)?),
            None => None,
        };
        if sampling.logprobs_wanted().is_some() {
            self.token_bytes()?;
        }
        let prediction = match &sampling.prediction {
            Some(Prediction::Content { content }) => self.tokenizer.encode(content, false).map_err(EngineError::from)?,
            None => vec![],
        };
        Ok(Prepared { prompts, echoes: None, sampling: sampling.clone(), constraint, calling, thought, prediction })
    }

    /// Tokens that end generation.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Positions a sequence may reach (`/tokenize`'s `max_model_len`).
    pub fn context(&self) -> usize {
        self.context
    }

    /// The bytes of each token of the model's vocabulary ([`Tokenizer::token_bytes`]; None for
    /// special tokens and ids without one), computed once.
    pub fn token_bytes(&self) -> Result<Arc<TokenBytes>> {
        built_once(&self.tables.token_bytes, || {
            let mut token_bytes = self.tokenizer.token_bytes().map_err(EngineError::from)?;
            token_bytes.resize(self.vocab_size, None);
            Ok(token_bytes)
        })
    }

    /// The compiler of this vocabulary's grammars, built once.
    pub fn grammars(&self) -> Result<Arc<GrammarCompiler>> {
        built_once(&self.tables.grammars, || {
            let token_bytes = self.token_bytes()?;
            Ok(GrammarCompiler::new(&self.tokenizer, &token_bytes, &self.stop_tokens).map_err(EngineError::from)?)
        })
    }

    /// The tokens a tokenize request asks for: a completion's or a chat request's prompt as the
    /// engine would run it, or a text without BOS.
    pub fn tokenize(&self, input: &TokenizeInput, options: &RenderOptions) -> Result<Vec<u32>> {
        match input {
            TokenizeInput::Text { text, add_special_tokens: true } => self.text_prompt(text),
            TokenizeInput::Text { text, add_special_tokens: false } => Ok(self.tokenizer.encode(text, true).map_err(EngineError::from)?),
            TokenizeInput::Chat { request, add_generation_prompt } => self.render_chat(request, *add_generation_prompt, options),
        }
    }

    /// The prompt tokens of a chat request ([`ChatTemplate::encode`]), with the tools it shows.
    pub fn chat_prompt(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Vec<u32>> {
        self.render_chat(request, true, options)
    }

    fn render_chat(&self, request: &ChatCompletionRequest, add_generation_prompt: bool, options: &RenderOptions) -> Result<Vec<u32>> {
        // A template renders what it does not know as it likes (Llama 3.1's as a header of that
        // name), so a typo would silently become another turn.
        const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "ipython"];
        if let Some((index, message)) = request.messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
            return Err(EngineError::UnknownRole { index, role: message.role.clone(), known: ROLES }.into());
        }
        let tools = Some(offered_tools(request)).filter(|tools| !tools.is_empty());
        let mut options = options.clone();
        if request.builtin_tools.is_some() {
            options.builtin_tools = request.builtin_tools.clone();
        }
        if let Some(variables) = &request.chat_template_kwargs {
            options.variables.extend(variables.clone());
        }
        Ok(self.template.encode(&self.tokenizer, &request.messages, tools, add_generation_prompt, &options).map_err(EngineError::from)?)
    }

    /// A chat request prepared: when it offers tools and the template has a call format, each
    /// output is split into content and calls; `tool_choice` required or a named function makes
    /// the output such calls (constrained decoding).
    pub(super) fn prepare_chat(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Prepared> {
        let prompt = self.chat_prompt(request, options)?;
        let calling = self.tool_calling(request, options)?;
        let forced = match &request.tool_choice {
            Some(ToolChoice::Mode(ToolChoiceMode::Required)) => Some(None),
            Some(ToolChoice::Function { function, .. }) => Some(Some(function.name.as_str())),
            _ => None,
        };
        let grammar = match (forced, &calling) {
            (None, _) => response_format_grammar(&request.sampling)?,
            (Some(_), None) => {
                let builtin = request.builtin_tools.as_ref().or(options.builtin_tools.as_ref());
                let reason = match offered_tools(request).is_empty() && builtin.is_none_or(Vec::is_empty) {
                    true => "no tools are offered, so none can be required",
                    false => "this model's chat template has no tool-call format, so no call can be required",
                };
                return Err(EngineError::ToolChoice(reason.into()).into());
            }
            (Some(only), Some((format, tools))) => {
                if request.sampling.response_format.as_ref().is_some_and(|f| *f != ResponseFormat::Text) {
                    return Err(EngineError::ToolChoice("a required tool call and a response_format cannot both shape the output".into()).into());
                }
                if !tools.builtin.is_empty() && *format == ToolCallFormat::Llama3 && self.tokenizer.token_id("<|python_tag|>").is_none() {
                    return Err(EngineError::ToolChoice("built-in tools are called after <|python_tag|>, a token this model's tokenizer does not have".into()).into());
                }
                let parallel = request.parallel_tool_calls.unwrap_or(true);
                let required = RequiredCalls {
                    format: *format,
                    tools: offered_tools(request),
                    builtin: &tools.builtin,
                    only,
                    parallel,
                    control_token: &|text| self.tokenizer.token_id(text),
                };
                Some(Grammar::tool_calls(&required).map_err(EngineError::ToolChoice)?)
            }
        };
        let thought = self.think_tokens.map(|markers| ThoughtSplit::new(markers, markers.opened_by(&prompt, &self.tokenizer)));
        self.finish(vec![prompt], &request.sampling, grammar, calling, thought)
    }

    /// The tools a chat request offers and how their calls are written, when they can be parsed.
    fn tool_calling(&self, request: &ChatCompletionRequest, options: &RenderOptions) -> Result<Option<ToolCalling>> {
        let tools = offered_tools(request);
        let builtin = request.builtin_tools.clone().or_else(|| options.builtin_tools.clone()).unwrap_or_default();
        if let Some(unknown) = builtin.iter().find(|name| !BUILTIN_TOOLS.contains(&name.as_str())) {
            return Err(EngineError::UnknownBuiltinTool { name: unknown.clone(), known: BUILTIN_TOOLS }.into());
        }
        let functions: Vec<String> = tools.iter().filter_map(|t| t.function.get("name").and_then(|n| n.as_str()).map(str::to_string)).collect();
        if functions.len() != tools.len() {
            return Err(EngineError::ToolChoice("every tool needs a function with a name".into()).into());
        }
        if functions.is_empty() && builtin.is_empty() {
            return Ok(None);
        }
        Ok(ToolCallFormat::detect(self.template.source()).map(|format| (format, ToolSet { functions, builtin })))
    }

    /// The prompt tokens of a raw text completion: the model's BOS token, then the text with
    /// special-token text parsed.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut prompt: Vec<u32> = self.bos_token_id.into_iter().collect();
        prompt.extend(self.tokenizer.encode(text, true).map_err(EngineError::from)?);
        Ok(prompt)
    }
}

/// The grammar a request's `response_format` asks for, if any.
fn response_format_grammar(params: &SamplingParams) -> Result<Option<Grammar>> {
    let format = params.response_format.as_ref().map(Grammar::of_response_format).transpose().map_err(EngineError::from)?;
    Ok(format.flatten())
}

/// The tools a chat request shows the model: none with `tool_choice: "none"`.
fn offered_tools(request: &ChatCompletionRequest) -> &[Tool] {
    match request.tool_choice {
        Some(ToolChoice::Mode(ToolChoiceMode::None)) => &[],
        _ => request.tools.as_deref().unwrap_or_default(),
    }
}

/// How a request's tool calls are written, and which tools it may call.
pub(super) type ToolCalling = (ToolCallFormat, ToolSet);
