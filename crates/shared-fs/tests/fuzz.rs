//! Property-based and mutation tests of the parsers of untrusted input of this crate: base
//! trees (`Store::tree_from_bytes`, `Tree::validate`) and OCI image layouts, layers and
//! archives (`oci::import_oci`, `oci::import_oci_archive`). Inputs are random bytes, generated
//! structures and mutations of valid encodings; the properties hold for any input: no panic,
//! an answer in bounded time, nothing written outside the store, and whatever is accepted
//! follows the documented rules (checked by an oracle written independently of the code).
//! Findings are kept at the end as plain regression tests with their exact input.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Value};
use shared_fs::oci::{import_oci, import_oci_archive};
use shared_fs::store::{Tree, CHUNK_MAX, TREE_VERSION};
use shared_fs::{EntryKind, Limits, Store, MAX_XATTRS, MAX_XATTR_VALUE};

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

/// How long one import may take before it counts as a hang.
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

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// One change to a byte string; positions are scaled to the current length.
#[derive(Clone, Debug)]
enum ByteMut {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, u16),
    Duplicate(Index, u16),
}

fn byte_mut() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteMut::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteMut::SetByte(i, b)),
        1 => any::<Index>().prop_map(ByteMut::Truncate),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| ByteMut::Insert(i, v)),
        1 => (any::<Index>(), 1u16..600).prop_map(|(i, n)| ByteMut::Remove(i, n)),
        1 => (any::<Index>(), 1u16..600).prop_map(|(i, n)| ByteMut::Duplicate(i, n)),
    ]
}

fn mutate_bytes(mut b: Vec<u8>, muts: &[ByteMut]) -> Vec<u8> {
    for m in muts {
        let len = b.len();
        match m {
            ByteMut::FlipBit(i, bit) if len > 0 => b[i.index(len)] ^= 1 << bit,
            ByteMut::SetByte(i, v) if len > 0 => b[i.index(len)] = *v,
            ByteMut::Truncate(i) => b.truncate(i.index(len + 1)),
            ByteMut::Insert(i, v) => {
                let at = i.index(len + 1);
                b.splice(at..at, v.iter().copied());
            }
            ByteMut::Remove(i, n) if len > 0 => {
                let at = i.index(len);
                b.drain(at..(at + usize::from(*n)).min(len));
            }
            ByteMut::Duplicate(i, n) if len > 0 => {
                let at = i.index(len);
                let end = (at + usize::from(*n)).min(len);
                let copy = b[at..end].to_vec();
                b.splice(end..end, copy);
            }
            _ => {}
        }
    }
    b
}

// ---- JSON-aware mutations (for trees, manifests and indexes) ----

const HOSTILE_STRINGS: &[&str] = &[
    "..",
    "../x",
    "a/..",
    "a/../..",
    "/etc",
    "/",
    "",
    "a//b",
    ".",
    "./a",
    "a/./b",
    "a\u{0}b",
    "a/",
    "etc",
    "zz",
    "é",
    "+f",
    "+f+f",
    "0g",
    "Dir",
    "File",
    "user.x",
    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "AF1349B9F5F9A1A6A0404DEA36DCC9499BCB25C9ADC112B7CC9A93CAE41F3262",
    "application/vnd.oci.image.index.v1+json",
];

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(HOSTILE_STRINGS).prop_map(str::to_owned),
        1 => Just("n".repeat(256)),
        1 => Just("a/".repeat(2100) + "a"),
    ]
}

fn hostile_number() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!(0),
        json!(1),
        json!(-1),
        json!(5),
        json!(0o7777),
        json!(0o170_755),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(CHUNK_MAX),
        json!(CHUNK_MAX + 1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1.5),
        json!(2),
    ])
}

fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => hostile_string().prop_map(Value::String),
        2 => hostile_number(),
        3 => prop::sample::select(vec![
            json!(null),
            json!([]),
            json!({}),
            json!("Dir"),
            json!("File"),
            json!("Fifo"),
            json!({"Hardlink": {"target": "etc"}}),
            json!({"Hardlink": {"target": "x"}}),
            json!({"Symlink": {"target": ""}}),
            json!({"Symlink": {"target": "/etc"}}),
            json!({"CharDev": {"rdev": 5}}),
            json!([{"hash": "0000000000000000000000000000000000000000000000000000000000000000", "len": 5}]),
            json!([{"name": "user.x", "value": "+f"}]),
            json!([{"name": "", "value": "00"}]),
            json!([{"name": "user.x", "value": "zz"}]),
        ]),
    ]
}

/// One structural change to a JSON document; nodes are found by [`Index`] among those of the
/// right type, in document order.
#[derive(Clone, Debug)]
enum JsonMut {
    SetString(Index, String),
    SetNumber(Index, Value),
    /// Replaces any node (but the root) with a value.
    SetNode(Index, Value),
    /// Adds (or replaces) a key of an object.
    SetKey(Index, &'static str, Value),
    /// Sets a field of an entry (an object with a `path`) to a value made for that field.
    SetEntryField(Index, &'static str, Value),
    RemoveKey(Index, Index),
    DupElement(Index, Index),
    RemoveElement(Index, Index),
    SwapElements(Index, Index, Index),
}

/// A field of a tree entry with a value that fits it in type but maybe not in content.
fn entry_field() -> impl Strategy<Value = (&'static str, Value)> {
    let xattrs = prop::sample::select(vec![
        json!([{"name": "user.x", "value": "+f"}]),
        json!([{"name": "user.x", "value": "+0+1"}]),
        json!([{"name": "user.x", "value": "00+a"}]),
        json!([{"name": "user.x", "value": "-0"}]),
        json!([{"name": "user.x", "value": "0A"}]),
        json!([{"name": "user.x", "value": "0a"}]),
        json!([{"name": "user.x", "value": "0"}]),
        json!([{"name": "user.x", "value": "zz"}]),
        json!([{"name": "user.x", "value": "\u{e9}"}]),
        json!([{"name": "", "value": "00"}]),
        json!([{"name": "a\u{0}b", "value": "00"}]),
        json!([{"name": "user.b", "value": "00"}, {"name": "user.a", "value": "00"}]),
    ]);
    let kinds = prop::sample::select(vec![
        json!("Dir"),
        json!("File"),
        json!("Fifo"),
        json!({"Hardlink": {"target": "etc"}}),
        json!({"Hardlink": {"target": "empty"}}),
        json!({"Symlink": {"target": ""}}),
        json!({"Symlink": {"target": "/etc"}}),
        json!({"BlockDev": {"rdev": 2049}}),
    ]);
    let chunks = prop::sample::select(vec![
        json!([]),
        json!([{"hash": "0000000000000000000000000000000000000000000000000000000000000000", "len": 0}]),
        json!([{"hash": "0000000000000000000000000000000000000000000000000000000000000000", "len": 6}]),
        json!([{"hash": "00", "len": 6}]),
    ]);
    prop_oneof![
        xattrs.prop_map(|v| ("xattrs", v)),
        hostile_number().prop_map(|v| ("mode", v)),
        kinds.prop_map(|v| ("kind", v)),
        chunks.prop_map(|v| ("chunks", v)),
        hostile_string().prop_map(|v| ("path", Value::String(v))),
        hostile_number().prop_map(|v| ("size", v)),
        prop_oneof![Just(Value::Null), hostile_string().prop_map(Value::String)]
            .prop_map(|v| ("blake3", v)),
    ]
}

fn json_mut() -> impl Strategy<Value = JsonMut> {
    let key = prop::sample::select(vec![
        "path",
        "kind",
        "mode",
        "size",
        "chunks",
        "blake3",
        "xattrs",
        "version",
        "entries",
        "digest",
        "mediaType",
        "layers",
        "manifests",
        "annotations",
    ]);
    prop_oneof![
        4 => (any::<Index>(), hostile_string()).prop_map(|(i, s)| JsonMut::SetString(i, s)),
        3 => (any::<Index>(), hostile_number()).prop_map(|(i, v)| JsonMut::SetNumber(i, v)),
        1 => (any::<Index>(), hostile_value()).prop_map(|(i, v)| JsonMut::SetNode(i, v)),
        2 => (any::<Index>(), key, hostile_value()).prop_map(|(i, k, v)| JsonMut::SetKey(i, k, v)),
        4 => (any::<Index>(), entry_field()).prop_map(|(i, (k, v))| JsonMut::SetEntryField(i, k, v)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| JsonMut::RemoveKey(i, j)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| JsonMut::DupElement(i, j)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| JsonMut::RemoveElement(i, j)),
        2 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(i, j, k)| JsonMut::SwapElements(i, j, k)),
    ]
}

/// JSON pointers of every node of `v`, in document order.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(x, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

fn mutate_json(mut v: Value, muts: &[JsonMut]) -> Value {
    for m in muts {
        let mut all = vec![];
        pointers(&v, String::new(), &mut all);
        let of = |pred: &dyn Fn(&Value) -> bool| -> Vec<String> {
            all.iter()
                .filter(|p| v.pointer(p).is_some_and(pred))
                .cloned()
                .collect()
        };
        let pick = |ps: &[String], i: &Index| -> Option<String> {
            (!ps.is_empty()).then(|| ps[i.index(ps.len())].clone())
        };
        match m {
            JsonMut::SetString(i, s) => {
                if let Some(p) = pick(&of(&Value::is_string), i) {
                    *v.pointer_mut(&p).unwrap() = Value::String(s.clone());
                }
            }
            JsonMut::SetNumber(i, n) => {
                if let Some(p) = pick(&of(&Value::is_number), i) {
                    *v.pointer_mut(&p).unwrap() = n.clone();
                }
            }
            JsonMut::SetNode(i, n) => {
                if let Some(p) = pick(&all[1.min(all.len())..], i) {
                    *v.pointer_mut(&p).unwrap() = n.clone();
                }
            }
            JsonMut::SetKey(i, k, n) => {
                if let Some(p) = pick(&of(&Value::is_object), i) {
                    v.pointer_mut(&p)
                        .unwrap()
                        .as_object_mut()
                        .unwrap()
                        .insert((*k).to_owned(), n.clone());
                }
            }
            JsonMut::SetEntryField(i, k, n) => {
                let entries = of(&|x: &Value| x.get("path").is_some());
                if let Some(p) = pick(&entries, i) {
                    v.pointer_mut(&p)
                        .unwrap()
                        .as_object_mut()
                        .unwrap()
                        .insert((*k).to_owned(), n.clone());
                }
            }
            JsonMut::RemoveKey(i, j) => {
                if let Some(p) = pick(&of(&Value::is_object), i) {
                    let o = v.pointer_mut(&p).unwrap().as_object_mut().unwrap();
                    let keys: Vec<String> = o.keys().cloned().collect();
                    if let Some(k) = pick(&keys, j) {
                        o.remove(&k);
                    }
                }
            }
            JsonMut::DupElement(i, j) | JsonMut::RemoveElement(i, j) => {
                let arrays = of(&|x: &Value| x.as_array().is_some_and(|a| !a.is_empty()));
                if let Some(p) = pick(&arrays, i) {
                    let a = v.pointer_mut(&p).unwrap().as_array_mut().unwrap();
                    let at = j.index(a.len());
                    if matches!(m, JsonMut::DupElement(..)) {
                        let x = a[at].clone();
                        a.insert(at, x);
                    } else {
                        a.remove(at);
                    }
                }
            }
            JsonMut::SwapElements(i, j, k) => {
                let arrays = of(&|x: &Value| x.as_array().is_some_and(|a| a.len() > 1));
                if let Some(p) = pick(&arrays, i) {
                    let a = v.pointer_mut(&p).unwrap().as_array_mut().unwrap();
                    let (x, y) = (j.index(a.len()), k.index(a.len()));
                    a.swap(x, y);
                }
            }
        }
    }
    v
}

// ---- base trees ----

fn tree_limits() -> Limits {
    Limits {
        max_entries: 64,
        max_file_size: 1 << 20,
        max_total_bytes: 4 << 20,
        ..Limits::default()
    }
}

/// The rules of `Tree::validate` and of `EntryMeta`'s documentation, written independently.
fn oracle(t: &Tree, l: &Limits) -> Result<(), String> {
    let hex64 = |s: &str| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let confined = |p: &str| {
        !p.is_empty()
            && p.len() <= l.max_path_len
            && !p.starts_with('/')
            && !p.contains('\0')
            && p.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255)
    };
    if t.version != TREE_VERSION {
        return Err("version".into());
    }
    if t.entries.len() as u64 > l.max_entries {
        return Err("too many entries".into());
    }
    let mut dirs = vec![String::new()];
    let mut files: Vec<&str> = vec![];
    let mut total = 0u64;
    for (i, e) in t.entries.iter().enumerate() {
        let m = &e.meta;
        if !confined(&m.path) {
            return Err(format!("path {:?} not confined", m.path));
        }
        if i > 0 && t.entries[i - 1].meta.path >= m.path {
            return Err(format!("{:?} out of order", m.path));
        }
        let parent = m.path.rsplit_once('/').map_or("", |(p, _)| p);
        if !dirs.iter().any(|d| d == parent) {
            return Err(format!("{:?} before its directory", m.path));
        }
        if m.mode > 0o7777 {
            return Err(format!(
                "{:?}: mode {:o} has more than permission bits",
                m.path, m.mode
            ));
        }
        if m.xattrs.len() > MAX_XATTRS {
            return Err("too many xattrs".into());
        }
        for x in &m.xattrs {
            if x.name.is_empty() || x.name.len() > 255 || x.name.contains('\0') {
                return Err(format!("xattr name {:?}", x.name));
            }
            if x.value.len() % 2 != 0
                || x.value.len() > 2 * MAX_XATTR_VALUE
                || !x.value.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(format!("xattr value {:?} is not hex", x.value));
            }
        }
        match &m.kind {
            EntryKind::File => {
                total = total.saturating_add(m.size);
                if m.size > l.max_file_size || total > l.max_total_bytes {
                    return Err("too large".into());
                }
                let mut sum = 0u64;
                for c in &e.chunks {
                    if !hex64(&c.hash) || c.len == 0 || c.len > CHUNK_MAX {
                        return Err("chunk".into());
                    }
                    sum += u64::from(c.len);
                }
                if sum != m.size || !e.blake3.as_deref().is_some_and(hex64) {
                    return Err("file content".into());
                }
                files.push(&m.path);
            }
            kind => {
                if !e.chunks.is_empty() || m.size != 0 || e.blake3.is_some() {
                    return Err("content on a non-file".into());
                }
                match kind {
                    EntryKind::Dir => dirs.push(m.path.clone()),
                    EntryKind::Hardlink { target } if !files.contains(&target.as_str()) => {
                        return Err("hard link".into())
                    }
                    EntryKind::Symlink { target }
                        if target.is_empty()
                            || target.len() > l.max_path_len
                            || target.contains('\0') =>
                    {
                        return Err("symlink target".into())
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Valid tree encodings, from real directories imported into a store.
struct TreeSeeds {
    _dir: tempfile::TempDir,
    store: Store,
    trees: Vec<Vec<u8>>,
}

fn tree_seeds() -> &'static TreeSeeds {
    static SEEDS: OnceLock<TreeSeeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(&dir.path().join("store"), tree_limits()).unwrap();
        let mut trees = vec![];
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("etc/ssl")).unwrap();
        fs::create_dir_all(a.join("usr/bin")).unwrap();
        fs::write(a.join("etc/hostname"), b"ferry\n").unwrap();
        fs::write(a.join("usr/bin/tool"), noise(300_000, 1)).unwrap();
        fs::hard_link(a.join("usr/bin/tool"), a.join("usr/bin/tool-again")).unwrap();
        fs::write(a.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("../usr/bin/tool", a.join("etc/link")).unwrap();
        let ok = std::process::Command::new("setfattr")
            .args(["-n", "user.ferry", "-v", "base"])
            .arg(a.join("etc/hostname"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "setfattr (package attr) must work here");
        let b = dir.path().join("b");
        fs::create_dir_all(b.join("only/dirs")).unwrap();
        let c = dir.path().join("c");
        fs::create_dir(&c).unwrap();
        for d in [&a, &b, &c] {
            let (id, _) = store.import_dir(d).unwrap();
            trees.push(store.tree_bytes(&id).unwrap());
        }
        TreeSeeds {
            _dir: dir,
            store,
            trees,
        }
    })
}

/// Parses `bytes` as a tree received under its own id and checks the outcome against the
/// oracle, both ways: whatever is accepted follows the rules, and a tree that follows the rules
/// is accepted.
fn check_tree_bytes(bytes: &[u8]) -> Result<(), String> {
    let store = &tree_seeds().store;
    let id = blake3::hash(bytes).to_hex().to_string();
    let got = store.tree_from_bytes(&id, bytes);
    let parsed = serde_json::from_slice::<Tree>(bytes);
    let verdict = parsed
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|t| oracle(t, store.limits()));
    match (&got, &verdict) {
        (Ok(t), Ok(())) => assert_eq!(Some(t), parsed.as_ref().ok()),
        (Ok(_), Err(why)) => panic!("accepted an invalid tree: {why}"),
        (Err(e), Ok(())) => panic!("refused a valid tree: {e}"),
        (Err(_), Err(_)) => {}
    }
    // The same bytes under any other id are refused before they are parsed.
    let mut other = id.into_bytes();
    other[0] = if other[0] == b'0' { b'1' } else { b'0' };
    assert!(store
        .tree_from_bytes(std::str::from_utf8(&other).unwrap(), bytes)
        .is_err());
    got.map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn tree_seeds_are_valid() {
    for t in &tree_seeds().trees {
        check_tree_bytes(t).unwrap();
    }
}

const TREE_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"version\"",
    "\"entries\"",
    "\"path\"",
    "\"kind\"",
    "\"mode\"",
    "\"uid\"",
    "\"gid\"",
    "\"mtime_ns\"",
    "\"size\"",
    "\"chunks\"",
    "\"blake3\"",
    "\"xattrs\"",
    "\"hash\"",
    "\"len\"",
    "\"name\"",
    "\"value\"",
    "\"Dir\"",
    "\"File\"",
    "\"Fifo\"",
    "\"Symlink\"",
    "\"Hardlink\"",
    "\"target\"",
    "\"a\"",
    "\"a/b\"",
    "\"..\"",
    "\"/etc\"",
    "\"\"",
    "0",
    "1",
    "-1",
    "420",
    "18446744073709551615",
    "null",
    "true",
    "\"\\u0000\"",
    "\"0000000000000000000000000000000000000000000000000000000000000000\"",
];

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn tree_mutations_of_valid_trees_follow_the_rules(
        seed in 0usize..3,
        jm in prop::collection::vec(json_mut(), 0..3),
        bm in prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(byte_mut(), 1..3)],
        pretty in any::<bool>(),
    ) {
        let valid: Value = serde_json::from_slice(&tree_seeds().trees[seed]).unwrap();
        let v = mutate_json(valid, &jm);
        let bytes = if pretty {
            serde_json::to_vec_pretty(&v).unwrap()
        } else {
            serde_json::to_vec(&v).unwrap()
        };
        let bytes = mutate_bytes(bytes, &bm);
        let res = check_tree_bytes(&bytes);
        if jm.is_empty() && bm.is_empty() {
            prop_assert!(res.is_ok(), "{:?}", res);
        }
    }

    #[test]
    fn tree_random_json_follows_the_rules(
        tokens in prop::collection::vec(prop::sample::select(TREE_TOKENS), 0..60),
        wrap in any::<bool>(),
        raw in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = if wrap { b"{\"version\":1,\"entries\":[".to_vec() } else { vec![] };
        bytes.extend(tokens.concat().into_bytes());
        if wrap {
            bytes.extend(b"]}");
        }
        let _ = check_tree_bytes(&bytes);
        let _ = check_tree_bytes(&raw);
    }

    #[test]
    fn tree_validate_agrees_with_the_rules_under_any_limits(
        seed in 0usize..3,
        jm in prop::collection::vec(json_mut(), 0..3),
        max_entries in prop::sample::select(vec![0u64, 1, 3, 64]),
        max_file_size in prop::sample::select(vec![0u64, 6, 300_000, 1 << 20]),
        max_total_bytes in prop::sample::select(vec![0u64, 6, 600_000, 4 << 20]),
        max_path_len in prop::sample::select(vec![1usize, 8, 4096]),
    ) {
        let valid: Value = serde_json::from_slice(&tree_seeds().trees[seed]).unwrap();
        let v = mutate_json(valid, &jm);
        if let Ok(t) = serde_json::from_value::<Tree>(v) {
            let l = Limits { max_entries, max_file_size, max_total_bytes, max_path_len };
            let got = t.validate(&l).map_err(|e| e.to_string());
            let want = oracle(&t, &l);
            prop_assert_eq!(got.is_ok(), want.is_ok(), "validate {:?}, rules {:?}", got, want);
        }
    }
}

// ---- OCI layouts ----

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Dir {
        mode: u32,
        mtime: i64,
    },
    File {
        mode: u32,
        mtime: i64,
        hash: [u8; 32],
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
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let r = if rel.is_empty() {
                e.file_name().to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", e.file_name().to_string_lossy())
            };
            let md = fs::symlink_metadata(&p).unwrap();
            let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            let node = if md.file_type().is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&p).unwrap(),
                }
            } else if md.is_dir() {
                stack.push((p, r.clone()));
                Node::Dir {
                    mode: md.mode(),
                    mtime,
                }
            } else if md.is_file() {
                Node::File {
                    mode: md.mode(),
                    mtime,
                    hash: *blake3::hash(&fs::read(&p).unwrap()).as_bytes(),
                }
            } else {
                Node::Other { mode: md.mode() }
            };
            out.push((r, node));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A store next to a sentinel directory, a FIFO and the input: an import must change nothing
/// but the store.
struct Arena {
    top: tempfile::TempDir,
    before: Vec<(String, Node)>,
}

impl Arena {
    /// `fill` writes the input (a layout or an archive) under the top directory.
    fn new(fill: impl FnOnce(&Path)) -> Arena {
        let top = tempfile::tempdir().unwrap();
        let s = top.path().join("sentinel");
        for d in ["blobs/sha256", "a/b", "etc"] {
            fs::create_dir_all(s.join(d)).unwrap();
        }
        fs::write(s.join("etc/passwd"), b"keep").unwrap();
        let ok = std::process::Command::new("mkfifo")
            .arg(top.path().join("fifo"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mkfifo must work here");
        fill(top.path());
        let before = walk(top.path());
        Arena { top, before }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.top.path().join(rel)
    }

    /// Nothing but the store changed; the store holds only its own directories, its scratch
    /// space is empty, and an accepted tree follows the rules.
    fn check(&self, res: &Result<String, String>) {
        let now = walk(self.top.path());
        let outside = |v: &[(String, Node)]| -> Vec<(String, Node)> {
            v.iter()
                .filter(|(p, _)| p != "store" && !p.starts_with("store/"))
                .cloned()
                .collect()
        };
        let (is, was) = (outside(&now), outside(&self.before));
        if is != was {
            let changed: Vec<_> = is.iter().filter(|x| !was.contains(x)).collect();
            let gone: Vec<_> = was.iter().filter(|x| !is.contains(x)).collect();
            panic!("something outside the store changed: now {changed:?}, was {gone:?}");
        }
        let mut top: Vec<String> = fs::read_dir(self.path("store"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(top, ["chunks", "images", "layers", "tmp", "trees"]);
        assert_eq!(
            fs::read_dir(self.path("store/tmp")).unwrap().count(),
            0,
            "scratch left"
        );
        if let Ok(id) = res {
            let store = Store::open_with(&self.path("store"), oci_limits()).unwrap();
            let tree = store.get_tree(id).expect("an imported tree reads back");
            oracle(&tree, store.limits()).expect("an imported tree follows the rules");
            for c in tree.chunks().keys() {
                assert!(store.has_chunk(c), "chunk {c} of the tree is stored");
            }
        }
    }
}

fn oci_limits() -> Limits {
    Limits {
        max_entries: 200,
        max_file_size: 1 << 20,
        max_total_bytes: 4 << 20,
        ..Limits::default()
    }
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Writes a blob; returns its descriptor.
fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> Value {
    let hex = sha256_hex(bytes);
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// One tar entry, with names written raw so that hostile ones are possible.
#[derive(Clone, Debug)]
enum TarEnt {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Dir(String),
    Symlink(String, String),
    Link(String, String),
    Fifo(String),
    CharDev(String),
    /// A GNU sparse file of `real` bytes, the last 512 of them stored.
    Sparse(String, u64),
    /// A file preceded by a PAX header (extended attributes, or raw records).
    Pax {
        path: String,
        records: Vec<u8>,
    },
    /// A file whose name comes from a GNU long-name entry.
    LongName(String),
    /// A header with an announced size and no data.
    Raw {
        path: String,
        kind: u8,
        size: u64,
    },
}

fn raw_header(path: &[u8], kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    let n = path.len().min(100);
    name[..n].copy_from_slice(&path[..n]);
    h.set_cksum();
    h
}

fn set_link(h: &mut tar::Header, target: &str) {
    let l = &mut h.as_old_mut().linkname;
    l.fill(0);
    let n = target.len().min(100);
    l[..n].copy_from_slice(&target.as_bytes()[..n]);
    h.set_cksum();
}

fn build_tar(ents: &[TarEnt]) -> Vec<u8> {
    let mut b = tar::Builder::new(vec![]);
    for e in ents {
        match e {
            TarEnt::File { path, data, mode } => {
                let h = raw_header(
                    path.as_bytes(),
                    tar::EntryType::Regular,
                    data.len() as u64,
                    *mode,
                );
                b.append(&h, &data[..]).unwrap();
            }
            TarEnt::Dir(p) => {
                b.append(
                    &raw_header(p.as_bytes(), tar::EntryType::Directory, 0, 0o755),
                    &[][..],
                )
                .unwrap();
            }
            TarEnt::Symlink(p, t) | TarEnt::Link(p, t) => {
                let kind = if matches!(e, TarEnt::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = raw_header(p.as_bytes(), kind, 0, 0o777);
                set_link(&mut h, t);
                b.append(&h, &[][..]).unwrap();
            }
            TarEnt::Fifo(p) => {
                b.append(
                    &raw_header(p.as_bytes(), tar::EntryType::Fifo, 0, 0o644),
                    &[][..],
                )
                .unwrap();
            }
            TarEnt::CharDev(p) => {
                let mut h = raw_header(p.as_bytes(), tar::EntryType::Char, 0, 0o644);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            TarEnt::Sparse(p, real) => {
                let mut h = raw_header(p.as_bytes(), tar::EntryType::GNUSparse, 512, 0o644);
                let g = h.as_gnu_mut().unwrap();
                g.sparse[0].set_offset(real.saturating_sub(512));
                g.sparse[0].set_length(512);
                g.set_real_size(*real);
                h.set_cksum();
                b.append(&h, &[7u8; 512][..]).unwrap();
            }
            TarEnt::Pax { path, records } => {
                let h = raw_header(
                    b"PaxHeaders/x",
                    tar::EntryType::XHeader,
                    records.len() as u64,
                    0o644,
                );
                b.append(&h, &records[..]).unwrap();
                let h = raw_header(path.as_bytes(), tar::EntryType::Regular, 2, 0o644);
                b.append(&h, &b"x\n"[..]).unwrap();
            }
            TarEnt::LongName(p) => {
                let mut name = p.as_bytes().to_vec();
                name.push(0);
                let h = raw_header(
                    b"././@LongLink",
                    tar::EntryType::GNULongName,
                    name.len() as u64,
                    0o644,
                );
                b.append(&h, &name[..]).unwrap();
                let h = raw_header(b"short", tar::EntryType::Regular, 2, 0o644);
                b.append(&h, &b"y\n"[..]).unwrap();
            }
            TarEnt::Raw { path, kind, size } => {
                let mut h = raw_header(path.as_bytes(), tar::EntryType::new(*kind), 0, 0o644);
                h.set_size(*size);
                h.set_cksum();
                // The header alone: the data it announces is missing.
                let mut raw = b.into_inner().unwrap();
                raw.truncate(raw.len() - 1024); // the end-of-archive blocks into_inner added
                raw.extend_from_slice(h.as_bytes());
                b = tar::Builder::new(raw);
            }
        }
    }
    b.into_inner().unwrap()
}

fn tar_path() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop::sample::select(vec![
            "a", "a/b", "a/b/c", "b", "etc/passwd", "etc", "bin/tool", "a/f", "b/f",
        ])
        .prop_map(str::to_owned),
        3 => prop::sample::select(vec![
            "./a", "/a/b", "a/", ".wh.a", "a/.wh.b", "a/.wh..wh..opq", ".wh..wh..opq", ".wh.",
            "etc/.wh.passwd", ".wh.etc",
        ])
        .prop_map(str::to_owned),
        2 => prop::sample::select(vec![
            "..", "../x", "a/../../x", "a//b", "a/./b", "", ".", "/", "../sentinel/etc/passwd",
            "a/b/../../..", "\u{e9}t\u{e9}",
        ])
        .prop_map(str::to_owned),
    ]
}

fn tar_target() -> impl Strategy<Value = String> {
    prop_oneof![
        tar_path(),
        prop::sample::select(vec!["../sentinel", "/etc/passwd", "../../fifo"])
            .prop_map(str::to_owned),
    ]
}

fn tar_ent() -> impl Strategy<Value = TarEnt> {
    let pax_records = prop_oneof![
        Just(b"25 SCHILY.xattr.user.x=v\n".to_vec()),
        Just(b"30 SCHILY.xattr.security.t=v\n".to_vec()),
        Just(b"20 path=etc/passwd\n".to_vec()),
        Just(b"16 path=../../x\n".to_vec()),
        Just(b"12 size=99\n".to_vec()),
        Just(b"999999 a=b\n".to_vec()),
        Just(b"5 =\n".to_vec()),
        Just(b"0 \n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    prop_oneof![
        6 => (tar_path(), prop::collection::vec(prop::sample::select(vec![0u8, b'a']), 0..600), prop::sample::select(vec![0o644u32, 0o755, 0o4755, 0o7777]))
            .prop_map(|(path, data, mode)| TarEnt::File { path, data, mode }),
        4 => tar_path().prop_map(TarEnt::Dir),
        2 => (tar_path(), tar_target()).prop_map(|(p, t)| TarEnt::Symlink(p, t)),
        2 => (tar_path(), tar_target()).prop_map(|(p, t)| TarEnt::Link(p, t)),
        1 => tar_path().prop_map(TarEnt::Fifo),
        1 => tar_path().prop_map(TarEnt::CharDev),
        1 => (tar_path(), prop::sample::select(vec![1024u64, 2 << 20, 1 << 40]))
            .prop_map(|(p, r)| TarEnt::Sparse(p, r)),
        1 => (tar_path(), pax_records).prop_map(|(path, records)| TarEnt::Pax { path, records }),
        1 => prop::sample::select(vec![
            format!("a/{}", "n".repeat(150)),
            format!("{}/../../x", "n".repeat(120)),
            format!("/{}", "a/".repeat(60)),
        ])
        .prop_map(TarEnt::LongName),
        1 => (tar_path(), prop::sample::select(vec![b'0', b'5', b'x', b'g', b'L', b'K', b'S', b'Z']), prop::sample::select(vec![0u64, 1, 1 << 33]))
            .prop_map(|(path, kind, size)| TarEnt::Raw { path, kind, size }),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn compress(c: Compression, raw: &[u8]) -> Vec<u8> {
    match c {
        Compression::None => raw.to_vec(),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
            gz.write_all(raw).unwrap();
            gz.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(raw, 1).unwrap(),
    }
}

fn compression() -> impl Strategy<Value = Compression> {
    prop::sample::select(vec![
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
    ])
}

/// A layer: tar entries, then mutations of the tar, compression, then mutations of the blob.
#[derive(Clone, Debug)]
struct Layer {
    ents: Vec<TarEnt>,
    tar_muts: Vec<ByteMut>,
    /// Whether header checksums are recomputed after `tar_muts`.
    fix_checksums: bool,
    comp: Compression,
    blob_muts: Vec<ByteMut>,
}

impl Layer {
    fn bytes(&self) -> Vec<u8> {
        let mut tar = mutate_bytes(build_tar(&self.ents), &self.tar_muts);
        if self.fix_checksums {
            fix_checksums(&mut tar);
        }
        mutate_bytes(compress(self.comp, &tar), &self.blob_muts)
    }
}

/// Recomputes the checksum of every 512-byte block that looks like a header (ustar or GNU
/// magic), so that mutations reach the fields behind the checksum.
fn fix_checksums(tar: &mut [u8]) {
    for block in tar.chunks_exact_mut(512) {
        if &block[257..262] == b"ustar" {
            block[148..156].fill(b' ');
            let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
            block[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        }
    }
}

fn layer() -> impl Strategy<Value = Layer> {
    (
        prop::collection::vec(tar_ent(), 0..8),
        prop_oneof![2 => Just(vec![]), 1 => prop::collection::vec(byte_mut(), 1..3)],
        prop::bool::weighted(0.8),
        compression(),
        prop_oneof![6 => Just(vec![]), 1 => prop::collection::vec(byte_mut(), 1..3)],
    )
        .prop_map(|(ents, tar_muts, fix_checksums, comp, blob_muts)| Layer {
            ents,
            tar_muts,
            fix_checksums,
            comp,
            blob_muts,
        })
}

/// The seed layers: what `make_layout` in tests/store.rs builds (a gzip base with files, a hard
/// link and a directory, a plain tar on top with whiteouts and an extended attribute).
fn seed_layers() -> Vec<Layer> {
    let file = |p: &str, d: &[u8]| TarEnt::File {
        path: p.into(),
        data: d.to_vec(),
        mode: 0o644,
    };
    let l1 = vec![
        TarEnt::Dir("bin/".into()),
        TarEnt::Dir("etc/".into()),
        TarEnt::Dir("opt/cache/".into()),
        file("bin/tool", &noise(3000, 8)),
        TarEnt::Link("bin/tool-again".into(), "bin/tool".into()),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file("etc/old", b"to be removed\n"),
        file("opt/cache/a", b"a\n"),
        TarEnt::Symlink("etc/link".into(), "../bin/tool".into()),
    ];
    let l2 = vec![
        file("etc/.wh.old", b""),
        file("opt/cache/.wh..wh..opq", b""),
        file("opt/cache/c", b"c\n"),
        TarEnt::Pax {
            path: "etc/passwd".into(),
            records: b"25 SCHILY.xattr.user.x=v\n".to_vec(),
        },
    ];
    let layer = |ents, comp| Layer {
        ents,
        tar_muts: vec![],
        fix_checksums: true,
        comp,
        blob_muts: vec![],
    };
    vec![layer(l1, Compression::Gzip), layer(l2, Compression::None)]
}

/// Writes an OCI layout with `layers` into `dir`; `manifest_muts` and `index_muts` change the
/// manifest (whose digest is then recomputed) and the index.
fn write_layout(dir: &Path, layers: &[Layer], manifest_muts: &[JsonMut], index_muts: &[JsonMut]) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let ds: Vec<Value> = layers
        .iter()
        .map(|l| blob(dir, "application/vnd.oci.image.layer.v1.tar", &l.bytes()))
        .collect();
    let config = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        br#"{"architecture":"amd64","os":"linux"}"#,
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": ds,
    });
    let manifest = mutate_json(manifest, manifest_muts);
    let mut md = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    md["annotations"] = json!({"org.opencontainers.image.ref.name": "test:1"});
    let index = mutate_json(json!({"schemaVersion": 2, "manifests": [md]}), index_muts);
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn import_layout_checked(arena: &Arena, reference: Option<&'static str>) -> Result<String, String> {
    let (store, layout) = (arena.path("store"), arena.path("layout"));
    let res = within("import_oci", move || {
        let store = Store::open_with(&store, oci_limits()).unwrap();
        import_oci(&store, &layout, reference)
            .map(|(id, _)| id)
            .map_err(|e| e.to_string())
    });
    arena.check(&res);
    res
}

#[test]
fn oci_seed_layout_imports() {
    let arena = Arena::new(|top| write_layout(&top.join("layout"), &seed_layers(), &[], &[]));
    let id = import_layout_checked(&arena, Some("test:1")).unwrap();
    let store = Store::open_with(&arena.path("store"), oci_limits()).unwrap();
    let paths: Vec<String> = store
        .get_tree(&id)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.meta.path)
        .collect();
    assert_eq!(
        paths,
        [
            "bin",
            "bin/tool",
            "bin/tool-again",
            "etc",
            "etc/link",
            "etc/passwd",
            "opt",
            "opt/cache",
            "opt/cache/c"
        ]
    );
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn oci_generated_layers_import_confined(
        layers in prop::collection::vec(layer(), 1..3),
        with_seed in any::<bool>(),
    ) {
        let mut all = if with_seed { seed_layers() } else { vec![] };
        all.extend(layers);
        let arena = Arena::new(|top| write_layout(&top.join("layout"), &all, &[], &[]));
        let _ = import_layout_checked(&arena, None);
    }

    #[test]
    fn oci_mutated_layouts_import_confined(
        tar_muts in prop::collection::vec(byte_mut(), 0..3),
        which in 0usize..2,
        manifest_muts in prop::collection::vec(json_mut(), 0..3),
        index_muts in prop::collection::vec(json_mut(), 0..2),
        random_blob in prop_oneof![3 => Just(None), 1 => prop::collection::vec(any::<u8>(), 0..1200).prop_map(Some)],
    ) {
        let mut layers = seed_layers();
        layers[which].tar_muts = tar_muts.clone();
        let arena = Arena::new(|top| {
            let layout = top.join("layout");
            write_layout(&layout, &layers, &manifest_muts, &index_muts);
            if let Some(b) = &random_blob {
                // Random bytes as the top layer, under their own digest.
                let d = blob(&layout, "application/vnd.oci.image.layer.v1.tar", b);
                let m = json!({"schemaVersion": 2, "layers": [d]});
                let md = blob(&layout, "application/vnd.oci.image.manifest.v1+json", &serde_json::to_vec(&m).unwrap());
                fs::write(layout.join("index.json"), serde_json::to_vec(&json!({"manifests": [md]})).unwrap()).unwrap();
            }
        });
        let res = import_layout_checked(&arena, None);
        if tar_muts.is_empty() && manifest_muts.is_empty() && index_muts.is_empty() && random_blob.is_none() {
            prop_assert!(res.is_ok(), "{:?}", res);
        }
    }
}

// ---- OCI archives ----

/// An entry added to an archive of a layout.
#[derive(Clone, Debug)]
enum ArchiveExtra {
    /// A symlink at a name the import reads, pointing out of the archive.
    Symlink(&'static str, &'static str),
    File(&'static str),
    Dir(&'static str),
}

fn archive_extra() -> impl Strategy<Value = ArchiveExtra> {
    let names = prop::sample::select(vec![
        "index.json",
        "oci-layout",
        "blobs",
        "blobs/sha256",
        "x",
    ]);
    let targets = prop::sample::select(vec![
        "@TOP/fifo",
        "@TOP/sentinel",
        "@TOP/sentinel/etc/passwd",
        "../../../fifo",
        "/dev/null",
    ]);
    prop_oneof![
        (names, targets).prop_map(|(n, t)| ArchiveExtra::Symlink(n, t)),
        prop::sample::select(vec![
            "../escape",
            "blobs/../../escape",
            "/tmp/../escape",
            "x/y"
        ])
        .prop_map(ArchiveExtra::File),
        prop::sample::select(vec!["blobs", "index.json", "../d"]).prop_map(ArchiveExtra::Dir),
    ]
}

fn write_archive(top: &Path, extras: &[ArchiveExtra], first: bool, muts: &[ByteMut]) {
    let layout = top.join("src");
    write_layout(&layout, &seed_layers(), &[], &[]);
    let top_s = top.to_str().unwrap();
    let mut extra = tar::Builder::new(vec![]);
    for e in extras {
        match e {
            ArchiveExtra::Symlink(n, t) => {
                let mut h = raw_header(n.as_bytes(), tar::EntryType::Symlink, 0, 0o777);
                set_link(&mut h, &t.replace("@TOP", top_s));
                extra.append(&h, &[][..]).unwrap();
            }
            ArchiveExtra::File(n) => {
                extra
                    .append(
                        &raw_header(n.as_bytes(), tar::EntryType::Regular, 4, 0o644),
                        &b"evil"[..],
                    )
                    .unwrap();
            }
            ArchiveExtra::Dir(n) => {
                extra
                    .append(
                        &raw_header(n.as_bytes(), tar::EntryType::Directory, 0, 0o755),
                        &[][..],
                    )
                    .unwrap();
            }
        }
    }
    let mut extra = extra.into_inner().unwrap();
    extra.truncate(extra.len() - 1024);
    let mut b = tar::Builder::new(vec![]);
    b.append_dir_all(".", &layout).unwrap();
    let mut main = b.into_inner().unwrap();
    main.truncate(main.len() - 1024);
    // Extras before the layout's entries (the layout's then fail or replace them) or after.
    let mut archive = if first {
        [extra, main].concat()
    } else {
        [main, extra].concat()
    };
    archive.extend([0u8; 1024]);
    fs::write(top.join("image.tar"), mutate_bytes(archive, muts)).unwrap();
    fs::remove_dir_all(&layout).unwrap();
}

fn import_archive_checked(arena: &Arena) -> Result<String, String> {
    let (store, archive) = (arena.path("store"), arena.path("image.tar"));
    let res = within("import_oci_archive", move || {
        let store = Store::open_with(&store, oci_limits()).unwrap();
        import_oci_archive(&store, &archive, None)
            .map(|(id, _)| id)
            .map_err(|e| e.to_string())
    });
    arena.check(&res);
    res
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn oci_archives_import_confined(
        extras in prop::collection::vec(archive_extra(), 0..3),
        first in any::<bool>(),
        muts in prop_oneof![3 => Just(vec![]), 1 => prop::collection::vec(byte_mut(), 1..3)],
    ) {
        let arena = Arena::new(|top| write_archive(top, &extras, first, &muts));
        let res = import_archive_checked(&arena);
        if extras.is_empty() && muts.is_empty() {
            prop_assert!(res.is_ok(), "{:?}", res);
        }
    }
}

// ---- regressions: exact inputs of findings ----

/// The seed tree `seed` with the field `key` of its first entry set to `value`.
fn seed_with_first_entry(seed: usize, key: &str, value: Value) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&tree_seeds().trees[seed]).unwrap();
    v["entries"][0][key] = value;
    serde_json::to_vec(&v).unwrap()
}

/// Found by `tree_mutations_of_valid_trees_follow_the_rules` (seed 1, the mode of its first
/// entry set to 0o170755): a mode with file-type bits was accepted, though `EntryMeta::mode`
/// is permission bits only. Fixed in `Tree::validate` (src/store/tree.rs): modes above 0o7777 are
/// refused.
#[test]
fn regression_tree_mode_with_file_type_bits_is_refused() {
    let bytes = seed_with_first_entry(1, "mode", json!(0o170_755));
    let id = blake3::hash(&bytes).to_hex().to_string();
    let e = tree_seeds().store.tree_from_bytes(&id, &bytes).unwrap_err();
    assert!(e.to_string().contains("more than permission bits"), "{e}");
    assert!(check_tree_bytes(&bytes).is_err());
    // 0o7777 itself is fine.
    check_tree_bytes(&seed_with_first_entry(1, "mode", json!(0o7777))).unwrap();
}

/// Found by `tree_mutations_of_valid_trees_follow_the_rules` (seed 0, its first entry given
/// the extended attribute `user.x` = "+f"): "+f" passed as hex because `u8::from_str_radix`
/// takes a sign. Fixed by decoding with the `hex` crate: hex digits only.
#[test]
fn regression_xattr_value_with_a_sign_is_not_hex() {
    let bytes = seed_with_first_entry(0, "xattrs", json!([{"name": "user.x", "value": "+f"}]));
    let id = blake3::hash(&bytes).to_hex().to_string();
    let e = tree_seeds().store.tree_from_bytes(&id, &bytes).unwrap_err();
    assert!(e.to_string().contains("not hex"), "{e}");
    // Upper case hex digits stay accepted.
    check_tree_bytes(&seed_with_first_entry(
        0,
        "xattrs",
        json!([{"name": "user.x", "value": "0A"}]),
    ))
    .unwrap();
}

/// Found by `oci_archives_import_confined` (extras = [Symlink("index.json", "@TOP/fifo")],
/// after the layout's entries): the archive replaced `index.json` by a symlink to a FIFO outside
/// the store and the import blocked forever opening it (a symlink to `/dev/zero` would have
/// read without end). Fixed in `oci::import_oci_archive` (only regular files and directories are
/// unpacked) and `oci::open_regular` / `oci::read_small` (what a layout's reader opens must be a
/// regular file, opened without blocking, and JSON is read up to its cap only).
#[test]
fn regression_archive_symlink_to_a_fifo_does_not_hang() {
    let extras = [ArchiveExtra::Symlink("index.json", "@TOP/fifo")];
    let arena = Arena::new(|top| write_archive(top, &extras, false, &[]));
    // The symlink is left out: the layout's own index.json is used.
    import_archive_checked(&arena).unwrap();
    // Before the layout's entries it is replaced by them: the same.
    let arena = Arena::new(|top| write_archive(top, &extras, true, &[]));
    import_archive_checked(&arena).unwrap();
}

/// The same reader fix for a layout directory: an `index.json` or `oci-layout` that is a
/// symlink to a FIFO, or a blob that is one, is refused at once.
#[test]
fn regression_layout_files_that_are_fifos_are_refused() {
    for name in ["index.json", "oci-layout", "blob"] {
        let arena = Arena::new(|top| {
            let layout = top.join("layout");
            write_layout(&layout, &seed_layers(), &[], &[]);
            let path = if name == "blob" {
                let index: Value =
                    serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
                let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
                layout
                    .join("blobs/sha256")
                    .join(digest.trim_start_matches("sha256:"))
            } else {
                layout.join(name)
            };
            fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(top.join("fifo"), &path).unwrap();
        });
        let e = import_layout_checked(&arena, None).unwrap_err();
        assert!(e.contains("not a regular file"), "{name}: {e}");
    }
}

/// Writes a layout of one layer whose blob is `blob_bytes` (already compressed or not).
fn write_raw_layer_layout(dir: &Path, blob_bytes: &[u8]) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let layer = blob(dir, "application/vnd.oci.image.layer.v1.tar", blob_bytes);
    let config = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        br#"{"architecture":"amd64","os":"linux"}"#,
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let md = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    let index = json!({"schemaVersion": 2, "manifests": [md]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Bytes of the regular files under `dir`.
fn walkdir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            total += walkdir_bytes(&e.path());
        } else if m.is_file() {
            total += m.len();
        }
    }
    total
}

/// Found in review of the layer reader: a PAX `size` record overrides the header's size, and
/// the per-file cap was checked against the header's (0 here), so a file of any size was
/// chunked into the store before the tree's validation refused it. The cap now applies to
/// the size the entry really has, before anything is read.
#[test]
fn regression_pax_size_cannot_bypass_the_file_size_cap() {
    let big = oci_limits().max_file_size + 4096;
    let tar = {
        let mut b = tar::Builder::new(vec![]);
        let record = format!(" size={big}\n");
        let record = format!(
            "{}{record}",
            record.len() + format!("{}", record.len()).len()
        );
        let h = raw_header(
            b"PaxHeaders/big",
            tar::EntryType::XHeader,
            record.len() as u64,
            0o644,
        );
        b.append(&h, record.as_bytes()).unwrap();
        // The header says 0 bytes; the data that follows is `big` bytes.
        let mut h = raw_header(b"big", tar::EntryType::Regular, 0, 0o644);
        h.set_cksum();
        let mut raw = b.into_inner().unwrap();
        // `into_inner` wrote the end-of-archive blocks; put the entry before them.
        raw.truncate(raw.len() - 1024);
        raw.extend_from_slice(h.as_bytes());
        raw.extend(noise(big as usize, 7));
        raw.resize(raw.len().div_ceil(512) * 512 + 1024, 0);
        raw
    };
    let arena = Arena::new(|top| {
        write_raw_layer_layout(&top.join("layout"), &compress(Compression::Gzip, &tar))
    });
    let e = import_layout_checked(&arena, None).unwrap_err();
    assert!(e.contains(&big.to_string()) && e.contains("big"), "{e}");
    // Refused before its content was stored, not after.
    let stored: u64 = walkdir_bytes(&arena.path("store"));
    assert!(stored < big / 2, "{stored} bytes stored for a refused file");
}

/// Found in review: entries the import skips (a global PAX header here) still had their data
/// decompressed, without bound. A layer now expands to at most its limits' worth.
#[test]
fn regression_a_layer_cannot_expand_without_bound() {
    let l = oci_limits();
    let pad = l.max_total_bytes + l.max_entries * 1536 + (2 << 20);
    let tar = {
        let mut b = tar::Builder::new(vec![]);
        let h = raw_header(
            b"pax_global_header",
            tar::EntryType::XGlobalHeader,
            pad,
            0o644,
        );
        b.append(&h, std::io::Read::take(std::io::repeat(b'a'), pad))
            .unwrap();
        let h = raw_header(b"small", tar::EntryType::Regular, 2, 0o644);
        b.append(&h, &b"x\n"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let arena = Arena::new(|top| {
        write_raw_layer_layout(&top.join("layout"), &compress(Compression::Gzip, &tar))
    });
    let e = import_layout_checked(&arena, None).unwrap_err();
    assert!(e.contains("expands past"), "{e}");
}

/// Found in review: after the tar's end the rest of the compressed stream was decompressed
/// too (to hash it), so data hidden after the end-of-archive blocks was expanded. The digest
/// is of the raw blob; nothing after the tar's end is decompressed: here the gzip stream
/// goes on after the tar with bytes that are not deflate data, and the import never reads them.
#[test]
fn regression_nothing_after_the_tar_end_is_decompressed() {
    let tar = build_tar(&[TarEnt::File {
        path: "f".into(),
        data: b"data\n".to_vec(),
        mode: 0o644,
    }]);
    let mut gz = compress(Compression::Gzip, &tar);
    // Cut the gzip trailer and the end of the deflate stream after the tar's last header
    // block: decompressing to the end would fail.
    gz.truncate(gz.len() - 8);
    gz.extend_from_slice(&[0xff; 64]);
    let arena = Arena::new(|top| write_raw_layer_layout(&top.join("layout"), &gz));
    let id = import_layout_checked(&arena, None).unwrap();
    let store = Store::open_with(&arena.path("store"), oci_limits()).unwrap();
    let paths: Vec<String> = store
        .get_tree(&id)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.meta.path)
        .collect();
    assert_eq!(paths, ["f"]);
}

/// The blob is hashed raw up to one byte past its declared size: a blob file longer than
/// its descriptor says is refused with both sizes.
#[test]
fn a_blob_longer_than_its_descriptor_is_refused() {
    let tar = build_tar(&[TarEnt::Dir("d".into())]);
    let arena = Arena::new(|top| {
        let layout = top.join("layout");
        write_raw_layer_layout(&layout, &tar);
        let index: Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let md = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned();
        let manifest: Value =
            serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(md)).unwrap())
                .unwrap();
        let ld = manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_owned();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(layout.join("blobs/sha256").join(ld))
            .unwrap();
        f.write_all(b"extra").unwrap();
    });
    let e = import_layout_checked(&arena, None).unwrap_err();
    assert!(
        e.contains("larger than") && e.contains(&tar.len().to_string()),
        "{e}"
    );
}
