//! A container's output as `ferry logs` and `GET /v1/containers/{name}/logs` show it: every
//! line it wrote to stdout and stderr, once and in order, through a stop-and-copy move, a
//! pre-copy move and its agent's death (its console shim is not the agent); `--tail`,
//! `--timestamps`, `--follow` (which ends when the container leaves), and a peer that sends
//! logs for a job it did not commit.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::{json, Value};

/// `ferry logs NAME ARGS`: (stdout, stderr).
fn logs(name: &str, args: &[&str]) -> (String, String) {
    let mut a = vec!["logs", name];
    a.extend_from_slice(args);
    let out = ferry(&a);
    assert!(
        out.status.success(),
        "ferry logs {name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The counters of `PREFIX K` lines, checked to run 0, 1, 2, ... without a gap or a repeat;
/// returns how many.
fn contiguous(text: &str, prefix: &str) -> u64 {
    let mut next = 0u64;
    for line in text.lines() {
        let k: u64 = line
            .strip_prefix(prefix)
            .and_then(|r| r.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?} (wanted {prefix:?} K)"));
        assert_eq!(k, next, "{prefix}: line {k} where {next} was due");
        next += 1;
    }
    next
}

/// Lines of stdout and stderr so far, each checked contiguous; (stdout lines, stderr lines).
fn counted(name: &str) -> (u64, u64) {
    let (out, err) = logs(name, &[]);
    (contiguous(&out, "out "), contiguous(&err, "err "))
}

/// Waits until the container has written more lines than `n` on stdout.
fn grows_past(name: &str, n: u64) -> u64 {
    let mut seen = 0;
    let grew = eventually(Duration::from_secs(10), || {
        seen = counted(name).0;
        seen > n + 20
    });
    assert!(grew, "{name} stopped writing: {seen} lines, {n} before");
    seen
}

#[test]
fn every_line_a_container_writes_is_kept_once_through_moves_and_agent_restarts() {
    let lab = Lab::up();
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "talk",
        "--",
        "/bin/ferry-workload",
        "chatter",
        "--interval-ms",
        "5",
    ]);
    let n = grows_past("talk", 0);

    // Stop-and-copy, then pre-copy back: nothing lost or doubled, the container writes on.
    let (code, report) = migrate_json("talk", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    assert_runs_on(&lab, "h2", "talk");
    let n = grows_past("talk", n);
    let (code, report) = migrate_json("talk", "h1", &["--pre-copy"], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    assert_runs_on(&lab, "h1", "talk");
    let n = grows_past("talk", n);
    assert!(
        !dir_entries(&format!("{LAB_DIR}/h2/console")).contains(&"talk".to_string()),
        "h2 kept the logs of a container that left: {:?}",
        dir_entries(&format!("{LAB_DIR}/h2/console"))
    );

    // The agent dies: the container's output still goes to its log meanwhile.
    lab.kill_agent("h1");
    std::thread::sleep(Duration::from_millis(1500));
    ferry_ok(&["lab", "start-agent", "h1"]);
    let after = grows_past("talk", n);
    // 1.5 s at a line per 5 ms: a shim that died with the agent would leave a gap or an end.
    assert!(
        after >= n + 150,
        "{after} lines after the restart, {n} before"
    );
    let (out, err) = counted("talk");
    assert!(
        out.abs_diff(err) <= 1,
        "stdout has {out} lines, stderr {err}"
    );

    // --tail counts lines of both streams; --timestamps prefixes RFC 3339 times.
    let (o, e) = logs("talk", &["--tail", "4"]);
    assert_eq!(o.lines().count() + e.lines().count(), 4, "{o}{e}");
    let (o, _) = logs("talk", &["--tail", "2", "--timestamps"]);
    for line in o.lines() {
        let (time, rest) = line.split_once(' ').expect("time and text");
        assert!(
            time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{line:?}"
        );
        assert!(rest.starts_with("out "), "{line:?}");
    }

    // The API: newline-delimited records; a wrong query is a JSON error.
    let api = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(format!("{LAB_DIR}/h1.sock"))
            .arg(format!("http://agent{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("status line");
        (code.to_string(), body.to_string())
    };
    let (code, body) = api("/v1/containers/talk/logs?tail=3");
    assert_eq!(code, "200", "{body}");
    let recs: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    assert_eq!(recs.len(), 3, "{body}");
    for r in &recs {
        assert!(r["stream"] == "stdout" || r["stream"] == "stderr", "{r}");
        assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    }
    let (code, body) = api("/v1/containers/talk/logs?tails=3");
    assert_eq!(code, "400", "{body}");
    assert!(
        body.contains("\"code\":\"bad_request\"") && body.contains("tails"),
        "{body}"
    );
    let (code, body) = api("/v1/containers/nobody/logs");
    assert_eq!(code, "404", "{body}");

    // --follow prints new lines as they come and ends by itself once the container leaves.
    let follower = Command::new(ferry_bin())
        .args(["logs", "talk", "--follow", "--tail", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry logs --follow");
    std::thread::sleep(Duration::from_secs(1));
    let (code, report) = migrate_json("talk", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    let t = Instant::now();
    let out = follower.wait_with_output().expect("follower's output");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the follower ran on {:?} after the container left",
        t.elapsed()
    );
    assert!(out.status.success(), "follower: {:?}", out.status);
    let followed: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.strip_prefix("out ").expect("out K").parse().expect("K"))
        .collect();
    assert!(followed.len() > 100, "followed {} lines", followed.len());
    for w in followed.windows(2) {
        assert_eq!(w[1], w[0] + 1, "followed lines skip or repeat: {w:?}");
    }
    grows_past("talk", n);

    // Removing the container removes its logs.
    ferry_ok(&["rm", "talk"]);
    assert!(!std::path::Path::new(&format!("{LAB_DIR}/h2/console/talk")).exists());
    let gone = ferry(&["logs", "talk"]);
    assert_eq!(gone.status.code(), Some(1));
}

#[test]
fn a_peer_cannot_write_logs_it_did_not_bring() {
    let lab = Lab::up();
    lab.run_echo("h2", "victim");
    // h1 claims a job that never ran: refused, and nothing is written.
    let req = json!({"op": "logs", "job": "h1-0-1", "name": "victim", "bytes": 5});
    let answer = peer_request_payload("h1", "h2", &req, b"hello");
    assert_eq!(answer["code"], "forbidden", "{answer}");
    // More than a container's history may hold: refused before anything is read.
    let req = json!({"op": "logs", "job": "h1-0-1", "name": "victim", "bytes": 1u64 << 40});
    let answer = peer_request_payload("h1", "h2", &req, b"");
    assert_eq!(answer["code"], "bad_request", "{answer}");
    let (out, err) = logs("victim", &[]);
    assert!(
        !out.contains("hello") && !err.contains("hello"),
        "{out}{err}"
    );
}
