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

use crate::proto::{refuse, ErrorCode};
mod run;

pub(crate) use run::FillRecord;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::AsFd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use criu_driver::page_server::{
    read_message_async, write_payload_async, write_reply_async, Message, Reply, PAGE_SIZE,
};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};
use transfer::lists::Location;
use transfer::pages::PageHash;

use super::{lock, Agent};
use crate::proto::PeerResponse;

/// Where each page of a lazy restore comes from: (pid in the container, page address) ->
/// content, the sequence number of the read that gave it, and whether it was served; and per
/// content, how many pages not served yet have it, so that a content's last use is known and
/// its memory can leave the store at once (see [`FillPages::take`]).
#[derive(Debug, Default)]
pub(crate) struct PageIndex {
    at: HashMap<(u32, u64), Placed, foldhash::fast::RandomState>,
    unserved: HashMap<PageHash, u32, transfer::pages::PageHashBuilder>,
}

#[derive(Debug, Clone, Copy)]
struct Placed {
    hash: PageHash,
    seq: u64,
    served: bool,
    /// The integrity check compared it.
    checked: bool,
}

impl PageIndex {
    /// The content and read sequence number of the page at `key`.
    pub(crate) fn get(&self, key: &(u32, u64)) -> Option<(PageHash, u64)> {
        self.at.get(key).map(|p| (p.hash, p.seq))
    }

    /// Sets the page at `key` (keeping whether it was served and checked).
    pub(crate) fn set(&mut self, key: (u32, u64), hash: PageHash, seq: u64) {
        let new = Placed {
            hash,
            seq,
            served: false,
            checked: false,
        };
        let served = match self.at.insert(key, new) {
            Some(old) => {
                if !old.served {
                    self.unuse(&old.hash);
                }
                let p = self.at.get_mut(&key).expect("just set");
                p.served = old.served;
                p.checked = old.checked;
                old.served
            }
            None => false,
        };
        if !served && hash != REMOTE {
            *self.unserved.entry(hash).or_default() += 1;
        }
    }

    fn unuse(&mut self, h: &PageHash) -> bool {
        match self.unserved.get_mut(h) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.unserved.remove(h);
                true
            }
            None => false,
        }
    }

    /// Marks the page at `key` served; returns its content if no page left to serve has it.
    fn serve(&mut self, key: &(u32, u64)) -> Option<PageHash> {
        let p = self.at.get_mut(key)?;
        if p.served {
            return None;
        }
        p.served = true;
        let h = p.hash;
        (h != REMOTE && self.unuse(&h)).then_some(h)
    }

    /// Serves the page at `key` from the store: marks it served and returns its content, and
    /// that content again if no page left to serve has it. None (nothing marked) for a page
    /// not placed here or to fetch from the source.
    /// With `checked_only`, a page the integrity check has not compared is not served either.
    fn serve_local(
        &mut self,
        key: &(u32, u64),
        checked_only: bool,
    ) -> Option<(PageHash, Option<PageHash>)> {
        let p = self
            .at
            .get_mut(key)
            .filter(|p| p.hash != REMOTE && (p.checked || !checked_only))?;
        let h = p.hash;
        if p.served {
            return Some((h, None));
        }
        p.served = true;
        Some((h, self.unuse(&h).then_some(h)))
    }

    /// The content of the page at `key`, and whether it was served; with `check`, marks it
    /// compared by the integrity check.
    fn placed(&mut self, key: &(u32, u64), check: bool) -> Option<(PageHash, bool)> {
        let p = self.at.get_mut(key)?;
        p.checked |= check;
        Some((p.hash, p.served))
    }

    fn is_checked(&self, key: &(u32, u64)) -> bool {
        self.at.get(key).is_some_and(|p| p.checked)
    }

    pub(crate) fn len(&self) -> usize {
        self.at.len()
    }
}

/// The "hash" of a page to fetch from the source's frozen copy (post-copy): a location
/// with it supersedes the versions this host holds.
pub(crate) const REMOTE: PageHash = [0; 32];

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
    /// Pages fetched from the source, and of them those a fault asked for.
    pub(crate) fetched: u64,
    pub(crate) fetched_on_fault: u64,
}

/// The outcome of a fill, once known.
pub(crate) type FillOutcome =
    tokio::sync::watch::Sender<Option<std::result::Result<FillStats, String>>>;

/// A fill under way or ended: its pins, and its outcome once known.
pub(crate) struct Fill {
    /// The source of the job: the only peer that may ask about it.
    pub(crate) from: String,
    pub(crate) pinned: transfer::pages::PageSet,
    /// Pages the store forgot once they were in (`Agent::release_filled`).
    pub(crate) forgotten: u64,
    pub(crate) done: FillOutcome,
    /// The pages it serves, which the integrity check compares and corrects.
    pub(crate) pages: Arc<FillPages>,
}

/// A fill that ended, kept for its source's late questions.
pub(crate) struct Ended {
    pub(crate) from: String,
    pub(crate) done: FillOutcome,
    /// Until the source's integrity check is over (its `FillWait` answered).
    pub(crate) pages: Option<Arc<FillPages>>,
}

/// How long the background fill waits for a silent integrity check before it takes pages the
/// check has not reached.
const VERIFY_STALL: Duration = Duration::from_secs(2);

/// How long a page the integrity check found stale waits for its correction before it is
/// served as it is (the source has gone silent; the mismatch is logged and counted).
const HELD_LIMIT: Duration = Duration::from_secs(30);

/// The pages of a lazy restore and the integrity check's view of them.
pub(crate) struct FillPages {
    state: std::sync::Mutex<Served>,
    /// Woken when held pages are released.
    released: tokio::sync::Notify,
}

struct Served {
    index: PageIndex,
    /// The source checks this fill and has not said it is done.
    verifying: bool,
    /// When its last batch arrived (or the fill started).
    progress: tokio::time::Instant,
    /// Mismatched pages not served yet, waiting for the source's contents.
    held: HashSet<(u32, u64)>,
    integrity: migrate_core::IntegrityReport,
    fetched: u64,
    fetched_on_fault: u64,
    /// Pages being fetched from the source: a request for one waits for that fetch.
    fetching: HashSet<(u32, u64)>,
    /// Per process, the lazy memory of the dump (start, end), in address order.
    lazy: HashMap<u32, Vec<(u64, u64)>>,
}

/// What [`FillPages::take`] hands out.
#[derive(Debug, PartialEq, Eq)]
enum Take {
    /// The contents' hashes of pages from the store, marked served, and those of them that no
    /// page left to serve has (the store may forget them once they are in).
    Local(Vec<PageHash>, Vec<PageHash>),
    /// Pages to fetch from the source (not marked served yet): `fetch` from the address
    /// asked for, of which the first `serve` answer the request (the rest is read-ahead).
    Remote { serve: u64, fetch: u64 },
}

/// Pages a background request for remote pages fetches at least (read-ahead within the lazy
/// memory the request is in): the daemon's requests start at 64 KiB.
const READAHEAD_PAGES: u64 = 512;

/// What [`FillPages::verify`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) checked: u64,
    /// Mismatched pages held until corrected.
    pub(crate) correct: Vec<(u32, u64)>,
    /// Mismatched pages already served.
    pub(crate) stale: u64,
}

impl FillPages {
    /// `verified`: the source will check every page (see [`Self::verify`]).
    pub(crate) fn new(index: PageIndex, verified: bool) -> Arc<Self> {
        Arc::new(FillPages {
            state: std::sync::Mutex::new(Served {
                index,
                verifying: verified,
                progress: tokio::time::Instant::now(),
                held: HashSet::new(),
                integrity: Default::default(),
                fetched: 0,
                fetched_on_fault: 0,
                fetching: HashSet::new(),
                lazy: HashMap::new(),
            }),
            released: tokio::sync::Notify::new(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.state).index.len()
    }

    /// What the integrity check found so far.
    pub(crate) fn integrity(&self) -> migrate_core::IntegrityReport {
        lock(&self.state).integrity.clone()
    }

    /// Compares the source's hashes of its frozen copy with the pages served here; holds the
    /// mismatched pages not served yet. `done`: the check has no more pages.
    pub(crate) fn verify(&self, frozen: &[Location], done: bool) -> Verdict {
        let v = self.compare(frozen, done);
        self.released.notify_waiters();
        v
    }

    fn compare(&self, frozen: &[Location], done: bool) -> Verdict {
        let mut v = Verdict::default();
        let mut s = lock(&self.state);
        let s = &mut *s;
        s.progress = tokio::time::Instant::now();
        if done {
            s.verifying = false;
        }
        for l in frozen {
            for (i, h) in l.hashes.iter().enumerate() {
                let key = (l.pid, l.vaddr + i as u64 * PAGE_SIZE as u64);
                v.checked += 1;
                let served = match s.index.placed(&key, s.verifying) {
                    Some((ours, _)) if ours == *h => continue,
                    // Fetched from the frozen copy itself when needed.
                    Some((ours, false)) if ours == REMOTE => continue,
                    // Never served: a page not placed here is fetched from the frozen copy.
                    None => continue,
                    Some((_, served)) => served,
                };
                s.integrity.mismatches += 1;
                if served {
                    v.stale += 1;
                    warn!(pid = key.0, addr = format_args!("{:#x}", key.1), "integrity: a page the container already has differs from the source's frozen copy");
                } else {
                    s.held.insert(key);
                    v.correct.push(key);
                }
            }
        }
        s.integrity.pages_checked += v.checked;
        v
    }

    /// Replaces held pages by the source's contents (already in the store); returns
    /// (corrected, stale): pages no longer held (served after their hold ran out) are stale.
    pub(crate) fn correct(&self, pages: &[((u32, u64), PageHash)]) -> (u64, u64) {
        let (mut corrected, mut stale) = (0, 0);
        {
            let mut s = lock(&self.state);
            for (key, h) in pages {
                if s.held.remove(key) {
                    s.index.set(*key, *h, u64::MAX);
                    corrected += 1;
                } else {
                    stale += 1;
                }
            }
            s.integrity.corrected += corrected;
        }
        self.released.notify_waiters();
        (corrected, stale)
    }

    /// The contents' hashes of up to `n` pages of `pid` from `vaddr`, marked served; stops at
    /// the first page not indexed. Waits while one of them is held (at most [`HELD_LIMIT`]).
    /// While the integrity check runs, a request for several pages (the daemon's background
    /// fill; a fault asks for one) gets only those the check has reached, and at least one:
    /// the daemon asks again for the rest, so that a mismatch is corrected before it is used.
    async fn take(&self, pid: u32, vaddr: u64, n: u64, fault: bool) -> Take {
        let until = tokio::time::Instant::now() + HELD_LIMIT;
        loop {
            let released = self.released.notified();
            let mut wake = until;
            {
                let mut s = lock(&self.state);
                let s = &mut *s;
                let keys = (0..n).map(|i| (pid, vaddr + i * PAGE_SIZE as u64));
                let now = tokio::time::Instant::now();
                // A page being fetched is waited for (the fetch makes it local) rather than
                // fetched twice.
                let waiting = now < until
                    && ((!s.held.is_empty() && keys.clone().any(|k| s.held.contains(&k)))
                        || s.fetching.contains(&(pid, vaddr)));
                let mut waiting_check = false;
                if !waiting {
                    // Marked remote, or never placed here: the frozen copy has it.
                    let remote = |k: &(u32, u64)| {
                        s.index.get(k).is_none_or(|(h, _)| h == REMOTE) && !s.fetching.contains(k)
                    };
                    if remote(&(pid, vaddr)) {
                        let serve = keys.take_while(|k| remote(k)).count() as u64;
                        // A background request reads ahead, within the lazy memory it is in.
                        let room = s.lazy.get(&pid).and_then(|rs| {
                            rs.iter()
                                .find(|(a, b)| *a <= vaddr && vaddr < *b)
                                .map(|(_, b)| (b - vaddr) / PAGE_SIZE as u64)
                        });
                        // A fault gets what it asked for, at once; a background request reads
                        // ahead.
                        let fetch = match room {
                            Some(room) if n > 1 && serve == n && !fault => {
                                let most = n
                                    .max(READAHEAD_PAGES)
                                    .min(room)
                                    .min(super::lazy::MAX_FETCH_PAGES);
                                (0..most)
                                    .map(|i| (pid, vaddr + i * PAGE_SIZE as u64))
                                    .take_while(|k| remote(k))
                                    .count() as u64
                            }
                            _ => serve,
                        };
                        let fetch = fetch.max(serve);
                        for i in 0..fetch {
                            s.fetching.insert((pid, vaddr + i * PAGE_SIZE as u64));
                        }
                        return Take::Remote { serve, fetch };
                    }
                    let checking = n > 1 && s.verifying && now < s.progress + VERIFY_STALL;
                    // The background fill follows the check rather than run ahead of it a
                    // page at a time: it waits for its first page to be checked.
                    if checking && !fault && !s.index.is_checked(&(pid, vaddr)) {
                        wake = (s.progress + VERIFY_STALL).min(until);
                        waiting_check = true;
                    }
                }
                if !waiting && !waiting_check {
                    let checking = n > 1 && s.verifying && now < s.progress + VERIFY_STALL;
                    let mut out = Vec::with_capacity(n as usize);
                    let mut last = Vec::new();
                    for (i, k) in keys.enumerate() {
                        let Some((h, done)) = s.index.serve_local(&k, checking && i > 0) else {
                            break;
                        };
                        if !s.held.is_empty() && s.held.remove(&k) {
                            warn!(pid, addr = format_args!("{:#x}", k.1), "integrity: no correction for a mismatched page within {} s; it is served as it is", HELD_LIMIT.as_secs());
                        }
                        last.extend(done);
                        out.push(h);
                    }
                    return Take::Local(out, last);
                }
            }
            let _ = tokio::time::timeout_at(wake, released).await;
        }
    }

    /// Learns the dump's lazy memory (`criu_driver::image` pagemaps), which bounds read-ahead.
    pub(crate) fn set_lazy_memory(&self, maps: &[(u32, Vec<criu_driver::image::PagemapEntry>)]) {
        lock(&self.state)
            .lazy
            .extend(super::lazyd::lazy_ranges(maps));
    }

    /// Records pages fetched from the source (already in the store); the first `served` of
    /// them are given to the daemon.
    fn fetched(&self, pid: u32, vaddr: u64, hashes: &[PageHash], served: usize, fault: bool) {
        let mut s = lock(&self.state);
        for (i, h) in hashes.iter().enumerate() {
            let k = (pid, vaddr + i as u64 * PAGE_SIZE as u64);
            s.index.set(k, *h, u64::MAX - 1);
            // The frozen copy itself: nothing to check.
            s.index.placed(&k, true);
            if i < served {
                s.index.serve(&k);
            }
        }
        s.fetched += hashes.len() as u64;
        if fault {
            s.fetched_on_fault += hashes.len() as u64;
        }
    }

    /// A fetch of `n` pages from `vaddr` is over (done or failed): those waiting for it go on.
    fn fetch_ended(&self, pid: u32, vaddr: u64, n: u64) {
        {
            let mut s = lock(&self.state);
            for i in 0..n {
                s.fetching.remove(&(pid, vaddr + i * PAGE_SIZE as u64));
            }
        }
        self.released.notify_waiters();
    }

    /// (pages fetched from the source, of them asked for by a fault).
    pub(crate) fn fetch_counts(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.fetched, s.fetched_on_fault)
    }
}

/// Adds `locations` to `index`: a page read later (larger sequence number) replaces an earlier
/// read of the same page.
pub(crate) fn place(index: &mut PageIndex, locations: Vec<Location>) {
    for l in locations {
        for (i, h) in l.hashes.into_iter().enumerate() {
            let at = l.vaddr + i as u64 * PAGE_SIZE as u64;
            match index.get(&(l.pid, at)) {
                Some((_, seq)) if seq > l.seq => {}
                _ => index.set((l.pid, at), h, l.seq),
            }
        }
    }
}

/// A started `criu lazy-pages` daemon and the other end of its page-server socket.
pub(crate) struct Daemon {
    pub(crate) child: ferry_runtime::util::Spawned,
    pub(crate) socket: std::os::unix::net::UnixStream,
}

/// Starts `criu lazy-pages` on the job's images and work directory, its page server being a
/// socket pair whose other end is returned; waits until it says it is ready.
/// The lazy-pages daemon's nice value.
const DAEMON_NICE: i32 = 19;

pub(crate) fn start_daemon(
    criu: &std::path::Path,
    images: &std::path::Path,
    work: &std::path::Path,
) -> Result<Daemon> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let fds = [theirs.as_fd(), ready_w.as_fd()];
    let slots = ferry_runtime::util::fd_slots(&fds);
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
    let mut child = ferry_runtime::util::spawn_with_fds(criu, &args, &fds)
        .with_context(|| format!("starting {} lazy-pages", criu.display()))?;
    // The daemon has its copies.
    drop((theirs, ready_w));
    // While pages remain it polls without sleeping, waiting for the answers of this agent,
    // which then competes with it for the CPU (with the container, too): at nice 0 it took a
    // whole core of these two and filled 1 GiB at about 220 MiB/s; at 19, 550 MiB/s. It still
    // runs at once when the CPU is idle.
    let pid = rustix::process::Pid::from_raw(child.pid());
    if let Err(e) = pid.map_or(Ok(()), |p| {
        rustix::process::setpriority_process(Some(p), DAEMON_NICE)
    }) {
        warn!(error = %e, "the lazy-pages daemon keeps its priority");
    }
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
        spawn_ms = ferry_runtime::util::ms(t - t_spawn),
        ready_ms = ferry_runtime::util::ms(t.elapsed()),
        "criu lazy-pages ready"
    );
    Ok(Daemon {
        child,
        socket: ours,
    })
}

/// Where a fill's pages come from besides the store: the job's source (post-copy, and any
/// page the store lacks).
#[derive(Clone)]
pub(crate) struct Source {
    pub(crate) job: String,
    pub(crate) host: String,
}

/// [`Agent::fetch_from_source`] on the agent's runtime, where its peer connections live
/// (the background fill runs on runtimes of its own).
async fn fetch_on_main(
    agent: &Arc<Agent>,
    source: &Source,
    pid: u32,
    vaddr: u64,
    n: u64,
) -> Result<(Vec<PageHash>, Vec<u8>)> {
    let (a, s) = (Arc::clone(agent), source.clone());
    agent
        .rt
        .spawn(async move { a.fetch_from_source(&s, pid, vaddr, n).await })
        .await
        .context("a page fetch ended without a word")?
}

/// Serves the daemon's `PS_IOV_GET`s from the page store by `index` until it sends
/// `PS_IOV_CLOSE`, fetching pages marked [`REMOTE`] or not placed at all from the source's
/// frozen copy; returns (pages served, requests).
pub(crate) async fn serve(
    agent: Arc<Agent>,
    socket: std::os::unix::net::UnixStream,
    index: Arc<FillPages>,
    source: Source,
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
                read_pages(
                    &agent,
                    &index,
                    &source,
                    (pid, vaddr, nr_pages),
                    nr_pages == 1,
                    &mut buf,
                    // CRIU's daemon may ask for a page again: the store keeps them all.
                    &mut Vec::new(),
                )
                .await?;
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

/// Reads up to `n` pages (at most [`MAX_SERVE_PAGES`]) of `pid` from `vaddr` (the dump's
/// pids and addresses) into `buf`, which it clears: from the page store through the index,
/// or, for pages marked [`REMOTE`] or never placed here, fetched from the source's frozen
/// copy. Returns how many; fails rather than give none. Adds to `last` the contents that no
/// page left to serve has: once these pages are in, the store may forget them
/// ([`Agent::release_filled`]).
pub(crate) async fn read_pages(
    agent: &Arc<Agent>,
    index: &FillPages,
    source: &Source,
    (pid, vaddr, n): (u32, u64, u64),
    fault: bool,
    buf: &mut Vec<u8>,
    last: &mut Vec<PageHash>,
) -> Result<u64> {
    buf.clear();
    match index.take(pid, vaddr, n.min(MAX_SERVE_PAGES), fault).await {
        Take::Local(hashes, done) => {
            last.extend(done);
            let missing = {
                let store = agent.pages.lock().await;
                let mut missing = 0;
                for h in &hashes {
                    match store.get(h) {
                        Some(p) if missing == 0 => buf.extend_from_slice(p),
                        Some(_) => break,
                        None if buf.is_empty() => missing += 1,
                        None => break,
                    }
                }
                missing
            };
            if missing > 0 {
                // Served meanwhile under another address with the same contents, and
                // forgotten since (`Agent::release_filled`): the frozen copy still has it.
                let (fetched, pages) = fetch_on_main(agent, source, pid, vaddr, missing)
                    .await
                    .with_context(|| {
                        format!(
                            "fetching {missing} pages at {vaddr:#x} of pid {pid} from {}",
                            source.host
                        )
                    })?;
                index.fetched(pid, vaddr, &fetched, fetched.len(), fault);
                buf.extend_from_slice(&pages);
            }
        }
        Take::Remote { serve, fetch } => {
            let fetched = fetch_on_main(agent, source, pid, vaddr, fetch).await;
            if fetched.is_err() {
                index.fetch_ended(pid, vaddr, fetch);
            }
            let (fetched, pages) = fetched.with_context(|| {
                format!(
                    "fetching {fetch} pages at {vaddr:#x} of pid {pid} from {}",
                    source.host
                )
            })?;
            let serve = (serve as usize).min(fetched.len());
            index.fetched(pid, vaddr, &fetched, serve, fault);
            index.fetch_ended(pid, vaddr, fetch);
            buf.extend_from_slice(&pages[..serve * PAGE_SIZE]);
        }
    }
    if buf.is_empty() {
        return Err(refuse(
            ErrorCode::NotFound,
            format!("page {vaddr:#x} of pid {pid} is not in this host's page store"),
        ));
    }
    Ok((buf.len() / PAGE_SIZE) as u64)
}

impl Agent {
    /// Fetches `n` pages of `pid` from `vaddr` from the source's frozen copy into the page
    /// store (pinned for the fill); returns their hashes and contents.
    async fn fetch_from_source(
        &self,
        source: &Source,
        pid: u32,
        vaddr: u64,
        n: u64,
    ) -> Result<(Vec<PageHash>, Vec<u8>)> {
        let n = n.min(super::lazy::MAX_FETCH_PAGES);
        let conn = self.peer_conn(&source.host).await?;
        let (mut send, mut recv) = conn.open().await?;
        transfer::frame::write_msg(
            &mut send,
            &crate::proto::PeerRequest::FetchPages {
                job: source.job.clone(),
                pid,
                vaddr,
                nr_pages: n,
            },
        )
        .await?;
        send.finish()
            .map_err(|e| anyhow::anyhow!("closing a request stream to {}: {e}", source.host))?;
        match transfer::frame::read_msg::<_, PeerResponse>(&mut recv).await? {
            PeerResponse::Fetched { nr_pages } if nr_pages == n => {}
            other => return Err(other.into_error(&source.host).context("a page fetch")),
        }
        let mut pages = vec![0u8; n as usize * PAGE_SIZE];
        tokio::io::AsyncReadExt::read_exact(&mut recv, &mut pages)
            .await
            .context("reading fetched pages")?;
        let mut hashes = Vec::with_capacity(n as usize);
        {
            let mut store = self.pages.lock().await;
            for p in pages.chunks_exact(PAGE_SIZE) {
                hashes.push(store.insert(p).with_context(|| {
                    format!(
                        "the page store of {} is full (page_store_mib in its config)",
                        self.cfg.host
                    )
                })?);
            }
        }
        if let Some(f) = lock(&self.fills).get_mut(&source.job) {
            f.pinned.extend(hashes.iter().copied());
        }
        Ok((hashes, pages))
    }
}

impl Agent {
    /// Forgets pages of `job`'s fill that are in the container now and that nothing else
    /// here needs (no other job pins them): their memory goes back to the kernel at once,
    /// where the fill's next copies find it. Without this a fill needs the container's memory
    /// twice, and on a VM whose free memory goes back to its hypervisor every page it copies
    /// lands in memory the host must first provide (see `transfer`'s `slab` module).
    pub(crate) async fn release_filled(&self, job: &str, hashes: &[PageHash]) {
        if hashes.is_empty() {
            return;
        }
        let mut store = self.pages.lock().await;
        let incoming = self.incoming.lock().await;
        let mut fills = lock(&self.fills);
        let others = |h: &PageHash| {
            incoming.values().any(|i| i.pinned().contains(h))
                || fills
                    .iter()
                    .any(|(j, f)| j.as_str() != job && f.pinned.contains(h))
        };
        let gone: Vec<PageHash> = hashes.iter().filter(|h| !others(h)).copied().collect();
        store.remove(&gone);
        if let Some(f) = fills.get_mut(job) {
            for h in &gone {
                f.pinned.remove(h);
            }
            f.forgotten += gone.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests;
