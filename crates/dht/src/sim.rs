//! An in-memory network of DHT cores: the simulator behind
//! `examples/dht_sim.rs` and the CI smoke test.
//!
//! Owns a set of virtual nodes (one [`DhtCore`] each), a seeded
//! deterministic RNG and a virtual clock, and drives lookups between them
//! exactly as a network driver would: every `Action::Send` becomes a call to
//! the destination core's `handle_request`, whose response goes through the
//! real wire encoding and back into the lookup. No sockets, no threads, no
//! wall clock: the same seed gives the same numbers.
//!
//! Simplifications, each deliberate:
//! - the authenticated link handshake is modelled by the responder calling
//!   `observe_authenticated` with the requester's record;
//! - all virtual nodes share one signature cache, so each record's signature
//!   is checked once per run rather than once per node (verification results
//!   are identical; it only saves CPU);
//! - answers to in-flight queries arrive in random order (latency is not
//!   modelled, so hops are counted as lookup depth, see [`crate::lookup`]);
//! - "gone" nodes vanish silently: every query to them fails (a timeout),
//!   nobody is told, and routing tables only learn from those failures.
//!
//! Per lookup, a *success* is a FIND_NODE for a live node's id whose result
//! contains that node (it was found and answered); *hops* is the lookup's
//! `target_hops`: the number of sequential round trips before the target was
//! known. A value lookup succeeds when FIND_VALUE returns the published
//! name claim of its owner.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use vx6_proto::dhtmsg::{DhtKey, RecordFamily, Request, Response, StoreOutcome};
use vx6_proto::id::OnionKey;
use vx6_proto::name::NodeName;
use vx6_proto::record::{Capabilities, Endpoint, NameClaim, NodeRecord, RecordBody, TransportKind};
use vx6_proto::{NodeId, NodeKeypair, UnixTime};

use crate::config::DhtConfig;
use crate::contact::{Contact, RecordVerifier};
use crate::engine::DhtCore;
use crate::lookup::{Action, Lookup, LookupKind, LookupResult, ResponseHandling};

/// Start of virtual time.
const T0: UnixTime = UnixTime(1_700_000_000);
/// Lifetime of simulated records.
const RECORD_LIFETIME: u64 = 6 * 24 * 3600;

/// A tiny deterministic RNG (SplitMix64).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`; returns 0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_be_bytes());
        }
        out
    }
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Virtual nodes; each joins through one random earlier node.
    pub nodes: usize,
    /// FIND_NODE lookups measured at each churn level.
    pub lookups: usize,
    /// Name claims published (stored on the k closest) before measuring.
    pub published: usize,
    /// FIND_VALUE lookups measured at each churn level.
    pub value_lookups: usize,
    /// Cumulative percentages of nodes silently gone, one phase each.
    pub gone_percent: Vec<u32>,
    /// Run responses through the wire encoding.
    pub wire: bool,
    pub seed: u64,
    pub dht: DhtConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 10_000,
            lookups: 5_000,
            published: 1_000,
            value_lookups: 1_000,
            gone_percent: vec![0, 10, 30],
            wire: true,
            seed: 0x5eed_0006,
            dht: DhtConfig::default(),
        }
    }
}

/// Numbers for one churn level.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhaseReport {
    pub gone_percent: u32,
    pub lookups: usize,
    /// Lookups whose result contains the target node.
    pub found: usize,
    pub hops_median: u32,
    pub hops_p99: u32,
    pub hops_max: u32,
    pub rounds_median: u32,
    pub rounds_p99: u32,
    pub queries_mean: f64,
    pub failures_mean: f64,
    /// Mean fraction of the true k closest live nodes a lookup returned.
    pub k_closest_recall: f64,
    pub value_lookups: usize,
    pub values_found: usize,
}

impl PhaseReport {
    pub fn success_rate(&self) -> f64 {
        ratio(self.found, self.lookups)
    }
    pub fn value_success_rate(&self) -> f64 {
        ratio(self.values_found, self.value_lookups)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

/// The outcome of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SimReport {
    pub nodes: usize,
    pub k: usize,
    pub alpha: usize,
    pub seed: u64,
    /// Mean queries a joining node's self-lookup sent.
    pub join_queries_mean: f64,
    pub table_size_mean: f64,
    pub table_size_min: usize,
    pub stores_accepted: usize,
    pub stores_rejected: usize,
    /// RPCs simulated in total (answered or failed).
    pub rpcs: u64,
    /// (cache hits, full signature checks) of the shared verifier.
    pub verifier: (u64, u64),
    pub phases: Vec<PhaseReport>,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nodes {}  k {}  alpha {}  seed {:#x}  join queries/node {:.1}  table size mean {:.1} min {}",
            self.nodes,
            self.k,
            self.alpha,
            self.seed,
            self.join_queries_mean,
            self.table_size_mean,
            self.table_size_min
        )?;
        writeln!(
            f,
            "published name claims: {} stores accepted, {} rejected; {} RPCs simulated; signatures checked {} (cache hits {})",
            self.stores_accepted, self.stores_rejected, self.rpcs, self.verifier.1, self.verifier.0
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| gone | lookups | success | hops median | hops p99 | hops max | rounds median | rounds p99 | queries/lookup | failed queries/lookup | k-closest recall | value lookups | value success |"
        )?;
        writeln!(
            f,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for p in &self.phases {
            writeln!(
                f,
                "| {} % | {} | {:.2} % | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} % | {} | {:.2} % |",
                p.gone_percent,
                p.lookups,
                100.0 * p.success_rate(),
                p.hops_median,
                p.hops_p99,
                p.hops_max,
                p.rounds_median,
                p.rounds_p99,
                p.queries_mean,
                p.failures_mean,
                100.0 * p.k_closest_recall,
                p.value_lookups,
                100.0 * p.value_success_rate(),
            )?;
        }
        Ok(())
    }
}

struct Net {
    cfg: SimConfig,
    keys: Vec<NodeKeypair>,
    cores: Vec<DhtCore>,
    contacts: Vec<Contact>,
    addrs: Vec<IpAddr>,
    index: HashMap<NodeId, usize>,
    gone: Vec<bool>,
    verifier: RecordVerifier,
    rng: SplitMix64,
    now: UnixTime,
    rpcs: u64,
}

fn sim_addr(i: usize) -> IpAddr {
    // one /48 per node
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0x0db8,
        i as u16,
        (i >> 16) as u16,
        0,
        0,
        0,
        1,
    ))
}

impl Net {
    fn new(cfg: SimConfig) -> Result<Self, crate::Error> {
        let mut rng = SplitMix64::new(cfg.seed);
        let n = cfg.nodes;
        let mut net = Self {
            keys: Vec::with_capacity(n),
            cores: Vec::with_capacity(n),
            contacts: Vec::with_capacity(n),
            addrs: Vec::with_capacity(n),
            index: HashMap::with_capacity(n),
            gone: vec![false; n],
            verifier: RecordVerifier::new(2 * n + 2 * cfg.published + 16),
            rng: SplitMix64::new(0),
            now: T0,
            rpcs: 0,
            cfg,
        };
        for i in 0..n {
            let key = NodeKeypair::from_secret_bytes(&rng.bytes32());
            let addr = sim_addr(i);
            let record = NodeRecord {
                node: key.node_id(),
                name: None,
                endpoints: vec![Endpoint {
                    transport: TransportKind::Quic,
                    addr: SocketAddr::new(addr, 4242),
                }],
                onion_key: OnionKey([0; 32]),
                caps: Capabilities(Capabilities::DHT | Capabilities::RELAY),
                seq: 1,
                issued: T0,
                expires: T0.plus(RECORD_LIFETIME),
            }
            .sign(&key)?;
            let contact = net.verifier.contact(record, T0)?;
            net.index.insert(key.node_id(), i);
            net.cores
                .push(DhtCore::new(key.node_id(), net.cfg.dht.clone())?);
            net.contacts.push(contact);
            net.addrs.push(addr);
            net.keys.push(key);
        }
        net.rng = rng;
        Ok(net)
    }

    fn random_live(&mut self) -> usize {
        loop {
            let i = self.rng.below(self.cores.len());
            if !self.gone.get(i).copied().unwrap_or(true) {
                return i;
            }
        }
    }

    /// Runs `lookup` on behalf of node `src` to the end.
    fn drive(&mut self, src: usize, mut lookup: Lookup) -> Option<LookupResult> {
        let src_id = self.contacts.get(src)?.id();
        let src_addr = *self.addrs.get(src)?;
        let mut pending: Vec<(NodeId, Request)> = Vec::new();
        loop {
            for a in lookup.poll() {
                match a {
                    Action::Send { to, request, .. } => pending.push((to, request)),
                    Action::Done(r) => return Some(r),
                }
            }
            if pending.is_empty() {
                return None; // a lookup that is not done always has a query in flight
            }
            let (to, request) = pending.swap_remove(self.rng.below(pending.len()));
            self.rpcs += 1;
            let now = self.now;
            let dst = self
                .index
                .get(&to)
                .copied()
                .filter(|d| !self.gone.get(*d).copied().unwrap_or(true));
            let answer = dst.and_then(|d| {
                let core = self.cores.get_mut(d)?;
                let resp = core.handle_request(src_id, src_addr, request, now);
                // The link handshake gave the responder the requester's record.
                let requester = self.contacts.get(src)?.clone();
                core.table_mut()
                    .observe_authenticated(src_id, requester, now);
                if self.cfg.wire {
                    resp.encode().ok().and_then(|b| Response::decode(&b).ok())
                } else {
                    Some(resp)
                }
            });
            let core = self.cores.get_mut(src)?;
            match answer {
                None => {
                    core.record_failure(&to);
                    lookup.on_failure(&to);
                }
                Some(resp) => match lookup.on_response(to, resp, now, &mut self.verifier) {
                    ResponseHandling::Accepted(c) => {
                        core.table_mut().observe_authenticated(to, c, now);
                    }
                    ResponseHandling::Unexpected => {
                        core.record_failure(&to);
                    }
                    _ => {}
                },
            }
        }
    }

    fn tick(&mut self) {
        self.now = self.now.plus(1);
    }

    /// Every node after the first joins through one random earlier node and
    /// looks up its own id.
    fn join_all(&mut self) -> f64 {
        let mut queries = 0usize;
        for i in 1..self.cores.len() {
            let entry = self.rng.below(i);
            let (Some(seed), Some(me)) = (self.contacts.get(entry).cloned(), self.contacts.get(i))
            else {
                continue;
            };
            let target = me.position();
            let Some(core) = self.cores.get(i) else {
                continue;
            };
            let lookup = core.start_lookup_from(target, LookupKind::FindNode, vec![seed]);
            if let Some(r) = self.drive(i, lookup) {
                queries += r.stats.queries;
            }
            self.tick();
        }
        queries as f64 / self.cores.len().saturating_sub(1).max(1) as f64
    }

    /// Publishes `published` name claims, each stored on the k closest nodes
    /// its owner finds. Returns (name key, owner) pairs and store counts.
    fn publish(&mut self) -> (Vec<(DhtKey, NodeId)>, usize, usize) {
        let (mut ok, mut rejected) = (0, 0);
        let mut published = Vec::new();
        for v in 0..self.cfg.published {
            let owner = self.random_live();
            let Ok(name) = NodeName::new(&format!("sim{v}")) else {
                continue;
            };
            let Some(key) = self.keys.get(owner) else {
                continue;
            };
            let claim = NameClaim {
                name: name.clone(),
                node: key.node_id(),
                seq: 1,
                issued: T0,
                expires: T0.plus(RECORD_LIFETIME),
            };
            let Ok(claim) = claim.sign(key) else { continue };
            let value = claim.encode();
            let dkey = DhtKey::for_name(&name);
            let now = self.now;
            let Some(core) = self.cores.get_mut(owner) else {
                continue;
            };
            let lookup = core.start_lookup(dkey, LookupKind::FindNode, now);
            let Some(result) = self.drive(owner, lookup) else {
                continue;
            };
            let (owner_id, owner_addr) = (claim.body.node, sim_addr(owner));
            for holder in result.closest {
                let Some(h) = self
                    .index
                    .get(&holder.id())
                    .and_then(|i| self.cores.get_mut(*i))
                else {
                    continue;
                };
                let req = Request::Store {
                    key: dkey,
                    family: RecordFamily::NameClaim,
                    value: value.clone(),
                };
                self.rpcs += 1;
                match h.handle_request(owner_id, owner_addr, req, now) {
                    Response::StoreResult(StoreOutcome::Accepted) => ok += 1,
                    _ => rejected += 1,
                }
            }
            published.push((dkey, owner_id));
            self.tick();
        }
        (published, ok, rejected)
    }

    fn go_silent(&mut self, percent: u32) {
        let want = self.cores.len() * percent as usize / 100;
        let mut have = self.gone.iter().filter(|g| **g).count();
        while have < want {
            let i = self.random_live();
            if let Some(g) = self.gone.get_mut(i) {
                *g = true;
                have += 1;
            }
        }
    }

    /// The true k closest live nodes to `target`.
    fn true_closest(&self, target: &DhtKey, k: usize) -> Vec<NodeId> {
        let mut all: Vec<_> = self
            .contacts
            .iter()
            .zip(self.gone.iter())
            .filter(|(_, g)| !**g)
            .map(|(c, _)| (target.distance(&c.position()), c.id()))
            .collect();
        if all.len() > k && k > 0 {
            all.select_nth_unstable(k - 1);
            all.truncate(k);
        }
        all.into_iter().map(|(_, id)| id).collect()
    }

    fn measure(&mut self, percent: u32, published: &[(DhtKey, NodeId)]) -> PhaseReport {
        self.go_silent(percent);
        let k = self.cfg.dht.k;
        let mut hops = Vec::new();
        let mut rounds = Vec::new();
        let (mut found, mut queries, mut failures, mut recall) = (0usize, 0usize, 0usize, 0f64);
        let lookups = if self.cores.len() < 2 {
            0
        } else {
            self.cfg.lookups
        };
        for _ in 0..lookups {
            let src = self.random_live();
            let mut dst = self.random_live();
            while dst == src {
                dst = self.random_live();
            }
            let Some(target) = self.contacts.get(dst).map(|c| (c.id(), c.position())) else {
                continue;
            };
            let now = self.now;
            let Some(core) = self.cores.get_mut(src) else {
                continue;
            };
            let lookup = core.start_lookup(target.1, LookupKind::FindNode, now);
            let Some(r) = self.drive(src, lookup) else {
                continue;
            };
            queries += r.stats.queries;
            failures += r.stats.failures;
            rounds.push(r.stats.rounds);
            if r.closest.iter().any(|c| c.id() == target.0) {
                found += 1;
                hops.push(r.stats.target_hops.unwrap_or(0));
            }
            let truth = self.true_closest(&target.1, k);
            let got = r.closest.iter().filter(|c| truth.contains(&c.id())).count();
            recall += ratio(got, truth.len());
            self.tick();
        }
        let mut values_found = 0;
        let value_lookups = if published.is_empty() {
            0
        } else {
            self.cfg.value_lookups
        };
        for _ in 0..value_lookups {
            let src = self.random_live();
            let Some((key, owner)) = published.get(self.rng.below(published.len())).copied() else {
                continue;
            };
            let now = self.now;
            let Some(core) = self.cores.get_mut(src) else {
                continue;
            };
            let lookup =
                core.start_lookup(key, LookupKind::FindValue(RecordFamily::NameClaim), now);
            if let Some(r) = self.drive(src, lookup)
                && r.values.iter().any(|v| v.signer == owner)
            {
                values_found += 1;
            }
            self.tick();
        }
        hops.sort_unstable();
        rounds.sort_unstable();
        PhaseReport {
            gone_percent: percent,
            lookups,
            found,
            hops_median: percentile(&hops, 50),
            hops_p99: percentile(&hops, 99),
            hops_max: hops.last().copied().unwrap_or(0),
            rounds_median: percentile(&rounds, 50),
            rounds_p99: percentile(&rounds, 99),
            queries_mean: queries as f64 / lookups.max(1) as f64,
            failures_mean: failures as f64 / lookups.max(1) as f64,
            k_closest_recall: recall / lookups.max(1) as f64,
            value_lookups,
            values_found,
        }
    }
}

/// The `p`th percentile (nearest rank) of sorted values; 0 when empty.
fn percentile(sorted: &[u32], p: usize) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(0)
}

/// Builds the network, publishes, then measures each churn level in turn.
pub fn run(cfg: &SimConfig) -> Result<SimReport, crate::Error> {
    let mut net = Net::new(cfg.clone())?;
    let join_queries_mean = net.join_all();
    let sizes: Vec<usize> = net.cores.iter().map(|c| c.table().len()).collect();
    let (published, stores_accepted, stores_rejected) = net.publish();
    let mut phases = Vec::new();
    for p in &cfg.gone_percent {
        phases.push(net.measure(*p, &published));
    }
    Ok(SimReport {
        nodes: cfg.nodes,
        k: cfg.dht.k,
        alpha: cfg.dht.alpha,
        seed: cfg.seed,
        join_queries_mean,
        table_size_mean: sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64,
        table_size_min: sizes.iter().copied().min().unwrap_or(0),
        stores_accepted,
        stores_rejected,
        rpcs: net.rpcs,
        verifier: net.verifier.counters(),
        phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic() {
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
        assert_eq!(a.bytes32(), b.bytes32());
        assert!((0..1000).all(|_| a.below(7) < 7));
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[1, 2, 3, 4], 50), 2);
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 50), 50);
    }

    #[test]
    fn tiny_network_is_deterministic() {
        let cfg = SimConfig {
            nodes: 60,
            lookups: 40,
            published: 5,
            value_lookups: 10,
            gone_percent: vec![0],
            ..Default::default()
        };
        let a = run(&cfg).unwrap();
        let b = run(&cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.phases.len(), 1);
    }
}
