//! Reading a tracked process's pages: what a pre-copy round sends.

mod common;

use common::Testee;
use memtrack::{read_memory, writable_regions, PAGE_SIZE};

#[test]
fn written_pages_read_back_and_writable_regions_cover_them() {
    let mut t = Testee::spawn(64, false);
    let v = t.write(&[3, 40]);
    let regions = writable_regions(t.pid()).unwrap();
    let end = t.base + 64 * PAGE_SIZE;
    assert!(
        regions.iter().any(|r| r.start <= t.base && end <= r.end),
        "the test region is a private writable mapping: {regions:?}"
    );
    let mut buf = vec![0u8; 64 * PAGE_SIZE as usize];
    let n = read_memory(t.pid(), t.base, &mut buf).unwrap();
    assert_eq!(n, buf.len());
    let page = |i: usize| &buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
    assert_eq!(page(3)[0], v);
    assert_eq!(page(40)[0], v);
    assert_eq!(
        page(4)[0],
        t.read(4),
        "an untouched page reads as the process sees it"
    );

    // Unaligned requests are refused; an unmapped address reads nothing.
    assert!(read_memory(t.pid(), t.base + 1, &mut buf[..4096]).is_err());
    assert!(read_memory(t.pid(), t.base, &mut buf[..100]).is_err());
    assert_eq!(read_memory(t.pid(), 4096, &mut buf[..4096]).unwrap(), 0);
    t.quit();
}

#[test]
fn a_process_that_is_gone_is_reported_as_gone() {
    let mut t = Testee::spawn(4, false);
    let pid = t.pid();
    t.kill_and_reap();
    let mut buf = vec![0u8; 4096];
    let e = read_memory(pid, 0x10000, &mut buf).unwrap_err();
    assert!(e.is_process_gone(), "{e}");
    assert!(writable_regions(pid).unwrap_err().is_process_gone());
}
