//! A relay between `criu dump --page-server` and a real `criu page-server` that parses and
//! re-encodes every message and hands every page to a hook.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{
    read_message, read_payload, read_reply, write_message, write_payload, write_reply, Command,
    DstId, Message, ProtocolError, Reply, PAGE_SIZE,
};

/// What a hook returns when it refuses a payload; the proxy then stops, which makes both the
/// dump and the page server fail.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// The per-payload hook: the (narrowed) message and its pages, which it may overwrite.
pub type Hook<'a> = dyn FnMut(&Message, &mut [u8]) -> Result<(), HookError> + 'a;

/// How [`proxy_with`] behaves.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Longest wait for any single read or write on either socket. CRIU is silent between
    /// connecting and the first process's memory, and between the last page and CLOSE (while
    /// it dumps files and the rest), so this must cover those phases. `None`: wait forever.
    pub idle_timeout: Option<Duration>,
    /// Pages handed to the hook at once (and the size of the one buffer the proxy uses).
    pub chunk_pages: u64,
    /// How many messages [`ProxyStats::trace`] keeps.
    pub trace_limit: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            idle_timeout: Some(Duration::from_secs(300)),
            chunk_pages: 256,
            trace_limit: 100_000,
        }
    }
}

/// What went through the proxy.
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    /// Messages by command.
    pub messages: BTreeMap<Command, u64>,
    /// Pages whose contents were forwarded (and shown to the hook).
    pub payload_pages: u64,
    /// Bytes of page contents forwarded.
    pub payload_bytes: u64,
    /// Pages described by messages without contents (holes, lazy-only entries).
    pub pages_without_payload: u64,
    /// Bytes of message headers forwarded.
    pub header_bytes: u64,
    /// Bytes of replies forwarded from the page server to CRIU.
    pub reply_bytes: u64,
    /// Calls of the hook.
    pub hook_calls: u64,
    /// Images opened, in order.
    pub images: Vec<DstId>,
    /// The messages, in order (at most [`ProxyOptions::trace_limit`]).
    pub trace: Vec<Message>,
    /// The page server's answer to CLOSE.
    pub close_status: Option<i32>,
    /// From the first message to the end.
    pub elapsed: Duration,
}

impl ProxyStats {
    /// Messages of one command.
    pub fn count(&self, command: Command) -> u64 {
        self.messages.get(&command).copied().unwrap_or(0)
    }

    /// All messages.
    pub fn total_messages(&self) -> u64 {
        self.messages.values().sum()
    }
}

/// Which end of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `criu dump`, the sender.
    Criu,
    /// `criu page-server`, the receiver.
    PageServer,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Criu => "CRIU (dump side)",
            Side::PageServer => "the page server",
        })
    }
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A bad or failed read.
    #[error("reading from {side}: {source}")]
    Read {
        /// Where from.
        side: Side,
        /// What went wrong.
        source: ProtocolError,
    },
    /// A failed write.
    #[error("writing to {side}: {source}")]
    Write {
        /// Where to.
        side: Side,
        /// What went wrong.
        source: ProtocolError,
    },
    /// The hook refused a payload.
    #[error("the page hook failed on {message:?}: {source}")]
    Hook {
        /// The (narrowed) message whose pages it was given.
        message: Message,
        /// Its error.
        source: HookError,
    },
    /// Valid messages in an order CRIU 4.2.1 never sends.
    #[error("page-server conversation out of order at message {index} ({message:?}): {detail}")]
    Sequence {
        /// 0-based message number.
        index: u64,
        /// The message.
        message: Message,
        /// What is wrong.
        detail: String,
    },
    /// CRIU hung up without CLOSE: the dump failed or was killed.
    #[error("CRIU closed the connection without PS_IOV_CLOSE after {messages} messages (the dump failed or was killed)")]
    NoClose {
        /// Messages seen.
        messages: u64,
    },
    /// The page server reported failure at CLOSE.
    #[error("the page server answered PS_IOV_CLOSE with status {0}")]
    CloseStatus(i32),
    /// Setting socket options failed.
    #[error("setting up the proxy sockets: {0}")]
    Socket(io::Error),
}

/// Checks the order of a dump's messages.
#[derive(Default)]
struct Session {
    open: Option<DstId>,
    opened: HashSet<DstId>,
    /// Per image: start -> end of the ranges seen (adjacent ones merged).
    ranges: HashMap<DstId, BTreeMap<u64, u64>>,
    closed: bool,
    index: u64,
}

impl Session {
    fn check(&mut self, msg: &Message) -> Result<(), ProxyError> {
        let index = self.index;
        self.index += 1;
        let err = |detail: String| ProxyError::Sequence {
            index,
            message: *msg,
            detail,
        };
        if self.closed {
            return Err(err("a message after PS_IOV_CLOSE".into()));
        }
        match *msg {
            Message::Open { dst_id } | Message::Open2 { dst_id } => {
                if !self.opened.insert(dst_id) {
                    return Err(err(format!(
                        "{} opened a second time (the page server would overwrite it)",
                        dst_id.pagemap_image()
                    )));
                }
                self.open = Some(dst_id);
            }
            Message::Parent { .. } => {}
            Message::Add { dst_id, .. }
            | Message::AddPresent { dst_id, .. }
            | Message::Hole { dst_id, .. } => {
                if self.open != Some(dst_id) {
                    return Err(err(format!(
                        "pages for {dst_id} while {} is open",
                        self.open
                            .map_or_else(|| "no image".to_string(), |d| d.to_string())
                    )));
                }
                let (vaddr, nr_pages) = msg.range().unwrap_or_default();
                let end = vaddr + nr_pages * PAGE_SIZE as u64;
                let map = self.ranges.entry(dst_id).or_default();
                if let Some((&s, &e)) = map.range(..=vaddr).next_back() {
                    if e > vaddr {
                        return Err(err(format!(
                            "range {vaddr:#x}..{end:#x} overlaps {s:#x}..{e:#x} sent before"
                        )));
                    }
                }
                if let Some((&s, &e)) = map.range(vaddr..).next() {
                    if s < end {
                        return Err(err(format!(
                            "range {vaddr:#x}..{end:#x} overlaps {s:#x}..{e:#x} sent before"
                        )));
                    }
                }
                // Insert, merging with an adjacent predecessor and successor.
                let mut start = vaddr;
                let mut stop = end;
                if let Some((&s, &e)) = map.range(..=vaddr).next_back() {
                    if e == vaddr {
                        map.remove(&s);
                        start = s;
                    }
                }
                if let Some(e) = map.remove(&end) {
                    stop = e;
                }
                map.insert(start, stop);
            }
            Message::Get { .. } => {
                return Err(err(
                    "PS_IOV_GET comes from a lazy-pages daemon, never from a dump".into(),
                ));
            }
            Message::Close | Message::ForceClose => self.closed = true,
        }
        Ok(())
    }
}

/// Relays one dump: reads every message from `from_criu`, checks it, re-encodes it to
/// `to_page_server`, passes every page payload through `hook` on the way, and relays the
/// page server's replies back. Uses [`ProxyOptions::default`].
///
/// The hook is called with a message narrowed to the pages in the buffer (same command,
/// image and flags; `vaddr` and `nr_pages` of just those pages, at most
/// [`ProxyOptions::chunk_pages`]) and the buffer, `nr_pages * 4096` bytes, which it may
/// read or overwrite; what is in the buffer when it returns is what the page server gets.
///
/// Returns after CRIU sent CLOSE, got the page server's acknowledgement and closed its end.
/// Any error stops the relay; both sockets are then closed, which makes the dump and the page
/// server fail rather than produce incomplete images.
pub fn proxy(
    from_criu: TcpStream,
    to_page_server: TcpStream,
    hook: &mut Hook<'_>,
) -> Result<ProxyStats, ProxyError> {
    proxy_with(from_criu, to_page_server, &ProxyOptions::default(), hook)
}

/// A socket [`proxy_with`] can relay: TCP, or a UNIX stream socket (the other end of a
/// `criu dump --page-server --ps-socket FD`).
pub trait ProxySocket {
    /// Applies the idle timeout (and, for TCP, `TCP_NODELAY`).
    fn configure(&self, idle_timeout: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down.
    fn shut(&self);
}

impl ProxySocket for TcpStream {
    fn configure(&self, idle_timeout: Option<Duration>) -> io::Result<()> {
        self.set_nodelay(true)?;
        self.set_read_timeout(idle_timeout)?;
        self.set_write_timeout(idle_timeout)
    }

    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl ProxySocket for UnixStream {
    fn configure(&self, idle_timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(idle_timeout)?;
        self.set_write_timeout(idle_timeout)
    }

    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// [`proxy`] with options, over TCP or UNIX stream sockets.
pub fn proxy_with<A, B>(
    from_criu: A,
    to_page_server: B,
    opts: &ProxyOptions,
    hook: &mut Hook<'_>,
) -> Result<ProxyStats, ProxyError>
where
    A: ProxySocket,
    B: ProxySocket,
    for<'a> &'a A: Read + Write,
    for<'a> &'a B: Read + Write,
{
    from_criu
        .configure(opts.idle_timeout)
        .map_err(ProxyError::Socket)?;
    to_page_server
        .configure(opts.idle_timeout)
        .map_err(ProxyError::Socket)?;
    let result = proxy_io(
        &from_criu,
        &from_criu,
        &to_page_server,
        &to_page_server,
        opts,
        hook,
    );
    // The page server waits for EOF after CLOSE; on error, EOF makes it fail.
    to_page_server.shut();
    from_criu.shut();
    result
}

/// The relay over any byte streams: `criu_rx`/`criu_tx` are the two directions of the dump's
/// connection, `ps_rx`/`ps_tx` those of the page server's. See [`proxy`].
pub fn proxy_io<CR: Read, CW: Write, PR: Read, PW: Write>(
    criu_rx: CR,
    mut criu_tx: CW,
    mut ps_rx: PR,
    ps_tx: PW,
    opts: &ProxyOptions,
    hook: &mut Hook<'_>,
) -> Result<ProxyStats, ProxyError> {
    let chunk = opts.chunk_pages.clamp(1, super::MAX_PAYLOAD_PAGES);
    let mut criu_rx = BufReader::with_capacity(64 << 10, criu_rx);
    let mut ps_tx = BufWriter::with_capacity(64 << 10, ps_tx);
    let mut buf = Vec::new();
    let mut stats = ProxyStats::default();
    let mut session = Session::default();
    let mut started: Option<Instant> = None;

    let read_err = |side| move |source| ProxyError::Read { side, source };
    let write_err = |side| move |source| ProxyError::Write { side, source };

    loop {
        let Some(msg) = read_message(&mut criu_rx).map_err(read_err(Side::Criu))? else {
            // EOF from CRIU.
            let _ = ps_tx.flush();
            if !session.closed {
                return Err(ProxyError::NoClose {
                    messages: session.index,
                });
            }
            break;
        };
        started.get_or_insert_with(Instant::now);
        // After CLOSE, CRIU must hang up; the session refuses anything else.
        session.check(&msg)?;
        *stats.messages.entry(msg.command()).or_default() += 1;
        if stats.trace.len() < opts.trace_limit {
            stats.trace.push(msg);
        }
        if let Message::Open { dst_id } | Message::Open2 { dst_id } = msg {
            tracing::debug!(image = %dst_id.pagemap_image(), "page-server proxy: open");
            stats.images.push(dst_id);
        }
        if msg.payload_pages() == 0 {
            if let Some((_, n)) = msg.range() {
                stats.pages_without_payload += n;
            }
        }

        write_message(&mut ps_tx, &msg).map_err(write_err(Side::PageServer))?;
        stats.header_bytes += super::HEADER_LEN as u64;

        for piece in msg.payload_pieces(chunk) {
            let len = piece.payload_len() as usize;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let data = &mut buf[..len];
            read_payload(&mut criu_rx, data).map_err(read_err(Side::Criu))?;
            stats.hook_calls += 1;
            hook(&piece, data).map_err(|source| ProxyError::Hook {
                message: piece,
                source,
            })?;
            write_payload(&mut ps_tx, data).map_err(write_err(Side::PageServer))?;
            stats.payload_pages += piece.payload_pages();
            stats.payload_bytes += len as u64;
        }

        if msg.reply_kind().is_some() {
            ps_tx
                .flush()
                .map_err(|e| ProtocolError::io("a message header", e))
                .map_err(write_err(Side::PageServer))?;
            let reply = read_reply(&mut ps_rx, &msg).map_err(read_err(Side::PageServer))?;
            write_reply(&mut criu_tx, &msg, &reply).map_err(write_err(Side::Criu))?;
            criu_tx
                .flush()
                .map_err(|e| ProtocolError::io("a reply", e))
                .map_err(write_err(Side::Criu))?;
            stats.reply_bytes += super::reply_len(&msg).unwrap_or(0) as u64;
            if let Reply::Close { status } = reply {
                stats.close_status = Some(status);
            }
        }
    }
    stats.elapsed = started.map(|s| s.elapsed()).unwrap_or_default();
    match stats.close_status {
        Some(0) | None => Ok(stats),
        Some(status) => Err(ProxyError::CloseStatus(status)),
    }
}
