//! Constrained decoding, tool calls and logprobs through the engine, on the tiny random-weight Llama
//! 3.1 fixture: a model that "wants" garbage is the hardest case for a grammar. Each proof runs 50
//! seeds as 50 choices of one request, batched.

mod common;

use common::{exact, golden, gpu, gpu_with, load_model, truncated_llama3_tokenizer, truncated_llama3_tokenizer_with};
use llama_webgpu::api::{
    ChatCompletionRequest, DraftUsage, ChatMessage, FinishReason, GrammarFormat, GrammarSyntax, JsonSchemaFormat, Logprobs, NamedFunction, Prediction,
    ResponseFormat, SamplingParams, Tool, ToolChoice, ToolChoiceMode,
};
use llama_webgpu::api::request::{Prompt, Work};
use llama_webgpu::engine::{Echo, Event, SequenceId};
use llama_webgpu::text::{ChatTemplate, RenderOptions};
use llama_webgpu::{CancelToken, Completion, Engine, Gpu, GpuOptions, LoadOptions};
use llama_webgpu::model::MAX_DRAFTS;
use serde_json::{json, Value};

const FIXTURE: &str = "tiny-llama31";
const CONTEXT: usize = 256;
const SEEDS: usize = 50;

fn engine() -> Option<Engine> {
    engine_with(ChatTemplate::llama31())
}

fn engine_with(template: ChatTemplate) -> Option<Engine> {
    Some(engine_on(&gpu()?, template))
}

fn engine_on(gpu: &Gpu, template: ChatTemplate) -> Engine {
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: SEEDS, ..Default::default() };
    let model = load_model(gpu, FIXTURE, &options).unwrap();
    let tokenizer = truncated_llama3_tokenizer(model.config().vocab_size);
    Engine::new(model, tokenizer, template, 1).unwrap()
}

/// A template short enough for the fixture's 256 positions, in Llama 3.1's call format (which the
/// engine tells from the `<|python_tag|>` in its source).
const SHORT_TOOL_TEMPLATE: &str = "{#- calls: <|python_tag|> -#}{{ tools | map(attribute='function.name') | join(',') }}\n\
    {%- for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: ";

/// Runs the engine until every sequence of `ids` has finished; their completions in order.
/// Steps `engine` until every sequence of `ids` has finished; an echo a sequence sends comes
/// before its tokens and is the one its completion returns.
fn finish_all(engine: &mut Engine, ids: &[SequenceId]) -> Vec<Completion> {
    let mut done: Vec<Option<Completion>> = vec![None; ids.len()];
    let mut echoed: Vec<Option<Echo>> = vec![None; ids.len()];
    let mut deltas = vec![0; ids.len()];
    while done.iter().any(Option::is_none) {
        for (id, event) in pollster::block_on(engine.step()).unwrap() {
            let Some(i) = ids.iter().position(|&x| x == id) else { continue };
            match event {
                Event::Finished(completion) => {
                    assert_eq!(echoed[i], completion.echo, "choice {i}: the echo sent is the one returned");
                    done[i] = Some(completion);
                }
                Event::Failed(error) => panic!("choice {i} failed: {error}"),
                Event::Echo(echo) => {
                    assert!(echoed[i].is_none() && deltas[i] == 0, "choice {i}: one echo, before any token");
                    echoed[i] = Some(echo);
                }
                Event::Delta(_) => deltas[i] += 1,
                Event::Prefill { .. } => {}
            }
        }
    }
    done.into_iter().flatten().collect()
}

fn chat(content: &str) -> ChatCompletionRequest {
    ChatCompletionRequest { messages: vec![ChatMessage::new("user", content)], ..Default::default() }
}

/// Raises the quote, `]` and `}` tokens: the random model then closes strings and containers soon
/// enough for 50 outputs to end within their budget. The grammar alone makes them JSON: the same
/// bias without it gives garbage (checked).
fn closing_bias() -> Option<std::collections::HashMap<String, f32>> {
    Some([("1", 4.0), ("60", 4.0), ("92", 4.0)].into_iter().map(|(token, bias)| (token.to_string(), bias)).collect())
}

fn json_params(response_format: Option<ResponseFormat>) -> SamplingParams {
    SamplingParams { response_format, logit_bias: closing_bias(), temperature: Some(1.0), seed: Some(1), max_tokens: Some(200), ..Default::default() }
}

const PROMPT: [u32; 4] = [1000, 40, 41, 42];

#[test]
fn json_object_output_parses_for_50_seeds() {
    let Some(mut engine) = engine() else { return };
    let ids = engine.add_choices(PROMPT.to_vec(), &json_params(Some(ResponseFormat::JsonObject)), CancelToken::default(), SEEDS).unwrap();
    for (seed, completion) in finish_all(&mut engine, &ids).iter().enumerate() {
        assert_eq!(completion.finish_reason, FinishReason::Stop, "seed {seed}: {:?}", completion.text);
        let value: Value = serde_json::from_str(&completion.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", completion.text));
        assert!(value.is_object(), "seed {seed}: {value}");
    }

    let ids = engine.add_choices(PROMPT.to_vec(), &json_params(None), CancelToken::default(), SEEDS).unwrap();
    let unconstrained = finish_all(&mut engine, &ids);
    let parsed = unconstrained.iter().filter(|c| serde_json::from_str::<Value>(&c.text).is_ok_and(|v| v.is_object())).count();
    assert!(parsed <= 2, "{parsed} of {SEEDS} unconstrained outputs are JSON objects: the bias, not the grammar, would be making them");
}

#[test]
fn json_schema_and_grammars() {
    let Some(mut engine) = engine() else { return };
    let schema = json!({
        "type": "object",
        "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["size", "count"],
        "additionalProperties": false,
    });
    let format = ResponseFormat::JsonSchema { json_schema: JsonSchemaFormat { name: Some("order".into()), description: None, schema: Some(schema), strict: Some(true) } };
    let ids = engine.add_choices(PROMPT.to_vec(), &json_params(Some(format)), CancelToken::default(), 8).unwrap();
    for completion in finish_all(&mut engine, &ids) {
        let value: Value = serde_json::from_str(&completion.text).unwrap_or_else(|e| panic!("{e}: {:?}", completion.text));
        assert!(["S", "M", "L"].contains(&value["size"].as_str().unwrap()), "{value}");
        assert!((1..=9).contains(&value["count"].as_i64().unwrap()), "{value}");
        assert_eq!(value.as_object().unwrap().len(), 2, "{value}");
    }

    let regex = |pattern: &str| ResponseFormat::Grammar { grammar: GrammarFormat { syntax: GrammarSyntax::Regex, definition: pattern.into() } };
    let params = SamplingParams { response_format: Some(regex("[a-c]{3}-[0-9]{2}")), temperature: Some(1.0), max_tokens: Some(20), ..Default::default() };
    let ids = engine.add_choices(PROMPT.to_vec(), &params, CancelToken::default(), 8).unwrap();
    for completion in finish_all(&mut engine, &ids) {
        let text = completion.text.as_bytes();
        assert_eq!(completion.finish_reason, FinishReason::Stop);
        assert!(text.len() == 6 && text[..3].iter().all(|c| b"abc".contains(c)) && text[3] == b'-' && text[4..].iter().all(u8::is_ascii_digit), "{:?}", completion.text);
    }
    let lark = ResponseFormat::Grammar { grammar: GrammarFormat { syntax: GrammarSyntax::Lark, definition: r#"start: ("yes" | "no") " " NUMBER
NUMBER: /[1-9][0-9]?/"#.into() } };
    let params = SamplingParams { response_format: Some(lark), temperature: Some(1.0), max_tokens: Some(20), ..Default::default() };
    let ids = engine.add_choices(PROMPT.to_vec(), &params, CancelToken::default(), 8).unwrap();
    for completion in finish_all(&mut engine, &ids) {
        let (word, number) = completion.text.split_once(' ').unwrap_or_else(|| panic!("{:?}", completion.text));
        assert!(["yes", "no"].contains(&word) && number.parse::<u32>().is_ok_and(|n| (1..100).contains(&n)), "{:?}", completion.text);
    }

    for (format, wanted) in [
        (regex("(unclosed"), "response_format"),
        (ResponseFormat::Grammar { grammar: GrammarFormat { syntax: GrammarSyntax::Lark, definition: "start: missing_rule".into() } }, "response_format"),
    ] {
        let params = SamplingParams { response_format: Some(format), ..Default::default() };
        let error = engine.add_choices(PROMPT.to_vec(), &params, CancelToken::default(), 1).unwrap_err().to_string();
        assert!(error.starts_with(wanted), "{error}");
    }
    assert!(engine.is_idle());

    // A host prepares requests on threads of its own: grammars are compiled there (a bad one is
    // refused there) and the engine runs what was prepared as it runs its own requests.
    let seeded = SamplingParams { seed: Some(3), ..params };
    let work = |sampling: SamplingParams| Work::tokens(PROMPT.to_vec(), sampling);
    let (prepared, refused) = std::thread::spawn({
        let prompter = engine.prompter().clone();
        let (good, bad) = (work(seeded.clone()), work(SamplingParams { response_format: Some(regex("(unclosed")), ..Default::default() }));
        move || (prompter.prepare(&good, &RenderOptions::default()).unwrap(), prompter.prepare(&bad, &RenderOptions::default()).err().unwrap())
    })
    .join()
    .unwrap();
    assert!(refused.to_string().starts_with("response_format"), "{refused}");
    let ids = engine.add_prepared(prepared, CancelToken::default(), 8).unwrap();
    let prepared_elsewhere = finish_all(&mut engine, &ids);
    let ids = engine.add_choices(PROMPT.to_vec(), &seeded, CancelToken::default(), 8).unwrap();
    let added_here = finish_all(&mut engine, &ids);
    assert_eq!(prepared_elsewhere.iter().map(|c| &c.tokens).collect::<Vec<_>>(), added_here.iter().map(|c| &c.tokens).collect::<Vec<_>>());
}

/// Tokens a grammar forces (a schema's keys and the punctuation between them) are drafted and
/// verified in the pass that samples the token before them, followed by tokens guessed from a
/// prediction or by a draft model (cut where the grammar forbids them): every output, greedy or
/// sampled, is what it is where nothing drafts (GEMV passes of one token), in fewer passes.
#[test]
fn tokens_a_grammar_forces_are_drafted_and_change_no_output() {
    let Some(gpu) = gpu() else { return };
    let mut engine = engine_on(&gpu, ChatTemplate::llama31());
    // The fixture drafting for itself: its drafts after the forced tokens are the model's own choices.
    let drafter = engine_on(&gpu, ChatTemplate::llama31());
    let draft_options = drafter.draft_load_options(drafter.model().config());
    let mut self_drafting = drafter.with_draft_model(load_model(&gpu, FIXTURE, &draft_options).unwrap()).unwrap();
    let Some(one_token_passes) = gpu_with(&GpuOptions { gemv_max_tokens: Some(1), ..exact() }) else { return };
    let mut plain = engine_on(&one_token_passes, ChatTemplate::llama31());
    let schema = json!({
        "type": "object",
        "properties": {
            "first_name": {"type": "string", "maxLength": 6},
            "year_of_birth": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "favourite_colour": {"enum": ["red", "green", "blue"]},
        },
        "required": ["first_name", "year_of_birth", "favourite_colour"],
        "additionalProperties": false,
    });
    let format = ResponseFormat::JsonSchema { json_schema: JsonSchemaFormat { name: Some("person".into()), description: None, schema: Some(schema), strict: Some(true) } };
    for temperature in [0.0, 1.0] {
        let params = SamplingParams { temperature: Some(temperature), ..json_params(Some(format.clone())) };
        // Four at a time, so that there is room to draft (fewer than 7 decode).
        let run = |engine: &mut Engine, params: &SamplingParams| {
            let ids = engine.add_choices(PROMPT.to_vec(), params, CancelToken::default(), 4).unwrap();
            finish_all(engine, &ids)
        };
        let reference = run(&mut plain, &params);
        assert!(reference.iter().all(|alone| alone.usage.drafts.is_none()), "passes of one token leave no room to draft");
        // Then with the first choice's output as every choice's prediction: the tokens guessed
        // from it follow the forced ones in the same draft (rightly for the greedy choices and
        // the first sampled one, wrongly for the others).
        let predicted = SamplingParams { prediction: Some(Prediction::Content { content: reference[0].text.clone() }), ..params.clone() };
        for (params, with) in [(&params, "alone"), (&predicted, "with a prediction"), (&params, "with a draft model")] {
            let drafting = run(if with == "with a draft model" { &mut self_drafting } else { &mut engine }, params);
            for (i, (drafted, alone)) in drafting.iter().zip(&reference).enumerate() {
                assert_eq!((&drafted.tokens, &drafted.finish_reason), (&alone.tokens, &alone.finish_reason), "temperature {temperature} {with}, choice {i}");
                let value: Value = serde_json::from_str(&drafted.text).unwrap_or_else(|e| panic!("{e}: {:?}", drafted.text));
                assert_eq!(value.as_object().map(|o| o.len()), Some(3), "{value}");
            }
            let drafts = DraftUsage::sum(drafting.iter().map(|c| c.usage.drafts)).unwrap_or_default();
            let tokens: usize = drafting.iter().map(|c| c.tokens.len()).sum();
            println!("temperature {temperature} {with}: {tokens} tokens, {drafts:?}");
            // The keys alone are more than a dozen tokens each time, and a forced token is the
            // only one its row's mask allows.
            assert!(drafts.accepted >= 4 * 12, "{drafts:?}");
            // A greedy request's self-drafting draft model guesses the model's own choices, and
            // those its grammar forbids are cut from the draft before the pass.
            if with == "alone" || (with == "with a draft model" && temperature == 0.0) {
                assert!(drafts.rejected <= drafts.accepted / 10, "{with}: {drafts:?}");
            }
        }
    }
}

fn weather_tool() -> Tool {
    Tool {
        kind: "function".into(),
        function: json!({
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": false,
            },
        }),
    }
}

#[test]
fn required_tool_calls_are_calls_of_offered_tools() {
    let Some(mut engine) = engine_with(ChatTemplate::new(SHORT_TOOL_TEMPLATE).unwrap()) else { return };
    let mut request = chat("What is the weather in Paris?");
    request.tools = Some(vec![weather_tool()]);
    request.tool_choice = Some(ToolChoice::Mode(ToolChoiceMode::Required));
    request.parallel_tool_calls = Some(false);
    request.sampling = SamplingParams { max_tokens: Some(60), ..json_params(None) };
    let ids = engine.add_work(&Work::Chat(request.clone()), &RenderOptions::default(), CancelToken::default(), 16).unwrap();
    for (seed, completion) in finish_all(&mut engine, &ids).iter().enumerate() {
        assert_eq!(completion.finish_reason, FinishReason::ToolCalls, "seed {seed}: {:?}", completion.text);
        assert_eq!(completion.text, "", "seed {seed}: content beside the call");
        let [call] = completion.tool_calls.as_slice() else { panic!("seed {seed}: {:?}", completion.tool_calls) };
        assert_eq!(call.name, "get_weather");
        assert!(call.id.starts_with("call_") && call.id.len() == 29, "{}", call.id);
        let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
        assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()), "{arguments}");
        assert!(arguments["city"].as_str().unwrap().chars().count() <= 12, "{arguments}");
    }

    // A named function that is not offered, and a required call with no tools.
    request.tool_choice = Some(ToolChoice::Function { kind: "function".into(), function: NamedFunction { name: "get_time".into() } });
    let error = engine.add_work(&Work::Chat(request.clone()), &RenderOptions::default(), CancelToken::default(), 1).unwrap_err().to_string();
    assert!(error.contains("\"get_time\" is not among the tools offered"), "{error}");
    request.tools = None;
    request.tool_choice = Some(ToolChoice::Mode(ToolChoiceMode::Required));
    let error = engine.add_work(&Work::Chat(request.clone()), &RenderOptions::default(), CancelToken::default(), 1).unwrap_err().to_string();
    assert!(error.contains("no tools are offered"), "{error}");
}

/// Required calls on a template in one of Mistral's call formats (`markers` in place of Llama's
/// `<|python_tag|>`): 4 seeds, each output only calls of `get_weather` whose arguments follow its
/// schema, with the 9-character ids Mistral's template asks of a history's calls.
fn required_mistral_calls(markers: &str, tool_choice: ToolChoice, parallel: bool) -> Vec<Completion> {
    let template = SHORT_TOOL_TEMPLATE.replace("<|python_tag|>", markers);
    let Some(mut engine) = engine_with(ChatTemplate::new(&template).unwrap()) else { return vec![] };
    let mut request = chat("What is the weather in Paris?");
    request.tools = Some(vec![weather_tool()]);
    request.tool_choice = Some(tool_choice);
    request.parallel_tool_calls = Some(parallel);
    request.sampling = SamplingParams { max_tokens: Some(90), ..json_params(None) };
    let ids = engine.add_work(&Work::Chat(request), &RenderOptions::default(), CancelToken::default(), 4).unwrap();
    let completions = finish_all(&mut engine, &ids);
    for (seed, completion) in completions.iter().enumerate() {
        assert_eq!((completion.finish_reason, completion.text.as_str()), (FinishReason::ToolCalls, ""), "seed {seed}: {:?}", completion.tool_calls);
        assert!(!completion.tool_calls.is_empty());
        for call in &completion.tool_calls {
            assert_eq!(call.name, "get_weather");
            assert!(call.id.len() == 9 && call.id.chars().all(|c| c.is_ascii_alphanumeric()), "{}", call.id);
            let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
            assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()), "{arguments}");
        }
    }
    completions
}

/// Mistral's call format (told from the `[TOOL_CALLS]` in a template): a required call is its
/// marker and a list of calls, each parsed back.
#[test]
fn required_mistral_calls_are_a_list_of_offered_tools() {
    required_mistral_calls("[TOOL_CALLS]", ToolChoice::Mode(ToolChoiceMode::Required), true);
}

/// Mistral's calls from its v11 tokenizer on, a named function required: `[TOOL_CALLS]`, its name,
/// `[ARGS]` and arguments following its schema (the markers spelled out: the fixture's vocabulary
/// lacks them), one call (the random model would go on calling).
#[test]
fn required_mistral_args_calls_name_offered_tools() {
    let named = ToolChoice::Function { kind: "function".into(), function: NamedFunction { name: "get_weather".into() } };
    for completion in required_mistral_calls("[TOOL_CALLS] [ARGS]", named, false) {
        assert_eq!(completion.tool_calls.len(), 1);
    }
}

/// The ids a reasoning model's markers take in the fixture's vocabulary (the two before its BOS and EOS).
const THINK: u32 = 998;
const THINK_END: u32 = 999;

/// A template that opens the thought, as DeepSeek-R1's does.
const THOUGHT_OPENED: &str = "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: <think>\n";

/// The fixture as a reasoning model with `template`; its thoughts left in the content unless `parsed`.
fn thinking_engine_with(gpu: &Gpu, template: &str, parsed: bool) -> Engine {
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: 8, ..Default::default() };
    let model = load_model(gpu, FIXTURE, &options).unwrap();
    let tokenizer = truncated_llama3_tokenizer_with(model.config().vocab_size, &[(THINK, "<think>"), (THINK_END, "</think>")]);
    Engine::new(model, tokenizer, ChatTemplate::new(template).unwrap(), 1).unwrap().with_prompt_lookup(true).with_reasoning_parsed(parsed)
}

fn thinking_engine(gpu: &Gpu, parsed: bool) -> Engine {
    thinking_engine_with(gpu, THOUGHT_OPENED, parsed)
}

/// Raises `</think>` so that the random model ends its thought within a few dozen tokens.
fn thought_ending(response_format: Option<ResponseFormat>) -> SamplingParams {
    let mut bias = closing_bias().unwrap();
    bias.insert(THINK_END.to_string(), 3.0);
    SamplingParams { logit_bias: Some(bias), max_tokens: Some(60), ..json_params(response_format) }
}

/// A thought the prompt opened is `reasoning` up to `</think>`, the rest the content: the same
/// tokens as with the thought left in the content, whose text is the two joined by the marker.
#[test]
fn a_thought_is_told_apart_from_the_answer() {
    let Some(gpu) = gpu() else { return };
    let request = ChatCompletionRequest { sampling: thought_ending(None), ..chat("Why is the sky blue?") };
    let run = |parsed: bool| {
        let mut engine = thinking_engine(&gpu, parsed);
        let ids = engine.add_work(&Work::Chat(request.clone()), &RenderOptions::default(), CancelToken::default(), 8).unwrap();
        finish_all(&mut engine, &ids)
    };
    let (parsed, raw) = (run(true), run(false));
    let mut ended = 0;
    for (seed, (parsed, raw)) in parsed.iter().zip(&raw).enumerate() {
        assert_eq!(parsed.tokens, raw.tokens, "seed {seed}: telling the thought apart changes no token");
        assert_eq!(raw.reasoning, None);
        let reasoning = parsed.reasoning.as_deref().unwrap_or_else(|| panic!("seed {seed}: the prompt opened a thought"));
        match parsed.tokens.iter().position(|&t| t == THINK_END) {
            Some(end) => {
                ended += 1;
                let (thought, answer) = raw.text.split_once("</think>").unwrap();
                assert_eq!((reasoning, parsed.text.as_str()), (thought, answer.trim_start()), "seed {seed}");
                assert_eq!(parsed.usage.reasoning_tokens as usize, end + 1, "seed {seed}: the thought's tokens and its end");
            }
            None => {
                assert_eq!((reasoning, parsed.text.as_str()), (raw.text.as_str(), ""), "seed {seed}: a thought cut short is all reasoning");
                assert_eq!(parsed.usage.reasoning_tokens, parsed.usage.completion_tokens);
            }
        }
    }
    assert!((2..8).contains(&ended), "{ended} of 8 thoughts ended: the bias should end some, not all");
}

/// The grammar shapes the answer after `</think>`: the thought is free text, the answer JSON;
/// where the prompt opens no thought, the grammar's first mask lets one begin.
#[test]
fn a_grammar_shapes_the_answer_after_the_thought() {
    let Some(gpu) = gpu() else { return };
    // DeepSeek-R1's template before its update: it speaks of `</think>` (leaving earlier thoughts out) but opens none.
    let unopened = THOUGHT_OPENED.replace("<think>\n", "{#- earlier thoughts end at </think> -#}");
    // Where the thought may begin, `<think>` raised as much as `</think>`, so that some begin one and end it.
    for (template, may_skip_it) in [(THOUGHT_OPENED, false), (unopened.as_str(), true)] {
        let mut engine = thinking_engine_with(&gpu, template, true);
        let mut sampling = thought_ending(Some(ResponseFormat::JsonObject));
        if may_skip_it {
            let bias = sampling.logit_bias.as_mut().unwrap();
            bias.extend([(THINK.to_string(), 3.0), (THINK_END.to_string(), 3.0)]);
        }
        let request = ChatCompletionRequest { sampling, ..chat("Answer in JSON.") };
        let ids = engine.add_work(&Work::Chat(request), &RenderOptions::default(), CancelToken::default(), 8).unwrap();
        let (mut answered, mut free_thoughts, mut skipped) = (0, 0, 0);
        for (seed, completion) in finish_all(&mut engine, &ids).iter().enumerate() {
            let Some(reasoning) = completion.reasoning.as_deref() else {
                assert!(may_skip_it, "seed {seed}: the prompt opened a thought");
                assert_eq!((completion.usage.reasoning_tokens, completion.tokens.first() == Some(&THINK)), (0, false));
                skipped += 1;
                if completion.finish_reason == FinishReason::Stop {
                    let value: Value = serde_json::from_str(&completion.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", completion.text));
                    assert!(value.is_object(), "seed {seed}: {value}");
                }
                continue;
            };
            let thought = reasoning.trim_start();
            free_thoughts += (!thought.is_empty() && !thought.starts_with('{')) as usize;
            // The end of turn may come in the thought, where no grammar applies.
            if completion.finish_reason == FinishReason::Stop && completion.tokens.contains(&THINK_END) {
                answered += 1;
                let value: Value = serde_json::from_str(&completion.text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {:?}", completion.text));
                assert!(value.is_object(), "seed {seed}: {value}");
            }
        }
        assert!(answered > 0 && free_thoughts > 0, "{answered} answers, {free_thoughts} thoughts not shaped as JSON, {skipped} without a thought");
    }
}

/// A template that lets the model answer at once (`enable_thinking: false` in the request's
/// `chat_template_kwargs`, as Qwen3's and Cogito's templates read it) closes the thought in the
/// prompt: the output is all answer.
#[test]
fn chat_template_kwargs_reach_the_template() {
    let Some(gpu) = gpu() else { return };
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: 4, ..Default::default() };
    let model = load_model(&gpu, FIXTURE, &options).unwrap();
    let tokenizer = truncated_llama3_tokenizer_with(model.config().vocab_size, &[(THINK, "<think>"), (THINK_END, "</think>")]);
    let template = "{{ messages[0].content }}\nassistant: <think>\n{% if enable_thinking is false %}\n</think>\n\n{% endif %}";
    let mut engine = Engine::new(model, tokenizer, ChatTemplate::new(template).unwrap(), 1).unwrap();
    let run = |engine: &mut Engine, kwargs: Option<Value>| {
        let request = ChatCompletionRequest { chat_template_kwargs: kwargs.map(|k| k.as_object().unwrap().clone()), sampling: SamplingParams { max_tokens: Some(4), ..Default::default() }, ..chat("Hi") };
        let prompt = engine.prompter().chat_prompt(&request, &RenderOptions::default()).unwrap();
        let ids = engine.add_work(&Work::Chat(request), &RenderOptions::default(), CancelToken::default(), 1).unwrap();
        (prompt, finish_all(engine, &ids).remove(0))
    };
    let (thinking_prompt, thinking) = run(&mut engine, None);
    let (answering_prompt, answering) = run(&mut engine, Some(json!({"enable_thinking": false})));
    assert_eq!(thinking_prompt.last(), Some(&198), "the template opened the thought: <think>, then a line break");
    assert!(answering_prompt.ends_with(&[THINK_END, 271]), "the template closed it: </think>, then two line breaks");
    assert_eq!((thinking.reasoning.is_some(), answering.reasoning), (true, None));
    assert_eq!((thinking.text.as_str(), answering.usage.reasoning_tokens), ("", 0));
}

/// No parsing where the template never speaks of thoughts, or the markers are not tokens.
#[test]
fn thoughts_are_told_apart_only_where_the_model_has_them() {
    let Some(gpu) = gpu() else { return };
    assert_eq!(thinking_engine(&gpu, true).prompter().think_tokens().map(|t| (t.start, t.end)), Some((THINK, THINK_END)));
    assert_eq!(thinking_engine(&gpu, false).prompter().think_tokens(), None);
    let template = ChatTemplate::new("{{ messages[0].content }} <think>").unwrap();
    let options = LoadOptions { context_length: Some(CONTEXT), ..Default::default() };
    let model = load_model(&gpu, FIXTURE, &options).unwrap();
    let vocab = model.config().vocab_size;
    assert_eq!(Engine::new(model, truncated_llama3_tokenizer(vocab), template, 1).unwrap().prompter().think_tokens(), None);
    let model = load_model(&gpu, FIXTURE, &options).unwrap();
    let tokenizer = truncated_llama3_tokenizer_with(vocab, &[(THINK, "<think>"), (THINK_END, "</think>")]);
    assert_eq!(Engine::new(model, tokenizer, ChatTemplate::llama31(), 1).unwrap().prompter().think_tokens(), None);
}

#[test]
fn logprobs_are_the_log_softmax_of_the_logits() {
    let Some(gpu) = gpu() else { return };
    let options = LoadOptions { context_length: Some(CONTEXT), ..Default::default() };
    let mut reference = load_model(&gpu, FIXTURE, &options).unwrap();
    let mut engine = engine().unwrap();
    let golden = golden(FIXTURE);
    // Every way a token is chosen: drawn from the full logits, from the GPU's candidates at another
    // temperature, the GPU's argmax (greedy passes chained on the GPU), after a bias, under a
    // grammar. Log probabilities are always the model's own, at temperature 1, before bias or mask.
    let grammar = ResponseFormat::Grammar { grammar: GrammarFormat { syntax: GrammarSyntax::Regex, definition: "[a-z ]{6}".into() } };
    let ways = [
        ("full logits", SamplingParams { temperature: Some(1.0), ..Default::default() }),
        ("candidates", SamplingParams { temperature: Some(0.7), top_k: Some(10), ..Default::default() }),
        ("greedy", SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ("bias", SamplingParams { temperature: Some(1.0), logit_bias: closing_bias(), ..Default::default() }),
        ("grammar", SamplingParams { temperature: Some(1.0), response_format: Some(grammar), ..Default::default() }),
    ];
    for (way, params) in ways {
        for (i, case) in golden.logits.iter().enumerate().take(if way == "full logits" { usize::MAX } else { 1 }) {
            let params = SamplingParams { seed: Some(i as u64), max_tokens: Some(6), logprobs: Some(Logprobs::Enabled(true)), top_logprobs: Some(5), ..params.clone() };
            let id = engine.add(case.tokens.clone(), &params, CancelToken::default()).unwrap();
            let completion = finish_all(&mut engine, &[id]).remove(0);
            let logprobs = completion.logprobs.expect("logprobs were asked for");
            // A stop token ends the output and has none.
            let output = completion.tokens.iter().filter(|t| !engine.stop_tokens().contains(t)).count();
            assert_eq!(logprobs.len(), output, "{way}");
            let mut tokens = case.tokens.clone();
            for (step, logprob) in logprobs.iter().enumerate() {
                let logits = pollster::block_on(reference.forward(&tokens, 0)).unwrap();
                let want = log_softmax(&logits);
                // The first token's, also against transformers' logits.
                if step == 0 {
                    let independent = log_softmax(&case.last_logits);
                    assert!((logprob.logprob - independent[logprob.token as usize]).abs() < 2e-3, "{way}, transformers: {} vs {}", logprob.logprob, independent[logprob.token as usize]);
                }
                assert_eq!(logprob.token, completion.tokens[step]);
                assert!((logprob.logprob - want[logprob.token as usize]).abs() < 1e-4, "{way}, prompt {i} step {step}: {} vs {}", logprob.logprob, want[logprob.token as usize]);
                let mut order: Vec<usize> = (0..want.len()).collect();
                order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
                if way == "greedy" {
                    assert_eq!(logprob.token as usize, order[0], "{way}, step {step}");
                }
                assert_eq!(logprob.top.len(), 5);
                for (top, &expected) in logprob.top.iter().zip(&order) {
                    assert_eq!(top.token as usize, expected, "{way}, prompt {i} step {step}: alternatives in order");
                    assert!((top.logprob - want[expected]).abs() < 1e-4);
                    assert_eq!(String::from_utf8_lossy(&top.bytes), engine.tokenizer().decode(&[top.token], false).unwrap());
                }
                tokens.push(logprob.token);
            }
        }
    }
    // Greedy with logprobs takes the same tokens as greedy without.
    let greedy = |logprobs| SamplingParams { temperature: Some(0.0), max_tokens: Some(8), logprobs, ..Default::default() };
    let prompt = golden.greedy.prompt.clone();
    let mut run = |params: SamplingParams| {
        let id = engine.add(prompt.clone(), &params, CancelToken::default()).unwrap();
        finish_all(&mut engine, &[id]).remove(0)
    };
    let plain = run(greedy(None));
    let with = run(greedy(Some(Logprobs::Alternatives(0))));
    assert_eq!(plain.tokens, with.tokens);
    assert!(plain.logprobs.is_none() && with.logprobs.unwrap().iter().all(|l| l.top.is_empty()));
    let too_many = SamplingParams { logprobs: Some(Logprobs::Enabled(true)), top_logprobs: Some(21), ..Default::default() };
    assert!(engine.add(vec![1, 2], &too_many, CancelToken::default()).is_err());
}

#[test]
fn echoed_prompts_are_scored_by_the_logits_of_every_position() {
    let Some(gpu) = gpu() else { return };
    // Nine rows of logits a pass (three sequences' and the drafts'): the scored prompt takes what a
    // decoding sequence leaves.
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: 3, ..Default::default() };
    let mut reference = load_model(&gpu, FIXTURE, &options).unwrap();
    let model = load_model(&gpu, FIXTURE, &options).unwrap();
    let mut engine = Engine::new(model, truncated_llama3_tokenizer(reference.config().vocab_size), ChatTemplate::llama31(), 1).unwrap();
    let prompt = golden(FIXTURE).greedy.prompt;
    let greedy = SamplingParams { temperature: Some(0.0), max_tokens: Some(12), ..Default::default() };
    let alone = |engine: &mut Engine, params: &SamplingParams| {
        let id = engine.add(prompt[..9].to_vec(), params, CancelToken::default()).unwrap();
        finish_all(engine, &[id]).remove(0)
    };
    let decoding_alone = alone(&mut engine, &greedy);

    let beside = engine.add(prompt[..9].to_vec(), &greedy, CancelToken::default()).unwrap();
    pollster::block_on(engine.step()).unwrap();
    let scored = SamplingParams { temperature: Some(0.0), max_tokens: Some(3), logprobs: Some(Logprobs::Alternatives(3)), ..Default::default() };
    let work = Work::Complete { prompts: vec![Prompt::Tokens(prompt.clone())], sampling: scored.clone(), echo: true };
    let echoed = engine.add_prepared(engine.prompter().prepare(&work, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
    let mut done = finish_all(&mut engine, &[beside, echoed]);
    let (completion, decoding) = (done.remove(1), done.remove(0));
    assert_eq!(decoding.tokens, decoding_alone.tokens, "a scored prompt beside it changes nothing");

    let echo = completion.echo.expect("echo was asked for");
    assert_eq!((echo.tokens.as_slice(), echo.unwritten), (prompt.as_slice(), 0));
    assert_eq!(echo.text, engine.tokenizer().decode(&prompt, false).unwrap());
    let scores = echo.logprobs.expect("logprobs were asked for");
    assert_eq!(scores.len(), prompt.len() - 1);
    for (position, score) in scores.iter().enumerate() {
        let want = log_softmax(&pollster::block_on(reference.forward(&prompt[..=position], 0)).unwrap());
        assert_eq!(score.token, prompt[position + 1]);
        assert!((score.logprob - want[score.token as usize]).abs() < 1e-4, "position {position}: {} vs {}", score.logprob, want[score.token as usize]);
        let best = (0..want.len()).max_by(|&a, &b| want[a].total_cmp(&want[b])).unwrap();
        assert_eq!((score.top.len(), score.top[0].token as usize), (3, best), "position {position}");
    }
    // Against transformers: a golden case's last logits score the token put after it.
    for case in golden(FIXTURE).logits.iter().filter(|case| case.tokens.len() > 1) {
        let independent = log_softmax(&case.last_logits);
        let next = 500;
        let work = Work::Complete { prompts: vec![Prompt::Tokens([case.tokens.as_slice(), &[next]].concat())], sampling: scored.clone(), echo: true };
        let id = engine.add_prepared(engine.prompter().prepare(&work, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
        let scores = finish_all(&mut engine, &[id]).remove(0).echo.unwrap().logprobs.unwrap();
        let last = scores.last().unwrap();
        assert!((last.logprob - independent[next as usize]).abs() < 2e-3, "transformers: {} vs {}", last.logprob, independent[next as usize]);
    }
    // With max_tokens 0 the prompt alone comes back, scored the same.
    let alone = Work::Complete { prompts: vec![Prompt::Tokens(prompt.clone())], sampling: SamplingParams { max_tokens: Some(0), ..scored.clone() }, echo: true };
    let id = engine.add_prepared(engine.prompter().prepare(&alone, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
    let prompt_only = finish_all(&mut engine, &[id]).remove(0);
    assert_eq!((prompt_only.tokens.len(), prompt_only.finish_reason), (0, FinishReason::Length));
    // The same tokens and alternatives; the values within the rounding of passes grouped otherwise.
    let assert_same_scores = |got: &[llama_webgpu::api::TokenLogprob], want: &[llama_webgpu::api::TokenLogprob]| {
        assert_eq!(got.len(), want.len());
        for (position, (a, b)) in got.iter().zip(want).enumerate() {
            assert_eq!((a.token, a.top.iter().map(|t| t.token).collect::<Vec<_>>()), (b.token, b.top.iter().map(|t| t.token).collect()), "position {position}");
            assert!((a.logprob - b.logprob).abs() < 1e-5, "position {position}: {} vs {}", a.logprob, b.logprob);
        }
    };
    assert_same_scores(&prompt_only.echo.unwrap().logprobs.unwrap(), &scores);
    // Rows of logits beyond one a sequence score as many more positions a pass: here the whole
    // prompt in one, scored the same.
    let vocab = reference.config().vocab_size;
    let wide_options = LoadOptions { max_sequences: 1, scoring_memory: (4 * vocab * prompt.len()) as u64, ..options };
    let model = load_model(&gpu, FIXTURE, &wide_options).unwrap();
    assert_eq!((model.max_sequences(), model.max_outputs()), (1, 1 + MAX_DRAFTS + prompt.len()));
    let mut wide = Engine::new(model, truncated_llama3_tokenizer(vocab), ChatTemplate::llama31(), 1).unwrap();
    let id = wide.add_prepared(wide.prompter().prepare(&alone, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
    let mut passes = 0;
    let wide_scores = loop {
        passes += 1;
        let finished = pollster::block_on(wide.step()).unwrap().into_iter().find_map(|(done, event)| match event {
            Event::Finished(completion) if done == id => Some(completion),
            _ => None,
        });
        if let Some(completion) = finished {
            break completion.echo.unwrap().logprobs.unwrap();
        }
    };
    assert_eq!(passes, 1);
    assert_same_scores(&wide_scores, &scores);
    // What comes after the prompt is what a request without echo generates.
    let id = engine.add(prompt.clone(), &SamplingParams { logprobs: None, ..scored }, CancelToken::default()).unwrap();
    assert_eq!(completion.tokens, finish_all(&mut engine, &[id]).remove(0).tokens);

    // A text prompt comes back as given; the BOS put before it is a token the text does not hold.
    let text = Work::Complete { prompts: vec![Prompt::Text("Once upon".into())], sampling: greedy, echo: true };
    let id = engine.add_prepared(engine.prompter().prepare(&text, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
    let echo = finish_all(&mut engine, &[id]).remove(0).echo.unwrap();
    let text_tokens = engine.tokenizer().encode("Once upon", true).unwrap();
    assert_eq!((echo.text.as_str(), echo.unwritten, &echo.tokens[1..]), ("Once upon", 1, text_tokens.as_slice()));
    assert!(echo.logprobs.is_none());
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits.iter().map(|&l| (l as f64 - max - sum.ln()) as f32).collect()
}
