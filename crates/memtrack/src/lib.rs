//! memtrack: which pages of a running process were written since the last look.
//!
//! Ferry copies a container's memory in rounds while it keeps running (pre-copy) and only
//! stops it for the last, small round. CRIU's own pre-dump needs the kernel's soft-dirty bits,
//! which Ferry's kernels do not have (CONFIG_MEM_SOFT_DIRTY is off), so memtrack finds the
//! written pages itself, with one of three [`Method`]s:
//!
//! * [`Method::UffdWp`] (preferred, Linux >= 6.7): a userfaultfd is created *inside* the target
//!   by injecting the `userfaultfd` system call under ptrace (no code is modified: an existing
//!   `syscall` instruction of the `[vdso]` is executed with single-step), taken over with
//!   `pidfd_getfd` and closed in the target again. Its private anonymous memory is registered
//!   with asynchronous write protection; `PAGEMAP_SCAN` on /proc/PID/pagemap reports written
//!   pages and protects them again atomically. File-backed private writable mappings are
//!   tracked by page hashes. The target never blocks and, after [`Tracker::stop`], holds no
//!   trace of the tracking (no userfaultfd, no registered ranges), so CRIU can dump it.
//! * [`Method::SoftDirty`]: `clear_refs` / pagemap bit 55, with the process frozen while the
//!   bits are read and cleared. Unavailable on kernels without CONFIG_MEM_SOFT_DIRTY.
//! * [`Method::PageHash`]: portable fallback: XXH3-128 of every page of every private writable
//!   mapping, read with process_vm_readv, compared with the previous round.
//!
//! ```no_run
//! # fn main() -> Result<(), memtrack::Error> {
//! let method = memtrack::detect()?;
//! let mut tracker = memtrack::start(1234, method)?;
//! // ... copy all memory once ...
//! let dirty = tracker.collect()?; // pages written since start()
//! for r in dirty.ranges.iter().chain(&dirty.new_ranges) {
//!     println!("copy again {:#x}-{:#x}", r.start, r.end);
//! }
//! tracker.stop()?;
//! # Ok(()) }
//! ```
//!
//! Scope and limits:
//! * Only private writable mappings are tracked; shared mappings (MAP_SHARED, SysV shm,
//!   shared memfd) are not reported and must be copied by other means.
//! * Each process is tracked separately (a userfaultfd belongs to one mm); a child forked
//!   after start() is not tracked (its inherited registration is dropped by the kernel).
//! * memtrack waits for ptrace stops of its targets with waitpid(tid, __WALL): a
//!   `waitpid(-1, ...)` reaper elsewhere in the same process could steal those stops.
//! * Injection runs on x86-64 only; memtrack needs root (CAP_SYS_PTRACE, and CAP_SYS_ADMIN for
//!   targets under a seccomp filter, whose filter is suspended with PTRACE_O_SUSPEND_SECCOMP
//!   during the injection).
//! * UffdWp write-protects unpopulated pages too (UFFD_FEATURE_WP_UNPOPULATED), which
//!   allocates page tables for the whole registered range: about 2 MiB per GiB of private
//!   writable anonymous address space, also for sparse reservations.
//! * Tracking the same process twice with UffdWp at the same time is possible but the second
//!   tracker falls back to page hashes (userfaultfd refuses the already registered ranges).
//! * If memtrack's process is killed (SIGKILL) while it holds a target thread with injected
//!   registers (about 150 us per start()), that thread resumes at the injected instruction with
//!   wrong registers. The same holds for CRIU's parasite.

// `unsafe` lives in `sys` only, which allows it for itself.
#![deny(unsafe_code)]

mod error;
mod hash;
#[cfg(target_arch = "x86_64")]
mod inject;
mod maps;
mod probe;
mod ptrace;
mod ranges;
mod softdirty;
#[allow(unsafe_code)]
mod sys;
#[cfg(target_arch = "x86_64")]
mod uffd;

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};

pub use error::Error;

/// Sorts `v` and merges overlapping or adjacent regions.
pub fn normalize_regions(v: Vec<Region>) -> Vec<Region> {
    ranges::normalize(v)
}

/// The parts of `r` outside `set` (which must be [normalized](normalize_regions)).
pub fn subtract_regions(r: Region, set: &[Region]) -> Vec<Region> {
    ranges::subtract_one(r, set)
}
pub use probe::{detect, support, Availability, Support};

/// Keeps setting a ptrace hardware breakpoint quick for as long as the returned descriptor is
/// open.
///
/// CRIU stops each task at the end of its parasite with a hardware breakpoint set through
/// ptrace, which allocates a per-task perf event. The kernel switches its per-task perf hooks
/// on when the first such event appears and off about a second after the last one is freed,
/// and switching them on waits for an RCU grace period (`synchronize_rcu` in
/// `account_event`): 8-18 ms measured here, frozen time of the dump (and of the restore) of
/// any container that was not checkpointed in the last second. One disabled software dummy
/// event on the caller keeps the hooks on, which costs a check per context switch.
pub fn keep_ptrace_breakpoints_quick() -> std::io::Result<OwnedFd> {
    sys::perf_dummy_on_self()
}

/// Serving missing pages through a userfaultfd that another program registered (a lazy
/// restore): messages, and the copy, zero-page and wake operations.
pub mod userfault {
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

    /// A message of a userfaultfd opened with the fork, remap, remove and unmap events.
    #[derive(Debug)]
    pub enum Event {
        /// A thread waits for the page at `address` (rounded down to the page).
        PageFault { address: u64 },
        /// The process forked; the child's userfaultfd, installed in this process.
        Fork { uffd: OwnedFd },
        /// `mremap` moved `[from, from + len)` to `to`.
        Remap { from: u64, to: u64, len: u64 },
        /// `madvise(MADV_DONTNEED/REMOVE)` dropped `[start, end)`.
        Remove { start: u64, end: u64 },
        /// `munmap` (or a mapping over it) removed `[start, end)`.
        Unmap { start: u64, end: u64 },
    }

    /// What one read found.
    #[derive(Debug)]
    pub enum Read {
        Event(Event),
        /// Nothing pending.
        Empty,
        /// The registered process has gone.
        Closed,
    }

    const EVENT_PAGEFAULT: u8 = 0x12;
    const EVENT_FORK: u8 = 0x13;
    const EVENT_REMAP: u8 = 0x14;
    const EVENT_REMOVE: u8 = 0x15;
    const EVENT_UNMAP: u8 = 0x16;

    fn u64_at(b: &[u8; 32], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    /// Reads one message from a non-blocking userfaultfd.
    pub fn read(fd: BorrowedFd<'_>) -> io::Result<Read> {
        let b = match crate::sys::read_uffd_msg(fd)? {
            crate::sys::UffdRead::Msg(b) => b,
            crate::sys::UffdRead::Empty => return Ok(Read::Empty),
            crate::sys::UffdRead::Closed => return Ok(Read::Closed),
        };
        // struct uffd_msg: event (u8) and reserved bytes, then the union at offset 8.
        let ev = match b[0] {
            EVENT_PAGEFAULT => Event::PageFault {
                address: u64_at(&b, 16) & !(crate::PAGE_SIZE - 1),
            },
            EVENT_FORK => {
                let fd = u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes"));
                Event::Fork {
                    uffd: crate::sys::adopt_fd(fd as RawFd)?,
                }
            }
            EVENT_REMAP => Event::Remap {
                from: u64_at(&b, 8),
                to: u64_at(&b, 16),
                len: u64_at(&b, 24),
            },
            EVENT_REMOVE => Event::Remove {
                start: u64_at(&b, 8),
                end: u64_at(&b, 16),
            },
            EVENT_UNMAP => Event::Unmap {
                start: u64_at(&b, 8),
                end: u64_at(&b, 16),
            },
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown userfaultfd event {other:#x}"),
                ))
            }
        };
        Ok(Read::Event(ev))
    }

    /// Copies `src` to `dst` in the registered process; returns the bytes copied (see
    /// `UFFDIO_COPY`: fewer than `src.len()` when it stopped at a present page).
    pub fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> io::Result<u64> {
        crate::sys::uffdio_copy(fd, dst, src)
    }

    /// Maps the zero page at `[start, start + len)`.
    pub fn zeropage(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
        crate::sys::uffdio_zeropage(fd, start, len)
    }

    /// Receives one descriptor (with its one byte) from a Unix stream socket; `None` at its
    /// end.
    pub fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
        crate::sys::recv_fd(sock)
    }

    /// Wakes the threads waiting on `[start, start + len)`.
    pub fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
        crate::sys::uffdio_wake(fd, start, len)
    }
}

/// The length in bytes of `pid`'s longest private anonymous mapping (any protection): the
/// longest range a lazy restore registers with userfaultfd for it. 0 without one.
pub fn longest_private_anon_mapping(pid: i32) -> Result<u64, Error> {
    Ok(maps::read(pid)?
        .iter()
        .filter(|m| m.is_private_anon_any_prot())
        .map(|m| m.end - m.start)
        .max()
        .unwrap_or(0))
}

/// Size of the pages memtrack reports (x86-64 base pages).
pub const PAGE_SIZE: u64 = sys::PAGE_SIZE;

/// A way to find written pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Asynchronous userfaultfd write protection + PAGEMAP_SCAN (Linux >= 6.7).
    UffdWp,
    /// Kernel soft-dirty bits (needs CONFIG_MEM_SOFT_DIRTY).
    SoftDirty,
    /// Hashes of every page, compared between rounds (works everywhere, costs a full read:
    /// about 0.2 s per GiB here).
    ///
    /// A page is reported when its content differs from what the previous round read. A
    /// change that is undone before the next round (A -> B -> A) is not reported, so a caller
    /// that copied the page while it held B must copy it again in the final, stopped round
    /// (or compare with hashes of what it copied). The userfaultfd method has no such gap.
    PageHash,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::UffdWp => "uffd-wp",
            Method::SoftDirty => "soft-dirty",
            Method::PageHash => "page-hash",
        })
    }
}

/// A page-aligned address range `[start, end)` of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Region {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE
    }

    /// True when `addr` is inside.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start, self.end)
    }
}

/// What one [`Tracker::collect`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// The process.
    pub pid: i32,
    /// Pages written since the previous collect() (or since start()), sorted, merged, not
    /// overlapping `new_ranges`.
    pub ranges: Vec<Region>,
    /// Private writable mappings (or parts) that appeared since the previous round: all their
    /// pages count as dirty.
    pub new_ranges: Vec<Region>,
}

impl Dirty {
    /// Pages in `ranges`.
    pub fn dirty_pages(&self) -> u64 {
        self.ranges.iter().map(Region::pages).sum()
    }

    /// Pages in `new_ranges`.
    pub fn new_pages(&self) -> u64 {
        self.new_ranges.iter().map(Region::pages).sum()
    }

    /// Bytes to copy again (both lists).
    pub fn bytes(&self) -> u64 {
        (self.dirty_pages() + self.new_pages()) * PAGE_SIZE
    }
}

/// A running dirty-page tracker for one process.
pub trait Tracker: Send {
    /// The method in use.
    fn method(&self) -> Method;

    /// The tracked process.
    fn pid(&self) -> i32;

    /// Pages written since the previous call (the first call: since [`start`]), and mappings
    /// that appeared meanwhile. Returns [`Error::ProcessGone`] once the process has exited.
    fn collect(&mut self) -> Result<Dirty, Error>;

    /// Ends tracking and removes every trace of it from the process (for UffdWp: unregisters
    /// all ranges and closes the userfaultfd). Succeeds when the process has exited meanwhile.
    /// Dropping a tracker without calling stop() also releases everything, without reporting
    /// errors.
    fn stop(self: Box<Self>) -> Result<(), Error>;
}

/// Starts tracking process `pid` with `method`. The first [`Tracker::collect`] returns only
/// what was written after start() returned.
///
/// Errors: [`Error::Unsupported`] when the method does not work on this kernel (with the
/// reason), [`Error::ProcessGone`] when the process does not exist, [`Error::Ptrace`] and
/// [`Error::Injection`] when the process cannot be traced (permissions, another tracer).
pub fn start(pid: i32, method: Method) -> Result<Box<dyn Tracker>, Error> {
    let span = tracing::info_span!("memtrack_start", pid, method = %method);
    let _enter = span.enter();
    if pid <= 0 {
        return Err(Error::ProcessGone {
            pid,
            what: "starting (invalid pid)".into(),
        });
    }
    if pid == sys::getpid() {
        return Err(Error::Unsupported {
            method,
            reason: "memtrack cannot track its own process (ptrace cannot attach to itself)".into(),
        });
    }
    Ok(match method {
        #[cfg(target_arch = "x86_64")]
        Method::UffdWp => Box::new(uffd::UffdTracker::start(pid)?),
        #[cfg(not(target_arch = "x86_64"))]
        Method::UffdWp => {
            return Err(Error::Unsupported {
                method,
                reason: "system-call injection is implemented for x86-64 only".into(),
            })
        }
        Method::SoftDirty => Box::new(softdirty::SoftDirtyTracker::start(pid)?),
        Method::PageHash => Box::new(hash::HashTracker::start(pid)?),
    })
}

/// pidfd_open with the error mapped.
pub(crate) fn open_pidfd(pid: i32) -> Result<OwnedFd, Error> {
    sys::pidfd_open(pid).map_err(|source| {
        if source.raw_os_error() == Some(libc::ESRCH) {
            Error::ProcessGone {
                pid,
                what: "opening a pidfd".into(),
            }
        } else {
            Error::Proc {
                pid,
                op: "pidfd_open",
                path: format!("/proc/{pid}").into(),
                source,
            }
        }
    })
}

/// Fails with ProcessGone when the process behind `pidfd` has exited (this also guards against
/// the pid being reused by another process while we use /proc/PID paths).
pub(crate) fn check_alive(pid: i32, pidfd: BorrowedFd<'_>, what: &str) -> Result<(), Error> {
    match sys::pidfd_has_exited(pidfd) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::ProcessGone {
            pid,
            what: what.to_string(),
        }),
        Err(source) => Err(Error::Proc {
            pid,
            op: "poll pidfd of",
            path: format!("/proc/{pid}").into(),
            source,
        }),
    }
}

/// True while `pid` exists and is not a zombie.
pub(crate) fn process_alive(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// Gives the free memory of this process's heap back to the kernel (glibc's `malloc_trim`),
/// after a large number of small buffers (e.g. pages copied from a tracked process) were
/// freed: other processes can use it at once. Returns whether anything was released.
pub fn release_free_heap() -> bool {
    sys::malloc_trim()
}

/// The private writable mappings of process `pid` (anonymous and file-backed): the memory a
/// first pre-copy round copies in full, and the only memory trackers report.
pub fn writable_regions(pid: i32) -> Result<Vec<Region>, Error> {
    Ok(maps::read(pid)?
        .iter()
        .filter(|m| m.kind() != maps::Kind::Ignored)
        .map(maps::Mapping::region)
        .collect())
}

/// Reads `buf.len()` bytes of process `pid`'s memory at `addr` (page-aligned, a multiple of
/// [`PAGE_SIZE`]). Returns the bytes read: short when a page cannot be read (unmapped or
/// without read permission meanwhile); the caller skips what was not read.
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize, Error> {
    if !addr.is_multiple_of(PAGE_SIZE) || !(buf.len() as u64).is_multiple_of(PAGE_SIZE) {
        return Err(Error::ReadMemory {
            pid,
            addr,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "address and length must be page-aligned (length {})",
                    buf.len()
                ),
            ),
        });
    }
    let mut done = 0;
    while done < buf.len() {
        let at = addr + done as u64;
        match sys::process_vm_readv(pid, &mut buf[done..], at) {
            Ok(0) => break,
            Ok(n) => done += n,
            // EFAULT on the first byte: the page is gone or unreadable.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => break,
            Err(e) if error::is_gone(&e) => {
                return Err(Error::ProcessGone {
                    pid,
                    what: "reading its memory".into(),
                })
            }
            Err(source) => {
                return Err(Error::ReadMemory {
                    pid,
                    addr: at,
                    source,
                })
            }
        }
    }
    Ok(done - done % PAGE_SIZE as usize)
}
