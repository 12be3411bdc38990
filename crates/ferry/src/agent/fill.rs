//! Lazy restore, destination side: the container's memory comes from this host's page store.
//!
//! Pre-copy rounds send pages by content ([`super::pages`]) and, with them, where each page
//! lives ([`crate::proto::PeerRequest::PageMap`]): process (as the container's PID namespace
//! numbers it), address, and a sequence number that orders reads of the same page. The final
//! dump then writes no lazy memory at all (`PE_LAZY` pagemap entries without contents), and
//! the restore runs `criu restore --lazy-pages` with a `criu lazy-pages` daemon whose page
//! server is this module ([`serve`]): every page the daemon asks for, on a fault or in its
//! background fill, is read from the store by its location. The pages stay pinned until the
//! daemon has copied everything and exited ([`Agent::finish_fill`]); if it fails, the
//! container is killed rather than left to run on with zero-filled pages.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::AsFd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use criu_sys::page_server::{
    read_message_async, write_payload_async, write_reply_async, Message, Reply, PAGE_SIZE,
};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};
use transfer::lists::Location;
use transfer::pages::PageHash;

use super::{lock, Agent};
use crate::proto::{PeerResponse, MAX_HASHES};

/// (pid in the container, page address) -> (content, sequence number of the read).
pub(crate) type PageIndex = HashMap<(u32, u64), (PageHash, u64)>;

/// Pages served per request at most (CRIU asks for up to 4 MiB).
const MAX_SERVE_PAGES: u64 = 1024;
/// How long the daemon may take to say it is ready.
const DAEMON_READY: Duration = Duration::from_secs(10);
/// How long a fill may take before it counts as failed (the container is then killed).
const FILL_LIMIT: Duration = Duration::from_secs(600);

/// What a fill did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FillStats {
    pub(crate) pages: u64,
    pub(crate) requests: u64,
    pub(crate) fill_ms: u64,
}

/// A fill under way or ended: its pins, and its outcome once known.
pub(crate) struct Fill {
    /// The source of the job: the only peer that may ask about it.
    pub(crate) from: String,
    pub(crate) pinned: HashSet<PageHash>,
    pub(crate) done: tokio::sync::watch::Sender<Option<std::result::Result<FillStats, String>>>,
}

/// Adds `locations` to `index`: a page read later (larger sequence number) replaces an earlier
/// read of the same page.
pub(crate) fn place(index: &mut PageIndex, locations: Vec<Location>) {
    for l in locations {
        for (i, h) in l.hashes.into_iter().enumerate() {
            let at = l.vaddr + i as u64 * PAGE_SIZE as u64;
            match index.get(&(l.pid, at)) {
                Some((_, seq)) if *seq > l.seq => {}
                _ => {
                    index.insert((l.pid, at), (h, l.seq));
                }
            }
        }
    }
}

/// A started `criu lazy-pages` daemon and the other end of its page-server socket.
pub(crate) struct Daemon {
    pub(crate) child: crate::util::Spawned,
    pub(crate) socket: std::os::unix::net::UnixStream,
}

/// Starts `criu lazy-pages` on the job's images and work directory, its page server being a
/// socket pair whose other end is returned; waits until it says it is ready.
pub(crate) fn start_daemon(
    criu: &std::path::Path,
    images: &std::path::Path,
    work: &std::path::Path,
) -> Result<Daemon> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let fds = [theirs.as_fd(), ready_w.as_fd()];
    let slots = crate::util::fd_slots(&fds);
    let mut args: Vec<String> = vec!["lazy-pages".into(), "-D".into()];
    args.push(images.to_string_lossy().into_owned());
    args.push("-W".into());
    args.push(work.to_string_lossy().into_owned());
    args.extend([
        "--page-server".into(),
        "--ps-socket".into(),
        slots[0].to_string(),
    ]);
    args.extend(["--status-fd".into(), slots[1].to_string()]);
    args.extend(["-o".into(), "lazy-pages.log".into(), "-v2".into()]);
    let t_spawn = Instant::now();
    let mut child = crate::util::spawn_with_fds(criu, &args, &fds)
        .with_context(|| format!("starting {} lazy-pages", criu.display()))?;
    // The daemon has its copies.
    drop((theirs, ready_w));
    let mut ready = std::fs::File::from(ready_r);
    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [1u8; 1];
        let _ = tx.send(ready.read(&mut b).map(|n| n == 1 && b[0] == 0));
    });
    match rx.recv_timeout(DAEMON_READY) {
        Ok(Ok(true)) => {}
        other => {
            child.kill();
            let status = child.wait().ok();
            bail!(
                "criu lazy-pages did not get ready ({}; exit {status:?}); see lazy-pages.log in {}",
                match other {
                    Err(_) => format!("nothing within {} s", DAEMON_READY.as_secs()),
                    Ok(Ok(_)) => "it closed its status descriptor".to_string(),
                    Ok(Err(e)) => e.to_string(),
                },
                work.display()
            );
        }
    }
    info!(
        pid = child.pid(),
        spawn_ms = crate::util::ms(t - t_spawn),
        ready_ms = crate::util::ms(t.elapsed()),
        "criu lazy-pages ready"
    );
    Ok(Daemon {
        child,
        socket: ours,
    })
}

/// Serves the daemon's `PS_IOV_GET`s from the page store by `index` until it sends
/// `PS_IOV_CLOSE`; returns (pages served, requests).
pub(crate) async fn serve(
    agent: Arc<Agent>,
    socket: std::os::unix::net::UnixStream,
    index: Arc<PageIndex>,
) -> Result<(u64, u64)> {
    socket.set_nonblocking(true)?;
    let socket = tokio::net::UnixStream::from_std(socket)?;
    let (r, w) = socket.into_split();
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, w);
    let (mut pages, mut requests) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(MAX_SERVE_PAGES as usize * PAGE_SIZE);
    loop {
        let msg = read_message_async(&mut r)
            .await
            .context("reading the lazy-pages daemon's request")?;
        match msg {
            None => bail!("the lazy-pages daemon hung up before it had every page"),
            Some(
                m @ Message::Get {
                    pid,
                    vaddr,
                    nr_pages,
                },
            ) => {
                buf.clear();
                {
                    let store = agent.pages.lock().await;
                    for i in 0..nr_pages.min(MAX_SERVE_PAGES) {
                        let at = vaddr + i * PAGE_SIZE as u64;
                        match index.get(&(pid, at)).and_then(|(h, _)| store.get(h)) {
                            Some(p) => buf.extend_from_slice(p),
                            None => break,
                        }
                    }
                }
                if buf.is_empty() {
                    bail!(
                        "the lazy-pages daemon asked for page {vaddr:#x} of pid {pid}, which is not in this host's page store"
                    );
                }
                let n = (buf.len() / PAGE_SIZE) as u64;
                write_reply_async(
                    &mut w,
                    &m,
                    &Reply::Pages {
                        pid,
                        vaddr,
                        nr_pages: n,
                    },
                )
                .await?;
                write_payload_async(&mut w, &buf).await?;
                w.flush().await?;
                pages += n;
                requests += 1;
            }
            Some(m @ (Message::Close | Message::ForceClose)) => {
                write_reply_async(&mut w, &m, &Reply::Close { status: 0 }).await?;
                w.flush().await?;
                return Ok((pages, requests));
            }
            Some(other) => bail!("unexpected request from the lazy-pages daemon: {other:?}"),
        }
    }
}

/// A lazy restore under way, recorded on disk: if the agent dies during the fill, its next
/// start stops the container, whose missing pages would otherwise read as zeros.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct FillRecord {
    pub(crate) job: String,
    pub(crate) name: String,
    pub(crate) from: String,
}

impl Agent {
    fn fill_record(&self, job: &str) -> std::path::PathBuf {
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
        Ok(super::journal::write_durable(
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
                lock(&self.filled).insert(rec.job.clone(), (rec.from, tx));
                let _ = std::fs::remove_dir_all(self.images_dir(&rec.job));
                let _ = std::fs::remove_dir_all(self.work_dir(&rec.job));
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Answers [`crate::proto::PeerRequest::PageMap`]: reads `count` location records and
    /// adds them to the job's index; every page they name must be in the store.
    pub(crate) async fn receive_locations(
        &self,
        peer: &str,
        job: &str,
        count: u64,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let _stream = self.with_incoming(peer, job, |i| i.stream()).await?;
        let locations = transfer::lists::read_locations(recv, count, MAX_HASHES)
            .await
            .context("reading page locations")?;
        {
            let store = self.pages.lock().await;
            for l in &locations {
                if let Some(h) = l.hashes.iter().find(|h| !store.contains(h)) {
                    bail!(
                        "a location names page {} at {:#x} of pid {}, which this host does not hold",
                        super::pages::to_hex(h),
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
        mut daemon: crate::util::Spawned,
        server: tokio::task::JoinHandle<Result<(u64, u64)>>,
        restored_at: Instant,
    ) {
        let agent = Arc::clone(self);
        tokio::spawn(async move {
            let served = tokio::time::timeout(FILL_LIMIT, server).await;
            let status = tokio::task::spawn_blocking(move || {
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
            let fill_ms = crate::util::ms(restored_at.elapsed()) as u64;
            let outcome = match (served, status) {
                (Ok(Ok(Ok((pages, requests)))), Some(s)) if s.success() => Ok(FillStats {
                    pages,
                    requests,
                    fill_ms,
                }),
                (served, status) => Err(format!(
                    "the lazy restore of job {job} failed: page server {}, criu lazy-pages {}",
                    match served {
                        Ok(Ok(Ok((p, _)))) => format!("served {p} pages"),
                        Ok(Ok(Err(e))) => format!("{e:#}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("still running after {} s", FILL_LIMIT.as_secs()),
                    },
                    status.map_or("did not exit".to_string(), |s| s.to_string())
                )),
            };
            let work = agent.work_dir(&job);
            crate::runtime::keep_log(
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
            let fill = super::lock(&agent.fills).remove(&job);
            if let Some(f) = fill {
                f.done.send_replace(Some(outcome));
                // Late waiters find the outcome in `filled` (the last few jobs).
                let mut filled = super::lock(&agent.filled);
                if filled.len() >= 64 {
                    filled.clear();
                }
                filled.insert(job.clone(), (f.from, f.done));
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
        let (from, mut rx) = {
            let fills = super::lock(&self.fills);
            match fills.get(job) {
                Some(f) => (f.from.clone(), f.done.subscribe()),
                None => match super::lock(&self.filled).get(job) {
                    Some((from, d)) => (from.clone(), d.subscribe()),
                    None => bail!("no lazy restore of job {job} here"),
                },
            }
        };
        if from != peer {
            bail!("job {job} belongs to {from}, not {peer}");
        }
        let outcome = rx
            .wait_for(|o| o.is_some())
            .await
            .map_err(|_| anyhow::anyhow!("the fill of job {job} was abandoned"))?
            .clone()
            .expect("waited for Some");
        match outcome {
            Ok(s) => Ok(PeerResponse::Filled {
                pages: s.pages,
                requests: s.requests,
                fill_ms: s.fill_ms,
            }),
            Err(e) => bail!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(pid: u32, vaddr: u64, seq: u64, fill: &[u8]) -> Location {
        Location {
            pid,
            vaddr,
            seq,
            hashes: fill.iter().map(|b| [*b; 32]).collect(),
        }
    }

    #[test]
    fn the_latest_read_of_a_page_wins_whatever_the_arrival_order() {
        let mut index = PageIndex::new();
        // Read at 5 (contents 2, 2) arrives after a read at 7 (contents 3) of the second page.
        place(&mut index, vec![loc(1, 0x1000, 7, &[3])]);
        place(&mut index, vec![loc(1, 0x0, 5, &[2, 2])]);
        assert_eq!(index[&(1, 0x0)], ([2; 32], 5));
        assert_eq!(
            index[&(1, 0x1000)],
            ([3; 32], 7),
            "an older read does not replace a newer"
        );
        // A later read replaces; another process's page at the same address is another page.
        place(&mut index, vec![loc(1, 0x0, 9, &[4]), loc(2, 0x0, 1, &[8])]);
        assert_eq!(index[&(1, 0x0)], ([4; 32], 9));
        assert_eq!(index[&(2, 0x0)], ([8; 32], 1));
        assert_eq!(index.len(), 3);
    }
}
