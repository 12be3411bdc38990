//! Importing an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) into a
//! [`Store`]: the manifest's layers are applied in order, with whiteouts (`.wh.NAME` removes
//! NAME of the layers below, `.wh..wh..opq` empties its directory of them), hard links,
//! symlinks, devices and extended attributes (PAX `SCHILY.xattr.*`). Every blob is checked
//! against its digest; a layer whose digest does not match fails the import before anything
//! is named.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::confine::check_syntax;
use crate::store::{implicit_dir, parent_of, tree_from_entries, Id, ImportStats, Store, TreeEntry};
use crate::Xattr;
use crate::{EntryKind, EntryMeta, FsError};

/// Largest `index.json` or manifest read.
const MAX_JSON: u64 = 4 << 20;
/// The annotation that names an image in an index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What [`import_oci`] imported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct OciImport {
    /// The reference picked from the index, if it had one.
    pub reference: Option<String>,
    /// The manifest's digest.
    pub manifest: String,
    /// Layers applied.
    pub layers: usize,
    /// Content found.
    pub stats: ImportStats,
    /// How the image's author meant it to run (its config blob's `config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ImageConfig>,
}

/// How an image's author meant it to run: the `config` object of an OCI (or Docker) image
/// config blob. `ferry run --image` without a command runs `entrypoint` + `cmd` with `env`,
/// in `working_dir`, as `user`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// `Cmd`: the entrypoint's default arguments, or the command without one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `Env`, `KEY=VALUE` each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `WorkingDir` (empty: `/`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `User`: `user`, `uid`, `user:group` or `uid:gid` (empty: root).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `StopSignal`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    /// `ExposedPorts`' keys (`80/tcp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
}

/// An image config blob, as much of it as Ferry uses.
#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<RawConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    stop_signal: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

impl From<RawConfig> for ImageConfig {
    fn from(c: RawConfig) -> Self {
        ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
            stop_signal: c.stop_signal.unwrap_or_default(),
            exposed_ports: c.exposed_ports.unwrap_or_default().into_keys().collect(),
        }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn err(layout: &Path, reason: impl Into<String>) -> FsError {
    FsError::Oci {
        layout: layout.to_path_buf(),
        reason: reason.into(),
    }
}

/// Opens a file of a layout for reading; only a regular file. Whatever else stands at its name
/// (a symlink from an archive to a FIFO or a device, say) is refused without blocking on it:
/// opening a FIFO would wait forever for a writer, `/dev/zero` would never end.
fn open_regular(layout: &Path, path: &Path) -> Result<File, FsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| FsError::io("open", path, e))?;
    let md = f.metadata().map_err(|e| FsError::io("stat", path, e))?;
    if !md.is_file() {
        return Err(err(
            layout,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// Reads a small file of a layout (a regular file of at most `cap` bytes).
fn read_small(layout: &Path, path: &Path, cap: u64) -> Result<Vec<u8>, FsError> {
    let mut bytes = vec![];
    open_regular(layout, path)?
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| FsError::io("read", path, e))?;
    if bytes.len() as u64 > cap {
        return Err(err(
            layout,
            format!("{} is larger than {cap} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// The blob file of `digest` (`sha256:<64 hex>`), confined to `blobs/sha256/`.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, FsError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| {
            err(
                layout,
                format!(
                    "digest {:?} is not sha256:<64 lowercase hex digits>",
                    digest.chars().take(100).collect::<String>()
                ),
            )
        })?;
    Ok(layout.join("blobs").join("sha256").join(hex))
}

/// Reads a small JSON blob, checking size and digest.
fn read_json_blob<T: serde::de::DeserializeOwned>(
    layout: &Path,
    d: &Descriptor,
) -> Result<T, FsError> {
    if d.size > MAX_JSON {
        return Err(err(
            layout,
            format!("{} is {} bytes (at most {MAX_JSON})", d.digest, d.size),
        ));
    }
    let path = blob_path(layout, &d.digest)?;
    let bytes = read_small(layout, &path, d.size)?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    if actual != d.digest || bytes.len() as u64 != d.size {
        return Err(err(
            layout,
            format!(
                "blob {} holds {} bytes hashing to {actual}: corrupted",
                d.digest,
                bytes.len()
            ),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| err(layout, format!("{}: {e}", d.digest)))
}

/// Reads through, hashing (sha256) and counting what passes.
struct DigestReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The most bytes a layer's tar stream may decompress to under `l`: its content, plus three
/// 512-byte blocks of headers for each entry (a PAX record, a long name, the header), plus
/// 1 MiB of slack for padding and whiteouts.
fn expansion_cap(l: &crate::Limits) -> u64 {
    l.max_total_bytes
        .saturating_add(l.max_entries.saturating_mul(3 * 512))
        .saturating_add(1 << 20)
}

/// Reads at most `left` bytes from `inner`; a read past them fails and sets `exceeded`.
struct Capped<R> {
    inner: R,
    left: u64,
    exceeded: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // One byte more tells a stream that ends exactly here from one that goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "it expands past the most the store's limits allow",
            ));
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..n])?;
        self.left -= got as u64;
        Ok(got)
    }
}

/// Imports an OCI image layout packed as a tar archive (what `docker save` writes since Docker
/// 25, or `skopeo copy ... oci-archive:`): unpacked into the store's scratch space (the tar
/// crate never writes outside it), imported with [`import_oci`], then removed.
pub fn import_oci_archive(
    store: &Store,
    archive: &Path,
    reference: Option<&str>,
) -> Result<(Id, OciImport), FsError> {
    let dir = store.scratch_dir()?;
    let res = (|| {
        let f = File::open(archive).map_err(|e| FsError::io("open", archive, e))?;
        let mut r = BufReader::new(f);
        let head = r
            .fill_buf()
            .map_err(|e| FsError::io("read", archive, e))?
            .to_vec();
        let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::GzDecoder::new(r))
        } else {
            Box::new(r)
        };
        let bad = |e: io::Error| err(archive, format!("not a readable tar archive: {e}"));
        // What the layout may hold: its layers' content, compressed or not, and small JSON.
        let cap = expansion_cap(store.limits());
        let mut capped = Capped {
            inner: stream,
            left: cap.saturating_mul(2),
            exceeded: false,
        };
        let mut unpacked = 0u64;
        let mut tar = tar::Archive::new(&mut capped);
        // Directories last, like `Archive::unpack`: their modes may forbid writing into them.
        let mut dirs = vec![];
        for entry in tar.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            // A layout is directories and regular files. Anything else (a symlink from
            // `index.json` to a FIFO or to a host file, a device) is left out, so that what
            // the import opens is what the archive holds.
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    unpacked = unpacked.saturating_add(entry.size());
                    if unpacked > cap {
                        return Err(err(
                            archive,
                            format!(
                                "the archive holds more than {cap} bytes of files, more than an \
                                 image within the store's limits can ({} bytes of content)",
                                store.limits().max_total_bytes
                            ),
                        ));
                    }
                    entry.unpack_in(&dir).map_err(bad)?;
                }
                tar::EntryType::Directory => dirs.push(entry),
                other => tracing::debug!(kind = ?other, "archive entry of another type skipped"),
            }
        }
        for mut d in dirs {
            d.unpack_in(&dir).map_err(bad)?;
        }
        if !dir.join("oci-layout").is_file() {
            return Err(err(
                archive,
                "no oci-layout file in the archive: not an OCI image layout (older `docker save` \
                 archives are not; `skopeo copy docker-archive:IN oci:DIR` converts them)",
            ));
        }
        import_oci(store, &dir, reference)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// Imports the image `reference` (an `org.opencontainers.image.ref.name` of the index; may be
/// omitted when the index has one image) of the OCI layout at `layout`. Returns the tree's id.
pub fn import_oci(
    store: &Store,
    layout: &Path,
    reference: Option<&str>,
) -> Result<(Id, OciImport), FsError> {
    let _import = store.import_guard();
    let marker = layout.join("oci-layout");
    let m: serde_json::Value = serde_json::from_slice(&read_small(layout, &marker, MAX_JSON)?)
        .map_err(|e| err(layout, format!("oci-layout: {e}")))?;
    if m["imageLayoutVersion"].as_str().is_none() {
        return Err(err(layout, "oci-layout has no imageLayoutVersion"));
    }
    let index_path = layout.join("index.json");
    let index: Index = serde_json::from_slice(&read_small(layout, &index_path, MAX_JSON)?)
        .map_err(|e| err(layout, format!("index.json: {e}")))?;
    let desc = pick(layout, &index.manifests, reference)?;
    let mut out = OciImport {
        reference: desc.annotations.get(REF_NAME).cloned(),
        manifest: desc.digest.clone(),
        ..OciImport::default()
    };
    // A nested index (multi-platform image): pick this machine's platform.
    let manifest: Manifest = if desc.media_type.ends_with("image.index.v1+json")
        || desc.media_type.ends_with("manifest.list.v2+json")
    {
        let nested: Index = read_json_blob(layout, desc)?;
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            a => a,
        };
        let d = nested
            .manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .ok_or_else(|| err(layout, format!("no linux/{arch} image in {}", desc.digest)))?;
        out.manifest = d.digest.clone();
        read_json_blob(layout, d)?
    } else {
        read_json_blob(layout, desc)?
    };
    if let Some(c) = &manifest.config {
        let blob: ConfigBlob = read_json_blob(layout, c)?;
        out.config = blob.config.map(ImageConfig::from);
    }
    let mut state = Layers::new(store);
    for l in &manifest.layers {
        state.apply_layer(layout, l).map_err(|e| match e {
            FsError::Oci { .. } => e,
            other => err(layout, format!("layer {}: {other}", l.digest)),
        })?;
        out.layers += 1;
    }
    state.batch.finish()?;
    out.stats = state.stats.clone();
    out.stats.entries = state.map.len() as u64;
    let tree = tree_from_entries(state.map.into_iter().collect());
    Ok((store.put_tree(&tree)?, out))
}

fn pick<'a>(
    layout: &Path,
    manifests: &'a [Descriptor],
    reference: Option<&str>,
) -> Result<&'a Descriptor, FsError> {
    let names: Vec<&str> = manifests
        .iter()
        .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
        .collect();
    match reference {
        Some(r) => manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == r))
            .ok_or_else(|| {
                err(
                    layout,
                    format!("no image {r:?} in index.json (it has {names:?})"),
                )
            }),
        None if manifests.len() == 1 => Ok(&manifests[0]),
        None => Err(err(
            layout,
            format!(
                "index.json lists {} images: name one with --ref (it has {names:?})",
                manifests.len()
            ),
        )),
    }
}

/// The tree being built, layer after layer.
struct Layers<'s> {
    store: &'s Store,
    /// The layers' chunks, synced a batch at a time.
    batch: crate::batch::ChunkBatch<'s>,
    map: BTreeMap<String, TreeEntry>,
    stats: ImportStats,
}

/// A tar path as a tree path: without `./`, leading or trailing `/`; `None` for the root.
fn normalize(raw: &[u8]) -> Result<Option<String>, String> {
    let s = std::str::from_utf8(raw).map_err(|_| "a path that is not UTF-8".to_string())?;
    let mut s = s.trim_end_matches('/');
    loop {
        if let Some(r) = s.strip_prefix("./") {
            s = r;
        } else if let Some(r) = s.strip_prefix('/') {
            s = r;
        } else {
            break;
        }
    }
    if s.is_empty() || s == "." {
        return Ok(None);
    }
    check_syntax(s, crate::MAX_PATH_LEN).map_err(|e| e.to_string())?;
    Ok(Some(s.to_owned()))
}

impl<'s> Layers<'s> {
    fn new(store: &'s Store) -> Self {
        Layers {
            store,
            batch: store.chunk_batch(),
            map: BTreeMap::new(),
            stats: ImportStats::default(),
        }
    }

    /// Removes `path` and everything under it, except what `keep` holds; a file that hard
    /// links point at hands its content to the first remaining link.
    fn remove(&mut self, path: &str, keep: &HashSet<String>) {
        let prefix = format!("{path}/");
        let mut gone: Vec<String> = self
            .map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .filter(|k| !keep.contains(k))
            .collect();
        if self.map.contains_key(path) && !keep.contains(path) {
            gone.push(path.to_owned());
        }
        for g in &gone {
            let Some(e) = self.map.remove(g) else {
                continue;
            };
            if e.meta.kind != EntryKind::File {
                continue;
            }
            let links: Vec<String> = self
                .map
                .iter()
                .filter(
                    |(_, x)| matches!(&x.meta.kind, EntryKind::Hardlink { target } if target == g),
                )
                .map(|(k, _)| k.clone())
                .collect();
            if let Some((first, rest)) = links.split_first() {
                let mut f = e.clone();
                f.meta.path = first.clone();
                self.map.insert(first.clone(), f);
                for l in rest {
                    if let Some(x) = self.map.get_mut(l) {
                        x.meta.kind = EntryKind::Hardlink {
                            target: first.clone(),
                        };
                    }
                }
            }
        }
    }

    fn apply_layer(&mut self, layout: &Path, d: &Descriptor) -> Result<(), FsError> {
        let path = blob_path(layout, &d.digest)?;
        let file = open_regular(layout, &path)?;
        let mut raw = DigestReader {
            inner: file,
            hasher: Sha256::new(),
            count: 0,
        };
        // The digest is checked even when the tar breaks: a damaged blob is reported as such.
        let applied = (|| {
            let mut buffered = BufReader::with_capacity(256 << 10, &mut raw);
            let head = buffered
                .fill_buf()
                .map_err(|e| FsError::io("read", &path, e))?
                .to_vec();
            let tar_stream: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::read::GzDecoder::new(buffered))
            } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                Box::new(
                    zstd::stream::read::Decoder::with_buffer(buffered)
                        .map_err(|e| FsError::io("decompress", &path, e))?,
                )
            } else {
                Box::new(buffered)
            };
            // Decompressed bytes are capped: headers, padding and skipped entries' data count
            // too, so that no layer expands without bound however little it keeps.
            let cap = expansion_cap(self.store.limits());
            let mut capped = Capped {
                inner: tar_stream,
                left: cap,
                exceeded: false,
            };
            let r = self.apply_tar(layout, &mut capped);
            if capped.exceeded {
                return Err(err(
                    layout,
                    format!(
                        "layer {} expands past {cap} bytes, more than its entries may hold \
                         ({} entries of at most {} bytes in all; the store's limits)",
                        d.digest,
                        self.store.limits().max_entries,
                        self.store.limits().max_total_bytes
                    ),
                ));
            }
            // Nothing after the tar's end-of-archive is decompressed: the digest below is of
            // the raw blob.
            r
        })();
        // The rest of the blob is hashed raw, reading at most one byte past its declared size.
        let rest = d.size.saturating_sub(raw.count).saturating_add(1);
        io::copy(&mut (&mut raw).take(rest), &mut io::sink())
            .map_err(|e| FsError::io("read", &path, e))?;
        if raw.count != d.size {
            let what = if raw.count > d.size {
                "is larger than".to_string()
            } else {
                format!("is {} bytes, not", raw.count)
            };
            return Err(err(
                layout,
                format!(
                    "layer {} {what} the {} bytes its descriptor says: corrupted, nothing imported",
                    d.digest, d.size
                ),
            ));
        }
        let actual = format!("sha256:{}", hex::encode(raw.hasher.finalize()));
        if actual != d.digest {
            return Err(err(
                layout,
                format!(
                    "layer {} hashes to {actual} ({} bytes): corrupted, nothing imported",
                    d.digest, raw.count
                ),
            ));
        }
        applied
    }

    fn apply_tar(&mut self, layout: &Path, r: &mut dyn Read) -> Result<(), FsError> {
        let limits = self.store.limits().clone();
        let mut archive = tar::Archive::new(r);
        let mut added: HashSet<String> = HashSet::new();
        let entries = archive
            .entries()
            .map_err(|e| err(layout, format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| err(layout, format!("bad tar entry: {e}")))?;
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
            ) {
                continue;
            }
            let raw_path = entry.path_bytes().into_owned();
            let path = normalize(&raw_path).map_err(|reason| {
                err(
                    layout,
                    format!(
                        "tar entry {:?}: {reason}",
                        String::from_utf8_lossy(&raw_path)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    ),
                )
            })?;
            let Some(path) = path else {
                continue;
            };
            let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
            let parent = parent_of(&path).to_owned();
            // Whiteouts act on the layers below.
            if name == ".wh..wh..opq" {
                let prefix = if parent.is_empty() {
                    String::new()
                } else {
                    format!("{parent}/")
                };
                let under: Vec<String> = self
                    .map
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .filter(|k| *k != parent)
                    .collect();
                for k in under {
                    if !added.contains(&k) {
                        self.remove(&k, &added);
                    }
                }
                continue;
            }
            if let Some(target) = name.strip_prefix(".wh.") {
                let victim = if parent.is_empty() {
                    target.to_owned()
                } else {
                    format!("{parent}/{target}")
                };
                self.remove(&victim, &added);
                continue;
            }
            if self.map.len() as u64 >= limits.max_entries {
                return Err(FsError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
            let h = entry.header();
            let meta = EntryMeta {
                path: path.clone(),
                kind: EntryKind::Dir,
                mode: h.mode().unwrap_or(0o644) & 0o7777,
                uid: h.uid().unwrap_or(0) as u32,
                gid: h.gid().unwrap_or(0) as u32,
                mtime_ns: (h.mtime().unwrap_or(0) as i64).saturating_mul(1_000_000_000),
                size: 0,
                xattrs: vec![],
            };
            let mut xattrs: Vec<Xattr> = vec![];
            if let Ok(Some(pax)) = entry.pax_extensions() {
                for ext in pax.flatten() {
                    if let Ok(k) = ext.key() {
                        if let Some(n) = k.strip_prefix("SCHILY.xattr.") {
                            xattrs.push(Xattr {
                                name: n.to_owned(),
                                value: hex::encode(ext.value_bytes()),
                            });
                        }
                    }
                }
            }
            xattrs.sort();
            let link_target = entry
                .link_name_bytes()
                .map(|b| b.into_owned())
                .unwrap_or_default();
            let mut e = TreeEntry {
                meta: EntryMeta { xattrs, ..meta },
                chunks: vec![],
                blake3: None,
            };
            match kind {
                tar::EntryType::Directory => {
                    if let Some(old) = self.map.get(&path) {
                        if old.meta.kind != EntryKind::Dir {
                            self.remove(&path, &HashSet::new());
                        }
                    }
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    // The size the entry's data really has: a PAX `size` record overrides
                    // the header's field.
                    let declared = entry.size();
                    if declared > limits.max_file_size {
                        return Err(FsError::TooLarge {
                            path,
                            size: declared,
                            limit: limits.max_file_size,
                        });
                    }
                    if self.stats.bytes.saturating_add(declared) > limits.max_total_bytes {
                        return Err(FsError::TotalTooLarge {
                            path,
                            total: self.stats.bytes.saturating_add(declared),
                            limit: limits.max_total_bytes,
                        });
                    }
                    self.remove(&path, &HashSet::new());
                    let capped = (&mut entry).take(limits.max_file_size.saturating_add(1));
                    let (chunks, b3, size) = self.batch.put_content(capped, &mut self.stats)?;
                    if size > limits.max_file_size {
                        return Err(FsError::TooLarge {
                            path,
                            size,
                            limit: limits.max_file_size,
                        });
                    }
                    e.meta.kind = EntryKind::File;
                    e.meta.size = size;
                    e.chunks = chunks;
                    e.blake3 = Some(b3);
                }
                tar::EntryType::Symlink => {
                    let target = String::from_utf8(link_target).map_err(|_| {
                        err(layout, format!("symlink {path:?}: target is not UTF-8"))
                    })?;
                    self.remove(&path, &HashSet::new());
                    e.meta.kind = EntryKind::Symlink { target };
                }
                tar::EntryType::Link => {
                    let target = normalize(&link_target)
                        .map_err(|reason| err(layout, format!("hard link {path:?}: {reason}")))?
                        .ok_or_else(|| err(layout, format!("hard link {path:?} to the root")))?;
                    let target = match self.map.get(&target).map(|t| &t.meta.kind) {
                        Some(EntryKind::File) => target,
                        Some(EntryKind::Hardlink { target: t }) => t.clone(),
                        _ => {
                            return Err(err(
                                layout,
                                format!("hard link {path:?} -> {target:?}: no such file before it"),
                            ))
                        }
                    };
                    if target == path {
                        continue;
                    }
                    self.remove(&path, &HashSet::new());
                    e.meta.kind = EntryKind::Hardlink { target };
                    // A hard link shares its file's attributes.
                    e.meta.xattrs.clear();
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    let major =
                        u64::from(entry.header().device_major().ok().flatten().unwrap_or(0));
                    let minor =
                        u64::from(entry.header().device_minor().ok().flatten().unwrap_or(0));
                    // glibc's makedev.
                    let rdev = ((major & 0xffff_f000) << 32)
                        | ((major & 0xfff) << 8)
                        | ((minor & 0xffff_ff00) << 12)
                        | (minor & 0xff);
                    self.remove(&path, &HashSet::new());
                    e.meta.kind = if kind == tar::EntryType::Char {
                        EntryKind::CharDev { rdev }
                    } else {
                        EntryKind::BlockDev { rdev }
                    };
                }
                tar::EntryType::Fifo => {
                    self.remove(&path, &HashSet::new());
                    e.meta.kind = EntryKind::Fifo;
                }
                other => {
                    tracing::warn!(path = %path, kind = ?other, "tar entry of an unsupported type skipped");
                    continue;
                }
            }
            // Parents the layer does not list keep what lower layers said, or get defaults.
            let mut p = parent.clone();
            while !p.is_empty() && !self.map.contains_key(&p) {
                self.map.insert(p.clone(), implicit_dir(&p));
                p = parent_of(&p).to_owned();
            }
            if let Some(EntryKind::Dir) = self.map.get(&parent).map(|x| &x.meta.kind) {
            } else if !parent.is_empty() {
                return Err(err(
                    layout,
                    format!("{path:?}: its parent {parent:?} is not a directory"),
                ));
            }
            added.insert(path.clone());
            self.map.insert(path, e);
        }
        Ok(())
    }
}
