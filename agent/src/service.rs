//! The `ferry.agent.v1.Agent` service: what a coordinator may ask of this host.
//!
//! Every request arrives over a connection whose certificate was checked in the handshake (role
//! coordinator, fleet CA); the caller's name is in the request's [`PeerInfo`] and is logged with
//! each call. Errors become `tonic::Status` here and nowhere else.
use std::sync::Arc;

use ferry_proto::v1::{self, agent_server::Agent};
use tonic::{Request, Response, Status};

use crate::config::AgentConfig;
use crate::facts;
use crate::server::PeerInfo;
use crate::store::AppStore;

/// Server streaming response for the step-event RPCs.
pub type StepStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::StepEvent, Status>> + Send>>;

pub struct AgentService {
    config: Arc<AgentConfig>,
    /// Our own certificate's name, reported in `GetStatus`.
    name: String,
}

impl AgentService {
    pub fn new(config: Arc<AgentConfig>) -> Self {
        let name = ferry_proto::identity::load_certs(&config.tls.cert)
            .ok()
            .and_then(|c| c.first().and_then(|c| ferry_proto::identity::CertIdentity::from_der(c).ok()))
            .map(|id| id.name().to_string())
            .unwrap_or_default();
        AgentService { config, name }
    }
}

fn caller<T>(req: &Request<T>) -> String {
    req.extensions().get::<PeerInfo>().map(|p| format!("{} ({})", p.name, p.addr)).unwrap_or_default()
}

/// The answer for RPCs of the contract that this agent version does not implement yet.
fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not available in ferry-agent {}: the release engine is not part of this version",
        env!("CARGO_PKG_VERSION")
    ))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_status(&self, request: Request<v1::GetStatusRequest>) -> Result<Response<v1::HostStatus>, Status> {
        tracing::debug!(caller = caller(&request), "GetStatus");
        let config = self.config.clone();
        let name = self.name.clone();
        let status = tokio::task::spawn_blocking(move || facts::gather(&config, &name))
            .await
            .map_err(|e| Status::internal(format!("gathering host facts failed: {e}")))?;
        Ok(Response::new(status))
    }

    async fn list_releases(
        &self,
        request: Request<v1::ListReleasesRequest>,
    ) -> Result<Response<v1::ListReleasesResponse>, Status> {
        tracing::debug!(caller = caller(&request), "ListReleases");
        let app = request.into_inner().app;
        if !self.config.apps.contains_key(&app) {
            return Err(Status::not_found(format!("app {app:?} is not declared in this agent's config")));
        }
        let store = AppStore::new(self.config.app_dir(&app));
        let releases = tokio::task::spawn_blocking(move || store.releases())
            .await
            .map_err(|e| Status::internal(format!("listing releases failed: {e}")))?
            .map_err(|e| Status::internal(format!("cannot read the release store of app {app}: {e}")))?;
        Ok(Response::new(v1::ListReleasesResponse { releases }))
    }

    async fn prepare(&self, _: Request<v1::PrepareRequest>) -> Result<Response<v1::PrepareResponse>, Status> {
        Err(not_yet("Prepare"))
    }

    async fn upload(
        &self,
        _: Request<tonic::Streaming<v1::UploadRequest>>,
    ) -> Result<Response<v1::UploadResponse>, Status> {
        Err(not_yet("Upload"))
    }

    type CommitStream = StepStream;
    async fn commit(&self, _: Request<v1::CommitRequest>) -> Result<Response<StepStream>, Status> {
        Err(not_yet("Commit"))
    }

    type ActivateStream = StepStream;
    async fn activate(&self, _: Request<v1::ActivateRequest>) -> Result<Response<StepStream>, Status> {
        Err(not_yet("Activate"))
    }

    type RollbackStream = StepStream;
    async fn rollback(&self, _: Request<v1::RollbackRequest>) -> Result<Response<StepStream>, Status> {
        Err(not_yet("Rollback"))
    }
}
