//! Advantages and token selection: GRPO's group-normalised advantage (Shao et al. 2024,
//! arXiv 2402.03300), ETTRL's entropy-based reshaping (EAR), and the quantile thresholds
//! that pick forking tokens (Wang et al. 2025, arXiv 2506.01939) and SPINE's entropy band.

/// (r - mean) / (std + 1e-6) with the unbiased std; `None` when all rewards are equal
/// (the group carries no signal and is skipped).
pub fn grpo(rewards: &[f32]) -> Option<Vec<f32>> {
    let n = rewards.len();
    if n < 2 || rewards.iter().all(|&r| r == rewards[0]) {
        return None;
    }
    let mean = rewards.iter().sum::<f32>() / n as f32;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / (n - 1) as f32;
    let std = var.sqrt();
    Some(rewards.iter().map(|r| (r - mean) / (std + 1e-6)).collect())
}

/// EAR: A'_i = Y_i A_i with Y_i = 1 + (mu - Hbar_i) / mu clamped to [0, 2], where Hbar_i is
/// leaf i's mean token entropy and mu the group mean: confident leaves get larger updates,
/// and a very uncertain leaf (Hbar_i > 2 mu) gets none instead of a flipped sign.
pub fn ear(advantages: &[f32], mean_entropies: &[f32]) -> Vec<f32> {
    let mu = mean_entropies.iter().sum::<f32>() / mean_entropies.len().max(1) as f32;
    if mu <= 0.0 {
        return advantages.to_vec();
    }
    advantages
        .iter()
        .zip(mean_entropies)
        .map(|(a, h)| a * (1.0 + (mu - h) / mu).clamp(0.0, 2.0))
        .collect()
}

/// The q-quantile with linear interpolation between order statistics (numpy's default).
pub fn quantile(values: &[f32], q: f32) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f32;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f32)
}

/// Forking tokens: H_t >= the (1 - rho) quantile of all entropies given.
pub fn forking_threshold(entropies: &[f32], rho: f32) -> f32 {
    quantile(entropies, 1.0 - rho)
}

/// SPINE's band bounds: the `low_q` and `high_q` quantiles of the base model's forking
/// entropies, pooled over the batch. Fixed for the step, so the band acts only on outliers.
pub fn band_bounds(base_forking: &[f32], low_q: f32, high_q: f32) -> (f32, f32) {
    (
        quantile(base_forking, low_q),
        quantile(base_forking, high_q),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn grpo_by_hand() {
        // r = (1, 0, 0, 1): mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735.
        let a = grpo(&[1.0, 0.0, 0.0, 1.0]).unwrap();
        let s = (1.0f32 / 3.0).sqrt() + 1e-6;
        close(&a, &[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]);
        // (1, 0, 0): mean 1/3, var = (4/9 + 1/9 + 1/9) / 2 = 1/3.
        let a = grpo(&[1.0, 0.0, 0.0]).unwrap();
        close(&a, &[(2.0 / 3.0) / s, (-1.0 / 3.0) / s, (-1.0 / 3.0) / s]);
        assert_eq!(grpo(&[1.0, 1.0, 1.0]), None);
        assert_eq!(grpo(&[0.0]), None);
    }

    #[test]
    fn ear_by_hand() {
        // Hbar = (0.5, 1.5): mu = 1, Y = (1.5, 0.5).
        close(&ear(&[1.0, -1.0], &[0.5, 1.5]), &[1.5, -0.5]);
        close(&ear(&[2.0, 3.0], &[0.0, 0.0]), &[2.0, 3.0]);
        // Hbar = (0.2, 0.2, 2.6): mu = 1, Y = (1.8, 1.8, -0.6 clamped to 0).
        close(&ear(&[1.0, 1.0, -1.0], &[0.2, 0.2, 2.6]), &[1.8, 1.8, 0.0]);
    }

    #[test]
    fn quantiles_and_masks_by_hand() {
        let h = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&h, 0.5), 2.0);
        assert!((quantile(&h, 0.8) - 3.2).abs() < 1e-6);
        assert!((quantile(&h, 0.1) - 0.4).abs() < 1e-6);
        // rho = 0.2 keeps the top fifth: only 4.0 is >= 3.2.
        let tau = forking_threshold(&h, 0.2);
        assert_eq!(h.iter().filter(|&&x| x >= tau).count(), 1);
    }

    #[test]
    fn band_bounds_are_base_quantiles() {
        assert_eq!(
            band_bounds(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.0, 1.0),
            (1.0, 5.0)
        );
        let (lo, hi) = band_bounds(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.1, 0.5);
        assert!((lo - 1.4).abs() < 1e-6 && (hi - 3.0).abs() < 1e-6);
    }
}
