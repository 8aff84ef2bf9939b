//! What an eval measured, kept as finished units of work (one evaluation pass, one adapted
//! batch) so an interrupted run resumes from its file, and the tables derived from them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Protocol;

/// Forking-token entropy histogram: bins of this width from 0, the last one open-ended.
pub const ENTROPY_BIN: f32 = 0.25;
pub const ENTROPY_BINS: usize = 32;

/// Everything that must match for a results file to be resumed. The episode count is not
/// part of it: asking for more episodes extends a finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// Results written before protocols existed were transductive.
    #[serde(default)]
    pub protocol: Protocol,
    pub data: String,
    pub data_sha256: String,
    /// Questions skipped at the start of the data.
    #[serde(default)]
    pub skip: usize,
    pub questions: usize,
    pub model: String,
    pub k: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    pub batch: usize,
    /// None: the server's default.
    pub samples: Option<usize>,
    /// None: the server's default.
    pub steps: Option<usize>,
    pub seed: u64,
}

/// One pass over the scored questions: k samples and (but online) a greedy answer each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// 0 is before any adaptation.
    pub episode: usize,
    /// None online: a greedy answer there would need an episode of its own.
    pub greedy: Option<f64>,
    pub pass_at_1: f64,
    pub maj_at_k: f64,
    /// Mean tokens of the k sampled responses.
    pub mean_length: f64,
    pub completion_tokens: usize,
    pub seconds: f64,
    /// Each scored question's majority and greedy answer, so a reader can see which answers
    /// moved a score (results written before this field have none).
    #[serde(default)]
    pub answers: Vec<Answered>,
}

/// What one question answered in one evaluation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answered {
    /// The question's index after `--skip` (as `Batch::first_question` counts).
    pub question: usize,
    /// The k samples' majority answer, and whether it is the gold one.
    pub majority: Option<String>,
    pub majority_correct: bool,
    /// The whole greedy response (none online), and whether its answer is the gold one.
    pub greedy: Option<String>,
    pub greedy_correct: Option<bool>,
}

/// One adaptation episode of the server on one batch of questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub episode: usize,
    pub first_question: usize,
    pub questions: usize,
    pub applied: bool,
    /// The KL bound (or a non-finite loss) undid a round of the episode, so its later rounds
    /// never ran; `kl_after` is that round's KL.
    #[serde(default)]
    pub rolled_back: bool,
    pub adapter_version: u64,
    pub vote_share: f64,
    /// Share of questions whose majority answer is the gold one (None without gold).
    pub label_accuracy: Option<f64>,
    /// Share of leaves whose majority-vote reward equals the reward gold would give.
    pub reward_accuracy: Option<f64>,
    pub forking_entropy: f64,
    pub forking_histogram: Vec<u32>,
    pub kl: f64,
    /// KL to the base model per response token after the episode's last round.
    #[serde(default)]
    pub kl_after: f64,
    pub loss: f64,
    /// Per question: how strong its majority was and whether it was right, to choose
    /// the majority gates by measurement.
    #[serde(default)]
    pub votes: Vec<QuestionVote>,
    pub rollout_tokens: usize,
    pub flat_equivalent_tokens: usize,
    /// Tokens of the answers the adapted requests returned.
    pub answer_tokens: usize,
    pub seconds: f64,
    /// The episode's rounds in order, to see where a round's time went and whether the
    /// later rounds still trained.
    #[serde(default)]
    pub rounds: Vec<Round>,
    /// The episodes' notes, each once: why a round was rolled back, or stopped by the time
    /// limit, or why no question trained.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One round (rollouts, vote, update) of a batch's episode; over the batch's episodes when
/// the server split it into several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// Mean pseudo-label share over the round's questions.
    pub vote_share: f64,
    pub trained_questions: usize,
    pub applied: bool,
    /// KL to the base model per response token after the round; none when no question
    /// trained or the KL was not a number.
    pub kl_after: Option<f64>,
    pub rollout_seconds: f64,
    pub update_seconds: f64,
}

/// One question's vote in an adapted batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionVote {
    /// The pseudo-label's share of the question's leaves.
    pub vote_share: f64,
    /// The pseudo-label's leaves: the answer that weighed most, not always the most common.
    pub top_votes: usize,
    /// The majority passed the server's gates and the question trained.
    pub trained: bool,
    /// Whether the majority answer was the gold one (None without gold).
    pub label_correct: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmRecord {
    pub arm: String,
    pub evaluations: Vec<Evaluation>,
    pub batches: Vec<Batch>,
}

/// An arm's totals, the row of the first table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    pub arm: String,
    pub episodes: usize,
    pub greedy: Option<f64>,
    pub pass_at_1: f64,
    pub maj_at_k: f64,
    pub mean_length: f64,
    pub rollout_tokens: usize,
    pub flat_equivalent_tokens: usize,
    pub wall_seconds: f64,
    /// Rollout and answer tokens per wall second.
    pub tokens_per_second: f64,
}

/// One adapted episode, the row of the second table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeSummary {
    pub arm: String,
    pub episode: usize,
    pub pass_at_1: Option<f64>,
    pub mean_length: Option<f64>,
    pub vote_share: f64,
    pub label_accuracy: Option<f64>,
    pub reward_accuracy: Option<f64>,
    pub forking_entropy: f64,
    pub kl: f64,
    #[serde(default)]
    pub kl_after: f64,
    pub loss: f64,
    /// Of the episode's batches, those with a round undone (the KL bound or a non-finite loss).
    #[serde(default)]
    pub rolled_back: usize,
    #[serde(default)]
    pub batches: usize,
    pub forking_histogram: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub setup: Setup,
    pub arms: Vec<ArmRecord>,
    /// Derived from `arms` on every save; read back only by people.
    #[serde(default)]
    pub summary: Vec<ArmSummary>,
    #[serde(default)]
    pub episodes: Vec<EpisodeSummary>,
}

pub(super) fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Mean of the values present, weighted by question count; None when none are.
fn weighted(batches: &[&Batch], value: impl Fn(&Batch) -> Option<f64>) -> Option<f64> {
    let (sum, n) = batches
        .iter()
        .filter_map(|b| value(b).map(|v| (v * b.questions as f64, b.questions)))
        .fold((0.0, 0), |(s, n), (v, q)| (s + v, n + q));
    (n > 0).then(|| sum / n as f64)
}

impl ArmRecord {
    pub fn new(arm: &str) -> Self {
        Self {
            arm: arm.to_string(),
            evaluations: Vec::new(),
            batches: Vec::new(),
        }
    }

    pub fn evaluation(&self, episode: usize) -> Option<&Evaluation> {
        self.evaluations.iter().find(|e| e.episode == episode)
    }

    pub fn has_batch(&self, episode: usize, first_question: usize) -> bool {
        self.batches
            .iter()
            .any(|b| b.episode == episode && b.first_question == first_question)
    }

    fn episode_batches(&self, episode: usize) -> Vec<&Batch> {
        self.batches
            .iter()
            .filter(|b| b.episode == episode)
            .collect()
    }

    fn summary(&self) -> Option<ArmSummary> {
        let last = self.evaluations.iter().max_by_key(|e| e.episode)?;
        let rollout_tokens = self.batches.iter().map(|b| b.rollout_tokens).sum::<usize>();
        let spent = rollout_tokens
            + self.batches.iter().map(|b| b.answer_tokens).sum::<usize>()
            + self
                .evaluations
                .iter()
                .map(|e| e.completion_tokens)
                .sum::<usize>();
        let wall_seconds = self.batches.iter().map(|b| b.seconds).sum::<f64>()
            + self.evaluations.iter().map(|e| e.seconds).sum::<f64>();
        Some(ArmSummary {
            arm: self.arm.clone(),
            episodes: last.episode,
            greedy: last.greedy,
            pass_at_1: last.pass_at_1,
            maj_at_k: last.maj_at_k,
            mean_length: last.mean_length,
            rollout_tokens,
            flat_equivalent_tokens: self.batches.iter().map(|b| b.flat_equivalent_tokens).sum(),
            wall_seconds,
            tokens_per_second: if wall_seconds > 0.0 {
                spent as f64 / wall_seconds
            } else {
                0.0
            },
        })
    }

    fn episode_summaries(&self) -> Vec<EpisodeSummary> {
        let mut episodes: Vec<usize> = self.batches.iter().map(|b| b.episode).collect();
        episodes.dedup();
        episodes
            .into_iter()
            .map(|episode| {
                let batches = self.episode_batches(episode);
                let evaluation = self.evaluation(episode);
                let mut histogram = vec![0; ENTROPY_BINS];
                for b in &batches {
                    for (h, c) in histogram.iter_mut().zip(&b.forking_histogram) {
                        *h += c;
                    }
                }
                EpisodeSummary {
                    arm: self.arm.clone(),
                    episode,
                    pass_at_1: evaluation.map(|e| e.pass_at_1),
                    mean_length: evaluation.map(|e| e.mean_length),
                    vote_share: weighted(&batches, |b| Some(b.vote_share)).unwrap_or(0.0),
                    label_accuracy: weighted(&batches, |b| b.label_accuracy),
                    reward_accuracy: weighted(&batches, |b| b.reward_accuracy),
                    forking_entropy: mean(batches.iter().map(|b| b.forking_entropy)),
                    kl: mean(batches.iter().map(|b| b.kl)),
                    kl_after: mean(batches.iter().map(|b| b.kl_after)),
                    loss: mean(batches.iter().map(|b| b.loss)),
                    rolled_back: batches.iter().filter(|b| b.rolled_back).count(),
                    batches: batches.len(),
                    forking_histogram: histogram,
                }
            })
            .collect()
    }
}

impl Results {
    pub fn new(setup: Setup) -> Self {
        Self {
            setup,
            arms: Vec::new(),
            summary: Vec::new(),
            episodes: Vec::new(),
        }
    }

    pub fn arm_mut(&mut self, arm: &str) -> &mut ArmRecord {
        match self.arms.iter().position(|a| a.arm == arm) {
            Some(i) => &mut self.arms[i],
            None => {
                self.arms.push(ArmRecord::new(arm));
                self.arms.last_mut().expect("just pushed")
            }
        }
    }

    pub fn arm(&self, arm: &str) -> Option<&ArmRecord> {
        self.arms.iter().find(|a| a.arm == arm)
    }

    /// Reads a results file back; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Recomputes the summaries and writes JSON and Markdown, each by rename so a kill never
    /// leaves half a file.
    pub fn save(&mut self, json: &Path, markdown: &Path) -> std::io::Result<()> {
        self.summary = self.arms.iter().filter_map(ArmRecord::summary).collect();
        self.episodes = self
            .arms
            .iter()
            .flat_map(ArmRecord::episode_summaries)
            .collect();
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(json, text.as_bytes())?;
        write_atomically(markdown, self.markdown().as_bytes())
    }

    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let k = s.k;
        let or_default =
            |n: Option<usize>| n.map_or("the server's default number of".into(), |n| n.to_string());
        let mut out = format!(
            "# Eval: {} on {} ({} questions, {} protocol)\n\n\
             k = {k} samples at T = {}, answers up to {} tokens; adaptation in batches of {}, \
             {} leaves per question, {} round(s) per batch; seed {}.\n\n\
             | arm | episodes | greedy | pass@1 | maj@{k} | mean length | rollout tokens | \
             flat-equivalent tokens | wall s | tokens/s |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
            s.model,
            s.data,
            s.questions,
            s.protocol.as_str(),
            s.temperature,
            s.max_tokens,
            s.batch,
            or_default(s.samples),
            or_default(s.steps),
            s.seed
        );
        for a in &self.summary {
            out.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.1} | {} | {} | {:.1} | {:.1} |\n",
                a.arm,
                a.episodes,
                a.greedy.map_or("–".into(), |g| format!("{g:.3}")),
                a.pass_at_1,
                a.maj_at_k,
                a.mean_length,
                a.rollout_tokens,
                a.flat_equivalent_tokens,
                a.wall_seconds,
                a.tokens_per_second
            ));
        }
        if !self.episodes.is_empty() {
            out.push_str(
                "\n| arm | episode | pass@1 after | mean length after | vote share | \
                 label accuracy | reward accuracy | forking entropy | KL | KL after | loss | \
                 batches rolled back |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|---|\n",
            );
            let opt = |v: Option<f64>, digits: usize| {
                v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
            };
            for e in &self.episodes {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {:.3} | {} | {} | {:.3} | {:.4} | {:.4} | {:.4} | {} of {} |\n",
                    e.arm,
                    e.episode,
                    opt(e.pass_at_1, 3),
                    opt(e.mean_length, 1),
                    e.vote_share,
                    opt(e.label_accuracy, 3),
                    opt(e.reward_accuracy, 3),
                    e.forking_entropy,
                    e.kl,
                    e.kl_after,
                    e.loss,
                    e.rolled_back,
                    e.batches
                ));
            }
        }
        out
    }
}

pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

/// Histogram of entropies in `ENTROPY_BIN`-wide bins.
pub fn histogram(entropies: &[f32]) -> Vec<u32> {
    let mut bins = vec![0; ENTROPY_BINS];
    for &h in entropies {
        let i = ((h.max(0.0) / ENTROPY_BIN) as usize).min(ENTROPY_BINS - 1);
        bins[i] += 1;
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(episode: usize, questions: usize, label: Option<f64>) -> Batch {
        Batch {
            episode,
            first_question: 0,
            questions,
            applied: true,
            rolled_back: false,
            adapter_version: 1,
            vote_share: 0.5,
            label_accuracy: label,
            reward_accuracy: None,
            forking_entropy: 1.0,
            forking_histogram: histogram(&[0.1, 0.3, 100.0]),
            kl: 0.0,
            kl_after: 0.0,
            loss: 0.0,
            votes: Vec::new(),
            rollout_tokens: 10,
            flat_equivalent_tokens: 20,
            answer_tokens: 5,
            seconds: 1.0,
            rounds: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn episode_label_accuracy_weights_batches_by_questions() {
        let mut arm = ArmRecord::new("spine-tree");
        arm.batches = vec![batch(1, 3, Some(1.0)), batch(1, 1, Some(0.0))];
        let e = &arm.episode_summaries()[0];
        assert_eq!(e.label_accuracy, Some(0.75));
        assert_eq!(e.reward_accuracy, None);
        assert_eq!(e.forking_histogram[0], 2);
        assert_eq!(e.forking_histogram[1], 2);
        assert_eq!(e.forking_histogram[ENTROPY_BINS - 1], 2);
    }

    #[test]
    fn an_episode_shows_how_many_of_its_batches_had_a_round_rolled_back() {
        let mut arm = ArmRecord::new("ttrl-flat");
        let mut undone = batch(1, 4, None);
        undone.rolled_back = true;
        arm.batches = vec![batch(1, 4, None), undone];
        let mut results = Results::new(Setup {
            protocol: Protocol::default(),
            data: "q.jsonl".into(),
            data_sha256: String::new(),
            skip: 0,
            questions: 8,
            model: "m".into(),
            k: 2,
            temperature: 0.8,
            max_tokens: 8,
            batch: 4,
            samples: None,
            steps: None,
            seed: 0,
        });
        results.episodes = arm.episode_summaries();
        assert_eq!(
            (results.episodes[0].rolled_back, results.episodes[0].batches),
            (1, 2)
        );
        let table = results.markdown();
        let row = table.lines().find(|l| l.starts_with("| ttrl-flat | 1 |"));
        assert!(row.is_some_and(|r| r.ends_with("| 1 of 2 |")), "{table}");
    }

    #[test]
    fn results_written_before_answers_were_kept_still_resume() {
        let old = r#"{"episode": 1, "greedy": 0.5, "pass_at_1": 0.25, "maj_at_k": 0.5,
            "mean_length": 3.0, "completion_tokens": 15, "seconds": 1.0}"#;
        let e: Evaluation = serde_json::from_str(old).unwrap();
        assert!(e.answers.is_empty());
    }

    #[test]
    fn arm_summary_counts_every_token_spent() {
        let mut arm = ArmRecord::new("ttrl-flat");
        arm.batches = vec![batch(1, 2, None)];
        arm.evaluations = vec![Evaluation {
            episode: 1,
            greedy: Some(0.5),
            pass_at_1: 0.25,
            maj_at_k: 0.5,
            mean_length: 3.0,
            completion_tokens: 15,
            seconds: 1.0,
            answers: Vec::new(),
        }];
        let s = arm.summary().unwrap();
        assert_eq!((s.rollout_tokens, s.flat_equivalent_tokens), (10, 20));
        assert_eq!(s.tokens_per_second, 15.0);
    }
}
