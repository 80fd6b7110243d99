//! Path selection: which relays a client circuit goes through.
//!
//! One pure function, [`select_path`], so every policy decision about paths
//! lives in one place: candidates come from the registry (relay-capable
//! nodes with verified records), health and RTT from measurements. Rules:
//! never the client or the target, no node twice, no two hops sharing an
//! address prefix (IPv6 /48 and IPv4 /16 by default, configurable), and a
//! weighted random choice among the rest that favours healthy, fast relays
//! without ever making one of them certain.

use std::net::IpAddr;

use vx6_proto::NodeId;

/// A relay the client could use.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: NodeId,
    /// The addresses the relay advertises (from its signed record).
    pub addrs: Vec<IpAddr>,
    /// Circuit extensions through it that worked / failed recently.
    pub successes: u32,
    pub failures: u32,
    /// Measured round-trip time, if any.
    pub rtt_ms: Option<u32>,
}

/// Prefix lengths for the diversity rule.
#[derive(Clone, Copy, Debug)]
pub struct PathRules {
    pub prefix_len_v6: u8,
    pub prefix_len_v4: u8,
    /// Enforce the prefix rule. Off only for single-machine networks where
    /// every node shares the loopback address.
    pub diverse: bool,
}

impl Default for PathRules {
    fn default() -> Self {
        Self {
            prefix_len_v6: 48,
            prefix_len_v4: 16,
            diverse: true,
        }
    }
}

/// Why no path could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("not enough diverse relays: need {needed}, found {found}")]
    NotEnoughRelays { needed: usize, found: usize },
}

/// An address masked to its prefix: the unit of the diversity rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix(IpAddr);

/// `ip` masked to the rule's prefix length for its family.
pub fn prefix_of(ip: IpAddr, rules: &PathRules) -> Prefix {
    match ip {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let len = u32::from(rules.prefix_len_v6.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            Prefix(IpAddr::V6((bits & mask).into()))
        }
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let len = u32::from(rules.prefix_len_v4.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Prefix(IpAddr::V4((bits & mask).into()))
        }
    }
}

/// Relative weight of a candidate: health (a Laplace-smoothed success rate,
/// so a new relay starts at 1/2 and a failing one fades instead of being
/// banned forever) times an RTT factor (halved per 100 ms).
pub fn weight(c: &Candidate) -> f64 {
    let health =
        (f64::from(c.successes) + 1.0) / (f64::from(c.successes) + f64::from(c.failures) + 2.0);
    let rtt = c
        .rtt_ms
        .map_or(1.0, |ms| 1.0 / (1.0 + f64::from(ms) / 100.0));
    // Recent failures in a row weigh hard: a relay that just died should not
    // be picked again while others are available.
    let penalty = if c.failures > c.successes.saturating_add(2) {
        0.05
    } else {
        1.0
    };
    (health * rtt * penalty).max(1e-6)
}

/// Picks `hops` relays from `candidates`, never `client` or `target` (nor
/// anything in their prefixes), no node or prefix twice. `random` returns
/// uniform values in [0, 1).
pub fn select_path(
    candidates: &[Candidate],
    client: &NodeId,
    target: &NodeId,
    avoid_addrs: &[IpAddr],
    hops: usize,
    rules: &PathRules,
    random: &mut impl FnMut() -> f64,
) -> Result<Vec<NodeId>, PathError> {
    let mut used: Vec<Prefix> = avoid_addrs.iter().map(|a| prefix_of(*a, rules)).collect();
    let mut pool: Vec<&Candidate> = Vec::new();
    for c in candidates {
        if c.id == *client
            || c.id == *target
            || c.addrs.is_empty()
            || pool.iter().any(|p| p.id == c.id)
        {
            continue;
        }
        pool.push(c);
    }
    let mut path = Vec::with_capacity(hops);
    while path.len() < hops {
        let eligible: Vec<&Candidate> = pool
            .iter()
            .copied()
            .filter(|c| !path.contains(&c.id))
            .filter(|c| {
                !rules.diverse
                    || c.addrs
                        .iter()
                        .all(|a| !used.contains(&prefix_of(*a, rules)))
            })
            .collect();
        let total: f64 = eligible.iter().map(|c| weight(c)).sum();
        let Some(first) = eligible.first() else {
            return Err(PathError::NotEnoughRelays {
                needed: hops,
                found: path.len(),
            });
        };
        let mut x = random().clamp(0.0, 1.0) * total;
        let mut pick = *first;
        for c in &eligible {
            x -= weight(c);
            pick = c;
            if x <= 0.0 {
                break;
            }
        }
        used.extend(pick.addrs.iter().map(|a| prefix_of(*a, rules)));
        path.push(pick.id);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(i: u8, addr: &str) -> Candidate {
        Candidate {
            id: NodeId::from_bytes([i; 32]),
            addrs: vec![addr.parse().unwrap()],
            successes: 0,
            failures: 0,
            rtt_ms: None,
        }
    }

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.max(1);
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn never_client_target_duplicate_or_shared_prefix() {
        let mut cands: Vec<Candidate> =
            (1..=10).map(|i| cand(i, &format!("fd00:{i}::1"))).collect();
        // Same /48 as node 1: must never be on a path together with it.
        cands.push(cand(11, "fd00:1:0:5::9"));
        let client = NodeId::from_bytes([1; 32]);
        let target = NodeId::from_bytes([2; 32]);
        let rules = PathRules::default();
        let mut r = rng(7);
        for _ in 0..2000 {
            let p = select_path(&cands, &client, &target, &[], 3, &rules, &mut r).unwrap();
            assert_eq!(p.len(), 3);
            assert!(!p.contains(&client) && !p.contains(&target));
            let mut ids = p.clone();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), 3);
            let prefixes: Vec<Prefix> = p
                .iter()
                .map(|id| prefix_of(cands.iter().find(|c| c.id == *id).unwrap().addrs[0], &rules))
                .collect();
            for (i, a) in prefixes.iter().enumerate() {
                assert!(!prefixes[i + 1..].contains(a), "prefix repeated in {p:?}");
            }
        }
    }

    #[test]
    fn avoids_the_clients_prefix_and_fails_cleanly() {
        let cands = vec![
            cand(3, "10.1.0.1"),
            cand(4, "10.1.9.9"),
            cand(5, "10.2.0.1"),
        ];
        let me = NodeId::from_bytes([1; 32]);
        let t = NodeId::from_bytes([2; 32]);
        let rules = PathRules::default();
        // 10.1/16 is the client's own: only 10.2 remains.
        let p = select_path(
            &cands,
            &me,
            &t,
            &["10.1.3.3".parse().unwrap()],
            1,
            &rules,
            &mut rng(3),
        )
        .unwrap();
        assert_eq!(p, vec![NodeId::from_bytes([5; 32])]);
        assert_eq!(
            select_path(&cands, &me, &t, &[], 3, &rules, &mut rng(3)),
            Err(PathError::NotEnoughRelays {
                needed: 3,
                found: 2
            })
        );
    }

    #[test]
    fn healthy_fast_relays_are_preferred_but_not_certain() {
        let mut good = cand(3, "fd00:3::1");
        good.successes = 50;
        good.rtt_ms = Some(5);
        let mut bad = cand(4, "fd00:4::1");
        bad.failures = 10;
        let cands = vec![good, bad];
        let me = NodeId::from_bytes([1; 32]);
        let t = NodeId::from_bytes([2; 32]);
        let mut r = rng(11);
        let mut good_first = 0;
        for _ in 0..1000 {
            let p = select_path(&cands, &me, &t, &[], 1, &PathRules::default(), &mut r).unwrap();
            if p[0] == NodeId::from_bytes([3; 32]) {
                good_first += 1;
            }
        }
        assert!(good_first > 950, "{good_first}");
        assert!(good_first < 1000, "a failing relay must still be possible");
    }
}
