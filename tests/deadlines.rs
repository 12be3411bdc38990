//! End-to-end: every phase before the commit is bounded in time and can be cancelled; either
//! way the migration rolls back and the container runs on at the source, thawed, with its
//! memory. Real runc, CRIU, QUIC.

use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// The counter of the echo workload at `ip`.
fn counter(ip: &str, tag: &str) -> u64 {
    let answer = ask_workload(ip, tag);
    answer
        .split_once(' ')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {answer:?}"))
}

fn phase_ms(r: &Value, phase: &str) -> f64 {
    r["phases"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["phase"] == phase))
        .and_then(|p| p["duration_ms"].as_f64())
        .unwrap_or_else(|| panic!("no {phase} phase in {r}"))
}

fn assert_rolled_back_to_h1(lab: &Lab, r: &Value, name: &str, why: &str) {
    assert_eq!(r["result"], "rolled_back", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "reason should say {why:?}: {reason}");
    assert_runs_on(lab, "h1", name);
    let clean = eventually(Duration::from_secs(20), || {
        netns_with_prefix(&format!("ferry-h2-c-{name}")).is_empty()
            && dir_entries(&format!("{LAB_DIR}/h2/incoming")).is_empty()
    });
    assert!(clean, "h2 still holds parts of {name}");
    assert_clean_host("h2", name);
}

#[test]
fn a_dump_that_hangs_on_a_stopped_process_rolls_back_within_its_deadline() {
    let lab = Lab::up();
    // A stopped process: CRIU's dump never completes on it.
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "stp",
        "--",
        "/bin/sh",
        "-c",
        "sleep 1000 & kill -STOP $!; exec /bin/ferry-workload echo --port 7000",
    ]);
    let ip = lab.container("stp").expect("stp")["ip"]
        .as_str()
        .expect("ip")
        .to_string();
    wait_port(&ip);
    let before = counter(&ip, "before");
    let (code, r) = migrate_json(
        "stp",
        "h2",
        &["--dump-deadline-s", "5"],
        Duration::from_secs(60),
    );
    assert_eq!(code, 2, "{r}");
    assert_rolled_back_to_h1(&lab, &r, "stp", "dump deadline");
    let dump = phase_ms(&r, "dump");
    assert!(
        (5000.0..9000.0).contains(&dump),
        "the dump ended at its deadline (5 s), not {dump} ms later"
    );
    assert_eq!(counter(&ip, "after"), before + 1, "thawed, with its memory");
}

#[test]
fn a_restore_that_hangs_rolls_back_within_its_deadline() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let before = counter(&ip, "before");
    let (code, r) = migrate_json(
        "echo",
        "h2",
        &[
            "--pause-in-restore-ms",
            "60000",
            "--restore-deadline-s",
            "3",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, 2, "{r}");
    assert_rolled_back_to_h1(&lab, &r, "echo", "restore deadline");
    let restore = phase_ms(&r, "restore");
    assert!(
        (3000.0..7000.0).contains(&restore),
        "the restore ended at its deadline (3 s), not {restore} ms later"
    );
    assert_eq!(counter(&ip, "after"), before + 1, "thawed, with its memory");
}

#[test]
fn cancel_interrupts_every_phase_before_the_commit() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let mut last = counter(&ip, "start");
    // (phase, what holds the migration there for 20 s, the job state meanwhile)
    let cases: [(&str, &[&str], &str); 6] = [
        (
            "preflight",
            &[
                "--pause-in-phase",
                "preflight",
                "--pause-in-phase-ms",
                "20000",
            ],
            "preflight",
        ),
        (
            "prepare",
            &[
                "--pause-in-phase",
                "prepare",
                "--pause-in-phase-ms",
                "20000",
            ],
            "preparing",
        ),
        (
            "a pre-copy round",
            &[
                "--pre-copy",
                "--pause-in-phase",
                "pre_copy",
                "--pause-in-phase-ms",
                "20000",
            ],
            "pre_copying",
        ),
        ("the dump", &["--pause-in-dump-ms", "20000"], "dumping"),
        (
            "the transfer",
            &["--pause-in-transfer-ms", "20000"],
            "transferring",
        ),
        (
            "the restore",
            &["--pause-in-restore-ms", "20000"],
            "restoring",
        ),
    ];
    for (what, hook, state) in cases {
        let (_, job) = start_migration("echo", "h2", hook);
        wait_job_state(&job, state);
        ferry_ok(&["cancel", &job]);
        let r = wait_job(&job);
        assert_eq!(r["result"], "rolled_back", "cancel in {what}: {r}");
        let total = r["total_ms"].as_f64().unwrap_or(f64::MAX);
        assert!(
            total < 15_000.0,
            "cancel in {what} did not interrupt the 20 s pause: {total} ms"
        );
        assert_rolled_back_to_h1(&lab, &r, "echo", "cancel");
        let now = counter(&ip, what.split(' ').next_back().unwrap_or("x"));
        assert_eq!(now, last + 1, "after a cancel in {what}: the same process");
        last = now;
    }
}
