//! TLS 1.3 over TCP and QUIC behind one trait, and the listeners of a node.
//!
//! Owns: binding sockets, dialling, and running inbound handshakes until a
//! [`Conn`] (one authenticated, bidirectional byte stream to a proven
//! [`NodeId`]) comes out. Both transports use the configs and the verifier of
//! [`crate::tls`], so there is one identity proof, not two.
//!
//! After TLS, the dialer writes the 4-byte [`PREAMBLE`] and the acceptor
//! checks it before yielding the connection. On QUIC this is what makes the
//! dialer's stream visible to the acceptor at all (a quinn stream is not
//! announced until written to); TCP does the same for uniformity.
//!
//! Must never: block an accept on one peer's handshake, wait without a
//! timeout, hold unbounded per-peer state, or panic on what a peer sends.
//! It knows nothing about what flows over a [`Conn`] (see `channel`).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::debug;
use vx6_proto::record::{Endpoint, TransportKind};
use vx6_proto::{NodeId, NodeKeypair};

use crate::tcplink;
use crate::tls::{self, TlsConfigs};
use crate::{NetError, Result};

/// Written by the dialer right after the TLS handshake; checked by the acceptor.
pub const PREAMBLE: [u8; 4] = *b"VX6\x01";

/// QUIC keepalive: well under common NAT UDP timeouts (30 s and up).
const QUIC_KEEPALIVE: Duration = Duration::from_secs(15);
/// Per-stream QUIC receive window: enough for ~1 Gbit/s at 60 ms RTT.
const QUIC_STREAM_WINDOW: u32 = 8 << 20;
/// Per-connection QUIC receive and send windows. Also bounds what one peer
/// can make us buffer, however many streams it opens.
const QUIC_CONN_WINDOW: u32 = 16 << 20;
/// How long a dropped QUIC [`Conn`] keeps its connection open so that data
/// already written reaches the peer (dropping the last `quinn::Connection`
/// closes it at once and discards anything unsent).
const QUIC_LINGER: Duration = Duration::from_secs(10);
/// Largest UDP payload MTU discovery probes for (and we accept), for
/// loopback, namespaces and jumbo frames (a 1500-byte path settles just under
/// its MTU after a few lost probes). quinn sends up to ten packets in one GSO
/// send, which must fit in 64 KiB: 8952 made those sends fail and stall.
const QUIC_MAX_UDP_PAYLOAD: u16 = 6400;
/// Attempts at finding a port free on both TCP and UDP when binding port 0.
const SHARED_PORT_ATTEMPTS: usize = 8;
/// Back-off after a failed `accept()` (e.g. out of file descriptors), so the
/// listener does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The receiving half of a [`Conn`]: buffered, so a reader can parse what
/// arrived where it lies (the TCP link lends out opened records).
pub trait LinkRead: AsyncBufRead + AsyncRead + Send + Unpin + 'static {}
impl<T: AsyncBufRead + AsyncRead + Send + Unpin + 'static> LinkRead for T {}
/// The sending half of a [`Conn`].
pub trait LinkWrite: AsyncWrite + Send + Unpin + 'static {
    /// The QUIC stream under this writer, which takes whole [`bytes::Bytes`]
    /// chunks without copying them; `None` for a byte-stream writer.
    fn quic_stream(&mut self) -> Option<&mut quinn::SendStream> {
        None
    }
}
impl LinkWrite for crate::tcplink::LinkWriter {}
impl<S: AsyncRead + AsyncWrite + Send + 'static> LinkWrite for tokio::io::WriteHalf<S> {}
impl LinkWrite for QuicSend {
    fn quic_stream(&mut self) -> Option<&mut quinn::SendStream> {
        Some(&mut self.send)
    }
}

/// The byte stream a [`Conn`] carries, as two halves that need no lock
/// between them; it is also one `AsyncRead + AsyncWrite` for simple uses.
pub struct LinkIo {
    pub rd: Box<dyn LinkRead>,
    pub wr: Box<dyn LinkWrite>,
}

impl LinkIo {
    /// Any byte stream as a link (in-memory pipes in tests, say): its read
    /// side gets a buffer, and the halves share a lock.
    pub fn from_stream<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        Self {
            rd: Box::new(tokio::io::BufReader::new(rd)),
            wr: Box::new(wr),
        }
    }
}

impl AsyncRead for LinkIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for LinkIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.wr).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.wr).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.wr.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_shutdown(cx)
    }
}

/// A QUIC stream's receive side is read through a buffer this large.
const QUIC_READ_BUF: usize = 64 * 1024;

/// A boxed, sendable future (keeps [`Transport`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whom a dial must reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// This node, and no other: the handshake fails on any other key.
    Node(NodeId),
    /// Any valid node key (trust on first use); [`Conn::peer`] says who it was.
    AnyKey,
}

/// One authenticated connection to a peer node.
pub struct Conn {
    /// What the peer's key proves (never what it claimed).
    pub peer: NodeId,
    pub transport: TransportKind,
    pub remote: SocketAddr,
    /// TCP: the TLS link (flush after writing). QUIC: one bidirectional
    /// stream whose halves also keep its connection alive.
    pub io: LinkIo,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// Settings of the transports.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Bound on a whole dial or inbound handshake, preamble included.
    pub handshake_timeout: Duration,
    /// QUIC max idle timeout (keepalives are sent every 15 s, or at half this
    /// when it is shorter).
    pub idle_timeout: Duration,
    /// Inbound handshakes in flight (plus completed ones waiting for
    /// [`Transports::accept`]) beyond which new connections are dropped.
    pub max_pending_handshakes: usize,
    /// Inbound handshakes one source (an IPv6 /64 or an IPv4 address) may
    /// have in flight, so one host cannot take all the slots.
    pub max_pending_per_source: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_pending_handshakes: 256,
            max_pending_per_source: 16,
        }
    }
}

/// Counters of inbound handshakes (dials report their outcome to the caller).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    pub handshakes_timed_out: u64,
    pub dropped_over_limit: u64,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> TransportStats {
        TransportStats {
            handshakes_ok: self.ok.load(Ordering::Relaxed),
            handshakes_failed: self.failed.load(Ordering::Relaxed),
            handshakes_timed_out: self.timed_out.load(Ordering::Relaxed),
            dropped_over_limit: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// One transport: dials peers over one kind of socket.
///
/// Implemented by [`TcpTransport`] and [`QuicTransport`]; get one from
/// [`Transports::transport_for`].
pub trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;
    /// The bound socket address; the unspecified address with port 0 for
    /// the TCP dialer (TCP dials use ephemeral ports).
    fn local_addr(&self) -> SocketAddr;
    /// Connects to `addr`, authenticates the peer per `expect`, and writes
    /// the preamble, all under the handshake timeout.
    fn dial(&self, addr: SocketAddr, expect: Expect) -> BoxFuture<'_, Result<Conn>>;
}

/// State shared by the transports of one node and their background tasks.
struct Shared {
    tls: TlsConfigs,
    quic_client: quinn::ClientConfig,
    cfg: NetConfig,
    counters: Counters,
    /// One permit per inbound handshake in flight or completed-but-queued.
    pending: Arc<Semaphore>,
    /// Handshakes in flight per source (see [`NetConfig::max_pending_per_source`]).
    per_source: Mutex<std::collections::HashMap<IpAddr, usize>>,
    inbound: mpsc::Sender<Conn>,
    closed: watch::Receiver<bool>,
}

impl Shared {
    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Takes a handshake slot for `remote`: one of the node-wide slots and
    /// one of its source's. `None` when either is exhausted.
    fn admit(self: &Arc<Self>, remote: SocketAddr) -> Option<Admission> {
        let source = source_of(remote.ip());
        {
            let mut m = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(source).or_insert(0);
            if *n >= self.cfg.max_pending_per_source.max(1) {
                return None;
            }
            *n += 1;
        }
        let guard = SourceGuard {
            shared: self.clone(),
            source,
        };
        let permit = self.pending.clone().try_acquire_owned().ok()?;
        Some(Admission {
            _permit: permit,
            _source: guard,
        })
    }
}

/// The unit per-source limits count by: an IPv6 /64 (one host or LAN), an
/// IPv4 address; v4-mapped addresses count as IPv4.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

struct SourceGuard {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut m = self
            .shared
            .per_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

/// A node-wide and a per-source handshake slot, released together.
struct Admission {
    _permit: OwnedSemaphorePermit,
    _source: SourceGuard,
}

/// Resolves once the transports are closed (or dropped).
async fn closed_signal(mut closed: watch::Receiver<bool>) {
    // An error means the sender (the Transports) is gone: closed as well.
    let _ = closed.wait_for(|c| *c).await;
}

/// TLS 1.3 over TCP.
pub struct TcpTransport {
    shared: Arc<Shared>,
    local: SocketAddr,
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
    fn dial(&self, addr: SocketAddr, expect: Expect) -> BoxFuture<'_, Result<Conn>> {
        Box::pin(dial_tcp(self.shared.clone(), addr, expect))
    }
}

/// QUIC over one bound UDP socket, used both to accept and to dial (so dials
/// leave from the node's advertised port).
pub struct QuicTransport {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    local: SocketAddr,
}

impl Transport for QuicTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
    fn dial(&self, addr: SocketAddr, expect: Expect) -> BoxFuture<'_, Result<Conn>> {
        Box::pin(dial_quic(
            self.shared.clone(),
            self.endpoint.clone(),
            addr,
            expect,
        ))
    }
}

/// Dial-only QUIC endpoints, bound on first use when no listening endpoint
/// can reach a target.
#[derive(Default)]
struct QuicClients {
    dual_stack: Option<Arc<QuicTransport>>,
    v4: Option<Arc<QuicTransport>>,
}

/// Both transports of one node.
pub struct Transports {
    shared: Arc<Shared>,
    kinds: Vec<TransportKind>,
    tcp_listeners: Vec<SocketAddr>,
    tcp_dialer: Arc<TcpTransport>,
    quic: Vec<Arc<QuicTransport>>,
    quic_clients: Mutex<QuicClients>,
    inbound: tokio::sync::Mutex<mpsc::Receiver<Conn>>,
    close: watch::Sender<bool>,
}

impl std::fmt::Debug for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transports")
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl Transports {
    /// Binds each listen address on every requested transport. With both
    /// kinds, TCP and UDP use the same port (TCP first; for port 0, UDP takes
    /// the port TCP got, retrying if that UDP port is taken). With an empty
    /// listen list the node can only dial.
    pub async fn bind(
        key: &NodeKeypair,
        listen: &[SocketAddr],
        kinds: &[TransportKind],
        cfg: NetConfig,
    ) -> Result<Self> {
        let mut kinds = kinds.to_vec();
        kinds.sort();
        kinds.dedup();
        if kinds.is_empty() {
            return Err(NetError::Config("no transport enabled".into()));
        }
        if cfg.max_pending_handshakes == 0 {
            return Err(NetError::Config(
                "max_pending_handshakes must be at least 1".into(),
            ));
        }
        if cfg.handshake_timeout.is_zero() || cfg.idle_timeout.is_zero() {
            return Err(NetError::Config("timeouts must be non-zero".into()));
        }
        let want_tcp = kinds.contains(&TransportKind::Tcp);
        let want_quic = kinds.contains(&TransportKind::Quic);

        let tls = TlsConfigs::new(key)?;
        let transport_cfg = Arc::new(quic_transport_config(&cfg)?);
        let quic_crypto_err = |e| NetError::Config(format!("QUIC TLS setup: {e}"));
        let mut quic_client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls.client.clone()).map_err(quic_crypto_err)?,
        ));
        quic_client.transport_config(transport_cfg.clone());
        let mut quic_server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(tls.server.clone()).map_err(quic_crypto_err)?,
        ));
        quic_server.transport_config(transport_cfg);

        let (inbound_tx, inbound_rx) = mpsc::channel(cfg.max_pending_handshakes);
        let (close, closed) = watch::channel(false);
        let shared = Arc::new(Shared {
            tls,
            quic_client,
            pending: Arc::new(Semaphore::new(cfg.max_pending_handshakes)),
            per_source: Mutex::new(std::collections::HashMap::new()),
            cfg,
            counters: Counters::default(),
            inbound: inbound_tx,
            closed,
        });

        // Bind everything before spawning anything, so a failure leaves no
        // background task or socket behind.
        let mut tcp_sockets = Vec::new();
        let mut udp_sockets = Vec::new();
        for &addr in listen {
            let (tcp, udp) = bind_listen_addr(addr, want_tcp, want_quic).await?;
            tcp_sockets.extend(tcp);
            udp_sockets.extend(udp);
        }
        let mut quic = Vec::new();
        for socket in udp_sockets {
            let q = QuicTransport::new(shared.clone(), socket, Some(quic_server.clone()))?;
            quic.push(Arc::new(q));
        }
        let mut tcp_listeners = Vec::new();
        for listener in &tcp_sockets {
            tcp_listeners.push(listener.local_addr()?);
        }
        for listener in tcp_sockets {
            tokio::spawn(run_tcp_listener(listener, shared.clone()));
        }
        for q in &quic {
            tokio::spawn(run_quic_listener(q.endpoint.clone(), shared.clone()));
        }

        let unspecified = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
        Ok(Self {
            tcp_dialer: Arc::new(TcpTransport {
                shared: shared.clone(),
                local: unspecified,
            }),
            shared,
            kinds,
            tcp_listeners,
            quic,
            quic_clients: Mutex::new(QuicClients::default()),
            inbound: tokio::sync::Mutex::new(inbound_rx),
            close,
        })
    }

    /// The actually bound endpoints (ports resolved; wildcard addresses are
    /// reported as bound, not expanded to interface addresses).
    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        let tcp = self.tcp_listeners.iter().map(|&addr| Endpoint {
            transport: TransportKind::Tcp,
            addr,
        });
        let quic = self.quic.iter().map(|q| Endpoint {
            transport: TransportKind::Quic,
            addr: q.local,
        });
        tcp.chain(quic).collect()
    }

    /// The next completed, authenticated inbound connection from any
    /// transport. `Err(NetError::Closed)` after [`Transports::close`].
    pub async fn accept(&self) -> Result<Conn> {
        if self.shared.is_closed() {
            return Err(NetError::Closed);
        }
        tokio::select! {
            biased;
            () = closed_signal(self.shared.closed.clone()) => Err(NetError::Closed),
            conn = async { self.inbound.lock().await.recv().await } => conn.ok_or(NetError::Closed),
        }
    }

    /// Dials `ep` under the handshake timeout, checking the peer per `expect`.
    pub async fn dial(&self, ep: Endpoint, expect: Expect) -> Result<Conn> {
        self.transport_for(&ep)?.dial(ep.addr, expect).await
    }

    /// The transport [`Transports::dial`] would use for `ep`: for QUIC, a
    /// listening endpoint that can reach the address, else a dial-only one.
    pub fn transport_for(&self, ep: &Endpoint) -> Result<Arc<dyn Transport>> {
        if self.shared.is_closed() {
            return Err(NetError::Closed);
        }
        if !self.kinds.contains(&ep.transport) {
            return Err(NetError::Config(format!(
                "transport {} is not enabled",
                ep.transport
            )));
        }
        match ep.transport {
            TransportKind::Tcp => Ok(self.tcp_dialer.clone()),
            TransportKind::Quic => Ok(self.quic_for(ep.addr)?),
        }
    }

    /// Stops accepting: listeners stop, pending inbound handshakes are
    /// abandoned, [`Transports::accept`] and dials return `Closed`.
    /// Connections already handed out stay up until dropped.
    pub fn close(&self) {
        self.close.send_replace(true);
        for q in &self.quic {
            // Refuse new QUIC connections at the protocol level too.
            q.endpoint.set_server_config(None);
        }
    }

    pub fn stats(&self) -> TransportStats {
        self.shared.counters.snapshot()
    }

    fn quic_for(&self, target: SocketAddr) -> Result<Arc<QuicTransport>> {
        let target_ip = target.ip().to_canonical();
        // Prefer a socket of the target's own family over a v4-mapped send.
        let same_family = self.quic.iter().find(|q| {
            q.local.is_ipv4() == target_ip.is_ipv4() && can_reach(q.local.ip(), target_ip)
        });
        let any = || {
            self.quic
                .iter()
                .find(|q| can_reach(q.local.ip(), target_ip))
        };
        if let Some(q) = same_family.or_else(any) {
            return Ok(q.clone());
        }

        let mut clients = lock(&self.quic_clients);
        if clients.dual_stack.is_none() {
            let v6_any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
            match std::net::UdpSocket::bind(v6_any) {
                Ok(socket) => {
                    let q = QuicTransport::new(self.shared.clone(), socket, None)?;
                    clients.dual_stack = Some(Arc::new(q));
                }
                // No IPv6 on this host: IPv4 targets fall back below.
                Err(e) if target_ip.is_ipv4() => debug!(error = %e, "no dual-stack QUIC socket"),
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(q) = &clients.dual_stack {
            return Ok(q.clone());
        }
        if clients.v4.is_none() {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            clients.v4 = Some(Arc::new(QuicTransport::new(
                self.shared.clone(),
                socket,
                None,
            )?));
        }
        clients
            .v4
            .clone()
            .ok_or_else(|| NetError::Config("no QUIC socket for an IPv4 target".into()))
    }
}

impl Drop for Transports {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether a socket bound to `local` can send to `target` (both canonical).
/// A wildcard IPv6 socket is dual-stack (the Linux default), so it reaches
/// IPv4 targets through v4-mapped addresses.
fn can_reach(local: IpAddr, target: IpAddr) -> bool {
    match (local, target) {
        (IpAddr::V6(l), _) if l.is_unspecified() => true,
        (IpAddr::V4(l), IpAddr::V4(_)) if l.is_unspecified() => true,
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            // A loopback-bound socket cannot leave the host.
            !local.is_loopback() || target.is_loopback()
        }
        _ => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn quic_transport_config(cfg: &NetConfig) -> Result<quinn::TransportConfig> {
    let idle = quinn::IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|_| NetError::Config("idle_timeout out of range".into()))?;
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(QUIC_KEEPALIVE.min(cfg.idle_timeout / 2)))
        .stream_receive_window(QUIC_STREAM_WINDOW.into())
        .receive_window(QUIC_CONN_WINDOW.into())
        .send_window(QUIC_CONN_WINDOW.into())
        // A Conn is exactly one bidirectional stream opened by the dialer;
        // nothing would ever read a second one, so none may be opened.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into());
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(QUIC_MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// Binds one listen address for the wanted transports.
async fn bind_listen_addr(
    addr: SocketAddr,
    want_tcp: bool,
    want_quic: bool,
) -> Result<(Option<TcpListener>, Option<std::net::UdpSocket>)> {
    let in_context = |e: io::Error, what: &str| {
        NetError::Io(io::Error::new(
            e.kind(),
            format!("binding {what} {addr}: {e}"),
        ))
    };
    match (want_tcp, want_quic) {
        (true, false) => Ok((
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| in_context(e, "TCP"))?,
            ),
            None,
        )),
        (false, true) => Ok((
            None,
            Some(std::net::UdpSocket::bind(addr).map_err(|e| in_context(e, "UDP"))?),
        )),
        (false, false) => Ok((None, None)),
        (true, true) => {
            let attempts = if addr.port() == 0 {
                SHARED_PORT_ATTEMPTS
            } else {
                1
            };
            let mut last = None;
            for _ in 0..attempts {
                let tcp = TcpListener::bind(addr)
                    .await
                    .map_err(|e| in_context(e, "TCP"))?;
                let port = tcp.local_addr()?.port();
                match std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), port)) {
                    Ok(udp) => return Ok((Some(tcp), Some(udp))),
                    // Another socket has this UDP port: try another TCP port.
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
                    Err(e) => return Err(in_context(e, "UDP")),
                }
            }
            let e = last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse));
            Err(in_context(e, "UDP"))
        }
    }
}

/// Maps a rustls failure seen while dialling to what the caller should know.
fn dial_handshake_error(expect: Expect, message: String) -> NetError {
    match (expect, tls::wrong_node_in(&message)) {
        (Expect::Node(expected), Some(got)) => NetError::WrongNode { expected, got },
        _ => NetError::Handshake(message),
    }
}

/// Checks what the peer's key proved against what the dial expected. The
/// verifier already enforced this; checking again costs nothing.
fn check_expected(expect: Expect, got: NodeId) -> Result<()> {
    match expect {
        Expect::Node(expected) if expected != got => Err(NetError::WrongNode { expected, got }),
        _ => Ok(()),
    }
}

fn check_preamble(got: [u8; 4]) -> Result<()> {
    if got == PREAMBLE {
        Ok(())
    } else {
        Err(NetError::Protocol("bad connection preamble".into()))
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Runs `fut` under the handshake timeout; `what` names it in the error.
async fn within<T>(
    shared: &Shared,
    what: &'static str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(shared.cfg.handshake_timeout, fut)
        .await
        .map_err(|_| NetError::Timeout(what))?
}

// ---------------------------------------------------------------- TCP

async fn dial_tcp(shared: Arc<Shared>, addr: SocketAddr, expect: Expect) -> Result<Conn> {
    if shared.is_closed() {
        return Err(NetError::Closed);
    }
    let name = ServerName::try_from(tls::server_name(expect))
        .map_err(|e| NetError::Config(format!("server name: {e}")))?;
    let config = shared.tls.client.clone();
    within(&shared, "dialling over TCP", async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let link = tcplink::client(tcp, config, name)
            .await
            .map_err(|e| match e {
                NetError::Handshake(message) => dial_handshake_error(expect, message),
                e => e,
            })?;
        let (peer, mut io) = tcp_link(link)?;
        check_expected(expect, peer)?;
        io.write_all(&PREAMBLE).await?;
        io.flush().await?;
        Ok(Conn {
            peer,
            transport: TransportKind::Tcp,
            remote: canonical(addr),
            io,
        })
    })
    .await
}

/// Who the peer of a TCP link proved to be, once it agreed on our protocol,
/// and the link.
fn tcp_link(link: tcplink::Established) -> Result<(NodeId, LinkIo)> {
    let peer = tls::peer_node_id(link.peer_certificates.as_deref())?;
    // The server offers one protocol; a client that offered none gets none.
    if link.alpn.as_deref() != Some(tls::ALPN) {
        return Err(NetError::Protocol(
            "peer did not agree on ALPN vx6/1".into(),
        ));
    }
    let io = LinkIo {
        rd: Box::new(link.reader),
        wr: Box::new(link.writer),
    };
    Ok((peer, io))
}

async fn accept_tcp(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Result<Conn> {
    tcp.set_nodelay(true)?;
    let link = tcplink::server(tcp, config).await?;
    let (peer, mut io) = tcp_link(link)?;
    let mut preamble = [0u8; 4];
    io.read_exact(&mut preamble).await?;
    check_preamble(preamble)?;
    Ok(Conn {
        peer,
        transport: TransportKind::Tcp,
        remote: canonical(remote),
        io,
    })
}

async fn run_tcp_listener(listener: TcpListener, shared: Arc<Shared>) {
    let config = shared.tls.server.clone();
    loop {
        let accepted = tokio::select! {
            () = closed_signal(shared.closed.clone()) => return,
            r = listener.accept() => r,
        };
        let (tcp, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "TCP accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let Some(permit) = shared.admit(remote) else {
            Counters::bump(&shared.counters.dropped);
            continue; // dropping `tcp` closes it
        };
        let handshake = accept_tcp(config.clone(), tcp, remote);
        tokio::spawn(run_inbound_handshake(
            shared.clone(),
            permit,
            TransportKind::Tcp,
            handshake,
        ));
    }
}

/// Drives one inbound handshake under the timeout and queues its `Conn`.
/// The permit is held until the `Conn` is queued, so handshakes in flight
/// plus finished ones nobody accepted yet stay within the limit.
async fn run_inbound_handshake(
    shared: Arc<Shared>,
    permit: Admission,
    kind: TransportKind,
    handshake: impl Future<Output = Result<Conn>>,
) {
    let outcome = tokio::select! {
        () = closed_signal(shared.closed.clone()) => return,
        r = tokio::time::timeout(shared.cfg.handshake_timeout, handshake) => r,
    };
    match outcome {
        Err(_) => {
            Counters::bump(&shared.counters.timed_out);
            debug!(%kind, "inbound handshake timed out");
        }
        Ok(Err(e)) => {
            Counters::bump(&shared.counters.failed);
            debug!(%kind, error = %e, "inbound handshake failed");
        }
        Ok(Ok(conn)) => {
            Counters::bump(&shared.counters.ok);
            debug!(%kind, peer = %conn.peer.short(), "inbound connection");
            tokio::select! {
                () = closed_signal(shared.closed.clone()) => {}
                _ = shared.inbound.send(conn) => {}
            }
        }
    }
    drop(permit);
}

// ---------------------------------------------------------------- QUIC

impl QuicTransport {
    /// Wraps a bound UDP socket in a quinn endpoint (needs a tokio runtime).
    fn new(
        shared: Arc<Shared>,
        socket: std::net::UdpSocket,
        server: Option<quinn::ServerConfig>,
    ) -> Result<Self> {
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(QUIC_MAX_UDP_PAYLOAD)
            .map_err(|e| NetError::Config(format!("QUIC endpoint: {e}")))?;
        let endpoint = quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))?;
        let local = endpoint.local_addr()?;
        Ok(Self {
            shared,
            endpoint,
            local,
        })
    }
}

fn quic_peer(conn: &quinn::Connection) -> Result<NodeId> {
    let certs = conn.peer_identity().and_then(|any| {
        any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()
    });
    tls::peer_node_id(certs.as_deref().map(Vec::as_slice))
}

fn quic_error(e: quinn::ConnectionError) -> NetError {
    match e {
        quinn::ConnectionError::TimedOut => NetError::Timeout("on an idle QUIC connection"),
        quinn::ConnectionError::LocallyClosed => NetError::Closed,
        quinn::ConnectionError::ApplicationClosed(_) => NetError::Closed,
        e => NetError::Handshake(e.to_string()),
    }
}

async fn dial_quic(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    expect: Expect,
) -> Result<Conn> {
    if shared.is_closed() {
        return Err(NetError::Closed);
    }
    let name = tls::server_name(expect);
    within(&shared, "dialling over QUIC", async {
        let connecting = endpoint
            .connect_with(shared.quic_client.clone(), addr, &name)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => NetError::Closed,
                e => NetError::Config(format!("cannot dial {addr} over QUIC: {e}")),
            })?;
        let conn = connecting.await.map_err(|e| match e {
            // Only a local TLS failure may name the presented key: a peer's
            // CONNECTION_CLOSE reason is text the peer chose.
            quinn::ConnectionError::TransportError(te) => {
                dial_handshake_error(expect, te.to_string())
            }
            e => quic_error(e),
        })?;
        let peer = quic_peer(&conn)?;
        check_expected(expect, peer)?;
        let (mut send, recv) = conn.open_bi().await.map_err(quic_error)?;
        send.write_all(&PREAMBLE)
            .await
            .map_err(|e| NetError::Io(e.into()))?;
        Ok(Conn {
            peer,
            transport: TransportKind::Quic,
            remote: canonical(addr),
            io: quic_io(send, recv, conn),
        })
    })
    .await
}

async fn accept_quic(incoming: quinn::Incoming) -> Result<Conn> {
    let remote = canonical(incoming.remote_address());
    let conn = incoming
        .accept()
        .map_err(quic_error)?
        .await
        .map_err(quic_error)?;
    let peer = quic_peer(&conn)?;
    let (send, mut recv) = conn.accept_bi().await.map_err(quic_error)?;
    let mut preamble = [0u8; 4];
    recv.read_exact(&mut preamble)
        .await
        .map_err(|e| NetError::Protocol(format!("reading the preamble: {e}")))?;
    check_preamble(preamble)?;
    Ok(Conn {
        peer,
        transport: TransportKind::Quic,
        remote,
        io: quic_io(send, recv, conn),
    })
}

async fn run_quic_listener(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            () = closed_signal(shared.closed.clone()) => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return, // endpoint closed
            },
        };
        let Some(permit) = shared.admit(incoming.remote_address()) else {
            Counters::bump(&shared.counters.dropped);
            incoming.refuse();
            continue;
        };
        let handshake = accept_quic(incoming);
        tokio::spawn(run_inbound_handshake(
            shared.clone(),
            permit,
            TransportKind::Quic,
            handshake,
        ));
    }
}

/// One QUIC bidirectional stream as a link; each half holds the connection,
/// so it lives exactly as long as the stream.
fn quic_io(send: quinn::SendStream, recv: quinn::RecvStream, conn: quinn::Connection) -> LinkIo {
    LinkIo {
        rd: Box::new(tokio::io::BufReader::with_capacity(
            QUIC_READ_BUF,
            QuicRecv {
                recv,
                _conn: conn.clone(),
            },
        )),
        wr: Box::new(QuicSend { send, conn }),
    }
}

struct QuicRecv {
    recv: quinn::RecvStream,
    _conn: quinn::Connection,
}

impl AsyncRead for QuicRecv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

struct QuicSend {
    send: quinn::SendStream,
    conn: quinn::Connection,
}

impl AsyncWrite for QuicSend {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().send), cx)
    }
}

impl Drop for QuicSend {
    fn drop(&mut self) {
        // Dropping `send` finishes the stream; keep the connection until the
        // peer has acknowledged all of it (or stopped the stream, or gone),
        // at most QUIC_LINGER. Outside a runtime, close at once.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.conn.clone();
        let stopped = self.send.stopped();
        runtime.spawn(async move {
            let _ = tokio::time::timeout(QUIC_LINGER, stopped).await;
            drop(conn);
        });
    }
}
