//! `ferry job`, `ferry jobs`, `ferry cancel`, `ferry resolve`: migration jobs across the
//! lab's hosts.

use std::process::ExitCode;

use anyhow::{bail, Result};
use ferry_api::{JobInfo, Resolution};
use ferry_lab::lab::Lab;
use ferry_lab::ops::{self, find_job, human_bytes, Follow, Progress};
use migrate_core::Report;

/// `ferry job ID [--wait] [--json]`.
pub async fn job(lab: &Lab, id: &str, wait: bool, json: bool) -> Result<ExitCode> {
    let (host, mut info) = find_job(lab, id).await?;
    if wait && !info.state.is_terminal() {
        let client = lab.client(&host)?;
        let follow = if json {
            Follow::Quiet
        } else {
            Follow::detect()
        };
        let r = &info.report;
        let mut shown = Progress::new(follow, (&r.container, &r.from, &r.to, id), None);
        client.follow(id, |ev| shown.event(ev)).await?;
        info = client.job(id).await?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else if info.state.is_terminal() {
        ops::print_summary(&info.report);
    } else {
        print_under_way(&info);
    }
    Ok(if wait {
        ops::exit_code(&info.report)
    } else {
        ExitCode::SUCCESS
    })
}

/// A job still under way, in a few lines.
fn print_under_way(info: &JobInfo) {
    let r = &info.report;
    println!(
        "job {}: {} from {} to {} ({}), {}{}",
        info.id,
        r.container,
        r.from,
        r.to,
        r.mode,
        info.state.name(),
        if info.state.past_commit_point() {
            " (past the commit point)"
        } else {
            ""
        }
    );
    let ran: Vec<&str> = r.phases.iter().map(|p| p.phase.name()).collect();
    println!(
        "  started {}; phases done: {}; {} sent so far",
        ago(r),
        if ran.is_empty() {
            "none".to_string()
        } else {
            ran.join(", ")
        },
        human_bytes(r.bytes_sent)
    );
    println!("  `ferry job {} --wait` follows it to its end", info.id);
}

/// How long ago a job started, as people say it.
fn ago(r: &Report) -> String {
    if r.started_unix_ms <= 0.0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let s = ((now - r.started_unix_ms) / 1000.0).max(0.0);
    match s {
        s if s < 90.0 => format!("{s:.0} s ago"),
        s if s < 5400.0 => format!("{:.0} min ago", s / 60.0),
        s if s < 172_800.0 => format!("{:.0} h ago", s / 3600.0),
        s => format!("{:.0} days ago", s / 86_400.0),
    }
}

/// `ferry jobs [--json]`: every host's jobs, newest first.
pub async fn jobs(lab: &Lab, json: bool) -> Result<ExitCode> {
    let mut all: Vec<(String, JobInfo)> = vec![];
    for h in lab.container_hosts() {
        match lab.client(&h.name)?.jobs().await {
            Ok(js) => all.extend(js.into_iter().map(|j| (h.name.clone(), j))),
            Err(e) => eprintln!("warning: cannot list the jobs of {}: {e:#}", h.name),
        }
    }
    all.sort_by(|(_, a), (_, b)| {
        b.report
            .started_unix_ms
            .total_cmp(&a.report.started_unix_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    if json {
        let list: Vec<&JobInfo> = all.iter().map(|(_, j)| j).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<16} {:<6} {:<6} {:<10} {:<13} {:>10} {:>10}  STARTED",
        "JOB", "CONTAINER", "FROM", "TO", "MODE", "STATE", "FROZEN MS", "TOTAL MS"
    );
    for (_, j) in &all {
        let r = &j.report;
        let frozen = if r
            .phases
            .iter()
            .any(|p| p.phase == migrate_core::Phase::Dump)
        {
            format!("{:.1}", r.frozen_ms)
        } else {
            "-".into()
        };
        println!(
            "{:<24} {:<16} {:<6} {:<6} {:<10} {:<13} {:>10} {:>10.1}  {}",
            j.id,
            r.container,
            r.from,
            r.to,
            r.mode,
            j.state.name(),
            frozen,
            r.total_ms,
            ago(r)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry cancel ID`.
pub async fn cancel(lab: &Lab, id: &str) -> Result<ExitCode> {
    let (host, _) = find_job(lab, id).await?;
    let info = lab.client(&host)?.cancel(id).await?;
    println!(
        "cancel requested for job {id} (state {}): it rolls back at the end of the current phase; `ferry job {id} --wait` follows it",
        info.state.name()
    );
    Ok(ExitCode::SUCCESS)
}

/// `ferry resolve ID --resume-here|--committed`.
pub async fn resolve(lab: &Lab, id: &str, outcome: Resolution) -> Result<ExitCode> {
    let mut refusals = vec![];
    for h in lab.container_hosts() {
        match lab.client(&h.name)?.resolve(id, outcome).await {
            Ok(a) => {
                println!("{}", serde_json::to_string_pretty(&a)?);
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => refusals.push(format!("{}: {e:#}", h.name)),
        }
    }
    bail!("no host settled job {id:?}: {}", refusals.join("; "));
}
