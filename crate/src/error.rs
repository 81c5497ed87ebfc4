use crate::{gpu::GpuError, load::LoadError, model::ModelError};

/// Every error the engine returns; each module keeps its own enum with the numbers that matter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
