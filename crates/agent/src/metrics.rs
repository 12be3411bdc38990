//! The agent's Prometheus metrics, served by `GET /v1/metrics` in the Prometheus text format
//! (version 0.0.4); docs/api.md, "Metrics", lists them.
//!
//! Migrations are counted on their source, once each, when the job ends
//! ([`Metrics::migration_ended`], from the job's final report). The gauges describe the host
//! as it is and are read at each scrape ([`Sample`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use migrate_core::{Outcome, Phase, Report};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::http::ApiFailure;
use super::{lock, Agent};

/// Upper bounds of the frozen-time buckets, seconds: 5 ms to 30 s.
const FROZEN_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
];

/// Upper bounds of the whole-migration buckets, seconds: 100 ms to 1 h.
const TOTAL_BUCKETS: [f64; 16] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0,
    3600.0,
];

/// Upper bounds of the rounds-per-migration buckets.
const ROUND_BUCKETS: [f64; 11] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0];

/// The values of `result`.
const RESULTS: [&str; 3] = ["completed", "rolled_back", "failed"];
/// The values of `mode`.
const MODES: [&str; 2] = ["stop-copy", "pre-copy"];
/// The values of `kind`.
const KINDS: [&str; 4] = ["memory", "rootfs", "images", "base"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Ended {
    result: &'static str,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Mode {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

type Histograms = Family<Mode, Histogram, fn() -> Histogram>;

/// The registry and a handle on each metric in it.
pub(crate) struct Metrics {
    registry: Registry,
    migrations: Family<Ended, Counter>,
    frozen: Histograms,
    total: Histograms,
    bytes: Family<Kind, Counter>,
    rounds: Counter,
    rounds_per_migration: Histogram,
    page_store_pages: Gauge,
    page_store_max_pages: Gauge,
    image_store_bytes: Gauge,
    image_store_chunks: Gauge,
    image_store_images: Gauge,
    jobs_in_flight: Gauge,
    containers: Gauge,
    /// Registered only when the agent uses etcd.
    cluster: Option<ClusterMetrics>,
}

/// The etcd side of a host's metrics (`etcd` configured).
struct ClusterMetrics {
    connected: Gauge,
    lease_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    lease_regrants: Gauge,
    watching: Gauge,
    watch_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    revision: Gauge,
    routes: Gauge,
    fdb_changes: Gauge,
    resyncs: Gauge,
    switch: Histogram,
}

/// What the etcd side says at one scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterSample {
    pub(crate) lease: ferry_cluster::store::LeaseState,
    pub(crate) routes: super::cluster::RouteStatus,
}

/// Upper bounds of the route-switch buckets, seconds: 1 ms to 10 s.
const SWITCH_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 10.0,
];

/// What the host's gauges say at one scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// Pages in the page store, and its capacity.
    pub(crate) pages: usize,
    pub(crate) max_pages: usize,
    /// The image store's chunk bytes, chunks and named images.
    pub(crate) store: shared_fs::store::Usage,
    /// Jobs of this host (as the source) that have not ended.
    pub(crate) jobs_in_flight: usize,
    /// Containers on this host.
    pub(crate) containers: usize,
    /// The etcd side, when the agent uses etcd.
    pub(crate) cluster: Option<ClusterSample>,
}

/// Bytes a migration sent, by kind (`ferry_migration_bytes_total`), derived from its report.
///
/// The report counts the bytes each phase put on the connection to the destination (frames,
/// headers, compressed content); a phase that failed counts none, although it may have sent
/// some before it failed. Each kind:
///
/// - `base`: the image's base layer (`report.base.bytes_sent`: its tree, chunk lists and the
///   chunks the destination lacked), sent in the prepare phase; 0 for a container without an
///   image or a destination that held the base.
/// - `rootfs`: the rest of the prepare phase: the first full copy of the container's own root
///   filesystem layer (with the prepare request itself, a few hundred bytes).
/// - `memory`: the pre-copy rounds (pages, the locations of pages the destination holds, and,
///   an approximation, each round's root filesystem diff, which the report does not tell
///   apart and which is small beside the pages), the pages the final dump relayed while
///   frozen (the dump phase) and those sent before the restore (lazy pages the rounds never
///   read, location lists: the restore phase); and the pages the final dump wrote into the
///   checkpoint images (CRIU's `pages-*.img`: every page of a stop-and-copy migration), sent
///   in the transfer phase among other files. Their part of the transfer's bytes is
///   `page_share` of it, their share of the raw bytes of the files the transfer sent: an
///   approximation, since zstd shrinks each file by its own ratio on the wire (zero pages
///   much more than CRIU's other images).
/// - `images`: the rest of the transfer phase: CRIU's other image files (processes, files,
///   sockets, memory maps) and the root filesystem's last diff, taken while frozen.
///
/// Not counted: the preflight request (a few hundred bytes) and answers from the destination.
pub(crate) fn bytes_by_kind(report: &Report, page_share: f64) -> [(&'static str, u64); 4] {
    let phase = |p: Phase| -> u64 {
        report
            .phases
            .iter()
            .filter(|t| t.phase == p)
            .map(|t| t.bytes)
            .sum()
    };
    let base = report.base.as_ref().map_or(0, |b| b.bytes_sent);
    let rootfs = phase(Phase::Prepare).saturating_sub(base);
    let transfer = phase(Phase::Transfer);
    let images_pages =
        ((transfer as f64 * page_share.clamp(0.0, 1.0)).round() as u64).min(transfer);
    let memory = phase(Phase::PreCopy) + phase(Phase::Dump) + phase(Phase::Restore) + images_pages;
    [
        ("memory", memory),
        ("rootfs", rootfs),
        ("images", transfer - images_pages),
        ("base", base),
    ]
}

/// How long the container was frozen, seconds, if it was: the report's `frozen_ms` for a
/// migration that committed; for one rolled back after its dump began (`frozen_ms` is 0
/// then), from the start of the dump to the end of the rollback, which thawed the container or
/// restored it from its images here.
fn frozen_seconds(report: &Report) -> Option<f64> {
    let dump = report.phases.iter().find(|p| p.phase == Phase::Dump)?;
    if report.committed && report.frozen_ms > 0.0 {
        return Some(report.frozen_ms / 1000.0);
    }
    let end = report
        .phases
        .iter()
        .map(|p| p.start_ms + p.duration_ms)
        .fold(dump.start_ms + dump.duration_ms, f64::max);
    Some((end - dump.start_ms).max(0.0) / 1000.0)
}

/// The `mode` label of a report (only the two modes there are: a label never takes an
/// unbounded set of values).
fn mode_of(report: &Report) -> &'static str {
    match report.mode.as_str() {
        "pre-copy" => "pre-copy",
        _ => "stop-copy",
    }
}

/// The `result` label: `failed` also stands for a job whose driver stopped before its state
/// machine ended (the report still says in progress).
fn result_of(report: &Report) -> &'static str {
    match report.outcome {
        Outcome::Completed => "completed",
        Outcome::RolledBack { .. } => "rolled_back",
        Outcome::Failed { .. } | Outcome::InProgress => "failed",
    }
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub(crate) fn new(with_cluster: bool) -> Self {
        let mut registry = Registry::default();
        let migrations = Family::<Ended, Counter>::default();
        registry.register(
            "ferry_migrations",
            "Migrations from this host that ended, by result and mode",
            migrations.clone(),
        );
        let frozen: Histograms =
            Family::new_with_constructor(|| Histogram::new(FROZEN_BUCKETS.iter().copied()));
        registry.register_with_unit(
            "ferry_migration_frozen",
            "How long migrations from this host kept the container frozen (those that froze it)",
            Unit::Seconds,
            frozen.clone(),
        );
        let total: Histograms =
            Family::new_with_constructor(|| Histogram::new(TOTAL_BUCKETS.iter().copied()));
        registry.register_with_unit(
            "ferry_migration_total",
            "How long migrations from this host took, start to end",
            Unit::Seconds,
            total.clone(),
        );
        let bytes = Family::<Kind, Counter>::default();
        registry.register_with_unit(
            "ferry_migration",
            "Bytes migrations from this host sent to their destinations, by kind",
            Unit::Bytes,
            bytes.clone(),
        );
        let rounds = Counter::default();
        registry.register(
            "ferry_precopy_rounds",
            "Pre-copy rounds run by migrations from this host",
            rounds.clone(),
        );
        let rounds_per_migration = Histogram::new(ROUND_BUCKETS.iter().copied());
        registry.register(
            "ferry_precopy_rounds_per_migration",
            "Pre-copy rounds of each pre-copy migration from this host that ended",
            rounds_per_migration.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let page_store_pages = gauge(
            &mut registry,
            "ferry_page_store_pages",
            "Memory pages the page store holds by content hash",
        );
        let page_store_max_pages = gauge(
            &mut registry,
            "ferry_page_store_max_pages",
            "Most pages the page store holds",
        );
        let image_store_bytes = Gauge::default();
        registry.register_with_unit(
            "ferry_image_store",
            "Bytes of the image store's chunks",
            Unit::Bytes,
            image_store_bytes.clone(),
        );
        let image_store_chunks = gauge(
            &mut registry,
            "ferry_image_store_chunks",
            "Chunks in the image store",
        );
        let image_store_images = gauge(
            &mut registry,
            "ferry_image_store_images",
            "Named images in the image store",
        );
        let jobs_in_flight = gauge(
            &mut registry,
            "ferry_jobs_in_flight",
            "Migration jobs of this host (as the source) that have not ended",
        );
        let containers = gauge(&mut registry, "ferry_containers", "Containers on this host");
        let cluster = with_cluster.then(|| {
            let lease_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            registry.register_with_unit(
                "ferry_etcd_lease_age",
                "Time since this host's lease was last renewed in etcd",
                Unit::Seconds,
                lease_age.clone(),
            );
            let watch_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            registry.register_with_unit(
                "ferry_etcd_watch_lag",
                "Time from the last route change's write in etcd to its programming here",
                Unit::Seconds,
                watch_lag.clone(),
            );
            let switch = Histogram::new(SWITCH_BUCKETS.iter().copied());
            registry.register_with_unit(
                "ferry_route_switch",
                "Network switches of migrations from this host: the etcd transaction until every live host programmed it",
                Unit::Seconds,
                switch.clone(),
            );
            ClusterMetrics {
                connected: gauge(
                    &mut registry,
                    "ferry_etcd_connected",
                    "1 when the last renewal of this host's lease reached etcd",
                ),
                lease_age,
                lease_regrants: gauge(
                    &mut registry,
                    "ferry_etcd_lease_regrants",
                    "Leases granted anew after this host's lapsed (it was cut off from etcd)",
                ),
                watching: gauge(
                    &mut registry,
                    "ferry_etcd_watching",
                    "1 when the watch of the routes in etcd is open",
                ),
                watch_lag,
                revision: gauge(
                    &mut registry,
                    "ferry_etcd_revision",
                    "The etcd revision this host's overlay FDB agrees with",
                ),
                routes: gauge(
                    &mut registry,
                    "ferry_overlay_routes",
                    "Routes (MACs) in etcd this host has programmed",
                ),
                fdb_changes: gauge(
                    &mut registry,
                    "ferry_overlay_fdb_changes",
                    "Changes made to this host's VXLAN FDB from etcd since the agent started",
                ),
                resyncs: gauge(
                    &mut registry,
                    "ferry_etcd_resyncs",
                    "Times the routes were listed again after the watch broke",
                ),
                switch,
            }
        });
        // Every series from the start, at 0: a rate over a series that appears with its first
        // event would miss that event.
        for mode in MODES {
            for result in RESULTS {
                migrations.get_or_create_owned(&Ended { result, mode });
            }
            frozen.get_or_create_owned(&Mode { mode });
            total.get_or_create_owned(&Mode { mode });
        }
        for kind in KINDS {
            bytes.get_or_create_owned(&Kind { kind });
        }
        Metrics {
            registry,
            migrations,
            frozen,
            total,
            bytes,
            rounds,
            rounds_per_migration,
            page_store_pages,
            page_store_max_pages,
            image_store_bytes,
            image_store_chunks,
            image_store_images,
            jobs_in_flight,
            containers,
            cluster,
        }
    }

    /// Counts a migration's network switch through etcd, seconds.
    pub(crate) fn observe_route_switch(&self, s: f64) {
        if let Some(c) = &self.cluster {
            c.switch.observe(s);
        }
    }

    /// Counts a migration from this host that ended, from its final report; `page_share`:
    /// the share of memory pages in the raw bytes of the files its transfer sent (see
    /// [`bytes_by_kind`]).
    pub(crate) fn migration_ended(&self, report: &Report, page_share: f64) {
        let mode = mode_of(report);
        self.migrations
            .get_or_create(&Ended {
                result: result_of(report),
                mode,
            })
            .inc();
        self.total
            .get_or_create(&Mode { mode })
            .observe(report.total_ms / 1000.0);
        if let Some(s) = frozen_seconds(report) {
            self.frozen.get_or_create(&Mode { mode }).observe(s);
        }
        for (kind, n) in bytes_by_kind(report, page_share) {
            self.bytes.get_or_create(&Kind { kind }).inc_by(n);
        }
        let rounds = report.rounds.len() as u64;
        self.rounds.inc_by(rounds);
        if mode == "pre-copy" {
            self.rounds_per_migration.observe(rounds as f64);
        }
    }

    /// The metrics in the Prometheus text format, the gauges set from `now`.
    pub(crate) fn encode(&self, now: &Sample) -> Result<String, std::fmt::Error> {
        self.page_store_pages.set(gauge_value(now.pages as u64));
        self.page_store_max_pages
            .set(gauge_value(now.max_pages as u64));
        self.image_store_bytes
            .set(gauge_value(now.store.chunk_bytes));
        self.image_store_chunks.set(gauge_value(now.store.chunks));
        self.image_store_images.set(gauge_value(now.store.images));
        self.jobs_in_flight
            .set(gauge_value(now.jobs_in_flight as u64));
        self.containers.set(gauge_value(now.containers as u64));
        if let (Some(m), Some(c)) = (&self.cluster, &now.cluster) {
            m.connected.set(i64::from(c.lease.connected));
            let age_ms = ferry_cluster::records::now_ms().saturating_sub(c.lease.renewed_ms);
            m.lease_age.set(age_ms as f64 / 1000.0);
            m.lease_regrants.set(gauge_value(c.lease.regranted));
            m.watching.set(i64::from(c.routes.watching));
            m.watch_lag.set(c.routes.last_lag_ms as f64 / 1000.0);
            m.revision.set(c.routes.revision);
            m.routes.set(gauge_value(c.routes.routes));
            m.fdb_changes.set(gauge_value(c.routes.changes));
            m.resyncs.set(gauge_value(c.routes.resyncs));
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Agent {
    /// The host's gauges now.
    async fn sample(self: &Arc<Self>) -> Result<Sample, ApiFailure> {
        let (pages, max_pages) = self.page_store_stats().await;
        let store = Arc::clone(&self.store);
        let usage = tokio::task::spawn_blocking(move || store.usage())
            .await
            .map_err(|e| ApiFailure::internal(e.to_string()))?
            .map_err(super::images::failure)?;
        let jobs_in_flight = lock(&self.jobs)
            .values()
            .filter(|j| !lock(&j.status).0.is_terminal())
            .count();
        Ok(Sample {
            pages,
            max_pages,
            store: usage,
            jobs_in_flight,
            containers: lock(&self.containers).len(),
            cluster: self.cluster().map(|c| ClusterSample {
                lease: c.reg.state(),
                routes: lock(&c.status).clone(),
            }),
        })
    }
}

/// `GET /v1/metrics`.
pub(crate) async fn serve(State(a): State<Arc<Agent>>) -> Result<Response, ApiFailure> {
    let now = a.sample().await?;
    let text = a
        .metrics
        .encode(&now)
        .map_err(|e| ApiFailure::internal(format!("encoding the metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests;
