//! The lab: Ferry's hosts as network namespaces on one machine ([`lab`]), and what runs on
//! it: the demo ([`demo`]), the benchmark against the hand-made runc baseline ([`bench`],
//! [`goodput`]) with its charts ([`chart`]), the 1 ms gap probe ([`probe`]) and the operations
//! the CLI shares with them ([`ops`]).
//!
//! Nothing here ships in the agent: `ferry-agent` does not depend on this crate.

#![forbid(unsafe_code)]

pub mod bench;
pub mod chart;
pub mod demo;
pub mod drain;
pub mod goodput;
pub mod lab;
pub mod ops;
pub mod probe;
pub mod progress;
