//! Trees: what every tree must satisfy before it is used, and a tree built from entries in
//! any order.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{invalid_tree, is_id, Id, TreeEntry, CHUNK_MAX, TREE_VERSION};
use crate::confine::check_syntax;
use crate::{EntryKind, EntryMeta, FsError, Limits};

/// A file tree: entries sorted by path, every parent before its children, every hard link
/// after the file it links to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    /// [`TREE_VERSION`].
    pub version: u32,
    /// The entries.
    pub entries: Vec<TreeEntry>,
}

impl Tree {
    /// The tree's id: blake3 of its canonical JSON (as stored).
    pub fn id(&self) -> Id {
        hex::encode(blake3::hash(&self.to_bytes()).as_bytes())
    }

    pub(super) fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Bytes of file content (hard links counted once).
    pub fn bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.meta.kind == EntryKind::File)
            .map(|e| e.meta.size)
            .sum()
    }

    /// Every distinct chunk the tree uses, with its length.
    pub fn chunks(&self) -> BTreeMap<&str, u32> {
        self.entries
            .iter()
            .flat_map(|e| e.chunks.iter())
            .map(|c| (c.hash.as_str(), c.len))
            .collect()
    }

    /// Checks everything a tree from anywhere must satisfy before it is used:
    /// - [`TREE_VERSION`], at most `limits.max_entries` entries;
    /// - every path relative and confined (no `..`, `.`, empty component, leading `/`, NUL),
    ///   at most `limits.max_path_len` bytes, paths strictly increasing;
    /// - modes of permission bits only (at most `0o7777`, as [`EntryMeta::mode`] says);
    /// - every parent an earlier directory entry;
    /// - a file's size the sum of its chunks, each at most [`CHUNK_MAX`], ids well-formed,
    ///   sizes within `limits.max_file_size` and `limits.max_total_bytes`;
    /// - a hard link pointing at an earlier file; only files have content;
    /// - at most [`MAX_XATTRS`] extended attributes per entry, values hex, at most
    ///   [`MAX_XATTR_VALUE`] bytes.
    pub fn validate(&self, limits: &Limits) -> Result<(), FsError> {
        if self.version != TREE_VERSION {
            return Err(invalid_tree(format!(
                "version {} (this Ferry reads version {TREE_VERSION})",
                self.version
            )));
        }
        if self.entries.len() as u64 > limits.max_entries {
            return Err(FsError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let mut dirs: HashSet<&str> = HashSet::from([""]);
        let mut files: HashSet<&str> = HashSet::new();
        let mut total = 0u64;
        let mut prev: Option<&str> = None;
        for e in &self.entries {
            let m = &e.meta;
            check_syntax(&m.path, limits.max_path_len)?;
            if let Some(p) = prev {
                if p >= m.path.as_str() {
                    return Err(invalid_tree(format!(
                        "entries out of order or repeated: {:?} after {p:?}",
                        m.path
                    )));
                }
            }
            prev = Some(&m.path);
            let parent = parent_of(&m.path);
            if !dirs.contains(parent) {
                return Err(invalid_tree(format!(
                    "{:?} comes before its directory {parent:?}, or that is not a directory",
                    m.path
                )));
            }
            if m.mode & !0o7777 != 0 {
                return Err(invalid_tree(format!(
                    "{:?}: mode {:o} is more than permission bits (at most 7777)",
                    m.path, m.mode
                )));
            }
            crate::check_xattrs(&m.path, &m.xattrs)?;
            match &m.kind {
                EntryKind::File => {
                    if m.size > limits.max_file_size {
                        return Err(FsError::TooLarge {
                            path: m.path.clone(),
                            size: m.size,
                            limit: limits.max_file_size,
                        });
                    }
                    total = total.saturating_add(m.size);
                    if total > limits.max_total_bytes {
                        return Err(FsError::TotalTooLarge {
                            path: m.path.clone(),
                            total,
                            limit: limits.max_total_bytes,
                        });
                    }
                    let mut sum = 0u64;
                    for c in &e.chunks {
                        if !is_id(&c.hash) || c.len == 0 || c.len > CHUNK_MAX {
                            return Err(invalid_tree(format!(
                                "{:?}: chunk {:?} of {} bytes is malformed",
                                m.path,
                                c.hash.chars().take(64).collect::<String>(),
                                c.len
                            )));
                        }
                        sum += u64::from(c.len);
                    }
                    if sum != m.size {
                        return Err(invalid_tree(format!(
                            "{:?}: size {} but its chunks hold {sum} bytes",
                            m.path, m.size
                        )));
                    }
                    if !e.blake3.as_deref().is_some_and(is_id) {
                        return Err(invalid_tree(format!(
                            "{:?}: a file needs its blake3",
                            m.path
                        )));
                    }
                    files.insert(&m.path);
                }
                kind => {
                    if !e.chunks.is_empty() || m.size != 0 || e.blake3.is_some() {
                        return Err(invalid_tree(format!(
                            "{:?}: only files have content",
                            m.path
                        )));
                    }
                    match kind {
                        EntryKind::Dir => {
                            dirs.insert(&m.path);
                        }
                        EntryKind::Hardlink { target } if !files.contains(target.as_str()) => {
                            return Err(FsError::BadHardlink {
                                path: m.path.clone(),
                                target: target.chars().take(300).collect(),
                                reason: "the target is not an earlier file of the tree",
                            });
                        }
                        EntryKind::Symlink { target }
                            if (target.is_empty()
                                || target.len() > limits.max_path_len
                                || target.contains('\0')) =>
                        {
                            return Err(invalid_tree(format!(
                                "{:?}: symlink target is empty, too long or has a NUL byte",
                                m.path
                            )));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// A directory a tree needs but no source listed: mode 0755, owned by root, mtime 0.
pub(crate) fn implicit_dir(path: &str) -> TreeEntry {
    TreeEntry {
        meta: EntryMeta {
            path: path.to_owned(),
            kind: EntryKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 0,
            xattrs: vec![],
        },
        chunks: vec![],
        blake3: None,
    }
}

/// Builds a [`Tree`] from entries in any order: sorts them, adds missing parent directories
/// (mode 0755, root, mtime 0), and makes the first path of every hard-link group the file.
pub fn tree_from_entries(entries: HashMap<String, TreeEntry>) -> Tree {
    let mut map: BTreeMap<String, TreeEntry> = entries.into_iter().collect();
    let paths: Vec<String> = map.keys().cloned().collect();
    for p in paths {
        let mut parent = parent_of(&p).to_owned();
        while !parent.is_empty() && !map.contains_key(&parent) {
            map.insert(parent.clone(), implicit_dir(&parent));
            parent = parent_of(&parent).to_owned();
        }
    }
    // Hard-link groups: the file and every link to it; the smallest path becomes the file.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, e) in &map {
        if let EntryKind::Hardlink { target } = &e.meta.kind {
            groups.entry(target.clone()).or_default().push(p.clone());
        }
    }
    for (file, links) in groups {
        let Some(first) = links.iter().min().cloned() else {
            continue;
        };
        if first > file || !map.contains_key(&file) {
            continue;
        }
        // `first` sorts before the file: swap roles.
        let Some(f) = map.get(&file).cloned() else {
            continue;
        };
        let mut new_file = f.clone();
        new_file.meta.path = first.clone();
        map.insert(first.clone(), new_file);
        for p in links.iter().chain(std::iter::once(&file)) {
            if *p == first {
                continue;
            }
            let mut l = f.clone();
            l.meta.path = p.clone();
            l.meta.kind = EntryKind::Hardlink {
                target: first.clone(),
            };
            l.meta.size = 0;
            l.meta.xattrs.clear();
            l.chunks.clear();
            l.blake3 = None;
            map.insert(p.clone(), l);
        }
    }
    Tree {
        version: TREE_VERSION,
        entries: map.into_values().collect(),
    }
}
