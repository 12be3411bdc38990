//! The UffdWp tracker: asynchronous userfaultfd write protection plus PAGEMAP_SCAN.
//!
//! A userfaultfd is created inside the target (see [`crate::inject`]) and taken over; with
//! `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED` every private anonymous mapping is
//! registered in write-protect mode and write protected. A write by the target then clears the
//! protection of that page inside the kernel (no message, the target never blocks), and
//! PAGEMAP_SCAN with `PM_SCAN_WP_MATCHING` reports the written pages and protects them again in
//! one step, so no write can fall between "report" and "re-arm".
//!
//! File-backed private writable mappings are tracked by page hashes (see [`crate::hash`]), as
//! are anonymous ranges that userfaultfd refuses (for example ranges registered by another
//! userfaultfd of the application).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tracing::{debug, info, warn};

use crate::error::{is_gone, Error};
use crate::hash::{push_pages, PageHashes};
use crate::maps::{self, Kind};
use crate::ranges::{intersect_one, normalize, subtract_one};
use crate::sys::{self, PageRegion, PmScanArg};
use crate::{Dirty, Method, Region, Tracker};

/// Entries of the PAGEMAP_SCAN output vector (24 bytes each).
const SCAN_VEC: usize = 4096;

/// Outcome of scanning one registered range.
enum Scan {
    Done,
    /// The range has no asynchronous write protection (it was unmapped and mapped again).
    NotProtected,
}

/// Outcome of registering one range.
enum Register {
    Done,
    /// The range is no longer mapped.
    Vanished,
    /// userfaultfd refuses the range; it is hashed instead.
    Refused(io::Error),
}

pub(crate) struct UffdTracker {
    pid: i32,
    pidfd: OwnedFd,
    uffd: OwnedFd,
    pagemap: File,
    /// Addresses registered and write protected (normalized).
    registered: Vec<Region>,
    /// Anonymous addresses userfaultfd refused, hashed instead (normalized).
    refused: Vec<Region>,
    hashes: PageHashes,
    buf: Vec<PageRegion>,
}

impl UffdTracker {
    pub(crate) fn start(pid: i32) -> Result<Self, Error> {
        crate::probe::require(Method::UffdWp)?;
        let t0 = std::time::Instant::now();
        let pidfd = crate::open_pidfd(pid)?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap =
            File::open(&path).map_err(|e| crate::error::proc_error(pid, "open", path.into(), e))?;
        let uffd = crate::inject::steal_userfaultfd(pid, pidfd.as_fd())?;
        let features = sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED;
        match sys::uffdio_api(uffd.as_fd(), features) {
            Ok(f) => debug!(pid, features = format_args!("{f:#x}"), "UFFDIO_API"),
            Err(e) => {
                return Err(Error::Unsupported {
                    method: Method::UffdWp,
                    reason: format!(
                        "UFFDIO_API with UFFD_FEATURE_WP_ASYNC|UFFD_FEATURE_WP_UNPOPULATED failed: \
                         {e} (needs Linux >= 6.7 with CONFIG_PTE_MARKER_UFFD_WP)"
                    ),
                })
            }
        }
        let mut me = Self {
            pid,
            pidfd,
            uffd,
            pagemap,
            registered: Vec::new(),
            refused: Vec::new(),
            hashes: PageHashes::new(pid),
            buf: vec![PageRegion::default(); SCAN_VEC],
        };
        let first = me.round()?;
        info!(
            pid,
            registered_ranges = me.registered.len(),
            registered_bytes = me.registered.iter().map(Region::len).sum::<u64>(),
            hashed_ranges = me.hashes.len(),
            pages = first.new_pages(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "userfaultfd write-protect tracking started"
        );
        Ok(me)
    }

    fn uffd_error(&self, op: &'static str, r: Region, source: io::Error) -> Error {
        if is_gone(&source) || !crate::process_alive(self.pid) {
            Error::ProcessGone {
                pid: self.pid,
                what: format!("{op} on {:#x}-{:#x}", r.start, r.end),
            }
        } else {
            Error::Uffd {
                pid: self.pid,
                op,
                start: r.start,
                end: r.end,
                source,
                hint: "stop this tracker (the process stays intact) and track it with \
                       Method::PageHash",
            }
        }
    }

    /// Registers `r` in write-protect mode and write protects it.
    fn register(&self, r: Region) -> Result<Register, Error> {
        let fd = self.uffd.as_fd();
        match sys::uffdio_register(fd, r.start, r.len(), sys::UFFDIO_REGISTER_MODE_WP) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => return Ok(Register::Vanished),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EBUSY) | Some(libc::EPERM)
                ) =>
            {
                return Ok(Register::Refused(e))
            }
            Err(e) => return Err(self.uffd_error("UFFDIO_REGISTER", r, e)),
        }
        let mut tries = 0;
        loop {
            match sys::uffdio_writeprotect(fd, r.start, r.len(), sys::UFFDIO_WRITEPROTECT_MODE_WP) {
                Ok(()) => return Ok(Register::Done),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 100 => tries += 1,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOMEM)) => {
                    return Ok(Register::Vanished)
                }
                Err(e) => return Err(self.uffd_error("UFFDIO_WRITEPROTECT", r, e)),
            }
        }
    }

    /// PAGEMAP_SCAN of `r`: appends the written pages to `out` and protects them again.
    fn scan(&mut self, r: Region, out: &mut Vec<Region>) -> Result<Scan, Error> {
        let mut start = r.start;
        while start < r.end {
            let mut arg = PmScanArg {
                flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
                start,
                end: r.end,
                category_mask: sys::PAGE_IS_WRITTEN,
                return_mask: sys::PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            let n = match sys::pagemap_scan(self.pagemap.as_fd(), &mut arg, &mut self.buf) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(Scan::NotProtected),
                Err(e) if is_gone(&e) || !crate::process_alive(self.pid) => {
                    return Err(Error::ProcessGone {
                        pid: self.pid,
                        what: format!("PAGEMAP_SCAN of {:#x}-{:#x}", r.start, r.end),
                    })
                }
                Err(source) => {
                    return Err(Error::PagemapScan {
                        pid: self.pid,
                        start: r.start,
                        end: r.end,
                        source,
                    })
                }
            };
            for pr in &self.buf[..n] {
                if pr.end > pr.start {
                    push_pages(out, pr.start, pr.end);
                }
            }
            // walk_end == end: the whole range was walked; otherwise the vector was full.
            if arg.walk_end == 0 || arg.walk_end >= r.end {
                break;
            }
            if arg.walk_end <= start {
                return Err(Error::PagemapScan {
                    pid: self.pid,
                    start: r.start,
                    end: r.end,
                    source: io::Error::other(format!(
                        "no progress: walk_end {:#x} <= start {start:#x}",
                        arg.walk_end
                    )),
                });
            }
            start = arg.walk_end;
        }
        Ok(Scan::Done)
    }

    /// One round: picks up new and vanished mappings, scans the registered ones, hashes the
    /// file-backed ones.
    fn round(&mut self) -> Result<Dirty, Error> {
        let pid = self.pid;
        crate::check_alive(pid, self.pidfd.as_fd(), "collecting dirty pages")?;
        let t0 = std::time::Instant::now();
        let maps = maps::read(pid)?;
        let maps_us = t0.elapsed().as_micros() as u64;
        let mut anon = Vec::new();
        let mut hashed = Vec::new();
        // Refused ranges stay refused (and hashed) while they are mapped.
        let mut refused = Vec::new();
        for m in &maps {
            match m.kind() {
                Kind::PrivateAnon => {
                    let r = m.region();
                    let still = intersect_one(r, &self.refused);
                    hashed.extend_from_slice(&still);
                    refused.extend(still);
                    anon.extend(subtract_one(r, &self.refused));
                }
                Kind::PrivateFile => hashed.push(m.region()),
                Kind::Ignored => {}
            }
        }

        let mut dirty = Vec::new();
        let mut new = Vec::new();
        let mut now_registered = Vec::with_capacity(self.registered.len() + 4);
        for vma in anon {
            let mut to_register = subtract_one(vma, &self.registered);
            for part in intersect_one(vma, &self.registered) {
                match self.scan(part, &mut dirty)? {
                    Scan::Done => now_registered.push(part),
                    Scan::NotProtected => {
                        debug!(
                            pid,
                            start = format_args!("{:#x}", part.start),
                            end = format_args!("{:#x}", part.end),
                            "range lost its write protection (mapped anew): registering again"
                        );
                        to_register.push(part);
                    }
                }
            }
            for part in to_register {
                match self.register(part)? {
                    Register::Done => {
                        now_registered.push(part);
                        new.push(part);
                    }
                    Register::Vanished => {
                        debug!(
                            pid,
                            start = format_args!("{:#x}", part.start),
                            "range vanished before registration"
                        );
                    }
                    Register::Refused(e) => {
                        warn!(
                            pid,
                            start = format_args!("{:#x}", part.start),
                            end = format_args!("{:#x}", part.end),
                            error = %e,
                            "userfaultfd refuses this anonymous range; tracking it by page hashes"
                        );
                        refused.push(part);
                        hashed.push(part);
                    }
                }
            }
        }
        self.registered = normalize(now_registered);
        self.refused = normalize(refused);

        let scan_us = t0.elapsed().as_micros() as u64 - maps_us;
        let hashed = normalize(hashed);
        let h = self.hashes.update(&hashed)?;
        debug!(
            pid,
            maps_us,
            scan_us,
            hash_us = t0.elapsed().as_micros() as u64 - maps_us - scan_us,
            hashed_bytes = h.bytes,
            "uffd-wp round timing"
        );
        crate::check_alive(pid, self.pidfd.as_fd(), "collecting dirty pages")?;
        dirty.extend(h.changed);
        new.extend(h.new);
        Ok(Dirty {
            pid,
            ranges: normalize(dirty),
            new_ranges: normalize(new),
        })
    }
}

impl Tracker for UffdTracker {
    fn method(&self) -> Method {
        Method::UffdWp
    }

    fn pid(&self) -> i32 {
        self.pid
    }

    fn collect(&mut self) -> Result<Dirty, Error> {
        let t0 = std::time::Instant::now();
        let dirty = self.round()?;
        debug!(
            pid = self.pid,
            registered_ranges = self.registered.len(),
            hashed_ranges = self.hashes.len(),
            dirty_pages = dirty.dirty_pages(),
            new_pages = dirty.new_pages(),
            us = t0.elapsed().as_micros() as u64,
            "uffd-wp round"
        );
        Ok(dirty)
    }

    fn stop(self: Box<Self>) -> Result<(), Error> {
        let pid = self.pid;
        let mut errors = Vec::new();
        match maps::read(pid) {
            Ok(maps) => {
                for m in maps.iter().filter(|m| m.is_private_anon_any_prot()) {
                    for part in intersect_one(m.region(), &self.registered) {
                        match sys::uffdio_unregister(self.uffd.as_fd(), part.start, part.len()) {
                            Ok(()) => {}
                            Err(e)
                                if matches!(
                                    e.raw_os_error(),
                                    Some(libc::ENOMEM)
                                        | Some(libc::EINVAL)
                                        | Some(libc::ESRCH)
                                        | Some(libc::ENOENT)
                                ) =>
                            {
                                debug!(pid, start = format_args!("{:#x}", part.start), error = %e, "unregister: range gone");
                            }
                            Err(e) => errors.push(self.uffd_error("UFFDIO_UNREGISTER", part, e)),
                        }
                    }
                }
            }
            Err(e) if e.is_process_gone() => debug!(pid, "process gone before stop"),
            Err(e) => errors.push(e),
        }
        // Closing the last reference to the userfaultfd also unregisters whatever is left
        // (ranges that were made read-only meanwhile, for example).
        let Self { uffd, .. } = *self;
        drop(uffd);
        for e in &errors {
            warn!(pid, error = %e, "error while stopping userfaultfd tracking");
        }
        info!(pid, errors = errors.len(), "userfaultfd tracking stopped");
        let count = errors.len();
        match errors.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(Error::Stop {
                pid,
                count,
                first: Box::new(first),
            }),
        }
    }
}
