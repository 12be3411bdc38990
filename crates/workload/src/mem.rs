//! `ferry-workload mem`: a memory workload whose whole memory can be checked after a migration.
//!
//! ```text
//! ferry-workload mem [--port P] [--size-mib N] [--dirty-mib-s R] [--verify-mib-s V]
//! ```
//!
//! Defaults: port 7000, N = 256, R = 0, V = 256. N is 1..=65536; R and V are finite and >= 0
//! (fractions allowed). A bad argument is reported on stderr with exit code 2.
//!
//! The process holds N MiB of pages (4096 bytes each, N * 256 pages) in one buffer whose pages
//! start on 4096-byte boundaries, so every workload page is exactly one OS page. It fills every
//! page (generation 0) *before* it binds its TCP port: a client that can connect knows the memory
//! is resident and ready. One worker thread then owns the memory: every ~1 ms it rewrites pages at
//! R MiB/s (each rewritten page gets its generation + 1), spread over the whole buffer along a
//! fixed stride permutation, and checks pages at V MiB/s in a cycling sweep. Work owed per tick
//! is capped at 100 ms worth, so the worker does not burst after the process was frozen.
//!
//! # Page format (a contract: tools that scan a memory image rely on it)
//!
//! A page is 512 native-endian `u64` words. For page `index` (0-based, `u32`) at generation `gen`
//! (`u32`, 0 after the fill, + 1 on every rewrite, wrapping):
//!
//! * word 0 = [`MAGIC`] = `0x4645_5252_594D_454D`: the ASCII bytes `FERRYMEM` read as a
//!   big-endian integer. On a little-endian machine (x86-64, aarch64) the page's first 8 bytes in
//!   memory are therefore `MEMYRREF` (`4D 45 4D 59 52 52 45 46`).
//! * word 1 = [`header`]`(index, gen)` = `(index as u64) << 32 | gen as u64`.
//! * words `w` in 2..512 = [`page_word`]`(index, gen, w)` =
//!   `mix64(mix64(word1 ^ MAGIC) + w * 0x9E37_79B9_7F4A_7C15)`, with wrapping `u64` arithmetic
//!   and the splitmix64 finalizer
//!   `mix64(z) = { z = (z ^ z >> 30) * 0xBF58_476D_1CE4_E5B9; z = (z ^ z >> 27) * 0x94D0_49BB_1331_11EB; z ^ z >> 31 }`.
//!
//! The content is incompressible, and [`check_page`] finds any flipped bit, a page of another
//! index or generation (for example a stale copy from an earlier pre-copy round) and a zeroed
//! ("lost") page.
//!
//! # Protocol
//!
//! TCP on `[::]:P` (dual-stack; `0.0.0.0:P` where IPv6 is off), one thread per connection, one line per request (`\n`, an optional `\r`
//! before it is dropped); every reply is one line ending in `\n`.
//!
//! * `verify`: the worker checks every page at once, at full speed, then replies
//!   `verify ok pages=<pages> bad=0`, or
//!   `verify bad pages=<pages> bad=<k> first=<index> <description>` (the description has no
//!   spaces, see [`PageFault`]'s `Display`). `bad` and `first` are sticky: `bad` counts the
//!   distinct pages ever found bad, `first` is the first one found.
//! * `status`: `status intact=<1|0> bad=<k> passes=<n> dirtied_pages=<m> size_mib=<N> dirty_mib_s=<R>`,
//!   where `passes` counts complete checks of every page (the background sweep's and `verify`'s)
//!   and `dirtied_pages` the page rewrites since the start.
//! * any other line `L`: increments one request counter shared by all connections and replies
//!   `<counter> <L> mem=<ok|bad>` (like `echo`, whose replies are `<counter> <L>`).

use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes in a workload page (one OS page).
pub const PAGE_SIZE: usize = 4096;
/// `u64` words in a workload page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;
/// Workload pages in one MiB.
pub const PAGES_PER_MIB: usize = (1 << 20) / PAGE_SIZE;
/// Word 0 of every page: the bytes `FERRYMEM` read big-endian.
pub const MAGIC: u64 = 0x4645_5252_594D_454D;
/// Largest `--size-mib`.
pub const MAX_SIZE_MIB: u32 = 65536;

/// Usage of the `mem` subcommand.
pub const USAGE: &str =
    "ferry-workload mem [--port PORT] [--size-mib N] [--dirty-mib-s R] [--verify-mib-s V]";

/// splitmix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Length of a worker tick.
const TICK: Duration = Duration::from_millis(1);
/// At most this much work (in seconds at the configured rate) is owed at once.
const MAX_OWED_S: f64 = 0.1;
/// Bad pages reported on stderr (the count goes on in `status`).
const MAX_LOGGED_BAD: u64 = 16;

/// The splitmix64 finalizer, a bijection on `u64`.
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word 1 of page `index` at generation `gen`.
pub fn header(index: u32, gen: u32) -> u64 {
    (u64::from(index) << 32) | u64::from(gen)
}

fn seed(header: u64) -> u64 {
    mix64(header ^ MAGIC)
}

fn data_word(seed: u64, w: usize) -> u64 {
    mix64(seed.wrapping_add((w as u64).wrapping_mul(GAMMA)))
}

/// Word `w` (0..512) of page `index` at generation `gen`.
pub fn page_word(index: u32, gen: u32, w: usize) -> u64 {
    assert!(w < PAGE_WORDS, "a page has {PAGE_WORDS} words");
    match w {
        0 => MAGIC,
        1 => header(index, gen),
        _ => data_word(seed(header(index, gen)), w),
    }
}

/// Writes page `index` at generation `gen` into `words` (exactly [`PAGE_WORDS`] long).
pub fn fill_page(words: &mut [u64], index: u32, gen: u32) {
    assert_eq!(words.len(), PAGE_WORDS, "a page is {PAGE_WORDS} words");
    let h = header(index, gen);
    let s = seed(h);
    words[0] = MAGIC;
    words[1] = h;
    for (w, x) in words.iter_mut().enumerate().skip(2) {
        *x = data_word(s, w);
    }
}

/// What [`check_page`] found wrong with a page. `Display` gives one token without spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageFault {
    /// Every word is zero: the page's content is lost (e.g. a fresh zero page in its place).
    Lost,
    /// Word 0 is not [`MAGIC`] (and the page is not all zero).
    WrongMagic {
        /// Word 0 as found.
        found: u64,
    },
    /// Word 1 names another page or generation (e.g. a stale copy of the page).
    WrongHeader {
        /// Page index the caller expected.
        expected_index: u32,
        /// Generation the caller expected.
        expected_gen: u32,
        /// Page index in word 1.
        found_index: u32,
        /// Generation in word 1.
        found_gen: u32,
    },
    /// Magic and header are right but a data word is not.
    WrongWord {
        /// Index of the first wrong word (its byte offset in the page is `word * 8`).
        word: usize,
        /// What that word should hold.
        expected: u64,
        /// What it holds.
        found: u64,
        /// How many words of the page are wrong.
        bad_words: usize,
    },
}

impl fmt::Display for PageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageFault::Lost => write!(f, "lost_page:all_zero"),
            PageFault::WrongMagic { found } => write!(f, "wrong_magic:found={found:#018x}"),
            PageFault::WrongHeader {
                expected_index,
                expected_gen,
                found_index,
                found_gen,
            } => write!(
                f,
                "wrong_header:expected=page{expected_index}/gen{expected_gen},\
                 found=page{found_index}/gen{found_gen}"
            ),
            PageFault::WrongWord {
                word,
                expected,
                found,
                bad_words,
            } => write!(
                f,
                "wrong_word:word={word},byte={},expected={expected:#018x},found={found:#018x},\
                 bad_words={bad_words}",
                word * 8
            ),
        }
    }
}

impl std::error::Error for PageFault {}

/// Checks that `words` (exactly [`PAGE_WORDS`] long) hold page `index` at generation `gen`.
pub fn check_page(words: &[u64], index: u32, gen: u32) -> Result<(), PageFault> {
    assert_eq!(words.len(), PAGE_WORDS, "a page is {PAGE_WORDS} words");
    if words[0] != MAGIC {
        if words.iter().all(|&x| x == 0) {
            return Err(PageFault::Lost);
        }
        return Err(PageFault::WrongMagic { found: words[0] });
    }
    let h = header(index, gen);
    if words[1] != h {
        return Err(PageFault::WrongHeader {
            expected_index: index,
            expected_gen: gen,
            found_index: (words[1] >> 32) as u32,
            found_gen: words[1] as u32,
        });
    }
    let s = seed(h);
    let mut first = None;
    let mut bad_words = 0;
    for (w, &found) in words.iter().enumerate().skip(2) {
        let expected = data_word(s, w);
        if found != expected {
            bad_words += 1;
            first.get_or_insert((w, expected, found));
        }
    }
    match first {
        None => Ok(()),
        Some((word, expected, found)) => Err(PageFault::WrongWord {
            word,
            expected,
            found,
            bad_words,
        }),
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Visits pages `0..pages` in a fixed order that touches every page exactly once per cycle:
/// `p, p + step, p + 2 * step, ...` modulo `pages`, with `step` coprime with `pages`. The step is
/// about `pages / φ` (φ the golden ratio), so consecutive pages are far apart and every stretch
/// of the cycle is spread evenly over the memory.
#[derive(Debug, Clone)]
struct Stride {
    pages: usize,
    step: usize,
    next: usize,
}

impl Stride {
    fn new(pages: usize) -> Stride {
        assert!(pages > 0);
        let mut step = ((pages as f64 * 0.618_033_988_749_894_9) as usize).max(1) % pages;
        while gcd(step, pages) != 1 {
            step = (step + 1) % pages;
        }
        Stride {
            pages,
            step,
            next: 0,
        }
    }

    fn next_page(&mut self) -> usize {
        let p = self.next;
        // `next < pages` and `step < pages`, so this does not overflow for any page count here.
        self.next = (self.next + self.step) % self.pages;
        p
    }
}

/// Arguments of `ferry-workload mem`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// TCP port to listen on (all addresses).
    pub port: u16,
    /// Memory size in MiB, 1..=[`MAX_SIZE_MIB`].
    pub size_mib: u32,
    /// Page rewrite rate in MiB/s.
    pub dirty_mib_s: f64,
    /// Background check rate in MiB/s.
    pub verify_mib_s: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            port: 7000,
            size_mib: 256,
            dirty_mib_s: 0.0,
            verify_mib_s: 256.0,
        }
    }
}

impl Config {
    /// Parses the arguments after `mem` (`--flag value` or `--flag=value`).
    pub fn parse(args: &[String]) -> Result<Config, String> {
        let mut c = Config::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match name {
                "--port" => {
                    let v = value()?;
                    c.port = v.parse().map_err(|_| {
                        format!("--port must be a port number 0..=65535, got {v:?}")
                    })?;
                }
                "--size-mib" => {
                    let v = value()?;
                    c.size_mib = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_SIZE_MIB).contains(n))
                        .ok_or_else(|| {
                            format!("--size-mib must be an integer 1..={MAX_SIZE_MIB}, got {v:?}")
                        })?;
                }
                "--dirty-mib-s" => c.dirty_mib_s = rate(name, &value()?)?,
                "--verify-mib-s" => c.verify_mib_s = rate(name, &value()?)?,
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        Ok(c)
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.size_mib as usize * PAGES_PER_MIB
    }
}

fn rate(name: &str, v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
        .map(|r| r + 0.0) // -0 -> 0
        .ok_or_else(|| format!("{name} must be a finite number >= 0 (MiB/s), got {v:?}"))
}

/// Runs `ferry-workload mem` with the arguments after `mem`. Serves forever; returns only on an
/// error (or `--help`), with the process exit code: 2 for bad arguments, 1 for a failure.
pub fn cli(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: {USAGE}");
        return 0;
    }
    let cfg = match Config::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry-workload mem: {e}\nusage: {USAGE}");
            return 2;
        }
    };
    match run(&cfg) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry-workload mem: {e}");
            1
        }
    }
}

/// The workload's pages: `pages * PAGE_WORDS` words starting at `buf[off]`, on a page boundary.
struct Memory {
    buf: Vec<u64>,
    off: usize,
    gens: Vec<u32>,
}

impl Memory {
    /// Allocates `pages` pages and fills them all (generation 0), on all available CPUs.
    fn new(pages: usize) -> io::Result<Memory> {
        let words = pages
            .checked_mul(PAGE_WORDS)
            .and_then(|w| w.checked_add(PAGE_WORDS))
            .ok_or_else(|| io::Error::other("size overflows"))?;
        // `vec![0; n]` gets zeroed memory from the allocator without touching it (the fill below
        // touches each page once), but aborts the process if the allocation fails: try first so a
        // size the system refuses is a clear error.
        Vec::<u64>::new().try_reserve_exact(words).map_err(|e| {
            io::Error::other(format!(
                "cannot allocate {} MiB: {e}",
                pages / PAGES_PER_MIB
            ))
        })?;
        let mut buf = vec![0u64; words];
        // A `Vec<u64>` is 8-byte aligned, so the distance to the next page boundary is whole words.
        let misalign = buf.as_ptr() as usize % PAGE_SIZE;
        let off = (PAGE_SIZE - misalign) % PAGE_SIZE / 8;
        let region = &mut buf[off..off + pages * PAGE_WORDS];
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 16)
            .min(pages);
        let per = pages.div_ceil(threads);
        std::thread::scope(|s| {
            for (c, chunk) in region.chunks_mut(per * PAGE_WORDS).enumerate() {
                s.spawn(move || {
                    for (j, page) in chunk.chunks_exact_mut(PAGE_WORDS).enumerate() {
                        fill_page(page, (c * per + j) as u32, 0);
                    }
                });
            }
        });
        Ok(Memory {
            buf,
            off,
            gens: vec![0; pages],
        })
    }

    fn pages(&self) -> usize {
        self.gens.len()
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = self.off + i * PAGE_WORDS;
        start..start + PAGE_WORDS
    }

    #[cfg(test)]
    fn page(&self, i: usize) -> &[u64] {
        &self.buf[self.range(i)]
    }

    /// Rewrites page `i` at its next generation.
    fn dirty(&mut self, i: usize) {
        let gen = self.gens[i].wrapping_add(1);
        self.gens[i] = gen;
        let r = self.range(i);
        fill_page(&mut self.buf[r], i as u32, gen);
    }

    fn check(&self, i: usize) -> Result<(), PageFault> {
        check_page(&self.buf[self.range(i)], i as u32, self.gens[i])
    }
}

/// State shared by the worker and the connections.
struct Shared {
    /// Lines other than commands, over all connections.
    requests: AtomicU64,
    dirtied: AtomicU64,
    passes: AtomicU64,
    /// Distinct pages found bad at least once.
    bad: AtomicU64,
    intact: AtomicBool,
    /// The first bad page found and what was wrong with it.
    first_bad: Mutex<Option<(usize, String)>>,
}

/// A `verify` request: where to send the reply line.
type VerifyRequest = mpsc::Sender<String>;

/// Owns the memory; rewrites and checks pages.
struct Worker {
    mem: Memory,
    shared: Arc<Shared>,
    stride: Stride,
    /// Next page of the background check.
    sweep: usize,
    /// One bit per page: already counted as bad.
    bad_seen: Vec<u64>,
    dirty_pps: f64,
    verify_pps: f64,
}

impl Worker {
    fn run(mut self, requests: mpsc::Receiver<VerifyRequest>) {
        let pages = self.mem.pages() as f64;
        // At most 100 ms worth (at least one page, at most one cycle) is owed at once.
        let cap = |pps: f64| (pps * MAX_OWED_S).max(1.0).min(pages);
        let (dirty_cap, verify_cap) = (cap(self.dirty_pps), cap(self.verify_pps));
        let idle = self.dirty_pps == 0.0 && self.verify_pps == 0.0;
        let (mut dirty_owed, mut verify_owed) = (0.0f64, 0.0f64);
        let mut last = Instant::now();
        loop {
            let request = if idle {
                requests.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                requests.recv_timeout(TICK)
            };
            match request {
                Ok(first) => {
                    // Requests that came in meanwhile share the pass.
                    let waiting: Vec<_> =
                        std::iter::once(first).chain(requests.try_iter()).collect();
                    for i in 0..self.mem.pages() {
                        self.check(i);
                    }
                    self.shared.passes.fetch_add(1, Ordering::SeqCst);
                    let reply = self.verify_reply();
                    for w in waiting {
                        let _ = w.send(reply.clone());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            let dt = now.saturating_duration_since(last).as_secs_f64();
            last = now;

            dirty_owed = (dirty_owed + dt * self.dirty_pps).min(dirty_cap);
            let n = dirty_owed as usize;
            dirty_owed -= n as f64;
            for _ in 0..n {
                let p = self.stride.next_page();
                self.mem.dirty(p);
            }
            if n > 0 {
                self.shared.dirtied.fetch_add(n as u64, Ordering::SeqCst);
            }

            verify_owed = (verify_owed + dt * self.verify_pps).min(verify_cap);
            let n = verify_owed as usize;
            verify_owed -= n as f64;
            for _ in 0..n {
                self.check(self.sweep);
                self.sweep += 1;
                if self.sweep == self.mem.pages() {
                    self.sweep = 0;
                    self.shared.passes.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn check(&mut self, i: usize) {
        let Err(fault) = self.mem.check(i) else {
            return;
        };
        let shared = &self.shared;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.bad_seen[word] & bit != 0 {
            return;
        }
        self.bad_seen[word] |= bit;
        let desc = fault.to_string().replace(char::is_whitespace, "_");
        let mut first = shared.first_bad.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| (i, desc.clone()));
        let seen = shared.bad.fetch_add(1, Ordering::SeqCst) + 1;
        // After `first_bad` and `bad`, so a `status` that sees intact=0 also sees bad >= 1.
        shared.intact.store(false, Ordering::SeqCst);
        drop(first);
        if seen <= MAX_LOGGED_BAD {
            eprintln!(
                "ferry-workload mem: bad page {i} (generation {}): {desc}",
                self.mem.gens[i]
            );
        }
    }

    fn verify_reply(&self) -> String {
        let pages = self.mem.pages();
        let shared = &self.shared;
        let first = shared.first_bad.lock().unwrap_or_else(|e| e.into_inner());
        match &*first {
            Some((index, desc)) if !shared.intact.load(Ordering::SeqCst) => format!(
                "verify bad pages={pages} bad={} first={index} {desc}\n",
                shared.bad.load(Ordering::SeqCst)
            ),
            _ => format!("verify ok pages={pages} bad=0\n"),
        }
    }
}

/// Fills the memory, starts the worker, then serves connections forever.
fn run(cfg: &Config) -> io::Result<()> {
    let pages = cfg.pages();
    let started = Instant::now();
    let mem = Memory::new(pages)?;
    let fill_s = started.elapsed().as_secs_f64();
    let shared = Arc::new(Shared {
        requests: AtomicU64::new(0),
        dirtied: AtomicU64::new(0),
        passes: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        intact: AtomicBool::new(true),
        first_bad: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel();
    let worker = Worker {
        mem,
        shared: Arc::clone(&shared),
        stride: Stride::new(pages),
        sweep: 0,
        bad_seen: vec![0; pages.div_ceil(64)],
        dirty_pps: cfg.dirty_mib_s * PAGES_PER_MIB as f64,
        verify_pps: cfg.verify_mib_s * PAGES_PER_MIB as f64,
    };
    std::thread::Builder::new()
        .name("mem-worker".into())
        .spawn(move || worker.run(rx))?;
    let listener = crate::listen_any(cfg.port)?;
    eprintln!(
        "ferry-workload mem: {} MiB ({pages} pages) filled in {fill_s:.3} s; listening on {}",
        cfg.size_mib,
        listener.local_addr()?
    );
    let status_tail = format!("size_mib={} dirty_mib_s={}", cfg.size_mib, cfg.dirty_mib_s);
    let status_tail: Arc<str> = status_tail.into();
    for conn in listener.incoming() {
        let conn = conn?;
        let (shared, tx, tail) = (Arc::clone(&shared), tx.clone(), Arc::clone(&status_tail));
        std::thread::spawn(move || {
            let _ = serve(conn, &shared, &tx, &tail);
        });
    }
    Ok(())
}

fn serve(
    conn: TcpStream,
    shared: &Shared,
    worker: &mpsc::Sender<VerifyRequest>,
    status_tail: &str,
) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&buf);
        let line = text.strip_suffix('\n').unwrap_or(&text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let reply = match line.trim() {
            "verify" => verify(worker),
            "status" => format!(
                "status intact={} bad={} passes={} dirtied_pages={} {status_tail}\n",
                u8::from(shared.intact.load(Ordering::SeqCst)),
                shared.bad.load(Ordering::SeqCst),
                shared.passes.load(Ordering::SeqCst),
                shared.dirtied.load(Ordering::SeqCst),
            ),
            _ => {
                let n = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
                let mem = if shared.intact.load(Ordering::SeqCst) {
                    "ok"
                } else {
                    "bad"
                };
                format!("{n} {line} mem={mem}\n")
            }
        };
        out.write_all(reply.as_bytes())?;
    }
}

/// Hands a `verify` to the worker and waits for its reply.
fn verify(worker: &mpsc::Sender<VerifyRequest>) -> String {
    let (tx, rx) = mpsc::channel();
    if worker.send(tx).is_err() {
        return "verify error worker_gone\n".into();
    }
    rx.recv()
        .unwrap_or_else(|_| "verify error worker_gone\n".into())
}

#[cfg(test)]
mod tests;
