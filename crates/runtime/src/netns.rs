//! Network namespaces: a container's (veth into the overlay bridge, its addresses) and the
//! agent's own (entered for the whole process before it starts any thread, so every thread and
//! child lives in its host's namespace).

use nix::sched::{setns, CloneFlags};

/// Moves the calling thread into `/run/netns/NAME`. Call before spawning threads.
pub fn enter(name: &str) -> Result<()> {
    let path = ferry_net::sdn::netns_path(name)?;
    let f = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {name} not found at {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferry_api::ContainerSpec;

use crate::layout::Layout;
use crate::util::{ip, run, run_quiet, run_with_stdin};

/// Creates the container's network namespace on this host: veth into the overlay bridge, the
/// container's IP and MAC, and its IPv6 address if it has one (else IPv6 off). A namespace
/// that waits for a restore must send nothing: with IPv6 on, the kernel's own chatter is
/// switched off (no duplicate address detection, no router solicitations, no autoconfigured
/// addresses) and multicast listener reports are dropped (the overlay floods multicast to
/// every host anyway), so no frame with the container's MAC leaves before the container does.
pub fn create_netns(l: &Layout, spec: &ContainerSpec, bridge: &str) -> Result<()> {
    create_netns_in(None, l, spec, bridge)
}

/// Like [`create_netns`], with the host side in namespace `host_ns` instead of the caller's.
pub fn create_netns_in(
    host_ns: Option<&str>,
    l: &Layout,
    spec: &ContainerSpec,
    bridge: &str,
) -> Result<()> {
    let ns = l.netns.as_str();
    let host_ip = |args: &[&str]| -> Result<String> {
        match host_ns {
            Some(h) => ip(["-n", h].iter().chain(args.iter())),
            None => ip(args),
        }
    };
    if let Some(h) = host_ns {
        run_quiet("ip", ["-n", h, "link", "del", l.veth.as_str()]);
    }
    delete_netns(l);
    ip(["netns", "add", ns])?;
    let r = (|| -> Result<()> {
        // One `sysctl` for all settings: each process costs milliseconds.
        let sysctl = |settings: Vec<String>| {
            let mut args = vec!["netns", "exec", ns, "sysctl", "-qw"];
            args.extend(settings.iter().map(String::as_str));
            run("ip", &args)
        };
        if spec.ipv6.is_some() {
            if !Path::new("/proc/sys/net/ipv6").is_dir() {
                bail!("this host has no IPv6 (the kernel was started with ipv6.disable=1?) and container {} has an IPv6 address", spec.name);
            }
            let settings = [
                "disable_ipv6=0",
                "accept_dad=0",
                "dad_transmits=0",
                "router_solicitations=0",
                "accept_ra=0",
                "autoconf=0",
            ];
            sysctl(
                ["all", "default"]
                    .iter()
                    .flat_map(|k| {
                        settings
                            .iter()
                            .map(move |s| format!("net.ipv6.conf.{k}.{s}"))
                    })
                    .collect(),
            )?;
            // Multicast listener reports (MLDv1 130-132, MLDv2 143) and router solicitations.
            let rules: String = std::iter::once("*raw\n".to_string())
                .chain(
                    ["130", "131", "132", "133", "143"]
                        .iter()
                        .map(|t| format!("-A OUTPUT -p ipv6-icmp --icmpv6-type {t} -j DROP\n")),
                )
                .chain(std::iter::once("COMMIT\n".to_string()))
                .collect();
            run_with_stdin(
                "ip",
                &["netns", "exec", ns, "ip6tables-restore", "-w", "--noflush"],
                rules.as_bytes(),
            )?;
        } else {
            sysctl(
                ["all", "default"]
                    .iter()
                    .map(|k| format!("net.ipv6.conf.{k}.disable_ipv6=1"))
                    .collect(),
            )?;
        }
        ip(["-n", ns, "link", "set", "lo", "up"])?;
        host_ip(&[
            "link", "add", &l.veth, "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ])?;
        host_ip(&["link", "set", &l.veth, "master", bridge, "up"])?;
        ip([
            "-n", ns, "link", "set", "eth0", "address", &spec.mac, "mtu", "1450",
        ])?;
        ip([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/{}", spec.ip, spec.prefix_len),
            "dev",
            "eth0",
        ])?;
        if let Some(v6) = spec.ipv6 {
            ip([
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/{}", ferry_api::OVERLAY6_PREFIX_LEN),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    })();
    if r.is_err() {
        delete_netns(l);
    }
    r.with_context(|| {
        format!(
            "preparing network namespace {ns} for {} ({})",
            spec.name, spec.ip
        )
    })
}

/// Takes the host side of the container's veth down (or up again). Down, nothing the
/// container's kernel sockets send leaves the host: after a dump that leaves the container in
/// place, its TCP sockets are live again, and a single segment from them (a window probe with a
/// newer timestamp) would make the client's TCP drop the restored copy's segments (PAWS).
pub fn set_veth(l: &Layout, up: bool) -> Result<()> {
    ferry_net::sdn::set_link_up(&l.veth, up)
        .with_context(|| format!("setting {} {}", l.veth, if up { "up" } else { "down" }))
}

/// Removes the container's namespace and veth; absent is fine.
pub fn delete_netns(l: &Layout) {
    run_quiet("ip", ["link", "del", l.veth.as_str()]);
    run_quiet("ip", ["netns", "del", l.netns.as_str()]);
}

/// Gives every network namespace created from the agent's own from now on (the containers')
/// socket hash tables of `buckets` entries instead of sharing the host's: CRIU's dump lists a
/// container's sockets through sock_diag, which walks the whole TCP table it sees, and the
/// host's has 262144 buckets here (a quarter of a millisecond per walk, four walks per dump:
/// about 5 ms of every freeze). Linux >= 6.1 (TCP) and 6.2 (UDP); older kernels keep
/// sharing. Returns the settings that took effect.
pub fn set_child_socket_hashes(buckets: u32) -> Vec<String> {
    let mut done = vec![];
    for (file, max) in [
        ("tcp_child_ehash_entries", 1u32 << 24),
        ("udp_child_hash_entries", 1 << 16),
    ] {
        // UDP tables have at least 128 buckets; both must be powers of two.
        let n = buckets.clamp(128, max).next_power_of_two().min(max);
        let path = Path::new("/proc/sys/net/ipv4").join(file);
        match std::fs::write(&path, n.to_string()) {
            Ok(()) => done.push(format!("{file}={n}")),
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "containers share the host's socket hash table: every dump walks it"),
        }
    }
    done
}

/// Checks, in the current network namespace, the overlay devices an agent is configured with:
/// `bridge` is a bridge, `vxlan` a VXLAN device attached to it whose local address is
/// `underlay`. The agent does not create them (docs/deploy.md, step 2); without this check a
/// missing device showed only at the first container or migration.
pub fn check_overlay_devices(
    bridge: &str,
    vxlan: &str,
    underlay: std::net::Ipv4Addr,
) -> Result<()> {
    let hint =
        "create it as docs/deploy.md says (\"The overlay devices\"), or fix the agent's config";
    let link = |name: &str, field: &str| -> Result<serde_json::Value> {
        let out = crate::util::ip(["-d", "-j", "link", "show", "dev", name]).map_err(|_| {
            anyhow::anyhow!(
                "the device {name:?} (config `{field}`) does not exist on this host: {hint}"
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("`ip -d -j link show dev {name}` printed no JSON"))?;
        Ok(v.get(0).cloned().unwrap_or_default())
    };
    let br = link(bridge, "bridge")?;
    let kind = |v: &serde_json::Value| {
        v["linkinfo"]["info_kind"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    if kind(&br) != "bridge" {
        anyhow::bail!(
            "{bridge:?} (config `bridge`) is a {:?} device, not a bridge: {hint}",
            kind(&br)
        );
    }
    let vx = link(vxlan, "vxlan")?;
    if kind(&vx) != "vxlan" {
        anyhow::bail!(
            "{vxlan:?} (config `vxlan`) is a {:?} device, not a VXLAN device: {hint}",
            kind(&vx)
        );
    }
    if vx["master"].as_str() != Some(bridge) {
        anyhow::bail!(
            "the VXLAN device {vxlan:?} is not attached to the bridge {bridge:?} (its master is {}): `ip link set {vxlan} master {bridge}`",
            vx["master"].as_str().unwrap_or("none")
        );
    }
    let local = vx["linkinfo"]["info_data"]["local"].as_str().unwrap_or("");
    if local != underlay.to_string() {
        anyhow::bail!(
            "the VXLAN device {vxlan:?} sends from {local:?}, but the agent's underlay_ip is {underlay}: its tunnels would not match the peers' (recreate it with `local {underlay}`)"
        );
    }
    Ok(())
}
