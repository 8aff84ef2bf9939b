//! Differentiable building blocks. candle's fused kernels (`rms_norm`, `rope`, `sdpa`,
//! `softmax_last_dim`) have no backward and silently cut LoRA gradients, so everything on the forward path is written from
//! primitive ops, except the frozen matmul below whose backward is deliberately partial.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::config::RopeLayout;

/// `x @ w^T` for a frozen `w`: the backward returns only the input gradient. Plain matmul
/// would also compute (and keep) a full-size gradient for every base weight, which nearly
/// doubles peak memory during adaptation.
struct FrozenMatmul;

impl FrozenMatmul {
    fn dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize, Layout)> {
        let (m, k) = x.shape().dims2()?;
        let (n, k2) = w.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {k2}");
        }
        Ok((m, n, k, w.transpose(0, 1)?))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, w_t) = Self::dims(x_l, w_l)?;
        Ok((x.matmul(w, (1, m, n, k), x_l, &w_t)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, w_t) = Self::dims(x_l, w_l)?;
        Ok((x.matmul(w, (1, m, n, k), x_l, &w_t)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_out.matmul(w)?), None))
    }
}

/// `x @ w^T` over the last dimension of `x` (any leading shape), `w` frozen.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    let k = out_dims.pop().unwrap_or(0);
    let rows = out_dims.iter().product::<usize>();
    out_dims.push(w.dim(0)?);
    let x2 = x.reshape((rows, k))?.contiguous()?;
    x2.apply_op2(w, FrozenMatmul)?.reshape(out_dims)
}

/// RMSNorm as HF computes it: statistics in f32, scaled by the (frozen) weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
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
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        let half = d / 2;
        let cos = self.cos.index_select(positions, 0)?.reshape((t, 1, half))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((t, 1, half))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_matmul_matches_matmul_and_gives_no_weight_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1., (5, 4), &dev)?;
        let y = frozen_matmul(x.as_tensor(), &w)?;
        let reference = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let diff = (y.clone() - reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let grads = y.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        // d(sum(x W^T))/dx = row sums of W^T broadcast over rows.
        let expected = w.sum(0)?.broadcast_as((2, 3, 4))?;
        let gdiff = (gx - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(gdiff < 1e-5, "{gdiff}");
        assert!(grads.get(&w).is_none());
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
