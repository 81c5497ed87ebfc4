//! The KV pool: keys (after RoPE) and values of every layer in pages of PAGE_SIZE positions, shared
//! by every sequence, and a page table row per sequence slot mapping its positions to pool pages.
//! [`KvPool`] is the GPU side, allocated once at load; [`PageAllocator`] is the scheduler's
//! bookkeeping: free pages, the pages each running sequence may still take, and a prefix cache of
//! pages whose contents a later sequence can reuse (vLLM's automatic prefix caching).

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::gpu::ops::KvLayer;
use crate::gpu::{Gpu, GpuError, KvType};

use super::{Config, ModelError};

/// Positions per page: the unit of allocation and of prefix sharing between sequences.
pub const PAGE_SIZE: usize = 16;

/// Per layer, the key and value buffers of (pages * PAGE_SIZE, n_kv_heads * head_dim) elements of
/// the device's KV type, cut into buffers of pages_per_buffer pages where one buffer would pass
/// the binding limit, and the page table: (sequences, pages_per_sequence) u32 pool pages.
pub struct KvPool {
    pub kv_type: KvType,
    pub pages: usize,
    pub pages_per_sequence: usize,
    pub sequences: usize,
    pub pages_per_buffer: usize,
    /// Per layer, each buffer's (keys, values).
    pub layers: Vec<Vec<(wgpu::Buffer, wgpu::Buffer)>>,
    pub page_table: wgpu::Buffer,
}

impl KvPool {
    /// Bytes one page of `kv_type` takes over all layers, keys and values.
    pub fn bytes_per_page(config: &Config, kv_type: KvType) -> u64 {
        2 * config.n_layers as u64 * Self::buffer_bytes_per_page(config, kv_type)
    }

    fn buffer_bytes_per_page(config: &Config, kv_type: KvType) -> u64 {
        PAGE_SIZE as u64 * kv_type.row_bytes(config.kv_dim())
    }

    /// The most pages one buffer binds; an error naming the limit when not even one does.
    pub fn pages_per_buffer(gpu: &Gpu, config: &Config) -> Result<usize, GpuError> {
        let page = Self::buffer_bytes_per_page(config, gpu.kv_type);
        gpu.check_binding("kv pool page", page)?;
        Ok((gpu.max_binding() / page) as usize)
    }

    /// A pool of `pages`, or an error naming why the device cannot hold it.
    pub async fn new(gpu: &Gpu, config: &Config, pages: usize, pages_per_sequence: usize, sequences: usize) -> Result<Self, crate::Error> {
        match Self::allocate(gpu, config, pages, pages_per_sequence, sequences).await? {
            Ok(pool) => Ok(pool),
            Err(error) => Err(Self::too_large(config, gpu.kv_type, pages, format!("the device is out of memory: {error}")).into()),
        }
    }

    /// The largest pool of `least..=pages` pages the device's memory holds, halving from `pages`
    /// while it is out of memory. Each sequence's page table row takes `pages_per_sequence` or, if
    /// smaller, the pool's pages.
    pub async fn largest(gpu: &Gpu, config: &Config, pages: usize, least: usize, pages_per_sequence: usize, sequences: usize) -> Result<Self, crate::Error> {
        let least = least.max(1);
        let mut tried = pages.max(least);
        loop {
            match Self::allocate(gpu, config, tried, pages_per_sequence.min(tried), sequences).await? {
                Ok(pool) => return Ok(pool),
                Err(error) if tried == least => return Err(Self::too_large(config, gpu.kv_type, least, format!("the device is out of memory: {error}")).into()),
                Err(_) => tried = (tried / 2).max(least),
            }
        }
    }

    fn too_large(config: &Config, kv_type: KvType, pages: usize, reason: String) -> ModelError {
        ModelError::KvPoolTooLarge {
            pages,
            positions: pages * PAGE_SIZE,
            needed: pages as u64 * Self::bytes_per_page(config, kv_type),
            kv_type: kv_type.name(),
            reason,
        }
    }

    /// The pool, or the device's out-of-memory error (binding limits fail at once).
    async fn allocate(gpu: &Gpu, config: &Config, pages: usize, pages_per_sequence: usize, sequences: usize) -> Result<Result<Self, wgpu::Error>, crate::Error> {
        let kv_type = gpu.kv_type;
        let pages_per_buffer = Self::pages_per_buffer(gpu, config)?.min(pages);
        let table_bytes = (4 * sequences * pages_per_sequence) as u64;
        gpu.check_binding("kv page table", table_bytes)?;
        let page_bytes = Self::buffer_bytes_per_page(config, kv_type);
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let layers = (0..config.n_layers)
            .map(|i| {
                (0..pages)
                    .step_by(pages_per_buffer)
                    .map(|first| {
                        let bytes = (pages - first).min(pages_per_buffer) as u64 * page_bytes;
                        (gpu.storage_buffer(&format!("k pool {i} from page {first}"), bytes), gpu.storage_buffer(&format!("v pool {i} from page {first}"), bytes))
                    })
                    .collect()
            })
            .collect();
        let page_table = gpu.storage_buffer("kv page table", table_bytes);
        if let Some(error) = scope.pop().await {
            return Ok(Err(error));
        }
        Ok(Ok(Self { kv_type, pages, pages_per_sequence, sequences, pages_per_buffer, layers, page_table }))
    }

    /// Whether the q/k/v projection writes its keys and values to staging rows that kv_store moves
    /// into the pool: where the pool spans several buffers (a projection binds one) or is
    /// quantized (its blocks span the threads that compute them).
    pub fn staged(&self) -> bool {
        self.kv_type == KvType::Q8_0 || self.pages_per_buffer < self.pages
    }

    /// Buffers per layer.
    pub fn buffers(&self) -> usize {
        self.pages.div_ceil(self.pages_per_buffer)
    }

    /// Layer `layer`'s buffers and the page table, as attention and kv_store bind them.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        KvLayer { buffers: &self.layers[layer], pages: self.pages, pages_per_buffer: self.pages_per_buffer, page_table: &self.page_table, pages_per_sequence: self.pages_per_sequence }
    }

    /// Writes `pages` into sequence slot `sequence`'s page table row from its page `first` on.
    pub fn write_page_table(&self, gpu: &Gpu, sequence: usize, first: usize, pages: &[u32]) {
        assert!(sequence < self.sequences && first + pages.len() <= self.pages_per_sequence, "page table row {sequence}");
        let offset = (4 * (sequence * self.pages_per_sequence + first)) as u64;
        gpu.queue.write_buffer(&self.page_table, offset, bytemuck::cast_slice(pages));
    }
}

/// The chain hash of a page's tokens after the pages before it (whose chain hash is `parent`):
/// equal hashes mean equal prefixes, so equal keys and values.
pub fn page_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// What a cached page holds: the tokens of its positions, after a prefix of chain hash `parent`.
/// Full pages are shared, found by their own hash. The last page a prompt reaches into is found
/// by its parent's hash, partial (the last page of a finished sequence) or full, and taken over
/// only while no sequence holds it.
#[derive(Clone, Debug)]
struct Cached {
    parent: u64,
    tokens: Vec<u32>,
}

/// The pages of a prompt's longest cached prefix: full pages shared read-only, then perhaps a page
/// taken over whose first positions (the pair's second value) hold the prompt's next tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefixMatch {
    pub full: Vec<u32>,
    pub tail: Option<(u32, usize)>,
}

impl PrefixMatch {
    /// Prompt tokens whose keys and values the matched pages already hold.
    pub fn tokens(&self) -> usize {
        self.full.len() * PAGE_SIZE + self.tail.map_or(0, |(_, n)| n)
    }

    pub fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.full.iter().copied().chain(self.tail.map(|(page, _)| page))
    }
}

/// The host's account of the pool's pages.
pub struct PageAllocator {
    /// Holders of each page: running sequences, each counted once.
    refs: Vec<u32>,
    /// Pages no sequence holds, least recently released first; pages taken back from the prefix
    /// cache stay in it until popped (skipped then, as `refs` shows).
    free: VecDeque<u32>,
    free_count: usize,
    /// Pages running sequences may still take; never more than the free ones.
    reserved: usize,
    cached: Vec<Option<Cached>>,
    /// Full pages by their chain hash.
    full: HashMap<u64, u32>,
    /// The latest page cached after each chain hash, full or partial.
    by_parent: HashMap<u64, u32>,
}

impl PageAllocator {
    pub fn new(pages: usize) -> Self {
        Self {
            refs: vec![0; pages],
            free: (0..pages as u32).collect(),
            free_count: pages,
            reserved: 0,
            cached: vec![None; pages],
            full: HashMap::new(),
            by_parent: HashMap::new(),
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Pages no sequence holds (some of them holding cached prefixes).
    pub fn free(&self) -> usize {
        self.free_count
    }

    /// Free pages not promised to a running sequence.
    pub fn available(&self) -> usize {
        self.free_count - self.reserved
    }

    /// The longest cached prefix of `tokens` of at most `max_tokens` tokens.
    pub fn find_prefix(&self, tokens: &[u32], max_tokens: usize) -> PrefixMatch {
        let mut found = PrefixMatch::default();
        let mut parent = 0;
        while (found.full.len() + 1) * PAGE_SIZE <= max_tokens {
            let start = found.full.len() * PAGE_SIZE;
            let page_tokens = &tokens[start..start + PAGE_SIZE];
            let hash = page_hash(parent, page_tokens);
            match self.full.get(&hash) {
                Some(&page) if self.holds(page, parent, page_tokens) => found.full.push(page),
                _ => break,
            }
            parent = hash;
        }
        if let Some(&page) = self.by_parent.get(&parent) {
            let start = found.full.len() * PAGE_SIZE;
            let cached = self.cached[page as usize].as_ref().filter(|c| c.parent == parent);
            let rest = &tokens[start..max_tokens.max(start)];
            let shared = cached.map_or(0, |c| c.tokens.iter().zip(rest).take_while(|(a, b)| a == b).count());
            if shared > 0 && self.refs[page as usize] == 0 {
                found.tail = Some((page, shared));
            }
        }
        found
    }

    fn holds(&self, page: u32, parent: u64, tokens: &[u32]) -> bool {
        self.cached[page as usize].as_ref().is_some_and(|c| c.parent == parent && c.tokens == tokens)
    }

    /// Admits a sequence that starts with the pages of `prefix` and needs `pages` pages: takes
    /// the prefix's pages and reserves the rest. None, changing nothing, when the free pages
    /// cannot cover it and leave `kept_free` of them unpromised.
    pub fn admit(&mut self, prefix: &PrefixMatch, pages: usize, kept_free: usize) -> Option<Vec<u32>> {
        let held = prefix.pages().count();
        let revived = prefix.pages().filter(|&p| self.refs[p as usize] == 0).count();
        let new = pages.saturating_sub(held);
        if revived + new + kept_free > self.available() {
            return None;
        }
        for page in prefix.pages() {
            if self.refs[page as usize] == 0 {
                self.free_count -= 1;
            }
            self.refs[page as usize] += 1;
        }
        if let Some((page, _)) = prefix.tail {
            // Taken over to be written past its shared tokens: no longer a cached prefix.
            self.forget(page);
        }
        self.reserved += new;
        Some(prefix.pages().collect())
    }

    /// Takes one of the pages reserved by an admitted sequence.
    pub fn take_reserved(&mut self) -> u32 {
        assert!(self.reserved > 0, "a sequence took more pages than it reserved");
        self.reserved -= 1;
        self.take_free()
    }

    /// Takes a free page no sequence was promised; None when there is none.
    pub fn take_unreserved(&mut self) -> Option<u32> {
        (self.available() > 0).then(|| self.take_free())
    }

    /// The least recently released free page, now held by one sequence.
    fn take_free(&mut self) -> u32 {
        let page = loop {
            let page = self.free.pop_front().expect("the free count matches the free list");
            if self.refs[page as usize] == 0 {
                break page;
            }
        };
        self.forget(page);
        self.refs[page as usize] = 1;
        self.free_count -= 1;
        page
    }

    /// Gives back a sequence's pages (last first, so that the ends of sequences are reused before
    /// the prefixes they share) and the reservation it did not take.
    pub fn release(&mut self, pages: &[u32], unused_reservation: usize) {
        self.reserved -= unused_reservation;
        for &page in pages.iter().rev() {
            let refs = &mut self.refs[page as usize];
            *refs -= 1;
            if *refs == 0 {
                self.free.push_back(page);
                self.free_count += 1;
            }
        }
        // Pages taken back from the cache leave stale entries behind; drop them now and then.
        if self.free.len() > 2 * self.refs.len() {
            let mut seen = vec![false; self.refs.len()];
            let refs = &self.refs;
            self.free.retain(|&p| refs[p as usize] == 0 && !std::mem::replace(&mut seen[p as usize], true));
        }
    }

    /// Records that full page `page` holds `tokens` after the prefix `parent`; returns its hash.
    /// A prefix cached in another page already keeps that one.
    pub fn cache_full(&mut self, page: u32, parent: u64, tokens: &[u32]) -> u64 {
        let hash = page_hash(parent, tokens);
        if !self.full.get(&hash).is_some_and(|&other| self.holds(other, parent, tokens)) {
            self.forget(page);
            self.full.insert(hash, page);
            self.by_parent.insert(parent, page);
            self.cached[page as usize] = Some(Cached { parent, tokens: tokens.to_vec() });
        }
        hash
    }

    /// Records that the partial last page of a finished sequence holds `tokens` after `parent`.
    pub fn cache_partial(&mut self, page: u32, parent: u64, tokens: &[u32]) {
        self.forget(page);
        self.by_parent.insert(parent, page);
        self.cached[page as usize] = Some(Cached { parent, tokens: tokens.to_vec() });
    }

    /// Drops what the prefix cache knows of `page`, which is about to be written.
    fn forget(&mut self, page: u32) {
        let Some(cached) = self.cached[page as usize].take() else { return };
        if cached.tokens.len() == PAGE_SIZE {
            let hash = page_hash(cached.parent, &cached.tokens);
            if self.full.get(&hash) == Some(&page) {
                self.full.remove(&hash);
            }
        }
        if self.by_parent.get(&cached.parent) == Some(&page) {
            self.by_parent.remove(&cached.parent);
        }
    }
}
