//! The page bookkeeping of a first pre-copy round that follows the container's writes.
//!
//! The first round must send every page once. A page the container writes after it was sent
//! crosses again, so the order matters: a page sent right after the container wrote it is
//! not written again for a while by a container that sweeps its memory. [`FirstPass`] keeps
//! one state per page and hands out batches: first the pages just written (in the order they
//! were written), then, when the policy does not hold them back
//! ([`migrate_core::hold_unwritten`]), pages not written yet, in address order.
//!
//! Page states and what a write does to them:
//!
//! | state | meaning | on a write |
//! |---|---|---|
//! | unsent | neither written nor sent | queued (a first write) |
//! | queued | written, waiting to be sent | stays queued (sent with its latest content) |
//! | sent-unwritten | sent before any write | requeued |
//! | requeued | sent, then written, waiting to be sent again | stays requeued |
//! | sent-written | sent after a write | dirty |
//! | dirty | written again after it was sent | stays dirty |
//!
//! Handing out a page marks it sent before it is read, so a write after that point is always
//! seen by a later collect. The round is done when every page was sent once: requeued pages
//! still waiting then are for the next round. Dirty pages (written repeatedly: hot) and memory outside the areas
//! the round started with wait for the next round.

use std::collections::VecDeque;

use memtrack::Region;
use transfer::pages::PAGE;

use super::rounds::Todo;

/// Page ranges to read and send: (pid, address, pages).
pub(crate) type Batch = Vec<(i32, u64, u64)>;

const UNSENT: u8 = 0;
const QUEUED: u8 = 1;
const SENT_UNWRITTEN: u8 = 2;
const SENT_WRITTEN: u8 = 3;
const DIRTY: u8 = 4;
const REQUEUED: u8 = 5;

/// One contiguous range of one process, a state per page.
struct Area {
    pid: i32,
    start: u64,
    state: Vec<u8>,
}

impl Area {
    fn end(&self) -> u64 {
        self.start + self.state.len() as u64 * PAGE as u64
    }
}

/// See the module documentation.
pub(crate) struct FirstPass {
    /// Sorted by (pid, start), not overlapping.
    areas: Vec<Area>,
    /// Written pages waiting to be sent: (area, page index).
    queue: VecDeque<(usize, usize)>,
    /// Where the search for unsent pages goes on: (area, page index).
    cursor: (usize, usize),
    unsent: u64,
    /// Pages in the queue that were never sent.
    queued_unsent: u64,
    total: u64,
    first_writes: u64,
    /// Written memory outside the areas: for the next round.
    outside: Vec<(i32, Region)>,
}

impl FirstPass {
    /// Bookkeeping for copying `todo` (page-aligned ranges).
    pub(crate) fn new(todo: &Todo) -> FirstPass {
        let mut areas: Vec<Area> = todo
            .iter()
            .flat_map(|(pid, regions)| {
                regions.iter().filter(|r| r.end > r.start).map(|r| Area {
                    pid: *pid,
                    start: r.start,
                    state: vec![UNSENT; ((r.end - r.start) / PAGE as u64) as usize],
                })
            })
            .collect();
        areas.sort_by_key(|a| (a.pid, a.start));
        // Overlapping ranges (a process listed twice) would count pages twice: drop overlaps.
        let mut kept: Vec<Area> = Vec::with_capacity(areas.len());
        for a in areas {
            match kept.last() {
                Some(k) if k.pid == a.pid && k.end() > a.start => {}
                _ => kept.push(a),
            }
        }
        let total = kept.iter().map(|a| a.state.len() as u64).sum();
        FirstPass {
            areas: kept,
            queue: VecDeque::new(),
            cursor: (0, 0),
            unsent: total,
            queued_unsent: 0,
            total,
            first_writes: 0,
            outside: vec![],
        }
    }

    /// Pages the round covers.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Pages neither written nor sent.
    pub(crate) fn unsent(&self) -> u64 {
        self.unsent
    }

    /// Writes so far to pages that were neither written nor sent.
    pub(crate) fn first_writes(&self) -> u64 {
        self.first_writes
    }

    /// Every page was handed out at least once.
    pub(crate) fn done(&self) -> bool {
        self.unsent == 0 && self.queued_unsent == 0
    }

    fn area_of(&self, pid: i32, addr: u64) -> Option<usize> {
        let i = self
            .areas
            .partition_point(|a| (a.pid, a.start) <= (pid, addr));
        let a = self.areas.get(i.checked_sub(1)?)?;
        (a.pid == pid && addr < a.end()).then_some(i - 1)
    }

    /// Records what a collect found written in process `pid`. While the round runs
    /// (`following`), written pages are queued per the table in the module doc; after it
    /// (the round's last collect) every written page is for the next round.
    pub(crate) fn written(&mut self, pid: i32, ranges: &[Region], following: bool) {
        for r in ranges {
            let mut addr = r.start - r.start % PAGE as u64;
            while addr < r.end {
                let Some(ai) = self.area_of(pid, addr) else {
                    // Outside every area: up to the next area (or the range's end).
                    let next = self
                        .areas
                        .iter()
                        .find(|a| a.pid == pid && a.start > addr)
                        .map_or(r.end, |a| a.start.min(r.end));
                    self.outside.push((
                        pid,
                        Region {
                            start: addr,
                            end: next,
                        },
                    ));
                    addr = next;
                    continue;
                };
                let area = &mut self.areas[ai];
                let first = ((addr - area.start) / PAGE as u64) as usize;
                let last = (((r.end.min(area.end()) - area.start).div_ceil(PAGE as u64)) as usize)
                    .min(area.state.len());
                for p in first..last {
                    let s = &mut area.state[p];
                    *s = match (*s, following) {
                        (UNSENT, true) => {
                            self.unsent -= 1;
                            self.queued_unsent += 1;
                            self.first_writes += 1;
                            self.queue.push_back((ai, p));
                            QUEUED
                        }
                        (SENT_UNWRITTEN, true) => {
                            self.queue.push_back((ai, p));
                            REQUEUED
                        }
                        (QUEUED | REQUEUED, true) => *s,
                        (UNSENT, false) => {
                            self.unsent -= 1;
                            DIRTY
                        }
                        (QUEUED | REQUEUED, false) => *s,
                        _ => DIRTY,
                    };
                }
                addr = area.start + last as u64 * PAGE as u64;
            }
        }
    }

    /// Up to `max` written pages, oldest write first; they count as sent.
    pub(crate) fn next_written(&mut self, max: u64) -> Option<Batch> {
        let mut batch: Batch = vec![];
        let mut n = 0;
        while n < max {
            let Some((ai, p)) = self.queue.pop_front() else {
                break;
            };
            let area = &mut self.areas[ai];
            if area.state[p] == QUEUED {
                self.queued_unsent -= 1;
            }
            area.state[p] = SENT_WRITTEN;
            push_page(&mut batch, area.pid, area.start + p as u64 * PAGE as u64);
            n += 1;
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Up to `max` pages neither written nor sent, in address order; they count as sent.
    pub(crate) fn next_unwritten(&mut self, max: u64) -> Option<Batch> {
        let mut batch: Batch = vec![];
        let mut n = 0;
        while n < max && self.unsent > 0 {
            let (ai, p) = self.cursor;
            let Some(area) = self.areas.get_mut(ai) else {
                break;
            };
            if p >= area.state.len() {
                self.cursor = (ai + 1, 0);
                continue;
            }
            if area.state[p] == UNSENT {
                area.state[p] = SENT_UNWRITTEN;
                self.unsent -= 1;
                push_page(&mut batch, area.pid, area.start + p as u64 * PAGE as u64);
                n += 1;
            }
            self.cursor = (ai, p + 1);
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// What the next round copies: pages written again after they were sent, anything not
    /// sent, and written memory outside the areas. Returns the ranges and their page count.
    pub(crate) fn into_next_round(self) -> (Todo, u64) {
        let mut todo: Todo = vec![];
        let mut pages = 0u64;
        let mut add = |todo: &mut Todo, pid: i32, r: Region| {
            pages += r.pages();
            match todo.last_mut() {
                Some((p, regions)) if *p == pid => match regions.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => regions.push(r),
                },
                _ => todo.push((pid, vec![r])),
            }
        };
        for a in &self.areas {
            let mut p = 0;
            while p < a.state.len() {
                if matches!(a.state[p], SENT_UNWRITTEN | SENT_WRITTEN) {
                    p += 1;
                    continue;
                }
                let from = p;
                while p < a.state.len() && !matches!(a.state[p], SENT_UNWRITTEN | SENT_WRITTEN) {
                    p += 1;
                }
                let start = a.start + from as u64 * PAGE as u64;
                let end = a.start + p as u64 * PAGE as u64;
                add(&mut todo, a.pid, Region { start, end });
            }
        }
        for (pid, r) in self.outside {
            add(&mut todo, pid, r);
        }
        (todo, pages)
    }
}

/// Appends one page to `batch`, extending the last range when it is adjacent.
fn push_page(batch: &mut Batch, pid: i32, addr: u64) {
    match batch.last_mut() {
        Some((p, a, n)) if *p == pid && *a + *n * PAGE as u64 == addr => *n += 1,
        _ => batch.push((pid, addr, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE as u64;

    fn pages(from: u64, to: u64) -> Region {
        Region {
            start: from * P,
            end: to * P,
        }
    }

    fn one(pid: i32, from: u64, to: u64) -> Todo {
        vec![(pid, vec![pages(from, to)])]
    }

    #[test]
    fn unwritten_pages_go_in_address_order_and_once() {
        let mut f = FirstPass::new(&vec![(7, vec![pages(0, 3), pages(10, 12)])]);
        assert_eq!((f.total(), f.unsent()), (5, 5));
        assert_eq!(f.next_unwritten(4), Some(vec![(7, 0, 3), (7, 10 * P, 1)]));
        assert_eq!(f.next_unwritten(4), Some(vec![(7, 11 * P, 1)]));
        assert_eq!(f.next_unwritten(4), None);
        assert!(f.done());
        let (todo, n) = f.into_next_round();
        assert_eq!(
            (todo, n),
            (vec![], 0),
            "everything was sent, nothing written"
        );
    }

    #[test]
    fn written_pages_go_first_in_write_order_and_count_as_first_writes() {
        let mut f = FirstPass::new(&one(7, 0, 100));
        f.written(7, &[pages(50, 52)], true);
        f.written(7, &[pages(3, 4)], true);
        assert_eq!((f.unsent(), f.first_writes()), (97, 3));
        assert_eq!(f.next_written(2), Some(vec![(7, 50 * P, 2)]));
        assert_eq!(f.next_written(2), Some(vec![(7, 3 * P, 1)]));
        assert_eq!(f.next_written(2), None);
        // The sweep skips what was sent.
        let mut swept = 0;
        while let Some(b) = f.next_unwritten(64) {
            assert!(b
                .iter()
                .all(|&(_, a, n)| a + n * P <= 50 * P || a >= 52 * P));
            swept += b.iter().map(|r| r.2).sum::<u64>();
        }
        assert_eq!(swept, 97);
        assert!(f.done());
    }

    #[test]
    fn a_page_written_again_after_its_send_waits_for_the_next_round() {
        let mut f = FirstPass::new(&one(7, 0, 10));
        f.written(7, &[pages(2, 3)], true);
        // Written again before it was sent: still sent once, with its latest content.
        f.written(7, &[pages(2, 3)], true);
        assert_eq!(f.next_written(10), Some(vec![(7, 2 * P, 1)]));
        // Written after its send: hot, for the next round.
        f.written(7, &[pages(2, 3)], true);
        assert_eq!(f.next_written(10), None);
        // Sent before any write, then written: sent again, right after the write.
        assert_eq!(f.next_unwritten(1), Some(vec![(7, 0, 1)]));
        f.written(7, &[pages(0, 1)], true);
        assert_eq!(
            f.first_writes(),
            1,
            "a sent page's write is not a first write"
        );
        assert_eq!(f.next_written(10), Some(vec![(7, 0, 1)]));
        while f.next_unwritten(10).is_some() {}
        assert!(f.done());
        // The round's last collect: every written page is for the next round.
        f.written(7, &[pages(5, 7)], false);
        let (todo, n) = f.into_next_round();
        assert_eq!(todo, vec![(7, vec![pages(2, 3), pages(5, 7)])]);
        assert_eq!(n, 3);
    }

    #[test]
    fn writes_outside_the_areas_and_across_processes_are_kept_apart() {
        let mut f = FirstPass::new(&vec![(7, vec![pages(10, 20)]), (8, vec![pages(10, 20)])]);
        // Spans the gap before pid 7's area and its first two pages.
        f.written(7, &[pages(8, 12)], true);
        assert_eq!(f.first_writes(), 2);
        assert_eq!(f.next_written(10), Some(vec![(7, 10 * P, 2)]));
        // pid 9 is unknown: all outside.
        f.written(9, &[pages(10, 11)], true);
        // pid 8's pages are separate from pid 7's.
        f.written(8, &[pages(19, 25)], true);
        assert_eq!(f.next_written(10), Some(vec![(8, 19 * P, 1)]));
        while f.next_unwritten(100).is_some() {}
        let (todo, n) = f.into_next_round();
        assert_eq!(
            todo,
            vec![
                (7, vec![pages(8, 10)]),
                (9, vec![pages(10, 11)]),
                (8, vec![pages(20, 25)])
            ]
        );
        assert_eq!(n, 2 + 1 + 5);
    }

    #[test]
    fn the_round_is_done_once_every_page_went_even_with_resends_waiting() {
        let mut f = FirstPass::new(&one(7, 0, 4));
        assert_eq!(f.next_unwritten(4), Some(vec![(7, 0, 4)]));
        assert!(f.done());
        // Written after its send: requeued, but the round does not wait for it.
        f.written(7, &[pages(1, 2)], true);
        assert!(f.done());
        let (todo, n) = f.into_next_round();
        assert_eq!((todo, n), (vec![(7, vec![pages(1, 2)])], 1));
        // A page never sent keeps the round going until it goes.
        let mut f = FirstPass::new(&one(7, 0, 4));
        assert_eq!(f.next_unwritten(3), Some(vec![(7, 0, 3)]));
        f.written(7, &[pages(3, 4)], true);
        assert!(!f.done());
        assert_eq!(f.next_written(4), Some(vec![(7, 3 * P, 1)]));
        assert!(f.done());
    }

    #[test]
    fn an_unfinished_round_leaves_everything_unsent_to_the_next() {
        let mut f = FirstPass::new(&one(7, 0, 8));
        f.written(7, &[pages(1, 2)], true);
        assert_eq!(f.next_unwritten(3), Some(vec![(7, 0, 1), (7, 2 * P, 2)]));
        let (todo, n) = f.into_next_round();
        // Page 1 is queued, pages 4..8 unsent.
        assert_eq!(todo, vec![(7, vec![pages(1, 2), pages(4, 8)])]);
        assert_eq!(n, 5);
    }
}
