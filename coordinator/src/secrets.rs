//! Secrets: values an environment's app reads (`[environments.X.secrets]`), fetched where `ferry`
//! runs at the start of every deployment, before any host changes.
//!
//! A value comes from a file readable by its owner only (a file others can read is refused: the
//! secret has leaked already), or from a command's standard output (e.g. `vault kv get
//! -field=password secret/prod/db`, run with `sh -c`, FERRY_ENV and FERRY_APP set, within its
//! timeout). Errors name the secret and the cause, never the value (a failing command's stderr
//! is shown, bounded and escaped; its stdout never). Values are held in memory only, sent to the
//! agents in `ActivateRequest.secrets` over mTLS, and printed nowhere: [`Secrets`]' `Debug`
//! shows the names.
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;

use ferry_proto::v1;

use crate::config::{FleetConfig, SecretSource};

/// The values of one environment's secrets, by name (sorted).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(Vec<(String, String)>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(n, _)| format!("{n}: <redacted>"))).finish()
    }
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values as sent to an agent.
    pub fn to_wire(&self) -> Vec<v1::Var> {
        self.0.iter().map(|(name, value)| v1::Var { name: name.clone(), value: value.clone() }).collect()
    }

    /// Built from known values (tests).
    pub fn from_values(values: impl IntoIterator<Item = (String, String)>) -> Secrets {
        let mut v: Vec<(String, String)> = values.into_iter().collect();
        v.sort();
        Secrets(v)
    }
}

/// Why a secret could not be fetched. Never holds the value.
#[derive(Debug, thiserror::Error)]
#[error("secret {name} of environment {env}: {cause} (no host was changed)")]
pub struct SecretError {
    pub env: String,
    pub name: String,
    pub cause: String,
}

/// The largest secret value accepted.
const MAX_VALUE: usize = 64 * 1024;

/// Fetches every secret of `env` (none for an environment without secrets).
pub async fn fetch(config: &FleetConfig, env: &str) -> Result<Secrets, SecretError> {
    let Some(e) = config.environments.get(env) else { return Ok(Secrets::default()) };
    let mut values = Vec::with_capacity(e.secrets.len());
    // Only what the app reads ([apps.NAME] secrets) leaves this machine.
    for (name, source) in e.secrets.iter().filter(|(n, _)| config.app.reads_secret(n)) {
        let fail = |cause: String| SecretError { env: env.to_string(), name: name.clone(), cause };
        let value = fetch_one(source, env, &config.app.name).await.map_err(fail)?;
        if value.len() > MAX_VALUE {
            return Err(fail(format!("the value is over {MAX_VALUE} bytes")));
        }
        values.push((name.clone(), value));
    }
    Ok(Secrets::from_values(values))
}

async fn fetch_one(source: &SecretSource, env: &str, app: &str) -> Result<String, String> {
    if let Some(path) = &source.file {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is mode {:04o}: others can read it; make it readable by its owner only (chmod 600)",
                path.display(),
                meta.mode() & 0o7777
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(strip_newline(text));
    }
    let command = source.command.as_deref().unwrap_or_default();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("FERRY_ENV", env)
        .env("FERRY_APP", app)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run its command: {e}"))?;
    let out = tokio::time::timeout(source.timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("its command did not finish within {:?}", source.timeout))?
        .map_err(|e| format!("its command: {e}"))?;
    if !out.status.success() {
        let err: String = String::from_utf8_lossy(&out.stderr).trim().chars().take(300).collect();
        return Err(format!(
            "its command failed ({}){}",
            out.status,
            if err.is_empty() { String::new() } else { format!(": {}", ferry_proto::text::printable(&err)) }
        ));
    }
    let value =
        String::from_utf8(out.stdout).map_err(|_| "its command printed something that is not UTF-8".to_string())?;
    Ok(strip_newline(value))
}

/// A value without the one trailing newline files and commands end with.
fn strip_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &std::path::Path, secrets: &str) -> FleetConfig {
        let text = format!(
            "[app]\nname = \"web\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[environments.prod]\nhosts = {{ web-1 = \"10.0.0.1\" }}\n[environments.prod.secrets]\n{secrets}\n"
        );
        FleetConfig::from_toml(&dir.join("fleet.toml"), &text).expect("valid")
    }

    #[tokio::test]
    async fn values_come_from_private_files_and_commands_and_failures_never_show_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let file = d.path().join("db.txt");
        std::fs::write(&file, "s3cret-from-file\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let c = config(d.path(), "db = { file = \"db.txt\" }\napi = { command = \"echo api-$FERRY_ENV-$FERRY_APP\" }");
        let s = fetch(&c, "prod").await.expect("fetched");
        assert_eq!(
            s.to_wire().iter().map(|v| (v.name.as_str(), v.value.as_str())).collect::<Vec<_>>(),
            [("api", "api-prod-web"), ("db", "s3cret-from-file")]
        );
        assert_eq!(format!("{s:?}"), "[\"api: <redacted>\", \"db: <redacted>\"]");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = fetch(&c, "prod").await.expect_err("readable by the group").to_string();
        assert!(e.contains("secret db of environment prod:") && e.contains("is mode 0640: others can read it"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");

        // An app that does not read a secret never has it fetched.
        let mut c = config(d.path(), "db = { command = \"exit 1\" }\napi = { command = \"echo k\" }");
        c.app.secrets = Some(vec!["api".into()]);
        assert_eq!(fetch(&c, "prod").await.expect("only api").to_wire().len(), 1);
        let c = config(d.path(), "db = { command = \"echo leaked-value; echo vault: permission denied >&2; exit 2\" }");
        let e = fetch(&c, "prod").await.expect_err("fails").to_string();
        assert!(
            e.contains("secret db of environment prod: its command failed (exit status: 2): vault: permission denied"),
            "{e}"
        );
        assert!(!e.contains("leaked-value"), "stdout is never shown: {e}");
        let c = config(d.path(), "db = { command = \"sleep 5\", timeout = \"100ms\" }");
        let e = fetch(&c, "prod").await.expect_err("too slow").to_string();
        assert!(e.contains("did not finish within 100ms"), "{e}");
    }
}
