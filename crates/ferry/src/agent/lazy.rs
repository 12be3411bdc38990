//! Lazy restore, source side: where each page the rounds send lives, and the final dump that
//! writes no memory the destination already has.
//!
//! Every page a round reads is recorded with its process, address and a sequence number taken
//! before the read ([`Placement`]); after the round's pages are in the destination's store the
//! records follow ([`Agent::send_locations`]). A page written after it was read is in a later
//! collect, hence read again with a larger sequence number: the destination keeps, for each
//! address, the read with the largest number, which is the page's content at the freeze.
//!
//! The final dump ([`super::source`]) freezes the container, collects the last written pages
//! and sends them, while CRIU dumps lazily (no contents for lazy memory). It then checks the
//! dump's pagemaps: any lazy page the destination has no location for (memory the rounds never
//! read: a process that started after the last round, a mapping that is not writable) is read
//! from the frozen container and sent too, so that the destination never lacks a page.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use memtrack::Region;
use tokio::io::AsyncWriteExt;
use transfer::frame::{read_msg, write_msg};
use transfer::lists::Location;
use transfer::pages::{PageHash, PAGE};

use super::{lock, Agent};
use crate::proto::{PeerRequest, PeerResponse};

/// One read: pages of a process (host pid) from an address, and their contents.
type Read = (i32, u64, u64, Vec<PageHash>);
/// Addresses of a host process.
type PidRegion = (i32, Region);

/// What the destination knows of where pages live (see the module's documentation).
#[derive(Default)]
pub(crate) struct Placement {
    seq: AtomicU64,
    /// Reads not yet sent as locations.
    pending: Mutex<Vec<Read>>,
    /// Per host pid, the addresses the destination has a location for (normalized).
    placed: Mutex<HashMap<i32, Vec<Region>>>,
    /// Host pid -> pid in the container's namespace.
    vpids: Mutex<HashMap<i32, u32>>,
}

impl Placement {
    /// The sequence number of a read about to start.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records a read of `hashes.len()` pages of `pid` from `addr`.
    pub(crate) fn record(&self, pid: i32, addr: u64, seq: u64, hashes: Vec<PageHash>) {
        if !hashes.is_empty() {
            lock(&self.pending).push((pid, addr, seq, hashes));
        }
    }

    /// Learns the container pid of host process `pid` (once).
    pub(crate) fn note_pid(&self, pid: i32) -> Result<()> {
        if lock(&self.vpids).contains_key(&pid) {
            return Ok(());
        }
        let vpid = vpid_of(pid)?;
        lock(&self.vpids).insert(pid, vpid);
        Ok(())
    }

    /// The host pid of container pid `vpid`.
    pub(crate) fn host_pid(&self, vpid: u32) -> Option<i32> {
        lock(&self.vpids)
            .iter()
            .find(|(_, v)| **v == vpid)
            .map(|(h, _)| *h)
    }

    /// The parts of `r` of host process `pid` the destination has no location for.
    pub(crate) fn unplaced(&self, pid: i32, r: Region) -> Vec<Region> {
        match lock(&self.placed).get(&pid) {
            Some(set) => memtrack::subtract_regions(r, set),
            None => vec![r],
        }
    }

    fn take(&self) -> Result<(Vec<Location>, Vec<PidRegion>)> {
        let reads = std::mem::take(&mut *lock(&self.pending));
        let vpids = lock(&self.vpids).clone();
        let mut locations = Vec::with_capacity(reads.len());
        let mut regions = Vec::with_capacity(reads.len());
        for (pid, addr, seq, hashes) in reads {
            let Some(vpid) = vpids.get(&pid) else {
                bail!("pages of process {pid} were read before its container pid was known");
            };
            regions.push((
                pid,
                Region {
                    start: addr,
                    end: addr + (hashes.len() * PAGE) as u64,
                },
            ));
            locations.push(Location {
                pid: *vpid,
                vaddr: addr,
                seq,
                hashes,
            });
        }
        Ok((locations, regions))
    }

    fn placed(&self, regions: Vec<PidRegion>) {
        let mut by_pid: HashMap<i32, Vec<Region>> = HashMap::new();
        for (pid, r) in regions {
            by_pid.entry(pid).or_default().push(r);
        }
        let mut placed = lock(&self.placed);
        for (pid, mut rs) in by_pid {
            let set = placed.entry(pid).or_default();
            rs.append(set);
            *set = memtrack::normalize_regions(rs);
        }
    }
}

/// The pid of host process `pid` in its own (the container's) PID namespace: the last
/// `NSpid` field of its status.
pub(crate) fn vpid_of(pid: i32) -> Result<u32> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no NSpid in {path}"))
}

impl Agent {
    /// Sends the reads recorded so far as locations (their pages must already be at the
    /// destination); returns the bytes sent.
    pub(crate) async fn send_locations(
        &self,
        job: &str,
        conn: &transfer::Connection,
        placement: &Placement,
    ) -> Result<u64> {
        let (locations, regions) = placement.take()?;
        if locations.is_empty() {
            return Ok(0);
        }
        let (mut send, mut recv) = conn.open().await?;
        let mut bytes;
        {
            let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
            bytes = write_msg(
                &mut w,
                &PeerRequest::PageMap {
                    job: job.to_string(),
                    count: locations.len() as u64,
                },
            )
            .await?;
            bytes += transfer::lists::write_locations(&mut w, &locations).await?;
            w.flush().await?;
        }
        send.finish()
            .map_err(|e| anyhow::anyhow!("closing the page locations stream: {e}"))?;
        match read_msg::<_, PeerResponse>(&mut recv).await? {
            PeerResponse::Ok { .. } => {}
            PeerResponse::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer to page locations: {other:?}"),
        }
        placement.placed(regions);
        Ok(bytes)
    }
}

/// Pages read per chunk of the final dump's reads (1 MiB).
const CHUNK_PAGES: u64 = 256;
/// How long the source keeps its frozen copy for a destination that has not finished filling.
const FILL_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

impl super::source::Driver {
    /// Pre-copy's final dump for a lazy restore: freezes, sends the last written pages with
    /// their locations while CRIU dumps without lazy memory, then sends any lazy page the
    /// destination has no location for. The container stays in place, frozen, until the fill
    /// ends at the destination.
    pub(super) async fn dump_lazy(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let t0 = std::time::Instant::now();
        // A throttled container must reach the freezer at once.
        self.rounds.lift_throttle();
        let (host, name) = (self.agent.cfg.host.clone(), self.spec.name.clone());
        let layout = self.agent.layout(&name);
        let (h, n) = (host.clone(), name.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            crate::runtime::freeze(&h, &n)?;
            // The copy left in place must stay silent (see set_veth).
            if let Err(e) = crate::runtime::set_veth(&layout, false) {
                crate::runtime::thaw(&h, &n);
                return Err(e);
            }
            Ok(())
        })
        .await??;
        self.source_link_down = true;
        let freeze_ms = crate::util::ms(t0.elapsed());
        // The last writes; then tracking ends (CRIU cannot dump a process that holds a
        // userfaultfd), and every process gets its container pid.
        let mut rounds = std::mem::replace(&mut self.rounds, super::rounds::Rounds::new());
        let (h, n) = (host.clone(), name.clone());
        let (rounds, collected) = tokio::task::spawn_blocking(move || {
            let collected = rounds.collect_final();
            let stopped = rounds.stop_tracking();
            let r = (|| -> Result<u64> {
                let dirty = collected?;
                stopped?;
                if let Some(p) = &rounds.placement {
                    for pid in crate::runtime::container_pids(&h, &n)? {
                        p.note_pid(pid)?;
                    }
                }
                Ok(dirty)
            })();
            (rounds, r)
        })
        .await?;
        self.rounds = rounds;
        let dirty = match collected {
            Ok(d) => d,
            Err(e) => {
                self.resume_source();
                return Err(e);
            }
        };
        let placement = self
            .rounds
            .placement
            .clone()
            .context("a lazy dump without page placement")?;
        match self.lazy_dump_and_send(&placement).await {
            Ok((bytes, extra, eager, lazy, round_trips)) => {
                self.lazy_dumped = true;
                self.memory = Some(migrate_core::MemoryReport {
                    restore: "lazy".into(),
                    frozen_round_trips: round_trips,
                    final_dirty_pages: dirty,
                    eager_pages: eager,
                    lazy_pages: lazy,
                    unplaced_pages: extra,
                    ..Default::default()
                });
                tracing::info!(%job, freeze_ms, dirty_pages = dirty, unplaced_pages = extra,
                    eager_pages = eager, lazy_pages = lazy, bytes,
                    ms = crate::util::ms(t0.elapsed()), "lazy dump done");
                Ok(bytes)
            }
            Err(e) => {
                self.resume_source();
                Err(e)
            }
        }
    }

    /// The part of [`Self::dump_lazy`] after the freeze: returns (bytes sent, pages sent for
    /// lack of a location, eager pages, lazy pages, round trips to the destination).
    async fn lazy_dump_and_send(
        &mut self,
        placement: &std::sync::Arc<Placement>,
    ) -> Result<(u64, u64, u64, u64, u32)> {
        let job = self.job.id.clone();
        let run_dir = self.agent.cfg.state_dir.join("run");
        std::fs::create_dir_all(&run_dir)?;
        let sock = run_dir.join(format!("{job}.ps"));
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("listening on {}", sock.display()))?;
        let runc = self.agent.runc.bounded(self.dump_bound());
        let name = self.spec.name.clone();
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let (logs, job_id) = (self.agent.cfg.state_dir.join("logs"), job.clone());
        let (im, s) = (images.clone(), sock.clone());
        let mut ckpt = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&im);
            std::fs::create_dir_all(&im)?;
            std::fs::create_dir_all(&work)?;
            let t = std::time::Instant::now();
            let r = runc.checkpoint_relayed(&name, &im, &work, &s, true);
            tracing::info!(container = %name, checkpoint_ms = crate::util::ms(t.elapsed()), "dumped lazily");
            crate::runtime::keep_log(&work.join("dump.log"), &logs, &format!("{job_id}.dump.log"));
            r
        });
        let criu = tokio::select! {
            a = listener.accept() => {
                let _ = std::fs::remove_file(&sock);
                a.context("accepting CRIU's page-server connection")?.0
            }
            r = &mut ckpt => {
                let _ = std::fs::remove_file(&sock);
                r??;
                bail!("CRIU finished without connecting to the page-server socket");
            }
        };
        // CRIU reads this once its images are written; its answer says they are.
        let (mut criu_r, mut criu_w) = criu.into_split();
        criu_sys::page_server::write_message_async(
            &mut criu_w,
            &criu_sys::page_server::Message::Close,
        )
        .await
        .context("closing CRIU's lazy page server")?;
        let conn = self.conn().await?;
        let chunks = self.rounds.take_todo_chunks();
        let sent = self.send_chunks(&conn, chunks, placement).await;
        // The close's answer says the images are complete; CRIU may also answer and exit
        // before it is read: the answer then waits in the socket.
        let close = criu_sys::page_server::Message::Close;
        let mut dumped = None;
        let answer = tokio::select! {
            biased;
            r = criu_sys::page_server::read_reply_async(&mut criu_r, &close) => r,
            r = &mut ckpt => {
                dumped = Some(r.map_err(anyhow::Error::from).and_then(|r| r));
                match tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    criu_sys::page_server::read_reply_async(&mut criu_r, &close),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(criu_sys::page_server::ProtocolError::NoReply {
                        command: close.command(),
                    }),
                }
            }
        };
        let dumped = match dumped {
            Some(d) => d,
            None => ckpt.await.map_err(anyhow::Error::from).and_then(|r| r),
        };
        dumped?;
        answer.context("CRIU's lazy dump did not answer its page server's close")?;
        let (mut bytes, mut round_trips) = sent?;
        // Lazy pages the destination has no location for go now.
        let p = std::sync::Arc::clone(placement);
        let (missing, eager, lazy) = tokio::task::spawn_blocking(move || -> Result<_> {
            let maps = criu_sys::image::read_pagemaps(&images)?;
            let (mut missing, mut eager, mut lazy) = (vec![], 0u64, 0u64);
            for (vpid, entries) in maps {
                for e in entries {
                    if !e.is_lazy_only() {
                        eager += e.nr_pages;
                        continue;
                    }
                    lazy += e.nr_pages;
                    let Some(host) = p.host_pid(vpid) else {
                        bail!("process {vpid} of the dump was not among the container's processes at the freeze");
                    };
                    for r in p.unplaced(host, Region { start: e.vaddr, end: e.end() }) {
                        let mut a = r.start;
                        while a < r.end {
                            let n = ((r.end - a) / PAGE as u64).min(CHUNK_PAGES);
                            missing.push((host, a, n));
                            a += n * PAGE as u64;
                        }
                    }
                }
            }
            Ok((missing, eager, lazy))
        })
        .await??;
        let extra: u64 = missing.iter().map(|c| c.2).sum();
        if !missing.is_empty() {
            let (b, r) = self.send_chunks(&conn, missing, placement).await?;
            bytes += b;
            round_trips += r;
        }
        Ok((bytes, extra, eager, lazy, round_trips))
    }

    /// Reads, sends and places `chunks` (host pid, address, pages) of the frozen container;
    /// returns the bytes and the round trips it took.
    async fn send_chunks(
        &mut self,
        conn: &transfer::Connection,
        chunks: Vec<(i32, u64, u64)>,
        placement: &std::sync::Arc<Placement>,
    ) -> Result<(u64, u32)> {
        let streams = u32::from(!chunks.is_empty());
        let (tx, rx) = crossbeam_channel::unbounded();
        for c in chunks {
            let _ = tx.send(vec![c]);
        }
        drop(tx);
        let (known, fast) = (
            std::sync::Arc::clone(&self.rounds.known),
            std::sync::Arc::clone(&self.rounds.fast),
        );
        let sent = self
            .agent
            .send_pages_parallel(
                &self.job,
                conn,
                rx,
                (&known, &fast),
                &Default::default(),
                Some(placement),
            )
            .await?;
        let loc = self
            .agent
            .send_locations(&self.job.id, conn, placement)
            .await?;
        Ok((sent.bytes + loc, streams + u32::from(loc > 0)))
    }

    /// Waits until the destination says the lazy restore has all its memory. If it failed
    /// (the daemon or the destination's agent died, a page was missing), the destination has
    /// stopped and removed its copy, whose memory was incomplete: the container resumes here
    /// from the frozen copy, as it was at the freeze, and the error says so.
    pub(super) async fn wait_for_fill(&mut self) -> Result<()> {
        let job = self.job.id.clone();
        let req = PeerRequest::FillWait { job: job.clone() };
        // Only the destination's word decides: while it cannot be reached, it may be filling
        // in fine, and two copies must never run.
        let until = std::time::Instant::now() + FILL_WAIT;
        let mut wait = std::time::Duration::from_millis(100);
        let answer = loop {
            let r = async {
                let conn = self.conn().await?;
                super::peer::request(&conn, &req, &[]).await
            }
            .await;
            match r {
                Ok(a) => break Ok(a),
                Err(e) if std::time::Instant::now() + wait >= until => break Err(e),
                Err(e) => {
                    tracing::warn!(%job, error = %format!("{e:#}"), "no answer about the fill yet; asking again");
                    self.agent.forget_conn(&self.to).await;
                    self.conn = None;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(2));
                }
            }
        };
        let why = match answer {
            Ok((
                PeerResponse::Filled {
                    pages,
                    requests,
                    fill_ms,
                },
                _,
            )) => {
                tracing::info!(%job, pages, requests, fill_ms, "destination filled in the container's memory; the frozen copy goes");
                if let Some(m) = &mut self.memory {
                    m.fill_pages = Some(pages);
                    m.fill_ms = Some(fill_ms as f64);
                    m.fill_mib_s =
                        Some(pages as f64 * 4096.0 / 1048576.0 / (fill_ms.max(1) as f64 / 1000.0));
                }
                return Ok(());
            }
            Ok((PeerResponse::Error { message }, _)) => message,
            Ok((other, _)) => format!("unexpected answer about the fill: {other:?}"),
            Err(e) => {
                // Unknown: the copy there may run; this one must not. It is removed.
                let why = format!(
                    "no answer about the fill from {} within {} s: {e:#}",
                    self.to,
                    FILL_WAIT.as_secs()
                );
                tracing::error!(%job, error = %why, "the fill's outcome is unknown: the frozen copy is removed");
                if let Some(m) = &mut self.memory {
                    m.fill_error = Some(why.clone());
                }
                bail!("{why}");
            }
        };
        tracing::error!(%job, error = %why, "the destination's lazy restore failed: the container resumes here from its frozen copy");
        let resumed = self.resume_frozen_copy().await;
        let done = match &resumed {
            Ok(()) => format!(
                "it runs on {} again, from its state at the freeze",
                self.agent.cfg.host
            ),
            Err(e) => format!("resuming it on {} failed too: {e:#}", self.agent.cfg.host),
        };
        if let Some(m) = &mut self.memory {
            m.fill_error = Some(format!("{why}; {done}"));
        }
        bail!(
            "the lazy restore at {} failed after the commit ({why}); {done}",
            self.to
        )
    }
}

impl super::source::Driver {
    /// After a failed fill: points the overlay back here, and lets the frozen copy run on.
    async fn resume_frozen_copy(&mut self) -> Result<()> {
        let me = self.agent.cfg.host.clone();
        // The destination removed its copy (and its routes) before it answered.
        let routed = self
            .agent
            .route_everywhere(&self.spec.mac, Some(&me), None)
            .await;
        self.resume_source();
        if let Some(c) = lock(&self.agent.containers).get_mut(&self.spec.name) {
            c.migrating = false;
        }
        self.agent.save_containers();
        let job = &self.job.id;
        let (images, work) = (self.agent.images_dir(job), self.agent.work_dir(job));
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(images);
            let _ = std::fs::remove_dir_all(work);
        })
        .await;
        routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_become_locations_and_placed_addresses() {
        let p = Placement::default();
        let me = std::process::id() as i32;
        p.note_pid(me).expect("own NSpid");
        let (a, b) = (p.next_seq(), p.next_seq());
        assert!(b > a, "sequence numbers grow");
        p.record(me, 0x10000, a, vec![[1; 32], [2; 32]]);
        p.record(me, 0x20000, b, vec![]);
        let (locs, regions) = p.take().expect("known pid");
        assert_eq!(locs.len(), 1, "an empty read is not recorded");
        assert_eq!(locs[0].vaddr, 0x10000);
        assert_eq!(locs[0].seq, a);
        assert_eq!(locs[0].pid, vpid_of(me as i32).unwrap());
        p.placed(regions);
        let r = Region {
            start: 0xf000,
            end: 0x13000,
        };
        assert_eq!(
            p.unplaced(me, r),
            vec![
                Region {
                    start: 0xf000,
                    end: 0x10000
                },
                Region {
                    start: 0x12000,
                    end: 0x13000
                }
            ]
        );
        assert_eq!(p.host_pid(locs[0].pid), Some(me));
        // A read of a process whose container pid is unknown cannot be placed.
        p.record(1 << 30, 0, p.next_seq(), vec![[0; 32]]);
        assert!(p.take().is_err());
    }
}
