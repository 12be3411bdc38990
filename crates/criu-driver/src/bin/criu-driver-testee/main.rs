//! `criu-driver-testee`: a process for the page-server tests to dump and restore.
//!
//! ```text
//! criu-driver-testee --heap-mib N --memfd-pages M --ready FILE --result FILE [--lifetime SECS]
//! ```
//!
//! It detaches into its own session (no controlling terminal, so no `--shell-job`), closes
//! every inherited descriptor above stderr (start it with stdio on /dev/null), fills an
//! N MiB heap buffer and an M-page memfd with the pattern of `pattern.rs`, blocks SIGUSR1 and
//! writes its pid to the ready file. On SIGUSR1 it checks every page and writes
//! `ok heap_pages=.. memfd_pages=..` or `FAIL ...` (naming the first bad pages) to the result
//! file, then exits 0 or 1. An alarm ends it after `--lifetime` seconds (default 300) in any
//! case, so a failed test cannot leave it behind for long; CRIU carries the timer across a
//! dump and restore.

#![forbid(unsafe_code)]

#[allow(dead_code)] // `page_identity` is for the tests.
mod pattern;

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::signal::{SigSet, Signal};

use pattern::{fill_page, page_is_intact, HEAP_MAGIC, MEMFD_MAGIC, PAGE};

struct Args {
    heap_mib: usize,
    memfd_pages: usize,
    ready: PathBuf,
    result: PathBuf,
    lifetime: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut heap_mib = 64;
    let mut memfd_pages = 256;
    let mut ready = None;
    let mut result = None;
    let mut lifetime = 300;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--heap-mib" => heap_mib = num(&value)?,
            "--memfd-pages" => memfd_pages = num(&value)?,
            "--lifetime" => lifetime = num(&value)? as u32,
            "--ready" => ready = Some(PathBuf::from(value)),
            "--result" => result = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(Args {
        heap_mib,
        memfd_pages,
        ready: ready.ok_or("--ready is required")?,
        result: result.ok_or("--result is required")?,
        lifetime,
    })
}

/// Writes `text` to `path` atomically (a reader never sees half of it).
fn publish(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn close_inherited_fds() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        // The directory's own fd is already closed: EBADF, ignored.
        let _ = nix::unistd::close(fd);
    }
}

fn run(args: Args) -> Result<bool, String> {
    let _ = nix::unistd::setsid();
    close_inherited_fds();
    nix::unistd::alarm::set(args.lifetime);

    // Page i of the pattern must be page i of the memory CRIU sees: malloc's result is not
    // page-aligned, so allocate one page more and start at the first page boundary.
    let pages = args.heap_mib * (1 << 20) / PAGE;
    let mut alloc = vec![0u8; (pages + 1) * PAGE];
    let skip = (PAGE - alloc.as_ptr() as usize % PAGE) % PAGE;
    let heap = &mut alloc[skip..skip + pages * PAGE];
    for (i, page) in heap.chunks_exact_mut(PAGE).enumerate() {
        fill_page(HEAP_MAGIC, i as u64, page);
    }
    let heap = black_box(heap);

    let memfd = File::from(
        memfd_create(c"criu-driver-testee", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| format!("memfd_create: {e}"))?,
    );
    let mut page = vec![0u8; PAGE];
    for i in 0..args.memfd_pages {
        fill_page(MEMFD_MAGIC, i as u64, &mut page);
        memfd
            .write_all_at(&page, (i * PAGE) as u64)
            .map_err(|e| format!("writing the memfd: {e}"))?;
    }

    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block()
        .map_err(|e| format!("blocking SIGUSR1: {e}"))?;
    publish(&args.ready, &format!("{}\n", std::process::id()))
        .map_err(|e| format!("writing {}: {e}", args.ready.display()))?;

    loop {
        match set.wait() {
            Ok(Signal::SIGUSR1) => break,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("sigwait: {e}")),
        }
    }

    let heap_bad: Vec<usize> = heap
        .chunks_exact(PAGE)
        .enumerate()
        .filter(|(i, p)| !page_is_intact(HEAP_MAGIC, *i as u64, p))
        .map(|(i, _)| i)
        .collect();
    let mut memfd_bad = Vec::new();
    for i in 0..args.memfd_pages {
        let ok = memfd.read_exact_at(&mut page, (i * PAGE) as u64).is_ok()
            && page_is_intact(MEMFD_MAGIC, i as u64, &page);
        if !ok {
            memfd_bad.push(i);
        }
    }
    let ok = heap_bad.is_empty() && memfd_bad.is_empty();
    let text = if ok {
        format!("ok heap_pages={pages} memfd_pages={}\n", args.memfd_pages)
    } else {
        let first = |v: &[usize]| format!("{:?}", &v[..v.len().min(10)]);
        format!(
            "FAIL heap_pages={pages} heap_bad={} first_heap_bad={} memfd_pages={} memfd_bad={} first_memfd_bad={}\n",
            heap_bad.len(),
            first(&heap_bad),
            args.memfd_pages,
            memfd_bad.len(),
            first(&memfd_bad)
        )
    };
    publish(&args.result, &text).map_err(|e| format!("writing {}: {e}", args.result.display()))?;
    Ok(ok)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("criu-driver-testee: {e}");
            return ExitCode::from(2);
        }
    };
    let result = args.result.clone();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let _ = publish(&result, &format!("ERROR {e}\n"));
            ExitCode::from(3)
        }
    }
}
