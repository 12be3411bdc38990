//! Pre-copy driven end to end with a fake checkpointer (a container that dirties pages at a
//! set rate, slowed by the CPU throttle), a fake link (bandwidth, bytes per page) and a virtual
//! clock.

use super::*;
use crate::policy::{decide, estimate};
use crate::tests::{drive_to, t};

const PAGE: u64 = 4096;
const MIB_PAGES: u64 = (1 << 20) / PAGE;

/// A container: `resident` pages, dirtying `dirty_pages_s` distinct pages per second at full
/// speed (within a hot set of `hot` pages).
struct FakeContainer {
    resident: u64,
    hot: u64,
    dirty_pages_s: f64,
}

/// A link: `bytes_s` of bandwidth, `bytes_per_page` on the wire per page sent.
struct FakeLink {
    bytes_s: f64,
    bytes_per_page: f64,
}

struct Sim {
    c: FakeContainer,
    link: FakeLink,
    now: Duration,
    /// Pages dirty now (to send in the next round).
    dirty: u64,
    /// Throttles seen, round by round.
    throttles: Vec<u32>,
}

impl Sim {
    fn new(c: FakeContainer, link: FakeLink) -> Sim {
        let dirty = c.resident;
        Sim {
            c,
            link,
            now: Duration::ZERO,
            dirty,
            throttles: vec![],
        }
    }

    /// Carries out one round: sends what is dirty, during which the container dirties more.
    fn round(&mut self, throttle_pct: u32) -> RoundStats {
        self.throttles.push(throttle_pct);
        let pages = self.dirty;
        let bytes = (pages as f64 * self.link.bytes_per_page) as u64;
        let secs = bytes as f64 / self.link.bytes_s;
        let duration = Duration::from_secs_f64(secs);
        let speed = 1.0 - throttle_pct as f64 / 100.0;
        let dirtied = (self.c.dirty_pages_s * speed * secs).round() as u64;
        self.dirty = dirtied.min(self.c.hot);
        self.now += duration;
        RoundStats {
            pages_sent: pages,
            bytes_sent: bytes,
            dirty_pages: self.dirty,
            duration,
            ..Default::default()
        }
    }

    /// Runs a migration to its end; every non-round phase takes 5 ms.
    fn run(&mut self, mut m: Migration) -> Report {
        let mut actions = m.handle(Event::Start, self.now).unwrap();
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000, "the migration never ends");
            let action = actions.first().cloned().expect("an action");
            let event = match action {
                Action::Finish => break,
                Action::CopyRound {
                    round,
                    throttle_pct,
                } => {
                    assert_eq!(round as usize, self.throttles.len() + 1, "rounds in order");
                    Event::RoundDone(self.round(throttle_pct))
                }
                _ => {
                    self.now += Duration::from_millis(5);
                    Event::Done { bytes: 10 }
                }
            };
            actions = m.handle(event, self.now).unwrap();
        }
        m.finalize()
    }
}

fn gbit() -> FakeLink {
    FakeLink {
        bytes_s: 125e6,
        bytes_per_page: PAGE as f64,
    }
}

#[test]
fn one_gib_dirtying_50_mib_s_over_1_gbit_converges_without_throttling() {
    let mut sim = Sim::new(
        FakeContainer {
            resident: 1024 * MIB_PAGES,
            hot: 1024 * MIB_PAGES,
            dirty_pages_s: 50.0 * MIB_PAGES as f64,
        },
        gbit(),
    );
    let r = sim.run(Migration::new("j", "c", "h1", "h2").with_precopy(PrecopyPolicy::default()));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.mode, "pre-copy");
    assert_eq!(r.precopy_stop, Some(FreezeReason::Converged));
    assert!(sim.throttles.iter().all(|&t| t == 0), "{:?}", sim.throttles);
    let rounds = &r.rounds;
    assert!(
        rounds.len() >= 3 && rounds.len() < 30,
        "{} rounds",
        rounds.len()
    );
    // The first round sends everything; then each sends what the previous one left dirty.
    assert_eq!(rounds[0].pages_sent, 1024 * MIB_PAGES);
    for w in rounds.windows(2) {
        assert_eq!(w[1].pages_sent, w[0].dirty_pages);
        assert!(w[1].dirty_pages < w[0].dirty_pages, "the dirty set shrinks");
    }
    let last = rounds.last().unwrap();
    assert!(last.estimate.expected_downtime_ms <= 50.0, "{last:?}");
    assert_eq!(
        last.decision,
        Decision::Freeze {
            reason: FreezeReason::Converged
        }
    );
    // Every round is a phase of its own, with its bytes.
    let precopy: Vec<_> = r
        .phases
        .iter()
        .filter(|p| p.phase == Phase::PreCopy)
        .collect();
    assert_eq!(precopy.len(), rounds.len());
    assert_eq!(precopy[0].bytes, rounds[0].bytes_sent);
    // The bandwidth estimate is what the fake link gives.
    assert!((rounds[1].estimate.bandwidth_bytes_s - 125e6).abs() < 1e3);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["precopy_stop"], "converged");
    assert_eq!(json["rounds"][0]["decision"]["decision"], "another-round");
}

fn too_fast() -> Sim {
    // 256 MiB dirtied at 200 MiB/s over a 100 MB/s link: never converges at full speed.
    Sim::new(
        FakeContainer {
            resident: 256 * MIB_PAGES,
            hot: 256 * MIB_PAGES,
            dirty_pages_s: 200.0 * MIB_PAGES as f64,
        },
        FakeLink {
            bytes_s: 100e6,
            bytes_per_page: PAGE as f64,
        },
    )
}

#[test]
fn dirtying_faster_than_the_link_converges_through_auto_converge_within_the_round_limit() {
    let mut sim = too_fast();
    let policy = PrecopyPolicy::default();
    let r = sim.run(Migration::new("j", "c", "h1", "h2").with_precopy(policy.clone()));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(
        r.precopy_stop,
        Some(FreezeReason::Converged),
        "{:?}",
        r.rounds
    );
    assert!(r.rounds.len() <= policy.max_rounds as usize);
    // The throttle starts at 20 % and climbs in steps of 10 %, never down, never past 99 %.
    let throttles = &sim.throttles;
    assert_eq!(throttles[0], 0);
    let first = throttles.iter().position(|&t| t > 0).expect("throttled");
    assert_eq!(throttles[first], 20);
    for w in throttles[first..].windows(2) {
        assert!(w[1] == w[0] || w[1] == (w[0] + 10).min(99), "{throttles:?}");
    }
    assert!(*throttles.last().unwrap() <= 99);
    // The report shows the throttle of each round.
    let reported: Vec<u32> = r.rounds.iter().map(|x| x.throttle_pct).collect();
    assert_eq!(&reported, throttles);
}

#[test]
fn dirtying_faster_than_the_link_freezes_or_rolls_back_as_the_policy_says() {
    let mut sim = too_fast();
    let policy = PrecopyPolicy {
        when_stuck: WhenStuck::StopAndCopy,
        ..PrecopyPolicy::default()
    };
    let r = sim.run(Migration::new("j", "c", "h1", "h2").with_precopy(policy));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.precopy_stop, Some(FreezeReason::NotConverging));
    assert_eq!(r.rounds.len(), 2, "stuck is seen after the second round");
    assert!(sim.throttles.iter().all(|&t| t == 0));

    let mut sim = too_fast();
    let policy = PrecopyPolicy {
        when_stuck: WhenStuck::Abort,
        ..PrecopyPolicy::default()
    };
    let r = sim.run(Migration::new("j", "c", "h1", "h2").with_precopy(policy));
    let Outcome::RolledBack { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("faster than the link"), "{reason}");
    assert!(reason.contains("MiB/s"), "{reason}");
    let plan = r.rollback.unwrap();
    assert!(plan.clean_destination && !plan.redirect_back && !plan.restore_source);
    assert!(!plan.unthrottle);
}

#[test]
fn post_copy_freezes_at_once_or_when_the_rounds_stop_gaining() {
    // By request: no rounds at all.
    let mut sim = too_fast();
    let policy = PrecopyPolicy {
        post_copy: true,
        ..PrecopyPolicy::default()
    };
    let r = sim.run(Migration::new("j", "c", "h1", "h2").with_precopy(policy));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.precopy_stop, Some(FreezeReason::PostCopy));
    assert!(r.rounds.is_empty(), "{:?}", r.rounds);

    // When stuck: as soon as the rounds stop gaining, without throttling.
    let mut sim = too_fast();
    let policy = PrecopyPolicy {
        when_stuck: WhenStuck::PostCopy,
        ..PrecopyPolicy::default()
    };
    let r = sim.run(Migration::new("j", "c", "h1", "h2").with_precopy(policy));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.precopy_stop, Some(FreezeReason::PostCopy));
    assert_eq!(r.rounds.len(), 2);
    assert!(sim.throttles.iter().all(|&t| t == 0));

    // Post-copy restores lazily: without lazy restore it is refused.
    let bad = PrecopyPolicy {
        post_copy: true,
        lazy_restore: false,
        ..PrecopyPolicy::default()
    };
    assert!(bad.validate().unwrap_err().contains("lazy restore"));
}

#[test]
fn small_containers_restore_eagerly_unless_post_copy_may_follow() {
    let p = PrecopyPolicy::default();
    assert_eq!(p.lazy_min_mib, 16);
    assert!(!p.may_post_copy());
    for post in [
        PrecopyPolicy {
            post_copy: true,
            ..PrecopyPolicy::default()
        },
        PrecopyPolicy {
            when_stuck: WhenStuck::PostCopy,
            ..PrecopyPolicy::default()
        },
        PrecopyPolicy {
            at_round_limit: WhenStuck::PostCopy,
            ..PrecopyPolicy::default()
        },
    ] {
        assert!(post.may_post_copy(), "{post:?}");
    }
    let huge = PrecopyPolicy {
        lazy_min_mib: (1 << 20) + 1,
        ..PrecopyPolicy::default()
    };
    assert!(huge.validate().unwrap_err().contains("lazy_min_mib"));
    // Requests without the field get the default.
    let parsed: PrecopyPolicy = serde_json::from_str(r#"{"max_rounds": 5}"#).unwrap();
    assert_eq!(parsed.lazy_min_mib, 16);
}

#[test]
fn the_round_limit_freezes_or_aborts_as_the_policy_says() {
    // Converges slowly: each round leaves 80 % of what it sent.
    let slow = || {
        Sim::new(
            FakeContainer {
                resident: 256 * MIB_PAGES,
                hot: 256 * MIB_PAGES,
                dirty_pages_s: 0.8 * 100e6 / PAGE as f64,
            },
            FakeLink {
                bytes_s: 100e6,
                bytes_per_page: PAGE as f64,
            },
        )
    };
    let policy = PrecopyPolicy {
        max_rounds: 4,
        stuck_ratio: 0.9,
        ..PrecopyPolicy::default()
    };
    let r = slow().run(Migration::new("j", "c", "h1", "h2").with_precopy(policy.clone()));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.precopy_stop, Some(FreezeReason::RoundLimit));
    assert_eq!(r.rounds.len(), 4);

    let policy = PrecopyPolicy {
        at_round_limit: WhenStuck::Abort,
        ..policy
    };
    let r = slow().run(Migration::new("j", "c", "h1", "h2").with_precopy(policy));
    let Outcome::RolledBack { reason } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    assert!(reason.contains("did not converge in 4 rounds"), "{reason}");
}

#[test]
fn cancel_during_a_round_rolls_back_after_it_and_lifts_the_throttle() {
    let mut sim = too_fast();
    let mut m = Migration::new("j", "c", "h1", "h2").with_precopy(PrecopyPolicy::default());
    let mut actions = m.handle(Event::Start, sim.now).unwrap();
    // Run until the container is throttled.
    loop {
        let a = actions[0].clone();
        let ev = match a {
            Action::CopyRound { throttle_pct, .. } if throttle_pct > 0 => break,
            Action::CopyRound { throttle_pct, .. } => Event::RoundDone(sim.round(throttle_pct)),
            Action::Preflight | Action::Prepare => Event::Done { bytes: 0 },
            other => panic!("unexpected {other:?}"),
        };
        actions = m.handle(ev, sim.now).unwrap();
    }
    assert!(m.throttle_pct() > 0);
    assert_eq!(m.handle(Event::Cancel, sim.now).unwrap(), vec![]);
    let a = m.handle(Event::RoundDone(sim.round(20)), sim.now).unwrap();
    let Action::Rollback(plan) = a[0] else {
        panic!("{a:?}")
    };
    assert!(plan.unthrottle && plan.clean_destination && !plan.redirect_back);
    assert_eq!(m.state(), State::RollingBack);
}

#[test]
fn a_failed_round_rolls_back_and_events_out_of_place_are_refused() {
    let mut m = Migration::new("j", "c", "h1", "h2").with_precopy(PrecopyPolicy::default());
    m.handle(Event::Start, t(0)).unwrap();
    // A round report outside pre-copy is refused.
    let stats = RoundStats {
        pages_sent: 1,
        bytes_sent: 1,
        dirty_pages: 0,
        duration: t(1),
        ..Default::default()
    };
    assert!(m.handle(Event::RoundDone(stats.clone()), t(1)).is_err());
    m.handle(Event::Done { bytes: 0 }, t(2)).unwrap();
    let a = m.handle(Event::Done { bytes: 0 }, t(3)).unwrap();
    assert_eq!(
        a,
        vec![Action::CopyRound {
            round: 1,
            throttle_pct: 0
        }]
    );
    // In pre-copy a plain Done is refused: a round reports its statistics.
    assert!(m.handle(Event::Done { bytes: 0 }, t(4)).is_err());
    let a = m
        .handle(
            Event::Failed {
                error: "link down".into(),
            },
            t(5),
        )
        .unwrap();
    let Action::Rollback(plan) = a[0] else {
        panic!("{a:?}")
    };
    assert!(plan.clean_destination && !plan.redirect_back && !plan.restore_source);
    let Outcome::RolledBack { reason } = &m.report().outcome else {
        panic!()
    };
    assert!(reason.contains("PreCopy failed: link down"), "{reason}");
}

#[test]
fn stop_and_copy_has_no_rounds() {
    let (m, _) = drive_to(State::Done);
    let r = m.finalize();
    assert_eq!(r.mode, "stop-copy");
    assert!(r.rounds.is_empty() && r.precopy_stop.is_none());
    let json = serde_json::to_value(&r).unwrap();
    assert!(json.get("rounds").is_none());
}

#[test]
fn estimates_follow_the_measured_link() {
    let r = |pages, bytes, dirty, ms| RoundStats {
        pages_sent: pages,
        bytes_sent: bytes,
        dirty_pages: dirty,
        duration: t(ms),
        ..Default::default()
    };
    // 1000 pages in 1000 bytes each over 100 ms: 10 MB/s; 500 dirty pages -> 50 ms.
    let e = policy::estimate(&[r(1000, 1_000_000, 500, 100)]);
    assert_eq!(e.bandwidth_bytes_s, 10e6);
    assert_eq!(e.bytes_per_page, 1000.0);
    assert_eq!(e.dirty_pages_s, 5000.0);
    assert!((e.expected_downtime_ms - 50.0).abs() < 1e-9);
    // The bandwidth is taken over the last two rounds.
    let e = policy::estimate(&[
        r(10, 10_000, 1, 1000),
        r(1000, 1_000_000, 500, 100),
        r(1000, 3_000_000, 0, 100),
    ]);
    assert_eq!(e.bandwidth_bytes_s, 20e6);
    assert_eq!(e.expected_downtime_ms, 0.0);
    // A budget of 50 ms is met exactly at 50 ms.
    let p = PrecopyPolicy::default();
    assert_eq!(
        policy::decide(&p, &[r(1000, 1_000_000, 500, 100)], 0),
        Decision::Freeze {
            reason: FreezeReason::Converged
        }
    );
    assert_eq!(
        policy::decide(&p, &[r(1000, 1_000_000, 501, 100)], 0),
        Decision::AnotherRound { throttle_pct: 0 }
    );
}

#[test]
fn bad_policies_are_refused_with_the_setting_named() {
    let ok = PrecopyPolicy::default();
    assert!(ok.validate().is_ok());
    for (p, word) in [
        (
            PrecopyPolicy {
                downtime_budget_ms: 0.0,
                ..ok.clone()
            },
            "budget",
        ),
        (
            PrecopyPolicy {
                max_rounds: 0,
                ..ok.clone()
            },
            "round limit",
        ),
        (
            PrecopyPolicy {
                throttle_max_pct: 100,
                ..ok.clone()
            },
            "throttle",
        ),
        (
            PrecopyPolicy {
                stuck_ratio: 1.5,
                ..ok.clone()
            },
            "stuck ratio",
        ),
    ] {
        let e = p.validate().unwrap_err();
        assert!(e.contains(word), "{e}");
    }
}

fn view(first_writes: f64, unwritten: u64, link: Option<f64>, elapsed_ms: u64) -> FirstRoundView {
    FirstRoundView {
        first_writes_pages_s: first_writes,
        unwritten_pages: unwritten,
        total_pages: 262_144,
        link_pages_s: link,
        elapsed: t(elapsed_ms),
    }
}

#[test]
fn the_first_round_waits_for_a_container_that_sweeps_its_memory_fast() {
    // 1 GiB written at 50 MiB/s over a link carrying about 119 MiB/s.
    let (sweep, link) = (12_800.0, 30_500.0);
    assert!(hold_unwritten(&view(sweep, 200_000, Some(link), 1_000)));
    // The limit: at most 4 x the time everything would take at once (4 x 8.6 s).
    assert!(hold_unwritten(&view(sweep, 2_000, Some(link), 34_000)));
    assert!(!hold_unwritten(&view(sweep, 2_000, Some(link), 34_500)));
}

#[test]
fn the_first_round_sends_at_once_what_the_container_does_not_write() {
    let link = Some(30_500.0);
    // Cold memory, or writes slow against the link: waiting saves little and costs time.
    assert!(!hold_unwritten(&view(0.0, 200_000, link, 1_000)));
    assert!(!hold_unwritten(&view(7_000.0, 200_000, link, 1_000)));
    // The link not measured yet: send, which measures it.
    assert!(!hold_unwritten(&view(12_800.0, 200_000, None, 100)));
    // Nothing left to hold, or less than the link carries in 50 ms.
    assert!(!hold_unwritten(&view(12_800.0, 0, link, 1_000)));
    assert!(!hold_unwritten(&view(12_800.0, 1_500, link, 1_000)));
    assert!(hold_unwritten(&view(12_800.0, 1_600, link, 1_000)));
}

#[test]
fn a_round_that_waited_is_measured_by_its_full_link_throughput() {
    // 1 GiB sent over 20 s, most of it spent waiting for writes; the link carried 125 MB/s
    // while full. Then 1280 pages are dirty: about 42 ms at 125 MB/s, not 102 ms at 51 MB/s.
    let r = RoundStats {
        pages_sent: 262_144,
        bytes_sent: 1 << 30,
        dirty_pages: 1280,
        duration: t(20_000),
        waited: t(19_000),
        link_bytes_s: Some(125_000_000),
    };
    let e = estimate(std::slice::from_ref(&r));
    assert!((e.bandwidth_bytes_s - 125e6).abs() < 1.0, "{e:?}");
    assert!((e.expected_downtime_ms - 41.9).abs() < 0.1, "{e:?}");
    // Under the budget, but a round that waited for the writes does not measure their rate:
    // one more round, which then decides on its own numbers.
    assert_eq!(
        decide(&PrecopyPolicy::default(), std::slice::from_ref(&r), 0),
        Decision::AnotherRound { throttle_pct: 0 }
    );
    let second = RoundStats {
        pages_sent: 1280,
        bytes_sent: 1280 * 4096,
        dirty_pages: 700,
        duration: t(60),
        waited: Duration::ZERO,
        link_bytes_s: None,
    };
    assert_eq!(
        decide(&PrecopyPolicy::default(), &[r, second], 0),
        Decision::Freeze {
            reason: FreezeReason::Converged
        }
    );
    // The same round without the measurement falls back to bytes over duration.
    let plain = RoundStats {
        waited: Duration::ZERO,
        link_bytes_s: None,
        ..RoundStats::default()
    };
    let e = estimate(&[RoundStats {
        bytes_sent: 1 << 30,
        duration: t(20_000),
        dirty_pages: 1280,
        pages_sent: 262_144,
        ..plain
    }]);
    assert!((e.bandwidth_bytes_s - (1u64 << 30) as f64 / 20.0).abs() < 1.0);
}

#[test]
fn a_round_that_followed_the_writes_does_not_count_as_converged() {
    let p = PrecopyPolicy::default();
    // 1444 dirty pages of 4145 bytes on 123 MB/s while the link was full: about 49 ms, under
    // the 50 ms budget.
    let r = |waited_ms| RoundStats {
        pages_sent: 65_536,
        bytes_sent: 65_536 * 4145,
        dirty_pages: 1444,
        duration: t(5270),
        waited: t(waited_ms),
        link_bytes_s: Some(123_000_000),
    };
    let e = policy::estimate(&[r(4611)]);
    assert!(e.expected_downtime_ms < 50.0, "{e:?}");
    assert_eq!(
        policy::decide(&p, &[r(4611)], 0),
        Decision::AnotherRound { throttle_pct: 0 }
    );
    // Nothing dirty at its end: nothing is left to measure.
    let clean = RoundStats {
        dirty_pages: 0,
        ..r(4611)
    };
    assert_eq!(
        policy::decide(&p, &[clean], 0),
        Decision::Freeze {
            reason: FreezeReason::Converged
        }
    );
    // At the round limit the limit decides, as after any round.
    let one = PrecopyPolicy {
        max_rounds: 1,
        ..PrecopyPolicy::default()
    };
    assert_eq!(
        policy::decide(&one, &[r(4611)], 0),
        Decision::Freeze {
            reason: FreezeReason::RoundLimit
        }
    );
}
