//! Ferry from a machine away from its hosts: the CLI, run in the lab's client namespace with
//! the cluster file `lab up` writes (an operator's certificate, each agent's API address),
//! reaches every agent over TCP with mutual TLS and runs, lists, moves and reads a container;
//! an orchestrator's plain `curl` does the same; a host's certificate is answered 403, and a
//! certificate of another CA, or none, never gets past the handshake. An agent refuses a
//! config it cannot run with (a misspelt field, overlay devices that are missing or wrong) at
//! start, naming the field.

use std::process::{Command, Output};

use ferry_tests::*;
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ferry --cluster FILE ARGS` run inside the lab's client namespace.
fn remote(cluster: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", "ferry-client"])
        .arg(ferry_bin())
        .args(["--cluster", cluster])
        .args(args)
        .output()
        .expect("ip netns exec ferry-client ferry")
}

fn remote_ok(cluster: &str, args: &[&str]) -> String {
    let out = remote(cluster, args);
    assert!(
        out.status.success(),
        "ferry --cluster {cluster} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `curl` from the client namespace to h1's API, with `tls` curl options; (exit code, body).
fn curl_h1(cluster: &Value, tls: &[&str], path: &str) -> (i32, String) {
    let api = cluster["hosts"][0]["api"].as_str().expect("h1's api");
    let (ip, port) = api.rsplit_once(':').expect("address");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ferry-client",
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .args(tls)
        .args(["--resolve", &format!("h1:{port}:{ip}")])
        .arg(format!("https://h1:{port}{path}"))
        .output()
        .expect("curl");
    (out.status.code().unwrap_or(-1), text(&out.stdout))
}

#[test]
fn an_operator_away_from_the_hosts_runs_moves_and_reads_containers_over_mutual_tls() {
    let lab = Lab::up();
    let file = format!("{LAB_DIR}/cluster.json");
    let cluster: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("lab up writes cluster.json"))
            .expect("cluster.json");
    assert_eq!(cluster["hosts"][0]["name"], "h1", "{cluster}");

    let said = remote_ok(
        &file,
        &[
            "run",
            "--on",
            "h1",
            "--name",
            "far",
            "--",
            "/bin/ferry-workload",
            "chatter",
        ],
    );
    assert!(said.contains("far running on h1"), "{said}");
    let ps: Value = serde_json::from_str(&remote_ok(&file, &["ps", "--json"])).expect("ps --json");
    assert!(
        ps.as_array()
            .is_some_and(|a| a.iter().any(|c| c["name"] == "far" && c["host"] == "h1")),
        "{ps}"
    );
    let moved = remote_ok(&file, &["migrate", "far", "--to", "h2"]);
    assert!(moved.contains("far moved from h1 to h2"), "{moved}");
    assert_runs_on(&lab, "h2", "far");
    let lines = remote_ok(&file, &["logs", "far", "--tail", "3"]);
    assert!(lines.lines().count() >= 1, "{lines:?}");

    // An orchestrator in any language: HTTPS with the operator's certificate.
    let pki = format!("{LAB_DIR}/pki");
    let ca = format!("{pki}/ca.pem");
    let (op_cert, op_key) = (format!("{pki}/operator.pem"), format!("{pki}/operator.key"));
    let (code, body) = curl_h1(
        &cluster,
        &["--cacert", &ca, "--cert", &op_cert, "--key", &op_key],
        "/v1/host",
    );
    assert_eq!(code, 0, "{body}");
    let host: Value = serde_json::from_str(&body).expect("host JSON");
    assert_eq!(host["host"], "h1", "{host}");

    // Another host's certificate is the CA's too, but not an operator's: 403.
    let (h3_cert, h3_key) = (format!("{pki}/h2.pem"), format!("{pki}/h2.key"));
    let (code, body) = curl_h1(
        &cluster,
        &[
            "--cacert",
            &ca,
            "--cert",
            &h3_cert,
            "--key",
            &h3_key,
            "-w",
            "\n%{http_code}",
        ],
        "/v1/containers",
    );
    assert_eq!(code, 0, "{body}");
    let (json, status) = body.rsplit_once('\n').expect("status");
    assert_eq!(status, "403", "{body}");
    let err: Value = serde_json::from_str(json).expect("error JSON");
    assert_eq!(err["code"], "forbidden", "{err}");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("ferry pki operator")),
        "{err}"
    );
    let host_as_operator = format!("{LAB_DIR}/cluster-h2.json");
    let mut c = cluster.clone();
    c["cert"] = h3_cert.clone().into();
    c["key"] = h3_key.clone().into();
    std::fs::write(&host_as_operator, c.to_string()).expect("cluster file");
    let refused = remote(&host_as_operator, &["ps"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("not an operator's"),
        "{}",
        text(&refused.stderr)
    );

    // No certificate, or one of another CA: the handshake fails; nothing is served.
    let (code, body) = curl_h1(&cluster, &["--cacert", &ca], "/v1/containers");
    assert_ne!(code, 0, "served without a client certificate: {body}");
    let other = format!("{LAB_DIR}/other-pki");
    let _ = std::fs::remove_dir_all(&other);
    ferry_ok(&["pki", "init", "--dir", &other, "--name", "another CA"]);
    ferry_ok(&["pki", "operator", "mallory", "--dir", &other]);
    let (code, body) = curl_h1(
        &cluster,
        &[
            "--cacert",
            &ca,
            "--cert",
            &format!("{other}/mallory.pem"),
            "--key",
            &format!("{other}/mallory.key"),
        ],
        "/v1/containers",
    );
    assert_ne!(code, 0, "served a certificate of another CA: {body}");
    let mut c = cluster.clone();
    c["cert"] = format!("{other}/mallory.pem").into();
    c["key"] = format!("{other}/mallory.key").into();
    let foreign = format!("{LAB_DIR}/cluster-other.json");
    std::fs::write(&foreign, c.to_string()).expect("cluster file");
    let refused = remote(&foreign, &["ps"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("TLS"),
        "{}",
        text(&refused.stderr)
    );
    assert_runs_on(&lab, "h2", "far");
}

/// `ferry agent --config` with h1's lab config changed by `edit`: (exit code, stderr).
fn agent_with(edit: impl FnOnce(&mut Value)) -> (i32, String) {
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{LAB_DIR}/h1.json")).expect("h1's config"),
    )
    .expect("JSON");
    edit(&mut cfg);
    let path = format!("{LAB_DIR}/h1-edited.json");
    std::fs::write(&path, cfg.to_string()).expect("writing the config");
    let out = Command::new(ferry_bin())
        .args(["agent", "--config", &path])
        .output()
        .expect("ferry agent");
    (out.status.code().unwrap_or(-1), text(&out.stderr))
}

#[test]
fn an_agent_refuses_a_config_it_cannot_run_with_and_says_which_field() {
    let _lab = Lab::up();
    // A misspelt field is not silently ignored.
    let (code, err) = agent_with(|c| {
        c["undelay_ip"] = c["underlay_ip"].clone();
    });
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown field `undelay_ip`"), "{err}");
    // The overlay devices are checked at start, not at the first container.
    let (code, err) = agent_with(|c| c["vxlan"] = "vx9".into());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("\"vx9\" (config `vxlan`) does not exist") && err.contains("docs/deploy.md"),
        "{err}"
    );
    let (code, err) = agent_with(|c| c["bridge"] = "vx0".into());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a bridge"), "{err}");
    let (code, err) = agent_with(|c| c["underlay_ip"] = "10.231.0.77".into());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("sends from \"10.231.0.1\""), "{err}");
}
