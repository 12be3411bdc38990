//! Where a container lives on one host: bundle, network namespace, veth, cgroup.

use std::path::{Path, PathBuf};

use ferry_api::ContainerSpec;

use crate::cgroup_tree::cgroup_path;
use crate::util::short_hash;

/// Prefix of the network namespaces Ferry makes (hosts of the lab, containers).
pub const NS_PREFIX: &str = "ferry-";

/// Where a container lives on one host.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The bundle directory (config.json, rootfs/).
    pub bundle: PathBuf,
    /// Its network namespace's name.
    pub netns: String,
    /// Host side of its veth pair.
    pub veth: String,
    /// An empty directory of the host, outside every container, bound read-only over masked
    /// directories (outside: a container cannot turn it into a link to somewhere else).
    pub empty: PathBuf,
    /// Its cgroup path under every controller ([`cgroup_path`]).
    pub cgroup: String,
}

impl Layout {
    /// Layout of `name` under `state_dir` on host `host`.
    pub fn new(state_dir: &Path, host: &str, name: &str) -> Self {
        Layout {
            bundle: state_dir.join("containers").join(name),
            netns: format!("{}{host}-c-{name}", NS_PREFIX),
            veth: format!("fv{}", short_hash(&format!("{host}/{name}"))),
            empty: state_dir.join("empty"),
            cgroup: cgroup_path(host, name),
        }
    }

    /// The root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    /// CRIU's configuration file for this container (`org.criu.config`).
    pub fn criu_conf(&self) -> PathBuf {
        self.bundle.join("criu.conf")
    }

    /// Where a restore here finds the container's `/dev/shm` when the dump left it out: a
    /// tmpfs of this host ([`mount_shm`]).
    pub fn shm(&self) -> PathBuf {
        self.bundle.join("shm")
    }

    /// The directory whose changes move with the container: its own upper layer when it runs
    /// from an image (the base moves through the image store), else its whole root.
    pub fn own_fs(&self, spec: &ContainerSpec) -> PathBuf {
        if spec.image.is_some() {
            self.upper()
        } else {
            self.rootfs()
        }
    }

    /// The container's own layer, when its root is an overlay on an image.
    pub fn upper(&self) -> PathBuf {
        self.bundle.join("upper")
    }

    /// Overlayfs's work directory (same filesystem as the upper layer).
    pub fn overlay_work(&self) -> PathBuf {
        self.bundle.join("overlay-work")
    }

    /// `/run/netns/...` path of the namespace.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}
