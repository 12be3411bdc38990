use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

use super::*;

fn hex(s: &str) -> [u8; HEADER_LEN] {
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn pid(p: u32) -> DstId {
    DstId::pid(p).unwrap()
}

fn header(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; HEADER_LEN] {
    raw_header(cmd, nr_pages, vaddr, dst_id)
}

fn decode_err(b: [u8; HEADER_LEN]) -> ProtocolError {
    Message::decode(&b).unwrap_err()
}

#[test]
fn layout_is_32_bytes_with_padding_after_cmd() {
    assert_eq!(HEADER_LEN, 32);
    let b = Message::Add {
        dst_id: pid(1),
        vaddr: 0x1000,
        nr_pages: 2,
        flags: PageFlags::PRESENT,
    }
    .encode()
    .unwrap();
    assert_eq!(&b[0..4], &(6u32 | 4 << 16).to_ne_bytes());
    assert_eq!(&b[4..8], &[0, 0, 0, 0], "padding");
    assert_eq!(&b[8..16], &2u64.to_ne_bytes());
    assert_eq!(&b[16..24], &0x1000u64.to_ne_bytes());
    assert_eq!(&b[24..32], &0x101u64.to_ne_bytes());
}

/// Headers captured between `criu dump --page-server` (4.2.1) and `criu page-server`.
#[cfg(target_endian = "little")]
#[test]
fn decodes_captured_criu_headers() {
    let open2 = hex("04000000000000000000000000000000000000000000000001de770000000000");
    let add_f = hex("0600040000000000010000000000000000904702b955000001de770000000000");
    let add_lazy = hex("0600060000000000040000000000000000a07d27b955000001de770000000000");
    let close = hex("2310000000000000000000000000000000000000000000000000000000000000");
    let m = Message::decode(&open2).unwrap();
    assert_eq!(m, Message::Open2 { dst_id: pid(30686) });
    assert_eq!(m.dst_id().unwrap().pagemap_image(), "pagemap-30686.img");
    let m = Message::decode(&add_f).unwrap();
    assert_eq!(
        m,
        Message::Add {
            dst_id: pid(30686),
            vaddr: 0x55b902479000,
            nr_pages: 1,
            flags: PageFlags::PRESENT
        }
    );
    assert_eq!(m.payload_len(), 4096);
    let m = Message::decode(&add_lazy).unwrap();
    assert_eq!(m.page_flags(), Some(PageFlags::PRESENT_LAZY));
    assert_eq!(m.payload_len(), 4 * 4096);
    assert_eq!(Message::decode(&close).unwrap(), Message::Close);
    // And the encoder produces the same bytes.
    for b in [open2, add_f, add_lazy, close] {
        assert_eq!(Message::decode(&b).unwrap().encode().unwrap(), b);
    }
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Open { dst_id: pid(7) },
        Message::Open2 {
            dst_id: pid(i32::MAX as u32),
        },
        Message::Open2 {
            dst_id: DstId::shmem(0xdead_beef).unwrap(),
        },
        Message::Parent { dst_id: pid(9) },
        Message::Add {
            dst_id: pid(9),
            vaddr: 0x7fff_0000_0000,
            nr_pages: MAX_PAYLOAD_PAGES,
            flags: PageFlags::PRESENT_LAZY,
        },
        Message::Add {
            dst_id: pid(9),
            vaddr: 0,
            nr_pages: 3,
            flags: PageFlags::LAZY,
        },
        Message::Add {
            dst_id: pid(9),
            vaddr: 0x1000,
            nr_pages: 10 * MAX_PAYLOAD_PAGES,
            flags: PageFlags::PARENT,
        },
        Message::AddPresent {
            dst_id: pid(9),
            vaddr: 0x2000,
            nr_pages: 1,
        },
        Message::Hole {
            dst_id: pid(9),
            vaddr: 0x2000,
            nr_pages: 5,
        },
        Message::Get {
            pid: 9,
            vaddr: 0x3000,
            nr_pages: 2,
        },
        Message::Close,
        Message::ForceClose,
    ]
}

#[test]
fn round_trips_every_message() {
    for m in all_messages() {
        let b = m.encode().unwrap();
        assert_eq!(Message::decode(&b).unwrap(), m, "{m:?}");
        let mut wire = Vec::new();
        write_message(&mut wire, &m).unwrap();
        let mut r = Cursor::new(wire);
        assert_eq!(read_message(&mut r).unwrap(), Some(m));
        assert_eq!(read_message(&mut r).unwrap(), None, "clean EOF");
    }
}

#[test]
fn payload_and_replies_per_command() {
    let m = all_messages();
    let payload: Vec<u64> = m.iter().map(Message::payload_pages).collect();
    assert_eq!(
        payload,
        [0, 0, 0, 0, MAX_PAYLOAD_PAGES, 0, 0, 1, 0, 0, 0, 0]
    );
    let replies: Vec<Option<ReplyKind>> = m.iter().map(Message::reply_kind).collect();
    use ReplyKind::*;
    assert_eq!(
        replies,
        [
            None,
            Some(Open2),
            Some(Open2),
            Some(Parent),
            None,
            None,
            None,
            None,
            None,
            Some(Pages),
            Some(Close),
            Some(Close)
        ]
    );
}

#[test]
fn unknown_commands_are_refused_by_name() {
    for code in [0u32, 8, 0x1022, 0x1025, 0xffff] {
        let e = decode_err(header(code, 0, 0, 0));
        assert!(
            matches!(e, ProtocolError::UnknownCommand { code: c, .. } if c == code),
            "{e}"
        );
        assert!(e.to_string().contains(&format!("{code:#x}")), "{e}");
    }
}

#[test]
fn flags_are_checked() {
    // Flags on anything but ADD_F.
    let e = decode_err(header(4 | 4 << 16, 0, 0, 0x101));
    assert!(
        matches!(
            e,
            ProtocolError::UnexpectedFlags {
                command: Command::Open2,
                flags: 4
            }
        ),
        "{e}"
    );
    // Unknown bits.
    let e = decode_err(header(6 | 8 << 16, 1, 0, 0x101));
    assert!(matches!(e, ProtocolError::UnknownFlags { flags: 8 }), "{e}");
    // Known bits, impossible combinations.
    for f in [0u32, 3, 5, 7] {
        let e = decode_err(header(6 | f << 16, 1, 0, 0x101));
        assert!(
            matches!(e, ProtocolError::BadFlagCombination { .. }),
            "{f}: {e}"
        );
    }
}

#[test]
fn page_counts_are_capped_for_payload_only() {
    let e = decode_err(header(6 | 4 << 16, MAX_PAYLOAD_PAGES + 1, 0, 0x101));
    assert!(matches!(e, ProtocolError::TooManyPages { .. }), "{e}");
    let e = decode_err(header(1, u64::MAX, 0, 0x101));
    assert!(matches!(e, ProtocolError::TooManyPages { .. }), "{e}");
    let e = decode_err(header(7, MAX_PAYLOAD_PAGES + 1, 0, 5));
    assert!(matches!(e, ProtocolError::TooManyPages { .. }), "{e}");
    // A hole may describe more, as long as it stays in the address space.
    Message::decode(&header(2, MAX_PAYLOAD_PAGES * 4, 0, 0x101)).unwrap();
    let e = decode_err(header(2, u64::MAX / 4096, 0, 0x101));
    assert!(matches!(e, ProtocolError::OutOfRange { .. }), "{e}");
    let e = decode_err(header(6 | 4 << 16, 0, 0, 0x101));
    assert!(matches!(e, ProtocolError::NoPages { .. }), "{e}");
}

#[test]
fn addresses_are_checked() {
    let e = decode_err(header(6 | 4 << 16, 1, 0x1001, 0x101));
    assert!(
        matches!(e, ProtocolError::Unaligned { vaddr: 0x1001, .. }),
        "{e}"
    );
    let e = decode_err(header(6 | 4 << 16, 1, ADDRESS_LIMIT, 0x101));
    assert!(matches!(e, ProtocolError::OutOfRange { .. }), "{e}");
    let e = decode_err(header(6 | 4 << 16, 2, !0xfffu64, 0x101));
    assert!(matches!(e, ProtocolError::OutOfRange { .. }), "{e}");
    Message::decode(&header(6 | 4 << 16, 1, ADDRESS_LIMIT - 4096, 0x101)).unwrap();
}

#[test]
fn dst_ids_are_checked() {
    // Legacy type numbers, unknown types.
    for t in [0u64, 3, 11, 34, 255] {
        let e = decode_err(header(4, 0, 0, 5 << 8 | t));
        assert!(matches!(e, ProtocolError::BadDstId { .. }), "{t}: {e}");
    }
    // Pid 0 and pids beyond i32.
    let e = decode_err(header(4, 0, 0, 1));
    assert!(matches!(e, ProtocolError::BadDstId { .. }), "{e}");
    let e = decode_err(header(4, 0, 0, (1u64 << 31) << 8 | 1));
    assert!(matches!(e, ProtocolError::BadDstId { .. }), "{e}");
    // GET carries a plain pid.
    let e = decode_err(header(7, 1, 0, 0));
    assert!(matches!(e, ProtocolError::BadDstId { .. }), "{e}");
    assert!(DstId::shmem(1 << 56).is_err());
    let d = DstId::shmem(42).unwrap();
    assert_eq!(
        (d.kind(), d.id(), d.raw()),
        (ImageKind::Shmem, 42, 42 << 8 | 2)
    );
    assert_eq!(d.pagemap_image(), "pagemap-shmem-42.img");
}

#[test]
fn unused_fields_must_be_zero_but_padding_is_ignored() {
    let e = decode_err(header(0x1023, 0, 0, 0x101));
    assert!(
        matches!(
            e,
            ProtocolError::NonZeroField {
                command: Command::Close,
                field: "dst_id",
                ..
            }
        ),
        "{e}"
    );
    let e = decode_err(header(4, 1, 0, 0x101));
    assert!(
        matches!(
            e,
            ProtocolError::NonZeroField {
                field: "nr_pages",
                ..
            }
        ),
        "{e}"
    );
    let e = decode_err(header(5, 0, 0x1000, 0x101));
    assert!(
        matches!(e, ProtocolError::NonZeroField { field: "vaddr", .. }),
        "{e}"
    );
    let mut b = header(4, 0, 0, 0x101);
    b[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(
        Message::decode(&b).unwrap(),
        Message::Open2 { dst_id: pid(1) }
    );
    // ... and re-encoding clears it.
    assert_eq!(
        &Message::decode(&b).unwrap().encode().unwrap()[4..8],
        &[0; 4]
    );
}

#[test]
fn truncated_streams_are_refused() {
    let full = Message::Open2 { dst_id: pid(3) }.encode().unwrap();
    for cut in 1..HEADER_LEN {
        let e = read_message(&mut Cursor::new(&full[..cut])).unwrap_err();
        assert!(
            matches!(e, ProtocolError::Truncated { got, expected: 32, .. } if got == cut as u64),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // Payload cut short.
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    let e = read_payload(&mut Cursor::new(vec![1u8; PAGE_SIZE + 7]), &mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Truncated {
                got: 4103,
                expected: 8192,
                ..
            }
        ),
        "{e}"
    );
    let e = read_payload(&mut Cursor::new(vec![0u8; 10]), &mut buf[..100]).unwrap_err();
    assert!(matches!(e, ProtocolError::PartialPage { len: 100 }), "{e}");
    // Replies.
    let close = Message::Close;
    let e = read_reply(&mut Cursor::new(vec![0u8; 2]), &close).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::Truncated {
                got: 2,
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = read_reply(&mut Cursor::new(Vec::new()), &close).unwrap_err();
    assert!(
        matches!(
            e,
            ProtocolError::NoReply {
                command: Command::Close
            }
        ),
        "{e}"
    );
}

#[test]
fn replies_are_checked() {
    let open2 = Message::Open2 { dst_id: pid(3) };
    let parent = Message::Parent { dst_id: pid(3) };
    let get = Message::Get {
        pid: 3,
        vaddr: 0x10000,
        nr_pages: 4,
    };
    assert_eq!(
        read_reply(&mut Cursor::new([1u8]), &open2).unwrap(),
        Reply::Open2 { has_parent: true }
    );
    let e = read_reply(&mut Cursor::new([2u8]), &open2).unwrap_err();
    assert!(matches!(e, ProtocolError::BadReply { .. }), "{e}");
    assert_eq!(
        read_reply(&mut Cursor::new(0i32.to_ne_bytes()), &parent).unwrap(),
        Reply::Parent { has_parent: false }
    );
    let e = read_reply(&mut Cursor::new((-1i32).to_ne_bytes()), &parent).unwrap_err();
    assert!(matches!(e, ProtocolError::BadReply { .. }), "{e}");
    assert_eq!(
        read_reply(&mut Cursor::new(0i32.to_ne_bytes()), &Message::ForceClose).unwrap(),
        Reply::Close { status: 0 }
    );
    let e = read_reply(
        &mut Cursor::new([0u8; 4]),
        &Message::Hole {
            dst_id: pid(1),
            vaddr: 0,
            nr_pages: 1,
        },
    )
    .unwrap_err();
    assert!(matches!(e, ProtocolError::ReplyMismatch { .. }), "{e}");

    // GET: a header answering it, fewer pages allowed, more or other addresses not.
    let ok = Reply::Pages {
        pid: 3,
        vaddr: 0x10000,
        nr_pages: 2,
    };
    let mut wire = Vec::new();
    write_reply(&mut wire, &get, &ok).unwrap();
    assert_eq!(wire.len(), HEADER_LEN);
    assert_eq!(read_reply(&mut Cursor::new(&wire), &get).unwrap(), ok);
    assert_eq!(ok.payload_len(), 2 * 4096);
    for bad in [
        Reply::Pages {
            pid: 3,
            vaddr: 0x10000,
            nr_pages: 5,
        },
        Reply::Pages {
            pid: 4,
            vaddr: 0x10000,
            nr_pages: 1,
        },
        Reply::Pages {
            pid: 3,
            vaddr: 0x11000,
            nr_pages: 1,
        },
    ] {
        let (b, n) = bad.encode().unwrap();
        let e = read_reply(&mut Cursor::new(&b[..n]), &get).unwrap_err();
        assert!(matches!(e, ProtocolError::BadReply { .. }), "{bad:?}: {e}");
        assert!(write_reply(&mut Vec::new(), &get, &bad).is_err());
    }
    // A reply of the wrong kind is not written.
    let e = write_reply(&mut Vec::new(), &open2, &Reply::Close { status: 0 }).unwrap_err();
    assert!(matches!(e, ProtocolError::ReplyMismatch { .. }), "{e}");
}

#[test]
fn payload_pieces_cover_the_message() {
    let m = Message::Add {
        dst_id: pid(1),
        vaddr: 0x10_0000,
        nr_pages: 600,
        flags: PageFlags::PRESENT_LAZY,
    };
    let pieces: Vec<(u64, u64)> = m.payload_pieces(256).map(|p| p.range().unwrap()).collect();
    assert_eq!(
        pieces,
        [
            (0x10_0000, 256),
            (0x10_0000 + 256 * 4096, 256),
            (0x10_0000 + 512 * 4096, 88)
        ]
    );
    assert_eq!(m.payload_pieces(1000).count(), 1);
    let hole = Message::Hole {
        dst_id: pid(1),
        vaddr: 0,
        nr_pages: 600,
    };
    assert_eq!(hole.payload_pieces(256).count(), 0);
}

#[test]
fn the_encoder_refuses_invalid_messages() {
    let m = Message::Add {
        dst_id: pid(1),
        vaddr: 0x123,
        nr_pages: 1,
        flags: PageFlags::PRESENT,
    };
    assert!(matches!(
        write_message(&mut Vec::new(), &m),
        Err(ProtocolError::Unaligned { .. })
    ));
    assert!(PageFlags::new(0).is_err());
    assert_eq!(format!("{:?}", PageFlags::PRESENT_LAZY), "LAZY|PRESENT");
}

// ---- The proxy, against a page server made of this module's own functions. ----

/// A fake page server: answers what CRIU's does, returns what it received.
fn fake_page_server(mut s: UnixStream) -> Result<Vec<(Message, Vec<u8>)>, ProtocolError> {
    let mut got = Vec::new();
    while let Some(m) = read_message(&mut s)? {
        let mut data = vec![0u8; m.payload_len() as usize];
        read_payload(&mut s, &mut data)?;
        let reply = match m.reply_kind() {
            Some(ReplyKind::Open2) => Some(Reply::Open2 { has_parent: false }),
            Some(ReplyKind::Parent) => Some(Reply::Parent { has_parent: true }),
            Some(ReplyKind::Close) => Some(Reply::Close { status: 0 }),
            _ => None,
        };
        if let Some(r) = reply {
            write_reply(&mut s, &m, &r)?;
        }
        got.push((m, data));
        if matches!(m, Message::Close) {
            // CRIU's page server waits for EOF.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty());
            break;
        }
    }
    Ok(got)
}

/// A fake dump: sends `script` (with page contents derived from the address) and collects
/// the replies.
fn fake_dump(mut s: UnixStream, script: Vec<Message>) -> Result<Vec<Reply>, ProtocolError> {
    let mut replies = Vec::new();
    for m in script {
        write_message(&mut s, &m)?;
        let mut data = vec![0u8; m.payload_len() as usize];
        if let Some((vaddr, _)) = m.range() {
            for (i, page) in data.chunks_mut(PAGE_SIZE).enumerate() {
                page.fill(((vaddr / 4096 + i as u64) % 251) as u8);
            }
        }
        write_payload(&mut s, &data)?;
        if m.reply_kind().is_some() {
            replies.push(read_reply(&mut s, &m)?);
        }
    }
    Ok(replies)
}

type ProxyRun = (
    Result<ProxyStats, ProxyError>,
    Result<Vec<Reply>, ProtocolError>,
    Result<Vec<(Message, Vec<u8>)>, ProtocolError>,
);

fn run_proxy(script: Vec<Message>, hook: &mut Hook<'_>) -> ProxyRun {
    let (criu_end, proxy_criu) = UnixStream::pair().unwrap();
    let (proxy_ps, ps_end) = UnixStream::pair().unwrap();
    let dump = thread::spawn(move || fake_dump(criu_end, script));
    let server = thread::spawn(move || fake_page_server(ps_end));
    let opts = ProxyOptions {
        chunk_pages: 3,
        ..ProxyOptions::default()
    };
    let stats = proxy_io(&proxy_criu, &proxy_criu, &proxy_ps, &proxy_ps, &opts, hook);
    drop(proxy_criu);
    let _ = proxy_ps.shutdown(std::net::Shutdown::Both);
    drop(proxy_ps);
    (stats, dump.join().unwrap(), server.join().unwrap())
}

fn add(p: u32, vaddr: u64, nr_pages: u64) -> Message {
    Message::Add {
        dst_id: pid(p),
        vaddr,
        nr_pages,
        flags: PageFlags::PRESENT_LAZY,
    }
}

#[test]
fn proxy_relays_messages_replies_and_pages_through_the_hook() {
    let shm = DstId::shmem(77).unwrap();
    let script = vec![
        Message::Parent { dst_id: pid(10) },
        Message::Open2 { dst_id: pid(10) },
        add(10, 0x10000, 7),
        Message::Add {
            dst_id: pid(10),
            vaddr: 0x40000,
            nr_pages: 2,
            flags: PageFlags::LAZY,
        },
        add(10, 0x17000, 1), // adjacent to the first range
        Message::Open2 { dst_id: shm },
        Message::Add {
            dst_id: shm,
            vaddr: 0,
            nr_pages: 4,
            flags: PageFlags::PRESENT,
        },
        Message::Close,
    ];
    let mut calls = Vec::new();
    let (stats, replies, received) = run_proxy(script.clone(), &mut |m, buf| {
        assert_eq!(buf.len() as u64, m.payload_len());
        calls.push(m.range().unwrap());
        // Check the contents match the address, then change them.
        let (vaddr, _) = m.range().unwrap();
        for (i, page) in buf.chunks_mut(PAGE_SIZE).enumerate() {
            assert!(page
                .iter()
                .all(|&b| b == ((vaddr / 4096 + i as u64) % 251) as u8));
            page[0] = 0xAA;
        }
        Ok(())
    });
    let stats = stats.unwrap();
    assert_eq!(
        replies.unwrap(),
        [
            Reply::Parent { has_parent: true },
            Reply::Open2 { has_parent: false },
            Reply::Open2 { has_parent: false },
            Reply::Close { status: 0 }
        ]
    );
    let received = received.unwrap();
    let msgs: Vec<Message> = received.iter().map(|(m, _)| *m).collect();
    assert_eq!(msgs, script);
    for (m, data) in &received {
        assert_eq!(data.len() as u64, m.payload_len());
        for page in data.chunks(PAGE_SIZE) {
            assert_eq!(page[0], 0xAA, "the hook's change arrived");
        }
    }
    // Pieces of at most 3 pages.
    assert_eq!(
        calls,
        [
            (0x10000, 3),
            (0x13000, 3),
            (0x16000, 1),
            (0x17000, 1),
            (0, 3),
            (0x3000, 1)
        ]
    );
    assert_eq!(stats.payload_pages, 12);
    assert_eq!(stats.payload_bytes, 12 * 4096);
    assert_eq!(stats.pages_without_payload, 2);
    assert_eq!(stats.count(Command::AddF), 4);
    assert_eq!(stats.count(Command::Open2), 2);
    assert_eq!(stats.total_messages(), 8);
    assert_eq!(stats.images, [pid(10), shm]);
    assert_eq!(stats.header_bytes, 8 * 32);
    assert_eq!(stats.reply_bytes, 4 + 1 + 1 + 4);
    assert_eq!(stats.close_status, Some(0));
    assert_eq!(stats.trace, script);
}

fn sequence_error(script: Vec<Message>) -> ProxyError {
    let (stats, _, _) = run_proxy(script, &mut |_, _| Ok(()));
    stats.unwrap_err()
}

#[test]
fn proxy_refuses_conversations_criu_never_has() {
    let open = Message::Open2 { dst_id: pid(1) };
    let cases = [
        (vec![add(1, 0, 1)], "no image"),
        (
            vec![open, Message::Open2 { dst_id: pid(2) }, add(1, 0, 1)],
            "while pid:2",
        ),
        (vec![open, open], "second time"),
        (vec![open, add(1, 0x4000, 4), add(1, 0x6000, 1)], "overlaps"),
        (vec![open, add(1, 0x4000, 4), add(1, 0x2000, 3)], "overlaps"),
        (
            vec![Message::Get {
                pid: 1,
                vaddr: 0,
                nr_pages: 1,
            }],
            "lazy-pages",
        ),
    ];
    for (script, want) in cases {
        let e = sequence_error(script.clone());
        assert!(matches!(e, ProxyError::Sequence { .. }), "{script:?}: {e}");
        assert!(e.to_string().contains(want), "{script:?}: {e}");
    }
    // Ranges that only touch are fine.
    let (stats, _, _) = run_proxy(
        vec![
            open,
            add(1, 0x4000, 4),
            add(1, 0x2000, 2),
            add(1, 0x8000, 1),
            Message::Close,
        ],
        &mut |_, _| Ok(()),
    );
    stats.unwrap();
}

#[test]
fn proxy_reports_a_dump_that_hangs_up_without_close() {
    let e = sequence_error(vec![Message::Open2 { dst_id: pid(1) }, add(1, 0, 2)]);
    assert!(matches!(e, ProxyError::NoClose { messages: 2 }), "{e}");
}

#[test]
fn proxy_stops_on_a_hook_error_and_both_ends_see_it() {
    let (stats, dump, server) = run_proxy(
        vec![
            Message::Open2 { dst_id: pid(1) },
            add(1, 0, 4),
            add(1, 0x10000, 1),
            Message::Close,
        ],
        &mut |m, _| {
            if m.range().unwrap().0 == 0x3000 {
                Err("page not in store".into())
            } else {
                Ok(())
            }
        },
    );
    let e = stats.unwrap_err();
    assert!(e.to_string().contains("page not in store"), "{e}");
    // The dump gets no CLOSE acknowledgement, the page server a truncated stream.
    assert!(dump.is_err());
    let e = server.unwrap_err();
    assert!(matches!(e, ProtocolError::Truncated { .. }), "{e}");
}

#[test]
fn proxy_refuses_garbage_from_criu() {
    let (criu_end, proxy_criu) = UnixStream::pair().unwrap();
    let (proxy_ps, _ps_end) = UnixStream::pair().unwrap();
    let mut w = &criu_end;
    w.write_all(&Message::Open2 { dst_id: pid(1) }.encode().unwrap())
        .unwrap();
    w.write_all(&header(0x99, 0, 0, 0)).unwrap();
    // The fake page server is not there to answer OPEN2: use a reply in advance.
    (&_ps_end).write_all(&[0u8]).unwrap();
    let e = proxy_io(
        &proxy_criu,
        &proxy_criu,
        &proxy_ps,
        &proxy_ps,
        &ProxyOptions::default(),
        &mut |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ProxyError::Read {
                side: Side::Criu,
                source: ProtocolError::UnknownCommand { code: 0x99, .. }
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("0x99"), "{e}");
    drop(criu_end);
}

#[cfg(feature = "async")]
#[test]
fn async_variants_round_trip() {
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let m = add(5, 0x5000, 2);
        write_message_async(&mut a, &m).await.unwrap();
        write_payload_async(&mut a, &[7u8; 2 * PAGE_SIZE])
            .await
            .unwrap();
        write_reply_async(&mut a, &Message::Close, &Reply::Close { status: 0 })
            .await
            .unwrap();
        a.write_all(&[1, 2, 3]).await.unwrap();
        drop(a);
        assert_eq!(read_message_async(&mut b).await.unwrap(), Some(m));
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        read_payload_async(&mut b, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        assert_eq!(
            read_reply_async(&mut b, &Message::Close).await.unwrap(),
            Reply::Close { status: 0 }
        );
        let e = read_message_async(&mut b).await.unwrap_err();
        assert!(matches!(e, ProtocolError::Truncated { got: 3, .. }), "{e}");
    });
}
