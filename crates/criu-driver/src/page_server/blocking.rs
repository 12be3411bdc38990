//! The wire functions over `std::io`'s `Read` / `Write`: every header, payload and reply is
//! checked as it is read or written.

use std::io::{self, Read, Write};

use super::{
    check_reply, decode_reply, reply_len, Message, ProtocolError, Reply, HEADER_LEN, PAGE_SIZE,
};

/// Reads until `buf` is full. Returns the bytes read if the stream ended first.
fn read_full<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProtocolError::io(what, e)),
        }
    }
    Ok(got)
}

/// Reads one message header. `Ok(None)` when the stream ends cleanly before it; a stream
/// that ends inside the header is [`ProtocolError::Truncated`].
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Option<Message>, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    match read_full(r, &mut b, "a message header")? {
        0 => Ok(None),
        HEADER_LEN => Message::decode(&b).map(Some),
        got => Err(ProtocolError::Truncated {
            what: "a message header",
            got: got as u64,
            expected: HEADER_LEN as u64,
        }),
    }
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
    if !buf.len().is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::PartialPage { len: buf.len() });
    }
    let got = read_full(r, buf, "page contents")?;
    if got != buf.len() {
        return Err(ProtocolError::Truncated {
            what: "page contents",
            got: got as u64,
            expected: buf.len() as u64,
        });
    }
    Ok(())
}

/// Writes payload bytes (a whole number of pages).
pub fn write_payload<W: Write + ?Sized>(w: &mut W, buf: &[u8]) -> Result<(), ProtocolError> {
    if !buf.len().is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::PartialPage { len: buf.len() });
    }
    w.write_all(buf)
        .map_err(|e| ProtocolError::io("page contents", e))
}

/// Reads the page server's answer to `request` (its payload, for GET, follows separately).
pub fn read_reply<R: Read + ?Sized>(r: &mut R, request: &Message) -> Result<Reply, ProtocolError> {
    let len = reply_len(request)?;
    let mut b = [0u8; HEADER_LEN];
    let got = read_full(r, &mut b[..len], "a reply")?;
    if got == 0 {
        return Err(ProtocolError::NoReply {
            command: request.command(),
        });
    }
    if got != len {
        return Err(ProtocolError::Truncated {
            what: "a reply",
            got: got as u64,
            expected: len as u64,
        });
    }
    decode_reply(request, &b[..len])
}

/// Writes the answer to `request` (checked against it first).
pub fn write_reply<W: Write + ?Sized>(
    w: &mut W,
    request: &Message,
    reply: &Reply,
) -> Result<(), ProtocolError> {
    check_reply(request, reply)?;
    let (b, len) = reply.encode()?;
    w.write_all(&b[..len])
        .map_err(|e| ProtocolError::io("a reply", e))
}
