//! Following a container's first writes to pages not yet sent, while a pre-copy round runs.

use crate::firstpass::{Batch, FirstPass};
use crate::rounds::Followed;
use crate::rounds::LinkRate;
use crate::rounds::Meter;
use crate::rounds::Rounds;
use crate::rounds::CHUNK_PAGES;
use crate::rounds::TICK;
use anyhow::{bail, Result};
use migrate_core::{hold_unwritten, FirstRoundView};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::info;
use transfer::pages::PAGE;

/// Rate of first writes over the last second.
#[derive(Default)]
pub(super) struct FirstWrites {
    history: VecDeque<(Instant, u64)>,
}

impl FirstWrites {
    fn add(&mut self, now: Instant, total: u64) -> f64 {
        self.history.push_back((now, total));
        while self.history.len() > 2
            && now.duration_since(self.history[1].0) >= Duration::from_secs(1)
        {
            self.history.pop_front();
        }
        let (t, n) = self.history[0];
        let secs = now.duration_since(t).as_secs_f64();
        if secs > 0.0 {
            (total - n) as f64 / secs
        } else {
            0.0
        }
    }
}

/// Pages handed out for sending but not yet on the network are sent in vain if the container
/// writes them first: before unwritten pages are handed out, at most this much (or two
/// congestion windows) may wait in QUIC's buffers.
pub(super) const MAX_QUEUED_BYTES: u64 = 8 << 20;

/// Runs a first round that follows writes: every [`TICK`], collects what the container wrote,
/// hands the written pages to the readers, then (unless the policy holds them back) pages not
/// written yet, until the tick ends or the link is busy enough. The policy decides once the
/// link is measured; once it releases the unwritten pages, they are not held again. Returns
/// when every page was handed out; the caller's last collect then finds what is for the next
/// round.
pub(super) fn follow_writes(
    rounds: &mut Rounds,
    pass: &mut FirstPass,
    work: crossbeam_channel::Sender<Batch>,
    meter: &Meter,
    quic: &quinn::Connection,
    cancel: &std::sync::atomic::AtomicBool,
    job: &str,
) -> Result<Followed> {
    let t0 = Instant::now();
    let udp0 = quic.stats().udp_tx.bytes;
    let mut out = Followed::default();
    let mut link = LinkRate::default();
    let mut first = FirstWrites::default();
    first.add(t0, 0);
    let mut pending: Option<Batch> = None;
    let mut was_busy = false;
    let mut holding = false;
    let mut released = false;
    loop {
        if cancel.load(Ordering::SeqCst) {
            bail!("cancelled during pre-copy round 1");
        }
        let tick = Instant::now();
        rounds.collect_into(pass, true)?;
        let now = Instant::now();
        let first_writes_pages_s = first.add(now, pass.first_writes());
        let view = FirstRoundView {
            first_writes_pages_s,
            unwritten_pages: pass.unsent(),
            total_pages: pass.total(),
            link_pages_s: link.get().map(|l| l.0),
            elapsed: now.duration_since(t0),
        };
        // Once it sends unwritten pages after the link was measured, the round keeps doing
        // so: holding them back now and then would cost both the resends and the time.
        let hold = !released && hold_unwritten(&view);
        if view.link_pages_s.is_some() && !hold {
            released = true;
        }
        if hold != holding {
            info!(%job, holding = hold, first_writes_pages_s = first_writes_pages_s as u64,
                link_pages_s = ?view.link_pages_s.map(|l| l as u64), unwritten = pass.unsent(),
                "pre-copy round 1: {}", if hold { "following the container's writes" } else { "sending unwritten pages too" });
            holding = hold;
        }
        if pending.is_none() && pass.done() {
            break;
        }
        let deadline = tick + TICK;
        let (pages0, udp_tick0) = (
            meter.pages.load(Ordering::Relaxed),
            quic.stats().udp_tx.bytes,
        );
        let mut busy = false;
        loop {
            let batch = match pending.take() {
                Some(b) => b,
                None => match pass.next_written(CHUNK_PAGES) {
                    Some(b) => b,
                    None if hold => break,
                    None => {
                        let stats = quic.stats();
                        let on_network = stats.udp_tx.bytes - udp0;
                        let queued = meter
                            .wire
                            .load(Ordering::Relaxed)
                            .saturating_sub(on_network);
                        if queued >= MAX_QUEUED_BYTES.max(2 * stats.path.cwnd) {
                            busy = true;
                            if Instant::now() + Duration::from_millis(2) >= deadline {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        match pass.next_unwritten(CHUNK_PAGES) {
                            Some(b) => b,
                            None => break,
                        }
                    }
                },
            };
            match work.send_deadline(batch, deadline) {
                Ok(()) => {}
                Err(crossbeam_channel::SendTimeoutError::Timeout(b)) => {
                    pending = Some(b);
                    busy = true;
                    break;
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                    bail!("the page streams ended during pre-copy round 1")
                }
            }
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        let secs = tick.elapsed().as_secs_f64();
        let (pages, udp) = (
            meter.pages.load(Ordering::Relaxed) - pages0,
            quic.stats().udp_tx.bytes - udp_tick0,
        );
        if busy && was_busy && secs > 0.0 {
            // Pages the link carries: its bytes at the round's bytes per page so far (pages
            // the destination holds cost nothing, compressed ones less).
            let (read, written) = (
                meter.pages.load(Ordering::Relaxed),
                meter.wire.load(Ordering::Relaxed),
            );
            let per_page = if read > 0 && written > 0 {
                written as f64 / read as f64
            } else {
                PAGE as f64
            };
            link.add((udp as f64 / per_page) as u64, udp, secs);
        }
        tracing::debug!(%job, busy, hold, secs, first_writes_pages_s = first_writes_pages_s as u64,
            pages, udp, unwritten = pass.unsent(), "pre-copy round 1 tick");
        was_busy = busy;
        if hold {
            out.waited += tick.elapsed();
        }
    }
    out.link_bytes_s = link.get().map(|l| l.1 as u64);
    Ok(out)
}
