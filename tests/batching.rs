//! Many sequences in one engine: concurrent requests produce the tokens each produces alone, a small
//! KV pool makes requests wait instead of failing, pages all come back, and a shared prefix is
//! computed once. On the tiny Llama 3.1 fixture with the Llama 3 tokenizer cut to its vocabulary.

mod common;

use std::collections::HashMap;

use common::{exact, golden, gpu, gpu_with, load_model, rng, truncated_llama3_tokenizer};
use llama_webgpu::api::request::{Prompt, Work};
use llama_webgpu::api::{DraftUsage, FinishReason, Logprobs, Prediction, ResponseFormat, SamplingParams, Stop};
use llama_webgpu::engine::{Event, SequenceId};
use llama_webgpu::model::{PageAllocator, PAGE_SIZE};
use llama_webgpu::text::{ChatTemplate, RenderOptions};
use llama_webgpu::load::ShardDir;
use llama_webgpu::quant::DType;
use llama_webgpu::{CancelToken, Completion, Engine, GpuOptions, Llama, LoadOptions};
use rand::Rng;

const FIXTURE: &str = "tiny-llama31";
const CONTEXT: usize = 128;
/// Bytes of one KV page of the fixture: keys and values of 3 layers, 16 positions of 2 KV heads
/// of 16, in f32.
const PAGE_BYTES: u64 = 2 * 3 * (PAGE_SIZE as u64) * 32 * 4;

fn engine(max_sequences: usize, kv_memory: Option<u64>) -> Option<Engine> {
    engine_with(LoadOptions { max_sequences, kv_memory, ..Default::default() })
}

fn engine_with(options: LoadOptions) -> Option<Engine> {
    let gpu = gpu()?;
    let options = LoadOptions { context_length: Some(CONTEXT), ..options };
    Some(engine_of(load_model(&gpu, FIXTURE, &options).unwrap()))
}

fn engine_of(model: Llama) -> Engine {
    let tokenizer = truncated_llama3_tokenizer(model.config().vocab_size);
    Engine::new(model, tokenizer, ChatTemplate::llama31(), 1).unwrap()
}

/// The fixture in q4_0 shards (converted once) on a device whose matmuls take int8 inputs
/// (GpuOptions::q8_activations).
fn q8_model(max_sequences: usize) -> Option<Llama> {
    static SHARDS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let gpu = gpu_with(&GpuOptions { q8_activations: true, ..exact() })?;
    let shards = ShardDir::open(SHARDS.get_or_init(|| common::convert(FIXTURE, DType::Q4_0, 64 << 20))).unwrap();
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences, ..Default::default() };
    Some(pollster::block_on(Llama::load(&gpu, shards.manifest.model_config().unwrap(), &shards, &options, &mut |_| {})).unwrap())
}

/// Prompts of different lengths cut from the golden prompt and shifted through the vocabulary.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    let base = golden(FIXTURE).greedy.prompt;
    (0..n).map(|i| base.iter().take(5 + (i * 7) % 36).map(|&t| (t + 37 * i as u32) % 1000).collect()).collect()
}

/// A request to run: its prompt, sampling, the engine step at which it is added, and the number of
/// its tokens after which it is cancelled.
struct Request {
    prompt: Vec<u32>,
    params: SamplingParams,
    joins_at: usize,
    cancel_after: Option<usize>,
}

/// Runs `requests` through one engine, each added at its step; returns each one's completion and
/// the text its deltas carried.
fn run_together(engine: &mut Engine, requests: &[Request]) -> Vec<(Completion, String)> {
    let mut ids: HashMap<SequenceId, usize> = HashMap::new();
    let mut cancels: Vec<CancelToken> = requests.iter().map(|_| CancelToken::default()).collect();
    let mut results: Vec<Option<(Completion, String)>> = requests.iter().map(|_| None).collect();
    let mut texts = vec![String::new(); requests.len()];
    let mut counts = vec![0; requests.len()];
    let mut step = 0;
    while results.iter().any(Option::is_none) {
        for (i, request) in requests.iter().enumerate().filter(|(_, r)| r.joins_at == step) {
            cancels[i] = CancelToken::default();
            let id = engine.add(request.prompt.clone(), &request.params, cancels[i].clone()).unwrap();
            ids.insert(id, i);
        }
        for (id, event) in pollster::block_on(engine.step()).unwrap() {
            let i = ids[&id];
            match event {
                Event::Delta(delta) => {
                    texts[i].push_str(&delta.text);
                    counts[i] += delta.token.is_some() as usize;
                    if requests[i].cancel_after == Some(counts[i]) {
                        cancels[i].cancel();
                    }
                }
                Event::Finished(completion) => results[i] = Some((completion, std::mem::take(&mut texts[i]))),
                Event::Failed(error) => panic!("request {i} failed: {error}"),
                Event::Prefill { .. } | Event::Echo(_) => {}
            }
        }
        step += 1;
        assert!(step < 10_000, "the engine stopped making progress");
    }
    assert!(engine.is_idle());
    results.into_iter().map(Option::unwrap).collect()
}

/// Each request alone on a fresh single-sequence engine.
fn run_alone(requests: &[Request]) -> Vec<Completion> {
    run_alone_on(requests, || engine(1, None).unwrap())
}

/// Each request alone on a fresh engine that `single` makes.
fn run_alone_on(requests: &[Request], single: impl Fn() -> Engine) -> Vec<Completion> {
    requests
        .iter()
        .map(|request| {
            let mut engine = single();
            let mut count = 0;
            let cancel = CancelToken::default();
            let completion = pollster::block_on(engine.generate(&request.prompt, &request.params, &cancel, &mut |delta| {
                count += delta.token.is_some() as usize;
                if request.cancel_after == Some(count) {
                    cancel.cancel();
                }
            }));
            completion.unwrap()
        })
        .collect()
}

/// 16 requests with different prompts and lengths, joining at different steps, two cancelled.
fn requests(params: impl Fn(usize) -> SamplingParams) -> Vec<Request> {
    prompts(16)
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            params: params(i),
            joins_at: [0, 0, 0, 1, 2, 3, 5, 8][i % 8] + i / 8,
            cancel_after: match i {
                3 => Some(2),
                11 => Some(5),
                _ => None,
            },
        })
        .collect()
}

/// Tokens, text and finish reasons equal, and cancelled requests cut where they were cancelled.
fn assert_same_as_alone(requests: &[Request], together: &[(Completion, String)], alone: &[Completion]) {
    for (i, ((together, text), alone)) in together.iter().zip(alone).enumerate() {
        assert_eq!(together.tokens, alone.tokens, "request {i}: tokens");
        assert_eq!(together.finish_reason, alone.finish_reason, "request {i}");
        assert_eq!(&together.text, text, "request {i}: the deltas' text");
        assert_eq!(together.text, alone.text, "request {i}: text");
        if let Some(n) = requests[i].cancel_after {
            assert_eq!(together.tokens.len(), n, "request {i}: cancelled after {n} tokens");
        }
    }
}

#[test]
fn concurrent_greedy_requests_produce_the_tokens_of_each_alone() {
    let Some(mut engine) = engine(16, None) else { return };
    let requests = requests(|i| SamplingParams { temperature: Some(0.0), max_tokens: Some(6 + (i as u32 * 5) % 17), ..Default::default() });
    let free_at_start = engine.load().kv_pages_free;
    let together = run_together(&mut engine, &requests);
    assert_same_as_alone(&requests, &together, &run_alone(&requests));
    assert_eq!((together[3].0.finish_reason, together[11].0.finish_reason), (FinishReason::Abort, FinishReason::Abort));
    assert_eq!(engine.load().kv_pages_free, free_at_start);
}

/// The same with the matmuls on int8 inputs (GpuOptions::q8_activations). A pass's GEMVs and
/// tiles read the same quantized inputs, but the order of f32 sums, which batching changes, now
/// decides which way a value on a rounding boundary goes, and one step of int8 moves the logits
/// by far more than the order does (GEMVs against tiles on one 32-token prompt: 4.6e-2 against
/// 8e-6 on f32 inputs). So a request may leave its tokens alone, but only where the two candidates
/// lie within Q8_BATCH_MARGIN of the logits' spread there (measured: request 9 at its first token,
/// 1.6e-3 apart).
#[test]
fn concurrent_greedy_requests_on_q8_inputs_produce_the_tokens_of_each_alone_where_margins_allow() {
    let Some(mut engine) = q8_model(16).map(engine_of) else { return };
    let requests = requests(|i| SamplingParams { temperature: Some(0.0), max_tokens: Some(6 + (i as u32 * 5) % 17), ..Default::default() });
    let together = run_together(&mut engine, &requests);
    let alone = run_alone_on(&requests, || engine_of(q8_model(1).unwrap()));
    let mut model = q8_model(1).unwrap();
    let mut left = 0;
    for (i, ((together, _), alone)) in together.iter().zip(&alone).enumerate() {
        let Some(step) = together.tokens.iter().zip(&alone.tokens).position(|(a, b)| a != b) else {
            assert_eq!((&together.tokens, together.finish_reason), (&alone.tokens, alone.finish_reason), "request {i}");
            continue;
        };
        let context = [&requests[i].prompt[..], &alone.tokens[..step]].concat();
        let logits = pollster::block_on(model.forward(&context, 0)).unwrap();
        let margin = logits[alone.tokens[step] as usize] - logits[together.tokens[step] as usize];
        let spread = standard_deviation(&logits);
        println!("request {i} leaves its tokens alone at step {step}, where they were {:.2e} of the spread apart", margin / spread);
        assert!(margin <= Q8_BATCH_MARGIN * spread, "request {i}: step {step} took {} over {} (margin {:.2e} of the spread)", together.tokens[step], alone.tokens[step], margin / spread);
        left += 1;
    }
    assert!(left <= 2, "{left} of 16 requests left their tokens alone");
}

const Q8_BATCH_MARGIN: f32 = 0.02;

fn standard_deviation(values: &[f32]) -> f32 {
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    (values.iter().map(|l| (l - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt()
}

#[test]
fn concurrent_seeded_sampling_produces_the_tokens_of_each_alone() {
    let Some(mut engine) = engine(16, None) else { return };
    // GPU top-k candidates, top-p over the vocabulary's head, and full logits (a penalty).
    let requests = requests(|i| SamplingParams {
        temperature: Some(0.7 + 0.1 * (i % 4) as f32),
        top_k: [Some(8), None, Some(40), None][i % 4],
        top_p: [None, Some(0.9), None, None][i % 4],
        presence_penalty: [None, None, None, Some(0.5)][i % 4],
        seed: Some(100 + i as u64),
        max_tokens: Some(6 + (i as u32 * 3) % 11),
        ..Default::default()
    });
    let together = run_together(&mut engine, &requests);
    assert_same_as_alone(&requests, &together, &run_alone(&requests));
}

#[test]
fn concurrent_requests_that_read_every_logit_produce_the_tokens_and_log_probabilities_of_each_alone() {
    let Some(mut engine) = engine(16, None) else { return };
    // Log probabilities, a JSON grammar, both: each pass reads these rows' logits together.
    let requests = requests(|i| SamplingParams {
        temperature: Some([0.0, 0.8][i % 2]),
        seed: Some(200 + i as u64),
        logprobs: (i % 3 != 1).then_some(Logprobs::Enabled(true)),
        top_logprobs: (i % 3 != 1).then_some(3),
        // Not on request 11, cancelled after 5 tokens: a JSON object may close before then.
        response_format: (i % 3 != 0 && i != 11).then_some(ResponseFormat::JsonObject),
        max_tokens: Some(5 + (i as u32 * 3) % 9),
        ..Default::default()
    });
    let together = run_together(&mut engine, &requests);
    let alone = run_alone(&requests);
    assert_same_as_alone(&requests, &together, &alone);
    // The same tokens and alternatives; the values within the rounding of a pass of several
    // tokens (its GEMVs sum in another order than a lone token's).
    for (i, ((together, _), alone)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(together.logprobs.is_some(), i % 3 != 1, "request {i}");
        for (a, b) in together.logprobs.iter().flatten().zip(alone.logprobs.iter().flatten()) {
            let tokens = |l: &llama_webgpu::api::TokenLogprob| (l.token, l.top.iter().map(|t| t.token).collect::<Vec<_>>());
            assert_eq!(tokens(a), tokens(b), "request {i}: tokens and alternatives");
            for (x, y) in std::iter::once(a.logprob).chain(a.top.iter().map(|t| t.logprob)).zip(std::iter::once(b.logprob).chain(b.top.iter().map(|t| t.logprob))) {
                assert!((x - y).abs() < 1e-4, "request {i}: log probability {x} alone {y}");
            }
        }
        assert_eq!(together.logprobs.as_ref().map(Vec::len), alone.logprobs.as_ref().map(Vec::len), "request {i}");
    }
}

/// Drafts verified in one pass: greedy and seeded sampled requests (some with log probabilities;
/// sampled from the GPU's candidates or from the full logits, one with a penalty, some under a
/// JSON grammar) draft from a
/// prediction (their own output alone, the same with a stretch changed, another request's output)
/// or by prompt lookup; each request's tokens and log probabilities are what plain decoding gives
/// it alone.
#[test]
fn drafted_tokens_verified_in_one_pass_leave_every_request_its_tokens_alone() {
    // Four at a time, so that passes of fewer than 7 tokens come often and leave room for drafts.
    let Some(engine) = engine(4, None) else { return };
    let mut engine = engine.with_prompt_lookup(true);
    let sampled = |i: usize| i % 5 == 4 || i.is_multiple_of(7);
    let mut requests = requests(|i| SamplingParams {
        temperature: Some(if sampled(i) { 0.8 } else { 0.0 }),
        top_k: i.is_multiple_of(7).then_some(20),
        frequency_penalty: (i == 9).then_some(0.5),
        response_format: [4, 8, 13].contains(&i).then_some(ResponseFormat::JsonObject),
        seed: Some(300 + i as u64),
        logprobs: (i % 3 == 0).then_some(Logprobs::Enabled(true)),
        top_logprobs: (i % 3 == 0).then_some(2),
        max_tokens: Some(10 + (i as u32 * 7) % 23),
        ..Default::default()
    });
    let alone = run_alone(&requests);
    let prediction = |i: usize| match i % 4 {
        0 => Some(alone[i].text.clone()),
        1 => Some(alone[i].text.char_indices().map(|(j, c)| if (8..14).contains(&j) { 'x' } else { c }).collect()),
        2 => Some(alone[(i + 1) % alone.len()].text.clone()),
        _ => None,
    };
    for (i, request) in requests.iter_mut().enumerate() {
        request.params.prediction = prediction(i).map(|content| Prediction::Content { content });
    }
    let free_at_start = engine.load().kv_pages_free;
    let together = run_together(&mut engine, &requests);
    assert_same_as_alone(&requests, &together, &alone);
    assert_logprobs_as_alone(&together, &alone);
    for (i, (together, _)) in together.iter().enumerate() {
        // Those with a prediction report its use.
        let drafts = together.usage.drafts;
        assert!(requests[i].params.prediction.is_none() || drafts.is_some(), "request {i}: {drafts:?}");
    }
    let summed = DraftUsage::sum(together.iter().map(|(c, _)| c.usage.drafts)).unwrap();
    println!("{summed:?}; by request {:?}", together.iter().map(|(c, _)| c.usage.drafts).collect::<Vec<_>>());
    assert!(summed.accepted > 0 && summed.rejected > 0, "{summed:?}");
    // A request predicting its own output drafts some of it right (not all: the fixture's random
    // tokens are not what its text encodes back to), greedy or sampled.
    for i in (0..requests.len()).filter(|&i| i % 4 == 0) {
        assert!(together[i].0.usage.drafts.is_some_and(|d| d.accepted > 0), "request {i}: {:?}", together[i].0.usage.drafts);
    }
    assert_eq!(engine.load().kv_pages_free, free_at_start);
}

/// The same tokens and alternatives as alone, and log probabilities within the rounding of passes
/// that group tokens otherwise.
fn assert_logprobs_as_alone(together: &[(Completion, String)], alone: &[Completion]) {
    for (i, ((together, _), alone)) in together.iter().zip(alone).enumerate() {
        let logprobs = |c: &Completion| c.logprobs.iter().flatten().map(|l| (l.token, l.top.iter().map(|t| t.token).collect::<Vec<_>>(), l.logprob)).collect::<Vec<_>>();
        for ((token, top, logprob), (token_alone, top_alone, logprob_alone)) in logprobs(together).into_iter().zip(logprobs(alone)) {
            assert_eq!((token, top), (token_alone, top_alone), "request {i}: tokens and alternatives");
            assert!((logprob - logprob_alone).abs() < 1e-4, "request {i}: log probability {logprob} alone {logprob_alone}");
        }
        assert_eq!(together.logprobs.as_ref().map(Vec::len), alone.logprobs.as_ref().map(Vec::len), "request {i}");
    }
}

/// Speculative decoding with a draft model, one that drafts well (the fixture drafting for
/// itself) and one that drafts badly (the smaller Llama 3.2 fixture of the same vocabulary): 16
/// requests, greedy and seeded sampled, some under a JSON grammar, some with log probabilities,
/// joining at different steps, two cancelled, each give what plain decoding gives them alone; the
/// draft model catches up with prompts prefilled over several passes (or later, where too many
/// sequences decode to draft); pages all come back.
#[test]
fn a_draft_model_drafts_for_every_request_and_changes_no_token() {
    let Some(gpu) = gpu() else { return };
    let requests = requests(|i| SamplingParams {
        temperature: Some(if i % 3 == 2 { 0.8 } else { 0.0 }),
        top_k: (i % 6 == 2).then_some(20),
        seed: Some(500 + i as u64),
        logprobs: (i % 4 == 1).then_some(Logprobs::Enabled(true)),
        top_logprobs: (i % 4 == 1).then_some(2),
        response_format: (i % 5 == 3).then_some(ResponseFormat::JsonObject),
        max_tokens: Some(10 + (i as u32 * 5) % 17),
        ..Default::default()
    });
    let alone = run_alone(&requests);
    // With 8 sequences, at times 7 or more decode and none drafts: prompts then catch up later.
    // With 4, a pool of 8 pages for requests of up to 5: some give their pages (both models'
    // keys and values) back and the draft model catches up again when they run again.
    for (draft, drafts_well, sequences, kv_memory) in [(FIXTURE, true, 4, Some(8 * PAGE_BYTES)), ("tiny-llama32-tied", false, 8, None)] {
        // Passes of 16 tokens: the longer prompts prefill in two or three, the draft model
        // catching up a pass behind.
        let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: sequences, max_batch: 16, kv_memory, ..Default::default() };
        let engine = engine_of(load_model(&gpu, FIXTURE, &options).unwrap());
        let config = llama_webgpu::load::read_hf_config(&common::fixture(draft)).unwrap();
        let draft_options = LoadOptions { max_batch: 16, ..engine.draft_load_options(&config) };
        let mut engine = engine.with_draft_model(load_model(&gpu, draft, &draft_options).unwrap()).unwrap();
        let free_at_start = engine.load().kv_pages_free;
        let together = run_together(&mut engine, &requests);
        assert_same_as_alone(&requests, &together, &alone);
        assert_logprobs_as_alone(&together, &alone);
        assert_eq!(engine.load().kv_pages_free, free_at_start);
        assert_eq!(engine.load().preemptions > 0, kv_memory.is_some(), "{draft}: {:?}", engine.load());
        let drafts = DraftUsage::sum(together.iter().map(|(c, _)| c.usage.drafts)).unwrap();
        println!("{draft}: {} preemptions, {drafts:?}; {:?}", engine.load().preemptions, together.iter().map(|(c, _)| c.usage.drafts.map(|d| (d.accepted, d.rejected))).collect::<Vec<_>>());
        // Drafting for itself, the model's argmax is the draft's but where a pass's grouping of
        // tokens moves a near tie: greedy requests without a grammar take nearly every draft.
        let greedy = DraftUsage::sum(together.iter().zip(&requests).filter(|(_, r)| r.params.temperature == Some(0.0) && r.params.response_format.is_none()).map(|((c, _), _)| c.usage.drafts)).unwrap();
        match drafts_well {
            true => assert!(greedy.accepted > 4 * greedy.rejected.max(10), "{draft}: greedy {greedy:?}"),
            false => assert!(drafts.rejected > drafts.accepted, "{draft}: {drafts:?}"),
        }
    }
}

#[test]
fn a_draft_model_must_match_the_engine() {
    let Some(gpu) = gpu() else { return };
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: 4, ..Default::default() };
    let engine = engine_of(load_model(&gpu, FIXTURE, &options).unwrap());
    let config = llama_webgpu::load::read_hf_config(&common::fixture(FIXTURE)).unwrap();
    let shorter = LoadOptions { context_length: Some(CONTEXT / 2), ..engine.draft_load_options(&config) };
    let err = engine.with_draft_model(load_model(&gpu, FIXTURE, &shorter).unwrap()).err().unwrap();
    assert_eq!(err.to_string(), "the draft model's context is 64 but the model's 128: load it with Engine::draft_load_options");
}

#[test]
fn prompts_longer_than_a_pass_prefill_in_chunks_beside_decoding_sequences() {
    // Passes of at most 7 tokens: a 40-token prompt takes several, some of prefill alone.
    let Some(mut engine) = engine_with(LoadOptions { max_sequences: 3, max_batch: 7, ..Default::default() }) else { return };
    let prompt = golden(FIXTURE).greedy.prompt;
    let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(8), ..Default::default() };
    let requests: Vec<Request> = (0..3).map(|i| Request { prompt: prompt[i..].to_vec(), params: params.clone(), joins_at: 3 * i, cancel_after: None }).collect();
    let together = run_together(&mut engine, &requests);
    assert_eq!(together[0].0.tokens, golden(FIXTURE).greedy.tokens[..8]);
    assert_same_as_alone(&requests, &together, &run_alone(&requests));
}

/// A prompt longer than a pass reports its progress after each pass that leaves part of it to go,
/// then generates as it does without being watched.
#[test]
fn a_long_prompt_reports_its_prefill_progress() {
    let Some(mut engine) = engine_with(LoadOptions { max_batch: 7, ..Default::default() }) else { return };
    let prompt: Vec<u32> = golden(FIXTURE).greedy.prompt.into_iter().take(20).collect();
    let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(4), ..Default::default() };
    let mut seen = vec![];
    let watched = pollster::block_on(engine.generate_with_events(&prompt, &params, &CancelToken::default(), &mut |event| match event {
        Event::Prefill { done, total } => seen.push(format!("prefill {done}/{total}")),
        Event::Delta(delta) => seen.push(format!("token {:?}", delta.token)),
        _ => {}
    }))
    .unwrap();
    let tokens: Vec<String> = watched.tokens.iter().map(|t| format!("token {:?}", Some(*t))).collect();
    assert_eq!(seen, [vec!["prefill 7/20".to_string(), "prefill 14/20".to_string()], tokens].concat());
    let unwatched = pollster::block_on(engine.generate(&prompt[..19], &params, &CancelToken::default(), &mut |_| {})).unwrap();
    let again = pollster::block_on(engine.generate(&prompt, &params, &CancelToken::default(), &mut |_| {})).unwrap();
    assert!(unwatched.tokens.len() == 4 && again.tokens == watched.tokens, "{:?} vs {:?}", again.tokens, watched.tokens);
}

#[test]
fn a_small_pool_makes_requests_wait_and_a_request_too_large_for_it_fails_clearly() {
    // 6 pages (96 positions): one or two of these requests (2-4 pages each) at a time, though
    // 8 sequences may run.
    let Some(mut engine) = engine(8, Some(6 * PAGE_BYTES)) else { return };
    let load = engine.load();
    assert_eq!((load.kv_pages, load.kv_pages_free, load.max_sequences), (6, 6, 8));
    let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(12), ..Default::default() };
    let requests: Vec<Request> = prompts(6).into_iter().map(|prompt| Request { prompt, params: params.clone(), joins_at: 0, cancel_after: None }).collect();
    let together = run_together(&mut engine, &requests);
    assert_same_as_alone(&requests, &together, &run_alone(&requests));
    assert_eq!(engine.load().kv_pages_free, 6);

    let err = engine.add(vec![1; 100], &SamplingParams { max_tokens: Some(28), ..Default::default() }, CancelToken::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the request needs 8 KV pages (128 positions: the prompt's 100 and max_tokens 28) but the KV pool holds 6 pages of 16: lower max_tokens or give the pool more memory"
    );
    assert!(engine.is_idle());
}

/// Requests without `max_tokens` may each reach the whole pool, but take pages only as they fill
/// them: all run together; when the pool runs out the latest admitted gives its pages back and is
/// computed again later, its sampler, grammar and log probabilities going on where they were.
#[test]
fn requests_that_may_reach_the_whole_pool_run_together_and_the_latest_give_way_when_it_is_full() {
    // 10 pages: each request may reach 128 positions (8 pages).
    let Some(mut crowded) = engine(6, Some(10 * PAGE_BYTES)) else { return };
    let mut requests: Vec<Request> = prompts(6)
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            prompt,
            params: SamplingParams {
                temperature: Some([0.0, 0.8][i % 2]),
                top_k: (i == 1).then_some(20),
                seed: Some(50 + i as u64),
                logprobs: (i % 3 == 0).then_some(Logprobs::Enabled(true)),
                top_logprobs: (i % 3 == 0).then_some(2),
                response_format: (i == 5).then_some(ResponseFormat::JsonObject),
                ..Default::default()
            },
            joins_at: i,
            cancel_after: None,
        })
        .collect();
    requests[4].cancel_after = Some(40);
    let together = run_together(&mut crowded, &requests);
    let load = crowded.load();
    assert!(load.preemptions > 0, "the pool never ran out: {load:?}");
    let alone = run_alone_on(&requests, || engine(1, Some(10 * PAGE_BYTES)).unwrap());
    assert_same_as_alone(&requests, &together, &alone);
    assert_logprobs_as_alone(&together, &alone);
    for (i, (completion, _)) in together.iter().enumerate() {
        // Preempted or not, a request's prompt counts as computed once, and as cached only when it was.
        assert_eq!(completion.usage.cached_prompt_tokens, alone[i].usage.cached_prompt_tokens, "request {i}");
    }
    println!("{} preemptions; tokens {:?}", load.preemptions, together.iter().map(|(c, _)| c.tokens.len()).collect::<Vec<_>>());
    assert_eq!(load.kv_pages_free, 10);
}

/// A prompt being scored (`echo` with log probabilities) in passes of a few tokens gives way to an
/// older sequence that needs a page; computed again, it scores every position once, as alone.
#[test]
fn a_prompt_preempted_while_it_is_scored_is_scored_as_alone() {
    let options = LoadOptions { max_sequences: 2, max_batch: 4, kv_memory: Some(9 * PAGE_BYTES), ..Default::default() };
    let Some(mut crowded) = engine_with(options) else { return };
    let golden_prompt = golden(FIXTURE).greedy.prompt;
    // The first may reach all 128 positions; the second's 100-token prompt (7 pages) prefills 3
    // tokens a pass beside it, which crosses two pages meanwhile: one page is kept free for it.
    let decoding = SamplingParams { temperature: Some(0.0), ..Default::default() };
    let first = crowded.add(golden_prompt[..5].to_vec(), &decoding, CancelToken::default()).unwrap();
    let prompt: Vec<u32> = (0..100).map(|i| (golden_prompt[i % golden_prompt.len()] + i as u32) % 1000).collect();
    let scored = SamplingParams { max_tokens: Some(3), logprobs: Some(Logprobs::Enabled(true)), top_logprobs: Some(2), temperature: Some(0.0), ..Default::default() };
    let work = Work::Complete { prompts: vec![Prompt::Tokens(prompt.clone())], sampling: scored, echo: true };
    let echoed = crowded.add_prepared(crowded.prompter().prepare(&work, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
    // Its prefill's progress goes back where it was preempted.
    let (mut results, mut progress) = (HashMap::new(), vec![]);
    while !crowded.is_idle() {
        for (id, event) in pollster::block_on(crowded.step()).unwrap() {
            match event {
                Event::Finished(completion) => drop(results.insert(id, completion)),
                Event::Failed(error) => panic!("sequence {id} failed: {error}"),
                Event::Prefill { done, .. } if id == echoed => progress.push(done),
                _ => {}
            }
        }
    }
    assert!(progress.windows(2).any(|w| w[1] <= w[0]), "not preempted while scored: {progress:?}");
    assert!(crowded.load().preemptions > 0, "{:?}", crowded.load());
    assert_eq!(crowded.load().kv_pages_free, 9);

    let Some(mut alone) = engine(1, None) else { return };
    let id = alone.add_prepared(alone.prompter().prepare(&work, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap()[0];
    let expected = finish_all(&mut alone).remove(&id).unwrap();
    let together = results.remove(&echoed).unwrap();
    assert_eq!(together.tokens, expected.tokens);
    let scores = |c: &Completion| c.echo.as_ref().unwrap().logprobs.clone().unwrap();
    let (got, want) = (scores(&together), scores(&expected));
    assert_eq!(got.len(), prompt.len() - 1, "a score for every prompt token after the first");
    for (position, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!((a.token, a.top.iter().map(|t| t.token).collect::<Vec<_>>()), (b.token, b.top.iter().map(|t| t.token).collect()), "position {position}");
        assert!((a.logprob - b.logprob).abs() < 1e-4, "position {position}: {} alone {}", a.logprob, b.logprob);
    }
    assert!(results.contains_key(&first));
}

#[test]
fn a_shared_prefix_is_computed_once_and_changes_no_token() {
    let Some(mut engine) = engine(4, None) else { return };
    let system: Vec<u32> = golden(FIXTURE).greedy.prompt[..38].to_vec();
    let with_question = |q: u32| [system.as_slice(), &[q, q + 1, q + 2]].concat();
    let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(12), ..Default::default() };
    // The first request runs; the second joins while it is still decoding.
    let requests = vec![
        Request { prompt: with_question(500), params: params.clone(), joins_at: 0, cancel_after: None },
        Request { prompt: with_question(600), params: params.clone(), joins_at: 3, cancel_after: None },
    ];
    let together = run_together(&mut engine, &requests);
    assert_eq!(together[0].0.usage.cached_prompt_tokens, 0);
    // The system prompt's two whole pages come from the first request.
    assert_eq!(together[1].0.usage.cached_prompt_tokens as usize, 2 * PAGE_SIZE);
    assert_same_as_alone(&requests, &together, &run_alone(&requests));
}

#[test]
fn choices_of_one_request_share_its_prompt_pages_and_sample_as_seeded_requests_alone() {
    let Some(mut engine) = engine(4, None) else { return };
    let free_at_start = engine.load().kv_pages_free;
    let prompt: Vec<u32> = golden(FIXTURE).greedy.prompt[..38].to_vec();
    let params = SamplingParams { temperature: Some(0.9), top_k: Some(20), seed: Some(41), max_tokens: Some(10), ..Default::default() };
    let ids = engine.add_choices(prompt.clone(), &params, CancelToken::default(), 3).unwrap();
    let results = finish_all(&mut engine);
    // Choice i is the request with seed 41 + i alone.
    let alone: Vec<Request> = (0..3)
        .map(|i| Request { prompt: prompt.clone(), params: SamplingParams { seed: Some(41 + i), ..params.clone() }, joins_at: 0, cancel_after: None })
        .collect();
    let choices: Vec<&Completion> = ids.iter().map(|id| &results[id]).collect();
    for (i, (choice, alone)) in choices.iter().zip(run_alone(&alone)).enumerate() {
        assert_eq!(choice.tokens, alone.tokens, "choice {i}");
    }
    assert_ne!(choices[0].tokens, choices[1].tokens, "choices with different seeds should differ");
    // The prompt's two whole pages are computed once, by the first choice.
    let cached: Vec<u32> = choices.iter().map(|c| c.usage.cached_prompt_tokens).collect();
    assert_eq!(cached, [0, 2 * PAGE_SIZE as u32, 2 * PAGE_SIZE as u32]);
    assert_eq!(engine.load().kv_pages_free, free_at_start);

    for n in [0, 129] {
        let err = engine.add_choices(prompt.clone(), &params, CancelToken::default(), n).unwrap_err();
        assert_eq!(err.to_string(), format!("n = {n} choices: a request takes 1 to 128"));
    }
    assert!(engine.is_idle());
}

/// Steps the engine until it is idle; each sequence's completion.
fn finish_all(engine: &mut Engine) -> HashMap<SequenceId, Completion> {
    let mut results = HashMap::new();
    while !engine.is_idle() {
        for (id, event) in pollster::block_on(engine.step()).unwrap() {
            match event {
                Event::Finished(completion) => drop(results.insert(id, completion)),
                Event::Failed(error) => panic!("sequence {id} failed: {error}"),
                Event::Delta(_) | Event::Prefill { .. } | Event::Echo(_) => {}
            }
        }
    }
    results
}

#[test]
fn a_request_of_several_prompts_gives_each_prompt_the_choices_it_gets_alone() {
    let Some(mut engine) = engine(4, None) else { return };
    let free_at_start = engine.load().kv_pages_free;
    let golden_prompt = &golden(FIXTURE).greedy.prompt;
    let prompts = [golden_prompt[..30].to_vec(), golden_prompt[5..12].to_vec()];
    let params = SamplingParams { temperature: Some(0.9), top_k: Some(20), seed: Some(7), max_tokens: Some(6), ..Default::default() };
    let work = Work::Complete { prompts: prompts.iter().cloned().map(Prompt::Tokens).collect(), sampling: params.clone(), echo: false };
    let prepared = engine.prompter().prepare(&work, &RenderOptions::default()).unwrap();
    let ids = engine.add_prepared(prepared, CancelToken::default(), 2).unwrap();
    let results = finish_all(&mut engine);
    let choices: Vec<&Completion> = ids.iter().map(|id| &results[id]).collect();
    // Choices go prompt by prompt; each prompt's are its request alone, seeds 7 and 8.
    for (p, prompt) in prompts.iter().enumerate() {
        let alone_ids = engine.add_choices(prompt.clone(), &params, CancelToken::default(), 2).unwrap();
        let alone = finish_all(&mut engine);
        let alone: Vec<&Vec<u32>> = alone_ids.iter().map(|id| &alone[id].tokens).collect();
        assert_eq!(vec![&choices[2 * p].tokens, &choices[2 * p + 1].tokens], alone, "prompt {p}");
    }
    let usage = Completion::usage_of_choices(&choices.iter().map(|&c| c.clone()).collect::<Vec<_>>());
    assert_eq!(usage.prompt_tokens, 37, "each prompt counted once");
    assert_eq!(usage.completion_tokens, choices.iter().map(|c| c.usage.completion_tokens).sum::<u32>());
    assert_eq!(engine.load().kv_pages_free, free_at_start);

    let err = engine.add_prepared(engine.prompter().prepare(&work, &RenderOptions::default()).unwrap(), CancelToken::default(), 65).unwrap_err();
    assert_eq!(err.to_string(), "2 prompts with n = 65: a request takes at most 128 choices in all");
    let empty = Work::Complete { prompts: vec![Prompt::Tokens(prompts[0].clone()), Prompt::Tokens(vec![])], sampling: params, echo: false };
    let err = engine.add_prepared(engine.prompter().prepare(&empty, &RenderOptions::default()).unwrap(), CancelToken::default(), 1).unwrap_err();
    assert_eq!(err.to_string(), "the prompt is empty");
    assert!(engine.is_idle(), "a request with a prompt that cannot run queues none of its prompts");
}

#[test]
fn pages_all_come_back_after_many_requests_with_random_cancellations() {
    // Greedy requests draft (by prompt lookup, some from a prediction), so passes carry drafts
    // whose pages are taken and whose positions are rejected. 6 pages for 6 sequences of up to 5:
    // some give their pages back to make room, some are cancelled while they wait to run again.
    let Some(engine) = engine(6, Some(6 * PAGE_BYTES)) else { return };
    let mut engine = engine.with_prompt_lookup(true);
    let free_at_start = engine.load().kv_pages_free;
    let mut r = rng(7);
    let base = prompts(12);
    let predictions: Vec<String> = base.iter().map(|prompt| engine.tokenizer().decode(prompt, false).unwrap()).collect();
    let requests: Vec<Request> = (0..1000)
        .map(|i| Request {
            prompt: base[i % base.len()][..r.random_range(1..=base[i % base.len()].len())].to_vec(),
            params: SamplingParams {
                temperature: Some(if i % 3 == 0 { 0.8 } else { 0.0 }),
                seed: Some(i as u64),
                max_tokens: Some(r.random_range(1..if i % 4 == 3 { 30 } else { 6 })),
                prediction: (i % 5 == 2).then(|| Prediction::Content { content: predictions[(i + 1) % base.len()].clone() }),
                ..Default::default()
            },
            joins_at: i / 3,
            cancel_after: (i % 4 == 1).then(|| r.random_range(1..4)),
        })
        .collect();
    let together = run_together(&mut engine, &requests);
    for ((completion, _), request) in together.iter().zip(&requests) {
        let limit = request.params.max_tokens.unwrap_or_default() as usize;
        assert!(completion.tokens.len() <= limit.min(request.cancel_after.unwrap_or(limit)));
    }
    assert_eq!(engine.load().kv_pages_free, free_at_start);
    assert_eq!(engine.load().running, 0);
    assert!(engine.load().preemptions > 0, "{:?}", engine.load());
    let drafts = DraftUsage::sum(together.iter().map(|(c, _)| c.usage.drafts)).unwrap_or_default();
    assert!(drafts.accepted + drafts.rejected > 0, "{drafts:?}");
}

#[test]
fn the_page_allocator_keeps_its_count_through_a_thousand_admissions() {
    // The scheduler's bookkeeping alone: admissions that share prefixes, partial pages taken
    // over, pages taken one by one and released early or late.
    let mut pages = PageAllocator::new(40);
    let mut r = rng(3);
    let mut held: Vec<(Vec<u32>, usize)> = vec![];
    let prefixes: Vec<Vec<u32>> = (0..5).map(|i| (0..80).map(|t| (t * 7 + i * 1000) as u32).collect()).collect();
    for round in 0..1000 {
        if !held.is_empty() && (r.random_bool(0.5) || pages.available() < 6) {
            let (owned, reserved) = held.swap_remove(r.random_range(0..held.len()));
            pages.release(&owned, reserved);
            continue;
        }
        let tokens = &prefixes[round % 5][..r.random_range(2..80)];
        let prefix = pages.find_prefix(tokens, tokens.len() - 1);
        assert!(prefix.tokens() < tokens.len());
        let needed = (tokens.len() + 5).div_ceil(PAGE_SIZE);
        let kept_free = r.random_range(0..3);
        let available = pages.available();
        let Some(mut owned) = pages.admit(&prefix, needed, kept_free) else { continue };
        assert!(pages.available() >= kept_free, "{available} pages available before, {} after", pages.available());
        let mut reserved = needed - owned.len();
        let mut parent = 0;
        for (i, chunk) in tokens.chunks(PAGE_SIZE).enumerate() {
            if i >= owned.len() {
                owned.push(pages.take_reserved());
                reserved -= 1;
            }
            if chunk.len() == PAGE_SIZE {
                parent = pages.cache_full(owned[i], parent, chunk);
            } else {
                pages.cache_partial(owned[i], parent, chunk);
            }
        }
        // Pages taken as a sequence decodes, beyond what it reserved, while any are unpromised.
        for _ in 0..r.random_range(0..3) {
            match pages.take_unreserved() {
                Some(page) => owned.push(page),
                None => assert_eq!(pages.available(), 0),
            }
        }
        held.push((owned, reserved));
    }
    for (owned, reserved) in held.drain(..) {
        pages.release(&owned, reserved);
    }
    assert_eq!((pages.free(), pages.available()), (40, 40));
}


/// Requests with every option mixed at random (greedy and sampled with top-k/top-p/min-p,
/// penalties, logit bias, stop strings, a JSON grammar, log probabilities, predictions right and
/// wrong, a shared system prefix, cancellations), joining at random steps an engine that drafts by
/// prompt lookup and with a draft model on a pool small enough to preempt: each request's tokens,
/// text and log probabilities are those it gets alone (a cancelled one's as far as both went:
/// tokens verified in the pass that saw the cancel still come), and every page comes back.
#[test]
fn requests_mixing_every_option_on_a_small_pool_with_drafts_produce_the_tokens_of_each_alone() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(9);
    let base = prompts(12);
    let shared = golden(FIXTURE).greedy.prompt[..24].to_vec();
    let mut requests: Vec<Request> = (0..18)
        .map(|i| {
            let mut prompt = if r.random_bool(0.4) { shared.clone() } else { vec![] };
            let other = &base[r.random_range(0..base.len())];
            prompt.extend_from_slice(&other[..r.random_range(1..=other.len())]);
            let sampled = r.random_bool(0.5);
            let logprobs = r.random_bool(0.3);
            Request {
                prompt,
                params: SamplingParams {
                    temperature: Some(if sampled { 0.8 } else { 0.0 }),
                    top_k: (sampled && r.random_bool(0.3)).then_some(20),
                    top_p: (sampled && r.random_bool(0.3)).then_some(0.9),
                    min_p: (sampled && r.random_bool(0.2)).then_some(0.05),
                    frequency_penalty: r.random_bool(0.15).then_some(0.5),
                    presence_penalty: r.random_bool(0.15).then_some(0.3),
                    repetition_penalty: r.random_bool(0.15).then_some(1.2),
                    logit_bias: r.random_bool(0.15).then(|| [(r.random_range(0..1000u32).to_string(), 5.0), ("90".to_string(), -3.0)].into_iter().collect()),
                    stop: r.random_bool(0.2).then(|| Stop::Many(vec![["on", "e ", "\"", "ab"][r.random_range(0..4)].to_string(), "zz".into()])),
                    response_format: r.random_bool(0.3).then_some(ResponseFormat::JsonObject),
                    seed: Some(900 + i as u64),
                    logprobs: logprobs.then_some(Logprobs::Enabled(true)),
                    top_logprobs: logprobs.then_some(2),
                    max_tokens: r.random_bool(0.9).then(|| r.random_range(1..40)),
                    ..Default::default()
                },
                joins_at: r.random_range(0..12),
                cancel_after: r.random_bool(0.15).then(|| r.random_range(1..8)),
            }
        })
        .collect();
    let alone = run_alone(&requests);
    for (i, request) in requests.iter_mut().enumerate() {
        let predicted = r.random_bool(0.3).then(|| if r.random_bool(0.5) { i } else { r.random_range(0..alone.len()) });
        request.params.prediction = predicted.map(|j| Prediction::Content { content: alone[j].text.clone() });
    }
    let options = LoadOptions { context_length: Some(CONTEXT), max_sequences: 6, max_batch: 7, kv_memory: Some(9 * PAGE_BYTES), ..Default::default() };
    let engine = engine_of(load_model(&gpu, FIXTURE, &options).unwrap()).with_prompt_lookup(true);
    let config = llama_webgpu::load::read_hf_config(&common::fixture(FIXTURE)).unwrap();
    let draft_options = LoadOptions { max_batch: 7, ..engine.draft_load_options(&config) };
    let mut engine = engine.with_draft_model(load_model(&gpu, FIXTURE, &draft_options).unwrap()).unwrap();
    let together = run_together(&mut engine, &requests);
    let load = engine.load();
    println!("{load:?}; drafts {:?}", DraftUsage::sum(together.iter().map(|(c, _)| c.usage.drafts)));
    assert!(load.preemptions > 0, "the pool never ran out");
    assert_eq!(load.kv_pages_free, 9);
    let (mut kept_together, mut kept_alone) = (vec![], vec![]);
    for (i, ((together, text), alone)) in together.into_iter().zip(alone).enumerate() {
        assert_eq!(together.text, text, "request {i}: the deltas' text");
        if requests[i].cancel_after.is_some() {
            let n = together.tokens.len().min(alone.tokens.len());
            assert_eq!(together.tokens[..n], alone.tokens[..n], "request {i}, cancelled");
            continue;
        }
        assert_eq!((&together.tokens, &together.text, together.finish_reason), (&alone.tokens, &alone.text, alone.finish_reason), "request {i}");
        kept_together.push((together, text));
        kept_alone.push(alone);
    }
    assert_logprobs_as_alone(&kept_together, &kept_alone);
}
