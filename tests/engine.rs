//! The engine: streaming generation with stop tokens, stop strings and limits, cancellation, and
//! multi-turn reuse of the KV cache, on the tiny Llama 3.1 fixture with the Llama 3 tokenizer cut to
//! its vocabulary.

mod common;

use common::{golden, gpu, load_model, truncated_llama3_tokenizer};
use llama_webgpu::api::{ChatCompletionRequest, ChatMessage, FinishReason, SamplingParams, Stop};
use llama_webgpu::load::read_hf_text;
use llama_webgpu::text::{ChatTemplate, RenderOptions};
use llama_webgpu::{CancelToken, Completion, Delta, Engine, LoadOptions};

const FIXTURE: &str = "tiny-llama31";

fn engine() -> Option<Engine> {
    let gpu = gpu()?;
    let model = load_model(&gpu, FIXTURE, &LoadOptions { context_length: Some(128), ..Default::default() }).unwrap();
    let tokenizer = truncated_llama3_tokenizer(model.config().vocab_size);
    Some(Engine::new(model, tokenizer, ChatTemplate::llama31(), 1).unwrap())
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: Some(0.0), max_tokens: Some(max_tokens), ..Default::default() }
}

/// Runs a request, returning the completion and every delta.
fn run(engine: &mut Engine, prompt: &[u32], params: &SamplingParams, cancel: &CancelToken) -> (Completion, Vec<Delta>) {
    let mut deltas = vec![];
    let completion = pollster::block_on(engine.generate(prompt, params, cancel, &mut |d| deltas.push(d.clone()))).unwrap();
    (completion, deltas)
}

/// A model whose generation_config.json recommends greedy decoding: requests that set no sampling
/// of their own decode greedily (the golden tokens), unless the engine leaves the recommendation
/// out; each setting a request gives is its own (the rest still recommended).
#[test]
fn requests_without_sampling_take_the_models_recommendation() {
    let Some(gpu) = gpu() else { return };
    let dir = common::fixture_with_tokenizer(FIXTURE);
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [1001, 1002], "temperature": 0.0, "top_p": 0.9}"#).unwrap();
    let load = || {
        let config = llama_webgpu::load::read_hf_config(&dir).unwrap();
        let source = llama_webgpu::load::open_safetensors_dir(&dir).unwrap();
        let model = pollster::block_on(llama_webgpu::Llama::load(&gpu, config, &source, &LoadOptions { context_length: Some(128), ..Default::default() }, &mut |_| {})).unwrap();
        let tokenizer = truncated_llama3_tokenizer(model.config().vocab_size);
        Engine::new(model, tokenizer, ChatTemplate::llama31(), 1).unwrap()
    };
    let golden = golden(FIXTURE).greedy;
    let unset = SamplingParams { max_tokens: Some(32), seed: Some(3), ..Default::default() };
    let mut recommended = load();
    assert_eq!((recommended.sampling_defaults().temperature, recommended.sampling_defaults().top_p), (Some(0.0), Some(0.9)));
    assert_eq!(run(&mut recommended, &golden.prompt, &unset, &CancelToken::default()).0.tokens, golden.tokens);
    let hot = SamplingParams { temperature: Some(1.0), top_p: Some(1.0), ..unset.clone() };
    let own = run(&mut recommended, &golden.prompt, &hot, &CancelToken::default()).0.tokens;
    let mut openai = load().with_sampling_defaults(false);
    assert!(openai.sampling_defaults().is_empty());
    let sampled = run(&mut openai, &golden.prompt, &unset, &CancelToken::default()).0.tokens;
    assert_ne!(sampled, golden.tokens, "temperature 1 samples another continuation");
    assert_eq!(own, sampled, "a request's own temperature and top_p win over the recommendation");
}

#[test]
fn greedy_generation_streams_the_golden_tokens_and_their_text() {
    let Some(mut engine) = engine() else { return };
    let golden = golden(FIXTURE).greedy;
    let (completion, deltas) = run(&mut engine, &golden.prompt, &greedy(32), &CancelToken::default());
    assert_eq!(completion.tokens, golden.tokens);
    assert_eq!(completion.finish_reason, FinishReason::Length);
    assert_eq!(completion.text, engine.tokenizer().decode(&golden.tokens, false).unwrap());
    assert_eq!(deltas.iter().map(|d| d.text.as_str()).collect::<String>(), completion.text);
    assert_eq!(deltas.iter().filter_map(|d| d.token).collect::<Vec<_>>(), golden.tokens);
    let usage = completion.usage;
    assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (40, 32, 72));
}

#[test]
fn a_second_turn_prefills_only_new_tokens_and_matches_a_fresh_run() {
    let Some(mut engine) = engine() else { return };
    let prompt = golden(FIXTURE).greedy.prompt;
    let cancel = CancelToken::default();
    let (first, _) = run(&mut engine, &prompt[..20], &greedy(6), &cancel);
    // The next turn: the whole conversation so far plus a new user message.
    let mut conversation = prompt[..20].to_vec();
    conversation.extend(&first.tokens);
    conversation.extend(&prompt[25..35]);
    let before = engine.model().tokens_processed();
    let (second, _) = run(&mut engine, &conversation, &greedy(10), &cancel);
    // The first turn's last token was sampled but never run, so it is prefilled with the new ones.
    let cached = 20 + first.tokens.len() - 1;
    assert_eq!(second.usage.cached_prompt_tokens as usize, cached);
    let prefilled_and_decoded = engine.model().tokens_processed() - before;
    assert_eq!(prefilled_and_decoded as usize, conversation.len() - cached + second.tokens.len() - 1);

    let mut fresh = self::engine().unwrap();
    let (alone, _) = run(&mut fresh, &conversation, &greedy(10), &cancel);
    assert_eq!(alone.usage.cached_prompt_tokens, 0);
    assert_eq!(second.tokens, alone.tokens);
    assert_eq!(second.text, alone.text);
}

#[test]
fn the_same_prompt_again_reruns_only_its_last_token() {
    let Some(mut engine) = engine() else { return };
    let prompt = golden(FIXTURE).greedy.prompt;
    let (a, _) = run(&mut engine, &prompt, &greedy(4), &CancelToken::default());
    let (b, _) = run(&mut engine, &prompt, &greedy(4), &CancelToken::default());
    assert_eq!(b.usage.cached_prompt_tokens as usize, prompt.len() - 1);
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn cancelling_mid_generation_leaves_the_engine_ready() {
    let Some(mut engine) = engine() else { return };
    let golden = golden(FIXTURE).greedy;
    let cancel = CancelToken::default();
    let mut seen = 0;
    let completion = pollster::block_on(engine.generate(&golden.prompt, &greedy(32), &cancel, &mut |_| {
        seen += 1;
        if seen == 3 {
            cancel.cancel();
        }
    }))
    .unwrap();
    assert_eq!(completion.finish_reason, FinishReason::Abort);
    assert_eq!(completion.tokens, golden.tokens[..3]);
    let (again, _) = run(&mut engine, &golden.prompt, &greedy(32), &CancelToken::default());
    assert_eq!(again.tokens, golden.tokens);
}

#[test]
fn stop_strings_cut_the_text_even_across_tokens() {
    let Some(mut engine) = engine() else { return };
    let golden = golden(FIXTURE).greedy;
    let pieces: Vec<String> = golden.tokens.iter().map(|&t| engine.tokenizer().decode(&[t], false).unwrap()).collect();
    // A stop string made of the end of token 5's text and the start of token 6's.
    let (a, b) = (&pieces[5], &pieces[6]);
    assert!(!a.is_empty() && !b.is_empty(), "{pieces:?}");
    let stop = format!("{}{}", &a[a.char_indices().last().unwrap().0..], &b[..b.char_indices().nth(1).map_or(b.len(), |c| c.0)]);
    let full_text: String = pieces.concat();
    let cut = full_text.find(&stop).unwrap();
    let params = SamplingParams { stop: Some(Stop::Many(vec!["never appears".into(), stop.clone()])), ..greedy(32) };
    let (completion, deltas) = run(&mut engine, &golden.prompt, &params, &CancelToken::default());
    assert_eq!(completion.finish_reason, FinishReason::Stop, "stop {stop:?}");
    assert_eq!(completion.text, full_text[..cut]);
    assert_eq!(deltas.iter().map(|d| d.text.as_str()).collect::<String>(), completion.text);
    assert!(deltas.iter().all(|d| !d.text.contains(&stop)));
}

#[test]
fn eos_tokens_stop_generation() {
    let Some(mut engine) = engine() else { return };
    let golden = golden(FIXTURE).greedy;
    // Biasing an eos id (1001) to the top makes it the first choice.
    let params = SamplingParams { logit_bias: Some([("1001".to_string(), 100.0)].into()), ..greedy(32) };
    let (completion, _) = run(&mut engine, &golden.prompt, &params, &CancelToken::default());
    assert_eq!((completion.finish_reason, completion.tokens.as_slice(), completion.text.as_str()), (FinishReason::Stop, &[1001][..], ""));
}

#[test]
fn limits_are_enforced_with_clear_errors() {
    let Some(mut engine) = engine() else { return };
    let prompt = golden(FIXTURE).greedy.prompt;
    let generate = |engine: &mut Engine, prompt: &[u32], params: &SamplingParams| {
        pollster::block_on(engine.generate(prompt, params, &CancelToken::default(), &mut |_| {})).map_err(|e| e.to_string())
    };
    let err = generate(&mut engine, &prompt, &greedy(100)).unwrap_err();
    assert_eq!(err, "max_tokens 100 is too large: the prompt has 40 tokens and the context holds 128");
    let long = [prompt.as_slice(); 4].concat();
    assert_eq!(generate(&mut engine, &long, &greedy(1)).unwrap_err(), "the prompt has 160 tokens but the context holds 128");
    assert_eq!(generate(&mut engine, &[], &greedy(1)).unwrap_err(), "the prompt is empty");
    let bad = SamplingParams { top_p: Some(2.0), ..greedy(1) };
    assert_eq!(generate(&mut engine, &prompt, &bad).unwrap_err(), "top_p must be in (0, 1], got 2");
    // Without max_tokens, generation runs until the context is full.
    let unlimited = SamplingParams { temperature: Some(0.0), ..Default::default() };
    let completion = generate(&mut engine, &[prompt.as_slice(), &prompt, &prompt[..30]].concat(), &unlimited).unwrap();
    assert_eq!((completion.finish_reason, completion.tokens.len()), (FinishReason::Length, 18));
}

#[test]
fn seeded_sampling_repeats_and_uses_gpu_candidates_like_full_logits() {
    let Some(mut engine) = engine() else { return };
    let prompt = golden(FIXTURE).greedy.prompt;
    let sampled = |engine: &mut Engine, params: SamplingParams| run(engine, &prompt, &params, &CancelToken::default()).0.tokens;
    let top_k = SamplingParams { temperature: Some(1.0), top_k: Some(8), seed: Some(5), max_tokens: Some(16), ..Default::default() };
    let a = sampled(&mut engine, top_k.clone());
    assert_eq!(a, sampled(&mut engine, top_k.clone()));
    assert_ne!(a, sampled(&mut engine, SamplingParams { seed: Some(6), ..top_k.clone() }));
    // A zero presence penalty changes nothing but sends the sampler to the full logits.
    assert_eq!(a, sampled(&mut engine, SamplingParams { presence_penalty: Some(1e-30), ..top_k }));
}

/// A template reads its model's special tokens as transformers passes them: tokenizer_config.json's
/// `bos_token` and `eos_token` (strings or added-token objects), else the texts of config.json's
/// BOS and first EOS ids (Llama 3's names are wrong for other vocabularies: DeepSeek's distilled
/// Llama calls id 128000 `<｜begin▁of▁sentence｜>`).
#[test]
fn a_template_reads_its_models_special_tokens() {
    let Some(gpu) = gpu() else { return };
    let dir = common::fixture_with_tokenizer(FIXTURE);
    let template = "{{ bos_token }}|{{ messages[0]['content'] }}|{{ eos_token }}";
    let request = ChatCompletionRequest { messages: vec![ChatMessage::new("user", "hi")], ..Default::default() };
    let prompt_of = |tokenizer_config: serde_json::Value| {
        std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
        let (tokenizer, template) = read_hf_text(&dir).unwrap();
        let model = load_model(&gpu, FIXTURE, &LoadOptions { context_length: Some(64), ..Default::default() }).unwrap();
        let engine = Engine::new(model, tokenizer, template, 1).unwrap();
        let prompt = engine.prompter().chat_prompt(&request, &RenderOptions::default()).unwrap();
        (engine.tokenizer().clone(), prompt)
    };
    let named = serde_json::json!({"chat_template": template, "bos_token": {"content": "ab", "special": true}, "eos_token": "cd"});
    let (tokenizer, prompt) = prompt_of(named);
    assert_eq!(prompt, tokenizer.encode("ab|hi|cd", true).unwrap());
    let (tokenizer, prompt) = prompt_of(serde_json::json!({"chat_template": template}));
    let config = llama_webgpu::load::read_hf_config(&dir).unwrap();
    let text_of = |id: u32| tokenizer.decode(&[id], false).unwrap();
    let expected = format!("{}|hi|{}", text_of(config.bos_token_id.unwrap()), text_of(config.eos_token_ids[0]));
    assert_eq!(prompt, tokenizer.encode(&expected, true).unwrap(), "{expected:?}");
}
