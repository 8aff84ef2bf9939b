//! Per-sequence key/value cache. It is passed to the forward pass explicitly (never hidden in a
//! layer) because rollouts fork it: a branch starts from a copy of its parent's first k positions.
//!
//! Cached tensors are always detached: generation must not build a graph, and a cache never
//! outlives the weight version it was computed under (the engine drops caches on every update).

use candle_core::Tensor;

use crate::error::Result;

/// Buffers grow in steps of this many positions, so a decode step rarely reallocates.
const GROWTH: usize = 128;

#[derive(Debug, Clone)]
struct LayerBuffers {
    /// (kv_heads, capacity, head_dim), written in place up to `KvCache::len`.
    k: Tensor,
    v: Tensor,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerBuffers>>,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Positions already cached; the next token sits at this position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the allocated buffers (capacity, not just the positions filled).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|b| 2 * b.k.elem_count() * b.k.dtype().size_in_bytes())
            .sum()
    }

    /// Writes `n` new positions for `layer` after the cached ones and returns views of all
    /// `len + n` keys and values. `k`, `v`: (kv_heads, n, head_dim).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kv_heads, n, head_dim) = k.dims3()?;
        let needed = self.len + n;
        let grow = match &self.layers[layer] {
            Some(buf) => buf.k.dim(1)? < needed,
            None => true,
        };
        if grow {
            let capacity = needed.div_ceil(GROWTH) * GROWTH;
            let fresh = |old: Option<&Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((kv_heads, capacity, head_dim), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| self.len > 0) {
                    t.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(t)
            };
            let old = self.layers[layer].as_ref();
            let buffers = LayerBuffers {
                k: fresh(old.map(|b| &b.k))?,
                v: fresh(old.map(|b| &b.v))?,
            };
            self.layers[layer] = Some(buffers);
        }
        let buf = self.layers[layer]
            .as_ref()
            .expect("buffers were allocated just above");
        buf.k.slice_set(&k.detach().contiguous()?, 1, self.len)?;
        buf.v.slice_set(&v.detach().contiguous()?, 1, self.len)?;
        Ok((buf.k.narrow(1, 0, needed)?, buf.v.narrow(1, 0, needed)?))
    }

    /// The key and value buffers of `layer`, (kv_heads, capacity, head_dim); valid up to
    /// the positions appended so far.
    pub(crate) fn buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer)?.as_ref().map(|b| (&b.k, &b.v))
    }

    /// Called once per forward, after every layer appended `n` positions.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// A new cache holding a copy of the first `k` positions: the branch continues from
    /// there without recomputing the prefix.
    pub fn fork(&self, k: usize) -> Result<KvCache> {
        let k = k.min(self.len);
        let copy = |t: &Tensor| -> Result<Tensor> {
            let (heads, _, head_dim) = t.dims3()?;
            let capacity = (k + 1).div_ceil(GROWTH) * GROWTH;
            let out = Tensor::zeros((heads, capacity, head_dim), t.dtype(), t.device())?;
            if k > 0 {
                out.slice_set(&t.narrow(1, 0, k)?.contiguous()?, 1, 0)?;
            }
            Ok(out)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|b| {
                        Ok(LayerBuffers {
                            k: copy(&b.k)?,
                            v: copy(&b.v)?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers, len: k })
    }
}
