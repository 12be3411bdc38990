//! The relay against real CRIU: `criu dump --page-server` into [`relay_out`], across a link
//! made of two in-memory pipes (standing in for a QUIC stream pair) into [`relay_in`], into a
//! real `criu page-server`; then `criu restore` of the images and the testee's memory check.
//!
//! Needs root, CRIU >= 4.2 and the testee binary of criu-sys, built first with
//! `cargo build --release -p criu-sys` (found next to this test's directory, as
//! `target/<profile>/criu-sys-testee`, or at `$FERRY_CRIU_SYS_TESTEE`). Without them the tests
//! fail and say why. They print their figures with `--nocapture`.

#[allow(dead_code)] // `page_is_intact` and `page_identity` are for the testee.
#[path = "../../criu-sys/src/bin/criu-sys-testee/pattern.rs"]
mod pattern;

use std::collections::HashSet;
use std::io::Read;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use precopy::relay::{relay_in, relay_out, RelayStats};
use transfer::pages::{hash_page, PageHash, PageStore};

use pattern::{fill_page, HEAP_MAGIC, MEMFD_MAGIC, PAGE};

const HEAP_MIB: u64 = 64;
const HEAP_PAGES: u64 = HEAP_MIB << 20 >> 12;
const HEAP_BYTES: u64 = HEAP_MIB << 20;
const MEMFD_PAGES: u64 = 256;
/// Upper bound for every single step (start, dump, restore, check).
const STEP: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

/// The testee binary of criu-sys (canonical path, as /proc/PID/exe shows it).
fn testee() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = match std::env::var_os("FERRY_CRIU_SYS_TESTEE") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe().expect("current_exe");
                // target/<profile>/deps/relay_criu-HASH -> target/<profile>/criu-sys-testee
                exe.parent()
                    .and_then(Path::parent)
                    .expect("the test binary is in target/<profile>/deps")
                    .join("criu-sys-testee")
            }
        };
        path.canonicalize().unwrap_or_else(|e| {
            panic!(
                "the testee {} is missing ({e}): build it first with `cargo build --release -p criu-sys` \
                 (or `cargo build -p criu-sys` for a debug test run), or set FERRY_CRIU_SYS_TESTEE",
                path.display()
            )
        })
    })
}

/// A work directory with an `images/` subdirectory; removed on drop.
struct Lab {
    dir: PathBuf,
    images: PathBuf,
    criu: PathBuf,
}

impl Lab {
    fn new(name: &str) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the real-CRIU tests need root (CRIU dumps and restores processes); run them as root"
        );
        let criu = criu_sys::Criu::discover()
            .unwrap_or_else(|e| panic!("the real-CRIU tests need CRIU >= 4.2: {e}"));
        // Restored processes are re-parented to us, so we can reap them.
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("precopy-{name}-{}-{nanos}", std::process::id()));
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        Lab {
            dir,
            images,
            criu: criu.path,
        }
    }

    fn criu(&self) -> Process {
        let mut c = Process::new(&self.criu);
        c.stdin(Stdio::null()).current_dir(&self.dir);
        c
    }

    /// The last lines of a CRIU log in the image directory, for failure messages.
    fn log_tail(&self, log: &str) -> String {
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
    fn run_criu(&self, args: &[&str], log: &str) -> Duration {
        self.run_criu_passing(args, log, None)
    }

    /// [`Lab::run_criu`], handing `pass` to CRIU as an inherited descriptor (closed here
    /// once CRIU runs).
    fn run_criu_passing(&self, args: &[&str], log: &str, pass: Option<UnixStream>) -> Duration {
        if let Some(s) = &pass {
            fcntl(s.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
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
struct Guard {
    child: Option<Child>,
    what: &'static str,
}

impl Guard {
    fn new(child: Child, what: &'static str) -> Guard {
        Guard {
            child: Some(child),
            what,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// Waits for the exit (bounded); kills it and fails the test on timeout.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
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
struct Restored {
    pid: Option<Pid>,
}

impl Restored {
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

impl Drop for Restored {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        // Only ever kill our testee, not a process that happens to reuse the pid.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe == testee() {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

fn wait_for_file(path: &Path, timeout: Duration) -> String {
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

/// Starts the testee; returns it once its memory is filled.
fn start_testee(lab: &Lab) -> Guard {
    let child = Process::new(testee())
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
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", testee().display()));
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
fn start_page_server(lab: &Lab) -> (Guard, u16) {
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

/// Restores the images, sends SIGUSR1 and returns (exit code, result file).
fn restore_and_check(lab: &Lab) -> (i32, String, Duration) {
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
    };
    kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("signalling the restored testee");
    let code = match restored.wait(STEP) {
        WaitStatus::Exited(_, code) => code,
        other => panic!("the restored testee ended with {other:?}"),
    };
    let result = wait_for_file(&lab.dir.join("result"), STEP);
    (code, result, took)
}

fn pattern_pages(magic: u64, pages: u64) -> impl Iterator<Item = Vec<u8>> {
    (0..pages).map(move |i| {
        let mut page = vec![0u8; PAGE];
        fill_page(magic, i, &mut page);
        page
    })
}

/// What one relayed dump produced.
struct Relayed {
    out: RelayStats,
    inn: RelayStats,
    known: HashSet<PageHash>,
    store: PageStore,
    dump_took: Duration,
}

/// Dumps a fresh testee through relay_out -> link -> relay_in -> `criu page-server`.
fn dump_through_relay(lab: &Lab, known: HashSet<PageHash>, store: PageStore) -> Relayed {
    let (mut page_server, ps_port) = start_page_server(lab);
    let mut testee = start_testee(lab);
    let pid = testee.pid();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let relays = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let work = async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let (from_criu, _) = listener
                    .accept()
                    .await
                    .map_err(|e| format!("accept: {e}"))?;
                let to_ps = tokio::net::TcpStream::connect(("127.0.0.1", ps_port))
                    .await
                    .map_err(|e| format!("connecting to the page server: {e}"))?;
                // The link: one pipe per direction (as a QUIC stream pair would be).
                let (fwd_src, fwd_dst) = tokio::io::duplex(1 << 20);
                let (back_dst, back_src) = tokio::io::duplex(1 << 16);
                let (_, fwd_tx) = tokio::io::split(fwd_src);
                let (fwd_rx, _) = tokio::io::split(fwd_dst);
                let (_, back_tx) = tokio::io::split(back_dst);
                let (back_rx, _) = tokio::io::split(back_src);
                let mut known = known;
                let mut store = store;
                let src = tokio::spawn(async move {
                    let r = relay_out(from_criu, fwd_tx, back_rx, &mut known).await;
                    (r, known)
                });
                let dst = tokio::spawn(async move {
                    let r = relay_in(fwd_rx, back_tx, to_ps, &mut store).await;
                    (r, store)
                });
                let (out, known) = src.await.map_err(|e| format!("relay_out panicked: {e}"))?;
                let (inn, store) = dst.await.map_err(|e| format!("relay_in panicked: {e}"))?;
                let out = out.map_err(|e| format!("relay_out failed: {e}"))?;
                let inn = inn.map_err(|e| format!("relay_in failed: {e}"))?;
                Ok::<_, String>((out, inn, known, store))
            };
            tokio::time::timeout(2 * STEP, work)
                .await
                .map_err(|_| "the relay did not finish in time".to_string())?
        })
    });

    let pid_arg = pid.to_string();
    let port_arg = port.to_string();
    let args = [
        "dump",
        "-t",
        &pid_arg,
        "-D",
        lab.images.to_str().unwrap(),
        "--page-server",
        "--address",
        "127.0.0.1",
        "--port",
        &port_arg,
    ];
    let dump_took = lab.run_criu(&args, "dump.log");
    // CRIU killed the testee; reap it so that its pid is free for the restore.
    let status = testee.wait(STEP);
    assert!(!status.success(), "the dump should have killed the testee");
    let (out, inn, known, store) = relays
        .join()
        .expect("relay thread panicked")
        .unwrap_or_else(|e| panic!("{e}"));
    let ps_status = page_server.wait(STEP);
    assert!(
        ps_status.success(),
        "criu page-server failed ({ps_status}):\n{}",
        lab.log_tail("page-server.log")
    );
    assert_eq!(out.close_status, Some(0));
    assert_eq!(inn.close_status, Some(0));
    assert_eq!(
        (out.messages, out.pages, out.pages_as_reference),
        (inn.messages, inn.pages, inn.pages_as_reference),
        "both ends agree"
    );
    assert_eq!(out.link_bytes_written, inn.link_bytes_read);
    assert_eq!(inn.link_bytes_written, out.link_bytes_read);
    Relayed {
        out,
        inn,
        known,
        store,
        dump_took,
    }
}

fn report(what: &str, r: &Relayed, restore_took: Duration, result: &str) {
    eprintln!(
        "{what}: dump {:.0} ms (relay active {:.0} ms); {} messages, {} pages, {} as references; \
         link {} bytes forward ({:.2} % of the {HEAP_MIB} MiB heap), {} bytes back; \
         restore {:.0} ms; testee: {}",
        r.dump_took.as_secs_f64() * 1e3,
        r.out.elapsed.as_secs_f64() * 1e3,
        r.out.messages,
        r.out.pages,
        r.out.pages_as_reference,
        r.out.link_bytes_written,
        r.out.link_bytes_written as f64 * 100.0 / HEAP_BYTES as f64,
        r.inn.link_bytes_written,
        restore_took.as_secs_f64() * 1e3,
        result.trim()
    );
}

#[test]
fn relay_with_nothing_known_sends_contents_and_restores_intact_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new("relay-cold");
    let r = dump_through_relay(&lab, HashSet::new(), PageStore::new(1 << 20));
    let (code, result, restore_took) = restore_and_check(&lab);
    report("relay, nothing known", &r, restore_took, &result);
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");

    assert!(
        r.out.pages >= HEAP_PAGES + MEMFD_PAGES,
        "{} pages relayed",
        r.out.pages
    );
    // Nothing was known: only pages repeated within the dump itself may be references.
    assert!(
        r.out.pages_as_reference < r.out.pages / 100,
        "{} of {} pages as references",
        r.out.pages_as_reference,
        r.out.pages
    );
    assert!(r.out.link_bytes_written >= HEAP_BYTES + MEMFD_PAGES * PAGE as u64);
    // Both sides now know every page of the testee.
    for page in pattern_pages(HEAP_MAGIC, HEAP_PAGES).chain(pattern_pages(MEMFD_MAGIC, MEMFD_PAGES))
    {
        let h = hash_page(&page);
        assert!(r.known.contains(&h), "source does not know a testee page");
        assert!(
            r.store.contains(&h),
            "destination does not hold a testee page"
        );
    }
}

#[test]
fn relay_after_a_precopy_round_sends_references_and_restores_intact_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new("relay-warm");
    // What a pre-copy round would have left: the destination holds the testee's pages and
    // the source knows it.
    let mut store = PageStore::new(1 << 20);
    let mut known = HashSet::new();
    for page in pattern_pages(HEAP_MAGIC, HEAP_PAGES).chain(pattern_pages(MEMFD_MAGIC, MEMFD_PAGES))
    {
        known.insert(store.insert(&page).unwrap());
    }
    let r = dump_through_relay(&lab, known, store);
    let (code, result, restore_took) = restore_and_check(&lab);
    report("relay after pre-copy", &r, restore_took, &result);
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");

    assert!(
        r.out.pages_as_reference * 100 >= HEAP_PAGES * 95,
        "only {} of the {HEAP_PAGES} heap pages crossed as references",
        r.out.pages_as_reference
    );
    assert!(
        r.out.link_bytes_written * 10 < HEAP_BYTES,
        "the link carried {} bytes, not less than 10 % of the {HEAP_BYTES}-byte heap",
        r.out.link_bytes_written
    );
}
