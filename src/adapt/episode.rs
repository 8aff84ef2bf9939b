//! One adaptation episode: rollouts, majority-vote rewards, advantages, and an update of
//! the active LoRA only, repeated `steps` times. A step with a non-finite loss or gradient,
//! or a KL to the base model above the bound, is undone (adapter and optimizer state).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::advantage::{ear, forking_threshold, grpo};
use super::config::{AdaptConfig, Method};
use super::objective::{
    k3, leaves_loss, token_logprobs, Denominators, ObjectiveConfig, ObjectiveStats, TrainLeaf,
};
use super::optim::{AdamW, AdamWConfig};
use crate::error::Result;
use crate::model::memory::PeakMemory;
use crate::model::{Adapter, Model, TextTokenizer};
use crate::reward::{canonical, detect_format, extract_answer, majority_vote, AnswerFormat};
use crate::rollout::{self, RolloutConfig, Rollouts, TreeShape};

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
}

impl Question {
    /// Resolves `auto` from the question text.
    pub fn new(text: String, prompt: Vec<u32>, format: AnswerFormat) -> Self {
        let format = if format == AnswerFormat::Auto {
            detect_format(&text)
        } else {
            format
        };
        Self {
            text,
            prompt,
            format,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QuestionOutcome {
    pub majority_answer: Option<String>,
    pub vote_share: f32,
    /// (answer, votes) over all leaves of the last step.
    pub votes: Vec<(String, usize)>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepReport {
    pub loss: f32,
    pub kl: f32,
    pub mean_forking_entropy: f32,
    pub forking_fraction: f32,
    pub vote_share: f32,
    pub grad_norm: f32,
    pub applied: bool,
    /// Wall time of the rollouts and of the update (loss, backward, step, KL check).
    pub rollout_ms: u64,
    pub update_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpisodeReport {
    /// At least one step changed the adapter (and was kept).
    pub applied: bool,
    pub rolled_back: bool,
    /// Why nothing was applied, when nothing was.
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
}

/// Everything about a step's leaves that the update needs.
struct Scored {
    train: Vec<TrainLeaf>,
    outcomes: Vec<QuestionOutcome>,
    forking_fraction: f32,
}

fn score(rollouts: &Rollouts, questions: &[Question], config: &AdaptConfig) -> Scored {
    let mut train = Vec::new();
    let mut outcomes = Vec::new();
    for (q, question) in questions.iter().enumerate() {
        let leaves: Vec<_> = rollouts.leaves.iter().filter(|l| l.question == q).collect();
        let answers: Vec<Option<String>> = leaves
            .iter()
            .map(|l| {
                extract_answer(&l.text, question.format).map(|a| canonical(&a, question.format))
            })
            .collect();
        let vote = majority_vote(&answers);
        outcomes.push(QuestionOutcome {
            majority_answer: vote.label.clone(),
            vote_share: vote.share,
            votes: vote.counts.clone(),
        });
        let Some(mut adv) = grpo(&vote.rewards) else {
            continue;
        };
        if config.ear {
            let mean_h: Vec<f32> = leaves
                .iter()
                .map(|l| l.entropies.iter().sum::<f32>() / l.entropies.len().max(1) as f32)
                .collect();
            adv = ear(&adv, &mean_h);
        }
        for (leaf, a) in leaves.iter().zip(adv) {
            train.push(TrainLeaf {
                prompt: question.prompt.clone(),
                response: leaf.response.clone(),
                old_logprobs: leaf.logprobs.clone(),
                mask: vec![true; leaf.response.len()],
                advantage: a,
            });
        }
    }
    let mut forking_fraction = 1.0;
    if config.method == Method::Spine {
        let all: Vec<f32> = rollouts
            .leaves
            .iter()
            .filter(|l| questions.get(l.question).is_some())
            .flat_map(|l| l.entropies.iter().copied())
            .collect();
        let tau = forking_threshold(&all, config.rho);
        let mut selected = 0;
        let mut total = 0;
        // Masks come from the rollout entropies of the leaves being trained.
        let entropies: HashMap<(usize, Vec<u32>), &Vec<f32>> = rollouts
            .leaves
            .iter()
            .map(|l| ((l.question, l.response.clone()), &l.entropies))
            .collect();
        for t in &mut train {
            let q = questions
                .iter()
                .position(|x| x.prompt == t.prompt)
                .unwrap_or(0);
            if let Some(h) = entropies.get(&(q, t.response.clone())) {
                t.mask = h.iter().map(|&x| x >= tau).collect();
            }
            selected += t.mask.iter().filter(|&&m| m).count();
            total += t.mask.len();
        }
        forking_fraction = selected as f32 / total.max(1) as f32;
    }
    Scored {
        train,
        outcomes,
        forking_fraction,
    }
}

/// Mean k3 KL of `adapter` to the base model over the response tokens of the first
/// micro-batch of leaves: an estimate that costs two forwards, not two per micro-batch.
fn mean_kl(
    model: &Model,
    adapter: &Adapter,
    leaves: &[TrainLeaf],
    config: &AdaptConfig,
) -> Result<f64> {
    let mut sum = 0.0;
    let mut count = 0;
    for chunk in leaves.chunks(config.micro_batch.max(1)).take(1) {
        let refs: Vec<&TrainLeaf> = chunk.iter().filter(|l| !l.response.is_empty()).collect();
        if refs.is_empty() {
            continue;
        }
        let adapted = token_logprobs(model, Some(adapter), &refs, config.temperature)?;
        let base = token_logprobs(model, None, &refs, config.temperature)?;
        for ((logp, _), (ref_logp, _)) in adapted.iter().zip(&base) {
            let k = k3(&ref_logp.detach(), &logp.detach())?;
            sum += f64::from(k.sum_all()?.to_scalar::<f32>()?);
            count += k.elem_count();
        }
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

/// Runs `config.steps` rounds of rollout and update on `learner`.
pub fn run_episode(
    model: &Model,
    tok: &TextTokenizer,
    learner: &mut Learner,
    questions: &[Question],
    config: &AdaptConfig,
    seed: u64,
) -> Result<EpisodeReport> {
    let started = Instant::now();
    let mut memory = PeakMemory::start(model.device());
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| q.prompt.clone()).collect();
    let objective = ObjectiveConfig {
        temperature: config.temperature,
        clip_epsilon: config.clip_epsilon,
        lambda_kl: config.lambda_kl,
        lambda_band: if config.method == Method::Spine {
            config.lambda_band
        } else {
            0.0
        },
        band_low_quantile: config.band_low_quantile,
        band_high_quantile: config.band_high_quantile,
        masked_kl: config.method == Method::Spine,
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
    };
    for step in 0..config.steps.max(1) {
        let rollout_config = RolloutConfig {
            kind: config.rollout,
            samples: config.samples,
            tree: TreeShape::for_samples(config.samples, config.tree_forks, config.tree_branches),
            temperature: config.temperature,
            top_p: config.top_p,
            max_tokens: config.max_tokens,
            seed: seed.wrapping_add((step as u64) << 32),
        };
        let rollout_started = Instant::now();
        let rollouts = rollout::run(
            model,
            tok,
            Some(&learner.adapter),
            &prompts,
            &rollout_config,
        )?;
        let rollout_ms = rollout_started.elapsed().as_millis() as u64;
        memory.sample();
        let update_started = Instant::now();
        report.rollouts += rollouts.leaves.len();
        report.rollout_tokens += rollouts.generated_tokens;
        report.flat_equivalent_tokens += rollouts.flat_equivalent_tokens;
        let scored = score(&rollouts, questions, config);
        report.questions = scored.outcomes.clone();
        let vote_share = scored.outcomes.iter().map(|o| o.vote_share).sum::<f32>()
            / scored.outcomes.len().max(1) as f32;
        report.last_rollouts = rollouts;
        if scored.train.is_empty() {
            report.note = Some(
                "no learning signal: every question's leaves agreed (or gave no answer)".into(),
            );
            report.steps.push(StepReport {
                loss: 0.0,
                kl: 0.0,
                mean_forking_entropy: 0.0,
                forking_fraction: scored.forking_fraction,
                vote_share,
                grad_norm: 0.0,
                applied: false,
                rollout_ms,
                update_ms: 0,
            });
            continue;
        }
        let denom = Denominators {
            tokens: scored
                .train
                .iter()
                .map(|t| t.response.len())
                .sum::<usize>()
                .max(1) as f32,
            band_leaves: scored
                .train
                .iter()
                .filter(|t| t.mask.iter().any(|&m| m))
                .count() as f32,
        };
        let snapshot = (learner.adapter.snapshot()?, learner.optimizer.snapshot());
        let mut grads: Vec<Option<Tensor>> = vec![None; learner.adapter.vars().len()];
        let mut loss_value = 0.0f64;
        let mut stats = ObjectiveStats::default();
        for chunk in scored.train.chunks(config.micro_batch.max(1)) {
            let (mut loss, s) = leaves_loss(model, &learner.adapter, chunk, &objective, denom)?;
            if config.test_force_nonfinite_loss {
                loss = (loss * f64::NAN)?;
            }
            loss_value += f64::from(loss.to_scalar::<f32>()?);
            stats.kl_sum += s.kl_sum;
            stats.kl_tokens += s.kl_tokens;
            stats.selected_entropy_sum += s.selected_entropy_sum;
            stats.selected_tokens += s.selected_tokens;
            let store = loss.backward()?;
            memory.sample();
            for (acc, g) in grads.iter_mut().zip(learner.optimizer.gradients(&store)) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
        }
        let grad_norm = AdamW::grad_norm(&grads)?;
        let mut step_report = StepReport {
            loss: loss_value as f32,
            kl: (stats.kl_sum / stats.kl_tokens.max(1) as f64) as f32,
            mean_forking_entropy: (stats.selected_entropy_sum / stats.selected_tokens.max(1) as f64)
                as f32,
            forking_fraction: scored.forking_fraction,
            vote_share,
            grad_norm: grad_norm as f32,
            applied: false,
            rollout_ms,
            update_ms: 0,
        };
        let rollback =
            |learner: &mut Learner, why: String, report: &mut EpisodeReport| -> Result<()> {
                learner.adapter.set_tensors(&snapshot.0)?;
                learner.optimizer.restore(snapshot.1.clone());
                report.rolled_back = true;
                report.note = Some(why);
                Ok(())
            };
        if !loss_value.is_finite() || !is_finite(&grads)? {
            rollback(
                learner,
                format!("rolled back: non-finite loss ({loss_value}) or gradient"),
                &mut report,
            )?;
            step_report.update_ms = update_started.elapsed().as_millis() as u64;
            report.steps.push(step_report);
            break;
        }
        learner.optimizer.step_with(&grads)?;
        let kl_after = mean_kl(model, &learner.adapter, &scored.train, config)?;
        if !kl_after.is_finite() || kl_after > config.kl_bound {
            rollback(
                learner,
                format!(
                    "rolled back: KL to the base model {kl_after:.4} exceeds {}",
                    config.kl_bound
                ),
                &mut report,
            )?;
            step_report.update_ms = update_started.elapsed().as_millis() as u64;
            report.steps.push(step_report);
            break;
        }
        learner.version += 1;
        report.applied = true;
        step_report.applied = true;
        step_report.update_ms = update_started.elapsed().as_millis() as u64;
        report.steps.push(step_report);
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.peak_memory_bytes = memory.above_start();
    Ok(report)
}
