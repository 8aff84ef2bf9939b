//! `ttrl-serve eval`: does test-time adaptation pay off on these questions, and at what
//! cost? Arms are compared over HTTP under one of three protocols (`Protocol`); gold
//! answers only score, the server never sees them. Every finished unit is saved, so a
//! rerun resumes.

pub mod charts;
pub mod client;
pub mod data;
pub mod results;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::adapt::advantage::forking_threshold;
use crate::adapt::episode::last_trained;
use crate::adapt::Method;
use crate::model::assets::sha256_file;
use crate::reward::majority_vote;
use crate::rollout::RolloutKind;
use crate::server::adaptation::{AdaptationReport, AdaptationSpec, StepMetrics};
use client::{ChatRequest, ChatResponse, Client};
use data::Item;
use results::{histogram, Answered, Batch, Evaluation, QuestionVote, Results, Round, Setup};

/// How adapted arms meet the questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// As users toggle it: each question is sent once with ephemeral adaptation, in
    /// concurrent waves of `batch`, and its k adapted answers are scored.
    Online,
    /// TTRL's: a named adapter adapts on every question for `episodes` passes, then
    /// answers them all.
    #[default]
    Transductive,
    /// A named adapter adapts on the first half of the questions and answers the second
    /// half, which it never saw: does it generalise or only memorise its votes?
    Heldout,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Online, Protocol::Transductive, Protocol::Heldout];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Online => "online",
            Protocol::Transductive => "transductive",
            Protocol::Heldout => "heldout",
        }
    }

    pub fn parse(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The questions adapted on and the questions scored, out of `n`.
    pub fn split(self, n: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        match self {
            Protocol::Online => (0..0, 0..n),
            Protocol::Transductive => (0..n, 0..n),
            Protocol::Heldout => (0..n / 2, n / 2..n),
        }
    }
}

/// One side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// The served model as is: greedy, pass@1 and maj@k.
    Base,
    Adapted(Method, RolloutKind),
}

impl Arm {
    pub const ALL: [Arm; 7] = [
        Arm::Base,
        Arm::Adapted(Method::Spine, RolloutKind::Tree),
        Arm::Adapted(Method::Spine, RolloutKind::Flat),
        Arm::Adapted(Method::Ttrl, RolloutKind::Tree),
        Arm::Adapted(Method::Ttrl, RolloutKind::Flat),
        Arm::Adapted(Method::Answer, RolloutKind::Tree),
        Arm::Adapted(Method::Answer, RolloutKind::Flat),
    ];

    pub fn name(self) -> String {
        match self {
            Arm::Base => "base".into(),
            Arm::Adapted(m, r) => format!("{}-{}", m.as_str(), r.as_str()),
        }
    }

    pub fn parse(name: &str) -> Option<Arm> {
        Arm::ALL.into_iter().find(|a| a.name() == name)
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub protocol: Protocol,
    /// A JSONL path or a built-in set name.
    pub data: String,
    /// Folder for results.json, results.md, the charts and (in-process) the adapters.
    pub out: PathBuf,
    pub arms: Vec<Arm>,
    pub episodes: usize,
    pub k: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    /// Questions per adaptation batch.
    pub batch: usize,
    /// Leaves per question per adaptation step; the server's default when unset.
    pub samples: Option<usize>,
    /// Rollout + update rounds per batch; the server's default when unset.
    pub steps: Option<usize>,
    pub seed: u64,
    /// Skip the first `skip` questions, then use at most `limit`.
    pub skip: usize,
    pub limit: Option<usize>,
    /// Requests in flight at once while evaluating.
    pub concurrency: usize,
    /// The server's forking share, to pick forking tokens out of the reported entropies.
    pub rho: f32,
}

impl EvalOptions {
    pub fn results_json(&self) -> PathBuf {
        self.out.join("results.json")
    }

    pub fn results_markdown(&self) -> PathBuf {
        self.out.join("results.md")
    }
}

/// Runs (or resumes) the eval against the server at `client`, serving `model`.
pub fn run(options: &EvalOptions, client: &Client, model: &str) -> anyhow::Result<Results> {
    let (path, mut items) = data::load(&options.data)?;
    items.drain(..options.skip.min(items.len()));
    if let Some(limit) = options.limit {
        items.truncate(limit);
    }
    std::fs::create_dir_all(&options.out)?;
    let setup = Setup {
        protocol: options.protocol,
        data: options.data.clone(),
        data_sha256: sha256_file(&path)?,
        skip: options.skip,
        questions: items.len(),
        model: model.to_string(),
        k: options.k,
        temperature: options.temperature,
        max_tokens: options.max_tokens,
        batch: options.batch,
        samples: options.samples,
        steps: options.steps,
        seed: options.seed,
    };
    let json_path = options.results_json();
    let mut results = match Results::load(&json_path)? {
        Some(previous) if previous.setup == setup => previous,
        Some(previous) => anyhow::bail!(
            "{} holds a different eval ({:?}); use another --out or delete it",
            json_path.display(),
            previous.setup
        ),
        None => Results::new(setup.clone()),
    };

    let (adapted, scored) = options.protocol.split(items.len());
    let batches: Vec<usize> = adapted.clone().step_by(options.batch.max(1)).collect();
    let units = options
        .arms
        .iter()
        .map(|arm| match (arm, options.protocol) {
            (Arm::Base, _) | (Arm::Adapted(..), Protocol::Online) => 1,
            (Arm::Adapted(..), _) => options.episodes * (batches.len() + 1),
        })
        .sum::<usize>();
    let bars = MultiProgress::new();
    let bar = |len: usize, template: &str| {
        bars.add(ProgressBar::new(len as u64)).with_style(
            ProgressStyle::with_template(template)
                .expect("static template")
                .progress_chars("=> "),
        )
    };
    let overall = bar(units, "[{bar:30}] {pos}/{len} units, {elapsed} {msg}");
    let requests = bar(0, "[{bar:30}] {pos}/{len} requests");
    let run = Runner {
        options,
        client,
        model,
        items: &items,
        requests: &requests,
        adapter_tag: &setup.data_sha256[..8],
    };
    let mut skipped = 0;
    let save = |results: &mut Results| results.save(&json_path, &options.results_markdown());
    for &arm in &options.arms {
        let name = arm.name();
        if let (Arm::Adapted(..), Protocol::Online) = (arm, options.protocol) {
            overall.set_message(format!("{name}: online"));
            if results.arm_mut(&name).evaluation(1).is_some() {
                skipped += 1;
            } else {
                let (evaluation, waves) = run.online(arm, scored.clone())?;
                let record = results.arm_mut(&name);
                record.batches.extend(waves);
                record.evaluations.push(evaluation);
                save(&mut results)?;
            }
            overall.inc(1);
            continue;
        }
        let episodes = match arm {
            Arm::Base => 0..=0,
            Arm::Adapted(..) => 1..=options.episodes,
        };
        for episode in episodes {
            if let Arm::Adapted(..) = arm {
                for &start in &batches {
                    overall.set_message(format!("{name}: episode {episode}, adapting"));
                    if results.arm_mut(&name).has_batch(episode, start) {
                        skipped += 1;
                    } else {
                        let end = (start + options.batch).min(adapted.end);
                        let (batch, _) = run.adapt(arm, episode, start..end, true)?;
                        results.arm_mut(&name).batches.push(batch);
                        save(&mut results)?;
                    }
                    overall.inc(1);
                }
            }
            overall.set_message(format!("{name}: episode {episode}, answering"));
            if results.arm_mut(&name).evaluation(episode).is_some() {
                skipped += 1;
            } else {
                let evaluation = run.evaluate(arm, episode, scored.clone())?;
                results.arm_mut(&name).evaluations.push(evaluation);
                save(&mut results)?;
            }
            overall.inc(1);
        }
    }
    overall.finish_and_clear();
    requests.finish_and_clear();
    save(&mut results)?;
    charts::draw_all(&results, &options.out)?;
    tracing::info!(
        "{} units run, {skipped} resumed from {}",
        units - skipped,
        json_path.display()
    );
    Ok(results)
}

/// One question's evaluation: k samples and (but online) a greedy answer.
struct QuestionScore {
    pass_at_1: f64,
    answered: Answered,
    samples: usize,
    sampled_tokens: usize,
    greedy_tokens: usize,
}

impl QuestionScore {
    fn new(
        question: usize,
        item: &Item,
        sampled: &ChatResponse,
        greedy: Option<&ChatResponse>,
    ) -> Self {
        let answers: Vec<Option<String>> = sampled.texts.iter().map(|t| item.answer(t)).collect();
        let correct = answers
            .iter()
            .filter(|a| item.is_gold(a.as_deref()))
            .count();
        let majority = majority_vote(&answers).label;
        let greedy_tokens = greedy.map_or(0, |g| g.completion_tokens);
        let greedy = greedy.and_then(|g| g.texts.first());
        Self {
            pass_at_1: correct as f64 / answers.len().max(1) as f64,
            answered: Answered {
                question,
                majority_correct: item.is_gold(majority.as_deref()),
                majority,
                greedy_correct: greedy.map(|t| item.is_gold(item.answer(t).as_deref())),
                greedy: greedy.cloned(),
            },
            samples: answers.len(),
            sampled_tokens: sampled.completion_tokens,
            greedy_tokens,
        }
    }

    /// The pass's figures over these questions' scores.
    fn evaluation(scores: Vec<QuestionScore>, episode: usize, started: Instant) -> Evaluation {
        let n = scores.len().max(1) as f64;
        let share = |hit: &dyn Fn(&QuestionScore) -> bool| {
            scores.iter().filter(|s| hit(s)).count() as f64 / n
        };
        let sampled_tokens: usize = scores.iter().map(|s| s.sampled_tokens).sum();
        let samples: usize = scores.iter().map(|s| s.samples).sum();
        let has_greedy = scores.iter().all(|s| s.answered.greedy_correct.is_some());
        Evaluation {
            episode,
            pass_at_1: scores.iter().map(|s| s.pass_at_1).sum::<f64>() / n,
            maj_at_k: share(&|s| s.answered.majority_correct),
            greedy: has_greedy.then(|| share(&|s| s.answered.greedy_correct == Some(true))),
            mean_length: sampled_tokens as f64 / samples.max(1) as f64,
            completion_tokens: sampled_tokens
                + scores.iter().map(|s| s.greedy_tokens).sum::<usize>(),
            seconds: started.elapsed().as_secs_f64(),
            answers: scores.into_iter().map(|s| s.answered).collect(),
        }
    }
}

struct Runner<'a> {
    options: &'a EvalOptions,
    client: &'a Client,
    model: &'a str,
    items: &'a [Item],
    requests: &'a ProgressBar,
    /// Keeps adapters of different data apart on a shared server.
    adapter_tag: &'a str,
}

impl Runner<'_> {
    fn adapter(&self, arm: Arm) -> String {
        format!("eval-{}-{}", arm.name(), self.adapter_tag)
    }

    /// Runs `f` on every index with `concurrency` requests in flight, in order of results.
    fn parallel<T: Send>(
        &self,
        indices: std::ops::Range<usize>,
        concurrency: usize,
        f: impl Fn(usize) -> anyhow::Result<T> + Sync,
    ) -> anyhow::Result<Vec<T>> {
        let start = indices.start;
        let slots: Vec<Mutex<Option<anyhow::Result<T>>>> =
            indices.clone().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        self.requests.reset();
        self.requests.set_length(slots.len() as u64);
        std::thread::scope(|scope| {
            for _ in 0..concurrency.clamp(1, slots.len().max(1)) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = slots.get(i) else { break };
                    *slot.lock().expect("no panics while held") = Some(f(start + i));
                    self.requests.inc(1);
                });
            }
        });
        slots
            .into_iter()
            .map(|s| s.into_inner().expect("no panics").expect("every slot ran"))
            .collect()
    }

    fn ask(
        &self,
        model: &str,
        i: usize,
        n: usize,
        temperature: f32,
        seed: u64,
        adaptation: Option<AdaptationSpec>,
    ) -> anyhow::Result<ChatResponse> {
        let item = &self.items[i];
        Ok(self.client.chat(
            model,
            &ChatRequest {
                messages: &item.messages,
                n,
                temperature,
                max_tokens: self.options.max_tokens,
                seed,
                adaptation,
            },
        )?)
    }

    /// k samples and a greedy answer for every scored question, with `arm`'s weights.
    fn evaluate(
        &self,
        arm: Arm,
        episode: usize,
        scored: std::ops::Range<usize>,
    ) -> anyhow::Result<Evaluation> {
        let o = self.options;
        let model = match arm {
            Arm::Base => self.model.to_string(),
            Arm::Adapted(..) => format!("{}:{}", self.model, self.adapter(arm)),
        };
        let started = Instant::now();
        let scores = self.parallel(scored, o.concurrency, |i| {
            let sampled = self.ask(&model, i, o.k, o.temperature, o.seed + i as u64, None)?;
            let greedy = self.ask(&model, i, 1, 0.0, o.seed, None)?;
            Ok(QuestionScore::new(
                i,
                &self.items[i],
                &sampled,
                Some(&greedy),
            ))
        })?;
        Ok(QuestionScore::evaluation(scores, episode, started))
    }

    /// The online protocol: every scored question once, with ephemeral adaptation, in
    /// concurrent waves of `batch`; its k answers (sampled after its episode) are scored.
    fn online(
        &self,
        arm: Arm,
        scored: std::ops::Range<usize>,
    ) -> anyhow::Result<(Evaluation, Vec<Batch>)> {
        let mut scores = Vec::new();
        let mut waves = Vec::new();
        for start in scored.clone().step_by(self.options.batch.max(1)) {
            let end = (start + self.options.batch).min(scored.end);
            let (wave, responses) = self.adapt(arm, 1, start..end, false)?;
            waves.push(wave);
            scores.extend(
                responses
                    .iter()
                    .map(|(i, r)| QuestionScore::new(*i, &self.items[*i], r, None)),
            );
        }
        // The answers came with the waves, whose time is counted there: scoring takes none.
        Ok((QuestionScore::evaluation(scores, 1, Instant::now()), waves))
    }

    /// Sends a batch of questions with adaptation on, together, so the server runs them as
    /// one episode, and reads its reports. Named: `arm`'s adapter answers greedily once;
    /// ephemeral (online): k samples at the eval temperature are the answers to score.
    fn adapt(
        &self,
        arm: Arm,
        episode: usize,
        questions: std::ops::Range<usize>,
        named: bool,
    ) -> anyhow::Result<(Batch, Vec<(usize, ChatResponse)>)> {
        let Arm::Adapted(method, rollout) = arm else {
            anyhow::bail!("the base arm does not adapt");
        };
        let o = self.options;
        let started = Instant::now();
        let first = questions.start;
        let count = questions.len();
        let responses = self.parallel(questions, count, |i| {
            let adaptation = AdaptationSpec {
                enabled: Some(true),
                method: Some(method.into()),
                rollout: Some(rollout.into()),
                steps: o.steps.map(|s| s as i64),
                answer_format: Some(self.items[i].format.into()),
                adapter: named.then(|| self.adapter(arm)),
                samples: o.samples.map(|s| s as i64),
            };
            let (n, temperature) = if named {
                (1, 0.0)
            } else {
                (o.k, o.temperature)
            };
            let response = self.ask(
                self.model,
                i,
                n,
                temperature,
                adaptation_seed(o.seed, i, episode),
                Some(adaptation),
            )?;
            anyhow::ensure!(
                response.adaptation.is_some(),
                "the server answered without an adaptation report: is it ttrl-serve?"
            );
            Ok((i, response))
        })?;
        let batch = self.batch(episode, first, &responses, started);
        Ok((batch, responses))
    }

    fn batch(
        &self,
        episode: usize,
        first: usize,
        responses: &[(usize, ChatResponse)],
        started: Instant,
    ) -> Batch {
        let responses: Vec<(usize, &AdaptationReport, usize)> = responses
            .iter()
            .filter_map(|(i, r)| Some((*i, r.adaptation.as_ref()?, r.completion_tokens)))
            .collect();
        // Requests of one server episode share its totals; count each episode once.
        let mut episodes: Vec<&AdaptationReport> = Vec::new();
        for &(_, r, _) in &responses {
            let key = (r.adapter_version_before, r.adapter_version, r.duration_ms);
            if !episodes
                .iter()
                .any(|e| (e.adapter_version_before, e.adapter_version, e.duration_ms) == key)
            {
                episodes.push(r);
            }
        }
        let entropies: Vec<f32> = responses
            .iter()
            .flat_map(|(_, r, _)| r.tree.iter().flat_map(|l| l.entropies.iter().copied()))
            .collect();
        let threshold = forking_threshold(&entropies, self.options.rho);
        let forking: Vec<f32> = entropies.into_iter().filter(|&h| h >= threshold).collect();
        let has_gold = responses
            .iter()
            .all(|(i, ..)| self.items[*i].gold.is_some());
        let label_accuracy = has_gold.then(|| {
            let right = responses
                .iter()
                .filter(|(i, r, _)| self.items[*i].is_gold(r.majority_answer.as_deref()))
                .count();
            right as f64 / responses.len() as f64
        });
        let votes = responses
            .iter()
            .map(|(i, r, _)| QuestionVote {
                vote_share: f64::from(r.vote_share),
                top_votes: r.votes.first().map_or(0, |v| v.1),
                trained: r.no_signal.is_none(),
                label_correct: has_gold
                    .then(|| self.items[*i].is_gold(r.majority_answer.as_deref())),
            })
            .collect();
        let reward_accuracy = has_gold.then(|| {
            let (agree, leaves) = responses.iter().fold((0, 0), |(agree, leaves), (i, r, _)| {
                let item = &self.items[*i];
                let same = r
                    .tree
                    .iter()
                    .filter(|l| (l.reward > 0.5) == item.is_gold(l.answer.as_deref()))
                    .count();
                (agree + same, leaves + r.tree.len())
            });
            agree as f64 / leaves.max(1) as f64
        });
        let mut notes: Vec<String> = Vec::new();
        for note in episodes.iter().filter_map(|e| e.note.as_ref()) {
            if !notes.contains(note) {
                notes.push(note.clone());
            }
        }
        Batch {
            episode,
            first_question: first,
            questions: responses.len(),
            applied: episodes.iter().any(|e| e.applied),
            rolled_back: episodes.iter().any(|e| e.rolled_back),
            adapter_version: episodes
                .iter()
                .map(|e| e.adapter_version)
                .max()
                .unwrap_or(0),
            vote_share: responses
                .iter()
                .map(|(_, r, _)| r.vote_share as f64)
                .sum::<f64>()
                / responses.len().max(1) as f64,
            label_accuracy,
            reward_accuracy,
            votes,
            forking_entropy: forking.iter().map(|&h| h as f64).sum::<f64>()
                / forking.len().max(1) as f64,
            forking_histogram: histogram(&forking),
            kl: finite_mean(episodes.iter().map(|e| e.kl)),
            kl_after: finite_mean(
                episodes
                    .iter()
                    .filter_map(|e| last_trained(&e.step_metrics, |s| s.trained_questions))
                    .map(|s| s.kl_after),
            ),
            loss: finite_mean(episodes.iter().map(|e| e.loss)),
            rollout_tokens: episodes.iter().map(|e| e.rollout_tokens).sum(),
            flat_equivalent_tokens: episodes.iter().map(|e| e.flat_equivalent_tokens).sum(),
            answer_tokens: responses.iter().map(|(.., t)| t).sum(),
            seconds: started.elapsed().as_secs_f64(),
            rounds: rounds(&episodes),
            notes,
        }
    }
}

/// The rounds of a batch's episodes, round by round.
fn rounds(episodes: &[&AdaptationReport]) -> Vec<Round> {
    let most = episodes.iter().map(|e| e.step_metrics.len()).max();
    (0..most.unwrap_or(0))
        .map(|r| {
            let steps: Vec<&StepMetrics> = episodes
                .iter()
                .filter_map(|e| e.step_metrics.get(r))
                .collect();
            let kl_after: Vec<f64> = (steps.iter())
                .filter(|s| s.trained_questions > 0 && s.kl_after.is_finite())
                .map(|s| f64::from(s.kl_after))
                .collect();
            let seconds = |ms: fn(&StepMetrics) -> u64| {
                steps.iter().map(|s| ms(s)).sum::<u64>() as f64 / 1000.0
            };
            Round {
                vote_share: results::mean(steps.iter().map(|s| f64::from(s.vote_share))),
                trained_questions: steps.iter().map(|s| s.trained_questions).sum(),
                applied: steps.iter().any(|s| s.applied),
                kl_after: (!kl_after.is_empty()).then(|| results::mean(kl_after)),
                rollout_seconds: seconds(|s| s.rollout_ms),
                update_seconds: seconds(|s| s.update_ms),
            }
        })
        .collect()
}

/// The seed question `question`'s adaptation request carries in pass `episode` (the first is
/// 1). The first pass keeps `seed + question`; each later one draws its rollouts afresh, as
/// TTRL's epochs do. With one seed for every pass, a pass whose rounds were all rolled back
/// would be sampled, and rolled back, again.
fn adaptation_seed(seed: u64, question: usize, episode: usize) -> u64 {
    let pass = episode.max(1) as u64 - 1;
    seed.wrapping_add(question as u64).wrapping_add(pass << 32)
}

/// The mean of the values that are numbers: a round whose loss was NaN (rolled back, and its
/// batch marked so) counts as none.
fn finite_mean(values: impl Iterator<Item = f32>) -> f64 {
    results::mean(values.filter(|v| v.is_finite()).map(f64::from))
}

#[cfg(test)]
mod tests {
    use super::adaptation_seed;

    #[test]
    fn each_pass_after_the_first_draws_its_rollouts_afresh() {
        assert_eq!(adaptation_seed(7, 3, 1), 10, "the first pass as before");
        let seeds: Vec<u64> = (1..=3)
            .flat_map(|pass| (0..8).map(move |q| adaptation_seed(7, q, pass)))
            .collect();
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), seeds.len());
    }
}
