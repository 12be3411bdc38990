//! The destination side of a migration: prepare, receive, restore, then commit or abort.
//!
//! Everything an incoming job creates is recorded on disk first, so that an agent restarted after
//! a crash removes it; a job whose source disappears (connection closed) or stays silent past its
//! deadline is aborted here without waiting for anyone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use orchestrator_shim::api::ContainerSpec;
use orchestrator_shim::hold::Hold;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{lock, Agent, ContainerRecord};
use crate::proto::PeerResponse;
use ferry_runtime::layout::Layout;

/// The file of a checkpoint where runc lists the container's stdio (read by its restore).
const DESCRIPTORS: &str = "descriptors.json";
/// runc's `descriptors.json` for a container whose stdio is `/dev/null`, as every container
/// Ferry starts (`ferry_runtime::runc::Runc`).
const STDIO_DESCRIPTORS: &str = r#"["/dev/null","/dev/null","/dev/null"]"#;

/// Whether the images' `descriptors.json` in `images` lists what a runc started ahead read.
fn same_descriptors(images: &std::path::Path) -> bool {
    let read = |b: &[u8]| serde_json::from_slice::<Vec<String>>(b).ok();
    let ours = read(STDIO_DESCRIPTORS.as_bytes());
    std::fs::read(images.join(DESCRIPTORS)).is_ok_and(|b| read(&b).is_some_and(|d| Some(d) == ours))
}

/// How long a prepared job may wait for its images.
const PREPARED_TTL: Duration = Duration::from_secs(120);
/// How long a restored container waits for the source's commit before it is removed.
const RESTORED_TTL: Duration = Duration::from_secs(10);

pub(crate) struct Incoming {
    spec: ContainerSpec,
    /// The peer that prepared the job: the only one that may drive it.
    from: String,
    conn_id: usize,
    layout: Layout,
    hold: Option<Hold>,
    /// `runc restore` is running: an abort kills it through `abort` and waits for its outcome
    /// (see `restore_incoming`).
    restoring: bool,
    /// Set by an abort: kills the running restore.
    abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Streams of this job being received now: the watchdog judges a job by progress, so it
    /// never expires while one runs (QUIC's idle timeout ends a stream that stalls).
    streams: std::sync::Arc<Streams>,
    restored: bool,
    deadline: Instant,
    /// Pre-copy: pages of the store this job relies on (kept until it ends).
    pinned: transfer::pages::PageSet,
    /// The final dump's pages were written into the images directory by the relay.
    pages_relayed: bool,
    /// Lazy restore: which page of the store is at which address (see `fill`).
    pub(crate) index: super::fill::PageIndex,
    /// Lazy restore: its memory is being filled in (the images stay until the fill ends).
    pub(crate) filling: bool,
    /// `runc restore` started at the prepare, in lazy mode or not, its CRIU held at a gate
    /// until the images are here (see [`Agent::prestart_restore`]).
    prestarted: Option<(bool, ferry_runtime::runc::Prestarted)>,
    /// The restore's runc, still exiting after CRIU reported success: the commit waits for it
    /// (runc fails, and removes the container, if its own last steps fail).
    finishing: Option<ferry_runtime::runc::Finishing>,
    /// How the last images request ended (`None`: none has ended yet): a restore sent right
    /// behind it ([`RestoreLimits::after_images`]) waits here.
    images: tokio::sync::watch::Sender<Option<Result<(), String>>>,
    /// How the relay of the final dump's pages ended here (`None`: it has not ended): a
    /// restore sent without waiting for it ([`RestoreLimits::after_pages`]) waits here.
    final_pages: tokio::sync::watch::Sender<Option<Result<(), String>>>,
}

impl Incoming {
    pub(crate) fn from(&self) -> &str {
        &self.from
    }

    pub(crate) fn is_restored(&self) -> bool {
        self.restored
    }

    /// The source is active: push the deadline back.
    pub(crate) fn touch(&mut self) {
        self.deadline = Instant::now() + PREPARED_TTL;
    }

    /// A stream of this job starts: the job does not expire until it ends, and its end counts
    /// as activity.
    pub(crate) fn stream(&mut self) -> StreamGuard {
        self.touch();
        self.streams
            .active
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StreamGuard(std::sync::Arc::clone(&self.streams))
    }

    /// Whether the watchdog may remove this job now.
    fn expired(&self, now: Instant) -> bool {
        // An abort that arrived during the restore: removed as soon as the restore ends.
        if self.abort.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        if self.restored {
            return self.deadline < now;
        }
        let ended = *lock(&self.streams.last_end);
        self.streams
            .active
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
            && self.deadline < now
            && ended.is_none_or(|e| e + PREPARED_TTL < now)
    }

    pub(crate) fn pin(&mut self, hashes: transfer::pages::PageSet) {
        if self.pinned.is_empty() {
            self.pinned = hashes;
        } else {
            self.pinned.extend(hashes);
        }
    }

    pub(crate) fn pinned(&self) -> &transfer::pages::PageSet {
        &self.pinned
    }

    pub(crate) fn pinned_mut(&mut self) -> &mut transfer::pages::PageSet {
        &mut self.pinned
    }

    /// Where the container's own files go (its upper layer, or its whole root).
    pub(crate) fn own_fs(&self) -> std::path::PathBuf {
        self.layout.own_fs(&self.spec)
    }

    pub(crate) fn set_pages_relayed(&mut self) {
        self.pages_relayed = true;
    }
}

/// The streams of an incoming job being received.
#[derive(Default)]
pub(crate) struct Streams {
    active: std::sync::atomic::AtomicUsize,
    last_end: std::sync::Mutex<Option<Instant>>,
}

/// One stream of an incoming job being received (see [`Incoming::stream`]).
pub(crate) struct StreamGuard(std::sync::Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        *lock(&self.0.last_end) = Some(Instant::now());
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What a restore may wait for (see [`Agent::wait_for_arrival`]).
#[derive(Clone, Copy)]
pub(crate) enum Arrival {
    Images,
    FinalPages,
}

/// Bounds of a restore, from the source's request.
pub(crate) struct RestoreLimits {
    /// Test hook: sleep this long before restoring.
    pub(crate) pause_ms: u64,
    /// The restore (and the pause) is killed after this.
    pub(crate) deadline: Duration,
    /// Restore lazily from the page store (see `fill`).
    pub(crate) lazy: bool,
    /// Wait for the images request the source sent just before (see `arrived`).
    pub(crate) after_images: bool,
    /// Wait until the final dump's relayed pages are written (see `arrived`).
    pub(crate) after_pages: bool,
}

/// Test hooks of an `Images` request (refused unless the agent allows fault hooks).
pub(crate) struct ImageHooks {
    /// Damage the images so that the restore fails.
    pub(crate) corrupt: bool,
    /// Damage one memory page of the workload.
    pub(crate) corrupt_page: bool,
    /// Add a stray file to the container's root after the final diff.
    pub(crate) corrupt_rootfs: bool,
}

#[derive(Serialize, Deserialize)]
struct Record {
    job: String,
    spec: ContainerSpec,
}

impl Agent {
    fn incoming_record(&self, job: &str) -> std::path::PathBuf {
        self.cfg
            .state_dir
            .join("incoming")
            .join(format!("{job}.json"))
    }

    pub(crate) async fn preflight_incoming(&self, name: &str) -> Result<PeerResponse> {
        if !self.cfg.runs_containers {
            bail!("host {} does not run containers", self.cfg.host);
        }
        let criu = match &self.criu {
            Ok(c) => c.version.to_string(),
            Err(e) => bail!("CRIU unusable on {}: {e}", self.cfg.host),
        };
        let (r, dir) = (self.runc.clone(), self.cfg.state_dir.clone());
        let (runc, free_bytes, images_free_bytes) = tokio::task::spawn_blocking(move || {
            let images = dir.join("images");
            let images_free = std::fs::create_dir_all(&images)
                .ok()
                .and_then(|()| ferry_runtime::util::free_bytes(&images).ok());
            (
                r.available(),
                ferry_runtime::util::free_bytes(&dir),
                images_free,
            )
        })
        .await?;
        let runc = runc.with_context(|| format!("runc unusable on {}", self.cfg.host))?;
        let free_bytes = free_bytes?;
        if lock(&self.containers).contains_key(name)
            || self
                .incoming
                .lock()
                .await
                .values()
                .any(|i| i.spec.name == name)
        {
            bail!(
                "a container named {name:?} already exists on {}",
                self.cfg.host
            );
        }
        let pages_held = self.pages.lock().await.len() as u64;
        let no_lazy_restore = if !self.cfg.lazy_restore {
            Some(format!(
                "lazy restores are off on {} (lazy_restore in its config)",
                self.cfg.host
            ))
        } else {
            self.lazy_pages.clone().err()
        };
        Ok(PeerResponse::Preflight {
            criu,
            runc,
            free_bytes,
            pages_held,
            no_lazy_restore,
            images_free_bytes,
            lazy_max_mapping_bytes: (self.criu_patch < 2).then_some(criu_sys::LAZY_MAPPING_LIMIT),
            cpu_flags: Some(
                ferry_runtime::cpu::host_isa_flags(&self.cfg.hide_cpu_flags)
                    .into_iter()
                    .collect(),
            ),
        })
    }

    pub(crate) async fn prepare(
        &self,
        peer: &str,
        conn_id: usize,
        job: String,
        spec: ContainerSpec,
        restore_lazily: bool,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        if !orchestrator_shim::api::valid_name(&spec.name) || !valid_job(&job) {
            bail!("invalid container name {:?} or job id {job:?}", spec.name);
        }
        // Nothing from a peer is used unchecked: the MAC must be the one derived from the IP,
        // the prefix sensible, the command present.
        if spec.mac != orchestrator_shim::api::mac_for_ip(spec.ip)
            || !(8..=30).contains(&spec.prefix_len)
            || spec.args.is_empty()
            || spec.args.len() > 256
        {
            bail!(
                "refusing container spec for {:?}: ip {} mac {} prefix /{} args {}",
                spec.name,
                spec.ip,
                spec.mac,
                spec.prefix_len,
                spec.args.len()
            );
        }
        ferry_runtime::process::check_received(&spec)
            .map_err(|why| anyhow::anyhow!("refusing container spec for {:?}: {why}", spec.name))?;
        // The base is named by a tree id that becomes a path under the store: anything but 64
        // hex digits (such as "/" or "../..") is refused before any directory is touched.
        if let Some(img) = &spec.image {
            shared_fs::store::check_id(&img.tree)
                .and_then(|()| shared_fs::store::check_image_name(&img.name))
                .with_context(|| format!("refusing container spec for {:?}", spec.name))?;
        }
        // Name and address are checked and reserved in one step against the containers here,
        // the ones being created and the other incoming jobs (the reservation ends below).
        {
            let inc = self.incoming.lock().await;
            let mut creating = lock(&self.creating);
            if inc.contains_key(&job) || self.was_committed(&job) {
                bail!("job {job} is already being received or was received");
            }
            let taken = lock(&self.containers)
                .values()
                .map(|c| (c.spec.name.clone(), c.spec.ip))
                .chain(creating.iter().cloned())
                .chain(inc.values().map(|i| (i.spec.name.clone(), i.spec.ip)))
                .find(|(n, ip)| *n == spec.name || *ip == spec.ip);
            if let Some((n, ip)) = taken {
                bail!(
                    "container {:?} ({}) cannot come here: {n:?} with address {ip} exists or is arriving on {}",
                    spec.name,
                    spec.ip,
                    self.cfg.host
                );
            }
            creating.push((spec.name.clone(), spec.ip));
        }
        if let Some(img) = &spec.image {
            lock(&self.incoming_bases).insert(job.clone(), img.tree.clone());
        }
        let r = self
            .prepare_reserved(
                peer,
                conn_id,
                job.clone(),
                spec.clone(),
                restore_lazily,
                recv,
            )
            .await;
        lock(&self.creating).retain(|(n, _)| *n != spec.name);
        if r.is_err() {
            lock(&self.incoming_bases).remove(&job);
        }
        r
    }

    async fn prepare_reserved(
        &self,
        peer: &str,
        conn_id: usize,
        job: String,
        spec: ContainerSpec,
        restore_lazily: bool,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        if spec.prefix_len != self.cfg.overlay_prefix_len {
            bail!(
                "container {:?} comes with prefix /{}, this overlay is /{}",
                spec.name,
                spec.prefix_len,
                self.cfg.overlay_prefix_len
            );
        }
        let layout = self.layout(&spec.name);
        let rec = self.incoming_record(&job);
        std::fs::create_dir_all(rec.parent().unwrap_or(&self.cfg.state_dir))?;
        std::fs::write(
            &rec,
            serde_json::to_vec(&Record {
                job: job.clone(),
                spec: spec.clone(),
            })?,
        )?;
        let r = async {
            // Nothing of this name runs here (checked above): anything in its cgroup is left
            // over from a container that did not end cleanly.
            ferry_runtime::cgroup_tree::kill_cgroup_procs(&layout.cgroup);
            ferry_runtime::bundle::remove_bundle(&layout);
            // A container from an image: its base must be here already (the source sent what
            // was missing); the tree that follows is its own layer.
            let lower = match &spec.image {
                Some(img) => Some(self.base_layer(img).await?),
                None => None,
            };
            let own = layout.own_fs(&spec);
            std::fs::create_dir_all(&own)?;
            // The container's own files: synced as they arrive (they must survive a crash
            // once the migration commits).
            let stats =
                transfer::tree::recv_tree_with(recv, &own, shared_fs::Limits::default(), true)
                    .await
                    .context("receiving the root filesystem")?;
            if let Some(lower) = &lower {
                ferry_runtime::bundle::mount_overlay_rootfs(&layout, lower)?;
            }
            ferry_runtime::bundle::write_config(
                &layout,
                &spec,
                &self.cfg.host,
                Some(super::CRIU_CONF),
            )?;
            // Where the restore finds /dev/shm if the dump leaves it out.
            ferry_runtime::bundle::mount_shm(&layout)?;
            let (l, s, bridge) = (layout.clone(), spec.clone(), self.cfg.bridge.clone());
            let hold = tokio::task::spawn_blocking(move || -> Result<Hold> {
                ferry_runtime::netns::create_netns(&l, &s, &bridge)?;
                Ok(Hold::start(&l.netns, 0)?)
            })
            .await??;
            let prestarted = self
                .prestart_restore(&job, &layout, &spec.name, restore_lazily)
                .await;
            Ok::<_, anyhow::Error>((stats, hold, prestarted))
        }
        .await;
        match r {
            Ok((stats, hold, prestarted)) => {
                info!(%job, container = %spec.name, from = peer, bytes = stats.wire_bytes, "prepared");
                self.incoming.lock().await.insert(
                    job,
                    Incoming {
                        spec,
                        from: peer.to_string(),
                        conn_id,
                        layout,
                        hold: Some(hold),
                        restoring: false,
                        abort: Default::default(),
                        streams: Default::default(),
                        restored: false,
                        deadline: Instant::now() + PREPARED_TTL,
                        pinned: Default::default(),
                        pages_relayed: false,
                        index: Default::default(),
                        filling: false,
                        prestarted,
                        finishing: None,
                        images: tokio::sync::watch::channel(None).0,
                        final_pages: tokio::sync::watch::channel(None).0,
                    },
                );
                Ok(PeerResponse::Ok {
                    bytes: stats.wire_bytes,
                })
            }
            Err(e) => {
                let undo = self.leftovers(&job, layout, &spec.name);
                // runc and namespace removal block: not on an async worker.
                let _ = tokio::task::spawn_blocking(move || undo.remove()).await;
                Err(e)
            }
        }
    }

    /// Starts `runc restore` for job `job` now, its CRIU held at a gate until the images are
    /// here ([`ferry_runtime::runc::Runc::prestart_restore`]): runc's start-up then happens while
    /// the source is still dumping, not in the frozen window. The images directory starts with
    /// the `descriptors.json` runc writes for every container Ferry runs (its stdio is
    /// `/dev/null`); the restore checks that the images brought the same. `None` (with a
    /// warning) if it cannot start: the restore then starts runc itself.
    async fn prestart_restore(
        &self,
        job: &str,
        layout: &Layout,
        name: &str,
        lazy: bool,
    ) -> Option<(bool, ferry_runtime::runc::Prestarted)> {
        if !self.runc.has_criu_frontend() {
            return None;
        }
        if !ferry_runtime::bundle::has_mount_points(&layout.rootfs()) {
            info!(%job, container = name, "runc restore not started ahead: the container's root lacks its mount points (it was made by an earlier version)");
            return None;
        }
        let (images, work) = (self.images_dir(job), self.work_dir(job));
        let gate = self.run_socket(job, "restore-gate");
        let (runc, bundle, name) = (self.runc.clone(), layout.bundle.clone(), name.to_string());
        let r = tokio::task::spawn_blocking(move || {
            let gate = gate?;
            let _ = std::fs::remove_dir_all(&images);
            std::fs::create_dir_all(&images)?;
            std::fs::write(images.join(DESCRIPTORS), STDIO_DESCRIPTORS)?;
            std::fs::create_dir_all(&work)?;
            runc.prestart_restore(&name, &bundle, &images, &work, lazy, &gate)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        match r {
            Ok(p) => Some((lazy, p)),
            Err(e) => {
                warn!(%job, error = %format!("{e:#}"), "runc restore not started ahead: the restore starts it in the frozen window");
                None
            }
        }
    }

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
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        if (corrupt || corrupt_page || corrupt_rootfs) && !self.cfg.allow_fault_hooks {
            bail!(
                "fault hooks are disabled on {} (allow_fault_hooks in its config)",
                self.cfg.host
            );
        }
        let (_stream, relayed, own) = match self.incoming.lock().await.get_mut(job) {
            Some(i) if i.from != peer => bail!("job {job} belongs to {}, not {peer}", i.from),
            Some(i) => (i.stream(), i.pages_relayed, i.layout.own_fs(&i.spec)),
            None => bail!("no prepared job {job} here (it expired or was aborted)"),
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
    async fn wait_for_arrival(
        &self,
        peer: &str,
        job: &str,
        what: Arrival,
        limit: Duration,
    ) -> Result<()> {
        let mut rx = match self.incoming.lock().await.get_mut(job) {
            Some(i) if i.from != peer => bail!("job {job} belongs to {}, not {peer}", i.from),
            Some(i) => {
                i.touch();
                match what {
                    Arrival::Images => i.images.subscribe(),
                    Arrival::FinalPages => i.final_pages.subscribe(),
                }
            }
            None => bail!("no prepared job {job} here (it expired or was aborted)"),
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
            bail!(
                "a restore pause of {pause_ms} ms is refused: fault hooks pause at most 120000 ms"
            );
        }
        if pause_ms > 0 && !self.cfg.allow_fault_hooks {
            bail!(
                "fault hooks are disabled on {} (allow_fault_hooks in its config)",
                self.cfg.host
            );
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
        let (name, layout, abort, fill_pages, prestarted) =
            match self.incoming.lock().await.get_mut(job) {
                Some(i) if i.from != peer => bail!("job {job} belongs to {}, not {peer}", i.from),
                Some(i) => {
                    i.restoring = true;
                    let fill_pages = lazy.then(|| {
                        // The source checks every lazy page against its frozen copy (see `lazy`).
                        let pages = super::fill::FillPages::new(std::mem::take(&mut i.index), true);
                        let (tx, _) = tokio::sync::watch::channel(None);
                        lock(&self.fills).insert(
                            job.to_string(),
                            super::fill::Fill {
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
                    )
                }
                None => bail!("no prepared job {job} here (it expired or was aborted)"),
            };
        // Lazy: the daemon that fills the memory in from the page store starts first.
        let mut daemon = None;
        if let Some(pages) = fill_pages {
            let criu = match &self.criu {
                Ok(c) => c.path.clone(),
                Err(e) => {
                    self.forget_fill(job);
                    bail!("CRIU unusable on {}: {e}", self.cfg.host)
                }
            };
            let (images, work) = (self.images_dir(job), self.work_dir(job));
            let rec = super::fill::FillRecord {
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
                        let maps = match criu_sys::image::read_pagemaps(&images) {
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
                            let lazy = super::lazyd::lazy_ranges(&maps);
                            let (listener, _) = super::lazyd::listen(&work)?;
                            Ok(FillDaemon::Agent(listener, lazy))
                        } else {
                            super::fill::start_daemon(&criu, &images, &work).map(FillDaemon::Criu)
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
                    let source = super::fill::Source {
                        job: job.to_string(),
                        host: peer.to_string(),
                    };
                    let (child, server) = match d {
                        FillDaemon::Criu(d) => (
                            Some(d.child),
                            tokio::spawn(super::fill::serve(
                                Arc::clone(self),
                                d.socket,
                                Arc::clone(&pages),
                                source,
                            )),
                        ),
                        FillDaemon::Agent(listener, lazy) => (
                            None,
                            tokio::spawn(super::lazyd::run(
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
            let r = match prestarted {
                Some((was_lazy, p)) if was_lazy == lazy && same_descriptors(&images) => {
                    p.go_until_criu_done(bound).map(Some)
                }
                Some((was_lazy, p)) => {
                    info!(container = %name, was_lazy, lazy, "the runc restore started ahead does not fit these images: starting another");
                    p.cancel();
                    runc.restore(&name, &layout.bundle, &images, &work, lazy)
                        .map(|()| None)
                }
                None => runc
                    .restore(&name, &layout.bundle, &images, &work, lazy)
                    .map(|()| None),
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

    pub(crate) async fn commit_incoming(
        self: &Arc<Self>,
        peer: &str,
        job: &str,
        recovered: bool,
    ) -> Result<PeerResponse> {
        let mut incoming = self.incoming.lock().await;
        let mut abort_now = false;
        if let Some(i) = incoming.get(job) {
            if i.from != peer {
                bail!("job {job} belongs to {}, not {peer}", i.from);
            }
            if i.abort.load(std::sync::atomic::Ordering::SeqCst) {
                // Aborted during its restore (its source's connection ended, or an abort):
                // the watchdog removes it; it is never committed.
                return Ok(PeerResponse::Aborted {
                    job: job.to_string(),
                });
            }
            if !i.restored && !recovered {
                bail!("job {job}: container {:?} is not restored yet", i.spec.name);
            }
            // Its source restarted and cannot know how far the job got: a copy not restored
            // by now is never committed.
            abort_now = !i.restored;
        }
        if abort_now {
            drop(incoming);
            self.abort_incoming(job, "its source restarted before the restore had ended")
                .await;
            return Ok(PeerResponse::Aborted {
                job: job.to_string(),
            });
        }
        // runc's own end after CRIU's success, usually over by now: no commit before it.
        if let Some(f) = incoming.get_mut(job).and_then(|i| i.finishing.take()) {
            let ended = tokio::task::spawn_blocking(move || f.wait())
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .with_context(|| format!("job {job}: the restore did not end cleanly"));
            if let Err(e) = ended {
                // Never committed: the copy here goes, and a retried commit is told so.
                drop(incoming);
                self.abort_incoming(job, &format!("{e:#}")).await;
                return Err(e);
            }
        }
        let Some(mut inc) = incoming.remove(job) else {
            drop(incoming);
            // A retried commit whose first answer was lost: the job is already ours. A job
            // this host does not know was never committed here (presumed abort).
            if self.was_committed(job) {
                return Ok(PeerResponse::Ok { bytes: 0 });
            }
            return Ok(PeerResponse::Aborted {
                job: job.to_string(),
            });
        };
        // The commit point: recorded (synced) before anything else, under the lock that keeps
        // the watchdog and aborts away from this job.
        if let Err(e) = self.record_committed(job) {
            incoming.insert(job.to_string(), inc);
            return Err(e);
        }
        drop(incoming);
        if let Some(hold) = inc.hold.take() {
            // Past the commit point the container is ours whatever happens to the hold.
            match tokio::task::spawn_blocking(move || hold.release_now()).await {
                Ok(Ok(released)) => info!(%job, released, "held packets released"),
                Ok(Err(e)) => {
                    warn!(%job, error = %e, "releasing held packets failed; TCP peers retransmit")
                }
                Err(e) => {
                    warn!(%job, error = %e, "releasing held packets failed; TCP peers retransmit")
                }
            }
        }
        // Listed here at once; written to disk after the answer (the commit record above makes
        // a restart adopt it anyway: `finish_recorded_commit`).
        self.adopt_in_memory(job, &inc.spec);
        // The container list's fsync, the gratuitous ARP, the page store's grant and the
        // images (as large as the container's memory) are not on the way of the commit's
        // answer, which ends the source's count of the frozen time. A lazy restore still
        // filling in needs the images: its end removes them.
        let (agent, job_id, filling) = (Arc::clone(self), job.to_string(), inc.filling);
        let (netns, spec) = (inc.layout.netns.clone(), inc.spec.clone());
        tokio::spawn(async move {
            let a = Arc::clone(&agent);
            let j = job_id.clone();
            let _ = tokio::task::spawn_blocking(move || a.adopt_on_disk(&j)).await;
            announce(&netns, &spec);
            if !filling {
                agent.release_store(&job_id).await;
                let (images, work) = (agent.images_dir(&job_id), agent.work_dir(&job_id));
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = std::fs::remove_dir_all(images);
                    let _ = std::fs::remove_dir_all(work);
                })
                .await;
            }
        });
        info!(%job, container = %inc.spec.name, "migration committed: container owned here");
        Ok(PeerResponse::Ok { bytes: 0 })
    }

    /// The peer that prepared incoming job `job`, if it is here.
    pub(crate) async fn incoming_owner(&self, job: &str) -> Option<String> {
        self.incoming.lock().await.get(job).map(|i| i.from.clone())
    }

    /// Removes everything job `job` created here.
    pub(crate) async fn abort_incoming(&self, job: &str, why: &str) {
        let inc = {
            let mut incoming = self.incoming.lock().await;
            match incoming.get_mut(job) {
                // Never pull the namespace from under a running restore: expire the job now and
                // let the watchdog abort it once the restore has finished.
                Some(i) if i.restoring => {
                    i.deadline = Instant::now();
                    i.abort.store(true, std::sync::atomic::Ordering::SeqCst);
                    warn!(%job, reason = why, "abort deferred until the running restore ends");
                    None
                }
                _ => incoming.remove(job),
            }
        };
        if let Some(mut inc) = inc {
            self.release_store(job).await;
            lock(&self.incoming_bases).remove(job);
            warn!(%job, container = %inc.spec.name, reason = why, "aborting incoming migration");
            let hold = inc.hold.take();
            let prestarted = inc.prestarted.take();
            let finishing = inc.finishing.take();
            let name = inc.spec.name.clone();
            let layout = inc.layout.clone();
            let this = (
                self.runc.clone(),
                self.images_dir(job),
                self.work_dir(job),
                self.incoming_record(job),
            );
            let _ = tokio::task::spawn_blocking(move || {
                let (runc, images, work, rec) = this;
                // A runc started ahead ends first (it fails at its closed gate).
                if let Some((_, p)) = prestarted {
                    p.cancel();
                }
                if let Some(f) = finishing {
                    let _ = f.wait();
                }
                // Network first: a restored copy that is killed must not send FIN or RST to
                // peers that now talk to the source again.
                ferry_runtime::netns::delete_netns(&layout);
                runc.delete_force(&name);
                if let Some(h) = hold {
                    let _ = h.discard();
                }
                ferry_runtime::bundle::remove_bundle(&layout);
                let _ = std::fs::remove_dir_all(images);
                let _ = std::fs::remove_dir_all(work);
                let _ = std::fs::remove_file(rec);
            })
            .await;
        }
    }

    pub(crate) async fn abort_incoming_of_conn(&self, conn_id: usize) {
        let jobs: Vec<String> = self
            .incoming
            .lock()
            .await
            .iter()
            // A restored job waits for its commit until its deadline: the source retries the
            // commit on a new connection.
            .filter(|(_, i)| i.conn_id == conn_id && !i.restored)
            .map(|(j, _)| j.clone())
            .collect();
        for j in jobs {
            self.abort_incoming(&j, "connection to the source lost")
                .await;
        }
    }

    /// At start: removes what incoming jobs of a previous run left behind.
    pub(crate) async fn clean_stale_incoming(&self) {
        // A packet hold belongs to an incoming job only: a queue rule left in the namespace of
        // a container this host owns (its releaser died with the previous run) drops packets.
        let owned: Vec<String> = lock(&self.containers)
            .values()
            .map(|c| self.layout(&c.spec.name).netns)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for netns in owned {
                let _ = orchestrator_shim::hold::remove_rule(&netns, 0);
            }
        })
        .await;
        let dir = self.cfg.state_dir.join("incoming");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(rec) = std::fs::read(e.path())
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Record>(&b)?))
            else {
                let _ = std::fs::remove_file(e.path());
                continue;
            };
            if self.was_committed(&rec.job) {
                self.finish_recorded_commit(rec).await;
                continue;
            }
            warn!(job = %rec.job, container = %rec.spec.name, "removing leftovers of an interrupted incoming migration");
            let undo = self.leftovers(&rec.job, self.layout(&rec.spec.name), &rec.spec.name);
            let _ = tokio::task::spawn_blocking(move || undo.remove()).await;
        }
    }

    /// At start: an incoming job that committed before this agent died owns its container;
    /// finishes what the commit had left (the packet hold's rule, the announcement, the
    /// container record).
    async fn finish_recorded_commit(&self, rec: Record) {
        let layout = self.layout(&rec.spec.name);
        let (runc, name) = (self.runc.clone(), rec.spec.name.clone());
        let running = tokio::task::spawn_blocking(move || runc.state(&name))
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.status == "running");
        warn!(job = %rec.job, container = %rec.spec.name, running, "finishing a commit recorded before a restart");
        let (netns, spec) = (layout.netns.clone(), rec.spec.clone());
        let _ = tokio::task::spawn_blocking(move || {
            // The dead agent's hold left its queue rule: without a reader it drops every packet.
            if let Err(e) = orchestrator_shim::hold::remove_rule(&netns, 0) {
                warn!(netns = %netns, error = %e, "removing a packet hold's rule left by a restart");
            }
            announce(&netns, &spec);
        })
        .await;
        self.adopt(&rec.job, &rec.spec);
        let _ = std::fs::remove_dir_all(self.images_dir(&rec.job));
        let _ = std::fs::remove_dir_all(self.work_dir(&rec.job));
    }

    /// A committed incoming job's container is owned here from now on: recorded (its record
    /// keeps its base from gc), the job's own records dropped.
    fn adopt(&self, job: &str, spec: &ContainerSpec) {
        self.adopt_in_memory(job, spec);
        self.adopt_on_disk(job);
    }

    /// [`Self::adopt`]'s part in memory: the container is listed here.
    fn adopt_in_memory(&self, job: &str, spec: &ContainerSpec) {
        lock(&self.containers).insert(
            spec.name.clone(),
            ContainerRecord {
                spec: spec.clone(),
                migrating: false,
            },
        );
        lock(&self.incoming_bases).remove(job);
    }

    /// [`Self::adopt`]'s part on disk: the container list saved, then the job's record dropped.
    fn adopt_on_disk(&self, job: &str) {
        self.save_containers();
        let _ = std::fs::remove_file(self.incoming_record(job));
    }

    fn leftovers(&self, job: &str, layout: Layout, name: &str) -> Leftovers {
        Leftovers {
            runc: self.runc.clone(),
            name: name.to_string(),
            layout,
            dirs: [self.images_dir(job), self.work_dir(job)],
            record: self.incoming_record(job),
        }
    }
}

/// What an incoming job left on this host, to remove (blocking: runc, namespaces, files).
struct Leftovers {
    runc: ferry_runtime::runc::Runc,
    name: String,
    layout: Layout,
    dirs: [std::path::PathBuf; 2],
    record: std::path::PathBuf,
}

impl Leftovers {
    fn remove(self) {
        ferry_runtime::netns::delete_netns(&self.layout);
        self.runc.delete_force(&self.name);
        ferry_runtime::bundle::remove_bundle(&self.layout);
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

pub(crate) fn valid_job(job: &str) -> bool {
    !job.is_empty()
        && job.len() <= 80
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Gratuitous ARP from the container's namespace, in the background.
/// What serves a lazy restore (config `lazy_daemon`).
enum FillDaemon {
    /// The agent's own: CRIU's socket, and the dump's lazy memory per pid.
    Agent(
        std::os::unix::net::UnixListener,
        std::collections::HashMap<u32, Vec<(u64, u64)>>,
    ),
    /// `criu lazy-pages`.
    Criu(super::fill::Daemon),
}

fn announce(netns: &str, spec: &ContainerSpec) {
    let child = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "arping", "-q", "-U", "-c", "1", "-w", "1", "-I", "eth0",
        ])
        .arg(spec.ip.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(mut c) => {
            std::thread::spawn(move || {
                let _ = c.wait();
            });
        }
        Err(e) => warn!(error = %e, "gratuitous ARP not sent: install iputils-arping"),
    }
}

/// Aborts incoming jobs past their deadline.
pub(crate) async fn watchdog(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let now = Instant::now();
        let expired: Vec<(String, bool)> = agent
            .incoming
            .lock()
            .await
            .iter()
            .filter(|(_, i)| i.expired(now))
            .map(|(j, i)| (j.clone(), i.restored))
            .collect();
        for (j, restored) in expired {
            let why = if restored {
                "no commit from the source in time"
            } else {
                "the source went silent"
            };
            agent.abort_incoming(&j, why).await;
        }
    }
}

/// First word of every page of the memory workload (`ferry-workload mem`), as it lies in a
/// CRIU pages image (little-endian).
const WORKLOAD_PAGE_MAGIC: u64 = ferry_workload::mem::MAGIC;

/// Test hook: finds the pages of the memory workload in CRIU's raw page images (every 4 KiB
/// page that starts with the workload's magic word), and flips one byte in the middle one.
/// Returns the file and the byte's offset.
fn damage_workload_page(images: &std::path::Path) -> Result<(std::path::PathBuf, u64)> {
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
    /// The materialized base layer of `img`, whose tree must be in this host's store. Names
    /// the image here too when the name is free, so that `ferry image ls` shows it.
    async fn base_layer(
        &self,
        img: &orchestrator_shim::api::ImageRef,
    ) -> Result<std::path::PathBuf> {
        let store = std::sync::Arc::clone(&self.store);
        let img = img.clone();
        tokio::task::spawn_blocking(move || -> Result<std::path::PathBuf> {
            // Not while gc runs (gc keeps this base: the job registered it at its prepare).
            let _shared = store.import_guard();
            let layer = store.materialize(&img.tree).with_context(|| {
                format!("the base layer of image {:?} (tree {})", img.name, img.tree)
            })?;
            if store.image(&img.name).is_err() {
                store.tag(&img.name, &img.tree, "migration", img.config.clone())?;
            }
            Ok(layer)
        })
        .await?
    }
}
