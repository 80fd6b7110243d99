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
/// Plaintext one `poll_write` seals before it writes (one system call):
/// a whole channel write batch (32 KiB plus one frame of up to 32 KiB).
const WRITE_MAX: usize = 72 * 1024;
/// Records sent under one key before a KeyUpdate: 2^22 (64 GiB of full
/// records), a quarter of AES-128-GCM's confidentiality limit in rustls.
pub const KEY_UPDATE_RECORDS: u64 = 1 << 22;
/// Handshake messages in a post-handshake record (KeyUpdate is 5 bytes).
const HS_KEY_UPDATE: u8 = 24;
const HS_NEW_SESSION_TICKET: u8 = 4;
const ALERT_CLOSE_NOTIFY: [u8; 2] = [1, 0];
/// KeyUpdates a peer may send in a row without data between them (each
/// costs us a key derivation); rustls allows about as many.
const MAX_KEY_UPDATES_IN_A_ROW: u8 = 32;

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
            // No alert is sent: rustls may not be called again after an
            // error, and the peer learns as much from the connection closing.
            Err(e) => return Err(handshake_error(e)),
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
            updates_in_a_row: 0,
        },
        writer: LinkWriter {
            tcp: wr,
            // Grows with the largest batch; an idle link stays small.
            out: Vec::new(),
            sent: 0,
            key: tx,
            keys,
            key_update_records,
            key_updates: 0,
            closed: false,
        },
    })
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
    /// KeyUpdates received since the last data.
    updates_in_a_row: u8,
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
                if !range.is_empty() {
                    self.updates_in_a_row = 0;
                }
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

    /// Acts on the messages of a post-handshake record.
    fn post_handshake(&mut self, range: std::ops::Range<usize>) -> io::Result<()> {
        let body = self.buf.get(range).unwrap_or_default();
        match parse_post_handshake(body).map_err(invalid)? {
            PostHandshake::Ignore => {}
            PostHandshake::KeyUpdate { answer } => {
                self.updates_in_a_row += 1;
                if self.updates_in_a_row > MAX_KEY_UPDATES_IN_A_ROW {
                    return Err(invalid("too many key updates"));
                }
                if answer {
                    self.keys.peer_asked_update.store(true, Ordering::Release);
                }
                // The next record is under the new key.
                self.key = self.keys.next(false)?;
            }
        }
        Ok(())
    }
}

/// What a post-handshake record asks of the receiver.
#[derive(Debug, PartialEq, Eq)]
enum PostHandshake {
    Ignore,
    /// Switch the receiving key; `answer`: the peer asked for ours too.
    KeyUpdate {
        answer: bool,
    },
}

/// Parses the handshake messages of one post-handshake record: any number of
/// NewSessionTickets (ignored: resumption is off), then at most one
/// KeyUpdate, which must end the record (RFC 8446 §5.1). Anything else, a
/// truncated message or trailing bytes is refused.
fn parse_post_handshake(mut rest: &[u8]) -> Result<PostHandshake, &'static str> {
    let mut what = PostHandshake::Ignore;
    while !rest.is_empty() {
        if what != PostHandshake::Ignore {
            return Err("a KeyUpdate must end its record");
        }
        let Some((&[ty, a, b, c], tail)) = rest.split_first_chunk::<4>() else {
            return Err("truncated handshake message");
        };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        let (body, tail) = tail
            .split_at_checked(len)
            .ok_or("truncated handshake message")?;
        rest = tail;
        match (ty, body) {
            (HS_KEY_UPDATE, [0]) => what = PostHandshake::KeyUpdate { answer: false },
            (HS_KEY_UPDATE, [1]) => what = PostHandshake::KeyUpdate { answer: true },
            (HS_NEW_SESSION_TICKET, _) => {}
            _ => return Err("unexpected post-handshake message"),
        }
    }
    Ok(what)
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
    /// KeyUpdates sent (tests check that a requested one is answered).
    key_updates: u64,
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
        self.key_updates += 1;
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

#[cfg(test)]
mod tests {
    //! Interop with rustls' own record layer both ways, across key updates
    //! from either side, data that arrives with the handshake, and hostile
    //! records.
    use std::io::Write as _;
    use std::time::Duration;

    use tokio::net::TcpListener;
    use vx6_proto::NodeKeypair;

    use super::*;
    use crate::tls::{self, TlsConfigs};
    use crate::transport::Expect;

    const WAIT: Duration = Duration::from_secs(20);

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 4093) as u8).collect()
    }

    fn name_for(key: &NodeKeypair) -> ServerName<'static> {
        ServerName::try_from(tls::server_name(Expect::Node(key.node_id()))).unwrap()
    }

    /// Two fresh node keys with their TLS configs, and a connected socket
    /// pair: `client_tcp` dials, `server_tcp` accepted.
    struct Ends {
        server_key: NodeKeypair,
        client_key: NodeKeypair,
        server: TlsConfigs,
        client: TlsConfigs,
        client_tcp: TcpStream,
        server_tcp: TcpStream,
    }

    async fn ends() -> Ends {
        let (server_key, client_key) = (NodeKeypair::generate(), NodeKeypair::generate());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        Ends {
            server: TlsConfigs::new(&server_key).unwrap(),
            client: TlsConfigs::new(&client_key).unwrap(),
            server_key,
            client_key,
            client_tcp: a.unwrap(),
            server_tcp: b.unwrap().0,
        }
    }

    /// Our server side of a handshake.
    async fn our_server(tcp: TcpStream, cfg: TlsConfigs, key_update_records: u64) -> Established {
        let conn = UnbufferedServerConnection::new(cfg.server).unwrap();
        handshake(conn, tcp, key_update_records).await.unwrap()
    }

    /// Our client side of a handshake with the node of `server_key`.
    async fn our_client(
        tcp: TcpStream,
        cfg: TlsConfigs,
        server_key: &NodeKeypair,
        key_update_records: u64,
    ) -> Established {
        let conn = UnbufferedClientConnection::new(cfg.client, name_for(server_key)).unwrap();
        handshake(conn, tcp, key_update_records).await.unwrap()
    }

    /// A stock rustls client (tokio-rustls) connected to the node of `server_key`.
    async fn rustls_client(
        tcp: TcpStream,
        cfg: TlsConfigs,
        server_key: &NodeKeypair,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let connector = tokio_rustls::TlsConnector::from(cfg.client);
        connector.connect(name_for(server_key), tcp).await.unwrap()
    }

    /// Our server, which says when its handshake is done and then reports
    /// what its first read gets.
    fn our_server_first_read(
        tcp: TcpStream,
        cfg: TlsConfigs,
    ) -> (
        tokio::sync::oneshot::Receiver<()>,
        tokio::task::JoinHandle<io::Result<usize>>,
    ) {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let read = tokio::spawn(async move {
            let mut link = our_server(tcp, cfg, KEY_UPDATE_RECORDS).await;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 16];
            tokio::time::timeout(WAIT, link.reader.read(&mut buf))
                .await
                .unwrap()
        });
        (ready_rx, read)
    }

    /// Sends `payload` through `wr` in uneven writes while reading it back
    /// from `rd`; returns what came back.
    async fn echo_through<W: AsyncWrite + Unpin + Send + 'static>(
        mut rd: impl AsyncRead + Unpin,
        mut wr: W,
        payload: Vec<u8>,
    ) -> (Vec<u8>, W) {
        let len = payload.len();
        let writer = tokio::spawn(async move {
            for chunk in payload.chunks(50_000) {
                let (a, b) = chunk.split_at(chunk.len() / 3);
                let mut slices = [io::IoSlice::new(a), io::IoSlice::new(b)];
                crate::channel::write_all_vectored(&mut wr, &mut slices)
                    .await
                    .unwrap();
                wr.flush().await.unwrap();
            }
            wr
        });
        let mut back = vec![0u8; len];
        tokio::time::timeout(WAIT, rd.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        (back, writer.await.unwrap())
    }

    /// A rustls server (tokio-rustls) that echoes, asking for a key update
    /// every `every` bytes.
    async fn rustls_echo_server(tcp: TcpStream, configs: TlsConfigs, every: usize) {
        let acceptor = tokio_rustls::TlsAcceptor::from(configs.server);
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut since = 0;
        // The test ends the connection without close_notify.
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            s.write_all(&buf[..n]).await.unwrap();
            s.flush().await.unwrap();
            since += n;
            if since >= every {
                since = 0;
                s.get_mut().1.refresh_traffic_keys().unwrap();
            }
        }
        let _ = s.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn our_client_and_a_rustls_server_agree_across_key_updates() {
        let e = ends().await;
        let server = tokio::spawn(rustls_echo_server(e.server_tcp, e.server, 300_000));
        // Our side updates its key every 5 records; the server every ~300 KB.
        let link = our_client(e.client_tcp, e.client, &e.server_key, 5).await;
        let payload = data(3 << 20);
        let (back, writer) = echo_through(link.reader, link.writer, payload.clone()).await;
        assert!(back == payload, "echo differs");
        assert!(writer.key_updates > 40, "{}", writer.key_updates);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_update_the_peer_requests_is_answered() {
        let e = ends().await;
        // rustls asks for our update with each of its own (every ~100 KB).
        let server = tokio::spawn(rustls_echo_server(e.server_tcp, e.server, 100_000));
        let link = our_client(e.client_tcp, e.client, &e.server_key, u64::MAX).await;
        let (mut rd, mut wr) = (link.reader, link.writer);
        // In lockstep, so there is always a next write to answer with.
        let payload = data(1 << 20);
        for chunk in payload.chunks(64 * 1024) {
            wr.write_all(chunk).await.unwrap();
            wr.flush().await.unwrap();
            let mut back = vec![0u8; chunk.len()];
            tokio::time::timeout(WAIT, rd.read_exact(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert!(back == chunk, "echo differs");
        }
        // Our own schedule never fires here: every update was an answer.
        assert!(wr.key_updates >= 3, "{}", wr.key_updates);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rustls_client_and_our_server_agree_across_key_updates() {
        let e = ends().await;
        let client_id = e.client_key.node_id();
        let ours = tokio::spawn(async move {
            let link = our_server(e.server_tcp, e.server, 7).await;
            assert_eq!(
                tls::peer_node_id(link.peer_certificates.as_deref()).unwrap(),
                client_id
            );
            assert_eq!(link.alpn.as_deref(), Some(tls::ALPN));
            // Echo everything back through our halves.
            let (mut rd, mut wr) = (link.reader, link.writer);
            tokio::io::copy_buf(&mut rd, &mut wr).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let s = rustls_client(e.client_tcp, e.client, &e.server_key).await;
        let (mut rd, mut wr) = tokio::io::split(s);
        let payload = data(2 << 20);
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(200_000) {
                wr.write_all(chunk).await.unwrap();
                wr.flush().await.unwrap();
            }
            wr
        });
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(WAIT, rd.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert!(back == payload, "echo differs");
        // Now a key update from the rustls side, then close: our server
        // must follow the update and see the close_notify as a clean end.
        let mut s = rd.unsplit(writer.await.unwrap());
        s.get_mut().1.refresh_traffic_keys().unwrap();
        s.write_all(b"after the update").await.unwrap();
        s.shutdown().await.unwrap();
        let mut tail = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut tail))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(tail, b"after the update");
        tokio::time::timeout(WAIT, ours).await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_sent_with_the_clients_finished_is_not_lost() {
        let Ends {
            server_key,
            server: server_cfg,
            client: client_cfg,
            client_tcp: a,
            server_tcp: b,
            ..
        } = ends().await;
        // A blocking rustls client that queues data before the handshake
        // completes: rustls sends it in the same write as its Finished.
        let a = a.into_std().unwrap();
        a.set_nonblocking(false).unwrap();
        let client = std::thread::spawn(move || {
            let mut a = a;
            let mut c =
                rustls::ClientConnection::new(client_cfg.client, name_for(&server_key)).unwrap();
            c.writer().write_all(b"early words").unwrap();
            while c.is_handshaking() || c.wants_write() {
                c.complete_io(&mut a).unwrap();
            }
            // Keep the socket open until the server has read.
            std::thread::sleep(Duration::from_millis(500));
        });
        let mut link = tokio::time::timeout(WAIT, our_server(b, server_cfg, KEY_UPDATE_RECORDS))
            .await
            .unwrap();
        let mut got = [0u8; 11];
        tokio::time::timeout(WAIT, link.reader.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"early words");
        client.join().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_records_end_the_link_with_an_error() {
        for bad in [
            // Outer type must be application_data.
            vec![22u8, 3, 3, 0, 20],
            // Longer than any record may be.
            vec![23, 3, 3, 0xff, 0xff],
            // Well formed, but fails authentication.
            [vec![23, 3, 3, 0, 40], vec![0xAA; 40]].concat(),
        ] {
            let e = ends().await;
            let (ready, ours) = our_server_first_read(e.server_tcp, e.server);
            let mut s = rustls_client(e.client_tcp, e.client, &e.server_key).await;
            // After the handshake, or rustls' handshake would see it.
            ready.await.unwrap();
            s.get_mut().0.write_all(&bad).await.unwrap();
            let err = ours
                .await
                .unwrap()
                .expect_err("a hostile record was accepted");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}: {err}");
        }
    }

    #[test]
    fn post_handshake_messages_parse_strictly() {
        use PostHandshake::*;
        let ku = |b: u8| vec![HS_KEY_UPDATE, 0, 0, 1, b];
        let nst = vec![HS_NEW_SESSION_TICKET, 0, 0, 2, 9, 9];
        assert_eq!(
            parse_post_handshake(&ku(0)),
            Ok(KeyUpdate { answer: false })
        );
        assert_eq!(parse_post_handshake(&ku(1)), Ok(KeyUpdate { answer: true }));
        assert_eq!(parse_post_handshake(&nst), Ok(Ignore));
        assert_eq!(
            parse_post_handshake(&[nst.clone(), ku(1)].concat()),
            Ok(KeyUpdate { answer: true })
        );
        for bad in [
            ku(2),                                         // unknown request value
            [ku(0), nst.clone()].concat(),                 // KeyUpdate not last
            [ku(0), ku(0)].concat(),                       // two in one record
            vec![HS_KEY_UPDATE, 0, 0, 2, 0, 0],            // wrong length
            vec![20, 0, 0, 0],                             // Finished after the handshake
            vec![HS_NEW_SESSION_TICKET, 0, 0],             // truncated header
            vec![HS_NEW_SESSION_TICKET, 0, 0, 9, 1],       // truncated body
            vec![HS_NEW_SESSION_TICKET, 0xff, 0xff, 0xff], // length past the end
        ] {
            assert!(parse_post_handshake(&bad).is_err(), "{bad:?} accepted");
        }
        // Every cut of a valid record is refused or means less, never a panic.
        let good = [nst.clone(), ku(1)].concat();
        for cut in 0..good.len() {
            let _ = parse_post_handshake(&good[..cut]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_key_updates_ends_the_link() {
        let e = ends().await;
        let (ready, ours) = our_server_first_read(e.server_tcp, e.server);
        let mut s = rustls_client(e.client_tcp, e.client, &e.server_key).await;
        ready.await.unwrap();
        for _ in 0..=MAX_KEY_UPDATES_IN_A_ROW {
            s.get_mut().1.refresh_traffic_keys().unwrap();
            s.flush().await.unwrap();
        }
        let err = ours.await.unwrap().expect_err("the flood was accepted");
        assert!(err.to_string().contains("too many key updates"), "{err}");
    }
}
