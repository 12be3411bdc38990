//! The command-line front end: everything but the agent talks to agents over their API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use migrate_core::{Outcome, Phase, Report};
use orchestrator_shim::api::{
    ContainerInfo, CreateContainer, FaultHooks, JobEventKind, MigrateMode, MigrateRequest,
    Resolution,
};

use crate::lab::Lab;
use crate::{Cli, Cmd, ImageCmd, LabCmd};

pub(crate) fn dispatch(cli: Cli) -> Result<ExitCode> {
    if let Cmd::Agent { config } = &cli.cmd {
        let cfg = crate::config::AgentConfig::load(config)?;
        crate::agent::main(cfg)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Probe {
        target,
        interval_ms,
        duration_s,
        stop_file,
        threshold_ms,
        series,
        drain_s,
    } = &cli.cmd
    {
        if !(0.05..=10_000.0).contains(interval_ms) {
            bail!("--interval-ms must be between 0.05 and 10000, got {interval_ms}");
        }
        if !(0.0..=1e6).contains(threshold_ms) {
            bail!("--threshold-ms must be between 0 and 1000000, got {threshold_ms}");
        }
        if !(0.0..=600.0).contains(drain_s) {
            bail!("--drain-s must be between 0 and 600, got {drain_s}");
        }
        if duration_s.is_some_and(|d| !(0.0..=86_400.0).contains(&d)) {
            bail!("--duration-s must be between 0 and 86400");
        }
        let cfg = crate::probe::ProbeConfig {
            drain: Duration::from_secs_f64(*drain_s),
            target: *target,
            interval: Duration::from_secs_f64(interval_ms / 1000.0),
            duration: duration_s.map(Duration::from_secs_f64),
            stop_file: stop_file.clone(),
            threshold: Duration::from_secs_f64(threshold_ms / 1000.0),
            series: *series,
        };
        let report = crate::probe::run(&cfg)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(if report.intact {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        });
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(cli))
}

fn exe_paths() -> Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let workload = exe.with_file_name("ferry-workload");
    Ok((exe, workload))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let dir = cli.lab_dir.clone();
    match cli.cmd {
        Cmd::Lab { cmd } => {
            crate::util::require_root("ferry lab")?;
            match cmd {
                LabCmd::Up {
                    hosts,
                    link_rate,
                    lazy_daemon,
                } => {
                    let (exe, workload) = exe_paths()?;
                    crate::lab::up(&dir, hosts, &exe, &workload, link_rate, lazy_daemon).await?;
                }
                LabCmd::Shape { rate } => {
                    let mut lab = Lab::load(&dir)?;
                    let rate = match rate.as_str() {
                        "none" | "unshaped" => None,
                        r => Some(
                            r.parse::<crate::lab::LinkRate>()
                                .map_err(anyhow::Error::msg)?,
                        ),
                    };
                    crate::lab::set_link_rate(&mut lab, rate)?;
                    match rate {
                        Some(r) => eprintln!("lab: underlay links shaped to {r}"),
                        None => eprintln!("lab: underlay links unshaped"),
                    }
                }
                LabCmd::Down => {
                    crate::lab::down(&dir)?;
                    eprintln!("lab: down");
                }
                LabCmd::Rootfs { dir: out } => {
                    if out.exists() {
                        bail!("{} exists: give a new directory", out.display());
                    }
                    let (_, workload) = exe_paths()?;
                    crate::runtime::build_rootfs(&out, &workload)?;
                    eprintln!("lab: workload root filesystem written to {}", out.display());
                }
                LabCmd::StartAgent { host } => {
                    let lab = Lab::load(&dir)?;
                    let (exe, _) = exe_paths()?;
                    let h = lab.host(&host)?;
                    crate::lab::start_agent(
                        &exe,
                        &dir.join(format!("{host}.json")),
                        &h.log,
                        &dir.join(format!("{host}.pid")),
                    )?;
                    crate::lab::wait_agent(&lab, &host).await?;
                    eprintln!("lab: agent on {host} started");
                }
                LabCmd::Exec { host, cmd } => {
                    let lab = Lab::load(&dir)?;
                    crate::lab::exec(&lab, &host, &cmd)?;
                }
            }
        }
        Cmd::Run {
            on,
            name,
            ip,
            image,
            env,
            workdir,
            user,
            entrypoint,
            cap_add,
            cap_drop,
            memory,
            cpus,
            cmd,
        } => {
            let lab = Lab::load(&dir)?;
            let c = lab.client(&on)?;
            // `--env KEY` takes KEY's value here, as `docker run` does (unset: left out).
            let env = env
                .into_iter()
                .filter_map(|e| match e.contains('=') {
                    true => Some(e),
                    false => std::env::var(&e).ok().map(|v| format!("{e}={v}")),
                })
                .collect();
            let entrypoint = entrypoint.map(|e| match e.is_empty() {
                true => vec![],
                false => vec![e],
            });
            let info = c
                .create(&CreateContainer {
                    name,
                    ip,
                    args: cmd,
                    image,
                    entrypoint,
                    env,
                    workdir,
                    user,
                    cap_add,
                    cap_drop,
                    memory_bytes: memory,
                    cpus,
                })
                .await?;
            println!(
                "{} running on {} with IP {}{} (MAC {}){}",
                info.spec.name,
                info.host,
                info.spec.ip,
                info.spec
                    .ipv6
                    .map(|v6| format!(" and {v6}"))
                    .unwrap_or_default(),
                info.spec.mac,
                info.spec
                    .image
                    .as_ref()
                    .map(|i| format!(", from image {} (tree {})", i.name, &i.tree[..16]))
                    .unwrap_or_default()
            );
        }
        Cmd::Ps { json } => {
            let lab = Lab::load(&dir)?;
            let all = ps(&lab).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!(
                    "{:<20} {:<8} {:<15} {:<20} {:<10} PID",
                    "NAME", "HOST", "IP", "IPV6", "STATE"
                );
                for c in all {
                    println!(
                        "{:<20} {:<8} {:<15} {:<20} {:<10} {}",
                        c.spec.name,
                        c.host,
                        c.spec.ip,
                        c.spec
                            .ipv6
                            .map(|v6| v6.to_string())
                            .unwrap_or_else(|| "-".into()),
                        c.state,
                        c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
                    );
                }
            }
        }
        Cmd::DirtyRate {
            name,
            ms,
            throttle,
            json,
        } => {
            let lab = Lab::load(&dir)?;
            let c = find(&lab, &name).await?;
            let r = lab.client(&c.host)?.dirty_rate(&name, ms, throttle).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{name} on {}: {:.1} MiB/s written ({} pages in {:.0} ms, {} process(es), method {}{})",
                    r.host,
                    r.mib_per_s,
                    r.dirty_pages,
                    r.interval_ms,
                    r.processes,
                    r.method,
                    if r.new_mapping_pages > 0 {
                        format!(", plus {} pages of new mappings", r.new_mapping_pages)
                    } else {
                        String::new()
                    }
                );
                if let Some(c) = r.allowed_cores {
                    println!(
                        "  while throttled by {} % (allowed {c:.2} CPU cores)",
                        r.throttle_pct
                    );
                }
            }
        }
        Cmd::Image { cmd } => return image_cmd(&dir, cmd).await,
        Cmd::Rm { name } => {
            let lab = Lab::load(&dir)?;
            let c = find(&lab, &name).await?;
            lab.client(&c.host)?.delete(&name).await?;
            println!("{name} removed from {}", c.host);
        }
        Cmd::Migrate {
            name,
            to,
            json,
            pre_copy,
            downtime_budget_ms,
            max_rounds,
            when_stuck,
            post_copy,
            no_follow_writes,
            no_lazy_restore,
            lazy_min_mib,
            throttle_initial_pct,
            pause_in_transfer_ms,
            corrupt_images,
            corrupt_memory_page,
            hide_dirty_page,
            refuse_tracking,
            pause_before_commit_ms,
            corrupt_rootfs,
            pause_in_dump_ms,
            pause_in_restore_ms,
            pause_after_commit_ms,
            pause_in_phase,
            pause_in_phase_ms,
            dump_deadline_s,
            restore_deadline_s,
            ignore_cpu_features,
            detach,
        } => {
            let lab = Lab::load(&dir)?;
            let faults = FaultHooks {
                pause_in_transfer_ms,
                corrupt_images,
                corrupt_memory_page,
                hide_dirty_page,
                refuse_tracking,
                pause_before_commit_ms,
                corrupt_rootfs,
                pause_in_dump_ms,
                pause_in_restore_ms,
                pause_after_commit_ms,
                pause_in_phase: pause_in_phase
                    .map(|p| {
                        serde_json::from_value(serde_json::Value::String(p.clone()))
                            .map_err(|_| anyhow::anyhow!("--pause-in-phase {p:?}: not a phase"))
                    })
                    .transpose()?,
                pause_in_phase_ms,
            };
            let mut deadlines = orchestrator_shim::api::Deadlines::default();
            if let Some(s) = dump_deadline_s {
                deadlines.dump_s = s;
            }
            if let Some(s) = restore_deadline_s {
                deadlines.restore_s = s;
            }
            let mut req = MigrateRequest {
                to: to.clone(),
                mode: MigrateMode::StopCopy,
                precopy: None,
                deadlines,
                faults,
                ignore_cpu_features,
            };
            if pre_copy || post_copy {
                let mut p = migrate_core::PrecopyPolicy::default();
                if let Some(b) = downtime_budget_ms {
                    p.downtime_budget_ms = b;
                }
                if let Some(r) = max_rounds {
                    p.max_rounds = r;
                }
                if let Some(w) = when_stuck {
                    p.when_stuck = match w.as_str() {
                        "auto-converge" => migrate_core::WhenStuck::AutoConverge,
                        "stop-and-copy" => migrate_core::WhenStuck::StopAndCopy,
                        "post-copy" => migrate_core::WhenStuck::PostCopy,
                        _ => migrate_core::WhenStuck::Abort,
                    };
                }
                p.post_copy = post_copy;
                p.follow_writes = !no_follow_writes;
                p.lazy_restore = !no_lazy_restore;
                if let Some(m) = lazy_min_mib {
                    p.lazy_min_mib = m;
                }
                if let Some(t) = throttle_initial_pct {
                    p.throttle_initial_pct = t;
                    p.throttle_max_pct = p.throttle_max_pct.max(t);
                }
                p.validate().map_err(|e| anyhow::anyhow!("pre-copy: {e}"))?;
                req.mode = MigrateMode::PreCopy;
                req.precopy = Some(p);
            }
            if detach {
                let (src, job) = start_migration(&lab, &name, &req).await?;
                println!("{}", serde_json::json!({"job": job, "host": src}));
                return Ok(ExitCode::SUCCESS);
            }
            let report = migrate(&lab, &name, &req, !json).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_summary(&report);
            }
            return Ok(if report.outcome == Outcome::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
        Cmd::Job { id, wait } => {
            let lab = Lab::load(&dir)?;
            let (host, mut info) = find_job(&lab, &id).await?;
            if wait {
                lab.client(&host)?.follow(&id, |_| {}).await?;
                info = lab.client(&host)?.job(&id).await?;
            }
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Cmd::Cancel { id } => {
            let lab = Lab::load(&dir)?;
            let (host, _) = find_job(&lab, &id).await?;
            let info = lab.client(&host)?.cancel(&id).await?;
            println!("cancel requested for job {id} (state {:?}); it rolls back at the end of the current phase", info.state);
        }
        Cmd::Resolve {
            id,
            resume_here,
            committed,
        } => {
            let outcome = match (resume_here, committed) {
                (true, false) => Resolution::ResumeHere,
                (false, true) => Resolution::Committed,
                _ => bail!("give exactly one of --resume-here and --committed"),
            };
            let lab = Lab::load(&dir)?;
            let mut refusals = vec![];
            for h in lab.container_hosts() {
                match lab.client(&h.name)?.resolve(&id, outcome).await {
                    Ok(a) => {
                        println!("{}", serde_json::to_string_pretty(&a)?);
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(e) => refusals.push(format!("{}: {e:#}", h.name)),
                }
            }
            bail!("no host settled job {id:?}: {}", refusals.join("; "));
        }
        Cmd::Demo {
            json,
            keep,
            no_baseline,
        } => {
            crate::util::require_root("ferry demo")?;
            let (exe, workload) = exe_paths()?;
            return crate::demo::run(&dir, &exe, &workload, json, keep, !no_baseline).await;
        }
        Cmd::Bench {
            quick,
            sizes_mib,
            dirty_mib_s,
            link_rates,
            modes,
            no_echo,
            processes,
            no_baseline,
            interval_ms,
            out,
            keep,
        } => {
            crate::util::require_root("ferry bench")?;
            let (exe, workload) = exe_paths()?;
            let mut opts = if quick {
                crate::bench::BenchOpts::quick(out)
            } else {
                crate::bench::BenchOpts::full(out)
            };
            if let Some(v) = sizes_mib {
                opts.sizes_mib = v;
            }
            if let Some(v) = dirty_mib_s {
                opts.dirty_mib_s = v;
            }
            if let Some(v) = link_rates {
                opts.link_rates = v
                    .iter()
                    .map(|r| match r.as_str() {
                        "none" | "unshaped" => Ok(None),
                        r => r.parse().map(Some).map_err(anyhow::Error::msg),
                    })
                    .collect::<Result<_>>()?;
            }
            if let Some(v) = modes {
                opts.modes = v;
            }
            opts.echo = !no_echo;
            if let Some(p) = processes {
                opts.processes = p.into_iter().filter(|n| *n > 0).collect();
            }
            opts.baseline = !no_baseline;
            opts.interval_ms = interval_ms;
            opts.keep = keep;
            return crate::bench::run(&dir, &exe, &workload, opts).await;
        }
        Cmd::Agent { .. } | Cmd::Probe { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Containers on every container host of the lab.
pub(crate) async fn ps(lab: &Lab) -> Result<Vec<ContainerInfo>> {
    let mut all = vec![];
    for h in lab.container_hosts() {
        match lab.client(&h.name)?.containers().await {
            Ok(mut cs) => all.append(&mut cs),
            // One host down must not hide the others' containers.
            Err(e) => eprintln!("warning: cannot list containers on {}: {e:#}", h.name),
        }
    }
    all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    Ok(all)
}

/// Finds a container by name anywhere in the lab.
pub(crate) async fn find(lab: &Lab, name: &str) -> Result<ContainerInfo> {
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

async fn find_job(lab: &Lab, id: &str) -> Result<(String, orchestrator_shim::api::JobInfo)> {
    for h in lab.container_hosts() {
        if let Ok(info) = lab.client(&h.name)?.job(id).await {
            return Ok((h.name.clone(), info));
        }
    }
    bail!("unknown job {id:?} on every host of the lab")
}

async fn start_migration(lab: &Lab, name: &str, req: &MigrateRequest) -> Result<(String, String)> {
    lab.host(&req.to)?;
    let c = find(lab, name).await?;
    let job = lab.client(&c.host)?.migrate(name, req).await?;
    Ok((c.host, job.id))
}

/// Starts a migration and follows it to its end; shows progress when `progress`.
pub(crate) async fn migrate(
    lab: &Lab,
    name: &str,
    req: &MigrateRequest,
    progress: bool,
) -> Result<Report> {
    let to = req.to.as_str();
    let (src, id) = start_migration(lab, name, req).await?;
    let client = lab.client(&src)?;
    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(8);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:16}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(80));
        b.set_message(format!("migrating {name} from {src} to {to} (job {id})"));
        b
    });
    let mut report = None;
    client
        .follow(&id, |ev| {
            if let Some(b) = &bar {
                match &ev.kind {
                    JobEventKind::PhaseStarted { phase } => {
                        b.set_message(format!("{} ...", phase_name(*phase)))
                    }
                    JobEventKind::PhaseDone {
                        phase,
                        duration_ms,
                        bytes,
                    } => {
                        b.inc(1);
                        b.println(format!(
                            "  ok   {:<10} {:>9.1} ms {:>12}",
                            phase_name(*phase),
                            duration_ms,
                            human_bytes(*bytes)
                        ));
                    }
                    JobEventKind::PhaseFailed { phase, error } => {
                        b.println(format!("  FAIL {:<10} {error}", phase_name(*phase)));
                    }
                    JobEventKind::Committed => {
                        b.println("  commit point passed: the destination owns the container")
                    }
                    JobEventKind::Finished { .. } => b.finish_and_clear(),
                }
            }
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

/// A plain stop-and-copy migration to `to`.
pub(crate) fn stop_copy_to(to: &str) -> MigrateRequest {
    MigrateRequest {
        to: to.into(),
        mode: MigrateMode::StopCopy,
        precopy: None,
        deadlines: Default::default(),
        faults: FaultHooks::default(),
        ignore_cpu_features: false,
    }
}

pub(crate) fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Preflight => "preflight",
        Phase::Prepare => "prepare",
        Phase::PreCopy => "precopy",
        Phase::Redirect => "redirect",
        Phase::Dump => "dump",
        Phase::Transfer => "transfer",
        Phase::Restore => "restore",
        Phase::Commit => "commit",
        Phase::Cleanup => "cleanup",
        Phase::Rollback => "rollback",
    }
}

pub(crate) fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub(crate) fn print_summary(r: &Report) {
    match &r.outcome {
        Outcome::Completed => println!(
            "{} moved from {} to {} (job {})",
            r.container, r.from, r.to, r.id
        ),
        Outcome::RolledBack { reason } => println!(
            "{} NOT moved: rolled back, it still runs on {} (job {})\n  reason: {reason}",
            r.container, r.from, r.id
        ),
        Outcome::Failed { reason } => {
            println!("{} migration FAILED (job {}): {reason}", r.container, r.id)
        }
        Outcome::InProgress => {
            println!("{} migration still in progress (job {})", r.container, r.id)
        }
    }
    println!(
        "  frozen {:.1} ms (dump {:.1}, transfer {:.1}, restore {:.1}, network switch {:.1}; {} round trips between the hosts); total {:.1} ms; {} sent",
        r.frozen_ms, r.freeze_to_dump_ms, r.transfer_ms, r.restore_ms, r.network_switch_ms,
        r.frozen_round_trips, r.total_ms,
        human_bytes(r.bytes_sent)
    );
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

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

async fn image_cmd(dir: &Path, cmd: ImageCmd) -> Result<ExitCode> {
    let lab = Lab::load(dir)?;
    match cmd {
        ImageCmd::Import {
            on,
            name,
            oci_ref,
            path,
            json,
        } => {
            let path = std::fs::canonicalize(&path)
                .with_context(|| format!("image path {}", path.display()))?;
            let req = crate::agent::images::ImportImage {
                name,
                path,
                oci_ref,
            };
            let r = lab.client(&on)?.import_image(&req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} imported on {on} ({}): {} entries, {} of content in {} chunks; new to {on}: {} in {} chunks; tree {}",
                    r.image.name,
                    r.format,
                    r.image.entries,
                    mib(r.stats.bytes),
                    r.stats.chunks,
                    mib(r.stats.new_bytes),
                    r.stats.new_chunks,
                    r.image.tree
                );
            }
        }
        ImageCmd::Ls { on, json } => {
            let hosts: Vec<String> = match on {
                Some(h) => vec![h],
                None => lab.container_hosts().map(|h| h.name.clone()).collect(),
            };
            let mut lists = vec![];
            for h in hosts {
                lists.push(lab.client(&h)?.images().await?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&lists)?);
            } else {
                println!(
                    "{:<8} {:<24} {:>12} {:>8}  tree",
                    "HOST", "IMAGE", "SIZE", "ENTRIES"
                );
                for l in &lists {
                    for i in &l.images {
                        println!(
                            "{:<8} {:<24} {:>12} {:>8}  {}",
                            l.host,
                            i.name,
                            mib(i.bytes),
                            i.entries,
                            &i.tree[..16]
                        );
                    }
                }
                for l in &lists {
                    println!(
                        "{}: {} images, {} chunks, {} stored",
                        l.host,
                        l.usage.images,
                        l.usage.chunks,
                        mib(l.usage.chunk_bytes)
                    );
                }
            }
        }
        ImageCmd::Rm { on, name } => {
            let r = lab.client(&on)?.remove_image(&name).await?;
            println!(
                "{} removed from {on} (`ferry image gc --on {on}` frees its content)",
                r.name
            );
        }
        ImageCmd::Gc { on } => {
            let s = lab.client(&on)?.gc_images().await?;
            println!(
                "{on}: removed {} chunks ({}), {} trees, {} layers",
                s.chunks,
                mib(s.chunk_bytes),
                s.trees,
                s.layers
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
