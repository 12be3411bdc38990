//! A minimal PKI for a lab: one CA per cluster, one certificate per host.
//!
//! Host certificates carry the host name as DNS SAN and both the server and client
//! authentication extended key usages, so one certificate serves both roles of an
//! [`crate::Endpoint`].

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::TransferError;

/// Paths of the PEM files an [`crate::Endpoint`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This host's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files laid out by [`create_ca`] in `ca_dir` and [`issue_host_cert`] in `host_dir`.
    pub fn for_host(ca_dir: &Path, host_dir: &Path, host: &str) -> Self {
        TlsFiles {
            ca: ca_dir.join("ca.pem"),
            cert: host_dir.join(format!("{host}.pem")),
            key: host_dir.join(format!("{host}.key")),
        }
    }
}

fn rc_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TransferError {
    let what = what.into();
    move |e| TransferError::tls(what, e)
}

/// Writes `data` to `path` atomically (temp file + rename) with the given mode.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TransferError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` only applies to new files: enforce it on a leftover temp file too.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        TransferError::io("write", path, e)
    })
}

fn read_string(path: &Path) -> Result<String, TransferError> {
    fs::read_to_string(path).map_err(|e| TransferError::io("read", path, e))
}

/// Creates a CA in `dir` (`ca.pem` and `ca.key`, the key with mode 0600).
///
/// Idempotent: if both files already exist they are kept as they are. If only one of
/// them exists, an error is returned rather than overwriting it.
pub fn create_ca(dir: &Path, name: &str) -> Result<(), TransferError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => return Ok(()),
        (false, false) => {}
        (true, false) | (false, true) => {
            return Err(TransferError::tls(
                dir.display().to_string(),
                "only one of ca.pem and ca.key exists; restore the missing one or remove both to create a new CA",
            ))
        }
    }
    fs::create_dir_all(dir).map_err(|e| TransferError::io("create directory", dir, e))?;
    let key = KeyPair::generate().map_err(rc_err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Ferry lab CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    (params.not_before, params.not_after) = validity(CA_VALIDITY_DAYS);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(rc_err(format!("self-signing the CA certificate {name:?}")))?;
    // Key first: a ca.pem without its key would make the CA unusable.
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// How long a CA certificate is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a host certificate is valid: peers refuse it afterwards (issue a new one).
pub const HOST_VALIDITY_DAYS: i64 = 365;

/// From an hour ago (clock skew between hosts) to `days` from now.
fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(days),
    )
}

/// Issues a certificate for `host` signed by the CA in `ca_dir`, writing
/// `out_dir/{host}.pem` (the leaf certificate) and `out_dir/{host}.key` (mode 0600).
///
/// The certificate has `host` as its DNS subject alternative name and is valid for
/// both TLS server and client authentication. Existing files are replaced.
///
/// Valid from an hour ago for [`HOST_VALIDITY_DAYS`].
pub fn issue_host_cert(ca_dir: &Path, host: &str, out_dir: &Path) -> Result<(), TransferError> {
    let (from, until) = validity(HOST_VALIDITY_DAYS);
    issue_host_cert_valid(ca_dir, host, out_dir, from, until)
}

/// [`issue_host_cert`] that also names the host's addresses `ips` (IP subject alternative
/// names), for clients that reach its API by address and check it.
pub fn issue_host_cert_with_ips(
    ca_dir: &Path,
    host: &str,
    ips: &[std::net::IpAddr],
    out_dir: &Path,
) -> Result<(), TransferError> {
    let (from, until) = validity(HOST_VALIDITY_DAYS);
    issue(ca_dir, Subject::Host { host, ips }, out_dir, from, until)
}

/// The subject organization of an operator's certificate ([`issue_operator_cert`]): an
/// agent's API over TCP serves these certificates' holders, not other hosts.
pub const OPERATOR_ORG: &str = "Ferry operator";

/// Issues a client certificate for operator `name` (a person, an orchestrator) signed by the
/// CA in `ca_dir`: `out_dir/{name}.pem` and `out_dir/{name}.key` (mode 0600). It names no host
/// and is valid for TLS client authentication only, with [`OPERATOR_ORG`] as its
/// organization, for [`HOST_VALIDITY_DAYS`].
pub fn issue_operator_cert(ca_dir: &Path, name: &str, out_dir: &Path) -> Result<(), TransferError> {
    let (from, until) = validity(HOST_VALIDITY_DAYS);
    issue(ca_dir, Subject::Operator { name }, out_dir, from, until)
}

/// The operator named by a verified leaf certificate `der`: its common name, if its
/// organization is [`OPERATOR_ORG`].
pub fn operator_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let org = subject.iter_organization().next()?.as_str().ok()?;
    if org != OPERATOR_ORG {
        return None;
    }
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

/// Whom a certificate is for.
enum Subject<'a> {
    /// A host: its DNS name (and addresses), server and client authentication.
    Host {
        host: &'a str,
        ips: &'a [std::net::IpAddr],
    },
    /// An operator: client authentication only.
    Operator { name: &'a str },
}

/// [`issue_host_cert`] valid from `from` until `until` (a test may issue one that has
/// expired).
pub fn issue_host_cert_valid(
    ca_dir: &Path,
    host: &str,
    out_dir: &Path,
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> Result<(), TransferError> {
    issue(
        ca_dir,
        Subject::Host { host, ips: &[] },
        out_dir,
        from,
        until,
    )
}

fn issue(
    ca_dir: &Path,
    subject: Subject<'_>,
    out_dir: &Path,
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> Result<(), TransferError> {
    let host = match &subject {
        Subject::Host { host, .. } => *host,
        Subject::Operator { name } => *name,
    };
    // Both become file names and names in certificates: DNS-name syntax for both.
    let dns =
        rustls::pki_types::DnsName::try_from(host).map_err(|e| TransferError::InvalidHost {
            host: host.to_string(),
            reason: e.to_string(),
        })?;
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(TransferError::InvalidHost {
            host: host.to_string(),
            reason: "an IP address is not a host name; use a DNS name".into(),
        });
    }
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_key = KeyPair::from_pem(&read_string(&ca_key_path)?)
        .map_err(rc_err(ca_key_path.display().to_string()))?;
    let ca_params = CertificateParams::from_ca_cert_pem(&read_string(&ca_cert_path)?)
        .map_err(rc_err(ca_cert_path.display().to_string()))?;
    // Re-signing the CA's own parameters with its key yields an issuer with the same
    // subject and key identifier as the certificate on disk.
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(rc_err(format!("loading the CA from {}", ca_dir.display())))?;

    let key = KeyPair::generate().map_err(rc_err(format!("generating the key of {host}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    let mut params = match &subject {
        Subject::Host { ips, .. } => {
            let mut p = CertificateParams::new(vec![dns.as_ref().to_string()])
                .map_err(rc_err(format!("certificate parameters for {host}")))?;
            p.subject_alt_names
                .extend(ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p
        }
        Subject::Operator { .. } => {
            dn.push(DnType::OrganizationName, OPERATOR_ORG);
            let mut p = CertificateParams::default();
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p
        }
    };
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    (params.not_before, params.not_after) = (from, until);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(rc_err(format!("signing the certificate of {host}")))?;
    fs::create_dir_all(out_dir).map_err(|e| TransferError::io("create directory", out_dir, e))?;
    write_file(
        &out_dir.join(format!("{host}.key")),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &out_dir.join(format!("{host}.pem")),
        cert.pem().as_bytes(),
        0o644,
    )?;
    Ok(())
}
