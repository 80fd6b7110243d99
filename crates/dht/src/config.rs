//! Settings for every part of the DHT core, with defaults that work from a
//! handful of nodes up to about 100,000.
//!
//! Owns only numbers and their validation; it must never hold state.

use crate::error::{Error, Result};
use vx6_proto::dhtmsg::{MAX_NODES_PER_RESPONSE, MAX_VALUES_PER_KEY};

/// A token bucket: `burst` requests at once, refilled at `per_minute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_minute: u32,
}

impl RateLimit {
    /// A limit that never refuses (for tests and trusted local sources).
    pub const UNLIMITED: RateLimit = RateLimit {
        burst: u32::MAX,
        per_minute: u32::MAX,
    };
}

/// Every knob of the DHT core.
///
/// Why these defaults: `k = 20` and `alpha = 3` are Kademlia's and give
/// ~log2(N/k) + 1 hops with 20-fold replication, which survives heavy churn
/// at 100,000 nodes; the query bound leaves room for a lookup to step over
/// ~30 % dead contacts. The store bound (65,536 values / 64 MiB) is far above
/// what a holder is responsible for in a 100,000-node network
/// (records × k / N) yet caps a flood. Rate limits allow a node to republish
/// all its records to a holder in one burst while stopping one peer (or one
/// /48) from filling a holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhtConfig {
    /// Bucket size, lookup result size and replication factor.
    pub k: usize,
    /// Queries a lookup keeps in flight.
    pub alpha: usize,
    /// Most queries (answered or failed) one lookup may send.
    pub max_queries: usize,
    /// FIND_VALUE stops once this many nodes returned a valid value; 0 runs
    /// the lookup to completion (all k closest answered), which is what
    /// makes every signer of a clashing name visible.
    pub value_quorum: usize,
    /// Failed RPCs after which a routing-table entry may be replaced and is
    /// no longer handed out.
    pub max_failures: u32,
    /// Size of each bucket's replacement cache.
    pub replacement_cache: usize,
    /// Only nodes whose record advertises the DHT capability enter the table.
    pub require_dht_capability: bool,
    /// Seconds after which an untouched bucket is refreshed by a lookup.
    pub bucket_refresh_secs: u64,
    /// Most values the record store holds.
    pub store_max_values: usize,
    /// Most value bytes the record store holds.
    pub store_max_bytes: usize,
    /// Most distinct signers one name-claim key holds (a clash shows up as
    /// more than one). At most `MAX_VALUES_PER_KEY`.
    pub max_signers_per_name: usize,
    /// STORE rate limit per sending node.
    pub peer_rate: RateLimit,
    /// STORE rate limit per sender address prefix.
    pub prefix_rate: RateLimit,
    /// Most peers / prefixes the rate limiters track at once.
    pub rate_limiter_max_tracked: usize,
    /// Prefix length (bits) that groups IPv4 senders.
    pub prefix_len_v4: u8,
    /// Prefix length (bits) that groups IPv6 senders.
    pub prefix_len_v6: u8,
    /// Owners republish their values at least this often (and at least four
    /// times per lifetime).
    pub republish_secs: u64,
    /// Holders re-replicate held values to the current k closest this often.
    pub replicate_secs: u64,
    /// Verified-signature cache entries (0 disables the cache).
    pub verifier_cache: usize,
}

impl Default for DhtConfig {
    fn default() -> Self {
        Self {
            k: 20,
            alpha: 3,
            max_queries: 100,
            value_quorum: 0,
            max_failures: 3,
            replacement_cache: 8,
            require_dht_capability: true,
            bucket_refresh_secs: 3600,
            store_max_values: 65_536,
            store_max_bytes: 64 << 20,
            max_signers_per_name: MAX_VALUES_PER_KEY,
            peer_rate: RateLimit {
                burst: 64,
                per_minute: 120,
            },
            prefix_rate: RateLimit {
                burst: 256,
                per_minute: 1200,
            },
            rate_limiter_max_tracked: 4096,
            prefix_len_v4: 16,
            prefix_len_v6: 48,
            republish_secs: 3600,
            replicate_secs: 3600,
            verifier_cache: 4096,
        }
    }
}

impl DhtConfig {
    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &'static str| Err(Error::Config(why));
        if self.k == 0 || self.k > MAX_NODES_PER_RESPONSE {
            return bad("k must be between 1 and 20 (the most nodes a response carries)");
        }
        if self.alpha == 0 {
            return bad("alpha must be at least 1");
        }
        if self.max_queries < self.alpha {
            return bad("max_queries must be at least alpha");
        }
        if self.max_failures == 0 {
            return bad("max_failures must be at least 1");
        }
        if self.max_signers_per_name == 0 || self.max_signers_per_name > MAX_VALUES_PER_KEY {
            return bad("max_signers_per_name must be between 1 and 8");
        }
        if self.store_max_values == 0 || self.store_max_bytes == 0 {
            return bad("the record store bounds must be positive");
        }
        if self.prefix_len_v4 > 32 || self.prefix_len_v6 > 128 {
            return bad("prefix length longer than the address");
        }
        if self.rate_limiter_max_tracked == 0 {
            return bad("rate_limiter_max_tracked must be positive");
        }
        if self.republish_secs == 0 || self.replicate_secs == 0 {
            return bad("republish and replicate intervals must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_caught() {
        DhtConfig::default().validate().unwrap();
        for c in [
            DhtConfig {
                k: 0,
                ..Default::default()
            },
            DhtConfig {
                k: 21,
                ..Default::default()
            },
            DhtConfig {
                alpha: 0,
                ..Default::default()
            },
            DhtConfig {
                max_queries: 2,
                ..Default::default()
            },
            DhtConfig {
                max_signers_per_name: 9,
                ..Default::default()
            },
            DhtConfig {
                prefix_len_v6: 129,
                ..Default::default()
            },
        ] {
            assert!(matches!(c.validate(), Err(Error::Config(_))), "{c:?}");
        }
    }
}
