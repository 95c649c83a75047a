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
    format!(
        r#"listen = "127.0.0.1:0"
data_dir = "{data}"
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
        let config = AgentConfig::from_toml(Path::new("test-agent.toml"), &agent_toml(files, data_dir))
            .expect("the test agent config is valid");
        let server = Server::bind(config).await?;
        let addr = server.local_addr().expect("bound address");
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
