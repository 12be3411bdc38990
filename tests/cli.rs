//! `ferry` as an admin and a script use it: `--detach` prints the job id alone, `ferry job
//! --wait` and `ferry migrate` exit 0 when the container moved and 2 when it rolled back,
//! `ferry jobs` lists jobs newest first, Ctrl-C cancels a migration before its commit point
//! (and only says how to follow it after), progress without a terminal is a line per phase
//! and per round, and in a terminal a status line with the round, bytes, rate and ETA.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The state of job `id`.
fn state(id: &str) -> String {
    let out = ferry(&["job", id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["state"].as_str().unwrap_or_default().to_string()
}

/// The newest job's id, once one exists (within 20 s).
fn newest_job() -> String {
    let mut id = String::new();
    let found = eventually(Duration::from_secs(20), || {
        let v: Value = serde_json::from_str(&ferry_ok(&["jobs", "--json"])).unwrap_or_default();
        id = v[0]["id"].as_str().unwrap_or_default().to_string();
        !id.is_empty()
    });
    assert!(found, "no job appeared");
    id
}

/// Runs `ferry migrate ARGS` (stdout and stderr piped, not a terminal), sends it SIGINT once
/// job `id`... reaches one of `states`; returns (exit code, stdout, stderr, job id).
fn interrupt_migration(args: &[&str], states: &[&str]) -> (i32, String, String, String) {
    let before: Value = serde_json::from_str(&ferry_ok(&["jobs", "--json"])).unwrap_or_default();
    let known = before.as_array().map_or(0, Vec::len);
    let child = Command::new(ferry_bin())
        .arg("migrate")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferry migrate");
    let pid = child.id().to_string();
    let mut id = String::new();
    let reached = eventually(Duration::from_secs(30), || {
        let v: Value = serde_json::from_str(&ferry_ok(&["jobs", "--json"])).unwrap_or_default();
        if v.as_array().map_or(0, Vec::len) > known {
            id = v[0]["id"].as_str().unwrap_or_default().to_string();
            states.contains(&v[0]["state"].as_str().unwrap_or_default())
        } else {
            false
        }
    });
    assert!(reached, "job {id:?} never reached {states:?}");
    let sent = Command::new("kill").args(["-INT", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -INT {pid}");
    let t = Instant::now();
    let out = child.wait_with_output().expect("ferry migrate output");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "ferry migrate took {:?} after Ctrl-C",
        t.elapsed()
    );
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
        id,
    )
}

#[test]
fn ids_exit_codes_and_the_list_of_jobs_serve_scripts() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");

    // --detach prints the id alone, which `ferry job` takes.
    let out = ferry_ok(&["migrate", "echo", "--to", "h2", "--detach"]);
    let first = out.trim().to_string();
    assert_eq!(out, format!("{first}\n"), "the id alone: {out:?}");
    let waited = ferry(&["job", &first, "--wait"]);
    assert_eq!(waited.status.code(), Some(0), "{}", text(&waited.stderr));
    let summary = text(&waited.stdout);
    assert!(
        summary.contains("echo moved from h1 to h2") && summary.contains("phases: preflight"),
        "{summary}"
    );
    let shown = ferry_ok(&["job", &first]);
    assert!(shown.contains("echo moved from h1 to h2"), "{shown}");
    assert_runs_on(&lab, "h2", "echo");

    // A migration that rolls back: 2 from `migrate` and from `job --wait`, and the summary
    // says where the container stays.
    let rolled = ferry(&["migrate", "echo", "--to", "h1", "--corrupt-images"]);
    assert_eq!(rolled.status.code(), Some(2), "{}", text(&rolled.stderr));
    let said = text(&rolled.stdout);
    assert!(
        said.contains("NOT moved: rolled back, it stays on h2"),
        "{said}"
    );
    let second = newest_job();
    assert_ne!(second, first);
    let again = ferry(&["job", &second, "--wait"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again.stdout));
    assert_runs_on(&lab, "h2", "echo");

    // Newest first, across hosts.
    let third = ferry_ok(&["migrate", "echo", "--to", "h1", "--detach"])
        .trim()
        .to_string();
    assert_eq!(ferry(&["job", &third, "--wait"]).status.code(), Some(0));
    let v: Value = serde_json::from_str(&ferry_ok(&["jobs", "--json"])).expect("jobs --json");
    let ids: Vec<&str> = v
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(ids, [&third, &second, &first], "newest first");
    let table = ferry_ok(&["jobs"]);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("JOB") && rows.len() == 4, "{table}");
    assert!(
        rows[1].starts_with(&third) && rows[1].contains("done"),
        "{table}"
    );
    assert!(rows[2].contains("rolled_back"), "{table}");

    // A host that runs no containers is no target; an unknown one neither: exit 1.
    let refused = ferry(&["migrate", "echo", "--to", "client"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("does not run containers"),
        "{}",
        text(&refused.stderr)
    );
    assert_runs_on(&lab, "h1", "echo");
}

#[test]
fn ctrl_c_cancels_before_the_commit_point_and_only_lets_go_after_it() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");

    // Before the commit point: the job is cancelled, rolls back, and the command reports it.
    let (code, out, err, id) = interrupt_migration(
        &[
            "echo",
            "--to",
            "h2",
            "--pause-in-phase",
            "prepare",
            "--pause-in-phase-ms",
            "20000",
        ],
        &["preparing"],
    );
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!("cancelling job {id}")) && err.contains("stays on h1"),
        "{err}"
    );
    assert!(
        out.contains("NOT moved: rolled back, it stays on h1"),
        "{out}"
    );
    assert!(
        out.contains("never frozen"),
        "a job cancelled in prepare never froze: {out}"
    );
    assert_eq!(state(&id), "rolled_back");
    assert_runs_on(&lab, "h1", "echo");

    // After it: the command lets go (130) and says how to follow; the job completes.
    let (code, _, err, id) = interrupt_migration(
        &["echo", "--to", "h2", "--pause-after-commit-ms", "3000"],
        &["committing", "cleaning_up"],
    );
    assert_eq!(code, 130, "{err}");
    assert!(
        err.contains("cannot be cancelled") && err.contains(&format!("ferry job {id} --wait")),
        "{err}"
    );
    let report = wait_job(&id);
    assert_eq!(report["result"], "completed", "{report}");
    assert_runs_on(&lab, "h2", "echo");
}

#[test]
fn progress_without_a_terminal_is_a_line_per_phase_and_per_round() {
    let lab = Lab::up();
    lab.run_mem("h1", "mem", 64, 8);
    let out = ferry(&["migrate", "mem", "--to", "h2", "--pre-copy"]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}\n{}", text(&out.stderr));
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines[0].starts_with("migrating mem from h1 to h2 (job "),
        "{said}"
    );
    for phase in [
        "preflight",
        "prepare",
        "redirect",
        "dump",
        "transfer",
        "restore",
        "commit",
        "cleanup",
    ] {
        let n = lines
            .iter()
            .filter(|l| l.starts_with(&format!("  ok   {phase} ")))
            .count();
        assert_eq!(n, 1, "one line for {phase}: {said}");
    }
    let rounds: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("  ok   pre_copy round "))
        .collect();
    assert!(!rounds.is_empty(), "{said}");
    for r in &rounds {
        for part in [
            "/s)",
            "dirty again",
            "expected downtime",
            "(budget 50 ms)",
            "->",
        ] {
            assert!(r.contains(part), "{r:?} lacks {part:?}");
        }
    }
    assert!(
        rounds.last().is_some_and(|r| r.contains("freeze (")),
        "{said}"
    );
    let summary = format!("pre-copy: {} round", rounds.len());
    assert!(
        said.contains(&summary) && said.contains("stopped: "),
        "{said}"
    );
    assert!(
        said.contains("  frozen ") && said.contains("  phases: "),
        "{said}"
    );
    assert!(
        !said.contains("PreCopying") && !said.contains("precopy "),
        "{said}"
    );
    assert_runs_on(&lab, "h2", "mem");
}

#[test]
fn in_a_terminal_a_status_line_shows_round_bytes_rate_and_eta() {
    let lab = Lab::up();
    lab.run_mem("h1", "mem", 64, 8);
    let _slow = Shaped::new("100mbit");
    // `script` runs the command on a pseudo-terminal and copies what it drew (util-linux,
    // part of every Debian).
    let cmd = format!("{} migrate mem --to h2 --pre-copy", ferry_bin().display());
    let out = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux)");
    let drawn = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{drawn}\n{}", text(&out.stderr));
    // The status line is drawn again and again in place: split at carriage returns and
    // line clears to read each drawing.
    let frames: Vec<&str> = drawn
        .split(['\r', '\n'])
        .flat_map(|f| f.split("\x1b[2K"))
        .collect();
    let status: Vec<&&str> = frames
        .iter()
        .filter(|f| f.contains("pre_copy round 1: ") && f.contains(" sent, "))
        .collect();
    assert!(!status.is_empty(), "no status line of round 1: {drawn:?}");
    assert!(
        status
            .iter()
            .any(|f| f.contains(" of ") && f.contains("/s") && f.contains("ETA")),
        "no status line with bytes of the round, rate and ETA: {status:?}"
    );
    // A phase bar that counts phases overshot past its end (`9/8`); there is none.
    let overshoot = frames.iter().find(|f| {
        f.split_whitespace().any(|w| {
            w.split_once('/').is_some_and(
                |(a, b)| matches!((a.parse::<u32>(), b.parse::<u32>()), (Ok(x), Ok(y)) if x > y),
            )
        })
    });
    assert!(overshoot.is_none(), "{overshoot:?}");
    for part in [
        "  ok   pre_copy round 1 ",
        "  ok   dump ",
        "pre-copy: ",
        "stopped: ",
    ] {
        assert!(drawn.contains(part), "{part:?} not drawn: {drawn:?}");
    }
    assert_runs_on(&lab, "h2", "mem");
}

#[test]
fn stop_start_and_exec_act_where_the_container_runs() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();

    // exec: the command's output, error output and exit code are the CLI's own.
    let out = ferry(&[
        "exec",
        "echo",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    let out = ferry_ok(&[
        "exec",
        "echo",
        "-e",
        "GREETING=hi",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $GREETING; pwd",
    ]);
    assert_eq!(out, "hi\n/tmp\n");
    let t = Instant::now();
    let out = ferry(&["exec", "echo", "--timeout-s", "1", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());

    // stop: the container stays listed, stopped; it neither migrates nor runs commands.
    let said = ferry_ok(&["stop", "echo", "--timeout-s", "2"]);
    assert!(said.contains("echo stopped on h1"), "{said}");
    assert_eq!(lab.container("echo").expect("listed")["state"], "stopped");
    let refused = ferry(&["migrate", "echo", "--to", "h2"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("is stopped"),
        "{}",
        text(&refused.stderr)
    );
    let refused = ferry(&["exec", "echo", "--", "true"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("is stopped"));

    // start: the same container, address and command again; it migrates as before.
    let said = ferry_ok(&["start", "echo"]);
    assert!(said.contains("echo running on h1 with IP"), "{said}");
    wait_port(&ip);
    assert_eq!(ask_workload(&ip, "again"), "1 again");
    let (code, report) = migrate_json("echo", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{report}");
    assert_runs_on(&lab, "h2", "echo");
    let cmdline = ferry_ok(&["exec", "echo", "--", "cat", "/proc/1/cmdline"]);
    assert!(cmdline.contains("ferry-workload"), "{cmdline:?}");

    let unknown = ferry(&["stop", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown.stderr).contains("unknown container \"nobody\""));
}

#[test]
fn at_the_round_limit_the_migration_does_what_at_round_limit_says() {
    let lab = Lab::up();
    lab.run_mem("h1", "mem", 64, 32);
    let out = ferry(&[
        "migrate",
        "mem",
        "--to",
        "h2",
        "--pre-copy",
        "--max-rounds",
        "1",
        "--downtime-budget-ms",
        "0.01",
        "--at-round-limit",
        "abort",
    ]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{said}\n{}", text(&out.stderr));
    assert!(
        said.contains("-> abort: pre-copy did not converge in 1 rounds"),
        "{said}"
    );
    assert!(
        said.contains("NOT moved: rolled back, it stays on h1"),
        "{said}"
    );
    assert!(said.contains("never frozen"), "{said}");
    assert_runs_on(&lab, "h1", "mem");
    let bad = ferry(&["migrate", "mem", "--to", "h2", "--at-round-limit", "abort"]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "refused without --pre-copy: an error, not a rollback"
    );
    let bad = ferry(&[
        "migrate",
        "mem",
        "--to",
        "h2",
        "--pre-copy",
        "--at-round-limit",
        "auto-converge",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "a value it does not list is refused: an error, not a rollback"
    );
    assert_runs_on(&lab, "h1", "mem");
}
