//! Moving a container's base layer: before a migration of a container that runs from an
//! image, the source makes sure the destination holds the image's tree and every chunk it
//! uses, sending only the chunks the destination lacks (`BaseHave`, `BaseTree`, `BaseChunks`).
//! The destination checks the tree (ids, paths, sizes) and every chunk's content before it
//! stores anything.

use crate::proto::{refuse, ErrorCode};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use ferry_api::ImageRef;
use migrate_core::BaseReport;
use shared_fs::store::{Tree, CHUNK_MAX, MAX_TREE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::info;
use transfer::frame::{read_msg, write_msg};
use transfer::lists::Hash;

use super::peer::Incoming;
use super::{lock, Agent};
use crate::proto::{PeerRequest, PeerResponse};

/// A base tree received, waiting for its chunks. Two migrations may bring the same base at
/// once: both may send its chunks, each is checked and stored once.
#[derive(Clone)]
pub(crate) struct PendingBase {
    tree: Tree,
    chunks: HashSet<String>,
    /// When its tree arrived: a base whose chunks never come is forgotten after
    /// [`PENDING_TTL`].
    since: std::time::Instant,
}

/// How long a base tree may wait for its chunks before it is forgotten.
const PENDING_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Most base trees waiting for their chunks at once (a source that stops between the tree and
/// its chunks leaves one behind).
const MAX_PENDING: usize = 64;

/// Most chunks one base tree may name (at 16 KiB each at least, 64 GiB of content).
const MAX_BASE_CHUNKS: usize = 1 << 22;

/// Chunks read ahead of the network by the source's reader thread, and received ahead of the
/// disk by the destination's writer thread.
const CHUNKS_AHEAD: usize = 64;

/// Opens a stream, sends `req` and `body`, returns the answer and the stream it came on
/// (some answers have a tail).
async fn ask(
    conn: &transfer::Connection,
    req: &PeerRequest,
    body: impl AsyncFnOnce(&mut tokio::io::BufWriter<&mut transfer::SendStream>) -> Result<u64>,
) -> Result<(PeerResponse, u64, transfer::RecvStream)> {
    let (mut send, mut recv) = conn.open().await?;
    let bytes;
    {
        let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
        let head = write_msg(&mut w, req).await?;
        bytes = head + body(&mut w).await?;
        w.flush().await?;
    }
    send.finish()
        .map_err(|e| anyhow!("closing a stream to {}: {e}", conn.peer_host))?;
    Ok((read_msg(&mut recv).await?, bytes, recv))
}

/// Chunks the destination lacks: `count` ids read from `recv`, each one the tree uses, none
/// twice.
async fn read_missing(
    recv: &mut (impl tokio::io::AsyncRead + Unpin),
    count: u64,
    uses: &HashMap<Hash, u32>,
) -> Result<Vec<(Hash, u32)>> {
    let ids = transfer::lists::read_hashes(recv, count, uses.len() as u64).await?;
    let mut seen = HashSet::with_capacity(ids.len());
    ids.into_iter()
        .map(|id| {
            let Some(&len) = uses.get(&id) else {
                bail!(
                    "it asked for chunk {}, which the tree does not use",
                    hex::encode(id)
                );
            };
            if !seen.insert(id) {
                bail!("it asked for chunk {} twice", hex::encode(id));
            }
            Ok((id, len))
        })
        .collect()
}

/// Refuses a base layer larger than a migration carries, naming the image and the limit.
fn check_base_limits(image: &ImageRef, tree_bytes: u64, chunks: usize) -> Result<()> {
    let (name, tree) = (&image.name, &image.tree);
    if tree_bytes > MAX_TREE_BYTES {
        bail!(
            "image {name} (tree {tree}): its tree is {} MiB, more than the {} MiB a migration carries: split the image into smaller ones or keep the bulk of its files in a volume",
            tree_bytes >> 20,
            MAX_TREE_BYTES >> 20
        );
    }
    if chunks > MAX_BASE_CHUNKS {
        bail!(
            "image {name} (tree {tree}): its base uses {chunks} chunks, more than the {MAX_BASE_CHUNKS} a migration carries: split the image into smaller ones or keep the bulk of its files in a volume"
        );
    }
    Ok(())
}

impl Agent {
    /// Source: makes sure `conn`'s host holds the base layer of `image`; reports what
    /// crossed. The chunk list and the chunks stream: an image of any size within the
    /// limits ([`MAX_BASE_CHUNKS`], [`MAX_TREE_BYTES`]) moves.
    pub(crate) async fn send_base(
        self: &Arc<Self>,
        conn: &transfer::Connection,
        image: &ImageRef,
    ) -> Result<BaseReport> {
        let t = std::time::Instant::now();
        let to = conn.peer_host.clone();
        let tree = image.tree.as_str();
        let mut report = BaseReport {
            image: image.name.clone(),
            tree: image.tree.clone(),
            held: false,
            chunks: 0,
            chunks_sent: 0,
            chunk_bytes: 0,
            bytes_sent: 0,
            ms: 0.0,
        };
        let (resp, sent, _) = ask(
            conn,
            &PeerRequest::BaseHave { tree: tree.into() },
            async |_| Ok(0),
        )
        .await?;
        report.bytes_sent = sent;
        match resp {
            PeerResponse::BaseHeld { held: true } => {
                info!(%tree, %to, "destination holds the base layer");
                report.held = true;
                report.ms = ferry_runtime::util::ms(t.elapsed());
                return Ok(report);
            }
            PeerResponse::BaseHeld { held: false } => {}
            other => return Err(other.into_error(&to)),
        }
        let store = Arc::clone(&self.store);
        let id = tree.to_string();
        let (bytes, uses) = tokio::task::spawn_blocking(move || -> Result<_> {
            let bytes = store.tree_bytes(&id)?;
            let uses = store
                .tree_from_bytes(&id, &bytes)?
                .chunks()
                .into_iter()
                .map(|(c, len)| Ok((transfer::lists::parse_id(c)?, len)))
                .collect::<Result<HashMap<_, _>>>()?;
            Ok((bytes, uses))
        })
        .await??;
        check_base_limits(image, bytes.len() as u64, uses.len())?;
        report.chunks = uses.len() as u64;
        let req = PeerRequest::BaseTree {
            tree: tree.into(),
            len: bytes.len() as u64,
        };
        let (resp, n, mut recv) = ask(conn, &req, async |w| {
            w.write_all(&bytes).await?;
            Ok(bytes.len() as u64)
        })
        .await?;
        report.bytes_sent += n;
        let count = match resp {
            PeerResponse::BaseMissing { count } => count,
            other => return Err(other.into_error(&to)),
        };
        let missing = read_missing(&mut recv, count, &uses)
            .await
            .with_context(|| format!("{to}'s list of the chunks of base tree {tree} it lacks"))?;
        drop(recv);
        report.chunks_sent = missing.len() as u64;
        report.chunk_bytes = missing.iter().map(|c| u64::from(c.1)).sum();
        info!(%tree, %to, chunks = uses.len(), missing = missing.len(), bytes = report.chunk_bytes, "sending the base layer");
        // A reader thread keeps the next chunks ready while the network takes the last ones.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(Hash, Vec<u8>)>>(CHUNKS_AHEAD);
        let store = Arc::clone(&self.store);
        let ids: Vec<Hash> = missing.iter().map(|c| c.0).collect();
        let reader = tokio::task::spawn_blocking(move || {
            for id in ids {
                let c = hex::encode(id);
                let data = store
                    .read_chunk(&c)
                    .with_context(|| format!("reading chunk {c} of the base layer"));
                let failed = data.is_err();
                if tx.blocking_send(data.map(|d| (id, d))).is_err() || failed {
                    return;
                }
            }
        });
        let req = PeerRequest::BaseChunks {
            tree: tree.into(),
            count: missing.len() as u64,
        };
        let r = ask(conn, &req, async |w| {
            let mut n = 0u64;
            while let Some(chunk) = rx.recv().await {
                let (id, data) = chunk?;
                n += transfer::lists::write_chunk(w, &id, &data).await?;
            }
            Ok(n)
        })
        .await;
        reader.abort();
        let (resp, n, _) = r?;
        report.bytes_sent += n;
        match resp {
            PeerResponse::Ok { .. } => {}
            other => return Err(other.into_error(&to)),
        }
        report.ms = ferry_runtime::util::ms(t.elapsed());
        info!(%tree, %to, chunks = report.chunks_sent, bytes = report.bytes_sent, ms = report.ms, "base layer sent");
        Ok(report)
    }

    /// Chunks of the base trees on their way here (gc keeps them).
    pub(crate) fn pending_base_chunks(&self) -> Vec<String> {
        lock(&self.pending_bases)
            .values()
            .flat_map(|p| p.chunks.iter().cloned())
            .collect()
    }

    /// Destination: `BaseHave`.
    pub(crate) async fn base_have(self: &Arc<Self>, tree: String) -> Result<PeerResponse> {
        let store = Arc::clone(&self.store);
        let held = tokio::task::spawn_blocking(move || match store.get_tree(&tree) {
            Ok(t) => store.missing_chunks(t.chunks().into_keys()).is_empty(),
            Err(_) => false,
        })
        .await?;
        Ok(PeerResponse::BaseHeld { held })
    }

    /// Destination: `BaseTree`: checks the tree, returns the chunks it uses that this host
    /// lacks (their ids follow the answer).
    pub(crate) async fn base_tree(
        self: &Arc<Self>,
        tree: String,
        len: u64,
        recv: &mut Incoming<'_>,
    ) -> Result<Vec<Hash>> {
        if len > MAX_TREE_BYTES {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("base tree {tree} is {len} bytes, more than the {MAX_TREE_BYTES} accepted"),
            ));
        }
        // Memory grows with what arrives, not with what the peer announced.
        let mut bytes = Vec::new();
        (&mut *recv)
            .take(len)
            .read_to_end(&mut bytes)
            .await
            .context("reading the base tree")?;
        if bytes.len() as u64 != len {
            bail!(
                "base tree {tree}: {} of the {len} announced bytes arrived",
                bytes.len()
            );
        }
        let store = Arc::clone(&self.store);
        let id = tree.clone();
        let (t, missing) = tokio::task::spawn_blocking(move || -> Result<_> {
            let t = store.tree_from_bytes(&id, &bytes)?;
            let missing = store
                .missing_chunks(t.chunks().into_keys())
                .iter()
                .map(|c| transfer::lists::parse_id(c))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((t, missing))
        })
        .await??;
        let chunks = t.chunks().into_keys().map(str::to_owned).collect();
        let mut pending = lock(&self.pending_bases);
        pending.retain(|_, p| p.since.elapsed() < PENDING_TTL);
        if pending.len() >= MAX_PENDING && !pending.contains_key(&tree) {
            return Err(refuse(
                ErrorCode::Busy,
                format!("{MAX_PENDING} base layers are already on their way here; retry later"),
            ));
        }
        pending.insert(
            tree,
            PendingBase {
                tree: t,
                chunks,
                since: std::time::Instant::now(),
            },
        );
        Ok(missing)
    }

    /// Destination: `BaseChunks`: stores each chunk after checking its content, then the tree.
    /// A transfer that fails is forgotten: its source starts again with `BaseTree`.
    pub(crate) async fn base_chunks(
        self: &Arc<Self>,
        tree: String,
        count: u64,
        recv: &mut Incoming<'_>,
    ) -> Result<PeerResponse> {
        let r = self.base_chunks_inner(&tree, count, recv).await;
        if r.is_err() {
            lock(&self.pending_bases).remove(&tree);
        }
        r
    }

    async fn base_chunks_inner(
        self: &Arc<Self>,
        tree: &str,
        count: u64,
        recv: &mut Incoming<'_>,
    ) -> Result<PeerResponse> {
        let Some(pending) = lock(&self.pending_bases).get(tree).cloned() else {
            bail!("chunks of base tree {tree} sent before the tree");
        };
        let expected = pending
            .chunks
            .iter()
            .map(|c| transfer::lists::parse_id(c))
            .collect::<Result<_, _>>()?;
        let mut stream = transfer::lists::ChunkStream::new(expected, count, CHUNK_MAX)
            .with_context(|| format!("chunks of base tree {tree}"))?;
        // A writer thread stores the chunks a batch at a time (one sync per batch) while the
        // next ones arrive.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Hash, Vec<u8>)>(CHUNKS_AHEAD);
        let store = Arc::clone(&self.store);
        let writer = tokio::task::spawn_blocking(move || -> Result<()> {
            let _shared = store.import_guard();
            let mut batch = store.chunk_batch();
            while let Some((id, data)) = rx.blocking_recv() {
                batch.put_checked(&hex::encode(id), &data)?;
            }
            batch.finish()?;
            Ok(())
        });
        let mut bytes = 0u64;
        let received = async {
            while let Some((id, data)) = stream
                .next(recv)
                .await
                .with_context(|| format!("chunks of base tree {tree}"))?
            {
                bytes += 36 + data.len() as u64;
                if tx.send((id, data)).await.is_err() {
                    // The writer stopped: its error says why.
                    break;
                }
            }
            anyhow::Ok(())
        }
        .await;
        drop(tx);
        let written = writer.await?;
        received?;
        written.with_context(|| format!("storing the chunks of base tree {tree}"))?;
        // Every chunk must be here now (sent, or already held); put_tree checks it.
        let store = Arc::clone(&self.store);
        let t = pending.tree;
        let id = tokio::task::spawn_blocking(move || {
            let _shared = store.import_guard();
            store.put_tree(&t)
        })
        .await?
        .with_context(|| format!("base tree {tree} is still incomplete"))?;
        if id != tree {
            bail!("base tree stored as {id}, announced as {tree}");
        }
        lock(&self.pending_bases).remove(tree);
        info!(%tree, chunks = count, bytes, "base layer received");
        Ok(PeerResponse::Ok { bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uses(n: u8) -> HashMap<Hash, u32> {
        (0..n).map(|i| ([i; 32], 1000 + u32::from(i))).collect()
    }

    fn ids(list: &[u8]) -> Vec<u8> {
        list.iter().flat_map(|i| [*i; 32]).collect()
    }

    #[tokio::test]
    async fn the_missing_list_streams_and_a_destination_that_lies_is_refused() {
        let got = read_missing(&mut &ids(&[2, 0])[..], 2, &uses(3))
            .await
            .unwrap();
        assert_eq!(got, vec![([2; 32], 1002), ([0; 32], 1000)]);

        let e = read_missing(&mut &ids(&[7])[..], 1, &uses(3))
            .await
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("which the tree does not use"),
            "{e:#}"
        );
        let e = read_missing(&mut &ids(&[1, 1])[..], 2, &uses(3))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("twice"), "{e:#}");
        // More ids announced than the tree has chunks: refused before reading any.
        let e = read_missing(&mut &ids(&[0])[..], 4, &uses(3))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("exceeds the cap"), "{e:#}");
        // Fewer ids than announced: the stream ended early.
        assert!(read_missing(&mut &ids(&[0])[..], 2, &uses(3))
            .await
            .is_err());
    }

    #[test]
    fn a_base_over_the_limits_is_refused_naming_the_image_and_the_limit() {
        let image = ImageRef {
            name: "runtime:3".into(),
            tree: "ab".repeat(32),
            config: None,
        };
        check_base_limits(&image, MAX_TREE_BYTES, MAX_BASE_CHUNKS).unwrap();
        let e = check_base_limits(&image, MAX_TREE_BYTES + 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image runtime:3") && e.contains("256 MiB"),
            "{e}"
        );
        let e = check_base_limits(&image, 1, MAX_BASE_CHUNKS + 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image runtime:3") && e.contains(&MAX_BASE_CHUNKS.to_string()),
            "{e}"
        );
    }
}
