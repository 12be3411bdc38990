//! A fill's life at the destination: recorded, fed with the source's page locations, finished
//! (every page in place, verified and corrected), or settled after a restart.

use crate::fill::place;
use crate::fill::Ended;
use crate::fill::FillPages;
use crate::fill::FillStats;
use crate::fill::FILL_LIMIT;
use crate::fill::REMOTE;
use crate::proto::{refuse, ErrorCode};
use crate::proto::{PeerResponse, MAX_HASHES};
use crate::{lock, Agent};
use anyhow::{bail, Context, Result};
use criu_driver::page_server::PAGE_SIZE;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};
use transfer::lists::Location;

/// A lazy restore under way, recorded on disk: if the agent dies during the fill, its next
/// start stops the container, whose missing pages would otherwise read as zeros.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct FillRecord {
    pub(crate) job: String,
    pub(crate) name: String,
    pub(crate) from: String,
}

/// Reads `count` location records of at most [`crate::proto::MAX_VERIFY_PAGES`] pages in all.
pub(super) async fn read_bounded_locations(
    recv: &mut crate::peer::Incoming<'_>,
    count: u64,
) -> Result<Vec<Location>> {
    let max = crate::proto::MAX_VERIFY_PAGES;
    if count > max {
        bail!("{count} location records at once; at most {max}");
    }
    let locations = transfer::lists::read_locations(recv, count, max)
        .await
        .context("reading page locations")?;
    Ok(locations)
}

impl Agent {
    pub(crate) fn fill_record(&self, job: &str) -> std::path::PathBuf {
        self.cfg
            .state_dir
            .join("filling")
            .join(format!("{job}.json"))
    }

    /// Forgets a fill that never started (its restore failed): its pins and its record.
    pub(crate) fn forget_fill(&self, job: &str) {
        lock(&self.fills).remove(job);
        let _ = std::fs::remove_file(self.fill_record(job));
    }

    /// Records a fill before it starts (synced).
    pub(crate) fn record_fill(&self, rec: &FillRecord) -> Result<()> {
        let path = self.fill_record(&rec.job);
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        Ok(crate::journal::write_durable(
            &path,
            &serde_json::to_vec(rec)?,
        )?)
    }

    /// At start: fills an earlier run left unfinished failed; their containers go.
    pub(crate) async fn settle_unfinished_fills(&self) {
        let dir = self.cfg.state_dir.join("filling");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let rec: Option<FillRecord> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(rec) = rec {
                warn!(job = %rec.job, container = %rec.name, "the agent stopped during a lazy restore's fill: the container is removed (its source resumes it)");
                if lock(&self.containers).contains_key(&rec.name) {
                    if let Err(e) = self.delete(&rec.name).await {
                        warn!(job = %rec.job, error = ?e, "removing the unfinished copy");
                    }
                } else {
                    let (runc, n) = (self.runc.clone(), rec.name.clone());
                    let _ = tokio::task::spawn_blocking(move || runc.delete_force(&n)).await;
                }
                let (tx, _) = tokio::sync::watch::channel(Some(Err(format!(
                    "the agent of {} stopped during the fill of job {}",
                    self.cfg.host, rec.job
                ))));
                lock(&self.filled).insert(
                    rec.job.clone(),
                    Ended {
                        from: rec.from,
                        done: tx,
                        pages: None,
                    },
                );
                let _ = std::fs::remove_dir_all(self.images_dir(&rec.job));
                let _ = std::fs::remove_dir_all(self.work_dir(&rec.job));
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Answers [`crate::proto::PeerRequest::PageMap`]: reads `count` location records and
    /// adds them to the job's index; every page they name must be in the store. With
    /// `with_pages`, a page stream follows the records (pages they name that this host may
    /// lack).
    pub(crate) async fn receive_locations(
        &self,
        peer: &str,
        job: &str,
        count: u64,
        with_pages: bool,
        recv: &mut crate::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let _stream = self.with_incoming(peer, job, |i| i.stream()).await?;
        let locations = transfer::lists::read_locations(recv, count, MAX_HASHES)
            .await
            .context("reading page locations")?;
        if with_pages {
            self.absorb_page_stream(crate::pages::PeerJob { peer, job }, recv)
                .await?;
        }
        {
            let store = self.pages.lock().await;
            for l in &locations {
                if let Some(h) = l
                    .hashes
                    .iter()
                    .find(|h| **h != REMOTE && !store.contains(h))
                {
                    bail!(
                        "a location names page {} at {:#x} of pid {}, which this host does not hold",
                        hex::encode(h),
                        l.vaddr,
                        l.pid
                    );
                }
            }
        }
        let pages: usize = locations.iter().map(|l| l.hashes.len()).sum();
        // An index is at most as large as the memory a store of this size can hold (twice:
        // pages with equal contents share one stored page).
        let cap = self.page_store_cap().saturating_mul(2);
        let size = self
            .with_incoming(peer, job, move |i| {
                place(&mut i.index, locations);
                i.index.len()
            })
            .await?;
        if size > cap {
            bail!(
                "job {job} places {size} pages, more than this host's page store can back ({cap}; page_store_mib in its config)"
            );
        }
        tracing::debug!(%job, records = count, pages, "page locations received");
        Ok(PeerResponse::Ok { bytes: 0 })
    }

    /// Watches a lazy restore's daemon and page server until the fill ends; then releases the
    /// job's pins and its images. A fill that fails kills the container: its missing pages
    /// would read as zeros.
    pub(crate) fn finish_fill(
        self: &Arc<Self>,
        job: String,
        name: String,
        daemon: Option<ferry_runtime::util::Spawned>,
        server: tokio::task::JoinHandle<Result<(u64, u64)>>,
        fill_pages: Arc<FillPages>,
        restored_at: Instant,
    ) {
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            let served = tokio::time::timeout(FILL_LIMIT, server).await;
            let own = daemon.is_none();
            let status = tokio::task::spawn_blocking(move || {
                use std::os::unix::process::ExitStatusExt;
                // The agent's own daemon is the server itself.
                let Some(mut daemon) = daemon else {
                    return Some(std::process::ExitStatus::from_raw(0));
                };
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match daemon.try_wait() {
                        Ok(Some(s)) => return Some(s),
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        _ => {
                            daemon.kill();
                            let _ = daemon.wait();
                            return None;
                        }
                    }
                }
            })
            .await
            .ok()
            .flatten();
            let fill_ms = ferry_runtime::util::ms(restored_at.elapsed()) as u64;
            let outcome = match (served, status) {
                (Ok(Ok(Ok((pages, requests)))), Some(s)) if s.success() => {
                    let (fetched, fetched_on_fault) = fill_pages.fetch_counts();
                    Ok(FillStats {
                        pages,
                        requests,
                        fill_ms,
                        fetched,
                        fetched_on_fault,
                    })
                }
                (served, status) => {
                    let served = match served {
                        Ok(Ok(Ok((p, _)))) => format!("served {p} pages"),
                        Ok(Ok(Err(e))) => format!("{e:#}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("still running after {} s", FILL_LIMIT.as_secs()),
                    };
                    Err(if own {
                        format!("the lazy restore of job {job} failed: {served}")
                    } else {
                        format!(
                            "the lazy restore of job {job} failed: page server {served}, criu lazy-pages {}",
                            status.map_or("did not exit".to_string(), |s| s.to_string())
                        )
                    })
                }
            };
            let work = agent.work_dir(&job);
            ferry_runtime::logs::keep_log(
                &work.join("lazy-pages.log"),
                &agent.cfg.state_dir.join("logs"),
                &format!("{job}.lazy-pages.log"),
            );
            match &outcome {
                Ok(s) => {
                    info!(%job, container = %name, pages = s.pages, requests = s.requests, fill_ms = s.fill_ms,
                        mib_s = (s.pages as f64 * 4096.0 / 1048576.0) / (s.fill_ms.max(1) as f64 / 1000.0),
                        "lazy restore filled in")
                }
                Err(e) => {
                    // Pages it has not received would read as zeros: it must not run on. A
                    // committed copy is removed entirely: its source still holds the container,
                    // frozen, and resumes it (see `lazy::Driver::wait_for_fill`).
                    warn!(%job, container = %name, error = %e, "lazy restore failed: the container is stopped and removed here");
                    let committed = !agent.incoming.lock().await.contains_key(&job);
                    if committed {
                        if let Err(d) = agent.delete(&name).await {
                            warn!(%job, container = %name, error = ?d, "removing the failed copy");
                        }
                    } else {
                        let runc = agent.runc.clone();
                        let n = name.clone();
                        let _ = tokio::task::spawn_blocking(move || runc.delete_force(&n)).await;
                    }
                }
            }
            // Still waiting for its commit: the commit (or an abort) removes the images.
            let still_incoming = match agent.incoming.lock().await.get_mut(&job) {
                Some(i) => {
                    i.filling = false;
                    true
                }
                None => false,
            };
            let _ = std::fs::remove_file(agent.fill_record(&job));
            let fill = crate::lock(&agent.fills).remove(&job);
            if let Some(f) = &fill {
                info!(%job, forgotten = f.forgotten, kept = f.pinned.len(), "pages of the fill forgotten once in, and kept");
            }
            if !still_incoming {
                agent.release_store(&job).await;
            }
            if let Some(f) = fill {
                f.done.send_replace(Some(outcome));
                // Late waiters find the outcome in `filled` (the last few jobs).
                let mut filled = crate::lock(&agent.filled);
                if filled.len() >= 64 {
                    filled.clear();
                }
                filled.insert(
                    job.clone(),
                    Ended {
                        from: f.from,
                        done: f.done,
                        pages: Some(f.pages),
                    },
                );
            }
            if !still_incoming {
                let (images, work) = (agent.images_dir(&job), agent.work_dir(&job));
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_dir_all(images);
                    let _ = std::fs::remove_dir_all(work);
                })
                .await;
            }
        });
    }

    /// Answers [`crate::proto::PeerRequest::FillWait`].
    pub(crate) async fn fill_wait(&self, peer: &str, job: &str) -> Result<PeerResponse> {
        let (mut rx, pages) = {
            let fills = crate::lock(&self.fills);
            match fills.get(job) {
                Some(f) if f.from != peer => {
                    return Err(refuse(
                        ErrorCode::Forbidden,
                        format!("job {job} belongs to {}, not {peer}", f.from),
                    ))
                }
                Some(f) => (f.done.subscribe(), Some(Arc::clone(&f.pages))),
                None => match crate::lock(&self.filled).get(job) {
                    Some(e) if e.from != peer => {
                        return Err(refuse(
                            ErrorCode::Forbidden,
                            format!("job {job} belongs to {}, not {peer}", e.from),
                        ))
                    }
                    Some(e) => (e.done.subscribe(), e.pages.clone()),
                    None => bail!("no lazy restore of job {job} here"),
                },
            }
        };
        let outcome = rx
            .wait_for(|o| o.is_some())
            .await
            .map_err(|_| anyhow::anyhow!("the fill of job {job} was abandoned"))?
            .clone()
            .expect("waited for Some");
        // The source's integrity check is over: the index goes.
        if let Some(e) = crate::lock(&self.filled).get_mut(job) {
            e.pages = None;
        }
        match outcome {
            Ok(s) => Ok(PeerResponse::Filled {
                pages: s.pages,
                requests: s.requests,
                fill_ms: s.fill_ms,
                integrity: pages.map(|p| p.integrity()),
                fetched_pages: s.fetched,
                fetched_on_fault: s.fetched_on_fault,
            }),
            Err(e) => bail!("{e}"),
        }
    }

    /// The pages of `job`'s fill, under way or ended, if `peer` is its source.
    pub(crate) fn fill_pages(&self, peer: &str, job: &str) -> Result<(Arc<FillPages>, bool)> {
        if let Some(f) = crate::lock(&self.fills).get(job) {
            if f.from != peer {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("job {job} belongs to {}, not {peer}", f.from),
                ));
            }
            return Ok((Arc::clone(&f.pages), true));
        }
        match crate::lock(&self.filled).get(job) {
            Some(e) if e.from != peer => Err(refuse(
                ErrorCode::Forbidden,
                format!("job {job} belongs to {}, not {peer}", e.from),
            )),
            Some(Ended { pages: Some(p), .. }) => Ok((Arc::clone(p), false)),
            _ => bail!("no lazy restore of job {job} to check here"),
        }
    }

    /// Answers [`crate::proto::PeerRequest::VerifyPages`].
    pub(crate) async fn verify_pages(
        &self,
        peer: &str,
        job: &str,
        count: u64,
        done: bool,
        recv: &mut crate::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let (pages, _) = self.fill_pages(peer, job)?;
        let frozen = read_bounded_locations(recv, count).await?;
        let v = pages.verify(&frozen, done);
        if !v.correct.is_empty() || v.stale > 0 {
            warn!(%job, checked = v.checked, to_correct = v.correct.len(), stale = v.stale, "integrity: pages differ from the source's frozen copy");
        }
        Ok(PeerResponse::Verified {
            checked: v.checked,
            correct: v.correct,
            stale: v.stale,
        })
    }

    /// Answers [`crate::proto::PeerRequest::CorrectPages`]: stores the pages (checking each
    /// against its hash), pins them for the fill and replaces the held ones.
    pub(crate) async fn correct_pages(
        &self,
        peer: &str,
        job: &str,
        count: u64,
        recv: &mut crate::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let (pages, running) = self.fill_pages(peer, job)?;
        let frozen = read_bounded_locations(recv, count).await?;
        let mut fixed = Vec::new();
        let mut page = vec![0u8; PAGE_SIZE];
        {
            let mut store = self.pages.lock().await;
            for l in &frozen {
                for (i, h) in l.hashes.iter().enumerate() {
                    tokio::io::AsyncReadExt::read_exact(recv, &mut page)
                        .await
                        .context("reading corrected pages")?;
                    let at = l.vaddr + i as u64 * PAGE_SIZE as u64;
                    if transfer::pages::hash_page(&page) != *h {
                        bail!(
                            "the corrected page at {at:#x} of pid {} does not match its hash",
                            l.pid
                        );
                    }
                    store.insert(&page).with_context(|| {
                        format!(
                            "the page store of {} is full (page_store_mib in its config): a corrected page cannot be stored",
                            self.cfg.host
                        )
                    })?;
                    fixed.push(((l.pid, at), *h));
                }
            }
        }
        if running {
            if let Some(f) = crate::lock(&self.fills).get_mut(job) {
                f.pinned.extend(fixed.iter().map(|(_, h)| *h));
            }
        }
        let (corrected, stale) = pages.correct(&fixed);
        info!(%job, corrected, stale, "integrity: pages corrected from the source's frozen copy");
        Ok(PeerResponse::Corrected { corrected, stale })
    }
}
