//! The adapters the engine serves and trains. A named adapter is either at rest (its learner:
//! weights, optimizer, version) or out with the trainer, in which case serving keeps
//! answering with a copy of the weights it had when the episode started.

use std::collections::HashMap;

use super::job::EngineError;
use crate::adapt::store::AdapterStore;
use crate::adapt::{AdaptConfig, Learner};
use crate::model::lora::lora_dtype;
use crate::model::{Adapter, LoraConfig, Model};
use crate::telemetry as m;

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub version: u64,
}

enum Slot {
    AtRest(Learner),
    /// Out with the trainer: the weights (and version) requests use meanwhile.
    Training {
        serving: Adapter,
        version: u64,
    },
}

/// Ephemeral adapters live under names no request can spell.
pub const EPHEMERAL_PREFIX: &str = "~ephemeral-";

pub fn is_ephemeral(key: &str) -> bool {
    key.starts_with(EPHEMERAL_PREFIX)
}

/// What became of a learner handed back by the trainer.
pub enum CheckIn {
    Kept,
    /// The adapter was reset or replaced while it trained: the learner is dropped.
    Replaced,
    /// Its new version could not be saved: the adapter is back at the version before the
    /// episode (the last one any client was told of).
    NotSaved(String),
}

pub struct Registry {
    slots: HashMap<String, Slot>,
    /// Names stored on disk that did not load at start: never replaced by a fresh adapter.
    unloadable: HashMap<String, String>,
    store: Option<Box<dyn AdapterStore>>,
    defaults: AdaptConfig,
    model_label: String,
}

impl Registry {
    /// Loads every stored adapter; one that fails to load is logged and left out.
    pub fn load(
        model: &Model,
        model_label: String,
        store: Option<Box<dyn AdapterStore>>,
        defaults: AdaptConfig,
    ) -> Self {
        let mut slots = HashMap::new();
        let mut unloadable = HashMap::new();
        if let Some(store) = &store {
            match store.load_all(model.config(), lora_dtype(model.dtype()), model.device()) {
                Ok(loaded) => {
                    unloadable.extend(loaded.unloadable);
                    for s in loaded.adapters {
                        tracing::info!("loaded adapter `{}` version {}", s.name, s.version);
                        match Learner::new(s.adapter, &defaults, s.version) {
                            Ok(l) => {
                                slots.insert(s.name, Slot::AtRest(l));
                            }
                            Err(e) => tracing::error!("adapter `{}`: {e}", s.name),
                        }
                    }
                }
                Err(e) => tracing::error!("loading adapters: {e}"),
            }
        }
        let registry = Self {
            slots,
            unloadable,
            store,
            defaults,
            model_label,
        };
        for info in registry.list() {
            registry.publish_version(&info.name, info.version);
        }
        registry
    }

    pub fn contains(&self, key: &str) -> bool {
        self.slots.contains_key(key)
    }

    pub fn is_training(&self, key: &str) -> bool {
        matches!(self.slots.get(key), Some(Slot::Training { .. }))
    }

    /// The weights requests with this adapter decode with.
    pub fn serving(&self, key: &str) -> Option<&Adapter> {
        self.slots.get(key).map(|slot| match slot {
            Slot::AtRest(l) => &l.adapter,
            Slot::Training { serving, .. } => serving,
        })
    }

    pub fn version_of(&self, key: &str) -> Option<u64> {
        self.slots.get(key).map(|slot| match slot {
            Slot::AtRest(l) => l.version,
            Slot::Training { version, .. } => *version,
        })
    }

    /// Hands the learner to the trainer, creating a fresh one (version 0) if the name is new.
    /// A named adapter keeps serving a copy of its weights meanwhile; an ephemeral one is
    /// used by nobody until it comes back.
    pub fn check_out(
        &mut self,
        key: &str,
        config: &AdaptConfig,
        model: &Model,
        seed: u64,
    ) -> crate::Result<Learner> {
        let learner = match self.slots.remove(key) {
            Some(Slot::AtRest(l)) => l,
            Some(training @ Slot::Training { .. }) => {
                self.slots.insert(key.to_string(), training);
                return Err(crate::Error::Adapter {
                    name: key.into(),
                    reason: "already training".into(),
                });
            }
            None => {
                if let Some(why) = self.unloadable.get(key) {
                    return Err(crate::Error::Adapter {
                        name: key.into(),
                        reason: format!(
                            "stored on disk but does not load ({why}); it is not replaced by a \
                             fresh adapter: reset or import it through the admin API"
                        ),
                    });
                }
                Learner::new(fresh(key, config.lora.clone(), model, seed)?, config, 0)?
            }
        };
        if !is_ephemeral(key) {
            let serving = learner.adapter.deep_copy()?;
            let version = learner.version;
            self.slots
                .insert(key.to_string(), Slot::Training { serving, version });
        }
        Ok(learner)
    }

    /// Takes the learner back from the trainer. A named adapter whose episode changed it is
    /// saved before anyone is told its new version.
    pub fn check_in(&mut self, key: &str, learner: Learner, changed: bool) -> CheckIn {
        if is_ephemeral(key) {
            self.slots.insert(key.to_string(), Slot::AtRest(learner));
            return CheckIn::Kept;
        }
        if !self.is_training(key) {
            return CheckIn::Replaced;
        }
        if changed {
            if let Some(store) = &self.store {
                if let Err(e) = store.save(&learner.adapter, learner.version) {
                    tracing::error!("saving adapter `{key}`: {e}");
                    self.recover(key);
                    return CheckIn::NotSaved(e.to_string());
                }
            }
        }
        self.publish_version(key, learner.version);
        self.slots.insert(key.to_string(), Slot::AtRest(learner));
        CheckIn::Kept
    }

    /// Back to the serving copy (the version clients were last told), with fresh optimizer
    /// moments: the trainer lost the learner, or its new version could not be saved.
    pub fn recover(&mut self, key: &str) {
        if let Some(Slot::Training { serving, version }) = self.slots.remove(key) {
            match Learner::new(serving, &self.defaults, version) {
                Ok(l) => {
                    self.slots.insert(key.to_string(), Slot::AtRest(l));
                }
                Err(e) => tracing::error!("adapter `{key}` is lost: {e}"),
            }
        }
    }

    /// Drops ephemeral adapters no request uses any more.
    pub fn drop_unused_ephemeral(&mut self, in_use: &[&str]) {
        self.slots
            .retain(|k, _| !is_ephemeral(k) || in_use.contains(&k.as_str()));
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        let mut list: Vec<AdapterInfo> = self
            .slots
            .keys()
            .filter(|k| !is_ephemeral(k))
            .map(|k| AdapterInfo {
                name: k.clone(),
                version: self.version_of(k).unwrap_or_default(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// A fresh adapter under `name` as its next version, saved; replaces any, even one in
    /// training.
    pub fn reset(&mut self, name: &str, model: &Model) -> Result<AdapterInfo, EngineError> {
        let adapter = fresh(name, self.defaults.lora.clone(), model, 0)?;
        self.install(adapter)
    }

    /// PEFT files from `dir` as the named adapter's next version, saved.
    pub fn import(
        &mut self,
        name: &str,
        dir: &std::path::Path,
        model: &Model,
    ) -> Result<AdapterInfo, EngineError> {
        let adapter = Adapter::load(
            name,
            dir,
            model.config(),
            lora_dtype(model.dtype()),
            model.device(),
        )?;
        self.install(adapter)
    }

    /// Saves the adapter (the weights being served) and returns the folder of its PEFT files.
    pub fn export(&self, name: &str) -> Result<std::path::PathBuf, EngineError> {
        let (adapter, version) = match self.slots.get(name) {
            Some(Slot::AtRest(l)) => (&l.adapter, l.version),
            Some(Slot::Training { serving, version }) => (serving, *version),
            None => return Err(EngineError::AdapterNotFound(name.into())),
        };
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("no adapter store is configured".into()))?;
        store.save(adapter, version)?;
        Ok(store.path_of(name)?)
    }

    /// A stored version's weights, published as the adapter's next version.
    pub fn rollback(
        &mut self,
        name: &str,
        version: u64,
        model: &Model,
    ) -> Result<AdapterInfo, EngineError> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("no adapter store is configured".into()))?;
        if !store.exists(name) {
            return Err(EngineError::AdapterNotFound(name.into()));
        }
        let adapter = store.load_version(
            name,
            version,
            model.config(),
            lora_dtype(model.dtype()),
            model.device(),
        )?;
        self.install(adapter)
    }

    /// Versions only grow, so no client ever sees an older number for newer weights.
    fn install(&mut self, adapter: Adapter) -> Result<AdapterInfo, EngineError> {
        let name = adapter.name().to_string();
        let version = self.version_of(&name).map_or(0, |v| v + 1);
        if let Some(store) = &self.store {
            store.save(&adapter, version)?;
        }
        let learner = Learner::new(adapter, &self.defaults, version)?;
        self.slots.insert(name.clone(), Slot::AtRest(learner));
        self.unloadable.remove(&name);
        self.publish_version(&name, version);
        Ok(AdapterInfo { name, version })
    }

    fn publish_version(&self, name: &str, version: u64) {
        if !is_ephemeral(name) {
            metrics::gauge!(m::ADAPTER_VERSION, "model" => self.model_label.clone(), "adapter" => metric_label(name))
                .set(version as f64);
        }
    }
}

/// `/metrics` is open to scrapers: a tenant's adapter (`tenant@name`) is labelled by a short
/// hash of its key, so neither tenants nor their adapter names show; an open server's
/// adapters keep their names.
fn metric_label(key: &str) -> String {
    use sha2::{Digest, Sha256};
    if !key.contains('@') {
        return key.to_string();
    }
    let hex = format!("{:x}", Sha256::digest(key.as_bytes()));
    format!("sha256:{}", &hex[..12])
}

fn fresh(name: &str, lora: LoraConfig, model: &Model, seed: u64) -> crate::Result<Adapter> {
    Adapter::new(
        name,
        lora,
        model.config(),
        lora_dtype(model.dtype()),
        model.device(),
        seed,
    )
}
