//! End-to-end: a container's port published on its host's underlay address
//! (`ferry run --publish HOSTPORT:PORT`) in an etcd lab. A client on the underlay keeps using
//! the old host's address through a migration: its open TCP connection goes on, new
//! connections to the old host reach the container on its new host (which publishes the port
//! too), the redirect is recorded in etcd, and it goes when the container is removed.

use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

/// One line to `addr:port` from the client host over the underlay; the answer.
fn ask_at(addr: &str, port: u16, line: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ferry-client",
            "timeout",
            "10",
            "bash",
            "-c",
        ])
        .arg(format!(
            "exec 3<>/dev/tcp/{addr}/{port} && echo '{line}' >&3 && read -r l <&3 && echo \"$l\""
        ))
        .output()
        .expect("bash");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The DNAT rules of Ferry's published ports on `host`.
fn dnat_rules(host: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("ferry-{host}")])
        .args(["iptables", "-w", "-t", "nat", "-S", "FERRY-PUB-PRE"])
        .output()
        .expect("iptables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

fn redirects_in_etcd() -> String {
    ferry_ok(&[
        "lab",
        "etcdctl",
        "--",
        "get",
        "--prefix",
        "/ferry/redirects/",
        "--keys-only",
    ])
}

#[test]
fn a_client_of_the_old_hosts_address_follows_the_container_connection_included() {
    let lab = Lab::up_with(&["--hosts", "2", "--etcd"]);
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "web",
        "--publish",
        "8000:7000",
        "--",
        "/bin/ferry-workload",
        "echo",
        "--port",
        "7000",
    ]);
    let ok = eventually(Duration::from_secs(10), || {
        ask_at("10.231.0.1", 8000, "up").is_some_and(|a| a.ends_with(" up"))
    });
    assert!(ok, "the published port on h1 never answered");
    // A port already published on a host is refused to another container there.
    let dup = ferry(&[
        "run",
        "--on",
        "h1",
        "--name",
        "web2",
        "--publish",
        "8000:7000",
        "--",
        "/bin/ferry-workload",
        "echo",
        "--port",
        "7000",
    ]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already published"));

    // One TCP connection to h1's address, through the migration.
    let probe = Probe::start_at("10.231.0.1:8000", "publish");
    let (code, report) = migrate_json("web", "h2", &["--pre-copy"], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    std::thread::sleep(Duration::from_millis(500));
    assert_probe_intact(&probe.finish());

    // New connections: to the old host's address and to the new one's.
    for addr in ["10.231.0.1", "10.231.0.2"] {
        let a = ask_at(addr, 8000, "new").unwrap_or_default();
        assert!(a.ends_with(" new"), "{addr}:8000 answered {a:?}");
    }
    assert!(
        redirects_in_etcd().contains("/ferry/redirects/web/h1"),
        "{}",
        redirects_in_etcd()
    );
    assert_eq!(dnat_rules("h1").len(), 1, "{:?}", dnat_rules("h1"));
    assert_eq!(dnat_rules("h2").len(), 1, "{:?}", dnat_rules("h2"));

    // Removed: the redirect and every rule go.
    ferry_ok(&["rm", "web"]);
    assert!(!redirects_in_etcd().contains("web"));
    let gone = eventually(Duration::from_secs(10), || {
        dnat_rules("h1").is_empty() && dnat_rules("h2").is_empty()
    });
    assert!(
        gone,
        "rules left: h1 {:?}, h2 {:?}",
        dnat_rules("h1"),
        dnat_rules("h2")
    );
    assert!(ask_at("10.231.0.1", 8000, "gone").is_none());
    drop(lab);
}
