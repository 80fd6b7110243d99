//! Channels: the stream multiplexer over one authenticated connection.
//!
//! A [`Channel`] owns one [`Conn`] (TLS over TCP or one QUIC stream) and runs
//! two tasks: a reader that decodes and length-checks every frame
//! (PROTOCOL.md §5) and dispatches it, and a writer that batches queued
//! frames into few large writes. Streams on the direct circuit (circuit 0)
//! carry forwarded connections and node RPCs. Stream ids are never reused:
//! the dialer opens odd ids, the acceptor even ones, each in increasing
//! order.
//!
//! Flow control is credit based at two levels, as in HTTP/2: every stream
//! and the channel as a whole have a receive window. A sender waits for
//! credit; a receiver grants credit back (WINDOW) as the application reads,
//! one update per half window, and tears the channel down as soon as the
//! peer sends a byte more than it was granted. So a slow reader slows its
//! writer, and the memory a peer can make us hold per channel is bounded by
//! the channel window, whatever it sends. Bytes nobody will read (a stream
//! that was reset or dropped) are credited back at once. The windows are not
//! negotiated: both ends must run with the same [`ChannelConfig`] windows.
//!
//! Queues, in the order the writer serves them:
//! - control (WINDOW, PING/PONG, the GOAWAY of an immediate close, and the
//!   BUSY resets that refuse streams the peer opened), bounded by the
//!   protocol itself: window updates by the credit the peer can use, at most
//!   one pong outstanding, and at most `max(max_streams, 64)` refusals
//!   waiting (a peer that keeps opening streams without reading the
//!   refusals is cut off);
//! - ordered (OPEN, DATA, FIN and RESET of our streams, and the GOAWAY of a
//!   channel that closes once idle), in the order they were issued, so FIN
//!   follows the data it ends, a RESET never overtakes its stream's OPEN or
//!   data, and a retiring channel writes its last answers before leaving.
//!   OPEN, DATA and FIN each hold one of `write_queue` slots until the
//!   writer takes them; a RESET needs none (there is at most one per
//!   stream).
//!
//! Liveness: the writer sends a PING when it wrote nothing for `keepalive`;
//! the channel closes when no whole frame arrived for `idle_timeout`, or a
//! write made no progress for that long. Closing (locally, by GOAWAY, on a
//! protocol error or a dead connection) fails every stream, wakes every
//! waiting sender and receiver, and ends [`Incoming`].
//!
//! This module must never trust a length, id or credit the peer sends, and
//! never let a peer grow a queue without bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc, watch};
use vx6_proto::NodeId;
use vx6_proto::link::{
    CircId, Cmd, FRAME_HEADER_LEN, FrameHeader, MAX_DATA_PAYLOAD, MAX_OPEN_PAYLOAD, StreamId, code,
    decode_u32_payload,
};
use vx6_proto::record::TransportKind;

pub use crate::circuit_queue::{CIRCUIT_QUEUE, CellMemory, CircuitCell};
use crate::circuit_queue::{Push, QueueRx, QueueTx, queue};
use crate::transport::{Conn, LinkRead, LinkWrite};
use crate::{NetError, Result};

/// Bytes the writer gathers into one write. 32 KiB, not more: direct
/// mode ran 4–10 % faster than with 128 KiB batches (A/B, session 7),
/// relayed cells the same; 16 KiB was 10 % slower.
const WRITE_BATCH: usize = 32 * 1024;
/// Payloads below this are copied into the write batch; larger ones are
/// written from where they are.
const COPY_BELOW: usize = 1024;
/// How long a retired channel (a newer one to the same peer exists) stays
/// open after its last stream ended.
const RETIRE_GRACE: Duration = Duration::from_secs(2);
/// How long a closing channel may spend finishing a write and saying GOAWAY.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Shortest timer a configuration may ask for.
const MIN_TIMER: Duration = Duration::from_millis(1);
/// Lower bound of the refusals that may wait for the writer.
const MIN_REFUSALS_QUEUED: usize = 64;

/// Channel tuning. Defaults suit a forwarded bulk transfer on a LAN and a
/// peer that is hostile. Both ends of a channel must use the same windows.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Bytes a stream may have in flight before the receiver grants more.
    pub stream_window: u32,
    /// Bytes all streams of the channel together may have in flight.
    pub channel_window: u32,
    /// Concurrent streams the peer may open on this channel; more are
    /// refused with a BUSY reset.
    pub max_streams: usize,
    /// Opened streams waiting to be accepted locally; more are refused BUSY.
    pub accept_queue: usize,
    /// OPEN/DATA/FIN frames waiting for the writer.
    pub write_queue: usize,
    /// Send a PING when nothing was written for this long.
    pub keepalive: Duration,
    /// Close when no frame arrived (or no write progressed) for this long.
    pub idle_timeout: Duration,
    /// Where the channel counts: every channel given the same `Arc` adds
    /// to it (a node's totals); `None` gives each channel counters of its own.
    pub stats: Option<Arc<ChannelStats>>,
    /// The memory the channel's circuit queues share with every channel
    /// given the same `Arc` (a node's); `None`: a default-sized one of its own.
    pub cell_memory: Option<Arc<CellMemory>>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            // 8 MiB, not 1: a 1 MiB window held one loopback stream to
            // ≈ 0.85 GiB/s with CPU to spare (+25 % up, +50 % down with 4
            // or 8 MiB, A/B), and to 20 MiB/s at a 50 ms round trip. The
            // channel window still bounds what all streams may buffer.
            stream_window: 8 << 20,
            channel_window: 16 << 20,
            max_streams: 512,
            accept_queue: 128,
            write_queue: 64,
            keepalive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            stats: None,
            cell_memory: None,
        }
    }
}

impl ChannelConfig {
    /// The configuration with every value raised to the least that works.
    fn sanitized(mut self) -> Self {
        self.stream_window = self.stream_window.max(1);
        self.channel_window = self.channel_window.max(1);
        self.accept_queue = self.accept_queue.max(1);
        self.write_queue = self.write_queue.max(1);
        self.keepalive = self.keepalive.max(MIN_TIMER);
        self.idle_timeout = self.idle_timeout.max(MIN_TIMER);
        self
    }

    /// Largest DATA frame we send. At most half a window (rounded up), so a
    /// receiver that read everything and holds back less than half a window
    /// of un-granted credit always leaves room for the next frame.
    fn max_chunk(&self) -> usize {
        MAX_DATA_PAYLOAD
            .min(self.stream_window.div_ceil(2) as usize)
            .min(self.channel_window.div_ceil(2) as usize)
            .max(1)
    }
}

/// Which end of the connection this channel is; decides stream id parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// Counters for status and tests: one channel's, or the sum over every
/// channel that shares them ([`ChannelConfig::stats`]).
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Bytes read from the connection, headers included.
    pub bytes_in: AtomicU64,
    /// Bytes written to the connection, headers included.
    pub bytes_out: AtomicU64,
    /// Streams this end opened.
    pub streams_opened: AtomicU64,
    /// Streams the peer opened that were refused (too many, accept queue full).
    pub streams_refused: AtomicU64,
    /// Times the peer broke the protocol (each closes the channel).
    pub protocol_errors: AtomicU64,
    /// Circuits ended because the peer sent more cells than their queue
    /// holds, or more than their share of scarce cell memory (each ends
    /// only that circuit).
    pub circuits_overflowed: AtomicU64,
}

/// What queueing a frame took, to be given back when the writer takes it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cost {
    Free,
    /// One of `write_queue` slots.
    WriteSlot,
    /// One of the refusals allowed to wait.
    Refusal,
}

struct Frame {
    hdr: FrameHeader,
    payload: Bytes,
    cost: Cost,
}

impl Frame {
    fn new(cmd: Cmd, stream: u32, payload: Bytes) -> Self {
        let hdr = FrameHeader {
            cmd,
            circ: CircId::DIRECT,
            stream: StreamId(stream),
            len: payload.len() as u32,
        };
        Self {
            hdr,
            payload,
            cost: Cost::Free,
        }
    }
    fn u32(cmd: Cmd, stream: u32, v: u32) -> Self {
        Self::new(cmd, stream, Bytes::copy_from_slice(&v.to_be_bytes()))
    }
    fn costing(mut self, cost: Cost) -> Self {
        self.cost = cost;
        self
    }
}

/// What the reader hands a [`RecvHalf`].
enum Event {
    Data(Bytes),
    Fin,
    Reset(u32),
}

/// Per-stream state shared by the two halves and the reader.
struct StreamState {
    /// Bytes we may still send.
    credit: Semaphore,
    /// Bytes the peer may send in all: the window plus every WINDOW we
    /// queued (raised before the WINDOW is queued, so never below what the
    /// peer was told).
    recv_limit: AtomicU64,
    /// The reset code, once either end reset the stream.
    reset: OnceLock<u32>,
}

/// The reader's entry for a live stream.
struct Slot {
    tx: mpsc::UnboundedSender<Event>,
    state: Arc<StreamState>,
    /// Bytes the peer sent on this stream.
    received: u64,
    /// Our FIN is queued.
    local_done: bool,
    /// The peer's FIN arrived.
    remote_done: bool,
    /// The receive half was dropped early while the send half goes on:
    /// incoming data is discarded (and credited back).
    recv_dropped: bool,
}

struct Streams {
    map: HashMap<u32, Slot>,
    /// Entries of `map` the peer opened (what `max_streams` limits).
    remote_open: usize,
    /// The id our next stream gets; `None` once ids are exhausted.
    next_local: Option<u32>,
    /// The highest id the peer opened.
    last_remote: u32,
}

struct Shared {
    peer: NodeId,
    remote: SocketAddr,
    transport: TransportKind,
    role: Role,
    cfg: ChannelConfig,
    ordered_tx: mpsc::UnboundedSender<Frame>,
    ctrl_tx: mpsc::UnboundedSender<Frame>,
    /// Free slots of the ordered queue (OPEN/DATA/FIN).
    write_slots: Semaphore,
    streams: Mutex<Streams>,
    /// Bytes we may still send on the channel as a whole.
    chan_credit: Semaphore,
    /// Bytes the peer may send on the channel in all (see `StreamState::recv_limit`).
    chan_recv_limit: AtomicU64,
    /// Bytes consumed locally and not yet granted back.
    chan_unacked: Mutex<u64>,
    pong_pending: AtomicBool,
    refusals_queued: AtomicUsize,
    /// Close as soon as no stream is open.
    retiring: AtomicBool,
    /// Wakes a retiring channel's closer when it becomes idle.
    idle_notify: tokio::sync::Notify,
    /// A GOAWAY waits in the ordered queue.
    goaway_queued: AtomicBool,
    closed: watch::Sender<bool>,
    stats: Arc<ChannelStats>,
    /// Relay circuits on this channel: where the reader delivers their cells.
    circuits: Mutex<HashMap<u32, QueueTx>>,
    cell_memory: Arc<CellMemory>,
}

/// Cells arriving on one circuit of a channel. Dropping it forgets the
/// circuit on this channel (later cells for it are ignored).
pub struct CircuitRx {
    shared: Arc<Shared>,
    id: u32,
    rx: QueueRx,
}

impl CircuitRx {
    /// The next cell; `None` once the channel closed.
    pub async fn recv(&mut self) -> Option<CircuitCell> {
        self.rx.recv().await
    }
    pub fn id(&self) -> CircId {
        CircId(self.id)
    }
}

impl Drop for CircuitRx {
    fn drop(&mut self) {
        let empty = {
            let mut c = lock(&self.shared.circuits);
            c.remove(&self.id);
            c.is_empty()
        };
        if empty && lock(&self.shared.streams).map.is_empty() {
            self.shared.slot_removed(true);
        }
    }
}

/// A circuit the peer opened with CREATE.
pub struct IncomingCircuit {
    pub circ: CircId,
    /// The CREATE payload (handshake).
    pub create: Bytes,
    pub rx: CircuitRx,
}

/// Handle to a running channel; cheap to clone.
///
/// The channel keeps running while its tasks are alive, even when every
/// handle is dropped: close it with [`Channel::close`] (the pool does).
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.shared.peer.short())
            .field("transport", &self.shared.transport)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Streams and circuits the peer opened, in order.
pub struct Incoming {
    rx: mpsc::Receiver<IncomingStream>,
    circ_rx: mpsc::Receiver<IncomingCircuit>,
}

/// A stream the peer opened, with the payload that says what it is for.
pub struct IncomingStream {
    pub open: Bytes,
    pub send: SendHalf,
    pub recv: RecvHalf,
}

impl Incoming {
    /// The next stream the peer opened; `None` once the channel is closed.
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.rx.recv().await
    }

    /// The next circuit the peer created; `None` once the channel is closed.
    pub async fn accept_circuit(&mut self) -> Option<IncomingCircuit> {
        self.circ_rx.recv().await
    }

    /// Splits into the stream and circuit receivers, to serve both at once.
    pub fn split(self) -> (Incoming, IncomingCircuits) {
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        (
            Incoming {
                rx: self.rx,
                circ_rx: rx,
            },
            IncomingCircuits { rx: self.circ_rx },
        )
    }
}

/// The circuit half of [`Incoming::split`].
pub struct IncomingCircuits {
    rx: mpsc::Receiver<IncomingCircuit>,
}

impl IncomingCircuits {
    pub async fn accept(&mut self) -> Option<IncomingCircuit> {
        self.rx.recv().await
    }
}

impl Channel {
    /// Starts the reader and writer tasks for `conn`. Must be called inside a
    /// tokio runtime.
    pub fn spawn(conn: Conn, role: Role, cfg: ChannelConfig) -> (Channel, Incoming) {
        let cfg = cfg.sanitized();
        let (ordered_tx, ordered_rx) = mpsc::unbounded_channel();
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let (accept_tx, accept_rx) = mpsc::channel(cfg.accept_queue);
        let (circ_tx, circ_rx) = mpsc::channel(cfg.accept_queue);
        let (closed, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            peer: conn.peer,
            remote: conn.remote,
            transport: conn.transport,
            role,
            ordered_tx,
            ctrl_tx,
            write_slots: Semaphore::new(cfg.write_queue),
            streams: Mutex::new(Streams {
                map: HashMap::new(),
                remote_open: 0,
                next_local: Some(if role == Role::Dialer { 1 } else { 2 }),
                last_remote: 0,
            }),
            chan_credit: Semaphore::new(cfg.channel_window as usize),
            chan_recv_limit: AtomicU64::new(u64::from(cfg.channel_window)),
            chan_unacked: Mutex::new(0),
            pong_pending: AtomicBool::new(false),
            refusals_queued: AtomicUsize::new(0),
            retiring: AtomicBool::new(false),
            idle_notify: tokio::sync::Notify::new(),
            goaway_queued: AtomicBool::new(false),
            closed,
            stats: cfg.stats.clone().unwrap_or_default(),
            cell_memory: cfg.cell_memory.clone().unwrap_or_default(),
            circuits: Mutex::new(HashMap::new()),
            cfg,
        });
        let crate::transport::LinkIo { rd, wr } = conn.io;
        tokio::spawn(writer_task(shared.clone(), wr, ordered_rx, ctrl_rx));
        tokio::spawn(reader_task(shared.clone(), rd, accept_tx, circ_tx));
        (
            Channel { shared },
            Incoming {
                rx: accept_rx,
                circ_rx,
            },
        )
    }

    pub fn peer(&self) -> NodeId {
        self.shared.peer
    }
    pub fn remote(&self) -> SocketAddr {
        self.shared.remote
    }
    pub fn transport(&self) -> TransportKind {
        self.shared.transport
    }
    /// True when this end dialed the connection (so the peer was reached at
    /// `remote`, an address it listens on).
    pub fn is_dialer(&self) -> bool {
        self.shared.role == Role::Dialer
    }
    /// What this channel counts into (shared if its config said so).
    pub fn stats(&self) -> &ChannelStats {
        &self.shared.stats
    }
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }
    /// True when both handles refer to the same channel.
    pub fn is_same(&self, other: &Channel) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
    /// Streams currently open in either direction.
    pub fn active_streams(&self) -> usize {
        lock(&self.shared.streams).map.len()
    }

    /// Closes the channel at once: the peer is told (GOAWAY), every stream on
    /// it fails with `Closed`.
    pub fn close(&self) {
        self.shared.close(code::SHUTDOWN);
    }

    /// Closes the channel once no stream is open on it (at once if none
    /// is), after the last stream's frames are written: for a channel that
    /// was replaced by a newer one to the same peer.
    pub fn close_when_idle(&self) {
        if self.shared.retiring.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.shared
                .slot_removed(lock(&self.shared.streams).map.is_empty());
            return;
        };
        // Closes once the channel has had no stream and no circuit for
        // RETIRE_GRACE. The grace matters when both ends dial each other at
        // once: each may retire the channel the other still prefers, and a
        // stream the peer opens just then must not meet a GOAWAY.
        let sh = self.shared.clone();
        rt.spawn(async move {
            let mut closed = sh.closed.subscribe();
            let idle =
                |sh: &Shared| lock(&sh.streams).map.is_empty() && lock(&sh.circuits).is_empty();
            loop {
                if idle(&sh) {
                    tokio::select! {
                        _ = tokio::time::sleep(RETIRE_GRACE) => {}
                        _ = closed.wait_for(|c| *c) => return,
                    }
                    if idle(&sh) {
                        sh.close_after_queued(code::SHUTDOWN);
                        return;
                    }
                }
                tokio::select! {
                    _ = sh.idle_notify.notified() => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
            }
        });
    }

    /// Resolves once the channel is closed.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Opens a stream whose purpose is `open` (≤ MAX_OPEN_PAYLOAD bytes).
    /// Does not wait for the peer: a refusal arrives as a reset on the
    /// receive half.
    pub async fn open(&self, open: Bytes) -> Result<(SendHalf, RecvHalf)> {
        if open.len() > MAX_OPEN_PAYLOAD {
            return Err(NetError::Config("stream open payload too long".into()));
        }
        let sh = &self.shared;
        // Wait for queue room first, so nothing below can be cancelled halfway.
        let slot = sh
            .write_slots
            .acquire()
            .await
            .map_err(|_| NetError::Closed)?;
        let mut streams = lock(&sh.streams);
        if sh.is_closed() {
            return Err(NetError::Closed);
        }
        let Some(id) = streams.next_local else {
            return Err(NetError::Closed);
        };
        streams.next_local = id.checked_add(2);
        let halves = sh.new_stream(&mut streams, id);
        // Queued under the lock, so OPENs leave in id order as the peer requires.
        slot.forget();
        let _ = sh
            .ordered_tx
            .send(Frame::new(Cmd::Open, id, open).costing(Cost::WriteSlot));
        drop(streams);
        sh.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        Ok(halves)
    }

    /// Starts a circuit on this channel with a fresh id: random, never 0,
    /// with the top bit telling the two ends' ids apart, so ids are chosen
    /// per link and are unrelated across links.
    pub fn new_circuit(&self) -> Result<(CircId, CircuitRx)> {
        let sh = &self.shared;
        if sh.is_closed() {
            return Err(NetError::Closed);
        }
        let mut map = lock(&sh.circuits);
        for _ in 0..64 {
            let mut r = [0u8; 4];
            vx6_proto::identity::fill_random(&mut r);
            let raw = u32::from_be_bytes(r) & 0x7fff_ffff;
            let id = if sh.role == Role::Dialer {
                raw | 0x8000_0000
            } else {
                raw
            };
            if id == 0 || map.contains_key(&id) {
                continue;
            }
            let (tx, rx) = queue(&sh.cell_memory);
            map.insert(id, tx);
            return Ok((
                CircId(id),
                CircuitRx {
                    shared: sh.clone(),
                    id,
                    rx,
                },
            ));
        }
        Err(NetError::Config("no free circuit id".into()))
    }

    /// Queues a circuit cell, in order with everything else on the channel,
    /// waiting for room in the write queue.
    pub async fn send_cell(&self, circ: CircId, cmd: Cmd, payload: Bytes) -> Result<()> {
        if !cmd.is_circuit() || circ == CircId::DIRECT {
            return Err(NetError::Config("not a circuit cell".into()));
        }
        let sh = &self.shared;
        let slot = sh
            .write_slots
            .acquire()
            .await
            .map_err(|_| NetError::Closed)?;
        slot.forget();
        let hdr = FrameHeader {
            cmd,
            circ,
            stream: StreamId(0),
            len: payload.len() as u32,
        };
        sh.ordered_tx
            .send(Frame {
                hdr,
                payload,
                cost: Cost::WriteSlot,
            })
            .map_err(|_| NetError::Closed)
    }

    /// Relay circuits currently open on this channel.
    pub fn active_circuits(&self) -> usize {
        lock(&self.shared.circuits).len()
    }

    /// One request/response exchange on a fresh stream: sends `body`, ends
    /// the send side, reads the whole answer (at most `max_response` bytes)
    /// within `timeout`. On timeout the stream is reset.
    pub async fn request(
        &self,
        open: Bytes,
        body: Bytes,
        max_response: usize,
        timeout: Duration,
    ) -> Result<Bytes> {
        let fut = async {
            let (mut send, mut recv) = self.open(open).await?;
            if !body.is_empty() {
                send.send(body).await?;
            }
            send.finish().await?;
            recv.read_to_end(max_response).await
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| NetError::Timeout("waiting for a response"))?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent in a
    // way that matters more than losing the channel, so poison is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn is_remote_id(&self, id: u32) -> bool {
        // The dialer opens odd ids, so a dialer's peer opens even ones.
        id.is_multiple_of(2) == (self.role == Role::Dialer)
    }

    /// Whether `id` ever named a stream (so a late frame for it is a race,
    /// not a lie).
    fn was_opened(&self, streams: &Streams, id: u32) -> bool {
        if self.is_remote_id(id) {
            id <= streams.last_remote
        } else {
            streams.next_local.is_none_or(|next| id < next)
        }
    }

    fn new_stream(self: &Arc<Self>, streams: &mut Streams, id: u32) -> (SendHalf, RecvHalf) {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = self.cfg.stream_window;
        let state = Arc::new(StreamState {
            credit: Semaphore::new(window as usize),
            recv_limit: AtomicU64::new(u64::from(window)),
            reset: OnceLock::new(),
        });
        streams.map.insert(
            id,
            Slot {
                tx,
                state: state.clone(),
                received: 0,
                local_done: false,
                remote_done: false,
                recv_dropped: false,
            },
        );
        if self.is_remote_id(id) {
            streams.remote_open += 1;
        }
        let send = SendHalf {
            shared: self.clone(),
            id,
            state: state.clone(),
            done: false,
        };
        let recv = RecvHalf {
            shared: self.clone(),
            id,
            state,
            rx,
            unacked: 0,
            end: None,
        };
        (send, recv)
    }

    /// Removes `id`'s slot. The caller calls [`Shared::slot_removed`] after
    /// releasing the lock.
    fn take_slot(&self, streams: &mut Streams, id: u32) -> Option<Slot> {
        let slot = streams.map.remove(&id)?;
        if self.is_remote_id(id) {
            streams.remote_open = streams.remote_open.saturating_sub(1);
        }
        Some(slot)
    }

    /// Refuses a circuit with DESTROY (reason 1: resource limit) without
    /// waiting: bounded like refused streams.
    fn queue_destroy(&self, id: u32) {
        let queued = self.refusals_queued.fetch_add(1, Ordering::AcqRel);
        if queued > self.cfg.max_streams.max(MIN_REFUSALS_QUEUED) {
            self.refusals_queued.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let hdr = FrameHeader {
            cmd: Cmd::Destroy,
            circ: CircId(id),
            stream: StreamId(0),
            len: 1,
        };
        let _ = self.ctrl_tx.send(Frame {
            hdr,
            payload: Bytes::from_static(&[1]),
            cost: Cost::Refusal,
        });
    }

    /// A retiring channel that just lost its last stream or circuit: wake
    /// its closer (`close_when_idle`), or close now outside a runtime.
    fn slot_removed(&self, now_empty: bool) {
        if now_empty && self.retiring.load(Ordering::SeqCst) && lock(&self.circuits).is_empty() {
            if tokio::runtime::Handle::try_current().is_ok() {
                self.idle_notify.notify_one();
            } else {
                self.close_after_queued(code::SHUTDOWN);
            }
        }
    }

    /// Closes once the frames already queued are written: the GOAWAY goes
    /// through the ordered queue, and the writer shuts the channel down
    /// after writing it.
    fn close_after_queued(&self, goaway: u32) {
        if !self.is_closed() && !self.goaway_queued.swap(true, Ordering::SeqCst) {
            let _ = self.ordered_tx.send(Frame::u32(Cmd::GoAway, 0, goaway));
        }
    }

    fn close(&self, goaway: u32) {
        if !self.is_closed() {
            let _ = self.ctrl_tx.send(Frame::u32(Cmd::GoAway, 0, goaway));
        }
        self.shutdown();
    }

    /// Marks the channel closed and fails everything waiting on it. The
    /// tasks see the flag and stop.
    fn shutdown(&self) {
        if self.closed.send_replace(true) {
            return;
        }
        let slots: Vec<Slot> = {
            let mut streams = lock(&self.streams);
            streams.remote_open = 0;
            streams.map.drain().map(|(_, s)| s).collect()
        };
        for slot in slots {
            // Dropping the slot's sender ends its receive half with `Closed`.
            slot.state.credit.close();
        }
        self.chan_credit.close();
        self.write_slots.close();
        // Dropping the senders ends every circuit's receiver with `None`.
        lock(&self.circuits).clear();
    }

    fn protocol_error(&self, why: &str) {
        self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %self.peer.short(), why, "channel protocol error");
        self.close(code::PROTOCOL);
    }

    /// Our FIN for `id` is queued.
    fn finish_local(&self, id: u32) {
        let mut streams = lock(&self.streams);
        let Some(slot) = streams.map.get_mut(&id) else {
            return;
        };
        slot.local_done = true;
        if slot.remote_done {
            self.take_slot(&mut streams, id);
            let empty = streams.map.is_empty();
            drop(streams);
            self.slot_removed(empty);
        } else if slot.recv_dropped {
            // Nobody reads the rest: now that our side is done, stop the peer.
            drop(streams);
            self.reset_stream(id, code::CANCEL);
        }
    }

    /// Aborts `id` in both directions from our side.
    fn reset_stream(&self, id: u32, reset_code: u32) {
        let mut streams = lock(&self.streams);
        let Some(slot) = self.take_slot(&mut streams, id) else {
            return;
        };
        let _ = slot.state.reset.set(reset_code);
        slot.state.credit.close();
        let _ = slot.tx.send(Event::Reset(reset_code));
        // Ordered: the peer sees it after this stream's OPEN and data.
        let _ = self.ordered_tx.send(Frame::u32(Cmd::Reset, id, reset_code));
        let empty = streams.map.is_empty();
        drop(streams);
        self.slot_removed(empty);
    }

    /// The receive half of `id` was dropped before the end of the stream.
    fn recv_dropped(&self, id: u32) {
        let mut streams = lock(&self.streams);
        let Some(slot) = streams.map.get_mut(&id) else {
            return;
        };
        if slot.remote_done {
            return;
        }
        if slot.local_done {
            drop(streams);
            self.reset_stream(id, code::CANCEL);
        } else {
            // The send half may still answer; the peer is stopped once it
            // has (see `finish_local`), or by the send half's reset.
            slot.recv_dropped = true;
        }
    }

    /// `n` bytes were consumed locally (read, or dropped unread): grants
    /// channel credit back, one update per half window.
    fn consumed_channel(&self, n: usize) {
        if n == 0 {
            return;
        }
        let threshold = u64::from((self.cfg.channel_window / 2).max(1));
        let mut unacked = lock(&self.chan_unacked);
        *unacked += n as u64;
        if *unacked >= threshold {
            let grant = std::mem::take(&mut *unacked);
            // Raise the limit before the peer can learn of the grant.
            self.chan_recv_limit.fetch_add(grant, Ordering::AcqRel);
            let grant = u32::try_from(grant).unwrap_or(u32::MAX);
            let _ = self.ctrl_tx.send(Frame::u32(Cmd::Window, 0, grant));
        }
    }

    /// Refuses a stream the peer opened.
    fn refuse(&self, id: u32) -> Result<(), &'static str> {
        self.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
        let queued = self.refusals_queued.fetch_add(1, Ordering::AcqRel) + 1;
        if queued > self.cfg.max_streams.max(MIN_REFUSALS_QUEUED) {
            return Err("peer keeps opening streams without reading the refusals");
        }
        let frame = Frame::u32(Cmd::Reset, id, code::BUSY).costing(Cost::Refusal);
        let _ = self.ctrl_tx.send(frame);
        Ok(())
    }

    /// The error a stream operation reports once the stream is unusable.
    fn stream_error(&self, state: &StreamState) -> NetError {
        match state.reset.get() {
            Some(&c) => NetError::Reset(c),
            None => NetError::Closed,
        }
    }
}

/// The sending half of a stream. Dropping it without [`SendHalf::finish`]
/// resets the stream.
pub struct SendHalf {
    shared: Arc<Shared>,
    id: u32,
    state: Arc<StreamState>,
    done: bool,
}

impl SendHalf {
    /// Sends `data`, waiting for flow-control credit as needed.
    ///
    /// If the future is dropped, a prefix of `data` (in whole frames) may
    /// have been sent; no credit is lost.
    pub async fn send(&mut self, mut data: Bytes) -> Result<()> {
        if self.done {
            return Err(self.shared.stream_error(&self.state));
        }
        let sh = &self.shared;
        let max_chunk = sh.cfg.max_chunk();
        while !data.is_empty() {
            let n = data.len().min(max_chunk);
            let err = |_| sh.stream_error(&self.state);
            let stream_credit = self
                .state
                .credit
                .acquire_many(n as u32)
                .await
                .map_err(err)?;
            let chan_credit = sh.chan_credit.acquire_many(n as u32).await.map_err(err)?;
            let slot = sh.write_slots.acquire().await.map_err(err)?;
            // From here on nothing awaits: the credit is spent exactly when
            // the frame is queued.
            stream_credit.forget();
            chan_credit.forget();
            slot.forget();
            let frame = Frame::new(Cmd::Data, self.id, data.split_to(n)).costing(Cost::WriteSlot);
            sh.ordered_tx.send(frame).map_err(|_| NetError::Closed)?;
        }
        Ok(())
    }

    /// Half-closes: the peer reads end-of-stream after all data sent so far.
    pub async fn finish(&mut self) -> Result<()> {
        if self.done {
            return match self.state.reset.get() {
                Some(&c) => Err(NetError::Reset(c)),
                None => Ok(()),
            };
        }
        if self.state.credit.is_closed() {
            // Reset by the peer, or the channel closed.
            self.done = true;
            return Err(self.shared.stream_error(&self.state));
        }
        let sh = &self.shared;
        let slot = sh
            .write_slots
            .acquire()
            .await
            .map_err(|_| sh.stream_error(&self.state))?;
        slot.forget();
        let frame = Frame::new(Cmd::Fin, self.id, Bytes::new()).costing(Cost::WriteSlot);
        sh.ordered_tx.send(frame).map_err(|_| NetError::Closed)?;
        self.done = true;
        sh.finish_local(self.id);
        Ok(())
    }

    /// Aborts the stream in both directions.
    pub fn reset(&mut self, reset_code: u32) {
        if !self.done {
            self.done = true;
            self.shared.reset_stream(self.id, reset_code);
        }
    }

    pub fn id(&self) -> StreamId {
        StreamId(self.id)
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        // Dropping without finish() is an abort, never a silent truncation.
        self.reset(code::CANCEL);
    }
}

/// How a receive half ended.
#[derive(Clone, Copy)]
enum End {
    Fin,
    Reset(u32),
    Closed,
}

/// The receiving half of a stream.
///
/// Dropping it before the end of the stream resets the stream once the
/// send half is done too (at once if it already is); until then incoming
/// data is discarded, so an answer can still be sent.
pub struct RecvHalf {
    shared: Arc<Shared>,
    id: u32,
    state: Arc<StreamState>,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Bytes read and not yet granted back to the peer.
    unacked: u64,
    end: Option<End>,
}

impl RecvHalf {
    /// The next chunk; `Ok(None)` at a clean end of stream. Once the stream
    /// ended, every call returns the same ending.
    pub async fn recv(&mut self) -> Result<Option<Bytes>> {
        if self.end.is_none() {
            match self.rx.recv().await {
                Some(Event::Data(b)) => {
                    self.consumed(b.len());
                    return Ok(Some(b));
                }
                Some(Event::Fin) => self.end = Some(End::Fin),
                Some(Event::Reset(c)) => self.end = Some(End::Reset(c)),
                None => self.end = Some(End::Closed),
            }
        }
        match self.end {
            Some(End::Reset(c)) => Err(NetError::Reset(c)),
            Some(End::Closed) => Err(NetError::Closed),
            Some(End::Fin) | None => Ok(None),
        }
    }

    /// Reads until end of stream; more than `limit` bytes is a protocol error.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Bytes> {
        let mut out = BytesMut::new();
        while let Some(chunk) = self.recv().await? {
            if out.len() + chunk.len() > limit {
                return Err(NetError::Protocol(format!("message over {limit} bytes")));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    fn consumed(&mut self, n: usize) {
        self.unacked += n as u64;
        if self.unacked >= u64::from((self.shared.cfg.stream_window / 2).max(1)) {
            // Raise the limit before the peer can learn of the grant.
            self.state
                .recv_limit
                .fetch_add(self.unacked, Ordering::AcqRel);
            let grant = u32::try_from(self.unacked).unwrap_or(u32::MAX);
            let _ = self
                .shared
                .ctrl_tx
                .send(Frame::u32(Cmd::Window, self.id, grant));
            self.unacked = 0;
        }
        self.shared.consumed_channel(n);
    }

    pub fn id(&self) -> StreamId {
        StreamId(self.id)
    }
}

impl Drop for RecvHalf {
    fn drop(&mut self) {
        if self.end.is_none() {
            self.shared.recv_dropped(self.id);
        }
        // Credit back the bytes delivered but never read. Nothing more is
        // delivered now: the slot is gone or discards.
        let mut left = 0;
        while let Ok(ev) = self.rx.try_recv() {
            if let Event::Data(b) = ev {
                left += b.len();
            }
        }
        self.shared.consumed_channel(left);
    }
}

/// Whether the reader goes on after a frame.
enum Flow {
    Continue,
    Stop,
}

async fn reader_task(
    shared: Arc<Shared>,
    rd: Box<dyn LinkRead>,
    accept_tx: mpsc::Sender<IncomingStream>,
    circ_tx: mpsc::Sender<IncomingCircuit>,
) {
    let mut rd = FrameReader::new(rd);
    let mut closed = shared.closed.subscribe();
    let mut chan_received = 0u64;
    loop {
        let idle = shared.cfg.idle_timeout;
        let frame = tokio::select! {
            _ = closed.wait_for(|c| *c) => break,
            r = rd.next(idle) => r,
        };
        let (hdr, payload) = match frame {
            Err(ReadError::Idle) => {
                tracing::debug!(peer = %shared.peer.short(), "channel idle timeout");
                break;
            }
            Err(ReadError::Io) => break,
            Err(ReadError::Bad(why)) => {
                shared.protocol_error(why);
                break;
            }
            Ok(f) => f,
        };
        shared
            .stats
            .bytes_in
            .fetch_add((FRAME_HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        let handled = if hdr.cmd.is_circuit() {
            handle_circuit_frame(&shared, &circ_tx, hdr, payload)
        } else {
            handle_frame(&shared, &accept_tx, &mut chan_received, hdr, payload)
        };
        match handled {
            Ok(Flow::Continue) => {}
            Ok(Flow::Stop) => break,
            Err(why) => {
                shared.protocol_error(why);
                break;
            }
        }
    }
    shared.shutdown();
}

fn handle_frame(
    shared: &Arc<Shared>,
    accept_tx: &mpsc::Sender<IncomingStream>,
    chan_received: &mut u64,
    hdr: FrameHeader,
    payload: Bytes,
) -> Result<Flow, &'static str> {
    let id = hdr.stream.0;
    match hdr.cmd {
        Cmd::Open => {
            let mut streams = lock(&shared.streams);
            if !shared.is_remote_id(id) || id <= streams.last_remote {
                return Err("bad stream id in OPEN");
            }
            streams.last_remote = id;
            if streams.remote_open >= shared.cfg.max_streams {
                drop(streams);
                shared.refuse(id)?;
                return Ok(Flow::Continue);
            }
            let (send, recv) = shared.new_stream(&mut streams, id);
            drop(streams);
            let incoming = IncomingStream {
                open: payload,
                send,
                recv,
            };
            if let Err(e) = accept_tx.try_send(incoming) {
                // Accept queue full (or nobody accepts): forget the stream
                // quietly; the refusal tells the peer.
                let IncomingStream {
                    mut send, mut recv, ..
                } = e.into_inner();
                send.done = true;
                recv.end = Some(End::Closed);
                let mut streams = lock(&shared.streams);
                shared.take_slot(&mut streams, id);
                drop(streams);
                drop((send, recv));
                shared.refuse(id)?;
            }
        }
        Cmd::Data => {
            let n = payload.len();
            *chan_received += n as u64;
            if *chan_received > shared.chan_recv_limit.load(Ordering::Acquire) {
                return Err("channel window exceeded");
            }
            let mut streams = lock(&shared.streams);
            let opened = shared.was_opened(&streams, id);
            match streams.map.get_mut(&id) {
                Some(slot) => {
                    if slot.remote_done {
                        return Err("DATA after FIN");
                    }
                    slot.received += n as u64;
                    if slot.received > slot.state.recv_limit.load(Ordering::Acquire) {
                        return Err("stream window exceeded");
                    }
                    if !slot.recv_dropped && slot.tx.send(Event::Data(payload)).is_ok() {
                        return Ok(Flow::Continue);
                    }
                }
                None if !opened => {
                    return Err("DATA on a stream never opened");
                }
                // Data racing a reset.
                None => {}
            }
            drop(streams);
            // Nobody will read these bytes: credit them back at once.
            shared.consumed_channel(n);
        }
        Cmd::Window => {
            let inc = decode_u32_payload(&payload).map_err(|_| "bad WINDOW")? as usize;
            if id == 0 {
                grant(&shared.chan_credit, inc, shared.cfg.channel_window)?;
            } else {
                let state = lock(&shared.streams).map.get(&id).map(|s| s.state.clone());
                // A window for a stream we already forgot is harmless.
                if let Some(state) = state {
                    grant(&state.credit, inc, shared.cfg.stream_window)?;
                }
            }
        }
        Cmd::Fin => {
            let mut streams = lock(&shared.streams);
            let opened = shared.was_opened(&streams, id);
            match streams.map.get_mut(&id) {
                Some(slot) => {
                    if slot.remote_done {
                        return Err("second FIN");
                    }
                    slot.remote_done = true;
                    let _ = slot.tx.send(Event::Fin);
                    if slot.local_done {
                        shared.take_slot(&mut streams, id);
                        let empty = streams.map.is_empty();
                        drop(streams);
                        shared.slot_removed(empty);
                    }
                }
                None if !opened => {
                    return Err("FIN on a stream never opened");
                }
                None => {}
            }
        }
        Cmd::Reset => {
            let c = decode_u32_payload(&payload).map_err(|_| "bad RESET")?;
            let mut streams = lock(&shared.streams);
            if let Some(slot) = shared.take_slot(&mut streams, id) {
                let _ = slot.state.reset.set(c);
                slot.state.credit.close();
                let _ = slot.tx.send(Event::Reset(c));
                let empty = streams.map.is_empty();
                drop(streams);
                shared.slot_removed(empty);
            }
        }
        Cmd::Ping => {
            if !shared.pong_pending.swap(true, Ordering::AcqRel) {
                let _ = shared.ctrl_tx.send(Frame::new(Cmd::Pong, 0, payload));
            }
        }
        Cmd::Pong => {}
        Cmd::GoAway => return Ok(Flow::Stop),
        // Routed by `handle_circuit_frame` before this point.
        Cmd::Create | Cmd::Created | Cmd::Relay | Cmd::Destroy => {}
    }
    Ok(Flow::Continue)
}

/// Adds `inc` send credit, which an honest receiver never grants beyond the
/// window in total.
/// Routes a circuit cell to its circuit, or hands a CREATE for a new one to
/// the node. Cells for circuits already forgotten are dropped (they race a
/// DESTROY).
fn handle_circuit_frame(
    shared: &Arc<Shared>,
    circ_tx: &mpsc::Sender<IncomingCircuit>,
    hdr: FrameHeader,
    payload: Bytes,
) -> Result<Flow, &'static str> {
    let id = hdr.circ.0;
    let known = lock(&shared.circuits).get(&id).cloned();
    if let Some(tx) = known {
        let cell = CircuitCell {
            cmd: hdr.cmd,
            payload,
        };
        if tx.push(cell) == Push::Refused {
            // More than a circuit window, or more than its share of scarce
            // memory: the peer may be an honest relay passing on what a
            // lying end sent, so only this circuit ends. Its receiver sees
            // the circuit closed once it has taken what is queued; the peer
            // is told with DESTROY.
            {
                let mut map = lock(&shared.circuits);
                if map.get(&id).is_some_and(|t| t.same_queue(&tx)) {
                    map.remove(&id);
                }
            }
            shared
                .stats
                .circuits_overflowed
                .fetch_add(1, Ordering::Relaxed);
            shared.queue_destroy(id);
        }
        return Ok(Flow::Continue);
    }
    if hdr.cmd != Cmd::Create {
        return Ok(Flow::Continue);
    }
    // The peer picks ids with its own role bit.
    let peer_bit = if shared.role == Role::Dialer {
        0
    } else {
        0x8000_0000
    };
    if id & 0x8000_0000 != peer_bit {
        return Err("circuit id of the wrong side");
    }
    let (tx, rx) = queue(&shared.cell_memory);
    {
        let mut map = lock(&shared.circuits);
        if map.len() >= shared.cfg.max_streams {
            drop(map);
            shared.queue_destroy(id);
            return Ok(Flow::Continue);
        }
        map.insert(id, tx);
    }
    let incoming = IncomingCircuit {
        circ: CircId(id),
        create: payload,
        rx: CircuitRx {
            shared: shared.clone(),
            id,
            rx,
        },
    };
    if circ_tx.try_send(incoming).is_err() {
        // Nobody serves circuits, or too many wait: refuse (the CircuitRx
        // dropped with the error forgets the id).
        shared.queue_destroy(id);
    }
    Ok(Flow::Continue)
}

fn grant(credit: &Semaphore, inc: usize, window: u32) -> Result<(), &'static str> {
    if credit.is_closed() {
        return Ok(());
    }
    // Only the reader adds permits, so the check cannot go stale.
    if credit.available_permits().saturating_add(inc) > window as usize {
        return Err("WINDOW grants more than the window");
    }
    credit.add_permits(inc);
    Ok(())
}

enum ReadError {
    Io,
    /// No complete frame within the idle timeout.
    Idle,
    Bad(&'static str),
}

/// Reads frames out of a buffered link: each payload gets its own
/// allocation of exactly its size, filled straight from the link's buffer
/// (one copy, no zeroing), so a payload can be owned and changed in place
/// downstream (relay cells are) and never keeps a read buffer alive.
struct FrameReader<R> {
    rd: R,
}

impl<R: tokio::io::AsyncBufRead + Unpin> FrameReader<R> {
    fn new(rd: R) -> Self {
        Self { rd }
    }

    /// What the link has buffered, without waiting (and without a timer:
    /// most frames are already there).
    fn buffered(&mut self) -> std::result::Result<&[u8], ReadError> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut self.rd).poll_fill_buf(&mut cx) {
            std::task::Poll::Ready(Ok([])) => Err(ReadError::Io),
            std::task::Poll::Ready(Ok(b)) => Ok(b),
            std::task::Poll::Ready(Err(_)) => Err(ReadError::Io),
            std::task::Poll::Pending => Ok(&[]),
        }
    }

    /// Waits until the link has bytes; `Io` at end of stream or on an
    /// error, `Idle` when nothing came by `deadline`.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> std::result::Result<(), ReadError> {
        if !self.buffered()?.is_empty() {
            return Ok(());
        }
        let ready =
            std::future::poll_fn(|cx| Pin::new(&mut self.rd).poll_fill_buf(cx).map_ok(|b| b.len()));
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(Ok(n)) if n > 0 => Ok(()),
            Ok(_) => Err(ReadError::Io),
            Err(_) => Err(ReadError::Idle),
        }
    }

    /// Copies buffered bytes into `dst` until it holds `upto`; returns how
    /// many it copied.
    fn take(&mut self, dst: &mut Vec<u8>, upto: usize) -> std::result::Result<usize, ReadError> {
        let avail = self.buffered()?;
        let n = avail.len().min(upto.saturating_sub(dst.len()));
        dst.extend_from_slice(avail.get(..n).unwrap_or_default());
        Pin::new(&mut self.rd).consume(n);
        Ok(n)
    }

    /// The next frame; `Io` at end of stream or on a link error, `Idle`
    /// when the frame is not complete within `idle`. The header (and its
    /// length against the command's maximum) is checked before anything is
    /// allocated for the payload.
    async fn next(
        &mut self,
        idle: Duration,
    ) -> std::result::Result<(FrameHeader, Bytes), ReadError> {
        let deadline = tokio::time::Instant::now() + idle;
        let mut head = Vec::new();
        let hdr = loop {
            // Fast path: the whole header is in the link's buffer.
            if head.is_empty()
                && let Some(h) = self.buffered()?.first_chunk::<FRAME_HEADER_LEN>()
            {
                let hdr =
                    FrameHeader::decode(h).map_err(|_| ReadError::Bad("malformed frame header"))?;
                Pin::new(&mut self.rd).consume(FRAME_HEADER_LEN);
                break hdr;
            }
            self.fill(deadline).await?;
            self.take(&mut head, FRAME_HEADER_LEN)?;
            if let Some(h) = head.first_chunk::<FRAME_HEADER_LEN>() {
                break FrameHeader::decode(h)
                    .map_err(|_| ReadError::Bad("malformed frame header"))?;
            }
        };
        let len = hdr.len as usize;
        let mut payload = Vec::with_capacity(len);
        while payload.len() < len {
            if self.take(&mut payload, len)? == 0 {
                self.fill(deadline).await?;
            }
        }
        Ok((hdr, Bytes::from(payload)))
    }
}

async fn writer_task(
    shared: Arc<Shared>,
    mut wr: Box<dyn LinkWrite>,
    mut ordered_rx: mpsc::UnboundedReceiver<Frame>,
    mut ctrl_rx: mpsc::UnboundedReceiver<Frame>,
) {
    let mut buf = WriteBuf::default();
    let mut closed = shared.closed.subscribe();
    let period = shared.cfg.keepalive;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut wrote_since_tick = false;
    // The last write completed, so the byte stream ends on a frame boundary.
    let mut intact = true;
    loop {
        let (first, keepalive_ping) = tokio::select! {
            biased;
            _ = closed.wait_for(|c| *c) => break,
            Some(f) = ctrl_rx.recv() => (f, false),
            Some(f) = ordered_rx.recv() => (f, false),
            _ = keepalive.tick() => {
                if wrote_since_tick {
                    wrote_since_tick = false;
                    continue;
                }
                let mut nonce = [0u8; 8];
                vx6_proto::identity::fill_random(&mut nonce);
                (Frame::new(Cmd::Ping, 0, Bytes::copy_from_slice(&nonce)), true)
            }
        };
        let mut batch = Batch::default();
        batch.push(&mut buf, first, &shared);
        while buf.len() < WRITE_BATCH && !batch.going_away {
            let next = match ctrl_rx.try_recv() {
                Ok(f) => f,
                Err(_) => match ordered_rx.try_recv() {
                    Ok(f) => f,
                    Err(_) => break,
                },
            };
            batch.push(&mut buf, next, &shared);
        }
        let written = {
            let write = async {
                buf.write_to(&mut wr).await?;
                wr.flush().await
            };
            tokio::pin!(write);
            // A peer that stops reading must not pin this task (and our
            // memory) forever; a closing channel waits only briefly.
            let r = tokio::select! {
                r = tokio::time::timeout(shared.cfg.idle_timeout, &mut write) => Some(r),
                _ = closed.wait_for(|c| *c) => None,
            };
            match r {
                Some(r) => matches!(r, Ok(Ok(()))),
                None => matches!(
                    tokio::time::timeout(CLOSE_GRACE, &mut write).await,
                    Ok(Ok(()))
                ),
            }
        };
        if !written {
            intact = false;
            break;
        }
        shared
            .stats
            .bytes_out
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.clear();
        if batch.pong {
            // The pong is out: the next PING may have one.
            shared.pong_pending.store(false, Ordering::Release);
        }
        // Our own keepalive does not count as traffic, or we would ping
        // only every other period.
        wrote_since_tick |= !(keepalive_ping && batch.frames == 1);
        if batch.going_away {
            break;
        }
    }
    shared.shutdown();
    if intact {
        // Say GOAWAY if one is waiting (from close() or a protocol error).
        buf.clear();
        while let Ok(f) = ctrl_rx.try_recv() {
            if f.hdr.cmd == Cmd::GoAway {
                buf.push(&f.hdr, f.payload);
                break;
            }
        }
        if buf.len() > 0 {
            let write = async {
                buf.write_to(&mut wr).await?;
                wr.flush().await
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, write).await;
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, wr.shutdown()).await;
}

/// What one write batch holds.
#[derive(Default)]
struct Batch {
    frames: usize,
    pong: bool,
    going_away: bool,
}

impl Batch {
    fn push(&mut self, buf: &mut WriteBuf, f: Frame, shared: &Shared) {
        match f.cost {
            Cost::Free => {}
            Cost::WriteSlot => shared.write_slots.add_permits(1),
            Cost::Refusal => {
                shared.refusals_queued.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.frames += 1;
        self.pong |= f.hdr.cmd == Cmd::Pong;
        self.going_away |= f.hdr.cmd == Cmd::GoAway;
        buf.push(&f.hdr, f.payload);
    }
}

/// Writes every slice, in order, with as few calls as the writer allows
/// (`write_all` for vectored writes, which tokio does not have).
pub async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    slices: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    let mut rest = slices;
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// One write batch: headers and small payloads copied into one buffer,
/// large payloads kept as they are and written with a vectored write (TLS
/// copies them into its records anyway; a second copy here would be waste).
#[derive(Default)]
struct WriteBuf {
    small: Vec<u8>,
    segs: Vec<Seg>,
    len: usize,
    /// Scratch for writers without vectored writes.
    flat: Vec<u8>,
}

enum Seg {
    /// A range of `small`.
    Small(std::ops::Range<usize>),
    Big(Bytes),
}

impl WriteBuf {
    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.small.clear();
        self.segs.clear();
        self.len = 0;
    }

    fn copy(&mut self, b: &[u8]) {
        let start = self.small.len();
        self.small.extend_from_slice(b);
        let end = self.small.len();
        match self.segs.last_mut() {
            Some(Seg::Small(r)) if r.end == start => r.end = end,
            _ => self.segs.push(Seg::Small(start..end)),
        }
    }

    fn push(&mut self, hdr: &FrameHeader, payload: Bytes) {
        self.copy(&hdr.encode());
        self.len += FRAME_HEADER_LEN + payload.len();
        if payload.len() < COPY_BELOW {
            self.copy(&payload);
        } else {
            self.segs.push(Seg::Big(payload));
        }
    }

    async fn write_to(&mut self, wr: &mut Box<dyn LinkWrite>) -> std::io::Result<()> {
        if let Some(quic) = wr.quic_stream() {
            // quinn keeps the chunks themselves (a payload is shared, not
            // copied) where its `AsyncWrite` would copy every byte.
            let small = Bytes::from(std::mem::take(&mut self.small));
            let mut chunks: Vec<Bytes> = self
                .segs
                .iter()
                .map(|s| match s {
                    Seg::Small(r) => small.slice(r.clone()),
                    Seg::Big(b) => b.clone(),
                })
                .collect();
            return quic
                .write_all_chunks(&mut chunks)
                .await
                .map_err(std::io::Error::from);
        }
        if !wr.is_write_vectored() {
            // A writer without vectored writes (an in-memory test pipe)
            // would take one slice per call: hand it one contiguous buffer.
            let mut flat = std::mem::take(&mut self.flat);
            flat.clear();
            for seg in &self.segs {
                match seg {
                    Seg::Small(r) => {
                        flat.extend_from_slice(self.small.get(r.clone()).unwrap_or_default())
                    }
                    Seg::Big(b) => flat.extend_from_slice(b),
                }
            }
            let r = wr.write_all(&flat).await;
            self.flat = flat;
            return r;
        }
        let mut slices: Vec<std::io::IoSlice<'_>> = self
            .segs
            .iter()
            .map(|s| match s {
                Seg::Small(r) => {
                    std::io::IoSlice::new(self.small.get(r.clone()).unwrap_or_default())
                }
                Seg::Big(b) => std::io::IoSlice::new(b),
            })
            .collect();
        write_all_vectored(wr, &mut slices).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames written as one byte stream come back whole and in order,
    /// however the reads are cut (here: a pipe of `pipe` bytes, so frames
    /// straddle reads and big payloads take the read-into-payload path).
    #[tokio::test]
    async fn frame_reader_reassembles_any_cut() {
        let frames: Vec<(FrameHeader, Vec<u8>)> = [1usize, 2, 13, 1000, 5000, 32 * 1024, 7]
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let hdr = FrameHeader {
                    cmd: Cmd::Data,
                    circ: CircId::DIRECT,
                    stream: StreamId(i as u32 + 1),
                    len: len as u32,
                };
                (hdr, (0..len).map(|b| (b * 7 + i) as u8).collect())
            })
            .collect();
        let mut wire = Vec::new();
        for (h, p) in &frames {
            wire.extend_from_slice(&h.encode());
            wire.extend_from_slice(p);
        }
        for pipe in [1usize, 7, 4096, 100_000] {
            let (mut a, b) = tokio::io::duplex(pipe);
            let w = wire.clone();
            let writer = tokio::spawn(async move { a.write_all(&w).await });
            // A link buffer smaller than a header makes headers straddle.
            let mut rd = FrameReader::new(tokio::io::BufReader::with_capacity(pipe.min(8192), b));
            for (h, p) in &frames {
                let (gh, gp) = rd
                    .next(Duration::from_secs(5))
                    .await
                    .unwrap_or_else(|_| panic!("pipe {pipe}"));
                assert_eq!(
                    (gh.stream, gp.as_ref()),
                    (h.stream, p.as_slice()),
                    "pipe {pipe}"
                );
            }
            writer.await.unwrap().unwrap();
            assert!(matches!(
                rd.next(Duration::from_secs(5)).await,
                Err(ReadError::Io)
            ));
        }
    }

    #[tokio::test]
    async fn frame_reader_rejects_an_oversized_header_before_reading_on() {
        let mut h = FrameHeader {
            cmd: Cmd::Data,
            circ: CircId::DIRECT,
            stream: StreamId(1),
            len: 0,
        }
        .encode();
        // Length field (last four bytes): far above the DATA maximum.
        h[9..].copy_from_slice(&u32::MAX.to_be_bytes());
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&h).await.unwrap();
        let mut rd = FrameReader::new(tokio::io::BufReader::new(b));
        assert!(matches!(
            rd.next(Duration::from_secs(5)).await,
            Err(ReadError::Bad(_))
        ));
    }
}
