//! Float loops shared by the model's ops and the sampler: softmax over a vocabulary of tens
//! of thousands takes an exponential per id, and libm's is a call per number that no loop
//! around it can vectorize.

/// `e^x` for `x <= 0` (shifted logits), within about 2 ulp: plain arithmetic, which the
/// compiler vectorizes in a loop, where `f32::exp` is a libm call per number. `x = n ln 2 +
/// r`, a degree-6 polynomial for `e^r` (Cephes' `expf`) and `2^n` built in the exponent
/// bits. Below -87 (where f32 runs out of normal numbers) the result is 0; above 0 (a
/// rounding's worth, in callers) it is 1.
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // Unlike clamp, max and min ignore NaN, so y is always in [-87, 0].
    #[allow(clippy::manual_clamp)]
    let y = x.max(-87.0).min(0.0);
    let n = (y * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = y - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // SAFETY: n is an integer in [-126, 0], so the unchecked conversion
    // (one instruction, where `as` adds saturation checks that stop vectorization) is exact.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// The sum of `xs` in eight lanes, which the compiler vectorizes (one running sum makes
/// every add wait on the last).
#[inline]
pub fn lane_sum(xs: &[f32]) -> f32 {
    eight_lanes(xs, xs, |x, _| x)
}

/// `a . b` in eight lanes, as [`lane_sum`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    eight_lanes(a, b, |x, y| x * y)
}

/// The sum of `term(a[i], b[i])` in eight running sums, then the rest.
#[inline(always)]
fn eight_lanes(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for ((l, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *l += term(*x, *y);
        }
    }
    let rest: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| term(*x, *y)).sum();
    lanes.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_is_within_two_ulp_of_exp_and_zero_below_f32_range() {
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            assert!(
                (got - want).abs() <= 2.4e-7 * want,
                "e^{x}: {got} vs {want}"
            );
        }
        assert_eq!(exp_nonpositive(-90.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(1e-7), 1.0);
    }
}
