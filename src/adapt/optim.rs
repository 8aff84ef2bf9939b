//! AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) with global gradient-norm clipping.
//! candle-nn's AdamW keeps its moments private and cannot clip, and an adapter rollback
//! needs the state, so this small one is our own.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Rescale all gradients together when their global L2 norm exceeds this.
    pub max_grad_norm: Option<f64>,
    /// Linear warm-up: step t (from 1) uses lr * min(1, t / warmup_steps). Adam's first
    /// step moves every weight by about lr whatever the loss, so a fresh adapter starts small.
    pub warmup_steps: u32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            warmup_steps: 1,
        }
    }
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i32,
}

/// What one step saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Var| p.zeros_like();
        let m = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(zeros)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            m,
            v,
            step: 0,
        })
    }

    /// This optimizer's parameters' gradients from one backward pass, in parameter order.
    pub fn gradients(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|p| grads.get(p.as_tensor()).cloned())
            .collect()
    }

    /// The global L2 norm of gradients given in parameter order.
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let mut sq = 0.0;
        for g in grads.iter().flatten() {
            sq += g
                .to_dtype(candle_core::DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(sq.sqrt())
    }

    /// One update from a single backward pass.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepStats> {
        let grads = self.gradients(grads);
        self.step_with(&grads)
    }

    /// The learning rate of the current step (after warm-up).
    pub fn lr(&self) -> f64 {
        let warm = f64::from(self.step.max(1)) / f64::from(self.config.warmup_steps.max(1));
        self.config.lr * warm.min(1.0)
    }

    /// The moments and step count, for rolling a step back.
    pub fn snapshot(&self) -> (Vec<Tensor>, Vec<Tensor>, i32) {
        (self.m.clone(), self.v.clone(), self.step)
    }

    pub fn restore(&mut self, (m, v, step): (Vec<Tensor>, Vec<Tensor>, i32)) {
        self.m = m;
        self.v = v;
        self.step = step;
    }

    /// One update from gradients in parameter order (summed over micro-batches).
    /// A parameter without a gradient is left alone (its moments too).
    pub fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<StepStats> {
        let grad_norm = Self::grad_norm(grads)?;
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let c = self.config;
        let lr = self.lr();
        let bias1 = 1.0 - c.beta1.powi(self.step);
        let bias2 = 1.0 - c.beta2.powi(self.step);
        for (((p, m), v), g) in self
            .params
            .iter()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(grads)
        {
            let Some(g) = g else { continue };
            let g = (g * clip)?;
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&*m / bias1)?;
            let v_hat = (&*v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(StepStats { grad_norm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference from PyTorch:
    /// ```python
    /// p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    /// opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    /// for _ in range(2):
    ///     opt.zero_grad(); (p ** 2).sum().backward(); opt.step()
    /// print(p.tolist())  # [0.7985190271685215, -1.7962725886447977]
    /// ```
    #[test]
    fn two_steps_match_pytorch() -> Result<()> {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
        let config = AdamWConfig {
            lr: 0.1,
            max_grad_norm: None,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], config)?;
        for _ in 0..2 {
            let grads = p.as_tensor().sqr()?.sum_all()?.backward()?;
            opt.step(&grads)?;
        }
        let got = p.as_tensor().to_vec1::<f64>()?;
        assert!((got[0] - 0.798_519_027_168_521_5).abs() < 1e-12, "{got:?}");
        assert!((got[1] + 1.796_272_588_644_797_7).abs() < 1e-12, "{got:?}");
        Ok(())
    }

    #[test]
    fn warm_up_ramps_the_learning_rate_linearly() -> Result<()> {
        let p = Var::new(&[1.0f64], &Device::Cpu)?;
        let config = AdamWConfig {
            lr: 0.3,
            warmup_steps: 3,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], config)?;
        let mut seen = Vec::new();
        for _ in 0..4 {
            let grads = p.as_tensor().sqr()?.sum_all()?.backward()?;
            opt.step(&grads)?;
            seen.push(opt.lr());
        }
        for (got, want) in seen.iter().zip([0.1, 0.2, 0.3, 0.3]) {
            assert!((got - want).abs() < 1e-12, "{seen:?}");
        }
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_step_and_reports_the_raw_norm() -> Result<()> {
        let p = Var::new(&[3.0f64, 4.0], &Device::Cpu)?;
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![p.clone()], config)?;
        // grad of sum(p^2) = 2p = (6, 8): norm 10.
        let grads = p.as_tensor().sqr()?.sum_all()?.backward()?;
        let stats = opt.step(&grads)?;
        assert!((stats.grad_norm - 10.0).abs() < 1e-9);
        let got = p.as_tensor().to_vec1::<f64>()?;
        assert!(got.iter().all(|x| x.is_finite()));
        Ok(())
    }
}
