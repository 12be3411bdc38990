//! End-to-end checks of what Ferry's measurements rest on: the memory workload notices damaged
//! memory, link shaping really limits the underlay, and `ferry bench` reports both methods.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

#[test]
fn memory_workload_survives_a_migration_and_reports_a_page_damaged_in_the_images() {
    let lab = Lab::up();
    let c = lab.run_mem("h1", "mem", 32, 10);
    let ip = c["ip"].as_str().unwrap().to_string();
    assert!(
        ask_workload(&ip, "verify").starts_with("verify ok"),
        "fresh workload"
    );

    // A clean migration keeps every page.
    let out = ferry_ok(&["migrate", "mem", "--to", "h2", "--json"]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["result"], "completed", "{r}");
    let v = ask_workload(&ip, "verify");
    assert!(v.starts_with("verify ok"), "after a clean migration: {v}");
    let status = ask_workload(&ip, "status");
    assert!(status.contains("intact=1"), "{status}");

    // One byte flipped in one of its pages inside the images at the destination: the restore
    // succeeds, and the workload finds the damage.
    let probe = Probe::start(&ip, "mem");
    let out = ferry_ok(&[
        "migrate",
        "mem",
        "--to",
        "h1",
        "--json",
        "--corrupt-memory-page",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["result"], "completed", "{r}");
    let v = ask_workload(&ip, "verify");
    assert!(v.starts_with("verify bad"), "damage not found: {v}");
    assert!(v.contains("bad=1 "), "exactly one page is damaged: {v}");
    let status = ask_workload(&ip, "status");
    assert!(status.contains("intact=0"), "{status}");
    // The probe's answers carry the workload's verdict too.
    let p = probe.finish();
    assert_eq!(p["memory_intact"], false, "{p}");
    assert_eq!(p["intact"], false, "{p}");
}

fn qdisc(ns: &str, dev: &str) -> String {
    let out = Command::new("tc")
        .args(["-n", ns, "qdisc", "show", "dev", dev])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `bytes` from h1 to h2 over the underlay with nc; returns how long it took.
fn send_h1_to_h2(bytes: u64) -> Duration {
    let mut recv = Command::new("ip")
        .args([
            "netns", "exec", "ferry-h2", "timeout", "30", "nc", "-l", "-p", "7788",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("nc -l");
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let ok = Command::new("ip")
        .args(["netns", "exec", "ferry-h1", "sh", "-c"])
        .arg(format!("head -c {bytes} /dev/zero | nc -N 10.231.0.2 7788"))
        .status()
        .expect("nc")
        .success();
    let took = t.elapsed();
    let _ = recv.wait();
    assert!(ok, "sending over the underlay failed");
    took
}

#[test]
fn link_rate_shapes_every_underlay_link_and_can_be_removed() {
    let _lab = Lab::up_with(&["--link-rate", "100mbit"]);
    for (ns, dev) in [
        ("ferry-h1", "ul0"),
        ("ferry-h2", "ul0"),
        ("ferry-client", "ul0"),
        ("ferry-ul", "ul-h1"),
        ("ferry-ul", "ul-h2"),
    ] {
        let q = qdisc(ns, dev);
        assert!(
            q.contains("tbf") && q.contains("rate 100Mbit"),
            "{ns}/{dev}: {q}"
        );
    }
    // 12.5 MB at 100 Mbit/s cannot cross in much less than a second (a lower bound: a slow
    // machine only makes it longer).
    let took = send_h1_to_h2(12_500_000);
    assert!(took >= Duration::from_millis(800), "took only {took:?}");

    let out = ferry(&["lab", "shape", "fast"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"fast\"") && err.contains("1gbit"), "{err}");

    ferry_ok(&["lab", "shape", "none"]);
    for (ns, dev) in [("ferry-h1", "ul0"), ("ferry-ul", "ul-h2")] {
        assert!(!qdisc(ns, dev).contains("tbf"), "{ns}/{dev} still shaped");
    }
    ferry_ok(&["lab", "shape", "1gbit"]);
    assert!(qdisc("ferry-h1", "ul0").contains("rate 1Gbit"));
}

#[test]
fn bench_runs_ferry_and_the_baseline_side_by_side() {
    let _lab = Lab::exclusive();
    let out_dir = format!("{LAB_DIR}-bench-test");
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = ferry(&[
        "bench",
        "--no-echo",
        "--processes",
        "0",
        "--sizes-mib",
        "16",
        "--dirty-mib-s",
        "20",
        "--link-rates",
        "unshaped",
        "--out",
        &out_dir,
    ]);
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let r: Value = serde_json::from_slice(
        &std::fs::read(format!("{out_dir}/results.json")).expect("results.json"),
    )
    .expect("results.json is JSON");
    let scenarios = r["scenarios"].as_array().expect("scenarios");
    // Both of Ferry's modes, the baseline measured once for the two.
    assert_eq!(scenarios.len(), 2, "{r}");
    let modes: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"]["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["stop-copy", "pre-copy"], "{r}");
    for s in scenarios {
        for side in ["ferry", "baseline"] {
            let run = &s[side];
            assert_eq!(run["ok"], true, "{side}: {run}");
            assert_eq!(run["memory_intact"], true, "{side}: {run}");
            assert!(run["downtime_ms"].as_f64().unwrap() > 0.0, "{side}: {run}");
            assert!(run["total_ms"].as_f64().unwrap() > 0.0, "{side}: {run}");
            assert!(run["cpu_ms"].as_f64().unwrap() > 0.0, "{side}: {run}");
            // The 16 MiB of memory crossed the underlay.
            assert!(
                run["wire_bytes"].as_u64().unwrap() > 16 << 20,
                "{side}: {run}"
            );
            assert!(!run["phases"].as_array().unwrap().is_empty(), "{side}");
        }
        // Ferry's own frozen time and the client's gap describe the same event.
        let f = &s["ferry"];
        let gap = f["downtime_ms"].as_f64().unwrap();
        let frozen = f["frozen_ms"].as_f64().unwrap();
        assert!(
            gap > 0.5 * frozen && gap < 2.0 * frozen + 100.0,
            "gap {gap} ms vs frozen {frozen} ms"
        );
        assert!(s["downtime_ratio"].as_f64().unwrap() > 0.0);
        assert!(f["resident_bytes"].as_u64().unwrap() > 16 << 20, "{f}");
        let svg = std::fs::read_to_string(format!("{out_dir}/{}", s["chart"].as_str().unwrap()))
            .expect("chart");
        assert!(svg.starts_with("<svg") && svg.contains("dump") && svg.contains("checkpoint"));
    }
    let pre = &scenarios[1]["ferry"]["report"];
    assert!(!pre["rounds"].as_array().unwrap().is_empty(), "{pre}");
    // Stop-and-copy's transfer is held against bare QUIC streams measured in the same run.
    let bare = r["bare_quic"].as_array().expect("bare_quic");
    assert_eq!(bare.len(), 1, "one link: {r}");
    assert_eq!(bare[0]["link"], "unshaped");
    for g in bare[0]["runs"].as_array().unwrap() {
        assert_eq!(g["bytes"].as_u64(), Some(256 << 20), "{g}");
        assert!(g["ms"].as_f64().unwrap() > 0.0, "{g}");
    }
    let tg = &scenarios[0]["transfer_goodput"];
    assert!(tg["bare_quic_mb_s"].as_f64().unwrap() > 0.0, "{tg}");
    assert!(tg["transfer_mb_s"].as_f64().unwrap() > 0.0, "{tg}");
    assert!(
        scenarios[1].get("transfer_goodput").is_none(),
        "pre-copy has none"
    );
    let md = std::fs::read_to_string(format!("{out_dir}/results.md")).expect("results.md");
    assert!(md.contains("| mem 16 MiB"), "{md}");
    assert!(md.contains("Pre-copy against stop-copy"), "{md}");
    assert!(md.contains("against bare QUIC streams"), "{md}");
    // The bench leaves no lab behind.
    assert!(netns_with_prefix("ferry-").is_empty());
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn dirty_rate_is_measured_without_a_trace_left_for_the_dump() {
    let lab = Lab::up();
    let m = lab.run_mem("h1", "mem", 32, 20);
    lab.run_echo("h1", "echo");
    let rate = |name: &str| -> Value {
        serde_json::from_str(&ferry_ok(&["dirty-rate", name, "--ms", "1000", "--json"])).unwrap()
    };
    let r = rate("mem");
    assert_eq!(r["method"], "uffd-wp", "{r}");
    assert_eq!(r["processes"], 1, "{r}");
    let mib_s = r["mib_per_s"].as_f64().unwrap();
    // The workload writes 20 MiB/s; the tracker sees the pages it touched, give or take.
    assert!((10.0..=40.0).contains(&mib_s), "{r}");
    let r = rate("echo");
    assert!(
        r["mib_per_s"].as_f64().unwrap() < 1.0,
        "an idle echo server: {r}"
    );

    // The tracking left nothing behind: CRIU dumps the process and the memory is intact.
    let out = ferry_ok(&["migrate", "mem", "--to", "h2", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["result"], "completed", "{report}");
    let ip = m["ip"].as_str().unwrap();
    let v = ask_workload(ip, "verify");
    assert!(v.starts_with("verify ok"), "{v}");

    let out = ferry(&["dirty-rate", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown container \"nope\""));
    let out = ferry(&["dirty-rate", "mem", "--ms", "5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 10 and 60000"));
}

#[test]
fn cpu_throttle_slows_a_busy_container_and_is_lifted_afterwards() {
    let lab = Lab::up();
    // As fast as it can: one core rewriting pages.
    lab.run_mem("h1", "hot", 512, 4000);
    let rate = |throttle: u32| -> Value {
        serde_json::from_str(&ferry_ok(&[
            "dirty-rate",
            "hot",
            "--ms",
            "200",
            "--throttle",
            &throttle.to_string(),
            "--json",
        ]))
        .unwrap()
    };
    let free = rate(0);
    let throttled = rate(80);
    let f = free["mib_per_s"].as_f64().unwrap();
    let t = throttled["mib_per_s"].as_f64().unwrap();
    assert!(f > 50.0, "a busy workload: {free}");
    // 80 % of its CPU taken away: it writes far less (a hard cap of a fifth of what it used).
    assert!(t < 0.6 * f, "throttled {t} MiB/s vs free {f} MiB/s");
    assert_eq!(throttled["throttle_pct"], 80);
    let allowed = throttled["allowed_cores"].as_f64().unwrap();
    assert!(allowed > 0.0 && allowed < 0.5, "{throttled}");
    // The quota is lifted afterwards.
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu/ferry/h1/hot/cpu.cfs_quota_us")
        .expect("cpu cgroup of the container");
    assert_eq!(quota.trim(), "-1");
    let out = ferry(&["dirty-rate", "hot", "--throttle", "100"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 0 and 99"));
}
