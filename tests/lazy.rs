//! End-to-end lazy restore: pre-copy's final dump writes no memory the rounds already placed
//! at the destination, which restores with CRIU's lazy pages and fills the memory in from its
//! own page store while the container runs. Real runc, CRIU, namespaces, QUIC; root required.

use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Bytes the report's `phase` carried.
fn phase_bytes(r: &Value, phase: &str) -> u64 {
    r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter(|p| p["phase"] == phase)
        .map(|p| p["bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// What a completed lazy pre-copy migration of a `size_mib` MiB workload reports.
fn assert_lazy(r: &Value, code: i32, size_mib: u64) {
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["result"], "completed", "{r}");
    let m = &r["memory"];
    assert_eq!(m["restore"], "lazy", "{r}");
    let lazy = m["lazy_pages"].as_u64().expect("lazy_pages");
    assert!(
        lazy as f64 >= 0.95 * (size_mib * 256) as f64,
        "the workload's memory is restored lazily: {m}"
    );
    // Only what cannot be lazy (the page under each thread's stack pointer, file-backed
    // pages) is in the dump itself.
    let eager = m["eager_pages"].as_u64().expect("eager_pages");
    assert!(eager < 512, "{eager} eager pages: {m}");
    // Every lazy page came from the destination's store, none from anywhere else.
    assert_eq!(m["fill_pages"], m["lazy_pages"], "{m}");
    assert!(m["fill_error"].is_null(), "{m}");
    assert!(m["fill_ms"].as_f64().is_some_and(|x| x > 0.0), "{m}");
    // The proof: every lazy page was compared with the source's frozen copy, and matched.
    let i = &m["integrity"];
    assert_eq!(i["pages_checked"], m["lazy_pages"], "{m}");
    assert_eq!(i["mismatches"], 0, "{m}");
    assert!(i["incomplete"].is_null(), "{m}");
    // The report counts every round trip of the freeze; the memory report's are those same
    // ones (at least the images, the restore and the commit).
    let trips = r["frozen_round_trips"]
        .as_u64()
        .expect("frozen_round_trips");
    assert!(trips >= 3, "{r}");
    assert_eq!(m["frozen_round_trips"].as_u64(), Some(trips), "{r}");
    // The freeze carried the last writes and the images, not the memory.
    let dump = phase_bytes(r, "dump");
    assert!(
        dump < size_mib * MIB / 4,
        "the dump carried {dump} bytes of a {size_mib} MiB container: {r}"
    );
}

/// The resident memory of `host`'s agent, in MiB.
fn agent_rss_mib(host: &str) -> u64 {
    let pid = std::fs::read_to_string(format!("/run/ferry/lab/{host}.pid"))
        .expect("the agent's pid file");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .expect("the agent's status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in the agent's status");
    kib >> 10
}

/// Nothing of the lazy restore is left on `host`: no daemon, no images, no work directory.
fn assert_fill_ended(host: &str) {
    // The agent's own daemon closed every userfaultfd it was given.
    let agent: u32 = std::fs::read_to_string(format!("/run/ferry/lab/{host}.pid"))
        .expect("the agent's pid file")
        .trim()
        .parse()
        .expect("a pid");
    let holds_uffd = || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .map(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().contains("userfaultfd"))
                })
            })
            .unwrap_or(false)
    };
    assert!(
        eventually(Duration::from_secs(10), || !holds_uffd()),
        "the agent of {host} still holds a userfaultfd after the fill"
    );
    assert!(
        eventually(Duration::from_secs(10), || processes_with(
            "criu lazy-pages"
        )
        .is_empty()),
        "a criu lazy-pages daemon is still running: {:?}",
        processes_with("criu lazy-pages")
    );
    for d in ["images", "work"] {
        let dir = format!("/run/ferry/lab/{host}/{d}");
        assert!(
            eventually(Duration::from_secs(10), || dir_entries(&dir).is_empty()),
            "{dir} keeps {:?}",
            dir_entries(&dir)
        );
    }
}

#[test]
fn lazy_restore_fills_the_memory_in_from_the_destination_store() {
    let lab = Lab::up();
    let c = lab.run_mem("h1", "mem", 256, 50);
    let ip = c["ip"].as_str().expect("ip").to_string();
    assert_memory_intact(&ip, 256, "fresh workload");
    let probe = Probe::start(&ip, "lazy");
    let rss_before = agent_rss_mib("h2");

    let (code, r) = migrate_json("mem", "h2", &["--pre-copy"], Duration::from_secs(180));
    eprintln!(
        "h1 -> h2: frozen {} ms, memory {}",
        r["frozen_ms"], r["memory"]
    );
    assert_lazy(&r, code, 256);
    assert_runs_on(&lab, "h2", "mem");
    assert_clean_host("h1", "mem");
    assert_fill_ended("h2");
    // The store let go of each page once it was in the container: the destination does not
    // hold the container's memory twice (what stays is the versions of pages rewritten
    // between rounds, kept for a later migration, and the agent's own buffers: 93-168 MiB
    // here, against 256 MiB and more when the store kept every page).
    let rss_after = agent_rss_mib("h2");
    eprintln!("the agent of h2: {rss_before} MiB before, {rss_after} MiB after the fill");
    assert!(
        rss_after < rss_before + 256,
        "the agent of h2 grew from {rss_before} to {rss_after} MiB for a 256 MiB container: \
         it holds the container's memory a second time"
    );
    std::thread::sleep(Duration::from_millis(500));
    let p = probe.finish();
    assert_probe_intact(&p);
    assert_eq!(p["memory_intact"], true, "{p}");
    // Every page, written before, between and during the rounds, arrived in its last
    // version, whether the container touched it first or the fill copied it in.
    assert_memory_intact(&ip, 256, "on h2");

    // And back, where the store still holds most of these pages.
    let (code, r) = migrate_json("mem", "h1", &["--pre-copy"], Duration::from_secs(180));
    eprintln!(
        "h2 -> h1: frozen {} ms, memory {}",
        r["frozen_ms"], r["memory"]
    );
    assert_lazy(&r, code, 256);
    assert_runs_on(&lab, "h1", "mem");
    assert_fill_ended("h1");
    assert_memory_intact(&ip, 256, "back on h1");
}

#[test]
fn the_integrity_check_catches_a_write_the_dirty_tracking_missed() {
    let lab = Lab::up();
    let c = lab.run_mem("h1", "mem", 256, 50);
    let ip = c["ip"].as_str().expect("ip").to_string();
    // The fault hook leaves one page written since the last round out of the final dump: the
    // destination's store holds an older version of it. A final set without such a page (the
    // freeze came right after the last round) hides nothing: the container moves on and back
    // until a page was hidden, a few times at most.
    let mut r = Value::Null;
    for (attempt, to) in ["h2", "h1", "h2", "h1"].into_iter().enumerate() {
        let (code, report) = migrate_json(
            "mem",
            to,
            &["--pre-copy", "--hide-dirty-page"],
            Duration::from_secs(180),
        );
        eprintln!("attempt {attempt}, to {to}: {report}");
        assert_eq!(code, 0, "{report}");
        assert_eq!(report["memory"]["restore"], "lazy", "{report}");
        assert_fill_ended(to);
        r = report;
        if r["memory"]["hidden_pages"] == 1 {
            break;
        }
        // Nothing hidden: the check found nothing either.
        assert_eq!(r["memory"]["integrity"]["mismatches"], 0, "{r}");
    }
    assert_eq!(r["memory"]["hidden_pages"], 1, "the hook hid a page: {r}");
    let to = r["to"].as_str().expect("to").to_string();
    let i = &r["memory"]["integrity"];
    assert!(
        i["mismatches"].as_u64().is_some_and(|n| n >= 1),
        "the hidden page is found: {i}"
    );
    assert_eq!(i["pages_checked"], r["memory"]["lazy_pages"], "{i}");
    assert!(i["incomplete"].is_null(), "{i}");
    let warned = r["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().unwrap_or("").starts_with("integrity:"))
    });
    assert!(warned, "the report warns: {r}");
    // Found before the container used it, it was replaced by the frozen copy's version: every
    // page of the workload holds what it wrote last.
    assert_eq!(i["corrected"], i["mismatches"], "{i}");
    assert_runs_on(&lab, &to, "mem");
    assert_memory_intact(&ip, 256, "after the move");
}

/// Restarts `host`'s agent with `settings` changed in its config.
fn reconfigure(lab: &Lab, host: &str, settings: &[(&str, Value)]) {
    lab.kill_agent(host);
    let cfg_path = format!("/run/ferry/lab/{host}.json");
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).expect("the config")).expect("json");
    for (k, v) in settings {
        cfg[*k] = v.clone();
    }
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).expect("writing");
    ferry_ok(&["lab", "start-agent", host]);
}

#[test]
fn the_page_store_grows_for_a_container_and_a_host_without_the_memory_refuses_it() {
    let lab = Lab::up();
    // A page store of 32 MiB; 700 MiB of memory to plan with.
    reconfigure(
        &lab,
        "h2",
        &[
            ("page_store_mib", Value::from(32)),
            ("memory_budget_mib", Value::from(700)),
        ],
    );
    // 128 MiB: the store grows by what it lacks for the job's pages (twice the memory and
    // 16 MiB: 272 - 32), which fits with the container and 256 MiB of margin (624 <= 700).
    let c = lab.run_mem("h1", "mem", 128, 20);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (code, r) = migrate_json("mem", "h2", &["--pre-copy"], Duration::from_secs(180));
    assert_lazy(&r, code, 128);
    assert_runs_on(&lab, "h2", "mem");
    assert_fill_ended("h2");
    assert_memory_intact(&ip, 128, "on h2, through a page store four times smaller");

    // 256 MiB cannot (256 running, 496 more for the store, 256 of margin): refused before
    // anything moves, with the sizes.
    let big = lab.run_mem("h1", "big", 256, 0);
    let big_ip = big["ip"].as_str().expect("ip").to_string();
    let (code, r) = migrate_json("big", "h2", &["--pre-copy"], Duration::from_secs(60));
    assert_eq!(code, 2, "rolled back: {r}");
    assert_eq!(r["result"], "rolled_back", "{r}");
    let why = r["reason"].as_str().unwrap_or_default();
    assert!(why.contains("cannot hold the container"), "{r}");
    assert!(why.contains("memory_budget_mib"), "names the setting: {r}");
    assert!(why.contains("700 MiB"), "names the budget: {r}");
    assert_runs_on(&lab, "h1", "big");
    assert_memory_intact(&big_ip, 256, "still on h1");
    assert_clean_host("h2", "big");
}

#[test]
fn without_lazy_restore_the_final_dump_carries_every_page() {
    let lab = Lab::up();
    // h2 refuses lazy restores.
    reconfigure(&lab, "h2", &[("lazy_restore", Value::Bool(false))]);

    let c = lab.run_mem("h1", "mem", 64, 20);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (code, r) = migrate_json("mem", "h2", &["--pre-copy"], Duration::from_secs(180));
    assert_eq!(code, 0, "{r}");
    let m = &r["memory"];
    assert_eq!(m["restore"], "eager", "{r}");
    let why = m["not_lazy"].as_str().unwrap_or("");
    assert!(why.contains("lazy_restore in its config"), "{m}");
    // The relayed dump waits for no answer of the destination's page server (the relay
    // answers CRIU and checks the destination's answers later): the restore (behind the
    // images) and the commit are the only round trips in the freeze.
    assert_eq!(r["frozen_round_trips"], 2, "{r}");
    assert!(processes_with("criu lazy-pages").is_empty());
    assert_memory_intact(&ip, 64, "on h2, restored from a complete dump");

    // Off in the job's policy: the same, whatever the destination can do.
    let (code, r) = migrate_json(
        "mem",
        "h1",
        &["--pre-copy", "--no-lazy-restore"],
        Duration::from_secs(180),
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["memory"]["restore"], "eager", "{r}");
    assert!(
        r["memory"]["not_lazy"]
            .as_str()
            .unwrap_or("")
            .contains("policy"),
        "{r}"
    );
    assert_memory_intact(&ip, 64, "back on h1");
}

/// A container the auto-converge throttle holds at 99 % of its CPU taken away still reaches
/// the freezer: the throttle is lifted just before the freeze.
#[test]
fn a_container_throttled_to_99_percent_freezes_and_moves() {
    let lab = Lab::up();
    // 100 Mbit/s carries about 12 MB/s; the workload writes 50 MiB/s.
    let _shaped = Shaped::new("100mbit");
    let c = lab.run_mem("h1", "mem", 64, 50);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (code, r) = migrate_json(
        "mem",
        "h2",
        &[
            "--pre-copy",
            "--max-rounds",
            "3",
            "--throttle-initial-pct",
            "99",
        ],
        Duration::from_secs(240),
    );
    assert_eq!(code, 0, "{r}");
    let throttles: Vec<u64> = r["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .map(|x| x["throttle_pct"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        throttles.contains(&99),
        "the container was never throttled to 99 %: {throttles:?} {r}"
    );
    assert_eq!(r["memory"]["restore"], "lazy", "{r}");
    assert_runs_on(&lab, "h2", "mem");
    assert_memory_intact(&ip, 64, "on h2");
}

/// Starts a lazy pre-copy of a 1 GiB workload from h1 to h2 and returns (job, ip) once the
/// commit has passed and the destination is filling the memory in.
fn migrate_until_filling(lab: &Lab) -> (String, String, Shaped) {
    // Post-copy over 100 Mbit/s: every page comes from the source, so the fill lasts about
    // 20 s (a local fill of pre-copied pages is over in a fraction of a second).
    let c = lab.run_mem("h1", "mem", 256, 20);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let shaped = Shaped::new("100mbit");
    let (_, job) = start_migration("mem", "h2", &["--post-copy"]);
    wait_job_state_within(&job, "cleaning_up", Duration::from_secs(120));
    (job, ip, shaped)
}

/// What a migration whose fill failed after the commit reports, and where its container
/// runs: on the source again, resumed from its frozen copy, every page intact; nothing left at
/// the destination.
fn assert_resumed_at_the_source(lab: &Lab, job: &str, ip: &str) {
    let r = wait_job(job);
    eprintln!("report: {r}");
    let err = r["memory"]["fill_error"].as_str().unwrap_or("");
    assert!(err.contains("runs on h1 again"), "{r}");
    let warned = r["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().unwrap_or("").contains("lazy restore"))
    });
    assert!(warned, "the report warns: {r}");
    assert_runs_on(lab, "h1", "mem");
    assert_memory_intact(ip, 256, "resumed on h1");
    assert!(
        eventually(Duration::from_secs(10), || processes_with(
            "criu lazy-pages"
        )
        .is_empty()),
        "a lazy-pages daemon is left"
    );
    assert_clean_host("h2", "mem");
}

#[test]
fn a_criu_lazy_pages_daemon_killed_during_the_fill_loses_nothing() {
    let lab = Lab::up_with(&["--lazy-daemon", "criu"]);
    let (job, ip, shaped) = migrate_until_filling(&lab);
    let daemons = processes_with("criu lazy-pages");
    assert!(
        !daemons.is_empty(),
        "no lazy-pages daemon while the job is cleaning up"
    );
    for pid in daemons {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    drop(shaped);
    assert_resumed_at_the_source(&lab, &job, &ip);
}

/// The agent's own lazy-pages daemon dies with its agent.
#[test]
fn a_destination_agent_killed_during_the_fill_loses_nothing() {
    let lab = Lab::up_with(&["--lazy-daemon", "agent"]);
    let (job, ip, shaped) = migrate_until_filling(&lab);
    assert!(
        processes_with("criu lazy-pages").is_empty(),
        "the agent serves the fill itself"
    );
    lab.kill_agent("h2");
    ferry_ok(&["lab", "start-agent", "h2"]);
    drop(shaped);
    assert_resumed_at_the_source(&lab, &job, &ip);
}

/// What a completed post-copy migration reports.
fn assert_post_copy(r: &Value, code: i32) {
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(r["precopy_stop"], "post-copy", "{r}");
    let m = &r["memory"];
    assert_eq!(m["restore"], "lazy", "{m}");
    let remote = m["remote_pages"].as_u64().expect("remote_pages");
    let fetched = m["fetched_pages"].as_u64().expect("fetched_pages");
    let on_fault = m["fetched_on_fault"].as_u64().expect("fetched_on_fault");
    assert!(remote > 0, "{m}");
    // Every page left at the source came from its frozen copy, on a fault or in the
    // background fill (a page the container rewrote before the fill reached it was copied in
    // once, at its fault).
    assert!(fetched > 0 && fetched <= remote, "{m}");
    assert!(on_fault <= fetched, "{m}");
    assert_eq!(m["fill_pages"], m["lazy_pages"], "{m}");
    assert_eq!(m["integrity"]["mismatches"], 0, "{m}");
    assert!(m["fill_error"].is_null(), "{m}");
}

#[test]
fn post_copy_moves_a_container_that_writes_faster_than_the_link() {
    let lab = Lab::up();
    // 256 MiB written at 50 MiB/s over 100 Mbit/s (about 12 MB/s): pre-copy cannot converge.
    let _shaped = Shaped::new("100mbit");
    let c = lab.run_mem("h1", "mem", 256, 50);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let probe = Probe::start(&ip, "post-copy");
    let (code, r) = migrate_json("mem", "h2", &["--post-copy"], Duration::from_secs(240));
    eprintln!("report: {r}");
    assert_post_copy(&r, code);
    // No rounds: every lazy page was left at the source and fetched from it.
    assert!(r["rounds"].as_array().is_none_or(|x| x.is_empty()), "{r}");
    let m = &r["memory"];
    assert_eq!(m["remote_pages"], m["lazy_pages"], "{m}");
    assert_eq!(m["fetched_pages"], m["lazy_pages"], "{m}");
    assert_runs_on(&lab, "h2", "mem");
    assert_clean_host("h1", "mem");
    assert_fill_ended("h2");
    let p = probe.finish();
    assert_probe_intact(&p);
    assert_memory_intact(&ip, 256, "on h2, fetched from the source after the restore");
}

#[test]
fn pre_copy_turns_to_post_copy_when_the_rounds_stop_gaining() {
    let lab = Lab::up();
    let _shaped = Shaped::new("100mbit");
    let c = lab.run_mem("h1", "mem", 64, 50);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (code, r) = migrate_json(
        "mem",
        "h2",
        &["--pre-copy", "--when-stuck", "post-copy"],
        Duration::from_secs(240),
    );
    eprintln!("report: {r}");
    assert_post_copy(&r, code);
    let rounds = r["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 2, "stuck is seen after two rounds: {r}");
    assert!(
        rounds.iter().all(|x| x["throttle_pct"].as_u64() == Some(0)),
        "no throttling on the way to post-copy: {r}"
    );
    assert_runs_on(&lab, "h2", "mem");
    assert_fill_ended("h2");
    assert_memory_intact(&ip, 64, "on h2");
}

#[test]
fn memory_the_kernel_writes_during_the_dump_reaches_the_destination() {
    let lab = Lab::up();
    // Twenty processes interrupted in a sleep: the kernel writes the time each had left into
    // its stack, and each thread's rseq area, while CRIU dumps, after the tracking ended.
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "procs",
        "--",
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 20 ]; do sleep 1000000 & i=$((i+1)); done; exec /bin/ferry-workload echo --port 7000",
    ]);
    let c = lab.container("procs").expect("listed");
    wait_port(c["ip"].as_str().expect("ip"));
    for to in ["h2", "h1"] {
        // Small: lazy only when asked to be.
        let (code, r) = migrate_json(
            "procs",
            to,
            &["--pre-copy", "--lazy-min-mib", "0"],
            Duration::from_secs(120),
        );
        eprintln!("to {to}: {}", r["memory"]);
        assert_eq!(code, 0, "{r}");
        let m = &r["memory"];
        assert_eq!(m["restore"], "lazy", "{m}");
        assert!(
            m["reread_pages"].as_u64().is_some_and(|n| n >= 21),
            "each process's pages the dump changed are read again: {m}"
        );
        // The integrity check compares every lazy page with the frozen copy: none is stale.
        assert_eq!(m["integrity"]["mismatches"], 0, "{m}");
        assert_eq!(m["integrity"]["pages_checked"], m["lazy_pages"], "{m}");
        assert_runs_on(&lab, to, "procs");
        assert_fill_ended(to);
    }
}
