//! Errors of memtrack. Every message names the process, the address or file involved and what
//! the caller can do about it.

use std::io;
use std::path::PathBuf;

use crate::{Method, Support};

/// Errors returned by [`crate::start`], [`crate::Tracker::collect`] and
/// [`crate::Tracker::stop`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The method cannot work on this kernel or machine.
    #[error(
        "dirty-page tracking method {method} is not supported here: {reason}; \
         use memtrack::detect() to pick a method that works on this kernel"
    )]
    Unsupported {
        /// The method that was asked for.
        method: Method,
        /// Why it does not work.
        reason: String,
    },

    /// No method works at all (not even page hashing).
    #[error("no dirty-page tracking method works on this machine: {report}")]
    NoMethod {
        /// Why each method is unavailable.
        report: Support,
    },

    /// The process does not exist (any more), or exited while memtrack worked on it.
    #[error(
        "process {pid} does not exist or exited while {what}; the tracker for it is of no \
         further use: drop it and treat the process as gone"
    )]
    ProcessGone {
        /// The process.
        pid: i32,
        /// What memtrack was doing.
        what: String,
    },

    /// A ptrace request failed.
    #[error(
        "ptrace {step} on thread {tid} of process {pid} failed: {source}; memtrack needs \
         CAP_SYS_PTRACE over the process and no other tracer attached (debugger, strace, CRIU; \
         see TracerPid in /proc/{pid}/status)"
    )]
    Ptrace {
        /// The process.
        pid: i32,
        /// The thread that was traced.
        tid: i32,
        /// Which step (seize, interrupt, getregs, ...).
        step: &'static str,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },

    /// A thread did not reach a ptrace stop in time (it sleeps uninterruptibly, or its cgroup is
    /// frozen). memtrack gave up and released the thread untouched.
    #[error(
        "thread {tid} of process {pid} did not stop within {seconds} s after PTRACE_INTERRUPT \
         (state {state}); it was released unchanged. Thaw the process (cgroup freezer) or retry \
         when it is not in uninterruptible sleep"
    )]
    StopTimeout {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// How long memtrack waited.
        seconds: f64,
        /// The thread's state letter from /proc/PID/task/TID/stat.
        state: String,
    },

    /// No `syscall` instruction was found in the target's executable memory.
    #[error(
        "no `syscall` instruction (0f 05) found in the executable mappings of process {pid} \
         (searched [vdso], libc and the other executable mappings); cannot inject a system \
         call: use Method::PageHash for this process"
    )]
    NoSyscallInstruction {
        /// The process.
        pid: i32,
    },

    /// A system call injected into the target failed.
    #[error("system call {syscall} injected into process {pid} failed: {source}; {hint}")]
    Injection {
        /// The process.
        pid: i32,
        /// The injected system call.
        syscall: &'static str,
        /// The error the target got.
        #[source]
        source: io::Error,
        /// What to do.
        hint: &'static str,
    },

    /// A userfaultfd operation failed.
    #[error("{op} for process {pid} on {start:#x}-{end:#x} failed: {source}; {hint}")]
    Uffd {
        /// The process.
        pid: i32,
        /// The ioctl or step.
        op: &'static str,
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
        /// What to do.
        hint: &'static str,
    },

    /// PAGEMAP_SCAN failed.
    #[error(
        "PAGEMAP_SCAN on /proc/{pid}/pagemap for {start:#x}-{end:#x} failed: {source}; \
         stop this tracker and fall back to a full copy of the range"
    )]
    PagemapScan {
        /// The process.
        pid: i32,
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// Reading the target's memory failed.
    #[error(
        "reading memory of process {pid} at {addr:#x} failed: {source}; memtrack needs \
         CAP_SYS_PTRACE over the process"
    )]
    ReadMemory {
        /// The process.
        pid: i32,
        /// The address.
        addr: u64,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },

    /// A /proc file of the target could not be read or written.
    #[error(
        "{op} {path} for process {pid} failed: {source}; memtrack runs as root (or with \
         CAP_SYS_PTRACE) on the host that runs the process and needs /proc mounted"
    )]
    Proc {
        /// The process.
        pid: i32,
        /// read, write, open.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// A line of /proc/PID/maps could not be parsed.
    #[error("cannot parse line {line:?} of /proc/{pid}/maps; this kernel's format is unknown to memtrack")]
    MapsFormat {
        /// The process.
        pid: i32,
        /// The line.
        line: String,
    },

    /// Several errors during stop(); the first is shown, all are logged.
    #[error("stopping the tracker of process {pid} left {count} error(s), first: {first}")]
    Stop {
        /// The process.
        pid: i32,
        /// How many errors.
        count: usize,
        /// The first one.
        first: Box<Error>,
    },
}

impl Error {
    /// True when the error means the target process is gone.
    pub fn is_process_gone(&self) -> bool {
        matches!(self, Error::ProcessGone { .. })
    }
}

/// True for the errno values that mean "the process (or its mm) is gone".
pub(crate) fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::ENOENT))
}

/// A failed ptrace `step` on thread `tid` of `pid`: `ProcessGone` when the caller found the
/// process gone (`gone` then says what memtrack was doing), `Ptrace` otherwise.
pub(crate) fn ptrace_failure(
    pid: i32,
    tid: i32,
    step: &'static str,
    source: io::Error,
    gone: Option<String>,
) -> Error {
    match gone {
        Some(what) => Error::ProcessGone { pid, what },
        None => Error::Ptrace {
            pid,
            tid,
            step,
            source,
        },
    }
}

/// Maps an I/O error on a /proc file to `ProcessGone` or `Proc`.
pub(crate) fn proc_error(pid: i32, op: &'static str, path: PathBuf, source: io::Error) -> Error {
    if is_gone(&source) {
        Error::ProcessGone {
            pid,
            what: format!("{op} {}", path.display()),
        }
    } else {
        Error::Proc {
            pid,
            op,
            path,
            source,
        }
    }
}
