//! Pre-copy migration building blocks.
//!
//! * [`relay`]: a deduplicating relay of CRIU's page-server stream across a network link:
//!   pages the destination already holds cross as 32-byte references instead of 4 KiB.

#![forbid(unsafe_code)]

pub mod relay;

pub use relay::{relay_in, relay_out, RelayError, RelayStats};
