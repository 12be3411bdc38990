//! The `files` workload: a process holding the kernel file objects that real daemons hold, so
//! that a migration test can check each one still works afterwards.
//!
//! `ferry-workload files --dir D --hold F [--port P]` at start:
//! - watches `D` with inotify (`IN_CREATE | IN_CLOSE_WRITE | IN_DELETE`) and, where the process
//!   may (`CAP_SYS_ADMIN`), with fanotify (`FAN_CLOSE_WRITE` on `D`'s children); a thread per
//!   group counts the events and keeps the last file name (inotify) it saw;
//! - holds `D/locks/flock.lock` with an exclusive `flock(2)` lock and `D/locks/posix.lock` with a
//!   POSIX write lock (`fcntl(F_SETLK)`) over the whole file (in a subdirectory: an fanotify event
//!   on the lock file would hand this process a descriptor of it, and closing that descriptor
//!   would drop the POSIX lock);
//! - opens `F` read-only (a file of the image's lower layer, say) and keeps the descriptor,
//!   remembering a hash of what it read through it.
//!
//! Then it serves TCP on `[::]:P` (dual-stack), one line per request, one line per answer:
//! - `status`: `inotify=N last=NAME fanotify=M|off hold=same|changed|ERROR`, where `hold` compares
//!   what the kept descriptor reads now (from offset 0, `pread`) with what it read at start;
//! - `touch NAME`: writes and closes `D/NAME` (a file name without `/`); answers `ok`;
//! - `locks`: runs this binary again as a separate process (`lockprobe D PID`), which tries both
//!   locks without waiting; answers its line: `flock=held|free posix=held-by-PID|free` and this
//!   process's pid: `... owner=PID`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg};
use nix::sys::fanotify::{self, Fanotify, MarkFlags, MaskFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// Usage of the `files` workload.
pub const USAGE: &str = "ferry-workload files --dir DIR --hold FILE [--port PORT]";

struct Shared {
    dir: PathBuf,
    inotify_events: AtomicU64,
    last_name: Mutex<String>,
    fanotify_events: Option<AtomicU64>,
    hold: File,
    hold_hash: u64,
}

/// Runs the workload with `args` (after `files`); returns the exit code.
pub fn cli(args: &[String]) -> i32 {
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(dir), Some(hold)) = (get("--dir"), get("--hold")) else {
        eprintln!("usage: {USAGE}");
        return 2;
    };
    let port = get("--port").and_then(|p| p.parse().ok()).unwrap_or(7000);
    match run(Path::new(&dir), Path::new(&hold), port) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ferry-workload files: {e}");
            1
        }
    }
}

/// `lockprobe DIR`: tries `DIR`'s two locks without waiting; prints one line.
pub fn lockprobe(args: &[String]) -> i32 {
    let Some(dir) = args.first() else {
        eprintln!("usage: ferry-workload lockprobe DIR");
        return 2;
    };
    match probe_locks(Path::new(dir)) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("ferry-workload lockprobe: {e}");
            1
        }
    }
}

fn probe_locks(dir: &Path) -> io::Result<String> {
    let f = File::open(dir.join("locks/flock.lock"))?;
    let flock = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(_unlocked_on_drop) => "free",
        Err((_, Errno::EWOULDBLOCK)) => "held",
        Err((_, e)) => return Err(e.into()),
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("locks/posix.lock"))?;
    let mut l = whole_file(libc::F_WRLCK);
    fcntl(f.as_fd(), FcntlArg::F_GETLK(&mut l))?;
    let posix = if i32::from(l.l_type) == libc::F_UNLCK {
        "free".to_string()
    } else {
        format!("held-by-{}", l.l_pid)
    };
    Ok(format!("flock={flock} posix={posix}"))
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn read_all_at(f: &File) -> io::Result<Vec<u8>> {
    let mut out = vec![];
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read_at(&mut buf, out.len() as u64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn run(dir: &Path, hold: &Path, port: u16) -> io::Result<()> {
    std::fs::create_dir_all(dir.join("locks"))?;
    let lock_file = |name: &str| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("locks").join(name))
    };
    let flock_file = lock_file("flock.lock")?;
    let _flock = Flock::lock(flock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| io::Error::other(format!("flock on {}: {e}", dir.display())))?;
    let posix_file = lock_file("posix.lock")?;
    fcntl(
        posix_file.as_fd(),
        FcntlArg::F_SETLK(&whole_file(libc::F_WRLCK)),
    )?;

    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        dir,
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE,
    )?;
    let fan = match Fanotify::init(
        fanotify::InitFlags::FAN_CLASS_NOTIF | fanotify::InitFlags::FAN_CLOEXEC,
        fanotify::EventFFlags::O_RDONLY,
    ) {
        Ok(f) => {
            let d = File::open(dir)?;
            f.mark(
                MarkFlags::FAN_MARK_ADD,
                MaskFlags::FAN_CLOSE_WRITE | MaskFlags::FAN_EVENT_ON_CHILD,
                d.as_fd(),
                None::<&Path>,
            )?;
            Some(f)
        }
        Err(Errno::EPERM) => None,
        Err(e) => return Err(e.into()),
    };

    let hold_file = File::open(hold)?;
    let hold_hash = fnv(&read_all_at(&hold_file)?);
    let shared = Arc::new(Shared {
        dir: dir.to_path_buf(),
        inotify_events: AtomicU64::new(0),
        last_name: Mutex::new(String::new()),
        fanotify_events: fan.as_ref().map(|_| AtomicU64::new(0)),
        hold: hold_file,
        hold_hash,
    });
    {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || loop {
                match inotify.read_events() {
                    Ok(evs) => {
                        if let Some(name) = evs.iter().rev().find_map(|e| e.name.as_ref()) {
                            *s.last_name.lock().unwrap() = name.to_string_lossy().into_owned();
                        }
                        s.inotify_events
                            .fetch_add(evs.len() as u64, Ordering::SeqCst);
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        eprintln!("ferry-workload files: inotify read: {e}");
                        return;
                    }
                }
            })?;
    }
    if let Some(fan) = fan {
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || loop {
                match fan.read_events() {
                    Ok(evs) => {
                        if let Some(c) = &s.fanotify_events {
                            c.fetch_add(evs.len() as u64, Ordering::SeqCst);
                        }
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        eprintln!("ferry-workload files: fanotify read: {e}");
                        return;
                    }
                }
            })?;
    }

    let listener = crate::listen_any(port)?;
    eprintln!(
        "ferry-workload files: watching {}, locks held, {} open; listening on {}",
        dir.display(),
        hold.display(),
        listener.local_addr()?
    );
    for conn in listener.incoming() {
        let conn = conn?;
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            let _ = serve(conn, &s);
        });
    }
    drop(posix_file);
    Ok(())
}

fn serve(conn: TcpStream, s: &Shared) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        let answer = match line.split_once(' ').unwrap_or((line, "")) {
            ("status", _) => status(s),
            ("touch", name) if !name.is_empty() && !name.contains('/') && name != ".." => {
                match std::fs::write(s.dir.join(name), b"touched\n") {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error {e}"),
                }
            }
            ("locks", _) => match locks(s) {
                Ok(l) => l,
                Err(e) => format!("error {e}"),
            },
            _ => format!("error unknown request {line:?}"),
        };
        out.write_all(format!("{answer}\n").as_bytes())?;
    }
    Ok(())
}

fn status(s: &Shared) -> String {
    let hold = match read_all_at(&s.hold) {
        Ok(d) if fnv(&d) == s.hold_hash => "same".to_string(),
        Ok(_) => "changed".to_string(),
        Err(e) => format!("ERROR:{}", e.raw_os_error().unwrap_or(0)),
    };
    format!(
        "inotify={} last={} fanotify={} hold={hold}",
        s.inotify_events.load(Ordering::SeqCst),
        s.last_name.lock().unwrap(),
        s.fanotify_events
            .as_ref()
            .map(|c| c.load(Ordering::SeqCst).to_string())
            .unwrap_or_else(|| "off".into()),
    )
}

fn locks(s: &Shared) -> io::Result<String> {
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg("lockprobe")
        .arg(&s.dir)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut line)?;
    child.wait()?;
    Ok(format!("{} owner={}", line.trim(), std::process::id()))
}
