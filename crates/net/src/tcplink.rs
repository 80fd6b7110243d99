//! TLS 1.3 over one TCP socket: rustls' handshake, then our record layer.
//!
//! Owns a TCP link's life after `connect`/`accept`: driving rustls' unbuffered
//! handshake over the socket (no bytes the peer sent early are lost: the
//! handshake's input buffer becomes the reader's), taking the traffic keys
//! from rustls (its `kernel` API), and then the two halves that move records:
//! [`LinkReader`] opens each record where it was read and lends out its
//! plaintext ([`AsyncBufRead`]), [`LinkWriter`] seals what it is given into
//! records and writes them with one system call per batch. Both halves run
//! without a lock between them; they meet only at a KeyUpdate.
//!
//! Keys are updated (RFC 8446 §4.6.3) by the sender every
//! [`KEY_UPDATE_RECORDS`] records, far below AES-GCM's limit; a KeyUpdate that
//! asks for ours is answered before our next record. Session tickets are
//! never sent (resumption is off), so no other post-handshake message is
//! expected; anything else ends the link.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::record::{self, ContentType, HEADER_LEN, MAX_PLAINTEXT, MAX_RECORD, RecordKey};
use crate::{NetError, Result};

/// The reader's buffer: several records per `read`, and room for a whole
/// record behind a partial one.
const READ_BUF: usize = 128 * 1024;
/// Plaintext one `poll_write` seals before it writes (one system call).
const WRITE_MAX: usize = 256 * 1024;
/// Records sent under one key before a KeyUpdate: 2^22 (64 GiB of full
/// records), a quarter of AES-128-GCM's confidentiality limit in rustls.
pub const KEY_UPDATE_RECORDS: u64 = 1 << 22;
/// Handshake messages in a post-handshake record (KeyUpdate is 5 bytes).
const HS_KEY_UPDATE: u8 = 24;
const HS_NEW_SESSION_TICKET: u8 = 4;
const ALERT_CLOSE_NOTIFY: [u8; 2] = [1, 0];

/// What a finished handshake hands to the transport.
pub struct Established {
    pub peer_certificates: Option<Vec<CertificateDer<'static>>>,
    pub alpn: Option<Vec<u8>>,
    pub reader: LinkReader,
    pub writer: LinkWriter,
}

/// rustls' client and server unbuffered connections, as the handshake loop
/// and the key updates need them.
trait Unbuffered: Sized {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn is_handshaking(&self) -> bool;
    fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>>;
    fn alpn(&self) -> Option<Vec<u8>>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>;
}

macro_rules! unbuffered {
    ($conn:ty, $data:ty, $variant:ident) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, $data> {
                self.process_tls_records(incoming)
            }
            fn is_handshaking(&self) -> bool {
                std::ops::Deref::deref(self).is_handshaking()
            }
            fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
                std::ops::Deref::deref(self)
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            }
            fn alpn(&self) -> Option<Vec<u8>> {
                std::ops::Deref::deref(self)
                    .alpn_protocol()
                    .map(<[u8]>::to_vec)
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Kernel::$variant(kernel)))
            }
        }
    };
}
unbuffered!(UnbufferedClientConnection, ClientConnectionData, Client);
unbuffered!(UnbufferedServerConnection, ServerConnectionData, Server);

/// What rustls keeps after the handshake: the secrets to derive the next keys from.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }
}

/// What the two halves share: rustls' key schedule and a KeyUpdate request
/// the reader saw and the writer must answer.
struct Keys {
    kernel: Mutex<Kernel>,
    peer_asked_update: AtomicBool,
}

impl Keys {
    fn next(&self, tx: bool) -> io::Result<RecordKey> {
        let mut kernel = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let (seq, secrets) = if tx {
            kernel.next_tx()
        } else {
            kernel.next_rx()
        }
        .map_err(|e| invalid(format!("key update: {e}")))?;
        RecordKey::new(&secrets, seq).map_err(invalid)
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn handshake_error(e: rustls::Error) -> NetError {
    NetError::Handshake(e.to_string())
}

/// Runs the client side of the handshake on `tcp`.
pub async fn client(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Established> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(handshake_error)?;
    handshake(conn, tcp, KEY_UPDATE_RECORDS).await
}

/// Runs the server side of the handshake on `tcp`.
pub async fn server(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<Established> {
    let conn = UnbufferedServerConnection::new(config).map_err(handshake_error)?;
    handshake(conn, tcp, KEY_UPDATE_RECORDS).await
}

/// What one turn of the handshake loop must do next.
enum Step {
    Read,
    Transmit,
    Continue,
    Done,
}

async fn handshake<C: Unbuffered>(
    mut conn: C,
    mut tcp: TcpStream,
    key_update_records: u64,
) -> Result<Established> {
    let mut inbuf = vec![0u8; READ_BUF].into_boxed_slice();
    let mut filled = 0usize;
    let mut outbuf = Vec::new();
    // Application data that arrived with the last handshake flight.
    let mut early = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process(inbuf.get_mut(..filled).unwrap_or_default());
        let step = match state {
            Err(e) => {
                if state_error_flush(&mut conn, &mut outbuf).is_ok() && !outbuf.is_empty() {
                    // Best effort: tell the peer why (its alert).
                    let _ = tcp.write_all(&outbuf).await;
                }
                return Err(handshake_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                encode(&mut outbuf, |b| enc.encode(b))?;
                Step::Continue
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                Step::Transmit
            }
            Ok(ConnectionState::ReadTraffic(mut data)) => {
                while let Some(rec) = data.next_record() {
                    let rec = rec.map_err(handshake_error)?;
                    discard += rec.discard;
                    early.extend_from_slice(rec.payload);
                }
                Step::Continue
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            // The server may send before the client's Finished (0.5-RTT);
            // we only stop once the client has proved its key.
            Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(NetError::Handshake(
                    "peer closed during the handshake".into(),
                ));
            }
            Ok(_) => {
                return Err(NetError::Handshake(
                    "unexpected TLS state in the handshake".into(),
                ));
            }
        };
        if discard > 0 {
            inbuf.copy_within(discard..filled, 0);
            filled -= discard;
        }
        match step {
            Step::Continue => {}
            Step::Transmit => {
                tcp.write_all(&outbuf).await?;
                outbuf.clear();
            }
            Step::Done if !conn.is_handshaking() => break,
            Step::Done | Step::Read => {
                let spare = inbuf.get_mut(filled..).unwrap_or_default();
                if spare.is_empty() {
                    return Err(NetError::Protocol("handshake flight too large".into()));
                }
                let n = tcp.read(spare).await?;
                if n == 0 {
                    return Err(NetError::Handshake(
                        "peer closed during the handshake".into(),
                    ));
                }
                filled += n;
            }
        }
    }
    if !outbuf.is_empty() {
        tcp.write_all(&outbuf).await?;
    }
    let peer_certificates = conn.peer_certificates();
    let alpn = conn.alpn();
    let (secrets, kernel) = conn.into_kernel().map_err(handshake_error)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let tx = RecordKey::new(&tx, tx_seq).map_err(|e| NetError::Handshake(e.to_string()))?;
    let rx = RecordKey::new(&rx, rx_seq).map_err(|e| NetError::Handshake(e.to_string()))?;
    let keys = Arc::new(Keys {
        kernel: Mutex::new(kernel),
        peer_asked_update: AtomicBool::new(false),
    });
    let (rd, wr) = tcp.into_split();
    Ok(Established {
        peer_certificates,
        alpn,
        reader: LinkReader {
            tcp: rd,
            buf: inbuf,
            start: 0,
            end: filled,
            plain: 0..0,
            early,
            early_at: 0,
            key: rx,
            keys: keys.clone(),
            eof: false,
        },
        writer: LinkWriter {
            tcp: wr,
            out: Vec::with_capacity(WRITE_MAX + WRITE_MAX / MAX_PLAINTEXT * 64 + MAX_RECORD),
            sent: 0,
            key: tx,
            keys,
            key_update_records,
            closed: false,
        },
    })
}

/// After a failed step, lets rustls encode the alert it queued, if any.
fn state_error_flush<C: Unbuffered>(conn: &mut C, outbuf: &mut Vec<u8>) -> Result<()> {
    let UnbufferedStatus { state, .. } = conn.process(&mut []);
    if let Ok(ConnectionState::EncodeTlsData(mut enc)) = state {
        encode(outbuf, |b| enc.encode(b))?;
    }
    Ok(())
}

/// Appends what `enc` encodes to `out`, growing it as rustls asks.
fn encode(
    out: &mut Vec<u8>,
    mut enc: impl FnMut(&mut [u8]) -> std::result::Result<usize, EncodeError>,
) -> Result<()> {
    let at = out.len();
    out.resize(at + 4096, 0);
    loop {
        match enc(out.get_mut(at..).unwrap_or_default()) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(need)) => out.resize(at + need.required_size, 0),
            Err(e) => {
                return Err(NetError::Handshake(format!(
                    "encoding a handshake record: {e}"
                )));
            }
        }
    }
}

/// The receiving half of a TCP link.
pub struct LinkReader {
    tcp: OwnedReadHalf,
    buf: Box<[u8]>,
    /// Unopened bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Opened plaintext not yet consumed (inside `buf`).
    plain: std::ops::Range<usize>,
    /// Plaintext rustls opened during the handshake, served first.
    early: Vec<u8>,
    early_at: usize,
    key: RecordKey,
    keys: Arc<Keys>,
    eof: bool,
}

impl LinkReader {
    /// Opens the next whole record in the buffer, if there is one.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(header) = self
            .buf
            .get(self.start..self.end)
            .and_then(|b| b.first_chunk::<HEADER_LEN>())
        else {
            return Ok(false);
        };
        let len = HEADER_LEN + record::record_len(header).map_err(invalid)?;
        if self.end - self.start < len {
            return Ok(false);
        }
        let at = self.start;
        self.start += len;
        let rec = self
            .buf
            .get_mut(at..at + len)
            .ok_or_else(|| invalid("record out of buffer"))?;
        let (ty, range) = self.key.open(rec).map_err(invalid)?;
        let body = rec.get(range.clone()).unwrap_or_default();
        match ty {
            ContentType::ApplicationData => {
                self.plain = at + range.start..at + range.end;
            }
            ContentType::Alert if body == ALERT_CLOSE_NOTIFY => self.eof = true,
            ContentType::Alert => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "peer sent a TLS alert",
                ));
            }
            ContentType::Handshake => self.post_handshake(at + range.start..at + range.end)?,
        }
        Ok(true)
    }

    /// Handles the messages of a post-handshake record.
    fn post_handshake(&mut self, range: std::ops::Range<usize>) -> io::Result<()> {
        let mut rest = self.buf.get(range).unwrap_or_default();
        let mut rekey = false;
        while !rest.is_empty() {
            let Some((&[ty, a, b, c], tail)) = rest.split_first_chunk::<4>() else {
                return Err(invalid("truncated handshake message"));
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let (body, tail) = tail
                .split_at_checked(len)
                .ok_or_else(|| invalid("truncated handshake message"))?;
            rest = tail;
            match (ty, body) {
                (HS_KEY_UPDATE, [asked]) if *asked <= 1 && !rekey => {
                    rekey = true;
                    if *asked == 1 {
                        self.keys.peer_asked_update.store(true, Ordering::Release);
                    }
                }
                // Resumption is off: a ticket is useless, not an error.
                (HS_NEW_SESSION_TICKET, _) => {}
                _ => return Err(invalid("unexpected post-handshake message")),
            }
        }
        if rekey {
            // A KeyUpdate must end its record (RFC 8446 §5.1); the next
            // record is under the new key.
            self.key = self.keys.next(false)?;
        }
        Ok(())
    }
}

impl AsyncBufRead for LinkReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        loop {
            if this.early_at < this.early.len() || !this.plain.is_empty() || this.eof {
                break;
            }
            if this.open_next()? {
                continue;
            }
            // Need more bytes: keep a partial record, make room behind it.
            if this.start == this.end {
                this.start = 0;
                this.end = 0;
            } else if this.buf.len() - this.start < MAX_RECORD {
                this.buf.copy_within(this.start..this.end, 0);
                this.end -= this.start;
                this.start = 0;
            }
            let spare = this.buf.get_mut(this.end..).unwrap_or_default();
            let mut rb = ReadBuf::new(spare);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "link closed without close_notify",
                )));
            }
            this.end += n;
        }
        if this.early_at < this.early.len() {
            return Poll::Ready(Ok(this.early.get(this.early_at..).unwrap_or_default()));
        }
        Poll::Ready(Ok(this.buf.get(this.plain.clone()).unwrap_or_default()))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        if this.early_at < this.early.len() {
            this.early_at = (this.early_at + amt).min(this.early.len());
            if this.early_at == this.early.len() {
                this.early = Vec::new();
                this.early_at = 0;
            }
        } else {
            this.plain.start = (this.plain.start + amt).min(this.plain.end);
        }
    }
}

impl AsyncRead for LinkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let avail = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = avail.len().min(buf.remaining());
        buf.put_slice(avail.get(..n).unwrap_or_default());
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

/// The sending half of a TCP link.
pub struct LinkWriter {
    tcp: OwnedWriteHalf,
    /// Sealed records; `out[sent..]` is not on the socket yet.
    out: Vec<u8>,
    sent: usize,
    key: RecordKey,
    keys: Arc<Keys>,
    key_update_records: u64,
    closed: bool,
}

impl LinkWriter {
    /// Writes sealed records until none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let pending = self.out.get(self.sent..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals `body` as one record of type `ty`.
    fn seal_one(&mut self, ty: ContentType, body: &[u8]) -> io::Result<()> {
        let start = RecordKey::begin(&mut self.out);
        self.out.extend_from_slice(body);
        self.key.seal(&mut self.out, start, ty).map_err(invalid)
    }

    /// Sends a KeyUpdate under the old key and switches to the new one.
    fn update_key(&mut self) -> io::Result<()> {
        self.seal_one(ContentType::Handshake, &[HS_KEY_UPDATE, 0, 0, 1, 0])?;
        self.key = self.keys.next(true)?;
        Ok(())
    }

    /// Seals as much of `bufs` as one batch takes; returns the bytes taken.
    fn seal_data(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut taken = 0;
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = slices.next().unwrap_or_default();
        while !cur.is_empty() && taken < WRITE_MAX {
            if self.keys.peer_asked_update.swap(false, Ordering::AcqRel)
                || self.key.records() >= self.key_update_records
            {
                self.update_key()?;
            }
            let start = RecordKey::begin(&mut self.out);
            let mut room = MAX_PLAINTEXT.min(WRITE_MAX - taken);
            while room > 0 && !cur.is_empty() {
                let (now, later) = cur.split_at(cur.len().min(room));
                self.out.extend_from_slice(now);
                room -= now.len();
                taken += now.len();
                cur = if later.is_empty() {
                    slices.next().unwrap_or_default()
                } else {
                    later
                };
            }
            self.key
                .seal(&mut self.out, start, ContentType::ApplicationData)
                .map_err(invalid)?;
        }
        Ok(taken)
    }
}

impl AsyncWrite for LinkWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        ready!(this.poll_drain(cx))?;
        let taken = this.seal_data(bufs)?;
        // Start sending now; what the socket does not take yet goes out on
        // the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.closed {
            this.closed = true;
            this.seal_one(ContentType::Alert, &ALERT_CLOSE_NOTIFY)?;
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
