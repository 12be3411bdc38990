//! The SoftDirty tracker: `4` to /proc/PID/clear_refs, bit 55 of /proc/PID/pagemap.
//!
//! Reading the bits and clearing them are two steps, so the process is frozen (all threads
//! held in ptrace-stops) in between; otherwise a write between the read and the clear would be
//! lost. Kernels built without CONFIG_MEM_SOFT_DIRTY (like Ferry's 6.18 machines) accept the
//! clear_refs write but never set the bit; [`crate::probe`] detects that and start() returns
//! [`Error::Unsupported`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use tracing::{debug, info};

use crate::error::{proc_error, Error};
use crate::hash::push_pages;
use crate::maps::{self, Kind};
use crate::ptrace::{self, Freeze};
use crate::ranges::{intersect_one, subtract_one};
use crate::sys::PAGE_SIZE;
use crate::{Dirty, Method, Region, Tracker};

/// Bit 55 of a pagemap entry: the page was written since the last clear_refs=4.
pub(crate) const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Writes "4" to /proc/PID/clear_refs (clears the soft-dirty bits of the whole process).
pub(crate) fn clear_soft_dirty(pid: i32, what: &str) -> Result<(), Error> {
    let path = PathBuf::from(format!("/proc/{what}/clear_refs"));
    let mut f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| proc_error(pid, "open", path.clone(), e))?;
    f.write_all(b"4")
        .map_err(|e| proc_error(pid, "write 4 to", path, e))
}

/// Reads the pagemap entries of `[r.start, r.end)` into `out` (one u64 per page).
pub(crate) fn read_pagemap(pagemap: &File, r: Region, out: &mut Vec<u64>) -> io::Result<()> {
    const BATCH: u64 = 64 * 1024;
    out.clear();
    let mut page = r.start / PAGE_SIZE;
    let end = r.end / PAGE_SIZE;
    let mut buf = vec![0u8; (BATCH * 8) as usize];
    while page < end {
        let n = (end - page).min(BATCH);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, page * 8)?;
        out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))),
        );
        page += n;
    }
    Ok(())
}

pub(crate) struct SoftDirtyTracker {
    pid: i32,
    pidfd: OwnedFd,
    pagemap: File,
    /// Private writable regions seen in the previous round.
    known: Vec<Region>,
}

fn writable_regions(pid: i32) -> Result<Vec<Region>, Error> {
    Ok(crate::ranges::normalize(
        maps::read(pid)?
            .iter()
            .filter(|m| m.kind() != Kind::Ignored)
            .map(|m| m.region())
            .collect(),
    ))
}

impl SoftDirtyTracker {
    pub(crate) fn start(pid: i32) -> Result<Self, Error> {
        crate::probe::require(Method::SoftDirty)?;
        let pidfd = crate::open_pidfd(pid)?;
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|e| proc_error(pid, "open", path.into(), e))?;
        let known = writable_regions(pid)?;
        clear_soft_dirty(pid, &pid.to_string())?;
        info!(pid, regions = known.len(), "soft-dirty tracking started");
        Ok(Self {
            pid,
            pidfd,
            pagemap,
            known,
        })
    }

    fn frozen_round(&self) -> Result<(Dirty, Vec<Region>), Error> {
        let pid = self.pid;
        let freeze = Freeze::new(pid)?;
        let regions = writable_regions(pid)?;
        let mut ranges = Vec::new();
        let mut new_ranges = Vec::new();
        let mut entries = Vec::new();
        for &r in &regions {
            new_ranges.extend(subtract_one(r, &self.known));
            for part in intersect_one(r, &self.known) {
                read_pagemap(&self.pagemap, part, &mut entries).map_err(|e| {
                    proc_error(pid, "read", format!("/proc/{pid}/pagemap").into(), e)
                })?;
                for (i, e) in entries.iter().enumerate() {
                    if e & PM_SOFT_DIRTY != 0 {
                        let a = part.start + i as u64 * PAGE_SIZE;
                        push_pages(&mut ranges, a, a + PAGE_SIZE);
                    }
                }
            }
        }
        clear_soft_dirty(pid, &pid.to_string())?;
        freeze.thaw()?;
        Ok((
            Dirty {
                pid,
                ranges: crate::ranges::normalize(ranges),
                new_ranges: crate::ranges::normalize(new_ranges),
            },
            regions,
        ))
    }
}

impl Tracker for SoftDirtyTracker {
    fn method(&self) -> Method {
        Method::SoftDirty
    }

    fn pid(&self) -> i32 {
        self.pid
    }

    fn collect(&mut self) -> Result<Dirty, Error> {
        crate::check_alive(self.pid, self.pidfd.as_fd(), "collecting dirty pages")?;
        let t0 = std::time::Instant::now();
        let (dirty, regions) = ptrace::on_tracer_thread(|| self.frozen_round())?;
        self.known = regions;
        debug!(
            pid = self.pid,
            dirty_pages = dirty.dirty_pages(),
            new_pages = dirty.new_pages(),
            us = t0.elapsed().as_micros() as u64,
            "soft-dirty round"
        );
        Ok(dirty)
    }

    fn stop(self: Box<Self>) -> Result<(), Error> {
        info!(pid = self.pid, "soft-dirty tracking stopped");
        Ok(())
    }
}
