//! A deduplicating relay of CRIU's page-server stream across a network link.
//!
//! ```text
//! criu dump --page-server ──► relay_out ══ link (QUIC stream pair) ══► relay_in ──► criu page-server -D
//!          (source host)      known: HashSet<PageHash>           store: PageStore   (destination host)
//! ```
//!
//! [`relay_out`] reads CRIU's messages (decoded and validated by
//! [`criu_driver::page_server`]) and forwards each over the link. For every page of a payload it
//! computes the blake3 hash: a page whose hash is in `known` (the destination holds it, e.g.
//! from a pre-copy round) crosses as its 32-byte hash; any other page crosses as its contents
//! and its hash is added to `known`, since the destination keeps it from then on. [`relay_in`]
//! rebuilds every payload (from the link's contents, or from its [`PageStore`] for
//! references), re-encodes each message for a real `criu page-server` and sends the page
//! server's replies back; [`relay_out`] hands them to CRIU, which waits for them.
//!
//! # Link format
//!
//! Source to destination, a sequence of frames, each starting with a tag byte:
//!
//! ```text
//! 0x01 MSG   32-byte page-server header (struct page_server_iov, host byte order, exactly as
//!            CRIU sends it), then one record per payload page (Message::payload_pages(),
//!            0 for messages without contents):
//!              0x00 + 4096 bytes   the page's contents (CONTENT)
//!              0x01 + 32 bytes     blake3 of a page the destination holds (REFERENCE)
//! 0x02 END   CRIU closed its connection after CLOSE was answered; nothing follows
//! ```
//!
//! Destination to source, the page server's answers to OPEN2, PARENT, CLOSE and FORCE_CLOSE,
//! in order. The source answers OPEN2 (no parent image) itself, and with
//! [`Close::Pipelined`] CLOSE too, without waiting: it reads and checks those answers later
//! ([`PendingClose::confirm`]), so that CRIU's frozen dump never waits for a round trip.
//!
//! ```text
//! 0x81 REPLY the page server's reply bytes, exactly reply_len(request) of them (1 or 4)
//! 0x8f ERROR u16 big-endian length (1..=1024) + UTF-8 text: why the destination gave up
//! ```
//!
//! # Checks
//!
//! Both ends validate what they read from the link: unknown tags are refused; every header
//! goes through [`Message::decode`] (known command, flags, ranges, at most
//! [`MAX_PAYLOAD_PAGES`](criu_driver::page_server::MAX_PAYLOAD_PAGES) pages, which bounds every
//! count); replies through [`decode_reply`]; error texts are capped at
//! [`MAX_ERROR_LEN`] bytes. Nothing is allocated from a length read off the link: pages are
//! rebuilt and written to the page server [`CHUNK_PAGES`] at a time. A stream that ends
//! inside a frame, or without END, is truncated; END before CLOSE, anything after END, any
//! message after CLOSE and lazy-pages `GET` (never part of a dump) are refused. A REFERENCE to
//! a page the destination holds neither in its store nor from earlier in the same stream fails
//! with "page <hash> referenced but not held".
//!
//! Content pages are stored in the destination's [`PageStore`] (which computes their hash
//! itself) so that later references, in this stream or the next round, resolve. When the
//! store is full, they are kept for the rest of this stream only.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::io;
use std::time::{Duration, Instant};

use criu_driver::page_server::{
    decode_reply, read_message_async, read_payload_async, read_reply_async, reply_len,
    write_message_async, write_payload_async, write_reply_async, Command, Message, ProtocolError,
    ReplyKind, HEADER_LEN, PAGE_SIZE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use transfer::pages::{hash_page, PageHash, PageStore};

/// Tag of a message frame (source to destination).
pub const TAG_MSG: u8 = 0x01;
/// Tag of the end frame (source to destination).
pub const TAG_END: u8 = 0x02;
/// Page record: the contents follow.
pub const PAGE_CONTENT: u8 = 0x00;
/// Page record: a 32-byte blake3 hash follows.
pub const PAGE_REFERENCE: u8 = 0x01;
/// Tag of a reply frame (destination to source).
pub const TAG_REPLY: u8 = 0x81;
/// Tag of an error frame (destination to source).
pub const TAG_ERROR: u8 = 0x8f;
/// Longest error text in an ERROR frame.
pub const MAX_ERROR_LEN: usize = 1024;
/// Pages buffered at once on either side (1 MiB).
pub const CHUNK_PAGES: usize = 256;

const BUF: usize = 256 << 10;

/// What crossed a relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Page-server messages relayed.
    pub messages: u64,
    /// Payload pages relayed.
    pub pages: u64,
    /// Of those, pages that crossed the link as a 32-byte reference.
    pub pages_as_reference: u64,
    /// Bytes this side wrote to the link.
    pub link_bytes_written: u64,
    /// Bytes this side read from the link.
    pub link_bytes_read: u64,
    /// The page server's answer to CLOSE / FORCE_CLOSE.
    pub close_status: Option<i32>,
    /// Source side: messages CRIU waited on the destination's reply for (a round trip each).
    pub round_trips: u64,
    /// From the first message to the end.
    pub elapsed: Duration,
}

/// Most pages of one dump kept aside when the page store is full (256 MiB).
pub const MAX_OVERFLOW_PAGES: usize = 65_536;

/// Why a relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// CRIU's side of the conversation (source) failed or sent something invalid.
    #[error("relay: CRIU side: {0}")]
    Criu(#[source] ProtocolError),
    /// The page server's side (destination) failed or sent something invalid.
    #[error("relay: page-server side: {0}")]
    PageServer(#[source] ProtocolError),
    /// Reading or writing the link failed.
    #[error("relay link: {what}: {source}")]
    Link {
        /// What was being read or written.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The link ended in the middle of a frame or before the end frame.
    #[error("relay link truncated: it ended {what}")]
    Truncated {
        /// Where it ended.
        what: &'static str,
    },
    /// A tag byte that is not valid here.
    #[error("relay link: unknown tag {tag:#04x} {context}")]
    UnknownTag {
        /// The byte.
        tag: u8,
        /// Where it was read.
        context: &'static str,
    },
    /// A header or reply on the link that CRIU's protocol does not allow.
    #[error("relay link: invalid page-server data: {0}")]
    BadFrame(#[source] ProtocolError),
    /// Valid frames in an order that makes no sense.
    #[error("relay link: {0}")]
    Sequence(String),
    /// The page store was full and more of this dump's pages arrived than the relay keeps
    /// aside ([`MAX_OVERFLOW_PAGES`]).
    #[error("the page store is full and more than {pages} pages of this dump did not fit; raise page_store_mib in the destination's config")]
    Overflow {
        /// The cap that was reached.
        pages: usize,
    },
    /// A reference to a page the destination does not hold.
    #[error("page {hash} referenced but not held")]
    NotHeld {
        /// The hash, hex.
        hash: String,
    },
    /// A page-server command the relay does not carry.
    #[error("relay: {0} is not supported (lazy pages are not relayed)")]
    Unsupported(Command),
    /// CRIU hung up without CLOSE.
    #[error("relay: CRIU closed its connection without CLOSE (the dump failed?)")]
    NoClose,
    /// The destination reported a failure.
    #[error("relay: the destination failed: {0}")]
    Remote(String),
}

fn link_err(what: &'static str) -> impl FnOnce(io::Error) -> RelayError {
    move |source| RelayError::Link { what, source }
}

/// Reads exactly `buf.len()` bytes from the link; a stream that ends first is truncated.
async fn read_link<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), RelayError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(RelayError::Truncated { what }),
        Err(source) => Err(RelayError::Link { what, source }),
    }
}

/// Reads a tag byte; `None` at a clean end of stream.
async fn read_tag<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &'static str,
) -> Result<Option<u8>, RelayError> {
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b).await {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(RelayError::Link { what, source }),
        }
    }
}

/// Blake3 hashes of page contents already computed (by pre-copy rounds), found by the
/// contents' XXH3-128, which is about ten times cheaper to compute: the final dump, which reads
/// every page while the container is frozen, then computes blake3 only for pages whose content
/// the rounds never saw. A (non-malicious) XXH3-128 collision has a probability of about
/// 2^-128 per page; a container that forges one only chooses the content of its own page, and
/// the destination, which hashes whatever content it receives itself, refuses a reference to a
/// page it does not hold.
pub type FastHashes = HashMap<u128, PageHash, transfer::pages::PageHashBuilder>;

/// XXH3-128 of a page, the key of [`FastHashes`].
pub fn fast_key(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// How the source relay answers CRIU's CLOSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// CLOSE is forwarded and CRIU waits for the destination's answer.
    RoundTrip,
    /// CLOSE is answered here, with success, as soon as it is on the link, so that CRIU
    /// finishes its dump without waiting for the destination. The destination's answer is
    /// still owed: [`PendingClose::confirm`] reads and checks it, and the caller must not rely
    /// on the destination's copy (restore, commit) before it returns success or before the
    /// destination itself confirmed that its page server closed cleanly.
    Pipelined,
}

/// Source side: serves the socket `criu dump --page-server` writes into, sends its stream
/// over `link_tx` (deduplicated against `known`, the hashes the destination holds; blake3
/// hashes already computed are looked up in `fast`, see [`FastHashes`]) and hands the
/// destination's replies from `link_rx` back to CRIU. Returns once CRIU has closed its
/// connection after CLOSE; pages sent as contents are added to `known`. The answers the
/// destination still owes (OPEN2 answered here, and CLOSE with [`Close::Pipelined`]) are
/// checked by [`PendingClose::confirm`], which the caller must await.
pub async fn relay_out<C, W, R, S>(
    criu: C,
    link_tx: W,
    link_rx: R,
    known: &mut HashSet<PageHash, S>,
    fast: &FastHashes,
    close: Close,
) -> Result<(RelayStats, PendingClose<R>), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    S: BuildHasher,
{
    let local_close = close == Close::Pipelined;
    let mut criu = BufReader::with_capacity(BUF, criu);
    let mut tx = BufWriter::with_capacity(BUF, link_tx);
    let mut rx = link_rx;
    let mut stats = RelayStats::default();
    let mut start = None;
    let mut closed = false;
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    // OPEN2 requests answered here, whose replies from the destination are still to be read.
    let mut opened: Vec<Message> = Vec::new();
    // CLOSE, answered here (`local_close`).
    let mut local_closed: Option<Message> = None;
    loop {
        let Some(msg) = read_message_async(&mut criu)
            .await
            .map_err(RelayError::Criu)?
        else {
            if !closed {
                return Err(RelayError::NoClose);
            }
            tx.write_all(&[TAG_END])
                .await
                .map_err(link_err("writing END"))?;
            stats.link_bytes_written += 1;
            tx.flush().await.map_err(link_err("flushing"))?;
            tx.shutdown().await.map_err(link_err("shutting down"))?;
            stats.elapsed = start.map_or(Duration::ZERO, |s: Instant| s.elapsed());
            tracing::debug!(?stats, "relay_out done");
            return Ok((
                stats,
                PendingClose {
                    rx,
                    opened,
                    close: local_closed,
                },
            ));
        };
        start.get_or_insert_with(Instant::now);
        check_next(&msg, closed, "CRIU sent ")?;
        stats.messages += 1;
        let header = msg.encode().map_err(RelayError::Criu)?;
        tx.write_all(&[TAG_MSG])
            .await
            .map_err(link_err("writing a message"))?;
        tx.write_all(&header)
            .await
            .map_err(link_err("writing a message"))?;
        stats.link_bytes_written += 1 + HEADER_LEN as u64;

        let mut left = msg.payload_pages();
        while left > 0 {
            let n = left.min(CHUNK_PAGES as u64) as usize;
            let chunk = &mut buf[..n * PAGE_SIZE];
            read_payload_async(&mut criu, chunk)
                .await
                .map_err(RelayError::Criu)?;
            for page in chunk.chunks_exact(PAGE_SIZE) {
                let h = if fast.is_empty() {
                    hash_page(page)
                } else {
                    match fast.get(&fast_key(page)) {
                        Some(h) => *h,
                        None => hash_page(page),
                    }
                };
                if known.contains(&h) {
                    tx.write_all(&[PAGE_REFERENCE])
                        .await
                        .map_err(link_err("writing pages"))?;
                    tx.write_all(&h).await.map_err(link_err("writing pages"))?;
                    stats.link_bytes_written += 1 + h.len() as u64;
                    stats.pages_as_reference += 1;
                } else {
                    tx.write_all(&[PAGE_CONTENT])
                        .await
                        .map_err(link_err("writing pages"))?;
                    tx.write_all(page)
                        .await
                        .map_err(link_err("writing pages"))?;
                    stats.link_bytes_written += 1 + PAGE_SIZE as u64;
                    known.insert(h);
                }
            }
            stats.pages += n as u64;
            left -= n as u64;
        }

        if let Message::Open2 { .. } = msg {
            // CRIU waits for this reply before it sends the process's pages. The destination's
            // page server starts in an empty directory, so it has no parent image: answered
            // here at once (no round trip per process in the freeze), and checked against the
            // destination's own reply before anything else is answered.
            opened.push(msg);
            let no_parent = criu_driver::page_server::Reply::Open2 { has_parent: false };
            answer_criu(&mut criu, &msg, &no_parent).await?;
        } else if local_close && matches!(msg, Message::Close | Message::ForceClose) {
            // CRIU's dump is complete once CLOSE is on the link; the destination's answer is
            // read later (`PendingClose::confirm`).
            tx.flush().await.map_err(link_err("flushing"))?;
            closed = true;
            local_closed = Some(msg);
            let ok = criu_driver::page_server::Reply::Close { status: 0 };
            answer_criu(&mut criu, &msg, &ok).await?;
        } else if msg.reply_kind().is_some() {
            tx.flush().await.map_err(link_err("flushing"))?;
            stats.round_trips += 1;
            check_opened(&mut rx, std::mem::take(&mut opened), &mut stats).await?;
            let reply = read_reply_frame(&mut rx, &msg, &mut stats).await?;
            if let criu_driver::page_server::Reply::Close { status } = reply {
                stats.close_status = Some(status);
                closed = true;
            }
            answer_criu(&mut criu, &msg, &reply).await?;
        }
    }
}

/// The destination's answers a relay still has to read and check (see [`relay_out`]).
#[derive(Debug)]
pub struct PendingClose<R> {
    rx: R,
    /// OPEN2 requests answered at the source, in order.
    opened: Vec<Message>,
    /// CLOSE (or FORCE_CLOSE, which CRIU sends on a socket it was given), if it was answered
    /// at the source.
    close: Option<Message>,
}

impl<R: AsyncRead + Unpin> PendingClose<R> {
    /// Reads the destination's owed answers: every OPEN2 must say "no parent image", and
    /// CLOSE's status must be 0 (recorded in `stats.close_status`).
    pub async fn confirm(mut self, stats: &mut RelayStats) -> Result<(), RelayError> {
        check_opened(&mut self.rx, std::mem::take(&mut self.opened), stats).await?;
        if let Some(close) = self.close {
            match read_reply_frame(&mut self.rx, &close, stats).await? {
                criu_driver::page_server::Reply::Close { status: 0 } => {
                    stats.close_status = Some(0)
                }
                criu_driver::page_server::Reply::Close { status } => {
                    stats.close_status = Some(status);
                    return Err(RelayError::Remote(format!(
                        "the destination's page server closed with status {status}: the dump's pages were not written"
                    )));
                }
                other => {
                    return Err(RelayError::Sequence(format!(
                        "the destination answered {other:?} to CLOSE"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Reads the destination's replies to `opened` (OPEN2 requests answered at the source without
/// a parent image) and refuses any other answer.
async fn check_opened<R: AsyncRead + Unpin>(
    rx: &mut R,
    opened: Vec<Message>,
    stats: &mut RelayStats,
) -> Result<(), RelayError> {
    for open in opened {
        let reply = read_reply_frame(rx, &open, stats).await?;
        if reply != (criu_driver::page_server::Reply::Open2 { has_parent: false }) {
            return Err(RelayError::Sequence(format!(
                "the destination's page server answered {reply:?} to {open:?}, which was answered here without a parent image"
            )));
        }
    }
    Ok(())
}

/// Hands `reply` to `msg` on to CRIU, at once.
async fn answer_criu<C: AsyncWrite + Unpin>(
    criu: &mut C,
    msg: &Message,
    reply: &criu_driver::page_server::Reply,
) -> Result<(), RelayError> {
    write_reply_async(criu, msg, reply)
        .await
        .map_err(RelayError::Criu)?;
    criu.flush().await.map_err(|e| {
        RelayError::Criu(ProtocolError::Io {
            what: "a reply",
            source: e,
        })
    })
}

/// Reads the destination's REPLY (or ERROR) frame for `msg`.
async fn read_reply_frame<R: AsyncRead + Unpin>(
    rx: &mut R,
    msg: &Message,
    stats: &mut RelayStats,
) -> Result<criu_driver::page_server::Reply, RelayError> {
    let tag = read_tag(rx, "reading a reply")
        .await?
        .ok_or(RelayError::Truncated {
            what: "where a reply was due",
        })?;
    stats.link_bytes_read += 1;
    match tag {
        TAG_REPLY => {
            let len = reply_len(msg).map_err(RelayError::BadFrame)?;
            let mut b = [0u8; HEADER_LEN];
            read_link(rx, &mut b[..len], "inside a reply").await?;
            stats.link_bytes_read += len as u64;
            decode_reply(msg, &b[..len]).map_err(RelayError::BadFrame)
        }
        TAG_ERROR => {
            let mut l = [0u8; 2];
            read_link(rx, &mut l, "inside an error frame").await?;
            let len = usize::from(u16::from_be_bytes(l));
            if len == 0 || len > MAX_ERROR_LEN {
                return Err(RelayError::Sequence(format!(
                    "error frame of {len} bytes (1..={MAX_ERROR_LEN} allowed)"
                )));
            }
            let mut text = vec![0u8; len];
            read_link(rx, &mut text, "inside an error frame").await?;
            stats.link_bytes_read += 2 + len as u64;
            Err(RelayError::Remote(
                String::from_utf8_lossy(&text).into_owned(),
            ))
        }
        tag => Err(RelayError::UnknownTag {
            tag,
            context: "where a reply was due",
        }),
    }
}

/// Destination side: reads the stream [`relay_out`] sends from `link_rx`, rebuilds every
/// payload (references from `store`, contents as received, which are added to `store`),
/// writes it to `page_server` (connected to a real `criu page-server`) and sends its replies
/// over `link_tx`. Returns after the END frame, once the page server's connection is shut
/// down for writing (which lets `criu page-server` exit). On failure it tries to tell the
/// source with an ERROR frame.
pub async fn relay_in<R, W, P>(
    link_rx: R,
    link_tx: W,
    page_server: P,
    store: &mut PageStore,
) -> Result<RelayStats, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut tx = link_tx;
    let mut stats = RelayStats::default();
    let result = relay_in_inner(link_rx, &mut tx, page_server, store, &mut stats).await;
    match result {
        Ok(()) => {
            tracing::debug!(?stats, "relay_in done");
            Ok(stats)
        }
        Err(e) => {
            let text = e.to_string();
            let mut cut = text.len().min(MAX_ERROR_LEN);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            let mut frame = vec![TAG_ERROR];
            frame.extend_from_slice(&(cut as u16).to_be_bytes());
            frame.extend_from_slice(&text.as_bytes()[..cut]);
            // Best effort: the link may be gone or full.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                tx.write_all(&frame).await?;
                tx.flush().await
            })
            .await;
            Err(e)
        }
    }
}

async fn relay_in_inner<R, W, P>(
    link_rx: R,
    tx: &mut W,
    page_server: P,
    store: &mut PageStore,
    stats: &mut RelayStats,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let mut rx = BufReader::with_capacity(BUF, link_rx);
    let mut ps = BufWriter::with_capacity(BUF, page_server);
    let mut closed = false;
    let mut start = None;
    // Pages received in this stream that the (full) store could not take.
    let mut overflow: HashMap<PageHash, Box<[u8]>> = HashMap::new();
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    loop {
        let tag = read_tag(&mut rx, "reading a frame")
            .await?
            .ok_or(RelayError::Truncated {
                what: "before the END frame",
            })?;
        start.get_or_insert_with(Instant::now);
        stats.link_bytes_read += 1;
        match tag {
            TAG_END => {
                if !closed {
                    return Err(RelayError::Sequence(
                        "END before CLOSE: the dump did not finish".into(),
                    ));
                }
                // Nothing follows END: the source shuts the stream down right after it.
                if let Some(tag) = read_tag(&mut rx, "after the END frame").await? {
                    return Err(RelayError::Sequence(format!(
                        "data after the END frame (a byte {tag:#04x})"
                    )));
                }
                ps.flush().await.map_err(|e| ps_io("flushing", e))?;
                ps.shutdown().await.map_err(|e| ps_io("shutting down", e))?;
                stats.elapsed = start.map_or(Duration::ZERO, |s: Instant| s.elapsed());
                return Ok(());
            }
            TAG_MSG => {}
            tag => {
                return Err(RelayError::UnknownTag {
                    tag,
                    context: "where a frame was due",
                })
            }
        }
        let mut header = [0u8; HEADER_LEN];
        read_link(&mut rx, &mut header, "inside a message header").await?;
        stats.link_bytes_read += HEADER_LEN as u64;
        let msg = Message::decode(&header).map_err(RelayError::BadFrame)?;
        check_next(&msg, closed, "")?;
        stats.messages += 1;
        write_message_async(&mut ps, &msg)
            .await
            .map_err(RelayError::PageServer)?;

        let mut left = msg.payload_pages();
        while left > 0 {
            let n = left.min(CHUNK_PAGES as u64) as usize;
            for page in buf[..n * PAGE_SIZE].chunks_exact_mut(PAGE_SIZE) {
                let kind = read_tag(&mut rx, "reading a page record").await?.ok_or(
                    RelayError::Truncated {
                        what: "where a page record was due",
                    },
                )?;
                match kind {
                    PAGE_CONTENT => {
                        read_link(&mut rx, page, "inside a page").await?;
                        stats.link_bytes_read += 1 + PAGE_SIZE as u64;
                        if store.insert(page).is_err() {
                            if overflow.len() >= MAX_OVERFLOW_PAGES {
                                return Err(RelayError::Overflow {
                                    pages: MAX_OVERFLOW_PAGES,
                                });
                            }
                            overflow.insert(hash_page(page), (&*page).into());
                        }
                    }
                    PAGE_REFERENCE => {
                        let mut h = [0u8; 32];
                        read_link(&mut rx, &mut h, "inside a page reference").await?;
                        stats.link_bytes_read += 1 + h.len() as u64;
                        let held = store
                            .get(&h)
                            .or_else(|| overflow.get(&h).map(|p| &p[..]))
                            .ok_or_else(|| RelayError::NotHeld {
                                hash: hex::encode(h),
                            })?;
                        page.copy_from_slice(held);
                        stats.pages_as_reference += 1;
                    }
                    tag => {
                        return Err(RelayError::UnknownTag {
                            tag,
                            context: "where a page record was due",
                        })
                    }
                }
            }
            write_payload_async(&mut ps, &buf[..n * PAGE_SIZE])
                .await
                .map_err(RelayError::PageServer)?;
            stats.pages += n as u64;
            left -= n as u64;
        }

        if let Some(kind) = msg.reply_kind() {
            ps.flush().await.map_err(|e| ps_io("flushing", e))?;
            let reply = read_reply_async(&mut ps, &msg)
                .await
                .map_err(RelayError::PageServer)?;
            if let criu_driver::page_server::Reply::Close { status } = reply {
                stats.close_status = Some(status);
                closed = true;
            }
            debug_assert!(kind != ReplyKind::Pages);
            let (b, len) = reply.encode().map_err(RelayError::PageServer)?;
            tx.write_all(&[TAG_REPLY])
                .await
                .map_err(link_err("writing a reply"))?;
            tx.write_all(&b[..len])
                .await
                .map_err(link_err("writing a reply"))?;
            tx.flush().await.map_err(link_err("writing a reply"))?;
            stats.link_bytes_written += 1 + len as u64;
        }
    }
}

/// Refuses a message after CLOSE (`who` names the sender in the error) and lazy-pages `GET`,
/// which is never part of a dump.
fn check_next(msg: &Message, closed: bool, who: &str) -> Result<(), RelayError> {
    if closed {
        return Err(RelayError::Sequence(format!(
            "{who}{} after CLOSE",
            msg.command()
        )));
    }
    if msg.command() == Command::Get {
        return Err(RelayError::Unsupported(Command::Get));
    }
    Ok(())
}

fn ps_io(what: &'static str, source: io::Error) -> RelayError {
    RelayError::PageServer(ProtocolError::Io { what, source })
}

#[cfg(test)]
mod tests;
