//! Health probes, run by the agent on its own host: `http` (status, optional JSON field), `tcp`
//! (connect) and `exec` (exit 0). A probe passes once it succeeds and then stays successful for
//! `min_healthy_time`; it fails after `retries` failed attempts `interval` apart. Every attempt
//! has its own `timeout`. The last answer is kept for the report. An exec probe of a release with
//! an app user runs as that user, unless it asks for root (`as_root`).
use std::time::Duration;

use ferry_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::owner::Owner;

/// Largest HTTP response read (status line, headers and body).
const MAX_RESPONSE: usize = 64 * 1024;

/// Why a probe failed: its name and the last answer it got.
#[derive(Debug, Clone, thiserror::Error)]
#[error("health probe {name} failed after {attempts} attempt(s): {last}")]
pub struct ProbeFailure {
    pub name: String,
    pub attempts: u32,
    pub last: String,
}

fn ms(v: u64, default: u64) -> Duration {
    Duration::from_millis(if v == 0 { default } else { v })
}

/// Runs one probe to its verdict.
pub async fn run(p: &v1::HealthProbe, cwd: &std::path::Path, owner: Option<&Owner>) -> Result<(), ProbeFailure> {
    let interval = ms(p.interval_ms, 1000);
    let timeout = ms(p.timeout_ms, 2000);
    let retries = if p.retries == 0 { 10 } else { p.retries };
    let min_healthy = Duration::from_millis(p.min_healthy_time_ms);
    let mut attempts = 0;
    let mut healthy_since: Option<tokio::time::Instant> = None;
    let mut flapped = false;
    loop {
        attempts += 1;
        let outcome = match tokio::time::timeout(timeout, attempt(p, cwd, owner)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        match outcome {
            Ok(_answer) => {
                let since = *healthy_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= min_healthy {
                    return Ok(());
                }
            }
            Err(e) => {
                flapped |= healthy_since.take().is_some();
                if attempts >= retries {
                    let last = if flapped {
                        format!("{e} (it had been healthy, but did not stay healthy for {min_healthy:?})")
                    } else {
                        e
                    };
                    return Err(ProbeFailure { name: p.name.clone(), attempts, last });
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn attempt(p: &v1::HealthProbe, cwd: &std::path::Path, owner: Option<&Owner>) -> Result<String, String> {
    match &p.kind {
        Some(v1::health_probe::Kind::Http(h)) => http(h).await,
        Some(v1::health_probe::Kind::Tcp(t)) => tokio::net::TcpStream::connect(&t.address)
            .await
            .map(|_| format!("connected to {}", t.address))
            .map_err(|e| format!("connect {}: {e}", t.address)),
        Some(v1::health_probe::Kind::Exec(e)) => exec(e, cwd, owner).await,
        None => Err("the probe has no kind (http, tcp or exec)".into()),
    }
}

/// Splits `http://host:port/path`.
pub fn parse_http_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?}: only http:// URLs are probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

async fn http(h: &v1::HttpProbe) -> Result<String, String> {
    let (authority, path) = parse_http_url(&h.url)?;
    let mut s = tokio::net::TcpStream::connect(&authority).await.map_err(|e| format!("connect {authority}: {e}"))?;
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ferry-agent\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("send request: {e}"))?;
    let mut buf = Vec::new();
    s.take(MAX_RESPONSE as u64).read_to_end(&mut buf).await.map_err(|e| format!("read response: {e}"))?;
    let (status, body) = parse_response(&buf)?;
    let brief = String::from_utf8_lossy(&body).trim().chars().take(300).collect::<String>();
    let status_ok =
        if h.expect_status == 0 { (200..300).contains(&status) } else { u32::from(status) == h.expect_status };
    if !status_ok {
        let want = if h.expect_status == 0 { "2xx".to_string() } else { h.expect_status.to_string() };
        return Err(format!("GET {} answered {status} (expected {want}): {brief}", h.url));
    }
    if !h.json_field.is_empty() {
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("GET {}: body is not JSON ({e}): {brief}", h.url))?;
        let got = match v.get(&h.json_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(format!("GET {}: no field {:?} in {brief}", h.url, h.json_field)),
        };
        if got != h.json_value {
            return Err(format!("GET {}: {} is {got:?}, expected {:?}: {brief}", h.url, h.json_field, h.json_value));
        }
    }
    Ok(format!("GET {} answered {status}: {brief}", h.url))
}

/// Status code and body (de-chunked) of an HTTP/1.x response.
pub fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("incomplete HTTP response")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let raw = &buf[end + 4..];
    if !chunked {
        return Ok((status, raw.to_vec()));
    }
    let mut body = Vec::new();
    let mut rest = raw;
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 || rest.len() < size {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
    Ok((status, body))
}

async fn exec(e: &v1::ExecProbe, cwd: &std::path::Path, owner: Option<&Owner>) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(&e.command);
    if let Some(o) = owner.filter(|_| !e.as_root) {
        o.apply(cmd.as_std_mut());
    }
    let out = cmd
        .args(&e.args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| format!("cannot run {}: {err}", e.command))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let brief: String = text.trim().chars().take(300).collect();
    if out.status.success() {
        Ok(format!("{} exited 0: {brief}", e.command))
    } else {
        Err(format!("{} exited with {}: {brief}", e.command, out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_http_url("http://127.0.0.1:8080/health"), Ok(("127.0.0.1:8080".into(), "/health".into())));
        assert_eq!(parse_http_url("http://localhost"), Ok(("localhost:80".into(), "/".into())));
        assert!(parse_http_url("https://x/").is_err());
        assert!(parse_http_url("http:///x").is_err());
    }

    #[test]
    fn responses() {
        let (s, b) = parse_response(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno").expect("parse");
        assert_eq!((s, b.as_slice()), (503, b"no".as_slice()));
        let (s, b) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
        )
        .expect("parse");
        assert_eq!((s, b.as_slice()), (200, b"Wikipedia".as_slice()));
        assert!(parse_response(b"garbage").is_err());
    }

    #[tokio::test]
    async fn http_probe_checks_status_and_json_field() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let bodies = [r#"{"status": "starting"}"#, r#"{"status": "healthy"}"#];
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).await;
                let body = bodies[n.min(1)];
                n += 1;
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let probe = v1::HealthProbe {
            name: "web".into(),
            kind: Some(v1::health_probe::Kind::Http(v1::HttpProbe {
                url: format!("http://{addr}/health"),
                expect_status: 200,
                json_field: "status".into(),
                json_value: "healthy".into(),
            })),
            interval_ms: 10,
            timeout_ms: 1000,
            retries: 3,
            min_healthy_time_ms: 0,
        };
        run(&probe, std::path::Path::new("/"), None).await.expect("healthy on the second try");

        let mut never = probe.clone();
        never.kind = Some(v1::health_probe::Kind::Tcp(v1::TcpProbe { address: "127.0.0.1:1".into() }));
        never.retries = 2;
        let e = run(&never, std::path::Path::new("/"), None).await.expect_err("nothing listens on port 1");
        assert_eq!(e.attempts, 2);
        assert!(e.to_string().contains("health probe web failed after 2 attempt(s): connect 127.0.0.1:1"), "{e}");
    }

    #[tokio::test]
    async fn min_healthy_time_requires_staying_healthy() {
        // A port that accepts once, then closes: healthy at first, not for long.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = listener.accept().await;
            drop(listener);
        });
        let p = v1::HealthProbe {
            name: "flappy".into(),
            kind: Some(v1::health_probe::Kind::Tcp(v1::TcpProbe { address: addr.to_string() })),
            interval_ms: 20,
            timeout_ms: 500,
            retries: 3,
            min_healthy_time_ms: 60_000,
        };
        let e = run(&p, std::path::Path::new("/"), None).await.expect_err("it does not stay healthy");
        assert!(e.last.contains("it had been healthy, but did not stay healthy for 60s"), "{e}");
        // Without min_healthy_time the first success is enough.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut once = p.clone();
        once.kind = Some(v1::health_probe::Kind::Tcp(v1::TcpProbe {
            address: listener.local_addr().expect("addr").to_string(),
        }));
        once.min_healthy_time_ms = 0;
        run(&once, std::path::Path::new("/"), None).await.expect("healthy");
    }

    #[tokio::test]
    async fn exec_probe_reports_output() {
        let p = v1::HealthProbe {
            name: "script".into(),
            kind: Some(v1::health_probe::Kind::Exec(v1::ExecProbe {
                command: "sh".into(),
                args: vec!["-c".into(), "echo broken; exit 3".into()],
                as_root: false,
            })),
            interval_ms: 1,
            retries: 1,
            ..Default::default()
        };
        let e = run(&p, std::path::Path::new("/"), None).await.expect_err("exit 3");
        assert!(e.last.contains("exit status: 3") && e.last.contains("broken"), "{e}");
    }

    #[tokio::test]
    async fn an_exec_probe_runs_as_the_app_user_unless_it_asks_for_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: running a probe as another user needs root");
            return;
        }
        let nobody = Owner::of(&v1::Manifest { user: "nobody".into(), ..Default::default() })
            .expect("lookup")
            .expect("nobody exists");
        let probe = |as_root: bool| v1::HealthProbe {
            name: "whoami".into(),
            kind: Some(v1::health_probe::Kind::Exec(v1::ExecProbe {
                command: "sh".into(),
                args: vec!["-c".into(), "test \"$(id -u)\" = 0".into()],
                as_root,
            })),
            interval_ms: 1,
            retries: 1,
            ..Default::default()
        };
        let cwd = std::path::Path::new("/");
        run(&probe(false), cwd, None).await.expect("no owner: root");
        run(&probe(false), cwd, Some(&nobody)).await.expect_err("as the app user, not root");
        run(&probe(true), cwd, Some(&nobody)).await.expect("as_root");
    }
}
