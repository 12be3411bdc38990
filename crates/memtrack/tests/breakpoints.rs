//! `keep_ptrace_breakpoints_quick` holds a real per-task perf event (needs root or
//! CAP_PERFMON; fails and says why without).

use std::os::fd::AsRawFd;

#[test]
fn the_hold_is_a_perf_event_that_outlives_its_thread() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "opening a perf event on any kernel setting needs root; run the tests as root"
    );
    // Opened on a thread that then ends, as the agent's start-up may do.
    let fd = std::thread::spawn(memtrack::keep_ptrace_breakpoints_quick)
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("perf_event_open of a dummy event failed: {e}"));
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert_eq!(link.to_string_lossy(), "anon_inode:[perf_event]");
    // Close-on-exec: CRIU and runc started by the agent do not inherit it.
    let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
    let octal = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    assert_ne!(octal & 0o2000000, 0, "O_CLOEXEC missing: {flags}");
}
