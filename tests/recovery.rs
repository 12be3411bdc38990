//! End-to-end: an agent killed (SIGKILL) at each step of a migration, then started again. Every
//! time the container runs exactly once afterwards, on one host, its in-memory counter going
//! on from where it was, and nothing of the migration is left behind. Real runc, CRIU, QUIC.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// How long a fault hook holds the migration at the step where an agent is killed.
const PAUSE_MS: &str = "4000";

fn kill_agent(lab: &Lab, host: &str) {
    let pid = lab.agent_pid(host).to_string();
    let ok = Command::new("kill")
        .args(["-9", &pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -9 {pid} (agent of {host})");
    // Gone before anything else happens.
    assert!(
        eventually(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()),
        "agent {pid} of {host} still alive"
    );
}

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
fn assert_listed_once_on(host: &str, name: &str) {
    let ok = eventually(Duration::from_secs(30), || {
        let v: Value = serde_json::from_str(&ferry_ok(&["ps", "--json"])).unwrap_or(Value::Null);
        let on: Vec<&Value> = v
            .as_array()
            .map(|a| a.iter().filter(|c| c["name"] == name).collect())
            .unwrap_or_default();
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

/// Starts a migration of an echo container h1 -> h2 with `hook`, kills `victim`'s agent once
/// the job reached `state`, starts it again, and checks that the container ends on `owner`.
fn kill_during(hook: &str, state: &str, victim: &str, owner: &str) {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "echo");
    let ip = c["ip"].as_str().expect("ip").to_string();
    let before = counter(&ip, "before");
    let (_, job) = start_migration("echo", "h2", &[hook, PAUSE_MS]);
    wait_job_state(&job, state);
    kill_agent(&lab, victim);
    ferry_ok(&["lab", "start-agent", victim]);
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
    kill_during("--pause-in-dump-ms", "dumping", "h1", "h1");
}

#[test]
fn source_agent_killed_during_the_transfer() {
    kill_during("--pause-in-transfer-ms", "transferring", "h1", "h1");
}

#[test]
fn source_agent_killed_during_the_restore() {
    kill_during("--pause-in-restore-ms", "restoring", "h1", "h1");
}

#[test]
fn source_agent_killed_right_after_the_commit() {
    kill_during("--pause-after-commit-ms", "cleaning_up", "h1", "h2");
}

#[test]
fn destination_agent_killed_after_its_restore() {
    kill_during("--pause-before-commit-ms", "committing", "h2", "h1");
}

#[test]
fn destination_agent_killed_after_the_commit() {
    kill_during("--pause-after-commit-ms", "cleaning_up", "h2", "h2");
}

#[test]
fn a_damaged_container_list_stops_the_agent_instead_of_forgetting_containers() {
    let lab = Lab::up();
    lab.run_echo("h1", "echo");
    kill_agent(&lab, "h1");
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
