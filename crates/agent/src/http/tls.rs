//! The API over TCP (`api_listen` in the agent's config): HTTP/1.1 over TLS 1.3 with mutual
//! authentication. Every client presents a certificate of the cluster's CA; the holders of an
//! operator's certificate (`transfer::pki::OPERATOR_ORG`, `ferry pki operator`) are served,
//! any other (another host's) is answered 403 `forbidden`. The Unix socket stays for local use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::ApiFailure;

/// Handshakes under way at once at most; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an API connection over TCP.
#[derive(Debug, Clone)]
pub(crate) struct ApiPeer {
    pub addr: SocketAddr,
    /// The operator its certificate names, if it is an operator's.
    pub operator: Option<String>,
}

/// TLS connections whose handshake is done, accepted on their own tasks (a slow client does
/// not hold up the others).
pub(crate) struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, ApiPeer)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = ApiPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor ended (its socket failed for good): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ApiPeer {
            addr: self.local,
            operator: None,
        })
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for ApiPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Listens on `addr` with the host's certificate `tls`.
pub(crate) async fn bind(addr: SocketAddr, tls: &transfer::TlsFiles) -> Result<TlsListener> {
    let (server, _) = transfer::https_configs(tls).context("the API's TLS configuration")?;
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the API on {addr} (api_listen)"))?;
    let local = tcp.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let (tx, ready) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (sock, peer) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: try again shortly.
                    warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let operator = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| transfer::pki::operator_of(c));
                        let _ = tx
                            .send((
                                s,
                                ApiPeer {
                                    addr: peer,
                                    operator,
                                },
                            ))
                            .await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "API TLS handshake refused"),
                    Err(_) => debug!(%peer, "API TLS handshake timed out"),
                }
            });
        }
    });
    info!(%local, "API listening with mutual TLS");
    Ok(TlsListener { ready, local })
}

/// Middleware of the TCP API: operators only.
pub(crate) async fn operators_only(
    ConnectInfo(peer): ConnectInfo<ApiPeer>,
    req: Request,
    next: Next,
) -> Response {
    match &peer.operator {
        Some(op) => {
            debug!(operator = %op, addr = %peer.addr, method = %req.method(), path = %req.uri().path(), "API request");
            next.run(req).await
        }
        None => ApiFailure::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the certificate presented from {} is not an operator's: the API over TCP serves \
                 certificates made by `ferry pki operator NAME`",
                peer.addr.ip()
            ),
        )
        .into_response(),
    }
}
