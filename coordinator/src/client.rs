//! Connections to agents: TCP with a timeout, TLS with the per-host identity check, then a tonic
//! channel over that one stream. Every failure is classified into a [`HostError`] whose message
//! names the host, its address, what failed and what to check.
//!
//! With TLS 1.3 the agent's verdict on *our* certificate arrives after the handshake, at the first
//! read: the connector waits for the agent's first bytes (see `confirm_accepted`), and
//! [`Agent::connect`] probes with `GetStatus` before calling a host reachable.
use std::time::Duration;

use ferry_proto::v1::agent_client::AgentClient;
use ferry_proto::v1::{GetStatusRequest, HostStatus};
use hyper_util::rt::TokioIo;
use rustls::{AlertDescription, CertificateError};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::Host;
use crate::tls::{ClientTls, IdentityMismatch, NotAnAgent};

/// Why a host could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Name resolution failed.
    Resolve,
    /// Nothing listens at the address (connection refused).
    Refused,
    /// No answer in time (host down, network cut, firewall dropping).
    Timeout,
    /// Network unreachable, reset, or another transport failure.
    Network,
    /// TLS failed: a certificate was not trusted, expired, or refused by the other side.
    Tls,
    /// The agent's certificate is valid but for another host or role.
    Identity,
    /// The peer answered but not as a ferry agent (plaintext, another protocol).
    Protocol,
    /// A host that dials in is not connected (or this is not the `ferry serve` it dials).
    NotConnected,
    /// The agent answered the request with an error.
    Rpc,
    /// The release failed on the host, which went back to its previous release (healthy).
    RolledBack,
    /// The release failed on the host and it could not restore a healthy release.
    Failed,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Resolve => "resolve",
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Network => "network",
            ErrorKind::Tls => "tls",
            ErrorKind::Identity => "identity",
            ErrorKind::Protocol => "protocol",
            ErrorKind::NotConnected => "not_connected",
            ErrorKind::Rpc => "rpc",
            ErrorKind::RolledBack => "rolled_back",
            ErrorKind::Failed => "failed",
        }
    }
}

/// A host that could not be reached, authenticated or asked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("host {host} ({endpoint}): {message}")]
pub struct HostError {
    pub host: String,
    pub endpoint: String,
    pub kind: ErrorKind,
    /// The cause and, where there is one, what to check.
    pub message: String,
}

impl HostError {
    pub fn new(host: &Host, kind: ErrorKind, message: impl Into<String>) -> HostError {
        HostError { host: host.name.clone(), endpoint: host.endpoint(), kind, message: message.into() }
    }

    /// Whether the host could not be reached or authenticated (exit code 3), as opposed to an
    /// agent that answered with an error.
    pub fn is_unreachable(&self) -> bool {
        !matches!(self.kind, ErrorKind::Rpc | ErrorKind::RolledBack | ErrorKind::Failed)
    }
}

/// Timeouts for talking to agents.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

/// How often an idle or streaming connection is pinged, and how long a ping may go unanswered.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A request with a deadline, for unary calls (status, prepare, list).
pub fn unary<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

/// `req` carrying the coordinator's fencing epoch (none for epoch 0: agents take that as the
/// lowest, which any epoch they have seen fences out).
pub fn fenced<T>(mut req: tonic::Request<T>, epoch: i64) -> tonic::Request<T> {
    if epoch > 0
        && let Ok(v) = epoch.to_string().parse()
    {
        req.metadata_mut().insert("ferry-epoch", v);
    }
    req
}

/// A connected, authenticated agent.
pub struct Agent {
    pub host: Host,
    pub client: AgentClient<Channel>,
    /// Deadline for unary requests (fleet.toml `request_timeout`).
    pub request_timeout: Duration,
    /// What the agent said when probed at connect time.
    pub status: HostStatus,
}

/// Failure inside our connector; travels through tonic's error chain and is recovered by
/// [`classify`].
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("resolving {0} gave no address")]
    NoAddress(String),
    #[error("TCP connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("TCP connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the agent closed the connection right after the TLS handshake")]
    ClosedAfterHandshake,
}

/// Waits for the agent's first bytes after the handshake ([`ferry_proto::first_bytes`]): with
/// TLS 1.3, a refusal of our certificate arrives only then.
async fn confirm_accepted<S>(tls: S, limit: Duration) -> Result<ferry_proto::first_bytes::Replay<S>, ConnectError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use ferry_proto::first_bytes::{NoFirstBytes, first_bytes};
    first_bytes(tls, limit).await.map_err(|e| match e {
        NoFirstBytes::Timeout(limit) => ConnectError::HandshakeTimeout(limit),
        NoFirstBytes::Io(e) => ConnectError::Handshake(e),
        NoFirstBytes::Closed => ConnectError::ClosedAfterHandshake,
    })
}

impl Agent {
    /// Connects to `host`, completes mTLS and probes the agent with `GetStatus`. A host that
    /// dials in is taken from its connection to this `ferry serve` instead.
    pub async fn connect(host: &Host, tls: &ClientTls, timeouts: Timeouts) -> Result<Agent, HostError> {
        if host.dials_in() {
            return Agent::dialed_in(host, tls, timeouts).await;
        }
        let endpoint_str = host.endpoint();
        let err = |kind, message: String| HostError::new(host, kind, message);
        let (config, server_name) =
            tls.config_for(host).map_err(|e| err(ErrorKind::Tls, format!("cannot set up TLS for this host: {e}")))?;
        let connector = TlsConnector::from(config);
        let target = endpoint_str.clone();
        let connect = timeouts.connect;
        let channel = Endpoint::from_shared(format!("http://{endpoint_str}"))
            .map_err(|e| err(ErrorKind::Resolve, format!("invalid address: {e}")))?
            // Our connector times TCP connect and TLS handshake separately (to say which hung);
            // tonic's limit is only a backstop behind both.
            .connect_timeout(timeouts.connect * 3)
            // No channel-wide deadline: uploads and activations (restarts, probes) may honestly
            // take long. Unary calls carry their own deadline (`unary`); a dead or frozen agent is
            // found by HTTP/2 keepalive pings, which only a live agent process answers.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .initial_stream_window_size(Some(ferry_proto::HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(ferry_proto::HTTP2_CONNECTION_WINDOW))
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let connector = connector.clone();
                let server_name = server_name.clone();
                let target = target.clone();
                async move {
                    let addr = tokio::net::lookup_host(&target)
                        .await
                        .map_err(|e| ConnectError::Resolve(target.clone(), e))?
                        .next()
                        .ok_or_else(|| ConnectError::NoAddress(target.clone()))?;
                    let tcp = tokio::time::timeout(connect, TcpStream::connect(addr))
                        .await
                        .map_err(|_| ConnectError::ConnectTimeout(connect))?
                        .map_err(ConnectError::Connect)?;
                    let _ = tcp.set_nodelay(true);
                    let tls = tokio::time::timeout(connect, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| ConnectError::HandshakeTimeout(connect))?
                        .map_err(ConnectError::Handshake)?;
                    Ok::<_, ConnectError>(TokioIo::new(confirm_accepted(tls, connect).await?))
                }
            }))
            .await
            .map_err(|e| classify(host, &e))?;
        let mut client = AgentClient::new(channel);
        let status = probe(&mut client, timeouts.request).await.map_err(|e| classify_status(host, &e))?;
        Ok(Agent { host: host.clone(), client, status, request_timeout: timeouts.request })
    }
}

impl Agent {
    async fn dialed_in(host: &Host, tls: &ClientTls, timeouts: Timeouts) -> Result<Agent, HostError> {
        let Some(dial_ins) = tls.dial_ins() else {
            return Err(HostError::new(
                host,
                ErrorKind::NotConnected,
                "dials in to ferry serve (fleet.toml: \"dial-in\"): only the server it connects to can reach it; run this with --server URL (the CLI does by itself, to [server] advertise, for deploy, rollback, promote, resume and status)",
            ));
        };
        let channel = dial_ins.channel(&host.name).map_err(|why| HostError::new(host, ErrorKind::NotConnected, why))?;
        let mut client = AgentClient::new(channel);
        let status = probe(&mut client, timeouts.request).await.map_err(|e| classify_status(host, &e))?;
        Ok(Agent { host: host.clone(), client, status, request_timeout: timeouts.request })
    }
}

async fn probe(client: &mut AgentClient<Channel>, timeout: Duration) -> Result<HostStatus, tonic::Status> {
    match tokio::time::timeout(timeout, client.get_status(unary(GetStatusRequest {}, timeout))).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer to GetStatus within {timeout:?}"))),
    }
}

/// Classifies a failed request: a transport cause if there is one, else the agent's answer.
pub fn classify_status(host: &Host, status: &tonic::Status) -> HostError {
    let mut e = classify(host, status);
    if e.kind == ErrorKind::Rpc {
        if status.code() == tonic::Code::DeadlineExceeded {
            e.kind = ErrorKind::Timeout;
            e.message = format!("no answer in time: {}", status.message());
        } else if status.code() == tonic::Code::Unauthenticated {
            // Past the handshake, but not a certificate this agent takes commands from.
            e.kind = ErrorKind::Tls;
            e.message = format!("the agent refused this certificate: {}", status.message());
        } else {
            e.message = format!("the agent answered {:?}: {}", status.code(), status.message());
        }
    }
    e
}

/// Finds the root cause of a transport or RPC failure and words it for an operator.
pub fn classify(host: &Host, err: &(dyn std::error::Error + 'static)) -> HostError {
    let mk = |kind, message: String| HostError::new(host, kind, message);
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return match c {
                ConnectError::Resolve(..) | ConnectError::NoAddress(_) => mk(ErrorKind::Resolve, c.to_string()),
                ConnectError::ConnectTimeout(_) => {
                    mk(ErrorKind::Timeout, format!("{c} (is the host up, and is the port open through firewalls?)"))
                }
                ConnectError::HandshakeTimeout(_) => mk(
                    ErrorKind::Timeout,
                    format!(
                        "{c} (something accepts TCP there but does not complete TLS: an agent overloaded by a connection flood, or not a ferry-agent)"
                    ),
                ),
                ConnectError::Connect(io) => io_error(host, io),
                ConnectError::ClosedAfterHandshake => mk(
                    ErrorKind::Protocol,
                    format!("{c} (an agent that refuses a client says why with an alert; is this a ferry-agent?)"),
                ),
                ConnectError::Handshake(io) => match io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(tls) => tls_error(host, tls),
                    None if matches!(
                        io.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                    {
                        mk(
                            ErrorKind::Protocol,
                            format!(
                                "the agent dropped the connection during the TLS handshake without a word ({io}): a ferry-agent does that while too many handshakes are in progress (a connection flood: its ferry_agent_refused_connections_total{{reason=\"busy\"}} counts them); retry, and check who floods it"
                            ),
                        )
                    }
                    None => mk(
                        ErrorKind::Protocol,
                        format!("TLS handshake failed: {io} (is a ferry-agent with TLS listening there?)"),
                    ),
                },
            };
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return tls_error(host, tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return tls_error(host, tls);
            }
            // h2 keeps only the kind and text of an I/O error, so a TLS alert that arrives after
            // the handshake (TLS 1.3 client-certificate refusals) is recovered from its text.
            if let Some(alert) = alert_in_text(&io.to_string()) {
                return tls_error(host, &rustls::Error::AlertReceived(alert));
            }
            return io_error(host, io);
        }
        cur = e.source();
    }
    mk(ErrorKind::Rpc, err.to_string())
}

fn io_error(host: &Host, io: &std::io::Error) -> HostError {
    use std::io::ErrorKind as K;
    let (kind, message) = match io.kind() {
        K::ConnectionRefused => (
            ErrorKind::Refused,
            format!("connection refused (is ferry-agent running and listening on port {}?)", host.port),
        ),
        K::TimedOut => (ErrorKind::Timeout, "connection timed out (is the host up and reachable?)".to_string()),
        K::ConnectionReset | K::BrokenPipe | K::UnexpectedEof => (
            ErrorKind::Protocol,
            format!("the connection was closed by the peer ({io}): is it a ferry-agent speaking TLS?"),
        ),
        K::HostUnreachable | K::NetworkUnreachable => (ErrorKind::Network, format!("{io} (check routing to the host)")),
        _ => (ErrorKind::Network, io.to_string()),
    };
    HostError::new(host, kind, message)
}

fn tls_error(host: &Host, tls: &rustls::Error) -> HostError {
    use rustls::Error as E;
    let mk = |kind, message: String| HostError::new(host, kind, message);
    match tls {
        E::InvalidCertificate(CertificateError::Other(o)) => {
            let inner: &(dyn std::error::Error + 'static) = &*o.0;
            if inner.downcast_ref::<IdentityMismatch>().is_some() || inner.downcast_ref::<NotAnAgent>().is_some() {
                mk(ErrorKind::Identity, format!("TLS: {inner}"))
            } else {
                mk(ErrorKind::Tls, format!("TLS: the agent's certificate is invalid: {inner}"))
            }
        }
        E::InvalidCertificate(CertificateError::UnknownIssuer) => mk(
            ErrorKind::Tls,
            "TLS: the agent's certificate is not signed by the fleet CA (unknown issuer): was it issued with this fleet's `ferry cert issue`?".into(),
        ),
        #[allow(deprecated)]
        E::InvalidCertificate(CertificateError::BadSignature) => mk(
            ErrorKind::Tls,
            "TLS: the agent's certificate signature does not verify against the fleet CA (issued by another CA of the same name?)".into(),
        ),
        E::InvalidCertificate(c) => mk(ErrorKind::Tls, format!("TLS: the agent's certificate is invalid: {c}")),
        E::AlertReceived(alert) => mk(ErrorKind::Tls, format!("TLS: {}", refused_by_agent(*alert))),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => mk(
            ErrorKind::Protocol,
            format!("TLS: the peer does not speak TLS as expected ({tls}): is a ferry-agent listening there?"),
        ),
        other => mk(ErrorKind::Tls, format!("TLS: {other}")),
    }
}

/// Parses rustls's "received fatal alert: <Alert>" text back into the alert.
fn alert_in_text(text: &str) -> Option<AlertDescription> {
    let name = text.split("received fatal alert: ").nth(1)?.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    const KNOWN: &[AlertDescription] = &[
        AlertDescription::UnknownCA,
        AlertDescription::CertificateExpired,
        AlertDescription::AccessDenied,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::CertificateRevoked,
        AlertDescription::CertificateUnknown,
        AlertDescription::BadCertificate,
        AlertDescription::DecryptError,
        AlertDescription::CertificateRequired,
        AlertDescription::ProtocolVersion,
        AlertDescription::HandshakeFailure,
    ];
    KNOWN.iter().copied().find(|a| format!("{a:?}") == name)
}

/// What an alert from the agent means: the agent refused *our* certificate.
fn refused_by_agent(alert: AlertDescription) -> String {
    let why = match alert {
        AlertDescription::UnknownCA => {
            "it is not signed by the CA the agent trusts (is the agent using this fleet's ca.pem?)"
        }
        AlertDescription::CertificateExpired => "it has expired or is not yet valid (renew it with `ferry cert renew`)",
        AlertDescription::AccessDenied => {
            "it does not carry the coordinator role (issue one with `ferry cert issue --role coordinator`)"
        }
        AlertDescription::UnsupportedCertificate => "it is not valid for client authentication",
        AlertDescription::CertificateRevoked => {
            "it is revoked: its serial number is in the agent's tls.revoked list (use another certificate, or `ferry cert renew` it)"
        }
        AlertDescription::BadCertificate | AlertDescription::DecryptError => {
            "it is malformed or its signature is invalid"
        }
        AlertDescription::CertificateRequired => "we presented none",
        AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
            return format!("the agent could not agree on TLS parameters (alert {alert:?}); both sides need TLS 1.3");
        }
        other => return format!("the agent aborted the handshake (alert {other:?})"),
    };
    format!("the agent refused our certificate: {why}")
}
