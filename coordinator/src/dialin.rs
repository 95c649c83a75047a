//! Agents that dial in: hosts marked `"dial-in"` in fleet.toml (`hosts = { web-1 = "dial-in" }`)
//! connect to `ferry serve` themselves (agent.toml `connect`), for fleets where the coordinator
//! cannot open a connection to them (NAT, other networks, no inbound port by policy).
//!
//! On such a connection the agent is the TLS client but the HTTP/2 *server*: `ferry serve` sends
//! the requests, over a tonic channel built on the connection, so every command of the agent
//! contract runs exactly as when the coordinator dials (the same `Agent` of the client module over either).
//! [`DialIns`] holds the connected hosts by name; a host that connects again replaces its old
//! connection, and a connection that ends (HTTP/2 pings unanswered for [`PING_TIMEOUT`], the
//! agent gone) leaves the table at once, so the host is unreachable, with when it was last seen.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::registry::{now_ms, when};

pub use crate::config::DIAL_IN;
/// How often `ferry serve` pings a dialed-in agent, and how long a ping may go unanswered: a
/// host that stops answering is unreachable within both.
/// (A request's own deadline, `request_timeout`, usually finds a silent host first.) The
/// timeout leaves room for a ping queued behind an upload on a slow link.
pub const PING_INTERVAL: Duration = Duration::from_secs(3);
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected host as `ferry status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DialInInfo {
    /// The agent's address as the server sees it (after any NAT).
    pub addr: String,
    /// When this connection came up (RFC 3339).
    pub connected_since: String,
    /// When the agent last sent anything (an answer, a ping's reply).
    pub last_seen: String,
}

/// Whether a certificate serial is revoked.
type RevokedCheck = dyn Fn(&str) -> bool + Send + Sync;

/// The hosts connected to this `ferry serve`, by name.
#[derive(Clone, Default)]
pub struct DialIns(Arc<Table>);

#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<String, Conn>>,
    /// Whether a certificate serial is revoked now (`[tls] revoked`, re-read as it changes): a
    /// connection whose certificate is revoked after it came up is cut at its next use.
    revoked: Option<Box<RevokedCheck>>,
    /// When each host's last connection ended, and why.
    gone: Mutex<HashMap<String, (i64, String)>>,
    generation: AtomicU64,
}

struct Conn {
    channel: Channel,
    /// The agent certificate's serial.
    serial: String,
    addr: SocketAddr,
    since_ms: i64,
    seen_ms: Arc<AtomicI64>,
    generation: u64,
}

impl std::fmt::Debug for DialIns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialIns").field("connected", &self.connected()).finish()
    }
}

impl DialIns {
    /// A table whose connections are cut once `revoked` says their certificate's serial is.
    pub fn new(revoked: impl Fn(&str) -> bool + Send + Sync + 'static) -> DialIns {
        DialIns(Arc::new(Table { revoked: Some(Box::new(revoked)), ..Table::default() }))
    }

    /// How many hosts are connected.
    pub fn connected(&self) -> usize {
        self.0.conns.lock().map_or(0, |c| c.len())
    }

    /// `host`'s channel, or why there is none.
    pub fn channel(&self, host: &str) -> Result<Channel, String> {
        let found = self
            .0
            .conns
            .lock()
            .ok()
            .and_then(|c| c.get(host).map(|c| (c.channel.clone(), c.serial.clone(), c.generation)));
        if let Some((channel, serial, generation)) = found {
            if self.0.revoked.as_ref().is_some_and(|revoked| revoked(&serial)) {
                let why = format!("its certificate (serial {serial}) is listed in [tls] revoked");
                DialIns::ended(&self.0, host, generation, &why);
                return Err(format!("dials in, and its connection was cut: {why}"));
            }
            return Ok(channel);
        }
        let gone = self.0.gone.lock().ok().and_then(|g| g.get(host).cloned());
        Err(match gone {
            Some((at, why)) => format!("dials in, and is not connected to this ferry serve since {} ({why})", when(at)),
            None => "dials in, and has not connected to this ferry serve since it started: is agent.toml's `connect` set to this server's dial_in_listen, and the agent running?".into(),
        })
    }

    /// `host`'s connection, if it has one.
    pub fn info(&self, host: &str) -> Option<DialInInfo> {
        let conns = self.0.conns.lock().ok()?;
        let c = conns.get(host)?;
        Some(DialInInfo {
            addr: c.addr.to_string(),
            connected_since: when(c.since_ms),
            last_seen: when(c.seen_ms.load(Ordering::Relaxed)),
        })
    }

    /// Makes the client side of HTTP/2 over `stream`, a connection `host`'s agent opened (its
    /// certificate checked), and keeps it as that host's connection (replacing an older one).
    pub async fn add<S>(
        &self,
        host: &str,
        serial: &str,
        addr: SocketAddr,
        stream: S,
    ) -> Result<Channel, tonic::transport::Error>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let generation = self.0.generation.fetch_add(1, Ordering::Relaxed);
        let seen_ms = Arc::new(AtomicI64::new(now_ms()));
        let watched = Watched {
            inner: stream,
            seen_ms: seen_ms.clone(),
            _gone: Gone { table: Arc::downgrade(&self.0), host: host.to_string(), generation },
        };
        let once = Mutex::new(Some(TokioIo::new(watched)));
        // The URI is not dialed: the connector hands over the connection the agent opened, once.
        let channel = Endpoint::from_static("http://dial-in.invalid")
            .http2_keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(ferry_proto::HTTP2_STREAM_WINDOW))
            .initial_connection_window_size(Some(ferry_proto::HTTP2_CONNECTION_WINDOW))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let io = once.lock().ok().and_then(|mut io| io.take());
                async move {
                    io.ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the agent's connection ended; it dials in again by itself",
                        )
                    })
                }
            }))
            .await?;
        let conn = Conn {
            channel: channel.clone(),
            serial: serial.to_string(),
            addr,
            since_ms: now_ms(),
            seen_ms,
            generation,
        };
        // A newer connection of the host (one that finished its setup first) stays.
        let mut conn = Some(conn);
        let old = self.0.conns.lock().ok().and_then(|mut conns| match conns.get(host) {
            Some(newer) if newer.generation > generation => None,
            _ => conns.insert(host.to_string(), conn.take()?),
        });
        if let Some(old) = &old {
            // Dropped (outside the lock) with its channel, which closes it.
            let how = if old.addr.ip() == addr.ip() {
                "again".to_string()
            } else {
                format!(
                    "from {addr}, no longer from {}: is its certificate on two machines, or two `connect` entries for this server?",
                    old.addr
                )
            };
            tracing::warn!(host, "connected {how}; the previous connection is closed");
        }
        drop((old, conn));
        if let Ok(mut gone) = self.0.gone.lock() {
            gone.remove(host);
        }
        Ok(channel)
    }

    /// Forgets `host`'s connection if it is still `generation` (a newer one stays).
    fn ended(table: &Table, host: &str, generation: u64, why: &str) {
        let Ok(mut conns) = table.conns.lock() else { return };
        if conns.get(host).is_some_and(|c| c.generation == generation) {
            conns.remove(host);
            tracing::warn!(host, "dialed-in agent disconnected: {why}");
            if let Ok(mut gone) = table.gone.lock() {
                gone.insert(host.to_string(), (now_ms(), why.to_string()));
            }
        }
    }
}

/// Takes the host out of the table when its connection is dropped (h2 gave up on it).
struct Gone {
    table: Weak<Table>,
    host: String,
    generation: u64,
}

impl Drop for Gone {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            DialIns::ended(&table, &self.host, self.generation, "the connection ended");
        }
    }
}

/// The agent's connection, noting when it last sent anything.
struct Watched<S> {
    inner: S,
    seen_ms: Arc<AtomicI64>,
    _gone: Gone,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.seen_ms.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
