//! The record store: values this node holds for the DHT, with admission.
//!
//! Owns the held values, their bounds (count and bytes), expiry, eviction,
//! per-peer and per-prefix STORE rate limits, the reject counters and the
//! snapshot/restore hooks the node crate uses to persist the store. It must
//! never trust a value it did not verify: everything admitted (from a peer,
//! from the owner, or from a snapshot) passes [`crate::value::check_value`].
//!
//! Admission, in order (cheapest first; each failure is a typed
//! [`RejectReason`] and is counted):
//! 1. the sender and its address prefix are within their rate limits;
//! 2. the value is at most `MAX_VALUE_LEN` bytes and its family is stored;
//! 3. it decodes as the family's record and the key is the hash of the
//!    record's subject (so node- and service-record keys only ever hold
//!    their subject's own record);
//! 4. it has not expired and its lifetime is sane; the signature verifies;
//! 5. its seq is newer than the one held from that signer under that key
//!    (the same seq with the same bytes is an idempotent accept);
//! 6. a name-claim key holds at most `max_signers_per_name` signers;
//! 7. it fits: over a bound, expired values go first, then values whose key
//!    is farther from this node than the new one; otherwise `StoreFull`.

use std::collections::BTreeMap;

use vx6_proto::dhtmsg::{DhtKey, Distance, MAX_VALUES_PER_KEY, RecordFamily, RejectReason};
use vx6_proto::{NodeId, UnixTime};

use crate::config::DhtConfig;
use crate::ratelimit::{AddrPrefix, RateLimiter};
use crate::republish::RepublishItem;
use crate::value::check_value;

/// How a value was admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// A value from a signer not held under this key before.
    Stored,
    /// It replaced the signer's older value.
    Replaced { old_seq: u64 },
    /// The exact same value was already held.
    Unchanged,
}

/// Counters for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub stored: u64,
    pub replaced: u64,
    pub unchanged: u64,
    /// Rejections by reason.
    pub rejects: BTreeMap<RejectReason, u64>,
    pub evicted_expired: u64,
    pub evicted_far: u64,
}

impl StoreStats {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejects.get(&reason).copied().unwrap_or(0)
    }
    pub fn rejected_total(&self) -> u64 {
        self.rejects.values().sum()
    }
}

/// What [`RecordStore::restore`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: usize,
    /// Expired, invalid or no longer fitting.
    pub dropped: usize,
}

#[derive(Clone, Debug)]
struct Held {
    signer: NodeId,
    seq: u64,
    expires: UnixTime,
    bytes: Vec<u8>,
    next_replicate: UnixTime,
}

#[derive(Clone, Debug)]
struct Slot {
    key: DhtKey,
    family: RecordFamily,
    values: Vec<Held>,
}

/// Values held by one node, keyed by their distance from it.
#[derive(Clone, Debug)]
pub struct RecordStore {
    local_pos: DhtKey,
    max_values: usize,
    max_bytes: usize,
    max_signers_per_name: usize,
    replicate_secs: u64,
    slots: BTreeMap<Distance, Slot>,
    values: usize,
    bytes: usize,
    peers: RateLimiter<NodeId>,
    prefixes: RateLimiter<AddrPrefix>,
    stats: StoreStats,
}

impl RecordStore {
    pub fn new(local: NodeId, cfg: &DhtConfig) -> Self {
        Self {
            local_pos: DhtKey::for_node(&local),
            max_values: cfg.store_max_values,
            max_bytes: cfg.store_max_bytes,
            max_signers_per_name: cfg.max_signers_per_name.min(MAX_VALUES_PER_KEY),
            replicate_secs: cfg.replicate_secs,
            slots: BTreeMap::new(),
            values: 0,
            bytes: 0,
            peers: RateLimiter::new(cfg.peer_rate, cfg.rate_limiter_max_tracked),
            prefixes: RateLimiter::new(cfg.prefix_rate, cfg.rate_limiter_max_tracked),
            stats: StoreStats::default(),
        }
    }

    /// A STORE from peer `from` (authenticated by the transport) whose
    /// address is in `from_prefix`.
    pub fn store(
        &mut self,
        key: DhtKey,
        family: RecordFamily,
        value: Vec<u8>,
        from: NodeId,
        from_prefix: AddrPrefix,
        now: UnixTime,
    ) -> Result<Admitted, RejectReason> {
        let allowed = self.peers.allow(&from, now) && self.prefixes.allow(&from_prefix, now);
        let res = if allowed {
            self.admit(key, family, value, now)
        } else {
            Err(RejectReason::RateLimited)
        };
        self.count(res)
    }

    /// A value from a trusted local source (this node's own records): every
    /// validity rule applies, rate limits do not.
    pub fn insert_local(
        &mut self,
        key: DhtKey,
        family: RecordFamily,
        value: Vec<u8>,
        now: UnixTime,
    ) -> Result<Admitted, RejectReason> {
        let res = self.admit(key, family, value, now);
        self.count(res)
    }

    fn count(&mut self, res: Result<Admitted, RejectReason>) -> Result<Admitted, RejectReason> {
        match res {
            Ok(Admitted::Stored) => self.stats.stored += 1,
            Ok(Admitted::Replaced { .. }) => self.stats.replaced += 1,
            Ok(Admitted::Unchanged) => self.stats.unchanged += 1,
            Err(r) => *self.stats.rejects.entry(r).or_insert(0) += 1,
        }
        res
    }

    fn admit(
        &mut self,
        key: DhtKey,
        family: RecordFamily,
        value: Vec<u8>,
        now: UnixTime,
    ) -> Result<Admitted, RejectReason> {
        let meta = check_value(&key, family, &value, now, None)?;
        let dist = self.local_pos.distance(&key);
        self.expire_slot(&dist, now);

        let mut replaces: Option<(u64, usize)> = None;
        if let Some(slot) = self.slots.get_mut(&dist) {
            if slot.key != key || slot.family != family {
                return Err(RejectReason::KeyMismatch);
            }
            if let Some(h) = slot.values.iter_mut().find(|h| h.signer == meta.signer) {
                if h.bytes == value {
                    // Someone else replicated it: no need for us to, this round.
                    h.next_replicate = now.plus(self.replicate_secs);
                    return Ok(Admitted::Unchanged);
                }
                if meta.seq <= h.seq {
                    return Err(RejectReason::Stale);
                }
                replaces = Some((h.seq, h.bytes.len()));
            } else if slot.values.len() >= self.max_signers_per_name {
                return Err(RejectReason::TooManySigners);
            }
        }

        let (add_values, old_len) = match replaces {
            Some((_, len)) => (0, len),
            None => (1, 0),
        };
        self.make_room(&dist, add_values, value.len().saturating_sub(old_len), now)?;

        let held = Held {
            signer: meta.signer,
            seq: meta.seq,
            expires: meta.expires,
            bytes: value,
            next_replicate: now.plus(self.replicate_secs),
        };
        self.bytes = self.bytes - old_len + held.bytes.len();
        let slot = self.slots.entry(dist).or_insert_with(|| Slot {
            key,
            family,
            values: Vec::new(),
        });
        match replaces {
            Some((old_seq, _)) => {
                if let Some(h) = slot.values.iter_mut().find(|h| h.signer == meta.signer) {
                    *h = held;
                }
                Ok(Admitted::Replaced { old_seq })
            }
            None => {
                slot.values.push(held);
                self.values += 1;
                Ok(Admitted::Stored)
            }
        }
    }

    /// Frees room for `add_values` more values and `add_bytes` more bytes
    /// for a key at distance `dist`: expired values first, then values of
    /// keys farther than `dist`, farthest first.
    fn make_room(
        &mut self,
        dist: &Distance,
        add_values: usize,
        add_bytes: usize,
        now: UnixTime,
    ) -> Result<(), RejectReason> {
        let fits =
            |s: &Self| s.values + add_values <= s.max_values && s.bytes + add_bytes <= s.max_bytes;
        if fits(self) {
            return Ok(());
        }
        self.expire(now);
        if fits(self) {
            return Ok(());
        }
        // Would evicting every farther value be enough? Check before touching anything.
        let (mut v, mut b) = (self.values, self.bytes);
        for slot in self
            .slots
            .range(dist..)
            .rev()
            .take_while(|(d, _)| *d > dist)
            .map(|(_, s)| s)
        {
            if v + add_values <= self.max_values && b + add_bytes <= self.max_bytes {
                break;
            }
            v -= slot.values.len();
            b -= slot.values.iter().map(|h| h.bytes.len()).sum::<usize>();
        }
        if v + add_values > self.max_values || b + add_bytes > self.max_bytes {
            return Err(RejectReason::StoreFull);
        }
        while !fits(self) {
            let Some(mut entry) = self.slots.last_entry() else {
                break;
            };
            if entry.key() <= dist {
                break;
            }
            match entry.get_mut().values.pop() {
                Some(h) => {
                    self.values -= 1;
                    self.bytes -= h.bytes.len();
                    self.stats.evicted_far += 1;
                }
                None => {
                    entry.remove();
                    continue;
                }
            }
            if entry.get().values.is_empty() {
                entry.remove();
            }
        }
        if fits(self) {
            Ok(())
        } else {
            Err(RejectReason::StoreFull)
        }
    }

    fn expire_slot(&mut self, dist: &Distance, now: UnixTime) {
        let Some(slot) = self.slots.get_mut(dist) else {
            return;
        };
        let before = slot.values.len();
        let mut freed = 0;
        slot.values.retain(|h| {
            let live = h.expires > now;
            if !live {
                freed += h.bytes.len();
            }
            live
        });
        let gone = before - slot.values.len();
        let empty = slot.values.is_empty();
        self.values -= gone;
        self.bytes -= freed;
        self.stats.evicted_expired += gone as u64;
        if empty {
            self.slots.remove(dist);
        }
    }

    /// Drops every expired value; returns how many.
    pub fn expire(&mut self, now: UnixTime) -> usize {
        let before = self.values;
        let dists: Vec<Distance> = self
            .slots
            .iter()
            .filter(|(_, s)| s.values.iter().any(|h| h.expires <= now))
            .map(|(d, _)| *d)
            .collect();
        for d in dists {
            self.expire_slot(&d, now);
        }
        before - self.values
    }

    /// Live values held under `key` (at most `MAX_VALUES_PER_KEY`).
    pub fn get(&self, key: &DhtKey, now: UnixTime) -> Vec<Vec<u8>> {
        match self.slots.get(&self.local_pos.distance(key)) {
            Some(slot) if slot.key == *key => slot
                .values
                .iter()
                .filter(|h| h.expires > now)
                .take(MAX_VALUES_PER_KEY)
                .map(|h| h.bytes.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Everything held, for persisting. Expired values are included;
    /// [`RecordStore::restore`] drops them.
    pub fn snapshot(&self) -> Vec<(DhtKey, RecordFamily, Vec<u8>)> {
        self.slots
            .values()
            .flat_map(|s| {
                s.values
                    .iter()
                    .map(move |h| (s.key, s.family, h.bytes.clone()))
            })
            .collect()
    }

    /// Re-admits a snapshot, re-verifying every value (rate limits do not
    /// apply). Invalid, expired and non-fitting items are dropped.
    pub fn restore(
        &mut self,
        items: Vec<(DhtKey, RecordFamily, Vec<u8>)>,
        now: UnixTime,
    ) -> RestoreReport {
        let mut report = RestoreReport::default();
        for (key, family, value) in items {
            match self.admit(key, family, value, now) {
                Ok(_) => report.restored += 1,
                Err(_) => report.dropped += 1,
            }
        }
        report
    }

    /// Held values due for re-replication to the current k closest nodes
    /// (every `replicate_secs` after admission, postponed whenever someone
    /// else stores the same value here). At most `limit` per call.
    pub fn replication_due(&mut self, now: UnixTime, limit: usize) -> Vec<RepublishItem> {
        let mut out = Vec::new();
        for slot in self.slots.values_mut() {
            for h in slot.values.iter_mut() {
                if out.len() >= limit {
                    return out;
                }
                if h.next_replicate <= now && h.expires > now {
                    h.next_replicate = now.plus(self.replicate_secs);
                    out.push(RepublishItem {
                        key: slot.key,
                        family: slot.family,
                        value: h.bytes.clone(),
                    });
                }
            }
        }
        out
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.values
    }
    pub fn is_empty(&self) -> bool {
        self.values == 0
    }
    /// Bytes of values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Keys held.
    pub fn keys(&self) -> usize {
        self.slots.len()
    }
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use crate::ratelimit::addr_prefix;
    use crate::testutil::*;

    const NOW: UnixTime = UnixTime(10_000);

    fn store_with(cfg: DhtConfig) -> RecordStore {
        RecordStore::new(keypair(0).node_id(), &cfg)
    }
    fn open_store() -> RecordStore {
        store_with(DhtConfig {
            peer_rate: RateLimit::UNLIMITED,
            prefix_rate: RateLimit::UNLIMITED,
            ..Default::default()
        })
    }
    fn peer() -> (NodeId, AddrPrefix) {
        (
            keypair(99).node_id(),
            addr_prefix("2001:db8:1::1".parse().unwrap()),
        )
    }
    fn claim(seed: u32, name_: &str, seq: u64) -> (DhtKey, Vec<u8>) {
        let k = keypair(seed);
        (
            DhtKey::for_name(&name(name_)),
            name_claim(&k, name_, seq, UnixTime(9_000), UnixTime(20_000)).encode(),
        )
    }
    fn put(
        s: &mut RecordStore,
        key: DhtKey,
        family: RecordFamily,
        v: Vec<u8>,
    ) -> Result<Admitted, RejectReason> {
        let (from, prefix) = peer();
        s.store(key, family, v, from, prefix, NOW)
    }

    #[test]
    fn admits_valid_values_of_each_family() {
        let mut s = open_store();
        let k = keypair(1);
        let node = signed_node(&k, 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let svc = service_record(&k, "web", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let (ck, c) = claim(1, "alice", 1);
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_node(&k.node_id()),
                RecordFamily::NodeRecord,
                node.clone()
            ),
            Ok(Admitted::Stored)
        );
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_service(&k.node_id(), &service("web")),
                RecordFamily::ServiceRecord,
                svc
            ),
            Ok(Admitted::Stored)
        );
        assert_eq!(
            put(&mut s, ck, RecordFamily::NameClaim, c.clone()),
            Ok(Admitted::Stored)
        );
        assert_eq!(s.get(&ck, NOW), vec![c]);
        assert_eq!(s.get(&DhtKey::for_node(&k.node_id()), NOW), vec![node]);
        assert_eq!((s.len(), s.keys(), s.stats().stored), (3, 3, 3));
    }

    #[test]
    fn rejects_forged_signature() {
        let mut s = open_store();
        let mut rec = name_claim(&keypair(1), "alice", 1, UnixTime(9_000), UnixTime(20_000));
        rec.body.seq = 5; // body changed after signing
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::NameClaim,
                rec.encode()
            ),
            Err(RejectReason::BadSignature)
        );
        // signed by someone else entirely
        let mut other = name_claim(&keypair(2), "alice", 1, UnixTime(9_000), UnixTime(20_000));
        other.body.node = keypair(1).node_id();
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::NameClaim,
                other.encode()
            ),
            Err(RejectReason::BadSignature)
        );
        assert_eq!(s.stats().rejected(RejectReason::BadSignature), 2);
        assert!(s.is_empty());
    }

    #[test]
    fn rejects_key_content_mismatch() {
        let mut s = open_store();
        let (_, c) = claim(1, "alice", 1);
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("bob")),
                RecordFamily::NameClaim,
                c.clone()
            ),
            Err(RejectReason::KeyMismatch)
        );
        let k = keypair(1);
        let node = signed_node(&k, 1, UnixTime(9_000), UnixTime(20_000)).encode();
        // someone else's node-record key
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_node(&keypair(2).node_id()),
                RecordFamily::NodeRecord,
                node.clone()
            ),
            Err(RejectReason::KeyMismatch)
        );
        // wrong family for the bytes
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_node(&k.node_id()),
                RecordFamily::ServiceRecord,
                node
            ),
            Err(RejectReason::Malformed)
        );
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::HiddenDescriptor,
                c
            ),
            Err(RejectReason::UnsupportedFamily)
        );
        assert_eq!(s.stats().rejected(RejectReason::KeyMismatch), 2);
        assert_eq!(s.stats().rejected(RejectReason::Malformed), 1);
        assert_eq!(s.stats().rejected(RejectReason::UnsupportedFamily), 1);
    }

    #[test]
    fn rejects_stale_seq_and_accepts_idempotent_repeat() {
        let mut s = open_store();
        let (key, v2) = claim(1, "alice", 2);
        let (_, v1) = claim(1, "alice", 1);
        let (_, v3) = claim(1, "alice", 3);
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, v2.clone()),
            Ok(Admitted::Stored)
        );
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, v2.clone()),
            Ok(Admitted::Unchanged)
        );
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, v1),
            Err(RejectReason::Stale)
        );
        // same seq, different bytes (different expiry) is stale too
        let same_seq =
            name_claim(&keypair(1), "alice", 2, UnixTime(9_000), UnixTime(20_001)).encode();
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, same_seq),
            Err(RejectReason::Stale)
        );
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, v3.clone()),
            Ok(Admitted::Replaced { old_seq: 2 })
        );
        assert_eq!(s.get(&key, NOW), vec![v3.clone()]);
        assert_eq!((s.len(), s.bytes()), (1, v3.len()));
        assert_eq!(s.stats().rejected(RejectReason::Stale), 2);
    }

    #[test]
    fn rejects_expired_and_bad_lifetime() {
        let mut s = open_store();
        let k = keypair(1);
        let old = name_claim(&k, "alice", 1, UnixTime(1_000), UnixTime(NOW.0)).encode();
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::NameClaim,
                old
            ),
            Err(RejectReason::Expired)
        );
        let future = name_claim(
            &k,
            "alice",
            1,
            UnixTime(NOW.0 + 3600),
            UnixTime(NOW.0 + 7200),
        )
        .encode();
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::NameClaim,
                future
            ),
            Err(RejectReason::BadLifetime)
        );
        assert_eq!(s.stats().rejected(RejectReason::Expired), 1);
        assert_eq!(s.stats().rejected(RejectReason::BadLifetime), 1);
    }

    #[test]
    fn rejects_oversized() {
        let mut s = open_store();
        let big = vec![1u8; vx6_proto::dhtmsg::MAX_VALUE_LEN + 1];
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::NameClaim,
                big
            ),
            Err(RejectReason::TooLarge)
        );
        let junk = vec![1u8; 10];
        assert_eq!(
            put(
                &mut s,
                DhtKey::for_name(&name("alice")),
                RecordFamily::NameClaim,
                junk
            ),
            Err(RejectReason::Malformed)
        );
        assert_eq!(s.stats().rejected(RejectReason::TooLarge), 1);
    }

    #[test]
    fn rate_limits_per_peer() {
        let mut s = store_with(DhtConfig {
            peer_rate: RateLimit {
                burst: 2,
                per_minute: 60,
            },
            prefix_rate: RateLimit::UNLIMITED,
            ..Default::default()
        });
        let (key, v) = claim(1, "alice", 1);
        let prefix = addr_prefix("2001:db8:1::1".parse().unwrap());
        let a = keypair(50).node_id();
        let b = keypair(51).node_id();
        assert!(
            s.store(key, RecordFamily::NameClaim, v.clone(), a, prefix, NOW)
                .is_ok()
        );
        assert!(
            s.store(key, RecordFamily::NameClaim, v.clone(), a, prefix, NOW)
                .is_ok()
        );
        assert_eq!(
            s.store(key, RecordFamily::NameClaim, v.clone(), a, prefix, NOW),
            Err(RejectReason::RateLimited)
        );
        assert!(
            s.store(key, RecordFamily::NameClaim, v.clone(), b, prefix, NOW)
                .is_ok(),
            "other peer unaffected"
        );
        assert!(
            s.store(key, RecordFamily::NameClaim, v, a, prefix, NOW.plus(1))
                .is_ok(),
            "refilled"
        );
        assert_eq!(s.stats().rejected(RejectReason::RateLimited), 1);
    }

    #[test]
    fn rate_limits_per_prefix() {
        let mut s = store_with(DhtConfig {
            peer_rate: RateLimit::UNLIMITED,
            prefix_rate: RateLimit {
                burst: 3,
                per_minute: 1,
            },
            ..Default::default()
        });
        let (key, v) = claim(1, "alice", 1);
        // many ids in one /48 share a budget
        let site = |i: u16| addr_prefix(format!("2001:db8:7:{i:x}::1").parse().unwrap());
        for i in 0..3 {
            assert!(
                s.store(
                    key,
                    RecordFamily::NameClaim,
                    v.clone(),
                    keypair(60 + i).node_id(),
                    site(i as u16),
                    NOW
                )
                .is_ok()
            );
        }
        assert_eq!(
            s.store(
                key,
                RecordFamily::NameClaim,
                v.clone(),
                keypair(70).node_id(),
                site(9),
                NOW
            ),
            Err(RejectReason::RateLimited)
        );
        let elsewhere = addr_prefix("2001:db8:8::1".parse().unwrap());
        assert!(
            s.store(
                key,
                RecordFamily::NameClaim,
                v,
                keypair(70).node_id(),
                elsewhere,
                NOW
            )
            .is_ok()
        );
    }

    #[test]
    fn name_keys_hold_several_signers_up_to_the_bound() {
        let mut s = store_with(DhtConfig {
            max_signers_per_name: 3,
            peer_rate: RateLimit::UNLIMITED,
            prefix_rate: RateLimit::UNLIMITED,
            ..Default::default()
        });
        for seed in 1..=3 {
            let (key, v) = claim(seed, "alice", 1);
            assert_eq!(
                put(&mut s, key, RecordFamily::NameClaim, v),
                Ok(Admitted::Stored)
            );
        }
        let (key, v) = claim(4, "alice", 1);
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, v),
            Err(RejectReason::TooManySigners)
        );
        assert_eq!(s.get(&key, NOW).len(), 3, "a clash stays visible");
        // an existing signer may still update
        let (key, v) = claim(2, "alice", 2);
        assert_eq!(
            put(&mut s, key, RecordFamily::NameClaim, v),
            Ok(Admitted::Replaced { old_seq: 1 })
        );
    }

    #[test]
    fn bounded_store_evicts_expired_then_farthest() {
        let mut s = store_with(DhtConfig {
            store_max_values: 3,
            peer_rate: RateLimit::UNLIMITED,
            prefix_rate: RateLimit::UNLIMITED,
            ..Default::default()
        });
        let local = DhtKey::for_node(&keypair(0).node_id());
        // one short-lived value, then fill up
        let short = name_claim(
            &keypair(1),
            "short",
            1,
            UnixTime(9_000),
            UnixTime(NOW.0 + 10),
        )
        .encode();
        put(
            &mut s,
            DhtKey::for_name(&name("short")),
            RecordFamily::NameClaim,
            short,
        )
        .unwrap();
        let mut names: Vec<(Distance, String)> = (0..40)
            .map(|i| format!("n{i}"))
            .map(|n| (local.distance(&DhtKey::for_name(&name(&n))), n))
            .collect();
        names.sort();
        let (near, mid, far, farther) = (&names[0].1, &names[10].1, &names[20].1, &names[39].1);
        for n in [mid, far] {
            let (k, v) = claim(1, n, 1);
            put(&mut s, k, RecordFamily::NameClaim, v).unwrap();
        }
        assert_eq!(s.len(), 3);
        // later, the short value has expired: it goes first
        let later = UnixTime(NOW.0 + 11);
        let (k, v) = claim(1, near, 1);
        let (from, prefix) = peer();
        assert_eq!(
            s.store(k, RecordFamily::NameClaim, v, from, prefix, later),
            Ok(Admitted::Stored)
        );
        assert_eq!(s.stats().evicted_expired, 1);
        assert_eq!(s.len(), 3);
        // a value farther than everything held is refused
        let (k, v) = claim(1, farther, 1);
        assert_eq!(
            s.store(k, RecordFamily::NameClaim, v, from, prefix, later),
            Err(RejectReason::StoreFull)
        );
        // a closer one evicts the farthest
        let (k, v) = claim(1, &names[1].1, 1);
        assert_eq!(
            s.store(k, RecordFamily::NameClaim, v, from, prefix, later),
            Ok(Admitted::Stored)
        );
        assert_eq!(s.stats().evicted_far, 1);
        assert!(s.get(&DhtKey::for_name(&name(far)), later).is_empty());
        assert_eq!(s.get(&DhtKey::for_name(&name(mid)), later).len(), 1);
        assert_eq!(s.stats().rejected(RejectReason::StoreFull), 1);
    }

    #[test]
    fn byte_bound_is_enforced() {
        let (_, v) = claim(1, "alice", 1);
        let cap = v.len() * 2 + 1;
        let mut s = store_with(DhtConfig {
            store_max_bytes: cap,
            peer_rate: RateLimit::UNLIMITED,
            prefix_rate: RateLimit::UNLIMITED,
            ..Default::default()
        });
        for seed in 1..=5 {
            let (k, v) = claim(seed, &format!("n{seed}"), 1);
            let _ = put(&mut s, k, RecordFamily::NameClaim, v);
            assert!(s.bytes() <= cap);
        }
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn expiry_and_get_hide_dead_values() {
        let mut s = open_store();
        let v = name_claim(
            &keypair(1),
            "alice",
            1,
            UnixTime(9_000),
            UnixTime(NOW.0 + 5),
        )
        .encode();
        let key = DhtKey::for_name(&name("alice"));
        put(&mut s, key, RecordFamily::NameClaim, v).unwrap();
        assert_eq!(s.get(&key, NOW).len(), 1);
        assert!(s.get(&key, NOW.plus(5)).is_empty());
        assert_eq!(s.expire(NOW.plus(5)), 1);
        assert_eq!((s.len(), s.bytes(), s.keys()), (0, 0, 0));
    }

    #[test]
    fn snapshot_restore_reverifies() {
        let mut s = open_store();
        for seed in 1..=3 {
            let (k, v) = claim(seed, "alice", 1);
            put(&mut s, k, RecordFamily::NameClaim, v).unwrap();
        }
        let mut snap = s.snapshot();
        assert_eq!(snap.len(), 3);
        // tamper with one persisted value
        if let Some(last) = snap.last_mut().and_then(|i| i.2.last_mut()) {
            *last ^= 1;
        }
        let mut restored = open_store();
        let report = restored.restore(snap, NOW);
        assert_eq!(
            report,
            RestoreReport {
                restored: 2,
                dropped: 1
            }
        );
        assert_eq!(
            restored.get(&DhtKey::for_name(&name("alice")), NOW).len(),
            2
        );
        // all expired by then
        let mut late = open_store();
        assert_eq!(late.restore(s.snapshot(), UnixTime(20_000)).dropped, 3);
    }

    #[test]
    fn replication_schedule() {
        let mut s = open_store();
        let (k, v) = claim(1, "alice", 1);
        put(&mut s, k, RecordFamily::NameClaim, v.clone()).unwrap();
        assert!(s.replication_due(NOW, 10).is_empty());
        let t = NOW.plus(3600);
        let due = s.replication_due(t, 10);
        assert_eq!(
            due,
            vec![RepublishItem {
                key: k,
                family: RecordFamily::NameClaim,
                value: v.clone()
            }]
        );
        assert!(s.replication_due(t, 10).is_empty());
        // a peer storing the same value postpones our replication
        let (from, prefix) = peer();
        s.store(k, RecordFamily::NameClaim, v, from, prefix, t.plus(3000))
            .unwrap();
        assert!(s.replication_due(t.plus(3600), 10).is_empty());
    }
}
