//! Every shader is valid WGSL (checked by naga, no GPU needed), declares the bindings the Rust side
//! binds, and has a `Params` struct of the same size as its Rust mirror.

use llama_webgpu::gpu::{ops, Binding, Kernel, KERNELS};
use naga::{AddressSpace, StorageAccess, TypeInner};

fn parse(kernel: &Kernel) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(kernel.source).unwrap_or_else(|e| panic!("{}: {}", kernel.name, e.emit_to_string(kernel.source)));
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", kernel.name, e.emit_to_string(kernel.source)));
    (module, info)
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
