//! The CLI's side of `ferry serve`: `--server URL` sends the verbs to a running coordinator's API
//! instead of running the engine here. HTTPS with the fleet CA (or `--server-ca`), authenticated
//! by a bearer token (`FERRY_TOKEN`) or a client certificate.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use rustls::pki_types::ServerName;
use serde_json::Value;

/// How to reach and authenticate to the server.
#[derive(Debug, Clone, Default)]
pub struct RemoteArgs {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub token: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// Why a call did not get an answer, or the server's refusal.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Could not connect, TLS failed, or the connection broke.
    #[error("{url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error.
    #[error("{method} {path}: {status} {code}: {message}")]
    Refused {
        method: String,
        path: String,
        status: u16,
        code: String,
        message: String,
        /// A standby's answer (`not_leader`): where the leader is.
        leader: Option<String>,
    },
}

impl RemoteError {
    /// The CLI exit code: 3 for no answer or refused credentials, 2 for a refused request.
    pub fn exit_code(&self) -> u8 {
        match self {
            RemoteError::Unreachable { .. } => crate::exit::UNREACHABLE,
            RemoteError::Refused { status: 401 | 403, code, .. } if code != "approval_required" => {
                crate::exit::UNREACHABLE
            }
            RemoteError::Refused { .. } => crate::exit::USAGE,
        }
    }
}

/// A server's `https://host[:port]` address: host, port and TLS name.
fn target(url: &str) -> Result<(String, u16, ServerName<'static>), String> {
    let rest = url.strip_prefix("https://").ok_or("must be an https:// URL")?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err("give the server's address only, e.g. https://ferry.example:8443".into());
    }
    let (host, port) = crate::config::parse_host_port(authority, 443).map_err(|e| format!("the address {e}"))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    Ok((host, port, name))
}

type Body = BoxBody<Bytes, std::io::Error>;

pub struct Remote {
    url: String,
    host: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    token: Option<String>,
}

impl Remote {
    pub fn new(args: &RemoteArgs) -> anyhow::Result<Remote> {
        let (host, port, name) = target(&args.url).map_err(|e| anyhow::anyhow!("--server {}: {e}", args.url))?;
        let ca = args.ca.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "--server needs the CA of the server's certificate: --server-ca (or a fleet.toml with [tls] ca)"
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in ferry_proto::identity::load_certs(ca)? {
            roots.add(cert).map_err(|e| anyhow::anyhow!("--server-ca {}: {e}", ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots);
        let mut tls = match (&args.client_cert, &args.client_key, &args.token) {
            (Some(cert), Some(key), None) => builder
                .with_client_auth_cert(ferry_proto::identity::load_certs(cert)?, ferry_proto::identity::load_key(key)?)
                .map_err(|e| {
                    anyhow::anyhow!("--client-cert {} / --client-key {}: {e}", cert.display(), key.display())
                })?,
            _ => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Remote {
            url: args.url.trim_end_matches('/').to_string(),
            host,
            port,
            tls: Arc::new(tls),
            name,
            token: args.token.clone(),
        })
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> RemoteError {
        RemoteError::Unreachable { url: self.url.clone(), reason: reason.to_string() }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Body,
        content_type: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, RemoteError> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unreachable(format!("cannot connect: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(format!("HTTP: {e}")))?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(
                hyper::header::HOST,
                if self.host.contains(':') {
                    format!("[{}]:{}", self.host, self.port)
                } else {
                    format!("{}:{}", self.host, self.port)
                },
            )
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header(hyper::header::USER_AGENT, concat!("ferry/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(body).map_err(|e| self.unreachable(format!("request: {e}")))?;
        match sender.send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                // With TLS 1.3 a refused client certificate shows at the first read: the
                // connection's own error says so (a TLS alert); the request's only that it failed.
                let why = match tokio::time::timeout(std::time::Duration::from_secs(2), conn).await {
                    Ok(Ok(Err(conn_err))) => chain(&conn_err),
                    _ => chain(&e),
                };
                Err(self.unreachable(format!("no answer: {why}")))
            }
        }
    }

    async fn answer(
        &self,
        method: &str,
        path: &str,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Value, RemoteError> {
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(RemoteError::Refused {
            method: method.to_string(),
            path: path.to_string(),
            status,
            code: value["error"].as_str().unwrap_or("error").to_string(),
            message: value["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string()),
            leader: value["leader"].as_str().map(str::to_string),
        })
    }

    /// A JSON call: the answer's JSON, or the refusal. A standby's refusal is followed once to
    /// the leader it names.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, RemoteError> {
        match self.call_here(method, path, body).await {
            Err(RemoteError::Refused { status: 503, code, leader: Some(leader), .. })
                if code == "not_leader" && leader != self.url =>
            {
                eprintln!("ferry: {} is a standby; sending {method} {path} to the leader, {leader}", self.url);
                self.at(&leader)?.call_here(method, path, body).await
            }
            other => other,
        }
    }

    /// A JSON call to this server only (a standby's refusal is returned as it is).
    pub async fn call_here(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, RemoteError> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let body = Full::new(bytes).map_err(|never| match never {}).boxed();
        let resp = self.send(method, path, body, "application/json").await?;
        self.answer(method, path, resp).await
    }

    /// The same credentials, sent to `url` (an https:// address) instead.
    fn at(&self, url: &str) -> Result<Remote, RemoteError> {
        let (host, port, name) = target(url).map_err(|e| RemoteError::Unreachable {
            url: url.to_string(),
            reason: format!("the leader's address: {e}"),
        })?;
        Ok(Remote {
            url: url.trim_end_matches('/').to_string(),
            host,
            port,
            tls: self.tls.clone(),
            name,
            token: self.token.clone(),
        })
    }

    /// Uploads an archive, or a directory as a tar made on the fly (in a temporary file).
    pub async fn upload(&self, artifact: &Path) -> anyhow::Result<Value> {
        let file = if artifact.is_dir() {
            let dir = artifact.to_owned();
            let tmp = tokio::task::spawn_blocking(move || -> anyhow::Result<tempfile::NamedTempFile> {
                let tmp = tempfile::NamedTempFile::new()?;
                let mut builder = tar::Builder::new(std::io::BufWriter::new(tmp.reopen()?));
                builder.follow_symlinks(false);
                builder.append_dir_all(".", &dir).map_err(|e| anyhow::anyhow!("packing {}: {e}", dir.display()))?;
                builder.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                Ok(tmp)
            })
            .await??;
            Upload::Temp(tmp)
        } else {
            Upload::Path(artifact.to_owned())
        };
        tokio::fs::File::open(file.path()).await.map_err(|e| anyhow::anyhow!("{}: {e}", artifact.display()))?;
        let sent = match self.upload_file(file.path(), artifact).await {
            Err(RemoteError::Refused { status: 503, code, leader: Some(leader), .. })
                if code == "not_leader" && leader != self.url =>
            {
                eprintln!("ferry: {} is a standby; uploading to the leader, {leader}", self.url);
                self.at(&leader)?.upload_file(file.path(), artifact).await
            }
            other => other,
        };
        drop(file);
        Ok(sent?)
    }

    /// POSTs the archive at `path` (`artifact` names it in errors) to this server.
    async fn upload_file(&self, path: &Path, artifact: &Path) -> Result<Value, RemoteError> {
        let f = tokio::fs::File::open(path)
            .await
            .map_err(|e| self.unreachable(format!("cannot read {}: {e}", artifact.display())))?;
        let stream = futures_util::stream::unfold(f, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Frame::data(Bytes::from(buf))), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let body = BodyExt::boxed(StreamBody::new(stream));
        let resp = self.send("POST", "/api/v1/artifacts", body, "application/octet-stream").await?;
        self.answer("POST", "/api/v1/artifacts", resp).await
    }

    /// Follows a deployment's event stream: `on_event(kind, data)` for each `line` and `event`;
    /// returns the `end` event's deployment.
    pub async fn follow(&self, id: &str, mut on_event: impl FnMut(&str, &Value)) -> Result<Value, RemoteError> {
        let path = format!("/api/v1/deployments/{id}/events");
        let empty = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
        let resp = self.send("GET", &path, empty, "application/json").await?;
        if !resp.status().is_success() {
            return self.answer("GET", &path, resp).await;
        }
        let mut body = resp.into_body();
        // Bytes, not text: a character may be split between two frames.
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.unreachable(format!("the event stream broke: {e}")))?;
            let Some(data) = frame.data_ref() else { continue };
            buf.extend_from_slice(data);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8_lossy(&buf[..end + 2]).into_owned();
                buf.drain(..end + 2);
                let (mut kind, mut data) = ("message".to_string(), String::new());
                for line in block.lines() {
                    if let Some(k) = line.strip_prefix("event:") {
                        kind = k.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
                if kind == "end" {
                    return Ok(value);
                }
                on_event(&kind, &value);
            }
        }
        Err(self.unreachable(format!("the event stream of {id} ended before the deployment did")))
    }
}

use ferry_proto::text::error_chain as chain;

enum Upload {
    Temp(tempfile::NamedTempFile),
    Path(PathBuf),
}

impl Upload {
    fn path(&self) -> &Path {
        match self {
            Upload::Temp(t) => t.path(),
            Upload::Path(p) => p,
        }
    }
}
