//! Verified peers ([`Contact`]) and the signature cache that makes them.
//!
//! A `Contact` is a node record whose signature and lifetime were checked;
//! the routing table and lookups hold nothing else, so an unverified record
//! cannot reach them by construction. [`RecordVerifier`] remembers which
//! exact signed bytes verified, so a record seen in many responses costs one
//! signature check. It never trusts anything but a full verification: its
//! cache key is a hash over the complete signed encoding.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use vx6_proto::dhtmsg::DhtKey;
use vx6_proto::record::{
    Capabilities, Endpoint, MAX_CLOCK_SKEW_SECS, MAX_LIFETIME_SECS, NodeRecord, RecordBody, Signed,
};
use vx6_proto::{NodeId, UnixTime};

/// A node record that verified: who the node is, where it sits in the key
/// space and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contact {
    id: NodeId,
    position: DhtKey,
    /// Shared: a contact is copied into many tables, lookups and answers.
    record: Arc<Signed<NodeRecord>>,
}

impl Contact {
    /// Verifies `record` at `now` (no cache).
    pub fn verify(record: Signed<NodeRecord>, now: UnixTime) -> Result<Self, vx6_proto::Error> {
        record.verify(now)?;
        Ok(Self::from_verified(record))
    }

    fn from_verified(record: Signed<NodeRecord>) -> Self {
        let id = record.body.node;
        Self {
            id,
            position: DhtKey::for_node(&id),
            record: Arc::new(record),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }
    /// The node's position in the key space (`DhtKey::for_node(id)`).
    pub fn position(&self) -> DhtKey {
        self.position
    }
    pub fn record(&self) -> &Signed<NodeRecord> {
        &self.record
    }
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.record.body.endpoints
    }
    pub fn seq(&self) -> u64 {
        self.record.body.seq
    }
    pub fn expires(&self) -> UnixTime {
        self.record.body.expires
    }
    pub fn serves_dht(&self) -> bool {
        self.record.body.caps.has(Capabilities::DHT)
    }
}

/// Checks signed records, remembering (bounded, first-in first-out) which
/// exact encodings verified so repeats only need the time checks.
#[derive(Debug)]
pub struct RecordVerifier {
    capacity: usize,
    seen: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    hits: u64,
    misses: u64,
}

impl RecordVerifier {
    /// A verifier remembering up to `capacity` records (0: no cache).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            seen: HashSet::new(),
            order: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// Verifies `rec` at `now`, exactly as [`Signed::verify`] does.
    pub fn verify<T: RecordBody>(
        &mut self,
        rec: &Signed<T>,
        now: UnixTime,
    ) -> Result<(), vx6_proto::Error> {
        if self.capacity == 0 {
            return rec.verify(now).map(|_| ());
        }
        let mut h = Sha256::new();
        h.update([T::TAG.len() as u8]);
        h.update(T::TAG.as_bytes());
        h.update(rec.encode());
        let digest: [u8; 32] = h.finalize().into();
        if self.seen.contains(&digest) {
            self.hits += 1;
            return check_times(&rec.body, now);
        }
        self.misses += 1;
        rec.verify(now)?;
        if self.order.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(digest);
        self.order.push_back(digest);
        Ok(())
    }

    /// Verifies a node record and makes it a [`Contact`].
    pub fn contact(
        &mut self,
        record: Signed<NodeRecord>,
        now: UnixTime,
    ) -> Result<Contact, vx6_proto::Error> {
        self.verify(&record, now)?;
        Ok(Contact::from_verified(record))
    }

    /// (cache hits, full verifications) so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }
}

/// The time rules of [`Signed::verify`], for records whose signature is
/// already known to be good.
pub(crate) fn check_times<T: RecordBody>(b: &T, now: UnixTime) -> Result<(), vx6_proto::Error> {
    use vx6_proto::Error;
    if b.issued().0 > now.0.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(Error::FromTheFuture);
    }
    if b.expires() <= b.issued() || b.expires().0 - b.issued().0 > MAX_LIFETIME_SECS {
        return Err(Error::Invalid {
            what: "record",
            why: "lifetime out of range",
        });
    }
    if b.expires() <= now {
        return Err(Error::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{node_record, signed_node};
    use vx6_proto::NodeKeypair;

    #[test]
    fn cache_hits_still_check_time_and_bytes() {
        let k = NodeKeypair::from_secret_bytes(&[5; 32]);
        let rec = signed_node(&k, 1, UnixTime(1000), UnixTime(5000));
        let mut v = RecordVerifier::new(2);
        v.verify(&rec, UnixTime(1000)).unwrap();
        v.verify(&rec, UnixTime(1001)).unwrap();
        assert_eq!(v.counters(), (1, 1));
        // expired even though the signature is cached
        assert_eq!(
            v.verify(&rec, UnixTime(5000)),
            Err(vx6_proto::Error::Expired)
        );
        // a different body with the cached signature is not a hit
        let mut forged = rec.clone();
        forged.body.seq = 2;
        assert_eq!(
            v.verify(&forged, UnixTime(1000)),
            Err(vx6_proto::Error::BadSignature)
        );
        // bounded
        for s in 2..6 {
            v.verify(
                &signed_node(&k, s, UnixTime(1000), UnixTime(5000)),
                UnixTime(1000),
            )
            .unwrap();
        }
        assert!(v.seen.len() <= 2 && v.order.len() <= 2);
    }

    #[test]
    fn contact_carries_position() {
        let k = NodeKeypair::from_secret_bytes(&[6; 32]);
        let c =
            Contact::verify(signed_node(&k, 1, UnixTime(0), UnixTime(100)), UnixTime(1)).unwrap();
        assert_eq!(c.id(), k.node_id());
        assert_eq!(c.position(), DhtKey::for_node(&k.node_id()));
        assert!(c.serves_dht());
        assert_eq!(c.endpoints().len(), 1);
        let unsigned = node_record(&k, 1, UnixTime(0), UnixTime(100));
        let bad = Signed {
            body: unsigned,
            sig: vx6_proto::id::Signature([0; 64]),
        };
        assert!(Contact::verify(bad, UnixTime(1)).is_err());
    }
}
