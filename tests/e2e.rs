//! End-to-end: real runc, CRIU, namespaces, VXLAN, QUIC with mutual TLS. Root required.

use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

#[test]
fn two_migrations_keep_the_connection_the_address_and_the_memory() {
    let lab = Lab::up();
    let before = lab.run_echo("h1", "echo");
    let ip = before["ip"].as_str().unwrap().to_string();
    let probe = Probe::start(&ip, "two");
    let mut reports = vec![];
    for to in ["h2", "h1"] {
        let out = ferry_ok(&["migrate", "echo", "--to", to, "--json"]);
        let r: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["result"], "completed", "{r}");
        assert_eq!(r["committed"], true);
        assert!(r["frozen_ms"].as_f64().unwrap() > 0.0);
        assert!(r["bytes_sent"].as_u64().unwrap() > 0);
        // Stop-and-copy waits on the destination twice while frozen: the restore (sent right
        // behind the images, whose answer it does not wait for) and the commit.
        assert_eq!(r["frozen_round_trips"], 2, "{r}");
        // When the destination had every image, which the restore waited for.
        let delivered = r["images_delivered_ms"]
            .as_f64()
            .expect("images_delivered_ms");
        assert!(
            delivered > 0.0 && delivered < r["total_ms"].as_f64().unwrap(),
            "{r}"
        );
        let c = lab.container("echo").unwrap();
        assert_eq!(c["host"], to, "ferry ps shows the new host");
        assert_eq!(c["state"], "running");
        assert_eq!(c["ip"], before["ip"], "IP unchanged");
        assert_eq!(c["mac"], before["mac"], "MAC unchanged");
        let from = if to == "h2" { "h1" } else { "h2" };
        assert_clean_host(from, "echo");
        reports.push(r);
        std::thread::sleep(Duration::from_millis(500));
    }
    let p = probe.finish();
    assert_probe_intact(&p);
    // The packet hold at the last destination is gone once released.
    assert!(
        eventually(Duration::from_secs(3), || filter_rules("ferry-h1-c-echo")
            .is_empty()),
        "rules left: {:?}",
        filter_rules("ferry-h1-c-echo")
    );
    // The server's counter advanced by exactly one per line across both moves (the probe checks
    // each step); it started at 1, so its in-memory state was never reset.
    assert_eq!(p["counter_first"], 1, "{p}");
    assert_eq!(p["counter_last"], p["received"], "{p}");
    for r in &reports {
        eprintln!(
            "migration {} -> {}: frozen {:.1} ms, client max gap {:.1} ms",
            r["from"],
            r["to"],
            r["frozen_ms"].as_f64().unwrap(),
            p["max_gap_ms"].as_f64().unwrap()
        );
    }
}

/// A rollback must leave the container on h1 with the client's connection, and h2 clean.
fn assert_rolled_back(lab: &Lab, report: &Value, probe: Probe) {
    assert_eq!(report["result"], "rolled_back", "{report}");
    assert_eq!(report["committed"], false);
    assert_runs_on(lab, "h1", "echo");
    // The client keeps talking to the container on h1 over the same connection.
    std::thread::sleep(Duration::from_millis(1500));
    let p = probe.finish();
    assert_probe_intact(&p);
    assert_eq!(p["counter_first"], 1, "{p}");
    assert_eq!(p["counter_last"], p["received"], "{p}");
    assert!(
        eventually(Duration::from_secs(10), || std::panic::catch_unwind(|| {
            assert_clean_host("h2", "echo")
        })
        .is_ok()),
        "destination not cleaned"
    );
    assert_clean_host("h2", "echo");
}

#[test]
fn rollback_when_the_destination_agent_dies_during_the_transfer() {
    destination_agent_dies_during_the_transfer(&[], "kill");
}

/// Kills h2's agent while the transfer pauses; the migration must roll back.
fn destination_agent_dies_during_the_transfer(extra: &[&str], tag: &str) -> Value {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let probe = Probe::start(c["ip"].as_str().unwrap(), tag);
    let mut args = extra.to_vec();
    args.extend(["--pause-in-transfer-ms", "1500"]);
    let (_, job) = start_migration("echo", "h2", &args);
    wait_job_state(&job, "transferring");
    let pid = lab.agent_pid("h2");
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let r = wait_job(&job);
    // The dead agent's leftovers are removed when it comes back.
    ferry_ok(&["lab", "start-agent", "h2"]);
    assert_rolled_back(&lab, &r, probe);
    r
}

#[test]
fn rollback_when_the_underlay_drops_quic_during_the_transfer() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let probe = Probe::start(c["ip"].as_str().unwrap(), "drop");
    let (_, job) = start_migration("echo", "h2", &["--pause-in-transfer-ms", "1000"]);
    wait_job_state(&job, "transferring");
    let cut = LinkCut::new("h2");
    let report = wait_job(&job);
    drop(cut);
    // The images go without waiting for their answer: the loss shows in the transfer, or in
    // the restore that follows them, which then says the images never arrived.
    let reason = report["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("Transfer") || reason.contains("the images did not reach h2"),
        "{report}"
    );
    assert_rolled_back(&lab, &report, probe);
}

#[test]
fn rollback_when_the_restore_fails_at_the_destination() {
    let r = restore_fails_at_the_destination(&[], "restore");
    assert!(
        r["reason"].as_str().unwrap_or("").contains("runc restore"),
        "{r}"
    );
}

/// Damages the images at h2 so that the restore fails; the migration must roll back.
fn restore_fails_at_the_destination(extra: &[&str], tag: &str) -> Value {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let probe = Probe::start(c["ip"].as_str().unwrap(), tag);
    let mut args = vec![
        "migrate",
        "echo",
        "--to",
        "h2",
        "--json",
        "--corrupt-images",
    ];
    args.extend(extra);
    let out = ferry(&args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a rolled back migration exits with 2"
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("Restore failed"),
        "{r}"
    );
    assert_rolled_back(&lab, &r, probe);
    r
}

#[test]
fn rollback_on_cancel_during_the_transfer() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let probe = Probe::start(c["ip"].as_str().unwrap(), "cancel");
    let (_, job) = start_migration("echo", "h2", &["--pause-in-transfer-ms", "5000"]);
    wait_job_state(&job, "transferring");
    ferry_ok(&["cancel", &job]);
    let r = wait_job(&job);
    assert!(r["reason"].as_str().unwrap_or("").contains("cancel"), "{r}");
    assert_rolled_back(&lab, &r, probe);
}

fn stderr_of(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(!out.status.success(), "ferry {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_gets_clear_errors() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    let e = stderr_of(&["migrate", "nope", "--to", "h2"]);
    assert!(
        e.contains("unknown container \"nope\"") && e.contains("echo"),
        "{e}"
    );
    let e = stderr_of(&["migrate", "echo", "--to", "h9"]);
    assert!(
        e.contains("unknown host \"h9\"") && e.contains("h1, h2, client"),
        "{e}"
    );
    let e = stderr_of(&["run", "--on", "h1", "--name", "echo", "--", "/bin/sh"]);
    assert!(e.contains("already exists on h1"), "{e}");
    // Not root: the lab refuses with a reason.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ferry_bin())
        .args(["lab", "up"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("needs root"), "{e}");
    // Destination unreachable: its agent is gone. Preflight fails, nothing moves.
    let pid = lab.agent_pid("h2");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let out = ferry(&["migrate", "echo", "--to", "h2", "--json"]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("Preflight failed") && reason.contains("unreachable"),
        "{r}"
    );
    assert_runs_on(&lab, "h1", "echo");
}

/// Starts h2's agent with `FERRY_CRIU` pointing at `criu` and returns the preflight refusal.
fn migrate_with_criu_at_h2(lab: &Lab, criu: &str) -> String {
    let pid = lab.agent_pid("h2");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = std::process::Command::new(ferry_bin())
        .env("FERRY_CRIU", criu)
        .args(["lab", "start-agent", "h2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ferry(&["migrate", "echo", "--to", "h2", "--json"]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["result"], "rolled_back", "{r}");
    r["reason"].as_str().unwrap_or("").to_string()
}

#[test]
fn criu_missing_or_too_old_is_refused_before_anything_moves() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    let dir = std::env::temp_dir().join("ferry-e2e-fake-criu");
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("criu");
    std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .unwrap();
    let reason = migrate_with_criu_at_h2(&lab, fake.to_str().unwrap());
    assert!(
        reason.contains("CRIU 3.17.1") && reason.contains("older than 4.2"),
        "{reason}"
    );
    assert_runs_on(&lab, "h1", "echo");
    let reason = migrate_with_criu_at_h2(&lab, "/nonexistent/criu");
    assert!(reason.contains("CRIU not found"), "{reason}");
    assert_runs_on(&lab, "h1", "echo");
    assert_clean_host("h2", "echo");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_link_cut_right_after_the_commit_point_does_not_lose_the_container() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let probe = Probe::start(c["ip"].as_str().unwrap(), "commit");
    let (_, job) = start_migration("echo", "h2", &["--pause-before-commit-ms", "1500"]);
    wait_job_state(&job, "committing");
    // Cut the underlay's QUIC traffic at h2 for 2 s: the commit must get through afterwards.
    let cut = LinkCut::new("h2");
    std::thread::sleep(Duration::from_millis(2000));
    drop(cut);
    let report = wait_job(&job);
    assert_eq!(report["result"], "completed", "{report}");
    assert_eq!(report["committed"], true);
    std::thread::sleep(Duration::from_millis(1500));
    let p = probe.finish();
    assert_probe_intact(&p);
    assert_eq!(p["counter_first"], 1, "{p}");
    assert_eq!(p["counter_last"], p["received"], "{p}");
    let c = lab.container("echo").expect("listed");
    assert_eq!(c["host"], "h2", "{c}");
    assert_eq!(c["state"], "running", "{c}");
    assert_clean_host("h1", "echo");
}

#[path = "measure.rs"]
mod measure;

/// Pre-copy leaves the dumped container in place, frozen and off the network: a failure after
/// the final dump must bring it back on the network, thaw it, and keep the client's connection.
#[test]
fn pre_copy_rolls_back_when_the_destination_agent_dies_after_the_final_dump() {
    let r = destination_agent_dies_during_the_transfer(&["--pre-copy"], "pre-kill");
    assert_eq!(r["mode"], "pre-copy", "{r}");
}

#[test]
fn pre_copy_rolls_back_when_the_restore_fails_at_the_destination() {
    let r = restore_fails_at_the_destination(&["--pre-copy"], "pre-restore");
    assert!(!r["rounds"].as_array().unwrap().is_empty(), "{r}");
}

/// runc as the container's owner on `host`: `runc list -q` lists it, `runc exec` runs in it.
/// Runs `sh -c script` in container `name` on `host` with runc; (success, stdout + stderr).
fn sh_in(host: &str, name: &str, script: &str) -> (bool, String) {
    let root = format!("{LAB_DIR}/{host}/runc");
    let out = std::process::Command::new("runc")
        .args(["--root", &root, "exec", name, "/bin/sh", "-c", script])
        .output()
        .expect("runc exec");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn shm_and_masked_directories_are_kept_whether_or_not_the_dump_carries_them() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    // A file in /dev/shm: CRIU carries the tmpfs.
    let (ok, out) = sh_in("h1", "echo", "echo kept > /dev/shm/state");
    assert!(ok, "{out}");
    for (to, extra) in [("h2", vec![]), ("h1", vec!["--pre-copy"])] {
        let mut args = vec!["migrate", "echo", "--to", to, "--json"];
        args.extend(extra.iter().copied());
        let r: Value = serde_json::from_str(&ferry_ok(&args)).unwrap();
        assert_eq!(r["result"], "completed", "{r}");
        let (ok, out) = sh_in(to, "echo", "cat /dev/shm/state");
        assert!(
            ok && out.trim() == "kept",
            "/dev/shm after a move to {to}: {out}"
        );
    }
    // Empty: the dump leaves it out and the destination gives it a fresh tmpfs of its own.
    let (ok, out) = sh_in("h1", "echo", "rm /dev/shm/state");
    assert!(ok, "{out}");
    for (to, extra) in [("h2", vec!["--pre-copy"]), ("h1", vec![])] {
        let mut args = vec!["migrate", "echo", "--to", to, "--json"];
        args.extend(extra.iter().copied());
        let r: Value = serde_json::from_str(&ferry_ok(&args)).unwrap();
        assert_eq!(r["result"], "completed", "{r}");
        let from = if to == "h2" { "h1" } else { "h2" };
        let log = std::fs::read_to_string(format!("{LAB_DIR}/{from}.log")).unwrap();
        let last = log
            .lines()
            .rfind(|l| l.contains("frozen for the dump"))
            .unwrap_or_default();
        assert!(
            last.contains("shm_left_out") && last.contains("true"),
            "the dump at {from} carried an empty /dev/shm: {last}"
        );
        let (ok, out) = sh_in(
            to,
            "echo",
            "grep ' /dev/shm ' /proc/mounts; echo x > /dev/shm/new && cat /dev/shm/new; ls -A /dev/shm",
        );
        assert!(ok, "{out}");
        assert!(
            out.contains("tmpfs") && out.contains("size=65536k") && out.contains("nodev"),
            "/dev/shm is not the usual tmpfs after a move to {to}: {out}"
        );
        assert_eq!(
            out.lines().filter(|l| *l == "x" || *l == "new").count(),
            2,
            "{out}"
        );
        let (ok, out) = sh_in(to, "echo", "rm /dev/shm/new");
        assert!(ok, "{out}");
        // Masked directories stay empty and read-only.
        if std::path::Path::new("/proc/acpi").is_dir() {
            let (ok, out) = sh_in(to, "echo", "ls -A /proc/acpi; touch /proc/acpi/x");
            assert!(
                !ok && out.contains("Read-only"),
                "/proc/acpi at {to}: {out}"
            );
            assert!(
                !out.lines()
                    .any(|l| !l.contains("Read-only") && !l.is_empty()),
                "{out}"
            );
        }
        assert_runc_owns(to, "echo");
    }
    // Nothing of the container stays mounted at the host it left, or after its removal.
    ferry_ok(&["rm", "echo"]);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("/containers/echo/"),
        "mounts left behind: {mounts}"
    );
}

fn assert_runc_owns(host: &str, name: &str) {
    let root = format!("{LAB_DIR}/{host}/runc");
    let out = std::process::Command::new("runc")
        .args(["--root", &root, "list", "-q"])
        .output()
        .expect("runc list");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == name),
        "runc on {host} does not list {name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new("runc")
        .args(["--root", &root, "exec", name, "/bin/ls", "/"])
        .output()
        .expect("runc exec");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("bin"),
        "runc exec in {name} on {host}: {out:?}"
    );
}

#[test]
fn runc_starts_before_the_freeze_and_still_owns_the_container_after() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    for (to, extra) in [("h2", vec![]), ("h1", vec!["--pre-copy"])] {
        let mut args = vec!["migrate", "echo", "--to", to, "--json"];
        args.extend(extra.iter().copied());
        let r: Value = serde_json::from_str(&ferry_ok(&args)).unwrap();
        assert_eq!(r["result"], "completed", "{r}");
        if to == "h1" {
            // A few MiB: restored eagerly, which is faster than starting a lazy restore.
            let m = &r["memory"];
            assert_eq!(m["restore"], "eager", "{m}");
            assert!(
                m["not_lazy"]
                    .as_str()
                    .is_some_and(|w| w.contains("lazy_min_mib")),
                "{m}"
            );
        }
        let job = r["id"].as_str().expect("job id").to_string();
        let from = if to == "h2" { "h1" } else { "h2" };
        // Each side's runc reached its gate before CRIU was let through: the dump's at the
        // source, the restore's at the destination.
        for (host, op) in [(from, "checkpoint"), (to, "restore")] {
            let log = std::fs::read_to_string(format!("{LAB_DIR}/{host}.log")).unwrap();
            assert!(
                log.lines().any(|l| l.contains("CRIU let through its gate")
                    && l.contains(op)
                    && l.contains("echo")),
                "{host} did not start runc {op} ahead for job {job}"
            );
            assert!(
                !log.contains("not started ahead"),
                "{host} fell back to starting runc in the window"
            );
        }
        assert_runc_owns(to, "echo");
        assert_clean_host(from, "echo");
        // CRIU's logs outlive the job's scratch (a tmpfs), for troubleshooting (a lazy dump
        // logs only warnings: its log may be short).
        for (host, kind) in [(from, "dump"), (to, "restore")] {
            let log = format!("{LAB_DIR}/{host}/logs/{job}.{kind}.log");
            assert!(std::path::Path::new(&log).is_file(), "{log} is missing");
        }
    }
    // runc can still stop it.
    let root = format!("{LAB_DIR}/h1/runc");
    let out = std::process::Command::new("runc")
        .args(["--root", &root, "kill", "echo", "KILL"])
        .output()
        .expect("runc kill");
    assert!(out.status.success(), "runc kill: {out:?}");
    assert!(
        eventually(Duration::from_secs(5), || {
            let out = std::process::Command::new("runc")
                .args(["--root", &root, "state", "echo"])
                .output()
                .expect("runc state");
            String::from_utf8_lossy(&out.stdout).contains("\"stopped\"")
        }),
        "runc kill did not stop the container"
    );
}
