//! Real-socket tests of both transports on loopback (IPv4 and IPv6): identity
//! binding, data flow, and robustness of the listeners against peers that
//! stall, send garbage, or do not prove a key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use vx6_net::NetError;
use vx6_net::tls::{self, TlsConfigs};
use vx6_net::transport::{Conn, Expect, NetConfig, Transports};
use vx6_proto::NodeKeypair;
use vx6_proto::record::{Endpoint, TransportKind};

const BOTH: [TransportKind; 2] = [TransportKind::Tcp, TransportKind::Quic];
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(10);

fn cfg(handshake_timeout: Duration) -> NetConfig {
    NetConfig {
        handshake_timeout,
        ..NetConfig::default()
    }
}

struct Node {
    key: NodeKeypair,
    t: Transports,
}

impl Node {
    async fn listening(cfg: NetConfig) -> Self {
        let key = NodeKeypair::generate();
        let listen = [SocketAddr::new(V6, 0), SocketAddr::new(V4, 0)];
        let t = Transports::bind(&key, &listen, &BOTH, cfg).await.unwrap();
        Self { key, t }
    }
    async fn dial_only() -> Self {
        let key = NodeKeypair::generate();
        let t = Transports::bind(&key, &[], &BOTH, NetConfig::default())
            .await
            .unwrap();
        Self { key, t }
    }
    fn id(&self) -> vx6_proto::NodeId {
        self.key.node_id()
    }
    fn endpoint(&self, kind: TransportKind, ip: IpAddr) -> Endpoint {
        *self
            .t
            .local_endpoints()
            .iter()
            .find(|e| e.transport == kind && e.addr.ip() == ip)
            .unwrap()
    }
    async fn accept(&self) -> Conn {
        tokio::time::timeout(WAIT, self.t.accept())
            .await
            .unwrap()
            .unwrap()
    }
    /// Asserts that no connection comes out of accept() for a while.
    async fn accepts_nothing(&self) {
        let r = tokio::time::timeout(Duration::from_millis(500), self.t.accept()).await;
        assert!(r.is_err(), "unexpected inbound connection: {r:?}");
    }
}

/// Cheap deterministic bytes (xorshift), so no RNG crate is needed.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Echoes `len` bytes back on `conn`, then hands the connection back so the
/// caller decides when it closes.
async fn echo(mut conn: Conn, len: usize) -> Conn {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0;
    while done < len {
        let n = conn.io.read(&mut buf).await.unwrap();
        assert!(n > 0, "early EOF after {done} bytes");
        conn.io.write_all(&buf[..n]).await.unwrap();
        done += n;
    }
    conn.io.flush().await.unwrap();
    conn
}

/// Sends `data` and checks that the same bytes come back, writing and
/// reading concurrently so neither side's buffers have to hold it all.
async fn round_trip(conn: Conn, data: Vec<u8>) {
    let (mut rd, mut wr) = tokio::io::split(conn.io);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.flush().await.unwrap();
        wr
    });
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(WAIT, rd.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "echoed bytes differ");
    writer.await.unwrap();
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_id_authenticates_both_ends_and_echoes_1mib() {
    let server = Node::listening(NetConfig::default()).await;
    let client = Node::dial_only().await;
    for kind in BOTH {
        for ip in [V6, V4] {
            let ep = server.endpoint(kind, ip);
            let (dialed, accepted) = tokio::join!(
                client.t.dial(ep, Expect::Node(server.id())),
                server.accept()
            );
            let dialed = dialed.unwrap_or_else(|e| panic!("{kind} {ip}: {e}"));
            assert_eq!(dialed.peer, server.id());
            assert_eq!(accepted.peer, client.id());
            assert_eq!((dialed.transport, accepted.transport), (kind, kind));
            assert_eq!(dialed.remote, ep.addr);
            assert_eq!(accepted.remote.ip(), ip);

            let len = 1 << 20;
            let echoer = tokio::spawn(echo(accepted, len));
            round_trip(dialed, pseudo_random(len, 7)).await;
            drop(echoer.await.unwrap());
        }
    }
    assert_eq!(server.t.stats().handshakes_ok, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_dials_leave_from_the_listening_port() {
    let server = Node::listening(NetConfig::default()).await;
    let client = Node::listening(NetConfig::default()).await;
    for ip in [V6, V4] {
        let ep = server.endpoint(TransportKind::Quic, ip);
        let (dialed, accepted) = tokio::join!(
            client.t.dial(ep, Expect::Node(server.id())),
            server.accept()
        );
        dialed.unwrap();
        assert_eq!(
            accepted.remote,
            client.endpoint(TransportKind::Quic, ip).addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_expected_id_fails_with_wrong_node() {
    let server = Node::listening(NetConfig::default()).await;
    let client = Node::dial_only().await;
    let imposter_for = NodeKeypair::generate().node_id();
    for kind in BOTH {
        for ip in [V6, V4] {
            let ep = server.endpoint(kind, ip);
            let err = client
                .t
                .dial(ep, Expect::Node(imposter_for))
                .await
                .unwrap_err();
            match err {
                NetError::WrongNode { expected, got } => {
                    assert_eq!(expected, imposter_for);
                    assert_eq!(got, server.id());
                }
                e => panic!("{kind} {ip}: expected WrongNode, got {e}"),
            }
        }
    }
    server.accepts_nothing().await;
    eventually("failed handshakes counted", || {
        server.t.stats().handshakes_failed == 4
    })
    .await;
    assert_eq!(server.t.stats().handshakes_ok, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_key_dial_learns_the_peer_id() {
    let server = Node::listening(NetConfig::default()).await;
    let client = Node::dial_only().await;
    for kind in BOTH {
        for ip in [V6, V4] {
            let (dialed, accepted) = tokio::join!(
                client.t.dial(server.endpoint(kind, ip), Expect::AnyKey),
                server.accept()
            );
            assert_eq!(dialed.unwrap().peer, server.id());
            assert_eq!(accepted.peer, client.id());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_kinds_share_one_port_per_address() {
    let server = Node::listening(NetConfig::default()).await;
    let eps = server.t.local_endpoints();
    assert_eq!(eps.len(), 4);
    for ip in [V6, V4] {
        let tcp = server.endpoint(TransportKind::Tcp, ip).addr.port();
        let quic = server.endpoint(TransportKind::Quic, ip).addr.port();
        assert_ne!(tcp, 0);
        assert_eq!(tcp, quic, "{ip}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tcp_handshake_blocks_nobody_and_is_dropped() {
    let server = Node::listening(cfg(Duration::from_secs(1))).await;
    let client = Node::dial_only().await;
    let ep = server.endpoint(TransportKind::Tcp, V6);
    let mut stalled = TcpStream::connect(ep.addr).await.unwrap();
    // A second one that sends half a TLS record and then nothing.
    let mut half = TcpStream::connect(ep.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();

    let (dialed, accepted) = tokio::join!(
        client.t.dial(ep, Expect::Node(server.id())),
        server.accept()
    );
    assert_eq!(dialed.unwrap().peer, server.id());
    assert_eq!(accepted.peer, client.id());

    // After the handshake timeout the server hangs up on both.
    for s in [&mut stalled, &mut half] {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "server kept a stalled handshake: {r:?}"
        );
    }
    eventually("timeouts counted", || {
        server.t.stats().handshakes_timed_out == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_does_not_hurt_the_listeners() {
    let server = Node::listening(cfg(Duration::from_secs(2))).await;
    let client = Node::dial_only().await;
    for ip in [V6, V4] {
        let tcp_ep = server.endpoint(TransportKind::Tcp, ip);
        for seed in 1..4 {
            let mut s = TcpStream::connect(tcp_ep.addr).await.unwrap();
            // Errors are fine: the server may hang up mid-write.
            let _ = s.write_all(&pseudo_random(16 * 1024, seed)).await;
        }
        // A TLS record header announcing a huge record.
        let mut s = TcpStream::connect(tcp_ep.addr).await.unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x03, 0xff, 0xff]).await;
        let _ = s.write_all(&pseudo_random(2000, 9)).await;

        let udp_ep = server.endpoint(TransportKind::Quic, ip);
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
        for (seed, len) in [(1, 1200), (2, 1), (3, 40), (4, 1500)] {
            udp.send_to(&pseudo_random(len, seed), udp_ep.addr)
                .await
                .unwrap();
        }
        // Looks like a QUIC v1 Initial, then garbage.
        let mut initial = vec![0xc0, 0, 0, 0, 1, 8];
        initial.extend(pseudo_random(1200, 5));
        udp.send_to(&initial, udp_ep.addr).await.unwrap();

        for kind in BOTH {
            let ep = server.endpoint(kind, ip);
            let (dialed, accepted) = tokio::join!(
                client.t.dial(ep, Expect::Node(server.id())),
                server.accept()
            );
            assert_eq!(dialed.unwrap().peer, server.id(), "{kind} {ip}");
            assert_eq!(accepted.peer, client.id());
        }
    }
    eventually("garbage counted as failed", || {
        server.t.stats().handshakes_failed >= 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_must_prove_a_key_and_send_the_preamble() {
    let server = Node::listening(NetConfig::default()).await;
    let ep = server.endpoint(TransportKind::Tcp, V4);
    let name = || {
        rustls_pki_types::ServerName::try_from(tls::server_name(Expect::Node(server.id()))).unwrap()
    };

    // Same verifier, but no client key offered: the server refuses.
    let mut no_key = (*TlsConfigs::new(&NodeKeypair::generate()).unwrap().client).clone();
    no_key.client_auth_cert_resolver = Arc::new(NoKey);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(no_key));
    let tcp = TcpStream::connect(ep.addr).await.unwrap();
    // The client may finish its side before it hears the refusal.
    if let Ok(mut s) = connector.connect(name(), tcp).await {
        let _ = s.write_all(&tls_preamble()).await;
        let _ = s.flush().await;
        let mut buf = [0u8; 1];
        assert!(!matches!(s.read(&mut buf).await, Ok(1)));
    }

    // A proper key but the wrong preamble.
    let configs = TlsConfigs::new(&NodeKeypair::generate()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(configs.client);
    let tcp = TcpStream::connect(ep.addr).await.unwrap();
    let mut s = connector.connect(name(), tcp).await.unwrap();
    s.write_all(b"VX7\x01").await.unwrap();
    s.flush().await.unwrap();

    server.accepts_nothing().await;
    eventually("both refused", || server.t.stats().handshakes_failed == 2).await;
    assert_eq!(server.t.stats().handshakes_ok, 0);
}

fn tls_preamble() -> [u8; 4] {
    vx6_net::transport::PREAMBLE
}

/// A client certificate resolver with nothing to offer.
#[derive(Debug)]
struct NoKey;

impl rustls::client::ResolvesClientCert for NoKey {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_over_the_limit_are_dropped() {
    let config = NetConfig {
        max_pending_handshakes: 1,
        ..cfg(Duration::from_secs(2))
    };
    let server = Node::listening(config).await;
    let client = Node::dial_only().await;
    let ep = server.endpoint(TransportKind::Tcp, V4);
    let _stalled = TcpStream::connect(ep.addr).await.unwrap();
    // Let the listener take the stalled connection into the only slot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(client.t.dial(ep, Expect::Node(server.id())).await.is_err());
    assert_eq!(server.t.stats().dropped_over_limit, 1);

    // Once the stalled one times out, the slot is free again.
    eventually("the stalled handshake to time out", || {
        server.t.stats().handshakes_timed_out == 1
    })
    .await;
    let (dialed, accepted) = tokio::join!(
        client.t.dial(ep, Expect::Node(server.id())),
        server.accept()
    );
    dialed.unwrap();
    assert_eq!(accepted.peer, client.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_accept_and_dials_but_not_live_connections() {
    let server = Node::listening(NetConfig::default()).await;
    let client = Node::dial_only().await;
    let ep = server.endpoint(TransportKind::Quic, V6);
    let (dialed, accepted) = tokio::join!(
        client.t.dial(ep, Expect::Node(server.id())),
        server.accept()
    );
    let (mut dialed, mut accepted) = (dialed.unwrap(), accepted);

    client.t.close();
    server.t.close();
    assert!(matches!(server.t.accept().await, Err(NetError::Closed)));
    assert!(matches!(
        client.t.dial(ep, Expect::AnyKey).await,
        Err(NetError::Closed)
    ));
    dialed.io.write_all(b"still here").await.unwrap();
    dialed.io.flush().await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(WAIT, accepted.io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_wakes_a_waiting_accept() {
    let server = Arc::new(Node::listening(NetConfig::default()).await);
    let waiter = {
        let server = server.clone();
        tokio::spawn(async move { server.t.accept().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.t.close();
    let r = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    assert!(matches!(r, Err(NetError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_enabled_transports_bind_and_dial() {
    let key = NodeKeypair::generate();
    let t = Transports::bind(
        &key,
        &[SocketAddr::new(V4, 0)],
        &[TransportKind::Tcp],
        NetConfig::default(),
    )
    .await
    .unwrap();
    let eps = t.local_endpoints();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].transport, TransportKind::Tcp);
    let quic = Endpoint {
        transport: TransportKind::Quic,
        addr: SocketAddr::new(V4, 9),
    };
    assert!(matches!(
        t.dial(quic, Expect::AnyKey).await,
        Err(NetError::Config(_))
    ));
    assert!(
        Transports::bind(&key, &[], &[], NetConfig::default())
            .await
            .is_err()
    );
}

/// A bare quinn client with a valid node key, to misbehave after TLS.
fn raw_quic_client(ip: IpAddr) -> quinn::Endpoint {
    let tls = TlsConfigs::new(&NodeKeypair::generate()).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.client).unwrap();
    let mut ep = quinn::Endpoint::client(SocketAddr::new(ip, 0)).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_peer_without_a_proper_stream_is_dropped() {
    let server = Node::listening(cfg(Duration::from_secs(1))).await;
    let client = Node::dial_only().await;
    let ep = server.endpoint(TransportKind::Quic, V4);
    let raw = raw_quic_client(V4);
    let name = tls::server_name(Expect::Node(server.id()));

    // Completes TLS, then never opens a stream.
    let silent = raw.connect(ep.addr, &name).unwrap().await.unwrap();
    // Opens a stream with the wrong preamble.
    let bad = raw.connect(ep.addr, &name).unwrap().await.unwrap();
    let (mut send, _recv) = bad.open_bi().await.unwrap();
    send.write_all(b"VX7\x01").await.unwrap();

    let (dialed, accepted) = tokio::join!(
        client.t.dial(ep, Expect::Node(server.id())),
        server.accept()
    );
    assert_eq!(dialed.unwrap().peer, server.id());
    assert_eq!(accepted.peer, client.id());

    // The server closes both; the silent one after the handshake timeout.
    tokio::time::timeout(WAIT, bad.closed()).await.unwrap();
    tokio::time::timeout(WAIT, silent.closed()).await.unwrap();
    eventually("both counted", || {
        let s = server.t.stats();
        s.handshakes_failed == 1 && s.handshakes_timed_out == 1
    })
    .await;
}
