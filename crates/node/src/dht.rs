//! The DHT driver: runs the sans-IO [`vx6_dht::DhtCore`] over channels.
//!
//! Owns the node's DHT state, answering DHT streams, running iterative
//! lookups (each query is one request/response stream to a node dialed with
//! its expected id, under a timeout), publishing and republishing this
//! node's records, replicating held values, bucket refresh, and persisting
//! the record store to the database so a restarted holder still serves what
//! it held. The core is behind a mutex that is never held across an await.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use vx6_dht::DhtCore;
use vx6_dht::config::DhtConfig;
use vx6_dht::lookup::{Action, Lookup, LookupKind, LookupResult};
use vx6_proto::dhtmsg::{DhtKey, RecordFamily, RejectReason, Request, Response, StoreOutcome};
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::nodemsg::Purpose;
use vx6_proto::record::{NameClaim, NodeRecord, RecordBody, ServiceRecord, Signed, Visibility};
use vx6_proto::{NodeId, identity};

use crate::config::Config;
use crate::db::Db;
use crate::error::Result;
use crate::node::{Node, now};

/// One DHT query's budget, dial included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest DHT response accepted.
const MAX_RESPONSE: usize = vx6_proto::dhtmsg::MAX_DHT_MESSAGE_LEN;
/// How often the maintenance loop runs.
const TICK: Duration = Duration::from_secs(1);
/// How often the record store is written to the database.
const PERSIST_EVERY: u64 = 30;

pub struct DhtState {
    core: Mutex<DhtCore>,
    /// The store changed since it was last written to the database.
    dirty: std::sync::atomic::AtomicBool,
}

impl DhtState {
    pub(crate) fn new(id: NodeId, cfg: &Config, db: &Db) -> Result<Self> {
        let dcfg = DhtConfig {
            k: cfg.dht.k,
            alpha: cfg.dht.alpha,
            ..DhtConfig::default()
        };
        let mut core = DhtCore::new(id, dcfg)
            .map_err(|e| crate::NodeError::Invalid(format!("config.toml [dht]: {e}")))?;
        let items: Vec<(DhtKey, RecordFamily, Vec<u8>)> = db
            .dht_values()?
            .into_iter()
            .filter_map(|(k, f, v)| RecordFamily::from_code(f).ok().map(|f| (DhtKey(k), f, v)))
            .collect();
        let report = core.store_mut().restore(items, now());
        tracing::debug!(?report, "restored DHT store");
        Ok(Self {
            core: Mutex::new(core),
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut DhtCore) -> T) -> T {
        let mut g = self.core.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

/// A peer proved `rec.body.node` over an authenticated channel and sent its
/// record: it may enter the routing table.
pub(crate) fn observe(node: &Node, rec: &Signed<NodeRecord>) {
    let r = node
        .inner()
        .dht
        .with(|c| c.observe_authenticated(rec.body.node, rec.clone(), now()));
    if let Err(e) = r {
        tracing::debug!(error = %e, "record not admitted to the routing table");
    }
}

/// Answers one DHT request from the channel's (authenticated) peer.
pub(crate) fn handle_request(
    node: &Node,
    chan: &vx6_net::channel::Channel,
    body: &[u8],
) -> Result<Vec<u8>> {
    let dht = &node.inner().dht;
    let (answer, stored) = dht.with(|c| {
        let before = (c.store().stats().stored, c.store().stats().replaced);
        let a = c.handle_request_bytes(chan.peer(), chan.remote().ip(), body, now());
        let after = (c.store().stats().stored, c.store().stats().replaced);
        (a, after != before)
    });
    if stored {
        // Durable before the STORE is answered: a holder killed right after
        // saying "accepted" still serves the value when it comes back.
        if let Ok(Request::Store { key, family, value }) = Request::decode(body)
            && let Err(e) = node.inner().db.put_dht_value(&key.0, family.code(), &value)
        {
            tracing::warn!(error = %e, "cannot persist a stored DHT value");
        }
        dht.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(answer)
}

/// Sends one DHT request to `to`, dialing it with its expected id.
async fn query(
    node: &Node,
    to: NodeId,
    endpoints: &[vx6_proto::record::Endpoint],
    req: &Request,
) -> Option<Response> {
    let body = req.encode().ok()?;
    let endpoints = crate::discovery::usable_endpoints(node, &to, endpoints, None);
    let fut = async {
        let chan = node.pool().connect(to, &endpoints).await.ok()?;
        let r = chan
            .request(
                Bytes::from(Purpose::Dht.encode()),
                Bytes::from(body),
                MAX_RESPONSE,
                QUERY_TIMEOUT,
            )
            .await;
        if let Err(vx6_net::NetError::Timeout(_)) = r {
            // A peer that cannot answer a small request in time sits behind a
            // dead channel (e.g. one side's address vanished): drop it so the
            // next query redials instead of waiting for the idle timeout.
            chan.close();
        }
        Response::decode(&r.ok()?).ok()
    };
    tokio::time::timeout(QUERY_TIMEOUT + Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// Drives `lookup` to completion, `alpha` queries at a time.
async fn run_lookup(node: &Node, mut lookup: Lookup) -> Option<LookupResult> {
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        for action in lookup.poll() {
            match action {
                Action::Done(result) => return Some(result),
                Action::Send {
                    to,
                    contact,
                    request,
                } => {
                    let n = node.clone();
                    let eps = contact.endpoints().to_vec();
                    inflight.spawn(async move { (to, query(&n, to, &eps, &request).await) });
                }
            }
        }
        let Some(done) = inflight.join_next().await else {
            // Nothing in flight and nothing to send: the core says Done next poll.
            if lookup.is_done() {
                return None;
            }
            continue;
        };
        let Ok((from, resp)) = done else { continue };
        let dht = &node.inner().dht;
        match resp {
            Some(r) => {
                // Signed records met in answers also feed the registry (each
                // is verified there), which is where relay paths and names
                // are looked for first.
                let recs: Vec<Vec<u8>> = match &r {
                    Response::Nodes(v) => v.iter().map(Signed::encode).collect(),
                    Response::Value { closer, .. } => closer.iter().map(Signed::encode).collect(),
                    _ => Vec::new(),
                };
                crate::discovery::admit_node_records(node, &recs);
                dht.with(|c| c.handle_lookup_response(&mut lookup, from, r, now()));
            }
            None => {
                dht.with(|c| c.handle_lookup_failure(&mut lookup, &from));
            }
        }
    }
}

/// Looks `key` up and returns the verified values found (several signers
/// possible for a name claim).
async fn find_values(node: &Node, key: DhtKey, family: RecordFamily) -> Vec<Vec<u8>> {
    let lookup = node
        .inner()
        .dht
        .with(|c| c.start_lookup(key, LookupKind::FindValue(family), now()));
    let local: Vec<Vec<u8>> = node.inner().dht.with(|c| c.store().get(&key, now()));
    let mut out = local;
    if let Some(res) = run_lookup(node, lookup).await {
        for v in res.values {
            if !out.contains(&v.value) {
                out.push(v.value);
            }
        }
    }
    out
}

/// The freshest NodeRecord of `id` from the DHT (verified and stored in the
/// registry).
pub(crate) async fn lookup_node(node: &Node, id: &NodeId) -> Option<Signed<NodeRecord>> {
    let mut best: Option<Signed<NodeRecord>> = None;
    for v in find_values(node, DhtKey::for_node(id), RecordFamily::NodeRecord).await {
        let Ok(r) = Signed::<NodeRecord>::decode_verified(&v, now()) else {
            continue;
        };
        if r.body.node == *id && best.as_ref().is_none_or(|b| r.body.seq > b.body.seq) {
            let _ = crate::discovery::admit_node_record(node, &v);
            best = Some(r);
        }
    }
    best
}

/// NodeRecords of every node that claims `name` in the DHT.
pub(crate) async fn lookup_name(node: &Node, name: &NodeName) -> Vec<Signed<NodeRecord>> {
    let mut out = Vec::new();
    let mut ids: Vec<NodeId> = Vec::new();
    for v in find_values(node, DhtKey::for_name(name), RecordFamily::NameClaim).await {
        let Ok(c) = Signed::<NameClaim>::decode_verified(&v, now()) else {
            continue;
        };
        if c.body.name == *name && !ids.contains(&c.body.node) {
            ids.push(c.body.node);
        }
    }
    for id in ids.into_iter().take(vx6_proto::dhtmsg::MAX_VALUES_PER_KEY) {
        if let Some(r) = lookup_node(node, &id).await {
            out.push(r);
        }
    }
    out
}

/// Stores `value` on the k closest nodes of `key`; returns how many accepted.
async fn replicate(node: &Node, key: DhtKey, family: RecordFamily, value: Vec<u8>) -> usize {
    let lookup = node
        .inner()
        .dht
        .with(|c| c.start_lookup(key, LookupKind::FindNode, now()));
    let Some(res) = run_lookup(node, lookup).await else {
        return 0;
    };
    let req = Request::Store { key, family, value };
    let mut set = tokio::task::JoinSet::new();
    for c in res.closest {
        let n = node.clone();
        let req = req.clone();
        set.spawn(async move { query(&n, c.id(), c.endpoints(), &req).await });
    }
    let mut accepted = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some(Response::StoreResult(StoreOutcome::Accepted))) => accepted += 1,
            Ok(Some(Response::StoreResult(StoreOutcome::Rejected(RejectReason::Stale)))) => {}
            Ok(other) => tracing::debug!(?other, "store not accepted"),
            Err(_) => {}
        }
    }
    accepted
}

/// Publishes this node's current NodeRecord and NameClaim to the DHT.
pub(crate) async fn publish_own(node: &Node) {
    let inner = node.inner();
    let (Some(rec), Some(claim)) = (inner.own_record(), inner.own_claim()) else {
        return;
    };
    let items = [
        (RecordFamily::NodeRecord, rec.encode()),
        (RecordFamily::NameClaim, claim.encode()),
    ];
    for (family, value) in items {
        match inner.dht.with(|c| c.publish(family, value.clone(), now())) {
            Ok(key) => {
                inner
                    .dht
                    .dirty
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let n = replicate(node, key, family, value).await;
                tracing::debug!(?family, replicas = n, "published");
            }
            Err(r) => {
                tracing::warn!(?family, reason = ?r, "own record refused by the local DHT store")
            }
        }
    }
}

/// Lifetime of published ServiceRecords; a removed service disappears
/// from the DHT at most this long after removal.
const SERVICE_RECORD_LIFETIME: u64 = 3600;

/// Publishes a signed ServiceRecord for each public service. Private
/// services are never published: only the catalog RPC reveals them, and only
/// to allowed clients.
pub(crate) async fn publish_services(node: &Node) {
    let inner = node.inner();
    for svc in node.services().into_iter().filter(|s| !s.private) {
        let t = now();
        let Ok(seq) = inner.db.next_seq("service-record", t.0) else {
            continue;
        };
        let body = ServiceRecord {
            node: inner.id,
            service: svc.name.clone(),
            visibility: Visibility::Public,
            seq,
            issued: t,
            expires: t.plus(SERVICE_RECORD_LIFETIME),
        };
        let Ok(rec) = body.sign(&inner.key) else {
            continue;
        };
        let value = rec.encode();
        if let Ok(key) = inner
            .dht
            .with(|c| c.publish(RecordFamily::ServiceRecord, value.clone(), t))
        {
            inner
                .dht
                .dirty
                .store(true, std::sync::atomic::Ordering::Relaxed);
            replicate(node, key, RecordFamily::ServiceRecord, value).await;
        }
    }
}

/// Whether `owner` publishes a valid public ServiceRecord for `service`.
pub(crate) async fn service_published(node: &Node, owner: &NodeId, service: &ServiceName) -> bool {
    find_values(
        node,
        DhtKey::for_service(owner, service),
        RecordFamily::ServiceRecord,
    )
    .await
    .iter()
    .filter_map(|v| Signed::<ServiceRecord>::decode_verified(v, now()).ok())
    .any(|r| r.body.node == *owner && r.body.service == *service)
}

/// Maintenance: republish, replicate, refresh buckets, expire, persist.
pub(crate) fn spawn_background(node: &Node) {
    // Held values reach the database within a second of changing, so a
    // holder killed with -9 still serves what it had accepted.
    let n = node.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if n.inner()
                .dht
                .dirty
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                persist(&n);
            }
        }
    });
    let node = node.clone();
    tokio::spawn(async move {
        let mut last_persist = 0u64;
        let mut last_self_lookup = 0u64;
        let mut published_at_len = 0usize;
        loop {
            tokio::time::sleep(TICK).await;
            let t = now();
            let dht = &node.inner().dht;
            dht.with(|c| c.expire(t));
            // Join (and rejoin after isolation) by looking up our own id.
            let table_len = dht.with(|c| c.table().len());
            if table_len > 0
                && (last_self_lookup == 0 || t.0 >= last_self_lookup + 600 || table_len < 3)
            {
                last_self_lookup = t.0;
                let l = dht.with(|c| {
                    c.start_lookup(DhtKey::for_node(&node.id()), LookupKind::FindNode, t)
                });
                run_lookup(&node, l).await;
            }
            // While the table is still filling, every growth means new close
            // nodes that may not hold our records yet.
            let k = dht.with(|c| c.config().k);
            if table_len > published_at_len && published_at_len < k {
                published_at_len = table_len;
                publish_own(&node).await;
                publish_services(&node).await;
            }
            for item in dht.with(|c| c.poll_republish(t)) {
                replicate(&node, item.key, item.family, item.value).await;
            }
            let mut seed = [0u8; 32];
            identity::fill_random(&mut seed);
            for target in dht.with(|c| c.poll_refresh(t, seed)).into_iter().take(4) {
                let l = dht.with(|c| c.start_lookup(target, LookupKind::FindNode, t));
                run_lookup(&node, l).await;
            }
            if t.0 >= last_persist + PERSIST_EVERY {
                last_persist = t.0;
                persist(&node);
            }
        }
    });
}

/// Writes the record store to the database (one transaction).
pub(crate) fn persist(node: &Node) {
    let items: Vec<([u8; 32], u8, Vec<u8>)> = node
        .inner()
        .dht
        .with(|c| c.store().snapshot())
        .into_iter()
        .map(|(k, f, v)| (k.0, f.code(), v))
        .collect();
    if let Err(e) = node.inner().db.replace_dht_values(&items) {
        tracing::warn!(error = %e, "cannot persist the DHT store");
    }
}

pub(crate) fn status(node: &Node) -> Value {
    node.inner().dht.with(|c| {
        let st = c.store().stats();
        let reasons = [
            RejectReason::Malformed,
            RejectReason::UnsupportedFamily,
            RejectReason::TooLarge,
            RejectReason::KeyMismatch,
            RejectReason::BadSignature,
            RejectReason::Expired,
            RejectReason::BadLifetime,
            RejectReason::Stale,
            RejectReason::RateLimited,
            RejectReason::TooManySigners,
            RejectReason::StoreFull,
        ];
        let rejected: serde_json::Map<String, Value> =
            reasons.iter().map(|r| (format!("{r:?}").to_lowercase(), json!(st.rejected(*r)))).collect();
        json!({
            "routing_table": c.table().len(),
            "stored_values": c.store().len(),
            "stored_bytes": c.store().bytes(),
            "rejected": rejected,
            "rejected_total": st.rejected_total(),
            "requests": {"ping": c.stats().pings, "find_node": c.stats().find_nodes, "find_value": c.stats().find_values, "store": c.stats().stores, "malformed": c.stats().malformed},
        })
    })
}
