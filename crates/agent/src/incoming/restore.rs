//! The destination's restore: the images received, the container restored once they and its
//! pages are in (a fault hook may damage them first).

use crate::incoming::same_descriptors;
use crate::incoming::Arrival;
use crate::incoming::FillDaemon;
use crate::incoming::ImageHooks;
use crate::incoming::RestoreLimits;
use crate::incoming::DESCRIPTORS;
use crate::incoming::RESTORED_TTL;
use crate::proto::PeerResponse;
use crate::proto::{refuse, ErrorCode};
use crate::{lock, Agent};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// First word of every page of the memory workload (`ferry-workload mem`), as it lies in a
/// CRIU pages image (little-endian).
pub(super) const WORKLOAD_PAGE_MAGIC: u64 = ferry_workload::mem::MAGIC;

/// Test hook: finds the pages of the memory workload in CRIU's raw page images (every 4 KiB
/// page that starts with the workload's magic word), and flips one byte in the middle one.
/// Returns the file and the byte's offset.
pub(super) fn damage_workload_page(images: &std::path::Path) -> Result<(std::path::PathBuf, u64)> {
    use std::io::{Read, Seek, SeekFrom, Write};
    const PAGE: usize = 4096;
    let magic = WORKLOAD_PAGE_MAGIC.to_le_bytes();
    let mut found: Vec<(std::path::PathBuf, u64)> = vec![];
    let mut files: Vec<_> = std::fs::read_dir(images)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-") && n.ends_with(".img"))
        })
        .collect();
    files.sort();
    for f in files {
        let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&f)?);
        let mut page = vec![0u8; PAGE];
        let mut off = 0u64;
        while r.read_exact(&mut page).is_ok() {
            if page[..8] == magic {
                found.push((f.clone(), off));
            }
            off += PAGE as u64;
        }
    }
    let Some((file, page_off)) = found.get(found.len() / 2).cloned() else {
        bail!(
            "no page of the memory workload in the images at {}: is the container running \
             `ferry-workload mem`?",
            images.display()
        );
    };
    let at = page_off + PAGE as u64 / 2;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)?;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&b)?;
    Ok((file, at))
}

impl Agent {
    pub(crate) async fn receive_images(
        &self,
        peer: &str,
        job: &str,
        ImageHooks {
            corrupt,
            corrupt_page,
            corrupt_rootfs,
        }: ImageHooks,
        rootfs_digest: Option<String>,
        recv: &mut crate::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        if (corrupt || corrupt_page || corrupt_rootfs) && !self.cfg.allow_fault_hooks {
            return Err(refuse(
                ErrorCode::Forbidden,
                format!(
                    "fault hooks are disabled on {} (allow_fault_hooks in its config)",
                    self.cfg.host
                ),
            ));
        }
        let (_stream, relayed, own) = match self.incoming.lock().await.get_mut(job) {
            Some(i) if i.from != peer => {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("job {job} belongs to {}, not {peer}", i.from),
                ))
            }
            Some(i) => (i.stream(), i.pages_relayed, i.layout.own_fs(&i.spec)),
            None => {
                return Err(refuse(
                    ErrorCode::NotFound,
                    format!("no prepared job {job} here (it expired or was aborted)"),
                ))
            }
        };
        let images = self.images_dir(job);
        if !relayed {
            // Without the relay, every image comes in this tree: start from nothing (but the
            // directory itself, which a runc started ahead holds open, and the descriptors it
            // read from there, which the tree replaces atomically).
            ferry_runtime::util::empty_dir(&images, &[DESCRIPTORS])?;
        }
        let limits = shared_fs::Limits::default();
        let t = Instant::now();
        let a = transfer::tree::recv_tree(recv, &images, limits.clone())
            .await
            .context("receiving CRIU images")?;
        let images_ms = ferry_runtime::util::ms(t.elapsed());
        let b = transfer::tree::recv_tree_with(recv, &own, limits, true)
            .await
            .context("receiving the root filesystem diff")?;
        info!(%job, images_ms, total_ms = ferry_runtime::util::ms(t.elapsed()), files = a.entries, bytes = a.file_bytes, "images received");
        if corrupt_rootfs {
            std::fs::write(own.join("ferry-stray-file"), b"not at the source")?;
            warn!(%job, "a stray file added to the root on purpose (fault hook)");
        }
        if let Some(expected) = rootfs_digest {
            // The copy here must be the source's root as it was at the freeze: whatever the
            // rounds skipped or resent while the container ran, the final diff settled.
            let root = own.clone();
            let got = tokio::task::spawn_blocking(move || {
                shared_fs::snapshot(&root).map(|mut s| ferry_runtime::bundle::root_digest(&mut s))
            })
            .await??;
            if got != expected {
                bail!(
                    "the root filesystem received here (digest {got}) differs from the source's at the freeze ({expected}); refusing to restore"
                );
            }
        }
        if corrupt {
            // Test hook: damage the inventory so that CRIU refuses the images for real.
            let inv = images.join("inventory.img");
            std::fs::write(&inv, b"not a CRIU image")?;
            warn!(%job, "images corrupted on purpose (fault hook)");
        }
        if corrupt_page {
            let dir = images.clone();
            let (file, offset) =
                tokio::task::spawn_blocking(move || damage_workload_page(&dir)).await??;
            warn!(%job, file = %file.display(), offset, "one memory page damaged on purpose (fault hook)");
        }
        Ok(PeerResponse::Ok {
            bytes: a.wire_bytes + b.wire_bytes,
        })
    }

    /// Records how what the source sent for `job` without waiting for the answer (`what`:
    /// its images, or its final dump's pages) ended here, for a restore waiting behind it.
    pub(crate) async fn arrived(
        &self,
        peer: &str,
        job: &str,
        what: Arrival,
        outcome: Result<(), String>,
    ) {
        if let Some(i) = self
            .incoming
            .lock()
            .await
            .get(job)
            .filter(|i| i.from == peer)
        {
            match what {
                Arrival::Images => i.images.send_replace(Some(outcome)),
                Arrival::FinalPages => i.final_pages.send_replace(Some(outcome)),
            };
        }
    }

    /// Waits (at most `limit`) until what the source sent before a restore without waiting
    /// for the answer (`what`: its images, or its final dump's pages) has ended here; its
    /// error is the restore's.
    pub(crate) async fn wait_for_arrival(
        &self,
        peer: &str,
        job: &str,
        what: Arrival,
        limit: Duration,
    ) -> Result<()> {
        let mut rx = match self.incoming.lock().await.get_mut(job) {
            Some(i) if i.from != peer => {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("job {job} belongs to {}, not {peer}", i.from),
                ))
            }
            Some(i) => {
                i.touch();
                match what {
                    Arrival::Images => i.images.subscribe(),
                    Arrival::FinalPages => i.final_pages.subscribe(),
                }
            }
            None => {
                return Err(refuse(
                    ErrorCode::NotFound,
                    format!("no prepared job {job} here (it expired or was aborted)"),
                ))
            }
        };
        let name = match what {
            Arrival::Images => "images",
            Arrival::FinalPages => "final dump's pages",
        };
        let outcome = tokio::time::timeout(limit, rx.wait_for(Option::is_some))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the {name} of job {job} did not arrive within the restore deadline ({:.0} s)",
                    limit.as_secs_f64()
                )
            })?
            .map_err(|_| anyhow::anyhow!("job {job} was aborted while its {name} arrived"))?
            .clone();
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => bail!("the {name} did not arrive intact, nothing was restored: {e}"),
            None => bail!("job {job}: no outcome for its {name}"),
        }
    }

    pub(crate) async fn restore_incoming(
        self: &Arc<Self>,
        peer: &str,
        job: &str,
        RestoreLimits {
            pause_ms,
            deadline,
            lazy,
            after_images,
            after_pages,
        }: RestoreLimits,
    ) -> Result<PeerResponse> {
        if pause_ms > 120_000 {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                "a restore pause of {pause_ms} ms is refused: fault hooks pause at most 120000 ms"
            ),
            ));
        }
        if pause_ms > 0 && !self.cfg.allow_fault_hooks {
            return Err(refuse(
                ErrorCode::Forbidden,
                format!(
                    "fault hooks are disabled on {} (allow_fault_hooks in its config)",
                    self.cfg.host
                ),
            ));
        }
        let t_req = Instant::now();
        if after_pages {
            self.wait_for_arrival(peer, job, Arrival::FinalPages, deadline)
                .await?;
        }
        if after_images {
            self.wait_for_arrival(peer, job, Arrival::Images, deadline)
                .await?;
        }
        // Lazy: the fill takes over the job's pinned pages and its index, registered while the
        // job's entry is locked so that the store never sees the pages unpinned.
        let (name, layout, abort, fill_pages, prestarted, descriptors, console) =
            match self.incoming.lock().await.get_mut(job) {
                Some(i) if i.from != peer => {
                    return Err(refuse(
                        ErrorCode::Forbidden,
                        format!("job {job} belongs to {}, not {peer}", i.from),
                    ))
                }
                Some(i) => {
                    i.restoring = true;
                    let fill_pages = lazy.then(|| {
                        // The source checks every lazy page against its frozen copy (see `lazy`).
                        let pages = crate::fill::FillPages::new(std::mem::take(&mut i.index), true);
                        let (tx, _) = tokio::sync::watch::channel(None);
                        lock(&self.fills).insert(
                            job.to_string(),
                            crate::fill::Fill {
                                from: peer.to_string(),
                                pinned: std::mem::take(&mut i.pinned),
                                forgotten: 0,
                                done: tx,
                                pages: Arc::clone(&pages),
                            },
                        );
                        pages
                    });
                    (
                        i.spec.name.clone(),
                        i.layout.clone(),
                        std::sync::Arc::clone(&i.abort),
                        fill_pages,
                        i.prestarted.take(),
                        i.descriptors.clone(),
                        i.console.clone(),
                    )
                }
                None => {
                    return Err(refuse(
                        ErrorCode::NotFound,
                        format!("no prepared job {job} here (it expired or was aborted)"),
                    ))
                }
            };
        // Lazy: the daemon that fills the memory in from the page store starts first.
        let mut daemon = None;
        if let Some(pages) = fill_pages {
            let criu = match &self.criu {
                Ok(c) => c.path.clone(),
                Err(e) => {
                    self.forget_fill(job);
                    return Err(refuse(
                        ErrorCode::Unavailable,
                        format!("CRIU unusable on {}: {e}", self.cfg.host),
                    ));
                }
            };
            let (images, work) = (self.images_dir(job), self.work_dir(job));
            let rec = crate::fill::FillRecord {
                job: job.to_string(),
                name: name.clone(),
                from: peer.to_string(),
            };
            let a = Arc::clone(self);
            let fill_pages = Arc::clone(&pages);
            let own_daemon = self.cfg.lazy_daemon == crate::config::LazyDaemon::Agent;
            let started = tokio::task::spawn_blocking(move || {
                // The record (synced to disk) is written while the daemon starts; both are
                // done before CRIU restores anything.
                std::thread::scope(|scope| {
                    let recorded = scope.spawn(|| a.record_fill(&rec));
                    let daemon = (|| {
                        std::fs::create_dir_all(&work)?;
                        // The dump's lazy memory: what the fill copies, and what bounds its
                        // read-ahead from the source.
                        let maps = match criu_driver::image::read_pagemaps(&images) {
                            Ok(maps) => {
                                fill_pages.set_lazy_memory(&maps);
                                maps
                            }
                            Err(e) if !own_daemon => {
                                warn!(error = %e, "no read-ahead for this fill");
                                vec![]
                            }
                            Err(e) => return Err(e).context("reading the dump's pagemaps"),
                        };
                        if own_daemon {
                            let lazy = crate::lazyd::lazy_ranges(&maps);
                            let (listener, _) = crate::lazyd::listen(&work)?;
                            Ok(FillDaemon::Agent(listener, lazy))
                        } else {
                            crate::fill::start_daemon(&criu, &images, &work).map(FillDaemon::Criu)
                        }
                    })();
                    let recorded = recorded
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("recording the fill panicked")));
                    match (recorded, daemon) {
                        (Ok(()), d) => d,
                        (Err(e), Ok(FillDaemon::Criu(mut d))) => {
                            d.child.kill();
                            let _ = d.child.wait();
                            Err(e)
                        }
                        (Err(e), _) => Err(e),
                    }
                })
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
            match started {
                Ok(d) => {
                    let indexed = pages.len();
                    let source = crate::fill::Source {
                        job: job.to_string(),
                        host: peer.to_string(),
                    };
                    let (child, server) = match d {
                        FillDaemon::Criu(d) => (
                            Some(d.child),
                            tokio::spawn(crate::fill::serve(
                                Arc::clone(self),
                                d.socket,
                                Arc::clone(&pages),
                                source,
                            )),
                        ),
                        FillDaemon::Agent(listener, lazy) => (
                            None,
                            tokio::spawn(crate::lazyd::run(
                                Arc::clone(self),
                                listener,
                                Arc::clone(&pages),
                                source,
                                lazy,
                            )),
                        ),
                    };
                    info!(%job, indexed_pages = indexed, daemon = ?self.cfg.lazy_daemon, setup_ms = ferry_runtime::util::ms(t_req.elapsed()), "lazy restore: serving memory from the page store");
                    daemon = Some((child, server, pages));
                }
                Err(e) => {
                    self.forget_fill(job);
                    if let Some(i) = self.incoming.lock().await.get_mut(job) {
                        i.restoring = false;
                    }
                    return Err(e);
                }
            }
        }
        let bound = ferry_runtime::runc::Bound::new(
            deadline,
            "the restore deadline",
            Some(std::sync::Arc::clone(&abort)),
        );
        let until = bound.deadline;
        let (runc, images, work) = (
            self.runc.bounded(bound.clone()),
            self.images_dir(job),
            self.work_dir(job),
        );
        let t = Instant::now();
        let (logs, job_id) = (self.cfg.state_dir.join("logs"), job.to_string());
        let container = name.clone();
        let r = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&work)?;
            if pause_ms > 0 {
                warn!(container = %name, ms = pause_ms, "pausing before the restore (fault hook)");
                let end = Instant::now() + Duration::from_millis(pause_ms);
                while Instant::now() < end {
                    if abort.load(std::sync::atomic::Ordering::SeqCst) {
                        bail!("the restore of {name:?} was aborted");
                    }
                    if until.is_some_and(|u| Instant::now() >= u) {
                        bail!(
                            "the restore of {name:?} did not finish within the restore deadline ({:.1} s)",
                            deadline.as_secs_f64()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let from = ferry_runtime::runc::RestoreFrom {
                bundle: &layout.bundle,
                images: &images,
                work: &work,
                lazy,
                console: console.as_deref(),
            };
            let r = match prestarted {
                Some((was_lazy, p))
                    if was_lazy == lazy && same_descriptors(&images, descriptors.as_deref()) =>
                {
                    p.go_until_criu_done(bound).map(Some)
                }
                Some((was_lazy, p)) => {
                    info!(container = %name, was_lazy, lazy, "the runc restore started ahead does not fit these images: starting another");
                    p.cancel();
                    runc.restore(&name, &from).map(|()| None)
                }
                None => runc.restore(&name, &from).map(|()| None),
            };
            ferry_runtime::logs::keep_log_soon(
                r.is_ok(),
                work.join("restore.log"),
                logs,
                format!("{job_id}.restore.log"),
            );
            r
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        let mut incoming = self.incoming.lock().await;
        let restored_at = Instant::now();
        let i = incoming.get_mut(job);
        let failed = match (&i, &r) {
            (None, _) => Some(anyhow::anyhow!("job {job} vanished during its restore")),
            (_, Err(e)) => Some(anyhow::anyhow!("{e:#}")),
            _ => None,
        };
        if let Some(e) = failed {
            if let Some(i) = i {
                i.restoring = false;
            }
            if let Some((child, server, _)) = daemon {
                server.abort();
                if let Some(mut child) = child {
                    child.kill();
                    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
                }
                self.forget_fill(job);
            }
            return Err(e);
        }
        let i = i.expect("checked above");
        i.restoring = false;
        i.finishing = r.ok().flatten();
        if let Some((child, server, pages)) = daemon {
            i.filling = true;
            self.finish_fill(
                job.to_string(),
                container,
                child,
                server,
                pages,
                restored_at,
            );
        }
        if i.deadline <= Instant::now() {
            // An abort arrived during the restore: the watchdog removes this copy now.
            bail!("job {job} was aborted while it was being restored");
        }
        i.restored = true;
        i.deadline = Instant::now() + RESTORED_TTL;
        info!(%job, took_ms = ferry_runtime::util::ms(t.elapsed()), "restored; waiting for commit");
        Ok(PeerResponse::Ok { bytes: 0 })
    }
}
