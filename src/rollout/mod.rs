//! Rollouts: flat sampling and ETMR entropy-fork trees (Liu et al. 2025, ETTRL,
//! arXiv 2508.11356), branched as TreeRL's EPTree does. A tree starts from one complete
//! response; its top-N entropy positions before the final answer become forks, never two
//! adjacent ones, and B branches per fork continue from the parent's KV prefix with the fork
//! token drawn from the unmodified policy. One branching layer: M (1 + N B) leaves per
//! question; a root with too few fork positions makes up its leaves with fresh samples.
//! Tokens are counted, not estimated.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::generation::{decode_step, run_to_end_bounded, FinishReason, Sequence, StopRules};
use crate::interrupt::Interrupt;
use crate::model::{Adapter, IncrementalDecoder, Model, TextTokenizer};
use crate::reward::{answer_start, AnswerFormat};
use crate::sampling::{Sampler, Sampling};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    /// ETMR: entropy-chosen forks share their prefixes.
    Tree,
    /// Independent samples: the default, whose votes measured more often right.
    #[default]
    Flat,
}

impl RolloutKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::Tree => "tree",
            RolloutKind::Flat => "flat",
        }
    }
}

/// The tree's shape: M roots, N forks per root, B branches per fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeShape {
    pub m: usize,
    pub n: usize,
    pub b: usize,
}

impl TreeShape {
    pub fn leaves(&self) -> usize {
        self.m * (1 + self.n * self.b)
    }

    /// The fewest roots that give at least `samples` leaves with this N and B.
    pub fn for_samples(samples: usize, n: usize, b: usize) -> Self {
        let per_tree = 1 + n * b;
        Self {
            m: samples.div_ceil(per_tree).max(1),
            n,
            b,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RolloutConfig {
    pub kind: RolloutKind,
    /// Leaves per question for flat rollouts.
    pub samples: usize,
    pub tree: TreeShape,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// Sequences decoded at once (the engine's `max_batch`): bounds the rollout's memory.
    pub max_batch: usize,
}

/// One question to roll out: its prompt, and how its answers read (forks stay before them).
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    pub tokens: &'a [u32],
    pub format: AnswerFormat,
}

/// One sampled response.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub question: usize,
    /// For a branch: the leaf index of its root and the response position it forked at.
    pub fork: Option<(usize, usize)>,
    pub response: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub entropies: Vec<f32>,
    pub text: String,
    pub finish: FinishReason,
}

impl Leaf {
    /// Cut off by the rollout budget: it never gave its final answer.
    pub fn truncated(&self) -> bool {
        self.finish == FinishReason::Length
    }
}

#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    pub leaves: Vec<Leaf>,
    /// Tokens actually sampled (a branch's shared prefix is not counted again).
    pub generated_tokens: usize,
    /// What flat sampling of the same leaves would have sampled: every leaf in full.
    pub flat_equivalent_tokens: usize,
    /// The most sequences decoded in one step (at most `max_batch`).
    pub widest_batch: usize,
}

/// Up to `n` fork positions among the first `before` response positions, highest entropy
/// first (ties: earlier first). Never position 0 (a fork there is just another root) and
/// never next to a chosen fork (adjacent forks split one decision twice).
pub fn fork_points(entropies: &[f32], n: usize, before: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (1..before.min(entropies.len())).collect();
    idx.sort_by(|&a, &b| entropies[b].total_cmp(&entropies[a]).then(a.cmp(&b)));
    let mut chosen: Vec<usize> = Vec::with_capacity(n);
    for i in idx {
        if chosen.len() == n {
            break;
        }
        if chosen.iter().all(|&c| c.abs_diff(i) > 1) {
            chosen.push(i);
        }
    }
    chosen
}

/// Response positions wholly before the final answer span (all of them when there is no
/// answer): forking inside the answer would re-draw the answer itself.
fn positions_before_answer(
    tok: &TextTokenizer,
    leaf: &Leaf,
    format: AnswerFormat,
) -> Result<usize> {
    let Some(start) = answer_start(&leaf.text, format) else {
        return Ok(leaf.response.len());
    };
    let mut decoder = IncrementalDecoder::default();
    let mut end = 0;
    for (i, &id) in leaf.response.iter().enumerate() {
        end += decoder.push(tok, id)?.len();
        if end > start {
            return Ok(i);
        }
    }
    Ok(leaf.response.len())
}

fn leaf_of(question: usize, fork: Option<(usize, usize)>, seq: &Sequence) -> Leaf {
    Leaf {
        question,
        fork,
        response: seq.generated().iter().map(|t| t.id).collect(),
        logprobs: seq.generated().iter().map(|t| t.logprob).collect(),
        entropies: seq.generated().iter().map(|t| t.entropy).collect(),
        text: seq.text().to_string(),
        finish: seq.finish_reason().unwrap_or(FinishReason::Length),
    }
}

/// Samples leaves for every prompt, all questions decoding together, `max_batch` at a time;
/// stops with `Error::Interrupted` when `interrupt` fires.
pub fn run(
    model: &Model,
    tok: &TextTokenizer,
    adapter: Option<&Adapter>,
    prompts: &[Prompt<'_>],
    config: &RolloutConfig,
    interrupt: &Interrupt,
) -> Result<Rollouts> {
    let sampling = Sampling::new(config.temperature, None, config.top_p);
    let rules = StopRules {
        max_tokens: config.max_tokens,
        stop_ids: tok.stop_ids().to_vec(),
        stop_strings: Vec::new(),
    };
    let mut seed = config.seed;
    let mut sampler = || {
        seed = seed.wrapping_add(1);
        Sampler::new(sampling, seed)
    };
    let fresh = |q: usize, sampler: Sampler| {
        Sequence::new(model, prompts[q].tokens.to_vec(), sampler, rules.clone(), 0)
    };
    let first_layer = match config.kind {
        RolloutKind::Flat => config.samples,
        RolloutKind::Tree => config.tree.m,
    };
    // Each prompt is prefilled once: its first-layer sequences start from copies of that cache
    // (a fork before the first generated token draws it afresh), not from prefills of their own.
    let mut primers: Vec<Sequence> = (0..prompts.len()).map(|q| fresh(q, sampler())).collect();
    for chunk in primers.chunks_mut(config.max_batch.max(1)) {
        interrupt.check()?;
        decode_step(
            model,
            tok,
            &mut chunk.iter_mut().collect::<Vec<_>>(),
            adapter,
        )?;
    }
    let mut owners = Vec::new();
    let mut seqs = Vec::new();
    for (q, primer) in primers.into_iter().enumerate() {
        let copies = (1..first_layer)
            .map(|_| primer.fork(0, sampler(), tok))
            .collect::<Result<Vec<_>>>()?;
        owners.extend(std::iter::repeat_n(q, first_layer));
        seqs.push(primer);
        seqs.extend(copies);
    }
    let decode = |seqs: &mut [Sequence]| {
        run_to_end_bounded(model, tok, seqs, adapter, config.max_batch, interrupt)
    };
    let mut out = Rollouts {
        widest_batch: decode(&mut seqs)?,
        ..Rollouts::default()
    };
    for (q, seq) in owners.iter().zip(&seqs) {
        out.leaves.push(leaf_of(*q, None, seq));
        out.generated_tokens += seq.generated().len();
    }
    if config.kind == RolloutKind::Tree {
        let mut branches = Vec::new();
        let mut branch_meta = Vec::new();
        for (root, seq) in seqs.iter().enumerate() {
            let q = owners[root];
            let leaf = &out.leaves[root];
            let before = positions_before_answer(tok, leaf, prompts[q].format)?;
            let forks = fork_points(&leaf.entropies, config.tree.n, before);
            for &at in &forks {
                for _ in 0..config.tree.b {
                    branches.push(seq.fork(at, sampler(), tok)?);
                    branch_meta.push((q, Some((root, at))));
                }
            }
            for _ in forks.len() * config.tree.b..config.tree.n * config.tree.b {
                branches.push(seq.fork(0, sampler(), tok)?);
                branch_meta.push((q, None));
            }
        }
        out.widest_batch = out.widest_batch.max(decode(&mut branches)?);
        for ((q, fork), seq) in branch_meta.into_iter().zip(&branches) {
            out.generated_tokens += seq.generated().len() - fork.map_or(0, |(_, at)| at);
            out.leaves.push(leaf_of(q, fork, seq));
        }
    }
    out.flat_equivalent_tokens = out.leaves.iter().map(|l| l.response.len()).sum();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_has_m_times_one_plus_n_b_leaves() {
        assert_eq!(TreeShape { m: 12, n: 2, b: 2 }.leaves(), 60);
        assert_eq!(
            TreeShape::for_samples(32, 2, 2),
            TreeShape { m: 7, n: 2, b: 2 }
        );
        assert_eq!(TreeShape::for_samples(1, 2, 2).m, 1);
    }

    #[test]
    fn forks_go_to_the_highest_entropy_positions() {
        assert_eq!(
            fork_points(&[0.1, 2.0, 0.5, 2.0, 0.3, 1.0], 3, 6),
            vec![1, 3, 5]
        );
        assert_eq!(fork_points(&[0.3], 2, 1), Vec::<usize>::new());
    }

    #[test]
    fn forks_are_never_adjacent_first_or_inside_the_answer() {
        // Position 0 is the highest but never a fork; 2 sits next to 3; 5 and 6 are the answer.
        let h = [9.0, 0.1, 5.0, 6.0, 0.2, 8.0, 7.0];
        assert_eq!(fork_points(&h, 3, 5), vec![3, 1]);
    }
}
