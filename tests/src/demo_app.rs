//! The demo application the test fleet (and the newcomer's demo) deploys: a tiny HTTP server run
//! by systemd from the current release, whose answers come from the release's own files, so each
//! version can be told apart from outside.
//!
//! - `GET /` → the version; `GET /health` → the release's `health.json`, with status 200 when it
//!   says `"status": "healthy"` and 503 otherwise.
//! - [`Variant::Healthy`] releases (v1, v2, …), [`Variant::Unhealthy`] (a release whose `/health`
//!   says unhealthy: v3 in the scenarios), [`Variant::CrashOnStart`] (exits at once: a unit that
//!   fails to start), [`Variant::BrokenPage`] (healthy to the agent's probes, but `GET /` answers
//!   500: what only a smoke test from outside catches).
use std::path::Path;

/// The demo app's systemd unit, installed on every test host as `web.service` (not enabled: a
/// deployment starts it). `Type=exec` so a missing interpreter or file fails `systemctl start`.
pub const UNIT: &str = "[Unit]\nDescription=ferry demo app (tests)\n\n[Service]\nType=exec\n\
ExecStart=/usr/bin/python3 /srv/web/app.py\nRestart=no\n";

/// Port the demo app listens on, on every host.
pub const PORT: u16 = 8080;

const APP: &str = r##"#!/usr/bin/python3
# ferry demo app: answers from the files of the release it was started from.
import http.server, json, os, sys, threading

HERE = os.path.dirname(os.path.realpath(__file__))
with open(os.path.join(HERE, "VERSION")) as f:
    VERSION = f.read().strip()
with open(os.path.join(HERE, "health.json")) as f:
    HEALTH = f.read()
if json.loads(HEALTH).get("crash_on_start"):
    sys.exit("demo app: this release is built to fail at start")
if json.loads(HEALTH).get("start_delay_ms"):
    import time
    time.sleep(json.loads(HEALTH)["start_delay_ms"] / 1000)
if json.loads(HEALTH).get("exit_after_ms"):
    import threading
    def leave():
        print("demo app: this release is built to exit soon after it starts", flush=True)
        os._exit(3)
    threading.Timer(json.loads(HEALTH)["exit_after_ms"] / 1000, leave).start()

# Requests to /work (which the app sends itself, ~20 a second, once it listens) are counted by
# status and timed for /metrics: `error_every` N makes every Nth one answer 500, `work_ms` is how
# long each takes (default 20 ms).
ERROR_EVERY = json.loads(HEALTH).get("error_every", 0)
WORK_MS = json.loads(HEALTH).get("work_ms", 20)
LOCK = threading.Lock()
COUNTS = {"200": 0, "500": 0}
SECONDS = [0.0, 0]

def traffic():
    import time, urllib.request, urllib.error
    while True:
        time.sleep(0.05)
        try:
            urllib.request.urlopen("http://127.0.0.1:%s/work" % os.environ.get("PORT", "8080"), timeout=2).read()
        except Exception:
            pass

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/work":
            import time
            started = time.monotonic()
            time.sleep(WORK_MS / 1000)
            with LOCK:
                n = COUNTS["200"] + COUNTS["500"] + 1
                code = 500 if ERROR_EVERY and n % ERROR_EVERY == 0 else 200
                COUNTS[str(code)] += 1
                SECONDS[0] += time.monotonic() - started
                SECONDS[1] += 1
            body = b"work\n"
        elif self.path == "/metrics":
            with LOCK:
                lines = ["# TYPE demo_requests_total counter"]
                lines += ['demo_requests_total{code="%s"} %d' % (c, v) for c, v in COUNTS.items()]
                lines += ["# TYPE demo_request_seconds summary",
                          "demo_request_seconds_sum %f" % SECONDS[0], "demo_request_seconds_count %d" % SECONDS[1]]
            body, code = ("\n".join(lines) + "\n").encode(), 200
        elif self.path == "/health":
            healthy = json.loads(HEALTH).get("status") == "healthy"
            body, code = HEALTH.encode(), 200 if healthy else 503
        elif json.loads(HEALTH).get("page_error"):
            body, code = b"internal error\n", 500
        else:
            body, code = (VERSION + "\n").encode(), 200
        self.send_response(code)
        self.send_header("content-type", "application/json" if self.path == "/health" else "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

SERVER = http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)
threading.Thread(target=traffic, daemon=True).start()
SERVER.serve_forever()
"##;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Healthy,
    Unhealthy,
    CrashOnStart,
    /// Healthy, but its `validate` hook (a smoke test) fails.
    FailingValidate,
    /// Like `FailingValidate`, on the named host only (its /etc/hostname).
    FailingValidateOn(&'static str),
    /// Healthy to the health probe, but `GET /` answers 500.
    BrokenPage,
    /// Healthy, but the process exits (status 3) this many milliseconds after it starts.
    ExitsAfter(u32),
    /// Healthy, but only listens this many milliseconds after it starts.
    SlowStart(u32),
    /// Healthy to its probes, but every Nth request to `/work` answers 500 (10: a 10 % error rate
    /// in `/metrics`).
    Errors(u32),
    /// Healthy to its probes, but each request to `/work` takes this many milliseconds (20 for
    /// the others).
    Slow(u32),
}

/// Writes a release of the demo app for `version` into `dir` (created).
pub fn write_release(dir: &Path, version: &str, variant: Variant) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let app = dir.join("app.py");
    std::fs::write(&app, APP)?;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(dir.join("VERSION"), format!("{version}\n"))?;
    // The validate hook the test fleet's fleet.toml configures: a smoke test of the release.
    std::fs::create_dir_all(dir.join("hooks"))?;
    let validate = dir.join("hooks/validate");
    let fail = "echo \"smoke test: /api/orders answered 500\" >&2\nexit 1";
    let verdict = match variant {
        Variant::FailingValidate => fail.to_string(),
        Variant::FailingValidateOn(host) => {
            format!("if [ \"$(cat /etc/hostname)\" = {host} ]; then\n{fail}\nfi\nexit 0")
        }
        _ => "exit 0".to_string(),
    };
    std::fs::write(
        &validate,
        format!(
            "#!/bin/sh\necho \"validate $FERRY_APP $FERRY_VERSION ($FERRY_DEPLOYMENT_ID) in $FERRY_RELEASE_DIR\"\n{verdict}\n"
        ),
    )?;
    std::fs::set_permissions(&validate, std::fs::Permissions::from_mode(0o755))?;
    let health = match variant {
        Variant::Healthy | Variant::FailingValidate | Variant::FailingValidateOn(_) => {
            format!("{{\"status\": \"healthy\", \"version\": \"{version}\"}}")
        }
        Variant::Unhealthy => format!(
            "{{\"status\": \"unhealthy\", \"version\": \"{version}\", \"reason\": \"demo: broken on purpose\"}}"
        ),
        Variant::BrokenPage => format!("{{\"status\": \"healthy\", \"version\": \"{version}\", \"page_error\": true}}"),
        Variant::CrashOnStart => {
            format!("{{\"status\": \"healthy\", \"version\": \"{version}\", \"crash_on_start\": true}}")
        }
        Variant::ExitsAfter(ms) => {
            format!("{{\"status\": \"healthy\", \"version\": \"{version}\", \"exit_after_ms\": {ms}}}")
        }
        Variant::SlowStart(ms) => {
            format!("{{\"status\": \"healthy\", \"version\": \"{version}\", \"start_delay_ms\": {ms}}}")
        }
        Variant::Errors(n) => format!("{{\"status\": \"healthy\", \"version\": \"{version}\", \"error_every\": {n}}}"),
        Variant::Slow(ms) => format!("{{\"status\": \"healthy\", \"version\": \"{version}\", \"work_ms\": {ms}}}"),
    };
    std::fs::write(dir.join("health.json"), health + "\n")
}

/// A Python app for a test, on [`PORT`]: `prelude` runs once at start (with `HERE`, the release
/// directory, and `json` and `os` imported); every GET answers 200 with `body`, a Python
/// expression (which may look at `self.path`).
pub fn python_app(prelude: &str, body: &str) -> String {
    format!(
        r#"#!/usr/bin/python3
import http.server, json, os
HERE = os.path.dirname(os.path.realpath(__file__))
{prelude}

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        data = ({body}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"#
    )
}

/// A healthy release of the demo app in `dir` whose `app.py` is `app` (see [`python_app`]),
/// with `files` (path, content) added or replaced.
pub fn write_app_release(dir: &Path, version: &str, app: &str, files: &[(&str, &str)]) -> std::io::Result<()> {
    write_release(dir, version, Variant::Healthy)?;
    std::fs::write(dir.join("app.py"), app)?;
    for (path, content) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, content)?;
    }
    Ok(())
}
