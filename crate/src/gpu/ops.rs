//! Ops: a kernel bound to its buffers once, at load, and encoded per forward pass with the token
//! count of that pass. Each `*Params` struct mirrors the `Params` struct of its WGSL file.

use bytemuck::{Pod, Zeroable};

use super::kernels::{self, CoopTile, Kernel, KvType, ModuleForm, RegisterTile, TileType};
use super::{Gpu, WeightMatrix};
use crate::quant::DType;

/// The most tokens one pass holds (the WGSL files' MAX_BATCH_TOKENS): the step uniform has a slot
/// for each (8 KiB). As llama.cpp's default micro-batch: a 512-token prompt is one pass, whose
/// products make twice the prefill tiles of a 256-token one to fill a large GPU with.
pub const MAX_BATCH_TOKENS: usize = 512;

/// Where one token of a pass belongs: its position in its sequence (RoPE, the causal mask), the
/// pool row its keys and values are written to, and its sequence's row of the page table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TokenSlot {
    pub position: u32,
    pub kv_row: u32,
    pub sequence: u32,
    pub _pad: u32,
}

/// Per-pass values every token-wise kernel reads: the number of tokens, how attention splits the
/// keys (see [`StepParams::for_slots`]) and each token's slot. Only the first n_tokens slots are
/// written per pass ([`StepParams::bytes`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct StepParams {
    pub n_tokens: u32,
    pub keys_per_split: u32,
    pub key_splits: u32,
    pub _pad: u32,
    pub slots: [TokenSlot; MAX_BATCH_TOKENS],
}

impl TokenSlot {
    /// Position `position` of the one sequence of slot 0, kept at pool row `position` (the
    /// page table that maps page i to page i).
    pub fn lone(position: u32) -> Self {
        Self { position, kv_row: position, sequence: 0, _pad: 0 }
    }
}

impl Default for StepParams {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

impl StepParams {
    /// A pass of `n_tokens` of one sequence (slot 0) at positions start_pos.., its KV rows the
    /// positions themselves (a page table that maps page i to page i).
    pub fn new(n_tokens: u32, start_pos: u32, max_key_splits: u32) -> Self {
        let slots: Vec<TokenSlot> = (start_pos..start_pos + n_tokens).map(TokenSlot::lone).collect();
        Self::for_slots(&slots, max_key_splits)
    }

    /// A pass of the tokens `slots` describe (at most MAX_BATCH_TOKENS). A decode pass (fewer than
    /// DECODE_MAX_TOKENS tokens) cuts the keys of its longest sequence into splits of a multiple of
    /// MIN_SPLIT_KEYS, attended in parallel and merged after: SHORT_CONTEXT_SPLITS of them, or
    /// past that many times LONG_SPLIT_KEYS keys one per LONG_SPLIT_KEYS, up to `max_key_splits`. A
    /// prefill pass has query blocks enough to fill the GPU, so one.
    pub fn for_slots(slots: &[TokenSlot], max_key_splits: u32) -> Self {
        assert!(slots.len() <= MAX_BATCH_TOKENS, "{} tokens in one pass", slots.len());
        let n_tokens = slots.len() as u32;
        let context = slots.iter().map(|s| s.position + 1).max().unwrap_or(1);
        let keys_per_split = if n_tokens < DECODE_MAX_TOKENS {
            let splits = (context / LONG_SPLIT_KEYS).max(SHORT_CONTEXT_SPLITS).min(max_key_splits).max(1);
            context.div_ceil(splits).next_multiple_of(MIN_SPLIT_KEYS)
        } else {
            context
        };
        let mut step = Self { n_tokens, keys_per_split, key_splits: context.div_ceil(keys_per_split), ..Default::default() };
        step.slots[..slots.len()].copy_from_slice(slots);
        step
    }

    /// The bytes a pass writes to the step uniform: the header and its tokens' slots.
    pub fn bytes(&self) -> &[u8] {
        let used = 16 + std::mem::size_of::<TokenSlot>() * self.n_tokens as usize;
        &bytemuck::bytes_of(self)[..used]
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct MatmulParams {
    pub k: u32,
    pub rows: u32,
    pub row_start: u32,
    pub in_stride: u32,
    pub out_stride: u32,
    pub accumulate: u32,
    pub eps: f32,
    pub head_dim: u32,
    pub q_dim: u32,
    pub kv_dim: u32,
    pub kv_staged: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct QuantizeParams {
    pub k: u32,
    pub in_stride: u32,
    pub eps: f32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionParams {
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub scale: f32,
    pub q_stride: u32,
    pub stats_offset: u32,
    pub counters_offset: u32,
    pub pages_per_sequence: u32,
    pub buffers: u32,
    pub buffer: u32,
    pub first_page: u32,
    pub buffer_pages: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct KvStoreParams {
    pub kv_dim: u32,
    pub first_row: u32,
    pub rows: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ArgmaxParams {
    pub n: u32,
    pub partials: u32,
    pub _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct TopKParams {
    pub n: u32,
    pub partials: u32,
    pub _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct FillParams {
    pub words: u32,
    pub seed: u32,
    pub mask: u32,
    pub _pad: u32,
}

/// The bits fill.wgsl keeps of each hashed word for weights of `dtype`. f32 and bf16: the
/// exponent's top and fifth bits cleared, |value| < 2^-7. f16 and the blocks' f16 scales: the top
/// three, |scale| < 2^-11, so that even q6_k's weights (scale x int8 x 32) stay below 2 and a
/// random model's activations stay well inside f16's range, like a real model's.
pub fn fill_mask(dtype: DType) -> u32 {
    match dtype {
        DType::F32 | DType::BF16 => 0xbbff_bbff,
        _ => 0x8fff_8fff,
    }
}

/// Fills the first `bytes` of `buffer` (a whole number of words) with the hashed words of
/// fill.wgsl, masked by `mask`.
pub fn fill(gpu: &Gpu, buffer: &wgpu::Buffer, bytes: u64, seed: u32, mask: u32) -> Op {
    let words = (bytes / 4) as u32;
    let params = gpu.uniform_buffer("fill params", &FillParams { words, seed, mask, _pad: 0 });
    let groups = words.div_ceil(WG_1D).max(1);
    let x = groups.min(gpu.limits.max_compute_workgroups_per_dimension);
    let grid = Grid::Fixed([x, groups.div_ceil(x), 1]);
    Op { dispatches: vec![dispatch(gpu, &kernels::FILL, "main", &[], &[buffer, &params], grid, Traffic::fixed(bytes))] }
}

/// The most candidates top_k.wgsl selects.
pub const MAX_TOP_K: usize = 64;

/// The largest head_dim the attention kernel holds.
pub const MAX_HEAD_DIM: usize = 256;
/// Below this many tokens attention runs one query per workgroup, its keys split; from it on, in
/// blocks of queries.
pub const DECODE_MAX_TOKENS: u32 = 8;
/// Tokens per workgroup of a GEMV over several tokens (MAX_GEMV_COLUMNS in the kernels): each
/// weight is loaded and decoded once for all of them, as llama.cpp's mul_mat_vec takes up to 8 columns.
pub const GEMV_COLUMNS: u32 = 8;
/// The most tokens a pass runs its matmuls as GEMVs with (the default of
/// [`GpuOptions::gemv_max_tokens`]); more run as tiles. A GEMV pass reads and decodes the weights
/// once per GEMV_COLUMNS tokens; a tile computes 64 tokens whatever the pass holds. On lavapipe
/// (SmolLM2, bench/NOTES.md) GEMVs beat tiles up to 32 tokens (9.2 against 8.4 tok/s) and lose at
/// 64 (8.8 against 14.9); on a GPU the tiles are bound by arithmetic (8B on an H200: about 58 ms a
/// tile of 64 tokens, against about 5 ms a weight read), so GEMVs should win there at least as far (not
/// yet measured).
///
/// [`GpuOptions::gemv_max_tokens`]: super::GpuOptions::gemv_max_tokens
pub const DEFAULT_GEMV_MAX_TOKENS: u32 = 32;
/// Tokens and rows per workgroup of matmul.wgsl's tiled products (TILE and TILE_ROWS).
pub(crate) const TILE: u32 = 64;
pub(crate) const TILE_ROWS: u32 = 64;
/// Workgroups a product's pass must make of large tiles on cooperative matrices
/// ([`CoopTile::Large`]) before it takes them over medium ones. A large tile decodes each weight
/// for twice the tokens, but there are a quarter as many, and an H100/H200 holds about two of
/// them per SM (128 threads of up to 255 registers each), 264 at once: fewer than two rounds
/// leave SMs idle in the last. For 8B at pp512 only the gate/up product (896) takes them; at
/// pp2048 every one. A first guess, to be measured (`bench --coop-tile 64|128`).
pub const LARGE_COOP_TILE_WORKGROUPS: u32 = 512;
/// Query rows per workgroup of attention.wgsl's `attend` (MAX_QUERY_BLOCK, QUERY_BLOCK's default).
pub(crate) const ATTENTION_QUERY_BLOCK: u32 = 8;
/// Query rows per workgroup of attention.wgsl's `attend_tiles` (prefill; PREFILL_ROWS): 4 per row
/// group of its 64 threads.
pub(crate) const ATTENTION_PREFILL_ROWS: u32 = 16;
/// Key splits of a decode pass up to SHORT_CONTEXT_SPLITS * LONG_SPLIT_KEYS keys: with 8 KV heads,
/// 256 workgroups, about two per SM of an H100/H200.
const SHORT_CONTEXT_SPLITS: u32 = 32;
/// Keys per split deeper in a context: each split's tiles run one after another, so past 8,192 keys
/// the splits grow in number, not length (a workgroup walking 1,024 keys at 32K deep would leave
/// the GPU's SMs two workgroups each; bench/NOTES.md).
const LONG_SPLIT_KEYS: u32 = 256;
/// The most key splits of a decode pass: 64K keys and past, 256 keys each.
pub const MAX_KEY_SPLITS: u32 = 256;
/// The fewest keys a split attends to: one K/V tile at head_dim 128. A split's tiles run one
/// after another, so at short contexts more, smaller splits finish sooner (bench/NOTES.md).
const MIN_SPLIT_KEYS: u32 = 8;
/// Workgroups per token a GEMV dispatch should have to fill a large GPU. An H200 has 132 SMs of
/// 2048 threads: 4224 workgroups of 64 resident at once. An earlier q4_0 GEMV with 4 rows per
/// 32-thread workgroup read 28672x4096 at 1.29 TB/s but 4096-row matrices at 0.5-0.6 TB/s: 1024
/// workgroups leave too few threads in flight to cover the memory latency. Half the resident
/// count is the aim; past it, fewer rows per workgroup only lose input reuse. WebGPU does not say
/// how large a GPU is, so every GPU aims at this. A CPU adapter (lavapipe, SwiftShader) runs one
/// workgroup per core at a time and has no latency to hide: there only reuse counts (1 row per
/// workgroup halved SmolLM2's decode speed on lavapipe).
fn gemv_min_workgroups(device: wgpu::DeviceType) -> u32 {
    match device {
        wgpu::DeviceType::Cpu => 0,
        _ => 2048,
    }
}
const WG_1D: u32 = 64;

/// How many workgroups a dispatch needs for `n` tokens.
#[derive(Clone, Copy, Debug)]
enum Grid {
    /// (x, n, 1).
    PerToken(u32),
    /// (x, ceil(n / tile), 1).
    TokenTiles { x: u32, tile: u32 },
    /// (x, ceil(n * rows_per_token / block), z).
    RowBlocks { x: u32, rows_per_token: u32, block: u32, z: u32 },
    /// Rows folded over x and y to respect the per-dimension limit, groups of `columns` tokens in z.
    RowsByToken { x: u32, y: u32, columns: u32 },
    Fixed([u32; 3]),
}

impl Grid {
    fn size(self, n: u32) -> [u32; 3] {
        match self {
            Grid::PerToken(x) => [x, n, 1],
            Grid::TokenTiles { x, tile } => [x, n.div_ceil(tile), 1],
            Grid::RowBlocks { x, rows_per_token, block, z } => [x, (n * rows_per_token).div_ceil(block), z],
            Grid::RowsByToken { x, y, columns } => [x, y, n.div_ceil(columns)],
            Grid::Fixed(size) => size,
        }
    }

    fn rows_by_token(gpu: &Gpu, rows: u32, columns: u32) -> Self {
        let x = rows.min(gpu.limits.max_compute_workgroups_per_dimension).max(1);
        Grid::RowsByToken { x, y: rows.div_ceil(x), columns }
    }
}

/// Bytes a one-token dispatch reads and writes, each buffer region counted once: `bytes`, plus
/// `bytes_per_position` for every cached position it attends to. For `bench --profile`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes: u64,
    pub bytes_per_position: u64,
}

impl Traffic {
    fn fixed(bytes: u64) -> Self {
        Self { bytes, bytes_per_position: 0 }
    }

    /// Bytes moved by a one-token pass at `position`.
    pub fn at(self, position: usize) -> u64 {
        self.bytes + self.bytes_per_position * (position as u64 + 1)
    }
}

/// One compute dispatch, bound at load.
#[derive(Clone)]
pub struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    grid: Grid,
    traffic: Traffic,
}

impl Dispatch {
    pub fn encode(&self, pass: &mut wgpu::ComputePass, n_tokens: u32) {
        let [x, y, z] = self.grid.size(n_tokens);
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(x, y, z);
    }

    pub fn traffic(&self) -> Traffic {
        self.traffic
    }
}

/// One logical operation: one dispatch, or one per part of a split weight.
#[derive(Clone)]
pub struct Op {
    dispatches: Vec<Dispatch>,
}

impl Op {
    pub fn encode(&self, pass: &mut wgpu::ComputePass, n_tokens: u32) {
        for d in &self.dispatches {
            d.encode(pass, n_tokens);
        }
    }

    pub fn dispatches(&self) -> &[Dispatch] {
        &self.dispatches
    }
}

/// A matmul bound for each strategy: a GEMV of one token (a lone sequence's decode step), GEMVs of
/// GEMV_COLUMNS tokens per workgroup (the decode steps of several sequences), and tiles (prefill);
/// the token count picks one per pass. On prepared inputs, the op that prepares them runs first
/// where the strategy reads them: q8 inputs every strategy, f16 inputs the tiles.
pub struct ByTokens {
    prepare: Option<(InputFormat, Op)>,
    one: Op,
    few: Op,
    many: Op,
    /// Large tiles on cooperative matrices, and the fewest tokens a pass takes them from.
    large: Option<(Op, u32)>,
    gemv_max_tokens: u32,
    /// The most tokens a pass may have: the rows of its q8 inputs' scratch.
    max_tokens: u32,
}

impl ByTokens {
    pub fn encode(&self, pass: &mut wgpu::ComputePass, n_tokens: u32) {
        if let Some((_, prepare)) = self.prepare_for(n_tokens) {
            prepare.encode(pass, n_tokens);
        }
        self.for_tokens(n_tokens).encode(pass, n_tokens);
    }

    /// The op that prepares the inputs a pass of `n_tokens` reads, if it reads prepared ones, and
    /// its entry point's name.
    pub fn prepare_for(&self, n_tokens: u32) -> Option<(&'static str, &Op)> {
        match &self.prepare {
            Some((format, op)) if *format == InputFormat::Q8 || n_tokens > self.gemv_max_tokens => Some((format.entry(), op)),
            _ => None,
        }
    }

    /// The op a pass of `n_tokens` runs.
    pub fn for_tokens(&self, n_tokens: u32) -> &Op {
        match (self.strategy(n_tokens), &self.large) {
            (Strategy::Gemv, _) => &self.one,
            (Strategy::GemvColumns, _) => &self.few,
            (Strategy::LargeTiles, Some((large, _))) => large,
            _ => &self.many,
        }
    }

    /// The strategy a pass of `n_tokens` takes.
    pub fn strategy(&self, n_tokens: u32) -> Strategy {
        assert!(n_tokens <= self.max_tokens, "a pass of {n_tokens} tokens over q8 inputs of {} token rows", self.max_tokens);
        match &self.large {
            _ if n_tokens <= 1 => Strategy::Gemv,
            _ if n_tokens <= self.gemv_max_tokens => Strategy::GemvColumns,
            Some((_, from)) if n_tokens >= *from => Strategy::LargeTiles,
            _ => Strategy::Tiles,
        }
    }
}

/// How a matmul computes a pass ([`ByTokens::strategy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A GEMV of one token.
    Gemv,
    /// GEMVs of GEMV_COLUMNS tokens per workgroup.
    GemvColumns,
    /// Tiles (on cooperative matrices where the device has them, [`CoopTile::Medium`]).
    Tiles,
    /// Large tiles on cooperative matrices ([`CoopTile::Large`]).
    LargeTiles,
}

fn dispatch(
    gpu: &Gpu,
    kernel: &Kernel,
    entry: &str,
    constants: &[(&str, f64)],
    buffers: &[&wgpu::Buffer],
    grid: Grid,
    traffic: Traffic,
) -> Dispatch {
    dispatch_in(gpu, kernel, ModuleForm::default(), entry, constants, buffers, grid, traffic)
}

/// [`dispatch`] of the kernel's module in `form`.
#[allow(clippy::too_many_arguments)]
fn dispatch_in(
    gpu: &Gpu,
    kernel: &Kernel,
    form: ModuleForm,
    entry: &str,
    constants: &[(&str, f64)],
    buffers: &[&wgpu::Buffer],
    grid: Grid,
    traffic: Traffic,
) -> Dispatch {
    debug_assert_eq!(buffers.len(), kernel.bindings.len(), "{} bindings", kernel.name);
    let pipeline = gpu.pipeline(kernel, form, entry, constants);
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, buffer)| wgpu::BindGroupEntry { binding: i as u32, resource: buffer.as_entire_binding() })
        .collect();
    let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(kernel.name),
        layout: &pipeline.layout,
        entries: &entries,
    });
    Dispatch { pipeline: pipeline.pipeline, bind_group, grid, traffic }
}

/// out[t] = table[tokens[t]]; `tokens` holds (n_tokens) ids as f32 (exact below 2^24).
pub fn embedding(gpu: &Gpu, tokens: &wgpu::Buffer, table: &WeightMatrix, out: &wgpu::Buffer, step: &wgpu::Buffer) -> Op {
    let layout = MatmulLayout { in_stride: 1, out_stride: table.cols, out_offset: 0, accumulate: false };
    let grid = Grid::PerToken((table.cols as u32 / 2).div_ceil(WG_1D));
    let gather = Product { x: tokens, input: MatmulInput::Plain, w: table, out, output: MatmulOutput::Rows, layout, step, prepared: None };
    weight_op(gpu, MatmulEntry::Gather, gather, |_| (grid, vec![]))
}

/// Where a matmul reads its input rows and writes its output rows.
#[derive(Clone, Copy, Debug)]
pub struct MatmulLayout {
    /// Elements between token rows of the input.
    pub in_stride: usize,
    /// Elements between token rows of the output.
    pub out_stride: usize,
    /// Output column of the matrix's first row (a matrix stacked after others).
    pub out_offset: usize,
    /// Add to the output (a residual connection) instead of overwriting it.
    pub accumulate: bool,
}

/// What a matmul multiplies: its input as it is, or the op before it fused in (matmul.wgsl's INPUT).
#[derive(Clone, Copy, Debug)]
pub enum MatmulInput<'a> {
    Plain,
    /// rmsnorm(x) * weight, with the kernel computing each token row's scale.
    RmsNorm { weight: &'a wgpu::Buffer, eps: f32 },
    /// silu(x[:, :k]) * x[:, k:2k] for a (rows, k) matrix: the gated MLP activation.
    SiluMul,
}

/// matmul.wgsl's INPUT codes.
pub(crate) const INPUT_PLAIN: u32 = 0;
pub(crate) const INPUT_RMSNORM: u32 = 1;
pub(crate) const INPUT_SILU_MUL: u32 = 2;

impl<'a> MatmulInput<'a> {
    /// The buffer for the `norm` binding and the epsilon: RMSNorm's, else `unread` (any read-only
    /// buffer: the binding is not read) and 0.
    fn norm_binding(self, unread: &'a wgpu::Buffer) -> (&'a wgpu::Buffer, f32) {
        match self {
            MatmulInput::RmsNorm { weight, eps } => (weight, eps),
            _ => (unread, 0.0),
        }
    }

    fn code(self) -> u32 {
        match self {
            MatmulInput::Plain => INPUT_PLAIN,
            MatmulInput::RmsNorm { .. } => INPUT_RMSNORM,
            MatmulInput::SiluMul => INPUT_SILU_MUL,
        }
    }
}

/// Where a matmul's products go (matmul.wgsl's OUTPUT): the op after it fused in.
#[derive(Clone, Copy, Debug)]
pub enum MatmulOutput<'a> {
    /// Into `out`, as the [`MatmulLayout`] places them.
    Rows,
    /// The products of a stacked q/k/v projection with RoPE applied and the KV cache written.
    Rotary(Rotary<'a>),
}

/// A stacked q/k/v projection's output: rows of `heads`' n_heads q heads, then n_kv_heads k heads
/// and as many v heads, of head_dim rows each. Each token's q is rotated by its position's angles into
/// `out`, its k rotated into `k_cache` and its v copied into `v_cache` at its slot's KV row (a pool
/// buffer of (rows, n_kv_heads * head_dim) of the device's KV type), or when `staged` at row t of
/// token t (f32 staging rows that [`kv_store`] moves into the pool). `cos_sin` is
/// [`crate::model::Config::rope_cos_sin`]'s table. The matrix's parts and stacked blocks must
/// start at whole heads.
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    pub cos_sin: &'a wgpu::Buffer,
    pub k_cache: &'a wgpu::Buffer,
    pub v_cache: &'a wgpu::Buffer,
    pub staged: bool,
    pub heads: AttentionHeads,
}

/// matmul.wgsl's OUTPUT codes.
pub(crate) const OUTPUT_ROWS: u32 = 0;
pub(crate) const OUTPUT_ROTARY: u32 = 1;

impl MatmulOutput<'_> {
    fn code(self) -> u32 {
        match self {
            MatmulOutput::Rows => OUTPUT_ROWS,
            MatmulOutput::Rotary(_) => OUTPUT_ROTARY,
        }
    }
}

/// A product's operands: out = f(x) @ w.T (or out += f(x) @ w.T, or the rotary output).
#[derive(Clone, Copy)]
pub struct Product<'a> {
    pub x: &'a wgpu::Buffer,
    pub input: MatmulInput<'a>,
    pub w: &'a WeightMatrix,
    pub out: &'a wgpu::Buffer,
    pub output: MatmulOutput<'a>,
    pub layout: MatmulLayout,
    pub step: &'a wgpu::Buffer,
    /// Inputs a [`prepare_input`] op makes first, which f(x) then comes from (see [`matmul`]).
    pub prepared: Option<&'a PreparedInputs>,
}

/// `product`, one dispatch per part of its matrix. With prepared inputs, f(x) comes from there,
/// prepared by a [`prepare_input`] op run first ([`ByTokens::after`]): q8 inputs for a matrix of
/// a format [`reads_q8_inputs`] (the GEMVs multiply in integers, the tiles stage the dequantized
/// values), f16 inputs for the tiles on cooperative matrices.
pub fn matmul(gpu: &Gpu, product: Product) -> ByTokens {
    let Product { input, w, output, layout, .. } = product;
    let rotary = matches!(output, MatmulOutput::Rotary(_));
    let prepared = product.prepared.filter(|p| match p.format {
        InputFormat::Q8 => reads_q8_inputs(w.dtype),
        InputFormat::F16 => gpu.coop_matrix.is_some(),
    });
    if let Some(prepared) = prepared {
        assert!(w.cols <= prepared.k, "a product of {} inputs over prepared inputs of {}", w.cols, prepared.k);
    }
    let x_q8 = prepared.filter(|p| p.format == InputFormat::Q8);
    // Each format's GEMV takes several rows per workgroup; the block formats' read their inputs as
    // vec4s (the block sizes make k a multiple of 32). On q8 inputs every strategy reads them as
    // the quantize op left them, its INPUT applied.
    let entry = match w.dtype {
        // The grid formats' groups of 8 are the block GEMVs' quarters of a block of 32.
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::IQ4NL | DType::IQ4XS => MatmulEntry::GemvBlocks,
        dtype if dtype.is_grid_format() => MatmulEntry::GemvBlocks,
        DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => MatmulEntry::GemvSuperblocks,
        _ => MatmulEntry::Gemv,
    };
    let gemv_input = if x_q8.is_some() { MatmulInput::Plain } else { input };
    let tiles_input = if prepared.is_some() { MatmulInput::Plain } else { input };
    let q8_inputs = ("Q8_INPUTS", x_q8.is_some() as u8 as f64);
    let f16_inputs = ("F16_INPUTS", prepared.is_some_and(|p| p.format == InputFormat::F16) as u8 as f64);
    assert!(entry == MatmulEntry::Gemv || layout.in_stride.is_multiple_of(4), "block GEMV input rows must start on a vec4: stride {}", layout.in_stride);
    let gemv = |columns: u32| {
        weight_op(gpu, entry, Product { input: gemv_input, prepared: x_q8, ..product }, |rows| {
            let per_workgroup = gemv_rows(rows, gpu.info.device_type, gpu.gemv_rows, rotary);
            let constants = vec![("GEMV_ROWS", per_workgroup as f64), ("GEMV_COLUMNS", columns as f64), q8_inputs];
            (Grid::rows_by_token(gpu, rows.div_ceil(per_workgroup), columns), constants)
        })
    };
    let tiles = |entry: MatmulEntry| {
        let (tokens, rows) = entry.tile();
        weight_op(gpu, entry, Product { input: tiles_input, prepared, ..product }, |part_rows| {
            (Grid::TokenTiles { x: part_rows.div_ceil(rows), tile: tokens }, vec![q8_inputs, f16_inputs])
        })
    };
    let (many, large) = match gpu.coop_matrix {
        None => (tiles(MatmulEntry::Tiled), None),
        Some(_) => {
            let large_from = large_coop_tiles_from(gpu, w.parts.iter().map(|part| part.rows).min().unwrap_or(w.rows));
            let large = large_from.map(|from| (tiles(MatmulEntry::TiledCoop(CoopTile::Large)), from));
            // Large tiles from the first token (forced) leave no pass to medium ones: none built.
            let medium = match &large {
                Some((op, 0)) => op.clone(),
                _ => tiles(MatmulEntry::TiledCoop(CoopTile::Medium)),
            };
            (medium, large)
        }
    };
    ByTokens {
        prepare: None,
        one: gemv(1),
        few: gemv(GEMV_COLUMNS),
        many,
        large,
        gemv_max_tokens: gpu.gemv_max_tokens,
        max_tokens: prepared.map_or(u32::MAX, |p| p.tokens),
    }
}

/// The fewest tokens from which a pass of a product of `rows` rows (of a split matrix, its
/// smallest part: each part is a dispatch of its own) takes large tiles on cooperative matrices on
/// `gpu`: where it makes [`LARGE_COOP_TILE_WORKGROUPS`] of them, every pass where they are forced,
/// none where tiles of 64 are or the device has no cooperative matrices.
pub fn large_coop_tiles_from(gpu: &Gpu, rows: usize) -> Option<u32> {
    match (gpu.coop_matrix, gpu.coop_tile) {
        (None, _) | (_, Some(CoopTile::Medium)) => None,
        (_, Some(CoopTile::Large)) => Some(0),
        (_, None) => {
            let side = CoopTile::Large.side();
            let row_tiles = (rows as u32).div_ceil(side).max(1);
            // The first token of the last token tile the pass needs.
            Some((LARGE_COOP_TILE_WORKGROUPS.div_ceil(row_tiles) - 1) * side + 1)
        }
    }
}

/// An entry point of matmul.wgsl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MatmulEntry {
    /// The embedding rows of token ids.
    Gather,
    /// GEMVs of f32, f16 and bf16 weights,
    Gemv,
    /// of q4_0, q4_1, q5_0, q5_1, q8_0 and iq4 blocks (iq4_xs's blocks of 32) and the grid
    /// formats' blocks of 32,
    GemvBlocks,
    /// of q2_k, q3_k, q4_k, q5_k and q6_k superblocks.
    GemvSuperblocks,
    /// Prefill tiles on the threads,
    Tiled,
    /// or on cooperative matrices.
    TiledCoop(CoopTile),
}

impl MatmulEntry {
    fn name(self) -> &'static str {
        match self {
            MatmulEntry::Gather => "gather",
            MatmulEntry::Gemv => "gemv",
            MatmulEntry::GemvBlocks => "gemv_blocks",
            MatmulEntry::GemvSuperblocks => "gemv_superblocks",
            MatmulEntry::Tiled => "tiled",
            MatmulEntry::TiledCoop(_) => "tiled_coop",
        }
    }

    /// Tokens and rows per workgroup of a tiled entry.
    fn tile(self) -> (u32, u32) {
        match self {
            MatmulEntry::TiledCoop(tile) => (tile.side(), tile.side()),
            _ => (TILE, TILE_ROWS),
        }
    }

    fn is_gemv(self) -> bool {
        matches!(self, MatmulEntry::Gemv | MatmulEntry::GemvBlocks | MatmulEntry::GemvSuperblocks)
    }
}

/// Whether matmul.wgsl has a GEMV of `dtype` over q8 inputs (every llama.cpp block format).
pub fn reads_q8_inputs(dtype: DType) -> bool {
    dtype.is_block_format()
}

/// Words of a token row of quantize.wgsl's output for `k` inputs: the int8 values, 4 a word, then
/// each block's scale and each block's sum.
pub fn q8_row_words(k: usize) -> usize {
    k / 4 + 2 * k / kernels::Q8_BLOCK
}

/// The form quantize.wgsl prepares a matmul's inputs in, INPUT applied, before the products read them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// int8 blocks ([`crate::GpuOptions::q8_activations`]), read by every strategy.
    Q8,
    /// f16, read by the tiles on cooperative matrices alone, whose operands are f16 anyway: half
    /// the bytes of f32 to stage, and RMSNorm's row scale computed once, not by every tile.
    F16,
}

impl InputFormat {
    /// The format a model on `gpu` prepares its matmul inputs in, if any.
    pub fn for_gpu(gpu: &Gpu) -> Option<InputFormat> {
        if gpu.q8_activations {
            Some(InputFormat::Q8)
        } else {
            gpu.coop_matrix.map(|_| InputFormat::F16)
        }
    }

    /// Words of a token row of `k` inputs.
    pub fn row_words(self, k: usize) -> usize {
        match self {
            InputFormat::Q8 => q8_row_words(k),
            InputFormat::F16 => k / 2,
        }
    }

    fn entry(self) -> &'static str {
        match self {
            InputFormat::Q8 => "quantize",
            InputFormat::F16 => "to_f16",
        }
    }
}

/// Scratch for matmul inputs quantize.wgsl prepares: token rows of `format.row_words(k)` for
/// passes of up to `tokens` tokens of up to `k` inputs. Each product's prepare op fills it right
/// before the product reads it, so one serves a model.
pub struct PreparedInputs {
    buffer: wgpu::Buffer,
    format: InputFormat,
    tokens: u32,
    k: usize,
}

impl PreparedInputs {
    pub fn new(gpu: &Gpu, format: InputFormat, tokens: usize, k: usize) -> PreparedInputs {
        let buffer = gpu.storage_buffer("prepared inputs", 4 * (tokens * format.row_words(k)) as u64);
        PreparedInputs { buffer, format, tokens: tokens as u32, k }
    }

    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn format(&self) -> InputFormat {
        self.format
    }
}

/// Prepares f(x), the `k` inputs per token row of a matmul, in `prepared` for the products
/// [`matmul`] binds to it, which run it first ([`ByTokens::after`]).
pub fn prepare_input(gpu: &Gpu, x: &wgpu::Buffer, input: MatmulInput, k: usize, in_stride: usize, prepared: &PreparedInputs, step: &wgpu::Buffer) -> Op {
    assert!(k.is_multiple_of(kernels::Q8_BLOCK) && in_stride.is_multiple_of(4), "prepared inputs need blocks of {} and rows on a vec4: k {k}, stride {in_stride}", kernels::Q8_BLOCK);
    assert!(k <= prepared.k, "{k} inputs prepared in rows of {}", prepared.k);
    let (norm, eps) = input.norm_binding(x);
    let params = gpu.uniform_buffer("quantize params", &QuantizeParams { k: k as u32, in_stride: in_stride as u32, eps, _pad: 0 });
    let inputs = if matches!(input, MatmulInput::SiluMul) { 2 * k } else { k };
    let traffic = 4 * (inputs + k * matches!(input, MatmulInput::RmsNorm { .. }) as usize + prepared.format.row_words(k));
    let grid = Grid::PerToken((k / kernels::Q8_BLOCK).div_ceil(WG_1D as usize) as u32);
    let constants = [("INPUT", input.code() as f64)];
    let buffers = [x, norm, &prepared.buffer, &params, step];
    Op { dispatches: vec![dispatch(gpu, &kernels::QUANTIZE, prepared.format.entry(), &constants, &buffers, grid, Traffic::fixed(traffic as u64))] }
}

/// Rows per workgroup of matmul.wgsl's GEMVs (GEMV_ROWS) for a matrix of `rows` rows (a part of a
/// split one: each part is a dispatch of its own) on a `device`: `forced` if given, else the most
/// of 4 and 2 that still makes gemv_min_workgroups per token, else 1. Each row a workgroup takes
/// reuses the inputs its threads loaded, so more is better where the device stays full. Rotary
/// output takes rows in pairs, so at least 2.
pub fn gemv_rows(rows: u32, device: wgpu::DeviceType, forced: Option<u32>, rotary: bool) -> u32 {
    let min_workgroups = gemv_min_workgroups(device);
    let chosen = forced.unwrap_or_else(|| [4, 2].into_iter().find(|n| rows.div_ceil(*n) >= min_workgroups).unwrap_or(1));
    if rotary {
        chosen.max(2)
    } else {
        chosen
    }
}

impl ByTokens {
    /// The product with `prepare`, the op that fills its `prepared` inputs, run before the
    /// strategies that read them.
    pub fn after(self, prepared: &PreparedInputs, prepare: Op) -> ByTokens {
        ByTokens { prepare: Some((prepared.format, prepare)), ..self }
    }

    /// One product over matrices stacked by rows, each writing its own output columns.
    pub fn join(parts: impl IntoIterator<Item = ByTokens>) -> ByTokens {
        let (mut one, mut few, mut many, mut gemv_max_tokens, mut max_tokens) = (vec![], vec![], vec![], 0, u32::MAX);
        // Large tiles where every part takes them.
        let mut large = Some((vec![], 0));
        for part in parts {
            assert!(part.prepare.is_none(), "a stack's parts share the prepare op the stack runs first");
            one.extend(part.one.dispatches);
            few.extend(part.few.dispatches);
            many.extend(part.many.dispatches);
            large = large.zip(part.large).map(|((mut dispatches, from), (op, part_from))| {
                dispatches.extend(op.dispatches);
                (dispatches, from.max(part_from))
            });
            gemv_max_tokens = part.gemv_max_tokens;
            max_tokens = max_tokens.min(part.max_tokens);
        }
        let large = large.map(|(dispatches, from)| (Op { dispatches }, from));
        ByTokens { prepare: None, one: Op { dispatches: one }, few: Op { dispatches: few }, many: Op { dispatches: many }, large, gemv_max_tokens, max_tokens }
    }
}

/// One dispatch of a matmul.wgsl entry point per part of the product's matrix; `launch` gives
/// its grid and extra override constants from the part's rows.
fn weight_op(gpu: &Gpu, entry: MatmulEntry, product: Product, launch: impl Fn(u32) -> (Grid, Vec<(&'static str, f64)>)) -> Op {
    let Product { x, input, w, out, output, layout, step, prepared } = product;
    // Only the tiled product stages tiles, only the GEMVs reduce over their workgroup, and only
    // tiled_coop is on cooperative matrices; the other entry points are the same in every form.
    let tiled = entry == MatmulEntry::Tiled;
    let coop_tile = match entry {
        MatmulEntry::TiledCoop(tile) => Some(tile),
        _ => None,
    };
    let form = ModuleForm {
        tiles: if tiled { gpu.tile_type } else { TileType::F32 },
        subgroups: entry.is_gemv() && gpu.subgroups,
        register_tile: if tiled { gpu.register_tile } else { RegisterTile::X4 },
        coop_matrix: coop_tile.and(gpu.coop_matrix),
        coop_tile: coop_tile.unwrap_or_default(),
        kv: match output {
            MatmulOutput::Rotary(r) if !r.staged => gpu.kv_type,
            _ => KvType::F32,
        },
    };
    let (norm, eps) = input.norm_binding(x);
    // Unread bindings take x (read-only) and buffers of their own (writable ones must not alias).
    let [unused_k, unused_v] = &gpu.unused_writable;
    let (cos_sin, k_cache, v_cache, head_dim, q_dim, kv_dim, kv_staged) = match output {
        MatmulOutput::Rows => (x, unused_k, unused_v, 0, 0, 0, false),
        MatmulOutput::Rotary(r) => {
            assert!(!layout.accumulate, "rotary output overwrites");
            assert!(r.staged || gpu.kv_type != KvType::Q8_0, "a q8_0 pool is written through staging rows");
            let AttentionHeads { n_heads, n_kv_heads, head_dim } = r.heads;
            (r.cos_sin, r.k_cache, r.v_cache, head_dim, n_heads * head_dim, n_kv_heads * head_dim, r.staged)
        }
    };
    let dispatches = w
        .parts
        .iter()
        .map(|part| {
            let row_start = layout.out_offset + part.row_start;
            assert!(head_dim == 0 || (row_start.is_multiple_of(head_dim) && part.rows.is_multiple_of(head_dim)), "rotary output parts must be whole heads");
            let params = MatmulParams {
                k: w.cols as u32,
                rows: part.rows as u32,
                row_start: row_start as u32,
                in_stride: layout.in_stride as u32,
                out_stride: layout.out_stride as u32,
                accumulate: layout.accumulate as u32,
                eps,
                head_dim: head_dim as u32,
                q_dim: q_dim as u32,
                kv_dim: kv_dim as u32,
                kv_staged: kv_staged as u32,
                _pad: 0,
            };
            let params = gpu.uniform_buffer(entry.name(), &params);
            let buffers = [x, &part.buffer, norm, out, &params, step, cos_sin, k_cache, v_cache, prepared.map_or(x, |p| &p.buffer)];
            // The gather reads a token's row in whichever part holds it (counted evenly over the
            // parts); a product reads the whole part, its input row (two halves for SiLU-mul) and
            // the norm weight; rotary output also the position's cos/sin row.
            let traffic = if entry == MatmulEntry::Gather {
                (w.row_bytes() + 4 * w.cols) / w.parts.len()
            } else {
                let inputs = match (input, prepared) {
                    (_, Some(p)) => p.format.row_words(w.cols),
                    (MatmulInput::Plain, None) => w.cols,
                    _ => 2 * w.cols,
                };
                part.rows * w.row_bytes() + 4 * inputs + 4 * part.rows * (1 + layout.accumulate as usize) + 4 * head_dim
            };
            let (grid, extra_constants) = launch(part.rows as u32);
            let mut constants = vec![
                ("WEIGHT_DTYPE", w.dtype.shader_code() as f64),
                ("INPUT", input.code() as f64),
                ("OUTPUT", output.code() as f64),
                ("INT_CONVERSIONS", gpu.int_conversions as u8 as f64),
            ];
            constants.extend(extra_constants);
            dispatch_in(gpu, &kernels::MATMUL, form, entry.name(), &constants, &buffers, grid, Traffic::fixed(traffic as u64))
        })
        .collect();
    Op { dispatches }
}

/// The heads attention runs over: n_heads query heads in GQA groups over n_kv_heads key and value
/// heads, each of head_dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionHeads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The most key splits a model's decode passes have: MAX_KEY_SPLITS (or the device's
/// `max_key_splits` option), fewer where the context is short or the partials of a pool of
/// `buffers` buffers would pass the binding limit.
pub fn max_key_splits(gpu: &Gpu, heads: AttentionHeads, context: usize, buffers: usize) -> u32 {
    let by_context = (context as u32).div_ceil(MIN_SPLIT_KEYS);
    let by_binding = gpu.max_binding() / partials_bytes(heads, 1, buffers, 0);
    gpu.max_key_splits.unwrap_or(MAX_KEY_SPLITS).min(by_context).min(by_binding.min(u32::MAX as u64) as u32).max(1)
}

/// The most tokens a pass over a pool of `buffers` (more than one) can attend to: each token's
/// heads have a partial per buffer, and they must bind.
pub fn max_attention_tokens(gpu: &Gpu, heads: AttentionHeads, buffers: usize) -> usize {
    (gpu.max_binding() / partials_bytes(heads, 1, buffers, 1).max(1)) as usize
}

/// The scratch buffer through which [`attention`] merges its partials, shared by every layer, and
/// the passes it is sized for: decode passes of up to `max_key_splits` splits and, over a pool of
/// several buffers, passes of up to `max_tokens`.
pub struct AttentionPartials {
    pub buffer: wgpu::Buffer,
    pub max_key_splits: u32,
    pub max_tokens: usize,
}

impl AttentionPartials {
    pub fn new(gpu: &Gpu, heads: AttentionHeads, max_key_splits: u32, buffers: usize, max_tokens: usize) -> Self {
        let buffer = gpu.storage_buffer("attention partials", partials_bytes(heads, max_key_splits, buffers, max_tokens));
        Self { buffer, max_key_splits, max_tokens }
    }
}

/// Bytes of [`AttentionPartials`]: an output of head_dim and its (max, sum) per (token, head, pool
/// buffer, key split); then an arrival count per query block of those passes, where the last split
/// merges (Gpu::merge_in_last_split).
fn partials_bytes(heads: AttentionHeads, max_key_splits: u32, buffers: usize, max_tokens: usize) -> u64 {
    let AttentionHeads { n_heads, head_dim, .. } = heads;
    4 * (partial_rows(n_heads, max_key_splits, buffers, max_tokens) * (head_dim as u64 + 2) + merged_rows(n_heads, buffers, max_tokens))
}

fn partial_rows(n_heads: usize, max_key_splits: u32, buffers: usize, max_tokens: usize) -> u64 {
    let decode = (DECODE_MAX_TOKENS - 1) as u64 * max_key_splits as u64;
    decode.max(pool_pass_tokens(buffers, max_tokens)) * n_heads as u64 * buffers as u64
}

/// The (token, head) rows whose partials a pass merges: at least its query blocks, each with a
/// count of its arrived splits.
fn merged_rows(n_heads: usize, buffers: usize, max_tokens: usize) -> u64 {
    ((DECODE_MAX_TOKENS - 1) as u64).max(pool_pass_tokens(buffers, max_tokens)) * n_heads as u64
}

/// The most tokens of a pass over a pool of several buffers, each of whose passes merges partials
/// (none over one buffer: only decode passes merge there).
fn pool_pass_tokens(buffers: usize, max_tokens: usize) -> u64 {
    if buffers > 1 { max_tokens as u64 } else { 0 }
}

/// One layer's keys and values in the KV pool's pages: the buffers (keys, values) of each run of
/// `pages_per_buffer` pool pages, rows of n_kv_heads * head_dim in the device's KV type, and the
/// page table (sequences, pages_per_sequence) that maps a sequence's pages of
/// [`crate::model::PAGE_SIZE`] positions to pool pages.
#[derive(Clone, Copy, Debug)]
pub struct KvLayer<'a> {
    pub buffers: &'a [(wgpu::Buffer, wgpu::Buffer)],
    pub pages: usize,
    pub pages_per_buffer: usize,
    pub page_table: &'a wgpu::Buffer,
    pub pages_per_sequence: usize,
}

impl KvLayer<'_> {
    /// Each buffer's (keys, values) with its first page and its page count (the last may hold
    /// fewer than pages_per_buffer).
    fn runs(&self) -> impl Iterator<Item = (usize, &(wgpu::Buffer, wgpu::Buffer), usize)> + '_ {
        self.buffers.iter().enumerate().map(move |(i, pair)| {
            let first = i * self.pages_per_buffer;
            (first, pair, self.pages_per_buffer.min(self.pages - first))
        })
    }
}

/// Moves the keys and values a staged rotary output left in `k_rows` and `v_rows` (token t at row
/// t) into the pool buffers of `kv` holding each token's KV row, in the device's KV type.
pub fn kv_store(gpu: &Gpu, k_rows: &wgpu::Buffer, v_rows: &wgpu::Buffer, kv: KvLayer, kv_dim: usize, step: &wgpu::Buffer) -> Op {
    let form = ModuleForm { kv: gpu.kv_type, ..Default::default() };
    let groups = (kv_dim / gpu.kv_type.store_unit()).div_ceil(WG_1D as usize) as u32;
    // A token's staged f32 key and value rows read, and their pool rows written.
    let row_bytes = 2 * (4 * kv_dim as u64 + gpu.kv_type.row_bytes(kv_dim));
    let dispatches = kv
        .runs()
        .map(|(first_page, (k, v), pages)| {
            let params = KvStoreParams {
                kv_dim: kv_dim as u32,
                first_row: (first_page * crate::model::PAGE_SIZE) as u32,
                rows: (pages * crate::model::PAGE_SIZE) as u32,
                _pad: 0,
            };
            let params = gpu.uniform_buffer("kv_store params", &params);
            let buffers = [k_rows, v_rows, k, v, &params, step];
            dispatch_in(gpu, &kernels::KV_STORE, form, "store", &[], &buffers, Grid::PerToken(groups), Traffic::fixed(row_bytes))
        })
        .collect();
    Op { dispatches }
}

/// Causal grouped-query attention of (n_tokens) queries over their sequences' pages of `kv`; token
/// rows of `q` lie `q_stride` elements apart, its heads first. A decode pass splits the keys
/// (flash-decoding, up to `partials.max_key_splits` splits as StepParams::for_slots cut them), and
/// a pool of several buffers is attended a buffer per dispatch; their partials merge through
/// `partials`, in the last attending dispatch where the device allows (Gpu::merge_in_last_split),
/// else in one of its own. Otherwise a pass attends in one dispatch.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    heads: AttentionHeads,
    q: &wgpu::Buffer,
    q_stride: usize,
    kv: KvLayer,
    out: &wgpu::Buffer,
    partials: &AttentionPartials,
    step: &wgpu::Buffer,
) -> Attention {
    let AttentionHeads { n_heads, n_kv_heads, head_dim } = heads;
    let AttentionPartials { max_key_splits, max_tokens, .. } = *partials;
    assert!(head_dim.is_multiple_of(4) && head_dim <= MAX_HEAD_DIM, "attention reads heads of whole quads, at most {MAX_HEAD_DIM}: head_dim {head_dim}");
    let buffers = kv.buffers.len();
    let kv_dim = n_kv_heads * head_dim;
    let form = ModuleForm { kv: gpu.kv_type, ..Default::default() };
    // Prefill on cooperative matrices takes heads of 64 or 128 dimensions (Llama 3's) over a pool
    // in one buffer, where it writes out itself (a prefill pass has one key split): partials are
    // atomics, whose device scope a module on cooperative matrices (the Vulkan memory model, in
    // naga's SPIR-V) may use only with a capability naga does not declare (spirv-val rejects it).
    let coop_prefill = gpu.coop_attention && matches!(head_dim, 64 | 128) && buffers == 1;
    // q and out, plus a key and a value row of every KV head per attended position.
    let traffic = Traffic { bytes: 8 * (n_heads * head_dim) as u64, bytes_per_position: 2 * gpu.kv_type.row_bytes(kv_dim) };
    let group = (n_heads / n_kv_heads) as u32;
    // A decode token's query rows are its GQA group: blocks of that many (a power of two) waste
    // no rows on one token; prefill fills blocks of 8 with several tokens.
    let decode_block = group.next_power_of_two().min(ATTENTION_QUERY_BLOCK);
    let partial_rows = partial_rows(n_heads, max_key_splits, buffers, max_tokens);
    let runs: Vec<_> = kv
        .runs()
        .enumerate()
        .map(|(buffer, (first_page, pair, pages))| {
            let params = AttentionParams {
                n_heads: n_heads as u32,
                n_kv_heads: n_kv_heads as u32,
                scale: 1.0 / (head_dim as f32).sqrt(),
                q_stride: q_stride as u32,
                stats_offset: (partial_rows * head_dim as u64) as u32,
                counters_offset: (partial_rows * (head_dim as u64 + 2)) as u32,
                pages_per_sequence: kv.pages_per_sequence as u32,
                buffers: buffers as u32,
                buffer: buffer as u32,
                first_page: first_page as u32,
                buffer_pages: pages as u32,
                _pad: 0,
            };
            (gpu.uniform_buffer("attention params", &params), pair)
        })
        .collect();
    let merge_in_last_split = gpu.merge_in_last_split as u32 as f64;
    let attend = |entry: AttendEntry, block: u32, splits: u32| {
        let (entry, form, mut constants) = match entry {
            // Its block size (QUERY_BLOCK) is the pipeline's; the tiles' are ATTENTION_PREFILL_ROWS.
            AttendEntry::Rows => ("attend", form, vec![("QUERY_BLOCK", block as f64)]),
            AttendEntry::Tiles => ("attend_tiles", form, vec![]),
            AttendEntry::Coop => ("attend_coop", ModuleForm { coop_matrix: gpu.coop_matrix, ..form }, vec![]),
        };
        let grid = Grid::RowBlocks { x: n_kv_heads as u32, rows_per_token: group, block, z: splits };
        constants.extend([("HEAD_DIM", head_dim as f64), ("MERGE_IN_LAST_SPLIT", merge_in_last_split)]);
        // One partial per row writes out itself; a merge reads at most every partial.
        let merges = splits > 1 || buffers > 1;
        let merge_traffic = Traffic::fixed(4 * (n_heads * (head_dim + 2)) as u64 * (splits as usize * buffers) as u64 + traffic.bytes);
        let mut dispatches: Vec<Dispatch> = runs
            .iter()
            .enumerate()
            .map(|(buffer, (params, (k, v)))| {
                let bound = [q, k, v, kv.page_table, out, &partials.buffer, params, step];
                // Each buffer's dispatch reads its share of the pool; the last merges where it can.
                let mut share = Traffic { bytes_per_position: traffic.bytes_per_position / buffers as u64, ..traffic };
                if merges && gpu.merge_in_last_split && buffer + 1 == buffers {
                    share.bytes += merge_traffic.bytes;
                }
                dispatch_in(gpu, &kernels::ATTENTION, form, entry, &constants, &bound, grid, share)
            })
            .collect();
        if merges && !gpu.merge_in_last_split {
            let (params, (k, v)) = &runs[0];
            let bound = [q, k, v, kv.page_table, out, &partials.buffer, params, step];
            dispatches.push(dispatch_in(gpu, &kernels::ATTENTION, form, "combine", &[("HEAD_DIM", head_dim as f64)], &bound, Grid::PerToken(n_heads as u32), merge_traffic));
        }
        Op { dispatches }
    };
    Attention {
        prefill: attend(if coop_prefill { AttendEntry::Coop } else { AttendEntry::Tiles }, ATTENTION_PREFILL_ROWS, 1),
        batch: attend(AttendEntry::Rows, ATTENTION_QUERY_BLOCK, 1),
        decode: attend(AttendEntry::Rows, decode_block, 1),
        decode_split: attend(AttendEntry::Rows, decode_block, max_key_splits),
        group,
    }
}

/// attention.wgsl's attending entry points.
#[derive(Clone, Copy)]
enum AttendEntry {
    /// `attend`: blocks of a few query rows, a pair of them per thread (decode).
    Rows,
    /// `attend_tiles`: 16-row blocks as a matmul's register tiles (prefill).
    Tiles,
    /// `attend_coop`: `attend_tiles`' blocks on cooperative matrices.
    Coop,
}

/// Attention bound for each kind of pass ([`AttentionPass`]).
pub struct Attention {
    prefill: Op,
    batch: Op,
    decode: Op,
    decode_split: Op,
    group: u32,
}

/// How attention runs a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPass {
    /// `attend_tiles` (or `attend_coop` on cooperative matrices): many rows a workgroup.
    Prefill,
    /// `attend` in blocks of ATTENTION_QUERY_BLOCK rows: many sequences' few tokens each, which
    /// `attend_tiles` would compute whole tiles for once per sequence in a block.
    Batch,
    /// `attend` in blocks of a token's GQA group, keys whole or in splits merged after.
    Decode,
    DecodeSplit,
}

impl AttentionPass {
    /// The pass `step` takes with GQA groups of `group` query heads.
    pub fn of(step: &StepParams, group: u32) -> Self {
        let slots = &step.slots[..step.n_tokens as usize];
        let runs = 1 + slots.windows(2).filter(|pair| pair[0].sequence != pair[1].sequence).count() as u32;
        // Tokens of one sequence that fill a query block of attend_tiles.
        let tile_tokens = ATTENTION_PREFILL_ROWS.div_ceil(group);
        match step.n_tokens >= DECODE_MAX_TOKENS {
            true if step.n_tokens >= runs * tile_tokens => Self::Prefill,
            true => Self::Batch,
            false if step.key_splits > 1 => Self::DecodeSplit,
            false => Self::Decode,
        }
    }
}

impl Attention {
    /// The dispatches of a pass of `step` (the step buffer's value).
    pub fn for_step(&self, step: &StepParams) -> &Op {
        match AttentionPass::of(step, self.group) {
            AttentionPass::Prefill => &self.prefill,
            AttentionPass::Batch => &self.batch,
            AttentionPass::Decode => &self.decode,
            AttentionPass::DecodeSplit => &self.decode_split,
        }
    }

    pub fn encode(&self, pass: &mut wgpu::ComputePass, step: &StepParams) {
        self.for_step(step).encode(pass, step.n_tokens);
    }
}


/// Threads per workgroup of argmax.wgsl and top_k.wgsl.
pub(crate) const SELECTION_WG: usize = 256;
/// The most workgroups of argmax's first pass (ARGMAX_PARTIALS in the kernels).
pub(crate) const ARGMAX_PARTIALS: usize = 256;
/// Logits each thread of argmax's first pass reads, where the partials allow.
const ARGMAX_PER_THREAD: usize = 4;

/// out[r] = the index of the largest of row r's `n` logits, as f32 like the token ids the
/// embedding reads, for the rows a pass encodes it with (at most `max_rows`).
pub fn argmax(gpu: &Gpu, logits: &wgpu::Buffer, out: &wgpu::Buffer, n: usize, max_rows: usize) -> Op {
    let partials = n.div_ceil(ARGMAX_PER_THREAD * SELECTION_WG).clamp(1, ARGMAX_PARTIALS);
    let params = gpu.uniform_buffer("argmax params", &ArgmaxParams { n: n as u32, partials: partials as u32, _pad: [0; 2] });
    let bests = gpu.storage_buffer("argmax bests", (8 * ARGMAX_PARTIALS * max_rows) as u64);
    let buffers = [logits, out, &bests, &params];
    let bests_bytes = 8 * partials as u64;
    Op {
        dispatches: vec![
            dispatch(gpu, &kernels::ARGMAX, "partial", &[], &buffers, Grid::PerToken(partials as u32), Traffic::fixed(4 * n as u64 + bests_bytes)),
            dispatch(gpu, &kernels::ARGMAX, "finish", &[], &buffers, Grid::PerToken(1), Traffic::fixed(bests_bytes + 4)),
        ],
    }
}

/// Selects the top candidates of each row of `n` logits into `out` (rows of OUT_BYTES), each row
/// with its own k and temperature, set per pass with [`TopK::set`].
pub struct TopK {
    op: Op,
    row_params: wgpu::Buffer,
    max_rows: usize,
}

/// The most workgroups of top_k's first pass (TOP_K_PARTIALS in the kernels).
pub(crate) const TOP_K_PARTIALS: usize = 256;
/// Logits each thread of top_k's first pass reads, where the partials allow: fewer partials leave
/// the second pass fewer candidates (partials x k) to select from.
const TOP_K_PER_THREAD: usize = 16;

impl TopK {
    pub fn new(gpu: &Gpu, logits: &wgpu::Buffer, out: &wgpu::Buffer, n: usize, max_rows: usize) -> Self {
        // As many as the binding limit holds selections of (a browser's can be small).
        let fit = (gpu.max_binding() / (Self::OUT_BYTES * max_rows as u64)).max(1) as usize;
        let partials = n.div_ceil(TOP_K_PER_THREAD * SELECTION_WG).clamp(1, TOP_K_PARTIALS).min(fit) as u32;
        let params = gpu.uniform_buffer("top_k params", &TopKParams { n: n as u32, partials, _pad: [0; 2] });
        let row_params = gpu.storage_buffer("top_k row params", 16 * max_rows as u64);
        // Each partial's selection, laid out as `out`.
        let selections = gpu.storage_buffer("top_k selections", max_rows as u64 * partials as u64 * Self::OUT_BYTES);
        let buffers = [logits, &row_params, out, &selections, &params];
        let selected = partials as u64 * Self::OUT_BYTES;
        let op = Op {
            dispatches: vec![
                dispatch(gpu, &kernels::TOP_K, "partial", &[], &buffers, Grid::PerToken(partials), Traffic::fixed(4 * n as u64 + selected)),
                dispatch(gpu, &kernels::TOP_K, "finish", &[], &buffers, Grid::PerToken(1), Traffic::fixed(selected + Self::OUT_BYTES)),
            ],
        };
        Self { op, row_params, max_rows }
    }

    /// Words before a row's (id, logit) pairs.
    pub const HEADER_WORDS: usize = std::mem::size_of::<SelectionHeader>() / 4;
    /// Bytes of one row of `out`: the header and MAX_TOP_K (id, logit) pairs.
    pub const OUT_BYTES: u64 = (Self::HEADER_WORDS as u64 + 2 * MAX_TOP_K as u64) * 4;

    /// What each row selects.
    pub fn set(&self, gpu: &Gpu, rows: &[Selection]) {
        assert!(rows.len() <= self.max_rows, "{} top-k rows of at most {}", rows.len(), self.max_rows);
        let words: Vec<[u32; 4]> = rows
            .iter()
            .map(|row| [row.k.clamp(1, MAX_TOP_K) as u32, (1.0 / row.temperature).to_bits(), row.scored_token.unwrap_or(u32::MAX), 0])
            .collect();
        gpu.queue.write_buffer(&self.row_params, 0, bytemuck::cast_slice(&words));
    }

    /// Encodes the selection of the first `rows` rows.
    pub fn encode(&self, pass: &mut wgpu::ComputePass, rows: u32) {
        self.op.encode(pass, rows);
    }

    pub fn op(&self) -> &Op {
        &self.op
    }
}

/// What [`TopK`] selects from one row of logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Selection {
    /// Candidates, 1..=MAX_TOP_K.
    pub k: usize,
    /// Of the sampler's normaliser ([`Candidates::exp_sum`]).
    pub temperature: f32,
    /// A token whose logit comes back too ([`Candidates::scored_logit`]): the prompt token a
    /// prompt position scores. Below the vocabulary size.
    pub scored_token: Option<u32>,
}

impl Default for Selection {
    fn default() -> Self {
        Self { k: 1, temperature: 1.0, scored_token: None }
    }
}

/// The first words of a row [`TopK`] writes, as top_k.wgsl writes them.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SelectionHeader {
    max: f32,
    exp_sum: f32,
    softmax_sum: f32,
    /// Written 0 where the row scores no token.
    scored_logit: f32,
}

/// Top candidates read back from [`TopK`]: (id, logit) in rank order, the largest logit, the sums
/// of exp((logit - max) / temperature) and of exp(logit - max) over the whole vocabulary, and the
/// scored token's logit.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    pub tokens: Vec<(u32, f32)>,
    pub max: f32,
    pub exp_sum: f32,
    pub softmax_sum: f32,
    pub scored_logit: Option<f32>,
}

impl Candidates {
    pub fn from_words(words: &[u32], selection: &Selection) -> Self {
        let (header, pairs) = words.split_at(TopK::HEADER_WORDS);
        let header: SelectionHeader = bytemuck::pod_read_unaligned(bytemuck::cast_slice(header));
        let tokens = (0..selection.k.clamp(1, MAX_TOP_K)).map(|i| (pairs[2 * i], f32::from_bits(pairs[2 * i + 1]))).collect();
        let scored_logit = selection.scored_token.map(|_| header.scored_logit);
        Self { tokens, max: header.max, exp_sum: header.exp_sum, softmax_sum: header.softmax_sum, scored_logit }
    }

    /// The natural log of the softmax (at temperature 1) of a logit of this row.
    pub fn log_prob(&self, logit: f32) -> f32 {
        logit - self.max - self.softmax_sum.ln()
    }

    /// A candidate's logit, if `token` is one.
    pub fn logit_of(&self, token: u32) -> Option<f32> {
        self.tokens.iter().find(|c| c.0 == token).map(|c| c.1)
    }

    /// Whether every number read back is finite (not so when the logits were not).
    pub fn is_finite(&self) -> bool {
        self.max.is_finite() && self.exp_sum.is_finite() && self.softmax_sum.is_finite() && self.scored_logit.is_none_or(f32::is_finite)
    }
}

/// The uniform every token-wise op of a pass reads, rewritten before each pass.
pub fn step_buffer(gpu: &Gpu, step: StepParams) -> wgpu::Buffer {
    gpu.uniform_buffer("step", &step)
}
