//! Runs the built `ferry-workload` binary: the `mem` protocol, finding its pages in the process's
//! memory from outside, corruption detection, argument errors, and `echo`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_workload::mem::{check_page, MAGIC, PAGE_SIZE, PAGE_WORDS};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-workload");

/// The child process; killed and reaped when dropped, also when a test fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Collects the child's stderr after killing it.
    fn stop(mut self) -> String {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

/// The tests start servers on ports picked by the kernel; run them one at a time so one test's
/// server never answers on a port another test picked.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary and waits (bounded) until it accepts connections on `port`.
fn start(args: &[&str], port: u16) -> (Running, Client) {
    let child = Command::new(BIN)
        .args(args)
        .arg("--port")
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("{BIN} {args:?} exited early: {status}: {}", child.stop());
        }
        let addr = ([127, 0, 0, 1], port).into();
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            return (child, Client::new(s));
        }
        assert!(Instant::now() < deadline, "{BIN} {args:?} never accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Client {
    out: TcpStream,
    input: BufReader<TcpStream>,
}

impl Client {
    fn new(s: TcpStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            out: s.try_clone().unwrap(),
            input: BufReader::new(s),
        }
    }

    fn connect(port: u16) -> Client {
        Client::new(TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    fn ask(&mut self, line: &str) -> String {
        self.out.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        self.input.read_line(&mut reply).unwrap();
        assert!(reply.ends_with('\n'), "reply to {line:?}: {reply:?}");
        reply.pop();
        reply
    }
}

/// `key=value` fields of a `status` reply.
fn fields(reply: &str) -> BTreeMap<String, String> {
    reply
        .split(' ')
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn mem_protocol() {
    let _serial = serial();
    let port = free_port();
    let (child, mut c) = start(&["mem", "--size-mib", "8", "--dirty-mib-s", "20"], port);

    let s = fields(&c.ask("status"));
    assert_eq!(s["intact"], "1");
    assert_eq!(s["bad"], "0");
    assert_eq!(s["size_mib"], "8");
    assert_eq!(s["dirty_mib_s"], "20");

    // 20 MiB/s is 5120 pages/s: pages are being rewritten.
    let deadline = Instant::now() + Duration::from_secs(10);
    let dirtied = loop {
        let s = fields(&c.ask("status"));
        let d: u64 = s["dirtied_pages"].parse().unwrap();
        if d > 0 {
            break d;
        }
        assert!(Instant::now() < deadline, "no page dirtied");
        std::thread::sleep(Duration::from_millis(50));
    };

    assert_eq!(c.ask("verify"), "verify ok pages=2048 bad=0");
    let s = fields(&c.ask("status"));
    assert_eq!(s["intact"], "1");
    assert!(s["passes"].parse::<u64>().unwrap() >= 1, "{s:?}");
    assert!(
        s["dirtied_pages"].parse::<u64>().unwrap() >= dirtied,
        "{s:?}"
    );

    // Other lines count like echo's, over all connections; commands do not count.
    assert_eq!(c.ask("hello"), "1 hello mem=ok");
    assert_eq!(c.ask("7 1234 5678"), "2 7 1234 5678 mem=ok");
    let mut c2 = Client::connect(port);
    assert_eq!(c2.ask("other"), "3 other mem=ok");
    assert!(c2.ask("status").starts_with("status intact=1 bad=0 "));
    assert_eq!(c.ask("again"), "4 again mem=ok");
    assert_eq!(c2.ask("verify"), "verify ok pages=2048 bad=0");

    let err = child.stop();
    assert!(err.contains("8 MiB (2048 pages) filled in"), "{err}");
    assert!(!err.contains("bad page"), "{err}");
}

/// Reads the child's memory through /proc/PID/mem and returns the address of every workload
/// page, by index. `None` when this process may not read it (no ptrace permission).
fn find_pages(pid: u32) -> Option<BTreeMap<u32, (u64, u32)>> {
    let mem = File::open(format!("/proc/{pid}/mem")).ok()?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut found = BTreeMap::new();
    let mut readable = false;
    let mut chunk = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (range, perms) = (it.next().unwrap(), it.next().unwrap());
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut at = start;
        while at < end {
            let n = chunk.len().min((end - at) as usize);
            if mem.read_exact_at(&mut chunk[..n], at).is_err() {
                break;
            }
            readable = true;
            for (k, bytes) in chunk[..n].chunks_exact(PAGE_SIZE).enumerate() {
                let words: Vec<u64> = bytes
                    .chunks_exact(8)
                    .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
                    .collect();
                if words[0] != MAGIC {
                    continue;
                }
                let (index, gen) = ((words[1] >> 32) as u32, words[1] as u32);
                if check_page(&words, index, gen).is_ok() {
                    let addr = at + (k * PAGE_SIZE) as u64;
                    assert!(
                        found.insert(index, (addr, gen)).is_none(),
                        "page {index} found twice"
                    );
                }
            }
            at += n as u64;
        }
    }
    readable.then_some(found)
}

fn write_mem(pid: u32, addr: u64, bytes: &[u8]) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    f.write_all_at(bytes, addr)
}

#[test]
fn mem_pages_are_found_from_outside_and_damage_is_detected() {
    let _serial = serial();
    let port = free_port();
    let args = [
        "mem",
        "--size-mib",
        "8",
        "--dirty-mib-s",
        "0",
        "--verify-mib-s",
        "0",
    ];
    let (child, mut c) = start(&args, port);
    let pages = find_pages(child.pid()).unwrap_or_else(|| {
        panic!(
            "cannot read /proc/{}/mem: this test needs to read its own child's memory \
             (root, or ptrace allowed by kernel.yama.ptrace_scope)",
            child.pid()
        )
    });
    // Every page, each exactly at one OS page, at generation 0 (nothing dirties).
    assert_eq!(pages.len(), 2048);
    assert_eq!(
        pages.keys().copied().collect::<Vec<_>>(),
        (0..2048).collect::<Vec<_>>()
    );
    assert!(pages
        .values()
        .all(|&(addr, gen)| addr % PAGE_SIZE as u64 == 0 && gen == 0));
    // Contiguous, in index order.
    let base = pages[&0].0;
    assert!(pages
        .iter()
        .all(|(&i, &(addr, _))| addr == base + u64::from(i) * PAGE_SIZE as u64));

    // Flip one bit of word 100 of page 5.
    let word_addr = pages[&5].0 + 100 * 8;
    let mut word = [0u8; 8];
    File::open(format!("/proc/{}/mem", child.pid()))
        .unwrap()
        .read_exact_at(&mut word, word_addr)
        .unwrap();
    let flipped = (u64::from_ne_bytes(word) ^ (1 << 17)).to_ne_bytes();
    if let Err(e) = write_mem(child.pid(), word_addr, &flipped) {
        panic!(
            "cannot write /proc/{}/mem ({e}): this test needs to write its own child's memory",
            child.pid()
        );
    }
    let reply = c.ask("verify");
    assert!(
        reply.starts_with("verify bad pages=2048 bad=1 first=5 wrong_word:word=100,byte=800,"),
        "{reply}"
    );
    assert!(reply.ends_with(",bad_words=1"), "{reply}");
    assert_eq!(reply.split(' ').count(), 6, "{reply}");
    assert!(c
        .ask("status")
        .starts_with("status intact=0 bad=1 passes=1 "));
    assert_eq!(c.ask("x"), "1 x mem=bad");

    // Zero ("lose") page 9: counted, `first` stays page 5.
    write_mem(child.pid(), pages[&9].0, &[0; PAGE_SIZE]).unwrap();
    let reply = c.ask("verify");
    assert!(
        reply.starts_with("verify bad pages=2048 bad=2 first=5 "),
        "{reply}"
    );
    // Still two distinct bad pages after another pass.
    assert!(c.ask("verify").starts_with("verify bad pages=2048 bad=2 "));

    let err = child.stop();
    assert!(
        err.contains("bad page 5 (generation 0): wrong_word:word=100"),
        "{err}"
    );
    assert!(
        err.contains("bad page 9 (generation 0): lost_page:all_zero"),
        "{err}"
    );
    assert_eq!(PAGE_WORDS * 8, PAGE_SIZE);
}

fn run(args: &[&str]) -> Output {
    // Bounded: every case below exits right after parsing its arguments.
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn bad_arguments_exit_2() {
    let _serial = serial();
    for (args, msg) in [
        (
            &["mem", "--size-mib", "0"][..],
            "--size-mib must be an integer 1..=65536",
        ),
        (&["mem", "--size-mib", "65537"], "--size-mib must be"),
        (
            &["mem", "--dirty-mib-s", "-1"],
            "--dirty-mib-s must be a finite number >= 0",
        ),
        (&["mem", "--verify-mib-s", "nan"], "--verify-mib-s must be"),
        (&["mem", "--port", "x"], "--port must be"),
        (&["mem", "--frobnicate"], "unknown argument"),
        (&["mem", "--size-mib"], "--size-mib needs a value"),
    ] {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("ferry-workload echo") && err.contains("ferry-workload mem"),
        "{err}"
    );
}

#[test]
fn echo_unchanged() {
    let _serial = serial();
    let port = free_port();
    let (_child, mut c) = start(&["echo"], port);
    assert_eq!(c.ask("a b"), "1 a b");
    assert_eq!(Client::connect(port).ask("verify"), "2 verify");
    assert_eq!(c.ask("status"), "3 status");
}
