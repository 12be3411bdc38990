//! Hash lists, bitmaps and chunk streams: the small binary formats of pre-copy's
//! "which pages do you hold" exchange and of base-layer transfers.
//!
//! * A hash list is `count` raw 32-byte hashes, the count announced beforehand in a frame.
//!   [`read_hashes`] allocates as bytes arrive, not as announced.
//! * A held bitmap answers a hash list: one bit per hash in order (bit `i % 8` of byte
//!   `i / 8`), sent as lower-case hex. [`decode_bitmap`] refuses a wrong length and set bits
//!   past the end.
//! * A chunk id list names base-layer chunks as 64 lower-case hex digits (their blake3);
//!   [`parse_chunk_ids`] refuses anything else and duplicates.
//! * A chunk stream is `count` records `id (32 bytes) | len (u32 BE) | data`;
//!   [`ChunkStream`] accepts only announced, not yet seen ids, lengths within a cap, and
//!   data whose blake3 is its id.
//! * A location list says where pages live in the container: `count` records
//!   `pid (u32 BE) | vaddr (u64 BE) | seq (u64 BE) | n (u32 BE) | n hashes`, page `i` of a
//!   record being at `vaddr + i * 4096` of process `pid` (as the container's PID namespace
//!   numbers it), with content `hashes[i]` as read at sequence number `seq` (a later read of
//!   the same page has a larger one). [`read_locations`] refuses unaligned or overflowing
//!   addresses, empty records and more pages than its cap.

use std::collections::HashSet;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{read_err, write_err};
use crate::TransferError;

/// A 32-byte content hash (blake3).
pub type Hash = [u8; 32];

/// Hashes read per step of [`read_hashes`].
const HASH_BATCH: usize = 4096;

/// Writes `hashes` as raw bytes (the count goes in the request frame before them).
pub async fn write_hashes<W>(w: &mut W, hashes: &[Hash]) -> Result<u64, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    for h in hashes {
        w.write_all(h).await.map_err(write_err("hash list"))?;
    }
    Ok(32 * hashes.len() as u64)
}

/// Reads `count` hashes. Refuses a count above `max` before reading anything; memory grows
/// with what arrives, not with what was announced.
pub async fn read_hashes<R>(r: &mut R, count: u64, max: u64) -> Result<Vec<Hash>, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    if count > max {
        return Err(TransferError::TooLarge {
            len: count.saturating_mul(32),
            cap: max.saturating_mul(32),
        });
    }
    let mut out: Vec<Hash> = Vec::with_capacity((count as usize).min(HASH_BATCH));
    let mut buf = vec![0u8; 32 * HASH_BATCH];
    let mut left = count as usize;
    while left > 0 {
        let n = left.min(HASH_BATCH);
        r.read_exact(&mut buf[..n * 32])
            .await
            .map_err(read_err("a hash list"))?;
        out.extend(buf[..n * 32].chunks_exact(32).map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        }));
        left -= n;
    }
    Ok(out)
}

/// Encodes one bit per entry of `bits` as lower-case hex.
pub fn encode_bitmap(bits: &[bool]) -> String {
    let mut bytes = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        bytes[i / 8] |= 1 << (i % 8);
    }
    hex::encode(&bytes)
}

/// Decodes a bitmap answering `count` entries. Refuses text that is not hex, a length other
/// than `count` bits rounded up to bytes, and bits set past `count`.
pub fn decode_bitmap(hex: &str, count: usize) -> Result<Vec<bool>, TransferError> {
    let bytes = hex::decode(hex).ok().ok_or_else(|| TransferError::Decode {
        what: "a held-pages bitmap",
        reason: format!("{} characters that are not hex", hex.len()),
    })?;
    if bytes.len() != count.div_ceil(8) {
        return Err(TransferError::Protocol {
            reason: format!(
                "a bitmap of {} bytes answers {count} hashes (it must have {})",
                bytes.len(),
                count.div_ceil(8)
            ),
        });
    }
    if !count.is_multiple_of(8) && bytes[count / 8] >> (count % 8) != 0 {
        return Err(TransferError::Protocol {
            reason: format!("a bitmap for {count} hashes has bits set past the end"),
        });
    }
    Ok((0..count)
        .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

/// Parses a list of chunk ids (64 lower-case hex digits each), at most `max` of them,
/// none twice.
pub fn parse_chunk_ids(ids: &[String], max: usize) -> Result<Vec<Hash>, TransferError> {
    if ids.len() > max {
        return Err(TransferError::Protocol {
            reason: format!("{} chunk ids in one list; at most {max}", ids.len()),
        });
    }
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter()
        .map(|s| {
            let id = parse_id(s)?;
            if !seen.insert(id) {
                return Err(TransferError::Protocol {
                    reason: format!("chunk id {s} is listed twice"),
                });
            }
            Ok(id)
        })
        .collect()
}

/// Parses one id: exactly 64 lower-case hex digits.
pub fn parse_id(s: &str) -> Result<Hash, TransferError> {
    let bad = || TransferError::Protocol {
        reason: format!(
            "{:?} is not an id (64 lower-case hex digits)",
            s.chars().take(80).collect::<String>()
        ),
    };
    if s.len() != 64 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let v = hex::decode(s).ok().ok_or_else(bad)?;
    let mut h = [0u8; 32];
    h.copy_from_slice(&v);
    Ok(h)
}

/// Writes one chunk record; returns the bytes written.
pub async fn write_chunk<W>(w: &mut W, id: &Hash, data: &[u8]) -> Result<u64, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let len = u32::try_from(data.len()).map_err(|_| TransferError::TooLarge {
        len: data.len() as u64,
        cap: u64::from(u32::MAX),
    })?;
    w.write_all(id).await.map_err(write_err("a chunk id"))?;
    w.write_all(&len.to_be_bytes())
        .await
        .map_err(write_err("a chunk length"))?;
    w.write_all(data).await.map_err(write_err("a chunk"))?;
    Ok(36 + data.len() as u64)
}

/// Reads a chunk stream of an announced count, checking every record against the set of
/// chunks the receiver expects.
#[derive(Debug)]
pub struct ChunkStream {
    expected: HashSet<Hash>,
    seen: HashSet<Hash>,
    left: u64,
    max_len: u32,
}

impl ChunkStream {
    /// A stream of `count` chunks out of `expected`, each of 1..=`max_len` bytes. Refuses a
    /// count larger than the expected set.
    pub fn new(expected: HashSet<Hash>, count: u64, max_len: u32) -> Result<Self, TransferError> {
        if count > expected.len() as u64 {
            return Err(TransferError::Protocol {
                reason: format!(
                    "{count} chunks announced where {} are expected",
                    expected.len()
                ),
            });
        }
        Ok(ChunkStream {
            expected,
            seen: HashSet::new(),
            left: count,
            max_len,
        })
    }

    /// Chunks still to come.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// The next chunk, checked (`None` once `count` chunks have been read).
    pub async fn next<R>(&mut self, r: &mut R) -> Result<Option<(Hash, Vec<u8>)>, TransferError>
    where
        R: AsyncRead + Unpin + ?Sized,
    {
        if self.left == 0 {
            return Ok(None);
        }
        let mut id = [0u8; 32];
        r.read_exact(&mut id)
            .await
            .map_err(read_err("a chunk id"))?;
        let len = r.read_u32().await.map_err(read_err("a chunk length"))?;
        if len == 0 || len > self.max_len {
            return Err(TransferError::Protocol {
                reason: format!(
                    "chunk {} of {len} bytes (1..={} allowed)",
                    hex::encode(id),
                    self.max_len
                ),
            });
        }
        if !self.expected.contains(&id) {
            return Err(TransferError::Protocol {
                reason: format!("chunk {} was not asked for", hex::encode(id)),
            });
        }
        if !self.seen.insert(id) {
            return Err(TransferError::Protocol {
                reason: format!("chunk {} came twice", hex::encode(id)),
            });
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await.map_err(read_err("a chunk"))?;
        if *blake3::hash(&data).as_bytes() != id {
            return Err(TransferError::HashMismatch {
                path: format!("chunk {}", hex::encode(id)),
            });
        }
        self.left -= 1;
        Ok(Some((id, data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(hex::encode(b), "00017f80ff");
        assert_eq!(hex::decode(hex::encode(b)).unwrap(), b);
        assert!(hex::decode("0").is_err());
        assert!(hex::decode("zz").is_err());
    }

    #[test]
    fn bitmap_bits_are_in_order() {
        let bits = [
            true, false, false, false, false, false, false, false, false, true,
        ];
        assert_eq!(encode_bitmap(&bits), "0102");
        assert_eq!(decode_bitmap("0102", 10).unwrap(), bits);
        // A bit past the end, or a byte too many, is refused.
        assert!(decode_bitmap("0106", 10).is_err());
        assert!(decode_bitmap("010200", 10).is_err());
    }

    #[test]
    fn ids_are_lower_case_hex_of_32_bytes() {
        let id = hex::encode([0xab; 32]);
        assert_eq!(parse_id(&id).unwrap(), [0xab; 32]);
        assert!(parse_id(&id.to_uppercase()).is_err());
        assert!(parse_id(&id[..62]).is_err());
        assert!(parse_chunk_ids(&[id.clone(), id], 10).is_err());
    }
}

/// Where some pages of a container live: `hashes.len()` pages of process `pid` from `vaddr`,
/// read at sequence number `seq` (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The process, as the container's PID namespace numbers it.
    pub pid: u32,
    /// The first page's address.
    pub vaddr: u64,
    /// When the pages were read (larger is later).
    pub seq: u64,
    /// The pages' contents, in address order.
    pub hashes: Vec<Hash>,
}

/// The largest address a location may name (x86-64 and arm64 user space with 5-level pages).
pub const MAX_ADDRESS: u64 = 1 << 57;

/// Writes `locations`; returns the bytes written.
pub async fn write_locations<W>(w: &mut W, locations: &[Location]) -> Result<u64, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut bytes = 0;
    for l in locations {
        let mut head = [0u8; 24];
        head[..4].copy_from_slice(&l.pid.to_be_bytes());
        head[4..12].copy_from_slice(&l.vaddr.to_be_bytes());
        head[12..20].copy_from_slice(&l.seq.to_be_bytes());
        head[20..].copy_from_slice(&(l.hashes.len() as u32).to_be_bytes());
        w.write_all(&head).await.map_err(write_err("a location"))?;
        bytes += 24 + write_hashes(w, &l.hashes).await?;
    }
    Ok(bytes)
}

/// Reads `count` location records holding at most `max_pages` pages in all.
pub async fn read_locations<R>(
    r: &mut R,
    count: u64,
    max_pages: u64,
) -> Result<Vec<Location>, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut out = Vec::with_capacity((count as usize).min(HASH_BATCH));
    let mut pages = 0u64;
    for _ in 0..count {
        let mut head = [0u8; 24];
        r.read_exact(&mut head)
            .await
            .map_err(read_err("a location"))?;
        let pid = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        let vaddr = u64::from_be_bytes(head[4..12].try_into().expect("8 bytes"));
        let seq = u64::from_be_bytes(head[12..20].try_into().expect("8 bytes"));
        let n = u64::from(u32::from_be_bytes(head[20..].try_into().expect("4 bytes")));
        let end = n
            .checked_mul(4096)
            .and_then(|len| vaddr.checked_add(len))
            .filter(|end| *end <= MAX_ADDRESS);
        if n == 0 || vaddr % 4096 != 0 || end.is_none() {
            return Err(TransferError::Protocol {
                reason: format!(
                    "a location of {n} pages at {vaddr:#x} of pid {pid} (empty, unaligned or past {MAX_ADDRESS:#x})"
                ),
            });
        }
        pages += n;
        if pages > max_pages {
            return Err(TransferError::TooLarge {
                len: pages.saturating_mul(32),
                cap: max_pages.saturating_mul(32),
            });
        }
        let hashes = read_hashes(r, n, n).await?;
        out.push(Location {
            pid,
            vaddr,
            seq,
            hashes,
        });
    }
    Ok(out)
}
