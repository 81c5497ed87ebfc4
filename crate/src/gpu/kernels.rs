//! The kernel registry: one shader module per `shaders/*.wgsl` (and module form), compiled once,
//! and one pipeline per (kernel, module form, entry point, override constants).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use super::Gpu;

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

/// One WGSL file and the bindings its entry points share.
#[derive(Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub bindings: &'static [Binding],
    /// Every index stays inside its buffer whenever the host's params match the buffers (which
    /// ops.rs sizes together), so native backends may drop naga's runtime bounds checks.
    pub in_bounds: bool,
}

use Binding::{Storage, StorageMut, Uniform};

/// The element type of a kernel's workgroup tiles (matmul.wgsl's `alias tile_t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TileType {
    #[default]
    F32,
    /// Needs the device feature SHADER_F16.
    F16,
}

/// The side of a prefill thread's register tile of sums (matmul.wgsl's REGISTER_TILE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RegisterTile {
    /// 4 tokens x 4 rows, 256 threads per workgroup: the file as it is.
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

/// Which module a kernel's file makes: the file as it is (the default), or a variant of it made by
/// [`Kernel::source_for`], where the device has the features the variant needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModuleForm {
    /// The element type of workgroup tiles.
    pub tiles: TileType,
    /// Reduce with subgroup operations (needs the device feature SUBGROUP).
    pub subgroups: bool,
    /// The prefill threads' register tile.
    pub register_tile: RegisterTile,
}

/// The line of a shader file that declares its tile type; the file as it is uses f32.
const F32_TILES: &str = "alias tile_t = f32;";
/// The line of a shader file that sets its register tile; the file as it is uses 4.
const REGISTER_TILE_4: &str = "const REGISTER_TILE: u32 = 4u;";
/// The workgroup-memory reduction of a shader file, and the subgroup reduction commented out
/// after it that replaces it in the subgroup form.
const WORKGROUP_REDUCTION: (&str, &str) = ("// workgroup reduction {", "// } workgroup reduction");
const SUBGROUP_REDUCTION: (&str, &str) = ("/* subgroup reduction {", "} subgroup reduction */");

/// `source` split around the `(start, end)` markers: before, between, after.
fn split_around<'a>(source: &'a str, (start, end): (&str, &str)) -> Option<(&'a str, &'a str, &'a str)> {
    let (before, rest) = source.split_once(start)?;
    let (between, after) = rest.split_once(end)?;
    Some((before, between, after))
}

impl Kernel {
    /// Whether the kernel declares a tile type, so that it has an f16 form.
    pub fn has_tiles(&self) -> bool {
        self.source.contains(F32_TILES)
    }

    /// Whether the kernel has a subgroup reduction to swap in.
    pub fn has_subgroup_form(&self) -> bool {
        self.subgroup_reduction().is_some()
    }

    /// The file with its workgroup-memory reduction replaced by the commented subgroup one.
    fn subgroup_reduction(&self) -> Option<String> {
        let (head, _, rest) = split_around(self.source, WORKGROUP_REDUCTION)?;
        let (middle, subgroup, tail) = split_around(rest, SUBGROUP_REDUCTION)?;
        Some(format!("{head}{subgroup}{middle}{tail}"))
    }

    /// The kernel's WGSL in `form`: the file as it is for the default form. The 8x8 register tile
    /// sets REGISTER_TILE to 8, from which the workgroup size and staging follow. With f16 tiles the
    /// alias names f16 and `enable f16;` leads the module (WGSL takes it only there, which is why
    /// each form is a module of its own). The subgroup form swaps in the subgroup reduction
    /// (a kernel without one stays as it is). It omits the `enable subgroups;` that WebGPU
    /// requires: naga 30 rejects that directive as not yet implemented (gfx-rs/wgpu#5555) and
    /// takes subgroup operations without it, and wgpu 30's browser backend never grants SUBGROUP,
    /// so browsers always get the workgroup-memory form.
    pub fn source_for(&self, form: ModuleForm) -> Cow<'static, str> {
        let mut source = Cow::Borrowed(self.source);
        if form.subgroups {
            if let Some(swapped) = self.subgroup_reduction() {
                source = Cow::Owned(swapped);
            }
        }
        if form.register_tile == RegisterTile::X8 {
            source = Cow::Owned(source.replacen(REGISTER_TILE_4, "const REGISTER_TILE: u32 = 8u;", 1));
        }
        if form.tiles == TileType::F16 {
            source = Cow::Owned(format!("enable f16;\n{}", source.replacen(F32_TILES, "alias tile_t = f16;", 1)));
        }
        source
    }
}

macro_rules! kernel {
    ($ident:ident, $file:literal, [$($binding:expr),*]) => {
        kernel!($ident, $file, [$($binding),*], in_bounds: false);
    };
    ($ident:ident, $file:literal, [$($binding:expr),*], in_bounds: $in_bounds:literal) => {
        pub const $ident: Kernel = Kernel {
            name: $file,
            source: include_str!(concat!("../../../shaders/", $file, ".wgsl")),
            bindings: &[$($binding),*],
            in_bounds: $in_bounds,
        };
    };
}

// The hot kernel: rows, columns and tokens are checked against params; reads past a part's
// last row stay within the padding of its last word.
kernel!(MATMUL, "matmul", [Storage, Storage, Storage, StorageMut, Uniform, Uniform, Storage, StorageMut, StorageMut], in_bounds: true);
kernel!(ATTENTION, "attention", [Storage, Storage, Storage, Storage, StorageMut, StorageMut, Uniform, Uniform]);
kernel!(ARGMAX, "argmax", [Storage, StorageMut, StorageMut, Uniform]);
kernel!(TOP_K, "top_k", [Storage, Storage, StorageMut, StorageMut, Uniform]);
kernel!(FILL, "fill", [StorageMut, Uniform]);

/// Every kernel the engine uses.
pub const KERNELS: [&Kernel; 5] = [&MATMUL, &ATTENTION, &ARGMAX, &TOP_K, &FILL];

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
        let descriptor = wgpu::ShaderModuleDescriptor { label: Some(kernel.name), source: wgpu::ShaderSource::Wgsl(kernel.source_for(form)) };
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
