//! A container's cgroup on either hierarchy: the freezer, its processes and its CPU bandwidth.
//!
//! On cgroup v1 each controller has its own tree (`/sys/fs/cgroup/freezer/REL`,
//! `/sys/fs/cgroup/cpu/REL`, ...); on the unified hierarchy (v2) one tree holds every controller
//! (`/sys/fs/cgroup/REL`: `cgroup.freeze` and `cgroup.events` for the freezer, `cpu.max` and
//! `cpu.stat` for CPU time). [`Cgroups`] finds which one a container's cgroup lives on and
//! speaks its files; the root is a parameter so that the v2 paths are tested against a fake tree
//! on machines that only have v1.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How often a freeze in progress is checked.
pub const FREEZE_POLL: Duration = Duration::from_micros(100);
/// How long a freeze may take before it is undone and reported.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);
/// A v1 freeze still in progress after this many polls is thawed and started again.
const V1_THAW_EVERY: u32 = 50;
/// How long a v1 freeze that is started again lets the cgroup run first.
const V1_THAW_PAUSE: Duration = Duration::from_millis(10);

/// Which hierarchy a cgroup is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    V1,
    V2,
}

impl std::fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hierarchy::V1 => "cgroup v1",
            Hierarchy::V2 => "cgroup v2 (unified)",
        })
    }
}

/// The cgroup file systems under one root (`/sys/fs/cgroup` on a host).
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

impl Cgroups {
    /// The host's cgroups.
    pub fn host() -> Cgroups {
        Cgroups::at("/sys/fs/cgroup")
    }

    /// The cgroups under `root` (a fake tree in tests).
    pub fn at(root: impl Into<PathBuf>) -> Cgroups {
        Cgroups { root: root.into() }
    }

    /// The hierarchy the freezer of cgroup `rel` is on: v1 when a v1 freezer tree holds it,
    /// else the unified one.
    pub fn hierarchy(&self, rel: &str) -> Hierarchy {
        if self.v1_dir("freezer", rel).is_dir() {
            Hierarchy::V1
        } else {
            Hierarchy::V2
        }
    }

    /// The hierarchy containers get on this machine (v2 when `/sys/fs/cgroup` is the unified
    /// mount, as on Debian 12's default; v1 otherwise).
    pub fn host_hierarchy(&self) -> Hierarchy {
        if self.root.join("cgroup.controllers").is_file() {
            Hierarchy::V2
        } else {
            Hierarchy::V1
        }
    }

    fn v1_dir(&self, controller: &str, rel: &str) -> PathBuf {
        self.root.join(controller).join(rel.trim_start_matches('/'))
    }

    fn v2_dir(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// The file that freezes cgroup `rel` and what to write in it, and the file that says
    /// whether it is frozen, on the hierarchy `h` it is on.
    fn freezer_files(&self, rel: &str, h: Hierarchy) -> (PathBuf, &'static str, PathBuf) {
        match h {
            Hierarchy::V1 => {
                let state = self.v1_dir("freezer", rel).join("freezer.state");
                (state.clone(), "FROZEN", state)
            }
            Hierarchy::V2 => {
                let dir = self.v2_dir(rel);
                (dir.join("cgroup.freeze"), "1", dir.join("cgroup.events"))
            }
        }
    }

    /// Starts freezing cgroup `rel`.
    pub fn start_freeze(&self, rel: &str) -> Result<()> {
        let (file, value, _) = self.freezer_files(rel, self.hierarchy(rel));
        write_freeze(&file, value)
    }

    /// Whether every task of cgroup `rel` is frozen.
    pub fn is_frozen(&self, rel: &str) -> Result<bool> {
        let h = self.hierarchy(rel);
        frozen(h, &self.freezer_files(rel, h).2)
    }

    /// Freezes cgroup `rel` and waits ([`FREEZE_POLL`] steps, at most [`FREEZE_TIMEOUT`]) until
    /// it is frozen; a freeze that does not finish is undone.
    ///
    /// On v1 the request is written again on every poll and, every [`V1_THAW_EVERY`] polls, the
    /// cgroup is thawed for [`V1_THAW_PAUSE`] first: a v1 freezer does not reliably catch tasks
    /// forked while it is freezing and can stay `FREEZING` for as long as processes keep
    /// appearing; each write freezes the tasks present then (runc's v1 freezer does the same).
    pub fn freeze(&self, rel: &str) -> Result<()> {
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        // Looked up once: the polls below are frozen time.
        let h = self.hierarchy(rel);
        let (request, value, state) = self.freezer_files(rel, h);
        write_freeze(&request, value)?;
        let mut poll = 0u32;
        while !frozen(h, &state)? {
            poll += 1;
            if h == Hierarchy::V1 {
                if poll.is_multiple_of(V1_THAW_EVERY) {
                    self.thaw(rel);
                    std::thread::sleep(V1_THAW_PAUSE);
                }
                write_freeze(&request, value)?;
            }
            if Instant::now() > deadline {
                self.thaw(rel);
                bail!(
                    "cgroup {rel} did not freeze within {} s ({h})",
                    FREEZE_TIMEOUT.as_secs()
                );
            }
            // A few hundred microseconds usually: this is frozen time.
            std::thread::sleep(FREEZE_POLL);
        }
        if poll > 0 {
            tracing::debug!(cgroup = rel, polls = poll, "frozen");
        }
        Ok(())
    }

    /// Thaws cgroup `rel`; absent is fine.
    pub fn thaw(&self, rel: &str) {
        let _ = std::fs::write(self.v1_dir("freezer", rel).join("freezer.state"), "THAWED");
        let _ = std::fs::write(self.v2_dir(rel).join("cgroup.freeze"), "0");
    }

    /// Whether cgroup `rel` exists and is neither frozen nor freezing.
    pub fn runs_thawed(&self, rel: &str) -> bool {
        match self.hierarchy(rel) {
            Hierarchy::V1 => read(&self.v1_dir("freezer", rel).join("freezer.state"))
                .is_ok_and(|s| s.trim() == "THAWED"),
            Hierarchy::V2 => {
                read(&self.v2_dir(rel).join("cgroup.freeze")).is_ok_and(|s| s.trim() == "0")
            }
        }
    }

    /// The processes of cgroup `rel` (`cgroup.procs`, from the v1 pids or freezer tree, or the
    /// unified one).
    pub fn procs(&self, rel: &str) -> Result<Vec<i32>> {
        let candidates = [
            self.v1_dir("pids", rel),
            self.v1_dir("freezer", rel),
            self.v2_dir(rel),
        ];
        for dir in &candidates {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                return Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect());
            }
        }
        bail!(
            "no cgroup {rel} (looked in {})",
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// The CPU bandwidth control and usage of cgroup `rel`.
    pub fn cpu(&self, rel: &str) -> Result<CpuControl> {
        let pick = |controllers: &[&str], file: &str| {
            controllers
                .iter()
                .map(|c| self.v1_dir(c, rel))
                .find(|d| d.join(file).is_file())
        };
        if let Some(cpu) = pick(&["cpu", "cpu,cpuacct"], "cpu.cfs_quota_us") {
            let Some(acct) = pick(&["cpuacct", "cpu,cpuacct"], "cpuacct.usage") else {
                bail!("no cpuacct cgroup for {rel}");
            };
            return Ok(CpuControl {
                hierarchy: Hierarchy::V1,
                dir: cpu,
                usage: acct.join("cpuacct.usage"),
            });
        }
        let dir = self.v2_dir(rel);
        if dir.join("cpu.max").is_file() {
            return Ok(CpuControl {
                hierarchy: Hierarchy::V2,
                usage: dir.join("cpu.stat"),
                dir,
            });
        }
        bail!(
            "no CPU bandwidth control for cgroup {rel}: the kernel needs CONFIG_CFS_BANDWIDTH and \
             the cpu controller (cgroup v1 cpu tree, or cpu enabled in the parent's \
             cgroup.subtree_control on v2)"
        )
    }
}

/// A cgroup's CFS bandwidth limit and CPU usage, on either hierarchy.
#[derive(Debug, Clone)]
pub struct CpuControl {
    pub hierarchy: Hierarchy,
    dir: PathBuf,
    usage: PathBuf,
}

/// A CFS bandwidth limit: `quota` µs of CPU time per `period` µs (`None`: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

impl CpuControl {
    /// The cgroup's directory, for messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// CPU time used so far, ns (`cpuacct.usage`; v2: `usage_usec` of `cpu.stat`).
    pub fn usage_ns(&self) -> Result<u64> {
        let text = read(&self.usage)?;
        match self.hierarchy {
            Hierarchy::V1 => parse_u64(&self.usage, text.trim()),
            Hierarchy::V2 => text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .map(|v| parse_u64(&self.usage, v.trim()).map(|us| us * 1000))
                .unwrap_or_else(|| bail!("{} has no usage_usec", self.usage.display())),
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> Result<CpuLimit> {
        match self.hierarchy {
            Hierarchy::V1 => {
                let q = read(&self.dir.join("cpu.cfs_quota_us"))?;
                let q: i64 = q.trim().parse().unwrap_or(-1);
                let p = parse_u64(
                    &self.dir.join("cpu.cfs_period_us"),
                    read(&self.dir.join("cpu.cfs_period_us"))?.trim(),
                )?;
                Ok(CpuLimit {
                    quota_us: (q > 0).then_some(q as u64),
                    period_us: p,
                })
            }
            Hierarchy::V2 => {
                let f = self.dir.join("cpu.max");
                let text = read(&f)?;
                let mut w = text.split_whitespace();
                let (q, p) = (w.next().unwrap_or("max"), w.next().unwrap_or("100000"));
                Ok(CpuLimit {
                    quota_us: if q == "max" {
                        None
                    } else {
                        Some(parse_u64(&f, q)?)
                    },
                    period_us: parse_u64(&f, p)?,
                })
            }
        }
    }

    /// Sets the limit. On v1 quota and period are two files: the quota is lowered first so that
    /// no moment in between allows more than either limit; on v2 `cpu.max` takes both at once.
    pub fn set_limit(&self, l: CpuLimit) -> Result<()> {
        match self.hierarchy {
            Hierarchy::V1 => {
                let quota = self.dir.join("cpu.cfs_quota_us");
                let period = self.dir.join("cpu.cfs_period_us");
                match l.quota_us {
                    Some(q) => {
                        write(&quota, &q.min(l.period_us).to_string())?;
                        write(&period, &l.period_us.to_string())?;
                        write(&quota, &q.to_string())
                    }
                    None => {
                        write(&quota, "-1")?;
                        write(&period, &l.period_us.to_string())
                    }
                }
            }
            Hierarchy::V2 => {
                let q = l
                    .quota_us
                    .map(|q| q.to_string())
                    .unwrap_or_else(|| "max".into());
                write(&self.dir.join("cpu.max"), &format!("{q} {}", l.period_us))
            }
        }
    }
}

/// Writes a freeze request.
fn write_freeze(file: &Path, value: &str) -> Result<()> {
    std::fs::write(file, value)
        .with_context(|| format!("freezing {} (no freezer for this cgroup?)", file.display()))
}

/// Whether the freezer state file `state` of hierarchy `h` says frozen.
fn frozen(h: Hierarchy, state: &Path) -> Result<bool> {
    Ok(match h {
        Hierarchy::V1 => read(state)?.trim() == "FROZEN",
        Hierarchy::V2 => read(state)?.lines().any(|l| l.trim() == "frozen 1"),
    })
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v).with_context(|| format!("writing {v:?} to {}", p.display()))
}

fn parse_u64(p: &Path, s: &str) -> Result<u64> {
    s.parse()
        .with_context(|| format!("{} holds {s:?}, not a number", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REL: &str = "/ferry/h1/c";

    /// A fake unified hierarchy with cgroup REL.
    fn v2_tree() -> (tempfile::TempDir, Cgroups, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let d = t.path().join("ferry/h1/c");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup.freeze"), "0\n").unwrap();
        std::fs::write(d.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        std::fs::write(d.join("cgroup.procs"), "10\n11\n").unwrap();
        std::fs::write(d.join("cpu.max"), "max 100000\n").unwrap();
        std::fs::write(
            d.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        )
        .unwrap();
        let c = Cgroups::at(t.path());
        (t, c, d)
    }

    /// A fake v1 tree (freezer, pids, cpu,cpuacct) with cgroup REL.
    fn v1_tree() -> (tempfile::TempDir, Cgroups, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        for c in ["freezer", "pids", "cpu,cpuacct"] {
            std::fs::create_dir_all(t.path().join(c).join("ferry/h1/c")).unwrap();
        }
        let f = t.path().join("freezer/ferry/h1/c");
        std::fs::write(f.join("freezer.state"), "THAWED\n").unwrap();
        std::fs::write(t.path().join("pids/ferry/h1/c/cgroup.procs"), "7\n").unwrap();
        let cpu = t.path().join("cpu,cpuacct/ferry/h1/c");
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(cpu.join("cpu.cfs_period_us"), "100000\n").unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "123456789\n").unwrap();
        let c = Cgroups::at(t.path());
        (t, c, cpu)
    }

    #[test]
    fn the_unified_hierarchy_freezes_through_cgroup_freeze_and_events() {
        let (_t, c, d) = v2_tree();
        assert_eq!(c.host_hierarchy(), Hierarchy::V2);
        assert_eq!(c.hierarchy(REL), Hierarchy::V2);
        assert!(c.runs_thawed(REL));
        assert_eq!(c.procs(REL).unwrap(), vec![10, 11]);
        // The kernel reports the freeze in cgroup.events once every task stopped.
        let d2 = d.clone();
        let kernel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::write(d2.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        });
        c.freeze(REL).unwrap();
        kernel.join().unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
            "1"
        );
        assert!(c.is_frozen(REL).unwrap());
        assert!(!c.runs_thawed(REL));
        c.thaw(REL);
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
            "0"
        );
        assert!(c.runs_thawed(REL));
    }

    #[test]
    fn a_freeze_that_never_completes_is_undone_and_named() {
        let (_t, c, d) = v2_tree();
        let e = c.freeze(REL).unwrap_err().to_string();
        assert!(
            e.contains("did not freeze") && e.contains("cgroup v2"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("cgroup.freeze")).unwrap(),
            "0"
        );
    }

    #[test]
    fn cpu_max_carries_quota_and_period_and_cpu_stat_the_usage() {
        let (_t, c, d) = v2_tree();
        let cpu = c.cpu(REL).unwrap();
        assert_eq!(cpu.hierarchy, Hierarchy::V2);
        assert_eq!(cpu.usage_ns().unwrap(), 2_500_000);
        assert_eq!(
            cpu.limit().unwrap(),
            CpuLimit {
                quota_us: None,
                period_us: 100_000
            }
        );
        cpu.set_limit(CpuLimit {
            quota_us: Some(5_000),
            period_us: 10_000,
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "5000 10000"
        );
        assert_eq!(cpu.limit().unwrap().quota_us, Some(5_000));
        cpu.set_limit(CpuLimit {
            quota_us: None,
            period_us: 100_000,
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "max 100000"
        );
    }

    #[test]
    fn v1_keeps_its_own_trees() {
        let (t, c, cpu_dir) = v1_tree();
        assert_eq!(c.host_hierarchy(), Hierarchy::V1);
        assert_eq!(c.hierarchy(REL), Hierarchy::V1);
        assert_eq!(c.procs(REL).unwrap(), vec![7]);
        let f = t.path().join("freezer/ferry/h1/c/freezer.state");
        let f2 = f.clone();
        let kernel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::write(f2, "FROZEN\n").unwrap();
        });
        c.freeze(REL).unwrap();
        kernel.join().unwrap();
        assert!(c.is_frozen(REL).unwrap());
        c.thaw(REL);
        assert!(c.runs_thawed(REL));
        let cpu = c.cpu(REL).unwrap();
        assert_eq!(cpu.hierarchy, Hierarchy::V1);
        assert_eq!(cpu.usage_ns().unwrap(), 123_456_789);
        cpu.set_limit(CpuLimit {
            quota_us: Some(50_000),
            period_us: 100_000,
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(cpu_dir.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        assert_eq!(cpu.limit().unwrap().quota_us, Some(50_000));
        cpu.set_limit(CpuLimit {
            quota_us: None,
            period_us: 100_000,
        })
        .unwrap();
        assert_eq!(cpu.limit().unwrap().quota_us, None);
    }

    #[test]
    fn a_cgroup_without_cpu_bandwidth_is_named() {
        let (_t, c, d) = v2_tree();
        std::fs::remove_file(d.join("cpu.max")).unwrap();
        let e = c.cpu(REL).unwrap_err().to_string();
        assert!(
            e.contains("no CPU bandwidth control") && e.contains(REL),
            "{e}"
        );
    }
}
