//! Thin wrappers around the system calls and ioctls memtrack needs.
//!
//! This is the only module of the crate that contains `unsafe` code. Every wrapper has a safe
//! signature: pointers handed to the kernel are derived from Rust references or slices that
//! outlive the call, and file descriptors returned by the kernel are wrapped in [`OwnedFd`] at
//! once. Constants and structures that the Debian 12 headers lack (PAGEMAP_SCAN is Linux 6.7,
//! UFFD_FEATURE_WP_ASYNC 6.7, UFFD_FEATURE_WP_UNPOPULATED 6.4) are defined here from the kernel
//! UAPI (include/uapi/linux/fs.h and userfaultfd.h).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

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

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_int(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ioctl_ptr<T>(fd: BorrowedFd<'_>, request: u64, arg: &mut T) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: `arg` is a live, exclusively borrowed value of the `#[repr(C)]` structure
        // that `request` encodes (type and size are checked at compile time above), so the
        // kernel reads and writes only memory we own for the duration of the call.
        let ret =
            unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, ptr::from_mut(arg)) };
        match cvt_int(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// userfaultfd
// ---------------------------------------------------------------------------------------------

/// userfaultfd(2) in the calling process (used only by the capability probe).
/// Returns the free memory of this process's malloc heap to the kernel (glibc `malloc_trim`).
/// Returns whether memory was released.
pub(crate) fn malloc_trim() -> bool {
    // SAFETY: malloc_trim(0) only walks the allocator's own free lists and madvises free
    // pages away; it touches no memory the program owns and is thread-safe in glibc.
    unsafe { libc::malloc_trim(0) == 1 }
}

pub(crate) fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes one integer argument and returns a new file descriptor.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttrV0,
            0 as libc::c_long,
            -1 as libc::c_long,
            -1 as libc::c_long,
            PERF_FLAG_FD_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

// ---------------------------------------------------------------------------------------------
// pidfd
// ---------------------------------------------------------------------------------------------

/// pidfd_open(2).
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word (0) and returns a new descriptor.
    let fd = cvt(unsafe {
        libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long)
    })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// pidfd_getfd(2): duplicate descriptor `target_fd` of the process behind `pidfd` into ours.
pub(crate) fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptors numbers and a flags word (0) by value and
    // returns a new descriptor in our table.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd() as libc::c_long,
            target_fd as libc::c_long,
            0 as libc::c_long,
        )
    })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// True when the process behind `pidfd` has exited (the pidfd polls readable).
pub(crate) fn pidfd_has_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one live pollfd; timeout 0 makes the call non-blocking.
        let ret = unsafe { libc::poll(&mut p, 1, 0) };
        match cvt_int(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(p.revents & (libc::POLLIN | libc::POLLHUP) != 0),
        }
    }
}

/// tgkill(2).
pub(crate) fn tgkill(tgid: i32, tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill takes three integers by value.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            tgid as libc::c_long,
            tid as libc::c_long,
            sig as libc::c_long,
        )
    })
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// ptrace
// ---------------------------------------------------------------------------------------------

/// Registers of an x86-64 thread as PTRACE_GETREGS returns them.
#[cfg(target_arch = "x86_64")]
pub(crate) type Regs = libc::user_regs_struct;

/// A signal's information as PTRACE_GETSIGINFO returns it.
pub(crate) type SigInfo = libc::siginfo_t;

fn ptrace_raw(
    request: libc::c_uint,
    tid: i32,
    addr: *mut libc::c_void,
    data: *mut libc::c_void,
) -> io::Result<libc::c_long> {
    // SAFETY: callers pass either null/integer `addr`/`data` for requests that take values, or
    // pointers to live, correctly sized structures for requests that read or write memory
    // (GETREGS/SETREGS: user_regs_struct, GETSIGINFO/SETSIGINFO: siginfo_t).
    cvt(unsafe { libc::ptrace(request, tid, addr, data) })
}

/// PTRACE_SEIZE with `options`.
pub(crate) fn ptrace_seize(tid: i32, options: i32) -> io::Result<()> {
    ptrace_raw(
        libc::PTRACE_SEIZE,
        tid,
        ptr::null_mut(),
        options as usize as *mut libc::c_void,
    )
    .map(drop)
}

/// PTRACE_INTERRUPT.
pub(crate) fn ptrace_interrupt(tid: i32) -> io::Result<()> {
    ptrace_raw(
        libc::PTRACE_INTERRUPT,
        tid,
        ptr::null_mut(),
        ptr::null_mut(),
    )
    .map(drop)
}

/// PTRACE_SINGLESTEP, delivering `sig` (0: none).
pub(crate) fn ptrace_singlestep(tid: i32, sig: i32) -> io::Result<()> {
    ptrace_raw(
        libc::PTRACE_SINGLESTEP,
        tid,
        ptr::null_mut(),
        sig as usize as *mut libc::c_void,
    )
    .map(drop)
}

/// PTRACE_DETACH, delivering `sig` (0: none).
pub(crate) fn ptrace_detach(tid: i32, sig: i32) -> io::Result<()> {
    ptrace_raw(
        libc::PTRACE_DETACH,
        tid,
        ptr::null_mut(),
        sig as usize as *mut libc::c_void,
    )
    .map(drop)
}

/// PTRACE_GETREGS.
#[cfg(target_arch = "x86_64")]
pub(crate) fn ptrace_getregs(tid: i32) -> io::Result<Regs> {
    let mut regs = MaybeUninit::<Regs>::zeroed();
    ptrace_raw(
        libc::PTRACE_GETREGS,
        tid,
        ptr::null_mut(),
        regs.as_mut_ptr().cast(),
    )?;
    // SAFETY: user_regs_struct consists of integers only, so the zeroed value is valid, and the
    // kernel filled it in completely on success.
    Ok(unsafe { regs.assume_init() })
}

/// PTRACE_SETREGS.
#[cfg(target_arch = "x86_64")]
pub(crate) fn ptrace_setregs(tid: i32, regs: &Regs) -> io::Result<()> {
    let mut copy = *regs;
    ptrace_raw(
        libc::PTRACE_SETREGS,
        tid,
        ptr::null_mut(),
        ptr::from_mut(&mut copy).cast(),
    )
    .map(drop)
}

/// PTRACE_GETSIGINFO.
pub(crate) fn ptrace_getsiginfo(tid: i32) -> io::Result<SigInfo> {
    let mut info = MaybeUninit::<SigInfo>::zeroed();
    ptrace_raw(
        libc::PTRACE_GETSIGINFO,
        tid,
        ptr::null_mut(),
        info.as_mut_ptr().cast(),
    )?;
    // SAFETY: siginfo_t is plain data (integers and a union of integers/pointers that we never
    // dereference); zeroed is valid and the kernel filled it in on success.
    Ok(unsafe { info.assume_init() })
}

/// PTRACE_SETSIGINFO.
pub(crate) fn ptrace_setsiginfo(tid: i32, info: &SigInfo) -> io::Result<()> {
    let mut copy = *info;
    ptrace_raw(
        libc::PTRACE_SETSIGINFO,
        tid,
        ptr::null_mut(),
        ptr::from_mut(&mut copy).cast(),
    )
    .map(drop)
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

/// waitpid(tid, __WALL [| WNOHANG]), retrying on EINTR.
pub(crate) fn waitpid(tid: i32, nohang: bool) -> io::Result<WaitStatus> {
    let flags = libc::__WALL | if nohang { libc::WNOHANG } else { 0 };
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a live local the kernel writes one int into.
        let ret = unsafe { libc::waitpid(tid, &mut status, flags) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ret == 0 {
            return Ok(WaitStatus::StillRunning);
        }
        return Ok(if libc::WIFEXITED(status) {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            WaitStatus::Stopped {
                sig: libc::WSTOPSIG(status),
                event: (status >> 16) & 0xff,
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// memory access
// ---------------------------------------------------------------------------------------------

/// process_vm_readv(2) of `local.len()` bytes at `remote` in process `pid` (one local and one
/// remote iovec). Returns the number of bytes read, which is short when a remote page cannot
/// be read.
pub(crate) fn process_vm_readv(pid: i32, local: &mut [u8], remote: u64) -> io::Result<usize> {
    let liov = libc::iovec {
        iov_base: local.as_mut_ptr().cast(),
        iov_len: local.len(),
    };
    let riov = libc::iovec {
        iov_base: remote as usize as *mut libc::c_void,
        iov_len: local.len(),
    };
    loop {
        // SAFETY: the local iovec describes `local`, which is exclusively borrowed for the
        // call; the remote iovec is only interpreted in the address space of `pid`.
        let ret = unsafe { libc::process_vm_readv(pid, &liov, 1, &riov, 1, 0) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(ret as usize);
    }
}

/// A private anonymous mapping in our own process (used by the capability probes, which need
/// memory whose page-table state they control).
pub(crate) struct AnonMap {
    addr: *mut u8,
    len: usize,
}

impl AnonMap {
    /// mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS) of `pages` pages.
    pub(crate) fn new(pages: usize) -> io::Result<Self> {
        let len = pages * PAGE_SIZE as usize;
        // SAFETY: anonymous mapping at an address the kernel chooses; no existing memory is
        // affected.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    /// Start address.
    pub(crate) fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Write `value` to byte `offset` with a volatile store (so the write really happens, which
    /// is what the probes observe).
    pub(crate) fn write(&mut self, offset: usize, value: u8) {
        assert!(offset < self.len, "offset {offset} outside mapping");
        // SAFETY: `offset` is inside the mapping, which is readable and writable and owned by
        // `self` until drop.
        unsafe { self.addr.add(offset).write_volatile(value) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no references into it escape.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

/// Our own process id.
pub(crate) fn getpid() -> i32 {
    std::process::id() as i32
}

/// Reads one `struct uffd_msg` (32 bytes) from a non-blocking userfaultfd.
pub(crate) fn read_uffd_msg(fd: BorrowedFd<'_>) -> io::Result<UffdRead> {
    let mut buf = [0u8; 32];
    loop {
        // SAFETY: `buf` is a live local array of 32 bytes, the length passed.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(UffdRead::Empty),
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(UffdRead::Closed);
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a userfaultfd message of {n} bytes"),
            ));
        }
        return Ok(UffdRead::Msg(buf));
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
            Err(nix::errno::Errno::EINTR) => continue,
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
