//! Adaptation batches and their episodes. Requests that would run the same episode collect
//! for `batch_window_ms` (at most `max_questions` per batch; more open the next). A closed
//! batch becomes episodes: one for a named adapter, one per request for ephemeral ones, so
//! one client's question never changes another's answer. An episode's seed (its rollouts',
//! and a fresh adapter's) is its first request's in seed order, so the same requests run the
//! same episode whichever arrived first. One episode at a time goes to the
//! trainer, bounded by `max_batch` rollout sequences, their KV positions (reserved from the
//! serving budget) and `max_episode_seconds`; it is cancelled when its clients have all
//! gone or the server stops. Its requests then queue first in line, answered with the
//! weights the episode left.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::admission::{adapters_in_use, Queued};
use super::job::{AdaptRequest, AdaptationReport, EngineError, Event, TreeLeaf};
use super::registry::{is_ephemeral, CheckIn, EPHEMERAL_PREFIX};
use super::scheduler::Scheduler;
use super::trainer::{EpisodeDone, EpisodeOutcome, EpisodeTask};
use crate::adapt::{AdaptConfig, EpisodeLimits, EpisodeReport};
use crate::interrupt::Interrupt;
use crate::model::memory::device_label;
use crate::telemetry as m;

/// Adaptation requests collecting for one batch.
pub struct PendingBatch {
    key: String,
    opened: Instant,
    window: Duration,
    max_questions: usize,
    jobs: Vec<Queued>,
}

/// One episode waiting for the trainer: the adapter it trains and the requests it answers.
pub struct Episode {
    /// Registry key: the adapter's name, or an ephemeral key.
    key: String,
    request: AdaptRequest,
    jobs: Vec<Queued>,
}

pub type EpisodeQueue = VecDeque<Episode>;

/// The episode out with the trainer.
pub struct InFlight {
    episode: Episode,
    version_before: u64,
    interrupt: Interrupt,
    /// KV-cache positions its rollouts may hold.
    kv_positions: usize,
}

/// A batch's requests by seed, then prompt. Which client's request reached the window first
/// is a race; in this order the same requests run the same episode (its seed is the first
/// request's, its rollouts go question by question) however they arrived.
fn in_seed_order(mut jobs: Vec<Queued>) -> Vec<Queued> {
    fn key(q: &Queued) -> (u64, Option<&Vec<u32>>) {
        (
            q.job.seed,
            q.job.adaptation.as_ref().map(|a| &a.question.prompt),
        )
    }
    jobs.sort_by(|a, b| key(a).cmp(&key(b)));
    jobs
}

impl Scheduler {
    pub(super) fn add_to_batch(&mut self, queued: Queued) {
        let request = queued.job.adaptation.as_ref().expect("an adaptation job");
        let key = request.batch_key();
        match self
            .pending
            .iter_mut()
            .find(|b| b.key == key && b.jobs.len() < b.max_questions)
        {
            Some(batch) => batch.jobs.push(queued),
            None => self.pending.push(PendingBatch {
                key,
                opened: Instant::now(),
                window: Duration::from_millis(request.config.batch_window_ms),
                max_questions: request.config.max_questions.max(1),
                jobs: vec![queued],
            }),
        }
    }

    pub(super) fn next_window_close(&self) -> Option<Instant> {
        self.pending.iter().map(|b| b.opened + b.window).min()
    }

    /// Turns every batch whose window has closed, or that is full, into episodes.
    pub(super) fn close_due_batches(&mut self) {
        let now = Instant::now();
        let (due, open): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|b| now >= b.opened + b.window || b.jobs.len() >= b.max_questions);
        self.pending = open;
        for batch in due {
            let jobs = in_seed_order(batch.jobs);
            let Some(request) = jobs[0].job.adaptation.clone() else {
                continue;
            };
            match request.adapter.clone() {
                Some(name) => self.episodes.push_back(Episode {
                    key: name,
                    request,
                    jobs,
                }),
                None => {
                    for queued in jobs {
                        self.episode_count += 1;
                        self.episodes.push_back(Episode {
                            key: format!("{EPHEMERAL_PREFIX}{}", self.episode_count),
                            request: request.clone(),
                            jobs: vec![queued],
                        });
                    }
                }
            }
        }
    }

    /// Hands the next episode to the trainer when none is out.
    pub(super) fn start_next_episode(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(episode) = self.episodes.pop_front() else {
            return;
        };
        let config = episode.request.config.clone();
        // A fresh adapter starts from the episode's seed too, not from how many episodes ran
        // before it: an episode depends on its requests alone.
        let seed = episode.jobs[0].job.seed ^ 0x5eed;
        let checked_out = self.adapters.check_out(
            &episode.key,
            &config,
            &self.model,
            seed,
            &adapters_in_use(&self.running),
        );
        let learner = match checked_out {
            Ok(l) => l,
            Err(error) => {
                for queued in episode.jobs {
                    queued.fail(error.clone());
                }
                return;
            }
        };
        let questions: Vec<_> = episode
            .jobs
            .iter()
            .filter_map(|q| q.job.adaptation.as_ref().map(|a| a.question.clone()))
            .collect();
        let longest = questions
            .iter()
            .flat_map(|q| [Some(&q.prompt), q.reversed.as_ref().map(|r| &r.prompt)])
            .flatten()
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let sequences = (questions.len() * config.samples).min(self.max_batch);
        let interrupt = Interrupt::after_seconds(config.max_episode_seconds);
        let version_before = learner.version;
        let task = EpisodeTask {
            learner,
            questions,
            seed,
            limits: EpisodeLimits {
                max_batch: self.max_batch,
                interrupt: interrupt.clone(),
            },
            config,
        };
        if let Err(task) = self.trainer.submit(task) {
            self.adapters
                .check_in(&episode.key, task.learner, false, &self.model);
            for queued in episode.jobs {
                queued.fail(EngineError::Internal("the trainer has stopped".into()));
            }
            return;
        }
        metrics::gauge!(m::ADAPTATION_RUNNING, "model" => self.model_label.clone()).set(1.0);
        self.in_flight = Some(InFlight {
            kv_positions: sequences * (longest + episode.request.config.max_tokens),
            episode,
            version_before,
            interrupt,
        });
    }

    pub(super) fn episode_kv_reserved(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |f| f.kv_positions)
    }

    /// Installs what the trainer sends back, reports to each request, and queues them first
    /// in line.
    pub(super) fn finish_episode(&mut self, done: EpisodeDone) {
        let Some(InFlight {
            episode,
            version_before,
            ..
        }) = self.in_flight.take()
        else {
            return;
        };
        metrics::gauge!(m::ADAPTATION_RUNNING, "model" => self.model_label.clone()).set(0.0);
        metrics::histogram!(m::ADAPTATION_DURATION, "model" => self.model_label.clone())
            .record(done.seconds);
        let Episode {
            key,
            request,
            mut jobs,
        } = episode;
        let named = request.adapter.clone();
        let (report, answer_with) = match (done.outcome, done.learner) {
            (EpisodeOutcome::Finished(mut report), Some(learner)) => {
                match self
                    .adapters
                    .check_in(&key, learner, report.applied, &self.model)
                {
                    CheckIn::Kept if report.applied => self.weights_changed(&key),
                    CheckIn::Kept => {}
                    CheckIn::Replaced => {
                        report.applied = false;
                        report.note =
                            Some("the adapter was reset or replaced while it trained".into());
                    }
                    CheckIn::Lost { current } => {
                        report.applied = false;
                        report.note = Some(format!(
                            "not applied: another replica published version {current} of this \
                             adapter first; answered with that version"
                        ));
                        self.weights_changed(&key);
                    }
                    CheckIn::NotSaved(why) => {
                        report.applied = false;
                        report.note = Some(format!(
                            "not applied: the new version could not be saved ({why}); \
                             answered with the version before"
                        ));
                    }
                }
                self.record_episode(&report);
                (report, Some(key.clone()))
            }
            (EpisodeOutcome::Failed(crate::Error::Interrupted(why)), Some(learner)) => {
                // Stopped early: answered with the weights it had.
                let answer_with = if is_ephemeral(&key) {
                    None
                } else {
                    self.adapters.check_in(&key, learner, false, &self.model);
                    Some(key.clone())
                };
                let report = EpisodeReport {
                    note: Some(format!("not applied: {why}")),
                    duration_ms: (done.seconds * 1000.0) as u64,
                    ..EpisodeReport::default()
                };
                (report, answer_with)
            }
            (outcome, learner) => {
                let error = match outcome {
                    EpisodeOutcome::Panicked(why) => {
                        EngineError::Internal(format!("the adaptation episode panicked: {why}"))
                    }
                    EpisodeOutcome::Failed(e) => EngineError::from(e),
                    EpisodeOutcome::Finished(_) => {
                        EngineError::Internal("the trainer lost the adapter".into())
                    }
                };
                tracing::error!("adaptation failed: {error}");
                match learner {
                    Some(l) if !is_ephemeral(&key) => {
                        self.adapters.check_in(&key, l, false, &self.model);
                    }
                    _ => self.adapters.recover(&key),
                }
                for queued in jobs {
                    queued.fail(error.clone());
                }
                return;
            }
        };
        let version = self.adapters.version_of(&key).unwrap_or(version_before);
        for (q, queued) in jobs.iter_mut().enumerate() {
            let r = self.report_for(&report, &request.config, &named, version_before, version, q);
            let _ = queued.job.events.send(Event::Adapted(Box::new(r)));
            queued.job.adapter = answer_with.clone();
            queued.job.adaptation = None;
        }
        for queued in jobs.into_iter().rev() {
            self.waiting.push_front(queued);
        }
    }

    /// Drops requests whose client left; an episode out with the trainer whose clients have
    /// all gone is cancelled.
    pub(super) fn drop_cancelled_adaptation(&mut self) {
        for batch in &mut self.pending {
            batch.jobs.retain(|q| !q.is_cancelled());
        }
        self.pending.retain(|b| !b.jobs.is_empty());
        for episode in &mut self.episodes {
            episode.jobs.retain(|q| !q.is_cancelled());
        }
        self.episodes.retain(|e| !e.jobs.is_empty());
        if let Some(f) = &self.in_flight {
            if f.episode.jobs.iter().all(Queued::is_cancelled) {
                f.interrupt.cancel();
            }
        }
    }

    /// Shutdown: batches and episodes that have not started fail (503); the one out with
    /// the trainer is cancelled at its next slice.
    pub(super) fn stop_adaptation(&mut self) {
        let unstarted = self
            .pending
            .drain(..)
            .flat_map(|b| b.jobs)
            .chain(self.episodes.drain(..).flat_map(|e| e.jobs));
        for queued in unstarted {
            queued.fail(EngineError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        if let Some(f) = &self.in_flight {
            f.interrupt.cancel();
        }
    }

    /// The grace period is over: besides what [`Self::stop_adaptation`] does, the requests of
    /// an episode still out with the trainer are answered (503) instead of dropped unanswered.
    pub(super) fn abort_adaptation(&mut self) {
        self.stop_adaptation();
        if let Some(f) = self.in_flight.take() {
            for queued in f.episode.jobs {
                queued.fail(EngineError::Unavailable(
                    "the server is shutting down".into(),
                ));
            }
        }
    }

    fn record_episode(&mut self, report: &EpisodeReport) {
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
        }
        if let Some(trained) = report.last_trained() {
            metrics::gauge!(m::ADAPTATION_LOSS, "model" => label.clone())
                .set(f64::from(trained.loss));
            metrics::gauge!(m::ADAPTATION_KL, "model" => label.clone()).set(f64::from(trained.kl));
        }
        metrics::gauge!(m::ADAPTATION_ROLLOUT_BATCH, "model" => label.clone())
            .set(report.widest_rollout_batch as f64);
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
        let (last, trained) = (report.steps.last(), report.last_trained());
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
                    .and_then(|(parent, _)| leaves.iter().position(|(i, _)| *i == parent)),
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
                options_reversed: report.options_reversed(leaf),
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
            loss: trained.map_or(0.0, |s| s.loss),
            kl: trained.map_or(0.0, |s| s.kl),
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
}
