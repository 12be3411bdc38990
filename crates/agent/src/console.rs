//! Containers' output on this host ([`ferry_runtime::console`]): the console shims the agent
//! starts, `GET /v1/containers/{name}/logs`, and the history that follows a container to the
//! host it moved to once the move is committed (never in the frozen window).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Body;
use ferry_runtime::console::{self, Console};
use tracing::{info, warn};

use crate::http::ApiFailure;
use crate::proto::{ErrorCode, PeerRequest, PeerResponse};
use crate::{lock, Agent};

/// The most of a container's history that follows it to another host, and the most a peer
/// may send: the newest records are kept.
pub(crate) const HISTORY_CAP: u64 = 32 << 20;
/// How long the host a container left waits for its shim to read the last of its output.
const SHIM_DRAIN: Duration = Duration::from_secs(3);
/// How often a follower looks for new lines, and how often whether the container still runs.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
const FOLLOW_CHECK_EVERY: u32 = 5;

impl Agent {
    /// Where container `name`'s output is kept here.
    pub(crate) fn log_dir(&self, name: &str) -> PathBuf {
        console::log_dir(&self.cfg.state_dir, name)
    }

    /// The program that runs console shims.
    pub(crate) fn console_shim(&self) -> Result<PathBuf> {
        match &self.cfg.console_shim {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe().context("finding the agent's own binary"),
        }
    }

    /// Starts a console shim for `name`, appending to what its log holds (blocking: call off
    /// the async workers).
    pub(crate) fn spawn_console(&self, name: &str) -> Result<Console> {
        Console::spawn(
            &self.console_shim()?,
            &self.log_dir(name),
            self.cfg.log_max_bytes,
        )
        .with_context(|| format!("starting the console shim of {name:?}"))
    }

    /// A shim for a container arriving here: anything left under its name goes first.
    pub(crate) async fn start_console_fresh(&self, name: &str) -> Result<Console> {
        let (dir, shim, max) = (
            self.log_dir(name),
            self.console_shim()?,
            self.cfg.log_max_bytes,
        );
        let n = name.to_string();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&dir);
            Console::spawn(&shim, &dir, max)
                .with_context(|| format!("starting the console shim of {n:?}"))
        })
        .await?
    }

    /// `GET /v1/containers/{name}/logs`: the records kept here, then, with `follow`, new ones
    /// until the container stops running here or the client goes.
    pub(crate) async fn logs(
        self: &Arc<Self>,
        name: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> Result<Body, ApiFailure> {
        if !lock(&self.containers).contains_key(name) {
            return Err(ApiFailure::unknown_container(name, &self.cfg.host));
        }
        let dir = self.log_dir(name);
        let d = dir.clone();
        let (past, offset) = tokio::task::spawn_blocking(move || {
            // The current log's length first: a follower goes on from there, and what the
            // shim appends meanwhile is read once, by the follower.
            let offset = console::current_len(&d);
            console::read(&d, tail, Some(offset)).map(|r| (r, offset))
        })
        .await
        .map_err(|e| ApiFailure::internal(e.to_string()))?
        .map_err(|e| ApiFailure::internal(format!("reading the logs of {name:?}: {e:#}")))?;
        let head = futures_util::stream::iter(past.into_iter().map(record_line));
        if !follow {
            return Ok(Body::from_stream(head));
        }
        let (agent, name) = (Arc::clone(self), name.to_string());
        let tail = futures_util::stream::unfold(
            (agent, name, dir, offset, 0u32, false),
            |(agent, name, dir, mut offset, mut polls, mut last)| async move {
                loop {
                    if polls > 0 && !last {
                        tokio::time::sleep(FOLLOW_POLL).await;
                    }
                    polls += 1;
                    // Once the container has stopped or left, one last read, then the end.
                    let ended = last;
                    if !last && polls % FOLLOW_CHECK_EVERY == 0 {
                        let (a, n) = (Arc::clone(&agent), name.clone());
                        let here = lock(&agent.containers).contains_key(&name);
                        let runs = here
                            && tokio::task::spawn_blocking(move || a.is_running(&n))
                                .await
                                .unwrap_or(false);
                        last = !runs;
                    }
                    let d = dir.clone();
                    let read =
                        tokio::task::spawn_blocking(move || console::read_since(&d, offset)).await;
                    let recs = match read {
                        Ok(Ok((recs, next))) => {
                            offset = next;
                            recs
                        }
                        _ => return None,
                    };
                    if !recs.is_empty() {
                        let chunk: String = recs
                            .into_iter()
                            .filter_map(|r| record_line(r).ok())
                            .collect();
                        return Some((Ok(chunk), (agent, name, dir, offset, polls, last)));
                    }
                    if ended {
                        return None;
                    }
                }
            },
        );
        use futures_util::StreamExt;
        Ok(Body::from_stream(head.chain(tail)))
    }

    /// After a committed move: waits for the shim of `name` here to read the last of its
    /// output, sends what this host kept to `to` and removes it here. Best effort: a failure is
    /// logged and the logs stay here, in `console-departed/`.
    pub(crate) async fn send_history(&self, job: &str, name: &str, to: &str) {
        let dir = self.log_dir(name);
        let d = dir.clone();
        let payload = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>> {
            if !d.is_dir() {
                return Ok(None);
            }
            if !console::wait_shim_exit(&d, SHIM_DRAIN) {
                warn!(dir = %d.display(), "the console shim still runs after the container left: sending what it wrote so far");
            }
            console::history_payload(&d, HISTORY_CAP as usize).map(Some)
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        let sent = async {
            let Some(payload) = payload? else {
                return Ok(0);
            };
            let conn = self.peer_conn(to).await?;
            let req = PeerRequest::Logs {
                job: job.to_string(),
                name: name.to_string(),
                bytes: payload.len() as u64,
            };
            let (resp, _) = crate::lazy::request_with_locations(
                &conn,
                &req,
                &[],
                crate::lazy::Tail::Raw(&payload),
            )
            .await?;
            crate::peer::expect_ok(to, resp)?;
            Ok::<_, anyhow::Error>(payload.len())
        }
        .await;
        let departed = self
            .cfg
            .state_dir
            .join("console-departed")
            .join(format!("{name}.{job}"));
        let ok = sent.is_ok();
        let _ = tokio::task::spawn_blocking(move || match ok {
            true => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            false if dir.is_dir() => {
                let _ = std::fs::create_dir_all(departed.parent().unwrap_or(&departed));
                let _ = std::fs::rename(&dir, &departed);
            }
            false => {}
        })
        .await;
        match sent {
            Ok(0) => {}
            Ok(bytes) => {
                info!(%job, container = name, %to, bytes, "container logs sent to its new host")
            }
            Err(e) => warn!(%job, container = name, %to, error = %format!("{e:#}"),
                "container logs not sent to its new host: kept here under console-departed"),
        }
    }

    /// [`PeerRequest::Logs`]: the history of a container that moved here from `peer` in
    /// committed job `job`.
    pub(crate) async fn receive_history(
        &self,
        peer: &str,
        job: &str,
        name: &str,
        bytes: u64,
        recv: &mut crate::peer::Incoming<'_>,
    ) -> Result<PeerResponse> {
        if bytes > HISTORY_CAP {
            return Err(crate::proto::refuse(
                ErrorCode::BadRequest,
                format!("logs of {bytes} bytes: at most {HISTORY_CAP} are taken"),
            ));
        }
        match self.committed_move(job) {
            Some((from, n)) if from == peer && n == name => {}
            _ => {
                return Err(crate::proto::refuse(
                    ErrorCode::Forbidden,
                    format!("job {job} did not move container {name:?} here from {peer}"),
                ))
            }
        }
        if !lock(&self.containers).contains_key(name) {
            return Err(crate::proto::refuse(
                ErrorCode::NotFound,
                format!("container {name:?} is not here any more"),
            ));
        }
        let mut payload = vec![0u8; bytes as usize];
        tokio::io::AsyncReadExt::read_exact(recv, &mut payload)
            .await
            .context("reading a container's logs")?;
        let dir = self.log_dir(name);
        let kept =
            tokio::task::spawn_blocking(move || console::write_history(&dir, &payload)).await??;
        info!(%job, container = name, from = peer, records = kept, "container logs received");
        Ok(PeerResponse::Ok { bytes })
    }
}

fn record_line(r: ferry_api::LogRecord) -> Result<String, std::convert::Infallible> {
    let mut s = serde_json::to_string(&r).unwrap_or_default();
    s.push('\n');
    Ok(s)
}
