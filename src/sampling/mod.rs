//! Turning logits into tokens: temperature, top-k, top-p, a seeded RNG per sequence, and
//! for every token its log-prob and the exact entropy (nats) of the full next-token
//! distribution at the sampling temperature. Greedy decoding reports both at temperature 1.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::numerics::exp_nonpositive;

/// How the next token is chosen; each variant holds only the parameters it uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: f32,
    },
}

impl Sampling {
    /// Temperature 0 means greedy, as in the OpenAI API.
    pub fn new(temperature: f32, top_k: Option<usize>, top_p: f32) -> Self {
        if temperature <= 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature,
                top_k: top_k.filter(|&k| k > 0),
                top_p: top_p.clamp(f32::MIN_POSITIVE, 1.0),
            }
        }
    }

    /// The temperature log-probs and entropies are reported at.
    pub fn temperature(&self) -> f32 {
        match self {
            Sampling::Greedy => 1.0,
            Sampling::Sample { temperature, .. } => *temperature,
        }
    }
}

/// One chosen token and what the distribution said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// log p(id) under softmax(logits / T) over the full vocabulary.
    pub logprob: f32,
    /// -sum p log p of that distribution, in nats.
    pub entropy: f32,
    /// The most likely tokens with their log-probs, when asked for.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of softmax(logits / t) in f64, and the entropy of that distribution.
pub fn log_softmax_entropy(logits: &[f32], t: f32) -> (Vec<f64>, f64) {
    let d = Distribution::new(logits, t);
    ((0..logits.len()).map(|i| d.logp(i)).collect(), d.entropy)
}

/// softmax(logits / t): the weights `exp(logits / t - max)`, their sum, and the entropy,
/// from one pass of [`exp_nonpositive`] over the vocabulary (libm's `exp` per id took about
/// a tenth of a decode step); log-probs are computed on demand in f64.
struct Distribution<'a> {
    logits: &'a [f32],
    t: f64,
    /// `exp(logits[i] / t - max / t)`: 0 for ids whose logit is -inf.
    weights: Vec<f32>,
    /// The weights' sum, in f64.
    total: f64,
    /// log of the softmax's denominator.
    lse: f64,
    entropy: f64,
}

impl<'a> Distribution<'a> {
    fn new(logits: &'a [f32], t: f32) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
        let shifted = |l: f32| l / t - max;
        let mut weights = vec![0f32; logits.len()];
        for (w, &l) in weights.iter_mut().zip(logits) {
            *w = exp_nonpositive(shifted(l));
        }
        // H = ln S - sum(w z) / S with z = logits / t - max and S = sum(w).
        let (sum, weighted) = logits
            .iter()
            .zip(&weights)
            .filter(|(_, &w)| w > 0.0)
            .fold((0f64, 0f64), |(s, ws), (&l, &w)| {
                (s + f64::from(w), ws + f64::from(w) * f64::from(shifted(l)))
            });
        Self {
            logits,
            t: f64::from(t),
            weights,
            total: sum,
            lse: f64::from(max) + sum.ln(),
            entropy: sum.ln() - weighted / sum,
        }
    }

    /// log p(id), -inf for ids whose logit is.
    fn logp(&self, id: usize) -> f64 {
        f64::from(self.logits[id]) / self.t - self.lse
    }
}

/// A sampling rule plus the sequence's own RNG: same seed, same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        Self {
            sampling,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Chooses the next token from one row of logits. The reported log-prob and entropy are
    /// the model's, over the full vocabulary; ids whose logit is -inf are never chosen.
    pub fn sample(&mut self, logits: &[f32], top_logprobs: usize) -> SampledToken {
        let d = Distribution::new(logits, self.sampling.temperature());
        let id = match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Sample { top_k, top_p, .. } => self.draw(&d, top_k, top_p),
        };
        SampledToken {
            id,
            logprob: d.logp(id as usize) as f32,
            entropy: d.entropy as f32,
            top: top_n(&d, top_logprobs),
        }
    }

    fn draw(&mut self, d: &Distribution, top_k: Option<usize>, top_p: f32) -> u32 {
        if top_k.is_none() && top_p >= 1.0 {
            return self.pick(d.weights.iter().copied().enumerate(), d.total, d);
        }
        // The kept ids in order of probability (ties by id, so the order is deterministic),
        // sorting only as many of the largest as top-k and top-p keep: a nucleus is usually a
        // few ids of a vocabulary of tens of thousands.
        let by_weight =
            |a: &usize, b: &usize| d.weights[*b].total_cmp(&d.weights[*a]).then(a.cmp(b));
        let mut ids: Vec<usize> = (0..d.weights.len())
            .filter(|&i| d.weights[i] > 0.0)
            .collect();
        let largest_first = |ids: &mut Vec<usize>, n: usize| {
            if n < ids.len() {
                ids.select_nth_unstable_by(n - 1, by_weight);
            }
            let n = n.min(ids.len());
            ids[..n].sort_by(by_weight);
            n
        };
        if let Some(k) = top_k {
            let kept = largest_first(&mut ids, k.max(1));
            ids.truncate(kept);
        }
        if top_p < 1.0 {
            let mass = f64::from(top_p) * ids.iter().map(|&i| f64::from(d.weights[i])).sum::<f64>();
            let mut sorted = 64;
            loop {
                let head = largest_first(&mut ids, sorted);
                let mut cum = 0.0;
                let inside = ids[..head].iter().position(|&i| {
                    cum += f64::from(d.weights[i]);
                    cum >= mass
                });
                if let Some(last) = inside {
                    ids.truncate(last + 1);
                    break;
                }
                if head == ids.len() {
                    break;
                }
                sorted *= 4;
            }
        }
        let total = ids.iter().map(|&i| f64::from(d.weights[i])).sum();
        self.pick(ids.into_iter().map(|i| (i, d.weights[i])), total, d)
    }

    /// One id drawn in proportion to its weight among `candidates` (in their order), whose
    /// weights sum to `total`.
    fn pick(
        &mut self,
        candidates: impl Iterator<Item = (usize, f32)>,
        total: f64,
        d: &Distribution,
    ) -> u32 {
        if total <= 0.0 {
            return argmax(d.logits);
        }
        let mut u = self.rng.random::<f64>() * total;
        let mut last = None;
        for (i, w) in candidates {
            let w = f64::from(w);
            if w > 0.0 {
                if u < w {
                    return i as u32;
                }
                u -= w;
                last = Some(i);
            }
        }
        last.map_or_else(|| argmax(d.logits), |i| i as u32)
    }
}

/// The id of the highest logit; the first maximum wins ties.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn top_n(d: &Distribution, n: usize) -> Vec<(u32, f32)> {
    let logits = d.logits;
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    idx.truncate(n);
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i as u32, d.logp(i) as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_matches_hand_computation() {
        // Two equal logits and one far lower: entropy close to ln 2 at T = 1.
        // Weights come from f32 exponentials (relative error ~1e-7), sums in f64.
        let (logp, h) = log_softmax_entropy(&[0.0, 0.0, -100.0], 1.0);
        assert!((h - std::f64::consts::LN_2).abs() < 1e-6, "{h}");
        assert!((logp[0] - (-std::f64::consts::LN_2)).abs() < 1e-6);
        // Uniform over 4 at any temperature: ln 4.
        let (_, h) = log_softmax_entropy(&[1.0; 4], 0.7);
        assert!((h - 4f64.ln()).abs() < 1e-6);
        // p = softmax([1, 2] / 0.5) = softmax([2, 4]).
        let (_, h) = log_softmax_entropy(&[1.0, 2.0], 0.5);
        let p1 = 1.0 / (1.0 + 2f64.exp());
        let p2 = 1.0 - p1;
        assert!((h + p1 * p1.ln() + p2 * p2.ln()).abs() < 1e-6);
    }

    #[test]
    fn top_p_keeps_the_smallest_most_likely_set_reaching_p() {
        // p = 0.5, 0.3, 0.15, 0.05: top-p 0.75 keeps the first two.
        let logits = [0.5f32, 0.3, 0.15, 0.05].map(f32::ln);
        let mut s = Sampler::new(Sampling::new(1.0, None, 0.75), 1);
        let drawn: Vec<u32> = (0..400).map(|_| s.sample(&logits, 0).id).collect();
        assert!(drawn.iter().all(|&id| id < 2) && drawn.contains(&0) && drawn.contains(&1));
        // 1 000 equal logits: the nucleus (ties by id) is ids 0-499, past the first partial
        // sorts of 64 and 256 ids; -inf ids are never drawn.
        let mut flat = vec![0f32; 1000];
        flat[3] = f32::NEG_INFINITY;
        let mut s = Sampler::new(Sampling::new(1.0, None, 0.5), 2);
        let drawn: Vec<u32> = (0..2000).map(|_| s.sample(&flat, 0).id).collect();
        assert!(drawn.iter().all(|&id| id <= 500 && id != 3));
        assert!(drawn.iter().any(|&id| id > 256));
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(Sampling::new(0.0, None, 1.0), 0);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 0.0], 0).id, 1);
    }

    #[test]
    fn same_seed_gives_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(Sampling::new(1.0, None, 0.9), seed);
            (0..20).map(|_| s.sample(&logits, 0).id).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut k1 = Sampler::new(Sampling::new(1.5, Some(1), 1.0), 3);
        let greedy = argmax(&logits);
        assert!((0..10).all(|_| k1.sample(&logits, 0).id == greedy));
    }

    #[test]
    fn top_logprobs_are_sorted_and_include_the_best() {
        let mut s = Sampler::new(Sampling::Greedy, 0);
        let t = s.sample(&[0.5, 2.0, 1.0, -1.0], 3);
        let ids: Vec<u32> = t.top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        assert_eq!(t.id, 1);
        assert!((t.logprob - t.top[0].1).abs() < 1e-7);
    }
}
