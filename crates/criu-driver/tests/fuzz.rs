//! Property-based and mutation ("fuzz") tests of criu-driver's parsers of untrusted input:
//!
//! * [`rpc`]: reading and rewriting runc's encoded `criu_req` (random bytes, requests built
//!   here field by field, and mutations of both). The oracle is an independent protobuf
//!   tokenizer below that computes what CRIU (protobuf-c) reads from the same bytes: the last
//!   occurrence of a scalar wins, repeated `opts` are merged, int32 and enum fields are the low
//!   32 bits of their varint, a bool is set by any bit of its varint.
//! * [`page_server`]: header decoding, replies, the blocking and async stream readers and the
//!   proxy ([`proxy_io`]) fed random and mutated streams of a valid dump.
//!
//! Everything is in memory (no CRIU, no sockets). Every proptest is bounded (256 cases, 1000
//! shrink iterations) and persists nothing; bugs found are kept as plain regression tests at
//! the end of the file, with the exact input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criu_driver::page_server::{
    decode_reply, proxy_io, read_message, read_message_async, read_payload, read_payload_async,
    read_reply, read_reply_async, reply_len, DstId, Message, PageFlags, ProtocolError, ProxyError,
    ProxyOptions, Reply, ReplyKind, ADDRESS_LIMIT, HEADER_LEN, MAX_PAYLOAD_PAGES, PAGE_SIZE,
};
use criu_driver::rpc::{self, opt};
use criu_driver::swrk_proxy::is_relayable;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{TestCaseError, TestRunner};

// ---------------------------------------------------------------------------------------------
// Harness: bounded runs, allocation tracking, mutations.

/// The largest single allocation any test here may cause (the proxy's payload buffer is at most
/// 256 pages, 1 MiB; inputs stay well below).
const ALLOC_CAP: usize = 2 << 20;
/// Allocations above this fail outright (the test process aborts) instead of being attempted.
const ALLOC_REFUSE: usize = 256 << 20;

thread_local! {
    /// The largest allocation of this thread since [`reset_allocations`].
    static LARGEST_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn reset_allocations() {
    LARGEST_ALLOC.with(|l| l.set(0));
}

fn largest_allocation() -> usize {
    LARGEST_ALLOC.with(Cell::get)
}

/// Records the size of every allocation; refuses absurd ones.
struct Tracking;

fn note_alloc(size: usize) -> bool {
    // A const-initialised Cell: no allocation, no destructor; ignored while the thread exits.
    let _ = LARGEST_ALLOC.try_with(|l| l.set(l.get().max(size)));
    size <= ALLOC_REFUSE
}

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
    let largest = largest_allocation();
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

/// Where a mutation applies: anywhere, or near a structural mark (a header, a field key).
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
        any::<Index>().prop_map(At::Any),
        (any::<Index>(), 0..40u8).prop_map(|(i, d)| At::Mark(i, d)),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (at(), 1..=255u8).prop_map(|(a, m)| Mutation::Flip(a, m)),
        2 => (at(), select(vec![0u8, 1, 2, 0x7f, 0x80, 0xff, 0x08, 0x12, 0x5a])).prop_map(|(a, b)| Mutation::Set(a, b)),
        2 => (at(), vec(any::<u8>(), 1..12)).prop_map(|(a, b)| Mutation::Insert(a, b)),
        2 => (at(), 1..40usize).prop_map(|(a, n)| Mutation::Delete(a, n)),
        1 => at().prop_map(Mutation::Truncate),
        1 => (at(), 1..64usize).prop_map(|(a, n)| Mutation::Duplicate(a, n)),
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
// CRIU RPC: an independent protobuf model.

/// A protobuf varint: (value, bytes used), bits beyond 64 dropped (as protobuf-c's uint64).
fn pb_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint encoding of `v`: canonical (style 0), padded with redundant continuation bytes
/// (1), or 10 bytes with bits set beyond the 64th (2).
fn varint_styled(v: u64, style: u8, pad: usize) -> Vec<u8> {
    let mut b = Vec::new();
    put_varint(&mut b, v);
    if style == 0 {
        return b;
    }
    let target = if style == 1 {
        (b.len() + pad).min(10)
    } else {
        10
    };
    while b.len() < target {
        *b.last_mut().unwrap() |= 0x80;
        b.push(0);
    }
    if style == 2 {
        b[9] |= 0x02;
    }
    b
}

fn key(number: u64, wire: u8) -> Vec<u8> {
    let mut b = Vec::new();
    put_varint(&mut b, number << 3 | u64::from(wire));
    b
}

fn varint_field(number: u64, value: &[u8]) -> Vec<u8> {
    let mut b = key(number, 0);
    b.extend_from_slice(value);
    b
}

fn bytes_field(number: u64, value: &[u8]) -> Vec<u8> {
    let mut b = key(number, 2);
    put_varint(&mut b, value.len() as u64);
    b.extend_from_slice(value);
    b
}

/// Whether a (well-formed) varint has bits beyond the 64th: protobuf-c reads it, Ferry
/// refuses the request.
fn pb_overflows(b: &[u8]) -> bool {
    pb_varint(b).is_some_and(|(_, n)| n == 10 && b[9] & 0x7e != 0)
}

/// One field as the wire format splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PbField {
    number: u64,
    wire: u8,
    whole: Vec<u8>,
    value: Vec<u8>,
    /// Its key, length or varint value overflows 64 bits.
    overflow: bool,
}

fn pb_parse(b: &[u8]) -> Option<Vec<PbField>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let (k, n) = pb_varint(&b[i..])?;
        let mut overflow = pb_overflows(&b[i..]);
        i += n;
        overflow |= pb_overflows(&b[i..]) && (k & 7 == 0 || k & 7 == 2);
        let wire = (k & 7) as u8;
        let (vs, ve) = match wire {
            0 => (i, i + pb_varint(&b[i..])?.1),
            1 => (i, i.checked_add(8)?),
            5 => (i, i.checked_add(4)?),
            2 => {
                let (len, n) = pb_varint(&b[i..])?;
                (i + n, (i + n).checked_add(usize::try_from(len).ok()?)?)
            }
            _ => return None,
        };
        if ve > b.len() {
            return None;
        }
        i = ve;
        out.push(PbField {
            number: k >> 3,
            wire,
            whole: b[start..ve].to_vec(),
            value: b[vs..ve].to_vec(),
            overflow,
        });
    }
    Some(out)
}

/// What CRIU reads from a varint field: as uint64 (bits beyond 64 dropped), as int32 (the low
/// 32 bits), as bool (any bit set, protobuf-c's `parse_boolean`).
fn as_u64(value: &[u8]) -> u64 {
    pb_varint(value).map_or(0, |v| v.0)
}

fn as_int32(value: &[u8]) -> i32 {
    as_u64(value) as u32 as i32
}

fn as_bool(value: &[u8]) -> bool {
    value.iter().any(|b| b & 0x7f != 0)
}

/// CRIU's view of a `criu_req`: its top-level fields, and `opts` merged from every occurrence.
#[derive(Debug)]
struct View {
    top: Vec<PbField>,
    opts_count: usize,
    opts: Vec<PbField>,
}

impl View {
    fn of(req: &[u8]) -> Option<View> {
        let top = pb_parse(req)?;
        let mut opts = Vec::new();
        let mut opts_count = 0;
        for f in top.iter().filter(|f| f.number == 2 && f.wire == 2) {
            opts_count += 1;
            opts.extend(pb_parse(&f.value)?);
        }
        Some(View {
            top,
            opts_count,
            opts,
        })
    }

    /// `type` as CRIU reads the enum.
    fn req_type(&self) -> Option<u64> {
        top_type(&self.top)
    }

    /// The request as runc sends it: one `opts`, no varint beyond 64 bits. Ferry must read
    /// and rewrite these; it may refuse others.
    fn plain(&self) -> bool {
        self.opts_count == 1 && !self.top.iter().chain(&self.opts).any(|f| f.overflow)
    }

    fn last_opt(&self, number: u64, wire: u8) -> Option<&PbField> {
        self.opts
            .iter()
            .rev()
            .find(|f| f.number == number && f.wire == wire)
    }

    fn non_opts(&self) -> Vec<&PbField> {
        self.top
            .iter()
            .filter(|f| !(f.number == 2 && f.wire == 2))
            .collect()
    }
}

fn top_type(top: &[PbField]) -> Option<u64> {
    top.iter()
        .rev()
        .find(|f| f.number == 1 && f.wire == 0)
        .map(|f| u64::from(as_int32(&f.value) as u32))
}

/// The option fields Ferry reads or rewrites, and a few others.
const OPT_NUMBERS: [u64; 10] = [
    opt::IMAGES_DIR_FD,
    opt::PID,
    opt::LOG_FILE,
    opt::PS,
    opt::WORK_DIR_FD,
    opt::LAZY_PAGES,
    opt::STATUS_FD,
    opt::PIDFD_STORE_SK,
    3,
    63,
];

fn value_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..16u64,
        2 => 0..=i32::MAX as u64,
        1 => (i32::MIN..0).prop_map(|v| v as i64 as u64),
        1 => (0..=u32::MAX as u64).prop_map(|v| v | 1 << 32),
        1 => any::<u64>(),
    ]
}

/// (style, pad) of a varint encoding: mostly canonical.
fn style() -> impl Strategy<Value = (u8, usize)> {
    prop_oneof![6 => Just((0u8, 0usize)), 2 => (Just(1u8), 1..6usize), 1 => Just((2u8, 0usize))]
}

fn opt_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => select(OPT_NUMBERS.to_vec()),
        1 => 1..200u64,
        1 => 1..(1u64 << 29),
    ]
}

/// `criu_page_server_info` as runc sends it (address, port), maybe with more.
fn ps_info() -> impl Strategy<Value = Vec<u8>> {
    (
        select(vec![&b"127.0.0.1"[..], b"10.0.0.2", b"", b"::1"]),
        0..70000u64,
        prop::option::weighted(0.2, value_u64()),
    )
        .prop_map(|(addr, port, fd)| {
            let mut b = bytes_field(1, addr);
            b.extend(varint_field(2, &varint_styled(port, 0, 0)));
            if let Some(fd) = fd {
                b.extend(varint_field(4, &varint_styled(fd, 0, 0)));
            }
            b
        })
}

fn opt_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        5 => (opt_number(), value_u64(), style())
            .prop_map(|(n, v, (s, p))| varint_field(n, &varint_styled(v, s, p))),
        2 => (opt_number(), vec(any::<u8>(), 0..12)).prop_map(|(n, v)| bytes_field(n, &v)),
        1 => (opt_number(), any::<[u8; 8]>()).prop_map(|(n, v)| [key(n, 1), v.to_vec()].concat()),
        1 => (opt_number(), any::<[u8; 4]>()).prop_map(|(n, v)| [key(n, 5), v.to_vec()].concat()),
        2 => ps_info().prop_map(|p| bytes_field(opt::PS, &p)),
    ]
}

fn type_field() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![4 => Just(rpc::REQ_DUMP), 1 => 0..14u64, 1 => value_u64()],
        style(),
    )
        .prop_map(|(t, (s, p))| varint_field(1, &varint_styled(t, s, p)))
}

fn top_extra() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (3..8u64, 0..2u64).prop_map(|(n, v)| varint_field(n, &[v as u8])),
        (3..40u64, vec(any::<u8>(), 0..6)).prop_map(|(n, v)| bytes_field(n, &v)),
    ]
}

/// A request built field by field: type, opts (usually with pid and ps), extras, and now and
/// then a second type or a second opts; in a shuffled order.
fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        type_field(),
        vec(opt_piece(), 0..8),
        prop::option::weighted(0.7, ps_info()),
        prop::option::weighted(0.8, (1..100000u64, style())),
        vec(top_extra(), 0..3),
        prop::option::weighted(0.15, vec(opt_piece(), 0..3)),
        prop::option::weighted(0.15, type_field()),
        any::<u64>(),
    )
        .prop_map(|(ty, opts, ps, pid, extras, opts2, ty2, order)| {
            let mut o: Vec<Vec<u8>> = opts;
            if let Some((pid, (s, p))) = pid {
                o.push(varint_field(opt::PID, &varint_styled(pid, s, p)));
            }
            if let Some(ps) = ps {
                o.push(bytes_field(opt::PS, &ps));
            }
            shuffle(&mut o, order);
            let mut top = vec![ty, bytes_field(2, &o.concat())];
            top.extend(extras);
            if let Some(o2) = opts2 {
                top.push(bytes_field(2, &o2.concat()));
            }
            if let Some(t) = ty2 {
                top.push(t);
            }
            // runc puts type and opts first; shuffle the rest only sometimes.
            if order % 4 == 0 {
                shuffle(&mut top, order >> 8);
            }
            top.concat()
        })
}

fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// The options of runc's dump to a page server.
fn runc_dump_opts() -> Vec<u8> {
    let mut ps = bytes_field(1, b"127.0.0.1");
    ps.extend(varint_field(2, &varint_styled(7000, 0, 0)));
    let mut opts = varint_field(opt::IMAGES_DIR_FD, &[5]);
    opts.extend(varint_field(opt::PID, &varint_styled(123_456, 0, 0)));
    opts.extend(varint_field(5, &[1])); // tcp_established
    opts.extend(bytes_field(opt::LOG_FILE, b"dump.log"));
    opts.extend(bytes_field(opt::PS, &ps));
    opts.extend(varint_field(opt::WORK_DIR_FD, &[6]));
    opts
}

/// runc's dump with more option fields after its own.
fn runc_dump_with(extra: &[Vec<u8>]) -> Vec<u8> {
    let opts = [runc_dump_opts(), extra.concat()].concat();
    let mut req = varint_field(1, &[rpc::REQ_DUMP as u8]);
    req.extend(bytes_field(2, &opts));
    req.extend(varint_field(3, &[1])); // notify_success
    req
}

/// Requests as runc sends them.
fn seed_requests() -> Vec<Vec<u8>> {
    let opts = runc_dump_opts();
    let mut dump = varint_field(1, &[rpc::REQ_DUMP as u8]);
    dump.extend(bytes_field(2, &opts));
    dump.extend(varint_field(3, &[1])); // notify_success
    let mut lazy = opts.clone();
    lazy.extend(varint_field(opt::LAZY_PAGES, &[1]));
    let mut lazy_dump = varint_field(1, &[rpc::REQ_DUMP as u8]);
    lazy_dump.extend(bytes_field(2, &lazy));
    let mut restore = varint_field(1, &[2]);
    restore.extend(bytes_field(2, &opts));
    vec![
        dump,
        lazy_dump,
        restore,
        varint_field(1, &[rpc::REQ_VERSION as u8]),
    ]
}

fn rpc_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..48),
        3 => request(),
        4 => (request(), vec(mutation(), 1..4)).prop_map(|(r, m)| mutate_request(r, &m)),
        2 => (select(seed_requests()), vec(mutation(), 0..4)).prop_map(|(r, m)| mutate_request(r, &m)),
        2 => vec(
            (
                select(vec![opt::LAZY_PAGES, opt::PID, opt::STATUS_FD, opt::PIDFD_STORE_SK, opt::IMAGES_DIR_FD]),
                prop_oneof![Just(0u64), Just(1), value_u64()],
                prop_oneof![Just((0u8, 0usize)), (Just(1u8), 1..6usize), Just((2u8, 0usize))],
            ),
            1..3,
        )
        .prop_map(|extra| {
            let extra: Vec<Vec<u8>> = extra
                .into_iter()
                .map(|(n, v, (s, p))| varint_field(n, &varint_styled(v, s, p)))
                .collect();
            runc_dump_with(&extra)
        }),
    ]
}

/// Mutates a request, with the field boundaries (top level and in opts) as marks.
fn mutate_request(req: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    let mut marks = Vec::new();
    if let Some(top) = pb_parse(&req) {
        let mut at = 0;
        for f in &top {
            marks.push(at);
            if f.number == 2 && f.wire == 2 {
                let start = at + f.whole.len() - f.value.len();
                let mut inner = start;
                for g in pb_parse(&f.value).unwrap_or_default() {
                    marks.push(inner);
                    inner += g.whole.len();
                }
            }
            at += f.whole.len();
        }
    }
    mutate(req, &marks, muts)
}

/// Checks every reader of `rpc` against the model on `req`.
fn check_rpc_readers(req: &[u8]) -> Result<(), TestCaseError> {
    let view = View::of(req);
    let top = pb_parse(req);

    let t = rpc::request_type(req);
    if let Some(t) = t {
        prop_assert!(top.is_some(), "request_type {t} of a malformed request");
    }
    if let Some(top) = top.as_ref().filter(|top| !top.iter().any(|f| f.overflow)) {
        prop_assert_eq!(t, top_type(top), "request_type is not what CRIU reads");
    }

    // The requests that runc sends: the readers must find everything.
    let plain = view.as_ref().is_some_and(View::plain);
    for n in OPT_NUMBERS {
        let want = view.as_ref().and_then(|v| v.last_opt(n, 0));
        let got = rpc::opts_varint(req, n);
        if let Some(got) = got {
            prop_assert!(
                want.is_some(),
                "opts_varint({n}) = {got} but CRIU sees no such field"
            );
            prop_assert_eq!(
                Some(got),
                want.map(|f| as_u64(&f.value)),
                "opts_varint({})",
                n
            );
        } else if plain {
            prop_assert!(want.is_none(), "opts_varint({n}) missed a field");
        }

        let fd = rpc::opts_fd(req, n);
        let criu_fd = want.map(|f| as_int32(&f.value));
        if let Some(fd) = fd {
            prop_assert!(fd >= 0);
            prop_assert_eq!(Some(fd), criu_fd, "opts_fd({}) is not what CRIU reads", n);
        } else if plain {
            prop_assert!(
                !matches!(criu_fd, Some(v) if v >= 0),
                "opts_fd({n}) = None, CRIU reads descriptor {criu_fd:?}"
            );
        }

        let want = view.as_ref().and_then(|v| v.last_opt(n, 2));
        let got = rpc::opts_bytes(req, n);
        if let Some(got) = got {
            prop_assert_eq!(Some(got), want.map(|f| &f.value[..]), "opts_bytes({})", n);
        } else if plain {
            prop_assert!(want.is_none(), "opts_bytes({n}) missed a field");
        }
    }

    if is_relayable(req) {
        let v = view.as_ref().expect("relayable, yet malformed");
        prop_assert_eq!(
            v.req_type(),
            Some(rpc::REQ_DUMP),
            "relayable, CRIU sees no DUMP"
        );
        prop_assert!(v.last_opt(opt::PS, 2).is_some(), "relayable without ps");
        prop_assert!(
            !v.last_opt(opt::LAZY_PAGES, 0)
                .is_some_and(|f| as_bool(&f.value)),
            "relayable, but CRIU reads lazy_pages = true"
        );
        let pid = v.last_opt(opt::PID, 0).map(|f| as_int32(&f.value));
        prop_assert!(
            pid.is_some_and(|p| p > 0),
            "relayable, CRIU reads pid {pid:?}"
        );
        // (With another wire type, protobuf-c refuses the whole request.)
        prop_assert!(
            v.last_opt(opt::STATUS_FD, 0).is_none(),
            "relayable with status_fd"
        );
        prop_assert!(
            v.last_opt(opt::PIDFD_STORE_SK, 0).is_none(),
            "relayable with pidfd_store_sk"
        );
    }
    Ok(())
}

/// The opts of `v` other than `skip`, in order.
fn opts_except(v: &View, skip: impl Fn(&PbField) -> bool) -> Vec<PbField> {
    v.opts.iter().filter(|f| !skip(f)).cloned().collect()
}

fn check_with_opts_varint(req: &[u8], number: u64, value: u64) -> Result<(), TestCaseError> {
    let before = View::of(req);
    let out = rpc::with_opts_varint(req, number, value);
    let present = before
        .as_ref()
        .is_some_and(|v| v.plain() && v.last_opt(number, 0).is_some());
    let Some(out) = out else {
        prop_assert!(
            !present,
            "with_opts_varint refused a plain request with the field"
        );
        return Ok(());
    };
    let before = before.expect("rewrote a malformed request");
    prop_assert!(
        before.last_opt(number, 0).is_some(),
        "with_opts_varint added a field"
    );
    let after = View::of(&out).expect("the rewrite does not parse");
    // CRIU reads the new value, once.
    let fields: Vec<_> = after
        .opts
        .iter()
        .filter(|f| f.number == number && f.wire == 0)
        .collect();
    prop_assert_eq!(fields.len(), 1);
    prop_assert_eq!(as_u64(&fields[0].value), value);
    prop_assert_eq!(after.opts_count, 1);
    // Everything else is unchanged, in order.
    let is_it = |f: &PbField| f.number == number && f.wire == 0;
    prop_assert_eq!(opts_except(&after, is_it), opts_except(&before, is_it));
    prop_assert_eq!(after.non_opts(), before.non_opts());
    // And the module reads the same.
    prop_assert_eq!(rpc::opts_varint(&out, number), Some(value));
    prop_assert_eq!(rpc::request_type(&out), rpc::request_type(req));
    for n in OPT_NUMBERS {
        prop_assert_eq!(rpc::opts_bytes(&out, n), rpc::opts_bytes(req, n));
        if n != number {
            prop_assert_eq!(rpc::opts_varint(&out, n), rpc::opts_varint(req, n));
        }
    }
    Ok(())
}

fn check_dump_with_page_server_fd(req: &[u8], fd: i32) -> Result<(), TestCaseError> {
    let before = View::of(req);
    let out = rpc::dump_with_page_server_fd(req, fd);
    let eligible = fd >= 0
        && before.as_ref().is_some_and(|v| {
            v.plain() && v.req_type() == Some(rpc::REQ_DUMP) && v.last_opt(opt::PS, 2).is_some()
        });
    let Some(out) = out else {
        prop_assert!(!eligible, "a plain DUMP with ps was not rewritten");
        return Ok(());
    };
    prop_assert!(fd >= 0);
    let before = before.expect("rewrote a malformed request");
    prop_assert_eq!(before.req_type(), Some(rpc::REQ_DUMP), "rewrote a non-DUMP");
    let after = View::of(&out).expect("the rewrite does not parse");
    prop_assert_eq!(after.req_type(), Some(rpc::REQ_DUMP));
    prop_assert_eq!(after.opts_count, 1);
    // CRIU's merged ps: the descriptor and nothing else.
    let mut ps = Vec::new();
    for f in after.opts.iter().filter(|f| f.number == opt::PS) {
        prop_assert_eq!(f.wire, 2);
        ps.extend(pb_parse(&f.value).expect("ps does not parse"));
    }
    prop_assert!(!ps.is_empty());
    for f in &ps {
        prop_assert_eq!((f.number, f.wire), (4, 0));
        prop_assert_eq!(as_int32(&f.value), fd);
    }
    let is_ps = |f: &PbField| f.number == opt::PS;
    prop_assert_eq!(opts_except(&after, is_ps), opts_except(&before, is_ps));
    prop_assert_eq!(after.non_opts(), before.non_opts());
    for n in OPT_NUMBERS.into_iter().filter(|&n| n != opt::PS) {
        prop_assert_eq!(rpc::opts_varint(&out, n), rpc::opts_varint(req, n));
        prop_assert_eq!(rpc::opts_bytes(&out, n), rpc::opts_bytes(req, n));
    }
    Ok(())
}

#[test]
fn fuzz_rpc_readers() {
    fuzz("rpc readers", rpc_input(), |req| {
        check_rpc_readers(&req)?;
        check_allocations()
    });
}

#[test]
fn fuzz_rpc_with_opts_varint() {
    let number = prop_oneof![4 => select(OPT_NUMBERS.to_vec()), 1 => any::<u64>()];
    fuzz(
        "rpc with_opts_varint",
        (rpc_input(), number, value_u64()),
        |(req, n, v)| {
            check_with_opts_varint(&req, n, v)?;
            // The rewrite composes with the page-server one, as ferry-criu uses them.
            if let Some(out) = rpc::with_opts_varint(&req, n, v) {
                check_dump_with_page_server_fd(&out, 9)?;
            }
            check_allocations()
        },
    );
}

#[test]
fn fuzz_rpc_dump_with_page_server_fd() {
    let fd = prop_oneof![3 => 0..1024i32, 1 => any::<i32>()];
    fuzz(
        "rpc dump_with_page_server_fd",
        (rpc_input(), fd),
        |(req, fd)| {
            check_dump_with_page_server_fd(&req, fd)?;
            check_allocations()
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Page-server protocol.

fn pid_id() -> impl Strategy<Value = u32> {
    prop_oneof![1..100_000u32, Just(i32::MAX as u32)]
}

fn dst_id() -> impl Strategy<Value = DstId> {
    prop_oneof![
        pid_id().prop_map(|p| DstId::pid(p).unwrap()),
        prop_oneof![0..1000u64, Just((1u64 << 56) - 1)].prop_map(|s| DstId::shmem(s).unwrap()),
    ]
}

/// (vaddr, nr_pages) inside the address space, with boundary values.
fn range(max_pages: u64) -> impl Strategy<Value = (u64, u64)> {
    let top = ADDRESS_LIMIT / PAGE_SIZE as u64;
    prop_oneof![
        (0..1u64 << 20, 1..=8u64),
        (0..top, 1..=max_pages),
        (1..=max_pages).prop_map(move |n| (top - n, n)),
    ]
    .prop_map(|(page, n)| (page * PAGE_SIZE as u64, n))
    .prop_filter("inside the address space", move |&(v, n)| {
        v + n * PAGE_SIZE as u64 <= ADDRESS_LIMIT
    })
}

/// Any valid message.
fn message() -> impl Strategy<Value = Message> {
    let flags = select(vec![
        PageFlags::PRESENT,
        PageFlags::PRESENT_LAZY,
        PageFlags::LAZY,
        PageFlags::PARENT,
    ]);
    prop_oneof![
        dst_id().prop_map(|dst_id| Message::Open { dst_id }),
        dst_id().prop_map(|dst_id| Message::Open2 { dst_id }),
        dst_id().prop_map(|dst_id| Message::Parent { dst_id }),
        (dst_id(), range(MAX_PAYLOAD_PAGES), flags).prop_map(
            |(dst_id, (vaddr, nr_pages), flags)| {
                Message::Add {
                    dst_id,
                    vaddr,
                    nr_pages,
                    flags,
                }
            }
        ),
        (dst_id(), range(MAX_PAYLOAD_PAGES)).prop_map(|(dst_id, (vaddr, nr_pages))| {
            Message::AddPresent {
                dst_id,
                vaddr,
                nr_pages,
            }
        }),
        (dst_id(), range(1 << 40)).prop_map(|(dst_id, (vaddr, nr_pages))| Message::Hole {
            dst_id,
            vaddr,
            nr_pages,
        }),
        (pid_id(), range(MAX_PAYLOAD_PAGES)).prop_map(|(pid, (vaddr, nr_pages))| Message::Get {
            pid,
            vaddr,
            nr_pages,
        }),
        Just(Message::Close),
        Just(Message::ForceClose),
    ]
}

/// The header fields a mutation may set to a boundary value.
fn interesting_u64() -> impl Strategy<Value = u64> {
    select(vec![
        0,
        1,
        2,
        0x101,
        0x102,
        0x103,
        PAGE_SIZE as u64,
        MAX_PAYLOAD_PAGES,
        MAX_PAYLOAD_PAGES + 1,
        ADDRESS_LIMIT,
        ADDRESS_LIMIT - PAGE_SIZE as u64,
        (i32::MAX as u64) << 8 | 1,
        (i32::MAX as u64 + 1) << 8 | 1,
        u64::MAX,
        u64::MAX / PAGE_SIZE as u64 + 1,
    ])
}

fn header_input() -> impl Strategy<Value = [u8; HEADER_LEN]> {
    prop_oneof![
        1 => any::<[u8; HEADER_LEN]>(),
        2 => (message(), vec((0..HEADER_LEN, 1..=255u8), 1..4)).prop_map(|(m, flips)| {
            let mut b = m.encode().unwrap();
            for (i, x) in flips {
                b[i] ^= x;
            }
            b
        }),
        2 => (message(), 0..4usize, interesting_u64()).prop_map(|(m, field, v)| {
            let mut b = m.encode().unwrap();
            match field {
                0 => b[0..4].copy_from_slice(&(v as u32).to_ne_bytes()),
                f => b[f * 8..f * 8 + 8].copy_from_slice(&v.to_ne_bytes()),
            }
            b
        }),
        1 => (select(vec![1u32, 2, 3, 4, 5, 6, 7, 0x1023, 0x1024, 0, 8, 0x1025]), 0..8u32, interesting_u64(), interesting_u64(), interesting_u64())
            .prop_map(|(cmd, flags, nr, vaddr, dst)| {
                let mut b = [0u8; HEADER_LEN];
                b[0..4].copy_from_slice(&(cmd | flags << 16).to_ne_bytes());
                b[8..16].copy_from_slice(&nr.to_ne_bytes());
                b[16..24].copy_from_slice(&vaddr.to_ne_bytes());
                b[24..32].copy_from_slice(&dst.to_ne_bytes());
                b
            }),
    ]
}

/// Errors a header can be refused with.
fn is_header_error(e: &ProtocolError) -> bool {
    matches!(
        e,
        ProtocolError::UnknownCommand { .. }
            | ProtocolError::UnexpectedFlags { .. }
            | ProtocolError::UnknownFlags { .. }
            | ProtocolError::BadFlagCombination { .. }
            | ProtocolError::NonZeroField { .. }
            | ProtocolError::NoPages { .. }
            | ProtocolError::TooManyPages { .. }
            | ProtocolError::Unaligned { .. }
            | ProtocolError::OutOfRange { .. }
            | ProtocolError::BadDstId { .. }
    )
}

/// A decoded message is valid, bounded, and re-encodes to the same bytes (padding zeroed).
fn check_decoded(b: &[u8; HEADER_LEN], m: &Message) -> Result<(), TestCaseError> {
    prop_assert!(m.validate().is_ok(), "decoded {m:?} does not validate");
    let enc = m.encode().expect("a decoded message does not encode");
    prop_assert_eq!(&enc[..4], &b[..4]);
    prop_assert_eq!(&enc[4..8], &[0u8; 4]);
    prop_assert_eq!(&enc[8..], &b[8..]);
    prop_assert!(m.payload_pages() <= MAX_PAYLOAD_PAGES);
    if let Some((vaddr, nr)) = m.range() {
        prop_assert!(nr >= 1 && vaddr % PAGE_SIZE as u64 == 0);
        prop_assert!(vaddr + nr * PAGE_SIZE as u64 <= ADDRESS_LIMIT);
    }
    if let Some(d) = m.dst_id() {
        prop_assert_eq!(DstId::from_raw(d.raw()).ok(), Some(d));
    }
    let pieces: Vec<Message> = m.payload_pieces(256).take(5000).collect();
    let total: u64 = pieces.iter().map(Message::payload_pages).sum();
    prop_assert_eq!(total, m.payload_pages());
    prop_assert!(pieces.iter().all(|p| p.payload_pages() <= 256));
    Ok(())
}

#[test]
fn fuzz_page_server_header_decode() {
    fuzz("page-server Message::decode", header_input(), |b| {
        match Message::decode(&b) {
            Ok(m) => check_decoded(&b, &m)?,
            Err(e) => {
                prop_assert!(is_header_error(&e), "untyped header error {e:?}");
                prop_assert!(!e.to_string().is_empty());
            }
        }
        check_allocations()
    });
}

#[test]
fn fuzz_page_server_valid_messages_round_trip() {
    fuzz("page-server encode/decode", message(), |m| {
        let b = m.encode().expect("a valid message does not encode");
        prop_assert_eq!(Message::decode(&b).ok(), Some(m));
        Ok(())
    });
}

fn reply_for(request: &Message) -> BoxedStrategy<Reply> {
    match *request {
        Message::Open2 { .. } => any::<bool>()
            .prop_map(|has_parent| Reply::Open2 { has_parent })
            .boxed(),
        Message::Parent { .. } => any::<bool>()
            .prop_map(|has_parent| Reply::Parent { has_parent })
            .boxed(),
        Message::Close | Message::ForceClose => prop_oneof![Just(0i32), any::<i32>()]
            .prop_map(|status| Reply::Close { status })
            .boxed(),
        Message::Get {
            pid,
            vaddr,
            nr_pages,
        } => (1..=nr_pages)
            .prop_map(move |n| Reply::Pages {
                pid,
                vaddr,
                nr_pages: n,
            })
            .boxed(),
        _ => Just(Reply::Close { status: 0 }).boxed(),
    }
}

fn reply_input() -> impl Strategy<Value = (Message, Vec<u8>)> {
    message().prop_flat_map(|m| {
        let valid = reply_for(&m).prop_map(|r| {
            let (b, len) = r.encode().unwrap();
            b[..len].to_vec()
        });
        let bytes = prop_oneof![
            1 => vec(any::<u8>(), 0..40),
            2 => valid.clone(),
            3 => (valid, vec(mutation(), 1..3)).prop_map(|(b, muts)| mutate(b, &[0], &muts)),
        ];
        (Just(m), bytes)
    })
}

#[test]
fn fuzz_page_server_replies() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    fuzz("page-server replies", reply_input(), |(req, bytes)| {
        match decode_reply(&req, &bytes) {
            Ok(r) => {
                prop_assert_eq!(Some(r.kind()), req.reply_kind());
                let (enc, len) = r.encode().expect("a decoded reply does not encode");
                prop_assert_eq!(len, bytes.len());
                if r.kind() == ReplyKind::Pages {
                    prop_assert_eq!(&enc[..4], &bytes[..4]);
                    prop_assert_eq!(&enc[8..], &bytes[8..]);
                } else {
                    prop_assert_eq!(&enc[..len], &bytes[..]);
                }
                prop_assert!(
                    r.payload_len()
                        <= req
                            .payload_len()
                            .max(req.range().map_or(0, |r| r.1) * PAGE_SIZE as u64)
                );
            }
            Err(e) => prop_assert!(
                matches!(
                    e,
                    ProtocolError::BadReply { .. } | ProtocolError::ReplyMismatch { .. }
                ),
                "untyped reply error {e:?}"
            ),
        }
        // The stream readers, blocking and async, agree with each other and with decode_reply.
        let sync = read_reply(&mut Cursor::new(&bytes), &req);
        let asynch = rt.block_on(read_reply_async(&mut &bytes[..], &req));
        prop_assert_eq!(format!("{sync:?}"), format!("{asynch:?}"));
        match (reply_len(&req), sync) {
            (Err(_), r) => prop_assert!(
                matches!(r, Err(ProtocolError::ReplyMismatch { .. })),
                "{r:?}"
            ),
            (Ok(_), Err(ProtocolError::NoReply { .. })) => prop_assert!(bytes.is_empty()),
            (Ok(len), Err(ProtocolError::Truncated { got, expected, .. })) => {
                prop_assert!(got < expected && expected == len as u64 && got == bytes.len() as u64)
            }
            (Ok(len), r) => {
                prop_assert!(bytes.len() >= len);
                prop_assert_eq!(
                    format!("{r:?}"),
                    format!("{:?}", decode_reply(&req, &bytes[..len]))
                );
            }
        }
        check_allocations()
    });
}

/// A valid dump as CRIU sends it, and the page server's replies.
#[derive(Debug, Clone)]
struct Dump {
    msgs: Vec<(Message, Vec<u8>)>,
    replies: Vec<u8>,
}

impl Dump {
    /// The bytes CRIU sends, and the offset of every header.
    fn stream(&self) -> (Vec<u8>, Vec<usize>) {
        let mut b = Vec::new();
        let mut marks = Vec::new();
        for (m, payload) in &self.msgs {
            marks.push(b.len());
            b.extend_from_slice(&m.encode().unwrap());
            b.extend_from_slice(payload);
        }
        (b, marks)
    }
}

fn page(seed: u8, n: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|i| seed.wrapping_mul(37) ^ (i as u8) ^ (n as u8).rotate_left(3))
        .collect()
}

/// One image's entries: (kind, gap in pages, pages, content seed).
type Entries = Vec<(u8, u64, u64, u8)>;

fn dump() -> impl Strategy<Value = Dump> {
    let image = (
        any::<bool>(), // shmem
        any::<bool>(), // legacy OPEN
        any::<bool>(), // ask PARENT first
        any::<bool>(), // has_parent
        vec((0..6u8, 0..3u64, 1..=4u64, any::<u8>()), 0..5),
    );
    (
        vec(image, 1..=3),
        any::<bool>(),
        prop_oneof![8 => Just(0i32), 1 => any::<i32>()],
    )
        .prop_map(|(images, force, status)| {
            let mut msgs = Vec::new();
            let mut replies = Vec::new();
            for (i, (shmem, legacy, ask, has_parent, entries)) in images.into_iter().enumerate() {
                let dst_id = if shmem {
                    DstId::shmem(1000 + i as u64).unwrap()
                } else {
                    DstId::pid(100 + i as u32).unwrap()
                };
                if ask {
                    msgs.push((Message::Parent { dst_id }, vec![]));
                    replies.extend_from_slice(&i32::from(has_parent).to_ne_bytes());
                }
                if legacy {
                    msgs.push((Message::Open { dst_id }, vec![]));
                } else {
                    msgs.push((Message::Open2 { dst_id }, vec![]));
                    replies.push(u8::from(has_parent));
                }
                let entries: Entries = entries;
                let mut at = 0x10000u64;
                for (kind, gap, nr_pages, seed) in entries {
                    let vaddr = at + gap * PAGE_SIZE as u64;
                    at = vaddr + nr_pages * PAGE_SIZE as u64;
                    let add = |flags| Message::Add {
                        dst_id,
                        vaddr,
                        nr_pages,
                        flags,
                    };
                    let m = match kind {
                        0 => add(PageFlags::PRESENT),
                        1 => add(PageFlags::PRESENT_LAZY),
                        2 => add(PageFlags::LAZY),
                        3 => add(PageFlags::PARENT),
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
                    let payload = (0..m.payload_pages()).flat_map(|n| page(seed, n)).collect();
                    msgs.push((m, payload));
                }
            }
            let close = if force {
                Message::ForceClose
            } else {
                Message::Close
            };
            msgs.push((close, vec![]));
            replies.extend_from_slice(&status.to_ne_bytes());
            Dump { msgs, replies }
        })
}

/// A dump's stream and replies, mutated or not.
#[derive(Debug, Clone)]
struct Mutated {
    dump: Dump,
    stream: Vec<u8>,
    replies: Vec<u8>,
    mutated: bool,
}

fn mutated_dump() -> impl Strategy<Value = Mutated> {
    (
        dump(),
        prop_oneof![1 => Just(vec![]), 4 => vec(mutation(), 1..4)],
        prop_oneof![6 => Just(vec![]), 1 => vec(mutation(), 1..3)],
    )
        .prop_map(|(dump, muts, reply_muts)| {
            let (stream, marks) = dump.stream();
            let mutated = !muts.is_empty() || !reply_muts.is_empty();
            Mutated {
                stream: mutate(stream, &marks, &muts),
                replies: mutate(dump.replies.clone(), &[0], &reply_muts),
                dump,
                mutated,
            }
        })
}

/// Errors a stream of messages can be refused with.
fn is_stream_error(e: &ProtocolError) -> bool {
    is_header_error(e)
        || matches!(e, ProtocolError::Truncated { got, expected, .. } if got < expected)
}

/// Reads a stream with the blocking readers, page by page: the messages and payloads read, and
/// how it ended.
fn read_stream_sync(b: &[u8]) -> (Vec<(Message, Vec<u8>)>, Option<ProtocolError>) {
    let mut r = Cursor::new(b);
    let mut out = Vec::new();
    loop {
        match read_message(&mut r) {
            Ok(None) => return (out, None),
            Ok(Some(m)) => {
                let mut payload = Vec::new();
                for _ in m.payload_pieces(1) {
                    let mut p = [0u8; PAGE_SIZE];
                    if let Err(e) = read_payload(&mut r, &mut p) {
                        out.push((m, payload));
                        return (out, Some(e));
                    }
                    payload.extend_from_slice(&p);
                }
                out.push((m, payload));
            }
            Err(e) => return (out, Some(e)),
        }
    }
}

async fn read_stream_async(mut b: &[u8]) -> (Vec<(Message, Vec<u8>)>, Option<ProtocolError>) {
    let mut out = Vec::new();
    loop {
        match read_message_async(&mut b).await {
            Ok(None) => return (out, None),
            Ok(Some(m)) => {
                let mut payload = Vec::new();
                for _ in m.payload_pieces(1) {
                    let mut p = [0u8; PAGE_SIZE];
                    if let Err(e) = read_payload_async(&mut b, &mut p).await {
                        out.push((m, payload));
                        return (out, Some(e));
                    }
                    payload.extend_from_slice(&p);
                }
                out.push((m, payload));
            }
            Err(e) => return (out, Some(e)),
        }
    }
}

#[test]
fn fuzz_page_server_stream_readers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let input = prop_oneof![
        1 => vec(any::<u8>(), 0..200),
        3 => mutated_dump().prop_map(|m| m.stream),
    ];
    fuzz("page-server stream readers", input, |b| {
        let (msgs, end) = read_stream_sync(&b);
        let (amsgs, aend) = rt.block_on(read_stream_async(&b));
        prop_assert_eq!(&msgs, &amsgs, "blocking and async readers disagree");
        prop_assert_eq!(format!("{end:?}"), format!("{aend:?}"));
        if let Some(e) = &end {
            prop_assert!(is_stream_error(e), "untyped stream error {e:?}");
        }
        // What was read is the input, message by message (padding zeroed).
        let mut at = 0;
        for (m, payload) in &msgs {
            let mut h: [u8; HEADER_LEN] = b[at..at + HEADER_LEN].try_into().unwrap();
            h[4..8].fill(0);
            prop_assert_eq!(m.encode().unwrap(), h);
            check_decoded(&h, m)?;
            at += HEADER_LEN;
            prop_assert_eq!(&payload[..], &b[at..at + payload.len()]);
            at += payload.len();
        }
        if end.is_none() {
            prop_assert_eq!(at, b.len(), "bytes left unread at a clean end");
        }
        check_allocations()
    });
}

fn is_proxy_read_error(e: &ProtocolError) -> bool {
    is_stream_error(e)
        || matches!(
            e,
            ProtocolError::NoReply { .. } | ProtocolError::BadReply { .. }
        )
}

/// Runs [`proxy_io`] on a stream and replies in memory, on a thread with a deadline, and checks
/// what it relayed.
fn check_proxy(case: &Mutated, chunk_pages: u64) -> Result<(), TestCaseError> {
    let (tx, rx) = mpsc::channel();
    let (input, replies) = (case.stream.clone(), case.replies.clone());
    thread::spawn(move || {
        reset_allocations();
        let mut criu_tx = Vec::new();
        let mut ps_tx = Vec::new();
        let mut hooked: Vec<(Message, Vec<u8>)> = Vec::new();
        let opts = ProxyOptions {
            idle_timeout: None,
            chunk_pages,
            trace_limit: 16,
        };
        let res = proxy_io(
            Cursor::new(&input[..]),
            &mut criu_tx,
            Cursor::new(&replies[..]),
            &mut ps_tx,
            &opts,
            &mut |m: &Message, data: &mut [u8]| {
                hooked.push((*m, data.to_vec()));
                Ok(())
            },
        );
        let largest = largest_allocation();
        let _ = tx.send((res, criu_tx, ps_tx, hooked, largest));
    });
    let (res, criu_tx, ps, hooked, largest) = match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(TestCaseError::fail("proxy_io did not end within 5 s"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(TestCaseError::fail("proxy_io panicked"))
        }
    };
    let input = &case.stream;
    prop_assert!(
        largest <= ALLOC_CAP,
        "proxy_io allocated {largest} bytes at once (cap {ALLOC_CAP})"
    );

    // The page server gets a prefix of CRIU's stream (headers re-encoded, padding zeroed), in
    // whole headers and whole pages: nothing that did not arrive.
    prop_assert!(ps.len() <= input.len(), "more bytes out than in");
    let mut at = 0;
    let mut payload_out = Vec::new();
    let mut reply_due = 0;
    while at < ps.len() {
        prop_assert!(at + HEADER_LEN <= ps.len(), "a partial header written");
        let h: [u8; HEADER_LEN] = ps[at..at + HEADER_LEN].try_into().unwrap();
        let m = Message::decode(&h).map_err(|e| TestCaseError::fail(format!("wrote {e}")))?;
        prop_assert_eq!(&h[..4], &input[at..at + 4]);
        prop_assert_eq!(&h[4..8], &[0u8; 4]);
        prop_assert_eq!(&h[8..], &input[at + 8..at + HEADER_LEN]);
        at += HEADER_LEN;
        let len = (m.payload_len() as usize).min(ps.len() - at);
        prop_assert_eq!(len % PAGE_SIZE, 0, "a partial page written");
        prop_assert_eq!(&ps[at..at + len], &input[at..at + len]);
        payload_out.extend_from_slice(&ps[at..at + len]);
        at += len;
        reply_due += reply_len(&m).unwrap_or(0);
    }
    // The hook saw exactly the pages written, in pieces of at most chunk_pages.
    let hooked_bytes: Vec<u8> = hooked.iter().flat_map(|(_, d)| d.clone()).collect();
    prop_assert_eq!(&hooked_bytes, &payload_out);
    for (m, d) in &hooked {
        prop_assert_eq!(m.payload_len() as usize, d.len());
        prop_assert!(m.payload_pages() <= chunk_pages.max(1));
    }
    // CRIU gets a prefix of the page server's replies, never more than was due.
    prop_assert!(criu_tx.len() <= reply_due);
    prop_assert_eq!(&criu_tx[..], &case.replies[..criu_tx.len()]);

    let status = case
        .dump
        .replies
        .len()
        .checked_sub(4)
        .map(|at| i32::from_ne_bytes(case.dump.replies[at..].try_into().unwrap()));
    let outcome = format!("{res:?}");
    let (ok, bad_status) = (res.is_ok(), matches!(res, Err(ProxyError::CloseStatus(_))));
    match res {
        Ok(stats) => {
            prop_assert_eq!(ps.len(), input.len(), "Ok before the end of the stream");
            prop_assert_eq!(criu_tx.len(), reply_due);
            prop_assert_eq!(stats.close_status, Some(0));
            prop_assert_eq!(stats.payload_bytes as usize, payload_out.len());
        }
        Err(ProxyError::Read { source, .. }) => {
            prop_assert!(is_proxy_read_error(&source), "untyped error {source:?}")
        }
        Err(ProxyError::Sequence { .. } | ProxyError::NoClose { .. }) => {}
        Err(ProxyError::CloseStatus(s)) => prop_assert_ne!(s, 0),
        Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
    }
    if !case.mutated {
        // A valid dump goes through whole; only the page server's CLOSE status can fail it.
        prop_assert_eq!(ps.len(), input.len(), "a valid dump was not relayed whole");
        prop_assert_eq!(criu_tx.len(), case.replies.len());
        if status == Some(0) {
            prop_assert!(ok, "a valid dump failed: {outcome}");
        } else {
            prop_assert!(bad_status, "{outcome}");
        }
    }
    check_allocations()
}

#[test]
fn fuzz_page_server_proxy() {
    let chunk = prop_oneof![1..=8u64, Just(256u64)];
    fuzz(
        "page-server proxy_io",
        (mutated_dump(), chunk),
        |(case, chunk)| check_proxy(&case, chunk),
    );
}

/// A header that claims the most pages allowed, followed by one page: the proxy allocates at
/// most one chunk before reading, and reports the truncation.
#[test]
fn a_huge_page_count_allocates_one_chunk_at_most() {
    let dst_id = DstId::pid(1).unwrap();
    let mut stream = Message::Open { dst_id }.encode().unwrap().to_vec();
    let add = Message::Add {
        dst_id,
        vaddr: 0,
        nr_pages: MAX_PAYLOAD_PAGES,
        flags: PageFlags::PRESENT,
    };
    stream.extend_from_slice(&add.encode().unwrap());
    stream.extend_from_slice(&page(1, 0));
    let dump = Dump {
        msgs: vec![],
        replies: 0i32.to_ne_bytes().to_vec(),
    };
    let case = Mutated {
        dump,
        stream,
        replies: vec![],
        mutated: true,
    };
    check_proxy(&case, 256).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Regressions: the exact inputs the fuzz tests above found, each against what CRIU reads.

/// `opts.images_dir_fd` as a varint with bit 32 set: CRIU reads the int32 0; `opts_fd` said
/// "no descriptor", so ferry-criu would not have re-opened runc's directory and CRIU would have
/// opened ferry-criu's own descriptor 0 instead.
#[test]
fn regression_opts_fd_reads_the_int32_criu_reads() {
    let req = [
        8, 0, 18, 17, 9, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 8, 128, 128, 128, 128, 16,
    ];
    assert_eq!(rpc::opts_varint(&req, opt::IMAGES_DIR_FD), Some(1 << 32));
    assert_eq!(rpc::opts_fd(&req, opt::IMAGES_DIR_FD), Some(0));
    check_rpc_readers(&req).unwrap();
}

/// Two `opts`, which protobuf merges: `with_opts_varint` rewrote the pid in the first and kept
/// the second, so CRIU could still read a value from it.
#[test]
fn regression_with_opts_varint_refuses_a_second_opts() {
    let req = [8, 1, 18, 2, 16, 1, 18, 0];
    assert_eq!(rpc::with_opts_varint(&req, opt::PID, 0), None);
    assert_eq!(rpc::opts_varint(&req, opt::PID), None);
    check_with_opts_varint(&req, opt::PID, 0).unwrap();
}

/// A DUMP with a second (empty) `opts`: `dump_with_page_server_fd` replaced both with the
/// rewritten first one, so CRIU merged every option twice.
#[test]
fn regression_dump_with_page_server_fd_refuses_a_second_opts() {
    let req = [
        8, 1, 18, 15, 90, 13, 10, 9, 49, 50, 55, 46, 48, 46, 48, 46, 49, 16, 0, 18, 0,
    ];
    assert_eq!(rpc::dump_with_page_server_fd(&req, 0), None);
    check_dump_with_page_server_fd(&req, 0).unwrap();
}

/// `type` twice, DUMP then RESTORE: CRIU reads the last (RESTORE); `request_type` returned the
/// first and `dump_with_page_server_fd` rewrote the request as a DUMP.
#[test]
fn regression_the_last_type_counts() {
    let req = [
        18, 15, 90, 13, 10, 9, 49, 50, 55, 46, 48, 46, 48, 46, 49, 16, 0, 8, 1, 8, 2,
    ];
    assert_eq!(rpc::request_type(&req), Some(2));
    assert_eq!(rpc::dump_with_page_server_fd(&req, 0), None);
    assert!(!is_relayable(&req));
    check_dump_with_page_server_fd(&req, 0).unwrap();
    check_rpc_readers(&req).unwrap();
}

/// A type followed by a malformed field: `request_type` returned the type without looking
/// further; CRIU refuses the request.
#[test]
fn regression_request_type_of_a_malformed_request() {
    let req = [8, 1, 128, 128, 128, 0, 18, 0];
    assert_eq!(rpc::request_type(&req), None);
    check_rpc_readers(&req).unwrap();
}

/// runc's dump with `lazy_pages` as a 10-byte varint whose only set bit is the 65th: Ferry read
/// 0 and relayed the dump, protobuf-c reads `true` (CRIU then ignores `ps.fd`).
#[test]
fn regression_a_varint_beyond_64_bits_is_refused() {
    let req = [
        8, 1, 18, 49, 8, 5, 16, 192, 196, 7, 40, 1, 82, 8, 100, 117, 109, 112, 46, 108, 111, 103,
        90, 14, 10, 9, 49, 50, 55, 46, 48, 46, 48, 46, 49, 16, 216, 54, 136, 1, 6, 128, 3, 128,
        128, 128, 128, 128, 128, 128, 128, 128, 2, 24, 1,
    ];
    assert!(!is_relayable(&req));
    assert_eq!(rpc::opts_varint(&req, opt::LAZY_PAGES), None);
    assert_eq!(rpc::dump_with_page_server_fd(&req, 3), None);
    check_rpc_readers(&req).unwrap();
    // Without that field, the same request is runc's ordinary, relayable dump.
    let mut ok = req.to_vec();
    ok.drain(41..53);
    ok[3] -= 12;
    assert!(is_relayable(&ok));
}
