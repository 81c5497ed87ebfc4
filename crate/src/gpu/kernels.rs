//! The kernel registry: one shader module per `shaders/*.wgsl` and module form, composed with the
//! shared pieces of `shaders/lib` and compiled once, and one pipeline per (kernel, module form,
//! entry point, override constants).

use std::collections::HashMap;
use std::sync::Mutex;

use super::{ops, Gpu};
use crate::model::PAGE_SIZE;
use crate::quant::DType;

/// How a kernel declares one binding of `@group(0)`, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// `var<storage, read>`
    Storage,
    /// `var<storage, read_write>`
    StorageMut,
    /// `var<uniform>`
    Uniform,
}

/// One WGSL file, the shared pieces it is composed with, and the bindings its entry points share.
#[derive(Debug)]
pub struct Kernel {
    pub name: &'static str,
    /// The kernel's own file, `shaders/NAME.wgsl`.
    pub source: &'static str,
    /// The pieces of `shaders/lib` it uses, put after its file.
    pub pieces: &'static [Piece],
    /// The KV pool types it has a module form for (`kv_t`): F32 alone when it binds no pool.
    pub kv_types: &'static [KvType],
    pub bindings: &'static [Binding],
    /// Every index stays inside its buffer whenever the host's params match the buffers (which
    /// ops.rs sizes together), so native backends may drop naga's runtime bounds checks.
    pub in_bounds: bool,
}

use Binding::{Storage, StorageMut, Uniform};

/// The element type of a kernel's workgroup tiles (`alias tile_t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TileType {
    #[default]
    F32,
    /// Needs the device feature SHADER_F16.
    F16,
}

/// The element type of the KV pool (`alias kv_t`; attention reads it four elements at a time as
/// `kv_quad_t`): what attention reads and, unless the pool is written through staging rows
/// ([`crate::model::KvPool::staged`]), what the q/k/v projection writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    #[default]
    F32,
    /// Half the memory and traffic of f32; needs the device feature SHADER_F16.
    F16,
    /// Blocks of Q8_BLOCK elements as int8 and an f32 scale (`d = max |x| / 127`, ggml's q8_0
    /// rule with the scale kept in f32): 1.125 bytes an element, on any device. A pool row is its
    /// kv_dim int8 values, four to a word, then its kv_dim / 32 scales.
    Q8_0,
}

/// Elements per scale of q8 blocks: a q8_0 KV pool's rows, and the decode GEMVs' inputs where
/// they are quantized ([`crate::GpuOptions::q8_activations`]; the weights' blocks are as long).
pub const Q8_BLOCK: usize = 32;

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

    /// Bytes of one pool row of `kv_dim` elements.
    pub fn row_bytes(self, kv_dim: usize) -> u64 {
        let kv_dim = kv_dim as u64;
        match self {
            KvType::F32 => 4 * kv_dim,
            KvType::F16 => 2 * kv_dim,
            KvType::Q8_0 => kv_dim + 4 * kv_dim / Q8_BLOCK as u64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// The WGSL type of the pool's array elements.
    fn shader_type(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "u32",
        }
    }

    /// The WGSL type attention reads the pool as: four elements at a time (a q8_0 word holds four).
    fn quad_shader_type(self) -> &'static str {
        match self {
            KvType::F32 => "vec4<f32>",
            KvType::F16 => "vec4<f16>",
            KvType::Q8_0 => "u32",
        }
    }

    /// Elements kv_store converts per thread (KV_STORE_UNIT): one, or a q8_0 block.
    pub fn store_unit(self) -> usize {
        match self {
            KvType::Q8_0 => Q8_BLOCK,
            _ => 1,
        }
    }

    /// Whether a pool of this type holds rows of `kv_dim` elements.
    pub fn fits(self, kv_dim: usize) -> bool {
        self != KvType::Q8_0 || kv_dim.is_multiple_of(Q8_BLOCK)
    }

    /// `values` (rows of a kv_dim that [`KvType::fits`]) as a pool of this type holds them.
    pub fn rounded(self, values: &[f32]) -> Vec<f32> {
        // Rows of one store unit: a pool's rows are whole units, each encoded on its own.
        let unit = self.store_unit();
        self.decode(&self.encode(values, unit), unit)
    }

    /// The bytes of a pool of this type holding `values`, rows of `kv_dim` elements.
    pub fn encode(self, values: &[f32], kv_dim: usize) -> Vec<u8> {
        assert!(self.fits(kv_dim) && values.len().is_multiple_of(kv_dim), "{} values in rows of {kv_dim}", values.len());
        match self {
            KvType::F32 => bytemuck::cast_slice(values).to_vec(),
            KvType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            KvType::Q8_0 => values
                .chunks(kv_dim)
                .flat_map(|row| {
                    let blocks: Vec<_> = row.chunks(Q8_BLOCK).map(quantize_q8_block).collect();
                    let mut bytes: Vec<u8> = blocks.iter().flat_map(|(_, quants)| quants.iter().map(|&q| q as u8)).collect();
                    bytes.extend(blocks.iter().flat_map(|(scale, _)| scale.to_le_bytes()));
                    bytes
                })
                .collect(),
        }
    }

    /// The values a pool of this type holds in `bytes`, rows of `kv_dim` elements.
    pub fn decode(self, bytes: &[u8], kv_dim: usize) -> Vec<f32> {
        match self {
            KvType::F32 => bytemuck::pod_collect_to_vec(bytes),
            KvType::F16 => bytes.chunks_exact(2).map(|h| half::f16::from_le_bytes([h[0], h[1]]).to_f32()).collect(),
            KvType::Q8_0 => bytes
                .chunks_exact(self.row_bytes(kv_dim) as usize)
                .flat_map(|row| {
                    let (quants, scales) = row.split_at(kv_dim);
                    quants.iter().enumerate().map(move |(i, &q)| {
                        let scale = &scales[4 * (i / Q8_BLOCK)..][..4];
                        q as i8 as f32 * f32::from_le_bytes(scale.try_into().unwrap())
                    })
                })
                .collect(),
        }
    }

    /// The types' names for an error message: "f32", "f16" or "q8_0".
    pub fn choices() -> String {
        crate::error::quoted_choices(&Self::ALL.map(KvType::name))
    }

    /// The type named as [`KvType::name`] gives it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A q8 block's scale and int8 values, as lib/q8_block.wgsl computes them: `d = max |x| / 127`,
/// `q = x / d` rounded half away from zero.
pub fn quantize_q8_block(block: &[f32]) -> (f32, Vec<i8>) {
    let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    (scale, block.iter().map(|&v| (v * inverse).round().clamp(-127.0, 127.0) as i8).collect())
}

/// The side of a prefill thread's register tile of sums (REGISTER_TILE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RegisterTile {
    /// 4 tokens x 4 rows, 256 threads per workgroup.
    #[default]
    X4,
    /// 8 tokens x 8 rows, 64 threads per workgroup: twice the FMAs per workgroup-memory read.
    X8,
}

impl RegisterTile {
    pub fn side(self) -> u32 {
        match self {
            RegisterTile::X4 => 4,
            RegisterTile::X8 => 8,
        }
    }
}

/// The square cooperative-matrix fragment matmul.wgsl's `tiled_coop` multiplies (f16 operands, f32
/// sums). Its side fixes the subgroup size the kernel runs with: 128 threads hold a 64 x 64 tile
/// in 2 x 2 fragments a subgroup, or a 128 x 128 one in 4 x 4 ([`CoopTile`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoopFragment {
    /// 8 x 8 in subgroups of 8 (lavapipe's, Apple's shape).
    Side8,
    /// 16 x 16 in subgroups of 32 (NVIDIA's tensor cores).
    Side16,
}

impl CoopFragment {
    /// Largest first: the one to take where an adapter lists both.
    pub const ALL: [CoopFragment; 2] = [CoopFragment::Side16, CoopFragment::Side8];

    pub fn side(self) -> u32 {
        match self {
            CoopFragment::Side8 => 8,
            CoopFragment::Side16 => 16,
        }
    }

    /// (64 / 2 side)^2 subgroups share 128 threads.
    pub fn subgroup_size(self) -> u32 {
        self.side() * self.side() / 8
    }
}

/// The workgroup tile of matmul.wgsl's `tiled_coop`: tokens and rows per workgroup of 128 threads
/// (COOP_TILE), each subgroup holding COOP_FRAGMENTS x COOP_FRAGMENTS accumulator fragments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CoopTile {
    /// 64 x 64, 2 x 2 fragments a subgroup.
    #[default]
    Medium,
    /// 128 x 128, 4 x 4 fragments a subgroup: each decoded weight serves twice the tokens and each
    /// staged byte twice the multiply-adds, in a quarter of the workgroups.
    Large,
}

impl CoopTile {
    pub const ALL: [CoopTile; 2] = [CoopTile::Medium, CoopTile::Large];

    /// Tokens (and rows) per workgroup.
    pub fn side(self) -> u32 {
        match self {
            CoopTile::Medium => 64,
            CoopTile::Large => 128,
        }
    }

    /// Fragments along each side of a subgroup's part of the tile.
    pub fn fragments(self) -> u32 {
        self.side() / 32
    }

    /// The tile of `side` tokens, as `bench --coop-tile` names it.
    pub fn from_side(side: u32) -> Option<CoopTile> {
        Self::ALL.into_iter().find(|tile| tile.side() == side)
    }
}

/// Which module a kernel makes: its pieces and file as they are (the default), or a variant
/// where the device has the features the variant needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModuleForm {
    /// The element type of workgroup tiles.
    pub tiles: TileType,
    /// Reduce with subgroup operations (needs the device feature SUBGROUP).
    pub subgroups: bool,
    /// The prefill threads' register tile.
    pub register_tile: RegisterTile,
    /// Add the prefill product on cooperative matrices of this fragment, `tiled_coop` (needs the
    /// device features EXPERIMENTAL_COOPERATIVE_MATRIX, SHADER_F16 and SUBGROUP).
    pub coop_matrix: Option<CoopFragment>,
    /// `tiled_coop`'s workgroup tile, in forms on cooperative matrices.
    pub coop_tile: CoopTile,
    /// The KV pool's element type, in kernels that touch the pool.
    pub kv: KvType,
}

/// A shared piece of WGSL (`shaders/lib/*.wgsl`) that kernels are composed with: the functions and
/// types several kernels or entry points use, written once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// The pass's `Step` uniform.
    Step,
    /// Weight decoding for every [`crate::quant::DType`].
    Weights,
    /// A matmul's fused input stage (INPUT).
    MatmulInput,
    /// A matmul's fused output stage (OUTPUT).
    MatmulOutput,
    /// The GEMVs' reduction over their workgroup: through subgroups or workgroup memory, by form.
    GemvReduction,
    /// What the prefill tiles stage.
    Tiles,
    /// The prefill product on cooperative matrices, in coop-matrix forms only.
    TiledCoop,
    /// Prefill attention on cooperative matrices, in coop-matrix forms only.
    AttendCoop,
    /// Where a q8_0 KV pool keeps an element, in q8_0 forms only.
    KvLayout,
    /// Reads of the KV pool's elements as f32, four at a time, by the form's [`KvType`].
    KvLoad,
    /// kv_store's conversion of a staged row's elements into the pool's type.
    KvStore,
    /// Quantizing a block of values to int8 and a scale, and reading them back.
    Q8Block,
    /// A sum over a workgroup of SUM_WG threads through workgroup memory.
    WorkgroupSum,
}

macro_rules! lib_file {
    ($file:literal) => {
        ($file, include_str!(concat!("../../../shaders/lib/", $file, ".wgsl")))
    };
}

/// Every file under `shaders/lib`, by name.
pub const LIBRARY: [(&str, &str); 16] = [
    lib_file!("step"),
    lib_file!("weights"),
    lib_file!("matmul_input"),
    lib_file!("matmul_output"),
    lib_file!("gemv_reduction_workgroup"),
    lib_file!("gemv_reduction_subgroup"),
    lib_file!("tiles"),
    lib_file!("tiled_coop"),
    lib_file!("attend_coop"),
    lib_file!("kv_layout_q8_0"),
    lib_file!("kv_load_plain"),
    lib_file!("kv_load_q8_0"),
    lib_file!("kv_store_plain"),
    lib_file!("kv_store_q8_0"),
    lib_file!("q8_block"),
    lib_file!("workgroup_sum"),
];

impl Piece {
    /// The library file this piece is in `form`, if it has one there.
    pub fn file(self, form: ModuleForm) -> Option<&'static str> {
        let name = match self {
            Piece::Step => "step",
            Piece::Weights => "weights",
            Piece::MatmulInput => "matmul_input",
            Piece::MatmulOutput => "matmul_output",
            Piece::GemvReduction if form.subgroups => "gemv_reduction_subgroup",
            Piece::GemvReduction => "gemv_reduction_workgroup",
            Piece::Tiles => "tiles",
            Piece::TiledCoop if form.coop_matrix.is_some() => "tiled_coop",
            Piece::AttendCoop if form.coop_matrix.is_some() => "attend_coop",
            Piece::TiledCoop | Piece::AttendCoop => return None,
            Piece::KvLayout if form.kv == KvType::Q8_0 => "kv_layout_q8_0",
            Piece::KvLayout => return None,
            Piece::KvLoad if form.kv == KvType::Q8_0 => "kv_load_q8_0",
            Piece::KvLoad => "kv_load_plain",
            Piece::KvStore if form.kv == KvType::Q8_0 => "kv_store_q8_0",
            Piece::KvStore => "kv_store_plain",
            Piece::Q8Block => "q8_block",
            Piece::WorkgroupSum => "workgroup_sum",
        };
        LIBRARY.iter().find(|(file, _)| *file == name).map(|(_, source)| *source)
    }
}

/// The constants every module starts with: sizes the host and the kernels must agree on, defined
/// once here instead of mirrored by hand in each file.
pub fn shader_constants() -> Vec<(String, u32)> {
    let mut constants: Vec<(String, u32)> = vec![
        ("MAX_BATCH_TOKENS".into(), ops::MAX_BATCH_TOKENS as u32),
        ("MAX_GEMV_COLUMNS".into(), ops::GEMV_COLUMNS),
        ("TILE".into(), ops::TILE),
        ("TILE_ROWS".into(), ops::TILE_ROWS),
        ("MAX_HEAD_DIM".into(), ops::MAX_HEAD_DIM as u32),
        ("MAX_QUERY_BLOCK".into(), ops::ATTENTION_QUERY_BLOCK),
        ("PREFILL_ROWS".into(), ops::ATTENTION_PREFILL_ROWS),
        ("PAGE_SIZE".into(), PAGE_SIZE as u32),
        ("Q8_BLOCK".into(), Q8_BLOCK as u32),
        ("SELECTION_WG".into(), ops::SELECTION_WG as u32),
        ("ARGMAX_PARTIALS".into(), ops::ARGMAX_PARTIALS as u32),
        ("TOP_K_PARTIALS".into(), ops::TOP_K_PARTIALS as u32),
        ("MAX_TOP_K".into(), ops::MAX_TOP_K as u32),
        ("SELECTION_HEADER".into(), ops::TopK::HEADER_WORDS as u32),
        ("INPUT_PLAIN".into(), ops::INPUT_PLAIN),
        ("INPUT_RMSNORM".into(), ops::INPUT_RMSNORM),
        ("INPUT_SILU_MUL".into(), ops::INPUT_SILU_MUL),
        ("OUTPUT_ROWS".into(), ops::OUTPUT_ROWS),
        ("OUTPUT_ROTARY".into(), ops::OUTPUT_ROTARY),
    ];
    // The iq4 formats' int8 levels, four a word (lib/weights.wgsl's iq4_levels).
    for (i, word) in crate::quant::IQ4_LEVELS.chunks_exact(4).enumerate() {
        constants.push((format!("IQ4_LEVELS_{i}"), u32::from_le_bytes([word[0] as u8, word[1] as u8, word[2] as u8, word[3] as u8])));
    }
    // iq1's offset of each weight from its grid value (lib/weights.wgsl's grid_group), as f32 bits.
    constants.push(("IQ1_DELTA_BITS".into(), crate::quant::IQ1_DELTA.to_bits()));
    for dtype in DType::ALL {
        let name = format!("DTYPE_{}", dtype.name().to_uppercase());
        let (elements, bytes) = dtype.block();
        constants.push((format!("{name}_BLOCK"), elements as u32));
        constants.push((format!("{name}_BLOCK_BYTES"), bytes as u32));
        constants.push((name, dtype.shader_code()));
    }
    constants
}

impl Kernel {
    /// Whether the kernel stages prefill tiles, so that it has an f16-tile form.
    pub fn has_tiles(&self) -> bool {
        self.pieces.contains(&Piece::Tiles)
    }

    /// Whether the kernel has a subgroup reduction to swap in.
    pub fn has_subgroup_form(&self) -> bool {
        self.pieces.contains(&Piece::GemvReduction)
    }

    /// Whether the kernel has a cooperative-matrix form.
    pub fn has_coop_form(&self) -> bool {
        self.pieces.contains(&Piece::TiledCoop) || self.pieces.contains(&Piece::AttendCoop)
    }

    /// The kernel's WGSL module in `form`: the enable directives the form needs (WGSL takes them
    /// only first, which is why each form is a module of its own), the constants from Rust
    /// ([`shader_constants`], the tile type, register tile, KV type and its store unit of the form), the kernel's file,
    /// then its pieces. The file goes before the pieces because it declares the overrides: naga
    /// 30 turns overrides into constants (at pipeline creation) in an order that panics when an
    /// override-sized array of a piece comes before them. The subgroup form has the `enable
    /// subgroups;` and `requires subgroup_id;` that WebGPU requires in the browser only: naga 30
    /// rejects those directives as not yet implemented (gfx-rs/wgpu#5555) and takes subgroup
    /// operations without them.
    pub fn source_for(&self, form: ModuleForm) -> String {
        let mut source = String::new();
        if cfg!(target_arch = "wasm32") && form.subgroups {
            source.push_str("enable subgroups;\nrequires subgroup_id;\n");
        }
        if form.tiles == TileType::F16 || form.coop_matrix.is_some() || form.kv == KvType::F16 {
            source.push_str("enable f16;\n");
        }
        if let Some(fragment) = form.coop_matrix {
            let side = fragment.side();
            source.push_str(&format!(
                "enable wgpu_cooperative_matrix;\nconst COOP_SIDE: u32 = {side}u;\nconst COOP_SUBGROUP: u32 = {}u;\nconst COOP_TILE: u32 = {}u;\nconst COOP_FRAGMENTS: u32 = {}u;\n",
                fragment.subgroup_size(),
                form.coop_tile.side(),
                form.coop_tile.fragments()
            ));
            for (alias, role, scalar) in [("coop_a", "A", "f16"), ("coop_b", "B", "f16"), ("coop_c", "C", "f32")] {
                source.push_str(&format!("alias {alias} = coop_mat{side}x{side}<{scalar}, {role}>;\n"));
            }
        }
        for (name, value) in shader_constants() {
            source.push_str(&format!("const {name}: u32 = {value}u;\n"));
        }
        let tile_type = match form.tiles {
            TileType::F32 => "f32",
            TileType::F16 => "f16",
        };
        source.push_str(&format!("alias tile_t = {tile_type};\nconst REGISTER_TILE: u32 = {}u;\n", form.register_tile.side()));
        source.push_str(&format!(
            "alias kv_t = {};\nalias kv_quad_t = {};\nconst KV_STORE_UNIT: u32 = {}u;\n",
            form.kv.shader_type(),
            form.kv.quad_shader_type(),
            form.kv.store_unit()
        ));
        source.push_str(self.source);
        for piece in self.pieces {
            if let Some(text) = piece.file(form) {
                source.push_str(text);
            }
        }
        source
    }
}

macro_rules! kernel {
    ($ident:ident, $file:literal, [$($piece:ident),*], [$($binding:expr),*], in_bounds: $in_bounds:literal, kv_types: [$($kv:ident),*]) => {
        pub const $ident: Kernel = Kernel {
            name: $file,
            source: include_str!(concat!("../../../shaders/", $file, ".wgsl")),
            pieces: &[$(Piece::$piece),*],
            kv_types: &[$(KvType::$kv),*],
            bindings: &[$($binding),*],
            in_bounds: $in_bounds,
        };
    };
}

// The hot kernel: rows, columns and tokens are checked against params; reads past a part's
// last row stay within the padding of its last word. Its rotary output writes f32 or f16 pools
// itself; q8_0 ones through staging rows in f32 and kv_store.
kernel!(MATMUL, "matmul", [Step, Weights, MatmulInput, MatmulOutput, GemvReduction, Q8Block, Tiles, TiledCoop],
    [Storage, Storage, Storage, StorageMut, Uniform, Uniform, Storage, StorageMut, StorageMut, Storage], in_bounds: true, kv_types: [F32, F16]);
kernel!(QUANTIZE, "quantize", [Step, MatmulInput, Q8Block, WorkgroupSum], [Storage, Storage, StorageMut, Uniform, Uniform], in_bounds: false, kv_types: [F32]);
kernel!(ATTENTION, "attention", [Step, KvLayout, Q8Block, KvLoad, AttendCoop], [Storage, Storage, Storage, Storage, StorageMut, StorageMut, Uniform, Uniform], in_bounds: false, kv_types: [F32, F16, Q8_0]);
kernel!(KV_STORE, "kv_store", [Step, KvLayout, Q8Block, KvStore], [Storage, Storage, StorageMut, StorageMut, Uniform, Uniform], in_bounds: false, kv_types: [F32, F16, Q8_0]);
kernel!(ARGMAX, "argmax", [], [Storage, StorageMut, StorageMut, Uniform], in_bounds: false, kv_types: [F32]);
kernel!(TOP_K, "top_k", [WorkgroupSum], [Storage, Storage, StorageMut, StorageMut, Uniform], in_bounds: false, kv_types: [F32]);
kernel!(FILL, "fill", [], [StorageMut, Uniform], in_bounds: false, kv_types: [F32]);

/// Every kernel the engine uses.
pub const KERNELS: [&Kernel; 7] = [&MATMUL, &QUANTIZE, &ATTENTION, &KV_STORE, &ARGMAX, &TOP_K, &FILL];

struct Module {
    shader: wgpu::ShaderModule,
    bind_group_layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
}

#[derive(Default)]
pub(super) struct Registry {
    modules: Mutex<HashMap<(&'static str, ModuleForm), Module>>,
    pipelines: Mutex<HashMap<String, Pipeline>>,
}

/// A compute pipeline with the layout its bind groups are made from.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

impl Gpu {
    /// The pipeline for `entry` of `kernel` in `form` with the given override constants, made once
    /// and shared.
    pub fn pipeline(&self, kernel: &Kernel, form: ModuleForm, entry: &str, constants: &[(&str, f64)]) -> Pipeline {
        let key = format!("{}:{form:?}:{entry}:{constants:?}", kernel.name);
        let mut pipelines = self.kernels.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pipeline) = pipelines.get(&key) {
            return pipeline.clone();
        }
        let mut modules = self.kernels.modules.lock().unwrap_or_else(|e| e.into_inner());
        let module = modules.entry((kernel.name, form)).or_insert_with(|| self.compile(kernel, form));
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key),
            layout: Some(&module.pipeline_layout),
            module: &module.shader,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants, ..Default::default() },
            cache: None,
        });
        let pipeline = Pipeline { pipeline, layout: module.bind_group_layout.clone() };
        pipelines.insert(key, pipeline.clone());
        pipeline
    }

    fn compile(&self, kernel: &Kernel, form: ModuleForm) -> Module {
        let descriptor = wgpu::ShaderModuleDescriptor { label: Some(kernel.name), source: wgpu::ShaderSource::Wgsl(kernel.source_for(form).into()) };
        // naga's loop bounding (a hidden counter in every loop) hides each loop's trip count from
        // the driver's compiler, which then cannot unroll the loops over the kernels' small
        // register arrays (GEMV sums, tile accumulators) and keeps those in local memory
        // (bench/NOTES.md has what it cost). Every loop of these kernels ends by construction.
        // In-bounds kernels also drop the bounds and division checks: ops.rs validates their params.
        let trusted = kernel.in_bounds && !self.bounds_checks;
        let checks = wgpu::ShaderRuntimeChecks {
            bounds_checks: !trusted,
            int_div_checks: !trusted,
            force_loop_bounding: false,
            ..wgpu::ShaderRuntimeChecks::checked()
        };
        // SAFETY: no kernel loops forever (each loop counts up to a bound its params fix), and
        // an in-bounds kernel indexes only inside its buffers (Kernel::in_bounds); the kernel
        // tests run with and without the bounds checks. Browsers keep their own checks.
        let shader = unsafe { self.device.create_shader_module_trusted(descriptor, checks) };
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings
            .iter()
            .enumerate()
            .map(|(i, binding)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match binding {
                    Storage | StorageMut => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: *binding == Storage },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let bind_group_layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(kernel.name),
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(kernel.name),
            bind_group_layouts: &[Some(&bind_group_layout)],
            immediate_size: 0,
        });
        Module { shader, bind_group_layout, pipeline_layout }
    }
}
