//! Walking a local tree into a [`Snapshot`] and comparing snapshots.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::{EntryKind, EntryMeta, FsError};

/// The metadata of every entry of a tree, keyed by relative path.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Entries keyed by their relative path (sorted, so parents precede children).
    pub entries: BTreeMap<String, EntryMeta>,
    /// `(st_dev, st_ino)` per path, used to detect hard links.
    inodes: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    /// The `(device, inode)` identity recorded for `path`, if it was snapshotted from disk.
    pub fn inode(&self, path: &str) -> Option<(u64, u64)> {
        self.inodes.get(path).copied()
    }
}

/// What changed between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// New or changed entries, parents before children.
    pub changed: Vec<EntryMeta>,
    /// Paths that no longer exist, children before parents.
    pub removed: Vec<String>,
}

fn mtime_ns(md: &fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// Walks `root` without following symlinks and records every entry below it
/// (`root` itself is not an entry). Sockets are skipped.
///
/// Regular files with more than one link are grouped by inode: the first path in
/// sorted order is a [`EntryKind::File`], later ones [`EntryKind::Hardlink`] to it.
pub fn snapshot(root: &Path) -> Result<Snapshot, FsError> {
    let md = fs::metadata(root).map_err(|e| FsError::io("stat snapshot root", root, e))?;
    if !md.is_dir() {
        return Err(FsError::io(
            "snapshot",
            root,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"),
        ));
    }
    let mut snap = Snapshot::default();
    let mut nlinks: HashMap<String, u64> = HashMap::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| FsError::io("read directory", &dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| FsError::io("read directory", &dir, e))?;
            let full = ent.path();
            let name = ent
                .file_name()
                .into_string()
                .map_err(|_| FsError::NonUtf8 { path: full.clone() })?;
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let md = fs::symlink_metadata(&full).map_err(|e| FsError::io("stat", &full, e))?;
            let ft = md.file_type();
            let mut size = 0;
            let kind = if ft.is_dir() {
                stack.push((full.clone(), rel.clone()));
                EntryKind::Dir
            } else if ft.is_file() {
                size = md.len();
                if md.nlink() > 1 {
                    nlinks.insert(rel.clone(), md.nlink());
                }
                EntryKind::File
            } else if ft.is_symlink() {
                let t = fs::read_link(&full).map_err(|e| FsError::io("read symlink", &full, e))?;
                let target = t
                    .into_os_string()
                    .into_string()
                    .map_err(|_| FsError::NonUtf8 { path: full.clone() })?;
                EntryKind::Symlink { target }
            } else if ft.is_fifo() {
                EntryKind::Fifo
            } else if ft.is_char_device() {
                EntryKind::CharDev { rdev: md.rdev() }
            } else if ft.is_block_device() {
                EntryKind::BlockDev { rdev: md.rdev() }
            } else {
                // Sockets cannot be recreated meaningfully from metadata.
                continue;
            };
            snap.inodes.insert(rel.clone(), (md.dev(), md.ino()));
            let xattrs = crate::sys::list_xattrs(&full)
                .map_err(|e| FsError::io("read extended attributes of", &full, e))?
                .into_iter()
                .map(|(name, value)| crate::Xattr {
                    name,
                    value: crate::hex(&value),
                })
                .collect();
            snap.entries.insert(
                rel.clone(),
                EntryMeta {
                    path: rel,
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime_ns: mtime_ns(&md),
                    size,
                    xattrs,
                },
            );
        }
    }
    // Hard links: first path (sorted) per inode stays a File, the others link to it.
    let mut first: HashMap<(u64, u64), String> = HashMap::new();
    for (path, meta) in snap.entries.iter_mut() {
        if !nlinks.contains_key(path) {
            continue;
        }
        let Some(id) = snap.inodes.get(path).copied() else {
            continue;
        };
        match first.get(&id) {
            Some(target) => {
                meta.kind = EntryKind::Hardlink {
                    target: target.clone(),
                };
                meta.size = 0;
                // Shared with the file.
                meta.xattrs.clear();
            }
            None => {
                first.insert(id, path.clone());
            }
        }
    }
    Ok(snap)
}

/// Computes what must be applied to a copy of `old` to obtain `new`.
///
/// An entry is changed when it is new or any of its fields differ. `diff(&Snapshot::default(), &s)`
/// is the full tree.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Diff {
    let changed = new
        .entries
        .values()
        .filter(|m| old.entries.get(&m.path) != Some(*m))
        .cloned()
        .collect();
    let removed = old
        .entries
        .keys()
        .rev()
        .filter(|p| !new.entries.contains_key(*p))
        .cloned()
        .collect();
    Diff { changed, removed }
}
