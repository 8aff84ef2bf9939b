//! The engine loop: the only owner of the model. It admits queued jobs between steps
//! (continuous batching), advances every running sequence by one token per batched forward,
//! streams tokens to each job's channel and frees the sequences of jobs whose client left.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::job::{Event, GenerateJob};
use crate::generation::{decode_step, FinishReason, Sequence};
use crate::model::{Model, TextTokenizer};
use crate::sampling::Sampler;
use crate::telemetry as m;

pub enum Command {
    Generate(GenerateJob),
    /// Finish what is in flight within `grace`, abort the rest, then stop.
    Shutdown {
        grace: Duration,
    },
}

/// Counts shared with the handle, so the server can refuse work without asking the loop.
#[derive(Debug, Default)]
pub struct Load {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
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
            let new_tokens = generated.len() - self.sent_tokens[i];
            metrics::counter!(m::GENERATION_TOKENS, "model" => model_label.to_string())
                .increment(new_tokens as u64);
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

pub struct Scheduler {
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    model_label: String,
    max_batch: usize,
    load: Arc<Load>,
    waiting: VecDeque<GenerateJob>,
    running: Vec<Active>,
}

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<TextTokenizer>,
        model_label: String,
        max_batch: usize,
        load: Arc<Load>,
    ) -> Self {
        Self {
            model,
            tokenizer,
            model_label,
            max_batch: max_batch.max(1),
            load,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Runs until the command channel closes or a shutdown's grace period ends.
    pub fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut deadline: Option<Instant> = None;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if deadline.is_some() {
                    break;
                }
                match commands.blocking_recv() {
                    Some(cmd) => self.accept(cmd, &mut deadline),
                    None => break,
                }
            }
            while let Ok(cmd) = commands.try_recv() {
                self.accept(cmd, &mut deadline);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.abort_all();
                break;
            }
            self.drop_cancelled();
            self.admit();
            self.step();
            self.publish_load();
        }
        self.abort_all();
    }

    fn accept(&mut self, cmd: Command, deadline: &mut Option<Instant>) {
        match cmd {
            Command::Generate(job) => {
                if deadline.is_some() {
                    let _ = job
                        .events
                        .send(Event::Error("the server is shutting down".into()));
                    self.load.waiting.fetch_sub(1, Ordering::SeqCst);
                } else {
                    self.waiting.push_back(job);
                }
            }
            Command::Shutdown { grace } => *deadline = Some(Instant::now() + grace),
        }
    }

    fn running_seqs(&self) -> usize {
        self.running
            .iter()
            .map(|a| a.seqs.iter().filter(|s| !s.is_finished()).count())
            .sum()
    }

    /// Moves queued jobs into the batch while their sequences fit.
    fn admit(&mut self) {
        while let Some(job) = self.waiting.front() {
            let busy = self.running_seqs();
            if busy > 0 && busy + job.n > self.max_batch {
                break;
            }
            let job = self.waiting.pop_front().expect("front() was Some");
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
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
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let result = {
            let mut batch: Vec<&mut Sequence> = self
                .running
                .iter_mut()
                .flat_map(|a| a.seqs.iter_mut())
                .collect();
            decode_step(&self.model, &self.tokenizer, &mut batch, None)
        };
        if let Err(e) = result {
            tracing::error!("decode step failed: {e}");
            for a in self.running.drain(..) {
                let _ = a.job.events.send(Event::Error(e.to_string()));
            }
            return;
        }
        for a in &mut self.running {
            a.emit(&self.model_label);
        }
        let label = self.model_label.clone();
        self.running.retain(|a| {
            if !a.is_done() {
                return true;
            }
            let _enter = a.job.span.enter();
            metrics::histogram!(m::E2E_REQUEST_LATENCY, "model" => label.clone())
                .record(a.job.arrived.elapsed().as_secs_f64());
            let reason = a.seqs.iter().filter_map(Sequence::finish_reason).next_back().unwrap_or(FinishReason::Stop);
            metrics::counter!(m::REQUEST_SUCCESS, "model" => label.clone(), "finished_reason" => reason.as_str())
                .increment(1);
            false
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
        for job in self.waiting.drain(..) {
            let _ = job
                .events
                .send(Event::Error("the server is shutting down".into()));
        }
        self.load.waiting.store(0, Ordering::SeqCst);
        self.publish_load();
    }

    fn publish_load(&self) {
        self.load
            .running
            .store(self.running.len(), Ordering::SeqCst);
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
