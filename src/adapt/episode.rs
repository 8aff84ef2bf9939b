//! One adaptation episode: rollouts, majority-vote rewards, advantages, and an update of
//! the active LoRA only, repeated `steps` times. Leaves cut off by the rollout budget
//! abstain; a question trains only when its majority is real (for a multiple-choice one, in
//! both orders of its options); the update trains on a subset of the voters, one optimizer
//! step per `leaves_per_update` of a question's. A round with a non-finite loss or gradient,
//! or a KL to the base model above the bound, is undone (adapter and optimizer state).

use std::ops::Range;
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use super::advantage::{band_bounds, ear, forking_threshold, grpo};
use super::config::{AdaptConfig, Method};
use super::objective::{
    k3, leaves_loss, reference, token_values, Denominators, MicroBatchLoss, ObjectiveConfig,
    ObjectiveStats, TrainLeaf, LOGIT_ROWS,
};
use super::optim::{AdamW, AdamWConfig};
use crate::error::{Error, Result};
use crate::interrupt::Interrupt;
use crate::model::memory::PeakMemory;
use crate::model::{Adapter, Model, TextTokenizer};
use crate::reward::{
    canonical, detect_format, extract_answer, option_count, unreverse, weighted_vote, AnswerFormat,
    Vote,
};
use crate::rollout::{self, Leaf, Prompt, RolloutConfig, Rollouts, TreeShape};

/// An adapter with its optimizer state and version (+1 per applied step).
pub struct Learner {
    pub adapter: Adapter,
    pub optimizer: AdamW,
    pub version: u64,
}

impl Learner {
    pub fn new(adapter: Adapter, config: &AdaptConfig, version: u64) -> Result<Self> {
        let optimizer = AdamW::new(
            adapter.vars(),
            AdamWConfig {
                lr: config.lr,
                weight_decay: config.weight_decay,
                max_grad_norm: Some(config.grad_clip),
                warmup_steps: config.warmup_steps,
                eps: config.adam_eps,
                ..Default::default()
            },
        )?;
        Ok(Self {
            adapter,
            optimizer,
            version,
        })
    }
}

/// One question of the batch: its templated prompt and how to read its answers.
#[derive(Debug, Clone)]
pub struct Question {
    pub text: String,
    pub prompt: Vec<u32>,
    pub format: AnswerFormat,
    /// Options listed in a multiple-choice question's text (0 when none are found).
    pub options: usize,
    /// The prompt again with its options in reverse order, when they could be reordered.
    pub reversed: Option<Reversed>,
}

/// A multiple-choice prompt with its last `options` options in reverse order. Half of the
/// question's leaves are sampled from it and their letters read back to the original options
/// before the vote: a letter a model picks for its place then splits across two options.
#[derive(Debug, Clone)]
pub struct Reversed {
    pub prompt: Vec<u32>,
    pub options: usize,
}

impl Question {
    /// Resolves `auto` from the question text.
    pub fn new(text: String, prompt: Vec<u32>, format: AnswerFormat) -> Self {
        let format = if format == AnswerFormat::Auto {
            detect_format(&text)
        } else {
            format
        };
        let options = if format == AnswerFormat::Choice {
            option_count(&text)
        } else {
            0
        };
        Self {
            text,
            prompt,
            format,
            options,
            reversed: None,
        }
    }
}

/// The prompts an episode samples from: every question as asked (prompt q is question q),
/// then the reversed prompt of each question that has one, which takes half its leaves.
fn rollout_prompts(questions: &[Question], samples: usize) -> Vec<Prompt<'_>> {
    let asked = questions.iter().enumerate().map(|(q, question)| Prompt {
        tokens: &question.prompt,
        format: question.format,
        question: q,
        leaves: samples - question.reversed.as_ref().map_or(0, |_| samples / 2),
    });
    let reversed = questions.iter().enumerate().filter_map(|(q, question)| {
        Some(Prompt {
            tokens: &question.reversed.as_ref()?.prompt,
            format: question.format,
            question: q,
            leaves: samples / 2,
        })
    });
    asked.chain(reversed).collect()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuestionOutcome {
    pub majority_answer: Option<String>,
    pub vote_share: f32,
    /// (answer, votes) over all leaves of the last step, the label first.
    pub votes: Vec<(String, usize)>,
    /// Leaves that hit the rollout budget (they abstained).
    pub truncated: usize,
    /// Why the question gave no learning signal, when it gave none.
    pub no_signal: Option<String>,
    /// Per leaf of this question, in rollout order: its canonical answer (none when it
    /// abstained or gave none) and its reward.
    #[serde(skip)]
    pub leaf_answers: Vec<Option<String>>,
    #[serde(skip)]
    pub leaf_rewards: Vec<f32>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StepReport {
    pub loss: f32,
    /// Mean k3 KL to the base model on the selected tokens while the round's steps ran.
    pub kl: f32,
    /// Mean k3 KL to the base model per response token once the round's steps are taken
    /// (first micro-batch): how far the answers moved. Checked against `kl_bound`.
    pub kl_after: f32,
    pub mean_forking_entropy: f32,
    /// Share of the trained leaves' tokens the update selects: SPINE's forks, the answer
    /// spans, or all of them (1).
    pub forking_fraction: f32,
    pub vote_share: f32,
    /// Largest global gradient norm over the round's optimizer steps.
    pub grad_norm: f32,
    pub applied: bool,
    /// Questions that trained, optimizer steps taken, and leaves that hit the budget.
    pub trained_questions: usize,
    pub optimizer_steps: usize,
    pub truncated_leaves: usize,
    /// Wall time of the rollouts and of the update (loss, backward, step, KL check).
    pub rollout_ms: u64,
    pub update_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EpisodeReport {
    /// At least one step changed the adapter (and was kept).
    pub applied: bool,
    pub rolled_back: bool,
    /// Why nothing was applied when nothing was, and warnings (mostly truncated leaves).
    pub note: Option<String>,
    pub steps: Vec<StepReport>,
    pub rollouts: usize,
    pub rollout_tokens: usize,
    pub flat_equivalent_tokens: usize,
    pub questions: Vec<QuestionOutcome>,
    /// The last step's leaves, for the playground's tree view.
    #[serde(skip)]
    pub last_rollouts: Rollouts,
    pub duration_ms: u64,
    /// Highest device memory in use above the episode's start (rollout caches, the update's
    /// graph), where the device can be read.
    pub peak_memory_bytes: Option<u64>,
    /// The most rollout sequences decoded at once.
    pub widest_rollout_batch: usize,
}

impl EpisodeReport {
    /// The last round that trained a question (kept or rolled back), else the last round: a
    /// later round without a learning signal has no loss or KL of its own to report.
    pub fn last_trained(&self) -> Option<&StepReport> {
        last_trained(&self.steps, |s| s.trained_questions)
    }

    /// Whether `leaf`, one of `last_rollouts`, saw its question's options reversed.
    pub fn options_reversed(&self, leaf: &Leaf) -> bool {
        options_reversed(leaf, self.questions.len())
    }
}

/// Of an episode's rounds (as reported here or on the wire), the last that trained a question,
/// else the last: the round whose loss and KL a report shows.
pub fn last_trained<S>(rounds: &[S], trained_questions: impl Fn(&S) -> usize) -> Option<&S> {
    let trained = rounds.iter().rev().find(|&s| trained_questions(s) > 0);
    trained.or(rounds.last())
}

/// Prompts from `questions` on are reversed ones (see [`rollout_prompts`]).
fn options_reversed(leaf: &Leaf, questions: usize) -> bool {
    leaf.prompt >= questions
}

/// Why a question asked in both orders of its options has no pseudo-label when the leaves of
/// each order do not have the same clear top option: what the model prefers is a place in
/// the list, not an option.
fn orders_disagree(
    answers: &[Option<String>],
    weights: &[f32],
    in_reverse: &[bool],
) -> Option<String> {
    let top = |reverse: bool| {
        let (half, half_weights): (Vec<Option<String>>, Vec<f32>) = answers
            .iter()
            .zip(weights)
            .zip(in_reverse)
            .filter(|(_, &r)| r == reverse)
            .map(|((a, &w), _)| (a.clone(), w))
            .unzip();
        let vote = weighted_vote(&half, &half_weights);
        vote.label.filter(|_| !vote.tied)
    };
    match (top(false), top(true)) {
        (Some(listed), Some(reversed)) if listed == reversed => None,
        (Some(listed), Some(reversed)) => Some(format!(
            "the top option is {listed} among the leaves that saw the options as listed and {reversed} among those that saw them reversed"
        )),
        _ => Some("one order of the options has no clear top option".into()),
    }
}

/// What bounds an episode beside its settings: rollout sequences decoded at once (the
/// engine's `max_batch`) and when to stop early.
#[derive(Debug, Clone)]
pub struct EpisodeLimits {
    pub max_batch: usize,
    pub interrupt: Interrupt,
}

impl Default for EpisodeLimits {
    fn default() -> Self {
        Self {
            max_batch: usize::MAX,
            interrupt: Interrupt::never(),
        }
    }
}

/// Everything about a step's leaves that the update needs.
struct Scored {
    /// Leaves to train on, grouped by question (`groups` are ranges into it).
    train: Vec<TrainLeaf>,
    /// The rollout entropies of `train`'s leaves, at the rollout temperature.
    entropies: Vec<Vec<f32>>,
    groups: Vec<Range<usize>>,
    outcomes: Vec<QuestionOutcome>,
    forking_fraction: f32,
}

/// Why a vote is not a pseudo-label worth training on, if it is not.
fn weak_majority(vote: &Vote, question: &Question, config: &AdaptConfig) -> Option<String> {
    let Some((_, top)) = vote.counts.first() else {
        return Some("no leaf gave an answer".into());
    };
    if vote.tied {
        return Some(format!("a tie at {top} votes"));
    }
    let min_votes = config.min_majority_votes.max(2);
    if *top < min_votes {
        return Some(format!(
            "the top answer has {top} votes (min_majority_votes = {min_votes})"
        ));
    }
    // The vote's share is over all leaves, abstaining ones included.
    if vote.share < config.min_majority_share {
        return Some(format!(
            "the top answer has {:.2} of the votes (min_majority_share = {})",
            vote.share, config.min_majority_share
        ));
    }
    // Among C options a guess gets 1/C of the votes: the top letter must be well above it.
    if question.options >= 2 {
        let chance = 1.0 / question.options as f32;
        let needed = chance + config.choice_margin * (1.0 - chance);
        if vote.share < needed {
            return Some(format!(
                "the top option has {:.2} of the votes; with {} options chance is {chance:.2} and a pseudo-label needs {needed:.2} (choice_margin = {})",
                vote.share, question.options, config.choice_margin
            ));
        }
    }
    None
}

/// `k` indices spread evenly over `0..n` (all of them when k >= n).
fn spread(n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    (0..k).map(|j| j * n / k).collect()
}

fn score(rollouts: &Rollouts, questions: &[Question], config: &AdaptConfig) -> Scored {
    let mut train = Vec::new();
    let mut groups = Vec::new();
    let mut entropies: Vec<&[f32]> = Vec::new();
    let mut outcomes = Vec::new();
    for (q, question) in questions.iter().enumerate() {
        let leaves: Vec<_> = rollouts.leaves.iter().filter(|l| l.question == q).collect();
        let reversed = |l: &Leaf| {
            question
                .reversed
                .as_ref()
                .filter(|_| options_reversed(l, questions.len()))
        };
        let answers: Vec<Option<String>> = leaves
            .iter()
            .map(|l| {
                if l.truncated() {
                    return None;
                }
                let answer = canonical(&extract_answer(&l.text, question.format)?, question.format);
                Some(match reversed(l) {
                    Some(r) => unreverse(&answer, r.options),
                    None => answer,
                })
            })
            .collect();
        // Measured from the surest leaf, whose weight is 1: the same ranking as
        // exp(-vote_confidence x H), without underflowing to a tie at 0 for steep weights.
        let doubt: Vec<f32> = leaves.iter().map(|l| l.mean_entropy()).collect();
        let surest = doubt.iter().copied().fold(f32::INFINITY, f32::min);
        let weights: Vec<f32> = doubt
            .iter()
            .map(|h| (-config.vote_confidence * (h - surest)).exp())
            .collect();
        let vote = weighted_vote(&answers, &weights);
        let mut no_signal = weak_majority(&vote, question, config).or_else(|| {
            let in_reverse: Vec<bool> = leaves.iter().map(|l| reversed(l).is_some()).collect();
            question
                .reversed
                .as_ref()
                .and_then(|_| orders_disagree(&answers, &weights, &in_reverse))
        });
        let rewards = if no_signal.is_some() {
            vec![0.0; leaves.len()]
        } else {
            vote.rewards.clone()
        };
        if no_signal.is_none() {
            let voters: Vec<usize> = (0..leaves.len())
                .filter(|&i| !leaves[i].truncated())
                .collect();
            let chosen: Vec<usize> = spread(voters.len(), config.train_samples)
                .into_iter()
                .map(|j| voters[j])
                .collect();
            let chosen_rewards: Vec<f32> = chosen.iter().map(|&i| rewards[i]).collect();
            match grpo(&chosen_rewards) {
                None => no_signal = Some("every trained leaf got the same reward".into()),
                Some(mut adv) => {
                    if config.ear {
                        let mean_h: Vec<f32> =
                            chosen.iter().map(|&i| leaves[i].mean_entropy()).collect();
                        adv = ear(&adv, &mean_h);
                    }
                    let start = train.len();
                    for (&i, a) in chosen.iter().zip(adv) {
                        let leaf = leaves[i];
                        entropies.push(&leaf.entropies);
                        train.push(TrainLeaf {
                            prompt: reversed(leaf)
                                .map_or(&question.prompt, |r| &r.prompt)
                                .clone(),
                            response: leaf.response.clone(),
                            old_logprobs: leaf.logprobs.clone(),
                            ref_logprobs: Vec::new(),
                            mask: vec![true; leaf.response.len()],
                            policy_from: match config.method {
                                Method::Answer => leaf.answer_at,
                                Method::Ttrl | Method::Spine => 0,
                            },
                            advantage: a,
                        });
                    }
                    groups.push(start..train.len());
                }
            }
        }
        outcomes.push(QuestionOutcome {
            majority_answer: vote.label.clone(),
            vote_share: vote.share,
            votes: vote.counts.clone(),
            truncated: leaves.iter().filter(|l| l.truncated()).count(),
            no_signal,
            leaf_answers: answers,
            leaf_rewards: rewards,
        });
    }
    if config.method == Method::Spine {
        // Forking tokens: the top rho by rollout entropy over the leaves being trained.
        let all: Vec<f32> = entropies.iter().flat_map(|h| h.iter().copied()).collect();
        let tau = forking_threshold(&all, config.rho);
        for (t, h) in train.iter_mut().zip(&entropies) {
            t.mask = h.iter().map(|&x| x >= tau).collect();
        }
    }
    let forking_fraction = if train.is_empty() {
        1.0
    } else {
        let policy: usize = train.iter().map(TrainLeaf::policy_tokens).sum();
        policy as f32 / train.iter().map(|t| t.mask.len()).sum::<usize>() as f32
    };
    Scored {
        train,
        entropies: entropies.iter().map(|h| h.to_vec()).collect(),
        groups,
        outcomes,
        forking_fraction,
    }
}

/// Mean k3 KL of `adapter` to the base model over the response tokens of the first
/// micro-batch of leaves (their reference log-probs are already known): one forward.
fn mean_kl(
    model: &Model,
    adapter: &Adapter,
    leaves: &[TrainLeaf],
    config: &AdaptConfig,
) -> Result<f64> {
    let refs: Vec<&TrainLeaf> = leaves
        .iter()
        .filter(|l| !l.response.is_empty())
        .take(config.micro_batch.max(1))
        .collect();
    if refs.is_empty() {
        return Ok(0.0);
    }
    let adapted = token_values(model, Some(adapter), &refs, config.temperature)?;
    let mut sum = 0.0;
    let mut count = 0;
    for (leaf, (logp, _)) in refs.iter().zip(&adapted) {
        let ref_logp = Tensor::new(leaf.ref_logprobs.as_slice(), model.device())?;
        let logp = Tensor::new(logp.as_slice(), model.device())?;
        let k = k3(&ref_logp, &logp)?;
        sum += f64::from(k.sum_all()?.to_scalar::<f32>()?);
        count += k.elem_count();
    }
    Ok(sum / count.max(1) as f64)
}

fn is_finite(grads: &[Option<Tensor>]) -> Result<bool> {
    for g in grads.iter().flatten() {
        let s = g
            .to_dtype(DType::F64)?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !s.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The distinct reasons, in order, as one sentence.
fn reasons(outcomes: &[QuestionOutcome]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for r in outcomes.iter().filter_map(|o| o.no_signal.as_deref()) {
        if !seen.contains(&r) {
            seen.push(r);
        }
    }
    seen.join("; ")
}

/// Runs `config.steps` rounds of rollout and update on `learner`. An episode applies whole
/// rounds: out of time, it keeps those it finished; on any other error (a cancel included) or
/// with none finished, the learner is put back as it was.
pub fn run_episode(
    model: &Model,
    tok: &TextTokenizer,
    learner: &mut Learner,
    questions: &[Question],
    config: &AdaptConfig,
    seed: u64,
    limits: &EpisodeLimits,
) -> Result<EpisodeReport> {
    let before = (
        learner.adapter.snapshot()?,
        learner.optimizer.snapshot(),
        learner.version,
    );
    let result = run_rounds(model, tok, learner, questions, config, seed, limits);
    if result.is_err() {
        learner.adapter.set_tensors(&before.0)?;
        learner.optimizer.restore(before.1);
        learner.version = before.2;
    }
    result
}

/// An episode that runs out of `max_episode_seconds` keeps the rounds it finished (each was
/// applied whole and checked against the KL bound) and says so; the round it was in is undone
/// by the caller. With no round applied, or when cancelled, the interrupt stands.
fn keep_finished_rounds(
    error: Error,
    report: &mut EpisodeReport,
    limits: &EpisodeLimits,
    rounds: usize,
) -> Result<()> {
    match error {
        Error::Interrupted(why) if report.applied && limits.interrupt.timed_out() => {
            report.note = Some(format!(
                "stopped after {} of {rounds} rounds: {why}",
                report.steps.len()
            ));
            Ok(())
        }
        e => Err(e),
    }
}

fn run_rounds(
    model: &Model,
    tok: &TextTokenizer,
    learner: &mut Learner,
    questions: &[Question],
    config: &AdaptConfig,
    seed: u64,
    limits: &EpisodeLimits,
) -> Result<EpisodeReport> {
    let started = Instant::now();
    let mut memory = PeakMemory::start(model.device());
    let prompts = rollout_prompts(questions, config.samples);
    let spine = config.method == Method::Spine;
    let objective = ObjectiveConfig {
        temperature: config.temperature,
        clip_epsilon: config.clip_epsilon,
        lambda_kl: config.kl_weight(),
        lambda_band: if spine { config.lambda_band } else { 0.0 },
        logit_rows: LOGIT_ROWS,
    };
    let mut report = EpisodeReport {
        applied: false,
        rolled_back: false,
        note: None,
        steps: Vec::new(),
        rollouts: 0,
        rollout_tokens: 0,
        flat_equivalent_tokens: 0,
        questions: Vec::new(),
        last_rollouts: Rollouts::default(),
        duration_ms: 0,
        peak_memory_bytes: None,
        widest_rollout_batch: 0,
    };
    // Each round's rollouts draw their seed from the episode's. A fixed offset per round would
    // repeat another episode's rollouts whenever the two seeds differ by it (the next pass of
    // the same questions: a rolled-back round was then sampled again).
    let mut round_seeds = StdRng::seed_from_u64(seed);
    for _ in 0..config.steps.max(1) {
        let rollout_config = RolloutConfig {
            kind: config.rollout,
            tree: TreeShape::for_samples(
                config.samples,
                config.tree_rounds,
                config.tree_forks,
                config.tree_branches,
            ),
            temperature: config.temperature,
            top_p: config.top_p,
            max_tokens: config.max_tokens,
            seed: round_seeds.random(),
            max_batch: limits.max_batch,
        };
        let rollout_started = Instant::now();
        let rollouts = match rollout::run(
            model,
            tok,
            Some(&learner.adapter),
            &prompts,
            &rollout_config,
            &limits.interrupt,
        ) {
            Ok(rollouts) => rollouts,
            Err(e) => {
                keep_finished_rounds(e, &mut report, limits, config.steps)?;
                break;
            }
        };
        report.widest_rollout_batch = report.widest_rollout_batch.max(rollouts.widest_batch);
        let rollout_ms = rollout_started.elapsed().as_millis() as u64;
        memory.sample();
        let update_started = Instant::now();
        report.rollouts += rollouts.leaves.len();
        report.rollout_tokens += rollouts.generated_tokens;
        report.flat_equivalent_tokens += rollouts.flat_equivalent_tokens;
        let mut scored = score(&rollouts, questions, config);
        let truncated = rollouts.leaves.iter().filter(|l| l.truncated()).count();
        report.note = (2 * truncated > rollouts.leaves.len()).then(|| {
            format!(
                "{truncated} of {} leaves hit the rollout budget of {} tokens and abstained; \
                 raise adaptation max_tokens",
                rollouts.leaves.len(),
                config.max_tokens
            )
        });
        report.questions = scored.outcomes.clone();
        let vote_share = scored.outcomes.iter().map(|o| o.vote_share).sum::<f32>()
            / scored.outcomes.len().max(1) as f32;
        report.last_rollouts = rollouts;
        let mut step_report = StepReport {
            loss: 0.0,
            kl: 0.0,
            kl_after: 0.0,
            mean_forking_entropy: 0.0,
            forking_fraction: scored.forking_fraction,
            vote_share,
            grad_norm: 0.0,
            applied: false,
            trained_questions: scored.groups.len(),
            optimizer_steps: 0,
            truncated_leaves: truncated,
            rollout_ms,
            update_ms: 0,
        };
        if scored.train.is_empty() {
            let why = format!("no learning signal: {}", reasons(&scored.outcomes));
            report.note = Some(match report.note.take() {
                Some(n) => format!("{why}; {n}"),
                None => why,
            });
            report.steps.push(step_report);
            continue;
        }
        // The base model's log-probs (the KL anchor) and entropies (the band's anchor), once.
        // A fresh adapter (every ephemeral one, a new named one) is the base model, so the
        // rollouts already recorded them: the extra forward pass is needed only after a step.
        let base = if learner.adapter.is_identity()? {
            let recorded = scored.train.iter().zip(&scored.entropies);
            recorded
                .map(|(leaf, h)| (leaf.old_logprobs.clone(), h.clone()))
                .collect()
        } else {
            let leaves: Vec<&TrainLeaf> = scored.train.iter().collect();
            reference(model, &leaves, config.micro_batch, config.temperature)?
        };
        let mut base_forking = Vec::new();
        for (leaf, (logp, entropy)) in scored.train.iter_mut().zip(base) {
            base_forking.extend(
                entropy
                    .iter()
                    .zip(&leaf.mask)
                    .filter(|(_, &m)| m)
                    .map(|(h, _)| *h),
            );
            leaf.ref_logprobs = logp;
        }
        let band = (objective.lambda_band > 0.0).then(|| {
            band_bounds(
                &base_forking,
                config.band_low_quantile,
                config.band_high_quantile,
            )
        });
        let snapshot = (learner.adapter.snapshot()?, learner.optimizer.snapshot());
        let mut stats = ObjectiveStats::default();
        let mut losses = Vec::new();
        let mut failure = None;
        let mut interrupted = None;
        // Optimizer mini-batches: `leaves_per_update` leaves of one question at a time.
        let per_update = config.leaves_per_update.max(1);
        let mini_batches: Vec<Range<usize>> = scored
            .groups
            .iter()
            .flat_map(|g| {
                (g.start..g.end)
                    .step_by(per_update)
                    .map(move |s| s..(s + per_update).min(g.end))
            })
            .collect();
        'update: for range in mini_batches {
            let leaves = &scored.train[range];
            let denom = Denominators {
                selected_tokens: leaves.iter().flat_map(|l| &l.mask).filter(|&&m| m).count() as f32,
                policy_tokens: leaves.iter().map(TrainLeaf::policy_tokens).sum::<usize>() as f32,
                band,
            };
            let mut grads: Vec<Option<Tensor>> = vec![None; learner.adapter.vars().len()];
            let mut loss_value = 0.0f64;
            for chunk in leaves.chunks(config.micro_batch.max(1)) {
                if let Err(e) = limits.interrupt.check() {
                    interrupted = Some(e);
                    break 'update;
                }
                let MicroBatchLoss {
                    grads: chunk_grads,
                    mut value,
                    stats: s,
                } = leaves_loss(model, &learner.adapter, chunk, &objective, denom)?;
                if config.test_force_nonfinite_loss {
                    value = f64::NAN;
                }
                loss_value += value;
                stats.kl_sum += s.kl_sum;
                stats.kl_tokens += s.kl_tokens;
                stats.selected_entropy_sum += s.selected_entropy_sum;
                stats.selected_tokens += s.selected_tokens;
                memory.sample();
                for (acc, g) in grads.iter_mut().zip(chunk_grads) {
                    *acc = match (acc.take(), g) {
                        (Some(a), Some(g)) => Some((a + g)?),
                        (a, g) => a.or(g),
                    };
                }
            }
            losses.push(loss_value);
            if !loss_value.is_finite() || !is_finite(&grads)? {
                failure = Some(format!(
                    "rolled back: non-finite loss ({loss_value}) or gradient"
                ));
                break;
            }
            let stepped = learner.optimizer.step_with(&grads)?;
            step_report.grad_norm = step_report.grad_norm.max(stepped.grad_norm as f32);
            step_report.optimizer_steps += 1;
        }
        if let Some(e) = interrupted {
            learner.adapter.set_tensors(&snapshot.0)?;
            learner.optimizer.restore(snapshot.1);
            keep_finished_rounds(e, &mut report, limits, config.steps)?;
            break;
        }
        step_report.loss = (losses.iter().sum::<f64>() / losses.len().max(1) as f64) as f32;
        step_report.kl = (stats.kl_sum / stats.kl_tokens.max(1) as f64) as f32;
        step_report.mean_forking_entropy =
            (stats.selected_entropy_sum / stats.selected_tokens.max(1) as f64) as f32;
        if failure.is_none() {
            let kl_after = mean_kl(model, &learner.adapter, &scored.train, config)?;
            step_report.kl_after = kl_after as f32;
            if !kl_after.is_finite() || kl_after > config.kl_bound {
                failure = Some(format!(
                    "rolled back: KL to the base model {kl_after:.4} exceeds {}",
                    config.kl_bound
                ));
            }
        }
        step_report.update_ms = update_started.elapsed().as_millis() as u64;
        if let Some(why) = failure {
            learner.adapter.set_tensors(&snapshot.0)?;
            learner.optimizer.restore(snapshot.1);
            report.rolled_back = true;
            report.note = Some(why);
            report.steps.push(step_report);
            break;
        }
        learner.version += 1;
        report.applied = true;
        step_report.applied = true;
        report.steps.push(step_report);
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.peak_memory_bytes = memory.above_start();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::FinishReason;
    use crate::rollout::Leaf;

    fn leaf(question: usize, text: &str, entropies: &[f32], finish: FinishReason) -> Leaf {
        Leaf {
            question,
            prompt: question,
            fork: None,
            response: (0..entropies.len() as u32).collect(),
            logprobs: vec![-1.0; entropies.len()],
            entropies: entropies.to_vec(),
            text: text.into(),
            finish,
            // These texts are the answer alone.
            answer_at: 0,
        }
    }

    fn rollouts(leaves: Vec<Leaf>) -> Rollouts {
        Rollouts {
            leaves,
            ..Default::default()
        }
    }

    fn question(prompt: &[u32]) -> Question {
        Question::new(
            "What is 2 plus 2?".into(),
            prompt.to_vec(),
            AnswerFormat::Number,
        )
    }

    const STOP: FinishReason = FinishReason::Stop;

    #[test]
    fn truncated_leaves_abstain_and_are_not_trained() {
        let config = AdaptConfig::default();
        let r = rollouts(vec![
            leaf(0, "4", &[1.0, 0.5], STOP),
            leaf(0, "4", &[1.0, 0.5], STOP),
            leaf(0, "4", &[1.0, 0.5], STOP),
            leaf(0, "5", &[1.0, 0.5], STOP),
            // Cut off: its "7" is not an answer.
            leaf(0, "7 and then", &[1.0, 0.5], FinishReason::Length),
        ]);
        let s = score(&r, &[question(&[1, 2])], &config);
        let o = &s.outcomes[0];
        assert_eq!(o.truncated, 1);
        assert_eq!(o.leaf_answers[4], None);
        assert_eq!(o.votes, vec![("4".into(), 3), ("5".into(), 1)]);
        assert_eq!(o.no_signal, None);
        assert_eq!(s.train.len(), 4, "the cut-off leaf is not trained");
    }

    #[test]
    fn the_report_reads_loss_and_kl_from_the_last_round_that_trained() {
        let round = |trained_questions, kl| StepReport {
            trained_questions,
            kl,
            ..StepReport::default()
        };
        let report = |steps| EpisodeReport {
            steps,
            ..EpisodeReport::default()
        };
        let quiet_last = report(vec![round(1, 0.3), round(2, 0.5), round(0, 0.0)]);
        assert_eq!(quiet_last.last_trained().map(|s| s.kl), Some(0.5));
        let never = report(vec![round(0, 0.0), round(0, 0.1)]);
        assert_eq!(never.last_trained().map(|s| s.kl), Some(0.1));
        assert_eq!(report(Vec::new()).last_trained(), None);
    }

    #[test]
    fn a_weak_or_tied_majority_gives_no_signal() {
        let config = AdaptConfig::default();
        let cases = [
            (vec!["4", "4", "5", "5", "6", "7"], "a tie at 2 votes"),
            (vec!["4", "4", "5", "6", "7", "8"], "2 votes"),
            (
                vec![
                    "4", "4", "4", "5", "6", "7", "8", "9", "1", "2", "3", "10", "11", "12", "13",
                    "14",
                ],
                "of the votes",
            ),
        ];
        for (answers, why) in cases {
            let leaves = answers.iter().map(|a| leaf(0, a, &[1.0], STOP)).collect();
            let s = score(&rollouts(leaves), &[question(&[1])], &config);
            let got = s.outcomes[0].no_signal.clone().unwrap_or_default();
            assert!(got.contains(why), "{answers:?}: {got:?}");
            assert!(s.train.is_empty());
            assert!(s.outcomes[0].leaf_rewards.iter().all(|&r| r == 0.0));
        }
    }

    #[test]
    fn the_vote_weighs_leaves_by_their_confidence_unless_set_to_count() {
        // Four unsure leaves say 7, three sure ones say 12.
        let mut leaves: Vec<Leaf> = (0..4).map(|_| leaf(0, "7", &[2.0, 2.0], STOP)).collect();
        leaves.extend((0..3).map(|_| leaf(0, "12", &[0.1, 0.1], STOP)));
        let label = |vote_confidence| {
            let config = AdaptConfig {
                vote_confidence,
                ..Default::default()
            };
            let s = score(&rollouts(leaves.clone()), &[question(&[1])], &config);
            let o = s.outcomes[0].clone();
            assert_eq!(o.no_signal, None);
            (o.majority_answer.unwrap(), o.votes[0].1, o.leaf_rewards)
        };
        let sure = vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(label(2.0), ("12".to_string(), 3, sure));
        let most = vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0];
        assert_eq!(label(0.0), ("7".to_string(), 4, most));
        // A steep weight still names the surest answer rather than underflowing to a tie.
        assert_eq!(label(10_000.0).0, "12");
    }

    #[test]
    fn a_multiple_choice_majority_near_chance_gives_no_signal() {
        let config = AdaptConfig::default();
        let arc = "Which is a mammal?\nA. shark\nB. whale\nC. trout\nD. eel";
        let mc = Question::new(arc.into(), vec![1], AnswerFormat::Auto);
        assert_eq!(mc.options, 4);
        let votes = |a: &[&str]| rollouts(a.iter().map(|a| leaf(0, a, &[1.0], STOP)).collect());
        // 3 of 8 for B: above min_majority_share, but a guess among 4 gets 2 of 8.
        let near_chance = votes(&["B", "B", "B", "A", "A", "C", "D", "C"]);
        let s = score(&near_chance, std::slice::from_ref(&mc), &config);
        let why = s.outcomes[0].no_signal.clone().unwrap_or_default();
        assert!(why.contains("chance is 0.25"), "{why}");
        // 5 of 8: a pseudo-label.
        let clear = votes(&["B", "B", "B", "A", "B", "C", "B", "C"]);
        let s = score(&clear, std::slice::from_ref(&mc), &config);
        assert_eq!(s.outcomes[0].no_signal, None);
        // The same 3 of 8 on an open question trains.
        let open = votes(&["7", "7", "7", "1", "1", "2", "3", "2"]);
        assert_eq!(
            score(&open, &[question(&[1])], &config).outcomes[0].no_signal,
            None
        );
    }

    #[test]
    fn votes_from_reversed_options_count_the_option_they_name() {
        let config = AdaptConfig::default();
        let arc = "Which is a mammal?\nA. shark\nB. whale\nC. trout\nD. eel";
        let mut mc = Question::new(arc.into(), vec![1], AnswerFormat::Auto);
        mc.reversed = Some(Reversed {
            prompt: vec![2],
            options: 4,
        });
        let prompts = rollout_prompts(std::slice::from_ref(&mc), 8);
        let split: Vec<_> = prompts.iter().map(|p| (p.tokens, p.leaves)).collect();
        assert_eq!(split, vec![(&[1u32][..], 4), (&[2u32][..], 4)]);
        // Prompt 1 lists the options reversed: its "C" is the question's B.
        let votes = |asked: &[&str], reversed: &[&str]| {
            let asked = asked.iter().map(|a| leaf(0, a, &[1.0], STOP));
            let reversed = reversed.iter().map(|a| Leaf {
                prompt: 1,
                ..leaf(0, a, &[1.0], STOP)
            });
            rollouts(asked.chain(reversed).collect())
        };
        let s = score(
            &votes(&["B", "B", "B", "A"], &["C", "C", "B", "C"]),
            std::slice::from_ref(&mc),
            &config,
        );
        let o = &s.outcomes[0];
        assert_eq!(o.majority_answer.as_deref(), Some("B"));
        assert_eq!(o.votes[0], ("B".into(), 6));
        assert_eq!(o.leaf_answers[4].as_deref(), Some("B"));
        assert_eq!(o.leaf_answers[6].as_deref(), Some("C"));
        // Each trained leaf is trained on the prompt it was sampled from.
        let trained: Vec<&[u32]> = s.train.iter().map(|t| t.prompt.as_slice()).collect();
        assert!(trained.contains(&&[1u32][..]) && trained.contains(&&[2u32][..]));
        // A model that answers "B" wherever B stands votes for two options: no majority.
        let s = score(
            &votes(&["B", "B", "B", "B"], &["B", "B", "B", "B"]),
            std::slice::from_ref(&mc),
            &config,
        );
        assert_eq!(s.outcomes[0].no_signal.as_deref(), Some("a tie at 4 votes"));
        // B wins 6 of 12, but the reversed leaves' top option is A: a preference for a place.
        let s = score(
            &votes(
                &["B", "B", "B", "B", "A", "C"],
                &["D", "D", "D", "C", "C", "A"],
            ),
            std::slice::from_ref(&mc),
            &config,
        );
        let o = &s.outcomes[0];
        assert_eq!((o.votes[0].clone(), o.vote_share), (("B".into(), 6), 0.5));
        let why = o.no_signal.clone().unwrap_or_default();
        assert!(why.contains("B among the leaves that saw the options as listed and A among those that saw them reversed"), "{why}");
        assert!(s.train.is_empty());
    }

    /// Regression: masks were looked up by prompt text, so two questions with the same
    /// prompt in one batch lost their SPINE masks. Each trained leaf's mask is its own.
    #[test]
    fn identical_prompts_keep_their_own_forking_masks() {
        let config = AdaptConfig {
            method: Method::Spine,
            rho: 0.5,
            ..Default::default()
        };
        let high = [3.0, 0.1, 0.1, 3.0];
        let low = [0.1, 3.0, 3.0, 0.1];
        let mut leaves = Vec::new();
        for q in 0..2 {
            for (text, h) in [("4", high), ("4", low), ("4", high), ("5", low)] {
                leaves.push(leaf(q, text, &h, STOP));
            }
        }
        let same = [question(&[9, 9]), question(&[9, 9])];
        let s = score(&rollouts(leaves.clone()), &same, &config);
        assert_eq!(s.groups, vec![0..4, 4..8]);
        for (t, l) in s.train.iter().zip(&leaves) {
            let want: Vec<bool> = l.entropies.iter().map(|&h| h >= 3.0).collect();
            assert_eq!(t.mask, want);
        }
    }

    #[test]
    fn the_answer_method_rewards_only_the_final_answer_span_and_anchors_every_token() {
        let config = AdaptConfig {
            method: Method::Answer,
            ..Default::default()
        };
        let spans = [
            (4, "So 2 + 2 = 4."),
            (1, "4"),
            (2, "It is 4."),
            (4, "So 2 + 2 = 5."),
            (6, "It is"),
        ];
        let leaves = spans
            .iter()
            .map(|&(at, text)| Leaf {
                answer_at: at,
                ..leaf(0, text, &[1.0; 6], STOP)
            })
            .collect();
        let s = score(&rollouts(leaves), &[question(&[1])], &config);
        assert_eq!(s.outcomes[0].no_signal, None);
        for (t, (at, text)) in s.train.iter().zip(spans) {
            assert_eq!((t.policy_from, t.policy_tokens()), (at, 6 - at), "{text}");
            // The KL anchor reads every token.
            assert_eq!(t.mask, vec![true; 6], "{text}");
        }
        // 2 + 5 + 4 + 2 + 0 of 5 x 6 tokens.
        assert_eq!(s.forking_fraction, 13.0 / 30.0);
    }

    #[test]
    fn training_takes_an_even_spread_of_the_voters() {
        assert_eq!(spread(8, 4), vec![0, 2, 4, 6]);
        assert_eq!(spread(3, 5), vec![0, 1, 2]);
        assert_eq!(spread(32, 16).len(), 16);
    }
}
