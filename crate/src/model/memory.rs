//! What a model will take on a device before it is loaded (or downloaded): its weights and the KV
//! pool at the context a load would choose, checked against the device's limits by the plan
//! [`crate::Llama::load`] follows.

use super::llama::{checkpoint_tensors, LoadPlan, PoolSize};
use super::{Config, KvPool, LoadOptions};
use crate::gpu::KvType;
use crate::Gpu;

#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    /// The context a load with these options aims at.
    pub context: usize,
    pub kv_type: KvType,
}

impl MemoryEstimate {
    /// The estimate for `config` with `weights_bytes` of weights (about the file's size) loaded
    /// with `options`; the errors a load would stop with where they can be known beforehand. A
    /// load that re-encodes ([`LoadOptions::quant`]) is taken to shrink every matrix to that
    /// format (a checkpoint's f16 or bf16 ones do), never to grow them.
    pub fn new(gpu: &Gpu, config: &Config, weights_bytes: u64, options: &LoadOptions) -> crate::Result<Self> {
        let plan = LoadPlan::new(gpu, config, options)?;
        let weights_bytes = match options.quant {
            Some(quant) => weights_bytes.min(weights_bytes_in(config, quant)),
            None => weights_bytes,
        };
        let pages = match plan.pool {
            PoolSize::Exactly(pages) | PoolSize::AtMost { pages, .. } => pages as u64,
        };
        let kv_bytes = pages * KvPool::bytes_per_page(config, gpu.kv_type);
        Ok(Self { weights_bytes, kv_bytes, context: plan.context, kv_type: gpu.kv_type })
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_bytes
    }
}

/// The bytes of `config`'s weights with every matrix in `dtype` and norm weights in f32.
fn weights_bytes_in(config: &Config, dtype: crate::quant::DType) -> u64 {
    checkpoint_tensors(config, config.tie_word_embeddings)
        .iter()
        .map(|t| {
            let (rows, cols) = (t.shape.iter().rev().skip(1).product::<usize>(), *t.shape.last().unwrap_or(&1));
            let row_bytes = if t.is_norm { 4 * cols } else { dtype.row_bytes(cols).unwrap_or(4 * cols) };
            (rows * row_bytes) as u64
        })
        .sum()
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "about {} of GPU memory: {} of weights and a {} KV cache ({} positions, {})",
            size_text(self.total_bytes()),
            size_text(self.weights_bytes),
            size_text(self.kv_bytes),
            self.context,
            self.kv_type.name()
        )
    }
}

/// 807694464 -> "770.3 MiB".
pub fn size_text(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / (1u64 << 10) as f64),
        b => format!("{b} bytes"),
    }
}
