//! `ferry drain HOST`: moves every container off a host.
//!
//! Destinations are chosen before anything moves ([`plan`]): containers, largest memory
//! first, each go to the host with the most memory left after what was already placed there
//! (`MemAvailable` as each agent reports it, less a reserve), memory-heavy containers kept
//! apart when another host can take them, the one-minute load per CPU breaking ties. A
//! container that fits nowhere refuses the whole drain, so a host is never left half drained
//! for lack of room. The moves then run at most `parallel` at a time, each reported as it
//! ends, with a summary.

use std::time::Instant;

use anyhow::{bail, Result};
use ferry_api::{MigrateMode, MigrateRequest};
use futures_util::stream::{self, StreamExt};
use migrate_core::Outcome;
use serde::Serialize;

use crate::lab::Lab;

/// A host that may receive containers.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its name.
    pub host: String,
    /// Memory available to new containers, bytes.
    pub mem_available_bytes: u64,
    /// CPUs.
    pub cpus: u32,
    /// One-minute load average.
    pub load1: f64,
    /// Containers it runs already.
    pub containers: u32,
}

/// A container to move, with its resident memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ToMove {
    /// Its name.
    pub name: String,
    /// Its memory, bytes.
    pub memory_bytes: u64,
}

/// How placement treats memory.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Memory each destination keeps free after its new containers, bytes.
    pub reserve_bytes: u64,
    /// Containers with at least this much memory are heavy: two go to one host only when
    /// no other can take the second.
    pub heavy_bytes: u64,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            reserve_bytes: 256 << 20,
            heavy_bytes: 512 << 20,
        }
    }
}

/// Chooses a destination for each container (in the order they should move: largest
/// first), or says why the rest of the cluster lacks room.
pub fn plan(
    containers: &[ToMove],
    hosts: &[Candidate],
    p: Placement,
) -> std::result::Result<Vec<(String, String)>, String> {
    if hosts.is_empty() {
        return Err("no other host runs containers".into());
    }
    let mut order: Vec<&ToMove> = containers.iter().collect();
    order.sort_by(|a, b| {
        b.memory_bytes
            .cmp(&a.memory_bytes)
            .then_with(|| a.name.cmp(&b.name))
    });
    // Per host: memory placed there so far, heavy containers placed there, containers placed.
    let mut placed: Vec<(u64, u32, u32)> = vec![(0, 0, 0); hosts.len()];
    let mut out = vec![];
    for c in order {
        let heavy = c.memory_bytes >= p.heavy_bytes;
        let left_after = |i: usize| -> Option<u64> {
            hosts[i]
                .mem_available_bytes
                .checked_sub(placed[i].0)?
                .checked_sub(c.memory_bytes)?
                .checked_sub(p.reserve_bytes)
        };
        // Heavy neighbours first, then the share of the host's available memory taken once
        // this one is there (in tenths: hosts within 10% of each other are as good), then
        // containers per CPU, then load per CPU.
        let key = |i: usize| {
            let heavy_here = if heavy { placed[i].1 } else { 0 };
            let avail = hosts[i].mem_available_bytes.max(1) as f64;
            let share = ((placed[i].0 + c.memory_bytes) as f64 / avail * 10.0).floor() as u64;
            let cpus = f64::from(hosts[i].cpus.max(1));
            let per_cpu = f64::from(hosts[i].containers + placed[i].2 + 1) / cpus;
            (heavy_here, share, per_cpu, hosts[i].load1 / cpus)
        };
        let best = (0..hosts.len())
            .filter(|i| left_after(*i).is_some())
            .min_by(|i, j| {
                let (a, b) = (key(*i), key(*j));
                a.0.cmp(&b.0)
                    .then(a.1.cmp(&b.1))
                    .then(a.2.total_cmp(&b.2))
                    .then(a.3.total_cmp(&b.3))
                    .then_with(|| hosts[*i].host.cmp(&hosts[*j].host))
            });
        match best {
            Some(i) => {
                placed[i].0 += c.memory_bytes;
                placed[i].2 += 1;
                if heavy {
                    placed[i].1 += 1;
                }
                out.push((c.name.clone(), hosts[i].host.clone()));
            }
            None => {
                let most = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        (
                            h.mem_available_bytes.saturating_sub(placed[i].0),
                            h.host.as_str(),
                        )
                    })
                    .max()
                    .unwrap_or((0, ""));
                return Err(format!(
                    "the rest of the cluster lacks room: {} needs {} MiB (plus a reserve of {} MiB), and the most any other host has left is {} MiB on {}",
                    c.name,
                    c.memory_bytes >> 20,
                    p.reserve_bytes >> 20,
                    most.0 >> 20,
                    most.1
                ));
            }
        }
    }
    Ok(out)
}

/// One move of a drain.
#[derive(Debug, Clone, Serialize)]
pub struct DrainMove {
    /// The container.
    pub container: String,
    /// Where it went (or was to go).
    pub to: String,
    /// `completed`, `rolled_back` or `failed`.
    pub result: String,
    /// Why, when it did not move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its frozen time, ms.
    pub frozen_ms: f64,
    /// Its whole migration, ms.
    pub total_ms: f64,
    /// Bytes it sent.
    pub bytes_sent: u64,
}

/// What a drain did.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    /// The drained host.
    pub host: String,
    /// Moves, in the order they ended.
    pub moves: Vec<DrainMove>,
    /// Containers moved.
    pub moved: usize,
    /// Containers that stayed (rolled back or failed).
    pub stayed: usize,
    /// Most migrations at a time.
    pub parallel: usize,
    /// The whole drain, ms.
    pub total_ms: f64,
}

/// Drains `host`: plans every move (refusing when the rest lacks room), then runs them at
/// most `parallel` at a time; `say` gets each line of progress.
pub async fn drain(
    lab: &Lab,
    host: &str,
    parallel: usize,
    mode: MigrateMode,
    placement: Placement,
    dry_run: bool,
    say: &(dyn Fn(String) + Sync),
) -> Result<DrainReport> {
    if !(1..=16).contains(&parallel) {
        bail!("--parallel must be 1-16, got {parallel}");
    }
    let h = lab.host(host)?;
    if !h.runs_containers {
        bail!("{host} runs no containers: nothing to drain");
    }
    let t = Instant::now();
    let containers = lab.client(host)?.containers().await?;
    if let Some(c) = containers.iter().find(|c| c.state != "running") {
        bail!(
            "{} on {host} is {}: only running containers move; start or remove it before draining",
            c.spec.name,
            c.state
        );
    }
    let mut hosts = vec![];
    let mut unreachable = vec![];
    for o in lab.container_hosts().filter(|o| o.name != host) {
        match lab.client(&o.name)?.host_info().await {
            Ok(i) => hosts.push(Candidate {
                host: i.host,
                mem_available_bytes: i.mem_available_bytes,
                cpus: i.cpus,
                load1: i.load1,
                containers: i.containers,
            }),
            Err(e) => unreachable.push(format!("{}: {e:#}", o.name)),
        }
    }
    for u in &unreachable {
        say(format!(
            "warning: {u} does not answer; it gets no containers"
        ));
    }
    let to_move: Vec<ToMove> = containers
        .iter()
        .map(|c| ToMove {
            name: c.spec.name.clone(),
            memory_bytes: c.memory_bytes.unwrap_or(0),
        })
        .collect();
    let moves = plan(&to_move, &hosts, placement).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut per_host: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, to) in &moves {
        *per_host.entry(to.as_str()).or_default() += 1;
    }
    say(format!(
        "drain {host}: {} container{} to {}; {} at a time{}",
        moves.len(),
        if moves.len() == 1 { "" } else { "s" },
        per_host
            .iter()
            .map(|(h, n)| format!("{h} ({n})"))
            .collect::<Vec<_>>()
            .join(", "),
        parallel,
        if dry_run {
            " (dry run: nothing moves)"
        } else {
            ""
        }
    ));
    if dry_run || moves.is_empty() {
        return Ok(DrainReport {
            host: host.into(),
            moves: moves
                .into_iter()
                .map(|(container, to)| DrainMove {
                    container,
                    to,
                    result: "planned".into(),
                    reason: None,
                    frozen_ms: 0.0,
                    total_ms: 0.0,
                    bytes_sent: 0,
                })
                .collect(),
            moved: 0,
            stayed: 0,
            parallel,
            total_ms: t.elapsed().as_secs_f64() * 1000.0,
        });
    }
    let total = moves.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<DrainMove> = stream::iter(moves)
        .map(|(name, to)| {
            let req = MigrateRequest {
                mode,
                ..crate::ops::stop_copy_to(&to)
            };
            let done = &done;
            async move {
                let r = crate::ops::migrate(lab, &name, &req, false).await;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let m = match r {
                    Ok(rep) => {
                        let (result, reason) = match &rep.outcome {
                            Outcome::Completed => ("completed", None),
                            Outcome::RolledBack { reason } => ("rolled_back", Some(reason.clone())),
                            Outcome::Failed { reason } => ("failed", Some(reason.clone())),
                            Outcome::InProgress => ("failed", Some("did not finish".into())),
                        };
                        DrainMove {
                            container: name,
                            to,
                            result: result.into(),
                            reason,
                            frozen_ms: rep.frozen_ms,
                            total_ms: rep.total_ms,
                            bytes_sent: rep.bytes_sent,
                        }
                    }
                    Err(e) => DrainMove {
                        container: name,
                        to,
                        result: "failed".into(),
                        reason: Some(format!("{e:#}")),
                        frozen_ms: 0.0,
                        total_ms: 0.0,
                        bytes_sent: 0,
                    },
                };
                say(match &m.reason {
                    None => format!(
                        "[{n}/{total}] {} -> {}: moved, frozen {:.1} ms, {:.2} s",
                        m.container,
                        m.to,
                        m.frozen_ms,
                        m.total_ms / 1000.0
                    ),
                    Some(why) => format!(
                        "[{n}/{total}] {} -> {}: {} ({why}); it stays on {host}",
                        m.container,
                        m.to,
                        m.result.replace('_', " ")
                    ),
                });
                m
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let moved = results.iter().filter(|m| m.result == "completed").count();
    let report = DrainReport {
        host: host.into(),
        stayed: results.len() - moved,
        moved,
        moves: results,
        parallel,
        total_ms: t.elapsed().as_secs_f64() * 1000.0,
    };
    say(format!(
        "drained {host}: {} moved, {} stayed, in {:.2} s",
        report.moved,
        report.stayed,
        report.total_ms / 1000.0
    ));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn host(name: &str, avail_mib: u64, load1: f64) -> Candidate {
        Candidate {
            host: name.into(),
            mem_available_bytes: avail_mib * MIB,
            cpus: 2,
            load1,
            containers: 0,
        }
    }

    fn c(name: &str, mib: u64) -> ToMove {
        ToMove {
            name: name.into(),
            memory_bytes: mib * MIB,
        }
    }

    #[test]
    fn heavy_containers_go_apart_and_the_rest_to_the_most_free_memory() {
        let hosts = [host("h2", 4096, 0.0), host("h3", 4096, 0.0)];
        let containers = [c("big1", 1024), c("big2", 1024), c("a", 10), c("b", 10)];
        let plan = plan(&containers, &hosts, Placement::default()).unwrap();
        let to = |n: &str| plan.iter().find(|(c, _)| c == n).unwrap().1.clone();
        assert_ne!(to("big1"), to("big2"), "{plan:?}");
        assert_ne!(to("a"), to("b"), "{plan:?}");
        // Largest first.
        assert_eq!(plan[0].0, "big1");
    }

    #[test]
    fn a_heavy_container_shares_a_host_only_when_no_other_can_take_it() {
        // h3 cannot take a second big one: both go to h2.
        let hosts = [host("h2", 8192, 0.0), host("h3", 700, 0.0)];
        let containers = [c("big1", 1024), c("big2", 1024)];
        let plan = plan(&containers, &hosts, Placement::default()).unwrap();
        assert!(plan.iter().all(|(_, h)| h == "h2"), "{plan:?}");
    }

    #[test]
    fn small_containers_spread_by_count_when_memory_is_alike() {
        let hosts = [host("h2", 20_000, 0.0), host("h3", 20_000, 0.0)];
        let mut containers: Vec<ToMove> = (0..10).map(|i| c(&format!("c{i}"), 5)).collect();
        containers.push(c("big", 600));
        let plan = plan(&containers, &hosts, Placement::default()).unwrap();
        let on = |h: &str| plan.iter().filter(|(_, t)| t == h).count();
        assert_eq!((on("h2"), on("h3")), (6, 5), "{plan:?}");
    }

    #[test]
    fn load_breaks_ties() {
        let hosts = [host("h2", 4096, 1.9), host("h3", 4096, 0.1)];
        let plan = plan(&[c("a", 10)], &hosts, Placement::default()).unwrap();
        assert_eq!(plan, vec![("a".to_string(), "h3".to_string())]);
    }

    #[test]
    fn a_container_that_fits_nowhere_refuses_the_whole_drain() {
        let hosts = [host("h2", 1024, 0.0), host("h3", 1024, 0.0)];
        let e = plan(
            &[c("small", 10), c("huge", 2048)],
            &hosts,
            Placement::default(),
        )
        .unwrap_err();
        assert!(e.contains("huge") && e.contains("lacks room"), "{e}");
        // Room that runs out as containers are placed counts too.
        let e = plan(
            &[c("a", 600), c("b", 600), c("c", 600)],
            &hosts,
            Placement::default(),
        )
        .unwrap_err();
        assert!(e.contains("lacks room"), "{e}");
        assert!(plan(&[c("a", 1)], &[], Placement::default()).is_err());
    }
}
