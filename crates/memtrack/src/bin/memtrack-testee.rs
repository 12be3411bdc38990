//! Test target for memtrack's tests (not part of Ferry).
//!
//! Usage: `memtrack-testee <pages> [--thread]`
//!
//! Allocates a page-aligned region of `<pages>` pages of private anonymous memory (populated),
//! optionally starts a second thread, prints `ready <addr-hex> <pages>` and answers commands
//! read from stdin, one per line:
//!
//! * `write <i>...`      main thread writes one byte to each page index; answers `ok <value>`
//! * `twrite <i>...`     the second thread does the same; answers `ok <value>`
//! * `read <i>`          answers the first byte of page i, in decimal
//! * `map <n>`           allocates a new region of n pages; answers `<addr-hex>`
//! * `mwrite <k> <i>...` writes pages of the k-th region made by `map`; answers `ok <value>`
//! * `stride <k>`        writes every k-th page of the main region; answers `ok <count>`
//! * `static`            bumps a static in the binary's .data; answers `<addr-hex> <value>`
//! * `spin <i> <ms>`     a new thread writes page i in a loop for ms milliseconds; answers `ok`
//!   at once
//! * `nap <ms>`          sleeps, then answers `ok`
//! * `quit`              exits
//!
//! Each write command writes a new value (1..=255, cycling), so page contents always change.
//! Everything is safe Rust: regions are vectors of atomics.

use std::io::{self, BufRead, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

const PAGE: usize = 4096;

/// Lives in .data (non-zero initializer), i.e. in a file-backed private writable mapping.
static DATA_MARK: AtomicU64 = AtomicU64::new(0x5eed_5eed_5eed_5eed);

struct Region {
    mem: &'static [AtomicU8],
}

impl Region {
    fn new(pages: usize) -> Self {
        let all: Vec<AtomicU8> = (0..(pages + 1) * PAGE).map(|_| AtomicU8::new(0)).collect();
        let all: &'static [AtomicU8] = Box::leak(all.into_boxed_slice());
        let off = (all.as_ptr() as usize).next_multiple_of(PAGE) - all.as_ptr() as usize;
        let mem = &all[off..off + pages * PAGE];
        Region { mem }
    }

    fn addr(&self) -> usize {
        self.mem.as_ptr() as usize
    }

    fn pages(&self) -> usize {
        self.mem.len() / PAGE
    }

    fn write(&self, page: usize, value: u8) -> Result<(), String> {
        if page >= self.pages() {
            return Err(format!("page {page} out of range"));
        }
        self.mem[page * PAGE].store(value, Ordering::SeqCst);
        Ok(())
    }

    fn read(&self, page: usize) -> Result<u8, String> {
        if page >= self.pages() {
            return Err(format!("page {page} out of range"));
        }
        Ok(self.mem[page * PAGE].load(Ordering::SeqCst))
    }
}

fn parse_list(args: &[&str]) -> Result<Vec<usize>, String> {
    args.iter()
        .map(|a| {
            a.parse::<usize>()
                .map_err(|e| format!("bad number {a:?}: {e}"))
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let pages: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: memtrack-testee <pages> [--thread]");
    let with_thread = args.iter().any(|a| a == "--thread");

    let main_region: &'static Region = Box::leak(Box::new(Region::new(pages)));
    let mut mapped: Vec<Region> = Vec::new();
    let mut value: u8 = 0;
    let mut next_value = || {
        value = value % 255 + 1;
        value
    };

    type Job = (Vec<usize>, u8);
    type Worker = (mpsc::Sender<Job>, mpsc::Receiver<Result<(), String>>);
    let worker: Option<Worker> = if with_thread {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel();
        thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                for (pages, v) in job_rx {
                    let r = pages.iter().try_for_each(|&p| main_region.write(p, v));
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn writer thread");
        Some((job_tx, done_rx))
    } else {
        None
    };

    let stdout = io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "ready {:#x} {}",
        main_region.addr(),
        main_region.pages()
    )
    .unwrap();
    out.flush().unwrap();

    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("memtrack-testee: stdin: {e}");
                std::process::exit(2);
            }
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer: Result<String, String> = match words.as_slice() {
            [] => continue,
            ["quit"] => break,
            ["write", rest @ ..] => parse_list(rest).and_then(|ps| {
                let v = next_value();
                ps.iter().try_for_each(|&p| main_region.write(p, v))?;
                Ok(format!("ok {v}"))
            }),
            ["twrite", rest @ ..] => parse_list(rest).and_then(|ps| {
                let (tx, rx) = worker.as_ref().ok_or("no second thread (--thread)")?;
                let v = next_value();
                tx.send((ps, v)).map_err(|e| e.to_string())?;
                rx.recv().map_err(|e| e.to_string())??;
                Ok(format!("ok {v}"))
            }),
            ["read", p] => {
                parse_list(&[p]).and_then(|ps| main_region.read(ps[0]).map(|v| v.to_string()))
            }
            ["map", n] => parse_list(&[n]).map(|ns| {
                let r = Region::new(ns[0]);
                let a = r.addr();
                mapped.push(r);
                format!("{a:#x}")
            }),
            ["mwrite", k, rest @ ..] => parse_list(&[k]).and_then(|ks| {
                let ps = parse_list(rest)?;
                let r = mapped.get(ks[0]).ok_or("no such mapped region")?;
                let v = next_value();
                ps.iter().try_for_each(|&p| r.write(p, v))?;
                Ok(format!("ok {v}"))
            }),
            ["stride", k] => parse_list(&[k]).and_then(|ks| {
                let k = ks[0].max(1);
                let v = next_value();
                let mut n = 0;
                for p in (0..main_region.pages()).step_by(k) {
                    main_region.write(p, v)?;
                    n += 1;
                }
                Ok(format!("ok {n}"))
            }),
            ["static"] => {
                let v = DATA_MARK.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(format!(
                    "{:#x} {v}",
                    &DATA_MARK as *const AtomicU64 as usize
                ))
            }
            ["spin", p, ms] => parse_list(&[p, ms]).map(|a| {
                let (page, ms) = (a[0], a[1] as u64);
                thread::spawn(move || {
                    let end = std::time::Instant::now() + Duration::from_millis(ms);
                    let mut v: u8 = 0;
                    while std::time::Instant::now() < end {
                        v = v.wrapping_add(1);
                        let _ = main_region.write(page, v);
                    }
                });
                "ok".to_string()
            }),
            ["nap", ms] => parse_list(&[ms]).map(|m| {
                thread::sleep(Duration::from_millis(m[0] as u64));
                "ok".to_string()
            }),
            _ => Err(format!("unknown command {:?}", line.trim())),
        };
        match answer {
            Ok(a) => writeln!(out, "{a}").unwrap(),
            Err(e) => writeln!(out, "error {e}").unwrap(),
        }
        out.flush().unwrap();
    }
}
