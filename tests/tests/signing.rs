//! Signed releases on real systemd hosts: agents that trust a key refuse unsigned releases and
//! ones signed by another key (audited), and run the ones it signed.
use std::time::Duration;

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::Fleet;
use ferry_tests::fleet_or_skip;

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn deploy(fleet: &Fleet, config: &std::path::Path, version: &str) -> serde_json::Value {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, Variant::Healthy).expect("write release");
    let out = fleet.deploy(config.to_str().unwrap_or_default(), &dir, version, true);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)))
}

/// The agents' audit lines of `rpc` that were refused: their error texts.
fn refused(fleet: &Fleet, rpc: &str) -> Vec<String> {
    let mut all = Vec::new();
    for h in &fleet.hosts {
        let audit = h.exec(&["cat", "/var/lib/ferry/audit.log"]).expect("audit");
        all.extend(
            String::from_utf8_lossy(&audit.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|e| e["rpc"] == rpc && e["result"] != "ok")
                .map(|e| format!("{} {}", h.name, e["detail"].as_str().unwrap_or_default())),
        );
    }
    all
}

#[test]
fn agents_that_trust_a_key_run_only_releases_it_signed() {
    let fleet = fleet_or_skip!(2);
    let keys = fleet.dir.join("keys");
    for name in ["ci", "rogue"] {
        let out = fleet.ferry(&["key", "new", "--name", name, "--out", &keys.to_string_lossy()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let signed_by = |name: &str| {
        fleet.fleet_toml_with(
            &format!("signed-{name}.toml"),
            &format!("\n[signing]\nkey = \"{}\"\n", keys.join(format!("{name}.key")).display()),
        )
    };
    let (ci, rogue) = (signed_by("ci"), signed_by("rogue"));
    let unsigned = fleet.fleet_toml();

    // Before the agents trust a key, an unsigned release runs (the usual fleet).
    assert_eq!(deploy(&fleet, &unsigned, "1")["status"], "succeeded");

    // Every agent trusts ci's key from now on.
    for h in &fleet.hosts {
        let dir = h.dir.join("etc/ferry/keys");
        std::fs::create_dir_all(&dir).expect("keys dir");
        std::fs::copy(keys.join("ci.pub"), dir.join("ci.pub")).expect("copy the public key");
        let agent_toml = h.dir.join("etc/ferry/agent.toml");
        let mut cfg = std::fs::read_to_string(&agent_toml).expect("agent.toml");
        cfg.push_str("\n[signing]\ntrusted_keys = [\"/etc/ferry/keys/ci.pub\"]\n");
        std::fs::write(&agent_toml, cfg).expect("agent.toml");
        h.systemctl(&["restart", "ferry-agent.service"]).expect("restart");
        assert!(
            h.wait_unit_active("ferry-agent.service", Duration::from_secs(20)),
            "{}",
            h.journal("ferry-agent.service", 20)
        );
    }

    // Unsigned: refused by the agents before anything is staged.
    let r = deploy(&fleet, &unsigned, "2");
    assert_eq!(r["status"], "failed", "{r:#}");
    let error = r["hosts"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("release 2 of app web is not signed, and this host runs only releases signed by ci"),
        "{error}"
    );
    assert_eq!(fleet.versions(), ["1", "1"]);

    // Signed by a key they do not trust: refused too.
    let r = deploy(&fleet, &rogue, "3");
    assert_eq!(r["status"], "failed", "{r:#}");
    let error = r["hosts"][0]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("does not verify with any key this host trusts (ci)"), "{error}");
    assert_eq!(fleet.versions(), ["1", "1"]);
    let audited = refused(&fleet, "Prepare");
    assert!(audited.iter().any(|e| e.contains("release 2 of app web is not signed")), "{audited:?}");
    assert!(audited.iter().any(|e| e.contains("release 3 of app web does not verify")), "{audited:?}");

    // Signed by ci: deployed everywhere.
    let r = deploy(&fleet, &ci, "4");
    assert_eq!(r["status"], "succeeded", "{r:#}");
    assert_eq!(fleet.versions(), ["4", "4"]);

    // Going back to release 1, staged before any key was trusted, is refused as well: it was never
    // signed. Release 4 keeps running.
    let out = fleet.ferry(&["rollback", "--config", &ci.to_string_lossy(), "--env", "test"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is not signed"), "{}", text(&out));
    assert_eq!(fleet.versions(), ["4", "4"]);
    assert!(!refused(&fleet, "Rollback").is_empty());

    // A signed release after it: the rollback to 4 is allowed (its signature is kept).
    assert_eq!(deploy(&fleet, &ci, "5")["status"], "succeeded");
    let out = fleet.ferry(&["rollback", "--config", &ci.to_string_lossy(), "--env", "test"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fleet.versions(), ["4", "4"]);
}
