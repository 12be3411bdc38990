//! The command-line front end: everything but the agent talks to agents over their API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_api::{CreateContainer, FaultHooks, MigrateMode, MigrateRequest, Resolution};
use migrate_core::Outcome;

use crate::{Cli, Cmd, FaultArgs, ImageCmd, LabCmd};
use ferry_lab::lab::Lab;
use ferry_lab::ops::{find, find_job, mib, migrate, print_summary, ps, start_migration};

pub(crate) fn dispatch(cli: Cli) -> Result<ExitCode> {
    if let Cmd::Agent { config } = &cli.cmd {
        let cfg = ferry_agent::config::AgentConfig::load(config)?;
        ferry_agent::main(cfg)?;
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
        let cfg = ferry_lab::probe::ProbeConfig {
            drain: Duration::from_secs_f64(*drain_s),
            target: *target,
            interval: Duration::from_secs_f64(interval_ms / 1000.0),
            duration: duration_s.map(Duration::from_secs_f64),
            stop_file: stop_file.clone(),
            threshold: Duration::from_secs_f64(threshold_ms / 1000.0),
            series: *series,
        };
        let report = ferry_lab::probe::run(&cfg)?;
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
            ferry_runtime::util::require_root("ferry lab")?;
            match cmd {
                LabCmd::Up {
                    hosts,
                    link_rate,
                    lazy_daemon,
                } => {
                    let (exe, workload) = exe_paths()?;
                    ferry_lab::lab::up(&dir, hosts, &exe, &workload, link_rate, lazy_daemon)
                        .await?;
                }
                LabCmd::Shape { rate } => {
                    let mut lab = Lab::load(&dir)?;
                    let rate = match rate.as_str() {
                        "none" | "unshaped" => None,
                        r => Some(
                            r.parse::<ferry_lab::lab::LinkRate>()
                                .map_err(anyhow::Error::msg)?,
                        ),
                    };
                    ferry_lab::lab::set_link_rate(&mut lab, rate)?;
                    match rate {
                        Some(r) => eprintln!("lab: underlay links shaped to {r}"),
                        None => eprintln!("lab: underlay links unshaped"),
                    }
                }
                LabCmd::Down => {
                    ferry_lab::lab::down(&dir)?;
                    eprintln!("lab: down");
                }
                LabCmd::Rootfs { dir: out } => {
                    if out.exists() {
                        bail!("{} exists: give a new directory", out.display());
                    }
                    let (_, workload) = exe_paths()?;
                    ferry_runtime::bundle::build_rootfs(&out, &workload)?;
                    eprintln!("lab: workload root filesystem written to {}", out.display());
                }
                LabCmd::StartAgent { host } => {
                    let lab = Lab::load(&dir)?;
                    let (exe, _) = exe_paths()?;
                    let h = lab.host(&host)?;
                    ferry_lab::lab::start_agent(
                        &exe,
                        &dir.join(format!("{host}.json")),
                        &h.log,
                        &dir.join(format!("{host}.pid")),
                    )?;
                    ferry_lab::lab::wait_agent(&lab, &host).await?;
                    eprintln!("lab: agent on {host} started");
                }
                LabCmd::Exec { host, cmd } => {
                    let lab = Lab::load(&dir)?;
                    ferry_lab::lab::exec(&lab, &host, &cmd)?;
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
            faults,
            dump_deadline_s,
            restore_deadline_s,
            ignore_cpu_features,
            detach,
        } => {
            let lab = Lab::load(&dir)?;
            let faults = faults.hooks()?;
            let mut deadlines = ferry_api::Deadlines::default();
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
            ferry_runtime::util::require_root("ferry demo")?;
            let (exe, workload) = exe_paths()?;
            return ferry_lab::demo::run(&dir, &exe, &workload, json, keep, !no_baseline).await;
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
            ferry_runtime::util::require_root("ferry bench")?;
            let (exe, workload) = exe_paths()?;
            let mut opts = if quick {
                ferry_lab::bench::BenchOpts::quick(out)
            } else {
                ferry_lab::bench::BenchOpts::full(out)
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
            return ferry_lab::bench::run(&dir, &exe, &workload, opts).await;
        }
        Cmd::Agent { .. } | Cmd::Probe { .. } => unreachable!("handled before the runtime starts"),
    }
    Ok(ExitCode::SUCCESS)
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
            let req = ferry_agent::images::ImportImage {
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

impl FaultArgs {
    /// The fault hooks these flags ask for.
    fn hooks(self) -> Result<FaultHooks> {
        let pause_in_phase = match self.pause_in_phase {
            Some(p) => Some(
                serde_json::from_value(serde_json::Value::String(p.clone()))
                    .map_err(|_| anyhow::anyhow!("--pause-in-phase {p:?}: not a phase"))?,
            ),
            None => None,
        };
        Ok(FaultHooks {
            pause_in_transfer_ms: self.pause_in_transfer_ms,
            corrupt_images: self.corrupt_images,
            corrupt_memory_page: self.corrupt_memory_page,
            hide_dirty_page: self.hide_dirty_page,
            refuse_tracking: self.refuse_tracking,
            pause_before_commit_ms: self.pause_before_commit_ms,
            corrupt_rootfs: self.corrupt_rootfs,
            pause_in_dump_ms: self.pause_in_dump_ms,
            pause_in_restore_ms: self.pause_in_restore_ms,
            pause_after_commit_ms: self.pause_after_commit_ms,
            pause_in_phase,
            pause_in_phase_ms: self.pause_in_phase_ms,
        })
    }
}
