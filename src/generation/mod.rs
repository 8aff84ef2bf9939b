//! Generation: a sequence (prompt, KV cache, sampler, stop rules) and the batched decode
//! step shared by serving and rollouts. Every live sequence advances by one
//! token per step, all in one forward pass; a new sequence's prompt is prefilled in the same
//! pass. Forking starts a branch from a copy of the parent's KV prefix.

use std::sync::Arc;

use candle_core::DType;
use rayon::prelude::*;

use crate::error::Result;
use crate::interrupt::Interrupt;
use crate::model::{
    Adapter, IncrementalDecoder, KvCache, LogitsFor, Model, SeqInput, TextTokenizer,
};
use crate::sampling::{SampledToken, Sampler};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    /// Cancelled by the client or by shutdown.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// When a sequence ends.
#[derive(Debug, Clone, Default)]
pub struct StopRules {
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Sequence {
    prompt_len: usize,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    /// Tokens the cache has not seen yet (the prompt, then the last sampled token).
    pending: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    rules: StopRules,
    top_logprobs: usize,
    /// Per generated token: id, log-prob, entropy, top alternatives.
    generated: Vec<SampledToken>,
    decoder: IncrementalDecoder,
    text: String,
    finish: Option<FinishReason>,
    /// Logits of the next token, known without a forward pass (a prompt cache's whole-prompt
    /// hit); `pending` is then empty.
    ready_logits: Option<Arc<Vec<f32>>>,
    /// Keep the logits of the prompt's last position for the prompt cache
    /// ([`Sequence::take_prompt_logits`]).
    keep_prompt_logits: bool,
    prompt_logits: Option<Arc<Vec<f32>>>,
}

impl Sequence {
    pub fn new(
        model: &Model,
        prompt: Vec<u32>,
        sampler: Sampler,
        rules: StopRules,
        top_logprobs: usize,
    ) -> Self {
        Self {
            prompt_len: prompt.len(),
            pending: prompt.clone(),
            tokens: prompt,
            cache: model.new_cache(),
            sampler,
            rules,
            top_logprobs,
            generated: Vec::new(),
            decoder: IncrementalDecoder::default(),
            text: String::new(),
            finish: None,
            ready_logits: None,
            keep_prompt_logits: false,
            prompt_logits: None,
        }
    }

    /// Starts from `cache`, another sequence's keys and values for the first `cache.len()`
    /// prompt tokens under the same weights, instead of prefilling them. Before the first step
    /// only. With the whole prompt cached, `logits` (that sequence's logits at the prompt's
    /// last position) give the first token without a forward pass, so the answer has the
    /// bits the prompt's first run had.
    pub fn reuse_prompt_prefix(&mut self, cache: KvCache, logits: Option<Arc<Vec<f32>>>) {
        assert!(self.generated.is_empty() && self.cache.is_empty());
        let whole = cache.len() == self.prompt_len;
        assert!(whole == logits.is_some() && cache.len() <= self.prompt_len);
        self.pending = self.tokens[cache.len()..].to_vec();
        self.cache = cache;
        self.ready_logits = logits;
    }

    /// Keeps the logits of the prompt's last position when the first step computes them.
    pub fn keep_prompt_logits(&mut self) {
        self.keep_prompt_logits = true;
    }

    /// The logits after the prompt, once the first token has been sampled (see
    /// [`Sequence::keep_prompt_logits`]), for later sequences with the same prompt.
    pub fn take_prompt_logits(&mut self) -> Option<Arc<Vec<f32>>> {
        self.prompt_logits.take()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn generated(&self) -> &[SampledToken] {
        &self.generated
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Bytes of this sequence's KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    pub fn abort(&mut self) {
        self.finish.get_or_insert(FinishReason::Abort);
    }

    /// Drops the KV cache; the next step recomputes it. Called when the weights this
    /// sequence decodes with change: a cache never outlives its weight version.
    pub fn reset_cache(&mut self, model: &Model) {
        self.cache = model.new_cache();
        self.pending = self.tokens.clone();
    }

    /// A branch that keeps the first `at` generated tokens and draws token `at` afresh with
    /// its own sampler from the unmodified policy (it may repeat the parent's token: excluding
    /// it would bias the vote whenever the fork falls on the answer). The prefix is copied from the
    /// parent's cache, not recomputed; only the last prefix token is fed again to get the
    /// logits at the fork.
    pub fn fork(&self, at: usize, sampler: Sampler, tok: &TextTokenizer) -> Result<Sequence> {
        let at = at.min(self.generated.len());
        let keep = self.prompt_len + at;
        let cached = (keep - 1).min(self.cache.len());
        let mut decoder = IncrementalDecoder::default();
        let mut text = String::new();
        for t in &self.generated[..at] {
            text.push_str(&decoder.push(tok, t.id)?);
        }
        Ok(Sequence {
            prompt_len: self.prompt_len,
            tokens: self.tokens[..keep].to_vec(),
            pending: self.tokens[cached..keep].to_vec(),
            cache: self.cache.fork(cached)?,
            sampler,
            rules: self.rules.clone(),
            top_logprobs: self.top_logprobs,
            generated: self.generated[..at].to_vec(),
            decoder,
            text,
            finish: None,
            ready_logits: None,
            keep_prompt_logits: false,
            prompt_logits: None,
        })
    }

    fn accept(
        &mut self,
        token: SampledToken,
        tok: &TextTokenizer,
        max_context: usize,
    ) -> Result<()> {
        let id = token.id;
        self.tokens.push(id);
        self.pending = vec![id];
        self.generated.push(token);
        if self.rules.stop_ids.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        self.text.push_str(&self.decoder.push(tok, id)?);
        if let Some(cut) = self
            .rules
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::Stop);
        } else if self.generated.len() >= self.rules.max_tokens || self.tokens.len() >= max_context
        {
            self.finish = Some(FinishReason::Length);
        }
        Ok(())
    }
}

/// Advances every unfinished sequence by one token in one batched forward pass.
pub fn decode_step(
    model: &Model,
    tok: &TextTokenizer,
    seqs: &mut [&mut Sequence],
    adapter: Option<&Adapter>,
) -> Result<()> {
    let adapters = vec![adapter; seqs.len()];
    decode_step_mixed(model, tok, seqs, &adapters)
}

/// [`decode_step`] with an adapter (or none) per sequence, still one forward pass.
pub fn decode_step_mixed(
    model: &Model,
    tok: &TextTokenizer,
    seqs: &mut [&mut Sequence],
    adapters: &[Option<&Adapter>],
) -> Result<()> {
    let (mut live, adapters): (Vec<&mut Sequence>, Vec<Option<&Adapter>>) = seqs
        .iter_mut()
        .zip(adapters)
        .filter(|(s, _)| !s.is_finished())
        .map(|(s, a)| (&mut **s, *a))
        .unzip();
    if live.is_empty() {
        return Ok(());
    }
    // Sequences whose next logits are known already (a whole prompt from the prompt cache)
    // take no part in the forward pass.
    let mut rows: Vec<Option<Arc<Vec<f32>>>> =
        live.iter_mut().map(|s| s.ready_logits.take()).collect();
    if rows.iter().any(Option::is_none) {
        let logits = {
            let (mut inputs, adapters): (Vec<SeqInput<'_>>, Vec<Option<&Adapter>>) = live
                .iter_mut()
                .zip(&adapters)
                .zip(&rows)
                .filter(|(_, row)| row.is_none())
                .map(|((s, a), _)| (SeqInput::cached(&s.pending, &mut s.cache), *a))
                .unzip();
            model.forward_mixed(&mut inputs, &adapters, LogitsFor::Last)?
        };
        let mut computed = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?.into_iter();
        for row in rows.iter_mut().filter(|row| row.is_none()) {
            *row = computed.next().map(Arc::new);
        }
    }
    let rows: Vec<Arc<Vec<f32>>> = rows.into_iter().flatten().collect();
    let max_context = model.config().max_position_embeddings;
    // Each sequence draws from its own RNG, so sampling the rows in parallel changes nothing
    // but the time (a full-vocabulary softmax per row).
    let tokens: Vec<SampledToken> = live
        .par_iter_mut()
        .zip(&rows)
        .map(|(seq, row)| seq.sampler.sample(row, seq.top_logprobs))
        .collect();
    for (seq, row) in live.iter_mut().zip(rows) {
        if seq.keep_prompt_logits && seq.generated.is_empty() {
            seq.prompt_logits = Some(row);
        }
    }
    for (seq, token) in live.iter_mut().zip(tokens) {
        seq.accept(token, tok, max_context)?;
    }
    Ok(())
}

/// Decodes every sequence, all in one batch, until each has finished.
pub fn run_to_end(
    model: &Model,
    tok: &TextTokenizer,
    seqs: &mut [Sequence],
    adapter: Option<&Adapter>,
) -> Result<()> {
    run_to_end_bounded(model, tok, seqs, adapter, usize::MAX, &Interrupt::never()).map(|_| ())
}

/// Decodes every sequence until each has finished, at most `max_batch` at a time (a finished
/// one makes room for the next, as in continuous batching), checking `interrupt` before each
/// step. Returns the widest batch decoded.
pub fn run_to_end_bounded(
    model: &Model,
    tok: &TextTokenizer,
    seqs: &mut [Sequence],
    adapter: Option<&Adapter>,
    max_batch: usize,
    interrupt: &Interrupt,
) -> Result<usize> {
    let max_batch = max_batch.max(1);
    // Sequences start in order, so the batch is always the unfinished ones before `next`.
    let mut next = 0;
    let mut widest = 0;
    loop {
        let mut live = seqs[..next].iter().filter(|s| !s.is_finished()).count();
        while live < max_batch && next < seqs.len() {
            live += usize::from(!seqs[next].is_finished());
            next += 1;
        }
        if live == 0 {
            return Ok(widest);
        }
        interrupt.check()?;
        widest = widest.max(live);
        let mut batch: Vec<&mut Sequence> = seqs[..next].iter_mut().collect();
        decode_step(model, tok, &mut batch, adapter)?;
    }
}
