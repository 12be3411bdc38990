//! `ferry lab`: a multi-host lab on one machine. Hosts are network namespaces joined by an
//! underlay bridge (itself in a namespace of its own); each host has an overlay bridge and a VXLAN
//! device whose forwarding entries Ferry programs over netlink. Nothing is addressed outside these
//! namespaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_net::sdn::{self, Fdb, Mac};
use serde::{Deserialize, Serialize};

use ferry_agent::client::Client;
use ferry_agent::config::{AgentConfig, Peer, TlsPaths};
use ferry_runtime::util::{ip, run_quiet};

/// Default directory of the lab's runtime files.
pub const LAB_DIR: &str = "/run/ferry/lab";
/// Namespace holding the underlay bridge.
const UNDERLAY_NS: &str = "ferry-ul";
/// Prefix of every namespace the lab creates.
pub use ferry_runtime::layout::NS_PREFIX;
const QUIC_PORT: u16 = 7700;
/// Port of the agents' API over TCP with mutual TLS in the lab (`api_listen`).
pub const API_PORT: u16 = 7443;
/// The lab's cluster file: how a machine with an operator's certificate reaches every agent
/// over TCP (`ferry --cluster`), written by `lab up`.
pub const CLUSTER_FILE: &str = "cluster.json";
/// Overlay address of the lab's client host.
pub const CLIENT_OVERLAY_IP: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 250);
const OVERLAY_MTU: &str = "1450";

/// What `lab up` created, read by the CLI to find agents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    /// Hosts, in order; the last one is `client`.
    pub hosts: Vec<LabHost>,
    /// Directory of the lab's files.
    pub dir: PathBuf,
    /// Rate limit of every host's underlay link, when shaped.
    #[serde(default)]
    pub link_rate: Option<LinkRate>,
    /// The lab's etcd cluster (`lab up --etcd`): its members, which the agents use.
    #[serde(default)]
    pub etcd: Vec<EtcdMember>,
    /// Reach agents over TCP with these TLS files (an operator's), not through their Unix
    /// sockets: set when read from a cluster file ([`Cluster`]).
    #[serde(skip)]
    pub remote: Option<transfer::TlsFiles>,
}

/// A cluster as a machine away from its hosts sees it: the operator's certificate and each
/// agent's API address (`ferry --cluster FILE`, or `FERRY_CLUSTER`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The cluster's CA certificate (PEM).
    pub ca: PathBuf,
    /// The operator's certificate (PEM, `ferry pki operator`).
    pub cert: PathBuf,
    /// The operator's key (PEM).
    pub key: PathBuf,
    /// Every host, with the address of its agent's API (its `api_listen`).
    pub hosts: Vec<ClusterHost>,
}

/// One host of a [`Cluster`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterHost {
    /// The host's name (its certificate's DNS name).
    pub name: String,
    /// Where its agent's API listens.
    pub api: std::net::SocketAddr,
    /// Whether it runs containers.
    #[serde(default = "yes")]
    pub runs_containers: bool,
}

fn yes() -> bool {
    true
}

static CLUSTER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`Lab::load`] read the cluster file `path` instead of a local lab.
pub fn use_cluster(path: PathBuf) {
    let _ = CLUSTER.set(path);
}

impl Cluster {
    /// Reads a cluster file.
    pub fn load(path: &Path) -> Result<Cluster> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the cluster file {}", path.display()))?;
        let c: Cluster = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid cluster file", path.display()))?;
        if c.hosts.is_empty() {
            bail!("the cluster file {} lists no host", path.display());
        }
        Ok(c)
    }

    /// The cluster as the CLI's [`Lab`]: clients over TCP with mutual TLS.
    pub fn into_lab(self, file: &Path) -> Lab {
        Lab {
            hosts: self
                .hosts
                .iter()
                .map(|h| LabHost {
                    name: h.name.clone(),
                    netns: String::new(),
                    underlay_ip: match h.api.ip() {
                        std::net::IpAddr::V4(v4) => v4,
                        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
                    },
                    api_socket: PathBuf::new(),
                    api: Some(h.api),
                    log: PathBuf::new(),
                    runs_containers: h.runs_containers,
                })
                .collect(),
            dir: file.parent().unwrap_or(Path::new("/")).to_path_buf(),
            etcd: vec![],
            link_rate: None,
            remote: Some(transfer::TlsFiles {
                ca: self.ca,
                cert: self.cert,
                key: self.key,
            }),
        }
    }
}

/// A link rate for `tc`'s token bucket filter, in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRate(pub u64);

impl std::str::FromStr for LinkRate {
    type Err = String;

    /// Parses `tc`-style rates: `1gbit`, `100mbit`, `500kbit`, `2.5gbit`, `1000000bit`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let units = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)];
        let bad = || {
            format!(
                "link rate {s:?} is not understood: give a number with gbit, mbit, kbit or bit, \
                 for example 1gbit"
            )
        };
        let (num, mult) = units
            .iter()
            .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
            .ok_or_else(bad)?;
        let v: f64 = num.trim().parse().map_err(|_| bad())?;
        let bits = v * mult;
        if !bits.is_finite() || !(100e3..=100e9).contains(&bits) {
            return Err(format!(
                "link rate {s:?} is out of range: between 100kbit and 100gbit"
            ));
        }
        Ok(LinkRate(bits as u64))
    }
}

impl std::fmt::Display for LinkRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1_000_000_000) {
            write!(f, "{}gbit", b / 1_000_000_000)
        } else if b.is_multiple_of(1_000_000) {
            write!(f, "{}mbit", b / 1_000_000)
        } else if b.is_multiple_of(1000) {
            write!(f, "{}kbit", b / 1000)
        } else {
            write!(f, "{b}bit")
        }
    }
}

impl LinkRate {
    /// Bytes per second.
    pub fn bytes_per_s(self) -> f64 {
        self.0 as f64 / 8.0
    }
}

/// Shapes (or, with `None`, unshapes) every host's underlay link in both directions with a
/// token bucket filter: the host's own port for what it sends, the underlay bridge's port
/// towards it for what it receives. The bucket holds 2 ms at the rate (at least 64 KiB), the
/// queue 20 ms, like a cloud NIC's shallow buffer.
pub fn set_link_rate(lab: &mut Lab, rate: Option<LinkRate>) -> Result<()> {
    for h in &lab.hosts {
        let port = format!("ul-{}", h.name);
        for (ns, dev) in [(h.netns.as_str(), "ul0"), (UNDERLAY_NS, port.as_str())] {
            match rate {
                Some(r) => {
                    let burst = ((r.bytes_per_s() * 0.002) as u64).max(64 * 1024);
                    ferry_runtime::util::run(
                        "tc",
                        [
                            "-n",
                            ns,
                            "qdisc",
                            "replace",
                            "dev",
                            dev,
                            "root",
                            "tbf",
                            "rate",
                            &format!("{}bit", r.0),
                            "burst",
                            &burst.to_string(),
                            "latency",
                            "20ms",
                        ],
                    )
                    .with_context(|| format!("shaping {dev} in {ns} to {r}"))?;
                }
                None => {
                    run_quiet("tc", ["-n", ns, "qdisc", "del", "dev", dev, "root"]);
                }
            }
        }
    }
    lab.link_rate = rate;
    std::fs::write(lab.dir.join("lab.json"), serde_json::to_vec_pretty(&*lab)?)?;
    Ok(())
}

/// One member of the lab's etcd cluster, in a namespace of its own on the underlay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdMember {
    /// Its name (`etcd1`...).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its underlay address (clients on port 2379, peers on 2380, both with mutual TLS).
    pub ip: Ipv4Addr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// Its pid file.
    pub pid_file: PathBuf,
}

impl EtcdMember {
    /// Its client URL.
    pub fn client_url(&self) -> String {
        format!("https://{}:{ETCD_CLIENT_PORT}", self.ip)
    }

    fn peer_url(&self) -> String {
        format!("https://{}:{ETCD_PEER_PORT}", self.ip)
    }
}

/// Members of the lab's etcd cluster.
const ETCD_MEMBERS: usize = 3;
/// etcd's client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// Starts one etcd member of the lab (again, after a test stopped it: same data directory).
pub fn start_etcd_member(lab: &Lab, m: &EtcdMember) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let pki = lab.dir.join("pki");
    let cluster: Vec<String> = lab
        .etcd
        .iter()
        .map(|o| format!("{}={}", o.name, o.peer_url()))
        .collect();
    let state = if m.data_dir.join("member").is_dir() {
        "existing"
    } else {
        "new"
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&m.log)?;
    let cert = pki.join(format!("{}.pem", m.name));
    let key = pki.join(format!("{}.key", m.name));
    let ca = pki.join("ca.pem");
    let child = Command::new("ip")
        .args(["netns", "exec", &m.netns, "etcd"])
        .arg("--name")
        .arg(&m.name)
        .arg("--data-dir")
        .arg(&m.data_dir)
        .args(["--listen-client-urls", &m.client_url()])
        .args(["--advertise-client-urls", &m.client_url()])
        .args(["--listen-peer-urls", &m.peer_url()])
        .args(["--initial-advertise-peer-urls", &m.peer_url()])
        .args(["--initial-cluster", &cluster.join(",")])
        .args(["--initial-cluster-token", "ferry-lab"])
        .args(["--initial-cluster-state", state])
        .arg("--client-cert-auth")
        .arg("--cert-file")
        .arg(&cert)
        .arg("--key-file")
        .arg(&key)
        .arg("--trusted-ca-file")
        .arg(&ca)
        .arg("--peer-client-cert-auth")
        .arg("--peer-cert-file")
        .arg(&cert)
        .arg("--peer-key-file")
        .arg(&key)
        .arg("--peer-trusted-ca-file")
        .arg(&ca)
        // A lab's members share one machine's disk: short heartbeats, no fsync stalls
        // mistaken for a dead leader.
        .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
        .args(["--logger", "zap", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting etcd member {} (is etcd installed? scripts/setup.sh installs Debian's etcd-server)", m.name))?;
    std::fs::write(&m.pid_file, child.id().to_string())?;
    Ok(())
}

/// `etcdctl` against the lab's cluster, run in a member's namespace with the operator's
/// certificate; its standard output.
pub fn etcdctl(lab: &Lab, args: &[&str]) -> Result<String> {
    let m = lab
        .etcd
        .first()
        .context("this lab has no etcd (ferry lab up --etcd)")?;
    let pki = lab.dir.join("pki");
    let endpoints: Vec<String> = lab.etcd.iter().map(|m| m.client_url()).collect();
    let out = Command::new("ip")
        .args(["netns", "exec", &m.netns, "etcdctl"])
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!("--cacert={}", pki.join("ca.pem").display()))
        .arg(format!("--cert={}", pki.join("operator.pem").display()))
        .arg(format!("--key={}", pki.join("operator.key").display()))
        .args(["--command-timeout=5s"])
        .args(args)
        .output()
        .context("running etcdctl")?;
    if !out.status.success() {
        bail!(
            "etcdctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until every member of the lab's etcd answers.
fn wait_etcd(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match etcdctl(lab, &["endpoint", "health", "--cluster"]) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                let logs: Vec<String> = lab
                    .etcd
                    .iter()
                    .map(|m| {
                        let t = std::fs::read_to_string(&m.log).unwrap_or_default();
                        let tail: Vec<&str> = t.lines().rev().take(3).collect();
                        format!(
                            "{} ({}):\n{}",
                            m.name,
                            m.log.display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                bail!(
                    "the lab's etcd did not become healthy within 30 s ({e:#}); logs:\n{}",
                    logs.join("\n")
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One lab host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    /// Name (`h1`, ..., `client`).
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Underlay address.
    pub underlay_ip: Ipv4Addr,
    /// Agent API socket.
    pub api_socket: PathBuf,
    /// Its agent's API over TCP with mutual TLS, when it has one.
    #[serde(default)]
    pub api: Option<std::net::SocketAddr>,
    /// Agent log.
    pub log: PathBuf,
    /// Whether it runs containers.
    pub runs_containers: bool,
}

impl Lab {
    /// Reads the lab description (or the cluster file given to [`use_cluster`], else named by
    /// `FERRY_CLUSTER`); explains how to create one when missing.
    pub fn load(dir: &Path) -> Result<Lab> {
        let cluster = CLUSTER
            .get()
            .cloned()
            .or_else(|| std::env::var_os("FERRY_CLUSTER").map(PathBuf::from));
        if let Some(file) = cluster {
            return Ok(Cluster::load(&file)?.into_lab(&file));
        }
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no lab is up ({} missing): run `ferry lab up` first",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// Finds a host by name, with an error listing the known ones.
    pub fn host(&self, name: &str) -> Result<&LabHost> {
        self.hosts.iter().find(|h| h.name == name).with_context(|| {
            format!(
                "unknown host {name:?}: the lab has {}",
                self.hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// An API client for a host's agent.
    pub fn client(&self, host: &str) -> Result<Client> {
        let h = self.host(host)?;
        match &self.remote {
            Some(tls) => {
                let addr = h
                    .api
                    .with_context(|| format!("the cluster file gives no API address for {host}"))?;
                Client::tls(addr, &h.name, tls)
            }
            None => Ok(Client::new(h.api_socket.clone())),
        }
    }

    /// Hosts that run containers.
    pub fn container_hosts(&self) -> impl Iterator<Item = &LabHost> {
        self.hosts.iter().filter(|h| h.runs_containers)
    }
}

/// Plugs namespace `ns` into the underlay bridge (port `ul-NAME`, device `ul0` inside) with
/// address `addr`/24.
fn attach_underlay(ns: &str, name: &str, addr: Ipv4Addr) -> Result<()> {
    let port = format!("ul-{name}");
    ip([
        "-n",
        UNDERLAY_NS,
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "ul0",
        "netns",
        ns,
    ])?;
    ip([
        "-n",
        UNDERLAY_NS,
        "link",
        "set",
        &port,
        "master",
        "ul0",
        "up",
    ])?;
    ip(["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "ul0"])?;
    ip(["-n", ns, "link", "set", "ul0", "up"])?;
    Ok(())
}

/// The overlay address of the lab's `i`-th host (from 0), for its published ports: outside the
/// containers' range.
fn host_overlay_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 232, 0, 230 + i as u8)
}

fn host_ns(name: &str) -> String {
    format!("{NS_PREFIX}{name}")
}

/// `ferry lab up`.
pub async fn up(
    dir: &Path,
    hosts: usize,
    exe: &Path,
    workload: &Path,
    link_rate: Option<LinkRate>,
    lazy_daemon: ferry_agent::config::LazyDaemon,
    etcd: bool,
) -> Result<Lab> {
    if !(1..=20).contains(&hosts) {
        bail!("--hosts must be between 1 and 20, got {hosts}");
    }
    if dir.join("lab.json").exists() {
        bail!(
            "a lab is already up ({}): run `ferry lab down` first",
            dir.display()
        );
    }
    if !workload.is_file() {
        bail!(
            "workload binary {} not found: build it with `cargo build --release -p ferry-workload`",
            workload.display()
        );
    }
    // Leftovers of a crashed lab would make the steps below fail half-way.
    down(dir)?;
    std::fs::create_dir_all(dir)?;
    let mut names: Vec<String> = (1..=hosts).map(|i| format!("h{i}")).collect();
    names.push("client".into());
    let underlay = |i: usize, name: &str| -> Ipv4Addr {
        if name == "client" {
            Ipv4Addr::new(10, 231, 0, 250)
        } else {
            Ipv4Addr::new(10, 231, 0, i as u8 + 1)
        }
    };

    eprintln!("lab: underlay bridge in namespace {UNDERLAY_NS}");
    ip(["netns", "add", UNDERLAY_NS])?;
    ip(["-n", UNDERLAY_NS, "link", "set", "lo", "up"])?;
    ip(["-n", UNDERLAY_NS, "link", "add", "ul0", "type", "bridge"])?;
    ip(["-n", UNDERLAY_NS, "link", "set", "ul0", "up"])?;

    let mut lab_hosts = vec![];
    for (i, name) in names.iter().enumerate() {
        let ns = host_ns(name);
        let ul_ip = underlay(i, name);
        eprintln!("lab: host {name} (namespace {ns}, underlay {ul_ip})");
        ip(["netns", "add", &ns])?;
        let sysctl =
            |k: &str| ferry_runtime::util::run("ip", ["netns", "exec", &ns, "sysctl", "-qw", k]);
        sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
        ip(["-n", &ns, "link", "set", "lo", "up"])?;
        attach_underlay(&ns, name, ul_ip)?;
        ip(["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip([
            "-n",
            &ns,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            &ul_ip.to_string(),
            "dstport",
            "4789",
            "nolearning",
            "dev",
            "ul0",
        ])?;
        ip(["-n", &ns, "link", "set", "vx0", "master", "br0", "up"])?;
        // Remote MACs are never learned on the VXLAN port: the VXLAN FDB alone decides where a
        // container lives, so a move needs no bridge flush.
        ip([
            "-n",
            &ns,
            "link",
            "set",
            "dev",
            "vx0",
            "type",
            "bridge_slave",
            "learning",
            "off",
        ])?;
        if name != "client" {
            // A MAC of its own overlay address (given by its agent, `overlay_host_ip`).
            let mac = ferry_api::mac_for_ip(host_overlay_ip(i));
            ip(["-n", &ns, "link", "set", "br0", "address", &mac])?;
        }
        ip(["-n", &ns, "link", "set", "br0", "mtu", OVERLAY_MTU, "up"])?;
        if name == "client" {
            let mac = ferry_api::mac_for_ip(CLIENT_OVERLAY_IP);
            ip(["-n", &ns, "link", "set", "br0", "address", &mac])?;
            ip([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{CLIENT_OVERLAY_IP}/24"),
                "dev",
                "br0",
            ])?;
            // The client speaks IPv6 on the overlay too (containers get fd00:f3::/64 addresses);
            // the host's other interfaces keep IPv6 off.
            for k in [
                "disable_ipv6=0",
                "accept_dad=0",
                "accept_ra=0",
                "autoconf=0",
            ] {
                sysctl(&format!("net.ipv6.conf.br0.{k}"))?;
            }
            let v6 = ferry_api::ipv6_for_ip(CLIENT_OVERLAY_IP);
            ip([
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/{}", ferry_api::OVERLAY6_PREFIX_LEN),
                "dev",
                "br0",
                "nodad",
            ])?;
        }
        lab_hosts.push(LabHost {
            name: name.clone(),
            netns: ns,
            underlay_ip: ul_ip,
            api_socket: dir.join(format!("{name}.sock")),
            // Hosts that run containers also serve their API over TCP with mutual TLS.
            api: (name != "client").then(|| std::net::SocketAddr::from((ul_ip, API_PORT))),
            log: dir.join(format!("{name}.log")),
            runs_containers: name != "client",
        });
    }

    // The etcd cluster's members, each in a namespace of its own on the underlay.
    let members: Vec<EtcdMember> = if etcd {
        (1..=ETCD_MEMBERS)
            .map(|i| {
                let name = format!("etcd{i}");
                EtcdMember {
                    netns: host_ns(&name),
                    ip: Ipv4Addr::new(10, 231, 0, 240 + i as u8),
                    data_dir: dir.join("etcd").join(&name),
                    log: dir.join(format!("{name}.log")),
                    pid_file: dir.join(format!("{name}.pid")),
                    name,
                }
            })
            .collect()
    } else {
        vec![]
    };
    for m in &members {
        eprintln!(
            "lab: etcd member {} (namespace {}, underlay {})",
            m.name, m.netns, m.ip
        );
        ip(["netns", "add", &m.netns])?;
        ip(["-n", &m.netns, "link", "set", "lo", "up"])?;
        attach_underlay(&m.netns, &m.name, m.ip)?;
        std::fs::create_dir_all(&m.data_dir)?;
    }

    // Overlay forwarding: flood entries to every other host, and the client's MAC.
    let client_mac: Mac = ferry_api::mac_for_ip(CLIENT_OVERLAY_IP)
        .parse()
        .context("client MAC")?;
    let client_vtep = lab_hosts
        .last()
        .map(|h| h.underlay_ip)
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    for h in &lab_hosts {
        let others: Vec<Ipv4Addr> = lab_hosts
            .iter()
            .filter(|o| o.name != h.name)
            .map(|o| o.underlay_ip)
            .collect();
        // Other hosts' bridges (their overlay addresses answer published ports' connections).
        let bridges: Vec<(Mac, Ipv4Addr)> = lab_hosts
            .iter()
            .enumerate()
            .filter(|(_, o)| o.name != h.name && o.runs_containers)
            .filter_map(|(i, o)| {
                let mac: Mac = ferry_api::mac_for_ip(host_overlay_ip(i)).parse().ok()?;
                Some((mac, o.underlay_ip))
            })
            .collect();
        let is_client = !h.runs_containers;
        sdn::in_netns(&h.netns, move || -> Result<(), sdn::SdnError> {
            let fdb = Fdb::open("vx0")?;
            for dst in others {
                fdb.add_flood(dst)?;
            }
            if !is_client {
                fdb.set(client_mac, client_vtep)?;
            }
            for (mac, vtep) in bridges {
                fdb.set(mac, vtep)?;
            }
            Ok(())
        })
        .context("entering lab namespace")?
        .context("programming the VXLAN forwarding database")?;
    }

    // PKI: a lab CA, one certificate per host, and an operator's for the API over TCP.
    let pki = dir.join("pki");
    transfer::pki::create_ca(&pki, "ferry lab CA").context("creating the lab CA")?;
    for h in &lab_hosts {
        let ips: Vec<std::net::IpAddr> = vec![h.underlay_ip.into()];
        transfer::pki::issue_host_cert_with_ips(&pki, &h.name, &ips, &pki)
            .with_context(|| format!("issuing a certificate for {}", h.name))?;
    }
    transfer::pki::issue_operator_cert(&pki, "operator", &pki)
        .context("issuing the lab operator's certificate")?;
    for m in &members {
        transfer::pki::issue_host_cert_with_ips(&pki, &m.name, &[m.ip.into()], &pki)
            .with_context(|| format!("issuing a certificate for {}", m.name))?;
    }
    let etcd_cfg = if members.is_empty() {
        None
    } else {
        let probe = Lab {
            hosts: vec![],
            dir: dir.to_owned(),
            link_rate: None,
            etcd: members.clone(),
            remote: None,
        };
        for m in &members {
            start_etcd_member(&probe, m)?;
        }
        wait_etcd(&probe)?;
        // The client is on the overlay but runs no container: its MAC's route is static.
        let route = serde_json::json!({
            "host": "client",
            "vtep": client_vtep,
            "owner": "client",
            "at_ms": 0,
        });
        etcdctl(
            &probe,
            &[
                "put",
                &format!("/ferry/routes/{client_mac}"),
                &route.to_string(),
            ],
        )
        .context("recording the client's route in etcd")?;
        eprintln!("lab: etcd cluster of {} members up", members.len());
        Some(ferry_cluster::EtcdConfig {
            endpoints: members.iter().map(|m| m.client_url()).collect(),
            prefix: "/ferry".into(),
            tls: None,
            lease_ttl_s: 3,
            timeout_ms: 2000,
        })
    };
    let cluster = Cluster {
        ca: pki.join("ca.pem"),
        cert: pki.join("operator.pem"),
        key: pki.join("operator.key"),
        hosts: lab_hosts
            .iter()
            .filter_map(|h| {
                Some(ClusterHost {
                    name: h.name.clone(),
                    api: h.api?,
                    runs_containers: h.runs_containers,
                })
            })
            .collect(),
    };
    std::fs::write(dir.join(CLUSTER_FILE), serde_json::to_vec_pretty(&cluster)?)?;

    // One agent per host.
    for (i, h) in lab_hosts.iter().enumerate() {
        let peers = lab_hosts
            .iter()
            .filter(|o| o.name != h.name)
            .map(|o| Peer {
                host: o.name.clone(),
                underlay_ip: o.underlay_ip,
                quic_port: QUIC_PORT,
                runs_containers: o.runs_containers,
            })
            .collect();
        let cfg = AgentConfig {
            host: h.name.clone(),
            netns: Some(h.netns.clone()),
            underlay_ip: h.underlay_ip,
            quic_port: QUIC_PORT,
            api_socket: h.api_socket.clone(),
            api_listen: h.api,
            state_dir: dir.join(&h.name),
            tls: TlsPaths {
                ca: pki.join("ca.pem"),
                cert: pki.join(format!("{}.pem", h.name)),
                key: pki.join(format!("{}.key", h.name)),
            },
            bridge: "br0".into(),
            vxlan: "vx0".into(),
            overlay_prefix_len: 24,
            overlay_first: Ipv4Addr::new(10, 232, 0, 10),
            overlay_last: Ipv4Addr::new(10, 232, 0, 229),
            reserved: std::iter::once(CLIENT_OVERLAY_IP)
                .chain((0..lab_hosts.len()).map(host_overlay_ip))
                .collect(),
            peers,
            runc: "runc".into(),
            workload_bin: workload.to_owned(),
            runs_containers: h.runs_containers,
            criu_frontend: Some(exe.with_file_name("ferry-criu")).filter(|p| p.is_file()),
            quic_idle_timeout_ms: 3000,
            allow_fault_hooks: true,
            page_store_mib: 4096,
            memory_budget_mib: None,
            lazy_restore: true,
            scratch_tmpfs: true,
            hide_cpu_flags: vec![],
            cgroup_favordynmods: true,
            netns_socket_hash_buckets: 4096,
            lazy_daemon,
            console_shim: Some(exe.to_owned()),
            hooks: vec![],
            log_max_bytes: ferry_runtime::console::DEFAULT_MAX_BYTES,
            etcd: etcd_cfg.clone(),
            overlay_host_ip: h.runs_containers.then(|| host_overlay_ip(i)),
            redirect_ttl_s: 3600,
        };
        let cfg_path = dir.join(format!("{}.json", h.name));
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
        start_agent(exe, &cfg_path, &h.log, &dir.join(format!("{}.pid", h.name)))?;
    }
    let mut lab = Lab {
        hosts: lab_hosts,
        dir: dir.to_owned(),
        link_rate: None,
        etcd: members,
        remote: None,
    };
    for h in &lab.hosts {
        wait_agent(&lab, &h.name).await?;
    }
    std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&lab)?)?;
    if link_rate.is_some() {
        set_link_rate(&mut lab, link_rate)?;
    }
    eprintln!(
        "lab: up with hosts {}{}",
        lab.hosts
            .iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        link_rate
            .map(|r| format!(", underlay links shaped to {r}"))
            .unwrap_or_default()
    );
    Ok(lab)
}

/// Starts one agent in the background; its output goes to `log`.
pub fn start_agent(exe: &Path, cfg: &Path, log: &Path, pidfile: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(cfg)
        .env_remove("LD_LIBRARY_PATH")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting agent {}", exe.display()))?;
    std::fs::write(pidfile, child.id().to_string())?;
    Ok(())
}

/// Waits until a host's agent answers.
pub async fn wait_agent(lab: &Lab, host: &str) -> Result<()> {
    let h = lab.host(host)?;
    let c = Client::new(h.api_socket.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match c.host_info().await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                let log = std::fs::read_to_string(&h.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!(
                    "agent on {host} did not come up within 15 s ({e:#}); its log {} ends with:\n{}",
                    h.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `ferry lab down`: removes everything a lab (even a half-built or crashed one) left.
pub fn down(dir: &Path) -> Result<()> {
    // Agents first, so they do not recreate anything.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pid") {
                if let Ok(pid) = std::fs::read_to_string(&p)
                    .unwrap_or_default()
                    .trim()
                    .parse::<i32>()
                {
                    // Only a Ferry agent: a stale pid file may name a reused pid.
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    let agent = cmdline.contains("ferry") && cmdline.contains("agent");
                    // The lab's etcd members run with their data under the lab directory.
                    let etcd =
                        cmdline.starts_with("etcd") && cmdline.contains(&*dir.to_string_lossy());
                    if agent || etcd {
                        let pid = nix::unistd::Pid::from_raw(pid);
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        }
    }
    // Containers under every agent's runc root, and the demo baseline's.
    for parent in [dir.to_path_buf(), dir.join("baseline")] {
        if let Ok(rd) = std::fs::read_dir(&parent) {
            for e in rd.flatten() {
                let root = e.path().join("runc");
                if root.is_dir() {
                    ferry_runtime::runc::Runc::new("runc", root).delete_all();
                }
            }
        }
    }
    // Namespaces: containers', hosts', underlay.
    let list = ferry_runtime::util::run("ip", ["netns", "list"]).unwrap_or_default();
    let mut nss: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_owned)
        .collect();
    nss.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for ns in &nss {
        run_quiet("ip", ["netns", "del", ns.as_str()]);
    }
    ferry_runtime::cgroup_tree::remove_cgroups();
    ferry_runtime::bundle::unmount_under(dir);
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if !nss.is_empty() {
        eprintln!("lab: removed {} namespaces", nss.len());
    }
    Ok(())
}

/// `ferry lab exec HOST -- CMD...`: replaces this process with CMD inside HOST.
pub fn exec(lab: &Lab, host: &str, cmd: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let h = lab.host(host)?;
    if cmd.is_empty() {
        bail!("nothing to run: ferry lab exec {host} -- CMD...");
    }
    let err = Command::new("ip")
        .args(["netns", "exec", &h.netns])
        .args(cmd)
        .exec();
    Err(err).with_context(|| format!("running {:?} in {host}", cmd))
}

#[cfg(test)]
mod tests {
    use super::LinkRate;

    #[test]
    fn link_rates_parse_like_tc_and_print_back() {
        for (s, bits, shown) in [
            ("1gbit", 1_000_000_000, "1gbit"),
            ("100mbit", 100_000_000, "100mbit"),
            ("2.5gbit", 2_500_000_000, "2500mbit"),
            ("500kbit", 500_000, "500kbit"),
            (" 10MBit ", 10_000_000, "10mbit"),
        ] {
            let r: LinkRate = s.parse().unwrap();
            assert_eq!(r.0, bits, "{s}");
            assert_eq!(r.to_string(), shown);
            assert_eq!(r.to_string().parse::<LinkRate>().unwrap(), r);
        }
        for bad in ["fast", "1gb", "", "-1gbit", "0bit", "1000gbit", "nanmbit"] {
            let e = bad.parse::<LinkRate>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
