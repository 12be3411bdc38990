//! Holding a container's packets (IPv4, and IPv6 when its namespace has IPv6) at the migration
//! destination while it is frozen: those that come in, and those a restored copy sends before
//! its commit.
//!
//! During a live migration Ferry points the overlay at the destination before the source
//! container is frozen. Until the restored container is live, its inbound packets must be
//! *held* (not dropped, not answered with RST) and released in order afterwards, so TCP peers
//! see a pause instead of loss.
//!
//! Mechanism: a holder thread owns an `nfnetlink_queue` socket opened inside the container's
//! network namespace and bound to queue `N`; then the rule
//! `iptables -w -t raw -I PREROUTING -j NFQUEUE --queue-num N` (without `--queue-bypass`)
//! sends every inbound IPv4 packet to that queue, and the same rule in `OUTPUT` every packet the
//! container sends, so that a restored copy cannot talk before the commit (the source may still
//! roll back and thaw its own). A namespace with IPv6 gets the same rules from `ip6tables`
//! (one queue takes both families); each family's rules go in and out with one
//! `iptables-restore --noflush`, both families at once. The kernel keeps each queued packet until
//! the holder gives a verdict; the holder only records packet ids (metadata-only copy mode).
//! [`Hold::release`] accepts them in arrival order, [`Hold::discard`] drops them.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::sdn::{self, nl, SdnError};

// nfnetlink / nfnetlink_queue constants (linux/netfilter/nfnetlink*.h).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = NFNL_SUBSYS_QUEUE << 8;
const NFQNL_MSG_VERDICT: u16 = (NFNL_SUBSYS_QUEUE << 8) | 1;
const NFQNL_MSG_CONFIG: u16 = (NFNL_SUBSYS_QUEUE << 8) | 2;
const NFNETLINK_V0: u8 = 0;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Maximum number of packets the kernel keeps queued for one hold.
pub const QUEUE_MAXLEN: u32 = 8192;
/// Receive buffer requested for the queue socket (`SO_RCVBUFFORCE`).
const RCVBUF_BYTES: libc::c_int = 8 * 1024 * 1024;
/// How long [`Hold::release`] keeps accepting after the rule is removed.
pub const RELEASE_DRAIN: Duration = Duration::from_millis(50);
/// Poll interval of the holder thread (commands wake it at once).
const POLL_MS: libc::c_int = 5;
/// Verdict messages packed into one `sendto` (32 bytes each).
const VERDICTS_PER_SEND: usize = 1024;

/// Errors from holding packets.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// The container's network namespace could not be entered.
    #[error("cannot open the packet queue inside network namespace {netns:?}: {source}")]
    Netns {
        /// The namespace name.
        netns: String,
        /// The underlying error.
        #[source]
        source: SdnError,
    },
    /// A socket operation on the `nfnetlink_queue` socket failed.
    #[error(
        "nfnetlink_queue socket {op} failed for queue {queue_num} in network namespace \
         {netns:?}: {source}; Ferry needs CAP_NET_ADMIN and a kernel with \
         CONFIG_NETFILTER_NETLINK_QUEUE"
    )]
    Socket {
        /// The namespace name.
        netns: String,
        /// The queue number.
        queue_num: u16,
        /// The failing operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused to bind the queue: another socket already owns this queue number
    /// in this namespace (`EPERM`/`EBUSY`), or the caller lacks `CAP_NET_ADMIN` there.
    #[error(
        "NFQUEUE queue {queue_num} in network namespace {netns:?} cannot be bound (errno \
         {errno}): another socket already holds it (release that hold first or pick another \
         queue number), or Ferry lacks CAP_NET_ADMIN in that namespace"
    )]
    QueueBusy {
        /// The namespace name.
        netns: String,
        /// The queue number.
        queue_num: u16,
        /// The positive errno (`EPERM` or `EBUSY`).
        errno: i32,
    },
    /// The kernel rejected a queue configuration request.
    #[error(
        "kernel rejected nfnetlink_queue {what} for queue {queue_num} in network namespace \
         {netns:?}: errno {errno} ({reason}); check that CONFIG_NETFILTER_NETLINK_QUEUE is \
         enabled"
    )]
    Config {
        /// The namespace name.
        netns: String,
        /// The queue number.
        queue_num: u16,
        /// The request (`bind`, `params`).
        what: &'static str,
        /// The positive errno.
        errno: i32,
        /// Description of the errno and the kernel's extended-ACK message.
        reason: String,
    },
    /// An iptables invocation failed.
    #[error(
        "`{command}` failed: {detail}; check that iptables is installed and the raw table and \
         NFQUEUE target are available (CONFIG_IP_NF_RAW, CONFIG_NETFILTER_XT_TARGET_NFQUEUE)"
    )]
    Iptables {
        /// The full command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// The holder thread is gone; the kernel dropped whatever it held.
    #[error(
        "the packet holder for queue {queue_num} in network namespace {netns:?} stopped \
         unexpectedly: {detail}; the held packets were dropped and TCP peers will retransmit"
    )]
    HolderGone {
        /// The namespace name.
        netns: String,
        /// The queue number.
        queue_num: u16,
        /// What happened.
        detail: String,
    },
    /// The holder thread could not be spawned.
    #[error("cannot spawn the packet holder thread for network namespace {netns:?}: {source}; check process limits")]
    ThreadSpawn {
        /// The namespace name.
        netns: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Which verdict the holder thread gives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Holding,
    Accepting,
    Dropping,
}

type Reply = mpsc::Sender<Result<u64, HoldError>>;

enum Cmd {
    /// Give `verdict` to every held packet, then to everything that arrives; reply with the
    /// number of held packets that got it.
    Flush { mode: Mode, reply: Reply },
    /// Give the current verdict to anything still pending, close the socket, reply with the
    /// number of packets that got a verdict since the flush.
    Stop { reply: Reply },
}

struct Shared {
    held: AtomicU64,
}

struct Inner {
    netns: String,
    queue_num: u16,
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Cmd>,
    /// Wakes the holder from its poll when a command is sent (a release must not wait for
    /// the poll's timeout: the container's clients wait for it).
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), HoldError>>>,
    rule_installed: bool,
    /// The address families whose packets are held.
    families: Vec<Family>,
}

/// An active hold of every inbound IPv4 packet of one network namespace.
///
/// Call [`Hold::release`] or [`Hold::discard`]; dropping a `Hold` discards (best effort).
pub struct Hold {
    inner: Option<Inner>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Hold");
        if let Some(inner) = &self.inner {
            d.field("netns", &inner.netns)
                .field("queue_num", &inner.queue_num)
                .field("held", &inner.shared.held.load(Ordering::Relaxed));
        }
        d.finish_non_exhaustive()
    }
}

impl Hold {
    /// Starts holding: opens and binds `nfnetlink_queue` queue `queue_num` inside the network
    /// namespace `/run/netns/NETNS` (queue length [`QUEUE_MAXLEN`], metadata-only copies, big
    /// receive buffer), starts the holder thread, then installs
    /// `ip netns exec NETNS iptables -w -t raw -I PREROUTING -j NFQUEUE --queue-num N`.
    pub fn start(netns: &str, queue_num: u16) -> Result<Hold, HoldError> {
        let sock = sdn::in_netns(netns, || open_queue(netns, queue_num)).map_err(|source| {
            HoldError::Netns {
                netns: netns.to_owned(),
                source,
            }
        })??;
        let shared = Arc::new(Shared {
            held: AtomicU64::new(0),
        });
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(|e| {
                HoldError::Socket {
                    netns: netns.to_owned(),
                    queue_num,
                    op: "eventfd",
                    source: io::Error::from(e),
                }
            })?,
        );
        let holder = Holder {
            wake: Arc::clone(&wake),
            netns: netns.to_owned(),
            queue_num,
            sock,
            shared: Arc::clone(&shared),
            mode: Mode::Holding,
            held: VecDeque::new(),
            after_flush: 0,
            buf: vec![0u8; 64 * 1024],
        };
        let thread = std::thread::Builder::new()
            .name(format!("hold-q{queue_num}"))
            .spawn(move || holder.run(cmd_rx))
            .map_err(|source| HoldError::ThreadSpawn {
                netns: netns.to_owned(),
                source,
            })?;
        let mut hold = Hold {
            inner: Some(Inner {
                netns: netns.to_owned(),
                queue_num,
                shared,
                wake,
                cmd: cmd_tx,
                thread: Some(thread),
                rule_installed: false,
                families: vec![],
            }),
        };
        if let Some(inner) = hold.inner.as_mut() {
            // On failure `hold` is dropped, which stops the thread and unbinds the queue.
            inner.families = families(netns);
            iptables(netns, "-I", queue_num, &inner.families)?;
            inner.rule_installed = true;
        }
        tracing::info!(netns, queue_num, "holding inbound packets");
        Ok(hold)
    }

    /// Number of packets currently held.
    pub fn held(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.held.load(Ordering::Relaxed))
    }

    /// Name of the network namespace whose packets are held.
    pub fn netns(&self) -> &str {
        self.inner.as_ref().map_or("", |i| i.netns.as_str())
    }

    /// The NFQUEUE queue number in use.
    pub fn queue_num(&self) -> u16 {
        self.inner.as_ref().map_or(0, |i| i.queue_num)
    }

    /// Accepts every held packet in arrival order, removes the rule, keeps accepting whatever
    /// is still queued for [`RELEASE_DRAIN`], then stops the holder. Returns how many packets
    /// were released.
    pub fn release(mut self) -> Result<u64, HoldError> {
        match self.inner.take() {
            Some(inner) => inner.finish(Mode::Accepting),
            None => Ok(0),
        }
    }

    /// Accepts every held packet now and returns how many; the holder keeps accepting while a
    /// background thread removes the rule, drains and stops it (errors there are logged). For
    /// the commit path of a migration, where every millisecond is downtime.
    pub fn release_now(mut self) -> Result<u64, HoldError> {
        let Some(mut inner) = self.inner.take() else {
            return Ok(0);
        };
        match inner.command(|reply| Cmd::Flush {
            mode: Mode::Accepting,
            reply,
        }) {
            Ok(n) => {
                let spawned = std::thread::Builder::new()
                    .name("ferry-hold-finish".into())
                    .spawn(move || {
                        if let Err(error) = inner.finish(Mode::Accepting) {
                            tracing::error!(%error, "finishing a released hold failed");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot spawn the hold finisher; the rule may stay");
                }
                Ok(n)
            }
            Err(e) => {
                let _ = inner.finish(Mode::Accepting);
                Err(e)
            }
        }
    }

    /// Drops every held packet (and anything still queued), removes the rule and stops the
    /// holder. Returns how many packets were dropped.
    pub fn discard(mut self) -> Result<u64, HoldError> {
        match self.inner.take() {
            Some(inner) => inner.finish(Mode::Dropping),
            None => Ok(0),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let (netns, queue_num) = (inner.netns.clone(), inner.queue_num);
            match inner.finish(Mode::Dropping) {
                Ok(dropped) => {
                    tracing::warn!(
                        netns,
                        queue_num,
                        dropped,
                        "hold dropped without release; discarded held packets"
                    )
                }
                Err(error) => {
                    tracing::error!(netns, queue_num, %error, "discarding a dropped hold failed")
                }
            }
        }
    }
}

impl Inner {
    fn gone(&mut self, detail: &str) -> HoldError {
        let detail = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e.to_string(),
            Some(Err(_)) => "the holder thread panicked".to_owned(),
            _ => detail.to_owned(),
        };
        HoldError::HolderGone {
            netns: self.netns.clone(),
            queue_num: self.queue_num,
            detail,
        }
    }

    fn command(&mut self, make: impl FnOnce(Reply) -> Cmd) -> Result<u64, HoldError> {
        let (tx, rx) = mpsc::channel();
        if self.cmd.send(make(tx)).is_err() {
            return Err(self.gone("its command channel is closed"));
        }
        // Best effort: without the wake the holder still sees the command within POLL_MS.
        let _ = self.wake.write(1);
        match rx.recv() {
            Ok(r) => r,
            Err(_) => Err(self.gone("it exited without answering")),
        }
    }

    /// Flushes with `mode`, removes the rule, drains (when accepting) and stops the thread.
    /// The rule is removed and the thread stopped even if an earlier step failed.
    fn finish(mut self, mode: Mode) -> Result<u64, HoldError> {
        let flushed = self.command(|reply| Cmd::Flush { mode, reply });
        let unruled = if self.rule_installed {
            let r = iptables(&self.netns, "-D", self.queue_num, &self.families);
            if r.is_ok() {
                self.rule_installed = false;
            }
            r
        } else {
            Ok(())
        };
        if mode == Mode::Accepting && flushed.is_ok() {
            std::thread::sleep(RELEASE_DRAIN);
        }
        let stopped = self.command(|reply| Cmd::Stop { reply });
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(e)) => {
                    tracing::warn!(netns = %self.netns, queue_num = self.queue_num, error = %e, "holder thread ended with an error")
                }
                Err(_) => {
                    tracing::error!(netns = %self.netns, queue_num = self.queue_num, "holder thread panicked")
                }
                Ok(Ok(())) => {}
            }
        }
        let total = flushed? + stopped?;
        unruled?;
        tracing::info!(netns = %self.netns, queue_num = self.queue_num, ?mode, packets = total, "hold finished");
        Ok(total)
    }
}

/// An address family whose packets a hold queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables`.
    V4,
    /// IPv6: `ip6tables`.
    V6,
}

impl Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// The families a hold in `netns` must queue: IPv4, and IPv6 unless the namespace has it off
/// (`net.ipv6.conf.all.disable_ipv6`, as seen from inside it).
pub fn families(netns: &str) -> Vec<Family> {
    let v6 = sdn::in_netns(netns, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .is_ok_and(|s| s.trim() == "0")
    })
    .unwrap_or(false);
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Removes the queue rules of a hold whose holder is gone (its process died): every rule of
/// queue `queue_num` in `netns`, in both chains and both families, if any.
pub fn remove_rule(netns: &str, queue_num: u16) -> Result<(), HoldError> {
    for family in [Family::V4, Family::V6] {
        for chain in CHAINS {
            for _ in 0..16 {
                if iptables_chain(netns, family, "-D", chain, queue_num).is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// What a hold queues: packets coming in (`PREROUTING`) and packets the container sends
/// (`OUTPUT`), so that a restored copy stays silent until its commit.
const CHAINS: [&str; 2] = ["PREROUTING", "OUTPUT"];

/// Installs (`-I`) or removes (`-D`) the queue rule in both [`CHAINS`] of every family in
/// `families`, the families at once. Per family the rules change together or not at all
/// (`iptables-restore`); an insert that fails for one family removes what the others added; a
/// removal that fails falls back to removing chain by chain and reports the first error.
fn iptables(
    netns: &str,
    action: &str,
    queue_num: u16,
    families: &[Family],
) -> Result<(), HoldError> {
    let results: Vec<(Family, Result<(), HoldError>)> = std::thread::scope(|s| {
        let runs: Vec<_> = families
            .iter()
            .map(|&f| (f, s.spawn(move || restore(netns, f, action, queue_num))))
            .collect();
        runs.into_iter()
            .map(|(f, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(HoldError::Iptables {
                        command: format!("{}-restore", f.tool()),
                        detail: "the thread running it panicked".into(),
                    })
                });
                (f, r)
            })
            .collect()
    });
    let mut first = Ok(());
    for (family, r) in results {
        let Err(e) = r else { continue };
        if action == "-D" {
            // One chain may have lost its rule already: remove what is left, chain by chain.
            for chain in CHAINS {
                let _ = iptables_chain(netns, family, "-D", chain, queue_num);
            }
        }
        if first.is_ok() {
            first = Err(e);
        }
    }
    if first.is_err() && action == "-I" {
        for &family in families {
            for chain in CHAINS {
                let _ = iptables_chain(netns, family, "-D", chain, queue_num);
            }
        }
    }
    first
}

/// Runs `ip netns exec NETNS {ip,ip6}tables-restore -w --noflush` with ACTION for both chains.
fn restore(netns: &str, family: Family, action: &str, queue_num: u16) -> Result<(), HoldError> {
    use std::io::Write;
    let tool = format!("{}-restore", family.tool());
    let command = format!("ip netns exec {netns} {tool} -w --noflush");
    let script: String = std::iter::once("*raw\n".to_string())
        .chain(
            CHAINS
                .iter()
                .map(|c| format!("{action} {c} -j NFQUEUE --queue-num {queue_num}\n")),
        )
        .chain(std::iter::once("COMMIT\n".to_string()))
        .collect();
    let fail = |detail: String| HoldError::Iptables {
        command: command.clone(),
        detail,
    };
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, &tool, "-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run `ip` (is iproute2 installed?): {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(format!("writing the rules: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    tracing::debug!(netns, queue_num, action, ?family, "NFQUEUE rules updated");
    Ok(())
}

/// Runs `ip netns exec NETNS {ip,ip6}tables -w -t raw ACTION CHAIN -j NFQUEUE --queue-num N`.
fn iptables_chain(
    netns: &str,
    family: Family,
    action: &str,
    chain: &str,
    queue_num: u16,
) -> Result<(), HoldError> {
    let num = queue_num.to_string();
    let args = [
        "netns",
        "exec",
        netns,
        family.tool(),
        "-w",
        "-t",
        "raw",
        action,
        chain,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &num,
    ];
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| HoldError::Iptables {
            command: command.clone(),
            detail: format!("cannot run `ip` (is iproute2 installed?): {e}"),
        })?;
    if !output.status.success() {
        return Err(HoldError::Iptables {
            command,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

fn nfgenmsg(queue_num: u16) -> [u8; 4] {
    let q = queue_num.to_be_bytes();
    [libc::AF_UNSPEC as u8, NFNETLINK_V0, q[0], q[1]]
}

/// Opens a `NETLINK_NETFILTER` socket in the calling thread's namespace and binds it to
/// `queue_num` with metadata-only copies and a long queue.
fn open_queue(netns: &str, queue_num: u16) -> Result<nl::Socket, HoldError> {
    let sock_err = |op, source| HoldError::Socket {
        netns: netns.to_owned(),
        queue_num,
        op,
        source,
    };
    let sock = nl::Socket::open(nix::sys::socket::SockProtocol::NetlinkNetFilter)
        .map_err(|(op, e)| sock_err(op, e))?;
    sock.enable_ext_ack();
    if let Err(e) = sock.set_opt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF_BYTES) {
        tracing::debug!(netns, queue_num, error = %e, "SO_RCVBUFFORCE refused; using SO_RCVBUF");
        sock.set_opt(libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF_BYTES)
            .map_err(|e| sock_err("setsockopt(SO_RCVBUF)", e))?;
    }
    sock.set_opt(libc::SOL_NETLINK, libc::NETLINK_NO_ENOBUFS, 1)
        .map_err(|e| sock_err("setsockopt(NETLINK_NO_ENOBUFS)", e))?;

    let bind = nl::MsgBuilder::new(NFQNL_MSG_CONFIG, nl::NLM_F_REQUEST | nl::NLM_F_ACK, 1)
        .raw(&nfgenmsg(queue_num))
        // struct nfqnl_msg_config_cmd { u8 command; u8 pad; be16 pf }
        .attr(
            NFQA_CFG_CMD,
            &[NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8],
        )
        .finish();
    config_request(&sock, netns, queue_num, "bind", &bind, 1)?;

    let mut params = [0u8; 5]; // struct nfqnl_msg_config_params { be32 copy_range; u8 mode } packed
    params[4] = NFQNL_COPY_META;
    let cfg = nl::MsgBuilder::new(NFQNL_MSG_CONFIG, nl::NLM_F_REQUEST | nl::NLM_F_ACK, 2)
        .raw(&nfgenmsg(queue_num))
        .attr(NFQA_CFG_PARAMS, &params)
        .attr(NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAXLEN.to_be_bytes())
        .finish();
    config_request(&sock, netns, queue_num, "params", &cfg, 2)?;
    tracing::debug!(
        netns,
        queue_num,
        maxlen = QUEUE_MAXLEN,
        "nfnetlink_queue bound"
    );
    Ok(sock)
}

fn config_request(
    sock: &nl::Socket,
    netns: &str,
    queue_num: u16,
    what: &'static str,
    msg: &[u8],
    seq: u32,
) -> Result<(), HoldError> {
    let sock_err = |op, source| HoldError::Socket {
        netns: netns.to_owned(),
        queue_num,
        op,
        source,
    };
    sock.send(msg).map_err(|e| sock_err("send", e))?;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = sock
            .recv(&mut buf, false)
            .map_err(|e| sock_err("recv", e))?;
        let msgs = nl::messages(&buf[..n]).map_err(|d| sock_err("recv", io::Error::other(d)))?;
        for m in msgs {
            if m.msg_type != nl::NLMSG_ERROR || m.seq != seq {
                continue;
            }
            let err = nl::parse_error(m.flags, m.payload)
                .ok_or_else(|| sock_err("recv", io::Error::other("short NLMSG_ERROR message")))?;
            return match err.errno {
                0 => Ok(()),
                errno @ (libc::EPERM | libc::EBUSY) if what == "bind" => {
                    Err(HoldError::QueueBusy {
                        netns: netns.to_owned(),
                        queue_num,
                        errno,
                    })
                }
                errno => Err(HoldError::Config {
                    netns: netns.to_owned(),
                    queue_num,
                    what,
                    errno,
                    reason: err.reason(),
                }),
            };
        }
    }
}

/// The holder thread's state.
struct Holder {
    netns: String,
    queue_num: u16,
    sock: nl::Socket,
    wake: Arc<EventFd>,
    shared: Arc<Shared>,
    mode: Mode,
    held: VecDeque<u32>,
    /// Packets that got a verdict after the flush.
    after_flush: u64,
    buf: Vec<u8>,
}

impl Holder {
    fn socket_err(&self, op: &'static str, source: io::Error) -> HoldError {
        HoldError::Socket {
            netns: self.netns.clone(),
            queue_num: self.queue_num,
            op,
            source,
        }
    }

    fn run(mut self, cmds: mpsc::Receiver<Cmd>) -> Result<(), HoldError> {
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Flush { mode, reply }) => {
                    let r = self.flush(mode);
                    let _ = reply.send(r);
                }
                Ok(Cmd::Stop { reply }) => {
                    let r = self.drain().map(|()| self.after_flush);
                    let _ = reply.send(r);
                    // Closing the socket unbinds the queue; the kernel drops anything left.
                    return Ok(());
                }
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                Err(mpsc::TryRecvError::Empty) => {}
            }
            let readable = self
                .sock
                .poll_readable_or(self.wake.as_fd(), POLL_MS)
                .map_err(|e| self.socket_err("poll", e))?;
            // Non-blocking: EAGAIN when no command woke the poll.
            let _ = self.wake.read();
            if readable {
                self.drain()?;
            }
        }
    }

    /// Gives `mode`'s verdict to every held packet in arrival order and switches to `mode`.
    fn flush(&mut self, mode: Mode) -> Result<u64, HoldError> {
        self.drain()?;
        let ids: Vec<u32> = self.held.drain(..).collect();
        self.mode = mode;
        self.shared.held.store(0, Ordering::Relaxed);
        self.verdicts(&ids)?;
        tracing::debug!(netns = %self.netns, queue_num = self.queue_num, ?mode, packets = ids.len(), "held packets flushed");
        Ok(ids.len() as u64)
    }

    /// Reads everything pending on the socket without blocking and handles it per mode.
    fn drain(&mut self) -> Result<(), HoldError> {
        let mut fresh = Vec::new();
        loop {
            let n = match self.sock.recv(&mut self.buf, true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!(netns = %self.netns, queue_num = self.queue_num, "queue socket overran; some packets were dropped by the kernel");
                    continue;
                }
                Err(e) => return Err(self.socket_err("recv", e)),
            };
            let msgs = nl::messages(&self.buf[..n])
                .map_err(|d| self.socket_err("recv", io::Error::other(d)))?;
            for m in msgs {
                match m.msg_type {
                    NFQNL_MSG_PACKET => match packet_id(m.payload) {
                        Some(id) => fresh.push(id),
                        None => {
                            tracing::warn!(netns = %self.netns, queue_num = self.queue_num, "queued packet without NFQA_PACKET_HDR ignored")
                        }
                    },
                    nl::NLMSG_ERROR => {
                        if let Some(err) = nl::parse_error(m.flags, m.payload) {
                            if err.errno != 0 {
                                tracing::warn!(netns = %self.netns, queue_num = self.queue_num, errno = err.errno, reason = %err.reason(), "kernel rejected a verdict");
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        if self.mode == Mode::Holding {
            self.held.extend(fresh);
            self.shared
                .held
                .store(self.held.len() as u64, Ordering::Relaxed);
        } else {
            self.after_flush += fresh.len() as u64;
            self.verdicts(&fresh)?;
        }
        Ok(())
    }

    /// Sends the current mode's verdict for `ids`, in order, batching messages per `sendto`.
    fn verdicts(&self, ids: &[u32]) -> Result<(), HoldError> {
        let verdict = if self.mode == Mode::Accepting {
            NF_ACCEPT
        } else {
            NF_DROP
        };
        for chunk in ids.chunks(VERDICTS_PER_SEND) {
            let mut batch = Vec::with_capacity(chunk.len() * 32);
            for id in chunk {
                let mut hdr = [0u8; 8]; // struct nfqnl_msg_verdict_hdr { be32 verdict; be32 id }
                hdr[..4].copy_from_slice(&verdict.to_be_bytes());
                hdr[4..].copy_from_slice(&id.to_be_bytes());
                let msg = nl::MsgBuilder::new(NFQNL_MSG_VERDICT, nl::NLM_F_REQUEST, 0)
                    .raw(&nfgenmsg(self.queue_num))
                    .attr(NFQA_VERDICT_HDR, &hdr)
                    .finish();
                batch.extend_from_slice(&msg);
            }
            self.sock
                .send(&batch)
                .map_err(|e| self.socket_err("send(verdict)", e))?;
        }
        Ok(())
    }
}

/// The packet id from an `NFQNL_MSG_PACKET` payload (nfgenmsg + attributes).
fn packet_id(payload: &[u8]) -> Option<u32> {
    let attrs = payload.get(4..)?;
    nl::attrs(attrs)
        .find(|(ty, _)| *ty == NFQA_PACKET_HDR)
        .and_then(|(_, data)| data.get(..4))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_id_is_parsed() {
        let mut p = vec![2, 0, 0, 7];
        p.extend_from_slice(&11u16.to_ne_bytes());
        p.extend_from_slice(&NFQA_PACKET_HDR.to_ne_bytes());
        p.extend_from_slice(&[0, 0, 1, 2, 0x08, 0x00, 1, 0]);
        assert_eq!(packet_id(&p), Some(258));
        assert_eq!(packet_id(&[2, 0]), None);
    }

    #[test]
    fn bad_netns_is_a_typed_error() {
        let err = Hold::start("ferry-no-such-netns", 7).unwrap_err();
        assert!(matches!(err, HoldError::Netns { .. }), "{err}");
        assert!(err.to_string().contains("ferry-no-such-netns"));
    }
}
