//! HTTP/JSON client of an agent's API over its Unix socket.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ferry_api::{
    ApiError, ContainerInfo, CreateContainer, HostInfo, JobEvent, JobInfo, MigrateRequest,
    Resolution, ResolveAnswer, ResolveRequest,
};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Client {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Client { socket }
    }

    async fn connect(&self) -> Result<Conn> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach the agent at {}: is it running? (`ferry lab up` starts the lab's agents)",
                self.socket.display()
            )
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut conn = self.connect().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "ferry-agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        Ok(conn.send_request(req).await?)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            if let Ok(e) = serde_json::from_slice::<ApiError>(&bytes) {
                bail!("{}", e.message);
            }
            bail!(
                "agent answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("agent sent an unexpected answer to {path}"))
    }

    /// `GET /v1/host`.
    pub async fn host_info(&self) -> Result<HostInfo> {
        self.call(Method::GET, "/v1/host", None::<&()>).await
    }

    /// `GET /v1/containers`.
    pub async fn containers(&self) -> Result<Vec<ContainerInfo>> {
        self.call(Method::GET, "/v1/containers", None::<&()>).await
    }

    /// `POST /v1/containers`.
    pub async fn create(&self, req: &CreateContainer) -> Result<ContainerInfo> {
        self.call(Method::POST, "/v1/containers", Some(req)).await
    }

    /// `DELETE /v1/containers/{name}`.
    pub async fn delete(&self, name: &str) -> Result<ferry_api::ContainerDeleted> {
        self.call(
            Method::DELETE,
            &format!("/v1/containers/{name}"),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/images`.
    pub async fn import_image(
        &self,
        req: &crate::images::ImportImage,
    ) -> Result<crate::images::Imported> {
        self.call(Method::POST, "/v1/images", Some(req)).await
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<crate::images::ImageList> {
        self.call(Method::GET, "/v1/images", None::<&()>).await
    }

    /// `DELETE /v1/images/{name}`.
    pub async fn remove_image(&self, name: &str) -> Result<shared_fs::ImageRecord> {
        self.call(
            Method::DELETE,
            &format!("/v1/images/{}", percent_encode(name)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/images/gc`.
    pub async fn gc_images(&self) -> Result<shared_fs::store::GcStats> {
        self.call(Method::POST, "/v1/images/gc", None::<&()>).await
    }

    /// `DELETE /v1/pages`: the agent forgets the pages no running migration needs.
    pub async fn forget_pages(&self) -> Result<ferry_api::PagesForgotten> {
        self.call(Method::DELETE, "/v1/pages", None::<&()>).await
    }

    /// `GET /v1/containers/{name}/dirty-rate?ms=N&throttle=P`.
    pub async fn dirty_rate(
        &self,
        name: &str,
        ms: u64,
        throttle_pct: u32,
    ) -> Result<ferry_api::DirtyRate> {
        self.call(
            Method::GET,
            &format!("/v1/containers/{name}/dirty-rate?ms={ms}&throttle={throttle_pct}"),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/containers/{name}/migrate`.
    pub async fn migrate(&self, name: &str, req: &MigrateRequest) -> Result<JobInfo> {
        self.call(
            Method::POST,
            &format!("/v1/containers/{name}/migrate"),
            Some(req),
        )
        .await
    }

    /// `POST /v1/containers/{name}/stop?timeout_s=N`.
    pub async fn stop(&self, name: &str, timeout_s: u64) -> Result<ContainerInfo> {
        let path = format!(
            "/v1/containers/{}/stop?timeout_s={timeout_s}",
            percent_encode(name)
        );
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// `POST /v1/containers/{name}/start`.
    pub async fn start(&self, name: &str) -> Result<ContainerInfo> {
        let path = format!("/v1/containers/{}/start", percent_encode(name));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// `POST /v1/containers/{name}/exec`.
    pub async fn exec(
        &self,
        name: &str,
        req: &ferry_api::ExecRequest,
    ) -> Result<ferry_api::ExecResult> {
        let path = format!("/v1/containers/{}/exec", percent_encode(name));
        self.call(Method::POST, &path, Some(req)).await
    }

    /// `GET /v1/jobs`: this host's jobs, newest first.
    pub async fn jobs(&self) -> Result<Vec<JobInfo>> {
        self.call(Method::GET, "/v1/jobs", None::<&()>).await
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<JobInfo> {
        self.call(Method::GET, &format!("/v1/jobs/{id}"), None::<&()>)
            .await
    }

    /// `POST /v1/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<JobInfo> {
        self.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None::<&()>)
            .await
    }

    /// `POST /v1/jobs/{id}/resolve`.
    pub async fn resolve(&self, id: &str, outcome: Resolution) -> Result<ResolveAnswer> {
        self.call(
            Method::POST,
            &format!("/v1/jobs/{id}/resolve"),
            Some(&ResolveRequest { outcome }),
        )
        .await
    }

    /// Follows `GET /v1/jobs/{id}/events`, calling `f` for each event until the stream ends.
    pub async fn follow(&self, id: &str, f: impl FnMut(&JobEvent)) -> Result<()> {
        let path = format!("/v1/jobs/{id}/events");
        self.ndjson(&path, &format!("events of job {id}"), f).await
    }

    /// `GET /v1/containers/{name}/logs`, calling `f` for each record until the answer ends
    /// (with `follow`, when the container stops or leaves its host).
    pub async fn logs(
        &self,
        name: &str,
        tail: Option<usize>,
        follow: bool,
        f: impl FnMut(&ferry_api::LogRecord),
    ) -> Result<()> {
        let mut path = format!(
            "/v1/containers/{}/logs?follow={follow}",
            percent_encode(name)
        );
        if let Some(t) = tail {
            path.push_str(&format!("&tail={t}"));
        }
        self.ndjson(&path, &format!("logs of {name:?}"), f).await
    }

    /// A newline-delimited JSON answer to `GET path`, a value at a time.
    async fn ndjson<T: DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
        mut f: impl FnMut(&T),
    ) -> Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            if let Ok(e) = serde_json::from_slice::<ApiError>(&bytes) {
                bail!("{}", e.message);
            }
            bail!("{what}: {status} {}", String::from_utf8_lossy(&bytes));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = vec![];
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if line.len() > 1 {
                        let v: T = serde_json::from_slice(&line)
                            .with_context(|| format!("agent sent an invalid line in the {what}"))?;
                        f(&v);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Percent-encodes everything but unreserved characters (for names in URL paths).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
