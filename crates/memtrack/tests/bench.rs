//! Measurement, not a timed test: tracks a 1 GiB populated region with 1 % and 10 % of its
//! pages written and prints how long start() and collect() take.
//!
//! Run: `cargo test --release -p memtrack --test bench -- --ignored --nocapture`

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::{init_tracing, Testee};
use memtrack::Method;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn collect_time_1gib() {
    init_tracing();
    let pages = 262_144; // 1 GiB
    for method in [Method::UffdWp, Method::PageHash] {
        let mut t = Testee::spawn(pages, false);
        let t0 = Instant::now();
        let mut tr = memtrack::start(t.pid(), method).expect("start");
        let start_ms = ms(t0);
        let t0 = Instant::now();
        let d = tr.collect().expect("collect");
        let idle_ms = ms(t0);
        assert!(t.pages_in(&d.ranges).is_empty());
        println!("{method}: 1 GiB region: start {start_ms:.1} ms, collect with nothing written {idle_ms:.2} ms");
        for (label, stride) in [("1 %", 100), ("10 %", 10)] {
            let n = t.stride(stride);
            let t0 = Instant::now();
            let d = tr.collect().expect("collect");
            let c_ms = ms(t0);
            let got = t.pages_in(&d.ranges);
            let want: BTreeSet<usize> = (0..pages).step_by(stride).collect();
            assert_eq!(got, want, "{method} {label}");
            println!(
                "{method}: 1 GiB region, {label} written ({n} pages, {} runs): collect {c_ms:.2} ms \
                 (whole process: {} dirty pages reported)",
                n,
                d.dirty_pages()
            );
        }
        let t0 = Instant::now();
        tr.stop().expect("stop");
        println!("{method}: stop {:.2} ms", ms(t0));
        t.quit();
    }
}
