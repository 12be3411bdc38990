//! Published ports: TCP connections to a host's underlay address reach a container on the
//! overlay, through NAT in the host's network namespace.
//!
//! Each published port is one DNAT rule (the host's underlay address and port to the
//! container's overlay address and port) and one SNAT rule (to the host's own overlay address,
//! for the connections that DNAT made), so that the container's answers come back through the
//! host that took the connection wherever the container runs. The DNAT target is the
//! container's overlay address, which moves with it: a host the container left keeps its
//! rules for a while (a redirect) and its new and existing connections follow the container
//! across the overlay. Ferry's rules live in two chains of the `nat` table, rewritten whole
//! in one `iptables-restore --noflush` (atomic for the table): connections already made keep
//! their translation in conntrack meanwhile.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

/// The chain Ferry's DNAT rules live in (jumped to from `PREROUTING`).
pub const PRE_CHAIN: &str = "FERRY-PUB-PRE";
/// The chain Ferry's SNAT rules live in (jumped to from `POSTROUTING`).
pub const POST_CHAIN: &str = "FERRY-PUB-POST";

/// One published port on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    /// The host's underlay address.
    pub underlay: Ipv4Addr,
    /// The port there.
    pub host_port: u16,
    /// The container's overlay address.
    pub container: Ipv4Addr,
    /// The container's port.
    pub port: u16,
}

/// The `iptables-restore --noflush` input that makes Ferry's chains hold exactly `rules`
/// (answers to connections go through `snat`, the host's overlay address).
pub fn restore_text(rules: &[Rule], snat: Ipv4Addr) -> String {
    let mut rules = rules.to_vec();
    rules.sort();
    rules.dedup();
    let mut s = format!("*nat\n:{PRE_CHAIN} - [0:0]\n:{POST_CHAIN} - [0:0]\n");
    for r in &rules {
        s.push_str(&format!(
            "-A {PRE_CHAIN} -d {}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {}:{}\n",
            r.underlay, r.host_port, r.container, r.port
        ));
    }
    let mut targets: Vec<(Ipv4Addr, u16)> = rules.iter().map(|r| (r.container, r.port)).collect();
    targets.sort();
    targets.dedup();
    for (ip, port) in targets {
        s.push_str(&format!(
            "-A {POST_CHAIN} -d {ip}/32 -p tcp -m tcp --dport {port} -m conntrack --ctstate DNAT -j SNAT --to-source {snat}\n"
        ));
    }
    s.push_str("COMMIT\n");
    s
}

/// Makes this network namespace's published ports exactly `rules`: Ferry's chains rewritten,
/// the jumps to them added once, IPv4 forwarding on.
pub fn apply(rules: &[Rule], snat: Ipv4Addr) -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
        .context("turning IPv4 forwarding on for published ports")?;
    crate::util::run_with_stdin(
        "iptables-restore",
        &["-w", "--noflush"],
        restore_text(rules, snat).as_bytes(),
    )
    .context("writing the published ports' NAT rules")?;
    for (chain, target) in [("PREROUTING", PRE_CHAIN), ("POSTROUTING", POST_CHAIN)] {
        let present =
            crate::util::run("iptables", ["-w", "-t", "nat", "-C", chain, "-j", target]).is_ok();
        if !present {
            crate::util::run("iptables", ["-w", "-t", "nat", "-A", chain, "-j", target])
                .with_context(|| format!("jumping from {chain} to {target}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_port_is_one_dnat_and_each_target_one_snat_of_dnat_connections_only() {
        let r = |hp, c: [u8; 4], p| Rule {
            underlay: Ipv4Addr::new(10, 0, 0, 1),
            host_port: hp,
            container: Ipv4Addr::from(c),
            port: p,
        };
        let rules = [
            r(8080, [10, 9, 0, 5], 80),
            r(8081, [10, 9, 0, 5], 80),
            r(8080, [10, 9, 0, 5], 80),
        ];
        let t = restore_text(&rules, Ipv4Addr::new(10, 9, 0, 250));
        assert_eq!(t.matches("-j DNAT").count(), 2, "{t}");
        assert_eq!(t.matches("-j SNAT").count(), 1, "{t}");
        assert!(
            t.contains(
                "-d 10.0.0.1/32 -p tcp -m tcp --dport 8081 -j DNAT --to-destination 10.9.0.5:80"
            ),
            "{t}"
        );
        assert!(
            t.contains("--ctstate DNAT -j SNAT --to-source 10.9.0.250"),
            "{t}"
        );
        assert!(
            t.starts_with("*nat\n:FERRY-PUB-PRE - [0:0]\n:FERRY-PUB-POST - [0:0]\n"),
            "{t}"
        );
        assert!(t.ends_with("COMMIT\n"));
        // No rule: the chains are emptied.
        let t = restore_text(&[], Ipv4Addr::new(10, 9, 0, 250));
        assert!(!t.contains("-A "), "{t}");
    }
}
