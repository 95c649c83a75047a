//! Peer fetch for one deployment: the coordinator as the tracker. The first few hosts to stage
//! (the seeds) get the release's new content from the coordinator; every other host waits for a
//! host that holds the release (a seed done, or any host staged since) and fetches its missing
//! chunks from up to [`PEERS`] holders (`FetchFromPeers`), the rest from the coordinator. A host
//! that staged becomes a holder itself, so the content spreads from host to host and the
//! coordinator sends about one copy per seed, whatever the fleet's size. When every seed failed
//! and no host holds the release, the next host to ask becomes a seed.
use std::sync::Mutex;

use crate::config::Host;

/// Holders one host fetches from at once.
pub const PEERS: usize = 3;

/// Who holds the release so far, and who is seeding it.
pub struct Swarm {
    enabled: bool,
    seeds: usize,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Seeds staging now.
    seeding: usize,
    /// Seeds that staged.
    seeded: usize,
    holders: Vec<Host>,
    /// Where the next host's choice of holders starts (spreads the load).
    next: usize,
}

/// How a host gets the content it lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// From the coordinator (peer fetch off, or this host seeds).
    Seed,
    /// From these holders first.
    Fetch(Vec<Host>),
}

impl Default for Swarm {
    fn default() -> Swarm {
        Swarm::off()
    }
}

impl Swarm {
    /// No peer fetch: every host gets everything from the coordinator.
    pub fn off() -> Swarm {
        Swarm { enabled: false, seeds: 0, state: Mutex::new(State::default()), changed: tokio::sync::Notify::new() }
    }

    /// Peer fetch for a deployment to `hosts` hosts: one seed per hundred hosts, 1 to 3.
    pub fn for_hosts(hosts: usize) -> Swarm {
        Swarm { enabled: hosts > 1, seeds: (hosts / 100).clamp(1, 3), ..Swarm::off() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// This host's part: a seed while fewer than the seeds have started, else it waits for a
    /// holder and gets up to [`PEERS`] of them (or becomes a seed itself when every seed failed
    /// and nobody holds the release).
    pub async fn join(&self) -> Part {
        if !self.enabled {
            return Part::Seed;
        }
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let Ok(mut s) = self.state.lock() else { return Part::Seed };
                if !s.holders.is_empty() {
                    let n = s.holders.len();
                    let start = s.next % n;
                    s.next = s.next.wrapping_add(1);
                    let peers = (0..PEERS.min(n)).map(|i| s.holders[(start + i) % n].clone()).collect();
                    return Part::Fetch(peers);
                }
                if s.seeding + s.seeded < self.seeds || s.seeding == 0 {
                    s.seeding += 1;
                    return Part::Seed;
                }
            }
            notified.await;
        }
    }

    /// `host` holds the release now (staged, or had it already). `seeded`: it was a seed.
    pub fn holds(&self, host: &Host, seeded: bool) {
        if let Ok(mut s) = self.state.lock() {
            if seeded {
                s.seeding = s.seeding.saturating_sub(1);
                s.seeded += 1;
            }
            if !s.holders.iter().any(|h| h.name == host.name) {
                s.holders.push(host.clone());
            }
        }
        self.changed.notify_waiters();
    }

    /// A seed failed: another host may take its place.
    pub fn seed_failed(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.seeding = s.seeding.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: usize) -> Host {
        Host { name: format!("web-{n}"), address: format!("10.0.0.{n}"), port: 7443 }
    }

    #[tokio::test]
    async fn seeds_first_then_holders_spread_and_a_failed_seed_is_replaced() {
        let swarm = std::sync::Arc::new(Swarm::for_hosts(5));
        assert_eq!(swarm.join().await, Part::Seed, "the first host seeds");
        // The next waits for a holder...
        let waiting = tokio::spawn({
            let swarm = swarm.clone();
            async move { swarm.join().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        // ...and when the seed fails, it seeds instead.
        swarm.seed_failed();
        assert_eq!(waiting.await.expect("join"), Part::Seed);
        swarm.holds(&host(1), true);
        assert_eq!(swarm.join().await, Part::Fetch(vec![host(1)]));
        swarm.holds(&host(2), false);
        swarm.holds(&host(3), false);
        swarm.holds(&host(4), false);
        let Part::Fetch(a) = swarm.join().await else { panic!("fetch") };
        let Part::Fetch(b) = swarm.join().await else { panic!("fetch") };
        assert_eq!((a.len(), b.len()), (PEERS, PEERS));
        assert_ne!(a[0].name, b[0].name, "the load moves from holder to holder");
        assert_eq!(Swarm::off().join().await, Part::Seed);
        assert!(!Swarm::for_hosts(1).enabled());
    }
}
