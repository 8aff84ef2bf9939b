//! Server settings: defaults here (documented at each field), overridden by a TOML file
//! (`--config`), overridden by command-line flags and their environment variables.
//! Resolved once at start-up; nothing reads the file afterwards.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::adapt::config::{SAMPLES, STEPS};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub model: ModelSettings,
    pub server: ServerSettings,
    pub engine: EngineSettings,
    pub adapters: AdapterSettings,
    pub adaptation: crate::adapt::AdaptConfig,
}

/// Where named adapters are stored, and how often a replica looks for newer versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterSettings {
    /// `local` (the folder `engine.data_dir`) or `s3://bucket/prefix`, shared by replicas
    /// (endpoint and credentials from the usual `AWS_*` environment variables).
    pub store: String,
    /// Seconds a replica trusts the version it serves before reading the store's pointer
    /// again (training always reads it first).
    pub refresh_seconds: f64,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        Self {
            store: "local".into(),
            refresh_seconds: 2.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// HF directory, .gguf file or `org/name` hub id; unset = SmolLM2-135M-Instruct.
    pub source: Option<String>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Name clients pass as `model`; unset = derived from the source.
    pub served_model_name: Option<String>,
    /// Prompt + completion limit in tokens; unset = the model's own context length.
    pub max_model_len: Option<usize>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            source: None,
            device: "cpu".into(),
            served_model_name: None,
            max_model_len: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    /// Larger request bodies get 413.
    pub body_limit_bytes: usize,
    /// After SIGTERM, in-flight requests get this long to finish before they are aborted.
    pub shutdown_grace_seconds: u64,
    /// Bearer token for /admin/*; unset disables the admin API.
    pub admin_api_key: Option<String>,
    /// A TOML file of `[[key]]` tables (`key`, `tenant`, `rights` from "infer", "adapt",
    /// "train") that `/v1/*` requires; unset leaves inference open (loopback only, unless
    /// `--allow-unauthenticated`).
    pub api_keys_file: Option<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            body_limit_bytes: 4 << 20,
            shutdown_grace_seconds: 30,
            admin_api_key: None,
            api_keys_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Sequences decoded together in one step (continuous batching).
    pub max_batch: usize,
    /// Requests that may wait for a slot; one more gets 429.
    pub max_waiting: usize,
    /// Where named adapters are saved (one folder each) and reloaded from at start;
    /// unset = `$XDG_DATA_HOME/ttrl-serve/adapters` (or `~/.local/share/...`).
    pub data_dir: Option<String>,
    /// Versions of each named adapter kept on disk (the current one included), for
    /// `POST /admin/adapters/{name}/rollback?version=K`.
    pub keep_versions: usize,
    /// Named adapters in all (in memory or on disk); creating one more is refused (403).
    pub max_adapters: usize,
    /// Named adapters one tenant (API key owner) may have; on a server without keys, all.
    pub max_adapters_per_tenant: usize,
    /// Named adapters kept in memory; the least recently used others wait on disk and load
    /// again on use.
    pub max_resident_adapters: usize,
    /// Disk one tenant's adapters may take, every kept version counted; a new version that
    /// would pass it is refused (403).
    pub max_adapter_disk_bytes_per_tenant: u64,
    /// KV-cache bytes running requests may reserve (n x (prompt + max_tokens) positions);
    /// one that would go over waits. Unset: on a GPU `kv_cache_gpu_fraction` of the memory
    /// free after loading, on the CPU no budget beyond `max_batch`.
    pub kv_cache_bytes: Option<usize>,
    /// Share of free GPU memory (after the weights load) given to the KV cache when
    /// `kv_cache_bytes` is unset; the rest is left to adaptation (rollouts, graph, optimizer).
    pub kv_cache_gpu_fraction: f64,
    /// OS priority (nice, 0-19) of the trainer's threads: higher leaves the cores to serving
    /// while an episode runs beside it (CPU); 0 shares them evenly.
    pub trainer_nice: i32,
    /// Testing only: a request whose prompt contains this panics while it decodes.
    pub test_panic_marker: Option<String>,
    /// Testing only: a request whose prompt contains this kills the engine loop.
    pub test_exit_marker: Option<String>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_waiting: 256,
            data_dir: None,
            keep_versions: 3,
            max_adapters: 256,
            max_adapters_per_tenant: 16,
            max_resident_adapters: 16,
            max_adapter_disk_bytes_per_tenant: 2 << 30,
            kv_cache_bytes: None,
            kv_cache_gpu_fraction: 0.5,
            trainer_nice: 10,
            test_panic_marker: None,
            test_exit_marker: None,
        }
    }
}

impl EngineSettings {
    pub fn adapters_dir(&self) -> std::path::PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.into();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/share"))
            })
            .unwrap_or_else(std::env::temp_dir);
        base.join("ttrl-serve/adapters")
    }
}

impl Settings {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Refuses, at start-up and naming the key, a value the server could only misuse
    /// later: a `max_batch` of 0 would leave every request waiting, a rollout temperature
    /// of 0 would make every entropy and log-prob undefined, a quantile above 1 would be
    /// clamped without a word.
    pub fn check(&self) -> anyhow::Result<()> {
        let (e, a) = (&self.engine, &self.adaptation);
        let at_least_one = [
            ("engine.max_batch", e.max_batch),
            ("engine.keep_versions", e.keep_versions),
            ("engine.max_resident_adapters", e.max_resident_adapters),
            ("adaptation.train_samples", a.train_samples),
            ("adaptation.tree_rounds", a.tree_rounds),
            ("adaptation.tree_forks", a.tree_forks),
            ("adaptation.tree_branches", a.tree_branches),
            ("adaptation.max_tokens", a.max_tokens),
            ("adaptation.min_majority_votes", a.min_majority_votes),
            ("adaptation.leaves_per_update", a.leaves_per_update),
            ("adaptation.micro_batch", a.micro_batch),
            ("adaptation.max_questions", a.max_questions),
            ("adaptation.max_prompt_tokens", a.max_prompt_tokens),
            ("adaptation.lora.rank", a.lora.rank),
        ];
        for (key, value) in at_least_one {
            anyhow::ensure!(value >= 1, "`{key}` must be at least 1. Given: {value}");
        }
        // The defaults must be values a request could ask for.
        for (key, value, range) in [
            ("adaptation.samples", a.samples, SAMPLES),
            ("adaptation.steps", a.steps, STEPS),
            ("adaptation.ephemeral_steps", a.ephemeral_steps, STEPS),
        ] {
            anyhow::ensure!(
                range.contains(&value),
                "`{key}` must be in [{}, {}]. Given: {value}",
                range.start(),
                range.end()
            );
        }
        let any = f64::INFINITY;
        // Each must lie in (0, highest] (the first list) or [0, highest] (the second).
        let above_zero = [
            ("engine.kv_cache_gpu_fraction", e.kv_cache_gpu_fraction, 1.0),
            ("adaptation.temperature", a.temperature.into(), 2.0),
            ("adaptation.top_p", a.top_p.into(), 1.0),
            ("adaptation.rho", a.rho.into(), 1.0),
            ("adaptation.clip_epsilon", a.clip_epsilon.into(), 1.0),
            ("adaptation.adam_eps", a.adam_eps, 1.0),
            ("adaptation.grad_clip", a.grad_clip, any),
            ("adaptation.kl_bound", a.kl_bound, any),
            ("adaptation.lora.alpha", a.lora.alpha, any),
        ];
        let from_zero = [
            ("engine.trainer_nice", e.trainer_nice.into(), 19.0),
            (
                "adaptation.min_majority_share",
                a.min_majority_share.into(),
                1.0,
            ),
            ("adaptation.choice_margin", a.choice_margin.into(), 1.0),
            ("adaptation.vote_confidence", a.vote_confidence.into(), any),
            (
                "adaptation.band_low_quantile",
                a.band_low_quantile.into(),
                1.0,
            ),
            (
                "adaptation.band_high_quantile",
                a.band_high_quantile.into(),
                1.0,
            ),
            ("adaptation.lambda_kl", a.kl_weight().into(), any),
            ("adaptation.lambda_band", a.lambda_band.into(), any),
            // 0 is allowed: the zero-learning-rate control arm.
            ("adaptation.lr", a.lr, 1.0),
            ("adaptation.weight_decay", a.weight_decay, 1.0),
            ("adaptation.max_episode_seconds", a.max_episode_seconds, any),
        ];
        // Written so that NaN fails too.
        for (key, value, hi) in above_zero {
            anyhow::ensure!(
                value > 0.0 && value <= hi,
                "`{key}` must be in (0, {hi}]. Given: {value}"
            );
        }
        for (key, value, hi) in from_zero {
            anyhow::ensure!(
                value >= 0.0 && value <= hi,
                "`{key}` must be in [0, {hi}]. Given: {value}"
            );
        }
        anyhow::ensure!(
            a.band_low_quantile < a.band_high_quantile,
            "`adaptation.band_low_quantile` ({}) must be below `adaptation.band_high_quantile` ({})",
            a.band_low_quantile,
            a.band_high_quantile
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_config_parses_and_default_toml_states_the_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let settings = Settings::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
                settings
                    .check()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                parsed += 1;
            }
        }
        assert!(
            parsed >= 3,
            "only {parsed} settings files in {}",
            dir.display()
        );
        assert_eq!(
            Settings::from_file(&dir.join("default.toml")).unwrap(),
            Settings::default()
        );
    }

    /// Every settings key, unset ones too, is in default.toml under its table, set or as a
    /// commented example: the file is the one place settings are documented.
    #[test]
    fn default_toml_names_every_settings_key() {
        fn keys(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
            for (key, v) in value.as_object().unwrap() {
                match v {
                    serde_json::Value::Object(_) => keys(&format!("{prefix}.{key}"), v, out),
                    _ => out.push((prefix.trim_start_matches('.').to_string(), key.clone())),
                }
            }
        }
        let mut all = Vec::new();
        keys(
            "",
            &serde_json::to_value(Settings::default()).unwrap(),
            &mut all,
        );
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml"),
        )
        .unwrap();
        let mut table = String::new();
        let mut found = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table = name.to_string();
            } else if let Some((key, _)) = line.trim_start_matches("# ").split_once(" = ") {
                found.insert((table.clone(), key.to_string()));
            }
        }
        let missing: Vec<_> = all.iter().filter(|k| !found.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "not in configs/default.toml: {missing:?}"
        );
    }

    #[test]
    fn a_value_the_server_would_misuse_is_an_error_that_names_its_key() {
        Settings::default().check().unwrap();
        for (text, key) in [
            ("[engine]\nmax_batch = 0", "engine.max_batch"),
            ("[adaptation]\ntemperature = 0.0", "adaptation.temperature"),
            ("[adaptation]\nrho = 1.5", "adaptation.rho"),
            ("[adaptation]\nsamples = 65", "adaptation.samples"),
            ("[adaptation]\nlr = nan", "adaptation.lr"),
            (
                "[adaptation]\nband_low_quantile = 0.9\nband_high_quantile = 0.5",
                "band_low",
            ),
        ] {
            let err = toml::from_str::<Settings>(text)
                .unwrap()
                .check()
                .unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        // The zero-learning-rate control arm is a real setting.
        let control: Settings = toml::from_str("[adaptation]\nlr = 0.0").unwrap();
        control.check().unwrap();
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let err = toml::from_str::<Settings>("[server]\nprot = 1").unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }
}
