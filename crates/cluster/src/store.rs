//! The etcd client side: every read and transaction Ferry makes, each bounded by a timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::records::{decode, encode, now_ms};
use crate::{ClusterError, ContainerRecord, HostRecord, Keys, RouteRecord};

/// How an agent reaches etcd (the `etcd` section of its configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the members, e.g. `https://10.0.0.21:2379` (every member: the client
    /// fails over between them).
    pub endpoints: Vec<String>,
    /// Prefix of every key Ferry writes (default `/ferry`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Mutual TLS with etcd; absent with `https://` endpoints: the agent's own certificate
    /// and CA (`tls`).
    #[serde(default)]
    pub tls: Option<EtcdTls>,
    /// Time to live of the host's lease, seconds: a host that stops renewing it for this
    /// long is down for the rest of the cluster.
    #[serde(default = "default_ttl")]
    pub lease_ttl_s: u64,
    /// Longest wait for one etcd request, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_prefix() -> String {
    "/ferry".into()
}
fn default_ttl() -> u64 {
    5
}
fn default_timeout() -> u64 {
    2000
}

/// Certificate files for etcd's mutual TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// CA certificate that signed the members' certificates (PEM).
    pub ca: PathBuf,
    /// This client's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
}

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Store {
    client: Client,
    keys: Keys,
    endpoints: String,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.keys.prefix())
            .finish()
    }
}

impl Store {
    /// Connects (lazily: members are dialled as requests need them).
    pub async fn connect(cfg: &EtcdConfig, tls: Option<&EtcdTls>) -> Result<Store, ClusterError> {
        if cfg.endpoints.is_empty() {
            return Err(ClusterError::Config("no etcd endpoint given".into()));
        }
        if !(1..=300).contains(&cfg.lease_ttl_s) {
            return Err(ClusterError::Config(format!(
                "lease_ttl_s must be 1-300 seconds, got {}",
                cfg.lease_ttl_s
            )));
        }
        let endpoints = cfg.endpoints.join(",");
        let secure = cfg.endpoints.iter().all(|e| e.starts_with("https://"));
        if !secure && cfg.endpoints.iter().any(|e| e.starts_with("https://")) {
            return Err(ClusterError::Config(format!(
                "endpoints mix https:// and plain ones ({endpoints}): use one scheme"
            )));
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(cfg.timeout_ms))
            .with_keep_alive(
                Duration::from_secs(1),
                Duration::from_millis(cfg.timeout_ms),
            )
            .with_keep_alive_while_idle(true);
        if secure {
            let tls = tls.or(cfg.tls.as_ref()).ok_or_else(|| {
                ClusterError::Config("https:// endpoints need certificates (etcd.tls)".into())
            })?;
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map_err(|e| ClusterError::Config(format!("reading {}: {e}", p.display())))
            };
            let options = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                .identity(etcd_client::Identity::from_pem(
                    read(&tls.cert)?,
                    read(&tls.key)?,
                ));
            opts = opts.with_tls(options);
        }
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|source| ClusterError::Etcd {
                endpoints: endpoints.clone(),
                source,
            })?;
        Ok(Store {
            client,
            keys: Keys::new(&cfg.prefix),
            endpoints,
            timeout: Duration::from_millis(cfg.timeout_ms),
        })
    }

    /// The client's operations, each retried while its connection cannot be made (the
    /// request never left: a member is down and the client has not yet turned to another);
    /// [`Store::run`]'s timeout bounds the retries.
    fn ops(&self) -> Ops {
        Ops {
            client: self.client.clone(),
        }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The endpoints, for messages.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs one request under the timeout.
    async fn run<T>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(ClusterError::Etcd {
                endpoints: self.endpoints.clone(),
                source,
            }),
            Err(_) => Err(ClusterError::Timeout {
                endpoints: self.endpoints.clone(),
                ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    /// The cluster's current revision (a linearizable read: etcd's quorum answered).
    pub async fn revision(&self) -> Result<i64, ClusterError> {
        let mut c = self.ops();
        let key = self.keys.hosts();
        let r = self
            .run(c.get(key, Some(GetOptions::new().with_count_only())))
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Every value under `prefix`, decoded, with its key and `mod_revision`, and the
    /// revision of the read.
    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        prefix: String,
    ) -> Result<(Vec<(String, T, i64)>, i64), ClusterError> {
        let mut c = self.ops();
        let r = self
            .run(c.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        let mut out = vec![];
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match decode::<T>(&key, kv.value()) {
                Ok(v) => out.push((key, v, kv.mod_revision())),
                Err(e) => warn!(error = %e, "skipping a record Ferry cannot read"),
            }
        }
        Ok((out, rev))
    }

    /// Registers this host under a new lease and keeps the lease alive in the background
    /// (granting a new one if it lapsed, during a partition say) until the registration is
    /// dropped.
    pub async fn register(
        &self,
        rec: HostRecord,
        ttl_s: u64,
    ) -> Result<Registration, ClusterError> {
        let state = Arc::new(Mutex::new(LeaseState::default()));
        let record = Arc::new(Mutex::new(rec));
        let lease = self.grant_and_put(&record, ttl_s).await?;
        {
            let mut s = lock(&state);
            s.lease = lease;
            s.connected = true;
            s.renewed_ms = now_ms();
        }
        let task = tokio::spawn(keep_alive(
            self.clone(),
            Arc::clone(&record),
            Arc::clone(&state),
            ttl_s,
        ));
        Ok(Registration {
            store: self.clone(),
            record,
            state,
            task,
        })
    }

    async fn grant_and_put(
        &self,
        rec: &Arc<Mutex<HostRecord>>,
        ttl_s: u64,
    ) -> Result<i64, ClusterError> {
        let mut c = self.ops();
        let lease = self.run(c.lease_grant(ttl_s as i64, None)).await?.id();
        let (key, value) = {
            let mut r = lock(rec);
            r.at_ms = now_ms();
            (self.keys.host(&r.host), encode(&*r))
        };
        self.run(c.put(key, value, Some(PutOptions::new().with_lease(lease))))
            .await?;
        Ok(lease)
    }

    /// The hosts that are up.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        Ok(self
            .list::<HostRecord>(self.keys.hosts())
            .await?
            .0
            .into_iter()
            .map(|(_, h, _)| h)
            .collect())
    }

    /// A container's record and its `mod_revision` (the fencing token), if it has one.
    pub async fn container(
        &self,
        name: &str,
    ) -> Result<Option<(ContainerRecord, i64)>, ClusterError> {
        let mut c = self.ops();
        let key = self.keys.container(name);
        let r = self.run(c.get(key.clone(), None)).await?;
        match r.kvs().first() {
            Some(kv) => Ok(Some((decode(&key, kv.value())?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    /// Every container record.
    pub async fn containers(&self) -> Result<Vec<ContainerRecord>, ClusterError> {
        Ok(self
            .list::<ContainerRecord>(self.keys.containers())
            .await?
            .0
            .into_iter()
            .map(|(_, c, _)| c)
            .collect())
    }

    /// Every overlay address some container holds.
    pub async fn addresses(&self) -> Result<Vec<IpAddr>, ClusterError> {
        let mut c = self.ops();
        let r = self
            .run(c.get(
                self.keys.addresses(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ))
            .await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                let k = String::from_utf8_lossy(kv.key()).into_owned();
                k.rsplit('/').next().and_then(|a| a.parse().ok())
            })
            .collect())
    }

    /// Creates a container's record, its address leases (IPv4 and IPv6) and its route in one
    /// transaction that succeeds only if the name and both addresses are free: two hosts
    /// creating at once never get one name or one address twice. Returns the fencing token.
    pub async fn claim(
        &self,
        rec: &ContainerRecord,
        route: &RouteRecord,
    ) -> Result<i64, ClusterError> {
        let ck = self.keys.container(&rec.name);
        let mut free = vec![Compare::create_revision(ck.clone(), CompareOp::Equal, 0)];
        let mut puts = vec![TxnOp::put(ck.clone(), encode(rec), None)];
        for ip in addresses_of(rec) {
            let k = self.keys.address(ip);
            free.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
            puts.push(TxnOp::put(k, rec.name.clone(), None));
        }
        puts.push(TxnOp::put(self.keys.route(&rec.mac), encode(route), None));
        let mut c = self.ops();
        let r = self
            .run(c.txn(Txn::new().when(free).and_then(puts)))
            .await?;
        if r.succeeded() {
            return Ok(r.header().map_or(0, |h| h.revision()));
        }
        // Say which one was taken.
        if let Some((other, _)) = self.container(&rec.name).await? {
            return Err(ClusterError::Taken(format!(
                "a container named {:?} already exists on {} (etcd)",
                rec.name, other.host
            )));
        }
        Err(ClusterError::Taken(format!(
            "address {} is already in use (etcd)",
            rec.ip
        )))
    }

    /// Records a container found running on `rec.host` (an agent's start, or a container
    /// made before the cluster used etcd): created when etcd has no record, kept when it
    /// already names this host, refused when it names another one. The route is set to this
    /// host. Returns the fencing token.
    pub async fn adopt(
        &self,
        rec: &ContainerRecord,
        route: &RouteRecord,
    ) -> Result<i64, ClusterError> {
        match self.container(&rec.name).await? {
            None => self.claim(rec, route).await,
            Some((have, rev)) if have.host == rec.host => {
                let ck = self.keys.container(&rec.name);
                let mut c = self.ops();
                let r = self
                    .run(
                        c.txn(
                            Txn::new()
                                .when([Compare::mod_revision(ck, CompareOp::Equal, rev)])
                                .and_then([TxnOp::put(
                                    self.keys.route(&rec.mac),
                                    encode(route),
                                    None,
                                )]),
                        ),
                    )
                    .await?;
                if !r.succeeded() {
                    return Err(self.fenced(&rec.name, rev).await);
                }
                Ok(rev)
            }
            Some((have, _)) => Err(ClusterError::Taken(format!(
                "etcd says container {:?} runs on {}, not {}",
                rec.name, have.host, rec.host
            ))),
        }
    }

    /// Removes a container's record, address leases and route, if `host` still owns it.
    pub async fn release(&self, name: &str, host: &str) -> Result<(), ClusterError> {
        let Some((rec, rev)) = self.container(name).await? else {
            return Ok(());
        };
        if rec.host != host {
            return Err(ClusterError::Taken(format!(
                "etcd says container {name:?} runs on {}, not {host}: its records stay",
                rec.host
            )));
        }
        let ck = self.keys.container(name);
        let mut dels = vec![TxnOp::delete(ck.clone(), None)];
        for ip in addresses_of(&rec) {
            dels.push(TxnOp::delete(self.keys.address(ip), None));
        }
        dels.push(TxnOp::delete(self.keys.route(&rec.mac), None));
        dels.push(TxnOp::delete(
            self.keys.redirects_of(name),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ));
        let mut c = self.ops();
        let r = self
            .run(
                c.txn(
                    Txn::new()
                        .when([Compare::mod_revision(ck, CompareOp::Equal, rev)])
                        .and_then(dels),
                ),
            )
            .await?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(self.fenced(name, rev).await)
        }
    }

    /// A migration's network switch: points the container's MAC at `route.host`, only if the
    /// container's record is still at revision `fence` (its owner has not changed since the
    /// migration read it). Returns the revision of the switch.
    pub async fn switch_route(
        &self,
        name: &str,
        fence: i64,
        mac: &str,
        route: &RouteRecord,
    ) -> Result<i64, ClusterError> {
        let ck = self.keys.container(name);
        let mut c = self.ops();
        let r = self
            .run(
                c.txn(
                    Txn::new()
                        .when([Compare::mod_revision(ck, CompareOp::Equal, fence)])
                        .and_then([TxnOp::put(self.keys.route(mac), encode(route), None)]),
                ),
            )
            .await?;
        if r.succeeded() {
            Ok(r.header().map_or(0, |h| h.revision()))
        } else {
            Err(self.fenced(name, fence).await)
        }
    }

    /// A migration's commit point: the container's record names its new host (and the job),
    /// and its route points there, only if the record is still at revision `fence`.
    pub async fn commit_owner(
        &self,
        fence: i64,
        rec: &ContainerRecord,
        route: &RouteRecord,
    ) -> Result<i64, ClusterError> {
        let ck = self.keys.container(&rec.name);
        let mut c = self.ops();
        let r = self
            .run(
                c.txn(
                    Txn::new()
                        .when([Compare::mod_revision(ck.clone(), CompareOp::Equal, fence)])
                        .and_then([
                            TxnOp::put(ck, encode(rec), None),
                            TxnOp::put(self.keys.route(&rec.mac), encode(route), None),
                        ]),
                ),
            )
            .await?;
        if r.succeeded() {
            Ok(r.header().map_or(0, |h| h.revision()))
        } else {
            Err(self.fenced(&rec.name, fence).await)
        }
    }

    async fn fenced(&self, name: &str, fence: i64) -> ClusterError {
        let now = match self.container(name).await {
            Ok(Some((r, rev))) => format!("now on {} at revision {rev}", r.host),
            Ok(None) => "now without a record".into(),
            Err(e) => format!("now unreadable: {e}"),
        };
        ClusterError::Fenced {
            name: name.into(),
            fence,
            now,
        }
    }

    /// Sets a route that belongs to no container (a host of the overlay, such as the lab's
    /// client).
    pub async fn put_route(&self, mac: &str, route: &RouteRecord) -> Result<(), ClusterError> {
        let mut c = self.ops();
        self.run(c.put(self.keys.route(mac), encode(route), None))
            .await?;
        Ok(())
    }

    /// Every route (MAC to route) and the revision they were read at.
    pub async fn routes(&self) -> Result<(BTreeMap<String, RouteRecord>, i64), ClusterError> {
        let (list, rev) = self.list::<RouteRecord>(self.keys.routes()).await?;
        let routes = list
            .into_iter()
            .filter_map(|(k, r, _)| Some((self.keys.mac_of_route(&k)?.to_string(), r)))
            .collect();
        Ok((routes, rev))
    }

    /// Watches the routes from revision `from` on.
    pub async fn watch_routes(&self, from: i64) -> Result<WatchStream, ClusterError> {
        let mut c = self.ops();
        self.run(
            c.watch(
                self.keys.routes(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_progress_notify(),
                ),
            ),
        )
        .await
    }

    /// Opens a watch of how far each host has programmed the routes, from now on: open it
    /// before the change to wait for ([`Store::wait_synced`]), so that no report is missed.
    pub async fn watch_synced(&self) -> Result<WatchStream, ClusterError> {
        let mut c = self.ops();
        // No start revision: the watch begins at the current one and is in step with etcd
        // at once (a watch from an older revision is caught up in etcd's 100 ms batches).
        self.run(c.watch(self.keys.synced(), Some(WatchOptions::new().with_prefix())))
            .await
    }

    /// Waits until every registered host but `except` has programmed the routes up to
    /// revision `rev` (each host writes how far it got, [`Registration::synced`]), for at most
    /// `within`, reading `stream` ([`Store::watch_synced`], opened before the change). A host
    /// whose lease lapses meanwhile is not waited for. Errors name the hosts still behind.
    pub async fn wait_synced(
        &self,
        mut stream: WatchStream,
        rev: i64,
        except: &str,
        within: Duration,
    ) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + within;
        let behind = |hosts: &[HostRecord], synced: &BTreeMap<String, i64>| -> Vec<String> {
            hosts
                .iter()
                .filter(|h| h.host != except && synced.get(&h.host).is_none_or(|r| *r < rev))
                .map(|h| h.host.clone())
                .collect()
        };
        let prefix = self.keys.synced();
        let (hosts, (list, _)) = tokio::try_join!(self.hosts(), self.list::<i64>(prefix.clone()))?;
        let mut synced: BTreeMap<String, i64> = list
            .into_iter()
            .filter_map(|(k, r, _)| Some((k.strip_prefix(prefix.as_str())?.to_string(), r)))
            .collect();
        if behind(&hosts, &synced).is_empty() {
            return Ok(());
        }
        loop {
            let msg = tokio::time::timeout_at(deadline, stream.message()).await;
            match msg {
                Ok(Ok(Some(resp))) => {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        if let (Some(h), Ok(r)) = (
                            key.strip_prefix(prefix.as_str()),
                            decode::<i64>(&key, kv.value()),
                        ) {
                            synced.insert(h.to_string(), r);
                        }
                    }
                    if behind(&hosts, &synced).is_empty() {
                        return Ok(());
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    // Out of time, or the watch ended: hosts that went down meanwhile are
                    // not waited for.
                    let now_up = self.hosts().await?;
                    let still = behind(&now_up, &synced);
                    if still.is_empty() {
                        return Ok(());
                    }
                    return Err(ClusterError::Behind {
                        hosts: still.join(", "),
                        rev,
                        ms: within.as_millis() as u64,
                    });
                }
            }
        }
    }

    /// Records that `host` forwards container `name`'s published ports (for `ttl_s`).
    pub async fn put_redirect(
        &self,
        name: &str,
        host: &str,
        json: Vec<u8>,
        ttl_s: u64,
    ) -> Result<(), ClusterError> {
        let mut c = self.ops();
        let lease = self
            .run(c.lease_grant(ttl_s.max(1) as i64, None))
            .await?
            .id();
        self.run(c.put(
            self.keys.redirect(name, host),
            json,
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        Ok(())
    }

    /// The containers whose published ports `host` forwards (its redirects etcd holds).
    pub async fn redirects_of(&self, host: &str) -> Result<Vec<String>, ClusterError> {
        let mut c = self.ops();
        let r = self
            .run(c.get(
                self.keys.redirects(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ))
            .await?;
        let prefix = self.keys.redirects();
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                let k = String::from_utf8_lossy(kv.key()).into_owned();
                let (name, h) = k.strip_prefix(prefix.as_str())?.split_once('/')?;
                (h == host).then(|| name.to_string())
            })
            .collect())
    }

    /// Records a migration job's JSON (kept for a day).
    pub async fn put_job(&self, id: &str, json: Vec<u8>) -> Result<(), ClusterError> {
        let mut c = self.ops();
        let lease = self.run(c.lease_grant(24 * 3600, None)).await?.id();
        self.run(c.put(
            self.keys.job(id),
            json,
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        Ok(())
    }
}

/// See [`Store::ops`].
struct Ops {
    client: Client,
}

/// Whether a request failed before it reached etcd (so sending it again cannot apply it
/// twice): its connection could not be made.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && s.message().contains("connect")
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

async fn retry<T, Fut>(mut f: impl FnMut() -> Fut) -> Result<T, etcd_client::Error>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    loop {
        match f().await {
            Err(e) if never_sent(&e) => tokio::time::sleep(Duration::from_millis(25)).await,
            r => return r,
        }
    }
}

impl Ops {
    async fn get(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        retry(|| {
            let (mut c, k, o) = (self.client.clone(), key.clone(), opts.clone());
            async move { c.get(k, o).await }
        })
        .await
    }

    async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        opts: Option<PutOptions>,
    ) -> Result<etcd_client::PutResponse, etcd_client::Error> {
        let (key, value) = (key.into(), value.into());
        retry(|| {
            let (mut c, k, v, o) = (
                self.client.clone(),
                key.clone(),
                value.clone(),
                opts.clone(),
            );
            async move { c.put(k, v, o).await }
        })
        .await
    }

    async fn txn(&mut self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        retry(|| {
            let (mut c, t) = (self.client.clone(), txn.clone());
            async move { c.txn(t).await }
        })
        .await
    }

    async fn lease_grant(
        &mut self,
        ttl: i64,
        opts: Option<etcd_client::LeaseGrantOptions>,
    ) -> Result<etcd_client::LeaseGrantResponse, etcd_client::Error> {
        retry(|| {
            let (mut c, o) = (self.client.clone(), opts.clone());
            async move { c.lease_grant(ttl, o).await }
        })
        .await
    }

    async fn watch(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<WatchOptions>,
    ) -> Result<WatchStream, etcd_client::Error> {
        let key = key.into();
        retry(|| {
            let (mut c, k, o) = (self.client.clone(), key.clone(), opts.clone());
            async move { c.watch(k, o).await }
        })
        .await
    }
}

fn addresses_of(rec: &ContainerRecord) -> Vec<IpAddr> {
    let mut v = vec![IpAddr::V4(rec.ip)];
    if let Some(v6) = rec.ipv6 {
        v.push(IpAddr::V6(v6));
    }
    v
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the host's lease fares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LeaseState {
    /// The lease's id (0 before the first grant).
    pub lease: i64,
    /// Whether the last renewal reached etcd.
    pub connected: bool,
    /// When it was last renewed (Unix milliseconds).
    pub renewed_ms: u64,
    /// Leases granted after one lapsed.
    pub regranted: u64,
}

/// A host's registration: its record under a lease renewed in the background. Dropping it
/// stops the renewals (the record then lapses).
pub struct Registration {
    store: Store,
    record: Arc<Mutex<HostRecord>>,
    state: Arc<Mutex<LeaseState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// The lease's state now.
    pub fn state(&self) -> LeaseState {
        lock(&self.state).clone()
    }

    /// Writes new figures into the host's record (under the same lease).
    pub async fn update(&self, f: impl FnOnce(&mut HostRecord)) -> Result<(), ClusterError> {
        let (key, value) = {
            let mut r = lock(&self.record);
            f(&mut r);
            r.at_ms = now_ms();
            (self.store.keys.host(&r.host), encode(&*r))
        };
        let lease = lock(&self.state).lease;
        let mut c = self.store.ops();
        self.store
            .run(c.put(key, value, Some(PutOptions::new().with_lease(lease))))
            .await?;
        Ok(())
    }
}

impl Registration {
    /// Records that this host has programmed the routes up to revision `rev` (under its
    /// lease).
    pub async fn synced(&self, rev: i64) -> Result<(), ClusterError> {
        let key = self.store.keys.synced_host(&lock(&self.record).host);
        let lease = lock(&self.state).lease;
        let mut c = self.store.ops();
        self.store
            .run(c.put(key, encode(&rev), Some(PutOptions::new().with_lease(lease))))
            .await?;
        Ok(())
    }

    /// The store it was made with.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renews the lease every third of its time to live; a lease that lapsed (etcd says it is
/// gone) is granted anew and the record written again.
async fn keep_alive(
    store: Store,
    record: Arc<Mutex<HostRecord>>,
    state: Arc<Mutex<LeaseState>>,
    ttl_s: u64,
) {
    let every = Duration::from_millis((ttl_s * 1000 / 3).max(200));
    loop {
        tokio::time::sleep(every).await;
        let lease = lock(&state).lease;
        let mut c = store.client.clone();
        let renewed = async {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        let outcome = store.run(renewed).await;
        match outcome {
            Ok(Some(r)) if r.ttl() > 0 => {
                let mut s = lock(&state);
                s.connected = true;
                s.renewed_ms = now_ms();
            }
            Ok(_) => {
                // The lease lapsed (this host was cut off longer than its time to live).
                match store.grant_and_put(&record, ttl_s).await {
                    Ok(new) => {
                        let mut s = lock(&state);
                        info!(old = lease, new, "host lease lapsed; registered again");
                        s.lease = new;
                        s.connected = true;
                        s.renewed_ms = now_ms();
                        s.regranted += 1;
                    }
                    Err(e) => {
                        lock(&state).connected = false;
                        warn!(error = %e, "registering the host again failed");
                    }
                }
            }
            Err(e) => {
                let mut s = lock(&state);
                if s.connected {
                    warn!(error = %e, "renewing the host's lease failed");
                }
                s.connected = false;
            }
        }
    }
}
