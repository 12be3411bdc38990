//! The command-line front end: everything but the agent talks to agents over their API.

pub mod containers;
pub mod jobs;
pub mod migrate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_api::{CreateContainer, Resolution};

use crate::{Cli, Cmd, ImageCmd, LabCmd, PkiCmd};
use ferry_lab::lab::Lab;
use ferry_lab::ops::{find, mib, ps};

pub(crate) fn dispatch(cli: Cli) -> Result<ExitCode> {
    if let Cmd::Agent { config } = &cli.cmd {
        let cfg = ferry_agent::config::AgentConfig::load(config)?;
        ferry_agent::main(cfg)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(c) = &cli.cluster {
        ferry_lab::lab::use_cluster(c.clone());
    }
    if let Cmd::Pki { cmd } = &cli.cmd {
        pki(cmd)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::ConsoleShim {
        dir,
        max_bytes,
        detached,
    } = &cli.cmd
    {
        ferry_runtime::console::run_shim(&ferry_runtime::console::ShimArgs {
            dir: dir.clone(),
            max_bytes: *max_bytes,
            detached: *detached,
        })?;
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
                    etcd,
                } => {
                    let (exe, workload) = exe_paths()?;
                    ferry_lab::lab::up(&dir, hosts, &exe, &workload, link_rate, lazy_daemon, etcd)
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
                LabCmd::StartEtcd { member } => {
                    let lab = Lab::load(&dir)?;
                    let m = lab
                        .etcd
                        .iter()
                        .find(|m| m.name == member)
                        .with_context(|| {
                            format!(
                                "no etcd member {member:?} in this lab (it has {})",
                                lab.etcd
                                    .iter()
                                    .map(|m| m.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })?;
                    ferry_lab::lab::start_etcd_member(&lab, m)?;
                    eprintln!("lab: etcd member {member} started");
                }
                LabCmd::Etcdctl { args } => {
                    let lab = Lab::load(&dir)?;
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    print!("{}", ferry_lab::lab::etcdctl(&lab, &args)?);
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
            publish,
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
                    publish,
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
        Cmd::Stop { name, timeout_s } => {
            return containers::stop(&Lab::load(&dir)?, &name, timeout_s).await
        }
        Cmd::Start { name } => return containers::start(&Lab::load(&dir)?, &name).await,
        Cmd::Logs {
            name,
            tail,
            follow,
            timestamps,
        } => {
            let lab = Lab::load(&dir)?;
            return containers::logs(&lab, &name, tail, follow, timestamps).await;
        }
        Cmd::Exec {
            name,
            env,
            workdir,
            timeout_s,
            cmd,
        } => {
            let req = ferry_api::ExecRequest {
                args: cmd,
                env,
                workdir,
                timeout_s: Some(timeout_s),
            };
            return containers::exec(&Lab::load(&dir)?, &name, req).await;
        }
        Cmd::Migrate(args) => return migrate::run(&Lab::load(&dir)?, args).await,
        Cmd::Drain {
            host,
            parallel,
            stop_copy,
            heavy_mib,
            reserve_mib,
            dry_run,
            json,
        } => {
            let mode = if stop_copy {
                ferry_api::MigrateMode::StopCopy
            } else {
                ferry_api::MigrateMode::PreCopy
            };
            let placement = ferry_lab::drain::Placement {
                reserve_bytes: reserve_mib << 20,
                heavy_bytes: heavy_mib << 20,
            };
            let say = |line: String| eprintln!("{line}");
            let r = ferry_lab::drain::drain(
                &Lab::load(&dir)?,
                &host,
                parallel,
                mode,
                placement,
                dry_run,
                &say,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            return Ok(std::process::ExitCode::from(if r.stayed == 0 {
                0
            } else {
                2
            }));
        }
        Cmd::Job { id, wait, json } => return jobs::job(&Lab::load(&dir)?, &id, wait, json).await,
        Cmd::Jobs { json } => return jobs::jobs(&Lab::load(&dir)?, json).await,
        Cmd::Cancel { id } => return jobs::cancel(&Lab::load(&dir)?, &id).await,
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
            return jobs::resolve(&Lab::load(&dir)?, &id, outcome).await;
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
        Cmd::Agent { .. } | Cmd::Probe { .. } | Cmd::ConsoleShim { .. } | Cmd::Pki { .. } => {
            unreachable!("handled before the runtime starts")
        }
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

/// `ferry pki`.
fn pki(cmd: &PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Init { dir, name } => {
            let existed = dir.join("ca.pem").exists();
            transfer::pki::create_ca(dir, name)?;
            if existed {
                println!("CA kept: {} (already there)", dir.join("ca.pem").display());
            } else {
                println!(
                    "CA created: {} and {} (keep the key root-only; it signs every certificate)",
                    dir.join("ca.pem").display(),
                    dir.join("ca.key").display()
                );
            }
        }
        PkiCmd::Issue {
            host,
            ips,
            dir,
            out,
        } => {
            let out = out.as_deref().unwrap_or(dir);
            transfer::pki::issue_host_cert_with_ips(dir, host, ips, out)?;
            println!(
                "{host}: {} and {} (tls.cert and tls.key of its agent; tls.ca is {})",
                out.join(format!("{host}.pem")).display(),
                out.join(format!("{host}.key")).display(),
                dir.join("ca.pem").display()
            );
        }
        PkiCmd::Operator { name, dir, out } => {
            let out = out.as_deref().unwrap_or(dir);
            transfer::pki::issue_operator_cert(dir, name, out)?;
            println!(
                "operator {name}: {} and {} (cert and key of a cluster file; ca is {})",
                out.join(format!("{name}.pem")).display(),
                out.join(format!("{name}.key")).display(),
                dir.join("ca.pem").display()
            );
        }
    }
    Ok(())
}
