//! The page-server protocol layer against real CRIU: `criu dump --page-server` into
//! [`criu_driver::page_server::proxy`], into a real `criu page-server`, then `criu restore` of
//! the images and a memory check inside the restored process.
//!
//! These tests need root and CRIU >= 4.2 (`scripts/setup.sh`); without them they fail and
//! say why. They run one at a time (a global lock) and print their timings (`--nocapture`).
//! `FERRY_KEEP_TEST_DIRS=1` keeps the image directories for inspection.

#[allow(dead_code)] // `page_is_intact` is for the testee.
#[path = "../src/bin/criu-driver-testee/pattern.rs"]
mod pattern;

use std::collections::{HashMap, HashSet};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criu_driver::page_server::{
    proxy_with, Command, DstId, HookError, ImageKind, Message, PageFlags, ProxyOptions, ProxyStats,
};
use criu_testkit::{
    restore_and_check, serial, start_page_server, start_testee, Lab, HEAP_MIB, HEAP_PAGES,
    MEMFD_PAGES, STEP,
};
use nix::unistd::Pid;

use pattern::{fill_page, page_identity, HEAP_MAGIC, MEMFD_MAGIC, PAGE};

/// A work directory with an `images/` subdirectory, for the testee of this package.
fn lab(name: &str) -> Lab {
    Lab::new(&format!("criu-driver-{name}")).with_testee(env!("CARGO_BIN_EXE_criu-driver-testee"))
}

type Hook = Box<dyn FnMut(&Message, &mut [u8]) -> Result<(), HookError> + Send>;

/// How the dump reaches the proxy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    /// `--page-server --address 127.0.0.1 --port P`: CRIU connects to the proxy over TCP.
    Tcp,
    /// `--page-server --ps-socket FD`: one end of a UNIX socket pair, inherited.
    PsSocket,
}

/// Where CRIU finds the proxy, and the thread that runs it (returning its result).
struct ProxyThread {
    criu_args: Vec<String>,
    criu_end: Option<UnixStream>,
    handle: JoinHandle<Result<ProxyStats, String>>,
}

/// Starts the proxy: it waits for CRIU (over TCP on an automatic port, or on a socket pair)
/// and relays the conversation to the page server.
fn start_proxy(transport: Transport, page_server_port: u16, mut hook: Hook) -> ProxyThread {
    let opts = ProxyOptions {
        idle_timeout: Some(STEP),
        ..ProxyOptions::default()
    };
    let connect = move || {
        TcpStream::connect(("127.0.0.1", page_server_port))
            .map_err(|e| format!("connecting to the page server: {e}"))
    };
    match transport {
        Transport::Tcp => {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let handle = thread::spawn(move || {
                listener.set_nonblocking(true).unwrap();
                let deadline = Instant::now() + STEP;
                let from_criu = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() > deadline {
                                return Err("CRIU never connected to the proxy".into());
                            }
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                };
                from_criu.set_nonblocking(false).unwrap();
                proxy_with(from_criu, connect()?, &opts, &mut *hook).map_err(|e| e.to_string())
            });
            ProxyThread {
                criu_args: vec![
                    "--page-server".into(),
                    "--address".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port.to_string(),
                ],
                criu_end: None,
                handle,
            }
        }
        Transport::PsSocket => {
            let (criu_end, proxy_end) = UnixStream::pair().unwrap();
            let handle = thread::spawn(move || {
                proxy_with(proxy_end, connect()?, &opts, &mut *hook).map_err(|e| e.to_string())
            });
            ProxyThread {
                criu_args: vec![
                    "--page-server".into(),
                    "--ps-socket".into(),
                    criu_end.as_raw_fd().to_string(),
                ],
                criu_end: Some(criu_end),
                handle,
            }
        }
    }
}

/// How long the dump waited for the page server's answer to CLOSE (from its log).
fn close_wait(lab: &Lab) -> Option<f64> {
    let log = std::fs::read_to_string(lab.images.join("dump.log")).ok()?;
    let stamp =
        |l: &str| -> Option<f64> { l.strip_prefix('(')?.split(')').next()?.trim().parse().ok() };
    let mut lines = log.lines();
    let at = lines
        .by_ref()
        .find(|l| l.contains("Disconnect from the page server"))?;
    let next = lines.next()?;
    Some(stamp(next)? - stamp(at)?)
}

/// blake3 of every page in the lab's pages-*.img, and their total size.
fn pages_in_images(lab: &Lab) -> (HashSet<[u8; 32]>, u64) {
    let mut hashes = HashSet::new();
    let mut total = 0;
    for entry in std::fs::read_dir(&lab.images).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("pages-") && name.ends_with(".img") {
            let data = std::fs::read(&path).unwrap();
            assert_eq!(data.len() % PAGE, 0, "{name} is not whole pages");
            total += data.len() as u64;
            for page in data.chunks_exact(PAGE) {
                hashes.insert(*blake3::hash(page).as_bytes());
            }
        }
    }
    (hashes, total)
}

fn expected_page_hashes(magic: u64, pages: u64) -> Vec<[u8; 32]> {
    let mut page = vec![0u8; PAGE];
    (0..pages)
        .map(|i| {
            fill_page(magic, i, &mut page);
            *blake3::hash(&page).as_bytes()
        })
        .collect()
}

/// One dump through the proxy with `hook`, checked as far as CRIU goes; returns the stats,
/// the dump's duration and the testee's pid.
fn dump_through_proxy(lab: &Lab, transport: Transport, hook: Hook) -> (ProxyStats, Duration, Pid) {
    let (mut page_server, ps_port) = start_page_server(lab);
    let mut testee = start_testee(lab);
    let pid = testee.pid();
    let mut proxy = start_proxy(transport, ps_port, hook);
    let pid_arg = pid.to_string();
    let mut args = vec!["dump", "-t", &pid_arg, "-D", lab.images.to_str().unwrap()];
    args.extend(proxy.criu_args.iter().map(String::as_str));
    let took = lab.run_criu_passing(&args, "dump.log", proxy.criu_end.take());
    // CRIU killed the testee; reap it so that its pid is free for the restore.
    let status = testee.wait(STEP);
    assert!(!status.success(), "the dump should have killed the testee");
    let stats = proxy.handle.join().expect("proxy thread panicked");
    let stats = stats.unwrap_or_else(|e| panic!("proxy failed: {e}"));
    let ps_status = page_server.wait(STEP);
    assert!(
        ps_status.success(),
        "criu page-server failed ({ps_status}):\n{}",
        lab.log_tail("page-server.log")
    );
    (stats, took, pid)
}

fn check_protocol(stats: &ProxyStats, pid: Pid) {
    let me = DstId::pid(pid.as_raw() as u32).unwrap();
    // What a dump of one process with a memfd looks like.
    assert_eq!(stats.count(Command::Open2), 2, "{:?}", stats.images);
    assert!(stats.images.contains(&me), "{:?}", stats.images);
    assert_eq!(
        stats
            .images
            .iter()
            .filter(|d| d.kind() == ImageKind::Shmem)
            .count(),
        1,
        "the memfd: {:?}",
        stats.images
    );
    let last = stats.trace.last();
    assert!(
        last == Some(&Message::Close) || last == Some(&Message::ForceClose),
        "{last:?}"
    );
    assert!(matches!(stats.trace.first(), Some(Message::Open2 { .. })));
    assert_eq!(stats.close_status, Some(0));
    assert_eq!(
        stats.count(Command::Add) + stats.count(Command::Hole) + stats.count(Command::Get),
        0
    );
    let flags: HashSet<u32> = stats
        .trace
        .iter()
        .filter_map(|m| m.page_flags().map(PageFlags::bits))
        .collect();
    assert!(
        flags.contains(&PageFlags::PRESENT_LAZY.bits()),
        "anonymous memory is sent PRESENT|LAZY: {flags:?}"
    );
    assert!(
        flags.iter().all(|f| *f == 4 || *f == 6),
        "a plain dump sends PRESENT and PRESENT|LAZY only: {flags:?}"
    );
    assert!(
        stats.payload_bytes >= (HEAP_MIB << 20) + MEMFD_PAGES * PAGE as u64,
        "the proxy saw {} bytes of pages, less than the testee's {HEAP_MIB} MiB heap and memfd",
        stats.payload_bytes
    );
    assert_eq!(stats.payload_bytes, stats.payload_pages * PAGE as u64);
}

fn print_sequence(stats: &ProxyStats) {
    let mut line = String::new();
    for m in &stats.trace {
        let item = match m {
            Message::Open2 { dst_id } => format!("OPEN2({dst_id}) "),
            Message::Add {
                nr_pages, flags, ..
            } => format!("ADD_F[{flags:?}]x{nr_pages} "),
            other => format!("{:?} ", other.command()),
        };
        line.push_str(&item);
    }
    eprintln!("sequence: {line}");
    eprintln!(
        "messages: {:?}, payload: {} pages / {} bytes, headers {} bytes, replies {} bytes, hook calls {}",
        stats.messages,
        stats.payload_pages,
        stats.payload_bytes,
        stats.header_bytes,
        stats.reply_bytes,
        stats.hook_calls
    );
}

/// What the recording hook saw.
#[derive(Default)]
struct Seen {
    pages: u64,
    hashes: HashSet<[u8; 32]>,
}

#[test]
fn dump_through_the_proxy_restores_intact_memory() {
    let _serial = serial();
    let lab = lab("proxy");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let hook: Hook = {
        let seen = seen.clone();
        Box::new(move |m, buf| {
            assert_eq!(buf.len() as u64, m.payload_len());
            let mut seen = seen.lock().unwrap();
            for page in buf.chunks_exact(PAGE) {
                seen.hashes.insert(*blake3::hash(page).as_bytes());
                seen.pages += 1;
            }
            Ok(())
        })
    };
    let (stats, took, pid) = dump_through_proxy(&lab, Transport::Tcp, hook);
    print_sequence(&stats);
    check_protocol(&stats, pid);

    // The hook saw every page that was forwarded.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.pages, stats.payload_pages);
    // The page server wrote exactly what went through, and all of the testee's pages.
    let (in_images, image_bytes) = pages_in_images(&lab);
    assert_eq!(
        image_bytes, stats.payload_bytes,
        "pages-*.img hold every byte forwarded"
    );
    assert_eq!(in_images, seen.hashes, "pages-*.img hold what the hook saw");
    for (magic, n, what) in [
        (HEAP_MAGIC, HEAP_PAGES, "heap"),
        (MEMFD_MAGIC, MEMFD_PAGES, "memfd"),
    ] {
        let missing = expected_page_hashes(magic, n)
            .iter()
            .filter(|h| !in_images.contains(*h))
            .count();
        assert_eq!(
            missing, 0,
            "{missing} of {n} {what} pages are not in pages-*.img"
        );
    }

    let (code, result, restore_took) = restore_and_check(&lab);
    eprintln!(
        "dump through proxy (TCP): {:.0} ms (proxy active {:.0} ms, CLOSE answered after {:.0} ms), restore {:.0} ms; testee: {}",
        took.as_secs_f64() * 1e3,
        stats.elapsed.as_secs_f64() * 1e3,
        close_wait(&lab).unwrap_or(f64::NAN) * 1e3,
        restore_took.as_secs_f64() * 1e3,
        result.trim()
    );
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");
}

/// A content-addressed store as the destination would keep it.
#[derive(Default)]
struct Store {
    pages: HashMap<[u8; 32], Vec<u8>>,
    lookups: u64,
}

#[test]
fn pages_replaced_from_a_content_store_restore_intact_memory() {
    let _serial = serial();
    let lab = lab("store");
    let store = Arc::new(Mutex::new(Store::default()));
    let hook: Hook = {
        let store = store.clone();
        Box::new(move |_m, buf| {
            let mut store = store.lock().unwrap();
            for page in buf.chunks_exact_mut(PAGE) {
                // The source side: hash, keep the page in the store, send only the hash.
                let hash = *blake3::hash(page).as_bytes();
                store.pages.entry(hash).or_insert_with(|| page.to_vec());
                page.fill(0);
                // The destination side: the page comes back from the store by its hash.
                let stored = store
                    .pages
                    .get(&hash)
                    .ok_or_else(|| format!("page {} not in the store", blake3::Hash::from(hash)))?;
                page.copy_from_slice(stored);
                store.lookups += 1;
            }
            Ok(())
        })
    };
    let (stats, took, pid) = dump_through_proxy(&lab, Transport::Tcp, hook);
    check_protocol(&stats, pid);
    let store = std::mem::take(&mut *store.lock().unwrap());
    assert_eq!(store.lookups, stats.payload_pages);
    assert!(
        store.pages.len() as u64 >= HEAP_PAGES + MEMFD_PAGES,
        "every testee page is distinct: {} in the store",
        store.pages.len()
    );
    let (code, result, _) = restore_and_check(&lab);
    eprintln!(
        "dump through proxy with store: {:.0} ms, {} pages, {} distinct; testee: {}",
        took.as_secs_f64() * 1e3,
        stats.payload_pages,
        store.pages.len(),
        result.trim()
    );
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");
}

#[test]
fn a_corrupted_page_fails_the_memory_check() {
    let _serial = serial();
    let lab = lab("corrupt");
    const VICTIM: u64 = 1000;
    let corrupted = Arc::new(Mutex::new(0u32));
    let hook: Hook = {
        let corrupted = corrupted.clone();
        Box::new(move |_m, buf| {
            for page in buf.chunks_exact_mut(PAGE) {
                if page_identity(page) == Some((HEAP_MAGIC, VICTIM)) {
                    page[2048] ^= 0x01;
                    *corrupted.lock().unwrap() += 1;
                }
            }
            Ok(())
        })
    };
    let (_stats, _, _) = dump_through_proxy(&lab, Transport::Tcp, hook);
    assert_eq!(
        *corrupted.lock().unwrap(),
        1,
        "heap page {VICTIM} passed once"
    );
    let (code, result, _) = restore_and_check(&lab);
    eprintln!("corrupted dump; testee: {}", result.trim());
    assert_eq!(code, 1, "the testee must report the bad page: {result}");
    assert!(result.starts_with("FAIL "), "{result}");
    assert!(
        result.contains("heap_bad=1 ") && result.contains(&format!("first_heap_bad=[{VICTIM}]")),
        "{result}"
    );
    assert!(result.contains("memfd_bad=0 "), "{result}");
}

/// The same process dumped straight to disk: the reference for the timings above.
#[test]
fn plain_dump_to_disk_for_comparison() {
    let _serial = serial();
    let lab = lab("plain");
    let mut testee = start_testee(&lab);
    let pid = testee.pid();
    let took = lab.run_criu(
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            lab.images.to_str().unwrap(),
        ],
        "dump.log",
    );
    testee.wait(STEP);
    let (_, image_bytes) = pages_in_images(&lab);
    assert!(image_bytes >= (HEAP_MIB << 20) + MEMFD_PAGES * PAGE as u64);
    let (code, result, restore_took) = restore_and_check(&lab);
    eprintln!(
        "plain dump to disk: {:.0} ms ({image_bytes} bytes of pages), restore {:.0} ms; testee: {}",
        took.as_secs_f64() * 1e3,
        restore_took.as_secs_f64() * 1e3,
        result.trim()
    );
    assert_eq!(code, 0, "memory check after restore: {result}");
}

/// `--ps-socket`: the dump speaks over an inherited UNIX socket, which CRIU cannot cork
/// (TCP_CORK fails with a warning), so CLOSE is not held back for the 200 ms cork timeout.
#[test]
fn dump_over_an_inherited_socket_restores_intact_memory() {
    let _serial = serial();
    let lab = lab("ps-socket");
    let pages = Arc::new(Mutex::new(0u64));
    let hook: Hook = {
        let pages = pages.clone();
        Box::new(move |m, _buf| {
            *pages.lock().unwrap() += m.payload_pages();
            Ok(())
        })
    };
    let (stats, took, pid) = dump_through_proxy(&lab, Transport::PsSocket, hook);
    check_protocol(&stats, pid);
    assert_eq!(stats.trace.last(), Some(&Message::ForceClose));
    assert_eq!(*pages.lock().unwrap(), stats.payload_pages);
    let (code, result, _) = restore_and_check(&lab);
    eprintln!(
        "dump through proxy (--ps-socket): {:.0} ms (CLOSE answered after {:.1} ms); testee: {}",
        took.as_secs_f64() * 1e3,
        close_wait(&lab).unwrap_or(f64::NAN) * 1e3,
        result.trim()
    );
    assert_eq!(code, 0, "memory check after restore: {result}");
}
