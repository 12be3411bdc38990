//! The page server's answers: their kinds, their wire bytes, and the check that an answer fits
//! its request.

use super::{
    check_pid, check_range, raw_header, Command, Message, PageFlags, ProtocolError, RawHeader,
    HEADER_LEN, PAGE_SIZE, PS_CMD_BITS,
};

/// What the page server sends back, and when (see [`Message::reply_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyKind {
    /// One byte, `has_parent` (0/1), after `OPEN2`.
    Open2,
    /// A host `int` (4 bytes), `has_parent` (0/1), after `PARENT`.
    Parent,
    /// A host `int32` status (4 bytes), after `CLOSE` / `FORCE_CLOSE`.
    Close,
    /// A header and pages, after `GET`.
    Pages,
}

/// A page server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    /// To `OPEN2`: whether the server has a parent image (1 byte on the wire).
    Open2 {
        /// Parent image present.
        has_parent: bool,
    },
    /// To `PARENT`: whether the server has a parent image (4 bytes on the wire).
    Parent {
        /// Parent image present.
        has_parent: bool,
    },
    /// To `CLOSE`: everything was received and written (4 bytes; CRIU always sends 0).
    Close {
        /// 0 on success.
        status: i32,
    },
    /// To `GET`: a `PS_IOV_ADD_F | PE_PRESENT` header with the plain pid as `dst_id`,
    /// followed by `nr_pages` pages (possibly fewer than asked).
    Pages {
        /// The process.
        pid: u32,
        /// First page.
        vaddr: u64,
        /// Pages that follow.
        nr_pages: u64,
    },
}

impl Reply {
    /// Which kind of reply this is.
    pub fn kind(&self) -> ReplyKind {
        match self {
            Reply::Open2 { .. } => ReplyKind::Open2,
            Reply::Parent { .. } => ReplyKind::Parent,
            Reply::Close { .. } => ReplyKind::Close,
            Reply::Pages { .. } => ReplyKind::Pages,
        }
    }

    /// Bytes of page contents that follow the reply.
    pub fn payload_len(&self) -> u64 {
        match self {
            Reply::Pages { nr_pages, .. } => nr_pages * PAGE_SIZE as u64,
            _ => 0,
        }
    }

    /// The wire bytes (1, 4 or 32 of the returned buffer are used: see the length).
    pub fn encode(&self) -> Result<([u8; HEADER_LEN], usize), ProtocolError> {
        let mut buf = [0u8; HEADER_LEN];
        let len = match *self {
            Reply::Open2 { has_parent } => {
                buf[0] = u8::from(has_parent);
                1
            }
            Reply::Parent { has_parent } => {
                buf[..4].copy_from_slice(&i32::from(has_parent).to_ne_bytes());
                4
            }
            Reply::Close { status } => {
                buf[..4].copy_from_slice(&status.to_ne_bytes());
                4
            }
            Reply::Pages {
                pid,
                vaddr,
                nr_pages,
            } => {
                check_pid(u64::from(pid), Command::AddF)?;
                check_range(Command::AddF, vaddr, nr_pages, true)?;
                let cmd = Command::AddF.code() | (PageFlags::PRESENT.bits() << PS_CMD_BITS);
                buf = raw_header(cmd, nr_pages, vaddr, u64::from(pid));
                HEADER_LEN
            }
        };
        Ok((buf, len))
    }
}

/// Decodes a reply to `request` from its wire bytes (`bytes.len()` must be the reply's size:
/// 1, 4 or [`HEADER_LEN`]).
pub fn decode_reply(request: &Message, bytes: &[u8]) -> Result<Reply, ProtocolError> {
    let command = request.command();
    let kind = request.reply_kind();
    let bad = |detail: String| ProtocolError::BadReply { command, detail };
    let want = reply_len(request)?;
    if bytes.len() != want {
        return Err(bad(format!("{} bytes, expected {want}", bytes.len())));
    }
    match kind {
        Some(ReplyKind::Open2) => match bytes[0] {
            0 | 1 => Ok(Reply::Open2 {
                has_parent: bytes[0] == 1,
            }),
            b => Err(bad(format!("has_parent byte is {b}, not 0 or 1"))),
        },
        Some(ReplyKind::Parent) => {
            match i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) {
                v @ (0 | 1) => Ok(Reply::Parent { has_parent: v == 1 }),
                v => Err(bad(format!("has_parent is {v}, not 0 or 1"))),
            }
        }
        Some(ReplyKind::Close) => Ok(Reply::Close {
            status: i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        }),
        Some(ReplyKind::Pages) => {
            let mut b = [0u8; HEADER_LEN];
            b.copy_from_slice(bytes);
            let h = RawHeader::parse(&b);
            let want_cmd = Command::AddF.code() | (PageFlags::PRESENT.bits() << PS_CMD_BITS);
            if h.cmd != want_cmd {
                return Err(bad(format!(
                    "cmd word {:#x}, expected PS_IOV_ADD_F|PE_PRESENT ({want_cmd:#x})",
                    h.cmd
                )));
            }
            let Message::Get {
                pid,
                vaddr,
                nr_pages,
            } = *request
            else {
                unreachable!("only GET has a Pages reply");
            };
            if h.dst_id != u64::from(pid) || h.vaddr != vaddr {
                return Err(bad(format!(
                    "pages for pid {} at {:#x}, asked for pid {pid} at {vaddr:#x}",
                    h.dst_id, h.vaddr
                )));
            }
            if h.nr_pages == 0 || h.nr_pages > nr_pages {
                return Err(bad(format!(
                    "{} pages, asked for {nr_pages} (1..={nr_pages} allowed)",
                    h.nr_pages
                )));
            }
            Ok(Reply::Pages {
                pid,
                vaddr,
                nr_pages: h.nr_pages,
            })
        }
        None => Err(ProtocolError::ReplyMismatch {
            command,
            kind: None,
        }),
    }
}

/// Bytes of the reply to `request` on the wire.
pub fn reply_len(request: &Message) -> Result<usize, ProtocolError> {
    match request.reply_kind() {
        Some(ReplyKind::Open2) => Ok(1),
        Some(ReplyKind::Parent | ReplyKind::Close) => Ok(4),
        Some(ReplyKind::Pages) => Ok(HEADER_LEN),
        None => Err(ProtocolError::ReplyMismatch {
            command: request.command(),
            kind: None,
        }),
    }
}

/// Checks that `reply` answers `request`.
pub fn check_reply(request: &Message, reply: &Reply) -> Result<(), ProtocolError> {
    if request.reply_kind() != Some(reply.kind()) {
        return Err(ProtocolError::ReplyMismatch {
            command: request.command(),
            kind: Some(reply.kind()),
        });
    }
    let (b, len) = reply.encode()?;
    decode_reply(request, &b[..len]).map(|_| ())
}
