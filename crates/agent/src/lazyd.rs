//! Lazy restore, destination side: the agent's own lazy-pages daemon.
//!
//! `criu restore --lazy-pages` connects to `lazy-pages.socket` in its work directory and sends,
//! for each restored process, its pid (as the dump numbers it) and a userfaultfd on which its
//! lazy memory is registered (a negative pid for a zombie, which has none), then
//! [`RESTORE_FINISHED`] once the tree runs. This module is the other end, in the agent (CRIU's
//! own `criu lazy-pages` asked for 64 KiB after every fault, one request at a time per process,
//! polled without sleeping, and scanned lists that grow with every fault: 27 MiB/s for a
//! 4 GiB container that writes while it fills).
//!
//! Each process's remaining lazy memory is a set of ranges (their current addresses, and the
//! dump's address of each start, by which [`super::fill::read_pages`] finds the contents). A
//! fault copies its page and up to [`FAULT_PAGES`] after it in the same range; once CRIU has
//! finished, [`FILL_WORKERS`] copy the rest in pieces of up to 4 MiB. The process's own
//! changes arrive as events that this module applies to the ranges: `mremap` moves them,
//! `munmap` and `MADV_DONTNEED` drop them, `fork` gives the child a userfaultfd of its own and
//! a copy of the ranges left (read by the parent's pid: the child's memory is the parent's).
//! A copy happens with the process's ranges locked and only where they still say the page is
//! missing: the kernel refuses it (`EAGAIN`) while an event it reported is unread, so the
//! ranges are always current when a page goes in.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use memtrack::userfault::{self, Event, Read};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tracing::{debug, info, warn};

use super::fill::{read_pages, FillPages, Source};
use super::{lock, Agent};

/// The socket CRIU's restore connects to, in its work directory.
pub(crate) const SOCKET: &str = "lazy-pages.socket";
/// What CRIU's restore sends when the restored tree runs (`LAZY_PAGES_RESTORE_FINISHED`).
const RESTORE_FINISHED: i32 = 0x5253_5446;
/// Pages a fault copies: its own and those after it in the same range.
const FAULT_PAGES: u64 = 16;
/// Pages of one background copy (4 MiB).
const FILL_PAGES: u64 = 1024;
/// Background copies under way at once.
const FILL_WORKERS: usize = 2;
/// The background fill's nice value (faults are served at the agent's).
const FILL_NICE: i32 = 5;
/// Contents the store forgets at once during the fill (16 MiB).
const FORGET_PAGES: usize = 4096;
/// How long a copy may keep meeting mappings that change before the fill fails.
const CHANGING_LIMIT: Duration = Duration::from_secs(10);
/// How long CRIU's restore may take to connect.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);
const PAGE: u64 = 4096;

/// Lazy memory left: current start -> (current end, the dump's address of the start).
#[derive(Debug, Default, Clone)]
struct Ranges(BTreeMap<u64, (u64, u64)>);

impl Ranges {
    fn insert(&mut self, start: u64, end: u64, img: u64) {
        if start < end {
            self.0.insert(start, (end, img));
        }
    }

    /// The range holding `addr`: (start, end, dump address of start).
    fn find(&self, addr: u64) -> Option<(u64, u64, u64)> {
        self.0
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| addr < *end)
            .map(|(s, (e, i))| (*s, *e, *i))
    }

    /// Takes `[start, end)` out; returns the pieces that were in it.
    fn cut(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let mut hit = vec![];
        let first = self.find(start).map_or(start, |(s, _, _)| s);
        let keys: Vec<u64> = self.0.range(first..end).map(|(s, _)| *s).collect();
        for s in keys {
            let (e, img) = self.0.remove(&s).expect("listed");
            let (a, b) = (s.max(start), e.min(end));
            if a >= b {
                self.0.insert(s, (e, img));
                continue;
            }
            self.insert(s, a, img);
            self.insert(b, e, img + (b - s));
            hit.push((a, b, img + (a - s)));
        }
        hit
    }

    /// `mremap` moved `[from, from + len)` to `to`.
    fn remap(&mut self, from: u64, to: u64, len: u64) {
        for (a, b, img) in self.cut(from, from + len) {
            self.insert(a - from + to, b - from + to, img);
        }
    }

    /// The first range at or after `from`, at most `pages` long.
    fn next_from(&self, from: u64, pages: u64) -> Option<(u64, u64, u64)> {
        let (s, e, img) = match self.find(from) {
            Some((s, e, img)) => (from, e, img + (from - s)),
            None => {
                let (s, (e, img)) = self.0.range(from..).next()?;
                (*s, *e, *img)
            }
        };
        Some((s, e.min(s + pages * PAGE), img))
    }

    fn pages(&self) -> u64 {
        self.0.iter().map(|(s, (e, _))| (e - s) / PAGE).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One restored process (or a child it forked while its memory was still filling in).
struct Proc {
    /// The dump's pid whose pages it reads.
    pid: u32,
    uffd: OwnedFd,
    state: Mutex<ProcState>,
}

#[derive(Default)]
struct ProcState {
    todo: Ranges,
    /// Where the background fill goes on from.
    cursor: u64,
    gone: bool,
}

/// What a copy found.
enum Copied {
    /// Pages copied in (the others were present already, or not missing any more).
    Done(u64),
    /// The mappings are changing (an event is unread): again later.
    Changing,
}

impl Proc {
    /// Copies `data` (the dump's contents from `img`) wherever its pages are still missing,
    /// and takes them out of the ranges.
    fn put(&self, img: u64, data: &[u8], restored: bool) -> Result<Copied> {
        let img_end = img + data.len() as u64;
        let mut st = lock(&self.state);
        if st.gone {
            return Ok(Copied::Done(0));
        }
        let mut copied = 0;
        // The ranges that still miss some of these pages, by their dump addresses.
        let pieces: Vec<(u64, u64, u64)> = st
            .todo
            .0
            .iter()
            .filter_map(|(s, (e, i))| {
                let (a, b) = ((*i).max(img), (i + (e - s)).min(img_end));
                (a < b).then(|| (s + (a - i), s + (b - i), a))
            })
            .collect();
        for (start, end, at) in pieces {
            let mut dst = start;
            // A copy must stay inside one mapping, and a range of the dump's pagemap may span
            // several: a copy refused for that (ENOENT) is tried again on halves.
            let mut len = end - start;
            while dst < end {
                let off = (at + (dst - start) - img) as usize;
                len = len.min(end - dst);
                match userfault::copy(self.uffd.as_fd(), dst, &data[off..off + len as usize]) {
                    Ok(n) if n > 0 => {
                        st.todo.cut(dst, dst + n);
                        dst += n;
                        copied += n / PAGE;
                        len = end - dst;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) && len > PAGE => {
                        len = (len / 2).max(PAGE) & !(PAGE - 1);
                    }
                    Ok(_) => bail!("userfaultfd copied nothing at {dst:#x}"),
                    Err(e) => match e.raw_os_error() {
                        // Present already (a write, or another copy): done for that page.
                        Some(libc::EEXIST) => {
                            st.todo.cut(dst, dst + PAGE);
                            let _ = userfault::wake(self.uffd.as_fd(), dst, PAGE);
                            dst += PAGE;
                            len = end - dst;
                        }
                        Some(libc::EAGAIN) => return Ok(Copied::Changing),
                        // Not registered there. While CRIU restores, the mapping may not be
                        // in place yet (a thread's rseq registration faults on its page
                        // first): again later. Once the tree runs, nothing can fault on it
                        // through this descriptor any more: left out, and whoever waited
                        // there is woken to fault again.
                        Some(libc::ENOENT) if !restored => return Ok(Copied::Changing),
                        Some(libc::ENOENT) => {
                            debug!(
                                pid = self.pid,
                                addr = format_args!("{dst:#x}"),
                                "not registered: left out"
                            );
                            st.todo.cut(dst, dst + PAGE);
                            let _ = userfault::wake(self.uffd.as_fd(), dst, PAGE);
                            dst += PAGE;
                            len = end - dst;
                        }
                        Some(libc::ESRCH) | Some(libc::ENOSPC) => {
                            st.gone = true;
                            st.todo = Ranges::default();
                            return Ok(Copied::Done(copied));
                        }
                        _ => {
                            return Err(e).with_context(|| {
                                format!("copying {len} bytes to {dst:#x} of process {}", self.pid)
                            });
                        }
                    },
                }
            }
        }
        Ok(Copied::Done(copied))
    }

    /// A fault where no lazy page is: the zero page (memory the dump had none of).
    fn zero(&self, addr: u64) -> Result<Copied> {
        let st = lock(&self.state);
        if st.gone || st.todo.find(addr).is_some() {
            return Ok(Copied::Done(0));
        }
        match userfault::zeropage(self.uffd.as_fd(), addr, PAGE) {
            Ok(()) => Ok(Copied::Done(0)),
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    let _ = userfault::wake(self.uffd.as_fd(), addr, PAGE);
                    Ok(Copied::Done(0))
                }
                Some(libc::EAGAIN) => Ok(Copied::Changing),
                Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENOSPC) => Ok(Copied::Done(0)),
                _ => Err(e)
                    .with_context(|| format!("zero page at {addr:#x} of process {}", self.pid)),
            },
        }
    }
}

/// The daemon of one fill.
struct Daemon {
    agent: Arc<Agent>,
    pages: Arc<FillPages>,
    source: Source,
    /// Lazy memory of the dump, per pid: (start, end).
    lazy: HashMap<u32, Vec<(u64, u64)>>,
    procs: Mutex<Vec<Arc<Proc>>>,
    /// Every process's userfaultfd, its index in `procs` as the event's data.
    epoll: Epoll,
    /// Where fault handlers run.
    rt: tokio::runtime::Handle,
    copied: AtomicU64,
    copies: AtomicU64,
    /// A fork was seen. A child reads its pages by its parent's pid, so after a fork a page in
    /// is no proof that no one needs it again: the store forgets no page of this fill any more.
    forked: std::sync::atomic::AtomicBool,
    /// Contents in and not needed any more, until the store forgets them in one go.
    forget: Mutex<Vec<transfer::pages::PageHash>>,
    /// The first error of any task.
    failed: Mutex<Option<String>>,
    /// CRIU's restore has finished: the tree runs.
    restored: std::sync::atomic::AtomicBool,
    /// Set when the fill is over (or failed): the event readers stop.
    stop: tokio::sync::watch::Sender<bool>,
}

/// The dump's lazy memory per pid, from its pagemaps (`criu_driver::image::read_pagemaps`).
pub(crate) fn lazy_ranges(
    maps: &[(u32, Vec<criu_driver::image::PagemapEntry>)],
) -> HashMap<u32, Vec<(u64, u64)>> {
    maps.iter()
        .map(|(pid, entries)| {
            let v = entries
                .iter()
                .filter(|e| e.is_lazy_only())
                .map(|e| (e.vaddr, e.end()))
                .collect();
            (*pid, v)
        })
        .collect()
}

/// Binds the socket CRIU's restore will connect to, in `work`.
pub(crate) fn listen(work: &Path) -> Result<(UnixListener, PathBuf)> {
    std::fs::create_dir_all(work)?;
    let path = work.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let l =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    Ok((l, path))
}

/// Serves one lazy restore until every lazy page is in (or its processes have gone); returns
/// (pages copied, copies).
pub(crate) async fn run(
    agent: Arc<Agent>,
    listener: UnixListener,
    pages: Arc<FillPages>,
    source: Source,
    lazy: HashMap<u32, Vec<(u64, u64)>>,
) -> Result<(u64, u64)> {
    let d = Arc::new(Daemon {
        agent,
        pages,
        source,
        lazy,
        procs: Mutex::new(vec![]),
        epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll for the lazy restore")?,
        rt: tokio::runtime::Handle::current(),
        copied: AtomicU64::new(0),
        copies: AtomicU64::new(0),
        forked: std::sync::atomic::AtomicBool::new(false),
        forget: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
        stop: tokio::sync::watch::channel(false).0,
        restored: std::sync::atomic::AtomicBool::new(false),
    });
    // CRIU's messages come in order on one connection: read them on a thread of their own.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::task::spawn_blocking(move || read_restore(listener, tx));
    // The processes' events are read on a thread of their own too.
    let events = {
        let d = Arc::clone(&d);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = d.events() {
                d.fail(format!("{e:#}"));
            }
        })
    };
    let mut finished = false;
    while let Some(m) = rx.recv().await {
        match m {
            FromRestore::Process { pid, uffd } => {
                let todo = d.ranges_of(pid);
                debug!(
                    pid,
                    pages = todo.pages(),
                    "lazy restore: a process's userfaultfd"
                );
                d.add(pid, todo, uffd)?
            }
            FromRestore::Finished => {
                finished = true;
                d.restored.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    let read = reader.await.context("the lazy-pages socket reader")?;
    let outcome = if !finished {
        read.and_then(|()| {
            bail!("CRIU's restore closed the lazy-pages socket before the restored tree ran")
        })
    } else {
        let processes = lock(&d.procs).len();
        info!(
            processes,
            pages = d.left(),
            "lazy restore running: filling in the rest"
        );
        let mut workers = Vec::with_capacity(FILL_WORKERS);
        for w in 0..FILL_WORKERS {
            workers.push(spawn_worker(Arc::clone(&d), w)?);
        }
        let mut r = Ok(());
        for w in workers {
            let done = w
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a fill worker ended without a word")));
            if r.is_ok() {
                r = done;
            }
        }
        d.forget_rest().await;
        match lock(&d.failed).take() {
            Some(e) if r.is_ok() => Err(anyhow::anyhow!(e)),
            _ => r,
        }
    };
    // The readers stop; the descriptors close with the last reference to each process,
    // which unregisters what is left of their memory.
    d.stop.send_replace(true);
    let _ = events.await;
    lock(&d.procs).clear();
    outcome?;
    Ok((
        d.copied.load(Ordering::SeqCst),
        d.copies.load(Ordering::SeqCst),
    ))
}

/// Starts background worker `w` on a thread of its own, at nice [`FILL_NICE`], with its own
/// runtime: the container (and the faults that serve it, on the agent's runtime) goes first
/// whenever both want the CPU. At the agent's priority the fill, right after the commit,
/// took the CPU from the container it fills: a 1 GiB container's client waited 20-60 ms
/// more than the freeze in some runs (`ferry bench`, 1 Gbit/s).
fn spawn_worker(d: Arc<Daemon>, w: usize) -> Result<tokio::sync::oneshot::Receiver<Result<()>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("ferry-fill-{w}"))
        .spawn(move || {
            // Linux keeps a nice value per thread: this one only.
            let me = rustix::process::Pid::from_raw(nix::unistd::gettid().as_raw());
            if let Err(e) = rustix::process::setpriority_process(me, FILL_NICE) {
                warn!(error = %e, "the background fill keeps the agent's priority");
            }
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime for the background fill")
                .and_then(|rt| rt.block_on(d.fill(w)));
            let _ = tx.send(r);
        })
        .context("starting a background fill thread")?;
    Ok(rx)
}

enum FromRestore {
    Process { pid: u32, uffd: OwnedFd },
    Finished,
}

/// Reads CRIU's restore: (pid, userfaultfd) per process, then the end of the restore.
fn read_restore(
    listener: UnixListener,
    tx: tokio::sync::mpsc::UnboundedSender<FromRestore>,
) -> Result<()> {
    use std::io::Read as _;
    listener.set_nonblocking(true)?;
    let until = std::time::Instant::now() + CONNECT_LIMIT;
    let mut conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > until || tx.is_closed() {
                    bail!(
                        "CRIU's restore did not connect to the lazy-pages socket within {} s",
                        CONNECT_LIMIT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e).context("accepting CRIU's restore"),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(600)))?;
    loop {
        let mut b = [0u8; 4];
        if let Err(e) = conn.read_exact(&mut b) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                return Ok(());
            }
            return Err(e).context("reading CRIU's restore");
        }
        let pid = i32::from_ne_bytes(b);
        if pid == RESTORE_FINISHED {
            let _ = tx.send(FromRestore::Finished);
            return Ok(());
        }
        if pid <= 0 {
            // A zombie: no memory.
            continue;
        }
        let uffd = userfault::recv_fd(conn.as_fd())
            .context("receiving a userfaultfd from CRIU's restore")?
            .context("CRIU's restore closed the socket before the userfaultfd of a process")?;
        if tx
            .send(FromRestore::Process {
                pid: pid as u32,
                uffd,
            })
            .is_err()
        {
            return Ok(());
        }
    }
}

impl Daemon {
    fn ranges_of(&self, pid: u32) -> Ranges {
        let mut r = Ranges::default();
        for (s, e) in self.lazy.get(&pid).into_iter().flatten() {
            r.insert(*s, *e, *s);
        }
        r
    }

    fn left(&self) -> u64 {
        let procs: Vec<Arc<Proc>> = lock(&self.procs).clone();
        procs.iter().map(|p| lock(&p.state).todo.pages()).sum()
    }

    fn fail(&self, e: String) {
        let mut f = lock(&self.failed);
        if f.is_none() {
            warn!(error = %e, "lazy restore: the fill fails");
            *f = Some(e);
        }
        drop(f);
        self.stop.send_replace(true);
    }

    /// Starts serving a process (its userfaultfd must be non-blocking, as CRIU opens it).
    fn add(&self, pid: u32, todo: Ranges, uffd: OwnedFd) -> Result<()> {
        let p = Arc::new(Proc {
            pid,
            uffd,
            state: Mutex::new(ProcState {
                todo,
                ..Default::default()
            }),
        });
        let mut procs = lock(&self.procs);
        let i = procs.len() as u64;
        self.epoll
            .add(p.uffd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i))
            .context("polling a userfaultfd")?;
        procs.push(p);
        Ok(())
    }

    /// Reads the processes' events until the fill is over. Each message is read and applied
    /// with its process's ranges locked, as copies are made: a copy is thus either refused
    /// by the kernel (an event is unread) or made with current ranges.
    fn events(self: &Arc<Self>) -> Result<()> {
        let stop = self.stop.subscribe();
        let mut ready = [EpollEvent::empty(); 64];
        while !*stop.borrow() {
            let n = match self.epoll.wait(&mut ready, EpollTimeout::from(50u8)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waiting for userfaultfd events"),
            };
            for ev in &ready[..n] {
                let p = lock(&self.procs).get(ev.data() as usize).cloned();
                if let Some(p) = p {
                    self.drain(&p)?;
                }
            }
        }
        Ok(())
    }

    /// Reads and applies what a process's userfaultfd holds.
    fn drain(self: &Arc<Self>, p: &Arc<Proc>) -> Result<()> {
        loop {
            let mut st = lock(&p.state);
            let read = userfault::read(p.uffd.as_fd())
                .with_context(|| format!("reading the userfaultfd of process {}", p.pid))?;
            match read {
                Read::Empty => return Ok(()),
                Read::Closed => {
                    // Its memory has gone: nothing more to fill or to hear.
                    st.gone = true;
                    st.todo = Ranges::default();
                    let _ = self.epoll.delete(p.uffd.as_fd());
                    return Ok(());
                }
                Read::Event(Event::PageFault { address }) => {
                    drop(st);
                    let d = Arc::clone(self);
                    let p = Arc::clone(p);
                    self.rt.spawn(async move {
                        if let Err(e) = d.fault(&p, address).await {
                            d.fail(format!("{e:#}"));
                        }
                    });
                }
                Read::Event(Event::Fork { uffd }) => {
                    self.forked.store(true, Ordering::SeqCst);
                    // The child's memory is the parent's as it is now.
                    let todo = st.todo.clone();
                    drop(st);
                    debug!(
                        pid = p.pid,
                        pages = todo.pages(),
                        "fork while filling: the child gets its own userfaultfd"
                    );
                    self.add(p.pid, todo, uffd)?;
                }
                Read::Event(Event::Remap { from, to, len }) => st.todo.remap(from, to, len),
                Read::Event(Event::Remove { start, end } | Event::Unmap { start, end }) => {
                    st.todo.cut(start, end);
                }
            }
        }
    }

    /// A thread of `p` waits for the page at `addr`.
    async fn fault(&self, p: &Proc, addr: u64) -> Result<()> {
        let until = tokio::time::Instant::now() + CHANGING_LIMIT;
        let mut buf = Vec::new();
        // The dump's address of what `buf` holds: a copy the kernel put off is tried again
        // with the same pages.
        let mut held = None;
        let mut last = Vec::new();
        loop {
            let piece = lock(&p.state).todo.find(addr);
            let copied = match piece {
                None => p.zero(addr)?,
                Some((s, end, i)) => {
                    let img = i + (addr - s);
                    if held != Some(img) {
                        let n = ((end - addr) / PAGE).min(FAULT_PAGES);
                        let at = (p.pid, img, n);
                        read_pages(
                            &self.agent,
                            &self.pages,
                            &self.source,
                            at,
                            true,
                            &mut buf,
                            &mut last,
                        )
                        .await?;
                        self.copies.fetch_add(1, Ordering::Relaxed);
                        held = Some(img);
                    }
                    p.put(img, &buf, self.restored.load(Ordering::SeqCst))?
                }
            };
            match copied {
                Copied::Done(n) => {
                    self.copied.fetch_add(n, Ordering::Relaxed);
                    self.forget(&last).await;
                    return Ok(());
                }
                Copied::Changing => changing(p.pid, until).await?,
            }
        }
    }

    /// After a copy: the store forgets the contents that no page left to serve has (unless a
    /// fork may still need them), [`FORGET_PAGES`] at a time: each call to the kernel costs
    /// every CPU running the agent a TLB flush.
    async fn forget(&self, last: &[transfer::pages::PageHash]) {
        if last.is_empty() || self.forked.load(Ordering::SeqCst) {
            return;
        }
        let batch = {
            let mut f = lock(&self.forget);
            f.extend_from_slice(last);
            if f.len() < FORGET_PAGES {
                return;
            }
            std::mem::take(&mut *f)
        };
        self.agent.release_filled(&self.source.job, &batch).await;
    }

    /// What [`Self::forget`] still holds.
    async fn forget_rest(&self) {
        let rest = std::mem::take(&mut *lock(&self.forget));
        if !self.forked.load(Ordering::SeqCst) {
            self.agent.release_filled(&self.source.job, &rest).await;
        }
    }

    /// A background worker: copies the ranges left, a piece at a time, until none is left.
    async fn fill(self: Arc<Self>, worker: usize) -> Result<()> {
        let mut buf = Vec::with_capacity((FILL_PAGES * PAGE) as usize);
        let mut last = Vec::new();
        let mut next = worker;
        loop {
            if lock(&self.failed).is_some() {
                return Ok(());
            }
            let procs: Vec<Arc<Proc>> = lock(&self.procs).clone();
            // The next process with work, round robin, and its next piece.
            let mut pick = None;
            for i in 0..procs.len() {
                let p = &procs[(next + i) % procs.len()];
                let mut st = lock(&p.state);
                if st.gone || st.todo.is_empty() {
                    continue;
                }
                let piece = st
                    .todo
                    .next_from(st.cursor, FILL_PAGES)
                    .or_else(|| st.todo.next_from(0, FILL_PAGES));
                if let Some((s, e, img)) = piece {
                    st.cursor = e;
                    pick = Some((Arc::clone(p), s, e, img));
                    next = (next + i + 1) % procs.len().max(1);
                    break;
                }
            }
            let Some((p, s, e, img)) = pick else {
                if procs.iter().all(|p| {
                    let st = lock(&p.state);
                    st.gone || st.todo.is_empty()
                }) {
                    return Ok(());
                }
                // Only pieces another copy holds: wait a little.
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            };
            let at = (p.pid, img, (e - s) / PAGE);
            last.clear();
            read_pages(
                &self.agent,
                &self.pages,
                &self.source,
                at,
                false,
                &mut buf,
                &mut last,
            )
            .await?;
            self.copies.fetch_add(1, Ordering::Relaxed);
            let until = tokio::time::Instant::now() + CHANGING_LIMIT;
            loop {
                match p.put(img, &buf, true)? {
                    Copied::Done(n) => {
                        self.copied.fetch_add(n, Ordering::Relaxed);
                        self.forget(&last).await;
                        break;
                    }
                    Copied::Changing => changing(p.pid, until).await?,
                }
            }
            tokio::task::yield_now().await;
        }
    }
}

/// After a copy the kernel put off (the mappings of process `pid` are changing): waits a
/// little, or fails once `until` has passed.
async fn changing(pid: u32, until: tokio::time::Instant) -> Result<()> {
    if tokio::time::Instant::now() >= until {
        bail!(
            "the mappings of process {pid} kept changing for {} s",
            CHANGING_LIMIT.as_secs()
        );
    }
    tokio::time::sleep(Duration::from_micros(100)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(v: &[(u64, u64)]) -> Ranges {
        let mut r = Ranges::default();
        for (s, e) in v {
            r.insert(*s, *e, *s);
        }
        r
    }

    #[test]
    fn cutting_splits_ranges_and_keeps_their_dump_addresses() {
        let mut x = r(&[(0x1000, 0x5000), (0x8000, 0x9000)]);
        let hit = x.cut(0x2000, 0x3000);
        assert_eq!(hit, vec![(0x2000, 0x3000, 0x2000)]);
        assert_eq!(x.find(0x1000), Some((0x1000, 0x2000, 0x1000)));
        assert_eq!(x.find(0x2000), None);
        assert_eq!(x.find(0x4fff), Some((0x3000, 0x5000, 0x3000)));
        assert_eq!(x.pages(), 4);
        let hit = x.cut(0x0, 0x10000);
        assert_eq!(hit.len(), 3);
        assert!(x.is_empty());
    }

    #[test]
    fn a_remap_moves_the_ranges_but_not_where_their_contents_come_from() {
        let mut x = r(&[(0x10000, 0x14000)]);
        x.remap(0x11000, 0x50000, 0x2000);
        assert_eq!(x.find(0x50000), Some((0x50000, 0x52000, 0x11000)));
        assert_eq!(x.find(0x10000), Some((0x10000, 0x11000, 0x10000)));
        assert_eq!(x.find(0x13000), Some((0x13000, 0x14000, 0x13000)));
        assert_eq!(x.find(0x11000), None);
        assert_eq!(x.pages(), 4);
    }

    #[test]
    fn the_background_fill_takes_pieces_in_address_order_from_a_cursor() {
        let x = r(&[(0x1000, 0x1000 + 2000 * PAGE)]);
        let (s, e, img) = x.next_from(0, FILL_PAGES).expect("a piece");
        assert_eq!((s, e - s, img), (0x1000, FILL_PAGES * PAGE, 0x1000));
        let (s2, e2, _) = x.next_from(e, FILL_PAGES).expect("the next piece");
        assert_eq!((s2, e2), (e, 0x1000 + 2000 * PAGE));
        assert!(x.next_from(e2, FILL_PAGES).is_none());
    }
}
