//! A container's OCI bundle: its `config.json`, its CRIU configuration, its root filesystem
//! (copied or an overlay over an image) and the mounts around it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use ferry_api::ContainerSpec;
use serde_json::json;

use crate::cgroup_tree::cgroup_path;
use crate::layout::Layout;

/// CFS period of a container's CPU limit, µs (Docker's).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Writes the OCI config for this host.
/// `criu_base`: CRIU options for this container, written with the mounts a dump leaves to the
/// restore's host ([`criu_conf_text`]) to its own configuration file, which runc hands to
/// CRIU (`org.criu.config`); `None` leaves CRIU's defaults (the hand-made baseline uses that).
pub fn write_config(
    l: &Layout,
    spec: &ContainerSpec,
    host: &str,
    criu_base: Option<&str>,
) -> Result<()> {
    let criu_conf = match criu_base {
        Some(base) => {
            std::fs::create_dir_all(&l.bundle)?;
            let path = l.criu_conf();
            std::fs::write(&path, criu_conf_text(l, base, false))
                .with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    let criu_conf = criu_conf.as_deref();
    let p = &spec.process;
    let caps = &p.capabilities;
    let mut env = p.env.clone();
    env.push(format!("FERRY_CONTAINER={}", spec.name));
    // Docker 25+'s open-file limits: a soft limit that programs closing every descriptor can
    // walk, a hard one that lets servers raise it (no higher than the agent's own, which the
    // container's init cannot exceed without CAP_SYS_RESOURCE).
    let nofile_hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard.min(524_288))
        .max(1024);
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(m) = spec.resources.memory_bytes {
        resources["memory"] = json!({"limit": m});
    }
    if let Some(c) = spec.resources.cpu_millis {
        resources["cpu"] = json!({"quota": c * CPU_PERIOD_US / 1000, "period": CPU_PERIOD_US});
    }
    let mut annotations = serde_json::Map::new();
    if let Some(c) = criu_conf {
        annotations.insert("org.criu.config".into(), json!(c));
    }
    // /dev lives in the root filesystem (runc creates the device nodes there) rather than on a
    // tmpfs, and directories are masked with a read-only bind of an empty directory of the root
    // filesystem rather than a tmpfs: CRIU archives every tmpfs with tar at dump and unpacks it
    // at restore, about 5 ms each, all of it inside the freeze.
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    let empty = &l.empty;
    std::fs::create_dir_all(empty).with_context(|| format!("creating {}", empty.display()))?;
    for dir in MASKED_DIRS.iter().filter(|d| Path::new(d).is_dir()) {
        mounts.push(json!({"destination": dir, "type": "bind", "source": empty,
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
    }
    let cfg = json!({
        "ociVersion": "1.0.2",
        "annotations": annotations,
        "process": {
            "terminal": false,
            "user": {"uid": p.uid, "gid": p.gid, "additionalGids": p.additional_gids},
            "args": spec.args,
            "env": env,
            "cwd": p.cwd,
            // As Docker: the set bounds every process; a non-root user's programs get none
            // of it unless a file grants them (no ambient set).
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_hard, "soft": 1024}],
            "noNewPrivileges": false
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.name,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroup_path(host, &spec.name),
            "resources": resources,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": l.netns_path()}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/scsi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"]
        }
    });
    std::fs::create_dir_all(&l.bundle)?;
    std::fs::write(
        l.bundle.join("config.json"),
        serde_json::to_vec_pretty(&cfg)?,
    )
    .with_context(|| format!("writing {}", l.bundle.join("config.json").display()))
}

/// Directories runc hides from containers with a read-only tmpfs (`maskedPaths`; binds inside
/// /proc are refused). A dump leaves them out (`external`) and a restore binds the host's empty
/// directory there: otherwise CRIU archives each with tar at dump and unpacks it at restore,
/// about 3 ms each way, all of it in the freeze.
const MASKED_TMPFS: [&str; 2] = ["/proc/acpi", "/proc/scsi"];

/// The key under which a dump leaves an empty `/dev/shm` to the restore's host.
const SHM_KEY: &str = "ferry-shm";

/// The `external` key of a masked directory.
fn masked_key(dir: &str) -> String {
    format!("ferry-masked{}", dir.replace('/', "-"))
}

/// The text of a container's CRIU configuration file: `base`, then the mounts a dump leaves out
/// (`external mnt[MOUNTPOINT]:KEY`) and where a restore on this host finds them
/// (`external mnt[KEY]:PATH`; CRIU ignores a mapping no mount uses). With `shm_empty` (true
/// only while the container is frozen and its `/dev/shm` holds nothing, [`empty_shm`]) the
/// dump leaves `/dev/shm` out too, to be restored as this host's [`Layout::shm`] tmpfs.
pub fn criu_conf_text(l: &Layout, base: &str, shm_empty: bool) -> String {
    let mut t = base.to_string();
    if !t.is_empty() && !t.ends_with('\n') {
        t.push('\n');
    }
    for dir in MASKED_TMPFS {
        let key = masked_key(dir);
        t.push_str(&format!("external mnt[{dir}]:{key}\n"));
        t.push_str(&format!("external mnt[{key}]:{}\n", l.empty.display()));
    }
    t.push_str(&format!("external mnt[{SHM_KEY}]:{}\n", l.shm().display()));
    if shm_empty {
        t.push_str(&format!("external mnt[/dev/shm]:{SHM_KEY}\n"));
    }
    t
}

/// Whether the frozen container `name` (runc state under `runc_root`) has a `/dev/shm` that a
/// dump may leave out: one tmpfs mounted there in its mount namespace, and nothing in it. Read
/// beneath the container's root without following its links. Any doubt answers no (CRIU then
/// archives it as usual).
fn empty_shm(runc_root: &Path, name: &str) -> bool {
    let pid = std::fs::read(runc_root.join(name).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["init_process_pid"].as_u64());
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) else {
        return false;
    };
    let Ok(mounts) = procfs::process::Process::new(pid).and_then(|p| p.mountinfo()) else {
        return false;
    };
    let at_shm: Vec<_> = mounts
        .iter()
        .filter(|m| m.mount_point == Path::new("/dev/shm"))
        .collect();
    if at_shm.len() != 1 || at_shm[0].fs_type != "tmpfs" {
        return false;
    }
    let Ok(root) = shared_fs::RootDir::open(Path::new(&format!("/proc/{pid}/root"))) else {
        return false;
    };
    let Ok(dir) = root.open_dir("dev/shm") else {
        return false;
    };
    std::fs::read_dir(dir.fd_path()).is_ok_and(|mut entries| entries.next().is_none())
}

/// Rewrites the frozen container's CRIU configuration for its dump ([`criu_conf_text`]), in
/// place (a new file would cost a disk create in the freeze). Returns whether `/dev/shm` is
/// left out.
pub(crate) fn write_dump_conf(
    l: &Layout,
    runc_root: &Path,
    name: &str,
    base: &str,
) -> Result<bool> {
    let path = l.criu_conf();
    let mut f = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        // A container made before it had one of its own: CRIU reads the host's.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let shm_empty = empty_shm(runc_root, name);
    f.set_len(0)
        .with_context(|| format!("truncating {}", path.display()))?;
    std::io::Write::write_all(&mut f, criu_conf_text(l, base, shm_empty).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(shm_empty)
}

/// Mounts the tmpfs a restore here binds at the container's `/dev/shm` when its dump left that
/// out: as runc mounts it (1777, 64 MiB, nosuid, nodev, noexec). Idempotent.
pub fn mount_shm(l: &Layout) -> Result<()> {
    let dir = l.shm();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if is_mount_point(&dir) {
        return Ok(());
    }
    nix::mount::mount(
        Some("shm"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dir.display()))
}

/// Directories hidden from containers with a bind mount (runc refuses binds inside /proc, so
/// /proc/acpi and /proc/scsi stay in maskedPaths, on a tmpfs).
const MASKED_DIRS: [&str; 1] = ["/sys/firmware"];

/// Creates, in a new container's root `rootfs`, the mount points of the binds that lie inside
/// other mounts (`sys/firmware` inside sysfs). At the container's start runc finds them inside
/// those mounts; a `runc restore` started ahead creates them in the root itself, so they
/// must exist there from the start: otherwise the destination's root would differ from the
/// source's (see [`root_digest`]). A root whose path to them is not plain directories (a
/// symlink from an image) is left alone.
pub fn make_mount_points(rootfs: &Path) -> Result<()> {
    for dir in MASKED_DIRS {
        let mut p = rootfs.to_path_buf();
        for part in dir.trim_start_matches('/').split('/') {
            p.push(part);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&p)
                        .with_context(|| format!("creating mount point {}", p.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("inspecting {}", p.display())),
            }
        }
    }
    Ok(())
}

/// Whether every mount point [`make_mount_points`] makes is a directory in `rootfs` (a root
/// of a container made before it was: a `runc restore` started ahead would change it).
pub fn has_mount_points(rootfs: &Path) -> bool {
    MASKED_DIRS.iter().all(|dir| {
        let mut p = rootfs.to_path_buf();
        dir.trim_start_matches('/').split('/').all(|part| {
            p.push(part);
            std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
        })
    })
}

/// The digest of a container's root as both ends of a migration see it: without the bind
/// mount points (a `runc restore` started ahead mounts over them, which changes how they
/// look but not what the container sees).
pub fn root_digest(snap: &mut shared_fs::Snapshot) -> String {
    for dir in MASKED_DIRS {
        snap.entries.remove(dir.trim_start_matches('/'));
    }
    snap.digest()
}

/// Builds a busybox-based root filesystem holding Ferry's workload binary and its libraries.
pub fn build_rootfs(rootfs: &Path, workload: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox not found: install busybox-static (scripts/setup.sh)")?;
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "root", "lib", "lib64", "usr/bin",
    ] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    copy_file(busybox, &rootfs.join("bin/busybox"))?;
    for applet in [
        "sh", "cat", "ls", "echo", "sleep", "nc", "ps", "hostname", "ip", "wc", "head",
    ] {
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    copy_file(workload, &rootfs.join("bin/ferry-workload"))?;
    // The workload is dynamically linked against the C library: copy what ldd lists.
    // Resolve libraries the way the container's loader will: without the caller's
    // LD_LIBRARY_PATH (a build tool's, for instance).
    let out = Command::new("ldd")
        .arg(workload)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD")
        .output()
        .context("running ldd: install libc-bin")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            workload.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let ldd = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in ldd.lines() {
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            let rel = path.trim_start_matches('/');
            let dst = rootfs.join(rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            copy_file(Path::new(path), &dst)?;
        }
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let real = std::fs::canonicalize(src)?;
    std::fs::copy(&real, dst)
        .with_context(|| format!("copying {} to {}", real.display(), dst.display()))?;
    Ok(())
}

/// Mounts the container's root as an overlay: `lower` (an image's materialized tree, read-only,
/// shared) under the container's own upper layer.
pub fn mount_overlay_rootfs(l: &Layout, lower: &Path) -> Result<()> {
    for d in [l.upper(), l.overlay_work(), l.rootfs()] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        l.upper().display(),
        l.overlay_work().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &l.rootfs(),
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting the overlay root at {} ({opts})",
            l.rootfs().display()
        )
    })
}

/// Mount points of this mount namespace (`/proc/self/mountinfo`, field 5).
fn mount_points() -> Vec<PathBuf> {
    procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map(|m| m.into_iter().map(|m| m.mount_point).collect())
        .unwrap_or_default()
}

/// Whether `path` is a mount point.
fn is_mount_point(path: &Path) -> bool {
    mount_points().iter().any(|m| m == path)
}

/// Removes a container's bundle, unmounting its overlay root and its `/dev/shm` tmpfs first
/// (removing through the mount would only fill the upper layer with whiteouts and leave the
/// mount behind).
pub fn remove_bundle(l: &Layout) {
    for dir in [l.rootfs(), l.shm()] {
        while is_mount_point(&dir) {
            if let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(path = %dir.display(), error = %e, "unmounting failed");
                return;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&l.bundle);
}

/// Unmounts every mount at or under `dir` (containers' overlay roots), deepest first.
pub fn unmount_under(dir: &Path) {
    // `starts_with` on paths compares whole components: /a/bc is not under /a/b.
    let mut points: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "unmount failed");
        }
    }
}

/// Whether `dir` lies on a tmpfs.
pub fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Puts `dir` on a tmpfs of its own (mode 0700) unless it already lies on one. CRIU creates and
/// removes a handful of image files per process in every dump and restore, all inside the frozen
/// window; on a disk file system each new file costs about a millisecond here (ext4 looks up
/// recently deleted inodes on create), which made a container of 120 processes spend most of its
/// freeze creating files. A directory that already holds files is left on disk (they would be
/// hidden under the mount). Returns whether `dir` is on a tmpfs now.
pub fn ensure_tmpfs(dir: &Path) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if on_tmpfs(dir) {
        return Ok(true);
    }
    let occupied = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_some();
    if occupied {
        tracing::warn!(dir = %dir.display(), "not empty: left on disk instead of a tmpfs");
        return Ok(false);
    }
    nix::mount::mount(
        Some("ferry-scratch"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dir.display()))?;
    Ok(true)
}
