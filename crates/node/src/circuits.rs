//! The client side of relay circuits: choosing a path, building a circuit
//! one hop at a time, and carrying a forward's connections over it.
//!
//! Links to the first relay use a throwaway key made when the daemon
//! starts, never the node's identity, so no relay learns who the client is.
//! The owner of the service is the last hop, so data is end-to-end
//! encrypted. Relays that fail an extension or take a circuit down are
//! marked unhealthy (persisted) and new circuits are built around them.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vx6_circuit::path::{Candidate, PathRules, select_path};
use vx6_circuit::{CellBody, ClientCircuit, Reason, RelayMsg};
use vx6_net::channel::{Channel, ChannelConfig, CircuitRx, IncomingStream};
use vx6_net::pool::{Pool, StreamHandler};
use vx6_net::transport::{NetConfig, Transports};
use vx6_proto::identity::fill_random;
use vx6_proto::link::{CircId, Cmd, StreamId, code};
use vx6_proto::name::ServiceName;
use vx6_proto::record::{Capabilities, NodeRecord, Signed, TransportKind};
use vx6_proto::{NodeId, NodeKeypair};

use crate::cstream::StreamMux;
use crate::error::{NodeError, Result};
use crate::node::{Node, now};
use crate::relay::cell_body;

/// One hop's budget for CREATED / EXTENDED.
const HOP_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a failed relay stays out of new paths.
const RECENT_FAILURE: Duration = Duration::from_secs(120);
/// Default circuit length (relays before the owner).
pub const DEFAULT_HOPS: usize = 3;

/// The anonymous side of the node: a dial-only pool with a throwaway key.
pub struct AnonLinks {
    pool: Arc<Pool>,
    /// Relays that failed a circuit recently: left out of new paths while
    /// enough others remain (the persisted health only down-weights them).
    recent_failures: std::sync::Mutex<std::collections::HashMap<NodeId, Instant>>,
    pub circuits_built: AtomicU64,
    pub circuits_failed: AtomicU64,
    pub circuits_active: AtomicU64,
    pub last_setup_ms: AtomicU64,
}

/// Anonymous links carry only our own circuits: a peer may not open
/// anything on them.
struct RefuseAll;

impl StreamHandler for RefuseAll {
    fn handle(&self, _chan: Channel, mut stream: IncomingStream) {
        stream.send.reset(code::REFUSED);
    }
}

impl AnonLinks {
    pub async fn new(
        kinds: &[vx6_proto::record::TransportKind],
        chan_cfg: ChannelConfig,
    ) -> Result<Self> {
        let key = NodeKeypair::generate();
        let tr = Transports::bind(&key, &[], kinds, NetConfig::default()).await?;
        Ok(Self {
            pool: Pool::new(Arc::new(tr), chan_cfg, Arc::new(RefuseAll), 1024),
            recent_failures: std::sync::Mutex::new(std::collections::HashMap::new()),
            circuits_built: AtomicU64::new(0),
            circuits_failed: AtomicU64::new(0),
            circuits_active: AtomicU64::new(0),
            last_setup_ms: AtomicU64::new(0),
        })
    }

    pub fn close(&self) {
        self.pool.close();
    }

    pub fn status(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "built": l(&self.circuits_built),
            "failed": l(&self.circuits_failed),
            "active": l(&self.circuits_active),
            "last_setup_ms": l(&self.last_setup_ms),
        })
    }
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Relay candidates from the registry, with their measured health.
fn candidates(node: &Node) -> Vec<(Candidate, Signed<NodeRecord>)> {
    let health = node.inner().db.health().unwrap_or_default();
    crate::discovery::registry_records(node)
        .into_iter()
        .filter(|r| r.body.caps.has(Capabilities::RELAY))
        .map(|r| {
            let h = health
                .iter()
                .find(|(id, _)| *id == r.body.node)
                .map(|(_, h)| *h);
            let c = Candidate {
                id: r.body.node,
                addrs: r.body.endpoints.iter().map(|e| e.addr.ip()).collect(),
                successes: h.map_or(0, |h| h.successes),
                failures: h.map_or(0, |h| h.failures),
                rtt_ms: h.and_then(|h| (h.rtt_ms > 0).then_some(h.rtt_ms)),
            };
            (c, r)
        })
        .collect()
}

/// Records a relay's success or failure (and RTT) for path selection.
pub(crate) fn mark(node: &Node, id: &NodeId, ok: bool, rtt_ms: Option<u32>) {
    {
        let mut recent = node
            .inner()
            .anon
            .recent_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if ok {
            recent.remove(id);
        } else {
            recent.insert(*id, Instant::now());
        }
        recent.retain(|_, t| t.elapsed() < RECENT_FAILURE);
    }
    let db = &node.inner().db;
    let mut h = db
        .health()
        .unwrap_or_default()
        .into_iter()
        .find(|(n, _)| n == id)
        .map(|(_, h)| h)
        .unwrap_or_default();
    if ok {
        h.successes = h.successes.saturating_add(1);
        // A success after failures forgives them gradually.
        h.failures = h.failures.saturating_sub(1);
    } else {
        h.failures = h.failures.saturating_add(1);
    }
    if let Some(ms) = rtt_ms {
        h.rtt_ms = if h.rtt_ms == 0 {
            ms
        } else {
            (h.rtt_ms * 3 + ms) / 4
        };
    }
    h.last = now().0;
    let _ = db.put_health(id, &h);
}

/// A running client circuit that carries streams to services of its last hop.
#[derive(Clone)]
pub struct ClientCirc {
    tx: mpsc::Sender<Pending>,
    probe_tx: mpsc::Sender<Probe>,
    pub path: Arc<Vec<NodeId>>,
}

/// A PROBE for a service and where its answer goes.
type Probe = (ServiceName, tokio::sync::oneshot::Sender<bool>);

/// How long the owner's answer to a PROBE may take (one circuit round trip).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A local connection waiting to be carried: it is not read from until
/// the owner says CONNECTED, so if the circuit dies first nothing was lost
/// and the connection can be retried on a new circuit.
pub struct Pending {
    pub tcp: TcpStream,
    pub service: ServiceName,
    /// Circuits this connection was already offered to.
    pub tries: u8,
}

/// Where a dying circuit hands back connections it had not started.
pub type Orphans = mpsc::UnboundedSender<Pending>;

impl ClientCirc {
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Carries one local connection over the circuit; gives it back when
    /// the circuit is already gone.
    pub async fn open(&self, p: Pending) -> std::result::Result<(), Pending> {
        self.tx.send(p).await.map_err(|e| e.0)
    }

    /// Asks the owner whether it would accept a BEGIN for `service` (PROBE,
    /// PROTOCOL.md §9.5) without connecting to it. `None`: the circuit
    /// ended or the answer did not come in time.
    pub async fn probe(&self, service: ServiceName) -> Option<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.probe_tx.send((service, tx)).await.ok()?;
        tokio::time::timeout(PROBE_TIMEOUT, rx).await.ok()?.ok()
    }
}

/// Why a hop's answer did not come.
enum HopFailure {
    /// Nothing within the hop budget: the hop being reached is the suspect.
    Timeout,
    /// The first link closed, or a relay refused.
    Other(NodeError),
}

impl From<HopFailure> for NodeError {
    fn from(f: HopFailure) -> Self {
        match f {
            HopFailure::Timeout => NodeError::Unreachable("a relay did not answer in time".into()),
            HopFailure::Other(e) => e,
        }
    }
}

async fn recv_cell(rx: &mut CircuitRx) -> std::result::Result<Bytes, HopFailure> {
    match tokio::time::timeout(HOP_TIMEOUT, rx.recv()).await {
        Ok(Some(c)) if c.cmd == Cmd::Relay || c.cmd == Cmd::Created => Ok(c.payload),
        Ok(Some(_)) => Err(HopFailure::Other(NodeError::Unreachable(
            "a relay refused the circuit".into(),
        ))),
        Ok(None) => Err(HopFailure::Other(NodeError::Unreachable(
            "the first relay closed the link".into(),
        ))),
        Err(_) => Err(HopFailure::Timeout),
    }
}

/// Tears a half-built circuit down at the relays when building fails, so
/// they do not hold budget for it.
struct DestroyOnDrop {
    chan: Channel,
    circ: CircId,
    armed: bool,
}

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let (c, id) = (self.chan.clone(), self.circ);
            tokio::spawn(async move {
                let _ = c
                    .send_cell(
                        id,
                        Cmd::Destroy,
                        Bytes::copy_from_slice(&[Reason::Done.code()]),
                    )
                    .await;
            });
        }
    }
}

/// Builds a circuit through `hops` relays to `target` (the owner, last hop).
pub async fn build(
    node: &Node,
    target: &Signed<NodeRecord>,
    hops: usize,
    prefer: Option<TransportKind>,
    orphans: Orphans,
) -> Result<ClientCirc> {
    let inner = node.inner();
    let mut cands = candidates(node);
    if cands.len() < hops + 2 {
        // Too few relays known: ask our peers for fresh records first.
        crate::discovery::sync_now(node, 4).await;
        cands = candidates(node);
    }
    let own_addrs: Vec<IpAddr> = node
        .local_endpoints()
        .iter()
        .map(|e| e.addr.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    let mut avoid = own_addrs;
    avoid.extend(
        target
            .body
            .endpoints
            .iter()
            .map(|e| e.addr.ip())
            .filter(|ip| !ip.is_loopback()),
    );
    // On a single-machine (loopback) network every node shares a prefix;
    // diversity is then by node only.
    let all_loopback = cands
        .iter()
        .all(|(c, _)| c.addrs.iter().all(IpAddr::is_loopback));
    let (v6, v4) = {
        let cfg = inner.config.read().unwrap_or_else(|p| p.into_inner());
        (
            cfg.relay.path_prefix_v6.min(128),
            cfg.relay.path_prefix_v4.min(32),
        )
    };
    let rules = PathRules {
        prefix_len_v6: v6,
        prefix_len_v4: v4,
        diverse: !all_loopback,
    };
    let mut cs: Vec<Candidate> = cands.iter().map(|(c, _)| c.clone()).collect();
    {
        let recent = inner
            .anon
            .recent_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<Candidate> = cs
            .iter()
            .filter(|c| {
                recent
                    .get(&c.id)
                    .is_none_or(|t| t.elapsed() >= RECENT_FAILURE)
            })
            .cloned()
            .collect();
        let usable = fresh
            .iter()
            .filter(|c| c.id != inner.id && c.id != target.body.node)
            .count();
        // Leave them out only while enough others remain for a path.
        if usable > hops {
            cs = fresh;
        }
    }
    let path = select_path(
        &cs,
        &inner.id,
        &target.body.node,
        &avoid,
        hops,
        &rules,
        &mut random_unit,
    )
    .map_err(|e| NodeError::Unreachable(format!("cannot build a relay path: {e}")))?;
    let rec = |id: &NodeId| {
        cands
            .iter()
            .find(|(c, _)| c.id == *id)
            .map(|(_, r)| r.clone())
    };
    let started = Instant::now();
    let result = build_path(node, &path, &rec, target, prefer).await;
    let anon = &inner.anon;
    match result {
        Ok((chan, circ, rx, cc)) => {
            let ms = started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
            anon.circuits_built.fetch_add(1, Ordering::Relaxed);
            anon.last_setup_ms.store(u64::from(ms), Ordering::Relaxed);
            for id in &path {
                mark(node, id, true, Some(ms / (hops as u32 + 1).max(1)));
            }
            let (tx, cmd_rx) = mpsc::channel(64);
            let (probe_tx, probe_rx) = mpsc::channel(4);
            let mut full_path = path.clone();
            full_path.push(target.body.node);
            let handle = ClientCirc {
                tx,
                probe_tx,
                path: Arc::new(full_path),
            };
            tokio::spawn(run_client(
                node.clone(),
                chan,
                circ,
                rx,
                cc,
                (cmd_rx, probe_rx),
                path,
                orphans,
            ));
            Ok(handle)
        }
        Err((e, failed)) => {
            anon.circuits_failed.fetch_add(1, Ordering::Relaxed);
            if let Some(f) = failed {
                mark(node, &f, false, None);
            }
            Err(e)
        }
    }
}

type Built = (Channel, CircId, CircuitRx, ClientCircuit);

/// Telescopes through `path` then the target. On failure, says which relay
/// to blame (the first hop that did not extend).
async fn build_path(
    node: &Node,
    path: &[NodeId],
    rec: &impl Fn(&NodeId) -> Option<Signed<NodeRecord>>,
    target: &Signed<NodeRecord>,
    prefer: Option<TransportKind>,
) -> std::result::Result<Built, (NodeError, Option<NodeId>)> {
    let inner = node.inner();
    let first = *path
        .first()
        .ok_or((NodeError::Invalid("empty path".into()), None))?;
    let first_rec = rec(&first).ok_or((
        NodeError::NotFound("relay record vanished".into()),
        Some(first),
    ))?;
    let mut eps = first_rec.body.endpoints.clone();
    crate::discovery::sort_endpoints(&mut eps, prefer);
    // Relays extend over the transport the circuit arrived on, so the first
    // link's transport is the circuit's.
    if let Some(t) = prefer
        && eps.iter().any(|e| e.transport == t)
    {
        eps.retain(|e| e.transport == t);
    }
    let chan = inner
        .anon
        .pool
        .connect(first, &eps)
        .await
        .map_err(|e| (NodeError::from(e), Some(first)))?;
    let (circ, mut rx) = chan.new_circuit().map_err(|e| (e.into(), Some(first)))?;
    let mut guard = DestroyOnDrop {
        chan: chan.clone(),
        circ,
        armed: true,
    };
    let mut rng = fill_random;
    let (pending, create) = ClientCircuit::begin_create(first, &first_rec.body.onion_key, &mut rng);
    chan.send_cell(circ, Cmd::Create, Bytes::copy_from_slice(&create.encode()))
        .await
        .map_err(|e| (e.into(), Some(first)))?;
    let created = recv_cell(&mut rx)
        .await
        .map_err(|e| (e.into(), Some(first)))?;
    let created = vx6_circuit::Created::decode(&created)
        .map_err(|_| (NodeError::Refused("bad CREATED".into()), Some(first)))?;
    let mut cc = pending.complete(&created).map_err(|_| {
        (
            NodeError::Refused("relay handshake failed".into()),
            Some(first),
        )
    })?;
    let mut hops: Vec<(NodeId, vx6_proto::id::OnionKey)> = Vec::new();
    for id in path.iter().skip(1) {
        let r = rec(id).ok_or((
            NodeError::NotFound("relay record vanished".into()),
            Some(*id),
        ))?;
        hops.push((*id, r.body.onion_key));
    }
    hops.push((target.body.node, target.body.onion_key));
    for (i, (id, key)) in hops.iter().enumerate() {
        // Blame the hop that was asked to extend if the extension fails.
        let blame = if i == 0 { first } else { hops[i - 1].0 };
        let body = cc
            .extend_to(*id, key, &mut rng)
            .map_err(|_| (NodeError::Invalid("extend".into()), None))?;
        chan.send_cell(circ, Cmd::Relay, Bytes::from(body.into_vec()))
            .await
            .map_err(|e| (e.into(), Some(first)))?;
        // A hop that does not answer in time is most likely the one being
        // reached (the relays before it answered a moment ago).
        let suspect = if *id == target.body.node { blame } else { *id };
        let reply = recv_cell(&mut rx).await.map_err(|e| match e {
            HopFailure::Timeout => (HopFailure::Timeout.into(), Some(suspect)),
            other => (other.into(), Some(blame)),
        })?;
        let body =
            cell_body(reply).map_err(|_| (NodeError::Refused("bad cell".into()), Some(blame)))?;
        match cc.open(body) {
            Ok((_, RelayMsg::Extended(_))) => {}
            Ok((_, RelayMsg::Truncated { reason })) => {
                let who = if *id == target.body.node { blame } else { *id };
                return Err((
                    NodeError::Unreachable(format!(
                        "a relay could not extend the circuit ({reason:?})"
                    )),
                    Some(who),
                ));
            }
            _ => {
                return Err((
                    NodeError::Refused("unexpected answer while extending".into()),
                    Some(blame),
                ));
            }
        }
    }
    guard.armed = false;
    Ok((chan, circ, rx, cc))
}

#[allow(clippy::too_many_arguments)] // one circuit task owns all of these
async fn run_client(
    node: Node,
    chan: Channel,
    circ: CircId,
    mut rx: CircuitRx,
    mut cc: ClientCircuit,
    (mut cmd_rx, mut probe_rx): (mpsc::Receiver<Pending>, mpsc::Receiver<Probe>),
    relays: Vec<NodeId>,
    orphans: Orphans,
) {
    // PROBEDs come back in the order the PROBEs went (one owner, one
    // ordered circuit); at most the probe queue's capacity are in flight.
    let mut probes: std::collections::VecDeque<tokio::sync::oneshot::Sender<bool>> =
        std::collections::VecDeque::new();
    let mut waiting: std::collections::HashMap<StreamId, Pending> =
        std::collections::HashMap::new();
    let anon = &node.inner().anon;
    anon.circuits_active.fetch_add(1, Ordering::Relaxed);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut mux = StreamMux::new(ev_tx);
    let mut next_stream = 1u32;
    let owner = cc.last_hop();
    let seal_send =
        |cc: &mut ClientCircuit, m: RelayMsg| -> Option<CellBody> { cc.seal(owner, &m).ok() };
    loop {
        let mut out: Vec<RelayMsg> = Vec::new();
        tokio::select! {
            cell = rx.recv() => {
                let Some(cell) = cell else {
                    // The first relay's link went away.
                    if let Some(r) = relays.first() { mark(&node, r, false, None); }
                    break;
                };
                if cell.cmd != Cmd::Relay {
                    break;
                }
                let Ok(body) = cell_body(cell.payload) else { break };
                match cc.open(body) {
                    Ok((hop, msg)) => match msg {
                        RelayMsg::Truncated { .. } => {
                            // The hop after `hop` died: blame it.
                            if let Some(dead) = relays.get(hop.index() + 1) { mark(&node, dead, false, None); }
                            break;
                        }
                        RelayMsg::Connected { stream } => {
                            if let Some(p) = waiting.remove(&stream) {
                                mux.attach(stream, p.tcp);
                            }
                        }
                        RelayMsg::End { stream, .. } if waiting.contains_key(&stream) => {
                            // Refused at the owner: the local client sees a reset.
                            if let Some(p) = waiting.remove(&stream) {
                                let _ = p.tcp.set_zero_linger();
                            }
                        }
                        RelayMsg::Drop => {}
                        RelayMsg::Probed { offered } if hop == owner => {
                            let Some(answer) = probes.pop_front() else { break };
                            let _ = answer.send(offered);
                        }
                        m if hop == owner => match mux.on_msg(m) {
                            Ok(replies) => out = replies,
                            Err(_) => break,
                        },
                        _ => break,
                    },
                    Err(_) => break,
                }
            }
            cmd = cmd_rx.recv() => {
                let Some(p) = cmd else { break };
                let stream = StreamId(next_stream);
                next_stream = next_stream.wrapping_add(1).max(1);
                out.push(RelayMsg::Begin { stream, service: p.service.clone() });
                waiting.insert(stream, p);
            }
            Some((service, answer)) = probe_rx.recv(), if probes.len() < 4 => {
                out.push(RelayMsg::Probe { service });
                probes.push_back(answer);
            }
            Some(ev) = ev_rx.recv() => match mux.on_event(ev) {
                Ok(msgs) => out = msgs,
                Err(_) => break,
            },
        }
        let mut ok = true;
        for m in out {
            match seal_send(&mut cc, m) {
                Some(b) => {
                    ok &= chan
                        .send_cell(circ, Cmd::Relay, Bytes::from(b.into_vec()))
                        .await
                        .is_ok()
                }
                None => ok = false,
            }
        }
        if !ok {
            break;
        }
    }
    let _ = chan
        .send_cell(
            circ,
            Cmd::Destroy,
            Bytes::copy_from_slice(&[Reason::Done.code()]),
        )
        .await;
    anon.circuits_active.fetch_sub(1, Ordering::Relaxed);
    // Connections the owner never accepted were not read from: hand them
    // back for a new circuit. So do connections still queued for us.
    cmd_rx.close();
    while let Ok(p) = cmd_rx.try_recv() {
        let _ = orphans.send(p);
    }
    for (_, p) in waiting.drain() {
        let _ = orphans.send(p);
    }
}
