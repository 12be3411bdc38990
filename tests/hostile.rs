//! End-to-end: containers that play tricks with their root filesystem while they move, and a
//! peer that sends a crafted request. Real runc, CRIU, QUIC with the lab's certificates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::{json, Value};

/// Migrations per mode in the loops below.
const MIGRATIONS: usize = 20;
/// Each migration of these small containers takes about a second; this bounds a stuck one.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Migrates `name` back and forth `MIGRATIONS` times in `mode`, starting on h1; asserts that
/// every migration completed and returns the reports.
fn shuttle(name: &str, mode: &[&str]) -> Vec<Value> {
    let mut reports = vec![];
    for i in 0..MIGRATIONS {
        let to = if i % 2 == 0 { "h2" } else { "h1" };
        let (code, r) = migrate_json(name, to, mode, MIGRATION_TIMEOUT);
        assert_eq!(
            (code, r["result"].as_str()),
            (0, Some("completed")),
            "migration {} of {name} ({mode:?}) to {to} did not complete: {r}",
            i + 1
        );
        let digest = r["rootfs_digest"].as_str().unwrap_or_default();
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "the report names the root's digest at the freeze, which the destination matched: {r}"
        );
        reports.push(r);
    }
    reports
}

/// Every regular file under `dir`, not following symlinks.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => stack.push(p),
                Ok(md) if md.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_container_swapping_its_files_for_symlinks_to_host_files_never_receives_them() {
    let lab = Lab::up();
    // A host file the agents can read and the container must never get: its path is known to
    // the container, its content is not.
    let canary_path = format!("{LAB_DIR}/canary-secret");
    let canary = format!(
        "FERRY-HOST-CANARY-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    std::fs::write(&canary_path, &canary).expect("writing the canary");
    // A file swapped for a symlink to the canary, and a directory swapped for a symlink to
    // the directory that holds it, as fast as busybox can.
    let script = format!(
        "while :; do \
           echo own > /f.tmp; mv /f.tmp /f; ln -sf {canary_path} /l.tmp; mv /l.tmp /f; \
           rm -rf /d.new; mkdir /d.new; echo own > /d.new/canary-secret; rm -rf /d; mv /d.new /d; \
           rm -rf /d; ln -s {LAB_DIR} /d; \
         done"
    );
    ferry_ok(&[
        "run", "--on", "h1", "--name", "trick", "--", "/bin/sh", "-c", &script,
    ]);
    shuttle("trick", &[]);
    shuttle("trick", &["--pre-copy"]);
    // The swaps did land between a snapshot and a read (the agents said so): the test
    // exercised the window it is about.
    let skipped: usize = ["h1", "h2"]
        .iter()
        .map(|h| {
            std::fs::read_to_string(format!("{LAB_DIR}/{h}.log"))
                .unwrap_or_default()
                .matches("changed while they were read")
                .count()
        })
        .sum();
    assert!(
        skipped > 0,
        "in {} migrations no entry changed between a snapshot and its read",
        2 * MIGRATIONS
    );
    let c = lab.container("trick").expect("trick listed");
    assert_eq!(c["state"], "running", "{c}");
    // Paused, so that this scan does not race with the swaps (reading a path that just became
    // a symlink would read the canary from here, on the host).
    let host = c["host"].as_str().expect("host");
    let paused = Command::new("runc")
        .args([
            "--root",
            &format!("{LAB_DIR}/{host}/runc"),
            "pause",
            "trick",
        ])
        .status()
        .expect("runc pause");
    assert!(paused.success(), "runc pause trick on {host}");
    for host in ["h1", "h2"] {
        for f in files_under(Path::new(&format!("{LAB_DIR}/{host}"))) {
            let Ok(data) = std::fs::read(&f) else {
                continue;
            };
            assert!(
                !contains(&data, canary.as_bytes()),
                "the host's canary file reached {} on {host}",
                f.display()
            );
        }
    }
    let _ = std::fs::remove_file(&canary_path);
}

#[test]
fn a_container_renaming_temporary_files_migrates_every_time_with_its_root_intact() {
    let lab = Lab::up();
    // What databases, editors and package managers do: write aside, rename over; a symlink
    // made aside and renamed over the same name.
    let script = "while :; do echo x > /a.tmp; mv /a.tmp /x; ln -sf /y /b.tmp; mv /b.tmp /x; done";
    ferry_ok(&[
        "run", "--on", "h1", "--name", "ren", "--", "/bin/sh", "-c", script,
    ]);
    shuttle("ren", &[]);
    shuttle("ren", &["--pre-copy"]);

    // The destination checks its copy against the source's root at the freeze: a copy that
    // differs (here a stray file added on purpose) is not restored, and the container runs on
    // at the source.
    let (code, r) = migrate_json("ren", "h2", &["--corrupt-rootfs"], MIGRATION_TIMEOUT);
    assert_eq!(code, 2, "{r}");
    assert_eq!(r["result"], "rolled_back", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("differs from the source's at the freeze"),
        "{r}"
    );
    assert_runs_on(&lab, "h1", "ren");
    assert_clean_host("h2", "ren");
}

/// The mount points under `dir`, from this process's mount table.
fn mounts_under(dir: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(dir))
        .collect()
}

#[test]
fn a_prepare_naming_a_host_directory_as_its_base_is_refused_before_any_mount() {
    let _lab = Lab::up();
    let state = format!("{LAB_DIR}/h2");
    let mounts_before = mounts_under(&state);
    for (i, tree) in ["/", "../..", "../../../etc", "/run/ferry/lab/h2/store", ""]
        .iter()
        .enumerate()
    {
        let name = format!("crafted{i}");
        let req = json!({
            "op": "prepare",
            "job": format!("h1-crafted-{i}"),
            "spec": {
                "name": name,
                "ip": format!("10.232.0.{}", 200 + i),
                "mac": format!("02:fe:0a:e8:00:{:02x}", 200 + i),
                "prefix_len": 24,
                "args": ["/bin/sh"],
                "image": {"name": "base:1", "tree": tree},
            }
        });
        let resp = peer_request("h1", "h2", &req, 1);
        assert_eq!(
            resp["result"], "error",
            "a crafted tree id {tree:?} must be refused: {resp}"
        );
        let msg = resp["message"].as_str().unwrap_or_default();
        assert!(msg.contains("not a tree id"), "{tree:?}: {msg}");
        assert!(
            !Path::new(&format!("{state}/containers/{name}")).exists(),
            "a bundle was made for {tree:?}"
        );
    }
    assert_eq!(mounts_under(&state), mounts_before, "nothing was mounted");
    assert!(
        dir_entries(&format!("{state}/incoming")).is_empty(),
        "no incoming job was recorded"
    );
}
