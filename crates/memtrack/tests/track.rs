//! memtrack against a real process (the memtrack-testee binary). Runs as root on Ferry's
//! development machines; a test that cannot do its work fails with the reason.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{init_tracing, mapping_of, pages_in, uffd_wp_mappings, userfaultfds, Testee};
use memtrack::{Dirty, Error, Method, Tracker, PAGE_SIZE};

fn set(v: &[usize]) -> BTreeSet<usize> {
    v.iter().copied().collect()
}

fn collect(tr: &mut Box<dyn Tracker>) -> Dirty {
    tr.collect()
        .unwrap_or_else(|e| panic!("collect() with {} failed: {e}", tr.method()))
}

fn start(pid: i32, method: Method) -> Box<dyn Tracker> {
    memtrack::start(pid, method).unwrap_or_else(|e| panic!("start({pid}, {method}) failed: {e}"))
}

/// The scenario of the brief: exact pages, second thread, new mapping, stop, intact memory.
fn exact_pages_scenario(method: Method, tr: Box<dyn Tracker>, t: &mut Testee) {
    let mut tr = tr;
    assert_eq!(tr.method(), method);

    let d = collect(&mut tr);
    assert_eq!(
        t.pages_in(&d.ranges),
        set(&[]),
        "{method}: nothing written yet: {d:?}"
    );
    assert_eq!(
        t.pages_in(&d.new_ranges),
        set(&[]),
        "{method}: region is not new"
    );

    let v1 = t.write(&[3, 17, 200]);
    let d = collect(&mut tr);
    assert_eq!(
        t.pages_in(&d.ranges),
        set(&[3, 17, 200]),
        "{method}: round 1"
    );
    assert_eq!(t.pages_in(&d.new_ranges), set(&[]), "{method}: round 1 new");

    let v2 = t.write(&[17, 42]);
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[17, 42]), "{method}: round 2");

    // Written by the second thread.
    let v3 = t.twrite(&[99, 100]);
    let d = collect(&mut tr);
    assert_eq!(
        t.pages_in(&d.ranges),
        set(&[99, 100]),
        "{method}: second thread"
    );

    // Nothing written: nothing reported.
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[]), "{method}: idle round");

    // A mapping made after start() shows up in new_ranges, completely.
    let m = t.map(64);
    let d = collect(&mut tr);
    assert_eq!(
        pages_in(&d.new_ranges, m, 64),
        (0..64).collect::<BTreeSet<_>>(),
        "{method}: new mapping at {m:#x} must be in new_ranges: {d:?}"
    );
    assert!(
        !d.ranges.iter().any(|r| d
            .new_ranges
            .iter()
            .any(|n| r.start < n.end && n.start < r.end)),
        "{method}: ranges and new_ranges overlap: {d:?}"
    );
    // ... and is tracked page by page from then on.
    t.mwrite(0, &[5, 63]);
    let d = collect(&mut tr);
    assert_eq!(
        pages_in(&d.ranges, m, 64),
        set(&[5, 63]),
        "{method}: new mapping, round 2"
    );
    assert_eq!(
        pages_in(&d.new_ranges, m, 64),
        set(&[]),
        "{method}: not new any more"
    );
    assert_eq!(
        t.pages_in(&d.ranges),
        set(&[]),
        "{method}: main region idle"
    );

    tr.stop()
        .unwrap_or_else(|e| panic!("stop() with {method} failed: {e}"));

    // The process is an ordinary process again, keeps running and its memory is intact.
    assert_eq!(
        userfaultfds(t.pid()),
        Vec::<String>::new(),
        "{method}: userfaultfd left"
    );
    assert_eq!(
        uffd_wp_mappings(t.pid()),
        Vec::<String>::new(),
        "{method}: uffd-wp VMAs left"
    );
    assert_eq!(t.read(3), v1);
    assert_eq!(t.read(200), v1);
    assert_eq!(t.read(17), v2);
    assert_eq!(t.read(42), v2);
    assert_eq!(t.read(99), v3);
    assert_eq!(t.read(0), 0);
    let v4 = t.write(&[3, 250]);
    assert_eq!(t.read(3), v4);
    assert_eq!(t.read(250), v4);
    assert_eq!(t.read(200), v1);
}

#[test]
fn detect_picks_uffd_wp() {
    init_tracing();
    let s = memtrack::support();
    println!("support: {s}");
    assert_eq!(memtrack::detect().unwrap(), Method::UffdWp, "support: {s}");
    assert!(s.get(Method::PageHash).is_available(), "{s}");
    // This kernel has no CONFIG_MEM_SOFT_DIRTY.
    let r = s.reason(Method::SoftDirty).unwrap_or("");
    assert!(r.contains("soft-dirty"), "reason {r:?}");
}

#[test]
fn uffd_wp_exact_pages() {
    init_tracing();
    let mut t = Testee::spawn(256, true);
    let tr = start(t.pid(), Method::UffdWp);
    // While tracking, the target holds no userfaultfd (we hold the only one) but its region
    // is registered for write protection.
    assert_eq!(
        userfaultfds(t.pid()),
        Vec::<String>::new(),
        "target holds a userfaultfd"
    );
    let wp = uffd_wp_mappings(t.pid());
    assert!(
        wp.iter().any(|l| mapping_of(t.pid(), t.base) == *l),
        "main region not registered: {wp:?}"
    );
    exact_pages_scenario(Method::UffdWp, tr, &mut t);

    // Tracking can start again after stop() (a second injection).
    let mut tr = start(t.pid(), Method::UffdWp);
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[]));
    t.write(&[7]);
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[7]));
    tr.stop().unwrap();
    assert_eq!(userfaultfds(t.pid()), Vec::<String>::new());
    t.quit();
}

#[test]
fn page_hash_exact_pages() {
    init_tracing();
    let mut t = Testee::spawn(256, true);
    let tr = start(t.pid(), Method::PageHash);
    exact_pages_scenario(Method::PageHash, tr, &mut t);
    t.quit();
}

#[test]
fn soft_dirty_unsupported_here_or_exact() {
    init_tracing();
    let mut t = Testee::spawn(256, true);
    match memtrack::start(t.pid(), Method::SoftDirty) {
        Err(Error::Unsupported { method, reason }) => {
            assert_eq!(method, Method::SoftDirty);
            assert!(
                reason.contains("soft-dirty"),
                "reason does not mention soft-dirty: {reason}"
            );
            let msg = Error::Unsupported { method, reason }.to_string();
            println!("SoftDirty unsupported: {msg}");
            // The process was not touched.
            assert_eq!(t.write(&[1]), t.read(1));
        }
        Ok(tr) => exact_pages_scenario(Method::SoftDirty, tr, &mut t),
        Err(e) => panic!("start(SoftDirty) failed with an unexpected error: {e}"),
    }
    t.quit();
}

#[test]
fn file_backed_data_page_is_found() {
    init_tracing();
    for method in [Method::UffdWp, Method::PageHash] {
        let mut t = Testee::spawn(16, false);
        let mut tr = start(t.pid(), method);
        let addr = t.bump_static();
        let line = mapping_of(t.pid(), addr);
        let inode: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(
            inode != 0 && line.contains("rw-p"),
            "static is not in a private file mapping: {line}"
        );
        let page = addr / PAGE_SIZE * PAGE_SIZE;
        let d = collect(&mut tr);
        assert!(
            d.ranges.iter().any(|r| r.contains(page)),
            "{method}: written .data page {page:#x} ({line}) not reported: {d:?}"
        );
        let d = collect(&mut tr);
        assert!(
            !d.ranges.iter().any(|r| r.contains(page)),
            "{method}: .data page reported again without a write"
        );
        tr.stop().unwrap();
        t.quit();
    }
}

#[test]
fn uffd_start_while_target_sleeps_in_a_syscall() {
    init_tracing();
    let mut t = Testee::spawn(32, true);
    // The main thread is inside nanosleep while we inject (restart_syscall path); before that
    // it sat in read(2) on stdin (ERESTARTSYS path), which every other test exercises.
    t.send("nap 400");
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    let mut tr = start(t.pid(), Method::UffdWp);
    let answer = t.recv();
    let waited = sent.elapsed();
    assert_eq!(answer, "ok");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "the interrupted sleep did not resume correctly: answer after {waited:?}"
    );
    t.write(&[4]);
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[4]));
    tr.stop().unwrap();
    assert_eq!(userfaultfds(t.pid()), Vec::<String>::new());
    t.quit();
}

#[test]
fn exit_of_the_target_is_reported() {
    init_tracing();
    for method in [Method::UffdWp, Method::PageHash] {
        // Killed, not yet reaped (zombie).
        let mut t = Testee::spawn(16, true);
        let pid = t.pid();
        let mut tr = start(pid, method);
        t.kill_no_reap();
        let e = tr
            .collect()
            .expect_err("collect() on a dead process must fail");
        assert!(e.is_process_gone(), "{method}: unexpected error {e}");
        assert!(e.to_string().contains(&pid.to_string()), "{e}");
        tr.stop()
            .unwrap_or_else(|e| panic!("{method}: stop() after exit: {e}"));

        // Killed and reaped.
        let mut t = Testee::spawn(16, false);
        let pid = t.pid();
        let mut tr = start(pid, method);
        t.kill_and_reap();
        let e = tr
            .collect()
            .expect_err("collect() on a reaped process must fail");
        assert!(e.is_process_gone(), "{method}: unexpected error {e}");
        tr.stop().unwrap();

        // start() on a pid that does not exist.
        let e = memtrack::start(pid, method)
            .err()
            .expect("start on a dead pid must fail");
        assert!(e.is_process_gone(), "{method}: unexpected error {e}");
        println!("{method}: {e}");
    }
}

#[test]
fn uffd_wp_reports_many_scattered_pages() {
    // More separate dirty runs than the PAGEMAP_SCAN output vector holds (4096): the scan must
    // continue from walk_end.
    init_tracing();
    let pages = 20_000;
    let mut t = Testee::spawn(pages, false);
    let mut tr = start(t.pid(), Method::UffdWp);
    let n = t.stride(2);
    assert_eq!(n, pages / 2);
    let d = collect(&mut tr);
    let got = t.pages_in(&d.ranges);
    let want: BTreeSet<usize> = (0..pages).step_by(2).collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    let d = collect(&mut tr);
    assert!(t.pages_in(&d.ranges).is_empty());
    tr.stop().unwrap();
    t.quit();
}

#[test]
fn uffd_injection_while_other_thread_runs_and_writes() {
    init_tracing();
    let mut t = Testee::spawn(64, true);
    // A thread writing page 9 in a tight loop in user mode while we inject and collect.
    let spin = Duration::from_millis(2500);
    assert_eq!(t.cmd(&format!("spin 9 {}", spin.as_millis())), "ok");
    let spin_started = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    let mut tr = start(t.pid(), Method::UffdWp);
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(100));
        let d = collect(&mut tr);
        assert_eq!(t.pages_in(&d.ranges), set(&[9]), "round {round}");
    }
    t.write(&[1]);
    std::thread::sleep((spin + Duration::from_millis(500)).saturating_sub(spin_started.elapsed()));
    let d = collect(&mut tr);
    // Page 9 was written until the spinner stopped, after the previous collect.
    assert_eq!(t.pages_in(&d.ranges), set(&[1, 9]));
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[]), "spinner has ended");
    tr.stop().unwrap();
    assert_eq!(userfaultfds(t.pid()), Vec::<String>::new());
    t.quit();
}

#[test]
fn uffd_start_on_a_stopped_process_keeps_it_stopped() {
    init_tracing();
    let mut t = Testee::spawn(32, true);
    let pid = t.pid();
    // Job-control stop (SIGSTOP via kill(1), so the tests need no unsafe code).
    let st = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .expect("run kill -STOP");
    assert!(st.success());
    for _ in 0..500 {
        if common::state(pid) == "T" {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(common::state(pid), "T", "testee did not stop");
    let mut tr = start(pid, Method::UffdWp);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        common::state(pid),
        "T",
        "start() must leave a stopped process stopped"
    );
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[]));
    let st = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .expect("run kill -CONT");
    assert!(st.success());
    t.write(&[30]);
    let d = collect(&mut tr);
    assert_eq!(t.pages_in(&d.ranges), set(&[30]));
    tr.stop().unwrap();
    assert_eq!(userfaultfds(pid), Vec::<String>::new());
    t.quit();
}
