//! Container output: a container's standard output and standard error are two pipes whose
//! reading ends belong to its console shim, a small process of its own (`ferry console-shim`,
//! [`run_shim`]) that appends what it reads to the container's log directory, a line per
//! record in Docker's `json-file` format ([`LogRecord`]).
//!
//! The shim is not the agent: a container keeps writing while its agent restarts or dies (a
//! pipe read by the agent would kill it with `SIGPIPE`). It ends when every writing end has
//! closed, that is when the container has gone.
//!
//! Across a migration the pipes are CRIU's to carry: runc's `descriptors.json` names them
//! (`pipe:[inode]`, what the container's first process holds at the freeze, see
//! [`descriptors`]) and runc's restore hands its own standard output and error to CRIU as
//! those pipes (`--inherit-fd`), so the restored container writes into the new host's shim.
//! What the old host kept follows after the commit ([`history_payload`], [`write_history`]).
//!
//! A log directory holds `console.log` (the shim's), `console.log.1` (the one before it, once
//! `console.log` passed its size limit), `history.log` (what earlier hosts kept) and
//! `shim.pid`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_api::{LogRecord, LogStream};
use nix::poll::{PollFd, PollFlags, PollTimeout};

/// The `ferry` subcommand that runs [`run_shim`].
pub const SHIM_SUBCOMMAND: &str = "console-shim";
/// A log file's size at which the shim starts a new one (the old one is kept as
/// `console.log.1`), unless the agent's configuration says otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// The most a record's text holds: a longer line is cut into records of this size.
pub const MAX_RECORD_TEXT: usize = 16 << 10;
/// How long the shim keeps an unfinished line before writing it as it is.
const PARTIAL_AFTER: Duration = Duration::from_millis(200);

const CURRENT: &str = "console.log";
const ROTATED: &str = "console.log.1";
const HISTORY: &str = "history.log";
const PID_FILE: &str = "shim.pid";

/// Where container `name`'s output is kept under an agent's state directory.
pub fn log_dir(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("console").join(name)
}

/// The writing ends of a container's output pipes, whose reading ends a running shim holds.
/// Give them to runc with [`Console::stdio`]; drop this once runc has started (or restored)
/// the container, so that the shim ends when the container does.
#[derive(Debug)]
pub struct Console {
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Console {
    /// Starts a shim (`SHIM console-shim --dir DIR --max-bytes N`) appending to `dir`.
    pub fn spawn(shim: &Path, dir: &Path, max_bytes: u64) -> Result<Console> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log directory {}", dir.display()))?;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("creating a container's stdout pipe")?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("creating a container's stderr pipe")?;
        // The reading ends are the shim's standard input (stdout's) and output (stderr's):
        // descriptors a process can take without `unsafe`.
        let mut c = Command::new(shim);
        c.arg(SHIM_SUBCOMMAND)
            .arg("--dir")
            .arg(dir)
            .arg("--max-bytes")
            .arg(max_bytes.to_string())
            .stdin(Stdio::from(out_r))
            .stdout(Stdio::from(err_r))
            .stderr(Stdio::piped());
        // The shim checks its directory, starts its detached self and ends at once: nothing
        // waits for the shim that stays (init reaps it), and a failure is known here.
        let started = c
            .spawn()
            .and_then(|child| child.wait_with_output())
            .with_context(|| format!("starting the console shim {}", shim.display()))?;
        if !started.status.success() {
            bail!(
                "the console shim {} did not start ({}): {}",
                shim.display(),
                started.status,
                String::from_utf8_lossy(&started.stderr).trim()
            );
        }
        Ok(Console {
            stdout: out_w,
            stderr: err_w,
        })
    }

    /// Copies of the writing ends, for a runc command's stdout and stderr.
    pub fn stdio(&self) -> Result<(Stdio, Stdio)> {
        let out = self
            .stdout
            .try_clone()
            .context("duplicating the stdout pipe")?;
        let err = self
            .stderr
            .try_clone()
            .context("duplicating the stderr pipe")?;
        Ok((Stdio::from(out), Stdio::from(err)))
    }
}

/// What runc lists in `descriptors.json` for process `pid`: the targets of its descriptors
/// 0, 1 and 2 (`/dev/null`, `pipe:[12345]`, ...), read from `/proc`.
pub fn descriptors(pid: i32) -> Result<Vec<String>> {
    (0..3)
        .map(|fd| {
            let link = format!("/proc/{pid}/fd/{fd}");
            std::fs::read_link(&link)
                .map(|t| t.to_string_lossy().into_owned())
                .with_context(|| format!("reading {link}"))
        })
        .collect()
}

/// The shim's arguments.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    /// The log directory.
    pub dir: PathBuf,
    /// [`DEFAULT_MAX_BYTES`] unless set.
    pub max_bytes: u64,
    /// This is the shim that stays (started by the one the agent started, `--detached`).
    pub detached: bool,
}

/// The console shim: reads its standard input (the container's stdout pipe) and its standard
/// output (the stderr pipe, read) until both end, writing a
/// [`LogRecord`] per line. Runs in a session of its own, deaf to hang-ups and interrupts.
///
/// Started by the agent, it checks that it can write the log, starts itself again detached
/// (with the pipes), records that one's pid and ends; the detached one does the work.
pub fn run_shim(args: &ShimArgs) -> Result<()> {
    let pid_file = args.dir.join(PID_FILE);
    if !args.detached {
        drop(LogWriter::open(&args.dir, args.max_bytes)?);
        let me = std::env::current_exe().context("finding the shim's own binary")?;
        let child = Command::new(me)
            .arg(SHIM_SUBCOMMAND)
            .arg("--dir")
            .arg(&args.dir)
            .arg("--max-bytes")
            .arg(args.max_bytes.to_string())
            .arg("--detached")
            .stderr(Stdio::null())
            .spawn()
            .context("starting the detached shim")?;
        std::fs::write(&pid_file, format!("{}\n", child.id()))
            .with_context(|| format!("writing {}", pid_file.display()))?;
        return Ok(());
    }
    let _ = nix::unistd::setsid();
    // Blocked, not handled: a hang-up or an interrupt meant for a terminal stays pending.
    let mut deaf = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        deaf.add(s);
    }
    let _ = deaf.thread_block();
    let take = |fd: std::os::fd::BorrowedFd<'_>, what: &str| {
        fd.try_clone_to_owned()
            .map(File::from)
            .with_context(|| format!("taking the {what} pipe"))
    };
    let out = take(std::io::stdin().as_fd(), "stdout")?;
    let err = take(std::io::stdout().as_fd(), "stderr")?;
    let pid = std::process::id();
    let mut log = LogWriter::open(&args.dir, args.max_bytes)?;
    let r = pump(&mut log, [out, err]);
    if std::fs::read_to_string(&pid_file).is_ok_and(|s| s.trim() == pid.to_string()) {
        let _ = std::fs::remove_file(&pid_file);
    }
    r
}

/// The shim's loop: both pipes polled, lines written as they complete.
fn pump(log: &mut LogWriter, mut pipes: [File; 2]) -> Result<()> {
    let streams = [LogStream::Stdout, LogStream::Stderr];
    let mut open = [true, true];
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut since = [Instant::now(), Instant::now()];
    let mut buf = vec![0u8; 64 << 10];
    while open.iter().any(|o| *o) {
        let idx: Vec<usize> = (0..2).filter(|i| open[*i]).collect();
        let ready: Vec<(usize, bool)> = {
            let mut fds: Vec<PollFd> = idx
                .iter()
                .map(|i| PollFd::new(pipes[*i].as_fd(), PollFlags::POLLIN))
                .collect();
            match nix::poll::poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("polling the console pipes"),
            }
            idx.iter()
                .zip(&fds)
                .map(|(i, p)| (*i, p.revents().is_some_and(|r| !r.is_empty())))
                .collect()
        };
        for (i, readable) in ready {
            if !readable {
                continue;
            }
            match pipes[i].read(&mut buf) {
                Ok(0) => {
                    open[i] = false;
                    if !pending[i].is_empty() {
                        log.write(streams[i], &std::mem::take(&mut pending[i]))?;
                    }
                }
                Ok(n) => {
                    if pending[i].is_empty() {
                        since[i] = Instant::now();
                    }
                    pending[i].extend_from_slice(&buf[..n]);
                    for piece in take_lines(&mut pending[i]) {
                        log.write(streams[i], &piece)?;
                    }
                    since[i] = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading a console pipe"),
            }
        }
        for i in 0..2 {
            if !pending[i].is_empty() && since[i].elapsed() >= PARTIAL_AFTER {
                log.write(streams[i], &std::mem::take(&mut pending[i]))?;
            }
        }
    }
    Ok(())
}

/// Takes the complete lines (and pieces of [`MAX_RECORD_TEXT`]) off the front of `pending`.
fn take_lines(pending: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let rest = &pending[start..];
        let cut = match rest.iter().position(|b| *b == b'\n') {
            Some(nl) if nl < MAX_RECORD_TEXT => nl + 1,
            _ if rest.len() >= MAX_RECORD_TEXT => MAX_RECORD_TEXT,
            _ => break,
        };
        out.push(rest[..cut].to_vec());
        start += cut;
    }
    pending.drain(..start);
    out
}

/// The shim's log file, started again as `console.log.1` past its limit.
struct LogWriter {
    dir: PathBuf,
    file: File,
    size: u64,
    max: u64,
}

impl LogWriter {
    fn open(dir: &Path, max: u64) -> Result<LogWriter> {
        let path = dir.join(CURRENT);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            file,
            size,
            max: max.max(4096),
        })
    }

    fn write(&mut self, stream: LogStream, text: &[u8]) -> Result<()> {
        let rec = LogRecord {
            time: now_rfc3339(),
            stream,
            log: String::from_utf8_lossy(text).into_owned(),
        };
        let mut line = serde_json::to_vec(&rec)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max {
            let _ = std::fs::rename(self.dir.join(CURRENT), self.dir.join(ROTATED));
            *self = LogWriter::open(&self.dir, self.max)?;
        }
        // One write per record: another shim appending here (a restore on the host it left)
        // never splits it.
        self.file
            .write_all(&line)
            .context("writing the container's log")?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// Now, RFC 3339 in UTC with nanoseconds.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Waits up to `timeout` for the shim of `dir` to end (it has read everything once the
/// container is gone). Whether it ended.
pub fn wait_shim_exit(dir: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let pid = std::fs::read_to_string(dir.join(PID_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let alive = pid.is_some_and(|p| {
            procfs::process::Process::new(p)
                .and_then(|p| p.stat())
                .is_ok_and(|s| s.state != 'Z')
        });
        if !alive {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every record of `dir`, oldest first: the history, then the rotated and current logs (of
/// the current log, with `current_upto`, only its first `current_upto` bytes). Lines that do
/// not parse are skipped. With `tail`, only the last `tail`.
pub fn read(dir: &Path, tail: Option<usize>, current_upto: Option<u64>) -> Result<Vec<LogRecord>> {
    let mut all = Vec::new();
    for f in [HISTORY, ROTATED, CURRENT] {
        let path = dir.join(f);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let limit = match current_upto {
            Some(n) if f == CURRENT => n,
            _ => u64::MAX,
        };
        for line in BufReader::new(file.take(limit)).split(b'\n') {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if let Ok(r) = serde_json::from_slice::<LogRecord>(&line) {
                all.push(r);
            }
        }
    }
    if let Some(t) = tail {
        all.drain(..all.len().saturating_sub(t));
    }
    Ok(all)
}

/// Reads the records appended to `dir`'s current log since byte `offset` of it (for a
/// follower), and the offset to read from next. A log that was started again (rotated) is
/// read from its start.
pub fn read_since(dir: &Path, offset: u64) -> Result<(Vec<LogRecord>, u64)> {
    let path = dir.join(CURRENT);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let len = file.metadata()?.len();
    let from = if len < offset { 0 } else { offset };
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(8 << 20).read_to_end(&mut bytes)?;
    // Only whole lines: a record being written is read next time.
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let recs = bytes[..whole]
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<LogRecord>(l).ok())
        .collect();
    Ok((recs, from + whole as u64))
}

/// The current log's size (where a follower starts).
pub fn current_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(CURRENT)).map_or(0, |m| m.len())
}

/// What `dir` holds, oldest first, for the host a container moved to: at most `cap` bytes,
/// the newest, cut at a record's start.
pub fn history_payload(dir: &Path, cap: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for f in [HISTORY, ROTATED, CURRENT] {
        match std::fs::read(dir.join(f)) {
            Ok(mut b) => {
                // A file cut short by a full disk ends in half a record.
                if b.last().is_some_and(|c| *c != b'\n') {
                    let keep = b.iter().rposition(|c| *c == b'\n').map_or(0, |p| p + 1);
                    b.truncate(keep);
                }
                out.extend_from_slice(&b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.join(f).display())),
        }
    }
    if out.len() > cap {
        let from = out.len() - cap;
        let start = out[from..]
            .iter()
            .position(|c| *c == b'\n')
            .map_or(out.len(), |p| from + p + 1);
        out.drain(..start);
    }
    Ok(out)
}

/// Writes `payload`, a container's history from the host it left (untrusted: only lines that
/// are records are kept), as `dir`'s history. Returns the records kept.
pub fn write_history(dir: &Path, payload: &[u8]) -> Result<usize> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the log directory {}", dir.display()))?;
    let mut kept = Vec::with_capacity(payload.len());
    let mut n = 0;
    for line in payload.split(|b| *b == b'\n') {
        if let Ok(r) = serde_json::from_slice::<LogRecord>(line) {
            serde_json::to_writer(&mut kept, &r)?;
            kept.push(b'\n');
            n += 1;
        }
    }
    let tmp = dir.join(format!("{HISTORY}.tmp"));
    std::fs::write(&tmp, &kept).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(HISTORY))
        .with_context(|| format!("writing {}", dir.join(HISTORY).display()))?;
    Ok(n)
}

#[cfg(test)]
mod tests;
