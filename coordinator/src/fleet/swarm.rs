//! Peer fetch for one deployment: the coordinator as the tracker. The first few hosts to stage
//! (the seeds) get the release's new content from the coordinator; every other host waits for a
//! host that holds the release (a seed done, or any host staged since) and fetches its missing
//! chunks from up to [`PEERS`] holders (`FetchFromPeers`), the rest from the coordinator. A host
//! that staged becomes a holder itself, so the content spreads from host to host and the
//! coordinator sends about one copy per seed, whatever the fleet's size.
//!
//! - **Load**: a holder serves at most [`PER_HOLDER`] hosts at once. A host that finds every
//!   holder busy waits for one to come free (or for a new holder) rather than fall back to the
//!   coordinator, so the holders double at every round instead of the coordinator sending again.
//! - **Zones** (the `zone` label of a host in the environment's `labels`): a host fetches from
//!   holders of its own zone. While its zone has none, one host of the zone at a time fetches
//!   from other zones (or seeds), and the rest of the zone waits for it: about one copy crosses
//!   each zone boundary. Hosts without the label are one zone of their own.
//! - **Failures**: a holder that fell short for a host is handed out no more in this deployment.
//!   When every seed failed and no host holds the release, the next host to ask seeds instead.
use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::Host;

/// Holders one host fetches from at once.
pub const PEERS: usize = 3;
/// Hosts one holder serves at once (below an agent's default `peer_uploads` of 4, so the
/// coordinator's plan is not refused as busy).
pub const PER_HOLDER: usize = 2;

/// Who holds the release so far, and who is seeding it.
pub struct Swarm {
    enabled: bool,
    seeds: usize,
    /// Host name → zone label.
    zones: HashMap<String, String>,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Seeds staging now.
    seeding: usize,
    /// Seeds that staged.
    seeded: usize,
    holders: Vec<Holder>,
    /// Where the next host's choice of holders starts (spreads the load).
    next: usize,
    /// Per zone: hosts bringing the release into it now (from another zone, or seeding).
    importing: HashMap<Option<String>, usize>,
}

struct Holder {
    host: Host,
    zone: Option<String>,
    /// Hosts fetching from it now.
    busy: usize,
    /// It fell short for a host: not handed out again.
    failed: bool,
}

/// A host's place in the swarm for one staging: where its content comes from. Dropping it gives
/// back what it holds (its peers' capacity, a seed's place, its zone's import).
pub struct Ticket<'a> {
    swarm: &'a Swarm,
    peers: Vec<Host>,
    seed: bool,
    importing: Option<Option<String>>,
    staged: bool,
}

impl Ticket<'_> {
    /// The holders to fetch from; empty: everything comes from the coordinator.
    pub fn peers(&self) -> &[Host] {
        &self.peers
    }

    /// This host seeds: it gets everything from the coordinator.
    pub fn seeds(&self) -> bool {
        self.seed
    }

    /// The fetch from the peers is over: they may serve other hosts. `fell_short`: the names of
    /// those that did not give what they were asked for.
    pub fn fetched(&mut self, fell_short: &[String]) {
        let peers = std::mem::take(&mut self.peers);
        self.swarm.release(&peers, fell_short);
    }

    /// The host staged the release: it holds it now.
    pub fn staged(mut self, host: &Host) {
        self.staged = true;
        self.swarm.holds(host, self.seed);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let peers = std::mem::take(&mut self.peers);
        if let Ok(mut s) = self.swarm.state.lock() {
            free(&mut s, &peers, &[]);
            if self.seed && !self.staged {
                s.seeding = s.seeding.saturating_sub(1);
            }
            if let Some(zone) = self.importing.take()
                && let Some(n) = s.importing.get_mut(&zone)
            {
                *n = n.saturating_sub(1);
            }
        }
        self.swarm.changed.notify_waiters();
    }
}

fn free(s: &mut State, peers: &[Host], fell_short: &[String]) {
    for h in s.holders.iter_mut() {
        if peers.iter().any(|p| p.name == h.host.name) {
            h.busy = h.busy.saturating_sub(1);
            if fell_short.contains(&h.host.name) {
                h.failed = true;
            }
        }
    }
}

impl Default for Swarm {
    fn default() -> Swarm {
        Swarm::off()
    }
}

impl Swarm {
    /// No peer fetch: every host gets everything from the coordinator.
    pub fn off() -> Swarm {
        Swarm {
            enabled: false,
            seeds: 0,
            zones: HashMap::new(),
            state: Mutex::new(State::default()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Peer fetch for a deployment to `hosts` hosts: one seed per hundred hosts, 1 to 3.
    /// `zones`: host name → zone, for the hosts that have one.
    pub fn for_hosts(hosts: usize, zones: HashMap<String, String>) -> Swarm {
        Swarm { enabled: hosts > 1, seeds: (hosts / 100).clamp(1, 3), zones, ..Swarm::off() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `host`'s part, waiting while the holders it may use are all busy (or its zone's import is
    /// under way): up to [`PEERS`] holders of its zone; else, as its zone's importer, holders of
    /// other zones; else, when nobody holds the release, a seed's place while fewer than the
    /// seeds have started (or every seed failed). With peer fetch off: the coordinator.
    pub async fn join(&self, host: &Host) -> Ticket<'_> {
        let mut ticket = Ticket { swarm: self, peers: Vec::new(), seed: false, importing: None, staged: false };
        if !self.enabled {
            return ticket;
        }
        let zone = self.zones.get(&host.name).cloned();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let Ok(mut s) = self.state.lock() else { return ticket };
                let s = &mut *s;
                let own = s.holders.iter().any(|h| !h.failed && h.zone == zone);
                let importing = s.importing.get(&zone).copied().unwrap_or(0) > 0;
                let peers = if own {
                    pick(s, |h| h.zone == zone)
                } else if !importing {
                    pick(s, |_| true)
                } else {
                    Vec::new()
                };
                if !peers.is_empty() {
                    if !own {
                        *s.importing.entry(zone.clone()).or_default() += 1;
                        ticket.importing = Some(zone);
                    }
                    ticket.peers = peers;
                    return ticket;
                }
                let anyone = s.holders.iter().any(|h| !h.failed);
                if !anyone && !importing && (s.seeding + s.seeded < self.seeds || s.seeding == 0) {
                    s.seeding += 1;
                    *s.importing.entry(zone.clone()).or_default() += 1;
                    (ticket.seed, ticket.importing) = (true, Some(zone));
                    return ticket;
                }
            }
            notified.await;
        }
    }

    /// `host` holds the release now (staged, or had it already). `seeded`: it was a seed. A
    /// host that dials in is not handed out as a holder: its peers cannot dial it.
    pub fn holds(&self, host: &Host, seeded: bool) {
        if let Ok(mut s) = self.state.lock() {
            if seeded {
                s.seeding = s.seeding.saturating_sub(1);
                s.seeded += 1;
            }
            if !host.dials_in() && !s.holders.iter().any(|h| h.host.name == host.name) {
                let zone = self.zones.get(&host.name).cloned();
                s.holders.push(Holder { host: host.clone(), zone, busy: 0, failed: false });
            }
        }
        self.changed.notify_waiters();
    }

    fn release(&self, peers: &[Host], fell_short: &[String]) {
        if let Ok(mut s) = self.state.lock() {
            free(&mut s, peers, fell_short);
        }
        self.changed.notify_waiters();
    }
}

/// Up to [`PEERS`] holders that `fits` and have room, starting at the rotating `next`; each is
/// counted busy.
fn pick(s: &mut State, fits: impl Fn(&Holder) -> bool) -> Vec<Host> {
    let n = s.holders.len();
    let start = s.next % n.max(1);
    s.next = s.next.wrapping_add(1);
    let mut peers = Vec::new();
    for i in 0..n {
        let h = &mut s.holders[(start + i) % n];
        if !h.failed && h.busy < PER_HOLDER && fits(h) {
            h.busy += 1;
            peers.push(h.host.clone());
            if peers.len() == PEERS {
                break;
            }
        }
    }
    peers
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn host(n: usize) -> Host {
        Host { name: format!("web-{n}"), address: format!("10.0.0.{n}"), port: 7443 }
    }

    fn names(t: &Ticket<'_>) -> Vec<String> {
        t.peers().iter().map(|h| h.name.clone()).collect()
    }

    /// `join` for web-`n`, checked to be still waiting after a moment; it ends with that host's
    /// part (its ticket dropped at once).
    async fn waits(swarm: &Arc<Swarm>, n: usize) -> tokio::task::JoinHandle<(Vec<String>, bool)> {
        let handle = tokio::spawn({
            let swarm = swarm.clone();
            async move {
                let t = swarm.join(&host(n)).await;
                (names(&t), t.seeds())
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!handle.is_finished(), "web-{n} should wait");
        handle
    }

    #[tokio::test]
    async fn seeds_first_then_holders_spread_and_a_failed_seed_is_replaced() {
        let swarm = Arc::new(Swarm::for_hosts(5, HashMap::new()));
        let seed = swarm.join(&host(1)).await;
        assert!(seed.seeds() && seed.peers().is_empty(), "the first host seeds");
        // The next waits for a holder, and when the seed fails, it seeds instead.
        let waiting = waits(&swarm, 2).await;
        drop(seed);
        assert_eq!(waiting.await.expect("join"), (vec![], true));
        swarm.holds(&host(2), true);
        let one = swarm.join(&host(3)).await;
        assert_eq!(names(&one), ["web-2"]);
        swarm.holds(&host(3), false);
        swarm.holds(&host(4), false);
        drop(one);
        let a = swarm.join(&host(5)).await;
        let b = swarm.join(&host(6)).await;
        assert_eq!((a.peers().len(), b.peers().len()), (PEERS, PEERS));
        assert_ne!(names(&a)[0], names(&b)[0], "the load moves from holder to holder");
        assert!(!Swarm::off().join(&host(1)).await.seeds(), "off: from the coordinator, no seed's place taken");
        assert!(!Swarm::for_hosts(1, HashMap::new()).enabled());
    }

    #[tokio::test]
    async fn a_busy_holder_makes_hosts_wait_not_seed_and_one_that_fell_short_is_not_handed_out() {
        let swarm = Arc::new(Swarm::for_hosts(10, HashMap::new()));
        let seed = swarm.join(&host(1)).await;
        seed.staged(&host(1));
        let mut a = swarm.join(&host(2)).await;
        let b = swarm.join(&host(3)).await;
        assert_eq!((names(&a), names(&b)), (vec!["web-1".to_string()], vec!["web-1".to_string()]));
        // web-1 serves PER_HOLDER hosts: the next waits (it does not become a seed although no
        // seed is staging now)...
        let waiting = waits(&swarm, 4).await;
        // ...until one of them is done with it.
        a.fetched(&[]);
        assert_eq!(waiting.await.expect("join"), (vec!["web-1".to_string()], false));
        // A holder that fell short is passed over; with no other, the next host seeds.
        let mut c = swarm.join(&host(5)).await;
        drop(b);
        let mut d = swarm.join(&host(6)).await;
        d.fetched(&["web-1".to_string()]);
        c.fetched(&[]);
        let e = swarm.join(&host(7)).await;
        assert!(e.seeds() && e.peers().is_empty());
    }

    #[tokio::test]
    async fn one_host_per_zone_imports_and_the_rest_of_its_zone_fetches_from_it() {
        let zones: HashMap<String, String> =
            (1..=6).map(|n| (format!("web-{n}"), if n <= 3 { "a" } else { "b" }.to_string())).collect();
        let swarm = Arc::new(Swarm::for_hosts(6, zones));
        // Zone a seeds; zone b's first host imports from zone a, the second waits for it.
        let seed = swarm.join(&host(1)).await;
        assert!(seed.seeds());
        let waiting_a = waits(&swarm, 2).await;
        seed.staged(&host(1));
        assert_eq!(waiting_a.await.expect("join"), (vec!["web-1".to_string()], false));
        let importer = swarm.join(&host(4)).await;
        assert_eq!(names(&importer), ["web-1"], "zone b's first host fetches across");
        let waiting_b = waits(&swarm, 5).await;
        importer.staged(&host(4));
        assert_eq!(
            waiting_b.await.expect("join"),
            (vec!["web-4".to_string()], false),
            "the rest of zone b stays in zone b"
        );
        // Zone a's hosts never take a zone b holder while their own has room.
        let t = swarm.join(&host(3)).await;
        assert_eq!(names(&t), ["web-1"]);
        // An importer that fails lets the next host of its zone import.
        let zones: HashMap<String, String> = [("web-1", "a"), ("web-2", "b"), ("web-3", "b")]
            .iter()
            .map(|(h, z)| (h.to_string(), z.to_string()))
            .collect();
        let swarm = Arc::new(Swarm::for_hosts(3, zones));
        swarm.join(&host(1)).await.staged(&host(1));
        let importer = swarm.join(&host(2)).await;
        let waiting = waits(&swarm, 3).await;
        drop(importer);
        assert_eq!(waiting.await.expect("join"), (vec!["web-1".to_string()], false));
    }
}
