//! The records Ferry keeps in etcd, as JSON.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::ClusterError;

/// Largest record value read back (etcd's own limit is 1.5 MiB; Ferry's records are small).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// A host that is up: written under its lease, so it disappears when the host stops
/// renewing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's name (its certificate's).
    pub host: String,
    /// Underlay address: its VTEP, and where its QUIC listens.
    pub underlay_ip: Ipv4Addr,
    /// QUIC port.
    pub quic_port: u16,
    /// Its API over TCP with mutual TLS, when it serves one.
    #[serde(default)]
    pub api: Option<SocketAddr>,
    /// Whether it runs containers.
    pub runs_containers: bool,
    /// Memory available to new containers, bytes (at the last update).
    #[serde(default)]
    pub mem_available_bytes: u64,
    /// CPUs.
    #[serde(default)]
    pub cpus: u32,
    /// One-minute load average times 100.
    #[serde(default)]
    pub load_x100: u32,
    /// Containers it runs.
    #[serde(default)]
    pub containers: u32,
    /// When this record was written (Unix milliseconds).
    #[serde(default)]
    pub at_ms: u64,
}

/// Who owns a container. The key's `mod_revision` is the container's fencing token: a
/// migration reads it before it starts and every transaction it makes requires it unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Its name.
    pub name: String,
    /// The host that runs it.
    pub host: String,
    /// Overlay IPv4 address.
    pub ip: Ipv4Addr,
    /// Overlay IPv6 address.
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    /// Its MAC (lower case).
    pub mac: String,
    /// The migration that moved it to `host`, if one did.
    #[serde(default)]
    pub job: Option<String>,
}

/// Where the overlay delivers one MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// The host.
    pub host: String,
    /// That host's VTEP (underlay address).
    pub vtep: Ipv4Addr,
    /// The container (or lab host) that has the MAC.
    pub owner: String,
    /// When the route was written (Unix milliseconds): watchers report their lag from it.
    #[serde(default)]
    pub at_ms: u64,
}

/// Reads a record's JSON, with the key in the error.
pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ClusterError> {
    if value.len() > MAX_RECORD_BYTES {
        return Err(ClusterError::BadRecord {
            key: key.into(),
            reason: format!("{} bytes, more than {MAX_RECORD_BYTES}", value.len()),
        });
    }
    serde_json::from_slice(value).map_err(|e| ClusterError::BadRecord {
        key: key.into(),
        reason: e.to_string(),
    })
}

/// A record's JSON.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and numbers: serialization cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_name_their_key() {
        let r = RouteRecord {
            host: "h2".into(),
            vtep: "10.0.0.2".parse().unwrap(),
            owner: "db".into(),
            at_ms: 7,
        };
        let back: RouteRecord = decode("/k", &encode(&r)).unwrap();
        assert_eq!(back, r);
        let e = decode::<RouteRecord>("/ferry/routes/x", b"{\"host\":1}").unwrap_err();
        assert!(e.to_string().contains("/ferry/routes/x"), "{e}");
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        let e = decode::<RouteRecord>("/k", &big).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
