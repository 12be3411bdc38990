//! Page hashing: the portable method, and the fallback for file-backed private mappings inside
//! the userfaultfd tracker.
//!
//! Pages are read with process_vm_readv in 1 MiB pieces and hashed with XXH3-128 (about
//! 27 GB/s on 4 KiB inputs here, so reading dominates).
//!
//! Caveat (inherent to hashing a running process): a page is reported when its content differs
//! from the content read in the previous round. If the caller copies a page some time after
//! `collect()` and the page changes in between and then changes *back* before the next
//! `collect()`, the change is not seen. Pre-copy must therefore copy the final set of pages
//! while the process is stopped, or compare against hashes of what it actually copied.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use tracing::{debug, info};
use xxhash_rust::xxh3::xxh3_128;

use crate::error::Error;
use crate::maps::{self, Kind};
use crate::sys::{self, PAGE_SIZE};
use crate::{Dirty, Method, Region, Tracker};

/// Digest of a page that could not be read (beyond the end of a file, ...).
const UNREADABLE: u128 = 0;
const CHUNK: usize = 1 << 20;

#[derive(Debug)]
struct Hashed {
    end: u64,
    digests: Vec<u128>,
}

/// Pages found in a hashing round.
#[derive(Debug, Default)]
pub(crate) struct HashRound {
    /// Pages whose content changed.
    pub(crate) changed: Vec<Region>,
    /// Pages not hashed before (new mappings).
    pub(crate) new: Vec<Region>,
    /// Bytes read.
    pub(crate) bytes: u64,
}

/// Per-page digests of a set of regions of one process.
pub(crate) struct PageHashes {
    pid: i32,
    ranges: BTreeMap<u64, Hashed>,
    buf: Vec<u8>,
}

/// Appends the page at `addr` to `v`, extending the last region when adjacent.
pub(crate) fn push_pages(v: &mut Vec<Region>, start: u64, end: u64) {
    match v.last_mut() {
        Some(last) if last.end == start => last.end = end,
        _ => v.push(Region { start, end }),
    }
}

impl PageHashes {
    pub(crate) fn new(pid: i32) -> Self {
        Self {
            pid,
            ranges: BTreeMap::new(),
            buf: Vec::new(),
        }
    }

    /// Number of regions currently hashed.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Hashes `regions` (sorted, disjoint, page aligned), compares with the previous round and
    /// keeps the new digests; regions no longer listed are forgotten.
    pub(crate) fn update(&mut self, regions: &[Region]) -> Result<HashRound, Error> {
        let mut round = HashRound::default();
        let mut next = BTreeMap::new();
        for &r in regions {
            if r.end <= r.start {
                continue;
            }
            let digests = self.hash_region(r)?;
            round.bytes += r.end - r.start;
            let old = self.old_digests(r);
            for (i, (d, o)) in digests.iter().zip(&old).enumerate() {
                let a = r.start + i as u64 * PAGE_SIZE;
                match o {
                    None => push_pages(&mut round.new, a, a + PAGE_SIZE),
                    Some(o) if o != d => push_pages(&mut round.changed, a, a + PAGE_SIZE),
                    Some(_) => {}
                }
            }
            next.insert(
                r.start,
                Hashed {
                    end: r.end,
                    digests,
                },
            );
        }
        self.ranges = next;
        Ok(round)
    }

    /// Previous digests of the pages of `r` (None: not hashed before).
    fn old_digests(&self, r: Region) -> Vec<Option<u128>> {
        let n = ((r.end - r.start) / PAGE_SIZE) as usize;
        let mut out = vec![None; n];
        for (&start, h) in self.ranges.range(..r.end).rev() {
            if h.end <= r.start {
                break;
            }
            let lo = start.max(r.start);
            let hi = h.end.min(r.end);
            for a in (lo..hi).step_by(PAGE_SIZE as usize) {
                out[((a - r.start) / PAGE_SIZE) as usize] =
                    Some(h.digests[((a - start) / PAGE_SIZE) as usize]);
            }
        }
        out
    }

    fn hash_region(&mut self, r: Region) -> Result<Vec<u128>, Error> {
        let pid = self.pid;
        if self.buf.len() < CHUNK {
            self.buf = vec![0u8; CHUNK];
        }
        let mut out = Vec::with_capacity(((r.end - r.start) / PAGE_SIZE) as usize);
        let mut addr = r.start;
        while addr < r.end {
            let want = ((r.end - addr) as usize).min(CHUNK);
            let buf = &mut self.buf[..want];
            let got = match sys::process_vm_readv(pid, buf, addr) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    return Err(Error::ProcessGone {
                        pid,
                        what: format!("reading memory at {addr:#x}"),
                    })
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EFAULT) | Some(libc::EIO) | Some(libc::ENOMEM)
                    ) =>
                {
                    0
                }
                Err(source) => return Err(Error::ReadMemory { pid, addr, source }),
            };
            let full = got / PAGE_SIZE as usize;
            for page in buf[..full * PAGE_SIZE as usize].chunks_exact(PAGE_SIZE as usize) {
                let d = xxh3_128(page);
                out.push(if d == UNREADABLE { 1 } else { d });
            }
            addr += full as u64 * PAGE_SIZE;
            if full * (PAGE_SIZE as usize) < want {
                // The page at `addr` cannot be read: remember it as unreadable and go on.
                out.push(UNREADABLE);
                addr += PAGE_SIZE;
            }
        }
        Ok(out)
    }
}

/// The PageHash tracker: every private writable mapping is hashed each round.
pub(crate) struct HashTracker {
    pid: i32,
    pidfd: OwnedFd,
    hashes: PageHashes,
}

/// Private writable mappings of `pid` (anonymous and file-backed).
fn writable_regions(pid: i32) -> Result<Vec<Region>, Error> {
    Ok(maps::read(pid)?
        .iter()
        .filter(|m| m.kind() != Kind::Ignored)
        .map(|m| m.region())
        .collect())
}

impl HashTracker {
    pub(crate) fn start(pid: i32) -> Result<Self, Error> {
        let pidfd = crate::open_pidfd(pid)?;
        let mut hashes = PageHashes::new(pid);
        let t0 = std::time::Instant::now();
        let regions = writable_regions(pid)?;
        let round = hashes.update(&regions)?;
        crate::check_alive(pid, pidfd.as_fd(), "hashing the initial memory")?;
        info!(
            pid,
            regions = regions.len(),
            bytes = round.bytes,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "page-hash tracking started"
        );
        Ok(Self { pid, pidfd, hashes })
    }
}

impl Tracker for HashTracker {
    fn method(&self) -> Method {
        Method::PageHash
    }

    fn pid(&self) -> i32 {
        self.pid
    }

    fn collect(&mut self) -> Result<Dirty, Error> {
        let pid = self.pid;
        crate::check_alive(pid, self.pidfd.as_fd(), "collecting dirty pages")?;
        let t0 = std::time::Instant::now();
        let regions = writable_regions(pid)?;
        let round = self.hashes.update(&regions)?;
        crate::check_alive(pid, self.pidfd.as_fd(), "collecting dirty pages")?;
        let dirty = Dirty {
            pid,
            ranges: round.changed,
            new_ranges: round.new,
        };
        debug!(
            pid,
            regions = self.hashes.len(),
            bytes_read = round.bytes,
            dirty_pages = dirty.dirty_pages(),
            new_pages = dirty.new_pages(),
            us = t0.elapsed().as_micros() as u64,
            "page-hash round"
        );
        Ok(dirty)
    }

    fn stop(self: Box<Self>) -> Result<(), Error> {
        info!(pid = self.pid, "page-hash tracking stopped");
        Ok(())
    }
}
