//! The verbs run here: each parses nothing of its own (clap did), loads fleet.toml once, calls
//! one use case of [`crate::commands`] and renders its value with [`crate::ui`].
use std::path::Path;
use std::sync::Arc;

use clap::CommandFactory;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{CaCommand, CertCommand, Cli, Command, KeyCommand, RegistryCommand, TokenCommand, deploy_exit, fail};
use crate::cache::Cache;
use crate::commands::{self, Ctx};
use crate::config::{AppPick, FleetConfig};
use crate::exit;
use crate::fleet::grpc::Grpc;
use crate::registry::Registry;
use crate::rollout::{self, DeployReport, Observer};
use crate::tls::ClientTls;
use crate::ui::{self, Format};

/// fleet.toml, the coordinator's TLS material and the registry, loaded once per command.
struct Loaded {
    config: FleetConfig,
    tls: ClientTls,
    registry: Arc<dyn Registry>,
    cache: Option<Cache>,
    /// fleet.toml's `[[notify]]` targets.
    notifier: crate::notify::Notifier,
}

impl Loaded {
    fn open(path: &Path, env: Option<&str>) -> anyhow::Result<Loaded> {
        let mut config = FleetConfig::load(path)?;
        if let Some(env) = env {
            config.hosts(env)?;
        }
        let tls = ClientTls::load(&config.tls).map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", path.display()))?;
        let registry = open_registry(&config)?;
        // A shared registry's leader epoch: agents that follow it refuse commands without it.
        config.epoch = registry.lease_of(crate::registry::SERVE_LEASE)?.map_or(0, |l| l.epoch);
        let cache = config.cache_dir().map(Cache::new);
        let notifier = crate::notify::Notifier::start(&config.notify, registry.clone());
        Ok(Loaded { config, tls, registry, cache, notifier })
    }
}

/// The registry fleet.toml names.
fn open_registry(config: &FleetConfig) -> anyhow::Result<Arc<dyn Registry>> {
    Ok(crate::registry::open(config)?)
}

/// What every rollout verb has: its name, fleet.toml, environment, output and --force-unlock.
pub(super) struct RolloutTarget<'a> {
    verb: &'static str,
    config: &'a Path,
    env: &'a str,
    output: Format,
    force_unlock: bool,
    /// `--app`: the app of a fleet.toml of several.
    app: Option<&'a str>,
}

/// The rollout verb `command` is, if it is one.
pub(super) fn rollout_target(command: &Command) -> Option<RolloutTarget<'_>> {
    fn t<'a>(
        verb: &'static str,
        config: &'a std::path::PathBuf,
        env: &'a str,
        output: Format,
        force_unlock: bool,
        app: &'a Option<String>,
    ) -> RolloutTarget<'a> {
        RolloutTarget { verb, config, env, output, force_unlock, app: app.as_deref() }
    }
    match command {
        Command::Deploy(a) => Some(t("deploy", &a.config, &a.env, a.output, a.force_unlock, &a.app)),
        Command::Rollback(a) => Some(t("rollback", &a.config, &a.env, a.output, a.force_unlock, &a.app)),
        Command::Resume(a) => Some(t("resume", &a.config, &a.env, a.output, a.force_unlock, &a.app)),
        Command::Promote(a) => Some(t("promote", &a.config, &a.env, a.output, a.force_unlock, &a.app)),
        _ => None,
    }
}

/// The fleet as the app a verb works on sees it: `--app`, or the only app.
fn select_app(config: &FleetConfig, app: Option<&str>) -> anyhow::Result<FleetConfig> {
    let name = config.pick_app(app).map_err(|e| app_error(config, e))?;
    config.for_app(name).ok_or_else(|| app_error(config, AppPick::Unknown(name.to_string())))
}

/// `--app NAME` of a verb that only reads the registry: the filter it makes
/// ([`FleetConfig::app_filter`]).
fn known_app<'a>(config: &FleetConfig, app: Option<&'a str>) -> anyhow::Result<Option<&'a str>> {
    config.app_filter(app).map_err(|e| app_error(config, e))
}

fn app_error(config: &FleetConfig, e: AppPick) -> anyhow::Error {
    let names = config.app_names().join(", ");
    match e {
        AppPick::Unknown(name) => {
            anyhow::anyhow!("--app {name}: fleet.toml declares no such app (it declares: {names})")
        }
        AppPick::Required => anyhow::anyhow!(
            "fleet.toml declares several apps ({names}): say which with --app NAME (or deploy them all with --bundle DIR)"
        ),
    }
}

/// Renders a verb's value and returns its exit code; an error is printed and exits 2.
fn emit<T, E: Into<anyhow::Error>>(result: Result<T, E>, render: impl FnOnce(&T), code: impl FnOnce(&T) -> u8) -> u8 {
    match result {
        Ok(value) => {
            render(&value);
            code(&value)
        }
        Err(e) => fail(exit::USAGE, &e.into()),
    }
}

fn success<T>(_: &T) -> u8 {
    exit::SUCCESS
}

/// Runs a verb here. A rollout verb runs in a span naming it, its environment and the app, and
/// writes `--metrics-file` when it starts and ends.
pub async fn run(cli: Cli, shutdown: &CancellationToken) -> u8 {
    if let Command::Pipeline(_) = &cli.command {
        return fail(
            exit::USAGE,
            &anyhow::anyhow!("`ferry pipeline` talks to a running `ferry serve`: pass --server URL"),
        );
    }
    let Some(target) = rollout_target(&cli.command) else {
        if let Some(path) = &cli.metrics_file {
            eprintln!(
                "ferry: warning: --metrics-file {} is written only by deploy, rollback, resume and promote",
                path.display()
            );
        }
        return other(cli.command, shutdown).await;
    };
    let (verb, env) = (target.verb, target.env);
    let mut loaded = match Loaded::open(target.config, Some(env)) {
        Ok(l) => l,
        Err(e) => return fail(exit::USAGE, &e),
    };
    let bundle = matches!(&cli.command, Command::Deploy(a) if a.bundle.is_some());
    if !bundle {
        match select_app(&loaded.config, target.app) {
            Ok(view) => loaded.config = view,
            Err(e) => return fail(exit::USAGE, &e),
        }
    }
    let span = tracing::info_span!("run", command = verb, environment = env, app = loaded.config.app.name);
    let mut observed = crate::metrics::Run {
        command: verb,
        environment: env.to_string(),
        started: crate::metrics::now(),
        ended: None,
    };
    write_metrics(cli.metrics_file.as_deref(), loaded.registry.as_ref(), &observed);
    let code = rollout_verb(&loaded, &target, &cli.command, shutdown).instrument(span).await;
    // Notifications still queued get at most their targets' timeout; a rollout never waits.
    loaded.notifier.flush().await;
    observed.ended = Some((crate::metrics::now(), code));
    write_metrics(cli.metrics_file.as_deref(), loaded.registry.as_ref(), &observed);
    code
}

/// `--metrics-file`: a failure to write it is reported, never a reason to fail the rollout.
fn write_metrics(path: Option<&Path>, registry: &dyn Registry, run: &crate::metrics::Run) {
    let Some(path) = path else { return };
    if let Err(e) = crate::metrics::write(path, registry, run) {
        eprintln!("ferry: warning: cannot write the metrics file: {e:#}");
    }
}

/// deploy, rollback, resume, promote.
async fn rollout_verb(
    loaded: &Loaded,
    target: &RolloutTarget<'_>,
    command: &Command,
    shutdown: &CancellationToken,
) -> u8 {
    let (output, force_unlock) = (target.output, target.force_unlock);
    let live = ui::progress(output);
    let observer: &dyn Observer = match live.as_deref() {
        Some(live) => live,
        None => &rollout::quiet,
    };
    let fleet = grpc(loaded, &loaded.config);
    let ctx = ctx_of(loaded, &loaded.config, &fleet, observer, shutdown, force_unlock);
    if let Command::Deploy(a) = command
        && let Some(dir) = &a.bundle
    {
        let done = deploy_bundle(loaded, a, dir, observer, shutdown).await;
        if let Some(live) = &live {
            live.finish();
        }
        return emit(done, |b| ui::bundle_report(b, output), |b| b.exit_code());
    }
    let done = match command {
        Command::Deploy(a) => deploy(&ctx, a, a.artifact.as_deref().unwrap_or(Path::new(""))).await,
        Command::Rollback(a) => commands::rollback::rollback(&ctx, &a.env, a.to.as_deref()).await.map_err(Into::into),
        Command::Resume(a) => commands::resume::resume(&ctx, &a.env, false).await.map_err(Into::into),
        Command::Promote(a) => commands::resume::resume(&ctx, &a.env, true).await.map_err(Into::into),
        _ => Err(anyhow::anyhow!("not a rollout verb")),
    };
    if let Some(live) = &live {
        live.finish();
    }
    emit(done, |r| ui::deploy_report(r, output), deploy_exit)
}

async fn deploy(ctx: &Ctx<'_>, a: &super::DeployArgs, path: &Path) -> anyhow::Result<DeployReport> {
    // Before the scan, which may take a while on a large build.
    commands::deploy::validate(ctx.config, &a.env, &a.version)?;
    let overridden = commands::deploy::window(ctx.config, &a.env, a.override_window.as_deref())?;
    // A Ctrl-C while scanning stops before anything is recorded.
    let artifact = tokio::select! {
        scanned = commands::deploy::scan(ctx, &a.env, path) => scanned?,
        () = ctx.cancel.cancelled() => anyhow::bail!(
            "cancelled while scanning {}: nothing was recorded, no host was touched",
            path.display()
        ),
    };
    ui::deploy_start(&artifact, &a.version, &a.env, a.output);
    Ok(start_and_run(ctx, &a.env, artifact, &a.version, !a.no_prestage, overridden.as_deref()).await?)
}

/// Records a deployment (with its window override, if any), then runs it.
async fn start_and_run(
    ctx: &Ctx<'_>,
    env: &str,
    artifact: std::sync::Arc<crate::artifact::Artifact>,
    version: &str,
    prestage: bool,
    overridden: Option<&str>,
) -> Result<DeployReport, commands::Error> {
    let id = commands::deploy::start(ctx, env, &artifact, version, prestage)?;
    if let Some(note) = overridden {
        commands::deploy::record_override(ctx.registry, &id, &local_user(), note)?;
    }
    commands::deploy::run(ctx, env, &id, artifact).await
}

/// Who runs this command, for the registry.
fn local_user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

/// `ferry deploy --bundle DIR`: every app, in dependency order, each from DIR/APP; the next app
/// starts only once the one before succeeded everywhere. On a failure the set halts, and with the
/// environment's `auto_rollback` the apps already updated are rolled back, last first.
async fn deploy_bundle(
    loaded: &Loaded,
    a: &super::DeployArgs,
    dir: &Path,
    observer: &dyn Observer,
    shutdown: &CancellationToken,
) -> anyhow::Result<ui::BundleReport> {
    let order = loaded.config.app_order().map_err(|c| anyhow::anyhow!("depends_on cycle: {}", c.join(" → ")))?;
    let overridden = commands::deploy::window(&loaded.config, &a.env, a.override_window.as_deref())?;
    // Every artifact is there before any app starts.
    for app in &order {
        let path = dir.join(app);
        if !path.exists() {
            anyhow::bail!(
                "bundle {}: no artifact for app {app} ({} is missing); nothing was deployed",
                dir.display(),
                path.display()
            );
        }
    }
    // Every host that answers declares every app it is to run: a host missing one would halt the
    // set half-way; said here, before any app starts.
    // One status round over the environment's hosts serves every app.
    let status = commands::status::run(&loaded.config, &a.env, &loaded.tls).await?;
    let mut missing = Vec::new();
    for app in &order {
        let runs = |host: &str| {
            loaded.config.apps.get(app).and_then(|c| c.hosts.as_ref()).is_none_or(|hs| hs.iter().any(|h| h == host))
        };
        for h in status.hosts.iter().filter(|h| h.reachable && runs(&h.name)) {
            if h.facts.as_ref().is_some_and(|f| !f.apps.iter().any(|x| x.name == *app)) {
                missing.push(format!("{} lacks app {app}", h.name));
            }
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "bundle: {} (declare it under [apps.NAME] in the host's agent.toml, or leave the host out of the app's `hosts`); nothing was deployed",
            missing.join(", ")
        );
    }
    let auto_rollback = loaded.config.environments.get(&a.env).is_some_and(|e| e.auto_rollback);
    let mut report = ui::BundleReport::default();
    // Every artifact scanned and every secret fetched before any app starts: a bad build or a
    // missing value of the last app must not leave the first ones updated.
    let mut planned: Vec<(FleetConfig, std::sync::Arc<crate::artifact::Artifact>)> = Vec::new();
    for app in &order {
        let Some(config) = loaded.config.for_app(app) else { continue };
        if config.hosts(&a.env)?.is_empty() {
            report.skipped.push(app.clone());
            continue;
        }
        commands::deploy::validate(&config, &a.env, &a.version)?;
        let fleet = grpc(loaded, &config);
        let ctx = ctx_of(loaded, &config, &fleet, observer, shutdown, a.force_unlock);
        let path = dir.join(app);
        let artifact = tokio::select! {
            scanned = commands::deploy::scan(&ctx, &a.env, &path) => scanned.map_err(|e| anyhow::anyhow!("app {app}: {e}; nothing was deployed"))?,
            () = shutdown.cancelled() => anyhow::bail!("cancelled while scanning {}: nothing was deployed", path.display()),
        };
        planned.push((config, artifact));
    }
    let mut updated: Vec<&FleetConfig> = Vec::new();
    for (config, artifact) in &planned {
        let fleet = grpc(loaded, config);
        let ctx = ctx_of(loaded, config, &fleet, observer, shutdown, a.force_unlock);
        ui::deploy_start(artifact, &a.version, &a.env, a.output);
        let r =
            start_and_run(&ctx, &a.env, artifact.clone(), &a.version, !a.no_prestage, overridden.as_deref()).await?;
        let ok = r.status == crate::state::DeploymentStatus::Succeeded;
        report.steps.push(ui::BundleStep { app: config.app.name.clone(), report: r });
        if ok {
            updated.push(config);
            continue;
        }
        // A Ctrl-C stops the set where it is: nothing more is started, not even rollbacks.
        if auto_rollback && !shutdown.is_cancelled() {
            for config in updated.iter().rev() {
                let fleet = grpc(loaded, config);
                let ctx = ctx_of(loaded, config, &fleet, observer, shutdown, false);
                let r = commands::rollback::rollback(&ctx, &a.env, None).await?;
                report.steps.push(ui::BundleStep { app: config.app.name.clone(), report: r });
            }
        }
        break;
    }
    Ok(report)
}

/// The fleet of `config`'s app.
fn grpc<'a>(loaded: &'a Loaded, config: &'a FleetConfig) -> Grpc<'a> {
    Grpc { config, tls: &loaded.tls, cache: loaded.cache.as_ref() }
}

/// A use case's context for `config`'s app.
fn ctx_of<'a>(
    loaded: &'a Loaded,
    config: &'a FleetConfig,
    fleet: &'a Grpc<'a>,
    observer: &'a dyn Observer,
    cancel: &'a CancellationToken,
    force_unlock: bool,
) -> Ctx<'a> {
    Ctx {
        config,
        fleet,
        registry: loaded.registry.as_ref(),
        cache: loaded.cache.as_ref(),
        observer,
        cancel,
        force_unlock,
        notifier: &loaded.notifier,
    }
}

/// Every verb that is not a rollout.
async fn other(command: Command, shutdown: &CancellationToken) -> u8 {
    match command {
        Command::Ca(CaCommand::Init { out, force, days, output }) => {
            emit(commands::ca::init(&out, force, days), |o| ui::ca_init(o, output), success)
        }
        Command::Cert(CertCommand::Issue { ca, name, role, sans, out, force, days, output }) => emit(
            commands::cert::issue(&ca, &name, role, &sans, &out, force, days),
            |o| ui::cert_issue(o, output),
            success,
        ),
        Command::Cert(CertCommand::Renew { ca, file, key, days, output }) => {
            emit(commands::cert::renew(&ca, &file, key.as_deref(), days), |o| ui::cert_issue(o, output), success)
        }
        Command::Cert(CertCommand::Show { file, output }) => {
            emit(commands::cert::show(&file), |c| ui::cert_show(c, output), success)
        }
        Command::Status(args) => {
            let status = async {
                let config = FleetConfig::load(&args.config)?;
                let tls = ClientTls::load(&config.tls)
                    .map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", args.config.display()))?;
                commands::status::run(&config, &args.env, &tls).await
            };
            emit(
                status.await,
                |r| ui::status(r, args.output),
                |r| {
                    if r.unreachable() > 0 { exit::UNREACHABLE } else { exit::SUCCESS }
                },
            )
        }
        Command::Serve { config } => serve(&config, shutdown).await,
        Command::Token(TokenCommand::New { name, output }) => {
            emit(commands::token::new(&name), |t| ui::token(t, output), success)
        }
        Command::Key(KeyCommand::New { name, out, force, output }) => {
            emit(commands::key::new(&name, &out, force), |k| ui::key(k, output), success)
        }
        Command::Registry(RegistryCommand::Migrate { from, to, to_password_file, to_ca, output }) => emit(
            crate::registry::migrate::sqlite_to_postgres(
                &from,
                &crate::config::PostgresRegistry { url: to, ca: to_ca, password_file: to_password_file },
            )
            .map_err(anyhow::Error::from),
            |c| ui::migrated(c, output),
            success,
        ),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error (a closed pipe, a full disk).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ferry", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                Ok(()) => exit::SUCCESS,
                Err(e) => fail(exit::USAGE, &anyhow::anyhow!("writing the {shell} completion script: {e}")),
            }
        }
        Command::Plan(args) => {
            let plan = || -> anyhow::Result<commands::plan::PlanView> {
                let config = select_app(&FleetConfig::load(&args.config)?, args.app.as_deref())?;
                // The registry knows which blue-green group is live; none exists before the first deployment.
                let exists = config.postgres_registry().is_some() || config.registry_path().is_some_and(|p| p.exists());
                let registry = if exists { Some(open_registry(&config)?) } else { None };
                Ok(commands::plan::plan(&config, registry.as_deref(), &args.env)?)
            };
            emit(plan(), |p| ui::plan(p, args.output), success)
        }
        Command::History(args) if args.deployment.is_some() => {
            let id = args.deployment.as_deref().unwrap_or_default();
            let v = FleetConfig::load(&args.config)
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(commands::history::deployment(open_registry(&c)?.as_ref(), id)?));
            emit(v, |v| ui::deployment_detail(v, args.output), success)
        }
        Command::History(args) => {
            let rows = FleetConfig::load(&args.config).map_err(anyhow::Error::from).and_then(|c| {
                let app = known_app(&c, args.app.as_deref())?;
                Ok(commands::history::history(open_registry(&c)?.as_ref(), args.env.as_deref(), app, args.limit)?)
            });
            emit(rows, |rows| ui::history(rows, args.output), success)
        }
        Command::Report(args) => {
            let rows = FleetConfig::load(&args.config).map_err(anyhow::Error::from).and_then(|c| {
                let app = known_app(&c, args.app.as_deref())?;
                Ok(commands::history::report(open_registry(&c)?.as_ref(), args.env.as_deref(), app)?)
            });
            emit(rows, |rows| ui::report(rows, args.output), success)
        }
        Command::Pipeline(_) => fail(exit::USAGE, &anyhow::anyhow!("`ferry pipeline` needs --server URL")),
        Command::Deploy(_) | Command::Rollback(_) | Command::Resume(_) | Command::Promote(_) => {
            fail(exit::USAGE, &anyhow::anyhow!("a rollout verb reached the wrong dispatcher (a bug)"))
        }
    }
}

/// `ferry serve`: exits 2 if it cannot start (configuration, TLS, address in use).
async fn serve(path: &Path, shutdown: &CancellationToken) -> u8 {
    let started = async {
        let config = FleetConfig::load(path)?;
        let tls = ClientTls::load(&config.tls).map_err(|e| anyhow::anyhow!("{}: [tls]: {e}", path.display()))?;
        let (apps, envs) = (config.app_names().join(", "), config.environments.len());
        let noun = if config.apps.len() > 1 { "apps" } else { "app" };
        let ready = move |addr: std::net::SocketAddr| {
            eprintln!(
                "ferry serve: listening on https://{addr} ({noun} {apps}, {envs} environments); API at /api/openapi.json"
            );
        };
        // Registered before the server is ready: SIGHUP must never take its default action (exit).
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler (TLS reload): {e}"))?;
        crate::server::serve(config, tls, ready, shutdown.clone(), Some(hangup)).await
    };
    match started.await {
        Ok(()) => exit::SUCCESS,
        Err(e) => fail(exit::USAGE, &e.context(format!("ferry serve --config {}", path.display()))),
    }
}
