//! Reading a tree that its owner may change while it is read, such as a running container's
//! root: every open stays beneath the root and follows no symlink at all
//! (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so a container that swaps a file
//! or a directory for a symlink to a host path between a snapshot and a read cannot make the
//! reader (root on the host) open that host path.
//!
//! What is opened is first opened as `O_PATH` (no side effects, even for a device node or a
//! FIFO swapped in), checked (type, device, inode), and only then reopened for reading through
//! the descriptor itself (`/proc/self/fd/N`, which names that very inode).

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::FsError;

/// How many times an `openat2` that lost a race with a concurrent rename (`EAGAIN`) is retried.
const RACE_RETRIES: usize = 32;

/// A directory whose entries are opened beneath it, never through a symlink.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// An entry opened without side effects (`O_PATH`), with its metadata (not following a final
/// symlink).
#[derive(Debug)]
pub struct Opened {
    fd: OwnedFd,
    /// The entry's metadata, read from the opened descriptor.
    pub meta: Metadata,
}

impl Opened {
    /// `(device, inode)` of what was opened.
    pub fn identity(&self) -> (u64, u64) {
        (self.meta.dev(), self.meta.ino())
    }

    /// A path that names exactly the opened inode (valid while `self` lives). Acting on a
    /// name below it (`fd_path().join(name)`) resolves that name inside the opened directory.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Opens the (already checked) regular file for reading.
    pub fn reopen_for_reading(&self) -> io::Result<File> {
        if !self.meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let fd = rustix::fs::open(
            self.fd_path(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let f = File::from(fd);
        let md = f.metadata()?;
        if (md.dev(), md.ino()) != self.identity() {
            return Err(io::Error::other("the reopened file is another inode"));
        }
        Ok(f)
    }
}

impl RootDir {
    /// Opens `path` (a trusted local directory: the caller chose it) as a root.
    pub fn open(path: &Path) -> Result<Self, FsError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| FsError::io("open tree root", path, e.into()))?;
        Ok(RootDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The root's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `rel` under the root, for messages only (never opened by name).
    pub fn display_path(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Opens `rel` (relative, `/`-separated) as `O_PATH` beneath the root without following
    /// any symlink, including a final one (which is opened as the link itself). `""` opens the
    /// root.
    pub fn open_path(&self, rel: &str) -> io::Result<Opened> {
        let rel = if rel.is_empty() { "." } else { rel };
        let mut tries = 0;
        let fd = loop {
            match rustix::fs::openat2(
                self.fd.as_fd(),
                rel,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => break fd,
                Err(rustix::io::Errno::AGAIN) if tries < RACE_RETRIES => tries += 1,
                Err(e) => return Err(e.into()),
            }
        };
        let meta = File::from(fd.try_clone()?).metadata()?;
        Ok(Opened { fd, meta })
    }

    /// Opens the directory `rel` beneath the root for listing; fails unless it is a directory.
    pub fn open_dir(&self, rel: &str) -> io::Result<Opened> {
        let o = self.open_path(rel)?;
        if !o.meta.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(o)
    }
}

/// Whether an error means that an entry vanished or changed kind under the reader (it is
/// gone, a component is no longer a directory, or it became a symlink): normal in a live tree.
pub fn is_changed_under_us(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP) | Some(libc::EXDEV)
    )
}
