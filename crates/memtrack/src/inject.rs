//! System-call injection into a running x86-64 process, without modifying its code.
//!
//! The thread-group leader (or another live thread) is seized and interrupted; its registers
//! are saved; the instruction pointer is set to an existing `syscall` instruction (bytes
//! `0f 05`) found in the target's [vdso] (or libc, or any executable mapping), `rax` to the
//! system call number, the argument registers to the arguments and `orig_rax` to -1 (so the
//! kernel does not treat the stop as an interrupted system call to restart while our
//! registers are loaded); one PTRACE_SINGLESTEP executes exactly that instruction; `rax` then
//! holds the result. Finally the saved registers are written back: if the thread was
//! interrupted inside a blocking system call (`rax` = -ERESTART*), the kernel restarts that
//! call as it would after any signal. Other threads keep running all the time; no byte of
//! code is written.

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use tracing::{debug, info, warn};

use crate::error::{ptrace_failure, Error};
use crate::maps::{self, Mapping};
use crate::ptrace::{self, Stop, Stopped};
use crate::sys::{self, Regs};

/// Where a `syscall` instruction was found.
#[derive(Debug, Clone)]
pub(crate) struct SyscallSite {
    pub(crate) addr: u64,
    pub(crate) mapping: String,
}

/// Finds a `syscall` instruction in the executable memory of `pid`, reading it through
/// /proc/PID/mem (nothing is written).
pub(crate) fn find_syscall_instruction(pid: i32) -> Result<SyscallSite, Error> {
    let maps = maps::read(pid)?;
    let mem_path = format!("/proc/{pid}/mem");
    let mem = File::open(&mem_path)
        .map_err(|e| crate::error::proc_error(pid, "open", mem_path.clone().into(), e))?;
    let exec: Vec<&Mapping> = maps
        .iter()
        .filter(|m| m.exec && m.path != "[vsyscall]" && m.end > m.start)
        .collect();
    let vdso = exec.iter().filter(|m| m.path == "[vdso]");
    let libc = exec.iter().filter(|m| {
        m.path.rsplit('/').next().is_some_and(|f| {
            f.starts_with("libc.") || f.starts_with("libc-") || f.starts_with("ld-musl")
        })
    });
    let rest = exec.iter().filter(|m| m.path != "[vdso]");
    for m in vdso.chain(libc).chain(rest) {
        match search_mapping(&mem, m) {
            Ok(Some(addr)) => {
                debug!(pid, addr = format_args!("{addr:#x}"), mapping = %m.path, "found syscall instruction");
                return Ok(SyscallSite {
                    addr,
                    mapping: if m.path.is_empty() {
                        "anonymous".into()
                    } else {
                        m.path.clone()
                    },
                });
            }
            Ok(None) => {}
            Err(e) => {
                if !crate::process_alive(pid) {
                    return Err(Error::ProcessGone {
                        pid,
                        what: "searching for a syscall instruction".into(),
                    });
                }
                debug!(pid, mapping = %m.path, error = %e, "cannot read executable mapping");
            }
        }
    }
    Err(Error::NoSyscallInstruction { pid })
}

fn search_mapping(mem: &File, m: &Mapping) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    const LIMIT: u64 = 64 << 20;
    let end = m.end.min(m.start + LIMIT);
    let mut buf = vec![0u8; CHUNK as usize + 1];
    let mut pos = m.start;
    while pos < end {
        // One byte of overlap so that a pair split across chunks is found.
        let want = ((end - pos).min(CHUNK + 1)) as usize;
        let got = read_full_at(mem, &mut buf[..want], pos)?;
        if let Some(i) = buf[..got].windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(Some(pos + i as u64));
        }
        if got < want {
            break;
        }
        pos += CHUNK;
    }
    Ok(None)
}

fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if done > 0 => {
                debug!(error = %e, "short read of target memory");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A stopped thread whose registers we may change; restores them on drop.
struct Session {
    pid: i32,
    tid: i32,
    /// `None` only after `finish` took it.
    thread: Option<Stopped>,
    saved: Regs,
    site: u64,
    /// True while the thread holds our registers instead of its own.
    dirty: bool,
}

impl Session {
    fn new(thread: Stopped, site: u64) -> Result<Self, Error> {
        let saved = sys::ptrace_getregs(thread.tid).map_err(|source| Error::Ptrace {
            pid: thread.pid,
            tid: thread.tid,
            step: "PTRACE_GETREGS",
            source,
        })?;
        debug!(
            pid = thread.pid,
            tid = thread.tid,
            rip = format_args!("{:#x}", saved.rip),
            orig_rax = saved.orig_rax as i64,
            rax = saved.rax as i64,
            "saved registers"
        );
        Ok(Self {
            pid: thread.pid,
            tid: thread.tid,
            thread: Some(thread),
            saved,
            site,
            dirty: false,
        })
    }

    fn perr(&self, step: &'static str, source: io::Error) -> Error {
        let gone = !crate::process_alive(self.pid);
        let what = gone.then(|| format!("injecting a system call ({step})"));
        ptrace_failure(self.pid, self.tid, step, source, what)
    }

    /// Executes system call `nr` with `args` in the thread; returns the raw result (a
    /// negative errno on failure).
    fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, Error> {
        let tid = self.tid;
        let mut regs = self.saved;
        regs.rip = self.site;
        regs.rax = nr as u64;
        // -1: "not in a system call", so no restart logic is applied to these registers when
        // the thread leaves its current stop.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
        sys::ptrace_setregs(tid, &regs).map_err(|e| self.perr("PTRACE_SETREGS", e))?;
        self.dirty = true;
        for _ in 0..64 {
            sys::ptrace_singlestep(tid).map_err(|e| self.perr("PTRACE_SINGLESTEP", e))?;
            let stop = self.thread().wait()?;
            let now = sys::ptrace_getregs(tid).map_err(|e| self.perr("PTRACE_GETREGS", e))?;
            if now.rip == self.site + 2 {
                return Ok(now.rax as i64);
            }
            if now.rip != self.site {
                return Err(Error::Ptrace {
                    pid: self.pid,
                    tid,
                    step: "single-step over the injected syscall",
                    source: io::Error::other(format!(
                        "thread stopped at {:#x}, expected {:#x} or {:#x}",
                        now.rip,
                        self.site,
                        self.site + 2
                    )),
                });
            }
            // Not executed yet: the pending interrupt trap, a group-stop, or a signal that was
            // dequeued before the instruction ran (held back for redelivery).
            if stop == Stop::Signal(libc::SIGTRAP) {
                self.thread().record_signal()?;
            }
        }
        Err(Error::Ptrace {
            pid: self.pid,
            tid,
            step: "single-step over the injected syscall",
            source: io::Error::other("the thread did not execute the instruction after 64 steps"),
        })
    }

    fn restore(&mut self) -> Result<(), Error> {
        if self.dirty {
            sys::ptrace_setregs(self.tid, &self.saved)
                .map_err(|e| self.perr("PTRACE_SETREGS (restore)", e))?;
            self.dirty = false;
        }
        Ok(())
    }

    fn thread(&mut self) -> &mut Stopped {
        self.thread
            .as_mut()
            .expect("session thread present until finish")
    }

    fn finish(mut self) -> Result<(), Error> {
        self.restore()?;
        match self.thread.take() {
            Some(t) => t.release(),
            None => Ok(()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            warn!(pid = self.pid, tid = self.tid, error = %e, "restoring registers failed");
        }
        // `thread` is released by its own Drop.
    }
}

fn errno_result(ret: i64) -> Result<u64, io::Error> {
    if (-4095..0).contains(&ret) {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as u64)
    }
}

/// Creates a userfaultfd inside `pid` (so it belongs to the target's mm), takes our own copy
/// with pidfd_getfd and closes the target's copy again, all in one ptrace stop of one thread.
pub(crate) fn steal_userfaultfd(pid: i32, pidfd: BorrowedFd<'_>) -> Result<OwnedFd, Error> {
    let site = find_syscall_instruction(pid)?;
    let mut options = 0;
    let seccomp = ptrace::seccomp_mode(pid);
    if seccomp != 0 {
        // A seccomp filter could forbid (or punish) userfaultfd; suspend it while we hold the
        // thread. Needs CAP_SYS_ADMIN.
        options |= libc::PTRACE_O_SUSPEND_SECCOMP;
    }
    ptrace::on_tracer_thread(|| {
        let thread = match ptrace::seize_any_thread(pid, options) {
            Err(Error::Ptrace { source, .. })
                if seccomp != 0 && source.raw_os_error() == Some(libc::EPERM) =>
            {
                return Err(Error::Unsupported {
                    method: crate::Method::UffdWp,
                    reason: format!(
                        "process {pid} runs under a seccomp filter (mode {seccomp}) and \
                         PTRACE_O_SUSPEND_SECCOMP was refused ({source}; it needs CAP_SYS_ADMIN): \
                         injecting userfaultfd could be blocked or kill the process"
                    ),
                })
            }
            other => other?,
        };
        let tid = thread.tid;
        let t0 = std::time::Instant::now();
        let mut session = Session::new(thread, site.addr)?;

        let base = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let mut ret = session.syscall(libc::SYS_userfaultfd, [base, 0, 0, 0, 0, 0])?;
        if ret == -(libc::EPERM as i64) {
            // vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE in the target: user-mode-only
            // userfaultfds are still allowed, and asynchronous write protection does not care.
            debug!(pid, "userfaultfd: EPERM, retrying with UFFD_USER_MODE_ONLY");
            ret = session.syscall(
                libc::SYS_userfaultfd,
                [base | sys::UFFD_USER_MODE_ONLY as u64, 0, 0, 0, 0, 0],
            )?;
        }
        let target_fd = errno_result(ret).map_err(|source| Error::Injection {
            pid,
            syscall: "userfaultfd",
            source,
            hint: "the kernel needs CONFIG_USERFAULTFD and the process must be allowed to \
                   create one (vm.unprivileged_userfaultfd, seccomp); use Method::PageHash otherwise",
        })? as i32;

        // Take our copy while the thread is still stopped, then close the target's copy
        // whatever happened (CRIU cannot dump a process that holds a userfaultfd).
        let ours = sys::pidfd_getfd(pidfd, target_fd);
        let closed = session.syscall(libc::SYS_close, [target_fd as u64, 0, 0, 0, 0, 0]);
        session.finish()?;
        let elapsed_us = t0.elapsed().as_micros() as u64;

        let closed = closed?;
        if let Err(source) = errno_result(closed) {
            return Err(Error::Injection {
                pid,
                syscall: "close",
                source,
                hint: "the target may still hold a userfaultfd: check /proc/PID/fd before \
                       dumping it with CRIU",
            });
        }
        let ours = ours.map_err(|source| {
            if crate::error::is_gone(&source) {
                Error::ProcessGone {
                    pid,
                    what: "pidfd_getfd of the injected userfaultfd".into(),
                }
            } else {
                Error::Injection {
                    pid,
                    syscall: "pidfd_getfd (in memtrack)",
                    source,
                    hint: "memtrack needs PTRACE_MODE_ATTACH over the process (CAP_SYS_PTRACE) \
                           and Linux >= 5.6",
                }
            }
        })?;
        info!(
            pid,
            tid,
            target_fd,
            site = format_args!("{:#x}", site.addr),
            mapping = %site.mapping,
            stopped_us = elapsed_us,
            "userfaultfd created inside the target and taken over"
        );
        Ok(ours)
    })
}
