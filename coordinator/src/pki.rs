//! The fleet's certificate authority: create it, issue agent and coordinator certificates, and
//! describe a certificate.
//!
//! Keys are ECDSA P-256, written 0600 through the durable-write helper, and an existing key is
//! never replaced unless the caller forces it (replacing a key silently breaks every certificate
//! it signed). The role rides in a URI SAN (`ferry:role:agent|coordinator`) and is mirrored in the
//! extended key usage: agents `serverAuth`, coordinators `clientAuth` + `serverAuth` (the latter
//! for the pipeline API daemon).
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ferry_proto::durable::{self, Existing};
use ferry_proto::identity::{CertIdentity, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Default lifetime of the fleet CA.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default lifetime of agent and coordinator certificates.
pub const CERT_VALIDITY_DAYS: u32 = 397;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "refusing to overwrite the existing key {0} (pass --force to replace it; everything signed with it stops being trusted)"
    )]
    KeyExists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable {what}: {reason}")]
    Bad { path: PathBuf, what: &'static str, reason: String },
    #[error("invalid certificate name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("generating the certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Paths of a written certificate and key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: CertIdentity,
}

/// Validity window of a new certificate: from one hour ago (clock skew between hosts) for `days`.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - Duration::hours(1), not_after: now + Duration::days(i64::from(days)) }
    }
}

fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.to_owned(), source })
}

fn write_file(path: &Path, contents: &str, mode: u32, existing: Existing) -> Result<(), PkiError> {
    durable::write(path, contents.as_bytes(), mode, existing).map_err(|source| match source.kind() {
        std::io::ErrorKind::AlreadyExists => PkiError::KeyExists(path.to_owned()),
        _ => PkiError::Write { path: path.to_owned(), source },
    })
}

/// Writes a key (0600) then its certificate. The key goes first and alone decides whether
/// `force` is needed: a certificate without its key is useless, a key is what must not be lost.
fn write_pair(cert_path: &Path, cert_pem: &str, key_path: &Path, key_pem: &str, force: bool) -> Result<(), PkiError> {
    let existing = if force { Existing::Replace } else { Existing::Keep };
    write_file(key_path, key_pem, 0o600, existing)?;
    write_file(cert_path, cert_pem, 0o644, Existing::Replace)
}

/// Creates the fleet CA in `out`: `ca.pem` (certificate) and `ca.key` (0600).
pub fn init_ca(out: &Path, force: bool, validity: Validity) -> Result<Issued, PkiError> {
    ensure_dir(out)?;
    let key_path = out.join(CA_KEY_FILE);
    if !force && key_path.exists() {
        return Err(PkiError::KeyExists(key_path));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // A name of its own per CA: two fleets' CAs must never look alike to a verifier (it would then
    // report a bad signature instead of an unknown issuer).
    dn.push(DnType::CommonName, format!("ferry fleet CA {}", short_id(key.public_key_raw())));
    dn.push(DnType::OrganizationName, "ferry");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let cert = params.self_signed(&key)?;
    let cert_path = out.join(CA_CERT_FILE);
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem(), force)?;
    let identity = CertIdentity::from_der(cert.der()).map_err(|reason| PkiError::Bad {
        path: cert_path.clone(),
        what: "certificate",
        reason,
    })?;
    Ok(Issued { cert: cert_path, key: key_path, identity })
}

/// What to put in a new certificate.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// Common name; also a DNS SAN when it is a valid DNS name (inventory names usually are).
    pub name: String,
    pub role: Role,
    /// Extra SANs: IP addresses or DNS names the holder is reached by.
    pub sans: Vec<String>,
    pub validity: Validity,
}

/// Issues a certificate signed by the CA in `ca_dir`; writes `<out>/<name>.pem` and
/// `<out>/<name>.key`, and copies the CA certificate to `<out>/ca.pem` if it is not there, so the
/// directory is all a host needs.
pub fn issue(ca_dir: &Path, req: &CertRequest, out: &Path, force: bool) -> Result<Issued, PkiError> {
    let signed = sign(ca_dir, req)?;
    ensure_dir(out)?;
    let cert_path = out.join(format!("{}.pem", req.name));
    let key_path = out.join(format!("{}.key", req.name));
    write_pair(&cert_path, &signed.cert_pem, &key_path, &signed.key_pem, force)?;
    let out_ca = out.join(CA_CERT_FILE);
    if !out_ca.exists() {
        write_file(&out_ca, &signed.ca_pem, 0o644, Existing::Replace)?;
    }
    Ok(Issued { cert: cert_path, key: key_path, identity: signed.identity })
}

/// Re-issues the certificate at `cert_path` with the same name, role and SANs (and a new key), signed by
/// the CA in `ca_dir` (the same CA, or the new one of a rotation), valid for `validity`. Writes
/// `key_path` (0600), then `cert_path`, each replaced atomically.
pub fn renew(ca_dir: &Path, cert_path: &Path, key_path: &Path, validity: Validity) -> Result<Issued, PkiError> {
    let old = show(cert_path)?;
    let bad = |reason: String| PkiError::Bad { path: cert_path.to_owned(), what: "certificate", reason };
    if old.is_ca {
        return Err(bad("it is a CA certificate; renew the CA with `ferry ca init` (see README, CA rotation)".into()));
    }
    let role = old
        .role
        .ok_or_else(|| bad("it carries no ferry role: only certificates from `ferry cert issue` renew".into()))?;
    let name = old.common_name.clone().ok_or_else(|| bad("it has no common name".into()))?;
    let sans = old.sans().into_iter().filter(|s| *s != name).collect();
    let signed = sign(ca_dir, &CertRequest { name, role, sans, validity })?;
    write_pair(cert_path, &signed.cert_pem, key_path, &signed.key_pem, true)?;
    Ok(Issued { cert: cert_path.to_owned(), key: key_path.to_owned(), identity: signed.identity })
}

/// A certificate and key signed by the CA in `ca_dir`, not yet written.
struct Signed {
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    identity: CertIdentity,
}

fn sign(ca_dir: &Path, req: &CertRequest) -> Result<Signed, PkiError> {
    validate_name(&req.name)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_text(&ca_cert_path)?;
    let ca_key_pem = read_text(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::Bad {
        path: ca_key_path.clone(),
        what: "CA private key",
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| PkiError::Bad {
        path: ca_cert_path.clone(),
        what: "CA certificate",
        reason: e.to_string(),
    })?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.name.as_str());
    dn.push(DnType::OrganizationName, "ferry");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match req.role {
        // clientAuth too: an agent fetches chunks from its peers with its own certificate.
        Role::Agent => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth],
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    params.not_before = req.validity.not_before;
    params.not_after = req.validity.not_after;

    let mut sans = Vec::new();
    let mut push = |s: SanType| {
        if !sans.contains(&s) {
            sans.push(s);
        }
    };
    if is_dns_name(&req.name) {
        push(dns(&req.name)?);
    }
    for san in &req.sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => push(SanType::IpAddress(ip)),
            Err(_) if is_dns_name(san) => push(dns(san)?),
            Err(_) => {
                return Err(PkiError::BadName {
                    name: san.clone(),
                    reason: "a --san must be an IP address or a DNS name".into(),
                });
            }
        }
    }
    push(SanType::URI(req.role.uri().try_into().map_err(|e: rcgen::Error| PkiError::Generate(e))?));
    params.subject_alt_names = sans;

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let identity = CertIdentity::from_der(cert.der()).map_err(|reason| PkiError::Bad {
        path: ca_cert_path.clone(),
        what: "certificate it signed",
        reason,
    })?;
    Ok(Signed { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem, identity })
}

/// 8 hex digits from a public key (past the SEC1 point-format byte): a short, stable id.
fn short_id(public_key: &[u8]) -> String {
    public_key.iter().skip(1).take(4).map(|b| format!("{b:02x}")).collect()
}

fn dns(name: &str) -> Result<SanType, PkiError> {
    Ok(SanType::DnsName(name.try_into()?))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read { path: path.to_owned(), source })
}

/// A certificate name becomes file names: keep it to a safe alphabet.
fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName {
            name: name.to_string(),
            reason: "use letters, digits, '-', '_' and '.', not starting with '.' or '-'".into(),
        })
    }
}

/// A hostname in the RFC 1123 sense (labels of letters, digits and '-').
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.parse::<IpAddr>().is_err()
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Reads the first certificate of a PEM file and describes it.
pub fn show(path: &Path) -> Result<CertIdentity, PkiError> {
    let certs = ferry_proto::identity::load_certs(path).map_err(|e| PkiError::Bad {
        path: path.to_owned(),
        what: "certificate",
        reason: e.to_string(),
    })?;
    CertIdentity::from_der(&certs[0]).map_err(|reason| PkiError::Bad {
        path: path.to_owned(),
        what: "certificate",
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn ca_then_agent_cert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = init_ca(dir.path(), false, Validity::days_from_now(10)).expect("ca");
        assert!(ca.identity.is_ca);
        assert_eq!(mode(&ca.key), 0o600);

        let req = CertRequest {
            name: "web-1".into(),
            role: Role::Agent,
            sans: vec!["10.0.0.11".into(), "web-1.example.com".into()],
            validity: Validity::days_from_now(30),
        };
        let out = dir.path().join("web-1");
        let issued = issue(dir.path(), &req, &out, false).expect("issue");
        assert_eq!(mode(&issued.key), 0o600);
        assert!(out.join("ca.pem").exists());
        let id = show(&issued.cert).expect("show");
        assert_eq!(id.role, Some(Role::Agent));
        assert_eq!(id.name(), "web-1");
        assert!(id.names_host("web-1") && id.names_host("10.0.0.11") && id.names_host("web-1.example.com"));
        assert!(!id.names_host("web-2") && !id.names_host("10.0.0.12"));
        assert!(!id.is_ca);
        let days = (id.not_after_unix - id.not_before_unix) / 86400;
        assert_eq!(days, 30, "validity");
    }

    #[test]
    fn keys_are_never_overwritten_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), false, Validity::days_from_now(10)).expect("ca");
        let before = std::fs::read(dir.path().join(CA_KEY_FILE)).expect("read");
        let err = init_ca(dir.path(), false, Validity::days_from_now(10)).expect_err("second init");
        assert!(err.to_string().contains("refusing to overwrite the existing key"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(CA_KEY_FILE)).expect("read"), before);

        let req = CertRequest {
            name: "c".into(),
            role: Role::Coordinator,
            sans: vec![],
            validity: Validity::days_from_now(1),
        };
        issue(dir.path(), &req, dir.path(), false).expect("issue");
        let key_before = std::fs::read(dir.path().join("c.key")).expect("read");
        let err = issue(dir.path(), &req, dir.path(), false).expect_err("reissue");
        assert!(matches!(err, PkiError::KeyExists(_)), "{err}");
        assert_eq!(std::fs::read(dir.path().join("c.key")).expect("read"), key_before);
        issue(dir.path(), &req, dir.path(), true).expect("forced reissue");
        assert_ne!(std::fs::read(dir.path().join("c.key")).expect("read"), key_before);
    }

    #[test]
    fn bad_names_and_sans_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), false, Validity::days_from_now(10)).expect("ca");
        for name in ["../evil", "", ".hidden", "a/b"] {
            let req = CertRequest {
                name: name.into(),
                role: Role::Agent,
                sans: vec![],
                validity: Validity::days_from_now(1),
            };
            assert!(matches!(issue(dir.path(), &req, dir.path(), false), Err(PkiError::BadName { .. })), "{name}");
        }
        let req = CertRequest {
            name: "ok".into(),
            role: Role::Agent,
            sans: vec!["not a name!".into()],
            validity: Validity::days_from_now(1),
        };
        let err = issue(dir.path(), &req, dir.path(), false).expect_err("bad san");
        assert!(err.to_string().contains("IP address or a DNS name"), "{err}");
    }

    #[test]
    fn missing_ca_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let req =
            CertRequest { name: "x".into(), role: Role::Agent, sans: vec![], validity: Validity::days_from_now(1) };
        let err = issue(&dir.path().join("nope"), &req, dir.path(), false).expect_err("no ca");
        assert!(err.to_string().contains("nope/ca.pem"), "{err}");
    }
}
