//! Workloads that run inside Ferry's test containers. Std only, so the binary is small and only
//! needs the C library that Ferry copies into the container's root filesystem.
//!
//! The binary (`src/main.rs`) holds the `echo` workload; the `mem` workload lives in [`mem`], a
//! library module so that other code (tests, tools that scan a process's memory image) can use
//! its page format: [`mem::MAGIC`], [`mem::fill_page`], [`mem::check_page`].

#![forbid(unsafe_code)]

pub mod mem;
