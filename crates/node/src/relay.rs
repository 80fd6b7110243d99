//! The relay side of circuits: every node is a hop for circuits others
//! build through it, and the last hop (the owner) for circuits that end at
//! its services.
//!
//! Owns one task per circuit that strips or adds exactly one onion layer
//! ([`vx6_circuit::RelayHop`]) and moves cells between the previous and next
//! channels, the EXTEND policy (default-deny: the next hop must be a node
//! whose signed record this node holds, dialed at the endpoints in that
//! record with its expected id — never an address a client supplied, never
//! this node's own localhost), the relay budget, and BEGIN at the owner
//! (only declared public services; a refusal never connects anywhere).
//! Replies carry one-byte reasons, never local error text.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use vx6_circuit::{CellBody, Create, Created, Forward, NextHop, Reason, RelayHop, RelayMsg};
use vx6_net::channel::{Channel, CircuitRx, IncomingCircuit};
use vx6_proto::NodeId;
use vx6_proto::identity::fill_random;
use vx6_proto::link::{CircId, Cmd};
use vx6_proto::name::ServiceName;

use crate::cstream::StreamMux;
use crate::node::Node;

/// How long an EXTEND may take (dial + CREATE/CREATED).
const EXTEND_TIMEOUT: Duration = Duration::from_secs(7);
/// How long the owner waits for its localhost target.
const BEGIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Circuits (any kind) one node carries at most: a hard ceiling above the
/// transit budget, so CREATE floods cannot exhaust memory.
const MAX_CIRCUITS_FACTOR: usize = 4;

/// Relay counters and the transit budget.
pub struct RelayState {
    transit: Arc<Semaphore>,
    all: Arc<Semaphore>,
    max_transit: usize,
    pub circuits_total: AtomicU64,
    pub extends_ok: AtomicU64,
    pub refused_budget: AtomicU64,
    pub refused_policy: AtomicU64,
    pub refused_unreachable: AtomicU64,
    pub begins_ok: AtomicU64,
    pub begins_refused: AtomicU64,
    pub torn_down_protocol: AtomicU64,
    pub transit_bytes: AtomicU64,
    pub refused_bandwidth: AtomicU64,
    pub refused_unverified: AtomicU64,
    /// (when, own bytes, transit bytes) at the start of the current window.
    window: std::sync::Mutex<(std::time::Instant, u64, u64)>,
    /// Transit share of the last complete window, in thousandths.
    last_share: AtomicU64,
    /// Woken when a relay's record is first learnt, so this node meets it
    /// now rather than at the next periodic round (discovery.rs).
    pub(crate) meet_soon: tokio::sync::Notify,
}

impl RelayState {
    pub fn new(max_transit: usize) -> Self {
        Self {
            transit: Arc::new(Semaphore::new(max_transit)),
            all: Arc::new(Semaphore::new(
                max_transit.saturating_mul(MAX_CIRCUITS_FACTOR).max(64),
            )),
            max_transit,
            circuits_total: AtomicU64::new(0),
            extends_ok: AtomicU64::new(0),
            refused_budget: AtomicU64::new(0),
            refused_policy: AtomicU64::new(0),
            refused_unreachable: AtomicU64::new(0),
            begins_ok: AtomicU64::new(0),
            begins_refused: AtomicU64::new(0),
            torn_down_protocol: AtomicU64::new(0),
            transit_bytes: AtomicU64::new(0),
            refused_bandwidth: AtomicU64::new(0),
            refused_unverified: AtomicU64::new(0),
            window: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
            last_share: AtomicU64::new(0),
            meet_soon: tokio::sync::Notify::new(),
        }
    }

    /// Whether transit traffic took more than `max_share` of what this node
    /// moved over the last window (about a second) while its own traffic
    /// was flowing. With no own traffic, transit may use everything.
    pub fn over_bandwidth_share(&self, own_total: u64, max_share: f64) -> bool {
        let transit_total = self.transit_bytes.load(Ordering::Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.elapsed() >= Duration::from_secs(1) {
            let own = own_total.saturating_sub(w.1);
            let transit = transit_total.saturating_sub(w.2);
            let share = if own == 0 {
                0
            } else {
                transit.saturating_mul(1000) / (own + transit).max(1)
            };
            self.last_share.store(share, Ordering::Relaxed);
            *w = (std::time::Instant::now(), own_total, transit_total);
        }
        let share = self.last_share.load(Ordering::Relaxed);
        share as f64 / 1000.0 > max_share.clamp(0.0, 1.0)
    }

    /// Transit circuits (with a next hop) carried now.
    pub fn transit_active(&self) -> usize {
        self.max_transit
            .saturating_sub(self.transit.available_permits())
    }

    pub fn status(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "transit_active": self.transit_active(),
            "transit_budget": self.max_transit,
            "circuits_total": l(&self.circuits_total),
            "extends_ok": l(&self.extends_ok),
            "refused_budget": l(&self.refused_budget),
            "refused_policy": l(&self.refused_policy),
            "refused_unreachable": l(&self.refused_unreachable),
            "begins_ok": l(&self.begins_ok),
            "begins_refused": l(&self.begins_refused),
            "torn_down_protocol": l(&self.torn_down_protocol),
            "transit_bytes": l(&self.transit_bytes),
            "refused_bandwidth": l(&self.refused_bandwidth),
            "refused_unverified": l(&self.refused_unverified),
            "transit_share_permille": l(&self.last_share),
        })
    }
}

/// Test hook (PROTOCOL-circuit tests): with `VX6_TEST_RELAY_TAP=DIR`, every
/// relay appends each cell body it handles to `DIR/cells.bin` and the ids of
/// each circuit's neighbours to `DIR/views.txt`. Off unless the variable is
/// set when the daemon starts; never for production use.
fn tap_dir() -> Option<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("VX6_TEST_RELAY_TAP").map(Into::into))
        .as_deref()
}

fn tap_append(file: &str, what: &[u8]) {
    if let Some(dir) = tap_dir() {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(file))
        {
            let _ = f.write_all(what);
        }
    }
}

fn tap(what: &[u8]) {
    tap_append("cells.bin", what);
}

/// Cells a circuit forwards before its view is tapped: more than building
/// it takes, so a half-built circuit that was given up is not reported.
const TAP_VIEW_AFTER: u32 = 12;

fn tap_view(prev: &NodeId, next: &NodeId) {
    tap_append("views.txt", format!("prev={prev} next={next}\n").as_bytes());
}

/// A peer created a circuit to us: run it.
pub(crate) fn accept(node: Node, chan: Channel, inc: IncomingCircuit) {
    tokio::spawn(async move {
        let circ = inc.circ;
        let Ok(slot) = node.inner().relay.all.clone().try_acquire_owned() else {
            node.inner()
                .relay
                .refused_budget
                .fetch_add(1, Ordering::Relaxed);
            destroy(&chan, circ, Reason::Busy).await;
            return;
        };
        node.inner()
            .relay
            .circuits_total
            .fetch_add(1, Ordering::Relaxed);
        run_hop(node, chan, inc).await;
        drop(slot);
    });
}

struct Next {
    chan: Channel,
    circ: CircId,
    rx: CircuitRx,
    _permit: OwnedSemaphorePermit,
}

/// A RELAY payload as a cell body. The channel hands each payload over in
/// its own allocation, so this takes it without copying.
pub(crate) fn cell_body(payload: Bytes) -> Result<CellBody, vx6_circuit::CircuitError> {
    CellBody::from_vec(Vec::from(payload))
}

async fn send_relay(chan: &Channel, circ: CircId, body: CellBody) -> bool {
    chan.send_cell(circ, Cmd::Relay, Bytes::from(body.into_vec()))
        .await
        .is_ok()
}

async fn destroy(chan: &Channel, circ: CircId, reason: Reason) {
    let _ = chan
        .send_cell(circ, Cmd::Destroy, Bytes::copy_from_slice(&[reason.code()]))
        .await;
}

async fn recv_next(next: &mut Option<Next>) -> Option<vx6_net::channel::CircuitCell> {
    match next {
        Some(n) => n.rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn run_hop(node: Node, prev: Channel, inc: IncomingCircuit) {
    let IncomingCircuit {
        circ: pcirc,
        create,
        rx: mut prx,
    } = inc;
    let inner = node.inner().clone();
    let Ok(create) = Create::decode(&create) else {
        destroy(&prev, pcirc, Reason::Protocol).await;
        return;
    };
    let mut rng = fill_random;
    let Ok((mut hop, created)) =
        RelayHop::handle_create(inner.onion_secret(), &inner.id, &create, &mut rng)
    else {
        inner
            .relay
            .torn_down_protocol
            .fetch_add(1, Ordering::Relaxed);
        destroy(&prev, pcirc, Reason::Protocol).await;
        return;
    };
    if prev
        .send_cell(
            pcirc,
            Cmd::Created,
            Bytes::copy_from_slice(&created.encode()),
        )
        .await
        .is_err()
    {
        return;
    }
    let mut next: Option<Next> = None;
    let mut forwarded = 0u32;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut mux = StreamMux::new(ev_tx);
    let end_reason;
    loop {
        tokio::select! {
            cell = prx.recv() => {
                let Some(cell) = cell else { end_reason = Reason::LinkClosed; break };
                match cell.cmd {
                    Cmd::Relay => {
                        tap(&cell.payload);
                        let len = cell.payload.len() as u64;
                        let Ok(body) = cell_body(cell.payload) else {
                            end_reason = Reason::Protocol;
                            break;
                        };
                        match hop.handle_forward(body) {
                            Ok(Forward::Next(b)) => {
                                if let Some(n) = &next {
                                    forwarded += 1;
                                    if forwarded == TAP_VIEW_AFTER {
                                        tap_view(&prev.peer(), &n.chan.peer());
                                    }
                                    inner.relay.transit_bytes.fetch_add(len, Ordering::Relaxed);
                                    if !send_relay(&n.chan, n.circ, b).await {
                                        end_reason = Reason::LinkClosed;
                                        break;
                                    }
                                }
                            }
                            Ok(Forward::ForMe(msg)) => {
                                let replies = for_me(&node, &prev, &mut hop, &mut next, &mut mux, msg).await;
                                match replies {
                                    Ok(bodies) => {
                                        let mut ok = true;
                                        for b in bodies {
                                            ok &= send_relay(&prev, pcirc, b).await;
                                        }
                                        if !ok {
                                            end_reason = Reason::LinkClosed;
                                            break;
                                        }
                                    }
                                    Err(r) => {
                                        end_reason = r;
                                        break;
                                    }
                                }
                            }
                            Err(_) => {
                                inner.relay.torn_down_protocol.fetch_add(1, Ordering::Relaxed);
                                end_reason = Reason::Protocol;
                                break;
                            }
                        }
                    }
                    Cmd::Destroy => {
                        end_reason = Reason::Done;
                        break;
                    }
                    _ => {
                        end_reason = Reason::Protocol;
                        break;
                    }
                }
            }
            cell = recv_next(&mut next) => {
                let ok = match cell {
                    Some(c) if c.cmd == Cmd::Relay => {
                        tap(&c.payload);
                        inner.relay.transit_bytes.fetch_add(c.payload.len() as u64, Ordering::Relaxed);
                        match cell_body(c.payload).map_err(|_| ()).and_then(|b| hop.handle_backward(b).map_err(|_| ())) {
                            Ok(b) => send_relay(&prev, pcirc, b).await,
                            Err(()) => false,
                        }
                    }
                    other => {
                        // The next hop is gone: tell the client, keep the rest.
                        let reason = match other {
                            Some(c) if c.cmd == Cmd::Destroy => c.payload.first().and_then(|b| Reason::from_code(*b).ok()).unwrap_or(Reason::LinkClosed),
                            _ => Reason::LinkClosed,
                        };
                        next = None;
                        match hop.drop_next_hop(reason) {
                            Ok(b) => send_relay(&prev, pcirc, b).await,
                            Err(_) => false,
                        }
                    }
                };
                if !ok {
                    end_reason = Reason::LinkClosed;
                    break;
                }
            }
            Some(ev) = ev_rx.recv() => {
                let mut ok = true;
                match mux.on_event(ev) {
                    Ok(msgs) => {
                        for m in msgs {
                            match hop.originate(&m) {
                                Ok(b) => ok &= send_relay(&prev, pcirc, b).await,
                                Err(_) => ok = false,
                            }
                        }
                    }
                    Err(_) => ok = false,
                }
                if !ok {
                    end_reason = Reason::Protocol;
                    break;
                }
            }
        }
    }
    hop.tear_down();
    if let Some(n) = next.take() {
        destroy(&n.chan, n.circ, end_reason).await;
    }
    if end_reason != Reason::Done {
        destroy(&prev, pcirc, end_reason).await;
    }
}

/// Handles a message for this hop; returns the bodies to send back.
async fn for_me(
    node: &Node,
    prev: &Channel,
    hop: &mut RelayHop,
    next: &mut Option<Next>,
    mux: &mut StreamMux,
    msg: RelayMsg,
) -> Result<Vec<CellBody>, Reason> {
    let inner = node.inner();
    let originate =
        |hop: &mut RelayHop, m: RelayMsg| hop.originate(&m).map_err(|_| Reason::Protocol);
    match msg {
        RelayMsg::Extend { next: to, create } => {
            let reply = match extend(node, prev, to, &create).await {
                Ok((n, created)) => {
                    inner.relay.extends_ok.fetch_add(1, Ordering::Relaxed);
                    *next = Some(n);
                    hop.extend_succeeded(&created)
                }
                Err(reason) => hop.drop_next_hop(reason),
            };
            Ok(vec![reply.map_err(|_| Reason::Protocol)?])
        }
        RelayMsg::Begin { stream, service } => {
            let refuse = |hop: &mut RelayHop| {
                originate(
                    hop,
                    RelayMsg::End {
                        stream,
                        reason: Reason::Refused,
                    },
                )
            };
            let max_streams = inner
                .config
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .relay
                .max_circuit_streams as usize;
            // BEGIN is not flow-controlled: without a cap, one circuit could
            // open connections to the service until file descriptors ran out.
            if mux.contains(stream) || mux.len() >= max_streams {
                inner.relay.begins_refused.fetch_add(1, Ordering::Relaxed);
                return Ok(vec![refuse(hop)?]);
            }
            let Some(target) = anonymous_target(node, hop, &service) else {
                inner.relay.begins_refused.fetch_add(1, Ordering::Relaxed);
                return Ok(vec![refuse(hop)?]);
            };
            match tokio::time::timeout(BEGIN_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(tcp)) => {
                    inner.relay.begins_ok.fetch_add(1, Ordering::Relaxed);
                    mux.attach(stream, tcp);
                    Ok(vec![originate(hop, RelayMsg::Connected { stream })?])
                }
                _ => Ok(vec![originate(
                    hop,
                    RelayMsg::End {
                        stream,
                        reason: Reason::TargetFailed,
                    },
                )?]),
            }
        }
        RelayMsg::Truncate => {
            if let Some(n) = next.take() {
                destroy(&n.chan, n.circ, Reason::Done).await;
            }
            Ok(vec![
                hop.drop_next_hop(Reason::Done)
                    .map_err(|_| Reason::Protocol)?,
            ])
        }
        RelayMsg::Probe { service } => {
            // The same answer a BEGIN would get, without touching the service.
            let offered = anonymous_target(node, hop, &service).is_some();
            Ok(vec![originate(hop, RelayMsg::Probed { offered })?])
        }
        RelayMsg::Drop => Ok(Vec::new()),
        m @ (RelayMsg::Data { .. } | RelayMsg::End { .. } | RelayMsg::Sendme(_)) => {
            let replies = mux.on_msg(m).map_err(|_| Reason::Protocol)?;
            replies.into_iter().map(|r| originate(hop, r)).collect()
        }
        // Backward-only messages never arrive forward.
        _ => Err(Reason::Protocol),
    }
}

/// Where a BEGIN for `service` from an anonymous client may connect: only at
/// the last hop, only to a public service with no allow list (the client
/// has no identity to check), and only to loopback unless the owner allowed
/// a remote target.
fn anonymous_target(node: &Node, hop: &RelayHop, service: &ServiceName) -> Option<SocketAddr> {
    if hop.next_hop() != NextHop::None {
        return None;
    }
    node.services()
        .into_iter()
        .find(|s| &s.name == service)
        .filter(|s| {
            !s.private
                && s.allow.is_empty()
                && (s.target.ip().is_loopback() || s.allow_remote_target)
        })
        .map(|s| s.target)
}

/// Extends to `to` for a client. Reasons only, never error text.
async fn extend(
    node: &Node,
    prev: &Channel,
    to: NodeId,
    create: &Create,
) -> Result<(Next, Created), Reason> {
    let inner = node.inner();
    let (relay_on, max_share) = {
        let cfg = inner.config.read().unwrap_or_else(|p| p.into_inner());
        (cfg.relay.enabled, cfg.relay.max_transit_share)
    };
    if !relay_on || to == inner.id || to == prev.peer() {
        inner.relay.refused_policy.fetch_add(1, Ordering::Relaxed);
        return Err(Reason::Refused);
    }
    if inner
        .relay
        .over_bandwidth_share(inner.own_bytes.load(Ordering::Relaxed), max_share)
    {
        inner
            .relay
            .refused_bandwidth
            .fetch_add(1, Ordering::Relaxed);
        return Err(Reason::Busy);
    }
    let Ok(permit) = inner.relay.transit.clone().try_acquire_owned() else {
        inner.relay.refused_budget.fetch_add(1, Ordering::Relaxed);
        return Err(Reason::Busy);
    };
    // Default-deny: only a node whose signed record we hold, at the
    // endpoints that record lists.
    let rec = match crate::discovery::registry_record(node, &to) {
        Some(r) => Some(r),
        None => crate::dht::lookup_node(node, &to).await,
    };
    let Some(rec) = rec else {
        inner
            .relay
            .refused_unreachable
            .fetch_add(1, Ordering::Relaxed);
        return Err(Reason::Unreachable);
    };
    // Opening a connection for a client is allowed only to an address this
    // node has itself seen that node prove its key from (a signed record can
    // list anyone's address), unless a live channel to it exists (nothing
    // new is opened then). A node never met is not extended to.
    let live = node.pool().get(&to).is_some();
    let mut eps =
        crate::discovery::usable_endpoints(node, &to, &rec.body.endpoints, Some(prev.transport()));
    if !live {
        if inner.seen_at(&to).is_empty() {
            eps.clear();
        }
        if eps.is_empty() {
            inner
                .relay
                .refused_unverified
                .fetch_add(1, Ordering::Relaxed);
            return Err(Reason::Unreachable);
        }
    }
    // The circuit keeps the transport it arrived on where the next hop has it.
    if eps.iter().any(|e| e.transport == prev.transport()) {
        eps.retain(|e| e.transport == prev.transport());
    }
    let attempt = async {
        let chan = node
            .pool()
            .connect(to, &eps)
            .await
            .map_err(|_| Reason::Unreachable)?;
        let (circ, mut rx) = chan.new_circuit().map_err(|_| Reason::Unreachable)?;
        chan.send_cell(circ, Cmd::Create, Bytes::copy_from_slice(&create.encode()))
            .await
            .map_err(|_| Reason::Unreachable)?;
        let cell = rx.recv().await.ok_or(Reason::LinkClosed)?;
        if cell.cmd != Cmd::Created {
            return Err(Reason::Refused);
        }
        let created = Created::decode(&cell.payload).map_err(|_| Reason::Protocol)?;
        Ok((
            Next {
                chan,
                circ,
                rx,
                _permit: permit,
            },
            created,
        ))
    };
    match tokio::time::timeout(EXTEND_TIMEOUT, attempt).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(reason)) => {
            inner
                .relay
                .refused_unreachable
                .fetch_add(1, Ordering::Relaxed);
            Err(reason)
        }
        Err(_) => {
            inner
                .relay
                .refused_unreachable
                .fetch_add(1, Ordering::Relaxed);
            Err(Reason::Unreachable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transit_share_is_measured_against_own_traffic() {
        let r = RelayState::new(4);
        assert!(!r.over_bandwidth_share(0, 0.5));
        // Only transit, no own traffic: transit may use everything.
        r.transit_bytes.store(10_000, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1050));
        assert!(!r.over_bandwidth_share(0, 0.5));
        // Own 1000 bytes, transit 3000 in the next window: 75 % > 50 %.
        r.transit_bytes.store(13_000, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(1050));
        assert!(r.over_bandwidth_share(1_000, 0.5));
        assert!(
            !r.over_bandwidth_share(1_000, 0.8),
            "the same share is within an 80 % budget"
        );
    }

    #[test]
    fn transit_budget_counts_permits() {
        let r = RelayState::new(2);
        let a = r.transit.clone().try_acquire_owned().unwrap();
        let _b = r.transit.clone().try_acquire_owned().unwrap();
        assert_eq!(r.transit_active(), 2);
        assert!(r.transit.clone().try_acquire_owned().is_err());
        drop(a);
        assert_eq!(r.transit_active(), 1);
    }
}
