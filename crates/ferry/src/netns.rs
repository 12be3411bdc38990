//! Entering a network namespace for the whole process (the agent does this before it starts
//! any thread, so every thread and child lives in its host's namespace).

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

/// Moves the calling thread into `/run/netns/NAME`. Call before spawning threads.
pub fn enter(name: &str) -> Result<()> {
    let path = orchestrator_shim::sdn::netns_path(name)?;
    let f = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {name} not found at {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name}"))?;
    Ok(())
}
