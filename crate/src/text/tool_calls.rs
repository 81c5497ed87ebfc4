//! Tool calls in generated text, turned into OpenAI-shaped calls. Llama 3.1 calls a custom tool with
//! JSON (`{"name": ..., "parameters": {...}}`, several joined by `;`) or `<function=name>{...}</function>`,
//! and a built-in one after `<|python_tag|>` (`brave_search.call(query="...")`, or bare code for the code
//! interpreter); Hermes-style templates (Hermes 2 Pro, Qwen) wrap each call in `<tool_call>`; Mistral
//! 7B v0.3 writes `[TOOL_CALLS]` and a JSON list of `{"name", "arguments"}`, Mistral's models from
//! its v11 tokenizer on (Mistral Small 3.1 and later) `[TOOL_CALLS]name[ARGS]{...}` for each call.
//! The references are Meta's prompt-format docs, llama.cpp's `common_chat_parse_llama_3_1` and
//! vLLM's `llama3_json` and `mistral` parsers. Text that does not parse as calls to known tools
//! stays content.

use serde_json::{Map, Value};

const PYTHON_TAG: &str = "<|python_tag|>";
const FUNCTION_OPEN: &str = "<function=";
const FUNCTION_CLOSE: &str = "</function>";
const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";
/// Mistral's control token before its list of calls (before each call from v11 on).
pub const MISTRAL_TOOL_CALLS: &str = "[TOOL_CALLS]";
/// Mistral's control token between a call's name and its arguments, from v11 on.
pub const MISTRAL_ARGS: &str = "[ARGS]";
/// End of turn and end of message: they may end the text (after the calls) and are never content.
const END_TOKENS: [&str; 2] = ["<|eot_id|>", "<|eom_id|>"];
/// Left out of content wherever they are: the end tokens, and a tag that no call follows.
const SILENT_TOKENS: [&str; 3] = [END_TOKENS[0], END_TOKENS[1], PYTHON_TAG];
/// Bare code after `<|python_tag|>` is a call to this built-in with `{"code": ...}`: the name Meta's
/// reference decoder (llama-models' `decode_assistant_message_from_content`) and the template's
/// `builtin_tools` use, so the call renders back as a built-in one. llama.cpp's Functionary 3.1 parser
/// names it `python` (its Llama 3.1 parser takes only `name.call(...)` after the tag).
const CODE_INTERPRETER: &str = "code_interpreter";

/// Llama 3.1's built-in tools, which a request enables by name.
pub const BUILTIN_TOOLS: [&str; 3] = ["brave_search", "wolfram_alpha", CODE_INTERPRETER];

/// How a chat template asks the model to call tools, told from the template's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    Llama3,
    Hermes,
    /// `[TOOL_CALLS]` and a JSON list of calls.
    Mistral,
    /// `[TOOL_CALLS]name[ARGS]{...}` for each call.
    MistralArgs,
}

impl ToolCallFormat {
    /// Llama 3.x templates mention `<|python_tag|>` or `ipython`; Hermes/Qwen-style ones
    /// `<tool_call>`; Mistral's `[TOOL_CALLS]`, with `[ARGS]` from v11 on. None: the output stays text.
    pub fn detect(template_source: &str) -> Option<Self> {
        if template_source.contains(PYTHON_TAG) || template_source.contains("ipython") {
            Some(Self::Llama3)
        } else if template_source.contains(TOOL_CALL_OPEN) {
            Some(Self::Hermes)
        } else if template_source.contains(MISTRAL_TOOL_CALLS) {
            Some(if template_source.contains(MISTRAL_ARGS) { Self::MistralArgs } else { Self::Mistral })
        } else {
            None
        }
    }

    /// The texts that begin calls after content.
    fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Llama3 => &[PYTHON_TAG, FUNCTION_OPEN],
            Self::Hermes => &[TOOL_CALL_OPEN],
            Self::Mistral | Self::MistralArgs => &[MISTRAL_TOOL_CALLS],
        }
    }

    /// A fresh call id from `alphanumeric` characters: OpenAI's `call_` and 24, except for
    /// Mistral, whose template refuses a call in the history unless its id is 9 of them.
    pub fn call_id(self, mut alphanumeric: impl FnMut() -> char) -> String {
        match self {
            Self::Mistral | Self::MistralArgs => (0..9).map(|_| alphanumeric()).collect(),
            _ => format!("call_{}", (0..24).map(|_| alphanumeric()).collect::<String>()),
        }
    }

    fn first_marker(self, text: &str) -> Option<usize> {
        self.markers().iter().filter_map(|marker| text.find(marker)).min()
    }

    /// Where the calls in a whole output would begin: Llama's bare JSON only at its start (JSON in prose
    /// is content), otherwise at the first marker.
    fn call_start(self, text: &str) -> Option<usize> {
        let body = text.trim_start();
        if self == Self::Llama3 && body.starts_with('{') {
            return Some(text.len() - body.len());
        }
        self.first_marker(text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub name: String,
    /// Arguments as compact JSON text (OpenAI's `function.arguments` string), keys in the model's order.
    pub arguments: String,
}

impl ParsedToolCall {
    /// A call only when its arguments are a JSON object, as OpenAI's are.
    fn new(name: &str, arguments: &Value) -> Option<Self> {
        arguments.is_object().then(|| Self { name: name.to_string(), arguments: arguments.to_string() })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// Text that is not part of a call, trimmed; empty when there is none.
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

/// What the model may call: the names of the request's function tools, and Llama 3.1's built-in tools
/// that are enabled (`brave_search`, `wolfram_alpha`, `code_interpreter`).
#[derive(Clone, Debug, Default)]
pub struct ToolSet {
    pub functions: Vec<String>,
    pub builtin: Vec<String>,
}

impl ToolSet {
    /// Any form of call may name either kind, as Meta's decoder takes a built-in's name in JSON.
    fn allows(&self, name: &str) -> bool {
        self.functions.iter().chain(&self.builtin).any(|known| known == name)
    }
}

/// Splits generated text (special tokens kept as text) into content and calls. The calls must run to
/// the end of the text and each name a tool of `tools`; otherwise there are none and all is content.
pub fn parse(format: ToolCallFormat, text: &str, tools: &ToolSet) -> ParsedOutput {
    let text = without_final_end_tokens(text);
    let calls = format.call_start(text).and_then(|start| Some((start, parse_calls(format, &text[start..], tools)?)));
    match calls {
        Some((start, tool_calls)) => ParsedOutput { content: content_of(&text[..start]), tool_calls },
        None => ParsedOutput { content: content_of(text), tool_calls: Vec::new() },
    }
}

/// `text` less the end tokens (and whitespace) it ends with. Elsewhere they are only left out of
/// content, as the stream leaves them out, so that what streams is what the whole text parses to.
fn without_final_end_tokens(mut text: &str) -> &str {
    while let Some(rest) = END_TOKENS.iter().find_map(|token| text.trim_end().strip_suffix(token)) {
        text = rest;
    }
    text
}

fn content_of(text: &str) -> String {
    remove_tokens(text, &SILENT_TOKENS).trim().to_string()
}

/// `text` without `tokens`, found left to right in one pass: text the removal joins is not searched
/// again, just as the stream, which removes them piece by piece, does not.
fn remove_tokens(text: &str, tokens: &[&str]) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match tokens.iter().find(|token| rest.starts_with(**token)) {
            Some(token) => rest = &rest[token.len()..],
            None => {
                kept.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    kept
}

/// The calls filling `text`, apart by whitespace or `;` (Llama 3.x's parallel form).
fn parse_calls(format: ToolCallFormat, mut rest: &str, tools: &ToolSet) -> Option<Vec<ParsedToolCall>> {
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            return (!calls.is_empty()).then_some(calls);
        }
        let (found, after) = match format {
            ToolCallFormat::Llama3 => llama_call(rest).map(|(call, after)| (vec![call], after))?,
            ToolCallFormat::Hermes => hermes_call(rest).map(|(call, after)| (vec![call], after))?,
            ToolCallFormat::Mistral => mistral_calls(rest)?,
            ToolCallFormat::MistralArgs => mistral_args_call(rest).map(|(call, after)| (vec![call], after))?,
        };
        if !found.iter().all(|call| tools.allows(&call.name)) {
            return None;
        }
        calls.extend(found);
        rest = after;
    }
}

/// One Llama 3.1 call at the start of `text`, and the text after it.
fn llama_call(text: &str) -> Option<(ParsedToolCall, &str)> {
    if let Some(after_tag) = text.strip_prefix(PYTHON_TAG) {
        let body = after_tag.trim_start();
        if body.starts_with('{') || body.starts_with(FUNCTION_OPEN) || body.starts_with(PYTHON_TAG) {
            return llama_call(body);
        }
        if let Some((name, after)) = split_builtin_call(body) {
            let (arguments, after) = python_kwargs(after)?;
            return Some((ParsedToolCall::new(name, &arguments)?, after));
        }
        let code = body.trim_end();
        if code.is_empty() {
            return None;
        }
        return Some((ParsedToolCall::new(CODE_INTERPRETER, &serde_json::json!({ "code": code }))?, ""));
    }
    if let Some(after) = text.strip_prefix(FUNCTION_OPEN) {
        let (name, body) = after.split_once('>')?;
        let (arguments, after) = json_value(body)?;
        let after = after.trim_start().strip_prefix(FUNCTION_CLOSE)?;
        return Some((ParsedToolCall::new(name, &arguments)?, after));
    }
    let (value, after) = json_value(text)?;
    Some((json_call(&value)?, after))
}

/// One `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` at the start of `text`, and the text after it.
fn hermes_call(text: &str) -> Option<(ParsedToolCall, &str)> {
    let (value, after) = json_value(text.strip_prefix(TOOL_CALL_OPEN)?)?;
    let after = after.trim_start().strip_prefix(TOOL_CALL_CLOSE)?;
    Some((json_call(&value)?, after))
}

/// `[TOOL_CALLS]` and a JSON list of calls (or one call) at the start of `text`, and the text after.
fn mistral_calls(text: &str) -> Option<(Vec<ParsedToolCall>, &str)> {
    let (value, after) = json_value(text.strip_prefix(MISTRAL_TOOL_CALLS)?)?;
    let calls = match &value {
        Value::Array(items) => items.iter().map(json_call).collect::<Option<Vec<_>>>()?,
        call => vec![json_call(call)?],
    };
    (!calls.is_empty()).then_some((calls, after))
}

/// `[TOOL_CALLS]name[ARGS]{...}` at the start of `text` (the name runs to `[ARGS]`, or to the `{`
/// where the text lost its special tokens, as vLLM reads it), and the text after.
fn mistral_args_call(text: &str) -> Option<(ParsedToolCall, &str)> {
    let rest = text.strip_prefix(MISTRAL_TOOL_CALLS)?;
    let name_end = [rest.find(MISTRAL_ARGS), rest.find('{')].into_iter().flatten().min()?;
    let name = &rest[..name_end];
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '[') {
        return None;
    }
    let body = &rest[name_end..];
    let (arguments, after) = json_value(body.strip_prefix(MISTRAL_ARGS).unwrap_or(body))?;
    Some((ParsedToolCall::new(name, &arguments)?, after))
}

/// `{"name": ..., "parameters": {...}}`: Llama 3.1 is prompted with `parameters` but also writes
/// `arguments`, the key Hermes uses.
fn json_call(value: &Value) -> Option<ParsedToolCall> {
    let name = value.get("name")?.as_str()?;
    let arguments = value.get("parameters").or_else(|| value.get("arguments"))?;
    ParsedToolCall::new(name, arguments)
}

/// The JSON value at the start of `text` (after whitespace), and the text after it.
fn json_value(text: &str) -> Option<(Value, &str)> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, &text[values.byte_offset()..]))
}

/// `name.call(`: the name, and the text after the parenthesis.
fn split_builtin_call(text: &str) -> Option<(&str, &str)> {
    let (name, after) = split_identifier(text)?;
    Some((name, after.strip_prefix(".call(")?))
}

fn split_identifier(text: &str) -> Option<(&str, &str)> {
    let len = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len());
    (len > 0).then(|| text.split_at(len))
}

/// Python keyword arguments up to the closing `)`, as a JSON object, and the text after the `)`.
fn python_kwargs(mut rest: &str) -> Option<(Value, &str)> {
    let mut arguments = Map::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(')') {
            return Some((Value::Object(arguments), after));
        }
        let (name, after) = split_identifier(rest)?;
        let (value, after) = python_value(after.trim_start().strip_prefix('=')?.trim_start())?;
        arguments.insert(name.to_string(), value);
        let after = after.trim_start();
        rest = match after.strip_prefix(',') {
            Some(next) => next,
            None if after.starts_with(')') => after,
            None => return None,
        };
    }
}

/// A Python literal: a string in either quotes, a number, `True`, `False` or `None`.
fn python_value(text: &str) -> Option<(Value, &str)> {
    if let Some(quote) = text.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let (value, after) = python_string(&text[1..], quote)?;
        return Some((Value::String(value), after));
    }
    let end = text.find([',', ')']).unwrap_or(text.len());
    let value = match text[..end].trim() {
        "True" => Value::Bool(true),
        "False" => Value::Bool(false),
        "None" => Value::Null,
        number => Value::Number(serde_json::from_str(number).ok()?),
    };
    Some((value, &text[end..]))
}

/// The rest of a Python string literal opened by `quote`: its value, and the text after the closing quote.
fn python_string(text: &str, quote: char) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        if c == quote {
            return Some((value, &text[at + 1..]));
        }
        if c != '\\' {
            value.push(c);
            continue;
        }
        match chars.next()?.1 {
            'n' => value.push('\n'),
            't' => value.push('\t'),
            'r' => value.push('\r'),
            escaped @ ('\\' | '\'' | '"') => value.push(escaped),
            // Python keeps the backslash of an escape it does not know.
            other => value.extend(['\\', other]),
        }
    }
    None
}

/// Streaming: holds back text that may be (the start of) a call, releases text that cannot be.
pub struct ToolCallStream {
    format: ToolCallFormat,
    tools: ToolSet,
    text: String,
    /// `text[..scanned]` has been released as content (less leading whitespace and silent tokens).
    scanned: usize,
    /// Bytes of content released: always a prefix of the content `parse` gives for the whole text.
    released: usize,
    /// `text[scanned..scanned + blank]` is whitespace already looked at, held until content
    /// follows: no call begins in it, so a long run of it is not searched again with each token.
    blank: usize,
    /// Set once a call may have begun: from then on everything waits for `finish`.
    call_started: bool,
}

impl ToolCallStream {
    pub fn new(format: ToolCallFormat, tools: ToolSet) -> Self {
        Self { format, tools, text: String::new(), scanned: 0, released: 0, blank: 0, call_started: false }
    }

    pub fn format(&self) -> ToolCallFormat {
        self.format
    }

    /// Adds generated text; returns the content that is safe to stream now (never part of a call).
    pub fn push(&mut self, text: &str) -> String {
        self.text.push_str(text);
        if self.call_started {
            return String::new();
        }
        let pending = &self.text[self.scanned..];
        // Markers and silent tokens begin with no whitespace, so what whitespace holds back is all blank.
        let rest = &pending[self.blank..];
        // Until some content is out, the output may still open with bare JSON.
        let call_start = match self.released {
            0 => self.format.call_start(rest),
            _ => self.format.first_marker(rest),
        };
        let call_start = call_start.map(|at| self.blank + at);
        let end = call_start.unwrap_or_else(|| match held_tail_start(self.format, rest) {
            0 => 0,
            held => self.blank + held,
        });
        self.blank = match end {
            0 => self.blank + rest.len() - rest.trim_start().len(),
            _ => 0,
        };
        let mut chunk = remove_tokens(&pending[..end], &SILENT_TOKENS);
        if self.released == 0 {
            chunk = chunk.trim_start().to_string();
        }
        if call_start.is_some() {
            chunk.truncate(chunk.trim_end().len());
        }
        self.scanned += end;
        self.released += chunk.len();
        self.call_started = call_start.is_some();
        chunk
    }

    /// At the end: the content not streamed yet (may be empty) and the calls (parsed as `parse` would
    /// from all the text).
    pub fn finish(self) -> ParsedOutput {
        let parsed = parse(self.format, &self.text, &self.tools);
        let content = parsed.content.get(self.released..).unwrap_or_default().to_string();
        ParsedOutput { content, ..parsed }
    }
}

/// Where the end of `text` that must wait begins: a possible start of a marker or silent token, and the
/// whitespace and silent tokens before it, which are content only if more content follows them.
fn held_tail_start(format: ToolCallFormat, text: &str) -> usize {
    let tokens = || format.markers().iter().chain(&SILENT_TOKENS);
    let longest = tokens().map(|token| token.len()).max().unwrap_or(0);
    let mut end = (text.len().saturating_sub(longest)..text.len())
        .filter(|&at| text.is_char_boundary(at))
        .find(|&at| tokens().any(|token| token.len() > text.len() - at && token.starts_with(&text[at..])))
        .unwrap_or(text.len());
    loop {
        let kept = text[..end].trim_end();
        let kept = SILENT_TOKENS.iter().find_map(|token| kept.strip_suffix(token)).unwrap_or(kept);
        if kept.len() == end {
            return end;
        }
        end = kept.len();
    }
}

#[cfg(test)]
mod tests {
    use super::ToolCallFormat::{Hermes, Llama3, Mistral, MistralArgs};
    use super::*;

    fn tools() -> ToolSet {
        let names = |list: &[&str]| list.iter().map(|name| name.to_string()).collect();
        ToolSet { functions: names(&["get_weather", "get_time"]), builtin: names(&["brave_search", "wolfram_alpha", "code_interpreter"]) }
    }

    fn calls(list: &[(&str, &str)]) -> Vec<ParsedToolCall> {
        list.iter().map(|(name, arguments)| ParsedToolCall { name: name.to_string(), arguments: arguments.to_string() }).collect()
    }

    /// `parse`, after checking that the stream gives the same content and calls from the text pushed in
    /// pieces of 1, 3 and 7 characters.
    fn parse_checked(format: ToolCallFormat, text: &str, tools: &ToolSet) -> ParsedOutput {
        let whole = parse(format, text, tools);
        let chars: Vec<char> = text.chars().collect();
        for size in [1, 3, 7] {
            let mut stream = ToolCallStream::new(format, tools.clone());
            let mut streamed: String = chars.chunks(size).map(|piece| stream.push(&piece.iter().collect::<String>())).collect();
            let rest = stream.finish();
            streamed.push_str(&rest.content);
            assert_eq!(streamed, whole.content, "content streamed in pieces of {size} from {text:?}");
            assert_eq!(rest.tool_calls, whole.tool_calls, "calls streamed in pieces of {size} from {text:?}");
        }
        whole
    }

    fn assert_parses(format: ToolCallFormat, text: &str, content: &str, expected: &[(&str, &str)]) {
        let parsed = parse_checked(format, text, &tools());
        assert_eq!(parsed, ParsedOutput { content: content.to_string(), tool_calls: calls(expected) }, "{text:?}");
    }

    fn assert_content(format: ToolCallFormat, text: &str, tools: &ToolSet, content: &str) {
        assert_eq!(parse_checked(format, text, tools), ParsedOutput { content: content.to_string(), tool_calls: Vec::new() }, "{text:?}");
    }

    #[test]
    fn llama_json_calls() {
        let weather = r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}"#;
        assert_parses(Llama3, weather, "", &[("get_weather", r#"{"city":"Paris","unit":"celsius"}"#)]);
        // `type`, `arguments` for `parameters`, leading whitespace, keys not in alphabetical order.
        let time = concat!("\n  ", r#"{"type": "function", "name": "get_time", "arguments": {"zone": "CET", "format": "24h"}}<|eot_id|>"#);
        assert_parses(Llama3, time, "", &[("get_time", r#"{"zone":"CET","format":"24h"}"#)]);
    }

    #[test]
    fn llama_parallel_calls() {
        let expected = [("get_weather", r#"{"city":"Paris"}"#), ("get_time", r#"{"zone":"CET"}"#)];
        let weather = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
        let time = r#"{"name": "get_time", "parameters": {"zone": "CET"}}"#;
        assert_parses(Llama3, &format!("<|python_tag|>{weather}; {time}<|eom_id|>"), "", &expected);
        assert_parses(Llama3, &format!("{weather}\n{time}\n"), "", &expected);
    }

    #[test]
    fn text_before_a_call_is_content() {
        let text = concat!("Let me check.\n", r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>"#);
        assert_parses(Llama3, text, "Let me check.", &[("get_weather", r#"{"city":"Paris"}"#)]);
    }

    #[test]
    fn function_tag_calls() {
        let text = "<function=get_weather>{\"city\": \"Paris\"}</function>\n<function=get_time>{}</function>";
        assert_parses(Llama3, text, "", &[("get_weather", r#"{"city":"Paris"}"#), ("get_time", "{}")]);
        let text = "Sure. <function=get_time>{\"zone\": \"UTC\"}</function><|eot_id|>";
        assert_parses(Llama3, text, "Sure.", &[("get_time", r#"{"zone":"UTC"}"#)]);
    }

    #[test]
    fn builtin_calls() {
        // The Python escapes happen to read the same as JSON's: a quote, a backslash, a newline.
        let search = r#"<|python_tag|>brave_search.call(query="Paris \"weather\" \\ today\nnow")<|eom_id|>"#;
        assert_parses(Llama3, search, "", &[("brave_search", r#"{"query":"Paris \"weather\" \\ today\nnow"}"#)]);
        let wolfram = r#"Computing. <|python_tag|>wolfram_alpha.call(query='it\'s 2+2', precision=3, exact=True)"#;
        assert_parses(Llama3, wolfram, "Computing.", &[("wolfram_alpha", r#"{"query":"it's 2+2","precision":3,"exact":true}"#)]);
        let code = "<|python_tag|>import math\nprint(math.pi)\n<|eom_id|>";
        assert_parses(Llama3, code, "", &[("code_interpreter", r#"{"code":"import math\nprint(math.pi)"}"#)]);
    }

    #[test]
    fn builtins_not_enabled_stay_content() {
        let functions_only = ToolSet { builtin: Vec::new(), ..tools() };
        let search = r#"<|python_tag|>brave_search.call(query="Paris")<|eom_id|>"#;
        assert_content(Llama3, search, &functions_only, r#"brave_search.call(query="Paris")"#);
        assert_content(Llama3, "<|python_tag|>print(1)", &functions_only, "print(1)");
    }

    #[test]
    fn unknown_names_stay_content() {
        let text = r#"{"name": "send_email", "parameters": {"to": "a@b.c"}}"#;
        assert_content(Llama3, text, &tools(), text);
        assert_content(Llama3, r#"<|python_tag|>photogen.call(query="cat")"#, &tools(), r#"photogen.call(query="cat")"#);
        let text = "<tool_call>\n{\"name\": \"send_email\", \"arguments\": {}}\n</tool_call>";
        assert_content(Hermes, text, &tools(), text);
    }

    #[test]
    fn malformed_unterminated_or_non_object_calls_stay_content() {
        let texts = [
            r#"{"name": "get_weather", "parameters": {"city": }}"#,
            r#"<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa"#,
            r#"<function=get_weather>{"city": "Paris"}"#,
            r#"{"name": "get_weather", "parameters": "Paris"}"#,
            r#"{"name": "get_time", "parameters": {}} and then text"#,
            r#"{"name": "get_time", "parameters": {}}; {"name": "get_time"}"#,
            r#"<|python_tag|>brave_search.call(query="unterminated)"#,
            r#"<|python_tag|>wolfram_alpha.call(query=x)"#,
        ];
        for text in texts {
            assert_content(Llama3, text, &tools(), text.trim_start_matches(PYTHON_TAG));
        }
        assert_content(Llama3, "<|python_tag|><|eom_id|>", &tools(), "");
    }

    #[test]
    fn json_inside_prose_stays_content() {
        let text = r#"Here is JSON: {"name": "get_weather", "parameters": {"city": "Paris"}}"#;
        assert_content(Llama3, text, &tools(), text);
    }

    #[test]
    fn hermes_calls() {
        let text = "I'll check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
                    <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\", \"format\": \"24h\"}}\n</tool_call>";
        let expected = [("get_weather", r#"{"city":"Paris"}"#), ("get_time", r#"{"zone":"CET","format":"24h"}"#)];
        assert_parses(Hermes, text, "I'll check both.", &expected);
        // Bare JSON is not a Hermes call, and neither is an unclosed block.
        let bare = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
        assert_content(Hermes, bare, &tools(), bare);
        assert_content(Hermes, &format!("<tool_call>\n{bare}"), &tools(), &format!("<tool_call>\n{bare}"));
    }

    #[test]
    fn mistral_calls() {
        let text = "Checking.[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {}}]";
        assert_parses(Mistral, text, "Checking.", &[("get_weather", r#"{"city":"Paris"}"#), ("get_time", "{}")]);
        // One call without the list; calls to unknown tools, or not after the marker, are content.
        assert_parses(Mistral, "[TOOL_CALLS]{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}", "", &[("get_time", r#"{"zone":"CET"}"#)]);
        let unknown = "[TOOL_CALLS] [{\"name\": \"launch\", \"arguments\": {}}]";
        assert_content(Mistral, unknown, &tools(), unknown);
        let bare = r#"[{"name": "get_time", "arguments": {}}]"#;
        assert_content(Mistral, bare, &tools(), bare);
        assert_content(Mistral, "[TOOL_CALLS] []", &tools(), "[TOOL_CALLS] []");
        // Its ids are 9 letters and digits, which its template asks of the calls in a history.
        let mut letters = "abcdefghijklmnopqrstuvwxyz".chars().cycle();
        assert_eq!(Mistral.call_id(|| letters.next().unwrap()), "abcdefghi");
        assert_eq!(Llama3.call_id(|| 'x').len(), "call_".len() + 24);
    }

    #[test]
    fn mistral_args_calls() {
        let text = "Checking.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}";
        assert_parses(MistralArgs, text, "Checking.", &[("get_weather", r#"{"city":"Paris"}"#), ("get_time", "{}")]);
        // Without [ARGS], where the text lost its special tokens; an end token after the calls.
        assert_parses(MistralArgs, "[TOOL_CALLS]get_time{\"zone\": \"CET\"}", "", &[("get_time", r#"{"zone":"CET"}"#)]);
        assert_parses(MistralArgs, "[TOOL_CALLS]get_time[ARGS]{} <|eot_id|>", "", &[("get_time", "{}")]);
        // Unknown tools, a missing name, arguments that are not an object, v0.3's list: content.
        for text in ["[TOOL_CALLS]launch[ARGS]{}", "[TOOL_CALLS][ARGS]{}", "[TOOL_CALLS]get_time[ARGS][1]", "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}}]", "[TOOL_CALLS]get time[ARGS]{}"] {
            assert_content(MistralArgs, text, &tools(), text);
        }
        // Every call, not only the first, must parse.
        let half = "[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{\"city\"";
        assert_content(MistralArgs, half, &tools(), half);
        assert_eq!(MistralArgs.call_id(|| '7'), "777777777");
    }

    #[test]
    fn long_blank_runs_before_calls_and_content() {
        let blank = " \n\t ".repeat(50);
        let weather = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
        let paris = [("get_weather", r#"{"city":"Paris"}"#)];
        assert_parses(Llama3, &format!("{blank}{weather}"), "", &paris);
        assert_parses(Llama3, &format!("{blank}Hi.{blank}<|python_tag|>{weather}"), "Hi.", &paris);
        assert_parses(Llama3, &format!("Hi.{blank}<|eom_id|>{blank}there{blank}<|python_ta"), &format!("Hi.{blank}{blank}there{blank}<|python_ta"), &[]);
        let hermes = format!("{blank}Hi.{blank}<tool_call>\n{}\n</tool_call>{blank}", r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#);
        assert_parses(Hermes, &hermes, "Hi.", &paris);
    }

    #[test]
    fn end_tokens_and_stray_tags_are_never_content() {
        assert_content(Llama3, "Hello there! <|eot_id|>", &tools(), "Hello there!");
        assert_content(Hermes, "Grüße — 天気 <|python_tag|>ok<|eom_id|>", &tools(), "Grüße — 天気 ok");
        assert_content(Llama3, "  <|eot_id|>", &tools(), "");
        // Spelled out inside the text (the engine stops at the tokens themselves), an end token is
        // left out of content as the stream leaves it, and calls do not start after it.
        let call = r#"{"name": "get_weather", "parameters": {"city": "Oslo"}}"#;
        assert_content(Llama3, &format!("<|eom_id|>{call}"), &tools(), call);
        assert_content(Llama3, &format!("{call}<|eot_id|> and more"), &tools(), &format!("{call} and more"));
        // Text that a removed token joins is not searched again (the stream removes them piece by
        // piece): found by the output fuzz target.
        assert_content(Llama3, "a <<|eom_id|>|python_tag|>b", &tools(), "a <|python_tag|>b");
    }

    #[test]
    fn stream_releases_plain_text_as_it_comes() {
        let mut stream = ToolCallStream::new(Llama3, tools());
        let pushed: Vec<String> = ["Hello", " world", "! <", "3 ", "<|eot_id|>"].iter().map(|piece| stream.push(piece)).collect();
        assert_eq!(pushed, ["Hello", " world", "!", " <3", ""]);
        assert_eq!(stream.finish(), ParsedOutput::default());
    }

    #[test]
    fn stream_holds_back_what_may_be_a_call() {
        let mut stream = ToolCallStream::new(Llama3, tools());
        assert_eq!(stream.push("Let me check.\n<|python"), "Let me check.");
        assert_eq!(stream.push(r#"_tag|>{"name": "get_time", "parameters": {}}"#), "");
        assert_eq!(stream.finish(), ParsedOutput { content: String::new(), tool_calls: calls(&[("get_time", "{}")]) });

        let mut stream = ToolCallStream::new(Llama3, tools());
        assert_eq!(stream.push("  {"), "");
        assert_eq!(stream.push(r#""a": 1}"#), "");
        assert_eq!(stream.finish().content, r#"{"a": 1}"#);
    }

    #[test]
    fn detect_tells_formats_from_templates() {
        assert_eq!(ToolCallFormat::detect(include_str!("llama31_chat_template.jinja")), Some(Llama3));
        let llama = r#"{%- if builtin_tools is defined %}{{- "Environment: ipython\n" }}{%- endif %}"#;
        assert_eq!(ToolCallFormat::detect(llama), Some(Llama3));
        let hermes = r#"{{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '"}\n</tool_call>' }}"#;
        assert_eq!(ToolCallFormat::detect(hermes), Some(Hermes));
        let mistral = r#"{{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}{{- tool_call.function|tojson }}{%- endfor %}"#;
        assert_eq!(ToolCallFormat::detect(mistral), Some(Mistral));
        let mistral_args = r#"{{- "[TOOL_CALLS]" + tool_call.function.name + "[ARGS]" + tool_call.function.arguments }}"#;
        assert_eq!(ToolCallFormat::detect(mistral_args), Some(MistralArgs));
        let plain = "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}";
        assert_eq!(ToolCallFormat::detect(plain), None);
    }
}
