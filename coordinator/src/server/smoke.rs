//! Smoke tests: HTTP GETs run from the coordinator against a deployment's hosts, each with the
//! status it must answer and, optionally, text its body must contain.
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Host, SmokeCheck};

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    /// The host the check ran against (`null` for a URL without `{host}`).
    pub host: Option<String>,
    pub url: String,
    pub expect_status: u16,
    /// The status the server answered, if it answered.
    pub status: Option<u16>,
    pub passed: bool,
    /// Why it failed.
    pub error: Option<String>,
    pub ms: u64,
}

/// Whether `url` reaches only the host put in for `{host}`: its authority is exactly `{host}`
/// or `{host}:PORT` (a `{host}` anywhere else, as in `http://10.0.0.1/?{host}`, would let the
/// URL go to any address).
pub fn targets_the_host(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    match authority.strip_prefix("{host}") {
        Some("") => true,
        Some(port) => port.strip_prefix(':').is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// Runs every check (a `{host}` check once per host), all at once; results in check order.
pub async fn run(checks: &[SmokeCheck], hosts: &[Host]) -> Vec<CheckResult> {
    let mut runs = Vec::new();
    for check in checks {
        if check.url.contains("{host}") {
            for h in hosts {
                let addr = if h.address.contains(':') { format!("[{}]", h.address) } else { h.address.clone() };
                runs.push((check, Some(h.name.clone()), check.url.replace("{host}", &addr)));
            }
        } else {
            runs.push((check, None, check.url.clone()));
        }
    }
    let all = runs.into_iter().map(|(check, host, url)| async move {
        let started = Instant::now();
        let got = tokio::time::timeout(check.timeout, get(&url)).await;
        let (status, error) = match got {
            Err(_) => (None, Some(format!("no answer within {}", humantime::format_duration(check.timeout)))),
            Ok(Err(e)) => (None, Some(e)),
            Ok(Ok((status, body))) => {
                if status != check.expect_status {
                    (Some(status), Some(format!("expected status {}, got {status}", check.expect_status)))
                } else if let Some(text) = check.contains.as_deref().filter(|t| !body.contains(*t)) {
                    (Some(status), Some(format!("the body does not contain {text:?}")))
                } else {
                    (Some(status), None)
                }
            }
        };
        CheckResult {
            name: check.name.clone(),
            host,
            url,
            expect_status: check.expect_status,
            status,
            passed: error.is_none(),
            error,
            ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    });
    futures_util::future::join_all(all).await
}

async fn get(url: &str) -> Result<(u16, String), String> {
    let r = crate::http::get(url, &crate::http::Roots::System).await?;
    Ok((r.status, r.body))
}

/// How long the slowest check may take, for the caller's own deadline.
pub fn deadline(checks: &[SmokeCheck]) -> Duration {
    checks.iter().map(|c| c.timeout).max().unwrap_or_default() + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_check_passes_on_the_expected_status_and_text_and_fails_otherwise() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let (status, body) =
                        if req.starts_with("GET /ok ") { ("200 OK", "all good") } else { ("404 Not Found", "no") };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        let check = |name: &str, path: &str, contains: Option<&str>| SmokeCheck {
            name: name.into(),
            url: format!("http://127.0.0.1:{port}{path}"),
            expect_status: 200,
            contains: contains.map(str::to_string),
            timeout: Duration::from_secs(5),
        };
        let results = run(
            &[check("ok", "/ok", Some("good")), check("text", "/ok", Some("bad")), check("missing", "/missing", None)],
            &[],
        )
        .await;
        assert!(results[0].passed, "{results:?}");
        assert!(!results[1].passed && results[1].error.as_deref().is_some_and(|e| e.contains("does not contain")));
        assert_eq!(results[2].status, Some(404));
        assert_eq!(results[2].error.as_deref(), Some("expected status 200, got 404"));
    }

    #[test]
    fn only_an_authority_of_host_or_host_and_port_targets_the_host() {
        for url in ["http://{host}/", "https://{host}:8443/health?x={host}", "http://{host}:8080", "http://{host}#a"] {
            assert!(targets_the_host(url), "{url}");
        }
        for url in [
            "http://127.0.0.2:18888/internal.txt?{host}",
            "http://{host}.evil.example/",
            "http://user@{host}/",
            "http://{host}:/",
            "http://{host}:80x/",
            "{host}/x",
            "http://[{host}]/",
        ] {
            assert!(!targets_the_host(url), "{url}");
        }
    }
}
