//! Ferry's cluster state, kept in etcd: which hosts are up (a key under a lease each), which
//! host owns each container (its record's `mod_revision` is the fencing token of a migration),
//! which container holds each overlay address (IPv4 and IPv6, claimed in one transaction with
//! the container), where each container MAC is routed on the overlay, and migration jobs.
//!
//! Everything lives under one prefix (`/ferry` by default; [`keys::Keys`]). The pure parts,
//! records ([`records`]) and the plan that turns routes into VXLAN FDB changes ([`plan`]), are
//! tested on their own; [`store::Store`] talks to etcd.

pub mod keys;
pub mod plan;
pub mod records;
pub mod store;

pub use keys::Keys;
pub use records::{ContainerRecord, HostRecord, RouteRecord};
pub use store::{EtcdConfig, EtcdTls, Registration, Store};

/// What a cluster operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// etcd did not answer, or refused the request.
    #[error("etcd ({endpoints}): {source}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        #[source]
        source: etcd_client::Error,
    },
    /// The request took longer than the configured timeout.
    #[error("etcd ({endpoints}) did not answer within {ms} ms: check that its members run and that this host reaches them")]
    Timeout {
        /// The endpoints tried.
        endpoints: String,
        /// The timeout.
        ms: u64,
    },
    /// A record in etcd is not what Ferry writes there.
    #[error("etcd key {key}: {reason}")]
    BadRecord {
        /// The key.
        key: String,
        /// Why it was refused.
        reason: String,
    },
    /// The fencing check of a transaction failed: the container's record changed since the
    /// revision the caller holds (someone else moved or removed it).
    #[error("container {name:?} changed in etcd since revision {fence} ({now}): refusing to act on a stale ownership")]
    Fenced {
        /// The container.
        name: String,
        /// The revision the caller held.
        fence: i64,
        /// What etcd holds now.
        now: String,
    },
    /// Live hosts did not program a route in time.
    #[error("hosts {hosts} did not program the overlay up to etcd revision {rev} within {ms} ms: they run an agent whose watch of etcd is stuck, or cannot reach etcd")]
    Behind {
        /// The hosts.
        hosts: String,
        /// The revision.
        rev: i64,
        /// How long they were waited for.
        ms: u64,
    },
    /// A name or address is taken.
    #[error("{0}")]
    Taken(String),
    /// The configuration cannot be used.
    #[error("etcd configuration: {0}")]
    Config(String),
}

impl ClusterError {
    /// Whether the outcome of the request is unknown (it may or may not have been applied):
    /// etcd was not reached or did not answer in time.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClusterError::Etcd { .. } | ClusterError::Timeout { .. }
        )
    }
}
