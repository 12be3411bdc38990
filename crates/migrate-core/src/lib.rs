//! The migration state machine, pure: no sockets, no clock, no processes.
//!
//! The agent that owns the container (the *source*) drives a [`Migration`]: it feeds it
//! [`Event`]s with the current time and carries out the [`Action`]s it returns. Everything that
//! matters for safety is decided here, so it is tested here with a virtual clock:
//!
//! * before the **commit point** (the destination recorded the commit and said so) every
//!   failure leads to a rollback that leaves the container running on the source (it was left
//!   in place, frozen, by the dump) and the destination clean; a cancel does too, until the
//!   destination confirmed the restore;
//! * in `Committing` the source waits for the destination's answer (the driver retries until it
//!   gets one): committed, or never committed, which rolls back like any failure before the
//!   commit point;
//! * after it, the source never runs again: failures only leave cleanup work, never a rollback.
//!
//! ```text
//! Created -> Preflight -> Preparing [-> PreCopying (rounds)] -> Redirecting -> Dumping
//!    -> Transferring -> Restoring -> Committing ==(commit point)==> CleaningUp -> Done
//! any state before the commit point --failure--> RollingBack -> RolledBack
//! ```
//!
//! With a [`PrecopyPolicy`] ([`Migration::with_precopy`]) memory is copied in rounds while the
//! container runs; after each round [`policy::decide`] chooses another round (possibly with the
//! container's CPU throttled), the freeze, or a rollback.

#![forbid(unsafe_code)]

pub mod policy;
mod report;

pub use policy::{
    hold_unwritten, Decision, Estimate, FirstRoundView, FreezeReason, PrecopyPolicy, RoundStats,
    WhenStuck, FOLLOW_WRITES_MAX_FACTOR, FOLLOW_WRITES_MIN_WAIT,
};
pub use report::{
    BaseReport, IntegrityReport, MemoryReport, Outcome, PhaseTiming, Report, RoundReport,
    RouteSwitch, TrackingFallback, TrackingReport,
};

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A step of a migration, as reported to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Both sides checked: CRIU, runtime, space, name.
    Preflight,
    /// Destination prepared while the container runs: network namespace, bundle, rootfs, hold.
    Prepare,
    /// One pre-copy round: pages dirtied since the last round sent while the container runs.
    PreCopy,
    /// The overlay points the container's MAC at the destination, which holds its packets.
    Redirect,
    /// Container frozen and dumped by CRIU.
    Dump,
    /// Images and the last filesystem diff sent to the destination.
    Transfer,
    /// The destination restored the container.
    Restore,
    /// The destination released the held packets and announced the container (gratuitous ARP).
    Commit,
    /// The source container and its leftovers removed.
    Cleanup,
    /// Undoing a migration that failed before the commit point.
    Rollback,
}

impl Phase {
    /// The phase's name in progress lines, summaries and JSON (the same everywhere).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Prepare => "prepare",
            Phase::PreCopy => "pre_copy",
            Phase::Redirect => "redirect",
            Phase::Dump => "dump",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Cleanup => "cleanup",
            Phase::Rollback => "rollback",
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not started.
    Created,
    /// Running the preflight checks.
    Preflight,
    /// Preparing the destination.
    Preparing,
    /// Copying memory in rounds while the container runs.
    PreCopying,
    /// Switching the overlay to the destination.
    Redirecting,
    /// Freezing and dumping.
    Dumping,
    /// Sending images.
    Transferring,
    /// Destination restoring.
    Restoring,
    /// Past the commit point: destination releasing the container.
    Committing,
    /// Past the commit point: removing the source.
    CleaningUp,
    /// Finished: the container runs at the destination.
    Done,
    /// Undoing.
    RollingBack,
    /// Undone: the container runs on the source.
    RolledBack,
    /// The rollback itself failed: operator attention needed.
    Failed,
}

impl State {
    /// The state's name in messages and JSON (the same everywhere).
    pub fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Preflight => "preflight",
            State::Preparing => "preparing",
            State::PreCopying => "pre_copying",
            State::Redirecting => "redirecting",
            State::Dumping => "dumping",
            State::Transferring => "transferring",
            State::Restoring => "restoring",
            State::Committing => "committing",
            State::CleaningUp => "cleaning_up",
            State::Done => "done",
            State::RollingBack => "rolling_back",
            State::RolledBack => "rolled_back",
            State::Failed => "failed",
        }
    }

    /// True once the source must never run again.
    pub fn past_commit_point(self) -> bool {
        matches!(self, State::Committing | State::CleaningUp | State::Done)
    }

    /// True when no further event is expected.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Done | State::RolledBack | State::Failed)
    }

    fn phase(self) -> Option<Phase> {
        Some(match self {
            State::Preflight => Phase::Preflight,
            State::Preparing => Phase::Prepare,
            State::PreCopying => Phase::PreCopy,
            State::Redirecting => Phase::Redirect,
            State::Dumping => Phase::Dump,
            State::Transferring => Phase::Transfer,
            State::Restoring => Phase::Restore,
            State::Committing => Phase::Commit,
            State::CleaningUp => Phase::Cleanup,
            State::RollingBack => Phase::Rollback,
            _ => return None,
        })
    }
}

/// What happened, reported by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The job was submitted.
    Start,
    /// The current phase's work succeeded; `bytes` went over the network for it.
    Done {
        /// Bytes sent during the phase.
        bytes: u64,
    },
    /// The current phase's work failed.
    Failed {
        /// What failed, in words for the user.
        error: String,
    },
    /// A pre-copy round finished.
    RoundDone(RoundStats),
    /// The user or orchestrator asked to cancel.
    Cancel,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Check both sides.
    Preflight,
    /// Prepare the destination (netns, bundle, rootfs, packet hold).
    Prepare,
    /// Run pre-copy round `round` (1 = the first, full copy) with the container's CPU throttled
    /// by `throttle_pct` percent (0: not throttled), then report [`Event::RoundDone`].
    CopyRound {
        /// Round number, from 1.
        round: u32,
        /// CPU throttle to apply for this round, percent.
        throttle_pct: u32,
    },
    /// Point the overlay at the destination.
    Redirect,
    /// Freeze and dump the container (the source container stops existing as a process).
    Dump,
    /// Send images and the final filesystem diff.
    Transfer,
    /// Restore at the destination and wait for its confirmation.
    Restore,
    /// Tell the destination to release held packets and announce the container.
    Commit,
    /// Remove the source container and its leftovers.
    CleanupSource,
    /// Undo: each flag says what must be undone.
    Rollback(RollbackPlan),
    /// The migration ended; the report is final.
    Finish,
}

/// What a rollback must undo, derived from how far the migration got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RollbackPlan {
    /// The overlay must point back at the source.
    pub redirect_back: bool,
    /// The source container was dumped (and stopped): restore it from its local images.
    pub restore_source: bool,
    /// The destination holds prepared or restored state that must be removed.
    pub clean_destination: bool,
    /// The container's CPU was throttled by pre-copy: lift the throttle.
    #[serde(default)]
    pub unthrottle: bool,
}

/// An event that makes no sense in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The event cannot happen in this state.
    #[error("event {event} is not valid in state {state:?}")]
    Invalid {
        /// The state.
        state: State,
        /// The event, described.
        event: String,
    },
    /// Cancel arrived after the commit point: the migration can only finish.
    #[error(
        "too late to cancel: the destination already confirmed the restore (commit point passed)"
    )]
    PastCommitPoint,
}

/// One migration, seen from the source.
#[derive(Debug, Clone)]
pub struct Migration {
    state: State,
    report: Report,
    phase_started: Duration,
    reached: Reached,
    cancel_requested: bool,
    frozen_since: Option<Duration>,
    precopy: Option<PrecopyPolicy>,
    rounds: Vec<RoundStats>,
    throttle_pct: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Reached {
    prepared: bool,
    redirected: bool,
    dump_started: bool,
}

impl Migration {
    /// A new migration of `container` from `from` to `to`.
    pub fn new(id: &str, container: &str, from: &str, to: &str) -> Self {
        Migration {
            state: State::Created,
            report: Report::new(id, container, from, to),
            phase_started: Duration::ZERO,
            reached: Reached::default(),
            cancel_requested: false,
            frozen_since: None,
            precopy: None,
            rounds: vec![],
            throttle_pct: 0,
        }
    }

    /// Copies memory in pre-copy rounds under `policy` before the freeze.
    pub fn with_precopy(mut self, policy: PrecopyPolicy) -> Self {
        self.report.mode = "pre-copy".into();
        self.precopy = Some(policy);
        self
    }

    /// The CPU throttle pre-copy asked for last (percent; 0 when none).
    pub fn throttle_pct(&self) -> u32 {
        self.throttle_pct
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The report so far (final once the state is terminal).
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Records the wall-clock time of the start (ms since the Unix epoch). The state machine
    /// itself runs on the monotonic `now` it is fed; this only labels the report.
    pub fn set_started_unix_ms(&mut self, unix_ms: f64) {
        self.report.started_unix_ms = unix_ms;
    }

    /// Records how pre-copy tracks dirty pages (for the report).
    pub fn set_dirty_tracking(&mut self, method: &str) {
        self.report.dirty_tracking = Some(method.to_string());
    }

    /// Records how each process's writes are followed (see [`TrackingReport`]).
    pub fn set_tracking(&mut self, tracking: TrackingReport) {
        self.report.tracking = Some(tracking);
    }

    /// Records the digest of the root filesystem at the freeze, which the destination matched.
    pub fn set_rootfs_digest(&mut self, digest: &str) {
        self.report.rootfs_digest = Some(digest.to_string());
    }

    /// Records when the destination had every image (ms from the start of the transfer).
    pub fn set_images_delivered_ms(&mut self, ms: f64) {
        self.report.images_delivered_ms = Some(ms);
    }

    /// Records how the overlay's switch went.
    pub fn set_route_switch(&mut self, via: &str, ms: f64) {
        self.report.route_switch = Some(report::RouteSwitch {
            via: via.to_string(),
            ms,
        });
    }

    /// Records how the image's base layer reached the destination.
    pub fn set_base(&mut self, base: BaseReport) {
        self.report.base = Some(base);
    }

    /// Records a warning for the report (once).
    pub fn warn(&mut self, warning: String) {
        if !self.report.warnings.contains(&warning) {
            self.report.warnings.push(warning);
        }
    }

    /// Records the request round trips between the hosts while the container was frozen.
    pub fn set_frozen_round_trips(&mut self, n: u32) {
        self.report.frozen_round_trips = n;
    }

    /// Records how memory crossed the freeze (pre-copy).
    pub fn set_memory(&mut self, memory: &MemoryReport) {
        self.report.memory = Some(memory.clone());
        if let Some(w) = memory.integrity.as_ref().and_then(|i| i.warning()) {
            if !self.report.warnings.contains(&w) {
                self.report.warnings.push(w);
            }
        }
    }

    /// Why pre-copy stopped, once it has.
    pub fn precopy_stop(&self) -> Option<FreezeReason> {
        self.report.precopy_stop
    }

    /// Consumes the migration, yielding its report.
    pub fn finalize(self) -> Report {
        self.report
    }

    /// Feeds one event at time `now` (any monotonic origin); returns the actions to carry out.
    pub fn handle(&mut self, event: Event, now: Duration) -> Result<Vec<Action>, TransitionError> {
        let invalid = |state, event: &Event| TransitionError::Invalid {
            state,
            event: format!("{event:?}"),
        };
        match (&event, self.state) {
            (Event::Start, State::Created) => {
                self.report.started_at = now;
                Ok(self.enter(State::Preflight, now, vec![Action::Preflight]))
            }
            (Event::Start, s) => Err(invalid(s, &event)),
            (Event::Cancel, s) if s.past_commit_point() => Err(TransitionError::PastCommitPoint),
            (Event::Cancel, s) if s.is_terminal() || s == State::RollingBack => {
                Err(invalid(s, &event))
            }
            (Event::Cancel, State::Created) => {
                self.report.outcome = Outcome::RolledBack {
                    reason: "cancelled before start".into(),
                };
                self.state = State::RolledBack;
                Ok(vec![Action::Finish])
            }
            (Event::Cancel, _) => {
                // The phase in progress is allowed to finish (its work is not interruptible
                // halfway without risk); the next completion turns into a rollback.
                self.cancel_requested = true;
                Ok(vec![])
            }
            (Event::Done { .. } | Event::Failed { .. } | Event::RoundDone(_), s)
                if s.is_terminal() || s == State::Created =>
            {
                Err(invalid(s, &event))
            }
            (Event::RoundDone(stats), State::PreCopying) => Ok(self.round_done(stats.clone(), now)),
            (Event::RoundDone(_), s) | (Event::Done { .. }, s @ State::PreCopying) => {
                Err(invalid(s, &event))
            }
            (Event::Done { bytes }, s) => {
                let bytes = *bytes;
                self.close_phase(now, bytes);
                if self.cancel_requested && !s.past_commit_point() && s != State::RollingBack {
                    self.mark_progress(s);
                    if s == State::Restoring {
                        // Restore confirmed: that is the commit point, cancel is too late.
                        self.cancel_requested = false;
                    } else {
                        return Ok(self.start_rollback("cancelled".into(), now));
                    }
                }
                self.mark_progress(s);
                Ok(match s {
                    State::Preflight => self.enter(State::Preparing, now, vec![Action::Prepare]),
                    State::Preparing if self.precopy.as_ref().is_some_and(|p| p.post_copy) => {
                        // Post-copy from the start: no rounds.
                        self.report.precopy_stop = Some(FreezeReason::PostCopy);
                        self.enter(State::Redirecting, now, vec![Action::Redirect])
                    }
                    State::Preparing if self.precopy.is_some() => self.enter(
                        State::PreCopying,
                        now,
                        vec![Action::CopyRound {
                            round: 1,
                            throttle_pct: 0,
                        }],
                    ),
                    State::Preparing => self.enter(State::Redirecting, now, vec![Action::Redirect]),
                    State::Redirecting => {
                        self.frozen_since = Some(now);
                        self.enter(State::Dumping, now, vec![Action::Dump])
                    }
                    State::Dumping => self.enter(State::Transferring, now, vec![Action::Transfer]),
                    State::Transferring => self.enter(State::Restoring, now, vec![Action::Restore]),
                    State::Restoring => self.enter(State::Committing, now, vec![Action::Commit]),
                    State::Committing => {
                        self.report.committed = true;
                        if let Some(t) = self.frozen_since {
                            self.report.frozen_ms = ms(now.saturating_sub(t));
                        }
                        self.enter(State::CleaningUp, now, vec![Action::CleanupSource])
                    }
                    State::CleaningUp => {
                        self.report.outcome = Outcome::Completed;
                        self.finish(State::Done, now)
                    }
                    State::RollingBack => self.finish(State::RolledBack, now),
                    s => return Err(invalid(s, &event)),
                })
            }
            (Event::Failed { error }, s) => {
                let error = error.clone();
                match s {
                    State::Created | State::Done | State::RolledBack | State::Failed => {
                        Err(invalid(s, &event))
                    }
                    State::CleaningUp => {
                        // Past the commit point: record and carry on; the container lives at the
                        // destination.
                        self.close_phase(now, 0);
                        self.report.warnings.push(error);
                        self.report.outcome = Outcome::Completed;
                        Ok(self.finish(State::Done, now))
                    }
                    State::RollingBack => {
                        self.close_phase(now, 0);
                        let reason = match &self.report.outcome {
                            Outcome::RolledBack { reason } => reason.clone(),
                            _ => String::new(),
                        };
                        self.report.outcome = Outcome::Failed {
                            reason: format!("{reason}; rollback failed: {error}"),
                        };
                        Ok(self.finish(State::Failed, now))
                    }
                    _ => {
                        self.close_phase(now, 0);
                        // A failing dump may have stopped the container: restore_source decides.
                        if s == State::Dumping {
                            self.reached.dump_started = true;
                        }
                        let phase = s.phase().map(|p| format!("{p:?}")).unwrap_or_default();
                        Ok(self.start_rollback(format!("{phase} failed: {error}"), now))
                    }
                }
            }
        }
    }

    fn round_done(&mut self, stats: RoundStats, now: Duration) -> Vec<Action> {
        self.close_phase(now, stats.bytes_sent);
        self.rounds.push(stats.clone());
        let policy = self.precopy.clone().unwrap_or_default();
        let estimate = policy::estimate(&self.rounds);
        let decision = if self.cancel_requested {
            Decision::Abort {
                reason: "cancelled".into(),
            }
        } else {
            policy::decide(&policy, &self.rounds, self.throttle_pct)
        };
        self.report.rounds.push(RoundReport {
            round: self.rounds.len() as u32,
            pages_sent: stats.pages_sent,
            bytes_sent: stats.bytes_sent,
            dirty_pages: stats.dirty_pages,
            duration_ms: ms(stats.duration),
            waited_ms: ms(stats.waited),
            throttle_pct: self.throttle_pct,
            estimate,
            decision: decision.clone(),
        });
        match decision {
            Decision::AnotherRound { throttle_pct } => {
                self.throttle_pct = throttle_pct;
                let round = self.rounds.len() as u32 + 1;
                self.enter(
                    State::PreCopying,
                    now,
                    vec![Action::CopyRound {
                        round,
                        throttle_pct,
                    }],
                )
            }
            Decision::Freeze { reason } => {
                self.report.precopy_stop = Some(reason);
                self.enter(State::Redirecting, now, vec![Action::Redirect])
            }
            Decision::Abort { reason } => self.start_rollback(reason, now),
        }
    }

    fn mark_progress(&mut self, done: State) {
        match done {
            State::Preparing => self.reached.prepared = true,
            State::Redirecting => self.reached.redirected = true,
            State::Dumping => self.reached.dump_started = true,
            _ => {}
        }
    }

    fn start_rollback(&mut self, reason: String, now: Duration) -> Vec<Action> {
        self.cancel_requested = false;
        // Redirect/prepare may have partly happened even when they failed: undo generously.
        let plan = RollbackPlan {
            redirect_back: self.reached.redirected || self.state == State::Redirecting,
            restore_source: self.reached.dump_started,
            clean_destination: self.state != State::Preflight,
            unthrottle: self.throttle_pct > 0,
        };
        self.report.outcome = Outcome::RolledBack { reason };
        self.report.rollback = Some(plan);
        self.enter(State::RollingBack, now, vec![Action::Rollback(plan)])
    }

    fn enter(&mut self, state: State, now: Duration, actions: Vec<Action>) -> Vec<Action> {
        self.state = state;
        self.phase_started = now;
        actions
    }

    fn close_phase(&mut self, now: Duration, bytes: u64) {
        if let Some(phase) = self.state.phase() {
            self.report.record(phase, self.phase_started, now, bytes);
        }
    }

    fn finish(&mut self, state: State, now: Duration) -> Vec<Action> {
        self.state = state;
        self.report.total_ms = ms(now.saturating_sub(self.report.started_at));
        vec![Action::Finish]
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod precopy_tests;
