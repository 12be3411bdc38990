//! A content-addressed store of file trees, one per host.
//!
//! ```text
//! <root>/chunks/ab/ab12…      file content, split by content-defined chunking (FastCDC,
//!                             16/64/256 KiB), named by the blake3 of the bytes
//! <root>/trees/<id>.json      a tree: every entry's metadata and its content's chunks;
//!                             <id> is the blake3 of the file's bytes
//! <root>/images/<hex>.json    an image: a name pointing at a tree
//! <root>/layers/<id>/         a tree materialized as a directory (read-only base layers)
//! <root>/tmp/                 where everything is written before it is renamed into place
//! ```
//!
//! A chunk or tree is written to `tmp/`, synced, then renamed to its name: a crash leaves at
//! most a stray file in `tmp/` (emptied on [`Store::open`]), never a partial object under its
//! name. Every read checks the content against its name. A tree is validated (paths,
//! ordering, sizes, links) whenever it enters the store and whenever it is read back, so a
//! tree received from a peer is checked like a local one.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::{Applier, EntryKind, EntryMeta, FsError, Limits};

mod tree;

pub(crate) use tree::{implicit_dir, parent_of};
pub use tree::{tree_from_entries, Tree};

/// Smallest chunk (but the last of a file).
pub const CHUNK_MIN: u32 = 16 << 10;
/// Average chunk.
pub const CHUNK_AVG: u32 = 64 << 10;
/// Largest chunk.
pub const CHUNK_MAX: u32 = 256 << 10;
/// Largest tree file read from the store or accepted from a peer.
pub const MAX_TREE_BYTES: u64 = 256 << 20;
/// Tree format version.
pub const TREE_VERSION: u32 = 1;

/// The blake3 of a chunk or tree, as 64 lowercase hex digits.
pub type Id = String;

/// One chunk of a file's content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// blake3 of the chunk's bytes.
    pub hash: Id,
    /// Its length in bytes.
    pub len: u32,
}

/// One entry of a tree: metadata (with extended attributes) and, for a file, its content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry {
    /// Path, kind, mode, owner, mtime, size, extended attributes.
    #[serde(flatten)]
    pub meta: EntryMeta,
    /// A file's content, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRef>,
    /// A file's blake3 over its whole content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<Id>,
}

/// A named image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ImageRecord {
    /// Its name.
    pub name: String,
    /// Its tree.
    pub tree: Id,
    /// Where it came from (a directory, an OCI layout, a peer).
    pub source: String,
    /// When it was named, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Its content's size in bytes (files, before dedup).
    pub bytes: u64,
    /// Its entries.
    pub entries: u64,
    /// How its author meant it to run (an OCI image's config; none for a directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::oci::ImageConfig>,
}

/// What a [`Store::gc`] removed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GcStats {
    /// Chunks removed.
    pub chunks: u64,
    /// Their bytes.
    pub chunk_bytes: u64,
    /// Trees removed.
    pub trees: u64,
    /// Materialized layers removed.
    pub layers: u64,
}

/// What a store holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Usage {
    /// Chunks.
    pub chunks: u64,
    /// Bytes in chunks.
    pub chunk_bytes: u64,
    /// Trees.
    pub trees: u64,
    /// Images.
    pub images: u64,
}

/// What an import found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ImportStats {
    /// Entries of the tree.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Chunks of that content.
    pub chunks: u64,
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// Bytes of those.
    pub new_bytes: u64,
}

/// Checks `data`, received as chunk `expected`: at most [`CHUNK_MAX`] bytes, its blake3
/// `expected`. Returns its id.
pub(crate) fn check_chunk(expected: &str, data: &[u8]) -> Result<Id, FsError> {
    if data.len() > CHUNK_MAX as usize {
        return Err(FsError::TooLarge {
            path: format!("chunk {}", expected.chars().take(64).collect::<String>()),
            size: data.len() as u64,
            limit: u64::from(CHUNK_MAX),
        });
    }
    let actual = hex::encode(blake3::hash(data).as_bytes());
    if actual != expected {
        return Err(FsError::ChunkMismatch {
            expected: expected.chars().take(64).collect(),
            actual,
        });
    }
    Ok(actual)
}

/// Whether `s` is a well-formed [`Id`]: 64 lowercase hex digits.
pub fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// [`is_id`], as an error that names the value.
pub fn check_id(s: &str) -> Result<(), FsError> {
    if is_id(s) {
        Ok(())
    } else {
        Err(invalid_tree(format!(
            "{:?} is not a tree id (64 lowercase hex digits)",
            s.chars().take(80).collect::<String>()
        )))
    }
}

fn invalid_tree(reason: String) -> FsError {
    FsError::InvalidTree { reason }
}

/// Reads an object of the store; a missing file is [`FsError::Missing`] (`what` `id`).
fn read_object(path: &Path, what: &'static str, id: &str) -> Result<Vec<u8>, FsError> {
    match fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FsError::Missing {
            what,
            id: id.to_owned(),
        }),
        Err(e) => Err(FsError::io("read", path, e)),
    }
}

/// A content-addressed store of chunks, trees and named images under one directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    limits: Limits,
    tmp_counter: AtomicU64,
    /// Imports (chunks first, their tree last) hold it shared; [`Store::gc`] exclusively, so it
    /// never removes the chunks of a tree being written.
    gate: std::sync::RwLock<()>,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, with the default [`Limits`]. Leftovers
    /// of interrupted writes in `tmp/` are removed.
    pub fn open(root: &Path) -> Result<Store, FsError> {
        Store::open_with(root, Limits::default())
    }

    /// [`Store::open`] with explicit limits for trees.
    pub fn open_with(root: &Path, limits: Limits) -> Result<Store, FsError> {
        for d in ["chunks", "trees", "images", "layers", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| FsError::io("create store directory", &p, e))?;
        }
        let tmp = root.join("tmp");
        let leftovers = fs::read_dir(&tmp).map_err(|e| FsError::io("read", &tmp, e))?;
        for e in leftovers.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        Ok(Store {
            root: root.to_path_buf(),
            limits,
            tmp_counter: AtomicU64::new(0),
            gate: std::sync::RwLock::new(()),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The limits trees are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub(crate) fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!(
            "{}.{n}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ))
    }

    pub(crate) fn chunk_path(&self, id: &str) -> PathBuf {
        self.root.join("chunks").join(&id[..2]).join(id)
    }

    fn tree_path(&self, id: &str) -> PathBuf {
        self.root.join("trees").join(format!("{id}.json"))
    }

    fn image_path(&self, name: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", hex::encode(name.as_bytes())))
    }

    /// A new empty directory under the store's `tmp/` (emptied at the next [`Store::open`] if
    /// left behind); the caller removes it.
    pub fn scratch_dir(&self) -> Result<PathBuf, FsError> {
        let p = self.tmp_path();
        fs::create_dir(&p).map_err(|e| FsError::io("create", &p, e))?;
        Ok(p)
    }

    /// Where tree `id` is (or will be) materialized.
    ///
    /// Refuses anything but a well-formed id: an id from a peer such as `/` or `../..` must
    /// never name a directory outside the store.
    pub fn layer_path(&self, id: &str) -> Result<PathBuf, FsError> {
        check_id(id)?;
        Ok(self.root.join("layers").join(id))
    }

    /// Writes `data` to `dest` atomically: a temporary file, synced, renamed into place.
    fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<(), FsError> {
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| FsError::io("create directory", dir, e))?;
        }
        let tmp = self.tmp_path();
        let res = (|| {
            let mut f = File::create(&tmp).map_err(|e| FsError::io("create", &tmp, e))?;
            f.write_all(data)
                .map_err(|e| FsError::io("write", &tmp, e))?;
            f.sync_all().map_err(|e| FsError::io("sync", &tmp, e))?;
            fs::rename(&tmp, dest).map_err(|e| FsError::io("rename into place", dest, e))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Whether chunk `id` is in the store.
    pub fn has_chunk(&self, id: &str) -> bool {
        is_id(id) && self.chunk_path(id).is_file()
    }

    /// Of `ids`, those the store lacks.
    pub fn missing_chunks<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Vec<Id> {
        ids.into_iter()
            .filter(|id| !self.has_chunk(id))
            .map(str::to_owned)
            .collect()
    }

    /// Stores `data` as a chunk (once: an existing chunk is kept). Returns its reference and
    /// whether it was new.
    pub fn put_chunk(&self, data: &[u8]) -> Result<(ChunkRef, bool), FsError> {
        let id = hex::encode(blake3::hash(data).as_bytes());
        self.put_chunk_as(&id, data)
    }

    /// Stores `data`, received as chunk `expected`: rejected, with nothing written, unless its
    /// blake3 is `expected` and it is at most [`CHUNK_MAX`] bytes.
    pub fn put_chunk_checked(
        &self,
        expected: &str,
        data: &[u8],
    ) -> Result<(ChunkRef, bool), FsError> {
        let id = check_chunk(expected, data)?;
        self.put_chunk_as(&id, data)
    }

    /// A batch of chunks written with a few syncs instead of one per chunk
    /// ([`crate::batch`]).
    pub fn chunk_batch(&self) -> crate::batch::ChunkBatch<'_> {
        crate::batch::ChunkBatch::new(self)
    }

    /// Makes everything written to the store's filesystem durable (`syncfs`).
    pub(crate) fn sync_fs(&self) -> Result<(), FsError> {
        let dir = File::open(&self.root).map_err(|e| FsError::io("open", &self.root, e))?;
        nix::unistd::syncfs(&dir).map_err(|e| FsError::io("syncfs", &self.root, io::Error::from(e)))
    }

    fn put_chunk_as(&self, id: &str, data: &[u8]) -> Result<(ChunkRef, bool), FsError> {
        let r = ChunkRef {
            hash: id.to_owned(),
            len: data.len() as u32,
        };
        let path = self.chunk_path(id);
        if path.is_file() {
            return Ok((r, false));
        }
        self.write_atomic(&path, data)?;
        Ok((r, true))
    }

    /// Reads chunk `id`, checking its content against its name.
    pub fn read_chunk(&self, id: &str) -> Result<Vec<u8>, FsError> {
        if !is_id(id) {
            return Err(invalid_tree(format!(
                "{:?} is not a chunk id",
                id.chars().take(64).collect::<String>()
            )));
        }
        let data = read_object(&self.chunk_path(id), "chunk", id)?;
        let actual = hex::encode(blake3::hash(&data).as_bytes());
        if actual != id {
            return Err(FsError::ChunkMismatch {
                expected: id.to_owned(),
                actual,
            });
        }
        Ok(data)
    }

    /// Validates `tree`, checks that the store holds every chunk it uses, and stores it.
    /// Returns its id.
    pub fn put_tree(&self, tree: &Tree) -> Result<Id, FsError> {
        tree.validate(&self.limits)?;
        if let Some(missing) = tree.chunks().keys().find(|c| !self.has_chunk(c)) {
            return Err(FsError::Missing {
                what: "chunk",
                id: (*missing).to_owned(),
            });
        }
        let bytes = tree.to_bytes();
        let id = hex::encode(blake3::hash(&bytes).as_bytes());
        let path = self.tree_path(&id);
        if !path.is_file() {
            self.write_atomic(&path, &bytes)?;
        }
        Ok(id)
    }

    /// Parses and validates a tree received as bytes (from a peer): its id must be `expected`.
    pub fn tree_from_bytes(&self, expected: &str, bytes: &[u8]) -> Result<Tree, FsError> {
        if bytes.len() as u64 > MAX_TREE_BYTES {
            return Err(FsError::TooLarge {
                path: format!("tree {expected}"),
                size: bytes.len() as u64,
                limit: MAX_TREE_BYTES,
            });
        }
        let actual = hex::encode(blake3::hash(bytes).as_bytes());
        if actual != expected {
            return Err(FsError::ChunkMismatch {
                expected: expected.chars().take(64).collect(),
                actual,
            });
        }
        let tree: Tree = serde_json::from_slice(bytes)
            .map_err(|e| invalid_tree(format!("tree {expected} does not parse: {e}")))?;
        tree.validate(&self.limits)?;
        Ok(tree)
    }

    /// Reads tree `id` back, checking its content against its id and validating it.
    pub fn get_tree(&self, id: &str) -> Result<Tree, FsError> {
        self.get_tree_with_bytes(id).map(|(t, _)| t)
    }

    /// The stored tree's bytes (to send to a peer), checked like [`Store::get_tree`].
    pub fn tree_bytes(&self, id: &str) -> Result<Vec<u8>, FsError> {
        self.get_tree_with_bytes(id).map(|(_, b)| b)
    }

    fn get_tree_with_bytes(&self, id: &str) -> Result<(Tree, Vec<u8>), FsError> {
        if !is_id(id) {
            return Err(invalid_tree(format!(
                "{:?} is not a tree id",
                id.chars().take(64).collect::<String>()
            )));
        }
        let bytes = read_object(&self.tree_path(id), "tree", id)?;
        Ok((self.tree_from_bytes(id, &bytes)?, bytes))
    }

    /// Holds off [`Store::gc`] while a tree's chunks and then the tree are written.
    pub fn import_guard(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Imports the directory `dir` (never following symlinks) as a tree; returns its id.
    pub fn import_dir(&self, dir: &Path) -> Result<(Id, ImportStats), FsError> {
        let _import = self.import_guard();
        let snap = crate::snapshot(dir)?;
        let mut stats = ImportStats::default();
        let mut batch = self.chunk_batch();
        let mut entries = Vec::with_capacity(snap.entries.len());
        for (path, meta) in &snap.entries {
            let full = dir.join(path);
            let mut e = TreeEntry {
                meta: meta.clone(),
                chunks: vec![],
                blake3: None,
            };
            if meta.kind == EntryKind::File {
                let f = File::open(&full).map_err(|e| FsError::io("open", &full, e))?;
                let (chunks, b3, size) = batch.put_content(f, &mut stats)?;
                if size != meta.size {
                    return Err(FsError::SizeMismatch {
                        path: path.clone(),
                        expected: meta.size,
                        actual: size,
                    });
                }
                e.chunks = chunks;
                e.blake3 = Some(b3);
            }
            entries.push(e);
        }
        batch.finish()?;
        stats.entries = entries.len() as u64;
        let tree = Tree {
            version: TREE_VERSION,
            entries,
        };
        Ok((self.put_tree(&tree)?, stats))
    }

    /// Writes tree `id` out as a directory under `dest` (which must not exist), checking
    /// every chunk. Paths are confined to `dest` by [`Applier`].
    pub fn write_tree(&self, id: &str, dest: &Path) -> Result<(), FsError> {
        let tree = self.get_tree(id)?;
        let mut a = Applier::new(dest, self.limits.clone())?;
        for e in &tree.entries {
            if let Some(mut w) = a.begin(&e.meta)? {
                for c in &e.chunks {
                    let data = self.read_chunk(&c.hash)?;
                    if data.len() != c.len as usize {
                        return Err(invalid_tree(format!(
                            "{:?}: chunk {} has {} bytes, the tree says {}",
                            e.meta.path,
                            c.hash,
                            data.len(),
                            c.len
                        )));
                    }
                    w.write_chunk(&data)?;
                }
                let b3 = e
                    .blake3
                    .as_deref()
                    .and_then(|s| hex::decode(s).ok())
                    .unwrap_or_default();
                let b3: [u8; 32] = b3
                    .try_into()
                    .map_err(|_| invalid_tree(format!("{:?}: malformed blake3", e.meta.path)))?;
                w.commit(&b3)?;
            }
        }
        a.finish()?;
        Ok(())
    }

    /// Materializes tree `id` once under `layers/<id>` (built aside, then renamed into
    /// place) and returns that directory.
    pub fn materialize(&self, id: &str) -> Result<PathBuf, FsError> {
        let dest = self.layer_path(id)?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let tmp = self.tmp_path();
        let res = self.write_tree(id, &tmp).and_then(|()| {
            fs::rename(&tmp, &dest).map_err(|e| FsError::io("rename into place", &dest, e))
        });
        match res {
            Ok(()) => Ok(dest),
            Err(_) if dest.is_dir() => {
                // Materialized meanwhile by someone else.
                let _ = fs::remove_dir_all(&tmp);
                Ok(dest)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Names tree `id` (which must be in the store) `name`, replacing an earlier image of that
    /// name.
    pub fn tag(
        &self,
        name: &str,
        id: &str,
        source: &str,
        config: Option<crate::oci::ImageConfig>,
    ) -> Result<ImageRecord, FsError> {
        check_image_name(name)?;
        let tree = self.get_tree(id)?;
        let rec = ImageRecord {
            name: name.to_owned(),
            tree: id.to_owned(),
            source: source.to_owned(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            bytes: tree.bytes(),
            entries: tree.entries.len() as u64,
            config,
        };
        let bytes = serde_json::to_vec_pretty(&rec)
            .map_err(|e| invalid_tree(format!("image record: {e}")))?;
        self.write_atomic(&self.image_path(name), &bytes)?;
        Ok(rec)
    }

    /// The image named `name`.
    pub fn image(&self, name: &str) -> Result<ImageRecord, FsError> {
        check_image_name(name)?;
        let path = self.image_path(name);
        let bytes = read_object(&path, "image", name)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| invalid_tree(format!("image record {}: {e}", path.display())))
    }

    /// Every image, by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>, FsError> {
        let dir = self.root.join("images");
        let mut out = vec![];
        for e in fs::read_dir(&dir).map_err(|e| FsError::io("read", &dir, e))? {
            let e = e.map_err(|e| FsError::io("read", &dir, e))?;
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                let bytes = fs::read(&p).map_err(|e| FsError::io("read", &p, e))?;
                if let Ok(r) = serde_json::from_slice::<ImageRecord>(&bytes) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes the name `name` (its content goes at the next [`Store::gc`] if nothing else
    /// uses it).
    pub fn remove_image(&self, name: &str) -> Result<ImageRecord, FsError> {
        let rec = self.image(name)?;
        let path = self.image_path(name);
        fs::remove_file(&path).map_err(|e| FsError::io("remove", &path, e))?;
        Ok(rec)
    }

    /// Removes every tree that no image names and that is not in `keep` (trees containers
    /// use), their materialized layers, and every chunk no remaining tree uses and that is not
    /// in `keep_chunks` (chunks of trees on their way here).
    pub fn gc(&self, keep: &[Id], keep_chunks: &[Id]) -> Result<GcStats, FsError> {
        self.gc_with(|| (keep.to_vec(), keep_chunks.to_vec()))
    }

    /// [`Store::gc`] with what to keep decided by `keep` (trees, chunks) once the store is held
    /// exclusively: nothing that holds [`Store::import_guard`] (an import, a materialization, a
    /// base arriving) runs between that decision and the collection.
    pub fn gc_with(&self, keep: impl FnOnce() -> (Vec<Id>, Vec<Id>)) -> Result<GcStats, FsError> {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let (keep, keep_chunks) = keep();
        let mut live: HashSet<Id> = keep.iter().cloned().collect();
        live.extend(self.images()?.into_iter().map(|r| r.tree));
        let mut stats = GcStats::default();
        let mut used: HashSet<Id> = keep_chunks.iter().cloned().collect();
        let trees = self.root.join("trees");
        for e in fs::read_dir(&trees).map_err(|e| FsError::io("read", &trees, e))? {
            let p = e.map_err(|e| FsError::io("read", &trees, e))?.path();
            let Some(id) = p.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            if live.contains(&id) {
                // A live tree that does not read back is kept, its chunks too: refuse to
                // collect rather than lose data.
                let tree = self.get_tree(&id)?;
                used.extend(tree.chunks().keys().map(|c| (*c).to_owned()));
            } else {
                fs::remove_file(&p).map_err(|e| FsError::io("remove", &p, e))?;
                stats.trees += 1;
            }
        }
        let layers = self.root.join("layers");
        for e in fs::read_dir(&layers).map_err(|e| FsError::io("read", &layers, e))? {
            let p = e.map_err(|e| FsError::io("read", &layers, e))?.path();
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            if !live.contains(name) {
                fs::remove_dir_all(&p).map_err(|e| FsError::io("remove", &p, e))?;
                stats.layers += 1;
            }
        }
        let chunks = self.root.join("chunks");
        for d in fs::read_dir(&chunks).map_err(|e| FsError::io("read", &chunks, e))? {
            let d = d.map_err(|e| FsError::io("read", &chunks, e))?.path();
            for e in fs::read_dir(&d).map_err(|e| FsError::io("read", &d, e))? {
                let e = e.map_err(|e| FsError::io("read", &d, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !used.contains(&name) {
                    let len = e.metadata().map_or(0, |m| m.len());
                    let p = e.path();
                    fs::remove_file(&p).map_err(|e| FsError::io("remove", &p, e))?;
                    stats.chunks += 1;
                    stats.chunk_bytes += len;
                }
            }
        }
        Ok(stats)
    }

    /// What the store holds.
    pub fn usage(&self) -> Result<Usage, FsError> {
        let mut u = Usage {
            images: self.images()?.len() as u64,
            ..Usage::default()
        };
        let trees = self.root.join("trees");
        u.trees = fs::read_dir(&trees)
            .map_err(|e| FsError::io("read", &trees, e))?
            .count() as u64;
        let chunks = self.root.join("chunks");
        for d in fs::read_dir(&chunks).map_err(|e| FsError::io("read", &chunks, e))? {
            let d = d.map_err(|e| FsError::io("read", &chunks, e))?.path();
            for e in fs::read_dir(&d)
                .map_err(|e| FsError::io("read", &d, e))?
                .flatten()
            {
                u.chunks += 1;
                u.chunk_bytes += e.metadata().map_or(0, |m| m.len());
            }
        }
        Ok(u)
    }
}

/// Image names: 1-255 bytes of letters, digits and `._-:/@`, not starting with `.` or `/`.
pub fn check_image_name(name: &str) -> Result<(), FsError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['.', '/'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FsError::InvalidImageName {
            name: name.chars().take(300).collect(),
        })
    }
}
