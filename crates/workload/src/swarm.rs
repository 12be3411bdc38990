//! The `swarm` workload: many processes and threads that write memory while processes and
//! threads come and go, with a check that every page of every process holds what it last wrote.
//!
//! `ferry-workload swarm [--processes N] [--threads T] [--size-mib M] [--dirty-mib-s R]
//! [--churn-ms C] [--zombies Z] [--deny-userfaultfd K] [--port P]` starts `N - 1` worker processes (the first process
//! coordinates). Each worker holds `M` MiB of pages in the format of [`crate::mem`], split between
//! `T - 1` writer threads that rewrite their pages with a new generation each time (all writers
//! of all workers together about `R` MiB/s), plus a thread that every `C` ms starts a thread
//! which writes a page of its own and ends. The coordinator every `C` ms starts a short-lived
//! process (it fills 64 pages, sleeps 100-300 ms and exits; it is reaped at the next start, so
//! there are zombies meanwhile) and keeps `Z` children that exited at once and are never reaped.
//! The first `K` workers forbid themselves `userfaultfd(2)` with a seccomp filter (as container
//! runtimes' default profiles do), so a tracker built on it cannot follow them.
//!
//! TCP on `[::]:P`, one line per request: `verify` has every worker check every page against the
//! generation it last wrote and answers `ok processes=N pages=P threads=T` (workers, their pages
//! and threads) or `bad WORKER DETAIL`; `status` answers `processes=N zombies=Z blips=B` without
//! checking.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::mem::{check_page, fill_page, PAGES_PER_MIB, PAGE_WORDS};

/// Usage of the `swarm` workload.
pub const USAGE: &str = "ferry-workload swarm [--processes N] [--threads T] [--size-mib M] \
    [--dirty-mib-s R] [--churn-ms C] [--zombies Z] [--deny-userfaultfd K] [--port PORT]";

fn num(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Worker {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _child: Child,
}

/// Runs the coordinator with `args` (after `swarm`); returns the exit code.
pub fn cli(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry-workload swarm: {e}");
            1
        }
    }
}

fn run(args: &[String]) -> io::Result<()> {
    let processes = num(args, "--processes", 50).clamp(2, 1000);
    let threads = num(args, "--threads", 10).clamp(2, 200);
    let size_mib = num(args, "--size-mib", 2).clamp(1, 1024);
    let dirty = num(args, "--dirty-mib-s", 8);
    let churn_ms = num(args, "--churn-ms", 50).max(5);
    let zombies = num(args, "--zombies", 0).min(100);
    let deny_uffd = num(args, "--deny-userfaultfd", 0);
    let port = num(args, "--port", 7000) as u16;
    let writers = (processes - 1) * (threads - 1);
    // Each writer's pause between two page writes, so that all of them write `dirty` MiB/s.
    let pause_us = if dirty == 0 {
        0
    } else {
        writers * 1_000_000 / (dirty * PAGES_PER_MIB as u64)
    };
    let mut workers = vec![];
    for i in 1..processes {
        let mut child = Command::new("/proc/self/exe")
            .arg("swarm-worker")
            .args(["--index", &i.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--size-mib", &size_mib.to_string()])
            .args(["--pause-us", &pause_us.to_string()])
            .args(["--churn-ms", &churn_ms.to_string()])
            .args(if i <= deny_uffd {
                &["--deny-userfaultfd"][..]
            } else {
                &[]
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        // Each worker says `ready` once its pages are filled.
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            return Err(io::Error::other(format!("worker {i} said {line:?}")));
        }
        workers.push(Worker {
            stdin,
            stdout,
            _child: child,
        });
    }
    let mut kept_zombies = vec![];
    for _ in 0..zombies {
        kept_zombies.push(Command::new("/proc/self/exe").arg("swarm-exit").spawn()?);
    }
    let blips = Arc::new(AtomicU64::new(0));
    {
        let blips = Arc::clone(&blips);
        std::thread::Builder::new()
            .name("blips".into())
            .spawn(move || {
                let mut live: Vec<Child> = vec![];
                loop {
                    live.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
                    let n = blips.fetch_add(1, Ordering::SeqCst);
                    match Command::new("/proc/self/exe")
                        .args(["swarm-blip", &(100 + (n * 37) % 200).to_string()])
                        .spawn()
                    {
                        Ok(c) => live.push(c),
                        Err(e) => eprintln!("ferry-workload swarm: a short-lived process: {e}"),
                    }
                    std::thread::sleep(Duration::from_millis(churn_ms));
                }
            })?;
    }
    let workers = Arc::new(Mutex::new(workers));
    let listener = crate::listen_any(port)?;
    eprintln!(
        "ferry-workload swarm: {processes} processes x {threads} threads, {size_mib} MiB each; listening on {}",
        listener.local_addr()?
    );
    let zombies = kept_zombies.len();
    for conn in listener.incoming() {
        let conn = conn?;
        let (workers, blips) = (Arc::clone(&workers), Arc::clone(&blips));
        std::thread::spawn(move || {
            let _ = serve(conn, &workers, &blips, processes, zombies);
        });
    }
    drop(kept_zombies);
    Ok(())
}

fn serve(
    conn: TcpStream,
    workers: &Mutex<Vec<Worker>>,
    blips: &AtomicU64,
    processes: u64,
    zombies: usize,
) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let answer = match line?.trim() {
            "verify" => verify(&mut workers.lock().unwrap()),
            "status" => format!(
                "processes={processes} zombies={zombies} blips={}",
                blips.load(Ordering::SeqCst)
            ),
            other => format!("error unknown request {other:?}"),
        };
        out.write_all(format!("{answer}\n").as_bytes())?;
    }
    Ok(())
}

fn verify(workers: &mut [Worker]) -> String {
    let (mut pages, mut threads) = (0u64, 0u64);
    for (i, w) in workers.iter_mut().enumerate() {
        let mut line = String::new();
        let r = w
            .stdin
            .write_all(b"verify\n")
            .and_then(|()| w.stdout.read_line(&mut line));
        match (r, line.split_whitespace().collect::<Vec<_>>().as_slice()) {
            (Ok(_), ["ok", p, t]) => {
                pages += p.parse::<u64>().unwrap_or(0);
                threads += t.parse::<u64>().unwrap_or(0);
            }
            (Ok(_), _) => return format!("bad worker-{} {}", i + 1, line.trim().replace(' ', "_")),
            (Err(e), _) => return format!("bad worker-{} {e}", i + 1),
        }
    }
    format!(
        "ok processes={} pages={pages} threads={threads}",
        workers.len() + 1
    )
}

/// One writer's pages and the generation each holds.
struct Region {
    first: u32,
    words: Vec<u64>,
    gens: Vec<u32>,
}

impl Region {
    fn check(&self) -> Result<u64, String> {
        for (i, gen) in self.gens.iter().enumerate() {
            let index = self.first + i as u32;
            let page = &self.words[i * PAGE_WORDS..(i + 1) * PAGE_WORDS];
            check_page(page, index, *gen).map_err(|f| format!("page-{index} {f}"))?;
        }
        Ok(self.gens.len() as u64)
    }
}

/// `swarm-worker --index I --threads T --size-mib M --pause-us U --churn-ms C
/// [--deny-userfaultfd]`: a worker
/// process (see the module's documentation); answers `verify` lines on stdin.
pub fn worker(args: &[String]) -> i32 {
    if args.iter().any(|a| a == "--deny-userfaultfd") {
        if let Err(e) = crate::unsupported::deny_userfaultfd() {
            eprintln!("ferry-workload swarm-worker: seccomp: {e}");
            return 1;
        }
    }
    let index = num(args, "--index", 1) as u32;
    let threads = num(args, "--threads", 10).max(2);
    let size_mib = num(args, "--size-mib", 2);
    let pause = Duration::from_micros(num(args, "--pause-us", 10_000).max(1));
    let churn = Duration::from_millis(num(args, "--churn-ms", 50).max(5));
    let pages = (size_mib * PAGES_PER_MIB as u64) as u32;
    let writers = (threads - 1) as u32;
    let per = pages.div_ceil(writers);
    let base = index.wrapping_mul(1 << 20);
    let mut regions = vec![];
    for w in 0..writers {
        let first = base + w * per;
        let n = per.min(pages.saturating_sub(w * per));
        let mut words = vec![0u64; n as usize * PAGE_WORDS];
        for i in 0..n as usize {
            fill_page(
                &mut words[i * PAGE_WORDS..(i + 1) * PAGE_WORDS],
                first + i as u32,
                0,
            );
        }
        regions.push(Arc::new(Mutex::new(Region {
            first,
            words,
            gens: vec![0; n as usize],
        })));
    }
    for r in &regions {
        let r = Arc::clone(r);
        std::thread::spawn(move || {
            let mut next = 0usize;
            loop {
                std::thread::sleep(pause);
                let mut g = r.lock().unwrap();
                if g.gens.is_empty() {
                    continue;
                }
                next = (next + 1) % g.gens.len();
                let gen = g.gens[next].wrapping_add(1);
                let index = g.first + next as u32;
                fill_page(
                    &mut g.words[next * PAGE_WORDS..(next + 1) * PAGE_WORDS],
                    index,
                    gen,
                );
                g.gens[next] = gen;
            }
        });
    }
    // Threads that come and go.
    std::thread::spawn(move || {
        let mut n = 0u32;
        loop {
            std::thread::sleep(churn);
            n = n.wrapping_add(1);
            let t = std::thread::spawn(move || {
                let mut page = vec![0u64; PAGE_WORDS];
                fill_page(&mut page, n, n);
                std::thread::sleep(Duration::from_millis(5));
                check_page(&page, n, n).is_ok()
            });
            if !t.join().unwrap_or(false) {
                eprintln!("ferry-workload swarm-worker: a short-lived thread's page was wrong");
            }
        }
    });
    let mut out = io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return 1;
    }
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { return 1 };
        if line.trim() != "verify" {
            continue;
        }
        let mut total = 0;
        let mut bad = None;
        for r in &regions {
            match r.lock().unwrap().check() {
                Ok(n) => total += n,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let answer = match bad {
            None => format!("ok {total} {threads}"),
            Some(e) => format!("bad {e}"),
        };
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            return 1;
        }
    }
    0
}

/// `swarm-blip MS`: a short-lived process: fills 64 pages, sleeps `MS` ms, checks them, exits.
pub fn blip(args: &[String]) -> i32 {
    let ms = args.first().and_then(|v| v.parse().ok()).unwrap_or(100);
    let mut words = vec![0u64; 64 * PAGE_WORDS];
    for i in 0..64 {
        fill_page(
            &mut words[i * PAGE_WORDS..(i + 1) * PAGE_WORDS],
            i as u32,
            1,
        );
    }
    std::thread::sleep(Duration::from_millis(ms));
    for i in 0..64 {
        if check_page(&words[i * PAGE_WORDS..(i + 1) * PAGE_WORDS], i as u32, 1).is_err() {
            return 3;
        }
    }
    0
}
