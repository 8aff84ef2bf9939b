//! The wire types of ttrl-serve's extension to the OpenAI schema: the `adaptation` object a
//! request may carry, and the `adaptation` report an adapted response carries. The engine's
//! own types stay off the wire; these are what clients (the eval, the playground) read.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::adapt::{Method, StepReport};
use crate::engine;
use crate::reward::AnswerFormat;
use crate::rollout::RolloutKind;

/// Adapt to this request's batch before answering (ttrl-serve's extension; OpenAI SDK users
/// send it through `extra_body`). Fields left out take the server's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Adaptation)]
pub struct AdaptationSpec {
    /// Switches adaptation on; required unless the model is the `<model>+ttrl` alias.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodName>,
    /// A named adapter to train and answer with; without one, the request gets an ephemeral
    /// adapter of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub adapter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutName>,
    /// Rollouts per question (the votes).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 2, maximum = 64)]
    pub samples: Option<i64>,
    /// Rounds of rollouts and updates (default: the server's `steps` for a named adapter,
    /// its `ephemeral_steps` for a request's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 8)]
    pub steps: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_format: Option<AnswerFormatName>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MethodName {
    Spine,
    Ttrl,
    Answer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RolloutName {
    Tree,
    Flat,
}

/// How answers are read for the vote; `auto` picks `choice` for A-D options, else `number`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AnswerFormatName {
    Auto,
    Boxed,
    Number,
    Choice,
    Text,
}

/// Both ways between a wire enum and the settings' own, variant by variant.
macro_rules! same_variants {
    ($wire:ident, $ours:ty, [$($v:ident),+]) => {
        impl From<$wire> for $ours {
            fn from(w: $wire) -> Self {
                match w {
                    $($wire::$v => <$ours>::$v,)+
                }
            }
        }
        impl From<$ours> for $wire {
            fn from(o: $ours) -> Self {
                match o {
                    $(<$ours>::$v => $wire::$v,)+
                }
            }
        }
    };
}

same_variants!(MethodName, Method, [Spine, Ttrl, Answer]);
same_variants!(RolloutName, RolloutKind, [Tree, Flat]);
same_variants!(
    AnswerFormatName,
    AnswerFormat,
    [Auto, Boxed, Number, Choice, Text]
);

/// What an adapted response says of its episode, and what the playground draws.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdaptationReport {
    /// At least one round changed the adapter and was kept.
    pub applied: bool,
    pub method: String,
    pub rollout: String,
    pub adapter: Option<String>,
    /// The adapter's version before the episode and after it.
    pub adapter_version_before: u64,
    pub adapter_version: u64,
    pub steps: usize,
    pub rollouts: usize,
    pub rollout_tokens: usize,
    /// Tokens flat sampling would have decoded for the same leaves.
    pub flat_equivalent_tokens: usize,
    pub majority_answer: Option<String>,
    pub vote_share: f32,
    /// `[answer, votes]` pairs, the pseudo-label first, then by weight (by votes unless
    /// `vote_confidence` weighs the leaves).
    pub votes: Vec<(String, usize)>,
    pub forking_fraction: f32,
    pub mean_entropy: f32,
    /// The loss and KL of the last round that trained a question (see `step_metrics`); null
    /// when that round's loss was not a number (and it was rolled back).
    #[serde(with = "non_finite_as_null")]
    #[schema(value_type = Option<f32>)]
    pub loss: f32,
    #[serde(with = "non_finite_as_null")]
    #[schema(value_type = Option<f32>)]
    pub kl: f32,
    pub duration_ms: u64,
    /// The KL bound undid a round.
    pub rolled_back: bool,
    /// Why nothing was applied, or a warning (most leaves cut off).
    pub note: Option<String>,
    /// Why this question did not train (no real majority, every leaf agreeing), if it did not.
    pub no_signal: Option<String>,
    /// This question's leaves that hit the rollout budget and abstained.
    pub truncated_leaves: usize,
    pub batch_questions: usize,
    pub step_metrics: Vec<StepMetrics>,
    /// This question's leaves of the last round.
    pub tree: Vec<TreeLeaf>,
}

/// One round of an episode.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepMetrics {
    /// Null, like the other measures here, when it was not a number (the round was rolled back).
    #[serde(with = "non_finite_as_null")]
    #[schema(value_type = Option<f32>)]
    pub loss: f32,
    /// Mean k3 KL to the base model on the selected tokens while the round's steps ran.
    #[serde(with = "non_finite_as_null")]
    #[schema(value_type = Option<f32>)]
    pub kl: f32,
    /// Mean k3 KL to the base model per response token after the round (what `kl_bound`
    /// checks).
    #[serde(with = "non_finite_as_null")]
    #[schema(value_type = Option<f32>)]
    pub kl_after: f32,
    pub mean_forking_entropy: f32,
    pub forking_fraction: f32,
    pub vote_share: f32,
    #[serde(with = "non_finite_as_null")]
    #[schema(value_type = Option<f32>)]
    pub grad_norm: f32,
    pub applied: bool,
    pub trained_questions: usize,
    pub optimizer_steps: usize,
    pub truncated_leaves: usize,
    pub rollout_ms: u64,
    pub update_ms: u64,
}

/// One leaf of the tree view: tokens with their entropies, and where it forked.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TreeLeaf {
    /// Index (within this question's leaves) of the root it branched from.
    pub parent: Option<usize>,
    /// Token position of the fork.
    pub fork_at: Option<usize>,
    pub tokens: Vec<String>,
    pub entropies: Vec<f32>,
    pub answer: Option<String>,
    pub reward: f32,
    /// Cut off by the rollout budget: out of the vote and the loss.
    pub truncated: bool,
    /// It saw the question's options in reverse order (half of a multiple-choice question's
    /// leaves do); `answer` names the option as the question lists it.
    #[serde(default)]
    pub options_reversed: bool,
}

impl From<&StepReport> for StepMetrics {
    fn from(s: &StepReport) -> Self {
        Self {
            loss: s.loss,
            kl: s.kl,
            kl_after: s.kl_after,
            mean_forking_entropy: s.mean_forking_entropy,
            forking_fraction: s.forking_fraction,
            vote_share: s.vote_share,
            grad_norm: s.grad_norm,
            applied: s.applied,
            trained_questions: s.trained_questions,
            optimizer_steps: s.optimizer_steps,
            truncated_leaves: s.truncated_leaves,
            rollout_ms: s.rollout_ms,
            update_ms: s.update_ms,
        }
    }
}

impl From<engine::TreeLeaf> for TreeLeaf {
    fn from(l: engine::TreeLeaf) -> Self {
        Self {
            parent: l.parent,
            fork_at: l.fork_at,
            tokens: l.tokens,
            entropies: l.entropies,
            answer: l.answer,
            reward: l.reward,
            truncated: l.truncated,
            options_reversed: l.options_reversed,
        }
    }
}

impl From<engine::AdaptationReport> for AdaptationReport {
    fn from(r: engine::AdaptationReport) -> Self {
        Self {
            applied: r.applied,
            method: r.method.to_string(),
            rollout: r.rollout.to_string(),
            adapter: r.adapter,
            adapter_version_before: r.adapter_version_before,
            adapter_version: r.adapter_version,
            steps: r.steps,
            rollouts: r.rollouts,
            rollout_tokens: r.rollout_tokens,
            flat_equivalent_tokens: r.flat_equivalent_tokens,
            majority_answer: r.majority_answer,
            vote_share: r.vote_share,
            votes: r.votes,
            forking_fraction: r.forking_fraction,
            mean_entropy: r.mean_entropy,
            loss: r.loss,
            kl: r.kl,
            duration_ms: r.duration_ms,
            rolled_back: r.rolled_back,
            note: r.note,
            no_signal: r.no_signal,
            truncated_leaves: r.truncated_leaves,
            batch_questions: r.batch_questions,
            step_metrics: r.step_metrics.iter().map(StepMetrics::from).collect(),
            tree: r.tree.into_iter().map(TreeLeaf::from).collect(),
        }
    }
}

/// JSON has no NaN: a measure that is not a number (a round whose loss was NaN) goes on the
/// wire as null, which serde_json would write anyway, and reads back as NaN, where a plain
/// `f32` would refuse it.
mod non_finite_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f32, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            serializer.serialize_f32(*value)
        } else {
            serializer.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(deserializer)?.unwrap_or(f32::NAN))
    }
}
