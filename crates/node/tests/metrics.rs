//! The metrics endpoint: Prometheus text with every counter once, values
//! that follow what the node did, and nothing that names a peer.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vx6_node::config::Config;
use vx6_node::home::Home;
use vx6_node::node::Node;
use vx6_proto::name::NodeName;

async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn ep_of(node: &Node) -> vx6_proto::record::Endpoint {
    node.local_endpoints()
        .into_iter()
        .find(|e| e.transport == vx6_proto::record::TransportKind::Tcp)
        .unwrap()
}

fn value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_count_what_happens() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    let mut cfg = Config::new(NodeName::new("metered").unwrap());
    cfg.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    cfg.relay.max_queued_mib = 64;
    home.init(&cfg).unwrap();
    let node = Node::start(home).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(vx6_node::metrics::serve_on(node.clone(), listener));

    let first = scrape(addr).await;
    let (head, body) = first.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
    // Every sample has its HELP and TYPE, exactly once.
    let samples: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(samples.len() >= 12, "{body}");
    for s in &samples {
        let name = s.split(' ').next().unwrap();
        assert!(name.starts_with("vx6_"), "{s}");
        assert_eq!(
            body.matches(&format!("# HELP {name} ")).count(),
            1,
            "{name}"
        );
        assert_eq!(
            body.matches(&format!("# TYPE {name} ")).count(),
            1,
            "{name}"
        );
    }
    assert_eq!(value(body, "vx6_handshakes_failed_total"), 0);

    // A connection that is not TLS fails its handshake: the counter moves.
    let ep = node.local_endpoints()[0].addr;
    let mut junk = TcpStream::connect(ep).await.unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut sink)).await;
    let mut later = String::new();
    for _ in 0..50 {
        later = scrape(addr).await;
        if value(&later, "vx6_handshakes_failed_total") >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value(&later, "vx6_handshakes_failed_total"), 1, "{later}");
    // A peer that passes the handshake and then sends a frame no channel
    // may carry (an unknown command) is a protocol error: counted in both
    // the metrics and `status`.
    assert_eq!(value(&later, "vx6_link_protocol_errors_total"), 0);
    let key = vx6_proto::identity::NodeKeypair::generate();
    let kinds = [vx6_proto::record::TransportKind::Tcp];
    let dialer = vx6_net::transport::Transports::bind(&key, &[], &kinds, Default::default())
        .await
        .unwrap();
    let mut conn = dialer
        .dial(ep_of(&node), vx6_net::transport::Expect::Node(node.id()))
        .await
        .unwrap();
    conn.io
        .wr
        .write_all(&[0xee; vx6_proto::link::FRAME_HEADER_LEN])
        .await
        .unwrap();
    conn.io.wr.flush().await.unwrap();
    for _ in 0..50 {
        later = scrape(addr).await;
        if value(&later, "vx6_link_protocol_errors_total") >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        value(&later, "vx6_link_protocol_errors_total"),
        1,
        "{later}"
    );
    assert_eq!(node.status()["links"]["protocol_errors"], 1);
    assert_eq!(value(&later, "vx6_queued_cell_bytes"), 0);
    // The circuit queues' budget is the one configured.
    assert_eq!(node.status()["links"]["queued_cell_limit"], 64 << 20);
    // Only totals: no address or key of anyone appears.
    assert!(!later.contains("127.0.0.1") && !later.contains(&node.id().to_string()));
    node.shutdown();
}
