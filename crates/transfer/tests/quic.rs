//! QUIC + mutual TLS tests on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use transfer::frame::{read_msg, write_msg};
use transfer::pki::{create_ca, issue_host_cert};
use transfer::{Endpoint, TlsFiles, TransferError};

struct Lab {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    certs: PathBuf,
    rogue_ca: PathBuf,
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let certs = dir.path().join("certs");
    let rogue_ca = dir.path().join("rogue-ca");
    create_ca(&ca, "ferry lab").unwrap();
    create_ca(&rogue_ca, "rogue").unwrap();
    for host in ["alpha", "beta", "gamma"] {
        issue_host_cert(&ca, host, &certs).unwrap();
    }
    issue_host_cert(&rogue_ca, "mallory", &certs).unwrap();
    Lab {
        _dir: dir,
        ca,
        certs,
        rogue_ca,
    }
}

impl Lab {
    fn files(&self, host: &str) -> TlsFiles {
        TlsFiles::for_host(&self.ca, &self.certs, host)
    }
}

fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn pki_files_and_idempotence() {
    use std::os::unix::fs::PermissionsExt;
    let l = lab();
    let before = std::fs::read(l.ca.join("ca.pem")).unwrap();
    create_ca(&l.ca, "again").unwrap();
    assert_eq!(std::fs::read(l.ca.join("ca.pem")).unwrap(), before);
    for key in [l.ca.join("ca.key"), l.certs.join("alpha.key")] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    assert!(matches!(
        issue_host_cert(&l.ca, "../evil", &l.certs),
        Err(TransferError::InvalidHost { .. })
    ));
    // A missing CA is reported with its path.
    let err = issue_host_cert(&l.certs.join("nope"), "x", &l.certs).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

/// Echo server: for each accepted connection (successful or not) reports the result.
async fn echo_once(server: &Endpoint) -> Result<String, TransferError> {
    let conn = server.accept().await.expect("endpoint open")?;
    let (mut s, mut r) = conn.accept_stream().await?;
    let msg: String = read_msg(&mut r).await?;
    write_msg(&mut s, &format!("{msg} from {}", conn.peer_host)).await?;
    s.finish().unwrap();
    // Wait for the client to read and close.
    let _ = conn.conn.closed().await;
    Ok(conn.peer_host)
}

async fn ping(client: &Endpoint, addr: SocketAddr, host: &str) -> Result<String, TransferError> {
    let conn = client.connect(addr, host).await?;
    assert_eq!(conn.peer_host, host);
    let (mut s, mut r) = conn.open().await?;
    write_msg(&mut s, "ping").await?;
    s.finish().unwrap();
    let reply: String = read_msg(&mut r).await?;
    conn.close("done");
    Ok(reply)
}

#[tokio::test]
async fn mutual_tls_handshake_and_peer_host() {
    let l = lab();
    let server = Arc::new(Endpoint::bind(lo(), &l.files("alpha")).unwrap());
    let addr = server.local_addr().unwrap();
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { echo_once(&server).await })
    };
    let client = Endpoint::bind(lo(), &l.files("beta")).unwrap();
    let reply = ping(&client, addr, "alpha").await.unwrap();
    assert_eq!(reply, "ping from beta");
    assert_eq!(srv.await.unwrap().unwrap(), "beta");

    // The server's certificate is not valid for another name.
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await.map(|r| r.map(|c| c.peer_host)) })
    };
    match client.connect(addr, "gamma").await {
        Err(TransferError::PeerRejected { .. }) => {}
        other => panic!("expected PeerRejected, got {other:?}"),
    }
    assert!(matches!(srv.await.unwrap(), Some(Err(_))));
    server.close();
    client.close();
}

#[tokio::test]
async fn client_from_other_ca_is_refused_and_server_keeps_serving() {
    let l = lab();
    let server = Arc::new(Endpoint::bind(lo(), &l.files("alpha")).unwrap());
    let addr = server.local_addr().unwrap();
    let srv = {
        let server = server.clone();
        tokio::spawn(async move {
            let first = server.accept().await.expect("endpoint open");
            let second = echo_once(&server).await;
            (first.map(|c| c.peer_host), second)
        })
    };
    // Trusts our CA (so it accepts the server) but presents a rogue certificate.
    let rogue = TlsFiles {
        ca: l.ca.join("ca.pem"),
        cert: l.certs.join("mallory.pem"),
        key: l.certs.join("mallory.key"),
    };
    let rogue_ep = Endpoint::bind(lo(), &rogue).unwrap();
    let res = ping(&rogue_ep, addr, "alpha").await;
    assert!(res.is_err(), "rogue client was served: {res:?}");

    let good = Endpoint::bind(lo(), &l.files("gamma")).unwrap();
    assert_eq!(ping(&good, addr, "alpha").await.unwrap(), "ping from gamma");
    let (first, second) = srv.await.unwrap();
    match first {
        Err(TransferError::PeerRejected { .. }) => {}
        other => panic!("expected PeerRejected for the rogue client, got {other:?}"),
    }
    assert_eq!(second.unwrap(), "gamma");

    // A client that trusts only the rogue CA refuses our server.
    let doubly_rogue = TlsFiles::for_host(&l.rogue_ca, &l.certs, "mallory");
    let ep = Endpoint::bind(lo(), &doubly_rogue).unwrap();
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await.map(|r| r.map(|c| c.peer_host)) })
    };
    assert!(matches!(
        ep.connect(addr, "alpha").await,
        Err(TransferError::PeerRejected { .. })
    ));
    assert!(matches!(srv.await.unwrap(), Some(Err(_))));
    server.close();
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let l = lab();
    let server = Arc::new(Endpoint::bind(lo(), &l.files("alpha")).unwrap());
    let addr = server.local_addr().unwrap();
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await.expect("endpoint open") })
    };

    // A hand-made client that trusts the CA but has no certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(l.ca.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![transfer::ALPN.to_vec()];
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client(lo()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));

    let attempt = async {
        let conn = ep.connect(addr, "alpha").unwrap().await?;
        let (mut s, mut r) = conn.open_bi().await?;
        write_msg(&mut s, "ping")
            .await
            .map_err(|e| anyhow_like(&e))?;
        let _: String = read_msg(&mut r).await.map_err(|e| anyhow_like(&e))?;
        Ok::<(), Box<dyn std::error::Error>>(())
    };
    let res = tokio::time::timeout(Duration::from_secs(8), attempt)
        .await
        .expect("refusal within 8 s");
    assert!(res.is_err(), "client without certificate was served");
    match srv.await.unwrap() {
        Err(TransferError::PeerRejected { reason, .. }) => {
            assert!(!reason.is_empty());
        }
        other => panic!(
            "expected PeerRejected, got {:?}",
            other.map(|c| c.peer_host)
        ),
    }
    server.close();
}

fn anyhow_like(e: &TransferError) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

#[tokio::test]
async fn connect_to_silent_port_is_unreachable() {
    let l = lab();
    let client = Endpoint::bind(lo(), &l.files("beta")).unwrap();
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let t0 = std::time::Instant::now();
    match client.connect(addr, "alpha").await {
        Err(TransferError::Unreachable { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(7));
}

#[tokio::test]
async fn bind_reports_missing_files() {
    let l = lab();
    let mut files = l.files("alpha");
    files.key = l.certs.join("missing.key");
    let err = Endpoint::bind(lo(), &files).unwrap_err();
    assert!(err.to_string().contains("missing.key"), "{err}");
    let _ = Path::new("");
}

#[tokio::test]
async fn certificates_expire_and_an_expired_one_is_refused() {
    let l = lab();
    // Issued certificates carry an expiry: a year for hosts, ten for the CA.
    for (pem, days) in [
        (l.certs.join("alpha.pem"), transfer::pki::HOST_VALIDITY_DAYS),
        (l.ca.join("ca.pem"), transfer::pki::CA_VALIDITY_DAYS),
    ] {
        let text = std::fs::read_to_string(&pem).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(text.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        let left = cert.validity().not_after.timestamp() - time_now();
        let want = days * 86_400;
        assert!(
            (want - 86_400..=want + 86_400).contains(&left),
            "{}: expires in {left} s, expected about {days} days",
            pem.display()
        );
    }
    // One that expired yesterday is refused, as a client and as a server.
    let now = time::OffsetDateTime::now_utc();
    transfer::pki::issue_host_cert_valid(
        &l.ca,
        "delta",
        &l.certs,
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    let server = Arc::new(Endpoint::bind(lo(), &l.files("alpha")).unwrap());
    let addr = server.local_addr().unwrap();
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await.map(|r| r.map(|c| c.peer_host)) })
    };
    let expired = Endpoint::bind(lo(), &l.files("delta")).unwrap();
    let res = ping(&expired, addr, "alpha").await;
    assert!(
        res.is_err(),
        "a client with an expired certificate was served"
    );
    match srv.await.unwrap() {
        Some(Err(TransferError::PeerRejected { reason, .. })) => {
            assert!(reason.to_lowercase().contains("expired"), "{reason}")
        }
        other => panic!("expected PeerRejected, got {other:?}"),
    }
    let expired_server = Arc::new(Endpoint::bind(lo(), &l.files("delta")).unwrap());
    let eaddr = expired_server.local_addr().unwrap();
    let _accepting = {
        let s = expired_server.clone();
        tokio::spawn(async move { s.accept().await.map(|r| r.map(|c| c.peer_host)) })
    };
    let client = Endpoint::bind(lo(), &l.files("beta")).unwrap();
    match client.connect(eaddr, "delta").await {
        Err(TransferError::PeerRejected { .. }) => {}
        other => panic!(
            "expected PeerRejected, got {:?}",
            other.map(|c| c.peer_host)
        ),
    }
    server.close();
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn leaf_der(pem: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(pem).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(text.as_bytes()).unwrap();
    der.contents
}

#[test]
fn operator_certificates_name_their_operator_and_host_certificates_none() {
    let l = lab();
    transfer::pki::issue_operator_cert(&l.ca, "alice", &l.certs).unwrap();
    let ip: std::net::IpAddr = "10.0.0.5".parse().unwrap();
    transfer::pki::issue_host_cert_with_ips(&l.ca, "epsilon", &[ip], &l.certs).unwrap();
    assert_eq!(
        transfer::pki::operator_of(&leaf_der(&l.certs.join("alice.pem"))),
        Some("alice".to_string())
    );
    for host in ["alpha", "epsilon"] {
        assert_eq!(
            transfer::pki::operator_of(&leaf_der(&l.certs.join(format!("{host}.pem")))),
            None,
            "{host} is a host, not an operator"
        );
    }
    assert_eq!(transfer::pki::operator_of(b"not a certificate"), None);
    // The host certificate names its address; the operator's names no host and serves no
    // TLS server.
    let der = leaf_der(&l.certs.join("epsilon.pem"));
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(
        san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::IPAddress(b) if *b == [10, 0, 0, 5]
        )),
        "{:?}",
        san.value.general_names
    );
    let der = leaf_der(&l.certs.join("alice.pem"));
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(cert.subject_alternative_name().unwrap().is_none());
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth && !eku.value.server_auth);
    // An operator's name is a file name too: no path tricks.
    assert!(transfer::pki::issue_operator_cert(&l.ca, "../evil", &l.certs).is_err());
}

#[tokio::test]
async fn an_operator_certificate_is_no_peer() {
    let l = lab();
    transfer::pki::issue_operator_cert(&l.ca, "alice", &l.certs).unwrap();
    let server = Arc::new(Endpoint::bind(lo(), &l.files("alpha")).unwrap());
    let addr = server.local_addr().unwrap();
    let srv = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await.map(|r| r.map(|c| c.peer_host)) })
    };
    let alice = Endpoint::bind(lo(), &l.files("alice")).unwrap();
    let _ = ping(&alice, addr, "alpha").await;
    match srv.await.unwrap() {
        Some(Err(TransferError::PeerRejected { reason, .. })) => {
            assert!(reason.contains("DNS"), "{reason}")
        }
        other => panic!("an operator's certificate was taken as a peer: {other:?}"),
    }
}
