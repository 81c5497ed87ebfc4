//! What a model will take on a device before it is loaded (or downloaded): its weights and the KV
//! pool at the context a load would choose, checked against the device's limits by the plan
//! [`crate::Llama::load`] follows.

use super::llama::{LoadPlan, PoolSize};
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
    /// with `options`; the errors a load would stop with where they can be known beforehand.
    pub fn new(gpu: &Gpu, config: &Config, weights_bytes: u64, options: &LoadOptions) -> crate::Result<Self> {
        let plan = LoadPlan::new(gpu, config, options)?;
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
