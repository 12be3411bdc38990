//! The system calls std lacks, through maintained crates: device nodes and times (`nix`),
//! extended attributes (`xattr`); none follows a final symlink.

use std::io;
use std::path::Path;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

fn io_err(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Creates a FIFO or device node. `mode` includes the file type bits (`S_IFIFO`, ...).
pub(crate) fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let bits = nix::libc::mode_t::try_from(mode)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mode out of range"))?;
    let kind = SFlag::from_bits_truncate(bits & SFlag::S_IFMT.bits());
    let perm = Mode::from_bits_truncate(bits & !SFlag::S_IFMT.bits());
    nix::sys::stat::mknod(path, kind, perm, rdev).map_err(io_err)
}

/// Sets the modification time of `path` without following a final symlink; atime is left alone.
pub(crate) fn set_mtime_nofollow(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let sec = mtime_ns.div_euclid(1_000_000_000);
    let nsec = mtime_ns.rem_euclid(1_000_000_000);
    let mtime = TimeSpec::new(sec, nsec);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io_err)
}

/// Whether the process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Extended attributes of `path` (not following a final symlink), sorted by name; names that
/// are not UTF-8 are left out, and a file system without extended attributes has none. The
/// kernel bounds both the list and each value (64 KiB).
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = vec![];
    for name in names {
        let Some(name_str) = name.to_str() else {
            continue;
        };
        // Removed meanwhile: gone from the list too.
        if let Some(value) = xattr::get(path, &name)? {
            out.push((name_str.to_owned(), value));
        }
    }
    out.sort();
    Ok(out)
}

/// Sets extended attribute `name` of `path` (not following a final symlink).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    xattr::set(path, name, value)
}

/// Removes extended attribute `name` of `path` (not following a final symlink); absent is
/// fine.
pub(crate) fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    match xattr::remove(path, name) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODATA) => Ok(()),
        r => r,
    }
}
