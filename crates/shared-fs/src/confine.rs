//! Confinement of relative paths received from a peer to a root directory.

use std::io;
use std::path::{Path, PathBuf};

use crate::FsError;

/// Longest accepted path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;
/// Longest accepted relative path, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Resolves `rel` (a relative, `/`-separated path received from a peer) under `root`.
///
/// Rejects empty paths, absolute paths, `.`, `..` and empty components, NUL bytes,
/// components longer than [`MAX_COMPONENT_LEN`], paths longer than [`MAX_PATH_LEN`],
/// and paths whose existing *parent* components under `root` include a symlink
/// (the final component may be a symlink: callers act on it without following it).
pub fn confine(root: &Path, rel: &str) -> Result<PathBuf, FsError> {
    confine_with(root, rel, MAX_PATH_LEN)
}

fn invalid(rel: &str, reason: &'static str) -> FsError {
    // Keep error messages bounded even for hostile input.
    let shown: String = rel.chars().take(300).collect();
    FsError::InvalidPath {
        path: shown,
        reason,
    }
}

/// Checks the syntax of `rel` only (no filesystem access).
pub(crate) fn check_syntax(rel: &str, max_len: usize) -> Result<(), FsError> {
    if rel.is_empty() {
        return Err(invalid(rel, "empty path"));
    }
    if rel.len() > max_len {
        return Err(invalid(rel, "path too long"));
    }
    if rel.contains('\0') {
        return Err(invalid(rel, "contains a NUL byte"));
    }
    if rel.starts_with('/') {
        return Err(invalid(rel, "absolute path"));
    }
    for comp in rel.split('/') {
        match comp {
            "" => return Err(invalid(rel, "empty component (\"//\" or trailing \"/\")")),
            "." => return Err(invalid(rel, "\".\" component")),
            ".." => return Err(invalid(rel, "\"..\" component")),
            c if c.len() > MAX_COMPONENT_LEN => {
                return Err(invalid(rel, "component longer than 255 bytes"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// [`confine`] with an explicit maximum path length.
pub(crate) fn confine_with(root: &Path, rel: &str, max_len: usize) -> Result<PathBuf, FsError> {
    check_syntax(rel, max_len)?;
    let mut cur = root.to_path_buf();
    let mut comps = rel.split('/').peekable();
    let mut exists = true;
    while let Some(comp) = comps.next() {
        cur.push(comp);
        if comps.peek().is_none() || !exists {
            continue;
        }
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(FsError::SymlinkInPath {
                    path: rel.chars().take(300).collect(),
                    component: cur,
                })
            }
            Ok(_) => {}
            Err(e) if is_missing(&e) => exists = false,
            Err(e) => return Err(FsError::io("inspect path component", cur, e)),
        }
    }
    Ok(cur)
}

/// NotFound, or ENOTDIR (a parent is not a directory, so the path cannot exist).
pub(crate) fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}
