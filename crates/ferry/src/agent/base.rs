//! Moving a container's base layer: before a migration of a container that runs from an
//! image, the source makes sure the destination holds the image's tree and every chunk it
//! uses, sending only the chunks the destination lacks (`BaseHave`, `BaseTree`, `BaseChunks`).
//! The destination checks the tree (ids, paths, sizes) and every chunk's content before it
//! stores anything.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use shared_fs::store::{Tree, CHUNK_MAX, MAX_TREE_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::info;
use transfer::frame::{read_msg, write_msg};

use super::pages::to_hex;
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

/// Opens a stream, sends `req` and `body`, returns the answer.
async fn ask(
    conn: &transfer::Connection,
    req: &PeerRequest,
    body: impl AsyncFnOnce(&mut tokio::io::BufWriter<&mut transfer::SendStream>) -> Result<u64>,
) -> Result<(PeerResponse, u64)> {
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
    Ok((read_msg(&mut recv).await?, bytes))
}

impl Agent {
    /// Source: makes sure `conn`'s host holds base tree `tree`; returns the bytes sent.
    pub(crate) async fn send_base(
        self: &Arc<Self>,
        conn: &transfer::Connection,
        tree: &str,
    ) -> Result<u64> {
        let t = std::time::Instant::now();
        let to = conn.peer_host.clone();
        let (resp, mut sent) = ask(
            conn,
            &PeerRequest::BaseHave { tree: tree.into() },
            async |_| Ok(0),
        )
        .await?;
        match resp {
            PeerResponse::BaseHeld { held: true } => {
                info!(%tree, %to, "destination holds the base layer");
                return Ok(sent);
            }
            PeerResponse::BaseHeld { held: false } => {}
            PeerResponse::Error { message } => bail!("{to}: {message}"),
            other => bail!("{to} answered unexpectedly: {other:?}"),
        }
        let store = Arc::clone(&self.store);
        let id = tree.to_string();
        let bytes = tokio::task::spawn_blocking(move || store.tree_bytes(&id)).await??;
        let req = PeerRequest::BaseTree {
            tree: tree.into(),
            len: bytes.len() as u64,
        };
        let (resp, n) = ask(conn, &req, async |w| {
            w.write_all(&bytes).await?;
            Ok(bytes.len() as u64)
        })
        .await?;
        sent += n;
        let chunks = match resp {
            PeerResponse::BaseMissing { chunks } => chunks,
            PeerResponse::Error { message } => bail!("{to}: {message}"),
            other => bail!("{to} answered unexpectedly: {other:?}"),
        };
        let ids = transfer::lists::parse_chunk_ids(&chunks, MAX_BASE_CHUNKS)
            .with_context(|| format!("{to}'s list of the chunks of base tree {tree} it lacks"))?;
        let store = Arc::clone(&self.store);
        let req = PeerRequest::BaseChunks {
            tree: tree.into(),
            count: chunks.len() as u64,
        };
        let count = chunks.len();
        let (resp, n) = ask(conn, &req, async |w| {
            let mut n = 0u64;
            for (c, raw) in chunks.into_iter().zip(ids) {
                let s = Arc::clone(&store);
                let id = c.clone();
                let data = tokio::task::spawn_blocking(move || s.read_chunk(&id))
                    .await?
                    .with_context(|| format!("reading chunk {c} of the base layer"))?;
                n += transfer::lists::write_chunk(w, &raw, &data).await?;
            }
            Ok(n)
        })
        .await?;
        sent += n;
        match resp {
            PeerResponse::Ok { .. } => {}
            PeerResponse::Error { message } => bail!("{to}: {message}"),
            other => bail!("{to} answered unexpectedly: {other:?}"),
        }
        info!(%tree, %to, chunks = count, bytes = sent, ms = crate::util::ms(t.elapsed()), "base layer sent");
        Ok(sent)
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

    /// Destination: `BaseTree`: checks the tree, answers what it lacks.
    pub(crate) async fn base_tree(
        self: &Arc<Self>,
        tree: String,
        len: u64,
        recv: &mut Incoming<'_>,
    ) -> Result<PeerResponse> {
        if len > MAX_TREE_BYTES {
            bail!("base tree {tree} is {len} bytes, more than the {MAX_TREE_BYTES} accepted");
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
            let missing = store.missing_chunks(t.chunks().into_keys());
            Ok((t, missing))
        })
        .await??;
        let chunks = t.chunks().into_keys().map(str::to_owned).collect();
        let mut pending = lock(&self.pending_bases);
        pending.retain(|_, p| p.since.elapsed() < PENDING_TTL);
        if pending.len() >= MAX_PENDING && !pending.contains_key(&tree) {
            bail!("{MAX_PENDING} base layers are already on their way here; retry later");
        }
        pending.insert(
            tree,
            PendingBase {
                tree: t,
                chunks,
                since: std::time::Instant::now(),
            },
        );
        Ok(PeerResponse::BaseMissing { chunks: missing })
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
        let mut bytes = 0u64;
        while let Some((id, data)) = stream
            .next(recv)
            .await
            .with_context(|| format!("chunks of base tree {tree}"))?
        {
            bytes += 36 + data.len() as u64;
            let store = Arc::clone(&self.store);
            tokio::task::spawn_blocking(move || {
                let _shared = store.import_guard();
                store.put_chunk_checked(&to_hex(&id), &data)
            })
            .await??;
        }
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
