//! Content-addressed page streams: round trips, deduplication, hostile input, parallel QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use transfer::pages::{
    hash_page, recv_pages, send_pages, PageStore, MAX_BATCH, PAGE, SKIP_AFTER_INCOMPRESSIBLE,
};
use transfer::pki::{create_ca, issue_host_cert};
use transfer::{Endpoint, TlsFiles, TransferError};

/// `n` pages of pseudo-random (incompressible) content derived from `seed`.
fn random_pages(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut out = vec![0u8; n * PAGE];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out.chunks(PAGE).map(|c| c.to_vec()).collect()
}

/// `n` compressible pages (a counter in the first word, zeros elsewhere).
fn sparse_pages(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut p = vec![0u8; PAGE];
            p[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            p
        })
        .collect()
}

async fn roundtrip(
    pages: &[Vec<u8>],
    store: &mut PageStore,
) -> Result<Vec<[u8; 32]>, TransferError> {
    let (mut a, mut b) = tokio::io::duplex(1 << 20);
    let pages = pages.to_vec();
    let sender = tokio::spawn(async move { send_pages(&mut a, &pages).await });
    let (hashes, stats) = recv_pages(&mut b, store).await?;
    let sent = sender.await.unwrap()?;
    assert_eq!(sent.pages, stats.pages);
    assert_eq!(sent.wire_bytes, stats.wire_bytes);
    Ok(hashes)
}

#[tokio::test]
async fn pages_arrive_hashed_by_the_receiver_and_deduplicated() {
    let mut pages = sparse_pages(300);
    pages.extend(random_pages(1, 300));
    pages.extend(sparse_pages(10)); // the same content again
    let mut store = PageStore::new(1 << 20);
    let hashes = roundtrip(&pages, &mut store).await.unwrap();
    assert_eq!(hashes.len(), pages.len());
    for (p, h) in pages.iter().zip(&hashes) {
        assert_eq!(*h, hash_page(p));
        assert_eq!(store.get(h).unwrap(), &p[..]);
    }
    assert_eq!(store.len(), 600, "repeated content is stored once");
    // Sending it all again adds nothing.
    roundtrip(&pages, &mut store).await.unwrap();
    assert_eq!(store.len(), 600);
}

#[tokio::test]
async fn compression_is_used_only_where_it_pays() {
    let (mut a, mut b) = tokio::io::duplex(1 << 20);
    // One compressible batch, one random batch, then compressible batches again: the first
    // SKIP_AFTER_INCOMPRESSIBLE of those go raw without a try, the rest compressed.
    let mut pages = sparse_pages(MAX_BATCH);
    pages.extend(random_pages(2, MAX_BATCH));
    let after = SKIP_AFTER_INCOMPRESSIBLE as usize + 2;
    for i in 0..after {
        pages.extend(sparse_pages(MAX_BATCH).into_iter().map(|mut p| {
            p[8] = i as u8 + 1;
            p
        }));
    }
    let to_send = pages.clone();
    let sender = tokio::spawn(async move { send_pages(&mut a, &to_send).await });
    let mut store = PageStore::new(1 << 20);
    let (_, stats) = recv_pages(&mut b, &mut store).await.unwrap();
    let sent = sender.await.unwrap().unwrap();
    assert_eq!(stats.batches, 2 + after as u64);
    assert_eq!(stats.compressed_batches, 1 + 2, "{stats:?}");
    assert_eq!(sent, stats);
    // Compressible pages cost far less than their size on the wire; random ones a bit more.
    let raw = (pages.len() * PAGE) as u64;
    assert!(stats.wire_bytes < raw, "{} vs {raw}", stats.wire_bytes);
}

async fn recv_raw(bytes: Vec<u8>) -> Result<PageStore, TransferError> {
    let (mut a, mut b) = tokio::io::duplex(1 << 22);
    tokio::spawn(async move {
        let _ = a.write_all(&bytes).await;
    });
    let mut store = PageStore::new(1 << 20);
    recv_pages(&mut b, &mut store).await.map(|_| store)
}

fn header(count: u32, encoding: u8, len: u32) -> Vec<u8> {
    let mut v = count.to_be_bytes().to_vec();
    v.push(encoding);
    v.extend_from_slice(&len.to_be_bytes());
    v
}

#[tokio::test]
async fn hostile_streams_are_refused_before_anything_is_stored() {
    // Too many pages in a batch.
    let e = recv_raw(header(MAX_BATCH as u32 + 1, 0, 0))
        .await
        .unwrap_err();
    assert!(matches!(e, TransferError::TooLarge { .. }), "{e}");
    // A raw batch whose length does not match its page count.
    let e = recv_raw(header(2, 0, 4096)).await.unwrap_err();
    assert!(matches!(e, TransferError::Protocol { .. }), "{e}");
    // An unknown encoding.
    let e = recv_raw(header(1, 9, 4096)).await.unwrap_err();
    assert!(e.to_string().contains("encoding 9"), "{e}");
    // A compressed payload larger than any batch can compress to.
    let e = recv_raw(header(1, 1, 64 << 20)).await.unwrap_err();
    assert!(matches!(e, TransferError::TooLarge { .. }), "{e}");
    // A zstd bomb: announces one page, decompresses to 2 MiB.
    let bomb = zstd::bulk::compress(&vec![0u8; 2 << 20], 1).unwrap();
    let mut s = header(1, 1, bomb.len() as u32);
    s.extend_from_slice(&bomb);
    let e = recv_raw(s).await.unwrap_err();
    assert!(matches!(e, TransferError::Decode { .. }), "{e}");
    // A stream cut in the middle of a batch.
    let mut s = header(1, 0, 4096);
    s.extend_from_slice(&[7u8; 100]);
    let e = recv_raw(s).await.unwrap_err();
    assert!(e.to_string().contains("stream"), "{e}");
    // More distinct pages than the store may hold.
    let (mut a, mut b) = tokio::io::duplex(1 << 20);
    let pages = random_pages(3, 11);
    tokio::spawn(async move { send_pages(&mut a, &pages).await });
    let mut store = PageStore::new(10);
    let e = recv_pages(&mut b, &mut store).await.unwrap_err();
    assert!(matches!(e, TransferError::TooLarge { .. }), "{e}");
    assert_eq!(store.len(), 10);
}

#[tokio::test]
async fn a_page_of_the_wrong_size_is_refused_at_both_ends() {
    let (mut a, _b) = tokio::io::duplex(1 << 20);
    let e = send_pages(&mut a, [vec![0u8; 100]]).await.unwrap_err();
    assert!(e.to_string().contains("100 bytes"), "{e}");
    let mut store = PageStore::new(4);
    assert!(store.insert(&[0u8; 4095]).is_err());
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    certs: std::path::PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let certs = dir.path().join("certs");
    create_ca(&ca, "ferry test").unwrap();
    for h in ["src", "dst"] {
        issue_host_cert(&ca, h, &certs).unwrap();
    }
    Pki {
        _dir: dir,
        ca,
        certs,
    }
}

/// Sends `pages` from one endpoint to another over `streams` parallel QUIC streams; returns
/// the destination's store and the time taken.
async fn over_quic(pages: Arc<Vec<Vec<u8>>>, streams: usize) -> (PageStore, f64) {
    let p = pki();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let dst = Endpoint::bind(lo, &TlsFiles::for_host(&p.ca, &p.certs, "dst")).unwrap();
    let src = Endpoint::bind(lo, &TlsFiles::for_host(&p.ca, &p.certs, "src")).unwrap();
    let addr = dst.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let conn = dst.accept().await.unwrap().unwrap();
        let mut tasks = vec![];
        for _ in 0..streams {
            let (_s, mut r) = conn.accept_stream().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut store = PageStore::new(1 << 22);
                recv_pages(&mut r, &mut store).await.unwrap();
                store
            }));
        }
        let mut all = PageStore::new(1 << 22);
        for t in tasks {
            let s = t.await.unwrap();
            for h in s.hashes() {
                all.insert(s.get(&h).unwrap()).unwrap();
            }
        }
        all
    });
    let conn = src.connect(addr, "dst").await.unwrap();
    let t = Instant::now();
    let mut tasks = vec![];
    for i in 0..streams {
        let (mut s, _r) = conn.open().await.unwrap();
        let pages = Arc::clone(&pages);
        tasks.push(tokio::spawn(async move {
            let mine = pages.iter().skip(i).step_by(streams);
            send_pages(&mut s, mine).await.unwrap();
            s.finish().unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let store = receiver.await.unwrap();
    (store, t.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cross_parallel_quic_streams_intact() {
    let pages = Arc::new(random_pages(4, 2000));
    let (store, _) = over_quic(Arc::clone(&pages), 4).await;
    assert_eq!(store.len(), 2000);
    for p in pages.iter() {
        assert_eq!(store.get(&hash_page(p)).unwrap(), &p[..]);
    }
}

/// Throughput of 256 MiB of random pages over loopback QUIC, 1 and 4 streams.
/// `cargo test --release -p transfer --test pages -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn measure_page_throughput() {
    let pages = Arc::new(random_pages(5, 65536));
    for streams in [1, 4, 1, 4] {
        let (store, secs) = over_quic(Arc::clone(&pages), streams).await;
        assert_eq!(store.len(), 65536);
        println!(
            "{streams} stream(s): 256 MiB in {:.3} s = {:.0} MB/s",
            secs,
            256.0 * 1.048576 / secs
        );
    }
}

#[test]
fn a_store_keeps_every_page_through_absorbs_removals_and_reuse_of_its_memory() {
    let a_pages = random_pages(7, 1500);
    let mut store = PageStore::new(10_000);
    let a: Vec<[u8; 32]> = a_pages.iter().map(|p| store.insert(p).unwrap()).collect();
    // Another store (a round's stream) shares a third of its pages with this one.
    let mut other = PageStore::new(10_000);
    let b_pages: Vec<Vec<u8>> = a_pages[..500]
        .iter()
        .cloned()
        .chain(random_pages(8, 700))
        .collect();
    let b: Vec<[u8; 32]> = b_pages.iter().map(|p| other.insert(p).unwrap()).collect();
    store.absorb(other).unwrap();
    assert_eq!(store.len(), 2200);
    // Forgetting pages gives their memory back and leaves the others intact.
    assert_eq!(store.remove(&a[100..1200]), 1100);
    assert_eq!(store.remove(&a[100..200]), 0, "already forgotten");
    for (p, h) in a_pages.iter().zip(&a) {
        match store.get(h) {
            Some(got) => assert_eq!(got, &p[..]),
            None => assert!(a[100..1200].contains(h)),
        }
    }
    for (p, h) in b_pages.iter().zip(&b) {
        if !a[100..1200].contains(h) {
            assert_eq!(store.get(h).unwrap(), &p[..]);
        }
    }
    // Freed memory is reused for new pages, which read back as written.
    let c_pages = random_pages(9, 1200);
    let c: Vec<[u8; 32]> = c_pages.iter().map(|p| store.insert(p).unwrap()).collect();
    for (p, h) in c_pages.iter().zip(&c) {
        assert_eq!(store.get(h).unwrap(), &p[..]);
    }
    let keep: std::collections::HashSet<[u8; 32]> = c[..10].iter().copied().collect();
    store.retain(&keep);
    assert_eq!(store.len(), 10);
    assert_eq!(store.get(&c[3]).unwrap(), &c_pages[3][..]);
}
