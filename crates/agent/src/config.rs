//! The agent's configuration file (`ferry agent --config FILE`), JSON.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One agent's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name; also the DNS name in its certificate.
    pub host: String,
    /// Network namespace to enter at start (`/run/netns/NAME`); absent: stay where started.
    #[serde(default)]
    pub netns: Option<String>,
    /// Underlay address: QUIC listens here and the VXLAN device uses it as VTEP.
    pub underlay_ip: Ipv4Addr,
    /// QUIC port.
    pub quic_port: u16,
    /// Unix socket of the HTTP/JSON API (root only: for local use).
    pub api_socket: PathBuf,
    /// Also serve the API over TCP on this address (e.g. `10.0.0.5:7443`), HTTPS with mutual
    /// TLS: clients present an operator's certificate of the cluster's CA (`ferry pki
    /// operator`). Absent: the Unix socket only.
    #[serde(default)]
    pub api_listen: Option<std::net::SocketAddr>,
    /// Where bundles, images and state live.
    pub state_dir: PathBuf,
    /// Mutual TLS material.
    pub tls: TlsPaths,
    /// Overlay bridge in this host.
    pub bridge: String,
    /// VXLAN device in this host.
    pub vxlan: String,
    /// Overlay prefix length.
    pub overlay_prefix_len: u8,
    /// Overlay addresses this agent may allocate: first..=last.
    pub overlay_first: Ipv4Addr,
    /// Last allocatable overlay address.
    pub overlay_last: Ipv4Addr,
    /// Overlay addresses no container gets, even when asked for (hosts on the overlay that are
    /// not containers, such as the lab's client).
    #[serde(default)]
    pub reserved: Vec<Ipv4Addr>,
    /// The other agents.
    pub peers: Vec<Peer>,
    /// runc binary.
    #[serde(default = "default_runc")]
    pub runc: String,
    /// The workload binary copied into container root filesystems.
    pub workload_bin: PathBuf,
    /// Whether this host runs containers (the lab's client host does not).
    #[serde(default = "yes")]
    pub runs_containers: bool,
    /// `ferry-criu`, handed to runc as its CRIU (answers runc's version query itself).
    #[serde(default)]
    pub criu_frontend: Option<PathBuf>,
    /// Obey the fault-injection hooks of migrate requests (test labs only).
    #[serde(default)]
    pub allow_fault_hooks: bool,
    /// QUIC idle timeout in milliseconds: how fast a dead peer is noticed.
    #[serde(default = "default_idle")]
    pub quic_idle_timeout_ms: u64,
    /// Memory pages (by content hash) this host keeps for pre-copy and for containers that
    /// may come back, MiB (default: a quarter of the host's memory, at most 8 GiB). Pages no
    /// running migration needs are forgotten when it is full.
    #[serde(default = "default_page_store_mib")]
    pub page_store_mib: u64,
    /// Memory incoming migrations may count on, MiB (default: what the kernel reports
    /// available, `MemAvailable`, at each preflight). A pre-copy migration needs its
    /// container's memory twice here (the page store, then the running container); its job
    /// may grow the page store beyond `page_store_mib` for that while it runs.
    #[serde(default)]
    pub memory_budget_mib: Option<u64>,
    /// Accept lazy restores (pre-copy's default when CRIU and the kernel support them);
    /// without, sources send every page in the final dump.
    #[serde(default = "yes")]
    pub lazy_restore: bool,
    /// Keep CRIU's images and work files (`images/`, `work/` in the state directory) on a
    /// tmpfs the agent mounts at start: no disk file is created while a container is frozen.
    /// They then count against memory; the preflight refuses a checkpoint that does not fit.
    #[serde(default = "yes")]
    pub scratch_tmpfs: bool,
    /// CPU instruction-set flags this host does not offer containers moving here, though its
    /// CPU has them (`/proc/cpuinfo` names): a cluster can be held to a common baseline, and
    /// tests narrow a destination with it. Sources refuse to move here a container whose host
    /// has a flag this one lacks.
    #[serde(default)]
    pub hide_cpu_flags: Vec<String>,
    /// Remount a cgroup hierarchy with `favordynmods` at start (Linux >= 6.0): moving a
    /// process into a cgroup, which CRIU's restore does while the container is frozen, then
    /// costs microseconds instead of an RCU grace period (7-25 ms here). Global to the host;
    /// fork and exit get slightly slower.
    #[serde(default = "yes")]
    pub cgroup_favordynmods: bool,
    /// Buckets of the TCP and UDP socket hash tables of each container's network namespace
    /// (`net.ipv4.tcp_child_ehash_entries` and `udp_child_hash_entries` of the agent's own
    /// namespace, Linux >= 6.1; a power of two). CRIU walks the table a container sees at
    /// every dump: the host's is large (262144 TCP buckets here, about 5 ms per freeze).
    /// 0 leaves the kernel's default (namespaces share the host's tables).
    #[serde(default = "default_socket_hash_buckets")]
    pub netns_socket_hash_buckets: u32,
    /// What serves a lazy restore's page faults and fills its memory in: the agent itself
    /// (`agent`, the default: faults are copied from the page store directly, the rest in
    /// 4 MiB pieces, several times faster; see docs/design.md), or CRIU's `criu lazy-pages`
    /// daemon through a page-server socket (`criu`).
    #[serde(default)]
    pub lazy_daemon: LazyDaemon,
    /// The program run as each container's console shim, with `console-shim` as its first
    /// argument (`ferry_runtime::console`); default: this agent's own binary (`ferry`).
    #[serde(default)]
    pub console_shim: Option<PathBuf>,
    /// Size at which a container's log file is started again, the one before kept (so a
    /// container keeps up to twice this, plus what earlier hosts kept, up to 32 MiB).
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// Webhooks every migration from this host calls (`ferry_api::Hook`; a request adds its
    /// own): `pre_migrate` may veto it; `committed`, `rolled_back` and `finished` are told.
    #[serde(default)]
    pub hooks: Vec<ferry_api::Hook>,
    /// The cluster's state in etcd (`ferry_cluster::EtcdConfig`): host leases, container
    /// ownership, address leases, overlay routes (this agent programs its FDB from them) and
    /// jobs. Absent: containers and routes are kept by the agents themselves, each migration
    /// telling every peer directly.
    #[serde(default)]
    pub etcd: Option<ferry_cluster::EtcdConfig>,
    /// This host's own address on the overlay (on its bridge; outside the allocatable range):
    /// connections to published ports reach containers from it, so that answers come back
    /// through the host that took the connection. Absent: this host publishes no port.
    #[serde(default)]
    pub overlay_host_ip: Option<Ipv4Addr>,
    /// How long a host keeps forwarding a container's published ports after the container
    /// left it, seconds (default an hour).
    #[serde(default = "default_redirect_ttl")]
    pub redirect_ttl_s: u64,
}

fn default_redirect_ttl() -> u64 {
    3600
}

/// See [`AgentConfig::lazy_daemon`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LazyDaemon {
    /// The agent's own (`agent::lazyd`).
    #[default]
    Agent,
    /// `criu lazy-pages`.
    Criu,
}

impl std::fmt::Display for LazyDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LazyDaemon::Agent => "agent",
            LazyDaemon::Criu => "criu",
        })
    }
}

impl std::str::FromStr for LazyDaemon {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(LazyDaemon::Agent),
            "criu" => Ok(LazyDaemon::Criu),
            _ => Err(format!(
                "{s:?} is not a lazy-pages daemon: `agent` or `criu`"
            )),
        }
    }
}

fn default_log_max_bytes() -> u64 {
    ferry_runtime::console::DEFAULT_MAX_BYTES
}

fn default_socket_hash_buckets() -> u32 {
    4096
}

/// A quarter of the host's memory, at most 8 GiB (256 MiB when it cannot be read).
fn default_page_store_mib() -> u64 {
    match ferry_runtime::util::mem_total_bytes() {
        Some(b) => (b >> 20).div_ceil(4).clamp(256, 8192),
        None => 256,
    }
}

fn default_runc() -> String {
    "runc".into()
}
fn yes() -> bool {
    true
}
fn default_idle() -> u64 {
    5000
}

/// Paths of the CA certificate, this host's certificate and key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// CA certificate (PEM) that peers must chain to.
    pub ca: PathBuf,
    /// This host's certificate (PEM).
    pub cert: PathBuf,
    /// This host's key (PEM).
    pub key: PathBuf,
}

/// Another agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its host name.
    pub host: String,
    /// Its underlay address.
    pub underlay_ip: Ipv4Addr,
    /// Its QUIC port.
    pub quic_port: u16,
    /// Whether it runs containers (a migration target); a host that does not (the lab's
    /// client) is still a peer, but not offered as a target.
    #[serde(default = "default_true")]
    pub runs_containers: bool,
}

impl Peer {
    /// QUIC address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.underlay_ip, self.quic_port))
    }
}

impl AgentConfig {
    /// The TLS files of [`AgentConfig::tls`].
    pub fn tls_files(&self) -> transfer::TlsFiles {
        transfer::TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }

    /// Pages the page store may hold (`page_store_mib`).
    pub fn page_store_pages(&self) -> usize {
        (self.page_store_mib << 20) as usize / transfer::pages::PAGE
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read agent config {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("agent config {} is not valid", path.display()))
    }

    /// Finds a peer by name.
    pub fn peer(&self, host: &str) -> Option<&Peer> {
        self.peers.iter().find(|p| p.host == host)
    }
}

fn default_true() -> bool {
    true
}
