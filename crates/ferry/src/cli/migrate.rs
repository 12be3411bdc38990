//! `ferry migrate`: builds the request from the flags, starts the job and follows it to its
//! end, with progress, a summary and an exit code (0 moved, 2 rolled back, 1 error); Ctrl-C
//! cancels the job before its commit point.

use std::process::ExitCode;

use anyhow::{anyhow, Result};
use ferry_api::{FaultHooks, MigrateMode, MigrateRequest};
use ferry_lab::lab::Lab;
use ferry_lab::ops::{self, Follow};
use migrate_core::WhenStuck;

/// `ferry migrate`'s flags.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Container name.
    pub name: String,
    /// Destination host.
    #[arg(long)]
    pub to: String,
    /// Print one JSON report instead of progress and a summary.
    #[arg(long)]
    pub json: bool,
    /// Copy memory and root filesystem changes in rounds while the container runs; freeze
    /// only for what changed since the last round.
    #[arg(long)]
    pub pre_copy: bool,
    /// Pre-copy: freeze once the last dirty set is estimated to take at most this long.
    #[arg(long, requires = "pre_copy")]
    pub downtime_budget_ms: Option<f64>,
    /// Pre-copy: most rounds before the freeze.
    #[arg(long, requires = "pre_copy")]
    pub max_rounds: Option<u32>,
    /// Pre-copy: when the container dirties memory faster than the link carries it:
    /// auto-converge (throttle its CPU step by step), stop-and-copy, post-copy (freeze
    /// at once; the destination fetches what it lacks while the container runs), or abort.
    #[arg(long, requires = "pre_copy", value_parser = ["auto-converge", "stop-and-copy", "post-copy", "abort"])]
    pub when_stuck: Option<String>,
    /// Post-copy: freeze at once (no rounds), restore lazily at the destination, which
    /// fetches every page from the source's frozen copy while the container runs. The
    /// container's memory exists only partly at either end until the fill ends: if the
    /// source host dies meanwhile, the container is lost.
    #[arg(long, conflicts_with_all = ["no_lazy_restore", "when_stuck", "max_rounds", "downtime_budget_ms"])]
    pub post_copy: bool,
    /// Pre-copy: send all memory at once in the first round instead of following the
    /// container's writes (which sends fewer bytes but may take up to 4 x longer).
    #[arg(long, requires = "pre_copy")]
    pub no_follow_writes: bool,
    /// Pre-copy: send every page in the final dump instead of restoring lazily from the
    /// destination's page store.
    #[arg(long, requires = "pre_copy")]
    pub no_lazy_restore: bool,
    /// Pre-copy: below this much memory (MiB) restore eagerly even when a lazy restore is
    /// possible (default 16; 0: always lazy).
    #[arg(long, requires = "pre_copy")]
    pub lazy_min_mib: Option<u64>,
    /// Pre-copy: at the round limit: stop-and-copy (freeze with what is left), post-copy, or
    /// abort (roll back).
    #[arg(long, requires = "pre_copy", value_parser = ["stop-and-copy", "post-copy", "abort"])]
    pub at_round_limit: Option<String>,
    /// Pre-copy: the first auto-converge step, percent of the container's CPU taken away
    /// (default 20; up to 99).
    #[arg(long, requires = "pre_copy")]
    pub throttle_initial_pct: Option<u32>,
    #[command(flatten)]
    pub faults: FaultArgs,
    /// Roll back if the dump (the container frozen) takes longer than this, in seconds
    /// (default 120).
    #[arg(long)]
    pub dump_deadline_s: Option<f64>,
    /// Move even if the destination's CPU lacks instruction sets the source's has (a
    /// program of the container that uses one would die with SIGILL there).
    #[arg(long)]
    pub ignore_cpu_features: bool,
    /// A webhook to call (`http://host:port/path`): a JSON POST at pre_migrate (a non-2xx
    /// answer, `{"allow": false}` or no answer within 5 s vetoes), committed, rolled_back and
    /// finished; repeat for more (docs/api.md, "Hooks").
    #[arg(long = "hook", value_name = "URL")]
    pub hooks: Vec<String>,
    /// Roll back if the restore at the destination takes longer than this, in seconds
    /// (default 120).
    #[arg(long)]
    pub restore_deadline_s: Option<f64>,
    /// Start the job and print its id alone (for `ferry job ID`) without following it.
    #[arg(long)]
    pub detach: bool,
}

/// `ferry migrate`'s fault injection (tests; hidden from its help).
#[derive(clap::Args)]
pub struct FaultArgs {
    /// Fault injection (tests): pause this long in the transfer phase.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_in_transfer_ms: u64,
    /// Fault injection (tests): damage the images at the destination.
    #[arg(long, hide = true)]
    pub corrupt_images: bool,
    /// Fault injection (tests): flip a byte in one page of the memory workload in the
    /// images at the destination.
    #[arg(long, hide = true)]
    pub corrupt_memory_page: bool,
    /// Fault injection (tests): leave one page written since the last pre-copy round out of
    /// the final dump, as if the dirty tracking had missed it.
    #[arg(long, hide = true)]
    pub hide_dirty_page: bool,
    /// Fault injection (tests): pre-copy's main tracking method refuses the first N
    /// processes, which are tracked by page hashes instead.
    #[arg(long, hide = true, default_value_t = 0)]
    pub refuse_tracking: u32,
    /// Fault injection (tests): pause this long between the restore and the commit.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_before_commit_ms: u64,
    /// Fault injection (tests): add a stray file to the root at the destination after the
    /// final diff.
    #[arg(long, hide = true)]
    pub corrupt_rootfs: bool,
    /// Fault injection (tests): pause this long in the dump (stop-and-copy), frozen.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_in_dump_ms: u64,
    /// Fault injection (tests): pause this long at the destination before its restore.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_in_restore_ms: u64,
    /// Fault injection (tests): pause this long after the commit, before the source's cleanup.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_after_commit_ms: u64,
    /// Fault injection (tests): pause at the start of this phase (preflight, prepare,
    /// pre_copy, redirect, dump, transfer, restore) for --pause-in-phase-ms.
    #[arg(long, hide = true)]
    pub pause_in_phase: Option<String>,
    /// Fault injection (tests): see --pause-in-phase.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_in_phase_ms: u64,
}

fn when_stuck(flag: &str, w: &str) -> Result<WhenStuck> {
    Ok(match w {
        "auto-converge" => WhenStuck::AutoConverge,
        "stop-and-copy" => WhenStuck::StopAndCopy,
        "post-copy" => WhenStuck::PostCopy,
        "abort" => WhenStuck::Abort,
        _ => {
            return Err(anyhow!(
                "{flag} {w:?}: not one of auto-converge, stop-and-copy, post-copy, abort"
            ))
        }
    })
}

impl MigrateArgs {
    /// The API request these flags ask for.
    pub fn request(&self) -> Result<MigrateRequest> {
        let mut deadlines = ferry_api::Deadlines::default();
        if let Some(s) = self.dump_deadline_s {
            deadlines.dump_s = s;
        }
        if let Some(s) = self.restore_deadline_s {
            deadlines.restore_s = s;
        }
        let mut req = MigrateRequest {
            to: self.to.clone(),
            mode: MigrateMode::StopCopy,
            precopy: None,
            deadlines,
            faults: self.faults.hooks()?,
            ignore_cpu_features: self.ignore_cpu_features,
            hooks: self
                .hooks
                .iter()
                .map(|url| {
                    serde_json::from_value(serde_json::json!({ "url": url }))
                        .map_err(anyhow::Error::from)
                })
                .collect::<anyhow::Result<_>>()?,
        };
        if self.pre_copy || self.post_copy {
            let mut p = migrate_core::PrecopyPolicy::default();
            if let Some(b) = self.downtime_budget_ms {
                p.downtime_budget_ms = b;
            }
            if let Some(r) = self.max_rounds {
                p.max_rounds = r;
            }
            if let Some(w) = &self.when_stuck {
                p.when_stuck = when_stuck("--when-stuck", w)?;
            }
            if let Some(w) = &self.at_round_limit {
                p.at_round_limit = when_stuck("--at-round-limit", w)?;
            }
            p.post_copy = self.post_copy;
            p.follow_writes = !self.no_follow_writes;
            p.lazy_restore = !self.no_lazy_restore;
            if let Some(m) = self.lazy_min_mib {
                p.lazy_min_mib = m;
            }
            if let Some(t) = self.throttle_initial_pct {
                p.throttle_initial_pct = t;
                p.throttle_max_pct = p.throttle_max_pct.max(t);
            }
            p.validate().map_err(|e| anyhow!("pre-copy: {e}"))?;
            req.mode = MigrateMode::PreCopy;
            req.precopy = Some(p);
        }
        Ok(req)
    }
}

/// Runs `ferry migrate`.
pub async fn run(lab: &Lab, args: MigrateArgs) -> Result<ExitCode> {
    let req = args.request()?;
    if args.detach {
        let (_, job) = ops::start_migration(lab, &args.name, &req).await?;
        println!("{job}");
        return Ok(ExitCode::SUCCESS);
    }
    let follow = if args.json {
        Follow::Quiet
    } else {
        Follow::detect()
    };
    let report = ops::migrate_interruptible(lab, &args.name, &req, follow).await?;
    let Some(report) = report else {
        // Interrupted after the commit point: the job goes on without us.
        return Ok(ExitCode::from(130));
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        ops::print_summary(&report);
    }
    Ok(ops::exit_code(&report))
}

impl FaultArgs {
    /// The fault hooks these flags ask for.
    fn hooks(&self) -> Result<FaultHooks> {
        let pause_in_phase = match &self.pause_in_phase {
            Some(p) => Some(
                serde_json::from_value(serde_json::Value::String(p.clone()))
                    .map_err(|_| anyhow!("--pause-in-phase {p:?}: not a phase"))?,
            ),
            None => None,
        };
        Ok(FaultHooks {
            pause_in_transfer_ms: self.pause_in_transfer_ms,
            corrupt_images: self.corrupt_images,
            corrupt_memory_page: self.corrupt_memory_page,
            hide_dirty_page: self.hide_dirty_page,
            refuse_tracking: self.refuse_tracking,
            pause_before_commit_ms: self.pause_before_commit_ms,
            corrupt_rootfs: self.corrupt_rootfs,
            pause_in_dump_ms: self.pause_in_dump_ms,
            pause_in_restore_ms: self.pause_in_restore_ms,
            pause_after_commit_ms: self.pause_after_commit_ms,
            pause_in_phase,
            pause_in_phase_ms: self.pause_in_phase_ms,
        })
    }
}
