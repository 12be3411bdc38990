//! What a container's processes hold that CRIU needs help with or cannot dump at all.
//!
//! **Objects CRIU cannot dump** ([`blockers`]) are found at the preflight, while the container
//! still runs: a zombie whose threads still run, a process traced by a debugger, a task that
//! stays in uninterruptible sleep, a
//! descriptor or a mapping of a kind CRIU does not know (io_uring, perf events, userfaultfd,
//! BPF programs, any other anonymous inode but the ones CRIU dumps). The migration is refused
//! with the process, the object and what to do, before anything is frozen. A dump that still
//! fails has its CRIU log translated into the same form ([`explain_criu_log`]).
//!
//! **Watches**: inotify and fanotify marks on inodes whose path CRIU cannot find by itself.
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

/// Anonymous-inode descriptors CRIU dumps (`files.c`, `dump_one_file`); any other is refused.
const CRIU_ANON_INODES: [&str; 7] = [
    "[eventfd]",
    "[eventpoll]",
    "inotify",
    "[fanotify]",
    "[signalfd]",
    "[timerfd]",
    "[pidfd]",
];

/// How often, and how far apart, a task must be seen in uninterruptible sleep to count: a task
/// in `D` for a moment (a disk read) is normal; one that stays there would hold the freeze.
const D_SAMPLES: u32 = 4;
const D_INTERVAL: Duration = Duration::from_millis(50);

/// Something a process of the container holds that CRIU cannot dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub pid: i32,
    /// The process's name (`/proc/PID/comm`).
    pub comm: String,
    /// What it holds.
    pub object: String,
    /// What the user can do about it.
    pub advice: &'static str,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process {} ({}) {}: {}",
            self.pid, self.comm, self.object, self.advice
        )
    }
}

/// Joins blockers into one message (the first five, then how many more).
pub fn describe(blockers: &[Blocker]) -> String {
    let mut parts: Vec<String> = blockers.iter().take(5).map(|b| b.to_string()).collect();
    if blockers.len() > 5 {
        parts.push(format!("and {} more", blockers.len() - 5));
    }
    parts.join("; ")
}

const ADVICE_ANON: &str =
    "CRIU cannot checkpoint this kind of object; stop the program from using \
    it (or restart it without it) and migrate again";
const ADVICE_ZOMBIE: &str = "CRIU cannot checkpoint a process whose main thread exited while \
    other threads run; wait until they exit or restart the program, then migrate again";
const ADVICE_TRACED: &str = "CRIU cannot checkpoint a process that a debugger or strace \
    traces; detach the tracer and migrate again";
const ADVICE_D: &str = "a task stuck in uninterruptible sleep (usually on a device or a network \
    file system) cannot be frozen; resolve what it waits for and migrate again";

fn comm(proc: &Path, pid: i32) -> String {
    std::fs::read_to_string(proc.join(format!("{pid}/comm")))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The state letter of `/proc/.../stat` (after the command name, which may hold spaces and
/// parentheses).
fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(") ")?.1.chars().next()
}

fn tasks(proc: &Path, pid: i32) -> Vec<i32> {
    std::fs::read_dir(proc.join(format!("{pid}/task")))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn task_state(proc: &Path, pid: i32, tid: i32) -> Option<char> {
    stat_state(&std::fs::read_to_string(proc.join(format!("{pid}/task/{tid}/stat"))).ok()?)
}

/// What `pids` (read under `proc`, `/proc` but for tests) hold that CRIU cannot dump. A process
/// that exits meanwhile holds nothing.
pub fn blockers(proc: &Path, pids: &[i32]) -> Vec<Blocker> {
    blockers_of(proc, pids, true)
}

/// [`blockers`]; `sleepers` false leaves out tasks in uninterruptible sleep (frozen tasks show
/// as such).
fn blockers_of(proc: &Path, pids: &[i32], sleepers: bool) -> Vec<Blocker> {
    let mut out = vec![];
    let mut maybe_d: Vec<(i32, i32)> = vec![];
    for &pid in pids {
        let blocker = |object: String, advice| Blocker {
            pid,
            comm: comm(proc, pid),
            object,
            advice,
        };
        let tids = tasks(proc, pid);
        let leader = std::fs::read_to_string(proc.join(format!("{pid}/stat")))
            .ok()
            .and_then(|s| stat_state(&s));
        if matches!(leader, Some('Z')) && tids.len() > 1 {
            out.push(blocker(
                format!(
                    "is a zombie whose {} other thread(s) still run",
                    tids.len() - 1
                ),
                ADVICE_ZOMBIE,
            ));
        }
        let tracer = std::fs::read_to_string(proc.join(format!("{pid}/status")))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("TracerPid:"))
                    .and_then(|v| v.trim().parse::<i32>().ok())
            })
            .unwrap_or(0);
        if tracer != 0 {
            out.push(blocker(
                format!("is traced by process {tracer} ({})", comm(proc, tracer)),
                ADVICE_TRACED,
            ));
        }
        for &tid in tids.iter().filter(|_| sleepers) {
            if task_state(proc, pid, tid) == Some('D') {
                maybe_d.push((pid, tid));
            }
        }
        if let Ok(fds) = std::fs::read_dir(proc.join(format!("{pid}/fd"))) {
            let mut fds: Vec<(i32, String)> = fds
                .flatten()
                .filter_map(|e| {
                    let fd = e.file_name().to_str()?.parse().ok()?;
                    let t = std::fs::read_link(e.path()).ok()?;
                    Some((fd, t.to_string_lossy().into_owned()))
                })
                .collect();
            fds.sort();
            for (fd, target) in fds {
                let Some(kind) = target.strip_prefix("anon_inode:") else {
                    continue;
                };
                if !CRIU_ANON_INODES.contains(&kind) {
                    out.push(blocker(
                        format!("holds descriptor {fd}, {}", anon_name(kind)),
                        ADVICE_ANON,
                    ));
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(proc.join(format!("{pid}/maps"))) {
            let mut seen = HashSet::new();
            for l in maps.lines() {
                let Some(kind) = l
                    .split_whitespace()
                    .nth(5)
                    .and_then(|p| p.strip_prefix("anon_inode:"))
                else {
                    continue;
                };
                if !CRIU_ANON_INODES.contains(&kind) && seen.insert(kind.to_string()) {
                    let object = format!("maps the memory of {}", anon_name(kind));
                    if !out
                        .iter()
                        .any(|b| b.pid == pid && b.object.contains(&anon_name(kind)))
                    {
                        out.push(blocker(object, ADVICE_ANON));
                    }
                }
            }
        }
    }
    // Tasks in uninterruptible sleep: counted only if they stay there.
    for _ in 1..D_SAMPLES {
        if maybe_d.is_empty() {
            break;
        }
        std::thread::sleep(D_INTERVAL);
        maybe_d.retain(|&(pid, tid)| task_state(proc, pid, tid) == Some('D'));
    }
    for (pid, tid) in maybe_d {
        let wchan = std::fs::read_to_string(proc.join(format!("{pid}/task/{tid}/wchan")))
            .ok()
            .filter(|w| !w.is_empty() && w != "0")
            .map(|w| format!(" in {w}"))
            .unwrap_or_default();
        out.push(Blocker {
            pid,
            comm: comm(proc, pid),
            object: format!(
                "has task {tid} in uninterruptible sleep{wchan} for {} ms and more",
                (D_INTERVAL * (D_SAMPLES - 1)).as_millis()
            ),
            advice: ADVICE_D,
        });
    }
    out
}

/// A readable name for an anonymous inode kind (`[io_uring]`, `[perf_event]`, ...).
fn anon_name(kind: &str) -> String {
    let plain = kind.trim_start_matches('[').trim_end_matches(']');
    let what = match plain {
        "io_uring" => "an io_uring instance",
        "perf_event" => "a perf event",
        "userfaultfd" => "a userfaultfd",
        "bpf-prog" => "a BPF program",
        "bpf-map" => "a BPF map",
        "bpf_link" | "bpf-link" => "a BPF link",
        "memfd_secret" | "secretmem" => "secret memory",
        _ if plain.starts_with("kvm") => "a KVM object",
        _ => "an object",
    };
    format!("{what} (anon_inode:{kind})")
}

/// Translates the error lines of a failed dump's CRIU log into statements that name the
/// process, the object and what to do (`None` when no line is one Ferry knows). Process names
/// are read under `proc` (`/proc`: a failed dump's processes are still there, frozen).
pub fn explain_criu_log(proc: &Path, log: &str) -> Option<String> {
    // The process a line is about: CRIU names it in this line or a later one ("(pid: N)").
    let pid_in = |l: &str| -> Option<i32> {
        let i = l
            .find("(pid: ")
            .map(|i| i + 6)
            .or_else(|| l.find("pid ").map(|i| i + 4))?;
        l[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error (")).collect();
    let pid = errors.iter().find_map(|l| pid_in(l));
    let who = |p: Option<i32>| match p {
        Some(p) => format!("process {p} ({})", comm(proc, p)),
        None => "a process of the container".into(),
    };
    let mut out = vec![];
    for l in &errors {
        if l.contains("Zombies with threads are not supported") {
            out.push(format!(
                "{} is a zombie whose other threads still run: {ADVICE_ZOMBIE}",
                who(pid)
            ));
        } else if let Some(rest) = l.split("Can't dump file ").nth(1) {
            // "Can't dump file 5 of that type [600] (anon [io_uring])"
            let fd = rest.split_whitespace().next().unwrap_or("?");
            let kind = rest
                .rsplit_once('(')
                .map(|(_, k)| k.trim_end_matches(')').trim())
                .unwrap_or("");
            let object = match kind.strip_prefix("anon ") {
                Some(a) => anon_name(a),
                None => format!("a file CRIU cannot dump ({kind})"),
            };
            out.push(format!(
                "{} holds descriptor {fd}, {object}: {ADVICE_ANON}",
                who(pid)
            ));
        } else if let Some(rest) = l.split("Unseizable non-zombie ").nth(1) {
            let p = rest.split_whitespace().next().and_then(|p| p.parse().ok());
            let state = rest
                .split("state ")
                .nth(1)
                .and_then(|s| s.chars().next())
                .unwrap_or('?');
            let advice = if state == 'D' {
                "CRIU could not seize it: a task in uninterruptible sleep (on a device or a \
                 network file system) or one frozen inside execve; migrate again, and if it \
                 persists resolve what the task waits for"
            } else {
                "it cannot be stopped for the dump; migrate again once it runs normally"
            };
            out.push(format!(
                "{} could not be stopped (state {state}): {advice}",
                who(p)
            ));
        } else if l.contains("Can't dump half of stream unix connection")
            || l.contains("Can't dump name-less external socket")
        {
            out.push(format!(
                "{} holds a UNIX socket connected to a process outside the container: the connection cannot move; close it or move both ends",
                who(pid)
            ));
        } else if l.contains("fsnotify") && l.contains("Can't dump that handle") {
            out.push(format!(
                "{} watches (inotify or fanotify) an inode whose path was not found beneath the container's root: remove the watch or keep the watched file inside the container's root",
                who(pid)
            ));
        } else if l.contains("Open files on overmounted mounts are not supported") {
            out.push(format!(
                "{} holds a file open on a mount that another mount hides: CRIU cannot dump it; close it and migrate again",
                who(pid)
            ));
        }
    }
    if out.is_empty() {
        // CRIU failed on a process without saying on what (a descriptor the kernel refuses to
        // pass to CRIU's parasite, say): what does that process hold that CRIU cannot dump?
        let named: Vec<i32> = errors.iter().filter_map(|l| pid_in(l)).collect();
        let found = blockers_of(proc, &named, false);
        if !found.is_empty() {
            return Some(describe(&found));
        }
    }
    out.dedup();
    (!out.is_empty()).then(|| out.join("; "))
}

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
    let Ok(mounts) = procfs::process::Process::new(pid).and_then(|p| p.mountinfo()) else {
        return vec![];
    };
    let mut out: Vec<String> = mounts
        .iter()
        .filter_map(|m| {
            let (maj, min) = m.majmin.split_once(':')?;
            let dev = (maj.parse().ok()?, min.parse().ok()?);
            let mp = m.mount_point.to_str()?;
            // Escaped names (`\040` for a space, left so by procfs) are rare in containers;
            // skipped.
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

    /// A fake `/proc` entry: `pid` with its stat state, tasks and descriptor links.
    fn fake_proc(
        proc: &Path,
        pid: i32,
        comm: &str,
        state: char,
        tasks: &[(i32, char)],
        fds: &[(i32, &str)],
    ) {
        let d = proc.join(pid.to_string());
        std::fs::create_dir_all(d.join("fd")).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        std::fs::write(d.join("stat"), format!("{pid} (a (b) c) {state} 1 2 3")).unwrap();
        let tracer = if comm == "traced" { 10 } else { 0 };
        std::fs::write(
            d.join("status"),
            format!("Name:\t{comm}\nTracerPid:\t{tracer}\n"),
        )
        .unwrap();
        for (tid, st) in tasks {
            let t = d.join(format!("task/{tid}"));
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("stat"), format!("{tid} (x) {st} 1")).unwrap();
            std::fs::write(t.join("wchan"), "fuse_wait_answer").unwrap();
        }
        for (fd, target) in fds {
            std::os::unix::fs::symlink(target, d.join(format!("fd/{fd}"))).unwrap();
        }
        std::fs::write(
            d.join("maps"),
            "7f00-7f01 rw-s 00000000 00:0f 1 anon_inode:[io_uring]\n",
        )
        .unwrap();
    }

    #[test]
    fn what_criu_cannot_dump_is_named_with_the_process_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path();
        fake_proc(
            proc,
            10,
            "server",
            'S',
            &[(10, 'S'), (11, 'S')],
            &[
                (0, "/dev/null"),
                (3, "anon_inode:[eventpoll]"),
                (4, "anon_inode:inotify"),
                (5, "anon_inode:[io_uring]"),
                (6, "anon_inode:[perf_event]"),
                (7, "socket:[123]"),
            ],
        );
        fake_proc(proc, 20, "zombie", 'Z', &[(20, 'Z'), (21, 'S')], &[]);
        fake_proc(proc, 30, "stuck", 'S', &[(30, 'S'), (31, 'D')], &[]);
        fake_proc(proc, 40, "plain", 'S', &[(40, 'R')], &[(1, "pipe:[5]")]);
        std::fs::write(proc.join("40/maps"), "").unwrap();
        fake_proc(proc, 50, "traced", 'S', &[(50, 't')], &[]);
        std::fs::write(proc.join("50/maps"), "").unwrap();
        let b = blockers(proc, &[10, 20, 30, 40, 50, 99]);
        let text: Vec<String> = b.iter().map(|b| b.to_string()).collect();
        assert_eq!(b.iter().filter(|b| b.pid == 10).count(), 2, "{text:#?}");
        assert!(text[0].starts_with("process 10 (server) holds descriptor 5, an io_uring instance (anon_inode:[io_uring])"), "{text:#?}");
        assert!(text[1].contains("descriptor 6, a perf event"), "{text:#?}");
        assert!(
            text[2]
                .starts_with("process 20 (zombie) is a zombie whose 1 other thread(s) still run"),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with(
                "process 30 (stuck) has task 31 in uninterruptible sleep in fuse_wait_answer"
            )),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("process 20 (zombie) maps the memory of an io_uring")),
            "{text:#?}"
        );
        assert_eq!(b.iter().filter(|b| b.pid == 40).count(), 0);
        assert!(
            text.iter().any(|t| t
                .starts_with("process 50 (traced) is traced by process 10 (server): CRIU cannot")),
            "{text:#?}"
        );
        assert!(!describe(&b).is_empty());
    }

    #[test]
    fn a_task_in_uninterruptible_sleep_for_a_moment_is_not_a_blocker() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().to_path_buf();
        fake_proc(&proc, 30, "disk", 'S', &[(30, 'D')], &[]);
        std::fs::write(proc.join("30/maps"), "").unwrap();
        let p = proc.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(D_INTERVAL / 2);
            std::fs::write(p.join("30/task/30/stat"), "30 (x) R 1").unwrap();
        });
        assert_eq!(blockers(&proc, &[30]), vec![]);
        waker.join().unwrap();
    }

    #[test]
    fn criu_log_errors_are_translated() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path();
        fake_proc(proc, 4144, "ferry-workload", 'S', &[], &[]);
        let log = "(00.003100) Error (criu/files-ext.c:94): Can't dump file 5 of that type [600] (anon [io_uring])\n\
                   (00.003147) Error (criu/cr-dump.c:1578): Dump files (pid: 4144) failed with -1\n\
                   (00.003568) Error (criu/cr-dump.c:2008): Dumping FAILED.\n";
        assert_eq!(
            explain_criu_log(proc, log).unwrap(),
            format!("process 4144 (ferry-workload) holds descriptor 5, an io_uring instance (anon_inode:[io_uring]): {ADVICE_ANON}")
        );
        let log = "(00.001) Error (criu/seize.c:882): Zombies with threads are not supported\n";
        assert!(explain_criu_log(proc, log)
            .unwrap()
            .starts_with("a process of the container is a zombie"));
        let log = "(00.001) Error (compel/src/lib/infect.c:262): Unseizable non-zombie 4144 found, state D, err 0/0\n";
        assert!(explain_criu_log(proc, log)
            .unwrap()
            .starts_with("process 4144 (ferry-workload) could not be stopped (state D)"));
        assert_eq!(
            explain_criu_log(proc, "(00.001) Error (x): something else\n"),
            None
        );
        // Without a line that says what: the process CRIU names is looked at.
        std::os::unix::fs::symlink("anon_inode:[io_uring]", proc.join("4144/fd/4")).unwrap();
        let log = "(00.004526) Error (compel/src/lib/infect-rpc.c:44): Message reply from daemon is trimmed (12/0)\n\
                   (00.004531) Error (criu/cr-dump.c:1578): Dump files (pid: 4144) failed with -1\n";
        assert!(explain_criu_log(proc, log)
            .unwrap()
            .starts_with("process 4144 (ferry-workload) holds descriptor 4, an io_uring instance"));
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
