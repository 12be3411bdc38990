//! The error type of this crate.

use std::net::SocketAddr;
use std::path::PathBuf;

use shared_fs::PathIoError;

/// Errors of the transfer layer. Each message names the value that failed and, where
/// possible, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// TLS or certificate configuration failed (bad PEM, key mismatch, ...).
    #[error("TLS setup failed: {what}: {reason}")]
    Tls {
        /// What was being set up or loaded (often a file path).
        what: String,
        /// The underlying error.
        reason: String,
    },
    /// A local file operation failed.
    #[error(transparent)]
    Io(PathIoError),
    /// Reading or writing a network stream failed.
    #[error("stream I/O failed ({op}): {source}")]
    Stream {
        /// What was being transferred.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Memory for the page store could not be mapped.
    #[error("the page store cannot take another page ({held} held): {source}; free memory on this host or lower page_store_mib")]
    OutOfMemory {
        /// Pages held when it failed.
        held: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not answer.
    #[error("peer {addr} is unreachable: {reason}; check that its agent is running and that UDP to this port is allowed")]
    Unreachable {
        /// The address that was tried.
        addr: SocketAddr,
        /// Why it is considered unreachable.
        reason: String,
    },
    /// The TLS handshake failed: a certificate was refused by one side.
    #[error("TLS handshake with {addr} failed: {reason}; check that both hosts have certificates from the same CA and that the host name matches the certificate")]
    PeerRejected {
        /// The peer's address.
        addr: SocketAddr,
        /// The reason given by the TLS layer.
        reason: String,
    },
    /// A host name is not usable as a DNS name in a certificate or connection.
    #[error("invalid host name {host:?}: {reason}")]
    InvalidHost {
        /// The rejected name.
        host: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A length announced by the peer (or a message we were about to send) exceeds a cap.
    #[error("length {len} exceeds the cap of {cap} bytes; the peer is misbehaving or the message is too big")]
    TooLarge {
        /// The announced or actual length.
        len: u64,
        /// The cap in force.
        cap: u64,
    },
    /// The stream ended in the middle of a message.
    #[error("stream ended in the middle of {what}; the peer stopped or the connection dropped")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// A received message could not be decoded (or a message could not be encoded).
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// A received file's content does not match the hash sent with it.
    #[error("file {path:?}: received content does not match its blake3 hash; it was corrupted or tampered with in transit and was discarded")]
    HashMismatch {
        /// Relative path of the file.
        path: String,
    },
    /// The peer broke the protocol (unexpected record, wrong count, ...).
    #[error("protocol violation by peer: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// A local file changed while it was being sent.
    #[error("file {} changed while being sent ({reason}); retry the transfer", path.display())]
    SourceChanged {
        /// The local file.
        path: PathBuf,
        /// What changed.
        reason: String,
    },
    /// Applying a received tree failed (confinement, limits, I/O, ...).
    #[error("file tree: {0}")]
    Fs(#[from] shared_fs::FsError),
    /// The connection or endpoint is closed.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why it was closed.
        reason: String,
    },
}

impl TransferError {
    pub(crate) fn tls(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        TransferError::Tls {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TransferError::Io(PathIoError::new(op, path, source))
    }
}
