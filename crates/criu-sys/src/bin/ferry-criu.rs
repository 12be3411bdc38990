//! `ferry-criu`: the CRIU binary Ferry hands to runc (`runc --criu`).
//!
//! runc starts CRIU twice per checkpoint or restore: once only to ask its version, then for the
//! real work. Both starts happen while the container is frozen. This front end answers the
//! version request itself, with the version the agent verified at start
//! (`FERRY_CRIU_VERSION`), and runs the real CRIU (`FERRY_CRIU_REAL`) for everything else, on
//! the same socket, with the request still unread.

#![forbid(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use nix::sys::socket::{recv, send, MsgFlags};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(real) = std::env::var_os("FERRY_CRIU_REAL") else {
        eprintln!("ferry-criu: FERRY_CRIU_REAL is not set (the Ferry agent sets it)");
        return ExitCode::from(2);
    };
    if args.get(1).map(String::as_str) == Some("swrk") {
        if let (Some(fd), Some(version)) = (
            args.get(2).and_then(|a| a.parse::<i32>().ok()),
            std::env::var("FERRY_CRIU_VERSION")
                .ok()
                .and_then(|v| criu_sys::parse_version(&format!("Version: {v}")).ok()),
        ) {
            let mut buf = vec![0u8; 64 << 10];
            if let Ok(n) = recv(fd, &mut buf, MsgFlags::MSG_PEEK) {
                if criu_sys::rpc::request_type(&buf[..n]) == Some(criu_sys::rpc::REQ_VERSION) {
                    // Consume the request, answer it, done.
                    let _ = recv(fd, &mut buf, MsgFlags::empty());
                    let resp = criu_sys::rpc::version_response(version);
                    return match send(fd, &resp, MsgFlags::empty()) {
                        Ok(_) => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("ferry-criu: answering the version request: {e}");
                            ExitCode::from(1)
                        }
                    };
                }
            }
        }
    }
    let err = Command::new(&real).args(&args[1..]).exec();
    eprintln!("ferry-criu: cannot run {}: {err}", real.to_string_lossy());
    ExitCode::from(1)
}
