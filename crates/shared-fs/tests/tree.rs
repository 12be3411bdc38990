//! Snapshot, diff, confinement and Applier tests.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use shared_fs::{
    confine, diff, snapshot, Applier, Diff, EntryKind, EntryMeta, FsError, Limits, Snapshot,
};

fn is_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
}

fn set_mtime(p: &Path, secs: u64) {
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(UNIX_EPOCH + Duration::new(secs, 123_456_789)))
        .unwrap();
}

/// Applies `d` (computed on `src`) into `dst`, reading file contents from `src`.
fn apply(src: &Path, dst: &Path, d: &Diff, limits: Limits) -> Result<(), FsError> {
    let mut a = Applier::new(dst, limits)?;
    for r in &d.removed {
        a.remove(r)?;
    }
    for m in &d.changed {
        if let Some(mut w) = a.begin(m)? {
            let mut data = Vec::new();
            fs::File::open(src.join(&m.path))
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            w.write_all(&data).unwrap();
            w.commit(blake3::hash(&data).as_bytes())?;
        }
    }
    a.finish()?;
    Ok(())
}

fn file_meta(path: &str, size: u64) -> EntryMeta {
    EntryMeta {
        path: path.into(),
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_000_000_000,
        size,
        xattrs: vec![],
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn build_tree(src: &Path) {
    fs::create_dir_all(src.join("etc/conf.d")).unwrap();
    fs::create_dir_all(src.join("var/empty")).unwrap();
    write(&src.join("etc/hosts"), b"127.0.0.1 localhost\n");
    write(&src.join("etc/conf.d/a.conf"), b"x = 1\n");
    write(&src.join("bin"), &vec![7u8; 100_000]);
    fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(src.join("bin"), src.join("var/bin-link")).unwrap();
    symlink("../etc/hosts", src.join("var/hosts")).unwrap();
    symlink("/nonexistent/abs", src.join("dangling")).unwrap();
    // Sparse file: content (zeros) is preserved.
    let f = fs::File::create(src.join("sparse")).unwrap();
    f.set_len(5 << 20).unwrap();
    drop(f);
    fs::OpenOptions::new()
        .append(true)
        .open(src.join("sparse"))
        .unwrap()
        .write_all(b"tail")
        .unwrap();
    write(&src.join("empty"), b"");
    fs::set_permissions(src.join("var/empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(src.join("etc/conf.d"), fs::Permissions::from_mode(0o700)).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(src.join("var/fifo"))
        .status()
        .unwrap();
    assert!(status.success());
    if is_root() {
        std::os::unix::fs::lchown(src.join("etc/hosts"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(src.join("var/hosts"), Some(42), Some(43)).unwrap();
        std::os::unix::fs::lchown(src.join("var"), Some(7), Some(8)).unwrap();
    }
    set_mtime(&src.join("etc/hosts"), 1_500_000_000);
}

#[test]
fn snapshot_detects_kinds_and_hard_links() {
    let t = tempfile::tempdir().unwrap();
    build_tree(t.path());
    let s = snapshot(t.path()).unwrap();
    assert_eq!(s.entries["etc"].kind, EntryKind::Dir);
    assert_eq!(s.entries["bin"].kind, EntryKind::File);
    assert_eq!(s.entries["bin"].size, 100_000);
    assert_eq!(s.entries["bin"].mode, 0o4755);
    assert_eq!(
        s.entries["var/bin-link"].kind,
        EntryKind::Hardlink {
            target: "bin".into()
        }
    );
    assert_eq!(s.entries["var/bin-link"].size, 0);
    assert_eq!(
        s.entries["var/hosts"].kind,
        EntryKind::Symlink {
            target: "../etc/hosts".into()
        }
    );
    assert_eq!(s.entries["var/fifo"].kind, EntryKind::Fifo);
    assert_eq!(s.entries["etc/hosts"].mtime_ns, 1_500_000_000_123_456_789);
    assert_eq!(s.inode("bin"), s.inode("var/bin-link"));
    // Full diff = whole tree, parents first.
    let d = diff(&Snapshot::default(), &s);
    assert!(d.removed.is_empty());
    assert_eq!(d.changed.len(), s.entries.len());
    let pos = |p: &str| d.changed.iter().position(|m| m.path == p).unwrap();
    assert!(pos("etc") < pos("etc/conf.d"));
    assert!(pos("etc/conf.d") < pos("etc/conf.d/a.conf"));
    assert!(pos("bin") < pos("var/bin-link"));
}

#[test]
fn diff_add_change_remove() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::create_dir_all(r.join("d/sub")).unwrap();
    write(&r.join("d/sub/gone"), b"bye");
    write(&r.join("keep"), b"same");
    write(&r.join("change"), b"v1");
    set_mtime(&r.join("change"), 1_000);
    let s1 = snapshot(r).unwrap();
    assert!(diff(&s1, &s1).changed.is_empty());

    fs::remove_dir_all(r.join("d/sub")).unwrap();
    write(&r.join("change"), b"version 2");
    write(&r.join("new"), b"n");
    fs::hard_link(r.join("keep"), r.join("keep2")).unwrap();
    symlink("keep", r.join("sl")).unwrap();
    let s2 = snapshot(r).unwrap();
    let d = diff(&s1, &s2);
    let changed: Vec<&str> = d.changed.iter().map(|m| m.path.as_str()).collect();
    // "d" changed because its mtime changed when "sub" was removed; "keep" because its inode
    // changed (a new link: its ctime), which a diff by metadata alone would not see.
    assert_eq!(changed, vec!["change", "d", "keep", "keep2", "new", "sl"]);
    assert_eq!(
        d.removed,
        vec!["d/sub/gone".to_string(), "d/sub".to_string()]
    );
    assert_eq!(
        d.changed[3].kind,
        EntryKind::Hardlink {
            target: "keep".into()
        }
    );
}

#[test]
fn confine_rejects_escapes() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    symlink(&outside, root.join("link")).unwrap();
    symlink("../outside", root.join("rel-link")).unwrap();
    fs::create_dir(root.join("a")).unwrap();

    assert_eq!(confine(&root, "a/b").unwrap(), root.join("a/b"));
    assert_eq!(
        confine(&root, "new/deeper/x").unwrap(),
        root.join("new/deeper/x")
    );
    // The final component may itself be a symlink (it is replaced, never followed).
    assert_eq!(confine(&root, "link").unwrap(), root.join("link"));

    let long_comp = "x".repeat(256);
    let long_path = vec!["y".repeat(200); 25].join("/");
    for bad in [
        "",
        "../x",
        "/etc/passwd",
        "a/../../x",
        "..",
        ".",
        "a/./b",
        "a//b",
        "a/",
        "nul\0byte",
        long_comp.as_str(),
        long_path.as_str(),
    ] {
        match confine(&root, bad) {
            Err(FsError::InvalidPath { .. }) => {}
            other => panic!("{bad:?} not rejected: {other:?}"),
        }
    }
    for through in ["link/x", "rel-link/x", "link/a/b/c"] {
        match confine(&root, through) {
            Err(FsError::SymlinkInPath { .. }) => {}
            other => panic!("{through:?} not rejected: {other:?}"),
        }
    }
}

#[test]
fn applier_rejects_oversized_file_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Applier::new(t.path(), Limits::default()).unwrap();
    let mut w = a.begin(&file_meta("f", 5)).unwrap().unwrap();
    w.write_chunk(b"12345").unwrap();
    match w.write_chunk(b"6") {
        Err(FsError::TooLarge {
            size: 6, limit: 5, ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Through io::Write as well.
    let err = w.write_all(b"6").unwrap_err();
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<FsError>());
    assert!(matches!(inner, Some(FsError::TooLarge { .. })), "{err}");
    drop(w);
    assert!(names(t.path()).is_empty(), "{:?}", names(t.path()));

    // Declared size above the cap is refused up front.
    let limits = Limits {
        max_file_size: 10,
        ..Limits::default()
    };
    let mut a = Applier::new(t.path(), limits).unwrap();
    assert!(matches!(
        a.begin(&file_meta("big", 11)),
        Err(FsError::TooLarge {
            size: 11,
            limit: 10,
            ..
        })
    ));
    let limits = Limits {
        max_total_bytes: 10,
        ..Limits::default()
    };
    let mut a = Applier::new(t.path(), limits).unwrap();
    let w = a.begin(&file_meta("one", 6)).unwrap();
    drop(w);
    assert!(matches!(
        a.begin(&file_meta("two", 6)),
        Err(FsError::TotalTooLarge { .. })
    ));
    // Short content is refused at commit.
    let mut a = Applier::new(t.path(), Limits::default()).unwrap();
    let mut w = a.begin(&file_meta("short", 5)).unwrap().unwrap();
    w.write_chunk(b"123").unwrap();
    assert!(matches!(
        w.commit(blake3::hash(b"123").as_bytes()),
        Err(FsError::SizeMismatch {
            expected: 5,
            actual: 3,
            ..
        })
    ));
    assert!(names(t.path()).is_empty(), "{:?}", names(t.path()));
}

#[test]
fn applier_rejects_wrong_hash_and_keeps_old_file() {
    let t = tempfile::tempdir().unwrap();
    let mut a = Applier::new(t.path(), Limits::default()).unwrap();
    let mut w = a.begin(&file_meta("f", 4)).unwrap().unwrap();
    w.write_all(b"data").unwrap();
    match w.commit(blake3::hash(b"DATA").as_bytes()) {
        Err(e @ FsError::HashMismatch { .. }) => assert!(e.to_string().contains("\"f\"")),
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    assert!(names(t.path()).is_empty(), "{:?}", names(t.path()));

    // An existing file is left untouched by a failed replacement.
    write(&t.path().join("g"), b"old");
    let mut w = a.begin(&file_meta("g", 3)).unwrap().unwrap();
    w.write_all(b"new").unwrap();
    assert!(w.commit(&[0u8; 32]).is_err());
    assert_eq!(fs::read(t.path().join("g")).unwrap(), b"old");
    assert_eq!(names(t.path()), vec!["g".to_string()]);
}

#[test]
fn applier_enforces_entry_limit_and_confinement() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    write(&outside.join("secret"), b"s");
    let limits = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let mut a = Applier::new(&root, limits).unwrap();
    let dir = |p: &str| EntryMeta {
        path: p.into(),
        kind: EntryKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        size: 0,
        xattrs: vec![],
    };
    a.begin(&dir("a")).unwrap();
    a.begin(&dir("b")).unwrap();
    assert!(matches!(
        a.begin(&dir("c")),
        Err(FsError::TooManyEntries { limit: 2 })
    ));

    let mut a = Applier::new(&root, Limits::default()).unwrap();
    let link = EntryMeta {
        kind: EntryKind::Symlink {
            target: outside.to_str().unwrap().into(),
        },
        ..dir("evil")
    };
    a.begin(&link).unwrap();
    // Writing through the symlink is refused.
    assert!(matches!(
        a.begin(&file_meta("evil/pwned", 1)),
        Err(FsError::SymlinkInPath { .. })
    ));
    assert!(matches!(
        a.begin(&dir("evil/d")),
        Err(FsError::SymlinkInPath { .. })
    ));
    assert!(matches!(
        a.remove("evil/secret"),
        Err(FsError::SymlinkInPath { .. })
    ));
    // Hard links must target a regular file under root.
    let hl = |target: &str| EntryMeta {
        kind: EntryKind::Hardlink {
            target: target.into(),
        },
        ..dir("hl")
    };
    assert!(matches!(
        a.begin(&hl("evil/secret")),
        Err(FsError::SymlinkInPath { .. })
    ));
    assert!(matches!(
        a.begin(&hl("../outside/secret")),
        Err(FsError::InvalidPath { .. })
    ));
    assert!(matches!(
        a.begin(&hl("missing")),
        Err(FsError::BadHardlink { .. })
    ));
    assert!(matches!(
        a.begin(&hl("evil")),
        Err(FsError::BadHardlink { .. })
    ));
    assert!(matches!(
        a.begin(&file_meta("../escape", 1)),
        Err(FsError::InvalidPath { .. })
    ));
    // Removing the symlink removes the link, not the target.
    a.remove("evil").unwrap();
    a.remove("never-existed").unwrap();
    a.finish().unwrap();
    assert!(outside.join("secret").exists());
    assert!(!root.join("evil").exists());
}

fn assert_same(a: &Snapshot, b: &Snapshot) {
    for (k, v) in &a.entries {
        assert_eq!(Some(v), b.entries.get(k), "entry {k}");
    }
    assert_eq!(a.entries.len(), b.entries.len());
}

#[test]
fn round_trip_full_then_incremental() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    fs::create_dir(&src).unwrap();
    build_tree(&src);
    let s1 = snapshot(&src).unwrap();
    apply(
        &src,
        &dst,
        &diff(&Snapshot::default(), &s1),
        Limits::default(),
    )
    .unwrap();
    let d1 = snapshot(&dst).unwrap();
    assert_same(&s1, &d1);
    assert_eq!(d1.inode("bin"), d1.inode("var/bin-link"));
    assert_eq!(
        fs::read(dst.join("sparse")).unwrap(),
        fs::read(src.join("sparse")).unwrap()
    );
    assert_eq!(fs::read(dst.join("bin")).unwrap(), vec![7u8; 100_000]);

    // Incremental: change content (hard linked), replace a dir by a file and a file
    // by a dir, remove things, add a file in an existing dir.
    std::thread::sleep(Duration::from_millis(20));
    write(&src.join("bin"), b"new binary");
    fs::remove_dir_all(src.join("etc/conf.d")).unwrap();
    write(&src.join("etc/conf.d"), b"now a file");
    fs::remove_file(src.join("empty")).unwrap();
    fs::create_dir(src.join("empty")).unwrap();
    write(&src.join("empty/inside"), b"i");
    write(&src.join("var/empty/added"), b"added");
    fs::remove_file(src.join("dangling")).unwrap();
    symlink("elsewhere", src.join("dangling")).unwrap();
    let s2 = snapshot(&src).unwrap();
    let d = diff(&s1, &s2);
    assert!(d.removed.contains(&"etc/conf.d/a.conf".to_string()));
    apply(&src, &dst, &d, Limits::default()).unwrap();
    let d2 = snapshot(&dst).unwrap();
    assert_same(&s2, &d2);
    assert_eq!(fs::read(dst.join("var/bin-link")).unwrap(), b"new binary");
    // Nothing else (no temp files) was left behind.
    assert_eq!(names(&dst), names(&src));
}
