//! Adaptation knobs with their defaults (the `[adaptation]` table of the settings file).
//! The defaults follow the TTRL, SPINE and ETTRL papers, CPU-sized where they use GPUs.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::model::LoraConfig;
use crate::rollout::RolloutKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Token-selective: PPO-clip on forking tokens, entropy band, masked KL.
    Spine,
    /// Every token, plain KL, no band: the default, which measured better per request.
    #[default]
    Ttrl,
    /// The policy term on the final answer span only ("the answer is 12."), the KL anchor on
    /// every token, no band: the reasoning gets no reward and is held to the base model's,
    /// length included.
    Answer,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Spine => "spine",
            Method::Ttrl => "ttrl",
            Method::Answer => "answer",
        }
    }

    /// The KL anchor's weight unless the settings set one: TTRL's 0.001 where the policy term
    /// reads every token the anchor does; 0.1 for the answer method, whose anchor alone holds
    /// the reasoning its policy term leaves unrewarded (at TTRL's weight that reasoning
    /// drifted and greedy decoding broke).
    pub fn lambda_kl(self) -> f32 {
        match self {
            Method::Answer => 0.1,
            Method::Ttrl | Method::Spine => 0.001,
        }
    }
}

/// Leaves per question a request (or the server's default) may ask for: a vote needs two.
pub const SAMPLES: RangeInclusive<usize> = 2..=64;
/// Rounds per episode a request (or the server's default) may ask for.
pub const STEPS: RangeInclusive<usize> = 1..=8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptConfig {
    pub method: Method,
    pub rollout: RolloutKind,
    /// Leaves voted on per question (TTRL votes over 64 and trains on 32).
    pub samples: usize,
    /// Leaves per question the update trains on, a spread-out subset of the voters.
    pub train_samples: usize,
    /// ETMR as EPTree grows it: rounds (L), forks per tree in each round (N) and branches per
    /// fork (B); roots M = ceil(samples / (1 + L N B)).
    pub tree_rounds: usize,
    pub tree_forks: usize,
    pub tree_branches: usize,
    /// Rollout sampling temperature (TTRL: 0.6 for general models, 1.0 for math-tuned).
    pub temperature: f32,
    pub top_p: f32,
    /// Rollout budget in tokens; a leaf that reaches it abstains from the vote and the loss.
    pub max_tokens: usize,
    /// A question trains only when its top answer has at least this many votes...
    pub min_majority_votes: usize,
    /// ...and at least this share of all its leaves, and no tie.
    pub min_majority_share: f32,
    /// A multiple-choice question among C options trains only when its top option's share
    /// is at least 1/C + choice_margin (1 - 1/C): this far from chance (0) toward every leaf
    /// agreeing (1). A letter the model picks at about chance is no pseudo-label.
    pub choice_margin: f32,
    /// The vote weighs each finished leaf exp(-vote_confidence x its mean token entropy), so
    /// answers written with less doubt count more (DeepConf's confidence-weighted voting,
    /// arXiv 2508.15260); 0 counts every leaf the same (TTRL's plain majority). The gates
    /// above still read the label's votes in leaves.
    pub vote_confidence: f32,
    /// Share of tokens that count as forking (top-rho entropy over the batch).
    pub rho: f32,
    /// SPINE's entropy band, anchored to these quantiles of the base model's forking
    /// entropies (LoRA off, once per step); it acts only on forks outside them.
    pub band_low_quantile: f32,
    pub band_high_quantile: f32,
    /// Weight of the KL anchor; unset, the method's own ([`Method::lambda_kl`]).
    pub lambda_kl: Option<f32>,
    /// 0 turns the band off.
    pub lambda_band: f32,
    pub clip_epsilon: f32,
    pub lr: f64,
    /// Optimizer steps over which the learning rate ramps up from lr / warmup_steps.
    pub warmup_steps: u32,
    /// AdamW's epsilon. At 1e-8 a fresh adapter's first steps move every weight by about lr
    /// in the sign of its gradient; near the gradients' own size (about 1e-3 for LoRA here,
    /// where a clipped global norm of 1 spreads over millions of weights) steps follow the
    /// gradient's size instead.
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Rollout + update rounds per episode of a named adapter: the second round votes on
    /// answers sampled after the first update. A named adapter learns over every episode it
    /// is sent, so two rounds each keep an episode short.
    pub steps: usize,
    /// Rounds per episode of an ephemeral adapter (a request without `adapter`): its one
    /// episode is all the learning it gets. Four rounds measured +0.22 pass@1 online on
    /// explained answers, where two gave +0.07.
    pub ephemeral_steps: usize,
    /// Leaves of one question per optimizer step (a PPO mini-batch): several steps per
    /// question, so a fresh adapter gets past Adam's sign-like first step within one round.
    pub leaves_per_update: usize,
    /// Entropy-based advantage reshaping (ETTRL), its factor clamped to [0, 2].
    pub ear: bool,
    /// A round whose mean k3 KL to the base model exceeds this is rolled back.
    pub kl_bound: f64,
    /// Leaves per forward/backward pass during the update (memory against speed).
    pub micro_batch: usize,
    /// Adaptation requests for one adapter arriving within this window form one batch.
    pub batch_window_ms: u64,
    pub max_questions: usize,
    /// An episode still running after this long stops: it keeps the rounds it finished, and
    /// with none finished its requests are answered with the weights they had
    /// (`applied: false`, with a note).
    pub max_episode_seconds: f64,
    /// Longest prompt (tokens) an adaptation request may carry.
    pub max_prompt_tokens: usize,
    pub lora: LoraConfig,
    /// Testing only: make every loss NaN to exercise the rollback path.
    pub test_force_nonfinite_loss: bool,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            method: Method::Ttrl,
            rollout: RolloutKind::Flat,
            samples: 32,
            train_samples: 16,
            tree_rounds: 3,
            tree_forks: 1,
            tree_branches: 1,
            temperature: 0.8,
            top_p: 1.0,
            max_tokens: 96,
            min_majority_votes: 3,
            min_majority_share: 0.2,
            choice_margin: 0.3,
            vote_confidence: 2.0,
            rho: 0.2,
            band_low_quantile: 0.05,
            band_high_quantile: 0.95,
            lambda_kl: None,
            lambda_band: 0.0,
            clip_epsilon: 0.2,
            lr: 1e-3,
            warmup_steps: 1,
            adam_eps: 1e-3,
            weight_decay: 0.01,
            grad_clip: 1.0,
            steps: 2,
            ephemeral_steps: 4,
            leaves_per_update: 4,
            ear: false,
            kl_bound: 1.0,
            micro_batch: 8,
            batch_window_ms: 50,
            max_questions: 8,
            max_episode_seconds: 600.0,
            max_prompt_tokens: 1024,
            lora: LoraConfig::default(),
            test_force_nonfinite_loss: false,
        }
    }
}

impl AdaptConfig {
    /// The KL anchor's weight for this method: the settings' `lambda_kl`, or the method's own.
    pub fn kl_weight(&self) -> f32 {
        self.lambda_kl.unwrap_or(self.method.lambda_kl())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kl_weight_is_the_methods_own_unless_the_settings_set_one() {
        let of = |method, lambda_kl| {
            AdaptConfig {
                method,
                lambda_kl,
                ..Default::default()
            }
            .kl_weight()
        };
        assert_eq!(of(Method::Ttrl, None), 0.001);
        assert_eq!(of(Method::Spine, None), 0.001);
        assert_eq!(of(Method::Answer, None), 0.1);
        assert_eq!(of(Method::Answer, Some(0.3)), 0.3);
        assert_eq!(of(Method::Ttrl, Some(0.0)), 0.0);
    }
}
