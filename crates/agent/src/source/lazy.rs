//! The source's side of a lazy restore: the lazy dump (pages left in the frozen copy, their
//! locations sent), the frozen copy verified, and the wait for the destination's fill.

use crate::lazy::hash_frozen_copy;
use crate::lazy::hide_one_page;
use crate::lazy::read_frozen;
use crate::lazy::request_with_locations;
use crate::lazy::send_location_list;
use crate::lazy::LazyRegion;
use crate::lazy::Placement;
use crate::lazy::Tail;
use crate::lazy::CHUNK_PAGES;
use crate::lazy::STACK_REREAD_BYTES;
use crate::lock;
use crate::proto::{PeerRequest, PeerResponse};
use anyhow::{bail, Context, Result};
use memtrack::Region;
use std::collections::HashMap;
use transfer::lists::Location;
use transfer::pages::{PageHash, PAGE};

/// How long the source keeps its frozen copy for a destination that has not finished filling.
pub(super) const FILL_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

impl super::Driver {
    /// Pre-copy's final dump for a lazy restore: freezes, sends the last written pages with
    /// their locations while CRIU dumps without lazy memory, then sends any lazy page the
    /// destination has no location for. The container stays in place, frozen, until the fill
    /// ends at the destination.
    pub(crate) async fn dump_lazy(&mut self) -> Result<u64> {
        let job = self.job.id.clone();
        let sock = self.agent.run_socket(&job, "ps")?;
        let pre = self
            .dump_ahead_or_prestart(Some((sock.clone(), true)))
            .await;
        let t0 = std::time::Instant::now();
        // A throttled container must reach the freezer at once.
        self.rounds.lift_throttle();
        let (host, name) = (self.agent.cfg.host.clone(), self.spec.name.clone());
        let layout = self.agent.layout(&name);
        let runc_root = self.agent.runc.root().to_path_buf();
        let (h, n) = (host.clone(), name.clone());
        let root_start = self.root_diff_beside_dump();
        let dump_conf = self.dump_conf();
        tokio::task::spawn_blocking(move || -> Result<()> {
            ferry_runtime::freeze::freeze_for_dump(&h, &n, &layout, &runc_root, &dump_conf())?;
            root_start.start();
            Ok(())
        })
        .await??;
        self.source_link_down = true;
        let freeze_ms = ferry_runtime::util::ms(t0.elapsed());
        // The last writes, and every process gets its container pid. The trackers stay: the
        // processes hold no userfaultfd of theirs (the agent does), write protection is
        // asynchronous (no write waits for the agent), and removing it walks every page table
        // entry (about 30 ms per GiB), which the rollback or the end of the job does instead,
        // outside the freeze.
        let mut rounds = std::mem::replace(&mut self.rounds, crate::rounds::Rounds::new());
        let (h, n) = (host.clone(), name.clone());
        let (rounds, collected) = tokio::task::spawn_blocking(move || {
            let collected = rounds.collect_final();
            let r = (|| -> Result<u64> {
                let dirty = collected?;
                if let Some(p) = &rounds.placement {
                    for pid in ferry_runtime::cgroup_tree::container_pids(&h, &n)? {
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
        match self.lazy_dump_and_send(&placement, &sock, pre).await {
            Ok((bytes, extra, eager, lazy, round_trips, reread)) => {
                self.lazy_dumped = true;
                self.frozen_round_trips += round_trips;
                self.memory = Some(migrate_core::MemoryReport {
                    restore: "lazy".into(),
                    frozen_round_trips: round_trips,
                    final_dirty_pages: dirty,
                    eager_pages: eager,
                    lazy_pages: lazy,
                    unplaced_pages: extra,
                    reread_pages: reread,
                    hidden_pages: self.hidden_pages,
                    remote_pages: self.remote_pages,
                    ..Default::default()
                });
                tracing::info!(%job, freeze_ms, dirty_pages = dirty, unplaced_pages = extra,
                    eager_pages = eager, lazy_pages = lazy, bytes,
                    ms = ferry_runtime::util::ms(t0.elapsed()), "lazy dump done");
                Ok(bytes)
            }
            Err(e) => {
                self.resume_source();
                Err(e)
            }
        }
    }

    /// The part of [`Self::dump_lazy`] after the freeze: returns (bytes sent, pages sent for
    /// lack of a location, eager pages, lazy pages, round trips to the destination, pages the
    /// dump itself changed).
    pub(crate) async fn lazy_dump_and_send(
        &mut self,
        placement: &std::sync::Arc<Placement>,
        sock: &std::path::Path,
        pre: Option<crate::source::DumpAhead>,
    ) -> Result<(u64, u64, u64, u64, u32, u64)> {
        let job = self.job.id.clone();
        let sock = sock.to_path_buf();
        let (pre, early) = match pre {
            Some((p, l)) => (Some(p), l),
            None => (None, None),
        };
        let listener = crate::source::criu_listener(&sock, early)?;
        let bound = self.dump_bound();
        let runc = self.agent.runc.bounded(bound.clone());
        let name = self.spec.name.clone();
        let (images, work) = (self.agent.images_dir(&job), self.agent.work_dir(&job));
        let (logs, job_id) = (self.agent.cfg.state_dir.join("logs"), job.clone());
        let (im, s) = (images.clone(), sock.clone());
        let mut ckpt = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let r = match pre {
                Some(p) => p.go(bound),
                None => {
                    let _ = std::fs::remove_dir_all(&im);
                    std::fs::create_dir_all(&im)?;
                    std::fs::create_dir_all(&work)?;
                    runc.checkpoint_relayed(&name, &im, &work, &s, true)
                }
            };
            tracing::info!(container = %name, checkpoint_ms = ferry_runtime::util::ms(t.elapsed()), "dumped lazily");
            ferry_runtime::logs::keep_log_soon(
                r.is_ok(),
                work.join("dump.log"),
                logs,
                format!("{job_id}.dump.log"),
            );
            r
        });
        let conn = self.conn().await?;
        let mut chunks = self.rounds.take_todo_chunks();
        // The last writes are checked first after the commit.
        self.hot_chunks = chunks.clone();
        if self.faults.hide_dirty_page {
            self.hidden_pages = hide_one_page(&mut chunks, placement);
        }
        let accept = async {
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
            let (criu_r, mut criu_w) = criu.into_split();
            criu_driver::page_server::write_message_async(
                &mut criu_w,
                &criu_driver::page_server::Message::Close,
            )
            .await
            .context("closing CRIU's lazy page server")?;
            anyhow::Ok((criu_r, criu_w))
        };
        // The last writes go while CRIU dumps (it connects to the page server only once it
        // has collected the memory maps): the container is frozen, so they cannot change, and
        // what CRIU's own run changes is read again after it (`reread`).
        let (accepted, sent) = if self.post_copy {
            // Post-copy: the last writes stay at the source; the destination fetches them.
            self.remote_pages += self.mark_remote(&conn, &chunks, placement)?;
            (accept.await, Ok((0, 0)))
        } else {
            tokio::join!(accept, self.send_chunks(&conn, chunks, placement))
        };
        // The write half stays open until CRIU has answered.
        let (mut criu_r, _criu_w) = accepted?;
        // The close's answer says the images are complete; CRIU may also answer and exit
        // before it is read: the answer then waits in the socket.
        let close = criu_driver::page_server::Message::Close;
        let mut dumped = None;
        let answer = tokio::select! {
            biased;
            r = criu_driver::page_server::read_reply_async(&mut criu_r, &close) => r,
            r = &mut ckpt => {
                dumped = Some(r.map_err(anyhow::Error::from).and_then(|r| r));
                match tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    criu_driver::page_server::read_reply_async(&mut criu_r, &close),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(criu_driver::page_server::ProtocolError::NoReply {
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
        let (bytes, round_trips) = sent?;
        // Lazy pages the destination has no location for go now.
        let p = std::sync::Arc::clone(placement);
        let (missing, eager, lazy, regions, reread) = tokio::task::spawn_blocking(move || -> Result<_> {
            let maps = criu_driver::image::read_pagemaps(&images)?;
            let (mut missing, mut eager, mut lazy) = (vec![], 0u64, 0u64);
            let mut regions = vec![];
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
                    let region = Region { start: e.vaddr, end: e.end() };
                    regions.push(LazyRegion { host, vpid, region });
                    for r in p.unplaced(host, region) {
                        let mut a = r.start;
                        while a < r.end {
                            let n = ((r.end - a) / PAGE as u64).min(CHUNK_PAGES);
                            missing.push((host, a, n));
                            a += n * PAGE as u64;
                        }
                    }
                }
            }
            // The tracking ended before CRIU ran, but the kernel writes some memory while
            // CRIU dumps: each thread's rseq area (whenever the thread returns to user space,
            // CRIU's parasite included) and the frame above its stack pointer (an interrupted
            // system call writes its results there). Those pages are read again.
            let owners = p.thread_owners();
            let mut reread = 0u64;
            for t in criu_driver::image::read_thread_cores(&images)? {
                let mut spans = vec![];
                if let Some((pointer, size)) = t.rseq {
                    spans.push((pointer, pointer + u64::from(size)));
                }
                if let Some(sp) = t.sp {
                    spans.push((sp, sp.saturating_add(STACK_REREAD_BYTES)));
                }
                if spans.is_empty() {
                    // A zombie: no memory, no registers.
                    continue;
                }
                let Some(host) = owners.get(&t.tid).copied() else {
                    // Not findable now (it has no /proc entry left): the integrity check
                    // compares its pages like any other.
                    tracing::warn!(tid = t.tid, "a thread of the dump has no host pid; its pages the dump changed are not read again");
                    continue;
                };
                for (start, end) in spans {
                    let mut at = start & !(PAGE as u64 - 1);
                    while at < end {
                        let lazy_here = regions
                            .iter()
                            .any(|r| r.host == host && r.region.start <= at && at < r.region.end);
                        let queued = missing
                            .iter()
                            .any(|&(h, s, n)| h == host && s <= at && at < s + n * PAGE as u64);
                        if lazy_here && !queued {
                            missing.push((host, at, 1));
                            reread += 1;
                        }
                        at += PAGE as u64;
                    }
                }
            }
            Ok((missing, eager, lazy, regions, reread))
        })
        .await??;
        self.lazy_regions = regions;
        let extra: u64 = missing.iter().map(|c| c.2).sum::<u64>() - reread;
        // The destination may ask this copy for its lazy pages from now on (post-copy, or a
        // page it cannot find).
        self.agent
            .keep_frozen_copy(&self.job.id, &self.to, &self.lazy_regions);
        if self.post_copy {
            // The pages the dump changed (the last `reread` entries, one page each) supersede
            // what the destination holds; the others were never placed there. It fetches
            // both from here.
            let mut missing = missing;
            let changed = missing.split_off(missing.len() - reread as usize);
            self.remote_pages += missing.iter().map(|c| c.2).sum::<u64>();
            self.remote_pages += self.mark_remote(&conn, &changed, placement)?;
        } else if !missing.is_empty() {
            // With their locations in one request, while the images go.
            self.send_placed_chunks(&conn, missing, placement);
        }
        Ok((bytes, extra, eager, lazy, round_trips, reread))
    }

    /// Post-copy: tells the destination, without waiting for the answer, that the pages of
    /// `chunks` are to be fetched from here ([`crate::fill::REMOTE`] locations that
    /// supersede what it holds); returns their number.
    pub(crate) fn mark_remote(
        &mut self,
        conn: &transfer::Connection,
        chunks: &[(i32, u64, u64)],
        placement: &Placement,
    ) -> Result<u64> {
        // The sets collected at the last round's end and at the freeze overlap.
        let mut by_pid: HashMap<i32, Vec<Region>> = HashMap::new();
        for &(pid, addr, n) in chunks {
            by_pid.entry(pid).or_default().push(Region {
                start: addr,
                end: addr + n * PAGE as u64,
            });
        }
        let mut locations = Vec::with_capacity(chunks.len());
        let mut regions = Vec::with_capacity(chunks.len());
        let mut pages = 0;
        for (pid, rs) in by_pid {
            let vpid = placement.vpid(pid).with_context(|| {
                format!("process {pid} has no container pid (it started after the freeze?)")
            })?;
            for r in memtrack::normalize_regions(rs) {
                let n = (r.end - r.start) / PAGE as u64;
                locations.push(Location {
                    pid: vpid,
                    vaddr: r.start,
                    seq: placement.next_seq(),
                    hashes: vec![crate::fill::REMOTE; n as usize],
                });
                regions.push((pid, r));
                pages += n;
            }
        }
        placement.placed(regions);
        let (job, conn) = (self.job.id.clone(), conn.clone());
        self.pending.push(tokio::spawn(async move {
            send_location_list(job, &conn, locations).await
        }));
        Ok(pages)
    }

    /// Reads and sends `chunks` (host pid, address, pages) of the frozen container, then
    /// sends their locations without waiting for the answer (the restore waits for it, see
    /// [`Self::await_pending`]); returns the bytes and the round trips it took.
    pub(crate) async fn send_chunks(
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
        let (job, conn) = (self.job.id.clone(), conn.clone());
        let locations = placement.take_placed()?;
        self.pending.push(tokio::spawn(async move {
            send_location_list(job, &conn, locations).await
        }));
        Ok((sent.bytes, streams))
    }

    /// Reads `chunks` of the frozen container and sends them with their locations in one
    /// request, without waiting for the answer (the restore waits for it).
    pub(crate) fn send_placed_chunks(
        &mut self,
        conn: &transfer::Connection,
        chunks: Vec<(i32, u64, u64)>,
        placement: &std::sync::Arc<Placement>,
    ) {
        let (job, conn, p) = (
            self.job.id.clone(),
            conn.clone(),
            std::sync::Arc::clone(placement),
        );
        let known = std::sync::Arc::clone(&self.rounds.known);
        self.pending.push(tokio::spawn(async move {
            let p2 = std::sync::Arc::clone(&p);
            let (locations, pages, regions) = tokio::task::spawn_blocking(move || -> Result<_> {
                let (mut locations, mut pages, mut regions) = (vec![], vec![], vec![]);
                let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
                for (pid, addr, n) in chunks {
                    let len = n as usize * PAGE;
                    let seq = p2.next_seq();
                    read_frozen(pid, addr, &mut buf[..len])?;
                    let vpid = p2.vpid(pid).with_context(|| {
                        format!(
                            "pages of process {pid} were read before its container pid was known"
                        )
                    })?;
                    let hashes: Vec<PageHash> = buf[..len]
                        .chunks_exact(PAGE)
                        .map(transfer::pages::hash_page)
                        .collect();
                    {
                        let mut k = lock(&known);
                        for (page, h) in buf[..len].chunks_exact(PAGE).zip(&hashes) {
                            if k.insert(*h) {
                                pages.extend_from_slice(page);
                            }
                        }
                    }
                    regions.push((
                        pid,
                        Region {
                            start: addr,
                            end: addr + len as u64,
                        },
                    ));
                    locations.push(Location {
                        pid: vpid,
                        vaddr: addr,
                        seq,
                        hashes,
                    });
                }
                Ok((locations, pages, regions))
            })
            .await??;
            p.placed(regions);
            let req = PeerRequest::PageMap {
                job,
                count: locations.len() as u64,
                with_pages: true,
            };
            let (answer, bytes) =
                request_with_locations(&conn, &req, &locations, Tail::Stream(&pages)).await?;
            if !matches!(answer, PeerResponse::Ok { .. }) {
                bail!("unexpected answer to placed pages: {answer:?}");
            }
            Ok(bytes)
        }));
    }

    /// Waits for the requests sent without waiting (page locations, the last pages); returns
    /// the bytes they carried.
    pub(crate) async fn await_pending(&mut self) -> Result<u64> {
        let mut bytes = 0;
        for h in std::mem::take(&mut self.pending) {
            bytes += h.await.context("a page request of the final dump")??;
        }
        Ok(bytes)
    }

    /// The integrity check (see `fill`): hashes the frozen copy's lazy pages while the
    /// destination fills them in, has the destination compare, and sends the contents of
    /// every mismatched page it has not given to the container yet.
    pub(crate) async fn verify_frozen_copy(&mut self) -> migrate_core::IntegrityReport {
        let mut report = migrate_core::IntegrityReport::default();
        let regions = std::sync::Arc::new(std::mem::take(&mut self.lazy_regions));
        let t = std::time::Instant::now();
        if let Err(e) = self.verify_batches(&regions, &mut report).await {
            tracing::warn!(job = %self.job.id, error = %format!("{e:#}"), "integrity check incomplete");
            report.incomplete = Some(format!("{e:#}"));
        }
        tracing::info!(job = %self.job.id, pages_checked = report.pages_checked, mismatches = report.mismatches,
            corrected = report.corrected, ms = ferry_runtime::util::ms(t.elapsed()), "integrity check done");
        report
    }

    pub(crate) async fn verify_batches(
        &mut self,
        regions: &std::sync::Arc<Vec<LazyRegion>>,
        report: &mut migrate_core::IntegrityReport,
    ) -> Result<()> {
        let conn = self.conn().await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let r = std::sync::Arc::clone(regions);
        let hot = std::mem::take(&mut self.hot_chunks);
        let hasher = tokio::task::spawn_blocking(move || {
            if let Err(e) = hash_frozen_copy(&r, &hot, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        // Only pages of the lazy memory it was asked about may be asked for.
        let mut hosts: HashMap<u32, (i32, Vec<Region>)> = HashMap::new();
        for r in regions.iter() {
            let e = hosts.entry(r.vpid).or_insert((r.host, vec![]));
            e.1.push(r.region);
        }
        let hosts = std::sync::Arc::new(hosts);
        while let Some(batch) = rx.recv().await {
            let batch = batch?;
            let req = PeerRequest::VerifyPages {
                job: self.job.id.clone(),
                count: batch.len() as u64,
                done: false,
            };
            let (checked, correct, stale) =
                match request_with_locations(&conn, &req, &batch, Tail::None)
                    .await?
                    .0
                {
                    PeerResponse::Verified {
                        checked,
                        correct,
                        stale,
                    } => (checked, correct, stale),
                    other => bail!("unexpected answer to an integrity check: {other:?}"),
                };
            report.pages_checked += checked;
            report.mismatches += correct.len() as u64 + stale;
            if correct.is_empty() {
                continue;
            }
            if correct.len() as u64 > crate::proto::MAX_VERIFY_PAGES {
                bail!("{} pages to correct from one batch", correct.len());
            }
            let hosts = std::sync::Arc::clone(&hosts);
            let (locations, pages) = tokio::task::spawn_blocking(move || -> Result<_> {
                let mut pages = vec![0u8; correct.len() * PAGE];
                let mut locations = Vec::with_capacity(correct.len());
                for ((vpid, addr), page) in correct.iter().zip(pages.chunks_exact_mut(PAGE)) {
                    let host = hosts
                        .get(vpid)
                        .filter(|(_, rs)| rs.iter().any(|r| r.start <= *addr && *addr < r.end))
                        .map(|(h, _)| *h)
                        .with_context(|| format!("the destination asks for page {addr:#x} of pid {vpid}, which is not lazy memory of the container"))?;
                    read_frozen(host, *addr, page)?;
                    locations.push(Location {
                        pid: *vpid,
                        vaddr: *addr,
                        seq: 0,
                        hashes: vec![transfer::pages::hash_page(page)],
                    });
                }
                Ok((locations, pages))
            })
            .await??;
            let req = PeerRequest::CorrectPages {
                job: self.job.id.clone(),
                count: locations.len() as u64,
            };
            match request_with_locations(&conn, &req, &locations, Tail::Raw(&pages))
                .await?
                .0
            {
                PeerResponse::Corrected { corrected, .. } => report.corrected += corrected,
                other => bail!("unexpected answer to page corrections: {other:?}"),
            }
        }
        hasher.await?;
        let done = PeerRequest::VerifyPages {
            job: self.job.id.clone(),
            count: 0,
            done: true,
        };
        request_with_locations(&conn, &done, &[], Tail::None).await?;
        Ok(())
    }

    /// Waits until the destination says the lazy restore has all its memory. If it failed
    /// (the daemon or the destination's agent died, a page was missing), the destination has
    /// stopped and removed its copy, whose memory was incomplete: the container resumes here
    /// from the frozen copy, as it was at the freeze, and the error says so.
    pub(crate) async fn wait_for_fill(&mut self) -> Result<()> {
        let job = self.job.id.clone();
        let mut integrity = self.verify_frozen_copy().await;
        let req = PeerRequest::FillWait { job: job.clone() };
        // Only the destination's word decides: while it cannot be reached, it may be filling
        // in fine, and two copies must never run.
        let until = std::time::Instant::now() + FILL_WAIT;
        let mut wait = std::time::Duration::from_millis(100);
        let answer = loop {
            let r = async {
                let conn = self.conn().await?;
                crate::peer::request(&conn, &req, &[]).await
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
                    integrity: theirs,
                    fetched_pages,
                    fetched_on_fault,
                },
                _,
            )) => {
                tracing::info!(%job, pages, requests, fill_ms, "destination filled in the container's memory; the frozen copy goes");
                // The destination alone knows which pages the container had used.
                if let Some(t) = theirs {
                    integrity = migrate_core::IntegrityReport {
                        incomplete: integrity.incomplete.take(),
                        ..t
                    };
                }
                if let Some(m) = &mut self.memory {
                    m.fill_pages = Some(pages);
                    m.fill_ms = Some(fill_ms as f64);
                    m.fill_mib_s =
                        Some(pages as f64 * 4096.0 / 1048576.0 / (fill_ms.max(1) as f64 / 1000.0));
                    m.integrity = Some(integrity);
                    if fetched_pages > 0 || m.remote_pages > 0 {
                        m.fetched_pages = Some(fetched_pages);
                        m.fetched_on_fault = Some(fetched_on_fault);
                    }
                }
                self.agent.forget_frozen_copy(&job);
                return Ok(());
            }
            Ok((PeerResponse::Error { message, .. }, _)) => message,
            Ok((other, _)) => format!("unexpected answer about the fill: {other:?}"),
            Err(e) => {
                // Unknown: the copy there may run; this one must not. It is removed.
                let why = format!(
                    "no answer about the fill from {} within {} s: {e:#}",
                    self.to,
                    FILL_WAIT.as_secs()
                );
                self.agent.forget_frozen_copy(&job);
                tracing::error!(%job, error = %why, "the fill's outcome is unknown: the frozen copy is removed");
                if let Some(m) = &mut self.memory {
                    m.fill_error = Some(why.clone());
                }
                bail!("{why}");
            }
        };
        self.agent.forget_frozen_copy(&job);
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

    /// Removes the dirty-page trackers that a lazy dump left in place, on a blocking thread.
    pub(crate) async fn stop_tracking_off_the_freeze(&mut self) {
        let trackers = self.rounds.take_trackers();
        if trackers.is_empty() {
            return;
        }
        let job = self.job.id.clone();
        let t = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || crate::rounds::stop_trackers(trackers)).await {
            Ok(Ok(())) => {
                tracing::debug!(%job, ms = ferry_runtime::util::ms(t.elapsed()), "dirty-page trackers removed")
            }
            Ok(Err(e)) => {
                tracing::warn!(%job, error = %format!("{e:#}"), "removing the dirty-page trackers")
            }
            Err(e) => tracing::warn!(%job, error = %e, "removing the dirty-page trackers"),
        }
    }

    /// After a failed fill: points the overlay back here, and lets the frozen copy run on.
    pub(crate) async fn resume_frozen_copy(&mut self) -> Result<()> {
        // The destination removed its copy (and its routes) before it answered.
        let routed = self
            .agent
            .route_back_here(&self.spec.name, &self.spec.mac, None)
            .await;
        self.resume_source();
        self.stop_tracking_off_the_freeze().await;
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
