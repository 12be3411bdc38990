//! `ferry demo`: the lab, an echo container under a live client, two migrations (there and
//! back), and for comparison the same move done by hand with runc the way an admin would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_api::{ContainerInfo, CreateContainer};
use migrate_core::{Outcome, Report};
use serde::Serialize;

use crate::lab::Lab;
use crate::probe::ProbeReport;
use ferry_runtime::layout::Layout;
use ferry_runtime::util::{ms, run as sh};

/// Port the workloads serve on.
pub const ECHO_PORT: u16 = 7000;
/// Request interval of the demo's client.
pub const PROBE_INTERVAL_MS: f64 = 5.0;

/// How a [`ProbeProcess`] probes.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// Request interval, ms.
    pub interval_ms: f64,
    /// Gaps above this count as time above threshold, ms.
    pub threshold_ms: f64,
    /// After the stop, wait up to this long for answers still due, s.
    pub drain_s: f64,
    /// Keep every sample.
    pub series: bool,
}

/// A probe running in the lab's client host.
pub struct ProbeProcess {
    child: Child,
    stop_file: PathBuf,
}

impl ProbeProcess {
    /// Starts `ferry probe` inside the client host against `ip:ECHO_PORT` at the demo's rate.
    pub fn start(lab: &Lab, exe: &Path, ip: std::net::Ipv4Addr, tag: &str) -> Result<Self> {
        let settings = ProbeSettings {
            interval_ms: PROBE_INTERVAL_MS,
            threshold_ms: 20.0,
            drain_s: 5.0,
            series: false,
        };
        Self::start_with(lab, exe, ip, tag, &settings)
    }

    /// Starts `ferry probe` inside the client host with the given settings.
    pub fn start_with(
        lab: &Lab,
        exe: &Path,
        ip: std::net::Ipv4Addr,
        tag: &str,
        settings: &ProbeSettings,
    ) -> Result<Self> {
        let ProbeSettings {
            interval_ms,
            threshold_ms,
            drain_s,
            series,
        } = *settings;
        let stop_file = lab.dir.join(format!("probe-{tag}.stop"));
        let _ = std::fs::remove_file(&stop_file);
        let client = lab.host("client")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &client.netns])
            .arg(exe)
            .args(["probe", "--target", &format!("{ip}:{ECHO_PORT}")])
            .args(["--interval-ms", &interval_ms.to_string()])
            .args(["--threshold-ms", &threshold_ms.to_string()])
            .args(["--drain-s", &drain_s.to_string()])
            .arg("--stop-file")
            .arg(&stop_file);
        if series {
            cmd.arg("--series");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the probe in the client host")?;
        Ok(ProbeProcess { child, stop_file })
    }

    /// Stops the probe and returns its report.
    pub fn finish(self) -> Result<ProbeReport> {
        std::fs::write(&self.stop_file, b"stop")?;
        let out = self.child.wait_with_output()?;
        let _ = std::fs::remove_file(&self.stop_file);
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "the probe printed no report (exit {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// The echo workload's command line.
pub fn echo_args() -> Vec<String> {
    vec![
        "/bin/ferry-workload".into(),
        "echo".into(),
        "--port".into(),
        ECHO_PORT.to_string(),
    ]
}

/// Starts an echo container and waits until it answers from the client host.
pub async fn start_echo(lab: &Lab, host: &str, name: &str) -> Result<ContainerInfo> {
    start_workload(lab, host, name, echo_args(), Duration::from_secs(10)).await
}

/// Starts a container running `args` (a workload serving on `ECHO_PORT`) and waits up to
/// `ready` until it accepts connections from the client host.
pub async fn start_workload(
    lab: &Lab,
    host: &str,
    name: &str,
    args: Vec<String>,
    ready: Duration,
) -> Result<ContainerInfo> {
    let info = lab
        .client(host)?
        .create(&CreateContainer {
            name: name.into(),
            ip: None,
            args,
            ..CreateContainer::default()
        })
        .await?;
    wait_echo(lab, info.spec.ip, ready).await?;
    Ok(info)
}

/// Timings of the hand-made migration.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct BaselineReport {
    /// `runc checkpoint --tcp-established`, ms.
    pub checkpoint_ms: f64,
    /// Copy of images and bundle (root filesystem) to the destination, ms.
    pub copy_ms: f64,
    /// Network namespace with the same IP and MAC at the destination, ms.
    pub netns_ms: f64,
    /// `runc restore`, ms.
    pub restore_ms: f64,
    /// Overlay switch (`bridge fdb replace` on every host) and gratuitous ARP, ms.
    pub network_switch_ms: f64,
    /// All of it, ms.
    pub total_ms: f64,
    /// Wall-clock start, ms since the Unix epoch.
    pub started_unix_ms: f64,
}

impl BaselineReport {
    /// The steps as (name, start ms, duration ms), starts relative to `started_unix_ms`.
    pub fn steps(&self) -> Vec<(&'static str, f64, f64)> {
        let mut t = 0.0;
        [
            ("checkpoint", self.checkpoint_ms),
            ("copy", self.copy_ms),
            ("netns", self.netns_ms),
            ("restore", self.restore_ms),
            ("network", self.network_switch_ms),
        ]
        .into_iter()
        .map(|(n, d)| {
            let start = t;
            t += d;
            (n, start, d)
        })
        .collect()
    }
}

/// A container run and moved by hand with runc, the way an admin would without Ferry: default
/// CRIU settings, its own runc root per host, the same lab network.
pub struct Baseline {
    spec: ferry_api::ContainerSpec,
    dir: PathBuf,
}

impl Baseline {
    /// The container's overlay address.
    pub fn ip(&self) -> std::net::Ipv4Addr {
        self.spec.ip
    }

    fn state_dir(&self, host: &str) -> PathBuf {
        self.dir.join(host)
    }

    fn layout(&self, host: &str) -> Layout {
        Layout::new(&self.state_dir(host), host, &self.spec.name)
    }

    fn runc(&self, host: &str) -> String {
        self.state_dir(host)
            .join("runc")
            .to_string_lossy()
            .into_owned()
    }

    /// Starts the echo workload on `host` with runc and points the overlay at it.
    pub async fn start(
        lab: &Lab,
        workload: &Path,
        host: &str,
        name: &str,
        args: Vec<String>,
        ready: Duration,
    ) -> Result<Baseline> {
        let used: Vec<std::net::Ipv4Addr> = crate::ops::ps(lab)
            .await?
            .iter()
            .map(|c| c.spec.ip)
            .collect();
        let ip = ferry_runtime::util::first_free(
            std::net::Ipv4Addr::new(10, 232, 0, 200),
            std::net::Ipv4Addr::new(10, 232, 0, 249),
            &used,
        )
        .context("no free overlay address for the baseline container")?;
        let spec = ferry_api::ContainerSpec {
            name: name.into(),
            ip,
            mac: ferry_api::mac_for_ip(ip),
            prefix_len: 24,
            ipv6: None,
            args,
            image: None,
            process: Default::default(),
            resources: Default::default(),
            published: vec![],
        };
        let b = Baseline {
            spec,
            dir: lab.dir.join("baseline"),
        };
        let h = lab.host(host)?;
        let l = b.layout(host);
        ferry_runtime::bundle::build_rootfs(&l.rootfs(), workload)?;
        ferry_runtime::bundle::write_config(&l, &b.spec, host, None)?;
        ferry_runtime::netns::create_netns_in(Some(&h.netns), &l, &b.spec, "br0")?;
        let status = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", h.netns))
            .args([
                "runc",
                "--root",
                &b.runc(host),
                "run",
                "--detach",
                "--bundle",
            ])
            .arg(&l.bundle)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("runc run of the baseline container failed ({status})");
        }
        b.point_overlay(lab, host)?;
        wait_echo(lab, ip, ready).await?;
        Ok(b)
    }

    fn point_overlay(&self, lab: &Lab, host: &str) -> Result<()> {
        let vtep = lab.host(host)?.underlay_ip.to_string();
        for h in &lab.hosts {
            if h.name == host {
                ferry_runtime::util::run_quiet(
                    "bridge",
                    [
                        "-n",
                        &h.netns,
                        "fdb",
                        "del",
                        &self.spec.mac,
                        "dev",
                        "vx0",
                        "self",
                    ],
                );
            } else {
                sh(
                    "bridge",
                    [
                        "-n",
                        &h.netns,
                        "fdb",
                        "replace",
                        &self.spec.mac,
                        "dev",
                        "vx0",
                        "dst",
                        &vtep,
                        "self",
                        "permanent",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Moves the container from `from` to `to`: runc checkpoint, copy, namespace, runc restore,
    /// overlay switch, gratuitous ARP.
    pub fn migrate(&self, lab: &Lab, from: &str, to: &str) -> Result<BaselineReport> {
        let (src, dst) = (lab.host(from)?, lab.host(to)?);
        let name = self.spec.name.as_str();
        let (src_l, dst_l) = (self.layout(from), self.layout(to));
        let (img_src, img_dst) = (self.dir.join("img-src"), self.dir.join("img-dst"));
        let _ = std::fs::remove_dir_all(&img_src);
        let _ = std::fs::remove_dir_all(&img_dst);
        std::fs::create_dir_all(&img_src)?;
        let started_unix_ms = ferry_runtime::util::unix_ms();
        let t0 = Instant::now();
        sh(
            "nsenter",
            [
                &format!("--net=/run/netns/{}", src.netns),
                "runc",
                "--root",
                &self.runc(from),
                "checkpoint",
                "--tcp-established",
                "--image-path",
                &img_src.to_string_lossy(),
                "--work-path",
                &self.dir.join("w1").to_string_lossy(),
                name,
            ],
        )?;
        let t1 = Instant::now();
        // Over the underlay, the way an admin moves files between hosts: tar into netcat.
        net_copy(lab, from, to, &img_src, &img_dst)?;
        net_copy(lab, from, to, &src_l.bundle, &dst_l.bundle)?;
        ferry_runtime::bundle::write_config(&dst_l, &self.spec, to, None)?;
        let t2 = Instant::now();
        ferry_runtime::netns::create_netns_in(Some(&dst.netns), &dst_l, &self.spec, "br0")?;
        let t3 = Instant::now();
        sh(
            "nsenter",
            [
                &format!("--net=/run/netns/{}", dst.netns),
                "runc",
                "--root",
                &self.runc(to),
                "restore",
                "--detach",
                "--tcp-established",
                "--bundle",
                &dst_l.bundle.to_string_lossy(),
                "--image-path",
                &img_dst.to_string_lossy(),
                "--work-path",
                &self.dir.join("w2").to_string_lossy(),
                name,
            ],
        )?;
        let t4 = Instant::now();
        self.point_overlay(lab, to)?;
        // Gratuitous ARP, not waited for (as Ferry does it).
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &dst_l.netns,
                "arping",
                "-q",
                "-U",
                "-c",
                "1",
                "-w",
                "1",
                "-I",
                "eth0",
            ])
            .arg(self.spec.ip.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|mut c| std::thread::spawn(move || c.wait()));
        let t5 = Instant::now();
        // The source's namespace is the admin's to remove once the container runs elsewhere.
        ferry_runtime::util::run_quiet(
            "ip",
            ["-n", src.netns.as_str(), "link", "del", src_l.veth.as_str()],
        );
        ferry_runtime::netns::delete_netns(&src_l);
        Ok(BaselineReport {
            checkpoint_ms: ms(t1 - t0),
            copy_ms: ms(t2 - t1),
            netns_ms: ms(t3 - t2),
            restore_ms: ms(t4 - t3),
            network_switch_ms: ms(t5 - t4),
            total_ms: ms(t5 - t0),
            started_unix_ms,
        })
    }

    /// Removes the container wherever it is, its namespaces, files and overlay entries.
    pub fn remove(self, lab: &Lab) {
        for h in lab.container_hosts() {
            let _ = Command::new("runc")
                .args([
                    "--root",
                    &self.runc(&h.name),
                    "delete",
                    "--force",
                    &self.spec.name,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let l = self.layout(&h.name);
            ferry_runtime::util::run_quiet(
                "ip",
                ["-n", h.netns.as_str(), "link", "del", l.veth.as_str()],
            );
            ferry_runtime::netns::delete_netns(&l);
        }
        for h in &lab.hosts {
            ferry_runtime::util::run_quiet(
                "bridge",
                [
                    "-n",
                    h.netns.as_str(),
                    "fdb",
                    "del",
                    self.spec.mac.as_str(),
                    "dev",
                    "vx0",
                    "self",
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TCP port of the baseline's file copy on the destination's underlay address.
const COPY_PORT: u16 = 7799;

/// Copies directory `src` on host `from` to `dst` on host `to` over the lab's underlay with
/// `tar | nc` (plain TCP, no encryption), as an admin would between two machines.
pub fn net_copy(lab: &Lab, from: &str, to: &str, src: &Path, dst: &Path) -> Result<()> {
    let (s, d) = (lab.host(from)?, lab.host(to)?);
    std::fs::create_dir_all(dst)?;
    let mut recv = Command::new("ip")
        .args(["netns", "exec", &d.netns, "sh", "-c"])
        .arg(format!(
            "nc -l -s {} -p {COPY_PORT} | tar -x -f - -C '{}'",
            d.underlay_ip,
            dst.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nc at the destination (scripts/setup.sh installs netcat-openbsd)")?;
    // The sender retries until the listener is up (bounded: 3 s).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &s.netns, "sh", "-c"])
            .arg(format!(
                "tar -c -f - -C '{}' . | nc -N {} {COPY_PORT}",
                src.display(),
                d.underlay_ip
            ))
            .stdin(Stdio::null())
            .output()?;
        if out.status.success() {
            break;
        }
        if Instant::now() > deadline {
            let _ = recv.kill();
            let _ = recv.wait();
            bail!(
                "copying {} from {from} to {to} failed: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = recv.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "receiving {} on {to} failed ({}): {}",
            dst.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

async fn wait_echo(lab: &Lab, ip: std::net::Ipv4Addr, ready: Duration) -> Result<()> {
    let client = lab.host("client")?;
    let deadline = Instant::now() + ready;
    loop {
        let ok = Command::new("ip")
            .args(["netns", "exec", &client.netns, "timeout", "1", "bash", "-c"])
            .arg(format!(": </dev/tcp/{ip}/{ECHO_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the workload at {ip} does not answer on port {ECHO_PORT} from the client host \
                 within {} s",
                ready.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Serialize)]
struct DemoResult {
    ferry: FerrySide,
    baseline: Option<BaselineSide>,
}

#[derive(Serialize)]
struct FerrySide {
    probe: ProbeReport,
    migrations: Vec<Report>,
}

#[derive(Serialize)]
struct BaselineSide {
    probe: ProbeReport,
    steps: BaselineReport,
}

/// `ferry demo`.
pub async fn run(
    dir: &Path,
    exe: &Path,
    workload: &Path,
    json: bool,
    keep: bool,
    baseline: bool,
) -> Result<ExitCode> {
    crate::lab::down(dir)?;
    let lab = crate::lab::up(dir, 2, exe, workload, None, Default::default(), false).await?;
    let r = demo(&lab, exe, workload, json, baseline).await;
    if !keep {
        crate::lab::down(dir)?;
    }
    let result = r?;
    let ok = result.ferry.probe.intact
        && result
            .ferry
            .migrations
            .iter()
            .all(|m| m.outcome == Outcome::Completed);
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        let p = &result.ferry.probe;
        println!("\n== Ferry: echo container h1 -> h2 -> h1, client sending every {PROBE_INTERVAL_MS} ms ==");
        for m in &result.ferry.migrations {
            crate::ops::print_summary(m);
        }
        println!(
            "client: largest gap {:.1} ms, {} errors, {} of {} answers, every byte in order: {}, server counter {} -> {}",
            p.max_gap_ms, p.errors, p.received, p.sent, p.intact, p.counter_first, p.counter_last
        );
        if let Some(b) = &result.baseline {
            println!("\n== Baseline: the same move by hand (runc checkpoint, copy, netns, runc restore, fdb) ==");
            println!(
                "steps: checkpoint {:.1} ms, copy {:.1} ms, netns {:.1} ms, restore {:.1} ms, network {:.1} ms; total {:.1} ms",
                b.steps.checkpoint_ms, b.steps.copy_ms, b.steps.netns_ms, b.steps.restore_ms, b.steps.network_switch_ms, b.steps.total_ms
            );
            println!(
                "client: largest gap {:.1} ms, {} errors, {} of {} answers",
                b.probe.max_gap_ms, b.probe.errors, b.probe.received, b.probe.sent
            );
            if p.max_gap_ms > 0.0 {
                println!(
                    "\nFerry's largest gap is {:.2}x the baseline's ({:.1} ms vs {:.1} ms)",
                    p.max_gap_ms / b.probe.max_gap_ms,
                    p.max_gap_ms,
                    b.probe.max_gap_ms
                );
            }
        }
        println!(
            "\nmigration reports (JSON):\n{}",
            serde_json::to_string_pretty(&result.ferry.migrations)?
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn demo(
    lab: &Lab,
    exe: &Path,
    workload: &Path,
    json: bool,
    baseline: bool,
) -> Result<DemoResult> {
    let echo = start_echo(lab, "h1", "echo").await?;
    if !json {
        eprintln!(
            "demo: echo container on h1 at {}, client probing every {PROBE_INTERVAL_MS} ms",
            echo.spec.ip
        );
    }
    let probe = ProbeProcess::start(lab, exe, echo.spec.ip, "echo")?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut migrations = vec![];
    for (to, back) in [("h2", false), ("h1", true)] {
        if !json {
            eprintln!(
                "demo: migrating echo to {to}{}",
                if back { " (back)" } else { "" }
            );
        }
        let r = crate::ops::migrate(lab, "echo", &crate::ops::stop_copy_to(to), !json).await?;
        migrations.push(r);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let probe = probe.finish()?;
    let baseline = if baseline {
        if !json {
            eprintln!("demo: baseline: echo-base on h1, moved to h2 by hand");
        }
        let b = Baseline::start(
            lab,
            workload,
            "h1",
            "echo-base",
            echo_args(),
            Duration::from_secs(10),
        )
        .await?;
        let p = ProbeProcess::start(lab, exe, b.spec.ip, "base")?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let steps = b.migrate(lab, "h1", "h2");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let p = p.finish();
        b.remove(lab);
        Some(BaselineSide {
            probe: p?,
            steps: steps?,
        })
    } else {
        None
    };
    Ok(DemoResult {
        ferry: FerrySide { probe, migrations },
        baseline,
    })
}
