use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn loc(pid: u32, vaddr: u64, seq: u64, fill: &[u8]) -> Location {
    Location {
        pid,
        vaddr,
        seq,
        hashes: fill.iter().map(|b| [*b; 32]).collect(),
    }
}

#[test]
fn the_integrity_check_holds_unserved_mismatches_and_counts_served_ones() {
    let mut index = PageIndex::default();
    place(&mut index, vec![loc(1, 0x0, 1, &[1, 2, 3])]);
    let pages = FillPages::new(index, true);
    let rt = runtime();
    // The daemon has the first page already.
    assert_eq!(
        rt.block_on(pages.take(1, 0x0, 1, false)),
        Take::Local(vec![[1; 32]], vec![[1; 32]])
    );
    // The frozen copy differs at the first and the third page.
    let v = pages.verify(&[loc(1, 0x0, 0, &[9, 2, 7])], false);
    assert_eq!(v.checked, 3);
    assert_eq!(v.stale, 1, "the first page was served before the check");
    assert_eq!(v.correct, vec![(1, 0x2000)]);
    // A page never placed here is fetched from the source's frozen copy: no mismatch.
    let v = pages.verify(&[loc(1, 0x5000, 0, &[4])], false);
    assert!(v.correct.is_empty() && v.stale == 0, "{v:?}");
    // The held page is not served until its correction arrives.
    let waiting = pages.take(1, 0x1000, 2, false);
    let corrected = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        pages.correct(&[((1, 0x2000), [7; 32]), ((1, 0x9000), [5; 32])])
    };
    let (served, (fixed, late)) = rt.block_on(async { tokio::join!(waiting, corrected) });
    assert_eq!(
        served,
        Take::Local(vec![[2; 32], [7; 32]], vec![[2; 32], [7; 32]]),
        "served the corrected page"
    );
    assert_eq!(
        (fixed, late),
        (1, 1),
        "a page that was not held is not corrected"
    );
    let i = pages.integrity();
    assert_eq!((i.pages_checked, i.mismatches, i.corrected), (4, 2, 1));
}

#[test]
fn the_background_fill_takes_only_pages_the_integrity_check_reached() {
    let mut index = PageIndex::default();
    place(&mut index, vec![loc(1, 0x0, 1, &[1, 2, 3, 4])]);
    let pages = FillPages::new(index, true);
    let rt = runtime();
    // Nothing checked yet: a fault is answered at once, with its own page only.
    assert_eq!(
        rt.block_on(pages.take(1, 0x0, 4, true)),
        Take::Local(vec![[1; 32]], vec![[1; 32]])
    );
    // The background fill waits for the check to reach its first page.
    let waiting = pages.take(1, 0x1000, 3, false);
    let checked = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        pages.verify(&[loc(1, 0x1000, 0, &[2, 3])], false);
        tokio::time::Instant::now()
    };
    let t = tokio::time::Instant::now();
    let (got, at) = rt.block_on(async { tokio::join!(waiting, checked) });
    assert_eq!(
        got,
        Take::Local(vec![[2; 32], [3; 32]], vec![[2; 32], [3; 32]])
    );
    assert!(at - t >= Duration::from_millis(50) && t.elapsed() < VERIFY_STALL);
    // Once the check is done, everything goes.
    pages.verify(&[], true);
    assert_eq!(
        rt.block_on(pages.take(1, 0x3000, 1, false)),
        Take::Local(vec![[4; 32]], vec![[4; 32]])
    );
    // Without a check, nothing waits for one.
    let mut index = PageIndex::default();
    place(&mut index, vec![loc(1, 0x0, 1, &[1, 2])]);
    let unchecked = FillPages::new(index, false);
    assert_eq!(
        rt.block_on(unchecked.take(1, 0x0, 2, false)),
        Take::Local(vec![[1; 32], [2; 32]], vec![[1; 32], [2; 32]])
    );
}

#[test]
fn remote_and_unplaced_pages_are_fetched_and_then_served_as_fetched() {
    let mut index = PageIndex::default();
    place(&mut index, vec![loc(1, 0x0, 1, &[1, 2])]);
    // The second page was rewritten after it was placed: post-copy marks it remote.
    place(
        &mut index,
        vec![Location {
            pid: 1,
            vaddr: 0x1000,
            seq: 2,
            hashes: vec![REMOTE],
        }],
    );
    let pages = FillPages::new(index, false);
    let rt = runtime();
    assert_eq!(
        rt.block_on(pages.take(1, 0x0, 4, false)),
        Take::Local(vec![[1; 32]], vec![[1; 32]])
    );
    // 0x1000 is remote, 0x2000 and 0x3000 were never placed: one fetch of three.
    assert_eq!(
        rt.block_on(pages.take(1, 0x1000, 3, false)),
        Take::Remote { serve: 3, fetch: 3 }
    );
    pages.fetched(1, 0x1000, &[[7; 32], [8; 32], [9; 32]], 3, false);
    pages.fetch_ended(1, 0x1000, 3);
    assert_eq!(
        rt.block_on(pages.take(1, 0x2000, 2, false)),
        Take::Local(vec![[8; 32], [9; 32]], vec![]),
        "fetched pages were served already"
    );
    assert_eq!(
        rt.block_on(pages.take(1, 0x2000, 1, false)),
        Take::Local(vec![[8; 32]], vec![])
    );
    assert_eq!(pages.fetch_counts(), (3, 0));
    // Within the dump's lazy memory, a background request reads ahead; a fault does not.
    pages.set_lazy_memory(&[(
        1,
        vec![criu_driver::image::PagemapEntry {
            vaddr: 0x0,
            nr_pages: 100,
            flags: 2, // PE_LAZY
        }],
    )]);
    assert_eq!(
        rt.block_on(pages.take(1, 0x4000, 2, false)),
        Take::Remote {
            serve: 2,
            fetch: 96
        }
    );
    // While that fetch runs, a request after its first page gets the pages after it.
    assert_eq!(
        rt.block_on(pages.take(1, 0x64000, 2, false)),
        Take::Remote { serve: 2, fetch: 2 }
    );
    // It failed: the pages are fetched again, and a fault asks for no more than its own.
    pages.fetch_ended(1, 0x4000, 96);
    assert_eq!(
        rt.block_on(pages.take(1, 0x4000, 2, true)),
        Take::Remote { serve: 2, fetch: 2 }
    );
    // The integrity check compares what was fetched, and leaves pages not fetched yet.
    let v = pages.verify(&[loc(1, 0x1000, 0, &[7, 8]), loc(1, 0x9000, 0, &[5])], true);
    assert_eq!((v.checked, v.correct.len(), v.stale), (3, 0, 0));
}

#[test]
fn the_latest_read_of_a_page_wins_whatever_the_arrival_order() {
    let mut index = PageIndex::default();
    // Read at 5 (contents 2, 2) arrives after a read at 7 (contents 3) of the second page.
    place(&mut index, vec![loc(1, 0x1000, 7, &[3])]);
    place(&mut index, vec![loc(1, 0x0, 5, &[2, 2])]);
    assert_eq!(index.get(&(1, 0x0)), Some(([2; 32], 5)));
    assert_eq!(
        index.get(&(1, 0x1000)),
        Some(([3; 32], 7)),
        "an older read does not replace a newer"
    );
    // A later read replaces; another process's page at the same address is another page.
    place(&mut index, vec![loc(1, 0x0, 9, &[4]), loc(2, 0x0, 1, &[8])]);
    assert_eq!(index.get(&(1, 0x0)), Some(([4; 32], 9)));
    assert_eq!(index.get(&(2, 0x0)), Some(([8; 32], 1)));
    assert_eq!(index.len(), 3);
}

#[test]
fn a_content_is_done_when_every_page_that_has_it_was_served() {
    let mut index = PageIndex::default();
    // Pages 0x0 and 0x2000 have one content; 0x1000 is rewritten (a later read) to it too.
    place(&mut index, vec![loc(1, 0x0, 1, &[5, 6, 5])]);
    place(&mut index, vec![loc(1, 0x1000, 2, &[5])]);
    // A post-copy mark does not count as a content.
    place(&mut index, vec![loc(2, 0x0, 1, &[0])]);
    let pages = FillPages::new(index, false);
    let rt = runtime();
    assert_eq!(
        rt.block_on(pages.take(1, 0x0, 2, false)),
        Take::Local(vec![[5; 32], [5; 32]], vec![]),
        "0x2000 still needs the content; 6 was replaced before it was served"
    );
    assert_eq!(
        rt.block_on(pages.take(1, 0x2000, 1, false)),
        Take::Local(vec![[5; 32]], vec![[5; 32]])
    );
    // Served again (a forked child reads by its parent's pid): no second last use.
    assert_eq!(
        rt.block_on(pages.take(1, 0x0, 1, false)),
        Take::Local(vec![[5; 32]], vec![])
    );
}
