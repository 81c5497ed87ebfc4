//! Checkpoint reading: bad files get errors naming the file and the problem; the model loader names
//! missing tensors and wrong shapes.

mod common;

use common::{fixture, gpu};
use llama_webgpu::load::{index_shards, open_safetensors_dir, Safetensors, WeightSource};
use llama_webgpu::{Config, Llama, LoadOptions};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn checkpoint(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(&str, TensorView)> =
        tensors.iter().map(|(name, dtype, shape, data)| (*name, TensorView::new(*dtype, shape.clone(), data).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

fn open(bytes: Vec<u8>) -> Result<Safetensors<Vec<u8>>, String> {
    Safetensors::new(vec![("test.safetensors".to_string(), bytes)]).map_err(|e| e.to_string())
}

#[test]
fn reads_tensors_of_every_float_format() {
    let bytes = checkpoint(&[
        ("a", Dtype::F32, vec![2, 2], vec![0; 16]),
        ("b", Dtype::F16, vec![3], vec![0; 6]),
        ("c", Dtype::BF16, vec![1, 4], vec![1; 8]),
    ]);
    let source = open(bytes).unwrap();
    let c = source.tensor("c").unwrap();
    assert_eq!((c.dtype.name(), c.shape, c.bytes.len()), ("bf16", vec![1, 4], 8));
    assert!(source.contains("a") && !source.contains("d"));
    assert_eq!(source.tensor("d").unwrap_err().to_string(), "tensor d is missing from the checkpoint");
}

#[test]
fn a_truncated_file_is_named_with_its_sizes() {
    let mut bytes = checkpoint(&[("weight", Dtype::F32, vec![4, 4], vec![0; 64])]);
    let full = bytes.len();
    bytes.truncate(full - 10);
    let err = open(bytes).err().unwrap();
    assert_eq!(err, format!("test.safetensors: the header describes {full} bytes but the file has {} (truncated or corrupt)", full - 10));
}

#[test]
fn a_corrupt_header_is_reported() {
    for bytes in [vec![], vec![1, 2, 3], b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all".to_vec()] {
        let err = open(bytes).err().unwrap();
        assert!(err.contains("test.safetensors: malformed safetensors header"), "{err}");
    }
}

#[test]
fn unsupported_dtypes_are_named() {
    let err = open(checkpoint(&[("q", Dtype::I8, vec![8], vec![0; 8])])).err().unwrap();
    assert!(err.contains("tensor q has unsupported dtype I8"), "{err}");
}

#[test]
fn shard_index_lists_each_file_once_and_rejects_paths() {
    let index = r#"{"metadata": {}, "weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
    assert_eq!(index_shards(index).unwrap(), ["m-1.safetensors", "m-2.safetensors"]);
    let evil = r#"{"weight_map": {"a": "../../etc/passwd"}}"#;
    assert!(index_shards(evil).unwrap_err().to_string().contains("plain file name"));
}

#[test]
fn a_missing_shard_file_is_named() {
    let dir = std::env::temp_dir().join(format!("llama-webgpu-missing-shard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-llama31/model.safetensors.index.json"), dir.join("model.safetensors.index.json")).unwrap();
    std::fs::copy(fixture("tiny-llama31/model-00001-of-00002.safetensors"), dir.join("model-00001-of-00002.safetensors")).unwrap();
    let err = open_safetensors_dir(&dir).err().unwrap().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

/// The tied fixture's tensors, with `edit` applied to the list.
fn edited_fixture(edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) -> Safetensors<Vec<u8>> {
    let source = open_safetensors_dir(&fixture("tiny-llama32-tied")).unwrap();
    let bytes = std::fs::read(fixture("tiny-llama32-tied/model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        parsed.tensors().into_iter().map(|(name, t)| (name.clone(), t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    assert!(source.contains("model.norm.weight"));
    edit(&mut tensors);
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone())).collect();
    open(checkpoint(&refs)).unwrap()
}

fn load_error(source: &Safetensors<Vec<u8>>) -> Option<String> {
    let gpu = gpu()?;
    let config = llama_webgpu::load::read_hf_config(&fixture("tiny-llama32-tied")).unwrap();
    Some(pollster::block_on(Llama::load(&gpu, config, source, &LoadOptions::default(), &mut |_| {})).err().unwrap().to_string())
}

#[test]
fn a_missing_tensor_stops_the_load() {
    let source = edited_fixture(|t| t.retain(|(name, ..)| name != "model.layers.1.mlp.up_proj.weight"));
    let Some(err) = load_error(&source) else { return };
    assert_eq!(err, "tensor model.layers.1.mlp.up_proj.weight is missing from the checkpoint");
}

#[test]
fn a_tensor_of_the_wrong_shape_stops_the_load() {
    let source = edited_fixture(|t| {
        let q = t.iter_mut().find(|(name, ..)| name == "model.layers.0.self_attn.q_proj.weight").unwrap();
        q.2 = vec![q.2[1], q.2[0]];
    });
    let Some(err) = load_error(&source) else { return };
    assert_eq!(err, "tensor model.layers.0.self_attn.q_proj.weight has shape [96, 128], expected [128, 96]");
}

#[test]
fn config_errors_name_the_field() {
    let config = std::fs::read_to_string(fixture("tiny-llama31/config.json")).unwrap();
    let err = Config::from_hf_json(&config.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"), None).unwrap_err();
    assert!(err.to_string().contains("num_attention_heads 8 is not a multiple of num_key_value_heads 3"), "{err}");
    let err = Config::from_hf_json(&config.replace("\"llama3\"", "\"yarn\""), None).unwrap_err();
    assert!(err.to_string().contains("rope_type \"yarn\""), "{err}");
    let err = Config::from_hf_json("{\"hidden_size\": 4", None).unwrap_err();
    assert!(err.to_string().starts_with("invalid model config"), "{err}");
}
