use super::*;

pub(crate) fn t(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn done(m: &mut Migration, at: u64, bytes: u64) -> Vec<Action> {
    m.handle(Event::Done { bytes }, t(at)).unwrap()
}

/// Drives a migration to the given state along the happy path, 10 ms a phase.
pub(crate) fn drive_to(target: State) -> (Migration, u64) {
    let mut m = Migration::new("j1", "echo", "h1", "h2");
    let mut now = 0;
    m.handle(Event::Start, t(now)).unwrap();
    while m.state() != target {
        now += 10;
        done(&mut m, now, 100);
        assert!(!m.state().is_terminal() || m.state() == target);
    }
    (m, now)
}

#[test]
fn happy_path_emits_every_action_in_order_and_times_phases() {
    let mut m = Migration::new("j1", "echo", "h1", "h2");
    assert_eq!(
        m.handle(Event::Start, t(0)).unwrap(),
        vec![Action::Preflight]
    );
    let expect = [
        (5, Action::Prepare),
        (25, Action::Redirect),
        (27, Action::Dump),
        (97, Action::Transfer),
        (102, Action::Restore),
        (180, Action::Commit),
        (183, Action::CleanupSource),
        (200, Action::Finish),
    ];
    for (at, action) in expect {
        assert_eq!(done(&mut m, at, 1000), vec![action]);
    }
    assert_eq!(m.state(), State::Done);
    let r = m.finalize();
    assert_eq!(r.outcome, Outcome::Completed);
    assert!(r.committed);
    assert_eq!(r.freeze_to_dump_ms, 70.0);
    assert_eq!(r.transfer_ms, 5.0);
    assert_eq!(r.restore_ms, 78.0);
    assert_eq!(r.network_switch_ms, 2.0 + 3.0);
    assert_eq!(r.frozen_ms, 183.0 - 27.0);
    assert_eq!(r.total_ms, 200.0);
    assert_eq!(r.bytes_sent, 8 * 1000);
    assert_eq!(r.phases.len(), 8);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["result"], "completed");
    assert_eq!(json["phases"][3]["phase"], "dump");
}

#[test]
fn failure_before_dump_rolls_back_without_restoring_source() {
    let (mut m, now) = drive_to(State::Preparing);
    let a = m
        .handle(
            Event::Failed {
                error: "destination unreachable".into(),
            },
            t(now + 1),
        )
        .unwrap();
    assert_eq!(
        a,
        vec![Action::Rollback(RollbackPlan {
            redirect_back: false,
            restore_source: false,
            clean_destination: true,
            unthrottle: false
        })]
    );
    assert_eq!(done(&mut m, now + 5, 0), vec![Action::Finish]);
    assert_eq!(m.state(), State::RolledBack);
    let r = m.report();
    assert!(!r.committed);
    match &r.outcome {
        Outcome::RolledBack { reason } => assert!(reason.contains("unreachable"), "{reason}"),
        o => panic!("unexpected outcome {o:?}"),
    }
}

#[test]
fn failure_in_every_state_before_commit_rolls_back_with_the_right_plan() {
    let cases = [
        (State::Preflight, false, false, false),
        (State::Preparing, false, false, true),
        (State::Redirecting, true, false, true),
        (State::Dumping, true, true, true),
        (State::Transferring, true, true, true),
        (State::Restoring, true, true, true),
    ];
    for (state, redirect_back, restore_source, clean_destination) in cases {
        let (mut m, now) = drive_to(state);
        let a = m
            .handle(Event::Failed { error: "x".into() }, t(now + 1))
            .unwrap();
        assert_eq!(
            a,
            vec![Action::Rollback(RollbackPlan {
                redirect_back,
                restore_source,
                clean_destination,
                unthrottle: false
            })],
            "state {state:?}"
        );
        assert!(!m.report().committed);
    }
}

#[test]
fn failure_after_commit_never_rolls_back() {
    let (mut m, now) = drive_to(State::CleaningUp);
    assert!(m.report().committed);
    let a = m
        .handle(
            Event::Failed {
                error: "rm failed".into(),
            },
            t(now + 2),
        )
        .unwrap();
    assert_eq!(a, vec![Action::Finish]);
    assert_eq!(m.state(), State::Done);
    assert_eq!(m.report().outcome, Outcome::Completed);
    assert_eq!(m.report().warnings.len(), 1);
    assert!(m.report().rollback.is_none());
}

#[test]
fn a_destination_that_never_committed_rolls_back_to_the_frozen_source() {
    // The driver fails Committing only when the destination answered that it never committed
    // (its copy timed out, was aborted or removed at a restart): the source thaws its copy.
    let (mut m, now) = drive_to(State::Committing);
    assert!(
        !m.report().committed,
        "not committed before the destination says so"
    );
    let a = m
        .handle(
            Event::Failed {
                error: "h2 never committed job j1".into(),
            },
            t(now + 1),
        )
        .unwrap();
    assert_eq!(
        a,
        vec![Action::Rollback(RollbackPlan {
            redirect_back: true,
            restore_source: true,
            clean_destination: true,
            unthrottle: false
        })]
    );
    assert!(!m.report().committed);
    // A cancel while the commit is in flight is refused: only the destination decides now.
    assert_eq!(
        drive_to(State::Committing)
            .0
            .handle(Event::Cancel, t(now))
            .unwrap_err(),
        TransitionError::PastCommitPoint
    );
}

#[test]
fn cancel_waits_for_the_phase_then_rolls_back() {
    let (mut m, now) = drive_to(State::Transferring);
    assert_eq!(m.handle(Event::Cancel, t(now + 1)).unwrap(), vec![]);
    let a = done(&mut m, now + 2, 10);
    assert!(matches!(
        a.as_slice(),
        [Action::Rollback(RollbackPlan {
            restore_source: true,
            ..
        })]
    ));
    done(&mut m, now + 3, 0);
    assert_eq!(m.state(), State::RolledBack);
}

#[test]
fn cancel_after_commit_point_is_refused() {
    let (mut m, now) = drive_to(State::CleaningUp);
    assert_eq!(
        m.handle(Event::Cancel, t(now)).unwrap_err(),
        TransitionError::PastCommitPoint
    );
    // A cancel that raced with a successful restore loses: the restore is the commit point.
    let (mut m, now) = drive_to(State::Restoring);
    m.handle(Event::Cancel, t(now)).unwrap();
    assert_eq!(done(&mut m, now + 1, 0), vec![Action::Commit]);
    assert_eq!(done(&mut m, now + 2, 0), vec![Action::CleanupSource]);
    assert!(m.report().committed);
}

#[test]
fn failed_rollback_ends_failed() {
    let (mut m, now) = drive_to(State::Dumping);
    m.handle(Event::Failed { error: "a".into() }, t(now))
        .unwrap();
    let a = m
        .handle(
            Event::Failed {
                error: "restore at source failed".into(),
            },
            t(now + 1),
        )
        .unwrap();
    assert_eq!(a, vec![Action::Finish]);
    assert_eq!(m.state(), State::Failed);
    assert!(matches!(m.report().outcome, Outcome::Failed { .. }));
}

#[test]
fn impossible_events_are_typed_errors() {
    let mut m = Migration::new("j", "c", "a", "b");
    assert!(m.handle(Event::Done { bytes: 0 }, t(0)).is_err());
    m.handle(Event::Start, t(0)).unwrap();
    assert!(m.handle(Event::Start, t(1)).is_err());
    let (mut m, now) = drive_to(State::Done);
    assert!(m.handle(Event::Done { bytes: 0 }, t(now)).is_err());
    assert!(m
        .handle(Event::Failed { error: "x".into() }, t(now))
        .is_err());
}

#[test]
fn nothing_moves_a_finished_migration_even_after_a_cancel() {
    let (mut m, now) = drive_to(State::Transferring);
    m.handle(Event::Cancel, t(now)).unwrap();
    done(&mut m, now + 1, 0); // -> RollingBack
    done(&mut m, now + 2, 0); // -> RolledBack
    assert_eq!(m.state(), State::RolledBack);
    let before = m.report().clone();
    assert!(m.handle(Event::Done { bytes: 0 }, t(now + 3)).is_err());
    assert!(m
        .handle(
            Event::Failed {
                error: "late".into()
            },
            t(now + 3)
        )
        .is_err());
    assert_eq!(m.state(), State::RolledBack);
    assert_eq!(m.report(), &before);
}

#[test]
fn phase_and_state_names_are_their_json_names() {
    let phases = [
        Phase::Preflight,
        Phase::Prepare,
        Phase::PreCopy,
        Phase::Redirect,
        Phase::Dump,
        Phase::Transfer,
        Phase::Restore,
        Phase::Commit,
        Phase::Cleanup,
        Phase::Rollback,
    ];
    for p in phases {
        assert_eq!(serde_json::to_value(p).unwrap(), p.name(), "{p:?}");
    }
    let states = [
        State::Created,
        State::Preflight,
        State::Preparing,
        State::PreCopying,
        State::Redirecting,
        State::Dumping,
        State::Transferring,
        State::Restoring,
        State::Committing,
        State::CleaningUp,
        State::Done,
        State::RollingBack,
        State::RolledBack,
        State::Failed,
    ];
    for s in states {
        assert_eq!(serde_json::to_value(s).unwrap(), s.name(), "{s:?}");
    }
}

#[test]
fn freeze_reason_names_are_their_json_names() {
    for r in [
        FreezeReason::Converged,
        FreezeReason::RoundLimit,
        FreezeReason::NotConverging,
        FreezeReason::PostCopy,
    ] {
        assert_eq!(serde_json::to_value(r).unwrap(), r.name(), "{r:?}");
    }
}
