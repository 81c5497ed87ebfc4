//! The GGUF reader against: a file written by llama.cpp's own `gguf` writer with every metadata type;
//! the real SmolLM2 GGUF (scripts/fetch-smollm2) and goldens from the `gguf` package; files written
//! here to reach every error; and the tiny HF fixtures converted to GGUF the way llama.cpp's converter
//! does (q/k rows permuted, rope_freqs), which must load to the same config and logits.

mod common;

use std::path::PathBuf;

use common::gguf_writer::{
    convert_to_gguf, converter_rope_freqs, f32_bytes, gguf_of, permute_rows, string, Writer, F16, F32, IQ1_M, IQ1_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS,
    IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q5_0, Q5_1, Q5_K, Q8_0,
};
use common::{assert_close, fixture, gpu, random_vec, random_weight_bytes, rng};
use llama_webgpu::load::{open_safetensors_dir, read_hf_config, Gguf, GgufHeader, LoadError, MetadataValue as V, WeightSource, WeightStream};
use llama_webgpu::model::{Llama3Scaling, ModelError, Rope, RopeScaling, SamplingDefaults};
use llama_webgpu::quant::{quantize_rows, DType};
use llama_webgpu::api::{ChatCompletionRequest, ChatMessage, SamplingParams};
use llama_webgpu::text::{RenderOptions, TextStream};
use llama_webgpu::{CancelToken, Config, Engine, Error, Llama, LoadOptions};

fn parse(bytes: Vec<u8>) -> Result<Gguf<Vec<u8>>, LoadError> {
    Gguf::new("test.gguf", bytes)
}

/// A small valid file: two metadata keys and two tensors.
fn small_file() -> Writer {
    Writer::new()
        .kv("general.architecture", string("llama"))
        .kv("t.list", V::Array(vec![string("a"), string("bc")]))
        .tensor("a.weight", &[3, 2], F32, f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        .tensor("b.weight", &[4], F16, vec![0; 8])
}

#[test]
fn reads_every_metadata_type_written_by_llama_cpps_writer() {
    let bytes = std::fs::read(fixture("quant/all_types.gguf")).unwrap();
    let g = parse(bytes).unwrap();
    let h = g.header();
    let array = |items: Vec<V>| V::Array(items);
    let expected = [
        ("general.architecture", string("llama")),
        ("general.alignment", V::U32(64)),
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-100)),
        ("t.u16", V::U16(60000)),
        ("t.i16", V::I16(-30000)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-2_000_000_000)),
        ("t.u64", V::U64((1 << 40) + 1)),
        ("t.i64", V::I64(-(1 << 40))),
        ("t.f32", V::F32(1.5)),
        ("t.f64", V::F64(0.1)),
        ("t.bool", V::Bool(true)),
        ("t.string", string("héllo")),
        ("t.array.u16", array(vec![V::U16(1), V::U16(2), V::U16(65535)])),
        ("t.array.f64", array(vec![V::F64(0.5), V::F64(-2.0)])),
        ("t.array.bool", array(vec![V::Bool(true), V::Bool(false)])),
        ("t.array.str", array(vec![string("a"), string("bc"), string("")])),
        ("t.array.nested", array(vec![array(vec![V::I32(1), V::I32(2)]), array(vec![V::I32(3)])])),
        ("t.array.nested_str", array(vec![array(vec![string("x")]), array(vec![string("y"), string("z")])])),
    ];
    let got: Vec<(&str, &V)> = h.metadata().iter().map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(got, expected.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>());
    assert_eq!((h.version(), h.alignment(), h.data_offset() % 64), (3, 64, 0));

    let shapes: Vec<_> = h.tensors().iter().map(|t| (t.name.as_str(), t.dtype, t.shape.clone(), t.range.start % 64)).collect();
    assert_eq!(
        shapes,
        [("a.weight", DType::F32, vec![2, 3], 0), ("b.weight", DType::Q8_0, vec![2, 64], 0), ("c.weight", DType::F16, vec![5], 0)]
    );
    let a = g.tensor("a.weight").unwrap();
    assert_eq!(a.dtype.to_f32(&a.bytes).unwrap(), [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    let b = g.tensor("b.weight").unwrap();
    let linspace = (0..128).map(|i| -1.0 + 2.0 * i as f32 / 127.0);
    assert!(b.dtype.to_f32(&b.bytes).unwrap().iter().zip(linspace).all(|(q, v)| (q - v).abs() <= 0.5 / 127.0 + 1e-6));
    let c = g.tensor("c.weight").unwrap();
    assert_eq!(c.dtype.to_f32(&c.bytes).unwrap(), [1.0, -2.0, 3.5, 0.0, 65504.0]);

    // Typed getters: integer widths are interchangeable when the value fits, other types are errors.
    assert_eq!(h.get_u32("t.u8").unwrap(), Some(200));
    let err = h.get_u32("t.u64").unwrap_err().to_string();
    assert_eq!(err, "test.gguf: metadata t.u64: is U64(1099511627777), expected an integer that fits a uint32");
    assert!(h.get_u32("t.i8").is_err());
    assert_eq!(h.get_f32("t.f64").unwrap(), Some(0.1));
    assert_eq!(h.get_str("t.string").unwrap(), Some("héllo"));
    assert_eq!(h.get_str("t.missing").unwrap(), None);
    assert!(h.get_str("t.u8").is_err());
    assert_eq!(h.get_bool("t.bool").unwrap(), Some(true));
    assert_eq!(h.get_str_array("t.array.str").unwrap(), Some(vec!["a", "bc", ""]));
    assert!(h.get_str_array("t.array.u16").is_err());
    assert_eq!(h.get_array("t.array.nested").unwrap().map(<[V]>::len), Some(2));
}

#[test]
fn versions_2_and_3_read_alike_and_others_are_refused() {
    let v3 = parse(small_file().build()).unwrap();
    let v2 = parse(small_file().version(2).build()).unwrap();
    assert_eq!((v2.header().version(), v3.header().version()), (2, 3));
    assert_eq!(v2.header().metadata(), v3.header().metadata());
    assert_eq!(v2.header().tensors(), v3.header().tensors());
    for version in [0, 1, 4, 0x0300_0000] {
        let err = parse(small_file().version(version).build()).err().unwrap();
        assert!(matches!(err, LoadError::GgufVersion { version: v, .. } if v == version), "{err}");
        assert!(err.to_string().starts_with("test.gguf: GGUF version"), "{err}");
    }
}

#[test]
fn metadata_round_trips_through_nested_and_empty_arrays() {
    let deep = V::Array(vec![V::Array(vec![V::Array(vec![V::I64(-1), V::I64(2)]), V::Array(vec![])]), V::Array(vec![])]);
    let values = [
        ("a", V::U8(1)),
        ("b", V::I8(-1)),
        ("c", V::U16(2)),
        ("d", V::I16(-2)),
        ("e", V::U32(3)),
        ("f", V::I32(-3)),
        ("g", V::U64(u64::MAX)),
        ("h", V::I64(i64::MIN)),
        ("i", V::F32(-0.25)),
        ("j", V::F64(1e300)),
        ("k", V::Bool(false)),
        ("l", string("")),
        ("m", V::Array(vec![])),
        ("n", deep),
        ("o", V::Array(vec![V::F32(1.0), V::F32(f32::INFINITY)])),
    ];
    let file = values.iter().fold(Writer::new(), |w, (k, v)| w.kv(k, v.clone()));
    let g = parse(file.build()).unwrap();
    let got: Vec<(String, V)> = g.header().metadata().to_vec();
    assert_eq!(got, values.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Vec<_>>());
    assert_eq!(g.header().tensors().len(), 0);
}

#[test]
fn alignment_defaults_to_32_and_follows_general_alignment() {
    for alignment in [None, Some(1), Some(64), Some(256)] {
        let mut file = Writer::new();
        if let Some(a) = alignment {
            file = file.kv("general.alignment", V::U32(a));
        }
        let file = file
            .tensor("odd.weight", &[3], F32, f32_bytes(&[1.0, 2.0, 3.0]))
            .tensor("next.weight", &[2], F32, f32_bytes(&[4.0, 5.0]));
        let g = parse(file.build()).unwrap();
        let expected = alignment.unwrap_or(32) as u64;
        let h = g.header();
        assert_eq!(h.alignment(), expected);
        assert_eq!(h.data_offset() % expected, 0);
        let next = h.tensor("next.weight").unwrap();
        assert_eq!(next.range.start, h.data_offset() + 12u64.next_multiple_of(expected));
        assert_eq!(g.tensor_bytes("next.weight").unwrap(), f32_bytes(&[4.0, 5.0]));
    }
    for bad in [V::U32(0), V::U32(48), V::U64(32)] {
        let err = parse(Writer::new().kv("general.alignment", bad.clone()).build()).err().unwrap();
        assert!(matches!(&err, LoadError::Metadata { key, .. } if key == "general.alignment"), "{bad:?}: {err}");
    }
}

#[test]
fn a_cut_anywhere_is_an_error_naming_the_file_and_offset() {
    let bytes = small_file().build();
    let g = parse(bytes.clone()).unwrap();
    let header_end = g.header().data_offset() as usize;
    for len in 0..bytes.len() {
        let err = parse(bytes[..len].to_vec()).err().unwrap_or_else(|| panic!("a cut at {len} parsed"));
        let message = err.to_string();
        assert!(message.starts_with("test.gguf: "), "{message}");
        match err {
            LoadError::GgufMagic { .. } => assert_eq!(len, 0),
            LoadError::Truncated { offset, .. } => {
                assert!(len < header_end && offset <= len, "cut at {len}: {message}");
                assert!(message.contains(&format!("offset {offset}")), "{message}");
            }
            LoadError::TensorOutOfBounds { tensor, .. } => {
                // Only the padding after the tensor infos may be cut without touching the header.
                assert!(len + 32 > header_end, "cut at {len}: {message}");
                assert!(["a.weight", "b.weight"].contains(&tensor.as_str()));
            }
            other => panic!("cut at {len}: unexpected {other}"),
        }
    }
    // The header alone is enough for GgufHeader (a streaming reader's first step).
    let header = GgufHeader::parse("test.gguf", &bytes[..header_end]).unwrap();
    assert_eq!(header.tensors(), g.header().tensors());
}

#[test]
fn bad_magic_is_refused() {
    let mut bytes = small_file().build();
    bytes[..4].copy_from_slice(b"GGML");
    let err = parse(bytes).err().unwrap();
    assert!(matches!(&err, LoadError::GgufMagic { magic, .. } if magic == b"GGML"), "{err}");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
    assert!(matches!(parse(b"{\"__metadata__\"".to_vec()), Err(LoadError::GgufMagic { .. })));
}

#[test]
fn tensor_data_beyond_the_file_names_the_tensor() {
    let mut bytes = small_file().build();
    bytes.truncate(bytes.len() - 1);
    let err = parse(bytes.clone()).err().unwrap();
    assert!(matches!(&err, LoadError::TensorOutOfBounds { tensor, file_size, .. } if tensor == "b.weight" && *file_size == bytes.len()), "{err}");
    assert!(err.to_string().contains("test.gguf: tensor b.weight occupies bytes"), "{err}");
}

#[test]
fn unknown_and_unsupported_ggml_types_name_the_type_id() {
    for (type_id, name) in [(34, "TQ1_0"), (39, "MXFP4"), (99, "unknown")] {
        let file = small_file().tensor("c.weight", &[256], type_id, vec![0; 256]);
        let err = parse(file.build()).err().unwrap();
        assert!(
            matches!(&err, LoadError::UnknownGgmlType { tensor, type_id: t, type_name, .. } if tensor == "c.weight" && *t == type_id && *type_name == name),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("ggml type {type_id} ({name})")), "{err}");
    }
}

#[test]
fn malformed_headers_are_errors_not_panics_or_huge_allocations() {
    let malformed = |bytes: Vec<u8>, needle: &str| {
        let err = parse(bytes).err().unwrap_or_else(|| panic!("parsed, expected an error containing {needle:?}"));
        assert!(matches!(err, LoadError::Gguf { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err} does not contain {needle:?}");
    };
    malformed(small_file().tensor("q.weight", &[48, 2], Q8_0, vec![0; 102]).build(), "not whole q8_0 blocks of 32");
    malformed(small_file().tensor("d.weight", &[1, 1, 1, 1, 1], F32, vec![0; 4]).build(), "5 dimensions");
    malformed(small_file().tensor("d.weight", &[], F32, vec![]).build(), "0 dimensions");
    malformed(small_file().tensor("a.weight", &[1], F32, vec![0; 4]).build(), "appears twice");
    malformed(small_file().kv("t.list", V::U8(0)).build(), "metadata key t.list appears twice");
    malformed(small_file().tensor("big.weight", &[1 << 40, 1 << 40], F32, vec![]).build(), "overflow");
    malformed(small_file().tensor("big.weight", &[u64::MAX], F32, vec![]).build(), "overflow");

    // Edit single fields of a valid file: a bool byte, a value type, UTF-8, a misaligned offset.
    let bytes = |file: Writer, find: &[u8], replace: &[u8]| {
        let mut bytes = file.build();
        let at = bytes.windows(find.len()).position(|w| w == find).unwrap();
        bytes[at..at + replace.len()].copy_from_slice(replace);
        bytes
    };
    let flag = Writer::new().kv("flag", V::Bool(true));
    malformed(bytes(flag.clone(), b"flag\x07\0\0\0\x01", b"flag\x07\0\0\0\x02"), "bool byte 2");
    malformed(bytes(flag.clone(), b"flag\x07", b"flag\x0d"), "unknown value type 13");
    malformed(bytes(Writer::new().kv("name", string("ok")), b"ok", b"\xff\xfe"), "not valid UTF-8");
    let array = Writer::new().kv("list", V::Array(vec![V::U8(1)]));
    malformed(bytes(array, b"list\x09\0\0\0\0", b"list\x09\0\0\0\x0e"), "unknown array element type 14");
    // b.weight's info ends with dims [4], type F16, offset 32.
    let misaligned = bytes(small_file(), &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 32], &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 36]);
    malformed(misaligned, "data offset 36 is not a multiple of the alignment 32");

    let mut nested = V::Array(vec![V::U8(1)]);
    for _ in 0..9 {
        nested = V::Array(vec![nested]);
    }
    malformed(Writer::new().kv("deep", nested).build(), "nest deeper than 8");

    // Counts and lengths far beyond the file are truncation, found before anything is allocated.
    let huge = u64::MAX / 2;
    let truncated = |bytes: Vec<u8>| assert!(matches!(parse(bytes), Err(LoadError::Truncated { .. })));
    for field in [8..16, 16..24] {
        // The tensor count, then the metadata count.
        let mut count = small_file().build();
        count[field].copy_from_slice(&huge.to_le_bytes());
        truncated(count);
    }
    let list = [b"list".as_slice(), &[9, 0, 0, 0, 10, 0, 0, 0]].concat();
    let array = Writer::new().kv("list", V::Array(vec![V::U64(7)]));
    truncated(bytes(array, &[&list[..], &1u64.to_le_bytes()].concat(), &[&list[..], &huge.to_le_bytes()].concat()));
    let s = [b"s".as_slice(), &[8, 0, 0, 0]].concat();
    let long = bytes(Writer::new().kv("s", string("x")), &[&s[..], &1u64.to_le_bytes()].concat(), &[&s[..], &u64::MAX.to_le_bytes()].concat());
    truncated(long);
}

#[test]
fn hf_names_reach_llama_cpp_tensors_with_q_and_k_rows_unpermuted() {
    let (n_heads, n_kv_heads, head_dim, cols) = (4, 2, 8, 256);
    let formats = [
        (DType::F32, F32),
        (DType::Q8_0, Q8_0),
        (DType::Q5_0, Q5_0),
        (DType::Q5_1, Q5_1),
        (DType::Q2K, Q2_K),
        (DType::Q3K, Q3_K),
        (DType::Q5K, Q5_K),
        (DType::IQ4NL, IQ4_NL),
        (DType::IQ4XS, IQ4_XS),
    ];
    for (dtype, ggml_type) in formats {
        // Row r of the HF matrices holds r + its column / 1000, so every row is recognisable.
        let hf = |rows: usize| -> Vec<f32> { (0..rows * cols).map(|e| (e / cols) as f32 + (e % cols) as f32 / 1000.0).collect() };
        let q = quantize_rows(dtype, &hf(n_heads * head_dim), cols).unwrap();
        let k = quantize_rows(dtype, &hf(n_kv_heads * head_dim), cols).unwrap();
        let v = quantize_rows(dtype, &hf(n_kv_heads * head_dim), cols).unwrap();
        let file = Writer::new()
            .kv("general.architecture", string("llama"))
            .kv("llama.attention.head_count", V::U32(n_heads as u32))
            .kv("llama.attention.head_count_kv", V::U32(n_kv_heads as u32))
            .tensor("blk.3.attn_q.weight", &[cols as u64, (n_heads * head_dim) as u64], ggml_type, permute_rows(&q, n_heads * head_dim, n_heads))
            .tensor("blk.3.attn_k.weight", &[cols as u64, (n_kv_heads * head_dim) as u64], ggml_type, permute_rows(&k, n_kv_heads * head_dim, n_kv_heads))
            .tensor("blk.3.attn_v.weight", &[cols as u64, (n_kv_heads * head_dim) as u64], ggml_type, v.clone())
            .tensor("token_embd.weight", &[cols as u64, 2], ggml_type, quantize_rows(dtype, &hf(2), cols).unwrap());
        let g = parse(file.build()).unwrap();
        for (name, want) in [("q_proj", &q), ("k_proj", &k), ("v_proj", &v)] {
            let t = g.tensor(&format!("model.layers.3.self_attn.{name}.weight")).unwrap();
            assert_eq!(t.shape, [want.len() / dtype.row_bytes(cols).unwrap(), cols], "{dtype} {name}");
            assert!(*t.bytes == want[..], "{dtype} {name}: rows not in Hugging Face order");
        }
        // Stored names are served as stored.
        assert!(*g.tensor("blk.3.attn_q.weight").unwrap().bytes != q[..]);
        assert_eq!(g.tensor("model.embed_tokens.weight").unwrap().shape, [2, cols]);
        assert!(g.contains("model.layers.3.self_attn.q_proj.weight") && g.contains("blk.3.attn_v.weight"));
        assert!(!g.contains("lm_head.weight") && !g.contains("model.layers.4.self_attn.q_proj.weight"));
        let err = g.tensor("lm_head.weight").unwrap_err();
        assert_eq!(err.to_string(), "tensor lm_head.weight (output.weight) is missing from the checkpoint");
    }
}

#[test]
fn hf_fixtures_converted_to_gguf_give_the_same_config_and_logits() {
    let gpu = gpu();
    for name in ["tiny-llama31", "tiny-llama32-tied"] {
        let dir = fixture(name);
        let hf = read_hf_config(&dir).unwrap();
        let Some(RopeScaling::Llama3(fixture_scaling)) = hf.rope.scaling.clone() else { panic!("{name}: the fixture should exercise rope_freqs") };
        // The fixture's llama3 parameters, and others: the converter writes each as rope_freqs, which
        // load as factors giving the frequencies transformers computes from the parameters.
        let other = Llama3Scaling { factor: 16.0, low_freq_factor: 2.0, high_freq_factor: 8.0, original_max_position_embeddings: 24 };
        for scaling in [fixture_scaling, other.clone()] {
            let config = Config { rope: Rope { scaling: Some(RopeScaling::Llama3(scaling.clone())), ..hf.rope.clone() }, ..hf.clone() };
            let safetensors = open_safetensors_dir(&dir).unwrap();
            let gguf = parse(convert_to_gguf(&config, &safetensors)).unwrap();
            let from_gguf = gguf.config().unwrap();
            assert!(matches!(from_gguf.rope.scaling, Some(RopeScaling::Factors(_))), "{name}");
            assert_eq!(Config { rope: config.rope.clone(), ..from_gguf.clone() }, config, "{name}: all but the RoPE scaling");
            for (got, want) in from_gguf.rope_inv_freq().iter().zip(config.rope_inv_freq()) {
                assert!((got - want).abs() <= 1e-6 * want, "{name} {scaling:?}: frequency {got} vs {want}");
            }

            let Some(gpu) = &gpu else { continue };
            let golden = common::golden(name);
            let tokens = &golden.logits.iter().max_by_key(|c| c.tokens.len()).unwrap().tokens;
            let logits = |config: &Config, source: &dyn WeightStream| {
                let mut model = pollster::block_on(Llama::load(gpu, config.clone(), source, &LoadOptions::default(), &mut |_| {})).unwrap();
                pollster::block_on(model.forward(tokens, 0)).unwrap()
            };
            let want = logits(&config, &safetensors);
            assert_close(&format!("{name} {scaling:?} from GGUF"), &logits(&from_gguf, &gguf), &want, 1e-4, 1e-4);
            if scaling == other {
                // The other parameters change the logits: the factors are not ignored.
                let fixture_logits = logits(&hf, &safetensors);
                assert!(want.iter().zip(&fixture_logits).any(|(a, b)| (a - b).abs() > 1e-3), "{name}: other RoPE parameters changed nothing");
            }
        }
    }
}

/// A model whose matrices are in every grid format (iq1, iq2, iq3; an IQ2_M or IQ3_M file mixes
/// them with others) loads from GGUF and gives the CPU forward's logits, in prefill tiles and in
/// the GEMVs of a decode step.
#[test]
fn a_gguf_in_the_grid_formats_matches_the_cpu_forward() {
    let Some(gpu) = gpu() else { return };
    let (hidden, ffn, vocab, layers) = (256, 512, 300, 2);
    let grid = [(DType::IQ2XXS, IQ2_XXS), (DType::IQ2XS, IQ2_XS), (DType::IQ2S, IQ2_S), (DType::IQ3XXS, IQ3_XXS), (DType::IQ3S, IQ3_S), (DType::IQ1S, IQ1_S), (DType::IQ1M, IQ1_M)];
    let mut r = rng(5);
    let mut file = Writer::new()
        .kv("general.architecture", string("llama"))
        .kv("llama.context_length", V::U32(512))
        .kv("llama.embedding_length", V::U32(hidden as u32))
        .kv("llama.block_count", V::U32(layers as u32))
        .kv("llama.feed_forward_length", V::U32(ffn as u32))
        .kv("llama.attention.head_count", V::U32(4))
        .kv("llama.attention.head_count_kv", V::U32(2))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .kv("llama.rope.freq_base", V::F32(500000.0))
        .kv("tokenizer.ggml.tokens", V::Array((0..vocab).map(|i| string(&format!("t{i}"))).collect()));
    let mut matrix = |file: Writer, name: &str, rows: usize, cols: usize, (dtype, ggml_type): (DType, u32)| {
        file.tensor(name, &[cols as u64, rows as u64], ggml_type, random_weight_bytes(dtype, &mut r, rows * cols))
    };
    let shapes = [("attn_q", hidden, hidden), ("attn_k", 128, hidden), ("attn_v", 128, hidden), ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)];
    for layer in 0..layers {
        for (i, (name, rows, cols)) in shapes.into_iter().enumerate() {
            file = matrix(file, &format!("blk.{layer}.{name}.weight"), rows, cols, grid[(i + 3 * layer) % grid.len()]);
        }
    }
    file = matrix(file, "token_embd.weight", vocab, hidden, grid[4]);
    file = matrix(file, "output.weight", vocab, hidden, grid[6]);
    let mut norms = rng(6);
    for name in (0..layers).flat_map(|l| [format!("blk.{l}.attn_norm.weight"), format!("blk.{l}.ffn_norm.weight")]).chain(["output_norm.weight".to_string()]) {
        let weights: Vec<f32> = random_vec(&mut norms, hidden, 0.5).iter().map(|v| 1.0 + v).collect();
        file = file.tensor(&name, &[hidden as u64], F32, f32_bytes(&weights));
    }
    let gguf = parse(file.build()).unwrap();
    let config = gguf.config().unwrap();
    let mut model = pollster::block_on(Llama::load(&gpu, config.clone(), &gguf, &LoadOptions::default(), &mut |_| {})).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % vocab as u32).collect();
    // 40 tokens take the tiles; one more, at position 40, a decode step's GEMVs.
    for (prompt, start) in [(&tokens[..40], 0), (&tokens[40 - 1..], 40 - 1)] {
        let logits = pollster::block_on(model.forward(prompt, start)).unwrap();
        let want = common::cpu_forward(&config, &gguf, &tokens[..start + prompt.len()], 0);
        assert_close(&format!("grid formats, {} tokens from {start}", prompt.len()), &logits, &want, 1e-3, 1e-3);
    }
}

fn tiny_llama_metadata() -> Writer {
    Writer::new()
        .kv("general.architecture", string("llama"))
        .kv("llama.context_length", V::U32(131072))
        .kv("llama.embedding_length", V::U32(64))
        .kv("llama.block_count", V::U32(2))
        .kv("llama.feed_forward_length", V::U32(128))
        .kv("llama.attention.head_count", V::U32(4))
        .kv("llama.attention.head_count_kv", V::U32(2))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .kv("llama.rope.freq_base", V::F32(500000.0))
        .kv("tokenizer.ggml.tokens", V::Array((0..100).map(|i| string(&format!("t{i}"))).collect()))
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.eot_token_id", V::U32(3))
        .tensor("output.weight", &[64, 100], F32, vec![0; 64 * 100 * 4])
}

#[test]
fn config_comes_from_llama_metadata_and_rope_freqs() {
    let g = parse(tiny_llama_metadata().build()).unwrap();
    let c = g.config().unwrap();
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (64, 128, 2, 4, 2, 16, 100)
    );
    assert_eq!((c.max_position_embeddings, c.rms_norm_eps, c.rope.theta, c.rope.scaling.clone()), (131072, 1e-5, 500000.0, None));
    assert_eq!((c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids.clone()), (false, Some(1), vec![2, 3]));
    assert!(c.sampling_defaults.is_empty());
    // The sampling llama.cpp's converter records from generation_config.json (top_k -1: none).
    let sampling = tiny_llama_metadata()
        .kv("general.sampling.temp", V::F32(0.6))
        .kv("general.sampling.top_p", V::F32(0.95))
        .kv("general.sampling.top_k", V::I32(-1))
        .kv("general.sampling.min_p", V::F32(0.05))
        .kv("general.sampling.penalty_repeat", V::F32(1.1));
    let defaults = parse(sampling.build()).unwrap().config().unwrap().sampling_defaults;
    assert_eq!(defaults, SamplingDefaults { temperature: Some(0.6), top_p: Some(0.95), top_k: None, min_p: Some(0.05), repetition_penalty: Some(1.1) });
    let top_k = parse(tiny_llama_metadata().kv("general.sampling.top_k", V::I32(40)).build()).unwrap().config().unwrap().sampling_defaults.top_k;
    assert_eq!(top_k, Some(40));

    // rope_freqs is kept as given: Llama 3.1's factors, another scaling's (Llama 3.2's factor 32 with a
    // smaller original context), any positive numbers; all ones is no scaling.
    let scaled = |freqs: &[f32]| {
        let file = tiny_llama_metadata().tensor("rope_freqs.weight", &[freqs.len() as u64], F32, f32_bytes(freqs));
        parse(file.build()).unwrap()
    };
    let mut arbitrary = converter_rope_freqs(500000.0, 16, 8.0, 1.0, 4.0, 8192.0);
    arbitrary[3] *= 1.01;
    for freqs in [converter_rope_freqs(500000.0, 16, 8.0, 1.0, 4.0, 8192.0), converter_rope_freqs(500000.0, 16, 32.0, 1.0, 4.0, 2048.0), arbitrary] {
        assert_eq!(scaled(&freqs).config().unwrap().rope.scaling, Some(RopeScaling::Factors(freqs)));
    }
    assert_eq!(scaled(&[1.0; 8]).config().unwrap().rope.scaling, None);
    let err = scaled(&[1.0, 2.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]).config().unwrap_err();
    assert!(err.to_string().contains("RoPE frequency factors"), "{err}");
    let err = scaled(&[1.0; 4]).config().unwrap_err();
    assert!(matches!(&err, Error::Model(ModelError::Shape { .. })), "{err}");

    // Missing, mistyped and unsupported metadata.
    let without = |key: &str| {
        let file = tiny_llama_metadata();
        let mut kept = Writer::new();
        let g = parse(file.build()).unwrap();
        for (k, v) in g.header().metadata() {
            if k != key {
                kept = kept.kv(k, v.clone());
            }
        }
        kept.tensors = file.tensors;
        parse(kept.build()).unwrap().config()
    };
    let err = without("llama.block_count").unwrap_err();
    assert_eq!(err.to_string(), "test.gguf: metadata llama.block_count: is missing");
    assert_eq!(without("llama.attention.head_count_kv").unwrap().n_kv_heads, 4);
    let other = parse(tiny_llama_metadata().kv("llama.rope.scaling.type", string("yarn")).build()).unwrap();
    assert!(matches!(other.config(), Err(Error::Model(ModelError::Unsupported(_)))));
    let mut qwen = tiny_llama_metadata();
    let at = qwen.kv.windows(5).position(|w| w == b"llama").unwrap();
    qwen.kv[at..at + 5].copy_from_slice(b"qwen2");
    let err = parse(qwen.build()).unwrap().config().unwrap_err();
    assert_eq!(err.to_string(), "unsupported model: GGUF architecture \"qwen2\" (only \"llama\")");
}

/// The SmolLM2 GGUF from scripts/fetch-smollm2; missing is a failure, not a skip.
fn smollm2_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-smollm2", path.display());
    path
}

#[test]
fn smollm2_metadata_tensors_and_config() {
    let g = Gguf::open(&smollm2_path()).unwrap();
    let h = g.header();
    assert_eq!((h.version(), h.alignment(), h.tensors().len()), (3, 32, 272));
    assert_eq!(h.get_str("general.architecture").unwrap(), Some("llama"));
    let tokens = h.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!((tokens.len(), tokens[0], tokens[2]), (49152, "<|endoftext|>", "<|im_end|>"));
    assert_eq!(h.get_str_array("tokenizer.ggml.merges").unwrap().unwrap().len(), 48900);
    assert_eq!(h.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert!(h.get_str("tokenizer.chat_template").unwrap().unwrap().contains("<|im_start|>"));

    let count = |dtype| h.tensors().iter().filter(|t| t.dtype == dtype).count();
    assert_eq!((count(DType::Q4_1), count(DType::Q8_0), count(DType::F32)), (210, 1, 61));
    assert_eq!(h.tensor("token_embd.weight").unwrap().dtype, DType::Q8_0);
    assert!(h.tensor("rope_freqs.weight").is_none());

    let c = g.config().unwrap();
    assert_eq!((c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size), (30, 576, 9, 3, 64, 1536));
    assert_eq!((c.vocab_size, c.max_position_embeddings, c.rope.theta, c.rope.scaling.clone()), (49152, 8192, 100000.0, None));
    // SmolLM2's tokenizer adds no BOS (tokenizer.ggml.add_bos_token = false), so raw prompts get none.
    assert_eq!(g.header().get_bool("tokenizer.ggml.add_bos_token").unwrap(), Some(false));
    assert_eq!((c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids.clone(), c.rms_norm_eps), (true, None, vec![2], 1e-5));

    // Every tensor the Llama loader asks for, by its Hugging Face name, with HF's row-major shape.
    let expect = |name: String, dtype: DType, shape: &[usize]| {
        let t = g.tensor(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((t.dtype, t.shape.as_slice(), t.bytes.len()), (dtype, shape, shape.iter().product::<usize>() / dtype.block().0 * dtype.block().1), "{name}");
    };
    expect("model.embed_tokens.weight".into(), DType::Q8_0, &[49152, 576]);
    expect("model.norm.weight".into(), DType::F32, &[576]);
    assert!(!g.contains("lm_head.weight"));
    for i in 0..30 {
        let layer = |name: &str| format!("model.layers.{i}.{name}.weight");
        expect(layer("self_attn.q_proj"), DType::Q4_1, &[576, 576]);
        expect(layer("self_attn.k_proj"), DType::Q4_1, &[192, 576]);
        expect(layer("self_attn.v_proj"), DType::Q4_1, &[192, 576]);
        expect(layer("self_attn.o_proj"), DType::Q4_1, &[576, 576]);
        expect(layer("mlp.gate_proj"), DType::Q4_1, &[1536, 576]);
        expect(layer("mlp.up_proj"), DType::Q4_1, &[1536, 576]);
        expect(layer("mlp.down_proj"), DType::Q4_1, &[576, 1536]);
        expect(layer("input_layernorm"), DType::F32, &[576]);
        expect(layer("post_attention_layernorm"), DType::F32, &[576]);
    }
}

#[test]
fn smollm2_q_and_k_rows_match_the_gguf_package_unpermuted() {
    let g = Gguf::new("smollm2", std::fs::read(smollm2_path()).unwrap()).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quant/smollm2_qk_rows.json")).unwrap()).unwrap();
    let hex_f32 = |s: &str| -> Vec<f32> {
        let bytes: Vec<u8> = (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let first = golden["first_values"].as_u64().unwrap() as usize;
    for (hf, gguf) in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"), ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight")] {
        let want = &golden[gguf];
        let t = g.tensor(hf).unwrap();
        let cols = t.shape[1];
        let values = t.dtype.to_f32(&t.bytes).unwrap();
        let rows: Vec<&[f32]> = values.chunks(cols).collect();
        assert_eq!(rows.len(), want["shape"][0].as_u64().unwrap() as usize);
        let got_first: Vec<f32> = rows.iter().flat_map(|r| r[..first].iter().copied()).collect();
        let want_first = hex_f32(want["first"].as_str().unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&got_first) == bits(&want_first), "{hf}: the first values of the rows differ from the gguf package's");
        for (r, (row, sum)) in rows.iter().zip(want["row_sums"].as_array().unwrap()).enumerate() {
            let (got, want) = (row.iter().map(|&v| v as f64).sum::<f64>(), sum.as_f64().unwrap());
            let scale: f64 = row.iter().map(|v| v.abs() as f64).sum();
            assert!((got - want).abs() <= 1e-9 * scale, "{hf} row {r}: sum {got} but the gguf package gives {want}");
        }
        // As stored, the rows are llama.cpp's permutation of these.
        let stored = g.tensor(gguf).unwrap();
        assert!(stored.bytes != t.bytes && stored.bytes.len() == t.bytes.len());
    }
    let embd = &golden["token_embd.weight"];
    let t = g.tensor("model.embed_tokens.weight").unwrap();
    let row_bytes = t.dtype.row_bytes(576).unwrap();
    let got: Vec<f32> = embd["rows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| t.dtype.to_f32(&t.bytes[r.as_u64().unwrap() as usize * row_bytes..][..row_bytes]).unwrap()[..8].to_vec())
        .collect();
    assert_eq!(got, hex_f32(embd["first"].as_str().unwrap()));
}

#[test]
fn smollm2_q8_0_round_trip_matches_its_stored_blocks() {
    // Re-quantizing the dequantized Q8_0 embedding gives the same bytes: our q8_0 quantizer agrees
    // with the one that made the file, on real weights.
    let g = Gguf::new("smollm2", std::fs::read(smollm2_path()).unwrap()).unwrap();
    let stored = g.tensor_bytes("token_embd.weight").unwrap();
    let sample = &stored[..DType::Q8_0.row_bytes(576).unwrap() * 64];
    let values = DType::Q8_0.to_f32(sample).unwrap();
    let again = DType::Q8_0.from_f32(&values).unwrap();
    let differing = sample.iter().zip(&again).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} bytes differ after a q8_0 round trip");
}

/// A GGUF with a SentencePiece vocabulary (Llama 2's and Mistral's kind: the tests' trained one,
/// padded with unused pieces to the fixture's 1,003 ids) and a template of Mistral's shape chats:
/// the prompt is BOS, then the turn with its space prefix, as llama.cpp tokenizes it, and the text
/// streamed is the text of the tokens.
#[test]
fn a_sentencepiece_gguf_chats() {
    let Some(gpu) = gpu() else { return };
    let goldens: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("text/spm_goldens.json")).unwrap()).unwrap();
    let dir = fixture("tiny-llama31");
    let config = Config { bos_token_id: Some(1), eos_token_ids: vec![2], ..read_hf_config(&dir).unwrap() };
    let mut pieces = goldens["pieces"].as_array().unwrap().clone();
    while pieces.len() < config.vocab_size {
        pieces.push(serde_json::json!([format!("<unused{}>", pieces.len()), 0.0, 5]));
    }
    let template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}";
    let file = gguf_of(&config, &open_safetensors_dir(&dir).unwrap())
        .kv("tokenizer.ggml.model", string("llama"))
        .kv("tokenizer.ggml.tokens", V::Array(pieces.iter().map(|p| string(p[0].as_str().unwrap())).collect()))
        .kv("tokenizer.ggml.scores", V::Array(pieces.iter().map(|p| V::F32(p[1].as_f64().unwrap() as f32)).collect()))
        .kv("tokenizer.ggml.token_type", V::Array(pieces.iter().map(|p| V::I32(p[2].as_i64().unwrap() as i32)).collect()))
        .kv("tokenizer.chat_template", string(template))
        .build();
    let path = common::temp_dir("sentencepiece-gguf").join("tiny-sentencepiece.gguf");
    std::fs::write(&path, file).unwrap();

    let files = llama_webgpu::load::open_model(&path).unwrap();
    let (tokenizer, template) = files.text().unwrap();
    let options = LoadOptions { context_length: Some(64), ..Default::default() };
    let model = pollster::block_on(Llama::load(&gpu, files.config.clone(), files.stream(), &options, &mut |_| {})).unwrap();
    let mut engine = Engine::new(model, tokenizer.clone(), template, 1).unwrap();
    let request = ChatCompletionRequest { messages: vec![ChatMessage::new("user", "Hello world")], ..Default::default() };
    let prompt = engine.prompter().chat_prompt(&request, &RenderOptions::default()).unwrap();
    assert_eq!(prompt, [vec![1], tokenizer.encode("[INST] Hello world [/INST]", false).unwrap()].concat());
    assert_eq!(tokenizer.decode(&prompt, false).unwrap(), "<s> [INST] Hello world [/INST]");

    let params = SamplingParams { temperature: Some(0.0), max_tokens: Some(12), ..Default::default() };
    let mut streamed = String::new();
    let completion = pollster::block_on(engine.generate(&prompt, &params, &CancelToken::default(), &mut |delta| streamed.push_str(&delta.text))).unwrap();
    assert!(!completion.tokens.is_empty());
    assert_eq!(streamed, completion.text);
    // Streamed a token at a time, the text of every corpus string (its characters outside the
    // vocabulary as bytes, its words after the first with their spaces) is the whole decode's; the
    // random model's own tokens above need not make valid UTF-8.
    for case in goldens["cases"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let mut stream = TextStream::new();
        let mut text: String = ids.iter().map(|&id| stream.push(&tokenizer, id).unwrap()).collect();
        text.push_str(&stream.finish(&tokenizer).unwrap());
        assert_eq!(text, tokenizer.decode(&ids, true).unwrap(), "{}", case["text"]);
    }
}
