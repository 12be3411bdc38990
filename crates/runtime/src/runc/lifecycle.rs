//! A container's life besides checkpoint and restore: signals, stop, start again, and
//! commands run inside it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Runc;

/// What a command run in a container did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit code; 128 + N when signal N ended it; `None` when it outlived its time and
    /// was killed.
    pub exit_code: Option<i32>,
    /// Its standard output, at most the cap given.
    pub stdout: Vec<u8>,
    /// Its standard error, at most the cap given.
    pub stderr: Vec<u8>,
    /// Whether either stream said more than the cap (the rest was read and dropped).
    pub truncated: bool,
    /// The command had ended at its timeout, but a process it left in the background still
    /// held its output open (runc waits for the output's end, as `docker exec` does).
    pub output_held_open: bool,
}

/// A tag that tells apart the pid files of concurrent commands.
fn exec_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Runc {
    /// Sends `signal` (`TERM`, `KILL`, ...) to the container's init process, or with `all`
    /// to every process in it.
    pub fn kill(&self, name: &str, signal: &str, all: bool) -> Result<()> {
        let mut c = self.cmd("kill", name);
        c.arg("kill");
        if all {
            c.arg("--all");
        }
        c.args([name, signal]);
        self.run("kill", name, c, None)
    }

    /// Stops the container: TERM to its init, KILL to every process after `grace`, then
    /// deletes it from runc. Its bundle, root and network namespace stay: [`Runc::start`]
    /// runs it again.
    pub fn stop(&self, name: &str, grace: Duration) -> Result<()> {
        let running = |r: &Runc| {
            r.state(name)
                .is_some_and(|s| s.status == "running" || s.status == "paused")
        };
        if running(self) {
            // It may have ended between the check and the signal: that is a stop too.
            let _ = self.kill(name, "TERM", false);
            let deadline = Instant::now() + grace;
            while running(self) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if running(self) {
                let _ = self.kill(name, "KILL", true);
                let deadline = Instant::now() + Duration::from_secs(10);
                while running(self) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        if self.state(name).is_some() {
            let mut c = self.cmd("delete", name);
            c.args(["delete", "--force", name]);
            self.run("delete", name, c, None)?;
        }
        Ok(())
    }

    /// Runs `args` in the running container (`runc exec`), with `env` (`K=V`) added to its
    /// process environment and `cwd` as its directory when given; each output stream is kept
    /// up to `cap` bytes; the command is killed after `timeout`.
    pub fn exec(
        &self,
        name: &str,
        args: &[String],
        (env, cwd): (&[String], Option<&str>),
        timeout: Duration,
        cap: usize,
    ) -> Result<ExecOutput> {
        if args.is_empty() {
            bail!("no command to run in {name}");
        }
        let pid_file = self.root.join(format!(
            "{name}.exec-{}-{}.pid",
            std::process::id(),
            exec_tag()
        ));
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).args(["exec", "--pid-file"]);
        c.arg(&pid_file);
        for e in env {
            c.arg("--env").arg(e);
        }
        if let Some(d) = cwd {
            c.arg("--cwd").arg(d);
        }
        c.arg(name).args(args);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .with_context(|| format!("could not start {} exec", self.bin))?;
        // Each stream is read on a thread of its own; a process the command left behind in the
        // background may hold it open, so the answer waits for its end only briefly.
        type Kept = std::sync::Arc<std::sync::Mutex<(Vec<u8>, bool, bool)>>;
        let read = |mut r: Box<dyn Read + Send>| -> Kept {
            let kept: Kept = Default::default();
            let k = std::sync::Arc::clone(&kept);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                loop {
                    let n = r.read(&mut buf).unwrap_or(0);
                    let mut g = k.lock().unwrap_or_else(|e| e.into_inner());
                    if n == 0 {
                        g.2 = true;
                        break;
                    }
                    let room = cap.saturating_sub(g.0.len());
                    g.0.extend_from_slice(&buf[..n.min(room)]);
                    g.1 |= n > room;
                }
            });
            kept
        };
        let out = child.stdout.take().map(|s| read(Box::new(s)));
        let err = child.stderr.take().map(|s| read(Box::new(s)));
        let deadline = Instant::now() + timeout;
        let mut output_held_open = false;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() >= deadline {
                // The command itself first (runc cannot pass SIGKILL on), then runc.
                let pid = std::fs::read_to_string(&pid_file)
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok());
                output_held_open =
                    pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists());
                for p in pid.into_iter().chain([child.id() as i32]) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&pid_file);
        let until = Instant::now() + Duration::from_secs(1);
        let collect = |kept: Option<Kept>| {
            let Some(kept) = kept else {
                return (Vec::new(), false);
            };
            loop {
                let mut g = kept.lock().unwrap_or_else(|e| e.into_inner());
                if g.2 || Instant::now() >= until {
                    return (std::mem::take(&mut g.0), g.1);
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let ((stdout, more_out), (stderr, more_err)) = (collect(out), collect(err));
        let exit_code = status.map(|st| {
            use std::os::unix::process::ExitStatusExt;
            st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
        });
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
            truncated: more_out || more_err,
            output_held_open,
        })
    }
}
