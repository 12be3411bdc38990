//! QUIC endpoint with mutual TLS (server and client in one).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectError, ConnectionError, IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::{RecvStream, SendStream, TlsFiles, TransferError};

/// ALPN protocol identifier of Ferry's agent protocol.
pub const ALPN: &[u8] = b"ferry/1";
/// How long [`Endpoint::connect`] waits for the handshake before giving up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Endpoint::accept`] waits for an incoming handshake to complete.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const STREAM_WINDOW: u32 = 64 << 20;
const CONN_WINDOW: u32 = 128 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransferError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TransferError::tls(path.display().to_string(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransferError::tls(path.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(TransferError::tls(
            path.display().to_string(),
            "no certificate found in the PEM file",
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransferError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| TransferError::tls(path.display().to_string(), e))
}

fn transport(idle: Duration) -> Result<Arc<TransportConfig>, TransferError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE.min(idle / 3)));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(idle).map_err(|e| TransferError::tls("idle timeout", e))?,
    ));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONN_WINDOW));
    t.send_window(u64::from(CONN_WINDOW));
    Ok(Arc::new(t))
}

/// TLS 1.3 server and client configurations from PEM files, each side requiring a
/// certificate of the CA from the other.
fn tls_configs(
    tls: &TlsFiles,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), TransferError> {
    let ca = load_certs(&tls.ca)?;
    let chain = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c)
            .map_err(|e| TransferError::tls(tls.ca.display().to_string(), e))?;
    }
    let roots = Arc::new(roots);
    let provider = provider();
    let versions = [&rustls::version::TLS13];

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TransferError::tls("client certificate verifier", e))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| TransferError::tls("TLS server config", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            TransferError::tls(
                format!("{} with {}", tls.cert.display(), tls.key.display()),
                e,
            )
        })?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| TransferError::tls("TLS client config", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            TransferError::tls(
                format!("{} with {}", tls.cert.display(), tls.key.display()),
                e,
            )
        })?;
    Ok((server, client))
}

/// The agents' HTTPS API (HTTP/1.1 over TLS 1.3 on TCP): a server that requires a client
/// certificate of the CA, and a client that presents its own and checks the agent's.
pub fn https_configs(
    tls: &TlsFiles,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), TransferError> {
    let (mut server, mut client) = tls_configs(tls)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

/// Builds the quinn server and client configurations from PEM files.
fn configs(
    tls: &TlsFiles,
    idle: Duration,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransferError> {
    let (mut server, mut client) = tls_configs(tls)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let server = QuicServerConfig::try_from(server)
        .map_err(|e| TransferError::tls("QUIC server config", e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport(idle)?);

    client.alpn_protocols = vec![ALPN.to_vec()];
    let client = QuicClientConfig::try_from(client)
        .map_err(|e| TransferError::tls("QUIC client config", e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport(idle)?);
    Ok((server, client))
}

/// Whether a QUIC transport error code is a TLS alert (0x100..=0x1ff).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// Maps a connection error during a handshake with `addr`.
fn handshake_error(addr: SocketAddr, e: ConnectionError) -> TransferError {
    match e {
        ConnectionError::TimedOut => TransferError::Unreachable {
            addr,
            reason: "handshake timed out".into(),
        },
        ConnectionError::TransportError(t) if is_crypto(t.code) => TransferError::PeerRejected {
            addr,
            reason: t.to_string(),
        },
        ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => {
            TransferError::PeerRejected {
                addr,
                reason: format!("the peer refused us: {c}"),
            }
        }
        other => TransferError::Closed {
            reason: format!("handshake with {addr}: {other}"),
        },
    }
}

/// Maps a connection error on an established connection.
fn conn_error(addr: SocketAddr, e: ConnectionError) -> TransferError {
    match e {
        ConnectionError::TransportError(_) | ConnectionError::ConnectionClosed(_) => {
            handshake_error(addr, e)
        }
        ConnectionError::TimedOut => TransferError::Unreachable {
            addr,
            reason: "connection timed out (no traffic for 10 s)".into(),
        },
        other => TransferError::Closed {
            reason: format!("connection to {addr}: {other}"),
        },
    }
}

/// The first DNS name of the peer's (already verified) leaf certificate.
fn peer_dns_name(conn: &quinn::Connection) -> Result<String, TransferError> {
    let addr = conn.remote_address();
    let rejected = |reason: &str| TransferError::PeerRejected {
        addr,
        reason: reason.to_string(),
    };
    let identity = conn
        .peer_identity()
        .ok_or_else(|| rejected("the peer presented no certificate"))?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| rejected("the peer identity is not an X.509 certificate chain"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| rejected("the peer presented an empty certificate chain"))?;
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| rejected(&format!("cannot parse the peer certificate: {e}")))?;
    let name = ee
        .valid_dns_names()
        .next()
        .map(str::to_string)
        .ok_or_else(|| rejected("the peer certificate has no DNS subject alternative name"));
    name
}

/// Completes the server side of a handshake and identifies the peer.
async fn handshake(incoming: quinn::Incoming) -> Result<Connection, TransferError> {
    let addr = incoming.remote_address();
    let res = async {
        let connecting = incoming.accept().map_err(|e| handshake_error(addr, e))?;
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(TransferError::Unreachable {
                    addr,
                    reason: format!(
                        "incoming handshake not completed within {} s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                })
            }
            Ok(res) => res.map_err(|e| handshake_error(addr, e))?,
        };
        let peer_host = match peer_dns_name(&conn) {
            Ok(h) => h,
            Err(e) => {
                conn.close(VarInt::from_u32(1), b"certificate without DNS name");
                return Err(e);
            }
        };
        tracing::debug!(%addr, peer_host, "accepted");
        Ok(Connection { peer_host, conn })
    }
    .await;
    if let Err(e) = &res {
        tracing::warn!(%addr, error = %e, "incoming connection refused");
    }
    res
}

/// Kernel buffer the QUIC socket asks for in each direction. A bulk transfer arrives faster
/// than a busy receiver drains it: with the kernel's default (about 208 KiB) datagrams were
/// dropped at the socket (`RcvbufErrors`) during every large transfer here, and each drop
/// made the congestion controller back off. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`]-sized kernel buffers (or as close as
/// the host's limits allow: a smaller buffer is logged, not refused).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (dir, set, get) in [
        (
            "receive",
            Socket::set_recv_buffer_size as fn(&Socket, usize) -> std::io::Result<()>,
            Socket::recv_buffer_size as fn(&Socket) -> std::io::Result<usize>,
        ),
        (
            "send",
            Socket::set_send_buffer_size,
            Socket::send_buffer_size,
        ),
    ] {
        if let Err(e) = set(&s, SOCKET_BUFFER) {
            tracing::warn!(%addr, dir, error = %e, "the QUIC socket's buffer size could not be set");
        }
        // Linux reports twice what was granted (bookkeeping included).
        let got = get(&s).unwrap_or(0) / 2;
        if got < SOCKET_BUFFER {
            tracing::debug!(%addr, dir, granted = got, wanted = SOCKET_BUFFER,
                "the QUIC socket's buffer is capped by net.core.rmem_max/wmem_max");
        }
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A QUIC endpoint that accepts connections from, and connects to, other agents.
///
/// Both directions use mutual TLS 1.3: the server requires a client certificate
/// chained to the CA, and the client verifies the server's certificate against the CA
/// only (never the system roots) and the expected host name.
#[derive(Debug)]
pub struct Endpoint {
    ep: quinn::Endpoint,
    /// Incoming handshakes in progress.
    pending: tokio::sync::Mutex<tokio::task::JoinSet<Result<Connection, TransferError>>>,
}

impl Endpoint {
    /// Binds a UDP socket on `addr` and loads the CA, certificate and key from `tls`.
    ///
    /// Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr, tls: &TlsFiles) -> Result<Self, TransferError> {
        Self::bind_with_idle_timeout(addr, tls, IDLE_TIMEOUT)
    }

    /// Like [`Endpoint::bind`], with the idle timeout after which a silent peer counts as gone
    /// (keep-alives go out at a third of it, at most every second).
    pub fn bind_with_idle_timeout(
        addr: SocketAddr,
        tls: &TlsFiles,
        idle: Duration,
    ) -> Result<Self, TransferError> {
        let (server, client) = configs(tls, idle)?;
        let bind_err = |e: std::io::Error| TransferError::Stream {
            op: "binding the QUIC endpoint",
            source: std::io::Error::new(e.kind(), format!("{addr}: {e}")),
        };
        let socket = udp_socket(addr).map_err(bind_err)?;
        let mut ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        ep.set_default_client_config(client);
        Ok(Endpoint {
            ep,
            pending: Default::default(),
        })
    }

    /// The local address the endpoint is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransferError> {
        self.ep.local_addr().map_err(|e| TransferError::Stream {
            op: "reading the endpoint's local address",
            source: e,
        })
    }

    /// Connects to the agent at `addr` whose certificate must be valid for `peer_host`.
    ///
    /// Fails with [`TransferError::Unreachable`] after [`CONNECT_TIMEOUT`], and with
    /// [`TransferError::PeerRejected`] when a certificate is refused. Note that with
    /// TLS 1.3 a server refusing *our* certificate may only be noticed on first use of
    /// the connection.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer_host: &str,
    ) -> Result<Connection, TransferError> {
        let connecting = self.ep.connect(addr, peer_host).map_err(|e| match e {
            ConnectError::InvalidServerName(name) => TransferError::InvalidHost {
                host: name,
                reason: "not a valid DNS name".into(),
            },
            ConnectError::EndpointStopping => TransferError::Closed {
                reason: "the local endpoint is closing".into(),
            },
            other => TransferError::Unreachable {
                addr,
                reason: other.to_string(),
            },
        })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(TransferError::Unreachable {
                    addr,
                    reason: format!("no handshake within {} s", CONNECT_TIMEOUT.as_secs()),
                })
            }
            Ok(res) => res.map_err(|e| handshake_error(addr, e))?,
        };
        tracing::debug!(%addr, peer_host, "connected");
        Ok(Connection {
            peer_host: peer_host.to_string(),
            conn,
        })
    }

    /// Waits for the next incoming connection whose handshake has completed.
    ///
    /// Handshakes run concurrently in background tasks (each bounded by
    /// [`HANDSHAKE_TIMEOUT`]), so a slow or hostile client cannot hold up others.
    /// Returns `None` once the endpoint is closed. A failed handshake (for example a
    /// client without a certificate from our CA) yields `Some(Err(..))`; the endpoint
    /// keeps serving and `accept` can be called again.
    pub async fn accept(&self) -> Option<Result<Connection, TransferError>> {
        let mut pending = self.pending.lock().await;
        loop {
            tokio::select! {
                incoming = self.ep.accept() => {
                    let incoming = incoming?;
                    pending.spawn(handshake(incoming));
                }
                Some(done) = pending.join_next(), if !pending.is_empty() => {
                    return Some(done.unwrap_or_else(|e| {
                        Err(TransferError::Closed {
                            reason: format!("incoming handshake task failed: {e}"),
                        })
                    }));
                }
            }
        }
    }

    /// Closes all connections and stops accepting new ones.
    pub fn close(&self) {
        self.ep.close(VarInt::from_u32(0), b"endpoint closed");
    }

    /// Waits until all connections are closed and their state drained (after [`Endpoint::close`]).
    pub async fn wait_idle(&self) {
        self.ep.wait_idle().await;
    }
}

/// An authenticated connection to another agent.
#[derive(Debug, Clone)]
pub struct Connection {
    /// DNS name of the peer's verified certificate (for outgoing connections, the
    /// name it was verified against).
    pub peer_host: String,
    /// The underlying QUIC connection.
    pub conn: quinn::Connection,
}

impl Connection {
    /// Opens a bidirectional stream. The peer only sees it once data is written.
    pub async fn open(&self) -> Result<(SendStream, RecvStream), TransferError> {
        self.conn
            .open_bi()
            .await
            .map_err(|e| conn_error(self.conn.remote_address(), e))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_stream(&self) -> Result<(SendStream, RecvStream), TransferError> {
        self.conn
            .accept_bi()
            .await
            .map_err(|e| conn_error(self.conn.remote_address(), e))
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Closes the connection with a reason the peer can log.
    pub fn close(&self, reason: &str) {
        self.conn.close(VarInt::from_u32(0), reason.as_bytes());
    }
}
