//! Real agents on loopback, and fleet configs that point at them.
use std::net::SocketAddr;
use std::path::Path;

use ferry_agent::server::Refusals;
use ferry_agent::{AgentConfig, Server};
use ferry_coordinator::config::FleetConfig;
use tokio_util::sync::CancellationToken;

use crate::pki::CertFiles;

/// An agent serving on 127.0.0.1 with a random port, stopped on drop.
pub struct TestAgent {
    pub addr: SocketAddr,
    pub refusals: Refusals,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The agent.toml of a test agent: app `web` rooted in `data_dir`'s sibling.
pub fn agent_toml(files: &CertFiles, data_dir: &Path) -> String {
    agent_toml_with(files, data_dir, "")
}

/// [`agent_toml`] with `top` (top-level keys) added.
pub fn agent_toml_with(files: &CertFiles, data_dir: &Path, top: &str) -> String {
    format!("listen = \"127.0.0.1:0\"\n{}", agent_toml_without_listen(files, data_dir, top))
}

/// [`agent_toml_with`] without `listen` (an agent that only dials out, given `connect` in `top`).
pub fn agent_toml_without_listen(files: &CertFiles, data_dir: &Path, top: &str) -> String {
    format!(
        r#"{top}
data_dir = "{data}"
secrets_dir = "{data}-secrets"
shutdown_grace = "2s"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[apps.web]
root = "{data}-web"
units = ["web.service"]
"#,
        data = data_dir.display(),
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
    )
}

impl TestAgent {
    /// Starts an agent with the given certificate files; its data dir is under `data_dir`.
    pub async fn start(files: &CertFiles, data_dir: &Path) -> Result<TestAgent, ferry_agent::server::StartError> {
        TestAgent::start_with(files, data_dir, "").await
    }

    /// [`TestAgent::start`] with `top` (top-level agent.toml keys) added.
    pub async fn start_with(
        files: &CertFiles,
        data_dir: &Path,
        top: &str,
    ) -> Result<TestAgent, ferry_agent::server::StartError> {
        TestAgent::start_toml(&agent_toml_with(files, data_dir, top)).await
    }

    /// An agent that does not listen and dials `server` (a `ferry serve`'s `dial_in_listen`).
    pub async fn start_dialing(
        files: &CertFiles,
        data_dir: &Path,
        server: &str,
    ) -> Result<TestAgent, ferry_agent::server::StartError> {
        TestAgent::start_toml(&agent_toml_without_listen(files, data_dir, &format!("connect = [\"{server}\"]"))).await
    }

    /// An agent with this agent.toml text.
    pub async fn start_toml(text: &str) -> Result<TestAgent, ferry_agent::server::StartError> {
        let config =
            AgentConfig::from_toml(Path::new("test-agent.toml"), text).expect("the test agent config is valid");
        let server = Server::bind(config).await?;
        // An agent that only dials out has no address of its own.
        let addr = server.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let refusals = server.refusals();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = server.serve(stop).await {
                eprintln!("test agent failed: {e}");
            }
        });
        Ok(TestAgent { addr, refusals, shutdown, task: Some(task) })
    }

    /// Stops the agent and waits until its port is closed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Waits (bounded) for a refusal whose reason contains `needle`; returns all reasons seen.
    pub async fn refusal_containing(&self, needle: &str) -> Result<String, Vec<String>> {
        let found =
            crate::wait_for(100, || self.refusals.list().into_iter().map(|r| r.reason).find(|r| r.contains(needle)))
                .await;
        found.ok_or_else(|| self.refusals.list().into_iter().map(|r| r.reason).collect())
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A fleet config with environment `test` holding `hosts` (name, "addr:port").
pub fn fleet_config(dir: &Path, coordinator: &CertFiles, hosts: &[(&str, String)]) -> FleetConfig {
    let hosts = hosts.iter().map(|(n, a)| format!("{n} = \"{a}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        r#"connect_timeout = "2s"
request_timeout = "5s"
registry = "registry.db"
cache_dir = "cache"
[app]
name = "web"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[environments.test]
hosts = {{ {hosts} }}
"#,
        ca = coordinator.ca.display(),
        cert = coordinator.cert.display(),
        key = coordinator.key.display(),
    );
    let path = dir.join("fleet.toml");
    std::fs::write(&path, &text).expect("write fleet.toml");
    FleetConfig::from_toml(&path, &text).expect("the test fleet config is valid")
}

/// The built `ferry-agent` binary as a process of its own (for what only a process shows: kill
/// -9 at a failpoint, signals), killed on drop. Output goes to `log`, or nowhere.
pub struct AgentProcess {
    child: std::process::Child,
    log: Option<std::path::PathBuf>,
}

impl AgentProcess {
    /// Starts `ferry-agent --config CONFIG`, with `failpoints` armed (`FERRY_FAILPOINTS`).
    pub fn start(config: &Path, failpoints: Option<&str>, log: Option<&Path>) -> AgentProcess {
        use std::process::Stdio;
        let mut cmd = std::process::Command::new(crate::bin("ferry-agent"));
        cmd.arg("--config").arg(config).env_remove("NOTIFY_SOCKET").env_remove("JOURNAL_STREAM");
        match log {
            Some(path) => {
                let out = std::fs::File::create(path).expect("agent log file");
                let err = out.try_clone().expect("agent log file");
                cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        if let Some(fp) = failpoints {
            cmd.env("FERRY_FAILPOINTS", fp);
        }
        AgentProcess { child: cmd.spawn().expect("spawn ferry-agent"), log: log.map(Path::to_path_buf) }
    }

    /// What the agent logged so far ("" without a log).
    pub fn log(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the agent");
    }

    pub fn still_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Waits (bounded) for the process to have died, and says whether it was SIGKILL.
    pub fn wait_killed(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let status = crate::fleet::poll(std::time::Duration::from_secs(20), || self.child.try_wait().ok().flatten());
        status.and_then(|s| s.signal()) == Some(9)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
