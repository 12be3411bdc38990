//! `ferry bench`: a matrix of migration scenarios in the lab, each run with Ferry and with the
//! baseline an admin would otherwise use (runc checkpoint with CRIU, `tar | nc` of images and
//! bundle, runc restore, overlay switch), in the same run, under the same probe.
//!
//! For every scenario and method it records the application-observed downtime (the probe's
//! largest gap between answers), the phase breakdown, the total migration time, the bytes on the
//! underlay between the two hosts, the CPU time spent, and whether the workload's memory stayed
//! intact. It writes `results.json`, `results.md` and one SVG chart per scenario.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migrate_core::Report;
use serde::{Deserialize, Serialize};

use crate::demo::BaselineReport;
use crate::lab::Lab;
use crate::probe::ProbeReport;

mod method;
mod report;
mod scenario;

use method::{run_baseline, run_ferry, ByteCounters};
pub use report::markdown;
use report::render_chart;
use scenario::link_label;
pub use scenario::{BenchOpts, Mode, Scenario, Workload};

/// Source and destination of every scenario's migration.
const FROM: &str = "h1";
const TO: &str = "h2";
/// Probe time before the migration starts and after it ends.
const LEAD_IN: Duration = Duration::from_millis(1000);
const LEAD_OUT: Duration = Duration::from_millis(1000);
/// Pause between runs so the kernel finishes tearing down the previous run's namespaces.
const SETTLE: Duration = Duration::from_millis(1500);
/// Gaps above this count as time above threshold in the probe.
const THRESHOLD_MS: f64 = 10.0;
/// How long a probe waits for answers still due after it stops: TCP's retransmission timer
/// backs off to at most 120 s, so a connection frozen for long may need that long to resume.
const DRAIN_S: f64 = 150.0;
/// Comment marking the byte-counting iptables rules.
const COUNTER_TAG: &str = "ferry-bench-bytes";

/// A phase on a run's timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseSpan {
    /// Phase or step name.
    pub name: String,
    /// Start, ms after the migration started.
    pub start_ms: f64,
    /// Duration, ms.
    pub duration_ms: f64,
}

/// (time ms, round trip ms) pairs.
type Samples = Vec<(f64, f64)>;

/// What the application saw while a lazy restore filled its memory in, against before.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FillRtt {
    /// Round trips before the migration started: p50, p99, ms.
    pub before_p50_ms: f64,
    /// p99 before.
    pub before_p99_ms: f64,
    /// Round trips of requests sent after the commit and answered before the fill ended: p50, ms.
    pub fill_p50_ms: f64,
    /// p99 during the fill.
    pub fill_p99_ms: f64,
    /// Answers during the fill.
    pub fill_samples: usize,
}

/// The `q` quantile (0..=1) of `v`, which it sorts.
fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

/// [`FillRtt`] from a probe's series and the migration's report.
fn fill_rtt(probe: &ProbeReport, report: &Report) -> Option<FillRtt> {
    let fill_ms = report.memory.as_ref()?.fill_ms?;
    let end = |phase| {
        report
            .phases
            .iter()
            .find(|p| p.phase == phase)
            .map(|p| p.start_ms + p.duration_ms)
    };
    let restored = end(migrate_core::Phase::Restore)?;
    // Requests reach the restored copy once the commit has released the held packets; one
    // sent earlier waited for the freeze, which the frozen time already tells.
    let committed = end(migrate_core::Phase::Commit).unwrap_or(restored);
    let shift = probe.started_unix_ms - report.started_unix_ms;
    let (mut before, mut during) = (vec![], vec![]);
    for &(t, rtt) in &probe.series {
        // Series times are answers; the request left `rtt` earlier.
        let (sent, answered) = (t + shift - rtt, t + shift);
        if answered < 0.0 {
            before.push(rtt);
        } else if sent >= committed && answered <= restored + fill_ms {
            during.push(rtt);
        }
    }
    let fill_samples = during.len();
    Some(FillRtt {
        before_p50_ms: quantile(&mut before, 0.5)?,
        before_p99_ms: quantile(&mut before, 0.99)?,
        fill_p50_ms: quantile(&mut during, 0.5)?,
        fill_p99_ms: quantile(&mut during, 0.99)?,
        fill_samples,
    })
}

/// One method's run of one scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// `ferry` or `baseline`.
    pub method: String,
    /// Whether it moved the container with its connection and memory intact.
    pub ok: bool,
    /// Why not, when not.
    pub error: Option<String>,
    /// The probe's largest gap between two answers, ms: the downtime the client saw.
    pub downtime_ms: f64,
    /// Sum of the probe's gaps above the threshold, ms.
    pub time_above_threshold_ms: f64,
    /// Ferry's own frozen time, ms (Ferry only).
    pub frozen_ms: Option<f64>,
    /// Probe gap minus Ferry's frozen time, ms (Ferry only).
    pub gap_minus_frozen_ms: Option<f64>,
    /// Ferry's network switch (redirect before the freeze, packet release in the commit), ms:
    /// the gap and the frozen time may differ by up to this plus a probe interval.
    pub network_switch_ms: Option<f64>,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// Phases, in order.
    pub phases: Vec<PhaseSpan>,
    /// Bytes in IP packets between the two hosts' underlay addresses, both directions.
    pub wire_bytes: u64,
    /// Payload bytes Ferry reports having sent (Ferry only).
    pub payload_bytes: Option<u64>,
    /// The container's resident memory just before the migration (VmRSS of its processes).
    #[serde(default)]
    pub resident_bytes: Option<u64>,
    /// The probe's round trips before the migration and while a lazy restore filled the
    /// memory in (Ferry's pre-copy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_rtt: Option<FillRtt>,
    /// CPU time, ms: both agents and their children for Ferry; runc, CRIU, tar and nc for the
    /// baseline.
    pub cpu_ms: f64,
    /// The memory workload's verdict after a full verification pass at the destination (None
    /// for the echo workload).
    pub memory_intact: Option<bool>,
    /// The workload's answer to `verify`.
    pub verify: Option<String>,
    /// The probe, without its series.
    pub probe: Option<ProbeReport>,
    /// Ferry's report.
    pub report: Option<Report>,
    /// The baseline's steps.
    pub baseline_steps: Option<BaselineReport>,
}

/// One scenario's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// What ran.
    pub scenario: Scenario,
    /// Ferry's run.
    pub ferry: Run,
    /// The baseline's run, when asked for.
    pub baseline: Option<Run>,
    /// Ferry's downtime over the baseline's.
    pub downtime_ratio: Option<f64>,
    /// Ferry's total time over the baseline's.
    pub total_ratio: Option<f64>,
    /// The chart, relative to the output directory.
    pub chart: String,
    /// Stop-and-copy's transfer against one bare QUIC stream on the same link (memory
    /// workloads: the echo container's few MiB say nothing about a rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer_goodput: Option<TransferGoodput>,
}

/// Stop-and-copy's transfer phase (inside the freeze) against a bare QUIC stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TransferGoodput {
    /// The transfer phase's payload over its duration, MB/s.
    pub transfer_mb_s: f64,
    /// Bare QUIC streams between the same two hosts on the same link, right before and right
    /// after the migration (their mean; the link's median when neither could be measured), MB/s.
    pub bare_quic_mb_s: f64,
    /// The first over the second.
    pub ratio: f64,
}

/// A bare QUIC stream's goodput on one link, measured in the bench's own run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkGoodput {
    /// The link (`unshaped`, `1gbit`).
    pub link: String,
    /// Each measurement.
    pub runs: Vec<crate::goodput::Goodput>,
    /// Their median, MB/s.
    pub median_mb_s: f64,
}

/// Bytes of each bare QUIC measurement, and how many are taken per link.
const GOODPUT_BYTES: u64 = 256 << 20;
const GOODPUT_RUNS: usize = 3;

/// How long one bare QUIC measurement may take: ten times what the link's rate needs, and at
/// least a minute.
fn goodput_limit(lab: &Lab) -> Duration {
    lab.link_rate.map_or(Duration::from_secs(60), |r| {
        Duration::from_secs((GOODPUT_BYTES * 8 * 10 / r.0.max(1)).max(60))
    })
}

/// One bare QUIC stream's goodput, MB/s, measured `when` ("before", "after") a migration.
async fn adjacent_goodput(lab: &Lab, when: &str) -> Option<f64> {
    match crate::goodput::measure(lab, FROM, TO, GOODPUT_BYTES, goodput_limit(lab)).await {
        Ok(g) => Some(g.mb_s()),
        Err(e) => {
            eprintln!("bench   bare QUIC stream {when} the migration: FAILED: {e:#}");
            None
        }
    }
}

/// The median goodput of [`GOODPUT_RUNS`] bare QUIC streams from [`FROM`] to [`TO`].
async fn link_goodput(lab: &Lab) -> Result<LinkGoodput> {
    let link = link_label(lab.link_rate);
    let limit = goodput_limit(lab);
    let mut runs = vec![];
    for _ in 0..GOODPUT_RUNS {
        runs.push(crate::goodput::measure(lab, FROM, TO, GOODPUT_BYTES, limit).await?);
    }
    let mut rates: Vec<f64> = runs.iter().map(|g| g.mb_s()).collect();
    let median_mb_s = quantile(&mut rates, 0.5).unwrap_or(0.0);
    eprintln!("bench   bare QUIC stream on a {link} link: {median_mb_s:.0} MB/s (median of {GOODPUT_RUNS})");
    Ok(LinkGoodput {
        link,
        runs,
        median_mb_s,
    })
}

/// [`TransferGoodput`] of a stop-and-copy run of a memory workload, against `bare_mb_s`.
fn transfer_goodput(s: &Scenario, ferry: &Run, bare_mb_s: Option<f64>) -> Option<TransferGoodput> {
    if s.mode != Mode::StopCopy || !matches!(s.workload, Workload::Memory { .. }) || !ferry.ok {
        return None;
    }
    let rep = ferry.report.as_ref()?;
    let t = rep
        .phases
        .iter()
        .find(|p| p.phase == migrate_core::Phase::Transfer)?;
    // Until the destination had every image: the phase ends once they are sent.
    let ms = rep.images_delivered_ms.unwrap_or(t.duration_ms);
    TransferGoodput::new(t.bytes, ms, bare_mb_s?)
}

impl TransferGoodput {
    /// `bytes` in `ms` against `bare_mb_s` (`None` when either rate is unknown).
    fn new(bytes: u64, ms: f64, bare_mb_s: f64) -> Option<TransferGoodput> {
        if ms <= 0.0 || bare_mb_s <= 0.0 {
            return None;
        }
        let transfer_mb_s = bytes as f64 / ms / 1000.0;
        Some(TransferGoodput {
            transfer_mb_s,
            bare_quic_mb_s: bare_mb_s,
            ratio: transfer_mb_s / bare_mb_s,
        })
    }
}

/// The whole bench.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// When it ran (Unix ms).
    pub started_unix_ms: f64,
    /// Kernel, CPUs, memory.
    pub machine: String,
    /// Probe request interval, ms.
    pub probe_interval_ms: f64,
    /// Results, in run order.
    pub scenarios: Vec<ScenarioResult>,
    /// Scenarios left out, with the reason.
    pub skipped: Vec<String>,
    /// One bare QUIC stream's goodput on each link the bench used.
    #[serde(default)]
    pub bare_quic: Vec<LinkGoodput>,
    /// Wall time of the whole bench, s.
    pub duration_s: f64,
}

/// `ferry bench`.
pub async fn run(dir: &Path, exe: &Path, workload: &Path, opts: BenchOpts) -> Result<ExitCode> {
    if !(0.1..=1000.0).contains(&opts.interval_ms) {
        bail!(
            "--interval-ms must be between 0.1 and 1000, got {}",
            opts.interval_ms
        );
    }
    let t0 = Instant::now();
    let started_unix_ms = ferry_runtime::util::unix_ms();
    let (scenarios, skipped) = fit_in_memory(opts.scenarios());
    for s in &skipped {
        eprintln!("bench: skipping {s}");
    }
    if scenarios.is_empty() {
        bail!("no scenario to run");
    }
    std::fs::create_dir_all(opts.out.join("charts"))
        .with_context(|| format!("creating {}", opts.out.display()))?;
    if dir.join("lab.json").exists() {
        eprintln!("bench: replacing the running lab at {}", dir.display());
    }
    crate::lab::down(dir)?;
    let mut lab = crate::lab::up(dir, 2, exe, workload, None, Default::default(), false).await?;
    let r = async {
        let counters = ByteCounters::install(&lab, FROM, TO)?;
        let mut bare = vec![];
        let r = run_all(
            &mut lab, exe, workload, &opts, &scenarios, &counters, &mut bare,
        )
        .await;
        counters.remove();
        r.map(|r| (r, bare))
    }
    .await;
    if !opts.keep {
        crate::lab::down(dir)?;
    }
    let (results, bare_quic) = r?;
    let result = BenchResult {
        started_unix_ms,
        machine: machine_summary(),
        probe_interval_ms: opts.interval_ms,
        scenarios: results,
        skipped,
        bare_quic,
        duration_s: t0.elapsed().as_secs_f64(),
    };
    let json_path = opts.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&result)?)?;
    let md = markdown(&result);
    std::fs::write(opts.out.join("results.md"), &md)?;
    println!("{md}");
    eprintln!(
        "bench: {} scenarios in {:.0} s; results in {} (results.json, results.md, charts/)",
        result.scenarios.len(),
        result.duration_s,
        opts.out.display()
    );
    let all_ok = result
        .scenarios
        .iter()
        .all(|s| s.ferry.ok && s.baseline.as_ref().is_none_or(|b| b.ok));
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Leaves out memory scenarios that would not fit: the source's process and images, the
/// destination's images and process can exist at once, plus 1 GiB for everything else.
fn fit_in_memory(all: Vec<Scenario>) -> (Vec<Scenario>, Vec<String>) {
    let avail_mib = mem_available_mib();
    let mut run = vec![];
    let mut skipped = vec![];
    for s in all {
        if let Workload::Memory { size_mib, .. } = s.workload {
            let need = size_mib * 4 + 1024;
            if avail_mib.is_some_and(|a| a < need) {
                skipped.push(format!(
                    "{}: needs about {need} MiB of memory, {} MiB available",
                    s.id,
                    avail_mib.unwrap_or(0)
                ));
                continue;
            }
        }
        run.push(s);
    }
    (run, skipped)
}

fn mem_available_mib() -> Option<u64> {
    ferry_runtime::util::mem_available_bytes().map(|b| b >> 20)
}

fn machine_summary() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = ferry_runtime::util::mem_total_bytes().unwrap_or(0);
    format!(
        "Linux {}, {cpus} CPUs, {:.1} GiB",
        kernel.trim(),
        mem as f64 / f64::from(1u32 << 30)
    )
}

async fn run_all(
    lab: &mut Lab,
    exe: &Path,
    workload: &Path,
    opts: &BenchOpts,
    scenarios: &[Scenario],
    counters: &ByteCounters,
    bare: &mut Vec<LinkGoodput>,
) -> Result<Vec<ScenarioResult>> {
    let mut results = vec![];
    // The baseline does not depend on Ferry's mode: measured once per workload and link.
    let mut baselines: std::collections::HashMap<String, Run> = Default::default();
    let n = scenarios.len();
    for (i, s) in scenarios.iter().enumerate() {
        if lab.link_rate != s.link_rate {
            crate::lab::set_link_rate(lab, s.link_rate)?;
        }
        let link = s.link_label();
        let wants_bare = s.mode == Mode::StopCopy && matches!(s.workload, Workload::Memory { .. });
        if wants_bare && !bare.iter().any(|b| b.link == link) {
            match link_goodput(lab).await {
                Ok(g) => bare.push(g),
                Err(e) => eprintln!("bench   bare QUIC stream on a {link} link: FAILED: {e:#}"),
            }
        }
        eprintln!(
            "bench [{}/{n}] {} on a {} link, {}",
            i + 1,
            s.workload.label(),
            s.link_label(),
            s.mode
        );
        // Every scenario starts with empty page stores: pages an earlier scenario left (the
        // workload's content is the same in every run) would make Ferry send less than a
        // first migration does.
        for h in lab.container_hosts() {
            lab.client(&h.name)?
                .forget_pages()
                .await
                .with_context(|| format!("emptying the page store of {}", h.name))?;
        }
        // The yardstick of this transfer: bare streams right before and right after it (the
        // VM's speed drifts between scenarios more than the ratio is to tell apart).
        let before = if wants_bare {
            adjacent_goodput(lab, "before").await
        } else {
            None
        };
        let ferry = run_ferry(lab, exe, s, opts, counters, i).await;
        eprintln!("bench   ferry:    {}", ferry.summary());
        let after = if wants_bare {
            adjacent_goodput(lab, "after").await
        } else {
            None
        };
        tokio::time::sleep(SETTLE).await;
        let key = format!("{}-{}", s.workload.slug(), s.link_label());
        let baseline = if let Some(b) = baselines.get(&key) {
            eprintln!("bench   baseline: measured above, {}", b.summary());
            Some(b.clone())
        } else if opts.baseline {
            let b = run_baseline(lab, exe, workload, s, opts, counters, i).await;
            eprintln!("bench   baseline: {}", b.summary());
            tokio::time::sleep(SETTLE).await;
            baselines.insert(key, b.clone());
            Some(b)
        } else {
            None
        };
        let ratio = |f: f64, b: f64| (f > 0.0 && b > 0.0).then(|| f / b);
        let (downtime_ratio, total_ratio) = match &baseline {
            Some(b) if ferry.ok && b.ok => (
                ratio(ferry.downtime_ms, b.downtime_ms),
                ratio(ferry.total_ms, b.total_ms),
            ),
            _ => (None, None),
        };
        let chart = format!("charts/{}.svg", s.id);
        std::fs::write(
            opts.out.join(&chart),
            render_chart(s, &ferry, baseline.as_ref()),
        )?;
        let beside: Vec<f64> = before.into_iter().chain(after).collect();
        let bare_mb_s = if beside.is_empty() {
            bare.iter().find(|b| b.link == link).map(|b| b.median_mb_s)
        } else {
            Some(beside.iter().sum::<f64>() / beside.len() as f64)
        };
        let transfer_goodput = transfer_goodput(s, &ferry, bare_mb_s);
        results.push(ScenarioResult {
            transfer_goodput,
            scenario: s.clone(),
            ferry: ferry.without_series(),
            baseline: baseline.map(Run::without_series),
            downtime_ratio,
            total_ratio,
            chart,
        });
    }
    Ok(results)
}

impl Run {
    fn failed(method: &str, e: anyhow::Error) -> Run {
        Run {
            method: method.into(),
            ok: false,
            error: Some(format!("{e:#}")),
            downtime_ms: 0.0,
            time_above_threshold_ms: 0.0,
            frozen_ms: None,
            gap_minus_frozen_ms: None,
            network_switch_ms: None,
            total_ms: 0.0,
            phases: vec![],
            wire_bytes: 0,
            payload_bytes: None,
            resident_bytes: None,
            fill_rtt: None,
            cpu_ms: 0.0,
            memory_intact: None,
            verify: None,
            probe: None,
            report: None,
            baseline_steps: None,
        }
    }

    fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("FAILED: {e}");
        }
        let mut s = format!(
            "downtime {:.1} ms, total {:.1} ms, {} on the wire, CPU {:.0} ms",
            self.downtime_ms,
            self.total_ms,
            crate::ops::human_bytes(self.wire_bytes),
            self.cpu_ms
        );
        if let Some(f) = self.frozen_ms {
            let _ = write!(s, ", frozen {f:.1} ms");
        }
        if let Some(m) = self.memory_intact {
            let _ = write!(s, ", memory intact: {m}");
        }
        if !self.ok {
            s.push_str(" (NOT OK)");
        }
        s
    }

    fn without_series(mut self) -> Run {
        if let Some(p) = &mut self.probe {
            p.series.clear();
        }
        self
    }

    /// Samples and largest gap on the migration's clock (0 = migration start).
    fn timeline(&self, migration_start_unix_ms: f64) -> (Samples, Option<(f64, f64)>) {
        let Some(p) = &self.probe else {
            return (vec![], None);
        };
        let shift = p.started_unix_ms - migration_start_unix_ms;
        let samples = p.series.iter().map(|&(t, rtt)| (t + shift, rtt)).collect();
        let gap = (p.max_gap_ms > 0.0).then(|| {
            let end = p.max_gap_at_ms + shift;
            (end - p.max_gap_ms, end)
        });
        (samples, gap)
    }
}

#[cfg(test)]
mod tests;
