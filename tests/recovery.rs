//! End-to-end: an agent killed (SIGKILL) at each step of a migration, then started again. Every
//! time the container runs exactly once afterwards, on one host, its in-memory counter going
//! on from where it was, and nothing of the migration is left behind. Real runc, CRIU, QUIC.

use std::path::Path;
use std::time::Duration;

use ferry_tests::*;
use serde_json::{json, Value};

/// How long a fault hook holds the migration at the step where an agent is killed.
const PAUSE_MS: &str = "4000";

/// The counter of the echo workload at `ip`: sends `tag`, returns the number it answers with.
fn counter(ip: &str, tag: &str) -> u64 {
    let answer = ask_workload(ip, tag);
    let (n, rest) = answer
        .split_once(' ')
        .unwrap_or_else(|| panic!("unexpected answer {answer:?}"));
    assert_eq!(rest, tag, "{answer:?}");
    n.parse()
        .unwrap_or_else(|_| panic!("unexpected answer {answer:?}"))
}

/// The container listed exactly once in the lab, on `host`, running.
/// The `ferry ps` entries of `name`.
fn listed(name: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&ferry_ok(&["ps", "--json"])).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| a.iter().filter(|c| c["name"] == name).cloned().collect())
        .unwrap_or_default()
}

fn assert_listed_once_on(host: &str, name: &str) {
    let ok = eventually(Duration::from_secs(30), || {
        let on = listed(name);
        on.len() == 1 && on[0]["host"] == host && on[0]["state"] == "running"
    });
    assert!(
        ok,
        "{name} should run once, on {host}: {}",
        ferry_ok(&["ps", "--json"])
    );
}

/// Nothing of `name` or of its migration on `host` (which does not run it), and nothing of a
/// migration on `owner` (which does).
fn assert_nothing_left(owner: &str, other: &str, name: &str) {
    let ok = eventually(Duration::from_secs(30), || {
        netns_with_prefix(&format!("ferry-{other}-c-{name}")).is_empty()
            && !Path::new(&format!("{LAB_DIR}/{other}/containers/{name}")).exists()
    });
    assert!(ok, "{other} still holds parts of {name}");
    assert_clean_host(other, name);
    for controller in ["freezer", "cpu", "memory"] {
        let cg = format!("/sys/fs/cgroup/{controller}/ferry/{other}/{name}");
        assert!(!Path::new(&cg).exists(), "cgroup {cg} left on {other}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let prefix = format!("{LAB_DIR}/{other}/containers/{name}");
    assert!(
        !mounts.lines().any(|l| l.contains(&prefix)),
        "a mount of {name} left on {other}"
    );
    for host in [owner, other] {
        for d in ["outgoing", "images", "work", "incoming"] {
            let p = format!("{LAB_DIR}/{host}/{d}");
            assert!(
                dir_entries(&p).is_empty(),
                "{p} not empty: {:?}",
                dir_entries(&p)
            );
        }
    }
    let ns = format!("ferry-{owner}-c-{name}");
    let rules = filter_rules(&ns);
    assert!(rules.is_empty(), "iptables rules left in {ns}: {rules:?}");
    let freezer = format!("/sys/fs/cgroup/freezer/ferry/{owner}/{name}/freezer.state");
    if let Ok(s) = std::fs::read_to_string(&freezer) {
        assert_eq!(s.trim(), "THAWED", "{freezer}");
    }
}

/// Where `name` runs, once it is listed exactly once, running (within 30 s).
fn sole_host_of(name: &str) -> String {
    let mut host = None;
    let ok = eventually(Duration::from_secs(30), || {
        let on = listed(name);
        host = (on.len() == 1 && on[0]["state"] == "running")
            .then(|| on[0]["host"].as_str().unwrap_or_default().to_string());
        host.is_some()
    });
    assert!(
        ok,
        "{name} should run exactly once: {}",
        ferry_ok(&["ps", "--json"])
    );
    host.expect("checked above")
}

/// Starts a migration of an echo container h1 -> h2 with `hook`, kills `victim`'s agent once
/// the job reached `state`, starts it again, and checks that the container ends on `owner`
/// (`None`: on either host, as the destination decided), once, with its memory.
fn kill_during(hook: &str, state: &str, victim: &str, owner: Option<&str>) {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let before = counter(&ip, "before");
    let (_, job) = start_migration("echo", "h2", &[hook, PAUSE_MS]);
    wait_job_state(&job, state);
    lab.kill_agent(victim);
    ferry_ok(&["lab", "start-agent", victim]);
    let owner = match owner {
        Some(o) => o.to_string(),
        None => sole_host_of("echo"),
    };
    let owner = owner.as_str();
    if victim == "h2" {
        // The source lived on: its job says how it ended.
        let r = wait_job(&job);
        let expect = if owner == "h1" {
            "rolled_back"
        } else {
            "completed"
        };
        assert_eq!(r["result"], expect, "{r}");
    }
    assert_listed_once_on(owner, "echo");
    let other = if owner == "h1" { "h2" } else { "h1" };
    assert_nothing_left(owner, other, "echo");
    // The same process, with its memory: the counter goes on.
    assert_eq!(counter(&ip, "after"), before + 1, "the container's memory");
}

#[test]
fn source_agent_killed_during_the_dump() {
    kill_during("--pause-in-dump-ms", "dumping", "h1", Some("h1"));
}

#[test]
fn source_agent_killed_during_the_transfer() {
    kill_during("--pause-in-transfer-ms", "transferring", "h1", Some("h1"));
}

#[test]
fn source_agent_killed_during_the_restore() {
    // The container was frozen for its dump, so the restarted source asks the destination,
    // which decides: the copy it restored is committed if it was not aborted first (its
    // source's connection ended), else it is removed and the source runs on.
    kill_during("--pause-in-restore-ms", "restoring", "h1", None);
}

#[test]
fn source_agent_killed_right_after_the_commit() {
    kill_during("--pause-after-commit-ms", "cleaning_up", "h1", Some("h2"));
}

#[test]
fn destination_agent_killed_after_its_restore() {
    kill_during("--pause-before-commit-ms", "committing", "h2", Some("h1"));
}

#[test]
fn destination_agent_killed_after_the_commit() {
    kill_during("--pause-after-commit-ms", "cleaning_up", "h2", Some("h2"));
}

/// Whether process `pid` holds a userfaultfd.
fn holds_userfaultfd(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))
            })
        })
        .unwrap_or(false)
}

/// The mem workload's own account of its memory: verified page by page, and how many pages
/// it rewrote since it started (which only grows while it is the same process).
fn mem_verified(ip: &str, when: &str) -> u64 {
    let v = ask_workload(ip, "verify");
    assert!(v.starts_with("verify ok"), "{when}: {v}");
    let s = ask_workload(ip, "status");
    assert!(s.contains("intact=1 bad=0 "), "{when}: {s}");
    s.split_whitespace()
        .find_map(|w| w.strip_prefix("dirtied_pages="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{when}: no dirtied_pages in {s:?}"))
}

/// The agent killed while it tracks the container's writes with userfaultfd write protection
/// (between two pre-copy rounds): at restart the container runs on at the source, no process
/// of it holds a userfaultfd, and it migrates again with the same tracking, its memory intact.
#[test]
fn source_agent_killed_during_a_pre_copy_round() {
    let lab = Lab::up();
    let c = lab.run_mem("h1", "mem", 32, 20);
    let ip = c["ip"].as_str().expect("ip").to_string();
    let before = mem_verified(&ip, "fresh workload");
    let (_, job) = start_migration(
        "mem",
        "h2",
        &[
            "--pre-copy",
            "--pause-in-phase",
            "pre_copy",
            "--pause-in-phase-ms",
            PAUSE_MS,
        ],
    );
    wait_job_state(&job, "pre_copying");
    let agent = lab.agent_pid("h1");
    assert!(
        eventually(Duration::from_secs(30), || holds_userfaultfd(agent)),
        "the source agent never tracked the container with a userfaultfd"
    );
    lab.kill_agent("h1");
    ferry_ok(&["lab", "start-agent", "h1"]);
    assert_listed_once_on("h1", "mem");
    assert_nothing_left("h1", "h2", "mem");
    let tasks = std::fs::read_to_string("/sys/fs/cgroup/freezer/ferry/h1/mem/tasks")
        .expect("the container's tasks");
    for pid in tasks.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        assert!(
            !holds_userfaultfd(pid),
            "process {pid} of mem holds a userfaultfd"
        );
    }
    let after = mem_verified(&ip, "after the restart");
    assert!(
        after > before,
        "the same process goes on: {before} -> {after} pages"
    );
    let (code, r) = migrate_json("mem", "h2", &["--pre-copy"], Duration::from_secs(120));
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(r["dirty_tracking"], "uffd-wp", "{r}");
    assert_listed_once_on("h2", "mem");
    let moved = mem_verified(&ip, "moved");
    assert!(
        moved > after,
        "the same process goes on: {after} -> {moved} pages"
    );
}

/// Kills h2's agent while the source waits to send its commit, so that the commit finds no
/// destination; returns the job, the echo container's address and its counter before.
fn destination_gone_before_the_commit(lab: &Lab) -> (String, String, u64) {
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let before = counter(&ip, "before");
    let (_, job) = start_migration("echo", "h2", &["--pause-before-commit-ms", PAUSE_MS]);
    wait_job_state(&job, "committing");
    lab.kill_agent("h2");
    (job, ip, before)
}

/// Settles `job` by hand with `ferry resolve`, retrying while the source has not started
/// waiting yet (it asks the destination first).
fn resolve(job: &str, how: &str) -> Value {
    let mut last = String::new();
    for _ in 0..100 {
        let out = ferry(&["resolve", job, how]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).expect("resolve JSON");
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("ferry resolve {job} {how} never succeeded: {last}");
}

/// A destination that never comes back: the source keeps the container frozen while it asks
/// for the commit's outcome, until an operator says the destination is gone. Then it runs on
/// at the source, with its memory; the destination, when it returns, removes its copy.
#[test]
fn a_destination_that_never_returns_is_settled_by_hand() {
    let lab = Lab::up();
    let (job, ip, before) = destination_gone_before_the_commit(&lab);
    // Frozen meanwhile: nothing answers.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ferry(&["job", &job]).status.success(),
        "the job is still known while it waits"
    );
    let freezer = "/sys/fs/cgroup/freezer/ferry/h1/echo/freezer.state";
    assert_eq!(
        std::fs::read_to_string(freezer).unwrap_or_default().trim(),
        "FROZEN",
        "the source's copy stays frozen while the outcome is unknown"
    );
    let a = resolve(&job, "--resume-here");
    assert_eq!(a["outcome"], "resume_here", "{a}");
    assert_eq!(
        (&a["container"], &a["destination"]),
        (&json!("echo"), &json!("h2")),
        "{a}"
    );
    let r = wait_job(&job);
    assert_eq!(r["result"], "rolled_back", "{r}");
    assert_listed_once_on("h1", "echo");
    assert_eq!(counter(&ip, "after"), before + 1, "the container's memory");
    // The destination comes back and removes its copy, which never committed.
    ferry_ok(&["lab", "start-agent", "h2"]);
    assert_nothing_left("h1", "h2", "echo");
    assert_listed_once_on("h1", "echo");
    // Settled jobs cannot be settled again; unknown ones are named.
    let out = ferry(&["resolve", &job, "--committed"]);
    assert!(!out.status.success(), "a second resolve must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&job), "{err}");
}

/// The same after the source's agent restarts while it waits: the journal brings the job
/// back, still waiting, and it can be settled by hand the same way.
#[test]
fn a_destination_that_never_returns_is_settled_by_hand_after_a_restart() {
    let lab = Lab::up();
    let (job, ip, before) = destination_gone_before_the_commit(&lab);
    // Killed once its journal says the commit went out (after the pause).
    let record = format!("{LAB_DIR}/h1/outgoing/{job}.json");
    assert!(
        eventually(Duration::from_secs(20), || std::fs::read_to_string(&record)
            .is_ok_and(|r| r.contains("commit_sent"))),
        "{record} never said the commit was sent"
    );
    lab.kill_agent("h1");
    ferry_ok(&["lab", "start-agent", "h1"]);
    let a = resolve(&job, "--resume-here");
    assert_eq!(a["outcome"], "resume_here", "{a}");
    assert_listed_once_on("h1", "echo");
    assert_eq!(counter(&ip, "after"), before + 1, "the container's memory");
    ferry_ok(&["lab", "start-agent", "h2"]);
    assert_nothing_left("h1", "h2", "echo");
}

#[test]
fn a_damaged_container_list_stops_the_agent_instead_of_forgetting_containers() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    lab.kill_agent("h1");
    let list = format!("{LAB_DIR}/h1/containers.json");
    let good = std::fs::read(&list).expect("containers.json");
    std::fs::write(&list, &good[..good.len() / 2]).expect("damaging containers.json");
    let out = ferry(&["lab", "start-agent", "h1"]);
    assert!(!out.status.success(), "the agent must not start");
    let log = std::fs::read_to_string(format!("{LAB_DIR}/h1.log")).unwrap_or_default();
    assert!(
        log.contains("containers.json is damaged"),
        "the agent says why: {}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    // Repaired, it starts with the container it owns.
    std::fs::write(&list, &good).expect("repairing containers.json");
    ferry_ok(&["lab", "start-agent", "h1"]);
    assert_listed_once_on("h1", "echo");
}
