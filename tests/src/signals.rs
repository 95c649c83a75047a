//! What a rollout hears from outside the hosts, run for real in the coordinator's namespace of a
//! [`Fleet`]: a Prometheus server (Debian's, from `scripts/deps.sh`) scraping the demo app on
//! every host, and a webhook receiver (a small Python HTTP server) that records every POST and
//! answers a status the test chooses. Both are killed when dropped.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fleet::{Fleet, Unsupported, poll};

/// Where `scripts/deps.sh --test` unpacks Debian's prometheus package (when it is not installed).
const UNPACKED: &str = "/var/cache/ferry-test/prometheus/usr/bin/prometheus";

/// The Prometheus binary, or why there is none.
pub fn prometheus_bin() -> Result<PathBuf, Unsupported> {
    let on_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("prometheus")).find(|p| p.is_file()));
    on_path.or_else(|| Some(PathBuf::from(UNPACKED)).filter(|p| p.is_file())).ok_or_else(|| {
        Unsupported("prometheus is not installed (scripts/deps.sh --test unpacks Debian's package)".into())
    })
}

/// A process started in the coordinator's namespace, killed (with its group) on drop.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

fn spawn_in(fleet: &Fleet, args: &[&str], log: &Path) -> Spawned {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let err = out.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
    let child = Command::new("ip")
        .args(["netns", "exec", &fleet.ctl_ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    Spawned(child)
}

/// A real Prometheus on 127.0.0.1:9090 of the coordinator's namespace, scraping the demo app
/// (port 8080) of every host every second, each target labelled `host="web-N"`.
pub struct Prometheus {
    _process: Spawned,
    pub url: String,
    log: PathBuf,
}

impl Prometheus {
    pub fn start(fleet: &Fleet, bin: &Path) -> Prometheus {
        let dir = fleet.dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("prometheus dir: {e}"));
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
        config.push_str("  - job_name: demo\n    static_configs:\n");
        for h in &fleet.hosts {
            config.push_str(&format!(
                "      - targets: ['{}:{}']\n        labels: {{host: '{}'}}\n",
                h.ip,
                crate::demo_app::PORT,
                h.name
            ));
        }
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap_or_else(|e| panic!("prometheus.yml: {e}"));
        let log = dir.join("prometheus.log");
        let process = spawn_in(
            fleet,
            &[
                &bin.to_string_lossy(),
                &format!("--config.file={}", config_file.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                "--web.listen-address=127.0.0.1:9090",
            ],
            &log,
        );
        let p = Prometheus { _process: process, url: "http://127.0.0.1:9090".into(), log };
        let ready = poll(Duration::from_secs(30), || {
            fleet.http_get("http://127.0.0.1:9090/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        assert!(ready.is_some(), "Prometheus did not become ready:\n{}", p.log_tail());
        p
    }

    /// Waits until every host's demo app is scraped (`up == 1`) and has served requests.
    pub fn wait_scraped(&self, fleet: &Fleet) {
        let want = fleet.hosts.len();
        let query = "count(rate(demo_requests_total[5s]) > 0)";
        let all = poll(Duration::from_secs(30), || {
            let (_, body) = fleet
                .http_get(&format!("{}/api/v1/query?query={}", self.url, ferry_coordinator::http::query_value(query)))
                .ok()?;
            body.contains(&format!("\"{want}\"")).then_some(())
        });
        assert!(all.is_some(), "Prometheus never saw the demo app on all {want} hosts:\n{}", self.log_tail());
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

const RECEIVER: &str = r#"
import http.server, json, os, sys, time
LOG, STATUS, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))) or b"null")
        with open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body}) + "\n")
        point = body.get("point", "") if isinstance(body, dict) else ""
        at = STATUS + "-" + point
        status = int(open(at if point and os.path.exists(at) else STATUS).read().strip() or "200")
        self.send_response(status)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H).serve_forever()
"#;

/// A webhook receiver on 127.0.0.1:`port` of the coordinator's namespace: every POST's path and
/// JSON body appended to its log, answered with the status [`Receiver::answer`] set (200).
pub struct Receiver {
    _process: Spawned,
    log: PathBuf,
    status: PathBuf,
    pub port: u16,
}

impl Receiver {
    pub fn start(fleet: &Fleet, port: u16) -> Receiver {
        let dir = fleet.dir.join(format!("receiver-{port}"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("receiver dir: {e}"));
        let (log, status, script) = (dir.join("posts.jsonl"), dir.join("status"), dir.join("receiver.py"));
        std::fs::write(&status, "200").unwrap_or_else(|e| panic!("status: {e}"));
        std::fs::write(&script, RECEIVER).unwrap_or_else(|e| panic!("receiver.py: {e}"));
        let process = spawn_in(
            fleet,
            &[
                "/usr/bin/python3",
                &script.to_string_lossy(),
                &log.to_string_lossy(),
                &status.to_string_lossy(),
                &port.to_string(),
            ],
            &dir.join("receiver.log"),
        );
        let r = Receiver { _process: process, log, status, port };
        let up = poll(Duration::from_secs(10), || {
            let probe = Command::new("ip")
                .args(["netns", "exec", &fleet.ctl_ns, "python3", "-c"])
                .arg(format!("import socket; socket.create_connection(('127.0.0.1', {port}), 1)"))
                .status()
                .ok()?;
            probe.success().then_some(())
        });
        assert!(up.is_some(), "the webhook receiver on port {port} never listened");
        r
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The status every later POST is answered with.
    pub fn answer(&self, status: u16) {
        std::fs::write(&self.status, status.to_string()).unwrap_or_else(|e| panic!("status: {e}"));
    }

    /// The status later webhook-gate POSTs at `point` (their body's "point") are answered with.
    pub fn answer_at(&self, point: &str, status: u16) {
        let file = PathBuf::from(format!("{}-{point}", self.status.display()));
        std::fs::write(file, status.to_string()).unwrap_or_else(|e| panic!("status: {e}"));
    }

    /// Every POST so far: (path, body), oldest first.
    pub fn posts(&self) -> Vec<(String, serde_json::Value)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| (v["path"].as_str().unwrap_or_default().to_string(), v["body"].clone()))
            .collect()
    }

    /// Forgets the POSTs so far.
    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.log);
    }
}
