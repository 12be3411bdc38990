//! Published ports and the redirector (`ferry run --publish HOSTPORT:PORT`).
//!
//! A host publishes the ports of the containers it runs and, for `redirect_ttl_s` after one
//! left, those of the containers that left it (a redirect): its NAT rules send connections to
//! the container's overlay address, which moves with the container, so a client that keeps
//! using the old host's address, and a connection it already had, follow the container
//! across the overlay (`ferry_runtime::publish`). Redirects are recorded in etcd when the
//! cluster uses it (`P/redirects/NAME/HOST` under a lease of `redirect_ttl_s`: removed when
//! the lease ends or the container is removed), else in `redirects.json` of the state
//! directory. One task keeps the rules equal to what should be published, woken by every
//! change and every 2 s.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_api::{ContainerSpec, Published};
use ferry_cluster::records::now_ms;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{journal, lock, Agent};

/// A container that left this host, whose published ports this host still forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Redirect {
    /// The container.
    pub name: String,
    /// Its overlay address.
    pub ip: Ipv4Addr,
    /// Its published ports.
    pub published: Vec<Published>,
    /// The host it went to.
    pub to: String,
    /// Until when (Unix ms).
    pub until_ms: u64,
}

const REDIRECTS_FILE: &str = "redirects.json";

impl Agent {
    /// Why `published` cannot be published here for container `name`, if it cannot: no
    /// overlay address to answer from, a port this agent uses, or a port another container
    /// (here or redirected here) has.
    pub(crate) fn publish_conflict(&self, name: &str, published: &[Published]) -> Option<String> {
        if published.is_empty() {
            return None;
        }
        if self.cfg.overlay_host_ip.is_none() {
            return Some(format!(
                "host {} cannot publish ports: its agent has no overlay address (overlay_host_ip)",
                self.cfg.host
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in published {
            if !seen.insert(p.host_port) {
                return Some(format!("port {} is published twice", p.host_port));
            }
            let own = [
                Some(self.cfg.quic_port),
                self.cfg.api_listen.map(|a| a.port()),
            ];
            if own.contains(&Some(p.host_port)) {
                return Some(format!(
                    "port {} of {} is the agent's own",
                    p.host_port, self.cfg.host
                ));
            }
        }
        let taken = lock(&self.containers)
            .values()
            .filter(|c| c.spec.name != name)
            .flat_map(|c| {
                c.spec
                    .published
                    .iter()
                    .map(|p| (p.host_port, c.spec.name.clone()))
                    .collect::<Vec<_>>()
            })
            .chain(
                lock(&self.redirects)
                    .iter()
                    .filter(|r| r.name != name)
                    .flat_map(|r| {
                        r.published
                            .iter()
                            .map(|p| (p.host_port, r.name.clone()))
                            .collect::<Vec<_>>()
                    }),
            )
            .find(|(port, _)| seen.contains(port));
        taken.map(|(port, other)| {
            format!(
                "port {port} of {} is already published by container {other:?}",
                self.cfg.host
            )
        })
    }

    /// Keeps forwarding a container's published ports from here after it left for `to`.
    pub(crate) async fn record_redirect(&self, spec: &ContainerSpec, to: &str) {
        if spec.published.is_empty() || self.cfg.overlay_host_ip.is_none() {
            return;
        }
        let r = Redirect {
            name: spec.name.clone(),
            ip: spec.ip,
            published: spec.published.clone(),
            to: to.to_string(),
            until_ms: now_ms() + self.cfg.redirect_ttl_s * 1000,
        };
        {
            let mut all = lock(&self.redirects);
            all.retain(|o| o.name != r.name);
            all.push(r.clone());
        }
        self.save_redirects();
        if let Some(c) = self.cluster() {
            let json = serde_json::to_vec(&r).unwrap_or_default();
            if let Err(e) = c
                .store
                .put_redirect(&r.name, &self.cfg.host, json, self.cfg.redirect_ttl_s)
                .await
            {
                warn!(container = %r.name, error = %e, "redirect not recorded in etcd; kept here");
            }
        }
        info!(container = %r.name, %to, ttl_s = self.cfg.redirect_ttl_s, ports = r.published.len(), "published ports redirected to the container's new host");
        self.publish_kick.notify_one();
    }

    fn save_redirects(&self) {
        let all = lock(&self.redirects).clone();
        let path = self.cfg.state_dir.join(REDIRECTS_FILE);
        let r = serde_json::to_vec_pretty(&all)
            .map_err(anyhow::Error::from)
            .and_then(|b| journal::write_durable(&path, &b).map_err(Into::into));
        if let Err(e) = r {
            warn!(error = %format!("{e:#}"), path = %path.display(), "cannot persist the redirects");
        }
    }

    /// The redirects an earlier run recorded.
    pub(crate) fn load_redirects(state_dir: &std::path::Path) -> Vec<Redirect> {
        std::fs::read(state_dir.join(REDIRECTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Makes the NAT rules what should be published now: containers here, and redirects
    /// that have not ended (with etcd: those etcd still holds).
    async fn reconcile_publish(&self) -> Result<()> {
        let Some(snat) = self.cfg.overlay_host_ip else {
            return Ok(());
        };
        let now = now_ms();
        // Redirects end with their time, or (etcd) when etcd no longer holds them.
        let in_etcd = match self.cluster() {
            Some(c) => match c.store.redirects_of(&self.cfg.host).await {
                Ok(names) => Some(names),
                Err(e) => {
                    warn!(error = %e, "cannot read the redirects in etcd; keeping this host's");
                    None
                }
            },
            None => None,
        };
        let changed = {
            let mut all = lock(&self.redirects);
            let before = all.len();
            all.retain(|r| {
                r.until_ms > now && in_etcd.as_ref().is_none_or(|names| names.contains(&r.name))
            });
            before != all.len()
        };
        if changed {
            self.save_redirects();
        }
        let underlay = self.cfg.underlay_ip;
        let rule = |ip: Ipv4Addr, p: &Published| ferry_runtime::publish::Rule {
            underlay,
            host_port: p.host_port,
            container: ip,
            port: p.port,
        };
        let mut rules: Vec<ferry_runtime::publish::Rule> = lock(&self.containers)
            .values()
            .flat_map(|c| {
                c.spec
                    .published
                    .iter()
                    .map(|p| rule(c.spec.ip, p))
                    .collect::<Vec<_>>()
            })
            .collect();
        let local: Vec<String> = lock(&self.containers).keys().cloned().collect();
        rules.extend(
            lock(&self.redirects)
                .iter()
                .filter(|r| !local.contains(&r.name))
                .flat_map(|r| {
                    r.published
                        .iter()
                        .map(|p| rule(r.ip, p))
                        .collect::<Vec<_>>()
                }),
        );
        rules.sort();
        if *lock(&self.published_now) == Some(rules.clone()) {
            return Ok(());
        }
        let r2 = rules.clone();
        tokio::task::spawn_blocking(move || ferry_runtime::publish::apply(&r2, snat))
            .await
            .context("publishing ports")??;
        info!(rules = rules.len(), "published ports updated");
        *lock(&self.published_now) = Some(rules);
        Ok(())
    }

    /// Keeps the published ports up to date, forever.
    pub(crate) async fn publish_loop(self: std::sync::Arc<Self>) {
        if self.cfg.overlay_host_ip.is_none() {
            return;
        }
        loop {
            if let Err(e) = self.reconcile_publish().await {
                warn!(error = %format!("{e:#}"), "published ports not updated");
            }
            tokio::select! {
                _ = self.publish_kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// Gives the bridge this host's overlay address (for the answers of published ports) and,
    /// with etcd, routes the bridge's MAC here.
    pub(crate) async fn setup_host_overlay(&self) -> Result<()> {
        let Some(ip) = self.cfg.overlay_host_ip else {
            return Ok(());
        };
        ferry_runtime::util::run(
            "ip",
            [
                "addr",
                "replace",
                &format!("{ip}/{}", self.cfg.overlay_prefix_len),
                "dev",
                &self.cfg.bridge,
            ],
        )
        .with_context(|| format!("giving {} the overlay address {ip}", self.cfg.bridge))?;
        if let Some(c) = self.cluster() {
            let mac =
                std::fs::read_to_string(format!("/sys/class/net/{}/address", self.cfg.bridge))
                    .with_context(|| format!("reading {}'s MAC", self.cfg.bridge))?;
            let route = ferry_cluster::RouteRecord {
                host: self.cfg.host.clone(),
                vtep: self.cfg.underlay_ip,
                owner: format!("host {}", self.cfg.host),
                at_ms: now_ms(),
            };
            c.store.put_route(mac.trim(), &route).await?;
        }
        Ok(())
    }
}
