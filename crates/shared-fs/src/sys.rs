//! The only unsafe code of the crate: thin wrappers over libc calls that std lacks.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Creates a FIFO or device node. `mode` includes the file type bits (`S_IFIFO`, ...).
pub(crate) fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cpath(path)?;
    let mode = libc::mode_t::try_from(mode)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mode out of range"))?;
    let dev = libc::dev_t::try_from(rdev)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "rdev out of range"))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; mknod
    // reads it and has no other memory effects.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the modification time of `path` without following a final symlink; atime is left alone.
pub(crate) fn set_mtime_nofollow(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let c = cpath(path)?;
    let sec = mtime_ns.div_euclid(1_000_000_000);
    let nsec = mtime_ns.rem_euclid(1_000_000_000);
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as libc::c_long,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated string and `times` is an array of two
    // initialised timespec values, both living until the call returns; utimensat
    // only reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}
