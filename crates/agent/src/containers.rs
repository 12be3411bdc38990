//! A host's containers: create (with its name and address checked and reserved across the
//! hosts), stop, start, exec, delete.

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{bail, Result};
use ferry_api::{ContainerInfo, ContainerSpec, CreateContainer};
use tracing::{info, warn};

use crate::http;
use crate::images;
use crate::proto::{PeerRequest, PeerResponse};
use crate::{lock, Agent, ContainerRecord, CRIU_CONF};

impl Agent {
    /// Containers on every reachable host (this one included).
    /// Every container of every host. Fails, naming the host, if a peer cannot tell: a name or
    /// address checked against an incomplete list could be taken twice.
    async fn list_everywhere(&self) -> Result<Vec<ContainerInfo>> {
        let mut all = self.list();
        let futs = self.cfg.peers.iter().map(|p| async move {
            (
                p.host.clone(),
                tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    self.ask(&p.host, &PeerRequest::List),
                )
                .await,
            )
        });
        for (host, r) in futures_util::future::join_all(futs).await {
            match r {
                Ok(Ok(PeerResponse::List { containers })) => all.extend(containers),
                Ok(Ok(other)) => bail!("{host} answered the container list with {other:?}"),
                Ok(Err(e)) => {
                    return Err(e.context(format!(
                        "cannot list the containers of {host}, so names and addresses cannot be checked; retry when it is back"
                    )))
                }
                Err(_) => bail!(
                    "{host} did not list its containers within 5 s, so names and addresses cannot be checked; retry when it answers"
                ),
            }
        }
        Ok(all)
    }

    /// Creates and starts a container here.
    pub(crate) async fn create(
        &self,
        req: CreateContainer,
    ) -> Result<ContainerInfo, http::ApiFailure> {
        use http::ApiFailure as F;
        let (name, ip) = (req.name.as_str(), req.ip);
        if !self.cfg.runs_containers {
            return Err(F::bad_request(format!(
                "host {} does not run containers (it is the lab's client host)",
                self.cfg.host
            )));
        }
        if !ferry_api::valid_name(name) {
            return Err(F::bad_request(format!(
                "invalid container name {name:?}: use 1-32 letters, digits, '-' or '_'"
            )));
        }
        if let Some(why) = self.publish_conflict(name, &req.publish) {
            return Err(F::conflict(why));
        }
        if let Some(ip) = ip {
            ferry_api::Overlay {
                first: self.cfg.overlay_first,
                prefix_len: self.cfg.overlay_prefix_len,
                reserved: &self.cfg.reserved,
            }
            .check(ip)
            .map_err(F::bad_request)?;
        }
        let preq = ferry_runtime::process::Request {
            args: req.args.clone(),
            entrypoint: req.entrypoint.clone(),
            env: req.env.clone(),
            workdir: req.workdir.clone(),
            user: req.user.clone(),
            cap_add: req.cap_add.clone(),
            cap_drop: req.cap_drop.clone(),
            memory_bytes: req.memory_bytes,
            cpus: req.cpus,
        };
        // What can be checked without the image's root: before anything is reserved.
        if req.image.is_none() {
            ferry_runtime::process::command(&preq, None).map_err(F::bad_request)?;
        }
        ferry_runtime::process::capabilities(&preq.cap_add, &preq.cap_drop)
            .map_err(F::bad_request)?;
        ferry_runtime::process::workdir(&preq, None).map_err(F::bad_request)?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let resources = ferry_runtime::process::resources(&preq, cpus).map_err(F::bad_request)?;
        // With etcd, names and addresses are claimed there atomically (below); without, every
        // peer is asked what it runs.
        let (all, in_etcd) = match self.cluster() {
            Some(c) => {
                let used = c
                    .store
                    .addresses()
                    .await
                    .map_err(|e| F::unavailable(e.to_string()))?;
                (vec![], used)
            }
            None => (
                self.list_everywhere()
                    .await
                    .map_err(|e| F::unavailable(format!("{e:#}")))?,
                vec![],
            ),
        };
        if let Some(c) = all.iter().find(|c| c.spec.name == name) {
            return Err(F::conflict(format!(
                "a container named {name:?} already exists on {}",
                c.host
            )));
        }
        // Reserve name and address for the time of the creation: two concurrent requests must
        // not build in the same bundle or get the same address.
        let ip = {
            let mut creating = lock(&self.creating);
            if creating.iter().any(|(n, _)| n == name) || lock(&self.containers).contains_key(name)
            {
                return Err(F::conflict(format!(
                    "a container named {name:?} already exists or is being created on {}",
                    self.cfg.host
                )));
            }
            let used: Vec<Ipv4Addr> = all
                .iter()
                .map(|c| c.spec.ip)
                .chain(creating.iter().map(|(_, ip)| *ip))
                .chain(self.cfg.reserved.iter().copied())
                .chain(in_etcd.iter().filter_map(|a| match a {
                    std::net::IpAddr::V4(v4) => Some(*v4),
                    std::net::IpAddr::V6(_) => None,
                }))
                .collect();
            let ip = match ip {
                Some(ip) if used.contains(&ip) => {
                    let whose = if self.cluster().is_some() {
                        " (etcd's address leases)"
                    } else {
                        ""
                    };
                    return Err(F::conflict(format!(
                        "address {ip} is already in use{whose}"
                    )));
                }
                Some(ip) => ip,
                None => ferry_runtime::util::first_free(
                    self.cfg.overlay_first,
                    self.cfg.overlay_last,
                    &used,
                )
                .ok_or_else(|| F::conflict("no free overlay address left".into()))?,
            };
            creating.push((name.to_string(), ip));
            ip
        };
        let r = self
            .create_reserved(name, ip, preq, resources, req.image, req.publish.clone())
            .await;
        lock(&self.creating).retain(|(n, _)| n != name);
        r
    }

    async fn create_reserved(
        &self,
        name: &str,
        ip: Ipv4Addr,
        preq: ferry_runtime::process::Request,
        resources: ferry_api::Resources,
        image: Option<String>,
        published: Vec<ferry_api::Published>,
    ) -> Result<ContainerInfo, http::ApiFailure> {
        use http::ApiFailure as F;
        // An image's tree is materialized once per host; every container from it shares it.
        let (image, lower) = match image {
            Some(img) => {
                let store = Arc::clone(&self.store);
                let (r, layer) = tokio::task::spawn_blocking(move || {
                    let rec = store.image(&img)?;
                    let layer = store.materialize(&rec.tree)?;
                    Ok::<_, shared_fs::FsError>((rec, layer))
                })
                .await
                .map_err(|e| F::internal(e.to_string()))?
                .map_err(images::failure)?;
                (
                    Some(ferry_api::ImageRef {
                        name: r.name,
                        tree: r.tree,
                        config: r.config,
                    }),
                    Some(layer),
                )
            }
            None => (None, None),
        };
        let mut spec = ContainerSpec {
            name: name.to_string(),
            ip,
            mac: ferry_api::mac_for_ip(ip),
            prefix_len: self.cfg.overlay_prefix_len,
            // Every container has IPv6 where the host has it.
            ipv6: std::path::Path::new("/proc/sys/net/ipv6")
                .is_dir()
                .then(|| ferry_api::ipv6_for_ip(ip)),
            args: vec![],
            image,
            process: Default::default(),
            resources,
            published,
        };
        // The name and both addresses, taken in etcd in one transaction (no-op without).
        self.claim_in_etcd(&spec).await.map_err(|e| match e {
            ferry_cluster::ClusterError::Taken(m) => F::conflict(m),
            e => F::unavailable(e.to_string()),
        })?;
        let l = self.layout(name);
        let console = self.log_dir(name);
        let spawn = {
            let (shim, max) = (self.console_shim(), self.cfg.log_max_bytes);
            move |dir: &std::path::Path| ferry_runtime::console::Console::spawn(&shim?, dir, max)
        };
        let (runc, workload, host, bridge, conf) = (
            self.runc.clone(),
            self.cfg.workload_bin.clone(),
            self.cfg.host.clone(),
            self.cfg.bridge.clone(),
            CRIU_CONF,
        );
        let (n, s) = (name.to_string(), spec.clone());
        // Ok(Err(why)): the request cannot run on this root (a user the image lacks, say).
        let r = tokio::task::spawn_blocking(move || -> Result<Result<ContainerSpec, String>> {
            let mut s = s;
            let r = (|| {
                // Runc knows no container of this name (checked above): anything in its
                // cgroup is left over from one that did not end cleanly.
                ferry_runtime::cgroup_tree::kill_cgroup_procs(&l.cgroup);
                ferry_runtime::bundle::remove_bundle(&l);
                match &lower {
                    Some(layer) => ferry_runtime::bundle::mount_overlay_rootfs(&l, layer)?,
                    None => ferry_runtime::bundle::build_rootfs(&l.rootfs(), &workload)?,
                }
                let config = s.image.as_ref().and_then(|i| i.config.as_ref());
                match ferry_runtime::process::resolve(&preq, config, &n, &l.rootfs()) {
                    Ok((args, process)) => (s.args, s.process) = (args, process),
                    Err(why) => return Ok(Err(why)),
                }
                ferry_runtime::bundle::make_mount_points(&l.rootfs())?;
                ferry_runtime::bundle::write_config(&l, &s, &host, Some(conf))?;
                ferry_runtime::netns::create_netns(&l, &s, &bridge)?;
                // A new container: nothing of an earlier one of this name is its output.
                let _ = std::fs::remove_dir_all(&console);
                let con = spawn(&console)?;
                runc.start(&n, &l.bundle, Some(&con))?;
                Ok(Ok(s))
            })();
            if !matches!(r, Ok(Ok(_))) {
                runc.delete_force(&n);
                ferry_runtime::netns::delete_netns(&l);
                ferry_runtime::bundle::remove_bundle(&l);
                let _ = std::fs::remove_dir_all(&console);
            }
            r
        })
        .await
        .map_err(|e| F::internal(e.to_string()))?;
        match r {
            Ok(Ok(s)) => spec = s,
            Ok(Err(why)) => {
                self.release_in_etcd(name).await;
                return Err(F::bad_request(why));
            }
            Err(e) => {
                self.release_in_etcd(name).await;
                return Err(F::internal(format!("{e:#}")));
            }
        }
        let rec = ContainerRecord {
            spec: spec.clone(),
            migrating: false,
        };
        lock(&self.containers).insert(name.to_string(), rec.clone());
        self.save_containers();
        self.publish_kick.notify_one();
        // With etcd the claim set the route, and every host follows it.
        if self.cluster().is_none() {
            if let Err(e) = self
                .route_everywhere(&spec.mac, Some(&self.cfg.host.clone()), None)
                .await
            {
                warn!(container = name, error = %format!("{e:#}"), "overlay not updated on every host");
            }
        }
        info!(container = name, ip = %spec.ip, "container started");
        Ok(self.container_info(&rec))
    }

    /// Stops and removes a container here.
    pub(crate) async fn delete(&self, name: &str) -> Result<(), http::ApiFailure> {
        let rec = lock(&self.containers).get(name).cloned();
        let Some(rec) = rec else {
            return Err(http::ApiFailure::unknown_container(name, &self.cfg.host));
        };
        if rec.migrating {
            return Err(http::ApiFailure::conflict(format!(
                "container {name:?} is being migrated"
            )));
        }
        let (runc, l, n) = (self.runc.clone(), self.layout(name), name.to_string());
        let console = self.log_dir(name);
        tokio::task::spawn_blocking(move || {
            ferry_runtime::netns::delete_netns(&l);
            runc.delete_force(&n);
            ferry_runtime::bundle::remove_bundle(&l);
            let _ = std::fs::remove_dir_all(console);
        })
        .await
        .map_err(|e| http::ApiFailure::internal(e.to_string()))?;
        lock(&self.containers).remove(name);
        self.save_containers();
        lock(&self.redirects).retain(|r| r.name != name);
        self.publish_kick.notify_one();
        if self.cluster().is_some() {
            self.release_in_etcd(name).await;
        } else if let Err(e) = self.route_everywhere(&rec.spec.mac, None, None).await {
            warn!(container = name, error = %format!("{e:#}"), "overlay not updated on every host");
        }
        Ok(())
    }
}

/// The most an exec answer carries of each output stream.
const EXEC_OUTPUT_CAP: usize = 1 << 20;

impl Agent {
    /// The container's record, if it is here and not migrating.
    fn settled(&self, name: &str) -> Result<ContainerRecord, http::ApiFailure> {
        match lock(&self.containers).get(name) {
            None => Err(http::ApiFailure::unknown_container(name, &self.cfg.host)),
            Some(r) if r.migrating => Err(http::ApiFailure::conflict(format!(
                "container {name:?} is migrating: wait for its job to end (`ferry jobs`)"
            ))),
            Some(r) => Ok(r.clone()),
        }
    }

    /// Whether runc runs the container (running or paused).
    pub(crate) fn is_running(&self, name: &str) -> bool {
        self.runc
            .state(name)
            .is_some_and(|s| s.status == "running" || s.status == "paused")
    }

    /// Stops a container here: TERM, then KILL after `grace`. It keeps its name, address,
    /// root and network; [`Agent::start`] runs it again.
    pub(crate) async fn stop(
        &self,
        name: &str,
        grace: std::time::Duration,
    ) -> Result<ContainerInfo, http::ApiFailure> {
        let rec = self.settled(name)?;
        let (runc, n) = (self.runc.clone(), name.to_string());
        tokio::task::spawn_blocking(move || runc.stop(&n, grace))
            .await
            .map_err(|e| http::ApiFailure::internal(e.to_string()))?
            .map_err(|e| http::ApiFailure::internal(format!("stopping {name}: {e:#}")))?;
        info!(container = name, "container stopped");
        Ok(self.container_info(&rec))
    }

    /// Runs a stopped container again, with the same root, address and process.
    pub(crate) async fn start(&self, name: &str) -> Result<ContainerInfo, http::ApiFailure> {
        let rec = self.settled(name)?;
        if self.is_running(name) {
            return Err(http::ApiFailure::conflict(format!(
                "container {name:?} already runs on {}",
                self.cfg.host
            )));
        }
        let (runc, l, n) = (self.runc.clone(), self.layout(name), name.to_string());
        let (console, shim, max) = (
            self.log_dir(name),
            self.console_shim(),
            self.cfg.log_max_bytes,
        );
        tokio::task::spawn_blocking(move || {
            // A stop leaves nothing in runc; a container that ended by itself is still listed.
            runc.delete_force(&n);
            // Its output goes on in the same log.
            let con = ferry_runtime::console::Console::spawn(&shim?, &console, max)?;
            runc.start(&n, &l.bundle, Some(&con))
        })
        .await
        .map_err(|e| http::ApiFailure::internal(e.to_string()))?
        .map_err(|e| http::ApiFailure::internal(format!("starting {name}: {e:#}")))?;
        info!(container = name, "container started again");
        Ok(self.container_info(&rec))
    }

    /// Runs a command in a running container.
    pub(crate) async fn exec(
        &self,
        name: &str,
        req: ferry_api::ExecRequest,
    ) -> Result<ferry_api::ExecResult, http::ApiFailure> {
        let bad = http::ApiFailure::bad_request;
        if req.args.is_empty() || req.args.len() > 4096 {
            return Err(bad(format!(
                "args must name a command (1 to 4096 entries), got {}",
                req.args.len()
            )));
        }
        if let Some(e) = req.env.iter().find(|e| !e.contains('=')) {
            return Err(bad(format!("env entry {e:?} is not KEY=VALUE")));
        }
        if let Some(d) = req.workdir.as_deref().filter(|d| !d.starts_with('/')) {
            return Err(bad(format!("workdir {d:?} is not absolute")));
        }
        let timeout = req.timeout_s.unwrap_or(60);
        if !(1..=3600).contains(&timeout) {
            return Err(bad(format!(
                "timeout_s must be between 1 and 3600, got {timeout}"
            )));
        }
        self.settled(name)?;
        if !self.is_running(name) {
            return Err(http::ApiFailure::conflict(format!(
                "container {name:?} is stopped: `ferry start {name}` runs it again"
            )));
        }
        let (runc, n) = (self.runc.clone(), name.to_string());
        let out = tokio::task::spawn_blocking(move || {
            runc.exec(
                &n,
                &req.args,
                (&req.env, req.workdir.as_deref()),
                std::time::Duration::from_secs(timeout),
                EXEC_OUTPUT_CAP,
            )
        })
        .await
        .map_err(|e| http::ApiFailure::internal(e.to_string()))?
        .map_err(|e| http::ApiFailure::internal(format!("running a command in {name}: {e:#}")))?;
        Ok(ferry_api::ExecResult {
            exit_code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            truncated: out.truncated,
            output_held_open: out.output_held_open,
        })
    }
}
