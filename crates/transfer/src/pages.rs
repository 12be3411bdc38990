//! Memory pages between agents, content-addressed.
//!
//! A pre-copy round sends the content of pages that changed and that the destination does not
//! already hold. The destination keeps pages in a [`PageStore`] keyed by their blake3 hash, which
//! it computes itself: a peer never names the hash of content it sends. Later, the final dump
//! refers to pages the destination holds by hash only (32 bytes instead of 4096), and migrating
//! back to a host that still holds pages from an earlier visit sends only what changed.
//!
//! Wire format of a page stream: batches, each
//! `u32 BE count` (1..=[`MAX_BATCH`]), `u8 encoding` (0 raw, 1 zstd), `u32 BE payload_len`,
//! then `payload_len` bytes that are (or decompress to exactly) `count * 4096` bytes of page
//! content; a `u32 0` ends the stream. Lengths are checked before anything is allocated, and
//! zstd output is bounded by the announced size.
//!
//! The sender compresses a batch with zstd (level 1) and sends it raw when that does not save at
//! least 1/16 of its size. After such a batch it skips compression for the next
//! [`SKIP_AFTER_INCOMPRESSIBLE`] batches, so incompressible memory costs no compression time.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{read_err, write_err};
use crate::slab::Slabs;
use crate::TransferError;

/// Size of a page.
pub const PAGE: usize = 4096;
/// Most pages in one batch (1 MiB).
pub const MAX_BATCH: usize = 256;
/// Batches sent raw, without trying zstd, after one that did not compress.
pub const SKIP_AFTER_INCOMPRESSIBLE: u32 = 8;

/// The blake3 hash of a page's content.
pub type PageHash = [u8; 32];

/// Hashes [`PageHash`] keys for hash tables: they are already uniformly distributed, so a few
/// multiply-rotate steps over their words do (SipHash, the default, spent a tenth of a final
/// dump's CPU time). The steps are keyed with per-process random keys, so that a peer choosing
/// page contents cannot aim at the table's buckets.
#[derive(Debug, Clone, Copy)]
pub struct PageHashBuilder {
    k0: u64,
    k1: u64,
}

impl Default for PageHashBuilder {
    fn default() -> Self {
        let r = std::collections::hash_map::RandomState::new();
        PageHashBuilder {
            k0: r.hash_one(0x5eed_u64) | 1,
            k1: r.hash_one(0xf00d_u64),
        }
    }
}

impl BuildHasher for PageHashBuilder {
    type Hasher = PageHasher;
    fn build_hasher(&self) -> PageHasher {
        PageHasher {
            h: self.k1,
            k: self.k0,
        }
    }
}

/// See [`PageHashBuilder`].
#[derive(Debug, Clone, Copy)]
pub struct PageHasher {
    h: u64,
    k: u64,
}

impl PageHasher {
    #[inline]
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(self.k).rotate_left(29);
    }
}

impl Hasher for PageHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
        for &b in chunks.remainder() {
            self.mix(u64::from(b));
        }
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let h = self.h.wrapping_mul(self.k);
        h ^ (h >> 32)
    }
}

/// A set of page hashes with the fast keyed hasher.
pub type PageSet = HashSet<PageHash, PageHashBuilder>;

/// Hashes one page.
pub fn hash_page(page: &[u8]) -> PageHash {
    *blake3::hash(page).as_bytes()
}

/// Pages held by a host, by content hash, with a cap on their number. The pages live in
/// page-aligned slots ([`crate::slab`]): the memory of a page the store forgets goes back to
/// the kernel at once.
#[derive(Debug)]
pub struct PageStore {
    pages: HashMap<PageHash, u32, PageHashBuilder>,
    slabs: Slabs,
    max_pages: usize,
}

impl PageStore {
    /// An empty store that holds at most `max_pages` pages.
    pub fn new(max_pages: usize) -> PageStore {
        PageStore {
            pages: HashMap::default(),
            slabs: Slabs::default(),
            max_pages,
        }
    }

    /// Stores a page under the hash of its content (computed here); returns the hash.
    pub fn insert(&mut self, page: &[u8]) -> Result<PageHash, TransferError> {
        if page.len() != PAGE {
            return Err(TransferError::Protocol {
                reason: format!("a page has {} bytes, not {PAGE}", page.len()),
            });
        }
        let h = hash_page(page);
        if !self.pages.contains_key(&h) {
            if self.pages.len() >= self.max_pages {
                return Err(TransferError::TooLarge {
                    len: (self.pages.len() as u64 + 1) * PAGE as u64,
                    cap: self.max_pages as u64 * PAGE as u64,
                });
            }
            self.put(h, page)?;
        }
        Ok(h)
    }

    fn put(&mut self, h: PageHash, page: &[u8]) -> Result<(), TransferError> {
        let slot = self
            .slabs
            .alloc()
            .map_err(|source| TransferError::OutOfMemory {
                held: self.pages.len(),
                source,
            })?;
        self.slabs.page_mut(slot).copy_from_slice(page);
        self.pages.insert(h, slot);
        Ok(())
    }

    /// Changes how many pages the store may hold (pages beyond a lower cap stay until
    /// removed; nothing more is stored until there is room).
    pub fn set_max_pages(&mut self, max_pages: usize) {
        self.max_pages = max_pages;
    }

    /// How many pages the store may hold.
    pub fn max_pages(&self) -> usize {
        self.max_pages
    }

    /// Stores a page whose hash the caller computed itself (a host's own memory, never a
    /// peer's data). Returns false when the store is full (or out of memory) and the page is
    /// not held.
    pub fn insert_own(&mut self, h: PageHash, page: &[u8]) -> bool {
        if page.len() != PAGE {
            return false;
        }
        if self.pages.contains_key(&h) {
            return true;
        }
        if self.pages.len() >= self.max_pages {
            return false;
        }
        self.put(h, page).is_ok()
    }

    /// Moves every page of `other` into this store. Fails, moving nothing, when they would
    /// not fit.
    pub fn absorb(&mut self, other: PageStore) -> Result<(), TransferError> {
        let new = other
            .pages
            .keys()
            .filter(|h| !self.pages.contains_key(*h))
            .count();
        if self.pages.len() + new > self.max_pages {
            return Err(TransferError::TooLarge {
                len: (self.pages.len() + new) as u64 * PAGE as u64,
                cap: self.max_pages as u64 * PAGE as u64,
            });
        }
        // Their memory becomes this store's, without a copy.
        let base = self.slabs.append(other.slabs);
        let mut twice = Vec::new();
        for (h, slot) in other.pages {
            match self.pages.entry(h) {
                std::collections::hash_map::Entry::Occupied(_) => twice.push(base + slot),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(base + slot);
                }
            }
        }
        self.slabs.release(twice);
        Ok(())
    }

    /// Room left, in pages.
    pub fn free_pages(&self) -> usize {
        self.max_pages.saturating_sub(self.pages.len())
    }

    /// The page with this hash, if held.
    pub fn get(&self, h: &PageHash) -> Option<&[u8]> {
        self.pages.get(h).map(|s| self.slabs.page(*s))
    }

    /// Whether the page is held.
    pub fn contains(&self, h: &PageHash) -> bool {
        self.pages.contains_key(h)
    }

    /// Number of distinct pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Every hash held (what a source needs to know to skip those pages).
    pub fn hashes(&self) -> HashSet<PageHash> {
        self.pages.keys().copied().collect()
    }

    /// Forgets these pages (those held); their memory goes back to the kernel. Returns how
    /// many were held.
    pub fn remove<'a>(&mut self, hashes: impl IntoIterator<Item = &'a PageHash>) -> usize {
        let slots: Vec<u32> = hashes
            .into_iter()
            .filter_map(|h| self.pages.remove(h))
            .collect();
        let n = slots.len();
        self.slabs.release(slots);
        n
    }

    /// Forgets the pages in `drop` that are not in `keep`; returns how many.
    pub fn remove_except<S1: BuildHasher, S2: BuildHasher>(
        &mut self,
        drop: &HashSet<PageHash, S1>,
        keep: &HashSet<PageHash, S2>,
    ) -> usize {
        let n = self.remove(drop.iter().filter(|h| !keep.contains(*h)));
        self.pages.shrink_to_fit();
        n
    }

    /// Forgets every page not in `keep`.
    pub fn retain<S: BuildHasher>(&mut self, keep: &HashSet<PageHash, S>) {
        let mut gone = Vec::new();
        self.pages.retain(|h, slot| {
            let k = keep.contains(h);
            if !k {
                gone.push(*slot);
            }
            k
        });
        self.slabs.release(gone);
    }
}

/// Counters of one page stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Pages in the stream.
    pub pages: u64,
    /// Batches.
    pub batches: u64,
    /// Batches sent compressed.
    pub compressed_batches: u64,
    /// Bytes on the stream.
    pub wire_bytes: u64,
}

/// Writes pages as batches, compressing when it pays.
pub struct PageWriter<'w, W: ?Sized> {
    w: &'w mut W,
    zc: zstd::bulk::Compressor<'static>,
    raw: Vec<u8>,
    skip: u32,
    stats: PageStats,
}

impl<'w, W> PageWriter<'w, W>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    /// A writer on `w`.
    pub fn new(w: &'w mut W) -> Result<Self, TransferError> {
        let zc = zstd::bulk::Compressor::new(1).map_err(|e| TransferError::Decode {
            what: "a zstd compressor",
            reason: e.to_string(),
        })?;
        Ok(PageWriter {
            w,
            zc,
            raw: Vec::with_capacity(MAX_BATCH * PAGE),
            skip: 0,
            stats: PageStats::default(),
        })
    }

    /// Bytes written to the stream so far (whole batches).
    pub fn wire_bytes(&self) -> u64 {
        self.stats.wire_bytes
    }

    /// Adds one page (exactly [`PAGE`] bytes); sends a batch when full.
    pub async fn push(&mut self, page: &[u8]) -> Result<(), TransferError> {
        if page.len() != PAGE {
            return Err(TransferError::Protocol {
                reason: format!("a page has {} bytes, not {PAGE}", page.len()),
            });
        }
        self.raw.extend_from_slice(page);
        if self.raw.len() == MAX_BATCH * PAGE {
            self.flush_batch().await?;
        }
        Ok(())
    }

    async fn flush_batch(&mut self) -> Result<(), TransferError> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let count = (self.raw.len() / PAGE) as u32;
        let mut compressed = None;
        if self.skip == 0 {
            let z = self
                .zc
                .compress(&self.raw)
                .map_err(|e| TransferError::Decode {
                    what: "a zstd page batch",
                    reason: e.to_string(),
                })?;
            if z.len() + self.raw.len() / 16 <= self.raw.len() {
                compressed = Some(z);
            } else {
                self.skip = SKIP_AFTER_INCOMPRESSIBLE;
            }
        } else {
            self.skip -= 1;
        }
        let (encoding, payload): (u8, &[u8]) = match &compressed {
            Some(z) => (1, z),
            None => (0, &self.raw),
        };
        let mut hdr = [0u8; 9];
        hdr[..4].copy_from_slice(&count.to_be_bytes());
        hdr[4] = encoding;
        hdr[5..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        self.w
            .write_all(&hdr)
            .await
            .map_err(write_err("writing a page batch header"))?;
        self.w
            .write_all(payload)
            .await
            .map_err(write_err("writing a page batch"))?;
        self.stats.pages += u64::from(count);
        self.stats.batches += 1;
        self.stats.compressed_batches += u64::from(encoding);
        self.stats.wire_bytes += (hdr.len() + payload.len()) as u64;
        self.raw.clear();
        Ok(())
    }

    /// Sends the last batch and the end marker; flushes.
    pub async fn finish(mut self) -> Result<PageStats, TransferError> {
        self.flush_batch().await?;
        self.w
            .write_all(&0u32.to_be_bytes())
            .await
            .map_err(write_err("ending a page stream"))?;
        self.w
            .flush()
            .await
            .map_err(write_err("flushing a page stream"))?;
        self.stats.wire_bytes += 4;
        Ok(self.stats)
    }
}

/// Sends `pages` (each [`PAGE`] bytes) as one stream; see the module doc for the format.
pub async fn send_pages<W, P>(w: &mut W, pages: P) -> Result<PageStats, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
    P: IntoIterator,
    P::Item: AsRef<[u8]>,
{
    let mut pw = PageWriter::new(w)?;
    for p in pages {
        pw.push(p.as_ref()).await?;
    }
    pw.finish().await
}

/// Receives a page stream into `store`; every page is hashed here. Returns the hashes in
/// stream order and the counters.
pub async fn recv_pages<R>(
    r: &mut R,
    store: &mut PageStore,
) -> Result<(Vec<PageHash>, PageStats), TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut zd = zstd::bulk::Decompressor::new().map_err(|e| TransferError::Decode {
        what: "a zstd decompressor",
        reason: e.to_string(),
    })?;
    let mut stats = PageStats::default();
    let mut hashes = vec![];
    let mut payload = Vec::new();
    let raw_cap = MAX_BATCH * PAGE;
    let z_cap = zstd::zstd_safe::compress_bound(raw_cap);
    loop {
        let mut c = [0u8; 4];
        r.read_exact(&mut c)
            .await
            .map_err(read_err("a page batch header"))?;
        stats.wire_bytes += 4;
        let count = u32::from_be_bytes(c) as usize;
        if count == 0 {
            return Ok((hashes, stats));
        }
        if count > MAX_BATCH {
            return Err(TransferError::TooLarge {
                len: count as u64,
                cap: MAX_BATCH as u64,
            });
        }
        let mut rest = [0u8; 5];
        r.read_exact(&mut rest)
            .await
            .map_err(read_err("a page batch header"))?;
        stats.wire_bytes += 5;
        let encoding = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let raw_len = count * PAGE;
        match encoding {
            0 if len != raw_len => {
                return Err(TransferError::Protocol {
                    reason: format!("a raw batch of {count} pages announces {len} bytes"),
                })
            }
            0 => {}
            1 if len > z_cap => {
                return Err(TransferError::TooLarge {
                    len: len as u64,
                    cap: z_cap as u64,
                })
            }
            1 => {}
            e => {
                return Err(TransferError::Protocol {
                    reason: format!("unknown page batch encoding {e}"),
                })
            }
        }
        payload.resize(len, 0);
        r.read_exact(&mut payload)
            .await
            .map_err(read_err("a page batch"))?;
        stats.wire_bytes += len as u64;
        let decompressed;
        let raw: &[u8] = if encoding == 1 {
            decompressed = zd
                .decompress(&payload, raw_len)
                .map_err(|e| TransferError::Decode {
                    what: "a zstd page batch",
                    reason: e.to_string(),
                })?;
            if decompressed.len() != raw_len {
                return Err(TransferError::Protocol {
                    reason: format!(
                        "a batch of {count} pages decompressed to {} bytes",
                        decompressed.len()
                    ),
                });
            }
            &decompressed
        } else {
            &payload
        };
        for page in raw.chunks_exact(PAGE) {
            hashes.push(store.insert(page)?);
        }
        stats.pages += count as u64;
        stats.batches += 1;
        stats.compressed_batches += u64::from(encoding);
    }
}

#[cfg(test)]
mod hasher_tests {
    use super::*;

    #[test]
    fn page_sets_find_what_they_hold_and_spread_keys() {
        let key = |i: u32| *blake3::hash(&i.to_le_bytes()).as_bytes();
        let mut set = PageSet::default();
        for i in 0..10_000u32 {
            set.insert(key(i));
        }
        assert_eq!(set.len(), 10_000);
        assert!((0..10_000).all(|i| set.contains(&key(i))));
        assert!(!set.contains(&key(10_000)));
        let b = PageHashBuilder::default();
        let (x, y) = (hash_page(&[1u8; PAGE]), hash_page(&[2u8; PAGE]));
        assert_ne!(b.hash_one(x), b.hash_one(y));
        assert_eq!(b.hash_one(x), b.hash_one(x));
        // Two processes (builders) place the same key differently.
        assert_ne!(
            PageHashBuilder::default().hash_one(x),
            PageHashBuilder::default().hash_one(x)
        );
    }
}
