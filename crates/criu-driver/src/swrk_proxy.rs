//! Relaying runc's CRIU RPC ("swrk" mode) through `ferry-criu`, so that a dump sends its
//! pages over a socket connected to the Ferry agent instead of to `ADDRESS:PORT`.
//!
//! runc starts `CRIU swrk 3` with one end of a `SOCK_SEQPACKET` socket pair, sends one
//! `criu_req`, answers CRIU's notifications (pre-dump, network-lock, post-dump, ...) and reads
//! the final `criu_resp`. [`relay_dump`] stands in between: it reads runc's DUMP request,
//! connects to the agent's UNIX socket, rewrites `opts.ps` to that socket
//! ([`rpc::dump_with_page_server_fd`]), starts the real CRIU on a socket pair of its own and
//! relays every message, with any descriptors passed along, until CRIU closes its end.
//!
//! CRIU resolves `images_dir_fd` and `work_dir_fd` as `/proc/PEER/fd/N`, PEER being the process
//! that created its RPC socket (`SO_PEERCRED`): runc before, `ferry-criu` once it relays. runc
//! opens those directories close-on-exec, so `ferry-criu` does not have them; it re-opens
//! runc's descriptors and rewrites the numbers to its own ([`relay_dump`] keeps them open until
//! CRIU exits). `ps.fd`, on the other hand, is a descriptor of CRIU itself, inherited.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use command_fds::CommandFdExt;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, shutdown, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, Shutdown, SockFlag, SockType,
};

use crate::rpc::{self, opt};

/// The environment variable naming the agent's UNIX socket for the dump's pages.
pub const PAGE_SERVER_SOCKET_ENV: &str = "FERRY_PAGE_SERVER_SOCKET";

/// With [`PAGE_SERVER_SOCKET_ENV`]: the dump is lazy, and this names the CRIU configuration
/// file to write for it (see [`relay_dump`]).
pub const LAZY_DUMP_CONFIG_ENV: &str = "FERRY_LAZY_DUMP_CONFIG";

/// CRIU's log level for a lazy dump (0-4; default 2, warnings: at runc's 4 CRIU logs several
/// lines per MiB of memory while the container is frozen).
pub const LAZY_DUMP_LOG_LEVEL_ENV: &str = "FERRY_CRIU_LOG_LEVEL";
/// Set for a lazy dump's CRIU: its lazy pages are served by the agent (from the destination's
/// page store and the frozen container), so a CRIU built with Ferry's patch
/// (`scripts/criu/lazy-pages-elsewhere.patch`) records them in the pagemap without splicing
/// every one into its page pipes inside the freeze. A CRIU without the patch ignores it.
pub const LAZY_PAGES_ELSEWHERE_ENV: &str = "CRIU_LAZY_PAGES_ELSEWHERE";

/// The environment variable naming the agent's *gate*: a UNIX socket where `ferry-criu` waits,
/// with runc's request read and runc's own start-up done, until the agent lets CRIU run
/// ([`wait_at_gate`]). The agent starts runc this way before it freezes the container (or
/// before the images arrive), so that only CRIU's own work falls in the frozen window.
pub const GATE_ENV: &str = "FERRY_CRIU_GATE";

/// The byte the agent sends through the gate to let CRIU run.
pub const GATE_OPEN: u8 = b'g';

/// The byte `ferry-criu` sends back through the gate once CRIU has answered runc's request
/// with success (the images are complete, or the restored tasks run): the agent goes on
/// without waiting for runc and CRIU to exit, which takes a few milliseconds more, and waits
/// for them later, before anything depends on runc's own end.
pub const GATE_DONE: u8 = b'd';

/// The largest RPC message relayed (runc reads answers into 40 KiB; requests are smaller).
pub const MAX_MESSAGE: usize = 1 << 20;

/// The most descriptors one message may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// One end of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The socket runc handed us.
    Runc,
    /// Our socket to the real CRIU.
    Criu,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Runc => "runc",
            Side::Criu => "CRIU",
        })
    }
}

/// Why a relayed dump failed.
#[derive(Debug, thiserror::Error)]
pub enum SwrkProxyError {
    /// The agent's socket cannot be reached.
    #[error("cannot connect to the Ferry agent's page-server socket {} ({PAGE_SERVER_SOCKET_ENV}): {source}", path.display())]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The agent's gate cannot be reached or failed while waiting.
    #[error("waiting at the Ferry agent's gate {} ({GATE_ENV}): {source}", path.display())]
    Gate {
        /// The gate's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The agent closed the gate: the migration ended before CRIU was to run.
    #[error("the Ferry agent closed the gate {} without letting CRIU run (the migration ended first)", path.display())]
    GateClosed {
        /// The gate's path.
        path: PathBuf,
    },
    /// runc closed its socket without sending a request.
    #[error("runc sent no request")]
    NoRequest,
    /// The request is not one [`relay_dump`] handles (see [`page_server_socket_for`]).
    #[error("runc's request is not a dump to a page server that ferry-criu can relay")]
    NotRelayable,
    /// The process on the other end of runc's socket cannot be identified.
    #[error("cannot identify the process behind runc's socket (SO_PEERCRED): {0}")]
    PeerCredentials(Errno),
    /// A descriptor the request names cannot be re-opened from runc.
    #[error("cannot open runc's {what} (descriptor {fd} of process {pid}): {source}")]
    PeerFd {
        /// Which option names it.
        what: &'static str,
        /// runc's pid.
        pid: i32,
        /// The descriptor number in runc.
        fd: i32,
        /// The OS error.
        source: std::io::Error,
    },
    /// Setting up a descriptor for CRIU failed.
    #[error("{what}: {source}")]
    Fd {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The real CRIU could not be started.
    #[error("cannot run {}: {source}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Waiting for the sockets failed.
    #[error("poll: {0}")]
    Poll(Errno),
    /// Receiving from or sending to one side failed.
    #[error("{op} on the {side} socket: {source}")]
    Socket {
        /// The side.
        side: Side,
        /// `recvmsg` or `sendmsg`.
        op: &'static str,
        /// The OS error.
        source: Errno,
    },
    /// A message was larger than the relay's buffers.
    #[error("a message from {side} does not fit the relay ({what})")]
    Truncated {
        /// Who sent it.
        side: Side,
        /// What overflowed.
        what: &'static str,
    },
    /// Waiting for CRIU failed.
    #[error("waiting for CRIU: {0}")]
    Wait(std::io::Error),
    /// The relay failed after CRIU started; CRIU has been waited for.
    #[error("relaying between runc and CRIU: {source} (CRIU {status})")]
    Relay {
        /// What failed.
        source: Box<SwrkProxyError>,
        /// How CRIU ended.
        status: ExitStatus,
    },
}

/// Reads runc's first request without consuming it (at most [`MAX_MESSAGE`] bytes).
pub fn peek_request(runc: RawFd) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(runc, &mut iov, None, MsgFlags::MSG_PEEK) {
            Ok(m) => break m.bytes,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    };
    buf.truncate(n);
    Ok(buf)
}

/// Waits at the agent's gate `path` ([`GATE_ENV`]): connects and reads one byte. [`GATE_OPEN`]
/// lets CRIU run; the agent closing the gate (or anything else) is an error, on which
/// `ferry-criu` exits without starting CRIU, so that runc fails and cleans up after itself.
/// There is no time limit here: the agent bounds the whole command and kills it. Returns the
/// connection, where [`GATE_DONE`] can be sent back (it is close-on-exec: a CRIU that replaces
/// `ferry-criu` closes it, which the agent reads as "wait for runc").
pub fn wait_at_gate(path: &Path) -> Result<UnixStream, SwrkProxyError> {
    use std::io::Read;
    let gate = |source| SwrkProxyError::Gate {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(gate)?;
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == GATE_OPEN => return Ok(stream),
            Ok(_) => {
                return Err(SwrkProxyError::GateClosed {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(gate(e)),
        }
    }
}

/// Whether [`relay_unchanged_behind_gate`] can take `request`: a DUMP of a given pid or a RESTORE, without
/// `status_fd` or `pidfd_store_sk` (descriptors of runc that CRIU would take from ferry-criu
/// instead).
pub fn is_relayable_unchanged(request: &[u8]) -> bool {
    let kind = rpc::request_type(request);
    (kind == Some(rpc::REQ_RESTORE)
        || (kind == Some(rpc::REQ_DUMP) && rpc::opts_fd(request, opt::PID).is_some_and(|p| p > 0)))
        && rpc::opts_varint(request, opt::STATUS_FD).is_none()
        && rpc::opts_varint(request, opt::PIDFD_STORE_SK).is_none()
}

/// Whether [`relay_dump`] can take `request`: a DUMP of a given pid (not of the requesting
/// process, which would now be ferry-criu) to a page server (`opts.ps`), not in lazy-pages mode
/// (there CRIU ignores `ps.fd` and listens itself), and without `status_fd` or `pidfd_store_sk`
/// (descriptors of runc that CRIU would take from ferry-criu instead).
pub fn is_relayable(request: &[u8]) -> bool {
    rpc::request_type(request) == Some(rpc::REQ_DUMP)
        && rpc::dump_with_page_server_fd(request, 0).is_some()
        && rpc::opts_varint(request, opt::LAZY_PAGES).unwrap_or(0) == 0
        && rpc::opts_fd(request, opt::PID).is_some_and(|p| p > 0)
        && rpc::opts_varint(request, opt::STATUS_FD).is_none()
        && rpc::opts_varint(request, opt::PIDFD_STORE_SK).is_none()
}

/// The agent's socket to relay `request` to, given the value of [`PAGE_SERVER_SOCKET_ENV`]:
/// `None` (run CRIU unchanged) when the variable is unset or empty or the request is not
/// [relayable](is_relayable).
pub fn page_server_socket_for(request: &[u8], socket_env: Option<&OsStr>) -> Option<PathBuf> {
    let path = socket_env.filter(|p| !p.is_empty())?;
    is_relayable(request).then(|| PathBuf::from(path))
}

/// The exit code a shell would report for `status` (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + (sig & 0x7f)) as u8,
        _ => 1,
    }
}

/// Descriptors received with a message; closed on drop.
#[derive(Debug, Default)]
struct ReceivedFds(Vec<RawFd>);

impl Drop for ReceivedFds {
    fn drop(&mut self) {
        for fd in self.0.drain(..) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Receives one message into `buf`; `None` at end of stream. (An empty message without
/// descriptors reads as end of stream; neither runc nor CRIU sends one.)
fn recv_message(
    fd: BorrowedFd<'_>,
    side: Side,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
) -> Result<Option<(usize, ReceivedFds)>, SwrkProxyError> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut *cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(source) => {
                return Err(SwrkProxyError::Socket {
                    side,
                    op: "recvmsg",
                    source,
                })
            }
        };
        let mut fds = ReceivedFds::default();
        let Ok(cmsgs) = msg.cmsgs() else {
            return Err(SwrkProxyError::Truncated {
                side,
                what: "descriptors",
            });
        };
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.0.extend(r);
            }
        }
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(SwrkProxyError::Truncated {
                side,
                what: "bytes",
            });
        }
        if msg.bytes == 0 && fds.0.is_empty() {
            return Ok(None);
        }
        return Ok(Some((msg.bytes, fds)));
    }
}

/// Sends one message with `fds` attached.
fn send_message(fd: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> Result<(), Errno> {
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Errno::EMSGSIZE),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The peer is gone (or has shut its receiving side).
fn peer_gone(e: Errno) -> bool {
    matches!(e, Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN)
}

/// Sends one message with `fds` attached to `side`: `Ok(false)` when that peer has gone
/// ([`peer_gone`]), an error for any other failure.
fn relay_message(
    fd: BorrowedFd<'_>,
    side: Side,
    data: &[u8],
    fds: &[RawFd],
) -> Result<bool, SwrkProxyError> {
    match send_message(fd, data, fds) {
        Ok(()) => Ok(true),
        Err(e) if peer_gone(e) => Ok(false),
        Err(source) => Err(SwrkProxyError::Socket {
            side,
            op: "sendmsg",
            source,
        }),
    }
}

/// What [`forward`] relayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Messages from runc to CRIU.
    pub to_criu: u64,
    /// Messages from CRIU to runc.
    pub to_runc: u64,
    /// Descriptors passed along, both ways.
    pub fds: u64,
    /// Messages from CRIU dropped because runc had gone.
    pub dropped: u64,
    /// Notifications answered here at once ([`EARLY_ANSWERED`]); runc's own answers to them
    /// were not passed on.
    pub answered_early: u64,
    /// Of runc's answers to those, how many said its handling failed (runc then also fails
    /// the whole request, which its exit status reports).
    pub early_failed: u64,
}

/// Notifications (CRIU's "action scripts") that CRIU need not wait on runc for: runc only
/// keeps its own books there (the `checkpoint` marker after a dump, its state file after a
/// restore) or does nothing at all, and its answer carries nothing but success. The relay
/// answers them itself, at once, and still hands each to runc, whose answer it drops: about
/// 0.2-1.6 ms of the frozen window each (runc, a Go program, answers each in its own time). A
/// failure of runc there fails runc itself, which the agent checks before it relies on the
/// dump or commits the restore. Not here: `setup-namespaces` (runc runs the container's
/// prestart hooks, which must finish before CRIU goes on), `network-lock`/`network-unlock`
/// (runc changes the network), `query-ext-files` (runc's answer carries options),
/// `orphan-pts-master` and `status-ready`.
pub const EARLY_ANSWERED: [&str; 7] = [
    "pre-dump",
    "post-dump",
    "pre-restore",
    "post-setup-namespaces",
    "post-restore",
    "pre-resume",
    "post-resume",
];

/// Relays SEQPACKET messages (with their `SCM_RIGHTS` descriptors, boundaries kept) both
/// ways between `runc` and `criu` until CRIU closes its end. When runc closes its end (runc
/// shuts its writing side after the final answer), CRIU's receiving side is shut; what CRIU
/// sends after runc has gone is dropped.
pub fn forward(runc: BorrowedFd<'_>, criu: BorrowedFd<'_>) -> Result<ForwardStats, SwrkProxyError> {
    forward_with(runc, criu, &mut |_| {}, false)
}

/// [`forward`], answering the notifications of [`EARLY_ANSWERED`] at once and calling
/// `observe` with every message CRIU sent once runc has it.
pub fn forward_answering_early(
    runc: BorrowedFd<'_>,
    criu: BorrowedFd<'_>,
    observe: &mut dyn FnMut(&[u8]),
) -> Result<ForwardStats, SwrkProxyError> {
    forward_with(runc, criu, observe, true)
}

fn forward_with(
    runc: BorrowedFd<'_>,
    criu: BorrowedFd<'_>,
    observe: &mut dyn FnMut(&[u8]),
    answer_early: bool,
) -> Result<ForwardStats, SwrkProxyError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut stats = ForwardStats::default();
    // One entry per notification handed to runc, in order (runc answers each, in order):
    // whether it was answered here already, so that runc's answer is dropped.
    let mut owed: std::collections::VecDeque<bool> = std::collections::VecDeque::new();
    let mut runc_open = true;
    let mut criu_open = true;
    let mut criu_accepts = true;
    let ready = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
    loop {
        // CRIU has ended, and runc has no answer left that must not reach a closed socket
        // (runc fails when it cannot write one).
        if !criu_open && (!runc_open || !owed.contains(&true)) {
            return Ok(stats);
        }
        let (criu_ready, runc_ready) = {
            let mut fds = vec![];
            if criu_open {
                fds.push(PollFd::new(criu, PollFlags::POLLIN));
            }
            if runc_open {
                fds.push(PollFd::new(runc, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SwrkProxyError::Poll(e)),
            }
            let is_ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| r.intersects(ready));
            let criu_ready = criu_open && is_ready(&fds[0]);
            let runc_ready = runc_open && fds.last().is_some_and(is_ready);
            (criu_ready, runc_ready)
        };
        if runc_ready {
            match recv_message(runc, Side::Runc, &mut buf, &mut cmsg)? {
                None => {
                    runc_open = false;
                    let _ = shutdown(criu.as_raw_fd(), Shutdown::Write);
                }
                // runc's answer to a notification CRIU had its answer to already.
                Some((n, _))
                    if rpc::request_type(&buf[..n]) == Some(rpc::REQ_NOTIFY)
                        && owed.pop_front() == Some(true) =>
                {
                    if rpc::notify_answer_success(&buf[..n]) != Some(true) {
                        stats.early_failed += 1;
                    }
                }
                Some((n, fds)) if criu_accepts => {
                    if relay_message(criu, Side::Criu, &buf[..n], &fds.0)? {
                        stats.to_criu += 1;
                        stats.fds += fds.0.len() as u64;
                    } else {
                        // CRIU has gone: read what it left, up to its end of stream.
                        criu_accepts = false;
                    }
                }
                Some(_) => {}
            }
        }
        if criu_ready {
            match recv_message(criu, Side::Criu, &mut buf, &mut cmsg)? {
                None => {
                    criu_open = false;
                    criu_accepts = false;
                }
                Some((n, fds)) if runc_open => {
                    if relay_message(runc, Side::Runc, &buf[..n], &fds.0)? {
                        stats.to_runc += 1;
                        stats.fds += fds.0.len() as u64;
                        let msg = &buf[..n];
                        if rpc::request_type(msg) == Some(rpc::REQ_NOTIFY) {
                            let early = answer_early
                                && rpc::notify_script(msg).is_some_and(|s| {
                                    EARLY_ANSWERED.iter().any(|e| e.as_bytes() == s)
                                });
                            owed.push_back(early);
                            if early && criu_accepts {
                                if relay_message(criu, Side::Criu, &rpc::notify_success(), &[])? {
                                    stats.answered_early += 1;
                                } else {
                                    criu_accepts = false;
                                }
                            }
                        }
                        observe(msg);
                    } else {
                        runc_open = false;
                        stats.dropped += 1;
                        let _ = shutdown(criu.as_raw_fd(), Shutdown::Write);
                    }
                }
                Some(_) => stats.dropped += 1,
            }
        }
    }
}

/// A directory of runc's re-opened here: the `criu_opts` field that names it, and our copy.
type HeldDir = (u64, File);

/// Re-opens the directories the request names by runc's descriptor numbers
/// (`images_dir_fd`, `work_dir_fd`) and points the request at our copies.
fn adopt_peer_dirs(
    mut request: Vec<u8>,
    peer: i32,
) -> Result<(Vec<u8>, Vec<HeldDir>), SwrkProxyError> {
    let mut held = Vec::new();
    for (field, what) in [
        (opt::IMAGES_DIR_FD, "images directory"),
        (opt::WORK_DIR_FD, "work directory"),
    ] {
        let Some(fd) = rpc::opts_fd(&request, field) else {
            continue;
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_PATH.bits())
            .open(format!("/proc/{peer}/fd/{fd}"))
            .map_err(|source| SwrkProxyError::PeerFd {
                what,
                pid: peer,
                fd,
                source,
            })?;
        request = rpc::with_opts_varint(&request, field, file.as_raw_fd() as u64)
            .ok_or(SwrkProxyError::NotRelayable)?;
        held.push((field, file));
    }
    Ok((request, held))
}

/// Writes `error` as CRIU's log (`opts.log_file` in the work or images directory), where runc
/// quotes it from when the checkpoint fails: runc gives CRIU no stderr. Best effort.
fn note_in_criu_log(request: &[u8], dirs: &[HeldDir], error: &str) {
    let Some(name) = rpc::opts_bytes(request, opt::LOG_FILE)
        .and_then(|n| std::str::from_utf8(n).ok())
        .filter(|n| !n.is_empty() && !n.contains('/'))
    else {
        return;
    };
    let dir = [opt::WORK_DIR_FD, opt::IMAGES_DIR_FD]
        .iter()
        .find_map(|field| dirs.iter().find(|(f, _)| f == field));
    if let Some((_, dir)) = dir {
        let path = format!("/proc/self/fd/{}/{name}", dir.as_raw_fd());
        let _ = std::fs::write(path, format!("Error (ferry-criu): {error}\n"));
    }
}

fn set_cloexec(fd: BorrowedFd<'_>, on: bool, what: &'static str) -> Result<(), SwrkProxyError> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(drop)
        .map_err(|e| SwrkProxyError::Fd {
            what,
            source: e.into(),
        })
}

/// Runs one dump between runc (on `runc`, its request still unread) and the real CRIU at
/// `real_criu`, with the pages going to the UNIX socket at `page_server_socket`.
///
/// Reads runc's request, which must be [relayable](is_relayable); re-opens the directories it
/// names by runc's descriptor numbers; connects to `page_server_socket` and rewrites `opts.ps`
/// to a duplicate of that connection that CRIU inherits; starts `real_criu swrk FD` on a new
/// socket pair (runc's socket is not passed on; other inherited descriptors are), sends the
/// rewritten request, relays everything else ([`forward`]) until CRIU closes its end, shuts
/// runc's socket and returns CRIU's exit status. Without the agent's socket nothing is started:
/// the error is returned and also written as CRIU's log, where runc looks for it.
///
/// With `lazy_config` the dump becomes a *lazy* dump ([`rpc::lazy_dump_with_page_server_fd`]):
/// CRIU writes every image but the contents of lazy memory, then serves those pages from the
/// frozen tree over the same socket until the agent sends `PS_IOV_CLOSE`. The RPC configuration
/// file `lazy_config` is written here (`ps-socket FD`, then the lines of runc's own file).
///
/// With `gate`, CRIU is started (connected to the agent's socket, which the agent therefore
/// listens on before it lets runc start) and then waits at the agent's gate
/// ([`wait_at_gate`]): its start-up is out of the frozen window; [`GATE_DONE`] is sent back
/// through the gate once CRIU has answered runc with success, and a closed gate ends the idle
/// CRIU, which has touched nothing.
pub fn relay_dump(
    runc: BorrowedFd<'_>,
    real_criu: &Path,
    page_server_socket: &Path,
    lazy_config: Option<&Path>,
    gate: Option<&Path>,
) -> Result<ExitStatus, SwrkProxyError> {
    let (request, runc_fds, dirs) = take_request(runc, is_relayable)?;

    let ps: OwnedFd = {
        let stream = UnixStream::connect(page_server_socket).map_err(|source| {
            let e = SwrkProxyError::Connect {
                path: page_server_socket.to_owned(),
                source,
            };
            note_in_criu_log(&request, &dirs, &e.to_string());
            e
        })?;
        // Close-on-exec here; CRIU gets it under the same number through `preserved_fds`
        // (set in the child only, so that no other thread's child inherits it).
        OwnedFd::from(stream)
    };
    let request = match lazy_config {
        None => rpc::dump_with_page_server_fd(&request, ps.as_raw_fd())
            .ok_or(SwrkProxyError::NotRelayable)?,
        Some(config) => {
            let path = config.to_str().ok_or(SwrkProxyError::NotRelayable)?;
            let level = std::env::var(LAZY_DUMP_LOG_LEVEL_ENV)
                .ok()
                .and_then(|l| l.parse().ok())
                .filter(|l| *l <= 4)
                .unwrap_or(2);
            let (lazy, earlier) = rpc::lazy_dump_with_page_server_fd(&request, path, level)
                .ok_or(SwrkProxyError::NotRelayable)?;
            let mut text = format!("ps-socket {}\n", ps.as_raw_fd());
            if let Some(earlier) = earlier {
                let more =
                    std::fs::read_to_string(&earlier).map_err(|source| SwrkProxyError::Fd {
                        what: "reading runc's CRIU configuration file",
                        source,
                    })?;
                text.push_str(&more);
                text.push('\n');
            }
            std::fs::write(config, text).map_err(|source| {
                let e = SwrkProxyError::Fd {
                    what: "writing the lazy dump's CRIU configuration file",
                    source,
                };
                note_in_criu_log(&request, &dirs, &e.to_string());
                e
            })?;
            lazy
        }
    };

    let criu = SpawnedCriu::start(runc, real_criu, Some(ps), lazy_config.is_some())?;
    let (criu, done) = criu.unless(gate.map(wait_at_gate).transpose())?;
    criu.drive(
        runc,
        Taken {
            request,
            runc_fds,
            dirs,
        },
        rpc::REQ_DUMP,
        done.as_ref(),
    )
}

/// Reads runc's request from `runc`, refuses it unless `accept` takes it, and re-opens the
/// directories it names by runc's descriptor numbers ([`adopt_peer_dirs`]).
fn take_request(
    runc: BorrowedFd<'_>,
    accept: fn(&[u8]) -> bool,
) -> Result<(Vec<u8>, ReceivedFds, Vec<HeldDir>), SwrkProxyError> {
    let peer = getsockopt(&runc, sockopt::PeerCredentials)
        .map_err(SwrkProxyError::PeerCredentials)?
        .pid();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, runc_fds) =
        recv_message(runc, Side::Runc, &mut buf, &mut cmsg)?.ok_or(SwrkProxyError::NoRequest)?;
    buf.truncate(n);
    if !accept(&buf) {
        return Err(SwrkProxyError::NotRelayable);
    }
    let (request, dirs) = adopt_peer_dirs(buf, peer)?;
    Ok((request, runc_fds, dirs))
}

/// A `criu swrk` started on a socket pair of ours, idle until it gets a request.
struct SpawnedCriu {
    child: std::process::Child,
    ours: OwnedFd,
}

/// runc's request, read, with what must stay open while CRIU runs it.
struct Taken {
    request: Vec<u8>,
    runc_fds: ReceivedFds,
    dirs: Vec<HeldDir>,
}

impl SpawnedCriu {
    /// Starts `real_criu swrk FD` (`ps`, if any, is passed on under its own number; `runc`'s
    /// socket is not: CRIU talks to us).
    fn start(
        runc: BorrowedFd<'_>,
        real_criu: &Path,
        ps: Option<OwnedFd>,
        lazy_elsewhere: bool,
    ) -> Result<SpawnedCriu, SwrkProxyError> {
        set_cloexec(runc, true, "keeping runc's socket from CRIU")?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SwrkProxyError::Fd {
            what: "socketpair for CRIU",
            source: e.into(),
        })?;
        let mut cmd = Command::new(real_criu);
        let mut inherited = vec![theirs];
        inherited.extend(ps);
        cmd.arg("swrk")
            .arg(inherited[0].as_raw_fd().to_string())
            .env_remove(PAGE_SERVER_SOCKET_ENV)
            .env_remove(LAZY_DUMP_CONFIG_ENV)
            .env_remove(GATE_ENV)
            .preserved_fds(inherited);
        if lazy_elsewhere {
            cmd.env(LAZY_PAGES_ELSEWHERE_ENV, "1");
        }
        let child = cmd.spawn().map_err(|source| SwrkProxyError::Spawn {
            path: real_criu.to_owned(),
            source,
        })?;
        // Our copies of CRIU's descriptors close with the command.
        drop(cmd);
        Ok(SpawnedCriu { child, ours })
    }

    /// `r`'s value with this CRIU; on an error, ends this CRIU, which got no request (it sees
    /// the end of its socket and exits), and returns the error.
    fn unless<T>(self, r: Result<T, SwrkProxyError>) -> Result<(Self, T), SwrkProxyError> {
        match r {
            Ok(v) => Ok((self, v)),
            Err(e) => {
                let SpawnedCriu { mut child, ours } = self;
                drop(ours);
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Sends `taken.request` to CRIU, relays everything else ([`forward`]) until CRIU closes
    /// its end (sending [`GATE_DONE`] to `done` at CRIU's successful final answer), shuts
    /// runc's socket and returns CRIU's exit status.
    fn drive(
        self,
        runc: BorrowedFd<'_>,
        taken: Taken,
        req_type: u64,
        done: Option<&UnixStream>,
    ) -> Result<ExitStatus, SwrkProxyError> {
        let SpawnedCriu { mut child, ours } = self;
        let Taken {
            request,
            runc_fds,
            dirs,
        } = taken;
        let sent = send_message(ours.as_fd(), &request, &runc_fds.0);
        drop(runc_fds);
        let mut signalled = false;
        let mut observe = |msg: &[u8]| {
            if !signalled && rpc::final_response_success(msg, req_type) == Some(true) {
                signalled = true;
                if let Some(mut d) = done {
                    use std::io::Write;
                    // Best effort: without it the agent waits for runc's exit.
                    let _ = d.write_all(&[GATE_DONE]);
                }
            }
        };
        let relayed = sent
            .map_err(|source| SwrkProxyError::Socket {
                side: Side::Criu,
                op: "sendmsg",
                source,
            })
            .and_then(|()| forward_answering_early(runc, ours.as_fd(), &mut observe));
        // On error CRIU sees the end of its socket and gives up by itself, which leaves the
        // container as it was; killing it in the middle of a dump might not.
        drop(ours);
        let _ = shutdown(runc.as_raw_fd(), Shutdown::Both);
        let status = child.wait().map_err(SwrkProxyError::Wait)?;
        drop(dirs);
        match relayed {
            Ok(_) => Ok(status),
            Err(e) => Err(SwrkProxyError::Relay {
                source: Box::new(e),
                status,
            }),
        }
    }
}

/// Runs runc's request (on `runc`, still unread) through the real CRIU at `real_criu`
/// unchanged but for the descriptors of runc it names, which are re-opened here, and sends
/// [`GATE_DONE`] through the gate once CRIU has answered with success. CRIU is started
/// *before* the agent's gate at `gate` opens: its start (exec, libraries, about 2 ms) is out
/// of the frozen window; the request goes to it once the gate opens, and a closed gate ends
/// the idle CRIU, which has touched nothing. The request must be
/// [relayable](is_relayable_unchanged). Returns CRIU's exit status.
///
/// Relaying (rather than letting CRIU replace `ferry-criu`) is what lets the agent learn that
/// CRIU is done before runc has exited. For a restore, runc asks CRIU to restore the tasks as
/// its siblings (`rst_sibling`): they are then children of `ferry-criu` until it exits, and
/// pass to runc's parent (or to the nearest subreaper) as they would have from runc.
pub fn relay_unchanged_behind_gate(
    runc: BorrowedFd<'_>,
    real_criu: &Path,
    gate: &Path,
) -> Result<ExitStatus, SwrkProxyError> {
    let (request, runc_fds, dirs) = take_request(runc, is_relayable_unchanged)?;
    let req_type = rpc::request_type(&request).ok_or(SwrkProxyError::NotRelayable)?;
    let criu = SpawnedCriu::start(runc, real_criu, None, false)?;
    let (criu, done) = criu.unless(wait_at_gate(gate))?;
    let taken = Taken {
        request,
        runc_fds,
        dirs,
    };
    criu.drive(runc, taken, req_type, Some(&done))
}

#[cfg(test)]
mod tests;
