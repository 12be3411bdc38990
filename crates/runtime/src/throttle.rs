//! Auto-converge's actuator: while pre-copy cannot keep up with a container that dirties memory
//! faster than the link carries it, Ferry takes a share of the CPU time the container used away
//! from it with the CFS bandwidth quota of its cgroup, as QEMU throttles vCPUs.
//!
//! `pct` percent means: the container gets `100 - pct` percent of the CPU time it used over the
//! last measuring interval (`cpuacct.usage` on cgroup v1, `cpu.stat` on v2), enforced over 10 ms
//! periods (`cpu.cfs_quota_us`/`cpu.cfs_period_us`, or `cpu.max`) so that the throttle bites
//! within a short pre-copy round.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::cgroup::CpuControl;
use crate::cgroup::{Cgroups, CpuLimit};

/// CFS period used while throttled, microseconds, unless the share is below
/// [`MIN_QUOTA_US`] per period: then the period grows (up to [`MAX_PERIOD_US`]) so that the
/// kernel's smallest quota still means the share asked for.
pub const PERIOD_US: u64 = 10_000;
/// Longest CFS period the kernel accepts, microseconds.
pub const MAX_PERIOD_US: u64 = 1_000_000;
/// Smallest quota the kernel accepts, microseconds.
const MIN_QUOTA_US: u64 = 1_000;

/// The CFS `(period, quota)` in µs that leaves a container `100 - pct` percent of the
/// `used_cores` it used. The share is exact down to 1/1000 of a core (1 ms per 1 s period);
/// an idle or unmeasured container gets that floor.
pub fn quota_us(used_cores: f64, pct: u32) -> (u64, u64) {
    let pct = pct.min(99);
    let cores = if used_cores.is_finite() && used_cores > 0.0 {
        used_cores
    } else {
        0.0
    };
    let allowed = cores * f64::from(100 - pct) / 100.0;
    let at_default = allowed * PERIOD_US as f64;
    if at_default >= MIN_QUOTA_US as f64 {
        return (PERIOD_US, at_default.round() as u64);
    }
    let period = if allowed > 0.0 {
        ((MIN_QUOTA_US as f64 / allowed).ceil() as u64).clamp(PERIOD_US, MAX_PERIOD_US)
    } else {
        MAX_PERIOD_US
    };
    let quota = ((allowed * period as f64).round() as u64).max(MIN_QUOTA_US);
    (period, quota)
}

/// A container's CPU throttle.
pub struct CpuThrottle {
    cpu: CpuControl,
    last_usage_ns: u64,
    last_at: Instant,
    applied: bool,
    /// Cores used before the first step: every step is a share of this.
    base_cores: Option<f64>,
    /// The container's own limit as found (`--cpus`, or none), put back when the throttle is
    /// lifted.
    own: CpuLimit,
}

impl CpuThrottle {
    /// Finds the container's CPU bandwidth control (cgroup v1 `cpu`/`cpuacct`, or `cpu.max` and
    /// `cpu.stat` on the unified hierarchy) and starts measuring its usage.
    pub fn new(host: &str, name: &str) -> Result<CpuThrottle> {
        let rel = crate::cgroup_tree::cgroup_path(host, name);
        let cpu = Cgroups::host()
            .cpu(&rel)
            .with_context(|| format!("container {name:?}"))?;
        let last_usage_ns = cpu.usage_ns()?;
        let own = cpu.limit().unwrap_or(CpuLimit {
            quota_us: None,
            period_us: 100_000,
        });
        Ok(CpuThrottle {
            cpu,
            last_usage_ns,
            last_at: Instant::now(),
            applied: false,
            base_cores: None,
            own,
        })
    }

    /// CPU cores the container used since the last call (or since `new`).
    fn used_cores(&mut self) -> Result<f64> {
        let now_ns = self.cpu.usage_ns()?;
        let secs = self.last_at.elapsed().as_secs_f64();
        let used = now_ns.saturating_sub(self.last_usage_ns) as f64 / 1e9;
        self.last_usage_ns = now_ns;
        self.last_at = Instant::now();
        Ok(if secs > 0.0 { used / secs } else { 0.0 })
    }

    /// Throttles by `pct` percent of what the container used before the first step (measured
    /// since `new`); 0 lifts the throttle. Returns the cores it is now allowed.
    pub fn set(&mut self, pct: u32) -> Result<Option<f64>> {
        let used = self.used_cores()?;
        if pct == 0 {
            self.lift()?;
            return Ok(None);
        }
        // A throttled container's usage is what the throttle allows: every step is a share of
        // the usage measured before the first step, not of the throttled one.
        let base = *self.base_cores.get_or_insert(used);
        let (period, q) = quota_us(base, pct);
        self.cpu.set_limit(CpuLimit {
            quota_us: Some(q),
            period_us: period,
        })?;
        self.applied = true;
        tracing::info!(
            cgroup = %self.cpu.dir().display(),
            hierarchy = %self.cpu.hierarchy,
            pct,
            used_cores = base,
            period_us = period,
            quota_us = q,
            "CPU throttled"
        );
        Ok(Some(q as f64 / period as f64))
    }

    /// True while a quota is set.
    pub fn is_applied(&self) -> bool {
        self.applied
    }

    /// Puts the container's own limit back (none, or its `--cpus` limit).
    pub fn lift(&mut self) -> Result<()> {
        self.cpu
            .set_limit(self.own)
            .with_context(|| format!("restoring the CPU limit of {}", self.cpu.dir().display()))?;
        self.applied = false;
        self.base_cores = None;
        Ok(())
    }
}

impl Drop for CpuThrottle {
    fn drop(&mut self) {
        if self.applied {
            let _ = self.lift();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_leaves_the_container_the_rest_of_what_it_used() {
        assert_eq!(quota_us(1.0, 20), (10_000, 8_000));
        assert_eq!(quota_us(2.0, 50), (10_000, 10_000));
        // Below 1 ms per 10 ms the period grows so that the share stays exact.
        assert_eq!(quota_us(0.5, 99), (200_000, 1_000));
        assert_eq!(quota_us(0.27, 99), (370_371, 1_000));
        let (p, q) = quota_us(0.27, 90);
        assert!((q as f64 / p as f64 - 0.027).abs() < 1e-4, "{p} {q}");
        // Beyond 99 % is 99 %; an idle or unmeasured container gets 1/1000 of a core.
        assert_eq!(quota_us(1.0, 150), quota_us(1.0, 99));
        assert_eq!(quota_us(0.0, 20), (MAX_PERIOD_US, 1_000));
        assert_eq!(quota_us(f64::NAN, 20), (MAX_PERIOD_US, 1_000));
        // A tiny share is floored at 1/1000 of a core.
        assert_eq!(quota_us(0.0005, 50), (MAX_PERIOD_US, 1_000));
    }
}
