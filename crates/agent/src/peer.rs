//! Serving and sending agent-to-agent requests over QUIC.

use crate::pages::PeerJob;
use crate::proto::{refuse, ErrorCode};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use shared_fs::Diff;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};
use transfer::frame::{read_msg, write_msg};
use transfer::tree::Reads;

use super::Agent;
use crate::proto::{PeerRequest, PeerResponse, MIN_PROTO_VERSION, PROTO_VERSION};

/// The buffered receiving side of a request stream.
pub(crate) type Incoming<'a> = tokio::io::BufReader<&'a mut transfer::RecvStream>;

/// A file tree to send after a request.
pub(crate) struct Tree<'a> {
    pub(crate) root: &'a Path,
    pub(crate) diff: &'a Diff,
    /// Whether the tree may change while it is sent (its container runs).
    pub(crate) reads: Reads,
}

/// What a request with trees sent.
pub(crate) struct Sent {
    pub(crate) resp: PeerResponse,
    /// Bytes written to the stream.
    pub(crate) bytes: u64,
    /// Paths of all trees that the next diff must send again ([`TreeStats::unsettled`]).
    ///
    /// [`TreeStats::unsettled`]: transfer::tree::TreeStats::unsettled
    pub(crate) unsettled: Vec<String>,
}

/// How many times a request refused as retryable ([`crate::proto::ErrorCode::retryable`]) is
/// sent again, and the pause before the first retry (doubling after each).
const RETRIES: u32 = 4;
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The pause before sending again a request that failed `attempt` times (from 1) with an answer
/// that says a retry can help; `None` once [`RETRIES`] retries are spent. Only for requests
/// that may be sent twice (asked before the freeze, their effect idempotent).
pub(crate) fn retry_pause(attempt: u32) -> Option<Duration> {
    (attempt <= RETRIES).then(|| RETRY_PAUSE * (1 << (attempt - 1).min(RETRIES)))
}

/// Sends `req` and `trees` on a new stream, returns the answer and the bytes sent.
pub(crate) async fn request(
    conn: &transfer::Connection,
    req: &PeerRequest,
    trees: &[Tree<'_>],
) -> Result<(PeerResponse, u64)> {
    let sent = request_trees(conn, req, trees).await?;
    Ok((sent.resp, sent.bytes))
}

/// [`request`], also telling which paths of the trees are unsettled.
pub(crate) async fn request_trees(
    conn: &transfer::Connection,
    req: &PeerRequest,
    trees: &[Tree<'_>],
) -> Result<Sent> {
    request_trees_notify(conn, req, trees, None).await
}

/// [`request_trees`], telling `on_sent` how many bytes went as soon as the request is
/// written, before its answer.
pub(crate) async fn request_trees_notify(
    conn: &transfer::Connection,
    req: &PeerRequest,
    trees: &[Tree<'_>],
    on_sent: Option<tokio::sync::oneshot::Sender<u64>>,
) -> Result<Sent> {
    let t = std::time::Instant::now();
    let (mut send, mut recv) = conn.open().await?;
    let opened_ms = ferry_runtime::util::ms(t.elapsed());
    let mut bytes;
    let mut unsettled = Vec::new();
    {
        // Buffered: a tree is many small frames; send_tree flushes at its end.
        let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
        bytes = write_msg(&mut w, req).await?;
        for t in trees {
            let stats = transfer::tree::send_tree(&mut w, t.root, t.diff, t.reads).await?;
            bytes += stats.wire_bytes;
            unsettled.extend(stats.unsettled);
        }
        tokio::io::AsyncWriteExt::flush(&mut w).await?;
    }
    send.finish()
        .map_err(|e| anyhow!("closing the request stream to {}: {e}", conn.peer_host))?;
    let sent_ms = ferry_runtime::util::ms(t.elapsed());
    if let Some(tx) = on_sent {
        let _ = tx.send(bytes);
    }
    let resp: PeerResponse = read_msg(&mut recv).await?;
    debug!(
        op = op_name(req),
        opened_ms,
        sent_ms,
        answered_ms = ferry_runtime::util::ms(t.elapsed()),
        bytes,
        "peer request answered"
    );
    Ok(Sent {
        resp,
        bytes,
        unsettled,
    })
}

/// The request's kind, for logs.
fn op_name(req: &PeerRequest) -> String {
    let s = format!("{req:?}");
    s.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Turns an answer into `Ok(())` or an error carrying the peer's message.
pub(crate) fn expect_ok(host: &str, resp: PeerResponse) -> Result<()> {
    match resp {
        PeerResponse::Ok { .. } => Ok(()),
        other => Err(other.into_error(host)),
    }
}

/// Accepts peers until the endpoint closes.
pub(crate) async fn serve(agent: Arc<Agent>) -> Result<()> {
    while let Some(conn) = agent.endpoint.accept().await {
        match conn {
            Ok(conn) => {
                tokio::spawn(handle_conn(Arc::clone(&agent), conn));
            }
            Err(e) => warn!(error = %e, "refused a peer"),
        }
    }
    Ok(())
}

async fn handle_conn(agent: Arc<Agent>, conn: transfer::Connection) {
    let peer = conn.peer_host.clone();
    let Some(configured) = agent.cfg.peer(&peer) else {
        warn!(%peer, "certificate is valid but the host is not a configured peer: closing");
        conn.conn.close(1u32.into(), b"unknown peer");
        return;
    };
    // A certificate speaks for one host, from that host's configured address only: a stolen
    // or misissued certificate used from elsewhere is refused.
    let from = conn.remote_addr().ip();
    if from != std::net::IpAddr::V4(configured.underlay_ip) {
        warn!(%peer, %from, configured = %configured.underlay_ip,
            "certificate names a configured peer but the connection comes from another address: closing");
        conn.conn
            .close(1u32.into(), b"certificate does not match the address");
        return;
    }
    let conn_id = conn.conn.stable_id();
    debug!(%peer, "peer connected");
    loop {
        match conn.accept_stream().await {
            Ok((send, recv)) => {
                tokio::spawn(handle_stream(
                    Arc::clone(&agent),
                    peer.clone(),
                    conn_id,
                    send,
                    recv,
                ));
            }
            Err(e) => {
                debug!(%peer, error = %e, "peer connection ended");
                break;
            }
        }
    }
    // Jobs whose source is gone can never commit: remove what they prepared here.
    agent.abort_incoming_of_conn(conn_id).await;
}

async fn handle_stream(
    agent: Arc<Agent>,
    peer: String,
    conn_id: usize,
    mut send: transfer::SendStream,
    mut recv: transfer::RecvStream,
) {
    // Buffered: trees arrive as many small frames (the reader owns the buffer for all of them).
    let mut recv = tokio::io::BufReader::with_capacity(256 << 10, &mut recv);
    let t = std::time::Instant::now();
    let resp = match read_msg::<_, PeerRequest>(&mut recv).await {
        Ok(PeerRequest::DumpPages { job }) => {
            // The relay owns the stream from here on: it answers with its own frames.
            if let Err(e) = agent
                .dump_pages(
                    PeerJob {
                        peer: &peer,
                        job: &job,
                    },
                    &mut recv,
                    &mut send,
                )
                .await
            {
                warn!(%peer, %job, error = %format!("{e:#}"), "final dump's pages not received");
            }
            let _ = send.finish();
            let _ = send.stopped().await;
            return;
        }
        Ok(PeerRequest::FetchPages {
            job,
            pid,
            vaddr,
            nr_pages,
        }) => {
            // Raw pages follow the answer.
            if let Err(e) = agent
                .serve_fetch(&peer, &job, pid, vaddr, nr_pages, &mut send)
                .await
            {
                warn!(%peer, %job, error = %format!("{e:#}"), "pages not served to the destination");
            }
            let _ = send.finish();
            let _ = send.stopped().await;
            return;
        }
        Ok(PeerRequest::BaseTree { tree, len }) => {
            // The ids of the chunks this host lacks follow the answer.
            let missing = agent.base_tree(tree, len, &mut recv).await;
            let (resp, ids) = match missing {
                Ok(ids) => (
                    PeerResponse::BaseMissing {
                        count: ids.len() as u64,
                    },
                    ids,
                ),
                Err(e) => (PeerResponse::error(&e), vec![]),
            };
            let mut w = tokio::io::BufWriter::with_capacity(256 << 10, &mut send);
            let sent = async {
                write_msg(&mut w, &resp).await?;
                transfer::lists::write_hashes(&mut w, &ids).await?;
                w.flush()
                    .await
                    .map_err(|e| transfer::TransferError::Stream {
                        op: "answering",
                        source: e,
                    })
            };
            if let Err(e) = sent.await {
                warn!(%peer, error = %e, "could not answer peer");
            }
            let _ = send.finish();
            let _ = send.stopped().await;
            return;
        }
        Ok(req) => {
            debug!(%peer, op = op_name(&req), read_ms = ferry_runtime::util::ms(t.elapsed()), "peer request read");
            match dispatch(&agent, &peer, conn_id, req, &mut recv).await {
                Ok(r) => r,
                Err(e) => PeerResponse::error(&e),
            }
        }
        Err(e) => PeerResponse::error(&refuse(ErrorCode::BadRequest, format!("bad request: {e}"))),
    };
    if let Err(e) = write_msg(&mut send, &resp).await {
        warn!(%peer, error = %e, "could not answer peer");
    }
    debug!(%peer, handled_ms = ferry_runtime::util::ms(t.elapsed()), "peer request handled");
    let _ = send.finish();
    // Give the answer a chance to leave before the stream is dropped.
    let _ = send.stopped().await;
}

async fn dispatch(
    agent: &Arc<Agent>,
    peer: &str,
    conn_id: usize,
    req: PeerRequest,
    recv: &mut Incoming<'_>,
) -> Result<PeerResponse> {
    match req {
        PeerRequest::Preflight {
            version,
            name,
            memory_bytes,
            pre_copy,
        } => {
            if !(MIN_PROTO_VERSION..=PROTO_VERSION).contains(&version) {
                return Err(refuse(ErrorCode::BadRequest, format!("protocol version {version} not supported here (this agent speaks {MIN_PROTO_VERSION} to {PROTO_VERSION}): run the same Ferry release on both hosts")));
            }
            let answer = agent.preflight_incoming(&name).await?;
            agent.check_memory(memory_bytes, pre_copy).await?;
            Ok(answer)
        }
        PeerRequest::List => {
            let a = Arc::clone(agent);
            let containers = tokio::task::spawn_blocking(move || a.list()).await?;
            Ok(PeerResponse::List { containers })
        }
        PeerRequest::Route { mac, host } => {
            agent.route_from_peer(peer, &mac, host.as_deref())?;
            Ok(PeerResponse::Ok { bytes: 0 })
        }
        PeerRequest::Prepare {
            job,
            spec,
            memory_bytes,
            restore_lazily,
            descriptors,
            fence,
        } => {
            // The page store grows only by what this host can hold (a peer may say anything).
            agent.check_memory(memory_bytes, true).await?;
            let r = agent
                .prepare(
                    peer,
                    super::incoming::Prepare {
                        conn_id,
                        job: job.clone(),
                        spec: *spec,
                        restore_lazily,
                        descriptors,
                        fence,
                    },
                    recv,
                )
                .await;
            if r.is_ok() && memory_bytes > 0 {
                agent.grant_store(&job, memory_bytes).await;
            }
            r
        }
        PeerRequest::BaseHave { tree } => agent.base_have(tree).await,
        // Answered in `handle_stream`: chunk ids follow its frame.
        PeerRequest::BaseTree { .. } => bail!("BaseTree is answered by handle_stream"),
        PeerRequest::BaseChunks { tree, count } => agent.base_chunks(tree, count, recv).await,
        PeerRequest::Images {
            job,
            corrupt,
            corrupt_page,
            corrupt_rootfs,
            rootfs_digest,
        } => {
            let hooks = super::incoming::ImageHooks {
                corrupt,
                corrupt_page,
                corrupt_rootfs,
            };
            let r = agent
                .receive_images(peer, &job, hooks, rootfs_digest, recv)
                .await;
            // A restore sent right behind this request waits for this outcome.
            agent
                .arrived(
                    peer,
                    &job,
                    super::incoming::Arrival::Images,
                    r.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
                )
                .await;
            r
        }
        PeerRequest::HeldPages { job, count } => {
            agent
                .held_pages(PeerJob { peer, job: &job }, count, recv)
                .await
        }
        PeerRequest::Pages { job } => {
            // A pre-copy round's page stream, into the page store.
            let _stream = agent.with_incoming(peer, &job, |i| i.stream()).await?;
            let bytes = agent
                .absorb_page_stream(PeerJob { peer, job: &job }, recv)
                .await?;
            Ok(PeerResponse::Ok { bytes })
        }
        PeerRequest::RootfsRound { job } => {
            agent.rootfs_round(PeerJob { peer, job: &job }, recv).await
        }
        PeerRequest::DumpPages { .. } => bail!("DumpPages is served by the stream handler"),
        PeerRequest::FetchPages { .. } => bail!("FetchPages is served by the stream handler"),
        PeerRequest::PageMap {
            job,
            count,
            with_pages,
        } => {
            agent
                .receive_locations(peer, &job, count, with_pages, recv)
                .await
        }
        PeerRequest::FillWait { job } => agent.fill_wait(peer, &job).await,
        PeerRequest::VerifyPages { job, count, done } => {
            agent.verify_pages(peer, &job, count, done, recv).await
        }
        PeerRequest::CorrectPages { job, count } => {
            agent.correct_pages(peer, &job, count, recv).await
        }
        PeerRequest::Restore {
            job,
            pause_ms,
            deadline_ms,
            lazy,
            after_images,
            after_pages,
        } => {
            let limits = super::incoming::RestoreLimits {
                pause_ms,
                deadline: Duration::from_millis(deadline_ms.clamp(1_000, 86_400_000)),
                lazy,
                after_images,
                after_pages,
            };
            agent.restore_incoming(peer, &job, limits).await
        }
        PeerRequest::Logs { job, name, bytes } => {
            agent.receive_history(peer, &job, &name, bytes, recv).await
        }
        PeerRequest::Commit { job, recovered } => {
            agent.commit_incoming(peer, &job, recovered).await
        }
        PeerRequest::Abort { job } => {
            if let Some(owner) = agent.incoming_owner(&job).await {
                if owner != peer {
                    return Err(refuse(
                        ErrorCode::Forbidden,
                        format!("job {job} belongs to {owner}, not {peer}"),
                    ));
                }
            }
            agent.abort_incoming(&job, "aborted by the source").await;
            Ok(PeerResponse::Ok { bytes: 0 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_and_back_off() {
        let pauses: Vec<_> = (1..=10).map_while(retry_pause).collect();
        assert_eq!(
            pauses,
            [250, 500, 1000, 2000].map(Duration::from_millis).to_vec()
        );
    }
}
