//! The destination side of a migration: prepare, receive, restore, then commit or abort.
//!
//! Everything an incoming job creates is recorded on disk first, so that an agent restarted after
//! a crash removes it; a job whose source disappears (connection closed) or stays silent past its
//! deadline is aborted here without waiting for anyone.

use crate::proto::{refuse, ErrorCode};
mod restore;
mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_api::ContainerSpec;
use ferry_net::hold::Hold;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{lock, Agent};
use crate::proto::PeerResponse;
use ferry_runtime::layout::Layout;

/// The file of a checkpoint where runc lists the container's stdio (read by its restore).
const DESCRIPTORS: &str = "descriptors.json";
/// runc's `descriptors.json` for a container whose stdio is `/dev/null`, as every container
/// of a Ferry older than the console shims had (a source that does not say).
const STDIO_DESCRIPTORS: &str = r#"["/dev/null","/dev/null","/dev/null"]"#;

/// What a runc restore started ahead reads as `descriptors.json`: what the source said, else
/// what every container of an older Ferry had.
fn expected_descriptors(said: Option<&[String]>) -> Vec<String> {
    match said {
        Some(d) => d.to_vec(),
        None => serde_json::from_str(STDIO_DESCRIPTORS).unwrap_or_default(),
    }
}

/// Whether the images' `descriptors.json` in `images` lists what a runc started ahead read.
fn same_descriptors(images: &std::path::Path, said: Option<&[String]>) -> bool {
    let ours = expected_descriptors(said);
    std::fs::read(images.join(DESCRIPTORS))
        .is_ok_and(|b| serde_json::from_slice::<Vec<String>>(&b).is_ok_and(|d| d == ours))
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
    /// What the source said the container's descriptors 0 to 2 are: the prestarted restore's
    /// `descriptors.json`.
    descriptors: Option<Vec<String>>,
    /// The container's fencing token in etcd, from the source (see `commit_incoming`).
    fence: Option<i64>,
    /// The pipes of the console shim the restored container writes into (the agent's copies
    /// of their writing ends close with the job).
    console: Option<Arc<ferry_runtime::console::Console>>,
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
            return Err(refuse(
                ErrorCode::Unavailable,
                format!("host {} does not run containers", self.cfg.host),
            ));
        }
        let criu = match &self.criu {
            Ok(c) => c.version.to_string(),
            Err(e) => {
                return Err(refuse(
                    ErrorCode::Unavailable,
                    format!("CRIU unusable on {}: {e}", self.cfg.host),
                ))
            }
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
            return Err(refuse(
                ErrorCode::Conflict,
                format!(
                    "a container named {name:?} already exists on {}",
                    self.cfg.host
                ),
            ));
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
            lazy_max_mapping_bytes: (self.criu_patch < 2)
                .then_some(criu_driver::LAZY_MAPPING_LIMIT),
            cpu_flags: Some(
                ferry_runtime::cpu::host_isa_flags(&self.cfg.hide_cpu_flags)
                    .into_iter()
                    .collect(),
            ),
        })
    }

    /// Checks a peer's Prepare request, reserves its name and address, and prepares the
    /// container's arrival (see `prepare_reserved`).
    pub(crate) async fn prepare(
        &self,
        peer: &str,
        req: Prepare,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let (job, spec) = (&req.job, &req.spec);
        if !ferry_api::valid_name(&spec.name) || !valid_job(job) {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("invalid container name {:?} or job id {job:?}", spec.name),
            ));
        }
        // Nothing from a peer is used unchecked: the MAC must be the one derived from the IP,
        // the prefix sensible, the command present.
        if spec.mac != ferry_api::mac_for_ip(spec.ip)
            || !(8..=30).contains(&spec.prefix_len)
            || spec.args.is_empty()
            || spec.args.len() > 256
        {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "refusing container spec for {:?}: ip {} mac {} prefix /{} args {}",
                    spec.name,
                    spec.ip,
                    spec.mac,
                    spec.prefix_len,
                    spec.args.len()
                ),
            ));
        }
        ferry_runtime::process::check_received(spec).map_err(|why| {
            refuse(
                ErrorCode::BadRequest,
                format!("refusing container spec for {:?}: {why}", spec.name),
            )
        })?;
        // The base is named by a tree id that becomes a path under the store: anything but 64
        // hex digits (such as "/" or "../..") is refused before any directory is touched.
        if let Some(img) = &spec.image {
            shared_fs::store::check_id(&img.tree)
                .and_then(|()| shared_fs::store::check_image_name(&img.name))
                .map_err(|e| {
                    refuse(
                        ErrorCode::BadRequest,
                        format!("refusing container spec for {:?}: {e:#}", spec.name),
                    )
                })?;
        }
        // Name and address are checked and reserved in one step against the containers here,
        // the ones being created and the other incoming jobs (the reservation ends below).
        {
            let inc = self.incoming.lock().await;
            let mut creating = lock(&self.creating);
            if inc.contains_key(job) || self.was_committed(job) {
                return Err(refuse(
                    ErrorCode::Conflict,
                    format!("job {job} is already being received or was received"),
                ));
            }
            let taken = lock(&self.containers)
                .values()
                .map(|c| (c.spec.name.clone(), c.spec.ip))
                .chain(creating.iter().cloned())
                .chain(inc.values().map(|i| (i.spec.name.clone(), i.spec.ip)))
                .find(|(n, ip)| *n == spec.name || *ip == spec.ip);
            if let Some((n, ip)) = taken {
                return Err(refuse(ErrorCode::Conflict, format!(
                    "container {:?} ({}) cannot come here: {n:?} with address {ip} exists or is arriving on {}",
                    spec.name,
                    spec.ip,
                    self.cfg.host
                )));
            }
            creating.push((spec.name.clone(), spec.ip));
        }
        if let Some(img) = &spec.image {
            lock(&self.incoming_bases).insert(job.clone(), img.tree.clone());
        }
        let (job, name) = (job.clone(), spec.name.clone());
        let r = self.prepare_reserved(peer, req, recv).await;
        lock(&self.creating).retain(|(n, _)| *n != name);
        if r.is_err() {
            lock(&self.incoming_bases).remove(&job);
        }
        r
    }

    /// Receives the container's own files and readies its bundle, network namespace and
    /// restore, once its name and address are reserved.
    async fn prepare_reserved(
        &self,
        peer: &str,
        req: Prepare,
        recv: &mut super::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        let Prepare {
            conn_id,
            job,
            spec,
            restore_lazily,
            descriptors,
            fence,
        } = req;
        if let Some(why) = self.publish_conflict(&spec.name, &spec.published) {
            return Err(refuse(
                ErrorCode::Conflict,
                format!("cannot take {:?}: {why}", spec.name),
            ));
        }
        if self.cluster().is_some() && fence.is_none() {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "job {job}: this host keeps the cluster's state in etcd and {peer} sent no fencing revision for {:?}: configure {peer}'s agent with etcd too",
                    spec.name
                ),
            ));
        }
        if spec.prefix_len != self.cfg.overlay_prefix_len {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "container {:?} comes with prefix /{}, this overlay is /{}",
                    spec.name, spec.prefix_len, self.cfg.overlay_prefix_len
                ),
            ));
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
            // Output into pipes: the restored container writes into a shim of this host.
            let console = match descriptors
                .as_ref()
                .filter(|d| d.iter().any(|f| f.starts_with("pipe:")))
            {
                Some(_) => Some(Arc::new(self.start_console_fresh(&spec.name).await?)),
                None => None,
            };
            let prestarted = self
                .prestart_restore(
                    &job,
                    &layout,
                    &spec.name,
                    restore_lazily,
                    descriptors.as_deref(),
                    console.clone(),
                )
                .await;
            Ok::<_, anyhow::Error>((stats, hold, prestarted, console))
        }
        .await;
        match r {
            Ok((stats, hold, prestarted, console)) => {
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
                        descriptors,
                        fence,
                        console,
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
    /// the `descriptors.json` the source said it will bring; the restore checks that the
    /// images brought the same. `None` (with a
    /// warning) if it cannot start: the restore then starts runc itself.
    async fn prestart_restore(
        &self,
        job: &str,
        layout: &Layout,
        name: &str,
        lazy: bool,
        descriptors: Option<&[String]>,
        console: Option<Arc<ferry_runtime::console::Console>>,
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
        let expected = serde_json::to_vec(&expected_descriptors(descriptors));
        let r = tokio::task::spawn_blocking(move || {
            let gate = gate?;
            let _ = std::fs::remove_dir_all(&images);
            std::fs::create_dir_all(&images)?;
            std::fs::write(images.join(DESCRIPTORS), expected?)?;
            std::fs::create_dir_all(&work)?;
            let from = ferry_runtime::runc::RestoreFrom {
                bundle: &bundle,
                images: &images,
                work: &work,
                lazy,
                console: console.as_deref(),
            };
            runc.prestart_restore(&name, &from, &gate)
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
}

/// A peer's request to prepare the arrival of a container.
pub(crate) struct Prepare {
    /// The connection it came on (its streams belong to the job).
    pub conn_id: usize,
    pub job: String,
    pub spec: ContainerSpec,
    /// Whether the container's memory is restored lazily (pages fetched on fault).
    pub restore_lazily: bool,
    /// The container's descriptors 0 to 2 as the source reads them (see
    /// [`crate::proto::PeerRequest::Prepare`]).
    pub descriptors: Option<Vec<String>>,
    /// The container's fencing token in etcd (see [`crate::proto::PeerRequest::Prepare`]).
    pub fence: Option<i64>,
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
        let expired: Vec<(String, bool, String, String, Instant)> = agent
            .incoming
            .lock()
            .await
            .iter()
            .filter(|(_, i)| i.expired(now))
            .map(|(j, i)| {
                (
                    j.clone(),
                    i.restored,
                    i.from.clone(),
                    i.spec.name.clone(),
                    i.deadline,
                )
            })
            .collect();
        for (j, restored, from, name, deadline) in expired {
            // With etcd, a restored copy whose ownership moved here (a commit transaction
            // whose answer was lost) is committed, not aborted; while etcd cannot say, it
            // waits up to a minute more.
            if restored && agent.cluster().is_some() {
                match agent.owned_here_by(&name, &j).await {
                    Some(true) => {
                        warn!(job = %j, container = %name, "no commit from the source in time, but etcd says the container is owned here: committing");
                        if let Err(e) = agent.commit_incoming(&from, &j, true).await {
                            warn!(job = %j, error = %format!("{e:#}"), "committing after etcd's answer");
                        }
                        continue;
                    }
                    None if now < deadline + Duration::from_secs(60) => continue,
                    _ => {}
                }
            }
            let why = if restored {
                "no commit from the source in time"
            } else {
                "the source went silent"
            };
            agent.abort_incoming(&j, why).await;
        }
    }
}

impl Agent {
    /// The materialized base layer of `img`, whose tree must be in this host's store. Names
    /// the image here too when the name is free, so that `ferry image ls` shows it.
    async fn base_layer(&self, img: &ferry_api::ImageRef) -> Result<std::path::PathBuf> {
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
