//! The decoder's hyper-parameters. The three families differ only in fields here
//! (q/k/v bias, q/k RMSNorm, RoPE layout), never in a second copy of the model.

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    /// Maps an HF `model_type`/architecture name or a GGUF `general.architecture`.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let family = match lower.as_str() {
            "llama" | "llamaforcausallm" | "mistral" | "mistralforcausallm" => Family::Llama,
            "qwen2" | "qwen2forcausallm" => Family::Qwen2,
            "qwen3" | "qwen3forcausallm" => Family::Qwen3,
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    arch: name.to_string(),
                })
            }
        };
        Ok(family)
    }
}

/// Where the two halves of each rotated pair sit in a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// HF transformers' `rotate_half`: pairs are (i, i + d/2).
    Half,
    /// llama.cpp's GGUF layout for llama: pairs are (2i, 2i + 1).
    Interleaved,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2: q/k/v projections carry a bias.
    pub attention_bias: bool,
    /// Qwen3: RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    pub rope_layout: RopeLayout,
}

/// `config.json` as HF writes it; only the fields the decoder reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    /// transformers 5 moved `rope_theta` and the scaling type in here.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

fn default_max_positions() -> usize {
    4096
}

impl ModelConfig {
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("config.json: {e}")))?;
        let name = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.first().cloned())
            .ok_or_else(|| Error::InvalidConfig("config.json names no model_type".into()))?;
        let family = Family::parse(&name)?;
        let params = raw.rope_parameters.as_ref();
        let rope_type = params
            .and_then(|p| p["rope_type"].as_str())
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(Error::InvalidConfig(format!(
                "rope type `{rope_type}` is not supported yet"
            )));
        }
        if let Some(scaling) = raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            return Err(Error::InvalidConfig(format!(
                "rope_scaling {scaling} is not supported yet"
            )));
        }
        let rope_theta = raw
            .rope_theta
            .or_else(|| params.and_then(|p| p["rope_theta"].as_f64()))
            .unwrap_or(10_000.0);
        let config = ModelConfig {
            family,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias.unwrap_or(family == Family::Qwen2),
            qk_norm: family == Family::Qwen3,
            rope_layout: RopeLayout::Half,
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects inconsistent shapes once, at load, so the forward pass never has to.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }

    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_is_named_in_the_error() {
        let text = r#"{"model_type": "gpt_neox", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rms_norm_eps": 1e-6}"#;
        let err = ModelConfig::from_hf_json(text).unwrap_err();
        assert!(err.to_string().contains("gpt_neox"), "{err}");
    }

    #[test]
    fn qwen2_defaults_to_qkv_bias_and_qwen3_to_qk_norm() {
        let base = |t: &str| {
            format!(
                r#"{{"model_type": "{t}", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "rms_norm_eps": 1e-6}}"#
            )
        };
        let q2 = ModelConfig::from_hf_json(&base("qwen2")).unwrap();
        assert!(q2.attention_bias && !q2.qk_norm);
        let q3 = ModelConfig::from_hf_json(&base("qwen3")).unwrap();
        assert!(!q3.attention_bias && q3.qk_norm);
        assert_eq!(q3.kv_groups(), 2);
    }
}
