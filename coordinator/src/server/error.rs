//! The API's errors, and the one conversion of each lower layer's error into an HTTP status and
//! a code: a refusal says whose fault it is (4xx), a failure of the coordinator is a 500.
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::artifact::ArtifactError;
use crate::commands::{self, promote::Refused};
use crate::registry::RegistryError;
use crate::rollout;

/// A refusal or failure, as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn forbidden_as(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.code, "message": self.message }));
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(self);
        resp
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Locked { .. } => ApiError::conflict("environment_locked", e.to_string()),
            RegistryError::Unreachable { .. } => {
                ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable", e.to_string())
            }
            RegistryError::Fenced { .. } => {
                ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "not_leader", e.to_string())
            }
            RegistryError::Storage { .. }
            | RegistryError::Open { .. }
            | RegistryError::Poisoned
            | RegistryError::Illegal { .. } => ApiError::internal(e.to_string()),
        }
    }
}

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> Self {
        match e {
            ArtifactError::Changed { .. } => ApiError::conflict("artifact_changed", e.to_string()),
            ArtifactError::Io { .. }
            | ArtifactError::Refused { .. }
            | ArtifactError::Manifest { .. }
            | ArtifactError::Empty(_) => ApiError::conflict("artifact_missing", e.to_string()),
            ArtifactError::Aborted { .. } => ApiError::internal(e.to_string()),
            ArtifactError::TooLarge { .. } => ApiError::unprocessable("artifact_too_large", e.to_string()),
            ArtifactError::Layout { .. } => ApiError::unprocessable("bad_artifact", e.to_string()),
        }
    }
}

impl From<rollout::Error> for ApiError {
    fn from(e: rollout::Error) -> Self {
        use rollout::Error as E;
        let message = e.to_string();
        match e {
            E::InvalidVersion { .. } => ApiError::bad_request("invalid_version", message),
            E::UnknownEnvironment(_) => ApiError::unprocessable("unknown_environment", message),
            E::NothingInProgress { .. } => ApiError::conflict("not_in_progress", message),
            E::NotResumable { .. } => ApiError::conflict("nothing_to_continue", message),
            E::NotPaused { .. } => ApiError::conflict("not_paused", message),
            E::StillRunning { .. } => ApiError::conflict("still_running", message),
            E::OtherApp { .. } => ApiError::conflict("other_app", message),
            E::HostsGone { .. } => ApiError::conflict("inventory_changed", message),
            E::BlueGreenTo { .. } => ApiError::unprocessable("blue_green_rollback", message),
            E::NoLiveGroup { .. } => ApiError::conflict("no_live_group", message),
            E::Artifact { source, .. } => {
                let mut api = ApiError::from(source);
                api.message = message;
                api
            }
            E::Registry(r) => ApiError::from(r),
            // A lock naming a deployment the registry does not know: `--force-unlock` clears it.
            E::DanglingLock { .. } => ApiError::conflict("dangling_lock", message),
            E::Misconfigured { .. } | E::Corrupt { .. } => ApiError::internal(message),
        }
    }
}

impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        let message = e.to_string();
        match e {
            Refused::Blocked(_) => ApiError::conflict("promotion_blocked", message),
            Refused::Skips(_) => ApiError::conflict("promotion_skips", message),
            Refused::SmokeFailed(_) => ApiError::conflict("smoke_failed", message),
            Refused::SmokeNotRun(_) => ApiError::conflict("smoke_not_run", message),
            Refused::ApprovalRequired(_) => ApiError::forbidden_as("approval_required", message),
        }
    }
}

impl From<commands::Error> for ApiError {
    fn from(e: commands::Error) -> Self {
        match e {
            commands::Error::Rollout(e) => e.into(),
            commands::Error::Artifact(e) => e.into(),
            commands::Error::Promotion(e) => e.into(),
            commands::Error::Registry(e) => e.into(),
            commands::Error::Secret(e) => ApiError::unprocessable("secret_unavailable", e.to_string()),
            e @ commands::Error::Closed { .. } => ApiError::conflict("deploy_window_closed", e.to_string()),
        }
    }
}
