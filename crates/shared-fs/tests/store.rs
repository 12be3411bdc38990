//! The content-addressed store: dedup, round trips, validation of hostile trees and chunks,
//! crash leftovers, garbage collection, and OCI image layouts built here with whiteouts and
//! hard links.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use shared_fs::oci::{import_oci, import_oci_archive};
use shared_fs::store::{is_id, ChunkRef, Tree, TreeEntry, TREE_VERSION};
use shared_fs::{EntryKind, EntryMeta, FsError, Limits, Store};

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A small root filesystem: directories, a 1 MiB file, a hard link, a symlink, a FIFO, an
/// executable, an extended attribute.
fn make_rootfs(dir: &Path) {
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("usr/bin/big"), noise(1, 1 << 20)).unwrap();
    fs::set_permissions(dir.join("usr/bin/big"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::hard_link(dir.join("usr/bin/big"), dir.join("usr/bin/big-again")).unwrap();
    fs::write(dir.join("etc/hostname"), b"ferry\n").unwrap();
    std::os::unix::fs::symlink("../usr/bin/big", dir.join("etc/link")).unwrap();
    nix_mkfifo(&dir.join("etc/fifo"));
    fs::write(dir.join("etc/empty"), b"").unwrap();
    let status = std::process::Command::new("setfattr")
        .args(["-n", "user.ferry", "-v", "base"])
        .arg(dir.join("etc/hostname"))
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "setfattr (package attr) must work here to test extended attributes"
    );
}

fn nix_mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

fn entry(path: &str, kind: EntryKind, size: u64) -> TreeEntry {
    TreeEntry {
        meta: EntryMeta {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size,
            xattrs: vec![],
        },
        chunks: vec![],
        blake3: None,
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

#[test]
fn two_trees_sharing_files_store_their_content_once() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let a = t.path().join("a");
    make_rootfs(&a);
    let (id_a, first) = store.import_dir(&a).unwrap();
    assert!(is_id(&id_a));
    // 1 MiB once (the hard link shares it), plus the small files.
    assert_eq!(first.bytes, (1 << 20) + 6);
    assert_eq!(first.new_bytes, first.bytes);
    let used = store.usage().unwrap().chunk_bytes;
    assert_eq!(
        used,
        (1 << 20) + 6,
        "the hard link's content is stored once"
    );

    // The same tree plus one file: only that file's chunks are new.
    let b = t.path().join("b");
    make_rootfs(&b);
    fs::write(b.join("etc/extra"), noise(2, 200_000)).unwrap();
    let (id_b, second) = store.import_dir(&b).unwrap();
    assert_ne!(id_a, id_b);
    assert_eq!(second.new_bytes, 200_000, "{second:?}");
    assert_eq!(store.usage().unwrap().chunk_bytes, used + 200_000);
    // Importing the same tree again adds nothing and gives the same id.
    let (again, third) = store.import_dir(&a).unwrap();
    assert_eq!((again, third.new_chunks), (id_a, 0));
}

#[test]
fn a_tree_round_trips_through_its_materialized_layer() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let a = t.path().join("a");
    make_rootfs(&a);
    let (id, _) = store.import_dir(&a).unwrap();
    let layer = store.materialize(&id).unwrap();
    assert_eq!(layer, store.layer_path(&id).unwrap());
    assert_eq!(
        fs::read(layer.join("usr/bin/big")).unwrap(),
        noise(1, 1 << 20)
    );
    let big = fs::metadata(layer.join("usr/bin/big")).unwrap();
    let again = fs::metadata(layer.join("usr/bin/big-again")).unwrap();
    assert_eq!(big.ino(), again.ino(), "the hard link is a hard link");
    assert_eq!(big.mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read_link(layer.join("etc/link")).unwrap(),
        Path::new("../usr/bin/big")
    );
    assert!(fs::symlink_metadata(layer.join("etc/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let x = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.ferry"])
        .arg(layer.join("etc/hostname"))
        .output()
        .unwrap();
    assert_eq!(x.stdout, b"base");
    // Importing the layer gives the same tree: nothing was lost or changed on the way.
    let (id2, _) = store.import_dir(&layer).unwrap();
    assert_eq!(id2, id);
    // A second materialize reuses the layer.
    assert_eq!(store.materialize(&id).unwrap(), layer);
}

#[test]
fn crafted_trees_are_rejected_and_nothing_is_written_outside_the_store() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let limits = Limits {
        max_file_size: 1 << 20,
        ..Limits::default()
    };
    let store = Store::open_with(&root, limits).unwrap();
    let (chunk, _) = store.put_chunk(b"hello").unwrap();
    let file = |path: &str| TreeEntry {
        chunks: vec![chunk.clone()],
        blake3: Some(blake3::hash(b"hello").to_hex().to_string()),
        ..entry(path, EntryKind::File, 5)
    };
    let tree = |entries: Vec<TreeEntry>| Tree {
        version: TREE_VERSION,
        entries,
    };
    let cases: Vec<(&str, Tree, &str)> = vec![
        ("dot-dot", tree(vec![file("../escape")]), "\"..\" component"),
        (
            "dot-dot inside",
            tree(vec![entry("a", EntryKind::Dir, 0), file("a/../../escape")]),
            "\"..\" component",
        ),
        ("absolute", tree(vec![file("/etc/escape")]), "absolute path"),
        (
            "oversized",
            tree(vec![TreeEntry {
                chunks: vec![
                    ChunkRef {
                        hash: chunk.hash.clone(),
                        len: 256 << 10,
                    };
                    8
                ],
                ..file_sized(&chunk, "huge", 2 << 20)
            }]),
            "too large",
        ),
        (
            "size and chunks disagree",
            tree(vec![TreeEntry {
                meta: EntryMeta {
                    size: 6,
                    ..file("f").meta
                },
                ..file("f")
            }]),
            "its chunks hold 5 bytes",
        ),
        (
            "parent missing",
            tree(vec![file("nodir/f")]),
            "comes before its directory",
        ),
        (
            "out of order",
            tree(vec![file("b"), file("a")]),
            "out of order",
        ),
        (
            "hard link to nothing",
            tree(vec![entry(
                "l",
                EntryKind::Hardlink {
                    target: "missing".into(),
                },
                0,
            )]),
            "not an earlier file",
        ),
        (
            "symlink parent",
            tree(vec![
                entry(
                    "s",
                    EntryKind::Symlink {
                        target: "/etc".into(),
                    },
                    0,
                ),
                file("s/passwd"),
            ]),
            "comes before its directory",
        ),
        (
            "chunk not stored",
            tree(vec![TreeEntry {
                chunks: vec![ChunkRef {
                    hash: "ab".repeat(32),
                    len: 5,
                }],
                ..file("f")
            }]),
            "is not in the store",
        ),
    ];
    for (what, tree, want) in cases {
        let e = store.put_tree(&tree).expect_err(what);
        let text = e.to_string();
        assert!(text.contains(want), "{what}: {text}");
    }
    assert!(
        files_under(&root.join("trees")).is_empty(),
        "no tree stored"
    );
    assert_eq!(
        files_under(t.path()),
        vec!["store".to_string()],
        "nothing written next to the store"
    );

    // A tree received from a peer must hash to the id it came under.
    let good = tree(vec![file("f")]);
    let bytes = serde_json::to_vec(&good).unwrap();
    let e = store.tree_from_bytes(&"0".repeat(64), &bytes).unwrap_err();
    assert!(matches!(e, FsError::ChunkMismatch { .. }), "{e}");
    assert_eq!(store.tree_from_bytes(&good.id(), &bytes).unwrap(), good);
}

fn file_sized(chunk: &ChunkRef, path: &str, size: u64) -> TreeEntry {
    TreeEntry {
        chunks: vec![chunk.clone()],
        blake3: Some("00".repeat(32)),
        ..entry(path, EntryKind::File, size)
    }
}

#[test]
fn a_chunk_with_the_wrong_content_is_rejected_before_use() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let claimed = blake3::hash(b"the real content").to_hex().to_string();
    let e = store
        .put_chunk_checked(&claimed, b"something else")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("corrupted or forged, rejected before use"),
        "{e}"
    );
    assert!(
        !store.has_chunk(&claimed),
        "nothing stored under the claimed id"
    );
    assert_eq!(store.usage().unwrap().chunks, 0);

    // A chunk damaged on disk is caught when read, and nothing is materialized from it.
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(3, 100_000)).unwrap();
    let (id, _) = store.import_dir(&src).unwrap();
    let tree = store.get_tree(&id).unwrap();
    let c = &tree.entries[0].chunks[0];
    let on_disk = store.root().join("chunks").join(&c.hash[..2]).join(&c.hash);
    let mut bytes = fs::read(&on_disk).unwrap();
    bytes[10] ^= 1;
    fs::write(&on_disk, bytes).unwrap();
    let e = store.read_chunk(&c.hash).unwrap_err();
    assert!(matches!(e, FsError::ChunkMismatch { .. }), "{e}");
    let e = store.materialize(&id).unwrap_err();
    assert!(matches!(e, FsError::ChunkMismatch { .. }), "{e}");
    assert!(!store.layer_path(&id).unwrap().exists());
    assert!(files_under(&store.root().join("tmp")).is_empty());
}

#[test]
fn leftovers_of_an_interrupted_write_are_never_taken_as_whole() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let store = Store::open(&root).unwrap();
    let (c, _) = store.put_chunk(&noise(4, 50_000)).unwrap();
    drop(store);
    // A crash mid-write leaves a partial file in tmp/, never under a chunk's name.
    let mut f = fs::File::create(root.join("tmp/123.0.0")).unwrap();
    f.write_all(&noise(4, 10_000)).unwrap();
    drop(f);
    let store = Store::open(&root).unwrap();
    assert!(
        files_under(&root.join("tmp")).is_empty(),
        "tmp/ emptied on open"
    );
    assert_eq!(store.read_chunk(&c.hash).unwrap(), noise(4, 50_000));
    // A truncated chunk (a torn write outside Ferry's control) does not pass as whole.
    let p = root.join("chunks").join(&c.hash[..2]).join(&c.hash);
    fs::write(&p, &noise(4, 50_000)[..10_000]).unwrap();
    assert!(matches!(
        store.read_chunk(&c.hash).unwrap_err(),
        FsError::ChunkMismatch { .. }
    ));
}

#[test]
fn gc_removes_only_what_no_image_or_container_uses() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let a = t.path().join("a");
    fs::create_dir_all(&a).unwrap();
    fs::write(a.join("shared"), noise(5, 300_000)).unwrap();
    let b = t.path().join("b");
    fs::create_dir_all(&b).unwrap();
    fs::write(b.join("shared"), noise(5, 300_000)).unwrap();
    fs::write(b.join("own"), noise(6, 300_000)).unwrap();
    let c = t.path().join("c");
    fs::create_dir_all(&c).unwrap();
    fs::write(c.join("kept"), noise(7, 100_000)).unwrap();
    let (ia, _) = store.import_dir(&a).unwrap();
    let (ib, _) = store.import_dir(&b).unwrap();
    let (ic, _) = store.import_dir(&c).unwrap();
    store.tag("base:1", &ia, "test", None).unwrap();
    store.tag("more:1", &ib, "test", None).unwrap();
    store.materialize(&ib).unwrap();
    assert_eq!(store.usage().unwrap().chunk_bytes, 700_000);

    // Nothing names c, but a container uses it: kept.
    let s = store.gc(std::slice::from_ref(&ic), &[]).unwrap();
    assert_eq!((s.chunks, s.trees, s.layers), (0, 0, 0));
    // Removing "more:1" frees b's own content and its layer, not what a shares.
    store.remove_image("more:1").unwrap();
    let s = store.gc(std::slice::from_ref(&ic), &[]).unwrap();
    assert_eq!((s.trees, s.layers, s.chunk_bytes), (1, 1, 300_000), "{s:?}");
    assert!(matches!(
        store.get_tree(&ib).unwrap_err(),
        FsError::Missing { what: "tree", .. }
    ));
    let out = t.path().join("out");
    store.write_tree(&ia, &out).unwrap();
    assert_eq!(fs::read(out.join("shared")).unwrap(), noise(5, 300_000));
    let names: Vec<String> = store
        .images()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["base:1"]);
    // A chunk of a tree still on its way (no tree names it yet) is kept while it is pending.
    let (loose, _) = store.put_chunk(b"a chunk of a tree on its way").unwrap();
    store.gc(&[], std::slice::from_ref(&loose.hash)).unwrap();
    assert!(store.has_chunk(&loose.hash));
    let s = store.gc(&[], &[]).unwrap();
    assert!(!store.has_chunk(&loose.hash), "{s:?}");
    assert!(matches!(
        store.tag("../evil", &ia, "test", None).unwrap_err(),
        FsError::InvalidImageName { .. }
    ));
}

// ---- OCI image layouts ----

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Writes a blob; returns its descriptor.
fn blob(layout: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(bytes);
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    // Written raw so that the tests can also craft hostile names.
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    h
}

fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let h = header(path, tar::EntryType::Regular, data.len() as u64, mode);
    b.append(&h, data).unwrap();
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let h = header(path, tar::EntryType::Directory, 0, 0o755);
    b.append(&h, &[][..]).unwrap();
}

/// Builds an OCI layout with two layers: a gzip base (files, a hard link, a file and a
/// directory's content that the next layer removes) and a plain tar on top (a whiteout, an
/// opaque directory, a changed file with an extended attribute).
fn make_layout(dir: &Path, corrupt_top: bool) -> Vec<u8> {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let tool = noise(8, 400_000);
    let mut l1 = tar::Builder::new(vec![]);
    add_dir(&mut l1, "bin/");
    add_dir(&mut l1, "etc/");
    add_dir(&mut l1, "opt/");
    add_dir(&mut l1, "opt/cache/");
    add_file(&mut l1, "bin/tool", &tool, 0o755);
    let mut link = header("bin/tool-again", tar::EntryType::Link, 0, 0o755);
    link.set_link_name("bin/tool").unwrap();
    link.set_cksum();
    l1.append(&link, &[][..]).unwrap();
    add_file(&mut l1, "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644);
    add_file(&mut l1, "etc/old", b"to be removed\n", 0o644);
    add_file(&mut l1, "opt/cache/a", b"a\n", 0o644);
    add_file(&mut l1, "opt/cache/b", b"b\n", 0o644);
    let l1 = l1.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    gz.write_all(&l1).unwrap();
    let l1 = gz.finish().unwrap();

    let mut l2 = tar::Builder::new(vec![]);
    add_file(&mut l2, "etc/.wh.old", b"", 0o644);
    add_file(&mut l2, "opt/cache/.wh..wh..opq", b"", 0o644);
    add_file(&mut l2, "opt/cache/c", b"c\n", 0o644);
    let passwd = b"root:x:0:0::/root:/bin/sh\nferry:x:1000:1000::/home/ferry:/bin/sh\n";
    let mut h = header(
        "etc/passwd",
        tar::EntryType::Regular,
        passwd.len() as u64,
        0o600,
    );
    l2.append_pax_extensions([("SCHILY.xattr.user.origin", &b"layer2"[..])])
        .unwrap();
    h.set_cksum();
    l2.append(&h, &passwd[..]).unwrap();
    let mut l2 = l2.into_inner().unwrap();

    let d1 = blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &l1);
    let d2 = blob(dir, "application/vnd.oci.image.layer.v1.tar", &l2);
    if corrupt_top {
        let hex = d2["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        l2[600] ^= 1;
        fs::write(dir.join("blobs/sha256").join(hex), &l2).unwrap();
    }
    let config = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [d1, d2],
    });
    let mut md = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    md["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "test:1"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [md]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    tool
}

#[test]
fn an_oci_layout_with_a_whiteout_and_a_hard_link_imports_as_its_tarballs_say() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    let tool = make_layout(&layout, false);
    let (id, info) = import_oci(&store, &layout, Some("test:1")).unwrap();
    assert_eq!(info.layers, 2);
    assert_eq!(info.reference.as_deref(), Some("test:1"));
    let tree = store.get_tree(&id).unwrap();
    let paths: Vec<&str> = tree.entries.iter().map(|e| e.meta.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "bin",
            "bin/tool",
            "bin/tool-again",
            "etc",
            "etc/passwd",
            "opt",
            "opt/cache",
            "opt/cache/c"
        ],
        "the whiteout removed etc/old, the opaque directory dropped a and b"
    );
    let by = |p: &str| tree.entries.iter().find(|e| e.meta.path == p).unwrap();
    assert_eq!(
        by("bin/tool-again").meta.kind,
        EntryKind::Hardlink {
            target: "bin/tool".into()
        }
    );
    assert_eq!(
        by("bin/tool").blake3.as_deref(),
        Some(blake3::hash(&tool).to_hex().as_str()),
        "content as in the tarball"
    );
    assert_eq!(
        by("etc/passwd").meta.mode,
        0o600,
        "the upper layer's version"
    );
    assert_eq!(by("etc/passwd").meta.xattrs[0].name, "user.origin");

    // Materialized, it is exactly that tree: importing the directory gives the same id.
    let layer = store.materialize(&id).unwrap();
    assert_eq!(fs::read(layer.join("bin/tool")).unwrap(), tool);
    assert_eq!(
        fs::metadata(layer.join("bin/tool")).unwrap().ino(),
        fs::metadata(layer.join("bin/tool-again")).unwrap().ino()
    );
    assert!(!layer.join("etc/old").exists());
    assert_eq!(files_under(&layer.join("opt/cache")), vec!["c"]);
    let (id2, _) = store.import_dir(&layer).unwrap();
    assert_eq!(
        id2, id,
        "the materialized layer hashes to the imported tree"
    );
    // Named, listed.
    store.tag("test:1", &id, "oci", None).unwrap();
    assert_eq!(store.image("test:1").unwrap().tree, id);
}

#[test]
fn a_corrupted_layer_fails_the_import() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    make_layout(&layout, true);
    let e = import_oci(&store, &layout, None).unwrap_err().to_string();
    assert!(e.contains("corrupted"), "{e}");
    assert_eq!(store.usage().unwrap().trees, 0, "no tree stored");
}

#[test]
fn a_layer_with_a_path_out_of_the_tree_is_rejected() {
    for evil in ["../../escape", "etc/../../escape"] {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        let layout = t.path().join("layout");
        fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let mut b = tar::Builder::new(vec![]);
        add_file(&mut b, evil, b"gotcha\n", 0o644);
        let l = b.into_inner().unwrap();
        let d = blob(&layout, "application/vnd.oci.image.layer.v1.tar", &l);
        let m = blob(
            &layout,
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "layers": [d]})).unwrap(),
        );
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [m]})).unwrap(),
        )
        .unwrap();
        let e = import_oci(&store, &layout, None).unwrap_err().to_string();
        assert!(e.contains("\"..\" component"), "{evil}: {e}");
        assert!(!t.path().join("escape").exists());
        assert_eq!(files_under(t.path()), vec!["layout", "store"]);
    }
}

#[test]
fn an_oci_layout_archive_imports_like_the_layout() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    make_layout(&layout, false);
    let (from_dir, _) = import_oci(&store, &layout, None).unwrap();
    let archive = t.path().join("image.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    b.finish().unwrap();
    drop(b);
    let (from_tar, info) = import_oci_archive(&store, &archive, Some("test:1")).unwrap();
    assert_eq!(from_tar, from_dir);
    assert_eq!(info.layers, 2);
    assert!(
        files_under(&store.root().join("tmp")).is_empty(),
        "scratch removed"
    );
    // A tar that is not an OCI layout says so.
    let other = t.path().join("other.tar");
    let mut b = tar::Builder::new(fs::File::create(&other).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", &b"[]"[..]).unwrap();
    b.finish().unwrap();
    drop(b);
    let e = import_oci_archive(&store, &other, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no oci-layout file"), "{e}");
}

#[test]
fn a_tree_id_that_is_a_path_never_names_a_directory() {
    // A peer's container spec names its base by tree id; an id such as "/" or "../.." must not
    // turn into a host directory used as the container's lower layer.
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    for id in [
        "/",
        "..",
        "../..",
        "../../../etc",
        "/etc",
        "",
        "layers",
        &"A".repeat(64),
        &format!("{}/", "a".repeat(63)),
        &format!("../{}", "a".repeat(61)),
    ] {
        match store.materialize(id) {
            Err(FsError::InvalidTree { reason }) => {
                assert!(reason.contains("not a tree id"), "{id:?}: {reason}")
            }
            other => panic!("{id:?} must be refused as not a tree id, got {other:?}"),
        }
        assert!(store.layer_path(id).is_err(), "{id:?}");
    }
    // Nothing was created for them.
    let layers = t.path().join("store/layers");
    let n = fs::read_dir(&layers).map_or(0, |d| d.count());
    assert_eq!(n, 0, "no layer appeared");
}
