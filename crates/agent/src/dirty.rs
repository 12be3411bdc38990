//! Measuring how fast a container writes its memory (the input of pre-copy's policy, and a
//! number admins ask for before moving a busy container).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_api::DirtyRate;
use tracing::{info, warn};

/// Tracks every process of container `name` for `interval` with the best method the kernel
/// offers, then removes every trace of the tracking. With `throttle_pct` > 0 the container's CPU
/// is throttled by that share of what it used in the 200 ms before, for the interval only.
pub(crate) fn measure(
    host: &str,
    name: &str,
    interval: Duration,
    throttle_pct: u32,
) -> Result<DirtyRate> {
    let method = memtrack::detect().context("no dirty-page tracking method works here")?;
    let mut throttle = None;
    let mut allowed_cores = None;
    if throttle_pct > 0 {
        let mut t = ferry_runtime::throttle::CpuThrottle::new(host, name)?;
        std::thread::sleep(Duration::from_millis(200));
        allowed_cores = t.set(throttle_pct)?;
        throttle = Some(t);
    }
    let pids = ferry_runtime::cgroup_tree::container_pids(host, name)?;
    if pids.is_empty() {
        bail!("container {name:?} has no processes: is it running?");
    }
    let mut trackers = vec![];
    for &pid in &pids {
        match memtrack::start(pid, method) {
            Ok(t) => trackers.push(t),
            // A process that exited meanwhile has nothing left to write.
            Err(e) if e.is_process_gone() => {}
            Err(e) => {
                stop_all(trackers);
                return Err(e).with_context(|| format!("tracking process {pid} of {name:?}"));
            }
        }
    }
    let t0 = Instant::now();
    std::thread::sleep(interval);
    let mut dirty = 0;
    let mut new_pages = 0;
    let mut failure = None;
    for t in &mut trackers {
        match t.collect() {
            Ok(d) => {
                dirty += d.dirty_pages();
                new_pages += d.new_pages();
            }
            Err(e) if e.is_process_gone() => {}
            Err(e) => failure = Some(e),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let processes = trackers.len();
    stop_all(trackers);
    if let Some(mut t) = throttle {
        t.lift().context("lifting the CPU throttle")?;
    }
    if let Some(e) = failure {
        return Err(e).context("collecting written pages");
    }
    let mib_per_s = dirty as f64 * memtrack::PAGE_SIZE as f64 / (1 << 20) as f64 / secs;
    info!(container = %name, %method, processes, dirty_pages = dirty, mib_per_s, "dirty rate measured");
    Ok(DirtyRate {
        container: name.into(),
        host: host.into(),
        method: method.to_string(),
        processes,
        interval_ms: secs * 1000.0,
        dirty_pages: dirty,
        new_mapping_pages: new_pages,
        mib_per_s,
        throttle_pct,
        allowed_cores,
    })
}

fn stop_all(trackers: Vec<Box<dyn memtrack::Tracker>>) {
    for t in trackers {
        let pid = t.pid();
        if let Err(e) = t.stop() {
            if !e.is_process_gone() {
                warn!(pid, error = %e, "stopping dirty-page tracking failed");
            }
        }
    }
}
