//! Circuit queues: where a channel's reader leaves each circuit's cells until
//! the circuit's task takes them, and the memory all of them hold together.
//!
//! A queue holds at most [`CIRCUIT_QUEUE`] cells. The queues that share one
//! [`CellMemory`] (a node shares one among all its channels) hold at most its
//! limit in cell bytes (give or take a cell per channel reader pushing at the
//! same moment), except that a circuit with less than [`FAIR_SHARE`] queued
//! is never refused: when memory is short the circuits holding the
//! most lose their cells, not the ones that hold little. A refused push ends
//! that circuit only (the channel sends DESTROY); what was queued stays for
//! the circuit's task to take. Without this, every relayed circuit whose next
//! hop reads slowly (a relay the client chose) could hold a full queue —
//! 8 MiB each — at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;
use vx6_proto::link::Cmd;

/// Cells one circuit may have waiting before its reader must take them:
/// twice the DATA an honest end may have in flight (the circuit window),
/// and at most 8 MiB of large cells. A circuit whose peer overflows it is
/// ended (that circuit only).
pub const CIRCUIT_QUEUE: usize = 512;

/// Bytes a circuit may always have queued, however full the shared memory
/// is: 64 large cells, a quarter of an honest circuit window.
pub const FAIR_SHARE: usize = 1 << 20;

/// The default limit of a [`CellMemory`]: 256 MiB (a node takes its own
/// from `relay.max_queued_mib`).
pub const CELL_MEMORY_DEFAULT: usize = 256 << 20;

/// One link-level circuit message (CREATE, CREATED, RELAY or DESTROY).
#[derive(Debug, Clone)]
pub struct CircuitCell {
    pub cmd: Cmd,
    pub payload: Bytes,
}

/// Cell bytes the circuit queues sharing it may hold together.
#[derive(Debug)]
pub struct CellMemory {
    limit: usize,
    used: AtomicUsize,
}

impl CellMemory {
    pub fn new(limit_bytes: usize) -> Self {
        Self {
            limit: limit_bytes,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes queued now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Default for CellMemory {
    fn default() -> Self {
        Self::new(CELL_MEMORY_DEFAULT)
    }
}

/// What one circuit's queue holds, counted in its own total and the shared one.
#[derive(Debug)]
struct Held {
    queued: AtomicUsize,
    memory: Arc<CellMemory>,
}

impl Held {
    fn take(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.memory.used.fetch_add(n, Ordering::Relaxed);
    }

    fn give_back(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.memory.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push {
    Queued,
    /// The circuit's task is gone; the cell is dropped.
    Gone,
    /// The queue is full, or memory is short and this circuit holds more
    /// than its fair share: the circuit must end.
    Refused,
}

/// The reader's end of one circuit's queue.
#[derive(Debug, Clone)]
pub(crate) struct QueueTx {
    tx: mpsc::Sender<CircuitCell>,
    held: Arc<Held>,
}

/// The circuit task's end.
#[derive(Debug)]
pub(crate) struct QueueRx {
    rx: mpsc::Receiver<CircuitCell>,
    held: Arc<Held>,
}

/// A new, empty queue whose cells count against `memory`.
pub(crate) fn queue(memory: &Arc<CellMemory>) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(CIRCUIT_QUEUE);
    let held = Arc::new(Held {
        queued: AtomicUsize::new(0),
        memory: memory.clone(),
    });
    (
        QueueTx {
            tx,
            held: held.clone(),
        },
        QueueRx { rx, held },
    )
}

impl QueueTx {
    pub(crate) fn push(&self, cell: CircuitCell) -> Push {
        let n = cell.payload.len();
        let mem = &self.held.memory;
        if mem.used().saturating_add(n) > mem.limit
            && self.held.queued.load(Ordering::Relaxed) >= FAIR_SHARE
        {
            return Push::Refused;
        }
        // Counted before it is queued, so the taker never gives back bytes
        // that were not counted.
        self.held.take(n);
        match self.tx.try_send(cell) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.held.give_back(n);
                Push::Refused
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.held.give_back(n);
                Push::Gone
            }
        }
    }

    /// Whether both are ends of the same queue.
    pub(crate) fn same_queue(&self, other: &QueueTx) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

impl QueueRx {
    pub(crate) async fn recv(&mut self) -> Option<CircuitCell> {
        let cell = self.rx.recv().await?;
        self.held.give_back(cell.payload.len());
        Some(cell)
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        // Whatever is still queued is freed with the queue: give it back.
        self.rx.close();
        while let Ok(cell) = self.rx.try_recv() {
            self.held.give_back(cell.payload.len());
        }
    }
}
