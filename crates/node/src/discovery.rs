//! Discovery: this node's own records, peer sync, entry peers and name
//! resolution.
//!
//! Owns: building and re-signing this node's NodeRecord and NameClaim when
//! its endpoints change (with a strictly higher seq, persisted), pushing them
//! to connected peers, the peer-sync and record-push RPCs, dialing entry
//! peers, and resolving `node.service` (registry first, DHT second), with
//! name pinning. Every record from a peer is verified before it is stored.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use vx6_net::channel::{Channel, RecvHalf, SendHalf};
use vx6_net::transport::Expect;
use vx6_proto::name::{NodeName, QualifiedName, ServiceName};
use vx6_proto::nodemsg::{self, Purpose, RecordList, SyncRequest};
use vx6_proto::record::{
    Capabilities, Endpoint, NameClaim, NodeRecord, RecordBody, Signed, TransportKind,
};
use vx6_proto::{NodeId, UnixTime};

use crate::config;
use crate::error::{NodeError, Result};
use crate::node::{Node, RPC_TIMEOUT, now};

/// Lifetime of this node's own records; they are re-signed at half of it.
pub(crate) const OWN_RECORD_LIFETIME: u64 = 24 * 3600;
/// How often the node checks its own addresses.
const ADDRESS_POLL: Duration = Duration::from_secs(2);
/// How often entry peers are retried while the node has few channels.
const ENTRY_RETRY: Duration = Duration::from_secs(10);
/// Below this many channels the node keeps dialing entry peers.
const MIN_CHANNELS: usize = 3;

/// Where a resolution came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Registry,
    Dht,
    Pinned,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Registry => "registry",
            Source::Dht => "dht",
            Source::Pinned => "pinned",
        }
    }
}

/// The answer to `node.service`.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub node: NodeId,
    pub name: String,
    pub service: ServiceName,
    pub endpoints: Vec<Endpoint>,
    pub source: Source,
}

/// Addresses worth advertising for a wildcard listener: global and
/// unique-local, never loopback, link-local or multicast.
pub fn advertisable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => {
            let s0 = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s0 & 0xffc0) == 0xfe80)
                && v6.to_ipv4_mapped().is_none()
        }
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
    }
}

/// Whether this node may dial `ep` taken from a peer's signed record: never
/// an address of its own, never loopback unless this node itself lives only
/// on loopback (a single-machine network), never unspecified or multicast.
/// A record is signed by its subject, who can claim any address; this keeps
/// a forged record from aiming us at our own localhost services.
pub(crate) fn dialable(node: &Node, ep: &Endpoint) -> bool {
    let own = node.local_endpoints();
    let ip = ep.addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || own.iter().any(|o| o.addr == ep.addr) {
        return false;
    }
    if ip.is_loopback() {
        return own.iter().all(|o| o.addr.ip().is_loopback());
    }
    true
}

/// The endpoints of `id`'s record this node may dial, in dial order. Once
/// `id` has been seen over an authenticated channel, only addresses it was
/// seen at qualify: a record is signed by its subject, who could otherwise
/// aim us at anyone's port. A node never met yet (a lookup candidate) is
/// dialed at what its record says, as Kademlia must.
pub(crate) fn usable_endpoints(
    node: &Node,
    id: &NodeId,
    eps: &[Endpoint],
    prefer: Option<TransportKind>,
) -> Vec<Endpoint> {
    let seen = node.inner().seen_at(id);
    let mut v: Vec<Endpoint> = eps
        .iter()
        .copied()
        .filter(|e| dialable(node, e))
        .filter(|e| seen.is_empty() || seen.contains(&e.addr.ip()))
        .collect();
    sort_endpoints(&mut v, prefer);
    v
}

/// IPv6 first, then the preferred transport, then the rest in a stable order.
pub fn sort_endpoints(eps: &mut [Endpoint], prefer: Option<TransportKind>) {
    eps.sort_by_key(|e| (!e.addr.is_ipv6(), Some(e.transport) != prefer, *e));
}

/// The endpoints this node advertises now.
pub fn own_endpoints(node: &Node) -> Vec<Endpoint> {
    let cfg = node
        .inner()
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let bound = node.local_endpoints();
    let mut out = BTreeSet::new();
    if !cfg.advertise.is_empty() {
        for a in &cfg.advertise {
            for b in &bound {
                out.insert(Endpoint {
                    transport: b.transport,
                    addr: *a,
                });
            }
        }
    } else {
        let ifaces: Vec<IpAddr> = if_addrs::get_if_addrs()
            .map(|v| v.into_iter().map(|i| i.ip()).filter(advertisable).collect())
            .unwrap_or_default();
        for b in &bound {
            if b.addr.ip().is_unspecified() {
                for ip in &ifaces {
                    // A [::] socket is dual-stack on Linux; a 0.0.0.0 one is IPv4 only.
                    if b.addr.is_ipv6() || ip.is_ipv4() {
                        out.insert(Endpoint {
                            transport: b.transport,
                            addr: SocketAddr::new(*ip, b.addr.port()),
                        });
                    }
                }
            } else {
                out.insert(*b);
            }
        }
    }
    let mut v: Vec<Endpoint> = out
        .into_iter()
        .take(vx6_proto::record::MAX_ENDPOINTS)
        .collect();
    sort_endpoints(&mut v, None);
    v
}

/// Signs a fresh NodeRecord (and NameClaim) for `endpoints` with the next seq.
pub(crate) fn sign_own_records(
    node: &Node,
    endpoints: Vec<Endpoint>,
) -> Result<(Signed<NodeRecord>, Signed<NameClaim>)> {
    let inner = node.inner();
    let cfg = inner
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let name = NodeName::new(&cfg.name)?;
    let now = now();
    let seq = inner.db.next_seq("node-record", now.0)?;
    let mut caps = Capabilities::DHT;
    if cfg.relay.enabled {
        caps |= Capabilities::RELAY;
    }
    let rec = NodeRecord {
        node: inner.id,
        name: Some(name.clone()),
        endpoints,
        onion_key: inner.onion_public(),
        caps: Capabilities(caps),
        seq,
        issued: now,
        expires: now.plus(OWN_RECORD_LIFETIME),
    }
    .sign(&inner.key)?;
    let claim = NameClaim {
        name,
        node: inner.id,
        seq,
        issued: now,
        expires: now.plus(OWN_RECORD_LIFETIME),
    }
    .sign(&inner.key)?;
    Ok((rec, claim))
}

/// Verifies and stores a NodeRecord from a peer. Returns the record when it
/// was new (higher seq than held).
pub(crate) fn admit_node_record(node: &Node, bytes: &[u8]) -> Result<Option<Signed<NodeRecord>>> {
    let inner = node.inner();
    let rec = match Signed::<NodeRecord>::decode_verified(bytes, now()) {
        Ok(r) => r,
        Err(e) => {
            inner
                .counters
                .records_rejected
                .fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
    };
    if rec.body.node == inner.id {
        return Ok(None);
    }
    let replaced = inner
        .db
        .put_node_record(&rec.body.node, rec.body.seq, bytes)?;
    if replaced {
        inner
            .counters
            .records_accepted
            .fetch_add(1, Ordering::Relaxed);
        learnt(node, &rec);
        Ok(Some(rec))
    } else {
        inner.counters.records_stale.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }
}

/// Verifies a batch of NodeRecords from a peer and stores the new ones (a
/// higher seq than held) in one database transaction; records already known
/// cost a read, never a write. Returns the records that were new.
pub(crate) fn admit_node_records(node: &Node, batch: &[Vec<u8>]) -> Vec<Signed<NodeRecord>> {
    let inner = node.inner();
    let t = now();
    let mut fresh: Vec<(Signed<NodeRecord>, &[u8])> = Vec::new();
    for bytes in batch {
        let rec = match Signed::<NodeRecord>::decode_verified(bytes, t) {
            Ok(r) => r,
            Err(_) => {
                inner
                    .counters
                    .records_rejected
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        if rec.body.node == inner.id || fresh.iter().any(|(f, _)| f.body.node == rec.body.node) {
            continue;
        }
        let held = inner.db.node_record_seq(&rec.body.node).ok().flatten();
        if held.is_some_and(|s| s >= rec.body.seq) {
            inner.counters.records_stale.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        fresh.push((rec, bytes.as_slice()));
    }
    if fresh.is_empty() {
        return Vec::new();
    }
    let items: Vec<(NodeId, u64, &[u8])> = fresh
        .iter()
        .map(|(r, b)| (r.body.node, r.body.seq, *b))
        .collect();
    let Ok(stored) = inner.db.put_node_records(&items) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ((rec, _), ok) in fresh.into_iter().zip(stored) {
        if ok {
            inner
                .counters
                .records_accepted
                .fetch_add(1, Ordering::Relaxed);
            learnt(node, &rec);
            out.push(rec);
        }
    }
    out
}

/// Every valid NodeRecord in the registry, freshest first, own first.
pub(crate) fn registry_records(node: &Node) -> Vec<Signed<NodeRecord>> {
    let now = now();
    let mut v: Vec<Signed<NodeRecord>> = node
        .inner()
        .db
        .node_records()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, b)| stored_record(&b, now))
        .collect();
    v.sort_by_key(|r| std::cmp::Reverse(r.body.issued));
    if let Some(own) = node.inner().own_record() {
        v.insert(0, own);
    }
    v
}

/// The registry's valid NodeRecord for `id`, if any.
pub(crate) fn registry_record(node: &Node, id: &NodeId) -> Option<Signed<NodeRecord>> {
    let bytes = node.inner().db.get_node_record(id).ok()??;
    stored_record(&bytes, now())
}

/// A record read back from the registry. Its signature was verified when
/// it was admitted (nothing else writes the table), so reading only decodes
/// and drops expired ones: re-verifying thousands of signatures on every
/// peer-sync request would hand peers a cheap way to burn our CPU.
fn stored_record(bytes: &[u8], now: UnixTime) -> Option<Signed<NodeRecord>> {
    Signed::<NodeRecord>::decode(bytes)
        .ok()
        .filter(|r| r.body.expires > now)
}

/// Answers the RPC purposes that are not service connections.
pub(crate) async fn handle_rpc(
    node: &Node,
    chan: &Channel,
    purpose: Purpose,
    mut send: SendHalf,
    mut recv: RecvHalf,
) -> Result<()> {
    let body = recv.read_to_end(nodemsg::MAX_RPC_LEN).await?;
    let answer: Vec<u8> = match purpose {
        Purpose::PeerSync => {
            let req = SyncRequest::decode(&body)?;
            let all = registry_records(node);
            let start = req.cursor as usize;
            let limit = (req.limit as usize).min(nodemsg::MAX_SYNC_PAGE);
            let page: Vec<Vec<u8>> = all
                .iter()
                .skip(start)
                .take(limit)
                .map(Signed::encode)
                .collect();
            let next = (start + page.len() < all.len()).then(|| (start + page.len()) as u32);
            RecordList {
                records: page,
                next,
            }
            .encode()
        }
        Purpose::PushRecord => {
            let rec = Signed::<NodeRecord>::decode(&body)?;
            if rec.body.node != chan.peer() {
                node.inner()
                    .counters
                    .records_rejected
                    .fetch_add(1, Ordering::Relaxed);
                return Err(NodeError::Refused(
                    "pushed record is not the sender's own".into(),
                ));
            }
            if let Some(r) = admit_node_record(node, &body)? {
                crate::dht::observe(node, &r);
            }
            Vec::new()
        }
        Purpose::Dht => crate::dht::handle_request(node, chan, &body)?,
        Purpose::Service(_) | Purpose::Catalog => {
            return Err(NodeError::Refused("not an RPC".into()));
        }
    };
    if !answer.is_empty() {
        send.send(Bytes::from(answer)).await?;
    }
    send.finish().await?;
    Ok(())
}

/// Runs on every new channel: push our record, pull a page of theirs.
pub(crate) async fn sync_with(node: Node, chan: Channel) {
    push_and_pull(&node, &chan, true).await;
}

/// Pulls a page of fresh records from a few connected peers now (e.g. when
/// a relay path lacks candidates).
pub(crate) async fn sync_now(node: &Node, peers: usize) {
    let chans: Vec<Channel> = node.pool().channels().into_iter().take(peers).collect();
    let pulls = chans.into_iter().map(|c| {
        let n = node.clone();
        async move { push_and_pull(&n, &c, false).await }
    });
    futures_join_all(pulls).await;
}

/// One node RPC (PROTOCOL.md §8): a stream with `purpose`, `body`, and an
/// answer of at most `max` bytes within RPC_TIMEOUT.
async fn rpc(
    chan: &Channel,
    purpose: Purpose,
    body: Vec<u8>,
    max: usize,
) -> vx6_net::Result<Bytes> {
    chan.request(
        Bytes::from(purpose.encode()),
        Bytes::from(body),
        max,
        RPC_TIMEOUT,
    )
    .await
}

/// A peer-sync request for the page at `cursor`, as large as pages go.
fn sync_request(cursor: u32) -> Vec<u8> {
    SyncRequest {
        cursor,
        limit: nodemsg::MAX_SYNC_PAGE as u16,
    }
    .encode()
}

async fn push_and_pull(node: &Node, chan: &Channel, push: bool) {
    let node = node.clone();
    if push && let Some(own) = node.inner().own_record() {
        let _ = rpc(chan, Purpose::PushRecord, own.encode(), 16).await;
    }
    // Pages, freshest first, for as long as they still teach us something
    // (bounded): a newcomer to a large network gets more than one page,
    // a node that is up to date stops after the first.
    let mut cursor = 0u32;
    for _ in 0..MAX_SYNC_PAGES {
        let Ok(raw) = rpc(
            chan,
            Purpose::PeerSync,
            sync_request(cursor),
            nodemsg::MAX_RPC_LEN,
        )
        .await
        else {
            return;
        };
        let Ok(list) = RecordList::decode(&raw, nodemsg::MAX_SYNC_PAGE) else {
            node.inner()
                .counters
                .records_rejected
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let new = admit_node_records(&node, &list.records);
        for rec in &new {
            if rec.body.node == chan.peer() {
                crate::dht::observe(&node, rec);
            }
        }
        match list.next {
            Some(next) if !new.is_empty() && next > cursor => cursor = next,
            _ => return,
        }
    }
}

/// Most peer-sync pages pulled from one peer in one go.
const MAX_SYNC_PAGES: usize = 16;

/// Background work: watch own addresses and republish, keep entry peers dialed.
pub(crate) fn spawn_background(node: &Node) {
    let n = node.clone();
    tokio::spawn(async move {
        let mut last: Vec<Endpoint> = Vec::new();
        let mut last_signed = UnixTime(0);
        let mut last_services: Vec<ServiceName> = Vec::new();
        loop {
            let services: Vec<ServiceName> = n
                .services()
                .into_iter()
                .filter(|s| !s.private)
                .map(|s| s.name)
                .collect();
            if services != last_services {
                last_services = services;
                crate::dht::publish_services(&n).await;
            }
            let eps = own_endpoints(&n);
            let stale = now().0.saturating_sub(last_signed.0) > OWN_RECORD_LIFETIME / 2;
            if eps != last || stale {
                match sign_own_records(&n, eps.clone()) {
                    Ok((rec, claim)) => {
                        if !last.is_empty() && eps != last {
                            tracing::info!(endpoints = ?eps, seq = rec.body.seq, "addresses changed; republishing");
                        }
                        n.inner().set_own_records(rec.clone(), claim.clone());
                        let moved = !last.is_empty() && eps != last;
                        last = eps;
                        last_signed = now();
                        if moved {
                            rejoin_after_move(&n).await;
                        }
                        push_to_peers(&n, &rec).await;
                        crate::dht::publish_own(&n).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot sign own record"),
                }
            }
            tokio::time::sleep(ADDRESS_POLL).await;
        }
    });
    let n = node.clone();
    tokio::spawn(async move {
        loop {
            if n.pool().channels().len() < MIN_CHANNELS {
                dial_entry_peers(&n).await;
            }
            // One page from one peer per round keeps the registry fresh at a
            // constant cost, whatever the size of the network.
            sync_now(&n, 1).await;
            tokio::time::sleep(ENTRY_RETRY).await;
        }
    });
    let n = node.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELAY_MEET_EVERY) => {}
                () = n.inner().relay.meet_soon.notified() => {}
            }
            meet_relays(&n).await;
            // Records a peer pushes cannot make this loop spin.
            tokio::time::sleep(RELAY_MEET_GAP).await;
        }
    });
}

/// Tells the relay-meeting loop that `rec`, just learnt, may be a relay to meet.
fn learnt(node: &Node, rec: &Signed<NodeRecord>) {
    if rec.body.caps.has(Capabilities::RELAY) {
        node.inner().relay.meet_soon.notify_one();
    }
}

/// How often a relay looks for relays it has not met yet (and at once when
/// it learns of a new one, at most once per `RELAY_MEET_GAP`).
const RELAY_MEET_EVERY: Duration = Duration::from_secs(3);
const RELAY_MEET_GAP: Duration = Duration::from_millis(200);
/// Relays a relay keeps acquainted with (bounded, so background traffic does
/// not grow with the network).
const MAX_MET_RELAYS: usize = 64;

/// A relay extends circuits only to nodes it has met over an authenticated
/// channel (relay.rs), so relays make a point of meeting other relays they
/// learn of: a few per round, on their own initiative (never because a
/// client asked), up to a bound.
async fn meet_relays(node: &Node) {
    let relay_on = node
        .inner()
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .relay
        .enabled;
    // Cheap first: once this node has met enough nodes, skip the registry scan.
    if !relay_on || node.inner().seen_count() >= MAX_MET_RELAYS {
        return;
    }
    let relays: Vec<Signed<NodeRecord>> = registry_records(node)
        .into_iter()
        .filter(|r| r.body.caps.has(Capabilities::RELAY) && r.body.node != node.id())
        .collect();
    let met = relays
        .iter()
        .filter(|r| !node.inner().seen_at(&r.body.node).is_empty())
        .count();
    if met >= MAX_MET_RELAYS {
        return;
    }
    let todo = relays
        .into_iter()
        .filter(|r| node.inner().seen_at(&r.body.node).is_empty())
        .take(4)
        .map(|r| {
            let n = node.clone();
            async move {
                let eps = usable_endpoints(
                    &n,
                    &r.body.node,
                    &r.body.endpoints,
                    Some(TransportKind::Tcp),
                );
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    n.pool().connect(r.body.node, &eps),
                )
                .await;
            }
        });
    futures_join_all(todo).await;
}

/// After an address change, channels may be bound to an address that is
/// gone and would only fail at their idle timeout. Close them all and redial
/// the same peers from the new address, so the push that follows reaches
/// them and their pools replace the dead channel with the new one.
async fn rejoin_after_move(node: &Node) {
    let peers: Vec<NodeId> = node.pool().channels().iter().map(Channel::peer).collect();
    for c in node.pool().channels() {
        c.close();
    }
    node.pool().prune();
    let dials = peers
        .into_iter()
        .filter_map(|p| registry_record(node, &p))
        .map(|r| {
            let n = node.clone();
            async move {
                let mut eps = r.body.endpoints.clone();
                sort_endpoints(&mut eps, None);
                let _ = n.pool().connect(r.body.node, &eps).await;
            }
        });
    futures_join_all(dials).await;
    dial_entry_peers(node).await;
}

async fn push_to_peers(node: &Node, rec: &Signed<NodeRecord>) {
    let body = Bytes::from(rec.encode());
    let purpose = Bytes::from(Purpose::PushRecord.encode());
    let pushes = node.pool().channels().into_iter().map(|c| {
        let (b, p) = (body.clone(), purpose.clone());
        async move {
            let _ = c.request(p, b, 16, RPC_TIMEOUT).await;
        }
    });
    futures_join_all(pushes).await;
}

/// Joins futures concurrently without pulling in the `futures` crate.
pub(crate) async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl IntoIterator<Item = F>,
) {
    let mut set = tokio::task::JoinSet::new();
    for f in futs {
        set.spawn(f);
    }
    while set.join_next().await.is_some() {}
}

/// Entry peers: config.toml `peers` plus the registry's, dialed by address.
async fn dial_entry_peers(node: &Node) {
    let inner = node.inner();
    let cfg_peers: Vec<String> = inner
        .config
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .peers
        .clone();
    let mut addrs: Vec<(SocketAddr, Option<NodeId>)> = cfg_peers
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(|a| (a, None))
        .collect();
    for p in inner.db.peers().unwrap_or_default() {
        match addrs.iter_mut().find(|(a, _)| *a == p.addr) {
            Some(e) => e.1 = p.node,
            None => addrs.push((p.addr, p.node)),
        }
    }
    for (addr, known) in addrs.into_iter().take(32) {
        if let Some(k) = known
            && node.pool().get(&k).is_some()
        {
            continue;
        }
        let _ = dial_entry(node, addr, known).await;
    }
}

/// Dials an entry peer by address (TCP, then QUIC). The first id seen at the
/// address is remembered; a later different key there is refused.
async fn dial_entry(node: &Node, addr: SocketAddr, known: Option<NodeId>) -> Result<Channel> {
    let inner = node.inner();
    let expect = known.map(Expect::Node).unwrap_or(Expect::AnyKey);
    let mut last = None;
    for t in [TransportKind::Tcp, TransportKind::Quic] {
        match node
            .pool()
            .dial(Endpoint { transport: t, addr }, expect)
            .await
        {
            Ok(c) => {
                inner
                    .db
                    .record_peer_contact(addr, c.peer(), now().0, true)?;
                return Ok(c);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last
        .map(NodeError::from)
        .unwrap_or_else(|| NodeError::Unreachable(format!("cannot reach {addr}")));
    if let Some(k) = known {
        let _ = inner.db.record_peer_contact(addr, k, now().0, false);
    }
    Err(e)
}

/// `vx6 peer add ADDR`: remember the address and dial it now.
pub(crate) async fn peer_add(node: &Node, addr: &str) -> Result<Value> {
    let sa = crate::node::parse_socket_addr(addr)?;
    node.inner().db.add_peer_addr(sa)?;
    match dial_entry(node, sa, None).await {
        Ok(c) => {
            Ok(json!({"addr": sa.to_string(), "node": c.peer().to_string(), "connected": true}))
        }
        Err(e) => Err(NodeError::Unreachable(format!(
            "saved peer {sa}, but cannot reach it now: {e}"
        ))),
    }
}

pub(crate) fn peer_list(node: &Node) -> Result<Value> {
    let live: Vec<Channel> = node.pool().channels();
    let mut peers = Vec::new();
    for p in node.inner().db.peers()? {
        let connected = p.node.is_some_and(|n| live.iter().any(|c| c.peer() == n));
        peers.push(json!({
            "addr": p.addr.to_string(), "node": p.node.map(|n| n.to_string()),
            "state": if connected { "connected" } else if p.failures > 0 { "failing" } else { "known" },
            "last_ok": p.last_ok, "failures": p.failures,
        }));
    }
    let channels: Vec<Value> = live
        .iter()
        .map(|c| json!({"node": c.peer().to_string(), "remote": c.remote().to_string(), "transport": c.transport().as_str()}))
        .collect();
    let known_nodes = node.inner().db.node_records()?.len();
    Ok(json!({"peers": peers, "channels": channels, "known_nodes": known_nodes}))
}

/// Finds the NodeRecords that claim `name`, in the registry and in the DHT
/// (both: a clash must be seen even when the registry knows one claimant).
async fn records_for_name(node: &Node, name: &NodeName) -> (Vec<Signed<NodeRecord>>, Source) {
    let mut found: Vec<Signed<NodeRecord>> = registry_records(node)
        .into_iter()
        .filter(|r| r.body.name.as_ref() == Some(name) && r.body.node != node.id())
        .collect();
    let source = if found.is_empty() {
        Source::Dht
    } else {
        Source::Registry
    };
    for r in crate::dht::lookup_name(node, name).await {
        if r.body.node != node.id() && !found.iter().any(|f| f.body.node == r.body.node) {
            found.push(r);
        }
    }
    (found, source)
}

/// Resolves `node.service` to a node and its endpoints, enforcing pins.
pub async fn resolve_service(
    node: &Node,
    text: &str,
    prefer: Option<TransportKind>,
) -> Result<Resolved> {
    let q: QualifiedName = text
        .parse()
        .map_err(|e| NodeError::Invalid(format!("'{text}': {e}")))?;
    let inner = node.inner();
    let pins = config::load_pins(&inner.home)?;
    // An id prefix picks a node directly (the way out of a name clash).
    let by_prefix = NodeName::new(&q.node).is_err()
        || (q.node.len() >= 8 && !pins.names.contains_key(&q.node) && {
            registry_records(node)
                .iter()
                .any(|r| r.body.node.matches_prefix(&q.node))
        });
    let (rec, source) = if by_prefix {
        let matches: Vec<Signed<NodeRecord>> = registry_records(node)
            .into_iter()
            .filter(|r| r.body.node.matches_prefix(&q.node))
            .collect();
        match matches.len() {
            0 => {
                return Err(NodeError::NotFound(format!(
                    "no known node id starts with '{}'",
                    q.node
                )));
            }
            1 => (
                matches
                    .into_iter()
                    .next()
                    .ok_or_else(|| NodeError::NotFound(q.node.clone()))?,
                Source::Registry,
            ),
            _ => {
                return Err(NodeError::Invalid(format!(
                    "id prefix '{}' matches {} nodes; give more characters",
                    q.node,
                    matches.len()
                )));
            }
        }
    } else {
        let name = NodeName::new(&q.node)?;
        let pinned: Option<NodeId> = pins.names.get(name.as_str()).and_then(|s| s.parse().ok());
        let (mut found, source) = records_for_name(node, &name).await;
        found.sort_by_key(|r| r.body.node);
        found.dedup_by_key(|r| r.body.node);
        match pinned {
            Some(pin) => match found.iter().find(|r| r.body.node == pin) {
                Some(r) => (r.clone(), Source::Pinned),
                None if found.is_empty() => {
                    let r = crate::dht::lookup_node(node, &pin).await.ok_or_else(|| {
                        NodeError::NotFound(format!(
                            "'{name}' is pinned to {pin}, which cannot be found now"
                        ))
                    })?;
                    (r, Source::Pinned)
                }
                None => {
                    let others: Vec<String> =
                        found.iter().map(|r| r.body.node.to_string()).collect();
                    return Err(NodeError::Refused(format!(
                        "'{name}' is pinned to {pin}, but is now claimed by {}; refusing a silent change (run 'vx6 peer forget {name}' to re-pin)",
                        others.join(", ")
                    )));
                }
            },
            None => match found.len() {
                0 => {
                    return Err(NodeError::NotFound(format!(
                        "no node named '{name}' found in the registry or the DHT"
                    )));
                }
                1 => {
                    let r = found
                        .into_iter()
                        .next()
                        .ok_or_else(|| NodeError::NotFound(name.to_string()))?;
                    let id = r.body.node.to_string();
                    config::edit_pins(&inner.home, |p| {
                        p.names.insert(name.to_string(), id.clone());
                        Ok(())
                    })?;
                    (r, source)
                }
                _ => {
                    let ids: Vec<String> = found.iter().map(|r| r.body.node.to_string()).collect();
                    let example = found
                        .first()
                        .map(|r| r.body.node.short())
                        .unwrap_or_default();
                    return Err(NodeError::Refused(format!(
                        "name clash: '{name}' is claimed by {} nodes: {}; pick one by id prefix, e.g. 'vx6 connect {example}.{} ...'",
                        ids.len(),
                        ids.join(", "),
                        q.service
                    )));
                }
            },
        }
    };
    let mut endpoints = usable_endpoints(node, &rec.body.node, &rec.body.endpoints, prefer);
    if let Some(t) = prefer
        && endpoints.iter().any(|e| e.transport == t)
    {
        endpoints.retain(|e| e.transport == t);
    }
    Ok(Resolved {
        node: rec.body.node,
        name: rec
            .body
            .name
            .as_ref()
            .map(|n| n.to_string())
            .unwrap_or_default(),
        service: q.service,
        endpoints,
        source,
    })
}

pub(crate) async fn resolve_json(node: &Node, text: &str) -> Result<Value> {
    let r = resolve_service(node, text, None).await?;
    let published = crate::dht::service_published(node, &r.node, &r.service).await;
    Ok(json!({
        "name": text, "node": r.node.to_string(), "node_name": r.name, "service": r.service.as_str(),
        "endpoints": r.endpoints.iter().map(|e| format!("{}/{}", e.transport, e.addr)).collect::<Vec<_>>(),
        "source": r.source.as_str(),
        "service_published": published,
    }))
}

pub(crate) fn status(node: &Node) -> Value {
    let c = &node.inner().counters;
    json!({
        "known_nodes": node.inner().db.node_records().map(|v| v.len()).unwrap_or(0),
        "records_accepted": c.records_accepted.load(Ordering::Relaxed),
        "records_rejected": c.records_rejected.load(Ordering::Relaxed),
        "records_stale": c.records_stale.load(Ordering::Relaxed),
        "own_seq": node.inner().own_record().map(|r| r.body.seq),
        "advertised": node.inner().own_record().map(|r| r.body.endpoints.iter().map(|e| format!("{}/{}", e.transport, e.addr)).collect::<Vec<_>>()),
        "dht": crate::dht::status(node),
    })
}

/// Asks the network reachable through `peers` who claims `name`, for
/// `vx6 init`'s clash warning. Runs without a daemon: a dial-only transport
/// with the new key, a DHT FIND_VALUE to each entry peer and to the closer
/// nodes they name, and each entry peer's first peer-sync page. Unreachable
/// peers are skipped; the answer is advisory, and `None` when no peer could
/// be asked at all (the name was not checked).
pub async fn name_claimants(
    key: &vx6_proto::NodeKeypair,
    name: &NodeName,
    peers: &[SocketAddr],
) -> Option<Vec<NodeId>> {
    use vx6_net::channel::{Channel as Chan, ChannelConfig, Role};
    use vx6_net::transport::{NetConfig, Transports};
    use vx6_proto::dhtmsg::{DhtKey, Request as DReq, Response as DResp};

    // A down peer costs `vx6 init` one QUIC handshake timeout (TCP is
    // refused at once): short, since the check is only advice.
    let cfg = NetConfig {
        handshake_timeout: Duration::from_secs(2),
        ..NetConfig::default()
    };
    let Ok(tr) = Transports::bind(key, &[], &[TransportKind::Tcp, TransportKind::Quic], cfg).await
    else {
        return None;
    };
    let me = key.node_id();
    let t = now();
    let mut ids: Vec<NodeId> = Vec::new();
    let note = |id: NodeId, ids: &mut Vec<NodeId>| {
        if id != me && !ids.contains(&id) {
            ids.push(id);
        }
    };
    let find = DReq::FindValue {
        key: DhtKey::for_name(name),
    }
    .encode()
    .unwrap_or_default();
    // Popped from the back: each entry peer over TCP first, and an address
    // that answered once is not dialed again over the other transport.
    let mut queue: Vec<(Endpoint, Expect)> = peers
        .iter()
        .rev()
        .flat_map(|a| {
            [TransportKind::Quic, TransportKind::Tcp].map(|t| {
                (
                    Endpoint {
                        transport: t,
                        addr: *a,
                    },
                    Expect::AnyKey,
                )
            })
        })
        .collect();
    let mut asked: Vec<NodeId> = Vec::new();
    let mut answered: Vec<SocketAddr> = Vec::new();
    while let Some((ep, expect)) = queue.pop() {
        if asked.len() >= 16 {
            break;
        }
        if answered.contains(&ep.addr) {
            continue;
        }
        let Ok(conn) = tr.dial(ep, expect).await else {
            continue;
        };
        answered.push(ep.addr);
        if asked.contains(&conn.peer) {
            continue;
        }
        asked.push(conn.peer);
        let (chan, _incoming) = Chan::spawn(conn, Role::Dialer, ChannelConfig::default());
        if let Ok(raw) = rpc(&chan, Purpose::Dht, find.clone(), nodemsg::MAX_RPC_LEN).await
            && let Ok(DResp::Value { values, closer }) = DResp::decode(&raw)
        {
            for v in values {
                if let Ok(c) = Signed::<NameClaim>::decode_verified(&v, t)
                    && c.body.name == *name
                {
                    note(c.body.node, &mut ids);
                }
            }
            for r in closer.into_iter().filter(|r| r.verify(t).is_ok()) {
                if let Some(e) = r.body.endpoints.first() {
                    queue.insert(0, (*e, Expect::Node(r.body.node)));
                }
            }
        }
        if let Ok(raw) = rpc(
            &chan,
            Purpose::PeerSync,
            sync_request(0),
            nodemsg::MAX_RPC_LEN,
        )
        .await
            && let Ok(list) = RecordList::decode(&raw, nodemsg::MAX_SYNC_PAGE)
        {
            for b in list.records {
                if let Ok(r) = Signed::<NodeRecord>::decode_verified(&b, t)
                    && r.body.name.as_ref() == Some(name)
                {
                    note(r.body.node, &mut ids);
                }
            }
        }
        chan.close();
    }
    tr.close();
    (!asked.is_empty()).then_some(ids)
}
