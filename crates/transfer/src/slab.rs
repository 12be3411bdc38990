//! The memory behind a [`crate::pages::PageStore`]: page-aligned slots in anonymous mappings
//! of [`SLAB_PAGES`] pages, whose memory goes back to the kernel as soon as a slot is
//! released.
//!
//! A store held its pages as 4 KiB heap allocations before. Freed ones stayed in the process's
//! heap, so a destination that filled a container's memory from its store needed the
//! container's memory twice, and every page the kernel gave the container was memory the host
//! had not used yet. On a VM whose free memory goes back to its hypervisor, that first touch
//! is what a fill waits for: copying 4 GiB into fresh memory ran at about 300 MiB/s on the
//! lab's VM, and at about 2 GiB/s when the same amount was released from the store as it went
//! (the kernel hands the just-freed memory out again first). Slots released here are handed
//! back at once (`MADV_DONTNEED`), a run of neighbouring slots in one call.
#![allow(unsafe_code)]

use memmap2::{MmapMut, UncheckedAdvice};

use crate::pages::PAGE;

/// Pages per mapping (2 MiB).
pub(crate) const SLAB_PAGES: u32 = 512;

/// Slots of [`PAGE`] bytes, numbered across mappings.
#[derive(Debug, Default)]
pub(crate) struct Slabs {
    maps: Vec<MmapMut>,
    /// Slots not in use (their memory released), taken last in first out.
    free: Vec<u32>,
}

impl Slabs {
    /// A slot to write a page into; maps another slab when none is free.
    pub(crate) fn alloc(&mut self) -> std::io::Result<u32> {
        if let Some(s) = self.free.pop() {
            return Ok(s);
        }
        let base = self.slots();
        if base.checked_add(SLAB_PAGES).is_none() {
            return Err(std::io::Error::other("more than 2^32 page slots"));
        }
        self.maps
            .push(MmapMut::map_anon(SLAB_PAGES as usize * PAGE)?);
        // Taken from the end: the slab fills from its first slot.
        self.free.extend((base + 1..base + SLAB_PAGES).rev());
        Ok(base)
    }

    fn slots(&self) -> u32 {
        self.maps.len() as u32 * SLAB_PAGES
    }

    fn at(slot: u32) -> (usize, usize) {
        (
            (slot / SLAB_PAGES) as usize,
            (slot % SLAB_PAGES) as usize * PAGE,
        )
    }

    /// The page in `slot`.
    pub(crate) fn page(&self, slot: u32) -> &[u8] {
        let (m, off) = Self::at(slot);
        &self.maps[m][off..off + PAGE]
    }

    /// The page in `slot`, to write.
    pub(crate) fn page_mut(&mut self, slot: u32) -> &mut [u8] {
        let (m, off) = Self::at(slot);
        &mut self.maps[m][off..off + PAGE]
    }

    /// Takes over `other`'s slabs; returns the number its slot 0 has here.
    pub(crate) fn append(&mut self, other: Slabs) -> u32 {
        let base = self.slots();
        self.free.extend(other.free.iter().map(|s| s + base));
        self.maps.extend(other.maps);
        base
    }

    /// Gives the memory of `slots` back to the kernel and makes them free.
    pub(crate) fn release(&mut self, mut slots: Vec<u32>) {
        if slots.is_empty() {
            return;
        }
        slots.sort_unstable();
        slots.dedup();
        let mut i = 0;
        while i < slots.len() {
            let first = slots[i];
            let mut n = 1;
            while i + n < slots.len()
                && slots[i + n] == first + n as u32
                && !(first + n as u32).is_multiple_of(SLAB_PAGES)
            {
                n += 1;
            }
            let (m, off) = Self::at(first);
            // SAFETY: `MADV_DONTNEED` on a private anonymous mapping makes the range read as
            // zeros afterwards; it cannot make memory invalid. No reference into the range is
            // alive: slices handed out by `page`/`page_mut` borrow `self`, which `release`
            // borrows mutably, and the slots are free from here on (their contents unused).
            let advised = unsafe {
                self.maps[m].unchecked_advise_range(UncheckedAdvice::DontNeed, off, n * PAGE)
            };
            if let Err(e) = advised {
                // Only the memory stays: the slots are free either way.
                tracing::warn!(error = %e, pages = n, "page store: releasing memory failed");
            }
            i += n;
        }
        // Freed last, taken first: the lowest slots of the run first.
        self.free.extend(slots.into_iter().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_pages_and_released_ones_read_as_zeros_when_taken_again() {
        let mut s = Slabs::default();
        let slots: Vec<u32> = (0..SLAB_PAGES + 3)
            .map(|_| s.alloc().expect("slot"))
            .collect();
        assert_eq!(slots[..4], [0, 1, 2, 3]);
        assert_eq!(s.maps.len(), 2);
        for &x in &slots {
            s.page_mut(x).fill(x as u8 | 1);
        }
        assert!(s.page(5).iter().all(|b| *b == 5));
        s.release(vec![7, 5, 6, 600]);
        assert!(s.page(4).iter().all(|b| *b == 5), "a neighbour is kept");
        let again = s.alloc().expect("slot");
        assert_eq!(again, 5, "the lowest released slot is taken first");
        assert!(s.page(again).iter().all(|b| *b == 0));
        assert!(s.page(600).iter().all(|b| *b == 0));
    }

    #[test]
    fn appended_slabs_keep_their_pages_under_new_numbers() {
        let mut a = Slabs::default();
        let x = a.alloc().expect("slot");
        a.page_mut(x).fill(1);
        let mut b = Slabs::default();
        let y = b.alloc().expect("slot");
        b.page_mut(y).fill(2);
        let base = a.append(b);
        assert_eq!(base, SLAB_PAGES);
        assert!(a.page(base + y).iter().all(|v| *v == 2));
        assert!(a.page(x).iter().all(|v| *v == 1));
        // Both slabs' free slots are available: no new mapping for the next 2 * 511.
        for _ in 0..2 * (SLAB_PAGES - 1) {
            a.alloc().expect("slot");
        }
        assert_eq!(a.maps.len(), 2);
    }
}
