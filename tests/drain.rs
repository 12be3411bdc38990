//! End-to-end: `ferry drain HOST` empties a host of an etcd lab: every container moves,
//! memory-heavy ones apart, at most N at a time, each still answering on its address; a drain
//! the other hosts lack room for is refused before anything moves.

use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

fn hosts_of(names: &[String]) -> Vec<String> {
    let v: Value = serde_json::from_str(&ferry_ok(&["ps", "--json"])).expect("ps --json");
    names
        .iter()
        .map(|n| {
            v.as_array()
                .and_then(|a| a.iter().find(|c| c["name"] == n.as_str()))
                .and_then(|c| c["host"].as_str())
                .unwrap_or("missing")
                .to_string()
        })
        .collect()
}

#[test]
fn a_drain_moves_every_container_off_a_host_heavy_ones_apart() {
    let lab = Lab::up_with(&["--hosts", "3", "--etcd"]);
    let mut names: Vec<String> = (1..=8).map(|i| format!("c{i}")).collect();
    for n in &names {
        lab.run_echo("h1", n);
    }
    // Two memory-heavy containers (64 MiB each, heavy from 32 MiB on).
    for n in ["heavy1", "heavy2"] {
        lab.run_mem("h1", n, 64, 0);
        names.push(n.to_string());
    }
    let ip = lab.container("c1").expect("c1")["ip"]
        .as_str()
        .expect("ip")
        .to_string();

    // Refused when the others lack room: nothing moves.
    let out = ferry(&["drain", "h1", "--reserve-mib", "100000000"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lacks room"), "{err}");
    assert!(hosts_of(&names).iter().all(|h| h == "h1"));

    let probe = Probe::start(&ip, "drain");
    let out = ferry(&[
        "drain",
        "h1",
        "--parallel",
        "3",
        "--heavy-mib",
        "32",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("drain --json");
    assert_eq!(r["moved"], 10, "{r}");
    assert_eq!(r["stayed"], 0, "{r}");
    assert_eq!(r["parallel"], 3, "{r}");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("[10/10]") && progress.contains("drained h1: 10 moved"),
        "{progress}"
    );
    assert_probe_intact(&probe.finish());

    let on = hosts_of(&names);
    assert!(
        on.iter().all(|h| h == "h2" || h == "h3"),
        "{names:?} on {on:?}"
    );
    assert!(
        on.iter().any(|h| h == "h2") && on.iter().any(|h| h == "h3"),
        "spread: {on:?}"
    );
    assert_ne!(on[8], on[9], "heavy containers apart: {on:?}");
    for (n, h) in names.iter().zip(&on) {
        let c = lab.container(n).expect("listed");
        let ip = c["ip"].as_str().expect("ip");
        if n.starts_with("heavy") {
            assert_memory_intact(ip, 64, "after the drain");
        } else {
            assert_eq!(
                ask_workload(ip, "drained").split_once(' ').map(|x| x.1),
                Some("drained"),
                "{n} on {h}"
            );
        }
    }
    // Nothing left on h1, and a second drain has nothing to do.
    let empty = eventually(Duration::from_secs(10), || {
        netns_with_prefix("ferry-h1-c-").is_empty()
    });
    assert!(empty, "h1 still holds container namespaces");
    let out = ferry_ok(&["drain", "h1", "--json"]);
    let r: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r["moved"], 0, "{r}");
    drop(lab);
}
