//! The agent's cgroup tree: each container's cgroup path and processes, what a discarded
//! container leaves behind (killed and removed), and the hierarchy's mount options.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Removes the lab's cgroups (`/ferry/...` under every v1 controller and the unified tree),
/// killing first whatever still runs in them.
pub fn remove_cgroups() {
    kill_cgroup_procs("/ferry");
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for e in rd.flatten() {
        let top = e.path().join("ferry");
        if top.is_dir() {
            remove_cgroup_tree(&top);
        }
    }
}

/// How long [`kill_cgroup_procs`] waits for killed processes to leave their cgroup.
const CGROUP_KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Kills every process in cgroup `rel` and below it, under every controller, and waits (at most
/// [`CGROUP_KILL_WAIT`]) until they are gone; returns how many it killed.
///
/// runc forgets a container whose restore it abandoned, or that a crashed agent left half made,
/// but the processes CRIU already created stay in the container's cgroup: the next container of
/// that name would count them as its own (and a dump would try to checkpoint them). Called where
/// a container is discarded and before one is created.
pub fn kill_cgroup_procs(rel: &str) -> usize {
    use nix::sys::signal::{kill, Signal};
    let rel = rel.trim_start_matches('/');
    let mut dirs = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            let d = e.path().join(rel);
            if d.is_dir() {
                dirs.push(d);
            }
        }
    }
    let v2 = PathBuf::from("/sys/fs/cgroup").join(rel);
    if v2.join("cgroup.procs").is_file() {
        dirs.push(v2);
    }
    let pids = |dirs: &[PathBuf]| {
        let mut all = std::collections::BTreeSet::new();
        for d in dirs {
            for f in walkdir_procs(d) {
                if let Ok(text) = std::fs::read_to_string(&f) {
                    all.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
        all
    };
    let found = pids(&dirs);
    if found.is_empty() {
        return 0;
    }
    tracing::warn!(cgroup = rel, pids = ?found, "killing processes left in a container's cgroup");
    let deadline = std::time::Instant::now() + CGROUP_KILL_WAIT;
    loop {
        for &pid in &pids(&dirs) {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        // A frozen process dies only once thawed.
        for d in &dirs {
            for f in walkdir_procs(d) {
                let dir = f.parent().unwrap_or(d);
                let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
                let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
            }
        }
        if pids(&dirs).is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    found.len()
}

/// The `cgroup.procs` files at and below cgroup directory `dir`.
fn walkdir_procs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let f = d.join("cgroup.procs");
        if f.is_file() {
            out.push(f);
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                // Cgroup directories are real directories; never follow a link.
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Every process of the container (host PIDs), from its cgroup.
/// The memory a checkpoint of container `name` carries: the anonymous and shared memory its
/// processes hold (`RssAnon` + `RssShmem`; pages shared between processes count once per
/// process, so this errs on the large side).
pub fn container_memory_bytes(host: &str, name: &str) -> Result<u64> {
    let mut total = 0u64;
    for pid in container_pids(host, name)? {
        // A process that exits meanwhile holds nothing.
        let Ok(st) = procfs::process::Process::new(pid).and_then(|p| p.status()) else {
            continue;
        };
        total += (st.rssanon.unwrap_or(0) + st.rssshmem.unwrap_or(0)) * 1024;
    }
    Ok(total)
}

pub fn container_pids(host: &str, name: &str) -> Result<Vec<i32>> {
    crate::cgroup::Cgroups::host()
        .procs(&cgroup_path(host, name))
        .with_context(|| format!("no cgroup for container {name:?}"))
}

/// The container's cgroup path (`cgroupsPath` in its config).
pub fn cgroup_path(host: &str, name: &str) -> String {
    format!("/ferry/{host}/{name}")
}

/// Makes moving a process between cgroups cheap: remounts a cgroup hierarchy with
/// `favordynmods` (Linux >= 6.0) unless one already has it. Without it, the first cgroup move
/// after a quiet spell waits for an RCU grace period (the kernel's threadgroup lock is taken
/// for writing): 7-25 ms measured here, paid by CRIU's restore, which moves the restored
/// container into its cgroups while it is frozen. The option is global to the kernel's lock,
/// so one hierarchy is enough; its cost is a slightly slower fork and exit on the host.
/// Returns the mount point remounted, `None` when one already had the option.
pub fn favor_cgroup_moves() -> Result<Option<String>> {
    let info = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .context("reading mountinfo")?;
    let mounts: Vec<CgroupMount> = info.iter().filter_map(CgroupMount::from_info).collect();
    if mounts
        .iter()
        .any(|m| m.super_options.iter().any(|o| o == "favordynmods"))
    {
        return Ok(None);
    }
    // The unified hierarchy if there is one, else the first v1 hierarchy.
    let m = mounts
        .iter()
        .find(|m| m.v2)
        .or_else(|| mounts.first())
        .context("no cgroup hierarchy is mounted")?;
    let mut data: Vec<&str> = m
        .super_options
        .iter()
        .map(String::as_str)
        .filter(|o| *o != "rw" && *o != "ro")
        .collect();
    data.push("favordynmods");
    nix::mount::mount(
        None::<&str>,
        m.point.as_str(),
        None::<&str>,
        m.flags | nix::mount::MsFlags::MS_REMOUNT,
        Some(data.join(",").as_str()),
    )
    .with_context(|| {
        format!(
            "remounting {} with favordynmods (needs Linux >= 6.0)",
            m.point
        )
    })?;
    Ok(Some(m.point.clone()))
}

/// A cgroup hierarchy's mount, from a line of mountinfo.
struct CgroupMount {
    point: String,
    v2: bool,
    /// The mount's own flags, which a remount must repeat.
    flags: nix::mount::MsFlags,
    super_options: Vec<String>,
}

impl CgroupMount {
    fn from_info(m: &procfs::process::MountInfo) -> Option<CgroupMount> {
        use nix::mount::MsFlags;
        if m.fs_type != "cgroup" && m.fs_type != "cgroup2" {
            return None;
        }
        let mut flags = MsFlags::empty();
        for o in m.mount_options.keys() {
            flags |= match o.as_str() {
                "ro" => MsFlags::MS_RDONLY,
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "noatime" => MsFlags::MS_NOATIME,
                "nodiratime" => MsFlags::MS_NODIRATIME,
                "relatime" => MsFlags::MS_RELATIME,
                "strictatime" => MsFlags::MS_STRICTATIME,
                _ => MsFlags::empty(),
            };
        }
        let mut super_options: Vec<String> = m
            .super_options
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k.clone(),
            })
            .collect();
        super_options.sort();
        Some(CgroupMount {
            // procfs leaves mountinfo's escapes in place (a space is `\040`).
            point: m.mount_point.to_string_lossy().replace("\\040", " "),
            v2: m.fs_type == "cgroup2",
            flags,
            super_options,
        })
    }
}

#[cfg(test)]
mod cgroup_mount_tests {
    use super::CgroupMount;
    use nix::mount::MsFlags;
    use procfs::process::MountInfo;

    #[test]
    fn a_remount_repeats_the_mounts_flags_and_super_options() {
        let parse = |l: &str| CgroupMount::from_info(&MountInfo::from_line(l).expect("a line"));
        let m = parse(
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot",
        )
        .expect("a cgroup2 mount");
        assert!(m.v2);
        assert_eq!(m.point, "/sys/fs/cgroup");
        assert_eq!(
            m.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME
        );
        assert_eq!(
            m.super_options,
            ["memory_recursiveprot", "nsdelegate", "rw"]
        );
        let v1 = parse("40 24 0:34 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu")
            .expect("a cgroup v1 mount");
        assert!(!v1.v2);
        // Escaped names are read back (mountinfo writes a space as \040).
        let spaced = parse("41 24 0:35 / /sys/fs/cgroup/a\\040b rw - cgroup cgroup rw,cpu")
            .expect("a cgroup v1 mount");
        assert_eq!(spaced.point, "/sys/fs/cgroup/a b");
        assert!(parse("22 1 0:21 / /proc rw - proc proc rw").is_none());
    }
}

#[cfg(test)]
mod cgroup_kill_tests {
    use std::path::PathBuf;
    use std::process::Command;

    /// A process left frozen in a container's cgroup (as a killed `runc restore` leaves CRIU's
    /// tasks) is killed, and the cgroup can then be removed. Needs root, as `scripts/test.sh`
    /// runs it: without root it fails rather than passing untested.
    #[test]
    fn leftover_processes_in_a_cgroup_are_killed_even_when_frozen() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates cgroups: run it as root (scripts/test.sh does)"
        );
        let rel = format!("/ferry-unit-{}/c", std::process::id());
        let v1 = PathBuf::from("/sys/fs/cgroup/freezer").join(rel.trim_start_matches('/'));
        let v2 = PathBuf::from("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
        let dir = if PathBuf::from("/sys/fs/cgroup/freezer").is_dir() {
            v1
        } else {
            v2
        };
        std::fs::create_dir_all(&dir).expect("creating a test cgroup");
        let mut child = Command::new("sleep").arg("60").spawn().expect("sleep");
        std::fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("moving in");
        if dir.join("freezer.state").exists() {
            std::fs::write(dir.join("freezer.state"), "FROZEN").expect("freezing");
        } else {
            std::fs::write(dir.join("cgroup.freeze"), "1").expect("freezing");
        }
        let killed = super::kill_cgroup_procs(&rel);
        let status = child.wait().expect("waiting for sleep");
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(dir.parent().unwrap());
        assert_eq!(killed, 1);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status:?}"
        );
        // Nothing there: nothing to do.
        assert_eq!(super::kill_cgroup_procs("/ferry-unit-absent"), 0);
    }
}
