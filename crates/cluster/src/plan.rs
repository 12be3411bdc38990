//! From the routes in etcd to one host's VXLAN FDB: the pure part of the SDN controller.
//!
//! A host points every MAC routed to another host at that host's VTEP, and keeps no entry for
//! a MAC routed to itself (the container is on its own bridge). Entries for MACs etcd does not
//! route are removed: etcd is the only source of the overlay's unicast routes when it is used.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::RouteRecord;

/// One change to make to the FDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdbChange {
    /// Point `mac` at `vtep`.
    Point {
        /// The MAC (lower case).
        mac: String,
        /// The VTEP.
        vtep: Ipv4Addr,
    },
    /// Remove `mac`'s entry (it is local, or routed nowhere).
    Remove {
        /// The MAC (lower case).
        mac: String,
    },
}

/// What one route means for host `me`.
pub fn for_route(mac: &str, route: &RouteRecord, me: &str) -> FdbChange {
    let mac = mac.to_ascii_lowercase();
    if route.host == me {
        FdbChange::Remove { mac }
    } else {
        FdbChange::Point {
            mac,
            vtep: route.vtep,
        }
    }
}

/// The changes that make `current` (the FDB's unicast entries, MAC and VTEP) agree with
/// `routes` (MAC to route) on host `me`, in MAC order.
pub fn reconcile(
    routes: &BTreeMap<String, RouteRecord>,
    me: &str,
    current: &[(String, Ipv4Addr)],
) -> Vec<FdbChange> {
    let have: BTreeMap<String, Ipv4Addr> = current
        .iter()
        .map(|(m, v)| (m.to_ascii_lowercase(), *v))
        .collect();
    let mut out = vec![];
    for (mac, route) in routes {
        let mac = mac.to_ascii_lowercase();
        match for_route(&mac, route, me) {
            FdbChange::Point { vtep, .. } if have.get(&mac) == Some(&vtep) => {}
            FdbChange::Remove { .. } if !have.contains_key(&mac) => {}
            c => out.push(c),
        }
    }
    for mac in have.keys() {
        if !routes.keys().any(|m| m.eq_ignore_ascii_case(mac)) {
            out.push(FdbChange::Remove { mac: mac.clone() });
        }
    }
    out
}

/// Whether `current` agrees with `routes` for host `me`.
pub fn agrees(
    routes: &BTreeMap<String, RouteRecord>,
    me: &str,
    current: &[(String, Ipv4Addr)],
) -> bool {
    reconcile(routes, me, current).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, vtep: [u8; 4]) -> RouteRecord {
        RouteRecord {
            host: host.into(),
            vtep: Ipv4Addr::from(vtep),
            owner: "c".into(),
            at_ms: 0,
        }
    }

    #[test]
    fn remote_routes_are_pointed_local_ones_removed_unknown_ones_dropped() {
        let mut routes = BTreeMap::new();
        routes.insert("02:00:00:00:00:01".to_string(), route("h2", [10, 0, 0, 2]));
        routes.insert("02:00:00:00:00:02".to_string(), route("h1", [10, 0, 0, 1]));
        routes.insert("02:00:00:00:00:03".to_string(), route("h3", [10, 0, 0, 3]));
        let current = vec![
            // Right already.
            ("02:00:00:00:00:03".to_string(), Ipv4Addr::new(10, 0, 0, 3)),
            // Local now: its entry goes.
            ("02:00:00:00:00:02".to_string(), Ipv4Addr::new(10, 0, 0, 3)),
            // Routed nowhere.
            ("02:00:00:00:00:09".to_string(), Ipv4Addr::new(10, 0, 0, 3)),
        ];
        let plan = reconcile(&routes, "h1", &current);
        assert_eq!(
            plan,
            vec![
                FdbChange::Point {
                    mac: "02:00:00:00:00:01".into(),
                    vtep: Ipv4Addr::new(10, 0, 0, 2)
                },
                FdbChange::Remove {
                    mac: "02:00:00:00:00:02".into()
                },
                FdbChange::Remove {
                    mac: "02:00:00:00:00:09".into()
                },
            ]
        );
        assert!(!agrees(&routes, "h1", &current));
    }

    #[test]
    fn an_fdb_that_matches_needs_nothing() {
        let mut routes = BTreeMap::new();
        routes.insert("02:AA:00:00:00:01".to_string(), route("h2", [10, 0, 0, 2]));
        routes.insert("02:00:00:00:00:02".to_string(), route("h1", [10, 0, 0, 1]));
        let current = vec![("02:aa:00:00:00:01".to_string(), Ipv4Addr::new(10, 0, 0, 2))];
        assert!(agrees(&routes, "h1", &current));
        // Seen from h2 the same routes mean the other way round.
        let plan = reconcile(&routes, "h2", &current);
        assert_eq!(plan.len(), 2, "{plan:?}");
    }
}
