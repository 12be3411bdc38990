//! The messages a dump (or a lazy-pages daemon) sends a page server, and their 32-byte header
//! encoded, decoded and checked.

use super::{
    check_pid, check_range, raw_header, Command, DstId, PageFlags, ProtocolError, RawHeader,
    ReplyKind, HEADER_LEN, PAGE_SIZE, PS_CMD_BITS, PS_CMD_MASK,
};

/// One message from the dump (or lazy-pages) side to a page server.
///
/// Page contents are not part of the message: [`Message::payload_len`] says how many bytes
/// follow it on the wire; read them with [`read_payload`](super::read_payload) (in pieces, see
/// [`Message::payload_pieces`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Message {
    /// `PS_IOV_OPEN` (legacy): open an image, no reply.
    Open {
        /// The image.
        dst_id: DstId,
    },
    /// `PS_IOV_OPEN2`: open an image; the server answers [`Reply::Open2`](super::Reply::Open2).
    Open2 {
        /// The image.
        dst_id: DstId,
    },
    /// `PS_IOV_PARENT`: asks whether the server has a parent image; answered by
    /// [`Reply::Parent`](super::Reply::Parent). Sent by pre-dumps.
    Parent {
        /// The image.
        dst_id: DstId,
    },
    /// `PS_IOV_ADD_F`: a pagemap entry; `nr_pages` pages follow if `flags` has `PRESENT`.
    Add {
        /// The image.
        dst_id: DstId,
        /// First page's address (offset for shmem).
        vaddr: u64,
        /// Number of pages.
        nr_pages: u64,
        /// The entry's flags.
        flags: PageFlags,
    },
    /// `PS_IOV_ADD` (legacy): like `Add` with `PRESENT`; pages follow.
    AddPresent {
        /// The image.
        dst_id: DstId,
        /// First page's address.
        vaddr: u64,
        /// Number of pages.
        nr_pages: u64,
    },
    /// `PS_IOV_HOLE` (legacy): like `Add` with `PARENT`; nothing follows.
    Hole {
        /// The image.
        dst_id: DstId,
        /// First page's address.
        vaddr: u64,
        /// Number of pages.
        nr_pages: u64,
    },
    /// `PS_IOV_GET`: a lazy-pages daemon asks for pages; answered by
    /// [`Reply::Pages`](super::Reply::Pages). Unlike every other message, `dst_id` is the
    /// plain pid (CRIU passes `img_id`).
    Get {
        /// The process.
        pid: u32,
        /// First page wanted.
        vaddr: u64,
        /// Number of pages wanted.
        nr_pages: u64,
    },
    /// `PS_IOV_CLOSE`: the end; answered by [`Reply::Close`](super::Reply::Close).
    Close,
    /// `PS_IOV_FORCE_CLOSE`: the end with `--ps-socket`; answered by
    /// [`Reply::Close`](super::Reply::Close).
    ForceClose,
}

impl Message {
    /// The command this message is sent as.
    pub fn command(&self) -> Command {
        match self {
            Message::Open { .. } => Command::Open,
            Message::Open2 { .. } => Command::Open2,
            Message::Parent { .. } => Command::Parent,
            Message::Add { .. } => Command::AddF,
            Message::AddPresent { .. } => Command::Add,
            Message::Hole { .. } => Command::Hole,
            Message::Get { .. } => Command::Get,
            Message::Close => Command::Close,
            Message::ForceClose => Command::ForceClose,
        }
    }

    /// The image the message is about (`None` for GET, CLOSE and FORCE_CLOSE).
    pub fn dst_id(&self) -> Option<DstId> {
        match *self {
            Message::Open { dst_id }
            | Message::Open2 { dst_id }
            | Message::Parent { dst_id }
            | Message::Add { dst_id, .. }
            | Message::AddPresent { dst_id, .. }
            | Message::Hole { dst_id, .. } => Some(dst_id),
            Message::Get { .. } | Message::Close | Message::ForceClose => None,
        }
    }

    /// `(vaddr, nr_pages)` of the messages that describe a page range.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Message::Add {
                vaddr, nr_pages, ..
            }
            | Message::AddPresent {
                vaddr, nr_pages, ..
            }
            | Message::Hole {
                vaddr, nr_pages, ..
            }
            | Message::Get {
                vaddr, nr_pages, ..
            } => Some((vaddr, nr_pages)),
            _ => None,
        }
    }

    /// The pagemap flags the page server records for this message (ADD means PRESENT,
    /// HOLE means PARENT, as in `page_server_serve`).
    pub fn page_flags(&self) -> Option<PageFlags> {
        match *self {
            Message::Add { flags, .. } => Some(flags),
            Message::AddPresent { .. } => Some(PageFlags::PRESENT),
            Message::Hole { .. } => Some(PageFlags::PARENT),
            _ => None,
        }
    }

    /// Pages of contents that follow the header on the wire.
    pub fn payload_pages(&self) -> u64 {
        match *self {
            Message::Add {
                nr_pages, flags, ..
            } if flags.has_payload() => nr_pages,
            Message::AddPresent { nr_pages, .. } => nr_pages,
            _ => 0,
        }
    }

    /// Bytes of contents that follow the header on the wire.
    pub fn payload_len(&self) -> u64 {
        self.payload_pages() * PAGE_SIZE as u64
    }

    /// What the page server answers, if anything.
    pub fn reply_kind(&self) -> Option<ReplyKind> {
        match self {
            Message::Open2 { .. } => Some(ReplyKind::Open2),
            Message::Parent { .. } => Some(ReplyKind::Parent),
            Message::Get { .. } => Some(ReplyKind::Pages),
            Message::Close | Message::ForceClose => Some(ReplyKind::Close),
            _ => None,
        }
    }

    /// Splits the payload of a page-carrying message into pieces of at most `max_pages`
    /// pages: each piece is the same message narrowed to its pages (`vaddr`, `nr_pages`), in
    /// wire order. Messages without payload yield nothing.
    pub fn payload_pieces(&self, max_pages: u64) -> impl Iterator<Item = Message> {
        let msg = *self;
        let total = self.payload_pages();
        let step = max_pages.max(1);
        let (start, _) = self.range().unwrap_or((0, 0));
        (0..total.div_ceil(step)).map(move |i| {
            let first = i * step;
            let n = step.min(total - first);
            let vaddr = start + first * PAGE_SIZE as u64;
            match msg {
                Message::Add { dst_id, flags, .. } => Message::Add {
                    dst_id,
                    vaddr,
                    nr_pages: n,
                    flags,
                },
                Message::AddPresent { dst_id, .. } => Message::AddPresent {
                    dst_id,
                    vaddr,
                    nr_pages: n,
                },
                other => other,
            }
        })
    }

    /// Checks the message as the decoder would.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match *self {
            Message::Add {
                vaddr,
                nr_pages,
                flags,
                ..
            } => {
                PageFlags::new(flags.bits())?;
                check_range(Command::AddF, vaddr, nr_pages, flags.has_payload())
            }
            Message::AddPresent {
                vaddr, nr_pages, ..
            } => check_range(Command::Add, vaddr, nr_pages, true),
            Message::Hole {
                vaddr, nr_pages, ..
            } => check_range(Command::Hole, vaddr, nr_pages, false),
            Message::Get {
                pid,
                vaddr,
                nr_pages,
            } => {
                check_pid(u64::from(pid), Command::Get)?;
                check_range(Command::Get, vaddr, nr_pages, true)
            }
            Message::Open { dst_id } | Message::Open2 { dst_id } | Message::Parent { dst_id } => {
                DstId::from_raw(dst_id.raw()).map(|_| ())
            }
            Message::Close | Message::ForceClose => Ok(()),
        }
    }

    /// The 32 bytes on the wire (after validating).
    pub fn encode(&self) -> Result<[u8; HEADER_LEN], ProtocolError> {
        self.validate()?;
        let code = self.command().code();
        let dst = self.dst_id().map_or(0, DstId::raw);
        let (vaddr, nr) = self.range().unwrap_or((0, 0));
        Ok(match *self {
            Message::Add { flags, .. } => {
                raw_header(code | (flags.bits() << PS_CMD_BITS), nr, vaddr, dst)
            }
            Message::Get { pid, .. } => raw_header(code, nr, vaddr, u64::from(pid)),
            _ => raw_header(code, nr, vaddr, dst),
        })
    }

    /// Parses and validates 32 bytes from the wire. The 4 padding bytes are ignored (C does
    /// not promise to zero them, although CRIU's initialisers do in practice).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Message, ProtocolError> {
        let h = RawHeader::parse(b);
        let code = h.cmd & PS_CMD_MASK;
        let flags = h.cmd >> PS_CMD_BITS;
        let command =
            Command::from_code(code).ok_or(ProtocolError::UnknownCommand { code, raw: h.cmd })?;
        if flags != 0 && command != Command::AddF {
            return Err(ProtocolError::UnexpectedFlags { command, flags });
        }
        let msg = match command {
            Command::Open | Command::Open2 | Command::Parent => {
                h.zero(command, &["nr_pages", "vaddr"])?;
                let dst_id = DstId::from_raw(h.dst_id)?;
                match command {
                    Command::Open => Message::Open { dst_id },
                    Command::Open2 => Message::Open2 { dst_id },
                    _ => Message::Parent { dst_id },
                }
            }
            Command::AddF => {
                let flags = PageFlags::new(flags)?;
                check_range(command, h.vaddr, h.nr_pages, flags.has_payload())?;
                Message::Add {
                    dst_id: DstId::from_raw(h.dst_id)?,
                    vaddr: h.vaddr,
                    nr_pages: h.nr_pages,
                    flags,
                }
            }
            Command::Add | Command::Hole => {
                check_range(command, h.vaddr, h.nr_pages, command == Command::Add)?;
                let dst_id = DstId::from_raw(h.dst_id)?;
                if command == Command::Add {
                    Message::AddPresent {
                        dst_id,
                        vaddr: h.vaddr,
                        nr_pages: h.nr_pages,
                    }
                } else {
                    Message::Hole {
                        dst_id,
                        vaddr: h.vaddr,
                        nr_pages: h.nr_pages,
                    }
                }
            }
            Command::Get => {
                check_range(command, h.vaddr, h.nr_pages, true)?;
                Message::Get {
                    pid: check_pid(h.dst_id, command)?,
                    vaddr: h.vaddr,
                    nr_pages: h.nr_pages,
                }
            }
            Command::Close | Command::ForceClose => {
                h.zero(command, &["nr_pages", "vaddr", "dst_id"])?;
                if command == Command::Close {
                    Message::Close
                } else {
                    Message::ForceClose
                }
            }
        };
        Ok(msg)
    }
}
