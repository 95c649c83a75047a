//! The gRPC server: accept TCP, complete mTLS, hand authenticated connections to tonic.
//!
//! The accept loop owns the handshake (with a timeout) so that every refused peer is logged with
//! its address and the precise reason, and so that the service sees each caller's certificate
//! name ([`crate::service::PeerInfo`]) in its request extensions. Shutdown: stop accepting, refuse activations not
//! yet begun, wait for every activation in progress to end (they are bounded by their own unit,
//! hook and probe limits; systemd is told to extend its stop timeout meanwhile), let the other
//! in-flight requests finish (tonic's graceful shutdown), and give up on those after
//! `shutdown_grace`.
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ferry_proto::identity::CertIdentity;
use ferry_proto::v1::agent_server::AgentServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use crate::audit::AuditError;
use crate::config::AgentConfig;
use crate::service::{Activations, AgentService, PeerInfo};
use crate::telemetry::{Serving, Telemetry};
use crate::tls::{self, TlsError};

/// A connection whose TLS handshake (and so certificate check) has completed: one a coordinator
/// opened to `listen`, or one this agent dialed to a `ferry serve` (`crate::dial`).
pub struct AuthenticatedConn {
    inner: Box<dyn Io>,
    peer: PeerInfo,
    /// Dropped with the connection: tells the dialer it ended.
    _closed: Option<tokio::sync::oneshot::Sender<()>>,
}

pub use crate::dial::Io;

impl AuthenticatedConn {
    fn accepted(stream: TlsStream<TcpStream>, peer: PeerInfo) -> AuthenticatedConn {
        AuthenticatedConn { inner: Box::new(stream), peer, _closed: None }
    }

    /// A connection this agent dialed; its `closed` is dropped when it has been served.
    pub fn dialed(d: crate::dial::Dialed) -> AuthenticatedConn {
        AuthenticatedConn { inner: d.stream, peer: d.peer, _closed: Some(d.closed) }
    }
}

impl Connected for AuthenticatedConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for AuthenticatedConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AuthenticatedConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A connection the agent refused, kept for inspection (tests; operators have the audit log and
/// `ferry_agent_refused_connections_total`).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub peer: SocketAddr,
    pub reason: String,
}

/// The most recent refusals, bounded.
#[derive(Debug, Default, Clone)]
pub struct Refusals(Arc<Mutex<VecDeque<Refusal>>>);

impl Refusals {
    const KEEP: usize = 64;

    fn push(&self, r: Refusal) {
        // A poisoned lock only means another thread panicked while pushing; the data is still a
        // valid deque, so keep using it.
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == Self::KEEP {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// A snapshot, oldest first.
    pub fn list(&self) -> Vec<Refusal> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Signing(String),
    #[error("{0} (under the packaged unit the agent may write only in /var/lib/ferry and /srv)")]
    Audit(#[from] AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the SIGHUP handler (TLS reload): {source}")]
    Signal {
        #[source]
        source: io::Error,
    },
}

/// A bound, not yet serving agent. Binding first lets callers learn the port (tests bind :0).
pub struct Server {
    /// None: this host only dials out (`connect`).
    listener: Option<TcpListener>,
    tls: Arc<tls::LiveTls>,
    /// Registered at bind, before readiness: SIGHUP must never take the default action (exit).
    hangup: tokio::signal::unix::Signal,
    config: Arc<AgentConfig>,
    refusals: Refusals,
    telemetry: Arc<Telemetry>,
}

impl Server {
    /// Loads the TLS material, opens the audit log and binds the listen address. Nothing is
    /// served yet.
    pub async fn bind(config: AgentConfig) -> Result<Server, StartError> {
        let telemetry = Telemetry::new(&config)?;
        Server::bind_with(config, telemetry).await
    }

    /// [`Server::bind`] recording into `telemetry`.
    pub async fn bind_with(mut config: AgentConfig, telemetry: Arc<Telemetry>) -> Result<Server, StartError> {
        let tls = Arc::new(tls::live(&config.tls)?);
        config.load_trusted_keys().map_err(StartError::Signing)?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|source| StartError::Signal { source })?;
        // Staging leftovers of an earlier run are never resumed: a partial release must not
        // become visible, and the coordinator re-prepares anyway.
        for app in config.apps.keys() {
            if let Some(store) = config.store(app) {
                match store.recover() {
                    Ok(removed) if !removed.is_empty() => {
                        tracing::info!(app, ?removed, "removed leftovers of an earlier run")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(app, "cannot clean the release store: {e}"),
                }
            }
        }
        let listener = match config.listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?),
            None => None,
        };
        Ok(Server { listener, tls, hangup, config: Arc::new(config), refusals: Refusals::default(), telemetry })
    }

    /// The metrics and audit log this server records into.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// The validated config it serves.
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config.clone()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "this agent does not listen (agent.toml has only `connect`)",
            )),
        }
    }

    /// A handle to the refusal log, valid after `serve` starts.
    pub fn refusals(&self) -> Refusals {
        self.refusals.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight requests for up to
    /// `shutdown_grace`.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), tonic::transport::Error> {
        let Server { listener, tls, hangup, config, refusals, telemetry } = self;
        let _reloads = tokio::spawn(tls::watch(tls.clone(), hangup, shutdown.child_token()));
        telemetry.set_serving(Serving::Serving, listener.as_ref().and_then(|l| l.local_addr().ok()));
        let (tx, rx) = mpsc::channel::<AuthenticatedConn>(64);
        // Dialing out: one task per `ferry serve`, each keeping a connection open.
        let dialers = TaskTracker::new();
        let (dialed_tx, mut dialed) = mpsc::channel::<crate::dial::Dialed>(8);
        for target in config.connect_targets() {
            let (files, to_serve, telemetry, stop) =
                (config.tls.clone(), dialed_tx.clone(), telemetry.clone(), shutdown.child_token());
            dialers.spawn(crate::dial::keep_connected(target, files, to_serve, telemetry, stop));
        }
        drop(dialed_tx);
        let to_serve = tx.clone();
        dialers.spawn(async move {
            while let Some(d) = dialed.recv().await {
                if to_serve.send(AuthenticatedConn::dialed(d)).await.is_err() {
                    break;
                }
            }
        });
        dialers.close();
        // Holds the incoming stream open until tonic returns: if it ended when the accept loop
        // stops, tonic could finish without running its graceful shutdown (and STOPPING=1).
        let keep_incoming_open = tx.clone();
        let handshakes = TaskTracker::new();
        let accept_stop = shutdown.child_token();
        let stop_accepting = accept_stop.clone();
        let handshake_timeout = config.handshake_timeout;
        let accept_tracker = handshakes.clone();
        let handshake_telemetry = telemetry.clone();
        let slots = Arc::new(HandshakeSlots::default());
        let accept_loop = tokio::spawn(async move {
            let Some(listener) = listener else { return };
            loop {
                let Some((tcp, addr)) = accept(&listener, &accept_stop, "gRPC").await else { break };
                // Past the caps the connection is closed at once (no descriptor held through a
                // handshake timeout, no audit line: a flood is counted, not logged line by line).
                let Some(slot) = slots.enter(addr.ip()) else {
                    drop(tcp);
                    if handshake_telemetry.shed() {
                        tracing::warn!(
                            peer = %addr,
                            "too many TLS handshakes in progress (at most {MAX_HANDSHAKES} in all, {MAX_HANDSHAKES_PER_ADDR} from one address): closing new connections at once (counted in ferry_agent_refused_connections_total{{reason=\"busy\"}})"
                        );
                    }
                    continue;
                };
                // Small writes (handshake flights, h2 frames) must not wait for delayed ACKs:
                // with Nagle on, each connection paid ~40 ms before its first request.
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(peer = %addr, error = %e, "cannot set TCP_NODELAY");
                }
                let acceptor = (*tls.current()).clone();
                let tx = tx.clone();
                let refusals = refusals.clone();
                let telemetry = handshake_telemetry.clone();
                accept_tracker.spawn(async move {
                    let _slot = slot;
                    let (handshake, presented) =
                        tls::with_presented_name(tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))).await;
                    let presented = presented.unwrap_or_default();
                    match handshake {
                        Ok(Ok(stream)) => {
                            let id = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| CertIdentity::from_der(c).ok());
                            let name = id.as_ref().map(|id| id.name().to_string()).unwrap_or_default();
                            let role = id.and_then(|id| id.role);
                            tracing::debug!(peer = %addr, name, "accepted connection");
                            let peer = PeerInfo { addr, name, role };
                            let _ = tx.send(AuthenticatedConn::accepted(stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            let reason = tls::describe_handshake_error(&e);
                            tracing::warn!(peer = %addr, presented, "refused connection: {reason}");
                            telemetry.refused(addr, &presented, tls::refusal_kind(&e), &reason).await;
                            refusals.push(Refusal { peer: addr, reason });
                        }
                        Err(_) => {
                            let reason = format!("TLS handshake did not finish within {handshake_timeout:?}");
                            tracing::warn!(peer = %addr, presented, "refused connection: {reason}");
                            telemetry.refused(addr, &presented, "timeout", &reason).await;
                            refusals.push(Refusal { peer: addr, reason });
                        }
                    }
                });
            }
            accept_tracker.close();
        });

        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, io::Error>);
        let activations = Activations::default();
        let service = crate::peers::RoleGate::new(
            AgentServer::new(AgentService::with_activations(config.clone(), activations.clone(), telemetry.clone())),
            telemetry.clone(),
        );
        let grace = config.shutdown_grace;
        let stop = shutdown.clone();
        let refuse_new = activations.clone();
        let stopping = telemetry.clone();
        let serve = tonic::transport::Server::builder()
            // Pings find a coordinator, or a `ferry serve` this agent dialed, that went away.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            // An upload is one stream: with HTTP/2's 64 KiB default window the sender stalls on
            // every round trip. These let a fast link carry a few chunks in flight per stream.
            .initial_stream_window_size(Some(ferry_proto::HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(ferry_proto::HTTP2_CONNECTION_WINDOW))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                stop.cancelled().await;
                stopping.set_serving(Serving::Stopping, None);
                refuse_new.stop_new();
                // Said before tonic starts draining, so systemd knows at once.
                tracing::info!("shutting down: no new connections; finishing in-flight requests");
                crate::notify::stopping();
            });
        tokio::pin!(serve);
        // The grace period starts once the activations have ended: their response streams stay
        // open until then, so coordinators still connected get each activation's final event.
        let result = tokio::select! {
            r = &mut serve => r,
            _ = async {
                shutdown.cancelled().await;
                finish_activations(&activations).await;
                tokio::time::sleep(grace).await
            } => {
                tracing::warn!("in-flight requests did not finish within {grace:?} of shutdown; exiting anyway");
                Ok(())
            }
        };
        // tonic returns early when the coordinators of running activations have gone away: the
        // activations still run to their end.
        finish_activations(&activations).await;
        drop(keep_incoming_open);
        // Stop accepting even if tonic returned on its own; handshakes still running are dropped.
        stop_accepting.cancel();
        let _ = accept_loop.await;
        handshakes.close();
        dialers.wait().await;
        result
    }
}

/// TLS handshakes in progress at once, from anywhere; past it a new connection is closed at once.
pub const MAX_HANDSHAKES: usize = 256;
/// TLS handshakes in progress at once from one address: a flood from one source cannot take
/// every slot from the coordinator.
pub const MAX_HANDSHAKES_PER_ADDR: usize = 16;

/// The handshakes in progress, overall and by source (an IPv4 address, or an IPv6 /64: one
/// host can hold a whole /64).
#[derive(Debug, Default)]
pub struct HandshakeSlots {
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    total: usize,
    /// Sources with a handshake in progress (never one with none).
    by_source: HashMap<IpAddr, usize>,
}

/// The source a connection's slots are counted under.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !0xffff_ffff_ffff_ffff)),
        },
        v4 => v4,
    }
}

/// One handshake's slot, given back when dropped.
pub struct HandshakeSlot {
    slots: Arc<HandshakeSlots>,
    ip: IpAddr,
}

impl HandshakeSlots {
    /// A slot for a handshake from `ip`, or `None` when the agent already runs
    /// [`MAX_HANDSHAKES`] in all or [`MAX_HANDSHAKES_PER_ADDR`] from `ip`.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<HandshakeSlot> {
        let ip = source(ip);
        let mut s = self.slots.lock().ok()?;
        if s.total >= MAX_HANDSHAKES || s.by_source.get(&ip).is_some_and(|n| *n >= MAX_HANDSHAKES_PER_ADDR) {
            return None;
        }
        s.total += 1;
        *s.by_source.entry(ip).or_default() += 1;
        Some(HandshakeSlot { slots: self.clone(), ip })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.by_source.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.by_source.remove(&self.ip);
                }
            }
        }
    }
}

/// The next connection on `listener`, or `None` once `stop` is cancelled. Errors (EMFILE and
/// friends) are logged and retried after a short pause instead of spinning.
pub(crate) async fn accept(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// How often, while activations are still running at shutdown, systemd hears about it.
const STOP_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest the agent waits for activations at shutdown; past it, it exits anyway (a wedged
/// activation must not make the agent unstoppable).
const MAX_ACTIVATION_WAIT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Refuses new activations and waits for the running ones, telling systemd (status text and a
/// longer stop timeout) while it waits.
async fn finish_activations(activations: &Activations) {
    activations.stop_new();
    let started = tokio::time::Instant::now();
    while activations.in_progress() > 0 {
        if started.elapsed() >= MAX_ACTIVATION_WAIT {
            tracing::error!(
                running = activations.in_progress(),
                "activations still running {MAX_ACTIVATION_WAIT:?} after shutdown began; exiting anyway \
                 (check the app's hooks and units on this host)"
            );
            return;
        }
        let status = format!(
            "stopping: waiting for {} activation(s) in progress to finish before exiting",
            activations.in_progress()
        );
        tracing::info!("{status}");
        crate::notify::still_stopping(STOP_REPORT_EVERY * 3, &status);
        tokio::select! {
            _ = activations.finished() => {}
            _ = tokio::time::sleep(STOP_REPORT_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_slots_cap_each_source_and_leave_nothing_behind() {
        let slots = Arc::new(HandshakeSlots::default());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let held: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_ADDR).filter_map(|_| slots.enter(a)).collect();
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_ADDR);
        assert!(slots.enter(a).is_none(), "past the per-source cap");
        assert!(slots.enter("10.0.0.2".parse().expect("ip")).is_some(), "another source gets in");
        // One IPv6 /64 is one source; its IPv4-mapped form is the IPv4 address.
        let v6: Vec<HandshakeSlot> = (0..MAX_HANDSHAKES_PER_ADDR as u16)
            .filter_map(|i| slots.enter(IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, i + 1))))
            .collect();
        assert_eq!(v6.len(), MAX_HANDSHAKES_PER_ADDR);
        assert!(slots.enter("fd00:0:0:1::ffff".parse().expect("ip")).is_none(), "the same /64");
        assert!(slots.enter("::ffff:10.0.0.1".parse().expect("ip")).is_none(), "the same IPv4 host");
        drop((held, v6));
        // Refused sources and ended handshakes leave no entry behind.
        for i in 0..1000u32 {
            let _ = slots.enter(IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i)));
        }
        let s = slots.slots.lock().expect("lock");
        assert_eq!((s.total, s.by_source.len()), (0, 0));
    }
}
