//! Rollouts: flat sampling and ETMR entropy-fork trees (Liu et al. 2025, ETTRL,
//! arXiv 2508.11356). A tree starts from one complete response; its top-N entropy positions
//! become forks, and B branches per fork continue from the parent's KV prefix with the fork
//! token re-drawn so each branch differs from its parent. One branching layer:
//! M (1 + N B) leaves per question. Tokens are counted, not estimated.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::generation::{run_to_end, Sequence, StopRules};
use crate::model::{Adapter, Model, TextTokenizer};
use crate::sampling::{Sampler, Sampling};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    #[default]
    Tree,
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
}

#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    pub leaves: Vec<Leaf>,
    /// Tokens actually sampled (a branch's shared prefix is not counted again).
    pub generated_tokens: usize,
    /// What flat sampling of the same leaves would have sampled: every leaf in full.
    pub flat_equivalent_tokens: usize,
}

/// The `n` highest-entropy positions of a response, highest first (ties: earlier first).
pub fn fork_points(entropies: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..entropies.len()).collect();
    idx.sort_by(|&a, &b| entropies[b].total_cmp(&entropies[a]).then(a.cmp(&b)));
    idx.truncate(n);
    idx
}

fn leaf_of(question: usize, fork: Option<(usize, usize)>, seq: &Sequence) -> Leaf {
    Leaf {
        question,
        fork,
        response: seq.generated().iter().map(|t| t.id).collect(),
        logprobs: seq.generated().iter().map(|t| t.logprob).collect(),
        entropies: seq.generated().iter().map(|t| t.entropy).collect(),
        text: seq.text().to_string(),
    }
}

/// Samples leaves for every prompt, all questions decoding together.
pub fn run(
    model: &Model,
    tok: &TextTokenizer,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    config: &RolloutConfig,
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
    let first_layer = match config.kind {
        RolloutKind::Flat => config.samples,
        RolloutKind::Tree => config.tree.m,
    };
    let mut owners = Vec::new();
    let mut seqs = Vec::new();
    for (q, prompt) in prompts.iter().enumerate() {
        for _ in 0..first_layer {
            owners.push(q);
            seqs.push(Sequence::new(
                model,
                prompt.clone(),
                sampler(),
                rules.clone(),
                0,
            ));
        }
    }
    run_to_end(model, tok, &mut seqs, adapter)?;
    let mut out = Rollouts::default();
    for (q, seq) in owners.iter().zip(&seqs) {
        out.leaves.push(leaf_of(*q, None, seq));
        out.generated_tokens += seq.generated().len();
    }
    if config.kind == RolloutKind::Tree {
        let mut branches = Vec::new();
        let mut branch_meta = Vec::new();
        for (root, seq) in seqs.iter().enumerate() {
            for at in fork_points(&out.leaves[root].entropies, config.tree.n) {
                for _ in 0..config.tree.b {
                    branches.push(seq.fork(at, sampler(), tok)?);
                    branch_meta.push((owners[root], root, at));
                }
            }
        }
        run_to_end(model, tok, &mut branches, adapter)?;
        for ((q, root, at), seq) in branch_meta.into_iter().zip(&branches) {
            out.generated_tokens += seq.generated().len() - at;
            out.leaves.push(leaf_of(q, Some((root, at)), seq));
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
        assert_eq!(fork_points(&[0.1, 2.0, 0.5, 2.0, 1.0], 3), vec![1, 3, 4]);
        assert_eq!(fork_points(&[0.3], 2), vec![0]);
    }
}
