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

/// Names for an error's list of valid values: `"a", "b" or "c"`.
pub(crate) fn quoted_choices(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|name| format!("{name:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn choices_read_as_a_list() {
        assert_eq!(super::quoted_choices(&["f32", "f16", "q8_0"]), r#""f32", "f16" or "q8_0""#);
        assert_eq!(super::quoted_choices(&["f32"]), r#""f32""#);
    }
}
