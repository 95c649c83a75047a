//! Peer fetch: the hosts of a fleet fetch a release's chunks from each other instead of each
//! getting every byte from the coordinator, which tells each host which peers hold what.
//!
//! - Serving ([`serve_chunks`]): `GetChunks` answers with chunks of the app's committed releases,
//!   each read back and checked against its hash first; at most `peer_uploads` peers at once,
//!   all of them paced together to `peer_upload_mbit` ([`Pacer`]).
//! - Who may ask ([`RoleGate`]): an agent certificate may call `GetChunks` and nothing else;
//!   every other RPC needs the coordinator role. A refusal is audited.
//! - Fetching ([`fetch`]): `FetchFromPeers` connects to each named peer with this host's own
//!   certificate (the peer's must name the address the coordinator gave), asks for its share,
//!   and hands every chunk to the stage's upload, which checks it by hash like an uploaded one.
//!   A chunk a peer did not send, or sent wrong, stays missing: the coordinator uploads it.
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferry_proto::identity::Role;
use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use crate::audit::Entry;
use crate::store::{ChunkReader, Upload};
use crate::telemetry::Telemetry;

/// Who is on the other end of a connection, as its verified certificate says (the server puts it
/// in each request's extensions).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: std::net::SocketAddr,
    /// The certificate's name (common name), e.g. the coordinator's `ferry cert issue --name`.
    pub name: String,
    /// The certificate's ferry role: a coordinator, or another agent (peer fetch only:
    /// [`RoleGate`]).
    pub role: Option<ferry_proto::identity::Role>,
}

/// The one RPC another agent may call.
pub const PEER_RPC: &str = "/ferry.agent.v1.Agent/GetChunks";
/// Hashes one `GetChunks` may ask for.
pub const MAX_HASHES: usize = 4096;
/// How long connecting to a peer (TCP and TLS) may take.
const CONNECT: Duration = Duration::from_secs(5);
/// How long a peer may go without sending a chunk.
const STALL: Duration = Duration::from_secs(30);

/// Lets agent-role peers call [`PEER_RPC`] only; every other RPC needs the coordinator role.
#[derive(Clone)]
pub struct RoleGate<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

impl<S> RoleGate<S> {
    pub fn new(inner: S, telemetry: Arc<Telemetry>) -> RoleGate<S> {
        RoleGate { inner, telemetry }
    }
}

impl<S: NamedService> NamedService for RoleGate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for RoleGate<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let role = peer.as_ref().and_then(|p| p.role);
        let path = req.uri().path().to_string();
        if role == Some(Role::Coordinator) || (role == Some(Role::Agent) && path == PEER_RPC) {
            return Box::pin(self.inner.call(req));
        }
        let telemetry = self.telemetry.clone();
        Box::pin(async move {
            let rpc = path.rsplit('/').next().unwrap_or(&path).to_string();
            let status = Status::unauthenticated(format!(
                "{rpc} needs a coordinator certificate; this one has role {} (an agent certificate may call GetChunks only)",
                role.map_or("none", Role::as_str)
            ));
            let mut e = match &peer {
                Some(p) => Entry::new(&rpc, &p.name, &p.addr.to_string()),
                None => Entry::new(&rpc, "", ""),
            };
            tracing::warn!(peer = e.peer, rpc, "refused: {}", status.message());
            e.result = "error: unauthenticated".into();
            e.detail = status.message().to_string();
            telemetry.audit(e).await;
            Ok(status.into_http())
        })
    }
}

/// Paces the bytes of every peer upload to one shared rate: each chunk waits for its slot, the
/// slots following each other at the rate.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: f64,
    /// When the next chunk's slot begins.
    next: std::sync::Mutex<std::time::Instant>,
}

impl Pacer {
    /// A pacer for `mbit` Mbit/s, or none for 0 (no limit).
    pub fn new(mbit: u64) -> Option<Pacer> {
        (mbit > 0).then(|| Pacer {
            bytes_per_sec: mbit as f64 * 1e6 / 8.0,
            next: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    /// Books `bytes` at `now`: how long to wait before sending them.
    pub fn reserve(&self, now: std::time::Instant, bytes: usize) -> Duration {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        // Time not used (no upload) is not saved up: a slot begins no earlier than now.
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        start - now
    }
}

pub type ChunkStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ContentChunk, Status>> + Send>>;

/// Streams the chunks of `hashes` this host keeps (zstd-compressed), reading and checking each
/// in a blocking task; the permit (one of `peer_uploads`) is held until the stream ends, and each
/// chunk waits for its slot on `pacer` (`peer_upload_mbit`).
pub fn serve_chunks(
    reader: ChunkReader,
    hashes: Vec<Vec<u8>>,
    permit: tokio::sync::OwnedSemaphorePermit,
    pacer: Option<Arc<Pacer>>,
) -> ChunkStream {
    let (tx, rx) = mpsc::channel::<Result<v1::ContentChunk, Status>>(4);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        crate::failpoint::hit("peer-serve");
        let corrupt = crate::failpoint::armed("peer-corrupt");
        let half = crate::failpoint::armed("peer-drop").then_some(hashes.len() / 2);
        // One compression context for the stream: making one per chunk costs more than the
        // compression itself.
        let mut zstd = zstd::bulk::Compressor::new(1).ok();
        for (n, hash) in hashes.into_iter().enumerate() {
            if half == Some(n) {
                let gone = Status::unavailable("failpoint peer-drop: this peer went away mid-transfer");
                let _ = tx.blocking_send(Err(gone));
                break;
            }
            let Some(mut raw) = reader.read(&hash) else { continue };
            if corrupt && let Some(b) = raw.first_mut() {
                *b ^= 0xff;
            }
            let chunk = match zstd.as_mut().map(|z| z.compress(&raw)) {
                Some(Ok(z)) if z.len() < raw.len() => v1::ContentChunk {
                    hash,
                    raw_length: raw.len() as u64,
                    compression: v1::Compression::Zstd as i32,
                    data: z,
                    ..Default::default()
                },
                _ => v1::ContentChunk {
                    hash,
                    raw_length: raw.len() as u64,
                    compression: v1::Compression::None as i32,
                    data: raw,
                    ..Default::default()
                },
            };
            if let Some(pacer) = &pacer {
                std::thread::sleep(pacer.reserve(std::time::Instant::now(), chunk.data.len()));
            }
            if tx.blocking_send(Ok(chunk)).is_err() {
                break;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What fetching from the peers did.
#[derive(Debug, Default)]
pub struct Fetched {
    pub chunks: u64,
    pub bytes: u64,
    pub failures: Vec<v1::PeerFailure>,
}

/// Fetches each source's share into `upload` (peers concurrently; chunks stored one at a time)
/// and hands the upload back with what came.
pub async fn fetch(
    tls: Arc<rustls::ClientConfig>,
    app: &str,
    sources: Vec<v1::PeerSource>,
    upload: Upload,
) -> Result<(Upload, Fetched), Status> {
    let (tx, mut rx) = mpsc::channel::<(usize, v1::ContentChunk)>(8);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, source) in sources.iter().enumerate() {
        let (tls, app, source, tx) = (tls.clone(), app.to_string(), source.clone(), tx.clone());
        tasks.spawn(async move { (i, from_peer(tls, &app, &source, i, &tx).await) });
    }
    drop(tx);
    let mut fetched = Fetched::default();
    let mut got = vec![0u64; sources.len()];
    let mut bad: Vec<Option<String>> = vec![None; sources.len()];
    let mut upload = Some(upload);
    while let Some((i, chunk)) = rx.recv().await {
        let Some(mut up) = upload.take() else { break };
        let wire = chunk.data.len() as u64;
        let (up, stored) = tokio::task::spawn_blocking(move || {
            let r = up.put(&chunk);
            (up, r)
        })
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?;
        upload = Some(up);
        match stored {
            Ok(()) => {
                got[i] += 1;
                fetched.chunks += 1;
                fetched.bytes += wire;
            }
            // A wrong chunk (its hash, its length) is the peer's fault: it is reported, and the
            // chunk stays missing for the coordinator to send.
            Err(e) => {
                tracing::warn!(peer = sources[i].host, "peer sent a bad chunk: {e}");
                bad[i].get_or_insert_with(|| format!("sent a chunk that failed its check: {e}"));
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        let Ok((i, result)) = done else { continue };
        let missing = (sources[i].hashes.len() as u64).saturating_sub(got[i]);
        let reason = match (result, bad[i].take()) {
            (_, Some(bad)) => bad,
            (Err(e), None) => e,
            (Ok(()), None) if missing > 0 => "does not have them".into(),
            (Ok(()), None) => continue,
        };
        fetched.failures.push(v1::PeerFailure { host: sources[i].host.clone(), reason, chunks_missing: missing });
    }
    let upload = upload.ok_or_else(|| Status::internal("the upload was lost"))?;
    Ok((upload, fetched))
}

/// One peer's share: connects, asks, forwards each chunk as it comes.
async fn from_peer(
    tls: Arc<rustls::ClientConfig>,
    app: &str,
    source: &v1::PeerSource,
    i: usize,
    tx: &mpsc::Sender<(usize, v1::ContentChunk)>,
) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from(source.server_name.clone())
        .map_err(|e| format!("{:?} is not a name to check its certificate against: {e}", source.server_name))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let target = source.endpoint.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| format!("{target}: {e}"))?
        .connect_timeout(CONNECT * 2)
        .initial_stream_window_size(Some(ferry_proto::HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(ferry_proto::HTTP2_CONNECTION_WINDOW))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
            async move {
                let tcp = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(&target))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
                let _ = tcp.set_nodelay(true);
                let tls = tokio::time::timeout(CONNECT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to {}: {}", source.endpoint, ferry_proto::text::error_chain(&e)))?;
    let mut client = AgentClient::new(channel);
    let req = v1::GetChunksRequest { app: app.to_string(), hashes: source.hashes.clone() };
    let mut stream = client.get_chunks(req).await.map_err(|s| format!("GetChunks: {}", s.message()))?.into_inner();
    loop {
        match tokio::time::timeout(STALL, stream.message()).await {
            Err(_) => return Err(format!("sent nothing for {} s", STALL.as_secs())),
            Ok(Err(s)) => return Err(format!("GetChunks: {}", s.message())),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(chunk))) => {
                if tx.send((i, chunk)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn no_limit_makes_no_pacer() {
        assert!(Pacer::new(0).is_none());
    }

    #[test]
    fn chunks_follow_each_other_at_the_rate_and_idle_time_is_not_saved_up() {
        // 8 Mbit/s: a million bytes a second.
        let pacer = Pacer::new(8).expect("a pacer");
        let t0 = Instant::now();
        assert_eq!(pacer.reserve(t0, 500_000), Duration::ZERO, "the first chunk goes at once");
        assert_eq!(pacer.reserve(t0, 250_000), Duration::from_millis(500), "the next after the first's half second");
        // Two streams booking at the same instant queue behind each other.
        assert_eq!(pacer.reserve(t0, 250_000), Duration::from_millis(750));
        // After an idle while, the next chunk goes at once, but does not get a burst: the one
        // after it waits its turn.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(pacer.reserve(later, 1_000_000), Duration::ZERO);
        assert_eq!(pacer.reserve(later, 1), Duration::from_secs(1));
    }
}
