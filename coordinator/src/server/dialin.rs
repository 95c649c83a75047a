//! `[server] dial_in_listen`: where agents that dial in connect ([`crate::dialin`]).
//!
//! TLS 1.3 with the API's certificate (which must name the address the agents dial); the agent
//! must present a certificate of the fleet CA with the agent role, for a host fleet.toml marks
//! `"dial-in"`, not listed in `[tls] revoked`. Anything else is refused in the handshake, so the
//! agent hears it as an alert, and audited (sampled) in the API audit log. At most
//! [`MAX_HANDSHAKES`] handshakes run at once: a reconnect storm waits in the kernel's backlog.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_proto::identity::{self, CertIdentity, Role};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AuditLine, Shared};
use crate::config::FleetConfig;

/// Handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 256;
/// ...from one address (an IPv4 address, or an IPv6 /64): one source cannot take every slot
/// from the fleet's agents.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The hosts of fleet.toml that dial in, in every environment.
pub fn dial_in_hosts(config: &FleetConfig) -> BTreeSet<String> {
    config
        .environments
        .keys()
        .filter_map(|env| config.hosts(env).ok())
        .flatten()
        .filter(|h| h.dials_in())
        .map(|h| h.name)
        .collect()
}

/// The TLS of `dial_in_listen`: the API's certificate; agents of fleet.toml's dial-in hosts only.
pub fn acceptor(
    config: &FleetConfig,
    revoked: Arc<super::auth::RevokedFile>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let cert_path = config.server.cert.clone().unwrap_or_else(|| config.tls.cert.clone());
    let key_path = config.server.key.clone().unwrap_or_else(|| config.tls.key.clone());
    let chain = identity::load_certs(&cert_path)?;
    let key = identity::load_key(&key_path)?;
    let mut roots = RootCertStore::empty();
    for cert in identity::load_certs(&config.tls.ca)? {
        roots.add(cert).with_context(|| format!("fleet CA {}", config.tls.ca.display()))?;
    }
    let provider = crate::tls::provider();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client certificate verifier")?;
    let verifier = Arc::new(DialInAgents { inner, hosts: dial_in_hosts(config), revoked });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!("certificate {} and key {} do not belong together", cert_path.display(), key_path.display())
        })?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Takes agents' connections on `listener` until `stop`.
pub async fn run(state: Shared, listener: tokio::net::TcpListener, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let sources = Sources::default();
    let tasks = TaskTracker::new();
    while let Some((slot, tcp, addr)) =
        super::next_connection(&listener, &slots, &stop, "[server] dial_in_listen").await
    {
        let Some(source) = Source::enter(&sources, addr.ip()) else {
            // Closed unanswered: a flood from one place is not worth a line each.
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = state.tls.current().dial_in.clone() else { break };
        let state = state.clone();
        tasks.spawn(async move {
            let _source = source;
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            let why = match handshake {
                Ok(Ok(stream)) => {
                    let id = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| CertIdentity::from_der(c).ok());
                    let (name, serial) = id.map(|id| (id.name().to_string(), id.serial.clone())).unwrap_or_default();
                    match state.dial_ins.add(&name, &serial, addr, stream).await {
                        Ok(_) => {
                            tracing::info!(host = name, %addr, "agent dialed in");
                            drop(slot);
                            return;
                        }
                        Err(e) => format!("{name}: HTTP/2 over its connection failed: {e}"),
                    }
                }
                Ok(Err(e)) => format!("dial-in TLS handshake refused: {}", describe(&e)),
                Err(_) => format!("dial-in TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}"),
            };
            drop(slot);
            tracing::warn!(%addr, "{why}");
            state.audit_refusal(Some(addr), AuditLine::unanswered("DIAL-IN", &why)).await;
        });
    }
    tasks.close();
}

/// Handshakes in progress by source.
type Sources = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// A handshake in progress from one source, counted until dropped.
struct Source {
    map: Sources,
    key: std::net::IpAddr,
}

impl Source {
    fn enter(map: &Sources, ip: std::net::IpAddr) -> Option<Source> {
        let key = match ip {
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        };
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Source { map: map.clone(), key })
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// A refused handshake in words: our reason, where the verifier gave one.
fn describe(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) => o.0.to_string(),
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            "the agent's certificate is not issued by this fleet's CA (unknown issuer)".into()
        }
        Some(rustls::Error::NoCertificatesPresented) => "the client presented no certificate".into(),
        Some(rustls::Error::InvalidMessage(_)) => "the client does not speak TLS".into(),
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)) => {
            "the agent does not trust this server's CA (is its agent.toml tls.ca another fleet's?)".into()
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!(
                "the agent refused this server's certificate (alert {alert:?}): it must name the address the agent dials, carry the coordinator role, and not be in the agent's tls.revoked"
            )
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// Why an agent's certificate is refused here.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("certificate {name} has {role}, not the agent role")]
    NotAnAgent { name: String, role: String },
    #[error("certificate {name} is for no host that fleet.toml marks \"dial-in\"")]
    UnknownHost { name: String },
    #[error("certificate {name} (serial {serial}) is listed in [tls] revoked")]
    Revoked { name: String, serial: String },
}

/// Chain by webpki (fleet CA only, the clientAuth purpose), then role, host and revocation.
#[derive(Debug)]
struct DialInAgents {
    inner: Arc<dyn ClientCertVerifier>,
    hosts: BTreeSet<String>,
    revoked: Arc<super::auth::RevokedFile>,
}

impl ClientCertVerifier for DialInAgents {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let peer = CertIdentity::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let name = peer.name().to_string();
        let refused = if peer.role != Some(Role::Agent) {
            Some(Refused::NotAnAgent { name, role: peer.role.map_or("no ferry role".into(), |r| format!("role {r}")) })
        } else if self.revoked.contains(&peer.serial) {
            Some(Refused::Revoked { name, serial: peer.serial.clone() })
        } else if !self.hosts.contains(&name) {
            Some(Refused::UnknownHost { name })
        } else {
            None
        };
        match refused {
            Some(r) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))),
            None => Ok(verified),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_capped_per_source_and_counted_back_down() {
        let map = Arc::default();
        let one: std::net::IpAddr = "203.0.113.5".parse().expect("ip");
        let held: Vec<Source> = (0..MAX_HANDSHAKES_PER_SOURCE).filter_map(|_| Source::enter(&map, one)).collect();
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_SOURCE);
        assert!(Source::enter(&map, one).is_none(), "one more from the same address waits");
        assert!(Source::enter(&map, "203.0.113.6".parse().expect("ip")).is_some(), "another address does not");
        // One IPv6 /64 is one source.
        let v6: Vec<Source> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .filter_map(|i| Source::enter(&map, format!("2001:db8:1:2::{:x}", i + 1).parse().expect("ip")))
            .collect();
        assert_eq!(v6.len(), MAX_HANDSHAKES_PER_SOURCE);
        assert!(Source::enter(&map, "2001:db8:1:2:ffff::1".parse().expect("ip")).is_none());
        drop(held);
        assert!(Source::enter(&map, one).is_some(), "slots come back when handshakes end");
        drop(v6);
        assert_eq!(map.lock().map(|m| m.len()).unwrap_or(99), 0, "nothing left behind");
    }
}
