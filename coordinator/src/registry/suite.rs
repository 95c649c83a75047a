//! The registry's behaviour, checked the same way on every backend (SQLite's tests and
//! PostgreSQL's call each of these).
use super::*;
use crate::state::{DeploymentKind, DeploymentStatus, HostState};

fn new<'a>(id: &'a str, hosts: &'a [(String, usize)]) -> NewDeployment<'a> {
    NewDeployment {
        id,
        kind: DeploymentKind::Deploy,
        environment: "prod",
        version: "2",
        release_id: "2-0000000a",
        artifact: "/build",
        manifest_hash: "ab",
        strategy: "{}",
        app: "web",
        hosts,
    }
}

pub fn transitions_are_recorded_with_timings_and_bytes(reg: &dyn Registry) {
    let hosts = vec![("web-1".to_string(), 0), ("web-2".to_string(), 1)];
    reg.create(&new("d-1", &hosts)).expect("create");
    reg.set_status("d-1", DeploymentStatus::Running, None).expect("running");
    reg.set_host("d-1", "web-1", HostState::Staging, &HostUpdate::default()).expect("staging");
    reg.set_host(
        "d-1",
        "web-1",
        HostState::Staged,
        &HostUpdate { bytes: 100, previous_release: Some("1-0000000b"), ..Default::default() },
    )
    .expect("staged");
    // The state machine's rules hold: a staged host is activated before it is healthy.
    let e = reg.set_host("d-1", "web-1", HostState::Healthy, &HostUpdate::default()).expect_err("skips a step");
    assert!(e.to_string().contains("web-1: staged → healthy is not a legal step"), "{e}");
    reg.set_host("d-1", "web-1", HostState::Activating, &HostUpdate::default()).expect("activating");
    reg.set_host("d-1", "web-1", HostState::Healthy, &HostUpdate { activate_ms: Some(420), ..Default::default() })
        .expect("healthy");
    reg.set_host("d-1", "web-2", HostState::Staging, &HostUpdate::default()).expect("staging");
    reg.set_host("d-1", "web-2", HostState::Failed, &HostUpdate { error: Some("probe"), ..Default::default() })
        .expect("failed");
    reg.set_status("d-1", DeploymentStatus::Failed, Some("web-2 failed")).expect("failed");
    let d = reg.deployment("d-1").expect("query").expect("row");
    assert_eq!((d.status.as_str(), d.bytes_sent, d.hosts_failed), ("failed", 100, 1));
    assert!(d.finished_ms.is_some());
    let h = reg.hosts("d-1").expect("hosts");
    assert_eq!(h.iter().map(|h| h.host.as_str()).collect::<Vec<_>>(), ["web-1", "web-2"]);
    assert_eq!(h[0].previous_release.as_deref(), Some("1-0000000b"));
    assert_eq!((h[0].activate_ms, h[1].activate_ms), (Some(420), None));
    assert!(h[0].started_ms.is_some() && h[0].finished_ms >= h[0].started_ms);
    assert_eq!(reg.history(Some("prod"), None, 10).expect("history").len(), 1);
    assert_eq!(reg.activated_hosts("d-1").expect("activated").into_iter().collect::<Vec<_>>(), ["web-1"]);
    let kinds: Vec<String> = reg.events_since("d-1", 0).expect("events").into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("created"));
    assert_eq!(kinds.last().map(String::as_str), Some("failed"));
    let seq = reg.events_since("d-1", 0).expect("events")[2].seq;
    assert_eq!(reg.events_since("d-1", seq).expect("after").len(), kinds.len() - 3);
}

pub fn one_rollout_per_environment(reg: &dyn Registry) {
    assert_eq!(reg.lock("prod", "d-1", false).expect("lock"), None);
    // The same process may take its own lock again (resume in-process).
    reg.lock("prod", "d-1", false).expect("relock");
    // A live holder (this process, for another deployment) refuses...
    let e = reg.lock("prod", "d-2", false).expect_err("held").to_string();
    assert!(e.contains("locked by deployment d-1") && e.contains("--force-unlock"), "{e}");
    // ...other environments are free...
    reg.lock("staging", "d-3", false).expect("other env");
    // ...and --force-unlock breaks it, returning what it broke.
    let broken = reg.lock("prod", "d-2", true).expect("forced").expect("was held");
    assert_eq!(broken.deployment_id, "d-1");
    reg.unlock("prod", "d-1").expect("not the holder: no-op");
    assert_eq!(reg.lock_of("prod").expect("q").map(|l| l.deployment_id), Some("d-2".into()));
    reg.unlock("prod", "d-2").expect("unlock");
    assert_eq!(reg.lock_of("prod").expect("q"), None);
}

/// `set_pid` makes the lock's holder the given (exited) process.
pub fn a_dead_holder_is_stale_and_only_its_deployment_takes_over(reg: &dyn Registry, set_pid: &dyn Fn(u32)) {
    reg.lock("prod", "d-1", false).expect("lock");
    // Pretend the holder was a process that has exited.
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let pid = child.id();
    child.wait().expect("wait");
    set_pid(pid);
    let lock = reg.lock_of("prod").expect("q").expect("held");
    assert!(lock.stale());
    assert!(reg.lock("prod", "d-9", false).expect_err("other deployment").to_string().contains("that process is gone"));
    reg.lock("prod", "d-1", false).expect("resume takes over");
    assert!(reg.lock_of("prod").expect("q").expect("held").mine());
}

pub fn report_rates_and_percentiles(reg: &dyn Registry) {
    let hosts = vec![("web-1".to_string(), 0)];
    use DeploymentStatus::{Failed, RolledBack, Succeeded};
    for (i, status) in [Succeeded, Succeeded, RolledBack, Failed].iter().enumerate() {
        let id = format!("d-{i}");
        reg.create(&new(&id, &hosts)).expect("create");
        let end = if *status == Succeeded { HostState::Healthy } else { HostState::RolledBack };
        for state in [HostState::Staging, HostState::Staged, HostState::Activating, end] {
            reg.set_host(&id, "web-1", state, &HostUpdate::default()).expect("host");
        }
        reg.set_status(&id, *status, None).expect("status");
    }
    // Unfinished deployments do not count.
    reg.create(&new("d-running", &hosts)).expect("create");
    // Another app of the same environment has a row of its own.
    reg.create(&NewDeployment { app: "worker", ..new("d-worker", &hosts) }).expect("create");
    reg.set_status("d-worker", Succeeded, None).expect("status");
    let r = reg.report(None).expect("report");
    assert_eq!(
        r.iter().map(|r| (r.environment.as_str(), r.app.as_str())).collect::<Vec<_>>(),
        [("prod", "web"), ("prod", "worker")]
    );
    assert_eq!((r[1].deployments, r[1].succeeded), (1, 1));
    let r = &r[0];
    assert_eq!((r.deployments, r.succeeded, r.failed, r.rolled_back), (4, 2, 1, 1));
    assert!((r.success_rate - 0.5).abs() < 1e-9);
    // The failed deployment's host went back too: 2 of 4 involved a rollback.
    assert!((r.rollback_rate - 0.5).abs() < 1e-9);
    assert!((r.deployments_per_week - 1.0).abs() < 1e-9);
    assert_eq!(r.slowest_hosts.len(), 1);
}

/// What `ferry serve` keeps: versions, smoke runs, approvals, requesters, live groups, gates'
/// measurements.
pub fn pipeline_records_round_trip(reg: &dyn Registry) {
    let hosts = vec![("web-1".to_string(), 0)];
    reg.create(&new("d-p", &hosts)).expect("create");
    let mut metadata = serde_json::Map::new();
    metadata.insert("git".into(), serde_json::json!("4f2a"));
    let v = VersionRow {
        app: "web".into(),
        version: "2".into(),
        artifact: "/build".into(),
        release_id: "2-0000000a".into(),
        manifest_hash: "ab".into(),
        total_bytes: 10,
        files: 1,
        registered_by: "token:ci".into(),
        registered_ms: 5,
        metadata,
    };
    assert!(reg.register_version(&v).expect("register").is_none());
    let again = reg.register_version(&VersionRow { manifest_hash: "cd".into(), ..v.clone() }).expect("again");
    assert_eq!(again.map(|e| e.manifest_hash), Some("ab".into()), "the first registration stays");
    assert_eq!(
        reg.version("web", "2").expect("get").map(|v| v.metadata["git"].clone()),
        Some(serde_json::json!("4f2a"))
    );
    reg.register_version(&VersionRow { version: "3".into(), registered_ms: 6, ..v.clone() }).expect("3");
    let listed: Vec<String> = reg.versions(Some("web"), 10).expect("list").into_iter().map(|v| v.version).collect();
    assert_eq!(listed, ["3", "2"]);
    assert_eq!(reg.claim_versions("web").expect("claim"), 0);
    reg.set_requested_by("d-p", "token:ci", Some("d-0")).expect("requested");
    reg.set_requested_by("d-p", "token:other", None).expect("again");
    let d = reg.deployment("d-p").expect("get").expect("row");
    assert_eq!((d.requested_by.as_deref(), d.promoted_from.as_deref()), (Some("token:ci"), Some("d-0")));
    let run = SmokeRun {
        id: 0,
        deployment_id: "d-p".into(),
        run_by: "token:ci".into(),
        started_ms: 1,
        finished_ms: 2,
        passed: true,
        results: serde_json::json!([{"name": "home"}]),
        env_checks: true,
    };
    let seq = reg.record_smoke(&run).expect("smoke");
    let runs = reg.smoke_runs("d-p").expect("runs");
    assert_eq!((runs.len(), runs[0].id, runs[0].passed, runs[0].env_checks), (1, seq, true, true));
    reg.approve("d-p", "prod", "alice").expect("approve");
    reg.approve("d-p", "prod", "alice").expect("twice is once");
    reg.use_approval("d-p", "prod", "alice", "d-2").expect("use");
    let a = reg.approvals("d-p").expect("approvals");
    assert_eq!((a.len(), a[0].used_by.as_deref()), (1, Some("d-2")));
    assert_eq!(reg.live_group("prod").expect("live"), None);
    reg.set_live_group("prod", "blue", "d-p").expect("live");
    reg.set_live_group("prod", "green", "d-p").expect("switch");
    assert_eq!(reg.live_group("prod").expect("live"), Some(("green".into(), "d-p".into())));
    let m = Measurement {
        deployment_id: "d-p".into(),
        batch: 1,
        gate: "errors".into(),
        at_ms: 7,
        outcome: crate::gate::Outcome::Fail,
        value: Some(0.1),
        baseline: None,
        detail: "0.1 is not < 0.05".into(),
    };
    reg.record_measurement(&m).expect("measure");
    assert_eq!(reg.measurements("d-p").expect("measurements"), [m]);
    assert_eq!(reg.latest_deployment("prod", Some("web")).expect("latest"), Some("d-p".into()));
    assert_eq!(reg.latest_deployment("prod", Some("nobody")).expect("latest"), None);
}

/// A lock held from another machine: alive while renewed; once its lease lapses, only its own
/// deployment takes it over (`ferry resume`), without --force-unlock. `exec` runs SQL on the
/// backend (the same text works on both).
pub fn a_holder_elsewhere_is_stale_once_its_lease_lapses(reg: &dyn Registry, exec: &dyn Fn(&str)) {
    reg.lock("prod", "d-1", false).expect("lock");
    exec(&format!("UPDATE locks SET hostname = 'elsewhere', pid = 1, renewed_ms = {}", now_ms()));
    let lock = reg.lock_of("prod").expect("q").expect("held");
    assert!(!lock.stale() && !lock.mine(), "renewed just now");
    let e = reg.lock("prod", "d-1", false).expect_err("its holder is alive elsewhere").to_string();
    assert!(e.contains("renewed 0 s ago") && e.contains("once 20 s pass without a renewal"), "{e}");
    exec("UPDATE locks SET renewed_ms = 0");
    let lock = reg.lock_of("prod").expect("q").expect("held");
    assert!(lock.stale());
    let e = reg.lock("prod", "d-9", false).expect_err("another deployment").to_string();
    assert!(e.contains("has not renewed it for"), "{e}");
    reg.lock("prod", "d-1", false).expect("its own deployment takes over");
    let lock = reg.lock_of("prod").expect("q").expect("held");
    assert!(lock.mine() && now_ms() - lock.renewed_ms < 60_000);
    exec("UPDATE locks SET renewed_ms = 0");
    reg.renew_lock("prod", "d-1").expect("renew");
    assert!(now_ms() - reg.lock_of("prod").expect("q").expect("held").renewed_ms < 60_000);
    reg.renew_lock("prod", "d-other").expect("not the holder: no-op");
}

/// The leader lease: one holder at a time, renewed in place, taken over with the next epoch
/// once it lapses or is given up. `exec` runs SQL on the backend.
pub fn one_leader_at_a_time_and_each_takeover_is_a_new_epoch(reg: &dyn Registry, exec: &dyn Fn(&str)) {
    let ttl = std::time::Duration::from_secs(15);
    assert_eq!(reg.lease_of("serve").expect("read"), None);
    let a = reg.acquire_lease("serve", "a", "https://a:7444", ttl).expect("a");
    assert_eq!((a.holder.as_str(), a.epoch), ("a", 1));
    assert!(a.live());
    let seen = reg.acquire_lease("serve", "b", "https://b:7444", ttl).expect("b asks");
    assert_eq!(
        (seen.holder.as_str(), seen.address.as_str(), seen.epoch),
        ("a", "https://a:7444", 1),
        "a still holds it"
    );
    let renewed = reg.acquire_lease("serve", "a", "https://a:7444", ttl).expect("a renews");
    assert_eq!(renewed.epoch, 1);
    exec("UPDATE leases SET expires_ms = 0");
    let b = reg.acquire_lease("serve", "b", "https://b:7444", ttl).expect("b takes over");
    assert_eq!((b.holder.as_str(), b.epoch), ("b", 2));
    let refused = reg.acquire_lease("serve", "a", "https://a:7444", ttl).expect("a asks again");
    assert_eq!((refused.holder.as_str(), refused.epoch), ("b", 2), "a came back too late");
    reg.release_lease("serve", "a").expect("not a's: no-op");
    assert!(reg.lease_of("serve").expect("read").expect("held").live());
    reg.release_lease("serve", "b").expect("b steps down");
    let a = reg.acquire_lease("serve", "a", "https://a:7444", ttl).expect("a again");
    assert_eq!((a.holder.as_str(), a.epoch), ("a", 3));
    assert_eq!(reg.lease_of("serve").expect("read"), Some(a));
}
