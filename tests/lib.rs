//! Helpers for Ferry's end-to-end tests: they drive the real `ferry` binary, which drives real
//! runc, CRIU, network namespaces, VXLAN and QUIC. They need root and the tools that
//! `scripts/setup.sh` installs; without them they fail (never skip) and say why.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The lab's directory (the CLI's default).
pub const LAB_DIR: &str = "/run/ferry/lab";

static SERIAL: Mutex<()> = Mutex::new(());

/// The built `ferry` binary: `$FERRY_BIN`, else `target/release/ferry` of this workspace.
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ferry");
    assert!(
        p.is_file() && p.with_file_name("ferry-workload").is_file(),
        "{} or ferry-workload missing: build with `cargo build --release -p ferry -p ferry-workload` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Fails the test unless it runs as root with the tools installed.
pub fn require_privileges() {
    // SAFETY-free check: `id -u` keeps this crate without unsafe code.
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "end-to-end tests need root (CRIU, runc, network namespaces): run scripts/test.sh as root"
    );
    for tool in [
        "runc", "criu", "iptables", "ip", "arping", "busybox", "nsenter", "tc", "nc", "curl",
    ] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "{tool} not found: run scripts/setup.sh first");
    }
}

/// Runs `ferry ARGS`, returns its output.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running ferry")
}

/// Runs `ferry ARGS` and asserts success; returns stdout.
pub fn ferry_ok(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(
        out.status.success(),
        "ferry {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A lab for one test: up on creation, down on drop. Tests are serialized (one lab at a time).
pub struct Lab {
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Brings a fresh lab up.
    pub fn up() -> Lab {
        Lab::up_with(&[])
    }

    /// Brings a fresh lab up with `ferry lab up EXTRA...`.
    pub fn up_with(extra: &[&str]) -> Lab {
        let lab = Lab::exclusive();
        let mut args = vec!["lab", "up"];
        args.extend_from_slice(extra);
        ferry_ok(&args);
        lab
    }

    /// Takes the lab lock without bringing a lab up (for commands that bring their own).
    pub fn exclusive() -> Lab {
        require_privileges();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let _ = ferry(&["lab", "down"]);
        Lab { _serial: serial }
    }

    /// Starts the memory workload (`ferry-workload mem`) as container `name` on `host`.
    pub fn run_mem(&self, host: &str, name: &str, size_mib: u64, dirty_mib_s: u64) -> Value {
        let (size, dirty) = (size_mib.to_string(), dirty_mib_s.to_string());
        self.run_workload(
            host,
            name,
            &["mem", "--size-mib", &size, "--dirty-mib-s", &dirty],
        )
    }

    /// Starts the echo workload as container `name` on `host`; returns its `ferry ps` entry.
    pub fn run_echo(&self, host: &str, name: &str) -> Value {
        self.run_workload(host, name, &["echo"])
    }

    /// Starts `ferry-workload ARGS --port 7000` as container `name` on `host` and waits until
    /// it answers; returns its `ferry ps` entry.
    fn run_workload(&self, host: &str, name: &str, args: &[&str]) -> Value {
        let mut cmd = vec![
            "run",
            "--on",
            host,
            "--name",
            name,
            "--",
            "/bin/ferry-workload",
        ];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&["--port", "7000"]);
        ferry_ok(&cmd);
        let c = self.container(name).expect("container listed after run");
        wait_port(c["ip"].as_str().expect("ip"));
        c
    }

    /// The `ferry ps --json` entry of `name`.
    pub fn container(&self, name: &str) -> Option<Value> {
        let v: Value = serde_json::from_str(&ferry_ok(&["ps", "--json"])).expect("ps --json");
        v.as_array()?.iter().find(|c| c["name"] == name).cloned()
    }

    /// Agent pid of a host.
    pub fn agent_pid(&self, host: &str) -> i32 {
        std::fs::read_to_string(format!("{LAB_DIR}/{host}.pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    /// Kills `host`'s agent with SIGKILL and waits until it is gone.
    pub fn kill_agent(&self, host: &str) {
        let pid = self.agent_pid(host).to_string();
        let ok = Command::new("kill")
            .args(["-9", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -9 {pid} (agent of {host})");
        assert!(
            eventually(Duration::from_secs(5), || !std::path::Path::new(&format!(
                "/proc/{pid}"
            ))
            .exists()),
            "agent {pid} of {host} still alive"
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ferry(&["lab", "down"]);
    }
}

/// Waits until the echo server at `ip` answers from the client host.
pub fn wait_port(ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                "ferry-client",
                "timeout",
                "1",
                "bash",
                "-c",
            ])
            .arg(format!(": </dev/tcp/{ip}/7000"))
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "echo server {ip}:7000 never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `ferry probe` running in the client host.
pub struct Probe {
    child: Child,
    stop: PathBuf,
}

impl Probe {
    /// Starts probing `ip:7000` every 5 ms.
    pub fn start(ip: &str, tag: &str) -> Probe {
        Probe::start_at(&format!("{ip}:7000"), tag)
    }

    /// Starts probing the echo server at `target` (`ADDR:PORT`, `[V6]:PORT`) every 5 ms.
    pub fn start_at(target: &str, tag: &str) -> Probe {
        let stop = PathBuf::from(format!("{LAB_DIR}/test-probe-{tag}.stop"));
        let _ = std::fs::remove_file(&stop);
        let child = Command::new("ip")
            .args(["netns", "exec", "ferry-client"])
            .arg(ferry_bin())
            .args([
                "probe",
                "--target",
                target,
                "--interval-ms",
                "5",
                "--stop-file",
            ])
            .arg(&stop)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the probe");
        std::thread::sleep(Duration::from_millis(300));
        Probe { child, stop }
    }

    /// Stops it; returns its report.
    pub fn finish(self) -> Value {
        std::fs::write(&self.stop, b"stop").expect("stop file");
        let out = self.child.wait_with_output().expect("probe output");
        let _ = std::fs::remove_file(&self.stop);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "probe report unreadable ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// Network namespaces whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Entries of a directory (empty when absent).
pub fn dir_entries(p: &str) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` until it returns true or `timeout` passes; returns the last result.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that `host` holds nothing of container `name`: no namespace, bundle, images,
/// incoming records, runc state.
pub fn assert_clean_host(host: &str, name: &str) {
    let ns = format!("ferry-{host}-c-{name}");
    assert!(
        netns_with_prefix(&ns).is_empty(),
        "namespace {ns} left on {host}"
    );
    let bundle = format!("{LAB_DIR}/{host}/containers/{name}");
    assert!(
        !Path::new(&bundle).exists(),
        "bundle {bundle} left on {host}"
    );
    let console = format!("{LAB_DIR}/{host}/console/{name}");
    assert!(
        !Path::new(&console).exists(),
        "logs {console} left on {host}"
    );
    for d in ["images", "work", "incoming"] {
        let p = format!("{LAB_DIR}/{host}/{d}");
        assert!(
            dir_entries(&p).is_empty(),
            "{p} not empty on {host}: {:?}",
            dir_entries(&p)
        );
    }
    let out = Command::new("runc")
        .args(["--root", &format!("{LAB_DIR}/{host}/runc"), "list", "-q"])
        .output()
        .expect("runc list");
    assert!(
        !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == name),
        "runc still knows {name} on {host}"
    );
}

/// Asserts that the source kept the container running, thawed, with no migration leftovers.
pub fn assert_runs_on(lab: &Lab, host: &str, name: &str) {
    let c = lab.container(name).expect("container listed");
    assert_eq!(c["host"], host, "container should be on {host}: {c}");
    assert_eq!(c["state"], "running", "container should run: {c}");
    let freezer = format!("/sys/fs/cgroup/freezer/ferry/{host}/{name}/freezer.state");
    if let Ok(s) = std::fs::read_to_string(&freezer) {
        assert_eq!(s.trim(), "THAWED", "{freezer}");
    }
    for d in ["images", "work"] {
        let p = format!("{LAB_DIR}/{host}/{d}");
        assert!(dir_entries(&p).is_empty(), "{p} not empty on {host}");
    }
    // No packet-filter leftovers (CRIU locks, packet holds) where the container lives.
    let ns = format!("ferry-{host}-c-{name}");
    let rules = filter_rules(&ns);
    assert!(rules.is_empty(), "iptables rules left in {ns}: {rules:?}");
}

/// Every iptables and ip6tables rule (not policies) in namespace `ns`, all tables, except the
/// container's permanent ICMPv6 drops (MLD reports and router solicitations).
pub fn filter_rules(ns: &str) -> Vec<String> {
    let mut rules = vec![];
    for cmd in ["iptables", "ip6tables"] {
        for table in ["filter", "raw", "nat", "mangle"] {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, cmd, "-w", "-t", table, "-S"])
                .output()
                .expect("iptables -S");
            rules.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A"))
                    .filter(|l| {
                        !(l.starts_with("-A OUTPUT -p ipv6-icmp") && l.ends_with("-j DROP"))
                    })
                    .map(|l| format!("{cmd} {table}: {l}")),
            );
        }
    }
    rules
}

/// Starts a migration in the background; returns (source host, job id).
pub fn start_migration(name: &str, to: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["migrate", name, "--to", to, "--detach"];
    args.extend_from_slice(extra);
    let out = ferry_ok(&args);
    let id = out.trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "`ferry migrate --detach` prints the job id alone, got {out:?}"
    );
    let v: Value = serde_json::from_str(&ferry_ok(&["job", &id, "--json"])).expect("job json");
    (
        v["report"]["from"].as_str().expect("report.from").into(),
        id,
    )
}

/// Waits until job `id` reaches `state` (e.g. "transferring").
pub fn wait_job_state(id: &str, state: &str) {
    let ok = eventually(Duration::from_secs(20), || {
        let out = ferry(&["job", id, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["state"] == state
    });
    assert!(ok, "job {id} never reached {state}");
}

/// Waits for job `id` to end; returns its report. `ferry job --wait` exits 0 for a job that
/// moved the container, 2 for one that rolled back, 1 for one that failed.
pub fn wait_job(id: &str) -> Value {
    let out = ferry(&["job", id, "--wait", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry job {id} --wait --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let expected = match v["state"].as_str() {
        Some("done") => 0,
        Some("rolled_back") => 2,
        _ => 1,
    };
    assert_eq!(
        out.status.code(),
        Some(expected),
        "exit code of `ferry job {id} --wait` for state {}",
        v["state"]
    );
    v["report"].clone()
}

/// Drops traffic in and out of lab host `host` until dropped: QUIC (UDP 7700), a cut
/// underlay link between agents ([`LinkCut::new`]), or what other rules say
/// ([`LinkCut::with_rules`]).
pub struct LinkCut {
    host: String,
    rules: &'static [&'static [&'static str]],
}

const CUT_RULES: [&[&str]; 2] = [
    &["INPUT", "-p", "udp", "--dport", "7700", "-j", "DROP"],
    &["OUTPUT", "-p", "udp", "--sport", "7700", "-j", "DROP"],
];

fn cut_rule(host: &str, action: &str, rule: &[&str]) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("ferry-{host}"),
            "iptables",
            "-w",
            action,
        ])
        .args(rule)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl LinkCut {
    /// Cuts `host`'s QUIC traffic.
    pub fn new(host: &str) -> LinkCut {
        LinkCut::with_rules(host, &CUT_RULES)
    }

    /// Inserts iptables `rules` (chain and match, e.g. `["OUTPUT", "-p", "tcp", ..., "-j",
    /// "DROP"]`) in `host` until dropped.
    pub fn with_rules(host: &str, rules: &'static [&'static [&'static str]]) -> LinkCut {
        for r in rules {
            assert!(cut_rule(host, "-I", r), "iptables -I {r:?} in {host}");
        }
        LinkCut {
            host: host.into(),
            rules,
        }
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        for r in self.rules {
            cut_rule(&self.host, "-D", r);
        }
    }
}

/// Sends one command line to the workload at `ip:7000` from the client host; returns the answer.
pub fn ask_workload(ip: &str, line: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ferry-client",
            "timeout",
            "60",
            "bash",
            "-c",
        ])
        .arg(format!(
            "exec 3<>/dev/tcp/{ip}/7000 && echo '{line}' >&3 && read -r l <&3 && echo \"$l\""
        ))
        .output()
        .expect("asking the workload");
    assert!(
        out.status.success(),
        "no answer from the workload at {ip}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts that a probe report shows an unbroken conversation: no error, nothing lost,
/// reordered or duplicated, every request answered.
pub fn assert_probe_intact(p: &Value) {
    assert_eq!(p["errors"], 0, "client saw errors: {p}");
    assert_eq!(
        p["intact"], true,
        "client lost, reordered or duplicated data: {p}"
    );
    assert!(
        p["received"].as_u64().unwrap_or(0) > 100,
        "too few answers: {p}"
    );
    assert_eq!(p["sent"], p["received"], "{p}");
}

/// Runs `ferry migrate NAME --to TO EXTRA... --json`, killing it and failing the test if it
/// takes longer than `timeout`; returns (exit code, report).
pub fn migrate_json(name: &str, to: &str, extra: &[&str], timeout: Duration) -> (i32, Value) {
    let mut child = Command::new(ferry_bin())
        .args(["migrate", name, "--to", to, "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ferry migrate");
    let deadline = Instant::now() + timeout;
    loop {
        if child
            .try_wait()
            .expect("waiting for ferry migrate")
            .is_some()
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("ferry migrate output");
            panic!(
                "ferry migrate {name} --to {to} {extra:?} still running after {timeout:?}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("ferry migrate output");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry migrate printed no JSON report ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// Waits at most `timeout` until job `id` reaches `state`.
pub fn wait_job_state_within(id: &str, state: &str, timeout: Duration) {
    let mut last = Value::Null;
    let ok = eventually(timeout, || {
        let out = ferry(&["job", id, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        last = v["state"].clone();
        v["state"] == state
    });
    assert!(
        ok,
        "job {id} never reached {state} in {timeout:?} (last: {last})"
    );
}

/// Waits at most `timeout` for job `id` to end (done, rolled back or failed); returns its
/// report.
pub fn wait_job_within(id: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let ok = eventually(timeout, || {
        let out = ferry(&["job", id, "--json"]);
        last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        matches!(
            last["state"].as_str(),
            Some("done" | "rolled_back" | "failed")
        )
    });
    assert!(ok, "job {id} did not end in {timeout:?}: {last}");
    last["report"].clone()
}

/// Limits the lab's underlay links to `rate` (`ferry lab shape`) until dropped, when the limit
/// is removed again (also when the test fails).
pub struct Shaped;

impl Shaped {
    /// Shapes every underlay link to `rate` (e.g. `100mbit`).
    pub fn new(rate: &str) -> Shaped {
        ferry_ok(&["lab", "shape", rate]);
        Shaped
    }
}

impl Drop for Shaped {
    fn drop(&mut self) {
        let _ = ferry(&["lab", "shape", "none"]);
    }
}

/// Host pids of the processes of container `name` on `host` (its cgroup's members).
pub fn container_pids(host: &str, name: &str) -> Vec<i32> {
    for ctl in ["pids", "freezer", "memory", "cpu"] {
        let p = format!("/sys/fs/cgroup/{ctl}/ferry/{host}/{name}/cgroup.procs");
        if let Ok(text) = std::fs::read_to_string(&p) {
            return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    panic!("no cgroup.procs for container {name} on {host}");
}

/// The file descriptors of process `pid` that are userfaultfds (`fd -> anon_inode:[userfaultfd]`).
pub fn userfaultfds(pid: i32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fd");
    dir_entries(&dir)
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("{dir}/{fd}"))
                .map(|t| t.to_string_lossy().contains("userfaultfd"))
                .unwrap_or(false)
        })
        .collect()
}

/// Mappings of process `pid` still registered with a userfaultfd (VmFlags `um`, `uw` or `ui`
/// in /proc/PID/smaps): a tracker left behind.
pub fn userfaultfd_mappings(pid: i32) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut current = String::new();
    let mut found = vec![];
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags
                .split_whitespace()
                .any(|f| matches!(f, "um" | "uw" | "ui"))
            {
                found.push(format!("{current} [{}]", flags.trim()));
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            current = line.to_string();
        }
    }
    found
}

/// Sends `req` to `to`'s agent as `as_host` (with its lab certificate) from inside `as_host`'s
/// namespace, followed by `trees` empty file trees; returns the answer, or
/// `{"transport_error": ...}` when the connection is refused or dropped.
pub fn peer_request(as_host: &str, to: &str, req: &Value, trees: usize) -> Value {
    peer_request_raw(as_host, to, req, &trees.to_string())
}

/// [`peer_request`] followed by the raw bytes `payload` (a base tree, chunks).
pub fn peer_request_payload(as_host: &str, to: &str, req: &Value, payload: &[u8]) -> Value {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    peer_request_raw(as_host, to, req, &format!("hex:{hex}"))
}

fn peer_request_raw(as_host: &str, to: &str, req: &Value, after: &str) -> Value {
    let pki = format!("{LAB_DIR}/pki");
    peer_request_after(
        &format!("ferry-{as_host}"),
        (
            &format!("{pki}/{as_host}.pem"),
            &format!("{pki}/{as_host}.key"),
        ),
        to,
        req,
        after,
    )
}

/// [`peer_request`] from network namespace `netns` with the certificate and key `cert`.
pub fn peer_request_with(
    netns: &str,
    cert: (&str, &str),
    to: &str,
    req: &Value,
    trees: usize,
) -> Value {
    peer_request_after(netns, cert, to, req, &trees.to_string())
}

fn peer_request_after(
    netns: &str,
    cert: (&str, &str),
    to: &str,
    req: &Value,
    after: &str,
) -> Value {
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{LAB_DIR}/{to}.json")).expect("host config"),
    )
    .expect("host config JSON");
    let addr = format!(
        "{}:{}",
        cfg["underlay_ip"].as_str().expect("underlay_ip"),
        cfg["quic_port"]
    );
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(ferry_bin().with_file_name("ferry-test-peer"))
        .arg(format!("{LAB_DIR}/pki/ca.pem"))
        .arg(cert.0)
        .arg(cert.1)
        .arg(addr)
        .arg(to)
        .arg(req.to_string())
        .arg(after)
        .output()
        .expect("running ferry-test-peer");
    assert!(
        out.status.success(),
        "ferry-test-peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry-test-peer printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Asserts that the memory workload at `ip` finds every one of its `size_mib` MiB intact, page
/// by page (index, generation and contents of each).
pub fn assert_memory_intact(ip: &str, size_mib: u64, when: &str) {
    let v = ask_workload(ip, "verify");
    assert!(v.starts_with("verify ok"), "{when}: {v}");
    assert!(
        v.contains(&format!("pages={} ", size_mib * 256)),
        "{when}: every page checked: {v}"
    );
    let s = ask_workload(ip, "status");
    assert!(s.contains("intact=1 bad=0 "), "{when}: {s}");
}

/// Processes whose command line contains `needle` (as `/proc/PID/cmdline` has it, arguments
/// joined by spaces).
pub fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

// --- OCI image layouts built in tests --------------------------------------------------------

/// The sha256 of `path`, hex.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Moves `file` into `layout`'s blobs; returns its descriptor.
pub fn blob(layout: &Path, file: &Path, media_type: &str) -> Value {
    let hex = sha256(file);
    let size = std::fs::metadata(file).unwrap().len();
    std::fs::rename(file, layout.join("blobs/sha256").join(&hex)).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size})
}

/// Writes `v` as a blob of `layout`; returns its descriptor.
pub fn write_json_blob(layout: &Path, v: &Value, media_type: &str) -> Value {
    let tmp = layout.join("tmp.json");
    std::fs::write(&tmp, serde_json::to_vec(v).unwrap()).unwrap();
    blob(layout, &tmp, media_type)
}

/// Packs `dir` into the tar archive `out` (gzip or not), numeric owners.
pub fn tar(dir: &Path, out: &Path, gzip: bool) {
    let status = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(dir)
        .arg(if gzip { "-czf" } else { "-cf" })
        .arg(out)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
}

/// Starts `f` on a thread inside the lab's client network namespace (`ferry-client`), where the
/// overlay's addresses are reachable.
pub fn spawn_in_client_netns<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let ns = std::fs::File::open("/run/netns/ferry-client")
            .expect("the lab's client namespace (/run/netns/ferry-client)");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the client namespace");
        f()
    })
}

/// Imports the root filesystem or OCI archive at `path` into `host`'s store as image `name`;
/// returns the CLI's output.
pub fn import_image(host: &str, name: &str, path: &Path) -> String {
    ferry_ok(&[
        "image",
        "import",
        "--on",
        host,
        "--name",
        name,
        path.to_str().expect("a UTF-8 path"),
    ])
}
