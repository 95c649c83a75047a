//! The OpenAPI 3.1 description of the API, served at `/api/openapi.json`. The tests hold it to
//! the router (same routes and methods) and the handlers' real answers to its schemas.
use serde_json::{Value, json};

fn error_responses(codes: &[u16]) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for code in codes {
        let what = match code {
            400 => "Malformed request: bad JSON, an invalid field",
            401 => "No credentials, or a token that is not configured",
            403 => {
                "The caller lacks the role the route needs (`role_required`: see [server.roles]), a certificate of the wrong role, a missing approval, or an artifact path outside the server's artifact roots"
            }
            404 => "No such deployment, version or environment",
            409 => "The request conflicts with the state: locked environment, blocked promotion, …",
            413 => "The upload is too large",
            422 => {
                "A well-formed request naming something unknown (environment, app, version) or unusable, or naming no app where fleet.toml declares several (`app_required`)"
            }
            500 => "The coordinator itself failed (its registry, a corrupt record): not the request's fault",
            503 => {
                "The server is stopping (it starts nothing new), or is a standby (`not_leader`: the answer names the leader)"
            }
            _ => "Error",
        };
        m.insert(code.to_string(), json!({ "description": what, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }));
    }
    m
}

fn op(id: &str, summary: &str, ok: (u16, &str), body: Option<&str>, errors: &[u16]) -> Value {
    let mut responses = error_responses(errors);
    for always in ["401", "403"] {
        responses.insert(always.into(), error_responses(&[401, 403])[always].clone());
    }
    responses.insert(
        ok.0.to_string(),
        json!({ "description": "Success", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{}", ok.1) } } } }),
    );
    let mut o = json!({ "operationId": id, "summary": summary, "responses": responses });
    if let Some(schema) = body {
        o["requestBody"] = json!({ "required": !schema.ends_with('?'), "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{}", schema.trim_end_matches('?')) } } } });
    }
    o
}

fn path_param(name: &str, what: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": what, "schema": { "type": "string" } })
}

/// The query parameters `names` (environment, app, limit), as documented.
fn query_params(names: &[&str]) -> Value {
    let all = json!([
        { "name": "environment", "in": "query", "required": false, "description": "Only this environment", "schema": { "type": "string" } },
        { "name": "app", "in": "query", "required": false, "description": "Only this app (for one version: the app it is of, needed when fleet.toml declares several)", "schema": { "type": "string" } },
        { "name": "limit", "in": "query", "required": false, "description": "At most this many", "schema": { "type": "integer", "minimum": 0 } }
    ]);
    Value::Array(
        all.as_array().into_iter().flatten().filter(|p| names.iter().any(|n| p["name"] == *n)).cloned().collect(),
    )
}

fn with_params(mut o: Value, params: Value) -> Value {
    o["parameters"] = params;
    o
}

/// The document.
pub fn document() -> Value {
    let id = || json!([path_param("id", "Deployment id, e.g. d-1764000000-1a2b3c")]);
    let env = || json!([path_param("environment", "Environment of fleet.toml")]);
    let mut upload = op(
        "uploadArtifact",
        "Upload an artifact (.tar, .tar.gz or .tar.zst body); stored content-addressed on the coordinator",
        (201, "Upload"),
        None,
        &[400, 413],
    );
    upload["requestBody"] = json!({ "required": true, "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } });
    let mut events = with_params(
        op(
            "deploymentEvents",
            "Follow a deployment as server-sent events: `line`, `event`, and a final `end` carrying the Deployment",
            (200, "Deployment"),
            None,
            &[404],
        ),
        id(),
    );
    events["responses"]["200"] = json!({ "description": "text/event-stream; `end`'s data is a Deployment", "content": { "text/event-stream": { "schema": { "type": "string" } } } });
    let mut openapi = op("openapi", "This document (no credentials needed)", (200, "Any"), None, &[]);
    openapi["security"] = json!([]);
    let mut register = op(
        "registerVersion",
        "Register a version: an artifact on the coordinator (a path, or an upload's `artifact`), who, metadata. 201 when new, 200 when the same content was registered before",
        (201, "Version"),
        Some("VersionRequest"),
        &[400, 403, 409, 422],
    );
    register["responses"]["200"] = register["responses"]["201"].clone();
    register["responses"]["200"]["description"] =
        json!("Already registered with the same content: the existing record");
    let mut health = op("health", "Liveness (no credentials needed)", (200, "Health"), None, &[]);
    health["security"] = json!([]);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ferry coordinator API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Pipelines register versions, deploy them, run smoke tests, promote them through the environments of `promotion`, and roll back. Long operations answer 202 with a deployment id at once; follow them at /api/v1/deployments/{id}/events. Errors are {\"error\": CODE, \"message\": TEXT}."
        },
        "security": [{ "bearer": [] }, { "clientCertificate": [] }],
        "paths": {
            "/api/openapi.json": { "get": openapi },
            "/api/v1/health": { "get": health },
            "/api/v1/artifacts": { "post": upload },
            "/api/v1/versions": {
                "post": register,
                "get": with_params(op("listVersions", "Registered versions, newest first", (200, "VersionList"), None, &[400, 422]), query_params(&["app", "limit"]))
            },
            "/api/v1/versions/{version}": {
                "get": with_params(op("getVersion", "One registered version", (200, "Version"), None, &[404, 422]), json!([path_param("version", "The version label"), query_params(&["app"])[0].clone()]))
            },
            "/api/v1/environments": {
                "get": op("listEnvironments", "Environments, their hosts, promotion order, locks and latest deployment, and each app's hosts and latest deployment there", (200, "EnvironmentList"), None, &[])
            },
            "/api/v1/environments/{environment}/status": {
                "get": with_params(op("environmentStatus", "Ask every host of the environment for its facts and current release", (200, "Status"), None, &[404]), env())
            },
            "/api/v1/environments/{environment}/rollback": {
                "post": with_params(op("rollback", "Roll the environment back (to each host's previous release, or `to`); unwinds an unfinished deployment first", (202, "Accepted"), Some("RollbackRequest?"), &[400, 404, 409, 422, 500, 503]), env())
            },
            "/api/v1/deployments": {
                "post": op("createDeployment", "Deploy a registered version to an environment (environments after the first of `promotion` only through promote)", (202, "Accepted"), Some("DeploymentRequest"), &[400, 409, 422, 500, 503]),
                "get": with_params(op("listDeployments", "Deployments and rollbacks, newest first", (200, "DeploymentList"), None, &[400, 422]), query_params(&["environment", "app", "limit"]))
            },
            "/api/v1/deployments/{id}": {
                "get": with_params(op("getDeployment", "A deployment: status, per-host state, bytes, timings, smoke runs, approvals, metric gate measurements, recorded events", (200, "Deployment"), None, &[404]), id())
            },
            "/api/v1/deployments/{id}/events": { "get": events },
            "/api/v1/deployments/{id}/smoke": {
                "post": with_params(op("runSmoke", "Run smoke tests (the environment's `smoke`, or `checks`) from the coordinator against the deployment's hosts; the run is recorded", (200, "SmokeRun"), Some("SmokeRequest?"), &[400, 404, 409, 422]), id())
            },
            "/api/v1/deployments/{id}/approve": {
                "post": with_params(op("approve", "Approve promoting the deployment's version to the next environment", (201, "Approval"), None, &[404, 409]), id())
            },
            "/api/v1/deployments/{id}/promote": {
                "post": with_params(op("promote", "Deploy a succeeded deployment's version to the next environment of `promotion`, once its smoke tests passed and (where required) another identity approved", (202, "Accepted"), Some("PromoteRequest?"), &[400, 403, 404, 409, 422, 500, 503]), id())
            },
            "/api/v1/deployments/{id}/continue": {
                "post": with_params(op("continueCanary", "Continue a canary paused at a manual step with its next batch (`ferry promote`)", (202, "Accepted"), None, &[404, 409, 500, 503]), id())
            },
            "/api/v1/deployments/{id}/resume": {
                "post": with_params(op("resume", "Continue a deployment whose coordinator died", (202, "Accepted"), None, &[404, 409, 500, 503]), id())
            },
            "/api/v1/deployments/{id}/cancel": {
                "post": with_params(op("cancel", "Cancel: hosts in flight finish, the rest are not touched", (202, "Cancelling"), None, &[404, 409, 500, 503]), id())
            },
            "/api/v1/report": {
                "get": with_params(op("report", "Per environment and app: deployments per week, success and rollback rates, durations", (200, "Report"), None, &[400, 422]), query_params(&["environment", "app"]))
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "A token whose SHA-256 is in [server] tokens" },
                "clientCertificate": { "type": "mutualTLS", "description": "A fleet CA certificate of role coordinator or operator" }
            },
            "schemas": schemas()
        }
    })
}

fn schemas() -> Value {
    let s = || json!({ "type": "string" });
    let ns = || json!({ "type": ["string", "null"] });
    let int = || json!({ "type": "integer" });
    let nint = || json!({ "type": ["integer", "null"] });
    json!({
        "Any": {},
        "Error": { "type": "object", "required": ["error", "message"], "properties": { "error": s(), "message": s() } },
        "Health": { "type": "object", "required": ["status", "version", "apps"], "properties": { "status": s(), "version": s(), "app": { "type": ["string", "null"], "description": "The fleet's app; null when it declares several" }, "apps": { "type": "array", "items": s() }, "role": { "type": "string", "enum": ["leader", "standby"], "description": "On a shared (PostgreSQL) registry: whether this server leads (runs rollouts, takes writes) or stands by (reads only; writes get 503 not_leader with the leader's address)" }, "epoch": { "type": "integer", "description": "The fencing epoch this server's commands carry (0 on a SQLite registry)" }, "leader": { "type": ["string", "null"], "description": "The leader's address, as this server last saw it" } } },
        "Upload": { "type": "object", "required": ["artifact", "bytes", "blake3"], "properties": { "artifact": s(), "bytes": int(), "blake3": s() } },
        "VersionRequest": {
            "type": "object", "required": ["version", "artifact"], "additionalProperties": false,
            "properties": { "app": { "type": "string", "description": "The app it is a build of (needed when fleet.toml declares several)" }, "version": s(), "artifact": { "type": "string", "description": "Absolute path on the coordinator" }, "metadata": { "type": "object", "additionalProperties": { "type": ["string", "number", "boolean", "null"] } } }
        },
        "Version": {
            "type": "object",
            "required": ["app", "version", "artifact", "release_id", "manifest_hash", "total_bytes", "files", "registered_by", "registered_ms", "metadata"],
            "properties": { "app": s(), "version": s(), "artifact": s(), "release_id": s(), "manifest_hash": s(), "total_bytes": int(), "files": int(), "registered_by": s(), "registered_ms": int(), "metadata": { "type": "object" } }
        },
        "VersionList": { "type": "object", "required": ["versions"], "properties": { "versions": { "type": "array", "items": { "$ref": "#/components/schemas/Version" } } } },
        "EnvironmentList": {
            "type": "object", "required": ["environments", "promotion"],
            "properties": {
                "promotion": { "type": "array", "items": s() },
                "environments": { "type": "array", "items": {
                    "type": "object", "required": ["name", "hosts", "strategy", "require_approval", "smoke_checks"],
                    "properties": { "name": s(), "hosts": { "type": "array", "items": s() }, "strategy": s(), "promotion_index": nint(), "next_environment": ns(), "require_approval": { "type": "boolean" }, "smoke_checks": int(), "locked_by": ns(), "latest_deployment": ns(),
                        "apps": { "type": "array", "items": { "type": "object", "required": ["name", "hosts", "latest_deployment"], "properties": { "name": s(), "hosts": { "type": "array", "items": s() }, "latest_deployment": ns() } } } }
                } }
            }
        },
        "Status": { "type": "object", "required": ["environment", "app", "hosts"], "properties": { "environment": s(), "app": s(), "hosts": { "type": "array", "items": { "type": "object", "required": ["name", "address", "reachable"] } } } },
        "RollbackRequest": { "type": "object", "additionalProperties": false, "properties": { "app": { "type": "string", "description": "The app to roll back (needed when fleet.toml declares several)" }, "to": s() } },
        "DeploymentRequest": {
            "type": "object", "required": ["environment", "version"], "additionalProperties": false,
            "properties": { "app": { "type": "string", "description": "The app to deploy (needed when fleet.toml declares several)" }, "environment": s(), "version": s(), "prestage": { "type": "boolean", "default": true }, "override_window": { "type": "string", "description": "Start outside the environment's deploy windows or in a freeze, for this reason (recorded with the deployment and in the audit log); without it such a deployment is refused with 409 deploy_window_closed, naming the next opening" } }
        },
        "Accepted": {
            "type": "object", "required": ["deployment_id", "environment", "status_url", "events_url"],
            "properties": { "deployment_id": s(), "environment": s(), "status_url": s(), "events_url": s() }
        },
        "Cancelling": { "type": "object", "required": ["deployment_id", "status"], "properties": { "deployment_id": s(), "status": s() } },
        "DeploymentSummary": {
            "type": "object", "required": ["id", "kind", "environment", "version", "status", "started_ms"],
            "properties": { "id": s(), "kind": s(), "environment": s(), "app": s(), "version": s(), "release_id": s(), "status": s(), "started_ms": int(), "finished_ms": nint(), "error": ns(), "bytes_sent": int(), "hosts_failed": int(), "requested_by": ns(), "promoted_from": ns() }
        },
        "DeploymentList": { "type": "object", "required": ["deployments"], "properties": { "deployments": { "type": "array", "items": { "$ref": "#/components/schemas/DeploymentSummary" } } } },
        "Deployment": {
            "type": "object",
            "required": ["deployment_id", "kind", "environment", "version", "release_id", "status", "bytes_sent", "total_bytes", "hosts", "started_ms", "smoke", "approvals", "events"],
            "properties": {
                "deployment_id": s(), "kind": { "enum": ["deploy", "rollback"] }, "environment": s(), "app": s(), "version": s(), "release_id": s(),
                "status": { "enum": ["pending", "running", "paused", "succeeded", "failed", "rolled_back", "cancelled"] },
                "error": ns(), "bytes_sent": int(), "total_bytes": int(), "started_ms": int(), "finished_ms": nint(),
                "requested_by": ns(), "promoted_from": ns(), "next_environment": ns(), "running_here": { "type": "boolean" },
                "hosts": { "type": "array", "items": {
                    "type": "object", "required": ["name", "status", "state", "bytes_sent", "duration_ms"],
                    "properties": { "name": s(), "status": s(), "state": s(), "batch": int(), "bytes_sent": int(), "duration_ms": int(), "activate_ms": int(), "release": ns(), "previous_release": ns(), "error": ns() }
                } },
                "smoke": { "type": "array", "items": { "$ref": "#/components/schemas/SmokeRun" } },
                "approvals": { "type": "array", "items": { "$ref": "#/components/schemas/Approval" } },
                "measurements": { "type": "array", "description": "metric gates' measurements, oldest first (absent without gates)", "items": {
                    "type": "object", "required": ["deployment_id", "batch", "gate", "at_ms", "outcome", "detail"],
                    "properties": { "deployment_id": s(), "batch": int(), "gate": s(), "at_ms": int(), "outcome": { "type": "string", "enum": ["pass", "fail", "inconclusive", "skipped"] }, "value": { "type": ["number", "null"] }, "baseline": { "type": ["number", "null"] }, "detail": s() }
                } },
                "events": { "type": "array", "items": { "$ref": "#/components/schemas/Event" } }
            }
        },
        "SmokeCheck": {
            "type": "object", "required": ["name", "url"], "additionalProperties": false,
            "properties": { "name": s(), "url": { "type": "string", "description": "http:// URL; {host} runs it once per host of the deployment" }, "expect_status": { "type": "integer", "default": 200 }, "contains": s(), "timeout": { "type": "string", "default": "5s" } }
        },
        "SmokeRequest": { "type": "object", "additionalProperties": false, "properties": { "checks": { "type": "array", "items": { "$ref": "#/components/schemas/SmokeCheck" } } } },
        "SmokeRun": {
            "type": "object", "required": ["id", "deployment_id", "run_by", "started_ms", "finished_ms", "passed", "results"],
            "properties": {
                "id": int(), "deployment_id": s(), "run_by": s(), "started_ms": int(), "finished_ms": int(), "passed": { "type": "boolean" },
                "results": { "type": "array", "items": {
                    "type": "object", "required": ["name", "url", "expect_status", "passed", "ms"],
                    "properties": { "name": s(), "host": ns(), "url": s(), "expect_status": int(), "status": nint(), "passed": { "type": "boolean" }, "error": ns(), "ms": int() }
                } }
            }
        },
        "Event": {
            "type": "object", "required": ["seq", "time_ms", "kind", "message"],
            "properties": { "seq": int(), "time_ms": int(), "host": ns(), "kind": { "type": "string", "description": "created, a host state (staging, activating, healthy, …), pause, switching, smoke, approved, a deployment status" }, "message": s() }
        },
        "Approval": {
            "type": "object", "required": ["deployment_id", "environment", "approved_by"],
            "properties": { "deployment_id": s(), "version": s(), "environment": s(), "approved_by": s(), "time_ms": int() }
        },
        "PromoteRequest": { "type": "object", "additionalProperties": false, "properties": { "environment": { "type": "string", "description": "The environment the caller expects; refused unless it is the next one" }, "override_window": { "type": "string", "description": "Start outside the next environment's deploy windows or in a freeze, for this reason" } } },
        "Report": { "type": "object", "required": ["environments"], "properties": { "environments": { "type": "array", "items": { "type": "object", "required": ["environment", "deployments", "success_rate", "rollback_rate"] } } } }
    })
}
