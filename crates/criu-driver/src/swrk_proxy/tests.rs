use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::thread;

use nix::sys::socket::{
    recvmsg, sendmsg, shutdown, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, Shutdown, SockFlag, SockType,
};

use super::*;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, value: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn put_int(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

/// A `criu_req` of `kind` whose opts hold `opts` (field, value) varints, plus `ps` if given.
fn request(kind: u64, opts: &[(u64, u64)], ps: bool) -> Vec<u8> {
    let mut o = Vec::new();
    for &(f, v) in opts {
        put_int(&mut o, f, v);
    }
    put_bytes(&mut o, opt::LOG_FILE, b"dump.log");
    if ps {
        let mut p = Vec::new();
        put_bytes(&mut p, 1, b"127.0.0.1");
        put_int(&mut p, 2, 7000);
        put_bytes(&mut o, opt::PS, &p);
    }
    let mut req = Vec::new();
    put_int(&mut req, 1, kind);
    put_bytes(&mut req, 2, &o);
    req
}

const BASE: &[(u64, u64)] = &[(opt::IMAGES_DIR_FD, 5), (opt::PID, 4242)];

#[test]
fn only_page_server_dumps_are_relayed() {
    let sock = Some(OsStr::new("/run/ferry/ps.sock"));
    let dump = request(rpc::REQ_DUMP, BASE, true);
    assert_eq!(
        page_server_socket_for(&dump, sock),
        Some(PathBuf::from("/run/ferry/ps.sock"))
    );
    // No socket from the agent: CRIU unchanged.
    assert_eq!(page_server_socket_for(&dump, None), None);
    assert_eq!(page_server_socket_for(&dump, Some(OsStr::new(""))), None);
    // Not a dump, or no page server.
    assert_eq!(page_server_socket_for(&[0x08, 0x0a], sock), None);
    assert_eq!(
        page_server_socket_for(&request(2, BASE, true), sock),
        None,
        "restore"
    );
    assert_eq!(
        page_server_socket_for(&request(4, BASE, true), sock),
        None,
        "pre-dump"
    );
    assert_eq!(
        page_server_socket_for(&request(rpc::REQ_DUMP, BASE, false), sock),
        None
    );
    // Lazy pages: CRIU ignores ps.fd there.
    let lazy = [BASE, &[(opt::LAZY_PAGES, 1)]].concat();
    assert_eq!(
        page_server_socket_for(&request(rpc::REQ_DUMP, &lazy, true), sock),
        None
    );
    let not_lazy = [BASE, &[(opt::LAZY_PAGES, 0)]].concat();
    assert!(page_server_socket_for(&request(rpc::REQ_DUMP, &not_lazy, true), sock).is_some());
    // No pid (CRIU would dump the requester, now us), or descriptors we cannot re-point.
    let no_pid = [(opt::IMAGES_DIR_FD, 5)];
    assert_eq!(
        page_server_socket_for(&request(rpc::REQ_DUMP, &no_pid, true), sock),
        None
    );
    for f in [opt::STATUS_FD, opt::PIDFD_STORE_SK] {
        let o = [BASE, &[(f, 7)]].concat();
        assert_eq!(
            page_server_socket_for(&request(rpc::REQ_DUMP, &o, true), sock),
            None,
            "field {f}"
        );
    }
    // Malformed.
    assert_eq!(page_server_socket_for(&dump[..dump.len() - 2], sock), None);
}

#[test]
fn exit_codes_are_like_a_shell() {
    assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
    assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
    assert_eq!(exit_code(ExitStatus::from_raw(9)), 137, "SIGKILL");
    assert_eq!(
        exit_code(ExitStatus::from_raw(6 | 0x80)),
        134,
        "SIGABRT, core"
    );
}

#[test]
fn the_peers_directories_are_reopened_here() {
    let dir = std::env::temp_dir().join(format!("criu-driver-adopt-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("work")).unwrap();
    let images = File::open(&dir).unwrap();
    let work = File::open(dir.join("work")).unwrap();
    let opts = [
        (opt::IMAGES_DIR_FD, images.as_raw_fd() as u64),
        (opt::PID, 4242),
        (opt::WORK_DIR_FD, work.as_raw_fd() as u64),
    ];
    let req = request(rpc::REQ_DUMP, &opts, true);
    let (out, held) = adopt_peer_dirs(req.clone(), std::process::id() as i32).unwrap();
    assert_eq!(held.len(), 2);
    for (field, path) in [
        (opt::IMAGES_DIR_FD, dir.clone()),
        (opt::WORK_DIR_FD, dir.join("work")),
    ] {
        let fd = rpc::opts_fd(&out, field).unwrap();
        assert_ne!(Some(fd), rpc::opts_fd(&req, field));
        let (_, file) = held.iter().find(|(f, _)| *f == field).unwrap();
        assert_eq!(fd, file.as_raw_fd());
        assert_eq!(
            std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap(),
            path
        );
    }
    // The log note lands in the work directory.
    note_in_criu_log(&out, &held, "no agent");
    let log = std::fs::read_to_string(dir.join("work/dump.log")).unwrap();
    assert_eq!(log, "Error (ferry-criu): no agent\n");

    // A descriptor the peer does not have.
    let bad = request(
        rpc::REQ_DUMP,
        &[(opt::IMAGES_DIR_FD, 999_999), (opt::PID, 1)],
        true,
    );
    let err = adopt_peer_dirs(bad, std::process::id() as i32).unwrap_err();
    assert!(
        err.to_string()
            .contains("images directory (descriptor 999999"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

fn send(fd: &OwnedFd, data: &[u8], fds: &[RawFd]) {
    send_message(fd.as_fd(), data, fds).unwrap();
}

/// Receives one message: (bytes, descriptors), empty at end of stream.
fn recv(fd: &OwnedFd) -> (Vec<u8>, Vec<RawFd>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
    let mut fds = vec![];
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds.extend(r);
        }
    }
    let n = msg.bytes;
    (buf[..n].to_vec(), fds)
}

/// Reads what was written into the pipe behind a received descriptor, then closes it.
fn read_received(fd: RawFd) -> Vec<u8> {
    use std::io::Read;
    let mut b = [0u8; 64];
    let mut f = std::fs::File::open(format!("/proc/self/fd/{fd}")).unwrap();
    let n = f.read(&mut b).unwrap();
    nix::unistd::close(fd).unwrap();
    b[..n].to_vec()
}

#[test]
fn messages_and_descriptors_are_relayed_both_ways() {
    let (runc_here, runc_there) = seqpacket_pair();
    let (criu_here, criu_there) = seqpacket_pair();
    let relay = thread::spawn(move || forward(runc_here.as_fd(), criu_here.as_fd()));
    let (runc, criu) = (runc_there, criu_there);

    // runc -> CRIU, with a descriptor.
    let (r, w) = nix::unistd::pipe().unwrap();
    send(&runc, b"request", &[r.as_raw_fd()]);
    drop(r);
    let (data, fds) = recv(&criu);
    assert_eq!(data, b"request");
    assert_eq!(fds.len(), 1);
    nix::unistd::write(&w, b"from runc").unwrap();
    assert_eq!(read_received(fds[0]), b"from runc");

    // CRIU -> runc: two messages back to back keep their boundaries; a large one (near the
    // default socket buffer, which bounds SEQPACKET messages) with
    // two descriptors.
    let big: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
    let (r1, w1) = nix::unistd::pipe().unwrap();
    let (r2, w2) = nix::unistd::pipe().unwrap();
    send(&criu, b"notify pre-dump", &[]);
    send(&criu, &big, &[r1.as_raw_fd(), r2.as_raw_fd()]);
    drop((r1, r2));
    assert_eq!(recv(&runc), (b"notify pre-dump".to_vec(), vec![]));
    let (data, fds) = recv(&runc);
    assert_eq!(data, big);
    assert_eq!(fds.len(), 2);
    nix::unistd::write(&w1, b"one").unwrap();
    nix::unistd::write(&w2, b"two").unwrap();
    assert_eq!(read_received(fds[0]), b"one");
    assert_eq!(read_received(fds[1]), b"two");

    // The answer, the final response, and runc shutting its side: CRIU sees the end.
    send(&runc, b"notify ok", &[]);
    assert_eq!(recv(&criu).0, b"notify ok");
    send(&criu, b"final", &[]);
    assert_eq!(recv(&runc).0, b"final");
    shutdown(runc.as_raw_fd(), Shutdown::Write).unwrap();
    assert_eq!(recv(&criu), (vec![], vec![]), "CRIU sees runc's end");
    drop(criu);
    let stats = relay.join().unwrap().unwrap();
    assert_eq!(
        stats,
        ForwardStats {
            to_criu: 2,
            to_runc: 3,
            fds: 3,
            ..ForwardStats::default()
        }
    );
}

/// A notification as CRIU sends it: `criu_resp` type NOTIFY, success, notify { script }.
fn notification(script: &str) -> Vec<u8> {
    let mut out = vec![0x08, 6, 0x10, 1, 0x2a, script.len() as u8 + 2, 0x0a];
    out.push(script.len() as u8);
    out.extend_from_slice(script.as_bytes());
    out
}

#[test]
fn bookkeeping_notifications_are_answered_at_once_and_runc_s_answers_to_them_dropped() {
    let (runc_here, runc_there) = seqpacket_pair();
    let (criu_here, criu_there) = seqpacket_pair();
    let relay = thread::spawn(move || {
        forward_answering_early(runc_here.as_fd(), criu_here.as_fd(), &mut |_| {})
    });
    let (runc, criu) = (runc_there, criu_there);
    let ok = crate::rpc::notify_success();

    // post-restore: CRIU has its answer before runc has even read the notification.
    send(&criu, &notification("post-restore"), &[]);
    assert_eq!(recv(&criu).0, ok);
    // network-unlock: runc changes the network, CRIU waits for runc's own answer.
    send(&criu, &notification("network-unlock"), &[]);
    assert_eq!(recv(&runc).0, notification("post-restore"));
    assert_eq!(recv(&runc).0, notification("network-unlock"));
    // runc answers both, in order: the first is dropped, the second reaches CRIU.
    send(&runc, &ok, &[]);
    send(&runc, &[0x08, 6, 0x18, 1, 0x20, 0], &[]);
    assert_eq!(recv(&criu).0, [0x08, 6, 0x18, 1, 0x20, 0]);
    // post-resume answered at once; runc reports a failure of it, which is counted.
    send(&criu, &notification("post-resume"), &[]);
    assert_eq!(recv(&criu).0, ok);
    assert_eq!(recv(&runc).0, notification("post-resume"));
    send(&runc, &[0x08, 6, 0x18, 0], &[]);
    // The final answer goes to runc as ever.
    send(&criu, &[0x08, 2, 0x10, 1], &[]);
    assert_eq!(recv(&runc).0, [0x08, 2, 0x10, 1]);
    shutdown(runc.as_raw_fd(), Shutdown::Write).unwrap();
    assert_eq!(recv(&criu), (vec![], vec![]), "CRIU sees runc's end");
    drop(criu);
    let stats = relay.join().unwrap().unwrap();
    assert_eq!(
        stats,
        ForwardStats {
            to_criu: 1,
            to_runc: 4,
            answered_early: 2,
            early_failed: 1,
            ..ForwardStats::default()
        }
    );
}

#[test]
fn runc_may_answer_a_notification_answered_early_after_criu_has_ended() {
    let (runc_here, runc_there) = seqpacket_pair();
    let (criu_here, criu_there) = seqpacket_pair();
    let relay = thread::spawn(move || {
        forward_answering_early(runc_here.as_fd(), criu_here.as_fd(), &mut |_| {})
    });
    let (runc, criu) = (runc_there, criu_there);
    send(&criu, &notification("post-restore"), &[]);
    assert_eq!(recv(&criu).0, crate::rpc::notify_success());
    send(&criu, &[0x08, 2, 0x10, 1], &[]);
    drop(criu);
    // runc is slow: CRIU has answered and gone before runc writes its answer, which must
    // not fail (runc fails the whole restore on a broken pipe).
    thread::sleep(std::time::Duration::from_millis(50));
    assert!(!relay.is_finished(), "the relay waits for runc's answer");
    assert_eq!(recv(&runc).0, notification("post-restore"));
    send(&runc, &crate::rpc::notify_success(), &[]);
    assert_eq!(recv(&runc).0, [0x08, 2, 0x10, 1]);
    let stats = relay.join().unwrap().unwrap();
    assert_eq!(
        (stats.answered_early, stats.early_failed, stats.to_runc),
        (1, 0, 2)
    );
}

#[test]
fn criu_is_heard_out_after_runc_has_gone() {
    let (runc_here, runc_there) = seqpacket_pair();
    let (criu_here, criu_there) = seqpacket_pair();
    let relay = thread::spawn(move || forward(runc_here.as_fd(), criu_here.as_fd()));
    drop(runc_there);
    // CRIU notices that runc has gone; what it still sends is dropped.
    assert_eq!(recv(&criu_there), (vec![], vec![]));
    let iov = [IoSlice::new(b"late")];
    sendmsg::<()>(
        criu_there.as_raw_fd(),
        &iov,
        &[] as &[ControlMessage<'_>],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .unwrap();
    drop(criu_there);
    let stats = relay.join().unwrap().unwrap();
    assert_eq!(
        stats,
        ForwardStats {
            dropped: 1,
            ..ForwardStats::default()
        }
    );
}

#[test]
fn the_gate_lets_criu_run_only_when_the_agent_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gate");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let p = path.clone();
    let waiter = thread::spawn(move || wait_at_gate(&p));
    let (mut conn, _) = listener.accept().unwrap();
    // Still waiting until the byte arrives.
    thread::sleep(std::time::Duration::from_millis(50));
    assert!(!waiter.is_finished());
    std::io::Write::write_all(&mut conn, &[GATE_OPEN]).unwrap();
    let mut back = waiter.join().unwrap().unwrap();
    // The connection stays open: CRIU's success travels back on it.
    std::io::Write::write_all(&mut back, &[GATE_DONE]).unwrap();
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut conn, &mut b).unwrap();
    assert_eq!(b[0], GATE_DONE);

    // Closed without the byte: an error that names the gate.
    let p = path.clone();
    let waiter = thread::spawn(move || wait_at_gate(&p));
    let (conn, _) = listener.accept().unwrap();
    drop(conn);
    let e = waiter.join().unwrap().unwrap_err();
    assert!(matches!(e, SwrkProxyError::GateClosed { .. }), "{e}");
    assert!(e.to_string().contains("gate"), "{e}");

    // Any other byte is no permission either.
    let p = path.clone();
    let waiter = thread::spawn(move || wait_at_gate(&p));
    let (mut conn, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut conn, b"x").unwrap();
    assert!(matches!(
        waiter.join().unwrap().unwrap_err(),
        SwrkProxyError::GateClosed { .. }
    ));

    // No gate at all: a connect error with the path.
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    let e = wait_at_gate(&path).unwrap_err();
    assert!(matches!(e, SwrkProxyError::Gate { .. }), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}
