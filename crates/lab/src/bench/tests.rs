use super::method::memory_verdict;
use super::*;
use crate::lab::LinkRate;

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
