//! The decoder of the Llama, Qwen2 and Qwen3 families, following HF transformers'
//! `modeling_llama.py`, `modeling_qwen2.py` and `modeling_qwen3.py`: pre-norm blocks of
//! grouped-query attention with RoPE and a SwiGLU MLP. Family differences are
//! [`ModelConfig`] fields (q/k/v bias, q/k RMSNorm, RoPE layout).
//!
//! One forward serves both training and generation. Sequences are packed row-wise
//! (no padding): projections and MLPs run once over all rows, attention runs per sequence.
//! A sequence with a [`KvCache`] continues from its cached positions (generation, detached);
//! one without starts at position 0 and keeps the graph (scoring). Training takes its
//! gradients through [`Model::adapter_gradients`], which keeps a small batch's activations
//! and recomputes a large one's one layer at a time.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::config::ModelConfig;
use super::frozen::{CompactWeight, FrozenWeight, LowRank, Rows};
use super::kv_cache::KvCache;
use super::lora::{Adapter, Projection};
use super::ops::{rms_norm, silu_mul, softmax_rows, Rope};
use crate::error::{Error, Result};
use crate::numerics::{dot, exp_nonpositive, lane_sum};

/// A frozen linear layer with an optional bias.
#[derive(Debug, Clone)]
struct Linear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor, rows: Rows) -> candle_core::Result<Tensor> {
        self.forward_low_rank(x, None, rows)
    }

    /// The layer with a low-rank update of its weight, when there is one.
    fn forward_low_rank(
        &self,
        x: &Tensor,
        update: Option<&LowRank>,
        rows: Rows,
    ) -> candle_core::Result<Tensor> {
        let y = match update {
            Some(update) => self.weight.matmul_low_rank(x, update, rows)?,
            None => self.weight.matmul(x, rows)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Activations a gradient pass may keep rather than recompute layer by layer. The default
/// model keeps about 1 MB per packed row, so an adaptation micro-batch (~150 rows) skips the
/// recomputed forward pass, and the bench's 16 x 128 tokens keep the graph of their last 7 of
/// 30 layers (forward+backward 11.4-11.7 -> 10.4-11.0 s, peak 1.2 -> 2.0 GB; 1 GB kept 15
/// layers: 10.1-10.6 s, 2.8 GB).
const KEPT_ACTIVATION_BYTES: usize = 512 << 20;

/// Which rows of the packed batch get logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last position of each sequence: (sequences, vocab).
    Last,
    /// Every position: (total tokens, vocab), sequences one after another.
    All,
    /// These rows of the packed batch (training skips prompts: the vocabulary projection
    /// is the costliest matmul of a small model).
    Rows(Vec<u32>),
}

/// One sequence's share of a forward pass.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: Option<&'a mut KvCache>,
    /// Index of an earlier sequence of the same batch (no cache, no prefix of its own) whose
    /// tokens come before these: they attend to its keys and values, computed once and
    /// differentiable. Training uses it to share one prompt among its responses.
    pub prefix: Option<usize>,
}

impl<'a> SeqInput<'a> {
    /// A sequence from position 0, no cache: the graph is kept (training, scoring).
    pub fn new(tokens: &'a [u32]) -> Self {
        Self {
            tokens,
            cache: None,
            prefix: None,
        }
    }

    /// A sequence continuing from its cache (generation).
    pub fn cached(tokens: &'a [u32], cache: &'a mut KvCache) -> Self {
        Self {
            tokens,
            cache: Some(cache),
            prefix: None,
        }
    }

    /// A sequence continuing batch sequence `prefix`.
    pub fn after(prefix: usize, tokens: &'a [u32]) -> Self {
        Self {
            tokens,
            cache: None,
            prefix: Some(prefix),
        }
    }
}

/// One adapter of a mixed batch and the packed rows it applies to (`None`: every row).
struct LoraRows<'a> {
    adapter: &'a Adapter,
    rows: Option<Tensor>,
}

fn missing_gradient(what: &str) -> Error {
    candle_core::Error::Msg(format!("no gradient reached {what}")).into()
}

/// A batch laid out row-wise for one forward pass.
struct Packed {
    ids: Tensor,
    positions: Tensor,
    spans: Vec<Span>,
    rows: usize,
    /// Without caches (training, scoring): the spans that attend together.
    groups: Option<AttentionGroups>,
}

/// A batch without caches as groups of spans that attend as one: a sequence and the
/// sequences continuing it (training's prompt and its responses), each group one masked
/// attention. One attention per span cost more in backward than the attention itself: the
/// gradient of each span's slice of q, k and v is a zero-padded copy of the whole batch,
/// transposed, added into another.
struct AttentionGroups {
    groups: Vec<AttentionGroup>,
    /// The packed row of each row of the groups' outputs put one after another, inverted:
    /// `None` when they already are in packed order.
    to_packed: Option<Tensor>,
}

struct AttentionGroup {
    rows: GroupRows,
    /// Over (rows, rows): a row sees the keys of its own sequence and of the one it
    /// continues, up to its own position. `None` for a single row.
    mask: Option<Tensor>,
}

/// Where a group's rows lie in the packed batch.
enum GroupRows {
    Range(usize, usize),
    Scattered(Tensor),
}

impl GroupRows {
    fn of(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            GroupRows::Range(start, len) => t.narrow(0, *start, *len),
            GroupRows::Scattered(rows) => t.index_select(rows, 0),
        }
    }
}

/// Where a sequence's rows sit in the packed batch.
struct Span {
    start: usize,
    len: usize,
    /// The span whose keys and values come first (see [`SeqInput::prefix`]).
    prefix: Option<usize>,
    /// Causal mask over (new tokens, all keys), built once per forward and shared by every
    /// layer; `None` for a single new token, which sees every key, and in a batch without
    /// caches, whose groups have their own ([`AttentionGroup`]).
    mask: Option<Tensor>,
}

#[derive(Debug)]
struct Layer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
}

impl Layer {
    /// The seven projections, in checkpoint order.
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: FrozenWeight,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// See [`KEPT_ACTIVATION_BYTES`].
    kept_activation_bytes: usize,
}

/// Takes tensors out of a checkpoint map by HF name, checking each shape against the config.
pub struct WeightSource {
    tensors: HashMap<String, Tensor>,
    /// The same numbers in lighter bytes, by name, for the weights decode steps read.
    compact: HashMap<String, CompactWeight>,
    dtype: DType,
    device: Device,
    /// Draw every tensor instead (N(0, 0.02), norms at 1): for speed and memory checks of
    /// a shape whose checkpoint is not at hand.
    random: bool,
}

impl WeightSource {
    pub fn new(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self {
            tensors,
            compact: HashMap::new(),
            dtype,
            device: device.clone(),
            random: false,
        }
    }

    pub fn random(dtype: DType, device: &Device) -> Self {
        Self {
            random: true,
            ..Self::new(HashMap::new(), dtype, device)
        }
    }

    /// Adds compact copies of some of the tensors (GGUF blocks, by HF name).
    pub fn with_compact(mut self, compact: HashMap<String, CompactWeight>) -> Self {
        self.compact = compact;
        self
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.random {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, DType::F32, &self.device)?
            } else {
                Tensor::randn(0f32, 0.02, shape, &self.device)?
            };
            return Ok(t.to_dtype(self.dtype)?);
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into() })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: shape.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// A matrix decode steps multiply by: with its compact copy, given or made from a bf16 or
    /// f16 checkpoint tensor, where the model's dtype and device keep one.
    fn take_frozen(&mut self, name: &str, shape: &[usize]) -> Result<FrozenWeight> {
        let given = self.compact.remove(name);
        let compact = if !FrozenWeight::keeps_compact(self.dtype, &self.device) {
            None
        } else if given.is_some() {
            given
        } else {
            match self.tensors.get(name) {
                Some(t) if t.dims() == shape => CompactWeight::from_half(t)?,
                _ => None,
            }
        };
        Ok(FrozenWeight::new(self.take(name, shape)?, compact))
    }

    fn linear(
        &mut self,
        prefix: &str,
        p: Projection,
        bias: bool,
        c: &ModelConfig,
    ) -> Result<Linear> {
        let (fan_in, fan_out) = p.dims(c);
        let weight = self.take_frozen(&format!("{prefix}.weight"), &[fan_out, fan_in])?;
        let bias = if bias {
            Some(self.take(&format!("{prefix}.bias"), &[fan_out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

impl Model {
    /// Builds the decoder from HF-named tensors. f64 is accepted (for finite-difference
    /// checks) as well as f32 and bf16; the dtype is fixed here and nowhere else.
    pub fn new(config: ModelConfig, mut w: WeightSource) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let dtype = w.dtype;
        let device = w.device.clone();
        // Some checkpoints tie the head without saying so: no lm_head tensor means tied.
        let tied = c.tie_word_embeddings || !w.has("lm_head.weight");
        let vocab_shape = [c.vocab_size, c.hidden_size];
        let embed_tokens = if tied {
            w.take_frozen("model.embed_tokens.weight", &vocab_shape)?
        } else {
            FrozenWeight::new(w.take("model.embed_tokens.weight", &vocab_shape)?, None)
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let attn = format!("model.layers.{i}.self_attn");
            let mlp = format!("model.layers.{i}.mlp");
            let bias = c.attention_bias;
            let head_norm = |w: &mut WeightSource, name: &str| -> Result<Option<Tensor>> {
                if c.qk_norm {
                    Ok(Some(
                        w.take(&format!("{attn}.{name}.weight"), &[c.head_dim])?,
                    ))
                } else {
                    Ok(None)
                }
            };
            layers.push(Layer {
                q_proj: w.linear(&format!("{attn}.q_proj"), Projection::Q, bias, c)?,
                k_proj: w.linear(&format!("{attn}.k_proj"), Projection::K, bias, c)?,
                v_proj: w.linear(&format!("{attn}.v_proj"), Projection::V, bias, c)?,
                o_proj: w.linear(&format!("{attn}.o_proj"), Projection::O, false, c)?,
                q_norm: head_norm(&mut w, "q_norm")?,
                k_norm: head_norm(&mut w, "k_norm")?,
                gate_proj: w.linear(&format!("{mlp}.gate_proj"), Projection::Gate, false, c)?,
                up_proj: w.linear(&format!("{mlp}.up_proj"), Projection::Up, false, c)?,
                down_proj: w.linear(&format!("{mlp}.down_proj"), Projection::Down, false, c)?,
                input_layernorm: w.take(
                    &format!("model.layers.{i}.input_layernorm.weight"),
                    &[c.hidden_size],
                )?,
                post_attention_layernorm: w.take(
                    &format!("model.layers.{i}.post_attention_layernorm.weight"),
                    &[c.hidden_size],
                )?,
            });
        }
        let norm = w.take("model.norm.weight", &[c.hidden_size])?;
        let lm_head = if tied {
            embed_tokens.clone()
        } else {
            w.take_frozen("lm_head.weight", &vocab_shape)?
        };
        let rope = Rope::new(
            c.head_dim,
            c.rope_theta,
            c.max_position_embeddings,
            c.rope_layout,
            dtype,
            &device,
        )?;
        Ok(Self {
            config,
            embed_tokens: embed_tokens.tensor,
            layers,
            norm,
            lm_head,
            rope,
            dtype,
            device,
            kept_activation_bytes: KEPT_ACTIVATION_BYTES,
        })
    }

    /// The activations a gradient pass may keep whole (see [`Model::adapter_gradients`]);
    /// 0 recomputes every batch layer by layer.
    pub fn set_kept_activation_bytes(&mut self, bytes: usize) {
        self.kept_activation_bytes = bytes;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    /// Every frozen tensor, for checks that adaptation never touches them.
    pub fn base_tensors(&self) -> Vec<Tensor> {
        let mut out = vec![
            self.embed_tokens.clone(),
            self.norm.clone(),
            self.lm_head.tensor.clone(),
        ];
        for l in &self.layers {
            for lin in l.linears() {
                out.push(lin.weight.tensor.clone());
                out.extend(lin.bias.clone());
            }
            out.extend([
                l.input_layernorm.clone(),
                l.post_attention_layernorm.clone(),
            ]);
            out.extend(l.q_norm.clone());
            out.extend(l.k_norm.clone());
        }
        out
    }

    /// Bytes of the frozen weights, with their compact copies (a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &Linear| l.weight.bytes() + l.bias.as_ref().map_or(0, bytes);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.linears().into_iter().map(lin).sum::<usize>()
                    + bytes(&l.input_layernorm)
                    + bytes(&l.post_attention_layernorm)
            })
            .sum();
        let head = if self.lm_head.tensor.id() == self.embed_tokens.id() {
            self.lm_head.bytes() - bytes(&self.embed_tokens)
        } else {
            self.lm_head.bytes()
        };
        layers + bytes(&self.embed_tokens) + bytes(&self.norm) + head
    }

    /// Runs the packed batch and returns logits (in the model's dtype) for the rows asked.
    ///
    /// Sequences with a cache append their tokens to it and run detached (generation);
    /// a batch without caches keeps the autograd graph through the active adapter (training).
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        adapter: Option<&Adapter>,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let adapters = vec![adapter; seqs.len()];
        self.forward_mixed(seqs, &adapters, logits_for)
    }

    /// [`Self::forward`] with an adapter (or none) per sequence: sequences of different
    /// adapters share one pass, each projection's LoRA term applied to its own rows only
    /// (gathered, computed, added back), as S-LoRA and Punica batch many adapters.
    pub fn forward_mixed(
        &self,
        seqs: &mut [SeqInput<'_>],
        adapters: &[Option<&Adapter>],
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        // On a pool thread, the pass's parallel ops share work with the other pool threads
        // directly; from outside, each of them (about 200 per decode step) would wake a pool
        // thread and put this one to sleep.
        rayon::scope(|_| {
            let rows = match logits_for {
                LogitsFor::Last => Rows::PerSequence,
                LogitsFor::All | LogitsFor::Rows(_) => Rows::Spans,
            };
            let hidden = self.hidden_mixed(seqs, adapters, logits_for)?;
            Ok(self.lm_head.matmul(&hidden, rows)?)
        })
    }

    /// The final hidden states (after the last norm) of the rows `rows` selects, (rows,
    /// hidden): [`Self::logits`] of them is what [`Self::forward`] returns. Training takes the
    /// vocabulary projection from here a few rows at a time, so the full logits never exist.
    pub fn hidden(
        &self,
        seqs: &mut [SeqInput<'_>],
        adapter: Option<&Adapter>,
        rows: LogitsFor,
    ) -> Result<Tensor> {
        let adapters = vec![adapter; seqs.len()];
        self.hidden_mixed(seqs, &adapters, rows)
    }

    /// The vocabulary projection of final hidden states: (rows, hidden) to (rows, vocab).
    /// Frozen: the gradient flows to the hidden states only.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.matmul(hidden, Rows::Spans)?)
    }

    fn hidden_mixed(
        &self,
        seqs: &mut [SeqInput<'_>],
        adapters: &[Option<&Adapter>],
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        if adapters.len() != seqs.len() {
            return Err(Error::InvalidConfig(format!(
                "{} adapters for {} sequences",
                adapters.len(),
                seqs.len()
            )));
        }
        let track = seqs.iter().all(|s| s.cache.is_none());
        let packed = self.pack(seqs)?;
        let lora = self.lora_groups(adapters, &packed.spans, packed.rows)?;
        let mut x = self.embed_tokens.index_select(&packed.ids, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(i, layer, &x, &packed, seqs, &lora, track)?;
        }
        for s in seqs.iter_mut() {
            let n = s.tokens.len();
            if let Some(cache) = s.cache.as_deref_mut() {
                cache.advance(n);
            }
        }
        self.final_norm(&x, &packed.spans, logits_for)
    }

    /// The gradients of a loss of the final hidden states with respect to `adapter`'s
    /// weights (in [`Adapter::vars`] order). The last layers keep their graph, as many as fit
    /// in 512 MB of activations (or [`Model::set_kept_activation_bytes`]); the layers below
    /// them are recomputed one at a time (gradient checkpointing, Chen et al. 2016): the
    /// forward pass keeps only their inputs, and the backward pass rebuilds one layer's graph,
    /// backpropagates the incoming gradient through it and drops it, for one more forward
    /// pass of those layers' compute. `loss_grad` gets the
    /// final hidden states of the rows asked (detached) and returns dL/dhidden and whatever
    /// it measured on the way.
    pub fn adapter_gradients<T: Send>(
        &self,
        seqs: &mut [SeqInput<'_>],
        adapter: &Adapter,
        rows: LogitsFor,
        loss_grad: impl FnOnce(&Tensor) -> Result<(Tensor, T)> + Send,
    ) -> Result<(Vec<Option<Tensor>>, T)> {
        // On a pool thread, as `forward_mixed` runs (forward+backward of 16x128 tokens called
        // from outside the pool: 31.8-33.2 s; on it: 28.7-29.2 s).
        rayon::scope(|_| self.recomputed_gradients(seqs, adapter, rows, loss_grad))
    }

    fn recomputed_gradients<T>(
        &self,
        seqs: &mut [SeqInput<'_>],
        adapter: &Adapter,
        rows: LogitsFor,
        loss_grad: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
    ) -> Result<(Vec<Option<Tensor>>, T)> {
        if seqs.iter().any(|s| s.cache.is_some()) {
            return Err(Error::InvalidConfig(
                "gradients are taken over sequences without a cache".into(),
            ));
        }
        let packed = self.pack(seqs)?;
        let lora =
            self.lora_groups(&vec![Some(adapter); seqs.len()], &packed.spans, packed.rows)?;
        let embeddings = self.embed_tokens.index_select(&packed.ids, 0)?;
        let vars = adapter.vars();
        // Layers below `recomputed` keep only their input in the forward pass; the rest keep
        // their graph, as many as the budget holds.
        let layers = self.layers.len();
        let per_layer = self.activation_bytes(&packed) / layers.max(1);
        let kept = (self.kept_activation_bytes / per_layer.max(1)).min(layers);
        let recomputed = layers - kept;
        let mut inputs = vec![embeddings];
        for (i, layer) in self.layers.iter().enumerate().take(recomputed) {
            let x = self.layer_forward(i, layer, &inputs[i], &packed, seqs, &lora, false)?;
            inputs.push(x);
        }
        // The first kept layer's input is a variable when layers below it are recomputed:
        // they need its gradient (the embeddings, with every layer kept, are frozen).
        let mut x = inputs.pop().expect("the embeddings");
        let first_kept = if recomputed > 0 {
            let var = candle_core::Var::from_tensor(&x)?;
            x = var.as_tensor().clone();
            Some(var)
        } else {
            None
        };
        for (i, layer) in self.layers.iter().enumerate().skip(recomputed) {
            x = self.layer_forward(i, layer, &x, &packed, seqs, &lora, true)?;
        }
        let hidden = self.final_norm(&x, &packed.spans, rows)?;
        let (hidden_grad, measured) = loss_grad(&hidden.detach())?;
        let mut store = (hidden * hidden_grad)?.sum_all()?.backward()?;
        let mut grads: Vec<Option<Tensor>> =
            vars.iter().map(|v| store.remove(v.as_tensor())).collect();
        let Some(first_kept) = first_kept else {
            return Ok((grads, measured));
        };
        let mut grad = store
            .remove(first_kept.as_tensor())
            .ok_or_else(|| missing_gradient("the kept layers"))?;
        drop(store);
        for (i, layer) in self.layers.iter().enumerate().take(recomputed).rev() {
            let input = inputs.pop().expect("one input per layer");
            // The embeddings are frozen: the first layer needs no input gradient.
            let x = if i == 0 {
                None
            } else {
                Some(candle_core::Var::from_tensor(&input)?)
            };
            let x_in = x.as_ref().map_or(&input, |v| v.as_tensor());
            let y = self.layer_forward(i, layer, x_in, &packed, seqs, &lora, true)?;
            let mut store = (y * &grad)?.sum_all()?.backward()?;
            for (acc, var) in grads.iter_mut().zip(&vars) {
                if let Some(g) = store.remove(var.as_tensor()) {
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g,
                    });
                }
            }
            if let Some(x) = &x {
                grad = store
                    .remove(x.as_tensor())
                    .ok_or_else(|| missing_gradient(&format!("layer {i}")))?;
            }
        }
        Ok((grads, measured))
    }

    /// About the bytes of activations `packed` keeps for backward over all layers: per row,
    /// the norms' and projections' inputs and outputs, the MLP's three wide vectors, and the
    /// attention scores and probabilities over its sequence's keys.
    fn activation_bytes(&self, packed: &Packed) -> usize {
        let c = &self.config;
        let kv = c.num_key_value_heads * c.head_dim;
        let per_row = 6 * c.hidden_size + 2 * kv + 3 * c.intermediate_size;
        let scores: usize = packed
            .spans
            .iter()
            .map(|s| {
                let keys = s.len + s.prefix.map_or(0, |p| packed.spans[p].len);
                s.len * 2 * c.num_attention_heads * keys
            })
            .sum();
        (packed.rows * per_row + scores) * c.num_hidden_layers * self.dtype.size_in_bytes()
    }

    /// Checks the batch and lays its sequences out row-wise: token ids, positions, spans.
    fn pack(&self, seqs: &[SeqInput<'_>]) -> Result<Packed> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        // Without caches the spans attend in groups, each with its own mask.
        let grouped = seqs.iter().all(|s| s.cache.is_none());
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(Error::InvalidConfig(
                    "a sequence in the batch has no tokens".into(),
                ));
            }
            let offset = match s.prefix {
                Some(p) => {
                    let ok = p < i
                        && s.cache.is_none()
                        && seqs[p].cache.is_none()
                        && seqs[p].prefix.is_none();
                    if !ok {
                        return Err(Error::InvalidConfig(format!(
                            "sequence {i} names prefix {p}: it must be an earlier sequence, and neither may use a cache or a prefix"
                        )));
                    }
                    seqs[p].tokens.len()
                }
                None => s.cache.as_ref().map_or(0, |c| c.len()),
            };
            let end = offset + s.tokens.len();
            if end > self.rope.max_positions() {
                return Err(Error::InvalidConfig(format!(
                    "sequence of {end} positions exceeds the model's context of {}",
                    self.rope.max_positions()
                )));
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(Error::InvalidConfig(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            spans.push(Span {
                start: ids.len(),
                len: s.tokens.len(),
                prefix: s.prefix,
                mask: if grouped {
                    None
                } else {
                    self.causal_mask(s.tokens.len(), offset)?
                },
            });
            ids.extend_from_slice(s.tokens);
            positions.extend(offset as u32..end as u32);
        }
        let groups = grouped
            .then(|| self.attention_groups(&spans, ids.len()))
            .transpose()?;
        Ok(Packed {
            rows: ids.len(),
            ids: Tensor::new(ids.as_slice(), &self.device)?,
            positions: Tensor::new(positions.as_slice(), &self.device)?,
            spans,
            groups,
        })
    }

    /// Each span without a prefix, with the spans continuing it, as one group (see
    /// [`AttentionGroups`]).
    fn attention_groups(&self, spans: &[Span], total: usize) -> Result<AttentionGroups> {
        let mut groups = Vec::new();
        let mut order: Vec<u32> = Vec::with_capacity(total);
        for (root, first) in spans.iter().enumerate().filter(|(_, s)| s.prefix.is_none()) {
            let members =
                std::iter::once(first).chain(spans.iter().filter(|s| s.prefix == Some(root)));
            // Per row: its packed row, its sequence within the group (0: the root) and its
            // position.
            let (mut rows, mut segment, mut position) = (Vec::new(), Vec::new(), Vec::new());
            for (j, span) in members.enumerate() {
                let offset = if j == 0 { 0 } else { first.len };
                rows.extend(span.start as u32..(span.start + span.len) as u32);
                segment.extend(std::iter::repeat_n(j, span.len));
                position.extend(offset..offset + span.len);
            }
            let n = rows.len();
            let mask = (n > 1)
                .then(|| {
                    self.additive_mask(n, n, |q, k| {
                        (segment[k] == 0 || segment[k] == segment[q]) && position[k] <= position[q]
                    })
                })
                .transpose()?;
            let start = rows[0] as usize;
            let contiguous = rows
                .iter()
                .enumerate()
                .all(|(i, &r)| r as usize == start + i);
            let group_rows = if contiguous {
                GroupRows::Range(start, n)
            } else {
                GroupRows::Scattered(Tensor::new(rows.as_slice(), &self.device)?)
            };
            order.extend(&rows);
            groups.push(AttentionGroup {
                rows: group_rows,
                mask,
            });
        }
        let in_order = order.iter().enumerate().all(|(i, &r)| r as usize == i);
        let to_packed = if in_order {
            None
        } else {
            let mut inverse = vec![0u32; order.len()];
            for (i, &r) in order.iter().enumerate() {
                inverse[r as usize] = i as u32;
            }
            Some(Tensor::new(inverse.as_slice(), &self.device)?)
        };
        Ok(AttentionGroups { groups, to_packed })
    }

    /// The last norm over the rows `logits_for` selects from the last layer's output.
    fn final_norm(&self, x: &Tensor, spans: &[Span], logits_for: LogitsFor) -> Result<Tensor> {
        let x = match logits_for {
            LogitsFor::All => x.clone(),
            LogitsFor::Last => {
                let last: Vec<u32> = spans.iter().map(|s| (s.start + s.len - 1) as u32).collect();
                x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            }
            LogitsFor::Rows(rows) => {
                x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
            }
        };
        Ok(rms_norm(&x, &self.norm, self.config.rms_norm_eps)?)
    }

    /// The batch's distinct adapters, each with the packed rows it applies to (`None`: all
    /// rows, the common case, which needs no gather).
    fn lora_groups<'a>(
        &self,
        adapters: &[Option<&'a Adapter>],
        spans: &[Span],
        rows: usize,
    ) -> Result<Vec<LoraRows<'a>>> {
        let mut groups: Vec<(&'a Adapter, Vec<u32>)> = Vec::new();
        for (span, adapter) in spans.iter().zip(adapters) {
            let Some(adapter) = *adapter else { continue };
            let span_rows = (span.start as u32)..((span.start + span.len) as u32);
            match groups.iter_mut().find(|(a, _)| std::ptr::eq(*a, adapter)) {
                Some((_, r)) => r.extend(span_rows),
                None => groups.push((adapter, span_rows.collect())),
            }
        }
        groups
            .into_iter()
            .map(|(adapter, r)| {
                let rows = (r.len() < rows)
                    .then(|| Tensor::new(r.as_slice(), &self.device))
                    .transpose()?;
                Ok(LoraRows { adapter, rows })
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        packed: &Packed,
        seqs: &mut [SeqInput<'_>],
        lora: &[LoraRows<'_>],
        track: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (positions, spans) = (&packed.positions, packed.spans.as_slice());
        let one_token_each = spans.iter().all(|s| s.len == 1);
        let rows = if one_token_each {
            Rows::PerSequence
        } else {
            Rows::Spans
        };
        let proj = |lin: &Linear, p: Projection, h: &Tensor| -> candle_core::Result<Tensor> {
            // The common case, one adapter over every row, takes one fused op.
            if let [LoraRows {
                adapter,
                rows: None,
            }] = lora
            {
                let update = adapter.low_rank(index, p, track);
                return lin.forward_low_rank(h, update.as_ref(), rows);
            }
            let mut y = lin.forward(h, rows)?;
            for group in lora {
                let Some(update) = group.adapter.low_rank(index, p, track) else {
                    continue;
                };
                y = match &group.rows {
                    None => (y + update.delta(h)?)?,
                    Some(rows) => {
                        y.index_add(rows, &update.delta(&h.index_select(rows, 0)?)?, 0)?
                    }
                };
            }
            Ok(y)
        };
        let t = x.dim(0)?;
        let h = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
        let q = proj(&layer.q_proj, Projection::Q, &h)?.reshape((
            t,
            c.num_attention_heads,
            c.head_dim,
        ))?;
        let k = proj(&layer.k_proj, Projection::K, &h)?.reshape((
            t,
            c.num_key_value_heads,
            c.head_dim,
        ))?;
        let v = proj(&layer.v_proj, Projection::V, &h)?.reshape((
            t,
            c.num_key_value_heads,
            c.head_dim,
        ))?;
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (
                rms_norm(&q, qn, c.rms_norm_eps)?,
                rms_norm(&k, kn, c.rms_norm_eps)?,
            ),
            _ => (q, k),
        };
        let q = self.rope.apply(&q, positions)?;
        let k = self.rope.apply(&k, positions)?;

        let single_token_decode = self.device.is_cpu()
            && self.dtype == DType::F32
            && one_token_each
            && seqs.iter().all(|s| s.cache.is_some());
        let attn = if single_token_decode {
            self.decode_attention_cpu(index, &q, &k, &v, seqs)?
        } else if let Some(groups) = &packed.groups {
            self.grouped_attention(&q, &k, &v, groups)?
        } else {
            self.spans_attention(index, &q, &k, &v, spans, seqs)?
        };
        let x = (x + proj(&layer.o_proj, Projection::O, &attn)?)?;

        let h = rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
        let gate = proj(&layer.gate_proj, Projection::Gate, &h)?;
        let up = proj(&layer.up_proj, Projection::Up, &h)?;
        let mlp = proj(&layer.down_proj, Projection::Down, &silu_mul(&gate, &up)?)?;
        Ok((x + mlp)?)
    }

    /// Attention sequence by sequence: each appends to its cache, or attends after its
    /// prefix, or stands alone. Returns (rows, heads * d) in packed order.
    fn spans_attention(
        &self,
        index: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spans: &[Span],
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(spans.len());
        for (span, seq) in spans.iter().zip(seqs.iter_mut()) {
            let qi = q.narrow(0, span.start, span.len)?.transpose(0, 1)?;
            let ki = k.narrow(0, span.start, span.len)?.transpose(0, 1)?;
            let vi = v.narrow(0, span.start, span.len)?.transpose(0, 1)?;
            let (ki, vi) = match (seq.cache.as_deref_mut(), span.prefix) {
                (Some(cache), _) => cache.append(index, &ki, &vi)?,
                (None, Some(p)) => {
                    let shared = &spans[p];
                    let kp = k.narrow(0, shared.start, shared.len)?.transpose(0, 1)?;
                    let vp = v.narrow(0, shared.start, shared.len)?.transpose(0, 1)?;
                    (Tensor::cat(&[&kp, &ki], 1)?, Tensor::cat(&[&vp, &vi], 1)?)
                }
                (None, None) => (ki, vi),
            };
            outs.push(self.attention(&qi, &ki, &vi, span.mask.as_ref())?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Attention of a batch without caches, group by group (see [`AttentionGroups`]).
    /// Returns (rows, heads * d) in packed order.
    fn grouped_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        groups: &AttentionGroups,
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(groups.groups.len());
        for group in &groups.groups {
            let pick = |t: &Tensor| group.rows.of(t)?.transpose(0, 1);
            outs.push(self.attention(&pick(q)?, &pick(k)?, &pick(v)?, group.mask.as_ref())?);
        }
        let out = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 0)?,
        };
        Ok(match &groups.to_packed {
            Some(rows) => out.index_select(rows, 0)?,
            None => out,
        })
    }

    /// Attention of one new token per sequence, on the CPU in f32, written out by hand: with
    /// tensor ops each sequence costs ~20 tiny ops per layer, whose fixed overhead dominated
    /// batched decoding. Keys and values are appended to each cache, then read in place,
    /// each (sequence, head) pair a task on the pool once its keys are worth one.
    /// `q`: (seqs, heads, d); `k`, `v`: (seqs, kv_heads, d). Returns (seqs, heads * d).
    fn decode_attention_cpu(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, heads, d) = q.dims3()?;
        let groups = c.kv_groups();
        let scale = 1.0 / (d as f32).sqrt();
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        for (i, seq) in seqs.iter_mut().enumerate() {
            let cache = seq.cache.as_deref_mut().expect("checked by the caller");
            let ki = k.narrow(0, i, 1)?.transpose(0, 1)?;
            let vi = v.narrow(0, i, 1)?.transpose(0, 1)?;
            cache.append(layer, &ki, &vi)?;
        }
        // Every sequence's keys and values, read-only from here: buffers, capacity, positions.
        let buffers = seqs
            .iter()
            .map(|seq| {
                let cache = seq.cache.as_deref().expect("checked by the caller");
                let (k, v) = cache.buffers(layer).expect("appended just above");
                Ok((k.clone(), v.clone(), k.dim(1)?, cache.len() + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = buffers
            .iter()
            .map(|(k, v, ..)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let caches = guards
            .iter()
            .zip(&buffers)
            .map(|(((ks, kl), (vs, vl)), &(.., capacity, keys))| {
                let (candle_core::Storage::Cpu(ks), candle_core::Storage::Cpu(vs)) = (&**ks, &**vs)
                else {
                    unreachable!("single-token decode runs on the CPU only")
                };
                let kd = &ks.as_slice::<f32>()?[kl.start_offset()..];
                let vd = &vs.as_slice::<f32>()?[vl.start_offset()..];
                Ok((kd, vd, capacity, keys))
            })
            .collect::<Result<Vec<_>>>()?;
        // A task per (sequence, head) once a head's keys pay for a thread, fewer before.
        let longest = caches.iter().map(|&(.., keys)| keys).max().unwrap_or(1);
        let min_len = ATTENTION_MULS_PER_TASK.div_ceil(2 * longest * d).max(1);
        let mut out = vec![0f32; b * heads * d];
        out.par_chunks_mut(d)
            .with_min_len(min_len)
            .enumerate()
            .for_each(|(at, oh)| {
                let (i, h) = (at / heads, at % heads);
                let (kd, vd, capacity, keys) = caches[i];
                let base = h / groups * capacity * d;
                let qh = &q[at * d..][..d];
                let mut scores: Vec<f32> = (0..keys)
                    .map(|t| dot(qh, &kd[base + t * d..][..d]) * scale)
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for s in scores.iter_mut() {
                    *s = exp_nonpositive(*s - max);
                }
                let sum = lane_sum(&scores);
                for (t, p) in scores.iter().enumerate() {
                    let vt = &vd[base + t * d..][..d];
                    let w = p / sum;
                    for (o, x) in oh.iter_mut().zip(vt) {
                        *o += w * x;
                    }
                }
            });
        Ok(Tensor::from_vec(out, (b, heads * d), &self.device)?)
    }

    /// 0 where query row r (at position offset + r) may see key column c, -inf after it.
    fn causal_mask(&self, n: usize, offset: usize) -> Result<Option<Tensor>> {
        if n == 1 {
            return Ok(None);
        }
        Ok(Some(self.additive_mask(n, offset + n, |row, col| {
            col <= offset + row
        })?))
    }

    /// An attention mask over (rows, keys) to add to the scores: 0 where `sees(row, key)`,
    /// -inf elsewhere, in the model's dtype.
    fn additive_mask(
        &self,
        rows: usize,
        keys: usize,
        sees: impl Fn(usize, usize) -> bool,
    ) -> Result<Tensor> {
        let sees = &sees;
        let mask: Vec<f32> = (0..rows)
            .flat_map(|row| {
                (0..keys).map(move |key| {
                    if sees(row, key) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Ok(Tensor::from_vec(mask, (rows, keys), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Causal attention of one sequence. `q`: (heads, n, d) for positions offset..offset+n;
    /// `k`, `v`: (kv_heads, offset + n, d). Returns (n, heads * d).
    ///
    /// Grouped queries are folded into the row dimension, (kv_heads, groups * n, d), so the
    /// keys are never copied per group.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (heads, n, d) = q.dims3()?;
        let kv_heads = c.num_key_value_heads;
        let groups = c.kv_groups();
        let keys = k.dim(1)?;
        let q = q.contiguous()?.reshape((kv_heads, groups * n, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = match mask {
            Some(mask) => scores
                .reshape((kv_heads, groups, n, keys))?
                .broadcast_add(mask)?
                .reshape((kv_heads, groups * n, keys))?,
            None => scores,
        };
        // Softmax in f32 (or f64) as HF does, then back to the model dtype.
        let compute = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let probs = softmax_rows(&scores.to_dtype(compute)?)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v.contiguous()?)?;
        Ok(out
            .reshape((heads, n, d))?
            .transpose(0, 1)?
            .reshape((n, heads * d))?)
    }
}

/// Multiply-adds of decode attention per parallel task: a task is one sequence's head, or a
/// run of them while contexts are short.
const ATTENTION_MULS_PER_TASK: usize = 32 * 1024;
