//! The agent: one per host. Runs containers with runc, serves the HTTP/JSON API on a Unix
//! socket, and talks to other agents over QUIC with mutual TLS.
//!
//! A library: `ferry agent` runs it ([`main`]); an orchestrator or a test can embed it.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod proto;

mod base;
mod cluster;
mod console;
mod containers;
mod dirty;
mod fill;
mod firstpass;
mod hooks;
mod http;
pub mod images;
mod incoming;
mod journal;
mod lazy;
mod lazyd;
mod metrics;
mod pages;
mod peer;
mod publish;
mod rounds;
mod source;

/// The API as an OpenAPI document (docs/openapi.json).
pub use http::openapi;
/// The API's routes (method, path), as the agent serves them.
pub use http::ROUTES;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::{ContainerInfo, ContainerSpec, JobEvent, JobEventKind, JobInfo};
use ferry_net::sdn::{Fdb, Mac};
use migrate_core::{Report, State};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::proto::{PeerRequest, PeerResponse};
use ferry_runtime::layout::Layout;
use ferry_runtime::runc::Runc;

/// A container this agent owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ContainerRecord {
    spec: ContainerSpec,
    #[serde(default)]
    migrating: bool,
}

/// A migration job run by this agent as the source.
pub(crate) struct Job {
    id: String,
    started: Instant,
    status: Mutex<(State, Report)>,
    history: Mutex<Vec<JobEvent>>,
    tx: broadcast::Sender<JobEvent>,
    /// Set by a cancel; also kills the runc command of the phase under way (see `Bound`).
    cancel: Arc<AtomicBool>,
    cancel_notify: Notify,
    /// The memory the pre-copy round under way sets out to send, bytes (0: none or unknown),
    /// for its progress events.
    planned_bytes: AtomicU64,
}

impl Job {
    /// Returns once the job is cancelled.
    async fn cancelled(&self) {
        let n = self.cancel_notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.cancel.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        n.await;
    }
}

impl Job {
    fn info(&self) -> JobInfo {
        let (state, report) = lock(&self.status).clone();
        JobInfo {
            id: self.id.clone(),
            state,
            report,
        }
    }

    fn emit(&self, kind: JobEventKind) {
        let mut h = lock(&self.history);
        let ev = JobEvent {
            seq: h.len() as u64,
            t_ms: ferry_runtime::util::ms(self.started.elapsed()),
            kind,
        };
        h.push(ev.clone());
        let _ = self.tx.send(ev);
    }
}

/// Locks a std mutex, recovering from poisoning (a panicked holder leaves consistent data here).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent.
pub(crate) struct Agent {
    cfg: AgentConfig,
    runc: Runc,
    endpoint: transfer::Endpoint,
    /// The runtime the agent was started on: its peer connections are driven there.
    rt: tokio::runtime::Handle,
    conns: tokio::sync::Mutex<HashMap<String, transfer::Connection>>,
    containers: Mutex<BTreeMap<String, ContainerRecord>>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    incoming: tokio::sync::Mutex<HashMap<String, incoming::Incoming>>,
    criu: std::result::Result<criu_driver::Criu, String>,
    /// Whether CRIU can restore lazily here (see `fill`).
    lazy_pages: std::result::Result<(), String>,
    /// The version of Ferry's patch in this host's CRIU (0: none; see `criu_driver::Criu`).
    criu_patch: u32,
    job_seq: AtomicU64,
    /// Names and addresses of containers being created right now.
    creating: Mutex<Vec<(String, Ipv4Addr)>>,
    /// Memory pages held here by content hash: pre-copied pages of incoming jobs, and pages of
    /// containers that left (so that a container coming back sends only what changed).
    pages: tokio::sync::Mutex<transfer::pages::PageStore>,
    /// The host's image store: chunks, trees, images, materialized base layers.
    store: Arc<shared_fs::Store>,
    /// Base trees of incoming jobs (job -> tree), from their prepare until they end: gc keeps
    /// them.
    incoming_bases: Mutex<HashMap<String, String>>,
    /// Per MAC, the peer that last moved it to another host (it may take it back).
    route_movers: Mutex<HashMap<String, String>>,
    /// Jobs whose source waits for its destination's answer about the commit, by id: an
    /// operator may settle them by hand (`POST /v1/jobs/{id}/resolve`).
    unresolved: Mutex<HashMap<String, Arc<journal::Unresolved>>>,
    /// Base trees received from a source, waiting for their chunks.
    pending_bases: Mutex<HashMap<String, base::PendingBase>>,
    /// Lazy restores filling in their memory, by job (their pages stay pinned).
    fills: Mutex<HashMap<String, fill::Fill>>,
    /// Recent fills that ended, by job.
    filled: Mutex<HashMap<String, fill::Ended>>,
    /// Pages the page store grew by for incoming pre-copy jobs, by job.
    store_grants: Mutex<HashMap<String, usize>>,
    /// Outgoing lazy jobs' frozen copies, which their destinations may read, by job.
    frozen_copies: Mutex<HashMap<String, Arc<lazy::FrozenCopy>>>,
    /// Prometheus metrics (`GET /v1/metrics`).
    metrics: metrics::Metrics,
    /// The cluster's etcd, when configured (`cluster`): routes, ownership, leases.
    cluster: Option<cluster::Cluster>,
    /// Containers that left, whose published ports this host still forwards.
    redirects: Mutex<Vec<publish::Redirect>>,
    /// Wakes the task that keeps the published ports up to date.
    publish_kick: Notify,
    /// The published ports' rules last written.
    published_now: Mutex<Option<Vec<ferry_runtime::publish::Rule>>>,
}

/// Entry point of `ferry agent`. Enters the configured network namespace first, then starts
/// the runtime (so every thread lives in that namespace).
pub fn main(cfg: AgentConfig) -> Result<()> {
    ferry_runtime::util::require_root("ferry agent")?;
    if let Some(ns) = &cfg.netns {
        ferry_runtime::netns::enter(ns)?;
    }
    ferry_runtime::netns::check_overlay_devices(&cfg.bridge, &cfg.vxlan, cfg.underlay_ip)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}

/// CRIU options for Ferry's containers, handed to CRIU by runc (`org.criu.config`): each
/// container's own file begins with them ([`ferry_runtime::bundle::criu_conf_text`]); the host's
/// `criu.conf` holds them for containers made before they had one.
///
/// `network-lock skip`: Ferry points the overlay at the destination before the freeze and holds
/// the container's packets there until the commit, so nothing reaches the source while CRIU
/// dumps and nothing reaches the restored sockets before they are live; CRIU's own per-connection
/// iptables lock (an `iptables-restore` at dump and at restore, about 90 ms here) would only add
/// downtime.
///
/// `cgroup-yard /sys/fs/cgroup`: CRIU uses the host's cgroup mounts instead of mounting every
/// controller again in a temporary yard at each dump and restore.
///
/// `file-locks`: flock and POSIX locks the container's processes hold are dumped and taken again
/// at the restore (SQLite, PostgreSQL and many daemons hold one); CRIU refuses a dump with locks
/// without it.
pub(crate) const CRIU_CONF: &str = "network-lock skip\ncgroup-yard /sys/fs/cgroup\nfile-locks\n";

async fn run(cfg: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    std::fs::write(cfg.state_dir.join("criu.conf"), CRIU_CONF)?;
    if cfg.runs_containers && cfg.scratch_tmpfs {
        for sub in ["images", "work"] {
            let dir = cfg.state_dir.join(sub);
            match ferry_runtime::bundle::ensure_tmpfs(&dir) {
                Ok(true) => info!(dir = %dir.display(), "CRIU scratch on a tmpfs"),
                Ok(false) => {}
                Err(e) => {
                    warn!(dir = %dir.display(), error = %format!("{e:#}"), "CRIU scratch stays on disk")
                }
            }
        }
    }
    if cfg.runs_containers && cfg.netns_socket_hash_buckets > 0 {
        let set = ferry_runtime::netns::set_child_socket_hashes(cfg.netns_socket_hash_buckets);
        if !set.is_empty() {
            info!(settings = %set.join(" "), "containers get socket hash tables of their own");
        }
    }
    if cfg.runs_containers && cfg.cgroup_favordynmods {
        match ferry_runtime::cgroup_tree::favor_cgroup_moves() {
            Ok(Some(point)) => info!(mount = %point, "cgroup moves made cheap (favordynmods)"),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cgroup moves stay slow: every restore waits for an RCU grace period")
            }
        }
    }
    if cfg.runs_containers {
        // Held for the agent's lifetime: every checkpoint and restore sets ptrace breakpoints.
        static BREAKPOINTS_QUICK: std::sync::OnceLock<std::os::fd::OwnedFd> =
            std::sync::OnceLock::new();
        match memtrack::keep_ptrace_breakpoints_quick() {
            Ok(fd) => {
                let _ = BREAKPOINTS_QUICK.set(fd);
                info!("per-task perf hooks kept on: no RCU grace period in a dump's breakpoint");
            }
            Err(e) => {
                warn!(error = %e, "per-task perf hooks not kept on: a dump after a quiet second waits for an RCU grace period (8-18 ms frozen)")
            }
        }
    }
    let criu = tokio::task::spawn_blocking(|| {
        let c = criu_driver::Criu::discover()?;
        c.check()?;
        match c.warm_kdat_cache() {
            Ok(true) => info!(
                path = criu_driver::KDAT_CACHE,
                "CRIU kernel-feature cache written"
            ),
            Ok(false) => warn!(
                "CRIU kernel-feature cache could not be written: every CRIU run probes the kernel"
            ),
            Err(e) => warn!(error = %e, "CRIU kernel-feature cache"),
        }
        Ok::<_, criu_driver::CriuError>(c)
    })
    .await?
    .map_err(|e| e.to_string());
    match &criu {
        Ok(c) => info!(version = %c.version, path = %c.path.display(), "CRIU usable"),
        Err(e) => {
            warn!(error = %e, "CRIU not usable: migrations from or to this host will be refused")
        }
    }
    let tls = cfg.tls_files();
    let endpoint = transfer::Endpoint::bind_with_idle_timeout(
        SocketAddr::from((cfg.underlay_ip, cfg.quic_port)),
        &tls,
        std::time::Duration::from_millis(cfg.quic_idle_timeout_ms.max(500)),
    )
    .with_context(|| format!("QUIC endpoint on {}:{}", cfg.underlay_ip, cfg.quic_port))?;
    let mut runc = Runc::new(&cfg.runc, cfg.state_dir.join("runc")).for_host(&cfg.host);
    if let (Some(front), Ok(c)) = (&cfg.criu_frontend, &criu) {
        info!(frontend = %front.display(), "runc uses ferry-criu in front of CRIU");
        runc = runc.with_criu_frontend(ferry_runtime::runc::CriuFrontend {
            frontend: front.clone(),
            real: c.path.clone(),
            version: c.version.to_string(),
        });
    }
    let lazy_pages = match &criu {
        Ok(c) => {
            let c = c.clone();
            tokio::task::spawn_blocking(move || c.check_lazy_pages()).await?
        }
        Err(e) => Err(e.clone()),
    };
    if let Err(e) = &lazy_pages {
        warn!(error = %e, "CRIU cannot restore lazily here: pre-copy to this host sends every page while frozen");
    }
    let criu_patch = match &criu {
        Ok(c) => {
            let c = c.clone();
            tokio::task::spawn_blocking(move || c.ferry_patch()).await?
        }
        Err(_) => 0,
    };
    if criu_patch >= 2 {
        info!(
            version = criu_patch,
            "CRIU carries Ferry's patch: lazy dumps leave lazy pages alone"
        );
    } else {
        warn!(version = criu_patch, "CRIU lacks Ferry's patch (scripts/setup.sh builds it): lazy dumps splice every page, and a lazy restore here cannot serve a mapping of 2 GiB or more");
    }
    let containers = load_containers(&cfg.state_dir.join("containers.json"))?;
    let cluster = cluster::connect(&cfg).await?;
    let store_dir = cfg.state_dir.join("store");
    let store = Arc::new(
        shared_fs::Store::open(&store_dir)
            .with_context(|| format!("opening the image store {}", store_dir.display()))?,
    );
    let agent = Arc::new(Agent {
        runc,
        endpoint,
        conns: Default::default(),
        containers: Mutex::new(containers),
        jobs: Default::default(),
        incoming: Default::default(),
        criu,
        lazy_pages,
        criu_patch,
        job_seq: AtomicU64::new(0),
        creating: Default::default(),
        pages: tokio::sync::Mutex::new(transfer::pages::PageStore::new(cfg.page_store_pages())),
        rt: tokio::runtime::Handle::current(),
        store,
        pending_bases: Default::default(),
        route_movers: Mutex::new(load_route_movers(&cfg.state_dir)),
        unresolved: Default::default(),
        incoming_bases: Default::default(),
        fills: Default::default(),
        filled: Default::default(),
        store_grants: Default::default(),
        frozen_copies: Default::default(),
        metrics: metrics::Metrics::new(cluster.is_some()),
        cluster,
        redirects: Mutex::new(Agent::load_redirects(&cfg.state_dir)),
        publish_kick: Notify::new(),
        published_now: Mutex::new(None),
        cfg,
    });
    agent.settle_unfinished_fills().await;
    agent.clean_stale_incoming().await;
    agent.recover_outgoing().await;
    if let Err(e) = agent.setup_host_overlay().await {
        warn!(error = %format!("{e:#}"), "published ports unavailable on this host");
    }
    tokio::spawn(Arc::clone(&agent).publish_loop());
    if agent.cluster().is_some() {
        agent.adopt_containers().await;
        tokio::spawn(Arc::clone(&agent).route_controller());
        tokio::spawn(Arc::clone(&agent).host_updates());
    }
    info!(host = %agent.cfg.host, api = %agent.cfg.api_socket.display(), "agent up");

    let quic = tokio::spawn(peer::serve(Arc::clone(&agent)));
    let watchdog = tokio::spawn(incoming::watchdog(Arc::clone(&agent)));
    let api = http::serve(Arc::clone(&agent));
    tokio::select! {
        r = api => r?,
        r = quic => r??,
        _ = watchdog => bail!("watchdog ended"),
        _ = shutdown_signal() => info!("agent stopping"),
    }
    let _ = std::fs::remove_file(&agent.cfg.api_socket);
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    if let Ok(mut s) = signal(SignalKind::terminate()) {
        tokio::select! {
            _ = s.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// The containers this host owns. A missing file is an empty list; a file that cannot be read
/// or parsed stops the agent (starting with an empty list would forget running containers).
fn load_containers(path: &std::path::Path) -> Result<BTreeMap<String, ContainerRecord>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is damaged, so this host's containers are unknown; the agent does not start \
             rather than forget them. Repair the file, or move it aside to start with none",
            path.display()
        )
    })
}

impl Agent {
    fn layout(&self, name: &str) -> Layout {
        Layout::new(&self.cfg.state_dir, &self.cfg.host, name)
    }

    fn images_dir(&self, job: &str) -> PathBuf {
        self.cfg.state_dir.join("images").join(job)
    }

    /// Where job `job`'s UNIX socket of kind `kind` (`ps`, `dump-gate`, `restore-gate`)
    /// lives: the run directory of the state directory, created here.
    fn run_socket(&self, job: &str, kind: &str) -> Result<PathBuf> {
        let dir = self.cfg.state_dir.join("run");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!("{job}.{kind}")))
    }

    fn work_dir(&self, job: &str) -> PathBuf {
        self.cfg.state_dir.join("work").join(job)
    }

    fn save_containers(&self) {
        // One save at a time, each of the list as it is then: the last one written is the
        // newest.
        static SAVING: Mutex<()> = Mutex::new(());
        let _one = lock(&SAVING);
        let c = lock(&self.containers).clone();
        let path = self.cfg.state_dir.join("containers.json");
        let r = serde_json::to_vec_pretty(&c)
            .map_err(anyhow::Error::from)
            .and_then(|b| journal::write_durable(&path, &b).map_err(Into::into));
        if let Err(e) = r {
            warn!(error = %e, path = %path.display(), "cannot persist container list");
        }
    }

    fn container_info(&self, rec: &ContainerRecord) -> ContainerInfo {
        let st = self.runc.state(&rec.spec.name);
        let state = if rec.migrating {
            "migrating".to_string()
        } else {
            st.as_ref()
                .map(|s| s.status.clone())
                .unwrap_or_else(|| "stopped".into())
        };
        ContainerInfo {
            spec: rec.spec.clone(),
            host: self.cfg.host.clone(),
            memory_bytes: (state == "running")
                .then(|| {
                    ferry_runtime::cgroup_tree::container_memory_bytes(
                        &self.cfg.host,
                        &rec.spec.name,
                    )
                    .ok()
                })
                .flatten(),
            state,
            pid: st.filter(|s| s.pid > 0).map(|s| s.pid),
        }
    }

    fn list(&self) -> Vec<ContainerInfo> {
        let recs: Vec<ContainerRecord> = lock(&self.containers).values().cloned().collect();
        recs.iter().map(|r| self.container_info(r)).collect()
    }

    /// A QUIC connection to a peer, reused while it lives.
    async fn peer_conn(&self, host: &str) -> Result<transfer::Connection> {
        let peer = self.cfg.peer(host).ok_or_else(|| {
            anyhow!(
                "unknown host {host:?}: known peers are {}",
                self.peer_names().join(", ")
            )
        })?;
        if let Some(c) = self.conns.lock().await.get(host) {
            if c.conn.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        // Connect without holding the lock: one unreachable peer must not stall the others.
        let c = self
            .endpoint
            .connect(peer.addr(), host)
            .await
            .with_context(|| {
                format!("destination {host} ({}) unreachable over QUIC", peer.addr())
            })?;
        self.conns.lock().await.insert(host.to_string(), c.clone());
        Ok(c)
    }

    fn peer_names(&self) -> Vec<String> {
        self.cfg.peers.iter().map(|p| p.host.clone()).collect()
    }

    /// The peers a container can migrate to: those that run containers.
    fn target_names(&self) -> Vec<String> {
        self.cfg
            .peers
            .iter()
            .filter(|p| p.runs_containers)
            .map(|p| p.host.clone())
            .collect()
    }

    /// Forgets the cached connection to `host` (after it failed).
    async fn forget_conn(&self, host: &str) {
        self.conns.lock().await.remove(host);
    }

    /// Sends one request without trees and reads the answer. A cached connection may be stale
    /// (the peer restarted): on failure the request is retried once on a new connection.
    async fn ask(&self, host: &str, req: &PeerRequest) -> Result<PeerResponse> {
        let conn = self.peer_conn(host).await?;
        match peer::request(&conn, req, &[]).await {
            Ok((r, _)) => Ok(r),
            Err(first) => {
                self.forget_conn(host).await;
                let conn = self
                    .peer_conn(host)
                    .await
                    .with_context(|| format!("{first:#}"))?;
                Ok(peer::request(&conn, req, &[]).await?.0)
            }
        }
    }

    /// Points `mac` at `host` in this host's overlay (`None` or this host: local, no entry).
    /// A peer's `Route`: accepted only from the host the overlay delivers `mac` to now (its
    /// owner, moving it), from a host claiming a MAC nobody here owns yet for itself, or from
    /// the host that moved it last, taking it back (a rollback). A container running here is
    /// never pointed elsewhere by a peer.
    fn route_from_peer(&self, peer: &str, mac: &str, host: Option<&str>) -> Result<()> {
        let m: Mac = mac.parse().map_err(|e| anyhow!("{e}"))?;
        let here = lock(&self.containers)
            .values()
            .any(|c| c.spec.mac.eq_ignore_ascii_case(mac) && !c.migrating);
        if here {
            bail!(
                "refusing a route for {mac} from {peer}: that container runs on {}",
                self.cfg.host
            );
        }
        let fdb = Fdb::open(&self.cfg.vxlan)?;
        let current = fdb
            .entries()?
            .into_iter()
            .find(|e| e.mac == m)
            .and_then(|e| {
                self.cfg
                    .peers
                    .iter()
                    .find(|p| p.underlay_ip == e.dst)
                    .map(|p| p.host.clone())
            });
        let key = m.to_string();
        let previous = lock(&self.route_movers).get(&key).cloned();
        let allowed = match &current {
            Some(owner) => {
                owner == peer || (host == Some(peer) && previous.as_deref() == Some(peer))
            }
            None => host == Some(peer) || previous.as_deref() == Some(peer),
        };
        if !allowed {
            bail!(
                "refusing a route for {mac} from {peer}: it is {} here, and {peer} may only move a MAC it owns or claim a new one for itself",
                current.map_or("not routed".to_string(), |c| format!("routed to {c}"))
            );
        }
        if host != Some(peer) {
            let mut movers = lock(&self.route_movers);
            // One entry per MAC of the overlay; a bound against a peer inventing MACs.
            if (movers.len() < 65_536 || movers.contains_key(&key))
                && movers.insert(key, peer.to_string()).as_deref() != Some(peer)
            {
                // Kept across restarts: a rollback's route back may come after one.
                let path = self.cfg.state_dir.join(ROUTE_MOVERS_FILE);
                let bytes = serde_json::to_vec(&*movers)?;
                journal::write_durable(&path, &bytes).with_context(|| {
                    format!("recording the route's mover in {}", path.display())
                })?;
            }
        }
        self.set_route_local(mac, host)
    }

    fn set_route_local(&self, mac: &str, host: Option<&str>) -> Result<()> {
        let mac: Mac = mac.parse().map_err(|e| anyhow!("{e}"))?;
        let fdb = Fdb::open(&self.cfg.vxlan)?;
        match host {
            Some(h) if h != self.cfg.host => {
                let peer = self
                    .cfg
                    .peer(h)
                    .ok_or_else(|| anyhow!("route to unknown host {h:?}"))?;
                fdb.set(mac, peer.underlay_ip)?;
            }
            _ => fdb.remove(mac)?,
        }
        Ok(())
    }

    /// Points `mac` at `host` on every host (this one included), in parallel. Failures of host
    /// `tolerate` (a destination being rolled back from, say) are not errors.
    async fn route_everywhere(
        &self,
        mac: &str,
        host: Option<&str>,
        tolerate: Option<&str>,
    ) -> Result<()> {
        let mut errors = vec![];
        if let Err(e) = self.set_route_local(mac, host) {
            errors.push(format!("{}: {e:#}", self.cfg.host));
        }
        let req = PeerRequest::Route {
            mac: mac.to_string(),
            host: host.map(str::to_string),
        };
        let futs = self.cfg.peers.iter().map(|p| {
            let req = req.clone();
            async move { (p.host.clone(), self.ask(&p.host, &req).await) }
        });
        for (h, r) in futures_util::future::join_all(futs).await {
            if tolerate == Some(h.as_str()) {
                if let Err(e) | Ok(PeerResponse::Error { message: e, .. }) =
                    r.map_err(|e| format!("{e:#}"))
                {
                    warn!(host = %h, error = %e, "overlay not updated there (tolerated)");
                }
                continue;
            }
            match r {
                Ok(PeerResponse::Ok { .. }) => {}
                Ok(PeerResponse::Error { message, .. }) => errors.push(format!("{h}: {message}")),
                Ok(other) => errors.push(format!("{h}: unexpected answer {other:?}")),
                Err(e) => errors.push(format!("{h}: {e:#}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("overlay update failed on {}", errors.join("; "))
        }
    }

    fn new_job_id(&self) -> String {
        let n = self.job_seq.fetch_add(1, Ordering::SeqCst) + 1;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("{}-{t:x}-{n}", self.cfg.host)
    }
}

/// Which peer last moved each MAC away (`Agent::route_from_peer`), kept across restarts.
const ROUTE_MOVERS_FILE: &str = "route-movers.json";

/// Reads the route movers saved by an earlier run. A missing or unreadable file gives none:
/// that only refuses more (a route back from a mover it forgot), never accepts more.
fn load_route_movers(state_dir: &Path) -> HashMap<String, String> {
    let path = state_dir.join(ROUTE_MOVERS_FILE);
    match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<HashMap<String, String>>(&b) {
            Ok(m) if m.len() <= 65_536 => m,
            Ok(m) => {
                warn!(path = %path.display(), entries = m.len(), "too many route movers recorded; starting without them");
                HashMap::new()
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "the route movers' record is damaged; starting without it");
                HashMap::new()
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the route movers' record; starting without it");
            HashMap::new()
        }
    }
}
