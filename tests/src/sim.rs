//! The fleet simulator: N lightweight agents in this process that speak the real agent contract
//! (the `ferry.agent.v1` gRPC service) over real mutual TLS, each at its own address with its own
//! certificate from the fleet CA, and keep their releases in memory (which chunks each holds, not
//! their content). The coordinator cannot tell them from real agents, so it can be measured at
//! fleet scale on one machine (`ferry-bench fleet-sim`). It is a bench tool, not a replacement
//! for the real-fleet tests.
//!
//! Against a real agent:
//! - `Prepare` answers which chunks the agent lacks (whole manifest, or changes from a release it
//!   keeps), with the manifest hash checked; `Upload` checks every chunk (decompressed, blake3)
//!   and counts the bytes on the wire. Chunks are dropped once checked.
//! - `FetchFromPeers` takes a stage's chunks from the peers named, in memory: a peer gives only
//!   chunks of releases it committed, to at most [`PEER_UPLOADS`] hosts at once (busy beyond),
//!   and the bytes count as peer bytes. No TLS between simulated agents, and no time passes.
//! - `Commit` refuses a stage that lacks a chunk; `Activate` and `Rollback` switch `current` at
//!   once (no units, hooks or probes): healthy.
//! - `GetChunks` is not served (no content is kept).
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ferry_proto::v1::{self, agent_server::Agent, agent_server::AgentServer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::pki::TestPki;

/// Hosts one simulated agent serves chunks to at once (a real agent's default `peer_uploads`).
pub const PEER_UPLOADS: usize = 4;
/// Releases an agent keeps (older ones are forgotten).
const KEEP: usize = 3;

/// Where the agents listen.
#[derive(Debug, Clone, Copy)]
pub enum Listen {
    /// Each agent has a listener of its own on 127.0.0.1, on a port the kernel picks.
    Ports,
    /// One listener on 0.0.0.0:`port` for every agent; agent `i` is [`shared_address`]`(i)`.
    /// One descriptor instead of N (a process may hold only so many), but it takes every address
    /// of the machine: only for a network namespace of the caller's own.
    Shared(u16),
}

/// Agent `i`'s address with [`Listen::Shared`]: 127.1.0.1, 127.1.0.2, …, 250 to a /24.
pub fn shared_address(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::new(127, (1 + i / 62_500) as u8, ((i / 250) % 250) as u8, (i % 250 + 1) as u8)
}

/// What the agents saw, for the bench's figures.
#[derive(Debug, Default)]
pub struct Counters {
    /// Upload bytes on the wire (compressed), from the coordinator.
    pub uploaded: AtomicU64,
    /// Bytes the agents took from each other.
    pub from_peers: AtomicU64,
    /// Connections that completed mTLS.
    pub connections: AtomicU64,
    /// Connections refused at the handshake (wrong CA, wrong role, timeout).
    pub refused: AtomicU64,
    /// Peer asks refused because the peer served [`PEER_UPLOADS`] hosts already.
    pub busy: AtomicU64,
    /// Connections the agents dialed to a `ferry serve` ([`SimFleet::dial`]) that it took.
    pub dialed: AtomicU64,
    /// Dials that failed (refused, nothing listening, handshake).
    pub dial_failures: AtomicU64,
}

/// A release as the agents keep it: its manifest and its chunks (hash → length).
struct SimRelease {
    id: String,
    version: String,
    manifest: v1::Manifest,
    manifest_hash: Vec<u8>,
    chunks: HashMap<Vec<u8>, u64>,
    created_unix: i64,
}

struct Stage {
    release: Arc<SimRelease>,
    /// Chunks it lacked at Prepare and has not received yet.
    missing: HashSet<Vec<u8>>,
}

#[derive(Default)]
struct Held {
    /// Committed, oldest first.
    releases: Vec<Arc<SimRelease>>,
    current: Option<String>,
    previous: Option<String>,
    stages: HashMap<String, Stage>,
}

impl Held {
    fn release(&self, id: &str) -> Option<Arc<SimRelease>> {
        self.releases.iter().find(|r| r.id == id).cloned()
    }

    fn holds(&self, hash: &[u8]) -> bool {
        self.releases.iter().any(|r| r.chunks.contains_key(hash))
    }
}

struct SimAgent {
    name: String,
    held: Mutex<Held>,
    serving: Arc<tokio::sync::Semaphore>,
}

/// The simulated agents of one fleet.
struct Sim {
    app: String,
    agents: Vec<SimAgent>,
    /// Listening address → agent.
    by_addr: HashMap<SocketAddr, usize>,
    counters: Arc<Counters>,
    stages: AtomicU64,
}

/// A running simulated fleet; stopped on drop.
pub struct SimFleet {
    sim: Arc<Sim>,
    /// Each agent's inventory name and address, in order.
    pub hosts: Vec<(String, SocketAddr)>,
    pub counters: Arc<Counters>,
    /// Each agent's certificate files (for dialing out).
    files: Vec<ferry_agent::config::TlsFiles>,
    /// Where connections go to be served (accepted and dialed alike).
    to_serve: tokio::sync::mpsc::Sender<Conn>,
    stop: CancellationToken,
}

/// The agent `request` came in to.
#[derive(Debug, Clone, Copy)]
struct AgentIndex(usize);

struct Conn {
    inner: Box<dyn ferry_agent::dial::Io>,
    agent: usize,
    /// For a connection an agent dialed: dropped with it, which tells the agent to dial again.
    _closed: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Connected for Conn {
    type ConnectInfo = AgentIndex;
    fn connect_info(&self) -> AgentIndex {
        AgentIndex(self.agent)
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl SimFleet {
    /// Starts `n` agents named `sim-00001`… managing `app`, each with a certificate of its own
    /// from `pki` (issued here: one per agent, naming it and its address).
    pub async fn start(pki: &TestPki, n: usize, app: &str, listen: Listen) -> Result<SimFleet, String> {
        let mut listeners = Vec::new();
        let mut addrs = Vec::with_capacity(n);
        match listen {
            Listen::Ports => {
                for _ in 0..n {
                    let l = TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
                    addrs.push(l.local_addr().map_err(|e| e.to_string())?);
                    listeners.push(l);
                }
            }
            Listen::Shared(port) => {
                let l = TcpListener::bind(("0.0.0.0", port)).await.map_err(|e| format!("bind 0.0.0.0:{port}: {e}"))?;
                listeners.push(l);
                addrs.extend((0..n).map(|i| SocketAddr::from((shared_address(i), port))));
            }
        }
        let mut configs = Vec::with_capacity(n);
        let mut all_files = Vec::with_capacity(n);
        let mut hosts = Vec::with_capacity(n);
        for (i, addr) in addrs.iter().enumerate() {
            let name = format!("sim-{:05}", i + 1);
            let files = pki.issue(&name, ferry_proto::identity::Role::Agent, &[&addr.ip().to_string()]);
            let tls = ferry_agent::config::TlsFiles { ca: files.ca, cert: files.cert, key: files.key, revoked: None };
            let config = ferry_agent::tls::server_config(&tls).map_err(|e| format!("{name}: {e}"))?;
            configs.push(tokio_rustls::TlsAcceptor::from(config));
            all_files.push(tls);
            hosts.push((name, *addr));
        }
        let counters = Arc::new(Counters::default());
        let sim = Arc::new(Sim {
            app: app.to_string(),
            agents: hosts
                .iter()
                .map(|(name, _)| SimAgent {
                    name: name.clone(),
                    held: Mutex::new(Held::default()),
                    serving: Arc::new(tokio::sync::Semaphore::new(PEER_UPLOADS)),
                })
                .collect(),
            by_addr: addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect(),
            counters: counters.clone(),
            stages: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(256);
        let configs = Arc::new(configs);
        for listener in listeners {
            tokio::spawn(accept(listener, sim.clone(), configs.clone(), tx.clone(), stop.clone()));
        }
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, io::Error>);
        let service = AgentServer::new(Service(sim.clone()));
        let stopped = stop.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .initial_stream_window_size(Some(ferry_proto::HTTP2_STREAM_WINDOW))
                .initial_connection_window_size(Some(ferry_proto::HTTP2_CONNECTION_WINDOW))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped.cancelled())
                .await;
            if let Err(e) = served {
                eprintln!("simulated agents: {e}");
            }
        });
        Ok(SimFleet { sim, hosts, counters, files: all_files, to_serve: tx, stop })
    }

    /// Every agent also dials `server` (a `ferry serve`'s `dial_in_listen`, whose certificate
    /// names its IP) from its own address, keeps the connection, and dials again when it ends,
    /// waiting as a real agent does ([`ferry_agent::dial::retry_wait`]).
    pub fn dial(&self, server: SocketAddr) -> Result<(), String> {
        let target = ferry_agent::config::DialTarget { host: server.ip().to_string(), port: server.port() };
        for (i, files) in self.files.iter().enumerate() {
            let config = ferry_agent::dial::client_config(files, &target)?;
            // From a loopback address of its own (all of 127/8 is local), as a host would.
            let source = shared_address(i);
            let (sim, to_serve, stop) = (self.sim.clone(), self.to_serve.clone(), self.stop.clone());
            tokio::spawn(dial_loop(sim, i, config, (source, server), to_serve, stop));
        }
        Ok(())
    }

    /// The release `current` points at on agent `i` ("" before the first).
    pub fn current(&self, i: usize) -> String {
        self.sim.agents[i].held.lock().map(|h| h.current.clone().unwrap_or_default()).unwrap_or_default()
    }

    /// The inventory lines of fleet.toml's `hosts` table: `sim-00001 = "127.1.0.1:7443"`, ….
    pub fn hosts_toml(&self) -> String {
        self.hosts.iter().map(|(n, a)| format!("{n} = \"{a}\"")).collect::<Vec<_>>().join(", ")
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts connections for the agents behind `listener`: mTLS with the agent's own certificate
/// (the one its address belongs to), then into the shared gRPC server.
async fn accept(
    listener: TcpListener,
    sim: Arc<Sim>,
    configs: Arc<Vec<tokio_rustls::TlsAcceptor>>,
    tx: tokio::sync::mpsc::Sender<Conn>,
    stop: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors, most likely: say so, and let the coordinator's retry or
                    // timeout show it.
                    eprintln!("simulated agents: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Some(&agent) = tcp.local_addr().ok().and_then(|a| sim.by_addr.get(&a)) else { continue };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tx, counters) = (configs[agent].clone(), tx.clone(), sim.counters.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(std::time::Duration::from_secs(30), acceptor.accept(tcp)).await {
                Ok(Ok(inner)) => {
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Conn { inner: Box::new(inner), agent, _closed: None }).await;
                }
                _ => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

/// Agent `agent`'s connection to `server`, from `source`, kept up until `stop`.
async fn dial_loop(
    sim: Arc<Sim>,
    agent: usize,
    config: Arc<rustls::ClientConfig>,
    (source, server): (Ipv4Addr, SocketAddr),
    to_serve: tokio::sync::mpsc::Sender<Conn>,
    stop: CancellationToken,
) {
    use ferry_agent::dial::retry_wait;
    let counters = sim.counters.clone();
    let mut failures = 0u32;
    let mut wait = retry_wait(0, fastrand::f64()) / 4;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match dial_once(&config, source, server).await {
            Ok(stream) => {
                counters.dialed.fetch_add(1, Ordering::Relaxed);
                failures = 0;
                let (closed, ended) = tokio::sync::oneshot::channel();
                if to_serve.send(Conn { inner: Box::new(stream), agent, _closed: Some(closed) }).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ended => {}
                }
            }
            Err(_) => {
                counters.dial_failures.fetch_add(1, Ordering::Relaxed);
                failures = failures.saturating_add(1);
            }
        }
        wait = retry_wait(failures, fastrand::f64());
    }
}

/// TCP from `source`, mTLS as the client, and the server's first bytes (its verdict on us).
async fn dial_once(
    config: &Arc<rustls::ClientConfig>,
    source: Ipv4Addr,
    server: SocketAddr,
) -> Result<impl ferry_agent::dial::Io + 'static, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::from((source, 0))).map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = socket.connect(server).await.map_err(|e| format!("connect {server}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::from(server.ip());
    let limit = std::time::Duration::from_secs(30);
    let tls = tokio::time::timeout(limit, tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    ferry_proto::first_bytes::first_bytes(tls, limit).await.map_err(|e| e.to_string())
}

struct Service(Arc<Sim>);

type Steps = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::StepEvent, Status>> + Send>>;
type Chunks = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ContentChunk, Status>> + Send>>;

fn finished(outcome: v1::Outcome, release_id: String, previous: String, cause: String) -> Response<Steps> {
    let event = v1::StepEvent {
        state: v1::StepState::Succeeded as i32,
        r#final: Some(v1::Final {
            outcome: outcome as i32,
            release_id,
            previous_release_id: previous,
            cause,
            units: Vec::new(),
        }),
        ..Default::default()
    };
    Response::new(Box::pin(tokio_stream::iter([Ok(event)])))
}

impl Service {
    fn agent<T>(&self, request: &Request<T>) -> Result<&SimAgent, Status> {
        let i =
            request.extensions().get::<AgentIndex>().ok_or_else(|| Status::internal("no agent for this connection"))?;
        self.0.agents.get(i.0).ok_or_else(|| Status::internal("no such agent"))
    }

    fn check_app(&self, app: &str) -> Result<(), Status> {
        if app != self.0.app {
            return Err(Status::not_found(format!("app {app:?} is not managed by this agent")));
        }
        Ok(())
    }
}

fn held(agent: &SimAgent) -> Result<std::sync::MutexGuard<'_, Held>, Status> {
    agent.held.lock().map_err(|_| Status::internal("agent state poisoned"))
}

/// Activate or Rollback to `id`: the switch, as the coordinator sees it.
fn switch(agent: &SimAgent, id: &str) -> Result<Response<Steps>, Status> {
    let mut h = held(agent)?;
    if h.release(id).is_none() {
        let cause = format!("release {id} is not kept on this host");
        return Ok(finished(v1::Outcome::Failed, h.current.clone().unwrap_or_default(), String::new(), cause));
    }
    if h.current.as_deref() == Some(id) {
        let previous = h.previous.clone().unwrap_or_default();
        return Ok(finished(v1::Outcome::Unchanged, id.to_string(), previous, String::new()));
    }
    h.previous = h.current.replace(id.to_string());
    let previous = h.previous.clone().unwrap_or_default();
    Ok(finished(v1::Outcome::Healthy, id.to_string(), previous, String::new()))
}

#[tonic::async_trait]
impl Agent for Service {
    async fn get_status(&self, request: Request<v1::GetStatusRequest>) -> Result<Response<v1::HostStatus>, Status> {
        let agent = self.agent(&request)?;
        let h = held(agent)?;
        let current = h.current.as_deref().and_then(|id| h.release(id));
        Ok(Response::new(v1::HostStatus {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            agent_name: agent.name.clone(),
            hostname: agent.name.clone(),
            os: "ferry fleet simulator".into(),
            kernel: String::new(),
            uptime_secs: 1,
            cpu_count: 1,
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 1 << 29,
            data_dir: "/sim".into(),
            data_dir_free_bytes: 1 << 40,
            data_dir_total_bytes: 1 << 41,
            apps: vec![v1::AppStatus {
                name: self.0.app.clone(),
                root: "/sim/app".into(),
                current_release: h.current.clone().unwrap_or_default(),
                current_version: current.map(|r| r.version.clone()).unwrap_or_default(),
                releases_kept: h.releases.len() as u32,
                units: Vec::new(),
                activation_unfinished: false,
            }],
        }))
    }

    async fn list_releases(
        &self,
        request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        self.check_app(&request.get_ref().app)?;
        let h = held(self.agent(&request)?)?;
        let releases = h
            .releases
            .iter()
            .rev()
            .map(|r| v1::Release {
                id: r.id.clone(),
                version: r.version.clone(),
                manifest_hash: r.manifest_hash.clone(),
                created_unix: r.created_unix,
                size_bytes: r.chunks.values().sum(),
                current: h.current.as_deref() == Some(&r.id),
                previous: h.previous.as_deref() == Some(&r.id),
            })
            .collect();
        Ok(Response::new(v1::ListReleasesResponse { releases }))
    }

    async fn prepare(&self, request: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
        let agent = self.agent(&request)?;
        let req = request.into_inner();
        self.check_app(&req.app)?;
        let manifest = match (req.manifest, req.delta) {
            (Some(m), _) => m,
            (None, Some(delta)) => {
                let base = held(agent)?.release(&req.base_release).ok_or_else(|| {
                    Status::failed_precondition(format!("base release {} is not kept here", req.base_release))
                })?;
                ferry_proto::manifest::apply_delta(&base.manifest, &delta)
                    .map_err(|e| Status::failed_precondition(format!("the changes do not apply: {e}")))?
            }
            (None, None) => return Err(Status::invalid_argument("refused: no manifest and no changes")),
        };
        ferry_proto::manifest::validate(&manifest).map_err(|e| Status::invalid_argument(format!("refused: {e}")))?;
        let hash = ferry_proto::manifest::hash(&manifest);
        if hash.as_slice() != req.manifest_hash.as_slice() {
            return Err(Status::invalid_argument("refused: manifest hash mismatch"));
        }
        let id = ferry_proto::manifest::release_id(&req.version, &hash);
        let mut h = held(agent)?;
        if h.release(&id).is_some() {
            return Ok(Response::new(v1::PrepareResponse {
                already_present: true,
                release_id: id,
                ..Default::default()
            }));
        }
        let chunks: HashMap<Vec<u8>, u64> =
            manifest.entries.iter().flat_map(|e| e.chunks.iter().map(|c| (c.hash.clone(), c.length))).collect();
        let missing: HashSet<Vec<u8>> = chunks.keys().filter(|c| !h.holds(c)).cloned().collect();
        let missing_bytes = missing.iter().map(|c| chunks.get(c).copied().unwrap_or(0)).sum();
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let release = Arc::new(SimRelease {
            id: id.clone(),
            version: req.version,
            manifest,
            manifest_hash: hash.to_vec(),
            chunks,
            created_unix,
        });
        let stage_id = format!("stage-{}", self.0.stages.fetch_add(1, Ordering::Relaxed));
        let missing_chunks = missing.iter().cloned().collect();
        h.stages.insert(stage_id.clone(), Stage { release, missing });
        Ok(Response::new(v1::PrepareResponse {
            stage_id,
            missing_chunks,
            missing_bytes,
            already_present: false,
            release_id: id,
            bases: Vec::new(),
        }))
    }

    async fn upload(
        &self,
        request: Request<tonic::Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        use v1::upload_request::Msg;
        let agent = self.agent(&request)?;
        let mut stream = request.into_inner();
        let Some(Msg::Start(start)) = stream.message().await?.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument("an upload must begin with a start message"));
        };
        self.check_app(&start.app)?;
        let (mut chunks, mut bytes) = (0u64, 0u64);
        while let Some(msg) = stream.message().await? {
            match msg.msg {
                Some(Msg::Chunk(c)) => {
                    let wire = c.data.len() as u64;
                    let raw = if c.compression == v1::Compression::Zstd as i32 {
                        let cap =
                            usize::try_from(c.raw_length.min(u64::from(ferry_proto::manifest::CHUNK_MAX))).unwrap_or(0);
                        zstd::bulk::decompress(&c.data, cap)
                            .map_err(|e| Status::invalid_argument(format!("chunk does not decompress: {e}")))?
                    } else {
                        c.data
                    };
                    if !c.basis.is_empty() || blake3::hash(&raw).as_bytes().as_slice() != c.hash.as_slice() {
                        return Err(Status::invalid_argument("a chunk failed its check"));
                    }
                    let mut h = held(agent)?;
                    let stage = h
                        .stages
                        .get_mut(&start.stage_id)
                        .ok_or_else(|| Status::not_found(format!("no stage {}", start.stage_id)))?;
                    stage.missing.remove(&c.hash);
                    chunks += 1;
                    bytes += wire;
                    self.0.counters.uploaded.fetch_add(wire, Ordering::Relaxed);
                }
                Some(Msg::Finish(_)) => break,
                _ => return Err(Status::invalid_argument("unexpected message in an upload")),
            }
        }
        Ok(Response::new(v1::UploadResponse { chunks_received: chunks, bytes_received: bytes }))
    }

    type CommitStream = Steps;
    async fn commit(&self, request: Request<v1::CommitRequest>) -> Result<Response<Steps>, Status> {
        let agent = self.agent(&request)?;
        let req = request.into_inner();
        self.check_app(&req.app)?;
        let mut h = held(agent)?;
        let stage =
            h.stages.remove(&req.stage_id).ok_or_else(|| Status::not_found(format!("no stage {}", req.stage_id)))?;
        if !stage.missing.is_empty() {
            let cause = format!("the stage lacks {} chunk(s)", stage.missing.len());
            return Ok(finished(v1::Outcome::Failed, String::new(), String::new(), cause));
        }
        let id = stage.release.id.clone();
        if h.release(&id).is_none() {
            h.releases.push(stage.release);
        }
        // Keep the newest, and whatever is current or previous.
        while h.releases.len() > KEEP {
            let keep = |r: &SimRelease| h.current.as_deref() == Some(&r.id) || h.previous.as_deref() == Some(&r.id);
            let Some(old) = h.releases.iter().position(|r| !keep(r) && r.id != id) else { break };
            h.releases.remove(old);
        }
        Ok(finished(v1::Outcome::Committed, id, String::new(), String::new()))
    }

    type ActivateStream = Steps;
    async fn activate(&self, request: Request<v1::ActivateRequest>) -> Result<Response<Steps>, Status> {
        self.check_app(&request.get_ref().app)?;
        switch(self.agent(&request)?, &request.get_ref().release_id)
    }

    type RollbackStream = Steps;
    async fn rollback(&self, request: Request<v1::RollbackRequest>) -> Result<Response<Steps>, Status> {
        self.check_app(&request.get_ref().app)?;
        let agent = self.agent(&request)?;
        let to = match request.get_ref().to_release.as_str() {
            "" => held(agent)?.previous.clone().ok_or_else(|| Status::failed_precondition("no previous release"))?,
            id => id.to_string(),
        };
        switch(agent, &to)
    }

    type GetChunksStream = Chunks;
    async fn get_chunks(&self, _: Request<v1::GetChunksRequest>) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("the fleet simulator keeps no chunk content"))
    }

    async fn fetch_from_peers(
        &self,
        request: Request<v1::FetchFromPeersRequest>,
    ) -> Result<Response<v1::FetchFromPeersResponse>, Status> {
        let agent = self.agent(&request)?;
        let req = request.into_inner();
        self.check_app(&req.app)?;
        let mut got: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut out = v1::FetchFromPeersResponse::default();
        for source in &req.sources {
            let fail = |reason: &str| v1::PeerFailure {
                host: source.host.clone(),
                reason: reason.to_string(),
                chunks_missing: source.hashes.len() as u64,
            };
            let Some(peer) = source.endpoint.parse::<SocketAddr>().ok().and_then(|a| self.0.by_addr.get(&a)) else {
                out.failures.push(fail("cannot connect: not an agent of this simulation"));
                out.still_missing.extend(source.hashes.iter().cloned());
                continue;
            };
            let peer = &self.0.agents[*peer];
            let Ok(_permit) = peer.serving.clone().try_acquire_owned() else {
                self.0.counters.busy.fetch_add(1, Ordering::Relaxed);
                out.failures.push(fail("GetChunks: busy"));
                out.still_missing.extend(source.hashes.iter().cloned());
                continue;
            };
            let ph = held(peer)?;
            let mut missing = 0;
            for hash in &source.hashes {
                match ph.releases.iter().find_map(|r| r.chunks.get(hash)) {
                    Some(len) => got.push((hash.clone(), *len)),
                    None => {
                        missing += 1;
                        out.still_missing.push(hash.clone());
                    }
                }
            }
            if missing > 0 {
                out.failures.push(v1::PeerFailure {
                    host: source.host.clone(),
                    reason: "does not have them".into(),
                    chunks_missing: missing,
                });
            }
        }
        let mut h = held(agent)?;
        let stage =
            h.stages.get_mut(&req.stage_id).ok_or_else(|| Status::not_found(format!("no stage {}", req.stage_id)))?;
        for (hash, len) in got {
            if stage.missing.remove(&hash) {
                out.chunks += 1;
                out.bytes += len;
            }
        }
        self.0.counters.from_peers.fetch_add(out.bytes, Ordering::Relaxed);
        Ok(Response::new(out))
    }
}
