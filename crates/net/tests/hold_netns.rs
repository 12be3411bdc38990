//! Holding inbound packets of a namespace while a TCP client keeps writing (needs root).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_net::hold::{Hold, HoldError};
use ferry_net::sdn::in_netns;

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, veth pairs and iptables); run \
         `cargo test -p ferry-net` as root"
    );
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes the network namespace when dropped, also on test failure.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Two namespaces A (client, 10.233.K.1) and B (container, eth0 10.233.K.2) on a veth pair.
fn pair(tag: &str, k: u8) -> (Netns, Netns) {
    let pid = std::process::id();
    let a = Netns::new(format!("ferrytest-hold-{tag}-{pid}-a"));
    let b = Netns::new(format!("ferrytest-hold-{tag}-{pid}-b"));
    run(&[
        "ip", "-n", &a.0, "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns",
        &b.0,
    ]);
    run(&[
        "ip",
        "-n",
        &a.0,
        "addr",
        "add",
        &format!("10.233.{k}.1/24"),
        "dev",
        "veth0",
    ]);
    run(&[
        "ip",
        "-n",
        &b.0,
        "addr",
        "add",
        &format!("10.233.{k}.2/24"),
        "dev",
        "eth0",
    ]);
    run(&["ip", "-n", &a.0, "link", "set", "veth0", "up"]);
    run(&["ip", "-n", &b.0, "link", "set", "eth0", "up"]);
    (a, b)
}

/// The NFQUEUE rules of the raw table (both chains a hold uses).
fn nfqueue_rules(ns: &str) -> Vec<String> {
    run(&[
        "ip", "netns", "exec", ns, "iptables", "-w", "-t", "raw", "-S",
    ])
    .lines()
    .filter(|l| l.contains("NFQUEUE"))
    .map(str::to_owned)
    .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Finish {
    Release,
    Discard,
}

fn scenario(tag: &str, k: u8, queue_num: u16, finish: Finish) {
    require_root();
    let (a, b) = pair(tag, k);
    let addr: SocketAddr = format!("10.233.{k}.2:7000").parse().unwrap();

    let listener = in_netns(&b.0, || TcpListener::bind(addr))
        .expect("enter B")
        .expect("bind listener in B");
    let received = Arc::new(AtomicUsize::new(0));
    let server_received = Arc::clone(&received);
    let server = thread::spawn(move || -> std::io::Result<Vec<String>> {
        let (conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut lines = Vec::new();
        for line in BufReader::new(conn).lines() {
            lines.push(line?);
            server_received.store(lines.len(), Ordering::SeqCst);
        }
        Ok(lines)
    });

    let mut client = in_netns(&a.0, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })
    .expect("enter A")
    .expect("connect from A to B");
    client.set_nodelay(true).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();

    let mut next = 0u32;
    let mut send = |client: &mut TcpStream, n: u32| {
        for _ in 0..n {
            client
                .write_all(format!("line {next}\n").as_bytes())
                .unwrap_or_else(|e| panic!("write of line {next} failed: {e}"));
            next += 1;
            thread::sleep(Duration::from_millis(5));
        }
    };
    send(&mut client, 10);

    let hold = Hold::start(&b.0, queue_num).expect("start hold");
    assert_eq!(nfqueue_rules(&b.0).len(), 2, "rules installed (in and out)");
    let started = Instant::now();
    let mut max_held = 0;
    let mut baseline = None;
    while started.elapsed() < Duration::from_millis(300) {
        send(&mut client, 1);
        max_held = max_held.max(hold.held());
        if baseline.is_none() && started.elapsed() >= Duration::from_millis(50) {
            baseline = Some(received.load(Ordering::SeqCst));
        }
    }
    assert!(max_held > 0, "packets were held during the hold");
    assert_eq!(
        baseline,
        Some(received.load(Ordering::SeqCst)),
        "nothing reached the listener while held"
    );
    let count = match finish {
        Finish::Release => hold.release().expect("release"),
        Finish::Discard => hold.discard().expect("discard"),
    };
    assert!(count > 0, "{finish:?} handled {count} packets");
    assert!(nfqueue_rules(&b.0).is_empty(), "no NFQUEUE rule left in B");

    send(&mut client, 10);
    client.shutdown(Shutdown::Write).expect("shutdown write");
    let mut rest = Vec::new();
    let n = client
        .read_to_end(&mut rest)
        .expect("client sees an orderly close, not a reset");
    assert_eq!(n, 0);

    let lines = server
        .join()
        .expect("server thread")
        .expect("server read without reset");
    let expected: Vec<String> = (0..next).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected, "every line exactly once, in order");
    eprintln!("{finish:?}: {count} packets, max held {max_held}, {next} lines");
}

#[test]
fn release_delivers_everything_in_order() {
    scenario("r", 1, 5, Finish::Release);
}

#[test]
fn discard_recovers_by_retransmission() {
    scenario("d", 2, 6, Finish::Discard);
}

#[test]
fn drop_discards_and_queue_is_exclusive() {
    require_root();
    let pid = std::process::id();
    let b = Netns::new(format!("ferrytest-hold-x-{pid}"));
    let hold = Hold::start(&b.0, 9).expect("start hold");
    match Hold::start(&b.0, 9) {
        Err(HoldError::QueueBusy { queue_num: 9, .. }) => {}
        other => panic!("expected QueueBusy, got {other:?}"),
    }
    // The failed start must not have touched the first hold's rules.
    assert_eq!(nfqueue_rules(&b.0).len(), 2);
    drop(hold);
    assert!(nfqueue_rules(&b.0).is_empty(), "Drop removed the rule");
    // The queue is free again.
    let hold = Hold::start(&b.0, 9).expect("restart hold");
    assert_eq!(hold.discard().expect("discard"), 0);
    assert!(nfqueue_rules(&b.0).is_empty());
}

#[test]
fn what_the_held_side_sends_is_held_too_until_release() {
    // A restored copy must not talk before its commit: its datagrams wait in the queue and
    // leave in order on release.
    require_root();
    let (a, b) = pair("o", 3);
    let to: SocketAddr = "10.233.3.1:7001".parse().unwrap();
    let rx = in_netns(&a.0, || std::net::UdpSocket::bind(to))
        .expect("enter A")
        .expect("bind in A");
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let tx = in_netns(&b.0, || std::net::UdpSocket::bind("10.233.3.2:0"))
        .expect("enter B")
        .expect("bind in B");
    let hold = Hold::start(&b.0, 11).expect("start hold");
    for i in 0..20u8 {
        tx.send_to(&[i], to).expect("send from B");
    }
    let mut buf = [0u8; 16];
    assert!(
        rx.recv_from(&mut buf).is_err(),
        "a datagram left the held side before the release"
    );
    assert!(hold.held() >= 20, "held {}", hold.held());
    hold.release().expect("release");
    let mut got = vec![];
    while let Ok((n, _)) = rx.recv_from(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, (0..20u8).collect::<Vec<_>>(), "all of them, in order");
    assert!(nfqueue_rules(&b.0).is_empty());
}
