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

/// Extended attributes of `path` (not following a final symlink), sorted by name.
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let c = cpath(path)?;
    let mut names = vec![0u8; 4096];
    let len = loop {
        // SAFETY: `c` is NUL-terminated and `names` is a writable buffer of the length given;
        // llistxattr writes at most that many bytes into it.
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if names.len() < (1 << 20) => names.resize(names.len() * 4, 0),
            // Filesystems without xattr support have none.
            Some(libc::ENOTSUP) => return Ok(vec![]),
            _ => return Err(e),
        }
    };
    let mut out = vec![];
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(name_str) = std::str::from_utf8(name) else {
            continue;
        };
        let cname = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "xattr name with NUL"))?;
        let mut value = vec![0u8; 256];
        let vlen = loop {
            // SAFETY: `c` and `cname` are NUL-terminated; `value` is a writable buffer of the
            // length given, which lgetxattr does not exceed.
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) if value.len() < (1 << 20) => value.resize(value.len() * 4, 0),
                _ => return Err(e),
            }
        };
        value.truncate(vlen);
        out.push((name_str.to_owned(), value));
    }
    out.sort();
    Ok(out)
}

/// Sets extended attribute `name` of `path` (not following a final symlink).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name with NUL"))?;
    // SAFETY: `c` and `cname` are NUL-terminated strings and `value` a readable buffer of the
    // length given, all living until the call returns; lsetxattr only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes extended attribute `name` of `path` (not following a final symlink).
pub(crate) fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let c = cpath(path)?;
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name with NUL"))?;
    // SAFETY: `c` and `cname` are NUL-terminated strings living until the call returns;
    // lremovexattr only reads them.
    let rc = unsafe { libc::lremovexattr(c.as_ptr(), cname.as_ptr()) };
    if rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::ENODATA) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
