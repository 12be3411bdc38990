//! The `objects` workload: a process holding what CRIU cannot checkpoint, so that a test can
//! check that Ferry refuses to move it before the freeze, naming the process and the object.
//!
//! `ferry-workload objects [--io-uring] [--zombie-threads] [--port P]`: opens an io_uring
//! instance and keeps its descriptor (`--io-uring`); with `--zombie-threads` it starts a child
//! process whose main thread exits (`exit(2)` of that thread alone) while another of its threads runs on, which
//! leaves a zombie thread-group leader with a live thread. Serves TCP on `[::]:P`: `ring` opens
//! an io_uring instance now (kept until the process ends) and answers `ok`; any other line is
//! answered `alive`.

#![allow(unsafe_code)]

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;

/// Usage of the `objects` workload.
pub const USAGE: &str = "ferry-workload objects [--io-uring] [--zombie-threads] [--port PORT]";

/// Runs the workload with `args` (after `objects`); returns the exit code (only on failure
/// when the main thread exits early).
pub fn cli(args: &[String]) -> i32 {
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(7000);
    if args.iter().any(|a| a == "--zombie-leader") {
        std::thread::spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        });
        // SAFETY: exit(2), not exit_group(2): the main thread alone ends here, without
        // returning or unwinding (glibc's pthread_exit would unwind through Rust's frames and
        // abort); nothing on its stack is used again and the process lives on in the sleeping
        // thread.
        unsafe {
            libc::syscall(libc::SYS_exit, 0);
        }
        unreachable!("exit(2) returned");
    }
    let _zombie = if args.iter().any(|a| a == "--zombie-threads") {
        match std::process::Command::new("/proc/self/exe")
            .args(["objects", "--zombie-leader"])
            .spawn()
        {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("ferry-workload objects: starting the zombie's process: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let ring = if args.iter().any(|a| a == "--io-uring") {
        match io_uring() {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("ferry-workload objects: io_uring_setup: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let listener = match crate::listen_any(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ferry-workload objects: {e}");
            return 1;
        }
    };
    let server = std::thread::spawn(move || {
        let _ring = ring;
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    let _ = server.join();
    0
}

fn serve(conn: TcpStream) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        if line?.trim() == "ring" {
            match io_uring() {
                Ok(fd) => {
                    std::mem::forget(fd);
                    out.write_all(b"ok\n")?;
                }
                Err(e) => out.write_all(format!("error {e}\n").as_bytes())?,
            }
            continue;
        }
        out.write_all(b"alive\n")?;
    }
    Ok(())
}

/// A new io_uring instance's descriptor.
fn io_uring() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // struct io_uring_params is 120 bytes; zeroed asks for the defaults.
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup(2) reads and writes only the 120-byte params struct passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            4u32,
            params.as_mut_ptr() as *mut libc::c_void,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `userfaultfd(2)` fail with `EPERM` in this thread and the threads it starts from now on
/// (a seccomp filter, as container runtimes' default profiles have): a process a dirty-page
/// tracker built on userfaultfd cannot follow.
pub fn deny_userfaultfd() -> io::Result<()> {
    // Classic BPF over struct seccomp_data: load the syscall number (offset 0); if it is
    // userfaultfd return ERRNO(EPERM), else ALLOW.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let filter = [
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_userfaultfd as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl(2) with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies the program.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
