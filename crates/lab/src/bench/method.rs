//! One method's run of one scenario, Ferry's or the baseline's, under the probe, and what it is
//! measured by: bytes on the underlay, CPU time, resident memory and the workload's verdict.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use migrate_core::Outcome;

use super::{
    fill_rtt, BenchOpts, PhaseSpan, Run, Scenario, Workload, COUNTER_TAG, DRAIN_S, FROM, LEAD_IN,
    LEAD_OUT, THRESHOLD_MS, TO,
};
use crate::demo::{Baseline, ProbeProcess, ProbeSettings, ECHO_PORT};
use crate::lab::Lab;
use crate::probe::ProbeReport;

pub(super) async fn run_ferry(
    lab: &Lab,
    exe: &Path,
    s: &Scenario,
    opts: &BenchOpts,
    counters: &ByteCounters,
    i: usize,
) -> Run {
    let name = format!("bench{i}");
    let r = ferry_inner(lab, exe, s, opts, counters, &name).await;
    // Whatever happened, the container goes.
    if let Ok(c) = crate::ops::find(lab, &name).await {
        if let Ok(client) = lab.client(&c.host) {
            let _ = client.delete(&name).await;
        }
    }
    r.unwrap_or_else(|e| Run::failed("ferry", e))
}

async fn ferry_inner(
    lab: &Lab,
    exe: &Path,
    s: &Scenario,
    opts: &BenchOpts,
    counters: &ByteCounters,
    name: &str,
) -> Result<Run> {
    let info = crate::demo::start_workload(
        lab,
        FROM,
        name,
        s.workload.args(),
        s.workload.ready_within(),
    )
    .await?;
    let ip = info.spec.ip;
    let probe = ProbeProcess::start_with(lab, exe, ip, name, &probe_settings(opts))?;
    tokio::time::sleep(LEAD_IN).await;
    let resident_bytes = info.pid.and_then(resident_of);
    let cpu0 = agents_cpu_ms(lab)?;
    let bytes0 = counters.read()?;
    let report = crate::ops::migrate(lab, name, &s.mode.request(TO), false).await;
    let bytes1 = counters.read()?;
    let cpu1 = agents_cpu_ms(lab)?;
    tokio::time::sleep(LEAD_OUT).await;
    let probe = probe.finish()?;
    let report = report?;
    let verify = verify_memory(lab, ip, &s.workload).await?;
    let completed = report.outcome == Outcome::Completed;
    let memory_intact = memory_verdict(&probe, verify.as_deref(), &s.workload);
    let error = if completed {
        run_error(&probe, memory_intact, verify.as_deref())
    } else {
        Some(format!("migration did not complete: {:?}", report.outcome))
    };
    let downtime = probe.max_gap_ms;
    let fill_rtt = fill_rtt(&probe, &report);
    Ok(Run {
        method: "ferry".into(),
        ok: error.is_none(),
        error,
        downtime_ms: downtime,
        time_above_threshold_ms: probe.time_above_threshold_ms,
        frozen_ms: Some(report.frozen_ms),
        gap_minus_frozen_ms: Some(downtime - report.frozen_ms),
        network_switch_ms: Some(report.network_switch_ms),
        total_ms: report.total_ms,
        phases: report
            .phases
            .iter()
            .map(|p| PhaseSpan {
                name: migrate_core::Phase::name(p.phase).into(),
                start_ms: p.start_ms,
                duration_ms: p.duration_ms,
            })
            .collect(),
        wire_bytes: bytes1.saturating_sub(bytes0),
        payload_bytes: Some(report.bytes_sent),
        resident_bytes,
        fill_rtt,
        cpu_ms: cpu1 - cpu0,
        memory_intact,
        verify,
        probe: Some(probe),
        report: Some(report),
        baseline_steps: None,
    })
}

/// VmRSS of process `pid` and of its children in the same container (a host pid), bytes.
fn resident_of(pid: u32) -> Option<u64> {
    let status = procfs::process::Process::new(i32::try_from(pid).ok()?)
        .and_then(|p| p.status())
        .ok()?;
    Some(status.vmrss? * 1024)
}

pub(super) async fn run_baseline(
    lab: &Lab,
    exe: &Path,
    workload: &Path,
    s: &Scenario,
    opts: &BenchOpts,
    counters: &ByteCounters,
    i: usize,
) -> Run {
    let name = format!("base{i}");
    let b = match Baseline::start(
        lab,
        workload,
        FROM,
        &name,
        s.workload.args(),
        s.workload.ready_within(),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return Run::failed("baseline", e),
    };
    let r = baseline_inner(lab, exe, s, opts, counters, &b, &name).await;
    b.remove(lab);
    r.unwrap_or_else(|e| Run::failed("baseline", e))
}

async fn baseline_inner(
    lab: &Lab,
    exe: &Path,
    s: &Scenario,
    opts: &BenchOpts,
    counters: &ByteCounters,
    b: &Baseline,
    name: &str,
) -> Result<Run> {
    let ip = b.ip();
    let probe = ProbeProcess::start_with(lab, exe, ip, name, &probe_settings(opts))?;
    tokio::time::sleep(LEAD_IN).await;
    let cpu0 = children_cpu_ms();
    let bytes0 = counters.read()?;
    let steps = b.migrate(lab, FROM, TO);
    let bytes1 = counters.read()?;
    let cpu1 = children_cpu_ms();
    tokio::time::sleep(LEAD_OUT).await;
    let probe = probe.finish()?;
    let steps = steps?;
    let verify = verify_memory(lab, ip, &s.workload).await?;
    let memory_intact = memory_verdict(&probe, verify.as_deref(), &s.workload);
    let error = run_error(&probe, memory_intact, verify.as_deref());
    Ok(Run {
        method: "baseline".into(),
        ok: error.is_none(),
        error,
        downtime_ms: probe.max_gap_ms,
        time_above_threshold_ms: probe.time_above_threshold_ms,
        frozen_ms: None,
        gap_minus_frozen_ms: None,
        network_switch_ms: None,
        total_ms: steps.total_ms,
        phases: steps
            .steps()
            .into_iter()
            .map(|(n, start, d)| PhaseSpan {
                name: n.into(),
                start_ms: start,
                duration_ms: d,
            })
            .collect(),
        wire_bytes: bytes1.saturating_sub(bytes0),
        payload_bytes: None,
        resident_bytes: None,
        fill_rtt: None,
        cpu_ms: cpu1 - cpu0,
        memory_intact,
        verify,
        probe: Some(probe),
        report: None,
        baseline_steps: Some(steps),
    })
}

fn probe_settings(opts: &BenchOpts) -> ProbeSettings {
    ProbeSettings {
        interval_ms: opts.interval_ms,
        threshold_ms: THRESHOLD_MS,
        drain_s: DRAIN_S,
        series: true,
    }
}

/// The memory workload's verdict: its last answer to the probe and a full verification pass.
pub(super) fn memory_verdict(
    probe: &ProbeReport,
    verify: Option<&str>,
    w: &Workload,
) -> Option<bool> {
    match w {
        Workload::Echo | Workload::Processes { .. } => None,
        Workload::Memory { .. } => Some(
            probe.memory_intact == Some(true) && verify.is_some_and(|v| v.starts_with("verify ok")),
        ),
    }
}

/// Asks the memory workload for a full verification pass, from the client host.
async fn verify_memory(lab: &Lab, ip: Ipv4Addr, w: &Workload) -> Result<Option<String>> {
    if !matches!(w, Workload::Memory { .. }) {
        return Ok(None);
    }
    let client = lab.host("client")?.netns.clone();
    let out = tokio::task::spawn_blocking(move || {
        ferry_runtime::util::run(
            "ip",
            [
                "netns",
                "exec",
                &client,
                "timeout",
                "120",
                "bash",
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/{ip}/{ECHO_PORT} && echo verify >&3 && read -r line <&3 \
                     && echo \"$line\""
                ),
            ],
        )
    })
    .await??;
    Ok(Some(out.trim().to_string()))
}

/// CPU time (user + system, own and reaped children) of every lab agent, ms.
fn agents_cpu_ms(lab: &Lab) -> Result<f64> {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut total = 0.0;
    for h in lab.container_hosts() {
        let pid = std::fs::read_to_string(lab.dir.join(format!("{}.pid", h.name)))?;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .with_context(|| format!("the agent of {} is not running", h.name))?;
        // Fields after the command name: state is field 3, utime..cstime are 14..17.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|x| x.parse().ok())
            .collect();
        total += f.iter().sum::<u64>() as f64 * 1000.0 / tick;
    }
    Ok(total)
}

/// CPU time of this process's reaped children (the baseline's runc, CRIU, tar, nc), ms.
fn children_cpu_ms() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// iptables rules that count the bytes two hosts send each other over the underlay.
pub(super) struct ByteCounters {
    pairs: Vec<(String, Ipv4Addr)>,
}

/// `ip netns exec NS iptables -w OP OUTPUT -d DST -m comment --comment TAG`.
fn counter_rule(ns: &str, op: &str, dst: Ipv4Addr) -> Vec<String> {
    let dst = dst.to_string();
    [
        "netns",
        "exec",
        ns,
        "iptables",
        "-w",
        op,
        "OUTPUT",
        "-d",
        &dst,
        "-m",
        "comment",
        "--comment",
        COUNTER_TAG,
    ]
    .map(String::from)
    .to_vec()
}

impl ByteCounters {
    pub(super) fn install(lab: &Lab, a: &str, b: &str) -> Result<ByteCounters> {
        let (ha, hb) = (lab.host(a)?, lab.host(b)?);
        let mut counters = ByteCounters { pairs: vec![] };
        for (ns, dst) in [
            (ha.netns.clone(), hb.underlay_ip),
            (hb.netns.clone(), ha.underlay_ip),
        ] {
            if let Err(e) = ferry_runtime::util::run("ip", counter_rule(&ns, "-I", dst)) {
                // Leave no rule behind when the second one cannot be added.
                counters.remove();
                return Err(e).context("installing the byte-counting rule");
            }
            counters.pairs.push((ns, dst));
        }
        Ok(counters)
    }

    pub(super) fn read(&self) -> Result<u64> {
        let mut total = 0;
        for (ns, _) in &self.pairs {
            let out = ferry_runtime::util::run(
                "ip",
                [
                    "netns", "exec", ns, "iptables", "-w", "-n", "-v", "-x", "-L", "OUTPUT",
                ],
            )?;
            let line = out
                .lines()
                .find(|l| l.contains(COUNTER_TAG))
                .context("the byte-counting rule is gone")?;
            let bytes: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|b| b.parse().ok())
                .context("unreadable iptables counter")?;
            total += bytes;
        }
        Ok(total)
    }

    pub(super) fn remove(&self) {
        for (ns, dst) in &self.pairs {
            ferry_runtime::util::run_quiet("ip", counter_rule(ns, "-D", *dst));
        }
    }
}

/// What the client or the memory check saw go wrong in a run that moved, if anything.
fn run_error(
    probe: &ProbeReport,
    memory_intact: Option<bool>,
    verify: Option<&str>,
) -> Option<String> {
    if !probe.intact {
        Some(format!(
            "the client saw errors: {}",
            probe.error_messages.join("; ")
        ))
    } else if memory_intact == Some(false) {
        Some(format!(
            "the workload's memory is damaged: {}",
            verify.unwrap_or_default()
        ))
    } else {
        None
    }
}
