//! Containers as users run them elsewhere, end to end: an image runs as its author meant
//! (entrypoint, command, environment, directory, user) unless `ferry run` says otherwise, and
//! Docker's capabilities, memory and CPU limits, environment and `/dev/shm` hold on every host
//! a container migrates to.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

/// A fresh directory under the lab's directory (removed with the lab).
fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("{LAB_DIR}/test-{name}"));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// The container's first process, as `ferry ps` reports it.
fn pid_of(lab: &Lab, name: &str) -> i32 {
    lab.container(name).expect("listed")["pid"]
        .as_i64()
        .expect("pid") as i32
}

fn status_field(pid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn environ(pid: i32) -> Vec<String> {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn cmdline(pid: i32) -> Vec<String> {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn cwd(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/cwd"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// An HTTP GET of `path` from the client host.
fn http_get(ip: &str, path: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ferry-client",
            "timeout",
            "10",
            "bash",
            "-c",
        ])
        .arg(format!(
            "exec 3<>/dev/tcp/{ip}/7000 && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Downloads Debian's `pkg` (the version this machine's apt knows) into `dir`; returns the
/// `.deb`.
fn debian_package(dir: &Path, pkg: &str) -> PathBuf {
    let out = Command::new("apt-get")
        .args(["download", "-q", pkg])
        .current_dir(dir)
        .output()
        .expect("apt-get");
    assert!(
        out.status.success(),
        "apt-get download {pkg} failed (the test builds its image from Debian's packages and \
         needs Debian's mirror): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .expect("the downloaded .deb")
}

/// An OCI archive of busybox from Debian's `busybox-static` package, with accounts, a web
/// root and a config that serves it with `busybox httpd` as user `app` from `/srv/www`.
fn busybox_image(work: &Path) -> PathBuf {
    let deb = debian_package(work, "busybox-static");
    let root = work.join("root");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success(), "dpkg-deb -x {}", deb.display());
    assert!(root.join("bin/busybox").is_file(), "busybox in the package");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    for d in ["etc", "srv/www", "home/app", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1234:\nweb:x:2345:app\n",
    )
    .unwrap();
    std::fs::write(
        root.join("srv/www/index.html"),
        "served as its author meant\n",
    )
    .unwrap();

    let layout = work.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    tar(&root, &work.join("layer.tar.gz"), true);
    let layer = blob(
        &layout,
        &work.join("layer.tar.gz"),
        "application/vnd.oci.image.layer.v1.tar+gzip",
    );
    let config = write_json_blob(
        &layout,
        &serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {
                "Entrypoint": ["/bin/busybox"],
                "Cmd": ["httpd", "-f", "-p", "7000", "-h", "/srv/www"],
                "Env": ["PATH=/bin", "GREETING=hello"],
                "WorkingDir": "/srv/www",
                "User": "app",
                "ExposedPorts": {"7000/tcp": {}}
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }),
        "application/vnd.oci.image.config.v1+json",
    );
    let mut manifest = write_json_blob(
        &layout,
        &serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": [layer]}),
        "application/vnd.oci.image.manifest.v1+json",
    );
    manifest["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "web:1"});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [manifest]}))
            .unwrap(),
    )
    .unwrap();
    let archive = work.join("web.tar");
    tar(&layout, &archive, false);
    archive
}

#[test]
fn an_oci_archive_from_debian_packages_runs_as_its_author_meant_unless_told_otherwise() {
    let lab = Lab::up();
    let work = scratch("deb-image");
    let archive = busybox_image(&work);
    import_image("h1", "web:1", &archive);
    let listed: Value =
        serde_json::from_str(&ferry_ok(&["image", "ls", "--on", "h1", "--json"])).unwrap();
    let config = &listed[0]["images"][0]["config"];
    assert_eq!(
        config["entrypoint"],
        serde_json::json!(["/bin/busybox"]),
        "{listed}"
    );
    assert_eq!(config["user"], "app", "{listed}");

    // No command: the image's entrypoint and command, environment, directory and user.
    ferry_ok(&["run", "--on", "h1", "--name", "web", "--image", "web:1"]);
    let ip = lab.container("web").unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    wait_port(&ip);
    let check_web = |pid: i32, host: &str| {
        assert_eq!(
            cmdline(pid),
            [
                "/bin/busybox",
                "httpd",
                "-f",
                "-p",
                "7000",
                "-h",
                "/srv/www"
            ],
            "on {host}"
        );
        assert_eq!(
            status_field(pid, "Uid").split_whitespace().next(),
            Some("1234")
        );
        assert_eq!(
            status_field(pid, "Gid").split_whitespace().next(),
            Some("1234")
        );
        assert_eq!(
            status_field(pid, "Groups"),
            "2345",
            "supplementary group from /etc/group"
        );
        assert_eq!(cwd(pid), "/srv/www", "on {host}");
        let env = environ(pid);
        for want in [
            "PATH=/bin",
            "GREETING=hello",
            "HOME=/home/app",
            "HOSTNAME=web",
        ] {
            assert!(
                env.iter().any(|e| e == want),
                "{want} missing on {host}: {env:?}"
            );
        }
        assert!(http_get(&ip, "/index.html").contains("served as its author meant"));
    };
    check_web(pid_of(&lab, "web"), "h1");

    // It moves with all of it, and h2 learns the image's config with its base.
    let (code, r) = migrate_json("web", "h2", &[], Duration::from_secs(120));
    assert_eq!(code, 0, "{r}");
    check_web(pid_of(&lab, "web"), "h2");
    let (code, r) = migrate_json("web", "h1", &["--pre-copy"], Duration::from_secs(120));
    assert_eq!(code, 0, "{r}");
    check_web(pid_of(&lab, "web"), "h1 again");
    let on_h2: Value =
        serde_json::from_str(&ferry_ok(&["image", "ls", "--on", "h2", "--json"])).unwrap();
    assert_eq!(on_h2[0]["images"][0]["config"], *config, "{on_h2}");

    // Flags override the image as `docker run`'s do: the command follows the entrypoint.
    ferry_ok(&[
        "run",
        "--on",
        "h2",
        "--name",
        "ovr",
        "--image",
        "web:1",
        "--env",
        "GREETING=bye",
        "--env",
        "EXTRA=1",
        "--workdir",
        "/tmp",
        "--user",
        "0",
        "--",
        "sleep",
        "1000",
    ]);
    let pid = pid_of(&lab, "ovr");
    assert_eq!(cmdline(pid), ["/bin/busybox", "sleep", "1000"]);
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert_eq!(cwd(pid), "/tmp");
    let env = environ(pid);
    assert!(env.iter().any(|e| e == "GREETING=bye"), "{env:?}");
    assert!(env.iter().any(|e| e == "EXTRA=1"), "{env:?}");
    assert!(
        env.iter().any(|e| e == "HOME=/root"),
        "root's home: {env:?}"
    );
    ferry_ok(&[
        "run",
        "--on",
        "h2",
        "--name",
        "ep",
        "--image",
        "web:1",
        "--entrypoint",
        "/bin/busybox",
        "--user",
        "app:web",
        "--",
        "sleep",
        "1000",
    ]);
    let pid = pid_of(&lab, "ep");
    assert_eq!(
        cmdline(pid),
        ["/bin/busybox", "sleep", "1000"],
        "--entrypoint drops Cmd"
    );
    assert_eq!(
        status_field(pid, "Gid").split_whitespace().next(),
        Some("2345")
    );

    // What the image cannot run is refused, naming the problem; nothing is left behind.
    let out = ferry(&[
        "run", "--on", "h1", "--name", "bad", "--image", "web:1", "--user", "nobody",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"nobody\" is not in the image's /etc/passwd"),
        "{err}"
    );
    assert!(lab.container("bad").is_none());
    assert_clean_host("h1", "bad");
}

/// Docker's default bounding set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID,
/// SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP).
const DOCKER_CAPS: u64 = 0xa804_25fb;
const CAP_NET_RAW: u64 = 1 << 13;
const CAP_SYS_PTRACE: u64 = 1 << 19;

fn cap_bnd(pid: i32) -> u64 {
    u64::from_str_radix(&status_field(pid, "CapBnd"), 16).unwrap()
}

/// The cgroup v1 file `file` of controller `ctrl` for the container on `host`.
fn cgroup_file(host: &str, name: &str, ctrl: &str, file: &str) -> String {
    let p = format!("/sys/fs/cgroup/{ctrl}/ferry/{host}/{name}/{file}");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn capabilities_limits_environment_and_shm_are_dockers_and_move_with_the_container() {
    let lab = Lab::up();
    let plain = lab.run_echo("h1", "plain");
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "tuned",
        "--cap-add",
        "sys_ptrace",
        "--cap-drop",
        "NET_RAW",
        "--memory",
        "192m",
        "--cpus",
        "0.5",
        "--env",
        "MODE=tuned",
        "--",
        "/bin/ferry-workload",
        "echo",
        "--port",
        "7000",
    ]);
    let tuned = lab.container("tuned").unwrap();
    wait_port(tuned["ip"].as_str().unwrap());

    let check = |host: &str| {
        let p = pid_of(&lab, "plain");
        assert_eq!(cap_bnd(p), DOCKER_CAPS, "Docker's default set on {host}");
        assert_eq!(
            u64::from_str_radix(&status_field(p, "CapEff"), 16).unwrap(),
            DOCKER_CAPS,
            "root's effective set on {host}"
        );
        let t = pid_of(&lab, "tuned");
        let bnd = cap_bnd(t);
        assert_eq!(bnd & CAP_NET_RAW, 0, "NET_RAW dropped on {host}");
        assert_ne!(bnd & CAP_SYS_PTRACE, 0, "SYS_PTRACE added on {host}");
        assert_eq!(bnd | CAP_NET_RAW, DOCKER_CAPS | CAP_SYS_PTRACE);
        assert_eq!(
            cgroup_file(host, "tuned", "memory", "memory.limit_in_bytes"),
            (192u64 << 20).to_string(),
            "memory limit on {host}"
        );
        assert_eq!(
            cgroup_file(host, "tuned", "cpu", "cpu.cfs_quota_us"),
            "50000"
        );
        assert_eq!(
            cgroup_file(host, "tuned", "cpu", "cpu.cfs_period_us"),
            "100000"
        );
        assert_eq!(cgroup_file(host, "plain", "cpu", "cpu.cfs_quota_us"), "-1");
        assert!(environ(t).iter().any(|e| e == "MODE=tuned"), "on {host}");
        // /dev/shm: a tmpfs of Docker's 64 MiB.
        let out = Command::new("stat")
            .args(["-f", "-c", "%T %b %S"])
            .arg(format!("/proc/{t}/root/dev/shm"))
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = s.split_whitespace().collect();
        assert_eq!(f[0], "tmpfs", "{s}");
        let bytes = f[1].parse::<u64>().unwrap() * f[2].parse::<u64>().unwrap();
        assert_eq!(bytes, 64 << 20, "/dev/shm size on {host}");
    };
    check("h1");
    for (to, extra) in [("h2", vec![]), ("h1", vec!["--pre-copy"])] {
        for name in ["plain", "tuned"] {
            let (code, r) = migrate_json(name, to, &extra, Duration::from_secs(120));
            assert_eq!(code, 0, "{name} -> {to} {extra:?}: {r}");
            assert_runs_on(&lab, to, name);
        }
        check(to);
    }
    assert_eq!(ask_workload(plain["ip"].as_str().unwrap(), "hi"), "1 hi");
    assert_eq!(ask_workload(tuned["ip"].as_str().unwrap(), "hi"), "1 hi");

    // Options that cannot hold are refused before anything is made.
    for (args, want) in [
        (vec!["--cap-add", "CAP_FLY"], "unknown capability"),
        (vec!["--memory", "1m"], "below the 6 MiB"),
        (vec!["--cpus", "64"], "this host has"),
        (vec!["--env", "=x"], "empty key"),
        (vec!["--workdir", "relative"], "absolute path"),
    ] {
        let mut cmd = vec!["run", "--on", "h2", "--name", "refused"];
        cmd.extend(&args);
        cmd.extend(["--", "/bin/ferry-workload", "echo", "--port", "7000"]);
        let out = ferry(&cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    assert!(lab.container("refused").is_none());
}

/// The global IPv6 addresses of `pid`'s network namespace's `eth0`.
fn ipv6_addrs(pid: i32) -> Vec<String> {
    let out = Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ip",
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .args(["scope", "global"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "inet6")?;
            w.next().map(str::to_owned)
        })
        .collect()
}

#[test]
fn each_container_has_a_stable_ipv6_address_and_ipv6_connections_survive_its_moves() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "six");
    let ip = c["ip"].as_str().unwrap().to_string();
    let v6 = c["ipv6"]
        .as_str()
        .unwrap_or_else(|| panic!("no IPv6 address in ferry ps: {c}"))
        .to_string();
    assert!(v6.starts_with("fd00:f3::"), "{v6}");
    assert_eq!(ipv6_addrs(pid_of(&lab, "six")), vec![format!("{v6}/64")]);

    // The server listens once, dual-stack: IPv4 clients reach it (run_echo waited for that) and
    // an IPv6 client keeps its connection through a stop-and-copy and a pre-copy move. (One
    // client at a time: the echo server's counter is shared by its connections.)
    let p6 = Probe::start_at(&format!("[{v6}]:7000"), "six-v6");
    let (code, r) = migrate_json("six", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{r}");
    let (code, r) = migrate_json("six", "h1", &["--pre-copy"], Duration::from_secs(60));
    assert_eq!(code, 0, "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let r6 = p6.finish();
    assert_probe_intact(&r6);

    let after = lab.container("six").unwrap();
    assert_eq!(after["host"], "h1");
    assert_eq!(after["ipv6"], v6, "the IPv6 address is kept");
    assert_eq!(ipv6_addrs(pid_of(&lab, "six")), vec![format!("{v6}/64")]);
    wait_port(&ip);
    println!(
        "ipv6: client max gap {:.1} ms over two moves",
        r6["max_gap_ms"].as_f64().unwrap()
    );

    // A second container gets its own address; addresses are derived from the IPv4 one.
    let d = lab.run_echo("h2", "six-b");
    assert_ne!(d["ipv6"], v6);
    assert!(d["ipv6"].as_str().unwrap().starts_with("fd00:f3::"));
    ferry_ok(&["rm", "six"]);
    ferry_ok(&["rm", "six-b"]);
}

/// `field=value` of a `files` workload answer.
fn field<'a>(answer: &'a str, name: &str) -> &'a str {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name} in {answer:?}"))
}

/// The kinds of lock (`POSIX`, `FLOCK`) `/proc/locks` lists for `pid`, sorted.
fn locks_of(pid: i32) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some(&pid.to_string()))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn watches_locks_and_open_files_of_the_image_still_work_after_moves() {
    let lab = Lab::up();
    // An image whose root is an overlay: the watched directory and the held file are in its
    // lower layer.
    let root = scratch("files").join("rootfs");
    ferry_ok(&["lab", "rootfs", root.to_str().unwrap()]);
    std::fs::create_dir_all(root.join("srv/watched")).unwrap();
    std::fs::write(
        root.join("srv/held.txt"),
        "a file of the image\n".repeat(1000),
    )
    .unwrap();
    import_image("h1", "files:1", &root);
    // SYS_ADMIN for fanotify.
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "files",
        "--image",
        "files:1",
        "--cap-add",
        "SYS_ADMIN",
        "--",
        "/bin/ferry-workload",
        "files",
        "--dir",
        "/srv/watched",
        "--hold",
        "/srv/held.txt",
        "--port",
        "7000",
    ]);
    let ip = lab.container("files").unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    wait_port(&ip);

    let mut expected_inotify = 0u64;
    let mut expected_fanotify = 0u64;
    let mut check = |host: &str, round: u32| {
        let pid = pid_of(&lab, "files");
        assert_eq!(
            locks_of(pid),
            ["FLOCK", "POSIX"],
            "the host's /proc/locks on {host}"
        );
        let before = ask_workload(&ip, "status");
        assert_eq!(
            field(&before, "hold"),
            "same",
            "the image file held open on {host}: {before}"
        );
        assert_eq!(
            field(&before, "inotify"),
            expected_inotify.to_string(),
            "{before}"
        );
        assert_eq!(
            field(&before, "fanotify"),
            expected_fanotify.to_string(),
            "{before}"
        );
        let name = format!("made-on-{host}-{round}");
        assert_eq!(ask_workload(&ip, &format!("touch {name}")), "ok");
        // IN_CREATE and IN_CLOSE_WRITE; FAN_CLOSE_WRITE.
        expected_inotify += 2;
        expected_fanotify += 1;
        assert!(
            eventually(Duration::from_secs(5), || {
                let s = ask_workload(&ip, "status");
                field(&s, "inotify") == expected_inotify.to_string()
                    && field(&s, "fanotify") == expected_fanotify.to_string()
            }),
            "the watches did not fire on {host}: {}",
            ask_workload(&ip, "status")
        );
        assert_eq!(field(&ask_workload(&ip, "status"), "last"), name);
        // Another process of the container finds both locks taken, the POSIX one by the
        // workload (pid 1 in the container).
        let locks = ask_workload(&ip, "locks");
        assert_eq!(field(&locks, "flock"), "held", "{locks}");
        assert_eq!(
            field(&locks, "posix"),
            format!("held-by-{}", field(&locks, "owner")),
            "{locks}"
        );
    };
    check("h1", 0);
    let (code, r) = migrate_json("files", "h2", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "stop-and-copy: {r}");
    check("h2", 1);
    let (code, r) = migrate_json("files", "h1", &["--pre-copy"], Duration::from_secs(60));
    assert_eq!(code, 0, "pre-copy: {r}");
    check("h1", 2);
    ferry_ok(&["rm", "files"]);
}

#[test]
fn what_criu_cannot_dump_is_refused_before_the_freeze_or_explained_after_it() {
    let lab = Lab::up();
    for (name, flag) in [("ring", "--io-uring"), ("zombie", "--zombie-threads")] {
        ferry_ok(&[
            "run",
            "--on",
            "h1",
            "--name",
            name,
            "--",
            "/bin/ferry-workload",
            "objects",
            flag,
            "--port",
            "7000",
        ]);
        let ip = lab.container(name).unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_string();
        wait_port(&ip);
        for mode in [&[][..], &["--pre-copy"][..]] {
            let (code, r) = migrate_json(name, "h2", mode, Duration::from_secs(60));
            assert_eq!(code, 2, "refused: {r}");
            let reason = r["reason"]
                .as_str()
                .unwrap_or_else(|| panic!("no reason in {r}"));
            assert!(reason.contains("Preflight failed"), "{reason}");
            assert!(reason.contains("nothing was frozen"), "{reason}");
            let expected = match name {
                "ring" => "holds descriptor 3, an io_uring instance (anon_inode:[io_uring])",
                _ => "is a zombie whose 1 other thread(s) still run",
            };
            assert!(reason.contains(expected), "{reason}");
            assert!(reason.contains("migrate again"), "what to do: {reason}");
            assert_eq!(r["frozen_ms"].as_f64(), Some(0.0), "never frozen: {r}");
            assert_runs_on(&lab, "h1", name);
            assert_eq!(ask_workload(&ip, "hi"), "alive");
        }
        ferry_ok(&["rm", name]);
    }

    // An object made after the preflight (while the migration waits in its prepare phase) is
    // found by CRIU in the freeze: its log is translated into the same statement.
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "late",
        "--",
        "/bin/ferry-workload",
        "objects",
        "--port",
        "7000",
    ]);
    let ip = lab.container("late").unwrap()["ip"]
        .as_str()
        .unwrap()
        .to_string();
    wait_port(&ip);
    let pid = pid_of(&lab, "late");
    let (_, job) = start_migration(
        "late",
        "h2",
        &["--pause-in-phase", "prepare", "--pause-in-phase-ms", "3000"],
    );
    wait_job_state(&job, "preparing");
    assert_eq!(ask_workload(&ip, "ring"), "ok");
    let r = wait_job(&job);
    assert_eq!(r["result"], "rolled_back", "{r}");
    let reason = r["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no reason in {r}"));
    assert!(
        reason.starts_with(&format!(
            "Dump failed: process {pid} (ferry-workload) holds descriptor "
        )) && reason.contains(", an io_uring instance (anon_inode:[io_uring])"),
        "{reason}"
    );
    assert!(reason.contains("migrate again"), "{reason}");
    assert_runs_on(&lab, "h1", "late");
    assert_eq!(ask_workload(&ip, "hi"), "alive");
    ferry_ok(&["rm", "late"]);
}

#[test]
fn a_destination_whose_cpu_lacks_instruction_sets_is_refused_unless_told() {
    let lab = Lab::up();
    let c = lab.run_echo("h1", "cpu");
    let ip = c["ip"].as_str().unwrap().to_string();
    // Two instruction sets this CPU has, hidden from what h2 offers.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split_once(':')))
        .map(|(_, v)| v.split_whitespace().collect())
        .unwrap();
    let mut hidden: Vec<&str> = ["avx2", "sse4_2", "ssse3", "sse2", "sse"]
        .into_iter()
        .filter(|f| flags.contains(f))
        .take(2)
        .collect();
    hidden.sort();
    assert_eq!(
        hidden.len(),
        2,
        "this CPU has too few of the flags looked for: {flags:?}"
    );
    lab.kill_agent("h2");
    let cfg_path = format!("{LAB_DIR}/h2.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["hide_cpu_flags"] = serde_json::json!(hidden);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    ferry_ok(&["lab", "start-agent", "h2"]);

    for mode in [&[][..], &["--pre-copy"][..]] {
        let (code, r) = migrate_json("cpu", "h2", mode, Duration::from_secs(60));
        assert_eq!(code, 2, "refused: {r}");
        let reason = r["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!(
                "h2's CPU lacks instruction sets that h1's has: {}",
                hidden.join(", ")
            )),
            "{reason}"
        );
        assert!(
            reason.contains("SIGILL") && reason.contains("--ignore-cpu-features"),
            "{reason}"
        );
        assert_eq!(
            r["frozen_ms"].as_f64(),
            Some(0.0),
            "refused before the freeze: {r}"
        );
        assert_runs_on(&lab, "h1", "cpu");
        assert_eq!(ask_workload(&ip, "x").split_whitespace().nth(1), Some("x"));
    }
    let (code, r) = migrate_json(
        "cpu",
        "h2",
        &["--ignore-cpu-features"],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "told to ignore them: {r}");
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains("moved anyway (ignore_cpu_features)"),
        "{r}"
    );
    assert_runs_on(&lab, "h2", "cpu");
    // h1 offers everything h2 does: back without a word.
    let (code, r) = migrate_json("cpu", "h1", &[], Duration::from_secs(60));
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["warnings"].as_array().map(Vec::len), Some(0), "{r}");
    ferry_ok(&["rm", "cpu"]);
}
