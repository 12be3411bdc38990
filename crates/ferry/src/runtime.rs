//! runc, OCI bundles, root filesystems and container network namespaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use orchestrator_shim::api::ContainerSpec;
use serde::Deserialize;
use serde_json::json;

use crate::util::{ip, run, run_quiet, short_hash};

/// Drives one runc state root (one per agent, so the same container name can exist on two
/// hosts during a migration).
#[derive(Debug, Clone)]
pub struct Runc {
    bin: String,
    root: PathBuf,
}

/// `runc state` output.
#[derive(Debug, Clone, Deserialize)]
pub struct RuncState {
    /// `running`, `paused`, `stopped`, `created`.
    pub status: String,
    /// Init pid.
    pub pid: u32,
}

impl Runc {
    /// A runc using state root `root`.
    pub fn new(bin: &str, root: PathBuf) -> Self {
        Runc {
            bin: bin.into(),
            root,
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        // Containers get no host files as stdio: CRIU can dump /dev/null but not host files.
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        c
    }

    fn run(&self, op: &str, name: &str, mut c: Command) -> Result<()> {
        let out = c
            .output()
            .with_context(|| format!("could not start {} for `{op}`: install runc (scripts/setup.sh)", self.bin))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let excerpt: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            bail!(
                "runc {op} of container {name:?} failed ({}): {}",
                out.status,
                excerpt[excerpt.len().saturating_sub(4)..].join(" | ")
            );
        }
        Ok(())
    }

    /// Starts a container detached.
    pub fn start(&self, name: &str, bundle: &Path) -> Result<()> {
        let mut c = self.cmd();
        c.args(["run", "--detach", "--bundle"]).arg(bundle).arg(name);
        self.run("run", name, c)
    }

    /// Freezes and dumps with CRIU; the container stops existing as a process.
    pub fn checkpoint(&self, name: &str, images: &Path, work: &Path) -> Result<()> {
        let mut c = self.cmd();
        c.args(["checkpoint", "--tcp-established", "--image-path"])
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg(name);
        self.run("checkpoint", name, c)
    }

    /// Restores from images, detached.
    pub fn restore(&self, name: &str, bundle: &Path, images: &Path, work: &Path) -> Result<()> {
        let mut c = self.cmd();
        c.args(["restore", "--detach", "--tcp-established", "--bundle"])
            .arg(bundle)
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(work)
            .arg(name);
        self.run("restore", name, c)
    }

    /// Kills and deletes a container; absent is fine.
    pub fn delete_force(&self, name: &str) {
        let mut c = self.cmd();
        c.args(["delete", "--force", name]).stderr(Stdio::null());
        let _ = c.status();
    }

    /// The container's state, `None` if runc does not know it.
    pub fn state(&self, name: &str) -> Option<RuncState> {
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["state", name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Deletes every container of this root (lab teardown).
    pub fn delete_all(&self) {
        #[derive(Deserialize)]
        struct Item {
            id: String,
        }
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["list", "--format", "json"])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            let items: Vec<Item> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for i in items {
                self.delete_force(&i.id);
            }
        }
    }

    /// `runc --version` works.
    pub fn available(&self) -> Result<String> {
        let v = run(&self.bin, ["--version"])?;
        Ok(v.lines().next().unwrap_or_default().to_string())
    }
}

/// Where a container lives on one host.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The bundle directory (config.json, rootfs/).
    pub bundle: PathBuf,
    /// Its network namespace's name.
    pub netns: String,
    /// Host side of its veth pair.
    pub veth: String,
}

impl Layout {
    /// Layout of `name` under `state_dir` on host `host`.
    pub fn new(state_dir: &Path, host: &str, name: &str) -> Self {
        Layout {
            bundle: state_dir.join("containers").join(name),
            netns: format!("{}{host}-c-{name}", crate::lab::NS_PREFIX),
            veth: format!("fv{}", short_hash(&format!("{host}/{name}"))),
        }
    }

    /// The root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    /// `/run/netns/...` path of the namespace.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

/// Creates the container's network namespace on this host: veth into the overlay bridge, the
/// container's IP and MAC, IPv6 off (no stray traffic from a namespace that waits for a restore).
pub fn create_netns(l: &Layout, spec: &ContainerSpec, bridge: &str) -> Result<()> {
    create_netns_in(None, l, spec, bridge)
}

/// Like [`create_netns`], with the host side in namespace `host_ns` instead of the caller's.
pub fn create_netns_in(host_ns: Option<&str>, l: &Layout, spec: &ContainerSpec, bridge: &str) -> Result<()> {
    let ns = l.netns.as_str();
    let host_ip = |args: &[&str]| -> Result<String> {
        match host_ns {
            Some(h) => ip(["-n", h].iter().chain(args.iter())),
            None => ip(args),
        }
    };
    if let Some(h) = host_ns {
        run_quiet("ip", ["-n", h, "link", "del", l.veth.as_str()]);
    }
    delete_netns(l);
    ip(["netns", "add", ns])?;
    let r = (|| -> Result<()> {
        run("ip", ["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        run("ip", ["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        ip(["-n", ns, "link", "set", "lo", "up"])?;
        host_ip(&["link", "add", &l.veth, "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        host_ip(&["link", "set", &l.veth, "master", bridge, "up"])?;
        ip(["-n", ns, "link", "set", "eth0", "address", &spec.mac, "mtu", "1450"])?;
        ip(["-n", ns, "addr", "add", &format!("{}/{}", spec.ip, spec.prefix_len), "dev", "eth0"])?;
        ip(["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    })();
    if r.is_err() {
        delete_netns(l);
    }
    r.with_context(|| format!("preparing network namespace {ns} for {} ({})", spec.name, spec.ip))
}

/// Removes the container's namespace and veth; absent is fine.
pub fn delete_netns(l: &Layout) {
    run_quiet("ip", ["link", "del", l.veth.as_str()]);
    run_quiet("ip", ["netns", "del", l.netns.as_str()]);
}

/// Writes the OCI config for this host.
pub fn write_config(l: &Layout, spec: &ContainerSpec, host: &str) -> Result<()> {
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let cfg = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": ["PATH=/bin:/usr/bin", "HOME=/", format!("FERRY_CONTAINER={}", spec.name)],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": spec.name,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": format!("/ferry/{host}/{}", spec.name),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": l.netns_path()}
            ],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"]
        }
    });
    std::fs::create_dir_all(&l.bundle)?;
    std::fs::write(l.bundle.join("config.json"), serde_json::to_vec_pretty(&cfg)?)
        .with_context(|| format!("writing {}", l.bundle.join("config.json").display()))
}

/// Builds a busybox-based root filesystem holding Ferry's workload binary and its libraries.
pub fn build_rootfs(rootfs: &Path, workload: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox not found: install busybox-static (scripts/setup.sh)")?;
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "lib", "lib64", "usr/bin"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    copy_file(busybox, &rootfs.join("bin/busybox"))?;
    for applet in ["sh", "cat", "ls", "echo", "sleep", "nc", "ps", "hostname", "ip", "wc", "head"] {
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    copy_file(workload, &rootfs.join("bin/ferry-workload"))?;
    // The workload is dynamically linked against the C library: copy what ldd lists.
    let ldd = run("ldd", [workload])?;
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

/// Removes the lab's cgroups (`/ferry/...` under every v1 controller and the unified tree).
pub fn remove_cgroups() {
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

/// Free bytes on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Allocation helper: first address in `first..=last` not in `used`.
pub fn first_free(first: Ipv4Addr, last: Ipv4Addr, used: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    (u32::from(first)..=u32::from(last))
        .map(Ipv4Addr::from)
        .find(|a| !used.contains(a))
}
