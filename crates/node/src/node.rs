//! The running node: the daemon's state and the embeddable SDK entry point.
//!
//! [`Node::start`] takes a home, proves it is the only daemon there (lock),
//! loads identity, config and registry, binds the transports, and starts the
//! accept loop and the control API. Streams peers open are dispatched by
//! their [`Purpose`]: service connections go to [`Node::serve_service`],
//! which forwards only to declared services and only to allowed clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use vx6_net::NetError;
use vx6_net::channel::{Channel, ChannelConfig, IncomingStream};
use vx6_net::pool::{Pool, StreamHandler};
use vx6_net::transport::{Expect, NetConfig, Transports};
use vx6_proto::id::OnionKey;
use vx6_proto::link::code;
use vx6_proto::name::ServiceName;
use vx6_proto::nodemsg::{self, Purpose, RecordList, SERVICE_ACCEPTED};
use vx6_proto::record::{
    Endpoint, NameClaim, NodeRecord, RecordBody, ServiceRecord, Signed, TransportKind, Visibility,
};
use vx6_proto::{NodeId, NodeKeypair, UnixTime};

use crate::config::{self, Config};
use crate::control::{self, ConnectSpec, Request, Response};
use crate::db::Db;
use crate::error::{NodeError, Result};
use crate::forward;
use crate::home::{DaemonLock, Home};

/// How long the owner waits for its localhost target to accept.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an RPC to a peer may take.
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of service records handed out in catalogs.
const SERVICE_RECORD_LIFETIME: u64 = 3600;
/// How long `vx6 connect` waits for the owner's catalog: a live owner
/// answers in a round trip; a silent one must fail the command quickly.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(4);
/// Handshake budget for dials: generous for slow links, short enough that
/// an unreachable owner fails a command in seconds.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The current time as protocol time.
pub fn now() -> UnixTime {
    UnixTime(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// A declared service, parsed from services.toml.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: ServiceName,
    pub target: SocketAddr,
    pub private: bool,
    pub allow: Vec<NodeId>,
    pub allow_remote_target: bool,
}

impl Service {
    /// Whether `client` may learn of and use this service.
    pub fn visible_to(&self, client: &NodeId) -> bool {
        if self.allow.is_empty() {
            !self.private
        } else {
            self.allow.contains(client)
        }
    }
}

/// Node-wide counters shown in status.
#[derive(Default, Debug)]
pub struct Counters {
    pub service_streams: AtomicU64,
    pub service_refused: AtomicU64,
    pub service_not_allowed: AtomicU64,
    pub target_failed: AtomicU64,
    pub forward_connections: AtomicU64,
    pub forward_failures: AtomicU64,
    pub bad_requests: AtomicU64,
    pub records_accepted: AtomicU64,
    pub records_rejected: AtomicU64,
    pub records_stale: AtomicU64,
}

struct ForwardEntry {
    listen: SocketAddr,
    describe: String,
    owner: NodeId,
    /// Control connection that owns it; `None` when detached.
    conn: Option<u64>,
    task: tokio::task::AbortHandle,
    connections: Arc<AtomicU64>,
}

pub(crate) struct Inner {
    pub(crate) home: Home,
    pub(crate) key: NodeKeypair,
    pub(crate) id: NodeId,
    pub(crate) config: RwLock<Config>,
    services: RwLock<HashMap<ServiceName, Service>>,
    pub(crate) db: Db,
    pub(crate) pool: Arc<Pool>,
    forwards: Mutex<HashMap<u64, ForwardEntry>>,
    next_forward: AtomicU64,
    started: Instant,
    shutdown: watch::Sender<bool>,
    pub(crate) counters: Counters,
    own: RwLock<Option<(Signed<NodeRecord>, Signed<NameClaim>)>>,
    onion_secret: x25519_dalek::StaticSecret,
    pub(crate) dht: crate::dht::DhtState,
    pub(crate) relay: crate::relay::RelayState,
    pub(crate) anon: crate::circuits::AnonLinks,
    /// What every channel of this node (its own and its anonymous ones)
    /// counts: bytes, refused streams, protocol errors, overflowed circuits.
    pub(crate) links: Arc<vx6_net::channel::ChannelStats>,
    /// The memory all of this node's circuit queues share.
    pub(crate) cell_memory: Arc<vx6_net::channel::CellMemory>,
    /// Addresses each node has been seen at over an authenticated channel
    /// (either direction): the only addresses this node dials for it.
    seen_at: Mutex<HashMap<NodeId, Vec<std::net::IpAddr>>>,
    /// Bytes of this node's own forwarded traffic (for the transit share).
    pub(crate) own_bytes: Arc<AtomicU64>,
    _lock: DaemonLock,
}

impl Inner {
    /// This node's current signed NodeRecord, once signed.
    pub(crate) fn own_record(&self) -> Option<Signed<NodeRecord>> {
        self.own
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(r, _)| r.clone())
    }
    pub(crate) fn own_claim(&self) -> Option<Signed<NameClaim>> {
        self.own
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, c)| c.clone())
    }
    pub(crate) fn set_own_records(&self, rec: Signed<NodeRecord>, claim: Signed<NameClaim>) {
        *self.own.write().unwrap_or_else(|p| p.into_inner()) = Some((rec, claim));
    }
    /// Remembers that `node` proved its key from `ip`.
    pub(crate) fn mark_seen(&self, node: NodeId, ip: std::net::IpAddr) {
        let mut m = lock(&self.seen_at);
        // Bounded: forgetting only costs a refused extension until the next contact.
        if m.len() >= 100_000 {
            m.clear();
        }
        let ips = m.entry(node).or_default();
        if !ips.contains(&ip) {
            if ips.len() >= 8 {
                ips.remove(0);
            }
            ips.push(ip);
        }
    }
    /// How many nodes this node has been in contact with.
    pub(crate) fn seen_count(&self) -> usize {
        lock(&self.seen_at).len()
    }
    /// The addresses `node` was seen at (empty: never in contact).
    pub(crate) fn seen_at(&self, node: &NodeId) -> Vec<std::net::IpAddr> {
        lock(&self.seen_at).get(node).cloned().unwrap_or_default()
    }
    pub(crate) fn onion_secret(&self) -> &x25519_dalek::StaticSecret {
        &self.onion_secret
    }
    pub(crate) fn onion_public(&self) -> OnionKey {
        OnionKey(x25519_dalek::PublicKey::from(&self.onion_secret).to_bytes())
    }
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Dispatch(Weak<Inner>);

impl StreamHandler for Dispatch {
    fn handle(&self, chan: Channel, stream: IncomingStream) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        tokio::spawn(async move { Node { inner }.handle_stream(chan, stream).await });
    }
    fn channel_up(&self, chan: &Channel) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        inner.mark_seen(chan.peer(), chan.remote().ip());
        tokio::spawn(crate::discovery::sync_with(Node { inner }, chan.clone()));
    }
    fn circuit(&self, chan: Channel, circuit: vx6_net::channel::IncomingCircuit) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        crate::relay::accept(Node { inner }, chan, circuit);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_services(home: &Home) -> Result<HashMap<ServiceName, Service>> {
    let file = config::load_services(home)?;
    let mut out = HashMap::new();
    for (name, e) in file.service {
        let name = ServiceName::new(&name).map_err(|err| {
            NodeError::Invalid(format!(
                "{}: service '{name}': {err}",
                home.services_path().display()
            ))
        })?;
        let mut allow = Vec::new();
        for a in &e.allow {
            allow.push(a.parse::<NodeId>().map_err(|err| {
                NodeError::Invalid(format!(
                    "{}: service '{name}': allow entry '{a}': {err}",
                    home.services_path().display()
                ))
            })?);
        }
        out.insert(
            name.clone(),
            Service {
                name,
                target: e.target,
                private: e.private,
                allow,
                allow_remote_target: e.allow_remote_target,
            },
        );
    }
    Ok(out)
}

/// Parses `[v6]:port` or `v4:port`.
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr> {
    s.parse().map_err(|_| {
        NodeError::Invalid(format!(
            "'{s}' is not an address: use [ipv6]:port or ipv4:port"
        ))
    })
}

impl Node {
    /// Starts the daemon for `home`: lock, identity, config, registry,
    /// transports, accept loop and control API.
    pub async fn start(home: Home) -> Result<Node> {
        let lock = home.lock_daemon()?;
        let key = home.load_identity()?;
        let config = Config::load(&home.config_path())?;
        let services = parse_services(&home)?;
        let db = Db::open(&home.db_path())?;
        // No transports enabled means an outgoing-only node (config.rs): it
        // listens nowhere but can still dial over both.
        let (listen, kinds) = if config.transports.is_empty() {
            (Vec::new(), vec![TransportKind::Tcp, TransportKind::Quic])
        } else {
            (config.listen.clone(), config.transports.clone())
        };
        let transports = Transports::bind(
            &key,
            &listen,
            &kinds,
            NetConfig {
                handshake_timeout: HANDSHAKE_TIMEOUT,
                ..NetConfig::default()
            },
        )
        .await
        .map_err(|e| match e {
            NetError::Io(io) => NodeError::io(
                format!(
                    "cannot listen on {}",
                    config
                        .listen
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                io,
            ),
            other => other.into(),
        })?;
        let transports = Arc::new(transports);
        let (shutdown, _) = watch::channel(false);
        let id = key.node_id();
        let onion_secret = key.onion_secret();
        let relay_budget = config.relay.max_circuits as usize;
        let links = Arc::new(vx6_net::channel::ChannelStats::default());
        let cell_memory = Arc::new(vx6_net::channel::CellMemory::new(
            (config.relay.max_queued_mib as usize) << 20,
        ));
        let chan_cfg = ChannelConfig {
            stats: Some(links.clone()),
            cell_memory: Some(cell_memory.clone()),
            ..ChannelConfig::default()
        };
        let anon = crate::circuits::AnonLinks::new(&kinds, chan_cfg.clone()).await?;
        let dht = crate::dht::DhtState::new(id, &config, &db)?;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            pool: Pool::new(
                transports.clone(),
                chan_cfg,
                Arc::new(Dispatch(weak.clone())),
                4096,
            ),
            home: home.clone(),
            key,
            id,
            config: RwLock::new(config),
            services: RwLock::new(services),
            db,
            forwards: Mutex::new(HashMap::new()),
            next_forward: AtomicU64::new(1),
            started: Instant::now(),
            shutdown,
            counters: Counters::default(),
            own: RwLock::new(None),
            onion_secret,
            dht,
            relay: crate::relay::RelayState::new(relay_budget),
            anon,
            links,
            cell_memory,
            own_bytes: Arc::new(AtomicU64::new(0)),
            seen_at: Mutex::new(HashMap::new()),
            _lock: lock,
        });
        let node = Node { inner };
        tokio::spawn(node.inner.pool.clone().run_accept());
        if let Some(addr) = node
            .inner
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .metrics_listen
        {
            tokio::spawn(crate::metrics::serve(node.clone(), addr));
        }
        crate::discovery::spawn_background(&node);
        crate::dht::spawn_background(&node);
        let listener = control::bind(&home.socket_path())?;
        tokio::spawn(control::serve(listener, Arc::new(node.clone())));
        tracing::info!(node = %id.short(), endpoints = ?node.local_endpoints(), "node started");
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        self.inner.pool.transports().local_endpoints()
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.inner.pool
    }

    /// Runs until SIGINT or SIGTERM (or [`Node::shutdown`]), then stops cleanly.
    pub async fn run_until_signal(&self) -> Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| NodeError::io("signal handler", e))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| NodeError::io("signal handler", e))?;
        let mut stop = self.inner.shutdown.subscribe();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        self.stop();
        Ok(())
    }

    /// Asks the node to stop.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    fn stop(&self) {
        tracing::info!("node stopping");
        for (_, f) in lock(&self.inner.forwards).drain() {
            f.task.abort();
        }
        self.inner.pool.close();
        self.inner.anon.close();
        let _ = std::fs::remove_file(self.inner.home.socket_path());
    }

    /// Re-reads config.toml and services.toml; running forwards are kept.
    pub fn reload(&self) -> Result<()> {
        let cfg = Config::load(&self.inner.home.config_path())?;
        let services = parse_services(&self.inner.home)?;
        *self.inner.config.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        *self
            .inner
            .services
            .write()
            .unwrap_or_else(|p| p.into_inner()) = services;
        Ok(())
    }

    fn service(&self, name: &ServiceName) -> Option<Service> {
        self.inner
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn services(&self) -> Vec<Service> {
        let mut v: Vec<Service> = self
            .inner
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    async fn handle_stream(&self, chan: Channel, s: IncomingStream) {
        let IncomingStream {
            open,
            mut send,
            recv,
        } = s;
        let purpose = match Purpose::decode(&open) {
            Ok(p) => p,
            Err(_) => {
                self.inner
                    .counters
                    .bad_requests
                    .fetch_add(1, Ordering::Relaxed);
                send.reset(code::REFUSED);
                return;
            }
        };
        match purpose {
            Purpose::Service(name) => self.serve_service(chan, name, send, recv).await,
            Purpose::Catalog => {
                // The request has no body; wait for its end so the stream
                // closes cleanly in both directions.
                let mut recv = recv;
                if recv.read_to_end(0).await.is_err() {
                    return;
                }
                let list = self.catalog_for(&chan.peer());
                let _ = send.send(Bytes::from(list.encode())).await;
                let _ = send.finish().await;
            }
            other => match crate::discovery::handle_rpc(self, &chan, other, send, recv).await {
                Ok(()) => {}
                Err(e) => {
                    self.inner
                        .counters
                        .bad_requests
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %chan.peer().short(), error = %e, "rpc failed");
                }
            },
        }
    }

    /// The owner side of a forwarded connection. Refuses, without connecting
    /// anywhere, anything that is not a declared service this client may use.
    async fn serve_service(
        &self,
        chan: Channel,
        name: ServiceName,
        mut send: vx6_net::channel::SendHalf,
        recv: vx6_net::channel::RecvHalf,
    ) {
        let c = &self.inner.counters;
        c.service_streams.fetch_add(1, Ordering::Relaxed);
        let Some(svc) = self.service(&name) else {
            c.service_refused.fetch_add(1, Ordering::Relaxed);
            send.reset(code::REFUSED);
            return;
        };
        if !svc.visible_to(&chan.peer()) {
            c.service_not_allowed.fetch_add(1, Ordering::Relaxed);
            // A private service answers exactly like a missing one.
            send.reset(if svc.private {
                code::REFUSED
            } else {
                code::NOT_ALLOWED
            });
            return;
        }
        if !svc.target.ip().is_loopback() && !svc.allow_remote_target {
            c.service_refused.fetch_add(1, Ordering::Relaxed);
            send.reset(code::REFUSED);
            return;
        }
        let tcp = match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(svc.target))
            .await
        {
            Ok(Ok(t)) => t,
            _ => {
                c.target_failed.fetch_add(1, Ordering::Relaxed);
                send.reset(code::TARGET_FAILED);
                return;
            }
        };
        if send
            .send(Bytes::from_static(&[SERVICE_ACCEPTED]))
            .await
            .is_err()
        {
            return;
        }
        forward::pump(
            tcp,
            send,
            recv,
            Bytes::new(),
            false,
            self.inner.own_bytes.clone(),
        )
        .await;
    }

    /// Signed records of the services `client` may see.
    fn catalog_for(&self, client: &NodeId) -> RecordList {
        let now = now();
        let records = self
            .services()
            .into_iter()
            .filter(|s| s.visible_to(client))
            .take(nodemsg::MAX_CATALOG)
            .filter_map(|s| {
                let body = ServiceRecord {
                    node: self.inner.id,
                    service: s.name.clone(),
                    visibility: if s.private {
                        Visibility::Private
                    } else {
                        Visibility::Public
                    },
                    seq: now.0,
                    issued: now,
                    expires: now.plus(SERVICE_RECORD_LIFETIME),
                };
                body.sign(&self.inner.key).ok().map(|r| r.encode())
            })
            .collect();
        RecordList {
            records,
            next: None,
        }
    }

    /// Asks `chan`'s node which services it offers us.
    pub async fn fetch_catalog(&self, chan: &Channel) -> Result<Vec<ServiceRecord>> {
        let raw = chan
            .request(
                Bytes::from(Purpose::Catalog.encode()),
                Bytes::new(),
                nodemsg::MAX_RPC_LEN,
                CATALOG_TIMEOUT,
            )
            .await?;
        let list = RecordList::decode(&raw, nodemsg::MAX_CATALOG)?;
        let now = now();
        let mut out = Vec::new();
        for r in list.records {
            let rec = Signed::<ServiceRecord>::decode_verified(&r, now)?;
            if rec.body.node != chan.peer() {
                return Err(NodeError::Refused(
                    "peer sent a service record signed by another node".into(),
                ));
            }
            out.push(rec.body);
        }
        Ok(out)
    }

    /// Starts a local forward. Dials once first so that a wrong node id, an
    /// unreachable owner or an unknown service fail now, with a clear error.
    pub async fn open_forward(
        &self,
        spec: &ConnectSpec,
        conn: Option<u64>,
    ) -> Result<serde_json::Value> {
        let listen = parse_socket_addr(&spec.listen)?;
        let transport: TransportKind = match spec.transport.as_deref() {
            None => TransportKind::Tcp,
            Some(t) => t.parse().map_err(|_| {
                NodeError::Invalid(format!("unknown transport '{t}': use tcp or quic"))
            })?,
        };
        let via = spec.via.as_deref().unwrap_or("direct");
        let (owner, endpoints, service, pinned_now) = match (&spec.addr, &spec.name) {
            (Some(addr), None) => {
                if via != "direct" {
                    return Err(NodeError::Invalid(
                        "--addr connects directly; use a name with --via relay".into(),
                    ));
                }
                let sa = parse_socket_addr(addr)?;
                let service = spec
                    .service
                    .as_deref()
                    .ok_or_else(|| NodeError::Invalid("--addr needs --service NAME".into()))?;
                let service = ServiceName::new(service)
                    .map_err(|e| NodeError::Invalid(format!("--service: {e}")))?;
                let ep = Endpoint {
                    transport,
                    addr: sa,
                };
                let (owner, pinned_now) = self.dial_pinned(ep, spec.node.as_deref()).await?;
                (owner, vec![ep], service, pinned_now)
            }
            (None, Some(name)) => {
                let r = crate::discovery::resolve_service(self, name, Some(transport)).await?;
                match via {
                    "direct" => {}
                    "relay" => return self.open_relay_forward(spec, conn, listen, r).await,
                    other => {
                        return Err(NodeError::Invalid(format!(
                            "unknown --via '{other}': use direct or relay"
                        )));
                    }
                }
                (r.node, r.endpoints, r.service, false)
            }
            _ => {
                return Err(NodeError::Invalid(
                    "give either NAME or --addr ADDR --service NAME".into(),
                ));
            }
        };
        let chan = self
            .inner
            .pool
            .connect(owner, &endpoints)
            .await
            .map_err(|e| dial_error(&endpoints, e))?;
        let catalog = match self.fetch_catalog(&chan).await {
            Ok(c) => c,
            // A pooled channel can be dead without knowing it yet (the owner
            // vanished): drop it and ask once more over a fresh dial.
            Err(NodeError::Net(NetError::Closed | NetError::Timeout(_) | NetError::Reset(_))) => {
                chan.close();
                let fresh = self
                    .inner
                    .pool
                    .connect(owner, &endpoints)
                    .await
                    .map_err(|e| dial_error(&endpoints, e))?;
                self.fetch_catalog(&fresh).await.map_err(|e| {
                    NodeError::Unreachable(format!(
                        "cannot reach node {} at {}: {e}",
                        owner.short(),
                        describe_endpoints(&endpoints)
                    ))
                })?
            }
            Err(e) => return Err(e),
        };
        if !catalog.iter().any(|s| s.service == service) {
            return Err(NodeError::Refused(format!(
                "node {} does not offer service '{service}' to this node",
                owner.short()
            )));
        }
        let (listener, local) = bind_forward_listener(listen).await?;
        let id = self.inner.next_forward.fetch_add(1, Ordering::Relaxed);
        let connections = Arc::new(AtomicU64::new(0));
        let node = self.clone();
        let conns = connections.clone();
        let svc = service.clone();
        let eps = endpoints.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let node = node.clone();
                let svc = svc.clone();
                let eps = eps.clone();
                tokio::spawn(async move { node.forward_one(tcp, owner, &eps, svc).await });
            }
        })
        .abort_handle();
        let describe = format!("{}.{service}", owner.short());
        lock(&self.inner.forwards).insert(
            id,
            ForwardEntry {
                listen: local,
                describe: describe.clone(),
                owner,
                conn: if spec.detach { None } else { conn },
                task,
                connections,
            },
        );
        Ok(json!({
            "id": id, "listen": local.to_string(), "node": owner.to_string(), "service": service.as_str(),
            "pinned": pinned_now, "via": via,
        }))
    }

    /// A forward whose connections go through a relay circuit to the owner.
    /// The circuit is built now (so a missing path fails at once) and
    /// rebuilt, around relays that failed, when it dies.
    async fn open_relay_forward(
        &self,
        spec: &ConnectSpec,
        conn: Option<u64>,
        listen: SocketAddr,
        r: crate::discovery::Resolved,
    ) -> Result<serde_json::Value> {
        let hops = spec.hops.map_or(crate::circuits::DEFAULT_HOPS, usize::from);
        if !(1..=vx6_circuit::MAX_HOPS - 1).contains(&hops) {
            return Err(NodeError::Invalid(format!(
                "--hops must be between 1 and {}",
                vx6_circuit::MAX_HOPS - 1
            )));
        }
        let owner = r.node;
        let target = crate::discovery::registry_record(self, &owner).ok_or_else(|| {
            NodeError::NotFound(format!(
                "no record of node {} to build a circuit to",
                owner.short()
            ))
        })?;
        // TCP by default: a relay notices a dead TCP neighbour at once, a dead
        // QUIC one only at its idle timeout.
        let prefer = Some(
            spec.transport
                .as_deref()
                .and_then(|t| t.parse().ok())
                .unwrap_or(TransportKind::Tcp),
        );
        let (orphan_tx, mut orphan_rx) = tokio::sync::mpsc::unbounded_channel();
        // A few tries, each on a new path: right after start-up relays may
        // not have met each other yet, and a relay that just failed is
        // left out of the next path.
        let mut first = None;
        let mut last_err = None;
        for attempt in 0..8u64 {
            match crate::circuits::build(self, &target, hops, prefer, orphan_tx.clone()).await {
                Ok(c) => {
                    first = Some(c);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        let first = match (first, last_err) {
            (Some(c), _) => c,
            (None, Some(e)) => return Err(e),
            (None, None) => {
                return Err(NodeError::Unreachable(
                    "no relay circuit could be built".into(),
                ));
            }
        };
        // The direct mode's catalog check, over the anonymous circuit: a
        // service the owner would refuse is an error now, not a forward
        // whose every connection is reset.
        match first.probe(r.service.clone()).await {
            Some(true) => {}
            Some(false) => {
                return Err(NodeError::Refused(format!(
                    "node {} does not offer '{}' to relayed clients (not declared, private, or limited by an allow list)",
                    owner.short(),
                    r.service
                )));
            }
            None => {
                return Err(NodeError::Unreachable(
                    "the relay circuit closed before the owner answered".into(),
                ));
            }
        }
        let path: Vec<String> = first.path.iter().map(|n| n.short()).collect();
        let (listener, local) = bind_forward_listener(listen).await?;
        let id = self.inner.next_forward.fetch_add(1, Ordering::Relaxed);
        let connections = Arc::new(AtomicU64::new(0));
        let node = self.clone();
        let conns = connections.clone();
        let service = r.service.clone();
        let svc = service.clone();
        let circ = Arc::new(tokio::sync::Mutex::new(first));
        let task = tokio::spawn(async move {
            loop {
                // New local connections, and ones a dying circuit handed back
                // before the owner accepted them (nothing was read from those).
                let pending = tokio::select! {
                    acc = listener.accept() => {
                        let Ok((tcp, _)) = acc else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        conns.fetch_add(1, Ordering::Relaxed);
                        node.inner.counters.forward_connections.fetch_add(1, Ordering::Relaxed);
                        crate::circuits::Pending { tcp, service: svc.clone(), tries: 0 }
                    }
                    Some(p) = orphan_rx.recv() => p,
                };
                let node = node.clone();
                let (circ, target, orphans) = (circ.clone(), target.clone(), orphan_tx.clone());
                tokio::spawn(async move {
                    node.relay_one(pending, &circ, &target, hops, prefer, orphans)
                        .await;
                });
            }
        })
        .abort_handle();
        let describe = format!("{}.{service} via relay", owner.short());
        lock(&self.inner.forwards).insert(
            id,
            ForwardEntry {
                listen: local,
                describe,
                owner,
                conn: if spec.detach { None } else { conn },
                task,
                connections,
            },
        );
        Ok(json!({
            "id": id, "listen": local.to_string(), "node": owner.to_string(), "service": service.as_str(),
            "pinned": false, "via": "relay", "path": path,
        }))
    }

    /// Hands one local connection to the forward's circuit, rebuilding the
    /// circuit (a few times, around relays that just failed) when it is gone.
    async fn relay_one(
        &self,
        mut p: crate::circuits::Pending,
        circ: &tokio::sync::Mutex<crate::circuits::ClientCirc>,
        target: &Signed<NodeRecord>,
        hops: usize,
        prefer: Option<TransportKind>,
        orphans: crate::circuits::Orphans,
    ) {
        const MAX_TRIES: u8 = 4;
        loop {
            p.tries += 1;
            if p.tries > MAX_TRIES {
                self.inner
                    .counters
                    .forward_failures
                    .fetch_add(1, Ordering::Relaxed);
                let _ = p.tcp.set_zero_linger();
                return;
            }
            let c = {
                let mut g = circ.lock().await;
                if !g.is_alive() {
                    let mut built = None;
                    for _ in 0..5 {
                        match crate::circuits::build(self, target, hops, prefer, orphans.clone())
                            .await
                        {
                            Ok(c) => {
                                built = Some(c);
                                break;
                            }
                            Err(e) => tracing::debug!(error = %e, "relay circuit build failed"),
                        }
                    }
                    match built {
                        Some(c) => *g = c,
                        None => {
                            self.inner
                                .counters
                                .forward_failures
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("cannot rebuild the relay circuit");
                            let _ = p.tcp.set_zero_linger();
                            return;
                        }
                    }
                }
                g.clone()
            };
            match c.open(p).await {
                Ok(()) => return,
                // The circuit died between the check and the hand-over.
                Err(back) => p = back,
            }
        }
    }

    /// Dials `ep` expecting `node` (given, or pinned for that address), or
    /// pins the key it sees on first contact.
    async fn dial_pinned(&self, ep: Endpoint, node: Option<&str>) -> Result<(NodeId, bool)> {
        let addr_key = ep.addr.to_string();
        let given = match node {
            Some(n) => Some(
                n.parse::<NodeId>()
                    .map_err(|e| NodeError::Invalid(format!("--node: {e}")))?,
            ),
            None => None,
        };
        let pinned = config::load_pins(&self.inner.home)?
            .addrs
            .get(&addr_key)
            .and_then(|s| s.parse::<NodeId>().ok());
        let expect = given.or(pinned).map(Expect::Node).unwrap_or(Expect::AnyKey);
        let chan = self
            .inner
            .pool
            .dial(ep, expect)
            .await
            .map_err(|e| match e {
                NetError::WrongNode { expected, got } => NodeError::PinMismatch {
                    addr: addr_key.clone(),
                    expected,
                    got,
                },
                other => dial_error(&[ep], other),
            })?;
        let got = chan.peer();
        if given.is_none() && pinned.is_none() {
            config::edit_pins(&self.inner.home, |p| {
                p.addrs.insert(addr_key.clone(), got.to_string());
                Ok(())
            })?;
            tracing::info!(addr = %addr_key, node = %got, "pinned new node key");
            return Ok((got, true));
        }
        Ok((got, false))
    }

    async fn forward_one(
        &self,
        tcp: TcpStream,
        owner: NodeId,
        endpoints: &[Endpoint],
        service: ServiceName,
    ) {
        let c = &self.inner.counters;
        c.forward_connections.fetch_add(1, Ordering::Relaxed);
        let chan = match self.connect_owner(owner, endpoints).await {
            Ok(ch) => ch,
            Err(e) => {
                c.forward_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %owner.short(), error = %e, "cannot reach the service's node");
                return;
            }
        };
        let purpose = Bytes::from(Purpose::Service(service).encode());
        let (send, recv) = match chan.open(purpose).await {
            Ok(s) => s,
            Err(e) => {
                c.forward_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot open a stream");
                return;
            }
        };
        let r = forward::pump(
            tcp,
            send,
            recv,
            Bytes::new(),
            true,
            self.inner.own_bytes.clone(),
        )
        .await;
        if r.aborted {
            c.forward_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A channel to `owner`: pooled, or dialed at `endpoints`, or — when
    /// those fail (the owner moved) — at the endpoints of its freshest
    /// record from the registry or the DHT.
    async fn connect_owner(&self, owner: NodeId, endpoints: &[Endpoint]) -> Result<Channel> {
        let first = match self.inner.pool.connect(owner, endpoints).await {
            Ok(ch) => return Ok(ch),
            Err(e) => e,
        };
        let known = crate::discovery::registry_record(self, &owner);
        let fresh = match crate::dht::lookup_node(self, &owner).await {
            Some(r) if known.as_ref().is_none_or(|k| r.body.seq >= k.body.seq) => Some(r),
            _ => known,
        };
        let Some(rec) = fresh else {
            return Err(first.into());
        };
        let mut eps = rec.body.endpoints.clone();
        let prefer = endpoints.first().map(|e| e.transport);
        crate::discovery::sort_endpoints(&mut eps, prefer);
        if eps.as_slice() == endpoints {
            return Err(first.into());
        }
        Ok(self.inner.pool.connect(owner, &eps).await?)
    }

    pub fn close_forward(&self, id: u64) -> bool {
        match lock(&self.inner.forwards).remove(&id) {
            Some(f) => {
                f.task.abort();
                true
            }
            None => false,
        }
    }

    /// A JSON snapshot for `vx6 status`.
    pub fn status(&self) -> serde_json::Value {
        let cfg = self
            .inner
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let peers: Vec<_> = self
            .inner
            .pool
            .channels()
            .iter()
            .map(|c| json!({"node": c.peer().to_string(), "remote": c.remote().to_string(), "transport": c.transport().as_str(), "streams": c.active_streams()}))
            .collect();
        let services: Vec<_> = self
            .services()
            .iter()
            .map(|s| json!({"name": s.name.as_str(), "target": s.target.to_string(), "private": s.private, "allow": s.allow.iter().map(|a| a.to_string()).collect::<Vec<_>>()}))
            .collect();
        let forwards: Vec<_> = lock(&self.inner.forwards)
            .iter()
            .map(|(id, f)| json!({"id": id, "listen": f.listen.to_string(), "to": f.describe, "node": f.owner.to_string(), "detached": f.conn.is_none(), "connections": f.connections.load(Ordering::Relaxed)}))
            .collect();
        let c = &self.inner.counters;
        let ts = self.inner.pool.transports().stats();
        json!({
            "node_id": self.inner.id.to_string(),
            "name": cfg.name,
            "endpoints": self.local_endpoints().iter().map(|e| format!("{}/{}", e.transport, e.addr)).collect::<Vec<_>>(),
            "uptime_secs": self.inner.started.elapsed().as_secs(),
            "peers": peers,
            "services": services,
            "forwards": forwards,
            "counters": {
                "service_streams": c.service_streams.load(Ordering::Relaxed),
                "service_refused": c.service_refused.load(Ordering::Relaxed),
                "service_not_allowed": c.service_not_allowed.load(Ordering::Relaxed),
                "target_failed": c.target_failed.load(Ordering::Relaxed),
                "forward_connections": c.forward_connections.load(Ordering::Relaxed),
                "forward_failures": c.forward_failures.load(Ordering::Relaxed),
                "bad_requests": c.bad_requests.load(Ordering::Relaxed),
                "handshakes_ok": ts.handshakes_ok,
                "handshakes_failed": ts.handshakes_failed,
                "handshakes_timed_out": ts.handshakes_timed_out,
                "dropped_over_limit": ts.dropped_over_limit,
            },
            "links": self.link_counters(),
            "discovery": crate::discovery::status(self),
            "circuits": {
                "own": self.inner.anon.status(),
                "relay": self.inner.relay.status(),
            },
        })
    }

    /// What all of this node's channels counted (`status`'s "links").
    fn link_counters(&self) -> serde_json::Value {
        let l = &self.inner.links;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "bytes_in": load(&l.bytes_in),
            "bytes_out": load(&l.bytes_out),
            "streams_opened": load(&l.streams_opened),
            "streams_refused": load(&l.streams_refused),
            "protocol_errors": load(&l.protocol_errors),
            "circuits_overflowed": load(&l.circuits_overflowed),
            "queued_cell_bytes": self.inner.cell_memory.used(),
            "queued_cell_limit": self.inner.cell_memory.limit(),
        })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// Binds a forward's local listener; a port in use is a one-line error.
async fn bind_forward_listener(listen: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            NodeError::Invalid(format!("cannot listen on {listen}: address already in use"))
        } else {
            NodeError::io(format!("cannot listen on {listen}"), e)
        }
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| NodeError::io("listener address", e))?;
    Ok((listener, local))
}

fn describe_endpoints(endpoints: &[Endpoint]) -> String {
    endpoints
        .iter()
        .map(|e| format!("{}/{}", e.transport, e.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turns a dial failure into the sentence a user should see.
fn dial_error(endpoints: &[Endpoint], e: NetError) -> NodeError {
    let at = describe_endpoints(endpoints);
    match e {
        NetError::WrongNode { expected, got } => NodeError::Refused(format!(
            "the node at {at} is {got}, not the expected {expected}"
        )),
        NetError::Timeout(_) | NetError::Io(_) | NetError::Closed => {
            NodeError::Unreachable(format!("cannot reach a node at {at}: {e}"))
        }
        other => NodeError::Unreachable(format!("cannot connect to {at}: {other}")),
    }
}

impl control::Handler for Node {
    async fn handle(self: Arc<Self>, conn_id: u64, req: Request) -> Response {
        let r: Result<serde_json::Value> = async {
            match req {
                Request::Status => Ok(self.status()),
                Request::Identity => {
                    let cfg = self.inner.config.read().unwrap_or_else(|p| p.into_inner()).clone();
                    Ok(json!({"node_id": self.inner.id.to_string(), "short": self.inner.id.short(), "name": cfg.name}))
                }
                Request::Reload => self.reload().map(|_| json!({"reloaded": true})),
                Request::PeerAdd { addr } => crate::discovery::peer_add(&self, &addr).await,
                Request::PeerList => crate::discovery::peer_list(&self),
                Request::Resolve { name } => crate::discovery::resolve_json(&self, &name).await,
                Request::Connect(spec) => self.open_forward(&spec, Some(conn_id)).await,
                Request::ForwardClose { id } => Ok(json!({"closed": self.close_forward(id)})),
                Request::Shutdown => {
                    self.shutdown();
                    Ok(json!({"stopping": true}))
                }
            }
        }
        .await;
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e),
        }
    }

    fn disconnected(&self, conn_id: u64) {
        let mut fwd = lock(&self.inner.forwards);
        fwd.retain(|_, f| {
            if f.conn == Some(conn_id) {
                f.task.abort();
                false
            } else {
                true
            }
        });
    }
}
