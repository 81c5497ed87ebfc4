//! llama-webgpu: Llama 3.1 / 3.2 inference through hand-written WGSL compute shaders, on WebGPU in the
//! browser and on wgpu natively.

pub mod api;
pub mod bench;
pub mod engine;
pub mod fuzzing;
pub mod gpu;
pub mod grammar;
pub mod hub;
pub mod load;
pub mod model;
pub mod quant;
pub mod reference;
pub mod sample;
pub mod text;
#[cfg(target_arch = "wasm32")]
pub mod web;

mod error;

pub use engine::{CancelToken, Completion, Delta, Engine};
pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
pub use model::{Config, Llama, LoadOptions, LoadProgress};
