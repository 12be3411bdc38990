//! Workloads that run inside Ferry's test containers. Std and nix only, so the binary is small and only
//! needs the C library that Ferry copies into the container's root filesystem.
//!
//! The binary (`src/main.rs`) holds the `echo` workload; the `mem` workload lives in [`mem`], a
//! library module so that other code (tests, tools that scan a process's memory image) can use
//! its page format: [`mem::MAGIC`], [`mem::fill_page`], [`mem::check_page`]. The `files`
//! workload ([`files`]) holds inotify and fanotify watches, file locks and an open file.

// Unsafe code only where a workload must make a raw system call (`unsupported`).
#![deny(unsafe_code)]

pub mod files;
pub mod mem;
pub mod swarm;
pub mod unsupported;

/// Listens on `port` on every address: IPv6 and IPv4 at once (`[::]`, dual-stack as Linux makes
/// it by default) where the container has IPv6, IPv4 alone (`0.0.0.0`) where IPv6 is off.
pub fn listen_any(port: u16) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(("::", port))
        .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))
}
