//! The container runtime of one host, below the agent: runc and CRIU's front end
//! ([`runc`]), a container's bundle and root ([`bundle`], [`layout`]), its network namespace
//! ([`netns`]), its cgroup ([`cgroup`], [`cgroup_tree`], [`freeze`], [`throttle`]), what its
//! processes are and hold ([`process`], [`inspect`], [`cpu`]) and the logs a dump leaves
//! ([`logs`]).
//!
//! Everything here acts on this host only; moving a container is the agent's (`ferry-agent`).

#![forbid(unsafe_code)]

pub mod bundle;
pub mod cgroup;
pub mod cgroup_tree;
pub mod console;
pub mod cpu;
pub mod freeze;
pub mod inspect;
pub mod layout;
pub mod logs;
pub mod netns;
pub mod process;
pub mod publish;
pub mod runc;
pub mod throttle;
pub mod util;
