//! Stopping threads of a foreign process with PTRACE_SEIZE + PTRACE_INTERRUPT, and releasing
//! them again on every path.
//!
//! Everything here must run on one thread: the kernel makes the *thread* that seized a tracee
//! its tracer. [`on_tracer_thread`] runs a closure on a fresh scoped thread; when a tracee can
//! not be detached (it never reached the stop), that thread's exit makes the kernel release it
//! (exit_ptrace), so the target is never left seized behind our back.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::error::{ptrace_failure, Error};
use crate::sys::{self, SigInfo, WaitStatus};

/// How long to wait for a thread to reach the stop that PTRACE_INTERRUPT asks for.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for a thread to reach its first stop, when it is seized. Usually
/// microseconds; a thread that takes longer (a process caught in `execve` or a `vfork`, or in
/// uninterruptible sleep) is left alone at once: the caller tracks that process another way
/// rather than stall the migration for [`STOP_TIMEOUT`].
pub(crate) const ATTACH_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// `PTRACE_EVENT_STOP`: group-stop or PTRACE_INTERRUPT trap of a seized tracee.
const PTRACE_EVENT_STOP: i32 = 128;

/// Runs `f` on a new scoped thread that becomes the tracer of everything `f` seizes.
pub(crate) fn on_tracer_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// The state letter of a thread ("R", "S", "D", "Z", ...), for messages.
pub(crate) fn thread_state(pid: i32, tid: i32) -> String {
    procfs::process::Process::new(pid)
        .and_then(|p| p.task_from_tid(tid))
        .and_then(|t| t.stat())
        .map_or_else(|_| "?".into(), |s| s.state.to_string())
}

/// The thread ids of a process, the thread-group leader first.
pub(crate) fn threads(pid: i32) -> Result<Vec<i32>, Error> {
    let path = format!("/proc/{pid}/task");
    let dir = fs::read_dir(&path)
        .map_err(|e| crate::error::proc_error(pid, "list", path.clone().into(), e))?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable_by_key(|&t| (t != pid, t));
    Ok(tids)
}

/// The `TracerPid` of a process (0: none), for messages.
pub(crate) fn tracer_pid(pid: i32) -> i32 {
    status(pid).map_or(0, |s| s.tracerpid)
}

/// The seccomp mode of a process from /proc/PID/status (0 none, 1 strict, 2 filter).
pub(crate) fn seccomp_mode(pid: i32) -> i32 {
    status(pid)
        .and_then(|s| s.seccomp)
        .and_then(|m| i32::try_from(m).ok())
        .unwrap_or(0)
}

fn status(pid: i32) -> Option<procfs::process::Status> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .ok()
}

/// A seized thread that is (after a successful [`Stopped::seize`]) in a ptrace-stop.
///
/// Dropping it detaches the thread; signals that arrived while we held the thread and that we
/// had to take out of the way are delivered again.
pub(crate) struct Stopped {
    pub(crate) pid: i32,
    pub(crate) tid: i32,
    /// Signals taken from the thread while it was ours, in arrival order.
    consumed: Vec<SigInfo>,
    /// True when the thread is in a signal-delivery-stop (detaching with a signal number then
    /// delivers that signal).
    at_signal_stop: bool,
    /// False once detached (or gone).
    live: bool,
}

/// What a wait after resuming the tracee produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A PTRACE_INTERRUPT trap or a group-stop.
    Event,
    /// A signal-delivery-stop for this signal (already recorded when it is not SIGTRAP).
    Signal(i32),
}

impl Stopped {
    /// PTRACE_SEIZE `tid` with `options`, PTRACE_INTERRUPT it and wait for the stop.
    pub(crate) fn seize(pid: i32, tid: i32, options: i32) -> Result<Self, Error> {
        sys::ptrace_seize(tid, options).map_err(|source| {
            if source.raw_os_error() == Some(libc::ESRCH) {
                Error::ProcessGone {
                    pid,
                    what: format!("attaching to thread {tid}"),
                }
            } else {
                let tracer = tracer_pid(pid);
                if tracer != 0 {
                    warn!(
                        pid,
                        tid, tracer, "process is already traced by another process"
                    );
                }
                Error::Ptrace {
                    pid,
                    tid,
                    step: "PTRACE_SEIZE",
                    source,
                }
            }
        })?;
        let mut me = Self {
            pid,
            tid,
            consumed: Vec::new(),
            at_signal_stop: false,
            live: true,
        };
        sys::ptrace_interrupt(tid).map_err(|e| me.ptrace_error("PTRACE_INTERRUPT", e))?;
        match me.wait_within(ATTACH_STOP_TIMEOUT)? {
            Stop::Event => {}
            Stop::Signal(sig) => {
                // A signal arrived before the interrupt trap. The thread is in a ptrace-stop
                // all the same; the interrupt trap stays pending and shows up later as an
                // extra Stop::Event, which callers skip.
                debug!(
                    pid,
                    tid, sig, "thread stopped for a signal before the interrupt trap"
                );
                if sig == libc::SIGTRAP {
                    me.record_signal()?;
                }
            }
        }
        debug!(pid, tid, "thread stopped");
        Ok(me)
    }

    fn ptrace_error(&mut self, step: &'static str, source: std::io::Error) -> Error {
        let gone = source.raw_os_error() == Some(libc::ESRCH) && !crate::process_alive(self.pid);
        if gone {
            self.live = false;
        }
        let what = gone.then(|| format!("{step} on thread {}", self.tid));
        ptrace_failure(self.pid, self.tid, step, source, what)
    }

    /// Records the signal of the current signal-delivery-stop so it is delivered again on
    /// release.
    pub(crate) fn record_signal(&mut self) -> Result<(), Error> {
        let info = sys::ptrace_getsiginfo(self.tid)
            .map_err(|e| self.ptrace_error("PTRACE_GETSIGINFO", e))?;
        debug!(
            pid = self.pid,
            tid = self.tid,
            sig = info.si_signo,
            "holding back a signal"
        );
        self.consumed.push(info);
        Ok(())
    }

    /// Waits for the next stop of the thread (polling, up to [`STOP_TIMEOUT`]). Signals other
    /// than SIGTRAP are recorded for redelivery; SIGTRAP is returned for the caller to judge
    /// (single-step trap or a real signal, see [`Stopped::record_signal`]).
    pub(crate) fn wait(&mut self) -> Result<Stop, Error> {
        self.wait_within(STOP_TIMEOUT)
    }

    /// [`Stopped::wait`], giving up after `timeout`.
    fn wait_within(&mut self, timeout: Duration) -> Result<Stop, Error> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(5);
        let mut spins = 0u32;
        loop {
            let status =
                sys::waitpid(self.tid, true).map_err(|e| self.ptrace_error("waitpid", e))?;
            match status {
                WaitStatus::StillRunning => {
                    if start.elapsed() > timeout {
                        return Err(Error::StopTimeout {
                            pid: self.pid,
                            tid: self.tid,
                            seconds: timeout.as_secs_f64(),
                            state: thread_state(self.pid, self.tid),
                        });
                    }
                    if spins < 50 {
                        spins += 1;
                        thread::yield_now();
                    } else {
                        thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(2));
                    }
                }
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                    self.live = false;
                    return Err(Error::ProcessGone {
                        pid: self.pid,
                        what: format!("thread {} was stopped by memtrack", self.tid),
                    });
                }
                WaitStatus::Stopped { sig, event } => {
                    if event == PTRACE_EVENT_STOP {
                        self.at_signal_stop = false;
                        return Ok(Stop::Event);
                    }
                    if event != 0 {
                        // Another ptrace event (we set no options that produce them).
                        self.at_signal_stop = false;
                        return Ok(Stop::Event);
                    }
                    self.at_signal_stop = true;
                    if sig != libc::SIGTRAP {
                        self.record_signal()?;
                    }
                    return Ok(Stop::Signal(sig));
                }
            }
        }
    }

    /// Detaches the thread, delivering held-back signals.
    pub(crate) fn release(mut self) -> Result<(), Error> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), Error> {
        if !self.live {
            return Ok(());
        }
        self.live = false;
        let mut later: &[SigInfo] = &self.consumed;
        let mut detach_sig = 0;
        if self.at_signal_stop {
            if let Some(first) = self.consumed.first() {
                // Put the signal back with its original siginfo; detaching from a
                // signal-delivery-stop with its number delivers it.
                if let Err(e) = sys::ptrace_setsiginfo(self.tid, first) {
                    warn!(pid = self.pid, tid = self.tid, error = %e, "PTRACE_SETSIGINFO failed");
                }
                detach_sig = first.si_signo;
                later = &self.consumed[1..];
            }
        }
        let res = sys::ptrace_detach(self.tid, detach_sig);
        for info in later {
            warn!(
                pid = self.pid,
                tid = self.tid,
                sig = info.si_signo,
                "re-sending a signal that arrived during injection (its siginfo is lost)"
            );
            let _ = sys::tgkill(self.pid, self.tid, info.si_signo);
        }
        match res {
            Ok(()) => {
                debug!(pid = self.pid, tid = self.tid, "thread released");
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                // Gone, or not in a stop: then our tracer thread's exit releases it.
                debug!(pid = self.pid, tid = self.tid, "PTRACE_DETACH: ESRCH");
                Ok(())
            }
            Err(source) => Err(Error::Ptrace {
                pid: self.pid,
                tid: self.tid,
                step: "PTRACE_DETACH",
                source,
            }),
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            warn!(pid = self.pid, tid = self.tid, error = %e, "releasing a traced thread failed");
        }
    }
}

/// Seizes one thread of `pid` suitable for injection: the thread-group leader, unless it is a
/// zombie (it called pthread_exit) or sleeps uninterruptibly, then another thread.
pub(crate) fn seize_any_thread(pid: i32, options: i32) -> Result<Stopped, Error> {
    let mut tids: Vec<(i32, String)> = threads(pid)?
        .into_iter()
        .map(|t| (t, thread_state(pid, t)))
        .filter(|(_, st)| st != "Z" && st != "X")
        .collect();
    // Stable sort: leader first among equals, threads in uninterruptible sleep last.
    tids.sort_by_key(|(_, st)| st == "D");
    let mut first_err = None;
    for (tid, state) in tids {
        match Stopped::seize(pid, tid, options) {
            Ok(s) => return Ok(s),
            Err(e) => {
                debug!(pid, tid, state = %state, error = %e, "cannot seize thread, trying the next one");
                // A thread that exited or did not stop in time does not rule out the others; a
                // permission problem does.
                let next = e.is_process_gone() && crate::process_alive(pid)
                    || matches!(e, Error::StopTimeout { .. });
                if first_err.is_none() {
                    first_err = Some(e);
                }
                if !next {
                    break;
                }
            }
        }
    }
    Err(first_err.unwrap_or(Error::ProcessGone {
        pid,
        what: "looking for a thread to attach to".into(),
    }))
}

/// All threads of a process held in ptrace-stops (used to read and reset soft-dirty bits
/// atomically with respect to the process).
pub(crate) struct Freeze {
    threads: Vec<Stopped>,
}

impl Freeze {
    /// Stops every thread of `pid`, including threads created while we stop the others.
    pub(crate) fn new(pid: i32) -> Result<Self, Error> {
        let mut threads: Vec<Stopped> = Vec::new();
        for _round in 0..100 {
            let mut added = false;
            for tid in self::threads(pid)? {
                if threads.iter().any(|t| t.tid == tid) {
                    continue;
                }
                match Stopped::seize(pid, tid, 0) {
                    Ok(t) => {
                        threads.push(t);
                        added = true;
                    }
                    // A thread that exits meanwhile is no obstacle.
                    Err(e) if e.is_process_gone() && crate::process_alive(pid) => {}
                    Err(e) if thread_state(pid, tid) == "Z" => {
                        debug!(pid, tid, error = %e, "skipping zombie thread");
                    }
                    Err(e) => return Err(e),
                }
            }
            if !added {
                return Ok(Self { threads });
            }
        }
        Err(Error::ProcessGone {
            pid,
            what: "freezing threads (the process keeps creating threads)".into(),
        })
    }

    /// Releases every thread.
    pub(crate) fn thaw(self) -> Result<(), Error> {
        let mut first = None;
        for t in self.threads {
            if let Err(e) = t.release() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Freeze (used by the SoftDirty tracker, which cannot run on this kernel) stops every
    /// thread and thaw releases them.
    #[test]
    fn freeze_stops_and_thaws_all_threads() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep(1)");
        let pid = child.id() as i32;
        std::thread::sleep(Duration::from_millis(50));
        let states = on_tracer_thread(|| {
            let f = Freeze::new(pid).expect("freeze");
            let frozen: Vec<String> = threads(pid)
                .unwrap()
                .iter()
                .map(|&t| thread_state(pid, t))
                .collect();
            f.thaw().expect("thaw");
            frozen
        });
        // Released, the thread runs again, if only to go back to its sleep.
        let mut after = thread_state(pid, pid);
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while after != "S" && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            after = thread_state(pid, pid);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(states.iter().all(|s| s == "t"), "frozen states {states:?}");
        assert_eq!(after, "S", "thread did not go back to sleep");
    }

    /// A signal that arrives while a thread is ours is held back and delivered on release:
    /// a standard signal and a real-time one (which nix's `Signal` cannot name, so the
    /// waitpid decoding and PTRACE_DETACH have to take it as a number).
    #[test]
    fn a_signal_during_the_stop_is_delivered_on_release() {
        use std::os::unix::process::ExitStatusExt;
        for sig in [libc::SIGUSR1, libc::SIGRTMIN() + 4] {
            let mut child = Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sleep(1)");
            let pid = child.id() as i32;
            std::thread::sleep(Duration::from_millis(50));
            let stop = on_tracer_thread(|| {
                let mut t = Stopped::seize(pid, pid, 0).expect("seize");
                sys::tgkill(pid, pid, sig).expect("tgkill");
                // Resuming the thread dequeues the signal: a signal-delivery-stop.
                let mut stop = None;
                for _ in 0..8 {
                    sys::ptrace_singlestep(pid).expect("PTRACE_SINGLESTEP");
                    let s = t.wait().expect("wait");
                    if s == Stop::Signal(sig) {
                        stop = Some(s);
                        break;
                    }
                }
                t.release().expect("release");
                stop
            });
            let status = child.wait().expect("wait for sleep(1)");
            assert_eq!(stop, Some(Stop::Signal(sig)), "stop for signal {sig}");
            assert_eq!(status.signal(), Some(sig), "sleep(1) ended with {status}");
        }
    }
}
