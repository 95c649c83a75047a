//! Who is calling: a fleet certificate of role coordinator or operator (verified by the TLS
//! layer), or a bearer token whose SHA-256 is in `[server] tokens`. And the audit of every call.
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AuditLine, Peer, Shared};
use crate::commands::token::sha256;
use crate::config::Permission;
use ferry_proto::identity::Revoked;
use ferry_proto::reload;

/// One configured token: its name and the SHA-256 of its secret.
pub struct Token {
    pub name: String,
    sha256: [u8; 32],
}

impl Token {
    /// From `[server] tokens` (validated at load: 64 lowercase hex digits).
    pub fn from_config(t: &crate::config::TokenConfig) -> Option<Token> {
        let bytes = hex::decode(&t.sha256).ok()?;
        Some(Token { name: t.name.clone(), sha256: bytes.try_into().ok()? })
    }
}

/// The authenticated caller: `cert:NAME` or `token:NAME`. Handlers take it as an extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity(pub String);

/// What the caller may do besides reading (`[server.roles]`, or the defaults).
#[derive(Debug, Clone)]
struct May(Vec<Permission>);

/// Refuses a route that needs `needed` to a caller without it (runs after [`authenticate`]).
pub async fn require(needed: Permission, req: Request, next: Next) -> Response {
    let may = req.extensions().get::<May>().is_some_and(|m| m.0.contains(&needed));
    if may {
        return next.run(req).await;
    }
    let who = req.extensions().get::<Identity>().map_or("this caller", |i| i.0.as_str()).to_string();
    let has: Vec<&str> =
        req.extensions().get::<May>().map(|m| m.0.iter().map(|p| p.as_str()).collect()).unwrap_or_default();
    let has = if has.is_empty() { "none".to_string() } else { has.join(", ") };
    ApiError::forbidden_as(
        "role_required",
        format!(
            "{who} may not {needed} (its roles: {has}); grant it in [server.roles] of fleet.toml, e.g. \"{who}\" = [\"{needed}\"]"
        ),
    )
    .into_response()
}

/// What a handler wants the audit line to carry (the deployment it created or acted on).
#[derive(Debug, Clone)]
pub struct AuditNote(pub String);

/// A deploy window or freeze the call overrode, and the reason it gave.
#[derive(Debug, Clone)]
pub struct AuditOverride(pub String);

/// `[tls] revoked`, re-read when the file changes (checked at each certificate-authenticated
/// call: one stat). A list that no longer parses keeps the last good one, and says so.
#[derive(Debug)]
pub struct RevokedFile {
    path: Option<std::path::PathBuf>,
    /// The file's stamp when last read, and its list.
    cache: std::sync::Mutex<(reload::Stamp, Revoked)>,
}

impl RevokedFile {
    /// Reads the list at start: a bad one stops `ferry serve` with the file and line.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<RevokedFile> {
        let path: Option<std::path::PathBuf> = path.map(Into::into);
        let stamp = reload::stamp(path.as_slice());
        let list = match &path {
            Some(p) => Revoked::load(p).map_err(anyhow::Error::msg)?,
            None => Revoked::default(),
        };
        Ok(RevokedFile { path, cache: std::sync::Mutex::new((stamp, list)) })
    }

    /// Whether `serial` is revoked now.
    pub fn contains(&self, serial: &str) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.path {
            let stamp = reload::stamp(std::slice::from_ref(path));
            if stamp != cache.0 {
                match Revoked::load(path) {
                    Ok(list) => {
                        tracing::info!(path = %path.display(), serials = list.len(), "revocation list re-read");
                        cache.1 = list;
                    }
                    Err(e) => tracing::error!("{e}; still refusing the serials of the last good list"),
                }
                cache.0 = stamp;
            }
        }
        cache.1.contains(serial)
    }
}

/// Paths anyone may read: the API description and the liveness check.
fn public(path: &str) -> bool {
    matches!(path, "/api/openapi.json" | "/api/v1/health")
}

/// Who the request comes from, or why it is refused.
fn identify(state: &Shared, req: &Request) -> Result<Option<Identity>, ApiError> {
    if let Some(value) = req.headers().get(AUTHORIZATION) {
        let text = value.to_str().unwrap_or("");
        // The scheme is case-insensitive (RFC 9110).
        let secret =
            text.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim());
        let Some(secret) = secret else {
            return Err(ApiError::unauthorized("the Authorization header must be `Bearer <token>`"));
        };
        let digest = sha256(secret);
        // Comparing digests, not secrets: a timing difference reveals nothing usable.
        return match state.tokens.iter().find(|t| t.sha256 == digest) {
            Some(t) => Ok(Some(Identity(format!("token:{}", t.name)))),
            None => Err(ApiError::unauthorized("the bearer token is not one of [server] tokens")),
        };
    }
    if let Some(Peer(Some(cert))) = req.extensions().get::<Peer>() {
        if !super::api_role(cert.role) {
            let role = cert.role.map_or("no ferry role".to_string(), |r| format!("role {r}"));
            return Err(ApiError::forbidden(format!(
                "certificate {} has {role}; the API takes coordinator or operator certificates",
                cert.name()
            )));
        }
        if state.revoked.contains(&cert.serial) {
            return Err(ApiError::forbidden(format!(
                "certificate {} (serial {}) is revoked: it is listed in [tls] revoked",
                cert.name(),
                cert.serial
            )));
        }
        return Ok(Some(Identity(format!("cert:{}", cert.name()))));
    }
    Ok(None)
}

/// Authenticates, runs the handler, and audits the call.
pub async fn authenticate(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let from = req.extensions().get::<super::RemoteAddr>().map(|a| a.0);
    let who = match identify(&state, &req) {
        Ok(Some(id)) => Ok(id),
        Ok(None) if public(&path) => Ok(Identity("anonymous".into())),
        Ok(None) => Err(ApiError::unauthorized(
            "no credentials: send `Authorization: Bearer <token>` or a client certificate of the fleet CA",
        )),
        Err(e) => Err(e),
    };
    let refused = who.is_err();
    let (who, response) = match who {
        Ok(id) => {
            req.extensions_mut().insert(May(state.config.server.permissions(&id.0)));
            req.extensions_mut().insert(id.clone());
            (id.0, next.run(req).await)
        }
        Err(e) => ("unauthenticated".to_string(), e.into_response()),
    };
    let note = response.extensions().get::<AuditNote>().map(|n| n.0.clone());
    let error = response.extensions().get::<ApiError>().map(|e| e.message.clone());
    let window_override = response.extensions().get::<AuditOverride>().map(|n| n.0.clone());
    let line = AuditLine {
        time: crate::registry::when(crate::registry::now_ms()),
        who: &who,
        method: &method,
        path: &path,
        status: response.status().as_u16(),
        deployment_id: note.as_deref(),
        error: error.as_deref(),
        window_override: window_override.as_deref(),
        ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if refused {
        // Sampled: a client hammering without credentials cannot flood the log.
        state.audit_refusal(from, line).await;
    } else {
        state.audit.write(&line).await;
    }
    tracing::info!(who, method, path, status = response.status().as_u16(), "api call");
    response
}
