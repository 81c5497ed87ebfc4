use crate::{engine::EngineError, gpu::GpuError, hub::HubError, load::LoadError, model::ModelError, quant::QuantError};

/// Every error the engine returns; each module keeps its own enum with the numbers that matter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Quant(#[from] QuantError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
