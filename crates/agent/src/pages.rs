//! Pre-copy, destination side: the page store, the answers to "which pages do you hold", the
//! rounds' page streams and root filesystem diffs, and the final dump's page-server relay into
//! a real `criu page-server` writing the job's images.

use crate::proto::{refuse, ErrorCode};
use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use transfer::pages::{PageHash, PageStore};

use super::Agent;
use crate::proto::{PeerResponse, MAX_HASHES};

/// How long `criu page-server` may take to exit once the relay has ended.
const PAGE_SERVER_EXIT: Duration = Duration::from_secs(10);

/// What a pre-copy job's pages take in the page store for a container holding
/// `memory_bytes`: its memory, and as much again for versions of pages rewritten between
/// rounds (every version a job received stays pinned until it ends), and 16 MiB.
pub(crate) fn store_bytes_for(memory_bytes: u64) -> u64 {
    memory_bytes.saturating_mul(2).saturating_add(16 << 20)
}

/// A job of a peer's: which connection's job a request names.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerJob<'a> {
    /// The peer's name, from its certificate.
    pub peer: &'a str,
    /// The job id, as the peer sent it.
    pub job: &'a str,
}

impl Agent {
    /// Checks that `job` is an incoming job of `peer`, extends its deadline, and runs `f` on it.
    pub(crate) async fn with_incoming<T>(
        &self,
        peer: &str,
        job: &str,
        f: impl FnOnce(&mut super::incoming::Incoming) -> T,
    ) -> Result<T> {
        let mut inc = self.incoming.lock().await;
        match inc.get_mut(job) {
            Some(i) if i.from() != peer => Err(refuse(
                ErrorCode::Forbidden,
                format!("job {job} belongs to {}, not {peer}", i.from()),
            )),
            Some(i) if i.is_restored() => Err(refuse(
                ErrorCode::Conflict,
                format!("job {job} is already restored"),
            )),
            Some(i) => {
                i.touch();
                Ok(f(i))
            }
            None => Err(refuse(
                ErrorCode::NotFound,
                format!("no prepared job {job} here (it expired or was aborted)"),
            )),
        }
    }

    /// Answers [`crate::proto::PeerRequest::HeldPages`]: reads `count` hashes, pins the held
    /// ones for the job (they stay until it ends) and returns the bitmap.
    pub(crate) async fn held_pages(
        &self,
        PeerJob { peer, job }: PeerJob<'_>,
        count: u64,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        if count > MAX_HASHES {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("{count} page hashes asked at once; at most {MAX_HASHES}"),
            ));
        }
        let _stream = self.with_incoming(peer, job, |i| i.stream()).await?;
        let hashes = transfer::lists::read_hashes(recv, count, MAX_HASHES)
            .await
            .context("reading page hashes")?;
        let mut bits = vec![false; hashes.len()];
        let mut held = transfer::pages::PageSet::default();
        // Pinned before the store is let go: a fill forgetting pages (`release_filled`)
        // cannot take one that the answer says is here.
        let store = self.pages.lock().await;
        for (i, h) in hashes.iter().enumerate() {
            if store.contains(h) {
                bits[i] = true;
                held.insert(*h);
            }
        }
        let n_held = held.len();
        self.with_incoming(peer, job, move |i| i.pin(held)).await?;
        drop(store);
        info!(%job, asked = count, held = n_held, "page holdings answered");
        Ok(PeerResponse::Held {
            bitmap: transfer::lists::encode_bitmap(&bits),
        })
    }

    /// Receives a page stream into the page store and pins its pages for `job`; returns the
    /// bytes it took.
    pub(crate) async fn absorb_page_stream(
        &self,
        PeerJob { peer, job }: PeerJob<'_>,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<u64> {
        let cap = self.page_store_cap();
        let mut local = PageStore::new(cap);
        let (hashes, stats) = transfer::pages::recv_pages(recv, &mut local)
            .await
            .context("receiving pages")?;
        let mut store = self.pages.lock().await;
        if store.free_pages() < local.len() {
            self.make_room(&mut store).await;
        }
        store.absorb(local).with_context(|| {
            format!(
                "the page store of {} is full ({} MiB, page_store_mib in its config)",
                self.cfg.host,
                (cap * 4096) >> 20
            )
        })?;
        let pages = hashes.len();
        // Pinned before the store is let go (see `held_pages`).
        self.with_incoming(peer, job, move |i| i.pin(hashes.into_iter().collect()))
            .await?;
        drop(store);
        tracing::debug!(%job, pages, bytes = stats.wire_bytes, "round pages received");
        Ok(stats.wire_bytes)
    }

    /// Forgets pages no incoming job relies on (pages kept from earlier migrations, this
    /// host's own pages).
    async fn make_room(&self, store: &mut PageStore) {
        let keep = self.pinned_by_incoming(None).await;
        let before = store.len();
        store.retain(&keep);
        memtrack::release_free_heap();
        warn!(
            before,
            after = store.len(),
            "page store full: pages of finished migrations forgotten"
        );
    }

    /// The pages incoming jobs (all, or all but `except`) rely on.
    async fn pinned_by_incoming(&self, except: Option<&str>) -> HashSet<PageHash> {
        let mut keep = HashSet::new();
        for (j, i) in self.incoming.lock().await.iter() {
            if Some(j.as_str()) != except {
                keep.extend(i.pinned().iter().copied());
            }
        }
        // Lazy restores read their memory from the store until their fill ends.
        for f in super::lock(&self.fills).values() {
            keep.extend(f.pinned.iter().copied());
        }
        keep
    }

    /// Pages held and the most the store may hold.
    pub(crate) async fn page_store_stats(&self) -> (usize, usize) {
        (self.pages.lock().await.len(), self.page_store_cap())
    }

    /// Forgets every page no incoming job pins; returns (forgotten, kept).
    pub(crate) async fn forget_pages(&self) -> (usize, usize) {
        let keep = self.pinned_by_incoming(None).await;
        let (forgotten, kept) = {
            let mut store = self.pages.lock().await;
            let before = store.len();
            store.retain(&keep);
            (before - store.len(), store.len())
        };
        // The memory goes back to the kernel, not to this process's heap.
        let _ = tokio::task::spawn_blocking(memtrack::release_free_heap).await;
        info!(forgotten, kept, "page store emptied on request");
        (forgotten, kept)
    }

    /// Once the final dump's pages are in the job's images, the store no longer needs the pages
    /// it received for the job: they are forgotten (unless another job pins them) and the memory
    /// goes back to the kernel at once, before the restore needs as much again.
    async fn release_job_pages(&self, job: &str) {
        let mine = self
            .incoming
            .lock()
            .await
            .get_mut(job)
            .map(|i| std::mem::take(i.pinned_mut()))
            .unwrap_or_default();
        let others = self.pinned_by_incoming(Some(job)).await;
        let t = Instant::now();
        let removed = self.pages.lock().await.remove_except(&mine, &others);
        let trimmed = tokio::task::spawn_blocking(memtrack::release_free_heap)
            .await
            .unwrap_or(false);
        info!(%job, pages = removed, trimmed, took_ms = ferry_runtime::util::ms(t.elapsed()), "received pages released after the final dump");
    }

    /// Pages the store may hold.
    pub(crate) fn page_store_cap(&self) -> usize {
        self.cfg.page_store_pages() + super::lock(&self.store_grants).values().sum::<usize>()
    }

    /// Grows the page store while pre-copy job `job`, whose container holds `memory_bytes`,
    /// runs: its rounds bring that memory and the versions of pages rewritten meanwhile
    /// ([`store_bytes_for`]), which a store full of other pages could not take.
    pub(crate) async fn grant_store(&self, job: &str, memory_bytes: u64) {
        let pages = (store_bytes_for(memory_bytes) / 4096) as usize;
        let free = self.pages.lock().await.free_pages();
        let extra = pages.saturating_sub(free);
        if extra == 0 {
            return;
        }
        super::lock(&self.store_grants).insert(job.to_string(), extra);
        let cap = self.page_store_cap();
        self.pages.lock().await.set_max_pages(cap);
        info!(%job, extra_mib = (extra * 4096) >> 20, cap_mib = (cap * 4096) >> 20, "page store grown for the job");
    }

    /// Ends what [`Self::grant_store`] gave `job`.
    pub(crate) async fn release_store(&self, job: &str) {
        if super::lock(&self.store_grants).remove(job).is_none() {
            return;
        }
        let cap = self.page_store_cap();
        let mut store = self.pages.lock().await;
        store.set_max_pages(cap);
        if store.len() > cap {
            self.make_room(&mut store).await;
        }
    }

    /// Whether this host can take a container whose checkpoint carries `memory_bytes`:
    /// it needs that memory once for the running container, and with pre-copy what the page
    /// store lacks for [`store_bytes_for`] of it.
    pub(crate) async fn check_memory(&self, memory_bytes: u64, pre_copy: bool) -> Result<()> {
        if memory_bytes == 0 {
            return Ok(());
        }
        let (available, source) = match self.cfg.memory_budget_mib {
            Some(mib) => (mib << 20, "memory_budget_mib in its config"),
            None => match ferry_runtime::util::mem_available_bytes() {
                Some(b) => (b, "MemAvailable"),
                None => return Ok(()),
            },
        };
        let store_free = if pre_copy {
            (self.pages.lock().await.free_pages() as u64) * 4096
        } else {
            0
        };
        let store_need = if pre_copy {
            store_bytes_for(memory_bytes).saturating_sub(store_free)
        } else {
            0
        };
        // What the kernel and the agent need besides.
        let margin = 256u64 << 20;
        let need = memory_bytes + store_need + margin;
        if need > available {
            let mib = |b: u64| b >> 20;
            return Err(refuse(ErrorCode::NoRoom, format!(
                "{} cannot hold the container: its memory is {} MiB, and {} needs {} MiB for it ({}the running container, {} MiB of margin) but has {} MiB ({source}); free memory there, move a smaller container, or use stop-and-copy (no page store)",
                self.cfg.host,
                mib(memory_bytes),
                self.cfg.host,
                mib(need),
                if pre_copy {
                    format!("{} MiB more page store for pre-copy's pages, then ", mib(store_need))
                } else {
                    String::new()
                },
                mib(margin),
                mib(available)
            )));
        }
        Ok(())
    }

    /// Applies a pre-copy round's root filesystem diff.
    pub(crate) async fn rootfs_round(
        &self,
        PeerJob { peer, job }: PeerJob<'_>,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let (root, _stream) = self
            .with_incoming(peer, job, |i| (i.own_fs(), i.stream()))
            .await?;
        let stats = transfer::tree::recv_tree_with(recv, &root, shared_fs::Limits::default(), true)
            .await
            .context("receiving a root filesystem diff")?;
        Ok(PeerResponse::Ok {
            bytes: stats.wire_bytes,
        })
    }

    /// The final dump's pages: relays the stream into a `criu page-server` that writes the
    /// job's images. Answers only through the relay's own frames.
    pub(crate) async fn dump_pages(
        &self,
        PeerJob { peer, job }: PeerJob<'_>,
        recv: &mut super::peer::Incoming<'_>,
        send: &mut transfer::SendStream,
    ) -> Result<()> {
        let r = self
            .write_dump_pages(PeerJob { peer, job }, recv, send)
            .await;
        // A restore the source sent without waiting for the page server's close waits for this.
        let outcome = r.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
        self.arrived(peer, job, super::incoming::Arrival::FinalPages, outcome)
            .await;
        if r.is_ok() {
            self.release_job_pages(job).await;
        }
        r
    }

    async fn write_dump_pages(
        &self,
        PeerJob { peer, job }: PeerJob<'_>,
        recv: &mut super::peer::Incoming<'_>,
        send: &mut transfer::SendStream,
    ) -> Result<()> {
        let criu = match &self.criu {
            Ok(c) => c.path.clone(),
            Err(e) => {
                return Err(refuse(
                    ErrorCode::Unavailable,
                    format!("CRIU unusable on {}: {e}", self.cfg.host),
                ))
            }
        };
        let _stream = self
            .with_incoming(peer, job, |i| {
                i.set_pages_relayed();
                i.stream()
            })
            .await?;
        let (images, work) = (self.images_dir(job), self.work_dir(job));
        // The directory stays: a runc restore started ahead holds it (see `prestart_restore`).
        ferry_runtime::util::empty_dir(&images, &["descriptors.json"])?;
        std::fs::create_dir_all(&work)?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        // The page server gets its end at the same number, in the child only: clearing
        // close-on-exec here would leak it to children other threads spawn meanwhile.
        let fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(&criu);
        command_fds::CommandFdExt::preserved_fds(
            &mut cmd,
            vec![std::os::fd::OwnedFd::from(theirs)],
        );
        let mut child = cmd
            .arg("page-server")
            .arg("-D")
            .arg(&images)
            .arg("-W")
            .arg(&work)
            .args(["--ps-socket", &fd.to_string()])
            .args(["-o", "page-server.log", "-v2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} page-server", criu.display()))?;
        // Our copy of the page server's end closes with the command.
        drop(cmd);
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        // The source may open this stream before it freezes its container: the store is
        // locked only once its dump begins.
        let _ = tokio::io::AsyncBufReadExt::fill_buf(&mut *recv).await;
        let t = Instant::now();
        let relayed = {
            let mut store = self.pages.lock().await;
            let (rx, tx) = (&mut *recv, &mut *send);
            precopy::relay::relay_in(rx, tx, ours, &mut store).await
        };
        // It exits once the relay closed its socket.
        let pid = child.id();
        let status = match tokio::time::timeout(
            PAGE_SERVER_EXIT,
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await
        {
            Ok(waited) => Some(waited??),
            Err(_) => {
                // The waiting thread reaps it.
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                None
            }
        };
        let logs = self.cfg.state_dir.join("logs");
        ferry_runtime::logs::keep_log_soon(
            relayed.is_ok() && status.is_some_and(|s| s.success()),
            work.join("page-server.log"),
            logs.clone(),
            format!("{job}.page-server.log"),
        );
        let stats = relayed.context("relaying the final dump's pages")?;
        match status {
            Some(s) if s.success() => {}
            Some(s) => bail!(
                "criu page-server failed ({s}); see its log in {}",
                logs.display()
            ),
            None => bail!("criu page-server did not exit after the relay ended"),
        }
        info!(%job, pages = stats.pages, as_reference = stats.pages_as_reference,
            bytes = stats.link_bytes_read, took_ms = ferry_runtime::util::ms(t.elapsed()), "final dump's pages written");
        Ok(())
    }
}
