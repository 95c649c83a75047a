//! The fleet of real agents, over mutually authenticated gRPC: what a rollout does to one host.
//!
//! Staging: connect (mTLS, identity checked) → `Prepare` (the host answers which chunks it lacks;
//! when the cache holds the manifest of the host's current release, only the manifest's changes
//! are sent) → `Upload` only those, zstd-compressed, through a bounded channel (backpressure: at
//! most a few chunks in memory); a chunk the host can rebuild from its old version of the file
//! goes as a piece delta → `Commit` (the host builds and verifies the release; nothing changes
//! for the running app). Activation: `Activate` (atomic swap of `current`, restart, probes; the
//! host swaps itself back on failure).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_proto::v1::{self, agent_client::AgentClient};
use futures_util::future::BoxFuture;
use tonic::transport::Channel;

use super::encoded::{Encoded, EncodedChunks};
use super::{Activation, Fleet, Release, StageNote, Staged, Swap, Target, Transfer};
use crate::artifact::Artifact;
use crate::cache::Cache;
use crate::client::{Agent, ErrorKind, HostError, Timeouts, classify_status, fenced, unary};
use crate::config::{FleetConfig, Host};
use crate::tls::ClientTls;

/// The agents of fleet.toml, reached with the coordinator's certificate.
pub struct Grpc<'a> {
    pub config: &'a FleetConfig,
    pub tls: &'a ClientTls,
    /// Manifests of releases sent before: lets a deployment send only a manifest's changes.
    pub cache: Option<&'a Cache>,
}

impl Fleet for Grpc<'_> {
    fn current_release<'a>(&'a self, host: &'a Host) -> BoxFuture<'a, Result<String, HostError>> {
        Box::pin(async move {
            let agent = Agent::connect(host, self.tls, timeouts(self.config)).await?;
            Ok(app_release(&agent.status, &self.config.app.name))
        })
    }

    fn stage<'a>(
        &'a self,
        host: &'a Host,
        release: &'a Release,
        sent: &'a Transfer,
        note: &'a (dyn Fn(StageNote) + Sync),
    ) -> BoxFuture<'a, Result<Staged, HostError>> {
        Box::pin(stage_host(self, host, release, sent, note))
    }

    fn activate<'a>(&'a self, host: &'a Host, activation: &'a Activation) -> BoxFuture<'a, Result<Swap, HostError>> {
        Box::pin(activate_host(self.config, host, self.tls, activation))
    }

    fn rollback<'a>(
        &'a self,
        host: &'a Host,
        target: &'a Target,
        deployment_id: &'a str,
    ) -> BoxFuture<'a, Result<Swap, HostError>> {
        Box::pin(rollback_host(self.config, host, self.tls, target, deployment_id))
    }
}

/// The connect and per-request deadlines fleet.toml sets.
pub fn timeouts(config: &FleetConfig) -> Timeouts {
    Timeouts { connect: config.connect_timeout, request: config.request_timeout }
}

/// `Prepare`, with the manifest as changes from the host's current release when the cache knows
/// that release (and the changes are smaller); the whole manifest when not, or when the host
/// cannot use the changes. Also says whether the whole manifest went.
async fn prepare(
    client: &mut AgentClient<Channel>,
    host: &Host,
    fleet: &Grpc<'_>,
    send: &Release,
    current: &str,
    timeout: Duration,
    note: &(dyn Fn(StageNote) + Sync),
) -> Result<(v1::PrepareResponse, bool), HostError> {
    let request = |manifest, base_release: &str, delta| v1::PrepareRequest {
        app: fleet.config.app.name.clone(),
        version: send.version.clone(),
        deployment_id: send.deployment_id.clone(),
        manifest,
        manifest_hash: send.artifact.manifest_hash.to_vec(),
        base_release: base_release.to_string(),
        delta,
        signature: send.signature.clone(),
    };
    let manifest = &send.artifact.manifest;
    let base = if current.is_empty() { None } else { fleet.cache.and_then(|c| c.manifest(current)) };
    if let Some(base) = base {
        let delta = ferry_proto::manifest::diff(&base, manifest);
        if prost::Message::encoded_len(&delta) < prost::Message::encoded_len(manifest) {
            let (changed, removed) = (delta.upserts.len(), delta.removed.len());
            match client.prepare(fenced(unary(request(None, current, Some(delta)), timeout), fleet.config.epoch)).await
            {
                Ok(r) => {
                    note(StageNote::ManifestDelta { base: current.to_string(), changed, removed });
                    return Ok((r.into_inner(), false));
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    note(StageNote::WholeManifest { reason: s.message().to_string() });
                }
                Err(s) => return Err(step_error(host, "prepare", &s)),
            }
        }
    }
    let whole = client
        .prepare(fenced(unary(request(Some(manifest.clone()), "", None), timeout), fleet.config.epoch))
        .await
        .map_err(|s| step_error(host, "prepare", &s))?;
    Ok((whole.into_inner(), true))
}

/// The release of `app` in a host's status ("" before its first release).
pub fn app_release(status: &v1::HostStatus, app: &str) -> String {
    status.apps.iter().find(|a| a.name == app).map(|a| a.current_release.clone()).unwrap_or_default()
}

/// Puts the release on a host (`Prepare`, `Upload`, `Commit`) without activating it.
#[tracing::instrument(name = "host", skip_all, fields(step = "stage", host = %host.name, app = %fleet.config.app.name, version = release.version, deployment_id = release.deployment_id))]
async fn stage_host(
    fleet: &Grpc<'_>,
    host: &Host,
    release: &Release,
    sent: &Transfer,
    note: &(dyn Fn(StageNote) + Sync),
) -> Result<Staged, HostError> {
    let fail = |kind: ErrorKind, message: String| HostError::new(host, kind, message);
    let (artifact, deployment_id) = (&release.artifact, &release.deployment_id);
    let agent = Agent::connect(host, fleet.tls, timeouts(fleet.config)).await?;
    let (mut client, agent_timeout, app) = (agent.client, agent.request_timeout, fleet.config.app.name.clone());
    let current = app_release(&agent.status, &app);
    let unfinished = agent.status.apps.iter().any(|a| a.name == app && a.activation_unfinished);

    let prepared = prepare(&mut client, host, fleet, release, &current, agent_timeout, note)
        .await
        .map_err(|e| older_agent(e, &agent.status.agent_version))?;
    sent.manifest_delta.store(!prepared.1, Ordering::Relaxed);
    let prepared = prepared.0;
    if prepared.already_present {
        note(StageNote::AlreadyPresent { release: prepared.release_id.clone() });
        release.swarm.holds(host, false);
    } else {
        note(StageNote::Prepared {
            chunks: prepared.missing_chunks.len(),
            missing_bytes: prepared.missing_bytes,
            total_bytes: artifact.total_bytes,
        });
        // Peer fetch: a seed gets everything from here; any other host first asks the hosts
        // that hold the release, and gets here only what they did not give.
        let mut ticket = None;
        let mut chunks = prepared.missing_chunks;
        if !chunks.is_empty() && release.swarm.enabled() {
            let mut t = release.swarm.join(host).await;
            if !t.peers().is_empty() {
                let asked =
                    (&mut client, fleet.config, app.as_str(), prepared.stage_id.as_str(), deployment_id.as_str());
                match from_peers(asked, t.peers(), &chunks, agent_timeout).await {
                    Ok(got) => {
                        sent.peer_bytes.fetch_add(got.bytes, Ordering::Relaxed);
                        let short: Vec<String> = got.failures.iter().map(|f| f.host.clone()).collect();
                        t.fetched(&short);
                        let fell_short = got.failures.iter().map(|f| format!("{}: {}", f.host, f.reason)).collect();
                        note(StageNote::FromPeers { chunks: got.chunks, bytes: got.bytes, fell_short });
                        chunks = got.still_missing;
                    }
                    // An agent too old for peer fetch, or one that cannot reach its peers.
                    Err(e) => {
                        t.fetched(&[]);
                        tracing::warn!("peer fetch: {}; everything from the coordinator", e.message());
                    }
                }
            }
            ticket = Some(t);
        }
        if !chunks.is_empty() {
            let missing = Missing { chunks, bases: prepared.bases };
            let rebuilt = upload(
                &mut client,
                host,
                (&app, fleet.config.epoch),
                &prepared.stage_id,
                (artifact.clone(), release.encoded.clone()),
                missing,
                &sent.bytes,
            )
            .await?;
            sent.delta_chunks.store(rebuilt, Ordering::Relaxed);
            note(StageNote::Uploaded { bytes: sent.bytes.load(Ordering::Relaxed), delta_chunks: rebuilt });
        }
        let (fin, _) = run_steps(
            client.commit(fenced(
                tonic::Request::new(v1::CommitRequest {
                    app: app.clone(),
                    stage_id: prepared.stage_id.clone(),
                    deployment_id: deployment_id.to_string(),
                    host: host.name.clone(),
                    address: host.address.clone(),
                }),
                fleet.config.epoch,
            )),
            host,
            "commit",
        )
        .await?;
        if fin.outcome != v1::Outcome::Committed as i32 {
            return Err(fail(ErrorKind::Rpc, format!("commit ended with {:?}: {}", fin.outcome, fin.cause)));
        }
        note(StageNote::Committed { release: fin.release_id.clone() });
        match ticket {
            Some(t) => t.staged(host),
            None => release.swarm.holds(host, false),
        }
    }
    tracing::info!(release = prepared.release_id, bytes_sent = sent.bytes.load(Ordering::Relaxed), "staged");
    Ok(Staged { current, release_id: prepared.release_id, unfinished })
}

/// `FetchFromPeers`: `chunks` shared out among `peers` (round robin).
async fn from_peers(
    (client, config, app, stage_id, deployment_id): (&mut AgentClient<Channel>, &FleetConfig, &str, &str, &str),
    peers: &[Host],
    chunks: &[Vec<u8>],
    timeout: Duration,
) -> Result<v1::FetchFromPeersResponse, tonic::Status> {
    let mut sources: Vec<v1::PeerSource> = peers
        .iter()
        .map(|p| v1::PeerSource {
            host: p.name.clone(),
            endpoint: p.endpoint(),
            server_name: p.address.clone(),
            hashes: Vec::new(),
        })
        .collect();
    for (i, h) in chunks.iter().enumerate() {
        sources[i % peers.len().max(1)].hashes.push(h.clone());
    }
    let req = v1::FetchFromPeersRequest {
        app: app.to_string(),
        stage_id: stage_id.to_string(),
        deployment_id: deployment_id.to_string(),
        sources,
    };
    // Bounded like an upload would be: by the peers' own stall limit, and this as a backstop.
    let limit = timeout.max(Duration::from_secs(60)) * 10;
    let call = client.fetch_from_peers(fenced(tonic::Request::new(req), config.epoch));
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer in {} s", limit.as_secs()))),
    }
}

/// Activates a staged release on a host: swap, restart, probes; the host swaps itself back when
/// that fails (`RolledBack`).
#[tracing::instrument(name = "host", skip_all, fields(step = "activate", host = %host.name, app = %config.app.name, version = activation.version, deployment_id = activation.deployment_id))]
async fn activate_host(
    config: &FleetConfig,
    host: &Host,
    tls: &ClientTls,
    activation: &Activation,
) -> Result<Swap, HostError> {
    let fail = |kind: ErrorKind, message: String| HostError::new(host, kind, message);
    let (mut client, _, app) = open(config, host, tls).await?;
    let fin = run_steps(
        client.activate(fenced(
            tonic::Request::new(v1::ActivateRequest {
                app,
                release_id: activation.release_id.clone(),
                deployment_id: activation.deployment_id.clone(),
                version: activation.version.clone(),
                units: config.app.units.clone(),
                probes: probes(config),
                hooks: Some(config.app.hooks.to_wire()),
                keep_releases: config.app.keep_releases,
                rollback_on_failure: true,
                unit_action: config.app.unit_action.clone(),
                secrets: activation.secrets.to_wire(),
            }),
            config.epoch,
        )),
        host,
        "activate",
    )
    .await?;
    logged(final_result(fin, &fail), "activated")
}

/// A Prepare refused because the agent hashes the manifest otherwise: an agent older than this
/// coordinator, which does not know the manifest's newer fields. Said, with both versions.
fn older_agent(mut e: HostError, agent_version: &str) -> HostError {
    let ours = env!("CARGO_PKG_VERSION");
    if e.message.contains("manifest hash mismatch") {
        e.message.push_str(&format!(
            " (the agent runs ferry-agent {agent_version} and this coordinator is ferry {ours}: an agent older than the coordinator may not know every field of the manifest; upgrade the agent)"
        ));
    }
    e
}

/// Logs how a host's activation or rollback ended (in its span), and passes the result on.
fn logged(result: Result<Swap, HostError>, what: &str) -> Result<Swap, HostError> {
    match &result {
        Ok(swap) => {
            tracing::info!(from = swap.from.as_deref().unwrap_or(""), to = swap.to, changed = swap.changed, "{what}")
        }
        Err(e) => tracing::warn!(kind = ?e.kind, "{}", e.message),
    }
    result
}

fn probes(config: &FleetConfig) -> Vec<v1::HealthProbe> {
    config.app.health.iter().enumerate().map(|(i, p)| p.to_wire(i)).collect()
}

/// Turns an activation's final event into the host's result.
fn final_result(
    (fin, agent_ms): (v1::Final, u64),
    fail: &dyn Fn(ErrorKind, String) -> HostError,
) -> Result<Swap, HostError> {
    match v1::Outcome::try_from(fin.outcome) {
        Ok(v1::Outcome::Healthy) | Ok(v1::Outcome::Unchanged) => Ok(Swap {
            from: (!fin.previous_release_id.is_empty()).then_some(fin.previous_release_id),
            to: fin.release_id,
            changed: fin.outcome == v1::Outcome::Healthy as i32,
            agent_ms,
        }),
        Ok(v1::Outcome::RolledBack) => Err(fail(
            ErrorKind::RolledBack,
            format!("{} (rolled back to {}, which is healthy)", fin.cause, fin.release_id),
        )),
        other => Err(fail(
            ErrorKind::Failed,
            format!("activation ended {:?}: {}", other.unwrap_or(v1::Outcome::Unspecified), fin.cause),
        )),
    }
}

/// Connects to `host` (mTLS, identity checked, probed): the client, the unary deadline, the app.
async fn open(
    config: &FleetConfig,
    host: &Host,
    tls: &ClientTls,
) -> Result<(AgentClient<Channel>, Duration, String), HostError> {
    let agent = Agent::connect(host, tls, timeouts(config)).await?;
    Ok((agent.client, agent.request_timeout, config.app.name.clone()))
}

fn step_error(host: &Host, step: &str, s: &tonic::Status) -> HostError {
    let mut e = classify_status(host, s);
    e.message = format!("{step}: {}", e.message);
    e
}

/// Runs a step-event RPC to its end and returns its final event, with the agent's time for it.
async fn run_steps(
    call: impl std::future::Future<Output = Result<tonic::Response<tonic::Streaming<v1::StepEvent>>, tonic::Status>>,
    host: &Host,
    step: &str,
) -> Result<(v1::Final, u64), HostError> {
    let mut stream = call.await.map_err(|s| step_error(host, step, &s))?.into_inner();
    let mut last = None;
    while let Some(ev) = stream.message().await.map_err(|s| step_error(host, step, &s))? {
        if let Some(f) = ev.r#final {
            last = Some((f, ev.elapsed_ms));
        }
    }
    last.ok_or_else(|| {
        HostError::new(host, ErrorKind::Protocol, format!("{step}: the agent ended the stream without a final result"))
    })
}

/// What a host lacks: chunk hashes, and the bases it offers to rebuild some of them from.
struct Missing {
    chunks: Vec<Vec<u8>>,
    bases: Vec<v1::Basis>,
}

/// One chunk as sent: whole (compressed once for the deployment, if that is smaller), or as a
/// delta against a basis the host offered when that is smaller still.
fn encode_chunk(
    hash: Vec<u8>,
    (artifact, encoded): (&Artifact, &EncodedChunks),
    basis: Option<&v1::Basis>,
    zstd: &mut zstd::bulk::Compressor<'_>,
) -> Result<v1::ContentChunk, String> {
    let read = || artifact.read_chunk(&hash).map_err(|e| e.to_string());
    let whole = |e: &Encoded| v1::ContentChunk {
        hash: hash.clone(),
        raw_length: e.raw_length,
        compression: e.compression as i32,
        data: e.data.clone(),
        basis: Vec::new(),
        ops: Vec::new(),
    };
    let Some(b) = basis else {
        let e = encoded.get_or_encode(&hash, || Encoded::of(read()?, zstd))?;
        return Ok(whole(&e));
    };
    let raw = read()?;
    let e = encoded.get_or_encode(&hash, || Encoded::of(raw.clone(), zstd))?;
    let mut chunk = whole(&e);
    let (ops, literal) = ferry_proto::delta::encode(&raw, &b.piece_hashes, &b.piece_lengths);
    let literal = Encoded::of(literal, zstd)?;
    // An op costs a few bytes on the wire.
    if literal.data.len() + 8 * ops.len() < chunk.data.len() {
        (chunk.compression, chunk.data, chunk.basis, chunk.ops) =
            (literal.compression as i32, literal.data, b.id.clone(), ops);
    }
    Ok(chunk)
}

/// Streams the missing chunks: a blocking producer reads and compresses, a channel of a few
/// messages applies backpressure, tonic sends. Returns how many went as deltas.
async fn upload(
    client: &mut AgentClient<Channel>,
    host: &Host,
    (app, epoch): (&str, i64),
    stage_id: &str,
    (artifact, encoded): (Arc<Artifact>, Arc<EncodedChunks>),
    missing: Missing,
    sent: &AtomicU64,
) -> Result<u64, HostError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::UploadRequest>(4);
    let start = v1::UploadRequest {
        msg: Some(v1::upload_request::Msg::Start(v1::UploadStart {
            app: app.to_string(),
            stage_id: stage_id.to_string(),
        })),
    };
    let counter = Arc::new(AtomicU64::new(0));
    let produced = counter.clone();
    let rebuilt = Arc::new(AtomicU64::new(0));
    let as_delta = rebuilt.clone();
    let producer = tokio::task::spawn_blocking(move || -> Result<(), String> {
        if tx.blocking_send(start).is_err() {
            return Ok(()); // the RPC ended early; its error is reported by the caller
        }
        let basis_of: std::collections::HashMap<&[u8], &v1::Basis> =
            missing.bases.iter().flat_map(|b| b.chunks.iter().map(move |c| (c.as_slice(), b))).collect();
        // One compression context for the whole upload (making one per chunk cost more than
        // compressing it).
        let mut zstd = zstd::bulk::Compressor::new(3).map_err(|e| format!("zstd: {e}"))?;
        for hash in &missing.chunks {
            let basis = basis_of.get(hash.as_slice()).copied();
            let chunk = encode_chunk(hash.clone(), (&artifact, &encoded), basis, &mut zstd)?;
            produced.fetch_add((chunk.data.len() + 8 * chunk.ops.len()) as u64, Ordering::Relaxed);
            if !chunk.basis.is_empty() {
                as_delta.fetch_add(1, Ordering::Relaxed);
            }
            let msg = v1::UploadRequest { msg: Some(v1::upload_request::Msg::Chunk(chunk)) };
            if tx.blocking_send(msg).is_err() {
                return Ok(());
            }
        }
        let _ = tx.blocking_send(v1::UploadRequest { msg: Some(v1::upload_request::Msg::Finish(v1::UploadFinish {})) });
        Ok(())
    });
    let result =
        client.upload(fenced(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)), epoch)).await;
    let produced_ok = producer.await;
    sent.fetch_add(counter.load(Ordering::Relaxed), Ordering::Relaxed);
    match produced_ok {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(HostError::new(host, ErrorKind::Rpc, format!("upload: {e}")));
        }
        Err(e) => {
            return Err(HostError::new(host, ErrorKind::Rpc, format!("upload: {e}")));
        }
    }
    result.map_err(|s| step_error(host, "upload", &s))?;
    Ok(rebuilt.load(Ordering::Relaxed))
}

/// Switches a host to a release it keeps: no transfer.
#[tracing::instrument(name = "host", skip_all, fields(step = "rollback", host = %host.name, app = %config.app.name, target = ?target, deployment_id))]
async fn rollback_host(
    config: &FleetConfig,
    host: &Host,
    tls: &ClientTls,
    target: &Target,
    deployment_id: &str,
) -> Result<Swap, HostError> {
    let fail = |kind: ErrorKind, message: String| HostError::new(host, kind, message);
    let (mut client, agent_timeout, app) = open(config, host, tls).await?;
    let to_release = match target {
        Target::Previous => String::new(),
        Target::Release(id) => id.clone(),
        Target::Version(v) => {
            let releases = client
                .list_releases(unary(v1::ListReleasesRequest { app: app.clone() }, agent_timeout))
                .await
                .map_err(|s| step_error(host, "list releases", &s))?
                .into_inner()
                .releases;
            // Newest first: the most recent release of that version.
            match releases.iter().find(|r| &r.version == v) {
                Some(r) => r.id.clone(),
                None => {
                    let kept: Vec<_> = releases.iter().map(|r| r.id.as_str()).collect();
                    return Err(fail(
                        ErrorKind::Rpc,
                        format!("no release of version {v} is kept on this host (it keeps: {})", kept.join(", ")),
                    ));
                }
            }
        }
    };
    let fin = run_steps(
        client.rollback(fenced(
            tonic::Request::new(v1::RollbackRequest {
                app,
                to_release,
                deployment_id: deployment_id.to_string(),
                units: config.app.units.clone(),
                probes: probes(config),
            }),
            config.epoch,
        )),
        host,
        "rollback",
    )
    .await?;
    logged(final_result(fin, &fail), "rolled back")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_mismatch_from_an_older_agent_says_to_upgrade_it() {
        let host = Host { name: "web-1".into(), address: "10.0.0.1".into(), port: 7443 };
        let refused = HostError::new(
            &host,
            ErrorKind::Rpc,
            "prepare: the agent answered InvalidArgument: refused: manifest hash mismatch: the request says 1a, the manifest hashes to 2b",
        );
        let e = older_agent(refused, "0.0.9");
        let want = format!(
            "(the agent runs ferry-agent 0.0.9 and this coordinator is ferry {}: an agent older than the coordinator may not know every field of the manifest; upgrade the agent)",
            env!("CARGO_PKG_VERSION")
        );
        assert!(e.message.ends_with(&want), "{}", e.message);
        let other = older_agent(HostError::new(&host, ErrorKind::Rpc, "prepare: no space"), "0.0.9");
        assert_eq!(other.message, "prepare: no space");
    }
}
