//! Transport between Ferry agents: QUIC with mutual TLS, framed JSON messages and
//! verified file trees.
//!
//! * [`pki`]: a small lab CA and host certificates (usable as server and client certs).
//! * [`Endpoint`] / [`Connection`]: a QUIC endpoint acting as server and client; both
//!   sides authenticate with certificates issued by the same CA.
//! * [`frame`]: length-prefixed JSON messages with a size cap.
//! * [`lists`]: hash lists, held bitmaps, chunk id lists and chunk streams.
//! * [`pages`]: memory pages, content-addressed (blake3), batched and compressed when it pays.
//! * [`tree`]: sending and receiving [`shared_fs::Diff`]s, applied through
//!   [`shared_fs::Applier`] so that every received path, size and hash is checked.
//!
//! Nothing received from the network is trusted: lengths are checked before
//! allocating, paths are confined, and file contents are verified with blake3.
// Only `slab` may use `unsafe` (one call, with its reason).
#![deny(unsafe_code)]

mod endpoint;
mod error;
pub mod frame;
pub mod lists;
pub mod pages;
pub mod pki;
mod slab;
pub mod tree;

pub use endpoint::{https_configs, Connection, Endpoint, ALPN, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT};
pub use error::TransferError;
pub use pki::TlsFiles;
pub use quinn::{RecvStream, SendStream};
