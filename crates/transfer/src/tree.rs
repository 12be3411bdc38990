//! Sending and receiving file trees ([`shared_fs::Diff`]) over a stream.
//!
//! Wire format: a sequence of framed JSON records (see [`crate::frame`]):
//! `{"Remove": path}`, `{"Entry": EntryMeta}` and finally `{"End": {"entries": n}}`
//! where `n` counts the `Remove` and `Entry` records. A `File` entry is followed by
//! its content as zero or more chunks, each `u32 BE compressed_len`, `u32 BE raw_len`
//! and `compressed_len` bytes of zstd (level 1) data with `1 <= raw_len <= 1 MiB`,
//! then a `u32 0` marker and the 32-byte blake3 hash of the whole raw content.
//!
//! The receiver applies everything through [`shared_fs::Applier`], so paths are
//! confined, sizes and counts capped and hashes verified before a file appears.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shared_fs::{Applier, Diff, EntryKind, EntryMeta, FsError, Limits, RootDir};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{read_err, read_msg_capped, write_err, write_msg, MAX_MSG};
use crate::TransferError;

/// Largest raw (uncompressed) chunk: 1 MiB.
pub const CHUNK: usize = 1 << 20;

/// Counters of one tree transfer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Records sent or received (`Entry` and `Remove`).
    pub entries: u64,
    /// Raw file content bytes.
    pub file_bytes: u64,
    /// Bytes on the wire (frames, chunk headers, compressed data, hashes).
    pub wire_bytes: u64,
    /// Paths of the diff whose content at the peer may not be what the snapshot recorded: they
    /// vanished or changed kind before they could be read (not sent), changed while being
    /// read, or were written so recently that a write in the same clock tick would not show in
    /// their metadata. Always empty with [`Reads::Frozen`]. The sender marks them
    /// ([`shared_fs::Snapshot::unsettle`]) so that its next diff sends them again.
    pub unsettled: Vec<String>,
}

/// How the tree being sent may change while it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// Its owner runs (a pre-copy round, the first copy of a root): a file that vanishes,
    /// changes kind, is another inode than snapshotted or changes while it is read is normal;
    /// it is skipped or sent as read, and reported in [`TreeStats::unsettled`].
    Live,
    /// Nothing changes it (the container is frozen, or the agent owns the tree): any such
    /// change is an error, since this copy is authoritative.
    Frozen,
}

/// A write this close (or closer) to a read may share the file's mtime and ctime with an
/// earlier one: timestamps come from a coarse clock (one tick: 1-10 ms).
const RACY_WINDOW_NS: i64 = 50_000_000;

/// Records received (owned).
#[derive(Debug, Deserialize)]
enum Record {
    Remove(String),
    Entry(EntryMeta),
    End { entries: u64 },
}

/// Records sent (borrowed); serializes exactly like [`Record`].
#[derive(Serialize)]
enum RecordRef<'a> {
    Remove(&'a str),
    Entry(&'a EntryMeta),
    End { entries: u64 },
}

/// Largest valid compressed size of a [`CHUNK`]-sized input.
fn max_compressed() -> usize {
    zstd::zstd_safe::compress_bound(CHUNK)
}

/// Sends `diff` (computed on the local tree at `root`): removals first, then entries
/// with file contents, then the `End` record. The stream is flushed but not finished.
///
/// Every file is opened beneath `root` without following any symlink ([`RootDir`]) and must
/// be the regular file (device and inode) that was snapshotted. Its metadata (size, mode,
/// owner, mtime) is re-read from the open file, so the receiver gets what was actually sent.
/// What happens when the tree changed under the snapshot depends on `reads`.
pub async fn send_tree<W>(
    s: &mut W,
    root: &Path,
    diff: &Diff,
    reads: Reads,
) -> Result<TreeStats, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut st = TreeStats::default();
    // One open(2) of a local directory: not worth a blocking task.
    let rd = RootDir::open(root)?;
    let rd = Arc::new(rd);
    // One compression context and one buffer for the whole tree: creating them per file costs
    // more than compressing a small file.
    let mut zc = zstd::bulk::Compressor::new(1)
        .map_err(|e| TransferError::io("zstd compressor", root, e))?;
    let mut buf = Vec::new();
    for path in &diff.removed {
        st.wire_bytes += write_msg(s, &RecordRef::Remove(path)).await?;
        st.entries += 1;
    }
    let mut skipped: HashSet<&str> = HashSet::new();
    for meta in &diff.changed {
        match &meta.kind {
            EntryKind::File => {
                let file = FileToSend {
                    rd: &rd,
                    meta,
                    id: diff.identity(&meta.path),
                    reads,
                };
                if !send_file(s, file, &mut st, &mut zc, &mut buf).await? {
                    skipped.insert(&meta.path);
                    continue;
                }
            }
            // Its file was not sent: neither is the link (both go with the next diff).
            EntryKind::Hardlink { target } if skipped.contains(target.as_str()) => {
                st.unsettled.push(meta.path.clone());
                continue;
            }
            _ => st.wire_bytes += write_msg(s, &RecordRef::Entry(meta)).await?,
        }
        st.entries += 1;
    }
    st.wire_bytes += write_msg(
        s,
        &RecordRef::End {
            entries: st.entries,
        },
    )
    .await?;
    s.flush().await.map_err(write_err("flushing a tree"))?;
    Ok(st)
}

/// One file of a diff to send.
struct FileToSend<'a> {
    rd: &'a Arc<RootDir>,
    meta: &'a EntryMeta,
    /// `(device, inode)` as snapshotted.
    id: Option<(u64, u64)>,
    reads: Reads,
}

/// Why a file of the diff cannot be read as snapshotted.
enum Open {
    Ready(std::fs::File),
    Changed(String),
}

fn open_checked(rd: &RootDir, rel: &str, id: Option<(u64, u64)>) -> Result<Open, std::io::Error> {
    let opened = match rd.open_path(rel) {
        Ok(o) => o,
        Err(e) if shared_fs::beneath::is_changed_under_us(&e) => {
            return Ok(Open::Changed(format!(
                "it vanished or a parent changed ({e})"
            )))
        }
        Err(e) => return Err(e),
    };
    if !opened.meta.is_file() {
        return Ok(Open::Changed("it is no longer a regular file".into()));
    }
    if let Some(id) = id {
        if opened.identity() != id {
            return Ok(Open::Changed(format!(
                "it is another file than snapshotted (device/inode {:?}, snapshotted {id:?})",
                opened.identity()
            )));
        }
    }
    opened.reopen_for_reading().map(Open::Ready)
}

fn mtime_ctime(md: &std::fs::Metadata) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    (
        ns(md.mtime(), md.mtime_nsec()),
        ns(md.ctime(), md.ctime_nsec()),
    )
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Sends one file; `Ok(false)` if it was skipped (vanished or changed kind, with
/// [`Reads::Live`]): nothing of it was written then.
async fn send_file<W>(
    s: &mut W,
    f: FileToSend<'_>,
    st: &mut TreeStats,
    zc: &mut zstd::bulk::Compressor<'static>,
    buf: &mut Vec<u8>,
) -> Result<bool, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    use std::os::unix::fs::MetadataExt;

    let meta = f.meta;
    let path = f.rd.display_path(&meta.path);
    let opened = {
        let (rd, rel, id) = (Arc::clone(f.rd), meta.path.clone(), f.id);
        tokio::task::spawn_blocking(move || open_checked(&rd, &rel, id))
            .await
            .map_err(|e| TransferError::io("open", &path, std::io::Error::other(e.to_string())))?
            .map_err(|e| TransferError::io("open", &path, e))?
    };
    let file = match opened {
        Open::Ready(file) => file,
        Open::Changed(reason) if f.reads == Reads::Live => {
            tracing::debug!(path = %meta.path, %reason, "skipped a file that changed since the snapshot");
            st.unsettled.push(meta.path.clone());
            return Ok(false);
        }
        Open::Changed(reason) => return Err(TransferError::SourceChanged { path, reason }),
    };
    let mut file = tokio::fs::File::from_std(file);
    let md = file
        .metadata()
        .await
        .map_err(|e| TransferError::io("stat", &path, e))?;
    let mut current = meta.clone();
    current.size = md.len();
    current.mode = md.mode() & 0o7777;
    current.uid = md.uid();
    current.gid = md.gid();
    current.mtime_ns = mtime_ctime(&md).0;
    st.wire_bytes += write_msg(s, &RecordRef::Entry(&current)).await?;

    let mut hasher = blake3::Hasher::new();
    let need = usize::try_from(current.size.min(CHUNK as u64)).unwrap_or(CHUNK);
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let mut remaining = current.size;
    let mut shrank = false;
    while remaining > 0 {
        let want = usize::try_from(remaining.min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut n = 0;
        while n < want && !shrank {
            let r = file
                .read(&mut buf[n..want])
                .await
                .map_err(|e| TransferError::io("read", &path, e))?;
            if r == 0 {
                if f.reads == Reads::Frozen {
                    return Err(TransferError::SourceChanged {
                        path,
                        reason: format!(
                            "it shrank below the {} bytes announced to the peer",
                            current.size
                        ),
                    });
                }
                // Truncated while read: the announced size is completed with zeros and the
                // file goes again with the next diff.
                shrank = true;
            }
            n += r;
        }
        if shrank {
            buf[n..want].fill(0);
            n = want;
        }
        let raw = &buf[..n];
        hasher.update(raw);
        let compressed = zc
            .compress(raw)
            .map_err(|e| TransferError::io("compress", &path, e))?;
        // Both fit in u32: raw <= 1 MiB and compressed <= compress_bound(1 MiB).
        let clen = u32::try_from(compressed.len()).map_err(|_| TransferError::TooLarge {
            len: compressed.len() as u64,
            cap: max_compressed() as u64,
        })?;
        let rlen = u32::try_from(n).map_err(|_| TransferError::TooLarge {
            len: n as u64,
            cap: CHUNK as u64,
        })?;
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&clen.to_be_bytes());
        hdr[4..].copy_from_slice(&rlen.to_be_bytes());
        s.write_all(&hdr)
            .await
            .map_err(write_err("writing a chunk header"))?;
        s.write_all(&compressed)
            .await
            .map_err(write_err("writing a chunk"))?;
        st.wire_bytes += 8 + compressed.len() as u64;
        st.file_bytes += n as u64;
        remaining -= n as u64;
    }
    let mut tail = [0u8; 36];
    tail[4..].copy_from_slice(hasher.finalize().as_bytes());
    s.write_all(&tail)
        .await
        .map_err(write_err("writing a file hash"))?;
    st.wire_bytes += tail.len() as u64;

    // Did it change while it was read, or so recently that a further write could go unseen?
    let after = file
        .metadata()
        .await
        .map_err(|e| TransferError::io("stat", &path, e))?;
    let changed = shrank || after.len() != md.len() || mtime_ctime(&after) != mtime_ctime(&md);
    match f.reads {
        Reads::Frozen if changed => {
            return Err(TransferError::SourceChanged {
                path,
                reason: "it changed while it was read".into(),
            })
        }
        Reads::Frozen => {}
        Reads::Live => {
            let (m, c) = mtime_ctime(&after);
            if changed || m.max(c) > now_ns().saturating_sub(RACY_WINDOW_NS) {
                st.unsettled.push(meta.path.clone());
            }
        }
    }
    Ok(true)
}

async fn read_u32<R>(r: &mut R, what: &'static str) -> Result<u32, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await.map_err(read_err(what))?;
    Ok(u32::from_be_bytes(b))
}

/// Receives a tree sent by [`send_tree`] and applies it under `root` within `limits`.
///
/// Returns after the `End` record, once directory metadata has been applied. On error
/// the tree may be partially applied, but no file with unverified content is left
/// behind (not even a temporary file).
pub async fn recv_tree<R>(
    r: &mut R,
    root: &Path,
    limits: Limits,
) -> Result<TreeStats, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    recv_tree_with(r, root, limits, false).await
}

/// [`recv_tree`]; with `durable`, every file is synced before it takes its name and every
/// directory it changed is synced before this returns ([`Applier::durable`]).
pub async fn recv_tree_with<R>(
    r: &mut R,
    root: &Path,
    limits: Limits,
    durable: bool,
) -> Result<TreeStats, TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut applier = Applier::new(root, limits)?;
    if durable {
        applier = applier.durable();
    }
    let mut st = TreeStats::default();
    let mut zd = zstd::bulk::Decompressor::new().map_err(|e| TransferError::Decode {
        what: "a zstd decompressor",
        reason: e.to_string(),
    })?;
    loop {
        let Some((record, n)) = read_msg_capped::<_, Record>(r, MAX_MSG).await? else {
            return Err(TransferError::Truncated {
                what: "a tree (no End record)",
            });
        };
        st.wire_bytes += n;
        match record {
            Record::Remove(path) => {
                applier.remove(&path)?;
                st.entries += 1;
            }
            Record::Entry(meta) => {
                st.entries += 1;
                if let Some(writer) = applier.begin(&meta)? {
                    recv_file(r, writer, &mut st, &mut zd).await?;
                }
            }
            Record::End { entries } => {
                if entries != st.entries {
                    return Err(TransferError::Protocol {
                        reason: format!(
                            "the sender announced {entries} records but {} were received",
                            st.entries
                        ),
                    });
                }
                applier.finish()?;
                return Ok(st);
            }
        }
    }
}

async fn recv_file<R>(
    r: &mut R,
    mut writer: shared_fs::FileWriter,
    st: &mut TreeStats,
    zd: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let bound = max_compressed();
    let mut cbuf = Vec::new();
    loop {
        let clen = read_u32(r, "a chunk header").await?;
        st.wire_bytes += 4;
        if clen == 0 {
            let mut hash = [0u8; 32];
            r.read_exact(&mut hash)
                .await
                .map_err(read_err("a file hash"))?;
            st.wire_bytes += 32;
            return match writer.commit(&hash) {
                Ok(()) => Ok(()),
                Err(FsError::HashMismatch { path, .. }) => {
                    Err(TransferError::HashMismatch { path })
                }
                Err(e) => Err(e.into()),
            };
        }
        let rlen = read_u32(r, "a chunk header").await?;
        st.wire_bytes += 4;
        if rlen == 0 || rlen as usize > CHUNK {
            return Err(TransferError::TooLarge {
                len: u64::from(rlen),
                cap: CHUNK as u64,
            });
        }
        if clen as usize > bound {
            return Err(TransferError::TooLarge {
                len: u64::from(clen),
                cap: bound as u64,
            });
        }
        // Refuse content past the declared size before decompressing it.
        let declared = writer.meta().size;
        if writer.written() + u64::from(rlen) > declared {
            return Err(FsError::TooLarge {
                path: writer.meta().path.clone(),
                size: writer.written() + u64::from(rlen),
                limit: declared,
            }
            .into());
        }
        cbuf.resize(clen as usize, 0);
        r.read_exact(&mut cbuf)
            .await
            .map_err(read_err("a file chunk"))?;
        st.wire_bytes += u64::from(clen);
        let raw = zd
            .decompress(&cbuf, rlen as usize)
            .map_err(|e| TransferError::Decode {
                what: "a zstd file chunk",
                reason: format!("{} ({}): {e}", writer.meta().path, rlen),
            })?;
        if raw.len() != rlen as usize {
            return Err(TransferError::Decode {
                what: "a zstd file chunk",
                reason: format!(
                    "{}: chunk announced {rlen} bytes but decompressed to {}",
                    writer.meta().path,
                    raw.len()
                ),
            });
        }
        writer.write_chunk(&raw)?;
        st.file_bytes += raw.len() as u64;
    }
}
