//! What a container's processes hold that CRIU needs help with: inotify and fanotify marks on
//! inodes whose path CRIU cannot find by itself.
//!
//! CRIU dumps a watch by the watched inode's file handle and, to restore it on another host, by
//! its path. It finds the path by opening the handle, which overlayfs (a container's root from an
//! image) refuses without `nfs_export`, and then by scanning a few well-known directories
//! (`/etc`, `/var/log`, ...) for the inode: a watch elsewhere in an overlay root fails the dump
//! ("fsnotify: Can't dump that handle"). The agent finds each watched inode's path itself,
//! beneath the container's root and while the container still runs, and hands the paths to
//! CRIU as `irmap-scan-path` lines of the dump's configuration: CRIU then records the path
//! and the restore opens it by name on the destination's copy of the root.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use shared_fs::RootDir;

/// At most this many directory entries are looked at per search for watched inodes.
const MAX_ENTRIES: usize = 2_000_000;
/// A search for watched inodes stops after this long.
const MAX_SEARCH: Duration = Duration::from_secs(20);

/// A watched inode: device (as `major:minor`) and inode number, as the kernel shows them in a
/// watch's `/proc/PID/fdinfo` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Inode {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

/// One inotify watch or fanotify inode mark of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub pid: i32,
    pub fd: i32,
    /// `inotify` or `fanotify`.
    pub kind: &'static str,
    pub inode: Inode,
}

/// Parses one line of an fsnotify descriptor's fdinfo (`inotify wd:1 ino:eb0f sdev:2c ...`,
/// `fanotify ino:... sdev:... mflags:...`); `None` for other lines, including fanotify mount
/// and filesystem marks (CRIU dumps those by mount id).
pub fn parse_fdinfo_line(line: &str) -> Option<(&'static str, Inode)> {
    let kind = if line.starts_with("inotify ") {
        "inotify"
    } else if line.starts_with("fanotify ") {
        "fanotify"
    } else {
        return None;
    };
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v, 16).ok())
    };
    let (ino, sdev) = (field("ino:")?, field("sdev:")?);
    // The kernel's own dev_t: 12 bits of major above 20 bits of minor.
    Some((
        kind,
        Inode {
            major: (sdev >> 20) as u32,
            minor: (sdev & 0xf_ffff) as u32,
            ino,
        },
    ))
}

/// The inotify watches and fanotify inode marks of `pids` (a process that exits meanwhile
/// holds none).
pub fn watches(pids: &[i32]) -> Vec<Watch> {
    let mut out = vec![];
    for &pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if t != "anon_inode:inotify" && t != "anon_inode:[fanotify]" {
                continue;
            }
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
                continue;
            };
            out.extend(
                info.lines()
                    .filter_map(parse_fdinfo_line)
                    .map(|(kind, inode)| Watch {
                        pid,
                        fd,
                        kind,
                        inode,
                    }),
            );
        }
    }
    out
}

/// Paths of watched inodes, kept between the searches of one migration so that the search
/// right before the freeze only looks for watches that are new.
#[derive(Debug, Default)]
pub struct WatchPaths {
    known: HashMap<Inode, String>,
    /// Watched inodes the last search did not find (the path is gone, or the inode lies on a
    /// file system CRIU resolves by itself).
    pub unresolved: Vec<Watch>,
}

impl WatchPaths {
    /// Finds the paths of the inodes that `pids` watch and that are not known yet, beneath the
    /// root of the process holding the watch.
    pub fn update(&mut self, pids: &[i32]) {
        let all = watches(pids);
        let mut missing: Vec<Watch> = all
            .iter()
            .filter(|w| !self.known.contains_key(&w.inode))
            .cloned()
            .collect();
        missing.dedup_by_key(|w| w.inode);
        if missing.is_empty() {
            self.unresolved.clear();
            return;
        }
        let t = Instant::now();
        let mut by_pid: HashMap<i32, HashSet<Inode>> = HashMap::new();
        for w in &missing {
            by_pid.entry(w.pid).or_default().insert(w.inode);
        }
        for (pid, wanted) in by_pid {
            let found = find_inodes(pid, &wanted);
            self.known.extend(found);
        }
        self.unresolved = missing
            .into_iter()
            .filter(|w| !self.known.contains_key(&w.inode))
            .collect();
        tracing::info!(
            watches = all.len(),
            known = self.known.len(),
            unresolved = self.unresolved.len(),
            ms = t.elapsed().as_secs_f64() * 1e3,
            "watched inodes looked up beneath the container's root"
        );
    }

    /// The dump configuration's lines for the known paths (`irmap-scan-path "PATH"`); a path
    /// that CRIU's configuration syntax cannot carry is left out (CRIU then fails on that watch
    /// and says so).
    pub fn criu_conf(&self) -> String {
        let mut paths: Vec<&String> = self.known.values().collect();
        paths.sort();
        paths.dedup();
        paths
            .into_iter()
            .filter(|p| !p.contains(['"', '\\', '\n', '#']))
            .map(|p| format!("irmap-scan-path \"{p}\"\n"))
            .collect()
    }
}

/// The mount points (relative to `pid`'s root, without the leading `/`) of the file systems
/// with a device in `devs`.
fn mount_points(pid: i32, devs: &HashSet<(u32, u32)>) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return vec![];
    };
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            let dev = (maj.parse().ok()?, min.parse().ok()?);
            // Escaped names (`\040` for a space) are rare in containers; skipped.
            let mp = f.get(4)?;
            (devs.contains(&dev) && !mp.contains('\\'))
                .then(|| mp.trim_start_matches('/').to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Searches beneath `pid`'s root, on the mounts of the wanted inodes' devices and without
/// crossing into other file systems or following any link, for the wanted inodes; returns the
/// paths found (absolute within the container).
fn find_inodes(pid: i32, wanted: &HashSet<Inode>) -> HashMap<Inode, String> {
    let root = match RootDir::open(Path::new(&format!("/proc/{pid}/root"))) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot open the process's root");
            return HashMap::new();
        }
    };
    let devs: HashSet<(u32, u32)> = wanted.iter().map(|i| (i.major, i.minor)).collect();
    find_in(&root, mount_points(pid, &devs), wanted)
}

/// Searches the trees at `starts` (relative to `root`) for `wanted`, staying on the wanted
/// devices; returns the paths found, absolute within `root`.
fn find_in(root: &RootDir, starts: Vec<String>, wanted: &HashSet<Inode>) -> HashMap<Inode, String> {
    let mut found = HashMap::new();
    let devs: HashSet<(u32, u32)> = wanted.iter().map(|i| (i.major, i.minor)).collect();
    let deadline = Instant::now() + MAX_SEARCH;
    let mut budget = MAX_ENTRIES;
    for mp in starts {
        let mut stack = vec![mp];
        while let Some(rel) = stack.pop() {
            if found.len() == wanted.len() || budget == 0 || Instant::now() > deadline {
                return found;
            }
            let Ok(dir) = root.open_dir(&rel) else {
                continue;
            };
            let dir_dev = dir.meta.dev();
            let here = Inode {
                major: nix::sys::stat::major(dir_dev) as u32,
                minor: nix::sys::stat::minor(dir_dev) as u32,
                ino: dir.meta.ino(),
            };
            if !devs.contains(&(here.major, here.minor)) {
                continue;
            }
            if wanted.contains(&here) {
                found.insert(here, format!("/{rel}"));
            }
            let Ok(entries) = std::fs::read_dir(dir.fd_path()) else {
                continue;
            };
            for e in entries.flatten() {
                budget = budget.saturating_sub(1);
                let Ok(md) = e.metadata() else { continue };
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                let child = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                if md.file_type().is_dir() {
                    if md.dev() == dir_dev {
                        stack.push(child);
                    }
                    continue;
                }
                let inode = Inode {
                    major: here.major,
                    minor: here.minor,
                    ino: md.ino(),
                };
                if md.dev() == dir_dev && wanted.contains(&inode) {
                    found.insert(inode, format!("/{child}"));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_lines_give_kernel_device_and_hex_inode() {
        let (k, i) = parse_fdinfo_line(
            "inotify wd:1 ino:962242 sdev:2c mask:308 ignored_mask:0 fhandle-bytes:20 fhandle-type:f8 f_handle:00",
        )
        .unwrap();
        assert_eq!(k, "inotify");
        assert_eq!(
            i,
            Inode {
                major: 0,
                minor: 0x2c,
                ino: 9_839_170
            }
        );
        let (k, i) = parse_fdinfo_line(
            "fanotify ino:1a sdev:800001 mflags:0 mask:8 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:1a00",
        )
        .unwrap();
        assert_eq!((k, i.major, i.minor, i.ino), ("fanotify", 8, 1, 0x1a));
        assert_eq!(
            parse_fdinfo_line("fanotify mnt_id:2a mflags:0 mask:8"),
            None
        );
        assert_eq!(parse_fdinfo_line("pos:\t0"), None);
        assert_eq!(parse_fdinfo_line("fanotify flags:0 event-flags:0"), None);
    }

    #[test]
    fn paths_crius_configuration_cannot_carry_are_left_out() {
        let mut w = WatchPaths::default();
        let i = |ino| Inode {
            major: 0,
            minor: 1,
            ino,
        };
        w.known.insert(i(1), "/srv/a dir".into());
        w.known.insert(i(2), "/srv/\"q\"".into());
        w.known.insert(i(3), "/etc".into());
        assert_eq!(
            w.criu_conf(),
            "irmap-scan-path \"/etc\"\nirmap-scan-path \"/srv/a dir\"\n"
        );
    }

    #[test]
    fn a_watched_inode_is_found_beneath_the_root_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("a/link")).unwrap();
        let inode = |p: &Path| {
            let md = std::fs::symlink_metadata(p).unwrap();
            Inode {
                major: nix::sys::stat::major(md.dev()) as u32,
                minor: nix::sys::stat::minor(md.dev()) as u32,
                ino: md.ino(),
            }
        };
        let (f, b, secret) = (
            inode(&dir.path().join("a/b/f")),
            inode(&dir.path().join("a/b")),
            inode(&outside.path().join("secret")),
        );
        let root = RootDir::open(dir.path()).unwrap();
        let found = find_in(&root, vec![String::new()], &HashSet::from([f, b, secret]));
        assert_eq!(found.get(&f).map(String::as_str), Some("/a/b/f"));
        assert_eq!(found.get(&b).map(String::as_str), Some("/a/b"));
        assert_eq!(found.get(&secret), None, "a link is not followed");
    }
}
