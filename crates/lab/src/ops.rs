//! Operations on the lab's agents through their API (list, find, migrate with progress, the
//! summary of a report), shared by the CLI, the demo and the bench.

use anyhow::{bail, Result};
use ferry_api::{ContainerInfo, FaultHooks, JobEventKind, MigrateMode, MigrateRequest};
use migrate_core::{Outcome, Phase, Report};

use crate::lab::Lab;
pub use crate::progress::{Follow, Progress};

/// Containers on every container host of the lab.
pub async fn ps(lab: &Lab) -> Result<Vec<ContainerInfo>> {
    let mut all = vec![];
    let (mut asked, mut failed) = (0, vec![]);
    for h in lab.container_hosts() {
        asked += 1;
        match lab.client(&h.name)?.containers().await {
            Ok(mut cs) => all.append(&mut cs),
            // One host down must not hide the others' containers.
            Err(e) => failed.push(format!("{}: {e:#}", h.name)),
        }
    }
    if asked > 0 && failed.len() == asked {
        bail!("no agent answered: {}", failed.join("; "));
    }
    for f in &failed {
        eprintln!("warning: cannot list containers on {f}");
    }
    all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    Ok(all)
}
/// Finds a container by name anywhere in the lab.
pub async fn find(lab: &Lab, name: &str) -> Result<ContainerInfo> {
    let all = ps(lab).await?;
    match all.iter().find(|c| c.spec.name == name) {
        Some(c) => Ok(c.clone()),
        None if all.is_empty() => bail!(
            "unknown container {name:?}: no containers are running (start one with `ferry run`)"
        ),
        None => bail!(
            "unknown container {name:?}: running containers are {}",
            all.iter()
                .map(|c| c.spec.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
pub async fn find_job(lab: &Lab, id: &str) -> Result<(String, ferry_api::JobInfo)> {
    for h in lab.container_hosts() {
        if let Ok(info) = lab.client(&h.name)?.job(id).await {
            return Ok((h.name.clone(), info));
        }
    }
    bail!("unknown job {id:?} on every host of the lab")
}
pub async fn start_migration(
    lab: &Lab,
    name: &str,
    req: &MigrateRequest,
) -> Result<(String, String)> {
    lab.host(&req.to)?;
    let c = find(lab, name).await?;
    let job = lab.client(&c.host)?.migrate(name, req).await?;
    Ok((c.host, job.id))
}
/// Starts a migration and follows it to its end; shows progress when `progress`.
pub async fn migrate(
    lab: &Lab,
    name: &str,
    req: &MigrateRequest,
    progress: bool,
) -> Result<Report> {
    let follow = if progress { Follow::Bar } else { Follow::Quiet };
    let (src, id) = start_migration(lab, name, req).await?;
    let client = lab.client(&src)?;
    let mut shown = Progress::new(follow, (name, &src, &req.to, &id), budget(req));
    let mut report = None;
    client
        .follow(&id, |ev| {
            shown.event(ev);
            if let JobEventKind::Finished { report: r } = &ev.kind {
                report = Some((**r).clone());
            }
        })
        .await?;
    match report {
        Some(r) => Ok(r),
        None => Ok(client.job(&id).await?.report),
    }
}

fn budget(req: &MigrateRequest) -> Option<f64> {
    req.precopy.as_ref().map(|p| p.downtime_budget_ms)
}

/// [`migrate`] for a person at a terminal: Ctrl-C cancels the job while it is before its
/// commit point (it rolls back; the report follows) and says so; after the commit point it
/// says how to follow the job and returns `None` at once.
pub async fn migrate_interruptible(
    lab: &Lab,
    name: &str,
    req: &MigrateRequest,
    follow: Follow,
) -> Result<Option<Report>> {
    let (src, id) = start_migration(lab, name, req).await?;
    let client = lab.client(&src)?;
    let shown = std::cell::RefCell::new(Progress::new(
        follow,
        (name, &src, &req.to, &id),
        budget(req),
    ));
    // Messages go to stderr, above the status line.
    let say = |s: String| shown.borrow().message(&s);
    let mut report = None;
    let mut interrupted = false;
    {
        let events = client.follow(&id, |ev| {
            shown.borrow_mut().event(ev);
            if let JobEventKind::Finished { report: r } = &ev.kind {
                report = Some((**r).clone());
            }
        });
        tokio::pin!(events);
        loop {
            tokio::select! {
                r = &mut events => { r?; break; }
                _ = tokio::signal::ctrl_c() => {
                    if interrupted {
                        // A second Ctrl-C: leave the job to itself.
                        say(format!("job {id} goes on without this command: `ferry job {id} --wait` follows it"));
                        return Ok(None);
                    }
                    interrupted = true;
                    match client.cancel(&id).await {
                        Ok(_) => say(format!(
                            "Ctrl-C: cancelling job {id}: it rolls back and {name} stays on {src} (Ctrl-C again to stop following)"
                        )),
                        Err(e) => {
                            say(format!(
                                "Ctrl-C: job {id} cannot be cancelled any more ({e:#}); it finishes on its own: `ferry job {id} --wait` follows it"
                            ));
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
    match report {
        Some(r) => Ok(Some(r)),
        None => Ok(Some(client.job(&id).await?.report)),
    }
}

/// The exit code for a finished migration: 0 moved, 2 rolled back (the container stays where
/// it was), 1 failed or not finished.
pub fn exit_code(r: &Report) -> std::process::ExitCode {
    std::process::ExitCode::from(match r.outcome {
        Outcome::Completed => 0,
        Outcome::RolledBack { .. } => 2,
        Outcome::Failed { .. } | Outcome::InProgress => 1,
    })
}

/// A plain stop-and-copy migration to `to`.
pub fn stop_copy_to(to: &str) -> MigrateRequest {
    MigrateRequest {
        to: to.into(),
        mode: MigrateMode::StopCopy,
        precopy: None,
        deadlines: Default::default(),
        faults: FaultHooks::default(),
        ignore_cpu_features: false,
        hooks: vec![],
    }
}
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
pub fn print_summary(r: &Report) {
    match &r.outcome {
        Outcome::Completed => println!(
            "{} moved from {} to {} (job {})",
            r.container, r.from, r.to, r.id
        ),
        Outcome::RolledBack { reason } => println!(
            "{} NOT moved: rolled back, it stays on {} (job {})\n  reason: {reason}",
            r.container, r.from, r.id
        ),
        Outcome::Failed { reason } => {
            println!("{} migration FAILED (job {}): {reason}", r.container, r.id)
        }
        Outcome::InProgress => {
            println!("{} migration still in progress (job {})", r.container, r.id)
        }
    }
    let ran = |p: Phase| r.phases.iter().any(|t| t.phase == p);
    if ran(Phase::Dump) {
        let mut parts = vec![format!("dump {:.1}", r.freeze_to_dump_ms)];
        for (p, label, ms) in [
            (Phase::Transfer, "transfer", r.transfer_ms),
            (Phase::Restore, "restore", r.restore_ms),
            (Phase::Commit, "network switch", r.network_switch_ms),
        ] {
            if ran(p) && ms > 0.0 {
                parts.push(format!("{label} {ms:.1}"));
            }
        }
        println!(
            "  frozen {:.1} ms ({}; {} round trips between the hosts); total {:.1} ms; {} sent",
            r.frozen_ms,
            parts.join(", "),
            r.frozen_round_trips,
            r.total_ms,
            human_bytes(r.bytes_sent)
        );
    } else {
        println!(
            "  never frozen; total {:.1} ms; {} sent",
            r.total_ms,
            human_bytes(r.bytes_sent)
        );
    }
    let phases: Vec<String> = phase_totals(r)
        .into_iter()
        .map(|(p, n, ms)| match n {
            1 => format!("{} {ms:.1} ms", p.name()),
            n => format!("{} x{n} {ms:.1} ms", p.name()),
        })
        .collect();
    println!("  phases: {}", phases.join(", "));
    if !r.rounds.is_empty() {
        let sent: u64 = r.rounds.iter().map(|x| x.bytes_sent).sum();
        println!(
            "  pre-copy: {} round{}, {} sent while the container ran; stopped: {}",
            r.rounds.len(),
            if r.rounds.len() == 1 { "" } else { "s" },
            human_bytes(sent),
            r.precopy_stop.map_or("-", |s| s.name())
        );
    }
    if let Some(b) = &r.base {
        if b.held {
            println!("  image {}: {} held its base layer already", b.image, r.to);
        } else {
            println!(
                "  image {}: {} of the base layer's {} chunks crossed ({}) in {:.1} s, {:.0} MiB/s, while the container ran",
                b.image,
                b.chunks_sent,
                b.chunks,
                human_bytes(b.chunk_bytes),
                b.ms / 1000.0,
                b.chunk_bytes as f64 / (1 << 20) as f64 / (b.ms / 1000.0).max(1e-3)
            );
        }
    }
    if let Some(t) = &r.tracking {
        let by: Vec<String> = t
            .processes
            .iter()
            .map(|(method, n)| format!("{n} by {method}"))
            .collect();
        println!("  tracking: processes followed {}", by.join(", "));
        for f in &t.fallbacks {
            println!(
                "    pid {} ({}) by {}: {}",
                f.pid, f.command, f.method, f.reason
            );
        }
        if t.fallbacks_not_listed > 0 {
            println!("    and {} more by page hashes", t.fallbacks_not_listed);
        }
    }
    if let Some(m) = &r.memory {
        match (m.restore.as_str(), &m.fill_error) {
            ("lazy", Some(e)) => println!("  memory: lazy restore FAILED after the commit: {e}"),
            ("lazy", None) => println!(
                "  memory: lazy restore; {} round trips while frozen; {} pages written while frozen ({} dirty, {} never copied, {} changed by the dump, {} that cannot be lazy), {} lazy{}",
                m.frozen_round_trips,
                m.final_dirty_pages + m.unplaced_pages + m.reread_pages + m.eager_pages,
                m.final_dirty_pages,
                m.unplaced_pages,
                m.reread_pages,
                m.eager_pages,
                m.lazy_pages,
                match (m.fill_ms, m.fill_mib_s) {
                    (Some(ms), Some(rate)) => format!(", filled in {ms:.0} ms ({rate:.0} MiB/s)"),
                    _ => String::new(),
                }
            ),
            _ => println!(
                "  memory: every page in the final dump ({})",
                m.not_lazy.as_deref().unwrap_or("not lazy")
            ),
        }
        if m.remote_pages > 0 {
            println!(
                "  post-copy: {} pages left at {} at the freeze; {} fetched from its frozen copy ({} on a fault of the container)",
                m.remote_pages,
                r.from,
                m.fetched_pages.map_or("-".into(), |n| n.to_string()),
                m.fetched_on_fault.map_or("-".into(), |n| n.to_string()),
            );
        }
        if let Some(i) = &m.integrity {
            println!(
                "  integrity: {} lazy pages checked against the source's frozen copy, {} mismatched, {} corrected{}",
                i.pages_checked,
                i.mismatches,
                i.corrected,
                i.incomplete.as_deref().map_or(String::new(), |w| format!(" (incomplete: {w})"))
            );
        }
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
}
/// The phases that ran, in the order they first ran: how often and for how long in all.
fn phase_totals(r: &Report) -> Vec<(Phase, usize, f64)> {
    let mut out: Vec<(Phase, usize, f64)> = vec![];
    for t in &r.phases {
        match out.iter_mut().find(|(p, _, _)| *p == t.phase) {
            Some((_, n, ms)) => {
                *n += 1;
                *ms += t.duration_ms;
            }
            None => out.push((t.phase, 1, t.duration_ms)),
        }
    }
    out
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}
