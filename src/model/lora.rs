//! LoRA (Hu et al. 2021, arXiv 2106.09685) beside frozen base weights:
//! `y = x W^T + (alpha / r) * (x A^T) B^T`, with A (r, in) and B (out, r) trainable.
//!
//! An [`Adapter`] is one named set of LoRA pairs; several can exist, one is active per
//! forward, and no adapter at all is the base model (the KL reference). Files follow PEFT
//! (`adapter_model.safetensors` + `adapter_config.json`) so other tools can load them.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::frozen::LowRank;
use crate::error::{Error, Result};

/// The projections LoRA can sit on, named as in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    pub fn module_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.module_name() == name)
    }

    fn parent(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    /// (in_features, out_features) of this projection.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match self {
            Projection::Q => (c.hidden_size, q),
            Projection::K | Projection::V => (c.hidden_size, kv),
            Projection::O => (q, c.hidden_size),
            Projection::Gate | Projection::Up => (c.hidden_size, c.intermediate_size),
            Projection::Down => (c.intermediate_size, c.hidden_size),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Projection>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: Projection::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

#[derive(Debug)]
struct LoraPair {
    a: Var,
    b: Var,
}

/// One named LoRA set over every layer.
#[derive(Debug)]
pub struct Adapter {
    name: String,
    config: LoraConfig,
    /// `layers[i][projection]`.
    layers: Vec<HashMap<Projection, LoraPair>>,
}

/// PEFT's `adapter_config.json`, the fields other tools read.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    task_type: String,
    r: usize,
    lora_alpha: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default = "no_bias")]
    bias: String,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

fn no_bias() -> String {
    "none".into()
}

const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The files PEFT writes and reads: what an export carries and an import expects.
pub const PEFT_FILES: [&str; 2] = [WEIGHTS_FILE, CONFIG_FILE];

fn peft_key(layer: usize, p: Projection, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{which}.weight",
        p.parent(),
        p.module_name()
    )
}

/// The largest rank an import may carry: far above what test-time adaptation uses.
pub const MAX_IMPORT_RANK: usize = 256;

/// What an imported adapter may weigh: every projection of every layer at
/// [`MAX_IMPORT_RANK`] in f32, plus room for the JSON and the zip's headers.
pub fn max_import_bytes(model: &ModelConfig) -> usize {
    let per_layer: usize = Projection::ALL
        .iter()
        .map(|p| {
            let (fan_in, fan_out) = p.dims(model);
            MAX_IMPORT_RANK * (fan_in + fan_out) * 4
        })
        .sum();
    per_layer * model.num_hidden_layers + (1 << 20)
}

/// Writes a file and flushes it to disk.
pub fn write_synced(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// The dtype LoRA weights (and so the optimizer state) are kept in: f32 under a
/// half-precision base, whose 8-bit mantissa would round small updates away.
pub fn lora_dtype(base: DType) -> DType {
    match base {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

impl Adapter {
    /// PEFT's initialisation: A kaiming-uniform (bound 1/sqrt(in)), B zero, so a fresh adapter
    /// leaves the model unchanged.
    pub fn new(
        name: &str,
        config: LoraConfig,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        if config.rank == 0 {
            return Err(Error::Adapter {
                name: name.into(),
                reason: "rank must be positive".into(),
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let layers = (0..model.num_hidden_layers)
            .map(|_| {
                config
                    .targets
                    .iter()
                    .map(|&p| {
                        let (fan_in, fan_out) = p.dims(model);
                        let bound = 1.0 / (fan_in as f64).sqrt();
                        let a: Vec<f64> = (0..config.rank * fan_in)
                            .map(|_| rng.random_range(-bound..bound))
                            .collect();
                        let a =
                            Tensor::from_vec(a, (config.rank, fan_in), device)?.to_dtype(dtype)?;
                        let b = Tensor::zeros((fan_out, config.rank), dtype, device)?;
                        Ok((
                            p,
                            LoraPair {
                                a: Var::from_tensor(&a)?,
                                b: Var::from_tensor(&b)?,
                            },
                        ))
                    })
                    .collect::<Result<HashMap<_, _>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.into(),
            config,
            layers,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The trainable tensors, in a stable order (layer, projection, A then B).
    pub fn vars(&self) -> Vec<Var> {
        self.entries()
            .into_iter()
            .flat_map(|(_, _, pair)| [pair.a.clone(), pair.b.clone()])
            .collect()
    }

    fn entries(&self) -> Vec<(usize, Projection, &LoraPair)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                if let Some(pair) = layer.get(&p) {
                    out.push((i, p, pair));
                }
            }
        }
        out
    }

    /// The LoRA pair of one projection as a low-rank update, or `None` where this projection
    /// has no LoRA. `track` = false enters the weights detached so generation builds no graph.
    pub(crate) fn low_rank(&self, layer: usize, p: Projection, track: bool) -> Option<LowRank> {
        let pair = self.layers.get(layer).and_then(|l| l.get(&p))?;
        let (a, b) = if track {
            (pair.a.as_tensor().clone(), pair.b.as_tensor().clone())
        } else {
            (pair.a.as_detached_tensor(), pair.b.as_detached_tensor())
        };
        Some(LowRank {
            a,
            b,
            scale: self.config.scale(),
        })
    }

    /// Whether every B is zero, as [`Adapter::new`] makes them: the adapter then leaves the
    /// model exactly the base model (its branch adds zeros).
    pub fn is_identity(&self) -> Result<bool> {
        for pair in self.layers.iter().flat_map(|l| l.values()) {
            let sum = pair.b.as_tensor().abs()?.sum_all()?.to_dtype(DType::F64)?;
            if sum.to_scalar::<f64>()? != 0.0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Bytes of its weights: what one saved version adds on disk, about.
    pub fn bytes(&self) -> u64 {
        self.vars()
            .iter()
            .map(|v| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// A copy with its own storage: serving keeps answering with it while the original trains.
    pub fn deep_copy(&self) -> Result<Self> {
        let copy = |v: &Var| Var::from_tensor(&v.as_detached_tensor().copy()?);
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|(&p, pair)| {
                        Ok((
                            p,
                            LoraPair {
                                a: copy(&pair.a)?,
                                b: copy(&pair.b)?,
                            },
                        ))
                    })
                    .collect::<Result<HashMap<_, _>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: self.name.clone(),
            config: self.config.clone(),
            layers,
        })
    }

    /// Tensors under their PEFT names.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.entries()
            .into_iter()
            .flat_map(|(i, p, pair)| {
                [
                    (peft_key(i, p, "A"), pair.a.as_detached_tensor()),
                    (peft_key(i, p, "B"), pair.b.as_detached_tensor()),
                ]
            })
            .collect()
    }

    /// Deep copies of every tensor (named as PEFT names them), for undoing a step: the views
    /// of [`Self::named_tensors`] share storage with the live weights.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.named_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect()
    }

    /// Overwrites every tensor with `values` (same names and shapes as [`Self::named_tensors`]).
    pub fn set_tensors(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for (i, p, pair) in self.entries() {
            for (which, var) in [("A", &pair.a), ("B", &pair.b)] {
                let key = peft_key(i, p, which);
                let value = values.get(&key).ok_or_else(|| Error::Adapter {
                    name: self.name.clone(),
                    reason: format!("missing tensor {key}"),
                })?;
                if value.dims() != var.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key,
                        expected: var.dims().to_vec(),
                        got: value.dims().to_vec(),
                    });
                }
                var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
        }
        Ok(())
    }

    /// Writes the PEFT files (plus `extra_files`, name and contents) into the folder `dir`,
    /// each flushed to disk (fsync) before this returns. Making them current atomically is the
    /// adapter store's job.
    pub fn write_files(
        &self,
        dir: &Path,
        base_model: Option<&str>,
        extra_files: &[(&str, String)],
    ) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let tensors: HashMap<String, Tensor> = self
            .named_tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        let weights = dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors, &weights)?;
        std::fs::File::open(&weights)?.sync_all()?;
        let config = PeftConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: self.config.rank,
            lora_alpha: self.config.alpha,
            target_modules: self
                .config
                .targets
                .iter()
                .map(|p| p.module_name().to_string())
                .collect(),
            lora_dropout: 0.0,
            bias: no_bias(),
            base_model_name_or_path: base_model.map(str::to_string),
        };
        let json = serde_json::to_string_pretty(&config).map_err(|e| Error::Adapter {
            name: self.name.clone(),
            reason: e.to_string(),
        })?;
        write_synced(&dir.join(CONFIG_FILE), json.as_bytes())?;
        for (name, contents) in extra_files {
            write_synced(&dir.join(name), contents.as_bytes())?;
        }
        Ok(())
    }

    /// Reads PEFT files written by [`Self::write_files`] or by PEFT itself.
    pub fn load(
        name: &str,
        dir: &Path,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bad = |reason: String| Error::Adapter {
            name: name.into(),
            reason,
        };
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| bad(format!("{}: {e}", config_path.display())))?;
        let peft: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: {e}", config_path.display())))?;
        let targets = peft
            .target_modules
            .iter()
            .map(|m| Projection::parse(m).ok_or_else(|| bad(format!("unknown target module {m}"))))
            .collect::<Result<Vec<_>>>()?;
        // Checked before anything is allocated: a huge rank from a file must not abort us.
        let max_rank = targets
            .iter()
            .map(|p| {
                let (fan_in, fan_out) = p.dims(model);
                fan_in.min(fan_out)
            })
            .min()
            .unwrap_or(0);
        if peft.r == 0 || peft.r > max_rank {
            return Err(bad(format!(
                "rank r = {} is outside 1..={max_rank} for this model",
                peft.r
            )));
        }
        if !(peft.lora_alpha.is_finite() && peft.lora_alpha > 0.0) {
            return Err(bad(format!(
                "lora_alpha must be a positive number, not {}",
                peft.lora_alpha
            )));
        }
        let config = LoraConfig {
            rank: peft.r,
            alpha: peft.lora_alpha,
            targets,
        };
        let adapter = Adapter::new(name, config, model, dtype, device, 0)?;
        let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)
            .map_err(|e| bad(format!("{}: {e}", dir.join(WEIGHTS_FILE).display())))?;
        for (key, t) in &weights {
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if !values.iter().all(|v| v.is_finite()) {
                return Err(bad(format!("{key} holds NaN or infinite values")));
            }
        }
        adapter.set_tensors(&weights)?;
        Ok(adapter)
    }
}
