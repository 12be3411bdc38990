//! Sending and receiving file trees ([`shared_fs::Diff`]) over a stream.
//!
//! Wire format: a sequence of framed JSON records (see [`crate::frame`]):
//! `{"Remove": path}`, `{"Entry": EntryMeta}` and finally `{"End": {"entries": n}}`
//! where `n` counts the `Remove` and `Entry` records. A `File` entry is followed by
//! its content as zero or more chunks, each `u32 BE compressed_len`, `u32 BE raw_len`
//! and `compressed_len` bytes of zstd (level 1) data with `1 <= raw_len <= 1 MiB`,
//! then a `u32 0` marker and the 32-byte blake3 hash of the whole raw content. A chunk that
//! zstd would not shrink (a sample of it gains less than 1/32) travels *stored*: the top bit
//! of `raw_len` is set ([`STORED`]) and its `compressed_len == raw_len` bytes are the raw
//! content (memory pages of most programs are incompressible: compressing them cost CPU on
//! both ends for nothing).
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

/// Flag in a chunk's `raw_len`: its bytes are the raw content, not zstd data.
pub const STORED: u32 = 1 << 31;

/// How much of a chunk [`encode_chunk`] compresses first to judge whether it compresses.
const SAMPLE: usize = 64 << 10;

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
    let zc = zstd::bulk::Compressor::new(1)
        .map_err(|e| TransferError::io("zstd compressor", root, e))?;
    // One blocking thread reads, hashes and compresses every file in the diff's order, up to
    // [`PIPELINE_DEPTH`] pieces ahead of the stream: reading overlaps with sending, and a tree
    // of many small files (a checkpoint of many processes) costs no thread hand-over per file.
    let files: Vec<OwnedFile> = diff
        .changed
        .iter()
        .filter(|m| matches!(m.kind, EntryKind::File))
        .map(|meta| OwnedFile {
            rd: Arc::clone(&rd),
            meta: meta.clone(),
            id: diff.identity(&meta.path),
            reads,
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
    let mut rx = Pieces {
        rx,
        ready: std::collections::VecDeque::new(),
    };
    let (pool_tx, pool_rx) = std::sync::mpsc::channel();
    let reader = (!files.is_empty()).then(|| {
        tokio::task::spawn_blocking(move || {
            let (mut zc, mut buf) = (zc, Vec::new());
            let mut out = Batcher {
                tx,
                batch: Vec::new(),
                bytes: 0,
            };
            for f in files {
                let r = read_file(f, &mut zc, &mut buf, &mut out, &pool_rx);
                let stop = !matches!(r, Ok(ReadEnd::Done { .. } | ReadEnd::Changed(_)));
                if !out.push(Piece::End(r)) || stop {
                    break;
                }
            }
            out.flush();
        })
    });
    for path in &diff.removed {
        st.wire_bytes += write_msg(s, &RecordRef::Remove(path)).await?;
        st.entries += 1;
    }
    let mut skipped: HashSet<&str> = HashSet::new();
    for meta in &diff.changed {
        match &meta.kind {
            EntryKind::File => {
                let path = rd.display_path(&meta.path);
                if !send_file(s, meta, &path, reads, &mut rx, &pool_tx, &mut st).await? {
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
    drop(rx);
    if let Some(reader) = reader {
        reader
            .await
            .map_err(|e| TransferError::io("read", root, std::io::Error::other(e.to_string())))?;
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

/// Chunks a file's reader may be ahead of the stream (and a receiver's writer behind it).
const PIPELINE_DEPTH: usize = 4;

/// What a file's reader hands the stream writer.
enum Piece {
    /// The entry record, with the metadata re-read from the open file.
    Entry(EntryMeta),
    /// One encoded chunk: its header and compressed content (a buffer the writer hands
    /// back through the reader's pool once written).
    Chunk([u8; 8], Vec<u8>),
    /// The file's end: how its reading ended (after its last chunk).
    End(Result<ReadEnd, TransferError>),
}

/// The pieces of a tree's files travel to the stream writer in batches: one hand-over (and
/// one wake-up of the writer) per batch rather than per piece, which is what a tree of many
/// small files costs most.
type Batch = Vec<Piece>;

/// Batches chunk buffers of this much memory at most; a buffer at least this big goes at once.
const BATCH_BYTES: usize = 256 << 10;
/// Batches this many pieces at most.
const BATCH_PIECES: usize = 256;

/// The reader's side: collects pieces into batches.
struct Batcher {
    tx: tokio::sync::mpsc::Sender<Batch>,
    batch: Batch,
    bytes: usize,
}

impl Batcher {
    /// Adds `p`; hands the batch on when it is full. `false`: the writer went away.
    fn push(&mut self, p: Piece) -> bool {
        if let Piece::Chunk(_, b) = &p {
            // Capacity, not length: a recycled buffer keeps the size of the largest chunk
            // it held, and that is the memory a batch holds.
            self.bytes += b.capacity();
        }
        self.batch.push(p);
        if self.bytes >= BATCH_BYTES || self.batch.len() >= BATCH_PIECES {
            return self.flush();
        }
        true
    }

    /// Hands the batch on. `false`: the writer went away.
    fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        self.bytes = 0;
        self.tx
            .blocking_send(std::mem::take(&mut self.batch))
            .is_ok()
    }
}

/// The writer's side: the pieces in order.
struct Pieces {
    rx: tokio::sync::mpsc::Receiver<Batch>,
    ready: std::collections::VecDeque<Piece>,
}

impl Pieces {
    /// The next piece; `None` once the reader has ended and everything was taken.
    async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Some(p);
            }
            self.ready.extend(self.rx.recv().await?);
        }
    }
}

/// How a file's reading ended.
enum ReadEnd {
    /// It could not be read as snapshotted (nothing was handed on).
    Changed(String),
    /// Every chunk was handed on.
    Done {
        hash: blake3::Hash,
        /// It changed while it was read.
        changed: bool,
        /// Its mtime and ctime after the read.
        times: (i64, i64),
        /// Raw bytes read.
        bytes: u64,
    },
    /// The stream writer went away (it failed; its error is the one to report).
    Abandoned,
}

/// Reads, hashes and compresses one file on a blocking thread, handing its pieces to `tx`.
/// `zc` and `buf` are the tree's: handed back with the outcome.
fn read_file(
    f: OwnedFile,
    zc: &mut zstd::bulk::Compressor<'static>,
    buf: &mut Vec<u8>,
    tx: &mut Batcher,
    pool: &std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<ReadEnd, TransferError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    let path = f.rd.display_path(&f.meta.path);
    let mut file = match open_checked(&f.rd, &f.meta.path, f.id)
        .map_err(|e| TransferError::io("open", &path, e))?
    {
        Open::Ready(file) => file,
        Open::Changed(reason) => return Ok(ReadEnd::Changed(reason)),
    };
    let md = file
        .metadata()
        .map_err(|e| TransferError::io("stat", &path, e))?;
    let mut current = f.meta.clone();
    current.size = md.len();
    current.mode = md.mode() & 0o7777;
    current.uid = md.uid();
    current.gid = md.gid();
    current.mtime_ns = mtime_ctime(&md).0;
    let size = current.size;
    if !tx.push(Piece::Entry(current)) {
        return Ok(ReadEnd::Abandoned);
    }
    let mut hasher = blake3::Hasher::new();
    let need = usize::try_from(size.min(CHUNK as u64)).unwrap_or(CHUNK);
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let mut remaining = size;
    let mut shrank = false;
    while remaining > 0 {
        let want = usize::try_from(remaining.min(CHUNK as u64)).unwrap_or(CHUNK);
        // A stored chunk took the last read buffer with it (see below).
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut n = 0;
        while n < want && !shrank {
            let r = file
                .read(&mut buf[n..want])
                .map_err(|e| TransferError::io("read", &path, e))?;
            if r == 0 {
                if f.reads == Reads::Frozen {
                    return Err(TransferError::SourceChanged {
                        path,
                        reason: format!("it shrank below the {size} bytes announced to the peer"),
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
        // Written buffers come back: no allocation (and no page faults) per chunk.
        let mut out = pool.try_recv().unwrap_or_default();
        let (hdr, stored) = encode_chunk(zc, raw, &mut out, &path)?;
        let piece = if stored {
            // The read buffer itself goes, uncopied; the next chunk is read into `out`.
            let mut sent = std::mem::replace(buf, out);
            sent.truncate(n);
            sent
        } else {
            out
        };
        if !tx.push(Piece::Chunk(hdr, piece)) {
            return Ok(ReadEnd::Abandoned);
        }
        remaining -= n as u64;
    }
    let after = file
        .metadata()
        .map_err(|e| TransferError::io("stat", &path, e))?;
    Ok(ReadEnd::Done {
        hash: hasher.finalize(),
        changed: shrank || after.len() != md.len() || mtime_ctime(&after) != mtime_ctime(&md),
        times: mtime_ctime(&after),
        bytes: size,
    })
}

/// The error for a tree whose zstd context a failed (panicked) file thread took with it.
fn lost_context(what: &str) -> TransferError {
    TransferError::Protocol {
        reason: format!("the tree's zstd {what} was lost with a failed file thread"),
    }
}

/// One chunk on the wire: `u32 BE compressed_len`, `u32 BE raw_len` (returned), the zstd
/// data (in `out`, replacing what it held), or, returned with `true`, the header of `raw`
/// stored as it is ([`STORED`]; `out` is left alone: `raw` itself is what goes).
fn encode_chunk(
    zc: &mut zstd::bulk::Compressor<'static>,
    raw: &[u8],
    out: &mut Vec<u8>,
    path: &Path,
) -> Result<([u8; 8], bool), TransferError> {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    // A sample first: a chunk whose sample does not shrink goes stored, uncompressed.
    let sample = &raw[..raw.len().min(SAMPLE)];
    let mut stored = false;
    if raw.len() > SAMPLE {
        let slen = zc
            .compress_to_buffer(sample, out)
            .map_err(|e| TransferError::io("compress", path, e))?;
        out.clear();
        stored = slen >= sample.len() - sample.len() / 32;
    }
    let clen = if stored {
        0
    } else {
        // Into the spare capacity: nothing is zeroed first.
        zc.compress_to_buffer(raw, out)
            .map_err(|e| TransferError::io("compress", path, e))?
    };
    let r = u32::try_from(raw.len()).map_err(|_| TransferError::TooLarge {
        len: raw.len() as u64,
        cap: CHUNK as u64,
    })?;
    let header = |c: u32, r: u32| {
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&c.to_be_bytes());
        hdr[4..].copy_from_slice(&r.to_be_bytes());
        hdr
    };
    if stored || clen >= raw.len() {
        out.clear();
        return Ok((header(r, r | STORED), true));
    }
    // Fits in u32: compressed <= compress_bound(1 MiB).
    let c = u32::try_from(clen).map_err(|_| TransferError::TooLarge {
        len: clen as u64,
        cap: max_compressed() as u64,
    })?;
    Ok((header(c, r), false))
}

/// [`FileToSend`] that a blocking thread can own.
struct OwnedFile {
    rd: Arc<RootDir>,
    meta: EntryMeta,
    id: Option<(u64, u64)>,
    reads: Reads,
}

/// Sends one file, from the pieces the tree's reader hands on (`rx`; written chunk buffers go
/// back through `pool`); `Ok(false)` if it was skipped (vanished or changed kind, with
/// [`Reads::Live`]): nothing of it was written then.
async fn send_file<W>(
    s: &mut W,
    meta: &EntryMeta,
    path: &Path,
    reads: Reads,
    rx: &mut Pieces,
    pool: &std::sync::mpsc::Sender<Vec<u8>>,
    st: &mut TreeStats,
) -> Result<bool, TransferError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let path = path.to_path_buf();
    let mut written = 0u64;
    let end = loop {
        let Some(piece) = rx.next().await else {
            return Err(TransferError::Protocol {
                reason: format!(
                    "the tree's file reader stopped before {} (it panicked)",
                    path.display()
                ),
            });
        };
        let n = match piece {
            Piece::Entry(current) => write_msg(s, &RecordRef::Entry(&current)).await?,
            Piece::Chunk(hdr, bytes) => {
                let r = async {
                    s.write_all(&hdr).await?;
                    s.write_all(&bytes).await
                }
                .await
                .map(|()| 8 + bytes.len() as u64)
                .map_err(write_err("writing a chunk"));
                // The reader may have finished: then the buffer is simply dropped.
                let _ = pool.send(bytes);
                r?
            }
            Piece::End(r) => break r,
        };
        written += n;
    };
    st.wire_bytes += written;
    let (hash, changed, times, bytes) = match end? {
        ReadEnd::Changed(reason) if reads == Reads::Live => {
            tracing::debug!(path = %meta.path, %reason, "skipped a file that changed since the snapshot");
            st.unsettled.push(meta.path.clone());
            return Ok(false);
        }
        ReadEnd::Changed(reason) => return Err(TransferError::SourceChanged { path, reason }),
        ReadEnd::Abandoned => {
            return Err(TransferError::Protocol {
                reason: format!("the stream writer stopped taking {}", path.display()),
            })
        }
        ReadEnd::Done {
            hash,
            changed,
            times,
            bytes,
        } => (hash, changed, times, bytes),
    };
    let mut tail = [0u8; 36];
    tail[4..].copy_from_slice(hash.as_bytes());
    s.write_all(&tail)
        .await
        .map_err(write_err("writing a file hash"))?;
    st.wire_bytes += tail.len() as u64;
    st.file_bytes += bytes;

    // Did it change while it was read, or so recently that a further write could go unseen?
    match reads {
        Reads::Frozen if changed => {
            return Err(TransferError::SourceChanged {
                path,
                reason: "it changed while it was read".into(),
            })
        }
        Reads::Frozen => {}
        Reads::Live => {
            let (m, c) = times;
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
    let mut zd = Some(
        zstd::bulk::Decompressor::new().map_err(|e| TransferError::Decode {
            what: "a zstd decompressor",
            reason: e.to_string(),
        })?,
    );
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

/// Decodes one chunk and appends it to `writer`: `rlen` is its `raw_len` field (raw bytes, with
/// [`STORED`] set when `compressed` is the raw content itself).
fn decode_chunk(
    zd: &mut zstd::bulk::Decompressor<'static>,
    writer: &mut shared_fs::FileWriter,
    compressed: &[u8],
    rlen: u32,
    raw: &mut Vec<u8>,
) -> Result<(), TransferError> {
    if rlen & STORED != 0 {
        // Stored: the receiving loop checked that its length is `rlen`.
        writer.write_chunk(compressed)?;
        return Ok(());
    }
    raw.clear();
    raw.reserve(rlen as usize);
    // Into the spare capacity (at most `rlen` bytes are written): nothing is zeroed first.
    zd.decompress_to_buffer(compressed, raw)
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
    writer.write_chunk(raw)?;
    Ok(())
}

/// Gives a received file its name once its content hashes to `hash`.
fn commit_file(writer: shared_fs::FileWriter, hash: &[u8; 32]) -> Result<(), TransferError> {
    match writer.commit(hash) {
        Ok(()) => Ok(()),
        Err(FsError::HashMismatch { path, .. }) => Err(TransferError::HashMismatch { path }),
        Err(e) => Err(e.into()),
    }
}

/// Where a received file's chunks go: decoded here (a file of one chunk), or by a blocking
/// thread up to [`PIPELINE_DEPTH`] chunks behind the stream, so that reading the stream
/// overlaps with decompressing, hashing and writing.
// One per file being received, on the stack: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum FileSink {
    Inline(shared_fs::FileWriter, zstd::bulk::Decompressor<'static>),
    Piped {
        tx: tokio::sync::mpsc::Sender<(Vec<u8>, usize, u32)>,
        #[allow(clippy::type_complexity)]
        done: tokio::task::JoinHandle<(
            Result<shared_fs::FileWriter, TransferError>,
            zstd::bulk::Decompressor<'static>,
        )>,
    },
}

async fn recv_file<R>(
    r: &mut R,
    writer: shared_fs::FileWriter,
    st: &mut TreeStats,
    zd: &mut Option<zstd::bulk::Decompressor<'static>>,
) -> Result<(), TransferError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let bound = max_compressed();
    let declared = writer.meta().size;
    let path = writer.meta().path.clone();
    // Only a writer that panicked keeps it; the tree then failed already.
    let Some(mut d) = zd.take() else {
        return Err(lost_context("decompressor"));
    };
    // Chunk buffers: the writer thread hands each back once decoded, so none is allocated
    // (or zeroed) per chunk.
    let (pool_tx, pool) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut raw = Vec::new();
    let mut sink = if declared > CHUNK as u64 {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize, u32)>(PIPELINE_DEPTH);
        let mut writer = writer;
        let done = tokio::task::spawn_blocking(move || {
            let mut raw = Vec::new();
            while let Some((c, clen, rlen)) = rx.blocking_recv() {
                if let Err(e) = decode_chunk(&mut d, &mut writer, &c[..clen], rlen, &mut raw) {
                    return (Err(e), d);
                }
                let _ = pool_tx.send(c);
            }
            (Ok(writer), d)
        });
        FileSink::Piped { tx, done }
    } else {
        FileSink::Inline(writer, d)
    };
    let mut cbuf = Vec::new();
    let mut announced = 0u64;
    let r = loop {
        let clen = match read_u32(r, "a chunk header").await {
            Ok(c) => c,
            Err(e) => break Err(e),
        };
        st.wire_bytes += 4;
        if clen == 0 {
            let mut hash = [0u8; 32];
            if let Err(e) = r.read_exact(&mut hash).await {
                break Err(read_err("a file hash")(e));
            }
            st.wire_bytes += 32;
            break Ok(hash);
        }
        let rlen_field = match read_u32(r, "a chunk header").await {
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        st.wire_bytes += 4;
        let rlen = rlen_field & !STORED;
        if rlen == 0 || rlen as usize > CHUNK {
            break Err(TransferError::TooLarge {
                len: u64::from(rlen),
                cap: CHUNK as u64,
            });
        }
        if rlen_field & STORED != 0 && clen != rlen {
            break Err(TransferError::Decode {
                what: "a stored file chunk",
                reason: format!("{path}: {clen} bytes announced for {rlen} raw bytes"),
            });
        }
        if clen as usize > bound {
            break Err(TransferError::TooLarge {
                len: u64::from(clen),
                cap: bound as u64,
            });
        }
        // Refuse content past the declared size before decompressing it.
        if announced + u64::from(rlen) > declared {
            break Err(FsError::TooLarge {
                path: path.clone(),
                size: announced + u64::from(rlen),
                limit: declared,
            }
            .into());
        }
        announced += u64::from(rlen);
        let clen = clen as usize;
        if let FileSink::Piped { .. } = sink {
            cbuf = pool.try_recv().unwrap_or_default();
        }
        // Only growth is zeroed: a recycled buffer is as long as the longest chunk it held.
        if cbuf.len() < clen {
            cbuf.resize(clen, 0);
        }
        if let Err(e) = r.read_exact(&mut cbuf[..clen]).await {
            break Err(read_err("a file chunk")(e));
        }
        st.wire_bytes += clen as u64;
        st.file_bytes += u64::from(rlen);
        match &mut sink {
            FileSink::Inline(w, d) => {
                if let Err(e) = decode_chunk(d, w, &cbuf[..clen], rlen_field, &mut raw) {
                    break Err(e);
                }
            }
            // A closed channel means the writer failed: its error is reported below.
            FileSink::Piped { tx, .. } => {
                if tx
                    .send((std::mem::take(&mut cbuf), clen, rlen_field))
                    .await
                    .is_err()
                {
                    break Err(TransferError::Protocol {
                        reason: format!("the writer of {path} stopped"),
                    });
                }
            }
        }
    };
    let writer = match sink {
        FileSink::Inline(w, d) => {
            *zd = Some(d);
            Ok(w)
        }
        FileSink::Piped { tx, done } => {
            drop(tx);
            let (w, d) = done.await.map_err(|e| TransferError::Decode {
                what: "a file chunk",
                reason: format!("{path}: the writer thread failed: {e}"),
            })?;
            *zd = Some(d);
            w
        }
    };
    // The writer's own error says more than the stream's that followed it.
    let writer = writer?;
    commit_file(writer, &r?)
}
