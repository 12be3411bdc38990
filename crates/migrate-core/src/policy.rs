//! The pre-copy convergence policy, a pure function of what the rounds measured.
//!
//! While the container runs, each round sends the pages dirtied since the previous one. After a
//! round, [`decide`] estimates how long sending what is dirty *now* would keep the container
//! frozen, from the bandwidth and the bytes per page the rounds achieved. If that fits the
//! downtime budget, the container is frozen. Otherwise another round follows, unless:
//! - the round limit is reached;
//! - the dirty set stops shrinking because the container dirties memory faster than the link
//!   carries it. Then, per policy, Ferry throttles the container's CPU step by step (auto-converge,
//!   as QEMU does), freezes anyway (stop-and-copy of what is left) or gives up (rollback).
//!
//! The budget covers the memory still to send. The fixed costs of the freeze come on top and are
//! reported separately: CRIU dumping the process state, the restore, the network switch.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What to do when the dirty set does not shrink or the round limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum WhenStuck {
    /// Throttle the container's CPU, step by step, until the rounds converge; at the largest
    /// step, freeze with what is left.
    AutoConverge,
    /// Freeze now and send what is left while frozen.
    StopAndCopy,
    /// Give up: roll back, the container keeps running on the source.
    Abort,
    /// Freeze now and restore lazily at once: the destination fetches the pages it lacks
    /// from the source's frozen copy while the container runs (needs lazy restore).
    PostCopy,
}

/// Pre-copy settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default, deny_unknown_fields)]
pub struct PrecopyPolicy {
    /// Largest estimated time to send the last dirty set while frozen, ms.
    pub downtime_budget_ms: f64,
    /// Most rounds before the freeze (the first, full copy counts).
    pub max_rounds: u32,
    /// When the dirty set does not shrink.
    pub when_stuck: WhenStuck,
    /// At the round limit: `stop-and-copy` freezes with what is left, `abort` rolls back,
    /// `post-copy` freezes and restores lazily at once (`auto-converge` acts like
    /// `stop-and-copy` here).
    pub at_round_limit: WhenStuck,
    /// The dirty set counts as not shrinking when a round ends with more than this fraction of
    /// the pages it sent dirty again.
    pub stuck_ratio: f64,
    /// First CPU throttle step, percent of the container's CPU time taken away.
    pub throttle_initial_pct: u32,
    /// Each further step adds this much.
    pub throttle_step_pct: u32,
    /// The largest throttle.
    pub throttle_max_pct: u32,
    /// First round: send each page right after the container writes it, and hold back pages it
    /// has not written yet while it writes memory fast compared to the link (see
    /// [`hold_unwritten`]). Needs a tracker with cheap collects (uffd-wp, soft-dirty).
    pub follow_writes: bool,
    /// Restore lazily: the final dump writes no memory the rounds already placed at the
    /// destination, which restores with CRIU's lazy pages and fills the memory in from its
    /// page store while the container runs.
    pub lazy_restore: bool,
    /// Below this much memory (MiB, resident at the preflight) a container of few processes
    /// (the agent's limit: 8) is restored eagerly even with `lazy_restore`: copying a few MiB
    /// in the freeze costs less than starting CRIU's lazy-pages daemon and registering the
    /// memory with userfaultfd (about 10 ms here). Post-copy ignores it. 0: always lazy.
    pub lazy_min_mib: u64,
    /// Post-copy from the start: no rounds; freeze at once, restore lazily at the
    /// destination, which fetches every page from the source's frozen copy while the
    /// container runs (needs lazy restore).
    pub post_copy: bool,
}

impl Default for PrecopyPolicy {
    /// 50 ms budget, 30 rounds, auto-converge from 20 % in steps of 10 % up to 99 %
    /// (QEMU's defaults), stop-and-copy at the round limit, a first round that follows the
    /// container's writes.
    fn default() -> Self {
        PrecopyPolicy {
            downtime_budget_ms: 50.0,
            max_rounds: 30,
            when_stuck: WhenStuck::AutoConverge,
            at_round_limit: WhenStuck::StopAndCopy,
            stuck_ratio: 0.5,
            throttle_initial_pct: 20,
            throttle_step_pct: 10,
            throttle_max_pct: 99,
            follow_writes: true,
            lazy_restore: true,
            lazy_min_mib: 16,
            post_copy: false,
        }
    }
}

impl PrecopyPolicy {
    /// Whether the job may turn to post-copy (from the start, or when the rounds stop gaining
    /// or reach their limit).
    pub fn may_post_copy(&self) -> bool {
        self.post_copy
            || self.when_stuck == WhenStuck::PostCopy
            || self.at_round_limit == WhenStuck::PostCopy
    }

    /// Checks the settings; the error says which one is wrong and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.downtime_budget_ms.is_finite() && self.downtime_budget_ms > 0.0) {
            return Err(format!(
                "downtime budget must be a positive number of ms, got {}",
                self.downtime_budget_ms
            ));
        }
        if !(1..=1000).contains(&self.max_rounds) {
            return Err(format!(
                "round limit must be between 1 and 1000, got {}",
                self.max_rounds
            ));
        }
        if !(self.stuck_ratio > 0.0 && self.stuck_ratio <= 1.0) {
            return Err(format!(
                "stuck ratio must be in (0, 1], got {}",
                self.stuck_ratio
            ));
        }
        if self.throttle_max_pct > 99
            || self.throttle_initial_pct == 0
            || self.throttle_initial_pct > self.throttle_max_pct
            || self.throttle_step_pct == 0
        {
            return Err(format!(
                "throttle steps must satisfy 0 < initial ({}) <= max ({}) <= 99 and step ({}) > 0",
                self.throttle_initial_pct, self.throttle_max_pct, self.throttle_step_pct
            ));
        }
        let post_copy = self.may_post_copy();
        if self.lazy_min_mib > 1 << 20 {
            return Err(format!(
                "lazy_min_mib must be at most 1048576 (1 TiB), got {}",
                self.lazy_min_mib
            ));
        }
        if post_copy && !self.lazy_restore {
            return Err("post-copy needs lazy restore (lazy_restore: true)".into());
        }
        Ok(())
    }
}

/// What one round measured (reported by the driver).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Pages the round sent as content (pages whose content the destination already holds
    /// are not sent, and not counted).
    pub pages_sent: u64,
    /// Bytes the round put on the network.
    pub bytes_sent: u64,
    /// Pages found dirty at the end of the round: the next round's work.
    pub dirty_pages: u64,
    /// How long the round took.
    pub duration: Duration,
    /// Part of `duration` during which the round held back pages the container had not
    /// written yet, waiting for its writes ([`hold_unwritten`]); the link was not full then.
    #[serde(default)]
    pub waited: Duration,
    /// Throughput measured while the link was full, bytes/s, for a round that waited (its
    /// bytes over its duration would understate the link).
    #[serde(default)]
    pub link_bytes_s: Option<u64>,
}

impl RoundStats {
    /// Time the round's bytes would take on a full link.
    fn send_secs(&self) -> f64 {
        match self.link_bytes_s {
            Some(b) if b > 0 && self.waited > Duration::ZERO => self.bytes_sent as f64 / b as f64,
            _ => self.duration.as_secs_f64(),
        }
    }
}

/// How much longer than sending everything at once the first round may take by waiting for
/// the container's writes.
pub const FOLLOW_WRITES_MAX_FACTOR: f64 = 4.0;

/// Unwritten pages that the link carries in less than this are sent rather than waited for.
pub const FOLLOW_WRITES_MIN_WAIT: Duration = Duration::from_millis(50);

/// What the first round measured so far, for [`hold_unwritten`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstRoundView {
    /// Rate at which the container writes pages that were neither written nor sent before,
    /// pages/s (over the last second).
    pub first_writes_pages_s: f64,
    /// Pages neither written nor sent yet.
    pub unwritten_pages: u64,
    /// Pages the round covers in all.
    pub total_pages: u64,
    /// Pages/s the link carried while full; `None` before it was measured.
    pub link_pages_s: Option<f64>,
    /// Time since the round started.
    pub elapsed: Duration,
}

/// Whether the first round holds back the pages the container has not written yet.
///
/// A page sent before the container writes it crosses twice. Sending everything at once, while
/// the container writes pages it had not written before at `g` pages/s over a link carrying
/// `B`, sends about `g / B` of memory again, and more in the rounds after. A page sent right
/// after a write crosses once if it is not written again before the freeze: a container that
/// sweeps its memory (buffers, rings, caches refilled in turn) writes it next only a sweep
/// later. So while `g >= B / FOLLOW_WRITES_MAX_FACTOR`, the round sends only what was just
/// written and lets the container reach the rest: that takes at most that factor longer than
/// sending everything. Pages never written (cold memory, `g` about 0) are sent at once.
///
/// Not held: before the link was measured (the first pages measure it), once the round has
/// taken the factor's limit, and when what is left takes the link less than
/// [`FOLLOW_WRITES_MIN_WAIT`].
pub fn hold_unwritten(v: &FirstRoundView) -> bool {
    let Some(link) = v.link_pages_s.filter(|b| *b > 0.0) else {
        return false;
    };
    // What the link carries in a moment is not worth waiting for.
    if (v.unwritten_pages as f64) < link * FOLLOW_WRITES_MIN_WAIT.as_secs_f64() {
        return false;
    }
    let limit = FOLLOW_WRITES_MAX_FACTOR * v.total_pages as f64 / link;
    if v.elapsed.as_secs_f64() >= limit {
        return false;
    }
    v.first_writes_pages_s >= link / FOLLOW_WRITES_MAX_FACTOR
}

/// The policy's view after a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Estimate {
    /// Bandwidth the rounds achieved, bytes/s.
    pub bandwidth_bytes_s: f64,
    /// Bytes on the network per page sent (compression and references make it < 4096).
    pub bytes_per_page: f64,
    /// Rate at which the container dirtied pages during the last round, pages/s.
    pub dirty_pages_s: f64,
    /// Estimated time to send what is dirty now, ms.
    pub expected_downtime_ms: f64,
}

/// Why the rounds stop and the container is frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FreezeReason {
    /// The estimate fits the budget.
    Converged,
    /// The round limit was reached.
    RoundLimit,
    /// The dirty set does not shrink (at the largest throttle, or the policy says freeze).
    NotConverging,
    /// Post-copy: the destination fetches what it lacks after the restore (by request, or
    /// because the rounds stopped gaining).
    PostCopy,
}

impl FreezeReason {
    /// The reason's name in summaries and JSON (`precopy_stop`).
    pub fn name(self) -> &'static str {
        match self {
            FreezeReason::Converged => "converged",
            FreezeReason::RoundLimit => "round-limit",
            FreezeReason::NotConverging => "not-converging",
            FreezeReason::PostCopy => "post-copy",
        }
    }
}

/// What to do after a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// Run another round with the container's CPU throttled by `throttle_pct` (0: none).
    AnotherRound {
        /// Percent of CPU time taken away from the container during the round.
        throttle_pct: u32,
    },
    /// Freeze and send the rest.
    Freeze {
        /// Why.
        reason: FreezeReason,
    },
    /// Roll back.
    Abort {
        /// Why, in words for the user.
        reason: String,
    },
}

/// Estimates from the rounds so far (at least one).
pub fn estimate(rounds: &[RoundStats]) -> Estimate {
    // Bandwidth over the last two rounds: one short round is a noisy sample.
    let recent = &rounds[rounds.len().saturating_sub(2)..];
    let bytes: u64 = recent.iter().map(|r| r.bytes_sent).sum();
    let secs: f64 = recent.iter().map(RoundStats::send_secs).sum();
    let bandwidth = if secs > 0.0 {
        bytes as f64 / secs
    } else {
        f64::INFINITY
    };
    let pages: u64 = recent.iter().map(|r| r.pages_sent).sum();
    let bytes_per_page = if pages > 0 {
        bytes as f64 / pages as f64
    } else {
        4096.0
    };
    let last = rounds.last();
    let dirty = last.map(|r| r.dirty_pages).unwrap_or(0);
    let last_secs = last.map(|r| r.duration.as_secs_f64()).unwrap_or(0.0);
    let dirty_pages_s = if last_secs > 0.0 {
        dirty as f64 / last_secs
    } else {
        0.0
    };
    let expected_downtime_ms = if dirty == 0 {
        0.0
    } else if bandwidth.is_finite() && bandwidth > 0.0 {
        dirty as f64 * bytes_per_page / bandwidth * 1000.0
    } else {
        0.0
    };
    Estimate {
        bandwidth_bytes_s: if bandwidth.is_finite() {
            bandwidth
        } else {
            0.0
        },
        bytes_per_page,
        dirty_pages_s,
        expected_downtime_ms,
    }
}

/// Decides after a round. `rounds` holds every round so far (at least one), `throttle_pct` the
/// throttle in force during the last one.
pub fn decide(policy: &PrecopyPolicy, rounds: &[RoundStats], throttle_pct: u32) -> Decision {
    let Some(last) = rounds.last() else {
        return Decision::AnotherRound { throttle_pct: 0 };
    };
    let est = estimate(rounds);
    // A first round that followed the container's writes (it held pages back until written)
    // ends with only the pages written since it sent them: that count says nothing of the
    // rate at which the container dirties memory, which fills the dirty set until the freeze
    // (measured: 1444 dirty at the end of such a round of 256 MiB writing 50 MiB/s, 2704 at
    // the freeze, 150 ms of dump). It does not count as convergence: the next round, which
    // sends only what is dirty, measures the rate.
    let followed = last.waited > Duration::ZERO && last.dirty_pages > 0;
    if est.expected_downtime_ms <= policy.downtime_budget_ms && !followed {
        return Decision::Freeze {
            reason: FreezeReason::Converged,
        };
    }
    if rounds.len() as u32 >= policy.max_rounds {
        return match policy.at_round_limit {
            WhenStuck::Abort => Decision::Abort {
                reason: format!(
                    "pre-copy did not converge in {} rounds: {} pages still dirty, about {:.0} ms \
                     to send against a budget of {:.0} ms",
                    rounds.len(),
                    last.dirty_pages,
                    est.expected_downtime_ms,
                    policy.downtime_budget_ms
                ),
            },
            WhenStuck::PostCopy => Decision::Freeze {
                reason: FreezeReason::PostCopy,
            },
            _ => Decision::Freeze {
                reason: FreezeReason::RoundLimit,
            },
        };
    }
    // The first round copies everything: it says nothing about convergence yet.
    let stuck = rounds.len() >= 2
        && last.pages_sent > 0
        && last.dirty_pages as f64 > policy.stuck_ratio * last.pages_sent as f64;
    if !stuck {
        return Decision::AnotherRound { throttle_pct };
    }
    match policy.when_stuck {
        WhenStuck::AutoConverge if throttle_pct < policy.throttle_max_pct => {
            let next = if throttle_pct == 0 {
                policy.throttle_initial_pct
            } else {
                (throttle_pct + policy.throttle_step_pct).min(policy.throttle_max_pct)
            };
            Decision::AnotherRound { throttle_pct: next }
        }
        WhenStuck::AutoConverge | WhenStuck::StopAndCopy => Decision::Freeze {
            reason: FreezeReason::NotConverging,
        },
        WhenStuck::PostCopy => Decision::Freeze {
            reason: FreezeReason::PostCopy,
        },
        WhenStuck::Abort => Decision::Abort {
            reason: format!(
                "the container dirties memory faster than the link carries it: {:.1} MiB/s \
                 dirtied against {:.1} MiB/s sent; rerun with auto-converge or stop-and-copy",
                est.dirty_pages_s * 4096.0 / (1 << 20) as f64,
                est.bandwidth_bytes_s / (1 << 20) as f64
            ),
        },
    }
}
