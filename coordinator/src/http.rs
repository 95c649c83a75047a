//! The coordinator's small outbound HTTP/1.1 client: smoke tests, Prometheus queries, webhook
//! gates and notifications. `http://` and `https://` (the system's CA roots, or a CA file of the
//! target's own); one request per connection; bodies read up to [`BODY_LIMIT`]. Callers bound
//! each request with their own timeout.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;

/// The most of a response body read.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Where Debian keeps the system's CA bundle (`SSL_CERT_FILE` overrides it, as for OpenSSL).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, at least "/".
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(format!("{url}: only http:// and https:// URLs are supported"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let path = path.split('#').next().unwrap_or("/").to_string();
        if authority.contains('@') {
            return Err(format!("{url}: credentials in the URL are not supported"));
        }
        let (host, port) =
            parse_host_port(authority, if tls { 443 } else { 80 }).map_err(|e| format!("{url}: the host {e}"))?;
        Ok(Url { tls, host, port, path })
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == if self.tls { 443 } else { 80 } { host } else { format!("{host}:{}", self.port) }
    }
}

/// A response: its status and (up to [`BODY_LIMIT`] of) its body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Which CA roots an `https://` request trusts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Roots {
    /// The system's bundle.
    #[default]
    System,
    /// A PEM file of CA certificates.
    File(PathBuf),
}

/// GET `url`.
pub async fn get(url: &str, roots: &Roots) -> Result<Response, String> {
    request(hyper::Method::GET, url, None, roots).await
}

/// POST `body` (JSON) to `url`.
pub async fn post_json(url: &str, body: Vec<u8>, roots: &Roots) -> Result<Response, String> {
    request(hyper::Method::POST, url, Some(body), roots).await
}

async fn request(method: hyper::Method, url: &str, body: Option<Vec<u8>>, roots: &Roots) -> Result<Response, String> {
    let u = Url::parse(url)?;
    let tcp = tokio::net::TcpStream::connect((u.host.as_str(), u.port))
        .await
        .map_err(|e| format!("cannot connect to {}:{}: {e}", u.host, u.port))?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(&u.path)
        .header(hyper::header::HOST, u.authority())
        .header(hyper::header::USER_AGENT, concat!("ferry/", env!("CARGO_PKG_VERSION")));
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| format!("{url}: {e}"))?;
    if u.tls {
        let name = ServerName::try_from(u.host.clone()).map_err(|e| format!("{url}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(client_config(roots)?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}:{}: {e}", u.host, u.port))?;
        send(hyper_util::rt::TokioIo::new(tls), req, &u).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req, &u).await
    }
}

async fn send<T>(io: T, req: hyper::Request<Full<Bytes>>, u: &Url) -> Result<Response, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake with {}:{}: {e}", u.host, u.port))?;
    tokio::spawn(conn);
    let url = format!("{}://{}{}", if u.tls { "https" } else { "http" }, u.authority(), u.path);
    let resp = sender.send_request(req).await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| format!("{url}: reading the answer: {e}"))?;
    Ok(Response { status, body })
}

/// The TLS client configuration for `roots`, built once per CA file.
pub(crate) fn client_config(roots: &Roots) -> Result<Arc<ClientConfig>, String> {
    type Configs = Mutex<Vec<(Roots, Arc<ClientConfig>)>>;
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    let configs = CONFIGS.get_or_init(Mutex::default);
    if let Some((_, c)) =
        configs.lock().map_err(|_| "TLS configuration lock poisoned")?.iter().find(|(r, _)| r == roots)
    {
        return Ok(c.clone());
    }
    let file = match roots {
        Roots::System => std::env::var_os("SSL_CERT_FILE").map_or_else(|| PathBuf::from(SYSTEM_ROOTS), PathBuf::from),
        Roots::File(path) => path.clone(),
    };
    let config = Arc::new(build_config(&file)?);
    configs.lock().map_err(|_| "TLS configuration lock poisoned")?.push((roots.clone(), config.clone()));
    Ok(config)
}

fn build_config(file: &Path) -> Result<ClientConfig, String> {
    let certs = ferry_proto::identity::load_certs(file).map_err(|e| format!("CA roots {}: {e}", file.display()))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("CA roots {}: no usable CA certificate", file.display()));
    }
    Ok(ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth())
}

/// Splits `"addr:port"`, `"addr"` (port `default`), `"[v6]:port"` or a bare IPv6 literal; the
/// address must be an IP or a host name.
pub fn parse_host_port(s: &str, default: u16) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty".into());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(|| format!("{s:?}: missing ']'"))?;
        ip.parse::<std::net::Ipv6Addr>().map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(s, p)?,
            None if after.is_empty() => default,
            None => return Err(format!("{s:?}: unexpected {after:?} after ']'")),
        };
        return Ok((ip.to_string(), port));
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((s.to_string(), default));
    }
    let (addr, port) = match s.rsplit_once(':') {
        Some((a, p)) => (a, parse_port(s, p)?),
        None => (s, default),
    };
    if addr.parse::<std::net::IpAddr>().is_err() && !crate::pki::is_dns_name(addr) {
        return Err(format!("{s:?}: {addr:?} is neither an IP address nor a host name"));
    }
    Ok((addr.to_string(), port))
}

fn parse_port(whole: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{whole:?}: {p:?} is not a port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

/// `s` percent-encoded for a query string's value.
pub fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_host_port_and_path() {
        let u = |tls, host: &str, port, path: &str| Ok(Url { tls, host: host.into(), port, path: path.into() });
        assert_eq!(Url::parse("http://10.0.0.1:8080/health"), u(false, "10.0.0.1", 8080, "/health"));
        assert_eq!(Url::parse("http://web-1"), u(false, "web-1", 80, "/"));
        assert_eq!(
            Url::parse("https://hooks.slack.com/services/T/B/x"),
            u(true, "hooks.slack.com", 443, "/services/T/B/x")
        );
        assert_eq!(Url::parse("http://[fd00::1]:81/x?y=1#top"), u(false, "fd00::1", 81, "/x?y=1"));
        assert_eq!(Url::parse("http://h:9090?q=1"), u(false, "h", 9090, "/?q=1"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://x:99999/").is_err());
        assert!(Url::parse("http:///path").is_err());
        assert!(Url::parse("https://user:pw@x/").is_err_and(|e| e.contains("credentials")));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_value("rate(x{a=~\"b|c\"}[1m]) < 0.5"),
            "rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29%20%3C%200.5"
        );
    }

    /// A one-shot HTTPS server on loopback with a certificate for "localhost" from a CA of its
    /// own; answers 201 with the request's body.
    async fn https_server(dir: &Path) -> (u16, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), &ca_key).expect("issuer");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
            )
            .expect("server config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(tls) = acceptor.accept(tcp).await else { continue };
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    hyper::Response::builder().status(201).body(Full::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            }
        });
        (port, ca_file)
    }

    #[tokio::test]
    async fn https_trusts_the_given_roots_and_refuses_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, ca) = https_server(dir.path()).await;
        let url = format!("https://localhost:{port}/hook");
        let r = post_json(&url, b"{\"a\":1}".to_vec(), &Roots::File(ca)).await.expect("posted");
        assert_eq!((r.status, r.body.as_str()), (201, "{\"a\":1}"));
        // The system's roots do not know the test CA.
        let e = get(&url, &Roots::System).await.expect_err("untrusted");
        assert!(e.contains("TLS with localhost"), "{e}");
        let e = get(&url, &Roots::File(dir.path().join("missing.pem"))).await.expect_err("no file");
        assert!(e.contains("missing.pem"), "{e}");
    }
}
