//! The bench's matrix: how a container is moved, what runs in it, and the scenarios a
//! [`BenchOpts`] asks for.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::demo::ECHO_PORT;
use crate::lab::LinkRate;

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
    pub(super) fn request(self, to: &str) -> ferry_api::MigrateRequest {
        let mut r = crate::ops::stop_copy_to(to);
        if self != Mode::StopCopy {
            r.mode = ferry_api::MigrateMode::PreCopy;
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
    pub(super) fn label(&self) -> String {
        match self {
            Workload::Echo => "echo".into(),
            Workload::Memory {
                size_mib,
                dirty_mib_s,
            } => format!("mem {} MiB, dirty {dirty_mib_s} MiB/s", size_mib),
            Workload::Processes { count } => format!("echo + {count} processes"),
        }
    }

    pub(super) fn slug(&self) -> String {
        match self {
            Workload::Echo => "echo".into(),
            Workload::Memory {
                size_mib,
                dirty_mib_s,
            } => format!("mem{size_mib}m-dirty{dirty_mib_s}"),
            Workload::Processes { count } => format!("procs{count}"),
        }
    }

    pub(super) fn args(&self) -> Vec<String> {
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
    pub(super) fn ready_within(&self) -> Duration {
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
pub(super) fn link_label(rate: Option<LinkRate>) -> String {
    rate.map(|r| r.to_string())
        .unwrap_or_else(|| "unshaped".into())
}

impl Scenario {
    pub(super) fn link_label(&self) -> String {
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
