//! Where each record lives in etcd, under one prefix.

use std::net::IpAddr;

/// The key layout under a prefix (`/ferry` by default):
///
/// | key | value |
/// |---|---|
/// | `P/hosts/NAME` | [`crate::HostRecord`], under the host's lease |
/// | `P/containers/NAME` | [`crate::ContainerRecord`]: who owns it |
/// | `P/ipam/v4/ADDR`, `P/ipam/v6/ADDR` | the name of the container holding the address |
/// | `P/routes/MAC` | [`crate::RouteRecord`]: the host the overlay delivers the MAC to |
/// | `P/synced/NAME` | the revision up to which the host has programmed the routes, under its lease |
/// | `P/redirects/NAME/HOST` | a host forwarding a container's published ports after it left, under a lease |
/// | `P/jobs/ID` | a migration job's JSON |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is dropped; empty means `/ferry`).
    pub fn new(prefix: &str) -> Keys {
        let p = prefix.trim_end_matches('/');
        Keys {
            prefix: if p.is_empty() {
                "/ferry".into()
            } else {
                p.to_string()
            },
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Prefix of the host records.
    pub fn hosts(&self) -> String {
        format!("{}/hosts/", self.prefix)
    }

    /// A host's record.
    pub fn host(&self, name: &str) -> String {
        format!("{}{name}", self.hosts())
    }

    /// Prefix of the container records.
    pub fn containers(&self) -> String {
        format!("{}/containers/", self.prefix)
    }

    /// A container's record.
    pub fn container(&self, name: &str) -> String {
        format!("{}{name}", self.containers())
    }

    /// The lease of an overlay address.
    pub fn address(&self, ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => format!("{}/ipam/v4/{v4}", self.prefix),
            IpAddr::V6(v6) => format!("{}/ipam/v6/{v6}", self.prefix),
        }
    }

    /// Prefix of every address lease.
    pub fn addresses(&self) -> String {
        format!("{}/ipam/", self.prefix)
    }

    /// Prefix of the routes.
    pub fn routes(&self) -> String {
        format!("{}/routes/", self.prefix)
    }

    /// The route of a MAC (lower case, colon-separated).
    pub fn route(&self, mac: &str) -> String {
        format!("{}{}", self.routes(), mac.to_ascii_lowercase())
    }

    /// The MAC a route key names, if it is one.
    pub fn mac_of_route<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.routes().as_str())
            .filter(|m| !m.is_empty() && !m.contains('/'))
    }

    /// Prefix of the revisions up to which each host has programmed the routes.
    pub fn synced(&self) -> String {
        format!("{}/synced/", self.prefix)
    }

    /// The revision up to which `host` has programmed the routes (under its lease).
    pub fn synced_host(&self, host: &str) -> String {
        format!("{}{host}", self.synced())
    }

    /// Prefix of the redirects of one container.
    pub fn redirects_of(&self, name: &str) -> String {
        format!("{}/redirects/{name}/", self.prefix)
    }

    /// Prefix of every redirect.
    pub fn redirects(&self) -> String {
        format!("{}/redirects/", self.prefix)
    }

    /// A host's redirect of a container that left it.
    pub fn redirect(&self, name: &str, host: &str) -> String {
        format!("{}{host}", self.redirects_of(name))
    }

    /// A job's record.
    pub fn job(&self, id: &str) -> String {
        format!("{}/jobs/{id}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_under_one_prefix() {
        let k = Keys::new("/prod/ferry/");
        assert_eq!(k.container("db"), "/prod/ferry/containers/db");
        assert_eq!(
            k.route("02:AA:00:00:00:01"),
            "/prod/ferry/routes/02:aa:00:00:00:01"
        );
        assert_eq!(
            k.address("10.0.0.5".parse().unwrap()),
            "/prod/ferry/ipam/v4/10.0.0.5"
        );
        assert_eq!(
            k.address("fd00::5".parse().unwrap()),
            "/prod/ferry/ipam/v6/fd00::5"
        );
        assert_eq!(Keys::new("").host("h1"), "/ferry/hosts/h1");
    }

    #[test]
    fn route_keys_give_back_their_mac_and_nothing_else() {
        let k = Keys::new("/ferry");
        assert_eq!(
            k.mac_of_route("/ferry/routes/02:00:00:00:00:01"),
            Some("02:00:00:00:00:01")
        );
        assert_eq!(k.mac_of_route("/ferry/routes/"), None);
        assert_eq!(k.mac_of_route("/ferry/routes/a/b"), None);
        assert_eq!(k.mac_of_route("/ferry/containers/x"), None);
    }
}
