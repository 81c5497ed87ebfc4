//! What a model will take on a device before it is loaded (or downloaded): its weights and the KV
//! pool at the context a load would choose, checked against the device's binding limit the way
//! [`Llama::load`] checks them.

use super::llama::rope_table_bytes_per_position;
use super::{Config, KvPool, Llama, LoadOptions, ModelError, PAGE_SIZE};
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
        if let Some(context) = options.context_length.filter(|&n| n > config.max_position_embeddings || n == 0) {
            return Err(ModelError::ContextTooLong { requested: context, max: config.max_position_embeddings }.into());
        }
        if !gpu.kv_type.fits(config.kv_dim()) {
            return Err(ModelError::KvTypeUnfit { kv_type: gpu.kv_type.name(), kv_dim: config.kv_dim() }.into());
        }
        KvPool::pages_per_buffer(gpu, config)?;
        let context = match options.context_length {
            Some(context) => {
                gpu.check_binding("rope cos/sin table", context as u64 * rope_table_bytes_per_position(config))?;
                context
            }
            None => Llama::default_context(gpu, config),
        };
        // As the load sizes its pool: the memory asked for, else a context per sequence (the
        // memory left after the weights may shorten it).
        let page_bytes = KvPool::bytes_per_page(config, gpu.kv_type);
        let pages = match options.kv_memory {
            Some(bytes) => bytes / page_bytes,
            None => {
                let contexts = options.kv_contexts.unwrap_or(options.max_sequences).max(1);
                (contexts * context.div_ceil(PAGE_SIZE)) as u64
            }
        };
        Ok(Self { weights_bytes, kv_bytes: pages * page_bytes, context, kv_type: gpu.kv_type })
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
