//! Trees over QUIC and over in-memory streams, including corrupted input.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use shared_fs::{diff, snapshot, EntryKind, EntryMeta, Limits, Snapshot};
use transfer::frame::write_msg;
use transfer::pki::{create_ca, issue_host_cert};
use transfer::tree::{recv_tree, send_tree, Reads, TreeStats};
use transfer::{Endpoint, TlsFiles, TransferError};

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn build(src: &Path) {
    fs::create_dir_all(src.join("app/lib")).unwrap();
    fs::create_dir_all(src.join("data/empty")).unwrap();
    fs::write(src.join("app/big.bin"), noise(3 << 20, 1)).unwrap();
    fs::write(src.join("app/lib/zeros"), vec![0u8; (1 << 20) + 17]).unwrap();
    fs::write(src.join("app/config.json"), br#"{"a":1}"#).unwrap();
    fs::write(src.join("data/empty-file"), b"").unwrap();
    fs::set_permissions(
        src.join("app/config.json"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    fs::set_permissions(src.join("data/empty"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::hard_link(src.join("app/big.bin"), src.join("data/big-link")).unwrap();
    symlink("../app/config.json", src.join("data/config")).unwrap();
    symlink("/does/not/exist", src.join("dangling")).unwrap();
    // What a container's own overlay layer holds: extended attributes (an opaque directory,
    // a file capability-like attribute) and a whiteout (character device 0/0).
    let attr = |name: &str, value: &str, path: &Path| {
        let ok = std::process::Command::new("setfattr")
            .args(["-n", name, "-v", value])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "setfattr (package attr) must work here: {name} on {}",
            path.display()
        );
    };
    attr("user.ferry", "kept", &src.join("app/config.json"));
    attr("trusted.overlay.opaque", "y", &src.join("data/empty"));
    let ok = std::process::Command::new("mknod")
        .arg(src.join("data/whiteout"))
        .args(["c", "0", "0"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mknod needs root");
}

fn assert_same(a: &Snapshot, b: &Snapshot) {
    for (k, v) in &a.entries {
        assert_eq!(Some(v), b.entries.get(k), "entry {k}");
    }
    assert_eq!(a.entries.len(), b.entries.len());
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

async fn quic_pair(dir: &Path) -> (Arc<Endpoint>, Endpoint, SocketAddr) {
    let ca = dir.join("ca");
    let certs = dir.join("certs");
    create_ca(&ca, "lab").unwrap();
    issue_host_cert(&ca, "dst", &certs).unwrap();
    issue_host_cert(&ca, "src", &certs).unwrap();
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Endpoint::bind(lo, &TlsFiles::for_host(&ca, &certs, "dst")).unwrap();
    let client = Endpoint::bind(lo, &TlsFiles::for_host(&ca, &certs, "src")).unwrap();
    let addr = server.local_addr().unwrap();
    (Arc::new(server), client, addr)
}

#[tokio::test]
async fn tree_over_quic_arrives_identical() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    fs::create_dir(&src).unwrap();
    build(&src);
    let (server, client, addr) = quic_pair(t.path()).await;

    let receiver = {
        let server = server.clone();
        let dst = dst.clone();
        tokio::spawn(async move {
            let conn = server.accept().await.unwrap().unwrap();
            assert_eq!(conn.peer_host, "src");
            let mut stats = Vec::new();
            for _ in 0..2 {
                let (mut s, mut r) = conn.accept_stream().await.unwrap();
                let st = recv_tree(&mut r, &dst, Limits::default()).await.unwrap();
                write_msg(&mut s, &st.entries).await.unwrap();
                s.finish().unwrap();
                stats.push(st);
            }
            let _ = conn.conn.closed().await;
            stats
        })
    };

    let conn = client.connect(addr, "dst").await.unwrap();
    let s1 = snapshot(&src).unwrap();
    let full = diff(&Snapshot::default(), &s1);
    let (mut s, mut r) = conn.open().await.unwrap();
    let sent = send_tree(&mut s, &src, &full, Reads::Frozen).await.unwrap();
    s.finish().unwrap();
    let acked: u64 = transfer::frame::read_msg(&mut r).await.unwrap();
    assert_eq!(acked, sent.entries);
    assert_eq!(sent.entries, s1.entries.len() as u64);
    assert_eq!(sent.file_bytes, (3 << 20) + (1 << 20) + 17 + 7);
    assert!(sent.wire_bytes < sent.file_bytes, "zeros should compress");

    let d1 = snapshot(&dst).unwrap();
    assert_same(&s1, &d1);
    let xattr_names = |path: &str| -> Vec<String> {
        d1.entries[path]
            .xattrs
            .iter()
            .map(|x| x.name.clone())
            .collect()
    };
    assert_eq!(xattr_names("data/empty"), ["trusted.overlay.opaque"]);
    assert_eq!(xattr_names("app/config.json"), ["user.ferry"]);
    assert_eq!(
        d1.entries["data/whiteout"].kind,
        EntryKind::CharDev { rdev: 0 }
    );
    assert_eq!(
        fs::read(dst.join("app/big.bin")).unwrap(),
        noise(3 << 20, 1)
    );
    assert_eq!(d1.inode("app/big.bin"), d1.inode("data/big-link"));

    // Incremental: change, add, remove.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(src.join("app/config.json"), br#"{"a":2,"b":3}"#).unwrap();
    fs::remove_dir_all(src.join("data/empty")).unwrap();
    fs::write(src.join("data/new"), noise(5000, 2)).unwrap();
    let s2 = snapshot(&src).unwrap();
    let (mut s, mut r) = conn.open().await.unwrap();
    let sent2 = send_tree(&mut s, &src, &diff(&s1, &s2), Reads::Frozen)
        .await
        .unwrap();
    s.finish().unwrap();
    let _: u64 = transfer::frame::read_msg(&mut r).await.unwrap();
    conn.close("done");
    let stats = receiver.await.unwrap();
    assert_eq!(stats[0].entries, sent.entries);
    assert_eq!(stats[0].file_bytes, sent.file_bytes);
    assert_eq!(stats[0].wire_bytes, sent.wire_bytes);
    assert_eq!(stats[1], sent2);
    assert_same(&s2, &snapshot(&dst).unwrap());
    assert_eq!(listing(&dst), listing(&src));
    server.close();
}

/// Serializes a full tree of `src` into memory.
async fn encode(src: &Path) -> (Vec<u8>, TreeStats) {
    let s = snapshot(src).unwrap();
    let mut wire = Vec::new();
    let st = send_tree(
        &mut wire,
        src,
        &diff(&Snapshot::default(), &s),
        Reads::Frozen,
    )
    .await
    .unwrap();
    (wire, st)
}

/// Incompressible content travels stored (no larger than itself plus chunk headers), content
/// that compresses travels compressed, and both arrive identical.
#[tokio::test]
async fn incompressible_chunks_travel_stored_and_the_rest_compressed() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).unwrap();
    let noisy = noise((5 << 20) + 123, 7);
    fs::write(src.join("noise"), &noisy).unwrap();
    let (wire, st) = encode(&src).await;
    let headers = 6 * 8 + 4 + 32;
    assert!(
        st.wire_bytes <= noisy.len() as u64 + headers + 512,
        "{} bytes on the wire for {} bytes of noise",
        st.wire_bytes,
        noisy.len()
    );
    // A full chunk's header says "stored", followed by the raw bytes themselves.
    let mut hdr = (1u32 << 20).to_be_bytes().to_vec();
    hdr.extend_from_slice(&((1u32 << 20) | transfer::tree::STORED).to_be_bytes());
    hdr.extend_from_slice(&noisy[..64]);
    assert!(
        wire.windows(hdr.len()).any(|w| w == hdr),
        "no stored chunk header followed by the raw content"
    );
    recv_tree(&mut &wire[..], &dst, Limits::default())
        .await
        .unwrap();
    assert_eq!(fs::read(dst.join("noise")).unwrap(), noisy);

    let (src2, dst2) = (t.path().join("src2"), t.path().join("dst2"));
    fs::create_dir_all(&src2).unwrap();
    fs::write(src2.join("zeros"), vec![0u8; 4 << 20]).unwrap();
    let (wire, st) = encode(&src2).await;
    assert!(
        st.wire_bytes < 64 << 10,
        "{} bytes for 4 MiB of zeros",
        st.wire_bytes
    );
    recv_tree(&mut &wire[..], &dst2, Limits::default())
        .await
        .unwrap();
    assert_eq!(fs::read(dst2.join("zeros")).unwrap(), vec![0u8; 4 << 20]);
}

#[tokio::test]
async fn corrupted_hash_is_rejected_and_leaves_no_file() {
    // One chunk (decoded as read) and several (decoded by a writer thread behind the stream).
    for size in [200_000, (3 << 20) + 5] {
        corrupted_file_is_rejected(size).await;
    }
}

async fn corrupted_file_is_rejected(size: usize) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), noise(size, 3)).unwrap();
    let (wire, st) = encode(&src).await;
    assert_eq!(st.entries, 1);

    // The End frame is the last 4 + len bytes; the file hash precedes it.
    let end_len = {
        let mut tail = Vec::new();
        write_msg(&mut tail, &serde_json::json!({"End": {"entries": 1}}))
            .await
            .unwrap();
        tail.len()
    };
    let hash_end = wire.len() - end_len;
    let mut bad = wire.clone();
    bad[hash_end - 1] ^= 0x01;
    let dst = t.path().join("dst");
    match recv_tree(&mut &bad[..], &dst, Limits::default()).await {
        Err(TransferError::HashMismatch { path }) => assert_eq!(path, "f"),
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(listing(&dst).is_empty(), "{:?}", listing(&dst));

    // A flipped byte inside the compressed data: rejected as undecodable or as a hash mismatch.
    let mut bad = wire.clone();
    let mid = hash_end - 36 - 1000;
    bad[mid] ^= 0x40;
    let err = recv_tree(&mut &bad[..], &dst, Limits::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransferError::HashMismatch { .. } | TransferError::Decode { .. }
        ),
        "{err}"
    );
    assert!(listing(&dst).is_empty(), "{:?}", listing(&dst));

    // Cut short: truncated, nothing left.
    let err = recv_tree(&mut &wire[..wire.len() / 2], &dst, Limits::default())
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Truncated { .. }), "{err}");
    assert!(listing(&dst).is_empty(), "{:?}", listing(&dst));

    // The intact stream works.
    recv_tree(&mut &wire[..], &dst, Limits::default())
        .await
        .unwrap();
    assert_eq!(fs::read(dst.join("f")).unwrap(), noise(size, 3));
}

fn file_meta(path: &str, size: u64) -> EntryMeta {
    EntryMeta {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        size,
        xattrs: vec![],
    }
}

async fn hostile(records: &[serde_json::Value], raw: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    for r in records {
        write_msg(&mut wire, r).await.unwrap();
    }
    wire.extend_from_slice(raw);
    wire
}

#[tokio::test]
async fn hostile_streams_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("dst");
    let entry = |m: EntryMeta| serde_json::json!({ "Entry": m });

    // Oversized raw chunk length: refused before reading the data.
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&10u32.to_be_bytes());
    hdr.extend_from_slice(&((1u32 << 20) + 1).to_be_bytes());
    let wire = hostile(&[entry(file_meta("f", 10))], &hdr).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::TooLarge { .. })
    ));
    // Oversized compressed length.
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    hdr.extend_from_slice(&10u32.to_be_bytes());
    let wire = hostile(&[entry(file_meta("f", 10))], &hdr).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::TooLarge { .. })
    ));
    // A stored chunk whose length differs from its raw length.
    let mut stored = Vec::new();
    stored.extend_from_slice(&4u32.to_be_bytes());
    stored.extend_from_slice(&(10u32 | transfer::tree::STORED).to_be_bytes());
    stored.extend_from_slice(b"abcd");
    let wire = hostile(&[entry(file_meta("f", 10))], &stored).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::Decode { .. })
    ));
    // A stored chunk past the chunk size, flag and all.
    let mut stored = Vec::new();
    stored.extend_from_slice(&((1u32 << 20) + 1).to_be_bytes());
    stored.extend_from_slice(&(((1u32 << 20) + 1) | transfer::tree::STORED).to_be_bytes());
    let wire = hostile(&[entry(file_meta("f", 10))], &stored).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::TooLarge { .. })
    ));
    // More content than declared.
    let data = b"0123456789abcdef";
    let c = zstd::bulk::compress(data, 1).unwrap();
    let mut chunk = Vec::new();
    chunk.extend_from_slice(&(c.len() as u32).to_be_bytes());
    chunk.extend_from_slice(&(data.len() as u32).to_be_bytes());
    chunk.extend_from_slice(&c);
    let wire = hostile(&[entry(file_meta("f", 10))], &chunk).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::Fs(shared_fs::FsError::TooLarge { .. }))
    ));
    // raw_len lying about the decompressed size.
    let mut lie = Vec::new();
    lie.extend_from_slice(&(c.len() as u32).to_be_bytes());
    lie.extend_from_slice(&8u32.to_be_bytes());
    lie.extend_from_slice(&c);
    let wire = hostile(&[entry(file_meta("f", 16))], &lie).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::Decode { .. })
    ));
    // Path escapes.
    for p in ["../evil", "/etc/evil", "a/../../evil"] {
        let wire = hostile(&[entry(file_meta(p, 0))], &[0u8; 36]).await;
        assert!(matches!(
            recv_tree(&mut &wire[..], &dst, Limits::default()).await,
            Err(TransferError::Fs(shared_fs::FsError::InvalidPath { .. }))
        ));
        let wire = hostile(&[serde_json::json!({ "Remove": p })], &[]).await;
        assert!(matches!(
            recv_tree(&mut &wire[..], &dst, Limits::default()).await,
            Err(TransferError::Fs(shared_fs::FsError::InvalidPath { .. }))
        ));
    }
    // Wrong count in End.
    let wire = hostile(&[serde_json::json!({"End": {"entries": 3}})], &[]).await;
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, Limits::default()).await,
        Err(TransferError::Protocol { .. })
    ));
    // Entry limit.
    let dir = |p: &str| {
        entry(EntryMeta {
            kind: EntryKind::Dir,
            mode: 0o755,
            ..file_meta(p, 0)
        })
    };
    let wire = hostile(
        &[
            dir("a"),
            dir("b"),
            dir("c"),
            serde_json::json!({"End": {"entries": 3}}),
        ],
        &[],
    )
    .await;
    let limits = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    assert!(matches!(
        recv_tree(&mut &wire[..], &dst, limits).await,
        Err(TransferError::Fs(shared_fs::FsError::TooManyEntries {
            limit: 2
        }))
    ));
    // Nothing but the two allowed directories exists; no file anywhere.
    assert_eq!(listing(&dst), vec!["a".to_string(), "b".to_string()]);
}

#[tokio::test]
async fn sparse_files_arrive_sparse_and_identical() {
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&dst).unwrap();
    // 64 MiB with data only at both ends and in the middle; the rest is a hole.
    let f = fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let data = noise(8192, 7);
    for at in [0u64, 32 << 20, (64 << 20) - 8192] {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(src.join("disk.img"))
            .unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&data).unwrap();
    }
    let (wire, _) = encode(&src).await;
    recv_tree(&mut &wire[..], &dst, Limits::default())
        .await
        .unwrap();
    let (a, b) = (src.join("disk.img"), dst.join("disk.img"));
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    let m = fs::metadata(&b).unwrap();
    assert_eq!(m.len(), 64 << 20);
    let allocated = m.blocks() * 512;
    assert!(
        allocated < 4 << 20,
        "the received file should be sparse: {allocated} bytes allocated for 64 MiB"
    );
}

/// A checkpoint of many processes is hundreds of small files: they travel in batches from
/// the tree's one reader thread, around large files that go chunk by chunk, and arrive
/// identical; a small file that vanished after the snapshot (live reads) is skipped and
/// reported while every other file still arrives.
#[tokio::test]
async fn many_small_files_around_large_ones_arrive_identical() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for d in 0..8 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    let mut expected = Vec::new();
    for i in 0..1500u64 {
        let path = format!("d{}/f{i}", i % 8);
        let len = (i * 37 % 5000) as usize;
        let content = if i % 3 == 0 {
            noise(len, i)
        } else {
            vec![(i % 251) as u8; len]
        };
        fs::write(src.join(&path), &content).unwrap();
        expected.push((path, content));
        if i == 700 {
            for (name, content) in [
                ("d3/big-noise", noise((3 << 20) + 5, 99)),
                ("d4/big-zeros", vec![0u8; 2 << 20]),
                ("d5/batch-sized", noise(256 << 10, 5)),
            ] {
                fs::write(src.join(name), &content).unwrap();
                expected.push((name.to_string(), content));
            }
        }
    }
    let snap = snapshot(&src).unwrap();
    let gone = "d2/f42";
    fs::remove_file(src.join(gone)).unwrap();
    let mut wire = Vec::new();
    let st = send_tree(
        &mut wire,
        &src,
        &diff(&Snapshot::default(), &snap),
        Reads::Live,
    )
    .await
    .unwrap();
    // Files written in the last 50 ms count as unsettled too (they went, and go again).
    assert!(
        st.unsettled.iter().any(|p| p == gone),
        "the vanished file is reported: {:?}",
        &st.unsettled[..st.unsettled.len().min(5)]
    );
    recv_tree(&mut &wire[..], &dst, Limits::default())
        .await
        .unwrap();
    for (path, content) in &expected {
        if path == gone {
            assert!(!dst.join(path).exists(), "{path} was skipped");
        } else {
            assert_eq!(&fs::read(dst.join(path)).unwrap(), content, "{path}");
        }
    }
    assert_eq!(listing(&dst), listing(&src));
}
