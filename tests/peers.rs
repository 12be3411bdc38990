//! End-to-end: peers are who they say they are and own what they touch. A raw peer
//! (`ferry-test-peer`, the real protocol with the lab's certificates) tries a certificate from
//! the wrong address, a certificate for a host nobody configured, requests about another
//! host's job, routes for a MAC it does not own, replays, and a name and an address twice at
//! once. Real agents, QUIC, mutual TLS, VXLAN.

use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::{json, Value};

const PKI: &str = "/run/ferry/lab/pki";

fn cert(host: &str) -> (String, String) {
    (format!("{PKI}/{host}.pem"), format!("{PKI}/{host}.key"))
}

fn refused(resp: &Value, what: &str) -> String {
    let msg = resp["message"]
        .as_str()
        .or(resp["transport_error"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        resp["result"] == "error" || resp.get("transport_error").is_some(),
        "{what} must be refused: {resp}"
    );
    msg
}

/// Like [`refused`], and the answer carries `code` (see `ErrorCode` in the agent's protocol):
/// what the requester decides from, never from the message.
fn refused_with(resp: &Value, what: &str, code: &str) -> String {
    let msg = refused(resp, what);
    assert_eq!(resp["code"], code, "{what}: {resp}");
    assert_eq!(resp["retryable"], false, "{what}: {resp}");
    msg
}

/// The VXLAN FDB target of `mac` on `host`, if any.
fn fdb_target(host: &str, mac: &str) -> Option<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("ferry-{host}"),
            "bridge",
            "fdb",
            "show",
            "dev",
            "vx0",
        ])
        .output()
        .expect("bridge fdb show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(mac))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "dst").nth(1))
        .map(str::to_owned)
}

#[test]
fn a_certificate_counts_only_for_its_host_from_its_address() {
    let _lab = Lab::up();
    let (c, k) = cert("h1");
    // h1's certificate from h1: served.
    let ok = peer_request_with("ferry-h1", (&c, &k), "h2", &json!({"op": "list"}), 0);
    assert_eq!(ok["result"], "list", "{ok}");
    // The same certificate used from the client host's address: refused.
    let r = peer_request_with("ferry-client", (&c, &k), "h2", &json!({"op": "list"}), 0);
    let msg = refused(&r, "h1's certificate from another address");
    assert!(
        msg.contains("certificate does not match the address"),
        "{msg}"
    );
    // A valid certificate of the same CA for a host nobody configured: refused.
    let dir = tempfile_dir("h3");
    transfer::pki::issue_host_cert(std::path::Path::new(PKI), "h3", std::path::Path::new(&dir))
        .expect("issuing a certificate for h3");
    let (c3, k3) = (format!("{dir}/h3.pem"), format!("{dir}/h3.key"));
    let r = peer_request_with("ferry-h1", (&c3, &k3), "h2", &json!({"op": "list"}), 0);
    let msg = refused(&r, "a certificate for an unconfigured host");
    assert!(msg.contains("unknown peer"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir(tag: &str) -> String {
    let d = format!("{LAB_DIR}/test-certs-{tag}-{}", std::process::id());
    std::fs::create_dir_all(&d).expect("cert dir");
    d
}

#[test]
fn requests_about_a_job_come_only_from_the_peer_that_prepared_it() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let (_, job) = start_migration("echo", "h2", &["--pause-in-transfer-ms", "4000"]);
    wait_job_state(&job, "transferring");
    // The client host is a configured peer with a valid certificate, but not the job's source.
    for req in [
        json!({"op": "abort", "job": job}),
        json!({"op": "restore", "job": job}),
        json!({"op": "commit", "job": job}),
        json!({"op": "rootfs_round", "job": job}),
    ] {
        let r = peer_request("client", "h2", &req, 0);
        let msg = refused_with(
            &r,
            &format!("{} from the client host", req["op"]),
            "forbidden",
        );
        assert!(msg.contains("belongs to h1"), "{req}: {msg}");
    }
    // The job was not disturbed: the migration completes.
    let r = wait_job(&job);
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(lab.container("echo").expect("echo")["host"], "h2");
    wait_port(&ip);
}

#[test]
fn a_route_comes_only_from_the_host_that_owns_the_container() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let mac = c["mac"].as_str().expect("mac").to_string();
    assert_eq!(fdb_target("h2", &mac).as_deref(), Some("10.231.0.1"));
    // Another peer points the MAC at itself, elsewhere, or nowhere: refused everywhere.
    for (to, host) in [
        ("h2", json!("client")),
        ("h2", json!("h2")),
        ("h2", Value::Null),
        ("h1", json!("client")),
    ] {
        let r = peer_request(
            "client",
            to,
            &json!({"op": "route", "mac": mac, "host": host}),
            0,
        );
        refused(
            &r,
            &format!("a route for {mac} to {host} sent by the client host to {to}"),
        );
    }
    assert_eq!(
        fdb_target("h2", &mac).as_deref(),
        Some("10.231.0.1"),
        "h2 still delivers the MAC to h1"
    );
    // The owner moves it (a migration), and the new owner is the one that may move it next.
    let (code, r) = migrate_json("echo", "h2", &[], Duration::from_secs(60));
    assert_eq!((code, &r["result"]), (0, &json!("completed")), "{r}");
    assert_eq!(fdb_target("h1", &mac).as_deref(), Some("10.231.0.2"));
    let r = peer_request(
        "client",
        "h1",
        &json!({"op": "route", "mac": mac, "host": "client"}),
        0,
    );
    refused(&r, "a route from a non-owner after the move");
    let (code, r) = migrate_json("echo", "h1", &[], Duration::from_secs(60));
    assert_eq!((code, &r["result"]), (0, &json!("completed")), "{r}");
}

/// A host that restarts remembers which peer moved each MAC away: the route back of a
/// rollback is still accepted from that peer after the restart.
#[test]
fn a_restarted_host_remembers_who_moved_a_mac() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let mac = c["mac"].as_str().expect("mac").to_string();
    assert_eq!(fdb_target("client", &mac).as_deref(), Some("10.231.0.1"));
    // h1, the owner, points the MAC at h2 (a migration's redirect).
    let r = peer_request(
        "h1",
        "client",
        &json!({"op": "route", "mac": mac, "host": "h2"}),
        0,
    );
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(fdb_target("client", &mac).as_deref(), Some("10.231.0.2"));
    lab.kill_agent("client");
    ferry_ok(&["lab", "start-agent", "client"]);
    // h1 takes it back (a rollback), though the overlay delivers it to h2 now.
    let r = peer_request(
        "h1",
        "client",
        &json!({"op": "route", "mac": mac, "host": "h1"}),
        0,
    );
    assert_eq!(r["result"], "ok", "the route back after a restart: {r}");
    assert_eq!(fdb_target("client", &mac).as_deref(), Some("10.231.0.1"));
}

#[test]
fn a_replayed_request_changes_nothing() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let spec = json!({
        "name": "echo",
        "ip": c["ip"],
        "mac": c["mac"],
        "prefix_len": 24,
        "args": ["/bin/ferry-workload", "echo", "--port", "7000"],
    });
    let (code, r) = migrate_json("echo", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{r}");
    let job = r["id"].as_str().expect("job id").to_string();
    // The legitimate source replays its own requests of the finished job.
    let prep = peer_request(
        "h1",
        "h2",
        &json!({"op": "prepare", "job": job, "spec": spec}),
        1,
    );
    let msg = refused(&prep, "a replayed prepare");
    assert!(msg.contains("already") || msg.contains("exists"), "{msg}");
    for op in ["restore", "images", "rootfs_round"] {
        let r = peer_request("h1", "h2", &json!({"op": op, "job": job}), 0);
        refused(&r, &format!("a replayed {op}"));
    }
    // A replayed commit is answered (the job is committed) and changes nothing; an abort of a
    // committed job removes nothing.
    let r = peer_request("h1", "h2", &json!({"op": "commit", "job": job}), 0);
    assert_eq!(r["result"], "ok", "{r}");
    let r = peer_request("h1", "h2", &json!({"op": "abort", "job": job}), 0);
    assert_eq!(r["result"], "ok", "{r}");
    let v: Value = serde_json::from_str(&ferry_ok(&["ps", "--json"])).expect("ps");
    let copies: Vec<&Value> = v
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["name"] == "echo")
        .collect();
    assert_eq!(copies.len(), 1, "{v}");
    assert_eq!(copies[0]["host"], "h2");
    assert_eq!(copies[0]["state"], "running");
    wait_port(c["ip"].as_str().expect("ip"));
}

#[test]
fn a_name_or_an_address_is_taken_once_even_at_once() {
    let lab = Lab::up();
    let other = lab.run_echo("h2", "other");
    let spec = |name: &str, ip: &str, k: u32| {
        json!({
            "name": name,
            "ip": ip,
            "mac": format!("02:fe:0a:e8:00:{:02x}", k),
            "prefix_len": 24,
            "args": ["/bin/sh"],
        })
    };
    // An address in use on h2 cannot arrive there under another name.
    let ip = other["ip"].as_str().expect("ip").to_string();
    let k: u32 = ip
        .rsplit('.')
        .next()
        .expect("octet")
        .parse()
        .expect("octet");
    let r = peer_request(
        "h1",
        "h2",
        &json!({"op": "prepare", "job": "h1-dup-1", "spec": spec("dup", &ip, k)}),
        1,
    );
    let msg = refused_with(&r, "a prepare with an address in use", "conflict");
    assert!(msg.contains("exists or is arriving"), "{msg}");
    // Two prepares of one name and address at the same moment: exactly one is accepted.
    let children: Vec<_> = (0..2)
        .map(|i| {
            let req = json!({"op": "prepare", "job": format!("h1-race-{i}"), "spec": spec("twin", "10.232.0.77", 77)});
            std::thread::spawn(move || peer_request("h1", "h2", &req, 1))
        })
        .collect();
    let answers: Vec<Value> = children
        .into_iter()
        .map(|c| c.join().expect("thread"))
        .collect();
    let accepted = answers.iter().filter(|a| a["result"] == "ok").count();
    assert_eq!(
        accepted, 1,
        "exactly one of two racing prepares wins: {answers:?}"
    );
    // The winner's connection is gone: h2 removes what it prepared.
    let clean = eventually(Duration::from_secs(20), || {
        netns_with_prefix("ferry-h2-c-twin").is_empty()
            && dir_entries(&format!("{LAB_DIR}/h2/incoming")).is_empty()
    });
    assert!(clean, "h2 still holds the prepared twin");
}

#[test]
fn a_default_agent_refuses_fault_hooks() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    // h1 as deployed: fault hooks off (the lab turns them on for tests).
    let cfg_path = format!("{LAB_DIR}/h1.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("h1.json")).expect("json");
    cfg.as_object_mut()
        .expect("object")
        .remove("allow_fault_hooks");
    std::fs::write(&cfg_path, cfg.to_string()).expect("writing h1.json");
    let pid = lab.agent_pid("h1").to_string();
    assert!(Command::new("kill")
        .arg(&pid)
        .status()
        .is_ok_and(|s| s.success()));
    assert!(eventually(Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    }));
    ferry_ok(&["lab", "start-agent", "h1"]);
    for hook in [
        ["--pause-in-transfer-ms", "100"],
        ["--pause-in-dump-ms", "100"],
        ["--pause-in-phase-ms", "100"],
    ] {
        let out = ferry(&["migrate", "echo", "--to", "h2", hook[0], hook[1]]);
        assert!(!out.status.success(), "{hook:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("fault hooks are disabled"), "{hook:?}: {err}");
    }
    // Peer requests with hooks are refused by the default agent too.
    for req in [
        json!({"op": "images", "job": "h2-x-1", "corrupt": true}),
        json!({"op": "restore", "job": "h2-x-1", "pause_ms": 100}),
    ] {
        let r = peer_request("h2", "h1", &req, 0);
        let msg = refused(&r, &format!("{req}"));
        assert!(msg.contains("fault hooks are disabled"), "{req}: {msg}");
    }
    // A hook asking for a very long pause is refused even where hooks are allowed.
    let out = ferry(&[
        "migrate",
        "echo",
        "--to",
        "h2",
        "--pause-in-transfer-ms",
        "999999999",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pause at most"), "{err}");
    // The container still moves.
    let (code, r) = migrate_json("echo", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{r}");
}
