//! Containers of many processes and threads, and processes the main dirty-page tracking cannot
//! follow, moved with pre-copy: every page of every process checked after each move.

use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// `key=value` of a swarm answer, as a number.
fn value(answer: &str, key: &str) -> u64 {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {answer:?}"))
}

/// Asks the swarm to check every page of every worker; returns (processes, pages, threads).
fn verify(ip: &str, when: &str) -> (u64, u64, u64) {
    let v = ask_workload(ip, "verify");
    assert!(v.starts_with("ok "), "{when}: {v}");
    (
        value(&v, "processes"),
        value(&v, "pages"),
        value(&v, "threads"),
    )
}

fn run_swarm(lab: &Lab, name: &str, args: &[&str]) -> String {
    let mut cmd = vec![
        "run",
        "--on",
        "h1",
        "--name",
        name,
        "--",
        "/bin/ferry-workload",
        "swarm",
    ];
    cmd.extend_from_slice(args);
    cmd.extend_from_slice(&["--port", "7000"]);
    ferry_ok(&cmd);
    let ip = lab.container(name).expect("listed")["ip"]
        .as_str()
        .unwrap()
        .to_string();
    wait_port(&ip);
    ip
}

fn moved(r: &Value, what: &str) {
    assert_eq!(r["result"], "completed", "{what}: {r}");
}

#[test]
fn a_process_the_main_tracking_cannot_follow_is_tracked_by_hashes_and_moves_intact() {
    let lab = Lab::up();
    // 6 processes (5 workers of 8 MiB) writing 4 MiB/s in all. No process or thread comes
    // and goes meanwhile (churn every 10 minutes): a process caught in `exec` can fall back to
    // page hashes by itself, and this test counts the fallbacks it asks for.
    let ip = run_swarm(
        &lab,
        "fallback",
        &[
            "--processes",
            "6",
            "--threads",
            "4",
            "--size-mib",
            "8",
            "--dirty-mib-s",
            "4",
            "--churn-ms",
            "600000",
        ],
    );
    let before = verify(&ip, "before");
    assert_eq!(before.0, 6);
    // Stop-and-copy first: the processes the next moves track are restored ones.
    let (code, r) = migrate_json("fallback", "h2", &[], Duration::from_secs(120));
    assert_eq!(code, 0, "{r}");
    moved(&r, "stop-and-copy");
    assert_eq!(verify(&ip, "after stop-and-copy").1, before.1);

    // Pre-copy with the main method refusing two processes: they are tracked by page hashes,
    // and the report says which and why.
    let (code, r) = migrate_json(
        "fallback",
        "h1",
        &["--pre-copy", "--refuse-tracking", "2"],
        Duration::from_secs(120),
    );
    assert_eq!(code, 0, "{r}");
    moved(&r, "pre-copy with fallbacks");
    let t = &r["tracking"];
    assert_eq!(t["processes"]["page-hash"], 2, "{t}");
    assert!(t["processes"]["uffd-wp"].as_u64().unwrap() >= 4, "{t}");
    let fallbacks = t["fallbacks"].as_array().unwrap();
    assert_eq!(fallbacks.len(), 2, "{t}");
    for f in fallbacks {
        assert_eq!(f["method"], "page-hash", "{f}");
        assert!(f["pid"].as_i64().unwrap() > 0, "{f}");
        assert!(!f["command"].as_str().unwrap().is_empty(), "{f}");
        assert!(
            f["reason"].as_str().unwrap().contains("refuse_tracking"),
            "{f}"
        );
    }
    assert_eq!(verify(&ip, "after pre-copy with fallbacks").1, before.1);

    // Once more with pre-copy, every process tracked by the main method.
    let (code, r) = migrate_json("fallback", "h2", &["--pre-copy"], Duration::from_secs(120));
    assert_eq!(code, 0, "{r}");
    moved(&r, "second pre-copy");
    assert_eq!(
        r["tracking"]["fallbacks"].as_array().map(Vec::len),
        Some(0),
        "{r}"
    );
    assert_eq!(r["tracking"]["processes"].get("page-hash"), None, "{r}");
    assert_eq!(verify(&ip, "after the second pre-copy").1, before.1);
    ferry_ok(&["rm", "fallback"]);
}

#[test]
fn fifty_processes_and_five_hundred_threads_that_come_and_go_move_with_pre_copy() {
    let lab = Lab::up();
    // 50 processes (49 workers of 2 MiB with 10 threads each), a short-lived process started
    // every 50 ms and a short-lived thread in every worker every 50 ms, 8 MiB/s written in all,
    // and two zombies.
    let ip = run_swarm(
        &lab,
        "swarm",
        &[
            "--processes",
            "50",
            "--threads",
            "10",
            "--size-mib",
            "2",
            "--dirty-mib-s",
            "8",
            "--churn-ms",
            "50",
            "--zombies",
            "2",
        ],
    );
    let (processes, pages, threads) = verify(&ip, "before");
    assert_eq!(processes, 50);
    assert_eq!(pages, 49 * 512);
    assert!(threads >= 49 * 10, "{threads} threads");
    let status = ask_workload(&ip, "status");
    let blips_before = value(&status, "blips");

    for (to, mode) in [("h2", "--pre-copy"), ("h1", "--pre-copy")] {
        let (code, r) = migrate_json("swarm", to, &[mode], Duration::from_secs(300));
        assert_eq!(code, 0, "{r}");
        moved(&r, "pre-copy");
        let tracked: u64 = r["tracking"]["processes"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(tracked >= 50, "every process tracked: {r}");
        let (p, pg, th) = verify(&ip, &format!("after the move to {to}"));
        assert_eq!((p, pg), (50, 49 * 512));
        assert!(th >= 49 * 10, "{th} threads after the move to {to}");
        println!(
            "swarm to {to}: frozen {:.0} ms, total {:.0} ms, {} bytes, {} rounds, tracking {}",
            r["frozen_ms"].as_f64().unwrap(),
            r["total_ms"].as_f64().unwrap(),
            r["bytes_sent"],
            r["rounds"].as_array().map(Vec::len).unwrap_or(0),
            r["tracking"]
        );
    }
    // Processes still come and go after the moves.
    let blips_after = value(&ask_workload(&ip, "status"), "blips");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        value(&ask_workload(&ip, "status"), "blips") > blips_after.max(blips_before),
        "short-lived processes are still started"
    );
    ferry_ok(&["rm", "swarm"]);
}
