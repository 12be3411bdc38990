//! The agents' Prometheus metrics (`GET /v1/metrics`), end to end: a migration is counted once,
//! on its source, with its frozen time and its bytes; the gauges follow the host.

use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

/// `curl ARGS` against `host`'s API socket; returns its output (with what `-w` adds).
fn curl(host: &str, args: &[&str]) -> String {
    let sock = format!("{LAB_DIR}/{host}.sock");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--unix-socket", &sock])
        .args(args)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl {args:?} on {host} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `host`'s metrics, in the text format; checks the answer's status and content type.
fn scrape(host: &str) -> String {
    let out = curl(
        host,
        &[
            "-w",
            "\n%{http_code} %{content_type}",
            "http://agent/v1/metrics",
        ],
    );
    let (text, status) = out.rsplit_once('\n').expect("curl's -w line");
    assert_eq!(
        status, "200 text/plain; version=0.0.4; charset=utf-8",
        "{host}: {out}"
    );
    text.to_string()
}

/// The value of the sample `name` whose labels are exactly `labels` (in any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, mut got) = match series.split_once('{') {
            Some((n, rest)) => (
                n,
                rest.trim_end_matches('}')
                    .split(',')
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            ),
            None => (series, vec![]),
        };
        got.sort();
        if n == name && got == want {
            return value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }
    panic!("no sample {name} {labels:?} in:\n{text}");
}

const STOP: (&str, &str) = ("mode", "stop-copy");

fn migrations(text: &str, result: &str, mode: &str) -> f64 {
    sample(
        text,
        "ferry_migrations_total",
        &[("result", result), ("mode", mode)],
    )
}

fn bytes(text: &str, kind: &str) -> f64 {
    sample(text, "ferry_migration_bytes_total", &[("kind", kind)])
}

#[test]
fn a_migration_is_counted_once_on_its_source_with_its_frozen_time_and_bytes() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    let before = scrape("h1");
    let before_h2 = scrape("h2");
    assert_eq!(sample(&before, "ferry_containers", &[]), 1.0, "{before}");
    assert_eq!(sample(&before, "ferry_jobs_in_flight", &[]), 0.0);
    assert!(sample(&before, "ferry_page_store_max_pages", &[]) > 0.0);

    let (code, report) = migrate_json("echo", "h2", &[], Duration::from_secs(120));
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["result"], "completed", "{report}");
    assert_eq!(report["mode"], "stop-copy", "{report}");
    let after = scrape("h1");

    // One completed stop-and-copy migration, nothing else.
    for result in ["completed", "rolled_back", "failed"] {
        for mode in ["stop-copy", "pre-copy"] {
            let d = migrations(&after, result, mode) - migrations(&before, result, mode);
            let want = if (result, mode) == ("completed", "stop-copy") {
                1.0
            } else {
                0.0
            };
            assert_eq!(d, want, "ferry_migrations_total {result} {mode}:\n{after}");
        }
    }
    // Its whole duration and its frozen time, as the report says.
    let delta = |name: &str| sample(&after, name, &[STOP]) - sample(&before, name, &[STOP]);
    assert_eq!(delta("ferry_migration_total_seconds_count"), 1.0);
    assert_eq!(delta("ferry_migration_frozen_seconds_count"), 1.0);
    let frozen_s = report["frozen_ms"].as_f64().unwrap() / 1000.0;
    assert!(frozen_s > 0.0, "{report}");
    assert!(
        (delta("ferry_migration_frozen_seconds_sum") - frozen_s).abs() < 1e-6,
        "frozen sum went up by {} s, the report says {frozen_s} s",
        delta("ferry_migration_frozen_seconds_sum")
    );
    let total_s = report["total_ms"].as_f64().unwrap() / 1000.0;
    assert!((delta("ferry_migration_total_seconds_sum") - total_s).abs() < 1e-6);
    // Its bytes: the memory (in the checkpoint's page images), the other images, the root
    // filesystem; no base layer (the container has no image). Together at most what the
    // report says went over the network.
    for kind in ["memory", "images", "rootfs"] {
        assert!(
            bytes(&after, kind) > bytes(&before, kind),
            "ferry_migration_bytes_total {kind} did not grow:\n{after}"
        );
    }
    assert_eq!(bytes(&after, "base"), bytes(&before, "base"));
    let counted: f64 = ["memory", "images", "rootfs", "base"]
        .iter()
        .map(|k| {
            let d = bytes(&after, k) - bytes(&before, k);
            eprintln!("ferry_migration_bytes_total{{kind=\"{k}\"}} +{d}");
            d
        })
        .sum();
    let sent = report["bytes_sent"].as_f64().unwrap();
    assert!(
        counted <= sent && counted > sent * 0.9,
        "{counted} bytes counted, the report says {sent} were sent"
    );
    assert_eq!(
        sample(&after, "ferry_precopy_rounds_total", &[]),
        sample(&before, "ferry_precopy_rounds_total", &[])
    );
    // The gauges: nothing under way, the container gone from h1 and on h2.
    assert_eq!(sample(&after, "ferry_jobs_in_flight", &[]), 0.0, "{after}");
    assert_eq!(sample(&after, "ferry_containers", &[]), 0.0, "{after}");
    let after_h2 = scrape("h2");
    assert_eq!(
        sample(&after_h2, "ferry_containers", &[]),
        1.0,
        "{after_h2}"
    );
    assert_eq!(sample(&after_h2, "ferry_jobs_in_flight", &[]), 0.0);
    // Counted on the source only.
    assert_eq!(
        migrations(&after_h2, "completed", "stop-copy"),
        migrations(&before_h2, "completed", "stop-copy"),
        "the destination counted the migration too:\n{after_h2}"
    );

    // A wrong method answers in the API's error shape.
    let out = curl(
        "h1",
        &[
            "-X",
            "POST",
            "-w",
            "\n%{http_code}",
            "http://agent/v1/metrics",
        ],
    );
    let (body, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "405", "{out}");
    let err: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
    assert_eq!(err["code"], "method_not_allowed", "{err}");
    drop(lab);
}
