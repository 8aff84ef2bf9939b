//! What every handler shares: the state set once the model is loaded, the shutdown flag, the
//! metrics handles and the keys.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;

use super::auth::ApiKeys;
use super::error::ApiError;
use super::validation::Limits;
use super::{generate, info};
use crate::adapt::AdaptConfig;
use crate::engine::Engine;
use crate::model::TextTokenizer;

/// Everything a handler needs once the model is loaded.
pub struct Ready {
    pub engine: Engine,
    pub tokenizer: Arc<TextTokenizer>,
    pub model_name: String,
    pub max_model_len: usize,
    /// Positions the KV-cache budget holds (`engine.kv_cache_bytes`), if there is one.
    pub kv_cache_positions: Option<usize>,
    pub adapt_defaults: AdaptConfig,
    /// The most an imported adapter (zipped, and each file unzipped) may weigh.
    pub import_limit_bytes: usize,
}

impl Ready {
    pub fn limits(&self) -> Limits<'_> {
        Limits {
            model_name: &self.model_name,
            max_model_len: self.max_model_len,
            kv_cache_positions: self.kv_cache_positions,
            tokenizer: &self.tokenizer,
            adapt_defaults: &self.adapt_defaults,
        }
    }
}

/// Shared state: cheap to clone. `ready` is set once the weights are loaded.
#[derive(Clone)]
pub struct AppState {
    ready: Arc<OnceLock<Arc<Ready>>>,
    shutting_down: Arc<AtomicBool>,
    pub(super) prometheus: PrometheusHandle,
    pub(super) process_metrics: Arc<metrics_process::Collector>,
    pub(super) started: u64,
    pub(super) admin_key: Option<Arc<str>>,
    /// Keys for `/v1/*`; `None`: the server is open.
    pub(super) api_keys: Option<Arc<ApiKeys>>,
}

impl AppState {
    pub fn new(
        prometheus: PrometheusHandle,
        admin_key: Option<String>,
        api_keys: Option<ApiKeys>,
    ) -> Self {
        let process_metrics = metrics_process::Collector::new("process_");
        process_metrics.describe();
        Self {
            ready: Arc::new(OnceLock::new()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            prometheus,
            process_metrics: Arc::new(process_metrics),
            started: generate::unix_now(),
            admin_key: admin_key.map(Arc::from),
            api_keys: api_keys.map(Arc::new),
        }
    }

    /// Marks the model loaded; /ready turns 200.
    pub fn set_ready(&self, ready: Ready) {
        let _ = self.ready.set(Arc::new(ready));
    }

    pub fn engine(&self) -> Option<Engine> {
        self.ready.get().map(|r| r.engine.clone())
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub(super) fn ready(&self) -> Result<Arc<Ready>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::Unavailable("The server is shutting down.".into()));
        }
        let ready = self
            .ready
            .get()
            .cloned()
            .ok_or_else(|| ApiError::Unavailable("The model is still loading.".into()))?;
        if !ready.engine.is_alive() {
            return Err(ApiError::Unavailable(info::ENGINE_DEAD.into()));
        }
        Ok(ready)
    }

    pub(super) fn model_label(&self) -> String {
        self.ready
            .get()
            .map(|r| r.model_name.clone())
            .unwrap_or_default()
    }
}
