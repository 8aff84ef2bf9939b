//! Turning logits into tokens: temperature, top-k, top-p, a seeded RNG per sequence, and
//! for every token its log-prob and the exact entropy (nats) of the full next-token
//! distribution at the sampling temperature. Greedy decoding reports both at temperature 1.

use rand::{rngs::StdRng, Rng, SeedableRng};

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
    (d.logp, d.entropy)
}

/// softmax(logits / t) in f64: log-probs, probabilities and entropy, with one `exp` per id
/// (a decode step of a large batch spent a fifth of its time in `exp` when each was taken
/// three times).
struct Distribution {
    logp: Vec<f64>,
    probs: Vec<f64>,
    entropy: f64,
}

impl Distribution {
    fn new(logits: &[f32], t: f32) -> Self {
        let t = f64::from(t);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64 / t;
        let mut probs: Vec<f64> = logits.iter().map(|&l| (l as f64 / t - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let lse = max + sum.ln();
        let logp: Vec<f64> = logits.iter().map(|&l| l as f64 / t - lse).collect();
        let entropy = -logp
            .iter()
            .zip(&probs)
            .filter(|(lp, _)| lp.is_finite())
            .map(|(lp, p)| p * lp)
            .sum::<f64>();
        Self {
            logp,
            probs,
            entropy,
        }
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
    /// the model's, over the full vocabulary.
    pub fn sample(&mut self, logits: &[f32], top_logprobs: usize) -> SampledToken {
        let d = Distribution::new(logits, self.sampling.temperature());
        let allowed = |i: usize| d.logp[i].is_finite();
        let id = match self.sampling {
            Sampling::Greedy => argmax(&d.logp, allowed),
            Sampling::Sample { top_k, top_p, .. } => self.draw(&d, top_k, top_p, allowed),
        };
        SampledToken {
            id,
            logprob: d.logp[id as usize] as f32,
            entropy: d.entropy as f32,
            top: top_n(&d.logp, top_logprobs),
        }
    }

    fn draw(
        &mut self,
        d: &Distribution,
        top_k: Option<usize>,
        top_p: f32,
        allowed: impl Fn(usize) -> bool,
    ) -> u32 {
        let mut candidates: Vec<(usize, f64)> = (0..d.probs.len())
            .filter(|&i| allowed(i))
            .map(|i| (i, d.probs[i]))
            .collect();
        if candidates.is_empty() {
            return argmax(&d.logp, |_| true);
        }
        if top_k.is_some() || top_p < 1.0 {
            // Sort by probability (ties by id, so the order is deterministic).
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if let Some(k) = top_k {
                candidates.truncate(k.max(1));
            }
            if top_p < 1.0 {
                let total: f64 = candidates.iter().map(|c| c.1).sum();
                let mut cum = 0.0;
                let keep = candidates
                    .iter()
                    .position(|c| {
                        cum += c.1;
                        cum >= f64::from(top_p) * total
                    })
                    .map_or(candidates.len(), |i| i + 1);
                candidates.truncate(keep);
            }
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(i, p) in &candidates {
            if u < p {
                return i as u32;
            }
            u -= p;
        }
        candidates.last().map_or(0, |c| c.0 as u32)
    }
}

/// The highest log-prob among allowed ids; the first maximum wins ties.
fn argmax(logp: &[f64], allowed: impl Fn(usize) -> bool) -> u32 {
    let mut best: Option<usize> = None;
    for i in 0..logp.len() {
        if allowed(i) && best.is_none_or(|b| logp[i] > logp[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

fn top_n(logp: &[f64], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..logp.len()).collect();
    let n = n.min(idx.len());
    idx.select_nth_unstable_by(n - 1, |&a, &b| logp[b].total_cmp(&logp[a]));
    idx.truncate(n);
    idx.sort_by(|&a, &b| logp[b].total_cmp(&logp[a]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i as u32, logp[i] as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_matches_hand_computation() {
        // Two equal logits and one far lower: entropy close to ln 2 at T = 1.
        let (logp, h) = log_softmax_entropy(&[0.0, 0.0, -100.0], 1.0);
        assert!((h - std::f64::consts::LN_2).abs() < 1e-12, "{h}");
        assert!((logp[0] - (-std::f64::consts::LN_2)).abs() < 1e-12);
        // Uniform over 4 at any temperature: ln 4.
        let (_, h) = log_softmax_entropy(&[1.0; 4], 0.7);
        assert!((h - 4f64.ln()).abs() < 1e-12);
        // p = softmax([1, 2] / 0.5) = softmax([2, 4]).
        let (_, h) = log_softmax_entropy(&[1.0, 2.0], 0.5);
        let p1 = 1.0 / (1.0 + 2f64.exp());
        let p2 = 1.0 - p1;
        assert!((h + p1 * p1.ln() + p2 * p2.ln()).abs() < 1e-12);
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
        let greedy = argmax(&log_softmax_entropy(&logits, 1.0).0, |_| true);
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
