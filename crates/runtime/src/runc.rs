//! runc: create, start, checkpoint and restore containers of one state root, and the CRIU
//! front end a checkpoint or restore runs through.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cgroup_tree::{cgroup_path, kill_cgroup_procs};

mod lifecycle;
use crate::util::run;
pub use lifecycle::ExecOutput;

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

/// `ferry-criu` in front of the real CRIU (see criu-driver's `ferry-criu` binary): answers runc's
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
/// ([`criu_driver::swrk_proxy::GATE_ENV`]). [`Prestarted::go`] lets CRIU run and waits for the
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
    /// says so through the gate, [`criu_driver::swrk_proxy::GATE_DONE`]), or else once the command
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
            c.write_all(&[criu_driver::swrk_proxy::GATE_OPEN])
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
        if let Some(s) = self.close_gate() {
            let bound = Bound::new(GATE_CLOSED_GRACE, "the grace after its gate closed", None);
            let _ = self.runc.wait_bounded(self.op, &self.name, s, &bound);
        }
    }

    /// Closes the gate (a runc waiting at it fails) and takes its runc, if one started.
    fn close_gate(&mut self) -> Option<Started> {
        drop(self.at_gate.take());
        drop(self.gate.take());
        let _ = std::fs::remove_file(&self.gate_path);
        self.started.take()
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        if let Some(s) = self.close_gate() {
            let bound = Bound::new(GATE_CLOSED_GRACE, "the grace after its gate closed", None);
            self.runc.reap_in_background(self.op, &self.name, s, bound);
        }
    }
}

/// How often [`wait_for_criu_done`] looks at its bound while CRIU runs.
const CRIU_DONE_POLL: Duration = Duration::from_millis(20);

/// Reads the gate connection `conn` until `ferry-criu` reports CRIU's success
/// ([`criu_driver::swrk_proxy::GATE_DONE`], true) or closes it, or `bound` runs out (false).
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
            Ok(1) => return b[0] == criu_driver::swrk_proxy::GATE_DONE,
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

/// What a `runc restore` restores from: the container's bundle, CRIU's images, CRIU's work
/// directory (its log lands there), and whether memory comes lazily (from the `criu
/// lazy-pages` daemon listening in `work`, see `ferry_agent::fill`).
#[derive(Debug, Clone, Copy)]
pub struct RestoreFrom<'a> {
    pub bundle: &'a Path,
    pub images: &'a Path,
    pub work: &'a Path,
    pub lazy: bool,
    /// The pipes the restored container's output goes to: runc hands them to CRIU for the
    /// pipes `descriptors.json` names ([`crate::console`]).
    pub console: Option<&'a crate::console::Console>,
}

/// Points a runc command's stdout and stderr at `console`'s pipes: a detached container
/// without a terminal inherits them, and a restore hands them to CRIU.
fn attach(c: &mut Command, console: Option<&crate::console::Console>) -> Result<()> {
    if let Some(con) = console {
        let (out, err) = con.stdio()?;
        c.stdout(out).stderr(err);
    }
    Ok(())
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
        c.env(criu_driver::swrk_proxy::GATE_ENV, gate);
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

    /// Starts a container detached, its output into `console` (else `/dev/null`).
    pub fn start(
        &self,
        name: &str,
        bundle: &Path,
        console: Option<&crate::console::Console>,
    ) -> Result<()> {
        let mut c = self.cmd("run", name);
        attach(&mut c, console)?;
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
    /// With `lazy` the dump is lazy ([`criu_driver::swrk_proxy::relay_dump`]): CRIU writes every
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
            c.env(criu_driver::swrk_proxy::PAGE_SERVER_SOCKET_ENV, ps_socket);
            if lazy {
                c.env(
                    criu_driver::swrk_proxy::LAZY_DUMP_CONFIG_ENV,
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

    /// Restores `name` detached, from `from`.
    pub fn restore(&self, name: &str, from: &RestoreFrom<'_>) -> Result<()> {
        let c = self.restore_cmd(name, from)?;
        self.run("restore", name, c, Some(&from.work.join("restore.log")))
    }

    /// [`Self::restore`] started ahead, with CRIU held at the gate `gate` until
    /// [`Prestarted::go`]: start it once the bundle is ready, let it go once the images are.
    /// runc reads `descriptors.json` from `images` now (it must be there, and the same as the
    /// one the images bring) and holds `images` open: it must stay the same directory.
    pub fn prestart_restore(
        &self,
        name: &str,
        from: &RestoreFrom<'_>,
        gate: &Path,
    ) -> Result<Prestarted> {
        let c = self.restore_cmd(name, from)?;
        self.prestart(
            "restore",
            name,
            c,
            Some(from.work.join("restore.log")),
            gate,
        )
    }

    fn restore_cmd(&self, name: &str, from: &RestoreFrom<'_>) -> Result<Command> {
        let mut c = self.cmd("restore", name);
        attach(&mut c, from.console)?;
        c.arg("restore");
        if from.lazy {
            c.arg("--lazy-pages");
        }
        c.args(["--detach", "--tcp-established", "--bundle"])
            .arg(from.bundle)
            .arg("--image-path")
            .arg(from.images)
            .arg("--work-path")
            .arg(from.work)
            .arg(name);
        Ok(c)
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
