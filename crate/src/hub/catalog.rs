//! Llama 3.1 / 3.2 Instruct GGUF files on the Hub in quants whose tensor types the engine reads,
//! with the shapes that size their KV cache. The list is pkg/models.json, which the JS API's
//! `listModels()` reads too.

use serde::Deserialize;

const MODELS_JSON: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/pkg/models.json"));

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CatalogEntry {
    pub id: String,
    pub name: String,
    pub repo: String,
    pub file: String,
    pub quant: String,
    /// The file's size in bytes (about its weights' size on the GPU).
    pub size: u64,
    /// Positions the model was trained for.
    pub context: usize,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl CatalogEntry {
    /// The `hf:` reference of the entry's file.
    pub fn reference(&self) -> String {
        format!("hf:{}/{}", self.repo, self.file)
    }
}

/// The catalog. pkg/models.json is part of the build and checked by the tests, so it parses.
pub fn catalog() -> Vec<CatalogEntry> {
    serde_json::from_str(MODELS_JSON).expect("pkg/models.json is a list of catalog entries")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{HubRef, ModelRef};

    #[test]
    fn catalog_entries_are_llama_ggufs_named_by_their_quant() {
        let entries = catalog();
        for name in ["Llama 3.2 1B Instruct", "Llama 3.2 3B Instruct", "Llama 3.1 8B Instruct"] {
            assert!(entries.iter().any(|e| e.name == name && e.quant.starts_with("Q4")), "{name}");
        }
        for e in &entries {
            let Ok(ModelRef::Hub(HubRef { repo, .. })) = ModelRef::parse(&e.reference()) else { panic!("{}", e.id) };
            assert_eq!(repo, e.repo);
            assert_eq!(crate::hub::quant_of(&e.file), e.quant, "{}", e.id);
            assert_eq!(e.heads * e.head_dim, e.hidden, "{}", e.id);
            assert!(entries.iter().filter(|other| other.id == e.id).count() == 1, "{}", e.id);
        }
    }
}
