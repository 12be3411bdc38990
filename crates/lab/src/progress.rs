//! A migration's progress as people read it, from its job events: in a terminal a live status
//! line (phase, round, bytes, rate, estimate, ETA) above one line per finished phase and
//! round; elsewhere (a pipe, a log file) only those lines, plus a progress line every
//! [`QUIET_PROGRESS`] of a long phase.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ferry_api::{JobEvent, JobEventKind};
use migrate_core::{Decision, Phase, RoundReport};

use crate::ops::human_bytes;

/// How often a long phase prints a progress line when stdout is not a terminal.
pub const QUIET_PROGRESS: Duration = Duration::from_secs(10);

/// How a migration's progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Nothing (a JSON report follows).
    Quiet,
    /// A live status line and a line per phase and round (a terminal).
    Bar,
    /// A line per phase and round, and every [`QUIET_PROGRESS`] of a long phase.
    Lines,
}

impl Follow {
    /// [`Follow::Bar`] when stdout is a terminal, else [`Follow::Lines`].
    pub fn detect() -> Follow {
        if std::io::stdout().is_terminal() {
            Follow::Bar
        } else {
            Follow::Lines
        }
    }
}

/// Renders one migration's events.
pub struct Progress {
    mode: Follow,
    bar: Option<indicatif::ProgressBar>,
    /// The pre-copy downtime budget, ms, to show estimates against.
    budget_ms: Option<f64>,
    /// Pre-copy rounds started so far.
    round: u32,
    /// The last progress sample of the phase under way: (elapsed ms, bytes).
    last: Option<(f64, u64)>,
    /// When the last progress line was printed ([`Follow::Lines`]).
    printed: Option<Instant>,
    /// The last finished round's dirty rate (bytes/s) and expected downtime (ms).
    last_round: Option<(f64, f64)>,
}

impl Progress {
    /// Starts showing the migration of `name` from `from` to `to` as job `id`.
    pub fn new(
        mode: Follow,
        (name, from, to, id): (&str, &str, &str, &str),
        budget_ms: Option<f64>,
    ) -> Progress {
        let headline = format!("migrating {name} from {from} to {to} (job {id})");
        let bar = (mode == Follow::Bar).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b.set_message(headline.clone());
            b
        });
        if mode == Follow::Lines {
            println!("{headline}");
        }
        Progress {
            mode,
            bar,
            budget_ms,
            round: 0,
            last: None,
            printed: None,
            last_round: None,
        }
    }

    /// Prints a line above the status line (or alone).
    pub fn line(&self, s: &str) {
        match (&self.bar, self.mode) {
            (Some(b), _) => b.println(s),
            (None, Follow::Lines) => println!("{s}"),
            _ => {}
        }
    }

    fn status(&self, s: String) {
        if let Some(b) = &self.bar {
            b.set_message(s);
        }
    }

    /// The phase's name, with the round for a pre-copy round.
    fn label(&self, phase: Phase) -> String {
        match phase {
            Phase::PreCopy => format!("{} round {}", phase.name(), self.round),
            p => p.name().to_string(),
        }
    }

    /// Shows one event.
    pub fn event(&mut self, ev: &JobEvent) {
        if self.mode == Follow::Quiet {
            return;
        }
        match &ev.kind {
            JobEventKind::PhaseStarted { phase } => {
                if *phase == Phase::PreCopy {
                    self.round += 1;
                }
                self.last = None;
                self.printed = Some(Instant::now());
                self.status(format!("{} ...", self.label(*phase)));
            }
            JobEventKind::Progress {
                phase,
                elapsed_ms,
                bytes,
                planned_bytes,
            } => {
                let rate = match self.last {
                    Some((t, b)) if *elapsed_ms > t => {
                        bytes.saturating_sub(b) as f64 / ((elapsed_ms - t) / 1000.0)
                    }
                    _ => *bytes as f64 / (elapsed_ms / 1000.0).max(1e-3),
                };
                self.last = Some((*elapsed_ms, *bytes));
                let mut s = format!("{}: {}", self.label(*phase), human_bytes(*bytes));
                // Pages written again while the round runs go again: the link may carry more
                // than the round set out to send.
                if let Some(planned) = planned_bytes.filter(|p| *p >= *bytes) {
                    s.push_str(&format!(" of {}", human_bytes(planned)));
                }
                s.push_str(&format!(" sent, {}/s", human_bytes(rate as u64)));
                if let Some(planned) = planned_bytes.filter(|p| *p > *bytes && rate > 0.0) {
                    let eta = (planned - bytes) as f64 / rate;
                    s.push_str(&format!(", ETA {}", eta_text(eta)));
                }
                if let (Phase::PreCopy, Some((dirty, downtime))) = (phase, self.last_round) {
                    s.push_str(&format!(
                        "; dirtied {}/s, downtime est. {downtime:.0}{} ms",
                        human_bytes(dirty as u64),
                        self.budget_ms
                            .map(|b| format!("/{b:.0}"))
                            .unwrap_or_default()
                    ));
                }
                if self.mode == Follow::Lines {
                    if self.printed.is_none_or(|p| p.elapsed() >= QUIET_PROGRESS) {
                        self.printed = Some(Instant::now());
                        println!("  ...  {s}");
                    }
                } else {
                    self.status(s);
                }
            }
            JobEventKind::PhaseDone {
                phase,
                duration_ms,
                bytes,
            } => {
                if *phase != Phase::PreCopy {
                    self.line(&format!(
                        "  ok   {:<16} {:>9.1} ms {:>12}",
                        self.label(*phase),
                        duration_ms,
                        human_bytes(*bytes)
                    ));
                }
            }
            JobEventKind::Round { round } => {
                self.last_round = Some((
                    round.estimate.dirty_pages_s * 4096.0,
                    round.estimate.expected_downtime_ms,
                ));
                let s = round_line(round, self.budget_ms);
                self.line(&s);
            }
            JobEventKind::PhaseFailed { phase, error } => {
                self.line(&format!("  FAIL {:<16} {error}", self.label(*phase)));
            }
            JobEventKind::Committed => {
                self.line("  commit point passed: the destination owns the container")
            }
            JobEventKind::Finished { .. } => {
                if let Some(b) = &self.bar {
                    b.finish_and_clear();
                }
            }
        }
    }

    /// Prints a message of the caller's to stderr, with the status line out of its way.
    pub fn message(&self, s: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{s}")),
            None => eprintln!("{s}"),
        }
    }
}

/// A time left, as people say it.
fn eta_text(secs: f64) -> String {
    match secs {
        s if s < 1.0 => "<1 s".into(),
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// One line for a finished pre-copy round.
pub fn round_line(r: &RoundReport, budget_ms: Option<f64>) -> String {
    let secs = (r.duration_ms / 1000.0).max(1e-3);
    let dirty_rate = r.estimate.dirty_pages_s * 4096.0;
    let then = match &r.decision {
        Decision::AnotherRound { throttle_pct: 0 } => "another round".to_string(),
        Decision::AnotherRound { throttle_pct } => {
            format!("another round, CPU throttled {throttle_pct} %")
        }
        Decision::Freeze { reason } => format!("freeze ({})", reason.name()),
        Decision::Abort { reason } => format!("abort: {reason}"),
    };
    format!(
        "  ok   pre_copy round {:<2} {:>9.1} ms {:>12} ({}/s){}; dirty again {} ({}/s); expected downtime {:.0} ms{} -> {then}",
        r.round,
        r.duration_ms,
        human_bytes(r.bytes_sent),
        human_bytes((r.bytes_sent as f64 / secs) as u64),
        if r.throttle_pct > 0 {
            format!(", throttled {} %", r.throttle_pct)
        } else {
            String::new()
        },
        human_bytes(r.dirty_pages * 4096),
        human_bytes(dirty_rate as u64),
        r.estimate.expected_downtime_ms,
        budget_ms
            .map(|b| format!(" (budget {b:.0} ms)"))
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_line_says_what_was_sent_what_is_dirty_and_what_follows() {
        let r = RoundReport {
            round: 2,
            pages_sent: 25_600,
            bytes_sent: 100 << 20,
            dirty_pages: 2_560,
            duration_ms: 2_000.0,
            waited_ms: 0.0,
            throttle_pct: 20,
            estimate: migrate_core::Estimate {
                bandwidth_bytes_s: 50.0 * (1 << 20) as f64,
                bytes_per_page: 4096.0,
                dirty_pages_s: 1_280.0,
                expected_downtime_ms: 200.0,
            },
            decision: Decision::Freeze {
                reason: migrate_core::FreezeReason::RoundLimit,
            },
        };
        let line = round_line(&r, Some(50.0));
        for part in [
            "pre_copy round 2",
            "100.00 MiB (50.00 MiB/s)",
            "throttled 20 %",
            "dirty again 10.00 MiB (5.00 MiB/s)",
            "expected downtime 200 ms (budget 50 ms)",
            "-> freeze (round-limit)",
        ] {
            assert!(line.contains(part), "{line:?} lacks {part:?}");
        }
    }

    #[test]
    fn times_left_read_naturally() {
        assert_eq!(eta_text(0.2), "<1 s");
        assert_eq!(eta_text(42.4), "42 s");
        assert_eq!(eta_text(600.0), "10 min");
        assert_eq!(eta_text(7200.0), "2.0 h");
    }
}
