//! Orchestrator hooks: the source agent POSTs the job's JSON to a webhook at `pre_migrate`
//! (which may veto the migration, and does when it refuses, fails or does not answer in
//! time), `committed`, `rolled_back` and `finished`. The receiver here runs in the lab's
//! client namespace, a host on the underlay like an orchestrator's machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

/// Calls a receiver got: (path, JSON body).
type Calls = Arc<Mutex<Vec<(String, Value)>>>;

/// A webhook receiver listening in the client namespace on its underlay address, answering
/// `/veto` with a refusal, `/slow` after 7 s, `/fail` with 500 and anything else with 200 `{}`,
/// for at most 60 s and 100 calls. Returns its base URL and the calls it got.
fn receiver() -> (String, Calls) {
    let listener = std::thread::spawn(|| {
        let ns = std::fs::File::open("/run/netns/ferry-client").expect("client namespace");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpListener::bind("10.231.0.250:0").expect("bind in the client namespace")
    })
    .join()
    .expect("listener thread");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let calls: Calls = Arc::default();
    let seen = Arc::clone(&calls);
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while Instant::now() < end && served < 100 {
            let Ok((sock, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            served += 1;
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let _ = sock.set_nonblocking(false);
                let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(sock.try_clone().expect("clone"));
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len.min(1 << 20)];
                let _ = r.read_exact(&mut body);
                seen.lock().unwrap().push((
                    path.clone(),
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                ));
                let (status, answer) = match path.as_str() {
                    "/veto" => ("200 OK", r#"{"allow":false,"reason":"maintenance window"}"#),
                    "/fail" => ("500 Internal Server Error", "broken"),
                    "/slow" => {
                        std::thread::sleep(Duration::from_secs(7));
                        ("200 OK", "{}")
                    }
                    _ => ("200 OK", "{}"),
                };
                let mut w = sock;
                let _ = write!(
                    w,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            });
        }
    });
    (url, calls)
}

/// A command's stdout and stderr, as one text.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn events(calls: &Calls, path: &str) -> Vec<String> {
    calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, v)| v["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn a_pre_migrate_hook_vetoes_and_every_hook_is_called_with_the_job() {
    // In a lab whose state is in etcd, as a real cluster's would be.
    let lab = Lab::up_with(&["--etcd"]);
    lab.run_echo("h1", "echo");
    let (url, calls) = receiver();

    // A veto: nothing moves, the CLI says why (exit 2: rolled back).
    let out = ferry(&[
        "migrate",
        "echo",
        "--to",
        "h2",
        "--hook",
        &format!("{url}/veto"),
    ]);
    let said = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("vetoed by the pre_migrate hook") && said.contains("maintenance window"),
        "{said}"
    );
    assert_runs_on(&lab, "h1", "echo");
    assert_clean_host("h2", "echo");
    assert_eq!(
        events(&calls, "/veto"),
        ["pre_migrate", "rolled_back", "finished"]
    );

    // A failing or silent pre_migrate hook vetoes too.
    for (path, says) in [("/fail", "answered 500"), ("/slow", "no answer within")] {
        let out = ferry(&[
            "migrate",
            "echo",
            "--to",
            "h2",
            "--hook",
            &format!("{url}{path}"),
        ]);
        let err = output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{path}: {err}");
        assert_runs_on(&lab, "h1", "echo");
    }

    // Every hook of a migration that moves, in order, each with the job.
    let (_, id) = start_migration("echo", "h2", &["--hook", &format!("{url}/record")]);
    let report = wait_job(&id);
    assert_eq!(report["result"], "completed", "{report}");
    assert_runs_on(&lab, "h2", "echo");
    let got: Vec<(String, Value)> = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == "/record")
        .cloned()
        .collect();
    let names: Vec<&str> = got
        .iter()
        .map(|(_, v)| v["event"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["pre_migrate", "committed", "finished"], "{got:?}");
    for (_, v) in &got {
        assert_eq!(v["host"], "h1", "{v}");
        assert_eq!(v["job"]["id"], id.as_str(), "{v}");
        assert_eq!(v["job"]["report"]["container"], "echo", "{v}");
    }
    assert_eq!(
        got[2].1["job"]["report"]["result"], "completed",
        "{}",
        got[2].1
    );
    assert!(got[2].1["job"]["report"]["frozen_ms"]
        .as_f64()
        .is_some_and(|f| f > 0.0));

    // A hook the agent cannot call is refused with the request.
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(format!("{LAB_DIR}/h2.sock"))
        .args([
            "-d",
            r#"{"to":"h1","hooks":[{"url":"https://example.invalid/x"}]}"#,
            "http://agent/v1/containers/echo/migrate",
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.ends_with("\n400") && text.contains("only http://"),
        "{text}"
    );
}
