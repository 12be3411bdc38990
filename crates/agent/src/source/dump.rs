//! The source's final dump: written here, relayed to the destination's page store while CRIU
//! writes it, or lazy; the runc checkpoint started ahead of the freeze, and the root
//! filesystem's diff taken beside the dump.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shared_fs::{Diff, Snapshot};
use tracing::{info, warn};

use std::sync::atomic::Ordering;

use ferry_api::MigrateMode;

use super::Driver;
use crate::lock;
use crate::proto::PeerRequest;
use crate::rounds::Rounds;

/// The root filesystem's changes since `before` and the digest of the root as it is now.
pub(super) fn root_diff(root: &std::path::Path, before: &Snapshot) -> Result<(Diff, String)> {
    let mut now = shared_fs::snapshot(root)?;
    let diff = shared_fs::diff(before, &now);
    Ok((diff, ferry_runtime::bundle::root_digest(&mut now)))
}

/// What [`RootStart::start`] computes: the root's diff and digest, read beside CRIU's dump.
pub(crate) struct RootDiff(tokio::sync::oneshot::Receiver<Result<(Diff, String)>>);

impl RootDiff {
    /// The result, or `None` if it failed or never started (the caller computes it then).
    pub(crate) async fn result(self) -> Option<(Diff, String)> {
        match self.0.await {
            Ok(Ok(d)) => Some(d),
            Ok(Err(e)) => {
                warn!(error = %format!("{e:#}"), "the root's diff beside the dump failed: computed again");
                None
            }
            Err(_) => None,
        }
    }
}

/// Starts the root filesystem's diff on a thread of its own. Called right after the freeze:
/// nothing writes into a frozen container's root (CRIU's dump writes its images elsewhere), so
/// the walk, which grows with the number of files the container wrote, runs beside CRIU
/// instead of after it.
pub(crate) struct RootStart {
    root: std::path::PathBuf,
    before: Snapshot,
    tx: tokio::sync::oneshot::Sender<Result<(Diff, String)>>,
}

impl RootStart {
    pub(crate) fn start(self) {
        let RootStart { root, before, tx } = self;
        let spawned = std::thread::Builder::new()
            .name("root-diff".into())
            .spawn(move || {
                let _ = tx.send(root_diff(&root, &before));
            });
        if let Err(e) = spawned {
            // The sender is gone with the closure: the images compute it.
            warn!(error = %e, "no thread for the root's diff beside the dump");
        }
    }
}

/// A `runc checkpoint` started ahead, with the page-server socket it was started for, already
/// listened on (CRIU connects before its gate opens).
pub(crate) type DumpAhead = (
    ferry_runtime::runc::Prestarted,
    Option<std::os::unix::net::UnixListener>,
);

/// Listens on the page-server socket `sock` (replacing any earlier one) for CRIU's connection.
fn listen_for_criu(sock: &std::path::Path) -> Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(sock);
    let l = std::os::unix::net::UnixListener::bind(sock)
        .with_context(|| format!("listening on {}", sock.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The listener for CRIU's page-server connection: the one the dump started ahead listens on
/// (`early`), else a new one on `sock`.
pub(crate) fn criu_listener(
    sock: &std::path::Path,
    early: Option<std::os::unix::net::UnixListener>,
) -> Result<tokio::net::UnixListener> {
    let l = match early {
        Some(l) => l,
        None => listen_for_criu(sock)?,
    };
    Ok(tokio::net::UnixListener::from_std(l)?)
}

/// How long a `runc checkpoint` started before the redirect may take to reach its CRIU gate.
const GATE_REACH: Duration = Duration::from_secs(10);

/// Most memory a pre-copy's container may have for its final dump to be written here
/// ([`Driver::final_dump_here`]): 64 pages, at most about 2 ms at 1 Gbit/s (less compressed).
const FINAL_DUMP_HERE_BYTES: u64 = 256 << 10;

impl Driver {
    /// Waits for the final dump's runc to have exited (see `dump_finishing`).
    pub(super) async fn wait_dump_finishing(&mut self) -> Result<()> {
        if let Some(f) = self.dump_finishing.take() {
            tokio::task::spawn_blocking(move || f.wait())
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .context("the dump did not end cleanly")?;
        }
        Ok(())
    }

    /// Before an eager final dump: the pre-copy trackers removed (on a blocking thread) and
    /// the CPU throttle lifted: a container throttled hard (auto-converge) may not reach the
    /// freezer in time; it runs unthrottled for the few milliseconds until the freeze, whose
    /// dump reads every page anyway.
    pub(super) async fn stop_trackers(&mut self) -> Result<()> {
        let mut rounds = std::mem::replace(&mut self.rounds, Rounds::new());
        let (stopped, rounds) = tokio::task::spawn_blocking(move || {
            let r = rounds.stop_tracking();
            (r, rounds)
        })
        .await?;
        self.rounds = rounds;
        stopped?;
        self.rounds.lift_throttle();
        Ok(())
    }

    /// The report's memory section of a pre-copy restored eagerly.
    pub(super) fn report_eager_restore(&mut self) {
        self.memory = Some(migrate_core::MemoryReport {
            restore: "eager".into(),
            not_lazy: self.not_lazy.clone(),
            ..Default::default()
        });
    }

    /// Whether a pre-copy's final dump is written here and sent with the images, as a
    /// stop-and-copy's is: an eager restore of a container with at most
    /// [`FINAL_DUMP_HERE_BYTES`] of memory, whose few pages cost less on the link than relaying
    /// them costs (CRIU's pages through the agent to a page server at the destination: 3-6 ms
    /// more dump on these machines, `ferry bench --quick`'s echo rows).
    pub(crate) fn final_dump_here(&self) -> bool {
        self.mode == MigrateMode::PreCopy
            && self.rounds.placement.is_none()
            && self.memory_bytes > 0
            && self.memory_bytes <= FINAL_DUMP_HERE_BYTES
    }

    /// The dump's deadline, from the job's policy; a cancel kills it too.
    pub(crate) fn dump_bound(&self) -> ferry_runtime::runc::Bound {
        ferry_runtime::runc::Bound::new(
            self.deadlines.dump(),
            "the dump deadline",
            Some(Arc::clone(&self.job.cancel)),
        )
    }

    /// The relay the final dump will use: the page-server socket and whether the dump is lazy
    /// (pre-copy), or none (stop-and-copy); as the dump actions choose.
    pub(super) fn dump_relay(&self) -> Result<Option<(std::path::PathBuf, bool)>> {
        if self.mode != MigrateMode::PreCopy || self.final_dump_here() {
            return Ok(None);
        }
        let sock = self.agent.run_socket(&self.job.id, "ps")?;
        Ok(Some((sock, self.rounds.placement.is_some())))
    }

    /// Starts the final dump's `runc checkpoint` and waits until its CRIU waits at the gate
    /// (runc takes 10-15 ms to get there, which the freeze used to wait for). On failure the
    /// dump starts it again, and fails as it would.
    pub(super) async fn start_dump_ahead(&mut self) {
        let relay = match self.dump_relay() {
            Ok(r) => r,
            Err(e) => {
                warn!(job = %self.job.id, error = %format!("{e:#}"), "runc checkpoint not started ahead");
                return;
            }
        };
        let Some((mut pre, ps)) = self.prestart_dump(relay.clone()).await else {
            return;
        };
        let bound = ferry_runtime::runc::Bound::new(
            GATE_REACH,
            "the start of runc checkpoint",
            Some(Arc::clone(&self.job.cancel)),
        );
        match tokio::task::spawn_blocking(move || {
            let r = pre.reach_gate(&bound);
            (pre, r)
        })
        .await
        {
            Ok((pre, Ok(()))) => {
                let eager = matches!(relay, Some((_, false)));
                self.dump_ahead = Some(((pre, ps), relay));
                if eager {
                    match self.open_dump_pages().await {
                        Ok(s) => self.dump_pages_stream = Some(s),
                        Err(e) => {
                            warn!(job = %self.job.id, error = %format!("{e:#}"), "the final dump's page stream not opened ahead: the dump opens it")
                        }
                    }
                }
            }
            Ok((_, Err(e))) => {
                warn!(job = %self.job.id, error = %format!("{e:#}"), "runc checkpoint did not get ready ahead: the dump starts it again")
            }
            Err(e) => warn!(job = %self.job.id, error = %e, "runc checkpoint not started ahead"),
        }
    }

    /// The `runc checkpoint` started at the redirect if it was started for `relay`, else one
    /// started now ([`Self::prestart_dump`]).
    pub(crate) async fn dump_ahead_or_prestart(
        &mut self,
        relay: Option<(std::path::PathBuf, bool)>,
    ) -> Option<DumpAhead> {
        match self.dump_ahead.take() {
            Some((pre, r)) if r == relay => Some(pre),
            other => {
                // Started for another dump (or not at all): its gate closes.
                drop(other);
                self.prestart_dump(relay).await
            }
        }
    }

    /// Starts the final dump's `runc checkpoint` now, before the freeze, its CRIU held at a
    /// gate until [`ferry_runtime::runc::Prestarted::go`] (`relay`: the page-server socket and
    /// whether the dump is lazy, listened on first: CRIU connects to it before the gate). The
    /// images directory is emptied first and stays (runc holds it). `None`, with a warning, if
    /// it cannot start: the dump then starts runc itself, in the frozen window.
    pub(crate) fn prestart_dump(
        &self,
        relay: Option<(std::path::PathBuf, bool)>,
    ) -> impl std::future::Future<Output = Option<DumpAhead>> + Send + 'static {
        let ready = self.agent.runc.has_criu_frontend();
        let job = self.job.id.clone();
        let runc = self.agent.runc.clone();
        let name = self.spec.name.clone();
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let gate = self.agent.run_socket(&job, "dump-gate");
        async move {
            if !ready {
                return None;
            }
            let r = tokio::task::spawn_blocking(move || {
                let gate = gate?;
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)?;
                std::fs::create_dir_all(&work)?;
                let ps = match &relay {
                    Some((sock, _)) => Some(listen_for_criu(sock)?),
                    None => None,
                };
                let relay = relay.as_ref().map(|(p, lazy)| (p.as_path(), *lazy));
                runc.prestart_checkpoint(&name, &images, &work, relay, &gate)
                    .map(|p| (p, ps))
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
            match r {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(%job, error = %format!("{e:#}"), "runc checkpoint not started ahead: the dump starts it in the frozen window");
                    None
                }
            }
        }
    }

    /// After a failed final dump: the container runs on, on the network again.
    pub(crate) fn resume_source(&mut self) {
        let l = self.agent.layout(&self.spec.name);
        if let Err(e) = ferry_runtime::netns::set_veth(&l, true) {
            warn!(error = %format!("{e:#}"), "the source container's veth could not be brought up again");
        } else {
            self.source_link_down = false;
        }
        ferry_runtime::freeze::thaw(&self.agent.cfg.host, &self.spec.name);
    }

    /// Stop-and-copy's dump (and a pre-copy's whose memory is tiny, `final_dump_here`): the
    /// container frozen, CRIU's images written here with every page, the container left in
    /// place, frozen, until the commit.
    pub(super) async fn dump_here(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let pre = self.dump_ahead_or_prestart(None).await.map(|(p, _)| p);
        let bound = self.dump_bound();
        let runc = self.agent.runc.bounded(bound.clone());
        let name = self.spec.name.clone();
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let host = self.agent.cfg.host.clone();
        let (logs, job_id) = (self.agent.cfg.state_dir.join("logs"), job.clone());
        let layout = self.agent.layout(&self.spec.name);
        let runc_root = self.agent.runc.root().to_path_buf();
        let pause = self.faults.pause_in_dump_ms;
        let cancel = Arc::clone(&self.job.cancel);
        let root_start = self.root_diff_beside_dump();
        let dump_conf = self.dump_conf();
        self.source_link_down = true;
        let r = tokio::task::spawn_blocking(move || {
            if pre.is_none() {
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)?;
                std::fs::create_dir_all(&work)?;
            }
            let t = Instant::now();
            ferry_runtime::freeze::freeze_for_dump(&host, &name, &layout, &runc_root, &dump_conf())?;
            root_start.start();
            if pause > 0 {
                warn!(container = %name, ms = pause, "pausing in the dump (fault hook)");
                let until = Instant::now() + Duration::from_millis(pause);
                while Instant::now() < until {
                    if cancel.load(Ordering::SeqCst) {
                        bail!("cancelled during the dump");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let freeze_ms = ferry_runtime::util::ms(t.elapsed());
            let r = match pre {
                Some(p) => p.go_until_criu_done(bound).map(Some),
                None => runc.checkpoint(&name, &images, &work).map(|()| None),
            };
            info!(container = %name, freeze_ms, checkpoint_ms = ferry_runtime::util::ms(t.elapsed()) - freeze_ms, "dumped (left in place, frozen)");
            ferry_runtime::logs::keep_log_soon(r.is_ok(), work.join("dump.log"), logs, format!("{job_id}.dump.log"));
            r
        })
        .await?;
        if r.is_err() {
            // CRIU leaves a container it could not dump as it found it: frozen.
            self.resume_source();
        }
        self.dump_finishing = r?;
        Ok(0)
    }

    /// CRIU's configuration for the final dump, made right before the freeze: the agent's
    /// (`CRIU_CONF`) and the paths of the watched inodes (`inspect`), looked up for new watches
    /// while the container still runs.
    pub(crate) fn dump_conf(&self) -> impl FnOnce() -> String + Send + 'static {
        let (host, name) = (self.agent.cfg.host.clone(), self.spec.name.clone());
        let watches = Arc::clone(&self.watch_paths);
        move || {
            let mut w = watches.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(pids) = ferry_runtime::cgroup_tree::container_pids(&host, &name) {
                w.update(&pids);
            }
            for u in &w.unresolved {
                tracing::warn!(
                    container = %name,
                    pid = u.pid,
                    fd = u.fd,
                    kind = u.kind,
                    inode = u.inode.ino,
                    "no path found for a watched inode beneath the container's root; CRIU must find it"
                );
            }
            format!("{}{}", crate::CRIU_CONF, w.criu_conf())
        }
    }

    pub(crate) fn root_diff_beside_dump(&mut self) -> RootStart {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.root_diff = Some(RootDiff(rx));
        RootStart {
            root: self.agent.layout(&self.spec.name).own_fs(&self.spec),
            before: self.rootfs_snapshot.clone().unwrap_or_default(),
            tx,
        }
    }

    /// Opens the stream of an eager final dump's pages: the destination starts its
    /// `criu page-server` on it at once, and relays into it what comes later.
    pub(super) async fn open_dump_pages(
        &mut self,
    ) -> Result<(transfer::SendStream, transfer::RecvStream)> {
        let job = self.job.id.clone();
        let conn = self.conn().await?;
        let (mut send, recv) = conn.open().await?;
        // QUIC sends it at once: the destination sees the stream now.
        transfer::frame::write_msg(&mut send, &PeerRequest::DumpPages { job }).await?;
        Ok((send, recv))
    }

    /// Pre-copy's final dump: trackers removed, container frozen, CRIU's pages relayed to the
    /// destination's page server (pages it holds cross as references), the container left in
    /// place, frozen, until the commit.
    pub(super) async fn dump_relayed(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let sock = self.agent.run_socket(&job, "ps")?;
        // Opened with the dump started ahead, else first: the destination starts its page
        // server while this side freezes.
        let (send, recv) = match self.dump_pages_stream.take() {
            Some(s) => s,
            None => self.open_dump_pages().await?,
        };
        let (pre, early) = match self
            .dump_ahead_or_prestart(Some((sock.clone(), false)))
            .await
        {
            Some((p, l)) => (Some(p), l),
            None => (None, None),
        };
        self.stop_trackers().await?;
        let known = std::mem::take(&mut *lock(&self.rounds.known));
        let fast = std::mem::take(&mut *lock(&self.rounds.fast));
        let listener = criu_listener(&sock, early)?;
        let bound = self.dump_bound();
        let (runc, name) = (
            self.agent.runc.bounded(bound.clone()),
            self.spec.name.clone(),
        );
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let host = self.agent.cfg.host.clone();
        let (logs, job_id) = (self.agent.cfg.state_dir.join("logs"), job.clone());
        let s = sock.clone();
        let layout = self.agent.layout(&self.spec.name);
        let runc_root = self.agent.runc.root().to_path_buf();
        let root_start = self.root_diff_beside_dump();
        let dump_conf = self.dump_conf();
        self.source_link_down = true;
        let mut ckpt = tokio::task::spawn_blocking(move || {
            if pre.is_none() {
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images)?;
                std::fs::create_dir_all(&work)?;
            }
            let t = Instant::now();
            ferry_runtime::freeze::freeze_for_dump(
                &host,
                &name,
                &layout,
                &runc_root,
                &dump_conf(),
            )?;
            root_start.start();
            let freeze_ms = ferry_runtime::util::ms(t.elapsed());
            let r = match pre {
                Some(p) => p.go_until_criu_done(bound).map(Some),
                None => runc
                    .checkpoint_relayed(&name, &images, &work, &s, false)
                    .map(|()| None),
            };
            info!(container = %name, freeze_ms, checkpoint_ms = ferry_runtime::util::ms(t.elapsed()) - freeze_ms, "dumped (pages relayed)");
            ferry_runtime::logs::keep_log_soon(
                r.is_ok(),
                work.join("dump.log"),
                logs,
                format!("{job_id}.dump.log"),
            );
            r
        });
        let (criu, _) = tokio::select! {
            a = listener.accept() => {
                let _ = std::fs::remove_file(&sock);
                a.context("accepting CRIU's page-server connection")?
            }
            r = &mut ckpt => {
                let _ = std::fs::remove_file(&sock);
                self.resume_source();
                drop(r??);
                bail!("CRIU finished without connecting to the page-server socket");
            }
        };
        let mut known = known;
        let relay = precopy::relay::relay_out(
            criu,
            send,
            recv,
            &mut known,
            &fast,
            precopy::relay::Close::Pipelined,
        )
        .await;
        drop(fast);
        let ck = ckpt.await?;
        // The container stays frozen in place: rollback thaws it, the commit removes it.
        match ck {
            Err(e) => {
                self.resume_source();
                return Err(e);
            }
            Ok(f) => self.dump_finishing = f,
        }
        let (stats, pending) = relay.context("relaying the final dump's pages")?;
        // CRIU waited for the destination's page server at each of these (none but a PARENT
        // query: OPEN2 and CLOSE are answered here).
        self.count_round_trips(u32::try_from(stats.round_trips).unwrap_or(u32::MAX));
        let mut answers = precopy::relay::RelayStats::default();
        self.relay_confirm = Some(tokio::spawn(async move {
            pending
                .confirm(&mut answers)
                .await
                .context("the destination's page server")
        }));
        info!(%job, pages = stats.pages, as_reference = stats.pages_as_reference,
            bytes = stats.link_bytes_written, relay_ms = ferry_runtime::util::ms(stats.elapsed), "final dump's pages relayed");
        Ok(stats.link_bytes_written)
    }
}
