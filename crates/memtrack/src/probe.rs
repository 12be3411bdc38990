//! Which methods work on this kernel, found by trying them on memory of our own process.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::OnceLock;

use memmap2::MmapMut;
use tracing::{debug, info};

use crate::error::Error;
use crate::softdirty::{clear_soft_dirty, read_pagemap, PM_SOFT_DIRTY};
use crate::sys::{self, PageRegion, PmScanArg, PAGE_SIZE};
use crate::{Method, Region};

/// Whether one method works here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// The method works on this kernel.
    Available,
    /// The method does not work; the reason says why.
    Unavailable {
        /// Why not.
        reason: String,
    },
}

impl Availability {
    /// True when available.
    pub fn is_available(&self) -> bool {
        matches!(self, Availability::Available)
    }
}

/// The result of probing every method, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    /// Every method with its availability, in order of preference.
    pub methods: Vec<(Method, Availability)>,
}

impl Support {
    /// The most preferred available method.
    pub fn best(&self) -> Option<Method> {
        self.methods
            .iter()
            .find(|(_, a)| a.is_available())
            .map(|(m, _)| *m)
    }

    /// Availability of `method`.
    pub fn get(&self, method: Method) -> &Availability {
        &self
            .methods
            .iter()
            .find(|(m, _)| *m == method)
            .expect("every method is probed")
            .1
    }

    /// Why `method` is unavailable (None when it is available).
    pub fn reason(&self, method: Method) -> Option<&str> {
        match self.get(method) {
            Availability::Available => None,
            Availability::Unavailable { reason } => Some(reason),
        }
    }
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (m, a)) in self.methods.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match a {
                Availability::Available => write!(f, "{m}: available")?,
                Availability::Unavailable { reason } => write!(f, "{m}: unavailable ({reason})")?,
            }
        }
        Ok(())
    }
}

static SUPPORT: OnceLock<Support> = OnceLock::new();

/// Probes (once per process) which methods work on this kernel.
///
/// The probes run on a few pages of memtrack's own process: a userfaultfd with
/// `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`, registration, write protection and
/// PAGEMAP_SCAN must report exactly the page written; the soft-dirty bit must be set after a
/// write that follows `clear_refs=4`; process_vm_readv must read our own memory. Permission to
/// trace a given target is only checked by [`crate::start`].
pub fn support() -> Support {
    SUPPORT
        .get_or_init(|| {
            let s = Support {
                methods: vec![
                    (Method::UffdWp, availability(probe_uffd_wp())),
                    (Method::SoftDirty, availability(probe_soft_dirty())),
                    (Method::PageHash, availability(probe_page_hash())),
                ],
            };
            info!(support = %s, "dirty-page tracking methods probed");
            s
        })
        .clone()
}

/// The best method this kernel supports: UffdWp, else SoftDirty, else PageHash.
///
/// The reasons why better methods are unavailable are logged; [`support`] returns them.
pub fn detect() -> Result<Method, Error> {
    let s = support();
    match s.best() {
        Some(m) => {
            for (other, a) in &s.methods {
                if let Availability::Unavailable { reason } = a {
                    debug!(method = %other, reason = %reason, "method unavailable");
                }
            }
            info!(method = %m, "dirty-page tracking method selected");
            Ok(m)
        }
        None => Err(Error::NoMethod { report: s }),
    }
}

/// Ok when `method` is available, else [`Error::Unsupported`] with the probe's reason.
pub(crate) fn require(method: Method) -> Result<(), Error> {
    match support().get(method) {
        Availability::Available => Ok(()),
        Availability::Unavailable { reason } => Err(Error::Unsupported {
            method,
            reason: reason.clone(),
        }),
    }
}

fn availability(r: Result<(), String>) -> Availability {
    match r {
        Ok(()) => Availability::Available,
        Err(reason) => Availability::Unavailable { reason },
    }
}

fn probe_uffd_wp() -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("system-call injection is implemented for x86-64 only".into());
    }
    // pidfd_open / pidfd_getfd (Linux 5.3 / 5.6).
    let me = sys::pidfd_open(sys::getpid())
        .map_err(|e| format!("pidfd_open failed: {e} (needs Linux >= 5.3)"))?;
    sys::pidfd_getfd(me.as_fd(), me.as_raw_fd())
        .map_err(|e| format!("pidfd_getfd failed: {e} (needs Linux >= 5.6)"))?;
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let uffd = match sys::userfaultfd(base) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            sys::userfaultfd(base | sys::UFFD_USER_MODE_ONLY)
        }
        other => other,
    }
    .map_err(|e| format!("userfaultfd() failed: {e} (kernel without CONFIG_USERFAULTFD?)"))?;
    sys::uffdio_api(
        uffd.as_fd(),
        sys::UFFD_FEATURE_WP_ASYNC | sys::UFFD_FEATURE_WP_UNPOPULATED,
    )
    .map_err(|e| {
        format!(
            "UFFDIO_API refuses UFFD_FEATURE_WP_ASYNC|UFFD_FEATURE_WP_UNPOPULATED: {e} \
             (needs Linux >= 6.7 with CONFIG_PTE_MARKER_UFFD_WP)"
        )
    })?;
    let len = 8 * PAGE_SIZE;
    let mut map = anon_map(len)?;
    let start = map.as_ptr() as u64;
    sys::uffdio_register(uffd.as_fd(), start, len, sys::UFFDIO_REGISTER_MODE_WP)
        .map_err(|e| format!("UFFDIO_REGISTER (mode WP) of anonymous memory failed: {e}"))?;
    sys::uffdio_writeprotect(uffd.as_fd(), start, len, sys::UFFDIO_WRITEPROTECT_MODE_WP)
        .map_err(|e| format!("UFFDIO_WRITEPROTECT failed: {e}"))?;
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let scan = |expect: &[u64]| -> Result<(), String> {
        let mut out = vec![PageRegion::default(); 16];
        let mut arg = PmScanArg {
            flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
            start,
            end: start + len,
            category_mask: sys::PAGE_IS_WRITTEN,
            return_mask: sys::PAGE_IS_WRITTEN,
            ..PmScanArg::default()
        };
        let n = sys::pagemap_scan(pagemap.as_fd(), &mut arg, &mut out).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) {
                format!("PAGEMAP_SCAN ioctl unavailable: {e} (needs Linux >= 6.7)")
            } else {
                format!("PAGEMAP_SCAN failed: {e}")
            }
        })?;
        let got: Vec<u64> = out[..n]
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE as usize))
            .map(|a| (a - start) / PAGE_SIZE)
            .collect();
        if got != expect {
            return Err(format!(
                "PAGEMAP_SCAN reported written pages {got:?}, expected {expect:?}"
            ));
        }
        Ok(())
    };
    scan(&[])?;
    map[2 * PAGE_SIZE as usize] = 1;
    map[5 * PAGE_SIZE as usize + 7] = 1;
    scan(&[2, 5])?;
    // WP_MATCHING must have protected them again.
    map[5 * PAGE_SIZE as usize] = 2;
    scan(&[5])?;
    sys::uffdio_unregister(uffd.as_fd(), start, len)
        .map_err(|e| format!("UFFDIO_UNREGISTER failed: {e}"))?;
    drop(uffd);
    debug!(start = format_args!("{start:#x}"), "uffd-wp probe passed");
    Ok(())
}

fn probe_soft_dirty() -> Result<(), String> {
    let mut map = anon_map(PAGE_SIZE)?;
    map[0] = 1;
    let me = sys::getpid();
    clear_soft_dirty(me, "self").map_err(|e| {
        format!("soft-dirty tracking unavailable: writing 4 to /proc/self/clear_refs failed ({e})")
    })?;
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("open /proc/self/pagemap: {e}"))?;
    let start = map.as_ptr() as u64;
    let region = Region {
        start,
        end: start + PAGE_SIZE,
    };
    let read = |pm: &File| -> Result<u64, String> {
        let mut v = Vec::new();
        read_pagemap(pm, region, &mut v)
            .map_err(|e: io::Error| format!("read /proc/self/pagemap: {e}"))?;
        Ok(v[0])
    };
    let before = read(&pagemap)?;
    map[0] = 2;
    let after = read(&pagemap)?;
    if after & PM_SOFT_DIRTY == 0 {
        return Err(
            "the soft-dirty bit (bit 55 of /proc/PID/pagemap) stays 0 after a write that follows \
             clear_refs=4: this kernel is built without CONFIG_MEM_SOFT_DIRTY"
                .into(),
        );
    }
    if before & PM_SOFT_DIRTY != 0 {
        return Err(
            "clear_refs=4 does not clear the soft-dirty bit (bit 55 of /proc/PID/pagemap)".into(),
        );
    }
    Ok(())
}

fn probe_page_hash() -> Result<(), String> {
    let mut map = anon_map(PAGE_SIZE)?;
    map[100] = 42;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let n = sys::process_vm_readv(sys::getpid(), &mut buf, map.as_ptr() as u64)
        .map_err(|e| format!("process_vm_readv failed: {e}"))?;
    if n != buf.len() || buf[100] != 42 {
        return Err(format!("process_vm_readv read {n} bytes, or wrong content"));
    }
    Ok(())
}

/// A private anonymous mapping of `len` bytes (read/write, not populated) in our own process,
/// whose page-table state the probes control. The probes write it with plain stores: its
/// address came from mmap and goes to the kernel, so the compiler cannot drop a store before
/// the calls that look at the page.
fn anon_map(len: u64) -> Result<MmapMut, String> {
    MmapMut::map_anon(len as usize).map_err(|e| format!("mmap for the probe failed: {e}"))
}
