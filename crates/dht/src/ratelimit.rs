//! Token-bucket rate limits per peer and per address prefix.
//!
//! Owns [`AddrPrefix`] (the network a sender's address belongs to, so one
//! operator with many node ids in one /48 shares one budget) and a bounded
//! map of token buckets. Time is passed in; nothing here reads a clock. The
//! number of tracked keys is capped: when full, idle (refilled) buckets go
//! first, then the least recently used.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vx6_proto::UnixTime;

use crate::config::RateLimit;

/// Default IPv4 grouping (bits).
pub const DEFAULT_PREFIX_LEN_V4: u8 = 16;
/// Default IPv6 grouping (bits): one site.
pub const DEFAULT_PREFIX_LEN_V6: u8 = 48;

/// The network prefix of a sender address: the address with all bits past
/// `len` cleared. IPv4-mapped IPv6 addresses count as IPv4.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct AddrPrefix {
    addr: IpAddr,
    len: u8,
}

impl AddrPrefix {
    /// The prefix of `ip`, `v4_len` bits long for IPv4 and `v6_len` for IPv6
    /// (clamped to the address length).
    pub fn new(ip: IpAddr, v4_len: u8, v6_len: u8) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => {
                let len = v4_len.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                Self {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)),
                    len,
                }
            }
            IpAddr::V6(v6) => {
                let len = v6_len.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                Self {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    len,
                }
            }
        }
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn len(&self) -> u8 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for AddrPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The default prefix of `ip`: its /16 (IPv4) or /48 (IPv6).
pub fn addr_prefix(ip: IpAddr) -> AddrPrefix {
    AddrPrefix::new(ip, DEFAULT_PREFIX_LEN_V4, DEFAULT_PREFIX_LEN_V6)
}

const MILLI: u64 = 1000;

#[derive(Clone, Copy, Debug)]
struct TokenBucket {
    milli_tokens: u64,
    last: UnixTime,
}

/// Token buckets keyed by `K`, at most `max_tracked` of them.
#[derive(Clone, Debug)]
pub struct RateLimiter<K> {
    limit: RateLimit,
    max_tracked: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub fn new(limit: RateLimit, max_tracked: usize) -> Self {
        Self {
            limit,
            max_tracked: max_tracked.max(1),
            buckets: HashMap::new(),
        }
    }

    fn capacity(&self) -> u64 {
        u64::from(self.limit.burst) * MILLI
    }

    fn refilled(&self, b: &TokenBucket, now: UnixTime) -> u64 {
        let elapsed = now.0.saturating_sub(b.last.0);
        let add = elapsed
            .saturating_mul(u64::from(self.limit.per_minute))
            .saturating_mul(MILLI)
            / 60;
        b.milli_tokens.saturating_add(add).min(self.capacity())
    }

    /// Takes one token for `key` at `now`; false when over the limit.
    pub fn allow(&mut self, key: &K, now: UnixTime) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_tracked {
            self.make_room(now);
        }
        let (current, last) = match self.buckets.get(key) {
            Some(b) => (self.refilled(b, now), b.last.max(now)),
            None => (self.capacity(), now),
        };
        let (tokens, ok) = if current >= MILLI {
            (current - MILLI, true)
        } else {
            (current, false)
        };
        self.buckets.insert(
            key.clone(),
            TokenBucket {
                milli_tokens: tokens,
                last,
            },
        );
        ok
    }

    fn make_room(&mut self, now: UnixTime) {
        let cap = self.capacity();
        let idle: Vec<K> = self
            .buckets
            .iter()
            .filter(|(_, b)| self.refilled(b, now) >= cap)
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            self.buckets.remove(&k);
        }
        if self.buckets.len() >= self.max_tracked
            && let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone())
        {
            self.buckets.remove(&oldest);
        }
    }

    /// Keys currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_group_sites() {
        let a = addr_prefix("2001:db8:1:2::1".parse().unwrap());
        let b = addr_prefix("2001:db8:1:ffff::9".parse().unwrap());
        let c = addr_prefix("2001:db8:2::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1::/48");
        let v4 = addr_prefix("192.0.2.7".parse().unwrap());
        assert_eq!(v4.to_string(), "192.0.0.0/16");
        assert_eq!(addr_prefix("::ffff:192.0.200.1".parse().unwrap()), v4);
        let all = AddrPrefix::new("2001:db8::1".parse().unwrap(), 0, 0);
        assert!(all.is_empty());
        assert_eq!(
            AddrPrefix::new("192.0.2.7".parse().unwrap(), 40, 200).len(),
            32
        );
    }

    #[test]
    fn token_bucket_bursts_then_refills() {
        let mut l = RateLimiter::new(
            RateLimit {
                burst: 3,
                per_minute: 60,
            },
            10,
        );
        let t = UnixTime(100);
        assert!(l.allow(&1, t) && l.allow(&1, t) && l.allow(&1, t));
        assert!(!l.allow(&1, t));
        assert!(l.allow(&2, t), "keys are independent");
        assert!(l.allow(&1, UnixTime(101)), "one token per second");
        assert!(!l.allow(&1, UnixTime(101)));
        assert!(
            l.allow(&1, UnixTime(1000))
                && l.allow(&1, UnixTime(1000))
                && l.allow(&1, UnixTime(1000))
        );
        assert!(!l.allow(&1, UnixTime(1000)), "refill capped at burst");
    }

    #[test]
    fn tracking_is_bounded() {
        let mut l = RateLimiter::new(
            RateLimit {
                burst: 1,
                per_minute: 1,
            },
            4,
        );
        for k in 0..100 {
            l.allow(&k, UnixTime(5));
            assert!(l.tracked() <= 4);
        }
        let mut u = RateLimiter::new(RateLimit::UNLIMITED, 4);
        assert!((0..10_000).all(|_| u.allow(&0, UnixTime(1))));
    }
}
