//! Property-based and mutation tests of every parser of network input of this crate: framed
//! messages, file-tree streams, page streams, hash lists and held bitmaps, chunk id lists and
//! chunk streams. Random bytes, mutations of valid encodings
//! (bit flips, truncations, insertions, removals, changed length fields) and generated record
//! sequences; each property says what must hold for any input: no panic, an answer in bounded
//! time, nothing written outside the destination, and anything accepted consistent with what
//! was sent. Findings are kept below as plain regression tests with their exact input.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared_fs::{diff, snapshot, EntryKind, EntryMeta, Limits, Snapshot, Xattr};
use transfer::frame::{read_msg_capped, write_msg, MAX_MSG};
use transfer::lists::{
    decode_bitmap, encode_bitmap, parse_chunk_ids, read_hashes, write_chunk, write_hashes,
    ChunkStream, Hash,
};
use transfer::pages::{hash_page, recv_pages, send_pages, PageStore, MAX_BATCH, PAGE};
use transfer::tree::{recv_tree, recv_tree_with, send_tree, Reads, TreeStats, CHUNK};
use transfer::TransferError;

// ---- harness ----

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 1000,
        // Findings are kept as regression tests in this file, not in files next to it.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// How long one parse may take before it counts as a hang.
const DEADLINE: Duration = Duration::from_secs(5);

/// Runs `f` on its own thread: a panic or a hang (even in a blocking system call) fails the
/// property instead of stopping or stalling the test.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: no answer within {DEADLINE:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: the parser panicked"),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// A value for a length field: relative to the original, or one that caps care about.
#[derive(Clone, Debug)]
enum FieldValue {
    Delta(i16),
    Special(u32),
    Any(u32),
}

impl FieldValue {
    fn apply(&self, old: u32) -> u32 {
        match self {
            FieldValue::Delta(d) => old.wrapping_add_signed(i32::from(*d)),
            FieldValue::Special(v) | FieldValue::Any(v) => *v,
        }
    }
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    let special = prop::sample::select(vec![
        0u32,
        1,
        2,
        3,
        31,
        32,
        33,
        256,
        257,
        4095,
        4096,
        PAGE as u32 * MAX_BATCH as u32,
        PAGE as u32 * MAX_BATCH as u32 + 1,
        CHUNK as u32,
        CHUNK as u32 + 1,
        MAX_MSG as u32,
        MAX_MSG as u32 + 1,
        i32::MAX as u32,
        u32::MAX,
    ]);
    prop_oneof![
        (-8i16..=8).prop_map(FieldValue::Delta),
        special.prop_map(FieldValue::Special),
        any::<u32>().prop_map(FieldValue::Any),
    ]
}

/// One change to a byte string. Positions are [`Index`]es, scaled to the current length.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, u8),
    Duplicate(Index, u8),
    /// Changes the `n`th length field of the encoding (see each parser's field finder).
    Field(Index, FieldValue),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        4 => (any::<Index>(), field_value()).prop_map(|(i, v)| Mutation::Field(i, v)),
    ]
}

/// Applies `muts` in order; `fields` finds the offsets of the length fields of the current bytes.
fn mutate(mut b: Vec<u8>, muts: &[Mutation], fields: &dyn Fn(&[u8]) -> Vec<usize>) -> Vec<u8> {
    for m in muts {
        let len = b.len();
        match m {
            Mutation::FlipBit(i, bit) if len > 0 => b[i.index(len)] ^= 1 << bit,
            Mutation::SetByte(i, v) if len > 0 => b[i.index(len)] = *v,
            Mutation::Truncate(i) => b.truncate(i.index(len + 1)),
            Mutation::Insert(i, v) => {
                let at = i.index(len + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i.index(len);
                let end = (at + usize::from(*n)).min(len);
                b.drain(at..end);
            }
            Mutation::Duplicate(i, n) if len > 0 => {
                let at = i.index(len);
                let end = (at + usize::from(*n)).min(len);
                let copy = b[at..end].to_vec();
                b.splice(end..end, copy);
            }
            Mutation::Field(i, v) => {
                let f = fields(&b);
                if !f.is_empty() {
                    let at = f[i.index(f.len())];
                    if let Some(old) = be32(&b, at) {
                        b[at..at + 4].copy_from_slice(&v.apply(old).to_be_bytes());
                    }
                }
            }
            _ => {}
        }
    }
    b
}

// ---- framed messages ----

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Msg {
    id: u32,
    name: String,
    tags: Vec<String>,
    nested: Option<Box<Msg>>,
}

fn msg() -> impl Strategy<Value = Msg> {
    let leaf = (
        any::<u32>(),
        prop::collection::vec(any::<char>(), 0..12),
        prop::collection::vec(
            prop::sample::select(vec!["", "a", "\"", "\\", "\u{0}", "é"]),
            0..4,
        ),
    )
        .prop_map(|(id, name, tags)| Msg {
            id,
            name: name.into_iter().collect(),
            tags: tags.into_iter().map(str::to_owned).collect(),
            nested: None,
        });
    leaf.prop_recursive(3, 8, 1, |inner| {
        (inner.clone(), inner).prop_map(|(mut a, b)| {
            a.nested = Some(Box::new(b));
            a
        })
    })
}

/// Offsets of the length headers of a stream of frames.
fn frame_fields(b: &[u8]) -> Vec<usize> {
    let mut out = vec![];
    let mut pos = 0;
    while let Some(len) = be32(b, pos) {
        out.push(pos);
        pos = match pos.checked_add(4 + len as usize) {
            Some(p) => p,
            None => break,
        };
    }
    out
}

/// What reading one frame of `T` from `input` with `cap` must give, decided independently of
/// the reader: `Ok(None)` (clean end), the message and its size, or the kind of error.
#[derive(Debug, PartialEq)]
enum FrameOutcome<T> {
    End,
    Msg(T, u64),
    TooLarge,
    Truncated,
    Decode,
}

fn expected_frame<T: serde::de::DeserializeOwned>(input: &[u8], cap: usize) -> FrameOutcome<T> {
    if input.is_empty() {
        return FrameOutcome::End;
    }
    let Some(len) = be32(input, 0) else {
        return FrameOutcome::Truncated;
    };
    if len as usize > cap {
        return FrameOutcome::TooLarge;
    }
    let Some(body) = input.get(4..4 + len as usize) else {
        return FrameOutcome::Truncated;
    };
    match serde_json::from_slice(body) {
        Ok(v) => FrameOutcome::Msg(v, 4 + u64::from(len)),
        Err(_) => FrameOutcome::Decode,
    }
}

fn read_frame<T: serde::de::DeserializeOwned + Send + 'static>(
    input: Vec<u8>,
    cap: usize,
) -> FrameOutcome<T> {
    within("read_msg_capped", move || {
        let mut r = &input[..];
        match block_on(read_msg_capped::<_, T>(&mut r, cap)) {
            Ok(None) => FrameOutcome::End,
            Ok(Some((m, n))) => {
                assert_eq!(
                    r.len() as u64,
                    input.len() as u64 - n,
                    "consumed exactly the frame"
                );
                FrameOutcome::Msg(m, n)
            }
            Err(TransferError::TooLarge { len, cap: c }) => {
                assert!(len > c && c == cap as u64, "TooLarge {len} > {c}");
                FrameOutcome::TooLarge
            }
            Err(TransferError::Truncated { .. }) => FrameOutcome::Truncated,
            Err(TransferError::Decode { .. }) => FrameOutcome::Decode,
            Err(e) => panic!("unexpected error kind: {e:?}"),
        }
    })
}

fn frame_input() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        (0u32..80).prop_map(|l| l.to_be_bytes().to_vec()),
        field_value().prop_map(|v| v.apply(0).to_be_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..4),
    ];
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        prop::collection::vec(
            prop::sample::select(vec![
                "{",
                "}",
                "[",
                "]",
                ":",
                ",",
                "\"",
                "\"id\"",
                "\"name\"",
                "\"tags\"",
                "\"nested\"",
                "1",
                "-1",
                "4294967296",
                "null",
                "true",
                "\"x\"",
                "\\u0000",
                "1e999",
                " ",
            ]),
            0..24,
        )
        .prop_map(|t| t.concat().into_bytes()),
    ];
    (header, body).prop_map(|(mut h, b)| {
        h.extend(b);
        h
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn frame_random_input_matches_the_format(
        input in frame_input(),
        cap in prop::sample::select(vec![0usize, 7, 64, MAX_MSG]),
    ) {
        let want = expected_frame::<Value>(&input, cap);
        prop_assert_eq!(read_frame::<Value>(input.clone(), cap), want);
        let want = expected_frame::<Msg>(&input, cap);
        prop_assert_eq!(read_frame::<Msg>(input, cap), want);
    }

    #[test]
    fn frame_mutated_messages_match_the_format(
        msgs in prop::collection::vec(msg(), 1..4),
        muts in prop::collection::vec(mutation(), 0..4),
    ) {
        let mut valid = vec![];
        block_on(async {
            for m in &msgs {
                write_msg(&mut valid, m).await.unwrap();
            }
        });
        let input = mutate(valid, &muts, &frame_fields);
        // Read the stream frame by frame, like a peer's records.
        let mut rest = &input[..];
        let mut seen = 0;
        loop {
            let want = expected_frame::<Msg>(rest, MAX_MSG);
            let got = read_frame::<Msg>(rest.to_vec(), MAX_MSG);
            prop_assert_eq!(&got, &want);
            match got {
                FrameOutcome::Msg(m, n) => {
                    if muts.is_empty() {
                        prop_assert_eq!(&m, &msgs[seen]);
                    }
                    seen += 1;
                    rest = &rest[n as usize..];
                }
                FrameOutcome::End => {
                    if muts.is_empty() {
                        prop_assert_eq!(seen, msgs.len());
                    }
                    break;
                }
                _ => {
                    prop_assert!(!muts.is_empty(), "a valid stream failed");
                    break;
                }
            }
        }
    }
}

// ---- file trees ----

/// A destination next to sentinel entries: whatever a tree does, nothing outside the
/// destination may change at all.
struct Arena {
    top: tempfile::TempDir,
    before: Vec<(String, Node)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Dir {
        mode: u32,
        uid: u32,
        mtime: i64,
    },
    File {
        mode: u32,
        uid: u32,
        mtime: i64,
        hash: [u8; 32],
        len: u64,
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
    },
}

/// Every entry under `root`, never following a symlink nor opening anything but regular files.
fn walk(root: &Path) -> Vec<(String, Node)> {
    let mut out = vec![];
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let p = dir.join(&name);
            let r = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            let md = fs::symlink_metadata(&p).unwrap();
            let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            let mode = md.mode();
            let node = if md.file_type().is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&p).unwrap(),
                }
            } else if md.is_dir() {
                stack.push((p.clone(), r.clone()));
                Node::Dir {
                    mode,
                    uid: md.uid(),
                    mtime,
                }
            } else if md.is_file() {
                let data = fs::read(&p).unwrap();
                Node::File {
                    mode,
                    uid: md.uid(),
                    mtime,
                    hash: *blake3::hash(&data).as_bytes(),
                    len: data.len() as u64,
                }
            } else {
                Node::Other { mode }
            };
            out.push((r, node));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

impl Arena {
    fn new() -> Arena {
        let top = tempfile::tempdir().unwrap();
        // Directories named like the paths the generated trees use, next to `dest` and in
        // `sentinel`, so that a write through a symlink to either would hit something.
        for s in [top.path().to_path_buf(), top.path().join("sentinel")] {
            for d in ["a/b/c", "a/x", "b/c", "x", "f"] {
                fs::create_dir_all(s.join(d)).unwrap();
            }
            for f in ["k", "b/k", "a/k", "f/k"] {
                fs::write(s.join(f), b"keep").unwrap();
            }
        }
        fs::create_dir(top.path().join("dest")).unwrap();
        let before = walk(top.path());
        Arena { top, before }
    }

    fn dest(&self) -> PathBuf {
        self.top.path().join("dest")
    }

    fn sentinel(&self) -> PathBuf {
        self.top.path().join("sentinel")
    }

    /// Nothing outside `dest` changed; no temporary file is left inside it.
    fn check_confined(&self) {
        let now = walk(self.top.path());
        let outside = |v: &[(String, Node)]| -> Vec<(String, Node)> {
            v.iter()
                .filter(|(p, _)| !p.starts_with("dest/"))
                .cloned()
                .collect()
        };
        let (was, is) = (outside(&self.before), outside(&now));
        // `dest` itself may change (mode, mtime); only its name must stay.
        let strip = |v: Vec<(String, Node)>| -> Vec<(String, Node)> {
            v.into_iter()
                .map(|(p, n)| {
                    if p == "dest" {
                        (p, Node::Other { mode: 0 })
                    } else {
                        (p, n)
                    }
                })
                .collect()
        };
        let (is, was) = (strip(is), strip(was));
        if is != was {
            let changed: Vec<_> = is.iter().filter(|x| !was.contains(x)).collect();
            let gone: Vec<_> = was.iter().filter(|x| !is.contains(x)).collect();
            panic!("something outside the destination changed: now {changed:?}, was {gone:?}");
        }
        for (p, _) in &now {
            assert!(
                !p.rsplit('/')
                    .next()
                    .unwrap_or("")
                    .starts_with(".ferry-tmp-"),
                "temporary file left behind: {p}"
            );
        }
    }

    /// Regular files in `dest` and their (size, blake3).
    fn dest_files(&self) -> Vec<(String, u64, [u8; 32])> {
        walk(&self.dest())
            .into_iter()
            .filter_map(|(p, n)| match n {
                Node::File { hash, len, .. } => Some((p, len, hash)),
                _ => None,
            })
            .collect()
    }
}

/// What a tree stream says, parsed independently of `recv_tree` (tolerant: `None` when it is
/// not well-formed up to its `End`).
#[derive(Debug, Default)]
struct TreeWire {
    /// `Remove` and `Entry` records.
    records: u64,
    /// Bytes up to and including the `End` record.
    consumed: u64,
    /// Size and hash of every `File` entry.
    files: Vec<(u64, [u8; 32])>,
}

fn is_file_kind(kind: &Value) -> bool {
    kind == "File"
        || kind
            .as_object()
            .is_some_and(|o| o.len() == 1 && o.contains_key("File"))
}

/// Offsets of every length field of a tree stream (frame headers, chunk lengths, end markers)
/// up to where it stops making sense, and the parse if it is well-formed.
fn parse_tree(b: &[u8]) -> (Vec<usize>, Option<TreeWire>) {
    let mut fields = vec![];
    let mut w = TreeWire::default();
    let mut pos = 0usize;
    loop {
        let Some(len) = be32(b, pos) else {
            return (fields, None);
        };
        fields.push(pos);
        let Some(body) = b.get(pos + 4..pos + 4 + len as usize) else {
            return (fields, None);
        };
        pos += 4 + len as usize;
        let Ok(rec) = serde_json::from_slice::<Value>(body) else {
            return (fields, None);
        };
        if rec.get("End").is_some() {
            w.consumed = pos as u64;
            return (fields, Some(w));
        }
        if rec.get("Remove").is_some() {
            w.records += 1;
            continue;
        }
        let Some(entry) = rec.get("Entry") else {
            return (fields, None);
        };
        w.records += 1;
        if !entry.get("kind").is_some_and(is_file_kind) {
            continue;
        }
        let size = entry.get("size").and_then(Value::as_u64).unwrap_or(0);
        loop {
            let Some(clen) = be32(b, pos) else {
                return (fields, None);
            };
            fields.push(pos);
            pos += 4;
            if clen == 0 {
                let Some(h) = b.get(pos..pos + 32) else {
                    return (fields, None);
                };
                w.files.push((size, h.try_into().unwrap()));
                pos += 32;
                break;
            }
            if be32(b, pos).is_none() {
                return (fields, None);
            }
            fields.push(pos);
            pos += 4 + clen as usize;
        }
    }
}

fn tree_limits() -> Limits {
    Limits {
        max_entries: 64,
        max_file_size: 4 << 20,
        max_total_bytes: 8 << 20,
        ..Limits::default()
    }
}

/// Receives `stream` into a fresh arena and checks every property; returns the result and the
/// arena for further checks.
fn recv_checked(stream: Vec<u8>, durable: bool) -> (Result<TreeStats, String>, Arena) {
    let arena = Arena::new();
    let dest = arena.dest();
    let input = stream.clone();
    let res = within("recv_tree", move || {
        let mut r = &input[..];
        block_on(recv_tree_with(&mut r, &dest, tree_limits(), durable)).map_err(|e| e.to_string())
    });
    arena.check_confined();
    if let Ok(st) = &res {
        let (_, wire) = parse_tree(&stream);
        let wire = wire.expect("an accepted tree stream is well-formed");
        assert_eq!(st.entries, wire.records, "records counted");
        assert_eq!(st.wire_bytes, wire.consumed, "bytes counted");
        for (path, len, hash) in arena.dest_files() {
            assert!(
                wire.files.contains(&(len, hash)),
                "{path}: {len} bytes of content that no File entry of the stream carried"
            );
        }
    }
    (res, arena)
}

/// Valid tree streams, produced by `send_tree` from real trees.
struct Seeds {
    _dir: tempfile::TempDir,
    /// (name, stream, the source's snapshot when the stream holds the whole tree).
    streams: Vec<(&'static str, Vec<u8>, Option<Snapshot>)>,
}

fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("usr/lib")).unwrap();
    fs::write(root.join("etc/hostname"), b"ferry\n").unwrap();
    fs::write(root.join("usr/lib/data"), noise(5000, 1)).unwrap();
    fs::write(root.join("usr/lib/zeros"), vec![0u8; 9000]).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::set_permissions(root.join("usr/lib"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::hard_link(root.join("usr/lib/data"), root.join("usr/lib/data-link")).unwrap();
    std::os::unix::fs::symlink("../usr/lib/data", root.join("etc/link")).unwrap();
    let ok = std::process::Command::new("mkfifo")
        .arg(root.join("etc/fifo"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfifo must work here");
}

fn send(root: &Path, d: &shared_fs::Diff) -> Vec<u8> {
    let mut out = vec![];
    block_on(send_tree(&mut out, root, d, Reads::Frozen)).unwrap();
    out
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        build_tree(&a);
        let snap_a = snapshot(&a).unwrap();
        let full = send(&a, &diff(&Snapshot::default(), &snap_a));
        // An incremental diff: a removal, a changed file, a new directory.
        let b = dir.path().join("b");
        build_tree(&b);
        let old = snapshot(&b).unwrap();
        fs::remove_file(b.join("empty")).unwrap();
        fs::write(b.join("etc/hostname"), b"changed\n").unwrap();
        fs::create_dir(b.join("new")).unwrap();
        let incr = send(&b, &diff(&old, &snapshot(&b).unwrap()));
        // A file of two chunks (1 MiB + 100 bytes, compressible).
        let c = dir.path().join("c");
        fs::create_dir(&c).unwrap();
        fs::write(c.join("two-chunks"), vec![7u8; CHUNK + 100]).unwrap();
        let snap_c = snapshot(&c).unwrap();
        let big = send(&c, &diff(&Snapshot::default(), &snap_c));
        let empty = send(&c, &shared_fs::Diff::default());
        Seeds {
            _dir: dir,
            streams: vec![
                ("full", full, Some(snap_a)),
                ("incremental", incr, None),
                ("two chunks", big, Some(snap_c)),
                ("empty", empty, Some(Snapshot::default())),
            ],
        }
    })
}

#[test]
fn tree_seeds_are_valid_and_arrive_whole() {
    for (name, stream, snap) in &seeds().streams {
        let (res, arena) = recv_checked(stream.clone(), false);
        let st = res.unwrap_or_else(|e| panic!("seed {name}: {e}"));
        assert_eq!(st.wire_bytes, stream.len() as u64, "seed {name}");
        if let Some(snap) = snap {
            let got = snapshot(&arena.dest()).unwrap();
            assert_eq!(got.digest(), snap.digest(), "seed {name} arrived as sent");
        }
        let (fields, wire) = parse_tree(stream);
        assert!(wire.is_some(), "{name}");
        assert!(*name == "empty" || fields.len() > 1, "{name}");
    }
}

fn tree_fields(b: &[u8]) -> Vec<usize> {
    parse_tree(b).0
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tree_mutated_streams_are_refused_or_applied_confined(
        seed in 0usize..4,
        muts in prop::collection::vec(mutation(), 1..4),
        durable in any::<bool>(),
    ) {
        let (_, valid, _) = &seeds().streams[seed];
        let input = mutate(valid.clone(), &muts, &tree_fields);
        let strict_prefix = input.len() < valid.len() && valid.starts_with(&input);
        let (res, _arena) = recv_checked(input, durable);
        if strict_prefix {
            prop_assert!(res.is_err(), "a cut stream was accepted");
        }
    }

    #[test]
    fn tree_random_bytes_are_refused_or_applied_confined(
        prefix in prop::sample::select(vec![
            &b""[..],
            &b"\x00\x00\x00\x0e{\"Remove\":\"a\"}"[..],
            &b"\x00\x00\x00\x11{\"End\":{\"entries\""[..],
        ]),
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut input = prefix.to_vec();
        input.extend(bytes);
        let _ = recv_checked(input, false);
    }
}

// Generated record sequences: paths, kinds and link targets drawn from small sets that mix
// ordinary names with hostile ones, so that sequences (a directory, then a symlink in its
// place, ...) come up often.

const SENTINEL: &str = "@SENTINEL";

fn gen_path() -> impl Strategy<Value = String> {
    prop_oneof![
        60 => prop::sample::select(vec!["a", "b", "a/b", "a/x", "b/c", "b/f", "a/b/c"])
            .prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "..", "../sentinel", "../sentinel/k", "/tmp/ferry-fuzz-escape", "a/../..", "a//b",
            ".", "", "a/.", "a\u{0}b", "a/", "./a",
        ])
        .prop_map(str::to_owned),
        1 => Just("n".repeat(300)),
    ]
}

#[derive(Clone, Debug)]
enum GenKind {
    Dir,
    File {
        content: Vec<u8>,
        size_delta: i8,
        bad_hash: bool,
        split: bool,
    },
    Symlink(String),
    Hardlink(String),
    Fifo,
    CharDev,
}

#[derive(Clone, Debug)]
enum GenRecord {
    Remove(String),
    Entry {
        path: String,
        kind: GenKind,
        mode: u32,
        uid: u32,
        mtime_ns: i64,
        xattrs: Vec<Xattr>,
    },
}

fn gen_kind() -> impl Strategy<Value = GenKind> {
    let file = (
        prop::collection::vec(prop::sample::select(vec![0u8, b'a', 0xff]), 0..40),
        prop::sample::select(vec![0i8, 0, 0, 0, 0, 0, 0, 0, -1, 1]),
        prop::bool::weighted(0.05),
        any::<bool>(),
    )
        .prop_map(|(content, size_delta, bad_hash, split)| GenKind::File {
            content,
            size_delta,
            bad_hash,
            split,
        });
    // Symlinks: most of them point out of the tree (the sentinel is next to it).
    let target = prop_oneof![
        2 => prop::sample::select(vec!["..", "../sentinel", SENTINEL]).prop_map(str::to_owned),
        1 => gen_path(),
    ];
    prop_oneof![
        5 => Just(GenKind::Dir),
        3 => file,
        6 => target.prop_map(GenKind::Symlink),
        2 => gen_path().prop_map(GenKind::Hardlink),
        1 => Just(GenKind::Fifo),
        1 => Just(GenKind::CharDev),
    ]
}

fn gen_record() -> impl Strategy<Value = GenRecord> {
    let xattrs = prop::collection::vec(
        prop::sample::select(vec![
            ("user.k", "6869"),
            ("trusted.overlay.opaque", "79"),
            ("user.k", "6869"),
            ("trusted.overlay.opaque", "79"),
            ("user.k", "6869"),
            ("trusted.overlay.opaque", "79"),
            ("user.k", "zz"),
            ("bogus", "00"),
            ("", "00"),
        ])
        .prop_map(|(n, v)| Xattr {
            name: n.into(),
            value: v.into(),
        }),
        0..2,
    );
    let entry = (
        gen_path(),
        gen_kind(),
        prop::sample::select(vec![0o755u32, 0o700, 0o644, 0, 0o7777, 0o170755]),
        prop::sample::select(vec![0u32, 1000, u32::MAX]),
        prop_oneof![
            Just(0i64),
            Just(-1i64),
            Just(i64::MIN),
            Just(i64::MAX),
            any::<i64>()
        ],
        prop_oneof![8 => Just(vec![]), 1 => xattrs],
    )
        .prop_map(
            |(path, kind, mode, uid, mtime_ns, xattrs)| GenRecord::Entry {
                path,
                kind,
                mode,
                uid,
                mtime_ns,
                xattrs,
            },
        );
    prop_oneof![
        1 => gen_path().prop_map(GenRecord::Remove),
        5 => entry,
    ]
}

fn frame(out: &mut Vec<u8>, v: &Value) {
    let body = serde_json::to_vec(v).unwrap();
    out.extend((body.len() as u32).to_be_bytes());
    out.extend(body);
}

/// Encodes records as `send_tree` would, with `End` announcing `count_delta` more records
/// than there are.
fn encode_records(records: &[GenRecord], sentinel: &Path, count_delta: i8) -> Vec<u8> {
    let mut out = vec![];
    let sentinel = sentinel.to_str().unwrap();
    let fix = |t: &str| t.replace(SENTINEL, sentinel);
    for r in records {
        match r {
            GenRecord::Remove(p) => frame(&mut out, &json!({ "Remove": p })),
            GenRecord::Entry {
                path,
                kind,
                mode,
                uid,
                mtime_ns,
                xattrs,
            } => {
                let k = match kind {
                    GenKind::Dir => EntryKind::Dir,
                    GenKind::File { .. } => EntryKind::File,
                    GenKind::Symlink(t) => EntryKind::Symlink { target: fix(t) },
                    GenKind::Hardlink(t) => EntryKind::Hardlink { target: fix(t) },
                    GenKind::Fifo => EntryKind::Fifo,
                    GenKind::CharDev => EntryKind::CharDev { rdev: 0 },
                };
                let size = match kind {
                    GenKind::File {
                        content,
                        size_delta,
                        ..
                    } => (content.len() as u64).saturating_add_signed(i64::from(*size_delta)),
                    _ => 0,
                };
                let meta = EntryMeta {
                    path: path.clone(),
                    kind: k,
                    mode: *mode,
                    uid: *uid,
                    gid: *uid,
                    mtime_ns: *mtime_ns,
                    size,
                    xattrs: xattrs.clone(),
                };
                frame(&mut out, &json!({ "Entry": meta }));
                if let GenKind::File {
                    content,
                    bad_hash,
                    split,
                    ..
                } = kind
                {
                    let parts: Vec<&[u8]> = if *split && content.len() > 1 {
                        let (x, y) = content.split_at(content.len() / 2);
                        vec![x, y]
                    } else if content.is_empty() {
                        vec![]
                    } else {
                        vec![&content[..]]
                    };
                    for p in parts {
                        let z = zstd::bulk::compress(p, 1).unwrap();
                        out.extend((z.len() as u32).to_be_bytes());
                        out.extend((p.len() as u32).to_be_bytes());
                        out.extend(z);
                    }
                    out.extend(0u32.to_be_bytes());
                    let mut h = *blake3::hash(content).as_bytes();
                    if *bad_hash {
                        h[0] ^= 1;
                    }
                    out.extend(h);
                }
            }
        }
    }
    let n = (records.len() as u64).saturating_add_signed(i64::from(count_delta));
    frame(&mut out, &json!({ "End": { "entries": n } }));
    out
}

/// Receives generated records; the sentinel's path is known only once the arena exists.
fn recv_records(
    records: &[GenRecord],
    count_delta: i8,
    durable: bool,
) -> Result<TreeStats, String> {
    // Links may point at the sentinel by its absolute path: build the arena first.
    let arena = Arena::new();
    let stream = encode_records(records, &arena.sentinel(), count_delta);
    let dest = arena.dest();
    let input = stream.clone();
    let res = within("recv_tree (records)", move || {
        let mut r = &input[..];
        block_on(recv_tree_with(&mut r, &dest, tree_limits(), durable)).map_err(|e| e.to_string())
    });
    arena.check_confined();
    if let Ok(st) = &res {
        let (_, wire) = parse_tree(&stream);
        let wire = wire.expect("well-formed");
        assert_eq!(st.entries, wire.records);
        for (path, len, hash) in arena.dest_files() {
            assert!(
                wire.files.contains(&(len, hash)),
                "{path}: content no File entry carried"
            );
        }
    }
    res
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tree_generated_records_stay_confined(
        records in prop::collection::vec(gen_record(), 0..7),
        count_delta in prop::sample::select(vec![0i8, 0, 0, 0, 0, 0, 0, 0, 0, -1, 1]),
        durable in any::<bool>(),
    ) {
        let res = recv_records(&records, count_delta, durable);
        let announced = (records.len() as u64).saturating_add_signed(i64::from(count_delta));
        if announced != records.len() as u64 {
            prop_assert!(res.is_err(), "a wrong record count was accepted");
        }
    }
}

// ---- page streams ----

/// Offsets of the length fields of a page stream (batch counts, payload lengths, end marker).
fn page_fields(b: &[u8]) -> Vec<usize> {
    let mut out = vec![];
    let mut pos = 0usize;
    while let Some(count) = be32(b, pos) {
        out.push(pos);
        if count == 0 {
            break;
        }
        let Some(len) = be32(b, pos + 5) else {
            break;
        };
        out.push(pos + 5);
        pos += 9 + len as usize;
    }
    out
}

/// A valid page stream: its name, its pages and its bytes.
type PageSeed = (&'static str, Vec<Vec<u8>>, Vec<u8>);

fn page_seeds() -> &'static [PageSeed] {
    static SEEDS: OnceLock<Vec<PageSeed>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let sparse = |n: usize| -> Vec<Vec<u8>> {
            (0..n)
                .map(|i| {
                    let mut p = vec![0u8; PAGE];
                    p[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                    p
                })
                .collect()
        };
        let sets: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("empty", vec![]),
            ("compressed", sparse(3)),
            ("raw", vec![noise(PAGE, 1), noise(PAGE, 2)]),
            ("two batches", sparse(MAX_BATCH + 1)),
        ];
        sets.into_iter()
            .map(|(name, pages)| {
                let mut out = vec![];
                block_on(send_pages(&mut out, &pages)).unwrap();
                (name, pages, out)
            })
            .collect()
    })
}

const STORE_PAGES: usize = 300;

/// Receives a page stream into a fresh store and checks what must hold for any input.
fn recv_pages_checked(input: Vec<u8>) -> Result<Vec<[u8; 32]>, String> {
    within("recv_pages", move || {
        let mut store = PageStore::new(STORE_PAGES);
        let mut r = &input[..];
        let res = block_on(recv_pages(&mut r, &mut store));
        assert!(store.len() <= STORE_PAGES, "the store grew past its cap");
        match res {
            Ok((hashes, stats)) => {
                assert_eq!(stats.pages, hashes.len() as u64);
                assert_eq!(stats.wire_bytes, (input.len() - r.len()) as u64);
                for h in &hashes {
                    let page = store.get(h).expect("every page received is held");
                    assert_eq!(page.len(), PAGE);
                    assert_eq!(&hash_page(page), h, "pages are stored under their own hash");
                }
                // The counts announced add up to what arrived.
                let mut announced = 0u64;
                for at in page_fields(&input).into_iter().step_by(2) {
                    announced += u64::from(be32(&input, at).unwrap());
                }
                assert_eq!(announced, hashes.len() as u64);
                Ok(hashes)
            }
            Err(e) => Err(e.to_string()),
        }
    })
}

#[test]
fn page_seeds_are_valid() {
    for (name, pages, stream) in page_seeds() {
        let hashes = recv_pages_checked(stream.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want: Vec<[u8; 32]> = pages.iter().map(|p| hash_page(p)).collect();
        assert_eq!(hashes, want, "{name}");
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn page_mutated_streams_are_refused_or_hashed(
        seed in 0usize..4,
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let (_, _, valid) = &page_seeds()[seed];
        let input = mutate(valid.clone(), &muts, &page_fields);
        let strict_prefix = input.len() < valid.len() && valid.starts_with(&input);
        let res = recv_pages_checked(input);
        if strict_prefix {
            prop_assert!(res.is_err(), "a cut stream was accepted");
        }
    }

    #[test]
    fn page_random_bytes_are_refused_or_hashed(
        count in prop_oneof![0u32..4, field_value().prop_map(|v| v.apply(1))],
        encoding in prop_oneof![0u8..3, any::<u8>()],
        len in prop_oneof![
            Just(PAGE as u32),
            field_value().prop_map(|v| v.apply(PAGE as u32)),
        ],
        body in prop::collection::vec(any::<u8>(), 0..64),
        raw in any::<bool>(),
    ) {
        let input = if raw {
            body
        } else {
            let mut b = count.to_be_bytes().to_vec();
            b.push(encoding);
            b.extend(len.to_be_bytes());
            b.extend(body);
            b
        };
        let _ = recv_pages_checked(input);
    }
}

// ---- hash lists, held bitmaps, chunk id lists and chunk streams ----

/// What a chunk stream parser must answer for `input`, computed independently: every record
/// read in order, each id announced and new, each length within the cap, each content
/// matching its id; anything else an error.
fn expected_chunks(
    input: &[u8],
    expected: &std::collections::HashSet<Hash>,
    count: u64,
    max_len: u32,
) -> Result<Vec<(Hash, Vec<u8>)>, ()> {
    if count > expected.len() as u64 {
        return Err(());
    }
    let mut out = vec![];
    let mut seen = std::collections::HashSet::new();
    let mut at = 0usize;
    for _ in 0..count {
        let id: Hash = input.get(at..at + 32).ok_or(())?.try_into().unwrap();
        let len = be32(input, at + 32).ok_or(())?;
        if len == 0 || len > max_len || !expected.contains(&id) || !seen.insert(id) {
            return Err(());
        }
        let data = input.get(at + 36..at + 36 + len as usize).ok_or(())?;
        if *blake3::hash(data).as_bytes() != id {
            return Err(());
        }
        out.push((id, data.to_vec()));
        at += 36 + len as usize;
    }
    Ok(out)
}

fn read_chunks(
    input: Vec<u8>,
    expected: std::collections::HashSet<Hash>,
    count: u64,
    max_len: u32,
) -> Result<Vec<(Hash, Vec<u8>)>, ()> {
    within("a chunk stream", move || {
        block_on(async {
            let mut r = &input[..];
            let mut s = ChunkStream::new(expected, count, max_len).map_err(|_| ())?;
            let mut out = vec![];
            while let Some(c) = s.next(&mut r).await.map_err(|_| ())? {
                out.push(c);
            }
            Ok(out)
        })
    })
}

fn chunk_fields(b: &[u8]) -> Vec<usize> {
    // Length fields sit 32 bytes into each record, as far as the records parse.
    let mut out = vec![];
    let mut at = 0usize;
    while let Some(len) = be32(b, at + 32) {
        out.push(at + 32);
        at = match at.checked_add(36 + len as usize) {
            Some(n) if n <= b.len() => n,
            _ => break,
        };
    }
    out
}

fn chunk_set() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(
        (1usize..300, any::<u64>()).prop_map(|(len, seed)| noise(len, seed)),
        0..6,
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn hash_lists_read_what_was_written_or_fail(
        hashes in prop::collection::vec(any::<[u8; 32]>(), 0..40),
        announced_delta in -3i64..=3,
        max in prop::sample::select(vec![0u64, 5, 39, 1 << 22]),
        cut in any::<Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = vec![];
        block_on(write_hashes(&mut bytes, &hashes)).unwrap();
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let count = (hashes.len() as i64 + announced_delta).max(0) as u64;
        let input = bytes.clone();
        let got = within("a hash list", move || block_on(read_hashes(&mut &input[..], count, max)));
        let whole = count as usize * 32 <= bytes.len();
        match got {
            Ok(v) => {
                prop_assert!(count <= max && whole);
                prop_assert_eq!(v.len() as u64, count);
                for (i, h) in v.iter().enumerate() {
                    prop_assert_eq!(&h[..], &bytes[i * 32..i * 32 + 32]);
                }
            }
            Err(TransferError::TooLarge { .. }) => prop_assert!(count > max),
            Err(TransferError::Truncated { .. }) => prop_assert!(count <= max && !whole),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn bitmaps_round_trip_and_refuse_anything_else(
        bits in prop::collection::vec(any::<bool>(), 0..70),
        text in "[0-9a-fA-Fxz ]{0,24}",
        count in 0usize..100,
    ) {
        let enc = encode_bitmap(&bits);
        prop_assert_eq!(decode_bitmap(&enc, bits.len()).unwrap(), bits.clone());
        // Any other text: either refused, or exactly `count` bits whose encoding is the text.
        if let Ok(v) = decode_bitmap(&text, count) {
            prop_assert_eq!(v.len(), count);
            prop_assert_eq!(encode_bitmap(&v), text.to_lowercase());
        }
        if !bits.is_empty() {
            prop_assert!(decode_bitmap(&enc, bits.len() + 8).is_err());
        }
    }

    #[test]
    fn chunk_id_lists_accept_only_distinct_ids(
        ids in prop::collection::vec(
            prop_oneof![
                any::<[u8; 32]>().prop_map(hex::encode),
                "[0-9a-fA-F]{62,66}",
                ".{0,70}",
            ],
            0..8,
        ),
        dup in any::<Option<Index>>(),
        max in 0usize..10,
    ) {
        let mut ids = ids;
        if let (Some(i), false) = (dup, ids.is_empty()) {
            let c = ids[i.index(ids.len())].clone();
            ids.push(c);
        }
        let got = parse_chunk_ids(&ids, max);
        let valid = ids.len() <= max
            && ids.iter().all(|s| s.len() == 64 && s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
            && ids.iter().collect::<std::collections::HashSet<_>>().len() == ids.len();
        prop_assert_eq!(got.is_ok(), valid);
        if let Ok(v) = got {
            for (s, h) in ids.iter().zip(v) {
                prop_assert_eq!(s, &hex::encode(h));
            }
        }
    }

    #[test]
    fn chunk_streams_match_the_format(
        chunks in chunk_set(),
        extra_expected in prop::collection::vec(any::<[u8; 32]>(), 0..3),
        count_delta in -2i64..=2,
        max_len in prop::sample::select(vec![1u32, 100, 299, 1 << 18]),
        muts in prop::collection::vec(mutation(), 0..4),
    ) {
        let mut valid = vec![];
        let mut expected = std::collections::HashSet::new();
        block_on(async {
            for c in &chunks {
                let id = *blake3::hash(c).as_bytes();
                expected.insert(id);
                write_chunk(&mut valid, &id, c).await.unwrap();
            }
        });
        expected.extend(extra_expected);
        let count = (chunks.len() as i64 + count_delta).max(0) as u64;
        let input = mutate(valid, &muts, &chunk_fields);
        let want = expected_chunks(&input, &expected, count, max_len);
        let got = read_chunks(input, expected, count, max_len);
        prop_assert_eq!(&got, &want);
        if muts.is_empty() && count_delta == 0 && chunks.iter().all(|c| c.len() as u32 <= max_len)
            && chunks.iter().map(|c| blake3::hash(c)).collect::<std::collections::HashSet<_>>().len() == chunks.len()
        {
            prop_assert_eq!(got.unwrap().len(), chunks.len());
        }
    }

    #[test]
    fn chunk_streams_of_random_bytes_match_the_format(
        input in prop::collection::vec(any::<u8>(), 0..400),
        count in 0u64..4,
    ) {
        // Random ids are never expected ones, except by seeding the set with the input's own.
        let mut expected = std::collections::HashSet::new();
        if let Some(id) = input.get(..32) {
            expected.insert(<Hash>::try_from(id).unwrap());
        }
        expected.insert([7u8; 32]);
        expected.insert([9u8; 32]);
        expected.insert([11u8; 32]);
        let want = expected_chunks(&input, &expected, count, 1 << 18);
        prop_assert_eq!(read_chunks(input, expected, count, 1 << 18), want);
    }
}

// ---- regressions: exact inputs of findings ----

#[test]
fn arena_walks_are_stable() {
    // The harness itself: two walks of an untouched arena agree.
    let a = Arena::new();
    assert_eq!(walk(a.top.path()), a.before);
    a.check_confined();
}

#[test]
fn recv_tree_is_exported_for_plain_use() {
    // `recv_tree` (not only `recv_tree_with`) on the smallest valid stream.
    let (_, stream, _) = &seeds().streams[3];
    let a = Arena::new();
    let mut r = &stream[..];
    block_on(recv_tree(&mut r, &a.dest(), tree_limits())).unwrap();
    a.check_confined();
}

fn dir_or(path: &str, kind: GenKind) -> GenRecord {
    GenRecord::Entry {
        path: path.into(),
        kind,
        mode: 0o755,
        uid: 0,
        mtime_ns: 0,
        xattrs: vec![],
    }
}

/// Found by `tree_generated_records_stay_confined`: the mode and mtime of a directory received
/// earlier were applied at the end through a symlink that the peer sent in place of its parent,
/// so `chmod`/`utimensat` hit `sentinel/b`, outside the destination (as root: any directory of
/// the host). Fixed in `shared_fs::Applier::finish` (via `Applier::recorded_dir`): a recorded
/// directory whose parent is now a symlink is skipped.
#[test]
fn regression_dir_fixup_does_not_follow_a_symlink_put_in_place_of_its_parent() {
    let records = [
        dir_or("a/b", GenKind::Dir),
        dir_or("a", GenKind::Symlink("../sentinel".into())),
    ];
    for durable in [false, true] {
        // `recv_records` checks that nothing outside the destination changed.
        let st = recv_records(&records, 0, durable).unwrap();
        assert_eq!(st.entries, 2);
    }
}

/// Found by `tree_generated_records_stay_confined` (a hang): with `durable`, `finish` opened
/// every directory it had touched to sync it, and `a` had been replaced by a FIFO, so `open`
/// blocked forever. Fixed in `shared_fs::Applier::finish`: directories are opened with
/// `O_DIRECTORY | O_NOFOLLOW`, and what is no longer a directory is skipped.
#[test]
fn regression_durable_finish_does_not_open_a_fifo_put_in_place_of_a_directory() {
    let records = [dir_or("a", GenKind::Dir), dir_or("a", GenKind::Fifo)];
    let st = recv_records(&records, 0, true).unwrap();
    assert_eq!(st.entries, 2);
    // The same with a device node (0:0, an overlay whiteout) in its place: not opened either.
    let records = [dir_or("a", GenKind::Dir), dir_or("a", GenKind::CharDev)];
    recv_records(&records, 0, true).unwrap();
}

mod locations {
    use proptest::prelude::*;
    use transfer::lists::{read_locations, write_locations, Location};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    proptest! {
        /// What is written reads back the same; any cut or any byte changed in a header is
        /// either refused or reads as valid records (never a panic, never past the cap).
        #[test]
        fn location_lists_round_trip_and_refuse_damage(
            recs in proptest::collection::vec((1u32..5000, 0u64..(1 << 40), any::<u64>(), 1usize..6), 0..8),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let locs: Vec<Location> = recs.iter().map(|(pid, page, seq, n)| Location {
                pid: *pid, vaddr: page * 4096, seq: *seq,
                hashes: (0..*n).map(|i| [i as u8; 32]).collect(),
            }).collect();
            let total: u64 = locs.iter().map(|l| l.hashes.len() as u64).sum();
            let rt = rt();
            let mut buf = vec![];
            rt.block_on(write_locations(&mut buf, &locs)).unwrap();
            let back = rt.block_on(read_locations(&mut &buf[..], locs.len() as u64, total)).unwrap();
            prop_assert_eq!(&back, &locs);
            if total > 0 {
                prop_assert!(rt.block_on(read_locations(&mut &buf[..], locs.len() as u64, total - 1)).is_err());
            }
            if !buf.is_empty() {
                let at = cut.index(buf.len());
                prop_assert!(rt.block_on(read_locations(&mut &buf[..at], locs.len() as u64, total)).is_err());
                let mut bad = buf.clone();
                let i = flip.index(bad.len());
                bad[i] = byte;
                if let Ok(v) = rt.block_on(read_locations(&mut &bad[..], locs.len() as u64, 1 << 20)) {
                    for l in v {
                        prop_assert!(!l.hashes.is_empty() && l.vaddr % 4096 == 0);
                        prop_assert!(l.vaddr + l.hashes.len() as u64 * 4096 <= transfer::lists::MAX_ADDRESS);
                    }
                }
            }
        }
    }
}
