//! CRIU's page-server protocol (CRIU 4.2.1), spoken by Ferry itself.
//!
//! `criu dump --page-server --address A --port P` does not write `pages-*.img` and
//! `pagemap-*.img`: it connects to a page server over TCP and streams every memory page of the
//! frozen tree to it. `criu page-server -D DIR` is CRIU's own receiver, which writes those two
//! kinds of image (everything else the dump writes to its own `-D`). Ferry sits between the two:
//! it parses every message ([`read_message`]), may look at or replace every page
//! ([`proxy`]'s hook), and re-encodes the stream ([`write_message`]) towards a real
//! `criu page-server` on the destination, whose images `criu restore` reads.
//!
//! # Wire format
//!
//! Everything is in the host's byte order and C layout (CRIU `send()`s the struct as it is in
//! memory; both ends must be the same architecture, which a migration needs anyway). The only
//! message type is `struct page_server_iov` (`criu/page-xfer.c`):
//!
//! ```text
//! offset size field
//!      0    4 u32 cmd       low 16 bits (PS_CMD_BITS): command; high 16 bits: PE_* flags (ADD_F only)
//!      4    4 (padding)     u64 alignment after the u32; zero in every captured header; ignored on read, zero on write
//!      8    8 u64 nr_pages
//!     16    8 u64 vaddr     page-aligned; for shmem images the offset inside the segment
//!     24    8 u64 dst_id    (id << 8) | type, type 1 = PS_TYPE_PID (pagemap-ID.img), 2 = PS_TYPE_SHMEM (pagemap-shmem-ID.img)
//!                     sizeof = 32 (HEADER_LEN)
//! ```
//!
//! | command | code | payload after the header | reply from the page server |
//! |---|---|---|---|
//! | `PS_IOV_ADD` (legacy) | 1 | `nr_pages * 4096` bytes | none (flags = PE_PRESENT) |
//! | `PS_IOV_HOLE` (legacy) | 2 | none | none (flags = PE_PARENT) |
//! | `PS_IOV_OPEN` (legacy) | 3 | none | none |
//! | `PS_IOV_OPEN2` | 4 | none | 1 byte (`char has_parent`, 0 or 1) |
//! | `PS_IOV_PARENT` | 5 | none | 4 bytes (`int has_parent`, 0 or 1) |
//! | `PS_IOV_ADD_F` | 6, flags `<< 16` | `nr_pages * 4096` bytes iff `PE_PRESENT` is set | none |
//! | `PS_IOV_GET` (lazy pages) | 7 | none | a header (`ADD_F` with `PE_PRESENT`, `dst_id` = plain pid, `nr_pages` <= asked) and its pages; the server closes the connection instead when it has none |
//! | `PS_IOV_CLOSE` | 0x1023 | none | 4 bytes (`int32 status`, always 0), sent after everything before it is written |
//! | `PS_IOV_FORCE_CLOSE` | 0x1024 | none | same as CLOSE (used with `--ps-socket`) |
//!
//! Page flags (`criu/include/pagemap.h`): `PE_PARENT = 1` (the pages are in the parent
//! snapshot), `PE_LAZY = 2` (may be restored lazily), `PE_PRESENT = 4` (the pages follow and go
//! into `pages-*.img`). CRIU 4.2.1 sends the combinations `PRESENT`, `PRESENT|LAZY`, `LAZY`
//! (only with `--lazy-pages`, no payload) and `PARENT` (holes, only on top of a pre-dump);
//! [`PageFlags::new`] refuses any other.
//!
//! # A real dump, as observed through [`proxy`]
//!
//! Captured with CRIU 4.2.1 on kernel 6.18 (x86-64) for one process with a 64 MiB heap and a
//! 1 MiB memfd (`tests/page_server_criu.rs`, which prints the sequence with `--nocapture`):
//!
//! ```text
//! OPEN2(shmem:3475) ADD_F[PRESENT]x256                       the memfd, while CRIU dumps files
//! OPEN2(pid:4949)   ADD_F[PRESENT]x1 ADD_F[PRESENT]x7         the process's private memory,
//!                   ADD_F[LAZY|PRESENT]x3 ... x252 x256 x256 ... (64 x 256 for the heap)
//!                   ... ADD_F[PRESENT]x2 ADD_F[LAZY|PRESENT]x4
//! CLOSE                                                      after all other images
//! = 2 OPEN2 + 80 ADD_F + 1 CLOSE; 16680 pages; 2656 bytes of headers, 6 of replies
//! ```
//!
//! 1. The dump connects before it freezes the tree and corks its socket (`TCP_CORK`); nothing
//!    is sent until the first pagemap.
//! 2. Each image starts with `OPEN2`; `dst_id` is `pid << 8 | 1` for a process (the pid in
//!    the tree's namespace) and `shmid << 8 | 2` for shared memory, SysV shm and memfd
//!    contents (the memfd came first: CRIU dumps file contents before the memory). The page
//!    server opens `pagemap-*.img` plus a `pages-N.img` (its N counts from 0x10001, so that it
//!    never collides with the ids of a dump writing to the same directory, which is how one
//!    `-D` serves both) and answers one byte, 0 (no parent), which CRIU reads before going on.
//! 3. `ADD_F` messages follow, each with its pages right after the header: `PE_PRESENT` (0x4)
//!    for pages CRIU would not restore lazily (file-backed private mappings and the like),
//!    `PE_PRESENT | PE_LAZY` (0x6) for anonymous private memory. A message never holds more
//!    than one of CRIU's page-pipe chunks: 256 pages (1 MiB) at most were seen. Addresses
//!    rise within an image; for shmem, `vaddr` is the offset in the segment.
//! 4. `CLOSE` (all other fields zero) comes at the very end (`cr_dump_finish`), after every
//!    other image is written and while the tree is still frozen. The page server answers
//!    `int32 0` once it has written everything, CRIU closes the socket, and the page server
//!    waits for that EOF before it exits 0 (`criu page-server` without `--daemon` serves
//!    exactly one connection). A page server that sees EOF without CLOSE fails ("The data
//!    were not flushed"); this module's [`proxy`] reports it as [`ProxyError::NoClose`].
//!
//! **The CLOSE stall.** CRIU only un-corks its socket when it sets `TCP_NODELAY` after
//! `OPEN2`/`PARENT`; the 32-byte `CLOSE` is not pushed and sits in CRIU's socket until the
//! kernel's 200 ms cork timer fires. Measured: the dump waited 190-220 ms for the CLOSE
//! reply, 367 ms for the whole dump through the proxy against 90 ms for a dump to local
//! disk; it is the same without the proxy (333 ms dumping straight into `criu page-server`).
//! With `criu dump --page-server --ps-socket FD` on one end of a UNIX socket pair (the
//! setsockopt calls fail with a harmless warning) the reply came after 0.3 ms and the dump
//! took 106 ms. With `--ps-socket` the dump ends with `FORCE_CLOSE` instead of `CLOSE`
//! (answered the same way). Through CRIU's RPC (`criu swrk`, which runc uses) the same is
//! `criu_page_server_info.fd`.
//!
//! # What this module checks
//!
//! Every header read is validated before anything is forwarded: the command must be known;
//! flags only on `ADD_F` and only in the combinations above; fields a command does not use
//! must be zero; `vaddr` page-aligned and the range inside a 57-bit address space; the
//! `dst_id` type must be 1 or 2 (the legacy numbers of CRIU < 3.3 are refused) and a pid must
//! fit an `i32`; messages that carry pages carry between 1 and [`MAX_PAYLOAD_PAGES`]. Replies
//! are checked too (a `has_parent` byte that is not 0 or 1 is an error). [`proxy`] adds the
//! checks that need the conversation: pages only for the image that is open, no image opened
//! twice, no overlapping ranges in one image, nothing after CLOSE, and CLOSE before EOF.

use std::fmt;
use std::io;

#[cfg(feature = "async")]
mod asynch;
mod blocking;
mod message;
mod proxy;
mod reply;

#[cfg(feature = "async")]
pub use asynch::{
    read_message_async, read_payload_async, read_reply_async, write_message_async,
    write_payload_async, write_reply_async,
};
pub use blocking::{
    read_message, read_payload, read_reply, write_message, write_payload, write_reply,
};
pub use message::Message;
pub use proxy::{
    proxy, proxy_io, proxy_with, Hook, HookError, ProxyError, ProxyOptions, ProxySocket,
    ProxyStats, Side,
};
pub use reply::{check_reply, decode_reply, reply_len, Reply, ReplyKind};

/// Size of a page as CRIU transfers it (x86-64, and the 4 KiB-page arm64 builds).
pub const PAGE_SIZE: usize = 4096;

/// `sizeof(struct page_server_iov)`: u32 + 4 bytes padding + 3 * u64.
pub const HEADER_LEN: usize = 32;

/// The most pages one message may carry as payload (4 GiB). CRIU's page pipes hold far less
/// per message; the cap keeps a corrupt header from making a reader wait for terabytes.
pub const MAX_PAYLOAD_PAGES: u64 = 1 << 20;

/// Ranges must end at or below this (57-bit virtual addresses, the largest any Linux
/// architecture gives user space).
pub const ADDRESS_LIMIT: u64 = 1 << 57;

/// `PS_CMD_BITS`: the command is in the low 16 bits of `cmd`, flags above.
pub const PS_CMD_BITS: u32 = 16;
const PS_CMD_MASK: u32 = (1 << PS_CMD_BITS) - 1;
/// `PS_TYPE_BITS`: the image type is in the low 8 bits of `dst_id`, the id above.
pub const PS_TYPE_BITS: u32 = 8;
const PS_TYPE_MASK: u64 = (1 << PS_TYPE_BITS) - 1;
/// `PS_TYPE_PID`: a process's `pagemap-PID.img`.
pub const PS_TYPE_PID: u8 = 1;
/// `PS_TYPE_SHMEM`: a shared-memory segment's `pagemap-shmem-SHMID.img`.
pub const PS_TYPE_SHMEM: u8 = 2;

/// A page-server command code (the low 16 bits of `cmd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Command {
    /// `PS_IOV_ADD`: present pages follow (legacy, CRIU sends ADD_F).
    Add = 1,
    /// `PS_IOV_HOLE`: pages are in the parent image (legacy).
    Hole = 2,
    /// `PS_IOV_OPEN`: open an image without asking about its parent (legacy).
    Open = 3,
    /// `PS_IOV_OPEN2`: open an image; the server answers whether it has a parent.
    Open2 = 4,
    /// `PS_IOV_PARENT`: does the server have a parent image for this id?
    Parent = 5,
    /// `PS_IOV_ADD_F`: a pagemap entry with flags; pages follow if `PE_PRESENT`.
    AddF = 6,
    /// `PS_IOV_GET`: lazy-pages daemon asks the dump side for pages.
    Get = 7,
    /// `PS_IOV_CLOSE`: the end; the server acknowledges once everything is written.
    Close = 0x1023,
    /// `PS_IOV_FORCE_CLOSE`: the end, when the socket was handed in with `--ps-socket`.
    ForceClose = 0x1024,
}

impl Command {
    /// All commands, in code order.
    pub const ALL: [Command; 9] = [
        Command::Add,
        Command::Hole,
        Command::Open,
        Command::Open2,
        Command::Parent,
        Command::AddF,
        Command::Get,
        Command::Close,
        Command::ForceClose,
    ];

    /// The command with this code.
    pub fn from_code(code: u32) -> Option<Command> {
        Command::ALL.into_iter().find(|c| *c as u32 == code)
    }

    /// The numeric code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// CRIU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "PS_IOV_ADD",
            Command::Hole => "PS_IOV_HOLE",
            Command::Open => "PS_IOV_OPEN",
            Command::Open2 => "PS_IOV_OPEN2",
            Command::Parent => "PS_IOV_PARENT",
            Command::AddF => "PS_IOV_ADD_F",
            Command::Get => "PS_IOV_GET",
            Command::Close => "PS_IOV_CLOSE",
            Command::ForceClose => "PS_IOV_FORCE_CLOSE",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `PE_*` flags of a pagemap entry, as carried in the high bits of `PS_IOV_ADD_F`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageFlags(u32);

impl PageFlags {
    /// `PE_PARENT`: the pages are in the parent snapshot (a hole here).
    pub const PARENT: PageFlags = PageFlags(1);
    /// `PE_LAZY`: the pages may be restored lazily.
    pub const LAZY: PageFlags = PageFlags(2);
    /// `PE_PRESENT`: the pages are in this snapshot; their contents follow the header.
    pub const PRESENT: PageFlags = PageFlags(4);
    /// `PE_PRESENT | PE_LAZY`: what CRIU sends for anonymous private memory.
    pub const PRESENT_LAZY: PageFlags = PageFlags(6);

    /// Checks a flag word: only the combinations CRIU 4.2.1 produces are accepted
    /// (`PRESENT`, `PRESENT|LAZY`, `LAZY`, `PARENT`).
    pub fn new(bits: u32) -> Result<PageFlags, ProtocolError> {
        match bits {
            1 | 2 | 4 | 6 => Ok(PageFlags(bits)),
            _ if bits & !7 != 0 => Err(ProtocolError::UnknownFlags { flags: bits }),
            _ => Err(ProtocolError::BadFlagCombination { flags: bits }),
        }
    }

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether all of `other`'s bits are set.
    pub fn contains(self, other: PageFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether page contents follow the header.
    pub fn has_payload(self) -> bool {
        self.contains(PageFlags::PRESENT)
    }
}

impl fmt::Debug for PageFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        for (flag, name) in [
            (PageFlags::PARENT, "PARENT"),
            (PageFlags::LAZY, "LAZY"),
            (PageFlags::PRESENT, "PRESENT"),
        ] {
            if self.contains(flag) {
                names.push(name);
            }
        }
        write!(f, "{}", names.join("|"))
    }
}

/// Which kind of pagemap image a [`DstId`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ImageKind {
    /// `pagemap-PID.img`, a process's private memory (`PS_TYPE_PID`).
    Pid,
    /// `pagemap-shmem-SHMID.img`, a shared segment or memfd (`PS_TYPE_SHMEM`).
    Shmem,
}

/// The `dst_id` of a message: which pagemap image it is about, `(id << 8) | type`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DstId(u64);

impl DstId {
    /// The image of process `pid` (its pid inside the dumped tree's namespace).
    pub fn pid(pid: u32) -> Result<DstId, ProtocolError> {
        DstId::from_raw((u64::from(pid) << PS_TYPE_BITS) | u64::from(PS_TYPE_PID))
    }

    /// The image of shared segment `shmid`.
    pub fn shmem(shmid: u64) -> Result<DstId, ProtocolError> {
        if shmid >> (64 - PS_TYPE_BITS) != 0 {
            return Err(ProtocolError::BadDstId {
                dst_id: shmid,
                reason: "shmem id does not fit in 56 bits",
            });
        }
        DstId::from_raw((shmid << PS_TYPE_BITS) | u64::from(PS_TYPE_SHMEM))
    }

    /// Checks a raw `dst_id` from the wire.
    pub fn from_raw(raw: u64) -> Result<DstId, ProtocolError> {
        let id = raw >> PS_TYPE_BITS;
        match (raw & PS_TYPE_MASK) as u8 {
            PS_TYPE_PID if id == 0 || id > i32::MAX as u64 => Err(ProtocolError::BadDstId {
                dst_id: raw,
                reason: "pid out of range",
            }),
            PS_TYPE_PID | PS_TYPE_SHMEM => Ok(DstId(raw)),
            _ => Err(ProtocolError::BadDstId {
                dst_id: raw,
                reason: "image type is neither 1 (pid) nor 2 (shmem); legacy type numbers of CRIU < 3.3 are not accepted",
            }),
        }
    }

    /// The raw value.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// Which kind of image.
    pub fn kind(self) -> ImageKind {
        if (self.0 & PS_TYPE_MASK) as u8 == PS_TYPE_PID {
            ImageKind::Pid
        } else {
            ImageKind::Shmem
        }
    }

    /// The pid or shmid.
    pub fn id(self) -> u64 {
        self.0 >> PS_TYPE_BITS
    }

    /// The pagemap image the page server writes for it.
    pub fn pagemap_image(self) -> String {
        match self.kind() {
            ImageKind::Pid => format!("pagemap-{}.img", self.id()),
            ImageKind::Shmem => format!("pagemap-shmem-{}.img", self.id()),
        }
    }
}

impl fmt::Debug for DstId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            ImageKind::Pid => write!(f, "pid:{}", self.id()),
            ImageKind::Shmem => write!(f, "shmem:{}", self.id()),
        }
    }
}

impl fmt::Display for DstId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a message, reply or payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing failed.
    #[error("page-server socket: {what}: {source}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Nothing arrived within the socket's read timeout.
    #[error("page-server socket: timed out on {what} (the peer is stuck or gone)")]
    TimedOut {
        /// What was being read or written.
        what: &'static str,
    },
    /// The stream ended in the middle of something.
    #[error(
        "page-server stream truncated: it ended after {got} of the {expected} bytes of {what}"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes that arrived.
        got: u64,
        /// Bytes that were due.
        expected: u64,
    },
    /// The stream ended where a reply was due.
    #[error("the page server closed the connection instead of answering {command}")]
    NoReply {
        /// The request.
        command: Command,
    },
    /// The command code is none of CRIU's.
    #[error("unknown page-server command {code:#x} (cmd word {raw:#x})")]
    UnknownCommand {
        /// The low 16 bits.
        code: u32,
        /// The whole `cmd` word.
        raw: u32,
    },
    /// Flags on a command other than `PS_IOV_ADD_F`.
    #[error("{command} carries flags {flags:#x}; only PS_IOV_ADD_F may")]
    UnexpectedFlags {
        /// The command.
        command: Command,
        /// The high 16 bits of `cmd`.
        flags: u32,
    },
    /// Flag bits CRIU does not define.
    #[error("PS_IOV_ADD_F carries unknown page flags {flags:#x} (known: PE_PARENT 1, PE_LAZY 2, PE_PRESENT 4)")]
    UnknownFlags {
        /// The flags.
        flags: u32,
    },
    /// Known flags in a combination CRIU never sends.
    #[error("PS_IOV_ADD_F flags {flags:#x} are not a combination CRIU sends (PRESENT, PRESENT|LAZY, LAZY, PARENT)")]
    BadFlagCombination {
        /// The flags.
        flags: u32,
    },
    /// A field the command does not use is not zero.
    #[error("{command}: field {field} must be 0 but is {value:#x}")]
    NonZeroField {
        /// The command.
        command: Command,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A page range with no pages.
    #[error("{command}: nr_pages is 0")]
    NoPages {
        /// The command.
        command: Command,
    },
    /// Too many pages of payload in one message.
    #[error("{command}: {nr_pages} pages of payload in one message, more than the limit of {max}")]
    TooManyPages {
        /// The command.
        command: Command,
        /// Pages announced.
        nr_pages: u64,
        /// The limit ([`MAX_PAYLOAD_PAGES`]).
        max: u64,
    },
    /// `vaddr` not a multiple of the page size.
    #[error("{command}: vaddr {vaddr:#x} is not page-aligned")]
    Unaligned {
        /// The command.
        command: Command,
        /// The address.
        vaddr: u64,
    },
    /// The range leaves the address space.
    #[error("{command}: {nr_pages} pages at {vaddr:#x} reach beyond {limit:#x}")]
    OutOfRange {
        /// The command.
        command: Command,
        /// The address.
        vaddr: u64,
        /// The pages.
        nr_pages: u64,
        /// [`ADDRESS_LIMIT`].
        limit: u64,
    },
    /// A `dst_id` that names no image.
    #[error("bad dst_id {dst_id:#x}: {reason}")]
    BadDstId {
        /// The raw value.
        dst_id: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A reply that is not what the protocol allows.
    #[error("bad reply to {command}: {detail}")]
    BadReply {
        /// The request.
        command: Command,
        /// What is wrong.
        detail: String,
    },
    /// The request has no reply, or a reply of another kind was given.
    #[error("{command} is not answered with {kind:?}")]
    ReplyMismatch {
        /// The request.
        command: Command,
        /// The reply kind offered.
        kind: Option<ReplyKind>,
    },
    /// A payload buffer that is not a whole number of pages.
    #[error("payload buffer of {len} bytes is not a whole number of pages")]
    PartialPage {
        /// Its length.
        len: usize,
    },
}

impl ProtocolError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> ProtocolError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtocolError::TimedOut { what },
            _ => ProtocolError::Io { what, source },
        }
    }
}

fn raw_header(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&cmd.to_ne_bytes());
    // b[4..8]: padding, zero.
    b[8..16].copy_from_slice(&nr_pages.to_ne_bytes());
    b[16..24].copy_from_slice(&vaddr.to_ne_bytes());
    b[24..32].copy_from_slice(&dst_id.to_ne_bytes());
    b
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

/// The fields of a header, unvalidated.
struct RawHeader {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl RawHeader {
    fn parse(b: &[u8; HEADER_LEN]) -> RawHeader {
        RawHeader {
            cmd: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(b, 8),
            vaddr: u64_at(b, 16),
            dst_id: u64_at(b, 24),
        }
    }

    fn zero(&self, command: Command, fields: &[&'static str]) -> Result<(), ProtocolError> {
        for &field in fields {
            let value = match field {
                "nr_pages" => self.nr_pages,
                "vaddr" => self.vaddr,
                _ => self.dst_id,
            };
            if value != 0 {
                return Err(ProtocolError::NonZeroField {
                    command,
                    field,
                    value,
                });
            }
        }
        Ok(())
    }
}

fn check_range(
    command: Command,
    vaddr: u64,
    nr_pages: u64,
    payload: bool,
) -> Result<(), ProtocolError> {
    if nr_pages == 0 {
        return Err(ProtocolError::NoPages { command });
    }
    if payload && nr_pages > MAX_PAYLOAD_PAGES {
        return Err(ProtocolError::TooManyPages {
            command,
            nr_pages,
            max: MAX_PAYLOAD_PAGES,
        });
    }
    if !vaddr.is_multiple_of(PAGE_SIZE as u64) {
        return Err(ProtocolError::Unaligned { command, vaddr });
    }
    let end = nr_pages
        .checked_mul(PAGE_SIZE as u64)
        .and_then(|len| vaddr.checked_add(len));
    match end {
        Some(end) if end <= ADDRESS_LIMIT => Ok(()),
        _ => Err(ProtocolError::OutOfRange {
            command,
            vaddr,
            nr_pages,
            limit: ADDRESS_LIMIT,
        }),
    }
}

fn check_pid(pid: u64, command: Command) -> Result<u32, ProtocolError> {
    if pid == 0 || pid > i32::MAX as u64 {
        return Err(ProtocolError::BadDstId {
            dst_id: pid,
            reason: match command {
                Command::Get => "PS_IOV_GET carries a plain pid, and this is none",
                _ => "pid out of range",
            },
        });
    }
    Ok(pid as u32)
}

#[cfg(test)]
mod tests;
