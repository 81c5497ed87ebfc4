//! The Llama forward pass on the GPU. Everything is allocated and bound at load; a pass writes the
//! token ids and one small uniform, encodes the ops below in order, and submits one command buffer.

use crate::gpu::ops::{self, Attention, AttentionHeads, AttentionPartials, ByTokens, Candidates, Dispatch, MatmulInput, MatmulLayout, InputFormat, MatmulOutput, Op, PreparedInputs, Product, Rotary, Selection, StepParams, TokenSlot, TopK, MAX_BATCH_TOKENS};
use crate::gpu::{DispatchTime, Gpu, Timestamps, WeightMatrix};
use std::collections::{HashMap, VecDeque};

use crate::quant::DType;
use crate::load::{stream_weights, Destination, LoadError, LoadProgress, TensorLocation, WeightStream};
use crate::Result;

use super::{Config, KvPool, ModelError, PAGE_SIZE};

/// The most tokens a pass holds while its sequences draft (speculative decoding): below
/// DECODE_MAX_TOKENS, so attention stays one query per workgroup as in a plain decode step (the
/// same sums, so the same tokens), and within one workgroup of GEMV columns (each weight read once).
pub const MAX_DRAFT_PASS_TOKENS: usize = ops::DECODE_MAX_TOKENS as usize - 1;
/// Rows of logits kept for drafted tokens: those of a lone sequence's token and its drafts.
pub const MAX_DRAFTS: usize = MAX_DRAFT_PASS_TOKENS - 1;

/// How the model is laid out on the GPU.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Positions one sequence may reach; default the model's max_position_embeddings, or less
    /// where one KV pool buffer or the device's memory holds less (said in the log).
    pub context_length: Option<usize>,
    /// The most tokens one pass processes (at most MAX_BATCH_TOKENS); longer prompts run in
    /// several passes. Lowered automatically so every activation buffer fits the binding limit.
    pub max_batch: usize,
    /// The most sequences run together (slots of the page table, logits rows of a pass).
    pub max_sequences: usize,
    /// Memory for rows of logits beyond one per sequence, which the positions of prompts being
    /// scored take (a completion's `echo` with `logprobs`): each row lets a pass score one more.
    pub scoring_memory: u64,
    /// Bytes of the KV pool; default: `kv_contexts` full contexts, as many pages as one buffer
    /// binds where that is less, halved while the device's memory cannot hold it.
    pub kv_memory: Option<u64>,
    /// Full contexts the default KV pool aims at; default one per sequence.
    pub kv_contexts: Option<usize>,
    /// The format matrices stored as f32, f16 or bf16 (a checkpoint's) take on the GPU, re-encoded
    /// as they stream in, a chunk at a time: the bytes `convert` would write. Matrices already in a
    /// block format stay as they are. None: every matrix as stored.
    pub quant: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { context_length: None, max_batch: MAX_BATCH_TOKENS, max_sequences: 1, scoring_memory: 0, kv_memory: None, kv_contexts: None, quant: None }
    }
}

/// A checkpoint tensor a model reads.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// A norm weight (kept as f32, converted on the host) rather than a matrix (kept in its
    /// format on the GPU).
    pub is_norm: bool,
}

/// The checkpoint tensors a model of `config` reads.
pub fn checkpoint_tensors(c: &Config, tied_head: bool) -> Vec<CheckpointTensor> {
    let matrix = |name: String, rows: usize, cols: usize| CheckpointTensor { name, shape: vec![rows, cols], is_norm: false };
    let norm = |name: String| CheckpointTensor { name, shape: vec![c.hidden_size], is_norm: true };
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

/// A matrix the forward pass multiplies by: checkpoint tensors stacked by rows (q/k/v and gate/up
/// read the same input, so one dispatch computes each group).
struct Stack {
    name: String,
    tensors: Vec<String>,
    /// The rows its parts come in (q/k/v's output is rotated head by head).
    part_rows: usize,
}

/// The stacks of a model of `c`.
fn stacks_of(c: &Config, tied_head: bool) -> Vec<Stack> {
    let stack = |name: String, tensors: Vec<String>, part_rows: usize| Stack { name, tensors, part_rows };
    let single = |name: String| stack(name.clone(), vec![name], 2);
    let mut stacks = vec![single("model.embed_tokens.weight".into())];
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let t = |name: &str| format!("{p}.{name}.weight");
        stacks.extend([
            stack(format!("{p}.qkv_proj"), vec![t("self_attn.q_proj"), t("self_attn.k_proj"), t("self_attn.v_proj")], c.head_dim),
            single(t("self_attn.o_proj")),
            stack(format!("{p}.gate_up_proj"), vec![t("mlp.gate_proj"), t("mlp.up_proj")], 2),
            single(t("mlp.down_proj")),
        ]);
    }
    if !tied_head {
        stacks.push(single("lm_head.weight".into()));
    }
    stacks
}

/// A stack on the GPU, as blocks. A tensor in another format than the one before it, or whose first
/// byte would not start a 4-byte word (uploads write whole words), begins a block of its own.
struct Stacked {
    blocks: Vec<Block>,
}

/// Rows of a stack in one format, in one matrix.
struct Block {
    /// The stack's output column of the block's first row.
    first_column: usize,
    matrix: WeightMatrix,
}

/// Where a checkpoint tensor goes.
struct Placement {
    stack: String,
    block: usize,
    first_row: usize,
}

/// Allocates the stacked matrices of `c` with each tensor in the format `dtype_of` names, and
/// returns them by name with the placement of every tensor.
fn allocate_matrices(
    gpu: &Gpu,
    c: &Config,
    tied_head: bool,
    dtype_of: impl Fn(&str) -> DType,
) -> Result<(HashMap<String, Stacked>, HashMap<String, Placement>)> {
    let shapes: HashMap<String, Vec<usize>> = checkpoint_tensors(c, tied_head).into_iter().map(|t| (t.name, t.shape)).collect();
    let mut stacks = HashMap::new();
    let mut placements = HashMap::new();
    for Stack { name: stack, tensors, part_rows } in stacks_of(c, tied_head) {
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
                    placements.insert(tensor.clone(), Placement { stack: stack.clone(), block: next - 1, first_row: *block_rows });
                    *block_rows += rows;
                }
                _ => {
                    placements.insert(tensor.clone(), Placement { stack: stack.clone(), block: next, first_row: 0 });
                    blocks.push((column, dtype, rows));
                }
            }
            column += rows;
        }
        let blocks = blocks
            .into_iter()
            .map(|(first_column, dtype, rows)| Ok(Block { first_column, matrix: WeightMatrix::in_parts_of(gpu, &stack, dtype, rows, cols, part_rows)? }))
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
        .filter(|t| t.is_norm)
        .map(|t| {
            let ones = gpu.storage_buffer_with(&t.name, &vec![1.0f32; t.shape[0]]);
            (t.name, ones)
        })
        .collect();
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let parts = matrices.values().flat_map(|s| &s.blocks).flat_map(|b| &b.matrix.parts);
        for (seed, part) in parts.enumerate() {
            // The rows only: a grid format's grid follows them.
            ops::fill(gpu, &part.buffer, part.rows_bytes, seed as u32, ops::fill_mask(dtype)).encode(&mut pass, 1);
        }
    }
    gpu.queue.submit([encoder.finish()]);
    Ok((matrices, vectors))
}

/// The format a matrix stored in `stored` takes on the GPU when loads re-encode into `quant`
/// ([`LoadOptions::quant`]).
fn loaded_dtype(stored: DType, quant: Option<DType>) -> DType {
    match quant {
        Some(quant) if !stored.is_block_format() => quant,
        _ => stored,
    }
}

/// Allocates every weight, streams the checkpoint into them, and returns the stacked matrices and
/// the norm weights (as f32 buffers) by name.
async fn upload_weights(
    gpu: &Gpu,
    c: &Config,
    source: &dyn WeightStream,
    quant: Option<DType>,
    on_progress: &mut dyn FnMut(LoadProgress),
) -> Result<(HashMap<String, Stacked>, HashMap<String, wgpu::Buffer>)> {
    let locations: HashMap<&str, &TensorLocation> = source.locations().iter().map(|l| (l.name.as_str(), l)).collect();
    // Tied checkpoints reuse the embedding as lm_head; some still store a copy, which then wins.
    let tied_head = c.tie_word_embeddings && !locations.contains_key("lm_head.weight");
    let mut norms = vec![];
    for CheckpointTensor { name, shape, is_norm } in checkpoint_tensors(c, tied_head) {
        let location = locations.get(name.as_str()).ok_or_else(|| LoadError::MissingTensor(name.clone()))?;
        if location.shape != shape {
            return Err(ModelError::Shape { tensor: name, expected: shape, got: location.shape.clone() }.into());
        }
        if is_norm {
            norms.push((name, location.dtype));
        }
    }
    let (matrices, placements) = allocate_matrices(gpu, c, tied_head, |name| loaded_dtype(locations[name].dtype, quant))?;
    let mut wanted: HashMap<String, Destination> = placements
        .iter()
        .map(|(tensor, p)| (tensor.clone(), Destination::Matrix(&matrices[&p.stack].blocks[p.block].matrix, p.first_row)))
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
    // qkv; k_pool[kv_row] = rope(k, pos); v_pool[kv_row] = v
    qkv_proj: ByTokens,
    kv_store: Option<Op>,   // k_pool[kv_row], v_pool[kv_row] = staged k, v (KvPool::staged)
    attention: Attention,   // attn = softmax(q @ k_pages.T / sqrt(hd) + causal) @ v_pages
    o_proj: ByTokens,       // x += attn @ o_proj.T
    gate_up_proj: ByTokens, // gate_up = rmsnorm(x) * post_attention_layernorm @ [gate_proj; up_proj].T
    down_proj: ByTokens,    // x += (silu(gate) * up) @ down_proj.T
}

/// The tokens of one pass, each with its slot (position, KV row, sequence), and the token rows
/// whose logits the pass computes (one per sequence that samples its next token), in the order
/// their results come back.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub slots: Vec<TokenSlot>,
    pub outputs: Vec<u32>,
    /// Per output row, what top-k selects; empty: no selection.
    pub top_k: Vec<Selection>,
}

impl Batch {
    /// `n` tokens of the one sequence of slot 0 at positions start_pos.., its KV rows the positions
    /// (the identity page table); the last token's logits computed when `output`.
    fn lone(start_pos: usize, n: usize, output: bool) -> Self {
        let slots = (start_pos..start_pos + n).map(|p| TokenSlot::lone(p as u32)).collect();
        Self { slots, outputs: if output { vec![n as u32 - 1] } else { vec![] }, top_k: vec![] }
    }
}

/// Where a pass's input token ids come from.
#[derive(Clone, Copy, Debug)]
pub enum PassTokens<'a> {
    Host(&'a [u32]),
    /// The argmax of each output row of the pass before, in order; they never leave the GPU.
    Previous,
}

/// What a pass hands back: the argmax of every output row, and the top-k candidates of each when
/// the batch asked for them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassOutput {
    pub argmax: Vec<u32>,
    pub candidates: Vec<Candidates>,
}

/// A pass submitted and not read yet.
struct InFlight {
    readback: usize,
    outputs: usize,
    /// What each output row selects; empty: no selection.
    top_k: Vec<Selection>,
    submission: wgpu::SubmissionIndex,
}

/// A Llama model resident on one GPU: its weights and the ops bound to them, the paged KV pool
/// every sequence shares, and the buffers of one pass. A pass runs any mix of sequences (prefill
/// chunks and decode tokens) that [`Batch`] describes; the page tables are the caller's
/// ([`Llama::write_page_table`]). The lone-sequence methods (`forward`, `forward_greedy`, ...)
/// run sequence slot 0 over the identity page table.
pub struct Llama {
    gpu: Gpu,
    config: Config,
    context: usize,
    max_batch: usize,
    max_outputs: usize,
    max_key_splits: u32,          // of a decode pass's attention (StepParams::for_slots)
    kv_pool: KvPool,
    /// Whether slot 0's page table row is the identity the lone-sequence methods use.
    identity_pages: bool,
    tokens_processed: u64,
    step: wgpu::Buffer,           // StepParams of the pass being run
    outputs_step: wgpu::Buffer,   // StepParams whose n_tokens is the pass's output rows
    tokens: wgpu::Buffer,         // (max_batch) token ids as f32
    x: wgpu::Buffer,              // (max_batch, hidden) residual stream
    x_out: wgpu::Buffer,          // (max_outputs, hidden) the output rows' residual streams
    logits: wgpu::Buffer,         // (max_outputs, vocab)
    next_tokens: wgpu::Buffer,    // (max_outputs) argmax of each logits row as f32, like the token ids
    candidates: wgpu::Buffer,     // (max_outputs) top-k candidates of each logits row, see ops::Candidates
    logits_readback: wgpu::Buffer,
    token_readback: [wgpu::Buffer; 2], // one per pass in flight
    candidates_readback: [wgpu::Buffer; 2],
    /// Passes with outputs submitted and not read yet, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Output rows of the latest pass, which a pass of PassTokens::Previous takes as tokens.
    last_outputs: usize,
    embed: Op,
    layers: Vec<Layer>,
    lm_head: ByTokens,
    argmax: Op,
    top_k: TopK,
}

/// What a load aims at, from the config, the options and the device's limits alone: the errors a
/// load can know before it allocates, checked the same way for [`Llama::load`] and for
/// [`super::MemoryEstimate`] (which runs before a download).
pub(super) struct LoadPlan {
    /// The context asked for, or the model's as far as the cos/sin table binds and a pool of
    /// `--kv-memory` holds; a load of a pool sized by the memory left may shorten it further.
    pub context: usize,
    pub pool: PoolSize,
}

/// The KV pool's pages.
#[derive(Clone, Copy, Debug)]
pub(super) enum PoolSize {
    /// `--kv-memory` of them.
    Exactly(usize),
    /// A context per sequence (or `kv_contexts` of them), halved while the memory the weights
    /// left cannot hold them, down to `least` (one context when its length was asked for).
    AtMost { pages: usize, least: usize },
}

/// The KV pool while the weights upload: made already, or the bounds of the largest one the
/// memory they leave holds.
enum PoolDuringUpload {
    Made(KvPool),
    Later { pages: usize, least: usize },
}

impl LoadPlan {
    pub fn new(gpu: &Gpu, c: &Config, options: &LoadOptions) -> Result<Self> {
        if let Some(context) = options.context_length.filter(|&n| n > c.max_position_embeddings || n == 0) {
            return Err(ModelError::ContextTooLong { requested: context, max: c.max_position_embeddings }.into());
        }
        if !gpu.kv_type.fits(c.kv_dim()) {
            return Err(ModelError::KvTypeUnfit { kv_type: gpu.kv_type.name(), kv_dim: c.kv_dim() }.into());
        }
        KvPool::pages_per_buffer(gpu, c)?;
        let context = options.context_length.unwrap_or_else(|| Llama::default_context(gpu, c));
        gpu.check_binding("rope cos/sin table", context as u64 * rope_table_bytes_per_position(c))?;
        let context_pages = context.div_ceil(PAGE_SIZE);
        Ok(match options.kv_memory {
            Some(bytes) => {
                let page_bytes = KvPool::bytes_per_page(c, gpu.kv_type);
                let pages = (bytes / page_bytes) as usize;
                if pages == 0 {
                    return Err(ModelError::KvPoolTooSmall { bytes, page_bytes }.into());
                }
                // No longer than the pool, unless asked for.
                let context = if options.context_length.is_some() { context } else { context.min(pages * PAGE_SIZE) };
                Self { context, pool: PoolSize::Exactly(pages) }
            }
            None => {
                let pages = options.kv_contexts.unwrap_or(options.max_sequences).max(1) * context_pages;
                let least = if options.context_length.is_some() { context_pages } else { 1 };
                Self { context, pool: PoolSize::AtMost { pages, least } }
            }
        })
    }
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

    /// The context a load aims at unless told otherwise: the model's whole context (Llama 3.1's
    /// 131,072), as far as the cos/sin table binds (the KV pool spans buffers as it needs).
    pub fn default_context(gpu: &Gpu, config: &Config) -> usize {
        let bindable = (gpu.max_binding() / rope_table_bytes_per_position(config)) as usize;
        config.max_position_embeddings.min(bindable).max(1)
    }

    async fn build(gpu: &Gpu, config: Config, options: &LoadOptions, weights: Weights<'_>) -> Result<Self> {
        gpu.check()?;
        let c = &config;
        let plan = LoadPlan::new(gpu, c, options)?;
        crate::gpu::self_test(gpu).await?;
        // Below, the default context is shortened as far as the KV pool the memory holds.
        let wanted_context = plan.context;
        let qkv_dim = c.q_dim() + 2 * c.kv_dim();
        let gate_up_dim = 2 * c.intermediate_size;
        let widest_row = 4 * c.hidden_size.max(qkv_dim).max(gate_up_dim) as u64;
        let binding = gpu.max_binding();
        let max_batch = options.max_batch.min(MAX_BATCH_TOKENS).min((binding / widest_row) as usize);
        if max_batch == 0 {
            gpu.check_binding("activation row", widest_row)?;
        }
        let sequences = options.max_sequences.max(1);
        let logits_row = 4 * c.vocab_size as u64;
        let rows_fitting = sequences.min(max_batch).min((binding / logits_row) as usize);
        if rows_fitting < sequences {
            let what = if sequences > max_batch { "one pass of the batch size" } else { "the logits buffer under the binding limit" };
            return Err(ModelError::TooManySequences { sequences, what, max: rows_fitting }.into());
        }
        let scoring_rows = (options.scoring_memory / logits_row) as usize;
        let max_outputs = (sequences + MAX_DRAFTS + scoring_rows).min(max_batch).min((binding / logits_row) as usize);
        gpu.check_binding("logits", 4 * c.vocab_size as u64)?;

        // A pool of a given size is made first, so that one the device cannot hold fails before
        // the weights upload; the largest pool that fits is sought once they are in.
        let pages_per_sequence = wanted_context.div_ceil(PAGE_SIZE);
        let pool = match plan.pool {
            PoolSize::Exactly(pages) => PoolDuringUpload::Made(KvPool::new(gpu, c, pages, pages_per_sequence, sequences).await?),
            PoolSize::AtMost { pages, least } => PoolDuringUpload::Later { pages, least },
        };
        let f32_buffer = |label: &str, elements: usize| gpu.storage_buffer(label, 4 * elements as u64);
        let step = ops::step_buffer(gpu, StepParams::default());
        let outputs_step = ops::step_buffer(gpu, StepParams::default());
        let tokens = gpu.storage_buffer("tokens", 4 * max_batch as u64);
        let x = f32_buffer("x", max_batch * c.hidden_size);
        let qkv = f32_buffer("qkv", max_batch * qkv_dim);
        let attn = f32_buffer("attn", max_batch * c.q_dim());
        let gate_up = f32_buffer("gate_up", max_batch * gate_up_dim);
        let x_out = f32_buffer("x_out", max_outputs * c.hidden_size);
        let logits = f32_buffer("logits", max_outputs * c.vocab_size);
        let next_tokens = f32_buffer("next tokens", max_outputs);

        let (matrices, vectors) = match weights {
            Weights::Stream(source, on_progress) => upload_weights(gpu, c, source, options.quant, on_progress).await?,
            Weights::Synthetic(dtype) => synthetic_weights(gpu, c, dtype)?,
        };
        let kv_pool = match pool {
            PoolDuringUpload::Made(pool) => pool,
            PoolDuringUpload::Later { pages, least } => KvPool::largest(gpu, c, pages, least, pages_per_sequence, sequences).await?,
        };
        let context = match options.context_length {
            Some(context) => context,
            None => wanted_context.min(kv_pool.pages * PAGE_SIZE),
        };
        if context < wanted_context {
            log::warn!("context {context} positions, not the model's {wanted_context}: the GPU's memory holds a KV pool of {} pages", kv_pool.pages);
        }
        // A pool of several buffers merges each token's attention over them through partials,
        // which bound the tokens of a pass.
        let buffers = kv_pool.buffers();
        let heads = AttentionHeads { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let max_key_splits = ops::max_key_splits(gpu, heads, context, buffers);
        let max_batch = if buffers > 1 { max_batch.min(ops::max_attention_tokens(gpu, heads, buffers)) } else { max_batch };
        if max_batch < sequences.max(1) {
            return Err(ModelError::TooManySequences { sequences, what: "one pass over a KV pool of several buffers", max: max_batch }.into());
        }
        let attention_partials = AttentionPartials::new(gpu, heads, max_key_splits, buffers, max_batch);
        // Keys and values on their way to a staged pool (KvPool::staged), a row per token.
        let staging = kv_pool.staged().then(|| [f32_buffer("k staging", max_batch * c.kv_dim()), f32_buffer("v staging", max_batch * c.kv_dim())]);
        let cos_sin = gpu.storage_buffer_with("rope cos/sin", &c.rope_cos_sin(context));
        let rows = |stride: usize| MatmulLayout { in_stride: c.hidden_size, out_stride: stride, out_offset: 0, accumulate: false };
        let residual = |k: usize| MatmulLayout { in_stride: k, out_stride: c.hidden_size, out_offset: 0, accumulate: true };
        // Matmuls on prepared inputs (q8: GpuOptions::q8_activations; f16: the tiles on
        // cooperative matrices): one scratch buffer that each stack's prepare op fills right
        // before its matmul reads it.
        let widest_input = c.hidden_size.max(c.q_dim()).max(c.intermediate_size);
        let prepared = InputFormat::for_gpu(gpu).map(|format| PreparedInputs::new(gpu, format, max_batch, widest_input));
        // One dispatch per part of each block of a stacked matrix (and the stack's prepare op).
        let project = |x: &wgpu::Buffer, input: MatmulInput, w: &Stacked, out: &wgpu::Buffer, output: MatmulOutput, layout: MatmulLayout, step: &wgpu::Buffer| {
            let prepared = prepared.as_ref().filter(|p| p.format() == InputFormat::F16 || w.blocks.iter().any(|b| ops::reads_q8_inputs(b.matrix.dtype)));
            let block = |b: &Block| ops::matmul(gpu, Product { x, input, w: &b.matrix, out, output, layout: MatmulLayout { out_offset: b.first_column, ..layout }, step, prepared });
            let product = ByTokens::join(w.blocks.iter().map(block));
            match prepared {
                Some(prepared) => product.after(prepared, ops::prepare_input(gpu, x, input, w.blocks[0].matrix.cols, layout.in_stride, prepared, step)),
                None => product,
            }
        };
        let norm = |name: &str| MatmulInput::RmsNorm { weight: &vectors[name], eps: c.rms_norm_eps };

        // upload_weights checked every name and shape; a one-tensor stack is one block.
        let embed_tokens = &matrices["model.embed_tokens.weight"];
        let embed = ops::embedding(gpu, &tokens, &embed_tokens.blocks[0].matrix, &x, &step);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = format!("model.layers.{i}");
            let w = |name: &str| &matrices[&format!("{p}.{name}")];
            let ln = |name: &str| norm(&format!("{p}.{name}.weight"));
            let kv = kv_pool.layer(i);
            let (k_cache, v_cache) = match &staging {
                Some([k, v]) => (k, v),
                None => (&kv.buffers[0].0, &kv.buffers[0].1),
            };
            let rotary = Rotary { cos_sin: &cos_sin, k_cache, v_cache, staged: staging.is_some(), heads };
            layers.push(Layer {
                qkv_proj: project(&x, ln("input_layernorm"), w("qkv_proj"), &qkv, MatmulOutput::Rotary(rotary), rows(qkv_dim), &step),
                kv_store: staging.as_ref().map(|[k, v]| ops::kv_store(gpu, k, v, kv, c.kv_dim(), &step)),
                attention: ops::attention(gpu, heads, &qkv, qkv_dim, kv, &attn, &attention_partials, &step),
                o_proj: project(&attn, MatmulInput::Plain, w("self_attn.o_proj.weight"), &x, MatmulOutput::Rows, residual(c.q_dim()), &step),
                gate_up_proj: project(&x, ln("post_attention_layernorm"), w("gate_up_proj"), &gate_up, MatmulOutput::Rows, rows(gate_up_dim), &step),
                down_proj: project(&gate_up, MatmulInput::SiluMul, w("mlp.down_proj.weight"), &x, MatmulOutput::Rows, residual(gate_up_dim), &step),
            });
        }
        let head = matrices.get("lm_head.weight").unwrap_or(embed_tokens);
        let lm_head = project(&x_out, norm("model.norm.weight"), head, &logits, MatmulOutput::Rows, rows(c.vocab_size), &outputs_step);
        let argmax = ops::argmax(gpu, &logits, &next_tokens, c.vocab_size, max_outputs);
        let candidates = gpu.storage_buffer("candidates", max_outputs as u64 * TopK::OUT_BYTES);
        let top_k = TopK::new(gpu, &logits, &candidates, c.vocab_size, max_outputs);

        gpu.run(|_| {}).await?;
        let mut model = Self {
            gpu: gpu.clone(),
            context,
            max_batch,
            max_outputs,
            max_key_splits,
            kv_pool,
            identity_pages: false,
            tokens_processed: 0,
            step,
            outputs_step,
            tokens,
            x,
            x_out,
            // Only sampled rows are read whole: one a sequence at most.
            // A pass samples a row per sequence and one per drafted token.
            logits_readback: gpu.readback_buffer("logits readback", (sequences + MAX_DRAFTS).min(max_outputs) as u64 * logits_row),
            token_readback: [0, 1].map(|_| gpu.readback_buffer("token readback", 4 * max_outputs as u64)),
            candidates_readback: [0, 1].map(|_| gpu.readback_buffer("candidates readback", max_outputs as u64 * TopK::OUT_BYTES)),
            in_flight: VecDeque::new(),
            last_outputs: 0,
            candidates,
            top_k,
            logits,
            next_tokens,
            embed,
            layers,
            lm_head,
            argmax,
            config,
        };
        model.use_identity_pages();
        Ok(model)
    }

    /// The device the model lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Positions one sequence may reach.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The most tokens one pass processes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The most sequences a pass samples from, and page table slots.
    pub fn max_sequences(&self) -> usize {
        self.kv_pool.sequences
    }

    /// Rows of logits a pass computes at most: a sampled row per sequence, rows for drafted
    /// tokens ([`MAX_DRAFTS`]), and scored prompt positions in the rows left
    /// ([`LoadOptions::scoring_memory`]).
    pub fn max_outputs(&self) -> usize {
        self.max_outputs
    }

    pub fn kv_pool(&self) -> &KvPool {
        &self.kv_pool
    }

    /// Tokens run through the model since it was loaded (prompt and decode alike).
    pub fn tokens_processed(&self) -> u64 {
        self.tokens_processed
    }

    /// The most splits a decode step cuts its keys into (ops::max_key_splits).
    pub fn max_key_splits(&self) -> u32 {
        self.max_key_splits
    }

    /// Writes `pages` into sequence slot `sequence`'s page table from its page `first` on; passes
    /// submitted after it read them.
    pub fn write_page_table(&mut self, sequence: usize, first: usize, pages: &[u32]) {
        self.identity_pages &= sequence != 0;
        self.kv_pool.write_page_table(&self.gpu, sequence, first, pages);
    }

    /// Slot 0's page table as the lone-sequence methods read it: page i of the pool for page i
    /// of the sequence, as far as the pool goes.
    fn use_identity_pages(&mut self) {
        if !self.identity_pages {
            let pages = self.kv_pool.pages.min(self.kv_pool.pages_per_sequence) as u32;
            self.kv_pool.write_page_table(&self.gpu, 0, 0, &(0..pages).collect::<Vec<u32>>());
            self.identity_pages = true;
        }
    }

    /// Positions the lone-sequence methods can fill: the context, or less where the pool is smaller.
    fn lone_context(&self) -> usize {
        self.context.min(self.kv_pool.pages * PAGE_SIZE)
    }

    /// Compute dispatches of a one-token pass at `position` that returns a greedy token (past
    /// the first keys of a split, attention merges its splits in one more per layer).
    pub fn dispatches_per_token(&self, position: usize) -> usize {
        self.dispatches_of(&StepParams::new(1, position as u32, self.max_key_splits))
    }

    /// Compute dispatches of a greedy pass of `step`.
    fn dispatches_of(&self, step: &StepParams) -> usize {
        let (blocks, head) = self.plan(step, 1, false);
        blocks.len() + head.len()
    }

    /// Runs a greedy pass of `tokens` at positions start_pos.. (one token: a decode step; more: a
    /// prefill) with every dispatch timed on the GPU; needs a device made with
    /// [`crate::GpuOptions::timestamps`] on an adapter that has them. Bytes are a one-token pass's.
    pub async fn profile_greedy(&mut self, tokens: &[u32], start_pos: usize) -> Result<(u32, Vec<DispatchTime>)> {
        let passes = tokens.len().div_ceil(self.max_batch).max(1);
        // The most dispatches a pass has: a one-token pass at the last position (attention's key
        // splits merged), or a pass of many tokens (inputs prepared for the tiles).
        let widest = StepParams::new(tokens.len().min(self.max_batch) as u32, start_pos as u32, self.max_key_splits);
        let most = self.dispatches_per_token(start_pos + tokens.len()).max(self.dispatches_of(&widest));
        let mut timer = Timestamps::new(&self.gpu, most * passes)?;
        self.submit_lone(PassTokens::Host(tokens), start_pos, &[], Some(&mut timer))?;
        let next = self.read_greedy().await?;
        Ok((next, timer.read(&self.gpu, start_pos + tokens.len().saturating_sub(1)).await?))
    }

    /// Runs `tokens` at positions start_pos.. (filling the KV pool there) and returns the logits of
    /// the last one. A prompt and a single decode token take the same path.
    pub async fn forward(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>> {
        self.submit_lone(PassTokens::Host(tokens), start_pos, &[], None)?;
        self.read_pass().await?;
        self.read_logits(0).await
    }

    /// Like [`Llama::forward`], but returns only the id of the largest logit, chosen on the GPU.
    pub async fn forward_greedy(&mut self, tokens: &[u32], start_pos: usize) -> Result<u32> {
        self.submit_greedy(tokens, start_pos)?;
        self.read_greedy().await
    }

    /// The host half of [`Llama::forward_greedy`]: checks, encodes and submits the pass without
    /// waiting for the GPU; [`Llama::read_greedy`] then waits for its token.
    pub fn submit_greedy(&mut self, tokens: &[u32], start_pos: usize) -> Result<()> {
        self.submit_lone(PassTokens::Host(tokens), start_pos, &[], None)
    }

    /// Submits a one-token greedy pass at `position` whose input is the token of the greedy pass in
    /// flight, which never leaves the GPU: the host encodes this step while the GPU still runs the
    /// last, and reads each token a step late. Needs exactly one unread greedy pass.
    pub fn submit_greedy_next(&mut self, position: usize) -> Result<()> {
        if self.in_flight.len() != 1 {
            return Err(ModelError::GreedyChain { in_flight: self.in_flight.len() }.into());
        }
        self.submit_lone(PassTokens::Previous, position, &[], None)
    }

    /// The token of the oldest greedy pass submitted and not read yet; waits for that pass only.
    pub async fn read_greedy(&mut self) -> Result<u32> {
        Ok(self.read_pass().await?.argmax[0])
    }

    /// Like [`Llama::forward`], but returns the candidates `selection` asks for (at most
    /// [`ops::MAX_TOP_K`] largest logits) and the softmax normalisers, chosen on the GPU.
    pub async fn forward_top_k(&mut self, tokens: &[u32], start_pos: usize, selection: Selection) -> Result<Candidates> {
        self.submit_lone(PassTokens::Host(tokens), start_pos, &[selection], None)?;
        let mut output = self.read_pass().await?;
        Ok(output.candidates.remove(0))
    }

    /// The logits of output row `row` of the latest pass, read back without recomputing them.
    pub async fn read_logits(&self, row: usize) -> Result<Vec<f32>> {
        Ok(self.read_logits_rows(&[row]).await?.remove(0))
    }

    /// The logits of output rows `rows` of the latest pass, in one copy and one wait for the GPU.
    pub async fn read_logits_rows(&self, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let most = (self.max_sequences() + MAX_DRAFTS).min(self.max_outputs);
        assert!(rows.len() <= most && rows.iter().all(|&r| r < self.max_outputs), "{rows:?}: rows of logits read whole, at most {most}");
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let bytes = 4 * self.config.vocab_size as u64;
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        for (i, &row) in rows.iter().enumerate() {
            encoder.copy_buffer_to_buffer(&self.logits, row as u64 * bytes, &self.logits_readback, i as u64 * bytes, bytes);
        }
        self.gpu.queue.submit([encoder.finish()]);
        let read = self.gpu.read_mapped(&self.logits_readback, rows.len() as u64 * bytes).await?;
        let logits: Vec<Vec<f32>> = read.chunks_exact(bytes as usize).map(bytemuck::pod_collect_to_vec).collect();
        if logits.iter().flatten().any(|v| !v.is_finite()) {
            return Err(ModelError::NonFiniteLogits.into());
        }
        Ok(logits)
    }

    /// The logits of the last position of the latest lone-sequence pass.
    pub async fn last_logits(&self) -> Result<Vec<f32>> {
        self.read_logits(0).await
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

    /// Submits the passes of slot 0's tokens at positions start_pos.. in chunks of max_batch, the
    /// last one computing its last token's logits (and top-k candidates when `top_k` is given).
    /// Tokens from the host drop the passes still unread: the pass no longer follows them.
    fn submit_lone(&mut self, tokens: PassTokens, start_pos: usize, top_k: &[Selection], mut timer: Option<&mut Timestamps>) -> Result<()> {
        let n = match tokens {
            PassTokens::Host(tokens) => tokens.len(),
            PassTokens::Previous => 1,
        };
        if n == 0 {
            return Err(ModelError::EmptyInput.into());
        }
        let context = self.lone_context();
        if start_pos + n > context {
            return Err(ModelError::ContextFull { start_pos, n_tokens: n, needed: start_pos + n, context }.into());
        }
        if let PassTokens::Host(_) = tokens {
            self.in_flight.clear();
        }
        self.use_identity_pages();
        let chunks: Vec<PassTokens> = match tokens {
            PassTokens::Host(tokens) => tokens.chunks(self.max_batch).map(PassTokens::Host).collect(),
            PassTokens::Previous => vec![PassTokens::Previous],
        };
        let n_chunks = chunks.len();
        let mut position = start_pos;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let len = match chunk {
                PassTokens::Host(tokens) => tokens.len(),
                PassTokens::Previous => 1,
            };
            let last = i + 1 == n_chunks;
            let mut batch = Batch::lone(position, len, last);
            if last {
                batch.top_k = top_k.to_vec();
            }
            self.submit_timed(&batch, chunk, timer.as_deref_mut())?;
            position += len;
        }
        Ok(())
    }

    /// Checks, encodes and submits one pass of `batch` without waiting for the GPU; a pass with
    /// outputs is then read with [`Llama::read_pass`] (passes are read in order, at most two
    /// unread). The pages its tokens' KV rows and attention read must be in the page tables.
    pub fn submit(&mut self, batch: &Batch, tokens: PassTokens) -> Result<()> {
        if self.in_flight.len() >= 2 {
            return Err(ModelError::GreedyChain { in_flight: self.in_flight.len() }.into());
        }
        self.submit_timed(batch, tokens, None)
    }

    fn submit_timed(&mut self, batch: &Batch, tokens: PassTokens, mut timer: Option<&mut Timestamps>) -> Result<()> {
        self.gpu.check()?;
        let c = &self.config;
        let n = batch.slots.len();
        let outputs = batch.outputs.len();
        if n == 0 {
            return Err(ModelError::EmptyInput.into());
        }
        if n > self.max_batch || outputs > self.max_outputs {
            return Err(ModelError::BatchTooLarge { tokens: n, outputs, max_tokens: self.max_batch, max_outputs: self.max_outputs }.into());
        }
        match tokens {
            PassTokens::Host(ids) => {
                if ids.len() != n {
                    return Err(ModelError::ChainMismatch { tokens: n, outputs: ids.len() }.into());
                }
                if let Some(&token) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
                    return Err(ModelError::TokenOutOfRange { token, vocab: c.vocab_size }.into());
                }
                if let Some(token) = batch.top_k.iter().filter_map(|s| s.scored_token).find(|&t| t as usize >= c.vocab_size) {
                    return Err(ModelError::TokenOutOfRange { token, vocab: c.vocab_size }.into());
                }
                let ids: Vec<f32> = ids.iter().map(|&t| t as f32).collect();
                self.gpu.queue.write_buffer(&self.tokens, 0, bytemuck::cast_slice(&ids));
            }
            PassTokens::Previous if self.last_outputs != n => {
                return Err(ModelError::ChainMismatch { tokens: n, outputs: self.last_outputs }.into());
            }
            PassTokens::Previous => {}
        }
        let top_k = !batch.top_k.is_empty();
        if top_k {
            self.top_k.set(&self.gpu, &batch.top_k);
        }
        let step = StepParams::for_slots(&batch.slots, self.max_key_splits);
        self.gpu.queue.write_buffer(&self.step, 0, step.bytes());
        if outputs > 0 {
            let outputs_step = StepParams { n_tokens: outputs as u32, ..Default::default() };
            self.gpu.queue.write_buffer(&self.outputs_step, 0, outputs_step.bytes());
        }
        self.tokens_processed += n as u64;

        let (blocks, head) = self.plan(&step, outputs as u32, top_k);
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        encode(&mut encoder, &blocks, n as u32, timer.as_deref_mut())?;
        let readback = self.in_flight.back().map_or(0, |pass| 1 - pass.readback);
        if outputs > 0 {
            let row_bytes = 4 * c.hidden_size as u64;
            for (i, &row) in batch.outputs.iter().enumerate() {
                encoder.copy_buffer_to_buffer(&self.x, row as u64 * row_bytes, &self.x_out, i as u64 * row_bytes, row_bytes);
            }
            encode(&mut encoder, &head, outputs as u32, timer.as_deref_mut())?;
            // The input of a next pass that takes its tokens from the GPU.
            let token_bytes = 4 * outputs as u64;
            encoder.copy_buffer_to_buffer(&self.next_tokens, 0, &self.tokens, 0, token_bytes);
            encoder.copy_buffer_to_buffer(&self.next_tokens, 0, &self.token_readback[readback], 0, token_bytes);
            if top_k {
                encoder.copy_buffer_to_buffer(&self.candidates, 0, &self.candidates_readback[readback], 0, outputs as u64 * TopK::OUT_BYTES);
            }
        }
        if let Some(timer) = timer.as_deref().filter(|_| outputs > 0) {
            timer.resolve(&mut encoder);
        }
        let submission = self.gpu.queue.submit([encoder.finish()]);
        if outputs > 0 {
            self.in_flight.push_back(InFlight { readback, outputs, top_k: batch.top_k.clone(), submission });
        }
        self.last_outputs = outputs;
        Ok(())
    }

    /// Forgets the passes submitted and not read (after a failure, whose passes are not read).
    pub fn forget_passes(&mut self) {
        self.in_flight.clear();
    }

    /// The results of the oldest pass with outputs submitted and not read yet; waits for that
    /// pass only.
    pub async fn read_pass(&mut self) -> Result<PassOutput> {
        let pass = self.in_flight.pop_front().ok_or(ModelError::GreedyChain { in_flight: 0 })?;
        let bytes = self.gpu.read_mapped_after(&self.token_readback[pass.readback], 4 * pass.outputs as u64, pass.submission.clone()).await?;
        let vocab = self.config.vocab_size as f32;
        let argmax = bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)
            .into_iter()
            .map(|token| if (0.0..vocab).contains(&token) { Ok(token as u32) } else { Err(ModelError::NonFiniteLogits) })
            .collect::<std::result::Result<Vec<u32>, ModelError>>()?;
        let mut candidates = vec![];
        if !pass.top_k.is_empty() {
            let row_words = (TopK::OUT_BYTES / 4) as usize;
            let bytes = self.gpu.read_mapped_after(&self.candidates_readback[pass.readback], pass.outputs as u64 * TopK::OUT_BYTES, pass.submission).await?;
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
            for (row, selection) in words.chunks(row_words).zip(&pass.top_k) {
                let row_candidates = Candidates::from_words(row, selection);
                if !row_candidates.is_finite() {
                    return Err(ModelError::NonFiniteLogits.into());
                }
                candidates.push(row_candidates);
            }
        }
        Ok(PassOutput { argmax, candidates })
    }

    /// The dispatches of a pass of `step`, in order, each named by what it computes: the
    /// blocks, then the head, which runs on the `outputs` rows (copied to x_out in between).
    /// Encoding, the dispatch count and the profile all read this one list.
    fn plan(&self, step: &StepParams, outputs: u32, top_k: bool) -> (Vec<Named<'_>>, Vec<Named<'_>>) {
        let n = step.n_tokens;
        fn add<'a>(list: &mut Vec<Named<'a>>, name: &'static str, op: &'a Op) {
            list.extend(op.dispatches().iter().map(|d| (name, d)));
        }
        // A product's input preparation (quantize or to_f16) is named on its own.
        fn add_product<'a>(list: &mut Vec<Named<'a>>, name: &'static str, product: &'a ByTokens, n_tokens: u32) {
            if let Some((entry, prepare)) = product.prepare_for(n_tokens) {
                add(list, entry, prepare);
            }
            add(list, name, product.for_tokens(n_tokens));
        }
        let mut blocks = vec![];
        add(&mut blocks, "embed", &self.embed);
        for l in &self.layers {
            add_product(&mut blocks, "qkv_proj", &l.qkv_proj, n);
            if let Some(kv_store) = &l.kv_store {
                add(&mut blocks, "kv_store", kv_store);
            }
            add(&mut blocks, "attention", l.attention.for_step(step));
            add_product(&mut blocks, "o_proj", &l.o_proj, n);
            add_product(&mut blocks, "gate_up_proj", &l.gate_up_proj, n);
            add_product(&mut blocks, "down_proj", &l.down_proj, n);
        }
        let mut head = vec![];
        if outputs > 0 {
            add_product(&mut head, "lm_head", &self.lm_head, outputs); // logits = rmsnorm(x_out) * norm @ lm_head.T
            add(&mut head, "argmax", &self.argmax); // next_tokens = argmax(logits, dim=-1)
            if top_k {
                add(&mut head, "top_k", self.top_k.op()); // candidates = top_k(logits) per row
            }
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

/// The rotary table's bytes per position: a cos and a sin per frequency pair, f32.
pub(super) fn rope_table_bytes_per_position(config: &Config) -> u64 {
    4 * config.head_dim as u64
}
