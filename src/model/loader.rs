//! Loading a model and its tokenizer from an HF directory, a GGUF file or a hub id.
//! Every failure names the file and the cause; nothing here panics on bad input.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::assets;
use super::config::{Family, ModelConfig, RopeLayout};
use super::decoder::{Model, WeightSource};
use super::frozen::{CompactWeight, FrozenWeight};
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// A model ready to run, with the name it is served under.
pub struct LoadedModel {
    pub name: String,
    pub model: Model,
    pub tokenizer: TextTokenizer,
}

/// Where weights come from, resolved from a `--model` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// SmolLM2-135M-Instruct, fetched on first use.
    Default,
    HfDir(PathBuf),
    Gguf(PathBuf),
    Hub(String),
    /// `random:<config.json>`: the architecture of an HF config with random weights and a
    /// placeholder vocabulary, for speed checks (values do not change speed).
    Random(PathBuf),
}

impl ModelSource {
    /// A path to an existing directory or `.gguf` file is local; `org/name` otherwise is a hub id.
    pub fn parse(spec: &str) -> Self {
        if let Some(config) = spec.strip_prefix("random:") {
            return ModelSource::Random(config.into());
        }
        let path = Path::new(spec);
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            ModelSource::Gguf(path.to_path_buf())
        } else if path.is_dir() || spec.starts_with('.') || spec.starts_with('/') {
            ModelSource::HfDir(path.to_path_buf())
        } else {
            ModelSource::Hub(spec.to_string())
        }
    }

    pub fn load(&self, dtype: DType, device: &Device) -> Result<LoadedModel> {
        match self {
            ModelSource::Default => {
                let mut loaded = load_gguf(&assets::default_model()?, dtype, device)?;
                loaded.name = assets::DEFAULT_MODEL_NAME.into();
                Ok(loaded)
            }
            ModelSource::HfDir(dir) => load_hf_dir(dir, dtype, device),
            ModelSource::Gguf(path) => load_gguf(path, dtype, device),
            ModelSource::Hub(id) => load_hf_dir(&download_hub(id)?, dtype, device),
            ModelSource::Random(config) => load_random(config, dtype, device),
        }
    }
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

fn read_text(path: &Path, what: &'static str) -> Result<String> {
    if !path.exists() {
        return Err(Error::MissingFile {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(std::fs::read_to_string(path)?)
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Random weights in the shape `config_path` describes, with a word-level vocabulary
/// `<0>`, `<1>`, ... of the model's size, so every sampled id decodes.
pub fn load_random(config_path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let config = ModelConfig::from_hf_json(&read_text(config_path, "config.json")?)?;
    let vocab: HashMap<String, u32> = (0..config.vocab_size as u32)
        .map(|i| (format!("<{i}>"), i))
        .collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<0>".into())
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    let tokenizer = TextTokenizer::new(inner, None, None, None);
    let name = format!(
        "random-{}",
        config_path
            .parent()
            .and_then(|p| p.file_name())
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    );
    let model = Model::new(config, WeightSource::random(dtype, device))?;
    Ok(LoadedModel {
        name,
        model,
        tokenizer,
    })
}

/// An HF directory: config.json, tokenizer.json, tokenizer_config.json and safetensors
/// (one file or shards listed in model.safetensors.index.json).
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            path: dir.to_path_buf(),
            what: "model directory",
        });
    }
    let config = ModelConfig::from_hf_json(&read_text(&dir.join("config.json"), "config.json")?)?;
    let tokenizer = hf_tokenizer(dir)?;
    let files = safetensors_files(dir)?;
    let mut tensors = HashMap::new();
    let bar = progress(files.len(), "loading safetensors");
    for file in &files {
        let loaded = candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| Error::bad_file(file, format!("not a valid safetensors file ({e})")))?;
        tensors.extend(loaded);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let model = Model::new(config, WeightSource::new(tensors, dtype, device))?;
    Ok(LoadedModel {
        name: model_name(dir),
        model,
        tokenizer,
    })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(&index, e))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| Error::bad_file(&index, "no weight_map"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str().map(|f| dir.join(f)))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if !single.exists() {
        return Err(Error::MissingFile {
            path: single,
            what: "model weights",
        });
    }
    Ok(vec![single])
}

fn hf_tokenizer(dir: &Path) -> Result<TextTokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(Error::MissingFile {
            path,
            what: "tokenizer.json",
        });
    }
    let inner = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc: Value = match std::fs::read_to_string(&tc_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::bad_file(&tc_path, e))?,
        Err(_) => Value::Null,
    };
    // Special tokens are either strings or {"content": ...} objects.
    let token = |key: &str| -> Option<String> {
        match &tc[key] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        }
    };
    let template = match &tc["chat_template"] {
        Value::String(s) => Some(s.clone()),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    Ok(TextTokenizer::new(
        inner,
        template,
        token("bos_token"),
        token("eos_token"),
    ))
}

fn download_hub(id: &str) -> Result<PathBuf> {
    let fail = |reason: String| Error::Download {
        id: id.into(),
        reason,
    };
    let api = hf_hub::api::sync::Api::new().map_err(|e| fail(e.to_string()))?;
    let repo = api.model(id.to_string());
    let get = |file: &str| repo.get(file).map_err(|e| fail(format!("{file}: {e}")));
    let config = get("config.json")?;
    get("tokenizer.json")?;
    // tokenizer_config.json carries the chat template; a repo without one still works.
    let _ = repo.get("tokenizer_config.json");
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
                .map_err(|e| fail(e.to_string()))?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                get(shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config
        .parent()
        .expect("a downloaded file lives in the snapshot folder")
        .to_path_buf())
}

/// GGUF tensor names to HF names.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

struct GgufMeta<'a> {
    content: &'a gguf_file::Content,
    path: &'a Path,
}

impl GgufMeta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::bad_file(self.path, format!("GGUF metadata lacks `{key}`")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| Error::bad_file(self.path, format!("`{key}`: {e}")))
    }

    fn f64(&self, key: &str) -> Option<f64> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_f32().ok())
            .map(f64::from)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| Error::bad_file(self.path, format!("`{key}`: {e}")))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| Error::bad_file(self.path, format!("`{key}`: {e}")))
            })
            .collect()
    }
}

/// A GGUF file: weights dequantized to the compute dtype, tokenizer and chat template from
/// its metadata. llama-family GGUFs keep llama.cpp's permuted q/k rows and run with the
/// interleaved RoPE layout they were permuted for.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile {
            path: path.to_path_buf(),
            what: "GGUF file",
        },
        _ => Error::Io(e),
    })?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::bad_file(path, format!("not a valid GGUF file ({e})")))?;
    check_gguf_size(&content, &mut file, path)?;
    let meta = GgufMeta {
        content: &content,
        path,
    };
    let arch = meta
        .string("general.architecture")
        .ok_or_else(|| Error::bad_file(path, "GGUF metadata lacks general.architecture"))?;
    let family = Family::parse(&arch)?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let hidden = meta.usize(&format!("{arch}.embedding_length"))?;
    let heads = meta.usize(&format!("{arch}.attention.head_count"))?;
    let config = ModelConfig {
        family,
        vocab_size: tokens.len(),
        hidden_size: hidden,
        intermediate_size: meta.usize(&format!("{arch}.feed_forward_length"))?,
        num_hidden_layers: meta.usize(&format!("{arch}.block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: meta
            .usize(&format!("{arch}.attention.head_count_kv"))
            .unwrap_or(heads),
        head_dim: meta
            .usize(&format!("{arch}.attention.key_length"))
            .unwrap_or(hidden / heads.max(1)),
        rms_norm_eps: meta
            .f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6),
        rope_theta: meta
            .f64(&format!("{arch}.rope.freq_base"))
            .unwrap_or(10_000.0),
        max_position_embeddings: meta
            .usize(&format!("{arch}.context_length"))
            .unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        qk_norm: family == Family::Qwen3,
        rope_layout: match family {
            Family::Llama => RopeLayout::Interleaved,
            Family::Qwen2 | Family::Qwen3 => RopeLayout::Half,
        },
    };
    config.validate()?;
    let tokenizer = gguf_tokenizer(&meta, tokens)?;

    let bar = progress(content.tensor_infos.len(), "dequantizing GGUF");
    let mut tensors = HashMap::new();
    let mut compact = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| Error::bad_file(path, format!("tensor {name}: {e}")))?;
        if FrozenWeight::keeps_compact(dtype, device) {
            if let Some(c) = CompactWeight::from_gguf(&q)? {
                compact.insert(hf.clone(), c);
            }
        }
        tensors.insert(hf, q.dequantize(&Device::Cpu)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let weights = WeightSource::new(tensors, dtype, device).with_compact(compact);
    let model = Model::new(config, weights)?;
    Ok(LoadedModel {
        name: model_name(path),
        model,
        tokenizer,
    })
}

/// A truncated download parses its header fine and fails deep inside a tensor read; say so up front.
fn check_gguf_size<R: Read + Seek>(
    content: &gguf_file::Content,
    file: &mut R,
    path: &Path,
) -> Result<()> {
    let len = file.seek(std::io::SeekFrom::End(0))?;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bytes = elems / block * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > len {
            return Err(Error::bad_file(
                path,
                format!("truncated: tensor {name} ends at byte {end} but the file has {len} bytes"),
            ));
        }
    }
    Ok(())
}

/// Rebuilds an HF `tokenizer.json` from GGUF metadata (GPT-2 style byte-level BPE).
fn gguf_tokenizer(meta: &GgufMeta<'_>, tokens: Vec<String>) -> Result<TextTokenizer> {
    let kind = meta.string("tokenizer.ggml.model").unwrap_or_default();
    if kind != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "GGUF tokenizer `{kind}` is not supported (byte-level BPE `gpt2` is)"
        )));
    }
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = meta
        .get("tokenizer.ggml.token_type")
        .ok()
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .map(|t| t.to_i32().map(i64::from).unwrap_or(1))
                .collect()
        })
        .unwrap_or_default();
    // llama.cpp token types: 3 = control, 4 = user-defined; both are matched whole in text.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = match meta.string("tokenizer.ggml.pre").as_deref() {
        // Llama-3 and Qwen2 split with one regex (digits in runs of at most three).
        Some("llama-bpe") | Some("llama3") | Some("qwen2") => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
        }
        // SmolLM and GPT-2: single digits, then GPT-2's byte-level split.
        _ => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
    };
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    let inner: tokenizers::Tokenizer = spec
        .to_string()
        .parse()
        .map_err(|e| Error::Tokenizer(format!("GGUF vocabulary: {e}")))?;
    let token_at = |key: &str| -> Option<String> {
        let id = meta.usize(key).ok()?;
        tokens.get(id).cloned()
    };
    Ok(TextTokenizer::new(
        inner,
        meta.string("tokenizer.chat_template"),
        token_at("tokenizer.ggml.bos_token_id"),
        token_at("tokenizer.ggml.eos_token_id"),
    ))
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
