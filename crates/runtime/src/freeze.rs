//! Freezing a container for its dump, and thawing it when the dump fails.

use std::path::Path;

use anyhow::{Context, Result};

use crate::bundle::write_dump_conf;
use crate::cgroup_tree::{cgroup_path, container_pids};
use crate::layout::Layout;
use crate::netns::set_veth;

/// Freezes container `name` for its final dump: its cgroup frozen, its veth down (the copy left
/// in place must stay silent, see [`set_veth`]) and its CRIU configuration rewritten for the
/// dump ([`write_dump_conf`], `criu_base` first). A failure after the freeze thaws it. Returns
/// whether `/dev/shm` is left out of the dump.
pub fn freeze_for_dump(
    host: &str,
    name: &str,
    l: &Layout,
    runc_root: &Path,
    criu_base: &str,
) -> Result<bool> {
    freeze(host, name)?;
    let r = set_veth(l, false).and_then(|()| write_dump_conf(l, runc_root, name, criu_base));
    match &r {
        Ok(shm_left_out) => tracing::info!(container = %name, shm_left_out, "frozen for the dump"),
        Err(_) => thaw(host, name),
    }
    r
}

/// How often a freeze that caught a process inside `execve` is undone and tried again.
const EXEC_FREEZE_RETRIES: u32 = 50;

/// Freezes container `name`'s cgroup. A freeze that catches a process starting another is
/// undone and tried again after a millisecond (a process that starts programs, through
/// `posix_spawn` or `vfork` and `exec`, is caught there now and then): a thread frozen in a
/// `vfork` waits for its child's `exec` and cannot reach the stop CRIU asks for once CRIU holds
/// the child, and a process frozen inside `execve` holds its credentials lock; either way CRIU
/// waits for its timeout in the freeze and fails ("Unseizable non-zombie N found, state D").
pub fn freeze(host: &str, name: &str) -> Result<()> {
    for attempt in 0.. {
        freeze_once(host, name)?;
        let pids = container_pids(host, name).unwrap_or_default();
        let execing: Vec<i32> = pids.into_iter().filter(|p| spawning(*p)).collect();
        if execing.is_empty() {
            if attempt > 0 {
                tracing::info!(container = %name, attempts = attempt + 1, "frozen while no process starts another");
            }
            return Ok(());
        }
        if attempt >= EXEC_FREEZE_RETRIES {
            tracing::warn!(container = %name, pids = ?execing, "still frozen while starting a process; CRIU may not seize them");
            return Ok(());
        }
        thaw(host, name);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    unreachable!()
}

/// Whether a thread of process `pid` is inside `execve`, `execveat`, `vfork`, `clone` or
/// `clone3` (`/proc/PID/task/TID/syscall`; a process that vanished is not).
fn spawning(pid: i32) -> bool {
    const CALLS: [libc::c_long; 5] = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_vfork,
        libc::SYS_clone,
        libc::SYS_clone3,
    ];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("syscall")).is_ok_and(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<libc::c_long>().ok())
                .is_some_and(|n| CALLS.contains(&n))
        })
    })
}

/// Freezes the container's cgroup and waits until it is frozen ([`crate::cgroup::Cgroups::freeze`]).
///
/// CRIU freezes a running container itself but checks the freezer only every 100 ms; a cgroup
/// that is already frozen when CRIU starts costs no such wait.
fn freeze_once(host: &str, name: &str) -> Result<()> {
    crate::cgroup::Cgroups::host()
        .freeze(&cgroup_path(host, name))
        .with_context(|| format!("freezing container {name:?}"))
}

/// Whether the container's cgroup exists and is not frozen (nor freezing): its processes run.
pub fn runs_thawed(host: &str, name: &str) -> bool {
    crate::cgroup::Cgroups::host().runs_thawed(&cgroup_path(host, name))
}

/// Thaws the container's cgroup (after a failed dump); absent is fine.
pub fn thaw(host: &str, name: &str) {
    crate::cgroup::Cgroups::host().thaw(&cgroup_path(host, name))
}
