//! The engine loop: the only owner of the model and its adapters. Between decode steps it
//! admits queued jobs (continuous batching), runs adaptation episodes for batches whose
//! window has closed, and frees the sequences of jobs whose client left. Each step advances
//! every running sequence by one token, one forward per adapter in use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::job::{AdaptRequest, AdaptationReport, Event, GenerateJob, TreeLeaf};
use super::EngineConfig;
use crate::adapt::store::AdapterStore;
use crate::adapt::{run_episode, AdaptConfig, EpisodeReport, Learner};
use crate::generation::{decode_step, FinishReason, Sequence};
use crate::model::lora::lora_dtype;
use crate::model::memory::device_label;
use crate::model::{Adapter, Model, TextTokenizer};
use crate::sampling::Sampler;
use crate::telemetry as m;

pub enum Command {
    Generate(Box<GenerateJob>),
    Admin(AdminCommand),
    /// Finish what is in flight within `grace`, abort the rest, then stop.
    Shutdown {
        grace: Duration,
    },
}

/// Adapter management, each with its reply channel.
pub enum AdminCommand {
    List(tokio::sync::oneshot::Sender<Vec<AdapterInfo>>),
    /// Back to a fresh adapter (version 0), saved.
    Reset(
        String,
        tokio::sync::oneshot::Sender<crate::Result<AdapterInfo>>,
    ),
    /// Saves the adapter and returns the folder holding its PEFT files.
    Export(
        String,
        tokio::sync::oneshot::Sender<crate::Result<std::path::PathBuf>>,
    ),
    /// Loads PEFT files from a folder as the named adapter (version 0), saved.
    Import(
        String,
        std::path::PathBuf,
        tokio::sync::oneshot::Sender<crate::Result<AdapterInfo>>,
    ),
}

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub version: u64,
}

/// The queue length, shared with the handle so it can refuse work without asking the loop.
#[derive(Debug, Default)]
pub struct Load {
    pub waiting: AtomicUsize,
}

/// A job being decoded: its sequences and what has been sent of each.
struct Active {
    job: GenerateJob,
    seqs: Vec<Sequence>,
    /// Bytes of each sequence's text already sent.
    sent_text: Vec<usize>,
    /// Tokens of each sequence already sent.
    sent_tokens: Vec<usize>,
    last_token_at: Vec<Option<Instant>>,
    first_token_seen: bool,
    /// Whether each choice's finish has been reported.
    reported: Vec<bool>,
    /// Longest stop string minus one: text that may still turn into a stop is held back.
    holdback: usize,
}

impl Active {
    fn new(job: GenerateJob, model: &Model) -> Self {
        let seqs: Vec<Sequence> = (0..job.n)
            .map(|i| {
                let sampler = Sampler::new(job.sampling, job.seed.wrapping_add(i as u64));
                Sequence::new(
                    model,
                    job.prompt.clone(),
                    sampler,
                    job.rules.clone(),
                    job.top_logprobs,
                )
            })
            .collect();
        let holdback = job
            .rules
            .stop_strings
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        Self {
            sent_text: vec![0; job.n],
            sent_tokens: vec![0; job.n],
            last_token_at: vec![None; job.n],
            first_token_seen: false,
            reported: vec![false; job.n],
            holdback,
            seqs,
            job,
        }
    }

    fn is_done(&self) -> bool {
        self.seqs.iter().all(Sequence::is_finished)
    }

    /// Sends every new token (and released text) since the last step.
    fn emit(&mut self, model_label: &str) {
        let now = Instant::now();
        for (i, seq) in self.seqs.iter().enumerate() {
            let generated = seq.generated();
            let new_tokens = generated.len() - self.sent_tokens[i];
            metrics::counter!(m::GENERATION_TOKENS, "model" => model_label.to_string())
                .increment(new_tokens as u64);
            for tok in &generated[self.sent_tokens[i]..] {
                if !self.first_token_seen {
                    self.first_token_seen = true;
                    metrics::histogram!(m::TIME_TO_FIRST_TOKEN, "model" => model_label.to_string())
                        .record(now.duration_since(self.job.arrived).as_secs_f64());
                }
                if let Some(prev) = self.last_token_at[i] {
                    metrics::histogram!(m::INTER_TOKEN_LATENCY, "model" => model_label.to_string())
                        .record(now.duration_since(prev).as_secs_f64());
                }
                self.last_token_at[i] = Some(now);
                let text = releasable(
                    seq.text(),
                    self.sent_text[i],
                    self.holdback,
                    seq.is_finished(),
                );
                self.sent_text[i] += text.len();
                let _ = self.job.events.send(Event::Token {
                    index: i,
                    token: tok.clone(),
                    text,
                });
            }
            self.sent_tokens[i] = generated.len();
            if let Some(reason) = seq.finish_reason().filter(|_| !self.reported[i]) {
                let text = seq
                    .text()
                    .get(self.sent_text[i]..)
                    .unwrap_or_default()
                    .to_string();
                let _ = self.job.events.send(Event::Finished {
                    index: i,
                    reason,
                    text,
                    completion_tokens: generated.len(),
                });
                self.reported[i] = true;
            }
        }
    }
}

/// The part of `text` after `sent` that can be sent now: all of it once the sequence is
/// finished (stop strings are already cut off), otherwise all but the last `holdback`
/// bytes, which may still become a stop string (kept back on a char boundary).
fn releasable(text: &str, sent: usize, holdback: usize, finished: bool) -> String {
    let mut end = if finished {
        text.len()
    } else {
        text.len().saturating_sub(holdback)
    };
    while end > sent && !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(sent..end.max(sent))
        .unwrap_or_default()
        .to_string()
}

/// Adaptation requests collecting for one batch.
struct PendingBatch {
    key: String,
    opened: Instant,
    jobs: Vec<GenerateJob>,
}

pub struct Scheduler {
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    model_label: String,
    max_batch: usize,
    kv_cache_positions: Option<usize>,
    load: Arc<Load>,
    waiting: VecDeque<GenerateJob>,
    running: Vec<Active>,
    pending: Vec<PendingBatch>,
    /// Named adapters, and ephemeral ones while their batch is being answered.
    learners: HashMap<String, Learner>,
    store: Option<Box<dyn AdapterStore>>,
    defaults: AdaptConfig,
    episodes: u64,
    /// Highest memory use above an episode's start, over all episodes.
    adaptation_peak: u64,
}

/// Ephemeral adapters live under names no request can spell.
const EPHEMERAL_PREFIX: &str = "~ephemeral-";

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        model_label: String,
        config: EngineConfig,
        load: Arc<Load>,
        store: Option<Box<dyn AdapterStore>>,
        defaults: AdaptConfig,
    ) -> Self {
        let mut learners = HashMap::new();
        if let Some(store) = &store {
            match store.load_all(model.config(), lora_dtype(model.dtype()), model.device()) {
                Ok(stored) => {
                    for s in stored {
                        tracing::info!("loaded adapter `{}` version {}", s.name, s.version);
                        metrics::gauge!(m::ADAPTER_VERSION, "model" => model_label.clone(), "adapter" => s.name.clone()).set(s.version as f64);
                        match Learner::new(s.adapter, &defaults, s.version) {
                            Ok(l) => {
                                learners.insert(s.name, l);
                            }
                            Err(e) => tracing::error!("adapter `{}`: {e}", s.name),
                        }
                    }
                }
                Err(e) => tracing::error!("loading adapters: {e}"),
            }
        }
        metrics::gauge!(m::GPU_MEMORY, "kind" => "weights", "device" => device_label(model.device()))
            .set(model.weight_bytes() as f64);
        Self {
            model,
            tokenizer,
            model_label,
            max_batch: config.max_batch.max(1),
            kv_cache_positions: config.kv_cache_positions,
            load,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending: Vec::new(),
            learners,
            store,
            defaults,
            episodes: 0,
            adaptation_peak: 0,
        }
    }

    /// Runs until the command channel closes or a shutdown's grace period ends.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut deadline: Option<Instant> = None;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if deadline.is_some() && self.pending.is_empty() {
                    break;
                }
                // Idle: sleep until a command arrives or the oldest adaptation window closes.
                let received = match self.next_window_close() {
                    Some(at) => commands.recv_timeout(at.saturating_duration_since(Instant::now())),
                    None => commands
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match received {
                    Ok(cmd) => self.accept(cmd, &mut deadline),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(cmd) = commands.try_recv() {
                self.accept(cmd, &mut deadline);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            self.drop_cancelled();
            self.run_due_batches(deadline.is_some());
            self.admit();
            self.step();
            self.publish_load();
        }
        self.abort_all();
    }

    fn accept(&mut self, cmd: Command, deadline: &mut Option<Instant>) {
        match cmd {
            Command::Generate(job) if deadline.is_some() => {
                let job = *job;
                let _ = job
                    .events
                    .send(Event::Error("the server is shutting down".into()));
                self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            Command::Generate(job) => match job.adaptation.as_ref().map(|r| r.batch_key()) {
                Some(key) => {
                    let job = *job;
                    match self.pending.iter_mut().find(|b| b.key == key) {
                        Some(batch) => batch.jobs.push(job),
                        None => self.pending.push(PendingBatch {
                            key,
                            opened: Instant::now(),
                            jobs: vec![job],
                        }),
                    }
                }
                None => self.waiting.push_back(*job),
            },
            Command::Admin(cmd) => self.admin(cmd),
            Command::Shutdown { grace } => *deadline = Some(Instant::now() + grace),
        }
    }

    fn next_window_close(&self) -> Option<Instant> {
        self.pending.iter().map(|b| b.opened + self.window(b)).min()
    }

    fn window(&self, batch: &PendingBatch) -> Duration {
        let ms = batch
            .jobs
            .first()
            .and_then(|j| j.adaptation.as_ref())
            .map_or(self.defaults.batch_window_ms, |a| a.config.batch_window_ms);
        Duration::from_millis(ms)
    }

    /// Runs every batch whose window has closed or that is full (all of them when draining).
    fn run_due_batches(&mut self, draining: bool) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let batch = &self.pending[i];
            let max = batch
                .jobs
                .first()
                .and_then(|j| j.adaptation.as_ref())
                .map_or(self.defaults.max_questions, |a| a.config.max_questions);
            if draining || now >= batch.opened + self.window(batch) || batch.jobs.len() >= max {
                let batch = self.pending.remove(i);
                self.adapt_and_queue(batch);
            } else {
                i += 1;
            }
        }
    }

    /// Episodes for the batch, then its jobs queue (first in line) to be answered with the
    /// adapted weights. A named adapter learns from the whole batch in one episode; ephemeral
    /// requests each get a fresh adapter of their own, so one client's question never changes
    /// another client's answer.
    fn adapt_and_queue(&mut self, batch: PendingBatch) {
        let jobs: Vec<GenerateJob> = batch
            .jobs
            .into_iter()
            .filter(|j| !j.events.is_closed())
            .collect();
        let Some(req) = jobs.first().and_then(|j| j.adaptation.clone()) else {
            return;
        };
        match req.adapter.clone() {
            Some(name) => self.run_episode_for(name, req, jobs),
            None => {
                for job in jobs {
                    self.episodes += 1;
                    let key = format!("{EPHEMERAL_PREFIX}{}", self.episodes);
                    self.run_episode_for(key, req.clone(), vec![job]);
                }
            }
        }
    }

    /// One episode of the adapter `key` on these jobs' questions, then the jobs queue.
    fn run_episode_for(&mut self, key: String, req: AdaptRequest, mut jobs: Vec<GenerateJob>) {
        let config = req.config.clone();
        let learner = match self.learners.remove(&key) {
            Some(l) => Ok(l),
            None => Adapter::new(
                &key,
                config.lora.clone(),
                self.model.config(),
                lora_dtype(self.model.dtype()),
                self.model.device(),
                self.episodes,
            )
            .and_then(|a| Learner::new(a, &config, 0)),
        };
        let mut learner = match learner {
            Ok(l) => l,
            Err(e) => return self.fail_jobs(jobs, &format!("adaptation failed: {e}")),
        };
        let version_before = learner.version;
        let questions: Vec<_> = jobs
            .iter()
            .map(|j| {
                j.adaptation
                    .as_ref()
                    .expect("adaptation job")
                    .question
                    .clone()
            })
            .collect();
        let seed = jobs[0].seed ^ 0x5eed;
        let started = Instant::now();
        let result = run_episode(
            &self.model,
            &self.tokenizer,
            &mut learner,
            &questions,
            &config,
            seed,
        );
        let label = self.model_label.clone();
        metrics::histogram!(m::ADAPTATION_DURATION, "model" => label.clone())
            .record(started.elapsed().as_secs_f64());
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                self.learners.insert(key, learner);
                return self.fail_jobs(jobs, &format!("adaptation failed: {e}"));
            }
        };
        self.record_episode(&report, req.adapter.as_deref(), learner.version);
        if report.applied {
            if let (Some(store), Some(_)) = (&self.store, &req.adapter) {
                if let Err(e) = store.save(&learner.adapter, learner.version) {
                    tracing::error!("saving adapter `{key}`: {e}");
                }
            }
            self.invalidate_caches(&key);
        }
        for (q, job) in jobs.iter_mut().enumerate() {
            let r = self.report_for(
                &report,
                &config,
                &req.adapter,
                version_before,
                learner.version,
                q,
            );
            let _ = job.events.send(Event::Adapted(Box::new(r)));
            job.adapter = Some(key.clone());
            job.adaptation = None;
        }
        self.learners.insert(key, learner);
        for job in jobs.into_iter().rev() {
            self.waiting.push_front(job);
        }
    }

    fn fail_jobs(&mut self, jobs: Vec<GenerateJob>, message: &str) {
        tracing::error!("{message}");
        // Errors may carry a backtrace; clients get the sentence.
        let message = message.lines().next().unwrap_or(message);
        for job in jobs {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = job.events.send(Event::Error(message.to_string()));
        }
    }

    fn record_episode(&mut self, report: &EpisodeReport, adapter: Option<&str>, version: u64) {
        let label = self.model_label.clone();
        if let Some(peak) = report.peak_memory_bytes {
            self.adaptation_peak = self.adaptation_peak.max(peak);
            metrics::gauge!(m::GPU_MEMORY, "kind" => "adaptation_peak", "device" => device_label(self.model.device()))
                .set(self.adaptation_peak as f64);
        }
        metrics::counter!(m::ADAPTATION_BATCHES, "model" => label.clone()).increment(1);
        metrics::counter!(m::ADAPTATION_ROLLOUT_TOKENS, "model" => label.clone())
            .increment(report.rollout_tokens as u64);
        if report.rolled_back {
            metrics::counter!(m::ADAPTATION_ROLLBACKS, "model" => label.clone()).increment(1);
        }
        if let Some(last) = report.steps.last() {
            metrics::gauge!(m::ADAPTATION_VOTE_SHARE, "model" => label.clone())
                .set(f64::from(last.vote_share));
            metrics::gauge!(m::ADAPTATION_FORKING_FRACTION, "model" => label.clone())
                .set(f64::from(last.forking_fraction));
            metrics::gauge!(m::ADAPTATION_ENTROPY, "model" => label.clone())
                .set(f64::from(last.mean_forking_entropy));
            metrics::gauge!(m::ADAPTATION_LOSS, "model" => label.clone()).set(f64::from(last.loss));
            metrics::gauge!(m::ADAPTATION_KL, "model" => label.clone()).set(f64::from(last.kl));
        }
        if let Some(name) = adapter {
            metrics::gauge!(m::ADAPTER_VERSION, "model" => label, "adapter" => name.to_string())
                .set(version as f64);
        }
    }

    fn report_for(
        &self,
        report: &EpisodeReport,
        config: &AdaptConfig,
        adapter: &Option<String>,
        version_before: u64,
        version: u64,
        question: usize,
    ) -> AdaptationReport {
        let outcome = report.questions.get(question);
        let last = report.steps.last();
        let leaves: Vec<_> = report
            .last_rollouts
            .leaves
            .iter()
            .enumerate()
            .filter(|(_, l)| l.question == question)
            .collect();
        let tree = leaves
            .iter()
            .enumerate()
            .map(|(j, (_, leaf))| TreeLeaf {
                parent: leaf
                    .fork
                    .and_then(|(root, _)| leaves.iter().position(|(i, _)| *i == root)),
                fork_at: leaf.fork.map(|(_, at)| at),
                tokens: leaf
                    .response
                    .iter()
                    .map(|&t| self.tokenizer.token_text(t))
                    .collect(),
                entropies: leaf.entropies.clone(),
                answer: outcome.and_then(|o| o.leaf_answers.get(j).cloned().flatten()),
                reward: outcome
                    .and_then(|o| o.leaf_rewards.get(j).copied())
                    .unwrap_or(0.0),
                truncated: leaf.truncated(),
            })
            .collect();
        AdaptationReport {
            applied: report.applied,
            method: config.method.as_str(),
            rollout: config.rollout.as_str(),
            adapter: adapter.clone(),
            adapter_version_before: version_before,
            adapter_version: version,
            steps: report.steps.len(),
            rollouts: report.rollouts,
            rollout_tokens: report.rollout_tokens,
            flat_equivalent_tokens: report.flat_equivalent_tokens,
            majority_answer: outcome.and_then(|o| o.majority_answer.clone()),
            vote_share: outcome.map_or(0.0, |o| o.vote_share),
            votes: outcome.map(|o| o.votes.clone()).unwrap_or_default(),
            forking_fraction: last.map_or(0.0, |s| s.forking_fraction),
            mean_entropy: last.map_or(0.0, |s| s.mean_forking_entropy),
            loss: last.map_or(0.0, |s| s.loss),
            kl: last.map_or(0.0, |s| s.kl),
            duration_ms: report.duration_ms,
            rolled_back: report.rolled_back,
            note: report.note.clone(),
            no_signal: outcome.and_then(|o| o.no_signal.clone()),
            truncated_leaves: outcome.map_or(0, |o| o.truncated),
            batch_questions: report.questions.len(),
            step_metrics: report.steps.clone(),
            tree,
        }
    }

    fn admin(&mut self, cmd: AdminCommand) {
        match cmd {
            AdminCommand::List(reply) => {
                let mut list: Vec<AdapterInfo> = self
                    .learners
                    .iter()
                    .filter(|(k, _)| !k.starts_with(EPHEMERAL_PREFIX))
                    .map(|(k, l)| AdapterInfo {
                        name: k.clone(),
                        version: l.version,
                    })
                    .collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(list);
            }
            AdminCommand::Reset(name, reply) => {
                let fresh = Adapter::new(
                    &name,
                    self.defaults.lora.clone(),
                    self.model.config(),
                    lora_dtype(self.model.dtype()),
                    self.model.device(),
                    0,
                );
                let _ = reply.send(fresh.and_then(|a| self.install(a, 0)));
            }
            AdminCommand::Import(name, dir, reply) => {
                let loaded = Adapter::load(
                    &name,
                    &dir,
                    self.model.config(),
                    lora_dtype(self.model.dtype()),
                    self.model.device(),
                );
                let _ = reply.send(loaded.and_then(|a| self.install(a, 0)));
            }
            AdminCommand::Export(name, reply) => {
                let result = match (self.learners.get(&name), &self.store) {
                    (Some(l), Some(store)) => store
                        .save(&l.adapter, l.version)
                        .map(|_| store.path_of(&name)),
                    (None, _) => Err(crate::Error::Adapter {
                        name,
                        reason: "no such adapter".into(),
                    }),
                    (_, None) => Err(crate::Error::Adapter {
                        name,
                        reason: "no adapter store is configured".into(),
                    }),
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Replaces (or adds) a named adapter, saves it, and restarts the caches that used it.
    fn install(&mut self, adapter: Adapter, version: u64) -> crate::Result<AdapterInfo> {
        let name = adapter.name().to_string();
        if let Some(store) = &self.store {
            store.save(&adapter, version)?;
        }
        self.learners.insert(
            name.clone(),
            Learner::new(adapter, &self.defaults, version)?,
        );
        self.invalidate_caches(&name);
        metrics::gauge!(m::ADAPTER_VERSION, "model" => self.model_label.clone(), "adapter" => name.clone()).set(version as f64);
        Ok(AdapterInfo { name, version })
    }

    /// The adapter's weights changed: sequences decoding with it recompute their caches, so
    /// no KV computed under one weight version is used under another.
    fn invalidate_caches(&mut self, adapter: &str) {
        for a in self
            .running
            .iter_mut()
            .filter(|a| a.job.adapter.as_deref() == Some(adapter))
        {
            for s in &mut a.seqs {
                s.reset_cache(&self.model);
            }
        }
    }

    fn running_seqs(&self) -> usize {
        self.running
            .iter()
            .map(|a| a.seqs.iter().filter(|s| !s.is_finished()).count())
            .sum()
    }

    /// KV-cache positions a job's unfinished sequences may grow to (prompt + max_tokens each).
    fn kv_reservation(job: &GenerateJob, sequences: usize) -> usize {
        sequences * (job.prompt.len() + job.rules.max_tokens)
    }

    fn kv_reserved(&self) -> usize {
        self.running
            .iter()
            .map(|a| {
                Self::kv_reservation(&a.job, a.seqs.iter().filter(|s| !s.is_finished()).count())
            })
            .sum()
    }

    /// Moves queued jobs into the batch while their sequences fit the batch and the
    /// KV-cache budget.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            let busy = self.running_seqs();
            if busy > 0 && busy + job.n > self.max_batch {
                break;
            }
            let needed = Self::kv_reservation(job, job.n);
            let over_budget = self
                .kv_cache_positions
                .is_some_and(|budget| self.kv_reserved() + needed > budget);
            if busy > 0 && over_budget {
                break;
            }
            let job = self.waiting.pop_front().expect("front() was Some");
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                continue;
            }
            if over_budget {
                let budget = self.kv_cache_positions.unwrap_or_default();
                let _ = job.events.send(Event::Error(format!(
                    "the request needs {needed} KV-cache positions (n x (prompt + max_tokens)); \
                     the budget holds {budget} (engine.kv_cache_bytes)"
                )));
                continue;
            }
            if let Some(name) = job
                .adapter
                .as_deref()
                .filter(|n| !self.learners.contains_key(*n))
            {
                let _ = job
                    .events
                    .send(Event::Error(format!("adapter `{name}` does not exist")));
                continue;
            }
            metrics::counter!(m::PROMPT_TOKENS, "model" => self.model_label.clone())
                .increment((job.prompt.len() * job.n) as u64);
            self.running.push(Active::new(job, &self.model));
        }
    }

    /// Frees the sequences of jobs whose client went away.
    fn drop_cancelled(&mut self) {
        self.running.retain(|a| !a.job.events.is_closed());
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        self.load
            .waiting
            .fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        for batch in &mut self.pending {
            let before = batch.jobs.len();
            batch.jobs.retain(|j| !j.events.is_closed());
            self.load
                .waiting
                .fetch_sub(before - batch.jobs.len(), Ordering::SeqCst);
        }
        self.pending.retain(|b| !b.jobs.is_empty());
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let mut keys: Vec<Option<String>> =
            self.running.iter().map(|a| a.job.adapter.clone()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let adapter = key
                .as_deref()
                .and_then(|k| self.learners.get(k))
                .map(|l| &l.adapter);
            let mut batch: Vec<&mut Sequence> = self
                .running
                .iter_mut()
                .filter(|a| a.job.adapter == key)
                .flat_map(|a| a.seqs.iter_mut())
                .collect();
            if let Err(e) = decode_step(&self.model, &self.tokenizer, &mut batch, adapter) {
                tracing::error!("decode step failed: {e}");
                self.running.retain(|a| {
                    let hit = a.job.adapter == key;
                    if hit {
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                    }
                    !hit
                });
            }
        }
        // A finished job's metrics are recorded before its last event goes out, so a client
        // that reads /metrics right after its answer sees itself counted.
        for a in &mut self.running {
            if a.is_done() {
                let _enter = a.job.span.enter();
                let label = self.model_label.clone();
                metrics::histogram!(m::E2E_REQUEST_LATENCY, "model" => label.clone())
                    .record(a.job.arrived.elapsed().as_secs_f64());
                let reason = a
                    .seqs
                    .iter()
                    .filter_map(Sequence::finish_reason)
                    .next_back()
                    .unwrap_or(FinishReason::Stop);
                metrics::counter!(m::REQUEST_SUCCESS, "model" => label, "finished_reason" => reason.as_str())
                    .increment(1);
            }
            a.emit(&self.model_label);
        }
        self.running.retain(|a| !a.is_done());
        // Ephemeral adapters go when the last job answered with them has finished.
        let in_use: Vec<String> = self
            .running
            .iter()
            .filter_map(|a| a.job.adapter.clone())
            .collect();
        let queued: Vec<String> = self
            .waiting
            .iter()
            .filter_map(|j| j.adapter.clone())
            .collect();
        self.learners.retain(|k, _| {
            !k.starts_with(EPHEMERAL_PREFIX) || in_use.contains(k) || queued.contains(k)
        });
    }

    fn abort_all(&mut self) {
        for a in &mut self.running {
            for s in &mut a.seqs {
                s.abort();
            }
            a.emit(&self.model_label);
        }
        self.running.clear();
        let queued = self
            .waiting
            .drain(..)
            .chain(self.pending.drain(..).flat_map(|b| b.jobs));
        for job in queued {
            let _ = job
                .events
                .send(Event::Error("the server is shutting down".into()));
        }
        self.load.waiting.store(0, Ordering::SeqCst);
        self.publish_load();
    }

    fn publish_load(&self) {
        let kv_bytes: usize = self
            .running
            .iter()
            .flat_map(|a| a.seqs.iter().map(Sequence::cache_bytes))
            .sum();
        metrics::gauge!(m::GPU_MEMORY, "kind" => "kv_cache", "device" => device_label(self.model.device()))
            .set(kv_bytes as f64);
        metrics::gauge!(m::REQUESTS_RUNNING, "model" => self.model_label.clone())
            .set(self.running.len() as f64);
        metrics::gauge!(m::REQUESTS_WAITING, "model" => self.model_label.clone())
            .set(self.load.waiting.load(Ordering::SeqCst) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::releasable;

    #[test]
    fn held_back_text_never_splits_a_character_and_waits_for_the_finish() {
        assert_eq!(releasable("hello", 0, 0, false), "hello");
        assert_eq!(releasable("hello", 2, 2, false), "l");
        assert_eq!(releasable("héllo", 0, 4, false), "h");
        assert_eq!(releasable("hello", 1, 3, true), "ello");
        assert_eq!(releasable("ab", 1, 5, false), "");
    }
}
