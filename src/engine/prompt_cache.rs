//! Prompt KV reuse across requests, what vLLM calls automatic prefix caching and llama.cpp's
//! server its prompt cache: a request whose prompt starts like a recent one's (a system
//! prompt, a chat template, the same question again) copies that prompt's keys and values
//! instead of prefilling them. An entry belongs to one adapter at one version, and the
//! engine forgets an adapter's entries whenever its weights change, so no KV computed under
//! one weight version is used under another. A prompt seen whole again also gets the logits
//! after it, so its first token needs no forward pass and its answer has the first run's bits.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::model::KvCache;

/// Bytes of cached keys and values in all, over every entry, without a KV-cache budget. A
/// position of the default model takes about 46 KB (30 layers of 3 key and 3 value heads of
/// 64 floats), and an entry holds at least 128 (the cache's growth step): 44 such entries.
const CACHED_BYTES: usize = 256 << 20;

/// With a KV-cache budget, the prompt cache may hold this fraction of it besides.
const BUDGET_SHARE: usize = 8;

/// Shorter shared prefixes are not worth a copy.
const MIN_REUSED: usize = 8;

struct Entry {
    /// The adapter's key (`None`: the base model) and its version.
    adapter: Option<String>,
    version: u64,
    prompt: Vec<u32>,
    /// The prompt's keys and values, `prompt.len()` positions.
    cache: KvCache,
    /// The logits after the prompt's last token.
    logits: Arc<Vec<f32>>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.cache.bytes() + 4 * self.logits.len()
    }
}

/// The most recently used prompts first.
pub struct PromptCache {
    entries: VecDeque<Entry>,
    capacity_bytes: usize,
}

impl PromptCache {
    /// `kv_budget_bytes`: the running sequences' KV-cache budget, if any; the prompt cache
    /// takes an eighth of it besides (so a budget sized to memory stays about right), or
    /// [`CACHED_BYTES`] without one.
    pub fn new(kv_budget_bytes: Option<usize>) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity_bytes: kv_budget_bytes.map_or(CACHED_BYTES, |b| b / BUDGET_SHARE),
        }
    }

    /// A copy of the longest cached prefix of `prompt` under these weights: the whole prompt
    /// with the logits after it when this prompt was seen whole, else at most all but its
    /// last token (fed again for its logits); `None` when no entry shares [`MIN_REUSED`]
    /// tokens.
    pub fn lookup(
        &mut self,
        adapter: Option<&str>,
        version: u64,
        prompt: &[u32],
    ) -> Option<(KvCache, Option<Arc<Vec<f32>>>)> {
        let (best, reused) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter.as_deref() == adapter && e.version == version)
            .map(|(i, e)| {
                if e.prompt == prompt {
                    return (i, prompt.len());
                }
                let shared = e.prompt.iter().zip(prompt).take_while(|(a, b)| a == b);
                (i, shared.count().min(prompt.len().saturating_sub(1)))
            })
            .max_by_key(|&(_, reused)| reused)?;
        if reused < MIN_REUSED {
            return None;
        }
        let entry = self.entries.remove(best)?;
        let logits = (reused == prompt.len()).then(|| entry.logits.clone());
        let copy = entry.cache.fork(reused).ok().map(|cache| (cache, logits));
        self.entries.push_front(entry);
        copy
    }

    /// Remembers a prefilled prompt (a copy of `cache`'s first `prompt.len()` positions) and
    /// the logits after it, dropping the least recently used entries beyond its capacity.
    pub fn insert(
        &mut self,
        adapter: Option<&str>,
        version: u64,
        prompt: &[u32],
        cache: &KvCache,
        logits: Arc<Vec<f32>>,
    ) {
        if prompt.len() < MIN_REUSED || cache.len() < prompt.len() {
            return;
        }
        self.entries.retain(|e| {
            !(e.adapter.as_deref() == adapter && e.version == version && e.prompt == prompt)
        });
        let Ok(cache) = cache.fork(prompt.len()) else {
            return;
        };
        self.entries.push_front(Entry {
            adapter: adapter.map(str::to_string),
            version,
            prompt: prompt.to_vec(),
            cache,
            logits,
        });
        let mut bytes = 0;
        self.entries.retain(|e| {
            bytes += e.bytes();
            bytes <= self.capacity_bytes
        });
    }

    /// Drops every entry of `adapter`, whose weights changed.
    pub fn forget(&mut self, adapter: &str) {
        self.entries
            .retain(|e| e.adapter.as_deref() != Some(adapter));
    }

    /// Bytes of the cached keys, values and logits.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(Entry::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// One layer, one head of width 1: position i holds the number i.
    fn cache_of(n: usize) -> KvCache {
        let mut cache = KvCache::new(1);
        let k = Tensor::arange(0f32, n as f32, &Device::Cpu)
            .and_then(|t| t.reshape((1, n, 1)))
            .unwrap();
        cache.append(0, &k, &k).unwrap();
        cache.advance(n);
        cache
    }

    fn logits() -> Arc<Vec<f32>> {
        Arc::new(vec![0.5, 1.5])
    }

    fn cached_numbers(cache: &KvCache) -> Vec<f32> {
        let (k, _) = cache.buffers(0).unwrap();
        let k = k.narrow(1, 0, cache.len()).unwrap();
        k.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn reused_len(hit: Option<(KvCache, Option<Arc<Vec<f32>>>)>) -> Option<usize> {
        hit.map(|(cache, _)| cache.len())
    }

    #[test]
    fn a_prompt_reuses_the_longest_cached_prefix_under_its_own_weights() {
        let mut cache = PromptCache::new(None);
        let twenty: Vec<u32> = (0..20).collect();
        let shares_ten: Vec<u32> = (0..10).chain(100..120).collect();
        cache.insert(None, 0, &shares_ten, &cache_of(30), logits());
        cache.insert(None, 0, &twenty, &cache_of(20), logits());

        // The same prompt again: all of it, and the logits after it.
        let (reused, after) = cache.lookup(None, 0, &twenty).unwrap();
        let numbers: Vec<f32> = (0..20).map(|i| i as f32).collect();
        assert_eq!(cached_numbers(&reused), numbers);
        assert_eq!(after, Some(logits()));
        // A prompt cut short: all but its last token, fed again for its logits.
        let (reused, after) = cache.lookup(None, 0, &twenty[..15]).unwrap();
        assert_eq!((reused.len(), after), (14, None));
        // A longer prompt that starts with a cached one takes all of it; the longest match wins.
        let longer: Vec<u32> = (0..40).collect();
        let (reused, after) = cache.lookup(None, 0, &longer).unwrap();
        assert_eq!((reused.len(), after), (20, None));
        let other: Vec<u32> = (0..10).chain(100..105).chain(7..9).collect();
        assert_eq!(reused_len(cache.lookup(None, 0, &other)), Some(15));
        // Too short a shared prefix, another adapter, another version: nothing.
        let short: Vec<u32> = (0..5).chain(50..70).collect();
        assert!(cache.lookup(None, 0, &short).is_none());
        assert!(cache.lookup(Some("a"), 0, &twenty).is_none());
        assert!(cache.lookup(None, 1, &twenty).is_none());

        // An adapter whose weights change is forgotten, and only it.
        cache.insert(Some("a"), 3, &twenty, &cache_of(20), logits());
        assert!(cache.lookup(Some("a"), 3, &twenty).is_some());
        cache.forget("a");
        assert!(cache.lookup(Some("a"), 3, &twenty).is_none());
        assert!(cache.lookup(None, 0, &twenty).is_some());
    }

    #[test]
    fn the_least_recently_used_prompts_go_beyond_the_capacity() {
        // Each entry takes 2 x 128 positions (the growth step) x 4 bytes and two logits; the
        // cache gets an eighth of the KV budget: room for two.
        let entry = 2 * 128 * 4 + 2 * 4;
        let mut cache = PromptCache::new(Some(8 * 2 * entry + 1));
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|p| (0..16).map(|i| p * 100 + i).collect())
            .collect();
        for p in &prompts[..2] {
            cache.insert(None, 0, p, &cache_of(16), logits());
        }
        assert!(cache.lookup(None, 0, &prompts[0]).is_some()); // now the most recent
        cache.insert(None, 0, &prompts[2], &cache_of(16), logits());
        assert!(cache.lookup(None, 0, &prompts[1]).is_none());
        assert!(cache.lookup(None, 0, &prompts[0]).is_some());
        assert!(cache.lookup(None, 0, &prompts[2]).is_some());
        assert_eq!(cache.bytes(), 2 * entry);
    }
}
