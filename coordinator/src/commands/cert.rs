//! `ferry cert issue`, `ferry cert renew` and `ferry cert show`.
use std::path::{Path, PathBuf};

use ferry_proto::identity::{CertIdentity, Role};
use serde::Serialize;

use crate::pki::{self, CertRequest, Validity};

#[derive(Debug, Serialize)]
pub struct CertInfo {
    pub file: PathBuf,
    pub subject: String,
    pub issuer: String,
    pub name: String,
    pub role: Option<Role>,
    pub sans: Vec<String>,
    pub is_ca: bool,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Negative once expired.
    pub expires_in_days: i64,
    /// Lowercase hex: what `[tls] revoked` lists to cut this certificate off.
    pub serial: String,
}

impl CertInfo {
    fn new(file: PathBuf, id: CertIdentity) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        CertInfo {
            file,
            name: id.name().to_string(),
            subject: id.subject.clone(),
            issuer: id.issuer.clone(),
            role: id.role,
            sans: id.sans(),
            is_ca: id.is_ca,
            not_before_unix: id.not_before_unix,
            not_after_unix: id.not_after_unix,
            expires_in_days: (id.not_after_unix - now).div_euclid(86400),
            serial: id.serial.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct IssueOutcome {
    pub cert: CertInfo,
    pub key: PathBuf,
}

pub fn issue(
    ca: &Path,
    name: &str,
    role: Role,
    sans: &[String],
    out: &Path,
    force: bool,
    days: u32,
) -> anyhow::Result<IssueOutcome> {
    let req =
        CertRequest { name: name.to_string(), role, sans: sans.to_vec(), validity: Validity::days_from_now(days) };
    let issued = pki::issue(ca, &req, out, force)?;
    Ok(IssueOutcome { cert: CertInfo::new(issued.cert, issued.identity), key: issued.key })
}

/// Re-issues `cert` (same name, role and SANs; new key at `key`, default `cert` with `.key`).
pub fn renew(ca: &Path, cert: &Path, key: Option<&Path>, days: u32) -> anyhow::Result<IssueOutcome> {
    let key = key.map_or_else(|| cert.with_extension("key"), Path::to_path_buf);
    let issued = pki::renew(ca, cert, &key, Validity::days_from_now(days))?;
    Ok(IssueOutcome { cert: CertInfo::new(issued.cert, issued.identity), key: issued.key })
}

pub fn show(file: &Path) -> anyhow::Result<CertInfo> {
    Ok(CertInfo::new(file.to_owned(), pki::show(file)?))
}
