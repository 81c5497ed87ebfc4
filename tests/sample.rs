//! The sampler: seeded reproducibility, exact supports for top-k / top-p / min-p, the distribution
//! temperature gives, penalties and bias, and option validation.

use llama_webgpu::api::SamplingParams;
use llama_webgpu::sample::{SampleError, Sampler, SamplerOptions};

const DRAWS: usize = 40_000;

fn options(f: impl FnOnce(&mut SamplerOptions)) -> SamplerOptions {
    let mut o = SamplerOptions::default();
    f(&mut o);
    o
}

/// Empirical frequencies of each token over DRAWS samples.
fn frequencies(options: SamplerOptions, logits: &[f32]) -> Vec<f64> {
    let mut sampler = Sampler::new(options, 42, &[]);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..DRAWS {
        counts[sampler.sample(logits) as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
}

fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature as f64).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|v| v / total).collect()
}

fn assert_distribution(what: &str, got: &[f64], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // Four standard deviations of a binomial proportion, plus exact zeros where want is zero.
        let tolerance = 4.0 * (w * (1.0 - w) / DRAWS as f64).sqrt() + 1e-9;
        assert!((g - w).abs() <= tolerance, "{what}: token {i} drawn {g:.4}, expected {w:.4}");
        if *w == 0.0 {
            assert_eq!(*g, 0.0, "{what}: token {i} is outside the support but was drawn");
        }
    }
}

/// Logits whose probabilities (at temperature 1) are 0.4, 0.25, 0.15, 0.1, 0.06, 0.04.
fn logits() -> Vec<f32> {
    [0.4f32, 0.25, 0.15, 0.1, 0.06, 0.04].iter().map(|p| p.ln()).collect()
}

fn renormalised(probs: &[f64], keep: &[usize]) -> Vec<f64> {
    let total: f64 = keep.iter().map(|&i| probs[i]).sum();
    (0..probs.len()).map(|i| if keep.contains(&i) { probs[i] / total } else { 0.0 }).collect()
}

#[test]
fn temperature_one_samples_the_softmax() {
    assert_distribution("t=1", &frequencies(options(|_| {}), &logits()), &softmax(&logits(), 1.0));
}

#[test]
fn temperature_reshapes_the_distribution() {
    for t in [0.5, 1.7] {
        let got = frequencies(options(|o| o.temperature = t), &logits());
        assert_distribution(&format!("t={t}"), &got, &softmax(&logits(), t));
    }
}

#[test]
fn top_k_keeps_exactly_the_k_largest() {
    let got = frequencies(options(|o| o.top_k = 3), &logits());
    assert_distribution("top_k=3", &got, &renormalised(&softmax(&logits(), 1.0), &[0, 1, 2]));
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p() {
    // 0.4 + 0.25 = 0.65 < 0.7 <= 0.8: three tokens.
    let got = frequencies(options(|o| o.top_p = 0.7), &logits());
    assert_distribution("top_p=0.7", &got, &renormalised(&softmax(&logits(), 1.0), &[0, 1, 2]));
    let got = frequencies(options(|o| o.top_p = 0.3), &logits());
    assert_distribution("top_p=0.3", &got, &renormalised(&softmax(&logits(), 1.0), &[0]));
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_best() {
    // 0.25 * 0.4 = 0.1: tokens with p >= 0.1 stay.
    let got = frequencies(options(|o| o.min_p = 0.25), &logits());
    assert_distribution("min_p=0.25", &got, &renormalised(&softmax(&logits(), 1.0), &[0, 1, 2, 3]));
}

#[test]
fn filters_combine() {
    let got = frequencies(options(|o| {
        o.top_k = 4;
        o.top_p = 0.95;
        o.min_p = 0.3;
    }), &logits());
    assert_distribution("combined", &got, &renormalised(&softmax(&logits(), 1.0), &[0, 1, 2]));
}

#[test]
fn same_seed_same_tokens() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 200.0).collect();
    let run = |seed| {
        let mut s = Sampler::new(options(|o| o.top_p = 0.9), seed, &[]);
        (0..64).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    // The stream itself is fixed: a change here changes every seeded result users have recorded.
    assert_eq!(&run(7)[..8], &[667, 951, 556, 593, 976, 879, 247, 410]);
}

#[test]
fn greedy_takes_the_first_largest() {
    let mut s = Sampler::new(options(|o| o.temperature = 0.0), 1, &[]);
    assert_eq!(s.sample(&[1.0, 3.0, 2.0, 3.0]), 1);
    assert!(s.options().is_plain_greedy());
}

#[test]
fn bias_and_penalties_move_the_choice() {
    let greedy = |f: fn(&mut SamplerOptions), prompt: &[u32], output: &[u32], logits: &[f32]| {
        let mut s = Sampler::new(options(|o| {
            o.temperature = 0.0;
            f(o)
        }), 1, prompt);
        output.iter().for_each(|&t| s.accept(t));
        s.sample(logits)
    };
    let logits = [2.0, 1.9, -1.0];
    assert_eq!(greedy(|_| {}, &[], &[], &logits), 0);
    assert_eq!(greedy(|o| o.logit_bias = vec![(2, 5.0)], &[], &[], &logits), 2);
    // 2.0 / 1.1 = 1.82 < 1.9
    assert_eq!(greedy(|o| o.repetition_penalty = 1.1, &[0], &[], &logits), 1);
    assert_eq!(greedy(|o| o.frequency_penalty = 0.06, &[], &[0, 0], &logits), 1);
    assert_eq!(greedy(|o| o.presence_penalty = 0.2, &[], &[0], &logits), 1);
    // Penalties of output tokens do not touch prompt tokens.
    assert_eq!(greedy(|o| o.presence_penalty = 0.2, &[0], &[], &logits), 0);
}

#[test]
fn options_are_validated() {
    let bad = |p: SamplingParams| SamplerOptions::from_params(&p, 100).unwrap_err();
    assert_eq!(bad(SamplingParams { temperature: Some(-1.0), ..Default::default() }).to_string(), "temperature must be in [0, 2], got -1");
    assert!(matches!(bad(SamplingParams { top_p: Some(0.0), ..Default::default() }), SampleError::OutOfRange { name: "top_p", .. }));
    assert!(matches!(bad(SamplingParams { min_p: Some(f32::NAN), ..Default::default() }), SampleError::OutOfRange { name: "min_p", .. }));
    let bias = |k: &str| SamplingParams { logit_bias: Some([(k.to_string(), 1.0)].into()), ..Default::default() };
    assert_eq!(bad(bias("x")), SampleError::BadBiasKey("x".into()));
    assert_eq!(bad(bias("100")), SampleError::BiasTokenOutOfRange { token: 100, vocab: 100 });
    let ok = SamplerOptions::from_params(&SamplingParams { top_k: Some(5), logit_bias: Some([("7".to_string(), -100.0)].into()), ..Default::default() }, 100).unwrap();
    assert_eq!((ok.top_k, ok.logit_bias), (5, vec![(7, -100.0)]));
}

/// Candidates as the GPU's top_k kernel returns them (its CPU reference).
fn candidates(logits: &[f32], k: usize, temperature: f32) -> llama_webgpu::gpu::ops::Candidates {
    let (tokens, max, exp_sum) = llama_webgpu::reference::top_k(logits, k, temperature);
    let (_, _, softmax_sum) = llama_webgpu::reference::top_k(logits, 1, 1.0);
    llama_webgpu::gpu::ops::Candidates { tokens, max, exp_sum, softmax_sum, scored_logit: None }
}

#[test]
fn gpu_candidates_give_the_same_tokens_as_full_logits() {
    // A long-tailed distribution over 5000 tokens: the head holds most of the mass.
    let logits: Vec<f32> = (0..5000).map(|i| 8.0 - (i as f32).sqrt() * 0.9 + ((i * 37) % 11) as f32 * 0.01).collect();
    let cases: [fn(&mut SamplerOptions); 4] = [
        |o| o.top_k = 5,
        |o| o.top_k = 64,
        |o| o.top_p = 0.6,
        |o| {
            o.min_p = 0.05;
            o.temperature = 0.8
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let o = options(case);
        let k = Sampler::new(o.clone(), 0, &[]).candidates_wanted().expect("candidates apply");
        let (mut full, mut partial) = (Sampler::new(o.clone(), 3, &[]), Sampler::new(o.clone(), 3, &[]));
        for _ in 0..200 {
            let want = full.sample(&logits);
            let got = partial.sample_candidates(&candidates(&logits, k, o.temperature)).expect("enough candidates");
            assert_eq!(got, want, "case {i}");
        }
    }
}

#[test]
fn too_few_candidates_fall_back_to_the_full_logits() {
    let flat = vec![0.0f32; 1000];
    let mut s = Sampler::new(options(|o| o.top_p = 0.9), 1, &[]);
    assert_eq!(s.candidates_wanted(), Some(64));
    assert_eq!(s.sample_candidates(&candidates(&flat, 64, 1.0)), None);
    let mut s = Sampler::new(options(|o| o.min_p = 0.5), 1, &[]);
    assert_eq!(s.sample_candidates(&candidates(&flat, 64, 1.0)), None);
    // Bias and penalties need every logit.
    assert_eq!(Sampler::new(options(|o| { o.top_k = 5; o.presence_penalty = 0.5 }), 1, &[]).candidates_wanted(), None);
    assert_eq!(Sampler::new(options(|_| {}), 1, &[]).candidates_wanted(), None);
}
