//! Small helpers for running the system tools Ferry drives.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Runs a command to completion; on failure the error names the command and its stderr.
pub fn run<I, S>(prog: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(prog)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("could not start `{prog}`: is it installed? (scripts/setup.sh installs it)")
        })?;
    if !out.status.success() {
        let line = std::iter::once(prog.to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], with `input` on the command's standard input.
pub fn run_with_stdin(prog: &str, args: &[&str], input: &[u8]) -> Result<String> {
    use std::io::Write;
    let line = std::iter::once(prog)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("could not start `{prog}`: is it installed? (scripts/setup.sh installs it)")
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .with_context(|| format!("writing to `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with the given arguments.
pub fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("ip", args)
}

/// Like [`run`] but ignores failure (for best-effort cleanup); returns whether it succeeded.
pub fn run_quiet<I, S>(prog: &str, args: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fails with a clear message unless running as root.
/// Makes `dir` an empty directory, keeping the directory itself (a process may hold it open)
/// and the entries named in `keep`. Symlinks inside are removed, never followed.
pub fn empty_dir(dir: &std::path::Path, keep: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if keep.iter().any(|k| e.file_name() == **k) {
            continue;
        }
        let path = e.path();
        let r = if e.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

pub fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (it drives CRIU, runc and network namespaces): run it with sudo");
    }
    Ok(())
}

/// A short stable hash (FNV-1a, 64 bit) for device names derived from container names.
pub fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

/// Milliseconds as f64 from a Duration.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wall-clock time, ms since the Unix epoch.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// A process started by [`spawn_with_fds`].
#[derive(Debug)]
pub struct Spawned {
    pid: nix::unistd::Pid,
    status: Option<std::process::ExitStatus>,
}

impl Spawned {
    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Its exit status if it has ended (reaped once).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        use std::os::unix::process::ExitStatusExt;
        if self.status.is_some() {
            return Ok(self.status);
        }
        match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)).map_err(std::io::Error::from)? {
            WaitStatus::Exited(_, code) => {
                self.status = Some(std::process::ExitStatus::from_raw((code & 0xff) << 8))
            }
            WaitStatus::Signaled(_, sig, _) => {
                self.status = Some(std::process::ExitStatus::from_raw(sig as i32))
            }
            _ => {}
        }
        Ok(self.status)
    }

    /// Kills it (SIGKILL) if it still runs.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Waits until it ends.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// Starts `prog` with `args`, this process's environment, stdio on /dev/null and each of
/// `fds` as descriptor number [`fd_slots`] gives it (in order), with `posix_spawn`: unlike
/// `Command` with descriptors to hand over (which forks), it does not copy this process's page
/// tables, which for an agent holding gigabytes of pages takes tens of milliseconds.
pub fn spawn_with_fds(
    prog: &std::path::Path,
    args: &[String],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Spawned> {
    use nix::spawn::{posix_spawn, PosixSpawnAttr, PosixSpawnFileActions};
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let slots = fd_slots(fds);
    let mut actions = PosixSpawnFileActions::init()?;
    for n in 0..3 {
        actions.add_dup2(null.as_raw_fd(), n)?;
    }
    for (fd, slot) in fds.iter().zip(&slots) {
        actions.add_dup2(fd.as_raw_fd(), *slot)?;
    }
    let attr = PosixSpawnAttr::init()?;
    let cstr = |b: &[u8]| CString::new(b).context("a NUL byte in an argument");
    let mut argv = vec![cstr(prog.as_os_str().as_bytes())?];
    for a in args {
        argv.push(cstr(a.as_bytes())?);
    }
    let envp = std::env::vars_os()
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            cstr(&e)
        })
        .collect::<Result<Vec<_>>>()?;
    let pid = posix_spawn(prog, &actions, &attr, &argv, &envp)
        .with_context(|| format!("starting {}", prog.display()))?;
    Ok(Spawned { pid, status: None })
}

/// The descriptor numbers [`spawn_with_fds`] gives `fds` in the child: above all of them, so
/// that no `dup2` overwrites one still to be copied.
pub fn fd_slots(fds: &[std::os::fd::BorrowedFd<'_>]) -> Vec<i32> {
    use std::os::fd::AsRawFd;
    let top = fds.iter().map(|f| f.as_raw_fd()).max().unwrap_or(2).max(2);
    (1..=fds.len() as i32).map(|i| top + i).collect()
}

/// The memory the kernel says it can give without swapping (`MemAvailable`), in bytes.
pub fn mem_available_bytes() -> Option<u64> {
    use procfs::Current;
    procfs::Meminfo::current().ok()?.mem_available
}

/// The host's usable memory (`MemTotal`), in bytes.
pub fn mem_total_bytes() -> Option<u64> {
    use procfs::Current;
    Some(procfs::Meminfo::current().ok()?.mem_total)
}

/// The last `NSpid` of a process or thread's status: its id in its own (the container's) PID
/// namespace.
pub fn own_nspid(status: &procfs::process::Status) -> Option<u32> {
    status
        .nspid
        .as_ref()?
        .last()
        .and_then(|v| u32::try_from(*v).ok())
}

/// Free bytes on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let st =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Allocation helper: first address in `first..=last` not in `used`.
pub fn first_free(first: Ipv4Addr, last: Ipv4Addr, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    (u32::from(first)..=u32::from(last))
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
}
