//! How an incoming migration ends: committed, aborted, expired, or settled after a restart.

use crate::incoming::announce;
use crate::incoming::Record;
use crate::proto::PeerResponse;
use crate::proto::{refuse, ErrorCode};
use crate::{lock, Agent, ContainerRecord};
use anyhow::{Context, Result};
use ferry_api::ContainerSpec;
use ferry_runtime::layout::Layout;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// What an incoming job left on this host, to remove (blocking: runc, namespaces, files).
pub(super) struct Leftovers {
    runc: ferry_runtime::runc::Runc,
    name: String,
    layout: Layout,
    dirs: [std::path::PathBuf; 3],
    record: std::path::PathBuf,
}

impl Leftovers {
    pub(crate) fn remove(self) {
        ferry_runtime::netns::delete_netns(&self.layout);
        self.runc.delete_force(&self.name);
        ferry_runtime::bundle::remove_bundle(&self.layout);
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

impl Agent {
    pub(crate) async fn commit_incoming(
        self: &Arc<Self>,
        peer: &str,
        job: &str,
        recovered: bool,
    ) -> Result<PeerResponse> {
        let mut incoming = self.incoming.lock().await;
        let mut abort_now = false;
        if let Some(i) = incoming.get(job) {
            if i.from != peer {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("job {job} belongs to {}, not {peer}", i.from),
                ));
            }
            if i.abort.load(std::sync::atomic::Ordering::SeqCst) {
                // Aborted during its restore (its source's connection ended, or an abort):
                // the watchdog removes it; it is never committed.
                return Ok(PeerResponse::Aborted {
                    job: job.to_string(),
                });
            }
            if !i.restored && !recovered {
                return Err(refuse(
                    ErrorCode::Conflict,
                    format!("job {job}: container {:?} is not restored yet", i.spec.name),
                ));
            }
            // Its source restarted and cannot know how far the job got: a copy not restored
            // by now is never committed.
            abort_now = !i.restored;
        }
        if abort_now {
            drop(incoming);
            self.abort_incoming(job, "its source restarted before the restore had ended")
                .await;
            return Ok(PeerResponse::Aborted {
                job: job.to_string(),
            });
        }
        // runc's own end after CRIU's success, usually over by now: no commit before it.
        if let Some(f) = incoming.get_mut(job).and_then(|i| i.finishing.take()) {
            let ended = tokio::task::spawn_blocking(move || f.wait())
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .with_context(|| format!("job {job}: the restore did not end cleanly"));
            if let Err(e) = ended {
                // Never committed: the copy here goes, and a retried commit is told so.
                drop(incoming);
                self.abort_incoming(job, &format!("{e:#}")).await;
                return Err(e);
            }
        }
        let Some(mut inc) = incoming.remove(job) else {
            drop(incoming);
            // A retried commit whose first answer was lost: the job is already ours. A job
            // this host does not know was never committed here (presumed abort).
            if self.was_committed(job) {
                return Ok(PeerResponse::Ok { bytes: 0 });
            }
            return Ok(PeerResponse::Aborted {
                job: job.to_string(),
            });
        };
        // With etcd, the commit point is the transaction that moves the container's record
        // here, only if it is still at the revision the source read (its fencing token): a
        // copy whose ownership did not move never runs. An outcome etcd cannot tell yet
        // keeps the job (the source asks again); a refusal aborts it.
        if let Err(e) = self.commit_in_etcd(job, &inc.spec, inc.fence).await {
            if e.is_unavailable() {
                incoming.insert(job.to_string(), inc);
                return Err(anyhow::Error::new(e).context(format!(
                    "job {job}: the container's ownership could not be moved in etcd yet"
                )));
            }
            warn!(%job, error = %e, "ownership not moved in etcd: the copy here is never run");
            incoming.insert(job.to_string(), inc);
            drop(incoming);
            self.abort_incoming(job, &format!("{e}")).await;
            return Ok(PeerResponse::Aborted {
                job: job.to_string(),
            });
        }
        // The commit point: recorded (synced) before anything else, under the lock that keeps
        // the watchdog and aborts away from this job.
        if let Err(e) = self.record_committed(job, &inc.from, &inc.spec.name) {
            incoming.insert(job.to_string(), inc);
            return Err(e);
        }
        drop(incoming);
        if let Some(hold) = inc.hold.take() {
            // Past the commit point the container is ours whatever happens to the hold.
            match tokio::task::spawn_blocking(move || hold.release_now()).await {
                Ok(Ok(released)) => info!(%job, released, "held packets released"),
                Ok(Err(e)) => {
                    warn!(%job, error = %e, "releasing held packets failed; TCP peers retransmit")
                }
                Err(e) => {
                    warn!(%job, error = %e, "releasing held packets failed; TCP peers retransmit")
                }
            }
        }
        // Listed here at once; written to disk after the answer (the commit record above makes
        // a restart adopt it anyway: `finish_recorded_commit`).
        self.adopt_in_memory(job, &inc.spec);
        // The container list's fsync, the gratuitous ARP, the page store's grant and the
        // images (as large as the container's memory) are not on the way of the commit's
        // answer, which ends the source's count of the frozen time. A lazy restore still
        // filling in needs the images: its end removes them.
        let (agent, job_id, filling) = (Arc::clone(self), job.to_string(), inc.filling);
        let (netns, spec) = (inc.layout.netns.clone(), inc.spec.clone());
        tokio::spawn(async move {
            let a = Arc::clone(&agent);
            let j = job_id.clone();
            let _ = tokio::task::spawn_blocking(move || a.adopt_on_disk(&j)).await;
            announce(&netns, &spec);
            if !filling {
                agent.release_store(&job_id).await;
                let (images, work) = (agent.images_dir(&job_id), agent.work_dir(&job_id));
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_dir_all(images);
                    let _ = std::fs::remove_dir_all(work);
                })
                .await;
            }
        });
        info!(%job, container = %inc.spec.name, "migration committed: container owned here");
        Ok(PeerResponse::Ok { bytes: 0 })
    }

    /// The peer that prepared incoming job `job`, if it is here.
    pub(crate) async fn incoming_owner(&self, job: &str) -> Option<String> {
        self.incoming.lock().await.get(job).map(|i| i.from.clone())
    }

    /// Removes everything job `job` created here.
    pub(crate) async fn abort_incoming(&self, job: &str, why: &str) {
        let inc = {
            let mut incoming = self.incoming.lock().await;
            match incoming.get_mut(job) {
                // Never pull the namespace from under a running restore: expire the job now and
                // let the watchdog abort it once the restore has finished.
                Some(i) if i.restoring => {
                    i.deadline = Instant::now();
                    i.abort.store(true, std::sync::atomic::Ordering::SeqCst);
                    warn!(%job, reason = why, "abort deferred until the running restore ends");
                    None
                }
                _ => incoming.remove(job),
            }
        };
        if let Some(mut inc) = inc {
            self.release_store(job).await;
            lock(&self.incoming_bases).remove(job);
            warn!(%job, container = %inc.spec.name, reason = why, "aborting incoming migration");
            let hold = inc.hold.take();
            let prestarted = inc.prestarted.take();
            let finishing = inc.finishing.take();
            let name = inc.spec.name.clone();
            let layout = inc.layout.clone();
            let this = (
                self.runc.clone(),
                self.images_dir(job),
                self.work_dir(job),
                self.incoming_record(job),
                self.log_dir(&name),
            );
            let _ = tokio::task::spawn_blocking(move || {
                let (runc, images, work, rec, console) = this;
                // A runc started ahead ends first (it fails at its closed gate).
                if let Some((_, p)) = prestarted {
                    p.cancel();
                }
                if let Some(f) = finishing {
                    let _ = f.wait();
                }
                // Network first: a restored copy that is killed must not send FIN or RST to
                // peers that now talk to the source again.
                ferry_runtime::netns::delete_netns(&layout);
                runc.delete_force(&name);
                if let Some(h) = hold {
                    let _ = h.discard();
                }
                ferry_runtime::bundle::remove_bundle(&layout);
                let _ = std::fs::remove_dir_all(images);
                let _ = std::fs::remove_dir_all(work);
                let _ = std::fs::remove_file(rec);
                // The copy never ran here: its output (if any) is the source's.
                let _ = std::fs::remove_dir_all(console);
            })
            .await;
        }
    }

    pub(crate) async fn abort_incoming_of_conn(&self, conn_id: usize) {
        let jobs: Vec<String> = self
            .incoming
            .lock()
            .await
            .iter()
            // A restored job waits for its commit until its deadline: the source retries the
            // commit on a new connection.
            .filter(|(_, i)| i.conn_id == conn_id && !i.restored)
            .map(|(j, _)| j.clone())
            .collect();
        for j in jobs {
            self.abort_incoming(&j, "connection to the source lost")
                .await;
        }
    }

    /// At start: removes what incoming jobs of a previous run left behind.
    pub(crate) async fn clean_stale_incoming(&self) {
        // A packet hold belongs to an incoming job only: a queue rule left in the namespace of
        // a container this host owns (its releaser died with the previous run) drops packets.
        let owned: Vec<String> = lock(&self.containers)
            .values()
            .map(|c| self.layout(&c.spec.name).netns)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for netns in owned {
                let _ = ferry_net::hold::remove_rule(&netns, 0);
            }
        })
        .await;
        let dir = self.cfg.state_dir.join("incoming");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(rec) = std::fs::read(e.path())
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Record>(&b)?))
            else {
                let _ = std::fs::remove_file(e.path());
                continue;
            };
            if self.was_committed(&rec.job) {
                self.finish_recorded_commit(rec).await;
                continue;
            }
            warn!(job = %rec.job, container = %rec.spec.name, "removing leftovers of an interrupted incoming migration");
            let undo = self.leftovers(&rec.job, self.layout(&rec.spec.name), &rec.spec.name);
            let _ = tokio::task::spawn_blocking(move || undo.remove()).await;
        }
        self.sweep_incoming_scratch();
    }

    /// At start: images and work files of incoming jobs (ids of other hosts' jobs) that no
    /// record names any more: a job adopted just before the previous run died had not
    /// removed them yet. This host's own jobs' images stay (a failed rollback keeps them for a
    /// restore by hand).
    fn sweep_incoming_scratch(&self) {
        let own = format!("{}-", self.cfg.host);
        for sub in ["images", "work"] {
            let Ok(rd) = std::fs::read_dir(self.cfg.state_dir.join(sub)) else {
                continue;
            };
            for e in rd.flatten() {
                let job = e.file_name().to_string_lossy().into_owned();
                if job.starts_with(&own) || self.incoming_record(&job).exists() {
                    continue;
                }
                info!(%job, dir = sub, "removing what an incoming job left");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// At start: an incoming job that committed before this agent died owns its container;
    /// finishes what the commit had left (the packet hold's rule, the announcement, the
    /// container record).
    pub(super) async fn finish_recorded_commit(&self, rec: Record) {
        let layout = self.layout(&rec.spec.name);
        let (runc, name) = (self.runc.clone(), rec.spec.name.clone());
        let running = tokio::task::spawn_blocking(move || runc.state(&name))
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.status == "running");
        warn!(job = %rec.job, container = %rec.spec.name, running, "finishing a commit recorded before a restart");
        let (netns, spec) = (layout.netns.clone(), rec.spec.clone());
        let _ = tokio::task::spawn_blocking(move || {
            // The dead agent's hold left its queue rule: without a reader it drops every packet.
            if let Err(e) = ferry_net::hold::remove_rule(&netns, 0) {
                warn!(netns = %netns, error = %e, "removing a packet hold's rule left by a restart");
            }
            announce(&netns, &spec);
        })
        .await;
        self.adopt(&rec.job, &rec.spec);
        let _ = std::fs::remove_dir_all(self.images_dir(&rec.job));
        let _ = std::fs::remove_dir_all(self.work_dir(&rec.job));
    }

    /// A committed incoming job's container is owned here from now on: recorded (its record
    /// keeps its base from gc), the job's own records dropped.
    pub(crate) fn adopt(&self, job: &str, spec: &ContainerSpec) {
        self.adopt_in_memory(job, spec);
        self.adopt_on_disk(job);
    }

    /// [`Self::adopt`]'s part in memory: the container is listed here.
    pub(crate) fn adopt_in_memory(&self, job: &str, spec: &ContainerSpec) {
        lock(&self.containers).insert(
            spec.name.clone(),
            ContainerRecord {
                spec: spec.clone(),
                migrating: false,
            },
        );
        lock(&self.incoming_bases).remove(job);
        self.publish_kick.notify_one();
    }

    /// [`Self::adopt`]'s part on disk: the container list saved, then the job's record dropped.
    pub(crate) fn adopt_on_disk(&self, job: &str) {
        self.save_containers();
        let _ = std::fs::remove_file(self.incoming_record(job));
    }

    pub(super) fn leftovers(&self, job: &str, layout: Layout, name: &str) -> Leftovers {
        Leftovers {
            runc: self.runc.clone(),
            name: name.to_string(),
            layout,
            // The container's output here: it never ran here.
            dirs: [self.images_dir(job), self.work_dir(job), self.log_dir(name)],
            record: self.incoming_record(job),
        }
    }
}
