//! The coordinator's side of mTLS: present the coordinator certificate, accept an agent only if the
//! fleet CA signed its certificate, it carries the agent role, and it names the host we dialled.
//!
//! "Names the host" means: a SAN equal to the inventory name, or to the address from the
//! inventory. A certificate valid for another host of the fleet is refused, so a stolen agent key
//! cannot impersonate every host. TLS 1.3 only; no system roots.
use std::sync::Arc;

use ferry_proto::identity::{self, CertIdentity, PemError, Role};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use crate::config::{Host, TlsFiles};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("fleet CA file {path}: {reason}")]
    BadCa { path: String, reason: String },
    #[error("coordinator certificate {path}: {reason}")]
    BadCert { path: String, reason: String },
    #[error("coordinator certificate {cert} and key {key} do not belong together: {reason}")]
    KeyMismatch { cert: String, key: String, reason: String },
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The coordinator's loaded TLS material, from which a per-host client config is made.
#[derive(Clone)]
pub struct ClientTls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub identity: CertIdentity,
    /// In `ferry serve` with `dial_in_listen`: the hosts connected to it, reached through their
    /// own connections instead of dialed.
    dial_ins: Option<crate::dialin::DialIns>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("identity", &self.identity.name()).finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let tls = Self::load_any_role(files)?;
        if tls.identity.role != Some(Role::Coordinator) {
            let role = tls.identity.role.map_or("no ferry role".to_string(), |r| format!("role {r}"));
            return Err(TlsError::BadCert {
                path: files.cert.display().to_string(),
                reason: format!(
                    "has {role}; the coordinator needs one issued with `ferry cert issue --role coordinator`"
                ),
            });
        }
        Ok(tls)
    }

    /// Like [`ClientTls::load`] without the check of our own role. Only for tests that prove the
    /// *agent* refuses a client certificate of the wrong role.
    #[doc(hidden)]
    pub fn load_any_role(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in identity::load_certs(&files.ca)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::BadCa { path: files.ca.display().to_string(), reason: e.to_string() })?;
        }
        let chain = identity::load_certs(&files.cert)?;
        let key = identity::load_key(&files.key)?;
        let cert_path = files.cert.display().to_string();
        let identity =
            CertIdentity::from_der(&chain[0]).map_err(|reason| TlsError::BadCert { path: cert_path, reason })?;
        let tls = ClientTls { roots: Arc::new(roots), chain, key: Arc::new(key), identity, dial_ins: None };
        // Build one config now so a key that does not match the certificate fails here, at load.
        tls.config_for_names(Vec::new(), String::new()).map_err(|e| TlsError::KeyMismatch {
            cert: files.cert.display().to_string(),
            key: files.key.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(tls)
    }

    /// Reaches the hosts that dial in through `dial_ins`.
    pub fn with_dial_ins(mut self, dial_ins: crate::dialin::DialIns) -> ClientTls {
        self.dial_ins = Some(dial_ins);
        self
    }

    /// The connections of the hosts that dial in, in `ferry serve`.
    pub fn dial_ins(&self) -> Option<&crate::dialin::DialIns> {
        self.dial_ins.as_ref()
    }

    /// The client config for dialling `host`, and the server name to send.
    pub fn config_for(&self, host: &Host) -> Result<(Arc<ClientConfig>, ServerName<'static>), rustls::Error> {
        let mut names = Vec::new();
        if let Ok(n) = ServerName::try_from(host.name.clone()) {
            names.push(n);
        }
        if let Ok(n) = ServerName::try_from(host.address.clone())
            && !names.contains(&n)
        {
            names.push(n);
        }
        let sni = names
            .first()
            .cloned()
            .ok_or_else(|| rustls::Error::General(format!("host {} has no usable name or address", host.name)))?;
        let described = format!("{} (address {})", host.name, host.address);
        Ok((self.config_for_names(names, described)?, sni))
    }

    fn config_for_names(
        &self,
        names: Vec<ServerName<'static>>,
        described: String,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier = Arc::new(AgentVerifier { inner, names, described });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The agent certificate does not name the host we dialled.
#[derive(Debug, thiserror::Error)]
#[error("the agent's certificate is for {presented} (names: {}), not for host {expected}", sans.join(", "))]
pub struct IdentityMismatch {
    pub expected: String,
    pub presented: String,
    pub sans: Vec<String>,
}

/// The peer's certificate is from the fleet CA but is not an agent's.
#[derive(Debug, thiserror::Error)]
#[error(
    "the peer's certificate ({name}) has {role}, not the agent role: is a coordinator certificate installed on this host?"
)]
pub struct NotAnAgent {
    pub name: String,
    pub role: String,
}

/// Chain check by webpki (fleet CA only), then the name and role checks of this module.
#[derive(Debug)]
struct AgentVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
    described: String,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut verified = None;
        for name in &self.names {
            match self.inner.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(v) => {
                    verified = Some(v);
                    break;
                }
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                )) => continue,
                Err(e) => return Err(e),
            }
        }
        let peer = CertIdentity::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let Some(verified) = verified else {
            return Err(other(IdentityMismatch {
                expected: self.described.clone(),
                presented: peer.name().to_string(),
                sans: peer.sans(),
            }));
        };
        if peer.role != Some(Role::Agent) {
            return Err(other(NotAnAgent {
                name: peer.name().to_string(),
                role: peer.role.map_or("no ferry role".into(), |r| format!("role {r}")),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
