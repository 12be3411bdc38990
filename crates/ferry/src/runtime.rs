//! runc, OCI bundles, root filesystems and container network namespaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use orchestrator_shim::api::ContainerSpec;
use serde::Deserialize;
use serde_json::json;

use crate::util::{ip, run, run_quiet, run_with_stdin, short_hash};

/// Drives one runc state root (one per agent, so the same container name can exist on two
/// hosts during a migration).
#[derive(Debug, Clone)]
pub struct Runc {
    bin: String,
    root: PathBuf,
    criu_frontend: Option<CriuFrontend>,
    bound: Bound,
    /// The host whose containers' cgroups ([`cgroup_path`]) [`Runc::delete_force`] empties.
    host: Option<String>,
}

/// How long a runc command that names no deadline may run (a `state`, `delete`, `run`).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// What bounds a runc command (with CRIU under it): a deadline, and a flag that cancels it.
/// A command past either is killed with its whole process group (runc, `ferry-criu`, CRIU).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    /// Kill the command at this instant ([`COMMAND_DEADLINE`] from its start if `None`).
    pub deadline: Option<Instant>,
    /// Kill the command as soon as this is set.
    pub cancel: Option<Arc<AtomicBool>>,
    /// What the deadline is, for the error (e.g. "the dump deadline (60 s)").
    pub what: &'static str,
}

impl Bound {
    /// A deadline `d` from now named `what`, cancelled by `cancel`.
    pub fn new(d: Duration, what: &'static str, cancel: Option<Arc<AtomicBool>>) -> Self {
        Bound {
            deadline: Some(Instant::now() + d),
            cancel,
            what,
        }
    }
}

/// `ferry-criu` in front of the real CRIU (see criu-sys's `ferry-criu` binary): answers runc's
/// version query without starting CRIU a second time inside the freeze.
#[derive(Debug, Clone)]
pub struct CriuFrontend {
    /// The `ferry-criu` binary.
    pub frontend: PathBuf,
    /// The real CRIU.
    pub real: PathBuf,
    /// Its version, as verified at agent start.
    pub version: String,
}

/// A command started in a process group of its own (see `Runc::spawn_group`).
struct Started {
    pgid: i32,
    rx: std::sync::mpsc::Receiver<std::io::Result<ExitStatus>>,
    waiter: std::thread::JoinHandle<()>,
    since: Instant,
}

/// How long a command whose gate stays closed may take to fail and clean up after itself.
const GATE_CLOSED_GRACE: Duration = Duration::from_secs(5);

/// A runc checkpoint or restore started ahead, its CRIU waiting at a gate
/// ([`criu_sys::swrk_proxy::GATE_ENV`]). [`Prestarted::go`] lets CRIU run and waits for the
/// command; dropping it closes the gate instead: `ferry-criu` exits without starting CRIU,
/// runc fails and removes what it created (the command is killed if it takes longer than
/// [`GATE_CLOSED_GRACE`]). [`Prestarted::cancel`] does the same and waits for the end.
pub struct Prestarted {
    runc: Runc,
    op: &'static str,
    name: String,
    started: Option<Started>,
    gate: Option<std::os::unix::net::UnixListener>,
    /// CRIU's connection, waiting at the gate ([`Prestarted::reach_gate`]).
    at_gate: Option<std::os::unix::net::UnixStream>,
    gate_path: PathBuf,
    criu_log: Option<PathBuf>,
}

impl std::fmt::Debug for Prestarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prestarted")
            .field("op", &self.op)
            .field("name", &self.name)
            .field("gate", &self.gate_path)
            .finish()
    }
}

impl Prestarted {
    /// Lets CRIU run and waits for the command, bounded by `bound` (its deadline counts from
    /// now on, not from the start ahead). Fails as the plain command would, and also when runc
    /// ended before it reached the gate.
    pub fn go(self, bound: Bound) -> Result<()> {
        self.go_until_criu_done(bound)?.wait()
    }

    /// Lets CRIU run and returns as soon as CRIU has answered runc with success (`ferry-criu`
    /// says so through the gate, [`criu_sys::swrk_proxy::GATE_DONE`]), or else once the command
    /// has ended: the images are complete, or the restored container runs. runc and CRIU may
    /// still be exiting (a few milliseconds): [`Finishing::wait`] waits for them and fails as
    /// the plain command would; call it before anything depends on runc's end.
    pub fn go_until_criu_done(mut self, bound: Bound) -> Result<Finishing> {
        use std::io::Write;
        let (op, name) = (self.op, self.name.clone());
        let conn = match self.at_gate.take() {
            Some(c) => Ok(c),
            None => self.accept_at_gate(&bound),
        };
        let opened = conn.and_then(|mut c| {
            c.write_all(&[criu_sys::swrk_proxy::GATE_OPEN])
                .with_context(|| format!("opening the CRIU gate of runc {op} of {name:?}"))?;
            Ok(c)
        });
        let _ = std::fs::remove_file(&self.gate_path);
        drop(self.gate.take());
        let started = self.started.take().context("a started command")?;
        let conn = match opened {
            Ok(c) => c,
            Err(e) => {
                self.started = Some(started);
                return Err(e);
            }
        };
        tracing::info!(op, container = %name, ahead_ms = crate::util::ms(started.since.elapsed()),
            "CRIU let through its gate (runc started ahead)");
        let t = Instant::now();
        let criu_done = wait_for_criu_done(conn, &bound);
        if criu_done {
            tracing::debug!(op, container = %name, criu_ms = crate::util::ms(t.elapsed()),
                "CRIU answered with success; runc still exiting");
        }
        let mut f = Finishing {
            runc: self.runc.clone(),
            op,
            name,
            started: Some(started),
            criu_log: self.criu_log.clone(),
            bound,
        };
        if !criu_done {
            // No word from CRIU (it failed, or replaced ferry-criu): runc's end is the answer.
            f.wait_now()?;
        }
        Ok(f)
    }

    /// Waits, bounded by `bound`, until CRIU waits at the gate (runc has done its own work
    /// and started `ferry-criu`), without letting it through: called before a freeze, so that
    /// [`Self::go`] only opens the gate. Fails as [`Self::go`] would.
    pub fn reach_gate(&mut self, bound: &Bound) -> Result<()> {
        if self.at_gate.is_none() {
            let c = self.accept_at_gate(bound)?;
            self.at_gate = Some(c);
        }
        Ok(())
    }

    /// CRIU's connection at the gate, once `ferry-criu` has made it.
    fn accept_at_gate(&mut self, bound: &Bound) -> Result<std::os::unix::net::UnixStream> {
        let (op, name) = (self.op, self.name.clone());
        let gate = self.gate.as_ref().context("a gate")?;
        let started = self.started.as_ref().context("a started command")?;
        let deadline = bound
            .deadline
            .unwrap_or_else(|| Instant::now() + COMMAND_DEADLINE);
        loop {
            match gate.accept() {
                Ok((conn, _)) => return Ok(conn),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context(format!("waiting at the CRIU gate of runc {op} of {name:?}")))
                }
            }
            // runc may have failed before it reached the gate: its error is the answer.
            match started.rx.try_recv() {
                Ok(r) => {
                    let _ = std::fs::remove_file(&self.gate_path);
                    let status = r.with_context(|| format!("waiting for runc {op} of {name:?}"))?;
                    self.runc
                        .check_status(op, &name, status, self.criu_log.as_deref())?;
                    bail!("runc {op} of container {name:?} ended before CRIU ran");
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    bail!("runc {op} of {name:?}: lost track of the command")
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "runc {op} of container {name:?} did not reach its CRIU gate within {}",
                    bound.what
                );
            }
            if bound
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
            {
                bail!("runc {op} of container {name:?} was cancelled");
            }
            std::thread::sleep(Duration::from_micros(250));
        }
    }

    /// Closes the gate and waits until the command has ended (killed after
    /// [`GATE_CLOSED_GRACE`]): runc then holds nothing of the container any more.
    pub fn cancel(mut self) {
        self.close();
    }

    fn close(&mut self) {
        drop(self.at_gate.take());
        drop(self.gate.take());
        let _ = std::fs::remove_file(&self.gate_path);
        if let Some(s) = self.started.take() {
            let bound = Bound::new(GATE_CLOSED_GRACE, "the grace after its gate closed", None);
            let _ = self.runc.wait_bounded(self.op, &self.name, s, &bound);
        }
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        drop(self.at_gate.take());
        drop(self.gate.take());
        let _ = std::fs::remove_file(&self.gate_path);
        if let Some(s) = self.started.take() {
            let bound = Bound::new(GATE_CLOSED_GRACE, "the grace after its gate closed", None);
            self.runc.reap_in_background(self.op, &self.name, s, bound);
        }
    }
}

/// How often [`wait_for_criu_done`] looks at its bound while CRIU runs.
const CRIU_DONE_POLL: Duration = Duration::from_millis(20);

/// Reads the gate connection `conn` until `ferry-criu` reports CRIU's success
/// ([`criu_sys::swrk_proxy::GATE_DONE`], true) or closes it, or `bound` runs out (false).
fn wait_for_criu_done(mut conn: std::os::unix::net::UnixStream, bound: &Bound) -> bool {
    use std::io::Read;
    if conn.set_read_timeout(Some(CRIU_DONE_POLL)).is_err() {
        return false;
    }
    let deadline = bound
        .deadline
        .unwrap_or_else(|| Instant::now() + COMMAND_DEADLINE);
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b) {
            Ok(1) => return b[0] == criu_sys::swrk_proxy::GATE_DONE,
            Ok(_) => return false,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
        let cancelled = bound
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst));
        if cancelled || Instant::now() >= deadline {
            return false;
        }
    }
}

/// A runc checkpoint or restore started ahead whose CRIU has answered with success while runc
/// may still be exiting ([`Prestarted::go_until_criu_done`]). [`Finishing::wait`] waits for
/// it; dropped without a wait, it is waited for on a thread of its own.
pub struct Finishing {
    runc: Runc,
    op: &'static str,
    name: String,
    started: Option<Started>,
    criu_log: Option<PathBuf>,
    bound: Bound,
}

impl std::fmt::Debug for Finishing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finishing")
            .field("op", &self.op)
            .field("name", &self.name)
            .field("ended", &self.started.is_none())
            .finish()
    }
}

impl Finishing {
    /// Waits for runc (bounded as the command was) and fails as the plain command would.
    pub fn wait(mut self) -> Result<()> {
        self.wait_now()
    }

    fn wait_now(&mut self) -> Result<()> {
        let Some(started) = self.started.take() else {
            return Ok(());
        };
        let status = self
            .runc
            .wait_bounded(self.op, &self.name, started, &self.bound)?;
        self.runc
            .check_status(self.op, &self.name, status, self.criu_log.as_deref())
    }
}

impl Drop for Finishing {
    fn drop(&mut self) {
        if let Some(s) = self.started.take() {
            self.runc
                .reap_in_background(self.op, &self.name, s, self.bound.clone());
        }
    }
}

/// `runc state` output.
#[derive(Debug, Clone, Deserialize)]
pub struct RuncState {
    /// `running`, `paused`, `stopped`, `created`.
    pub status: String,
    /// Init pid.
    pub pid: u32,
}

impl Runc {
    /// runc's state directory (`--root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A runc using state root `root`.
    pub fn new(bin: &str, root: PathBuf) -> Self {
        Runc {
            bin: bin.into(),
            root,
            criu_frontend: None,
            bound: Bound::default(),
            host: None,
        }
    }

    /// This runc, whose [`Runc::delete_force`] also kills what is left in the cgroups of host
    /// `host`'s containers.
    pub fn for_host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }

    /// This runc with its commands bounded by `b` (see [`Bound`]).
    pub fn bounded(&self, b: Bound) -> Self {
        let mut r = self.clone();
        r.bound = b;
        r
    }

    /// Uses `f` as CRIU for checkpoint and restore.
    pub fn with_criu_frontend(mut self, f: CriuFrontend) -> Self {
        self.criu_frontend = Some(f);
        self
    }

    /// Whether `ferry-criu` stands in front of CRIU (needed to start commands ahead).
    pub fn has_criu_frontend(&self) -> bool {
        self.criu_frontend.is_some()
    }

    fn log_path(&self, op: &str, name: &str) -> PathBuf {
        self.root.join(format!("{name}.{op}.log"))
    }

    fn cmd(&self, op: &str, name: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        c.arg("--log").arg(self.log_path(op, name));
        if let Some(f) = &self.criu_frontend {
            c.arg("--criu").arg(&f.frontend);
            c.env("FERRY_CRIU_REAL", &f.real)
                .env("FERRY_CRIU_VERSION", &f.version);
        }
        // Containers inherit runc's stdio: no host files and no pipes we would wait on (CRIU
        // can dump /dev/null but not host files). runc's own errors go to its --log file.
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }

    /// Runs a runc command; on failure the error quotes runc's log and, when given, CRIU's.
    fn run(&self, op: &str, name: &str, c: Command, criu_log: Option<&Path>) -> Result<()> {
        let _ = std::fs::create_dir_all(&self.root);
        let _ = std::fs::remove_file(self.log_path(op, name));
        let status = self.run_bounded(op, name, c)?;
        self.check_status(op, name, status, criu_log)
    }

    /// An error quoting runc's log and, when given, CRIU's, unless `status` is a success.
    fn check_status(
        &self,
        op: &str,
        name: &str,
        status: ExitStatus,
        criu_log: Option<&Path>,
    ) -> Result<()> {
        if !status.success() {
            let runc_log = std::fs::read_to_string(self.log_path(op, name)).unwrap_or_default();
            let mut excerpt: Vec<String> = runc_log
                .lines()
                .filter(|l| l.contains("level=error") || l.contains("\"level\":\"error\""))
                .map(|l| l.chars().take(400).collect())
                .collect();
            excerpt = excerpt.split_off(excerpt.len().saturating_sub(2));
            let mut explained = None;
            if let Some(p) = criu_log {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                explained = crate::inspect::explain_criu_log(Path::new("/proc"), &text);
                let errs: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
                if !errs.is_empty() {
                    excerpt.push(format!(
                        "CRIU ({}): {}",
                        p.display(),
                        errs[errs.len().saturating_sub(3)..].join(" | ")
                    ));
                }
            }
            if let Some(why) = explained {
                bail!(
                    "{why} (runc {op} of container {name:?} failed ({status}): {})",
                    excerpt.join(" | ")
                );
            }
            bail!(
                "runc {op} of container {name:?} failed ({status}): {}",
                excerpt.join(" | ")
            );
        }
        Ok(())
    }

    /// Runs `c` in a process group of its own until it ends, the deadline passes or the cancel
    /// flag is set; then the group is killed (SIGKILL) and the command abandoned to a thread that
    /// reaps it (a process in uninterruptible sleep dies when it wakes).
    fn run_bounded(&self, op: &str, name: &str, c: Command) -> Result<ExitStatus> {
        let started = self.spawn_group(op, c)?;
        self.wait_bounded(op, name, started, &self.bound)
    }

    /// Starts `c` in a process group of its own, with a thread that reaps it.
    fn spawn_group(&self, op: &str, mut c: Command) -> Result<Started> {
        use std::os::unix::process::CommandExt;
        c.process_group(0);
        let mut child = c.spawn().with_context(|| {
            format!(
                "could not start {} for `{op}`: install runc (scripts/setup.sh)",
                self.bin
            )
        })?;
        let pgid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        Ok(Started {
            pgid,
            rx,
            waiter,
            since: Instant::now(),
        })
    }

    /// Waits for a command [started](Self::spawn_group) until it ends or `bound` stops it
    /// (a deadline counted from the command's start when `bound` names none).
    /// [`Self::wait_bounded`] on a thread of its own, its outcome dropped: for a drop, which
    /// must not block.
    fn reap_in_background(&self, op: &'static str, name: &str, s: Started, bound: Bound) {
        let (runc, name) = (self.clone(), name.to_string());
        std::thread::spawn(move || {
            let _ = runc.wait_bounded(op, &name, s, &bound);
        });
    }

    fn wait_bounded(&self, op: &str, name: &str, s: Started, bound: &Bound) -> Result<ExitStatus> {
        let deadline = bound.deadline.unwrap_or_else(|| s.since + COMMAND_DEADLINE);
        let what = if bound.deadline.is_some() {
            bound.what
        } else {
            "the command deadline"
        };
        let from = if bound.deadline.is_some() {
            Instant::now()
        } else {
            s.since
        };
        let why = loop {
            let now = Instant::now();
            if now >= deadline {
                break format!(
                    "did not finish within {what} ({:.1} s)",
                    deadline.saturating_duration_since(from).as_secs_f64()
                );
            }
            if bound
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
            {
                break "was cancelled".to_string();
            }
            // Short steps only to notice a cancel; an exit is noticed at once.
            match s
                .rx
                .recv_timeout((deadline - now).min(Duration::from_millis(20)))
            {
                Ok(r) => {
                    let _ = s.waiter.join();
                    return r.with_context(|| format!("waiting for runc {op} of {name:?}"));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("runc {op} of {name:?}: lost track of the command")
                }
            }
        };
        // The group is runc's: runc, ferry-criu and CRIU, never the container's tasks (they
        // keep their own groups).
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(s.pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
        tracing::warn!(op, container = name, pgid = s.pgid, reason = %why, "runc command killed");
        bail!(
            "runc {op} of container {name:?} {why}; it was killed (process group {})",
            s.pgid
        )
    }

    /// Starts `c` now with CRIU held at a gate at `gate` until [`Prestarted::go`]: runc's own
    /// start-up (and `ferry-criu`'s) happens before the frozen window, CRIU's work in it.
    fn prestart(
        &self,
        op: &'static str,
        name: &str,
        mut c: Command,
        criu_log: Option<PathBuf>,
        gate: &Path,
    ) -> Result<Prestarted> {
        if self.criu_frontend.is_none() {
            bail!("starting runc ahead needs ferry-criu in front of CRIU (criu_frontend in the agent config)");
        }
        let _ = std::fs::create_dir_all(&self.root);
        let _ = std::fs::remove_file(self.log_path(op, name));
        let _ = std::fs::remove_file(gate);
        let listener = std::os::unix::net::UnixListener::bind(gate)
            .with_context(|| format!("listening on the CRIU gate {}", gate.display()))?;
        listener.set_nonblocking(true)?;
        c.env(criu_sys::swrk_proxy::GATE_ENV, gate);
        let started = self.spawn_group(op, c)?;
        Ok(Prestarted {
            runc: self.clone(),
            op,
            name: name.to_string(),
            started: Some(started),
            gate: Some(listener),
            at_gate: None,
            gate_path: gate.to_path_buf(),
            criu_log,
        })
    }

    /// Starts a container detached.
    pub fn start(&self, name: &str, bundle: &Path) -> Result<()> {
        let mut c = self.cmd("run", name);
        c.args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(name);
        self.run("run", name, c, None)
    }

    /// Freezes and dumps with CRIU; the container stops existing as a process.
    ///
    /// The container is left in place (`--leave-running`, inside a cgroup the caller froze):
    /// until the destination has committed, a rollback only thaws it, which cannot fail.
    pub fn checkpoint(&self, name: &str, images: &Path, work: &Path) -> Result<()> {
        let c = self.checkpoint_cmd(name, images, work, None);
        self.run("checkpoint", name, c, Some(&work.join("dump.log")))
    }

    /// Checkpoints with the memory pages sent to the page-server socket `ps_socket` (through
    /// `ferry-criu`, which hands CRIU a connection to it) and the container left in place,
    /// frozen, so that the source can thaw it if the migration rolls back.
    ///
    /// With `lazy` the dump is lazy ([`criu_sys::swrk_proxy::relay_dump`]): CRIU writes every
    /// image but the contents of lazy memory, then serves those pages from the frozen tree over
    /// the connection to `ps_socket` until the agent closes it.
    pub fn checkpoint_relayed(
        &self,
        name: &str,
        images: &Path,
        work: &Path,
        ps_socket: &Path,
        lazy: bool,
    ) -> Result<()> {
        if self.criu_frontend.is_none() {
            bail!("pre-copy needs ferry-criu in front of CRIU (criu_frontend in the agent config)");
        }
        let c = self.checkpoint_cmd(name, images, work, Some((ps_socket, lazy)));
        self.run("checkpoint", name, c, Some(&work.join("dump.log")))
    }

    /// [`Self::checkpoint`] (`relay: None`) or [`Self::checkpoint_relayed`] started ahead, with
    /// CRIU held at the gate `gate` until [`Prestarted::go`]: start it before the freeze, let it
    /// go once the container is frozen. The images directory must stay the same directory
    /// from here on (runc holds it open and writes `descriptors.json` into it now).
    pub fn prestart_checkpoint(
        &self,
        name: &str,
        images: &Path,
        work: &Path,
        relay: Option<(&Path, bool)>,
        gate: &Path,
    ) -> Result<Prestarted> {
        let c = self.checkpoint_cmd(name, images, work, relay);
        self.prestart("checkpoint", name, c, Some(work.join("dump.log")), gate)
    }

    fn checkpoint_cmd(
        &self,
        name: &str,
        images: &Path,
        work: &Path,
        relay: Option<(&Path, bool)>,
    ) -> Command {
        let mut c = self.cmd("checkpoint", name);
        c.args(["checkpoint", "--tcp-established", "--leave-running"]);
        if let Some((ps_socket, lazy)) = relay {
            c.env(criu_sys::swrk_proxy::PAGE_SERVER_SOCKET_ENV, ps_socket);
            if lazy {
                c.env(
                    criu_sys::swrk_proxy::LAZY_DUMP_CONFIG_ENV,
                    work.join("lazy-dump.conf"),
                );
            }
            // runc sends a page-server address only with a port; ferry-criu replaces it with
            // the socket above.
            c.args(["--page-server", "127.0.0.1:1"]);
        }
        c.arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg(name);
        c
    }

    /// Restores from images, detached; `lazy`: lazy memory comes from the `criu lazy-pages`
    /// daemon listening in `work` (see `agent::fill`).
    pub fn restore(
        &self,
        name: &str,
        bundle: &Path,
        images: &Path,
        work: &Path,
        lazy: bool,
    ) -> Result<()> {
        let c = self.restore_cmd(name, bundle, images, work, lazy);
        self.run("restore", name, c, Some(&work.join("restore.log")))
    }

    /// [`Self::restore`] started ahead, with CRIU held at the gate `gate` until
    /// [`Prestarted::go`]: start it once the bundle is ready, let it go once the images are.
    /// runc reads `descriptors.json` from `images` now (it must be there, and the same as the
    /// one the images bring) and holds `images` open: it must stay the same directory.
    pub fn prestart_restore(
        &self,
        name: &str,
        bundle: &Path,
        images: &Path,
        work: &Path,
        lazy: bool,
        gate: &Path,
    ) -> Result<Prestarted> {
        let c = self.restore_cmd(name, bundle, images, work, lazy);
        self.prestart("restore", name, c, Some(work.join("restore.log")), gate)
    }

    fn restore_cmd(
        &self,
        name: &str,
        bundle: &Path,
        images: &Path,
        work: &Path,
        lazy: bool,
    ) -> Command {
        let mut c = self.cmd("restore", name);
        c.arg("restore");
        if lazy {
            c.arg("--lazy-pages");
        }
        c.args(["--detach", "--tcp-established", "--bundle"])
            .arg(bundle)
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg(name);
        c
    }

    /// Kills and deletes a container; absent is fine. With a host ([`Runc::for_host`]), also
    /// kills whatever runc no longer knows but still runs in the container's cgroup (the
    /// processes of a restore that was killed halfway).
    pub fn delete_force(&self, name: &str) {
        let mut c = self.cmd("delete", name);
        c.args(["delete", "--force", name]);
        let _ = c.status();
        if let Some(host) = &self.host {
            kill_cgroup_procs(&cgroup_path(host, name));
        }
    }

    /// The container's state, `None` if runc does not know it.
    pub fn state(&self, name: &str) -> Option<RuncState> {
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["state", name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Deletes every container of this root (lab teardown).
    pub fn delete_all(&self) {
        #[derive(Deserialize)]
        struct Item {
            id: String,
        }
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["list", "--format", "json"])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            let items: Vec<Item> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for i in items {
                self.delete_force(&i.id);
            }
        }
    }

    /// `runc --version` works.
    pub fn available(&self) -> Result<String> {
        let v = run(&self.bin, ["--version"])?;
        Ok(v.lines().next().unwrap_or_default().to_string())
    }
}

/// Where a container lives on one host.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The bundle directory (config.json, rootfs/).
    pub bundle: PathBuf,
    /// Its network namespace's name.
    pub netns: String,
    /// Host side of its veth pair.
    pub veth: String,
    /// An empty directory of the host, outside every container, bound read-only over masked
    /// directories (outside: a container cannot turn it into a link to somewhere else).
    pub empty: PathBuf,
    /// Its cgroup path under every controller ([`cgroup_path`]).
    pub cgroup: String,
}

impl Layout {
    /// Layout of `name` under `state_dir` on host `host`.
    pub fn new(state_dir: &Path, host: &str, name: &str) -> Self {
        Layout {
            bundle: state_dir.join("containers").join(name),
            netns: format!("{}{host}-c-{name}", crate::lab::NS_PREFIX),
            veth: format!("fv{}", short_hash(&format!("{host}/{name}"))),
            empty: state_dir.join("empty"),
            cgroup: cgroup_path(host, name),
        }
    }

    /// The root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    /// CRIU's configuration file for this container (`org.criu.config`).
    pub fn criu_conf(&self) -> PathBuf {
        self.bundle.join("criu.conf")
    }

    /// Where a restore here finds the container's `/dev/shm` when the dump left it out: a
    /// tmpfs of this host ([`mount_shm`]).
    pub fn shm(&self) -> PathBuf {
        self.bundle.join("shm")
    }

    /// The directory whose changes move with the container: its own upper layer when it runs
    /// from an image (the base moves through the image store), else its whole root.
    pub fn own_fs(&self, spec: &ContainerSpec) -> PathBuf {
        if spec.image.is_some() {
            self.upper()
        } else {
            self.rootfs()
        }
    }

    /// The container's own layer, when its root is an overlay on an image.
    pub fn upper(&self) -> PathBuf {
        self.bundle.join("upper")
    }

    /// Overlayfs's work directory (same filesystem as the upper layer).
    pub fn overlay_work(&self) -> PathBuf {
        self.bundle.join("overlay-work")
    }

    /// `/run/netns/...` path of the namespace.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

/// Creates the container's network namespace on this host: veth into the overlay bridge, the
/// container's IP and MAC, and its IPv6 address if it has one (else IPv6 off). A namespace
/// that waits for a restore must send nothing: with IPv6 on, the kernel's own chatter is
/// switched off (no duplicate address detection, no router solicitations, no autoconfigured
/// addresses) and multicast listener reports are dropped (the overlay floods multicast to
/// every host anyway), so no frame with the container's MAC leaves before the container does.
pub fn create_netns(l: &Layout, spec: &ContainerSpec, bridge: &str) -> Result<()> {
    create_netns_in(None, l, spec, bridge)
}

/// Like [`create_netns`], with the host side in namespace `host_ns` instead of the caller's.
pub fn create_netns_in(
    host_ns: Option<&str>,
    l: &Layout,
    spec: &ContainerSpec,
    bridge: &str,
) -> Result<()> {
    let ns = l.netns.as_str();
    let host_ip = |args: &[&str]| -> Result<String> {
        match host_ns {
            Some(h) => ip(["-n", h].iter().chain(args.iter())),
            None => ip(args),
        }
    };
    if let Some(h) = host_ns {
        run_quiet("ip", ["-n", h, "link", "del", l.veth.as_str()]);
    }
    delete_netns(l);
    ip(["netns", "add", ns])?;
    let r = (|| -> Result<()> {
        // One `sysctl` for all settings: each process costs milliseconds.
        let sysctl = |settings: Vec<String>| {
            let mut args = vec!["netns", "exec", ns, "sysctl", "-qw"];
            args.extend(settings.iter().map(String::as_str));
            run("ip", &args)
        };
        if spec.ipv6.is_some() {
            if !Path::new("/proc/sys/net/ipv6").is_dir() {
                bail!("this host has no IPv6 (the kernel was started with ipv6.disable=1?) and container {} has an IPv6 address", spec.name);
            }
            let settings = [
                "disable_ipv6=0",
                "accept_dad=0",
                "dad_transmits=0",
                "router_solicitations=0",
                "accept_ra=0",
                "autoconf=0",
            ];
            sysctl(
                ["all", "default"]
                    .iter()
                    .flat_map(|k| {
                        settings
                            .iter()
                            .map(move |s| format!("net.ipv6.conf.{k}.{s}"))
                    })
                    .collect(),
            )?;
            // Multicast listener reports (MLDv1 130-132, MLDv2 143) and router solicitations.
            let rules: String = std::iter::once("*raw\n".to_string())
                .chain(
                    ["130", "131", "132", "133", "143"]
                        .iter()
                        .map(|t| format!("-A OUTPUT -p ipv6-icmp --icmpv6-type {t} -j DROP\n")),
                )
                .chain(std::iter::once("COMMIT\n".to_string()))
                .collect();
            run_with_stdin(
                "ip",
                &["netns", "exec", ns, "ip6tables-restore", "-w", "--noflush"],
                rules.as_bytes(),
            )?;
        } else {
            sysctl(
                ["all", "default"]
                    .iter()
                    .map(|k| format!("net.ipv6.conf.{k}.disable_ipv6=1"))
                    .collect(),
            )?;
        }
        ip(["-n", ns, "link", "set", "lo", "up"])?;
        host_ip(&[
            "link", "add", &l.veth, "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ])?;
        host_ip(&["link", "set", &l.veth, "master", bridge, "up"])?;
        ip([
            "-n", ns, "link", "set", "eth0", "address", &spec.mac, "mtu", "1450",
        ])?;
        ip([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/{}", spec.ip, spec.prefix_len),
            "dev",
            "eth0",
        ])?;
        if let Some(v6) = spec.ipv6 {
            ip([
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/{}", orchestrator_shim::api::OVERLAY6_PREFIX_LEN),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    })();
    if r.is_err() {
        delete_netns(l);
    }
    r.with_context(|| {
        format!(
            "preparing network namespace {ns} for {} ({})",
            spec.name, spec.ip
        )
    })
}

/// Takes the host side of the container's veth down (or up again). Down, nothing the
/// container's kernel sockets send leaves the host: after a dump that leaves the container in
/// place, its TCP sockets are live again, and a single segment from them (a window probe with a
/// newer timestamp) would make the client's TCP drop the restored copy's segments (PAWS).
pub fn set_veth(l: &Layout, up: bool) -> Result<()> {
    orchestrator_shim::sdn::set_link_up(&l.veth, up)
        .with_context(|| format!("setting {} {}", l.veth, if up { "up" } else { "down" }))
}

/// Removes the container's namespace and veth; absent is fine.
pub fn delete_netns(l: &Layout) {
    run_quiet("ip", ["link", "del", l.veth.as_str()]);
    run_quiet("ip", ["netns", "del", l.netns.as_str()]);
}

/// CFS period of a container's CPU limit, µs (Docker's).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Writes the OCI config for this host.
/// `criu_base`: CRIU options for this container, written with the mounts a dump leaves to the
/// restore's host ([`criu_conf_text`]) to its own configuration file, which runc hands to
/// CRIU (`org.criu.config`); `None` leaves CRIU's defaults (the hand-made baseline uses that).
pub fn write_config(
    l: &Layout,
    spec: &ContainerSpec,
    host: &str,
    criu_base: Option<&str>,
) -> Result<()> {
    let criu_conf = match criu_base {
        Some(base) => {
            std::fs::create_dir_all(&l.bundle)?;
            let path = l.criu_conf();
            std::fs::write(&path, criu_conf_text(l, base, false))
                .with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    let criu_conf = criu_conf.as_deref();
    let p = &spec.process;
    let caps = &p.capabilities;
    let mut env = p.env.clone();
    env.push(format!("FERRY_CONTAINER={}", spec.name));
    // Docker 25+'s open-file limits: a soft limit that programs closing every descriptor can
    // walk, a hard one that lets servers raise it (no higher than the agent's own, which the
    // container's init cannot exceed without CAP_SYS_RESOURCE).
    let nofile_hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard.min(524_288))
        .max(1024);
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(m) = spec.resources.memory_bytes {
        resources["memory"] = json!({"limit": m});
    }
    if let Some(c) = spec.resources.cpu_millis {
        resources["cpu"] = json!({"quota": c * CPU_PERIOD_US / 1000, "period": CPU_PERIOD_US});
    }
    let mut annotations = serde_json::Map::new();
    if let Some(c) = criu_conf {
        annotations.insert("org.criu.config".into(), json!(c));
    }
    // /dev lives in the root filesystem (runc creates the device nodes there) rather than on a
    // tmpfs, and directories are masked with a read-only bind of an empty directory of the root
    // filesystem rather than a tmpfs: CRIU archives every tmpfs with tar at dump and unpacks it
    // at restore, about 5 ms each, all of it inside the freeze.
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    let empty = &l.empty;
    std::fs::create_dir_all(empty).with_context(|| format!("creating {}", empty.display()))?;
    for dir in MASKED_DIRS.iter().filter(|d| Path::new(d).is_dir()) {
        mounts.push(json!({"destination": dir, "type": "bind", "source": empty,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    let cfg = json!({
        "ociVersion": "1.0.2",
        "annotations": annotations,
        "process": {
            "terminal": false,
            "user": {"uid": p.uid, "gid": p.gid, "additionalGids": p.additional_gids},
            "args": spec.args,
            "env": env,
            "cwd": p.cwd,
            // As Docker: the set bounds every process; a non-root user's programs get none
            // of it unless a file grants them (no ambient set).
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_hard, "soft": 1024}],
            "noNewPrivileges": false
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.name,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroup_path(host, &spec.name),
            "resources": resources,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": l.netns_path()}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/scsi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"]
        }
    });
    std::fs::create_dir_all(&l.bundle)?;
    std::fs::write(
        l.bundle.join("config.json"),
        serde_json::to_vec_pretty(&cfg)?,
    )
    .with_context(|| format!("writing {}", l.bundle.join("config.json").display()))
}

/// Directories runc hides from containers with a read-only tmpfs (`maskedPaths`; binds inside
/// /proc are refused). A dump leaves them out (`external`) and a restore binds the host's empty
/// directory there: otherwise CRIU archives each with tar at dump and unpacks it at restore,
/// about 3 ms each way, all of it in the freeze.
const MASKED_TMPFS: [&str; 2] = ["/proc/acpi", "/proc/scsi"];

/// The key under which a dump leaves an empty `/dev/shm` to the restore's host.
const SHM_KEY: &str = "ferry-shm";

/// The `external` key of a masked directory.
fn masked_key(dir: &str) -> String {
    format!("ferry-masked{}", dir.replace('/', "-"))
}

/// The text of a container's CRIU configuration file: `base`, then the mounts a dump leaves out
/// (`external mnt[MOUNTPOINT]:KEY`) and where a restore on this host finds them
/// (`external mnt[KEY]:PATH`; CRIU ignores a mapping no mount uses). With `shm_empty` (true
/// only while the container is frozen and its `/dev/shm` holds nothing, [`empty_shm`]) the
/// dump leaves `/dev/shm` out too, to be restored as this host's [`Layout::shm`] tmpfs.
pub fn criu_conf_text(l: &Layout, base: &str, shm_empty: bool) -> String {
    let mut t = base.to_string();
    if !t.is_empty() && !t.ends_with('\n') {
        t.push('\n');
    }
    for dir in MASKED_TMPFS {
        let key = masked_key(dir);
        t.push_str(&format!("external mnt[{dir}]:{key}\n"));
        t.push_str(&format!("external mnt[{key}]:{}\n", l.empty.display()));
    }
    t.push_str(&format!("external mnt[{SHM_KEY}]:{}\n", l.shm().display()));
    if shm_empty {
        t.push_str(&format!("external mnt[/dev/shm]:{SHM_KEY}\n"));
    }
    t
}

/// Whether the frozen container `name` (runc state under `runc_root`) has a `/dev/shm` that a
/// dump may leave out: one tmpfs mounted there in its mount namespace, and nothing in it. Read
/// beneath the container's root without following its links. Any doubt answers no (CRIU then
/// archives it as usual).
fn empty_shm(runc_root: &Path, name: &str) -> bool {
    let pid = std::fs::read(runc_root.join(name).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["init_process_pid"].as_u64());
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return false;
    };
    let Ok(mountinfo) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return false;
    };
    let at_shm: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some("/dev/shm"))
        .collect();
    let tmpfs = |l: &str| {
        l.split(" - ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            == Some("tmpfs")
    };
    if at_shm.len() != 1 || !tmpfs(at_shm[0]) {
        return false;
    }
    let Ok(root) = shared_fs::RootDir::open(Path::new(&format!("/proc/{pid}/root"))) else {
        return false;
    };
    let Ok(dir) = root.open_dir("dev/shm") else {
        return false;
    };
    std::fs::read_dir(dir.fd_path()).is_ok_and(|mut entries| entries.next().is_none())
}

/// Rewrites the frozen container's CRIU configuration for its dump ([`criu_conf_text`]), in
/// place (a new file would cost a disk create in the freeze). Returns whether `/dev/shm` is
/// left out.
fn write_dump_conf(l: &Layout, runc_root: &Path, name: &str, base: &str) -> Result<bool> {
    let path = l.criu_conf();
    let mut f = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        // A container made before it had one of its own: CRIU reads the host's.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let shm_empty = empty_shm(runc_root, name);
    f.set_len(0)
        .with_context(|| format!("truncating {}", path.display()))?;
    std::io::Write::write_all(&mut f, criu_conf_text(l, base, shm_empty).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(shm_empty)
}

/// Freezes container `name` for its final dump: its cgroup frozen, its veth down (the copy left
/// in place must stay silent, see [`set_veth`]) and its CRIU configuration rewritten for the
/// dump ([`write_dump_conf`], `criu_base` first). A failure after the freeze thaws it. Returns
/// whether `/dev/shm` is left out of the dump.
pub fn freeze_for_dump(
    host: &str,
    name: &str,
    l: &Layout,
    runc_root: &Path,
    criu_base: &str,
) -> Result<bool> {
    freeze(host, name)?;
    let r = set_veth(l, false).and_then(|()| write_dump_conf(l, runc_root, name, criu_base));
    match &r {
        Ok(shm_left_out) => tracing::info!(container = %name, shm_left_out, "frozen for the dump"),
        Err(_) => thaw(host, name),
    }
    r
}

/// Mounts the tmpfs a restore here binds at the container's `/dev/shm` when its dump left that
/// out: as runc mounts it (1777, 64 MiB, nosuid, nodev, noexec). Idempotent.
pub fn mount_shm(l: &Layout) -> Result<()> {
    let dir = l.shm();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if is_mount_point(&dir) {
        return Ok(());
    }
    nix::mount::mount(
        Some("shm"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dir.display()))
}

/// Directories hidden from containers with a bind mount (runc refuses binds inside /proc, so
/// /proc/acpi and /proc/scsi stay in maskedPaths, on a tmpfs).
const MASKED_DIRS: [&str; 1] = ["/sys/firmware"];

/// Creates, in a new container's root `rootfs`, the mount points of the binds that lie inside
/// other mounts (`sys/firmware` inside sysfs). At the container's start runc finds them inside
/// those mounts; a `runc restore` started ahead creates them in the root itself, so they
/// must exist there from the start: otherwise the destination's root would differ from the
/// source's (see [`root_digest`]). A root whose path to them is not plain directories (a
/// symlink from an image) is left alone.
pub fn make_mount_points(rootfs: &Path) -> Result<()> {
    for dir in MASKED_DIRS {
        let mut p = rootfs.to_path_buf();
        for part in dir.trim_start_matches('/').split('/') {
            p.push(part);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&p)
                        .with_context(|| format!("creating mount point {}", p.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("inspecting {}", p.display())),
            }
        }
    }
    Ok(())
}

/// Whether every mount point [`make_mount_points`] makes is a directory in `rootfs` (a root
/// of a container made before it was: a `runc restore` started ahead would change it).
pub fn has_mount_points(rootfs: &Path) -> bool {
    MASKED_DIRS.iter().all(|dir| {
        let mut p = rootfs.to_path_buf();
        dir.trim_start_matches('/').split('/').all(|part| {
            p.push(part);
            std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
        })
    })
}

/// The digest of a container's root as both ends of a migration see it: without the bind
/// mount points (a `runc restore` started ahead mounts over them, which changes how they
/// look but not what the container sees).
pub fn root_digest(snap: &mut shared_fs::Snapshot) -> String {
    for dir in MASKED_DIRS {
        snap.entries.remove(dir.trim_start_matches('/'));
    }
    snap.digest()
}

/// Builds a busybox-based root filesystem holding Ferry's workload binary and its libraries.
pub fn build_rootfs(rootfs: &Path, workload: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox not found: install busybox-static (scripts/setup.sh)")?;
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "root", "lib", "lib64", "usr/bin",
    ] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    copy_file(busybox, &rootfs.join("bin/busybox"))?;
    for applet in [
        "sh", "cat", "ls", "echo", "sleep", "nc", "ps", "hostname", "ip", "wc", "head",
    ] {
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    copy_file(workload, &rootfs.join("bin/ferry-workload"))?;
    // The workload is dynamically linked against the C library: copy what ldd lists.
    // Resolve libraries the way the container's loader will: without the caller's
    // LD_LIBRARY_PATH (a build tool's, for instance).
    let out = Command::new("ldd")
        .arg(workload)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD")
        .output()
        .context("running ldd: install libc-bin")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            workload.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ldd = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in ldd.lines() {
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            let rel = path.trim_start_matches('/');
            let dst = rootfs.join(rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            copy_file(Path::new(path), &dst)?;
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let real = std::fs::canonicalize(src)?;
    std::fs::copy(&real, dst)
        .with_context(|| format!("copying {} to {}", real.display(), dst.display()))?;
    Ok(())
}

/// Removes the lab's cgroups (`/ferry/...` under every v1 controller and the unified tree),
/// killing first whatever still runs in them.
pub fn remove_cgroups() {
    kill_cgroup_procs("/ferry");
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for e in rd.flatten() {
        let top = e.path().join("ferry");
        if top.is_dir() {
            remove_cgroup_tree(&top);
        }
    }
}

/// How long [`kill_cgroup_procs`] waits for killed processes to leave their cgroup.
const CGROUP_KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Kills every process in cgroup `rel` and below it, under every controller, and waits (at most
/// [`CGROUP_KILL_WAIT`]) until they are gone; returns how many it killed.
///
/// runc forgets a container whose restore it abandoned, or that a crashed agent left half made,
/// but the processes CRIU already created stay in the container's cgroup: the next container of
/// that name would count them as its own (and a dump would try to checkpoint them). Called where
/// a container is discarded and before one is created.
pub fn kill_cgroup_procs(rel: &str) -> usize {
    use nix::sys::signal::{kill, Signal};
    let rel = rel.trim_start_matches('/');
    let mut dirs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            let d = e.path().join(rel);
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    let v2 = PathBuf::from("/sys/fs/cgroup").join(rel);
    if v2.join("cgroup.procs").is_file() {
        dirs.push(v2);
    }
    let pids = |dirs: &[PathBuf]| {
        let mut all = std::collections::BTreeSet::new();
        for d in dirs {
            for f in walkdir_procs(d) {
                if let Ok(text) = std::fs::read_to_string(&f) {
                    all.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
        all
    };
    let found = pids(&dirs);
    if found.is_empty() {
        return 0;
    }
    tracing::warn!(cgroup = rel, pids = ?found, "killing processes left in a container's cgroup");
    let deadline = std::time::Instant::now() + CGROUP_KILL_WAIT;
    loop {
        for &pid in &pids(&dirs) {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        // A frozen process dies only once thawed.
        for d in &dirs {
            for f in walkdir_procs(d) {
                let dir = f.parent().unwrap_or(d);
                let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
                let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
            }
        }
        if pids(&dirs).is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    found.len()
}

/// The `cgroup.procs` files at and below cgroup directory `dir`.
fn walkdir_procs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let f = d.join("cgroup.procs");
        if f.is_file() {
            out.push(f);
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                // Cgroup directories are real directories; never follow a link.
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Every process of the container (host PIDs), from its cgroup.
/// The memory a checkpoint of container `name` carries: the anonymous and shared memory its
/// processes hold (`RssAnon` + `RssShmem`; pages shared between processes count once per
/// process, so this errs on the large side).
pub fn container_memory_bytes(host: &str, name: &str) -> Result<u64> {
    let mut total = 0u64;
    for pid in container_pids(host, name)? {
        // A process that exits meanwhile holds nothing.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        for l in text.lines() {
            if let Some(v) = l
                .strip_prefix("RssAnon:")
                .or_else(|| l.strip_prefix("RssShmem:"))
            {
                let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                total += kib * 1024;
            }
        }
    }
    Ok(total)
}

pub fn container_pids(host: &str, name: &str) -> Result<Vec<i32>> {
    crate::cgroup::Cgroups::host()
        .procs(&cgroup_path(host, name))
        .with_context(|| format!("no cgroup for container {name:?}"))
}

/// The container's cgroup path (`cgroupsPath` in its config).
pub fn cgroup_path(host: &str, name: &str) -> String {
    format!("/ferry/{host}/{name}")
}

/// How often a freeze that caught a process inside `execve` is undone and tried again.
const EXEC_FREEZE_RETRIES: u32 = 50;

/// Freezes container `name`'s cgroup. A freeze that catches a process starting another is
/// undone and tried again after a millisecond (a process that starts programs, through
/// `posix_spawn` or `vfork` and `exec`, is caught there now and then): a thread frozen in a
/// `vfork` waits for its child's `exec` and cannot reach the stop CRIU asks for once CRIU holds
/// the child, and a process frozen inside `execve` holds its credentials lock; either way CRIU
/// waits for its timeout in the freeze and fails ("Unseizable non-zombie N found, state D").
pub fn freeze(host: &str, name: &str) -> Result<()> {
    for attempt in 0.. {
        freeze_once(host, name)?;
        let pids = container_pids(host, name).unwrap_or_default();
        let execing: Vec<i32> = pids.into_iter().filter(|p| spawning(*p)).collect();
        if execing.is_empty() {
            if attempt > 0 {
                tracing::info!(container = %name, attempts = attempt + 1, "frozen while no process starts another");
            }
            return Ok(());
        }
        if attempt >= EXEC_FREEZE_RETRIES {
            tracing::warn!(container = %name, pids = ?execing, "still frozen while starting a process; CRIU may not seize them");
            return Ok(());
        }
        thaw(host, name);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    unreachable!()
}

/// Whether a thread of process `pid` is inside `execve`, `execveat`, `vfork`, `clone` or
/// `clone3` (`/proc/PID/task/TID/syscall`; a process that vanished is not).
fn spawning(pid: i32) -> bool {
    const CALLS: [libc::c_long; 5] = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_vfork,
        libc::SYS_clone,
        libc::SYS_clone3,
    ];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("syscall")).is_ok_and(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<libc::c_long>().ok())
                .is_some_and(|n| CALLS.contains(&n))
        })
    })
}

/// Freezes the container's cgroup and waits until it is frozen ([`crate::cgroup::Cgroups::freeze`]).
///
/// CRIU freezes a running container itself but checks the freezer only every 100 ms; a cgroup
/// that is already frozen when CRIU starts costs no such wait.
fn freeze_once(host: &str, name: &str) -> Result<()> {
    crate::cgroup::Cgroups::host()
        .freeze(&cgroup_path(host, name))
        .with_context(|| format!("freezing container {name:?}"))
}

/// Whether the container's cgroup exists and is not frozen (nor freezing): its processes run.
pub fn runs_thawed(host: &str, name: &str) -> bool {
    crate::cgroup::Cgroups::host().runs_thawed(&cgroup_path(host, name))
}

/// Thaws the container's cgroup (after a failed dump); absent is fine.
pub fn thaw(host: &str, name: &str) {
    crate::cgroup::Cgroups::host().thaw(&cgroup_path(host, name))
}

/// How many CRIU logs an agent keeps in its `logs` directory.
pub const KEPT_LOGS: usize = 40;

/// Moves a CRIU log into `logs/NAME` for later troubleshooting, keeping the newest
/// [`KEPT_LOGS`]. Best effort: logs never fail a migration.
pub fn keep_log(log: &Path, logs: &Path, name: &str) {
    if std::fs::create_dir_all(logs).is_err() {
        return;
    }
    let to = logs.join(name);
    // The work directory is usually a tmpfs and the logs on disk: then a rename cannot move it.
    let moved = std::fs::rename(log, &to).is_ok()
        || (std::fs::copy(log, &to).is_ok() && std::fs::remove_file(log).is_ok());
    if !moved {
        return;
    }
    let Ok(rd) = std::fs::read_dir(logs) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() > KEPT_LOGS {
        files.sort();
        for (_, p) in &files[..files.len() - KEPT_LOGS] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// [`keep_log`] after a CRIU run that went `ok`: then on a thread of its own, so that the
/// caller, in a frozen window, does not wait for the copy to disk (the work directory is
/// usually a tmpfs), the directory listing and the pruning (about 1 ms); after a failure at
/// once, before any cleanup can remove the log.
pub fn keep_log_soon(ok: bool, log: PathBuf, logs: PathBuf, name: String) {
    if !ok {
        keep_log(&log, &logs, &name);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("keep-log".into())
        .spawn(move || keep_log(&log, &logs, &name));
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "CRIU log not kept");
    }
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

/// Mounts the container's root as an overlay: `lower` (an image's materialized tree, read-only,
/// shared) under the container's own upper layer.
pub fn mount_overlay_rootfs(l: &Layout, lower: &Path) -> Result<()> {
    for d in [l.upper(), l.overlay_work(), l.rootfs()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        l.upper().display(),
        l.overlay_work().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &l.rootfs(),
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting the overlay root at {} ({opts})",
            l.rootfs().display()
        )
    })
}

/// Mount points of this mount namespace (`/proc/self/mountinfo`, field 5).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect()
}

/// Whether `path` is a mount point.
fn is_mount_point(path: &Path) -> bool {
    let p = path.to_string_lossy();
    mount_points().iter().any(|m| *m == p)
}

/// Removes a container's bundle, unmounting its overlay root and its `/dev/shm` tmpfs first
/// (removing through the mount would only fill the upper layer with whiteouts and leave the
/// mount behind).
pub fn remove_bundle(l: &Layout) {
    for dir in [l.rootfs(), l.shm()] {
        while is_mount_point(&dir) {
            if let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(path = %dir.display(), error = %e, "unmounting failed");
                return;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&l.bundle);
}

/// Unmounts every mount at or under `dir` (containers' overlay roots), deepest first.
pub fn unmount_under(dir: &Path) {
    let prefix = dir.to_string_lossy().trim_end_matches('/').to_string();
    let mut points: Vec<String> = mount_points()
        .into_iter()
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        if let Err(e) = nix::mount::umount2(Path::new(&p), nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p, error = %e, "unmount failed");
        }
    }
}

/// Whether `dir` lies on a tmpfs.
pub fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Puts `dir` on a tmpfs of its own (mode 0700) unless it already lies on one. CRIU creates and
/// removes a handful of image files per process in every dump and restore, all inside the frozen
/// window; on a disk file system each new file costs about a millisecond here (ext4 looks up
/// recently deleted inodes on create), which made a container of 120 processes spend most of its
/// freeze creating files. A directory that already holds files is left on disk (they would be
/// hidden under the mount). Returns whether `dir` is on a tmpfs now.
pub fn ensure_tmpfs(dir: &Path) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if on_tmpfs(dir) {
        return Ok(true);
    }
    let occupied = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_some();
    if occupied {
        tracing::warn!(dir = %dir.display(), "not empty: left on disk instead of a tmpfs");
        return Ok(false);
    }
    nix::mount::mount(
        Some("ferry-scratch"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dir.display()))?;
    Ok(true)
}

/// Makes moving a process between cgroups cheap: remounts a cgroup hierarchy with
/// `favordynmods` (Linux >= 6.0) unless one already has it. Without it, the first cgroup move
/// after a quiet spell waits for an RCU grace period (the kernel's threadgroup lock is taken
/// for writing): 7-25 ms measured here, paid by CRIU's restore, which moves the restored
/// container into its cgroups while it is frozen. The option is global to the kernel's lock,
/// so one hierarchy is enough; its cost is a slightly slower fork and exit on the host.
/// Returns the mount point remounted, `None` when one already had the option.
pub fn favor_cgroup_moves() -> Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mounts: Vec<CgroupMount> = info.lines().filter_map(CgroupMount::parse).collect();
    if mounts
        .iter()
        .any(|m| m.super_options.iter().any(|o| o == "favordynmods"))
    {
        return Ok(None);
    }
    // The unified hierarchy if there is one, else the first v1 hierarchy.
    let m = mounts
        .iter()
        .find(|m| m.v2)
        .or_else(|| mounts.first())
        .context("no cgroup hierarchy is mounted")?;
    let mut data: Vec<&str> = m
        .super_options
        .iter()
        .map(String::as_str)
        .filter(|o| *o != "rw" && *o != "ro")
        .collect();
    data.push("favordynmods");
    nix::mount::mount(
        None::<&str>,
        m.point.as_str(),
        None::<&str>,
        m.flags | nix::mount::MsFlags::MS_REMOUNT,
        Some(data.join(",").as_str()),
    )
    .with_context(|| {
        format!(
            "remounting {} with favordynmods (needs Linux >= 6.0)",
            m.point
        )
    })?;
    Ok(Some(m.point.clone()))
}

/// A cgroup hierarchy's mount, from a line of mountinfo.
struct CgroupMount {
    point: String,
    v2: bool,
    /// The mount's own flags, which a remount must repeat.
    flags: nix::mount::MsFlags,
    super_options: Vec<String>,
}

impl CgroupMount {
    fn parse(line: &str) -> Option<CgroupMount> {
        use nix::mount::MsFlags;
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split_whitespace().collect();
        let mut fs = fs.split_whitespace();
        let fstype = fs.next()?;
        if fstype != "cgroup" && fstype != "cgroup2" {
            return None;
        }
        let super_options = fs.nth(1)?.split(',').map(str::to_owned).collect();
        let mut flags = MsFlags::empty();
        for o in fields.get(5)?.split(',') {
            flags |= match o {
                "ro" => MsFlags::MS_RDONLY,
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "noatime" => MsFlags::MS_NOATIME,
                "nodiratime" => MsFlags::MS_NODIRATIME,
                "relatime" => MsFlags::MS_RELATIME,
                "strictatime" => MsFlags::MS_STRICTATIME,
                _ => MsFlags::empty(),
            };
        }
        Some(CgroupMount {
            point: fields.get(4)?.replace("\\040", " "),
            v2: fstype == "cgroup2",
            flags,
            super_options,
        })
    }
}

/// Gives every network namespace created from the agent's own from now on (the containers')
/// socket hash tables of `buckets` entries instead of sharing the host's: CRIU's dump lists a
/// container's sockets through sock_diag, which walks the whole TCP table it sees, and the
/// host's has 262144 buckets here (a quarter of a millisecond per walk, four walks per dump:
/// about 5 ms of every freeze). Linux >= 6.1 (TCP) and 6.2 (UDP); older kernels keep
/// sharing. Returns the settings that took effect.
pub fn set_child_socket_hashes(buckets: u32) -> Vec<String> {
    let mut done = vec![];
    for (file, max) in [
        ("tcp_child_ehash_entries", 1u32 << 24),
        ("udp_child_hash_entries", 1 << 16),
    ] {
        // UDP tables have at least 128 buckets; both must be powers of two.
        let n = buckets.clamp(128, max).next_power_of_two().min(max);
        let path = Path::new("/proc/sys/net/ipv4").join(file);
        match std::fs::write(&path, n.to_string()) {
            Ok(()) => done.push(format!("{file}={n}")),
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "containers share the host's socket hash table: every dump walks it"),
        }
    }
    done
}

#[cfg(test)]
mod cgroup_mount_tests {
    use super::CgroupMount;
    use nix::mount::MsFlags;

    #[test]
    fn a_remount_repeats_the_mounts_flags_and_super_options() {
        let m = CgroupMount::parse(
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot",
        )
        .expect("a cgroup2 mount");
        assert!(m.v2);
        assert_eq!(m.point, "/sys/fs/cgroup");
        assert_eq!(
            m.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME
        );
        assert_eq!(
            m.super_options,
            ["rw", "nsdelegate", "memory_recursiveprot"]
        );
        let v1 = CgroupMount::parse(
            "40 24 0:34 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu",
        )
        .expect("a cgroup v1 mount");
        assert!(!v1.v2);
        assert!(CgroupMount::parse("22 1 0:21 / /proc rw - proc proc rw").is_none());
    }
}

#[cfg(test)]
mod cgroup_kill_tests {
    use std::path::PathBuf;
    use std::process::Command;

    /// A process left frozen in a container's cgroup (as a killed `runc restore` leaves CRIU's
    /// tasks) is killed, and the cgroup can then be removed. Needs root, as `scripts/test.sh`
    /// runs it: without root it fails rather than passing untested.
    #[test]
    fn leftover_processes_in_a_cgroup_are_killed_even_when_frozen() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates cgroups: run it as root (scripts/test.sh does)"
        );
        let rel = format!("/ferry-unit-{}/c", std::process::id());
        let v1 = PathBuf::from("/sys/fs/cgroup/freezer").join(rel.trim_start_matches('/'));
        let v2 = PathBuf::from("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
        let dir = if PathBuf::from("/sys/fs/cgroup/freezer").is_dir() {
            v1
        } else {
            v2
        };
        std::fs::create_dir_all(&dir).expect("creating a test cgroup");
        let mut child = Command::new("sleep").arg("60").spawn().expect("sleep");
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("moving in");
        if dir.join("freezer.state").exists() {
            std::fs::write(dir.join("freezer.state"), "FROZEN").expect("freezing");
        } else {
            std::fs::write(dir.join("cgroup.freeze"), "1").expect("freezing");
        }
        let killed = super::kill_cgroup_procs(&rel);
        let status = child.wait().expect("waiting for sleep");
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(dir.parent().unwrap());
        assert_eq!(killed, 1);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status:?}"
        );
        // Nothing there: nothing to do.
        assert_eq!(super::kill_cgroup_procs("/ferry-unit-absent"), 0);
    }
}
