//! How a new container's process runs: the request (`ferry run` flags, `POST
//! /v1/containers`) over the image's config over Docker's defaults, resolved once at
//! creation into the spec's [`ProcessSpec`] and [`Resources`], which travel with the container
//! on every migration.
//!
//! The rules are `docker run`'s:
//! - command: a command given replaces the image's `Cmd` and follows its `Entrypoint`;
//!   `--entrypoint` replaces the entrypoint and drops the image's `Cmd`;
//! - environment: the image's `Env`, then each `--env` (same key: the request wins); `PATH`
//!   defaults to Docker's, `HOME` to the user's home from the image's `/etc/passwd` (else `/`),
//!   `HOSTNAME` is the container's name;
//! - working directory: `--workdir`, else the image's `WorkingDir`, else `/`;
//! - user: `--user`, else the image's `User`, else root: `name`, `uid`, `name:group`,
//!   `uid:gid`, names looked up in the image's `/etc/passwd` and `/etc/group` (read beneath
//!   the root without following links; a file that is missing, a link or too large counts as
//!   absent), supplementary groups from `/etc/group`;
//! - capabilities: Docker's default set, then `--cap-add`, then `--cap-drop` (`ALL` allowed
//!   in both; names with or without `CAP_`, any case).

use std::io::Read;
use std::path::Path;

use caps::Capability;
use ferry_api::{ProcessSpec, Resources, DEFAULT_CAPS, DEFAULT_PATH};
use shared_fs::oci::ImageConfig;

/// Every capability the `caps` crate knows (those of Linux 5.9+, as runc), in the kernel's
/// order, by their `CAP_` names.
pub fn all_caps() -> Vec<String> {
    let mut all: Vec<Capability> = caps::all().into_iter().collect();
    all.sort_by_key(|c| c.index());
    all.iter().map(Capability::to_string).collect()
}

/// Whether `name` (`CAP_` form) is a capability.
fn is_cap(name: &str) -> bool {
    name.parse::<Capability>().is_ok()
}

/// Largest `/etc/passwd` or `/etc/group` read from an image.
const MAX_ACCOUNTS_FILE: u64 = 4 << 20;

/// Smallest memory limit accepted (Docker's).
pub const MIN_MEMORY_BYTES: u64 = 6 << 20;

/// What the request says about the process; every field may be absent.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Command and arguments (empty: the image's).
    pub args: Vec<String>,
    /// Replaces the image's entrypoint (an empty list clears it).
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` each.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group`, `uid:gid`.
    pub user: Option<String>,
    /// Capabilities added to the default set.
    pub cap_add: Vec<String>,
    /// Capabilities removed from it.
    pub cap_drop: Vec<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
}

/// The command to run: `docker run`'s rules (see the module's documentation).
pub fn command(req: &Request, image: Option<&ImageConfig>) -> Result<Vec<String>, String> {
    let empty = ImageConfig::default();
    let cfg = image.unwrap_or(&empty);
    let (entry, default_cmd) = match &req.entrypoint {
        Some(e) => (e.clone(), vec![]),
        None => (cfg.entrypoint.clone(), cfg.cmd.clone()),
    };
    let tail = if req.args.is_empty() {
        default_cmd
    } else {
        req.args.clone()
    };
    let all: Vec<String> = entry.into_iter().chain(tail).collect();
    if all.is_empty() {
        return Err(match image {
            Some(_) => "the image has neither an entrypoint nor a command: give one (ferry run ... -- CMD ARGS)".into(),
            None => "no command given: ferry run ... -- CMD ARGS".into(),
        });
    }
    Ok(all)
}

/// Checks one `KEY=VALUE`.
fn check_env(e: &str) -> Result<(), String> {
    let Some((k, _)) = e.split_once('=') else {
        return Err(format!("environment entry {e:?} is not KEY=VALUE"));
    };
    if k.is_empty() || e.contains('\0') {
        return Err(format!(
            "environment entry {e:?} has an empty key or a NUL byte"
        ));
    }
    Ok(())
}

/// The environment: the image's, then the request's, then the defaults for what neither set.
pub fn environment(
    req: &Request,
    image: Option<&ImageConfig>,
    name: &str,
    home: &str,
) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = vec![];
    let image_env = image.map(|c| c.env.as_slice()).unwrap_or_default();
    for e in image_env.iter().chain(&req.env) {
        check_env(e)?;
        let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
        out.retain(|o| o.split_once('=').map_or(o.as_str(), |(k, _)| k) != key);
        out.push(e.clone());
    }
    let has = |out: &[String], key: &str| out.iter().any(|o| o.starts_with(&format!("{key}=")));
    if !has(&out, "PATH") {
        out.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&out, "HOSTNAME") {
        out.push(format!("HOSTNAME={name}"));
    }
    if !has(&out, "HOME") {
        out.push(format!("HOME={home}"));
    }
    Ok(out)
}

/// The working directory: absolute, without `..`.
pub fn workdir(req: &Request, image: Option<&ImageConfig>) -> Result<String, String> {
    let w = req
        .workdir
        .clone()
        .or_else(|| {
            image
                .map(|c| c.working_dir.clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".into());
    if !w.starts_with('/') || w.split('/').any(|c| c == "..") || w.contains('\0') {
        return Err(format!(
            "working directory {w:?} must be an absolute path without '..'"
        ));
    }
    Ok(w)
}

/// Normalizes a capability name (`net_raw`, `CAP_NET_RAW`) or `ALL`.
fn cap_name(c: &str) -> Result<String, String> {
    let up = c.trim().to_ascii_uppercase();
    if up == "ALL" {
        return Ok(up);
    }
    let full = if up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    };
    if is_cap(&full) {
        Ok(full)
    } else {
        let known: Vec<String> = all_caps().iter().map(|c| c[4..].to_string()).collect();
        Err(format!(
            "unknown capability {c:?} (known: {}, or ALL)",
            known.join(", ")
        ))
    }
}

/// The capability set, as Docker's `TweakCapabilities` makes it: `--cap-add ALL` is every
/// capability but those dropped; `--cap-drop ALL` is exactly those added; otherwise Docker's
/// defaults minus those dropped, plus those added.
pub fn capabilities(add: &[String], drop: &[String]) -> Result<Vec<String>, String> {
    let add = add
        .iter()
        .map(|c| cap_name(c))
        .collect::<Result<Vec<_>, _>>()?;
    let drop = drop
        .iter()
        .map(|c| cap_name(c))
        .collect::<Result<Vec<_>, _>>()?;
    let all = |v: &[String]| v.iter().any(|c| c == "ALL");
    let mut set: Vec<String> = if all(&add) {
        all_caps()
            .into_iter()
            .filter(|c| !drop.contains(c))
            .collect()
    } else if all(&drop) {
        add
    } else {
        DEFAULT_CAPS
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !drop.contains(c))
            .chain(add)
            .collect()
    };
    set.sort_by_key(|c| c.parse::<Capability>().map(|c| c.index()).ok());
    set.dedup();
    Ok(set)
}

/// Limits: memory at least [`MIN_MEMORY_BYTES`]; CPUs above 0 and at most the host's.
pub fn resources(req: &Request, host_cpus: usize) -> Result<Resources, String> {
    if let Some(m) = req.memory_bytes {
        if m < MIN_MEMORY_BYTES {
            return Err(format!(
                "memory limit {m} bytes is below the {} MiB a container needs at least",
                MIN_MEMORY_BYTES >> 20
            ));
        }
    }
    let cpu_millis = match req.cpus {
        None => None,
        Some(c) if !(c.is_finite() && c > 0.0) => {
            return Err(format!("--cpus {c}: give a number of cores above 0"))
        }
        Some(c) if c > host_cpus as f64 => {
            return Err(format!("--cpus {c}: this host has {host_cpus} CPUs"))
        }
        Some(c) => Some(((c * 1000.0).round() as u64).max(1)),
    };
    Ok(Resources {
        memory_bytes: req.memory_bytes,
        cpu_millis,
    })
}

/// One account of `/etc/passwd`: name, uid, gid, home.
struct Account {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(text: &str) -> Vec<Account> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7).then(|| {
                Some(Account {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                })
            })?
        })
        .collect()
}

/// `/etc/group`: (name, gid, members).
fn groups(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then(|| {
                Some((
                    f[0].to_string(),
                    f[2].parse().ok()?,
                    f[3].split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                ))
            })?
        })
        .collect()
}

/// The user as numbers, and its home: `spec` (`user`, `uid`, `user:group`, `uid:gid`)
/// resolved against the root's `/etc/passwd` and `/etc/group` texts (empty when absent).
pub fn user(
    spec: &str,
    passwd_text: &str,
    group_text: &str,
) -> Result<(u32, u32, Vec<u32>, String), String> {
    let accounts = passwd(passwd_text);
    let all_groups = groups(group_text);
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if u.is_empty() {
        return Err(format!("user {spec:?}: empty user name"));
    }
    let account = match u.parse::<u32>() {
        Ok(uid) => accounts.iter().find(|a| a.uid == uid),
        Err(_) => Some(accounts.iter().find(|a| a.name == u).ok_or_else(|| {
            format!("user {u:?} is not in the image's /etc/passwd: give a uid instead")
        })?),
    };
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => account.map(|a| a.uid).unwrap_or_default(),
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => all_groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, id, _)| *id)
                .ok_or_else(|| {
                    format!("group {g:?} is not in the image's /etc/group: give a gid instead")
                })?,
        },
        None => account.map_or(0, |a| a.gid),
    };
    // Supplementary groups: those listing the user by name (only with a group not given).
    let mut extra = vec![];
    if g.is_none() {
        if let Some(a) = account {
            for (_, id, members) in &all_groups {
                if members.contains(&a.name) && *id != gid && !extra.contains(id) {
                    extra.push(*id);
                }
            }
        }
    }
    let home = account
        .map(|a| a.home.clone())
        .filter(|h| h.starts_with('/'))
        .unwrap_or_else(|| "/".into());
    Ok((uid, gid, extra, home))
}

/// Reads `rel` beneath `root` without following any link; "" when it is absent, not a
/// regular file, or larger than [`MAX_ACCOUNTS_FILE`].
fn read_beneath(root: &Path, rel: &str) -> String {
    let Ok(dir) = shared_fs::RootDir::open(root) else {
        return String::new();
    };
    let Ok(o) = dir.open_path(rel) else {
        return String::new();
    };
    if !o.meta.is_file() || o.meta.len() > MAX_ACCOUNTS_FILE {
        return String::new();
    }
    let mut s = String::new();
    match o.reopen_for_reading() {
        Ok(f) => {
            let _ = f.take(MAX_ACCOUNTS_FILE).read_to_string(&mut s);
            s
        }
        Err(_) => String::new(),
    }
}

/// Resolves the whole process for a container named `name` whose root is `rootfs`.
pub fn resolve(
    req: &Request,
    image: Option<&ImageConfig>,
    name: &str,
    rootfs: &Path,
) -> Result<(Vec<String>, ProcessSpec), String> {
    let args = command(req, image)?;
    let user_spec = req
        .user
        .clone()
        .or_else(|| image.map(|c| c.user.clone()).filter(|u| !u.is_empty()));
    let (uid, gid, additional_gids, home) = match &user_spec {
        Some(u) => user(
            u,
            &read_beneath(rootfs, "etc/passwd"),
            &read_beneath(rootfs, "etc/group"),
        )?,
        None => {
            let pw = read_beneath(rootfs, "etc/passwd");
            let home = passwd(&pw)
                .into_iter()
                .find(|a| a.uid == 0)
                .map(|a| a.home)
                .filter(|h| h.starts_with('/'))
                .unwrap_or_else(|| "/".into());
            (0, 0, vec![], home)
        }
    };
    let env = environment(req, image, name, &home)?;
    let cwd = workdir(req, image)?;
    let capabilities = capabilities(&req.cap_add, &req.cap_drop)?;
    Ok((
        args,
        ProcessSpec {
            env,
            cwd,
            uid,
            gid,
            additional_gids,
            capabilities,
        },
    ))
}

/// Most environment entries a spec from a peer may carry.
const MAX_ENV: usize = 4096;

/// Checks the process part of a spec received from a peer, which is used to write runc's
/// config here: the IPv6 address derived from the IPv4 one, known capabilities, `KEY=VALUE`
/// entries, an absolute working directory without `..`, limits within what a creation
/// accepts.
pub fn check_received(spec: &ferry_api::ContainerSpec) -> Result<(), String> {
    if let Some(v6) = spec.ipv6 {
        let want = ferry_api::ipv6_for_ip(spec.ip);
        if v6 != want {
            return Err(format!(
                "IPv6 address {v6} is not {want}, the one of {}",
                spec.ip
            ));
        }
    }
    let p = &spec.process;
    if let Some(c) = p.capabilities.iter().find(|c| !is_cap(c)) {
        return Err(format!("unknown capability {c:?}"));
    }
    if p.env.len() > MAX_ENV || p.additional_gids.len() > 64 {
        return Err(format!(
            "{} environment entries and {} groups (at most {MAX_ENV} and 64)",
            p.env.len(),
            p.additional_gids.len()
        ));
    }
    p.env.iter().try_for_each(|e| check_env(e))?;
    workdir(
        &Request {
            workdir: Some(p.cwd.clone()),
            ..Request::default()
        },
        None,
    )?;
    if spec
        .resources
        .memory_bytes
        .is_some_and(|m| m < MIN_MEMORY_BYTES)
    {
        return Err("a memory limit below 6 MiB".into());
    }
    if spec.resources.cpu_millis == Some(0) {
        return Err("a CPU limit of 0".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec![
                "PATH=/usr/sbin:/usr/bin".into(),
                "NGINX_VERSION=1.22".into(),
            ],
            working_dir: "/srv".into(),
            user: "www-data".into(),
            ..ImageConfig::default()
        }
    }

    fn req() -> Request {
        Request::default()
    }

    #[test]
    fn the_command_follows_docker_run() {
        let c = cfg();
        assert_eq!(
            command(&req(), Some(&c)).unwrap(),
            ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
        );
        let r = Request {
            args: vec!["sh".into()],
            ..req()
        };
        assert_eq!(
            command(&r, Some(&c)).unwrap(),
            ["/docker-entrypoint.sh", "sh"]
        );
        let r = Request {
            entrypoint: Some(vec!["/bin/true".into()]),
            ..req()
        };
        assert_eq!(
            command(&r, Some(&c)).unwrap(),
            ["/bin/true"],
            "--entrypoint drops Cmd"
        );
        let r = Request {
            entrypoint: Some(vec![]),
            args: vec!["ls".into()],
            ..req()
        };
        assert_eq!(command(&r, Some(&c)).unwrap(), ["ls"]);
        let e = command(&req(), Some(&ImageConfig::default())).unwrap_err();
        assert!(e.contains("neither an entrypoint nor a command"), "{e}");
        assert!(command(&req(), None)
            .unwrap_err()
            .contains("no command given"));
    }

    #[test]
    fn the_environment_layers_request_over_image_over_defaults() {
        let c = cfg();
        let r = Request {
            env: vec!["NGINX_VERSION=2".into(), "EXTRA=a=b".into()],
            ..req()
        };
        let env = environment(&r, Some(&c), "web", "/var/www").unwrap();
        assert_eq!(
            env,
            [
                "PATH=/usr/sbin:/usr/bin",
                "NGINX_VERSION=2",
                "EXTRA=a=b",
                "HOSTNAME=web",
                "HOME=/var/www"
            ]
        );
        let env = environment(&req(), None, "x", "/").unwrap();
        assert_eq!(env[0], format!("PATH={DEFAULT_PATH}"));
        let bad = Request {
            env: vec!["NOVALUE".into()],
            ..req()
        };
        assert!(environment(&bad, None, "x", "/")
            .unwrap_err()
            .contains("KEY=VALUE"));
    }

    #[test]
    fn the_working_directory_must_be_absolute() {
        assert_eq!(workdir(&req(), Some(&cfg())).unwrap(), "/srv");
        assert_eq!(workdir(&req(), None).unwrap(), "/");
        let r = Request {
            workdir: Some("/tmp".into()),
            ..req()
        };
        assert_eq!(workdir(&r, Some(&cfg())).unwrap(), "/tmp");
        for bad in ["rel", "/a/../b"] {
            let r = Request {
                workdir: Some(bad.into()),
                ..req()
            };
            assert!(workdir(&r, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn capabilities_start_from_dockers_defaults() {
        let d = capabilities(&[], &[]).unwrap();
        assert_eq!(d.len(), 14);
        assert!(d.contains(&"CAP_NET_RAW".to_string()));
        assert!(!d.contains(&"CAP_SYS_ADMIN".to_string()));
        let s = capabilities(
            &["sys_ptrace".into()],
            &["CAP_NET_RAW".into(), "mknod".into()],
        )
        .unwrap();
        assert!(s.contains(&"CAP_SYS_PTRACE".to_string()));
        assert!(!s.contains(&"CAP_NET_RAW".to_string()) && !s.contains(&"CAP_MKNOD".to_string()));
        assert_eq!(s.len(), 13);
        // Linux 5.9's 41, in the kernel's order, as runc knows them.
        let all = all_caps();
        assert_eq!(all.len(), 41);
        assert_eq!(
            (all[0].as_str(), all[40].as_str()),
            ("CAP_CHOWN", "CAP_CHECKPOINT_RESTORE")
        );
        assert_eq!(capabilities(&["ALL".into()], &[]).unwrap(), all);
        assert_eq!(
            capabilities(&["NET_BIND_SERVICE".into()], &["ALL".into()]).unwrap(),
            ["CAP_NET_BIND_SERVICE"],
            "--cap-drop ALL keeps exactly what is added"
        );
        assert_eq!(
            capabilities(&["ALL".into()], &["SYS_ADMIN".into()])
                .unwrap()
                .len(),
            all_caps().len() - 1
        );
        let e = capabilities(&["CAP_FLY".into()], &[]).unwrap_err();
        assert!(e.contains("unknown capability \"CAP_FLY\""), "{e}");
    }

    #[test]
    fn users_resolve_against_the_images_accounts() {
        let pw = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\npostgres:x:101:103::/var/lib/postgresql:/bin/bash\nbroken line\n";
        let gr = "root:x:0:\nwww-data:x:33:\nssl-cert:x:104:postgres\npostgres:x:103:\n";
        assert_eq!(
            user("www-data", pw, gr).unwrap(),
            (33, 33, vec![], "/var/www".into())
        );
        assert_eq!(
            user("postgres", pw, gr).unwrap(),
            (101, 103, vec![104], "/var/lib/postgresql".into())
        );
        assert_eq!(user("1000", pw, gr).unwrap(), (1000, 0, vec![], "/".into()));
        assert_eq!(
            user("33:104", pw, gr).unwrap(),
            (33, 104, vec![], "/var/www".into())
        );
        assert_eq!(user("www-data:ssl-cert", pw, gr).unwrap().1, 104);
        assert!(user("nobody", pw, gr)
            .unwrap_err()
            .contains("not in the image's /etc/passwd"));
        assert!(user("root:wheel", pw, gr)
            .unwrap_err()
            .contains("/etc/group"));
    }

    #[test]
    fn a_spec_from_a_peer_is_checked_before_it_becomes_a_runc_config() {
        use ferry_api::{ipv6_for_ip, mac_for_ip, ContainerSpec};
        let ip = std::net::Ipv4Addr::new(10, 232, 0, 9);
        let good = ContainerSpec {
            name: "c".into(),
            ip,
            mac: mac_for_ip(ip),
            prefix_len: 24,
            ipv6: Some(ipv6_for_ip(ip)),
            args: vec!["/bin/true".into()],
            image: None,
            process: ProcessSpec::default(),
            resources: Resources::default(),
            published: vec![],
        };
        check_received(&good).unwrap();
        let mut s = good.clone();
        s.ipv6 = Some(ipv6_for_ip(std::net::Ipv4Addr::new(10, 232, 0, 10)));
        assert!(check_received(&s).unwrap_err().contains("IPv6 address"));
        let mut s = good.clone();
        s.process.capabilities.push("CAP_EVERYTHING".into());
        assert!(check_received(&s)
            .unwrap_err()
            .contains("unknown capability"));
        let mut s = good.clone();
        s.process.env.push("NOEQUALS".into());
        assert!(check_received(&s).is_err());
        let mut s = good.clone();
        s.process.cwd = "../../etc".into();
        assert!(check_received(&s).is_err());
        let mut s = good;
        s.resources.memory_bytes = Some(1);
        assert!(check_received(&s).is_err());
    }

    #[test]
    fn limits_are_checked() {
        let r = Request {
            memory_bytes: Some(64 << 20),
            cpus: Some(1.5),
            ..req()
        };
        let l = resources(&r, 2).unwrap();
        assert_eq!((l.memory_bytes, l.cpu_millis), (Some(64 << 20), Some(1500)));
        for (m, c) in [
            (Some(1 << 20), None),
            (None, Some(0.0)),
            (None, Some(3.0)),
            (None, Some(f64::NAN)),
        ] {
            let r = Request {
                memory_bytes: m,
                cpus: c,
                ..req()
            };
            assert!(resources(&r, 2).is_err(), "{m:?} {c:?}");
        }
    }

    #[test]
    fn account_files_are_read_beneath_the_root_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/group"), "g:x:5:\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/passwd")).unwrap();
        assert_eq!(read_beneath(d.path(), "etc/group"), "g:x:5:\n");
        assert_eq!(
            read_beneath(d.path(), "etc/passwd"),
            "",
            "a link to the host's file"
        );
        assert_eq!(read_beneath(d.path(), "etc/shadow"), "");
    }
}
