//! The machine-readable result of a migration.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::{ms, Decision, Estimate, FreezeReason, Phase, RollbackPlan};

/// How a migration's overlay switch went (see [`Report::route_switch`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RouteSwitch {
    /// `etcd` (one fenced transaction, hosts follow their watch) or `direct` (the source
    /// tells every host).
    pub via: String,
    /// How long it took, ms.
    pub ms: f64,
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Still running.
    InProgress,
    /// The container runs at the destination.
    Completed,
    /// The migration was undone; the container runs on the source.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// The rollback failed too.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The duration and traffic of one phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PhaseTiming {
    /// Which phase.
    pub phase: Phase,
    /// Start, milliseconds after the migration started.
    pub start_ms: f64,
    /// Duration in milliseconds.
    pub duration_ms: f64,
    /// Bytes sent over the network during the phase.
    pub bytes: u64,
}

/// One pre-copy round, as the report lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RoundReport {
    /// Round number, from 1.
    pub round: u32,
    /// Pages sent (as content or as references).
    pub pages_sent: u64,
    /// Bytes on the network.
    pub bytes_sent: u64,
    /// Pages dirty at the end of the round.
    pub dirty_pages: u64,
    /// Duration, ms.
    pub duration_ms: f64,
    /// Part of the duration spent waiting for the container to write pages it had not written
    /// yet (a first round that follows writes), ms.
    #[serde(default)]
    pub waited_ms: f64,
    /// CPU throttle in force during the round, percent.
    pub throttle_pct: u32,
    /// The policy's estimate after the round.
    pub estimate: Estimate,
    /// What the policy decided.
    pub decision: Decision,
}

/// The report of one migration; `ferry migrate --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Report {
    /// Job id.
    pub id: String,
    /// Container name.
    pub container: String,
    /// Source host.
    pub from: String,
    /// Destination host.
    pub to: String,
    /// `stop-copy` or `pre-copy`.
    #[serde(default = "stop_copy")]
    pub mode: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// True once the destination confirmed the restore.
    pub committed: bool,
    /// Every phase that ran, in order.
    pub phases: Vec<PhaseTiming>,
    /// Freeze to dump complete (CRIU dump), ms.
    pub freeze_to_dump_ms: f64,
    /// Images and final diff sent, ms.
    pub transfer_ms: f64,
    /// Restore at the destination, ms.
    pub restore_ms: f64,
    /// Overlay redirect plus release and announcement at the destination, ms.
    pub network_switch_ms: f64,
    /// From the freeze until the destination released the container's packets, ms.
    pub frozen_ms: f64,
    /// Whole migration, ms.
    pub total_ms: f64,
    /// Bytes sent over the network, all phases.
    pub bytes_sent: u64,
    /// Problems that did not stop the migration (after the commit point, or a check the
    /// request chose to ignore).
    pub warnings: Vec<String>,
    /// What the rollback undid, if one ran.
    pub rollback: Option<RollbackPlan>,
    /// Pre-copy rounds, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<RoundReport>,
    /// How pre-copy found the pages written between rounds (`uffd-wp`, `soft-dirty`,
    /// `page-hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_tracking: Option<String>,
    /// How each process's writes were followed (pre-copy): processes per method, and each
    /// process the main method could not follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<TrackingReport>,
    /// Why pre-copy stopped and the container was frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_stop: Option<FreezeReason>,
    /// Wall-clock time of the start, ms since the Unix epoch (0 when the driver did not set it),
    /// so a harness can line the phases up with what a client observed.
    #[serde(default)]
    pub started_unix_ms: f64,
    /// Digest of the container's root filesystem as it was while frozen (every entry's path,
    /// kind, mode, owner, mtime, size and extended attributes), which the destination's copy
    /// matched before the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_digest: Option<String>,
    /// Pre-copy: how memory crossed the freeze (lazy restore or not) and how it was filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    /// Request round trips between source and destination while the container was frozen
    /// (each waits for the other host's answer: one network round trip).
    #[serde(default)]
    pub frozen_round_trips: u32,
    /// From the start of the transfer phase until the destination answered that every image
    /// is written, ms. The transfer phase itself ends once the images are sent: the restore
    /// request follows at once, without waiting for this answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_delivered_ms: Option<f64>,
    /// The overlay's switch to the destination, inside the redirect phase: from its start
    /// until every host delivers the container's MAC there (told directly, or through etcd's
    /// transaction and each host's watch), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_switch: Option<RouteSwitch>,
    /// The container's image: whether the destination held its base layer, and what crossed
    /// if not (absent for a container without an image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseReport>,
    #[serde(skip)]
    pub(crate) started_at: Duration,
}

/// How the base layer of a container's image reached the destination (before the freeze,
/// while the container ran).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct BaseReport {
    /// The image's name at the source.
    pub image: String,
    /// Its tree.
    pub tree: String,
    /// Whether the destination held every chunk already (nothing crossed but the question).
    pub held: bool,
    /// Chunks the tree uses.
    pub chunks: u64,
    /// Chunks the destination lacked and received.
    pub chunks_sent: u64,
    /// Bytes of those chunks.
    pub chunk_bytes: u64,
    /// Bytes sent for the base layer in all (tree, lists, chunks, framing).
    pub bytes_sent: u64,
    /// From the question to the destination's answer that it stored the tree, ms.
    pub ms: f64,
}

/// How a pre-copy migration's memory crossed the freeze.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MemoryReport {
    /// `lazy`: the destination restored with CRIU's lazy pages and filled the memory in from
    /// its own page store; `eager`: the final dump carried every page.
    pub restore: String,
    /// Why the restore was not lazy (policy, or what the destination lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_lazy: Option<String>,
    /// Pages written since the last round, sent while frozen.
    pub final_dirty_pages: u64,
    /// Pages the dump wrote itself (memory that cannot be restored lazily: the page under
    /// each thread's stack pointer, shared, locked, file-backed or huge-page memory).
    pub eager_pages: u64,
    /// Pages restored lazily.
    pub lazy_pages: u64,
    /// Lazy pages the destination had no location for (memory the rounds never read), sent
    /// while frozen.
    pub unplaced_pages: u64,
    /// Lazy pages the dump itself changed after the tracking ended (each thread's rseq area,
    /// which the kernel writes while CRIU's parasite runs in the thread), read again after
    /// the dump and sent while frozen.
    #[serde(default)]
    pub reread_pages: u64,
    /// Post-copy: lazy pages left at the source at the freeze, which the destination fetched
    /// from the frozen copy while the container ran.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub remote_pages: u64,
    /// Post-copy: pages the destination fetched from the source, and how many of them a
    /// fault of the container asked for (the rest the background fill did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_pages: Option<u64>,
    /// See [`MemoryReport::fetched_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_on_fault: Option<u64>,
    /// Pages the fault hook `hide_dirty_page` left out of the final dump (tests only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hidden_pages: u64,
    /// Request round trips between source and destination while frozen (streams sent at once
    /// count once), lazy restore only.
    #[serde(default)]
    pub frozen_round_trips: u32,
    /// Lazy pages the destination's daemon copied in after the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_pages: Option<u64>,
    /// From the end of the restore to the last page, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_ms: Option<f64>,
    /// The fill's throughput, MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_mib_s: Option<f64>,
    /// Why the fill failed (the destination then stops the container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_error: Option<String>,
    /// The proof that every lazy page arrived: the source hashed its frozen copy and the
    /// destination compared it with what it restores (lazy restore only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<IntegrityReport>,
}

/// How pre-copy followed the writes of the container's processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TrackingReport {
    /// Processes tracked by each method (`uffd-wp`, `page-hash`, ...), including processes
    /// that exited before the freeze.
    pub processes: std::collections::BTreeMap<String, u64>,
    /// The processes tracked by page hashing because the main method could not attach to
    /// them, with why (the first 32: [`TrackingReport::MAX_FALLBACKS`]).
    pub fallbacks: Vec<TrackingFallback>,
    /// Fallbacks beyond those listed.
    #[serde(default)]
    pub fallbacks_not_listed: u64,
}

impl TrackingReport {
    /// How many fallbacks are listed one by one.
    pub const MAX_FALLBACKS: usize = 32;

    /// Records that `method` tracks a process.
    pub fn tracked(&mut self, method: &str) {
        *self.processes.entry(method.to_string()).or_default() += 1;
    }

    /// Records a process tracked by page hashing instead, and why.
    pub fn fell_back(&mut self, fallback: TrackingFallback) {
        if self.fallbacks.len() < Self::MAX_FALLBACKS {
            self.fallbacks.push(fallback);
        } else {
            self.fallbacks_not_listed += 1;
        }
    }
}

/// A process the main tracking method could not follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TrackingFallback {
    /// Its process id.
    pub pid: i32,
    /// Its name (`/proc/PID/comm`) when tracking began.
    pub command: String,
    /// The method it is tracked by instead.
    pub method: String,
    /// Why the main method could not attach.
    pub reason: String,
}

/// What the integrity check of a lazy restore found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IntegrityReport {
    /// Lazy pages of the frozen copy compared with the destination's.
    pub pages_checked: u64,
    /// Pages whose contents differed (a write the dirty tracking missed, or damage).
    pub mismatches: u64,
    /// Mismatched pages replaced by the frozen copy's before the container used them.
    pub corrected: u64,
    /// Why the check did not cover every lazy page (the check then proves nothing about the
    /// rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

impl IntegrityReport {
    /// What a user must hear about this check, if anything.
    pub fn warning(&self) -> Option<String> {
        let stale = self.mismatches.saturating_sub(self.corrected);
        let mut parts = vec![];
        if self.mismatches > 0 {
            parts.push(format!(
                "integrity: {} of {} lazy pages differed from the source's frozen copy; {} corrected before use{}",
                self.mismatches,
                self.pages_checked,
                self.corrected,
                if stale > 0 {
                    format!(", {stale} were already in use at the destination: the container may have read stale memory")
                } else {
                    String::new()
                }
            ));
        }
        if let Some(why) = &self.incomplete {
            parts.push(format!("integrity check incomplete: {why}"));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn stop_copy() -> String {
    "stop-copy".into()
}

impl Report {
    pub(crate) fn new(id: &str, container: &str, from: &str, to: &str) -> Self {
        Report {
            id: id.into(),
            container: container.into(),
            from: from.into(),
            to: to.into(),
            mode: stop_copy(),
            outcome: Outcome::InProgress,
            committed: false,
            phases: vec![],
            freeze_to_dump_ms: 0.0,
            transfer_ms: 0.0,
            restore_ms: 0.0,
            network_switch_ms: 0.0,
            frozen_ms: 0.0,
            total_ms: 0.0,
            bytes_sent: 0,
            warnings: vec![],
            rollback: None,
            rounds: vec![],
            dirty_tracking: None,
            tracking: None,
            precopy_stop: None,
            started_unix_ms: 0.0,
            rootfs_digest: None,
            memory: None,
            frozen_round_trips: 0,
            images_delivered_ms: None,
            route_switch: None,
            base: None,
            started_at: Duration::ZERO,
        }
    }

    pub(crate) fn record(&mut self, phase: Phase, start: Duration, end: Duration, bytes: u64) {
        let d = ms(end.saturating_sub(start));
        self.phases.push(PhaseTiming {
            phase,
            start_ms: ms(start.saturating_sub(self.started_at)),
            duration_ms: d,
            bytes,
        });
        self.bytes_sent += bytes;
        match phase {
            Phase::Dump => self.freeze_to_dump_ms += d,
            Phase::Transfer => self.transfer_ms += d,
            Phase::Restore => self.restore_ms += d,
            Phase::Redirect | Phase::Commit => self.network_switch_ms += d,
            _ => {}
        }
    }

    /// Duration of a phase, ms, if it ran.
    pub fn phase_ms(&self, phase: Phase) -> Option<f64> {
        self.phases
            .iter()
            .filter(|p| p.phase == phase)
            .map(|p| p.duration_ms)
            .reduce(|a, b| a + b)
    }
}
