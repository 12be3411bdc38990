//! Images and the deduplicated base layer, end to end: containers from one image share its
//! base on a host, a migration sends the base once per host and then only each container's own
//! layer, and an OCI image layout built here imports and runs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A fresh directory under the lab's directory (removed with the lab).
fn scratch(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("{LAB_DIR}/test-{name}"));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// Disk use of `dir` in bytes, not crossing into other filesystems (the overlay mounts).
fn du(dir: &str) -> u64 {
    let out = Command::new("du")
        .args(["-x", "-s", "-B1", dir])
        .output()
        .expect("du");
    assert!(out.status.success(), "du {dir}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du output")
}

/// Writes `len` incompressible bytes to `path`.
fn filler(path: &Path, len: usize) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

fn run_from_image(lab: &Lab, host: &str, name: &str, image: &str) -> Value {
    ferry_ok(&[
        "run",
        "--on",
        host,
        "--name",
        name,
        "--image",
        image,
        "--",
        "/bin/ferry-workload",
        "echo",
        "--port",
        "7000",
    ]);
    let c = lab.container(name).expect("listed");
    assert_eq!(c["image"]["name"], image, "{c}");
    wait_port(c["ip"].as_str().unwrap());
    c
}

fn images_on(host: &str) -> Value {
    let v: Value =
        serde_json::from_str(&ferry_ok(&["image", "ls", "--on", host, "--json"])).unwrap();
    v[0].clone()
}

#[test]
fn containers_share_their_image_and_a_migration_sends_it_once_per_host() {
    let lab = Lab::up();
    let root = scratch("image-rootfs");
    ferry_ok(&["lab", "rootfs", root.to_str().unwrap()]);
    filler(&root.join("filler"), 32 << 20);
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/a"), b"a\n").unwrap();
    std::fs::write(root.join("data/b"), b"b\n").unwrap();
    let imported: Value = serde_json::from_str(&ferry_ok(&[
        "image",
        "import",
        "--on",
        "h1",
        "--name",
        "base:1",
        "--json",
        root.to_str().unwrap(),
    ]))
    .unwrap();
    let base = imported["image"]["bytes"].as_u64().unwrap();
    assert!(base > 32 * MIB, "{imported}");
    let state = format!("{LAB_DIR}/h1");

    // Two containers from the image: the base is materialized once, the second container
    // adds only its own (empty) layer.
    let u0 = du(&state);
    let c1 = run_from_image(&lab, "h1", "c1", "base:1");
    let u1 = du(&state);
    let c2 = run_from_image(&lab, "h1", "c2", "base:1");
    let u2 = du(&state);
    eprintln!(
        "h1 state: {:.1} MiB with the image stored, {:.1} MiB with one container, {:.1} MiB with two (image {:.1} MiB)",
        u0 as f64 / MIB as f64,
        u1 as f64 / MIB as f64,
        u2 as f64 / MIB as f64,
        base as f64 / MIB as f64
    );
    assert!(
        u1 - u0 <= base + 2 * MIB,
        "the first container materializes the base once: +{} bytes",
        u1 - u0
    );
    assert!(
        u2 - u1 < MIB,
        "the second container must not copy the base: +{} bytes",
        u2 - u1
    );

    // The second container changes its root: a new file, and a base file deleted.
    let c2_root = format!("{state}/containers/c2/rootfs");
    std::fs::write(format!("{c2_root}/own.txt"), b"c2's own file\n").unwrap();
    std::fs::remove_file(format!("{c2_root}/filler")).unwrap();
    // A base directory replaced by one of its own: overlayfs marks it opaque.
    std::fs::remove_dir_all(format!("{c2_root}/data")).unwrap();
    std::fs::create_dir(format!("{c2_root}/data")).unwrap();
    std::fs::write(format!("{c2_root}/data/c"), b"c\n").unwrap();

    // h2 lacks the image: the first migration brings it.
    let (code, r1) = migrate_json("c1", "h2", &[], Duration::from_secs(120));
    assert_eq!(code, 0, "{r1}");
    let sent1 = r1["bytes_sent"].as_u64().unwrap();
    eprintln!("c1 h1 -> h2 (h2 lacks the image): {sent1} bytes sent");
    assert!(
        sent1 >= base && sent1 < base + base / 10 + 2 * MIB,
        "the image crosses once: {sent1} bytes for a {base}-byte image"
    );
    assert_eq!(ask_workload(c1["ip"].as_str().unwrap(), "hi"), "1 hi");
    let h2 = images_on("h2");
    assert_eq!(h2["images"][0]["name"], "base:1", "{h2}");
    assert_eq!(h2["images"][0]["tree"], imported["image"]["tree"], "{h2}");

    // Now h2 holds it: the second container sends only its own layer.
    let (code, r2) = migrate_json("c2", "h2", &[], Duration::from_secs(120));
    assert_eq!(code, 0, "{r2}");
    let sent2 = r2["bytes_sent"].as_u64().unwrap();
    eprintln!("c2 h1 -> h2 (h2 holds the image): {sent2} bytes sent");
    assert!(
        sent2 < MIB,
        "only c2's own layer should cross: {sent2} bytes"
    );
    assert_eq!(ask_workload(c2["ip"].as_str().unwrap(), "hi"), "1 hi");
    let c2_there = format!("{LAB_DIR}/h2/containers/c2/rootfs");
    assert_eq!(
        std::fs::read(format!("{c2_there}/own.txt")).unwrap(),
        b"c2's own file\n"
    );
    assert!(
        !Path::new(&format!("{c2_there}/filler")).exists(),
        "the deletion moved with the container"
    );
    let listed: Vec<String> = std::fs::read_dir(format!("{c2_there}/data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        listed,
        ["c"],
        "the opaque directory hides the base's files there too"
    );
    assert!(
        Path::new(&format!("{LAB_DIR}/h2/containers/c1/rootfs/filler")).exists(),
        "the base itself is intact"
    );
    // h2 stores the base once for both, and gc keeps what containers use.
    let s = images_on("h2");
    assert_eq!(s["usage"]["chunk_bytes"].as_u64().unwrap(), base, "{s}");
    ferry_ok(&["image", "rm", "--on", "h2", "base:1"]);
    let out = ferry_ok(&["image", "gc", "--on", "h2"]);
    assert!(out.contains("removed 0 chunks"), "{out}");
    assert_clean_host("h1", "c1");
    assert_clean_host("h1", "c2");
}

#[test]
fn an_oci_image_layout_built_here_imports_and_runs() {
    let lab = Lab::up();
    let work = scratch("oci");
    std::fs::create_dir_all(&work).unwrap();
    // Layer 1 (gzip): the workload root filesystem, a hard link, and a file layer 2 removes.
    let l1 = work.join("l1");
    ferry_ok(&["lab", "rootfs", l1.to_str().unwrap()]);
    std::fs::hard_link(l1.join("bin/ferry-workload"), l1.join("bin/wl-again")).unwrap();
    std::fs::create_dir_all(l1.join("etc")).unwrap();
    std::fs::write(l1.join("etc/old"), b"removed by the next layer\n").unwrap();
    // Layer 2 (plain tar): a whiteout of etc/old and a new file.
    let l2 = work.join("l2");
    std::fs::create_dir_all(l2.join("etc")).unwrap();
    std::fs::write(l2.join("etc/.wh.old"), b"").unwrap();
    std::fs::write(l2.join("etc/motd"), b"from layer 2\n").unwrap();

    let layout = work.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    tar(&l1, &work.join("l1.tar.gz"), true);
    tar(&l2, &work.join("l2.tar"), false);
    let d1 = blob(
        &layout,
        &work.join("l1.tar.gz"),
        "application/vnd.oci.image.layer.v1.tar+gzip",
    );
    let d2 = blob(
        &layout,
        &work.join("l2.tar"),
        "application/vnd.oci.image.layer.v1.tar",
    );
    let d2_digest = d2["digest"].as_str().unwrap().to_string();
    let config = write_json_blob(
        &layout,
        &serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        "application/vnd.oci.image.config.v1+json",
    );
    let mut manifest = write_json_blob(
        &layout,
        &serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": [d1, d2]}),
        "application/vnd.oci.image.manifest.v1+json",
    );
    manifest["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "wl:oci"});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [manifest]}))
            .unwrap(),
    )
    .unwrap();

    let out: Value = serde_json::from_str(&ferry_ok(&[
        "image",
        "import",
        "--on",
        "h1",
        "--name",
        "wl:oci",
        "--json",
        layout.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(out["format"], "oci", "{out}");
    // The same layout as an archive (what `docker save` writes) is the same image.
    let archive = work.join("layout.tar");
    tar(&layout, &archive, false);
    let packed: Value = serde_json::from_str(&ferry_ok(&[
        "image",
        "import",
        "--on",
        "h1",
        "--name",
        "wl:tar",
        "--json",
        archive.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(packed["format"], "oci-archive", "{packed}");
    assert_eq!(packed["image"]["tree"], out["image"]["tree"]);
    assert_eq!(packed["stats"]["new_chunks"], 0, "nothing new: {packed}");
    ferry_ok(&["image", "rm", "--on", "h1", "wl:tar"]);
    // A layout with a damaged layer is refused with the reason, and nothing is named.
    let broken = work.join("broken");
    assert!(Command::new("cp")
        .args(["-a"])
        .arg(&layout)
        .arg(&broken)
        .status()
        .unwrap()
        .success());
    let hex = d2_digest.trim_start_matches("sha256:");
    let mut l2_bytes = std::fs::read(broken.join("blobs/sha256").join(hex)).unwrap();
    l2_bytes[700] ^= 0x40;
    std::fs::write(broken.join("blobs/sha256").join(hex), l2_bytes).unwrap();
    let bad = ferry(&[
        "image",
        "import",
        "--on",
        "h1",
        "--name",
        "x",
        broken.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("corrupted"), "{err}");
    let names: Vec<String> = images_on("h1")["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["wl:oci"]);

    let c = run_from_image(&lab, "h1", "oci1", "wl:oci");
    assert_eq!(ask_workload(c["ip"].as_str().unwrap(), "hello"), "1 hello");
    let root = format!("{LAB_DIR}/h1/containers/oci1/rootfs");
    assert!(
        !Path::new(&format!("{root}/etc/old")).exists(),
        "whiteout applied"
    );
    assert_eq!(
        std::fs::read(format!("{root}/etc/motd")).unwrap(),
        b"from layer 2\n"
    );
    // Every file the tarballs hold is in the container's root with the same content, but the
    // one the whiteout removed.
    let mut checked = 0;
    let mut stack = vec![l1.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(&l1).unwrap().to_string_lossy().into_owned();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && rel != "etc/old" {
                assert_eq!(
                    std::fs::read(&p).unwrap(),
                    std::fs::read(format!("{root}/{rel}")).unwrap(),
                    "{rel}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 3, "{checked} files compared");
    let a = std::fs::metadata(format!("{root}/bin/ferry-workload")).unwrap();
    let b = std::fs::metadata(format!("{root}/bin/wl-again")).unwrap();
    assert_eq!(a.ino(), b.ino(), "the hard link is a hard link");
}

/// A valid one-file base tree (distinct for each `i`) as the store serializes trees: its bytes
/// and id (their blake3).
fn tiny_tree(i: u32) -> (Vec<u8>, String) {
    let content = format!("file {i}\n");
    let chunk = blake3_hex(content.as_bytes());
    let tree = serde_json::json!({
        "version": 1,
        "entries": [{
            "path": format!("f{i}"),
            "kind": "File",
            "mode": 420,
            "uid": 0,
            "gid": 0,
            "mtime_ns": 0,
            "size": content.len(),
            "chunks": [{"hash": chunk, "len": content.len()}],
            "blake3": chunk,
        }]
    });
    let bytes = serde_json::to_vec(&tree).expect("tree json");
    let id = blake3_hex(&bytes);
    (bytes, id)
}

fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[test]
fn a_hundred_failed_base_transfers_do_not_block_the_next() {
    let lab = Lab::up();
    // A source that sends a base tree, then chunks that are not the tree's: refused, and the
    // tree it left waiting is forgotten (64 such leftovers used to refuse every new base).
    for i in 0..100 {
        let (bytes, id) = tiny_tree(i);
        let r = peer_request_payload(
            "h1",
            "h2",
            &serde_json::json!({"op": "base_tree", "tree": id, "len": bytes.len()}),
            &bytes,
        );
        assert_eq!(r["result"], "base_missing", "base tree {i}: {r}");
        let mut wrong = vec![0xabu8; 32];
        wrong.extend_from_slice(&1u32.to_be_bytes());
        wrong.push(b'x');
        let r = peer_request_payload(
            "h1",
            "h2",
            &serde_json::json!({"op": "base_chunks", "tree": id, "count": 1}),
            &wrong,
        );
        assert_eq!(r["result"], "error", "chunks of base {i}: {r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("was not asked for"),
            "{r}"
        );
    }
    // A real base still arrives: a container from an image h2 lacks moves there.
    let root = scratch("base-after-failures");
    ferry_ok(&["lab", "rootfs", root.to_str().unwrap()]);
    import_image("h1", "wl:1", &root);
    run_from_image(&lab, "h1", "c1", "wl:1");
    let (code, r) = migrate_json("c1", "h2", &[], Duration::from_secs(120));
    assert_eq!(
        (code, &r["result"]),
        (0, &serde_json::json!("completed")),
        "{r}"
    );
    assert_eq!(images_on("h2")["images"][0]["name"], "wl:1");
}

#[test]
fn gc_during_an_incoming_migration_keeps_its_base() {
    let lab = Lab::up();
    // h2 already names "wl:1" another image, so the base arriving for c1 is not named there:
    // only the incoming job keeps it from gc.
    let other = scratch("gc-other");
    ferry_ok(&["lab", "rootfs", other.to_str().unwrap()]);
    std::fs::write(other.join("etc/other"), b"another image").unwrap();
    import_image("h2", "wl:1", &other);
    let root = scratch("gc-base");
    ferry_ok(&["lab", "rootfs", root.to_str().unwrap()]);
    import_image("h1", "wl:1", &root);
    let c = run_from_image(&lab, "h1", "c1", "wl:1");
    let tree = c["image"]["tree"].as_str().expect("tree").to_string();
    let (_, job) = start_migration("c1", "h2", &["--pause-in-transfer-ms", "4000"]);
    wait_job_state(&job, "transferring");
    let gc = ferry_ok(&["image", "gc", "--on", "h2"]);
    assert!(
        std::path::Path::new(&format!("{LAB_DIR}/h2/store/layers/{tree}")).is_dir(),
        "gc removed the base of an incoming migration: {gc}"
    );
    let r = wait_job(&job);
    assert_eq!(r["result"], "completed", "{r}");
    let c = lab.container("c1").expect("c1");
    assert_eq!(c["host"], "h2");
    wait_port(c["ip"].as_str().expect("ip"));
    // Its base is still whole at h2: a file of the image reads back.
    let file = format!("{LAB_DIR}/h2/store/layers/{tree}/etc/passwd");
    assert!(
        std::fs::read_to_string(&file).is_ok_and(|s| s.contains("root")),
        "{file}"
    );
}

/// A digest of everything under `dir` a program in the container can see: every entry's
/// path, kind, mode, owner and link target, and every file's content (a directory's size
/// depends on the order its entries were made in, not on what it holds).
fn root_digest(dir: &Path) -> String {
    let script = r#"set -euo pipefail
cd "$1"
{ find . -xdev -printf '%y %m %U %G %p -> %l\n' | LC_ALL=C sort
  find . -xdev -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
} | sha256sum"#;
    let out = Command::new("bash")
        .args(["-c", script, "root_digest"])
        .arg(dir)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "digest of {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Writes `files` files of distinct, incompressible content, `bytes` in all, in 100
/// directories under `root`.
fn many_files(root: &Path, files: usize, bytes: usize) {
    let per = bytes / files;
    let mut buf = vec![0u8; per];
    for d in 0..100 {
        std::fs::create_dir_all(root.join(format!("many/d{d:02}"))).unwrap();
    }
    for i in 0..files {
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        std::fs::write(root.join(format!("many/d{:02}/f{i:06}", i % 100)), &buf).unwrap();
    }
}

#[test]
fn an_image_of_100000_files_and_1_gib_moves_to_a_host_that_lacks_it() {
    const FILES: usize = 100_000;
    let lab = Lab::up();
    let root = scratch("big-image");
    ferry_ok(&["lab", "rootfs", root.to_str().unwrap()]);
    many_files(&root, FILES, 1 << 30);
    let t = std::time::Instant::now();
    let imported: Value = serde_json::from_str(&ferry_ok(&[
        "image",
        "import",
        "--on",
        "h1",
        "--name",
        "big:1",
        "--json",
        root.to_str().unwrap(),
    ]))
    .unwrap();
    let import_s = t.elapsed().as_secs_f64();
    let stats = &imported["stats"];
    let bytes = stats["bytes"].as_u64().unwrap();
    let chunks = stats["chunks"].as_u64().unwrap();
    assert!(bytes >= 1 << 30, "{imported}");
    assert!(chunks >= FILES as u64, "{imported}");
    eprintln!(
        "import on h1: {} entries, {:.1} MiB in {chunks} chunks in {import_s:.1} s: {:.0} MiB/s, {:.0} files/s",
        stats["entries"],
        bytes as f64 / MIB as f64,
        bytes as f64 / MIB as f64 / import_s,
        FILES as f64 / import_s
    );
    std::fs::remove_dir_all(&root).unwrap();

    let c = run_from_image(&lab, "h1", "big", "big:1");
    let before = root_digest(Path::new(&format!("{LAB_DIR}/h1/containers/big/rootfs")));
    let (code, r) = migrate_json("big", "h2", &[], Duration::from_secs(600));
    assert_eq!(code, 0, "{r}");
    let base = &r["base"];
    assert_eq!(base["image"], "big:1", "{r}");
    assert_eq!(base["held"], false, "h2 lacked the image: {r}");
    assert_eq!(base["chunks"].as_u64(), Some(chunks), "{r}");
    assert_eq!(base["chunks_sent"].as_u64(), Some(chunks), "{r}");
    assert_eq!(base["chunk_bytes"].as_u64(), Some(bytes), "{r}");
    let base_s = base["ms"].as_f64().unwrap() / 1000.0;
    let prepare_ms = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "prepare")
        .and_then(|p| p["duration_ms"].as_f64())
        .unwrap_or(f64::NAN);
    eprintln!(
        "h1 -> h2: base layer {:.1} MiB in {chunks} chunks crossed in {base_s:.1} s: {:.0} MiB/s, {:.0} chunks/s; prepare (base + materialized at h2) {:.1} s; frozen {:.1} ms; total {:.1} s",
        bytes as f64 / MIB as f64,
        bytes as f64 / MIB as f64 / base_s,
        chunks as f64 / base_s,
        prepare_ms / 1000.0,
        r["frozen_ms"].as_f64().unwrap(),
        r["total_ms"].as_f64().unwrap() / 1000.0
    );
    assert_eq!(ask_workload(c["ip"].as_str().unwrap(), "hi"), "1 hi");
    let after = root_digest(Path::new(&format!("{LAB_DIR}/h2/containers/big/rootfs")));
    assert_eq!(
        before, after,
        "the container's root at h2 differs from h1's"
    );
    let h2 = images_on("h2");
    assert_eq!(h2["images"][0]["name"], "big:1", "{h2}");
    assert_eq!(h2["images"][0]["tree"], imported["image"]["tree"], "{h2}");
    assert_clean_host("h1", "big");
}
