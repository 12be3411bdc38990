//! Many chunks written at the cost of a few syncs.
//!
//! A chunk written alone is synced and renamed into place: one `fsync` per chunk, about
//! 0.3 ms on this project's machines, so an image of 100,000 small files spent most of its
//! import waiting for the disk. A [`ChunkBatch`] writes its chunks to `tmp/` unsynced, and
//! every [`BATCH_BYTES`] or [`BATCH_CHUNKS`] (and at [`ChunkBatch::finish`]) makes them
//! durable with one `syncfs` of the store's filesystem before it renames them to their
//! names. The rule of the store holds: a chunk appears under its name only once its bytes
//! are on disk. [`ChunkBatch::finish`] syncs once more after the renames, so a tree written
//! after it never names a chunk whose rename a crash could undo.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use crate::store::{ChunkRef, Id, ImportStats, Store, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
use crate::FsError;

/// Bytes written before a batch syncs and renames what it holds.
pub const BATCH_BYTES: u64 = 64 << 20;
/// Chunks written before a batch syncs and renames what it holds.
pub const BATCH_CHUNKS: usize = 4096;

/// Chunks on their way into a [`Store`]; see the module's documentation. Dropped without
/// [`ChunkBatch::finish`], it removes the chunks it has not yet renamed into place.
pub struct ChunkBatch<'s> {
    store: &'s Store,
    /// Written to `tmp/`, not yet synced: (temporary file, final name).
    pending: Vec<(PathBuf, PathBuf)>,
    /// Ids of `pending`, so that a chunk met twice in one batch is written once.
    ids: HashSet<Id>,
    bytes: u64,
    /// Whether anything was renamed into place since the last sync.
    renamed: bool,
}

impl<'s> ChunkBatch<'s> {
    pub(crate) fn new(store: &'s Store) -> Self {
        ChunkBatch {
            store,
            pending: vec![],
            ids: HashSet::new(),
            bytes: 0,
            renamed: false,
        }
    }

    /// Whether the store holds chunk `id` or this batch is writing it.
    pub fn has(&self, id: &str) -> bool {
        self.ids.contains(id) || self.store.has_chunk(id)
    }

    /// Adds `data` (once: a chunk the store or the batch holds is kept). Returns its
    /// reference and whether it was new.
    pub fn put(&mut self, data: &[u8]) -> Result<(ChunkRef, bool), FsError> {
        let id = hex::encode(blake3::hash(data).as_bytes());
        self.put_as(id, data)
    }

    /// Adds `data`, received as chunk `expected`: rejected, with nothing written, unless its
    /// blake3 is `expected` and it is at most [`CHUNK_MAX`] bytes.
    pub fn put_checked(
        &mut self,
        expected: &str,
        data: &[u8],
    ) -> Result<(ChunkRef, bool), FsError> {
        let id = crate::store::check_chunk(expected, data)?;
        self.put_as(id, data)
    }

    fn put_as(&mut self, id: Id, data: &[u8]) -> Result<(ChunkRef, bool), FsError> {
        let r = ChunkRef {
            hash: id.clone(),
            len: data.len() as u32,
        };
        if self.has(&id) {
            return Ok((r, false));
        }
        let dest = self.store.chunk_path(&id);
        let tmp = self.store.tmp_path();
        let written = File::create(&tmp)
            .map_err(|e| FsError::io("create", &tmp, e))
            .and_then(|mut f| f.write_all(data).map_err(|e| FsError::io("write", &tmp, e)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.pending.push((tmp, dest));
        self.ids.insert(id);
        self.bytes += data.len() as u64;
        if self.bytes >= BATCH_BYTES || self.pending.len() >= BATCH_CHUNKS {
            self.flush()?;
        }
        Ok((r, true))
    }

    /// Chunks the content read from `r` into the batch; returns the chunks, the content's
    /// blake3 and its size, and counts new chunks into `stats`.
    pub fn put_content(
        &mut self,
        r: impl Read,
        stats: &mut ImportStats,
    ) -> Result<(Vec<ChunkRef>, Id, u64), FsError> {
        let mut whole = blake3::Hasher::new();
        let mut chunks = vec![];
        let mut size = 0u64;
        for c in fastcdc::v2020::StreamCDC::new(r, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
            let c = c.map_err(|e| FsError::io("read content", "", io::Error::other(e)))?;
            whole.update(&c.data);
            let (r, new) = self.put(&c.data)?;
            size += c.data.len() as u64;
            stats.chunks += 1;
            if new {
                stats.new_chunks += 1;
                stats.new_bytes += c.data.len() as u64;
            }
            chunks.push(r);
        }
        stats.bytes += size;
        Ok((chunks, hex::encode(whole.finalize().as_bytes()), size))
    }

    /// Syncs what is pending and renames it into place.
    fn flush(&mut self) -> Result<(), FsError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.store.sync_fs()?;
        for (tmp, dest) in std::mem::take(&mut self.pending) {
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir).map_err(|e| FsError::io("create directory", dir, e))?;
            }
            fs::rename(&tmp, &dest).map_err(|e| FsError::io("rename into place", &dest, e))?;
        }
        self.ids.clear();
        self.bytes = 0;
        self.renamed = true;
        Ok(())
    }

    /// Makes every chunk of the batch durable under its name.
    pub fn finish(mut self) -> Result<(), FsError> {
        self.flush()?;
        if self.renamed {
            self.store.sync_fs()?;
        }
        Ok(())
    }
}

impl Drop for ChunkBatch<'_> {
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn chunks_appear_under_their_names_only_once_synced_and_a_dropped_batch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.chunk_batch();
        let (a, new) = b.put(&noise(1, 1000)).unwrap();
        assert!(new);
        let (again, new) = b.put(&noise(1, 1000)).unwrap();
        assert!(!new, "a chunk met twice in one batch is written once");
        assert_eq!(a, again);
        assert!(b.has(&a.hash));
        assert!(
            !store.has_chunk(&a.hash),
            "not under its name before the sync"
        );
        drop(b);
        assert!(!store.has_chunk(&a.hash));
        let left = fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(left, 0, "a dropped batch removes what it wrote");

        let mut b = store.chunk_batch();
        let mut refs = vec![];
        for i in 0..(BATCH_CHUNKS + 10) as u64 {
            refs.push(b.put(&noise(i + 2, 100)).unwrap().0);
        }
        assert!(
            store.has_chunk(&refs[0].hash),
            "a full batch is synced and renamed on the way"
        );
        assert!(!store.has_chunk(&refs.last().unwrap().hash));
        b.finish().unwrap();
        for r in &refs {
            assert_eq!(store.read_chunk(&r.hash).unwrap().len(), 100);
        }
    }

    #[test]
    fn a_batch_refuses_a_chunk_whose_content_is_not_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = store.chunk_batch();
        let claimed = hex::encode(blake3::hash(b"one thing").as_bytes());
        let e = b.put_checked(&claimed, b"another").unwrap_err();
        assert!(matches!(e, FsError::ChunkMismatch { .. }), "{e}");
        let big = vec![0u8; CHUNK_MAX as usize + 1];
        let id = hex::encode(blake3::hash(&big).as_bytes());
        let e = b.put_checked(&id, &big).unwrap_err();
        assert!(matches!(e, FsError::TooLarge { .. }), "{e}");
        b.finish().unwrap();
        assert_eq!(store.usage().unwrap().chunks, 0);
    }
}
