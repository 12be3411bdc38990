//! The wire functions over `std::io`'s `Read` / `Write`: every header, payload and reply is
//! checked as it is read or written. The checks and the read loop's bookkeeping are here, for
//! the async functions too.

use std::io::{self, Read, Write};

use super::{
    check_reply, decode_reply, reply_len, Message, ProtocolError, Reply, HEADER_LEN, PAGE_SIZE,
};

/// A buffer being filled by reads from a stream, until it is full or the stream ends.
pub(super) struct Fill<'a> {
    buf: &'a mut [u8],
    got: usize,
    ended: bool,
    what: &'static str,
}

impl<'a> Fill<'a> {
    /// Nothing read into `buf` yet; `what` names its contents in errors.
    pub(super) fn new(buf: &'a mut [u8], what: &'static str) -> Fill<'a> {
        Fill {
            buf,
            got: 0,
            ended: false,
            what,
        }
    }

    /// The part of the buffer still to be read into; `None` once it is full or the stream has
    /// ended.
    pub(super) fn rest(&mut self) -> Option<&mut [u8]> {
        if self.ended || self.got >= self.buf.len() {
            None
        } else {
            Some(&mut self.buf[self.got..])
        }
    }

    /// Takes in what one read into [`Fill::rest`] returned: bytes, the end of the stream (0
    /// bytes) or an error; after an interrupted read the same part is read again.
    pub(super) fn count(&mut self, read: io::Result<usize>) -> Result<(), ProtocolError> {
        match read {
            Ok(0) => self.ended = true,
            Ok(n) => self.got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::io(self.what, e)),
        }
        Ok(())
    }

    /// The bytes read so far.
    pub(super) fn got(&self) -> usize {
        self.got
    }
}

/// [`ProtocolError::Truncated`]: the stream ended after `got` of the `expected` bytes of
/// `what`.
fn truncated(what: &'static str, got: usize, expected: usize) -> ProtocolError {
    ProtocolError::Truncated {
        what,
        got: got as u64,
        expected: expected as u64,
    }
}

/// The message in a header of which `got` bytes were read into `b`: `None` when the stream
/// ended before it, [`ProtocolError::Truncated`] when it ended inside it.
pub(super) fn header_read(
    b: &[u8; HEADER_LEN],
    got: usize,
) -> Result<Option<Message>, ProtocolError> {
    match got {
        0 => Ok(None),
        HEADER_LEN => Message::decode(b).map(Some),
        got => Err(truncated("a message header", got, HEADER_LEN)),
    }
}

/// Refuses a payload buffer of `len` bytes that is not a whole number of pages.
pub(super) fn check_whole_pages(len: usize) -> Result<(), ProtocolError> {
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::PartialPage { len });
    }
    Ok(())
}

/// Checks that all `len` bytes of page contents were read (`got`).
pub(super) fn payload_read(got: usize, len: usize) -> Result<(), ProtocolError> {
    if got != len {
        return Err(truncated("page contents", got, len));
    }
    Ok(())
}

/// The reply to `request` of which `got` bytes were read into `b` (as long as that reply):
/// [`ProtocolError::NoReply`] when the stream ended before it.
pub(super) fn reply_read(request: &Message, b: &[u8], got: usize) -> Result<Reply, ProtocolError> {
    if got == 0 {
        return Err(ProtocolError::NoReply {
            command: request.command(),
        });
    }
    if got != b.len() {
        return Err(truncated("a reply", got, b.len()));
    }
    decode_reply(request, b)
}

/// The wire bytes of `reply` (the first `len` of the array), checked against `request` first.
pub(super) fn reply_bytes(
    request: &Message,
    reply: &Reply,
) -> Result<([u8; HEADER_LEN], usize), ProtocolError> {
    check_reply(request, reply)?;
    reply.encode()
}

/// Reads until `fill`'s buffer is full. Returns the bytes read if the stream ended first.
fn read_full<R: Read + ?Sized>(r: &mut R, mut fill: Fill<'_>) -> Result<usize, ProtocolError> {
    while let Some(rest) = fill.rest() {
        let read = r.read(rest);
        fill.count(read)?;
    }
    Ok(fill.got())
}

/// Reads one message header. `Ok(None)` when the stream ends cleanly before it; a stream
/// that ends inside the header is [`ProtocolError::Truncated`].
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Option<Message>, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    let got = read_full(r, Fill::new(&mut b, "a message header"))?;
    header_read(&b, got)
}

/// Writes one message header (validated first; the payload is written separately).
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> Result<(), ProtocolError> {
    let b = msg.encode()?;
    w.write_all(&b)
        .map_err(|e| ProtocolError::io("a message header", e))
}

/// Reads payload bytes: exactly `buf.len()` (a whole number of pages; use
/// [`Message::payload_pieces`] to know how many belong to which message).
pub fn read_payload<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtocolError> {
    let len = buf.len();
    check_whole_pages(len)?;
    let got = read_full(r, Fill::new(buf, "page contents"))?;
    payload_read(got, len)
}

/// Writes payload bytes (a whole number of pages).
pub fn write_payload<W: Write + ?Sized>(w: &mut W, buf: &[u8]) -> Result<(), ProtocolError> {
    check_whole_pages(buf.len())?;
    w.write_all(buf)
        .map_err(|e| ProtocolError::io("page contents", e))
}

/// Reads the page server's answer to `request` (its payload, for GET, follows separately).
pub fn read_reply<R: Read + ?Sized>(r: &mut R, request: &Message) -> Result<Reply, ProtocolError> {
    let len = reply_len(request)?;
    let mut b = [0u8; HEADER_LEN];
    let got = read_full(r, Fill::new(&mut b[..len], "a reply"))?;
    reply_read(request, &b[..len], got)
}

/// Writes the answer to `request` (checked against it first).
pub fn write_reply<W: Write + ?Sized>(
    w: &mut W,
    request: &Message,
    reply: &Reply,
) -> Result<(), ProtocolError> {
    let (b, len) = reply_bytes(request, reply)?;
    w.write_all(&b[..len])
        .map_err(|e| ProtocolError::io("a reply", e))
}
