//! Orchestrator hooks: the source agent POSTs a [`HookCall`] (the job's JSON) to each webhook
//! of a migration (its request's `hooks` and the host's) at `pre_migrate`, which may veto it,
//! and at `committed`, `rolled_back` and `finished`. Every call is bounded by its hook's
//! timeout; only `pre_migrate` can change the migration's course.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use ferry_api::{Hook, HookAnswer, HookCall, HookEvent, JobInfo};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

/// The most of a hook's answer that is read.
const MAX_ANSWER: usize = 64 << 10;

/// Calls every hook of `hooks` that wants `event`, one after the other. For `pre_migrate`,
/// the first veto (a refusal, a failure or no answer in time) is returned as an error;
/// other events' failures come back as warnings for the report.
pub(crate) async fn call(
    hooks: &[Hook],
    event: HookEvent,
    host: &str,
    job: &JobInfo,
) -> Result<Vec<String>> {
    let mut warnings = vec![];
    let body = serde_json::to_vec(&HookCall {
        event,
        host: host.to_string(),
        job: job.clone(),
    })?;
    for h in hooks.iter().filter(|h| h.events.contains(&event)) {
        let timeout = Duration::from_millis(h.timeout_ms);
        let answer = tokio::time::timeout(timeout, post(&h.url, body.clone()))
            .await
            .unwrap_or_else(|_| Err(anyhow!("no answer within {} ms", h.timeout_ms)));
        let name = event_name(event);
        match (event, answer) {
            (HookEvent::PreMigrate, Ok((status, text))) if (200..300).contains(&status) => {
                let a: HookAnswer = serde_json::from_slice(&text).unwrap_or(HookAnswer {
                    allow: true,
                    reason: None,
                });
                if !a.allow {
                    bail!(
                        "vetoed by the pre_migrate hook {}: {}",
                        h.url,
                        a.reason.as_deref().unwrap_or("no reason given")
                    );
                }
                info!(job = %job.id, url = %h.url, "pre_migrate hook allowed the migration");
            }
            (HookEvent::PreMigrate, Ok((status, text))) => bail!(
                "vetoed by the pre_migrate hook {}: it answered {status}: {}",
                h.url,
                String::from_utf8_lossy(&text[..text.len().min(300)]).trim()
            ),
            (HookEvent::PreMigrate, Err(e)) => bail!(
                "vetoed by the pre_migrate hook {}: {e:#} (a pre_migrate hook that cannot be asked vetoes)",
                h.url
            ),
            (_, Ok((status, _))) if (200..300).contains(&status) => {}
            (_, Ok((status, _))) => {
                warnings.push(format!("the {name} hook {} answered {status}", h.url))
            }
            (_, Err(e)) => warnings.push(format!("the {name} hook {} failed: {e:#}", h.url)),
        }
    }
    for w in &warnings {
        warn!(job = %job.id, "{w}");
    }
    Ok(warnings)
}

fn event_name(e: HookEvent) -> &'static str {
    match e {
        HookEvent::PreMigrate => "pre_migrate",
        HookEvent::Committed => "committed",
        HookEvent::RolledBack => "rolled_back",
        HookEvent::Finished => "finished",
    }
}

/// POSTs `body` as JSON to the `http://` URL `url`; the status and up to [`MAX_ANSWER`] bytes
/// of the answer.
async fn post(url: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("hook url {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("hook url {url:?}: only http:// URLs are called");
    }
    let host = uri.host().context("hook url names no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .header("user-agent", "ferry-agent")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            text.extend_from_slice(&d[..d.len().min(MAX_ANSWER - text.len())]);
            if text.len() >= MAX_ANSWER {
                break;
            }
        }
    }
    Ok((status, text))
}
