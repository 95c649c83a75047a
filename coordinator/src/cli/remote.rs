//! `--server URL`: the CLI's verbs sent to a running `ferry serve`, with the same output and exit
//! codes as when the engine runs here; and `ferry pipeline`, the steps only the server does
//! (registered versions, smoke tests, approvals, promotion between environments).
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Value, json};

use super::api_client::{Remote, RemoteArgs, RemoteError};
use super::{Cli, Command, deploy_exit, fail};
use crate::exit;
use crate::rollout::DeployReport;
use crate::ui::{self, Format};

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Register VERSION for deployment: upload ARTIFACT (a directory, .tar, .tar.gz or .tar.zst
    /// here), or with --on-server name a path on the server (inside its [server] artifact_roots). Registering the same content
    /// again is a no-op; other content under a registered version is refused.
    Register {
        /// The app it is a build of (needed when the server's fleet.toml declares several).
        #[arg(long)]
        app: Option<String>,
        #[arg(long, short)]
        version: String,
        #[arg(long, short)]
        artifact: PathBuf,
        /// ARTIFACT is a path on the server (under its [server] artifact_roots), not here: nothing
        /// is uploaded.
        #[arg(long)]
        on_server: bool,
        /// Metadata to record with the version (repeatable), e.g. --meta git_commit=4f2a9c1.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Deploy a registered VERSION to an environment and follow it (like `ferry deploy`, without
    /// the upload). An environment after the first of `promotion` only takes promotions.
    Deploy {
        #[arg(long, short)]
        env: String,
        /// The app whose VERSION to deploy (needed when the server's fleet.toml declares several).
        #[arg(long)]
        app: Option<String>,
        #[arg(long, short)]
        version: String,
        /// Stage each batch just before activating it.
        #[arg(long)]
        no_prestage: bool,
        /// Start outside the environment's deploy windows or in a freeze, for this reason.
        #[arg(long, value_name = "REASON")]
        override_window: Option<String>,
        /// Print the deployment id and return at once instead of following it.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Show a deployment: status, hosts, smoke runs, approvals.
    Show {
        deployment: String,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Follow a deployment until it ends (or pauses), then print its report.
    Watch {
        deployment: String,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Run smoke tests (the environment's `smoke` checks) against a deployment and record the
    /// result. Exits 1 if a check failed.
    Smoke {
        deployment: String,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Approve promoting a deployment's version to the next environment (needed where that
    /// environment has require_approval; the promoter's own approval does not count).
    Approve {
        deployment: String,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Deploy a succeeded deployment's version to the next environment of `promotion` (its smoke
    /// tests must have passed) and follow it.
    Promote {
        deployment: String,
        /// The environment you expect it to go to; refused if it is not the next one.
        #[arg(long)]
        to: Option<String>,
        /// Start outside that environment's deploy windows or in a freeze, for this reason.
        #[arg(long, value_name = "REASON")]
        override_window: Option<String>,
        /// Print the new deployment's id and return at once instead of following it.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
    /// Cancel a deployment: hosts in flight finish, the rest are not touched.
    Cancel {
        deployment: String,
        #[arg(long, value_enum, default_value = "human")]
        output: Format,
    },
}

/// The verbs `--server` sends to the server; the rest (ca, cert, plan, …) run here anyway.
pub fn handles(command: &Command) -> bool {
    matches!(
        command,
        Command::Deploy(_)
            | Command::Rollback(_)
            | Command::Promote(_)
            | Command::Resume(_)
            | Command::Status(_)
            | Command::History(_)
            | Command::Report(_)
            | Command::Pipeline(_)
    )
}

/// Where a verb goes when no `--server` is given but its environment has hosts that dial in
/// (only the `ferry serve` they connect to can reach them): fleet.toml's `[server] advertise`,
/// default `https://` + `[server] listen`. With the reason, to say so.
pub fn dial_in_server(command: &Command) -> Option<(String, String)> {
    let env = match command {
        Command::Deploy(a) => &a.env,
        Command::Rollback(a) => &a.env,
        Command::Promote(a) | Command::Resume(a) => &a.env,
        Command::Status(a) => &a.env,
        _ => return None,
    };
    let fleet = crate::config::FleetConfig::load(&config_path(command)).ok()?;
    let dialing: Vec<String> = fleet.hosts(env).ok()?.into_iter().filter(|h| h.dials_in()).map(|h| h.name).collect();
    let first = dialing.first()?;
    let url = match &fleet.server.advertise {
        Some(url) => url.clone(),
        // 0.0.0.0 or [::] is where it listens, not an address to reach it at.
        None if fleet.server.listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_unspecified()) => {
            let port = fleet.server.listen.rsplit(':').next().unwrap_or("8443");
            format!("https://127.0.0.1:{port}")
        }
        None => format!("https://{}", fleet.server.listen),
    };
    let others = if dialing.len() > 1 { format!(" and {} more", dialing.len() - 1) } else { String::new() };
    Some((url, format!("{first}{others} of environment {env} dial in to ferry serve")))
}

fn config_path(command: &Command) -> PathBuf {
    let given = match command {
        Command::Deploy(a) => Some(&a.config),
        Command::Rollback(a) => Some(&a.config),
        Command::Promote(a) | Command::Resume(a) => Some(&a.config),
        Command::Status(a) => Some(&a.config),
        Command::History(a) | Command::Report(a) => Some(&a.config),
        _ => None,
    };
    given
        .cloned()
        .unwrap_or_else(|| std::env::var_os("FERRY_CONFIG").map_or_else(|| "fleet.toml".into(), PathBuf::from))
}

/// How to reach the server: the flags, else what fleet.toml's [tls] offers (its CA; its
/// coordinator certificate when there is no token).
fn remote_args(cli: &Cli, url: String) -> RemoteArgs {
    let fleet = crate::config::FleetConfig::load(&config_path(&cli.command)).ok();
    let mut args = RemoteArgs {
        url,
        ca: cli.server_ca.clone().or_else(|| fleet.as_ref().map(|f| f.tls.ca.clone())),
        token: cli.token.clone().filter(|t| !t.is_empty()),
        client_cert: cli.client_cert.clone(),
        client_key: cli.client_key.clone(),
    };
    if args.token.is_none()
        && args.client_cert.is_none()
        && let Some(f) = &fleet
    {
        args.client_cert = Some(f.tls.cert.clone());
        args.client_key = Some(f.tls.key.clone());
    }
    args
}

/// Sends a verb [`handles`] to the server at `url`.
pub async fn run(cli: Cli, url: String) -> u8 {
    let remote = match Remote::new(&remote_args(&cli, url)) {
        Ok(r) => r,
        Err(e) => return fail(exit::USAGE, &e),
    };
    match verb(&remote, cli.command).await {
        Ok(code) => code,
        Err(e) => {
            let code = e.downcast_ref::<RemoteError>().map_or(exit::USAGE, RemoteError::exit_code);
            fail(code, &e)
        }
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn verb(remote: &Remote, command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Deploy(a) => {
            let Some(artifact) = a.artifact.as_deref() else {
                anyhow::bail!(
                    "--server deploys one app from --artifact (with --app NAME where there are several); --bundle runs without --server"
                );
            };
            register(remote, a.app.as_deref(), &a.version, artifact, false, &[], a.output).await?;
            let body = json!({
                "app": a.app,
                "environment": a.env,
                "version": a.version,
                "prestage": !a.no_prestage,
                "override_window": a.override_window,
            });
            let started = remote.call("POST", "/api/v1/deployments", Some(&body)).await?;
            follow(remote, &started, a.output).await
        }
        Command::Rollback(a) => {
            let body = json!({ "app": a.app, "to": a.to });
            let started =
                remote.call("POST", &format!("/api/v1/environments/{}/rollback", enc(&a.env)), Some(&body)).await?;
            follow(remote, &started, a.output).await
        }
        Command::Promote(a) | Command::Resume(a) if a.force_unlock => {
            anyhow::bail!("--force-unlock is not available through --server (env {}): run it on the coordinator", a.env)
        }
        Command::Promote(a) => continue_env(remote, &a.env, a.app.as_deref(), "continue", a.output).await,
        Command::Resume(a) => continue_env(remote, &a.env, a.app.as_deref(), "resume", a.output).await,
        Command::Status(a) => {
            let v = remote.call("GET", &format!("/api/v1/environments/{}/status", enc(&a.env)), None).await?;
            let report: crate::commands::status::StatusReport = serde_json::from_value(v)?;
            ui::status(&report, a.output);
            Ok(if report.unreachable() > 0 { exit::UNREACHABLE } else { exit::SUCCESS })
        }
        Command::History(a) if a.deployment.is_some() => {
            let id = a.deployment.as_deref().unwrap_or_default();
            let v = remote.call("GET", &format!("/api/v1/deployments/{}", enc(id)), None).await?;
            ui::deployment_detail(&v, a.output);
            Ok(exit::SUCCESS)
        }
        Command::History(a) => {
            let mut path = format!("/api/v1/deployments?limit={}", a.limit);
            path.push_str(&filters(&a));
            let v = remote.call("GET", &path, None).await?;
            let rows: Vec<crate::registry::DeploymentRow> = serde_json::from_value(v["deployments"].clone())?;
            ui::history(&rows, a.output);
            Ok(exit::SUCCESS)
        }
        Command::Report(a) => {
            let path = format!("/api/v1/report?{}", filters(&a).trim_start_matches('&'));
            let v = remote.call("GET", &path, None).await?;
            let rows: Vec<crate::registry::EnvReport> = serde_json::from_value(v["environments"].clone())?;
            ui::report(&rows, a.output);
            Ok(exit::SUCCESS)
        }
        Command::Pipeline(p) => pipeline(remote, p).await,
        _ => anyhow::bail!("this verb does not go through --server"),
    }
}

/// `&environment=E&app=A` of `ferry history` / `ferry report`, for what they name.
fn filters(a: &super::HistoryArgs) -> String {
    let env = a.env.iter().map(|e| format!("&environment={}", enc(e)));
    env.chain(a.app.iter().map(|app| format!("&app={}", enc(app)))).collect()
}

/// Continues (`continue`: a paused canary; `resume`: a dead coordinator's) the deployment holding
/// `env` (which must be of `app`, when given).
async fn continue_env(remote: &Remote, env: &str, app: Option<&str>, how: &str, output: Format) -> anyhow::Result<u8> {
    let envs = remote.call("GET", "/api/v1/environments", None).await?;
    let holder = envs["environments"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == env))
        .ok_or_else(|| anyhow::anyhow!("the server knows no environment {env:?}"))?["locked_by"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no deployment of {env} is in progress"))?;
    if let Some(app) = app {
        let d = remote.call("GET", &format!("/api/v1/deployments/{}", enc(&holder)), None).await?;
        if let Some(other) = d["app"].as_str().filter(|a| !a.is_empty() && a != &app) {
            let (env, id, app, this) = (env.to_string(), holder, other.to_string(), app.to_string());
            return Err(crate::rollout::Error::OtherApp { env, id, app, this }.into());
        }
    }
    let started = remote.call("POST", &format!("/api/v1/deployments/{}/{how}", enc(&holder)), None).await?;
    follow(remote, &started, output).await
}

/// Uploads (unless `on_server`) and registers; prints what happened in human output.
async fn register(
    remote: &Remote,
    app: Option<&str>,
    version: &str,
    artifact: &std::path::Path,
    on_server: bool,
    meta: &[String],
    output: Format,
) -> anyhow::Result<Value> {
    let mut metadata = serde_json::Map::new();
    for m in meta {
        let (k, v) = m.split_once('=').ok_or_else(|| anyhow::anyhow!("--meta {m:?}: expected KEY=VALUE"))?;
        metadata.insert(k.to_string(), Value::String(v.to_string()));
    }
    let path = if on_server {
        artifact.to_string_lossy().into_owned()
    } else {
        if !artifact.exists() {
            anyhow::bail!(
                "--artifact {}: no such file or directory here (pass --on-server for a path on the server)",
                artifact.display()
            );
        }
        let up = remote.upload(artifact).await?;
        if output == Format::Human {
            println!("uploaded {} ({} bytes)", artifact.display(), up["bytes"]);
        }
        up["artifact"].as_str().unwrap_or_default().to_string()
    };
    let body = json!({ "app": app, "version": version, "artifact": path, "metadata": metadata });
    let v = remote.call("POST", "/api/v1/versions", Some(&body)).await?;
    if output == Format::Human {
        println!(
            "registered {version} of {} (release {}, {} files) by {}",
            v["app"].as_str().unwrap_or("?"),
            v["release_id"].as_str().unwrap_or(""),
            v["files"],
            v["registered_by"].as_str().unwrap_or("")
        );
    }
    Ok(v)
}

/// Follows the deployment `started` names (the 202 answer), then prints its report like the
/// local verbs do, and returns their exit code.
async fn follow(remote: &Remote, started: &Value, output: Format) -> anyhow::Result<u8> {
    let id = started["deployment_id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the server did not name the deployment: {started}"))?;
    if output == Format::Human {
        println!("deployment {id} to {} started", started["environment"].as_str().unwrap_or("?"));
    }
    let live = ui::progress(output);
    let end = remote
        .follow(id, |kind, v| {
            let Some(live) = live.as_deref() else { return };
            match kind {
                "line" => live.line(v["host"].as_str().unwrap_or("ferry"), v["message"].as_str().unwrap_or("")),
                "event" => {
                    if let (Some(host), Some(state)) =
                        (v["host"].as_str(), v["kind"].as_str().and_then(crate::state::HostState::parse))
                    {
                        live.state(host, state);
                    }
                }
                _ => {}
            }
        })
        .await;
    if let Some(live) = &live {
        live.finish();
    }
    let end = end?;
    report_of(&end, output)
}

/// `--no-wait`: prints the started deployment's id (or the whole answer as JSON) and returns;
/// otherwise follows it.
async fn follow_unless(no_wait: bool, remote: &Remote, started: &Value, output: Format) -> anyhow::Result<u8> {
    if !no_wait {
        return follow(remote, started, output).await;
    }
    print(started, output, |v| v["deployment_id"].as_str().unwrap_or("").to_string());
    Ok(exit::SUCCESS)
}

/// Prints a deployment's end state like `ferry deploy` does; its exit code.
fn report_of(end: &Value, output: Format) -> anyhow::Result<u8> {
    match serde_json::from_value::<DeployReport>(end.clone()) {
        Ok(report) if report.status.is_finished() || report.status == crate::state::DeploymentStatus::Paused => {
            ui::deploy_report(&report, output);
            Ok(deploy_exit(&report))
        }
        _ => anyhow::bail!(
            "deployment {} stopped while {}: {}",
            end["deployment_id"].as_str().unwrap_or("?"),
            end["status"].as_str().unwrap_or("?"),
            end["error"].as_str().unwrap_or("see the server's log")
        ),
    }
}

fn print(v: &Value, output: Format, human: impl FnOnce(&Value) -> String) {
    if output == Format::Json {
        ui::json(v);
    } else {
        println!("{}", human(v));
    }
}

async fn pipeline(remote: &Remote, p: PipelineCommand) -> anyhow::Result<u8> {
    match p {
        PipelineCommand::Register { app, version, artifact, on_server, meta, output } => {
            let v = register(remote, app.as_deref(), &version, &artifact, on_server, &meta, output).await?;
            if output == Format::Json {
                ui::json(&v);
            }
            Ok(exit::SUCCESS)
        }
        PipelineCommand::Deploy { env, app, version, no_prestage, override_window, no_wait, output } => {
            let body = json!({
                "app": app,
                "environment": env,
                "version": version,
                "prestage": !no_prestage,
                "override_window": override_window,
            });
            let started = remote.call("POST", "/api/v1/deployments", Some(&body)).await?;
            follow_unless(no_wait, remote, &started, output).await
        }
        PipelineCommand::Show { deployment, output } => {
            let v = remote.call("GET", &format!("/api/v1/deployments/{}", enc(&deployment)), None).await?;
            if output == Format::Json {
                ui::json(&v);
                return Ok(exit::SUCCESS);
            }
            println!(
                "{} {} of {} to {}: {}{}",
                v["deployment_id"].as_str().unwrap_or(""),
                v["kind"].as_str().unwrap_or(""),
                v["version"].as_str().unwrap_or(""),
                v["environment"].as_str().unwrap_or(""),
                v["status"].as_str().unwrap_or(""),
                v["requested_by"].as_str().map(|w| format!(" (by {w})")).unwrap_or_default()
            );
            for h in v["hosts"].as_array().into_iter().flatten() {
                println!(
                    "  {:<16} {:<12} {}",
                    h["name"].as_str().unwrap_or(""),
                    h["state"].as_str().unwrap_or(""),
                    h["error"].as_str().unwrap_or("")
                );
            }
            for s in v["smoke"].as_array().into_iter().flatten() {
                println!(
                    "  smoke run {} by {}: {}",
                    s["id"],
                    s["run_by"].as_str().unwrap_or(""),
                    if s["passed"] == true { "passed" } else { "FAILED" }
                );
            }
            for a in v["approvals"].as_array().into_iter().flatten() {
                println!(
                    "  approved for {} by {}",
                    a["environment"].as_str().unwrap_or(""),
                    a["approved_by"].as_str().unwrap_or("")
                );
            }
            Ok(exit::SUCCESS)
        }
        PipelineCommand::Watch { deployment, output } => {
            follow(remote, &json!({ "deployment_id": deployment, "environment": "its environment" }), output).await
        }
        PipelineCommand::Smoke { deployment, output } => {
            let v = remote.call("POST", &format!("/api/v1/deployments/{}/smoke", enc(&deployment)), None).await?;
            print(&v, output, |v| {
                let mut text = format!(
                    "smoke run {} of {}: {}",
                    v["id"],
                    deployment,
                    if v["passed"] == true { "passed" } else { "FAILED" }
                );
                for r in v["results"].as_array().into_iter().flatten() {
                    let on = r["host"].as_str().map(|h| format!(" on {h}")).unwrap_or_default();
                    let verdict = if r["passed"] == true {
                        "ok".to_string()
                    } else {
                        r["error"].as_str().unwrap_or("failed").to_string()
                    };
                    text.push_str(&format!("\n  {}{on}: {verdict} ({} ms)", r["name"].as_str().unwrap_or(""), r["ms"]));
                }
                text
            });
            Ok(if v["passed"] == true { exit::SUCCESS } else { exit::FAILED })
        }
        PipelineCommand::Approve { deployment, output } => {
            let v = remote.call("POST", &format!("/api/v1/deployments/{}/approve", enc(&deployment)), None).await?;
            print(&v, output, |v| {
                format!(
                    "approved {} for {} by {}",
                    v["version"].as_str().unwrap_or(""),
                    v["environment"].as_str().unwrap_or(""),
                    v["approved_by"].as_str().unwrap_or("")
                )
            });
            Ok(exit::SUCCESS)
        }
        PipelineCommand::Promote { deployment, to, override_window, no_wait, output } => {
            let body = json!({ "environment": to, "override_window": override_window });
            let started =
                remote.call("POST", &format!("/api/v1/deployments/{}/promote", enc(&deployment)), Some(&body)).await?;
            follow_unless(no_wait, remote, &started, output).await
        }
        PipelineCommand::Cancel { deployment, output } => {
            let v = remote.call("POST", &format!("/api/v1/deployments/{}/cancel", enc(&deployment)), None).await?;
            print(&v, output, |v| format!("{}: {}", deployment, v["status"].as_str().unwrap_or("")));
            Ok(exit::SUCCESS)
        }
    }
}
