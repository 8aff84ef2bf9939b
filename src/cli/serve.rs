//! `ttrl-serve serve`: settings resolved once (flags > file > defaults), the listener bound
//! first so /health answers while weights load, then the engine started.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use ttrl_serve::adapt::store;
use ttrl_serve::config::Settings;
use ttrl_serve::engine::{AdapterCaps, Engine, EngineConfig, Faults};
use ttrl_serve::model::lora::max_import_bytes;
use ttrl_serve::model::memory;
use ttrl_serve::server::auth::ApiKeys;
use ttrl_serve::server::{self, AppState, HttpLimits, Ready};
use ttrl_serve::telemetry;

use super::ModelArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML settings file (see configs/default.toml).
    #[arg(long, env = "TTRL_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, env = "TTRL_HOST")]
    host: Option<String>,
    #[arg(long, env = "TTRL_PORT")]
    port: Option<u16>,
    #[arg(long, env = "TTRL_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    #[arg(long, env = "TTRL_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    #[arg(long, env = "TTRL_MAX_BATCH")]
    max_batch: Option<usize>,
    #[arg(long, env = "TTRL_MAX_WAITING")]
    max_waiting: Option<usize>,
    /// KV-cache bytes running requests may reserve; default: a share of free GPU memory.
    #[arg(long, env = "TTRL_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<usize>,
    #[arg(long, env = "TTRL_SHUTDOWN_GRACE_SECONDS")]
    shutdown_grace_seconds: Option<u64>,
    /// Folder for named adapters.
    #[arg(long, env = "TTRL_DATA_DIR")]
    data_dir: Option<String>,
    /// Adapter store: `local` (the data folder) or `s3://bucket/prefix`, shared by replicas.
    #[arg(long, env = "TTRL_ADAPTER_STORE")]
    adapter_store: Option<String>,
    /// Bearer token that unlocks /admin/*.
    #[arg(long, env = "TTRL_ADMIN_API_KEY")]
    admin_api_key: Option<String>,
    /// A TOML file of API keys (tenant and rights each) that /v1/* then requires.
    #[arg(long, env = "TTRL_API_KEYS_FILE")]
    api_keys_file: Option<String>,
    /// Serve inference without API keys on a non-loopback address.
    #[arg(long, env = "TTRL_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
}

impl ServeArgs {
    pub fn settings(&self) -> Result<Settings> {
        let mut s = self.model.settings(self.config.as_deref())?;
        if let Some(v) = &self.served_model_name {
            s.model.served_model_name = Some(v.clone());
        }
        s.model.max_model_len = self.max_model_len.or(s.model.max_model_len);
        if let Some(v) = &self.host {
            s.server.host = v.clone();
        }
        s.server.port = self.port.unwrap_or(s.server.port);
        s.server.shutdown_grace_seconds = self
            .shutdown_grace_seconds
            .unwrap_or(s.server.shutdown_grace_seconds);
        s.engine.max_batch = self.max_batch.unwrap_or(s.engine.max_batch);
        s.engine.max_waiting = self.max_waiting.unwrap_or(s.engine.max_waiting);
        s.engine.kv_cache_bytes = self.kv_cache_bytes.or(s.engine.kv_cache_bytes);
        if let Some(v) = &self.data_dir {
            s.engine.data_dir = Some(v.clone());
        }
        if let Some(v) = &self.adapter_store {
            s.adapters.store = v.clone();
        }
        if let Some(v) = &self.admin_api_key {
            s.server.admin_api_key = Some(v.clone());
        }
        if let Some(v) = &self.api_keys_file {
            s.server.api_keys_file = Some(v.clone());
        }
        s.check()?;
        Ok(s)
    }
}

/// How long /health and /ready say 503 after the engine died, before the process exits.
const ENGINE_DEATH_EXIT_DELAY: Duration = Duration::from_secs(2);

pub fn run(args: ServeArgs) -> Result<()> {
    let settings = args.settings()?;
    if settings.server.api_keys_file.is_none() {
        let loopback = settings
            .server
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
            || settings.server.host == "localhost";
        if !loopback && !args.allow_unauthenticated {
            anyhow::bail!(
                "refusing to serve inference without API keys on {}: set server.api_keys_file \
                 (or --api-keys-file), or pass --allow-unauthenticated",
                settings.server.host
            );
        }
        tracing::info!(
            "no API keys: anyone who can reach {}:{} may infer, adapt and train named adapters",
            settings.server.host,
            settings.server.port
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> Result<()> {
    let addr = format!("{}:{}", settings.server.host, settings.server.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let grace = Duration::from_secs(settings.server.shutdown_grace_seconds);
    serve_on(listener, settings, move |state| {
        server::shutdown_signal(state, grace)
    })
    .await
}

/// Serves on a bound listener until `shutdown` (given the app state) resolves and the
/// connections drain.
pub async fn serve_on<F>(
    listener: tokio::net::TcpListener,
    settings: Settings,
    shutdown: impl FnOnce(AppState) -> F,
) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let prometheus = telemetry::install_recorder()?;
    let api_keys = settings
        .server
        .api_keys_file
        .as_deref()
        .map(|path| ApiKeys::load(std::path::Path::new(path)))
        .transpose()?;
    let state = AppState::new(prometheus, settings.server.admin_api_key.clone(), api_keys);
    let limits = HttpLimits {
        body_limit_bytes: settings.server.body_limit_bytes,
    };
    let app = server::router(state.clone(), limits);
    let shutdown = shutdown(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });

    let model_args = ModelArgs {
        model: settings.model.source.clone(),
        device: Some(settings.model.device.clone()),
    };
    let loaded = tokio::task::spawn_blocking(move || model_args.load()).await??;
    let name = settings
        .model
        .served_model_name
        .clone()
        .unwrap_or(loaded.name);
    let context = loaded.model.config().max_position_embeddings;
    let max_model_len = settings.model.max_model_len.unwrap_or(context).min(context);
    let tokenizer = Arc::new(loaded.tokenizer);
    let weights = loaded.model.weight_bytes();
    let device = loaded.model.device();
    let kv_cache_bytes = settings.engine.kv_cache_bytes.or_else(|| {
        memory::free_on_gpu(device)
            .map(|free| (free as f64 * settings.engine.kv_cache_gpu_fraction) as usize)
    });
    tracing::info!(
        "{}: weights {:.1} MiB, KV-cache budget {}",
        memory::device_label(device),
        weights as f64 / (1 << 20) as f64,
        kv_cache_bytes.map_or("none (max_batch only)".into(), |b| format!(
            "{:.1} MiB",
            b as f64 / (1 << 20) as f64
        ))
    );
    let import_limit_bytes = max_import_bytes(loaded.model.config());
    let per_position = memory::kv_bytes_per_token(loaded.model.config(), loaded.model.dtype());
    let kv_cache_positions = kv_cache_bytes.map(|b| b / per_position);
    let engine_config = EngineConfig {
        max_batch: settings.engine.max_batch,
        max_waiting: settings.engine.max_waiting,
        kv_cache_positions,
        trainer_nice: settings.engine.trainer_nice,
        adapter_caps: AdapterCaps {
            max_adapters: settings.engine.max_adapters,
            max_adapters_per_tenant: settings.engine.max_adapters_per_tenant,
            max_resident: settings.engine.max_resident_adapters.max(1),
            max_disk_bytes_per_tenant: settings.engine.max_adapter_disk_bytes_per_tenant,
        },
        adapter_refresh: Duration::from_secs_f64(settings.adapters.refresh_seconds.max(0.0)),
        faults: Faults {
            panic_marker: settings.engine.test_panic_marker.clone(),
            exit_marker: settings.engine.test_exit_marker.clone(),
        },
    };
    let adapters_dir = settings.engine.adapters_dir();
    let store = store::open(
        &settings.adapters.store,
        &adapters_dir,
        &name,
        settings.engine.keep_versions,
    )
    .with_context(|| format!("opening the adapter store {}", settings.adapters.store))?;
    if settings.adapters.store == "local" {
        tracing::info!("adapters live in {}", adapters_dir.display());
    } else {
        tracing::info!("adapters live in {}", settings.adapters.store);
    }
    let engine = Engine::start(
        loaded.model,
        tokenizer.clone(),
        name.clone(),
        engine_config,
        Some(store),
        settings.adaptation.clone(),
    );
    let engine_handle = engine.clone();
    state.set_ready(Ready {
        engine,
        tokenizer,
        model_name: name.clone(),
        max_model_len,
        kv_cache_positions,
        adapt_defaults: settings.adaptation.clone(),
        import_limit_bytes,
    });
    tracing::info!("ready: serving `{name}` (context {max_model_len} tokens)");
    // A dead engine cannot be revived in process: say so on /health and /ready for a moment,
    // then exit non-zero so a supervisor restarts the server.
    let watched = engine_handle;
    tokio::spawn(async move {
        watched.died().await;
        tracing::error!("the engine thread died; exiting so a supervisor can restart the server");
        tokio::time::sleep(ENGINE_DEATH_EXIT_DELAY).await;
        std::process::exit(70);
    });

    // Connections drain after the signal; the engine aborts what is left after `grace`.
    server.await??;
    tracing::info!("stopped");
    Ok(())
}
