//! The API in-process (no TLS, no hosts): authentication, every kind of bad request, the
//! promotion rules, and each answer checked against the OpenAPI document's schema for its route
//! and status.
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use ferry_proto::identity::{CertIdentity, Role};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{AppState, Peer, Shared, api, openapi};
use crate::config::{FleetConfig, Permission};
use crate::pki::{self, CertRequest, Validity};
use crate::registry::NewDeployment;
use crate::tls::ClientTls;

const CI: &str = "ferry_ci_token";
const RM: &str = "ferry_rm_token";

struct Api {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    state: Shared,
    router: Router,
    doc: Value,
}

fn setup() -> Api {
    setup_with_smoke_port(9)
}

/// The staging smoke check targets `port` on web-1 (127.0.0.1).
fn setup_with_smoke_port(port: u16) -> Api {
    setup_from(port, "[app]\nname = \"web\"\n", "")
}

/// The fleet of [`setup`] with `apps` (fleet.toml's app tables) for its app, and `staging` added
/// to the staging environment.
fn setup_from(port: u16, apps: &str, staging: &str) -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    std::fs::create_dir_all(root.join("builds")).expect("mkdir");
    pki::init_ca(&root.join("pki"), false, Validity::days_from_now(1)).expect("ca");
    let req =
        CertRequest { name: "ctl".into(), role: Role::Coordinator, sans: vec![], validity: Validity::days_from_now(1) };
    pki::issue(&root.join("pki"), &req, &root.join("pki"), false).expect("cert");
    // Ports 9 and 10 on loopback: nothing listens, a deployment there fails at once.
    let toml = format!(
        r#"promotion = ["staging", "production"]
registry = "registry.db"
cache_dir = "cache"
max_artifact_bytes = 1048576
{apps}[tls]
ca = "pki/ca.pem"
cert = "pki/ctl.pem"
key = "pki/ctl.key"
revoked = "revoked.txt"
[server]
artifact_roots = ["builds"]
[[server.tokens]]
name = "ci"
sha256 = "{}"
[[server.tokens]]
name = "rm"
sha256 = "{}"
[server.roles]
"token:RM" = ["approve", "promote"]
[environments.staging]
hosts = {{ web-1 = "127.0.0.1:9" }}
{staging}
[[environments.staging.smoke]]
name = "home"
url = "http://{{host}}:{port}/"
timeout = "2s"
[environments.production]
hosts = {{ web-2 = "127.0.0.1:10" }}
require_approval = true
"#,
        crate::commands::token::sha256_hex(CI),
        crate::commands::token::sha256_hex(RM),
    );
    let path = root.join("fleet.toml");
    std::fs::write(&path, toml).expect("write fleet.toml");
    std::fs::write(root.join("revoked.txt"), "").expect("write revoked.txt");
    let config = FleetConfig::load(&path).expect("fleet.toml loads");
    let tls = ClientTls::load(&config.tls).expect("tls");
    let state: Shared = Arc::new(AppState::load(config, tls).expect("state"));
    let router = api::router(state.clone());
    Api { _dir: dir, root, state, router, doc: openapi::document() }
}

impl Api {
    /// Sends a request; answers (status, JSON body). `route` is the documented path template the
    /// answer is checked against.
    async fn call(
        &self,
        method: &str,
        path: &str,
        route: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).expect("request");
        self.send(req, route).await
    }

    async fn send(&self, req: Request<Body>, route: &str) -> (u16, Value) {
        let method = req.method().as_str().to_lowercase();
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        let value: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"));
        if route != "-" {
            conforms(&self.doc, route, &method, status, &value);
        }
        (status, value)
    }

    /// A succeeded deployment of `version` (artifact `dir`) to `env`, as if run earlier.
    fn succeeded(&self, id: &str, env: &str, version: &str, dir: &std::path::Path) {
        let a = crate::artifact::Artifact::scan(dir, None).expect("scan");
        let reg = self.state.registry.as_ref();
        reg.create(&NewDeployment {
            id,
            kind: crate::state::DeploymentKind::Deploy,
            environment: env,
            version,
            release_id: &a.release_id(version),
            artifact: &dir.to_string_lossy(),
            manifest_hash: &hex::encode(a.manifest_hash),
            strategy: "{}",
            app: "web",
            hosts: &[("web-1".to_string(), 0)],
        })
        .expect("create");
        reg.set_status(id, crate::state::DeploymentStatus::Succeeded, None).expect("status");
    }

    fn artifact(&self, name: &str) -> std::path::PathBuf {
        let dir = self.root.join("builds").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("index.html"), name).expect("write");
        dir
    }
}

/// The answer matches the schema documented for `route`/`method`/`status`; an undocumented
/// status fails.
fn conforms(doc: &Value, route: &str, method: &str, status: u16, body: &Value) {
    let op = &doc["paths"][route][method];
    assert!(op.is_object(), "{method} {route} is not documented");
    let schema = &op["responses"][status.to_string()]["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "{method} {route} answered {status}, which the document does not list: {body}");
    if let Err(e) = validate(doc, schema, body, "$") {
        panic!("{method} {route} {status}: the answer does not match the document: {e}\n{body}");
    }
}

/// A small JSON Schema check: $ref, type (one or a list), enum, required, properties,
/// additionalProperties = false, items.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or_default();
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: dangling $ref {r}"));
        }
        return validate(doc, target, v, at);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        return Err(format!("{at}: {v} is not one of {allowed:?}"));
    }
    if let Some(o) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !o.contains_key(r) {
                return Err(format!("{at}: required property {r} is missing"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, val) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, val, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}: unexpected property {k}"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(a)) = (schema.get("items"), v.as_array()) {
        for (i, item) in a.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// What the TLS layer hands over for an operator certificate named `name`.
fn operator(name: &str) -> CertIdentity {
    CertIdentity {
        common_name: Some(name.into()),
        dns_names: vec![],
        ips: vec![],
        role: Some(Role::Operator),
        issuer: String::new(),
        subject: String::new(),
        not_before_unix: 0,
        not_after_unix: i64::MAX,
        is_ca: false,
        serial: "01".into(),
    }
}

#[test]
fn the_document_lists_exactly_the_routes_the_router_serves_and_its_refs_resolve() {
    let doc = openapi::document();
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("operations").keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    let mut served: Vec<(String, String)> =
        api::routes().into_iter().map(|(m, p, _, _)| (m.to_string(), p.to_string())).collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
    // Every schema reference resolves, and every operation has an id and a success answer.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let Some(r) = o.get("$ref").and_then(Value::as_str) {
                    out.push(r.to_string());
                }
                o.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20);
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("odd $ref {r}"));
        assert!(doc["components"]["schemas"][name].is_object(), "dangling $ref {r}");
    }
    for (method, path) in &served {
        let op = &doc["paths"][path][method.to_lowercase()];
        assert!(op["operationId"].is_string(), "{method} {path} has no operationId");
        assert!(op["responses"].as_object().is_some_and(|r| r.keys().any(|k| k.starts_with('2'))), "{method} {path}");
    }
}

#[tokio::test]
async fn credentials_are_required_and_checked() {
    let api = setup();
    // The document and the liveness check are public; everything else needs credentials.
    let (s, doc) = api.call("GET", "/api/openapi.json", "-", None, None).await;
    assert_eq!((s, doc["openapi"].as_str()), (200, Some("3.1.0")));
    let (s, _) = api.call("GET", "/api/v1/health", "/api/v1/health", None, None).await;
    assert_eq!(s, 200);
    let (s, e) = api.call("GET", "/api/v1/versions", "/api/v1/versions", None, None).await;
    assert_eq!((s, e["error"].as_str()), (401, Some("unauthorized")), "{e}");
    let (s, e) = api.call("GET", "/api/v1/versions", "/api/v1/versions", Some("ferry_guess"), None).await;
    assert_eq!(s, 401, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("not one of [server] tokens")), "{e}");
    let req =
        Request::get("/api/v1/versions").header("authorization", "Basic Y2k6eA==").body(Body::empty()).expect("req");
    let (s, e) = api.send(req, "/api/v1/versions").await;
    assert!(s == 401 && e["message"].as_str().is_some_and(|m| m.contains("Bearer")), "{e}");
    let (s, _) = api.call("GET", "/api/v1/versions", "/api/v1/versions", Some(CI), None).await;
    assert_eq!(s, 200);

    // A client certificate: coordinator and operator roles are let in, an agent's is not.
    let cert = |role| CertIdentity { role, ..operator("alice") };
    for (role, want) in
        [(Some(Role::Operator), 200), (Some(Role::Coordinator), 200), (Some(Role::Agent), 403), (None, 403)]
    {
        let mut req = Request::get("/api/v1/versions").body(Body::empty()).expect("req");
        req.extensions_mut().insert(Peer(Some(cert(role))));
        let (s, e) = api.send(req, "-").await;
        assert_eq!(s, want, "{role:?}: {e}");
    }

    // Every call was audited, refused ones included.
    let audit = std::fs::read_to_string(api.root.join("api-audit.log")).expect("audit log");
    let lines: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), 10, "{audit}");
    assert!(lines.iter().any(|l| l["who"] == "unauthenticated" && l["status"] == 401));
    assert!(lines.iter().any(|l| l["who"] == "token:ci" && l["status"] == 200));
    assert!(lines.iter().any(|l| l["who"] == "cert:alice" && l["status"] == 200));
}

#[tokio::test]
async fn bad_requests_get_a_4xx_json_error_that_says_what_is_wrong() {
    let api = setup();
    let t = Some(CI);
    let v = "/api/v1/versions";
    // (method, path, documented route, body, status, error code, what the message says)
    type Case<'a> = (&'a str, &'a str, &'a str, Option<String>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", v, v, Some(r#"{"version": "1.0", "#.into()), 400, "invalid_json", "malformed JSON"),
        ("POST", v, v, Some(r#"{"version": "1.0"}"#.into()), 400, "invalid_json", "missing field `artifact`"),
        (
            "POST",
            v,
            v,
            Some(r#"{"version": "1.0", "artifact": "/x", "colour": 1}"#.into()),
            400,
            "invalid_json",
            "unknown field `colour`",
        ),
        (
            "POST",
            v,
            v,
            Some(r#"{"version": "../1", "artifact": "/x"}"#.into()),
            400,
            "invalid_version",
            "version \"../1\"",
        ),
        (
            "POST",
            v,
            v,
            Some(r#"{"version": "1.0", "artifact": "build"}"#.into()),
            400,
            "invalid_artifact",
            "absolute path",
        ),
        (
            "POST",
            v,
            v,
            Some(r#"{"version": "1.0", "artifact": "/nonexistent/build"}"#.into()),
            422,
            "bad_artifact",
            "/nonexistent/build: No such file",
        ),
        (
            "POST",
            v,
            v,
            Some(r#"{"version": "1.0", "artifact": "/etc"}"#.into()),
            403,
            "artifact_outside_roots",
            "/etc is not under",
        ),
        (
            "POST",
            "/api/v1/deployments",
            "/api/v1/deployments",
            Some(r#"{"environment": "qa", "version": "1.0"}"#.into()),
            422,
            "unknown_environment",
            "unknown environment \"qa\" (fleet.toml declares: production, staging)",
        ),
        (
            "POST",
            "/api/v1/deployments",
            "/api/v1/deployments",
            Some(r#"{"environment": "staging", "version": "9.9"}"#.into()),
            422,
            "version_not_registered",
            "version \"9.9\" of web is not registered",
        ),
        ("GET", "/api/v1/deployments?limit=many", "/api/v1/deployments", None, 400, "invalid_query", "limit"),
        (
            "GET",
            "/api/v1/deployments?environment=qa",
            "/api/v1/deployments",
            None,
            422,
            "unknown_environment",
            "\"qa\"",
        ),
        ("GET", "/api/v1/deployments/d-nope", "/api/v1/deployments/{id}", None, 404, "unknown_deployment", "d-nope"),
        ("GET", "/api/v1/versions/9.9", "/api/v1/versions/{version}", None, 404, "unknown_version", "9.9"),
        (
            "POST",
            "/api/v1/environments/qa/rollback",
            "/api/v1/environments/{environment}/rollback",
            None,
            404,
            "unknown_environment",
            "qa",
        ),
        (
            "POST",
            "/api/v1/deployments/d-nope/promote",
            "/api/v1/deployments/{id}/promote",
            None,
            404,
            "unknown_deployment",
            "d-nope",
        ),
        ("GET", "/api/v2/anything", "-", None, 404, "no_route", "openapi.json"),
        ("DELETE", v, "-", None, 405, "method_not_allowed", "method"),
    ];
    for (method, path, route, body, status, code, says) in cases {
        let (s, e) = api.call(method, path, route, t, body.as_deref()).await;
        assert_eq!((s, e["error"].as_str()), (status, Some(code)), "{method} {path}: {e}");
        let message = e["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{method} {path}: {message:?} should say {says:?}");
    }
    // A file inside the roots that is not an artifact.
    let junk = api.root.join("builds/junk.bin");
    std::fs::write(&junk, b"not an archive").expect("write");
    let body = json!({ "version": "1.0", "artifact": junk }).to_string();
    let (s, e) = api.call("POST", v, v, t, Some(&body)).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("bad_artifact")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("junk.bin")), "{e}");
    // A stopping server starts nothing new, and says so.
    api.state.jobs.cancel_all();
    let route = "/api/v1/environments/{environment}/rollback";
    let (s, e) = api.call("POST", "/api/v1/environments/staging/rollback", route, t, None).await;
    assert_eq!((s, e["error"].as_str()), (503, Some("stopping")), "{e}");
    // An upload that is not an archive.
    let (s, e) = api.call("POST", "/api/v1/artifacts", "/api/v1/artifacts", t, Some("just text")).await;
    assert_eq!((s, e["error"].as_str()), (400, Some("not_an_archive")), "{e}");
}

#[tokio::test]
async fn versions_register_once_and_environments_past_the_first_take_only_promotions() {
    let api = setup();
    let dir = api.artifact("build-1");
    let body = json!({ "version": "1.0", "artifact": dir, "metadata": { "git_commit": "4f2a9c1" } }).to_string();
    let (s, v) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!((v["registered_by"].as_str(), v["files"].as_i64()), (Some("token:ci"), Some(1)));
    // The same content again: 200, the first record. Other content under the version: 409.
    let (s, again) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!((s, again["registered_by"].as_str()), (200, Some("token:ci")));
    std::fs::write(dir.join("index.html"), "changed").expect("write");
    let (s, e) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("version_exists")), "{e}");
    // Deploying it now finds the artifact changed since registration.
    let req = json!({ "environment": "staging", "version": "1.0" }).to_string();
    let (s, e) = api.call("POST", "/api/v1/deployments", "/api/v1/deployments", Some(CI), Some(&req)).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("artifact_changed")), "{e}");
    // Production comes after staging in `promotion`.
    let req = json!({ "environment": "production", "version": "1.0" }).to_string();
    let (s, e) = api.call("POST", "/api/v1/deployments", "/api/v1/deployments", Some(CI), Some(&req)).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("promotion_required")), "{e}");
    let (s, list) = api.call("GET", "/api/v1/versions", "/api/v1/versions", Some(CI), None).await;
    assert_eq!((s, list["versions"].as_array().map(Vec::len)), (200, Some(1)));
    let (s, _) = api.call("GET", "/api/v1/environments", "/api/v1/environments", Some(CI), None).await;
    assert_eq!(s, 200);
}

/// With several apps, every call that starts or looks up something of one app names it; versions
/// are named per app; listings say and filter by app; each app rolls out to its own hosts.
#[tokio::test]
async fn a_server_of_several_apps_keeps_each_apps_versions_and_deployments_apart() {
    let api = setup_from(9, "[apps.web]\n[apps.worker]\nhosts = [\"web-1\"]\n", "");
    let (s, h) = api.call("GET", "/api/v1/health", "/api/v1/health", None, None).await;
    assert_eq!((s, h["app"].clone(), h["apps"].clone()), (200, Value::Null, json!(["web", "worker"])), "{h}");
    let web = api.artifact("build-web");
    let worker = api.artifact("build-worker");
    let register = |app: Option<&str>, dir: &std::path::Path| {
        let mut body = json!({ "version": "1.0", "artifact": dir });
        if let Some(app) = app {
            body["app"] = json!(app);
        }
        body.to_string()
    };
    let v = "/api/v1/versions";
    let (s, e) = api.call("POST", v, v, Some(CI), Some(&register(None, &web))).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("app_required")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("web, worker")), "{e}");
    let (s, e) = api.call("POST", v, v, Some(CI), Some(&register(Some("mailer"), &web))).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("unknown_app")), "{e}");
    // One version name, two apps, two builds.
    for (app, dir) in [("web", &web), ("worker", &worker)] {
        let (s, row) = api.call("POST", v, v, Some(CI), Some(&register(Some(app), dir))).await;
        assert_eq!((s, row["app"].as_str()), (201, Some(app)), "{row}");
    }
    let one = "/api/v1/versions/{version}";
    let (s, e) = api.call("GET", "/api/v1/versions/1.0", one, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("app_required")), "{e}");
    let (s, web_row) = api.call("GET", "/api/v1/versions/1.0?app=web", one, Some(CI), None).await;
    let (_, worker_row) = api.call("GET", "/api/v1/versions/1.0?app=worker", one, Some(CI), None).await;
    assert_eq!(s, 200);
    assert_ne!(web_row["manifest_hash"], worker_row["manifest_hash"], "each app keeps its own build");
    let (_, list) = api.call("GET", "/api/v1/versions?app=worker", v, Some(CI), None).await;
    assert_eq!(list["versions"].as_array().map(Vec::len), Some(1), "{list}");
    let (_, list) = api.call("GET", "/api/v1/versions", v, Some(CI), None).await;
    assert_eq!(list["versions"].as_array().map(Vec::len), Some(2), "{list}");
    // Deployments and rollbacks name their app.
    let d = "/api/v1/deployments";
    let (s, e) = api
        .call("POST", d, d, Some(CI), Some(&json!({ "environment": "staging", "version": "1.0" }).to_string()))
        .await;
    assert_eq!((s, e["error"].as_str()), (422, Some("app_required")), "{e}");
    let rb = "/api/v1/environments/{environment}/rollback";
    let (s, e) = api.call("POST", "/api/v1/environments/staging/rollback", rb, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("app_required")), "{e}");
    let body = json!({ "app": "worker", "environment": "staging", "version": "1.0" }).to_string();
    let (s, started) = api.call("POST", d, d, Some(CI), Some(&body)).await;
    assert_eq!(s, 202, "{started}");
    let id = started["deployment_id"].as_str().expect("id").to_string();
    // Nothing listens on web-1's port: it fails; wait for its end.
    for _ in 0..200 {
        if api.state.jobs.get(&id).is_some_and(|j| j.done()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (s, view) = api.call("GET", &format!("{d}/{id}"), "/api/v1/deployments/{id}", Some(CI), None).await;
    assert_eq!((s, view["app"].as_str(), view["version"].as_str()), (200, Some("worker"), Some("1.0")), "{view}");
    let row = api.state.registry.deployment(&id).expect("registry").expect("recorded");
    assert_eq!(row.app, "worker");
    for (query, n) in [("?app=worker", 1), ("?app=web", 0), ("", 1)] {
        let (s, list) = api.call("GET", &format!("{d}{query}"), d, Some(CI), None).await;
        assert_eq!((s, list["deployments"].as_array().map(Vec::len)), (200, Some(n)), "{query}: {list}");
    }
    let (s, e) = api.call("GET", &format!("{d}?app=mailer"), d, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("unknown_app")), "{e}");
    // The environments say which hosts run which app, and each app's newest deployment.
    let (_, envs) = api.call("GET", "/api/v1/environments", "/api/v1/environments", Some(CI), None).await;
    let staging =
        envs["environments"].as_array().and_then(|a| a.iter().find(|e| e["name"] == "staging")).expect("staging");
    assert_eq!(
        staging["apps"],
        json!([
            { "name": "web", "hosts": ["web-1"], "latest_deployment": null },
            { "name": "worker", "hosts": ["web-1"], "latest_deployment": id },
        ]),
        "{staging}"
    );
    let production =
        envs["environments"].as_array().and_then(|a| a.iter().find(|e| e["name"] == "production")).expect("production");
    assert_eq!(production["apps"][1]["hosts"], json!([]), "worker runs on web-1 only: {production}");
}

/// A freeze refuses API deployments (409, with the next opening); a stated reason starts one,
/// recorded with the deployment and in the audit log.
#[tokio::test]
async fn a_freeze_refuses_api_deployments_unless_overridden_with_a_reason() {
    let api = setup_from(
        9,
        "[app]\nname = \"web\"\n",
        "freezes = [{ from = \"2000-01-01\", to = \"2999-12-31\", reason = \"the long freeze\" }]\n",
    );
    let dir = api.artifact("build-1");
    let v = "/api/v1/versions";
    let (s, _) =
        api.call("POST", v, v, Some(CI), Some(&json!({ "version": "1.0", "artifact": dir }).to_string())).await;
    assert_eq!(s, 201);
    let d = "/api/v1/deployments";
    let (s, e) = api
        .call("POST", d, d, Some(CI), Some(&json!({ "environment": "staging", "version": "1.0" }).to_string()))
        .await;
    assert_eq!((s, e["error"].as_str()), (409, Some("deploy_window_closed")), "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("in the freeze \"the long freeze\" (2000-01-01 to 2999-12-31)")),
        "{e}"
    );
    assert!(api.state.jobs.running_in("staging").is_none());
    let body = json!({ "environment": "staging", "version": "1.0", "override_window": "INC-7 hotfix" }).to_string();
    let (s, started) = api.call("POST", d, d, Some(CI), Some(&body)).await;
    assert_eq!(s, 202, "{started}");
    let id = started["deployment_id"].as_str().expect("id");
    let events = api.state.registry.events_since(id, 0).expect("events");
    let note = events.iter().find(|e| e.kind == "window_override").expect("the override is recorded");
    assert!(
        note.message.starts_with("by token:ci: in the freeze") && note.message.ends_with("overridden: INC-7 hotfix"),
        "{}",
        note.message
    );
    let audit = std::fs::read_to_string(api.root.join("api-audit.log")).expect("audit log");
    let line = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["status"] == 202)
        .expect("audited");
    assert!(line["window_override"].as_str().is_some_and(|o| o.ends_with("overridden: INC-7 hotfix")), "{line}");
    // A rollback is not held back (it is refused here for another reason: nothing to go back to).
    let rb = "/api/v1/environments/{environment}/rollback";
    let (_, e) = api.call("POST", "/api/v1/environments/staging/rollback", rb, Some(CI), None).await;
    assert_ne!(e["error"].as_str(), Some("deploy_window_closed"), "{e}");
}

/// A registry from before versions were kept per app: a single-app server takes its versions.
#[test]
fn a_single_app_server_claims_the_versions_registered_before_apps() {
    let api = setup();
    let reg = api.state.registry.as_ref();
    let row = |app: &str, version: &str| crate::registry::VersionRow {
        app: app.into(),
        version: version.into(),
        artifact: "/a".into(),
        release_id: "r".into(),
        manifest_hash: "h".into(),
        total_bytes: 1,
        files: 1,
        registered_by: "token:ci".into(),
        registered_ms: 1,
        metadata: Default::default(),
    };
    reg.register_version(&row("", "0.9")).expect("register");
    reg.register_version(&row("", "1.0")).expect("register");
    reg.register_version(&row("web", "1.0")).expect("register");
    assert_eq!(reg.claim_versions("web").expect("claim"), 1, "1.0 of web is taken already");
    assert!(reg.version("web", "0.9").expect("lookup").is_some());
    assert!(reg.version("", "0.9").expect("lookup").is_none());
    // The server does it when it starts.
    reg.register_version(&row("", "0.8")).expect("register");
    let config = api.state.config.clone();
    let tls = ClientTls::load(&config.tls).expect("tls");
    let again = AppState::load(config, tls).expect("state");
    assert!(again.registry.version("web", "0.8").expect("lookup").is_some());
}

/// An environment's release of a registered version adds its layout (rendered files, their
/// values) to the build, so its hash is not the version's: a deployment made through the API may
/// be promoted all the same; one made elsewhere only if it is the registered content itself.
#[tokio::test]
async fn a_release_with_its_environments_layout_is_still_the_registered_version() {
    let api = setup();
    let dir = api.artifact("build-1");
    let body = json!({ "version": "1.0", "artifact": dir }).to_string();
    let (s, _) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!(s, 201);
    let a = crate::artifact::Artifact::scan(&dir, None).expect("scan");
    let reg = api.state.registry.as_ref();
    let laid_out = hex::encode(ferry_proto::manifest::hash(&ferry_proto::v1::Manifest {
        vars: vec![ferry_proto::v1::Var { name: "env".into(), value: "staging".into() }],
        ..a.manifest.clone()
    }));
    for (id, by) in [("d-cli", None), ("d-api", Some("token:ci"))] {
        reg.create(&NewDeployment {
            id,
            kind: crate::state::DeploymentKind::Deploy,
            environment: "staging",
            version: "1.0",
            release_id: &ferry_proto::manifest::release_id("1.0", &hex::decode(&laid_out).expect("hex")),
            artifact: &dir.to_string_lossy(),
            manifest_hash: &laid_out,
            strategy: "{}",
            app: "web",
            hosts: &[("web-1".to_string(), 0)],
        })
        .expect("create");
        if let Some(by) = by {
            reg.set_requested_by(id, by, None).expect("requested_by");
        }
        reg.set_status(id, crate::state::DeploymentStatus::Succeeded, None).expect("status");
        let (s, e) = api
            .call(
                "POST",
                &format!("/api/v1/deployments/{id}/promote"),
                "/api/v1/deployments/{id}/promote",
                Some(CI),
                None,
            )
            .await;
        match by {
            None => assert_eq!((s, e["error"].as_str()), (409, Some("promotion_blocked")), "{id}: {e}"),
            // Past the version check, the next gate speaks: its smoke tests never ran.
            Some(_) => assert_eq!((s, e["error"].as_str()), (409, Some("smoke_not_run")), "{id}: {e}"),
        }
    }
}

/// An HTTP server answering 200 "all good" while `healthy` is set, 500 otherwise.
async fn app_server() -> (u16, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let answer: &[u8] = if flag.load(Ordering::SeqCst) {
                b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\nconnection: close\r\n\r\nall good"
            } else {
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 6\r\nconnection: close\r\n\r\nbroken"
            };
            let _ = s.write_all(answer).await;
        }
    });
    (port, healthy)
}

#[tokio::test]
async fn promotion_needs_passed_smoke_tests_the_next_environment_and_another_approver() {
    use std::sync::atomic::Ordering;
    let (port, healthy) = app_server().await;
    let api = setup_with_smoke_port(port);
    let dir = api.artifact("build-1");
    let body = json!({ "version": "1.0", "artifact": dir }).to_string();
    let (s, _) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!(s, 201);
    api.succeeded("d-staging-1", "staging", "1.0", &dir);
    let promote = "/api/v1/deployments/d-staging-1/promote";
    let route = "/api/v1/deployments/{id}/promote";
    let smoke = "/api/v1/deployments/d-staging-1/smoke";
    let smoke_route = "/api/v1/deployments/{id}/smoke";

    let (s, e) = api.call("POST", promote, route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("smoke_not_run")), "{e}");

    // The environment's check fails (the app answers 500): recorded, and the promotion is
    // refused with the check, the host and what it got.
    let (s, run) = api.call("POST", smoke, smoke_route, Some(CI), None).await;
    assert_eq!((s, run["passed"].as_bool()), (200, Some(false)), "{run}");
    assert_eq!((run["results"][0]["host"].as_str(), run["results"][0]["status"].as_u64()), (Some("web-1"), Some(500)));
    let (s, e) = api.call("POST", promote, route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("smoke_failed")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("home on web-1: expected status 200, got 500")), "{e}");

    // Checks sent with the request reach only the deployment's hosts, and do not count for
    // promotion where the environment has its own: a lenient check cannot unlock it.
    let anywhere = json!({ "checks": [{ "name": "x", "url": format!("http://127.0.0.1:{port}/") }] }).to_string();
    let (s, e) = api.call("POST", smoke, smoke_route, Some(CI), Some(&anywhere)).await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_checks")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("{host}")), "{e}");
    let lenient =
        json!({ "checks": [{ "name": "any", "url": format!("http://{{host}}:{port}/"), "expect_status": 500 }] })
            .to_string();
    let (s, run) = api.call("POST", smoke, smoke_route, Some(CI), Some(&lenient)).await;
    assert_eq!((s, run["passed"].as_bool(), run["env_checks"].as_bool()), (200, Some(true), Some(false)), "{run}");
    let (s, e) = api.call("POST", promote, route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("smoke_failed")), "{e}");
    // Regression: `{host}` anywhere in the URL passed, so a request check could read any internal
    // address (`http://127.0.0.2:18888/internal.txt?{host}`) a character at a time.
    for url in [
        "http://127.0.0.1:{port}/?{host}".replace("{port}", &port.to_string()),
        "http://{host}.evil:80/".into(),
        "http://x@{host}/".into(),
    ] {
        let sneaky = json!({ "checks": [{ "name": "x", "url": url }] }).to_string();
        let (s, e) = api.call("POST", smoke, smoke_route, Some(CI), Some(&sneaky)).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("invalid_checks")), "{url}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| m.contains("{host}:PORT")), "{e}");
    }
    let bad = json!({ "checks": [{ "name": "x", "url": "ftp://{host}/" }] }).to_string();
    let (s, e) = api.call("POST", smoke, smoke_route, Some(CI), Some(&bad)).await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_checks")), "{e}");

    // Fixed: the environment's checks pass.
    healthy.store(true, Ordering::SeqCst);
    let (s, run) = api.call("POST", smoke, smoke_route, Some(CI), None).await;
    assert_eq!((s, run["passed"].as_bool()), (200, Some(true)), "{run}");

    // Skipping: the caller names an environment that is not next.
    let (s, e) = api.call("POST", promote, route, Some(CI), Some(r#"{"environment": "staging"}"#)).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("promotion_skips")), "{e}");
    let (s, e) = api.call("POST", promote, route, Some(CI), Some(r#"{"environment": "qa"}"#)).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("unknown_environment")), "{e}");

    // Production requires an approval, not the promoter's own, under any of their identities.
    let (s, e) = api.call("POST", promote, route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (403, Some("approval_required")), "{e}");
    let approve = "/api/v1/deployments/d-staging-1/approve";
    // A pipeline token may not approve at all (its default roles leave approve out).
    let (s, e) = api.call("POST", approve, "/api/v1/deployments/{id}/approve", Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (403, Some("role_required")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("token:ci may not approve")), "{e}");
    let mut req = Request::post(approve).body(Body::empty()).expect("req");
    req.extensions_mut().insert(Peer(Some(operator("ci"))));
    let (s, a) = api.send(req, "/api/v1/deployments/{id}/approve").await;
    assert_eq!(
        (s, a["approved_by"].as_str(), a["environment"].as_str()),
        (201, Some("cert:ci"), Some("production")),
        "{a}"
    );
    let (s, e) = api.call("POST", promote, route, Some(CI), None).await;
    assert_eq!(s, 403, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("does not count")), "{e}");
    let (s, _) = api.call("POST", approve, "/api/v1/deployments/{id}/approve", Some(RM), None).await;
    assert_eq!(s, 201);

    // Now it starts: 202 with the new deployment's id at once.
    let (s, started) = api.call("POST", promote, route, Some(CI), Some(r#"{"environment": "production"}"#)).await;
    assert_eq!(s, 202, "{started}");
    let id = started["deployment_id"].as_str().expect("id").to_string();
    // Its host does not answer (nothing on port 10): it ends failed, as recorded.
    let path = format!("/api/v1/deployments/{id}");
    let mut shown = Value::Null;
    for _ in 0..100 {
        let (s, v) = api.call("GET", &path, "/api/v1/deployments/{id}", Some(CI), None).await;
        assert_eq!(s, 200, "{v}");
        shown = v;
        if shown["running_here"] == false && shown["status"] != "running" && shown["status"] != "pending" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(shown["status"], "failed", "{shown}");
    assert_eq!(
        (shown["requested_by"].as_str(), shown["promoted_from"].as_str()),
        (Some("token:ci"), Some("d-staging-1"))
    );
    assert_eq!(shown["hosts"][0]["state"], "unreachable", "{shown}");
    assert!(shown["events"].as_array().is_some_and(|e| e.iter().any(|e| e["kind"] == "requested")), "{shown}");
    // The approval was used up by that promotion.
    let (s, e) = api.call("POST", promote, route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (403, Some("approval_required")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("good for one promotion")), "{e}");
    // A failed deployment is not promoted, smoke-tested or cancelled.
    let (s, e) = api.call("POST", &format!("{path}/promote"), route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("promotion_blocked")), "{e}");
    let (s, e) = api.call("POST", &format!("{path}/smoke"), smoke_route, Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("not_deployed")), "{e}");
    let (s, e) = api.call("POST", &format!("{path}/cancel"), "/api/v1/deployments/{id}/cancel", Some(CI), None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("finished")), "{e}");
    let (s, list) =
        api.call("GET", "/api/v1/deployments?environment=production", "/api/v1/deployments", Some(CI), None).await;
    assert_eq!((s, list["deployments"][0]["id"].as_str()), (200, Some(id.as_str())), "{list}");
}

#[tokio::test]
async fn query_parameters_are_the_documented_ones() {
    let api = setup();
    for (path, ops) in api.doc["paths"].as_object().expect("paths") {
        let Some(get) = ops.get("get") else { continue };
        if path.contains('{') {
            continue;
        }
        for p in get["parameters"].as_array().into_iter().flatten().filter(|p| p["in"] == "query") {
            let value = match p["name"].as_str() {
                _ if p["schema"]["type"] == "integer" => "5",
                Some("app") => "web",
                _ => "staging",
            };
            let (s, v) = api
                .call("GET", &format!("{path}?{}={value}", p["name"].as_str().unwrap_or("")), path, Some(CI), None)
                .await;
            assert_eq!(s, 200, "GET {path} ?{}: {v}", p["name"]);
        }
        let (s, v) = api.call("GET", &format!("{path}?colour=blue"), "-", Some(CI), None).await;
        let documented = get["parameters"].as_array().is_some_and(|a| a.iter().any(|p| p["in"] == "query"));
        if documented {
            assert_eq!((s, v["error"].as_str()), (400, Some("invalid_query")), "GET {path}?colour: {v}");
        }
    }
}

/// Regression: every refusal of the engine was a 409 `not_started`, whatever its cause. A locked
/// environment is now 409 `environment_locked`, an invalid version 400, nothing to continue 409
/// `not_in_progress`, and a refused request leaves the environment free for the next call.
#[tokio::test]
async fn engine_refusals_get_their_own_status_codes() {
    let api = setup();
    let t = Some(CI);
    let route = "/api/v1/environments/{environment}/rollback";
    // Another coordinator process (this test's) holds staging for a deployment of its own.
    api.state.registry.lock("staging", "d-elsewhere", false).expect("lock");
    let (s, e) = api.call("POST", "/api/v1/environments/staging/rollback", route, t, None).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("environment_locked")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("locked by deployment d-elsewhere")), "{e}");
    api.state.registry.unlock("staging", "d-elsewhere").expect("unlock");
    assert!(api.state.jobs.running_in("staging").is_none(), "a refused call left staging busy");
    // An invalid version to roll back to.
    let body = json!({ "to": "../1" }).to_string();
    let (s, e) = api.call("POST", "/api/v1/environments/staging/rollback", route, t, Some(&body)).await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_version")), "{e}");
    // The same refusal, from the use case the CLI runs, keeps its type.
    let tls = api.state.tls.current();
    let fleet = api.state.fleet(&api.state.config, &tls.agents);
    let cancel = tokio_util::sync::CancellationToken::new();
    let ctx = crate::commands::Ctx {
        config: &api.state.config,
        fleet: &fleet,
        registry: api.state.registry.as_ref(),
        cache: None,
        observer: &crate::rollout::quiet,
        cancel: &cancel,
        force_unlock: false,
        notifier: &crate::notify::OFF,
    };
    let e = crate::commands::resume::resume(&ctx, "staging", true).await.expect_err("nothing paused");
    let api_error = super::error::ApiError::from(e);
    assert_eq!((api_error.status.as_u16(), api_error.code), (409, "not_in_progress"));
}

/// `serve` on a loopback port with an API certificate of its own (`pki/api.pem`, for 127.0.0.1):
/// its address, its shutdown token and its task.
async fn serve_on_loopback(
    api: &Api,
    hangup: Option<tokio::signal::unix::Signal>,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    serve_with(api, hangup, |_| {}).await
}

/// [`serve_on_loopback`] with `edit` applied to fleet.toml first (its `listen` is a free
/// loopback port).
async fn serve_with(
    api: &Api,
    hangup: Option<tokio::signal::unix::Signal>,
    edit: impl FnOnce(&mut FleetConfig),
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let mut config = FleetConfig::load(&api.root.join("fleet.toml")).expect("fleet.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    config.server.listen = format!("127.0.0.1:{port}");
    edit(&mut config);
    if !api.root.join("pki/api.pem").exists() {
        let req = CertRequest {
            name: "api".into(),
            role: Role::Coordinator,
            sans: vec!["127.0.0.1".into()],
            validity: Validity::days_from_now(1),
        };
        pki::issue(&api.root.join("pki"), &req, &api.root.join("pki"), false).expect("api cert");
    }
    (config.server.cert, config.server.key) = (Some(api.root.join("pki/api.pem")), Some(api.root.join("pki/api.key")));
    let tls = ClientTls::load(&config.tls).expect("tls");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ready = move |addr| {
        let _ = tx.send(addr);
    };
    let server = tokio::spawn(super::serve(config, tls, ready, shutdown.clone(), hangup));
    (rx.await.expect("listening"), shutdown, server)
}

/// `serve` takes its shutdown as a token (no signal handler of its own): cancelled, it stops
/// accepting and returns, even with a client that never finished its TLS handshake.
#[tokio::test]
async fn serve_returns_when_its_token_is_cancelled_with_connections_open() {
    let api = setup();
    let (addr, shutdown, server) = serve_on_loopback(&api, None).await;
    // One client stalls before TLS; another is served.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let remote = crate::cli::api_client::Remote::new(&crate::cli::api_client::RemoteArgs {
        url: format!("https://{addr}"),
        ca: Some(api.root.join("pki/ca.pem")),
        ..Default::default()
    })
    .expect("client");
    let health = remote.call("GET", "/api/v1/health", None).await.expect("health");
    assert_eq!(health["status"], "ok");
    shutdown.cancel();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "serve did not return cleanly: {stopped:?}");
    // The stalled client was let go at once, not left to its 10 s handshake timeout.
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), stalled.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the stalled connection is still held: {read:?}");
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Regression: a tiny .tar.zst registered through the API extracted gigabytes. Past
/// max_artifact_bytes the scan stops and the registration is refused, naming the limit.
#[tokio::test]
async fn a_decompression_bomb_is_refused_at_registration() {
    use std::io::Read;
    let api = setup();
    let mut archive = Vec::new();
    {
        let zst = zstd::stream::write::Encoder::new(&mut archive, 19).expect("zstd").auto_finish();
        let mut tar = tar::Builder::new(zst);
        let mut header = tar::Header::new_gnu();
        header.set_size(8 << 20);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "zeros", std::io::repeat(0).take(8 << 20)).expect("append");
        tar.finish().expect("finish");
    }
    assert!(archive.len() < 8192, "{} bytes: not a bomb", archive.len());
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/artifacts")
        .header("authorization", format!("Bearer {CI}"))
        .body(Body::from(archive))
        .expect("request");
    let (s, up) = api.send(req, "/api/v1/artifacts").await;
    assert_eq!(s, 201, "{up}");
    let body = json!({ "version": "1.0", "artifact": up["artifact"] }).to_string();
    let (s, e) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!((s, e["error"].as_str()), (422, Some("bad_artifact")), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("max_artifact_bytes (1048576 bytes)")), "{e}");
}

/// Regression: one keep-alive client could write ~1,500 fsync'd 401 lines a second. Refused
/// calls are recorded one by one only up to 10 per address a minute (60 in all); the calls of
/// identified callers are all recorded.
#[tokio::test]
async fn a_flood_of_unauthenticated_calls_is_sampled_in_the_audit_log() {
    let api = setup();
    for _ in 0..80 {
        let (s, _) = api.call("GET", "/api/v1/versions", "/api/v1/versions", Some("ferry_guess"), None).await;
        assert_eq!(s, 401);
    }
    for _ in 0..3 {
        let (s, _) = api.call("GET", "/api/v1/versions", "/api/v1/versions", Some(CI), None).await;
        assert_eq!(s, 200);
    }
    let audit = std::fs::read_to_string(api.root.join("api-audit.log")).expect("audit log");
    let lines: Vec<Value> = audit.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.iter().filter(|l| l["status"] == 401).count(), 10, "{audit}");
    assert_eq!(lines.iter().filter(|l| l["who"] == "token:ci").count(), 3, "{audit}");
}

#[tokio::test]
async fn each_caller_may_do_only_what_its_roles_allow() {
    let api = setup();
    let dir = api.artifact("build-1");
    let body = json!({ "version": "1.0", "artifact": dir }).to_string();
    // token:rm is listed with approve and promote only: it reads, it does not deploy, register,
    // roll back or cancel.
    for (method, path, route, body) in [
        ("POST", "/api/v1/versions", "/api/v1/versions", Some(body.as_str())),
        ("POST", "/api/v1/deployments", "/api/v1/deployments", Some(r#"{"environment":"staging","version":"1.0"}"#)),
        ("POST", "/api/v1/environments/staging/rollback", "/api/v1/environments/{environment}/rollback", None),
        ("POST", "/api/v1/deployments/d-1/cancel", "/api/v1/deployments/{id}/cancel", None),
        ("POST", "/api/v1/deployments/d-1/smoke", "/api/v1/deployments/{id}/smoke", None),
    ] {
        let (s, e) = api.call(method, path, route, Some(RM), body).await;
        assert_eq!((s, e["error"].as_str()), (403, Some("role_required")), "{path}: {e}");
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains("token:rm may not") && m.contains("[server.roles]")),
            "{e}"
        );
    }
    let (s, _) = api.call("GET", "/api/v1/deployments", "/api/v1/deployments", Some(RM), None).await;
    assert_eq!(s, 200, "reading needs no role");
    // The defaults: a token everything but approve, a certificate everything.
    let (s, _) = api.call("POST", "/api/v1/versions", "/api/v1/versions", Some(CI), Some(&body)).await;
    assert_eq!(s, 201);
    let server = &api.state.config.server;
    assert!(!server.permissions("token:ci").contains(&Permission::Approve));
    assert_eq!(server.permissions("cert:alice"), Permission::ALL.to_vec());
    assert_eq!(
        server.permissions("TOKEN:rm"),
        [Permission::Approve, Permission::Promote],
        "listed: exactly the list, any case"
    );
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_as_soon_as_it_is_listed() {
    let api = setup();
    let call = |serial: &str| {
        let mut req = Request::get("/api/v1/deployments").body(Body::empty()).expect("req");
        req.extensions_mut().insert(Peer(Some(CertIdentity { serial: serial.into(), ..operator("alice") })));
        api.send(req, "/api/v1/deployments")
    };
    assert_eq!(call("0abc").await.0, 200);
    std::fs::write(api.root.join("revoked.txt"), "# alice's laptop\n0A:BC\n").expect("write");
    let (s, e) = call("0abc").await;
    assert_eq!(s, 403, "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("alice") && m.contains("revoked")), "{e}");
    assert_eq!(call("0abd").await.0, 200, "other certificates are not affected");
    // A list that stops parsing keeps the last good one.
    std::fs::write(api.root.join("revoked.txt"), "not a serial\n").expect("write");
    assert_eq!(call("0abc").await.0, 403);
}

/// `ferry serve` re-reads its certificate on SIGHUP: renewed under a new CA, it is served to new
/// connections at once, without a restart.
#[tokio::test]
async fn serve_reloads_its_certificate_on_sighup() {
    let api = setup();
    let pki_dir = api.root.join("pki");
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
    let (addr, shutdown, server) = serve_on_loopback(&api, Some(hangup)).await;
    let health = |ca: std::path::PathBuf| async move {
        let remote = crate::cli::api_client::Remote::new(&crate::cli::api_client::RemoteArgs {
            url: format!("https://{addr}"),
            ca: Some(ca),
            ..Default::default()
        })
        .expect("client");
        remote.call("GET", "/api/v1/health", None).await.map(|v| v["status"].clone())
    };
    assert_eq!(health(pki_dir.join("ca.pem")).await.expect("served"), "ok");

    let new_ca = api.root.join("pki-new");
    pki::init_ca(&new_ca, false, Validity::days_from_now(1)).expect("new CA");
    pki::renew(&new_ca, &pki_dir.join("api.pem"), &pki_dir.join("api.key"), Validity::days_from_now(1)).expect("renew");
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).expect("raise SIGHUP");
    let mut served_new = false;
    for _ in 0..100 {
        if health(new_ca.join("ca.pem")).await.is_ok() {
            served_new = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served_new, "the renewed certificate is not served after SIGHUP");
    let old = health(pki_dir.join("ca.pem")).await.expect_err("the old CA no longer vouches for the API");
    assert!(old.to_string().contains("certificate") || old.to_string().contains("issuer"), "{old}");
    shutdown.cancel();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(30), server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "serve did not return cleanly: {stopped:?}");
}

/// `serve` of `api`'s fleet with `registry` (a PostgreSQL URL), its own state directory `name`,
/// a 1 s leader lease, and its own address advertised.
async fn serve_shared(
    api: &Api,
    registry: &str,
    name: &str,
) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    serve_with(api, None, |config| {
        config.registry = Some(registry.into());
        config.server.artifacts_dir = Some(api.root.join(name).join("artifacts"));
        config.server.audit_log = Some(api.root.join(name).join("audit.log"));
        config.server.leader_lease = std::time::Duration::from_secs(1);
        config.server.advertise = Some(format!("https://{}", config.server.listen));
    })
    .await
}

/// Two `ferry serve` on one PostgreSQL registry: one leads (epoch 1), the other is a standby
/// that answers reads, refuses writes with the leader's address, and takes over with the next
/// epoch once the leader is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_registry_lead_and_stand_by_and_the_standby_takes_over() {
    let Some(pg) = crate::registry::testpg::TestPg::start() else { return };
    let api = setup();
    let url = pg.database("ferry");
    let remote = |addr: std::net::SocketAddr| {
        crate::cli::api_client::Remote::new(&crate::cli::api_client::RemoteArgs {
            url: format!("https://{addr}"),
            ca: Some(api.root.join("pki/ca.pem")),
            token: Some(CI.into()),
            ..Default::default()
        })
        .expect("client")
    };
    let role = async |r: &crate::cli::api_client::Remote, want: &str| -> Value {
        for _ in 0..100 {
            let h = r.call("GET", "/api/v1/health", None).await.expect("health");
            // A server that has not read the lease yet knows no leader.
            if h["role"] == want && h["leader"].is_string() {
                return h;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("never {want}");
    };
    let (a_addr, a_stop, a_task) = serve_shared(&api, &url, "a").await;
    let a = remote(a_addr);
    let h = role(&a, "leader").await;
    let a_url = format!("https://{a_addr}");
    assert_eq!((h["epoch"].as_i64(), h["leader"].as_str()), (Some(1), Some(a_url.as_str())), "{h}");
    let (b_addr, b_stop, b_task) = serve_shared(&api, &url, "b").await;
    let b = remote(b_addr);
    let h = role(&b, "standby").await;
    assert_eq!(h["leader"].as_str(), Some(a_url.as_str()), "{h}");
    // Reads work on the standby; a write is refused with the leader's address...
    b.call("GET", "/api/v1/versions", None).await.expect("a read");
    let deploy = json!({"environment": "staging", "version": "1"});
    let raw = b.call_here("POST", "/api/v1/deployments", Some(&deploy)).await.expect_err("a write");
    let text = raw.to_string();
    assert!(text.contains("503 not_leader") && text.contains(&format!("the leader is {a_url}")), "{text}");
    // ...which the client follows: the leader answers (version 1 was never registered).
    let e = b.call("POST", "/api/v1/deployments", Some(&deploy)).await.expect_err("unknown version");
    assert!(matches!(&e, crate::cli::api_client::RemoteError::Refused { status: 422, .. }), "{e}");
    // An artifact upload (a write) sent to the standby lands on the leader too.
    let uploaded = b.upload(&api.artifact("build-9")).await.expect("uploaded through the standby");
    let path = uploaded["artifact"].as_str().unwrap_or_default();
    assert!(path.starts_with(&api.root.join("a").to_string_lossy().into_owned()), "{uploaded}");
    // The leader stops (and gives the lease up): the standby leads with the next epoch.
    a_stop.cancel();
    let _ = a_task.await;
    let h = role(&b, "leader").await;
    let b_url = format!("https://{b_addr}");
    assert_eq!((h["epoch"].as_i64(), h["leader"].as_str()), (Some(2), Some(b_url.as_str())), "{h}");
    b_stop.cancel();
    let _ = b_task.await;
}
