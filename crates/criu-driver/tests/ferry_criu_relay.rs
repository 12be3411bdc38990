//! `ferry-criu` as runc runs it (`ferry-criu swrk FD`), against real CRIU: a DUMP request with
//! `opts.ps` = 127.0.0.1:1 goes, with `FERRY_PAGE_SERVER_SOCKET` set, to the agent's UNIX
//! socket instead (here relayed by [`criu_driver::page_server::proxy_with`] into a real
//! `criu page-server`); the test answers CRIU's notifications as runc does, then restores the
//! images and checks the testee's memory. Also: the VERSION request is still answered, and an
//! unreachable agent socket fails the dump loudly.
//!
//! The test plays runc: it creates the SEQPACKET pair, opens the images directory
//! close-on-exec and names its own descriptor number in the request, as runc does (CRIU looks
//! it up as `/proc/PEER/fd/N`).
//!
//! The dump test needs root and CRIU >= 4.2 (`scripts/setup.sh`). Tests run one at a time.

use std::fs::File;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criu_driver::page_server::{proxy_with, Message, ProxyOptions};
use criu_testkit::{
    restore_and_check, serial, start_page_server, start_testee, Guard, Lab, HEAP_MIB, MEMFD_PAGES,
    STEP,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

const FERRY_CRIU: &str = env!("CARGO_BIN_EXE_ferry-criu");

fn lab(name: &str) -> Lab {
    Lab::new(&format!("criu-driver-{name}")).with_testee(env!("CARGO_BIN_EXE_criu-driver-testee"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_int(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, v: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// `criu_req { type = DUMP, opts = { images_dir_fd, pid, log_level = 4, log_file = "dump.log",
/// ps = { address = "127.0.0.1", port = 1 }, notify_scripts = true, work_dir_fd } }`, as in
/// images/rpc.proto (the CLI equivalent is what criu-testkit runs: `dump -t PID -D DIR`).
fn dump_request(images_fd: i32, work_fd: i32, pid: i32) -> Vec<u8> {
    let mut ps = Vec::new();
    put_bytes(&mut ps, 1, b"127.0.0.1");
    put_int(&mut ps, 2, 1);
    let mut opts = Vec::new();
    put_int(&mut opts, 1, images_fd as u64);
    put_int(&mut opts, 2, pid as u64);
    put_int(&mut opts, 9, 4);
    put_bytes(&mut opts, 10, b"dump.log");
    put_bytes(&mut opts, 11, &ps);
    put_int(&mut opts, 12, 1);
    put_int(&mut opts, 17, work_fd as u64);
    let mut req = Vec::new();
    put_int(&mut req, 1, 1);
    put_bytes(&mut req, 2, &opts);
    req
}

/// [`dump_request`] without a page server: CRIU writes the pages into the images directory.
fn plain_dump_request(images_fd: i32, work_fd: i32, pid: i32) -> Vec<u8> {
    let mut opts = Vec::new();
    put_int(&mut opts, 1, images_fd as u64);
    put_int(&mut opts, 2, pid as u64);
    put_int(&mut opts, 9, 4);
    put_bytes(&mut opts, 10, b"dump.log");
    put_int(&mut opts, 12, 1);
    put_int(&mut opts, 17, work_fd as u64);
    let mut req = Vec::new();
    put_int(&mut req, 1, 1);
    put_bytes(&mut req, 2, &opts);
    req
}

/// The fields of a `criu_resp` the test looks at.
#[derive(Debug, Default)]
struct Resp {
    kind: u64,
    success: bool,
    script: Option<String>,
    cr_errno: Option<u64>,
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0;
    for shift in (0..64).step_by(7) {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

/// (field, varint value or bytes) of an encoded message, without groups or fixed widths.
fn fields(b: &[u8]) -> Vec<(u64, Result<u64, Vec<u8>>)> {
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        match key & 7 {
            0 => out.push((key >> 3, Ok(varint(b, &mut i)))),
            2 => {
                let n = varint(b, &mut i) as usize;
                out.push((key >> 3, Err(b[i..i + n].to_vec())));
                i += n;
            }
            w => panic!("unexpected wire type {w} in {b:?}"),
        }
    }
    out
}

fn parse_resp(b: &[u8]) -> Resp {
    let mut r = Resp::default();
    for (f, v) in fields(b) {
        match (f, v) {
            (1, Ok(v)) => r.kind = v,
            (2, Ok(v)) => r.success = v != 0,
            (7, Ok(v)) => r.cr_errno = Some(v),
            (5, Err(notify)) => {
                for (nf, nv) in fields(&notify) {
                    if let (1, Err(s)) = (nf, nv) {
                        r.script = Some(String::from_utf8(s).unwrap());
                    }
                }
            }
            _ => {}
        }
    }
    r
}

/// Starts `ferry-criu swrk FD` on a SEQPACKET pair; returns it and runc's end. Its stderr
/// goes to `stderr`.
fn start_ferry_criu(env: &[(&str, &str)], stderr: &Path) -> (Guard, UnixDatagram) {
    let (runc_end, criu_end): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    // Inherited, like runc's ExtraFiles (the tests of this binary run one at a time, so no
    // other child inherits it).
    fcntl(&criu_end, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let mut cmd = Process::new(FERRY_CRIU);
    cmd.arg("swrk")
        .arg(criu_end.as_raw_fd().to_string())
        .env_remove("FERRY_CRIU_REAL")
        .env_remove("FERRY_CRIU_VERSION")
        .env_remove("FERRY_PAGE_SERVER_SOCKET")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(stderr).unwrap());
    let child = Guard::new(cmd.spawn().expect("starting ferry-criu"), "ferry-criu");
    drop(criu_end);
    let runc = UnixDatagram::from(runc_end);
    runc.set_read_timeout(Some(STEP)).unwrap();
    (child, runc)
}

/// `ferry-criu` behind the gate at `gate`, sent a plain dump of `pid` into `images` (`work`
/// as its work directory); returns it and runc's end.
fn gated_dump(
    gate: &Path,
    stderr: &Path,
    images: &File,
    work: &File,
    pid: i32,
) -> (Guard, UnixDatagram) {
    let (ferry_criu, runc) = start_ferry_criu(
        &[
            ("FERRY_CRIU_REAL", &real_criu()),
            ("FERRY_CRIU_VERSION", "4.2.1"),
            ("FERRY_CRIU_GATE", gate.to_str().unwrap()),
        ],
        stderr,
    );
    runc.send(&plain_dump_request(
        images.as_raw_fd(),
        work.as_raw_fd(),
        pid,
    ))
    .unwrap();
    (ferry_criu, runc)
}

fn real_criu() -> String {
    criu_driver::locate()
        .expect("CRIU")
        .to_string_lossy()
        .into_owned()
}

/// A directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("criu-driver-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the agent's end saw: the page-server conversation relayed to `criu page-server`.
struct Agent {
    handle: thread::JoinHandle<Result<criu_driver::page_server::ProxyStats, String>>,
}

fn start_agent(listener: UnixListener, page_server_port: u16, pages: Arc<Mutex<u64>>) -> Agent {
    let handle = thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + STEP;
        let from_criu = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("CRIU never connected to the agent's socket".to_string());
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        from_criu.set_nonblocking(false).unwrap();
        let to_ps = TcpStream::connect(("127.0.0.1", page_server_port))
            .map_err(|e| format!("connecting to the page server: {e}"))?;
        let opts = ProxyOptions {
            idle_timeout: Some(STEP),
            ..ProxyOptions::default()
        };
        let mut hook = |m: &Message, _buf: &mut [u8]| {
            *pages.lock().unwrap() += m.payload_pages();
            Ok(())
        };
        proxy_with(from_criu, to_ps, &opts, &mut hook).map_err(|e| e.to_string())
    });
    Agent { handle }
}

#[test]
fn a_dump_to_a_page_server_goes_through_the_agents_socket() {
    let _serial = serial();
    let lab = lab("ferry-criu-relay");
    let (mut page_server, ps_port) = start_page_server(&lab);
    let mut testee = start_testee(&lab);
    let pid = testee.pid();

    let socket = lab.dir.join("agent.sock");
    let pages = Arc::new(Mutex::new(0u64));
    let agent = start_agent(UnixListener::bind(&socket).unwrap(), ps_port, pages.clone());

    // As runc: the directories open close-on-exec in this process, their numbers in the request.
    let images = File::open(&lab.images).unwrap();
    let work = File::open(&lab.images).unwrap();
    let stderr = lab.dir.join("ferry-criu.stderr");
    let start = Instant::now();
    let (mut ferry_criu, runc) = start_ferry_criu(
        &[
            ("FERRY_CRIU_REAL", &real_criu()),
            ("FERRY_CRIU_VERSION", "4.2.1"),
            ("FERRY_PAGE_SERVER_SOCKET", socket.to_str().unwrap()),
        ],
        &stderr,
    );
    runc.send(&dump_request(
        images.as_raw_fd(),
        work.as_raw_fd(),
        pid.as_raw(),
    ))
    .unwrap();

    // Answer the notifications as runc does, up to the final response.
    let mut scripts = vec![];
    let mut buf = vec![0u8; 64 << 10];
    let resp = loop {
        let n = runc.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "reading CRIU's answer: {e}\n{}\nferry-criu: {}",
                lab.log_tail("dump.log"),
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
        assert!(
            n > 0,
            "the relay closed before the final response:\n{}\nferry-criu: {}",
            lab.log_tail("dump.log"),
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        let resp = parse_resp(&buf[..n]);
        if resp.kind != 6 {
            break resp;
        }
        scripts.push(resp.script.clone().unwrap_or_default());
        // criu_req { type = NOTIFY, notify_success = true }
        runc.send(&[0x08, 0x06, 0x18, 0x01]).unwrap();
    };
    // runc shuts its side after the final response and waits for CRIU.
    runc.shutdown(std::net::Shutdown::Write).unwrap();
    let status = ferry_criu.wait(STEP);
    let took = start.elapsed();
    let ferry_err = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(
        resp.kind == 1 && resp.success,
        "dump failed: {resp:?}\n{}\nferry-criu: {ferry_err}",
        lab.log_tail("dump.log")
    );
    assert!(
        status.success(),
        "ferry-criu exited with {status}: {ferry_err}"
    );
    let mut rest = [0u8; 16];
    assert_eq!(
        runc.recv(&mut rest).unwrap(),
        0,
        "the socket is closed after CRIU"
    );

    // CRIU used the agent's socket, not 127.0.0.1:1.
    let log = std::fs::read_to_string(lab.images.join("dump.log")).unwrap();
    assert!(
        log.contains("Reusing ps socket"),
        "{}",
        lab.log_tail("dump.log")
    );
    let stats = agent
        .handle
        .join()
        .expect("agent thread panicked")
        .unwrap_or_else(|e| panic!("agent relay failed: {e}"));
    assert_eq!(stats.trace.last(), Some(&Message::ForceClose));
    assert_eq!(*pages.lock().unwrap(), stats.payload_pages);
    assert!(
        stats.payload_bytes >= (HEAP_MIB << 20) + MEMFD_PAGES * 4096,
        "{} bytes of pages through the agent's socket",
        stats.payload_bytes
    );
    assert!(
        scripts.iter().any(|s| s == "post-dump"),
        "notifications seen: {scripts:?}"
    );
    // CRIU killed the testee; reap it so that its pid is free for the restore.
    assert!(!testee.wait(STEP).success());
    let ps_status = page_server.wait(STEP);
    assert!(
        ps_status.success(),
        "criu page-server failed ({ps_status}):\n{}",
        lab.log_tail("page-server.log")
    );
    drop((images, work));

    let (code, result, restore_took) = restore_and_check(&lab);
    eprintln!(
        "dump through ferry-criu and the agent's socket: {:.0} ms, {} pages, notifications {scripts:?}; restore {:.0} ms; testee: {}",
        took.as_secs_f64() * 1e3,
        stats.payload_pages,
        restore_took.as_secs_f64() * 1e3,
        result.trim()
    );
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");
}

#[test]
fn the_version_request_is_still_answered() {
    let _serial = serial();
    let dir = TempDir::new("ferry-criu-version");
    let stderr = dir.0.join("stderr");
    // Neither CRIU nor the agent's socket is used for it.
    let (mut child, runc) = start_ferry_criu(
        &[
            ("FERRY_CRIU_REAL", "/nonexistent/criu"),
            ("FERRY_CRIU_VERSION", "4.2.1"),
            ("FERRY_PAGE_SERVER_SOCKET", "/nonexistent/agent.sock"),
        ],
        &stderr,
    );
    runc.send(&[0x08, 0x0a]).unwrap();
    let mut buf = [0u8; 256];
    let n = runc.recv(&mut buf).unwrap();
    let expected = criu_driver::rpc::version_response(criu_driver::CriuVersion {
        major: 4,
        minor: 2,
        patch: 1,
    });
    assert_eq!(&buf[..n], &expected[..]);
    let status = child.wait(STEP);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
}

#[test]
fn an_unreachable_agent_socket_fails_the_dump_and_says_where() {
    let _serial = serial();
    let dir = TempDir::new("ferry-criu-nosock");
    let images = File::open(&dir.0).unwrap();
    let stderr = dir.0.join("stderr");
    let socket = dir.0.join("no-agent-here.sock");
    let (mut child, runc) = start_ferry_criu(
        &[
            // Never started: the dump must not fall back to 127.0.0.1:1.
            ("FERRY_CRIU_REAL", "/bin/true"),
            ("FERRY_PAGE_SERVER_SOCKET", socket.to_str().unwrap()),
        ],
        &stderr,
    );
    runc.send(&dump_request(images.as_raw_fd(), images.as_raw_fd(), 1))
        .unwrap();
    let status = child.wait(STEP);
    let mut err = String::new();
    File::open(&stderr)
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "ferry-criu succeeded: {err}");
    assert!(
        err.contains(socket.to_str().unwrap()) && err.contains("FERRY_PAGE_SERVER_SOCKET"),
        "{err}"
    );
    // runc gives CRIU no stderr; it quotes the "Error" lines of CRIU's log instead.
    let log = std::fs::read_to_string(dir.0.join("dump.log")).unwrap();
    assert!(
        log.starts_with("Error (ferry-criu): cannot connect")
            && log.contains(socket.to_str().unwrap()),
        "{log}"
    );
    let mut buf = [0u8; 16];
    assert_eq!(runc.recv(&mut buf).unwrap(), 0, "no answer, end of stream");
}

/// Answers CRIU's notifications as runc does and returns its final answer (or what went wrong
/// reading it).
fn final_answer(runc: &UnixDatagram) -> Result<Resp, String> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = runc
            .recv(&mut buf)
            .map_err(|e| format!("reading CRIU's answer: {e}"))?;
        if n == 0 {
            return Err("the relay closed before the final response".into());
        }
        let resp = parse_resp(&buf[..n]);
        if resp.kind != 6 {
            return Ok(resp);
        }
        // criu_req { type = NOTIFY, notify_success = true }
        runc.send(&[0x08, 0x06, 0x18, 0x01]).unwrap();
    }
}

/// Behind the agent's gate, ferry-criu relays a plain dump (no page server) and tells the agent
/// through the gate as soon as CRIU has answered with success, before CRIU and runc have
/// exited; the images it wrote restore the testee with its memory intact. A dump that fails
/// sends no such word: the gate just closes.
#[test]
fn behind_the_gate_criu_s_success_is_reported_back_through_it() {
    use std::io::Write;
    let _serial = serial();
    let lab = lab("ferry-criu-gate-done");
    let mut testee = start_testee(&lab);
    let pid = testee.pid();
    let gate_path = lab.dir.join("gate.sock");
    let gate = UnixListener::bind(&gate_path).unwrap();
    let images = File::open(&lab.images).unwrap();
    let work = File::open(&lab.images).unwrap();
    let stderr = lab.dir.join("ferry-criu.stderr");
    let (mut ferry_criu, runc) = gated_dump(&gate_path, &stderr, &images, &work, pid.as_raw());
    let (mut conn, _) = gate.accept().unwrap();
    conn.write_all(&[criu_driver::swrk_proxy::GATE_OPEN])
        .unwrap();
    conn.set_read_timeout(Some(STEP)).unwrap();

    let resp = final_answer(&runc).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\nferry-criu: {}",
            lab.log_tail("dump.log"),
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    });
    assert!(
        resp.kind == 1 && resp.success,
        "dump failed: {resp:?}\n{}",
        lab.log_tail("dump.log")
    );
    // The word arrives while runc (this test) still holds its socket open: CRIU's and runc's
    // exits are not waited for.
    let mut b = [0u8; 1];
    conn.read_exact(&mut b)
        .expect("ferry-criu reports CRIU's success through the gate");
    assert_eq!(b[0], criu_driver::swrk_proxy::GATE_DONE);
    runc.shutdown(std::net::Shutdown::Write).unwrap();
    let status = ferry_criu.wait(STEP);
    assert!(
        status.success(),
        "ferry-criu exited with {status}: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    assert_eq!(conn.read(&mut b).unwrap(), 0, "then the gate closes");
    assert!(!testee.wait(STEP).success());
    drop((images, work));
    let (code, result, _) = restore_and_check(&lab);
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");

    // A dump of a process that does not exist: CRIU fails, no word, the gate closes.
    let dir = TempDir::new("ferry-criu-gate-fail");
    let images = File::open(&dir.0).unwrap();
    let stderr = dir.0.join("stderr");
    let (mut ferry_criu, runc) = gated_dump(&gate_path, &stderr, &images, &images, i32::MAX - 1);
    let (mut conn, _) = gate.accept().unwrap();
    conn.write_all(&[criu_driver::swrk_proxy::GATE_OPEN])
        .unwrap();
    conn.set_read_timeout(Some(STEP)).unwrap();
    let resp = final_answer(&runc).unwrap_or_else(|e| panic!("{e}"));
    assert!(!resp.success, "{resp:?}");
    runc.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = ferry_criu.wait(STEP);
    assert_eq!(
        conn.read(&mut b).unwrap(),
        0,
        "no success reported for a failed dump"
    );
}

/// The children of `pid` whose command name is `comm`.
fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let list =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .filter(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == comm)
        })
        .collect()
}

/// Behind the gate CRIU is started before the gate opens (its start-up is out of the frozen
/// window), idle; a gate the agent closes instead of opening ends that CRIU, which has touched
/// nothing: the dump fails and the testee runs on.
#[test]
fn behind_the_gate_criu_waits_started_and_a_closed_gate_ends_it() {
    let _serial = serial();
    let lab = lab("ferry-criu-gate-closed");
    let testee = start_testee(&lab);
    let pid = testee.pid();
    let gate_path = lab.dir.join("gate.sock");
    let gate = UnixListener::bind(&gate_path).unwrap();
    let images = File::open(&lab.images).unwrap();
    let stderr = lab.dir.join("ferry-criu.stderr");
    let (mut ferry_criu, _runc) = gated_dump(&gate_path, &stderr, &images, &images, pid.as_raw());
    let (conn, _) = gate.accept().unwrap();
    // At the gate: CRIU is already there, a child of ferry-criu.
    let front = ferry_criu.pid().as_raw() as u32;
    let until = Instant::now() + STEP;
    while children_named(front, "criu").is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    let criu = children_named(front, "criu");
    assert_eq!(criu.len(), 1, "CRIU started before the gate opened");
    // The agent closes the gate.
    drop(conn);
    let status = ferry_criu.wait(STEP);
    assert!(!status.success(), "a closed gate fails the dump");
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(err.contains("gate"), "says why: {err}");
    assert!(
        !std::path::Path::new(&format!("/proc/{}", criu[0])).exists(),
        "the idle CRIU ended with it"
    );
    assert!(
        std::fs::read_dir(&lab.images).unwrap().next().is_none(),
        "nothing was dumped"
    );
    // The testee was never stopped: it still answers a signal-free liveness check.
    assert!(
        std::path::Path::new(&format!("/proc/{}", pid.as_raw())).exists(),
        "the testee runs on"
    );
    let state = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw())).unwrap();
    let state = state.rsplit_once(") ").unwrap().1.chars().next().unwrap();
    assert!(
        matches!(state, 'S' | 'R'),
        "the testee is not stopped: {state}"
    );
    drop(images);
    drop(testee);
}
