//! Streams over a relay circuit: the plumbing between a circuit's loop and
//! the local TCP sockets at its two ends (the client and the owner).
//!
//! Owns per-stream state and both levels of SENDME flow control. Each TCP
//! socket gets a reader task, which may only read when it holds a stream
//! credit *and* a circuit credit (one per DATA cell), and a writer task fed
//! by a queue that can never hold more than a stream window (the peer would
//! have to break the window to overflow it, which is a protocol violation).
//! The circuit loop calls [`StreamMux::on_msg`] for stream messages from the
//! circuit and [`StreamMux::on_event`] for what the socket tasks report; both
//! return the messages to send back on the circuit.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use vx6_circuit::flow::{CIRCUIT_SENDME_INCREMENT, STREAM_SENDME_INCREMENT, STREAM_WINDOW};
use vx6_circuit::{
    CircuitError, FlowScope, LARGE_DATA_MAX, Reason, RecvWindow, RelayMsg, SendWindow,
};
use vx6_proto::link::StreamId;

/// What a socket task reports to the circuit loop.
#[derive(Debug)]
pub enum MuxEvent {
    /// Bytes read from the socket (already paid for with credits).
    Data(StreamId, Vec<u8>),
    /// The socket reached end of input.
    Eof(StreamId),
    /// The socket failed.
    Failed(StreamId),
    /// The writer handed this many DATA cells to the socket.
    Delivered(StreamId, usize),
}

struct Entry {
    to_tcp: Option<mpsc::Sender<Vec<u8>>>,
    credit: Arc<Semaphore>,
    send: SendWindow,
    recv: RecvWindow,
    local_done: bool,
    remote_done: bool,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Tells the writer to reset the socket: a stream that did not end
    /// cleanly must look like an abort to the local application, not EOF.
    abort: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(a) = self.abort.take() {
            let _ = a.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Most DATA cells one socket write takes (128 KiB of large cells).
const WRITE_CELLS: usize = 8;

/// All streams of one circuit end.
pub struct StreamMux {
    streams: HashMap<StreamId, Entry>,
    circ_credit: Arc<Semaphore>,
    circ_send: SendWindow,
    circ_recv: RecvWindow,
    events: mpsc::UnboundedSender<MuxEvent>,
}

impl StreamMux {
    /// A mux whose socket tasks report to `events`.
    pub fn new(events: mpsc::UnboundedSender<MuxEvent>) -> Self {
        let circ_send = SendWindow::circuit();
        Self {
            streams: HashMap::new(),
            circ_credit: Arc::new(Semaphore::new(circ_send.available() as usize)),
            circ_send,
            circ_recv: RecvWindow::circuit(),
            events,
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    /// Connects stream `id` to `tcp` and starts its socket tasks.
    pub fn attach(&mut self, id: StreamId, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let (mut rd, mut wr) = tcp.into_split();
        let credit = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
        let (to_tcp, mut from_circ) = mpsc::channel::<Vec<u8>>(STREAM_WINDOW as usize);
        let ev = self.events.clone();
        let (c1, c2) = (credit.clone(), self.circ_credit.clone());
        let reader = tokio::spawn(async move {
            loop {
                // Credits first: a stalled circuit stops the reads, so TCP
                // pushes back on the sender.
                let (Ok(s), Ok(c)) = (c1.acquire().await, c2.acquire().await) else {
                    return;
                };
                // Each read lands in the buffer it is sent on in.
                let mut chunk = Vec::with_capacity(LARGE_DATA_MAX);
                match rd.read_buf(&mut chunk).await {
                    Ok(0) => {
                        let _ = ev.send(MuxEvent::Eof(id));
                        return;
                    }
                    Ok(_) => {
                        s.forget();
                        c.forget();
                        if ev.send(MuxEvent::Data(id, chunk)).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = ev.send(MuxEvent::Failed(id));
                        return;
                    }
                }
            }
        });
        let ev = self.events.clone();
        let (abort_tx, mut abort_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // Polled at most until it resolves: a dropped sender (clean end)
            // disables the branch for good.
            let mut abort_live = true;
            let mut batch = Vec::with_capacity(WRITE_CELLS);
            loop {
                tokio::select! {
                    // An abort wins over the queue closing at the same time.
                    biased;
                    r = &mut abort_rx, if abort_live => {
                        abort_live = false;
                        if r.is_ok() {
                            let _ = wr.as_ref().set_zero_linger();
                            return;
                        }
                    }
                    n = from_circ.recv_many(&mut batch, WRITE_CELLS) => {
                        if n == 0 {
                            break;
                        }
                        // Whatever is queued goes out in one write: fewer
                        // syscalls and fuller segments than a write per cell.
                        let mut slices: Vec<std::io::IoSlice<'_>> =
                            batch.iter().map(|b| std::io::IoSlice::new(b)).collect();
                        if vx6_net::channel::write_all_vectored(&mut wr, &mut slices).await.is_err() {
                            let _ = ev.send(MuxEvent::Failed(id));
                            return;
                        }
                        batch.clear();
                        let _ = ev.send(MuxEvent::Delivered(id, n));
                    }
                }
            }
            // The peer ended the stream: half-close our side.
            let _ = wr.shutdown().await;
        });
        self.streams.insert(
            id,
            Entry {
                to_tcp: Some(to_tcp),
                credit,
                send: SendWindow::stream(),
                recv: RecvWindow::stream(),
                local_done: false,
                remote_done: false,
                // The writer is not aborted: on an abort it resets the socket
                // and ends by itself.
                tasks: vec![reader.abort_handle()],
                abort: Some(abort_tx),
            },
        );
    }

    /// Forgets a stream (its sockets close).
    pub fn remove(&mut self, id: StreamId) {
        self.streams.remove(&id);
    }

    /// Forgets a stream that ended cleanly both ways. Its writer may still
    /// be flushing the last bytes to the socket: let it finish (it ends by
    /// itself once its queue is drained) instead of aborting it.
    fn reap(&mut self, id: StreamId) {
        if let Some(mut e) = self.streams.remove(&id) {
            if e.local_done && e.remote_done {
                e.tasks.clear();
                e.abort = None;
            } else {
                self.streams.insert(id, e);
            }
        }
    }

    /// A stream message from the circuit. Returns messages to send back; an
    /// error is a protocol violation that ends the circuit.
    pub fn on_msg(&mut self, msg: RelayMsg) -> Result<Vec<RelayMsg>, CircuitError> {
        let mut out = Vec::new();
        match msg {
            RelayMsg::Data { stream, data } => {
                self.circ_recv.on_data_received()?;
                let Some(e) = self.streams.get_mut(&stream) else {
                    // A stream we closed: the cell still counts as delivered.
                    if self.circ_recv.on_data_delivered()? {
                        out.push(RelayMsg::Sendme(FlowScope::Circuit));
                    }
                    return Ok(out);
                };
                e.recv.on_data_received()?;
                match e.to_tcp.as_ref().map(|t| t.try_send(data)) {
                    Some(Ok(())) => {}
                    Some(Err(mpsc::error::TrySendError::Full(_))) => {
                        return Err(CircuitError::Usage("stream window overflow"));
                    }
                    _ => {
                        if self.circ_recv.on_data_delivered()? {
                            out.push(RelayMsg::Sendme(FlowScope::Circuit));
                        }
                    }
                }
            }
            RelayMsg::End { stream, .. } => {
                if let Some(e) = self.streams.get_mut(&stream) {
                    e.remote_done = true;
                    e.to_tcp = None;
                }
                self.reap(stream);
            }
            RelayMsg::Sendme(FlowScope::Circuit) => {
                self.circ_send.on_sendme()?;
                self.circ_credit
                    .add_permits(CIRCUIT_SENDME_INCREMENT as usize);
            }
            RelayMsg::Sendme(FlowScope::Stream(s)) => {
                if let Some(e) = self.streams.get_mut(&s) {
                    e.send.on_sendme()?;
                    e.credit.add_permits(STREAM_SENDME_INCREMENT as usize);
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// An event from a socket task. Returns messages to send on the circuit.
    pub fn on_event(&mut self, ev: MuxEvent) -> Result<Vec<RelayMsg>, CircuitError> {
        let mut out = Vec::new();
        match ev {
            MuxEvent::Data(stream, data) => {
                if let Some(e) = self.streams.get_mut(&stream) {
                    e.send.on_data_sent()?;
                    self.circ_send.on_data_sent()?;
                    out.push(RelayMsg::Data { stream, data });
                }
            }
            MuxEvent::Eof(stream) => {
                if let Some(e) = self.streams.get_mut(&stream) {
                    e.local_done = true;
                    out.push(RelayMsg::End {
                        stream,
                        reason: Reason::Done,
                    });
                }
                self.reap(stream);
            }
            MuxEvent::Failed(stream) => {
                if self.streams.remove(&stream).is_some() {
                    out.push(RelayMsg::End {
                        stream,
                        reason: Reason::TargetFailed,
                    });
                }
            }
            MuxEvent::Delivered(stream, n) => {
                for _ in 0..n {
                    if self.circ_recv.on_data_delivered()? {
                        out.push(RelayMsg::Sendme(FlowScope::Circuit));
                    }
                    if let Some(e) = self.streams.get_mut(&stream)
                        && e.recv.on_data_delivered()?
                    {
                        out.push(RelayMsg::Sendme(FlowScope::Stream(stream)));
                    }
                }
            }
        }
        Ok(out)
    }
}
