//! The agent's side of mTLS: present the host's agent certificate, accept coordinators (and other
//! agents, for peer fetch only: [`crate::peers::RoleGate`] keeps them to `GetChunks`).
//!
//! Trust anchor: the fleet CA from `agent.toml`, nothing else (no system roots). A client must
//! present a certificate chaining to it, valid now, with the `clientAuth` purpose and the
//! `ferry:role:coordinator` (or `ferry:role:agent`) URI SAN; anything else is refused during the
//! handshake. TLS 1.3 only. [`peer_client_config`] is this host as a client of its peers.
use std::sync::Arc;

use ferry_proto::identity::{self, CertIdentity, PemError, Revoked, Role};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use ferry_proto::reload::Reloadable;

use crate::config::TlsFiles;

/// Why the agent's TLS setup could not be built from its files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("fleet CA file {path}: {reason}")]
    BadCa { path: String, reason: String },
    #[error("agent certificate {path}: {reason}")]
    BadCert { path: String, reason: String },
    #[error("agent certificate {cert} and key {key} do not belong together: {reason}")]
    KeyMismatch { cert: String, key: String, reason: String },
    #[error("{0}")]
    Revoked(String),
}

/// The crypto provider both sides use (ring; no C toolchain needed beyond `cc`).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server config from the agent's TLS files.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let ca_path = files.ca.display().to_string();
    let roots = root_store(&files.ca)?;
    let chain = identity::load_certs(&files.cert)?;
    let key = identity::load_key(&files.key)?;

    let cert_path = files.cert.display().to_string();
    let own =
        CertIdentity::from_der(&chain[0]).map_err(|reason| TlsError::BadCert { path: cert_path.clone(), reason })?;
    match own.role {
        Some(Role::Agent) => {}
        Some(other) => {
            return Err(TlsError::BadCert {
                path: cert_path,
                reason: format!("has role {other}, but an agent needs one issued with `ferry cert issue --role agent`"),
            });
        }
        None => {
            return Err(TlsError::BadCert {
                path: cert_path,
                reason: "carries no ferry role (is it a certificate from `ferry cert issue --role agent`?)".into(),
            });
        }
    }

    let revoked = match &files.revoked {
        Some(path) => Revoked::load(path).map_err(TlsError::Revoked)?,
        None => Revoked::default(),
    };
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::BadCa { path: ca_path, reason: e.to_string() })?;
    let verifier = Arc::new(CoordinatorOnly { inner, revoked });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::BadCert { path: cert_path.clone(), reason: e.to_string() })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| mismatch(files, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate and key of `files` do not belong together.
fn mismatch(files: &TlsFiles, e: &rustls::Error) -> TlsError {
    TlsError::KeyMismatch {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        reason: e.to_string(),
    }
}

/// This host as a client of its peers (peer fetch): its own agent certificate, and only the
/// fleet CA trusted for theirs (which must name the address the coordinator gave).
pub fn peer_client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = root_store(&files.ca)?;
    let chain = identity::load_certs(&files.cert)?;
    let key = identity::load_key(&files.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::BadCert { path: files.cert.display().to_string(), reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| mismatch(files, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn root_store(path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in identity::load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa { path: path.display().to_string(), reason: e.to_string() })?;
    }
    Ok(roots)
}

/// Accepts a client only if the fleet CA vouches for it *and* it carries the coordinator role, or
/// the agent role (a peer: what it may call is [`crate::peers::RoleGate`]'s to say).
///
/// A role refusal is reported as `ApplicationVerificationFailure`, which rustls sends as the
/// `access_denied` alert: the coordinator translates that alert into "not a coordinator
/// certificate", and [`describe_handshake_error`] does the same in the agent's log.
#[derive(Debug)]
struct CoordinatorOnly {
    inner: Arc<dyn ClientCertVerifier>,
    /// Serials refused even though the CA vouches for them (`tls.revoked`).
    revoked: Revoked,
}

impl ClientCertVerifier for CoordinatorOnly {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let peer = CertIdentity::from_der(end_entity).ok();
        if let Some(p) = &peer {
            // Outside a handshake started by the server (no scope), there is no one to tell.
            let _ = PRESENTED.try_with(|cell| *cell.borrow_mut() = Some(p.name().to_string()));
        }
        let role = peer.as_ref().and_then(|p| p.role);
        let refuse_role = || {
            tracing::warn!(
                peer = peer.as_ref().map(CertIdentity::name).unwrap_or("(unparseable)"),
                role = role.map(Role::as_str).unwrap_or("none"),
                "refused a client certificate without the coordinator role"
            );
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        };
        if let Some(p) = peer.as_ref().filter(|p| self.revoked.contains(&p.serial)) {
            tracing::warn!(
                peer = p.name(),
                serial = p.serial,
                "refused a revoked client certificate (listed in tls.revoked)"
            );
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(verified) if matches!(role, Some(Role::Coordinator | Role::Agent)) => Ok(verified),
            Ok(_) => Err(refuse_role()),
            // An agent certificate lacks the clientAuth purpose; say what it really is.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
            )) if role.is_some_and(|r| r != Role::Coordinator && r != Role::Agent) => Err(refuse_role()),
            Err(e) => Err(e),
        }
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

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// A handshake failure as a metric label: `unknown_ca`, `wrong_role`, `no_certificate`,
/// `revoked`, `bad_certificate`, `not_tls`, `incompatible`, `client_refused` (the client distrusts us), `eof`
/// or `other`. Bounded, unlike [`describe_handshake_error`]'s text.
pub fn refusal_kind(err: &std::io::Error) -> &'static str {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return if err.kind() == std::io::ErrorKind::UnexpectedEof { "eof" } else { "other" };
    };
    use rustls::Error as E;
    match tls {
        E::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => "wrong_role",
        E::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        E::InvalidCertificate(CertificateError::Revoked) => "revoked",
        E::InvalidCertificate(_) => "bad_certificate",
        E::NoCertificatesPresented => "no_certificate",
        E::InvalidMessage(_) => "not_tls",
        E::PeerIncompatible(_) => "incompatible",
        E::AlertReceived(_) => "client_refused",
        _ => "other",
    }
}

tokio::task_local! {
    /// The name on the client certificate of the handshake in progress, set by the verifier
    /// whether or not it accepts the certificate, so a refusal can say who was refused.
    static PRESENTED: std::cell::RefCell<Option<String>>;
}

/// Runs a handshake future and returns its result with the name of the certificate the client
/// presented, if it presented a readable one.
pub async fn with_presented_name<F: std::future::Future>(handshake: F) -> (F::Output, Option<String>) {
    PRESENTED
        .scope(std::cell::RefCell::new(None), async {
            let out = handshake.await;
            (out, PRESENTED.with(|p| p.borrow_mut().take()))
        })
        .await
}

/// A handshake failure in words for the agent's log: what the client did wrong.
pub fn describe_handshake_error(err: &std::io::Error) -> String {
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "the client closed the connection during the TLS handshake".into(),
            _ => format!("TLS handshake failed: {err}"),
        };
    };
    use rustls::Error as E;
    match tls {
        E::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "client certificate does not carry the coordinator role (ferry:role:coordinator)".into()
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "client certificate is not issued by this fleet's CA (unknown issuer)".into()
        }
        E::InvalidCertificate(CertificateError::Revoked) => {
            "client certificate is revoked: its serial number is listed in tls.revoked".into()
        }
        E::InvalidCertificate(e) => format!("client certificate refused: {e}"),
        E::NoCertificatesPresented => "the client presented no certificate (mutual TLS is required)".into(),
        E::InvalidMessage(_) => "the client does not speak TLS (plaintext or another protocol)".into(),
        E::PeerIncompatible(e) => format!("the client's TLS is incompatible (TLS 1.3 is required): {e:?}"),
        E::AlertReceived(rustls::AlertDescription::UnknownCA) => {
            "the client does not trust this agent's certificate authority (is the agent's certificate from the coordinator's fleet CA?)".into()
        }
        E::AlertReceived(alert @ (rustls::AlertDescription::BadCertificate | rustls::AlertDescription::CertificateUnknown)) => {
            format!("the client refused this agent's certificate (alert {alert:?}): does it name this host as the coordinator's inventory does?")
        }
        E::AlertReceived(rustls::AlertDescription::CertificateExpired) => {
            "the client refused this agent's certificate as expired or not yet valid".into()
        }
        E::AlertReceived(alert) => format!("the client aborted the handshake: it sent the alert {alert:?}"),
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The agent's TLS setup, rebuilt from its files on SIGHUP (`systemctl reload ferry-agent`) or
/// when they change (see [`ferry_proto::reload`]). Each new connection takes the setup current
/// when it arrives; connections already up keep theirs.
pub type LiveTls = Reloadable<tokio_rustls::TlsAcceptor>;

/// Loads the agent's TLS setup (errors as at start-up), reloadable from then on.
pub fn live(files: &TlsFiles) -> Result<LiveTls, TlsError> {
    let initial = tokio_rustls::TlsAcceptor::from(server_config(files)?);
    let paths = [Some(&files.ca), Some(&files.cert), Some(&files.key), files.revoked.as_ref()]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let files = files.clone();
    Ok(Reloadable::new(initial, paths, move || {
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&files).map_err(|e| e.to_string())?);
        Ok((acceptor, loaded(&files)))
    }))
}

/// What a reload loaded, for the log.
fn loaded(files: &TlsFiles) -> String {
    let own =
        identity::load_certs(&files.cert).ok().and_then(|c| c.first().and_then(|c| CertIdentity::from_der(c).ok()));
    let revoked = files.revoked.as_ref().map(|r| format!(", revocation list {}", r.display())).unwrap_or_default();
    match own {
        Some(id) => format!(
            "certificate {} (serial {}, valid until unix {}), CA bundle {}{revoked}",
            id.name(),
            id.serial,
            id.not_after_unix,
            files.ca.display()
        ),
        None => files.cert.display().to_string(),
    }
}

/// Reloads `tls` on each SIGHUP, and when its files change, until `stop`.
pub async fn watch(tls: Arc<LiveTls>, hangup: tokio::signal::unix::Signal, stop: tokio_util::sync::CancellationToken) {
    ferry_proto::reload::watch(tls, Some(hangup), stop.cancelled_owned(), |r| match r.result {
        Ok(what) => tracing::info!("reloaded TLS ({}): {what}", r.why),
        Err(e) => {
            tracing::error!("cannot reload TLS ({}); still using the previous certificate, key and CA: {e}", r.why)
        }
    })
    .await
}
