//! `ferry bench`: a matrix of migration scenarios in the lab, each run with Ferry and with the
//! baseline an admin would otherwise use (runc checkpoint with CRIU, `tar | nc` of images and
//! bundle, runc restore, overlay switch), in the same run, under the same probe.
//!
//! For every scenario and method it records the application-observed downtime (the probe's
//! largest gap between answers), the phase breakdown, the total migration time, the bytes on the
//! underlay between the two hosts, the CPU time spent, and whether the workload's memory stayed
//! intact. It writes `results.json`, `results.md` and one SVG chart per scenario.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use migrate_core::{Outcome, Report};
use serde::{Deserialize, Serialize};

use crate::chart::{Panel, Span};
use crate::demo::{Baseline, BaselineReport, ProbeProcess, ProbeSettings, ECHO_PORT};
use crate::lab::{Lab, LinkRate};
use crate::probe::ProbeReport;

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

/// How a container is moved.
// The field's own names: stop-and-copy, pre-copy, post-copy.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Freeze, dump everything, send, restore.
    StopCopy,
    /// Rounds of memory and root filesystem changes while it runs, then freeze for the rest.
    PreCopy,
    /// Freeze at once, restore lazily, fetch the memory from the source while it runs.
    PostCopy,
}

impl Mode {
    fn request(self, to: &str) -> orchestrator_shim::api::MigrateRequest {
        let mut r = crate::ops::stop_copy_to(to);
        if self != Mode::StopCopy {
            r.mode = orchestrator_shim::api::MigrateMode::PreCopy;
        }
        if self == Mode::PostCopy {
            r.precopy = Some(migrate_core::PrecopyPolicy {
                post_copy: true,
                ..Default::default()
            });
        }
        r
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::StopCopy => "stop-copy",
            Mode::PreCopy => "pre-copy",
            Mode::PostCopy => "post-copy",
        })
    }
}

/// What runs in the container.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// Line echo server with an in-memory counter.
    Echo,
    /// `ferry-workload mem`: resident memory that it dirties and verifies itself.
    Memory {
        /// Resident size, MiB.
        size_mib: u64,
        /// Pages rewritten per second, MiB/s.
        dirty_mib_s: f64,
    },
    /// The echo server next to `count` sleeping processes: what the freeze costs per process.
    Processes {
        /// Processes besides the echo server.
        count: u32,
    },
}

impl Workload {
    fn label(&self) -> String {
        match self {
            Workload::Echo => "echo".into(),
            Workload::Memory {
                size_mib,
                dirty_mib_s,
            } => format!("mem {} MiB, dirty {dirty_mib_s} MiB/s", size_mib),
            Workload::Processes { count } => format!("echo + {count} processes"),
        }
    }

    fn slug(&self) -> String {
        match self {
            Workload::Echo => "echo".into(),
            Workload::Memory {
                size_mib,
                dirty_mib_s,
            } => format!("mem{size_mib}m-dirty{dirty_mib_s}"),
            Workload::Processes { count } => format!("procs{count}"),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Workload::Echo => crate::demo::echo_args(),
            Workload::Memory {
                size_mib,
                dirty_mib_s,
            } => [
                "/bin/ferry-workload",
                "mem",
                "--port",
                &ECHO_PORT.to_string(),
                "--size-mib",
                &size_mib.to_string(),
                "--dirty-mib-s",
                &dirty_mib_s.to_string(),
            ]
            .map(String::from)
            .to_vec(),
            Workload::Processes { count } => vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "i=0; while [ $i -lt {count} ]; do sleep 1000000 & i=$((i+1)); done; exec {}",
                    crate::demo::echo_args().join(" ")
                ),
            ],
        }
    }

    /// How long the workload may take to answer after its start (it fills its memory first).
    fn ready_within(&self) -> Duration {
        match self {
            Workload::Echo | Workload::Processes { .. } => Duration::from_secs(10),
            Workload::Memory { size_mib, .. } => Duration::from_secs(10 + size_mib / 100),
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// Short unique name, used for file names.
    pub id: String,
    /// What runs in the container.
    pub workload: Workload,
    /// Underlay rate limit (`None`: unshaped).
    pub link_rate: Option<LinkRate>,
    /// How Ferry moves it.
    pub mode: Mode,
}

/// A link's name in results: its rate, or `unshaped`.
fn link_label(rate: Option<LinkRate>) -> String {
    rate.map(|r| r.to_string())
        .unwrap_or_else(|| "unshaped".into())
}

impl Scenario {
    fn link_label(&self) -> String {
        link_label(self.link_rate)
    }
}

/// Bench settings.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Include the echo container.
    pub echo: bool,
    /// Scenarios of the echo server next to this many processes.
    pub processes: Vec<u32>,
    /// Memory workload sizes, MiB.
    pub sizes_mib: Vec<u64>,
    /// Memory workload dirty rates, MiB/s.
    pub dirty_mib_s: Vec<f64>,
    /// Link rates (`None`: unshaped).
    pub link_rates: Vec<Option<LinkRate>>,
    /// Ferry's migration modes.
    pub modes: Vec<Mode>,
    /// Run the baseline next to Ferry.
    pub baseline: bool,
    /// Probe request interval, ms.
    pub interval_ms: f64,
    /// Where the results go.
    pub out: PathBuf,
    /// Leave the lab up.
    pub keep: bool,
}

impl BenchOpts {
    /// The quick matrix: echo, echo next to 120 processes, and the memory workload at 256 MiB
    /// dirtying 0 and 50 MiB/s, on an unshaped and a 1 Gbit/s link, in stop-copy and in
    /// pre-copy mode.
    pub fn quick(out: PathBuf) -> BenchOpts {
        BenchOpts {
            echo: true,
            processes: vec![120],
            sizes_mib: vec![256],
            dirty_mib_s: vec![0.0, 50.0],
            link_rates: vec![None, Some(LinkRate(1_000_000_000))],
            modes: vec![Mode::StopCopy, Mode::PreCopy],
            baseline: true,
            interval_ms: 1.0,
            out,
            keep: false,
        }
    }

    /// The full matrix: sizes up to 4 GiB (those that fit in memory).
    pub fn full(out: PathBuf) -> BenchOpts {
        BenchOpts {
            sizes_mib: vec![256, 1024, 4096],
            ..BenchOpts::quick(out)
        }
    }

    /// Every scenario, links outermost (a link change is one `tc` call).
    pub fn scenarios(&self) -> Vec<Scenario> {
        let mut workloads = vec![];
        if self.echo {
            workloads.push(Workload::Echo);
        }
        for &count in &self.processes {
            workloads.push(Workload::Processes { count });
        }
        for &size_mib in &self.sizes_mib {
            for &dirty_mib_s in &self.dirty_mib_s {
                workloads.push(Workload::Memory {
                    size_mib,
                    dirty_mib_s,
                });
            }
        }
        let mut out = vec![];
        for &link_rate in &self.link_rates {
            for &mode in &self.modes {
                for &workload in &workloads {
                    let link = link_label(link_rate);
                    out.push(Scenario {
                        id: format!("{}-{link}-{mode}", workload.slug()),
                        workload,
                        link_rate,
                        mode,
                    });
                }
            }
        }
        out
    }
}

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
    let mut lab = crate::lab::up(dir, 2, exe, workload, None, Default::default()).await?;
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
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "Linux {}, {cpus} CPUs, {:.1} GiB",
        kernel.trim(),
        mem as f64 / 1024.0 / 1024.0
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

async fn run_ferry(
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
    let mut error = None;
    if !completed {
        error = Some(format!("migration did not complete: {:?}", report.outcome));
    } else if !probe.intact {
        error = Some(format!(
            "the client saw errors: {}",
            probe.error_messages.join("; ")
        ));
    } else if memory_intact == Some(false) {
        error = Some(format!(
            "the workload's memory is damaged: {}",
            verify.clone().unwrap_or_default()
        ));
    }
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
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

async fn run_baseline(
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
    let mut error = None;
    if !probe.intact {
        error = Some(format!(
            "the client saw errors: {}",
            probe.error_messages.join("; ")
        ));
    } else if memory_intact == Some(false) {
        error = Some(format!(
            "the workload's memory is damaged: {}",
            verify.clone().unwrap_or_default()
        ));
    }
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
fn memory_verdict(probe: &ProbeReport, verify: Option<&str>, w: &Workload) -> Option<bool> {
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
struct ByteCounters {
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
    fn install(lab: &Lab, a: &str, b: &str) -> Result<ByteCounters> {
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

    fn read(&self) -> Result<u64> {
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

    fn remove(&self) {
        for (ns, dst) in &self.pairs {
            ferry_runtime::util::run_quiet("ip", counter_rule(ns, "-D", *dst));
        }
    }
}

fn render_chart(s: &Scenario, ferry: &Run, baseline: Option<&Run>) -> String {
    let mut panels = vec![];
    let panel = |title: &str, run: &Run, start_unix: f64| -> Panel {
        let (samples, largest_gap) = run.timeline(start_unix);
        let note = match &run.error {
            Some(e) => format!("FAILED: {e}"),
            None => format!(
                "downtime {:.1} ms{}, total {:.1} ms, {} on the wire",
                run.downtime_ms,
                run.frozen_ms
                    .map(|f| format!(" (frozen {f:.1} ms)"))
                    .unwrap_or_default(),
                run.total_ms,
                crate::ops::human_bytes(run.wire_bytes)
            ),
        };
        Panel {
            title: title.into(),
            samples,
            phases: run
                .phases
                .iter()
                .map(|p| Span {
                    label: p.name.clone(),
                    start_ms: p.start_ms,
                    end_ms: p.start_ms + p.duration_ms,
                })
                .collect(),
            largest_gap,
            note,
        }
    };
    let ferry_start = ferry
        .report
        .as_ref()
        .map(|r| r.started_unix_ms)
        .unwrap_or(0.0);
    panels.push(panel(&format!("Ferry ({})", s.mode), ferry, ferry_start));
    if let Some(b) = baseline {
        let start = b
            .baseline_steps
            .as_ref()
            .map(|s| s.started_unix_ms)
            .unwrap_or(0.0);
        panels.push(panel("baseline (runc + CRIU by hand)", b, start));
    }
    let window = crate::chart::window(&panels, 300.0, 500.0);
    crate::chart::render(
        &format!(
            "{} on a {} link: probe round trips during the migration",
            s.workload.label(),
            s.link_label()
        ),
        &panels,
        window,
    )
}

/// The Markdown table of a bench.
/// Pre-copy next to stop-copy for the same workload and link: the client's gap, the bytes
/// between the hosts against the container's resident memory, and the rounds.
/// How each pre-copy run's memory crossed the freeze: frozen time split, eager and lazy pages,
/// the fill.
/// Stop-and-copy's transfer against a bare QUIC stream, per memory scenario.
fn goodput_table(s: &mut String, r: &BenchResult) {
    if r.bare_quic.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nStop-and-copy transfer (inside the freeze) against bare QUIC streams between the same hosts right before and after it (their mean):\n\n| scenario | link | transfer MB/s | bare QUIC MB/s | ratio |\n|---|---|--:|--:|--:|"
    );
    for x in &r.scenarios {
        if let Some(g) = x.transfer_goodput {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.2} |",
                x.scenario.workload.label(),
                x.scenario.link_label(),
                g.transfer_mb_s,
                g.bare_quic_mb_s,
                g.ratio
            );
        }
    }
    for b in &r.bare_quic {
        let runs: Vec<String> = b.runs.iter().map(|g| format!("{:.0}", g.mb_s())).collect();
        let _ = writeln!(
            s,
            "\nBare QUIC on the {} link: {} MB/s (runs: {}; {} each).",
            b.link,
            format_args!("{:.0}", b.median_mb_s),
            runs.join(", "),
            crate::ops::human_bytes(GOODPUT_BYTES)
        );
    }
}

fn memory_table(s: &mut String, r: &BenchResult) {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(&ScenarioResult, &Report, &migrate_core::MemoryReport)> = r
        .scenarios
        .iter()
        .filter_map(|x| {
            let rep = x.ferry.report.as_ref()?;
            Some((x, rep, rep.memory.as_ref()?))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nMemory across the freeze (pre-copy and post-copy):\n\n| scenario | link | mode | restore | frozen ms | dump ms | transfer ms | restore ms | commit ms | round trips frozen | dirty pages | never-copied pages | eager pages | lazy pages | fill ms | fill MiB/s | probe RTT p50 / p99 before, ms | probe RTT p50 / p99 during the fill, ms | integrity checked / mismatched / corrected | post-copy pages fetched / on fault | fill error |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    );
    let f0 = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for (x, rep, m) in rows {
        let commit = rep
            .phases
            .iter()
            .filter(|p| p.phase == migrate_core::Phase::Commit)
            .map(|p| p.duration_ms)
            .sum::<f64>();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.scenario.workload.label(),
            x.scenario.link_label(),
            x.scenario.mode,
            m.restore,
            rep.frozen_ms,
            rep.freeze_to_dump_ms,
            rep.transfer_ms,
            rep.restore_ms,
            commit,
            rep.frozen_round_trips,
            m.final_dirty_pages,
            m.unplaced_pages,
            m.eager_pages,
            m.lazy_pages,
            f0(m.fill_ms),
            f0(m.fill_mib_s),
            x.ferry.fill_rtt.map_or("-".into(), |f| format!("{:.2} / {:.2}", f.before_p50_ms, f.before_p99_ms)),
            x.ferry.fill_rtt.map_or("-".into(), |f| format!("{:.2} / {:.2} ({} answers)", f.fill_p50_ms, f.fill_p99_ms, f.fill_samples)),
            m.integrity.as_ref().map_or("-".into(), |i| format!(
                "{} / {} / {}{}",
                i.pages_checked,
                i.mismatches,
                i.corrected,
                if i.incomplete.is_some() { " (incomplete)" } else { "" }
            )),
            m.fetched_pages.map_or("-".into(), |f| format!(
                "{f} / {}",
                m.fetched_on_fault.unwrap_or(0)
            )),
            m.fill_error.as_deref().or(m.not_lazy.as_deref()).unwrap_or("-"),
        );
    }
}

fn precopy_table(s: &mut String, r: &BenchResult) {
    let pairs: Vec<(&ScenarioResult, &ScenarioResult)> = r
        .scenarios
        .iter()
        .filter(|x| x.scenario.mode == Mode::PreCopy)
        .filter_map(|p| {
            r.scenarios
                .iter()
                .find(|x| {
                    x.scenario.mode == Mode::StopCopy
                        && x.scenario.workload == p.scenario.workload
                        && x.scenario.link_rate == p.scenario.link_rate
                })
                .map(|sc| (p, sc))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nPre-copy against stop-copy (same run):\n\n| scenario | link | pre-copy gap ms | stop-copy gap ms | gap ratio | pre-copy frozen ms | rounds | stop reason | pre-copy wire | resident | wire / resident | memory intact |"
    );
    let _ = writeln!(s, "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|---|");
    for (p, sc) in pairs {
        let (f, g) = (&p.ferry, &sc.ferry);
        let both = f.error.is_none() && g.error.is_none();
        let rep = f.report.as_ref();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.scenario.workload.label(),
            p.scenario.link_label(),
            if f.error.is_none() {
                format!("{:.1}", f.downtime_ms)
            } else {
                "failed".into()
            },
            if g.error.is_none() {
                format!("{:.1}", g.downtime_ms)
            } else {
                "failed".into()
            },
            if both && g.downtime_ms > 0.0 {
                format!("{:.2}", f.downtime_ms / g.downtime_ms)
            } else {
                "-".into()
            },
            f.frozen_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into()),
            rep.map(|r| r.rounds.len().to_string())
                .unwrap_or_else(|| "-".into()),
            rep.and_then(|r| r.precopy_stop.as_ref())
                .map(|v| serde_json::to_value(v)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default())
                .unwrap_or_else(|| "-".into()),
            crate::ops::human_bytes(f.wire_bytes),
            f.resident_bytes
                .map(crate::ops::human_bytes)
                .unwrap_or_else(|| "-".into()),
            f.resident_bytes
                .filter(|&r| r > 0 && f.error.is_none())
                .map(|r| format!("{:.2}", f.wire_bytes as f64 / r as f64))
                .unwrap_or_else(|| "-".into()),
            match f.memory_intact {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            },
        );
    }
}

pub fn markdown(r: &BenchResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Machine: {}. Probe: one TCP connection, a request every {} ms.\n",
        r.machine, r.probe_interval_ms
    );
    let _ = writeln!(
        s,
        "| scenario | link | Ferry downtime ms | Ferry frozen ms | round trips frozen | gap - frozen ms | switch ms | baseline downtime ms | downtime ratio | Ferry total ms | baseline total ms | total ratio | Ferry wire | baseline wire | CPU ms Ferry / baseline | memory intact |"
    );
    let _ = writeln!(
        s,
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    );
    let f1 = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let f2 = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    for x in &r.scenarios {
        let f = &x.ferry;
        let b = x.baseline.as_ref();
        let ok = |run: &Run| -> Option<f64> { run.error.is_none().then_some(0.0) };
        let val = |run: Option<&Run>, g: fn(&Run) -> f64| -> Option<f64> {
            run.and_then(|r| ok(r).map(|_| g(r)))
        };
        let intact = |run: Option<&Run>| match run {
            None => "-".to_string(),
            Some(r) if r.error.is_some() => "failed".into(),
            Some(r) => match r.memory_intact {
                None => "n/a".into(),
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
            },
        };
        let _ = writeln!(
            s,
            "| {} [{}] | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            x.scenario.workload.label(),
            x.scenario.mode,
            x.scenario.link_label(),
            f1(val(Some(f), |r| r.downtime_ms)),
            f1(f.frozen_ms.filter(|_| f.error.is_none())),
            f.report
                .as_ref()
                .filter(|_| f.error.is_none())
                .map_or("-".into(), |r| r.frozen_round_trips.to_string()),
            f1(f.gap_minus_frozen_ms.filter(|_| f.error.is_none())),
            f1(f.network_switch_ms.filter(|_| f.error.is_none())),
            f1(val(b, |r| r.downtime_ms)),
            f2(x.downtime_ratio),
            f1(val(Some(f), |r| r.total_ms)),
            f1(val(b, |r| r.total_ms)),
            f2(x.total_ratio),
            if f.error.is_none() {
                crate::ops::human_bytes(f.wire_bytes)
            } else {
                "-".into()
            },
            b.filter(|r| r.error.is_none())
                .map(|r| crate::ops::human_bytes(r.wire_bytes))
                .unwrap_or_else(|| "-".into()),
            f1(val(Some(f), |r| r.cpu_ms)),
            f1(val(b, |r| r.cpu_ms)),
            intact(Some(f)),
            intact(b),
        );
    }
    precopy_table(&mut s, r);
    memory_table(&mut s, r);
    goodput_table(&mut s, r);
    let failures: Vec<String> = r
        .scenarios
        .iter()
        .flat_map(|x| {
            std::iter::once(&x.ferry)
                .chain(x.baseline.as_ref())
                .filter_map(move |run| {
                    run.error
                        .as_ref()
                        .map(|e| format!("- {} {}: {e}", x.scenario.id, run.method))
                })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\nFailures:\n{}", failures.join("\n"));
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(s, "\nSkipped:\n- {}", r.skipped.join("\n- "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_goodput_is_a_rate_against_the_bare_stream() {
        let g = TransferGoodput::new(400_000_000, 1000.0, 500.0).unwrap();
        assert_eq!((g.transfer_mb_s, g.ratio), (400.0, 0.8));
        assert!(TransferGoodput::new(1, 0.0, 500.0).is_none());
        assert!(TransferGoodput::new(1, 10.0, 0.0).is_none());
    }

    #[test]
    fn quantiles_of_round_trips() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), Some(51.0));
        assert_eq!(quantile(&mut v, 0.99), Some(99.0));
        assert_eq!(quantile(&mut v, 1.0), Some(100.0));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    fn run(method: &str, downtime: f64, total: f64) -> Run {
        let mut r = Run::failed(method, anyhow::anyhow!("x"));
        r.ok = true;
        r.error = None;
        r.downtime_ms = downtime;
        r.total_ms = total;
        r.wire_bytes = 3 << 20;
        r
    }

    #[test]
    fn the_quick_matrix_is_what_the_issue_asks_for() {
        let s = BenchOpts::quick("x".into()).scenarios();
        assert_eq!(s.len(), 16);
        let ids: std::collections::BTreeSet<_> = s.iter().map(|s| s.id.clone()).collect();
        assert_eq!(ids.len(), 16, "ids are unique: {ids:?}");
        for link in [None, Some(LinkRate(1_000_000_000))] {
            let on: Vec<_> = s.iter().filter(|s| s.link_rate == link).collect();
            assert_eq!(on.len(), 8);
            assert!(on.iter().any(|s| s.workload == Workload::Echo));
            assert!(on
                .iter()
                .any(|s| s.workload == Workload::Processes { count: 120 }));
            for dirty in [0.0, 50.0] {
                assert!(on.iter().any(|s| s.workload
                    == Workload::Memory {
                        size_mib: 256,
                        dirty_mib_s: dirty
                    }));
            }
        }
        for m in [Mode::StopCopy, Mode::PreCopy] {
            assert_eq!(s.iter().filter(|s| s.mode == m).count(), s.len() / 2);
        }
    }

    #[test]
    fn memory_scenarios_that_do_not_fit_are_skipped_with_a_reason() {
        let mut o = BenchOpts::full("x".into());
        o.sizes_mib = vec![1 << 30];
        let (run, skipped) = fit_in_memory(o.scenarios());
        assert!(run
            .iter()
            .all(|s| !matches!(s.workload, Workload::Memory { .. })));
        assert_eq!(skipped.len(), 8, "2 dirty rates x 2 links x 2 modes");
        assert!(skipped[0].contains("MiB available"), "{skipped:?}");
    }

    #[test]
    fn the_verdict_needs_both_the_probe_and_a_full_pass() {
        let mut p: ProbeReport = serde_json::from_value(serde_json::json!({
            "target": "x", "interval_ms": 1.0, "sent": 1, "received": 1, "errors": 0,
            "error_messages": [], "max_gap_ms": 1.0, "max_gap_at_ms": 1.0,
            "time_above_threshold_ms": 0.0, "threshold_ms": 10.0, "rtt_p50_ms": 0.1,
            "rtt_p99_ms": 0.1, "rtt_max_ms": 0.1, "counter_first": 1, "counter_last": 1,
            "intact": true, "duration_ms": 1.0, "memory_intact": true
        }))
        .unwrap();
        let m = Workload::Memory {
            size_mib: 1,
            dirty_mib_s: 0.0,
        };
        assert_eq!(
            memory_verdict(&p, Some("verify ok pages=256 bad=0"), &m),
            Some(true)
        );
        assert_eq!(
            memory_verdict(&p, Some("verify bad pages=256 bad=1 first=3"), &m),
            Some(false)
        );
        assert_eq!(memory_verdict(&p, None, &m), Some(false));
        p.memory_intact = Some(false);
        assert_eq!(
            memory_verdict(&p, Some("verify ok pages=256 bad=0"), &m),
            Some(false)
        );
        assert_eq!(memory_verdict(&p, None, &Workload::Echo), None);
    }

    #[test]
    fn the_table_has_a_row_per_scenario_with_ratios_and_lists_failures() {
        let s = BenchOpts::quick("x".into()).scenarios();
        let ok = ScenarioResult {
            scenario: s[0].clone(),
            ferry: run("ferry", 100.0, 300.0),
            baseline: Some(run("baseline", 1000.0, 400.0)),
            downtime_ratio: Some(0.1),
            total_ratio: Some(0.75),
            chart: "charts/a.svg".into(),
            transfer_goodput: TransferGoodput::new(256 << 20, 500.0, 671.0),
        };
        let failed = ScenarioResult {
            scenario: s[1].clone(),
            ferry: Run::failed("ferry", anyhow::anyhow!("restore failed")),
            baseline: None,
            downtime_ratio: None,
            total_ratio: None,
            chart: "charts/b.svg".into(),
            transfer_goodput: None,
        };
        let md = markdown(&BenchResult {
            started_unix_ms: 0.0,
            machine: "m".into(),
            probe_interval_ms: 1.0,
            scenarios: vec![ok, failed],
            skipped: vec!["big: needs memory".into()],
            bare_quic: vec![LinkGoodput {
                link: "unshaped".into(),
                runs: vec![crate::goodput::Goodput {
                    bytes: 671_000_000,
                    ms: 1000.0,
                }],
                median_mb_s: 671.0,
            }],
            duration_s: 1.0,
        });
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(
            rows.len(),
            5,
            "header and two rows, goodput header and row: {md}"
        );
        assert!(
            rows[4].ends_with("| 537 | 671 | 0.80 |"),
            "256 MiB in 500 ms against 671 MB/s: {md}"
        );
        assert!(md.contains("Bare QUIC on the unshaped link: 671 MB/s (runs: 671;"));
        assert!(rows[1].contains("| 100.0 |") && rows[1].contains("| 0.10 |"));
        assert!(rows[1].contains("| 0.75 |") && rows[1].contains("3.00 MiB"));
        assert!(md.contains("restore failed") && md.contains("big: needs memory"));
    }
}
