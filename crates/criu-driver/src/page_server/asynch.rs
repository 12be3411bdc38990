//! The wire functions over tokio's `AsyncRead` / `AsyncWrite`, with the same checks as the
//! blocking ones.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    check_reply, decode_reply, reply_len, Message, ProtocolError, Reply, HEADER_LEN, PAGE_SIZE,
};

async fn read_full<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProtocolError::io(what, e)),
        }
    }
    Ok(got)
}

/// Async [`read_message`](super::read_message).
pub async fn read_message_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<Message>, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    match read_full(r, &mut b, "a message header").await? {
        0 => Ok(None),
        HEADER_LEN => Message::decode(&b).map(Some),
        got => Err(ProtocolError::Truncated {
            what: "a message header",
            got: got as u64,
            expected: HEADER_LEN as u64,
        }),
    }
}

/// Async [`write_message`](super::write_message).
pub async fn write_message_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    msg: &Message,
) -> Result<(), ProtocolError> {
    let b = msg.encode()?;
    w.write_all(&b)
        .await
        .map_err(|e| ProtocolError::io("a message header", e))
}

/// Async [`read_payload`](super::read_payload).
pub async fn read_payload_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ProtocolError> {
    if !buf.len().is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::PartialPage { len: buf.len() });
    }
    let got = read_full(r, buf, "page contents").await?;
    if got != buf.len() {
        return Err(ProtocolError::Truncated {
            what: "page contents",
            got: got as u64,
            expected: buf.len() as u64,
        });
    }
    Ok(())
}

/// Async [`write_payload`](super::write_payload).
pub async fn write_payload_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    buf: &[u8],
) -> Result<(), ProtocolError> {
    if !buf.len().is_multiple_of(PAGE_SIZE) {
        return Err(ProtocolError::PartialPage { len: buf.len() });
    }
    w.write_all(buf)
        .await
        .map_err(|e| ProtocolError::io("page contents", e))
}

/// Async [`read_reply`](super::read_reply).
pub async fn read_reply_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    request: &Message,
) -> Result<Reply, ProtocolError> {
    let len = reply_len(request)?;
    let mut b = [0u8; HEADER_LEN];
    let got = read_full(r, &mut b[..len], "a reply").await?;
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

/// Async [`write_reply`](super::write_reply).
pub async fn write_reply_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    request: &Message,
    reply: &Reply,
) -> Result<(), ProtocolError> {
    check_reply(request, reply)?;
    let (b, len) = reply.encode()?;
    w.write_all(&b[..len])
        .await
        .map_err(|e| ProtocolError::io("a reply", e))
}
