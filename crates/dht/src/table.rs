//! The Kademlia routing table: k-buckets over the XOR distance from the
//! local node's position.
//!
//! Owns which peers this node would hand out and query. It admits only nodes
//! that *proved themselves*: the driver calls
//! [`RoutingTable::observe_authenticated`] after an RPC to or from that node
//! succeeded over the authenticated transport. Nodes merely named in someone
//! else's response are candidates for a lookup, never table entries. It must
//! never do I/O or read a clock: time is passed in.
//!
//! A full bucket keeps its old live nodes (Kademlia's preference for
//! long-lived peers, which also resists flooding) and parks newcomers in a
//! bounded replacement cache; an entry that failed `max_failures` times in a
//! row is replaced by the freshest replacement, or by the next newcomer.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};
use vx6_proto::dhtmsg::{DhtKey, Distance};
use vx6_proto::{NodeId, UnixTime};

use crate::config::DhtConfig;
use crate::contact::Contact;

/// Number of buckets: one per possible count of leading zero bits of a
/// non-zero 256-bit distance.
pub const BUCKETS: usize = 256;

/// One routing-table entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The latest verified record of the node (highest seq seen).
    pub contact: Contact,
    /// When an RPC with it last succeeded.
    pub last_seen: UnixTime,
    /// Failed RPCs since the last success.
    pub failures: u32,
}

#[derive(Clone, Debug, Default)]
struct Bucket {
    /// Least recently seen first.
    entries: Vec<Entry>,
    /// Newcomers waiting for a slot, most recent last.
    replacements: VecDeque<Entry>,
    /// Last time a node in this bucket was observed or a lookup refreshed it.
    touched: UnixTime,
}

/// What [`RoutingTable::observe_authenticated`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// A new entry.
    Inserted,
    /// The node was already there; its liveness (and record, if newer) was
    /// refreshed.
    Updated,
    /// The node took the place of one that kept failing.
    Replaced { evicted: NodeId },
    /// The bucket is full of live nodes: the node waits in the replacement
    /// cache. The driver may ping `least_recent` and report a failure, which
    /// lets the newcomer in.
    Pending { least_recent: NodeId },
    /// Not admitted.
    Ignored(IgnoreReason),
}

/// Why a node was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    /// It is this node.
    SelfId,
    /// The record is not about the node the transport authenticated.
    IdMismatch,
    /// Its record does not advertise the DHT capability.
    NotDhtCapable,
}

/// The k-bucket routing table of one node.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    local: NodeId,
    local_pos: DhtKey,
    k: usize,
    max_failures: u32,
    replacement_cap: usize,
    require_dht: bool,
    buckets: Vec<Bucket>,
    len: usize,
}

impl RoutingTable {
    pub fn new(local: NodeId, cfg: &DhtConfig) -> Self {
        Self {
            local,
            local_pos: DhtKey::for_node(&local),
            k: cfg.k,
            max_failures: cfg.max_failures,
            replacement_cap: cfg.replacement_cache,
            require_dht: cfg.require_dht_capability,
            buckets: vec![Bucket::default(); BUCKETS],
            len: 0,
        }
    }

    pub fn local_id(&self) -> NodeId {
        self.local
    }
    pub fn local_position(&self) -> DhtKey {
        self.local_pos
    }
    /// Entries (not counting replacement caches).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bucket index of `pos`: leading zero bits of its distance from us.
    /// `None` for our own position.
    pub fn bucket_index(&self, pos: &DhtKey) -> Option<usize> {
        let lz = self.local_pos.distance(pos).leading_zeros() as usize;
        (lz < BUCKETS).then_some(lz)
    }

    /// Records that `authenticated` proved its key in an RPC that just
    /// succeeded, with `contact` as its latest verified record.
    pub fn observe_authenticated(
        &mut self,
        authenticated: NodeId,
        contact: Contact,
        now: UnixTime,
    ) -> Observed {
        if contact.id() != authenticated {
            return Observed::Ignored(IgnoreReason::IdMismatch);
        }
        if authenticated == self.local {
            return Observed::Ignored(IgnoreReason::SelfId);
        }
        if self.require_dht && !contact.serves_dht() {
            return Observed::Ignored(IgnoreReason::NotDhtCapable);
        }
        let Some(idx) = self.bucket_index(&contact.position()) else {
            return Observed::Ignored(IgnoreReason::SelfId);
        };
        let (k, max_failures, cap) = (self.k, self.max_failures, self.replacement_cap);
        let Some(bucket) = self.buckets.get_mut(idx) else {
            return Observed::Ignored(IgnoreReason::SelfId);
        };
        bucket.touched = bucket.touched.max(now);

        if let Some(pos) = bucket
            .entries
            .iter()
            .position(|e| e.contact.id() == authenticated)
        {
            let mut e = bucket.entries.remove(pos);
            if contact.seq() > e.contact.seq() {
                e.contact = contact;
            }
            e.last_seen = now;
            e.failures = 0;
            bucket.entries.push(e);
            return Observed::Updated;
        }
        let fresh = Entry {
            contact,
            last_seen: now,
            failures: 0,
        };
        bucket
            .replacements
            .retain(|e| e.contact.id() != authenticated);
        if bucket.entries.len() < k {
            bucket.entries.push(fresh);
            self.len += 1;
            return Observed::Inserted;
        }
        // Full: replace the most-failed entry if it is over the threshold.
        let worst = bucket
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.failures >= max_failures)
            .max_by_key(|(_, e)| (e.failures, std::cmp::Reverse(e.last_seen)))
            .map(|(i, _)| i);
        if let Some(i) = worst {
            let old = bucket.entries.remove(i);
            bucket.entries.push(fresh);
            return Observed::Replaced {
                evicted: old.contact.id(),
            };
        }
        if cap > 0 {
            if bucket.replacements.len() >= cap {
                bucket.replacements.pop_front();
            }
            bucket.replacements.push_back(fresh);
        }
        let least_recent = bucket
            .entries
            .first()
            .map(|e| e.contact.id())
            .unwrap_or(authenticated);
        Observed::Pending { least_recent }
    }

    /// Replaces the record of an entry that is already in the table when
    /// `contact` is newer (an address change learned from a third party; the
    /// record is still signed by the node itself). Never inserts.
    pub fn update_record(&mut self, contact: Contact) -> bool {
        let Some(idx) = self.bucket_index(&contact.position()) else {
            return false;
        };
        let Some(bucket) = self.buckets.get_mut(idx) else {
            return false;
        };
        for e in bucket
            .entries
            .iter_mut()
            .chain(bucket.replacements.iter_mut())
        {
            if e.contact.id() == contact.id() && contact.seq() > e.contact.seq() {
                e.contact = contact;
                return true;
            }
        }
        false
    }

    /// Counts a failed RPC (timeout, refused, unexpected answer) with `id`.
    /// Once it reached `max_failures`, the entry is swapped for the freshest
    /// replacement if there is one; returns the evicted id then.
    pub fn record_failure(&mut self, id: &NodeId) -> Option<NodeId> {
        let idx = self.bucket_index(&DhtKey::for_node(id))?;
        let max_failures = self.max_failures;
        let bucket = self.buckets.get_mut(idx)?;
        bucket.replacements.retain(|e| e.contact.id() != *id);
        let pos = bucket.entries.iter().position(|e| e.contact.id() == *id)?;
        let failures = {
            let e = bucket.entries.get_mut(pos)?;
            e.failures = e.failures.saturating_add(1);
            e.failures
        };
        if failures >= max_failures
            && let Some(repl) = bucket.replacements.pop_back()
        {
            let old = bucket.entries.remove(pos);
            bucket.entries.push(repl);
            return Some(old.contact.id());
        }
        None
    }

    /// Removes `id` (and any replacement-cache entry for it).
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let Some(idx) = self.bucket_index(&DhtKey::for_node(id)) else {
            return false;
        };
        let Some(bucket) = self.buckets.get_mut(idx) else {
            return false;
        };
        bucket.replacements.retain(|e| e.contact.id() != *id);
        let before = bucket.entries.len();
        bucket.entries.retain(|e| e.contact.id() != *id);
        let removed = before != bucket.entries.len();
        if removed {
            self.len -= 1;
            if let Some(repl) = bucket.replacements.pop_back() {
                bucket.entries.push(repl);
                self.len += 1;
            }
        }
        removed
    }

    /// Drops entries whose record expired; replacements move up.
    pub fn remove_expired(&mut self, now: UnixTime) -> usize {
        let expired: Vec<NodeId> = self
            .buckets
            .iter()
            .flat_map(|b| b.entries.iter().chain(b.replacements.iter()))
            .filter(|e| e.contact.expires() <= now)
            .map(|e| e.contact.id())
            .collect();
        for b in &mut self.buckets {
            b.replacements.retain(|e| e.contact.expires() > now);
        }
        expired.iter().filter(|id| self.remove(id)).count()
    }

    pub fn get(&self, id: &NodeId) -> Option<&Entry> {
        let idx = self.bucket_index(&DhtKey::for_node(id))?;
        self.buckets
            .get(idx)?
            .entries
            .iter()
            .find(|e| e.contact.id() == *id)
    }

    /// All entries, bucket by bucket (farthest bucket first).
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    /// Up to `n` healthy entries closest to `key`, closest first. Entries
    /// that failed `max_failures` times in a row are not handed out.
    pub fn closest(&self, key: &DhtKey, n: usize) -> Vec<Contact> {
        let mut all: Vec<(Distance, &Entry)> = self
            .iter()
            .filter(|e| e.failures < self.max_failures)
            .map(|e| (key.distance(&e.contact.position()), e))
            .collect();
        if n == 0 {
            return Vec::new();
        }
        if all.len() > n {
            all.select_nth_unstable_by(n - 1, |a, b| a.0.cmp(&b.0));
            all.truncate(n);
        }
        all.sort_unstable_by_key(|a| a.0);
        all.into_iter().map(|(_, e)| e.contact.clone()).collect()
    }

    /// Marks the bucket `key` falls in as recently looked up.
    pub fn touch(&mut self, key: &DhtKey, now: UnixTime) {
        if let Some(b) = self.bucket_index(key).and_then(|i| self.buckets.get_mut(i)) {
            b.touched = b.touched.max(now);
        }
    }

    /// Random targets for buckets not touched for `interval` seconds, from
    /// the farthest bucket down to one past the deepest non-empty bucket.
    /// `seed` is fresh randomness from the driver; the buckets are marked
    /// touched so each is returned once per interval.
    pub fn refresh_targets(&mut self, now: UnixTime, interval: u64, seed: [u8; 32]) -> Vec<DhtKey> {
        let deepest = self
            .buckets
            .iter()
            .rposition(|b| !b.entries.is_empty())
            .map_or(0, |d| d + 1);
        let mut out = Vec::new();
        for (i, b) in self
            .buckets
            .iter_mut()
            .enumerate()
            .take(deepest.min(BUCKETS - 1) + 1)
        {
            if b.touched.0.saturating_add(interval) <= now.0 {
                b.touched = now;
                let mut h = Sha256::new();
                h.update(seed);
                h.update((i as u16).to_be_bytes());
                out.push(key_in_bucket(&self.local_pos, i, h.finalize().into()));
            }
        }
        out
    }
}

/// A key whose distance from `local` has exactly `index` leading zero bits,
/// the remaining bits taken from `random`.
pub fn key_in_bucket(local: &DhtKey, index: usize, random: [u8; 32]) -> DhtKey {
    let mut d = random;
    for (byte_i, b) in d.iter_mut().enumerate() {
        for bit in 0..8 {
            let pos = byte_i * 8 + bit;
            let mask = 0x80u8 >> bit;
            if pos < index {
                *b &= !mask;
            } else if pos == index {
                *b |= mask;
            }
        }
    }
    let mut out = [0u8; 32];
    for ((o, l), x) in out.iter_mut().zip(local.as_bytes()).zip(d.iter()) {
        *o = l ^ x;
    }
    DhtKey(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{contact, keypair};

    fn table(k: usize) -> RoutingTable {
        let cfg = DhtConfig {
            k,
            max_failures: 2,
            replacement_cache: 2,
            ..Default::default()
        };
        RoutingTable::new(keypair(0).node_id(), &cfg)
    }

    /// Contacts that all land in the same bucket (the farthest half).
    fn same_bucket(t: &RoutingTable, n: usize) -> Vec<Contact> {
        (1u32..)
            .map(contact)
            .filter(|c| t.bucket_index(&c.position()) == Some(0))
            .take(n)
            .collect()
    }

    #[test]
    fn inserts_only_authenticated_matching_capable_nodes() {
        let mut t = table(4);
        let c = contact(1);
        assert_eq!(
            t.observe_authenticated(contact(2).id(), c.clone(), UnixTime(1)),
            Observed::Ignored(IgnoreReason::IdMismatch)
        );
        assert_eq!(
            t.observe_authenticated(c.id(), c.clone(), UnixTime(1)),
            Observed::Inserted
        );
        assert_eq!(
            t.observe_authenticated(c.id(), c.clone(), UnixTime(2)),
            Observed::Updated
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(&c.id()).unwrap().last_seen, UnixTime(2));
        let me = contact(0);
        assert_eq!(
            t.observe_authenticated(me.id(), me, UnixTime(1)),
            Observed::Ignored(IgnoreReason::SelfId)
        );
        let no_dht = crate::testutil::contact_with_caps(9, 0);
        assert_eq!(
            t.observe_authenticated(no_dht.id(), no_dht, UnixTime(1)),
            Observed::Ignored(IgnoreReason::NotDhtCapable)
        );
    }

    #[test]
    fn newer_record_replaces_older_but_not_the_reverse() {
        let mut t = table(4);
        let k = keypair(3);
        let old = crate::testutil::contact_seq(&k, 1);
        let new = crate::testutil::contact_seq(&k, 2);
        t.observe_authenticated(k.node_id(), new.clone(), UnixTime(1));
        t.observe_authenticated(k.node_id(), old.clone(), UnixTime(2));
        assert_eq!(t.get(&k.node_id()).unwrap().contact.seq(), 2);
        let newer = crate::testutil::contact_seq(&k, 3);
        assert!(t.update_record(newer));
        assert_eq!(t.get(&k.node_id()).unwrap().contact.seq(), 3);
        assert!(!t.update_record(old));
        assert!(!t.update_record(contact(77)), "update never inserts");
    }

    #[test]
    fn full_bucket_keeps_live_nodes_and_caches_newcomers() {
        let mut t = table(2);
        let cs = same_bucket(&t, 5);
        assert_eq!(
            t.observe_authenticated(cs[0].id(), cs[0].clone(), UnixTime(1)),
            Observed::Inserted
        );
        assert_eq!(
            t.observe_authenticated(cs[1].id(), cs[1].clone(), UnixTime(2)),
            Observed::Inserted
        );
        assert_eq!(
            t.observe_authenticated(cs[2].id(), cs[2].clone(), UnixTime(3)),
            Observed::Pending {
                least_recent: cs[0].id()
            }
        );
        assert!(t.get(&cs[2].id()).is_none());
        // replacement cache is bounded (2): cs[2] is pushed out by cs[3], cs[4]
        t.observe_authenticated(cs[3].id(), cs[3].clone(), UnixTime(4));
        t.observe_authenticated(cs[4].id(), cs[4].clone(), UnixTime(5));
        assert_eq!(t.buckets[0].replacements.len(), 2);
        // the least-recent node fails twice: freshest replacement takes its place
        assert_eq!(t.record_failure(&cs[0].id()), None);
        assert_eq!(t.record_failure(&cs[0].id()), Some(cs[0].id()));
        assert!(t.get(&cs[0].id()).is_none() && t.get(&cs[4].id()).is_some());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn failing_entry_is_replaced_by_next_newcomer() {
        let mut t = table(2);
        let cs = same_bucket(&t, 3);
        t.observe_authenticated(cs[0].id(), cs[0].clone(), UnixTime(1));
        t.observe_authenticated(cs[1].id(), cs[1].clone(), UnixTime(1));
        t.buckets[0].replacements.clear();
        t.record_failure(&cs[1].id());
        t.record_failure(&cs[1].id());
        // failed entries are not handed out
        assert!(
            !t.closest(&cs[1].position(), 2)
                .iter()
                .any(|c| c.id() == cs[1].id())
        );
        assert_eq!(
            t.observe_authenticated(cs[2].id(), cs[2].clone(), UnixTime(2)),
            Observed::Replaced {
                evicted: cs[1].id()
            }
        );
        // a success resets failures
        t.record_failure(&cs[0].id());
        t.observe_authenticated(cs[0].id(), cs[0].clone(), UnixTime(3));
        assert_eq!(t.get(&cs[0].id()).unwrap().failures, 0);
    }

    #[test]
    fn closest_orders_by_xor_distance() {
        let mut t = table(20);
        let cs: Vec<Contact> = (1..200).map(contact).collect();
        for c in &cs {
            t.observe_authenticated(c.id(), c.clone(), UnixTime(1));
        }
        let target = DhtKey([0x5a; 32]);
        let got = t.closest(&target, 10);
        assert_eq!(got.len(), 10);
        let mut want: Vec<&Contact> = t.iter().map(|e| &e.contact).collect();
        want.sort_by_key(|c| target.distance(&c.position()));
        assert_eq!(
            got.iter().map(Contact::id).collect::<Vec<_>>(),
            want.iter().take(10).map(|c| c.id()).collect::<Vec<_>>()
        );
        assert!(t.closest(&target, 0).is_empty());
        assert_eq!(t.closest(&target, 1000).len(), t.len());
        // buckets are bounded by k
        assert!(t.buckets.iter().all(|b| b.entries.len() <= 20));
    }

    #[test]
    fn remove_and_expiry_promote_replacements() {
        let mut t = table(1);
        let cs = same_bucket(&t, 2);
        t.observe_authenticated(cs[0].id(), cs[0].clone(), UnixTime(1));
        t.observe_authenticated(cs[1].id(), cs[1].clone(), UnixTime(1));
        assert!(t.remove(&cs[0].id()));
        assert!(t.get(&cs[1].id()).is_some());
        assert_eq!(t.len(), 1);
        // testutil records expire at 600_000
        assert_eq!(t.remove_expired(UnixTime(600_000)), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn refresh_targets_fall_in_their_bucket() {
        let mut t = table(20);
        for c in (1..50).map(contact) {
            t.observe_authenticated(c.id(), c.clone(), UnixTime(0));
        }
        let targets = t.refresh_targets(UnixTime(10_000), 3600, [7; 32]);
        assert!(!targets.is_empty());
        for (i, key) in targets.iter().enumerate() {
            assert_eq!(t.bucket_index(key), Some(i));
        }
        assert!(
            t.refresh_targets(UnixTime(10_001), 3600, [8; 32])
                .is_empty()
        );
        for i in [0, 1, 100, 255] {
            assert_eq!(
                t.bucket_index(&key_in_bucket(&t.local_position(), i, [0xff; 32])),
                Some(i)
            );
            assert_eq!(
                t.bucket_index(&key_in_bucket(&t.local_position(), i, [0; 32])),
                Some(i)
            );
        }
    }
}
