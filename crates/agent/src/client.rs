//! HTTP/JSON client of an agent's API: over its Unix socket on the same host, or over TCP with
//! mutual TLS (`api_listen`) from anywhere holding an operator's certificate.

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
    to: Transport,
}

/// How a [`Client`] reaches its agent.
#[derive(Clone)]
enum Transport {
    Unix(PathBuf),
    Tls {
        addr: std::net::SocketAddr,
        /// The agent's host name, which its certificate must carry.
        host: String,
        config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Unix(p) => write!(f, "unix:{}", p.display()),
            Transport::Tls { addr, host, .. } => write!(f, "https://{addr} ({host})"),
        }
    }
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// How long connecting to an agent over TCP, TLS included, may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Client {
    /// A client of the agent listening on `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Client {
            to: Transport::Unix(socket),
        }
    }

    /// A client of host `host`'s agent at `addr` over TCP with mutual TLS: `tls` is the
    /// operator's certificate, key and the cluster's CA (`ferry pki operator`).
    pub fn tls(addr: std::net::SocketAddr, host: &str, tls: &transfer::TlsFiles) -> Result<Self> {
        let (_, config) = transfer::https_configs(tls)?;
        Ok(Client {
            to: Transport::Tls {
                addr,
                host: host.to_string(),
                config,
            },
        })
    }

    async fn connect(&self) -> Result<Conn> {
        let (sender, conn) = match &self.to {
            Transport::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.with_context(|| {
                    format!(
                        "cannot reach the agent at {}: is it running? (`ferry lab up` starts the lab's agents)",
                        socket.display()
                    )
                })?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                (sender, tokio::spawn(async move { conn.await.map(|_| ()) }))
            }
            Transport::Tls { addr, host, config } => {
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
                    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| {
                        format!("cannot reach {host}'s agent at {addr}: is it running with api_listen set, and is the address right?")
                    })?;
                    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                        .with_context(|| format!("{host:?} is not a host name"))?;
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .with_context(|| format!("TLS with {host}'s agent at {addr} failed: check that its certificate is for {host:?} and of the same CA as yours"))
                })
                .await
                .with_context(|| format!("{host}'s agent at {addr} did not answer within {} s", CONNECT_TIMEOUT.as_secs()))??;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                (sender, tokio::spawn(async move { conn.await.map(|_| ()) }))
            }
        };
        drop(conn);
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
        conn.send_request(req).await.map_err(|e| {
            let e = anyhow::Error::from(e);
            let text = format!("{e:#}");
            match &self.to {
                // With TLS 1.3 the agent judges the client's certificate after the client
                // thinks the handshake is over: its refusal arrives with the first request.
                Transport::Tls { host, addr, .. } if text.contains("fatal alert") => anyhow::anyhow!(
                    "TLS with {host}'s agent at {addr} failed: it refused this certificate ({text}); use an operator certificate of the cluster's CA (`ferry pki operator`)"
                ),
                _ => e.context(format!("request to the agent at {:?}", self.to)),
            }
        })
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
