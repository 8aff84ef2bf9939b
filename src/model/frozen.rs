//! Frozen base weights and their matmul.
//!
//! Training multiplies by an f32 copy of every weight. A decode step multiplies a handful of
//! rows by every weight once, so it is bound by reading them: on the CPU a weight also keeps
//! the bytes its checkpoint stored it in (bf16, f16, or GGUF's Q8_0 and Q4_1 blocks) when those
//! are smaller, and decode steps read those instead. They hold exactly the numbers of the f32
//! copy (unpacked as candle dequantizes them, bit for bit), and the kernel sums in the f32
//! path's order, so both paths give the same bits: the lighter weights change speed only.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::ops::ELEMENTS_PER_TASK;

/// Numbers per block of the compact formats: GGUF's block size, and a multiple of the
/// kernel's sixteen.
const BLOCK: usize = 32;

/// How a [`CompactWeight`] stores its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Bf16,
    F16,
    /// `d * q` with an i8 `q` per number and an f16 `d` per block.
    Q8_0,
    /// `d * q + m` with a 4-bit `q` per number (low nibbles first) and f16 `d`, `m` per block.
    Q4_1,
}

/// A frozen weight (out, in) in its checkpoint's bytes: `codes` per number, and for the
/// block formats each block's scale (and offset), widened to f32 once at load.
#[derive(Debug)]
pub struct CompactWeight {
    format: Format,
    rows: usize,
    cols: usize,
    /// Bytes of `codes` per row.
    row_bytes: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
}

impl CompactWeight {
    /// The blocks of a GGUF matrix whose format decode steps can read; `None` for others.
    pub fn from_gguf(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let Ok((rows, cols)) = q.shape().dims2() else {
            return Ok(None);
        };
        if !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = q.data()?;
        let weight = |format, codes, scales, offsets| {
            CompactWeight::new(format, (rows, cols), codes, scales, offsets)
        };
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        Ok(Some(match q.dtype() {
            GgmlDType::BF16 => weight(Format::Bf16, data.into_owned(), vec![], vec![]),
            GgmlDType::F16 => weight(Format::F16, data.into_owned(), vec![], vec![]),
            GgmlDType::Q8_0 => {
                let blocks = data.chunks_exact(2 + BLOCK);
                let scales = blocks.clone().map(half).collect();
                let codes = blocks.flat_map(|b| b[2..].to_vec()).collect();
                weight(Format::Q8_0, codes, scales, vec![])
            }
            GgmlDType::Q4_1 => {
                let blocks = data.chunks_exact(4 + BLOCK / 2);
                let scales = blocks.clone().map(half).collect();
                let offsets = blocks.clone().map(|b| half(&b[2..])).collect();
                let codes = blocks.flat_map(|b| b[4..].to_vec()).collect();
                weight(Format::Q4_1, codes, scales, offsets)
            }
            _ => return Ok(None),
        }))
    }

    /// A bf16 or f16 matrix's bits; `None` for other dtypes (f32 has nothing lighter that holds
    /// the same numbers).
    pub fn from_half(t: &Tensor) -> candle_core::Result<Option<Self>> {
        let Ok((rows, cols)) = t.dims2() else {
            return Ok(None);
        };
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let (format, bits): (_, Vec<u16>) = match t.dtype() {
            DType::BF16 => (
                Format::Bf16,
                t.to_vec1::<bf16>()?.iter().map(|v| v.to_bits()).collect(),
            ),
            DType::F16 => (
                Format::F16,
                t.to_vec1::<f16>()?.iter().map(|v| v.to_bits()).collect(),
            ),
            _ => return Ok(None),
        };
        if !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let codes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        Ok(Some(CompactWeight::new(
            format,
            (rows, cols),
            codes,
            vec![],
            vec![],
        )))
    }

    fn new(
        format: Format,
        (rows, cols): (usize, usize),
        codes: Vec<u8>,
        scales: Vec<f32>,
        offsets: Vec<f32>,
    ) -> Self {
        Self {
            format,
            rows,
            cols,
            row_bytes: codes.len() / rows.max(1),
            codes,
            scales,
            offsets,
        }
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// Row `j`, as the kernels read it.
    fn row(&self, j: usize) -> WeightRow<'_> {
        let blocks = self.cols / BLOCK;
        let codes = &self.codes[j * self.row_bytes..(j + 1) * self.row_bytes];
        let scales = || &self.scales[j * blocks..(j + 1) * blocks];
        match self.format {
            Format::Bf16 => WeightRow::Bf16(codes),
            Format::F16 => WeightRow::F16(codes),
            Format::Q8_0 => WeightRow::Q8_0 {
                codes,
                scales: scales(),
            },
            Format::Q4_1 => WeightRow::Q4_1 {
                codes,
                scales: scales(),
                offsets: &self.offsets[j * blocks..(j + 1) * blocks],
            },
        }
    }
}

/// A frozen weight (out, in): the tensor every path can use, and on the CPU the same numbers
/// in lighter bytes for decode steps when the checkpoint had them.
#[derive(Debug, Clone)]
pub struct FrozenWeight {
    pub tensor: Tensor,
    compact: Option<Arc<CompactWeight>>,
}

impl FrozenWeight {
    /// Whether weights of this dtype on this device get a compact copy: the decode kernels
    /// serve f32 CPU weights only.
    pub fn keeps_compact(dtype: DType, device: &Device) -> bool {
        dtype == DType::F32 && device.is_cpu()
    }

    /// `compact` must hold `tensor`'s numbers; it is dropped unless
    /// [`FrozenWeight::keeps_compact`] says the tensor gets one.
    pub fn new(tensor: Tensor, compact: Option<CompactWeight>) -> Self {
        let served = Self::keeps_compact(tensor.dtype(), tensor.device());
        let compact = compact.filter(|c| served && tensor.dims() == [c.rows, c.cols]);
        Self {
            tensor,
            compact: compact.map(Arc::new),
        }
    }

    /// Bytes of the frozen weight: the tensor and its compact copy.
    pub fn bytes(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
            + self.compact.as_ref().map_or(0, |c| c.bytes())
    }

    /// `x @ w^T` over the last dimension of `x` (any leading shape), whose rows are `rows`.
    pub fn matmul(&self, x: &Tensor, rows: Rows) -> candle_core::Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let k = out_dims.pop().unwrap_or(0);
        let m = out_dims.iter().product::<usize>();
        out_dims.push(self.tensor.dim(0)?);
        let x2 = x.reshape((m, k))?.contiguous()?;
        x2.apply_op2(&self.tensor, self.op(rows))?.reshape(out_dims)
    }

    fn op(&self, rows: Rows) -> FrozenMatmul {
        FrozenMatmul {
            compact: self.compact.clone(),
            few_rows: rows.few_rows_limit(),
        }
    }
}

/// What the rows of a frozen matmul are, which picks the kernel that multiplies them: up to a
/// limit, the decode kernel (a row's bits whatever the batch), beyond it gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// One row per sequence (a decode step, or the last positions' logits): how many there
    /// are depends on the batch alone.
    PerSequence,
    /// Every position of some spans (prompts, training): how many there are also depends on
    /// how much of a prompt the prompt cache held.
    Spans,
}

impl Rows {
    /// gemm is faster from about 24 rows on with AVX2 alone (`ttrl-serve bench` on the
    /// default model, a Zen 3: batch 12 / 16 / 24 at 80 / 98 / 124 tok/s through gemm, 103 /
    /// 108 / 104 through the kernel); with AVX-512's four-row kernel, decode batch 32 / 64 /
    /// 96 / 128 ran at 591 / 662 / 666-673 / 637 tok/s through it against 296 / 515 / 599-610
    /// / 680 through gemm (a Zen 4). Spans stay at 16 rows: a prompt's rows past the prompt
    /// cache would otherwise take the kernel where the whole prompt takes gemm, and a named
    /// adapter's answer after a restart (an empty cache) came out 1e-6 apart from before it
    /// (`tests/adaptation.rs`).
    fn few_rows_limit(self) -> usize {
        match self {
            Rows::PerSequence if wide_registers() => 96,
            _ => 16,
        }
    }
}

/// Whether the decode kernels have AVX-512's 32 vector registers here.
fn wide_registers() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx2::available() && avx2::wide_registers();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A trainable low-rank update of a frozen weight, `scale * (x A^T) B^T` with A (r, in) and
/// B (out, r): a LoRA pair.
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl LowRank {
    /// The update alone for `x` (rows, in), by candle's ops, in A's dtype.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let low = x.to_dtype(self.a.dtype())?.matmul(&self.a.t()?)?;
        (low.matmul(&self.b.t()?)? * self.scale)?.to_dtype(x.dtype())
    }
}

impl FrozenWeight {
    /// `x @ w^T + update(x)` for `x` (rows, in). With f32 on the CPU this is one op whose
    /// backward gives x's, A's and B's gradients directly: composed, the update's five ops and
    /// the sum each cost a pass over (rows, out) values both ways, and candle's backward adds
    /// every gradient into a zeroed buffer. Both give the same values.
    pub fn matmul_low_rank(
        &self,
        x: &Tensor,
        update: &LowRank,
        rows: Rows,
    ) -> candle_core::Result<Tensor> {
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        if !(f32_cpu(x) && f32_cpu(&self.tensor) && f32_cpu(&update.a) && f32_cpu(&update.b)) {
            return self.matmul(x, rows)? + update.delta(x)?;
        }
        let op = FrozenMatmulLowRank {
            frozen: self.op(rows),
            w: self.tensor.clone(),
            scale: update.scale,
        };
        x.contiguous()?.apply_op3(&update.a, &update.b, op)
    }
}

/// `x @ w^T + scale * (x @ a^T) @ b^T` on f32 CPU tensors, `w` frozen; see
/// [`FrozenWeight::matmul_low_rank`].
struct FrozenMatmulLowRank {
    frozen: FrozenMatmul,
    w: Tensor,
    scale: f64,
}

impl CustomOp3 for FrozenMatmulLowRank {
    fn name(&self) -> &'static str {
        "frozen-matmul-low-rank"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _) = x_l.shape().dims2()?;
        let (r, k) = a_l.shape().dims2()?;
        let (n, _) = b_l.shape().dims2()?;
        let (w, w_l) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen-matmul-low-rank: the weight is not on the CPU");
        };
        let (base, shape) = self.frozen.cpu_fwd(x, x_l, w, w_l)?;
        let low = x.matmul(a, (1, m, r, k), x_l, &a_l.transpose(0, 1)?)?;
        let low_l = Layout::contiguous((m, r));
        let delta = low.matmul(b, (1, m, n, r), &low_l, &b_l.transpose(0, 1)?)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(delta)) = (base, delta) else {
            candle_core::bail!("frozen-matmul-low-rank: f32 only");
        };
        // As the composed ops round: the update scaled, then added.
        let scale = self.scale as f32;
        y.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(delta.par_chunks(ELEMENTS_PER_TASK))
            .for_each(|(y, d)| y.iter_mut().zip(d).for_each(|(y, d)| *y += d * scale));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With g = dL/dy and u = scale * g B (rows, r): dx = g W + u A, dA = u^T x,
        // dB = scale * g^T (x A^T). Only (rows, r)-sized values are scaled. The inputs are
        // detached, as candle detaches gradients: a gradient that kept a graph would keep
        // every tensor it came from alive.
        let (x, a_in, b_in) = (x.detach(), a.detach(), b.detach());
        let u = (grad.matmul(&b_in)? * self.scale)?;
        let dx = (grad.matmul(&self.w)? + u.matmul(&a_in)?)?;
        let da = a.is_variable().then(|| u.t()?.matmul(&x)).transpose()?;
        let db = b
            .is_variable()
            .then(|| grad.t()?.matmul(&(x.matmul(&a_in.t()?)? * self.scale)?))
            .transpose()?;
        Ok((Some(dx), da, db))
    }
}

/// `x @ w^T` for a frozen `w`: the backward returns only the input gradient. Plain matmul
/// would also compute (and keep) a full-size gradient for every base weight, which nearly
/// doubles peak memory during adaptation.
struct FrozenMatmul {
    compact: Option<Arc<CompactWeight>>,
    /// Up to this many rows take [`few_rows_matmul`] ([`Rows::few_rows_limit`]).
    few_rows: usize,
}

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
        if m <= self.few_rows {
            if let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) {
                if let (Some((x0, x1)), Some((w0, w1))) =
                    (x_l.contiguous_offsets(), w_l.contiguous_offsets())
                {
                    let x = &xs[x0..x1];
                    let out = match &self.compact {
                        Some(c) => few_rows_matmul(x, m, n, k, |j| c.row(j)),
                        None => {
                            let ws = &ws[w0..w1];
                            few_rows_matmul(x, m, n, k, |j| WeightRow::F32(&ws[j * k..][..k]))
                        }
                    };
                    return Ok((CpuStorage::F32(out), Shape::from((m, n))));
                }
            }
        }
        // (w @ x^T)^T: gemm works column by column of its output and repacks an operand
        // whose columns are not contiguous. As x @ w^T that operand is the weight (all of
        // it, on every call, which a few hundred rows do not repay); this way it is x, and
        // the output's transposition costs one pass over it.
        if let (CpuStorage::F32(_), CpuStorage::F32(_), true) = (x, w, m <= FEW_TRANSPOSED) {
            if let CpuStorage::F32(by_feature) =
                w.matmul(x, (1, n, m, k), w_l, &x_l.transpose(0, 1)?)?
            {
                let out = transposed(by_feature, n, m);
                return Ok((CpuStorage::F32(out), Shape::from((m, n))));
            }
        }
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

/// Up to this many rows, gemm multiplies as `(w @ x^T)^T` (see [`FrozenMatmul`]'s forward).
/// `ttrl-serve bench` on a Zen 4: prefill of 128 tokens 825-876 -> 1065-1139 tok/s, an
/// adaptation episode's update (micro-batches of about 150 rows) 13.0-13.3 -> 12.0 s; the
/// same at 256 rows; at 1024 rows the forward pass 0.98 -> 1.34 s, so larger inputs keep
/// `x @ w^T`. Either way a row gets the same bits.
const FEW_TRANSPOSED: usize = 256;

/// Rows of `x` per kernel call: each row keeps four 8-lane accumulators, and three rows'
/// twelve leave the weight's four vectors the rest of AVX2's sixteen registers.
const GROUP: usize = 3;

/// Output features per parallel task of [`few_rows_matmul`].
const FEATURES_PER_TASK: usize = 64;

/// One weight row in one of the formats the decode kernels read.
#[derive(Clone, Copy)]
enum WeightRow<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u8]),
    F16(&'a [u8]),
    Q8_0 {
        codes: &'a [u8],
        scales: &'a [f32],
    },
    Q4_1 {
        codes: &'a [u8],
        scales: &'a [f32],
        offsets: &'a [f32],
    },
}

impl WeightRow<'_> {
    /// Number `i`, as candle's dequantization computes it.
    fn get(&self, i: usize) -> f32 {
        let half_bits = |b: &[u8]| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
        match *self {
            WeightRow::F32(w) => w[i],
            WeightRow::Bf16(b) => bf16::from_bits(half_bits(b)).to_f32(),
            WeightRow::F16(b) => f16::from_bits(half_bits(b)).to_f32(),
            WeightRow::Q8_0 { codes, scales } => codes[i] as i8 as f32 * scales[i / BLOCK],
            WeightRow::Q4_1 {
                codes,
                scales,
                offsets,
            } => {
                let (block, at) = (i / BLOCK, i % BLOCK);
                let byte = codes[block * BLOCK / 2 + at % (BLOCK / 2)];
                let q = if at < BLOCK / 2 {
                    byte & 0x0F
                } else {
                    byte >> 4
                };
                q as f32 * scales[block] + offsets[block]
            }
        }
    }
}

/// `x @ w^T` for a few rows `x` (m, k) and `n` weight rows. gemm packs the whole transposed
/// weight on every call, which took half of a decode step; here each weight row is read once,
/// where it lies, and dotted with the rows of `x`, [`GROUP`] at a time (decoding is bound by reading
/// the weights). Each output is summed in the same order whatever `m` and the weight's format
/// are, so a sequence gets the same bits alone or in a batch.
fn few_rows_matmul<'w>(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    weight_row: impl Fn(usize) -> WeightRow<'w> + Sync,
) -> Vec<f32> {
    let rows: Vec<&[f32]> = x.chunks(k).collect();
    #[cfg(target_arch = "x86_64")]
    let simd = avx2::available();
    let mut by_feature = vec![0f32; n * m];
    by_feature
        .par_chunks_mut(m * FEATURES_PER_TASK)
        .enumerate()
        .for_each(|(task, out)| {
            let weight_row = |j| weight_row(task * FEATURES_PER_TASK + j);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd` comes from `avx2::available`; rows have `k` floats and
                // weight rows `k` numbers, in one format.
                return unsafe { avx2::rows_times_weights(&rows, weight_row, k, out) };
            }
            for (j, out) in out.chunks_mut(m).enumerate() {
                let w = weight_row(j);
                for (o, row) in out.iter_mut().zip(&rows) {
                    *o = row.iter().enumerate().map(|(i, x)| x * w.get(i)).sum();
                }
            }
        });
    transposed(by_feature, n, m)
}

/// `(m, n)` from `by_feature` `(n, m)`, both row-major (one row is already itself).
fn transposed(by_feature: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return by_feature;
    }
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (o, v) in row.iter_mut().zip(by_feature[i..].iter().step_by(m)) {
            *o = *v;
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{WeightRow, BLOCK, GROUP};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// A weight row read 32 numbers (one quantization block) at a time, as four 8-lane
    /// vectors.
    trait Lanes32<'a> {
        /// The row; `w` has this format (one weight has one).
        fn typed(w: WeightRow<'a>) -> Self;
        /// Numbers `i..i + 32`; `i` is a multiple of 32 below the row's length rounded down.
        unsafe fn load(&self, i: usize) -> [__m256; 4];
    }

    struct F32Row<'a>(&'a [f32]);
    struct Bf16Row<'a>(&'a [u8]);
    struct F16Row<'a>(&'a [u8]);
    struct Q8_0Row<'a>(&'a [u8], &'a [f32]);
    struct Q4_1Row<'a>(&'a [u8], &'a [f32], &'a [f32]);

    // SAFETY (every `load`): the caller keeps `i + 32` within the row (see `Lanes32`), and
    // the callers are compiled with AVX2, FMA and F16C enabled and inline these.
    impl<'a> Lanes32<'a> for F32Row<'a> {
        fn typed(w: WeightRow<'a>) -> Self {
            match w {
                WeightRow::F32(w) => Self(w),
                _ => unreachable!("one weight, one format"),
            }
        }

        #[inline(always)]
        unsafe fn load(&self, i: usize) -> [__m256; 4] {
            let p = self.0.as_ptr().add(i);
            [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ]
        }
    }

    impl<'a> Lanes32<'a> for Bf16Row<'a> {
        fn typed(w: WeightRow<'a>) -> Self {
            match w {
                WeightRow::Bf16(b) => Self(b),
                _ => unreachable!("one weight, one format"),
            }
        }

        #[inline(always)]
        unsafe fn load(&self, i: usize) -> [__m256; 4] {
            let p = self.0.as_ptr().add(2 * i) as *const __m128i;
            let widen = |o: usize| {
                let h = _mm_loadu_si128(p.add(o));
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            };
            [widen(0), widen(1), widen(2), widen(3)]
        }
    }

    impl<'a> Lanes32<'a> for F16Row<'a> {
        fn typed(w: WeightRow<'a>) -> Self {
            match w {
                WeightRow::F16(b) => Self(b),
                _ => unreachable!("one weight, one format"),
            }
        }

        #[inline(always)]
        unsafe fn load(&self, i: usize) -> [__m256; 4] {
            let p = self.0.as_ptr().add(2 * i) as *const __m128i;
            let widen = |o: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(o)));
            [widen(0), widen(1), widen(2), widen(3)]
        }
    }

    impl<'a> Lanes32<'a> for Q8_0Row<'a> {
        fn typed(w: WeightRow<'a>) -> Self {
            match w {
                WeightRow::Q8_0 { codes, scales } => Self(codes, scales),
                _ => unreachable!("one weight, one format"),
            }
        }

        #[inline(always)]
        unsafe fn load(&self, i: usize) -> [__m256; 4] {
            let p = self.0.as_ptr().add(i) as *const __m128i;
            let d = _mm256_set1_ps(*self.1.get_unchecked(i / BLOCK));
            let (a, b) = (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)));
            let widen = |q: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
            [
                widen(a),
                widen(_mm_srli_si128(a, 8)),
                widen(b),
                widen(_mm_srli_si128(b, 8)),
            ]
        }
    }

    impl<'a> Lanes32<'a> for Q4_1Row<'a> {
        fn typed(w: WeightRow<'a>) -> Self {
            match w {
                WeightRow::Q4_1 {
                    codes,
                    scales,
                    offsets,
                } => Self(codes, scales, offsets),
                _ => unreachable!("one weight, one format"),
            }
        }

        #[inline(always)]
        unsafe fn load(&self, i: usize) -> [__m256; 4] {
            let block = i / BLOCK;
            let bytes = _mm_loadu_si128(self.0.as_ptr().add(block * BLOCK / 2) as *const __m128i);
            // Numbers 0-15 of a block are the low nibbles, 16-31 the high ones.
            let nibbles = _mm_set1_epi8(0x0F);
            let low = _mm_and_si128(bytes, nibbles);
            let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibbles);
            let d = _mm256_set1_ps(*self.1.get_unchecked(block));
            let m = _mm256_set1_ps(*self.2.get_unchecked(block));
            // q * d is exact in f32 (4 + 11 significant bits), so the fused add rounds once,
            // as candle's `q * d + m` does.
            let widen =
                |q: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), d, m);
            [
                widen(low),
                widen(_mm_srli_si128(low, 8)),
                widen(high),
                widen(_mm_srli_si128(high, 8)),
            ]
        }
    }

    /// `out[j * m + i] = rows[i] . weight_row(j)` for the `out.len() / m` weight rows of a task.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C ([`available`]); every row has `k` floats, and every
    /// weight row holds `k` numbers in the format of the first.
    pub unsafe fn rows_times_weights<'w>(
        rows: &[&[f32]],
        weight_row: impl Fn(usize) -> WeightRow<'w>,
        k: usize,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match weight_row(0) {
                WeightRow::F32(_) => by_registers::<F32Row>(rows, weight_row, k, out),
                WeightRow::Bf16(_) => by_registers::<Bf16Row>(rows, weight_row, k, out),
                WeightRow::F16(_) => by_registers::<F16Row>(rows, weight_row, k, out),
                WeightRow::Q8_0 { .. } => by_registers::<Q8_0Row>(rows, weight_row, k, out),
                WeightRow::Q4_1 { .. } => by_registers::<Q4_1Row>(rows, weight_row, k, out),
            }
        }
    }

    /// Whether the CPU has AVX-512's 32 vector registers (for 256-bit operations too).
    pub fn wide_registers() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
    }

    /// [`task`] compiled for AVX-512's 32 vector registers where the CPU has them (they
    /// hold [`quad_kernel`]'s accumulators), for AVX2's 16 elsewhere.
    #[inline(always)]
    unsafe fn by_registers<'w, W: Lanes32<'w>>(
        rows: &[&[f32]],
        weight_row: impl Fn(usize) -> WeightRow<'w>,
        k: usize,
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract, and the features are checked here.
        unsafe {
            if wide_registers() {
                task_32_registers::<W>(rows, weight_row, k, out)
            } else {
                task_16_registers::<W>(rows, weight_row, k, out)
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn task_16_registers<'w, W: Lanes32<'w>>(
        rows: &[&[f32]],
        weight_row: impl Fn(usize) -> WeightRow<'w>,
        k: usize,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { task::<W, 1>(rows, weight_row, k, out) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    unsafe fn task_32_registers<'w, W: Lanes32<'w>>(
        rows: &[&[f32]],
        weight_row: impl Fn(usize) -> WeightRow<'w>,
        k: usize,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { task::<W, 4>(rows, weight_row, k, out) }
    }

    /// [`rows_times_weights`] for one format, the kernel inlined: rows are short (576
    /// numbers for the default model) and a decode step takes hundreds of thousands of them,
    /// so a call and a format dispatch per row cost about a tenth of the step. With more
    /// rows than one kernel call takes, a compact row is unpacked once into f32 (the same
    /// numbers) rather than once per call, and `P` weight rows (one or four) meet each group
    /// of rows at a time. Inlined into its callers, whose target features it needs.
    #[inline(always)]
    unsafe fn task<'w, W: Lanes32<'w>, const P: usize>(
        rows: &[&[f32]],
        weight_row: impl Fn(usize) -> WeightRow<'w>,
        k: usize,
        out: &mut [f32],
    ) {
        let m = rows.len();
        if m > GROUP {
            // SAFETY: the caller's contract.
            return unsafe { many_rows::<W, P>(rows, weight_row, k, out) };
        }
        for (j, out) in out.chunks_mut(m).enumerate() {
            let w = weight_row(j);
            // SAFETY (kernels): the caller's contract.
            unsafe {
                match m {
                    1 => kernel::<W, 1>(rows, &W::typed(w), k, out, |i| w.get(i)),
                    2 => kernel::<W, 2>(rows, &W::typed(w), k, out, |i| w.get(i)),
                    _ => kernel::<W, 3>(rows, &W::typed(w), k, out, |i| w.get(i)),
                }
            }
        }
    }

    /// [`task`] for more rows than one kernel call takes: `P` (one, or four with AVX-512)
    /// weight rows at a time, unpacked once into f32 (the same numbers), met by [`GROUP`] rows
    /// per call.
    #[inline(always)]
    unsafe fn many_rows<'w, W: Lanes32<'w>, const P: usize>(
        rows: &[&[f32]],
        weight_row: impl Fn(usize) -> WeightRow<'w>,
        k: usize,
        out: &mut [f32],
    ) {
        let m = rows.len();
        let mut unpacked = vec![0f32; 4 * k];
        for (p, out) in out.chunks_mut(P * m).enumerate() {
            let mut buffers = unpacked.chunks_mut(k);
            if P == 4 && out.len() == 4 * m {
                // SAFETY (here and below): the caller's contract; each buffer has `k` floats.
                let w = unsafe {
                    [
                        as_f32::<W>(weight_row(4 * p), buffers.next().unwrap()),
                        as_f32::<W>(weight_row(4 * p + 1), buffers.next().unwrap()),
                        as_f32::<W>(weight_row(4 * p + 2), buffers.next().unwrap()),
                        as_f32::<W>(weight_row(4 * p + 3), buffers.next().unwrap()),
                    ]
                };
                for (g, rows) in rows.chunks(GROUP).enumerate() {
                    let first = g * GROUP;
                    unsafe {
                        match rows.len() {
                            1 => quad_kernel::<1>(rows, &w, out, first),
                            2 => quad_kernel::<2>(rows, &w, out, first),
                            _ => quad_kernel::<3>(rows, &w, out, first),
                        }
                    }
                }
                continue;
            }
            // One weight row at a time: always without AVX-512, and a task's last few with it.
            for (j, out) in out.chunks_mut(m).enumerate() {
                let w = unsafe { as_f32::<W>(weight_row(P * p + j), buffers.next().unwrap()) };
                let tail = |i: usize| w[i];
                for (out, rows) in out.chunks_mut(GROUP).zip(rows.chunks(GROUP)) {
                    unsafe {
                        match rows.len() {
                            1 => kernel::<F32Row, 1>(rows, &F32Row(w), k, out, tail),
                            2 => kernel::<F32Row, 2>(rows, &F32Row(w), k, out, tail),
                            _ => kernel::<F32Row, 3>(rows, &F32Row(w), k, out, tail),
                        }
                    }
                }
            }
        }
    }

    /// [`kernel`] over four f32 weight rows at once, in AVX-512's 16-lane vectors: each 16
    /// numbers of a row of `x` are loaded once for all four weight rows (from 16 rows of 576
    /// numbers on, the rows of `x` outgrow a 32 KB first-level cache, and their loads, not
    /// the multiply-adds, set the pace). Lane for lane, each output's two 16-lane accumulators are [`kernel`]'s
    /// four 8-lane ones, summed in the same order: the same bits. `out` holds the four weight
    /// rows' outputs for all `m` rows one after another; these rows start at row `first`.
    #[inline(always)]
    unsafe fn quad_kernel<const R: usize>(
        rows: &[&[f32]],
        w: &[&[f32]; 4],
        out: &mut [f32],
        first: usize,
    ) {
        let (k, m) = (w[0].len(), out.len() / 4);
        let body = k / BLOCK * BLOCK;
        let rows: &[&[f32]; R] = rows.try_into().expect("R rows");
        assert!(rows.iter().chain(w).all(|r| r.len() == k) && first + R <= m);
        let mut acc = [[[_mm512_setzero_ps(); 2]; 4]; R];
        for i in (0..body).step_by(BLOCK) {
            for h in 0..2 {
                // SAFETY: i + 32 <= body <= k for every row and weight row (asserted).
                unsafe {
                    let at = i + 16 * h;
                    let w = [
                        _mm512_loadu_ps(w[0].as_ptr().add(at)),
                        _mm512_loadu_ps(w[1].as_ptr().add(at)),
                        _mm512_loadu_ps(w[2].as_ptr().add(at)),
                        _mm512_loadu_ps(w[3].as_ptr().add(at)),
                    ];
                    for (acc, row) in acc.iter_mut().zip(rows) {
                        let x = _mm512_loadu_ps(row.as_ptr().add(at));
                        for (acc, w) in acc.iter_mut().zip(w) {
                            acc[h] = _mm512_fmadd_ps(x, w, acc[h]);
                        }
                    }
                }
            }
        }
        for (q, w) in w.iter().enumerate() {
            for (r, (acc, row)) in acc.iter().zip(rows).enumerate() {
                let [low, high] = acc[q];
                // SAFETY: the caller's target features.
                out[q * m + first + r] = unsafe {
                    let eights = [
                        halve::<0>(low),
                        halve::<1>(low),
                        halve::<0>(high),
                        halve::<1>(high),
                    ];
                    finish(&eights, row, body, |i| w[i])
                };
            }
        }
    }

    /// Lanes `8 * H..8 * H + 8` of a 16-lane vector.
    #[inline(always)]
    unsafe fn halve<const H: i32>(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<H>(_mm512_castps_pd(v)))
    }

    /// A weight row's numbers in f32: an f32 row itself, another unpacked into `buffer`
    /// (as many floats as the row has numbers).
    #[inline(always)]
    unsafe fn as_f32<'a, 'w: 'a, W: Lanes32<'w>>(
        w: WeightRow<'w>,
        buffer: &'a mut [f32],
    ) -> &'a [f32] {
        match w {
            WeightRow::F32(w) => w,
            w => {
                // SAFETY: forwarded from the caller.
                unsafe { store(&W::typed(w), buffer) };
                buffer
            }
        }
    }

    /// `out[i] = w[i]` for a compact row of `out.len()` numbers (whole blocks).
    #[inline(always)]
    unsafe fn store<'a, W: Lanes32<'a>>(w: &W, out: &mut [f32]) {
        assert!(out.len().is_multiple_of(BLOCK));
        for i in (0..out.len()).step_by(BLOCK) {
            // SAFETY: i + 32 <= out.len(), which the row holds (the caller's contract).
            unsafe {
                for (o, v) in w.load(i).into_iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * o), v);
                }
            }
        }
    }

    /// Each 32 numbers of `w` are loaded once and multiplied into four 8-lane accumulators
    /// per row (four independent chains: with two, a single row waited on the fused
    /// multiply-add's latency); the horizontal sums and the tail (`tail(i)` is number `i`)
    /// come last. A row's sums do not depend on `R`. Inlined into [`task`], whose target
    /// features its intrinsics need.
    #[inline(always)]
    unsafe fn kernel<'a, W: Lanes32<'a>, const R: usize>(
        rows: &[&[f32]],
        w: &W,
        k: usize,
        out: &mut [f32],
        tail: impl Fn(usize) -> f32,
    ) {
        let body = k / BLOCK * BLOCK;
        let rows: &[&[f32]; R] = rows.try_into().expect("R rows");
        assert!(rows.iter().all(|r| r.len() == k) && out.len() >= R);
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut i = 0;
        while i < body {
            // SAFETY: i + 32 <= body <= k, and every row has `k` floats (asserted).
            unsafe {
                let w = w.load(i);
                for (acc, row) in acc.iter_mut().zip(rows) {
                    let p = row.as_ptr().add(i);
                    for (o, (acc, w)) in acc.iter_mut().zip(w).enumerate() {
                        *acc = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8 * o)), w, *acc);
                    }
                }
            }
            i += BLOCK;
        }
        for ((o, acc), row) in out.iter_mut().zip(&acc).zip(rows) {
            *o = finish(acc, row, body, &tail);
        }
    }

    /// One output from its four accumulators, and the numbers past the last whole block.
    #[inline(always)]
    unsafe fn finish(
        acc: &[__m256; 4],
        row: &[f32],
        body: usize,
        tail: impl Fn(usize) -> f32,
    ) -> f32 {
        let mut lanes = [0f32; 8];
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let rest: f32 = (body..row.len()).map(|i| row[i] * tail(i)).sum();
        lanes.iter().sum::<f32>() + rest
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Where the CPU has AVX-512, the four-row kernel and the 16-register path give each
        /// output the same bits (with an odd weight row left over, and a tail past the blocks).
        #[test]
        fn both_register_files_give_the_same_bits() {
            if !(super::available() && wide_registers()) {
                return;
            }
            let k = 100;
            let value = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
            let x: Vec<f32> = (0..7 * k).map(value).collect();
            let w: Vec<f32> = (0..9 * k).map(|i| value(i + 13)).collect();
            let rows: Vec<&[f32]> = x.chunks(k).collect();
            let weight_row = |j: usize| WeightRow::F32(&w[j * k..][..k]);
            let (mut narrow, mut four) = (vec![0f32; 9 * 7], vec![0f32; 9 * 7]);
            // SAFETY: the features are checked above; rows and weight rows have `k` floats.
            unsafe {
                task_16_registers::<F32Row>(&rows, weight_row, k, &mut narrow);
                task_32_registers::<F32Row>(&rows, weight_row, k, &mut four);
            }
            assert_eq!(narrow, four);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_low_rank_update_has_the_values_and_gradients_of_the_composed_ops(
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (40, 64), &dev)?;
        let frozen = FrozenWeight::new(w.clone(), None);
        // 5 rows take the few-rows kernel, 40 take gemm.
        for rows in [5, 40] {
            let x = Var::randn(0f32, 1., (rows, 64), &dev)?;
            let a = Var::randn(0f32, 0.3, (4, 64), &dev)?;
            let b = Var::randn(0f32, 0.3, (40, 4), &dev)?;
            let update = LowRank {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
            };
            // A loss that weighs every output differently.
            let weights = Tensor::randn(0f32, 1., (rows, 40), &dev)?;
            let loss = |y: Tensor| (y * &weights)?.sum_all();
            let fused = frozen.matmul_low_rank(x.as_tensor(), &update, Rows::Spans)?;
            let composed = (x.as_tensor().matmul(&w.t()?)? + update.delta(x.as_tensor())?)?;
            let max_diff = |p: &Tensor, q: &Tensor| -> candle_core::Result<f32> {
                (p - q)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert!(max_diff(&fused, &composed)? < 1e-4);
            let fused_grads = loss(fused)?.backward()?;
            let composed_grads = loss(composed)?.backward()?;
            for v in [&x, &a, &b] {
                let (p, q) = (
                    fused_grads.get(v.as_tensor()).expect("fused gradient"),
                    composed_grads
                        .get(v.as_tensor())
                        .expect("composed gradient"),
                );
                assert!(max_diff(p, q)? < 1e-3, "{rows} rows: {}", max_diff(p, q)?);
            }
            // Detached weights get no gradient (generation builds no graph for them).
            let detached = LowRank {
                a: a.as_detached_tensor(),
                b: b.as_detached_tensor(),
                scale: 2.0,
            };
            let grads =
                loss(frozen.matmul_low_rank(x.as_tensor(), &detached, Rows::Spans)?)?.backward()?;
            assert!(grads.get(x.as_tensor()).is_some());
            assert!(grads.get(a.as_tensor()).is_none() && grads.get(b.as_tensor()).is_none());
        }
        Ok(())
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_gives_no_weight_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (2, 3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1., (5, 4), &dev)?;
        let y = FrozenWeight::new(w.clone(), None).matmul(x.as_tensor(), Rows::Spans)?;
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
    fn few_rows_matmul_matches_gemm_and_gives_a_row_the_same_bits_in_any_batch(
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // k = 100: three 32-number blocks and a tail; n = 131: a partial last task with an
        // odd number of weight rows.
        let w = Tensor::randn(0f32, 1., (131, 100), &dev)?;
        let plain = FrozenWeight::new(w.clone(), None);
        for rows in [Rows::Spans, Rows::PerSequence] {
            let limit = rows.few_rows_limit();
            let x = Tensor::randn(0f32, 1., (limit, 100), &dev)?;
            let reference = x.matmul(&w.t()?)?;
            let few = plain.matmul(&x, rows)?;
            let diff = (&few - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "{diff}");
            // Every batch size takes its own kernel path (1-3 rows, or groups of 3 and the
            // rest).
            let few = few.to_vec2::<f32>()?;
            for m in [1, 2, 3, 4, 5, 7, 17].into_iter().filter(|&m| m <= limit) {
                for start in [0, limit - m] {
                    let some = plain
                        .matmul(&x.narrow(0, start, m)?, rows)?
                        .to_vec2::<f32>()?;
                    assert_eq!(some, few[start..start + m], "{m} rows from {start}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gemm_gives_a_row_the_same_bits_in_either_orientation() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // k = 1536: the default model's widest input (the MLP's down projection).
        for k in [576, 1536] {
            let w = Tensor::randn(0f32, 1., (131, k), &dev)?;
            let plain = FrozenWeight::new(w, None);
            let x = Tensor::randn(0f32, 1., (FEW_TRANSPOSED + 40, k), &dev)?;
            let all = plain.matmul(&x, Rows::Spans)?.to_vec2::<f32>()?;
            for (start, m) in [(0, 17), (100, 150), (40, FEW_TRANSPOSED)] {
                let x = x.narrow(0, start, m)?;
                let some = plain.matmul(&x, Rows::Spans)?.to_vec2::<f32>()?;
                assert_eq!(
                    some,
                    all[start..start + m],
                    "{m} rows from {start}, k = {k}"
                );
            }
        }
        Ok(())
    }

    /// The weight `make` builds, in f32 as the model holds it and compact; decode steps
    /// must give the f32 path's bits.
    fn compact_matches_f32_bit_for_bit(
        make: impl Fn(&Tensor) -> candle_core::Result<(Tensor, CompactWeight)>,
    ) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // n = 131: a partial last task with an odd number of weight rows; k = 96: three blocks.
        let source = Tensor::randn(0f32, 0.05, (131, 96), &dev)?;
        let (f32_weight, compact) = make(&source)?;
        let plain = FrozenWeight::new(f32_weight.clone(), None);
        let light = FrozenWeight::new(f32_weight, Some(compact));
        assert!(light.compact.is_some());
        for m in [1, 3, Rows::PerSequence.few_rows_limit()] {
            let x = Tensor::randn(0f32, 1., (m, 96), &dev)?;
            let a = plain.matmul(&x, Rows::PerSequence)?.to_vec2::<f32>()?;
            let b = light.matmul(&x, Rows::PerSequence)?.to_vec2::<f32>()?;
            assert_eq!(a, b, "{m} rows");
        }
        Ok(())
    }

    fn gguf(t: &Tensor, dtype: GgmlDType) -> candle_core::Result<(Tensor, CompactWeight)> {
        let q = QTensor::quantize(t, dtype)?;
        let compact = CompactWeight::from_gguf(&q)?.expect("a format decode steps read");
        Ok((q.dequantize(&Device::Cpu)?, compact))
    }

    #[test]
    fn q4_1_blocks_give_the_bits_of_their_dequantized_f32() -> candle_core::Result<()> {
        compact_matches_f32_bit_for_bit(|t| gguf(t, GgmlDType::Q4_1))
    }

    #[test]
    fn q8_0_blocks_give_the_bits_of_their_dequantized_f32() -> candle_core::Result<()> {
        compact_matches_f32_bit_for_bit(|t| gguf(t, GgmlDType::Q8_0))
    }

    #[test]
    fn gguf_f16_gives_the_bits_of_its_f32() -> candle_core::Result<()> {
        compact_matches_f32_bit_for_bit(|t| gguf(t, GgmlDType::F16))
    }

    #[test]
    fn half_checkpoints_give_the_bits_of_their_f32() -> candle_core::Result<()> {
        for dtype in [DType::BF16, DType::F16] {
            compact_matches_f32_bit_for_bit(|t| {
                let half = t.to_dtype(dtype)?;
                let compact = CompactWeight::from_half(&half)?.expect("a half dtype");
                Ok((half.to_dtype(DType::F32)?, compact))
            })?;
        }
        Ok(())
    }

    #[test]
    fn a_compact_copy_is_kept_only_for_f32_cpu_weights() -> candle_core::Result<()> {
        let t = Tensor::randn(0f32, 1., (4, 32), &Device::Cpu)?;
        let (f32_weight, compact) = gguf(&t, GgmlDType::Q8_0)?;
        let as_f64 = FrozenWeight::new(f32_weight.to_dtype(DType::F64)?, Some(compact));
        assert!(as_f64.compact.is_none());
        Ok(())
    }
}
