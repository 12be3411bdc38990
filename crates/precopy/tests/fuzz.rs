//! Property-based and mutation ("fuzz") tests of the relay's link-side parsers: [`relay_in`]
//! (the destination, reading frames, headers, page records and references from the network)
//! and the reply reader of [`relay_out`] (the source, reading REPLY and ERROR frames).
//!
//! Valid link streams come from the source side itself: [`relay_out`] relays a dump written by
//! an in-memory CRIU (a `tokio::io::duplex`) against a set of pages the destination holds.
//! They are then mutated (around frame and record boundaries, mostly) or replaced by random
//! bytes, and fed to [`relay_in`] with an in-memory page server. An independent model of the
//! link format (the module documentation's) says what must come out: the page server gets a
//! prefix of the model's output, so never a page that did not arrive or was not held; the
//! source gets the model's replies and at most one well-formed ERROR frame; the error is the
//! model's. Every case runs under a 5 s timeout; allocations are tracked per thread.
//!
//! Every proptest is bounded (256 cases, 1000 shrink iterations) and persists nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use criu_driver::page_server::{
    decode_reply, read_reply_async, reply_len, write_message_async, write_payload_async, DstId,
    Message, PageFlags, Reply, ReplyKind, HEADER_LEN, PAGE_SIZE,
};
use precopy::relay::{
    relay_in, relay_out, Close, FastHashes, RelayError, RelayStats, CHUNK_PAGES, MAX_ERROR_LEN,
    PAGE_CONTENT, PAGE_REFERENCE, TAG_END, TAG_ERROR, TAG_MSG, TAG_REPLY,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{TestCaseError, TestRunner};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use transfer::pages::{hash_page, PageHash, PageStore};

// ---------------------------------------------------------------------------------------------
// Harness: bounded runs, allocation tracking, mutations.

/// The largest single allocation a case may cause: the relay's one chunk buffer (256 pages,
/// 1 MiB) and its 256 KiB buffers, or the test's own copies of a dump (under 2 MiB). A header
/// read off the link announces up to 4 GiB.
const ALLOC_CAP: usize = 4 << 20;
/// Allocations above this fail outright (the process aborts) instead of being attempted.
const ALLOC_REFUSE: usize = 256 << 20;

thread_local! {
    /// The largest allocation of this thread since [`reset_allocations`].
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) -> bool {
    // A const-initialised Cell: no allocation, no destructor; ignored while the thread exits.
    let _ = LARGEST_ALLOC.try_with(|l| l.set(l.get().max(size)));
    size <= ALLOC_REFUSE
}

fn reset_allocations() {
    LARGEST_ALLOC.with(|l| l.set(0));
}

/// Records the size of every allocation; refuses absurd ones.
struct Tracking;

// SAFETY: every call is forwarded unchanged to the system allocator, or fails by returning a
// null pointer, which the GlobalAlloc contract allows.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout, valid as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: every block was allocated by System (above) with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note_alloc(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from System with `layout`; the caller guarantees `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Checks the largest allocation of this thread since the case started.
fn check_allocations() -> Result<(), TestCaseError> {
    let largest = LARGEST_ALLOC.with(Cell::get);
    prop_assert!(
        largest <= ALLOC_CAP,
        "an allocation of {largest} bytes (cap {ALLOC_CAP})"
    );
    Ok(())
}

const CASES: u32 = 256;

/// Runs `test` on `CASES` inputs from `strategy`; prints how long it took.
fn fuzz<S>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let config = ProptestConfig {
        cases: CASES,
        max_shrink_iters: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let start = Instant::now();
    let mut runner = TestRunner::new(config);
    let test = |v| {
        reset_allocations();
        test(v)
    };
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name}: {e}");
    }
    eprintln!(
        "fuzz {name}: {CASES} cases in {} ms",
        start.elapsed().as_millis()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Where a mutation applies: anywhere, or near a structural mark (a tag, a header, a record).
#[derive(Debug, Clone)]
enum At {
    Any(Index),
    Mark(Index, u8),
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(At, u8),
    Set(At, u8),
    Insert(At, Vec<u8>),
    Delete(At, usize),
    Truncate(At),
    Duplicate(At, usize),
}

fn at() -> impl Strategy<Value = At> {
    prop_oneof![
        1 => any::<Index>().prop_map(At::Any),
        3 => (any::<Index>(), prop_oneof![Just(0u8), 0..40u8]).prop_map(|(i, d)| At::Mark(i, d)),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (at(), 1..=255u8).prop_map(|(a, m)| Mutation::Flip(a, m)),
        2 => (at(), select(vec![0u8, 1, 2, 3, 0x7f, 0x80, 0x81, 0x8f, 0xff])).prop_map(|(a, b)| Mutation::Set(a, b)),
        2 => (at(), vec(any::<u8>(), 1..12)).prop_map(|(a, b)| Mutation::Insert(a, b)),
        2 => (at(), prop_oneof![1..40usize, Just(4097), Just(33)]).prop_map(|(a, n)| Mutation::Delete(a, n)),
        1 => at().prop_map(Mutation::Truncate),
        1 => (at(), prop_oneof![1..64usize, Just(33), Just(4097)]).prop_map(|(a, n)| Mutation::Duplicate(a, n)),
    ]
}

fn position(at: &At, len: usize, marks: &[usize]) -> usize {
    match at {
        At::Mark(i, d) if !marks.is_empty() => {
            (marks[i.index(marks.len())] + usize::from(*d)).min(len)
        }
        At::Any(i) | At::Mark(i, _) => i.index(len + 1),
    }
}

fn mutate(mut b: Vec<u8>, marks: &[usize], muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = b.len();
        match m {
            Mutation::Insert(a, bytes) => {
                let p = position(a, len, marks);
                b.splice(p..p, bytes.iter().copied());
            }
            Mutation::Truncate(a) => b.truncate(position(a, len, marks)),
            _ if len == 0 => {}
            Mutation::Flip(a, x) => {
                let p = position(a, len - 1, marks);
                b[p] ^= x;
            }
            Mutation::Set(a, x) => {
                let p = position(a, len - 1, marks);
                b[p] = *x;
            }
            Mutation::Delete(a, n) => {
                let p = position(a, len - 1, marks);
                b.drain(p..(p + n).min(len));
            }
            Mutation::Duplicate(a, n) => {
                let p = position(a, len - 1, marks);
                let piece = b[p..(p + n).min(len)].to_vec();
                b.splice(p..p, piece);
            }
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Dumps and the source side.

/// One of a few distinct pages, so that dumps repeat pages and the relay sends references.
fn alpha(i: u8) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|n| i.wrapping_mul(53) ^ (n % 251) as u8)
        .collect()
}

const ALPHABET: u8 = 8;

/// A dump as CRIU sends it: messages with their payloads.
#[derive(Debug, Clone)]
struct Dump {
    msgs: Vec<(Message, Vec<u8>)>,
}

impl Dump {
    /// The REPLY frames a destination sends for it (its page server answers 0 everywhere).
    fn link_replies(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for (m, _) in &self.msgs {
            if let Some(kind) = m.reply_kind() {
                b.push(TAG_REPLY);
                b.extend_from_slice(&reply_bytes(kind));
            }
        }
        b
    }
}

/// What the in-memory page server answers.
fn reply_bytes(kind: ReplyKind) -> Vec<u8> {
    match kind {
        ReplyKind::Open2 => vec![0],
        ReplyKind::Parent | ReplyKind::Close => 0i32.to_ne_bytes().to_vec(),
        ReplyKind::Pages => unreachable!("GET is not relayed"),
    }
}

fn dump() -> impl Strategy<Value = Dump> {
    let image = (
        any::<bool>(), // shmem
        any::<bool>(), // legacy OPEN
        any::<bool>(), // PARENT first
        vec((0..6u8, 1..=4u64, vec(0..ALPHABET, 4)), 0..5),
    );
    (vec(image, 1..=3), any::<bool>()).prop_map(|(images, force)| {
        let mut msgs = Vec::new();
        for (i, (shmem, legacy, ask, entries)) in images.into_iter().enumerate() {
            let dst_id = if shmem {
                DstId::shmem(1000 + i as u64).unwrap()
            } else {
                DstId::pid(100 + i as u32).unwrap()
            };
            if ask {
                msgs.push((Message::Parent { dst_id }, vec![]));
            }
            let open = if legacy {
                Message::Open { dst_id }
            } else {
                Message::Open2 { dst_id }
            };
            msgs.push((open, vec![]));
            let mut vaddr = 0x10000u64;
            for (kind, nr_pages, pages) in entries {
                let add = |flags| Message::Add {
                    dst_id,
                    vaddr,
                    nr_pages,
                    flags,
                };
                let m = match kind {
                    0 | 1 => add(PageFlags::PRESENT_LAZY),
                    2 => add(PageFlags::PRESENT),
                    3 => add(PageFlags::LAZY),
                    4 => Message::AddPresent {
                        dst_id,
                        vaddr,
                        nr_pages,
                    },
                    _ => Message::Hole {
                        dst_id,
                        vaddr,
                        nr_pages,
                    },
                };
                let payload = (0..m.payload_pages() as usize)
                    .flat_map(|n| alpha(pages[n]))
                    .collect();
                msgs.push((m, payload));
                vaddr += nr_pages * PAGE_SIZE as u64;
            }
        }
        let close = if force {
            Message::ForceClose
        } else {
            Message::Close
        };
        msgs.push((close, vec![]));
        Dump { msgs }
    })
}

/// An in-memory `criu dump`: writes its messages, reads the replies it waits for, hangs up
/// after CLOSE; returns the reply bytes it got (possibly fewer when the relay fails).
async fn fake_criu(mut s: DuplexStream, dump: Dump) -> Vec<u8> {
    let mut got = Vec::new();
    for (m, payload) in &dump.msgs {
        if write_message_async(&mut s, m).await.is_err()
            || write_payload_async(&mut s, payload).await.is_err()
        {
            return got;
        }
        if m.reply_kind().is_some() {
            match read_reply_async(&mut s, m).await {
                Ok(r) => {
                    let (b, len) = r.encode().unwrap();
                    got.extend_from_slice(&b[..len]);
                }
                Err(_) => return got,
            }
        }
    }
    let _ = s.shutdown().await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "the relay sent CRIU more than its replies");
    got
}

/// Runs [`relay_out`] on `dump` with `back` as what the destination answers: the link bytes it
/// wrote, its result and the reply bytes CRIU got.
async fn source(
    dump: &Dump,
    back: &[u8],
    known: &mut HashSet<PageHash>,
) -> (Vec<u8>, Result<RelayStats, RelayError>, Vec<u8>) {
    let (criu, relay_criu) = duplex(1 << 16);
    let mut link = Vec::new();
    let (res, got) = tokio::join!(
        async {
            let (mut stats, pending) = relay_out(
                relay_criu,
                &mut link,
                back,
                known,
                &FastHashes::default(),
                Close::RoundTrip,
            )
            .await?;
            pending.confirm(&mut stats).await?;
            Ok(stats)
        },
        fake_criu(criu, dump.clone()),
    );
    (link, res, got)
}

// ---------------------------------------------------------------------------------------------
// The model of the destination side, from the link format of the module documentation.

/// How a stream ends, as [`RelayError`]'s variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Ok,
    Truncated,
    UnknownTag,
    BadFrame,
    Sequence,
    NotHeld,
    Unsupported,
}

fn end_of(r: &Result<RelayStats, RelayError>) -> Option<End> {
    Some(match r {
        Ok(_) => End::Ok,
        Err(RelayError::Truncated { .. }) => End::Truncated,
        Err(RelayError::UnknownTag { .. }) => End::UnknownTag,
        Err(RelayError::BadFrame(_)) => End::BadFrame,
        Err(RelayError::Sequence(_)) => End::Sequence,
        Err(RelayError::NotHeld { .. }) => End::NotHeld,
        Err(RelayError::Unsupported(_)) => End::Unsupported,
        Err(_) => return None,
    })
}

/// What `relay_in` must do with a link stream.
#[derive(Debug, Default)]
struct Model {
    /// Everything the page server must get, up to where the stream fails.
    ps: Vec<u8>,
    /// Of which the page server must have got at least this much (flushed for a reply).
    ps_flushed: usize,
    /// The REPLY frames sent back.
    replies: Vec<u8>,
    /// Messages, pages, references.
    counts: (u64, u64, u64),
    /// Offsets of tags, headers and records (mutation targets).
    marks: Vec<usize>,
}

fn model(link: &[u8], held_before: &HashMap<PageHash, Vec<u8>>) -> (Model, End) {
    let mut m = Model::default();
    let end = model_run(link, held_before, &mut m);
    (m, end)
}

fn model_run(link: &[u8], held_before: &HashMap<PageHash, Vec<u8>>, m: &mut Model) -> End {
    let mut held = held_before.clone();
    let mut pos = 0;
    let mut closed = false;
    loop {
        m.marks.push(pos);
        let Some(&tag) = link.get(pos) else {
            return End::Truncated;
        };
        pos += 1;
        match tag {
            TAG_END if closed && pos == link.len() => return End::Ok,
            TAG_END => return End::Sequence,
            TAG_MSG => {}
            _ => return End::UnknownTag,
        }
        m.marks.push(pos);
        let Some(h) = link.get(pos..pos + HEADER_LEN) else {
            return End::Truncated;
        };
        pos += HEADER_LEN;
        let Ok(msg) = Message::decode(h.try_into().unwrap()) else {
            return End::BadFrame;
        };
        if closed {
            return End::Sequence;
        }
        if matches!(msg, Message::Get { .. }) {
            return End::Unsupported;
        }
        m.counts.0 += 1;
        m.ps.extend_from_slice(&msg.encode().unwrap());
        let mut left = msg.payload_pages();
        while left > 0 {
            let n = left.min(CHUNK_PAGES as u64);
            let mut chunk = Vec::new();
            for _ in 0..n {
                m.marks.push(pos);
                let Some(&kind) = link.get(pos) else {
                    return End::Truncated;
                };
                pos += 1;
                match kind {
                    PAGE_CONTENT => {
                        let Some(p) = link.get(pos..pos + PAGE_SIZE) else {
                            return End::Truncated;
                        };
                        pos += PAGE_SIZE;
                        held.insert(hash_page(p), p.to_vec());
                        chunk.extend_from_slice(p);
                    }
                    PAGE_REFERENCE => {
                        let Some(h) = link.get(pos..pos + 32) else {
                            return End::Truncated;
                        };
                        pos += 32;
                        let Some(p) = held.get(h) else {
                            return End::NotHeld;
                        };
                        chunk.extend_from_slice(p);
                        m.counts.2 += 1;
                    }
                    _ => return End::UnknownTag,
                }
            }
            m.ps.extend_from_slice(&chunk);
            m.counts.1 += n;
            left -= n;
        }
        if let Some(kind) = msg.reply_kind() {
            m.ps_flushed = m.ps.len();
            m.replies.push(TAG_REPLY);
            m.replies.extend_from_slice(&reply_bytes(kind));
            closed |= kind == ReplyKind::Close;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The destination side under test.

/// An in-memory `criu page-server`: records every byte it reads (headers, pages) and answers
/// OPEN2, PARENT and CLOSE with 0.
async fn fake_page_server(mut s: DuplexStream) -> Vec<u8> {
    let mut seen = Vec::new();
    loop {
        let mut h = [0u8; HEADER_LEN];
        let n = read_up_to(&mut s, &mut h).await;
        seen.extend_from_slice(&h[..n]);
        if n < HEADER_LEN {
            return seen;
        }
        let Ok(msg) = Message::decode(&h) else {
            return seen; // checked against the model by the caller
        };
        for _ in 0..msg.payload_pages() {
            let mut p = [0u8; PAGE_SIZE];
            let n = read_up_to(&mut s, &mut p).await;
            seen.extend_from_slice(&p[..n]);
            if n < PAGE_SIZE {
                return seen;
            }
        }
        if let Some(kind) = msg.reply_kind() {
            let _ = s.write_all(&reply_bytes(kind)).await;
        }
    }
}

async fn read_up_to(s: &mut DuplexStream, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// The destination's pages before the stream, and the store holding them.
#[derive(Debug, Clone)]
struct Held {
    /// Alphabet pages in the store.
    pages: Vec<u8>,
    /// The store's capacity (small ones overflow into the relay's own map).
    cap: usize,
}

impl Held {
    fn store(&self) -> PageStore {
        let mut store = PageStore::new(self.cap);
        for &i in &self.pages {
            let _ = store.insert(&alpha(i));
        }
        store
    }

    fn map(&self) -> HashMap<PageHash, Vec<u8>> {
        let store = self.store();
        store
            .hashes()
            .into_iter()
            .map(|h| (h, store.get(&h).unwrap().to_vec()))
            .collect()
    }
}

fn held() -> impl Strategy<Value = Held> {
    (vec(0..ALPHABET, 0..5), select(vec![0usize, 2, 1000]))
        .prop_map(|(pages, cap)| Held { pages, cap })
}

/// Runs [`relay_in`] on `link` against the in-memory page server, under a timeout; checks it
/// against the model.
fn check_relay_in(
    rt: &tokio::runtime::Runtime,
    link: &[u8],
    held: &Held,
) -> Result<End, TestCaseError> {
    let held_map = held.map();
    let (want, want_end) = model(link, &held_map);
    let mut store = held.store();
    let mut back = Vec::new();
    let run = rt.block_on(async {
        let (ps, relay_ps) = duplex(1 << 16);
        let both = async {
            tokio::join!(
                relay_in(link, &mut back, relay_ps, &mut store),
                fake_page_server(ps)
            )
        };
        tokio::time::timeout(Duration::from_secs(5), both).await
    });
    let Ok((res, seen)) = run else {
        return Err(TestCaseError::fail("relay_in did not end within 5 s"));
    };
    let got_end = end_of(&res);
    prop_assert_eq!(
        got_end,
        Some(want_end),
        "relay_in ended with {:?}, the model with {:?}",
        res,
        want_end
    );

    // The page server got a prefix of what the model writes (never a page that did not arrive
    // or was not held), at least everything up to the last reply, and all of it on success.
    prop_assert!(
        seen.len() <= want.ps.len() && seen[..] == want.ps[..seen.len()],
        "the page server got {} bytes that are not a prefix of the model's {}",
        seen.len(),
        want.ps.len()
    );
    prop_assert!(seen.len() >= want.ps_flushed);

    // The source got the model's replies, then on failure one well-formed ERROR frame.
    prop_assert!(
        back.starts_with(&want.replies),
        "replies differ from the model's"
    );
    let rest = &back[want.replies.len()..];
    match &res {
        Ok(stats) => {
            prop_assert_eq!(seen.len(), want.ps.len());
            prop_assert!(rest.is_empty(), "bytes after the replies on success");
            prop_assert_eq!(
                (stats.messages, stats.pages, stats.pages_as_reference),
                want.counts
            );
            prop_assert_eq!(stats.link_bytes_read, link.len() as u64);
            prop_assert_eq!(stats.link_bytes_written, back.len() as u64);
            prop_assert_eq!(stats.close_status, Some(0));
        }
        Err(e) => {
            prop_assert!(
                rest.len() >= 3 && rest[0] == TAG_ERROR,
                "no ERROR frame: {rest:?}"
            );
            let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
            prop_assert!((1..=MAX_ERROR_LEN).contains(&len));
            prop_assert_eq!(rest.len(), 3 + len);
            let text = std::str::from_utf8(&rest[3..]).expect("error text is not UTF-8");
            prop_assert!(e.to_string().starts_with(text));
        }
    }
    // The store holds only pages under their own hash, within its capacity.
    prop_assert!(store.len() <= held.cap);
    for h in store.hashes() {
        prop_assert_eq!(hash_page(store.get(&h).unwrap()), h);
    }
    check_allocations()?;
    Ok(want_end)
}

/// A link stream: from the source side (possibly with a page the destination lost), mutated,
/// or random bytes.
#[derive(Debug, Clone)]
enum Link {
    Source {
        dump: Dump,
        /// The source also believes the destination holds this page (it does not).
        stale: Option<u8>,
        muts: Vec<Mutation>,
    },
    Random(Vec<u8>),
}

fn link() -> impl Strategy<Value = Link> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..120).prop_map(Link::Random),
        1 => (any::<[u8; HEADER_LEN]>(), vec(any::<u8>(), 0..80)).prop_map(|(h, rest)| {
            let mut b = vec![TAG_MSG];
            b.extend_from_slice(&h);
            b.extend(rest);
            Link::Random(b)
        }),
        2 => (dump(), prop::option::weighted(0.1, 0..ALPHABET)).prop_map(|(dump, stale)| Link::Source { dump, stale, muts: vec![] }),
        6 => (dump(), prop::option::weighted(0.1, 0..ALPHABET), vec(mutation(), 1..4))
            .prop_map(|(dump, stale, muts)| Link::Source { dump, stale, muts }),
    ]
}

/// The bytes of a [`Link`] for a destination holding `held`.
fn link_bytes(rt: &tokio::runtime::Runtime, link: &Link, held: &Held) -> Vec<u8> {
    match link {
        Link::Random(b) => b.clone(),
        Link::Source { dump, stale, muts } => {
            let mut known: HashSet<PageHash> = held.store().hashes();
            if let Some(i) = stale {
                known.insert(hash_page(&alpha(*i)));
            }
            let (bytes, res, _) = rt.block_on(source(dump, &dump.link_replies(), &mut known));
            res.expect("the source side failed on a valid dump");
            let (m, _) = model(&bytes, &held.map());
            mutate(bytes, &m.marks, muts)
        }
    }
}

#[test]
fn fuzz_relay_in() {
    let rt = runtime();
    fuzz("relay_in", (link(), held()), |(link, held)| {
        let bytes = link_bytes(&rt, &link, &held);
        let end = check_relay_in(&rt, &bytes, &held)?;
        // Unmutated streams from the source go through, unless it believed in a page the
        // destination does not hold.
        if let Link::Source { dump, stale, muts } = &link {
            if muts.is_empty() {
                let lost = stale.is_some_and(|i| {
                    !held.map().contains_key(&hash_page(&alpha(i)))
                        && dump
                            .msgs
                            .iter()
                            .any(|(_, p)| p.chunks(PAGE_SIZE).any(|pg| pg == alpha(i)))
                });
                let want = if lost { End::NotHeld } else { End::Ok };
                prop_assert_eq!(end, want, "a valid stream from the source");
            }
        }
        Ok(())
    });
}

/// Every page of a valid dump, as contents or references, at every chunk boundary: the relay
/// rebuilds exactly the dump.
#[test]
fn a_valid_stream_round_trips_through_the_model() {
    let rt = runtime();
    let dst_id = DstId::pid(7).unwrap();
    let nr = CHUNK_PAGES as u64 + 3;
    let add = Message::Add {
        dst_id,
        vaddr: 0x10000,
        nr_pages: nr,
        flags: PageFlags::PRESENT_LAZY,
    };
    let payload: Vec<u8> = (0..nr).flat_map(|n| alpha((n % 3) as u8)).collect();
    let dump = Dump {
        msgs: vec![
            (Message::Open2 { dst_id }, vec![]),
            (add, payload),
            (Message::Close, vec![]),
        ],
    };
    let held = Held {
        pages: vec![1],
        cap: 1000,
    };
    let link = Link::Source {
        dump,
        stale: None,
        muts: vec![],
    };
    let bytes = link_bytes(&rt, &link, &held);
    assert_eq!(check_relay_in(&rt, &bytes, &held).unwrap(), End::Ok);
    let (m, _) = model(&bytes, &held.map());
    // Page 1 was held; pages 0 and 2 crossed once each as contents.
    assert_eq!(m.counts, (3, nr, nr - 2));
}

// ---------------------------------------------------------------------------------------------
// The source side's reply reader.

/// What `relay_out` must hand CRIU from the destination's answers: the reply bytes of every
/// REPLY frame that decodes for its request, up to the first that does not; and how it ends.
fn model_replies(dump: &Dump, back: &[u8]) -> (Vec<u8>, &'static str) {
    let mut got = Vec::new();
    let mut pos = 0;
    // OPEN2 is answered by the relay at once ("no parent image"); the destination's replies to
    // it are read, in order, before the next reply CRIU waits for.
    let mut opened: Vec<Message> = Vec::new();
    for (m, _) in &dump.msgs {
        if m.reply_kind().is_none() {
            continue;
        }
        if let Message::Open2 { .. } = m {
            got.push(0);
            opened.push(*m);
            continue;
        }
        for m in opened.drain(..).chain(std::iter::once(*m)) {
            let Some(&tag) = back.get(pos) else {
                return (got, "truncated");
            };
            pos += 1;
            match tag {
                TAG_REPLY => {
                    let len = reply_len(&m).unwrap();
                    let Some(b) = back.get(pos..pos + len) else {
                        return (got, "truncated");
                    };
                    pos += len;
                    match decode_reply(&m, b) {
                        Err(_) => return (got, "bad frame"),
                        Ok(Reply::Open2 { has_parent: true }) => return (got, "sequence"),
                        Ok(Reply::Open2 { .. }) => {}
                        // (A CLOSE status other than 0 is handed on too: CRIU decides.)
                        Ok(_) => got.extend_from_slice(b),
                    }
                }
                TAG_ERROR => {
                    let Some(l) = back.get(pos..pos + 2) else {
                        return (got, "truncated");
                    };
                    let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
                    if len == 0 || len > MAX_ERROR_LEN {
                        return (got, "sequence");
                    }
                    if back.len() < pos + 2 + len {
                        return (got, "truncated");
                    }
                    return (got, "remote");
                }
                _ => return (got, "unknown tag"),
            }
        }
    }
    (got, "ok")
}

fn reply_end(r: &Result<RelayStats, RelayError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(RelayError::Truncated { .. }) => "truncated",
        Err(RelayError::BadFrame(_)) => "bad frame",
        Err(RelayError::Sequence(_)) => "sequence",
        Err(RelayError::Remote(_)) => "remote",
        Err(RelayError::UnknownTag { .. }) => "unknown tag",
        Err(_) => "other",
    }
}

#[test]
fn fuzz_relay_out_replies() {
    let rt = runtime();
    let input = dump().prop_flat_map(|dump| {
        let valid = dump.link_replies();
        let back = prop_oneof![
            1 => vec(any::<u8>(), 0..16),
            1 => Just(valid.clone()),
            4 => vec(mutation(), 1..3).prop_map(move |muts| {
                let marks: Vec<usize> = (0..valid.len()).collect();
                mutate(valid.clone(), &marks, &muts)
            }),
            1 => (vec(any::<u8>(), 0..40), any::<u16>()).prop_map(|(text, len)| {
                let mut b = vec![TAG_ERROR];
                b.extend_from_slice(&len.to_be_bytes());
                b.extend(text);
                b
            }),
        ];
        (Just(dump), back)
    });
    fuzz("relay_out replies", input, |(dump, back)| {
        let mut known = HashSet::new();
        let run = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), source(&dump, &back, &mut known)).await
        });
        let Ok((_, res, criu_got)) = run else {
            return Err(TestCaseError::fail("relay_out did not end within 5 s"));
        };
        let (want, want_end) = model_replies(&dump, &back);
        prop_assert_eq!(reply_end(&res), want_end, "{:?}", res);
        prop_assert_eq!(
            criu_got,
            want,
            "CRIU got other replies than the destination sent"
        );
        if let Err(RelayError::Remote(text)) = &res {
            prop_assert!(text.len() <= 3 * MAX_ERROR_LEN);
        }
        check_allocations()
    });
}

// ---------------------------------------------------------------------------------------------
// Regressions: the exact inputs the fuzz tests above found.

/// Found by `fuzz_relay_in`: the source's whole stream for a dump of OPEN2 and CLOSE, sent
/// twice (a `Duplicate` of the whole stream at offset 0). `relay_in` returned success at the
/// first END and never looked at the rest, although nothing may follow END.
#[test]
fn regression_data_after_end_is_refused() {
    let rt = runtime();
    let dst_id = DstId::pid(100).unwrap();
    let mut once = Vec::new();
    for m in [Message::Open2 { dst_id }, Message::Close] {
        once.push(TAG_MSG);
        once.extend_from_slice(&m.encode().unwrap());
    }
    once.push(TAG_END);
    let held = Held {
        pages: vec![],
        cap: 0,
    };
    let dump = Dump {
        msgs: vec![
            (Message::Open2 { dst_id }, vec![]),
            (Message::Close, vec![]),
        ],
    };
    let from_source = Link::Source {
        dump,
        stale: None,
        muts: vec![],
    };
    assert_eq!(link_bytes(&rt, &from_source, &held), once);
    assert_eq!(check_relay_in(&rt, &once, &held).unwrap(), End::Ok);

    let twice = [once.clone(), once].concat();
    assert_eq!(twice.len(), 134);
    assert_eq!(check_relay_in(&rt, &twice, &held).unwrap(), End::Sequence);
    let mut store = held.store();
    let mut back = Vec::new();
    let res = rt.block_on(async {
        let (ps, relay_ps) = duplex(1 << 16);
        let (res, _) = tokio::join!(
            relay_in(&twice[..], &mut back, relay_ps, &mut store),
            fake_page_server(ps)
        );
        res
    });
    let err = res.unwrap_err();
    assert_eq!(
        err.to_string(),
        "relay link: data after the END frame (a byte 0x01)"
    );
}
