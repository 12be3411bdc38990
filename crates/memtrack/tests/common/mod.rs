//! Shared helpers of memtrack's integration tests: the testee process and checks on /proc.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use memtrack::{Region, PAGE_SIZE};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The test program, killed and reaped on drop.
pub struct Testee {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Start of the main region.
    pub base: u64,
    /// Pages in the main region.
    pub pages: usize,
    reaped: bool,
}

impl Testee {
    /// Starts the testee with a region of `pages` pages and optionally a second thread.
    pub fn spawn(pages: usize, thread: bool) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_memtrack-testee"));
        cmd.arg(pages.to_string());
        if thread {
            cmd.arg("--thread");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn memtrack-testee");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut me = Testee {
            child,
            stdin,
            lines,
            base: 0,
            pages,
            reaped: false,
        };
        let ready = me.recv();
        let words: Vec<&str> = ready.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"ready"), "testee said {ready:?}");
        me.base = parse_hex(words[1]);
        assert_eq!(me.base % PAGE_SIZE, 0);
        me
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends one command line without waiting for the answer.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to testee");
        self.stdin.flush().expect("flush testee stdin");
    }

    /// Waits for one answer line.
    pub fn recv(&mut self) -> String {
        match self.lines.recv_timeout(ANSWER_TIMEOUT) {
            Ok(l) => {
                assert!(!l.starts_with("error"), "testee answered {l:?}");
                l
            }
            Err(e) => panic!(
                "testee (pid {}) gave no answer within {:?}: {e}",
                self.pid(),
                ANSWER_TIMEOUT
            ),
        }
    }

    /// Sends a command and returns its answer.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.recv()
    }

    fn value_of(answer: &str) -> u8 {
        answer
            .strip_prefix("ok ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {answer:?}"))
    }

    /// The main thread writes one byte to each page; returns the value written.
    pub fn write(&mut self, pages: &[usize]) -> u8 {
        let a = self.cmd(&format!("write {}", join(pages)));
        Self::value_of(&a)
    }

    /// The second thread writes one byte to each page; returns the value written.
    pub fn twrite(&mut self, pages: &[usize]) -> u8 {
        let a = self.cmd(&format!("twrite {}", join(pages)));
        Self::value_of(&a)
    }

    /// Writes pages of the k-th region made with `map`.
    pub fn mwrite(&mut self, k: usize, pages: &[usize]) -> u8 {
        let a = self.cmd(&format!("mwrite {k} {}", join(pages)));
        Self::value_of(&a)
    }

    /// First byte of a page of the main region.
    pub fn read(&mut self, page: usize) -> u8 {
        self.cmd(&format!("read {page}"))
            .parse()
            .expect("read answer")
    }

    /// Maps a new region; returns its address.
    pub fn map(&mut self, pages: usize) -> u64 {
        parse_hex(&self.cmd(&format!("map {pages}")))
    }

    /// Writes every k-th page; returns how many.
    pub fn stride(&mut self, k: usize) -> usize {
        let a = self.cmd(&format!("stride {k}"));
        a.strip_prefix("ok ").unwrap().parse().unwrap()
    }

    /// Bumps the .data static; returns its address.
    pub fn bump_static(&mut self) -> u64 {
        let a = self.cmd("static");
        parse_hex(a.split_whitespace().next().unwrap())
    }

    /// SIGKILL without reaping (the process becomes a zombie).
    pub fn kill_no_reap(&mut self) {
        self.child.kill().expect("kill testee");
        // Wait until the kernel has torn it down (state Z).
        for _ in 0..1000 {
            if state(self.pid()) == "Z" {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("testee did not become a zombie");
    }

    /// SIGKILL and reap.
    pub fn kill_and_reap(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Asks the testee to exit and reaps it; asserts a clean exit.
    pub fn quit(mut self) {
        self.send("quit");
        let st = self.child.wait().expect("wait testee");
        self.reaped = true;
        assert!(st.success(), "testee exited with {st}");
    }

    /// Pages (indices) of the main region covered by `ranges`.
    pub fn pages_in(&self, ranges: &[Region]) -> BTreeSet<usize> {
        pages_in(ranges, self.base, self.pages)
    }
}

impl Drop for Testee {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn join(pages: &[usize]) -> String {
    pages
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("not a hex address {s:?}: {e}"))
}

/// Page indices of `[base, base + pages * PAGE_SIZE)` covered by `ranges`.
pub fn pages_in(ranges: &[Region], base: u64, pages: usize) -> BTreeSet<usize> {
    let end = base + pages as u64 * PAGE_SIZE;
    let mut out = BTreeSet::new();
    for r in ranges {
        let lo = r.start.max(base);
        let hi = r.end.min(end);
        let mut a = lo;
        while a < hi {
            out.insert(((a - base) / PAGE_SIZE) as usize);
            a += PAGE_SIZE;
        }
    }
    out
}

/// The state letter of a process.
pub fn state(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_default()
}

/// Descriptions of the userfaultfds a process holds (from /proc/PID/fd and fdinfo).
pub fn userfaultfds(pid: i32) -> Vec<String> {
    let mut found = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list /proc/PID/fd");
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let link = std::fs::read_link(e.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{name}")).unwrap_or_default();
        if link.contains("userfaultfd") || info.lines().any(|l| l.starts_with("API:")) {
            found.push(format!("fd {name} -> {link}: {}", info.replace('\n', " ")));
        }
    }
    found
}

/// Mappings of a process whose VmFlags contain `uw` (registered for userfaultfd WP).
pub fn uffd_wp_mappings(pid: i32) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut header = String::new();
    let mut out = Vec::new();
    for line in smaps.lines() {
        if line.split_whitespace().next().is_some_and(|w| {
            w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            header = line.to_string();
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "uw") {
                out.push(header.clone());
            }
        }
    }
    out
}

/// The /proc/PID/maps line containing `addr`.
pub fn mapping_of(pid: i32, addr: u64) -> String {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    maps.lines()
        .find(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (s, e) = range.split_once('-').unwrap_or(("0", "0"));
            let (s, e) = (parse_hex(s), parse_hex(e));
            s <= addr && addr < e
        })
        .unwrap_or_else(|| panic!("no mapping contains {addr:#x}"))
        .to_string()
}
