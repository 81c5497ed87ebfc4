//! The CPU (de)quantizers against goldens from llama.cpp's `gguf` package
//! (tests/fixtures/quant/make_quant_goldens.py) and from ggml's own quantizers
//! (make_ggml_quant_goldens.py), K-quant round trips, and input validation.

mod common;

use common::{fixture, random_vec, rng};
use llama_webgpu::quant::{quantize_rows, DType, QuantError};
use rand::Rng;

struct Case {
    name: String,
    input: Option<Vec<f32>>,
    quantized: Vec<u8>,
    dequantized: Vec<f32>,
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn goldens(dtype: DType) -> Vec<Case> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quant/quant_goldens.json")).unwrap()).unwrap();
    let cases = json["formats"][dtype.name()].as_array().unwrap_or_else(|| panic!("no goldens for {dtype}"));
    cases
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_string(),
            input: c["input"].as_str().map(|s| f32s(&hex(s))),
            quantized: hex(c["quantized"].as_str().unwrap()),
            dequantized: f32s(&hex(c["dequantized"].as_str().unwrap())),
        })
        .collect()
}

/// Bit-for-bit equality, naming the first differing element.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g.to_bits() != w.to_bits()) {
        panic!("{what}: element {i} is {} ({:#010x}) but gguf gives {} ({:#010x})", got[i], got[i].to_bits(), want[i], want[i].to_bits());
    }
}

#[test]
fn dequantization_matches_gguf_bit_for_bit() {
    for dtype in DType::block_formats() {
        let cases = goldens(dtype);
        assert!(!cases.is_empty());
        for case in cases {
            let got = dtype.to_f32(&case.quantized).unwrap();
            assert_bits(&format!("{dtype} {}", case.name), &got, &case.dequantized);
        }
    }
}

/// `dtype.from_f32(input)` equals `want` byte for byte, naming the first differing byte.
fn assert_quantizes_to(dtype: DType, what: &str, input: &[f32], want: &[u8], reference: &str) {
    let got = dtype.from_f32(input).unwrap();
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        let (elements, bytes) = dtype.block();
        panic!(
            "{dtype} {what}: byte {i} (block {}, values {:?}) is {:#04x} but {reference} gives {:#04x}",
            i / bytes,
            &input[i / bytes * elements..][..elements],
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{dtype} {what}");
}

#[test]
fn legacy_quantization_matches_gguf_byte_for_byte() {
    for dtype in [DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0] {
        for case in goldens(dtype) {
            let input = case.input.expect("legacy goldens carry their input");
            assert_quantizes_to(dtype, &case.name, &input, &case.quantized, "gguf");
        }
    }
}

/// The quantizers `gguf` lacks against ggml's C (llama-quantize without an importance matrix).
#[test]
fn k_quant_and_iq4_quantization_matches_ggml_byte_for_byte() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quant/ggml_quant_goldens.json")).unwrap()).unwrap();
    for dtype in [DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K, DType::IQ4NL, DType::IQ4XS] {
        let cases = json["formats"][dtype.name()].as_object().unwrap_or_else(|| panic!("no ggml goldens for {dtype}"));
        assert!(cases.len() >= 10, "{dtype}: {} cases", cases.len());
        for (name, quantized) in cases {
            let input = f32s(&hex(json["inputs"][name].as_str().unwrap()));
            assert_quantizes_to(dtype, name, &input, &hex(quantized.as_str().unwrap()), "ggml");
        }
    }
}

/// (rms error / rms value, max |error| / max |value|) of a quantize-dequantize round trip.
fn round_trip_error(dtype: DType, values: &[f32]) -> (f64, f64) {
    let back = dtype.to_f32(&dtype.from_f32(values).unwrap()).unwrap();
    assert_eq!(back.len(), values.len());
    let sum_sq = |it: &mut dyn Iterator<Item = f64>| it.map(|v| v * v).sum::<f64>();
    let err = sum_sq(&mut values.iter().zip(&back).map(|(a, b)| (a - b) as f64));
    let rms = sum_sq(&mut values.iter().map(|&v| v as f64));
    let max_err = values.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let max = values.iter().map(|v| v.abs()).fold(0.0, f32::max);
    ((err / rms).sqrt(), (max_err / max) as f64)
}

/// Bounds (relative RMS error, relative max error) for uniform and Gaussian-like weights: a 4-bit
/// step over a sub-block's range is 1/15 of it (half a step at most when the fit is the min-max one),
/// a 5-bit step 1/31, a 6-bit step 1/63; q2_k's 1/3 of a range of 16 weights, q3_k's a quarter of
/// their largest magnitude (its levels -4..3 clamp a value opposite the largest by up to a step).
#[test]
fn k_quant_round_trips_stay_within_their_step() {
    let mut r = rng(7);
    let uniform = random_vec(&mut r, 256 * 40, 1.0);
    // Sum of uniforms: bell-shaped with tails, scaled per row as real weights are.
    let bell: Vec<f32> = (0..256 * 40)
        .map(|i| (0..4).map(|_| r.random_range(-1.0f32..1.0)).sum::<f32>() * (1 + i / 256 % 7) as f32 * 0.01)
        .collect();
    for (name, values) in [("uniform", &uniform), ("bell", &bell)] {
        let (q2_k_rms, q2_k_max) = round_trip_error(DType::Q2K, values);
        let (q3_k_rms, q3_k_max) = round_trip_error(DType::Q3K, values);
        let (q4_k_rms, q4_k_max) = round_trip_error(DType::Q4K, values);
        let (q5_k_rms, q5_k_max) = round_trip_error(DType::Q5K, values);
        let (q6_k_rms, q6_k_max) = round_trip_error(DType::Q6K, values);
        let (q4_0_rms, _) = round_trip_error(DType::Q4_0, values);
        let (q5_0_rms, _) = round_trip_error(DType::Q5_0, values);
        let (q8_0_rms, _) = round_trip_error(DType::Q8_0, values);
        println!("{name}: q2_k rms {q2_k_rms:.4} max {q2_k_max:.4}, q3_k rms {q3_k_rms:.4} max {q3_k_max:.4}");
        println!("{name}: q4_k rms {q4_k_rms:.4} max {q4_k_max:.4}, q5_k rms {q5_k_rms:.4} max {q5_k_max:.4}, q6_k rms {q6_k_rms:.4} max {q6_k_max:.4}, q4_0 rms {q4_0_rms:.4}, q5_0 rms {q5_0_rms:.4}, q8_0 rms {q8_0_rms:.4}");
        assert!(q2_k_rms < 0.4 && q2_k_max < 0.4, "{name}: q2_k relative error rms {q2_k_rms}, max {q2_k_max}");
        assert!(q3_k_rms < 0.2 && q3_k_max < 0.3, "{name}: q3_k relative error rms {q3_k_rms}, max {q3_k_max}");
        assert!(q3_k_rms < q2_k_rms / 1.5 && q4_k_rms < q3_k_rms, "{name}: q2_k {q2_k_rms}, q3_k {q3_k_rms}, q4_k {q4_k_rms}");
        assert!(q4_k_rms < 0.09 && q4_k_max < 0.1, "{name}: q4_k relative error rms {q4_k_rms}, max {q4_k_max}");
        assert!(q5_k_rms < 0.035 && q5_k_max < 0.065, "{name}: q5_k relative error rms {q5_k_rms}, max {q5_k_max}");
        assert!(q5_k_rms <= q5_0_rms && q5_k_rms <= q4_k_rms / 1.5, "{name}: q5_k {q5_k_rms} vs q5_0 {q5_0_rms}, q4_k {q4_k_rms}");
        assert!(q6_k_rms < 0.025 && q6_k_max < 0.03, "{name}: q6_k relative error rms {q6_k_rms}, max {q6_k_max}");
        // The searches should do at least as well as the plain formats of the same width.
        assert!(q4_k_rms <= q4_0_rms, "{name}: q4_k {q4_k_rms} worse than q4_0 {q4_0_rms}");
        assert!(q6_k_rms <= 2.0 * q4_k_rms / 4.0 && q8_0_rms <= q6_k_rms, "{name}: q6_k {q6_k_rms} vs q4_k {q4_k_rms}, q8_0 {q8_0_rms}");
    }
}

/// iq4's levels are denser near zero: on bell-shaped weights (as real ones are) both iq4 formats
/// come closer than q4_0 with the same 4 bits; zeros stay zeros.
#[test]
fn iq4_round_trips_beat_q4_0_on_bell_shaped_weights() {
    let mut r = rng(9);
    let bell: Vec<f32> = (0..256 * 40)
        .map(|i| (0..4).map(|_| r.random_range(-1.0f32..1.0)).sum::<f32>() * (1 + i / 256 % 7) as f32 * 0.01)
        .collect();
    let (q4_0_rms, _) = round_trip_error(DType::Q4_0, &bell);
    for dtype in [DType::IQ4NL, DType::IQ4XS] {
        let (rms, max) = round_trip_error(dtype, &bell);
        println!("{dtype}: rms {rms:.4} max {max:.4}, q4_0 rms {q4_0_rms:.4}");
        assert!(rms < q4_0_rms && max < 0.1, "{dtype}: relative error rms {rms} (q4_0 {q4_0_rms}), max {max}");
        let zeros = vec![0.0; 512];
        assert!(dtype.to_f32(&dtype.from_f32(&zeros).unwrap()).unwrap().iter().all(|&v| v == 0.0), "{dtype} zeros");
    }
}

#[test]
fn k_quants_keep_zeros_constants_and_outliers() {
    for dtype in [DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K] {
        let zeros = vec![0.0; 512];
        assert!(dtype.to_f32(&dtype.from_f32(&zeros).unwrap()).unwrap().iter().all(|&v| v == 0.0), "{dtype} zeros");

        // One sub-block far larger than the rest: the large one stays accurate.
        let mut values = random_vec(&mut rng(3), 256, 0.01);
        values[40] = 50.0;
        let back = dtype.to_f32(&dtype.from_f32(&values).unwrap()).unwrap();
        assert!((back[40] - 50.0).abs() < 50.0 / 30.0, "{dtype} outlier came back as {}", back[40]);

        let constant = vec![0.75; 256];
        let back = dtype.to_f32(&dtype.from_f32(&constant).unwrap()).unwrap();
        assert!(back.iter().all(|v| (v - 0.75).abs() < 0.75 / 30.0), "{dtype} constant came back as {back:?}");
    }
}

#[test]
fn partial_blocks_are_errors_not_panics() {
    for dtype in DType::block_formats().chain([DType::F32, DType::F16, DType::BF16]) {
        let (elements, bytes) = dtype.block();
        assert!(dtype.to_f32(&vec![0; bytes * 2]).is_ok());
        let err = dtype.to_f32(&vec![0; bytes * 2 + 1]).unwrap_err();
        assert_eq!(err, QuantError::PartialBlockBytes { dtype, len: bytes * 2 + 1, block_bytes: bytes });
        if dtype.is_grid_format() {
            continue;
        }
        if elements > 1 {
            let err = dtype.from_f32(&vec![0.0; elements + 1]).unwrap_err();
            assert_eq!(err, QuantError::PartialBlockValues { dtype, len: elements + 1, block_elements: elements });
            assert_eq!(dtype.row_bytes(elements + 1), None);
            let err = quantize_rows(dtype, &vec![0.0; 3 * elements + 3], elements + 1).unwrap_err();
            assert_eq!(err, QuantError::RowNotWholeBlocks { dtype, cols: elements + 1, block_elements: elements });
        }
        assert_eq!(dtype.row_bytes(elements * 3), Some(bytes * 3));
        let err = quantize_rows(dtype, &vec![0.0; elements * 5], elements * 2).unwrap_err();
        assert_eq!(err, QuantError::PartialRow { len: elements * 5, cols: elements * 2 });
        assert!(matches!(quantize_rows(dtype, &[], 0), Err(QuantError::RowNotWholeBlocks { .. })));
    }
}

#[test]
fn quantize_rows_encodes_each_row_as_whole_blocks() {
    let (rows, cols) = (3, 512);
    let values = random_vec(&mut rng(11), rows * cols, 2.0);
    for dtype in DType::encodable().filter(|d| d.is_block_format()) {
        let bytes = quantize_rows(dtype, &values, cols).unwrap();
        let row_bytes = dtype.row_bytes(cols).unwrap();
        assert_eq!(bytes.len(), rows * row_bytes, "{dtype}");
        for r in 0..rows {
            let row = dtype.from_f32(&values[r * cols..(r + 1) * cols]).unwrap();
            assert_eq!(&bytes[r * row_bytes..(r + 1) * row_bytes], &row[..], "{dtype} row {r}");
        }
    }
}

#[test]
fn formats_have_llama_cpp_sizes_and_distinct_shader_codes() {
    let sizes: Vec<_> = DType::block_formats().map(|d| (d.name(), d.block())).collect();
    assert_eq!(
        sizes,
        [
            ("q4_0", (32, 18)),
            ("q4_1", (32, 20)),
            ("q5_0", (32, 22)),
            ("q5_1", (32, 24)),
            ("q8_0", (32, 34)),
            ("q2_k", (256, 84)),
            ("q3_k", (256, 110)),
            ("q4_k", (256, 144)),
            ("q5_k", (256, 176)),
            ("q6_k", (256, 210)),
            ("iq4_nl", (32, 18)),
            ("iq4_xs", (256, 136)),
            ("iq1_s", (256, 50)),
            ("iq1_m", (256, 56)),
            ("iq2_xxs", (256, 66)),
            ("iq2_xs", (256, 74)),
            ("iq2_s", (256, 82)),
            ("iq3_xxs", (256, 98)),
            ("iq3_s", (256, 110))
        ]
    );
    let mut codes: Vec<u32> = DType::ALL.into_iter().map(DType::shader_code).collect();
    codes.sort();
    assert_eq!(codes, (0..DType::ALL.len() as u32).collect::<Vec<_>>(), "one code per format");
}

#[test]
fn floats_round_to_nearest_even() {
    // 1/3 in f16 is 0x3555; 1 + 2^-8 is a bf16 tie that rounds down to 1.0, 1 + 3 * 2^-8 rounds up.
    assert_eq!(DType::F16.from_f32(&[1.0 / 3.0, -2.0]).unwrap(), [0x55, 0x35, 0x00, 0xc0]);
    let ties = [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0];
    assert_eq!(DType::BF16.from_f32(&ties).unwrap(), [0x80, 0x3f, 0x82, 0x3f]);
    assert_eq!(DType::F16.to_f32(&[0x55, 0x35, 0x01, 0x00]).unwrap(), [0.33325195, 5.9604645e-8]);
    assert_eq!(DType::BF16.to_f32(&[0x80, 0x3f, 0x49, 0x40]).unwrap(), [1.0, 3.140625]);
    let values = [1.5f32, -0.0, f32::MAX, 1e-40];
    assert_eq!(DType::F32.to_f32(&DType::F32.from_f32(&values).unwrap()).unwrap(), values);
}

#[test]
fn a_large_matrix_encoded_across_threads_gives_the_bytes_of_its_blocks_one_by_one() {
    // 1,056 blocks of 256 (8,448 of 32): over the encoder's threshold for a second thread.
    let values = random_vec(&mut rng(11), 256 * 1056, 1.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cores >= 2, "the threaded encoder needs 2 cores to be checked; this machine has {cores}");
    for dtype in DType::encodable().filter(|d| d.is_block_format()) {
        let (elements, _) = dtype.block();
        let one_by_one: Vec<u8> = values.chunks(elements).flat_map(|block| dtype.from_f32(block).unwrap()).collect();
        assert!(dtype.from_f32(&values).unwrap() == one_by_one, "{dtype}: the whole encode differs from block by block");
    }
}

/// The grid formats (iq1, iq2, iq3) decode (the goldens above) but are not written here: ggml
/// itself wants an importance matrix for them. Asking is a clear error, not a poor encoding.
#[test]
fn grid_formats_are_refused_as_encoding_targets_by_name() {
    let grid: Vec<_> = DType::ALL.into_iter().filter(|d| d.is_grid_format()).map(DType::name).collect();
    assert_eq!(grid, ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s"]);
    for dtype in DType::ALL.into_iter().filter(|d| d.is_grid_format()) {
        assert_eq!(dtype.from_f32(&[0.5; 256]).unwrap_err(), QuantError::NotEncodable { dtype });
        assert_eq!(quantize_rows(dtype, &[0.5; 512], 256).unwrap_err(), QuantError::NotEncodable { dtype });
        let err = DType::encodable_from_name(dtype.name()).unwrap_err();
        assert!(err.starts_with(&format!("{dtype}: weights are not encoded")) && err.contains("--imatrix") && err.contains("\"q4_k\""), "{err}");
        assert!(!err.contains("iq2_xs\""), "{err}");
    }
    assert_eq!(DType::encodable_from_name("q4_k"), Ok(DType::Q4K));
    let err = DType::encodable_from_name("q4_k_m").unwrap_err();
    assert!(err.starts_with("\"q4_k_m\" is not a weight format: \"f32\", "), "{err}");
}
