//! Test support for crates that drive real CRIU (the page-server tests of `criu-driver` and the
//! relay tests of `precopy`): a work directory with an image directory ([`Lab`]), child
//! processes killed on drop ([`Guard`]), the `criu-driver-testee` program ([`start_testee`]),
//! `criu page-server` ([`start_page_server`]) and `criu restore` with the testee's memory
//! check ([`restore_and_check`]).
//!
//! Everything here needs root and CRIU >= 4.2 (`scripts/setup.sh`); without them a [`Lab`]
//! fails the test and says why. Every wait is bounded (by [`STEP`] unless told). Work
//! directories are removed on drop unless `FERRY_KEEP_TEST_DIRS=1` is set.
//!
//! The testee binary is built by `cargo build -p criu-driver`; it is found at
//! `$FERRY_CRIU_SYS_TESTEE`, else next to the test executable's directory
//! (`target/<profile>/criu-driver-testee`), unless a test names it with [`Lab::with_testee`].

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The testee's heap, in MiB.
pub const HEAP_MIB: u64 = 64;
/// The testee's heap, in pages.
pub const HEAP_PAGES: u64 = HEAP_MIB << 20 >> 12;
/// The testee's heap, in bytes.
pub const HEAP_BYTES: u64 = HEAP_MIB << 20;
/// The testee's memfd, in pages.
pub const MEMFD_PAGES: u64 = 256;
/// Upper bound for every single step (start, dump, restore, check).
pub const STEP: Duration = Duration::from_secs(60);

/// Runs the real-CRIU tests of one test binary one at a time: hold the guard for the test.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The testee binary of criu-driver (canonical path, as /proc/PID/exe shows it), found at
/// `$FERRY_CRIU_SYS_TESTEE` or next to the test executable's directory.
pub fn testee() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = match std::env::var_os("FERRY_CRIU_SYS_TESTEE") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe().expect("current_exe");
                // target/<profile>/deps/TEST-HASH -> target/<profile>/criu-driver-testee
                exe.parent()
                    .and_then(Path::parent)
                    .expect("the test binary is in target/<profile>/deps")
                    .join("criu-driver-testee")
            }
        };
        canonical_testee(&path)
    })
}

fn canonical_testee(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|e| {
        panic!(
            "the testee {} is missing ({e}): build it first with `cargo build --release -p criu-driver` \
             (or `cargo build -p criu-driver` for a debug test run), or set FERRY_CRIU_SYS_TESTEE",
            path.display()
        )
    })
}

/// A work directory with an `images/` subdirectory; removed on drop.
pub struct Lab {
    /// The work directory (CRIU's and the testee's working directory).
    pub dir: PathBuf,
    /// The image directory, `dir/images`.
    pub images: PathBuf,
    criu: PathBuf,
    testee: Option<PathBuf>,
}

impl Lab {
    /// Checks for root and CRIU, makes us a child subreaper (restored processes are
    /// re-parented to us) and creates `$TMPDIR/NAME-PID-NANOS/images`.
    pub fn new(name: &str) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the real-CRIU tests need root (CRIU dumps and restores processes); run them as root"
        );
        let criu = criu_driver::Criu::discover()
            .unwrap_or_else(|e| panic!("the real-CRIU tests need CRIU >= 4.2: {e}"));
        // Restored processes are re-parented to us, so we can reap them.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("{name}-{}-{nanos}", std::process::id()));
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        Lab {
            dir,
            images,
            criu: criu.path,
            testee: None,
        }
    }

    /// Uses the testee at `path` instead of [`testee`] (e.g. `env!("CARGO_BIN_EXE_...")`).
    pub fn with_testee(mut self, path: impl AsRef<Path>) -> Lab {
        self.testee = Some(canonical_testee(path.as_ref()));
        self
    }

    /// The testee binary this lab starts.
    pub fn testee(&self) -> &Path {
        self.testee.as_deref().unwrap_or_else(|| testee())
    }

    /// CRIU, with stdin closed and the work directory as its working directory.
    pub fn criu(&self) -> Process {
        let mut c = Process::new(&self.criu);
        c.stdin(Stdio::null()).current_dir(&self.dir);
        c
    }

    /// The last lines of a CRIU log in the image directory, for failure messages.
    pub fn log_tail(&self, log: &str) -> String {
        let text = std::fs::read_to_string(self.images.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let errors: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("Error") || l.contains("Warn"))
            .collect();
        format!(
            "--- {log}: errors/warnings ---\n{}\n--- {log}: last lines ---\n{}",
            errors[errors.len().saturating_sub(15)..].join("\n"),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Runs CRIU to completion (bounded) and fails the test with its log if it fails.
    pub fn run_criu(&self, args: &[&str], log: &str) -> Duration {
        self.run_criu_passing(args, log, None)
    }

    /// [`Lab::run_criu`], handing `pass` to CRIU as an inherited descriptor (closed here
    /// once CRIU runs).
    pub fn run_criu_passing(&self, args: &[&str], log: &str, pass: Option<UnixStream>) -> Duration {
        if let Some(s) = &pass {
            fcntl(s, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        }
        let start = Instant::now();
        let mut child = Guard::new(
            self.criu()
                .args(args)
                .args(["-o", log, "-v4"])
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start criu: {e}")),
            "criu",
        );
        drop(pass);
        let status = child.wait(STEP);
        let took = start.elapsed();
        assert!(
            status.success(),
            "criu {} failed ({status}):\n{}",
            args.join(" "),
            self.log_tail(log)
        );
        took
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("FERRY_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A child process that is killed and reaped on drop.
pub struct Guard {
    child: Option<Child>,
    what: &'static str,
}

impl Guard {
    /// Guards `child`, called `what` in failure messages.
    pub fn new(child: Child, what: &'static str) -> Guard {
        Guard {
            child: Some(child),
            what,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// Waits for the exit (bounded); kills it and fails the test on timeout.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("already waited for");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not finish within {timeout:?}", self.what);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A restored testee (our child through the subreaper): killed and reaped on drop.
struct Restored<'a> {
    pid: Option<Pid>,
    testee: &'a Path,
}

impl Restored<'_> {
    /// Waits for its exit (bounded).
    fn wait(&mut self, timeout: Duration) -> WaitStatus {
        let pid = self.pid.take().expect("already waited for");
        let deadline = Instant::now() + timeout;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => return status,
                Err(e) => panic!("waitpid({pid}): {e} (is the restored process our child?)"),
            }
            if Instant::now() > deadline {
                self.pid = Some(pid);
                panic!("the restored testee {pid} did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Restored<'_> {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        // Only ever kill our testee, not a process that happens to reuse the pid.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe == self.testee {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

/// Waits (bounded) for `path` to exist and returns its text; fails the test on timeout.
pub fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the testee ([`HEAP_MIB`] heap, [`MEMFD_PAGES`] memfd); returns it once its memory
/// is filled.
pub fn start_testee(lab: &Lab) -> Guard {
    let testee = lab.testee();
    let child = Process::new(testee)
        .args(["--heap-mib", &HEAP_MIB.to_string()])
        .args(["--memfd-pages", &MEMFD_PAGES.to_string()])
        .arg("--ready")
        .arg(lab.dir.join("ready"))
        .arg("--result")
        .arg(lab.dir.join("result"))
        .args(["--lifetime", "300"])
        .current_dir(&lab.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", testee.display()));
    let guard = Guard::new(child, "testee");
    let pid: i32 = wait_for_file(&lab.dir.join("ready"), STEP)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, guard.pid().as_raw());
    guard
}

/// Starts `criu page-server` on a free port; returns it and the port.
///
/// CRIU's command line refuses `--port 0`, so the port is found by binding to port 0 first;
/// should another process take it in between, CRIU fails to bind and the next port is tried.
pub fn start_page_server(lab: &Lab) -> (Guard, u16) {
    let mut last = String::new();
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = lab
            .criu()
            .arg("page-server")
            .arg("-D")
            .arg(&lab.images)
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .args(["--status-fd", "1", "-o", "page-server.log", "-v4"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start criu page-server: {e}"));
        // CRIU writes one \0 to --status-fd once it listens.
        let mut out = child.stdout.take().unwrap();
        let mut guard = Guard::new(child, "criu page-server");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut b = [0u8; 1];
            let _ = tx.send(out.read(&mut b).map(|n| (n, b[0])));
        });
        match rx.recv_timeout(STEP) {
            Ok(Ok((1, 0))) => return (guard, port),
            Ok(Ok((0, _))) => {
                // Exited before listening.
                let status = guard.wait(STEP);
                last = format!("exited with {status}:\n{}", lab.log_tail("page-server.log"));
                if !last.contains("Can't bind") {
                    break;
                }
            }
            other => {
                last = format!("{other:?}:\n{}", lab.log_tail("page-server.log"));
                break;
            }
        }
    }
    panic!("criu page-server did not start listening: {last}");
}

/// Restores the images, sends SIGUSR1 and returns (exit code, result file, restore time).
pub fn restore_and_check(lab: &Lab) -> (i32, String, Duration) {
    let took = lab.run_criu(
        &[
            "restore",
            "-D",
            lab.images.to_str().unwrap(),
            "--restore-detached",
            "--pidfile",
            "restore.pid",
        ],
        "restore.log",
    );
    let pid: i32 = std::fs::read_to_string(lab.images.join("restore.pid"))
        .expect("criu restore wrote no pidfile")
        .trim()
        .parse()
        .unwrap();
    let mut restored = Restored {
        pid: Some(Pid::from_raw(pid)),
        testee: lab.testee(),
    };
    kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("signalling the restored testee");
    let code = match restored.wait(STEP) {
        WaitStatus::Exited(_, code) => code,
        other => panic!("the restored testee ended with {other:?}"),
    };
    let result = wait_for_file(&lab.dir.join("result"), STEP);
    (code, result, took)
}
