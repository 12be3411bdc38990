//! The wire functions over tokio's `AsyncRead` / `AsyncWrite`, with the same checks as the
//! blocking ones.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::blocking::{
    check_whole_pages, header_read, payload_read, reply_bytes, reply_read, Fill,
};
use super::{reply_len, Message, ProtocolError, Reply, HEADER_LEN};

/// Reads until `fill`'s buffer is full. Returns the bytes read if the stream ended first.
async fn read_full<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    mut fill: Fill<'_>,
) -> Result<usize, ProtocolError> {
    while let Some(rest) = fill.rest() {
        let read = r.read(rest).await;
        fill.count(read)?;
    }
    Ok(fill.got())
}

/// Writes all of `bytes`; `what` names them in errors.
async fn write_all<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), ProtocolError> {
    w.write_all(bytes)
        .await
        .map_err(|e| ProtocolError::io(what, e))
}

/// Async [`read_message`](super::read_message).
pub async fn read_message_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<Message>, ProtocolError> {
    let mut b = [0u8; HEADER_LEN];
    let got = read_full(r, Fill::new(&mut b, "a message header")).await?;
    header_read(&b, got)
}

/// Async [`write_message`](super::write_message).
pub async fn write_message_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    msg: &Message,
) -> Result<(), ProtocolError> {
    write_all(w, &msg.encode()?, "a message header").await
}

/// Async [`read_payload`](super::read_payload).
pub async fn read_payload_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ProtocolError> {
    let len = buf.len();
    check_whole_pages(len)?;
    let got = read_full(r, Fill::new(buf, "page contents")).await?;
    payload_read(got, len)
}

/// Async [`write_payload`](super::write_payload).
pub async fn write_payload_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    buf: &[u8],
) -> Result<(), ProtocolError> {
    check_whole_pages(buf.len())?;
    write_all(w, buf, "page contents").await
}

/// Async [`read_reply`](super::read_reply).
pub async fn read_reply_async<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    request: &Message,
) -> Result<Reply, ProtocolError> {
    let len = reply_len(request)?;
    let mut b = [0u8; HEADER_LEN];
    let got = read_full(r, Fill::new(&mut b[..len], "a reply")).await?;
    reply_read(request, &b[..len], got)
}

/// Async [`write_reply`](super::write_reply).
pub async fn write_reply_async<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    request: &Message,
    reply: &Reply,
) -> Result<(), ProtocolError> {
    let (b, len) = reply_bytes(request, reply)?;
    write_all(w, &b[..len], "a reply").await
}
