//! Pre-copy, source side: dirty-page trackers on every process of the container, the memory
//! rounds (read, hash, skip what the destination holds, send the rest over parallel QUIC
//! streams), the root filesystem rounds, and the CPU throttle of auto-converge.

mod follow;

use follow::follow_writes;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use memtrack::{Method, Region, Tracker};
use migrate_core::RoundStats;
use precopy::relay::{fast_key, FastHashes};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};
use transfer::frame::{read_msg, write_msg};
use transfer::pages::{hash_page, PageHash, PageSet, PageWriter, PAGE};

use super::firstpass::{Batch, FirstPass};
use super::lazy::Placement;
use super::{lock, Agent, Job};
use crate::proto::{PeerRequest, PeerResponse};
use ferry_runtime::throttle::CpuThrottle;

/// Parallel QUIC streams per memory round.
const STREAMS: usize = 4;
/// Pages read at once (1 MiB).
const CHUNK_PAGES: u64 = 256;

/// Ranges of one process to copy.
pub(crate) type Todo = Vec<(i32, Vec<Region>)>;
/// How often a first round that follows writes collects them.
const TICK: Duration = Duration::from_millis(50);
/// Batches handed to the readers ahead of time: few, so what is sent follows the writes.
const QUEUE_BATCHES: usize = 4;
/// Busy ticks that measure the link (0.3 s).
const LINK_SAMPLES: usize = 6;

/// The pre-copy state of one outgoing migration.
pub(crate) struct Rounds {
    method: Option<Method>,
    trackers: Vec<Box<dyn Tracker>>,
    /// What the next round copies.
    todo: Todo,
    /// Pages the destination holds (it said so, or this job sent them).
    pub(crate) known: Arc<Mutex<PageSet>>,
    /// Blake3 of every page content the rounds read, by XXH3-128: the final dump then hashes
    /// only what the rounds never saw.
    pub(crate) fast: Arc<Mutex<FastHashes>>,
    throttle: Option<CpuThrottle>,
    /// Pages the destination's store held at preflight (`None`: unknown, ask).
    destination_pages: Option<u64>,
    /// The first round follows the container's writes (policy `follow_writes`).
    follow_writes: bool,
    /// Lazy restore: where the pages read live, for the destination (see `lazy`).
    pub(crate) placement: Option<Arc<Placement>>,
    /// How each process is tracked, for the report.
    pub(crate) tracking: migrate_core::TrackingReport,
    /// Fault hook `refuse_tracking`: processes the main method still refuses.
    pub(crate) refuse_tracking: u32,
}

/// What the readers and streams of a round have done so far, for the link measurement.
#[derive(Default)]
pub(crate) struct Meter {
    /// Pages read (sent, or skipped because the destination holds them).
    pages: AtomicU64,
    /// Bytes written to the page streams.
    wire: AtomicU64,
}

/// Stops dirty-page trackers (removing write protection walks every page table entry of the
/// tracked memory: off the freeze).
pub(crate) fn stop_trackers(trackers: Vec<Box<dyn Tracker>>) -> Result<()> {
    let mut errors = vec![];
    for t in trackers {
        let pid = t.pid();
        if let Err(e) = t.stop() {
            errors.push(format!("pid {pid}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("stopping dirty-page tracking: {}", errors.join("; "))
    }
}

/// What one memory round sent.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) pages: u64,
    pub(crate) bytes: u64,
}

impl Rounds {
    pub(crate) fn new() -> Rounds {
        Rounds {
            method: None,
            trackers: vec![],
            todo: vec![],
            known: Default::default(),
            fast: Default::default(),
            throttle: None,
            destination_pages: None,
            follow_writes: false,
            placement: None,
            tracking: Default::default(),
            refuse_tracking: 0,
        }
    }

    /// Whether the first round follows the container's writes.
    pub(crate) fn set_follow_writes(&mut self, on: bool) {
        self.follow_writes = on;
    }

    /// Records where every page read lives, for a lazy restore (`remember`: and the last read
    /// of every page, for the fault hook that hides one).
    pub(crate) fn set_lazy(&mut self, on: bool, remember: bool) {
        self.placement = on.then(|| {
            Arc::new(if remember {
                Placement::remembering()
            } else {
                Placement::default()
            })
        });
    }

    /// Collects the last writes (the container is frozen): the pages the final dump sends.
    pub(crate) fn collect_final(&mut self) -> Result<u64> {
        self.collect()
    }

    /// Takes what the next round would copy, as chunks.
    pub(crate) fn take_todo_chunks(&mut self) -> Vec<(i32, u64, u64)> {
        deal(&std::mem::take(&mut self.todo), 1).remove(0)
    }

    /// What the destination's preflight said about its page store.
    pub(crate) fn set_destination_pages(&mut self, pages: u64) {
        self.destination_pages = Some(pages);
    }

    pub(crate) fn method(&self) -> Option<Method> {
        self.method
    }

    /// Applies the throttle the state machine asks for (0: none).
    pub(crate) fn throttle(&mut self, host: &str, name: &str, pct: u32) -> Result<()> {
        if self.throttle.is_none() {
            // Created at the first round: it measures the container's CPU use from then on,
            // which the first step is a share of.
            self.throttle = Some(CpuThrottle::new(host, name)?);
        }
        if let Some(t) = &mut self.throttle {
            if pct > 0 || t.is_applied() {
                let cores = t.set(pct)?;
                info!(container = %name, throttle_pct = pct, allowed_cores = ?cores, "CPU throttle set");
            }
        }
        Ok(())
    }

    /// Lifts the throttle (before a rollback lets the container run on, or once frozen).
    pub(crate) fn lift_throttle(&mut self) {
        if let Some(t) = &mut self.throttle {
            if let Err(e) = t.lift() {
                warn!(error = %format!("{e:#}"), "lifting the CPU throttle failed");
            }
        }
    }

    /// Ends tracking on every process and removes every trace of it (CRIU cannot dump a
    /// process that holds a userfaultfd).
    pub(crate) fn stop_tracking(&mut self) -> Result<()> {
        stop_trackers(std::mem::take(&mut self.trackers))
    }

    /// The trackers, which the caller stops with [`stop_trackers`].
    pub(crate) fn take_trackers(&mut self) -> Vec<Box<dyn Tracker>> {
        std::mem::take(&mut self.trackers)
    }

    /// Starts trackers on the container's processes that have none yet; their writable memory
    /// is copied in full by the next round.
    fn track_new_processes(&mut self, host: &str, name: &str) -> Result<()> {
        let method = match self.method {
            Some(m) => m,
            None => {
                let m = memtrack::detect().context("no dirty-page tracking method works here")?;
                self.method = Some(m);
                m
            }
        };
        let pids = ferry_runtime::cgroup_tree::container_pids(host, name)?;
        if pids.is_empty() {
            bail!("container {name:?} has no processes");
        }
        let tracked: HashSet<i32> = self.trackers.iter().map(|t| t.pid()).collect();
        for pid in pids.into_iter().filter(|p| !tracked.contains(p)) {
            let started = if self.refuse_tracking > 0 && method != Method::PageHash {
                self.refuse_tracking -= 1;
                Err(None)
            } else {
                memtrack::start(pid, method).map_err(Some)
            };
            let t = match started {
                Ok(t) => {
                    self.tracking.tracked(&method.to_string());
                    t
                }
                Err(Some(e)) if e.is_process_gone() => continue,
                // One process the method cannot follow (no `syscall` instruction to inject in
                // a zombie or a process between fork and exec, a process already traced...)
                // does not stop the migration: its pages are compared by hash instead.
                Err(e) if method != Method::PageHash => {
                    let e = e.map(|e| e.to_string()).unwrap_or_else(|| {
                        format!("{method} refused by the fault hook refuse_tracking")
                    });
                    warn!(pid, %method, error = %e, "this process is tracked by page hashes instead");
                    match memtrack::start(pid, Method::PageHash) {
                        Ok(t) => {
                            let fallback = Method::PageHash.to_string();
                            self.tracking.tracked(&fallback);
                            self.tracking.fell_back(migrate_core::TrackingFallback {
                                pid,
                                command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                                    .map(|c| c.trim().to_string())
                                    .unwrap_or_default(),
                                method: fallback,
                                reason: e,
                            });
                            t
                        }
                        Err(e) if e.is_process_gone() => continue,
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("tracking pid {pid} with {method}, then by page hashes")
                            })
                        }
                    }
                }
                Err(Some(e)) => {
                    return Err(e).with_context(|| format!("tracking pid {pid} with {method}"))
                }
                Err(None) => unreachable!("the fault hook refuses only the main method"),
            };
            if let Some(p) = &self.placement {
                match p.note_pid(pid) {
                    Ok(()) => {}
                    Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => continue,
                    Err(e) => return Err(e),
                }
            }
            // Tracking first: a write after this point is seen by the next collect.
            match memtrack::writable_regions(pid) {
                Ok(r) => self.todo.push((pid, r)),
                Err(e) if e.is_process_gone() => continue,
                Err(e) => return Err(e).with_context(|| format!("memory map of pid {pid}")),
            }
            self.trackers.push(t);
        }
        Ok(())
    }

    /// Collects what was written since the last collect: the next round's work.
    fn collect(&mut self) -> Result<u64> {
        let mut found = vec![];
        let dirty = self.collect_with(|d| {
            let mut r = d.ranges;
            r.extend(d.new_ranges);
            found.push((d.pid, r));
        })?;
        self.todo.extend(found);
        Ok(dirty)
    }

    /// Collects what was written since the last collect from every tracker, handing each
    /// process's finding to `f`; returns the pages found. Trackers of exited processes go.
    fn collect_with(&mut self, mut f: impl FnMut(memtrack::Dirty)) -> Result<u64> {
        let mut dirty = 0;
        let mut keep = vec![];
        let all = std::mem::take(&mut self.trackers);
        for mut t in all {
            match t.collect() {
                Ok(d) => {
                    dirty += d.dirty_pages() + d.new_pages();
                    f(d);
                    keep.push(t);
                }
                Err(e) if e.is_process_gone() => {}
                Err(e) => {
                    let pid = t.pid();
                    self.trackers = keep;
                    return Err(e).with_context(|| format!("collecting dirty pages of pid {pid}"));
                }
            }
        }
        self.trackers = keep;
        Ok(dirty)
    }

    /// Records a collect in `pass` (new mappings are for the next round).
    fn collect_into(&mut self, pass: &mut FirstPass, following: bool) -> Result<()> {
        self.collect_with(|d| {
            pass.written(d.pid, &d.ranges, following);
            pass.written(d.pid, &d.new_ranges, false);
        })?;
        Ok(())
    }
}

/// What a first round that follows writes measured.
#[derive(Debug, Default)]
struct Followed {
    waited: Duration,
    link_bytes_s: Option<u64>,
}

/// The link's throughput, measured over ticks during which it was kept busy. Pages leave the
/// application in bursts (flow control), so the rate is QUIC's own UDP output, summed over
/// the last [`LINK_SAMPLES`] busy ticks.
#[derive(Default)]
struct LinkRate {
    /// (pages carried, UDP bytes sent, seconds) of recent busy ticks.
    samples: VecDeque<(u64, u64, f64)>,
}

impl LinkRate {
    fn add(&mut self, pages: u64, bytes: u64, secs: f64) {
        self.samples.push_back((pages, bytes, secs));
        if self.samples.len() > LINK_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// (pages/s, bytes/s), once [`LINK_SAMPLES`] busy ticks were seen.
    fn get(&self) -> Option<(f64, f64)> {
        if self.samples.len() < LINK_SAMPLES {
            return None;
        }
        let secs: f64 = self.samples.iter().map(|s| s.2).sum();
        let pages: u64 = self.samples.iter().map(|s| s.0).sum();
        let bytes: u64 = self.samples.iter().map(|s| s.1).sum();
        (secs > 0.0).then(|| (pages as f64 / secs, bytes as f64 / secs))
    }
}

impl Agent {
    /// Keeps the pages of container `name`'s processes (frozen, after a committed pre-copy
    /// migration) in this host's page store. Best effort: a full store keeps what it has.
    pub(crate) async fn keep_own_pages(self: &Arc<Self>, host: &str, name: &str) {
        let (agent, host, n) = (Arc::clone(self), host.to_string(), name.to_string());
        let t = Instant::now();
        let kept = tokio::task::spawn_blocking(move || -> Result<u64> {
            let mut kept = 0u64;
            let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
            for pid in ferry_runtime::cgroup_tree::container_pids(&host, &n)? {
                let Ok(regions) = memtrack::writable_regions(pid) else {
                    continue;
                };
                for (pid, addr, pages) in deal(&vec![(pid, regions)], 1).remove(0) {
                    let n = read_chunk(pid, addr, &mut buf[..pages as usize * PAGE]);
                    let mut store = agent.pages.blocking_lock();
                    for p in buf[..n].chunks_exact(PAGE) {
                        if !store.insert_own(hash_page(p), p) {
                            return Ok(kept);
                        }
                        kept += 1;
                    }
                }
            }
            Ok(kept)
        })
        .await;
        match kept {
            Ok(Ok(pages)) => {
                info!(container = %name, pages, took_ms = ferry_runtime::util::ms(t.elapsed()), "pages of the departed container kept")
            }
            Ok(Err(e)) => {
                warn!(container = %name, error = %format!("{e:#}"), "pages of the departed container not kept")
            }
            Err(e) => {
                warn!(container = %name, error = %e, "pages of the departed container not kept")
            }
        }
    }
}

/// Splits ranges into chunks of at most [`CHUNK_PAGES`] pages, dealt round-robin to `n`
/// workers.
fn deal(todo: &Todo, n: usize) -> Vec<Vec<(i32, u64, u64)>> {
    let mut out = vec![vec![]; n];
    let mut i = 0;
    for (pid, regions) in todo {
        for r in regions {
            let mut a = r.start;
            while a < r.end {
                let pages = ((r.end - a) / PAGE as u64).min(CHUNK_PAGES);
                if pages == 0 {
                    break;
                }
                out[i % n].push((*pid, a, pages));
                i += 1;
                a += pages * PAGE as u64;
            }
        }
    }
    out
}

/// Reads a chunk; returns the bytes read (whole pages; fewer when memory went away).
fn read_chunk(pid: i32, addr: u64, buf: &mut [u8]) -> usize {
    match memtrack::read_memory(pid, addr, buf) {
        Ok(n) => n - n % PAGE,
        Err(_) => 0,
    }
}

impl Agent {
    /// Runs one pre-copy memory and root filesystem round of `job` towards `conn`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn copy_round(
        self: &Arc<Self>,
        handle: &Arc<Job>,
        name: &str,
        conn: &transfer::Connection,
        rounds: &mut Rounds,
        round: u32,
        throttle_pct: u32,
        rootfs: (&std::path::Path, &mut shared_fs::Snapshot),
    ) -> Result<RoundStats> {
        let t0 = Instant::now();
        let job = handle.id.as_str();
        let host = self.cfg.host.clone();
        if let Err(e) = rounds.throttle(&host, name, throttle_pct) {
            if throttle_pct > 0 {
                return Err(e.context("auto-converge cannot throttle the container"));
            }
            warn!(%job, error = %format!("{e:#}"), "CPU throttle unavailable; auto-converge will fail if needed");
        }
        // Trackers live in a blocking thread while they work (ptrace, /proc).
        let mut r = std::mem::replace(rounds, Rounds::new());
        let (h, n) = (host.clone(), name.to_string());
        let (r_back, started) = tokio::task::spawn_blocking(move || {
            let res = r.track_new_processes(&h, &n);
            (r, res)
        })
        .await?;
        *rounds = r_back;
        started?;
        // A destination that holds no pages cannot hold any of these: no need to ask.
        let mut to_send = None;
        if round == 1 && rounds.destination_pages != Some(0) {
            to_send = self.ask_held(handle, conn, rounds).await?;
        }
        // What the round sends: the distinct pages the destination lacks when it was asked
        // (a container coming back sends little), else every page of the round's regions.
        let planned: u64 = to_send.map(|pages| pages * PAGE as u64).unwrap_or_else(|| {
            rounds
                .todo
                .iter()
                .flat_map(|(_, regions)| regions.iter().map(|r| r.end.saturating_sub(r.start)))
                .sum()
        });
        handle.planned_bytes.store(planned, Ordering::Relaxed);
        let follow = round == 1 && rounds.follow_writes && rounds.method == Some(Method::UffdWp);
        let (sent, dirty, followed) = if follow {
            self.follow_round(handle, conn, rounds).await?
        } else {
            let (tx, rx) = crossbeam_channel::unbounded();
            for chunk in deal(&std::mem::take(&mut rounds.todo), 1).remove(0) {
                let _ = tx.send(vec![chunk]);
            }
            drop(tx);
            let sent = self
                .send_pages_parallel(
                    handle,
                    conn,
                    rx,
                    (&rounds.known, &rounds.fast),
                    &Default::default(),
                    rounds.placement.as_ref(),
                )
                .await?;
            if handle.cancel.load(Ordering::SeqCst) {
                bail!("cancelled during pre-copy round {round}");
            }
            let mut r = std::mem::replace(rounds, Rounds::new());
            let (r_back, dirty) = tokio::task::spawn_blocking(move || {
                let d = r.collect();
                (r, d)
            })
            .await?;
            *rounds = r_back;
            (sent, dirty?, Followed::default())
        };
        let loc_bytes = match &rounds.placement {
            Some(p) => self.send_locations(job, conn, p).await?,
            None => 0,
        };
        let fs_bytes = self.send_rootfs_round(job, conn, rootfs).await?;
        let sent = Sent {
            pages: sent.pages,
            bytes: sent.bytes + loc_bytes,
        };
        let duration = t0.elapsed();
        info!(%job, round, method = ?rounds.method, pages_sent = sent.pages, bytes = sent.bytes + fs_bytes,
            rootfs_bytes = fs_bytes, dirty_pages = dirty, ms = ferry_runtime::util::ms(duration),
            waited_ms = ferry_runtime::util::ms(followed.waited), link_bytes_s = ?followed.link_bytes_s, "pre-copy round done");
        Ok(RoundStats {
            pages_sent: sent.pages,
            bytes_sent: sent.bytes + fs_bytes,
            dirty_pages: dirty,
            duration,
            waited: followed.waited,
            link_bytes_s: followed.link_bytes_s,
        })
    }

    /// A first round that follows the container's writes ([`follow_writes`]); returns what
    /// it sent, the pages left for the next round, and what it measured.
    async fn follow_round(
        self: &Arc<Self>,
        handle: &Arc<Job>,
        conn: &transfer::Connection,
        rounds: &mut Rounds,
    ) -> Result<(Sent, u64, Followed)> {
        let job = handle.id.clone();
        let mut pass = FirstPass::new(&std::mem::take(&mut rounds.todo));
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_BATCHES);
        let meter = Arc::new(Meter::default());
        let (known, fast) = (Arc::clone(&rounds.known), Arc::clone(&rounds.fast));
        let placement = rounds.placement.clone();
        let mut r = std::mem::replace(rounds, Rounds::new());
        let (m, h, quic) = (Arc::clone(&meter), Arc::clone(handle), conn.conn.clone());
        let scheduler = tokio::task::spawn_blocking(move || {
            let res = follow_writes(&mut r, &mut pass, tx, &m, &quic, &h.cancel, &h.id);
            (r, pass, res)
        });
        let (sent, scheduled) = tokio::join!(
            self.send_pages_parallel(
                handle,
                conn,
                rx,
                (&known, &fast),
                &meter,
                placement.as_ref()
            ),
            scheduler
        );
        let (r_back, mut pass, followed) = scheduled?;
        *rounds = r_back;
        // A failing stream stops the scheduler ("the page streams ended"): its error is the
        // cause. A failing scheduler (cancel, collect) only ends the streams, which succeed.
        let sent = sent?;
        let followed = followed?;
        let mut r = std::mem::replace(rounds, Rounds::new());
        let (r_back, pass, last) = tokio::task::spawn_blocking(move || {
            let res = r.collect_into(&mut pass, false);
            (r, pass, res)
        })
        .await?;
        *rounds = r_back;
        last?;
        let (todo, dirty) = pass.into_next_round();
        rounds.todo = todo;
        info!(%job, pages_sent = sent.pages, dirty, waited_ms = ferry_runtime::util::ms(followed.waited), "pre-copy round 1 followed the container's writes");
        Ok((sent, dirty, followed))
    }

    /// First round: hashes everything it will copy and asks the destination which pages it
    /// already holds (a container coming back finds most of its memory there); those join
    /// `known`. Returns how many distinct pages it lacks (`None`: too many to ask, all go).
    async fn ask_held(
        &self,
        handle: &Arc<Job>,
        conn: &transfer::Connection,
        rounds: &mut Rounds,
    ) -> Result<Option<u64>> {
        let job = handle.id.as_str();
        let todo = rounds.todo.clone();
        let h2 = Arc::clone(handle);
        let hashes: Vec<PageHash> = tokio::task::spawn_blocking(move || {
            let mut seen = HashSet::new();
            let mut out = vec![];
            let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
            for (pid, addr, pages) in deal(&todo, 1).remove(0) {
                if h2.cancel.load(Ordering::SeqCst) {
                    break;
                }
                let n = read_chunk(pid, addr, &mut buf[..pages as usize * PAGE]);
                for p in buf[..n].chunks_exact(PAGE) {
                    let h = hash_page(p);
                    if seen.insert(h) {
                        out.push(h);
                    }
                }
            }
            out
        })
        .await?;
        if hashes.len() as u64 > crate::proto::MAX_HASHES {
            // Too large to ask at once: copy everything.
            return Ok(None);
        }
        let (mut send, mut recv) = conn.open().await?;
        {
            let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
            write_msg(
                &mut w,
                &PeerRequest::HeldPages {
                    job: job.to_string(),
                    count: hashes.len() as u64,
                },
            )
            .await?;
            transfer::lists::write_hashes(&mut w, &hashes).await?;
            w.flush().await?;
        }
        send.finish()
            .map_err(|e| anyhow::anyhow!("closing the held-pages stream: {e}"))?;
        let bits = match read_msg::<_, PeerResponse>(&mut recv).await? {
            PeerResponse::Held { bitmap } => transfer::lists::decode_bitmap(&bitmap, hashes.len())
                .context("the destination's held-pages answer")?,
            other => return Err(other.into_error("the destination").context("held pages")),
        };
        let mut known = lock(&rounds.known);
        let mut held = 0u64;
        for (h, _) in hashes.iter().zip(&bits).filter(|(_, b)| **b) {
            known.insert(*h);
            held += 1;
        }
        info!(%job, distinct_pages = hashes.len(), held, "destination's page holdings");
        Ok(Some(hashes.len() as u64 - held))
    }

    /// Reads, hashes and sends the pages of the batches from `work` the destination does not
    /// hold, over [`STREAMS`] streams at once, until `work` ends. Sent pages join `known`.
    pub(crate) async fn send_pages_parallel(
        self: &Arc<Self>,
        handle: &Arc<Job>,
        conn: &transfer::Connection,
        work: crossbeam_channel::Receiver<Batch>,
        (known, fast): (&Arc<Mutex<PageSet>>, &Arc<Mutex<FastHashes>>),
        meter: &Arc<Meter>,
        placement: Option<&Arc<Placement>>,
    ) -> Result<Sent> {
        let job = handle.id.as_str();
        let mut tasks = vec![];
        // A queue filled in advance needs no more streams than it has batches.
        let streams = match work.capacity() {
            None => STREAMS.min(work.len()),
            Some(_) => STREAMS,
        };
        for _ in 0..streams {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
            let known = Arc::clone(known);
            let fast = Arc::clone(fast);
            let h = Arc::clone(handle);
            let work = work.clone();
            let m = Arc::clone(meter);
            let place = placement.cloned();
            let reader = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
                let mut spans = Vec::new();
                for batch in work.iter() {
                    // A cancel ends the round at the next batch.
                    if h.cancel.load(Ordering::SeqCst) {
                        return;
                    }
                    // Taken before the read: a later read of a page gets a larger number.
                    let seq = place.as_ref().map_or(0, |p| p.next_seq());
                    spans.clear();
                    let mut n = 0;
                    for (pid, addr, pages) in batch {
                        let want = (pages as usize * PAGE).min(buf.len() - n);
                        let got = read_chunk(pid, addr, &mut buf[n..n + want]);
                        spans.push((pid, addr, got / PAGE));
                        n += got;
                    }
                    m.pages.fetch_add((n / PAGE) as u64, Ordering::Relaxed);
                    let mut out = Vec::with_capacity(n);
                    let hashes: Vec<(u128, PageHash)> = buf[..n]
                        .chunks_exact(PAGE)
                        .map(|p| (fast_key(p), hash_page(p)))
                        .collect();
                    lock(&fast).extend(hashes.iter().copied());
                    if let Some(p) = &place {
                        let mut at = 0;
                        for &(pid, addr, k) in &spans {
                            p.record(
                                pid,
                                addr,
                                seq,
                                hashes[at..at + k].iter().map(|(_, h)| *h).collect(),
                            );
                            at += k;
                        }
                    }
                    {
                        let mut k = lock(&known);
                        for (p, (_, h)) in buf[..n].chunks_exact(PAGE).zip(&hashes) {
                            if k.insert(*h) {
                                out.extend_from_slice(p);
                            }
                        }
                    }
                    if out.is_empty() {
                        continue;
                    }
                    if tx.blocking_send(out).is_err() {
                        return;
                    }
                }
            });
            let conn = conn.clone();
            let job = job.to_string();
            let m = Arc::clone(meter);
            tasks.push(tokio::spawn(async move {
                let (mut send, mut recv) = conn.open().await?;
                let mut bytes;
                let pages;
                {
                    let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
                    bytes = write_msg(&mut w, &PeerRequest::Pages { job }).await?;
                    let mut pw = PageWriter::new(&mut w)?;
                    let mut counted = 0;
                    while let Some(batch) = rx.recv().await {
                        for p in batch.chunks_exact(PAGE) {
                            pw.push(p).await?;
                        }
                        m.wire
                            .fetch_add(pw.wire_bytes() - counted, Ordering::Relaxed);
                        counted = pw.wire_bytes();
                    }
                    let stats = pw.finish().await?;
                    bytes += stats.wire_bytes;
                    pages = stats.pages;
                    w.flush().await?;
                }
                send.finish()
                    .map_err(|e| anyhow::anyhow!("closing a page stream: {e}"))?;
                match read_msg::<_, PeerResponse>(&mut recv).await? {
                    PeerResponse::Ok { .. } => {}
                    other => {
                        return Err(other.into_error("the destination").context("a page stream"))
                    }
                }
                reader.await?;
                Ok::<_, anyhow::Error>(Sent { pages, bytes })
            }));
        }
        let mut sent = Sent::default();
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => {
                    sent.pages += s.pages;
                    sent.bytes += s.bytes;
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(e.into());
                }
            }
        }
        match first_err {
            Some(e) => Err(e.context(format!("sending pre-copy pages of job {job}"))),
            None => Ok(sent),
        }
    }

    /// Sends the root filesystem's changes since `snap` and moves `snap` forward.
    async fn send_rootfs_round(
        &self,
        job: &str,
        conn: &transfer::Connection,
        (root, snap): (&std::path::Path, &mut shared_fs::Snapshot),
    ) -> Result<u64> {
        let (r, before) = (root.to_path_buf(), snap.clone());
        let (now, diff) = tokio::task::spawn_blocking(move || -> Result<_> {
            let now = shared_fs::snapshot(&r)?;
            let diff = shared_fs::diff(&before, &now);
            Ok((now, diff))
        })
        .await??;
        if diff.changed.is_empty() && diff.removed.is_empty() {
            *snap = now;
            return Ok(0);
        }
        let req = PeerRequest::RootfsRound {
            job: job.to_string(),
        };
        let tree = super::peer::Tree {
            root,
            diff: &diff,
            reads: transfer::tree::Reads::Live,
        };
        let sent = super::peer::request_trees(conn, &req, &[tree]).await?;
        super::peer::expect_ok(&conn.peer_host, sent.resp)?;
        *snap = now;
        for p in &sent.unsettled {
            snap.unsettle(p);
        }
        if !sent.unsettled.is_empty() {
            info!(%job, unsettled = sent.unsettled.len(), first = %sent.unsettled[0],
                "root filesystem entries changed while they were read: they go again with the next diff");
        }
        Ok(sent.bytes)
    }
}

#[cfg(test)]
mod tests;
