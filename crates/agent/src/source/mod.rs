//! The source side of a migration: drives `migrate_core::Migration` and carries out its actions,
//! one method per phase ([`phases`]), the final dump in [`dump`].

mod lazy;

mod dump;
mod phases;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::{
    ContainerSpec, FaultHooks, HookEvent, JobEventKind, JobInfo, MigrateMode, MigrateRequest,
};
use migrate_core::{Action, Event, Migration, Phase, RollbackPlan, RoundStats};
use shared_fs::Snapshot;
use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};

use super::http::ApiFailure;
use super::journal::{OutPhase, Outgoing};
use super::peer::{expect_ok, request, Tree};
use super::rounds::Rounds;
use super::{lock, Agent, Job};
use crate::proto::PeerRequest;
use dump::RootDiff;
pub(crate) use dump::{criu_listener, DumpAhead};

/// Validates the request and starts the job in the background.
pub(crate) fn start(
    agent: &Arc<Agent>,
    name: &str,
    req: MigrateRequest,
) -> Result<Arc<Job>, ApiFailure> {
    if lock(&agent.containers).contains_key(name) && !agent.is_running(name) {
        return Err(ApiFailure::conflict(format!(
            "container {name:?} is stopped: only a running container migrates (`ferry start {name}` runs it again)"
        )));
    }
    let spec = {
        let mut cs = lock(&agent.containers);
        let Some(rec) = cs.get_mut(name) else {
            return Err(ApiFailure::unknown_container(name, &agent.cfg.host));
        };
        if rec.migrating {
            return Err(ApiFailure::conflict(format!(
                "container {name:?} is already being migrated"
            )));
        }
        if req.to == agent.cfg.host {
            return Err(ApiFailure::bad_request(format!(
                "container {name:?} already runs on {}",
                req.to
            )));
        }
        if let Err(e) = check_fault_bounds(&req.faults) {
            return Err(ApiFailure::bad_request(e));
        }
        if req.faults != FaultHooks::default() && !agent.cfg.allow_fault_hooks {
            return Err(ApiFailure::bad_request(format!(
                "fault hooks are disabled on {} (allow_fault_hooks in its config)",
                agent.cfg.host
            )));
        }
        if let Err(e) = req.deadlines.validate() {
            return Err(ApiFailure::bad_request(e));
        }
        if req.hooks.len() > 16 {
            return Err(ApiFailure::bad_request(format!(
                "{} hooks: at most 16 per migration",
                req.hooks.len()
            )));
        }
        if let Some(e) = req.hooks.iter().find_map(|h| h.check().err()) {
            return Err(ApiFailure::bad_request(e));
        }
        if req.precopy.is_some() && req.mode != MigrateMode::PreCopy {
            return Err(ApiFailure::bad_request(
                "precopy settings given without mode \"pre-copy\"".to_string(),
            ));
        }
        if let Some(p) = &req.precopy {
            if let Err(e) = p.validate() {
                return Err(ApiFailure::bad_request(format!("precopy: {e}")));
            }
        }
        if req.mode == MigrateMode::PreCopy && agent.cfg.criu_frontend.is_none() {
            return Err(ApiFailure::bad_request(format!(
                "pre-copy needs ferry-criu on {} (criu_frontend in its config)",
                agent.cfg.host
            )));
        }
        match agent.cfg.peer(&req.to) {
            None => {
                return Err(ApiFailure::unknown_host(format!(
                    "unknown destination host {:?}: containers here can move to {}",
                    req.to,
                    agent.target_names().join(", ")
                )))
            }
            Some(p) if !p.runs_containers => {
                return Err(ApiFailure::unknown_host(format!(
                    "host {:?} does not run containers: containers here can move to {}",
                    req.to,
                    agent.target_names().join(", ")
                )))
            }
            Some(_) => {}
        }
        rec.migrating = true;
        rec.spec.clone()
    };
    let id = agent.new_job_id();
    // Recorded before anything happens to the container: if this agent dies, its next start
    // resolves the job (see journal.rs).
    let journal = Outgoing {
        job: id.clone(),
        name: name.to_string(),
        to: req.to.clone(),
        phase: OutPhase::Started,
    };
    if let Err(e) = agent.journal_outgoing(&journal) {
        if let Some(rec) = lock(&agent.containers).get_mut(name) {
            rec.migrating = false;
        }
        return Err(ApiFailure::internal(format!("{e:#}")));
    }
    let mut machine = Migration::new(&id, name, &agent.cfg.host, &req.to);
    if req.mode == MigrateMode::PreCopy {
        machine = machine.with_precopy(req.precopy.clone().unwrap_or_default());
    }
    let (tx, _) = broadcast::channel(256);
    let job = Arc::new(Job {
        id: id.clone(),
        started: Instant::now(),
        status: Mutex::new((machine.state(), machine.report().clone())),
        history: Mutex::new(vec![]),
        tx,
        cancel: Default::default(),
        cancel_notify: Notify::new(),
        planned_bytes: Default::default(),
    });
    {
        // Finished jobs stay listed for `ferry job`, the oldest forgotten past MAX_JOBS.
        let mut jobs = lock(&agent.jobs);
        if jobs.len() >= MAX_JOBS {
            let mut done: Vec<(Instant, String)> = jobs
                .values()
                .filter(|j| lock(&j.status).0.is_terminal())
                .map(|j| (j.started, j.id.clone()))
                .collect();
            done.sort();
            for (_, old) in done.iter().take(jobs.len() + 1 - MAX_JOBS) {
                jobs.remove(old);
            }
        }
        jobs.insert(id.clone(), Arc::clone(&job));
    }
    let (a, j) = (Arc::clone(agent), Arc::clone(&job));
    let a_hooks: Vec<ferry_api::Hook> = agent.cfg.hooks.iter().chain(&req.hooks).cloned().collect();
    let mut rounds = Rounds::new();
    rounds.refuse_tracking = req.faults.refuse_tracking;
    rounds.set_follow_writes(req.precopy.as_ref().is_none_or(|p| p.follow_writes));
    rounds.set_lazy(
        req.mode == MigrateMode::PreCopy && req.precopy.as_ref().is_none_or(|p| p.lazy_restore),
        req.faults.hide_dirty_page,
    );
    tokio::spawn(async move {
        let mut d = Driver {
            agent: a,
            job: j,
            spec,
            to: req.to,
            faults: req.faults,
            deadlines: req.deadlines,
            mode: req.mode,
            rounds,
            source_link_down: false,
            dump_ahead: None,
            conn: None,
            rootfs_snapshot: None,
            root_diff: None,
            commit_may_be_sent: false,
            rootfs_digest: None,
            stdio: None,
            lazy_dumped: false,
            lazy_regions: Vec::new(),
            hot_chunks: Vec::new(),
            hidden_pages: 0,
            post_copy: false,
            remote_pages: 0,
            wants_post_copy: req.precopy.as_ref().is_some_and(|p| p.post_copy),
            // Post-copy needs the lazy restore whatever the size.
            lazy_min_bytes: req.precopy.as_ref().map_or(
                migrate_core::PrecopyPolicy::default().lazy_min_mib,
                |p| {
                    if p.may_post_copy() {
                        0
                    } else {
                        p.lazy_min_mib
                    }
                },
            ) << 20,
            memory_bytes: 0,
            ignore_cpu_features: req.ignore_cpu_features,
            hooks: a_hooks,
            warnings: vec![],
            fence: None,
            route_switch: None,
            watch_paths: Default::default(),
            pending: Vec::new(),
            relay_confirm: None,
            dump_pages_stream: None,
            dump_finishing: None,
            frozen_round_trips: 0,
            images_answer: None,
            images_delivered_ms: None,
            page_share: 0.0,
            base: None,
            memory: None,
            not_lazy: (req.mode == MigrateMode::PreCopy
                && req.precopy.as_ref().is_some_and(|p| !p.lazy_restore))
            .then(|| "lazy_restore is off in the job's pre-copy policy".to_string()),
        };
        let job_id = d.job.id.clone();
        d.run(machine).await;
        // Resolved here, whatever the outcome: only a job interrupted by the agent's death is
        // left for recovery.
        d.agent.forget_outgoing(&job_id);
    });
    Ok(job)
}

pub(super) struct Driver {
    pub(super) agent: Arc<Agent>,
    pub(super) job: Arc<Job>,
    pub(super) spec: ContainerSpec,
    pub(super) to: String,
    pub(super) faults: FaultHooks,
    pub(super) deadlines: ferry_api::Deadlines,
    pub(super) mode: MigrateMode,
    pub(super) rounds: Rounds,
    /// The source container's veth was taken down for the final dump (rollback: up again).
    pub(super) source_link_down: bool,
    pub(super) conn: Option<transfer::Connection>,
    pub(super) rootfs_snapshot: Option<Snapshot>,
    /// The root filesystem's diff since `rootfs_snapshot` and its digest, computed beside the
    /// final dump once the container is frozen ([`RootDiff::start`]).
    pub(super) root_diff: Option<RootDiff>,
    /// The journal says a commit may have been sent ([`OutPhase::CommitSent`], synced before
    /// the freeze): a rollback records `Started` again before it thaws the container.
    pub(super) commit_may_be_sent: bool,
    /// Digest of the root filesystem at the freeze, sent for the destination to match.
    pub(super) rootfs_digest: Option<String>,
    /// The webhooks of this migration: the host's, then the request's ([`crate::hooks`]).
    pub(super) hooks: Vec<ferry_api::Hook>,
    /// The container's first process and its descriptors 0 to 2 at the prepare (runc's
    /// `descriptors.json` is written again from them at the freeze: see `transfer`).
    pub(super) stdio: Option<(i32, Vec<String>)>,
    /// The final dump was lazy: the destination restores lazily (see `lazy`).
    pub(super) lazy_dumped: bool,
    /// The frozen copy's lazy memory, for the integrity check.
    pub(super) lazy_regions: Vec<super::lazy::LazyRegion>,
    /// The final dump's last written pages (host pid, address, pages): checked first.
    pub(super) hot_chunks: Vec<(i32, u64, u64)>,
    /// Pages the fault hook `hide_dirty_page` left out of the final dump.
    pub(super) hidden_pages: u64,
    /// Post-copy: the destination fetches what it lacks from the frozen copy after the
    /// restore (the state machine stopped pre-copy for it).
    pub(super) post_copy: bool,
    /// Post-copy: pages left at the source at the freeze.
    pub(super) remote_pages: u64,
    /// The policy asks for post-copy from the start.
    pub(super) wants_post_copy: bool,
    /// The memory the container's checkpoint carries, measured at the preflight.
    pub(super) memory_bytes: u64,
    /// Below this much resident memory a pre-copy restores eagerly (policy `lazy_min_mib`).
    pub(super) lazy_min_bytes: u64,
    /// The final dump's `runc checkpoint`, started before the redirect and waiting at its
    /// CRIU gate, with the relay it was started for.
    pub(super) dump_ahead: Option<(DumpAhead, Option<(std::path::PathBuf, bool)>)>,
    /// An eager final dump's page stream to the destination, opened with the dump started
    /// ahead: the destination starts its `criu page-server` before the freeze.
    pub(super) dump_pages_stream: Option<(transfer::SendStream, transfer::RecvStream)>,
    /// Requests of the final dump sent without waiting; the restore waits for them.
    pub(super) pending: Vec<tokio::task::JoinHandle<Result<u64>>>,
    /// The destination's answers to the eager final dump's relay (its page server's close),
    /// not waited for in the dump: the destination's restore waits for the pages itself,
    /// and the source reads these before it commits.
    pub(super) relay_confirm: Option<tokio::task::JoinHandle<Result<()>>>,
    /// The final dump's runc, still exiting after CRIU reported success: the images travel
    /// meanwhile; the restore (and a rollback) waits for it.
    pub(super) dump_finishing: Option<ferry_runtime::runc::Finishing>,
    /// Request round trips to the destination while frozen, every mode (the report's).
    pub(super) frozen_round_trips: u32,
    /// The images request's answer, not waited for before the restore request: the
    /// destination restores once the images are there (one round trip less in the freeze).
    pub(super) images_answer: Option<tokio::task::JoinHandle<Result<(u64, f64)>>>,
    /// When the destination answered the images (ms from the start of the transfer).
    pub(super) images_delivered_ms: Option<f64>,
    /// The memory pages' share (CRIU's `pages-*.img`) of the file bytes the transfer sent,
    /// 0 to 1, for the metrics.
    pub(super) page_share: f64,
    /// Pre-copy: how memory crossed the freeze, for the report.
    pub(super) memory: Option<migrate_core::MemoryReport>,
    /// How the image's base layer reached the destination, for the report.
    pub(super) base: Option<migrate_core::BaseReport>,
    /// Why this pre-copy does not restore lazily.
    pub(super) not_lazy: Option<String>,
    /// The request moves even to a CPU that lacks instruction sets this host's has.
    pub(super) ignore_cpu_features: bool,
    /// Warnings of the phases before the commit, for the report.
    pub(super) warnings: Vec<String>,
    /// The container's fencing token in etcd (its record's revision at the preflight), when
    /// the cluster uses etcd: the network switch and the destination's commit require it.
    pub(super) fence: Option<i64>,
    /// How the overlay's switch went: `etcd` or `direct`, and its ms.
    pub(super) route_switch: Option<(&'static str, f64)>,
    /// Paths of the inodes the container's inotify and fanotify marks watch, found at the
    /// preflight and again right before the freeze (new watches only), for CRIU.
    pub(super) watch_paths: Arc<std::sync::Mutex<ferry_runtime::inspect::WatchPaths>>,
}

fn phase_of(a: &Action) -> Option<Phase> {
    Some(match a {
        Action::Preflight => Phase::Preflight,
        Action::Prepare => Phase::Prepare,
        Action::CopyRound { .. } => Phase::PreCopy,
        Action::Redirect => Phase::Redirect,
        Action::Dump => Phase::Dump,
        Action::Transfer => Phase::Transfer,
        Action::Restore => Phase::Restore,
        Action::Commit => Phase::Commit,
        Action::CleanupSource => Phase::Cleanup,
        Action::Rollback(_) => Phase::Rollback,
        Action::Finish => return None,
    })
}

impl Driver {
    fn now(&self) -> Duration {
        self.job.started.elapsed()
    }

    async fn run(&mut self, mut m: Migration) {
        let mut cancel_fed = false;
        m.set_started_unix_ms(ferry_runtime::util::unix_ms());
        let mut actions = match m.handle(Event::Start, self.now()) {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "migration could not start");
                return;
            }
        };
        self.publish(&m);
        let mut committed_announced = false;
        while let Some(action) = actions.pop() {
            let Some(phase) = phase_of(&action) else {
                break;
            };
            self.job.emit(JobEventKind::PhaseStarted { phase });
            let t = Instant::now();
            let ticker = self.progress_ticker(phase);
            if self.faults.pause_in_phase == Some(phase) && self.faults.pause_in_phase_ms > 0 {
                let ms = self.faults.pause_in_phase_ms;
                warn!(job = %self.job.id, phase = phase.name(), ms, "pausing at the start of a phase (fault hook)");
                let job = Arc::clone(&self.job);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = job.cancelled() => {}
                }
            }
            // A round reports its statistics; every other phase the bytes it moved.
            self.post_copy = m.precopy_stop() == Some(migrate_core::FreezeReason::PostCopy);
            let result = match action {
                Action::CopyRound {
                    round,
                    throttle_pct,
                } => {
                    let r = self.copy_round(round, throttle_pct).await;
                    for w in self.warnings.drain(..) {
                        m.warn(w);
                    }
                    if let Some(method) = self.rounds.method() {
                        m.set_dirty_tracking(&method.to_string());
                        m.set_tracking(self.rounds.tracking.clone());
                    }
                    r.map(|stats| (stats.bytes_sent, Event::RoundDone(stats)))
                }
                _ => {
                    // A cancel interrupts any phase before the commit: the request to the
                    // destination is dropped (the rollback tells it to abort, which kills its
                    // restore); the dump's runc is killed through the job's cancel flag.
                    let cancellable = matches!(
                        action,
                        Action::Preflight
                            | Action::Prepare
                            | Action::Redirect
                            | Action::Transfer
                            | Action::Restore
                    );
                    let job = Arc::clone(&self.job);
                    let r = if cancellable {
                        tokio::select! {
                            r = self.execute(&action) => r,
                            _ = job.cancelled() => Err(anyhow!("cancelled during the {} phase", phase.name())),
                        }
                    } else {
                        self.execute(&action).await
                    };
                    if let Some(d) = &self.rootfs_digest {
                        m.set_rootfs_digest(d);
                    }
                    if let Some(mem) = &self.memory {
                        m.set_memory(mem);
                    }
                    m.set_frozen_round_trips(self.frozen_round_trips);
                    if let Some(ms) = self.images_delivered_ms {
                        m.set_images_delivered_ms(ms);
                    }
                    if let Some((via, ms)) = self.route_switch {
                        m.set_route_switch(via, ms);
                    }
                    if let Some(b) = self.base.take() {
                        m.set_base(b);
                    }
                    for w in self.warnings.drain(..) {
                        m.warn(w);
                    }
                    r.map(|bytes| (bytes, Event::Done { bytes }))
                }
            };
            if let Some(t) = ticker {
                t.abort();
            }
            let round_done = matches!(result, Ok((_, Event::RoundDone(_))));
            if self.job.cancel.load(Ordering::SeqCst) && !cancel_fed {
                cancel_fed = true;
                if let Err(e) = m.handle(Event::Cancel, self.now()) {
                    info!(job = %self.job.id, error = %e, "cancel ignored");
                }
            }
            let event = match result {
                Ok((bytes, event)) => {
                    self.job.emit(JobEventKind::PhaseDone {
                        phase,
                        duration_ms: ferry_runtime::util::ms(t.elapsed()),
                        bytes,
                    });
                    event
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    warn!(job = %self.job.id, phase = phase.name(), %error, "phase failed");
                    self.job.emit(JobEventKind::PhaseFailed {
                        phase,
                        error: error.clone(),
                    });
                    Event::Failed { error }
                }
            };
            actions = match m.handle(event, self.now()) {
                Ok(a) => a,
                Err(e) => {
                    warn!(job = %self.job.id, error = %e, "state machine refused an event");
                    break;
                }
            };
            if round_done {
                if let Some(round) = m.report().rounds.last() {
                    self.job.emit(JobEventKind::Round {
                        round: round.clone(),
                    });
                }
            }
            self.publish(&m);
            if m.report().committed && !committed_announced {
                committed_announced = true;
                self.job.emit(JobEventKind::Committed);
                let host = self.agent.cfg.host.clone();
                if let Ok(w) =
                    crate::hooks::call(&self.hooks, HookEvent::Committed, &host, &self.job.info())
                        .await
                {
                    self.warnings.extend(w);
                }
            }
        }
        // The container is no longer "migrating" wherever it ended up.
        if let Some(rec) = lock(&self.agent.containers).get_mut(&self.spec.name) {
            rec.migrating = false;
        }
        self.agent.save_containers();
        let state = m.state();
        let report = m.finalize();
        // The last hooks see the final report; what they say is only logged.
        let info = JobInfo {
            id: self.job.id.clone(),
            state,
            report: report.clone(),
        };
        let host = self.agent.cfg.host.clone();
        if matches!(report.outcome, migrate_core::Outcome::RolledBack { .. }) {
            let _ = crate::hooks::call(&self.hooks, HookEvent::RolledBack, &host, &info).await;
        }
        let _ = crate::hooks::call(&self.hooks, HookEvent::Finished, &host, &info).await;
        self.agent.metrics.migration_ended(&report, self.page_share);
        // With etcd, the job's record is the cluster's too (kept a day).
        if let Some(c) = self.agent.cluster() {
            let json = serde_json::to_vec(&info).unwrap_or_default();
            if let Err(e) = c.store.put_job(&self.job.id, json).await {
                warn!(job = %self.job.id, error = %e, "job not recorded in etcd");
            }
        }
        info!(job = %self.job.id, outcome = ?report.outcome, frozen_ms = report.frozen_ms, total_ms = report.total_ms, "migration ended");
        self.job.emit(JobEventKind::Finished {
            report: Box::new(report),
        });
    }

    /// Emits a progress event about every second while `phase` runs, once a connection to
    /// the destination exists: the bytes sent on it since the phase started.
    fn progress_ticker(&self, phase: Phase) -> Option<tokio::task::JoinHandle<()>> {
        let conn = self.conn.as_ref()?.conn.clone();
        let job = Arc::clone(&self.job);
        let t0 = Instant::now();
        let base = conn.stats().udp_tx.bytes;
        job.planned_bytes.store(0, Ordering::Relaxed);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let planned = job.planned_bytes.load(Ordering::Relaxed);
                job.emit(JobEventKind::Progress {
                    phase,
                    elapsed_ms: ferry_runtime::util::ms(t0.elapsed()),
                    bytes: conn.stats().udp_tx.bytes.saturating_sub(base),
                    planned_bytes: (planned > 0).then_some(planned),
                });
            }
        }))
    }

    fn publish(&self, m: &Migration) {
        *lock(&self.job.status) = (m.state(), m.report().clone());
    }

    pub(super) async fn conn(&mut self) -> Result<transfer::Connection> {
        if let Some(c) = &self.conn {
            if c.conn.close_reason().is_none() {
                return Ok(c.clone());
            }
            bail!(
                "connection to {} lost: {}",
                self.to,
                c.conn
                    .close_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_default()
            );
        }
        let c = self.agent.peer_conn(&self.to).await?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    /// Sends a request to the destination; a peer error becomes an error.
    async fn ask_dest(&mut self, req: &PeerRequest, trees: &[Tree<'_>]) -> Result<u64> {
        let conn = self.conn().await?;
        let (resp, bytes) = request(&conn, req, trees).await?;
        expect_ok(&self.to, resp)?;
        Ok(bytes)
    }

    async fn execute(&mut self, action: &Action) -> Result<u64> {
        if matches!(action, Action::Dump) && !self.commit_may_be_sent {
            // Synced before the freeze, not in it: from here a restart that finds the container
            // frozen (or gone) asks the destination for the outcome instead of rolling back,
            // since the commit may have gone out; a rollback records `Started` again before it
            // thaws the container.
            self.record_phase(OutPhase::CommitSent).await?;
        }
        match action {
            Action::Preflight => self.preflight().await,
            Action::Prepare => self.prepare().await,
            Action::Redirect => self.redirect().await,
            Action::Dump => self.dump().await,
            Action::Transfer => self.transfer().await,
            Action::Restore => self.restore().await,
            Action::Commit => self.commit().await,
            Action::CleanupSource => self.cleanup().await,
            Action::Rollback(plan) => self.rollback(*plan).await.map(|_| 0),
            Action::Finish => Ok(0),
            // Run by `copy_round`, which reports RoundDone.
            Action::CopyRound { .. } => bail!("a pre-copy round is not a plain phase"),
        }
    }

    /// Records (synced) how far this job got.
    async fn record_phase(&mut self, phase: OutPhase) -> Result<()> {
        let rec = Outgoing {
            job: self.job.id.clone(),
            name: self.spec.name.clone(),
            to: self.to.clone(),
            phase,
        };
        let agent = Arc::clone(&self.agent);
        tokio::task::spawn_blocking(move || agent.journal_outgoing(&rec)).await??;
        self.commit_may_be_sent = phase == OutPhase::CommitSent;
        Ok(())
    }

    async fn rollback(&mut self, plan: RollbackPlan) -> Result<()> {
        for h in self.pending.drain(..) {
            h.abort();
        }
        if let Some(h) = self.images_answer.take() {
            h.abort();
        }
        // The dump's runc ends before the container is looked at.
        if let Err(e) = self.wait_dump_finishing().await {
            warn!(job = %self.job.id, error = %format!("{e:#}"), "the final dump's runc failed after CRIU's success");
        }
        // A runc checkpoint waiting at its gate fails and cleans up.
        drop(self.dump_ahead.take());
        self.agent.forget_frozen_copy(&self.job.id);
        let job = self.job.id.clone();
        let name = self.spec.name.clone();
        let mut errors = vec![];
        if self.commit_may_be_sent {
            // Before the container runs again here: a restart must then roll back, never ask
            // the destination to commit a copy this one has moved on from.
            if let Err(e) = self.record_phase(OutPhase::Started).await {
                errors.push(format!("{e:#}"));
            }
        }
        // Images that are the only copy of a container that could not be restored are kept.
        let mut keep_images = false;
        // Pre-copy: no tracker may stay in the container, no throttle on it.
        if let Err(e) = self.rounds.stop_tracking() {
            errors.push(format!("{e:#}"));
        }
        self.rounds.lift_throttle();
        if plan.restore_source {
            let l = self.agent.layout(&name);
            let (runc, n) = (self.agent.runc.clone(), name.clone());
            let running = tokio::task::spawn_blocking(move || runc.state(&n))
                .await?
                .is_some_and(|s| s.status == "running" || s.status == "paused");
            if running {
                if self.source_link_down {
                    let l = self.agent.layout(&name);
                    if let Err(e) = ferry_runtime::netns::set_veth(&l, true) {
                        errors.push(format!("{e:#}"));
                    }
                }
                ferry_runtime::freeze::thaw(&self.agent.cfg.host, &name);
            }
            if running {
                info!(%job, "dump did not complete: container still runs on the source");
            } else {
                let (runc, images, work) = (
                    self.agent.runc.clone(),
                    self.agent.images_dir(&job),
                    self.agent.work_dir(&job),
                );
                let n = name.clone();
                let agent = Arc::clone(&self.agent);
                let r = tokio::task::spawn_blocking(move || {
                    runc.delete_force(&n);
                    // Its output goes on into its log here, through a new shim.
                    let console = agent.spawn_console(&n)?;
                    let from = ferry_runtime::runc::RestoreFrom {
                        bundle: &l.bundle,
                        images: &images,
                        work: &work,
                        lazy: false,
                        console: Some(&console),
                    };
                    runc.restore(&n, &from)
                })
                .await
                .map_err(|e| anyhow!("{e}"))
                .and_then(|r| r);
                match r {
                    Ok(()) => info!(%job, "container restored on the source"),
                    Err(e) => {
                        keep_images = true;
                        errors.push(format!(
                            "restoring on the source: {e:#} (its images are kept in {} for a restore by hand)",
                            self.agent.images_dir(&job).display()
                        ))
                    }
                }
            }
        }
        if plan.redirect_back {
            // The destination may be the unreachable one; every other host must follow.
            if let Err(e) = self
                .agent
                .route_back_here(&self.spec.name, &self.spec.mac, Some(&self.to))
                .await
            {
                errors.push(format!("{e:#}"));
            }
        }
        if plan.clean_destination {
            let r = tokio::time::timeout(Duration::from_secs(3), async {
                let conn = self.agent.peer_conn(&self.to).await?;
                let (resp, _) =
                    request(&conn, &PeerRequest::Abort { job: job.clone() }, &[]).await?;
                expect_ok(&self.to, resp)
            })
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(%job, error = %format!("{e:#}"), "destination not told to abort; it cleans up on its own when the job expires")
                }
                Err(_) => {
                    warn!(%job, "destination did not answer the abort in 3 s; it cleans up on its own when the job expires")
                }
            }
        }
        if !keep_images {
            let _ = std::fs::remove_dir_all(self.agent.images_dir(&job));
            let _ = std::fs::remove_dir_all(self.agent.work_dir(&job));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow!(errors.join("; "))).context("rollback incomplete")
        }
    }
}

impl Driver {
    async fn copy_round(&mut self, round: u32, throttle_pct: u32) -> Result<RoundStats> {
        if self.job.cancel.load(Ordering::SeqCst) {
            bail!("cancelled");
        }
        let conn = self.conn().await?;
        let l = self.agent.layout(&self.spec.name);
        let mut snap = self.rootfs_snapshot.take().unwrap_or_default();
        let r = self
            .agent
            .copy_round(
                &self.job,
                &self.spec.name,
                &conn,
                &mut self.rounds,
                round,
                throttle_pct,
                (&l.own_fs(&self.spec), &mut snap),
            )
            .await;
        self.rootfs_snapshot = Some(snap);
        r
    }

    /// Counts request round trips to the destination while frozen (the report's, and the
    /// lazy restore's memory report).
    pub(super) fn count_round_trips(&mut self, n: u32) {
        self.frozen_round_trips += n;
        if let Some(m) = self.memory.as_mut().filter(|m| m.restore == "lazy") {
            m.frozen_round_trips += n;
        }
    }
}

/// Most processes a container restored eagerly for its small memory may have (policy
/// `lazy_min_mib`): an eager final dump relays each process's pages through CRIU's page
/// server, which cost a container of 120 processes 480-540 ms of dump against 335-375 ms for a
/// lazy one (`ferry bench --quick`).
const EAGER_MAX_PROCESSES: usize = 8;

fn dir_size(p: &std::path::Path) -> u64 {
    shared_fs::snapshot(p)
        .map(|s| s.entries.values().map(|e| e.size).sum())
        .unwrap_or(0)
}

impl Agent {
    /// After the destination committed: removes the copy left here, frozen (network first: it
    /// still has live sockets, which must not send FIN or RST when it is killed), its bundle,
    /// images and record. With `keep_pages`, the frozen copy's memory is kept in the page store
    /// first, so that the container sends only what changed if it comes back. Then what this
    /// host kept of its output follows it to `to` ([`Agent::send_history`]).
    pub(crate) async fn remove_departed(
        self: &Arc<Self>,
        job: &str,
        name: &str,
        to: &str,
        keep_pages: bool,
    ) {
        lock(&self.containers).remove(name);
        self.save_containers();
        if keep_pages {
            self.keep_own_pages(&self.cfg.host, name).await;
        }
        let (runc, l, n) = (self.runc.clone(), self.layout(name), name.to_string());
        let (images, work) = (self.images_dir(job), self.work_dir(job));
        let _ = tokio::task::spawn_blocking(move || {
            ferry_runtime::netns::delete_netns(&l);
            runc.delete_force(&n);
            ferry_runtime::bundle::remove_bundle(&l);
            let _ = std::fs::remove_dir_all(images);
            let _ = std::fs::remove_dir_all(work);
        })
        .await;
        self.send_history(job, name, to).await;
    }
}

/// Most jobs an agent lists; past it the oldest finished ones are forgotten.
const MAX_JOBS: usize = 1024;

/// Longest pause a fault hook may ask for.
const MAX_FAULT_PAUSE_MS: u64 = 120_000;

/// Every pause of a fault hook is bounded (a test must not be able to park a migration).
fn check_fault_bounds(f: &FaultHooks) -> std::result::Result<(), String> {
    for (name, ms) in [
        ("pause_in_transfer_ms", f.pause_in_transfer_ms),
        ("pause_before_commit_ms", f.pause_before_commit_ms),
        ("pause_in_dump_ms", f.pause_in_dump_ms),
        ("pause_in_restore_ms", f.pause_in_restore_ms),
        ("pause_after_commit_ms", f.pause_after_commit_ms),
        ("pause_in_phase_ms", f.pause_in_phase_ms),
    ] {
        if ms > MAX_FAULT_PAUSE_MS {
            return Err(format!(
                "faults.{name} is {ms}: fault hooks pause at most {MAX_FAULT_PAUSE_MS} ms"
            ));
        }
    }
    Ok(())
}
