//! The observability endpoint (`[http]` in agent.toml): plain HTTP/1.1, GET only, on its own port.
//!
//! - `/metrics`: Prometheus text format ([`crate::metrics`]); host values (free disk, releases
//!   kept) are read at scrape time.
//! - `/health`: JSON `{"status": "healthy"|"unhealthy", "components": {...}}`, 200 or 503. The
//!   components: `grpc` (serving), `data_dir` (a file can be created, written and fsync'd there),
//!   `systemd` (the system bus answers), `audit` (the last audit line was written).
//! - `/ready`: 200 while the gRPC server accepts commands, 503 while starting or stopping.
//! - `/live`: 200 whenever the agent's runtime answers at all.
//!
//! It serves no TLS and no authentication, so it is off unless configured and binds loopback by
//! default; it reads state and never changes any. At most [`MAX_CONNECTIONS`] at once, each
//! request's headers within [`HEADER_TIMEOUT`].
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;
use crate::metrics;
use crate::store::AppStore;
use crate::telemetry::{Serving, Telemetry};

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this long (and between keep-alive requests).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/health` waits for systemd's answer.
const SYSTEMD_TIMEOUT: Duration = Duration::from_secs(2);

/// `/metrics`' content type (text exposition format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the endpoint's address (before the agent says it is ready, so a taken port is a start
/// error, not a silent gap in monitoring).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::server::StartError> {
    TcpListener::bind(addr).await.map_err(|source| crate::server::StartError::Bind { addr, source })
}

/// Serves until `shutdown`; connections in progress then get a few seconds to finish.
pub async fn serve(
    listener: TcpListener,
    config: Arc<AgentConfig>,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let Some((tcp, peer)) = crate::server::accept(&listener, &shutdown, "http").await else { break };
        let (config, telemetry, stop) = (config.clone(), telemetry.clone(), shutdown.clone());
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let (config, telemetry) = (config.clone(), telemetry.clone());
                async move { Ok::<_, Infallible>(handle(&req, &config, &telemetry).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http: connection ended with an error");
            }
        });
    }
    conns.close();
    conns.wait().await;
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into())
}

/// Answers one request.
pub async fn handle<B>(
    req: &Request<B>,
    config: &Arc<AgentConfig>,
    telemetry: &Arc<Telemetry>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let (config, telemetry) = (config.clone(), telemetry.clone());
            match tokio::task::spawn_blocking(move || {
                refresh(&config, &telemetry);
                telemetry.metrics.encode()
            })
            .await
            {
                Ok(body) => response(StatusCode::OK, METRICS_CONTENT_TYPE, body),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("gathering metrics failed: {e}\n")),
            }
        }
        "/health" => {
            let report = health(config, telemetry).await;
            let status = if report.status == "healthy" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
            response(status, "application/json", body)
        }
        "/ready" => match telemetry.serving().0 {
            Serving::Serving => text(StatusCode::OK, "ready\n"),
            Serving::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Serving::Stopping => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
        },
        "/live" => text(StatusCode::OK, "alive\n"),
        "/" => text(StatusCode::OK, "ferry-agent: /metrics /health /ready /live\n"),
        other => text(StatusCode::NOT_FOUND, format!("{other}: not found (try /metrics, /health, /ready, /live)\n")),
    }
}

/// Sets the gauges that describe the host now. Blocking (statvfs, directory listings).
fn refresh(config: &AgentConfig, telemetry: &Telemetry) {
    let m = &telemetry.metrics;
    let (free, total) = crate::facts::disk_space(&config.data_dir);
    m.set(&metrics::DATA_DIR_FREE, &[], free as f64);
    m.set(&metrics::DATA_DIR_SIZE, &[], total as f64);
    for app in config.apps.keys() {
        let kept = AppStore::new(config.app_dir(app)).releases().map(|r| r.len()).unwrap_or(0);
        m.set(&metrics::RELEASES_KEPT, &[app], kept as f64);
    }
}

/// `/health`'s answer.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `healthy` when every component is `ok`, else `unhealthy`.
    pub status: &'static str,
    pub version: &'static str,
    pub components: BTreeMap<&'static str, Component>,
}

#[derive(Debug, Serialize)]
pub struct Component {
    /// `ok` or `error`.
    pub status: &'static str,
    pub detail: String,
}

impl Component {
    fn of(r: Result<String, String>) -> Component {
        match r {
            Ok(detail) => Component { status: "ok", detail },
            Err(detail) => Component { status: "error", detail },
        }
    }
}

/// Checks every component.
pub async fn health(config: &AgentConfig, telemetry: &Telemetry) -> Health {
    let mut components = BTreeMap::new();
    let grpc = match telemetry.serving() {
        (Serving::Serving, addr) => Ok(format!("serving on {}", addr.map(|a| a.to_string()).unwrap_or_default())),
        (Serving::Starting, _) => Err("not serving yet".to_string()),
        (Serving::Stopping, _) => Err("stopping: no new commands are accepted".to_string()),
    };
    components.insert("grpc", Component::of(grpc));
    let dir = config.data_dir.clone();
    let data_dir = tokio::task::spawn_blocking(move || check_writable(&dir))
        .await
        .unwrap_or_else(|e| Err(format!("check failed: {e}")));
    components.insert("data_dir", Component::of(data_dir));
    let systemd = match tokio::time::timeout(SYSTEMD_TIMEOUT, crate::systemd::ping()).await {
        Ok(Ok(version)) => Ok(format!("systemd {version} answers on the system bus")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("systemd did not answer on the system bus within {SYSTEMD_TIMEOUT:?}")),
    };
    components.insert("systemd", Component::of(systemd));
    let audit = if telemetry.audit_ok() {
        Ok(format!("{} is written", telemetry.audit.path().display()))
    } else {
        Err(format!("the last line could not be written to {} (see the journal)", telemetry.audit.path().display()))
    };
    components.insert("audit", Component::of(audit));
    let healthy = components.values().all(|c| c.status == "ok");
    Health { status: if healthy { "healthy" } else { "unhealthy" }, version: env!("CARGO_PKG_VERSION"), components }
}

/// Creates, writes, fsyncs and removes a small file in `dir`.
fn check_writable(dir: &Path) -> Result<String, String> {
    let fail = |what: &str, e: std::io::Error| format!("{} is not writable: {what}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| fail("create", e))?;
    let probe = dir.join(format!(".ferry-health-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .map_err(|e| fail("create a file", e))
        .and_then(|mut f| f.write_all(b"ok\n").and_then(|()| f.sync_all()).map_err(|e| fail("write a file", e)));
    let _ = std::fs::remove_file(&probe);
    written?;
    let (free, _) = crate::facts::disk_space(dir);
    Ok(format!("{} is writable ({free} bytes free)", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Arc<AgentConfig> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[tls]\nca = \"/x/ca.pem\"\ncert = \"/x/a.pem\"\nkey = \"/x/a.key\"\n\
             [apps.web]\nroot = \"/srv/web\"\n",
            dir.join("data").display()
        );
        Arc::new(AgentConfig::from_toml(Path::new("agent.toml"), &text).expect("valid"))
    }

    async fn get(path: &str, method: Method, config: &Arc<AgentConfig>, t: &Arc<Telemetry>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let req = Request::builder().method(method).uri(path).body(()).expect("request");
        let r = handle(&req, config, t).await;
        let status = r.status();
        let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints_answer_and_ready_follows_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        let t = Telemetry::new(&config).expect("telemetry");
        let (status, body) = get("/metrics", Method::GET, &config, &t).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("ferry_agent_releases_kept{app=\"web\"} 0\n"), "{body}");
        assert!(body.contains("ferry_agent_data_dir_free_bytes "), "{body}");
        assert_eq!(get("/ready", Method::GET, &config, &t).await.0, StatusCode::SERVICE_UNAVAILABLE);
        t.set_serving(Serving::Serving, Some(SocketAddr::from(([127, 0, 0, 1], 7443))));
        assert_eq!(get("/ready", Method::GET, &config, &t).await.0, StatusCode::OK);
        t.set_serving(Serving::Stopping, None);
        assert_eq!(
            get("/ready", Method::GET, &config, &t).await,
            (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".into())
        );
        assert_eq!(get("/live", Method::GET, &config, &t).await.0, StatusCode::OK);
        assert_eq!(get("/nope", Method::GET, &config, &t).await.0, StatusCode::NOT_FOUND);
        assert_eq!(get("/metrics", Method::POST, &config, &t).await.0, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn health_names_the_data_dir_that_is_not_writable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        let t = Telemetry::new(&config).expect("telemetry");
        t.set_serving(Serving::Serving, None);
        let report = health(&config, &t).await;
        assert_eq!(report.components["data_dir"].status, "ok", "{report:?}");
        assert_eq!(report.components["grpc"].status, "ok", "{report:?}");
        // Root may write anywhere it has permission bits for; a regular file in the data dir's
        // place stops everyone.
        let data = config.data_dir.clone();
        std::fs::remove_dir_all(&data).expect("rm data dir");
        std::fs::write(&data, "not a directory").expect("write");
        let report = health(&config, &t).await;
        assert_eq!(report.status, "unhealthy");
        let d = &report.components["data_dir"];
        assert_eq!(d.status, "error", "{report:?}");
        assert!(d.detail.contains(&data.display().to_string()) && d.detail.contains("not writable"), "{d:?}");
    }
}
