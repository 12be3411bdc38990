//! Workloads that run inside Ferry's test containers. Std and nix only, so the binary is small and only
//! needs the C library that Ferry copies into the container's root filesystem.
//!
//! `ferry-workload echo [--port P]`: a line echo server with in-memory state. Every line received
//! on any connection increments one counter held in memory; the reply is `<counter> <line>`. A
//! client that sees the counter advance by exactly one per line across a migration knows the
//! process state (not only the socket) survived.
//!
//! `ferry-workload mem [--port P] [--size-mib N] [--dirty-mib-s R] [--verify-mib-s V]`: holds N MiB
//! of self-checking pages, rewrites R MiB/s of them and checks V MiB/s; see
//! [`ferry_workload::mem`] for the page format and the protocol.
//!
//! `ferry-workload swarm ...`: many processes and threads writing memory while processes and
//! threads come and go; see [`ferry_workload::swarm`].
//!
//! `ferry-workload files --dir D --hold F [--port P]`: holds inotify and fanotify watches, file
//! locks and an open file; see [`ferry_workload::files`].
//!
//! `ferry-workload chatter [--interval-ms N]`: writes `out K` to its standard output and then
//! `err K` to its standard error every N ms (default 20), K counting from 0; a reader of its
//! logs that sees every K once, in order, on both streams knows nothing was lost or doubled. It
//! ends (exit 1) if a write fails.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo") => {
            let port = flag(&args, "--port").unwrap_or(7000);
            if let Err(e) = echo(port) {
                eprintln!("ferry-workload echo: {e}");
                std::process::exit(1);
            }
        }
        Some("mem") => std::process::exit(ferry_workload::mem::cli(&args[1..])),
        Some("files") => std::process::exit(ferry_workload::files::cli(&args[1..])),
        Some("swarm") => std::process::exit(ferry_workload::swarm::cli(&args[1..])),
        Some("swarm-worker") => std::process::exit(ferry_workload::swarm::worker(&args[1..])),
        Some("swarm-blip") => std::process::exit(ferry_workload::swarm::blip(&args[1..])),
        Some("swarm-exit") => std::process::exit(0),
        Some("objects") => std::process::exit(ferry_workload::unsupported::cli(&args[1..])),
        Some("chatter") => {
            let ms = flag(&args, "--interval-ms").unwrap_or(20);
            std::process::exit(chatter(std::time::Duration::from_millis(u64::from(ms))))
        }
        Some("lockprobe") => std::process::exit(ferry_workload::files::lockprobe(&args[1..])),
        _ => {
            eprintln!(
                "usage: ferry-workload echo [--port PORT]\n       ferry-workload chatter [--interval-ms N]\n       {}\n       {}\n       {}\n       {}",
                ferry_workload::mem::USAGE,
                ferry_workload::swarm::USAGE,
                ferry_workload::files::USAGE,
                ferry_workload::unsupported::USAGE
            );
            std::process::exit(2);
        }
    }
}

/// See the module's documentation.
fn chatter(every: std::time::Duration) -> i32 {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    for k in 0u64.. {
        if writeln!(out, "out {k}").and_then(|()| out.flush()).is_err()
            || writeln!(err, "err {k}").and_then(|()| err.flush()).is_err()
        {
            return 1;
        }
        std::thread::sleep(every);
    }
    0
}

fn flag(args: &[String], name: &str) -> Option<u16> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn echo(port: u16) -> std::io::Result<()> {
    let listener = ferry_workload::listen_any(port)?;
    let counter = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming() {
        let conn = conn?;
        let counter = Arc::clone(&counter);
        std::thread::spawn(move || {
            let _ = serve(conn, &counter);
        });
    }
    Ok(())
}

fn serve(conn: TcpStream, counter: &AtomicU64) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = format!("{n} {}", line);
        out.write_all(reply.as_bytes())?;
    }
}
