//! The agent in a cluster whose state lives in etcd (`etcd` in its configuration).
//!
//! - The host registers under a lease, renewed in the background; its record carries the
//!   figures `ferry drain` places containers by.
//! - Containers are claimed in etcd with their addresses (one transaction: a name or an
//!   address is never given twice); a container found running here at start is adopted.
//! - The SDN controller ([`Agent::route_controller`]): the agent lists the routes, programs
//!   its VXLAN FDB from them, then watches them and follows every change, writing how far it
//!   got (`synced/HOST`). A watch that breaks (etcd unreachable, the host partitioned) is
//!   started again from a fresh list, so a host that was away converges when it comes back.
//! - A migration's network switch is one transaction that moves the route only while the
//!   container's record is at the revision its source read at the preflight (the fencing
//!   token); the destination's commit is another that moves the record itself. See
//!   docs/design.md, "Cluster state in etcd".

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::ContainerSpec;
use ferry_cluster::plan::{self, FdbChange};
use ferry_cluster::records::now_ms;
use ferry_cluster::{ClusterError, ContainerRecord, EtcdTls, HostRecord, RouteRecord, Store};
use ferry_net::sdn::{Fdb, Mac};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::{lock, Agent};

/// The agent's link to etcd.
pub(crate) struct Cluster {
    pub(crate) store: Store,
    pub(crate) reg: ferry_cluster::Registration,
    pub(crate) status: Mutex<RouteStatus>,
    /// Longest wait for every live host to program a switched route.
    sync_wait: Duration,
}

/// How the SDN controller fares (`GET /v1/host`, metrics).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RouteStatus {
    /// Whether the watch of the routes is open.
    pub watching: bool,
    /// The etcd revision the FDB agrees with.
    pub revision: i64,
    /// Routes known (MACs).
    pub routes: u64,
    /// FDB changes made since start.
    pub changes: u64,
    /// Times the routes were listed again after a watch broke.
    pub resyncs: u64,
    /// Milliseconds between the last route change's write and its programming here.
    pub last_lag_ms: u64,
}

/// Connects to etcd and registers this host, when the configuration names etcd. An etcd that
/// does not answer within 10 s stops the agent's start with the reason.
pub(crate) async fn connect(cfg: &AgentConfig) -> Result<Option<Cluster>> {
    let Some(e) = &cfg.etcd else {
        return Ok(None);
    };
    let own = EtcdTls {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
    };
    let tls = e.tls.clone().unwrap_or(own);
    let store = Store::connect(e, Some(&tls))
        .await
        .context("connecting to etcd")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.revision().await {
            Ok(rev) => {
                info!(endpoints = %store.endpoints(), revision = rev, prefix = %store.keys().prefix(), "etcd reached");
                break;
            }
            Err(err) if tokio::time::Instant::now() >= deadline => {
                bail!("{err}; the agent needs etcd to start (or remove `etcd` from its configuration)")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let rec = HostRecord {
        host: cfg.host.clone(),
        underlay_ip: cfg.underlay_ip,
        quic_port: cfg.quic_port,
        api: cfg.api_listen,
        runs_containers: cfg.runs_containers,
        mem_available_bytes: ferry_runtime::util::mem_available_bytes().unwrap_or(0),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        load_x100: load_x100(),
        containers: 0,
        at_ms: now_ms(),
    };
    let reg = store
        .register(rec, e.lease_ttl_s)
        .await
        .context("registering this host in etcd")?;
    info!(
        lease = reg.state().lease,
        ttl_s = e.lease_ttl_s,
        "host registered in etcd"
    );
    Ok(Some(Cluster {
        store,
        reg,
        status: Mutex::new(RouteStatus::default()),
        sync_wait: Duration::from_secs(e.lease_ttl_s + 1),
    }))
}

/// One-minute load average times 100 (0 when unreadable).
pub(crate) fn load_x100() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |l| (l * 100.0) as u32)
}

impl Agent {
    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The route record pointing at `host` (this one or a peer).
    fn route_to(&self, host: &str, owner: &str) -> Result<RouteRecord> {
        let vtep = if host == self.cfg.host {
            self.cfg.underlay_ip
        } else {
            self.cfg
                .peer(host)
                .ok_or_else(|| anyhow!("route to unknown host {host:?}"))?
                .underlay_ip
        };
        Ok(RouteRecord {
            host: host.to_string(),
            vtep,
            owner: owner.to_string(),
            at_ms: now_ms(),
        })
    }

    /// The record a container has in etcd while it runs on `host`.
    pub(crate) fn container_record(
        spec: &ContainerSpec,
        host: &str,
        job: Option<&str>,
    ) -> ContainerRecord {
        ContainerRecord {
            name: spec.name.clone(),
            host: host.to_string(),
            ip: spec.ip,
            ipv6: spec.ipv6,
            mac: spec.mac.to_ascii_lowercase(),
            job: job.map(str::to_string),
        }
    }

    /// Claims a new container's name and addresses in etcd, with its route here.
    pub(crate) async fn claim_in_etcd(&self, spec: &ContainerSpec) -> Result<(), ClusterError> {
        let Some(c) = self.cluster() else {
            return Ok(());
        };
        let rec = Self::container_record(spec, &self.cfg.host, None);
        let route = self
            .route_to(&self.cfg.host, &spec.name)
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        c.store.claim(&rec, &route).await?;
        Ok(())
    }

    /// Records every container running here in etcd (at start): adopted when etcd has no
    /// record of it, refused (and reported) when etcd says another host owns it.
    pub(crate) async fn adopt_containers(&self) {
        let Some(c) = self.cluster() else { return };
        let specs: Vec<ContainerSpec> = lock(&self.containers)
            .values()
            .filter(|r| !r.migrating)
            .map(|r| r.spec.clone())
            .collect();
        for spec in specs {
            let rec = Self::container_record(&spec, &self.cfg.host, None);
            let route = match self.route_to(&self.cfg.host, &spec.name) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "no route for a local container");
                    continue;
                }
            };
            match c.store.adopt(&rec, &route).await {
                Ok(rev) => {
                    info!(container = %spec.name, fence = rev, "container recorded in etcd")
                }
                Err(e) => {
                    warn!(container = %spec.name, error = %e, "container not recorded in etcd")
                }
            }
        }
    }

    /// The fencing token of a container about to move: the `mod_revision` of its record, which
    /// must name this host. A container without a record (made before the cluster used etcd)
    /// is recorded first.
    pub(crate) async fn fence_of(&self, spec: &ContainerSpec) -> Result<Option<i64>> {
        let Some(c) = self.cluster() else {
            return Ok(None);
        };
        match c.store.container(&spec.name).await? {
            Some((rec, rev)) if rec.host == self.cfg.host => Ok(Some(rev)),
            Some((rec, _)) => bail!(
                "etcd says container {:?} runs on {}, not here ({}): refusing to move a copy the cluster does not own",
                spec.name,
                rec.host,
                self.cfg.host
            ),
            None => {
                let rec = Self::container_record(spec, &self.cfg.host, None);
                let route = self.route_to(&self.cfg.host, &spec.name)?;
                Ok(Some(c.store.adopt(&rec, &route).await?))
            }
        }
    }

    /// A migration's network switch through etcd: the route moves to `to` only while the
    /// container's record is at `fence`; this host's FDB follows at once, and the switch
    /// returns once every live host has programmed it.
    pub(crate) async fn switch_route(
        &self,
        name: &str,
        fence: i64,
        mac: &str,
        to: &str,
    ) -> Result<()> {
        let c = self
            .cluster()
            .ok_or_else(|| anyhow!("no etcd configured"))?;
        let t = std::time::Instant::now();
        let route = self.route_to(to, name)?;
        let synced = c
            .store
            .watch_synced()
            .await
            .with_context(|| format!("switching {name}'s route to {to} in etcd"))?;
        let rev = c
            .store
            .switch_route(name, fence, mac, &route)
            .await
            .with_context(|| format!("switching {name}'s route to {to} in etcd"))?;
        self.set_route_local(mac, Some(to))?;
        c.store
            .wait_synced(synced, rev, &self.cfg.host, c.sync_wait)
            .await
            .with_context(|| format!("switching {name}'s route to {to}"))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        self.metrics.observe_route_switch(ms / 1000.0);
        info!(container = name, %to, revision = rev, ms = format!("{ms:.1}"), "route switched in etcd, programmed on every live host");
        Ok(())
    }

    /// Points a container's route back here (a rollback), if etcd still says this host owns
    /// it. When etcd cannot be reached the route is retried in the background (for up to ten
    /// minutes): the container runs here meanwhile, unreachable on the overlay but never
    /// reachable twice. Without etcd: every host is told directly.
    pub(crate) async fn route_back_here(
        &self,
        name: &str,
        mac: &str,
        tolerate: Option<&str>,
    ) -> Result<()> {
        let Some(c) = self.cluster() else {
            let me = self.cfg.host.clone();
            return self.route_everywhere(mac, Some(&me), tolerate).await;
        };
        let back = RouteBack {
            store: c.store.clone(),
            me: self.cfg.host.clone(),
            vtep: self.cfg.underlay_ip,
            vxlan: self.cfg.vxlan.clone(),
            name: name.to_string(),
            mac: mac.to_string(),
        };
        match back.try_once().await {
            Ok(()) => Ok(()),
            Err(e) if e.is_unavailable() => {
                warn!(container = name, error = %e, "etcd unreachable: the route back here is retried in the background");
                tokio::spawn(async move {
                    for _ in 0..600 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        match back.try_once().await {
                            Ok(()) => {
                                info!(container = %back.name, "route pointed back here in etcd");
                                return;
                            }
                            Err(e) if e.is_unavailable() => continue,
                            Err(e) => {
                                warn!(container = %back.name, error = %e, "route not pointed back here");
                                return;
                            }
                        }
                    }
                });
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The destination's commit point in etcd: the container's record moves here (with the
    /// job) only while it is at `fence`. An unknown outcome (etcd did not answer) is read back
    /// until known, for up to 10 s.
    pub(crate) async fn commit_in_etcd(
        &self,
        job: &str,
        spec: &ContainerSpec,
        fence: Option<i64>,
    ) -> Result<(), ClusterError> {
        let Some(c) = self.cluster() else {
            return Ok(());
        };
        let Some(fence) = fence else {
            return Err(ClusterError::Config(format!(
                "job {job}: its source gave no fencing revision, so the container's ownership cannot move in etcd (is the source configured with etcd?)"
            )));
        };
        let rec = Self::container_record(spec, &self.cfg.host, Some(job));
        let route = self
            .route_to(&self.cfg.host, &spec.name)
            .map_err(|e| ClusterError::Config(e.to_string()))?;
        match c.store.commit_owner(fence, &rec, &route).await {
            Ok(rev) => {
                info!(%job, container = %spec.name, revision = rev, "ownership moved here in etcd");
                Ok(())
            }
            // Moved by this very job already (an earlier attempt whose answer was lost).
            Err(e @ ClusterError::Fenced { .. }) => match self.owned_here_by(&spec.name, job).await
            {
                Some(true) => Ok(()),
                _ => Err(e),
            },
            Err(e) if e.is_unavailable() => {
                // Applied or not? Read until etcd says.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    match c.store.container(&spec.name).await {
                        Ok(Some((r, _)))
                            if r.host == self.cfg.host && r.job.as_deref() == Some(job) =>
                        {
                            return Ok(())
                        }
                        Ok(_) => {
                            return Err(ClusterError::Taken(format!(
                            "job {job}: the container's ownership did not move here in etcd ({e})"
                        )))
                        }
                        Err(_) if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e2) => return Err(e2),
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Whether etcd says container `name` is owned here by job `job` (`None`: etcd cannot say).
    pub(crate) async fn owned_here_by(&self, name: &str, job: &str) -> Option<bool> {
        let c = self.cluster()?;
        match c.store.container(name).await {
            Ok(Some((r, _))) => Some(r.host == self.cfg.host && r.job.as_deref() == Some(job)),
            Ok(None) => Some(false),
            Err(_) => None,
        }
    }

    /// Removes a container's records from etcd (it was deleted here).
    pub(crate) async fn release_in_etcd(&self, name: &str) {
        if let Some(c) = self.cluster() {
            if let Err(e) = c.store.release(name, &self.cfg.host).await {
                warn!(container = name, error = %e, "container's records not removed from etcd");
            }
        }
    }

    /// The SDN controller: keeps this host's VXLAN FDB equal to the routes in etcd, forever.
    pub(crate) async fn route_controller(self: std::sync::Arc<Self>) {
        let Some(c) = self.cluster() else { return };
        let mut first = true;
        loop {
            if let Err(e) = self.follow_routes(c, first).await {
                let was = {
                    let mut s = lock(&c.status);
                    std::mem::replace(&mut s.watching, false)
                };
                if was || first {
                    warn!(error = %format!("{e:#}"), "watch of the routes in etcd broke; listing them again once etcd answers");
                }
            }
            first = false;
            lock(&c.status).resyncs += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Lists the routes, programs them, then follows the watch until it breaks.
    async fn follow_routes(&self, c: &Cluster, first: bool) -> Result<()> {
        let (routes, rev) = c.store.routes().await?;
        let changes = {
            let fdb = Fdb::open(&self.cfg.vxlan)?;
            let current: Vec<(String, std::net::Ipv4Addr)> = fdb
                .entries()?
                .into_iter()
                .filter(|e| !e.mac.is_zero())
                .map(|e| (e.mac.to_string(), e.dst))
                .collect();
            let plan = plan::reconcile(&routes, &self.cfg.host, &current);
            self.apply_fdb(&fdb, &plan)?;
            plan.len()
        };
        c.reg.synced(rev).await?;
        let mut known: BTreeMap<String, ()> = routes.keys().map(|k| (k.clone(), ())).collect();
        {
            let mut s = lock(&c.status);
            s.watching = true;
            s.revision = rev;
            s.routes = known.len() as u64;
            s.changes += changes as u64;
        }
        info!(
            revision = rev,
            routes = known.len(),
            changed = changes,
            first,
            "overlay FDB agrees with etcd; watching its routes"
        );
        let mut stream = c.store.watch_routes(rev + 1).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                bail!("etcd cancelled the watch: {}", resp.cancel_reason());
            }
            let mut last = None;
            let fdb = Fdb::open(&self.cfg.vxlan)?;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let Some(mac) = c.store.keys().mac_of_route(&key).map(str::to_string) else {
                    continue;
                };
                let change = match ev.event_type() {
                    etcd_client::EventType::Put => {
                        let route: RouteRecord =
                            match ferry_cluster::records::decode(&key, kv.value()) {
                                Ok(r) => r,
                                Err(e) => {
                                    warn!(error = %e, "ignoring a route Ferry cannot read");
                                    continue;
                                }
                            };
                        lock(&c.status).last_lag_ms = now_ms().saturating_sub(route.at_ms);
                        known.insert(mac.clone(), ());
                        plan::for_route(&mac, &route, &self.cfg.host)
                    }
                    etcd_client::EventType::Delete => {
                        known.remove(&mac);
                        FdbChange::Remove { mac }
                    }
                };
                self.apply_fdb(&fdb, std::slice::from_ref(&change))?;
                last = Some(kv.mod_revision());
            }
            let rev = resp.header().map_or(0, |h| h.revision());
            if let Some(applied) = last {
                c.reg.synced(applied.max(rev)).await?;
                let mut s = lock(&c.status);
                s.revision = applied.max(rev);
                s.routes = known.len() as u64;
                s.changes += 1;
            }
        }
        bail!("etcd ended the watch")
    }

    fn apply_fdb(&self, fdb: &Fdb, changes: &[FdbChange]) -> Result<()> {
        for ch in changes {
            match ch {
                FdbChange::Point { mac, vtep } => {
                    let m: Mac = mac.parse().map_err(|e| anyhow!("{e}"))?;
                    fdb.set(m, *vtep)?;
                }
                FdbChange::Remove { mac } => {
                    let m: Mac = mac.parse().map_err(|e| anyhow!("{e}"))?;
                    fdb.remove(m)?;
                }
            }
        }
        Ok(())
    }

    /// Refreshes this host's record (free memory, CPUs, load, containers) every 5 s.
    pub(crate) async fn host_updates(self: std::sync::Arc<Self>) {
        let Some(c) = self.cluster() else { return };
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let n = lock(&self.containers).len() as u32;
            let _ = c
                .reg
                .update(|r| {
                    r.mem_available_bytes = ferry_runtime::util::mem_available_bytes().unwrap_or(0);
                    r.load_x100 = load_x100();
                    r.containers = n;
                })
                .await;
        }
    }
}

/// A rollback's route back to its source, through etcd.
struct RouteBack {
    store: Store,
    me: String,
    vtep: std::net::Ipv4Addr,
    vxlan: String,
    name: String,
    mac: String,
}

impl RouteBack {
    async fn try_once(&self) -> Result<(), ClusterError> {
        let name = &self.name;
        let Some((rec, rev)) = self.store.container(name).await? else {
            return Err(ClusterError::Taken(format!(
                "container {name:?} has no record in etcd: its route is left alone"
            )));
        };
        if rec.host != self.me {
            return Err(ClusterError::Taken(format!(
                "etcd says container {name:?} runs on {} now: its route is not taken back",
                rec.host
            )));
        }
        let route = RouteRecord {
            host: self.me.clone(),
            vtep: self.vtep,
            owner: name.clone(),
            at_ms: now_ms(),
        };
        self.store
            .switch_route(name, rev, &self.mac, &route)
            .await?;
        // The watch does the same; this is only sooner.
        if let (Ok(fdb), Ok(m)) = (Fdb::open(&self.vxlan), self.mac.parse::<Mac>()) {
            let _ = fdb.remove(m);
        }
        Ok(())
    }
}
