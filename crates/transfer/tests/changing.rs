//! Sending a tree that its owner changes between the snapshot and the read, as a running
//! container does: a file swapped for a symlink to a host file, a parent directory swapped for
//! a symlink to a host directory, a file swapped for a FIFO or for another file, a file that
//! vanishes or shrinks. The host's files never reach the stream, nothing hangs, a live read
//! reports what must go again, and a frozen (authoritative) read refuses.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use shared_fs::{diff, snapshot, Limits, Snapshot};
use transfer::tree::{recv_tree, send_tree, Reads};
use transfer::TransferError;

const CANARY: &[u8] = b"HOST-SECRET-CANARY-5d41402abc4b2a76";

/// A container root `root` next to a host directory `host` holding a canary file.
fn setup(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let root = t.join("root");
    let host = t.join("host");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("key"), CANARY).unwrap();
    fs::write(host.join("passwd"), CANARY).unwrap();
    fs::write(root.join("key"), b"container's own key").unwrap();
    fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(root.join("data"), b"data").unwrap();
    fs::write(root.join("log"), vec![7u8; 300_000]).unwrap();
    (root, host)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn send(
    root: &Path,
    d: &shared_fs::Diff,
    reads: Reads,
) -> (Vec<u8>, Result<transfer::tree::TreeStats, TransferError>) {
    let mut wire = Vec::new();
    let r = send_tree(&mut wire, root, d, reads).await;
    (wire, r)
}

#[tokio::test]
async fn a_tree_changed_after_its_snapshot_never_leaks_host_files_and_reports_what_goes_again() {
    let t = tempfile::tempdir().unwrap();
    let (root, host) = setup(t.path());
    let snap = snapshot(&root).unwrap();
    let full = diff(&Snapshot::default(), &snap);

    // The container plays tricks after the snapshot.
    fs::remove_file(root.join("key")).unwrap();
    symlink(host.join("key"), root.join("key")).unwrap();
    fs::rename(root.join("etc"), root.join("etc.old")).unwrap();
    symlink(&host, root.join("etc")).unwrap();
    fs::remove_file(root.join("data")).unwrap();
    let ok = std::process::Command::new("mkfifo")
        .arg(root.join("data"))
        .status()
        .unwrap();
    assert!(ok.success());
    fs::write(root.join("log"), b"short").unwrap();

    let (wire, r) = send(&root, &full, Reads::Live).await;
    let st = r.expect("a live tree that changed is not an error");
    assert!(
        !contains(&wire, CANARY),
        "a host file's content reached the stream"
    );
    let mut unsettled = st.unsettled.clone();
    unsettled.sort();
    assert_eq!(unsettled, ["data", "etc/passwd", "key", "log"]);

    // The receiver gets a consistent tree: what could not be read is absent, the truncated
    // file arrives as it was when opened, and nothing of the host is anywhere.
    let dst = t.path().join("dst");
    fs::create_dir_all(&dst).unwrap();
    recv_tree(&mut wire.as_slice(), &dst, Limits::default())
        .await
        .unwrap();
    assert!(!dst.join("key").exists());
    assert!(!dst.join("etc/passwd").exists());
    assert_eq!(fs::read(dst.join("log")).unwrap(), b"short");
    for e in walk(&dst) {
        if e.is_file() {
            assert!(!contains(&fs::read(&e).unwrap(), CANARY), "{}", e.display());
        }
    }

    // Marked unsettled, they all go (or are removed) with the next diff.
    let mut known = snap.clone();
    for p in &st.unsettled {
        known.unsettle(p);
    }
    let now = snapshot(&root).unwrap();
    let next = diff(&known, &now);
    let changed: Vec<&str> = next.changed.iter().map(|m| m.path.as_str()).collect();
    for p in ["key", "etc", "data", "log"] {
        assert!(
            changed.contains(&p),
            "{p} not in the next diff: {changed:?}"
        );
    }
    assert!(next.removed.contains(&"etc/passwd".to_string()));
    // The snapshot itself does not follow the swapped directory into the host.
    assert!(!now.entries.contains_key("etc/passwd"));
    assert!(!now.entries.contains_key("etc/key"));
    let (wire2, r2) = send(&root, &next, Reads::Frozen).await;
    r2.expect("the next diff is read as it is");
    assert!(!contains(&wire2, CANARY));
}

#[tokio::test]
async fn a_frozen_tree_that_changed_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (root, host) = setup(t.path());
    let snap = snapshot(&root).unwrap();
    let full = diff(&Snapshot::default(), &snap);
    fs::remove_file(root.join("key")).unwrap();
    symlink(host.join("key"), root.join("key")).unwrap();
    let (wire, r) = send(&root, &full, Reads::Frozen).await;
    match r {
        Err(TransferError::SourceChanged { path, .. }) => assert!(path.ends_with("key")),
        other => panic!("expected SourceChanged, got {other:?}"),
    }
    assert!(!contains(&wire, CANARY));
}

#[tokio::test]
async fn a_file_renamed_over_with_equal_metadata_is_another_file() {
    // `echo x > a.tmp; mv a.tmp x` within one clock tick leaves size, mode and mtime equal:
    // the inode and ctime tell the new file apart, and a live read of the old snapshot skips it.
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("x"), b"old!").unwrap();
    let s1 = snapshot(&root).unwrap();
    let mtime = fs::metadata(root.join("x")).unwrap().modified().unwrap();
    fs::write(root.join("x.tmp"), b"new!").unwrap();
    let f = fs::File::options()
        .write(true)
        .open(root.join("x.tmp"))
        .unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    fs::rename(root.join("x.tmp"), root.join("x")).unwrap();
    let s2 = snapshot(&root).unwrap();
    assert_eq!(
        s1.entries["x"], s2.entries["x"],
        "metadata alone cannot tell"
    );
    let d = diff(&s1, &s2);
    assert_eq!(d.changed.len(), 1, "the replaced file is in the diff");

    let (_, r) = send(&root, &diff(&Snapshot::default(), &s1), Reads::Live).await;
    assert_eq!(
        r.unwrap().unsettled,
        ["x"],
        "another inode than snapshotted"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}
