//! `ferry-bench fanout [--mb 50] [--mbit 50]`: peer fetch on the real fleet. 5 hosts; every
//! link shaped to `--mbit` (towards each host on its switch port, out of each host and out of
//! the coordinator on their own ends); a release of `--mb` MiB of new random content deployed
//! all-at-once with `peer_fetch = false` and then `true`, twice each (fresh content each time):
//! the whole `ferry deploy` wall time, and the bytes the coordinator's link carried (its
//! `tx_bytes`), in copies of the release.
use std::process::Command;
use std::time::Instant;

use ferry_tests::fleet::{self, Fleet};

use super::{RUN, median, release};

const HOSTS: usize = 5;

fn tc(ns: &str, kbit: u32) -> Result<(), String> {
    let rate = format!("{kbit}kbit");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", &rate])
        .args(["burst", "16kb", "latency", "400ms"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("tc in {ns}: {}", fleet::text_of(&out)));
    }
    Ok(())
}

fn tx_bytes(fleet: &Fleet) -> Result<u64, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &fleet.ctl_ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes"])
        .output()
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("tx_bytes: {e}"))
}

pub fn bench_fanout(mb: u64, mbit: u32) -> Result<(), String> {
    println!("booting {HOSTS} hosts...");
    let fleet = Fleet::boot_named(RUN, HOSTS)?;
    let configs: Vec<_> = [false, true]
        .iter()
        .map(|on| {
            let path = fleet.fleet_toml_with(&format!("fanout-{on}.toml"), "strategy = \"all-at-once\"\n");
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            std::fs::write(&path, format!("peer_fetch = {on}\n{text}")).map_err(|e| e.to_string())?;
            Ok::<_, String>(path)
        })
        .collect::<Result<_, _>>()?;
    super::deploy(&fleet, &configs[0], &release(&fleet, "0", 0)?, "0", &[])?;
    let kbit = mbit * 1000;
    for h in &fleet.hosts {
        fleet.slow_link(&h.name, kbit);
        tc(&h.ns, kbit)?;
    }
    tc(&fleet.ctl_ns, kbit)?;
    let size = (mb << 20) as f64;
    println!("\n{mb} MiB of new content to {HOSTS} hosts, all-at-once, every link {mbit} Mbit/s (medians of 2)");
    println!("   peer fetch   ferry deploy wall   coordinator link carried");
    let mut n = 1;
    for (on, config) in [false, true].iter().zip(&configs) {
        let (mut walls, mut copies) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let v = n.to_string();
            n += 1;
            let dir = release(&fleet, &v, mb)?;
            let before = tx_bytes(&fleet)?;
            let t = Instant::now();
            let (_, report) = super::deploy(&fleet, config, &dir, &v, &[])?;
            walls.push(t.elapsed().as_secs_f64());
            let carried = tx_bytes(&fleet)? - before;
            copies.push(carried as f64 / size);
            let peers: u64 =
                report["hosts"].as_array().into_iter().flatten().filter_map(|h| h["bytes_from_peers"].as_u64()).sum();
            eprintln!(
                "   (v{v}: {:.1} s, coordinator {} MiB, peers {} MiB)",
                walls[walls.len() - 1],
                carried >> 20,
                peers >> 20
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        println!(
            "   {:<10} {:>15.1} s   {:>12.2} copies",
            if *on { "on" } else { "off" },
            median(walls),
            median(copies)
        );
    }
    Ok(())
}
