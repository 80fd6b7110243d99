//! Republish planning for values this node owns.
//!
//! Owns the schedule: which of the node's own signed records must be stored
//! again on the k closest nodes, and when. A value is due when published,
//! then every `min(republish_secs, lifetime / 4)` (but not more often than
//! once a minute) until it expires; the owner re-signs it with a higher seq
//! before that ([`Republisher::expiring`] says which). It never sends
//! anything: the driver runs a FIND_NODE for the key and STOREs the value on
//! the result. Holder-side replication of other nodes' values is scheduled by
//! [`crate::store::RecordStore::replication_due`].

use std::collections::BTreeMap;

use vx6_proto::UnixTime;
use vx6_proto::dhtmsg::{DhtKey, RecordFamily};

/// Shortest republish period.
pub const MIN_REPUBLISH_SECS: u64 = 60;

/// A value to STORE on the k closest nodes to its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepublishItem {
    pub key: DhtKey,
    pub family: RecordFamily,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug)]
struct Owned {
    family: RecordFamily,
    value: Vec<u8>,
    expires: UnixTime,
    period: u64,
    next: UnixTime,
}

/// The owner's schedule of values to keep alive in the DHT.
#[derive(Clone, Debug)]
pub struct Republisher {
    max_period: u64,
    items: BTreeMap<DhtKey, Owned>,
}

impl Republisher {
    /// Republishes at least every `republish_secs`.
    pub fn new(republish_secs: u64) -> Self {
        Self {
            max_period: republish_secs.max(MIN_REPUBLISH_SECS),
            items: BTreeMap::new(),
        }
    }

    /// Starts (or replaces) keeping `value` alive under `key`; it is due at
    /// once. `expires` is the record's expiry.
    pub fn insert(
        &mut self,
        key: DhtKey,
        family: RecordFamily,
        value: Vec<u8>,
        expires: UnixTime,
        now: UnixTime,
    ) {
        let lifetime = expires.0.saturating_sub(now.0);
        let period = (lifetime / 4).clamp(MIN_REPUBLISH_SECS, self.max_period);
        self.items.insert(
            key,
            Owned {
                family,
                value,
                expires,
                period,
                next: now,
            },
        );
    }

    /// Stops republishing `key`.
    pub fn remove(&mut self, key: &DhtKey) -> bool {
        self.items.remove(key).is_some()
    }

    /// Values due at `now`; each is then scheduled one period later.
    /// Expired values are dropped.
    pub fn due(&mut self, now: UnixTime) -> Vec<RepublishItem> {
        self.items.retain(|_, o| o.expires > now);
        let mut out = Vec::new();
        for (key, o) in self.items.iter_mut() {
            if o.next <= now {
                o.next = now.plus(o.period);
                out.push(RepublishItem {
                    key: *key,
                    family: o.family,
                    value: o.value.clone(),
                });
            }
        }
        out
    }

    /// When [`Republisher::due`] next has something (for the driver's timer).
    pub fn next_due(&self) -> Option<UnixTime> {
        self.items.values().map(|o| o.next.min(o.expires)).min()
    }

    /// Keys whose value expires within `within` seconds: the owner should
    /// sign a fresh record (higher seq) and [`Republisher::insert`] it.
    pub fn expiring(&self, now: UnixTime, within: u64) -> Vec<DhtKey> {
        self.items
            .iter()
            .filter(|(_, o)| o.expires <= now.plus(within))
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_before_expiry_and_bounded_by_interval() {
        let mut r = Republisher::new(3600);
        let k1 = DhtKey([1; 32]);
        let k2 = DhtKey([2; 32]);
        // long-lived: hourly
        r.insert(
            k1,
            RecordFamily::NodeRecord,
            vec![1],
            UnixTime(7 * 86_400),
            UnixTime(0),
        );
        // short-lived (1000 s): every 250 s
        r.insert(
            k2,
            RecordFamily::NameClaim,
            vec![2],
            UnixTime(1000),
            UnixTime(0),
        );
        assert_eq!(r.due(UnixTime(0)).len(), 2);
        assert!(r.due(UnixTime(1)).is_empty());
        assert_eq!(r.next_due(), Some(UnixTime(250)));
        assert_eq!(
            r.due(UnixTime(250))
                .iter()
                .map(|i| i.key)
                .collect::<Vec<_>>(),
            vec![k2]
        );
        assert_eq!(r.expiring(UnixTime(900), 200), vec![k2]);
        // k2 expired at 1000 and is dropped; k1 is due hourly
        assert_eq!(
            r.due(UnixTime(3600))
                .iter()
                .map(|i| i.key)
                .collect::<Vec<_>>(),
            vec![k1]
        );
        assert_eq!(r.len(), 1);
        // a replacement is due at once
        r.insert(
            k1,
            RecordFamily::NodeRecord,
            vec![9],
            UnixTime(7 * 86_400),
            UnixTime(4001),
        );
        assert_eq!(
            r.due(UnixTime(4001)),
            vec![RepublishItem {
                key: k1,
                family: RecordFamily::NodeRecord,
                value: vec![9]
            }]
        );
        assert!(r.remove(&k1) && r.is_empty());
    }
}
