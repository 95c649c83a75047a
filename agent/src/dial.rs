//! Dialing out: with `connect = ["deploy.example.com:7444", …]` in agent.toml the agent connects
//! to each `ferry serve` itself, for hosts a coordinator cannot reach (NAT, another network, no
//! inbound port by policy), and serves the agent contract over that connection.
//!
//! The agent is the TLS client of the connection but its HTTP/2 *server*: the server sends the
//! requests. So every command runs through the same service, the same role gate and the same
//! audit as one that came to `listen`; only who opened the TCP connection differs.
//!
//! - **Who the server is**: its certificate must chain to the fleet CA, carry the coordinator
//!   role, name the host this agent dials (a SAN: the name in `connect`), and not be listed in
//!   `tls.revoked`. Anything else is refused before a request is served, logged and audited.
//! - **One connection per server**, kept open; HTTP/2 pings find a dead one. When it closes, the
//!   agent dials again after a random wait up to a bound that doubles with each failure (from
//!   [`FIRST_RETRY`] to [`MAX_RETRY`]: "full jitter"; up to 4 s after a connection that had been
//!   up a while), so thousands of agents that lost their server at the same moment do not all
//!   come back in the same second.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::identity::{self, CertIdentity, Revoked, Role};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::config::DialTarget as Target;
use crate::config::TlsFiles;
use crate::service::PeerInfo;
use crate::telemetry::Telemetry;

/// The bound of the first wait after a connection ends or fails.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The bound never grows past this.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// A connection that stayed up this long was a good one: the next wait starts from
/// [`FIRST_RETRY`] again.
const STABLE: Duration = Duration::from_secs(30);
/// After a connection that was [`STABLE`] ended, the next dial waits as after this many
/// failures: random, up to 4 s.
const AFTER_STABLE: u32 = 2;
/// TCP connect and TLS handshake, each.
const CONNECT: Duration = Duration::from_secs(10);

/// A byte stream the gRPC server can serve.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// A connection dialed and authenticated, for the server to serve.
pub struct Dialed {
    pub stream: Box<dyn Io>,
    /// The server, as its certificate says.
    pub peer: PeerInfo,
    /// Dropped once the server has finished with the connection: the dialer dials again.
    pub closed: oneshot::Sender<()>,
}

/// How long to wait before dial number `failures + 1`: random, up to a bound that doubles with
/// each failure in a row. `unit` is a random number in [0, 1).
pub fn retry_wait(failures: u32, unit: f64) -> Duration {
    let bound = FIRST_RETRY.saturating_mul(1u32 << failures.min(16)).min(MAX_RETRY);
    bound.mul_f64(unit.clamp(0.0, 1.0))
}

/// Keeps a connection to `target` open until `stop`, handing each one to `to_serve` and dialing
/// again once it has closed.
pub async fn keep_connected(
    target: Target,
    files: TlsFiles,
    to_serve: mpsc::Sender<Dialed>,
    telemetry: Arc<Telemetry>,
    stop: CancellationToken,
) {
    let mut failures: u32 = 0;
    // Agents started together (a fleet booted at once) spread their first dial too.
    let mut wait = retry_wait(0, fastrand::f64()) / 4;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let attempt = tokio::select! {
            // A server that drops packets must not hold a shutdown up for the dial's timeouts.
            _ = stop.cancelled() => return,
            attempt = dial(&target, &files) => attempt,
        };
        match attempt {
            Ok((stream, peer, serial)) => {
                tracing::info!(server = %target, peer = %peer.addr, name = peer.name, "connected to ferry serve");
                let (closed_tx, closed_rx) = oneshot::channel();
                let up = std::time::Instant::now();
                let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let stream = Cuttable { inner: stream, cut: cut.clone() };
                let (addr, name) = (peer.addr, peer.name.clone());
                if to_serve.send(Dialed { stream: Box::new(stream), peer, closed: closed_tx }).await.is_err() {
                    return;
                }
                let mut closed_rx = closed_rx;
                let mut recheck = tokio::time::interval(RECHECK);
                recheck.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = &mut closed_rx => break,
                        _ = recheck.tick() => {
                            // A server certificate revoked while its connection is up is cut
                            // (its next read or write fails), as a new one would be refused.
                            if let Some(why) = revoked_now(&files, &serial) {
                                tracing::warn!(server = %target, name, "cutting the connection to ferry serve: {why}");
                                telemetry.refused(addr, &name, "dial_out", &format!("ferry serve at {target}: {why}")).await;
                                cut.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
                // A good connection that ended: usually the server restarted or the network
                // blipped, for every agent at once. The first wait is spread over a few seconds
                // (not one), so they do not all come back in the same second.
                if up.elapsed() >= STABLE {
                    failures = AFTER_STABLE;
                }
                wait = retry_wait(failures, fastrand::f64());
                tracing::warn!(server = %target, "the connection to ferry serve closed; dialing again in {wait:.1?}");
            }
            Err(e) => {
                wait = retry_wait(failures, fastrand::f64());
                tracing::warn!(server = %target, "cannot connect to ferry serve: {e}; trying again in {wait:.1?}");
                if e.refused_by_us {
                    let addr = e.addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                    telemetry.refused(addr, &e.presented, "dial_out", &e.message).await;
                }
            }
        }
        failures = failures.saturating_add(1);
    }
}

/// Why a dial failed.
#[derive(Debug)]
pub struct DialError {
    message: String,
    /// The server's certificate was refused here (audited), as opposed to a network failure.
    refused_by_us: bool,
    addr: Option<SocketAddr>,
    presented: String,
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn net(message: String) -> DialError {
    DialError { message, refused_by_us: false, addr: None, presented: String::new() }
}

/// TCP, then TLS as the client with this host's agent certificate, checking the server's.
async fn dial(target: &Target, files: &TlsFiles) -> Result<(impl Io + 'static, PeerInfo, String), DialError> {
    let config = client_config(files, target).map_err(|e| net(format!("TLS setup: {e}")))?;
    let name = ServerName::try_from(target.host.clone()).map_err(|e| net(format!("{}: {e}", target.host)))?;
    let tcp = tokio::time::timeout(CONNECT, TcpStream::connect(target.endpoint()))
        .await
        .map_err(|_| net(format!("TCP connect to {target} timed out after {CONNECT:?}")))?
        .map_err(|e| net(format!("TCP connect to {target}: {e}")))?;
    let addr = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(CONNECT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| net(format!("TLS handshake with {target} timed out after {CONNECT:?}")))?;
    let tls = match handshake {
        Ok(tls) => tls,
        Err(e) => {
            let ours = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some_and(|e| {
                matches!(e, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
            });
            let message = describe(target, &e);
            return Err(DialError { message, refused_by_us: ours, addr, presented: target.host.clone() });
        }
    };
    let server =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| CertIdentity::from_der(c).ok());
    let serial = server.as_ref().map(|s| s.serial.clone()).unwrap_or_default();
    let peer = PeerInfo {
        addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], target.port))),
        name: server.as_ref().map(|s| s.name().to_string()).unwrap_or_default(),
        role: server.and_then(|s| s.role),
    };
    // The server judges our certificate after our side of the handshake is done: its verdict
    // is the first thing it sends (HTTP/2 frames, or an alert).
    use ferry_proto::first_bytes::{NoFirstBytes, first_bytes};
    let stream = first_bytes(tls, CONNECT).await.map_err(|e| match e {
        NoFirstBytes::Io(e) => net(describe(target, &e)),
        other => net(format!("ferry serve at {target}: {other}")),
    })?;
    Ok((stream, peer, serial))
}

/// How often a connection's server certificate is checked against `tls.revoked` again.
const RECHECK: Duration = Duration::from_secs(10);

/// Why the server certificate `serial` is refused now, if it is (`tls.revoked` read again).
fn revoked_now(files: &TlsFiles, serial: &str) -> Option<String> {
    let path = files.revoked.as_ref()?;
    match Revoked::load(path) {
        Ok(list) if list.contains(serial) => {
            Some(format!("its certificate (serial {serial}) is now listed in tls.revoked"))
        }
        Ok(_) => None,
        // A list that no longer reads keeps what was decided with the last good one.
        Err(e) => {
            tracing::warn!("cannot read tls.revoked again: {e}");
            None
        }
    }
}

/// A connection that fails every read and write once `cut` is set.
struct Cuttable<S> {
    inner: S,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl<S> Cuttable<S> {
    fn check(&self) -> std::io::Result<()> {
        if self.cut.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the server's certificate was revoked",
            ));
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Cuttable<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.check()?;
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Cuttable<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.check()?;
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A failed handshake in words: what was wrong with the server, or with us in its eyes.
fn describe(target: &Target, err: &std::io::Error) -> String {
    use rustls::Error as E;
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return format!("TLS handshake with {target}: {err}");
    };
    let why = match tls {
        E::InvalidCertificate(CertificateError::Other(o)) => o.0.to_string(),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "its certificate is not issued by this fleet's CA (unknown issuer)".into()
        }
        E::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }) => {
            format!("its certificate does not name {:?} (reissue it with --san {})", target.host, target.host)
        }
        E::InvalidCertificate(CertificateError::Revoked) => "its certificate is listed in tls.revoked".into(),
        E::InvalidCertificate(e) => format!("its certificate is refused: {e}"),
        E::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
            "it does not speak the agent protocol (no HTTP/2): is this its API port instead of its [server] dial_in_listen?".into()
        }
        E::AlertReceived(alert) => format!(
            "it refused this agent's certificate (alert {alert:?}): is this host marked \"dial-in\" in its fleet.toml, with a certificate of role agent from the fleet CA, not revoked there?"
        ),
        other => other.to_string(),
    };
    format!("ferry serve at {target}: {why}")
}

/// This host as a client of `ferry serve` at `target`: its agent certificate; the server's must
/// be the fleet CA's, of the coordinator role, name `target`'s host and not be revoked.
pub fn client_config(files: &TlsFiles, target: &Target) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in identity::load_certs(&files.ca).map_err(|e| e.to_string())? {
        roots.add(cert).map_err(|e| format!("fleet CA file {}: {e}", files.ca.display()))?;
    }
    let chain = identity::load_certs(&files.cert).map_err(|e| e.to_string())?;
    let key = identity::load_key(&files.key).map_err(|e| e.to_string())?;
    let revoked = match &files.revoked {
        Some(path) => Revoked::load(path)?,
        None => Revoked::default(),
    };
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
        .build()
        .map_err(|e| e.to_string())?;
    let verifier = Arc::new(ServerOnly { inner, revoked, target: target.to_string() });
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("agent certificate {} and key {}: {e}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The server's certificate is valid but is not a coordinator's.
#[derive(Debug, thiserror::Error)]
#[error(
    "its certificate ({name}) has {role}, not the coordinator role: only `ferry serve` with a coordinator certificate may command this agent"
)]
struct NotACoordinator {
    name: String,
    role: String,
}

/// The server's certificate is revoked.
#[derive(Debug, thiserror::Error)]
#[error("its certificate ({name}, serial {serial}) is listed in tls.revoked")]
struct RevokedServer {
    name: String,
    serial: String,
}

/// Chain and name by webpki (fleet CA only), then the coordinator role and the revocation list.
#[derive(Debug)]
struct ServerOnly {
    inner: Arc<WebPkiServerVerifier>,
    revoked: Revoked,
    target: String,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for ServerOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let peer = CertIdentity::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.revoked.contains(&peer.serial) {
            tracing::warn!(server = self.target, serial = peer.serial, "refused a revoked server certificate");
            return Err(other(RevokedServer { name: peer.name().to_string(), serial: peer.serial.clone() }));
        }
        if peer.role != Some(Role::Coordinator) {
            return Err(other(NotACoordinator {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_random_up_to_a_bound_that_doubles_to_a_ceiling() {
        assert_eq!(retry_wait(0, 0.0), Duration::ZERO);
        assert_eq!(retry_wait(0, 0.5), FIRST_RETRY / 2);
        assert_eq!(retry_wait(1, 0.5), FIRST_RETRY);
        assert_eq!(retry_wait(3, 0.999_999).as_secs(), 7);
        assert_eq!(retry_wait(5, 1.0), MAX_RETRY);
        assert_eq!(retry_wait(40, 1.0), MAX_RETRY, "no overflow after many failures");
    }
}
