//! The GPU layer: adapter choice, feature and limit negotiation, weight buffers split over the
//! binding limit, the kernel registry and readback.

#[cfg(target_arch = "wasm32")]
mod browser;
mod kernels;
pub mod ops;
mod profile;
mod readback;
mod self_test;
mod tensor;

use std::sync::{Arc, Mutex};

pub use kernels::{shader_constants, Binding, CoopFragment, CoopTile, Kernel, KvType, ModuleForm, Piece, RegisterTile, TileType, KERNELS, LIBRARY, Q8_BLOCK, quantize_q8_block};
pub use profile::{DispatchTime, Timestamps};
#[cfg(target_arch = "wasm32")]
pub use browser::navigator_gpu;
pub use self_test::self_test;
pub use tensor::{PartBytes, WeightMatrix};

/// Picks an adapter by a case-insensitive substring of its name or backend ("vulkan", "llvmpipe", ...).
pub const ADAPTER_ENV: &str = "LLAMA_WEBGPU_ADAPTER";

#[derive(Clone, Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found{}", match .wanted { Some(w) => format!(" matching {w:?} (available: {})", .available.join(", ")), None => String::new() })]
    NoAdapter { wanted: Option<String>, available: Vec<String> },
    #[error("the GPU adapter {adapter:?} is short of limit {name}: needed {needed}, available {available}")]
    Limit { adapter: String, name: &'static str, needed: u64, available: u64 },
    #[error("requesting a device from {adapter:?} failed: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    #[error("the GPU reported an error: {0}")]
    Validation(String),
    #[error("out of GPU memory allocating {what} ({bytes} bytes)")]
    OutOfMemory { what: String, bytes: u64 },
    #[error("tensor {tensor} has rows of {cols} {dtype} elements; the kernels need whole blocks filling 4-byte words")]
    RowLayout { tensor: String, cols: usize, dtype: crate::quant::DType },
    #[error("the GPU failed its self-test, so it would compute garbage (a broken adapter or driver?): {0}")]
    SelfTest(String),
    #[error("reading back from the GPU failed: {0}")]
    Readback(String),
    #[error("GPU option {name} is {value}; it takes {allowed}")]
    InvalidOption { name: &'static str, value: u32, allowed: &'static str },
    #[error("the GPU adapter {0:?} has no timestamp queries (wgpu feature TIMESTAMP_QUERY), so dispatches cannot be timed")]
    NoTimestamps(String),
    #[error("{option} needs the GPU feature {feature}, which the adapter {adapter:?} lacks")]
    MissingFeature { option: &'static str, feature: &'static str, adapter: String },
}

/// How to choose and configure the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Substring of the adapter name or backend; falls back to `LLAMA_WEBGPU_ADAPTER`, then to the
    /// high-performance adapter.
    pub adapter: Option<String>,
    /// Prefer the low-power adapter when none is named.
    pub low_power: bool,
    /// Caps `max_storage_buffer_binding_size` below the adapter's, e.g. to mimic a browser's 128 MiB.
    pub max_storage_binding: Option<u64>,
    /// Request timestamp queries where the adapter has them (for profiling dispatches).
    pub timestamps: bool,
    /// Keep naga's runtime bounds checks in every kernel, also those in bounds by construction
    /// (`Kernel::in_bounds`), which otherwise run without them on native backends.
    pub bounds_checks: bool,
    /// Stage prefill matmul tiles as f16 (products and sums in f32) where the adapter has
    /// shader-f16: half the workgroup memory, but its logits leave the f32 goldens' 1e-4
    /// tolerance, so off unless asked for.
    pub f16_tiles: bool,
    /// Reduce the decode GEMVs through workgroup memory even where the adapter has subgroups, as
    /// on adapters without them (for comparison); SUBGROUP is then not requested.
    pub no_subgroups: bool,
    /// Rows per workgroup of the decode GEMVs, 1, 2 or 4, for every matrix instead of the choice
    /// by matrix size (`ops::gemv_rows`; q/k/v's rotary output takes at least 2); for tuning.
    pub gemv_rows: Option<u32>,
    /// The most tokens, 1 to 512, a pass runs its matmuls as GEMVs with (up to `ops::GEMV_COLUMNS`
    /// tokens per workgroup); more run as tiles. `ops::DEFAULT_GEMV_MAX_TOKENS` where not given;
    /// for tuning.
    pub gemv_max_tokens: Option<u32>,
    /// The side of a prefill thread's register tile of sums, 4 (the default) or 8; for tuning.
    pub register_tile: Option<u32>,
    /// The most splits a decode step cuts its keys into, 1 to 256 (`ops::MAX_KEY_SPLITS`, the
    /// default); 1 attends without splits or their merge. For tuning.
    pub max_key_splits: Option<u32>,
    /// Merge attention's key splits (and a pool's buffers) in a dispatch of their own also where
    /// the last split to finish can merge them (Vulkan: see [`Gpu::merge_in_last_split`]); for
    /// comparison, or to step around a driver's bug.
    pub separate_split_merge: bool,
    /// Run prefill on the portable tiles even where the adapter has cooperative matrices (tensor
    /// cores) that `tiled_coop` and `attend_coop` can use; for comparison, or to step around a
    /// driver's bug.
    pub no_coop_matrix: bool,
    /// Where prefill's matmuls run on cooperative matrices, keep its attention on the portable
    /// tiles (`attend_tiles`); for comparison.
    pub no_coop_attention: bool,
    /// The workgroup tile of every prefill product on cooperative matrices, 64 or 128 tokens and
    /// rows, instead of the choice by the pass's size (`ops::LARGE_COOP_TILE_WORKGROUPS`); for tuning.
    pub coop_tile: Option<u32>,
    /// The KV pool's element type: f16 where the adapter has shader-f16 (half the memory of f32,
    /// logits within about 1e-2 of it), f32 elsewhere, unless given.
    pub kv_type: Option<KvType>,
    /// Matmuls of block-quantized weights (the llama.cpp formats) take their inputs quantized
    /// to blocks of 32 int8 values and a scale (a dispatch per matrix quantizes them); the decode
    /// GEMVs multiply them with 4-wide integer dot products, as llama.cpp's mul_mat_vec_q (a
    /// quarter of the input bytes and far fewer instructions per weight), the prefill tiles stage
    /// them dequantized. At the cost of exact f32 inputs: logits within 0.2 of their spread on the
    /// random-weight fixtures. Off unless asked for.
    pub q8_activations: bool,
    /// Decode quant values with the GPU's integer-to-float conversion instead of from float bits
    /// (weights.wgsl's `quant_values`: the same values); for comparison.
    pub int_conversions: bool,
}

/// Storage buffers of the kernel with the most (matmul.wgsl); WebGPU grants 8 everywhere.
const STORAGE_BUFFERS: u64 = 8;

/// Workgroup memory of the kernel entry point with the most (attention.wgsl's `attend`); a test
/// checks every kernel against it.
pub const WORKGROUP_STORAGE: u64 = 13316;
/// Workgroup memory of the kernel entry point on cooperative matrices with the most (attention.wgsl's
/// `attend_coop`), which run only where the adapter has this much.
pub const COOP_WORKGROUP_STORAGE: u64 = 32256;

/// A limit's name, how to read it, and the least the engine needs of it.
type Requirement = (&'static str, fn(&wgpu::Limits) -> u64, u64);

/// What the engine needs from every adapter, whatever the model.
const REQUIRED: [Requirement; 6] = [
    ("max_compute_invocations_per_workgroup", |l| l.max_compute_invocations_per_workgroup as u64, 256),
    ("max_compute_workgroup_size_x", |l| l.max_compute_workgroup_size_x as u64, 256),
    ("max_compute_workgroup_size_y", |l| l.max_compute_workgroup_size_y as u64, 16),
    ("max_compute_workgroup_storage_size", |l| l.max_compute_workgroup_storage_size as u64, WORKGROUP_STORAGE),
    ("max_storage_buffers_per_shader_stage", |l| l.max_storage_buffers_per_shader_stage as u64, STORAGE_BUFFERS),
    ("max_uniform_buffers_per_shader_stage", |l| l.max_uniform_buffers_per_shader_stage as u64, 2),
];

/// A device and queue with the features and limits negotiated for the engine.
#[derive(Clone)]
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The limits granted, which the engine sizes its buffers by.
    pub limits: wgpu::Limits,
    /// Optional features granted (shader-f16, subgroups, timestamp queries); nothing requires them.
    pub features: wgpu::Features,
    /// See [`GpuOptions::bounds_checks`].
    pub bounds_checks: bool,
    /// The element type of prefill matmul tiles: f16 when asked for and granted (SHADER_F16).
    pub tile_type: TileType,
    /// The decode GEMVs reduce with subgroup operations: SUBGROUP granted and not turned off.
    pub subgroups: bool,
    /// Prefill runs on cooperative matrices of this fragment (matmul.wgsl's `tiled_coop`): see
    /// [`coop_fragment`].
    pub coop_matrix: Option<CoopFragment>,
    /// Prefill attention runs on the same cooperative matrices (attention.wgsl's `attend_coop`,
    /// for heads of 64 or 128 dimensions) unless [`GpuOptions::no_coop_attention`].
    pub coop_attention: bool,
    /// See [`GpuOptions::coop_tile`].
    pub coop_tile: Option<CoopTile>,
    /// The KV pool's element type (see [`GpuOptions::kv_type`]).
    pub kv_type: KvType,
    /// The cooperative-matrix configurations the adapter lists (empty without the feature).
    pub coop_matrix_properties: Vec<wgpu::CooperativeMatrixProperties>,
    /// See [`GpuOptions::gemv_rows`].
    pub gemv_rows: Option<u32>,
    /// See [`GpuOptions::gemv_max_tokens`].
    pub gemv_max_tokens: u32,
    /// See [`GpuOptions::register_tile`].
    pub register_tile: RegisterTile,
    /// See [`GpuOptions::max_key_splits`].
    pub max_key_splits: Option<u32>,
    /// The last of a query block's key splits to finish merges their partials, saving attention's
    /// merge dispatch. It counts the splits' arrivals with an atomic add and relies on storage
    /// barriers ordering memory device-wide, which naga's SPIR-V gives (Device scope) but WGSL does
    /// not promise: Vulkan only, unless [`GpuOptions::separate_split_merge`].
    pub merge_in_last_split: bool,
    /// See [`GpuOptions::q8_activations`].
    pub q8_activations: bool,
    /// See [`GpuOptions::int_conversions`].
    pub int_conversions: bool,
    /// Two small buffers for writable bindings a dispatch does not use: WebGPU forbids binding
    /// one buffer to two writable bindings of a dispatch, so `out` cannot fill them.
    pub unused_writable: [wgpu::Buffer; 2],
    kernels: Arc<kernels::Registry>,
    failure: Arc<Mutex<Option<GpuError>>>,
}

impl Gpu {
    pub async fn new(options: &GpuOptions) -> Result<Self, GpuError> {
        if let Some(rows) = options.gemv_rows.filter(|rows| ![1, 2, 4].contains(rows)) {
            return Err(GpuError::InvalidOption { name: "gemv_rows", value: rows, allowed: "1, 2 or 4" });
        }
        if let Some(tokens) = options.gemv_max_tokens.filter(|n| !(1..=ops::MAX_BATCH_TOKENS as u32).contains(n)) {
            return Err(GpuError::InvalidOption { name: "gemv_max_tokens", value: tokens, allowed: "1 to 512" });
        }
        if let Some(splits) = options.max_key_splits.filter(|n| !(1..=ops::MAX_KEY_SPLITS).contains(n)) {
            return Err(GpuError::InvalidOption { name: "max_key_splits", value: splits, allowed: "1 to 256" });
        }
        let register_tile = match options.register_tile {
            None | Some(4) => RegisterTile::X4,
            Some(8) => RegisterTile::X8,
            Some(side) => return Err(GpuError::InvalidOption { name: "register_tile", value: side, allowed: "4 or 8" }),
        };
        let coop_tile = options
            .coop_tile
            .map(|side| CoopTile::from_side(side).ok_or(GpuError::InvalidOption { name: "coop_tile", value: side, allowed: "64 or 128" }))
            .transpose()?;
        let instance = instance();
        let adapter = choose_adapter(&instance, options).await?;
        let mut info = adapter.get_info();
        if info.name.is_empty() {
            // Browsers do not name their adapter to wgpu; errors still say which API it is.
            info.name = format!("{:?} adapter", info.backend);
        }
        let available = adapter.limits();
        for (name, get, needed) in REQUIRED {
            if get(&available) < needed {
                return Err(GpuError::Limit { adapter: info.name.clone(), name, needed, available: get(&available) });
            }
        }
        let mut limits = wgpu::Limits::downlevel_defaults();
        limits.max_storage_buffer_binding_size = available.max_storage_buffer_binding_size;
        limits.max_buffer_size = available.max_buffer_size;
        limits.max_compute_workgroups_per_dimension = available.max_compute_workgroups_per_dimension;
        limits.max_compute_workgroup_storage_size = available.max_compute_workgroup_storage_size;
        limits.max_storage_buffers_per_shader_stage = STORAGE_BUFFERS as u32;
        if let Some(cap) = options.max_storage_binding {
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }
        let coop_matrix = if options.no_coop_matrix { None } else { coop_fragment(&adapter, &info, &available) };
        let mut wanted = wgpu::Features::SHADER_F16;
        if !options.no_subgroups || coop_matrix.is_some() {
            wanted |= wgpu::Features::SUBGROUP;
        }
        if coop_matrix.is_some() {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        if options.timestamps {
            wanted |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let features = adapter.features() & wanted;
        let kv_type = match options.kv_type {
            Some(KvType::F16) if !features.contains(wgpu::Features::SHADER_F16) => {
                return Err(GpuError::MissingFeature { option: "kv_type f16", feature: "shader-f16", adapter: info.name.clone() });
            }
            Some(kv_type) => kv_type,
            None if features.contains(wgpu::Features::SHADER_F16) => KvType::F16,
            None => KvType::F32,
        };
        // SAFETY: wgpu's experimental cooperative matrices are used by tiled_coop alone, in the one
        // configuration the adapter lists (coop_fragment), and checked against the CPU at load
        // (self_test); the token is only given when that kernel will run.
        let experimental_features =
            if coop_matrix.is_some() { unsafe { wgpu::ExperimentalFeatures::enabled() } } else { wgpu::ExperimentalFeatures::disabled() };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("llama-webgpu"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features,
                ..Default::default()
            })
            .await
            .map_err(|e| GpuError::RequestDevice { adapter: info.name.clone(), message: e.to_string() })?;
        // What wgpu's browser backend cannot tell (gpu/browser.rs).
        #[cfg(target_arch = "wasm32")]
        let features = features | browser::granted(&device);

        // Errors surface as values on the next readback instead of wgpu's default panic.
        let failure = Arc::new(Mutex::new(None));
        let slot = failure.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(GpuError::Validation(error.to_string()));
        }));
        let slot = failure.clone();
        device.set_device_lost_callback(move |reason, message| {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(GpuError::DeviceLost(format!("{reason:?}: {message}")));
        });
        let tile_type = if options.f16_tiles && features.contains(wgpu::Features::SHADER_F16) { TileType::F16 } else { TileType::F32 };
        let subgroups = features.contains(wgpu::Features::SUBGROUP) && !options.no_subgroups;
        let merge_in_last_split = info.backend == wgpu::Backend::Vulkan && !options.separate_split_merge;
        log::info!(
            "adapter {:?} ({:?}), features {:?}, prefill tiles {tile_type:?}, subgroup reductions {subgroups}, cooperative matrices {coop_matrix:?}, KV {kv_type:?}, key splits merged by the last {merge_in_last_split}, q8 activations {}",
            info.name,
            info.backend,
            features,
            options.q8_activations
        );
        let unused_writable = [0, 1].map(|_| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("unused writable binding"),
                size: whole_vec4s(0),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        });
        Ok(Self {
            device,
            queue,
            unused_writable,
            info,
            limits,
            features,
            bounds_checks: options.bounds_checks,
            tile_type,
            subgroups,
            coop_matrix,
            coop_attention: coop_matrix.is_some() && !options.no_coop_attention,
            coop_tile,
            kv_type,
            coop_matrix_properties: adapter.cooperative_matrix_properties(),
            gemv_rows: options.gemv_rows,
            gemv_max_tokens: options.gemv_max_tokens.unwrap_or(ops::DEFAULT_GEMV_MAX_TOKENS),
            register_tile,
            max_key_splits: options.max_key_splits,
            merge_in_last_split,
            q8_activations: options.q8_activations,
            int_conversions: options.int_conversions,
            kernels: Default::default(),
            failure,
        })
    }

    /// The first error the device reported since it was created, if any: a lost device or a
    /// failed validation leaves the engine unusable.
    pub fn check(&self) -> Result<(), GpuError> {
        match &*self.failure.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(error) => Err(error.clone()),
        }
    }

    /// Fails with a named limit when one buffer of `bytes` cannot be bound as a whole.
    pub fn check_binding(&self, what: &'static str, bytes: u64) -> Result<(), GpuError> {
        let available = self.max_binding();
        if bytes > available {
            return Err(GpuError::Limit {
                adapter: self.info.name.clone(),
                name: what,
                needed: bytes,
                available,
            });
        }
        Ok(())
    }

    /// The largest buffer a kernel can bind.
    pub fn max_binding(&self) -> u64 {
        // Whole vec4s, as storage_buffer makes them.
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size) / 16 * 16
    }

    /// A storage buffer of `bytes` (rounded up by [`whole_vec4s`]), zeroed, usable as kernel input
    /// and output and for copies.
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: whole_vec4s(bytes),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer holding `data`.
    pub fn storage_buffer_with<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        let buffer = self.storage_buffer(label, std::mem::size_of_val(data) as u64);
        self.queue.write_buffer(&buffer, 0, bytemuck::cast_slice(data));
        buffer
    }

    /// A storage buffer holding `values`, rows of `kv_dim`, as the KV pool's type stores them.
    pub fn kv_buffer_with(&self, label: &str, values: &[f32], kv_dim: usize) -> wgpu::Buffer {
        self.storage_buffer_with(label, &self.kv_type.encode(values, kv_dim))
    }

    /// A uniform buffer holding `value`.
    pub fn uniform_buffer<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: std::mem::size_of::<T>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buffer, 0, bytemuck::bytes_of(value));
        buffer
    }

    /// Copies `bytes` from the start of `buffer` back to the host through a new staging buffer.
    pub async fn read(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let staging = self.readback_buffer("readback", bytes);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, staging.size());
        self.queue.submit([encoder.finish()]);
        self.read_mapped(&staging, bytes).await
    }

    /// A buffer the host can map to read what a command buffer copied into it, as large as a
    /// storage buffer of `bytes` (so that a whole one copies into it).
    pub fn readback_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: whole_vec4s(bytes),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Waits for the submitted work, then reads the first `bytes` of a readback buffer.
    pub async fn read_mapped(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        readback::read_mapped(self, staging, bytes, None).await
    }

    /// Like [`Gpu::read_mapped`], but waits only for `submission` (the one that wrote the buffer),
    /// not for work submitted after it.
    pub async fn read_mapped_after(&self, staging: &wgpu::Buffer, bytes: u64, submission: wgpu::SubmissionIndex) -> Result<Vec<u8>, GpuError> {
        readback::read_mapped(self, staging, bytes, Some(submission)).await
    }

    /// Runs `encode` in one compute pass, submits it and waits for the GPU.
    pub async fn run(&self, encode: impl FnOnce(&mut wgpu::ComputePass)) -> Result<(), GpuError> {
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            encode(&mut pass);
        }
        self.queue.submit([encoder.finish()]);
        readback::wait(self).await
    }
}

/// The fragment matmul.wgsl's `tiled_coop` runs on with `adapter`, if any: cooperative matrices of
/// that side with f16 operands and f32 sums (NVIDIA's Vulkan driver lists 16x16x16,
/// lavapipe 8x8x8), shader-f16 and subgroups, a subgroup size fixed at the one the fragment's
/// kernel is cut for, and the workgroup memory the kernel takes.
pub fn coop_fragment(adapter: &wgpu::Adapter, info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Option<CoopFragment> {
    use wgpu::CooperativeScalarType::{F16, F32};
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
    if !adapter.features().contains(needed) || (limits.max_compute_workgroup_storage_size as u64) < COOP_WORKGROUP_STORAGE {
        return None;
    }
    let listed = adapter.cooperative_matrix_properties();
    CoopFragment::ALL.into_iter().find(|fragment| {
        let side = fragment.side();
        listed.iter().any(|p| (p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type) == (side, side, side, F16, F32))
            && (info.subgroup_min_size, info.subgroup_max_size) == (fragment.subgroup_size(), fragment.subgroup_size())
    })
}

/// A buffer size: `bytes` rounded up to whole vec4s, so kernels may read f32 arrays 4 elements at
/// a time (matmul.wgsl's inputs).
fn whole_vec4s(bytes: u64) -> u64 {
    bytes.max(16).next_multiple_of(16)
}

/// Lists every adapter as "name (backend)", for `info` and for errors.
pub async fn adapter_names() -> Vec<String> {
    let instance = instance();
    instance.enumerate_adapters(wgpu::Backends::all()).await.iter().map(describe).collect()
}

/// Vulkan, Metal, DX12 or the browser's WebGPU unless WGPU_BACKEND says otherwise: the GL backend
/// lacks storage buffers in compute on many drivers.
fn instance() -> wgpu::Instance {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    wgpu::Instance::new(descriptor)
}

fn describe(adapter: &wgpu::Adapter) -> String {
    let info = adapter.get_info();
    format!("{} ({:?})", info.name, info.backend)
}

async fn choose_adapter(instance: &wgpu::Instance, options: &GpuOptions) -> Result<wgpu::Adapter, GpuError> {
    let wanted = options.adapter.clone().or_else(|| std::env::var(ADAPTER_ENV).ok()).filter(|w| !w.is_empty());
    if let Some(wanted) = wanted {
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let needle = wanted.to_lowercase();
        let available: Vec<String> = adapters.iter().map(describe).collect();
        return adapters
            .into_iter()
            .find(|a| describe(a).to_lowercase().contains(&needle))
            .ok_or(GpuError::NoAdapter { wanted: Some(wanted), available });
    }
    let power_preference =
        if options.low_power { wgpu::PowerPreference::LowPower } else { wgpu::PowerPreference::HighPerformance };
    let request = || instance.request_adapter(&wgpu::RequestAdapterOptions { power_preference, ..Default::default() });
    #[cfg(target_arch = "wasm32")]
    let request = || match options.no_subgroups {
        true => request(),
        false => browser::with_subgroups_requested(request),
    };
    request().await.map_err(|_| GpuError::NoAdapter { wanted: None, available: vec![] })
}
