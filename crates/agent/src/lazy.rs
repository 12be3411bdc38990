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

use crate::proto::{refuse, ErrorCode};
use std::collections::{HashMap, HashSet};
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
/// (host pid, address) -> (sequence number, contents) of the last read of each page.
type LastReads = HashMap<(i32, u64), (u64, PageHash)>;

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
    /// Fault hook `hide_dirty_page` only: the last read of every page, (sequence, contents),
    /// so that the hook can pick a page whose frozen contents the destination lacks.
    last: Option<Mutex<LastReads>>,
}

impl Placement {
    /// A placement that also remembers the last read of every page (fault hook).
    pub(crate) fn remembering() -> Self {
        Placement {
            last: Some(Mutex::new(HashMap::new())),
            ..Default::default()
        }
    }

    /// The sequence number of a read about to start.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records a read of `hashes.len()` pages of `pid` from `addr`.
    pub(crate) fn record(&self, pid: i32, addr: u64, seq: u64, hashes: Vec<PageHash>) {
        if let Some(last) = &self.last {
            let mut last = lock(last);
            for (i, h) in hashes.iter().enumerate() {
                let e = last
                    .entry((pid, addr + (i * PAGE) as u64))
                    .or_insert((seq, *h));
                if e.0 <= seq {
                    *e = (seq, *h);
                }
            }
        }
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

    /// The container pid of host process `pid`.
    pub(crate) fn vpid(&self, pid: i32) -> Option<u32> {
        lock(&self.vpids).get(&pid).copied()
    }

    /// The host pid of container pid `vpid`.
    pub(crate) fn host_pid(&self, vpid: u32) -> Option<i32> {
        lock(&self.vpids)
            .iter()
            .find(|(_, v)| **v == vpid)
            .map(|(h, _)| *h)
    }

    /// Thread id in the container's namespace -> host pid of its process, for every thread of
    /// the processes known here.
    pub(crate) fn thread_owners(&self) -> HashMap<u32, i32> {
        let pids: Vec<i32> = lock(&self.vpids).keys().copied().collect();
        let mut out = HashMap::new();
        for pid in pids {
            let tasks = procfs::process::Process::new(pid).and_then(|p| p.tasks());
            for t in tasks.into_iter().flatten().flatten() {
                if let Some(v) = t
                    .status()
                    .ok()
                    .as_ref()
                    .and_then(ferry_runtime::util::own_nspid)
                {
                    out.insert(v, pid);
                }
            }
        }
        out
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

    /// The reads recorded so far as locations, counted as placed from now on (a request
    /// that fails to place them fails the migration).
    pub(crate) fn take_placed(&self) -> Result<Vec<Location>> {
        let (locations, regions) = self.take()?;
        self.placed(regions);
        Ok(locations)
    }

    pub(crate) fn placed(&self, regions: Vec<PidRegion>) {
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
    let status = procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .with_context(|| format!("reading the status of process {pid}"))?;
    ferry_runtime::util::own_nspid(&status).with_context(|| format!("no NSpid for process {pid}"))
}

/// What follows the location records of a request.
pub(crate) enum Tail<'a> {
    None,
    /// Raw pages, 4096 bytes each.
    Raw(&'a [u8]),
    /// Pages as a page stream (`transfer::pages`, compressed where it pays).
    Stream(&'a [u8]),
}

/// Sends `req` followed by `locations` and then `tail` on a stream of its own; returns the
/// answer and the bytes sent.
pub(crate) async fn request_with_locations(
    conn: &transfer::Connection,
    req: &PeerRequest,
    locations: &[Location],
    tail: Tail<'_>,
) -> Result<(PeerResponse, u64)> {
    let (mut send, mut recv) = conn.open().await?;
    let mut bytes;
    {
        let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
        bytes = write_msg(&mut w, req).await?;
        bytes += transfer::lists::write_locations(&mut w, locations).await?;
        match tail {
            Tail::None => {}
            Tail::Raw(pages) => {
                w.write_all(pages).await?;
                bytes += pages.len() as u64;
            }
            Tail::Stream(pages) => {
                let mut pw = transfer::pages::PageWriter::new(&mut w)?;
                for p in pages.chunks_exact(PAGE) {
                    pw.push(p).await?;
                }
                bytes += pw.finish().await?.wire_bytes;
            }
        }
        w.flush().await?;
    }
    send.finish()
        .map_err(|e| anyhow::anyhow!("closing a request stream to {}: {e}", conn.peer_host))?;
    match read_msg::<_, PeerResponse>(&mut recv).await? {
        e @ PeerResponse::Error { .. } => Err(e.into_error(&conn.peer_host)),
        r => Ok((r, bytes)),
    }
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
        send_location_list(job.to_string(), conn, placement.take_placed()?).await
    }
}

/// Sends location records (see [`Agent::send_locations`]).
pub(crate) async fn send_location_list(
    job: String,
    conn: &transfer::Connection,
    locations: Vec<Location>,
) -> Result<u64> {
    if locations.is_empty() {
        return Ok(0);
    }
    let req = PeerRequest::PageMap {
        job,
        count: locations.len() as u64,
        with_pages: false,
    };
    let (answer, bytes) = request_with_locations(conn, &req, &locations, Tail::None).await?;
    if !matches!(answer, PeerResponse::Ok { .. }) {
        bail!("unexpected answer to page locations: {answer:?}");
    }
    Ok(bytes)
}

/// An outgoing lazy job's frozen copy, which its destination may read
/// ([`PeerRequest::FetchPages`]): per container pid, the host pid and the lazy memory.
pub(crate) struct FrozenCopy {
    to: String,
    procs: HashMap<u32, (i32, Vec<Region>)>,
}

/// Pages served per [`PeerRequest::FetchPages`] at most (4 MiB, CRIU's largest request).
pub(crate) const MAX_FETCH_PAGES: u64 = 1024;

impl Agent {
    /// Lets `to` read the lazy memory of job `job`'s frozen copy.
    pub(crate) fn keep_frozen_copy(&self, job: &str, to: &str, regions: &[LazyRegion]) {
        let mut procs: HashMap<u32, (i32, Vec<Region>)> = HashMap::new();
        for r in regions {
            procs
                .entry(r.vpid)
                .or_insert((r.host, vec![]))
                .1
                .push(r.region);
        }
        lock(&self.frozen_copies).insert(
            job.to_string(),
            std::sync::Arc::new(FrozenCopy {
                to: to.to_string(),
                procs,
            }),
        );
    }

    /// Ends what [`Self::keep_frozen_copy`] allowed.
    pub(crate) fn forget_frozen_copy(&self, job: &str) {
        lock(&self.frozen_copies).remove(job);
    }

    /// Answers [`PeerRequest::FetchPages`] on `send`: the pages from the frozen copy, if
    /// `peer` is the job's destination and they are its lazy memory.
    pub(crate) async fn serve_fetch(
        &self,
        peer: &str,
        job: &str,
        pid: u32,
        vaddr: u64,
        nr_pages: u64,
        send: &mut transfer::SendStream,
    ) -> Result<()> {
        let read = async {
            let copy = lock(&self.frozen_copies)
                .get(job)
                .cloned()
                .with_context(|| format!("no frozen copy of job {job} here"))?;
            if copy.to != peer {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("job {job} goes to {}, not {peer}", copy.to),
                ));
            }
            if nr_pages == 0 || nr_pages > MAX_FETCH_PAGES || !vaddr.is_multiple_of(PAGE as u64) {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    format!(
                        "{nr_pages} pages at {vaddr:#x} asked (1-{MAX_FETCH_PAGES}, page-aligned)"
                    ),
                ));
            }
            let end = vaddr + nr_pages * PAGE as u64;
            let host = copy
                .procs
                .get(&pid)
                .filter(|(_, rs)| rs.iter().any(|r| r.start <= vaddr && end <= r.end))
                .map(|(h, _)| *h)
                .with_context(|| {
                    format!("{nr_pages} pages at {vaddr:#x} of pid {pid} are not lazy memory of the container")
                })?;
            tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                let mut buf = vec![0u8; nr_pages as usize * PAGE];
                read_frozen(host, vaddr, &mut buf)?;
                Ok(buf)
            })
            .await?
        };
        match read.await {
            Ok(pages) => {
                write_msg(send, &PeerResponse::Fetched { nr_pages }).await?;
                send.write_all(&pages).await?;
                Ok(())
            }
            Err(e) => {
                write_msg(send, &PeerResponse::error(&e)).await?;
                Err(e)
            }
        }
    }
}

/// Lazy memory of the frozen copy: which the integrity check hashes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LazyRegion {
    pub(crate) host: i32,
    pub(crate) vpid: u32,
    pub(crate) region: Region,
}

/// Fault hook: leaves out of the final set one page whose frozen contents differ from the
/// last read the destination placed, as a write the tracking missed would be.
pub(crate) fn hide_one_page(chunks: &mut Vec<(i32, u64, u64)>, placement: &Placement) -> u64 {
    let Some(last) = &placement.last else {
        tracing::warn!("fault hook hide_dirty_page: pages were placed without remembering them; nothing hidden");
        return 0;
    };
    let last = lock(last);
    let mut page = vec![0u8; PAGE];
    // From the end: the highest address, in the workload's data rather than the heap that
    // every process touches at once.
    let target = chunks.iter().rev().find_map(|&(pid, addr, n)| {
        (0..n).rev().map(|i| addr + i * PAGE as u64).find_map(|at| {
            let (_, placed) = last.get(&(pid, at))?;
            let read = matches!(memtrack::read_memory(pid, at, &mut page), Ok(k) if k == PAGE);
            (read && transfer::pages::hash_page(&page) != *placed).then_some((pid, at))
        })
    });
    if let Some((pid, at)) = target {
        tracing::warn!(
            pid,
            addr = format_args!("{at:#x}"),
            "fault hook: a page written since the last round is left out of the final dump"
        );
        let mut out = Vec::with_capacity(chunks.len() + 1);
        for &(p, addr, n) in chunks.iter() {
            let end = addr + n * PAGE as u64;
            if p != pid || at < addr || at >= end {
                out.push((p, addr, n));
                continue;
            }
            if at > addr {
                out.push((p, addr, (at - addr) / PAGE as u64));
            }
            if at + (PAGE as u64) < end {
                out.push((p, at + PAGE as u64, (end - at) / PAGE as u64 - 1));
            }
        }
        *chunks = out;
        return 1;
    }
    tracing::warn!("fault hook hide_dirty_page: no page written since the last round differs from its placed copy; nothing hidden");
    0
}

/// Reads and hashes the frozen copy's lazy memory in batches of at most
/// [`crate::proto::MAX_VERIFY_PAGES`] pages, in address order per process (the order in which
/// the destination's daemon fills it in), and sends each batch to `tx`.
pub(crate) fn hash_frozen_copy(
    regions: &[LazyRegion],
    hot: &[(i32, u64, u64)],
    tx: &tokio::sync::mpsc::Sender<Result<Vec<Location>>>,
) -> Result<()> {
    let max = crate::proto::MAX_VERIFY_PAGES;
    let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
    let (mut batch, mut n) = (Vec::new(), 0u64);
    // The pages written last first (a write the tracking missed is most likely among them,
    // and the container most likely to touch them again at once), then everything else.
    let mut first: Vec<(i32, u32, u64, u64)> = vec![];
    let mut done: HashSet<(i32, u64)> = HashSet::new();
    for &(host, addr, pages) in hot {
        let end = addr + pages * PAGE as u64;
        for r in regions.iter().filter(|r| r.host == host) {
            let (a, b) = (addr.max(r.region.start), end.min(r.region.end));
            // Runs of pages not listed yet (chunks may overlap).
            let mut p = a;
            while p < b {
                let start = p;
                while p < b && done.insert((host, p)) {
                    p += PAGE as u64;
                }
                if p > start {
                    first.push((host, r.vpid, start, p));
                } else {
                    p += PAGE as u64;
                }
            }
        }
    }
    let mut rest: Vec<(i32, u32, u64, u64)> = vec![];
    for r in regions {
        // Runs of the region's pages not verified first.
        let mut a = r.region.start;
        while a < r.region.end {
            if done.contains(&(r.host, a)) {
                a += PAGE as u64;
                continue;
            }
            let mut b = a;
            while b < r.region.end && !done.contains(&(r.host, b)) {
                b += PAGE as u64;
            }
            rest.push((r.host, r.vpid, a, b));
            a = b;
        }
    }
    let hot_runs = first.len();
    for (i, (host, vpid, start, end)) in first.into_iter().chain(rest).enumerate() {
        let mut a = start;
        while a < end {
            let k = ((end - a) / PAGE as u64).min(CHUNK_PAGES).min(max - n);
            let len = k as usize * PAGE;
            read_frozen(host, a, &mut buf[..len])?;
            batch.push(Location {
                pid: vpid,
                vaddr: a,
                seq: 0,
                hashes: buf[..len]
                    .chunks_exact(PAGE)
                    .map(transfer::pages::hash_page)
                    .collect(),
            });
            n += k;
            a += len as u64;
            if n == max {
                if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                    return Ok(());
                }
                n = 0;
            }
        }
        // The hot pages go at once.
        if i + 1 == hot_runs && !batch.is_empty() {
            if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                return Ok(());
            }
            n = 0;
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
    Ok(())
}

/// How far above a thread's stack pointer the final dump reads the frozen copy again: the
/// frames of the calls that made the interrupted system call.
pub(crate) const STACK_REREAD_BYTES: u64 = 8 << 10;

/// Reads all of `buf` from the frozen copy of host process `pid` at `addr`.
pub(crate) fn read_frozen(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let got = memtrack::read_memory(pid, addr, buf)
        .with_context(|| format!("reading the frozen copy of pid {pid} at {addr:#x}"))?;
    if got < buf.len() {
        bail!(
            "the frozen copy of pid {pid} has {got} bytes at {addr:#x}, not {}",
            buf.len()
        );
    }
    Ok(())
}

/// Pages read per chunk of the final dump's reads (1 MiB).
pub(crate) const CHUNK_PAGES: u64 = 256;

#[cfg(test)]
mod tests;
