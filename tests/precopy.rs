//! End-to-end pre-copy: memory rounds while the container runs (userfaultfd write-protect),
//! then a short freeze. Real runc, CRIU, namespaces, QUIC; root required.

use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// Pages the workload rewrote since it started (`status`'s `dirtied_pages`).
fn dirtied_pages(ip: &str) -> u64 {
    let s = ask_workload(ip, "status");
    s.split_whitespace()
        .find_map(|w| w.strip_prefix("dirtied_pages="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dirtied_pages in {s:?}"))
}

fn rounds(r: &Value) -> &Vec<Value> {
    r["rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no rounds in the report: {r}"))
}

fn print_rounds(label: &str, r: &Value) {
    eprintln!(
        "{label}: result {} stop {} bytes_sent {} frozen_ms {:.1} total_ms {:.1}",
        r["result"], r["precopy_stop"], r["bytes_sent"], r["frozen_ms"], r["total_ms"]
    );
    eprintln!("  round  pages_sent   bytes_sent  dirty_pages  duration_ms  throttle  dirty_pages_s  expected_ms  decision");
    for x in r["rounds"].as_array().into_iter().flatten() {
        let e = &x["estimate"];
        eprintln!(
            "  {:>5}  {:>10}  {:>11}  {:>11}  {:>11.0}  {:>7}%  {:>13.0}  {:>11.0}  {}",
            x["round"].as_u64().unwrap_or(0),
            x["pages_sent"].as_u64().unwrap_or(0),
            x["bytes_sent"].as_u64().unwrap_or(0),
            x["dirty_pages"].as_u64().unwrap_or(0),
            x["duration_ms"].as_f64().unwrap_or(0.0),
            x["throttle_pct"].as_u64().unwrap_or(0),
            e["dirty_pages_s"].as_f64().unwrap_or(0.0),
            e["expected_downtime_ms"].as_f64().unwrap_or(0.0),
            x["decision"]
        );
    }
    let phases: Vec<String> = r["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {:.0} ms {} B",
                p["phase"].as_str().unwrap_or("?"),
                p["duration_ms"].as_f64().unwrap_or(0.0),
                p["bytes"]
            )
        })
        .collect();
    eprintln!("  phases: {}", phases.join(", "));
}

/// What every completed pre-copy migration report shows.
fn assert_precopy_completed(r: &Value, code: i32) {
    assert_eq!(code, 0, "a completed migration exits with 0: {r}");
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(r["committed"], true, "{r}");
    assert_eq!(r["mode"], "pre-copy", "{r}");
    assert_eq!(r["dirty_tracking"], "uffd-wp", "{r}");
    let rs = rounds(r);
    assert!(!rs.is_empty(), "at least one round: {r}");
    for (i, x) in rs.iter().enumerate() {
        assert_eq!(x["round"], i as u64 + 1, "rounds numbered from 1: {r}");
    }
    let last = &rs[rs.len() - 1]["decision"];
    assert_eq!(last["decision"], "freeze", "the last round froze: {r}");
    for x in &rs[..rs.len() - 1] {
        assert_eq!(
            x["decision"]["decision"], "another-round",
            "only the last round froze: {r}"
        );
    }
    let stop = r["precopy_stop"].as_str().unwrap_or("");
    assert!(
        ["converged", "round-limit", "not-converging"].contains(&stop),
        "precopy_stop: {r}"
    );
    assert_eq!(last["reason"], stop, "the report says why it froze: {r}");
    let frozen = r["frozen_ms"].as_f64().unwrap_or(0.0);
    assert!(
        frozen > 0.0 && frozen < r["total_ms"].as_f64().unwrap(),
        "{r}"
    );
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert_eq!(
        phases.iter().filter(|p| **p == "pre_copy").count(),
        rs.len(),
        "one pre_copy phase per round: {phases:?}"
    );
    assert!(phases.contains(&"dump"), "{phases:?}");
}

#[test]
fn pre_copy_moves_a_busy_container_with_its_memory_intact() {
    let lab = Lab::up();
    let before = lab.run_mem("h1", "mem", 256, 20);
    let ip = before["ip"].as_str().unwrap().to_string();
    assert_memory_intact(&ip, 256, "fresh workload");
    let probe = Probe::start(&ip, "precopy");

    let (code, r) = migrate_json("mem", "h2", &["--pre-copy"], Duration::from_secs(180));
    print_rounds("h1 -> h2, 256 MiB dirtying 20 MiB/s", &r);
    assert_precopy_completed(&r, code);
    // The first round copies all the workload's memory while it runs.
    let first = rounds(&r)[0]["pages_sent"].as_u64().unwrap();
    assert!(
        first as f64 >= 0.9 * (256 * MIB / PAGE) as f64,
        "round 1 sent only {first} pages: {r}"
    );

    let c = lab.container("mem").expect("listed");
    assert_eq!(c["host"], "h2", "{c}");
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["ip"], before["ip"], "IP unchanged");
    assert_clean_host("h1", "mem");

    std::thread::sleep(Duration::from_millis(1000));
    let p = probe.finish();
    eprintln!(
        "probe: sent {} max gap {:.1} ms",
        p["sent"],
        p["max_gap_ms"].as_f64().unwrap_or(0.0)
    );
    assert_probe_intact(&p);
    assert_eq!(p["memory_intact"], true, "{p}");
    assert_eq!(p["counter_first"], 1, "{p}");
    assert_eq!(p["counter_last"], p["received"], "{p}");
    // Every page, written before, between and during the rounds, arrived in its last version.
    assert_memory_intact(&ip, 256, "on h2");
}

#[test]
fn a_container_coming_back_sends_little() {
    let lab = Lab::up();
    let c = lab.run_mem("h1", "mem", 256, 1);
    let ip = c["ip"].as_str().unwrap().to_string();
    let limit = Duration::from_secs(180);

    let (code, there) = migrate_json("mem", "h2", &["--pre-copy"], limit);
    print_rounds("h1 -> h2", &there);
    assert_precopy_completed(&there, code);
    assert_memory_intact(&ip, 256, "on h2");
    assert_eq!(lab.container("mem").unwrap()["host"], "h2");

    let (code, back) = migrate_json("mem", "h1", &["--pre-copy"], limit);
    print_rounds("h2 -> h1", &back);
    assert_precopy_completed(&back, code);
    assert_memory_intact(&ip, 256, "back on h1");
    assert_eq!(lab.container("mem").unwrap()["host"], "h1");
    assert_clean_host("h2", "mem");

    let out = there["bytes_sent"].as_u64().unwrap();
    let home = back["bytes_sent"].as_u64().unwrap();
    eprintln!(
        "bytes sent: h1 -> h2 {out} ({:.1} MiB), h2 -> h1 {home} ({:.1} MiB, {:.1} % of 256 MiB)",
        out as f64 / MIB as f64,
        home as f64 / MIB as f64,
        100.0 * home as f64 / (256 * MIB) as f64
    );
    // The first move had nothing to reuse: the memory crossed in full.
    assert!(out as f64 >= 0.9 * (256 * MIB) as f64, "{there}");
    // Coming back, h1 still holds almost every page: they cross as references.
    assert!(
        home as f64 <= 0.1 * (256 * MIB) as f64,
        "coming back sent {home} bytes: {back}"
    );
}

#[test]
fn pre_copy_rolls_back_when_cancelled_mid_round() {
    let lab = Lab::up();
    let _shaped = Shaped::new("200mbit");
    let c = lab.run_mem("h1", "mem", 512, 50);
    let ip = c["ip"].as_str().unwrap().to_string();
    assert_memory_intact(&ip, 512, "fresh workload");

    let (from, job) = start_migration("mem", "h2", &["--pre-copy"]);
    assert_eq!(from, "h1");
    wait_job_state_within(&job, "pre_copying", Duration::from_secs(30));
    // Well inside round 1: 512 MiB take ~20 s at 200 Mbit/s.
    std::thread::sleep(Duration::from_secs(2));
    // The tracker is in place (so the checks after the rollback can see one left behind).
    let tracked: usize = container_pids("h1", "mem")
        .into_iter()
        .map(|pid| userfaultfd_mappings(pid).len())
        .sum();
    let agent_uffds = userfaultfds(lab.agent_pid("h1")).len();
    eprintln!(
        "mid-round: {tracked} mappings registered with a userfaultfd, the h1 agent holds {agent_uffds} userfaultfds"
    );
    assert!(
        tracked > 0 && agent_uffds > 0,
        "no uffd-wp tracker seen mid-round"
    );
    let t = Instant::now();
    ferry_ok(&["cancel", &job]);
    let r = wait_job_within(&job, Duration::from_secs(120));
    eprintln!("cancel to end of job: {:.1} s", t.elapsed().as_secs_f64());
    print_rounds("cancelled", &r);
    assert_eq!(r["result"], "rolled_back", "{r}");
    assert_eq!(r["committed"], false, "{r}");
    assert_eq!(r["mode"], "pre-copy", "{r}");
    assert!(r["reason"].as_str().unwrap_or("").contains("cancel"), "{r}");
    if let Some(last) = r["rounds"].as_array().and_then(|a| a.last()) {
        assert_eq!(last["decision"]["decision"], "abort", "{r}");
    }

    assert_runs_on(&lab, "h1", "mem");
    // No tracker left: no userfaultfd in the container's processes, none of their mappings
    // still registered, and the source agent let go of the ones it took over.
    let mut pids = container_pids("h1", "mem");
    let ps_pid = lab.container("mem").unwrap()["pid"].as_i64().expect("pid") as i32;
    if !pids.contains(&ps_pid) {
        pids.push(ps_pid);
    }
    assert!(!pids.is_empty());
    for pid in &pids {
        let fds = userfaultfds(*pid);
        assert!(fds.is_empty(), "pid {pid} holds userfaultfds {fds:?}");
        let maps = userfaultfd_mappings(*pid);
        assert!(
            maps.is_empty(),
            "pid {pid}: mappings still registered with a userfaultfd: {maps:?}"
        );
    }
    let agent = lab.agent_pid("h1");
    let fds = userfaultfds(agent);
    assert!(
        fds.is_empty(),
        "the h1 agent still holds userfaultfds {fds:?}"
    );
    // No CPU quota left on it.
    let quota = "/sys/fs/cgroup/cpu/ferry/h1/mem/cpu.cfs_quota_us";
    match std::fs::read_to_string(quota) {
        Ok(q) => assert_eq!(q.trim(), "-1", "{quota}"),
        Err(e) => eprintln!("SKIPPED the CPU quota check: {quota}: {e}"),
    }
    // It runs on, at its pace, with all its memory.
    let d0 = dirtied_pages(&ip);
    std::thread::sleep(Duration::from_secs(1));
    let d1 = dirtied_pages(&ip);
    assert!(
        d1 - d0 > 50 * MIB / PAGE / 4,
        "the workload barely writes after the rollback: {} pages in 1 s",
        d1 - d0
    );
    assert_memory_intact(&ip, 512, "after the rollback");
    assert!(
        eventually(Duration::from_secs(10), || std::panic::catch_unwind(|| {
            assert_clean_host("h2", "mem")
        })
        .is_ok()),
        "destination not cleaned"
    );
    assert_clean_host("h2", "mem");
}

#[test]
fn auto_converge_throttles_a_container_that_outruns_the_link() {
    let lab = Lab::up();
    // 1 Gbit/s carries about 119 MB/s; the workload dirties its memory faster.
    let _shaped = Shaped::new("1gbit");
    let c = lab.run_mem("h1", "mem", 256, 400);
    let ip = c["ip"].as_str().unwrap().to_string();

    let t = Instant::now();
    let (code, r) = migrate_json(
        "mem",
        "h2",
        &["--pre-copy", "--max-rounds", "12"],
        Duration::from_secs(240),
    );
    eprintln!("migration took {:.1} s", t.elapsed().as_secs_f64());
    print_rounds("256 MiB dirtying 400 MiB/s over 1 Gbit/s", &r);
    assert_precopy_completed(&r, code);
    let throttles: Vec<u64> = rounds(&r)
        .iter()
        .map(|x| x["throttle_pct"].as_u64().expect("throttle_pct"))
        .collect();
    assert!(
        throttles.iter().any(|&t| t > 0),
        "never throttled: {throttles:?}"
    );
    assert!(
        throttles.windows(2).all(|w| w[0] <= w[1]),
        "the throttle went down: {throttles:?}"
    );
    assert!(rounds(&r).len() <= 12, "round limit: {throttles:?}");
    // The throttle bites. Unthrottled, the workload rewrites all of its memory within every
    // round (the dirty set stays whole); throttled, the set shrinks round after round.
    let dirty = |x: &Value| x["dirty_pages"].as_u64().expect("dirty_pages");
    let (first, last) = (dirty(&rounds(&r)[0]), dirty(rounds(&r).last().unwrap()));
    assert!(
        first > 60_000,
        "unthrottled, the whole 256 MiB should be dirty again after a round: {first}"
    );
    assert!(
        last * 4 < first,
        "throttled to {throttles:?} yet the dirty set went from {first} to only {last} pages"
    );
    assert!(
        r["precopy_stop"].is_string(),
        "the report gives the reason the rounds stopped: {r}"
    );

    let c = lab.container("mem").expect("listed");
    assert_eq!(c["host"], "h2", "{c}");
    assert_clean_host("h1", "mem");
    // The throttle stayed behind: the container runs unthrottled at the destination.
    let quota = "/sys/fs/cgroup/cpu/ferry/h2/mem/cpu.cfs_quota_us";
    match std::fs::read_to_string(quota) {
        Ok(q) => assert_eq!(q.trim(), "-1", "{quota}"),
        Err(e) => eprintln!("SKIPPED the CPU quota check: {quota}: {e}"),
    }
    assert_memory_intact(&ip, 256, "on h2");
}
