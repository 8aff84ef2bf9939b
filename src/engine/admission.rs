//! Admission: the queue in front of the decode batch and the budgets that guard it. A queued
//! job holds a [`QueueSlot`] that gives its place back when dropped, on every path (admitted,
//! cancelled, failed, aborted), so the waiting count cannot leak.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::job::{EngineError, Event, GenerateJob};
use super::registry::is_ephemeral;
use super::scheduler::Scheduler;
use super::stream::Active;
use crate::generation::Sequence;
use crate::telemetry as m;

/// What the handle reads without asking the loop: the queue length, how long requests take
/// (for `Retry-After`), and whether the engine thread is alive.
#[derive(Debug)]
pub struct Load {
    pub waiting: AtomicUsize,
    /// Moving average of request latency, milliseconds.
    pub request_ms: AtomicU64,
    pub alive: AtomicBool,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            request_ms: AtomicU64::new(1000),
            alive: AtomicBool::new(true),
        }
    }
}

impl Load {
    /// Takes a place in the queue, or says how many are waiting when it is full.
    pub fn enter(self: &Arc<Self>, max_waiting: usize) -> Result<QueueSlot, usize> {
        let waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let slot = QueueSlot(self.clone());
        if waiting >= max_waiting {
            return Err(waiting);
        }
        Ok(slot)
    }

    /// Seconds until a place is likely free: the queue ahead, `max_batch` at a time, each
    /// round as long as a recent request.
    pub fn retry_after_seconds(&self, max_batch: usize) -> u64 {
        let waiting = self.waiting.load(Ordering::SeqCst) as u64;
        let rounds = waiting.div_ceil(max_batch.max(1) as u64).max(1);
        (rounds * self.request_ms.load(Ordering::Relaxed))
            .div_ceil(1000)
            .clamp(1, 600)
    }

    /// Folds one finished request's latency into the average (weight 1/8).
    pub fn record_request(&self, ms: u64) {
        let old = self.request_ms.load(Ordering::Relaxed);
        self.request_ms.store((old * 7 + ms) / 8, Ordering::Relaxed);
    }
}

/// A place in the queue; dropping it gives the place back.
#[derive(Debug)]
pub struct QueueSlot(Arc<Load>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A job with its place in the queue (given back when the job is admitted or dropped).
pub struct Queued {
    pub job: GenerateJob,
    pub _slot: QueueSlot,
}

impl Queued {
    pub fn is_cancelled(&self) -> bool {
        self.job.events.is_closed()
    }

    pub fn fail(self, error: EngineError) {
        let _ = self.job.events.send(Event::Error(error));
    }
}

impl Scheduler {
    pub(super) fn running_seqs(&self) -> usize {
        self.running
            .iter()
            .map(|a| a.seqs.iter().filter(|s| !s.is_finished()).count())
            .sum()
    }

    /// KV-cache positions a job's unfinished sequences may grow to (prompt + max_tokens each).
    fn kv_reservation(job: &GenerateJob, sequences: usize) -> usize {
        sequences * (job.prompt.len() + job.rules.max_tokens)
    }

    /// Positions held by running sequences and by the episode in flight (its rollouts).
    fn kv_reserved(&self) -> usize {
        let serving: usize = self
            .running
            .iter()
            .map(|a| {
                Self::kv_reservation(&a.job, a.seqs.iter().filter(|s| !s.is_finished()).count())
            })
            .sum();
        serving + self.episode_kv_reserved()
    }

    /// Moves queued jobs into the batch while their sequences fit the batch and the
    /// KV-cache budget.
    pub(super) fn admit(&mut self) {
        while let Some(queued) = self.waiting.front() {
            let job = &queued.job;
            let busy = self.running_seqs();
            if busy > 0 && busy + job.n > self.max_batch {
                break;
            }
            let needed = Self::kv_reservation(job, job.n);
            let reserved = self.kv_reserved();
            let over_budget = self
                .kv_cache_positions
                .is_some_and(|budget| reserved + needed > budget);
            if reserved > 0 && over_budget {
                break;
            }
            let queued = self.waiting.pop_front().expect("front() was Some");
            if queued.is_cancelled() {
                continue;
            }
            if over_budget {
                let budget = self.kv_cache_positions.unwrap_or_default();
                queued.fail(EngineError::Invalid(format!(
                    "the request needs {needed} KV-cache positions (n x (prompt + max_tokens)); \
                     the budget holds {budget} (engine.kv_cache_bytes)"
                )));
                continue;
            }
            if let Some(name) = queued.job.adapter.clone() {
                // Loads it if it is only in the store (or newer there), before asking.
                let in_use = adapters_in_use(&self.running);
                if let Err(e) = self.adapters.make_resident(&name, &self.model, &in_use) {
                    queued.fail(e);
                    continue;
                }
                if !self.adapters.contains(&name) {
                    queued.fail(EngineError::AdapterNotFound(name));
                    continue;
                }
            }
            metrics::counter!(m::PROMPT_TOKENS, "model" => self.model_label.clone())
                .increment((queued.job.prompt.len() * queued.job.n) as u64);
            let fault = self.faults.for_prompt(&self.tokenizer, &queued.job.prompt);
            let mut active = Active::new(queued, &self.model);
            active.fault = fault;
            self.reuse_cached_prompt(&mut active);
            self.running.push(active);
        }
    }

    /// The version of the weights `adapter` (or the base model) answers with now.
    fn weights_version(&self, adapter: Option<&str>) -> u64 {
        adapter
            .and_then(|k| self.adapters.version_of(k))
            .unwrap_or(0)
    }

    /// Starts a new job's sequences from the prompt cache's longest match, if any, and has
    /// its first sequence keep what the cache needs. Ephemeral adapters live for one batch:
    /// their prompts are not cached.
    fn reuse_cached_prompt(&mut self, active: &mut Active) {
        let job = &active.job;
        let adapter = job.adapter.as_deref();
        if adapter.is_some_and(is_ephemeral) {
            return;
        }
        let version = self.weights_version(adapter);
        metrics::counter!(m::PREFIX_CACHE_QUERIES, "model" => self.model_label.clone())
            .increment((job.prompt.len() * job.n) as u64);
        let hit = self.prompt_cache.lookup(adapter, version, &job.prompt);
        if let Some(first) = active.seqs.first_mut() {
            first.keep_prompt_logits();
        }
        let Some((cache, logits)) = hit else {
            return;
        };
        metrics::counter!(m::PREFIX_CACHE_HITS, "model" => self.model_label.clone())
            .increment((cache.len() * active.job.n) as u64);
        // The looked-up copy goes to the last sequence; the others get copies of it.
        let Some((last, others)) = active.seqs.split_last_mut() else {
            return;
        };
        for seq in others {
            match cache.fork(cache.len()) {
                Ok(copy) => seq.reuse_prompt_prefix(copy, logits.clone()),
                Err(e) => tracing::warn!("prompt cache copy failed, prefilling instead: {e}"),
            }
        }
        last.reuse_prompt_prefix(cache, logits);
    }

    /// Remembers the prompts prefilled by the last step (each job's first sequence keeps its
    /// prompt's logits when it samples its first token) for later requests.
    pub(super) fn remember_prompts(&mut self) {
        for i in 0..self.running.len() {
            let Some(logits) = self.running[i]
                .seqs
                .first_mut()
                .and_then(Sequence::take_prompt_logits)
            else {
                continue;
            };
            let a = &self.running[i];
            let adapter = a.job.adapter.as_deref();
            let version = self.weights_version(adapter);
            self.prompt_cache
                .insert(adapter, version, &a.job.prompt, a.seqs[0].cache(), logits);
        }
    }

    /// Frees the sequences and queue places of jobs whose client went away.
    pub(super) fn drop_cancelled(&mut self) {
        self.running.retain(|a| !a.job.events.is_closed());
        self.waiting.retain(|q| !q.is_cancelled());
        self.drop_cancelled_adaptation();
    }

    pub(super) fn publish_load(&self) {
        let kv_bytes: usize = self
            .running
            .iter()
            .flat_map(|a| a.seqs.iter().map(Sequence::cache_bytes))
            .sum();
        let device = crate::model::memory::device_label(self.model.device());
        metrics::gauge!(m::GPU_MEMORY, "kind" => "kv_cache", "device" => device.clone())
            .set(kv_bytes as f64);
        metrics::gauge!(m::GPU_MEMORY, "kind" => "prompt_cache", "device" => device)
            .set(self.prompt_cache.bytes() as f64);
        metrics::gauge!(m::REQUESTS_RUNNING, "model" => self.model_label.clone())
            .set(self.running.len() as f64);
        metrics::gauge!(m::REQUESTS_WAITING, "model" => self.model_label.clone())
            .set(self.load.waiting.load(Ordering::SeqCst) as f64);
    }
}

/// The adapters running jobs decode with: none of them may leave memory.
pub(super) fn adapters_in_use(running: &[Active]) -> Vec<&str> {
    running
        .iter()
        .filter_map(|a| a.job.adapter.as_deref())
        .collect()
}
