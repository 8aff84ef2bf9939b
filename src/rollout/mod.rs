//! Rollouts: flat sampling and ETMR entropy-fork trees (Liu et al. 2025, ETTRL,
//! arXiv 2508.11356), grown as TreeRL's EPTree grows them. A tree starts from one complete
//! response; in each of L rounds its N most surprising positions over all of its leaves'
//! own tokens (the sampled token's -log p, as EPTree's code ranks them; before each leaf's
//! final answer, never two adjacent ones) become forks, and B branches per fork continue
//! from that leaf's KV prefix with the fork token drawn from the unmodified policy.
//! M (1 + L N B) leaves per prompt; a tree with too few fork positions makes up its leaves
//! with fresh samples. Tokens are counted, not estimated.

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

/// The tree's shape: M roots, L rounds of growth, N forks per tree in each round, B branches
/// per fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeShape {
    pub m: usize,
    pub l: usize,
    pub n: usize,
    pub b: usize,
}

impl TreeShape {
    fn per_tree(&self) -> usize {
        1 + self.l * self.n * self.b
    }

    pub fn leaves(&self) -> usize {
        self.m * self.per_tree()
    }

    /// The fewest roots that give at least `samples` leaves with this L, N and B.
    pub fn for_samples(samples: usize, l: usize, n: usize, b: usize) -> Self {
        let shape = Self { m: 1, l, n, b };
        Self {
            m: samples.div_ceil(shape.per_tree()).max(1),
            ..shape
        }
    }
}

#[derive(Debug, Clone)]
pub struct RolloutConfig {
    pub kind: RolloutKind,
    /// L, N and B; each prompt's M is the fewest roots that give its leaves.
    pub tree: TreeShape,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// Sequences decoded at once (the engine's `max_batch`): bounds the rollout's memory.
    pub max_batch: usize,
}

/// One prompt to roll out: the question it asks (several prompts may ask one, worded
/// differently), how its answers read (forks stay before them) and how many leaves it gets.
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    pub tokens: &'a [u32],
    pub format: AnswerFormat,
    pub question: usize,
    pub leaves: usize,
}

/// One sampled response.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub question: usize,
    /// The index of the prompt it was sampled from.
    pub prompt: usize,
    /// For a branch: the index of the leaf it forked from (a root or an earlier branch) and
    /// the response position it forked at.
    pub fork: Option<(usize, usize)>,
    pub response: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub entropies: Vec<f32>,
    pub text: String,
    pub finish: FinishReason,
    /// Response positions wholly before the final answer span (all of them when there is
    /// no answer): trees never fork at or after it, and the `answer` method trains only
    /// what follows.
    pub answer_at: usize,
}

impl Leaf {
    /// Cut off by the rollout budget: it never gave its final answer.
    pub fn truncated(&self) -> bool {
        self.finish == FinishReason::Length
    }

    /// Mean entropy of its tokens at the rollout temperature: how unsure the model was
    /// while writing it (EAR reshapes advantages by it; the vote can weigh by it).
    pub fn mean_entropy(&self) -> f32 {
        self.entropies.iter().sum::<f32>() / self.entropies.len().max(1) as f32
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

/// One leaf of a growing tree, as fork selection sees it.
#[derive(Debug, Clone, Copy)]
pub struct ForkSite<'a> {
    /// The sampled tokens' log-probs: the least likely (most surprising, -log p) ranks first.
    pub logprobs: &'a [f32],
    /// Where its own tokens start (0 for a root): earlier ones belong to its parent.
    pub from: usize,
    /// Positions wholly before its final answer.
    pub before: usize,
    /// Positions it was already forked at, its own fork among them.
    pub taken: &'a [usize],
}

/// Up to `n` forks, (site, position), over one tree's leaves, most surprising first (ties:
/// earlier site, then earlier position). A site's candidates are its own tokens before its
/// answer, never position 0 (a fork there is just another root) and never next to or at a
/// position already taken (adjacent forks split one decision twice; a branch's first token
/// is its own fork).
pub fn fork_points(sites: &[ForkSite<'_>], n: usize) -> Vec<(usize, usize)> {
    let mut candidates: Vec<(usize, usize)> = sites
        .iter()
        .enumerate()
        .flat_map(|(s, site)| {
            let end = site.before.min(site.logprobs.len());
            (site.from.max(1)..end)
                .filter(|i| site.taken.iter().all(|t| t.abs_diff(*i) > 1))
                .map(move |i| (s, i))
        })
        .collect();
    let logp = |&(s, i): &(usize, usize)| sites[s].logprobs[i];
    candidates.sort_by(|a, b| logp(a).total_cmp(&logp(b)).then(a.cmp(b)));
    let mut chosen: Vec<(usize, usize)> = Vec::with_capacity(n);
    for (s, i) in candidates {
        if chosen.len() == n {
            break;
        }
        if chosen.iter().all(|&(cs, ci)| cs != s || ci.abs_diff(i) > 1) {
            chosen.push((s, i));
        }
    }
    chosen
}

/// A leaf's [`Leaf::answer_at`]: forking inside the answer would re-draw the answer itself.
fn positions_before_answer(
    tok: &TextTokenizer,
    response: &[u32],
    text: &str,
    format: AnswerFormat,
) -> Result<usize> {
    let Some(start) = answer_start(text, format) else {
        return Ok(response.len());
    };
    let mut decoder = IncrementalDecoder::default();
    let mut end = 0;
    for (i, &id) in response.iter().enumerate() {
        end += decoder.push(tok, id)?.len();
        if end > start {
            return Ok(i);
        }
    }
    Ok(response.len())
}

fn leaf_of(
    tok: &TextTokenizer,
    prompts: &[Prompt<'_>],
    prompt: usize,
    fork: Option<(usize, usize)>,
    seq: &Sequence,
) -> Result<Leaf> {
    let response: Vec<u32> = seq.generated().iter().map(|t| t.id).collect();
    let text = seq.text().to_string();
    Ok(Leaf {
        question: prompts[prompt].question,
        prompt,
        fork,
        answer_at: positions_before_answer(tok, &response, &text, prompts[prompt].format)?,
        logprobs: seq.generated().iter().map(|t| t.logprob).collect(),
        entropies: seq.generated().iter().map(|t| t.entropy).collect(),
        response,
        text,
        finish: seq.finish_reason().unwrap_or(FinishReason::Length),
    })
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
    let first_layer = |p: &Prompt<'_>| match config.kind {
        RolloutKind::Flat => p.leaves,
        RolloutKind::Tree => {
            let t = config.tree;
            TreeShape::for_samples(p.leaves, t.l, t.n, t.b).m
        }
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
        let layer = first_layer(&prompts[q]);
        let copies = (1..layer)
            .map(|_| primer.fork(0, sampler(), tok))
            .collect::<Result<Vec<_>>>()?;
        owners.extend(std::iter::repeat_n(q, layer));
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
        out.leaves.push(leaf_of(tok, prompts, *q, None, seq)?);
        out.generated_tokens += seq.generated().len();
    }
    if config.kind == RolloutKind::Tree {
        grow_trees(
            &mut out,
            seqs,
            tok,
            prompts,
            config.tree,
            &mut sampler,
            decode,
        )?;
    }
    out.flat_equivalent_tokens = out.leaves.iter().map(|l| l.response.len()).sum();
    Ok(out)
}

/// A leaf a tree may still fork from.
struct Grown {
    seq: Sequence,
    tree: usize,
    from: usize,
    taken: Vec<usize>,
}

/// EPTree's rounds over the roots in `out.leaves`, whose sequences are `roots`: each round
/// forks every tree at its top-N positions and decodes all the new branches together.
fn grow_trees(
    out: &mut Rollouts,
    roots: Vec<Sequence>,
    tok: &TextTokenizer,
    prompts: &[Prompt<'_>],
    shape: TreeShape,
    sampler: &mut impl FnMut() -> Sampler,
    decode: impl Fn(&mut [Sequence]) -> Result<usize>,
) -> Result<()> {
    let mut grown = Vec::with_capacity(roots.len() * shape.per_tree());
    for (tree, seq) in roots.into_iter().enumerate() {
        grown.push(Grown {
            seq,
            tree,
            from: 0,
            taken: Vec::new(),
        });
    }
    let trees = grown.len();
    for _ in 0..shape.l {
        let mut branches = Vec::new();
        let mut meta = Vec::new();
        for tree in 0..trees {
            let members: Vec<usize> = (0..grown.len())
                .filter(|&i| grown[i].tree == tree)
                .collect();
            let sites: Vec<ForkSite<'_>> = members
                .iter()
                .map(|&i| ForkSite {
                    logprobs: &out.leaves[i].logprobs,
                    from: grown[i].from,
                    before: out.leaves[i].answer_at,
                    taken: &grown[i].taken,
                })
                .collect();
            let forks: Vec<(usize, usize)> = fork_points(&sites, shape.n)
                .into_iter()
                .map(|(site, at)| (members[site], at))
                .collect();
            for &(parent, at) in &forks {
                grown[parent].taken.push(at);
                for _ in 0..shape.b {
                    branches.push(grown[parent].seq.fork(at, sampler(), tok)?);
                    meta.push((tree, Some((parent, at))));
                }
            }
            for _ in forks.len() * shape.b..shape.n * shape.b {
                branches.push(grown[tree].seq.fork(0, sampler(), tok)?);
                meta.push((tree, None));
            }
        }
        out.widest_batch = out.widest_batch.max(decode(&mut branches)?);
        for ((tree, fork), seq) in meta.into_iter().zip(branches) {
            let prompt = out.leaves[tree].prompt;
            let from = fork.map_or(0, |(_, at)| at);
            out.generated_tokens += seq.generated().len() - from;
            let leaf = leaf_of(tok, prompts, prompt, fork, &seq)?;
            grown.push(Grown {
                seq,
                tree,
                from,
                taken: fork.map(|(_, at)| at).into_iter().collect(),
            });
            out.leaves.push(leaf);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_has_m_times_one_plus_l_n_b_leaves() {
        assert_eq!(
            TreeShape {
                m: 12,
                l: 1,
                n: 2,
                b: 2
            }
            .leaves(),
            60
        );
        assert_eq!(
            TreeShape::for_samples(32, 3, 1, 1),
            TreeShape {
                m: 8,
                l: 3,
                n: 1,
                b: 1
            }
        );
        assert_eq!(TreeShape::for_samples(32, 1, 2, 2).m, 7);
        assert_eq!(TreeShape::for_samples(1, 3, 1, 1).m, 1);
    }

    fn root<'a>(logprobs: &'a [f32], before: usize) -> ForkSite<'a> {
        ForkSite {
            logprobs,
            from: 0,
            before,
            taken: &[],
        }
    }

    #[test]
    fn forks_go_to_the_most_surprising_positions() {
        let logp = [-0.1, -2.0, -0.5, -2.0, -0.3, -1.0];
        assert_eq!(
            fork_points(&[root(&logp, 6)], 3),
            vec![(0, 1), (0, 3), (0, 5)]
        );
        assert_eq!(fork_points(&[root(&[-0.3], 1)], 2), vec![]);
    }

    #[test]
    fn forks_are_never_adjacent_first_or_inside_the_answer() {
        // Position 0 is the least likely but never a fork; 2 sits next to 3; 5 and 6 are the answer.
        let logp = [-9.0, -0.1, -5.0, -6.0, -0.2, -8.0, -7.0];
        assert_eq!(fork_points(&[root(&logp, 5)], 3), vec![(0, 3), (0, 1)]);
    }

    #[test]
    fn a_round_forks_the_whole_tree_but_never_a_shared_prefix_or_a_taken_position() {
        // The root was forked at 2 in an earlier round; the branch's own tokens start there.
        let root_logp = [0.0, -1.0, -9.0, -3.0, -4.0, -0.5];
        let branch_logp = [0.0, -1.0, -9.0, -8.0, -7.0, -0.2, -6.0];
        let sites = [
            ForkSite {
                logprobs: &root_logp,
                from: 0,
                before: 6,
                taken: &[2],
            },
            ForkSite {
                logprobs: &branch_logp,
                from: 2,
                before: 6,
                taken: &[2],
            },
        ];
        // Root: 1 and 3 touch its fork at 2, so 4 then 5 (adjacent to 4). Branch: 0-2 are
        // the root's, 3 touches its own fork, 6 is its answer; so 4, then nothing next to it.
        assert_eq!(fork_points(&sites, 3), vec![(1, 4), (0, 4)]);
        assert_eq!(fork_points(&sites, 1), vec![(1, 4)]);
    }
}
