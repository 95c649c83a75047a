//! Fleet identities: the role and names a ferry certificate carries, and PEM loading.
//!
//! A fleet certificate names its holder in the subject common name and in DNS/IP subject
//! alternative names, and states its role in a URI SAN `ferry:role:<role>`. Only certificates
//! issued by the fleet CA are ever trusted; this module only *reads* what a certificate says, the
//! TLS modules of each process decide what to accept.
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Prefix of the URI SAN that states a certificate's role.
pub const ROLE_URI_PREFIX: &str = "ferry:role:";

/// What a certificate holder is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host agent: serves the agent gRPC API.
    Agent,
    /// The coordinator (`ferry`): the only role an agent takes commands from.
    Coordinator,
    /// A person or pipeline driving `ferry serve`'s API with a client certificate. Agents refuse it.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
        }
    }

    /// The URI SAN value that carries this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "coordinator" => Ok(Role::Coordinator),
            "operator" => Ok(Role::Operator),
            other => Err(format!("unknown role {other:?} (expected agent, coordinator or operator)")),
        }
    }
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// `None` when the certificate carries no (or an unknown) `ferry:role:` URI.
    pub role: Option<Role>,
    pub issuer: String,
    pub subject: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub is_ca: bool,
    /// The serial number, lowercase hex without leading zero bytes (what `ferry cert show` prints
    /// and a revocation list names).
    pub serial: String,
}

impl CertIdentity {
    /// Reads a DER certificate. Fails only if the bytes are not an X.509 certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        let mut role = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push((*d).to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            ips.push(ip);
                        }
                    }
                    GeneralName::URI(uri) => {
                        if let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX) {
                            role = r.parse().ok();
                        }
                    }
                    _ => {}
                }
            }
        }
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
        let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
        Ok(CertIdentity {
            common_name,
            dns_names,
            ips,
            role,
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
            is_ca,
            serial: serial_hex(cert.raw_serial()),
        })
    }

    /// The holder's name: the common name, else the first DNS SAN, else "(unnamed)".
    pub fn name(&self) -> &str {
        self.common_name.as_deref().or(self.dns_names.first().map(String::as_str)).unwrap_or("(unnamed)")
    }

    /// Whether the certificate names `host` (a DNS name or an IP address) in its SANs.
    pub fn names_host(&self, host: &str) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.dns_names.iter().any(|d| d.eq_ignore_ascii_case(host)),
        }
    }

    /// All SANs, for display: DNS names then IPs.
    pub fn sans(&self) -> Vec<String> {
        self.dns_names.iter().cloned().chain(self.ips.iter().map(IpAddr::to_string)).collect()
    }
}

/// A serial number as lowercase hex, leading zero bytes dropped (DER adds one to keep it positive).
fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

/// Certificates cut off before they expire: a list of serial numbers (`[tls] revoked`), one per
/// line in hex (`ferry cert show` prints it; colons and case do not matter), `#` starts a comment.
/// A process that checks it refuses a peer whose certificate's serial is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked(std::collections::BTreeSet<String>);

impl Revoked {
    /// Reads the list; a line that is not a serial number is an error naming the file and line.
    pub fn load(path: &Path) -> Result<Revoked, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read revocation list {}: {e}", path.display()))?;
        Revoked::parse(&text).map_err(|(line, what)| format!("revocation list {} line {line}: {what}", path.display()))
    }

    /// The list from its text; the error is the line number and what is wrong with it.
    pub fn parse(text: &str) -> Result<Revoked, (usize, String)> {
        let mut serials = std::collections::BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let word = line.split('#').next().unwrap_or("").trim();
            if word.is_empty() {
                continue;
            }
            let digits: String = word.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
            let raw = hex::decode(if digits.len() % 2 == 1 { format!("0{digits}") } else { digits.clone() }).map_err(
                |_| (i + 1, format!("{word:?} is not a serial number in hex (as `ferry cert show` prints it)")),
            )?;
            if raw.is_empty() || raw.len() > 20 {
                return Err((i + 1, format!("{word:?}: a serial number is 1 to 20 bytes")));
            }
            serials.insert(serial_hex(&raw));
        }
        Ok(Revoked(serials))
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.0.contains(serial)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A certificate or key file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {kind} file {path}: {source}")]
    Read {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} file {path} holds no PEM {kind} ({detail})")]
    Empty { kind: &'static str, path: PathBuf, detail: String },
    #[error("{kind} file {path} is not valid PEM: {detail}")]
    Invalid { kind: &'static str, path: PathBuf, detail: String },
}

fn read(kind: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read { kind, path: path.to_owned(), source })
}

/// Reads every certificate of a PEM file (leaf first for a chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let kind = "certificate";
    let bytes = read(kind, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Invalid { kind, path: path.to_owned(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(PemError::Empty { kind, path: path.to_owned(), detail: "no BEGIN CERTIFICATE block".into() });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let kind = "private key";
    let bytes = read(kind, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            PemError::Empty { kind, path: path.to_owned(), detail: "no BEGIN PRIVATE KEY block".into() }
        }
        other => PemError::Invalid { kind, path: path.to_owned(), detail: other.to_string() },
    })
}

#[cfg(test)]
mod tests {
    use super::Revoked;

    #[test]
    fn a_revocation_list_reads_serials_in_any_spelling_and_names_a_bad_line() {
        let r = Revoked::parse("# stolen laptop\n01:AB:cd\n  00ff  # leading zero byte\n\nabc\n").expect("valid");
        assert!(r.contains("01abcd") && r.contains("ff") && r.contains("0abc"), "{r:?}");
        assert_eq!(r.len(), 3);
        let bad = Revoked::parse("01\nnot-hex\n").expect_err("line 2");
        assert_eq!(bad.0, 2);
        assert!(bad.1.contains("\"not-hex\" is not a serial number"), "{}", bad.1);
        assert!(Revoked::parse(&"ab".repeat(21)).is_err(), "longer than 20 bytes");
    }
}
