//! Finished reports, made by driving `migrate_core::Migration`, counted and encoded.

use std::time::Duration;

use migrate_core::{Action, BaseReport, Event, Migration, PrecopyPolicy, Report, RoundStats};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Drives `m` to its end: every phase takes 10 ms and succeeds, sending `bytes(action)`,
/// except those `fail` picks; each pre-copy round sends 1 MiB and leaves fewer dirty pages
/// than the last.
fn drive(mut m: Migration, fail: Option<fn(&Action) -> bool>, bytes: fn(&Action) -> u64) -> Report {
    let mut now = Duration::ZERO;
    let mut actions = m.handle(Event::Start, now).unwrap();
    let mut dirty = 1_000_000;
    while let Some(action) = actions.pop() {
        if action == Action::Finish {
            break;
        }
        now += ms(10);
        let event = match &action {
            Action::CopyRound { .. } => {
                dirty /= 10;
                Event::RoundDone(RoundStats {
                    pages_sent: 256,
                    bytes_sent: 1 << 20,
                    dirty_pages: dirty,
                    duration: ms(10),
                    ..Default::default()
                })
            }
            a if fail.is_some_and(|f| f(a)) => Event::Failed {
                error: "injected".into(),
            },
            a => Event::Done { bytes: bytes(a) },
        };
        actions = m.handle(event, now).unwrap();
    }
    m.finalize()
}

fn stop_copy_bytes(a: &Action) -> u64 {
    match a {
        Action::Preflight => 100,
        Action::Prepare => 50_000,
        Action::Transfer => 300_000,
        _ => 0,
    }
}

fn with_base(mut m: Migration) -> Migration {
    m.set_base(BaseReport {
        image: "alpine".into(),
        tree: "t".into(),
        held: false,
        chunks: 4,
        chunks_sent: 2,
        chunk_bytes: 19_000,
        bytes_sent: 20_000,
        ms: 5.0,
    });
    m
}

/// The value of the sample `name{labels}` (labels as encoded, in order), or of `name` alone.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn finished_reports_are_counted_by_result_mode_and_kind() {
    let metrics = Metrics::new(false);
    let completed = drive(
        with_base(Migration::new("j1", "c", "h1", "h2")),
        None,
        stop_copy_bytes,
    );
    assert_eq!(completed.outcome, Outcome::Completed);
    // Frozen from the start of the dump (30 ms) to the end of the commit (70 ms).
    assert!((completed.frozen_ms - 40.0).abs() < 1e-6, "{completed:?}");
    metrics.migration_ended(&completed, 2.0 / 3.0);
    let second = drive(Migration::new("j2", "c", "h1", "h2"), None, stop_copy_bytes);
    metrics.migration_ended(&second, 2.0 / 3.0);
    // Rolled back after the dump: it was frozen until the end of the rollback.
    let rolled_back = drive(
        Migration::new("j3", "c", "h1", "h2"),
        Some(|a| matches!(a, Action::Transfer)),
        stop_copy_bytes,
    );
    assert!(matches!(rolled_back.outcome, Outcome::RolledBack { .. }));
    metrics.migration_ended(&rolled_back, 2.0 / 3.0);
    // Rolled back at the preflight: never frozen.
    let early = drive(
        Migration::new("j4", "c", "h1", "h2"),
        Some(|a| matches!(a, Action::Preflight)),
        stop_copy_bytes,
    );
    metrics.migration_ended(&early, 0.0);
    // A rollback that failed too.
    let failed = drive(
        Migration::new("j5", "c", "h1", "h2"),
        Some(|a| matches!(a, Action::Restore | Action::Rollback(_))),
        stop_copy_bytes,
    );
    assert!(
        matches!(failed.outcome, Outcome::Failed { .. }),
        "{failed:?}"
    );
    metrics.migration_ended(&failed, 0.0);
    let precopy = drive(
        Migration::new("j6", "c", "h1", "h2").with_precopy(PrecopyPolicy::default()),
        None,
        |a| match a {
            Action::Prepare => 10_000,
            Action::Dump => 4096,
            Action::Transfer => 30_000,
            _ => 0,
        },
    );
    assert_eq!(precopy.outcome, Outcome::Completed);
    let rounds = precopy.rounds.len();
    assert!(rounds >= 2, "{precopy:?}");
    metrics.migration_ended(&precopy, 0.0);

    let text = metrics.encode(&Sample::default()).unwrap();
    let count = |result: &str, mode: &str| {
        value(
            &text,
            &format!("ferry_migrations_total{{result=\"{result}\",mode=\"{mode}\"}}"),
        )
    };
    assert_eq!(count("completed", "stop-copy"), 2.0, "{text}");
    assert_eq!(count("rolled_back", "stop-copy"), 2.0);
    assert_eq!(count("failed", "stop-copy"), 1.0);
    assert_eq!(count("completed", "pre-copy"), 1.0);
    assert_eq!(count("rolled_back", "pre-copy"), 0.0);
    assert_eq!(count("failed", "pre-copy"), 0.0);

    // Every ended job has its whole duration; only those that froze the container a frozen
    // time (the two completed, the one rolled back after its dump, the failed one whose dump
    // ran).
    let stop = "mode=\"stop-copy\"";
    assert_eq!(
        value(
            &text,
            &format!("ferry_migration_total_seconds_count{{{stop}}}")
        ),
        5.0
    );
    assert_eq!(
        value(
            &text,
            &format!("ferry_migration_frozen_seconds_count{{{stop}}}")
        ),
        4.0
    );
    assert_eq!(
        value(
            &text,
            "ferry_migration_frozen_seconds_count{mode=\"pre-copy\"}"
        ),
        1.0
    );
    // The two completed froze 40 ms each (from the start of the dump at 30 ms to the end of
    // the commit); the rolled-back one from its dump to the end of its rollback (30 to 60
    // ms); the failed one from 30 to 70 ms.
    let sum = value(
        &text,
        &format!("ferry_migration_frozen_seconds_sum{{{stop}}}"),
    );
    assert!((sum - (0.04 + 0.04 + 0.03 + 0.04)).abs() < 1e-9, "{sum}");
    let bucket = |le: &str| {
        value(
            &text,
            &format!("ferry_migration_frozen_seconds_bucket{{{stop},le=\"{le}\"}}"),
        )
    };
    assert_eq!(bucket("0.025"), 0.0, "{text}");
    assert_eq!(bucket("0.05"), 4.0);
    assert_eq!(bucket("+Inf"), 4.0);

    // Bytes: the first completed job's base is 20 000 of its prepare's 50 000; two thirds of
    // each transfer that succeeded were memory pages in the images, except in the failed job
    // (none said); a phase that failed counts nothing.
    let kind = |k: &str| {
        value(
            &text,
            &format!("ferry_migration_bytes_total{{kind=\"{k}\"}}"),
        )
    };
    assert_eq!(kind("base"), 20_000.0);
    // Prepare: 30 000 + 50 000 + 50 000 (rolled back) + 50 000 (failed) + 10 000 (pre-copy).
    assert_eq!(kind("rootfs"), 190_000.0);
    // The transfers of the two completed stop-copy jobs (300 000 each, of which 200 000
    // memory), the failed job's (300 000, no memory said), the pre-copy's; the rolled-back
    // job's transfer failed.
    assert_eq!(kind("images"), 2.0 * 100_000.0 + 300_000.0 + 30_000.0);
    let precopy_memory = (rounds as f64) * f64::from(1 << 20) + 4096.0;
    assert_eq!(kind("memory"), 2.0 * 200_000.0 + precopy_memory);

    assert_eq!(value(&text, "ferry_precopy_rounds_total"), rounds as f64);
    assert_eq!(
        value(&text, "ferry_precopy_rounds_per_migration_count"),
        1.0
    );
}

#[test]
fn page_images_take_their_share_of_the_transfer() {
    let r = drive(Migration::new("j", "c", "h1", "h2"), None, |a| match a {
        Action::Transfer => 1000,
        _ => 0,
    });
    assert_eq!(
        bytes_by_kind(&r, 0.25),
        [("memory", 250), ("rootfs", 0), ("images", 750), ("base", 0)]
    );
    assert_eq!(
        bytes_by_kind(&r, 1.5)[..3],
        [("memory", 1000), ("rootfs", 0), ("images", 0)]
    );
    assert_eq!(bytes_by_kind(&r, f64::NAN)[0], ("memory", 0));
}

#[test]
fn gauges_are_those_of_the_sample() {
    let metrics = Metrics::new(false);
    let now = Sample {
        pages: 12,
        max_pages: 1 << 20,
        store: shared_fs::store::Usage {
            chunks: 7,
            chunk_bytes: 9000,
            trees: 2,
            images: 3,
        },
        jobs_in_flight: 1,
        containers: 4,
        cluster: None,
    };
    let text = metrics.encode(&now).unwrap();
    assert!(
        !text.contains("ferry_etcd"),
        "no etcd series without etcd:\n{text}"
    );
    for (series, v) in [
        ("ferry_page_store_pages", 12.0),
        ("ferry_page_store_max_pages", f64::from(1 << 20)),
        ("ferry_image_store_bytes", 9000.0),
        ("ferry_image_store_chunks", 7.0),
        ("ferry_image_store_images", 3.0),
        ("ferry_jobs_in_flight", 1.0),
        ("ferry_containers", 4.0),
    ] {
        assert_eq!(value(&text, series), v, "{series} in:\n{text}");
    }
    // The next scrape says what is then.
    let text = metrics.encode(&Sample::default()).unwrap();
    assert_eq!(value(&text, "ferry_jobs_in_flight"), 0.0);
    assert!(
        text.contains("# TYPE ferry_migrations_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE ferry_migration_frozen_seconds histogram"),
        "{text}"
    );
}

#[test]
fn etcd_gauges_are_those_of_the_sample() {
    let metrics = Metrics::new(true);
    metrics.observe_route_switch(0.004);
    let now = Sample {
        cluster: Some(super::ClusterSample {
            lease: ferry_cluster::store::LeaseState {
                lease: 99,
                connected: true,
                renewed_ms: ferry_cluster::records::now_ms(),
                regranted: 2,
            },
            routes: crate::cluster::RouteStatus {
                watching: true,
                revision: 41,
                routes: 5,
                changes: 9,
                resyncs: 1,
                last_lag_ms: 3,
            },
        }),
        ..Default::default()
    };
    let text = metrics.encode(&now).unwrap();
    for (series, v) in [
        ("ferry_etcd_connected", 1.0),
        ("ferry_etcd_lease_regrants", 2.0),
        ("ferry_etcd_watching", 1.0),
        ("ferry_etcd_watch_lag_seconds", 0.003),
        ("ferry_etcd_revision", 41.0),
        ("ferry_overlay_routes", 5.0),
        ("ferry_overlay_fdb_changes", 9.0),
        ("ferry_etcd_resyncs", 1.0),
        ("ferry_route_switch_seconds_count", 1.0),
    ] {
        assert_eq!(value(&text, series), v, "{series} in:\n{text}");
    }
    assert!(value(&text, "ferry_etcd_lease_age_seconds") < 5.0, "{text}");
}
