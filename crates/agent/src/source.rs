//! The source side of a migration: drives `migrate_core::Migration` and carries out its actions.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use migrate_core::{Action, Event, Migration, Phase, RollbackPlan, RoundStats};
use orchestrator_shim::api::{
    ContainerSpec, FaultHooks, JobEventKind, MigrateMode, MigrateRequest, Resolution,
};
use shared_fs::{Diff, Snapshot};
use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};
use transfer::tree::Reads;

use super::http::ApiFailure;
use super::journal::{OutPhase, Outgoing};
use super::peer::{expect_ok, request, request_trees, request_trees_notify, Tree};
use super::rounds::Rounds;
use super::{lock, Agent, Job};
use crate::proto::{PeerRequest, PeerResponse, PROTO_VERSION};

/// Validates the request and starts the job in the background.
pub(crate) fn start(
    agent: &Arc<Agent>,
    name: &str,
    req: MigrateRequest,
) -> Result<Arc<Job>, ApiFailure> {
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
        if agent.cfg.peer(&req.to).is_none() {
            return Err(ApiFailure::unknown_host(format!(
                "unknown destination host {:?}: known hosts are {}",
                req.to,
                agent.peer_names().join(", ")
            )));
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
            warnings: vec![],
            watch_paths: Default::default(),
            pending: Vec::new(),
            relay_confirm: None,
            dump_pages_stream: None,
            dump_finishing: None,
            frozen_round_trips: 0,
            images_answer: None,
            images_delivered_ms: None,
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
    pub(super) deadlines: orchestrator_shim::api::Deadlines,
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
            if self.faults.pause_in_phase == Some(phase) && self.faults.pause_in_phase_ms > 0 {
                let ms = self.faults.pause_in_phase_ms;
                warn!(job = %self.job.id, ?phase, ms, "pausing at the start of a phase (fault hook)");
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
                    if let Some(b) = self.base.take() {
                        m.set_base(b);
                    }
                    for w in self.warnings.drain(..) {
                        m.warn(w);
                    }
                    r.map(|bytes| (bytes, Event::Done { bytes }))
                }
            };
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
                    warn!(job = %self.job.id, ?phase, %error, "phase failed");
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
            self.publish(&m);
            if m.report().committed && !committed_announced {
                committed_announced = true;
                self.job.emit(JobEventKind::Committed);
            }
        }
        // The container is no longer "migrating" wherever it ended up.
        if let Some(rec) = lock(&self.agent.containers).get_mut(&self.spec.name) {
            rec.migrating = false;
        }
        self.agent.save_containers();
        let report = m.finalize();
        info!(job = %self.job.id, outcome = ?report.outcome, frozen_ms = report.frozen_ms, total_ms = report.total_ms, "migration ended");
        self.job.emit(JobEventKind::Finished {
            report: Box::new(report),
        });
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
        let job = self.job.id.clone();
        let l = self.agent.layout(&self.spec.name);
        if matches!(action, Action::Dump) && !self.commit_may_be_sent {
            // Synced before the freeze, not in it: from here a restart that finds the container
            // frozen (or gone) asks the destination for the outcome instead of rolling back,
            // since the commit may have gone out; a rollback records `Started` again before it
            // thaws the container.
            self.record_phase(OutPhase::CommitSent).await?;
        }
        match action {
            Action::Preflight => {
                if let Err(e) = &self.agent.criu {
                    bail!("CRIU unusable on {}: {e}", self.agent.cfg.host);
                }
                let (runc, n, bundle) = (
                    self.agent.runc.clone(),
                    self.spec.name.clone(),
                    l.bundle.clone(),
                );
                let host = self.agent.cfg.host.clone();
                let watches = Arc::clone(&self.watch_paths);
                let (st, size, memory, processes, longest, blockers) =
                    tokio::task::spawn_blocking(move || {
                        let memory = ferry_runtime::cgroup_tree::container_memory_bytes(&host, &n);
                        let pids = ferry_runtime::cgroup_tree::container_pids(&host, &n);
                        // The longest range a lazy restore would register (a process that
                        // vanished meanwhile counts for nothing).
                        let longest = pids
                            .iter()
                            .flatten()
                            .filter_map(|p| memtrack::longest_private_anon_mapping(*p).ok())
                            .max()
                            .unwrap_or(0);
                        let blockers = match &pids {
                            Ok(p) => {
                                watches.lock().unwrap().update(p);
                                ferry_runtime::inspect::blockers(std::path::Path::new("/proc"), p)
                            }
                            Err(_) => vec![],
                        };
                        let processes = pids.map(|p| p.len());
                        (
                            runc.state(&n),
                            dir_size(&bundle),
                            memory,
                            processes,
                            longest,
                            blockers,
                        )
                    })
                    .await?;
                // Unknown (a process vanished meanwhile): the destination does not check.
                self.memory_bytes = memory.unwrap_or(0);
                if st.as_ref().map(|s| s.status.as_str()) != Some("running") {
                    bail!(
                        "container {:?} is not running on {} (runc state: {})",
                        self.spec.name,
                        self.agent.cfg.host,
                        st.map(|s| s.status).unwrap_or_else(|| "unknown".into())
                    );
                }
                if !blockers.is_empty() {
                    bail!(
                        "container {:?} holds what CRIU cannot move (nothing was frozen; it runs on {}): {}",
                        self.spec.name,
                        self.agent.cfg.host,
                        ferry_runtime::inspect::describe(&blockers)
                    );
                }
                let to = self.to.clone();
                let req = PeerRequest::Preflight {
                    version: PROTO_VERSION,
                    name: self.spec.name.clone(),
                    memory_bytes: self.memory_bytes,
                    pre_copy: self.mode == MigrateMode::PreCopy,
                };
                let (resp, bytes) =
                    match async { request(&self.conn().await?, &req, &[]).await }.await {
                        Ok(r) => r,
                        Err(_) => {
                            // The cached connection may predate a restart of the peer: retry fresh.
                            self.agent.forget_conn(&to).await;
                            self.conn = None;
                            async { request(&self.conn().await?, &req, &[]).await }
                                .await
                                .with_context(|| format!("destination {to} unreachable"))?
                        }
                    };
                match resp {
                    PeerResponse::Preflight {
                        free_bytes,
                        pages_held,
                        no_lazy_restore,
                        images_free_bytes,
                        lazy_max_mapping_bytes,
                        cpu_flags,
                        ..
                    } => {
                        self.check_cpu_features(cpu_flags)?;
                        self.rounds.set_destination_pages(pages_held);
                        let no_lazy_restore = no_lazy_restore.or_else(|| {
                            lazy_max_mapping_bytes.filter(|max| longest > *max).map(|max| {
                                format!(
                                    "the container has a mapping of {:.1} GiB and CRIU's lazy-pages daemon at {} serves at most {:.1} GiB (its CRIU lacks Ferry's patch: run scripts/setup.sh there)",
                                    longest as f64 / (1u64 << 30) as f64,
                                    self.to,
                                    max as f64 / (1u64 << 30) as f64
                                )
                            })
                        });
                        if let (Some(why), Some(_)) = (&no_lazy_restore, &self.rounds.placement) {
                            if self.wants_post_copy {
                                bail!(
                                    "post-copy needs a lazy restore at {}, which cannot: {why}",
                                    self.to
                                );
                            }
                            warn!(job = %self.job.id, reason = %why, "no lazy restore: the final dump carries every page");
                            self.rounds.placement = None;
                            self.not_lazy = Some(why.clone());
                        }
                        let few = processes.as_ref().is_ok_and(|n| *n <= EAGER_MAX_PROCESSES);
                        if self.rounds.placement.is_some()
                            && self.memory_bytes > 0
                            && self.memory_bytes < self.lazy_min_bytes
                            && few
                        {
                            let why = format!(
                                "the container's memory ({:.1} MiB) is below lazy_min_mib ({} MiB) and it has at most {EAGER_MAX_PROCESSES} processes: an eager restore is faster",
                                self.memory_bytes as f64 / (1 << 20) as f64,
                                self.lazy_min_bytes >> 20
                            );
                            info!(job = %self.job.id, reason = %why, "eager restore");
                            self.rounds.placement = None;
                            self.not_lazy = Some(why);
                        }
                        let need = size * 2 + (64 << 20);
                        if free_bytes < need {
                            bail!("{} has {} MiB free in its state directory, the container needs about {} MiB", self.to, free_bytes >> 20, need >> 20);
                        }
                        self.check_checkpoint_room(images_free_bytes).await?;
                    }
                    other => expect_ok(&self.to, other)?,
                }
                Ok(bytes)
            }
            Action::Prepare => {
                // From an image: the destination gets the base's missing chunks first, then
                // only the container's own layer.
                let mut base_bytes = 0;
                if let Some(image) = self.spec.image.clone() {
                    let conn = self.conn().await?;
                    let base = self.agent.send_base(&conn, &image).await?;
                    base_bytes = base.bytes_sent;
                    self.base = Some(base);
                }
                let own = l.own_fs(&self.spec);
                let root = own.clone();
                let snap =
                    tokio::task::spawn_blocking(move || shared_fs::snapshot(&root)).await??;
                let full = shared_fs::diff(&Snapshot::default(), &snap);
                let req = PeerRequest::Prepare {
                    job: job.clone(),
                    spec: Box::new(self.spec.clone()),
                    memory_bytes: if self.mode == MigrateMode::PreCopy {
                        self.memory_bytes
                    } else {
                        0
                    },
                    restore_lazily: self.mode == MigrateMode::PreCopy
                        && self.rounds.placement.is_some(),
                };
                // The container runs: what changes under this first copy goes again with the
                // next diff (a round, or the final one while it is frozen).
                let conn = self.conn().await?;
                let tree = Tree {
                    root: &own,
                    diff: &full,
                    reads: Reads::Live,
                };
                let sent = request_trees(&conn, &req, &[tree]).await?;
                expect_ok(&self.to, sent.resp)?;
                let mut snap = snap;
                for p in &sent.unsettled {
                    snap.unsettle(p);
                }
                if !sent.unsettled.is_empty() {
                    info!(%job, unsettled = sent.unsettled.len(), first = %sent.unsettled[0],
                        "root filesystem entries changed while they were read: they go again with the next diff");
                }
                self.rootfs_snapshot = Some(snap);
                Ok(base_bytes + sent.bytes)
            }
            Action::Redirect => {
                // runc checkpoint gets ready first: from the redirect on, the container's
                // packets wait at the destination.
                self.start_dump_ahead().await;
                self.agent
                    .route_everywhere(&self.spec.mac, Some(&self.to), None)
                    .await?;
                Ok(0)
            }
            Action::Dump if self.final_dump_here() => {
                self.stop_trackers().await?;
                self.report_eager_restore();
                info!(%job, memory_bytes = self.memory_bytes, "final dump written here: the container's memory travels with its images");
                self.dump_here().await
            }
            Action::Dump
                if self.mode == MigrateMode::PreCopy && self.rounds.placement.is_some() =>
            {
                self.dump_lazy().await
            }
            Action::Dump if self.mode == MigrateMode::PreCopy => {
                self.report_eager_restore();
                self.dump_relayed().await
            }
            Action::Dump => self.dump_here().await,
            Action::Transfer => {
                if self.faults.pause_in_transfer_ms > 0 {
                    let pause = Duration::from_millis(self.faults.pause_in_transfer_ms);
                    warn!(%job, ms = self.faults.pause_in_transfer_ms, "pausing in transfer (fault hook)");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.job.cancel_notify.notified() => bail!("cancelled during the transfer"),
                    }
                }
                if self.job.cancel.load(Ordering::SeqCst) {
                    bail!("cancelled during the transfer");
                }
                let images = self.agent.images_dir(&job);
                let root = l.own_fs(&self.spec);
                let before = self.rootfs_snapshot.clone().unwrap_or_default();
                let t_snap = Instant::now();
                let ahead = match self.root_diff.take() {
                    Some(r) => r.result().await,
                    None => None,
                };
                let (img_diff, fs_diff, digest) =
                    tokio::task::spawn_blocking(move || -> Result<(Diff, Diff, String)> {
                        let img =
                            shared_fs::diff(&Snapshot::default(), &shared_fs::snapshot(&images)?);
                        let (diff, digest) = match ahead {
                            Some(d) => d,
                            None => root_diff(&root, &before)?,
                        };
                        Ok((img, diff, digest))
                    })
                    .await??;
                let req = PeerRequest::Images {
                    job: job.clone(),
                    corrupt: self.faults.corrupt_images,
                    corrupt_page: self.faults.corrupt_memory_page,
                    corrupt_rootfs: self.faults.corrupt_rootfs,
                    rootfs_digest: Some(digest.clone()),
                };
                self.rootfs_digest = Some(digest);
                let images = self.agent.images_dir(&job);
                let snap_ms = ferry_runtime::util::ms(t_snap.elapsed());
                let t_send = Instant::now();
                let (files, changes) = (
                    img_diff.changed.len(),
                    fs_diff.changed.len() + fs_diff.removed.len(),
                );
                // The answer is not waited for here: the restore request follows at once and
                // the destination restores once the images are in (`images_answer`).
                let (conn, to, own) = (self.conn().await?, self.to.clone(), l.own_fs(&self.spec));
                let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
                let answer = tokio::spawn(async move {
                    let trees = [
                        // Frozen: this diff is authoritative, any change under it fails.
                        Tree {
                            root: &images,
                            diff: &img_diff,
                            reads: Reads::Frozen,
                        },
                        Tree {
                            root: &own,
                            diff: &fs_diff,
                            reads: Reads::Frozen,
                        },
                    ];
                    let sent = request_trees_notify(&conn, &req, &trees, Some(sent_tx)).await?;
                    expect_ok(&to, sent.resp)?;
                    Ok::<_, anyhow::Error>((sent.bytes, ferry_runtime::util::ms(t_snap.elapsed())))
                });
                let bytes = match sent_rx.await {
                    Ok(bytes) => bytes,
                    // Not even written: the task's error says why.
                    Err(_) => {
                        return Err(match answer.await {
                            Ok(Err(e)) => e.context("sending the images"),
                            Ok(Ok(_)) => anyhow!("the images request ended without being sent"),
                            Err(e) => anyhow!("sending the images failed: {e}"),
                        })
                    }
                };
                self.images_answer = Some(answer);
                info!(%job, snapshot_ms = snap_ms, send_ms = ferry_runtime::util::ms(t_send.elapsed()),
                    image_files = files, rootfs_changes = changes, "images sent");
                Ok(bytes)
            }
            Action::Restore => {
                // The destination must hold every page and location before it restores.
                let sent = self.await_pending().await?;
                self.wait_dump_finishing().await?;
                let pause_ms = self.faults.pause_in_restore_ms;
                let limit = self.deadlines.restore();
                let images_answer = self.images_answer.take();
                let req = PeerRequest::Restore {
                    job,
                    pause_ms,
                    deadline_ms: limit.as_millis() as u64,
                    lazy: self.lazy_dumped,
                    after_images: images_answer.is_some(),
                    after_pages: self.relay_confirm.is_some(),
                };
                // The destination kills its restore at the deadline; an answer that does not
                // come shortly after is not waited for.
                let restored = tokio::time::timeout(
                    limit + self.deadlines.request(),
                    self.ask_dest(&req, &[]),
                )
                .await
                .map_err(|_| {
                    anyhow!(
                        "{} did not answer the restore within its deadline ({:.0} s)",
                        self.to,
                        limit.as_secs_f64()
                    )
                })
                .and_then(|r| r);
                // The images' round trip overlapped the restore's: one in the freeze for both.
                self.count_round_trips(1);
                let images = match images_answer {
                    None => Ok(None),
                    Some(answer) => {
                        // A restore that failed because the images never arrived says so: both
                        // requests share the connection, and its loss ends both at once.
                        let answered = if restored.is_ok() {
                            Some(answer.await)
                        } else {
                            tokio::time::timeout(Duration::from_millis(200), answer)
                                .await
                                .ok()
                        };
                        match answered {
                            Some(r) => r
                                .map_err(|e| anyhow!("the images request failed: {e}"))
                                .and_then(|r| r)
                                .map(|(_, ms)| Some(ms))
                                .with_context(|| format!("the images did not reach {}", self.to)),
                            // Still waiting: the restore's error is the one to report.
                            None => Ok(None),
                        }
                    }
                };
                // The relay's answers came before the restore's (one stream each, the same
                // connection); a restore that succeeded had the pages written.
                let relayed = match self.relay_confirm.take() {
                    Some(c) if restored.is_ok() => c
                        .await
                        .map_err(|e| anyhow!("reading the final dump's relay answers failed: {e}"))
                        .and_then(|r| r)
                        .context("the final dump's pages at the destination"),
                    _ => Ok(()),
                };
                match (restored, images, relayed) {
                    (Err(e), Ok(_), _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
                    (Ok(_), Ok(delivered), Ok(())) => {
                        self.images_delivered_ms = delivered;
                        Ok(sent)
                    }
                }
            }
            Action::Commit => {
                // The destination decides: it commits by recording the job (synced) before it
                // answers. Until the answer, this copy stays frozen in place; an answer that
                // it never committed (it timed out, restarted or aborted) rolls back here.
                if self.faults.pause_before_commit_ms > 0 {
                    warn!(%job, ms = self.faults.pause_before_commit_ms, "pausing before the commit (fault hook)");
                    tokio::time::sleep(Duration::from_millis(self.faults.pause_before_commit_ms))
                        .await;
                }
                // Recorded before the freeze (`Action::Dump`); here only if that was skipped.
                if !self.commit_may_be_sent {
                    self.record_phase(OutPhase::CommitSent).await?;
                }
                let mut wait = Duration::from_millis(100);
                let mut tries = 0u32;
                let waiting = self.agent.awaiting_commit(&job, &self.spec.name, &self.to);
                loop {
                    let answer = async {
                        let conn = self.conn().await?;
                        let commit = PeerRequest::Commit {
                            job: job.clone(),
                            recovered: false,
                        };
                        request(&conn, &commit, &[]).await
                    }
                    .await;
                    self.count_round_trips(1);
                    match answer {
                        Ok((PeerResponse::Ok { .. }, _)) => break,
                        Ok((PeerResponse::Aborted { .. }, _)) => bail!(
                            "{} never committed job {job} (its copy timed out, restarted or was aborted): the container runs on here",
                            self.to
                        ),
                        Ok((other, _)) => {
                            warn!(%job, answer = ?other, "unexpected answer to the commit; asking again")
                        }
                        Err(e) => {
                            tries += 1;
                            warn!(%job, tries, error = %format!("{e:#}"), hint = %waiting.hint(), "commit not confirmed; the container stays frozen here until the destination answers");
                            self.agent.forget_conn(&self.to).await;
                            self.conn = None;
                        }
                    }
                    match waiting.wait(wait).await {
                        Some(Resolution::Committed) => {
                            warn!(%job, "settled by hand as committed at {}", self.to);
                            break;
                        }
                        Some(Resolution::ResumeHere) => bail!(
                            "settled by hand: {} is taken as gone and never to run job {job}'s container; it runs on here",
                            self.to
                        ),
                        None => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Ok(0)
            }
            Action::CleanupSource => {
                if self.faults.pause_after_commit_ms > 0 {
                    warn!(%job, ms = self.faults.pause_after_commit_ms, "pausing after the commit (fault hook)");
                    tokio::time::sleep(Duration::from_millis(self.faults.pause_after_commit_ms))
                        .await;
                }
                let name = self.spec.name.clone();
                if self.lazy_dumped {
                    // The frozen copy stays until the destination has all its memory; if the
                    // fill fails, it runs on here.
                    self.wait_for_fill().await?;
                }
                self.agent
                    .remove_departed(&job, &name, self.mode == MigrateMode::PreCopy)
                    .await;
                // A lazy dump left its trackers; the processes are gone, so this is quick.
                self.stop_tracking_off_the_freeze().await;
                self.agent.forget_outgoing(&job);
                Ok(0)
            }
            Action::Rollback(plan) => self.rollback(*plan).await.map(|_| 0),
            Action::Finish => Ok(0),
            // Run by `copy_round`, which reports RoundDone.
            Action::CopyRound { .. } => bail!("a pre-copy round is not a plain phase"),
        }
    }

    /// Waits for the final dump's runc to have exited (see `dump_finishing`).
    async fn wait_dump_finishing(&mut self) -> Result<()> {
        if let Some(f) = self.dump_finishing.take() {
            tokio::task::spawn_blocking(move || f.wait())
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .context("the dump did not end cleanly")?;
        }
        Ok(())
    }

    /// Before an eager final dump: the pre-copy trackers removed (on a blocking thread) and
    /// the CPU throttle lifted: a container throttled hard (auto-converge) may not reach the
    /// freezer in time; it runs unthrottled for the few milliseconds until the freeze, whose
    /// dump reads every page anyway.
    async fn stop_trackers(&mut self) -> Result<()> {
        let mut rounds = std::mem::replace(&mut self.rounds, Rounds::new());
        let (stopped, rounds) = tokio::task::spawn_blocking(move || {
            let r = rounds.stop_tracking();
            (r, rounds)
        })
        .await?;
        self.rounds = rounds;
        stopped?;
        self.rounds.lift_throttle();
        Ok(())
    }

    /// The report's memory section of a pre-copy restored eagerly.
    fn report_eager_restore(&mut self) {
        self.memory = Some(migrate_core::MemoryReport {
            restore: "eager".into(),
            not_lazy: self.not_lazy.clone(),
            ..Default::default()
        });
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
                let r = tokio::task::spawn_blocking(move || {
                    runc.delete_force(&n);
                    runc.restore(&n, &l.bundle, &images, &work, false)
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
            let me = self.agent.cfg.host.clone();
            // The destination may be the unreachable one; every other host must follow.
            if let Err(e) = self
                .agent
                .route_everywhere(&self.spec.mac, Some(&me), Some(&self.to))
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

    /// Refuses, before anything moves, a checkpoint that cannot be written: a dump that carries
    /// every page (stop-and-copy, or pre-copy without a lazy restore) writes the container's
    /// memory as image files at the destination (`dest_free`: free bytes there), and
    /// stop-and-copy writes them here first. Image directories are usually a tmpfs, so they
    /// are bounded by memory, not by disk. Unknown sizes are not checked.
    async fn check_checkpoint_room(&mut self, dest_free: Option<u64>) -> Result<()> {
        let lazy = self.mode == MigrateMode::PreCopy && self.rounds.placement.is_some();
        if lazy || self.memory_bytes == 0 {
            return Ok(());
        }
        let need = self.memory_bytes + self.memory_bytes / 16 + (16 << 20);
        let hint = "free memory there, raise the images tmpfs (mount -o remount,size=…), or \
                    migrate with pre-copy and a lazy restore, which writes no page image";
        if let Some(free) = dest_free.filter(|f| *f < need) {
            bail!(
                "{} has {} MiB free for checkpoint images, container {:?} needs about {} MiB: {hint}",
                self.to,
                free >> 20,
                self.spec.name,
                need >> 20
            );
        }
        if self.mode != MigrateMode::PreCopy {
            let dir = self.agent.cfg.state_dir.join("images");
            let free = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                ferry_runtime::util::free_bytes(&dir)
            })
            .await??;
            if free < need {
                bail!(
                    "{} has {} MiB free for checkpoint images, container {:?} needs about {} MiB: {hint}",
                    self.agent.cfg.host,
                    free >> 20,
                    self.spec.name,
                    need >> 20
                );
            }
        }
        Ok(())
    }

    /// Counts request round trips to the destination while frozen (the report's, and the
    /// lazy restore's memory report).
    pub(super) fn count_round_trips(&mut self, n: u32) {
        self.frozen_round_trips += n;
        if let Some(m) = self.memory.as_mut().filter(|m| m.restore == "lazy") {
            m.frozen_round_trips += n;
        }
    }

    /// Whether a pre-copy's final dump is written here and sent with the images, as a
    /// stop-and-copy's is: an eager restore of a container with at most
    /// [`FINAL_DUMP_HERE_BYTES`] of memory, whose few pages cost less on the link than relaying
    /// them costs (CRIU's pages through the agent to a page server at the destination: 3-6 ms
    /// more dump on these machines, `ferry bench --quick`'s echo rows).
    pub(super) fn final_dump_here(&self) -> bool {
        self.mode == MigrateMode::PreCopy
            && self.rounds.placement.is_none()
            && self.memory_bytes > 0
            && self.memory_bytes <= FINAL_DUMP_HERE_BYTES
    }

    /// The dump's deadline, from the job's policy; a cancel kills it too.
    pub(super) fn dump_bound(&self) -> ferry_runtime::runc::Bound {
        ferry_runtime::runc::Bound::new(
            self.deadlines.dump(),
            "the dump deadline",
            Some(Arc::clone(&self.job.cancel)),
        )
    }

    /// The relay the final dump will use: the page-server socket and whether the dump is lazy
    /// (pre-copy), or none (stop-and-copy); as the dump actions choose.
    fn dump_relay(&self) -> Result<Option<(std::path::PathBuf, bool)>> {
        if self.mode != MigrateMode::PreCopy || self.final_dump_here() {
            return Ok(None);
        }
        let sock = self.agent.run_socket(&self.job.id, "ps")?;
        Ok(Some((sock, self.rounds.placement.is_some())))
    }

    /// Starts the final dump's `runc checkpoint` and waits until its CRIU waits at the gate
    /// (runc takes 10-15 ms to get there, which the freeze used to wait for). On failure the
    /// dump starts it again, and fails as it would.
    async fn start_dump_ahead(&mut self) {
        let relay = match self.dump_relay() {
            Ok(r) => r,
            Err(e) => {
                warn!(job = %self.job.id, error = %format!("{e:#}"), "runc checkpoint not started ahead");
                return;
            }
        };
        let Some((mut pre, ps)) = self.prestart_dump(relay.clone()).await else {
            return;
        };
        let bound = ferry_runtime::runc::Bound::new(
            GATE_REACH,
            "the start of runc checkpoint",
            Some(Arc::clone(&self.job.cancel)),
        );
        match tokio::task::spawn_blocking(move || {
            let r = pre.reach_gate(&bound);
            (pre, r)
        })
        .await
        {
            Ok((pre, Ok(()))) => {
                let eager = matches!(relay, Some((_, false)));
                self.dump_ahead = Some(((pre, ps), relay));
                if eager {
                    match self.open_dump_pages().await {
                        Ok(s) => self.dump_pages_stream = Some(s),
                        Err(e) => {
                            warn!(job = %self.job.id, error = %format!("{e:#}"), "the final dump's page stream not opened ahead: the dump opens it")
                        }
                    }
                }
            }
            Ok((_, Err(e))) => {
                warn!(job = %self.job.id, error = %format!("{e:#}"), "runc checkpoint did not get ready ahead: the dump starts it again")
            }
            Err(e) => warn!(job = %self.job.id, error = %e, "runc checkpoint not started ahead"),
        }
    }

    /// The `runc checkpoint` started at the redirect if it was started for `relay`, else one
    /// started now ([`Self::prestart_dump`]).
    pub(super) async fn dump_ahead_or_prestart(
        &mut self,
        relay: Option<(std::path::PathBuf, bool)>,
    ) -> Option<DumpAhead> {
        match self.dump_ahead.take() {
            Some((pre, r)) if r == relay => Some(pre),
            other => {
                // Started for another dump (or not at all): its gate closes.
                drop(other);
                self.prestart_dump(relay).await
            }
        }
    }

    /// Starts the final dump's `runc checkpoint` now, before the freeze, its CRIU held at a
    /// gate until [`ferry_runtime::runc::Prestarted::go`] (`relay`: the page-server socket and
    /// whether the dump is lazy, listened on first: CRIU connects to it before the gate). The
    /// images directory is emptied first and stays (runc holds it). `None`, with a warning, if
    /// it cannot start: the dump then starts runc itself, in the frozen window.
    pub(super) fn prestart_dump(
        &self,
        relay: Option<(std::path::PathBuf, bool)>,
    ) -> impl std::future::Future<Output = Option<DumpAhead>> + Send + 'static {
        let ready = self.agent.runc.has_criu_frontend();
        let job = self.job.id.clone();
        let runc = self.agent.runc.clone();
        let name = self.spec.name.clone();
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let gate = self.agent.run_socket(&job, "dump-gate");
        async move {
            if !ready {
                return None;
            }
            let r = tokio::task::spawn_blocking(move || {
                let gate = gate?;
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)?;
                std::fs::create_dir_all(&work)?;
                let ps = match &relay {
                    Some((sock, _)) => Some(listen_for_criu(sock)?),
                    None => None,
                };
                let relay = relay.as_ref().map(|(p, lazy)| (p.as_path(), *lazy));
                runc.prestart_checkpoint(&name, &images, &work, relay, &gate)
                    .map(|p| (p, ps))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
            match r {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(%job, error = %format!("{e:#}"), "runc checkpoint not started ahead: the dump starts it in the frozen window");
                    None
                }
            }
        }
    }

    /// After a failed final dump: the container runs on, on the network again.
    pub(super) fn resume_source(&mut self) {
        let l = self.agent.layout(&self.spec.name);
        if let Err(e) = ferry_runtime::netns::set_veth(&l, true) {
            warn!(error = %format!("{e:#}"), "the source container's veth could not be brought up again");
        } else {
            self.source_link_down = false;
        }
        ferry_runtime::freeze::thaw(&self.agent.cfg.host, &self.spec.name);
    }

    /// Stop-and-copy's dump (and a pre-copy's whose memory is tiny, `final_dump_here`): the
    /// container frozen, CRIU's images written here with every page, the container left in
    /// place, frozen, until the commit.
    async fn dump_here(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let pre = self.dump_ahead_or_prestart(None).await.map(|(p, _)| p);
        let bound = self.dump_bound();
        let runc = self.agent.runc.bounded(bound.clone());
        let name = self.spec.name.clone();
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let host = self.agent.cfg.host.clone();
        let (logs, job_id) = (self.agent.cfg.state_dir.join("logs"), job.clone());
        let layout = self.agent.layout(&self.spec.name);
        let runc_root = self.agent.runc.root().to_path_buf();
        let pause = self.faults.pause_in_dump_ms;
        let cancel = Arc::clone(&self.job.cancel);
        let root_start = self.root_diff_beside_dump();
        let dump_conf = self.dump_conf();
        self.source_link_down = true;
        let r = tokio::task::spawn_blocking(move || {
            if pre.is_none() {
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)?;
                std::fs::create_dir_all(&work)?;
            }
            let t = Instant::now();
            ferry_runtime::freeze::freeze_for_dump(&host, &name, &layout, &runc_root, &dump_conf())?;
            root_start.start();
            if pause > 0 {
                warn!(container = %name, ms = pause, "pausing in the dump (fault hook)");
                let until = Instant::now() + Duration::from_millis(pause);
                while Instant::now() < until {
                    if cancel.load(Ordering::SeqCst) {
                        bail!("cancelled during the dump");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let freeze_ms = ferry_runtime::util::ms(t.elapsed());
            let r = match pre {
                Some(p) => p.go_until_criu_done(bound).map(Some),
                None => runc.checkpoint(&name, &images, &work).map(|()| None),
            };
            info!(container = %name, freeze_ms, checkpoint_ms = ferry_runtime::util::ms(t.elapsed()) - freeze_ms, "dumped (left in place, frozen)");
            ferry_runtime::logs::keep_log_soon(r.is_ok(), work.join("dump.log"), logs, format!("{job_id}.dump.log"));
            r
        })
        .await?;
        if r.is_err() {
            // CRIU leaves a container it could not dump as it found it: frozen.
            self.resume_source();
        }
        self.dump_finishing = r?;
        Ok(0)
    }

    /// The root filesystem's diff for the final dump, to start once the container is frozen
    /// ([`RootStart::start`]); its result waits in `self.root_diff` for the images.
    /// Refuses a destination whose CPU lacks instruction-set flags this host's has, naming
    /// them, unless the request ignores CPU features (then the report warns).
    fn check_cpu_features(&mut self, destination: Option<Vec<String>>) -> Result<()> {
        let Some(destination) = destination else {
            warn!(to = %self.to, "the destination does not report its CPU features: not compared");
            return Ok(());
        };
        let here = ferry_runtime::cpu::host_isa_flags(&self.agent.cfg.hide_cpu_flags);
        let missing = ferry_runtime::cpu::missing(&here, &destination.into_iter().collect());
        if missing.is_empty() {
            return Ok(());
        }
        let what = format!(
            "{}'s CPU lacks instruction sets that {}'s has: {}",
            self.to,
            self.agent.cfg.host,
            missing.join(", ")
        );
        if self.ignore_cpu_features {
            self.warnings.push(format!(
                "{what}; moved anyway (ignore_cpu_features): a program that uses them dies with SIGILL"
            ));
            return Ok(());
        }
        bail!(
            "{what}. A process of container {:?} that uses them would die with SIGILL after the \
             move: choose a destination with these features, or ignore them (--ignore-cpu-features, \
             API ignore_cpu_features) if its programs do not use them",
            self.spec.name
        )
    }

    /// CRIU's configuration for the final dump, made right before the freeze: the agent's
    /// (`CRIU_CONF`) and the paths of the watched inodes (`inspect`), looked up for new watches
    /// while the container still runs.
    pub(super) fn dump_conf(&self) -> impl FnOnce() -> String + Send + 'static {
        let (host, name) = (self.agent.cfg.host.clone(), self.spec.name.clone());
        let watches = Arc::clone(&self.watch_paths);
        move || {
            let mut w = watches.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(pids) = ferry_runtime::cgroup_tree::container_pids(&host, &name) {
                w.update(&pids);
            }
            for u in &w.unresolved {
                tracing::warn!(
                    container = %name,
                    pid = u.pid,
                    fd = u.fd,
                    kind = u.kind,
                    inode = u.inode.ino,
                    "no path found for a watched inode beneath the container's root; CRIU must find it"
                );
            }
            format!("{}{}", super::CRIU_CONF, w.criu_conf())
        }
    }

    pub(super) fn root_diff_beside_dump(&mut self) -> RootStart {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.root_diff = Some(RootDiff(rx));
        RootStart {
            root: self.agent.layout(&self.spec.name).own_fs(&self.spec),
            before: self.rootfs_snapshot.clone().unwrap_or_default(),
            tx,
        }
    }

    /// Opens the stream of an eager final dump's pages: the destination starts its
    /// `criu page-server` on it at once, and relays into it what comes later.
    async fn open_dump_pages(&mut self) -> Result<(transfer::SendStream, transfer::RecvStream)> {
        let job = self.job.id.clone();
        let conn = self.conn().await?;
        let (mut send, recv) = conn.open().await?;
        // QUIC sends it at once: the destination sees the stream now.
        transfer::frame::write_msg(&mut send, &PeerRequest::DumpPages { job }).await?;
        Ok((send, recv))
    }

    /// Pre-copy's final dump: trackers removed, container frozen, CRIU's pages relayed to the
    /// destination's page server (pages it holds cross as references), the container left in
    /// place, frozen, until the commit.
    async fn dump_relayed(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let sock = self.agent.run_socket(&job, "ps")?;
        // Opened with the dump started ahead, else first: the destination starts its page
        // server while this side freezes.
        let (send, recv) = match self.dump_pages_stream.take() {
            Some(s) => s,
            None => self.open_dump_pages().await?,
        };
        let (pre, early) = match self
            .dump_ahead_or_prestart(Some((sock.clone(), false)))
            .await
        {
            Some((p, l)) => (Some(p), l),
            None => (None, None),
        };
        self.stop_trackers().await?;
        let known = std::mem::take(&mut *lock(&self.rounds.known));
        let fast = std::mem::take(&mut *lock(&self.rounds.fast));
        let listener = criu_listener(&sock, early)?;
        let bound = self.dump_bound();
        let (runc, name) = (
            self.agent.runc.bounded(bound.clone()),
            self.spec.name.clone(),
        );
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let host = self.agent.cfg.host.clone();
        let (logs, job_id) = (self.agent.cfg.state_dir.join("logs"), job.clone());
        let s = sock.clone();
        let layout = self.agent.layout(&self.spec.name);
        let runc_root = self.agent.runc.root().to_path_buf();
        let root_start = self.root_diff_beside_dump();
        let dump_conf = self.dump_conf();
        self.source_link_down = true;
        let mut ckpt = tokio::task::spawn_blocking(move || {
            if pre.is_none() {
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)?;
                std::fs::create_dir_all(&work)?;
            }
            let t = Instant::now();
            ferry_runtime::freeze::freeze_for_dump(
                &host,
                &name,
                &layout,
                &runc_root,
                &dump_conf(),
            )?;
            root_start.start();
            let freeze_ms = ferry_runtime::util::ms(t.elapsed());
            let r = match pre {
                Some(p) => p.go_until_criu_done(bound).map(Some),
                None => runc
                    .checkpoint_relayed(&name, &images, &work, &s, false)
                    .map(|()| None),
            };
            info!(container = %name, freeze_ms, checkpoint_ms = ferry_runtime::util::ms(t.elapsed()) - freeze_ms, "dumped (pages relayed)");
            ferry_runtime::logs::keep_log_soon(
                r.is_ok(),
                work.join("dump.log"),
                logs,
                format!("{job_id}.dump.log"),
            );
            r
        });
        let (criu, _) = tokio::select! {
            a = listener.accept() => {
                let _ = std::fs::remove_file(&sock);
                a.context("accepting CRIU's page-server connection")?
            }
            r = &mut ckpt => {
                let _ = std::fs::remove_file(&sock);
                self.resume_source();
                drop(r??);
                bail!("CRIU finished without connecting to the page-server socket");
            }
        };
        let mut known = known;
        let relay = precopy::relay::relay_out_pipelined(criu, send, recv, &mut known, &fast).await;
        drop(fast);
        let ck = ckpt.await?;
        // The container stays frozen in place: rollback thaws it, the commit removes it.
        match ck {
            Err(e) => {
                self.resume_source();
                return Err(e);
            }
            Ok(f) => self.dump_finishing = f,
        }
        let (stats, pending) = relay.context("relaying the final dump's pages")?;
        // CRIU waited for the destination's page server at each of these (none but a PARENT
        // query: OPEN2 and CLOSE are answered here).
        self.count_round_trips(u32::try_from(stats.round_trips).unwrap_or(u32::MAX));
        let mut answers = precopy::relay::RelayStats::default();
        self.relay_confirm = Some(tokio::spawn(async move {
            pending
                .confirm(&mut answers)
                .await
                .context("the destination's page server")
        }));
        info!(%job, pages = stats.pages, as_reference = stats.pages_as_reference,
            bytes = stats.link_bytes_written, relay_ms = ferry_runtime::util::ms(stats.elapsed), "final dump's pages relayed");
        Ok(stats.link_bytes_written)
    }
}

/// The root filesystem's changes since `before` and the digest of the root as it is now.
fn root_diff(root: &std::path::Path, before: &Snapshot) -> Result<(Diff, String)> {
    let mut now = shared_fs::snapshot(root)?;
    let diff = shared_fs::diff(before, &now);
    Ok((diff, ferry_runtime::bundle::root_digest(&mut now)))
}

/// What [`RootStart::start`] computes: the root's diff and digest, read beside CRIU's dump.
pub(super) struct RootDiff(tokio::sync::oneshot::Receiver<Result<(Diff, String)>>);

impl RootDiff {
    /// The result, or `None` if it failed or never started (the caller computes it then).
    pub(super) async fn result(self) -> Option<(Diff, String)> {
        match self.0.await {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "the root's diff beside the dump failed: computed again");
                None
            }
            Err(_) => None,
        }
    }
}

/// Starts the root filesystem's diff on a thread of its own. Called right after the freeze:
/// nothing writes into a frozen container's root (CRIU's dump writes its images elsewhere), so
/// the walk, which grows with the number of files the container wrote, runs beside CRIU
/// instead of after it.
pub(super) struct RootStart {
    root: std::path::PathBuf,
    before: Snapshot,
    tx: tokio::sync::oneshot::Sender<Result<(Diff, String)>>,
}

impl RootStart {
    pub(super) fn start(self) {
        let RootStart { root, before, tx } = self;
        let spawned = std::thread::Builder::new()
            .name("root-diff".into())
            .spawn(move || {
                let _ = tx.send(root_diff(&root, &before));
            });
        if let Err(e) = spawned {
            // The sender is gone with the closure: the images compute it.
            warn!(error = %e, "no thread for the root's diff beside the dump");
        }
    }
}

/// A `runc checkpoint` started ahead, with the page-server socket it was started for, already
/// listened on (CRIU connects before its gate opens).
pub(super) type DumpAhead = (
    ferry_runtime::runc::Prestarted,
    Option<std::os::unix::net::UnixListener>,
);

/// Listens on the page-server socket `sock` (replacing any earlier one) for CRIU's connection.
fn listen_for_criu(sock: &std::path::Path) -> Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(sock);
    let l = std::os::unix::net::UnixListener::bind(sock)
        .with_context(|| format!("listening on {}", sock.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The listener for CRIU's page-server connection: the one the dump started ahead listens on
/// (`early`), else a new one on `sock`.
pub(super) fn criu_listener(
    sock: &std::path::Path,
    early: Option<std::os::unix::net::UnixListener>,
) -> Result<tokio::net::UnixListener> {
    let l = match early {
        Some(l) => l,
        None => listen_for_criu(sock)?,
    };
    Ok(tokio::net::UnixListener::from_std(l)?)
}

/// How long a `runc checkpoint` started before the redirect may take to reach its CRIU gate.
const GATE_REACH: Duration = Duration::from_secs(10);

/// Most memory a pre-copy's container may have for its final dump to be written here
/// ([`Driver::final_dump_here`]): 64 pages, at most about 2 ms at 1 Gbit/s (less compressed).
const FINAL_DUMP_HERE_BYTES: u64 = 256 << 10;

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
    /// first, so that the container sends only what changed if it comes back.
    pub(crate) async fn remove_departed(self: &Arc<Self>, job: &str, name: &str, keep_pages: bool) {
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
