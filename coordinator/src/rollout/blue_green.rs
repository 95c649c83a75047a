//! blue-green: making a group live with the environment's `switch` command, checking it with
//! `after_switch`, switching the previous group back in when that fails, and `ferry rollback`'s
//! switch back to the idle group (which still runs the release the live one ran before).
use std::collections::HashMap;
use std::sync::Arc;

use super::{Engine, Error, Event, Stored, Switch, hooks};
use crate::client::{ErrorKind, HostError};
use crate::config::{Environment, Host};
use crate::fleet::Transfer;
use crate::plan::Strategy;
use crate::registry::HostUpdate;
use crate::state::{DeploymentStatus, HostState};

impl Engine<'_> {
    /// Runs `switch` to make `to` live, `from` being the group live until now, and with `check`,
    /// `after_switch` after it. (A switch back to the group that served a moment ago is not
    /// checked: there is nothing further to fall back to.)
    async fn run_switch(&self, to: &str, from: Option<&str>, version: &str, check: bool) -> Result<(), String> {
        let env = self.environment().map_err(|e| e.to_string())?;
        let members = env.group_hosts(to);
        let inventory = self.inventory().map_err(|e| e.to_string())?;
        let addrs: Vec<String> = members.iter().filter_map(|h| inventory.get(h)).map(Host::endpoint).collect();
        let vars = [
            ("FERRY_GROUP", to.to_string()),
            ("FERRY_PREVIOUS_GROUP", from.unwrap_or_default().to_string()),
            ("FERRY_HOSTS", members.join(" ")),
            ("FERRY_ADDRS", addrs.join(" ")),
            ("FERRY_VERSION", version.to_string()),
            ("FERRY_ENV", self.env.to_string()),
        ];
        let cmd = env.switch.as_deref().ok_or("blue-green environment without a switch command")?;
        hooks::run("switch", cmd, &vars).await?;
        if let Some(after) = env.after_switch.as_deref().filter(|_| check) {
            hooks::run("after_switch", after, &vars).await?;
        }
        Ok(())
    }

    /// The idle group is healthy: make it live. If the switch or its check fails, the group live
    /// before is switched back in and the deployment halts (rolling the group back with
    /// auto_rollback).
    pub(super) async fn switch_over(
        &self,
        id: &str,
        plan: &Stored,
        sw: &Switch,
        version: &str,
        transfers: &HashMap<String, Arc<Transfer>>,
    ) -> Result<super::DeployReport, Error> {
        self.registry.event(id, None, "switching", &sw.to)?;
        self.emit(&Event::Switching { group: &sw.to });
        match self.run_switch(&sw.to, sw.from.as_deref(), version, true).await {
            Ok(()) => {
                self.registry.set_live_group(self.env, &sw.to, id)?;
                self.emit(&Event::Live { group: &sw.to });
                self.finish(id, DeploymentStatus::Succeeded, None, transfers)
            }
            Err(e) => {
                self.emit(&Event::SwitchFailed { group: &sw.to, error: &e });
                let reason = self.switch_back(id, sw, version, &e).await?;
                self.halt(id, plan, transfers, Some(&reason)).await
            }
        }
    }

    /// Switches `sw.from` back in after `why`; returns the whole story for the deployment's error.
    pub(super) async fn switch_back(&self, id: &str, sw: &Switch, version: &str, why: &str) -> Result<String, Error> {
        let Some(from) = &sw.from else {
            return Ok(format!("{why}; no group was live before, so none was switched back"));
        };
        Ok(match self.run_switch(from, Some(&sw.to), version, false).await {
            Ok(()) => {
                self.registry.set_live_group(self.env, from, id)?;
                self.emit(&Event::SwitchedBack { group: from });
                format!("{why}; switched {from} back in")
            }
            Err(back) => {
                self.registry.event(id, None, "switch_back_failed", &back)?;
                format!("{why}; switching {from} back in FAILED too ({back}): check the load balancer by hand")
            }
        })
    }

    /// Records `ferry rollback` of a blue-green environment: the idle group goes live again.
    pub(super) fn create_switch_back(&self, env: &Environment) -> Result<String, Error> {
        let (live, _) =
            self.registry.live_group(self.env)?.ok_or_else(|| Error::NoLiveGroup { env: self.env.to_string() })?;
        let (idle, members) = env.idle_group(Some(&live)).ok_or_else(|| Error::Misconfigured {
            env: self.env.to_string(),
            reason: "blue-green needs two groups".into(),
        })?;
        let id = super::new_deployment_id();
        let stored = Stored {
            strategy: Strategy::BlueGreen,
            max_failures: 0,
            auto_rollback: false,
            total_bytes: 0,
            prestage: false,
            switch: Some(Switch { to: idle.clone(), from: Some(live.clone()) }),
            target: None,
        };
        let placed: Vec<(String, usize)> = members.iter().map(|h| (h.clone(), 0)).collect();
        self.record_rollback(&id, "previous", &stored, &placed)?;
        self.registry.set_status(&id, DeploymentStatus::Running, None)?;
        self.emit(&Event::SwitchingBack { live: &live, idle: &idle, members: &members });
        Ok(id)
    }

    /// Runs a switch back recorded by [`Engine::create_switch_back`]: after checking that every
    /// host of the idle group answers and runs a release, the switch makes it live again. No
    /// host is touched.
    pub(super) async fn switch_back_in(&self, id: &str, plan: &Stored) -> Result<super::DeployReport, Error> {
        let Some(sw) = plan.switch.clone() else {
            return Err(Error::Corrupt {
                id: id.to_string(),
                reason: "a blue-green rollback without its groups".into(),
            });
        };
        let inventory = self.inventory()?;
        let rows = self.registry.hosts(id)?;
        let checks = rows.iter().filter_map(|r| inventory.get(&r.host)).map(|host| async move {
            match self.fleet.current_release(host).await {
                Ok(current) if !current.is_empty() => {
                    self.emit(&Event::Runs { host: &host.name, release: &current });
                    let update =
                        HostUpdate { previous_release: Some(&current), release: Some(&current), ..Default::default() };
                    self.host_state(id, &host.name, HostState::Unchanged, &update)
                }
                Ok(_) => {
                    let e =
                        HostError::new(host, ErrorKind::Failed, format!("{} runs no release of the app", host.name));
                    self.host_failed(id, host, &e, 0)
                }
                Err(e) => self.host_failed(id, host, &e, 0),
            }
        });
        for r in futures_util::future::join_all(checks).await {
            r?;
        }
        let none = HashMap::new();
        let live = sw.from.as_deref().unwrap_or("the live group");
        if self.registry.hosts(id)?.iter().any(|h| h.state.is_failure()) {
            let why = format!(
                "group {} cannot take over: not every host of it answers with a release; {live} stays live",
                sw.to
            );
            return self.finish(id, DeploymentStatus::Failed, Some(&why), &none);
        }
        self.switch_over(id, plan, &sw, "previous", &none).await
    }
}
