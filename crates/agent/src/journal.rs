//! Durable records of migrations in flight, so that an agent that dies and comes back resolves
//! every unfinished job and never loses the container it was moving.
//!
//! The protocol is a two-phase commit with presumed abort, decided at the destination:
//! - the source keeps its container frozen in place from the dump until it knows the outcome;
//! - the destination commits by writing `<state>/committed/<job>` (synced) before it answers
//!   `Commit`; that file is the commit point. Before it, the destination may drop its copy at
//!   any time (a timeout, a restart, an abort), and a job it does not know was never committed;
//! - the source writes `<state>/outgoing/<job>.json` (synced) when the job starts
//!   ([`OutPhase::Started`]) and again right before it freezes the container for the final
//!   dump ([`OutPhase::CommitSent`]: from then on a `Commit` may go out; written there rather
//!   than right before the `Commit`, so that no write to disk of the source's is in the frozen
//!   window). A rollback records `Started` again before it thaws the container.
//!
//! At start the source resolves every record: a job that never sent `Commit` rolls back (thaw,
//! network up, routes back, throttle lifted, destination told to abort): a `Started` record,
//! or a `CommitSent` one whose container runs thawed (a commit goes out only while it is
//! frozen). Any other job asks the destination until it answers: committed (the source removes
//! its frozen copy) or not (the source thaws it); a destination asked for a job it restored
//! commits it then, unless the job was aborted there. The destination finishes the commits it
//! recorded and removes every other incoming job's leftovers.
//!
//! A destination that never comes back cannot answer: the container stays frozen at the
//! source until an operator settles the job by hand (`ferry resolve JOB --resume-here` or
//! `--committed`, [`Agent::resolve_by_hand`]), live or after a restart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_api::{Resolution, ResolveAnswer};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::{lock, Agent};
use crate::proto::{PeerRequest, PeerResponse};

/// Committed job ids kept (oldest forgotten first): enough for any retried commit.
const COMMITTED_KEPT: usize = 1024;

/// Writes `data` to `path` so that after a crash either the old or the new content is there,
/// complete: a temporary file in the same directory (mode 0600), synced, renamed over `path`,
/// and the directory synced.
pub(crate) fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// How far an outgoing job got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutPhase {
    /// Started; `Commit` not sent: recovery rolls back.
    Started,
    /// The container was about to be frozen, and `Commit` may have reached the destination:
    /// recovery asks it for the outcome (unless the container runs thawed).
    CommitSent,
}

/// The source's record of one outgoing job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Outgoing {
    pub(crate) job: String,
    pub(crate) name: String,
    pub(crate) to: String,
    pub(crate) phase: OutPhase,
}

/// A job waiting for its destination's answer about the commit, which an operator may
/// settle by hand.
pub(crate) struct Unresolved {
    pub(crate) name: String,
    pub(crate) to: String,
    decision: Mutex<Option<Resolution>>,
    notify: tokio::sync::Notify,
}

/// Registers a job as waiting for its destination ([`Agent::awaiting_commit`]); removes it
/// when dropped.
pub(crate) struct AwaitingCommit {
    agent: Arc<Agent>,
    job: String,
    u: Arc<Unresolved>,
}

impl AwaitingCommit {
    /// Waits up to `d`, or until an operator settles the job; returns their decision, if any.
    pub(crate) async fn wait(&self, d: Duration) -> Option<Resolution> {
        if let Some(r) = *lock(&self.u.decision) {
            return Some(r);
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.u.notify.notified() => {}
        }
        *lock(&self.u.decision)
    }

    /// What the operator's log line says to do if the destination never comes back.
    pub(crate) fn hint(&self) -> String {
        format!(
            "if {} is gone for good, `ferry resolve {} --resume-here` runs the container on here \
             (or `--committed` if it runs there)",
            self.u.to, self.job
        )
    }
}

impl Drop for AwaitingCommit {
    fn drop(&mut self) {
        lock(&self.agent.unresolved).remove(&self.job);
    }
}

impl Agent {
    /// Registers `job` (container `name`, destination `to`) as waiting for its destination's
    /// answer about the commit, until the returned guard is dropped.
    pub(crate) fn awaiting_commit(
        self: &Arc<Self>,
        job: &str,
        name: &str,
        to: &str,
    ) -> AwaitingCommit {
        let u = Arc::new(Unresolved {
            name: name.to_string(),
            to: to.to_string(),
            decision: Mutex::new(None),
            notify: tokio::sync::Notify::new(),
        });
        lock(&self.unresolved).insert(job.to_string(), Arc::clone(&u));
        AwaitingCommit {
            agent: Arc::clone(self),
            job: job.to_string(),
            u,
        }
    }

    /// Settles a job waiting for its destination by hand; `None` if no such job waits here.
    pub(crate) fn resolve_by_hand(&self, job: &str, outcome: Resolution) -> Option<ResolveAnswer> {
        let u = lock(&self.unresolved).get(job).cloned()?;
        *lock(&u.decision) = Some(outcome);
        u.notify.notify_one();
        warn!(%job, container = %u.name, to = %u.to, ?outcome, "job settled by hand");
        Some(ResolveAnswer {
            job: job.to_string(),
            container: u.name.clone(),
            destination: u.to.clone(),
            outcome,
        })
    }

    fn outgoing_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("outgoing")
    }

    fn committed_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("committed")
    }

    /// Records (synced) how far outgoing job `rec.job` got.
    pub(crate) fn journal_outgoing(&self, rec: &Outgoing) -> Result<()> {
        let path = self.outgoing_dir().join(format!("{}.json", rec.job));
        write_durable(&path, &serde_json::to_vec_pretty(rec)?)
            .with_context(|| format!("recording job {} in {}", rec.job, path.display()))
    }

    /// Forgets outgoing job `job` (resolved).
    pub(crate) fn forget_outgoing(&self, job: &str) {
        let _ = std::fs::remove_file(self.outgoing_dir().join(format!("{job}.json")));
    }

    /// Destination: records (synced) that incoming job `job`, which brought container `name`
    /// from peer `from`, is committed here. This is the commit point of a migration. Keeps the
    /// newest [`COMMITTED_KEPT`] records.
    pub(crate) fn record_committed(&self, job: &str, from: &str, name: &str) -> Result<()> {
        let dir = self.committed_dir();
        write_durable(
            &dir.join(job),
            format!("committed\n{from}\n{name}\n").as_bytes(),
        )
        .with_context(|| format!("recording the commit of job {job} in {}", dir.display()))?;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let mut all: Vec<(std::time::SystemTime, PathBuf)> = rd
                .flatten()
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
            if all.len() > COMMITTED_KEPT {
                all.sort();
                for (_, p) in &all[..all.len() - COMMITTED_KEPT] {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok(())
    }

    /// Destination: the peer and the container of incoming job `job`, if it was committed here
    /// (and recorded them).
    pub(crate) fn committed_move(&self, job: &str) -> Option<(String, String)> {
        if !super::incoming::valid_job(job) {
            return None;
        }
        let rec = std::fs::read_to_string(self.committed_dir().join(job)).ok()?;
        let mut lines = rec.lines();
        (lines.next()? == "committed").then_some(())?;
        Some((lines.next()?.to_string(), lines.next()?.to_string()))
    }

    /// Destination: whether incoming job `job` was committed here.
    pub(crate) fn was_committed(&self, job: &str) -> bool {
        super::incoming::valid_job(job) && self.committed_dir().join(job).is_file()
    }

    /// At start, before serving: no job runs any more, so no container is migrating; outgoing
    /// jobs are resolved (see the module's documentation), in the background for those that
    /// must wait for their destination.
    pub(crate) async fn recover_outgoing(self: &Arc<Self>) {
        {
            let mut cs = lock(&self.containers);
            for rec in cs.values_mut() {
                rec.migrating = false;
            }
        }
        let Ok(rd) = std::fs::read_dir(self.outgoing_dir()) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let rec: Outgoing = match std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice(&b)?))
            {
                Ok(r) => r,
                Err(e) => {
                    // Written atomically: a damaged record is not ours to guess about.
                    error!(path = %path.display(), error = %format!("{e:#}"), "unreadable outgoing job record: left in place for inspection");
                    continue;
                }
            };
            if let Some(c) = lock(&self.containers).get_mut(&rec.name) {
                c.migrating = true;
            }
            match rec.phase {
                OutPhase::Started => {
                    warn!(job = %rec.job, container = %rec.name, to = %rec.to,
                        "an interrupted migration never sent its commit: rolling back");
                    self.roll_back_outgoing(&rec).await;
                }
                OutPhase::CommitSent
                    if ferry_runtime::freeze::runs_thawed(&self.cfg.host, &rec.name) =>
                {
                    // Recorded before the freeze; a commit goes out only while the container
                    // is frozen, and only a rollback (which records `Started` first) thaws it.
                    warn!(job = %rec.job, container = %rec.name, to = %rec.to,
                        "an interrupted migration never froze its container: rolling back");
                    self.roll_back_outgoing(&rec).await;
                }
                OutPhase::CommitSent => {
                    warn!(job = %rec.job, container = %rec.name, to = %rec.to,
                        "an interrupted migration may have sent its commit: asking the destination for the outcome");
                    let agent = Arc::clone(self);
                    tokio::spawn(async move { agent.resolve_commit(rec).await });
                }
            }
        }
        self.save_containers();
    }

    /// Asks the destination whether `rec.job` committed until it answers, then removes the
    /// frozen copy here (committed) or thaws it (not committed). The container stays frozen
    /// meanwhile: two running copies would be worse than a longer freeze.
    async fn resolve_commit(self: Arc<Self>, rec: Outgoing) {
        let req = PeerRequest::Commit {
            job: rec.job.clone(),
            recovered: true,
        };
        let mut wait = Duration::from_millis(200);
        let waiting = self.awaiting_commit(&rec.job, &rec.name, &rec.to);
        loop {
            match self.ask(&rec.to, &req).await {
                Ok(PeerResponse::Ok { .. }) => {
                    info!(job = %rec.job, container = %rec.name, to = %rec.to,
                        "the destination committed: removing the frozen copy here");
                    self.remove_departed(&rec.job, &rec.name, &rec.to, false)
                        .await;
                    self.forget_outgoing(&rec.job);
                    return;
                }
                Ok(PeerResponse::Aborted { .. }) => {
                    info!(job = %rec.job, container = %rec.name, to = %rec.to,
                        "the destination never committed: the container runs on here");
                    self.roll_back_outgoing(&rec).await;
                    return;
                }
                Ok(other) => {
                    warn!(job = %rec.job, answer = ?other, "unexpected answer about a commit; asking again")
                }
                Err(e) => {
                    warn!(job = %rec.job, to = %rec.to, error = %format!("{e:#}"), hint = %waiting.hint(),
                        "destination unreachable: the container stays frozen here until it answers")
                }
            }
            match waiting.wait(wait).await {
                Some(Resolution::Committed) => {
                    info!(job = %rec.job, container = %rec.name, "settled by hand as committed: removing the frozen copy here");
                    self.remove_departed(&rec.job, &rec.name, &rec.to, false)
                        .await;
                    self.forget_outgoing(&rec.job);
                    return;
                }
                Some(Resolution::ResumeHere) => {
                    info!(job = %rec.job, container = %rec.name, "settled by hand: the container runs on here");
                    self.roll_back_outgoing(&rec).await;
                    return;
                }
                None => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Undoes everything an outgoing job may have done before its commit (each step is
    /// harmless if it had not happened): network up, thawed, CPU throttle lifted, overlay routes
    /// back here, destination told to abort, images removed. Then forgets the job.
    pub(crate) async fn roll_back_outgoing(&self, rec: &Outgoing) {
        let l = self.layout(&rec.name);
        let (host, name) = (self.cfg.host.clone(), rec.name.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = ferry_runtime::netns::set_veth(&l, true) {
                warn!(container = %name, error = %format!("{e:#}"), "bringing the container's network up");
            }
            if let Ok(mut t) = ferry_runtime::throttle::CpuThrottle::new(&host, &name) {
                let _ = t.lift();
            }
            ferry_runtime::freeze::thaw(&host, &name);
        })
        .await;
        let mac = lock(&self.containers)
            .get(&rec.name)
            .map(|c| c.spec.mac.clone());
        if let Some(mac) = mac {
            if let Err(e) = self.route_back_here(&rec.name, &mac, None).await {
                warn!(job = %rec.job, error = %format!("{e:#}"), "pointing the overlay back here");
            }
        }
        let abort = PeerRequest::Abort {
            job: rec.job.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(3), self.ask(&rec.to, &abort)).await {
            Ok(Ok(_)) => {}
            _ => {
                warn!(job = %rec.job, to = %rec.to, "destination not told to abort; it removes the job on its own")
            }
        }
        let _ = std::fs::remove_dir_all(self.images_dir(&rec.job));
        let _ = std::fs::remove_dir_all(self.work_dir(&rec.job));
        if let Some(c) = lock(&self.containers).get_mut(&rec.name) {
            c.migrating = false;
        }
        self.save_containers();
        self.forget_outgoing(&rec.job);
        info!(job = %rec.job, container = %rec.name, "rolled back: the container runs here");
    }
}
