//! Streaming a decoding job back to its client: new tokens and the text they release, held
//! back while it could still turn into a stop string, and each choice's finish.

use std::time::Instant;

use super::admission::Queued;
use super::faults::Fault;
use super::job::{Event, GenerateJob};
use crate::generation::Sequence;
use crate::model::Model;
use crate::sampling::Sampler;
use crate::telemetry as m;

/// A job being decoded: its sequences and what has been sent of each.
pub struct Active {
    pub job: GenerateJob,
    pub seqs: Vec<Sequence>,
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
    /// A failure this job injects (testing only).
    pub fault: Option<Fault>,
}

impl Active {
    /// Starts decoding a queued job; its place in the queue is given back.
    pub fn new(queued: Queued, model: &Model) -> Self {
        let job = queued.job;
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
            fault: None,
            seqs,
            job,
        }
    }

    pub fn is_done(&self) -> bool {
        self.seqs.iter().all(Sequence::is_finished)
    }

    /// Sends every new token (and released text) since the last step.
    pub fn emit(&mut self, model_label: &str) {
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
