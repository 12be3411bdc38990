//! Length-prefixed JSON messages: `u32` big-endian length, then that many bytes of JSON.
//!
//! The functions are generic over tokio's [`AsyncRead`]/[`AsyncWrite`], so they work on
//! [`crate::SendStream`]/[`crate::RecvStream`] as well as on any other byte stream.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::TransferError;

/// Default cap on the JSON part of a message: 1 MiB.
pub const MAX_MSG: usize = 1 << 20;

pub(crate) fn read_err(op: &'static str) -> impl FnOnce(std::io::Error) -> TransferError {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransferError::Truncated { what: op }
        } else {
            TransferError::Stream { op, source: e }
        }
    }
}

pub(crate) fn write_err(op: &'static str) -> impl FnOnce(std::io::Error) -> TransferError {
    move |e| TransferError::Stream { op, source: e }
}

/// Writes one message and returns the number of bytes written (header included).
///
/// Fails with [`TransferError::TooLarge`] if the encoded message exceeds [`MAX_MSG`].
pub async fn write_msg<W, T>(s: &mut W, msg: &T) -> Result<u64, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
    T: Serialize + ?Sized,
{
    let body = serde_json::to_vec(msg).map_err(|e| TransferError::Decode {
        what: "outgoing message (encoding)",
        reason: e.to_string(),
    })?;
    if body.len() > MAX_MSG {
        return Err(TransferError::TooLarge {
            len: body.len() as u64,
            cap: MAX_MSG as u64,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| TransferError::TooLarge {
        len: body.len() as u64,
        cap: MAX_MSG as u64,
    })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame)
        .await
        .map_err(write_err("writing a message"))?;
    Ok(frame.len() as u64)
}

/// Reads one message with the default cap [`MAX_MSG`].
///
/// Errors: [`TransferError::TooLarge`] (checked before allocating),
/// [`TransferError::Truncated`] on end of stream (even at a frame boundary),
/// [`TransferError::Decode`] if the JSON does not match `T`.
pub async fn read_msg<R, T>(r: &mut R) -> Result<T, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    read_msg_opt(r)
        .await?
        .ok_or(TransferError::Truncated { what: "a message" })
}

/// Like [`read_msg`], but returns `Ok(None)` on a clean end of stream at a frame boundary.
pub async fn read_msg_opt<R, T>(r: &mut R) -> Result<Option<T>, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    Ok(read_msg_capped(r, MAX_MSG).await?.map(|(m, _)| m))
}

/// Reads one message whose JSON part may be at most `cap` bytes; returns it with the
/// number of bytes consumed, or `None` on a clean end of stream at a frame boundary.
pub async fn read_msg_capped<R, T>(r: &mut R, cap: usize) -> Result<Option<(T, u64)>, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
    T: DeserializeOwned,
{
    let mut hdr = [0u8; 4];
    let mut got = 0;
    while got < hdr.len() {
        let n = r
            .read(&mut hdr[got..])
            .await
            .map_err(read_err("reading a message header"))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(TransferError::Truncated {
                what: "a message header",
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(hdr);
    if u64::from(len) > cap as u64 {
        return Err(TransferError::TooLarge {
            len: u64::from(len),
            cap: cap as u64,
        });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .await
        .map_err(read_err("a message body"))?;
    let msg = serde_json::from_slice(&body).map_err(|e| TransferError::Decode {
        what: std::any::type_name::<T>(),
        reason: e.to_string(),
    })?;
    Ok(Some((msg, 4 + u64::from(len))))
}
