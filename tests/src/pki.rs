//! A throwaway fleet PKI for tests, made with the coordinator's own `pki` module.
use std::path::{Path, PathBuf};

use ferry_coordinator::pki::{self, CertRequest, Validity};
use ferry_proto::identity::Role;
use tempfile::TempDir;

/// A CA in a directory: a temp dir removed on drop, or a directory the caller owns.
pub struct TestPki {
    dir: PathBuf,
    _temp: Option<TempDir>,
}

/// The three files a holder needs.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// These files as a coordinator's `[tls]`.
    pub fn tls_files(&self) -> ferry_coordinator::config::TlsFiles {
        ferry_coordinator::config::TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            revoked: None,
        }
    }

    /// The coordinator's client TLS from these files.
    pub fn client_tls(&self) -> ferry_coordinator::tls::ClientTls {
        ferry_coordinator::tls::ClientTls::load(&self.tls_files()).expect("coordinator TLS from the test certificate")
    }
}

impl TestPki {
    pub fn new() -> TestPki {
        let temp = tempfile::tempdir().expect("temp dir for the test CA");
        pki::init_ca(temp.path(), false, Validity::days_from_now(30)).expect("create the test CA");
        TestPki { dir: temp.path().to_owned(), _temp: Some(temp) }
    }

    /// A CA in `dir`, which outlives this value (the fleet keeps its PKI in its own work dir, so
    /// a fleet left running keeps working certificates).
    pub fn in_dir(dir: &Path) -> TestPki {
        pki::init_ca(dir, false, Validity::days_from_now(30)).expect("create the test CA");
        TestPki { dir: dir.to_owned(), _temp: None }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.as_path().join(pki::CA_CERT_FILE)
    }

    /// Issues a certificate valid from an hour ago for a day.
    pub fn issue(&self, name: &str, role: Role, sans: &[&str]) -> CertFiles {
        self.issue_with(name, role, sans, Validity::days_from_now(1))
    }

    /// Issues a certificate whose validity ended an hour ago.
    pub fn issue_expired(&self, name: &str, role: Role, sans: &[&str]) -> CertFiles {
        let now = time::OffsetDateTime::now_utc();
        let validity =
            Validity { not_before: now - time::Duration::days(2), not_after: now - time::Duration::hours(1) };
        self.issue_with(name, role, sans, validity)
    }

    pub fn issue_with(&self, name: &str, role: Role, sans: &[&str], validity: Validity) -> CertFiles {
        let out = self.dir.as_path().join("issued").join(name);
        let req = CertRequest { name: name.into(), role, sans: sans.iter().map(|s| s.to_string()).collect(), validity };
        let issued = pki::issue(self.dir.as_path(), &req, &out, true).expect("issue a test certificate");
        CertFiles { ca: self.ca_cert(), cert: issued.cert, key: issued.key }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_path()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
