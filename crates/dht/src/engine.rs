//! [`DhtCore`]: one node's DHT state behind the calls a network driver makes.
//!
//! Owns the routing table, the record store, the owner's republish schedule
//! and the signature cache of one node, and answers requests. It is the only
//! type a driver needs: decode a request, call [`DhtCore::handle_request`]
//! with the peer id the transport authenticated and its address, send back
//! the response; run lookups with [`DhtCore::start_lookup`] and feed their
//! answers through [`DhtCore::handle_lookup_response`] /
//! [`DhtCore::handle_lookup_failure`], which also keep the routing table
//! current. Like everything in this crate it never does I/O, never reads a
//! clock and never draws randomness itself.

use std::net::IpAddr;

use vx6_proto::dhtmsg::{
    DhtKey, ErrorCode, MAX_NODES_PER_RESPONSE, RecordFamily, RejectReason, Request, Response,
    StoreOutcome,
};
use vx6_proto::record::{NodeRecord, Signed};
use vx6_proto::{NodeId, UnixTime};

use crate::config::DhtConfig;
use crate::contact::{Contact, RecordVerifier};
use crate::error::{Error, Result};
use crate::lookup::{Lookup, LookupKind, ResponseHandling};
use crate::ratelimit::AddrPrefix;
use crate::republish::{RepublishItem, Republisher};
use crate::store::{Admitted, RecordStore};
use crate::table::{Observed, RoutingTable};
use crate::value::{check_value, key_of_value};

/// Most held values handed out for re-replication per [`DhtCore::poll_republish`].
pub const MAX_REPLICATIONS_PER_POLL: usize = 256;

/// Requests answered, by type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub pings: u64,
    pub find_nodes: u64,
    pub find_values: u64,
    pub stores: u64,
    /// Requests that did not decode.
    pub malformed: u64,
}

/// The DHT state of one node.
#[derive(Debug)]
pub struct DhtCore {
    local: NodeId,
    cfg: DhtConfig,
    table: RoutingTable,
    store: RecordStore,
    verifier: RecordVerifier,
    republisher: Republisher,
    stats: CoreStats,
}

impl DhtCore {
    pub fn new(local: NodeId, cfg: DhtConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            local,
            table: RoutingTable::new(local, &cfg),
            store: RecordStore::new(local, &cfg),
            verifier: RecordVerifier::new(cfg.verifier_cache),
            republisher: Republisher::new(cfg.republish_secs),
            stats: CoreStats::default(),
            cfg,
        })
    }

    pub fn local_id(&self) -> NodeId {
        self.local
    }
    pub fn config(&self) -> &DhtConfig {
        &self.cfg
    }
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }
    pub fn table_mut(&mut self) -> &mut RoutingTable {
        &mut self.table
    }
    pub fn store(&self) -> &RecordStore {
        &self.store
    }
    pub fn store_mut(&mut self) -> &mut RecordStore {
        &mut self.store
    }
    pub fn verifier_mut(&mut self) -> &mut RecordVerifier {
        &mut self.verifier
    }
    pub fn republisher(&self) -> &Republisher {
        &self.republisher
    }
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// The address prefix rate limits group `addr` under.
    pub fn prefix_of(&self, addr: IpAddr) -> AddrPrefix {
        AddrPrefix::new(addr, self.cfg.prefix_len_v4, self.cfg.prefix_len_v6)
    }

    /// Answers `req` from peer `from` (the id the transport authenticated)
    /// connecting from `from_addr`.
    ///
    /// It does not add `from` to the routing table: a request carries no
    /// record. A driver that holds the peer's verified record (link
    /// handshake, peer sync) calls [`DhtCore::observe_authenticated`].
    pub fn handle_request(
        &mut self,
        from: NodeId,
        from_addr: IpAddr,
        req: Request,
        now: UnixTime,
    ) -> Response {
        match req {
            Request::Ping => {
                self.stats.pings += 1;
                Response::Pong
            }
            Request::FindNode { target } => {
                self.stats.find_nodes += 1;
                Response::Nodes(self.closest_records(&target, &from))
            }
            Request::FindValue { key } => {
                self.stats.find_values += 1;
                Response::Value {
                    values: self.store.get(&key, now),
                    closer: self.closest_records(&key, &from),
                }
            }
            Request::Store { key, family, value } => {
                self.stats.stores += 1;
                let prefix = self.prefix_of(from_addr);
                match self.store.store(key, family, value, from, prefix, now) {
                    Ok(_) => Response::StoreResult(StoreOutcome::Accepted),
                    Err(r) => Response::StoreResult(StoreOutcome::Rejected(r)),
                }
            }
        }
    }

    /// [`DhtCore::handle_request`] on encoded bytes: a request that does not
    /// decode gets an ERROR response.
    pub fn handle_request_bytes(
        &mut self,
        from: NodeId,
        from_addr: IpAddr,
        bytes: &[u8],
        now: UnixTime,
    ) -> Vec<u8> {
        let resp = match Request::decode(bytes) {
            Ok(req) => self.handle_request(from, from_addr, req, now),
            Err(vx6_proto::Error::UnknownTag {
                what: "dht message version" | "dht request type",
                ..
            }) => {
                self.stats.malformed += 1;
                Response::Error(ErrorCode::Unsupported)
            }
            Err(_) => {
                self.stats.malformed += 1;
                Response::Error(ErrorCode::Malformed)
            }
        };
        resp.encode()
            .or_else(|_| Response::Error(ErrorCode::Internal).encode())
            .unwrap_or_default()
    }

    fn closest_records(&self, key: &DhtKey, exclude: &NodeId) -> Vec<Signed<NodeRecord>> {
        let n = self.cfg.k.min(MAX_NODES_PER_RESPONSE);
        self.table
            .closest(key, n + 1)
            .into_iter()
            .filter(|c| c.id() != *exclude)
            .take(n)
            .map(|c| c.record().clone())
            .collect()
    }

    /// `id` proved its key in an RPC that just succeeded over the
    /// authenticated transport; `record` is its latest signed record.
    pub fn observe_authenticated(
        &mut self,
        id: NodeId,
        record: Signed<NodeRecord>,
        now: UnixTime,
    ) -> Result<Observed> {
        if record.body.node != id {
            return Err(Error::IdMismatch);
        }
        let contact = self.verifier.contact(record, now)?;
        Ok(self.table.observe_authenticated(id, contact, now))
    }

    /// An RPC to `id` failed. Returns the node evicted from the table, if any.
    pub fn record_failure(&mut self, id: &NodeId) -> Option<NodeId> {
        self.table.record_failure(id)
    }

    /// A lookup for `target` seeded from the routing table.
    pub fn start_lookup(&mut self, target: DhtKey, kind: LookupKind, now: UnixTime) -> Lookup {
        self.table.touch(&target, now);
        let seeds = self.table.closest(&target, self.cfg.k);
        Lookup::new(self.local, target, kind, seeds, &self.cfg)
    }

    /// A lookup seeded with explicit contacts (entering the network through
    /// a known peer).
    pub fn start_lookup_from(
        &self,
        target: DhtKey,
        kind: LookupKind,
        seeds: Vec<Contact>,
    ) -> Lookup {
        Lookup::new(self.local, target, kind, seeds, &self.cfg)
    }

    /// Feeds an answer to `lookup`; an accepted responder enters (or
    /// refreshes) the routing table.
    pub fn handle_lookup_response(
        &mut self,
        lookup: &mut Lookup,
        from: NodeId,
        response: Response,
        now: UnixTime,
    ) -> ResponseHandling {
        let h = lookup.on_response(from, response, now, &mut self.verifier);
        match &h {
            ResponseHandling::Accepted(c) => {
                self.table.observe_authenticated(from, c.clone(), now);
            }
            ResponseHandling::Unexpected => {
                self.table.record_failure(&from);
            }
            _ => {}
        }
        h
    }

    /// Reports a failed query of `lookup` (timeout, unreachable).
    pub fn handle_lookup_failure(&mut self, lookup: &mut Lookup, from: &NodeId) -> bool {
        self.table.record_failure(from);
        lookup.on_failure(from)
    }

    /// Starts keeping one of this node's own signed records alive in the
    /// DHT: it is validated, held locally (so this node serves it too) and
    /// scheduled for republishing. Returns its key.
    pub fn publish(
        &mut self,
        family: RecordFamily,
        value: Vec<u8>,
        now: UnixTime,
    ) -> Result<DhtKey, RejectReason> {
        let key = key_of_value(family, &value)?;
        let meta = check_value(&key, family, &value, now, Some(&mut self.verifier))?;
        match self.store.insert_local(key, family, value.clone(), now) {
            Ok(Admitted::Stored | Admitted::Replaced { .. } | Admitted::Unchanged)
            | Err(RejectReason::StoreFull) => {}
            Err(r) => return Err(r),
        }
        self.republisher
            .insert(key, family, value, meta.expires, now);
        Ok(key)
    }

    /// Values to STORE on the k closest nodes of their key now: this node's
    /// own values that are due, then held values due for re-replication.
    pub fn poll_republish(&mut self, now: UnixTime) -> Vec<RepublishItem> {
        let mut out = self.republisher.due(now);
        let owned: Vec<DhtKey> = out.iter().map(|i| i.key).collect();
        out.extend(
            self.store
                .replication_due(now, MAX_REPLICATIONS_PER_POLL)
                .into_iter()
                .filter(|i| !owned.contains(&i.key)),
        );
        out
    }

    /// Targets of bucket-refresh lookups due now (`seed`: fresh randomness).
    pub fn poll_refresh(&mut self, now: UnixTime, seed: [u8; 32]) -> Vec<DhtKey> {
        self.table
            .refresh_targets(now, self.cfg.bucket_refresh_secs, seed)
    }

    /// Drops expired values and routing-table entries whose record expired.
    pub fn expire(&mut self, now: UnixTime) {
        self.store.expire(now);
        self.table.remove_expired(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use crate::lookup::Action;
    use crate::testutil::*;

    const NOW: UnixTime = UnixTime(10_000);

    fn core(seed: u32) -> DhtCore {
        DhtCore::new(keypair(seed).node_id(), DhtConfig::default()).unwrap()
    }
    fn addr() -> IpAddr {
        "2001:db8:9::1".parse().unwrap()
    }

    #[test]
    fn answers_every_request_type() {
        let mut c = core(0);
        for i in 1..30 {
            let ct = contact(i);
            c.observe_authenticated(ct.id(), ct.record().clone(), NOW)
                .unwrap();
        }
        let asker = contact(5).id();
        assert_eq!(
            c.handle_request(asker, addr(), Request::Ping, NOW),
            Response::Pong
        );
        let Response::Nodes(n) = c.handle_request(
            asker,
            addr(),
            Request::FindNode {
                target: DhtKey([1; 32]),
            },
            NOW,
        ) else {
            panic!()
        };
        assert_eq!(n.len(), 20);
        assert!(
            n.iter().all(|r| r.body.node != asker),
            "the asker is not told about itself"
        );
        let claim =
            name_claim(&keypair(40), "alice", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let key = DhtKey::for_name(&name("alice"));
        let store = Request::Store {
            key,
            family: RecordFamily::NameClaim,
            value: claim.clone(),
        };
        assert_eq!(
            c.handle_request(asker, addr(), store, NOW),
            Response::StoreResult(StoreOutcome::Accepted)
        );
        let Response::Value { values, closer } =
            c.handle_request(asker, addr(), Request::FindValue { key }, NOW)
        else {
            panic!()
        };
        assert_eq!(values, vec![claim.clone()]);
        assert_eq!(closer.len(), 20);
        let stale =
            name_claim(&keypair(40), "alice", 0, UnixTime(9_000), UnixTime(20_000)).encode();
        assert_eq!(
            c.handle_request(
                asker,
                addr(),
                Request::Store {
                    key,
                    family: RecordFamily::NameClaim,
                    value: stale
                },
                NOW
            ),
            Response::StoreResult(StoreOutcome::Rejected(RejectReason::Stale))
        );
        assert_eq!(c.stats().stores, 2);
        assert_eq!(c.store().stats().rejected(RejectReason::Stale), 1);
    }

    #[test]
    fn bytes_interface_answers_garbage_with_errors() {
        let mut c = core(0);
        let from = contact(1).id();
        let r = c.handle_request_bytes(from, addr(), &Request::Ping.encode().unwrap(), NOW);
        assert_eq!(Response::decode(&r).unwrap(), Response::Pong);
        let r = c.handle_request_bytes(from, addr(), &[1, 0x7f], NOW);
        assert_eq!(
            Response::decode(&r).unwrap(),
            Response::Error(ErrorCode::Unsupported)
        );
        let r = c.handle_request_bytes(from, addr(), &[1, 0x02, 0], NOW);
        assert_eq!(
            Response::decode(&r).unwrap(),
            Response::Error(ErrorCode::Malformed)
        );
        assert_eq!(c.stats().malformed, 2);
    }

    #[test]
    fn observe_checks_identity_and_signature() {
        let mut c = core(0);
        let ct = contact(1);
        assert_eq!(
            c.observe_authenticated(contact(2).id(), ct.record().clone(), NOW),
            Err(Error::IdMismatch)
        );
        let mut forged = ct.record().clone();
        forged.body.seq += 1;
        assert!(matches!(
            c.observe_authenticated(ct.id(), forged, NOW),
            Err(Error::Peer(_))
        ));
        assert_eq!(
            c.observe_authenticated(ct.id(), ct.record().clone(), NOW),
            Ok(Observed::Inserted)
        );
    }

    #[test]
    fn store_rate_limit_uses_the_configured_prefix() {
        let cfg = DhtConfig {
            prefix_rate: RateLimit {
                burst: 1,
                per_minute: 1,
            },
            ..Default::default()
        };
        let mut c = DhtCore::new(keypair(0).node_id(), cfg).unwrap();
        let claim =
            name_claim(&keypair(40), "alice", 1, UnixTime(9_000), UnixTime(20_000)).encode();
        let key = DhtKey::for_name(&name("alice"));
        let req = || Request::Store {
            key,
            family: RecordFamily::NameClaim,
            value: claim.clone(),
        };
        let a: IpAddr = "2001:db8:5:1::1".parse().unwrap();
        let b: IpAddr = "2001:db8:5:2::1".parse().unwrap();
        assert_eq!(
            c.handle_request(contact(1).id(), a, req(), NOW),
            Response::StoreResult(StoreOutcome::Accepted)
        );
        assert_eq!(
            c.handle_request(contact(2).id(), b, req(), NOW),
            Response::StoreResult(StoreOutcome::Rejected(RejectReason::RateLimited))
        );
    }

    #[test]
    fn publish_holds_locally_and_schedules_republish() {
        let mut c = core(0);
        let me = keypair(0);
        let rec = signed_node(&me, 1, UnixTime(9_000), UnixTime(9_000 + 86_400)).encode();
        let key = c
            .publish(RecordFamily::NodeRecord, rec.clone(), NOW)
            .unwrap();
        assert_eq!(key, DhtKey::for_node(&me.node_id()));
        assert_eq!(c.store().get(&key, NOW), vec![rec.clone()]);
        let due = c.poll_republish(NOW);
        assert_eq!(due.len(), 1);
        assert!(c.poll_republish(NOW.plus(10)).is_empty());
        assert_eq!(
            c.poll_republish(NOW.plus(3600)).len(),
            1,
            "owned value due, held copy not duplicated"
        );
        assert_eq!(
            c.publish(RecordFamily::HiddenDescriptor, rec, NOW),
            Err(RejectReason::UnsupportedFamily)
        );
    }

    /// Two cores wired together in memory: a lookup by `a` through `b`.
    #[test]
    fn lookup_through_a_peer_fills_both_tables() {
        let mut a = core(1);
        let mut b = core(2);
        let (ca, cb) = (contact(1), contact(2));
        for i in 10..40 {
            let ct = contact(i);
            b.observe_authenticated(ct.id(), ct.record().clone(), NOW)
                .unwrap();
        }
        let mut l = a.start_lookup_from(ca.position(), LookupKind::FindNode, vec![cb.clone()]);
        let mut finished = None;
        while finished.is_none() {
            for act in l.poll() {
                match act {
                    Action::Send { to, request, .. } if to == cb.id() => {
                        let resp = b.handle_request(ca.id(), addr(), request, NOW);
                        b.observe_authenticated(ca.id(), ca.record().clone(), NOW)
                            .unwrap();
                        a.handle_lookup_response(&mut l, to, resp, NOW);
                    }
                    Action::Send { to, .. } => {
                        // everyone else is gone
                        a.handle_lookup_failure(&mut l, &to);
                    }
                    Action::Done(r) => finished = Some(r),
                }
            }
        }
        let r = finished.unwrap();
        assert_eq!(
            r.closest.iter().map(Contact::id).collect::<Vec<_>>(),
            vec![cb.id()]
        );
        assert!(
            a.table().get(&cb.id()).is_some(),
            "the responder entered a's table"
        );
        assert!(b.table().get(&ca.id()).is_some());
        // candidates that never answered are not in the table
        assert_eq!(a.table().len(), 1);
    }
}
