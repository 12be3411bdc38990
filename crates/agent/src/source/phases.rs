//! The source's phases: one method of [`Driver`] per action of the state machine that is a
//! phase of its own (`Driver::execute` dispatches to them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::{MigrateMode, Resolution};
use shared_fs::{Diff, Snapshot};
use tracing::{info, warn};
use transfer::tree::Reads;

use super::dump::root_diff;
use super::{dir_size, Driver, EAGER_MAX_PROCESSES};
use crate::journal::OutPhase;
use crate::peer::{expect_ok, request, request_trees, request_trees_notify, retry_pause, Tree};
use crate::proto::{PeerError, PeerRequest, PeerResponse, PROTO_VERSION};

impl Driver {
    /// Preflight: the container runs and holds nothing CRIU cannot move; the destination has room,
    /// the CPU features and what a lazy restore needs.
    pub(super) async fn preflight(&mut self) -> Result<u64> {
        let _job = self.job.id.clone();
        // An orchestrator's hook may veto the migration before anything moves.
        let host = self.agent.cfg.host.clone();
        let w = crate::hooks::call(
            &self.hooks,
            ferry_api::HookEvent::PreMigrate,
            &host,
            &self.job.info(),
        )
        .await?;
        self.warnings.extend(w);
        // The cluster must say this host owns the container; its record's revision now is
        // what every later step of the move requires unchanged.
        self.fence = self.agent.fence_of(&self.spec).await?;
        let l = self.agent.layout(&self.spec.name);
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
        let mut attempt = 0;
        let (resp, bytes) = loop {
            let (resp, bytes) = match async { request(&self.conn().await?, &req, &[]).await }.await
            {
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
            // Decided from the answer's code: a busy destination is asked again.
            attempt += 1;
            match (&resp, retry_pause(attempt)) {
                (
                    PeerResponse::Error {
                        retryable: true,
                        message,
                        ..
                    },
                    Some(pause),
                ) => {
                    warn!(job = %self.job.id, attempt, pause_ms = pause.as_millis() as u64, error = %message, "the destination is busy; preflight again");
                    tokio::time::sleep(pause).await;
                }
                _ => break (resp, bytes),
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

    /// Prepare: the image's base missing at the destination, then the container's own layer, sent
    /// while it runs.
    pub(super) async fn prepare(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let l = self.agent.layout(&self.spec.name);
        // From an image: the destination gets the base's missing chunks first, then
        // only the container's own layer.
        let mut base_bytes = 0;
        if let Some(image) = self.spec.image.clone() {
            let conn = self.conn().await?;
            let mut attempt = 0;
            let base = loop {
                attempt += 1;
                match self.agent.send_base(&conn, &image).await {
                    // Decided from the answer's code: a busy destination is asked again.
                    Err(e) if PeerError::of(&e).is_some_and(|p| p.retryable) => {
                        let Some(pause) = retry_pause(attempt) else {
                            return Err(e);
                        };
                        warn!(job = %self.job.id, attempt, pause_ms = pause.as_millis() as u64, error = %format!("{e:#}"), "the destination is busy; sending the base again");
                        tokio::time::sleep(pause).await;
                    }
                    r => break r?,
                }
            };
            base_bytes = base.bytes_sent;
            self.base = Some(base);
        }
        let own = l.own_fs(&self.spec);
        let root = own.clone();
        let snap = tokio::task::spawn_blocking(move || shared_fs::snapshot(&root)).await??;
        let full = shared_fs::diff(&Snapshot::default(), &snap);
        let (runc, name) = (self.agent.runc.clone(), self.spec.name.clone());
        self.stdio = tokio::task::spawn_blocking(move || {
            let pid = runc.state(&name)?.pid as i32;
            Some((pid, ferry_runtime::console::descriptors(pid).ok()?))
        })
        .await?;
        let req = PeerRequest::Prepare {
            job: job.clone(),
            spec: Box::new(self.spec.clone()),
            memory_bytes: if self.mode == MigrateMode::PreCopy {
                self.memory_bytes
            } else {
                0
            },
            restore_lazily: self.mode == MigrateMode::PreCopy && self.rounds.placement.is_some(),
            descriptors: self.stdio.as_ref().map(|(_, d)| d.clone()),
            fence: self.fence,
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

    /// Redirect: the container's packets wait at the destination from now on.
    pub(super) async fn redirect(&mut self) -> Result<u64> {
        // runc checkpoint gets ready first: from the redirect on, the container's
        // packets wait at the destination.
        self.start_dump_ahead().await;
        let t = std::time::Instant::now();
        let via = match self.fence {
            Some(fence) => {
                self.agent
                    .switch_route(&self.spec.name, fence, &self.spec.mac, &self.to)
                    .await?;
                "etcd"
            }
            None => {
                self.agent
                    .route_everywhere(&self.spec.mac, Some(&self.to), None)
                    .await?;
                "direct"
            }
        };
        self.route_switch = Some((via, t.elapsed().as_secs_f64() * 1000.0));
        Ok(0)
    }

    /// Dump: the container frozen and checkpointed, its memory written here, relayed to the
    /// destination's page store, or left for a lazy restore.
    pub(super) async fn dump(&mut self) -> Result<u64> {
        if self.final_dump_here() {
            self.stop_trackers().await?;
            self.report_eager_restore();
            info!(job = %self.job.id, memory_bytes = self.memory_bytes, "final dump written here: the container's memory travels with its images");
            return self.dump_here().await;
        }
        if self.mode == MigrateMode::PreCopy && self.rounds.placement.is_some() {
            return self.dump_lazy().await;
        }
        if self.mode == MigrateMode::PreCopy {
            self.report_eager_restore();
            return self.dump_relayed().await;
        }
        self.dump_here().await
    }

    /// Transfer: the images and the root filesystem's last diff, sent while frozen; the answer is
    /// awaited by the restore.
    pub(super) async fn transfer(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let l = self.agent.layout(&self.spec.name);
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
        let stdio = self.stdio.clone();
        let (img_diff, fs_diff, digest) =
            tokio::task::spawn_blocking(move || -> Result<(Diff, Diff, String)> {
                if let Some((pid, said)) = stdio {
                    correct_descriptors(&images, pid, said)?;
                }
                let img = shared_fs::diff(&Snapshot::default(), &shared_fs::snapshot(&images)?);
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
        // The memory pages' share of the files sent (the metrics count it as memory).
        let raw = |d: &Diff, pages: bool| -> u64 {
            d.changed
                .iter()
                .filter(|e| !pages || is_page_image(&e.path))
                .map(|e| e.size)
                .sum()
        };
        let all = raw(&img_diff, false) + raw(&fs_diff, false);
        self.page_share = if all > 0 {
            raw(&img_diff, true) as f64 / all as f64
        } else {
            0.0
        };
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

    /// Restore: the destination restores once it holds every page and file.
    pub(super) async fn restore(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
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
        let restored =
            tokio::time::timeout(limit + self.deadlines.request(), self.ask_dest(&req, &[]))
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

    /// Commit: asks the destination until it answers whether it committed.
    pub(super) async fn commit(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        // The destination decides: it commits by recording the job (synced) before it
        // answers. Until the answer, this copy stays frozen in place; an answer that
        // it never committed (it timed out, restarted or aborted) rolls back here.
        if self.faults.pause_before_commit_ms > 0 {
            warn!(%job, ms = self.faults.pause_before_commit_ms, "pausing before the commit (fault hook)");
            tokio::time::sleep(Duration::from_millis(self.faults.pause_before_commit_ms)).await;
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

    /// Cleanup: the source's copy removed once the destination holds all its memory.
    pub(super) async fn cleanup(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        if self.faults.pause_after_commit_ms > 0 {
            warn!(%job, ms = self.faults.pause_after_commit_ms, "pausing after the commit (fault hook)");
            tokio::time::sleep(Duration::from_millis(self.faults.pause_after_commit_ms)).await;
        }
        let name = self.spec.name.clone();
        if self.lazy_dumped {
            // The frozen copy stays until the destination has all its memory; if the
            // fill fails, it runs on here.
            self.wait_for_fill().await?;
        }
        // Clients that keep using this host's address follow the container.
        self.agent.record_redirect(&self.spec, &self.to).await;
        self.agent
            .remove_departed(&job, &name, &self.to, self.mode == MigrateMode::PreCopy)
            .await;
        // A lazy dump left its trackers; the processes are gone, so this is quick.
        self.stop_tracking_off_the_freeze().await;
        self.agent.forget_outgoing(&job);
        Ok(0)
    }

    /// Refuses, before anything moves, a checkpoint that cannot be written: a dump that carries
    /// every page (stop-and-copy, or pre-copy without a lazy restore) writes the container's
    /// memory as image files at the destination (`dest_free`: free bytes there), and
    /// stop-and-copy writes them here first. Image directories are usually a tmpfs, so they
    /// are bounded by memory, not by disk. Unknown sizes are not checked.
    pub(super) async fn check_checkpoint_room(&mut self, dest_free: Option<u64>) -> Result<()> {
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

    /// The root filesystem's diff for the final dump, to start once the container is frozen
    /// ([`RootStart::start`]); its result waits in `self.root_diff` for the images.
    /// Refuses a destination whose CPU lacks instruction-set flags this host's has, naming
    /// them, unless the request ignores CPU features (then the report warns).
    pub(super) fn check_cpu_features(&mut self, destination: Option<Vec<String>>) -> Result<()> {
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
}

/// Whether `path` (in the images directory) is one of CRIU's page images, `pages-N.img`: the
/// memory pages of a dump written here.
fn is_page_image(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Writes runc's `descriptors.json` in `images` again with what the container's first process
/// `pid` holds now, while frozen (`said`, read at the prepare, if it is gone). runc writes what
/// it saw when it started or restored the container, and a restored container's pipes are not
/// the ones it started with: the restore hands runc's own stdout and stderr to CRIU for the
/// pipes named here, which must be the ones the dump found.
fn correct_descriptors(images: &std::path::Path, pid: i32, said: Vec<String>) -> Result<()> {
    let file = images.join("descriptors.json");
    if !file.is_file() {
        return Ok(());
    }
    let now = ferry_runtime::console::descriptors(pid).unwrap_or(said);
    std::fs::write(&file, serde_json::to_vec(&now)?)
        .with_context(|| format!("writing {}", file.display()))
}
