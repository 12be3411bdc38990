use super::*;

use criu_driver::page_server::{DstId, PageFlags, Reply};
use tokio::io::{duplex, DuplexStream};

/// [`relay_out`] with CLOSE forwarded, and the destination's owed answers confirmed.
async fn relay_round_trip<C, W, R, S>(
    criu: C,
    link_tx: W,
    link_rx: R,
    known: &mut HashSet<PageHash, S>,
    fast: Option<&FastHashes>,
) -> Result<RelayStats, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
    S: BuildHasher,
{
    let none = FastHashes::default();
    let fast = fast.unwrap_or(&none);
    let (mut stats, pending) =
        relay_out(criu, link_tx, link_rx, known, fast, Close::RoundTrip).await?;
    pending.confirm(&mut stats).await?;
    Ok(stats)
}

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8))
        .collect()
}

fn open2() -> Message {
    Message::Open2 {
        dst_id: DstId::pid(100).unwrap(),
    }
}

fn add(vaddr: u64, nr_pages: u64) -> Message {
    Message::Add {
        dst_id: DstId::pid(100).unwrap(),
        vaddr,
        nr_pages,
        flags: PageFlags::PRESENT_LAZY,
    }
}

fn msg_frame(m: &Message) -> Vec<u8> {
    let mut f = vec![TAG_MSG];
    f.extend_from_slice(&m.encode().unwrap());
    f
}

/// A page server that records everything and answers like `criu page-server`.
async fn fake_page_server(mut s: DuplexStream) -> Vec<(Message, Vec<u8>)> {
    let mut got = Vec::new();
    while let Some(m) = read_message_async(&mut s).await.unwrap() {
        let mut payload = vec![0u8; m.payload_len() as usize];
        read_payload_async(&mut s, &mut payload).await.unwrap();
        match m.reply_kind() {
            Some(ReplyKind::Open2) => {
                write_reply_async(&mut s, &m, &Reply::Open2 { has_parent: false })
                    .await
                    .unwrap()
            }
            Some(ReplyKind::Close) => write_reply_async(&mut s, &m, &Reply::Close { status: 0 })
                .await
                .unwrap(),
            _ => {}
        }
        got.push((m, payload));
    }
    got
}

/// A dump: OPEN2, ADD_F with pages A B A, ADD_F with page C, CLOSE.
async fn fake_criu(mut s: DuplexStream, a: Vec<u8>, b: Vec<u8>, c: Vec<u8>) {
    write_message_async(&mut s, &open2()).await.unwrap();
    assert_eq!(
        read_reply_async(&mut s, &open2()).await.unwrap(),
        Reply::Open2 { has_parent: false }
    );
    write_message_async(&mut s, &add(0x10000, 3)).await.unwrap();
    for p in [&a, &b, &a] {
        write_payload_async(&mut s, p).await.unwrap();
    }
    write_message_async(&mut s, &add(0x20000, 1)).await.unwrap();
    write_payload_async(&mut s, &c).await.unwrap();
    write_message_async(&mut s, &Message::Close).await.unwrap();
    assert_eq!(
        read_reply_async(&mut s, &Message::Close).await.unwrap(),
        Reply::Close { status: 0 }
    );
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn round_trip_deduplicates_and_rebuilds_every_page() {
    let (a, b, c) = (page(1), page(2), page(3));
    let mut known = HashSet::new();
    let mut store = PageStore::new(100);
    // C is held from an earlier round.
    store.insert(&c).unwrap();
    known.insert(hash_page(&c));

    let (criu, relay_criu) = duplex(1 << 16);
    let (ps, relay_ps) = duplex(1 << 16);
    let (fwd_tx, fwd_rx) = duplex(1 << 16);
    let (back_tx, back_rx) = duplex(1 << 16);
    let (out, inn, (), got) = tokio::join!(
        relay_round_trip(relay_criu, fwd_tx, back_rx, &mut known, None),
        relay_in(fwd_rx, back_tx, relay_ps, &mut store),
        fake_criu(criu, a.clone(), b.clone(), c.clone()),
        fake_page_server(ps),
    );
    let (out, inn) = (out.unwrap(), inn.unwrap());
    assert_eq!(got.len(), 4);
    assert_eq!(got[0].0, open2());
    assert_eq!(got[1], (add(0x10000, 3), [&a[..], &b, &a].concat()));
    assert_eq!(got[2], (add(0x20000, 1), c.clone()));
    assert_eq!(got[3].0, Message::Close);

    assert_eq!((out.messages, out.pages, out.pages_as_reference), (4, 4, 2));
    assert_eq!((inn.messages, inn.pages, inn.pages_as_reference), (4, 4, 2));
    assert_eq!(out.close_status, Some(0));
    // OPEN2 is answered by the relay at once: CRIU waited for the destination only at CLOSE.
    assert_eq!(out.round_trips, 1);
    // 4 headers, 2 contents, 2 references, END.
    let expected = 4 * 33 + 2 * 4097 + 2 * 33 + 1;
    assert_eq!(out.link_bytes_written, expected);
    assert_eq!(inn.link_bytes_read, expected);
    // Replies: OPEN2 (1 byte) and CLOSE (4 bytes), each with a tag.
    assert_eq!(inn.link_bytes_written, 2 + 5);
    assert_eq!(out.link_bytes_read, 2 + 5);
    for p in [&a, &b, &c] {
        assert!(known.contains(&hash_page(p)));
        assert!(store.contains(&hash_page(p)));
    }
}

#[tokio::test]
async fn hashes_known_in_advance_give_the_same_stream() {
    let (a, b, c) = (page(1), page(2), page(3));
    let mut known = HashSet::new();
    let mut store = PageStore::new(100);
    store.insert(&c).unwrap();
    known.insert(hash_page(&c));
    // The rounds saw A and C; B is new content.
    let mut fast = FastHashes::default();
    for p in [&a, &c] {
        fast.insert(fast_key(p), hash_page(p));
    }
    let (criu, relay_criu) = duplex(1 << 16);
    let (ps, relay_ps) = duplex(1 << 16);
    let (fwd_tx, fwd_rx) = duplex(1 << 16);
    let (back_tx, back_rx) = duplex(1 << 16);
    let (out, inn, (), got) = tokio::join!(
        relay_round_trip(relay_criu, fwd_tx, back_rx, &mut known, Some(&fast)),
        relay_in(fwd_rx, back_tx, relay_ps, &mut store),
        fake_criu(criu, a.clone(), b.clone(), c.clone()),
        fake_page_server(ps),
    );
    let (out, inn) = (out.unwrap(), inn.unwrap());
    assert_eq!(got[1], (add(0x10000, 3), [&a[..], &b, &a].concat()));
    assert_eq!(got[2], (add(0x20000, 1), c.clone()));
    assert_eq!((out.pages, out.pages_as_reference), (4, 2));
    assert_eq!(inn.pages_as_reference, 2);
    for p in [&a, &b, &c] {
        assert!(known.contains(&hash_page(p)));
    }
}

#[tokio::test]
async fn references_resolve_from_the_stream_when_the_store_is_full() {
    let (a, b, c) = (page(4), page(5), page(6));
    let mut known = HashSet::new();
    let mut store = PageStore::new(0);
    let (criu, relay_criu) = duplex(1 << 16);
    let (ps, relay_ps) = duplex(1 << 16);
    let (fwd_tx, fwd_rx) = duplex(1 << 16);
    let (back_tx, back_rx) = duplex(1 << 16);
    let (out, inn, (), got) = tokio::join!(
        relay_round_trip(relay_criu, fwd_tx, back_rx, &mut known, None),
        relay_in(fwd_rx, back_tx, relay_ps, &mut store),
        fake_criu(criu, a.clone(), b.clone(), c.clone()),
        fake_page_server(ps),
    );
    assert_eq!(out.unwrap().pages_as_reference, 1);
    assert_eq!(inn.unwrap().pages_as_reference, 1);
    assert_eq!(got[1].1, [&a[..], &b, &a].concat());
}

/// Runs `relay_in` on `link` bytes; returns its result and what it sent back.
async fn relay_in_on(
    link: Vec<u8>,
    store: &mut PageStore,
) -> (Result<RelayStats, RelayError>, Vec<u8>) {
    let (ps, relay_ps) = duplex(4 << 20);
    let (back_tx, mut back_rx) = duplex(1 << 16);
    let res = relay_in(&link[..], back_tx, relay_ps, store).await;
    drop(ps);
    let mut back = Vec::new();
    back_rx.read_to_end(&mut back).await.unwrap();
    (res, back)
}

#[tokio::test]
async fn a_reference_to_a_page_not_held_fails_clearly() {
    let mut link = msg_frame(&add(0x10000, 2));
    link.push(PAGE_CONTENT);
    link.extend_from_slice(&page(9));
    link.push(PAGE_REFERENCE);
    let missing = hash_page(&page(10));
    link.extend_from_slice(&missing);
    let mut store = PageStore::new(10);
    let (res, back) = relay_in_on(link, &mut store).await;
    let err = res.unwrap_err();
    let want = format!(
        "page {} referenced but not held",
        blake3::Hash::from(missing).to_hex()
    );
    assert_eq!(err.to_string(), want);
    assert!(matches!(err, RelayError::NotHeld { .. }));
    // The source is told why.
    assert_eq!(back[0], TAG_ERROR);
    let len = usize::from(u16::from_be_bytes([back[1], back[2]]));
    assert_eq!(&back[3..], want.as_bytes());
    assert_eq!(len, want.len());
}

#[tokio::test]
async fn hostile_link_input_is_refused() {
    let mut store = PageStore::new(10);
    let err = |r: Result<RelayStats, RelayError>| r.unwrap_err();

    // Unknown frame tag.
    let (r, _) = relay_in_on(vec![0x07], &mut store).await;
    assert!(matches!(err(r), RelayError::UnknownTag { tag: 0x07, .. }));

    // Empty stream: no END.
    let (r, _) = relay_in_on(vec![], &mut store).await;
    assert!(matches!(err(r), RelayError::Truncated { .. }));

    // Truncated header.
    let mut link = msg_frame(&open2());
    link.truncate(10);
    let (r, _) = relay_in_on(link, &mut store).await;
    let e = err(r);
    assert!(matches!(e, RelayError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("inside a message header"), "{e}");

    // Unknown page-server command in the header.
    let mut link = vec![TAG_MSG];
    link.extend_from_slice(&[0x99, 0, 0, 0]);
    link.extend_from_slice(&[0u8; 28]);
    let (r, _) = relay_in_on(link, &mut store).await;
    assert!(matches!(err(r), RelayError::BadFrame(_)));

    // A page count beyond CRIU's cap.
    let mut h = add(0x10000, 1).encode().unwrap();
    h[8..16].copy_from_slice(&(1u64 << 40).to_ne_bytes());
    let mut link = vec![TAG_MSG];
    link.extend_from_slice(&h);
    let (r, _) = relay_in_on(link, &mut store).await;
    assert!(matches!(err(r), RelayError::BadFrame(_)));

    // Unknown page-record tag.
    let mut link = msg_frame(&add(0x10000, 1));
    link.push(0x05);
    let (r, _) = relay_in_on(link, &mut store).await;
    assert!(matches!(err(r), RelayError::UnknownTag { tag: 0x05, .. }));

    // Page contents cut short.
    let mut link = msg_frame(&add(0x10000, 1));
    link.push(PAGE_CONTENT);
    link.extend_from_slice(&[1u8; 100]);
    let (r, _) = relay_in_on(link, &mut store).await;
    assert!(matches!(
        err(r),
        RelayError::Truncated {
            what: "inside a page"
        }
    ));

    // Fewer page records than the header announced.
    let mut link = msg_frame(&add(0x10000, 2));
    link.push(PAGE_CONTENT);
    link.extend_from_slice(&page(1));
    let (r, _) = relay_in_on(link, &mut store).await;
    assert!(matches!(err(r), RelayError::Truncated { .. }));

    // END without CLOSE.
    let (r, _) = relay_in_on(vec![TAG_END], &mut store).await;
    assert!(matches!(err(r), RelayError::Sequence(_)));

    // A complete message, then the link just ends.
    let mut link = msg_frame(&add(0x10000, 1));
    link.push(PAGE_CONTENT);
    link.extend_from_slice(&page(1));
    let (r, _) = relay_in_on(link, &mut store).await;
    assert!(matches!(
        err(r),
        RelayError::Truncated {
            what: "before the END frame"
        }
    ));

    // Lazy-pages GET is not relayed.
    let get = Message::Get {
        pid: 100,
        vaddr: 0x1000,
        nr_pages: 1,
    };
    let (r, _) = relay_in_on(msg_frame(&get), &mut store).await;
    assert!(matches!(err(r), RelayError::Unsupported(Command::Get)));
}

/// Runs `relay_out` for a dump that sends OPEN2 (answered by the relay itself) and CLOSE, with
/// `back` as what the destination answers.
async fn relay_out_with_answer(back: Vec<u8>) -> RelayError {
    let (mut criu, relay_criu) = duplex(1 << 16);
    let (fwd_tx, mut fwd_rx) = duplex(1 << 16);
    let mut known = HashSet::new();
    let dump = async move {
        write_message_async(&mut criu, &open2()).await.unwrap();
        assert_eq!(
            read_reply_async(&mut criu, &open2()).await.unwrap(),
            Reply::Open2 { has_parent: false }
        );
        write_message_async(&mut criu, &Message::Close)
            .await
            .unwrap();
        criu
    };
    let drain = async move {
        let mut v = Vec::new();
        let _ = fwd_rx.read_to_end(&mut v).await;
    };
    let (res, _criu, ()) = tokio::join!(
        relay_round_trip(relay_criu, fwd_tx, &back[..], &mut known, None),
        dump,
        drain
    );
    res.unwrap_err()
}

#[tokio::test]
async fn hostile_replies_are_refused() {
    // has_parent must be 0 or 1.
    let e = relay_out_with_answer(vec![TAG_REPLY, 7]).await;
    assert!(matches!(e, RelayError::BadFrame(_)), "{e}");
    // Unknown tag.
    let e = relay_out_with_answer(vec![0x42]).await;
    assert!(matches!(e, RelayError::UnknownTag { tag: 0x42, .. }), "{e}");
    // Nothing.
    let e = relay_out_with_answer(vec![]).await;
    assert!(matches!(e, RelayError::Truncated { .. }), "{e}");
    // A reply tag and no reply.
    let e = relay_out_with_answer(vec![TAG_REPLY]).await;
    assert!(matches!(e, RelayError::Truncated { .. }), "{e}");
    // Error frames: too long, empty, and a good one.
    let e = relay_out_with_answer(vec![TAG_ERROR, 0xff, 0xff]).await;
    assert!(matches!(e, RelayError::Sequence(_)), "{e}");
    let e = relay_out_with_answer(vec![TAG_ERROR, 0, 0]).await;
    assert!(matches!(e, RelayError::Sequence(_)), "{e}");
    let mut f = vec![TAG_ERROR, 0, 4];
    f.extend_from_slice(b"boom");
    let e = relay_out_with_answer(f).await;
    assert_eq!(e.to_string(), "relay: the destination failed: boom");
    // The relay told CRIU there is no parent image; a destination that has one is caught
    // before CLOSE is answered.
    let e = relay_out_with_answer(vec![TAG_REPLY, 1, TAG_REPLY, 0, 0, 0, 0]).await;
    assert!(
        matches!(&e, RelayError::Sequence(m) if m.contains("without a parent image")),
        "{e}"
    );
}

#[tokio::test]
async fn a_pipelined_relay_answers_close_before_the_destination_and_checks_it_later() {
    let (a, b, c) = (page(7), page(8), page(9));
    let mut known = HashSet::new();
    let mut store = PageStore::new(100);
    let (criu, relay_criu) = duplex(1 << 16);
    let (fwd_tx, fwd_rx) = duplex(1 << 16);
    let (back_tx, back_rx) = duplex(1 << 16);
    let fast = FastHashes::default();
    // The dump completes with nothing at the other end of the link yet: CRIU is not kept
    // waiting for the destination.
    let (out, ()) = tokio::join!(
        relay_out(
            relay_criu,
            fwd_tx,
            back_rx,
            &mut known,
            &fast,
            Close::Pipelined
        ),
        fake_criu(criu, a.clone(), b.clone(), c.clone()),
    );
    let (mut stats, pending) = out.unwrap();
    assert_eq!(stats.round_trips, 0);
    assert_eq!(stats.close_status, None);
    // The destination catches up afterwards; its answers are then read and checked.
    let (ps, relay_ps) = duplex(1 << 16);
    let (inn, got) = tokio::join!(
        relay_in(fwd_rx, back_tx, relay_ps, &mut store),
        fake_page_server(ps),
    );
    inn.unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(got[1], (add(0x10000, 3), [&a[..], &b, &a].concat()));
    pending.confirm(&mut stats).await.unwrap();
    assert_eq!(stats.close_status, Some(0));
}

/// Runs a pipelined relay for a dump of OPEN2 and CLOSE; `back` is what the destination
/// answers. CRIU's dump must succeed without it; the confirmation's result is returned.
async fn pipelined_confirm(back: Vec<u8>) -> Result<RelayStats, RelayError> {
    let (mut criu, relay_criu) = duplex(1 << 16);
    let (fwd_tx, mut fwd_rx) = duplex(1 << 16);
    let mut known = HashSet::new();
    let fast = FastHashes::default();
    let dump = async move {
        write_message_async(&mut criu, &open2()).await.unwrap();
        read_reply_async(&mut criu, &open2()).await.unwrap();
        // CRIU sends FORCE_CLOSE on a page-server socket it was given (`ps-socket`).
        write_message_async(&mut criu, &Message::ForceClose)
            .await
            .unwrap();
        assert_eq!(
            read_reply_async(&mut criu, &Message::ForceClose)
                .await
                .unwrap(),
            Reply::Close { status: 0 }
        );
        criu.shutdown().await.unwrap();
    };
    let drain = async move {
        let mut v = Vec::new();
        let _ = fwd_rx.read_to_end(&mut v).await;
    };
    let (res, (), ()) = tokio::join!(
        relay_out(
            relay_criu,
            fwd_tx,
            &back[..],
            &mut known,
            &fast,
            Close::Pipelined
        ),
        dump,
        drain
    );
    let (mut stats, pending) = res.expect("the dump itself succeeds");
    pending.confirm(&mut stats).await.map(|()| stats)
}

#[tokio::test]
async fn a_pipelined_relay_refuses_a_failed_or_hostile_close_when_it_confirms() {
    // A clean close.
    let ok = pipelined_confirm(vec![TAG_REPLY, 0, TAG_REPLY, 0, 0, 0, 0])
        .await
        .unwrap();
    assert_eq!(ok.close_status, Some(0));
    // The destination's page server failed its close.
    let e = pipelined_confirm(vec![TAG_REPLY, 0, TAG_REPLY, 1, 0, 0, 0])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RelayError::Remote(m) if m.contains("status 1")),
        "{e}"
    );
    // The destination gave up.
    let mut f = vec![TAG_REPLY, 0, TAG_ERROR, 0, 4];
    f.extend_from_slice(b"full");
    let e = pipelined_confirm(f).await.unwrap_err();
    assert_eq!(e.to_string(), "relay: the destination failed: full");
    // A parent image the relay said there was not.
    let e = pipelined_confirm(vec![TAG_REPLY, 1, TAG_REPLY, 0, 0, 0, 0])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RelayError::Sequence(m) if m.contains("without a parent image")),
        "{e}"
    );
    // No answer at all.
    let e = pipelined_confirm(vec![]).await.unwrap_err();
    assert!(matches!(e, RelayError::Truncated { .. }), "{e}");
}

#[tokio::test]
async fn criu_hanging_up_without_close_is_an_error() {
    let (mut criu, relay_criu) = duplex(1 << 16);
    let (fwd_tx, mut fwd_rx) = duplex(1 << 16);
    let mut known = HashSet::new();
    let dump = async move {
        write_message_async(&mut criu, &add(0x1000, 1))
            .await
            .unwrap();
        write_payload_async(&mut criu, &page(1)).await.unwrap();
        criu.shutdown().await.unwrap();
    };
    let drain = async move {
        let mut v = Vec::new();
        fwd_rx.read_to_end(&mut v).await.unwrap();
        v
    };
    let empty: &[u8] = &[];
    let (res, (), sent) = tokio::join!(
        relay_round_trip(relay_criu, fwd_tx, empty, &mut known, None),
        dump,
        drain
    );
    assert!(matches!(res.unwrap_err(), RelayError::NoClose));
    // Whatever was forwarded carries no END: the destination sees a truncated stream.
    assert!(sent.len() <= 33 + 4097, "{}", sent.len());
}
