//! The agent's HTTP API as an orchestrator meets it, through `curl` on the agent's Unix
//! socket: the documented example works as written, and every failure (a body that is not
//! JSON, a field that does not exist or does not parse, an address off the overlay, an
//! unknown route, a wrong method, an oversized body) is `{"code", "message"}` JSON with the
//! documented status, and changes nothing.

use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// An answer of the API: status, content type and body.
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts an error answer: `status`, JSON `{"code": code, "message"}` whose message
    /// contains every one of `says`.
    fn error(&self, status: u16, code: &str, says: &[&str]) {
        assert_eq!(self.status, status, "status of {:?}", self.body);
        assert!(
            self.content_type.starts_with("application/json"),
            "content type {:?} of {:?}",
            self.content_type,
            self.body
        );
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        let m = v["message"].as_str().expect("message");
        for s in says {
            assert!(m.contains(s), "{m:?} does not say {s:?}");
        }
        assert_eq!(
            v.as_object().map(|o| o.len()),
            Some(2),
            "only code and message: {v}"
        );
    }
}

/// `curl --unix-socket <host's socket> ARGS http://agent<path>`.
fn curl(host: &str, args: &[&str], path: &str) -> Answer {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(format!("{LAB_DIR}/{host}.sock"))
        .args(["-w", "\n%{http_code}\n%{content_type}"])
        .args(args)
        .arg(format!("http://agent{path}"))
        .output()
        .expect("curl (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "curl {args:?} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.rsplitn(3, '\n');
    let content_type = lines.next().unwrap_or_default().to_string();
    let status = lines.next().unwrap_or_default().parse().unwrap_or(0);
    let body = lines.next().unwrap_or_default().to_string();
    Answer {
        status,
        content_type,
        body,
    }
}

fn post(host: &str, path: &str, body: &str) -> Answer {
    curl(host, &["-X", "POST", "-d", body], path)
}

fn jobs(host: &str) -> Vec<Value> {
    let a = curl(host, &[], "/v1/jobs");
    assert_eq!(a.status, 200, "{}", a.body);
    a.json().as_array().expect("jobs").clone()
}

fn container_names(host: &str) -> Vec<String> {
    let a = curl(host, &[], "/v1/containers");
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()
        .as_array()
        .expect("containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn every_failure_is_code_and_message_json_and_changes_nothing() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");

    // Bodies that are not JSON, or JSON of the wrong shape.
    post("h1", "/v1/containers", "{bad").error(400, "invalid_json", &["not valid JSON"]);
    curl("h1", &["-X", "POST"], "/v1/containers").error(400, "invalid_json", &["empty"]);
    post(
        "h1",
        "/v1/containers/echo/migrate",
        r#"{"to":"h2","mod":"pre-copy"}"#,
    )
    .error(400, "bad_request", &["unknown field `mod`"]);
    post(
        "h1",
        "/v1/containers/echo/migrate",
        r#"{"to":"h2","mode":"fast"}"#,
    )
    .error(400, "bad_request", &["`mode`", "fast"]);
    post(
        "h1",
        "/v1/containers/echo/migrate",
        r#"{"to":"h2","faults":{"pause_in_dump":1}}"#,
    )
    .error(400, "bad_request", &["pause_in_dump"]);
    post(
        "h1",
        "/v1/containers",
        r#"{"name":"x","args":["sleep","9"],"memory":"1g"}"#,
    )
    .error(400, "bad_request", &["unknown field `memory`"]);
    post(
        "h1",
        "/v1/containers",
        r#"{"name":"x","ip":"10.232.0.300","args":["sleep","9"]}"#,
    )
    .error(400, "bad_request", &["`ip`"]);
    post(
        "h1",
        "/v1/images",
        r#"{"name":"x","path":"/tmp","ref":"y"}"#,
    )
    .error(400, "bad_request", &["unknown field `ref`"]);
    curl("h1", &[], "/v1/containers/echo/dirty-rate?ms=soon").error(400, "bad_request", &["ms"]);
    assert!(jobs("h1").is_empty(), "a refused request started a job");

    // Addresses off the overlay, its network and broadcast addresses, a host's address.
    for (ip, says) in [
        ("10.232.0.0", "network address"),
        ("10.232.0.255", "broadcast address"),
        ("10.99.0.5", "outside the overlay 10.232.0.0/24"),
        ("10.232.1.6", "outside the overlay 10.232.0.0/24"),
        ("10.232.0.250", "belongs to a host"),
    ] {
        let body = format!(r#"{{"name":"off","ip":"{ip}","args":["sleep","99"]}}"#);
        post("h1", "/v1/containers", &body).error(400, "bad_request", &[ip, says]);
    }
    assert_eq!(container_names("h1"), ["echo"], "nothing was created");

    // Routes and methods that do not exist, bodies too large.
    curl("h1", &[], "/v1/nothing").error(404, "not_found", &["/v1/nothing"]);
    curl("h1", &[], "/v2/containers").error(404, "not_found", &["/v2/containers"]);
    curl("h1", &["-X", "PUT"], "/v1/host").error(405, "method_not_allowed", &["PUT", "GET"]);
    curl("h1", &["-X", "GET"], "/v1/containers/echo/migrate").error(
        405,
        "method_not_allowed",
        &["POST"],
    );
    let big = std::env::temp_dir().join("ferry-api-big-body.json");
    std::fs::write(&big, vec![b' '; 2 << 20]).expect("writing a large body");
    curl(
        "h1",
        &[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", big.display()),
        ],
        "/v1/containers",
    )
    .error(413, "body_too_large", &["1048576"]);
    let _ = std::fs::remove_file(&big);

    // Unknown names, and a host that runs no containers.
    curl("h1", &[], "/v1/containers/nobody").error(404, "unknown_container", &["nobody"]);
    curl("h1", &[], "/v1/jobs/h1-none-1").error(404, "unknown_job", &["h1-none-1"]);
    let host = curl("h1", &[], "/v1/host").json();
    assert_eq!(host["targets"], serde_json::json!(["h2"]), "{host}");
    post("h1", "/v1/containers/echo/migrate", r#"{"to":"client"}"#).error(
        422,
        "unknown_host",
        &["does not run containers", "h2"],
    );
    post("h1", "/v1/containers/echo/migrate", r#"{"to":"h9"}"#).error(
        422,
        "unknown_host",
        &["h9", "h2"],
    );
    assert!(jobs("h1").is_empty(), "a refused request started a job");
    assert_runs_on(&lab, "h1", "echo");
}

#[test]
fn the_documented_examples_work_as_written() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    // docs/api.md, "Example", letter for letter but for the job id.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md"))
        .expect("docs/api.md");
    let examples: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("curl --unix-socket "))
        .collect();
    assert!(examples.len() >= 2, "docs/api.md has its curl examples");
    let mut id = String::new();
    for example in examples {
        let cmd = example.replace("<id>", &id);
        let out = Command::new("sh")
            .args(["-c", &format!("{cmd} -sS -w '\\n%{{http_code}}'")])
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or_default();
        assert!(status.starts_with('2'), "`{cmd}` answered {status}: {body}");
        if let Some(j) = body
            .lines()
            .next()
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v["id"].as_str().map(String::from))
        {
            id = j;
        }
        if cmd.contains("/events") {
            let last: Value = serde_json::from_str(body.lines().last().unwrap_or_default())
                .expect("an event per line");
            assert_eq!(last["event"], "finished", "{last}");
            assert_eq!(last["report"]["result"], "completed", "{last}");
        }
    }
    assert!(!id.is_empty(), "the migrate example answered a job");
    assert_runs_on(&lab, "h2", "echo");
    // Newest first.
    std::thread::sleep(Duration::from_millis(20));
    let (_, second) = start_migration("echo", "h1", &[]);
    wait_job(&second);
    let (_, third) = start_migration("echo", "h2", &[]);
    wait_job(&third);
    let listed: Vec<String> = jobs("h2")
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed, [second], "h2's jobs");
    let on_h1: Vec<String> = jobs("h1")
        .iter()
        .map(|j| j["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(on_h1, [third, id], "h1's jobs, newest first");
}
