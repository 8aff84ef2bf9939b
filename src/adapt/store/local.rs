//! The local folder store: every version in its own folder and a `CURRENT` pointer file.
//! A version is written and fsynced in a temp folder, renamed into place, and only then made
//! current by an atomic replace of the pointer (fsynced, and the folder too), under a lock
//! file so that the compare-and-swap holds between processes sharing the folder. At every
//! instant some complete version is current, so a crash at any moment loses nothing that was
//! reported to a client. At start, leftovers of interrupted saves are removed and a version
//! that does not load is quarantined (renamed aside) in favour of the previous good one.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{
    adapter_error, valid_key, AdapterFiles, AdapterStore, Meta, Publish, StoredAdapter, META_FILE,
};
use crate::error::Result;
use crate::model::lora::{write_synced, PEFT_FILES};
use crate::model::{Adapter, ModelConfig};
use crate::telemetry as m;

const CURRENT: &str = "CURRENT";
/// Held (flock) while the pointer is compared and swapped.
const LOCK: &str = "LOCK";

/// `<root>/<name>/CURRENT` names the current `<root>/<name>/v<N>/` (PEFT files plus
/// `ttrl_adapter.json`); the last `keep_versions` versions stay.
pub struct LocalDirStore {
    root: PathBuf,
    base_model: String,
    keep_versions: usize,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl LocalDirStore {
    pub fn new(root: PathBuf, base_model: &str, keep_versions: usize) -> Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self {
            root,
            base_model: base_model.into(),
            keep_versions: keep_versions.max(1),
        })
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        self.dir(name).join(format!("v{version}"))
    }

    fn current(&self, name: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir(name).join(CURRENT))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// Stored versions, newest first.
    fn versions(&self, name: &str) -> Vec<u64> {
        let mut versions: Vec<u64> = std::fs::read_dir(self.dir(name))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse().ok())
            .collect();
        versions.sort_unstable_by(|a, b| b.cmp(a));
        versions
    }

    fn set_current(&self, name: &str, version: u64) -> Result<()> {
        let dir = self.dir(name);
        let tmp = dir.join(format!("{CURRENT}.tmp"));
        write_synced(&tmp, format!("{version}\n").as_bytes())?;
        std::fs::rename(&tmp, dir.join(CURRENT))?;
        sync_dir(&dir)?;
        Ok(())
    }

    fn read_version(
        &self,
        name: &str,
        version: u64,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Adapter> {
        let dir = self.version_dir(name, version);
        let meta: Meta = std::fs::read_to_string(dir.join(META_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(|| adapter_error(name, format!("no readable {META_FILE} in v{version}")))?;
        if meta.version != version {
            return Err(adapter_error(
                name,
                format!("v{version} says it is version {}", meta.version),
            ));
        }
        Adapter::load(name, &dir, model, dtype, device)
    }

    /// Moves a version that does not load aside, where an operator can look at it.
    fn quarantine(&self, name: &str, version: u64, why: &str) {
        let from = self.version_dir(name, version);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let to = self
            .dir(name)
            .join(format!("quarantine-v{version}-{stamp}"));
        tracing::error!(
            "adapter `{name}` v{version} does not load ({why}); quarantined as {}",
            to.display()
        );
        metrics::counter!(m::ADAPTERS_QUARANTINED).increment(1);
        if let Err(e) = std::fs::rename(&from, &to) {
            tracing::error!("quarantining {}: {e}", from.display());
        }
    }

    /// Loads one adapter's newest good version at or below its pointer, after removing the
    /// leftovers of interrupted saves.
    fn recover(
        &self,
        name: &str,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<StoredAdapter> {
        let dir = self.dir(name);
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') || file == format!("{CURRENT}.tmp") {
                let _ = std::fs::remove_dir_all(entry.path())
                    .or_else(|_| std::fs::remove_file(entry.path()));
            }
        }
        self.migrate_flat_layout(name)?;
        let pointer = self.current(name);
        let mut last_error = "no stored version".to_string();
        for version in self.versions(name) {
            if pointer.is_some_and(|p| version > p) {
                // Renamed into place but never made current: no client was told of it.
                let _ = std::fs::remove_dir_all(self.version_dir(name, version));
                continue;
            }
            match self.read_version(name, version, model, dtype, device) {
                Ok(adapter) => {
                    if pointer != Some(version) {
                        self.set_current(name, version)?;
                    }
                    return Ok(StoredAdapter {
                        name: name.into(),
                        adapter,
                        version,
                    });
                }
                Err(e) => {
                    last_error = e.to_string();
                    self.quarantine(name, version, &last_error);
                }
            }
        }
        Err(adapter_error(name, last_error))
    }

    /// Folders written before versions existed hold the PEFT files directly: they become
    /// their version's folder, made current.
    fn migrate_flat_layout(&self, name: &str) -> Result<()> {
        let dir = self.dir(name);
        if !dir.join(META_FILE).exists() || dir.join(CURRENT).exists() {
            return Ok(());
        }
        let version = std::fs::read_to_string(dir.join(META_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<Meta>(&t).ok())
            .map_or(0, |m| m.version);
        let target = self.version_dir(name, version);
        std::fs::create_dir_all(&target)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.path().is_file() {
                std::fs::rename(entry.path(), target.join(entry.file_name()))?;
            }
        }
        sync_dir(&target)?;
        sync_dir(&dir)?;
        self.set_current(name, version)
    }

    /// Keeps the newest `keep_versions` (the current one always among them).
    fn prune(&self, name: &str, current: u64) {
        for version in self
            .versions(name)
            .into_iter()
            .filter(|&v| v < current)
            .skip(self.keep_versions - 1)
        {
            let _ = std::fs::remove_dir_all(self.version_dir(name, version));
        }
    }
}

impl AdapterStore for LocalDirStore {
    fn publish(&self, adapter: &Adapter, version: u64, expected: Option<u64>) -> Result<Publish> {
        let name = adapter.name();
        if !valid_key(name) {
            return Err(adapter_error(name, "invalid adapter name"));
        }
        let dir = self.dir(name);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            sync_dir(&self.root)?;
        }
        let lock = std::fs::File::create(dir.join(LOCK))?;
        lock.lock()?; // released when `lock` drops
        let current = self.current(name);
        if current != expected {
            return Ok(Publish::Lost { current });
        }
        if expected.is_some_and(|e| version <= e) {
            return Err(adapter_error(
                name,
                format!("version {version} is not newer than the current {current:?}"),
            ));
        }
        let meta = Meta::json(name, version)?;
        let tmp = dir.join(format!(".v{version}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let written = adapter
            .write_files(&tmp, Some(&self.base_model), &[(META_FILE, meta)])
            .and_then(|()| Ok(sync_dir(&tmp)?));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let target = self.version_dir(name, version);
        let _ = std::fs::remove_dir_all(&target); // a never-current leftover
        std::fs::rename(&tmp, &target)?;
        sync_dir(&dir)?;
        self.set_current(name, version)?;
        self.prune(name, version);
        Ok(Publish::Published)
    }

    fn current(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.current(name))
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| valid_key(n))
            .collect();
        names.sort();
        names
    }

    fn load(
        &self,
        name: &str,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<StoredAdapter> {
        self.recover(name, model, dtype, device)
    }

    fn load_version(
        &self,
        name: &str,
        version: u64,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Adapter> {
        if !self.versions(name).contains(&version) {
            return Err(adapter_error(name, format!("no stored version {version}")));
        }
        self.read_version(name, version, model, dtype, device)
    }

    fn exists(&self, name: &str) -> bool {
        valid_key(name) && self.dir(name).is_dir()
    }

    fn bytes(&self, name: &str) -> u64 {
        fn walk(dir: &Path) -> u64 {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        if valid_key(name) {
            walk(&self.dir(name))
        } else {
            0
        }
    }

    fn export(&self, name: &str) -> Result<AdapterFiles> {
        let version = self
            .current(name)
            .ok_or_else(|| adapter_error(name, "nothing stored"))?;
        let dir = self.version_dir(name, version);
        let files = PEFT_FILES
            .iter()
            .map(|f| Ok((f.to_string(), std::fs::read(dir.join(f))?)))
            .collect::<Result<_>>()?;
        Ok(AdapterFiles { version, files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::store::conformance::{self, seeded_adapter, tiny_model};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ttrl-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_local_folder_keeps_the_store_contract() {
        let root = scratch("contract");
        conformance::run(&|| Box::new(LocalDirStore::new(root.clone(), "tiny", 3).unwrap()));
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn the_newest_good_version_loads_and_a_corrupt_one_is_quarantined() {
        let config = tiny_model();
        let root = scratch("corrupt");
        let store = LocalDirStore::new(root.clone(), "tiny", 3).unwrap();
        for v in 1..=4 {
            store
                .publish(&seeded_adapter("a", v), v, (v > 1).then(|| v - 1))
                .unwrap();
        }
        // Kept: the newest three.
        assert_eq!(store.versions("a"), vec![4, 3, 2]);
        std::fs::write(root.join("a/v4/adapter_model.safetensors"), b"garbage").unwrap();
        // Leftovers of an interrupted save: a temp folder and an orphan newer than CURRENT.
        std::fs::create_dir_all(root.join("a/.v5.tmp")).unwrap();
        std::fs::create_dir_all(root.join("a/v9")).unwrap();
        assert_eq!(store.names(), vec!["a"]);
        let loaded = store.load("a", &config, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.version, 3);
        assert_eq!(store.current("a"), Some(3));
        let names: Vec<String> = std::fs::read_dir(root.join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("quarantine-v4-")),
            "{names:?}"
        );
        assert!(
            !names.iter().any(|n| n == ".v5.tmp" || n == "v9"),
            "{names:?}"
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_name_with_no_loadable_version_fails_to_load_but_stays() {
        let config = tiny_model();
        let root = scratch("unloadable");
        let store = LocalDirStore::new(root.clone(), "tiny", 3).unwrap();
        store.publish(&seeded_adapter("a", 1), 1, None).unwrap();
        std::fs::write(root.join("a/v1/adapter_config.json"), b"{").unwrap();
        assert!(store.load("a", &config, DType::F32, &Device::Cpu).is_err());
        assert!(store.exists("a"));
        assert!(
            store.bytes("a") > 0,
            "the unloadable version is kept, quarantined"
        );
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_folder_of_the_flat_layout_becomes_its_version() {
        let config = tiny_model();
        let root = scratch("flat");
        let a = seeded_adapter("a", 7);
        a.write_files(
            &root.join("a"),
            None,
            &[(META_FILE, r#"{"name":"a","version":5}"#.into())],
        )
        .unwrap();
        let store = LocalDirStore::new(root.clone(), "tiny", 3).unwrap();
        let loaded = store.load("a", &config, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.version, 5);
        assert_eq!(store.current("a"), Some(5));
        let _ = std::fs::remove_dir_all(root);
    }
}
