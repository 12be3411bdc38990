//! Thin wrappers around the system calls and ioctls memtrack needs.
//!
//! This is the only module of the crate that contains `unsafe` code. Every wrapper has a safe
//! signature: pointers handed to the kernel are derived from Rust references or slices that
//! outlive the call, and file descriptors returned by the kernel are wrapped in [`OwnedFd`] at
//! once. Constants and structures that the Debian 12 headers lack (PAGEMAP_SCAN is Linux 6.7,
//! UFFD_FEATURE_WP_ASYNC 6.7, UFFD_FEATURE_WP_UNPOPULATED 6.4) are defined here from the kernel
//! UAPI (include/uapi/linux/fs.h and userfaultfd.h).
//!
//! Calls go through `nix` where it has them (ptrace seize/interrupt/singlestep/getregs/
//! setregs/getsiginfo/setsiginfo, process_vm_readv, poll, read, recvmsg). These stay raw
//! `libc` calls because nix 0.31 does not have them, or not for every argument we pass:
//! - userfaultfd(2), perf_event_open(2), pidfd_open(2), pidfd_getfd(2), tgkill(2): no
//!   wrapper in nix;
//! - the UFFDIO_* and PAGEMAP_SCAN ioctls: nix has no wrappers, only macros that generate the
//!   same unsafe call;
//! - waitpid(2): nix decodes the status into its `Signal`, which has no real-time signals, and
//!   fails with EINVAL for a stop or death by one after the status has been reaped;
//! - PTRACE_DETACH: nix's `detach` takes a `Signal` too, and the signal we deliver on detach
//!   may be a real-time one;
//! - malloc_trim(3): glibc, not a system call.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::unistd::Pid;

/// Size of a page. memtrack supports x86-64 only, where base pages are always 4 KiB.
pub(crate) const PAGE_SIZE: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// ioctl numbers and ABI structures
// ---------------------------------------------------------------------------------------------

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}

/// `UFFD_API` from linux/userfaultfd.h.
pub(crate) const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: flag of userfaultfd(2) that lets processes without CAP_SYS_PTRACE
/// create a userfaultfd when vm.unprivileged_userfaultfd is 0 (only user-mode faults are
/// reported, which does not matter for asynchronous write protection).
pub(crate) const UFFD_USER_MODE_ONLY: i32 = 1;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): write-protecting an unpopulated page installs a
/// marker, so the first write to a never-touched page is seen too.
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7): write faults on protected pages are resolved by the
/// kernel without a message to the userfaultfd reader; PAGEMAP_SCAN reports them.
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP`.
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO: u64 = 0xAA;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    size_of::<UffdioWriteprotect>(),
);

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x04,
    size_of::<UffdioZeropage>(),
);

/// `struct pm_scan_arg` (linux/fs.h, Linux 6.7).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PmScanArg {
    pub(crate) size: u64,
    pub(crate) flags: u64,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) walk_end: u64,
    pub(crate) vec: u64,
    pub(crate) vec_len: u64,
    pub(crate) max_pages: u64,
    pub(crate) category_inverted: u64,
    pub(crate) category_mask: u64,
    pub(crate) category_anyof_mask: u64,
    pub(crate) return_mask: u64,
}

/// `struct page_region` (linux/fs.h, Linux 6.7).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRegion {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) categories: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u64,
    16,
    size_of::<PmScanArg>(),
);
/// Write-protect the pages that match (re-arms tracking atomically with the report).
pub(crate) const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM when the range contains a VMA without asynchronous write protection.
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Category: the page has asynchronous write protection enabled.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Category: the page was written since it was write protected.
pub(crate) const PAGE_IS_WRITTEN: u64 = 1 << 1;

// Compile-time checks of the ABI (sizes and the ioctl numbers the kernel headers give).
const _: () = assert!(size_of::<PmScanArg>() == 96);
const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);

/// Calls `f` again while it fails with EINTR.
fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => {}
            other => return other.map_err(io::Error::from),
        }
    }
}

/// The descriptor a system call returned, now owned by us (or the call's error).
fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = Errno::result(ret)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn ioctl_ptr<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<libc::c_int> {
    retry_eintr(|| {
        // SAFETY: `arg` is a live, exclusively borrowed value of the `#[repr(C)]` structure
        // that `request` encodes (type and size are checked at compile time above), so the
        // kernel reads and writes only memory we own for the duration of the call.
        Errno::result(unsafe {
            libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, ptr::from_mut(arg))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------------------------

/// Returns the free memory of this process's malloc heap to the kernel (glibc `malloc_trim`).
/// Returns whether memory was released.
pub(crate) fn malloc_trim() -> bool {
    // SAFETY: malloc_trim(0) only walks the allocator's own free lists and madvises free
    // pages away; it touches no memory the program owns and is thread-safe in glibc.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// userfaultfd(2) in the calling process (used only by the capability probe).
pub(crate) fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes one integer argument and returns a new file descriptor.
    owned_fd(unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) })
}

/// UFFDIO_API: negotiates the API and enables `features`; returns the features the kernel
/// reports.
pub(crate) fn uffdio_api(fd: BorrowedFd<'_>, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_API, &mut api)?;
    Ok(api.features)
}

/// UFFDIO_REGISTER of `[start, start + len)` with `mode`.
pub(crate) fn uffdio_register(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    mode: u64,
) -> io::Result<()> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_REGISTER, &mut reg).map(drop)
}

/// UFFDIO_COPY of `src` to `dst` in the registered process (waking the threads waiting on
/// it). Returns the bytes copied: all of `src`, or fewer when it stopped early (the kernel's
/// `EAGAIN` with a partial count); otherwise the error (`EEXIST`: the first page is present,
/// `ENOENT`: the range is not registered any more, `EAGAIN`: the mappings are changing,
/// `ESRCH`: the process has gone).
pub(crate) fn uffdio_copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> io::Result<u64> {
    // The kernel reads `src.len()` bytes at `src`, a slice borrowed for the whole call.
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    match ioctl_ptr(fd, UFFDIO_COPY, &mut c) {
        Ok(_) => Ok(c.len),
        Err(_) if c.copy > 0 => Ok(c.copy as u64),
        Err(e) => Err(e),
    }
}

/// UFFDIO_ZEROPAGE of `[start, start + len)`: maps the zero page there (waking the waiters).
pub(crate) fn uffdio_zeropage(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    ioctl_ptr(fd, UFFDIO_ZEROPAGE, &mut z).map(drop)
}

/// UFFDIO_WAKE of `[start, start + len)`.
pub(crate) fn uffdio_wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    ioctl_ptr(fd, UFFDIO_WAKE, &mut range).map(drop)
}

/// UFFDIO_UNREGISTER of `[start, start + len)`.
pub(crate) fn uffdio_unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    ioctl_ptr(fd, UFFDIO_UNREGISTER, &mut range).map(drop)
}

/// UFFDIO_WRITEPROTECT of `[start, start + len)` with `mode`.
pub(crate) fn uffdio_writeprotect(
    fd: BorrowedFd<'_>,
    start: u64,
    len: u64,
    mode: u64,
) -> io::Result<()> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode,
    };
    ioctl_ptr(fd, UFFDIO_WRITEPROTECT, &mut wp).map(drop)
}

/// PAGEMAP_SCAN on a `/proc/PID/pagemap` descriptor. `arg.vec`, `arg.vec_len` and `arg.size`
/// are filled in from `out`; returns the number of entries the kernel wrote to `out`.
pub(crate) fn pagemap_scan(
    fd: BorrowedFd<'_>,
    arg: &mut PmScanArg,
    out: &mut [PageRegion],
) -> io::Result<usize> {
    arg.size = size_of::<PmScanArg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    // `out` stays mutably borrowed until the end of this function, so the pointer the kernel
    // writes through is valid for `out.len()` entries during the ioctl.
    let n = ioctl_ptr(fd, PAGEMAP_SCAN, arg)?;
    Ok((n as usize).min(out.len()))
}

// ---------------------------------------------------------------------------------------------
// perf events
// ---------------------------------------------------------------------------------------------

/// The first 64 bytes of `struct perf_event_attr` (`PERF_ATTR_SIZE_VER0`, which every kernel
/// accepts), from include/uapi/linux/perf_event.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PerfEventAttrV0 {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// Bit 0 `disabled`, bit 5 `exclude_kernel`, bit 6 `exclude_hv`.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// perf_event_open(2) of a disabled software dummy event on the calling thread.
pub(crate) fn perf_dummy_on_self() -> io::Result<OwnedFd> {
    let attr = PerfEventAttrV0 {
        kind: PERF_TYPE_SOFTWARE,
        size: size_of::<PerfEventAttrV0>() as u32,
        config: PERF_COUNT_SW_DUMMY,
        flags: 1 | (1 << 5) | (1 << 6),
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, initialized perf_event_attr of the size it declares and
    // outlives the call, which only reads it; pid 0 / cpu -1 / group -1 are plain integers.
    owned_fd(unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttrV0,
            0 as libc::c_long,
            -1 as libc::c_long,
            -1 as libc::c_long,
            PERF_FLAG_FD_CLOEXEC,
        )
    })
}

// ---------------------------------------------------------------------------------------------
// pidfd
// ---------------------------------------------------------------------------------------------

/// pidfd_open(2).
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word (0) and returns a new descriptor.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) })
}

/// pidfd_getfd(2): duplicate descriptor `target_fd` of the process behind `pidfd` into ours.
pub(crate) fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptors numbers and a flags word (0) by value and
    // returns a new descriptor in our table.
    owned_fd(unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd() as libc::c_long,
            target_fd as libc::c_long,
            0 as libc::c_long,
        )
    })
}

/// True when the process behind `pidfd` has exited (the pidfd polls readable).
pub(crate) fn pidfd_has_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut p = [PollFd::new(pidfd, PollFlags::POLLIN)];
    retry_eintr(|| poll(&mut p, PollTimeout::ZERO))?;
    // `None`: flags nix does not know, which a pidfd does not report.
    Ok(p[0]
        .revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP)))
}

/// tgkill(2) with signal number `sig` (which may be a real-time signal).
pub(crate) fn tgkill(tgid: i32, tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill takes three integers by value.
    Errno::result(unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            tgid as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
        )
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ptrace
// ---------------------------------------------------------------------------------------------

/// Registers of an x86-64 thread as PTRACE_GETREGS returns them.
#[cfg(target_arch = "x86_64")]
pub(crate) type Regs = libc::user_regs_struct;

/// A signal's information as PTRACE_GETSIGINFO returns it.
pub(crate) type SigInfo = libc::siginfo_t;

/// PTRACE_SEIZE with `options` (a `PTRACE_O_*` mask; nix's `Options` lacks
/// PTRACE_O_SUSPEND_SECCOMP, so unknown bits are passed on as they are).
pub(crate) fn ptrace_seize(tid: i32, options: i32) -> io::Result<()> {
    let options = ptrace::Options::from_bits_retain(options);
    ptrace::seize(Pid::from_raw(tid), options).map_err(io::Error::from)
}

/// PTRACE_INTERRUPT.
pub(crate) fn ptrace_interrupt(tid: i32) -> io::Result<()> {
    ptrace::interrupt(Pid::from_raw(tid)).map_err(io::Error::from)
}

/// PTRACE_SINGLESTEP, delivering no signal.
pub(crate) fn ptrace_singlestep(tid: i32) -> io::Result<()> {
    ptrace::step(Pid::from_raw(tid), None).map_err(io::Error::from)
}

/// PTRACE_DETACH, delivering signal number `sig` (0: none).
pub(crate) fn ptrace_detach(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_DETACH takes no pointers: `addr` is ignored and `data` is the signal
    // number (raw, since it may be a real-time signal, which nix's `Signal` cannot name).
    Errno::result(unsafe {
        libc::ptrace(
            libc::PTRACE_DETACH,
            tid,
            ptr::null_mut::<libc::c_void>(),
            sig as libc::c_long as *mut libc::c_void,
        )
    })?;
    Ok(())
}

/// PTRACE_GETREGS.
#[cfg(target_arch = "x86_64")]
pub(crate) fn ptrace_getregs(tid: i32) -> io::Result<Regs> {
    ptrace::getregs(Pid::from_raw(tid)).map_err(io::Error::from)
}

/// PTRACE_SETREGS.
#[cfg(target_arch = "x86_64")]
pub(crate) fn ptrace_setregs(tid: i32, regs: &Regs) -> io::Result<()> {
    ptrace::setregs(Pid::from_raw(tid), *regs).map_err(io::Error::from)
}

/// PTRACE_GETSIGINFO.
pub(crate) fn ptrace_getsiginfo(tid: i32) -> io::Result<SigInfo> {
    ptrace::getsiginfo(Pid::from_raw(tid)).map_err(io::Error::from)
}

/// PTRACE_SETSIGINFO.
pub(crate) fn ptrace_setsiginfo(tid: i32, info: &SigInfo) -> io::Result<()> {
    ptrace::setsiginfo(Pid::from_raw(tid), info).map_err(io::Error::from)
}

/// What `waitpid` reported for a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitStatus {
    /// Nothing to report yet (only with `nohang`).
    StillRunning,
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Signaled(i32),
    /// The thread is in a ptrace-stop: stop signal and the ptrace event (`status >> 16`).
    Stopped { sig: i32, event: i32 },
}

/// waitpid(tid, __WALL [| WNOHANG]), retrying on EINTR. Raw, not nix's `waitpid`: that one
/// fails with EINVAL, the status already reaped, for a stop or death by a real-time signal.
pub(crate) fn waitpid(tid: i32, nohang: bool) -> io::Result<WaitStatus> {
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    let mut status: libc::c_int = 0;
    let ret = retry_eintr(|| {
        // SAFETY: `status` is a live local the kernel writes one int into.
        Errno::result(unsafe { libc::waitpid(tid, &mut status, flags) })
    })?;
    Ok(if ret == 0 {
        WaitStatus::StillRunning
    } else if libc::WIFEXITED(status) {
        WaitStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WaitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        WaitStatus::Stopped {
            sig: libc::WSTOPSIG(status),
            event: (status >> 16) & 0xff,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// memory access
// ---------------------------------------------------------------------------------------------

/// process_vm_readv(2) of `local.len()` bytes at `remote` in process `pid` (one local and one
/// remote iovec). Returns the number of bytes read, which is short when a remote page cannot
/// be read.
pub(crate) fn process_vm_readv(pid: i32, local: &mut [u8], remote: u64) -> io::Result<usize> {
    use nix::sys::uio::RemoteIoVec;
    let remote = [RemoteIoVec {
        base: remote as usize,
        len: local.len(),
    }];
    let mut local = [io::IoSliceMut::new(local)];
    retry_eintr(|| nix::sys::uio::process_vm_readv(Pid::from_raw(pid), &mut local, &remote))
}

/// Our own process id.
pub(crate) fn getpid() -> i32 {
    std::process::id() as i32
}

/// Reads one `struct uffd_msg` (32 bytes) from a non-blocking userfaultfd.
pub(crate) fn read_uffd_msg(fd: BorrowedFd<'_>) -> io::Result<UffdRead> {
    let mut buf = [0u8; 32];
    match retry_eintr(|| nix::unistd::read(fd, &mut buf)) {
        Ok(0) => Ok(UffdRead::Closed),
        Ok(n) if n == buf.len() => Ok(UffdRead::Msg(buf)),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a userfaultfd message of {n} bytes"),
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(UffdRead::Empty),
        Err(e) => Err(e),
    }
}

/// What [`read_uffd_msg`] found.
pub(crate) enum UffdRead {
    Msg([u8; 32]),
    Empty,
    Closed,
}

/// Takes ownership of a descriptor number the kernel installed in this process (a
/// userfaultfd of a forked process, from a `UFFD_EVENT_FORK` message).
pub(crate) fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("descriptor {fd}"),
        ));
    }
    // SAFETY: the kernel installed this descriptor in our table for us to own (fork events
    // hand the monitor a new userfaultfd); nothing else knows its number.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Receives one byte and the one descriptor it carries (`SCM_RIGHTS`) from a Unix stream
/// socket; `Ok(None)` at end of file.
pub(crate) fn recv_fd(sock: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    loop {
        let mut iov = [io::IoSliceMut::new(&mut byte)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut got = vec![];
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    got.push(adopt_fd(fd)?);
                }
            }
        }
        if msg.bytes == 0 && got.is_empty() {
            return Ok(None);
        }
        return match got.len() {
            1 => Ok(got.pop()),
            n => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{n} descriptors where one was expected"),
            )),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_match_kernel_uapi() {
        assert_eq!(PM_SCAN_WP_MATCHING, 1);
        assert_eq!(PM_SCAN_CHECK_WPASYNC, 2);
        assert_eq!(PAGE_IS_WPALLOWED, 1);
        assert_eq!(PAGE_IS_WRITTEN, 2);
        assert_eq!(UFFD_FEATURE_WP_ASYNC, 32768);
        assert_eq!(UFFD_FEATURE_WP_UNPOPULATED, 8192);
    }
}
