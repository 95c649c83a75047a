//! `ferry-fleet`: the test fleet as a tool.
//!
//! - `ferry-fleet demo up`: boots 3 real hosts (systemd-nspawn, own network namespaces), deploys
//!   the demo app v1 then v2 with `ferry deploy`'s live progress, and leaves the fleet running.
//! - `ferry-fleet demo down`: removes the demo fleet.
//! - `ferry-fleet clean`: removes test fleets whose test process died (`scripts/test.sh` runs it).
use std::process::{Command, ExitCode};

use ferry_tests::demo_app::{self, Variant};
use ferry_tests::fleet::{self, Fleet};

const DEMO: &str = "fydemo";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["clean"] => {
            for run in fleet::reap_stale() {
                eprintln!("ferry-fleet: removed stale test fleet {run}");
            }
            ExitCode::SUCCESS
        }
        ["demo", "up"] => demo_up(),
        ["demo", "down"] => {
            fleet::teardown(DEMO);
            println!("demo fleet removed (containers, namespaces, cgroups, files)");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: ferry-fleet demo up | demo down | clean");
            ExitCode::from(2)
        }
    }
}

fn demo_up() -> ExitCode {
    if let Err(fleet::Unsupported(why)) = fleet::check_supported() {
        eprintln!("ferry-fleet: {why}");
        return ExitCode::from(2);
    }
    fleet::teardown(DEMO);
    println!("booting 3 hosts (systemd-nspawn, each in its own network namespace)...");
    let fleet = match Fleet::boot_named(DEMO, 3) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferry-fleet: {e}");
            return ExitCode::FAILURE;
        }
    };
    for h in &fleet.hosts {
        println!("  {} at {}: systemd up, ferry-agent active", h.name, h.ip);
    }
    let toml = fleet.fleet_toml();
    if let Err(e) = demo_app::write_release(&fleet.dir.join("demo-v3-broken"), "3", Variant::Unhealthy) {
        eprintln!("ferry-fleet: {e}");
        return ExitCode::FAILURE;
    }
    for v in ["1", "2"] {
        let dir = fleet.dir.join(format!("demo-v{v}"));
        if let Err(e) = demo_app::write_release(&dir, v, Variant::Healthy) {
            eprintln!("ferry-fleet: {e}");
            return ExitCode::FAILURE;
        }
        println!("\n$ ferry deploy --config {} --env test --artifact {} --version {v}", toml.display(), dir.display());
        // Inherit stdout: the live progress view is the point.
        let status = Command::new("ip")
            .args(["netns", "exec", &fleet.ctl_ns])
            .arg(fleet.ferry_bin())
            .args(["deploy", "--config"])
            .arg(&toml)
            .args(["--env", "test", "--artifact"])
            .arg(&dir)
            .args(["--version", v])
            .status();
        if !status.map(|s| s.success()).unwrap_or(false) {
            eprintln!("ferry-fleet: the deploy of v{v} failed; the fleet is left up for inspection");
            fleet.keep_running();
            return ExitCode::FAILURE;
        }
    }
    let ferry = format!("ip netns exec {} {}", fleet.ctl_ns, fleet.ferry_bin().display());
    let (cfg, dir, ip1) = (toml.display().to_string(), fleet.dir.display().to_string(), fleet.hosts[0].ip);
    println!(
        "\nThe demo fleet is up: 3 hosts serving the demo app v2. The coordinator runs in the network\n\
         namespace {ns}; prefix commands with `ip netns exec {ns}` to reach the hosts. Try:\n\n  \
         {ferry} status --config {cfg} --env test\n  \
         ip netns exec {ns} python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://{ip1}:8080/health\").read().decode())'\n  \
         {ferry} deploy --config {cfg} --env test --artifact {dir}/demo-v3-broken --version 3   # unhealthy: rolled back, exit 1\n  \
         {ferry} rollback --config {cfg} --env test --to 1\n  \
         {ferry} status --config {cfg} --env test --output json\n\n\
         Remove it with: ./scripts/demo.sh down",
        ns = fleet.ctl_ns,
    );
    fleet.keep_running();
    ExitCode::SUCCESS
}
