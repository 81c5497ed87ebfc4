//! Every shader is valid WGSL (checked by naga, no GPU needed), in both tile types where it has
//! tiles, declares the bindings the Rust side binds, and has a `Params` struct of the same size as
//! its Rust mirror.

use llama_webgpu::gpu::{ops, Binding, Kernel, TileType, KERNELS};
use naga::{AddressSpace, Scalar, StorageAccess, TypeInner};

fn parse(kernel: &Kernel) -> (naga::Module, naga::valid::ModuleInfo) {
    parse_with(kernel, TileType::F32)
}

fn parse_with(kernel: &Kernel, tile: TileType) -> (naga::Module, naga::valid::ModuleInfo) {
    let source = kernel.source_for(tile);
    let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{} {tile:?}: {}", kernel.name, e.emit_to_string(&source)));
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{} {tile:?}: {}", kernel.name, e.emit_to_string(&source)));
    (module, info)
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

#[test]
fn every_shader_file_is_a_registered_kernel() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut names: Vec<String> = KERNELS.iter().map(|k| k.name.to_string()).collect();
    names.sort();
    assert_eq!(files, names);
}

#[test]
fn shaders_validate() {
    for kernel in KERNELS {
        let (module, _) = parse(kernel);
        assert!(!module.entry_points.is_empty(), "{} has no entry point", kernel.name);
    }
}

#[test]
fn the_f16_form_of_the_matmul_validates_with_f16_tiles() {
    assert!(KERNELS.iter().any(|k| k.name == "matmul" && k.has_tiles()));
    for kernel in KERNELS.iter().filter(|k| k.has_tiles()) {
        let (f32_module, _) = parse_with(kernel, TileType::F32);
        let (f16_module, _) = parse_with(kernel, TileType::F16);
        assert_eq!(tile_scalar(&f32_module), Some(Scalar::F32), "{}", kernel.name);
        assert_eq!(tile_scalar(&f16_module), Some(Scalar::F16), "{}", kernel.name);
        let entries = |m: &naga::Module| m.entry_points.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(entries(&f32_module), entries(&f16_module), "{}", kernel.name);
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
        ("rope", std::mem::size_of::<ops::RopeParams>()),
        ("matmul", std::mem::size_of::<ops::MatmulParams>()),
        ("attention", std::mem::size_of::<ops::AttentionParams>()),
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
