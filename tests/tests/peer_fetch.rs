//! Peer fetch on a real fleet: hosts get a release's new content from each other, so the
//! coordinator's link carries about one copy instead of one per host; a peer that serves a
//! corrupt chunk is caught by the hash check, and one that breaks off mid-transfer is passed
//! over: the host gets the rest from the coordinator, and so is one whose agent dies while it
//! serves.
use std::path::{Path, PathBuf};

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{Fleet, text_of};
use ferry_tests::fleet_or_skip;

/// Bytes the coordinator's namespace has sent on its link.
fn coordinator_tx(fleet: &Fleet) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &fleet.ctl_ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes"])
        .output()
        .expect("tx_bytes");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("a byte count")
}

/// The demo app as `version`, with `mib` MiB of noise (fresh for each version).
fn release(fleet: &Fleet, version: &str, mib: usize, seed: u64) -> PathBuf {
    let dir = fleet.dir.join(format!("demo-{version}"));
    demo_app::write_release(&dir, version, Variant::Healthy).expect("release");
    std::fs::write(dir.join("noise.bin"), ferry_tests::pseudo_random(mib << 20, seed)).expect("noise");
    dir
}

/// fleet.toml `name`, with `peer_fetch` as given.
fn config(fleet: &Fleet, name: &str, peer_fetch: bool) -> PathBuf {
    config_with(fleet, name, peer_fetch, "strategy = \"all-at-once\"\n")
}

fn config_with(fleet: &Fleet, name: &str, peer_fetch: bool, extra: &str) -> PathBuf {
    let path = fleet.fleet_toml_with(name, extra);
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, format!("peer_fetch = {peer_fetch}\n{text}")).expect("write");
    path
}

/// `ferry deploy --output json`: the report, asserted a success.
fn deploy(fleet: &Fleet, config: &Path, dir: &Path, version: &str) -> serde_json::Value {
    let out = fleet.deploy(&config.to_string_lossy(), dir, version, true);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text_of(&out)));
    assert_eq!(report["status"], "succeeded", "{report:#}\n{}", text_of(&out));
    report
}

fn sum(report: &serde_json::Value, key: &str) -> u64 {
    report["hosts"].as_array().expect("hosts").iter().filter_map(|h| h[key].as_u64()).sum()
}

#[test]
fn with_peer_fetch_the_coordinator_sends_about_one_copy_instead_of_one_per_host() {
    let fleet = fleet_or_skip!(4);
    let size: u64 = 6 << 20;
    let (off, on) = (config(&fleet, "off.toml", false), config(&fleet, "on.toml", true));
    deploy(&fleet, &off, &release(&fleet, "1", 0, 1), "1");

    // Off: every host gets the new content from the coordinator.
    let before = coordinator_tx(&fleet);
    let report = deploy(&fleet, &off, &release(&fleet, "2", 6, 20), "2");
    let sent_off = coordinator_tx(&fleet) - before;
    assert_eq!(sum(&report, "bytes_from_peers"), 0, "{report:#}");
    assert!(sent_off > size * 35 / 10, "4 copies: {sent_off} bytes for {size}");

    // On: one seed gets it from the coordinator, the other three from their peers.
    let before = coordinator_tx(&fleet);
    let report = deploy(&fleet, &on, &release(&fleet, "3", 6, 30), "3");
    let sent_on = coordinator_tx(&fleet) - before;
    eprintln!(
        "coordinator egress for a {size}-byte release to 4 hosts: {sent_off} bytes without peer fetch, {sent_on} with"
    );
    assert!(sent_on < size * 16 / 10, "about one copy: {sent_on} bytes for {size}\n{report:#}");
    assert!(sum(&report, "bytes_from_peers") > size * 2, "{report:#}");
    assert_eq!(fleet.versions(), ["3", "3", "3", "3"]);
    // The peers asked each other, with their own certificates.
    let served: usize = fleet
        .hosts
        .iter()
        .map(|h| {
            let audit = h.exec(&["cat", "/var/lib/ferry/audit.log"]).expect("audit");
            String::from_utf8_lossy(&audit.stdout)
                .lines()
                .filter(|l| l.contains("\"rpc\":\"GetChunks\"") && l.contains("\"peer\":\"web-"))
                .count()
        })
        .sum();
    assert!(served >= 3, "GetChunks served to peers: {served}");
}

/// Every agent serves peers badly (`fault`); the deployment still succeeds, the output names the
/// peers that fell short (`says`), and every host runs the release byte for byte.
fn a_faulty_peer_is_passed_over(fault: &str, says: &str) {
    let fleet = fleet_or_skip!(3);
    let on = config(&fleet, "on.toml", true);
    deploy(&fleet, &on, &release(&fleet, "1", 0, 1), "1");
    for h in &fleet.hosts {
        std::fs::write(h.path("/var/lib/ferry/failpoints"), format!("{fault}\n")).expect("arm");
    }
    let dir = release(&fleet, "2", 2, 40);
    let out = fleet.deploy(&on.to_string_lossy(), &dir, "2", false);
    let text = text_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(says), "the faulty peer is reported: {text}");
    assert_eq!(fleet.versions(), ["2", "2", "2"]);
    let want = std::fs::read(dir.join("noise.bin")).expect("noise");
    for h in &fleet.hosts {
        let got = h.exec(&["cat", "/srv/web/noise.bin"]).expect("deployed noise").stdout;
        assert!(got == want, "{}: the deployed file differs from the release", h.name);
    }
}

#[test]
fn a_peer_serving_corrupt_chunks_is_caught_and_the_host_gets_them_from_the_coordinator() {
    a_faulty_peer_is_passed_over("peer-corrupt", "failed its check");
}

#[test]
fn a_peer_that_breaks_off_mid_transfer_is_passed_over() {
    a_faulty_peer_is_passed_over("peer-drop", "went away mid-transfer");
}

#[test]
fn a_peer_whose_agent_dies_while_serving_is_passed_over_and_the_deployment_succeeds() {
    let fleet = fleet_or_skip!(3);
    // One host at a time, each staged just before it is activated: every host after the first
    // fetches from one that is already live, and that one's agent dies (SIGKILL, once) as it
    // serves; systemd brings it back.
    let rolling = config_with(&fleet, "rolling.toml", true, "strategy = \"rolling\"\nbatch = [1]\n");
    deploy(&fleet, &rolling, &release(&fleet, "1", 0, 1), "1");
    for h in &fleet.hosts {
        std::fs::write(h.path("/var/lib/ferry/failpoints"), "peer-serve\n").expect("arm");
    }
    let dir = release(&fleet, "2", 2, 50);
    let config = rolling.to_string_lossy();
    let artifact = dir.to_string_lossy();
    let out = fleet.ferry(&[
        "deploy",
        "--config",
        &config,
        "--env",
        "test",
        "--artifact",
        &artifact,
        "--version",
        "2",
        "--no-prestage",
    ]);
    let text = text_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("short: web-"), "the dead peer is reported: {text}");
    assert_eq!(fleet.versions(), ["2", "2", "2"]);
    let died = fleet.hosts.iter().filter(|h| !h.path("/var/lib/ferry/failpoints").exists()).count();
    assert!(died >= 1, "some agent died serving a peer");
    let want = std::fs::read(dir.join("noise.bin")).expect("noise");
    for h in &fleet.hosts {
        let got = h.exec(&["cat", "/srv/web/noise.bin"]).expect("deployed noise").stdout;
        assert!(got == want, "{}: the deployed file differs from the release", h.name);
    }
}
