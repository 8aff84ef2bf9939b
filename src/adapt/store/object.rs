//! Adapters in object storage (S3 or anything `object_store` speaks), shared by replicas.
//!
//! Under `<prefix>/<key>/`: one folder per version attempt, `v<N>-<uuid>/` (PEFT files plus
//! `ttrl_adapter.json`), never rewritten; and `CURRENT`, a small JSON naming the current
//! version and the kept ones, newest first. Publishing uploads a new folder, then replaces
//! `CURRENT` with a conditional put (`If-Match` on the ETag read, or `If-None-Match: *` for
//! the first version): of two replicas racing from one version, the store lets exactly one
//! put through. The loser's folder is deleted; folders of crashed writers are deleted once
//! the pointer has passed their version.
//!
//! `object_store` is async; the engine thread that owns the registry is not, so the store
//! keeps a one-thread runtime of its own and blocks on it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::{
    adapter_error, valid_key, AdapterFiles, AdapterStore, Meta, Publish, StoredAdapter, META_FILE,
};
use crate::error::{Error, Result};
use crate::model::lora::PEFT_FILES;
use crate::model::{Adapter, ModelConfig};
use crate::telemetry as m;

const CURRENT: &str = "CURRENT";

/// The pointer object: kept versions, newest (current) first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Pointer {
    versions: Vec<Kept>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Kept {
    version: u64,
    /// The version's folder under the adapter's prefix.
    folder: String,
}

impl Pointer {
    fn current(&self) -> Option<u64> {
        self.versions.first().map(|k| k.version)
    }
}

pub struct ObjectAdapterStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    base_model: String,
    keep_versions: usize,
    runtime: tokio::runtime::Runtime,
}

fn store_error(e: impl std::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("object store: {e}")))
}

impl ObjectAdapterStore {
    /// Any `object_store` backend; `prefix` is the folder adapters live under.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        base_model: &str,
        keep_versions: usize,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            store,
            prefix: ObjectPath::from(prefix),
            base_model: base_model.into(),
            keep_versions: keep_versions.max(1),
            runtime,
        })
    }

    /// `s3://bucket/prefix`, with endpoint, region and credentials from the `AWS_*`
    /// environment variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP` for an S3-compatible server).
    pub fn s3(url: &str, base_model: &str, keep_versions: usize) -> Result<Self> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(store_error)?;
        Self::new(Arc::new(store), prefix, base_model, keep_versions)
    }

    fn block<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    fn path(&self, key: &str, rest: &str) -> ObjectPath {
        let mut path = self.prefix.clone();
        for part in [key, rest] {
            for segment in part.split('/').filter(|s| !s.is_empty()) {
                path = path.join(segment);
            }
        }
        path
    }

    /// The pointer and the ETag/version a conditional put must match; `None` when nothing
    /// is stored under the key.
    fn pointer(&self, key: &str) -> Result<Option<(Pointer, UpdateVersion)>> {
        self.block(async {
            match self.store.get(&self.path(key, CURRENT)).await {
                Ok(got) => {
                    let version = UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    let bytes = got.bytes().await.map_err(store_error)?;
                    let pointer = serde_json::from_slice(&bytes)
                        .map_err(|e| adapter_error(key, format!("unreadable {CURRENT}: {e}")))?;
                    Ok(Some((pointer, version)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(store_error(e)),
            }
        })
    }

    /// Every object under the key (or under one of its folders), with sizes.
    fn list(&self, key: &str, folder: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let prefix = self.path(key, folder);
        self.block(self.store.list(Some(&prefix)).try_collect())
            .map_err(store_error)
    }

    fn delete_folder(&self, key: &str, folder: &str) {
        let Ok(objects) = self.list(key, folder) else {
            return;
        };
        for object in objects {
            if let Err(e) = self.block(self.store.delete(&object.location)) {
                tracing::warn!("deleting {}: {e}", object.location);
            }
        }
    }

    fn upload(&self, adapter: &Adapter, version: u64, folder: &str) -> Result<()> {
        let name = adapter.name();
        let staging = staging_dir();
        let meta = Meta::json(name, version)?;
        let written = adapter
            .write_files(&staging, Some(&self.base_model), &[(META_FILE, meta)])
            .and_then(|()| {
                for file in PEFT_FILES.iter().chain([&META_FILE]) {
                    let bytes = std::fs::read(staging.join(file))?;
                    let path = self.path(name, &format!("{folder}/{file}"));
                    self.block(self.store.put(&path, PutPayload::from(bytes)))
                        .map_err(store_error)?;
                }
                Ok(())
            });
        let _ = std::fs::remove_dir_all(&staging);
        written
    }

    /// One file of a kept version.
    fn read(&self, key: &str, kept: &Kept, file: &str) -> Result<Vec<u8>> {
        let path = self.path(key, &format!("{}/{file}", kept.folder));
        self.block(async { self.store.get(&path).await?.bytes().await })
            .map(Vec::from)
            .map_err(store_error)
    }

    fn read_folder(
        &self,
        key: &str,
        kept: &Kept,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Adapter> {
        let staging = staging_dir();
        let loaded = (|| {
            std::fs::create_dir_all(&staging)?;
            for file in PEFT_FILES.iter().chain([&META_FILE]) {
                std::fs::write(staging.join(file), self.read(key, kept, file)?)?;
            }
            let meta: Meta = serde_json::from_slice(&std::fs::read(staging.join(META_FILE))?)
                .map_err(|e| adapter_error(key, format!("unreadable {META_FILE}: {e}")))?;
            if meta.version != kept.version {
                return Err(adapter_error(
                    key,
                    format!("v{} says it is version {}", kept.version, meta.version),
                ));
            }
            Adapter::load(key, &staging, model, dtype, device)
        })();
        let _ = std::fs::remove_dir_all(&staging);
        loaded
    }

    /// Deletes folders the pointer no longer keeps: older kept ones, losers' and crashed
    /// writers' attempts at versions the pointer has reached. A writer still uploading
    /// works on a version above the pointer, so its folder is left alone.
    fn prune(&self, key: &str, pointer: &Pointer) {
        let current = pointer.current().unwrap_or(0);
        let Ok(objects) = self.list(key, "") else {
            return;
        };
        let mut folders: Vec<String> = objects
            .iter()
            .filter_map(|o| {
                let rest = o
                    .location
                    .as_ref()
                    .strip_prefix(self.path(key, "").as_ref())?;
                Some(rest.trim_start_matches('/').split('/').next()?.to_string())
            })
            .filter(|f| f.starts_with('v'))
            .collect();
        folders.sort();
        folders.dedup();
        for folder in folders {
            let version: Option<u64> = folder[1..].split('-').next().and_then(|v| v.parse().ok());
            let kept = pointer.versions.iter().any(|k| k.folder == folder);
            if !kept && version.is_some_and(|v| v <= current) {
                self.delete_folder(key, &folder);
            }
        }
    }
}

/// A private local folder to pass files through (the PEFT reader and writer work on files).
fn staging_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "ttrl-object-store-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ))
}

impl AdapterStore for ObjectAdapterStore {
    fn publish(&self, adapter: &Adapter, version: u64, expected: Option<u64>) -> Result<Publish> {
        let name = adapter.name();
        if !valid_key(name) {
            return Err(adapter_error(name, "invalid adapter name"));
        }
        let found = self.pointer(name)?;
        let current = found.as_ref().and_then(|(p, _)| p.current());
        if current != expected {
            return Ok(Publish::Lost { current });
        }
        if expected.is_some_and(|e| version <= e) {
            return Err(adapter_error(
                name,
                format!("version {version} is not newer than the current {current:?}"),
            ));
        }
        let folder = format!("v{version}-{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = self.upload(adapter, version, &folder) {
            self.delete_folder(name, &folder);
            return Err(e);
        }
        let (mut pointer, mode) = match found {
            Some((pointer, at)) => (pointer, PutMode::Update(at)),
            None => (Pointer::default(), PutMode::Create),
        };
        pointer.versions.insert(
            0,
            Kept {
                version,
                folder: folder.clone(),
            },
        );
        pointer.versions.truncate(self.keep_versions);
        let body = serde_json::to_vec(&pointer).map_err(|e| adapter_error(name, e))?;
        let put = self.block(self.store.put_opts(
            &self.path(name, CURRENT),
            PutPayload::from(body),
            PutOptions::from(mode),
        ));
        match put {
            Ok(_) => {
                self.prune(name, &pointer);
                Ok(Publish::Published)
            }
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => {
                self.delete_folder(name, &folder);
                Ok(Publish::Lost {
                    current: self.current(name)?,
                })
            }
            Err(e) => {
                self.delete_folder(name, &folder);
                Err(store_error(e))
            }
        }
    }

    fn current(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.pointer(name)?.and_then(|(p, _)| p.current()))
    }

    fn names(&self) -> Vec<String> {
        let listed = self.block(self.store.list_with_delimiter(Some(&self.prefix)));
        let mut names: Vec<String> = match listed {
            Ok(list) => list
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(String::from))
                .filter(|n| valid_key(n))
                .collect(),
            Err(e) => {
                tracing::error!("listing adapters in the object store: {e}");
                Vec::new()
            }
        };
        names.sort();
        names
    }

    /// The newest kept version that loads; one that does not is logged and counted, and
    /// left in place (other replicas may be reading it) while the one before it serves.
    fn load(
        &self,
        name: &str,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<StoredAdapter> {
        let (pointer, _) = self
            .pointer(name)?
            .ok_or_else(|| adapter_error(name, "no stored version"))?;
        let mut last_error = "no stored version".to_string();
        for kept in &pointer.versions {
            match self.read_folder(name, kept, model, dtype, device) {
                Ok(adapter) => {
                    return Ok(StoredAdapter {
                        name: name.into(),
                        adapter,
                        version: kept.version,
                    })
                }
                Err(e) => {
                    last_error = e.to_string();
                    tracing::error!("adapter `{name}` v{} does not load: {e}", kept.version);
                    metrics::counter!(m::ADAPTERS_QUARANTINED).increment(1);
                }
            }
        }
        Err(adapter_error(name, last_error))
    }

    fn load_version(
        &self,
        name: &str,
        version: u64,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Adapter> {
        let pointer = self.pointer(name)?.map(|(p, _)| p).unwrap_or_default();
        let kept = pointer
            .versions
            .iter()
            .find(|k| k.version == version)
            .ok_or_else(|| adapter_error(name, format!("no stored version {version}")))?;
        self.read_folder(name, kept, model, dtype, device)
    }

    fn exists(&self, name: &str) -> bool {
        valid_key(name) && matches!(self.pointer(name), Ok(Some(_)))
    }

    fn bytes(&self, name: &str) -> u64 {
        if !valid_key(name) {
            return 0;
        }
        self.list(name, "")
            .map(|objects| objects.iter().map(|o| o.size).sum())
            .unwrap_or(0)
    }

    fn export(&self, name: &str) -> Result<AdapterFiles> {
        let (pointer, _) = self
            .pointer(name)?
            .ok_or_else(|| adapter_error(name, "nothing stored"))?;
        let kept = pointer
            .versions
            .first()
            .ok_or_else(|| adapter_error(name, "nothing stored"))?;
        let files = PEFT_FILES
            .iter()
            .map(|file| Ok((file.to_string(), self.read(name, kept, file)?)))
            .collect::<Result<_>>()?;
        Ok(AdapterFiles {
            version: kept.version,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::store::conformance;

    #[test]
    fn object_storage_keeps_the_store_contract() {
        let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        conformance::run(&|| {
            Box::new(ObjectAdapterStore::new(memory.clone(), "adapters", "tiny", 3).unwrap())
        });
    }
}
