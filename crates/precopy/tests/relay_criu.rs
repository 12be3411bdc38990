//! The relay against real CRIU: `criu dump --page-server` into [`relay_out`], across a link
//! made of two in-memory pipes (standing in for a QUIC stream pair) into [`relay_in`], into a
//! real `criu page-server`; then `criu restore` of the images and the testee's memory check.
//!
//! Needs root, CRIU >= 4.2 and the testee binary of criu-driver, built first with
//! `cargo build --release -p criu-driver` (found next to this test's directory, as
//! `target/<profile>/criu-driver-testee`, or at `$FERRY_CRIU_SYS_TESTEE`). Without them the tests
//! fail and say why. They print their figures with `--nocapture`.

#[allow(dead_code)] // `page_is_intact` and `page_identity` are for the testee.
#[path = "../../criu-driver/src/bin/criu-driver-testee/pattern.rs"]
mod pattern;

use std::collections::HashSet;
use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use criu_testkit::{
    restore_and_check, serial, start_page_server, start_testee, Lab, HEAP_BYTES, HEAP_MIB,
    HEAP_PAGES, MEMFD_PAGES, STEP,
};
use precopy::relay::{relay_in, relay_out, Close, FastHashes, RelayStats};
use transfer::pages::{hash_page, PageHash, PageStore};

use pattern::{fill_page, HEAP_MAGIC, MEMFD_MAGIC, PAGE};

fn pattern_pages(magic: u64, pages: u64) -> impl Iterator<Item = Vec<u8>> {
    (0..pages).map(move |i| {
        let mut page = vec![0u8; PAGE];
        fill_page(magic, i, &mut page);
        page
    })
}

/// What one relayed dump produced.
struct Relayed {
    out: RelayStats,
    inn: RelayStats,
    known: HashSet<PageHash>,
    store: PageStore,
    dump_took: Duration,
}

/// Dumps a fresh testee through relay_out -> link -> relay_in -> `criu page-server`.
fn dump_through_relay(lab: &Lab, known: HashSet<PageHash>, store: PageStore) -> Relayed {
    let (mut page_server, ps_port) = start_page_server(lab);
    let mut testee = start_testee(lab);
    let pid = testee.pid();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let relays = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let work = async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let (from_criu, _) = listener
                    .accept()
                    .await
                    .map_err(|e| format!("accept: {e}"))?;
                let to_ps = tokio::net::TcpStream::connect(("127.0.0.1", ps_port))
                    .await
                    .map_err(|e| format!("connecting to the page server: {e}"))?;
                // The link: one pipe per direction (as a QUIC stream pair would be).
                let (fwd_src, fwd_dst) = tokio::io::duplex(1 << 20);
                let (back_dst, back_src) = tokio::io::duplex(1 << 16);
                let (_, fwd_tx) = tokio::io::split(fwd_src);
                let (fwd_rx, _) = tokio::io::split(fwd_dst);
                let (_, back_tx) = tokio::io::split(back_dst);
                let (back_rx, _) = tokio::io::split(back_src);
                let mut known = known;
                let mut store = store;
                let src = tokio::spawn(async move {
                    let fast = FastHashes::default();
                    let r = match relay_out(
                        from_criu,
                        fwd_tx,
                        back_rx,
                        &mut known,
                        &fast,
                        Close::RoundTrip,
                    )
                    .await
                    {
                        Ok((mut stats, pending)) => {
                            pending.confirm(&mut stats).await.map(|()| stats)
                        }
                        Err(e) => Err(e),
                    };
                    (r, known)
                });
                let dst = tokio::spawn(async move {
                    let r = relay_in(fwd_rx, back_tx, to_ps, &mut store).await;
                    (r, store)
                });
                let (out, known) = src.await.map_err(|e| format!("relay_out panicked: {e}"))?;
                let (inn, store) = dst.await.map_err(|e| format!("relay_in panicked: {e}"))?;
                let out = out.map_err(|e| format!("relay_out failed: {e}"))?;
                let inn = inn.map_err(|e| format!("relay_in failed: {e}"))?;
                Ok::<_, String>((out, inn, known, store))
            };
            tokio::time::timeout(2 * STEP, work)
                .await
                .map_err(|_| "the relay did not finish in time".to_string())?
        })
    });

    let pid_arg = pid.to_string();
    let port_arg = port.to_string();
    let args = [
        "dump",
        "-t",
        &pid_arg,
        "-D",
        lab.images.to_str().unwrap(),
        "--page-server",
        "--address",
        "127.0.0.1",
        "--port",
        &port_arg,
    ];
    let dump_took = lab.run_criu(&args, "dump.log");
    // CRIU killed the testee; reap it so that its pid is free for the restore.
    let status = testee.wait(STEP);
    assert!(!status.success(), "the dump should have killed the testee");
    let (out, inn, known, store) = relays
        .join()
        .expect("relay thread panicked")
        .unwrap_or_else(|e| panic!("{e}"));
    let ps_status = page_server.wait(STEP);
    assert!(
        ps_status.success(),
        "criu page-server failed ({ps_status}):\n{}",
        lab.log_tail("page-server.log")
    );
    assert_eq!(out.close_status, Some(0));
    assert_eq!(inn.close_status, Some(0));
    assert_eq!(
        (out.messages, out.pages, out.pages_as_reference),
        (inn.messages, inn.pages, inn.pages_as_reference),
        "both ends agree"
    );
    assert_eq!(out.link_bytes_written, inn.link_bytes_read);
    assert_eq!(inn.link_bytes_written, out.link_bytes_read);
    Relayed {
        out,
        inn,
        known,
        store,
        dump_took,
    }
}

fn report(what: &str, r: &Relayed, restore_took: Duration, result: &str) {
    eprintln!(
        "{what}: dump {:.0} ms (relay active {:.0} ms); {} messages, {} pages, {} as references; \
         link {} bytes forward ({:.2} % of the {HEAP_MIB} MiB heap), {} bytes back; \
         restore {:.0} ms; testee: {}",
        r.dump_took.as_secs_f64() * 1e3,
        r.out.elapsed.as_secs_f64() * 1e3,
        r.out.messages,
        r.out.pages,
        r.out.pages_as_reference,
        r.out.link_bytes_written,
        r.out.link_bytes_written as f64 * 100.0 / HEAP_BYTES as f64,
        r.inn.link_bytes_written,
        restore_took.as_secs_f64() * 1e3,
        result.trim()
    );
}

#[test]
fn relay_with_nothing_known_sends_contents_and_restores_intact_memory() {
    let _serial = serial();
    let lab = Lab::new("precopy-relay-cold");
    let r = dump_through_relay(&lab, HashSet::new(), PageStore::new(1 << 20));
    let (code, result, restore_took) = restore_and_check(&lab);
    report("relay, nothing known", &r, restore_took, &result);
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");

    assert!(
        r.out.pages >= HEAP_PAGES + MEMFD_PAGES,
        "{} pages relayed",
        r.out.pages
    );
    // Nothing was known: only pages repeated within the dump itself may be references.
    assert!(
        r.out.pages_as_reference < r.out.pages / 100,
        "{} of {} pages as references",
        r.out.pages_as_reference,
        r.out.pages
    );
    assert!(r.out.link_bytes_written >= HEAP_BYTES + MEMFD_PAGES * PAGE as u64);
    // Both sides now know every page of the testee.
    for page in pattern_pages(HEAP_MAGIC, HEAP_PAGES).chain(pattern_pages(MEMFD_MAGIC, MEMFD_PAGES))
    {
        let h = hash_page(&page);
        assert!(r.known.contains(&h), "source does not know a testee page");
        assert!(
            r.store.contains(&h),
            "destination does not hold a testee page"
        );
    }
}

#[test]
fn relay_after_a_precopy_round_sends_references_and_restores_intact_memory() {
    let _serial = serial();
    let lab = Lab::new("precopy-relay-warm");
    // What a pre-copy round would have left: the destination holds the testee's pages and
    // the source knows it.
    let mut store = PageStore::new(1 << 20);
    let mut known = HashSet::new();
    for page in pattern_pages(HEAP_MAGIC, HEAP_PAGES).chain(pattern_pages(MEMFD_MAGIC, MEMFD_PAGES))
    {
        known.insert(store.insert(&page).unwrap());
    }
    let r = dump_through_relay(&lab, known, store);
    let (code, result, restore_took) = restore_and_check(&lab);
    report("relay after pre-copy", &r, restore_took, &result);
    assert_eq!(code, 0, "memory check after restore: {result}");
    assert!(result.starts_with("ok "), "{result}");

    assert!(
        r.out.pages_as_reference * 100 >= HEAP_PAGES * 95,
        "only {} of the {HEAP_PAGES} heap pages crossed as references",
        r.out.pages_as_reference
    );
    assert!(
        r.out.link_bytes_written * 10 < HEAP_BYTES,
        "the link carried {} bytes, not less than 10 % of the {HEAP_BYTES}-byte heap",
        r.out.link_bytes_written
    );
}
