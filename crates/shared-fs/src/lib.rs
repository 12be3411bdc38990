//! File trees for Ferry: snapshots, diffs and confined, verified application of
//! entries received from a peer.
//!
//! * [`snapshot`] walks a local tree (never following symlinks) and records the
//!   metadata of every entry, detecting hard links.
//! * [`diff`] compares two snapshots and yields what must be sent.
//! * [`Applier`] applies entries received from an untrusted peer under a root
//!   directory, enforcing [`Limits`], path confinement ([`confine`]) and content
//!   hashes (blake3).
//!
//! * [`RootDir`] opens entries of a live tree beneath its root without following symlinks.
//!
//! No unsafe code: device nodes, times and extended attributes go through `nix` and `xattr`
//! (the private `sys` module), links beneath a root through `rustix`.
#![forbid(unsafe_code)]

mod apply;
pub mod batch;
pub mod beneath;
mod confine;
pub mod oci;
mod snapshot;
pub mod store;
mod sys;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use apply::{Applier, ApplyStats, FileWriter};
pub use beneath::RootDir;
pub use confine::{confine, MAX_COMPONENT_LEN, MAX_PATH_LEN};
pub use snapshot::{diff, snapshot, Diff, Ident, Snapshot};
pub use store::{ChunkRef, ImageRecord, Store, Tree, TreeEntry};

/// Resource caps enforced by [`Applier`] on entries received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum number of entries (of any kind) accepted by one [`Applier`].
    pub max_entries: u64,
    /// Maximum size in bytes of a single regular file.
    pub max_file_size: u64,
    /// Maximum sum of regular file sizes accepted by one [`Applier`].
    pub max_total_bytes: u64,
    /// Maximum length in bytes of a relative entry path.
    pub max_path_len: usize,
}

impl Default for Limits {
    /// 1 000 000 entries, 16 GiB per file, 64 GiB in total, 4096-byte paths.
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_file_size: 16 << 30,
            max_total_bytes: 64 << 30,
            max_path_len: MAX_PATH_LEN,
        }
    }
}

/// The kind of a tree entry, with what is needed to recreate it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file; its content follows separately.
    File,
    /// A symbolic link with its (uninterpreted) target.
    Symlink {
        /// The link target exactly as stored in the link.
        target: String,
    },
    /// A hard link to an earlier [`EntryKind::File`] entry of the same tree.
    Hardlink {
        /// Relative path of the earlier `File` entry.
        target: String,
    },
    /// A named pipe.
    Fifo,
    /// A character device.
    CharDev {
        /// Device number.
        rdev: u64,
    },
    /// A block device.
    BlockDev {
        /// Device number.
        rdev: u64,
    },
}

/// Metadata of one tree entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Relative, `/`-separated path without a leading `/`; never empty.
    pub path: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`), not the file type.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Content size in bytes for [`EntryKind::File`], 0 otherwise.
    pub size: u64,
    /// Extended attributes (user, trusted, security: e.g. file capabilities, or overlayfs's
    /// `trusted.overlay.opaque` on a container's own layer), sorted by name. Hard links share
    /// their file's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
}

/// An extended attribute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    /// Its name, e.g. `user.comment` or `security.capability`.
    pub name: String,
    /// Its value, hex-encoded.
    pub value: String,
}

/// Most extended attributes per entry.
pub const MAX_XATTRS: usize = 64;
/// Largest extended attribute value.
pub const MAX_XATTR_VALUE: usize = 64 << 10;

/// Checks a list of extended attributes received from anywhere: at most [`MAX_XATTRS`],
/// names 1-255 bytes without NUL, values hex of at most [`MAX_XATTR_VALUE`] bytes.
pub(crate) fn check_xattrs(path: &str, xattrs: &[Xattr]) -> Result<(), FsError> {
    let bad = |reason: &'static str| FsError::InvalidPath {
        path: path.chars().take(300).collect(),
        reason,
    };
    if xattrs.len() > MAX_XATTRS {
        return Err(bad("more than 64 extended attributes"));
    }
    for x in xattrs {
        if x.name.is_empty() || x.name.len() > 255 || x.name.contains('\0') {
            return Err(bad("malformed extended attribute name"));
        }
        if x.value.len() > 2 * MAX_XATTR_VALUE || hex::decode(&x.value).is_err() {
            return Err(bad("extended attribute value too large or not hex"));
        }
    }
    Ok(())
}

/// An I/O operation on a local path that failed: the `Io` error of this crate, and of the
/// transfer layer.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct PathIoError {
    /// What was attempted (e.g. "read directory").
    pub op: &'static str,
    /// The path it was attempted on.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

impl PathIoError {
    /// `op` on `path` failed with `source`.
    pub fn new(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PathIoError {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Errors of this crate. Each names the path or value that failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// An I/O operation failed.
    #[error(transparent)]
    Io(PathIoError),
    /// A local path is not valid UTF-8 and cannot be represented in an [`EntryMeta`].
    #[error("path {} is not valid UTF-8; Ferry only transfers UTF-8 names, rename it", path.display())]
    NonUtf8 {
        /// The offending path.
        path: PathBuf,
    },
    /// A relative path received from a peer is malformed or escapes the root.
    #[error("rejected path {path:?}: {reason}")]
    InvalidPath {
        /// The path as received (possibly truncated for display by the caller).
        path: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A parent component of a received path is a symlink; writing through it could escape the root.
    #[error("rejected path {path:?}: its parent {} is a symlink; refusing to write through it", component.display())]
    SymlinkInPath {
        /// The path as received.
        path: String,
        /// The existing symlink component.
        component: PathBuf,
    },
    /// More entries than [`Limits::max_entries`] were received.
    #[error("too many entries: the limit is {limit}; raise Limits::max_entries if the tree is legitimate")]
    TooManyEntries {
        /// The configured limit.
        limit: u64,
    },
    /// A file is larger than declared or than [`Limits::max_file_size`].
    #[error("file {path:?} is too large: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The file's relative path.
        path: String,
        /// The size reached or declared.
        size: u64,
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The sum of file sizes exceeds [`Limits::max_total_bytes`].
    #[error(
        "tree is too large: {total} bytes exceeds the total limit of {limit} bytes (at {path:?})"
    )]
    TotalTooLarge {
        /// The file that crossed the limit.
        path: String,
        /// The total that would have been reached.
        total: u64,
        /// The configured limit.
        limit: u64,
    },
    /// A file's content is shorter than its declared size.
    #[error(
        "file {path:?} has {actual} bytes but {expected} were declared; the transfer was cut short"
    )]
    SizeMismatch {
        /// The file's relative path.
        path: String,
        /// Declared size.
        expected: u64,
        /// Bytes actually received.
        actual: u64,
    },
    /// A file's content does not match the expected blake3 hash.
    #[error("file {path:?}: blake3 mismatch, expected {expected}, got {actual}; the data was corrupted or tampered with in transit")]
    HashMismatch {
        /// The file's relative path.
        path: String,
        /// Expected hash (hex).
        expected: String,
        /// Hash of the received content (hex).
        actual: String,
    },
    /// A chunk or tree whose content does not hash to its name: rejected before use.
    #[error("content of {expected} hashes to {actual}: corrupted or forged, rejected before use")]
    ChunkMismatch {
        /// The name it was stored or sent under.
        expected: String,
        /// The blake3 of its content.
        actual: String,
    },
    /// Something is not in the store.
    #[error("{what} {id} is not in the store")]
    Missing {
        /// `chunk`, `tree` or `image`.
        what: &'static str,
        /// Its id or name.
        id: String,
    },
    /// A tree breaks the rules of [`store::Tree::validate`].
    #[error("invalid tree: {reason}")]
    InvalidTree {
        /// What is wrong, with the entry.
        reason: String,
    },
    /// An image name with characters outside letters, digits and `._-:/@`.
    #[error("invalid image name {name:?}: use 1-255 letters, digits and ._-:/@, not starting with . or /")]
    InvalidImageName {
        /// The name as given.
        name: String,
    },
    /// An OCI image layout that cannot be imported.
    #[error("OCI image layout {}: {reason}", layout.display())]
    Oci {
        /// The layout's directory.
        layout: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A hard link entry points at something that is not an existing regular file under the root.
    #[error("hard link {path:?} -> {target:?} rejected: {reason}")]
    BadHardlink {
        /// The link's relative path.
        path: String,
        /// The requested target.
        target: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

impl FsError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FsError::Io(PathIoError::new(op, path, source))
    }
}
