//! Applying entries received from an untrusted peer under a root directory.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Seek, Write};
use std::os::unix::fs::{lchown, symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::confine::{confine_with, is_missing};
use crate::{sys, EntryKind, EntryMeta, FsError, Limits};

/// Counters returned by [`Applier::finish`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries begun (all kinds).
    pub entries: u64,
    /// File content bytes committed.
    pub bytes: u64,
}

/// What to do with a directory once all entries are applied.
#[derive(Clone, Copy, Debug)]
struct DirFixup {
    /// Mode to set, for directories received as entries.
    mode: Option<u32>,
    /// Modification time to set (received, or the original one for directories we touched).
    mtime_ns: i64,
}

/// Applies entries received from a peer under a root directory, enforcing [`Limits`].
///
/// Every path is checked with the same rules as [`crate::confine`]. Directory modes and
/// mtimes are applied by [`Applier::finish`], after all their children were written;
/// the mtimes of existing directories modified along the way are restored.
#[derive(Debug)]
pub struct Applier {
    root: PathBuf,
    limits: Limits,
    entries: u64,
    declared_bytes: u64,
    committed: Arc<AtomicU64>,
    dirs: BTreeMap<String, DirFixup>,
    is_root: bool,
    tmp_counter: u64,
    /// Sync every file before it takes its name, and every directory touched at `finish`.
    durable: bool,
    /// Directories whose entries changed (synced at `finish` when durable).
    touched: std::collections::BTreeSet<String>,
}

fn parent_rel(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

fn time_from_ns(ns: i64) -> SystemTime {
    let abs = Duration::new(
        ns.unsigned_abs() / 1_000_000_000,
        // Always < 1e9, fits in u32.
        (ns.unsigned_abs() % 1_000_000_000) as u32,
    );
    if ns >= 0 {
        UNIX_EPOCH + abs
    } else {
        UNIX_EPOCH - abs
    }
}

fn mtime_of(md: &fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// Changes ownership, tolerating EPERM when not running as root.
fn set_owner(path: &Path, uid: u32, gid: u32, is_root: bool) -> Result<(), FsError> {
    match lchown(path, Some(uid), Some(gid)) {
        Ok(()) => Ok(()),
        Err(e) if !is_root && e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(FsError::io("chown", path, e)),
    }
}

/// Makes the extended attributes of `path` exactly `wanted` (`security.selinux` is left to
/// the system). Without root, attributes it may not set are skipped, like ownership.
fn set_xattrs(path: &Path, wanted: &[crate::Xattr], is_root: bool) -> Result<(), FsError> {
    let have =
        sys::list_xattrs(path).map_err(|e| FsError::io("read extended attributes of", path, e))?;
    if have.is_empty() && wanted.is_empty() {
        return Ok(());
    }
    for (name, _) in &have {
        if name != "security.selinux" && !wanted.iter().any(|w| &w.name == name) {
            sys::remove_xattr(path, name)
                .map_err(|e| FsError::io("remove extended attribute of", path, e))?;
        }
    }
    for w in wanted {
        let value = hex::decode(&w.value).unwrap_or_default();
        if have.iter().any(|(n, v)| *n == w.name && *v == value) {
            continue;
        }
        match sys::set_xattr(path, &w.name, &value) {
            Ok(()) => {}
            Err(e) if !is_root && e.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(FsError::io("set extended attribute of", path, e)),
        }
    }
    Ok(())
}

/// Removes whatever exists at `path` (file, symlink, node or directory tree); missing is fine.
fn remove_any(path: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            fs::remove_dir_all(path).map_err(|e| FsError::io("remove directory tree", path, e))
        }
        Ok(_) => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(FsError::io("remove", path, e)),
        },
        Err(e) if is_missing(&e) => Ok(()),
        Err(e) => Err(FsError::io("stat", path, e)),
    }
}

impl Applier {
    /// Creates an applier writing under `root`, creating `root` (and its parents) if missing.
    pub fn new(root: &Path, limits: Limits) -> Result<Self, FsError> {
        fs::create_dir_all(root).map_err(|e| FsError::io("create root directory", root, e))?;
        let md = fs::metadata(root).map_err(|e| FsError::io("stat root directory", root, e))?;
        if !md.is_dir() {
            return Err(FsError::io(
                "use as root directory",
                root,
                io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
            ));
        }
        Ok(Applier {
            root: root.to_path_buf(),
            limits,
            entries: 0,
            declared_bytes: 0,
            committed: Arc::new(AtomicU64::new(0)),
            dirs: BTreeMap::new(),
            is_root: sys::is_root(),
            tmp_counter: 0,
            durable: false,
            touched: Default::default(),
        })
    }

    /// Makes what this applier writes durable: each file is synced before it is renamed into
    /// place, and each directory whose entries changed is synced by [`Applier::finish`]. For a
    /// container's root filesystem, which must survive a crash once the migration commits.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// The root directory entries are applied under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn confine(&self, rel: &str) -> Result<PathBuf, FsError> {
        confine_with(&self.root, rel, self.limits.max_path_len)
    }

    /// Remembers the current mtime of the directory `rel` ("" = root) before we modify it,
    /// unless a fixup is already recorded for it.
    fn touch_dir(&mut self, rel: &str) -> Result<(), FsError> {
        if self.dirs.contains_key(rel) {
            return Ok(());
        }
        let path = if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        };
        match fs::symlink_metadata(&path) {
            Ok(md) if md.is_dir() => {
                self.dirs.insert(
                    rel.to_string(),
                    DirFixup {
                        mode: None,
                        mtime_ns: mtime_of(&md),
                    },
                );
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(FsError::io("stat", path, e)),
        }
    }

    /// Makes sure the parent directory of `rel` exists, recording the mtime of the
    /// nearest existing ancestor that gets modified.
    fn prepare_parent(&mut self, rel: &str, path: &Path) -> Result<(), FsError> {
        let mut anc = parent_rel(rel);
        loop {
            let p = if anc.is_empty() {
                self.root.clone()
            } else {
                self.root.join(anc)
            };
            match fs::symlink_metadata(&p) {
                Ok(_) => break,
                Err(e) if is_missing(&e) && !anc.is_empty() => anc = parent_rel(anc),
                Err(e) => return Err(FsError::io("stat", p, e)),
            }
        }
        self.touch_dir(anc)?;
        if let Some(parent) = path.parent() {
            if anc != parent_rel(rel) {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(|e| FsError::io("create parent directory", parent, e))?;
            }
        }
        Ok(())
    }

    fn count_entry(&mut self) -> Result<(), FsError> {
        if self.entries >= self.limits.max_entries {
            return Err(FsError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        self.entries += 1;
        Ok(())
    }

    /// Starts applying one entry.
    ///
    /// Checks the path (see [`crate::confine`]), the entry count and the size caps.
    /// Directories are created (an existing directory is kept); symlinks, FIFOs,
    /// devices and hard links replace whatever exists at the path. For a
    /// [`EntryKind::File`] a [`FileWriter`] is returned: write exactly `meta.size`
    /// bytes to it and [`FileWriter::commit`] it; nothing appears at the path before that.
    pub fn begin(&mut self, meta: &EntryMeta) -> Result<Option<FileWriter>, FsError> {
        let path = self.confine(&meta.path)?;
        crate::check_xattrs(&meta.path, &meta.xattrs)?;
        self.count_entry()?;
        let r = self.begin_entry(meta, &path)?;
        // A file gets its attributes when it is committed; a hard link shares its file's.
        if r.is_none() && !matches!(meta.kind, EntryKind::Hardlink { .. }) {
            set_xattrs(&path, &meta.xattrs, self.is_root)?;
        }
        Ok(r)
    }

    fn begin_entry(
        &mut self,
        meta: &EntryMeta,
        path: &Path,
    ) -> Result<Option<FileWriter>, FsError> {
        let path = path.to_path_buf();
        let mode = meta.mode & 0o7777;
        match &meta.kind {
            EntryKind::Dir => {
                self.prepare_parent(&meta.path, &path)?;
                match fs::symlink_metadata(&path) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        remove_any(&path)?;
                        self.mkdir(&path)?;
                    }
                    Err(e) if is_missing(&e) => self.mkdir(&path)?,
                    Err(e) => return Err(FsError::io("stat", &path, e)),
                }
                set_owner(&path, meta.uid, meta.gid, self.is_root)?;
                self.dirs.insert(
                    meta.path.clone(),
                    DirFixup {
                        mode: Some(mode),
                        mtime_ns: meta.mtime_ns,
                    },
                );
                Ok(None)
            }
            EntryKind::File => {
                if meta.size > self.limits.max_file_size {
                    return Err(FsError::TooLarge {
                        path: meta.path.clone(),
                        size: meta.size,
                        limit: self.limits.max_file_size,
                    });
                }
                let total = self.declared_bytes.saturating_add(meta.size);
                if total > self.limits.max_total_bytes {
                    return Err(FsError::TotalTooLarge {
                        path: meta.path.clone(),
                        total,
                        limit: self.limits.max_total_bytes,
                    });
                }
                self.declared_bytes = total;
                self.prepare_parent(&meta.path, &path)?;
                if fs::symlink_metadata(&path).is_ok_and(|md| md.is_dir()) {
                    remove_any(&path)?;
                }
                let parent = path.parent().unwrap_or(&self.root).to_path_buf();
                self.tmp_counter += 1;
                let tmp = parent.join(format!(
                    ".ferry-tmp-{}-{}",
                    std::process::id(),
                    self.tmp_counter
                ));
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|e| FsError::io("create temporary file", &tmp, e))?;
                if self.durable {
                    self.touched.insert(parent_rel(&meta.path).to_string());
                }
                Ok(Some(FileWriter {
                    file: Some(file),
                    tmp: Some(tmp),
                    target: path,
                    meta: meta.clone(),
                    written: 0,
                    hasher: blake3::Hasher::new(),
                    committed: Arc::clone(&self.committed),
                    is_root: self.is_root,
                    durable: self.durable,
                }))
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.contains('\0') {
                    return Err(FsError::InvalidPath {
                        path: meta.path.clone(),
                        reason: "symlink target is empty or contains a NUL byte",
                    });
                }
                self.prepare_parent(&meta.path, &path)?;
                remove_any(&path)?;
                symlink(target, &path).map_err(|e| FsError::io("create symlink", &path, e))?;
                set_owner(&path, meta.uid, meta.gid, self.is_root)?;
                sys::set_mtime_nofollow(&path, meta.mtime_ns)
                    .map_err(|e| FsError::io("set mtime of", &path, e))?;
                Ok(None)
            }
            EntryKind::Hardlink { target } => {
                let bad = |reason| FsError::BadHardlink {
                    path: meta.path.clone(),
                    target: target.chars().take(300).collect(),
                    reason,
                };
                if target == &meta.path {
                    return Err(bad("a hard link cannot point at itself"));
                }
                let tpath = self.confine(target)?;
                match fs::symlink_metadata(&tpath) {
                    Ok(md) if md.is_file() => {}
                    Ok(_) => return Err(bad("target is not a regular file")),
                    Err(e) if is_missing(&e) => return Err(bad("target does not exist")),
                    Err(e) => return Err(FsError::io("stat", tpath, e)),
                }
                self.prepare_parent(&meta.path, &path)?;
                remove_any(&path)?;
                fs::hard_link(&tpath, &path)
                    .map_err(|e| FsError::io("create hard link", &path, e))?;
                Ok(None)
            }
            EntryKind::Fifo | EntryKind::CharDev { .. } | EntryKind::BlockDev { .. } => {
                let (ftype, rdev) = match meta.kind {
                    EntryKind::CharDev { rdev } => (libc::S_IFCHR, rdev),
                    EntryKind::BlockDev { rdev } => (libc::S_IFBLK, rdev),
                    _ => (libc::S_IFIFO, 0),
                };
                self.prepare_parent(&meta.path, &path)?;
                remove_any(&path)?;
                sys::mknod(&path, ftype | mode, rdev)
                    .map_err(|e| FsError::io("create special file", &path, e))?;
                set_owner(&path, meta.uid, meta.gid, self.is_root)?;
                fs::set_permissions(&path, Permissions::from_mode(mode))
                    .map_err(|e| FsError::io("chmod", &path, e))?;
                sys::set_mtime_nofollow(&path, meta.mtime_ns)
                    .map_err(|e| FsError::io("set mtime of", &path, e))?;
                Ok(None)
            }
        }
    }

    fn mkdir(&self, path: &Path) -> Result<(), FsError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| FsError::io("create directory", path, e))
    }

    /// Removes the entry at `rel` (a file, symlink, node or a whole directory tree).
    /// A missing entry is not an error. The path is confined like in [`Applier::begin`].
    pub fn remove(&mut self, rel: &str) -> Result<(), FsError> {
        let path = self.confine(rel)?;
        if self.durable {
            self.touched.insert(parent_rel(rel).to_string());
        }
        match fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(FsError::io("stat", path, e)),
        }
        self.touch_dir(parent_rel(rel))?;
        remove_any(&path)
    }

    /// The path of the directory `rel` ("" = root) recorded earlier, if it is still beneath the
    /// root: `None` when a parent component has since been replaced by a symlink (the peer
    /// sent one in its place), since acting on the path would then act on whatever the
    /// symlink points at, outside the root.
    fn recorded_dir(&self, rel: &str) -> Result<Option<PathBuf>, FsError> {
        if rel.is_empty() {
            return Ok(Some(self.root.clone()));
        }
        match self.confine(rel) {
            Ok(p) => Ok(Some(p)),
            Err(FsError::SymlinkInPath { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets directory modes and mtimes (after all children were written) and returns counters.
    pub fn finish(self) -> Result<ApplyStats, FsError> {
        for (rel, fix) in self.dirs.iter().rev() {
            let Some(path) = self.recorded_dir(rel)? else {
                continue;
            };
            // Only directories still present as directories (not symlinks) are fixed up.
            match fs::symlink_metadata(&path) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => continue,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(FsError::io("stat", path, e)),
            }
            if let Some(mode) = fix.mode {
                fs::set_permissions(&path, Permissions::from_mode(mode))
                    .map_err(|e| FsError::io("chmod", &path, e))?;
            }
            sys::set_mtime_nofollow(&path, fix.mtime_ns)
                .map_err(|e| FsError::io("set mtime of", &path, e))?;
        }
        if self.durable {
            // Every other entry kind is created in a directory that a file or a removal also
            // touched, or in one listed here: sync them all, deepest first.
            let mut dirs: Vec<&String> = self.touched.iter().chain(self.dirs.keys()).collect();
            dirs.sort_by(|a, b| b.cmp(a));
            dirs.dedup();
            for rel in dirs {
                let Some(path) = self.recorded_dir(rel)? else {
                    continue;
                };
                // Only what is still a directory: opening a FIFO the peer put in its place
                // would block forever, a device would be opened.
                let opened = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(&path);
                match opened {
                    Ok(d) => d
                        .sync_all()
                        .map_err(|e| FsError::io("sync directory", &path, e))?,
                    Err(e) if is_missing(&e) || e.raw_os_error() == Some(libc::ELOOP) => {}
                    Err(e) => return Err(FsError::io("open directory", &path, e)),
                }
            }
        }
        Ok(ApplyStats {
            entries: self.entries,
            bytes: self.committed.load(Ordering::Relaxed),
        })
    }
}

/// Smallest all-zero write turned into a hole.
const SPARSE_BLOCK: usize = 4096;

/// Splits `data` into alternating runs of whole all-zero [`SPARSE_BLOCK`]s (`true`) and of
/// anything else (`false`).
fn runs(data: &[u8]) -> Vec<(bool, &[u8])> {
    let mut out: Vec<(bool, &[u8])> = vec![];
    let mut start = 0;
    let mut cur: Option<bool> = None;
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let zero = block.len() == SPARSE_BLOCK && block.iter().all(|&b| b == 0);
        let at = i * SPARSE_BLOCK;
        match cur {
            Some(c) if c == zero => {}
            Some(c) => {
                out.push((c, &data[start..at]));
                start = at;
                cur = Some(zero);
            }
            None => cur = Some(zero),
        }
    }
    if let Some(c) = cur {
        out.push((c, &data[start..]));
    }
    out
}

/// Receives the content of one regular file into a temporary file next to its target.
///
/// Writing past the declared size fails with [`FsError::TooLarge`]. Dropping the writer
/// without a successful [`FileWriter::commit`] removes the temporary file.
#[derive(Debug)]
pub struct FileWriter {
    file: Option<File>,
    tmp: Option<PathBuf>,
    target: PathBuf,
    meta: EntryMeta,
    written: u64,
    hasher: blake3::Hasher,
    committed: Arc<AtomicU64>,
    is_root: bool,
    durable: bool,
}

impl FileWriter {
    /// The entry being written.
    pub fn meta(&self) -> &EntryMeta {
        &self.meta
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data`, failing with [`FsError::TooLarge`] if the declared size would be exceeded.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), FsError> {
        let new = self.written.saturating_add(data.len() as u64);
        if new > self.meta.size {
            return Err(FsError::TooLarge {
                path: self.meta.path.clone(),
                size: new,
                limit: self.meta.size,
            });
        }
        let tmp = self.tmp.as_deref().unwrap_or(&self.target);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| FsError::io("write", tmp, io::Error::other("file already closed")))?;
        // The temporary file is new: a block of zeros becomes a hole (sparse files stay
        // sparse; `commit` sets the final length).
        for (zero, run) in runs(data) {
            if zero {
                file.seek(io::SeekFrom::Current(run.len() as i64))
                    .map_err(|e| FsError::io("seek in temporary file", tmp, e))?;
            } else {
                file.write_all(run)
                    .map_err(|e| FsError::io("write temporary file", tmp, e))?;
            }
        }
        self.hasher.update(data);
        self.written = new;
        Ok(())
    }

    /// Verifies size and blake3 hash, then sets owner, mode and mtime and renames the
    /// temporary file over the target. On any error the temporary file is removed.
    pub fn commit(mut self, expected_blake3: &[u8; 32]) -> Result<(), FsError> {
        if self.written != self.meta.size {
            return Err(FsError::SizeMismatch {
                path: self.meta.path.clone(),
                expected: self.meta.size,
                actual: self.written,
            });
        }
        let actual = self.hasher.finalize();
        let expected = blake3::Hash::from_bytes(*expected_blake3);
        if actual != expected {
            return Err(FsError::HashMismatch {
                path: self.meta.path.clone(),
                expected: expected.to_hex().to_string(),
                actual: actual.to_hex().to_string(),
            });
        }
        let (Some(file), Some(tmp)) = (self.file.take(), self.tmp.clone()) else {
            return Err(FsError::io(
                "commit",
                &self.target,
                io::Error::other("file already closed"),
            ));
        };
        // Holes at the end are not part of the file until its length says so.
        file.set_len(self.written)
            .map_err(|e| FsError::io("set length of", &tmp, e))?;
        // chown first: it clears setuid/setgid bits that chmod then sets.
        match std::os::unix::fs::fchown(&file, Some(self.meta.uid), Some(self.meta.gid)) {
            Ok(()) => {}
            Err(e) if !self.is_root && e.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(FsError::io("chown", &tmp, e)),
        }
        file.set_permissions(Permissions::from_mode(self.meta.mode & 0o7777))
            .map_err(|e| FsError::io("chmod", &tmp, e))?;
        file.set_times(fs::FileTimes::new().set_modified(time_from_ns(self.meta.mtime_ns)))
            .map_err(|e| FsError::io("set mtime of", &tmp, e))?;
        if self.durable {
            file.sync_all().map_err(|e| FsError::io("sync", &tmp, e))?;
        }
        drop(file);
        set_xattrs(&tmp, &self.meta.xattrs, self.is_root)?;
        fs::rename(&tmp, &self.target)
            .map_err(|e| FsError::io("rename temporary file over", &self.target, e))?;
        self.tmp = None;
        self.committed.fetch_add(self.written, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The FsError (e.g. TooLarge) is kept as the source; callers may downcast it.
        self.write_chunk(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.file = None;
        if let Some(tmp) = self.tmp.take() {
            // Best effort: the temporary file is ours and must not be left behind.
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod sparse_tests {
    use super::*;

    #[test]
    fn zero_blocks_become_runs_to_skip() {
        let mut d = vec![0u8; 3 * SPARSE_BLOCK + 10];
        d[SPARSE_BLOCK + 5] = 1;
        let r = runs(&d);
        let shape: Vec<(bool, usize)> = r.iter().map(|(z, s)| (*z, s.len())).collect();
        assert_eq!(
            shape,
            vec![
                (true, SPARSE_BLOCK),
                (false, SPARSE_BLOCK),
                (true, SPARSE_BLOCK),
                (false, 10)
            ]
        );
        assert_eq!(r.iter().map(|(_, s)| s.len()).sum::<usize>(), d.len());
        assert!(runs(&[]).is_empty());
        assert_eq!(runs(&[0u8; 100]), vec![(false, &[0u8; 100][..])]);
    }
}
