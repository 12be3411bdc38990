//! Real applications from Debian's packages, moved under their clients: PostgreSQL (a postmaster
//! and its workers, shared memory) with a client inserting rows over one connection, and nginx
//! (master and workers) serving a file. Each moves twice, stop-and-copy then pre-copy; nothing
//! acknowledged may be lost and no request may fail.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::Value;

const PG_PORT: u16 = 5432;
const WEB_PORT: u16 = 8080;

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts undone on drop (the image must not carry them, and a failed build must not leave
/// them behind).
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

/// A root filesystem with PostgreSQL 15, nginx and dash from Debian's packages (and what they
/// depend on), an initialised database cluster owned by `postgres` that trusts the overlay, and
/// an nginx configuration that serves `/srv/www` on port 8080 with two workers.
fn apps_rootfs(work: &Path) -> PathBuf {
    let debs = work.join("debs");
    let root = work.join("root");
    std::fs::create_dir_all(&debs).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            "postgresql-15",
            "nginx",
            "dash",
        ])
        .output()
        .expect("apt-cache");
    let mut pkgs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(str::to_owned)
        .collect();
    pkgs.sort();
    pkgs.dedup();
    assert!(
        pkgs.len() > 20,
        "dependencies of postgresql-15 and nginx: {pkgs:?}"
    );
    let st = Command::new("apt-get")
        .args(["download", "-q"])
        .args(&pkgs)
        .current_dir(&debs)
        .output()
        .expect("apt-get");
    assert!(
        st.status.success(),
        "apt-get download failed (the test builds its image from Debian's packages and needs \
         Debian's mirror): {}",
        String::from_utf8_lossy(&st.stderr)
    );
    for e in std::fs::read_dir(&debs).unwrap().flatten() {
        run_ok(Command::new("dpkg-deb").arg("-x").arg(e.path()).arg(&root));
    }
    // What the servers do not need: documentation, every locale but C.UTF-8, LLVM (JIT only).
    for rel in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "usr/share/info",
        "usr/share/i18n",
        "usr/lib/llvm-14",
        "usr/lib/postgresql/15/lib/bitcode",
    ] {
        let _ = std::fs::remove_dir_all(root.join(rel));
    }
    for dir in ["usr/lib/locale", "usr/lib/x86_64-linux-gnu"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let drop = if dir == "usr/lib/locale" {
                n != "C.utf8"
            } else {
                n.starts_with("libLLVM") || n.starts_with("libz3")
            };
            if drop {
                let p = e.path();
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
    }
    let _ = std::fs::remove_file(root.join("bin/sh"));
    std::os::unix::fs::symlink("dash", root.join("bin/sh")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n\
         postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nwww-data:x:33:\npostgres:x:999:\n",
    )
    .unwrap();
    for d in [
        "tmp",
        "dev",
        "proc",
        "var/lib/postgresql",
        "var/lib/nginx",
        "var/log/nginx",
        "srv/www",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    run_ok(Command::new("chmod").arg("1777").arg(root.join("tmp")));
    run_ok(
        Command::new("chown")
            .arg("999:999")
            .arg(root.join("var/lib/postgresql")),
    );
    {
        let _mounts = {
            run_ok(
                Command::new("mount")
                    .arg("--bind")
                    .arg("/dev")
                    .arg(root.join("dev")),
            );
            let mut m = Mounts(vec![root.join("dev")]);
            run_ok(
                Command::new("mount")
                    .args(["-t", "proc", "proc"])
                    .arg(root.join("proc")),
            );
            m.0.push(root.join("proc"));
            m
        };
        run_ok(
            Command::new("chroot")
                .arg("--userspec=999:999")
                .arg(&root)
                .args([
                    "/usr/lib/postgresql/15/bin/initdb",
                    "-D",
                    "/var/lib/postgresql/data",
                    "--auth=trust",
                    "--no-locale",
                    "-E",
                    "UTF8",
                ]),
        );
    }
    let hba = root.join("var/lib/postgresql/data/pg_hba.conf");
    let mut t = std::fs::read_to_string(&hba).unwrap();
    t.push_str("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n");
    std::fs::write(&hba, t).unwrap();
    std::fs::write(
        root.join("etc/nginx/ferry.conf"),
        "user www-data;\nworker_processes 2;\npid /tmp/nginx.pid;\nerror_log stderr;\n\
         events { worker_connections 256; }\n\
         http {\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
           server {\n    listen 8080;\n    listen [::]:8080;\n    root /srv/www;\n  }\n}\n",
    )
    .unwrap();
    std::fs::write(root.join("srv/www/blob"), blob()).unwrap();
    root
}

/// The file nginx serves: 64 KiB that a client can check byte for byte.
fn blob() -> Vec<u8> {
    (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A PostgreSQL client speaking protocol 3.0 with trust authentication, simple queries only.
struct Pg {
    s: TcpStream,
}

impl Pg {
    fn connect(addr: SocketAddr) -> Result<Pg, String> {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut pg = Pg { s };
        let mut body = vec![];
        body.extend_from_slice(&196_608u32.to_be_bytes());
        for kv in ["user", "postgres", "database", "postgres"] {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&body);
        pg.s.write_all(&msg).map_err(|e| e.to_string())?;
        pg.until_ready()?;
        Ok(pg)
    }

    fn message(&mut self) -> Result<(u8, Vec<u8>), String> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).map_err(|e| e.to_string())?;
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        if !(4..1 << 20).contains(&len) {
            return Err(format!("message of {len} bytes"));
        }
        let mut body = vec![0u8; len - 4];
        self.s.read_exact(&mut body).map_err(|e| e.to_string())?;
        Ok((head[0], body))
    }

    /// Reads to ReadyForQuery; returns the data rows' first columns.
    fn until_ready(&mut self) -> Result<Vec<String>, String> {
        let mut rows = vec![];
        let mut error = None;
        loop {
            let (kind, body) = self.message()?;
            match kind {
                b'Z' => return error.map_or(Ok(rows), Err),
                b'E' => error = Some(String::from_utf8_lossy(&body).replace('\0', " ")),
                b'R' if body[..4] != [0, 0, 0, 0] => return Err("authentication asked".into()),
                b'D' => {
                    let n = u16::from_be_bytes([body[0], body[1]]);
                    let mut at = 2;
                    let mut cols = vec![];
                    for _ in 0..n {
                        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
                        at += 4;
                        if len < 0 {
                            cols.push(String::new());
                        } else {
                            cols.push(
                                String::from_utf8_lossy(&body[at..at + len as usize]).into_owned(),
                            );
                            at += len as usize;
                        }
                    }
                    rows.push(cols.join("|"));
                }
                _ => {}
            }
        }
    }

    fn query(&mut self, sql: &str) -> Result<Vec<String>, String> {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.s.write_all(&msg).map_err(|e| e.to_string())?;
        self.until_ready()
    }
}

/// What a client saw: answers, errors, and its longest wait for one answer.
#[derive(Debug, Default)]
struct Seen {
    acked: u64,
    errors: Vec<String>,
    max_gap_ms: f64,
}

/// Inserts rows 1, 2, ... over one connection until `stop`; every acknowledged row counts.
fn pg_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut pg = match Pg::connect(addr) {
        Ok(p) => p,
        Err(e) => {
            seen.errors.push(format!("connect: {e}"));
            return seen;
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        let v = seen.acked + 1;
        match pg.query(&format!("INSERT INTO acked(v) VALUES ({v}) RETURNING v")) {
            Ok(rows) if rows == [v.to_string()] => seen.acked = v,
            Ok(rows) => seen.errors.push(format!("insert {v} answered {rows:?}")),
            Err(e) => {
                seen.errors.push(format!("insert {v}: {e}"));
                return seen;
            }
        }
        seen.max_gap_ms = seen.max_gap_ms.max(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

/// GETs `/blob` until `stop`, on one keep-alive connection with a fresh one every 25 requests;
/// every body is checked byte for byte.
fn web_client(addr: SocketAddr, stop: Arc<AtomicBool>) -> Seen {
    let want = blob();
    let mut seen = Seen::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        if conn.is_none() || seen.acked % 25 == 0 {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    conn = Some(BufReader::new(s));
                }
                Err(e) => {
                    seen.errors.push(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let r = conn.as_mut().unwrap();
        let got = (|| -> Result<Vec<u8>, String> {
            r.get_mut()
                .write_all(b"GET /blob HTTP/1.1\r\nHost: web\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut status = String::new();
            r.read_line(&mut status).map_err(|e| e.to_string())?;
            if !status.starts_with("HTTP/1.1 200") {
                return Err(format!("status {status:?}"));
            }
            let mut len = 0;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).map_err(|e| e.to_string())?;
                if h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().map_err(|_| format!("length {h:?}"))?;
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).map_err(|e| e.to_string())?;
            Ok(body)
        })();
        match got {
            Ok(body) if body == want => seen.acked += 1,
            Ok(body) => seen
                .errors
                .push(format!("a body of {} bytes differs", body.len())),
            Err(e) => {
                seen.errors.push(e);
                conn = None;
            }
        }
        seen.max_gap_ms = seen.max_gap_ms.max(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

fn wait_tcp(addr: SocketAddr) {
    let ok = spawn_in_client_netns(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })
    .join()
    .unwrap();
    assert!(ok, "{addr} never answered");
}

fn summary(app: &str, r: &Value) -> String {
    format!(
        "{app} {} -> {} ({}): frozen {:.0} ms, total {:.0} ms, {:.1} MiB sent",
        r["from"].as_str().unwrap_or("?"),
        r["to"].as_str().unwrap_or("?"),
        r["mode"].as_str().unwrap_or("?"),
        r["frozen_ms"].as_f64().unwrap_or(0.0),
        r["total_ms"].as_f64().unwrap_or(0.0),
        r["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
    )
}

#[test]
fn postgresql_and_nginx_from_debian_keep_every_acknowledged_write_and_answer_through_two_moves() {
    let lab = Lab::up();
    let work = PathBuf::from(format!("{LAB_DIR}/test-apps"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let root = apps_rootfs(&work);
    import_image("h1", "apps:1", &root);
    let _ = std::fs::remove_dir_all(&work);

    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "pg",
        "--image",
        "apps:1",
        "--user",
        "postgres",
        "--",
        "/usr/lib/postgresql/15/bin/postgres",
        "-D",
        "/var/lib/postgresql/data",
        "-c",
        "listen_addresses=*",
        "-c",
        "unix_socket_directories=/tmp",
        "-c",
        "shared_buffers=32MB",
    ]);
    ferry_ok(&[
        "run",
        "--on",
        "h1",
        "--name",
        "web",
        "--image",
        "apps:1",
        "--",
        "/usr/sbin/nginx",
        "-c",
        "/etc/nginx/ferry.conf",
        "-g",
        "daemon off;",
    ]);
    let ip = |name: &str| {
        lab.container(name).unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let pg_addr: SocketAddr = format!("{}:{PG_PORT}", ip("pg")).parse().unwrap();
    let web_addr: SocketAddr = format!("{}:{WEB_PORT}", ip("web")).parse().unwrap();
    wait_tcp(pg_addr);
    wait_tcp(web_addr);
    // Many processes: the postmaster and its workers; nginx's master and two workers.
    assert!(container_pids("h1", "pg").len() >= 5, "postgres processes");
    assert_eq!(
        container_pids("h1", "web").len(),
        3,
        "nginx master and workers"
    );
    spawn_in_client_netns(move || {
        Pg::connect(pg_addr)
            .and_then(|mut p| p.query("CREATE TABLE acked (v bigint PRIMARY KEY)"))
            .expect("creating the table")
    })
    .join()
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (s1, s2) = (Arc::clone(&stop), Arc::clone(&stop));
    let pg = spawn_in_client_netns(move || pg_client(pg_addr, s1));
    let web = spawn_in_client_netns(move || web_client(web_addr, s2));
    std::thread::sleep(Duration::from_millis(500));
    let mut lines = vec![];
    for (to, mode) in [("h2", &[][..]), ("h1", &["--pre-copy"][..])] {
        for app in ["pg", "web"] {
            let (code, r) = migrate_json(app, to, mode, Duration::from_secs(300));
            assert_eq!(code, 0, "{app} to {to} {mode:?}: {r}");
            assert_eq!(r["result"], "completed", "{r}");
            lines.push(summary(app, &r));
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (pg_seen, web_seen) = (pg.join().unwrap(), web.join().unwrap());
    for l in &lines {
        println!("{l}");
    }
    println!(
        "postgres client: {} inserts acknowledged, longest wait {:.0} ms; nginx client: {} \
         answers, longest wait {:.0} ms",
        pg_seen.acked, pg_seen.max_gap_ms, web_seen.acked, web_seen.max_gap_ms
    );
    assert!(
        pg_seen.errors.is_empty(),
        "postgres client: {:?}",
        pg_seen.errors
    );
    assert!(
        web_seen.errors.is_empty(),
        "nginx client: {:?}",
        web_seen.errors
    );
    assert!(
        pg_seen.acked > 50 && web_seen.acked > 50,
        "{pg_seen:?} {web_seen:?}"
    );
    // Every acknowledged row is there, on a new connection to the moved server.
    let acked = pg_seen.acked;
    let rows = spawn_in_client_netns(move || {
        Pg::connect(pg_addr)
            .and_then(|mut p| p.query("SELECT count(*) || ' ' || max(v) FROM acked"))
    })
    .join()
    .unwrap()
    .expect("counting rows");
    assert_eq!(rows, [format!("{acked} {acked}")], "acknowledged rows kept");
    assert_runs_on(&lab, "h1", "pg");
    assert_runs_on(&lab, "h1", "web");
    ferry_ok(&["rm", "pg"]);
    ferry_ok(&["rm", "web"]);
}
