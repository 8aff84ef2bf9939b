//! The policy objective on one micro-batch of leaves, as differentiable tensors:
//! PPO-clip (Schulman et al. 2017) on the selected tokens, SPINE's entropy band on forking
//! tokens (Wu et al. 2025, arXiv 2511.17938) and a k3 KL anchor to the base model (LoRA
//! off), all at the rollout temperature, every term a mean over the tokens it reads (the
//! 80/20 code's token-mean over its loss mask). TTRL is the same with every token selected
//! and no band; the answer method's policy term reads only the final answer span.

use candle_core::{DType, Tensor, Var};

use crate::error::Result;
use crate::model::ops::token_logp_entropy;
use crate::model::{Adapter, LogitsFor, Model, SeqInput};

/// One response to train on.
#[derive(Debug, Clone)]
pub struct TrainLeaf {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// log pi_old(token) at the rollout temperature, recorded while sampling.
    pub old_logprobs: Vec<f32>,
    /// log pi_ref(token) of the base model (LoRA off), computed once before the update.
    pub ref_logprobs: Vec<f32>,
    /// Token selection: the KL and band terms apply where true, and the policy term too
    /// from `policy_from` on.
    pub mask: Vec<bool>,
    /// First response position the policy term reads (0 but for the answer method, whose
    /// policy term reads only the final answer span while its KL anchor reads every token).
    pub policy_from: usize,
    /// Per-token advantage (the leaf's GRPO advantage, EAR-reshaped when on).
    pub advantage: f32,
}

impl TrainLeaf {
    /// Positions of the selected tokens in the response: the only ones the loss reads.
    pub fn selected(&self) -> Vec<usize> {
        (0..self.mask.len()).filter(|&i| self.mask[i]).collect()
    }

    /// How many selected tokens the policy term reads.
    pub fn policy_tokens(&self) -> usize {
        self.mask
            .iter()
            .skip(self.policy_from)
            .filter(|&&m| m)
            .count()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ObjectiveConfig {
    pub temperature: f32,
    pub clip_epsilon: f32,
    pub lambda_kl: f32,
    /// 0 turns the band off (TTRL).
    pub lambda_band: f32,
    /// Rows of logits that exist at once ([`LOGIT_ROWS`] in an episode).
    pub logit_rows: usize,
}

/// What the whole optimizer step shares, so micro-batch losses add up to its loss.
#[derive(Debug, Clone, Copy)]
pub struct Denominators {
    /// Selected tokens over the step's leaves: the KL and band terms are means over them.
    pub selected_tokens: f32,
    /// Selected tokens from each leaf's `policy_from` on: the policy term is a mean over them.
    pub policy_tokens: f32,
    /// The band's bounds (from the base model's forking entropies), when it is on.
    pub band: Option<(f32, f32)>,
}

/// Sums over the micro-batch, for the episode report.
#[derive(Debug, Clone, Copy, Default)]
pub struct ObjectiveStats {
    pub kl_sum: f64,
    pub kl_tokens: usize,
    pub selected_entropy_sum: f64,
    pub selected_tokens: usize,
}

/// The leaves packed for one forward pass, each distinct prompt once, its responses
/// attending to its keys and values, and the packed rows that predict the responses'
/// tokens (all of them, or only the selected ones), leaf after leaf.
fn pack<'a>(leaves: &[&'a TrainLeaf], only_selected: bool) -> (Vec<SeqInput<'a>>, LogitsFor) {
    let mut prompts: Vec<&[u32]> = Vec::new();
    let owner: Vec<usize> = leaves
        .iter()
        .map(
            |l| match prompts.iter().position(|p| *p == l.prompt.as_slice()) {
                Some(i) => i,
                None => {
                    prompts.push(&l.prompt);
                    prompts.len() - 1
                }
            },
        )
        .collect();
    let mut inputs: Vec<SeqInput<'a>> = prompts.iter().map(|p| SeqInput::new(p)).collect();
    inputs.extend(
        leaves
            .iter()
            .zip(&owner)
            .map(|(l, &p)| SeqInput::after(p, &l.response)),
    );
    // Packed row offsets of each input.
    let starts: Vec<usize> = inputs
        .iter()
        .scan(0, |acc, s| {
            let start = *acc;
            *acc += s.tokens.len();
            Some(start)
        })
        .collect();
    // The row that predicts response token i: the prompt's last row for the first, the
    // response's row i - 1 for the others.
    let mut rows = Vec::new();
    for (j, (leaf, &p)) in leaves.iter().zip(&owner).enumerate() {
        let (prompt_last, start) = (starts[p] + prompts[p].len() - 1, starts[prompts.len() + j]);
        let predicting = |i: usize| (if i == 0 { prompt_last } else { start + i - 1 }) as u32;
        rows.extend(
            (0..leaf.response.len())
                .filter(|&i| !only_selected || leaf.mask[i])
                .map(predicting),
        );
    }
    (inputs, LogitsFor::Rows(rows))
}

/// Log-probs of `tokens` and the entropies of softmax(logits / T), from the hidden rows
/// that predict them: only these rows' logits exist at a time.
fn logp_entropy(
    model: &Model,
    hidden: &Tensor,
    tokens: &[u32],
    temperature: f32,
) -> Result<(Tensor, Tensor)> {
    let logits = model.logits(hidden)?.to_dtype(DType::F32)?;
    Ok(token_logp_entropy(&logits, tokens, temperature)?)
}

/// Rows of logits that exist at once (about 50 MB for a 49 152-token vocabulary): several
/// leaves' rows share one pass over the vocabulary projection, which reads the whole output
/// layer each time (113 MB for the default model) however few rows it has.
pub const LOGIT_ROWS: usize = 256;

/// Consecutive runs of leaves whose `rows` add up to at most `limit` (or one leaf alone),
/// with the tokens those rows predict, one after another.
fn logit_chunks<'a, 'l>(
    leaves: &'a [&'l TrainLeaf],
    limit: usize,
    rows: impl Fn(&TrainLeaf) -> Vec<usize>,
) -> Vec<(&'a [&'l TrainLeaf], Vec<u32>)> {
    let mut chunks = Vec::new();
    let (mut first, mut tokens) = (0, Vec::new());
    for (i, leaf) in leaves.iter().enumerate() {
        let at = rows(leaf);
        if i > first && tokens.len() + at.len() > limit {
            chunks.push((&leaves[first..i], std::mem::take(&mut tokens)));
            first = i;
        }
        tokens.extend(at.iter().map(|&t| leaf.response[t]));
    }
    chunks.push((&leaves[first..], tokens));
    chunks
}

/// Per leaf, as plain numbers: the log-probs of its response under `adapter` (or the base
/// model) and the entropies at its positions. No graph is kept; logits exist
/// [`LOGIT_ROWS`] rows at a time.
pub(crate) fn token_values(
    model: &Model,
    adapter: Option<&Adapter>,
    leaves: &[&TrainLeaf],
    temperature: f32,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let (mut inputs, rows) = pack(leaves, false);
    let hidden = model.hidden(&mut inputs, adapter, rows)?.detach();
    let mut out = Vec::with_capacity(leaves.len());
    let mut start = 0;
    for (chunk, tokens) in logit_chunks(leaves, LOGIT_ROWS, |l| (0..l.response.len()).collect()) {
        let rows = hidden.narrow(0, start, tokens.len())?;
        start += tokens.len();
        let (logp, entropy) = logp_entropy(model, &rows, &tokens, temperature)?;
        let (logp, entropy) = (logp.to_vec1::<f32>()?, entropy.to_vec1::<f32>()?);
        let mut at = 0;
        for leaf in chunk {
            let n = leaf.response.len();
            out.push((logp[at..at + n].to_vec(), entropy[at..at + n].to_vec()));
            at += n;
        }
    }
    Ok(out)
}

/// PPO-clip per token: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - old).
pub fn ppo_clip(logp: &Tensor, old: &Tensor, advantage: f32, epsilon: f32) -> Result<Tensor> {
    let ratio = (logp - old)?.exp()?;
    let eps = f64::from(epsilon);
    let a = f64::from(advantage);
    let unclipped = (&ratio * -a)?;
    let clipped = (ratio.clamp(1.0 - eps, 1.0 + eps)? * -a)?;
    Ok(unclipped.maximum(&clipped)?)
}

/// k3 estimate of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1, clamped to [-10, 10].
pub fn k3(ref_logp: &Tensor, logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp - logp)?;
    Ok(((d.exp()? - &d)? - 1.0)?.clamp(-10.0, 10.0)?)
}

/// Log-probs of the leaves' tokens and the entropies at their positions under the base
/// model (LoRA off), as plain numbers: no graph is built, `micro_batch` leaves per pass.
pub fn reference(
    model: &Model,
    leaves: &[&TrainLeaf],
    micro_batch: usize,
    temperature: f32,
) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let mut out = Vec::with_capacity(leaves.len());
    for chunk in leaves.chunks(micro_batch.max(1)) {
        out.extend(token_values(model, None, chunk, temperature)?);
    }
    Ok(out)
}

/// What one micro-batch contributes to the step: the loss's gradients with respect to the
/// adapter's weights (in [`Adapter::vars`] order), the loss itself (already divided by the
/// step's denominators), and its stats.
pub struct MicroBatchLoss {
    pub grads: Vec<Option<Tensor>>,
    pub value: f64,
    pub stats: ObjectiveStats,
}

/// The loss of these leaves and its gradients, holding the logits of at most
/// `config.logit_rows` rows at a time (or of one longer leaf). The network runs to the final
/// hidden states; then, a few leaves at a time, the vocabulary projection and the loss are
/// computed from a detached copy of their rows and differentiated back to it, and their
/// graph is dropped. The row gradients go back through the network, layers beyond the
/// activation budget recomputed ([`Model::adapter_gradients`]).
pub fn leaves_loss(
    model: &Model,
    adapter: &Adapter,
    leaves: &[TrainLeaf],
    config: &ObjectiveConfig,
    denom: Denominators,
) -> Result<MicroBatchLoss> {
    let mut stats = ObjectiveStats::default();
    let leaves: Vec<&TrainLeaf> = leaves
        .iter()
        .filter(|l| l.mask.iter().any(|&m| m))
        .collect();
    if leaves.is_empty() {
        return Ok(MicroBatchLoss {
            grads: vec![None; adapter.vars().len()],
            value: 0.0,
            stats,
        });
    }
    // Every term reads only the selected tokens (a fifth of them under SPINE), so only their
    // rows go through the vocabulary projection.
    let (mut inputs, rows) = pack(&leaves, true);
    let (grads, value) = model.adapter_gradients(&mut inputs, adapter, rows, |hidden| {
        let mut row_grads = Vec::new();
        let mut value = 0.0;
        let mut start = 0;
        for (chunk, tokens) in logit_chunks(&leaves, config.logit_rows, TrainLeaf::selected) {
            let rows = Var::from_tensor(&hidden.narrow(0, start, tokens.len())?)?;
            start += tokens.len();
            let (logp, entropy) =
                logp_entropy(model, rows.as_tensor(), &tokens, config.temperature)?;
            let mut at = 0;
            let mut terms = Vec::with_capacity(chunk.len());
            for leaf in chunk {
                let n = leaf.selected().len();
                let (logp, entropy) = (logp.narrow(0, at, n)?, entropy.narrow(0, at, n)?);
                terms.push(leaf_loss(leaf, &logp, &entropy, config, denom, &mut stats)?);
                at += n;
            }
            let loss = Tensor::stack(&terms, 0)?.sum_all()?;
            value += f64::from(loss.to_scalar::<f32>()?);
            let grads = loss.backward()?;
            row_grads.push(match grads.get(rows.as_tensor()) {
                Some(g) => g.clone(),
                None => rows.as_tensor().zeros_like()?,
            });
        }
        Ok((Tensor::cat(&row_grads, 0)?, value))
    })?;
    Ok(MicroBatchLoss {
        grads,
        value,
        stats,
    })
}

/// One leaf's term of the step's loss, from the log-probs and entropies at its selected
/// tokens ([`TrainLeaf::selected`], in order): PPO-clip from `policy_from` on, over the
/// step's policy tokens; k3 KL on each, and the entropy band on those outside it, over the
/// step's selected tokens.
pub fn leaf_loss(
    leaf: &TrainLeaf,
    logp: &Tensor,
    entropy: &Tensor,
    config: &ObjectiveConfig,
    denom: Denominators,
    stats: &mut ObjectiveStats,
) -> Result<Tensor> {
    let device = logp.device();
    let selected = leaf.selected();
    let at_selected = |v: &[f32]| -> Result<Tensor> {
        let picked: Vec<f32> = selected.iter().map(|&i| v[i]).collect();
        Ok(Tensor::new(picked.as_slice(), device)?)
    };
    let old = at_selected(&leaf.old_logprobs)?;
    let ref_logp = at_selected(&leaf.ref_logprobs)?;

    let from = selected
        .iter()
        .position(|&i| i >= leaf.policy_from)
        .unwrap_or(selected.len());
    let n = selected.len() - from;
    let policy = ppo_clip(
        &logp.narrow(0, from, n)?,
        &old.narrow(0, from, n)?,
        leaf.advantage,
        config.clip_epsilon,
    )?
    .sum_all()?;
    let kl = k3(&ref_logp, logp)?.sum_all()?;
    stats.kl_sum += f64::from(kl.to_scalar::<f32>()?);
    stats.kl_tokens += selected.len();
    let mut loss = (kl * f64::from(config.lambda_kl))?;

    let h_values = entropy.to_vec1::<f32>()?;
    stats.selected_entropy_sum += h_values.iter().map(|&x| f64::from(x)).sum::<f64>();
    stats.selected_tokens += h_values.len();
    if let (Some((lo, hi)), true) = (denom.band, config.lambda_band > 0.0) {
        // Zero inside the base model's band; pushes back only the forks outside it.
        let above = (entropy - f64::from(hi))?.relu()?;
        let below = (entropy.neg()? + f64::from(lo))?.relu()?;
        let band = (above + below)?.sum_all()?;
        loss = (loss + (band * f64::from(config.lambda_band))?)?;
    }
    let per_token = 1.0 / f64::from(denom.selected_tokens.max(1.0));
    let per_policy_token = 1.0 / f64::from(denom.policy_tokens.max(1.0));
    Ok(((loss * per_token)? + (policy * per_policy_token)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn ppo_clip_by_hand() {
        // rho = e^0.5 = 1.6487 (clipped to 1.2), e^-0.5 = 0.6065 (clipped to 0.8), 1.
        let logp = t(&[0.5, -0.5, 0.0]);
        let old = t(&[0.0, 0.0, 0.0]);
        // A = +1: max(-rho, -clip(rho)) = (-1.2, -0.6065, -1).
        let pos = ppo_clip(&logp, &old, 1.0, 0.2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in pos.iter().zip([-1.2f32, -(-0.5f32).exp(), -1.0]) {
            assert!((g - w).abs() < 1e-6, "{pos:?}");
        }
        // A = -1: max(rho, clip(rho)) = (1.6487, 0.8, 1).
        let neg = ppo_clip(&logp, &old, -1.0, 0.2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in neg.iter().zip([0.5f32.exp(), 0.8, 1.0]) {
            assert!((g - w).abs() < 1e-6, "{neg:?}");
        }
    }

    #[test]
    fn the_policy_term_reads_from_policy_from_and_the_anchor_every_selected_token() {
        // At logp = old the ratio is 1, so each policy token adds -A; the KL reads ref - logp.
        let leaf = TrainLeaf {
            prompt: vec![1],
            response: vec![2, 3, 4, 5],
            old_logprobs: vec![-1.0; 4],
            ref_logprobs: vec![-1.0, -1.0, 0.0, -1.0],
            mask: vec![true, false, true, true],
            policy_from: 2,
            advantage: 0.5,
        };
        assert_eq!(leaf.policy_tokens(), 2);
        let config = ObjectiveConfig {
            temperature: 1.0,
            clip_epsilon: 0.2,
            lambda_kl: 0.1,
            lambda_band: 0.0,
            logit_rows: LOGIT_ROWS,
        };
        let denom = Denominators {
            selected_tokens: 3.0,
            policy_tokens: 2.0,
            band: None,
        };
        let mut stats = ObjectiveStats::default();
        let (logp, entropy) = (t(&[-1.0; 3]), t(&[1.0; 3]));
        let got = leaf_loss(&leaf, &logp, &entropy, &config, denom, &mut stats)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Policy: 2 x -0.5 over 2 tokens. KL: e - 2 at the token whose ref is 0, over 3.
        let want = -0.5 + 0.1 * (1f32.exp() - 2.0) / 3.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(stats.kl_tokens, 3);
    }

    #[test]
    fn k3_by_hand() {
        // d = ref - logp = (0, 1, -2, 20): e^d - d - 1 = (0, e - 2, e^-2 + 1, clamped 10).
        let got = k3(&t(&[0.0, 1.0, -2.0, 20.0]), &t(&[0.0, 0.0, 0.0, 0.0]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [0.0, 1f32.exp() - 2.0, (-2f32).exp() + 1.0, 10.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }
}
