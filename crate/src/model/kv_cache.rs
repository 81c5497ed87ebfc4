//! The KV cache: keys (after RoPE) and values of every layer, allocated once for the context length.

use crate::gpu::{Gpu, GpuError};

use super::{Config, ModelError};

/// Per layer, one key and one value buffer of (context, n_kv_heads, head_dim) f32.
pub struct KvCache {
    pub context: usize,
    pub layers: Vec<(wgpu::Buffer, wgpu::Buffer)>,
}

impl KvCache {
    pub fn bytes_per_buffer(config: &Config, context: usize) -> u64 {
        (context * config.kv_dim() * 4) as u64
    }

    pub fn bytes(config: &Config, context: usize) -> u64 {
        2 * config.n_layers as u64 * Self::bytes_per_buffer(config, context)
    }

    pub async fn new(gpu: &Gpu, config: &Config, context: usize) -> Result<Self, crate::Error> {
        let per_buffer = Self::bytes_per_buffer(config, context);
        let too_large = |reason: String| ModelError::KvCacheTooLarge {
            context,
            needed: Self::bytes(config, context),
            per_buffer,
            reason,
        };
        if let Err(GpuError::Limit { available, name, .. }) = gpu.check_binding("kv cache buffer", per_buffer) {
            return Err(too_large(format!("the device binds at most {available} bytes per buffer ({name})")).into());
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let layers = (0..config.n_layers)
            .map(|i| {
                (gpu.storage_buffer(&format!("k cache {i}"), per_buffer), gpu.storage_buffer(&format!("v cache {i}"), per_buffer))
            })
            .collect();
        if let Some(error) = scope.pop().await {
            return Err(too_large(format!("the device is out of memory: {error}")).into());
        }
        Ok(Self { context, layers })
    }
}
