//! Where named adapters live between batches and across restarts. A small trait, so a
//! shared object store can replace the local directory when several replicas serve one
//! tenant's adapter; every save is atomic (a crash keeps the previous version whole).

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Adapter, ModelConfig};

/// A stored adapter: its tensors and the version that produced them.
pub struct StoredAdapter {
    pub name: String,
    pub adapter: Adapter,
    pub version: u64,
}

pub trait AdapterStore: Send {
    fn save(&self, adapter: &Adapter, version: u64) -> Result<()>;
    fn load_all(
        &self,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<StoredAdapter>>;
    fn remove(&self, name: &str) -> Result<()>;
    /// The folder holding one adapter's PEFT files, for export.
    fn path_of(&self, name: &str) -> PathBuf;
}

const META_FILE: &str = "ttrl_adapter.json";

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    name: String,
    version: u64,
}

/// Adapter names are folder names: letters, digits, `.`, `_`, `-`; 1 to 64 of them.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `<root>/<name>/{adapter_model.safetensors, adapter_config.json, ttrl_adapter.json}`.
pub struct LocalDirStore {
    root: PathBuf,
    base_model: String,
}

impl LocalDirStore {
    pub fn new(root: PathBuf, base_model: &str) -> Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self {
            root,
            base_model: base_model.into(),
        })
    }
}

impl AdapterStore for LocalDirStore {
    fn save(&self, adapter: &Adapter, version: u64) -> Result<()> {
        if !valid_name(adapter.name()) {
            return Err(Error::Adapter {
                name: adapter.name().into(),
                reason: "invalid adapter name".into(),
            });
        }
        let meta = serde_json::to_string(&Meta {
            name: adapter.name().into(),
            version,
        })
        .map_err(|e| Error::Adapter {
            name: adapter.name().into(),
            reason: e.to_string(),
        })?;
        adapter.save(
            &self.path_of(adapter.name()),
            Some(&self.base_model),
            &[(META_FILE, meta)],
        )
    }

    fn load_all(
        &self,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<StoredAdapter>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            // Temp and old folders of an interrupted save start with a dot.
            if !valid_name(&name) || !path.is_dir() {
                continue;
            }
            let meta: Meta = match std::fs::read_to_string(path.join(META_FILE))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                Some(m) => m,
                None => {
                    tracing::warn!("skipping {}: no readable {META_FILE}", path.display());
                    continue;
                }
            };
            let adapter = Adapter::load(&name, &path, model, dtype, device)?;
            out.push(StoredAdapter {
                name,
                adapter,
                version: meta.version,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path_of(name);
        if path.exists() {
            std::fs::remove_dir_all(path)?;
        }
        Ok(())
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn adapter_names_are_safe_folder_names() {
        assert!(valid_name("team-a") && valid_name("v1.2_x"));
        assert!(
            !valid_name("") && !valid_name("../x") && !valid_name(".hidden") && !valid_name("a/b")
        );
        assert!(!valid_name(&"x".repeat(65)));
    }
}
