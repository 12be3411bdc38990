//! Walking a local tree into a [`Snapshot`] and comparing snapshots.
//!
//! The tree may be a running container's root, changing while it is walked: the walk opens
//! every directory beneath the root without following any symlink ([`RootDir`]), checks that
//! it is the directory it listed, and skips entries that vanish or change kind while it looks
//! at them (a later snapshot sees them as they are then).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::beneath::{is_changed_under_us, RootDir};
use crate::{EntryKind, EntryMeta, FsError};

/// Where an entry lives on disk and when its inode last changed: two entries with equal
/// [`EntryMeta`] but another identity (a file renamed over another, or rewritten and given
/// its old mtime back) are different content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ident {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_ctime` in nanoseconds (no process can set it back).
    pub ctime_ns: i64,
}

/// The metadata of every entry of a tree, keyed by relative path.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Entries keyed by their relative path (sorted, so parents precede children).
    pub entries: BTreeMap<String, EntryMeta>,
    /// Identity per path, used to detect hard links and replaced files.
    ids: BTreeMap<String, Ident>,
}

/// An mtime no file has: an entry given it always differs from what is on disk.
const UNSETTLED_MTIME: i64 = i64::MIN;

impl Snapshot {
    /// The `(device, inode)` identity recorded for `path`, if it was snapshotted from disk.
    pub fn inode(&self, path: &str) -> Option<(u64, u64)> {
        self.ids.get(path).map(|i| (i.dev, i.ino))
    }

    /// A digest of the tree as recorded: blake3 over every entry's path, kind (with a link's
    /// target or a device number), mode, owner, mtime, size and extended attributes, in path
    /// order. Two trees with the same digest have the same entries with the same metadata;
    /// file contents are not read (they are checked by their own hashes when they travel).
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        let mut field = |b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        for m in self.entries.values() {
            field(m.path.as_bytes());
            let (tag, detail): (&[u8], Vec<u8>) = match &m.kind {
                EntryKind::Dir => (b"d", vec![]),
                EntryKind::File => (b"f", vec![]),
                EntryKind::Symlink { target } => (b"l", target.as_bytes().to_vec()),
                EntryKind::Hardlink { target } => (b"h", target.as_bytes().to_vec()),
                EntryKind::Fifo => (b"p", vec![]),
                EntryKind::CharDev { rdev } => (b"c", rdev.to_le_bytes().to_vec()),
                EntryKind::BlockDev { rdev } => (b"b", rdev.to_le_bytes().to_vec()),
            };
            field(tag);
            field(&detail);
            for n in [
                u64::from(m.mode),
                u64::from(m.uid),
                u64::from(m.gid),
                m.size,
            ] {
                field(&n.to_le_bytes());
            }
            field(&m.mtime_ns.to_le_bytes());
            for x in &m.xattrs {
                field(x.name.as_bytes());
                field(x.value.as_bytes());
            }
        }
        h.finalize().to_hex().to_string()
    }

    /// Marks `path` as not known to be at the peer as recorded (it vanished, changed kind or
    /// changed while it was read): the next [`diff`] against this snapshot sends it again if
    /// it exists then, or removes it if it does not.
    pub fn unsettle(&mut self, path: &str) {
        if let Some(m) = self.entries.get_mut(path) {
            m.mtime_ns = UNSETTLED_MTIME;
            self.ids.remove(path);
        }
    }
}

/// What changed between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// New or changed entries, parents before children.
    pub changed: Vec<EntryMeta>,
    /// Paths that no longer exist, children before parents.
    pub removed: Vec<String>,
    /// `(device, inode)` of changed regular files as snapshotted: a reader checks that what
    /// it opens is what was snapshotted.
    ids: BTreeMap<String, (u64, u64)>,
}

impl Diff {
    /// A diff of the given entries and removals, without identities (nothing is checked when
    /// the files are read).
    pub fn new(changed: Vec<EntryMeta>, removed: Vec<String>) -> Self {
        Diff {
            changed,
            removed,
            ids: BTreeMap::new(),
        }
    }

    /// `(device, inode)` of a changed file as snapshotted, if known.
    pub fn identity(&self, path: &str) -> Option<(u64, u64)> {
        self.ids.get(path).copied()
    }
}

fn mtime_ns(md: &fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

fn ctime_ns(md: &fs::Metadata) -> i64 {
    md.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.ctime_nsec())
}

/// Walks `root` without following symlinks and records every entry below it
/// (`root` itself is not an entry). Sockets are skipped.
///
/// Every directory is opened beneath `root` with no symlink on the way ([`RootDir`]) and must
/// be the inode that was listed; an entry that vanishes or changes kind during the walk is left
/// out (with its subtree), as if the walk had happened a moment later.
///
/// Regular files with more than one link are grouped by inode: the first path in
/// sorted order is a [`EntryKind::File`], later ones [`EntryKind::Hardlink`] to it.
pub fn snapshot(root: &Path) -> Result<Snapshot, FsError> {
    let rd = RootDir::open(root)?;
    let mut snap = Snapshot::default();
    let mut nlinks: HashMap<String, u64> = HashMap::new();
    let mut stack: Vec<String> = vec![String::new()];
    while let Some(prefix) = stack.pop() {
        let dir = match rd.open_dir(&prefix) {
            Ok(d) => d,
            Err(e) if !prefix.is_empty() && is_changed_under_us(&e) => {
                snap.entries.remove(&prefix);
                snap.ids.remove(&prefix);
                continue;
            }
            Err(e) => return Err(FsError::io("open directory", rd.display_path(&prefix), e)),
        };
        if let Some(id) = snap.ids.get(&prefix) {
            if (id.dev, id.ino) != dir.identity() {
                // Replaced by another directory since it was listed: left for a later walk.
                snap.entries.remove(&prefix);
                snap.ids.remove(&prefix);
                continue;
            }
        }
        let dpath = dir.fd_path();
        let shown = || rd.display_path(&prefix);
        let listing = match fs::read_dir(&dpath) {
            Ok(l) => l,
            Err(e) if !prefix.is_empty() && is_changed_under_us(&e) => {
                snap.entries.remove(&prefix);
                snap.ids.remove(&prefix);
                continue;
            }
            Err(e) => return Err(FsError::io("read directory", shown(), e)),
        };
        for ent in listing {
            let ent = ent.map_err(|e| FsError::io("read directory", shown(), e))?;
            let name = ent.file_name();
            let full = dpath.join(&name);
            let name = name.into_string().map_err(|_| FsError::NonUtf8 {
                path: shown().join(ent.file_name()),
            })?;
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let md = match fs::symlink_metadata(&full) {
                Ok(md) => md,
                Err(e) if is_changed_under_us(&e) => continue,
                Err(e) => return Err(FsError::io("stat", rd.display_path(&rel), e)),
            };
            let ft = md.file_type();
            let mut size = 0;
            let kind = if ft.is_dir() {
                stack.push(rel.clone());
                EntryKind::Dir
            } else if ft.is_file() {
                size = md.len();
                if md.nlink() > 1 {
                    nlinks.insert(rel.clone(), md.nlink());
                }
                EntryKind::File
            } else if ft.is_symlink() {
                let t = match fs::read_link(&full) {
                    Ok(t) => t,
                    // Gone, or no longer a symlink (EINVAL).
                    Err(e) if is_changed_under_us(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                        continue
                    }
                    Err(e) => return Err(FsError::io("read symlink", rd.display_path(&rel), e)),
                };
                let target = t
                    .into_os_string()
                    .into_string()
                    .map_err(|_| FsError::NonUtf8 {
                        path: rd.display_path(&rel),
                    })?;
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
            let xattrs = match crate::sys::list_xattrs(&full) {
                Ok(x) => x,
                Err(e) if is_changed_under_us(&e) => {
                    if kind == EntryKind::Dir {
                        stack.pop();
                    }
                    continue;
                }
                Err(e) => {
                    return Err(FsError::io(
                        "read extended attributes of",
                        rd.display_path(&rel),
                        e,
                    ))
                }
            }
            .into_iter()
            .map(|(name, value)| crate::Xattr {
                name,
                value: hex::encode(&value),
            })
            .collect();
            snap.ids.insert(
                rel.clone(),
                Ident {
                    dev: md.dev(),
                    ino: md.ino(),
                    ctime_ns: ctime_ns(&md),
                },
            );
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
        let Some(id) = snap.ids.get(path).map(|i| (i.dev, i.ino)) else {
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
/// An entry is changed when it is new, any of its fields differ, or it is a regular file that
/// is another inode or whose inode changed (ctime) since `old`; a hard link is changed when
/// the file it links to is. `diff(&Snapshot::default(), &s)` is the full tree.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Diff {
    let replaced = |m: &EntryMeta| {
        m.kind == EntryKind::File
            && matches!(
                (old.ids.get(&m.path), new.ids.get(&m.path)),
                (Some(a), Some(b)) if a != b
            )
    };
    let mut changed_files: HashSet<&str> = HashSet::new();
    let mut changed = Vec::new();
    for m in new.entries.values() {
        let differs = old.entries.get(&m.path) != Some(m) || replaced(m);
        let relinked = matches!(&m.kind, EntryKind::Hardlink { target } if changed_files.contains(target.as_str()));
        if differs || relinked {
            if m.kind == EntryKind::File {
                changed_files.insert(&m.path);
            }
            changed.push(m.clone());
        }
    }
    let ids = changed
        .iter()
        .filter(|m| m.kind == EntryKind::File)
        .filter_map(|m| Some((m.path.clone(), new.inode(&m.path)?)))
        .collect();
    let removed = old
        .entries
        .keys()
        .rev()
        .filter(|p| !new.entries.contains_key(*p))
        .cloned()
        .collect();
    Diff {
        changed,
        removed,
        ids,
    }
}
