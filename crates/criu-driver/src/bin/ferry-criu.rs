//! `ferry-criu`: the CRIU binary Ferry hands to runc (`runc --criu`).
//!
//! runc starts CRIU twice per checkpoint or restore: once only to ask its version, then for the
//! real work. Both starts happen while the container is frozen. This front end answers the
//! version request itself, with the version the agent verified at start
//! (`FERRY_CRIU_VERSION`), and runs the real CRIU (`FERRY_CRIU_REAL`) for everything else, on
//! the same socket, with the request still unread.
//!
//! One exception: with `FERRY_PAGE_SERVER_SOCKET` set, a dump to a page server
//! (`runc checkpoint --page-server ADDR:PORT`) sends its pages to that UNIX socket of the
//! agent instead. ferry-criu then starts the real CRIU itself and relays the RPC between runc
//! and CRIU ([`criu_driver::swrk_proxy`]), exiting as CRIU does. With `FERRY_LAZY_DUMP_CONFIG`
//! set as well, the dump is lazy: the socket then carries the page server CRIU runs from the
//! frozen tree for the pages it did not write.
//!
//! With `FERRY_CRIU_GATE` set, any request but the version's first waits at the agent's gate
//! ([`swrk_proxy::wait_at_gate`]): the agent starts runc before the frozen window and lets
//! CRIU run once the container is frozen (dump) or its images are in place (restore). A dump
//! or restore behind a gate is relayed ([`swrk_proxy::relay_unchanged_behind_gate`], which starts
//! CRIU before the gate opens) rather than handed
//! to CRIU, so that `ferry-criu` sees CRIU's answer and tells the agent through the gate as
//! soon as it is a success ([`swrk_proxy::GATE_DONE`]): runc's and CRIU's own exits, a few
//! milliseconds, then fall outside the frozen window.

#![deny(unsafe_code)]

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use criu_driver::swrk_proxy::{self, SwrkProxyError};
use nix::sys::socket::{recv, send, MsgFlags};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(real) = std::env::var_os("FERRY_CRIU_REAL") else {
        eprintln!("ferry-criu: FERRY_CRIU_REAL is not set (the Ferry agent sets it)");
        return ExitCode::from(2);
    };
    let version = std::env::var("FERRY_CRIU_VERSION")
        .ok()
        .and_then(|v| criu_driver::parse_version(&format!("Version: {v}")).ok());
    let page_server_socket = std::env::var_os(swrk_proxy::PAGE_SERVER_SOCKET_ENV);
    let fd = (args.get(1).map(String::as_str) == Some("swrk"))
        .then(|| args.get(2).and_then(|a| a.parse::<RawFd>().ok()))
        .flatten();
    let gate = std::env::var_os(swrk_proxy::GATE_ENV).filter(|g| !g.is_empty());
    if let Some(fd) =
        fd.filter(|_| version.is_some() || page_server_socket.is_some() || gate.is_some())
    {
        if let Ok(request) = swrk_proxy::peek_request(fd) {
            let kind = criu_driver::rpc::request_type(&request);
            if let (Some(criu_driver::rpc::REQ_VERSION), Some(version)) = (kind, version) {
                // Consume the request, answer it, done.
                let mut buf = [0u8; 64];
                let _ = recv(fd, &mut buf, MsgFlags::empty());
                let resp = criu_driver::rpc::version_response(version);
                return match send(fd, &resp, MsgFlags::empty()) {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("ferry-criu: answering the version request: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            // Behind a gate the agent waits to hear that CRIU is done: relay to tell it, with
            // CRIU started before the gate opens.
            if let Some(gate) = gate.as_ref().filter(|_| {
                swrk_proxy::is_relayable_unchanged(&request)
                    && swrk_proxy::page_server_socket_for(&request, page_server_socket.as_deref())
                        .is_none()
            }) {
                return relay(fd, |runc| {
                    swrk_proxy::relay_unchanged_behind_gate(runc, Path::new(&real), Path::new(gate))
                });
            }
            if let Some(socket) =
                swrk_proxy::page_server_socket_for(&request, page_server_socket.as_deref())
            {
                let lazy = std::env::var_os(swrk_proxy::LAZY_DUMP_CONFIG_ENV)
                    .filter(|p| !p.is_empty())
                    .map(std::path::PathBuf::from);
                return relay(fd, |runc| {
                    swrk_proxy::relay_dump(
                        runc,
                        Path::new(&real),
                        &socket,
                        lazy.as_deref(),
                        gate.as_deref().map(Path::new),
                    )
                });
            }
        }
    }
    let err = Command::new(&real)
        .args(&args[1..])
        .env_remove(swrk_proxy::GATE_ENV)
        .exec();
    eprintln!("ferry-criu: cannot run {}: {err}", real.to_string_lossy());
    ExitCode::from(1)
}

/// Runs the request through `run` ([`swrk_proxy::relay_dump`] or
/// [`swrk_proxy::relay_unchanged_behind_gate`]) on runc's socket `fd`; exits as CRIU did.
fn relay(
    fd: RawFd,
    run: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> Result<std::process::ExitStatus, SwrkProxyError>,
) -> ExitCode {
    let Some(runc) = adopt_inherited_socket(fd) else {
        eprintln!("ferry-criu: descriptor {fd} is not runc's socket");
        return ExitCode::from(1);
    };
    match run(runc.as_fd()) {
        Ok(status) => ExitCode::from(swrk_proxy::exit_code(status)),
        Err(e) => {
            eprintln!("ferry-criu: {e}");
            match e {
                SwrkProxyError::Relay { status, .. } if !status.success() => {
                    ExitCode::from(swrk_proxy::exit_code(status))
                }
                _ => ExitCode::from(1),
            }
        }
    }
}

/// Takes ownership of the socket runc passed as descriptor `fd` (`swrk FD`).
#[allow(unsafe_code)]
fn adopt_inherited_socket(fd: RawFd) -> Option<OwnedFd> {
    // Only an open descriptor above stdio, which std does not own.
    if fd <= 2 || std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
        return None;
    }
    // SAFETY: `fd` is open (checked above), was inherited from runc, which named it on our
    // command line as the RPC socket for us to use, and nothing else in this process owns or
    // closes it (so far it was only read by number, in `main`).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
