//! The adapters the engine serves and trains. A named adapter is at rest (its learner:
//! weights, optimizer, version), out with the trainer (serving keeps answering with a copy
//! of the weights it had when the episode started), or only on disk: the least recently used
//! ones leave memory when more than `max_resident` are in it, and load again on use.
//! Caps bound how many exist, per tenant and in all, and the disk a tenant's take.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::job::EngineError;
use crate::adapt::store::{owner, AdapterFiles, AdapterStore, Publish};
use crate::adapt::{AdaptConfig, Learner};
use crate::model::lora::lora_dtype;
use crate::model::{Adapter, LoraConfig, Model};
use crate::telemetry as m;

#[derive(Debug, Clone, PartialEq)]
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
    /// Saved and dropped from memory; loaded again when a request uses it. Its optimizer
    /// moments are not kept: they start again from zero.
    OnDisk {
        version: u64,
    },
}

/// Bounds on named adapters. A tenant is the owner of an API key; on a server without keys,
/// every adapter belongs to one anonymous tenant.
#[derive(Debug, Clone)]
pub struct AdapterCaps {
    /// Named adapters in all, in memory or on disk.
    pub max_adapters: usize,
    pub max_adapters_per_tenant: usize,
    /// Named adapters kept in memory. Only adapters that running requests use, plus the one
    /// in training, can take it over.
    pub max_resident: usize,
    /// Disk a tenant's adapters may take, all kept versions counted, and the next version
    /// while it is written.
    pub max_disk_bytes_per_tenant: u64,
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
    /// Another replica published a version first: this one's update is dropped and the
    /// winner's version, loaded from the store, serves.
    Lost {
        current: u64,
    },
}

pub struct Registry {
    slots: HashMap<String, Slot>,
    /// Names stored on disk that did not load at start: never replaced by a fresh adapter.
    unloadable: HashMap<String, String>,
    store: Option<Box<dyn AdapterStore>>,
    defaults: AdaptConfig,
    model_label: String,
    caps: AdapterCaps,
    /// When each named adapter was last used, on `clock`: the least recent leaves memory first.
    last_used: HashMap<String, u64>,
    clock: u64,
    /// The store's current version of each adapter as last read or written here: what a
    /// publish expects to replace. A fresh adapter not yet published has none.
    stored: HashMap<String, u64>,
    /// When each adapter's pointer was last read; serving reads it again after `refresh`.
    checked: HashMap<String, Instant>,
    refresh: Duration,
}

impl Registry {
    /// Loads the stored adapters one by one, keeping the first `max_resident` in memory and
    /// the rest on disk; one that fails to load is logged and marked unloadable.
    pub fn load(
        model: &Model,
        model_label: String,
        store: Option<Box<dyn AdapterStore>>,
        defaults: AdaptConfig,
        caps: AdapterCaps,
        refresh: Duration,
    ) -> Self {
        let mut registry = Self {
            slots: HashMap::new(),
            unloadable: HashMap::new(),
            store,
            defaults,
            model_label,
            caps,
            last_used: HashMap::new(),
            clock: 0,
            stored: HashMap::new(),
            checked: HashMap::new(),
            refresh,
        };
        let names = registry
            .store
            .as_ref()
            .map(|s| s.names())
            .unwrap_or_default();
        for name in names {
            let store = registry.store.as_ref().expect("names came from the store");
            let stored = store.load(
                &name,
                model.config(),
                lora_dtype(model.dtype()),
                model.device(),
            );
            if let Ok(s) = &stored {
                registry.stored.insert(name.clone(), s.version);
            }
            let slot = match stored {
                Ok(s) if registry.resident() < registry.caps.max_resident => {
                    Learner::new(s.adapter, &registry.defaults, s.version).map(Slot::AtRest)
                }
                Ok(s) => Ok(Slot::OnDisk { version: s.version }),
                Err(e) => Err(e),
            };
            match slot {
                Ok(slot) => {
                    tracing::info!(
                        "loaded adapter `{name}` version {}",
                        registry.version_in(&slot)
                    );
                    registry.slots.insert(name, slot);
                }
                Err(e) => {
                    tracing::error!("adapter `{name}` cannot be served: {e}");
                    registry.unloadable.insert(name, e.to_string());
                }
            }
        }
        for info in registry.list() {
            registry.publish_version(&info.name, info.version);
        }
        registry.publish_counts();
        registry
    }

    pub fn contains(&self, key: &str) -> bool {
        self.slots.contains_key(key)
    }

    pub fn is_training(&self, key: &str) -> bool {
        matches!(self.slots.get(key), Some(Slot::Training { .. }))
    }

    /// The weights requests with this adapter decode with, if it is in memory.
    pub fn serving(&self, key: &str) -> Option<&Adapter> {
        self.slots.get(key).and_then(|slot| match slot {
            Slot::AtRest(l) => Some(&l.adapter),
            Slot::Training { serving, .. } => Some(serving),
            Slot::OnDisk { .. } => None,
        })
    }

    pub fn version_of(&self, key: &str) -> Option<u64> {
        self.slots.get(key).map(|slot| self.version_in(slot))
    }

    fn version_in(&self, slot: &Slot) -> u64 {
        match slot {
            Slot::AtRest(l) => l.version,
            Slot::Training { version, .. } | Slot::OnDisk { version } => *version,
        }
    }

    /// Marks a named adapter used now and loads it if it was on disk, or if the store holds
    /// a newer version (another replica published one), first dropping the least recently
    /// used resident ones that no request in `in_use` needs.
    pub fn make_resident(
        &mut self,
        key: &str,
        model: &Model,
        in_use: &[&str],
    ) -> Result<(), EngineError> {
        self.make_current(key, model, in_use, false)
    }

    /// As [`Self::make_resident`]; `force` reads the store's pointer whatever its age.
    fn make_current(
        &mut self,
        key: &str,
        model: &Model,
        in_use: &[&str],
        force: bool,
    ) -> Result<(), EngineError> {
        if is_ephemeral(key) {
            return Ok(());
        }
        let newer = self.newer_in_store(key, force);
        if newer.is_none() && !self.slots.contains_key(key) {
            return Ok(()); // unknown here and in the store: the caller decides
        }
        self.touch(key);
        let version = match (self.slots.get(key), newer) {
            (Some(Slot::Training { .. }), _) | (Some(Slot::AtRest(_)), None) | (None, None) => {
                return Ok(())
            }
            (_, Some(version)) => version,
            (Some(Slot::OnDisk { version }), None) => *version,
        };
        let adapter = match self.load_stored(key, version, model) {
            Ok(adapter) => adapter,
            Err(e) if newer.is_some() && matches!(self.slots.get(key), Some(Slot::AtRest(_))) => {
                tracing::error!(
                    "adapter `{key}`: version {version} in the store does not load ({e}); \
                     the version here goes on serving"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if newer.is_some() {
            tracing::info!("adapter `{key}`: the store holds version {version}; loaded it");
            self.publish_version(key, version);
        }
        if !matches!(self.slots.get(key), Some(Slot::AtRest(_))) {
            self.make_room(key, in_use);
        }
        let learner = Learner::new(adapter, &self.defaults, version)?;
        self.slots.insert(key.to_string(), Slot::AtRest(learner));
        self.stored.insert(key.to_string(), version);
        self.publish_counts();
        Ok(())
    }

    /// Marks `key` used now, for the least-recently-used order.
    fn touch(&mut self, key: &str) {
        self.clock += 1;
        self.last_used.insert(key.to_string(), self.clock);
    }

    /// The store's current version of `key` when it is newer than the one here (or `key`
    /// is not here at all); the pointer is read at most once per `refresh` unless forced.
    /// A store that cannot be read leaves the version here serving.
    fn newer_in_store(&mut self, key: &str, force: bool) -> Option<u64> {
        let store = self.store.as_ref()?;
        if self.unloadable.contains_key(key) {
            return None; // refused until an operator resets or imports it
        }
        let fresh = self
            .checked
            .get(key)
            .is_some_and(|t| t.elapsed() < self.refresh);
        let known = self.slots.contains_key(key);
        if fresh && !force && known {
            return None;
        }
        let current = store.current(key);
        if known || matches!(current, Ok(Some(_))) {
            // Only names that exist are remembered: unknown ones cost no memory.
            self.checked.insert(key.to_string(), Instant::now());
        }
        match current {
            Ok(Some(current)) if self.version_of(key).is_none_or(|v| current > v) => Some(current),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("adapter `{key}`: reading the store's version: {e}");
                None
            }
        }
    }

    /// One stored version of `key`, built for the served model.
    fn load_stored(&self, key: &str, version: u64, model: &Model) -> Result<Adapter, EngineError> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("no adapter store is configured".into()))?;
        Ok(store.load_version(
            key,
            version,
            model.config(),
            lora_dtype(model.dtype()),
            model.device(),
        )?)
    }

    /// Named adapters in memory.
    fn resident(&self) -> usize {
        self.slots
            .iter()
            .filter(|(k, s)| !is_ephemeral(k) && !matches!(s, Slot::OnDisk { .. }))
            .count()
    }

    /// Saves and drops least recently used resident adapters until one more fits under
    /// `max_resident`, sparing `key` and those in `in_use`. Without a store nothing can
    /// leave memory; an adapter that cannot be saved stays (memory over a lost adapter).
    fn make_room(&mut self, key: &str, in_use: &[&str]) {
        let Some(store) = &self.store else {
            return;
        };
        let mut candidates: Vec<(u64, String)> = self
            .slots
            .iter()
            .filter(|(k, s)| {
                matches!(s, Slot::AtRest(_))
                    && !is_ephemeral(k)
                    && k.as_str() != key
                    && !in_use.contains(&k.as_str())
            })
            .map(|(k, _)| (self.last_used.get(k).copied().unwrap_or(0), k.clone()))
            .collect();
        candidates.sort();
        let mut candidates = candidates.into_iter();
        while self.resident() >= self.caps.max_resident {
            let Some((_, victim)) = candidates.next() else {
                return;
            };
            let Some(Slot::AtRest(learner)) = self.slots.get(&victim) else {
                continue;
            };
            let version = learner.version;
            match persist(&**store, &learner.adapter, version) {
                Ok(()) => {
                    tracing::debug!("adapter `{victim}` v{version} leaves memory");
                    self.slots.insert(victim, Slot::OnDisk { version });
                    self.publish_counts();
                }
                Err(e) => tracing::error!("adapter `{victim}` stays in memory: saving: {e}"),
            }
        }
    }

    /// The named adapters `tenant` owns, loaded or not.
    fn owned_by<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.slots
            .keys()
            .chain(self.unloadable.keys())
            .filter(move |k| !is_ephemeral(k) && owner(k) == tenant)
    }

    /// Refuses a new named adapter over `max_adapters` or `max_adapters_per_tenant`.
    fn check_count(&self, key: &str) -> Result<(), EngineError> {
        let total = self.slots.keys().filter(|k| !is_ephemeral(k)).count() + self.unloadable.len();
        if total >= self.caps.max_adapters {
            return Err(EngineError::CapReached {
                cap: "max_adapters",
                message: format!(
                    "The server holds its limit of {} named adapters (engine.max_adapters); \
                     `{key}` cannot be created.",
                    self.caps.max_adapters
                ),
            });
        }
        let owned = self.owned_by(owner(key)).count();
        if owned >= self.caps.max_adapters_per_tenant {
            return Err(EngineError::CapReached {
                cap: "max_adapters_per_tenant",
                message: format!(
                    "This tenant has its limit of {} named adapters \
                     (engine.max_adapters_per_tenant); train an existing one instead.",
                    self.caps.max_adapters_per_tenant
                ),
            });
        }
        Ok(())
    }

    /// Refuses to write a version of `key` (`bytes` of weights) that would take its tenant's
    /// adapters over `max_disk_bytes_per_tenant` while it is written.
    fn check_disk(&self, key: &str, bytes: u64) -> Result<(), EngineError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        // `key` itself may be out of the slots (checked out) or not yet in them.
        let others: u64 = self
            .owned_by(owner(key))
            .filter(|k| k.as_str() != key)
            .map(|k| store.bytes(k))
            .sum();
        let used = others + store.bytes(key);
        let cap = self.caps.max_disk_bytes_per_tenant;
        if used + bytes > cap {
            return Err(EngineError::CapReached {
                cap: "max_adapter_disk_bytes_per_tenant",
                message: format!(
                    "This tenant's adapters take {used} bytes on disk; another version of \
                     `{key}` ({bytes} bytes) would pass the limit of {cap} \
                     (engine.max_adapter_disk_bytes_per_tenant)."
                ),
            });
        }
        Ok(())
    }

    /// Hands the learner to the trainer, creating a fresh one (version 0) if the name is new.
    /// A named adapter keeps serving a copy of its weights meanwhile; an ephemeral one is
    /// used by nobody until it comes back. A named adapter's new version must fit the caps.
    pub fn check_out(
        &mut self,
        key: &str,
        config: &AdaptConfig,
        model: &Model,
        seed: u64,
        in_use: &[&str],
    ) -> Result<Learner, EngineError> {
        if !is_ephemeral(key) {
            // Train on the store's newest version: another replica may have published one.
            self.make_current(key, model, in_use, true)?;
            self.touch(key);
        }
        let existed = self.slots.contains_key(key);
        if !is_ephemeral(key) && !existed && !self.unloadable.contains_key(key) {
            self.check_count(key)?;
            self.make_room(key, in_use);
        }
        let learner = match self.slots.remove(key) {
            Some(Slot::AtRest(l)) => l,
            Some(other) => {
                self.slots.insert(key.to_string(), other);
                return Err(EngineError::Invalid(format!(
                    "adapter `{key}` is already training"
                )));
            }
            None => {
                if let Some(why) = self.unloadable.get(key) {
                    return Err(EngineError::Invalid(format!(
                        "adapter `{key}` is stored on disk but does not load ({why}); it is \
                         not replaced by a fresh adapter: reset or import it through the \
                         admin API"
                    )));
                }
                Learner::new(fresh(key, config.lora.clone(), model, seed)?, config, 0)?
            }
        };
        if !is_ephemeral(key) {
            if let Err(e) = self.check_disk(key, learner.adapter.bytes()) {
                if existed {
                    self.slots.insert(key.to_string(), Slot::AtRest(learner));
                }
                return Err(e);
            }
            let serving = learner.adapter.deep_copy()?;
            let version = learner.version;
            self.slots
                .insert(key.to_string(), Slot::Training { serving, version });
            self.publish_counts();
        }
        Ok(learner)
    }

    /// Takes the learner back from the trainer. A named adapter whose episode changed it is
    /// saved before anyone is told its new version.
    pub fn check_in(
        &mut self,
        key: &str,
        learner: Learner,
        changed: bool,
        model: &Model,
    ) -> CheckIn {
        if is_ephemeral(key) {
            self.slots.insert(key.to_string(), Slot::AtRest(learner));
            return CheckIn::Kept;
        }
        if !self.is_training(key) {
            return CheckIn::Replaced;
        }
        if changed {
            if let Some(store) = &self.store {
                let expected = self.stored.get(key).copied();
                match store.publish(&learner.adapter, learner.version, expected) {
                    Ok(Publish::Published) => {
                        self.stored.insert(key.to_string(), learner.version);
                    }
                    Ok(Publish::Lost { current }) => {
                        tracing::info!(
                            "adapter `{key}`: another replica published version {current:?} \
                             first; this update is dropped"
                        );
                        return self.take_winner(key, current, model);
                    }
                    Err(e) => {
                        tracing::error!("saving adapter `{key}`: {e}");
                        self.recover(key);
                        return CheckIn::NotSaved(e.to_string());
                    }
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

    /// After a lost publish: the store's current version replaces the one that trained.
    fn take_winner(&mut self, key: &str, current: Option<u64>, model: &Model) -> CheckIn {
        let store = self
            .store
            .as_ref()
            .expect("a publish was lost to the store");
        let winner = store.load(
            key,
            model.config(),
            lora_dtype(model.dtype()),
            model.device(),
        );
        match winner {
            Ok(stored) => match Learner::new(stored.adapter, &self.defaults, stored.version) {
                Ok(learner) => {
                    self.stored.insert(key.to_string(), stored.version);
                    self.publish_version(key, stored.version);
                    self.slots.insert(key.to_string(), Slot::AtRest(learner));
                    CheckIn::Lost {
                        current: stored.version,
                    }
                }
                Err(e) => {
                    self.recover(key);
                    CheckIn::NotSaved(e.to_string())
                }
            },
            Err(e) => {
                self.recover(key);
                CheckIn::NotSaved(format!(
                    "another replica published version {current:?}, which does not load here: {e}"
                ))
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
    /// training. `in_use`: the adapters running requests decode with, which stay in memory.
    pub fn reset(
        &mut self,
        name: &str,
        model: &Model,
        in_use: &[&str],
    ) -> Result<AdapterInfo, EngineError> {
        let adapter = fresh(name, self.defaults.lora.clone(), model, 0)?;
        self.install(adapter, in_use)
    }

    /// PEFT files from `dir` as the named adapter's next version, saved.
    pub fn import(
        &mut self,
        name: &str,
        dir: &std::path::Path,
        model: &Model,
        in_use: &[&str],
    ) -> Result<AdapterInfo, EngineError> {
        let adapter = Adapter::load(
            name,
            dir,
            model.config(),
            lora_dtype(model.dtype()),
            model.device(),
        )?;
        self.install(adapter, in_use)
    }

    /// Saves the adapter (the weights being served) unless the store holds it or a newer
    /// version, and returns the store's current version's PEFT files.
    pub fn export(&self, name: &str) -> Result<AdapterFiles, EngineError> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| EngineError::Invalid("no adapter store is configured".into()))?;
        match self.slots.get(name) {
            Some(Slot::AtRest(l)) => persist(&**store, &l.adapter, l.version)?,
            Some(Slot::Training { serving, version }) => persist(&**store, serving, *version)?,
            Some(Slot::OnDisk { .. }) => {} // saved when it left memory
            None => return Err(EngineError::AdapterNotFound(name.into())),
        }
        Ok(store.export(name)?)
    }

    /// A stored version's weights, published as the adapter's next version.
    pub fn rollback(
        &mut self,
        name: &str,
        version: u64,
        model: &Model,
        in_use: &[&str],
    ) -> Result<AdapterInfo, EngineError> {
        if !self.store.as_ref().is_some_and(|s| s.exists(name)) {
            return Err(EngineError::AdapterNotFound(name.into()));
        }
        let adapter = self.load_stored(name, version, model)?;
        self.install(adapter, in_use)
    }

    /// Versions only grow, so no client ever sees an older number for newer weights. The
    /// caps hold here too.
    fn install(&mut self, adapter: Adapter, in_use: &[&str]) -> Result<AdapterInfo, EngineError> {
        let name = adapter.name().to_string();
        let mut version = self.version_of(&name).map_or(0, |v| v + 1);
        if !self.slots.contains_key(&name) && !self.unloadable.contains_key(&name) {
            self.check_count(&name)?;
        }
        self.check_disk(&name, adapter.bytes())?;
        if !matches!(self.slots.get(&name), Some(Slot::AtRest(_))) {
            self.make_room(&name, in_use);
        }
        if let Some(store) = &self.store {
            // Next after whatever the store holds; a replica that publishes between the
            // read and the swap makes us read again.
            loop {
                let current = store.current(&name)?;
                version = version.max(current.map_or(0, |v| v + 1));
                match store.publish(&adapter, version, current)? {
                    Publish::Published => break,
                    Publish::Lost { .. } => continue,
                }
            }
            self.stored.insert(name.clone(), version);
        }
        let learner = Learner::new(adapter, &self.defaults, version)?;
        self.slots.insert(name.clone(), Slot::AtRest(learner));
        self.unloadable.remove(&name);
        self.publish_version(&name, version);
        self.publish_counts();
        Ok(AdapterInfo { name, version })
    }

    fn publish_counts(&self) {
        let resident = self.resident();
        let named = self.slots.keys().filter(|k| !is_ephemeral(k)).count();
        metrics::gauge!(m::ADAPTERS, "state" => "resident").set(resident as f64);
        metrics::gauge!(m::ADAPTERS, "state" => "stored").set((named - resident) as f64);
    }

    fn publish_version(&self, name: &str, version: u64) {
        if !is_ephemeral(name) {
            metrics::gauge!(m::ADAPTER_VERSION, "model" => self.model_label.clone(), "adapter" => metric_label(name))
                .set(version as f64);
        }
    }
}

/// Makes sure the store holds `version` of the adapter or a newer one (another replica's),
/// so the copy here may leave memory.
fn persist(store: &dyn AdapterStore, adapter: &Adapter, version: u64) -> crate::Result<()> {
    let current = store.current(adapter.name())?;
    if current.is_none_or(|c| c < version) {
        // Lost: a newer version was published meanwhile, which is as good.
        store.publish(adapter, version, current)?;
    }
    Ok(())
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
