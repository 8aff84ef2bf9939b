//! Differentiable building blocks. candle's fused kernels (`rms_norm`, `rope`, `sdpa`,
//! `softmax_last_dim`) have no backward and silently cut LoRA gradients, so everything on the
//! forward path is either written from primitive ops or is one of our own fused ops with its
//! backward written out (RMSNorm, softmax, RoPE, SiLU-gating and token log-probs with entropies on the
//! CPU); tests compare each with the primitive chain. The frozen matmul is in `frozen`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::config::RopeLayout;
use crate::numerics::{exp_nonpositive, lane_sum};

/// RMSNorm as HF computes it: statistics in f32, scaled by the (frozen) weight. f32 rows on
/// the CPU take one fused pass each way (a chain of seven generic ops and their backward
/// otherwise); other dtypes and devices take the chain.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(weight, RmsNorm { eps });
    }
    rms_norm_composed(x, weight, eps)
}

/// RMSNorm from primitive ops, for any dtype and device.
fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xf = x.to_dtype(compute)?;
    let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// f32 RMSNorm rows on the CPU in one pass (rows in parallel). Its backward gives the
/// input's gradient only: the norm weights are frozen.
struct RmsNorm {
    eps: f64,
}

/// The contiguous f32 values of a CPU tensor.
fn f32_values<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("fused op: the input must be contiguous"),
    }
}

/// `1 / sqrt(mean(x^2) + eps)`, accumulated in f32 as HF does.
fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (mean_sq + eps as f32).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xs, ws) = (f32_values(x, x_l)?, f32_values(w, w_l)?);
        let d = ws.len();
        if x_l.dims().last() != Some(&d) {
            candle_core::bail!("rms norm: rows of {:?}, a weight of {d}", x_l.dims());
        }
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(d)
            .zip(xs.par_chunks(d))
            .for_each(|(o, x)| {
                let inv = inv_rms(x, self.eps);
                for ((o, x), w) in o.iter_mut().zip(x).zip(ws) {
                    *o = x * inv * w;
                }
            });
        Ok((CpuStorage::F32(out), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = RmsNormGrad { eps: self.eps };
        let dx = x.apply_op3_no_bwd(w, &grad_out.contiguous()?, &grad)?;
        Ok((Some(dx), None))
    }
}

/// The input gradient of [`RmsNorm`], row by row:
/// `dx = r (w g) - x r^3 sum(w g x) / d`, with `r = 1 / rms(x)`.
struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xs, ws, gs) = (
            f32_values(x, x_l)?,
            f32_values(w, w_l)?,
            f32_values(g, g_l)?,
        );
        let d = ws.len();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(d)
            .zip(xs.par_chunks(d).zip(gs.par_chunks(d)))
            .for_each(|(dx, (x, g))| {
                let r = inv_rms(x, self.eps);
                let dot: f32 = x.iter().zip(g).zip(ws).map(|((x, g), w)| x * g * w).sum();
                let c = r * r * r * dot / d as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(ws) {
                    *dx = r * w * g - c * x;
                }
            });
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// `silu(gate) * up`, the MLP's gating. Two f32 CPU tensors of one shape take one fused pass
/// each way (elements in parallel); otherwise candle's ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape();
    if fused {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
    } else {
        gate.silu()? * up
    }
}

/// Elements per parallel task of the element-wise fused ops.
pub(super) const ELEMENTS_PER_TASK: usize = 1 << 14;

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        g_l: &Layout,
        u: &CpuStorage,
        u_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gs, us) = (f32_values(g, g_l)?, f32_values(u, u_l)?);
        let mut out = vec![0f32; gs.len()];
        out.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(
                gs.par_chunks(ELEMENTS_PER_TASK)
                    .zip(us.par_chunks(ELEMENTS_PER_TASK)),
            )
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), g_l.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad_out.contiguous()?, &SiluMulGrad)?;
        let half = |i| both.narrow(0, i, 1)?.squeeze(0);
        Ok((Some(half(0)?), Some(half(1)?)))
    }
}

/// Both input gradients of [`SiluMul`], stacked: `d_gate = g u s (1 + x (1 - s))` with
/// `s = sigmoid(gate)`, and `d_up = g silu(gate)`.
struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_l: &Layout,
        up: &CpuStorage,
        up_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xs, us, gs) = (
            f32_values(gate, gate_l)?,
            f32_values(up, up_l)?,
            f32_values(grad, grad_l)?,
        );
        let len = xs.len();
        let mut both = vec![0f32; 2 * len];
        let (d_gate, d_up) = both.split_at_mut(len);
        d_gate
            .par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(d_up.par_chunks_mut(ELEMENTS_PER_TASK))
            .zip(xs.par_chunks(ELEMENTS_PER_TASK))
            .zip(
                us.par_chunks(ELEMENTS_PER_TASK)
                    .zip(gs.par_chunks(ELEMENTS_PER_TASK)),
            )
            .for_each(|(((dg, du), x), (u, g))| {
                for ((((dg, du), &x), &u), &g) in dg.iter_mut().zip(du).zip(x).zip(u).zip(g) {
                    let s = sigmoid(x);
                    *dg = g * u * s * (1.0 + x * (1.0 - s));
                    *du = g * x * s;
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(gate_l.dims());
        Ok((CpuStorage::F32(both), Shape::from(dims)))
    }
}

/// Softmax over the last dimension (each row), in f32 (or f64) as HF takes it. f32 on the CPU
/// takes one fused pass each way; otherwise candle-nn's composed softmax, which has a backward
/// (its fused last-dimension kernel has none).
pub fn softmax_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(SoftmaxRows)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct SoftmaxRows;

impl CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "softmax-rows"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = f32_values(x, l)?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(d)
            .zip(xs.par_chunks(d))
            .for_each(|(o, x)| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (o, x) in o.iter_mut().zip(x) {
                    *o = exp_nonpositive(x - max);
                }
                let sum = lane_sum(o);
                o.iter_mut().for_each(|o| *o /= sum);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// The input gradient of a softmax row `p`: `p (g - sum(g p))`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ps, gs) = (f32_values(p, p_l)?, f32_values(g, g_l)?);
        let d = p_l.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; ps.len()];
        dx.par_chunks_mut(d)
            .zip(ps.par_chunks(d).zip(gs.par_chunks(d)))
            .for_each(|(dx, (p, g))| {
                let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                for ((dx, p), g) in dx.iter_mut().zip(p).zip(g) {
                    *dx = p * (g - dot);
                }
            });
        Ok((CpuStorage::F32(dx), p_l.shape().clone()))
    }
}

/// Rotary tables: `cos`/`sin` of shape (max_positions, head_dim / 2), computed in f32 like HF
/// (inv_freq and position products in f32), then cast to the model's dtype.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    layout: RopeLayout,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_positions: usize,
        layout: RopeLayout,
        dtype: DType,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            layout,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Rotates `x` of shape (tokens, heads, head_dim); `positions` (tokens) are absolute.
    /// f32 on the CPU takes one fused pass each way; otherwise the composed ops.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 && cos.dtype() == DType::F32 {
            let rotate = Rotate {
                layout: self.layout,
                inverse: false,
            };
            return x.contiguous()?.apply_op3(&cos, &sin, rotate);
        }
        self.apply_composed(x, &cos, &sin)
    }

    /// The rotation from primitive ops; `cos`, `sin`: (tokens, head_dim / 2).
    fn apply_composed(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        let half = d / 2;
        let cos = cos.reshape((t, 1, half))?;
        let sin = sin.reshape((t, 1, half))?;
        match self.layout {
            RopeLayout::Half => {
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                Tensor::cat(&[r1, r2], D::Minus1)
            }
            RopeLayout::Interleaved => {
                let pairs = x.reshape((t, h, half, 2))?;
                let x1 = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
                let x2 = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                Tensor::stack(&[r1, r2], D::Minus1)?.reshape((t, h, d))
            }
        }
    }
}

/// Per row of `logits` (rows, vocab): the log-prob of that row's token in `ids` and the
/// entropy, both of softmax(logits / temperature); (rows,) each. f32 on the CPU takes one fused
/// pass each way, rows in parallel, and keeps no vocabulary-sized intermediate for backward
/// (the probabilities are recomputed from the logits); otherwise the composed ops.
pub fn token_logp_entropy(
    logits: &Tensor,
    ids: &[u32],
    temperature: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let op = TokenLogpEntropy {
            ids: ids.to_vec(),
            temperature,
        };
        let both = logits.contiguous()?.apply_op1(op)?;
        let column = |i| both.narrow(1, i, 1)?.squeeze(1)?.contiguous();
        return Ok((column(0)?, column(1)?));
    }
    token_logp_entropy_composed(logits, ids, temperature)
}

fn token_logp_entropy_composed(
    logits: &Tensor,
    ids: &[u32],
    temperature: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let logp_all = candle_nn::ops::log_softmax(&(logits / f64::from(temperature))?, D::Minus1)?;
    let ids = Tensor::new(ids, logits.device())?.reshape((ids.len(), 1))?;
    let logp = logp_all.gather(&ids, 1)?.squeeze(1)?;
    let entropy = (logp_all.exp()? * &logp_all)?.sum(D::Minus1)?.neg()?;
    Ok((logp, entropy))
}

struct TokenLogpEntropy {
    ids: Vec<u32>,
    temperature: f32,
}

impl CustomOp1 for TokenLogpEntropy {
    fn name(&self) -> &'static str {
        "token-logp-entropy"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        if rows != self.ids.len() {
            candle_core::bail!("token log-probs: {rows} rows for {} ids", self.ids.len());
        }
        let xs = f32_values(x, l)?;
        let t = self.temperature;
        let mut out = vec![0f32; rows * 2];
        out.par_chunks_mut(2)
            .zip(xs.par_chunks(vocab).zip(self.ids.par_iter()))
            .for_each(|(o, (z, &id))| {
                // One pass: sum e and sum e s with s = z/T - max and e = exp(s), in eight
                // lanes; then lse = max + ln(sum e) and H = ln(sum e) - sum e s / sum e.
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) / t;
                let (mut sums, mut weighted) = ([0f32; 8], [0f32; 8]);
                let lanes = z.len() / 8 * 8;
                for chunk in z[..lanes].chunks_exact(8) {
                    for ((v, s), w) in chunk.iter().zip(&mut sums).zip(&mut weighted) {
                        let shifted = v / t - max;
                        let e = exp_nonpositive(shifted);
                        *s += e;
                        *w += e * shifted;
                    }
                }
                for (l, v) in z[lanes..].iter().enumerate() {
                    let shifted = v / t - max;
                    let e = exp_nonpositive(shifted);
                    sums[l] += e;
                    weighted[l] += e * shifted;
                }
                let sum: f32 = sums.iter().sum();
                o[0] = z[id as usize] / t - max - sum.ln();
                o[1] = sum.ln() - weighted.iter().sum::<f32>() / sum;
            });
        Ok((CpuStorage::F32(out), Shape::from((rows, 2))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = TokenLogpEntropyGrad {
            ids: &self.ids,
            temperature: self.temperature,
        };
        let upstream = Tensor::cat(&[out, &grad_out.contiguous()?], 1)?;
        Ok(Some(logits.apply_op2_no_bwd(&upstream, &grad)?))
    }
}

/// The logits' gradient of [`TokenLogpEntropy`], per row from `(logp, H, g_logp, g_H)`:
/// `dz_j = (g_logp (1[j = id] - p_j) - g_H p_j (log p_j + H)) / T`. The row's log-sum-exp
/// comes from the forward's own output, `z_id / T - logp`, not from another pass.
struct TokenLogpEntropyGrad<'a> {
    ids: &'a [u32],
    temperature: f32,
}

impl CustomOp2 for TokenLogpEntropyGrad<'_> {
    fn name(&self) -> &'static str {
        "token-logp-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        up: &CpuStorage,
        up_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, vocab) = x_l.shape().dims2()?;
        let (xs, ups) = (f32_values(x, x_l)?, f32_values(up, up_l)?);
        let t = self.temperature;
        let mut dz = vec![0f32; xs.len()];
        dz.par_chunks_mut(vocab)
            .zip(xs.par_chunks(vocab).zip(ups.par_chunks(4)))
            .zip(self.ids.par_iter())
            .for_each(|((dz, (z, up)), &id)| {
                let (logp_id, h, g_logp, g_h) = (up[0], up[1], up[2], up[3]);
                let lse = z[id as usize] / t - logp_id;
                for (dz, &v) in dz.iter_mut().zip(z) {
                    let logp = v / t - lse;
                    let p = exp_nonpositive(logp);
                    *dz = (-g_logp * p - g_h * p * (logp + h)) / t;
                }
                dz[id as usize] += g_logp / t;
            });
        Ok((CpuStorage::F32(dz), x_l.shape().clone()))
    }
}

/// RoPE of f32 rows on the CPU in one pass: `x` (tokens, heads, head_dim) with `cos`, `sin`
/// (tokens, head_dim / 2). The backward rotates the gradient back (the inverse rotation);
/// the tables are constants.
struct Rotate {
    layout: RopeLayout,
    inverse: bool,
}

impl CustomOp3 for Rotate {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        cos: &CpuStorage,
        cos_l: &Layout,
        sin: &CpuStorage,
        sin_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, h, d) = x_l.shape().dims3()?;
        let half = d / 2;
        let (xs, cs, ss) = (
            f32_values(x, x_l)?,
            f32_values(cos, cos_l)?,
            f32_values(sin, sin_l)?,
        );
        if cs.len() != t * half || ss.len() != t * half {
            candle_core::bail!("rope: tables for {t} tokens of {half} frequencies expected");
        }
        // Rotating by -theta negates the sine.
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(h * d)
            .zip(xs.par_chunks(h * d))
            .enumerate()
            .for_each(|(token, (o, x))| {
                let (c, s) = (&cs[token * half..][..half], &ss[token * half..][..half]);
                for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                    for i in 0..half {
                        // The pair (a, b) this layout rotates by frequency i.
                        let (ia, ib) = match self.layout {
                            RopeLayout::Half => (i, i + half),
                            RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        };
                        let (a, b, sin) = (x[ia], x[ib], sign * s[i]);
                        o[ia] = a * c[i] - b * sin;
                        o[ib] = b * c[i] + a * sin;
                    }
                }
            });
        Ok((CpuStorage::F32(out), x_l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rotate {
            layout: self.layout,
            inverse: !self.inverse,
        };
        let dx = grad_out.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and input gradients of `fused` and `composed` on the same input, against a
    /// random upstream gradient (so every row's gradient differs).
    fn compare_with_gradients(
        x: &Tensor,
        fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        composed: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(f32, f32)> {
        let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let out_dims = composed(x)?.dims().to_vec();
        let upstream = Tensor::randn(0f32, 1., out_dims, x.device())?;
        let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let v = Var::from_tensor(x)?;
            let y = f(v.as_tensor())?;
            let grads = (y.clone() * &upstream)?.sum_all()?.backward()?;
            let g = grads.get(v.as_tensor()).expect("input gradient").clone();
            Ok::<_, candle_core::Error>((y, g))
        };
        let (y1, g1) = run(&fused)?;
        let (y2, g2) = run(&composed)?;
        Ok((max_diff(&y1, &y2)?, max_diff(&g1, &g2)?))
    }

    #[test]
    fn fused_rms_norm_has_the_values_and_input_gradients_of_the_composed_one(
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (3, 5, 64), &dev)? * 3.0)?;
        let w = Tensor::randn(1f32, 0.2, 64, &dev)?;
        let (dy, dg) = compare_with_gradients(
            &x,
            |x| rms_norm(x, &w, 1e-5),
            |x| rms_norm_composed(x, &w, 1e-5),
        )?;
        assert!(dy < 1e-5 && dg < 1e-4, "values {dy}, gradients {dg}");
        Ok(())
    }

    #[test]
    fn fused_softmax_has_the_values_and_input_gradients_of_the_composed_one(
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // A causal mask's -inf entries included.
        let mask: Vec<f32> = (0..6 * 6)
            .map(|i| {
                if i % 6 <= i / 6 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (6, 6), &dev)?;
        let x = (Tensor::randn(0f32, 2., (4, 6, 6), &dev)?.broadcast_add(&mask))?;
        let (dy, dg) =
            compare_with_gradients(&x, softmax_rows, |x| candle_nn::ops::softmax(x, D::Minus1))?;
        assert!(dy < 1e-6 && dg < 1e-5, "values {dy}, gradients {dg}");
        Ok(())
    }

    #[test]
    fn fused_silu_mul_has_the_values_and_gradients_of_the_composed_one() -> candle_core::Result<()>
    {
        let dev = Device::Cpu;
        let gate = (Tensor::randn(0f32, 1., (7, 48), &dev)? * 3.0)?;
        let up = Tensor::randn(0f32, 1., (7, 48), &dev)?;
        // Each input in turn is the variable, the other a constant.
        for (dy, dg) in [
            compare_with_gradients(&gate, |g| silu_mul(g, &up), |g| g.silu()? * &up)?,
            compare_with_gradients(&up, |u| silu_mul(&gate, u), |u| gate.silu()? * u)?,
        ] {
            assert!(dy < 1e-5 && dg < 1e-5, "values {dy}, gradients {dg}");
        }
        Ok(())
    }

    #[test]
    fn fused_rope_has_the_values_and_input_gradients_of_the_composed_one() -> candle_core::Result<()>
    {
        let dev = Device::Cpu;
        let pos = Tensor::new(&[0u32, 3, 4, 9, 15], &dev)?;
        let x = Tensor::randn(0f32, 1., (5, 3, 8), &dev)?;
        for layout in [RopeLayout::Half, RopeLayout::Interleaved] {
            let rope = Rope::new(8, 10_000., 16, layout, DType::F32, &dev)?;
            let (cos, sin) = (
                rope.cos.index_select(&pos, 0)?,
                rope.sin.index_select(&pos, 0)?,
            );
            let (dy, dg) = compare_with_gradients(
                &x,
                |x| rope.apply(x, &pos),
                |x| rope.apply_composed(x, &cos, &sin),
            )?;
            assert!(
                dy < 1e-6 && dg < 1e-6,
                "{layout:?}: values {dy}, gradients {dg}"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_token_logp_and_entropy_have_the_values_and_gradients_of_the_composed_ones(
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let logits = (Tensor::randn(0f32, 1., (5, 40), &dev)? * 4.0)?;
        let ids = [3u32, 0, 39, 17, 17];
        // Both outputs reach the loss, with different weights per row.
        let (wl, wh) = (
            Tensor::randn(0f32, 1., 5, &dev)?,
            Tensor::randn(0f32, 1., 5, &dev)?,
        );
        let joined = |(logp, h): (Tensor, Tensor)| (logp * &wl)? + (h * &wh)?;
        let (dy, dg) = compare_with_gradients(
            &logits,
            |z| joined(token_logp_entropy(z, &ids, 0.7)?),
            |z| joined(token_logp_entropy_composed(z, &ids, 0.7)?),
        )?;
        assert!(dy < 1e-4 && dg < 1e-4, "values {dy}, gradients {dg}");
        Ok(())
    }

    #[test]
    fn interleaved_rope_on_permuted_dims_equals_half_rope() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let d = 8;
        let half = Rope::new(d, 10_000., 16, RopeLayout::Half, DType::F32, &dev)?;
        let inter = Rope::new(d, 10_000., 16, RopeLayout::Interleaved, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 1., (3, 2, d), &dev)?;
        let pos = Tensor::new(&[0u32, 5, 11], &dev)?;
        // Half-layout dim i pairs with i + d/2; interleaved puts them at 2i, 2i + 1.
        let perm: Vec<u32> = (0..d / 2)
            .flat_map(|i| [i as u32, (i + d / 2) as u32])
            .collect();
        let perm = Tensor::new(perm.as_slice(), &dev)?;
        let a = half.apply(&x, &pos)?.index_select(&perm, 2)?;
        let b = inter.apply(&x.index_select(&perm, 2)?, &pos)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
