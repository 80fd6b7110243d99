//! The channel pool: at most one live channel per peer node.
//!
//! Every authenticated connection, dialed or accepted, becomes a
//! [`Channel`] registered under the node id its transport proved. Streams the
//! peer opens on any channel go to the node's [`StreamHandler`]. Dials to one
//! node are serialised, so concurrent callers share one dial instead of
//! racing several.
//!
//! When a second channel to a peer comes up (both ends dialed at once, or
//! the peer reconnected), the newest one is pooled and the older one is
//! closed as soon as its open streams are done. A channel that closes is
//! forgotten by the pool on its own, so closed channels never count against
//! `max_channels`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vx6_proto::NodeId;
use vx6_proto::record::Endpoint;

use crate::channel::{Channel, ChannelConfig, Incoming, IncomingCircuit, IncomingStream, Role};
use crate::transport::{Conn, Expect, Transports};
use crate::{NetError, Result};
use vx6_proto::link::Cmd;

/// What the node does with channels and the streams peers open on them.
pub trait StreamHandler: Send + Sync + 'static {
    /// A peer opened `stream` on `chan`. Must not block: spawn if needed.
    fn handle(&self, chan: Channel, stream: IncomingStream);
    /// A channel came up (dialed or accepted).
    fn channel_up(&self, _chan: &Channel) {}
    /// A peer created a relay circuit on `chan`. Must not block. The
    /// default refuses it with DESTROY.
    fn circuit(&self, chan: Channel, circuit: IncomingCircuit) {
        tokio::spawn(async move {
            let _ = chan
                .send_cell(circuit.circ, Cmd::Destroy, bytes::Bytes::from_static(&[1]))
                .await;
        });
    }
}

/// Pool counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub dials_ok: AtomicU64,
    pub dials_failed: AtomicU64,
    pub accepted: AtomicU64,
    /// Inbound connections dropped because `max_channels` were up.
    pub rejected_over_limit: AtomicU64,
}

type ChannelMap = Mutex<HashMap<NodeId, Channel>>;
type DialGates = Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>;

pub struct Pool {
    transports: Arc<Transports>,
    cfg: ChannelConfig,
    handler: Arc<dyn StreamHandler>,
    channels: Arc<ChannelMap>,
    dialing: DialGates,
    max_channels: usize,
    /// Set (under the `channels` lock) by [`Pool::close`].
    closed: AtomicBool,
    stats: PoolStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A caller's share of the dial gate of one node. The gate leaves the map
/// when its last user is done (or cancelled).
struct DialTicket<'a> {
    gates: &'a DialGates,
    node: NodeId,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a> DialTicket<'a> {
    fn take(gates: &'a DialGates, node: NodeId) -> Self {
        let gate = lock(gates).entry(node).or_default().clone();
        Self { gates, node, gate }
    }
}

impl Drop for DialTicket<'_> {
    fn drop(&mut self) {
        let mut gates = lock(self.gates);
        // Users clone the gate under this lock, so the count is exact: the
        // map's reference and ours.
        if Arc::strong_count(&self.gate) == 2
            && gates
                .get(&self.node)
                .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            gates.remove(&self.node);
        }
    }
}

impl Pool {
    pub fn new(
        transports: Arc<Transports>,
        cfg: ChannelConfig,
        handler: Arc<dyn StreamHandler>,
        max_channels: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            transports,
            cfg,
            handler,
            channels: Arc::new(Mutex::new(HashMap::new())),
            dialing: Mutex::new(HashMap::new()),
            max_channels,
            closed: AtomicBool::new(false),
            stats: PoolStats::default(),
        })
    }

    pub fn transports(&self) -> &Arc<Transports> {
        &self.transports
    }

    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// Accepts inbound connections until the transports close.
    pub async fn run_accept(self: Arc<Self>) {
        loop {
            match self.transports.accept().await {
                Ok(conn) => {
                    let full = {
                        let map = lock(&self.channels);
                        // A peer replacing its own channel takes no new place.
                        !map.contains_key(&conn.peer)
                            && map.values().filter(|c| !c.is_closed()).count() >= self.max_channels
                    };
                    if full {
                        self.stats
                            .rejected_over_limit
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    if self.adopt(conn, Role::Acceptor).is_err() {
                        break;
                    }
                }
                Err(NetError::Closed) => break,
                Err(e) => tracing::debug!(error = %e, "accept failed"),
            }
        }
    }

    /// The live channel to `node`, if any.
    pub fn get(&self, node: &NodeId) -> Option<Channel> {
        let map = lock(&self.channels);
        map.get(node).filter(|c| !c.is_closed()).cloned()
    }

    /// All live channels.
    pub fn channels(&self) -> Vec<Channel> {
        lock(&self.channels)
            .values()
            .filter(|c| !c.is_closed())
            .cloned()
            .collect()
    }

    /// A channel to `node`, reusing a live one or dialing `endpoints` in
    /// order (callers sort them; IPv6 first by convention) until one works.
    ///
    /// A live channel is reused only when its transport is one the caller
    /// listed, so a caller that asks for QUIC endpoints gets QUIC.
    pub async fn connect(&self, node: NodeId, endpoints: &[Endpoint]) -> Result<Channel> {
        let usable = |c: &Channel| {
            endpoints.is_empty() || endpoints.iter().any(|e| e.transport == c.transport())
        };
        if let Some(c) = self.get(&node).filter(usable) {
            return Ok(c);
        }
        let ticket = DialTicket::take(&self.dialing, node);
        let _turn = ticket.gate.lock().await;
        if let Some(c) = self.get(&node).filter(usable) {
            return Ok(c);
        }
        let mut last = NetError::Config(format!("no endpoints known for node {}", node.short()));
        for ep in endpoints {
            match self.transports.dial(*ep, Expect::Node(node)).await {
                Ok(conn) => {
                    self.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
                    // Pooled before the gate opens: the next caller finds it.
                    return self.adopt(conn, Role::Dialer);
                }
                Err(e) => {
                    self.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
                    let fatal = matches!(e, NetError::WrongNode { .. } | NetError::Closed);
                    last = e;
                    if fatal {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// Dials one endpoint with an explicit expectation (a pinned id or an
    /// explicit trust-on-first-use) and pools the resulting channel.
    pub async fn dial(&self, ep: Endpoint, expect: Expect) -> Result<Channel> {
        // Reuse only a channel to this very endpoint: the caller asks "is the
        // node at this address the one I expect?", which a channel to the
        // same node at another address does not answer.
        let same_endpoint = |c: &Channel| c.transport() == ep.transport && c.remote() == ep.addr;
        if let Expect::Node(node) = expect
            && let Some(c) = self.get(&node).filter(same_endpoint)
        {
            return Ok(c);
        }
        match self.transports.dial(ep, expect).await {
            Ok(conn) => {
                self.stats.dials_ok.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = self.get(&conn.peer).filter(same_endpoint) {
                    return Ok(c);
                }
                self.adopt(conn, Role::Dialer)
            }
            Err(e) => {
                self.stats.dials_failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Runs `conn` as a channel and pools it; `Closed` once the pool is closed.
    fn adopt(&self, conn: Conn, role: Role) -> Result<Channel> {
        let peer = conn.peer;
        let (chan, incoming) = Channel::spawn(conn, role, self.cfg.clone());
        let older = {
            let mut map = lock(&self.channels);
            if self.closed.load(Ordering::SeqCst) {
                drop(map);
                chan.close();
                return Err(NetError::Closed);
            }
            map.insert(peer, chan.clone())
        };
        // The newest channel wins; an older one to the same peer finishes
        // its streams and then closes (else keepalives would hold it forever).
        if let Some(older) = older {
            older.close_when_idle();
        }
        self.handler.channel_up(&chan);
        tokio::spawn(serve_incoming(
            chan.clone(),
            incoming,
            self.handler.clone(),
            Arc::downgrade(&self.channels),
        ));
        Ok(chan)
    }

    /// Forgets closed channels (the pool also does so as each one closes).
    pub fn prune(&self) {
        lock(&self.channels).retain(|_, c| !c.is_closed());
    }

    /// Closes every channel and the transports; later dials and accepted
    /// connections fail.
    pub fn close(&self) {
        let chans: Vec<Channel> = {
            let mut map = lock(&self.channels);
            self.closed.store(true, Ordering::SeqCst);
            map.drain().map(|(_, c)| c).collect()
        };
        for c in chans {
            c.close();
        }
        self.transports.close();
    }
}

/// Hands the peer's streams to the handler until the channel closes, then
/// takes the channel out of the pool (unless a newer one replaced it).
async fn serve_incoming(
    chan: Channel,
    incoming: Incoming,
    handler: Arc<dyn StreamHandler>,
    channels: Weak<ChannelMap>,
) {
    let (mut streams, mut circuits) = incoming.split();
    let (c2, h2) = (chan.clone(), handler.clone());
    let circ_task = tokio::spawn(async move {
        while let Some(circ) = circuits.accept().await {
            h2.circuit(c2.clone(), circ);
        }
    });
    while let Some(stream) = streams.accept().await {
        handler.handle(chan.clone(), stream);
    }
    chan.closed().await;
    circ_task.abort();
    if let Some(channels) = channels.upgrade() {
        let mut map = lock(&channels);
        if map.get(&chan.peer()).is_some_and(|c| c.is_same(&chan)) {
            map.remove(&chan.peer());
        }
    }
}
