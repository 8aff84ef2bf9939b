//! Where named adapters live between batches, across restarts and across replicas. One
//! trait, two backends: a local folder ([`LocalDirStore`]) and S3-compatible object storage
//! ([`ObjectAdapterStore`], through the `object_store` crate).
//!
//! Both keep each version whole and immutable and a pointer to the current one. Publishing
//! is a compare-and-swap of that pointer: a writer names the version it started from, and
//! when two writers (two replicas training one adapter) start from the same version exactly
//! one of them moves the pointer; the other is told where it now stands and publishes
//! nothing. Versions only grow, and a version is made current only once all of it is stored.

mod local;
mod object;

pub mod conformance;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Adapter, ModelConfig};

pub use local::LocalDirStore;
pub use object::ObjectAdapterStore;

/// A stored adapter: its tensors and the version that produced them.
pub struct StoredAdapter {
    pub name: String,
    pub adapter: Adapter,
    pub version: u64,
}

/// The PEFT files of one stored version, for export.
pub struct AdapterFiles {
    pub version: u64,
    /// (file name, contents), the files PEFT reads.
    pub files: Vec<(String, Vec<u8>)>,
}

/// What became of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    Published,
    /// Another writer moved the pointer first; it now names `current`. Nothing was published.
    Lost {
        current: Option<u64>,
    },
}

pub trait AdapterStore: Send {
    /// Stores `version` whole and makes it current, if the current version is still
    /// `expected` (`None`: nothing is stored under the name yet).
    fn publish(&self, adapter: &Adapter, version: u64, expected: Option<u64>) -> Result<Publish>;
    /// The current version as the store says now (one small read).
    fn current(&self, name: &str) -> Result<Option<u64>>;
    /// The keys of every stored adapter.
    fn names(&self) -> Vec<String>;
    /// One adapter at its current (or last good) version, after recovering what an
    /// interrupted publish left; one by one, so a start never holds every adapter at once.
    fn load(
        &self,
        name: &str,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<StoredAdapter>;
    /// One published version, for a rollback.
    fn load_version(
        &self,
        name: &str,
        version: u64,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Adapter>;
    /// Whether anything is stored under `name`.
    fn exists(&self, name: &str) -> bool;
    /// Bytes its stored versions take.
    fn bytes(&self, name: &str) -> u64;
    /// The current version's PEFT files.
    fn export(&self, name: &str) -> Result<AdapterFiles>;
}

/// Opens the store a setting names: `local` (the folder `data_dir`) or
/// `s3://bucket/prefix` (endpoint and credentials from the usual `AWS_*` variables).
pub fn open(
    setting: &str,
    data_dir: &std::path::Path,
    base_model: &str,
    keep_versions: usize,
) -> Result<Box<dyn AdapterStore>> {
    if setting == "local" {
        return Ok(Box::new(LocalDirStore::new(
            data_dir.to_path_buf(),
            base_model,
            keep_versions,
        )?));
    }
    if setting.starts_with("s3://") {
        return Ok(Box::new(ObjectAdapterStore::s3(
            setting,
            base_model,
            keep_versions,
        )?));
    }
    Err(Error::InvalidConfig(format!(
        "adapters.store must be \"local\" or \"s3://bucket/prefix\", not {setting:?}"
    )))
}

/// Written beside the PEFT files of every version: the name and version they belong to.
const META_FILE: &str = "ttrl_adapter.json";

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    name: String,
    version: u64,
}

impl Meta {
    fn json(name: &str, version: u64) -> Result<String> {
        serde_json::to_string(&Meta {
            name: name.into(),
            version,
        })
        .map_err(|e| adapter_error(name, e))
    }
}

fn adapter_error(name: &str, reason: impl ToString) -> Error {
    Error::Adapter {
        name: name.into(),
        reason: reason.to_string(),
    }
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

/// A stored adapter's key: a valid name, or `<tenant>@<name>` with both valid names.
pub fn valid_key(key: &str) -> bool {
    match key.split_once('@') {
        Some((tenant, name)) => valid_name(tenant) && valid_name(name),
        None => valid_name(key),
    }
}

/// The tenant owning an adapter key; `""` for the one namespace of a server without keys.
pub fn owner(key: &str) -> &str {
    key.split_once('@').map_or("", |(tenant, _)| tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names_are_safe_folder_names() {
        assert!(valid_name("team-a") && valid_name("v1.2_x"));
        assert!(
            !valid_name("") && !valid_name("../x") && !valid_name(".hidden") && !valid_name("a/b")
        );
        assert!(!valid_name(&"x".repeat(65)));
        assert!(!valid_name("acme@team") && valid_key("acme@team") && valid_key("team"));
        assert!(!valid_key("acme@") && !valid_key("@team") && !valid_key("a@b@c"));
    }
}
