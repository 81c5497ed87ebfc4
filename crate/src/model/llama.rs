//! The Llama forward pass on the GPU. Everything is allocated and bound at load; a pass writes the
//! token ids and one small uniform, encodes the ops below in order, and submits one command buffer.

use crate::gpu::ops::{self, Attention, ByTokens, Candidates, Dispatch, MatmulInput, MatmulLayout, MatmulOutput, Op, Rotary, StepParams, TopK};
use crate::gpu::{DispatchTime, Gpu, Timestamps, WeightMatrix};
use std::collections::{HashMap, VecDeque};

use crate::quant::DType;
use crate::load::{stream_weights, Destination, LoadError, LoadProgress, TensorLocation, WeightStream};
use crate::Result;

use super::{Config, KvCache, ModelError};

/// How the model is laid out on the GPU.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Positions the KV cache holds; default min(4096, max_position_embeddings).
    pub context_length: Option<usize>,
    /// The most prompt tokens one pass processes; longer prompts run in several passes. Lowered
    /// automatically so every activation buffer fits the binding limit.
    pub max_batch: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { context_length: None, max_batch: 256 }
    }
}

pub const DEFAULT_CONTEXT: usize = 4096;

/// The checkpoint tensors a model of `config` reads: name, shape, and whether it is a norm weight
/// (kept as f32, converted on the host) rather than a matrix (kept in its format on the GPU).
pub fn checkpoint_tensors(c: &Config, tied_head: bool) -> Vec<(String, Vec<usize>, bool)> {
    let matrix = |name: String, rows: usize, cols: usize| (name, vec![rows, cols], false);
    let norm = |name: String| (name, vec![c.hidden_size], true);
    let mut specs = vec![matrix("model.embed_tokens.weight".into(), c.vocab_size, c.hidden_size)];
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        specs.extend([
            norm(format!("{p}.input_layernorm.weight")),
            matrix(format!("{p}.self_attn.q_proj.weight"), c.q_dim(), c.hidden_size),
            matrix(format!("{p}.self_attn.k_proj.weight"), c.kv_dim(), c.hidden_size),
            matrix(format!("{p}.self_attn.v_proj.weight"), c.kv_dim(), c.hidden_size),
            matrix(format!("{p}.self_attn.o_proj.weight"), c.hidden_size, c.q_dim()),
            norm(format!("{p}.post_attention_layernorm.weight")),
            matrix(format!("{p}.mlp.gate_proj.weight"), c.intermediate_size, c.hidden_size),
            matrix(format!("{p}.mlp.up_proj.weight"), c.intermediate_size, c.hidden_size),
            matrix(format!("{p}.mlp.down_proj.weight"), c.hidden_size, c.intermediate_size),
        ]);
    }
    specs.push(norm("model.norm.weight".into()));
    if !tied_head {
        specs.push(matrix("lm_head.weight".into(), c.vocab_size, c.hidden_size));
    }
    specs
}

/// The matrices the forward pass multiplies by, each named, with the checkpoint tensors stacked
/// in it by rows (q/k/v and gate/up read the same input, so one dispatch computes each group), and
/// the rows its parts come in (q/k/v's output is rotated head by head).
fn stacked_tensors(c: &Config, tied_head: bool) -> Vec<(String, Vec<String>, usize)> {
    let single = |name: String| (name.clone(), vec![name], 2);
    let mut stacks = vec![single("model.embed_tokens.weight".into())];
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let t = |name: &str| format!("{p}.{name}.weight");
        stacks.extend([
            (format!("{p}.qkv_proj"), vec![t("self_attn.q_proj"), t("self_attn.k_proj"), t("self_attn.v_proj")], c.head_dim),
            single(t("self_attn.o_proj")),
            (format!("{p}.gate_up_proj"), vec![t("mlp.gate_proj"), t("mlp.up_proj")], 2),
            single(t("mlp.down_proj")),
        ]);
    }
    if !tied_head {
        stacks.push(single("lm_head.weight".into()));
    }
    stacks
}

/// Checkpoint tensors stacked by rows on the GPU, as blocks: a matrix and the output column of its
/// first row. A tensor in another format than the one before it, or whose first byte would not start
/// a 4-byte word (uploads write whole words), begins a block of its own.
struct Stacked {
    blocks: Vec<(usize, WeightMatrix)>,
}

/// Where a checkpoint tensor goes: its stack, block and first row in that block.
type Placement = (String, usize, usize);

/// Allocates the stacked matrices of `c` with each tensor in the format `dtype_of` names, and
/// returns them by name with the placement of every tensor.
fn allocate_matrices(
    gpu: &Gpu,
    c: &Config,
    tied_head: bool,
    dtype_of: impl Fn(&str) -> DType,
) -> Result<(HashMap<String, Stacked>, HashMap<String, Placement>)> {
    let shapes: HashMap<String, Vec<usize>> = checkpoint_tensors(c, tied_head).into_iter().map(|(name, shape, _)| (name, shape)).collect();
    let mut stacks = HashMap::new();
    let mut placements = HashMap::new();
    for (stack, tensors, part_rows) in stacked_tensors(c, tied_head) {
        let cols = shapes[&tensors[0]][1];
        // (first output column, format, rows) of each block
        let mut blocks: Vec<(usize, DType, usize)> = vec![];
        let mut column = 0;
        for tensor in &tensors {
            let dtype = dtype_of(tensor);
            let rows = shapes[tensor][0];
            let row_bytes = dtype.row_bytes(cols).unwrap_or_default();
            let next = blocks.len();
            match blocks.last_mut() {
                Some((_, block_dtype, block_rows)) if *block_dtype == dtype && (*block_rows * row_bytes).is_multiple_of(4) => {
                    placements.insert(tensor.clone(), (stack.clone(), next - 1, *block_rows));
                    *block_rows += rows;
                }
                _ => {
                    placements.insert(tensor.clone(), (stack.clone(), next, 0));
                    blocks.push((column, dtype, rows));
                }
            }
            column += rows;
        }
        let blocks = blocks
            .into_iter()
            .map(|(column, dtype, rows)| Ok((column, WeightMatrix::in_parts_of(gpu, &stack, dtype, rows, cols, part_rows)?)))
            .collect::<Result<_>>()?;
        stacks.insert(stack, Stacked { blocks });
    }
    Ok((stacks, placements))
}

/// Where a model's weights come from.
enum Weights<'a> {
    Stream(&'a dyn WeightStream, &'a mut dyn FnMut(LoadProgress)),
    Synthetic(DType),
}

/// Every matrix of `c` in `dtype`, filled with hashed values on the GPU; norm weights are ones.
fn synthetic_weights(gpu: &Gpu, c: &Config, dtype: DType) -> Result<(HashMap<String, Stacked>, HashMap<String, wgpu::Buffer>)> {
    let (matrices, _) = allocate_matrices(gpu, c, c.tie_word_embeddings, |_| dtype)?;
    let vectors = checkpoint_tensors(c, c.tie_word_embeddings)
        .into_iter()
        .filter(|(_, _, is_norm)| *is_norm)
        .map(|(name, shape, _)| {
            let ones = gpu.storage_buffer_with(&name, &vec![1.0f32; shape[0]]);
            (name, ones)
        })
        .collect();
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let parts = matrices.values().flat_map(|s| &s.blocks).flat_map(|(_, m)| &m.parts);
        for (seed, part) in parts.enumerate() {
            ops::fill(gpu, &part.buffer, seed as u32, ops::fill_mask(dtype)).encode(&mut pass, 1);
        }
    }
    gpu.queue.submit([encoder.finish()]);
    Ok((matrices, vectors))
}

/// Allocates every weight, streams the checkpoint into them, and returns the stacked matrices and
/// the norm weights (as f32 buffers) by name.
async fn upload_weights(
    gpu: &Gpu,
    c: &Config,
    source: &dyn WeightStream,
    on_progress: &mut dyn FnMut(LoadProgress),
) -> Result<(HashMap<String, Stacked>, HashMap<String, wgpu::Buffer>)> {
    let locations: HashMap<&str, &TensorLocation> = source.locations().iter().map(|l| (l.name.as_str(), l)).collect();
    // Tied checkpoints reuse the embedding as lm_head; some still store a copy, which then wins.
    let tied_head = c.tie_word_embeddings && !locations.contains_key("lm_head.weight");
    let mut norms = vec![];
    for (name, shape, is_norm) in checkpoint_tensors(c, tied_head) {
        let location = locations.get(name.as_str()).ok_or_else(|| LoadError::MissingTensor(name.clone()))?;
        if location.shape != shape {
            return Err(ModelError::Shape { tensor: name, expected: shape, got: location.shape.clone() }.into());
        }
        if is_norm {
            norms.push((name, location.dtype));
        }
    }
    let (matrices, placements) = allocate_matrices(gpu, c, tied_head, |name| locations[name].dtype)?;
    let mut wanted: HashMap<String, Destination> = placements
        .iter()
        .map(|(tensor, (stack, block, row))| (tensor.clone(), Destination::Matrix(&matrices[stack].blocks[*block].1, *row)))
        .collect();
    wanted.extend(norms.iter().map(|(name, _)| (name.clone(), Destination::Host)));
    let host = stream_weights(gpu, source, &wanted, on_progress).await?;
    let mut vectors = HashMap::new();
    for (name, dtype) in norms {
        let values = dtype.to_f32(&host[&name])?;
        vectors.insert(name.clone(), gpu.storage_buffer_with(&name, &values));
    }
    Ok((matrices, vectors))
}

/// The ops of one transformer block, in the order they run.
struct Layer {
    // q, k, v = rmsnorm(x) * input_layernorm @ [q_proj; k_proj; v_proj].T; q = rope(q, pos) into
    // qkv; k_cache[pos] = rope(k, pos); v_cache[pos] = v
    qkv_proj: ByTokens,
    attention: Attention,   // attn = softmax(q @ k_cache.T / sqrt(hd) + causal) @ v_cache
    o_proj: ByTokens,       // x += attn @ o_proj.T
    gate_up_proj: ByTokens, // gate_up = rmsnorm(x) * post_attention_layernorm @ [gate_proj; up_proj].T
    down_proj: ByTokens,    // x += (silu(gate) * up) @ down_proj.T
}

/// A Llama model resident on one GPU, with its KV cache.
pub struct Llama {
    gpu: Gpu,
    config: Config,
    max_batch: usize,
    max_key_splits: u32,          // of a decode pass's attention (StepParams::new)
    kv_cache: KvCache,
    tokens_processed: u64,
    step: wgpu::Buffer,           // StepParams of the pass being run
    tokens: wgpu::Buffer,         // (max_batch) token ids as f32
    x: wgpu::Buffer,              // (max_batch, hidden) residual stream
    x_last: wgpu::Buffer,         // (hidden) the last token's residual stream
    logits: wgpu::Buffer,         // (vocab) of the last token
    next_token: wgpu::Buffer,     // (1) argmax of the logits as f32, like the token ids
    candidates: wgpu::Buffer,     // top-k candidates of the logits, see ops::Candidates
    logits_readback: wgpu::Buffer,
    token_readback: [wgpu::Buffer; 2], // one per greedy pass in flight
    candidates_readback: wgpu::Buffer,
    /// Greedy passes submitted and not read yet, oldest first: (token_readback slot, submission).
    in_flight: VecDeque<(usize, wgpu::SubmissionIndex)>,
    embed: Op,
    layers: Vec<Layer>,
    lm_head: ByTokens,
    argmax: Op,
    top_k: TopK,
}

/// What a pass hands back to the host.
enum Output {
    Logits,
    /// The greedy token, into this slot of `token_readback`, and into `tokens` for a next pass.
    Argmax(usize),
    TopK,
}

/// Where a pass's input tokens come from.
enum Tokens<'a> {
    Host(&'a [u32]),
    /// The token the greedy pass before chose, left on the GPU.
    Previous,
}

impl Llama {
    /// Uploads the weights of `source` (Hugging Face tensor names) and allocates everything a pass
    /// needs.
    pub async fn load(
        gpu: &Gpu,
        config: Config,
        source: &dyn WeightStream,
        options: &LoadOptions,
        on_progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        Self::build(gpu, config, options, Weights::Stream(source, on_progress)).await
    }

    /// A model of `config`'s shapes with hashed weights in `dtype`, made on the GPU: for benchmarks,
    /// whose speed depends on shapes, not values.
    pub async fn synthetic(gpu: &Gpu, config: Config, dtype: DType, options: &LoadOptions) -> Result<Self> {
        Self::build(gpu, config, options, Weights::Synthetic(dtype)).await
    }

    async fn build(gpu: &Gpu, config: Config, options: &LoadOptions, weights: Weights<'_>) -> Result<Self> {
        gpu.check()?;
        crate::gpu::self_test(gpu).await?;
        let c = &config;
        let context = options.context_length.unwrap_or(DEFAULT_CONTEXT.min(c.max_position_embeddings));
        if context > c.max_position_embeddings || context == 0 {
            return Err(ModelError::ContextTooLong { requested: context, max: c.max_position_embeddings }.into());
        }
        let qkv_dim = c.q_dim() + 2 * c.kv_dim();
        let gate_up_dim = 2 * c.intermediate_size;
        let widest_row = 4 * c.hidden_size.max(qkv_dim).max(gate_up_dim) as u64;
        let binding = gpu.max_binding();
        let max_batch = options.max_batch.min((binding / widest_row) as usize);
        if max_batch == 0 {
            gpu.check_binding("activation row", widest_row)?;
        }
        let cos_sin = c.rope_cos_sin(context);
        gpu.check_binding("rope cos/sin table", (cos_sin.len() * 8) as u64)?;
        gpu.check_binding("logits", 4 * c.vocab_size as u64)?;

        let kv_cache = KvCache::new(gpu, c, context).await?;
        let f32_buffer = |label: &str, elements: usize| gpu.storage_buffer(label, 4 * elements as u64);
        let step = ops::step_buffer(gpu, StepParams::default());
        let one_token = ops::step_buffer(gpu, StepParams::new(1, 0, 1));
        let tokens = gpu.storage_buffer("tokens", 4 * max_batch as u64);
        let x = f32_buffer("x", max_batch * c.hidden_size);
        let qkv = f32_buffer("qkv", max_batch * qkv_dim);
        let attn = f32_buffer("attn", max_batch * c.q_dim());
        let max_key_splits = ops::max_key_splits(gpu, c.n_heads, c.head_dim, context);
        let attention_partials = gpu.storage_buffer("attention partials", ops::attention_partials_bytes(c.n_heads, c.head_dim, max_key_splits));
        let gate_up = f32_buffer("gate_up", max_batch * gate_up_dim);
        let x_last = f32_buffer("x_last", c.hidden_size);
        let logits = f32_buffer("logits", c.vocab_size);
        let next_token = gpu.storage_buffer("next token", 4);
        let cos_sin = gpu.storage_buffer_with("rope cos/sin", &cos_sin);

        let (matrices, vectors) = match weights {
            Weights::Stream(source, on_progress) => upload_weights(gpu, c, source, on_progress).await?,
            Weights::Synthetic(dtype) => synthetic_weights(gpu, c, dtype)?,
        };
        let rows = |stride: usize| MatmulLayout { in_stride: c.hidden_size, out_stride: stride, out_offset: 0, accumulate: false };
        let residual = |k: usize| MatmulLayout { in_stride: k, out_stride: c.hidden_size, out_offset: 0, accumulate: true };
        // One dispatch per part of each block of a stacked matrix.
        let project = |x: &wgpu::Buffer, input: MatmulInput, w: &Stacked, out: &wgpu::Buffer, output: MatmulOutput, layout: MatmulLayout, step: &wgpu::Buffer| {
            let block = |(column, m): &(usize, WeightMatrix)| ops::matmul(gpu, x, input, m, out, output, MatmulLayout { out_offset: *column, ..layout }, step);
            ByTokens::join(w.blocks.iter().map(block))
        };
        let norm = |name: &str| MatmulInput::RmsNorm { weight: &vectors[name], eps: c.rms_norm_eps };

        // upload_weights checked every name and shape; a one-tensor stack is one block.
        let embed_tokens = &matrices["model.embed_tokens.weight"];
        let embed = ops::embedding(gpu, &tokens, &embed_tokens.blocks[0].1, &x, &step);
        let mut layers = Vec::with_capacity(c.n_layers);
        for (i, (k_cache, v_cache)) in kv_cache.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let w = |name: &str| &matrices[&format!("{p}.{name}")];
            let ln = |name: &str| norm(&format!("{p}.{name}.weight"));
            let rotary = Rotary { cos_sin: &cos_sin, k_cache, v_cache, n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
            layers.push(Layer {
                qkv_proj: project(&x, ln("input_layernorm"), w("qkv_proj"), &qkv, MatmulOutput::Rotary(rotary), rows(qkv_dim), &step),
                attention: ops::attention(gpu, &qkv, qkv_dim, k_cache, v_cache, &attn, &attention_partials, max_key_splits, c.n_heads, c.n_kv_heads, c.head_dim, &step),
                o_proj: project(&attn, MatmulInput::Plain, w("self_attn.o_proj.weight"), &x, MatmulOutput::Rows, residual(c.q_dim()), &step),
                gate_up_proj: project(&x, ln("post_attention_layernorm"), w("gate_up_proj"), &gate_up, MatmulOutput::Rows, rows(gate_up_dim), &step),
                down_proj: project(&gate_up, MatmulInput::SiluMul, w("mlp.down_proj.weight"), &x, MatmulOutput::Rows, residual(gate_up_dim), &step),
            });
        }
        let head = matrices.get("lm_head.weight").unwrap_or(embed_tokens);
        let lm_head = project(&x_last, norm("model.norm.weight"), head, &logits, MatmulOutput::Rows, rows(c.vocab_size), &one_token);
        let argmax = ops::argmax(gpu, &logits, &next_token, c.vocab_size);
        let candidates = gpu.storage_buffer("candidates", TopK::OUT_BYTES);
        let top_k = TopK::new(gpu, &logits, &candidates, c.vocab_size);

        gpu.run(|_| {}).await?;
        Ok(Self {
            gpu: gpu.clone(),
            max_batch,
            max_key_splits,
            kv_cache,
            tokens_processed: 0,
            step,
            tokens,
            x,
            x_last,
            logits_readback: gpu.readback_buffer("logits readback", 4 * c.vocab_size as u64),
            token_readback: [0, 1].map(|_| gpu.readback_buffer("token readback", 4)),
            in_flight: VecDeque::new(),
            candidates_readback: gpu.readback_buffer("candidates readback", TopK::OUT_BYTES),
            candidates,
            top_k,
            logits,
            next_token,
            embed,
            layers,
            lm_head,
            argmax,
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Positions the KV cache holds.
    pub fn context_length(&self) -> usize {
        self.kv_cache.context
    }

    /// The most tokens one pass processes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Tokens run through the model since it was loaded (prompt and decode alike).
    pub fn tokens_processed(&self) -> u64 {
        self.tokens_processed
    }

    /// The most splits a decode step cuts its keys into (ops::max_key_splits).
    pub fn max_key_splits(&self) -> u32 {
        self.max_key_splits
    }

    /// Compute dispatches of a one-token pass at `position` that returns a greedy token (past
    /// the first keys of a split, attention merges its splits in one more per layer).
    pub fn dispatches_per_token(&self, position: usize) -> usize {
        let (blocks, head) = self.plan(&self.step_params(1, position), &Output::Argmax(0));
        blocks.len() + head.len()
    }

    fn step_params(&self, n_tokens: usize, start_pos: usize) -> StepParams {
        StepParams::new(n_tokens as u32, start_pos as u32, self.max_key_splits)
    }

    /// Runs a greedy pass of `tokens` at positions start_pos.. (one token: a decode step; more: a
    /// prefill) with every dispatch timed on the GPU; needs a device made with
    /// [`crate::GpuOptions::timestamps`] on an adapter that has them. Bytes are a one-token pass's.
    pub async fn profile_greedy(&mut self, tokens: &[u32], start_pos: usize) -> Result<(u32, Vec<DispatchTime>)> {
        let passes = tokens.len().div_ceil(self.max_batch).max(1);
        // A one-token pass at the last position has the most dispatches.
        let mut timer = Timestamps::new(&self.gpu, self.dispatches_per_token(start_pos + tokens.len()) * passes)?;
        self.submit_argmax(Tokens::Host(tokens), start_pos, Some(&mut timer))?;
        let next = self.read_greedy().await?;
        Ok((next, timer.read(&self.gpu, start_pos + tokens.len().saturating_sub(1)).await?))
    }

    /// Runs `tokens` at positions start_pos.. (filling the KV cache there) and returns the logits of
    /// the last one. A prompt and a single decode token take the same path.
    pub async fn forward(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>> {
        self.submit(tokens, start_pos, Output::Logits)?;
        let bytes = self.gpu.read_mapped(&self.logits_readback, 4 * self.config.vocab_size as u64).await?;
        let logits: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NonFiniteLogits.into());
        }
        Ok(logits)
    }

    /// Like [`Llama::forward`], but returns only the id of the largest logit, chosen on the GPU.
    pub async fn forward_greedy(&mut self, tokens: &[u32], start_pos: usize) -> Result<u32> {
        self.submit_greedy(tokens, start_pos)?;
        self.read_greedy().await
    }

    /// The host half of [`Llama::forward_greedy`]: checks, encodes and submits the pass without
    /// waiting for the GPU; [`Llama::read_greedy`] then waits for its token.
    pub fn submit_greedy(&mut self, tokens: &[u32], start_pos: usize) -> Result<()> {
        self.submit_argmax(Tokens::Host(tokens), start_pos, None)
    }

    /// Submits a one-token greedy pass at `position` whose input is the token of the greedy pass in
    /// flight, which never leaves the GPU: the host encodes this step while the GPU still runs the
    /// last, and reads each token a step late. Needs exactly one unread greedy pass.
    pub fn submit_greedy_next(&mut self, position: usize) -> Result<()> {
        if self.in_flight.len() != 1 {
            return Err(ModelError::GreedyChain { in_flight: self.in_flight.len() }.into());
        }
        self.submit_argmax(Tokens::Previous, position, None)
    }

    fn submit_argmax(&mut self, tokens: Tokens, start_pos: usize, timer: Option<&mut Timestamps>) -> Result<()> {
        let slot = self.in_flight.back().map_or(0, |(slot, _)| 1 - slot);
        let submission = self.submit_timed(tokens, start_pos, Output::Argmax(slot), timer)?;
        self.in_flight.push_back((slot, submission));
        Ok(())
    }

    /// The token of the oldest greedy pass submitted and not read yet; waits for that pass only.
    pub async fn read_greedy(&mut self) -> Result<u32> {
        let (slot, submission) = self.in_flight.pop_front().ok_or(ModelError::GreedyChain { in_flight: 0 })?;
        let bytes = self.gpu.read_mapped_after(&self.token_readback[slot], 4, submission).await?;
        let token = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if !(0.0..self.config.vocab_size as f32).contains(&token) {
            return Err(ModelError::NonFiniteLogits.into());
        }
        Ok(token as u32)
    }

    /// Like [`Llama::forward`], but returns the `k` (at most [`ops::MAX_TOP_K`]) largest logits and
    /// the softmax normaliser at `temperature`, chosen on the GPU.
    pub async fn forward_top_k(&mut self, tokens: &[u32], start_pos: usize, k: usize, temperature: f32) -> Result<Candidates> {
        self.top_k.set(&self.gpu, k, temperature);
        self.submit(tokens, start_pos, Output::TopK)?;
        let bytes = self.gpu.read_mapped(&self.candidates_readback, TopK::OUT_BYTES).await?;
        let candidates = Candidates::from_words(&bytemuck::pod_collect_to_vec(&bytes), k);
        if !candidates.max.is_finite() || !candidates.exp_sum.is_finite() {
            return Err(ModelError::NonFiniteLogits.into());
        }
        Ok(candidates)
    }

    /// The logits of the last position of the latest pass, read back without recomputing them.
    pub async fn last_logits(&self) -> Result<Vec<f32>> {
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.logits, 0, &self.logits_readback, 0, None);
        self.gpu.queue.submit([encoder.finish()]);
        let bytes = self.gpu.read_mapped(&self.logits_readback, 4 * self.config.vocab_size as u64).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Greedy continuation of `prompt` from position 0: `n` new tokens, each step submitted before
    /// the token of the one before is read.
    pub async fn generate_greedy(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        self.submit_greedy(prompt, 0)?;
        for i in 0..n {
            if i + 1 < n {
                self.submit_greedy_next(prompt.len() + i)?;
            }
            out.push(self.read_greedy().await?);
        }
        Ok(out)
    }

    /// Encodes and submits a pass over `tokens`; the caller reads back what `output` names.
    fn submit(&mut self, tokens: &[u32], start_pos: usize, output: Output) -> Result<()> {
        self.submit_timed(Tokens::Host(tokens), start_pos, output, None).map(|_| ())
    }

    /// Encodes and submits a pass, each dispatch timed when `timer` is given; returns the
    /// submission of its last command buffer. Tokens from the host drop the greedy passes still
    /// unread: the pass no longer follows them.
    fn submit_timed(&mut self, tokens: Tokens, start_pos: usize, output: Output, mut timer: Option<&mut Timestamps>) -> Result<wgpu::SubmissionIndex> {
        self.gpu.check()?;
        if let Tokens::Host(_) = tokens {
            self.in_flight.clear();
        }
        let c = &self.config;
        // Chunks of at most max_batch host tokens, or the one token the GPU holds.
        let chunks: Vec<Option<&[u32]>> = match tokens {
            Tokens::Host(tokens) => {
                if tokens.is_empty() {
                    return Err(ModelError::EmptyInput.into());
                }
                if let Some(&token) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                    return Err(ModelError::TokenOutOfRange { token, vocab: c.vocab_size }.into());
                }
                tokens.chunks(self.max_batch).map(Some).collect()
            }
            Tokens::Previous => vec![None],
        };
        let n_tokens = chunks.iter().map(|chunk| chunk.map_or(1, <[u32]>::len)).sum::<usize>();
        let needed = start_pos + n_tokens;
        if needed > self.kv_cache.context {
            return Err(ModelError::ContextFull { start_pos, n_tokens, needed, context: self.kv_cache.context }.into());
        }
        self.tokens_processed += n_tokens as u64;
        let n_chunks = chunks.len();
        let mut submission = None;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let n = chunk.map_or(1, <[u32]>::len) as u32;
            let step = self.step_params(n as usize, start_pos + i * self.max_batch);
            self.gpu.queue.write_buffer(&self.step, 0, bytemuck::bytes_of(&step));
            if let Some(chunk) = chunk {
                let ids: Vec<f32> = chunk.iter().map(|&t| t as f32).collect();
                self.gpu.queue.write_buffer(&self.tokens, 0, bytemuck::cast_slice(&ids));
            }
            let last = i + 1 == n_chunks;
            let (blocks, head) = self.plan(&step, &output);
            let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
            encode(&mut encoder, &blocks, n, timer.as_deref_mut())?;
            if last {
                let row_bytes = 4 * c.hidden_size as u64;
                encoder.copy_buffer_to_buffer(&self.x, (n as u64 - 1) * row_bytes, &self.x_last, 0, row_bytes);
                encode(&mut encoder, &head, 1, timer.as_deref_mut())?;
                let (from, to) = match output {
                    Output::Logits => (&self.logits, &self.logits_readback),
                    Output::Argmax(slot) => {
                        // The input of a next pass that takes the token from the GPU.
                        encoder.copy_buffer_to_buffer(&self.next_token, 0, &self.tokens, 0, 4);
                        (&self.next_token, &self.token_readback[slot])
                    }
                    Output::TopK => (&self.candidates, &self.candidates_readback),
                };
                encoder.copy_buffer_to_buffer(from, 0, to, 0, None);
                if let Some(timer) = timer.as_deref() {
                    timer.resolve(&mut encoder);
                }
            }
            submission = Some(self.gpu.queue.submit([encoder.finish()]));
        }
        // At least one chunk ran.
        submission.ok_or_else(|| ModelError::EmptyInput.into())
    }

    /// The dispatches of a pass of `step`, in order, each named by what it computes: the
    /// blocks, then the head, which runs on the last token's row (copied to x_last in between).
    /// Encoding, the dispatch count and the profile all read this one list.
    fn plan(&self, step: &StepParams, output: &Output) -> (Vec<Named<'_>>, Vec<Named<'_>>) {
        let n = step.n_tokens;
        fn add<'a>(list: &mut Vec<Named<'a>>, name: &'static str, op: &'a Op) {
            list.extend(op.dispatches().iter().map(|d| (name, d)));
        }
        let mut blocks = vec![];
        add(&mut blocks, "embed", &self.embed);
        for l in &self.layers {
            add(&mut blocks, "qkv_proj", l.qkv_proj.for_tokens(n));
            add(&mut blocks, "attention", l.attention.for_step(step));
            add(&mut blocks, "o_proj", l.o_proj.for_tokens(n));
            add(&mut blocks, "gate_up_proj", l.gate_up_proj.for_tokens(n));
            add(&mut blocks, "down_proj", l.down_proj.for_tokens(n));
        }
        let mut head = vec![];
        add(&mut head, "lm_head", self.lm_head.for_tokens(1)); // logits = rmsnorm(x_last) * norm @ lm_head.T
        match output {
            Output::Logits => {}
            Output::Argmax(_) => add(&mut head, "argmax", &self.argmax), // next_token = argmax(logits)
            Output::TopK => add(&mut head, "top_k", self.top_k.op()), // candidates = top_k(logits)
        }
        (blocks, head)
    }
}

/// A dispatch and the name of what it computes.
type Named<'a> = (&'static str, &'a Dispatch);

/// Encodes `dispatches` for `n` tokens: in one compute pass, or each in a timed pass of its own.
fn encode(encoder: &mut wgpu::CommandEncoder, dispatches: &[Named], n: u32, timer: Option<&mut Timestamps>) -> Result<()> {
    match timer {
        None => {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for (_, d) in dispatches {
                d.encode(&mut pass, n);
            }
        }
        Some(timer) => {
            for (name, d) in dispatches {
                timer.encode(encoder, name, d, n)?;
            }
        }
    }
    Ok(())
}
