//! End-to-end: the cluster's state in a real three-member etcd cluster inside the lab
//! (`ferry lab up --etcd`, Debian's etcd-server, mutual TLS). Migrations switch a container's
//! route in one fenced transaction and every host programs its VXLAN FDB from etcd; a source
//! cut off from etcd never moves a container, a destination whose ownership transaction
//! fails never keeps its copy, a dead etcd member does not stop a migration, and hosts that
//! were away (or restarted) converge on etcd's routes.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// `ferry lab etcdctl ARGS`.
fn etcdctl(args: &[&str]) -> String {
    let mut a = vec!["lab", "etcdctl", "--"];
    a.extend_from_slice(args);
    ferry_ok(&a)
}

/// Every key under `prefix` and its value.
fn etcd_get(prefix: &str) -> BTreeMap<String, String> {
    let out = etcdctl(&["get", "--prefix", prefix]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_string(), c[1].to_string()))
        .collect()
}

/// The routes in etcd: MAC to (host, VTEP).
fn etcd_routes() -> BTreeMap<String, (String, String)> {
    etcd_get("/ferry/routes/")
        .into_iter()
        .map(|(k, v)| {
            let r: Value = serde_json::from_str(&v).expect("route JSON");
            (
                k.trim_start_matches("/ferry/routes/").to_string(),
                (
                    r["host"].as_str().expect("host").to_string(),
                    r["vtep"].as_str().expect("vtep").to_string(),
                ),
            )
        })
        .collect()
}

/// A container's record in etcd.
fn etcd_container(name: &str) -> Value {
    let v = etcd_get(&format!("/ferry/containers/{name}"));
    let s = v
        .get(&format!("/ferry/containers/{name}"))
        .unwrap_or_else(|| panic!("no record of {name} in etcd: {v:?}"));
    serde_json::from_str(s).expect("container JSON")
}

/// A host's unicast VXLAN FDB entries: MAC to VTEP.
fn fdb(host: &str) -> BTreeMap<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("ferry-{host}")])
        .args(["bridge", "-j", "fdb", "show", "dev", "vx0"])
        .output()
        .expect("bridge fdb show");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let mac = e["mac"].as_str()?;
            let dst = e["dst"].as_str()?;
            (mac != "00:00:00:00:00:00").then(|| (mac.to_string(), dst.to_string()))
        })
        .collect()
}

/// What `host`'s FDB must hold for etcd's routes: every MAC routed elsewhere, at its VTEP.
fn expected_fdb(host: &str) -> BTreeMap<String, String> {
    etcd_routes()
        .into_iter()
        .filter(|(_, (h, _))| h != host)
        .map(|(mac, (_, vtep))| (mac, vtep))
        .collect()
}

/// Waits until every listed host's FDB agrees with etcd.
fn assert_fdbs_match_etcd(hosts: &[&str], within: Duration) {
    for h in hosts {
        let ok = eventually(within, || fdb(h) == expected_fdb(h));
        assert!(
            ok,
            "{h}'s FDB {:?} does not match etcd's routes {:?}",
            fdb(h),
            etcd_routes()
        );
    }
}

const HOSTS: [&str; 4] = ["h1", "h2", "h3", "client"];

/// iptables rules that cut a host off from etcd's client port (its gRPC connections stall).
const ETCD_CUT: [&[&str]; 2] = [
    &["OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "DROP"],
    &["INPUT", "-p", "tcp", "--sport", "2379", "-j", "DROP"],
];

/// The value of a metric series on `host`.
fn metric(host: &str, series: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(format!("{LAB_DIR}/{host}.sock"))
        .arg("http://agent/v1/metrics")
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (s == series).then(|| v.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {series} in {host}'s metrics:\n{text}"))
}

#[test]
fn with_etcd_routes_move_in_one_transaction_and_every_fdb_follows() {
    let lab = Lab::up_with(&["--hosts", "3", "--etcd"]);
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let mac = c["mac"].as_str().expect("mac").to_string();

    // Claimed in etcd: the record, both addresses, the route.
    let rec = etcd_container("echo");
    assert_eq!(rec["host"], "h1", "{rec}");
    let leases = etcd_get("/ferry/ipam/");
    assert_eq!(
        leases
            .get(&format!("/ferry/ipam/v4/{ip}"))
            .map(String::as_str),
        Some("echo"),
        "{leases:?}"
    );
    assert!(
        leases.keys().any(|k| k.starts_with("/ferry/ipam/v6/")),
        "{leases:?}"
    );
    assert_fdbs_match_etcd(&HOSTS, Duration::from_secs(5));

    // One name, one address, cluster-wide: etcd refuses the second claim.
    let dup = ferry(&[
        "run",
        "--on",
        "h3",
        "--name",
        "other",
        "--ip",
        &ip,
        "--",
        "/bin/ferry-workload",
        "echo",
        "--port",
        "7000",
    ]);
    assert!(!dup.status.success(), "a second container got {ip}");
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(err.contains(&ip) && err.contains("etcd"), "{err}");
    let dup = ferry(&[
        "run",
        "--on",
        "h2",
        "--name",
        "echo",
        "--",
        "/bin/ferry-workload",
        "echo",
        "--port",
        "7000",
    ]);
    assert!(
        !dup.status.success(),
        "a second container named echo was made"
    );
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    let probe = Probe::start(&ip, "etcd-moves");
    for (to, mode) in [("h2", "stop-copy"), ("h3", "pre-copy"), ("h1", "pre-copy")] {
        let mut args = vec![];
        if mode == "pre-copy" {
            args.push("--pre-copy");
        }
        let (code, report) = migrate_json("echo", to, &args, Duration::from_secs(60));
        assert_eq!(code, 0, "migration to {to}: {report}");
        let rec = etcd_container("echo");
        assert_eq!(rec["host"], to, "{rec}");
        assert_eq!(rec["job"], report["id"], "{rec} {report}");
        // The job's record is in etcd too, once it ended.
        let id = report["id"].as_str().expect("id");
        let ok = eventually(Duration::from_secs(5), || {
            etcd_get(&format!("/ferry/jobs/{id}"))
                .values()
                .next()
                .is_some_and(|j| j.contains("\"state\":\"done\""))
        });
        assert!(ok, "no finished record of job {id} in etcd");
        assert_eq!(etcd_routes()[&mac].0, to);
        assert_fdbs_match_etcd(&HOSTS, Duration::from_secs(5));
    }
    assert_probe_intact(&probe.finish());

    // The metrics say how the controller fares.
    for h in HOSTS {
        assert_eq!(metric(h, "ferry_etcd_connected"), 1.0, "{h}");
        assert_eq!(metric(h, "ferry_etcd_watching"), 1.0, "{h}");
        assert!(metric(h, "ferry_overlay_routes") >= 2.0, "{h}");
    }
    assert_eq!(metric("h1", "ferry_route_switch_seconds_count"), 1.0);

    // Removed: its records and route go.
    ferry_ok(&["rm", "echo"]);
    assert!(etcd_get("/ferry/containers/").is_empty());
    assert!(etcd_get("/ferry/ipam/").is_empty());
    assert!(!etcd_routes().contains_key(&mac));
    assert_fdbs_match_etcd(&HOSTS, Duration::from_secs(5));
    drop(lab);
}

#[test]
fn a_source_cut_off_from_etcd_never_moves_the_container() {
    let lab = Lab::up_with(&["--hosts", "2", "--etcd"]);
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (_, job) = start_migration(
        "echo",
        "h2",
        &["--pause-in-phase", "prepare", "--pause-in-phase-ms", "3000"],
    );
    wait_job_state(&job, "preparing");
    let cut = LinkCut::with_rules("h1", &ETCD_CUT);
    let report = wait_job(&job);
    assert_eq!(report["result"], "rolled_back", "{report}");
    let why = report["reason"].as_str().unwrap_or_default();
    assert!(why.contains("etcd"), "the reason names etcd: {why}");
    // Still h1's, running there only, answering.
    assert_runs_on(&lab, "h1", "echo");
    assert_eq!(
        ask_workload(&ip, "still-here").split_once(' ').map(|x| x.1),
        Some("still-here")
    );
    drop(cut);
    assert_eq!(etcd_container("echo")["host"], "h1");
    assert_eq!(etcd_routes()[c["mac"].as_str().unwrap()].0, "h1");
    assert_fdbs_match_etcd(&HOSTS[..2], Duration::from_secs(10));
    // Back in touch, it moves.
    let (code, report) = migrate_json("echo", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    assert_eq!(etcd_container("echo")["host"], "h2");
    drop(lab);
}

#[test]
fn a_destination_whose_ownership_transaction_fails_never_keeps_its_copy() {
    let lab = Lab::up_with(&["--hosts", "2", "--etcd"]);
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (_, job) = start_migration("echo", "h2", &["--pause-before-commit-ms", "3000"]);
    wait_job_state(&job, "committing");
    // Someone else changed the container's record meanwhile: the fencing revision the source
    // read no longer holds, so the destination's commit transaction fails.
    let rec = etcd_get("/ferry/containers/echo")["/ferry/containers/echo"].clone();
    etcdctl(&["put", "/ferry/containers/echo", &rec]);
    let report = wait_job(&job);
    assert_eq!(report["result"], "rolled_back", "{report}");
    assert_runs_on(&lab, "h1", "echo");
    assert_eq!(
        ask_workload(&ip, "after").split_once(' ').map(|x| x.1),
        Some("after")
    );
    assert_eq!(etcd_container("echo")["host"], "h1");
    assert_eq!(etcd_routes()[c["mac"].as_str().unwrap()].0, "h1");
    assert_fdbs_match_etcd(&HOSTS[..2], Duration::from_secs(10));
    drop(lab);
}

#[test]
fn a_migration_completes_while_an_etcd_member_is_killed_and_hosts_converge_after_restarts() {
    let lab = Lab::up_with(&["--hosts", "3", "--etcd"]);
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let mac = c["mac"].as_str().expect("mac").to_string();

    // An etcd member dies during the migration.
    let (_, job) = start_migration(
        "echo",
        "h2",
        &["--pause-in-phase", "prepare", "--pause-in-phase-ms", "2000"],
    );
    wait_job_state(&job, "preparing");
    let pid = std::fs::read_to_string(format!("{LAB_DIR}/etcd1.pid")).expect("etcd1 pid");
    assert!(Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .is_ok_and(|s| s.success()));
    let report = wait_job(&job);
    assert_eq!(report["result"], "completed", "{report}");
    assert_eq!(etcd_container("echo")["host"], "h2");
    assert_fdbs_match_etcd(&HOSTS, Duration::from_secs(10));
    ferry_ok(&["lab", "start-etcd", "etcd1"]);

    // A host down during a migration converges when it comes back.
    lab.kill_agent("h3");
    // Its lease lapses (3 s in the lab): it is down for the rest of the cluster.
    let down = eventually(Duration::from_secs(10), || {
        !etcd_get("/ferry/hosts/").contains_key("/ferry/hosts/h3")
    });
    assert!(
        down,
        "h3's lease never lapsed: {:?}",
        etcd_get("/ferry/hosts/")
    );
    let (code, report) = migrate_json("echo", "h1", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        fdb("h3").get(&mac).map(String::as_str),
        Some("10.231.0.2"),
        "h3 missed the move while down"
    );
    ferry_ok(&["lab", "start-agent", "h3"]);
    assert!(
        etcd_get("/ferry/hosts/").contains_key("/ferry/hosts/h3"),
        "h3 registered again"
    );
    assert_fdbs_match_etcd(&["h3"], Duration::from_secs(10));

    // Every agent restarted: each FDB still matches etcd, and the container still answers.
    for h in HOSTS {
        lab.kill_agent(h);
        ferry_ok(&["lab", "start-agent", h]);
    }
    assert_fdbs_match_etcd(&HOSTS, Duration::from_secs(10));
    assert_eq!(
        ask_workload(&ip, "restarted").split_once(' ').map(|x| x.1),
        Some("restarted")
    );
    drop(lab);
}
