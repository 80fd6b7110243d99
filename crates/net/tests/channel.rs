//! Tests of the stream multiplexer (`channel`) and the channel pool (`pool`).
//!
//! Channels run over in-memory `tokio::io::duplex` pipes: either two real
//! channel ends, or one real end and a hand-driven "raw" peer that writes
//! frames (honest or hostile) with `FrameHeader::encode` and reads what the
//! channel answers. The pool tests use real TCP and QUIC transports on
//! loopback.

use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;
use vx6_net::NetError;
use vx6_net::channel::{
    Channel, ChannelConfig, Incoming, IncomingStream, RecvHalf, Role, SendHalf,
};
use vx6_net::pool::{Pool, StreamHandler};
use vx6_net::transport::{Conn, Expect, LinkIo, NetConfig, Transports};
use vx6_proto::link::{
    CircId, Cmd, FRAME_HEADER_LEN, FrameHeader, MAX_DATA_PAYLOAD, StreamId, code,
};
use vx6_proto::record::{Endpoint, TransportKind};
use vx6_proto::{NodeId, NodeKeypair};

const WAIT: Duration = Duration::from_secs(10);
const KIB: usize = 1024;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Panics raised outside this file (in the library or in tokio on its
/// behalf). Channel tasks are spawned, so their panics would otherwise go
/// unnoticed.
static LIB_PANICS: AtomicUsize = AtomicUsize::new(0);

fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = info
                .location()
                .is_some_and(|l| l.file().ends_with("tests/channel.rs"));
            if !ours {
                LIB_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
}

fn assert_no_lib_panics() {
    assert_eq!(
        LIB_PANICS.load(Ordering::SeqCst),
        0,
        "a channel or pool task panicked"
    );
}

fn node(b: u8) -> NodeId {
    NodeId::from_bytes([b; 32])
}

fn conn(io: DuplexStream, peer: NodeId) -> Conn {
    Conn {
        peer,
        transport: TransportKind::Tcp,
        remote: SocketAddr::from(([127, 0, 0, 1], 4242)),
        io: LinkIo::from_stream(io),
    }
}

/// Two connected channel ends: `a` dialed, `b` accepted.
fn pair(cfg: ChannelConfig) -> (Channel, Incoming, Channel, Incoming) {
    watch_panics();
    let (x, y) = tokio::io::duplex(256 * KIB);
    let (a, ai) = Channel::spawn(conn(x, node(2)), Role::Dialer, cfg.clone());
    let (b, bi) = Channel::spawn(conn(y, node(1)), Role::Acceptor, cfg);
    (a, ai, b, bi)
}

fn small_windows(stream_window: usize, channel_window: usize) -> ChannelConfig {
    ChannelConfig {
        stream_window: stream_window as u32,
        channel_window: channel_window as u32,
        ..ChannelConfig::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift64): the same stream
/// whatever the sizes of the pieces it is taken in.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            used: 8,
        }
    }
    fn take(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            let n = (8 - self.used).min(len - out.len());
            out.extend_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
        }
        out
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    Pattern::new(seed).take(len)
}

/// Sends `len` pattern bytes in pieces of an awkward size.
async fn send_pattern(send: &mut SendHalf, len: usize, seed: u64) {
    let mut p = Pattern::new(seed);
    let mut left = len;
    while left > 0 {
        let n = left.min(100_003);
        send.send(Bytes::from(p.take(n))).await.unwrap();
        left -= n;
    }
}

fn digest(data: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(data);
    h.finish()
}

/// Reads `recv` to its end; returns (bytes, hash of them).
async fn hash_all(recv: &mut RecvHalf) -> (usize, u64) {
    let mut h = std::hash::DefaultHasher::new();
    let mut n = 0;
    while let Some(chunk) = recv.recv().await.unwrap() {
        assert!(!chunk.is_empty() && chunk.len() <= MAX_DATA_PAYLOAD);
        h.write(&chunk);
        n += chunk.len();
    }
    (n, h.finish())
}

/// Reads exactly `n` bytes (the stream must deliver them in whole chunks).
async fn read_exactly(recv: &mut RecvHalf, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = timeout(WAIT, recv.recv()).await.unwrap().unwrap().unwrap();
        out.extend_from_slice(&chunk);
    }
    assert_eq!(out.len(), n, "read past the expected amount");
    out
}

async fn accept(inc: &mut Incoming) -> IncomingStream {
    timeout(WAIT, inc.accept())
        .await
        .expect("accept timed out")
        .expect("channel closed")
}

async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn expect_closed(chan: &Channel, within: Duration) {
    timeout(within, chan.closed())
        .await
        .expect("channel should have closed");
    assert!(chan.is_closed());
}

/// Echoes every stream the peer opens: reads and sends back chunk by chunk,
/// then finishes.
fn serve_echo(mut inc: Incoming) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(s) = inc.accept().await {
            tokio::spawn(echo_stream(s));
        }
    })
}

async fn echo_stream(s: IncomingStream) {
    let IncomingStream {
        mut send, mut recv, ..
    } = s;
    loop {
        match recv.recv().await {
            Ok(Some(b)) => {
                if send.send(b).await.is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = send.finish().await;
                return;
            }
            Err(_) => return,
        }
    }
}

/// A send loop in a task that counts how many bytes `send` accepted.
fn counting_sender(
    mut send: SendHalf,
    total: usize,
    piece: usize,
) -> (
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<Result<SendHalf, NetError>>,
) {
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let task = tokio::spawn(async move {
        let mut p = Pattern::new(total as u64);
        let mut done = 0;
        while done < total {
            let n = piece.min(total - done);
            send.send(Bytes::from(p.take(n))).await?;
            done += n;
            counter.store(done, Ordering::SeqCst);
        }
        Ok(send)
    });
    (sent, task)
}

// --- the raw peer --------------------------------------------------------------

/// One end of the pipe driven by hand.
struct Raw {
    io: DuplexStream,
}

impl Raw {
    async fn write_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }
    async fn frame(&mut self, cmd: Cmd, stream: u32, payload: &[u8]) {
        let hdr = FrameHeader {
            cmd,
            circ: CircId::DIRECT,
            stream: StreamId(stream),
            len: payload.len() as u32,
        };
        let mut buf = hdr.encode().to_vec();
        buf.extend_from_slice(payload);
        self.write_raw(&buf).await;
    }
    async fn word(&mut self, cmd: Cmd, stream: u32, v: u32) {
        self.frame(cmd, stream, &v.to_be_bytes()).await;
    }
    async fn open(&mut self, stream: u32) {
        self.frame(Cmd::Open, stream, b"raw").await;
    }
    /// `len` bytes of DATA on `stream`, in maximal frames.
    async fn data(&mut self, stream: u32, len: usize) {
        self.data_in(stream, len, MAX_DATA_PAYLOAD).await;
    }
    /// `len` bytes of DATA on `stream`, in frames of at most `frame` bytes.
    async fn data_in(&mut self, stream: u32, len: usize, frame: usize) {
        let mut left = len;
        while left > 0 {
            let n = left.min(frame);
            self.frame(Cmd::Data, stream, &vec![0x5a; n]).await;
            left -= n;
        }
    }
    /// The next frame, or `None` at end of stream.
    async fn read_frame(&mut self) -> Option<(FrameHeader, Vec<u8>)> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        match timeout(WAIT, self.io.read_exact(&mut h))
            .await
            .expect("raw read timed out")
        {
            Ok(_) => {}
            Err(_) => return None,
        }
        let hdr = FrameHeader::decode(&h).expect("channel sent a bad header");
        let mut p = vec![0u8; hdr.len as usize];
        self.io.read_exact(&mut p).await.unwrap();
        Some((hdr, p))
    }
    /// The next frame that is not a keepalive PING.
    async fn next(&mut self) -> (FrameHeader, Vec<u8>) {
        loop {
            let (h, p) = self.read_frame().await.expect("channel closed the pipe");
            if h.cmd != Cmd::Ping {
                return (h, p);
            }
        }
    }
    /// Reads until the channel closes the pipe; returns all frames read.
    async fn drain(&mut self) -> Vec<(FrameHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = self.read_frame().await {
            out.push(f);
        }
        out
    }
}

fn word_of(p: &[u8]) -> u32 {
    u32::from_be_bytes(p.try_into().expect("4-byte payload"))
}

/// A real channel end (acceptor, so the raw peer opens odd ids) and a raw peer.
fn raw_pair(cfg: ChannelConfig, pipe: usize) -> (Channel, Incoming, Raw) {
    watch_panics();
    let (x, y) = tokio::io::duplex(pipe);
    let (chan, inc) = Channel::spawn(conn(x, node(3)), Role::Acceptor, cfg);
    (chan, inc, Raw { io: y })
}

/// The channel must close because the peer broke the protocol, say so with
/// a GOAWAY(PROTOCOL) as its last frame, and count exactly one error.
async fn expect_protocol_close(chan: &Channel, raw: &mut Raw) {
    expect_closed(chan, Duration::from_secs(2)).await;
    let frames = raw.drain().await;
    let (h, p) = frames.last().expect("no GOAWAY before the pipe closed");
    assert_eq!(h.cmd, Cmd::GoAway, "last frame {h:?}");
    assert_eq!(word_of(p), code::PROTOCOL);
    assert_eq!(chan.stats().protocol_errors.load(Ordering::SeqCst), 1);
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 1. Bulk transfer
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_32mib_both_directions_on_one_stream() {
    const LEN: usize = 32 << 20;
    let (a, _ai, b, mut bi) = pair(ChannelConfig::default());
    let (mut a_send, mut a_recv) = a.open(Bytes::from_static(b"bulk")).await.unwrap();
    let s = accept(&mut bi).await;
    assert_eq!(&s.open[..], b"bulk");
    let IncomingStream {
        send: mut b_send,
        recv: mut b_recv,
        ..
    } = s;

    let a_tx = tokio::spawn(async move {
        send_pattern(&mut a_send, LEN, 1).await;
        a_send.finish().await.unwrap();
    });
    let b_tx = tokio::spawn(async move {
        send_pattern(&mut b_send, LEN, 2).await;
        b_send.finish().await.unwrap();
    });
    let a_rx = tokio::spawn(async move { hash_all(&mut a_recv).await });
    let b_rx = tokio::spawn(async move { hash_all(&mut b_recv).await });

    let (at, bt, ar, br) = timeout(Duration::from_secs(20), async {
        tokio::join!(a_tx, b_tx, a_rx, b_rx)
    })
    .await
    .expect("bulk transfer stalled");
    at.unwrap();
    bt.unwrap();
    assert_eq!(
        br.unwrap(),
        (LEN, digest(&pattern(LEN, 1))),
        "a -> b bytes differ"
    );
    assert_eq!(
        ar.unwrap(),
        (LEN, digest(&pattern(LEN, 2))),
        "b -> a bytes differ"
    );
    eventually("streams forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    assert_eq!(a.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_eq!(b.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_echo_their_own_data() {
    let (a, _ai, b, bi) = pair(ChannelConfig::default());
    serve_echo(bi);
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let len = 40 * KIB + 997 * i as usize;
            let (mut send, mut recv) = a.open(Bytes::from(format!("echo {i}"))).await.unwrap();
            let writer = tokio::spawn(async move {
                send_pattern(&mut send, len, 100 + i).await;
                send.finish().await.unwrap();
            });
            let back = recv.read_to_end(1 << 20).await.unwrap();
            writer.await.unwrap();
            assert!(
                back[..] == pattern(len, 100 + i)[..],
                "stream {i} echoed different bytes"
            );
        }));
    }
    timeout(Duration::from_secs(20), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("echo streams stalled");
    eventually("streams forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    assert_eq!(a.stats().streams_opened.load(Ordering::SeqCst), 100);
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 2. Flow control
// ---------------------------------------------------------------------------

#[tokio::test]
async fn stream_window_blocks_a_sender_until_the_receiver_reads() {
    const WIN: usize = 64 * KIB;
    let (a, _ai, b, mut bi) = pair(small_windows(WIN, 1 << 20));
    let (send, _a_recv) = a.open(Bytes::new()).await.unwrap();
    let (sent, task) = counting_sender(send, 200 * KIB, KIB);
    let mut s = accept(&mut bi).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sent.load(Ordering::SeqCst),
        WIN,
        "sender not held at the stream window"
    );
    // Memory bound: the receiver holds at most the window (plus headers).
    let held = b.stats().bytes_in.load(Ordering::SeqCst) as usize;
    assert!(
        held <= WIN + 200 * FRAME_HEADER_LEN,
        "receiver took in {held} bytes"
    );

    // Reading half the window releases exactly that much.
    read_exactly(&mut s.recv, WIN / 2).await;
    eventually("sender resumes", WAIT, || {
        sent.load(Ordering::SeqCst) == WIN + WIN / 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sent.load(Ordering::SeqCst), WIN + WIN / 2);

    // Reading everything lets it finish.
    let reader = tokio::spawn(async move {
        let mut n = WIN / 2;
        while let Some(c) = s.recv.recv().await.unwrap() {
            n += c.len();
        }
        n
    });
    let mut send = timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    send.finish().await.unwrap();
    assert_eq!(timeout(WAIT, reader).await.unwrap().unwrap(), 200 * KIB);
    assert_no_lib_panics();
}

#[tokio::test]
async fn channel_window_bounds_the_total_across_streams() {
    const WIN: usize = 64 * KIB;
    const CHAN: usize = 128 * KIB;
    let (a, _ai, b, mut bi) = pair(small_windows(WIN, CHAN));
    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..4 {
        let (send, recv) = a.open(Bytes::new()).await.unwrap();
        keep.push(recv);
        let (sent, task) = counting_sender(send, WIN, KIB);
        counters.push(sent);
        tasks.push(task);
    }
    let total = || {
        counters
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(), CHAN, "senders not held at the channel window");
    let held = b.stats().bytes_in.load(Ordering::SeqCst) as usize;
    assert!(
        held <= CHAN + 300 * FRAME_HEADER_LEN,
        "receiver took in {held} bytes"
    );

    // Reading every stream lets every sender finish its whole stream window.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let s = accept(&mut bi).await;
        readers.push(tokio::spawn(async move {
            // Keep the send half alive too: dropping it would reset the stream.
            let IncomingStream {
                send: _send,
                mut recv,
                ..
            } = s;
            read_exactly(&mut recv, WIN).await.len()
        }));
    }
    for t in tasks {
        timeout(WAIT, t).await.unwrap().unwrap().unwrap();
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), WIN);
    }
    assert_eq!(total(), 4 * WIN);
    assert_no_lib_panics();
}

#[tokio::test]
async fn dropping_a_recv_half_with_unread_data_returns_channel_credit() {
    const WIN: usize = 64 * KIB;
    let (a, _ai, _b, mut bi) = pair(small_windows(WIN, 2 * WIN));
    // Two streams fill the channel window; the receiver reads neither.
    let mut first = Vec::new();
    for _ in 0..2 {
        let (send, recv) = a.open(Bytes::new()).await.unwrap();
        let (sent, task) = counting_sender(send, WIN, 4 * KIB);
        first.push((sent, task, recv));
    }
    let s1 = accept(&mut bi).await;
    let _s2 = accept(&mut bi).await;
    eventually("channel window used up", WAIT, || {
        first.iter().all(|(s, ..)| s.load(Ordering::SeqCst) == WIN)
    })
    .await;

    // A third stream cannot send anything.
    let (send, _recv3) = a.open(Bytes::new()).await.unwrap();
    let (sent3, task3) = counting_sender(send, WIN, 4 * KIB);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sent3.load(Ordering::SeqCst), 0);

    // Dropping stream 1 unread gives its 64 KiB of channel credit back.
    drop(s1);
    let mut s3 = accept(&mut bi).await;
    assert_eq!(read_exactly(&mut s3.recv, WIN).await.len(), WIN);
    timeout(WAIT, task3).await.unwrap().unwrap().unwrap();
    // The sender of the dropped stream learns it was cancelled.
    let (_, _, mut recv1) = first.remove(0);
    assert!(matches!(
        timeout(WAIT, recv1.recv()).await.unwrap(),
        Err(NetError::Reset(code::CANCEL))
    ));
    assert_no_lib_panics();
}

#[tokio::test]
async fn data_racing_a_reset_returns_channel_credit() {
    const WIN: usize = 64 * KIB;
    let (chan, mut inc, mut raw) = raw_pair(small_windows(WIN, WIN), 1 << 20);
    raw.open(1).await;
    drop(accept(&mut inc).await); // refuses stream 1 with a RESET
    let (h, p) = raw.next().await;
    assert_eq!(
        (h.cmd, h.stream.0, word_of(&p)),
        (Cmd::Reset, 1, code::CANCEL)
    );
    // The peer had sent a full window on stream 1 before it saw the reset.
    raw.data(1, WIN).await;
    let mut granted = 0;
    while granted < WIN {
        let (h, p) = raw.next().await;
        assert_eq!((h.cmd, h.stream.0), (Cmd::Window, 0), "unexpected {h:?}");
        granted += word_of(&p) as usize;
    }
    assert_eq!(granted, WIN);
    // The credit is really usable: a new stream may use the whole window.
    raw.open(3).await;
    raw.data(3, WIN).await;
    let mut s = accept(&mut inc).await;
    assert_eq!(read_exactly(&mut s.recv, WIN).await.len(), WIN);
    assert!(!chan.is_closed());
    assert_eq!(chan.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_no_lib_panics();
}

#[tokio::test]
async fn unread_data_of_a_stream_the_peer_reset_returns_channel_credit() {
    const WIN: usize = 64 * KIB;
    let (chan, mut inc, mut raw) = raw_pair(small_windows(WIN, WIN), 1 << 20);
    // The application sees the reset code (after any data that came first).
    raw.open(1).await;
    raw.data(1, 100).await;
    raw.word(Cmd::Reset, 1, 7).await;
    let mut s = accept(&mut inc).await;
    let err = loop {
        match timeout(WAIT, s.recv.recv()).await.unwrap() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("reset stream ended cleanly"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, NetError::Reset(7)), "{err:?}");
    drop(s);
    // A stream reset with a full window unread, then dropped unread, gives
    // all its channel credit back.
    raw.open(3).await;
    raw.data(3, WIN - 100).await;
    raw.word(Cmd::Reset, 3, 7).await;
    let s = accept(&mut inc).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    let mut granted = 0;
    while granted < WIN {
        let (h, p) = raw.next().await;
        if h.cmd == Cmd::Window && h.stream.0 == 0 {
            granted += word_of(&p) as usize;
        }
    }
    assert_eq!(granted, WIN);
    assert!(!chan.is_closed());
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 3. Half-close
// ---------------------------------------------------------------------------

#[tokio::test]
async fn half_close_lets_the_other_direction_continue() {
    let (a, _ai, _b, mut bi) = pair(ChannelConfig::default());
    let (mut a_send, mut a_recv) = a.open(Bytes::from_static(b"hc")).await.unwrap();
    a_send.send(Bytes::from_static(b"question")).await.unwrap();
    a_send.finish().await.unwrap();
    assert!(
        a_send.send(Bytes::from_static(b"more")).await.is_err(),
        "send after finish"
    );

    let IncomingStream {
        send: mut b_send,
        recv: mut b_recv,
        ..
    } = accept(&mut bi).await;
    assert_eq!(&b_recv.read_to_end(1024).await.unwrap()[..], b"question");
    assert!(
        b_recv.recv().await.unwrap().is_none(),
        "end of stream is sticky"
    );

    // B keeps sending long after A finished; A keeps receiving.
    let writer = tokio::spawn(async move {
        for i in 0..20u64 {
            b_send
                .send(Bytes::from(pattern(50 * KIB, i)))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b_send.finish().await.unwrap();
    });
    let back = timeout(WAIT, a_recv.read_to_end(4 << 20))
        .await
        .unwrap()
        .unwrap();
    let want: Vec<u8> = (0..20u64).flat_map(|i| pattern(50 * KIB, i)).collect();
    assert!(back == want);
    writer.await.unwrap();
    eventually("stream forgotten", WAIT, || a.active_streams() == 0).await;
    assert_no_lib_panics();
}

/// A pipe end that counts the writes made to it.
struct CountingIo {
    inner: DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl tokio::io::AsyncRead for CountingIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountingIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn the_writer_batches_small_frames_in_order() {
    watch_panics();
    let (x, y) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(AtomicUsize::new(0));
    let io = CountingIo {
        inner: x,
        writes: writes.clone(),
    };
    let c = Conn {
        peer: node(3),
        transport: TransportKind::Tcp,
        remote: SocketAddr::from(([127, 0, 0, 1], 4242)),
        io: LinkIo::from_stream(io),
    };
    let (chan, _inc) = Channel::spawn(c, Role::Dialer, ChannelConfig::default());
    let mut raw = Raw { io: y };
    // Queue many small frames without yielding to the writer in between.
    let (mut send, _recv) = chan.open(Bytes::from_static(b"batch")).await.unwrap();
    for i in 0..60u8 {
        send.send(Bytes::from(vec![i; 100])).await.unwrap();
    }
    send.finish().await.unwrap();
    let (h, _) = raw.next().await;
    assert_eq!((h.cmd, h.stream.0), (Cmd::Open, 1));
    for i in 0..60u8 {
        let (h, p) = raw.next().await;
        assert_eq!(h.cmd, Cmd::Data);
        assert_eq!(p, vec![i; 100], "DATA out of order");
    }
    assert_eq!(raw.next().await.0.cmd, Cmd::Fin);
    let n = writes.load(Ordering::SeqCst);
    assert!(n <= 4, "62 small frames took {n} writes");
    assert_no_lib_panics();
}

#[tokio::test]
async fn fin_arrives_after_all_data() {
    let cfg = ChannelConfig {
        write_queue: 2,
        ..ChannelConfig::default()
    };
    let (a, _ai, _b, mut bi) = pair(cfg);
    for round in 0..5u64 {
        let (mut send, _recv) = a.open(Bytes::new()).await.unwrap();
        let len = (3 << 20) + round as usize * 12345;
        let data = Bytes::from(pattern(len, round));
        // finish() right behind one large send: FIN must not overtake any DATA.
        let writer = tokio::spawn(async move {
            send.send(data).await.unwrap();
            send.finish().await.unwrap();
        });
        let mut s = accept(&mut bi).await;
        let got = timeout(WAIT, s.recv.read_to_end(8 << 20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), len, "round {round}");
        assert_eq!(digest(&got), digest(&pattern(len, round)));
        writer.await.unwrap();
    }
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 4. Reset
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dropping_a_send_half_resets_the_stream() {
    let (a, _ai, b, mut bi) = pair(ChannelConfig::default());
    let (mut send, recv) = a.open(Bytes::new()).await.unwrap();
    send.send(Bytes::from_static(b"partial")).await.unwrap();
    drop(send); // no finish(): an abort, never a silent truncation
    drop(recv);
    let mut s = accept(&mut bi).await;
    let mut got = Vec::new();
    let err = loop {
        match timeout(WAIT, s.recv.recv()).await.unwrap() {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => panic!("aborted stream ended cleanly"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, NetError::Reset(code::CANCEL)), "{err:?}");
    assert!(got.is_empty() || got == b"partial");
    eventually("streams forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    assert_no_lib_panics();
}

#[tokio::test]
async fn reset_code_reaches_the_peer_and_stops_its_sender() {
    let (a, _ai, b, mut bi) = pair(ChannelConfig::default());
    let (mut send, _recv) = a.open(Bytes::new()).await.unwrap();
    let IncomingStream {
        send: mut b_send,
        recv: mut b_recv,
        ..
    } = accept(&mut bi).await;
    send.reset(42);
    let err = timeout(WAIT, b_recv.recv()).await.unwrap().unwrap_err();
    assert!(matches!(err, NetError::Reset(42)), "{err:?}");
    // The reset covers both directions: B can no longer send either.
    let err = b_send.send(Bytes::from_static(b"late")).await.unwrap_err();
    assert!(matches!(err, NetError::Reset(42)), "{err:?}");
    assert!(b_send.finish().await.is_err());
    // Resetting twice or after the fact is harmless.
    send.reset(43);
    eventually("streams forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    assert!(!a.is_closed() && !b.is_closed());
    assert_no_lib_panics();
}

#[tokio::test]
async fn a_reset_never_overtakes_its_open() {
    // The channel's writer is stuck behind a peer that does not read yet, so
    // OPEN for stream 4 is still queued when the stream is dropped.
    let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1024);
    let (mut s2, _r2) = chan.open(Bytes::from_static(b"first")).await.unwrap();
    let filler = tokio::spawn(async move {
        s2.send(Bytes::from(vec![1u8; 200 * KIB])).await.unwrap();
        s2
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s4, r4) = chan.open(Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(s4.id(), StreamId(4));
    drop((s4, r4));
    let mut seen = Vec::new();
    loop {
        let (h, _) = raw.next().await;
        if h.stream.0 == 4 {
            seen.push(h.cmd);
            if h.cmd == Cmd::Reset {
                break;
            }
        }
    }
    assert_eq!(seen, [Cmd::Open, Cmd::Reset], "RESET overtook OPEN");
    drop(filler);
    assert_no_lib_panics();
}

#[tokio::test]
async fn a_responder_that_drops_its_recv_half_still_delivers_its_answer() {
    // Like a catalog handler: answer, finish, drop the request side unread.
    let (a, _ai, b, mut bi) = pair(ChannelConfig::default());
    tokio::spawn(async move {
        while let Some(s) = bi.accept().await {
            tokio::spawn(async move {
                let IncomingStream { mut send, recv, .. } = s;
                send.send(Bytes::from(pattern(300 * KIB, 9))).await.unwrap();
                send.finish().await.unwrap();
                drop(recv);
            });
        }
    });
    for _ in 0..30 {
        let got = a
            .request(Bytes::from_static(b"catalog"), Bytes::new(), 1 << 20, WAIT)
            .await
            .unwrap();
        assert!(got[..] == pattern(300 * KIB, 9)[..]);
    }
    eventually("streams forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 5. Hostile peer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hostile_data_beyond_the_stream_window_closes_the_channel() {
    const WIN: usize = 64 * KIB;
    let (chan, mut inc, mut raw) = raw_pair(small_windows(WIN, 1 << 20), 1 << 20);
    raw.open(1).await;
    raw.data(1, WIN).await;
    let mut s = accept(&mut inc).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!chan.is_closed(), "a full but not exceeded window is fine");
    raw.data(1, 1).await;
    expect_protocol_close(&chan, &mut raw).await;
    // What arrived before is still readable; then the stream fails.
    let mut n = 0;
    while let Ok(Some(c)) = s.recv.recv().await {
        n += c.len();
    }
    assert!(n <= WIN);
}

#[tokio::test]
async fn hostile_data_beyond_the_granted_window_closes_the_channel() {
    // Bytes read but not yet granted back (less than half a window) must not
    // count as credit.
    const WIN: usize = 64 * KIB;
    let (chan, mut inc, mut raw) = raw_pair(small_windows(WIN, 1 << 20), 1 << 20);
    raw.open(1).await;
    raw.data_in(1, WIN, 8 * KIB).await;
    let mut s = accept(&mut inc).await;
    // Read 16 KiB: below the half window, so no WINDOW is sent.
    let mut n = 0;
    while n < 16 * KIB {
        n += s.recv.recv().await.unwrap().unwrap().len();
    }
    raw.data(1, 16 * KIB).await;
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_data_beyond_the_channel_window_closes_the_channel() {
    const WIN: usize = 64 * KIB;
    let (chan, _inc, mut raw) = raw_pair(small_windows(WIN, 96 * KIB), 1 << 20);
    raw.open(1).await;
    raw.open(3).await;
    raw.data(1, WIN).await;
    raw.data(3, 32 * KIB).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!chan.is_closed());
    raw.data(3, 1).await;
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_open_with_the_wrong_parity_closes_the_channel() {
    let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    raw.open(2).await; // the acceptor's parity
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_open_reusing_an_id_closes_the_channel() {
    for ids in [[1u32, 1], [5, 3]] {
        let (chan, mut inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
        raw.open(ids[0]).await;
        let _s = accept(&mut inc).await;
        raw.open(ids[1]).await;
        expect_protocol_close(&chan, &mut raw).await;
    }
}

#[tokio::test]
async fn hostile_frames_for_streams_that_never_existed_close_the_channel() {
    for cmd in [Cmd::Data, Cmd::Fin] {
        let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
        raw.open(1).await;
        let payload: &[u8] = if cmd == Cmd::Data { b"x" } else { b"" };
        raw.frame(cmd, 9, payload).await; // odd, but never opened
        expect_protocol_close(&chan, &mut raw).await;
    }
}

#[tokio::test]
async fn hostile_data_after_fin_closes_the_channel() {
    let (chan, mut inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    raw.open(1).await;
    raw.frame(Cmd::Fin, 1, b"").await;
    let _s = accept(&mut inc).await;
    raw.data(1, 10).await;
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_oversized_length_prefix_closes_the_channel() {
    for len in [u32::MAX, (MAX_DATA_PAYLOAD + 1) as u32] {
        let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
        raw.open(1).await;
        let hdr = FrameHeader {
            cmd: Cmd::Data,
            circ: CircId::DIRECT,
            stream: StreamId(1),
            len,
        };
        // Only the header: a reader that trusted the length would wait (or
        // allocate) instead of closing.
        raw.write_raw(&hdr.encode()).await;
        expect_protocol_close(&chan, &mut raw).await;
    }
}

#[tokio::test]
async fn hostile_unknown_command_closes_the_channel() {
    let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    let mut h = FrameHeader {
        cmd: Cmd::Ping,
        circ: CircId::DIRECT,
        stream: StreamId(0),
        len: 8,
    }
    .encode();
    h[0] = 0x63;
    raw.write_raw(&h).await;
    raw.write_raw(&[0; 8]).await;
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_relay_circuit_closes_the_channel() {
    let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    let hdr = FrameHeader {
        cmd: Cmd::Open,
        circ: CircId(7),
        stream: StreamId(1),
        len: 0,
    };
    raw.write_raw(&hdr.encode()).await;
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_window_overgrant_closes_the_channel() {
    // Channel level: nothing was sent, so no credit can be returned.
    let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    raw.word(Cmd::Window, 0, 1).await;
    expect_protocol_close(&chan, &mut raw).await;

    // Stream level, after some honest use of the stream.
    const WIN: usize = 64 * KIB;
    let (chan, _inc, mut raw) = raw_pair(small_windows(WIN, 1 << 20), 1 << 20);
    let (mut send, _recv) = chan.open(Bytes::new()).await.unwrap();
    send.send(Bytes::from(vec![0u8; 40 * KIB])).await.unwrap();
    let mut got = 0;
    while got < 40 * KIB {
        let (h, p) = raw.next().await;
        if h.cmd == Cmd::Data {
            got += p.len();
        }
    }
    raw.word(Cmd::Window, 2, 40 * KIB as u32).await; // honest: returns what was sent
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!chan.is_closed());
    raw.word(Cmd::Window, 2, 1).await; // one byte more than was ever sent
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn hostile_ping_flood_queues_at_most_one_pong() {
    let cfg = ChannelConfig {
        idle_timeout: Duration::from_secs(20),
        ..ChannelConfig::default()
    };
    // A small pipe: the channel's writer blocks almost at once.
    let (chan, _inc, mut raw) = raw_pair(cfg, 512);
    const PINGS: usize = 20_000;
    let mut flood = Vec::with_capacity(PINGS * 21);
    for i in 0..PINGS as u64 {
        let hdr = FrameHeader {
            cmd: Cmd::Ping,
            circ: CircId::DIRECT,
            stream: StreamId(0),
            len: 8,
        };
        flood.extend_from_slice(&hdr.encode());
        flood.extend_from_slice(&i.to_be_bytes());
    }
    raw.write_raw(&flood).await; // the channel reads all of it
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!chan.is_closed());
    // Now read whatever the channel queued meanwhile.
    let mut pongs = 0;
    while let Ok(Some((h, _))) = timeout(Duration::from_millis(300), raw.read_frame()).await {
        if h.cmd == Cmd::Pong {
            pongs += 1;
        }
    }
    // The pipe holds ~24 pongs; beyond that at most one is queued and one in
    // the writer's hands.
    assert!(
        (1..=512 / 21 + 3).contains(&pongs),
        "{pongs} pongs for {PINGS} pings"
    );
    assert!(!chan.is_closed());
    assert_no_lib_panics();
}

#[tokio::test]
async fn hostile_opens_beyond_max_streams_are_refused_busy() {
    let cfg = ChannelConfig {
        max_streams: 4,
        ..ChannelConfig::default()
    };
    let (chan, mut inc, mut raw) = raw_pair(cfg, 1 << 20);
    for id in [1, 3, 5, 7, 9, 11] {
        raw.open(id).await;
    }
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let (h, p) = raw.next().await;
        assert_eq!(h.cmd, Cmd::Reset, "{h:?}");
        assert_eq!(word_of(&p), code::BUSY);
        refused.push(h.stream.0);
    }
    assert_eq!(refused, [9, 11]);
    assert_eq!(chan.stats().streams_refused.load(Ordering::SeqCst), 2);
    // The channel stays up and the accepted streams work.
    let mut accepted = Vec::new();
    for _ in 0..4 {
        accepted.push(accept(&mut inc).await);
    }
    raw.data(1, 100).await;
    assert_eq!(read_exactly(&mut accepted[0].recv, 100).await.len(), 100);
    // A slot freed by a finished stream can be used again.
    let IncomingStream {
        mut send, mut recv, ..
    } = accepted.remove(1);
    raw.frame(Cmd::Fin, 3, b"").await;
    assert!(recv.recv().await.unwrap().is_none());
    send.finish().await.unwrap();
    raw.open(13).await;
    let s = accept(&mut inc).await;
    assert_eq!(s.recv.id(), StreamId(13));
    assert!(!chan.is_closed());
    assert_eq!(chan.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_no_lib_panics();
}

#[tokio::test]
async fn hostile_open_flood_while_not_reading_is_bounded() {
    // Every refused OPEN costs a queued RESET; a peer that floods OPENs and
    // never reads the answers must not make that queue grow without bound.
    let cfg = ChannelConfig {
        max_streams: 4,
        idle_timeout: Duration::from_secs(20),
        ..ChannelConfig::default()
    };
    let (chan, _inc, mut raw) = raw_pair(cfg, 512);
    let mut flood = Vec::new();
    for i in 0..50_000u32 {
        let hdr = FrameHeader {
            cmd: Cmd::Open,
            circ: CircId::DIRECT,
            stream: StreamId(2 * i + 1),
            len: 0,
        };
        flood.extend_from_slice(&hdr.encode());
    }
    let writer = tokio::spawn(async move {
        let _ = raw.io.write_all(&flood).await;
        raw
    });
    expect_closed(&chan, Duration::from_secs(5)).await;
    assert!(chan.stats().protocol_errors.load(Ordering::SeqCst) >= 1);
    assert!(chan.stats().streams_refused.load(Ordering::SeqCst) < 50_000);
    drop(writer);
    assert_no_lib_panics();
}

#[tokio::test]
async fn hostile_never_ending_partial_frame_hits_the_idle_timeout() {
    let cfg = ChannelConfig {
        keepalive: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..ChannelConfig::default()
    };
    let (chan, _inc, mut raw) = raw_pair(cfg, 1 << 20);
    raw.open(1).await;
    let hdr = FrameHeader {
        cmd: Cmd::Data,
        circ: CircId::DIRECT,
        stream: StreamId(1),
        len: MAX_DATA_PAYLOAD as u32,
    };
    raw.write_raw(&hdr.encode()).await;
    let start = Instant::now();
    // Trickle one byte every 20 ms: always "something", never a frame.
    let trickle = tokio::spawn(async move {
        loop {
            if raw.io.write_all(&[0]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    expect_closed(&chan, Duration::from_secs(3)).await;
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "closed after {:?}",
        start.elapsed()
    );
    trickle.abort();
    assert_no_lib_panics();
}

#[tokio::test]
async fn hostile_garbage_closes_the_channel() {
    for seed in 0..20u64 {
        let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
        let mut junk = pattern(4096, seed);
        junk[0] = 0xff; // not a command, whatever the seed
        let _ = raw.io.write_all(&junk).await;
        expect_closed(&chan, Duration::from_secs(2)).await;
        assert_eq!(
            chan.stats().protocol_errors.load(Ordering::SeqCst),
            1,
            "seed {seed}"
        );
    }
    // Garbage after a valid prefix (headers that decode, then nonsense).
    for seed in 0..20u64 {
        let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
        raw.open(1).await;
        raw.data(1, 100).await;
        let _ = raw.io.write_all(&pattern(8192, 1000 + seed)).await;
        let r = timeout(Duration::from_secs(2), chan.closed()).await;
        // Random bytes may by chance form a long valid prefix; they must
        // never leave the channel open *and* broken silently, and a
        // decoded oversized length must not stall it.
        if r.is_err() {
            raw.io.shutdown().await.unwrap();
            expect_closed(&chan, Duration::from_secs(2)).await;
        }
    }
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 6. Idle and keepalive
// ---------------------------------------------------------------------------

fn fast_keepalive() -> ChannelConfig {
    ChannelConfig {
        keepalive: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(500),
        ..ChannelConfig::default()
    }
}

#[tokio::test]
async fn keepalive_keeps_idle_healthy_channels_up() {
    let (a, _ai, b, bi) = pair(fast_keepalive());
    serve_echo(bi);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!a.is_closed() && !b.is_closed(), "idle channel was closed");
    let got = a
        .request(Bytes::new(), Bytes::from_static(b"still here"), 64, WAIT)
        .await
        .unwrap();
    assert_eq!(&got[..], b"still here");
    assert_no_lib_panics();
}

#[tokio::test]
async fn a_silent_peer_is_dropped_within_the_idle_timeout() {
    // The peer neither reads nor writes: nothing arrives.
    let (chan, _inc, raw) = raw_pair(fast_keepalive(), 1 << 20);
    let start = Instant::now();
    expect_closed(&chan, Duration::from_secs(3)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1000),
        "closed after {took:?}"
    );
    drop(raw);
    assert_no_lib_panics();
}

#[tokio::test]
async fn a_peer_that_writes_but_never_reads_is_dropped() {
    // The peer keeps pinging (so the reader is content) but never reads, so
    // the channel's writes stop making progress.
    let (chan, _inc, mut raw) = raw_pair(fast_keepalive(), 256);
    let (mut send, _recv) = chan.open(Bytes::new()).await.unwrap();
    let sender = tokio::spawn(async move { send.send(Bytes::from(vec![0u8; 4 << 20])).await });
    let start = Instant::now();
    let pinger = tokio::spawn(async move {
        for i in 0u64.. {
            let hdr = FrameHeader {
                cmd: Cmd::Ping,
                circ: CircId::DIRECT,
                stream: StreamId(0),
                len: 8,
            };
            let mut f = hdr.encode().to_vec();
            f.extend_from_slice(&i.to_be_bytes());
            if raw.io.write_all(&f).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    expect_closed(&chan, Duration::from_secs(3)).await;
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "closed after {:?}",
        start.elapsed()
    );
    // The blocked sender was woken with an error.
    assert!(
        timeout(Duration::from_secs(1), sender)
            .await
            .unwrap()
            .unwrap()
            .is_err()
    );
    pinger.abort();
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 7. request() and read_to_end()
// ---------------------------------------------------------------------------

#[tokio::test]
async fn request_round_trip() {
    let (a, _ai, b, mut bi) = pair(ChannelConfig::default());
    tokio::spawn(async move {
        while let Some(s) = bi.accept().await {
            tokio::spawn(async move {
                let IncomingStream {
                    open,
                    mut send,
                    mut recv,
                } = s;
                let body = recv.read_to_end(8 << 20).await.unwrap();
                let mut answer = open.to_vec();
                answer.extend_from_slice(&body);
                send.send(Bytes::from(answer)).await.unwrap();
                send.finish().await.unwrap();
            });
        }
    });
    let got = a
        .request(
            Bytes::from_static(b"open:"),
            Bytes::from_static(b"body"),
            1024,
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(&got[..], b"open:body");
    // An empty body and an empty answer are fine too.
    let got = a
        .request(Bytes::new(), Bytes::new(), 0, WAIT)
        .await
        .unwrap();
    assert!(got.is_empty());
    // A large body.
    let big = Bytes::from(pattern(3 << 20, 5));
    let got = a
        .request(Bytes::new(), big.clone(), 4 << 20, WAIT)
        .await
        .unwrap();
    assert!(got == big);
    eventually("streams forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    // An OPEN payload over the limit is refused locally.
    let too_long = Bytes::from(vec![0u8; vx6_proto::link::MAX_OPEN_PAYLOAD + 1]);
    assert!(matches!(a.open(too_long).await, Err(NetError::Config(_))));
    assert_no_lib_panics();
}

#[tokio::test]
async fn request_times_out_when_the_peer_never_answers() {
    let (a, _ai, b, mut bi) = pair(ChannelConfig::default());
    let held = Arc::new(Mutex::new(Vec::new()));
    let h2 = held.clone();
    tokio::spawn(async move {
        while let Some(s) = bi.accept().await {
            h2.lock().unwrap().push(s); // accepted, never answered
        }
    });
    let start = Instant::now();
    let r = a
        .request(
            Bytes::new(),
            Bytes::from_static(b"?"),
            1024,
            Duration::from_millis(200),
        )
        .await;
    assert!(matches!(r, Err(NetError::Timeout(_))), "{r:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // The abandoned stream is reset, not leaked, on both ends.
    eventually("stream forgotten", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    // The responder got the whole request (it was finished before the
    // reset) but can no longer answer.
    let mut s = held.lock().unwrap().pop().unwrap();
    assert_eq!(&s.recv.read_to_end(1024).await.unwrap()[..], b"?");
    let r = s.send.send(Bytes::from_static(b"late")).await;
    assert!(matches!(r, Err(NetError::Reset(code::CANCEL))), "{r:?}");
    assert_no_lib_panics();
}

#[tokio::test]
async fn read_to_end_over_the_limit_is_an_error() {
    let (a, _ai, _b, bi) = pair(ChannelConfig::default());
    serve_echo(bi);
    let r = a
        .request(Bytes::new(), Bytes::from(vec![7u8; 2000]), 1999, WAIT)
        .await;
    assert!(matches!(r, Err(NetError::Protocol(_))), "{r:?}");
    // Exactly at the limit is fine.
    let r = a
        .request(Bytes::new(), Bytes::from(vec![7u8; 2000]), 2000, WAIT)
        .await;
    assert_eq!(r.unwrap().len(), 2000);
    // And directly on a stream, over several chunks.
    let (mut send, mut recv) = a.open(Bytes::new()).await.unwrap();
    send.send(Bytes::from(vec![1u8; 100 * KIB])).await.unwrap();
    send.finish().await.unwrap();
    assert!(matches!(
        recv.read_to_end(64 * KIB).await,
        Err(NetError::Protocol(_))
    ));
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_slots_are_freed_after_a_thousand_requests() {
    let (a, _ai, b, bi) = pair(ChannelConfig::default());
    serve_echo(bi);
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250u32 {
                let body = Bytes::from(format!("{t}/{i}"));
                let got = a
                    .request(Bytes::from_static(b"rpc"), body.clone(), 64, WAIT)
                    .await
                    .unwrap();
                assert_eq!(got, body);
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(20), t).await.unwrap().unwrap();
    }
    eventually("all slots freed", WAIT, || {
        a.active_streams() == 0 && b.active_streams() == 0
    })
    .await;
    assert_eq!(a.stats().streams_opened.load(Ordering::SeqCst), 1000);
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

#[tokio::test]
async fn close_wakes_senders_waiting_for_credit_and_receivers() {
    let (a, mut ai, b, mut bi) = pair(small_windows(64 * KIB, 1 << 20));
    let (send, mut recv) = a.open(Bytes::new()).await.unwrap();
    let (sent, task) = counting_sender(send, 1 << 20, 8 * KIB);
    let mut s = accept(&mut bi).await;
    eventually("window used", WAIT, || {
        sent.load(Ordering::SeqCst) == 64 * KIB
    })
    .await;
    let reader = tokio::spawn(async move { recv.recv().await });
    tokio::time::sleep(Duration::from_millis(50)).await;

    a.close();
    assert!(a.is_closed());
    let r = timeout(Duration::from_millis(500), task)
        .await
        .expect("sender not woken")
        .unwrap();
    assert!(matches!(r, Err(NetError::Closed)), "{:?}", r.err());
    let r = timeout(Duration::from_millis(500), reader)
        .await
        .expect("receiver not woken")
        .unwrap();
    assert!(matches!(r, Err(NetError::Closed)), "{r:?}");
    assert!(
        timeout(Duration::from_millis(500), ai.accept())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(a.open(Bytes::new()).await, Err(NetError::Closed)));
    assert_eq!(a.active_streams(), 0);

    // The peer hears the GOAWAY: its stream fails after the data it got.
    expect_closed(&b, Duration::from_secs(2)).await;
    let mut n = 0;
    let err = loop {
        match s.recv.recv().await {
            Ok(Some(c)) => n += c.len(),
            Ok(None) => panic!("closed channel ended a stream cleanly"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, NetError::Closed) && n <= 64 * KIB);
    assert!(
        timeout(Duration::from_millis(500), bi.accept())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(a.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_eq!(b.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_no_lib_panics();
}

#[tokio::test]
async fn close_wakes_senders_waiting_for_the_write_queue() {
    let cfg = ChannelConfig {
        write_queue: 2,
        idle_timeout: Duration::from_secs(30),
        ..ChannelConfig::default()
    };
    // The peer does not read, so the writer blocks and the queue fills.
    let (chan, _inc, raw) = raw_pair(cfg, 1024);
    let (mut send, _recv) = chan.open(Bytes::new()).await.unwrap();
    let sender = tokio::spawn(async move { send.send(Bytes::from(vec![0u8; 512 * KIB])).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!sender.is_finished());
    chan.close();
    let r = timeout(Duration::from_millis(1500), sender)
        .await
        .expect("sender not woken")
        .unwrap();
    assert!(matches!(r, Err(NetError::Closed)), "{r:?}");
    drop(raw);
    assert_no_lib_panics();
}

#[tokio::test]
async fn a_vanished_peer_closes_the_channel() {
    let (chan, mut inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    raw.open(1).await;
    let mut s = accept(&mut inc).await;
    let (mut send, mut recv) = chan.open(Bytes::new()).await.unwrap();
    drop(raw);
    expect_closed(&chan, Duration::from_secs(2)).await;
    assert!(matches!(s.recv.recv().await, Err(NetError::Closed)));
    assert!(matches!(recv.recv().await, Err(NetError::Closed)));
    assert!(send.send(Bytes::from_static(b"x")).await.is_err());
    assert!(inc.accept().await.is_none());
    assert_eq!(chan.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_no_lib_panics();
}

#[tokio::test]
async fn odd_configurations_work() {
    // Windows smaller than one frame, a one-slot queue, a zero keepalive:
    // nothing hangs or panics.
    let cfg = ChannelConfig {
        stream_window: 1000,
        channel_window: 1500,
        write_queue: 0,
        accept_queue: 0,
        keepalive: Duration::ZERO,
        ..ChannelConfig::default()
    };
    let (a, _ai, _b, bi) = pair(cfg);
    serve_echo(bi);
    let body = Bytes::from(pattern(100 * KIB, 3));
    let (mut send, mut recv) = a.open(Bytes::new()).await.unwrap();
    let b2 = body.clone();
    let writer = tokio::spawn(async move {
        send.send(b2).await.unwrap();
        send.finish().await.unwrap();
    });
    let got = timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert!(got == body);
    writer.await.unwrap();
    assert_no_lib_panics();
}

// ---------------------------------------------------------------------------
// 8. Pool over real transports
// ---------------------------------------------------------------------------

/// Echoes every stream, and remembers every channel that came up.
#[derive(Default)]
struct Recorder {
    channels: Mutex<Vec<Channel>>,
    streams: AtomicUsize,
}

impl StreamHandler for Recorder {
    fn handle(&self, _chan: Channel, stream: IncomingStream) {
        self.streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(echo_stream(stream));
    }
    fn channel_up(&self, chan: &Channel) {
        self.channels.lock().unwrap().push(chan.clone());
    }
}

impl Recorder {
    fn live(&self) -> usize {
        self.channels
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.is_closed())
            .count()
    }
}

struct PoolNode {
    key: NodeKeypair,
    pool: Arc<Pool>,
    rec: Arc<Recorder>,
}

impl PoolNode {
    async fn new(max_channels: usize) -> Self {
        watch_panics();
        let key = NodeKeypair::generate();
        let listen = [SocketAddr::from(([127, 0, 0, 1], 0))];
        let t = Transports::bind(
            &key,
            &listen,
            &[TransportKind::Tcp, TransportKind::Quic],
            NetConfig::default(),
        )
        .await
        .unwrap();
        let rec = Arc::new(Recorder::default());
        let pool = Pool::new(
            Arc::new(t),
            ChannelConfig::default(),
            rec.clone(),
            max_channels,
        );
        tokio::spawn(pool.clone().run_accept());
        Self { key, pool, rec }
    }
    fn id(&self) -> NodeId {
        self.key.node_id()
    }
    fn ep(&self, kind: TransportKind) -> Endpoint {
        *self
            .pool
            .transports()
            .local_endpoints()
            .iter()
            .find(|e| e.transport == kind)
            .unwrap()
    }
}

fn same(a: &Channel, b: &Channel) -> bool {
    std::ptr::eq(a.stats(), b.stats())
}

async fn echo_works(chan: &Channel) {
    let got = chan
        .request(
            Bytes::from_static(b"ping"),
            Bytes::from_static(b"hello"),
            64,
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(&got[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_connect_reuses_one_channel_per_peer() {
    for kind in [TransportKind::Tcp, TransportKind::Quic] {
        let a = PoolNode::new(64).await;
        let b = PoolNode::new(64).await;
        let c1 = a.pool.connect(b.id(), &[b.ep(kind)]).await.unwrap();
        let c2 = a.pool.connect(b.id(), &[b.ep(kind)]).await.unwrap();
        assert!(same(&c1, &c2), "{kind}: second connect made a new channel");
        assert_eq!(c1.peer(), b.id());
        assert_eq!(c1.transport(), kind);
        assert_eq!(a.pool.stats().dials_ok.load(Ordering::SeqCst), 1);
        echo_works(&c1).await;
        assert_eq!(b.rec.streams.load(Ordering::SeqCst), 1);
        // B pooled the accepted channel under A's id and can use it.
        eventually("b pools the channel", WAIT, || {
            b.pool.get(&a.id()).is_some()
        })
        .await;
        let back = b.pool.get(&a.id()).unwrap();
        assert_eq!(back.peer(), a.id());
        echo_works(&back).await; // served by A's StreamHandler
        assert_eq!(a.rec.streams.load(Ordering::SeqCst), 1);
        assert_eq!(a.pool.channels().len(), 1);
        assert_eq!(b.pool.channels().len(), 1);
        assert_eq!(a.rec.channels.lock().unwrap().len(), 1);
        a.pool.close();
        b.pool.close();
    }
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_concurrent_connects_share_one_dial() {
    let a = PoolNode::new(64).await;
    let b = PoolNode::new(64).await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let pool = a.pool.clone();
        let (id, ep) = (b.id(), b.ep(TransportKind::Quic));
        set.spawn(async move { pool.connect(id, &[ep]).await.unwrap() });
    }
    let chans = set.join_all().await;
    assert!(
        chans.iter().all(|c| same(c, &chans[0])),
        "concurrent connects made several channels"
    );
    assert_eq!(a.pool.stats().dials_ok.load(Ordering::SeqCst), 1);
    assert_eq!(a.pool.stats().dials_failed.load(Ordering::SeqCst), 0);
    eventually("one accepted", WAIT, || {
        b.pool.stats().accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.pool.stats().accepted.load(Ordering::SeqCst), 1);
    echo_works(&chans[0]).await;
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_dial_any_key_then_get() {
    let a = PoolNode::new(64).await;
    let b = PoolNode::new(64).await;
    let c = a
        .pool
        .dial(b.ep(TransportKind::Tcp), Expect::AnyKey)
        .await
        .unwrap();
    assert_eq!(c.peer(), b.id());
    let got = a.pool.get(&b.id()).expect("dialed channel not pooled");
    assert!(same(&c, &got));
    // connect() on the same transport reuses it without dialing...
    let again = a
        .pool
        .connect(b.id(), &[b.ep(TransportKind::Tcp)])
        .await
        .unwrap();
    assert!(same(&c, &again));
    // ...while asking for QUIC gets a QUIC channel, not the TCP one.
    let quic = a
        .pool
        .connect(b.id(), &[b.ep(TransportKind::Quic)])
        .await
        .unwrap();
    assert_eq!(quic.transport(), TransportKind::Quic);
    assert!(!same(&c, &quic));
    let again = a
        .pool
        .dial(b.ep(TransportKind::Quic), Expect::Node(b.id()))
        .await
        .unwrap();
    assert!(same(&quic, &again));
    assert_eq!(a.pool.stats().dials_ok.load(Ordering::SeqCst), 2);
    echo_works(&quic).await;
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_connect_failures_are_reported() {
    let a = PoolNode::new(64).await;
    let b = PoolNode::new(64).await;
    // No endpoints.
    assert!(matches!(
        a.pool.connect(b.id(), &[]).await,
        Err(NetError::Config(_))
    ));
    // The wrong node behind the endpoint: fatal, not retried elsewhere.
    let c = PoolNode::new(64).await;
    let r = a
        .pool
        .connect(
            c.id(),
            &[b.ep(TransportKind::Tcp), c.ep(TransportKind::Tcp)],
        )
        .await;
    assert!(
        matches!(r, Err(NetError::WrongNode { .. })),
        "{:?}",
        r.err()
    );
    assert!(a.pool.get(&c.id()).is_none());
    // A dead endpoint first, a live one second.
    let dead = Endpoint {
        transport: TransportKind::Tcp,
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
    };
    let ch = a
        .pool
        .connect(b.id(), &[dead, b.ep(TransportKind::Tcp)])
        .await
        .unwrap();
    echo_works(&ch).await;
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_close_closes_channels() {
    let a = PoolNode::new(64).await;
    let b = PoolNode::new(64).await;
    let c = a
        .pool
        .connect(b.id(), &[b.ep(TransportKind::Tcp)])
        .await
        .unwrap();
    eventually("b pools the channel", WAIT, || {
        b.pool.get(&a.id()).is_some()
    })
    .await;
    let back = b.pool.get(&a.id()).unwrap();
    a.pool.close();
    assert!(c.is_closed());
    assert!(a.pool.get(&b.id()).is_none());
    assert!(a.pool.channels().is_empty());
    // The peer hears it and forgets the channel on its own.
    expect_closed(&back, Duration::from_secs(2)).await;
    eventually("b forgets the channel", WAIT, || {
        b.pool.get(&a.id()).is_none() && b.pool.channels().is_empty()
    })
    .await;
    assert!(
        a.pool
            .connect(b.id(), &[b.ep(TransportKind::Tcp)])
            .await
            .is_err()
    );
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_closed_channels_do_not_count_against_max_channels() {
    let b = PoolNode::new(1).await;
    for round in 0..3 {
        let a = PoolNode::new(64).await;
        let c = a
            .pool
            .connect(b.id(), &[b.ep(TransportKind::Quic)])
            .await
            .unwrap();
        echo_works(&c).await;
        c.close();
        eventually("b forgets the closed channel", WAIT, || {
            b.pool.channels().is_empty()
        })
        .await;
        assert_eq!(
            b.pool.stats().rejected_over_limit.load(Ordering::SeqCst),
            0,
            "round {round}"
        );
    }
    assert_no_lib_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_replaced_channel_is_closed_once_idle() {
    let a = PoolNode::new(64).await;
    let b = PoolNode::new(64).await;
    let old = b
        .pool
        .connect(a.id(), &[a.ep(TransportKind::Tcp)])
        .await
        .unwrap();
    eventually("a pools the channel", WAIT, || {
        a.pool.get(&b.id()).is_some()
    })
    .await;
    let old_at_a = a.pool.get(&b.id()).unwrap();
    // A stream in flight on the old channel.
    let (mut send, mut recv) = old.open(Bytes::from_static(b"long")).await.unwrap();

    // B reconnects (say, after a restart) with the same key.
    let b2 = Transports::bind(&b.key, &[], &[TransportKind::Tcp], NetConfig::default())
        .await
        .unwrap();
    let conn = b2
        .dial(a.ep(TransportKind::Tcp), Expect::Node(a.id()))
        .await
        .unwrap();
    let (fresh, fresh_inc) = Channel::spawn(conn, Role::Dialer, ChannelConfig::default());
    serve_echo(fresh_inc);
    eventually("a adopts the new channel", WAIT, || {
        a.pool.get(&b.id()).is_some_and(|c| !same(&c, &old_at_a))
    })
    .await;
    echo_works(&a.pool.get(&b.id()).unwrap()).await;

    // The old channel drains its stream first...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !old_at_a.is_closed(),
        "old channel closed under a live stream"
    );
    send.send(Bytes::from_static(b"abc")).await.unwrap();
    send.finish().await.unwrap();
    assert_eq!(&recv.read_to_end(64).await.unwrap()[..], b"abc");
    // ...and then goes away instead of lingering forever.
    expect_closed(&old_at_a, Duration::from_secs(3)).await;
    expect_closed(&old, Duration::from_secs(3)).await;
    assert!(!fresh.is_closed());
    assert_eq!(a.rec.live(), 1);
    assert_no_lib_panics();
}

// ---- relay circuits on a channel (PROTOCOL.md §5, §9) ----

#[tokio::test]
async fn circuits_route_cells_both_ways_and_forget_on_drop() {
    use vx6_proto::link::{CELL_LARGE_LEN, CELL_SMALL_LEN, CREATE_LEN, CREATED_LEN};
    let (a, _ai, b, bi) = pair(ChannelConfig::default());
    let (_streams, mut bcircs) = bi.split();
    let (circ, mut arx) = a.new_circuit().unwrap();
    assert_ne!(circ.0, 0);
    assert_eq!(
        circ.0 & 0x8000_0000,
        0x8000_0000,
        "dialer ids carry the top bit"
    );
    a.send_cell(circ, Cmd::Create, Bytes::from(vec![7u8; CREATE_LEN]))
        .await
        .unwrap();
    let mut inc = timeout(Duration::from_secs(2), bcircs.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inc.circ, circ);
    assert_eq!(&inc.create[..], &[7u8; CREATE_LEN][..]);
    b.send_cell(circ, Cmd::Created, Bytes::from(vec![9u8; CREATED_LEN]))
        .await
        .unwrap();
    let got = timeout(Duration::from_secs(2), arx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.cmd, Cmd::Created);
    for i in 0..100u8 {
        let len = if i % 2 == 0 {
            CELL_SMALL_LEN
        } else {
            CELL_LARGE_LEN
        };
        a.send_cell(circ, Cmd::Relay, Bytes::from(vec![i; len]))
            .await
            .unwrap();
    }
    for i in 0..100u8 {
        let c = timeout(Duration::from_secs(2), inc.rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.cmd, Cmd::Relay);
        assert!(c.payload.iter().all(|&x| x == i), "cells arrive in order");
    }
    assert_eq!(a.active_circuits(), 1);
    drop(arx);
    assert_eq!(a.active_circuits(), 0);
    // Cells for a forgotten circuit are dropped, not fatal.
    b.send_cell(circ, Cmd::Relay, Bytes::from(vec![1u8; CELL_SMALL_LEN]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!a.is_closed());
    // Closing the channel ends the peer's circuit receiver.
    a.close();
    let end = timeout(Duration::from_secs(2), async {
        loop {
            if inc.rx.recv().await.is_none() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok());
    assert!(matches!(
        a.send_cell(circ, Cmd::Relay, Bytes::from(vec![0u8; CELL_SMALL_LEN]))
            .await,
        Err(NetError::Closed)
    ));
}

#[tokio::test]
async fn circuit_frames_with_a_bad_shape_close_the_channel() {
    // A RELAY cell of a size that is not a cell size is a malformed frame.
    let (chan, _inc, mut raw) = raw_pair(ChannelConfig::default(), 64 * KIB);
    let hdr = FrameHeader {
        cmd: Cmd::Relay,
        circ: CircId(5),
        stream: StreamId(0),
        len: 100,
    };
    let mut buf = hdr.encode().to_vec();
    buf.extend_from_slice(&[0u8; 100]);
    raw.write_raw(&buf).await;
    expect_protocol_close(&chan, &mut raw).await;
}

#[tokio::test]
async fn unserved_circuits_are_refused_with_destroy() {
    // The raw peer is the dialer, so its ids carry the top bit.
    let (chan, inc, mut raw) = raw_pair(ChannelConfig::default(), 64 * KIB);
    drop(inc);
    let hdr = FrameHeader {
        cmd: Cmd::Create,
        circ: CircId(0x8000_0005),
        stream: StreamId(0),
        len: vx6_proto::link::CREATE_LEN as u32,
    };
    let mut buf = hdr.encode().to_vec();
    buf.extend_from_slice(&[0u8; vx6_proto::link::CREATE_LEN]);
    raw.write_raw(&buf).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    chan.close();
    let frames = raw.drain().await;
    assert!(
        frames
            .iter()
            .any(|(h, _)| h.cmd == Cmd::Destroy && h.circ == CircId(0x8000_0005)),
        "{frames:?}"
    );
}

/// One circuit frame as the raw peer writes it.
fn circuit_frame(cmd: Cmd, circ: u32, payload: &[u8]) -> Vec<u8> {
    let hdr = FrameHeader {
        cmd,
        circ: CircId(circ),
        stream: StreamId(0),
        len: payload.len() as u32,
    };
    let mut buf = hdr.encode().to_vec();
    buf.extend_from_slice(payload);
    buf
}

/// The raw peer opens circuits `ids` (dialer ids, top bit set); the
/// channel's end accepts them, in order.
async fn open_circuits(
    raw: &mut Raw,
    circs: &mut vx6_net::channel::IncomingCircuits,
    ids: &[u32],
) -> Vec<vx6_net::channel::IncomingCircuit> {
    for &id in ids {
        raw.write_raw(&circuit_frame(
            Cmd::Create,
            id,
            &[0u8; vx6_proto::link::CREATE_LEN],
        ))
        .await;
    }
    let mut out = Vec::new();
    for &id in ids {
        let c = timeout(WAIT, circs.accept()).await.unwrap().unwrap();
        assert_eq!(c.circ.0, id, "accepted in order");
        out.push(c);
    }
    out
}

/// Exactly one circuit was ended for overflowing; the channel is up and
/// saw no protocol error.
fn assert_one_circuit_ended_alone(chan: &Channel) {
    assert!(!chan.is_closed());
    assert_eq!(chan.stats().circuits_overflowed.load(Ordering::SeqCst), 1);
    assert_eq!(chan.stats().protocol_errors.load(Ordering::SeqCst), 0);
    assert_no_lib_panics();
}

/// A circuit whose peer sends more cells than its queue holds ends alone:
/// DESTROY for it, its receiver closes after the cells it holds, and the
/// channel and another circuit on it carry on (a relay passing on what a
/// lying end sent must not take everyone else's circuits down with it).
#[tokio::test]
async fn a_circuit_that_overflows_its_queue_ends_alone() {
    use vx6_proto::link::CELL_SMALL_LEN;
    let (chan, inc, mut raw) = raw_pair(ChannelConfig::default(), 1 << 20);
    let (_streams, mut circs) = inc.split();

    // The raw peer dials, so its ids carry the top bit.
    let (flood, calm) = (0x8000_0011, 0x8000_0022);
    let [mut flood_rx, mut calm_rx]: [_; 2] = open_circuits(&mut raw, &mut circs, &[flood, calm])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    // Nobody reads the flooded circuit: one cell more than its queue holds.
    let mut burst = Vec::new();
    for _ in 0..=vx6_net::channel::CIRCUIT_QUEUE {
        burst.extend_from_slice(&circuit_frame(Cmd::Relay, flood, &[1u8; CELL_SMALL_LEN]));
    }
    raw.write_raw(&burst).await;
    raw.write_raw(&circuit_frame(Cmd::Relay, calm, &[2u8; CELL_SMALL_LEN]))
        .await;
    let (h, p) = raw.next().await;
    assert_eq!((h.cmd, h.circ.0), (Cmd::Destroy, flood), "{p:?}");
    let got = timeout(WAIT, calm_rx.rx.recv()).await.unwrap().unwrap();
    assert_eq!((got.cmd, got.payload[0]), (Cmd::Relay, 2));
    // The flooded receiver gets what was queued, then the end.
    let mut queued = 0;
    while let Some(c) = timeout(WAIT, flood_rx.rx.recv()).await.unwrap() {
        assert_eq!(c.payload[0], 1);
        queued += 1;
    }
    assert_eq!(queued, vx6_net::channel::CIRCUIT_QUEUE);
    // Later cells for it are dropped; the channel stays up.
    raw.write_raw(&circuit_frame(Cmd::Relay, flood, &[3u8; CELL_SMALL_LEN]))
        .await;
    raw.write_raw(&circuit_frame(Cmd::Relay, calm, &[4u8; CELL_SMALL_LEN]))
        .await;
    let got = timeout(WAIT, calm_rx.rx.recv()).await.unwrap().unwrap();
    assert_eq!(got.payload[0], 4);
    assert_one_circuit_ended_alone(&chan);
}

/// Circuit queues share a memory budget: once it is spent, the circuit that
/// holds more than its fair share and pushes further ends (DESTROY, counted),
/// while a circuit holding little is still served; every byte is given back
/// when cells are taken or their queue is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuits_share_a_memory_budget_and_the_greedy_one_ends() {
    use vx6_net::channel::CellMemory;
    use vx6_net::circuit_queue::FAIR_SHARE;
    use vx6_proto::link::{CELL_LARGE_LEN, CELL_SMALL_LEN};
    let limit = 2 * FAIR_SHARE;
    let memory = Arc::new(CellMemory::new(limit));
    let cfg = ChannelConfig {
        cell_memory: Some(memory.clone()),
        ..ChannelConfig::default()
    };
    let (chan, inc, mut raw) = raw_pair(cfg, 1 << 20);
    let (_streams, mut circs) = inc.split();

    let (greedy, calm, dropped) = (0x8000_0011, 0x8000_0022, 0x8000_0033);
    let [mut greedy_rx, mut calm_rx, dropped_rx]: [_; 3] =
        open_circuits(&mut raw, &mut circs, &[greedy, calm, dropped])
            .await
            .try_into()
            .unwrap_or_else(|_| unreachable!());
    // A queue dropped with cells in it gives their memory back.
    for _ in 0..4 {
        raw.write_raw(&circuit_frame(Cmd::Relay, dropped, &[9u8; CELL_LARGE_LEN]))
            .await;
    }
    let deadline = std::time::Instant::now() + WAIT;
    while memory.used() < 4 * CELL_LARGE_LEN {
        assert!(std::time::Instant::now() < deadline, "cells not queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(dropped_rx);
    assert_eq!(memory.used(), 0);
    // Nobody reads the greedy circuit: the budget fits `limit` bytes of its
    // cells (well under its queue's cell limit), the next one ends it.
    let fits = limit / CELL_LARGE_LEN;
    assert!(fits < vx6_net::channel::CIRCUIT_QUEUE);
    let mut burst = Vec::new();
    for _ in 0..=fits {
        burst.extend_from_slice(&circuit_frame(Cmd::Relay, greedy, &[1u8; CELL_LARGE_LEN]));
    }
    raw.write_raw(&burst).await;
    let (h, p) = raw.next().await;
    assert_eq!((h.cmd, h.circ.0), (Cmd::Destroy, greedy), "{p:?}");
    assert_eq!(memory.used(), limit);
    // The memory is spent, but the calm circuit holds nothing: served.
    raw.write_raw(&circuit_frame(Cmd::Relay, calm, &[2u8; CELL_SMALL_LEN]))
        .await;
    let got = timeout(WAIT, calm_rx.rx.recv()).await.unwrap().unwrap();
    assert_eq!((got.cmd, got.payload[0]), (Cmd::Relay, 2));
    // The greedy receiver gets what was queued, then the end.
    let mut queued = 0;
    while let Some(c) = timeout(WAIT, greedy_rx.rx.recv()).await.unwrap() {
        assert_eq!(c.payload[0], 1);
        queued += 1;
    }
    assert_eq!(queued, fits);
    assert_eq!(memory.used(), 0);
    assert_one_circuit_ended_alone(&chan);
}

/// A retired channel (a newer one to the same peer exists) keeps serving a
/// stream the peer opens right after the retirement — both ends may have
/// dialed at once and the peer may still prefer this channel — and closes
/// only after it has been idle for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_channel_serves_a_late_stream_then_closes_when_idle() {
    let (a, _ai, b, bi) = pair(ChannelConfig::default());
    let _echo = serve_echo(bi);
    b.close_when_idle();
    // The peer opens a stream on it at once: it must be served in full.
    let (mut send, mut recv) = a.open(Bytes::from_static(b"late")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    send.send(Bytes::from_static(b"still here")).await.unwrap();
    send.finish().await.unwrap();
    assert_eq!(read_exactly(&mut recv, 10).await, b"still here");
    assert!(!b.is_closed(), "closed with a stream open");
    // Idle now: it goes away by itself, a grace period later.
    expect_closed(&b, Duration::from_secs(10)).await;
    expect_closed(&a, Duration::from_secs(5)).await;
    assert_no_lib_panics();
}
