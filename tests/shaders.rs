//! Every shader is valid WGSL (checked by naga, no GPU needed), in every module form it has (f16
//! tiles, subgroup reductions), declares the bindings the Rust side binds, and has a `Params`
//! struct of the same size as its Rust mirror.

use llama_webgpu::gpu::{ops, Binding, CoopFragment, CoopTile, Kernel, Piece, KvType, ModuleForm, RegisterTile, TileType, COOP_WORKGROUP_STORAGE, KERNELS, LIBRARY, WORKGROUP_STORAGE};
use llama_webgpu::quant::DType;
use naga::valid::Capabilities;
use naga::{AddressSpace, Scalar, StorageAccess, TypeInner};

/// What an adapter without subgroups lets a shader use.
fn without_subgroups() -> Capabilities {
    Capabilities::all() - Capabilities::SUBGROUP - Capabilities::SUBGROUP_BARRIER - Capabilities::SUBGROUP_VERTEX_STAGE
}

fn parse(kernel: &Kernel) -> (naga::Module, naga::valid::ModuleInfo) {
    parse_with(kernel, ModuleForm::default())
}

fn parse_with(kernel: &Kernel, form: ModuleForm) -> (naga::Module, naga::valid::ModuleInfo) {
    validate(kernel, form, Capabilities::all()).unwrap_or_else(|e| panic!("{e}"))
}

/// The kernel's module in `form`, parsed and validated for a device with `capabilities`.
fn validate(kernel: &Kernel, form: ModuleForm, capabilities: Capabilities) -> Result<(naga::Module, naga::valid::ModuleInfo), String> {
    let source = kernel.source_for(form);
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| format!("{} {form:?}: {}", kernel.name, e.emit_to_string(&source)))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .validate(&module)
        .map_err(|e| format!("{} {form:?}: {}", kernel.name, e.emit_to_string(&source)))?;
    Ok((module, info))
}

fn entry_points(module: &naga::Module) -> Vec<String> {
    module.entry_points.iter().map(|e| e.name.clone()).collect()
}

/// `entry` of the kernel's module in `form` as wgpu's Vulkan backend writes it for a pipeline:
/// overrides resolved, SPIR-V 1.6 (Vulkan 1.3).
fn spirv_of(kernel: &Kernel, form: ModuleForm, (module, info): &(naga::Module, naga::valid::ModuleInfo), entry: &str, constants: &[(&str, f64)]) -> Vec<u32> {
    let constants = naga::back::PipelineConstants::from_iter(constants.iter().map(|&(name, value)| (name.to_string(), value)));
    let (resolved, resolved_info) = naga::back::pipeline_constants::process_overrides(module, info, Some((naga::ShaderStage::Compute, entry)), &constants)
        .unwrap_or_else(|e| panic!("{} {entry} {form:?} {constants:?}: {e}", kernel.name));
    let options = naga::back::spv::Options { lang_version: (1, 6), ..Default::default() };
    let pipeline = naga::back::spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: entry.into() };
    naga::back::spv::write_vec(&resolved, &resolved_info, &options, Some(&pipeline)).unwrap_or_else(|e| panic!("SPIR-V of {} {entry} {form:?} {constants:?}: {e}", kernel.name))
}

/// The scalar type of the elements (or their components) of a module's `x_tile` workgroup array.
fn tile_scalar(module: &naga::Module) -> Option<Scalar> {
    let (_, var) = module.global_variables.iter().find(|(_, v)| v.name.as_deref() == Some("x_tile"))?;
    match module.types[var.ty].inner {
        TypeInner::Array { base, .. } => match module.types[base].inner {
            TypeInner::Scalar(scalar) | TypeInner::Vector { scalar, .. } => Some(scalar),
            _ => None,
        },
        _ => None,
    }
}

/// The `.wgsl` files directly under `dir`, by stem, sorted.
fn wgsl_files(dir: &str) -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

/// Every module form a kernel has, the default first.
fn forms(kernel: &Kernel) -> Vec<ModuleForm> {
    let mut forms = vec![];
    for tiles in [TileType::F32, TileType::F16] {
        for subgroups in [false, true] {
            for register_tile in [RegisterTile::X4, RegisterTile::X8] {
                for coop_matrix in [None, Some(CoopFragment::Side8), Some(CoopFragment::Side16)] {
                    for &kv in kernel.kv_types {
                        if (tiles == TileType::F16 || register_tile == RegisterTile::X8) && !kernel.has_tiles()
                            || subgroups && !kernel.has_subgroup_form()
                            || coop_matrix.is_some() && !kernel.has_coop_form()
                        {
                            continue;
                        }
                        // The tile matters to tiled_coop alone.
                        let coop_tiles: &[CoopTile] = if coop_matrix.is_some() && kernel.pieces.contains(&Piece::TiledCoop) { &CoopTile::ALL } else { &[CoopTile::Medium] };
                        for &coop_tile in coop_tiles {
                            forms.push(ModuleForm { tiles, subgroups, register_tile, coop_matrix, coop_tile, kv });
                        }
                    }
                }
            }
        }
    }
    forms
}

#[test]
fn every_shader_file_is_a_registered_kernel() {
    let mut names: Vec<String> = KERNELS.iter().map(|k| k.name.to_string()).collect();
    names.sort();
    assert_eq!(wgsl_files("shaders"), names);
}

/// Every file of shaders/lib is a registered piece, and some kernel's module in some form has it.
#[test]
fn every_library_file_is_used() {
    let mut library: Vec<String> = LIBRARY.iter().map(|(name, _)| name.to_string()).collect();
    library.sort();
    assert_eq!(wgsl_files("shaders/lib"), library);
    for (name, text) in LIBRARY {
        let used = KERNELS.iter().any(|k| forms(k).into_iter().any(|form| k.pieces.iter().any(|p| p.file(form) == Some(text))));
        assert!(used, "shaders/lib/{name}.wgsl is in no kernel's module");
    }
}

#[test]
fn shaders_validate() {
    for kernel in KERNELS {
        let (module, _) = parse(kernel);
        assert!(!module.entry_points.is_empty(), "{} has no entry point", kernel.name);
    }
}

#[test]
fn shaders_as_they_are_run_without_subgroups() {
    for kernel in KERNELS {
        validate(kernel, ModuleForm::default(), without_subgroups()).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_subgroup_form_of_the_matmul_validates_and_needs_subgroups() {
    assert!(KERNELS.iter().any(|k| k.name == "matmul" && k.has_subgroup_form()));
    for kernel in KERNELS.iter().filter(|k| k.has_subgroup_form()) {
        for tiles in [TileType::F32, TileType::F16] {
            let plain = ModuleForm { tiles, ..Default::default() };
            let form = ModuleForm { tiles, subgroups: true, ..Default::default() };
            let (module, _) = parse_with(kernel, form);
            assert_eq!(entry_points(&module), entry_points(&parse_with(kernel, plain).0), "{}", kernel.name);
            // It really uses subgroups (so it is not the workgroup-memory form by mistake).
            assert!(validate(kernel, form, without_subgroups()).is_err(), "{} {form:?} validates without subgroups", kernel.name);
        }
    }
}

/// Why the subgroup form has no `enable subgroups;` (which WebGPU wants): naga rejects it. When
/// this fails, naga takes the directive, and Kernel::source_for should put it in front.
#[test]
fn naga_rejects_enable_subgroups() {
    let source = KERNELS.iter().find(|k| k.has_subgroup_form()).unwrap().source_for(ModuleForm { subgroups: true, ..Default::default() });
    let error = naga::front::wgsl::parse_str(&format!("enable subgroups;\n{source}")).expect_err("naga now takes `enable subgroups;`");
    assert!(error.message().contains("not yet supported"), "{}", error.message());
}

#[test]
fn the_f16_form_of_the_matmul_validates_with_f16_tiles() {
    assert!(KERNELS.iter().any(|k| k.name == "matmul" && k.has_tiles()));
    for kernel in KERNELS.iter().filter(|k| k.has_tiles()) {
        let (f32_module, _) = parse_with(kernel, ModuleForm::default());
        let f16_tiles = ModuleForm { tiles: TileType::F16, ..Default::default() };
        let (f16_module, _) = parse_with(kernel, f16_tiles);
        validate(kernel, f16_tiles, without_subgroups()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tile_scalar(&f32_module), Some(Scalar::F32), "{}", kernel.name);
        assert_eq!(tile_scalar(&f16_module), Some(Scalar::F16), "{}", kernel.name);
        assert_eq!(entry_points(&f32_module), entry_points(&f16_module), "{}", kernel.name);
    }
}

/// The 8x8 register tile: the same entry points, the tiled product in 8x8 threads instead of 16x16,
/// with f32 and f16 tiles.
#[test]
fn the_8x8_register_tile_form_of_the_matmul_validates_with_8x8_threads() {
    let matmul = KERNELS.iter().find(|k| k.name == "matmul").unwrap();
    let workgroup = |module: &naga::Module| module.entry_points.iter().find(|e| e.name == "tiled").map(|e| e.workgroup_size);
    for tiles in [TileType::F32, TileType::F16] {
        let (plain, _) = parse_with(matmul, ModuleForm { tiles, ..Default::default() });
        let form = ModuleForm { tiles, register_tile: RegisterTile::X8, ..Default::default() };
        let (wide, _) = parse_with(matmul, form);
        validate(matmul, form, without_subgroups()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(entry_points(&plain), entry_points(&wide));
        assert_eq!((workgroup(&plain), workgroup(&wide)), (Some([16, 16, 1]), Some([8, 8, 1])), "{tiles:?}");
    }
}

#[test]
fn bindings_match_the_rust_layouts() {
    for kernel in KERNELS {
        let (module, _) = parse(kernel);
        let mut declared: Vec<(u32, Binding)> = module
            .global_variables
            .iter()
            .filter_map(|(_, var)| {
                let binding = var.binding.as_ref()?;
                assert_eq!(binding.group, 0, "{}: only group 0 is used", kernel.name);
                let kind = match var.space {
                    AddressSpace::Uniform => Binding::Uniform,
                    AddressSpace::Storage { access } if access.contains(StorageAccess::STORE) => Binding::StorageMut,
                    AddressSpace::Storage { .. } => Binding::Storage,
                    other => panic!("{}: unexpected address space {other:?}", kernel.name),
                };
                Some((binding.binding, kind))
            })
            .collect();
        declared.sort_by_key(|(b, _)| *b);
        let expected: Vec<(u32, Binding)> = kernel.bindings.iter().enumerate().map(|(i, b)| (i as u32, *b)).collect();
        assert_eq!(declared, expected, "{}", kernel.name);
    }
}

#[test]
fn params_structs_match_their_rust_mirrors() {
    let rust_sizes = [
        ("matmul", std::mem::size_of::<ops::MatmulParams>()),
        ("quantize", std::mem::size_of::<ops::QuantizeParams>()),
        ("attention", std::mem::size_of::<ops::AttentionParams>()),
        ("kv_store", std::mem::size_of::<ops::KvStoreParams>()),
        ("argmax", std::mem::size_of::<ops::ArgmaxParams>()),
        ("top_k", std::mem::size_of::<ops::TopKParams>()),
        ("fill", std::mem::size_of::<ops::FillParams>()),
    ];
    for kernel in KERNELS {
        let (module, _) = parse(kernel);
        let span_of = |name: &str| {
            module.types.iter().find_map(|(_, ty)| match &ty.inner {
                TypeInner::Struct { span, .. } if ty.name.as_deref() == Some(name) => Some(*span as usize),
                _ => None,
            })
        };
        let (_, rust) = rust_sizes.iter().find(|(n, _)| *n == kernel.name).unwrap_or_else(|| panic!("no mirror for {}", kernel.name));
        assert_eq!(span_of("Params"), Some(*rust), "{}: Params", kernel.name);
        if let Some(step) = span_of("Step") {
            assert_eq!(step, std::mem::size_of::<ops::StepParams>(), "{}: Step", kernel.name);
        }
    }
}

#[test]
fn workgroup_memory_is_what_the_engine_requires() {
    // Each entry point's workgroup variables, with its override-sized arrays at their largest
    // (GEMV_COLUMNS tokens per GEMV workgroup). The entry points on cooperative matrices run only
    // where the adapter grants their own, larger requirement.
    let (mut largest, mut largest_coop) = (0, 0);
    for kernel in KERNELS {
        for form in forms(kernel) {
            let (module, info) = parse_with(kernel, form);
            let constants = naga::back::PipelineConstants::from_iter(
                module.overrides.iter().filter(|(_, o)| o.name.as_deref() == Some("GEMV_COLUMNS")).map(|_| ("GEMV_COLUMNS".to_string(), ops::GEMV_COLUMNS as f64)),
            );
            for entry in entry_points(&module) {
                let (module, _) = naga::back::pipeline_constants::process_overrides(&module, &info, Some((naga::ShaderStage::Compute, &entry)), &constants)
                    .unwrap_or_else(|e| panic!("{} {entry}: {e}", kernel.name));
                let bytes: u64 = module
                    .global_variables
                    .iter()
                    .filter(|(_, v)| v.space == AddressSpace::WorkGroup)
                    .map(|(_, v)| module.types[v.ty].inner.size(module.to_ctx()) as u64)
                    .sum();
                let (limit, largest) = if entry.ends_with("_coop") { (COOP_WORKGROUP_STORAGE, &mut largest_coop) } else { (WORKGROUP_STORAGE, &mut largest) };
                assert!(bytes <= limit, "{} {entry} {form:?}: {bytes} bytes of workgroup memory", kernel.name);
                *largest = (*largest).max(bytes);
            }
        }
    }
    assert_eq!(largest, WORKGROUP_STORAGE, "the requirement should be what the largest kernel uses");
    assert_eq!(largest_coop, COOP_WORKGROUP_STORAGE, "the requirement should be what the largest entry point on cooperative matrices uses");
}

/// The cooperative-matrix forms: the entry points of the plain form and tiled_coop, which needs the
/// capability, and which naga's SPIR-V writer (wgpu's Vulkan path) takes, for each fragment and tile.
#[test]
fn the_coop_matrix_forms_of_the_matmul_validate_and_write_spirv() {
    let matmul = KERNELS.iter().find(|k| k.name == "matmul").unwrap();
    assert!(matmul.has_coop_form());
    for fragment in CoopFragment::ALL {
        for coop_tile in CoopTile::ALL {
            coop_matrix_form_validates_and_writes_spirv(matmul, ModuleForm { coop_matrix: Some(fragment), coop_tile, ..Default::default() });
        }
    }
}

/// attend_coop, for each fragment and KV type, heads of 64 and 128.
#[test]
fn the_coop_matrix_forms_of_attention_write_spirv() {
    let attention = KERNELS.iter().find(|k| k.name == "attention").unwrap();
    for fragment in CoopFragment::ALL {
        for &kv in attention.kv_types {
            let form = ModuleForm { coop_matrix: Some(fragment), kv, ..Default::default() };
            let parsed = parse_with(attention, form);
            for head_dim in [64.0, 128.0] {
                spirv_of(attention, form, &parsed, "attend_coop", &[("HEAD_DIM", head_dim)]);
            }
        }
    }
}

fn coop_matrix_form_validates_and_writes_spirv(matmul: &Kernel, form: ModuleForm) {
    let parsed = parse_with(matmul, form);
    let mut plain = entry_points(&parse(matmul).0);
    plain.push("tiled_coop".into());
    assert_eq!(entry_points(&parsed.0), plain);
    assert!(validate(matmul, form, Capabilities::all() - Capabilities::COOPERATIVE_MATRIX).is_err());
    // For every weight format, fused input and output.
    for dtype in DType::ALL {
        for (input, output) in [(0.0, 0.0), (1.0, 0.0), (2.0, 0.0), (1.0, 1.0)] {
            spirv_of(matmul, form, &parsed, "tiled_coop", &[("WEIGHT_DTYPE", dtype.shader_code() as f64), ("INPUT", input), ("OUTPUT", output)]);
        }
    }
}

/// Set by scripts/with-coop-lavapipe: the command that runs SPIRV-Tools' `spirv-val`.
const SPIRV_VAL_ENV: &str = "LLAMA_WEBGPU_SPIRV_VAL";

/// Every entry point of every kernel in every form, as SPIR-V for Vulkan 1.3, passes SPIRV-Tools'
/// validator. lavapipe runs modules that a stricter driver may refuse or miscompile: naga's SPIR-V
/// of a module on cooperative matrices (in the Vulkan memory model) with atomics on storage (device
/// scope) lacks the capability that needs, and attention's partials were such atomics.
#[test]
fn every_entry_point_is_valid_vulkan_spirv() {
    let Ok(command) = std::env::var(SPIRV_VAL_ENV) else {
        // scripts/with-coop-lavapipe sets both: under it, a missing validator is a failure.
        assert!(std::env::var("LLAMA_WEBGPU_REQUIRE_COOP_MATRIX").is_err(), "LLAMA_WEBGPU_REQUIRE_COOP_MATRIX is set but {SPIRV_VAL_ENV} is not");
        eprintln!("SKIPPED: {SPIRV_VAL_ENV} names no spirv-val (scripts/with-coop-lavapipe provides one)");
        return;
    };
    let mut words = command.split_whitespace();
    let program = words.next().expect("a command");
    let arguments: Vec<&str> = words.collect();
    let file = std::env::temp_dir().join(format!("llama-webgpu-spirv-{}.spv", std::process::id()));
    let (mut checked, mut invalid) = (0, vec![]);
    for kernel in KERNELS {
        for form in forms(kernel) {
            let parsed = parse_with(kernel, form);
            for entry in entry_points(&parsed.0) {
                let spirv = spirv_of(kernel, form, &parsed, &entry, &[]);
                std::fs::write(&file, bytemuck::cast_slice::<u32, u8>(&spirv)).unwrap();
                let result = std::process::Command::new(program).args(&arguments).args(["--target-env", "vulkan1.3"]).arg(&file).output().expect("spirv-val runs");
                if !result.status.success() {
                    let message = String::from_utf8_lossy(&result.stderr) + String::from_utf8_lossy(&result.stdout);
                    invalid.push(format!("{} {entry} {form:?}: {}", kernel.name, message.lines().next().unwrap_or("")));
                }
                checked += 1;
            }
        }
    }
    let _ = std::fs::remove_file(&file);
    assert!(invalid.is_empty(), "{} of {checked} entry points are not valid SPIR-V:\n{}", invalid.len(), invalid.join("\n"));
    eprintln!("{checked} entry points valid");
}

/// The KV forms: the pool bindings of each kernel that binds the pool become arrays of the pool's
/// type (q8_0: words of packed int8 values and f32 scales); attention's of vec4s of it (a q8_0
/// word holds four values already).
#[test]
fn each_kv_form_binds_the_pool_as_its_type() {
    for kernel in KERNELS.iter().filter(|k| k.kv_types.len() > 1) {
        for &kv in kernel.kv_types {
            let (module, _) = parse_with(kernel, ModuleForm { kv, ..Default::default() });
            let (_, pool) = module.global_variables.iter().find(|(_, v)| v.name.as_deref() == Some("k_cache")).unwrap_or_else(|| panic!("{} has no k_cache", kernel.name));
            let TypeInner::Array { base, .. } = module.types[pool.ty].inner else { panic!("{}: k_cache is not an array", kernel.name) };
            let scalar = match kv {
                KvType::F32 => Scalar::F32,
                KvType::F16 => Scalar::F16,
                KvType::Q8_0 => Scalar::U32,
            };
            let element = match (kernel.name, kv) {
                ("attention", KvType::F32 | KvType::F16) => TypeInner::Vector { size: naga::VectorSize::Quad, scalar },
                _ => TypeInner::Scalar(scalar),
            };
            assert_eq!(module.types[base].inner, element, "{} {kv:?}", kernel.name);
        }
    }
    let pool_kernels: Vec<_> = KERNELS.iter().filter(|k| k.kv_types.len() > 1).map(|k| (k.name, k.kv_types)).collect();
    assert_eq!(pool_kernels, [("matmul", &[KvType::F32, KvType::F16][..]), ("attention", &KvType::ALL[..]), ("kv_store", &KvType::ALL[..])]);
}
