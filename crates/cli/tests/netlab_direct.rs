//! Direct IPv6 mode across real hosts (issue 2, "What it must show"): two
//! or more network namespaces, `vx6 node` in each, `vx6 connect --addr`
//! between them, over TCP and over QUIC. See `netlab/mod.rs` for the lab.
//!
//! Host 1 is always the owner (services on its 127.0.0.1), host 2 the
//! client; the hostile-input test adds fresh clients on hosts 3 and 4.

mod netlab;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use netlab::*;
use vx6_proto::record::TransportKind;

const MIB: usize = 1024 * 1024;

fn transport_kind(t: &str) -> TransportKind {
    t.parse().expect("tcp or quic")
}

/// `vx6 connect --addr OWNER --service S --listen 127.0.0.1:PORT
/// --transport T [--node ID] --detach` on the client host.
fn connect_addr(
    lab: &Lab,
    client: usize,
    owner: usize,
    service: &str,
    port: u16,
    node: Option<&str>,
    transport: &str,
) -> Out {
    let addr = lab.host(owner).sockaddr();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "connect",
        "--addr",
        &addr,
        "--service",
        service,
        "--listen",
        &listen,
        "--transport",
        transport,
        "--detach",
    ];
    if let Some(n) = node {
        args.extend_from_slice(&["--node", n]);
    }
    lab.vx6(client, &args)
}

/// Two hosts: owner "owner" on host 1 with an echo service `web`, client
/// "client" on host 2; both daemons running.
fn two_hosts(name: &str, extra_hosts: usize) -> Option<(Lab, String)> {
    let lab = Lab::new(name, 2 + extra_hosts)?;
    lab.init(1, "owner", &lab.host(1).sockaddr(), &[]);
    for i in 2..=lab.n() {
        lab.init(i, &format!("client{i}"), &lab.host(i).sockaddr(), &[]);
    }
    lab.echo_server(1, 8080);
    lab.vx6_ok(1, &["service", "add", "web", "127.0.0.1:8080"]);
    for i in 1..=lab.n() {
        lab.start_node(i);
    }
    let owner = lab.node_id(1);
    Some((lab, owner))
}

fn assert_one_line_error(out: &Out, what: &str) {
    assert!(
        !out.ok(),
        "{what}: expected a failure, got {}",
        out.describe()
    );
    let err = out.stderr.trim();
    assert!(!err.is_empty(), "{what}: no message on stderr");
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: the error should be one line, got {err:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{what}: panic instead of an error: {err}"
    );
}

/// Nothing may listen at 127.0.0.1:`port` on `host`.
fn assert_no_forward(lab: &Lab, host: usize, port: u16, what: &str) {
    let r = lab.host(host).local(port, Duration::from_secs(2));
    assert!(
        r.is_err(),
        "{what}: a refused connect must not leave a listener on 127.0.0.1:{port}"
    );
}

// ---------------------------------------------------------------- echo

fn echo_and_concurrency(transport: &str) {
    let Some((lab, owner)) = two_hosts(&format!("echo-{transport}"), 0) else {
        return;
    };
    let out = connect_addr(&lab, 2, 1, "web", 9000, Some(&owner), transport);
    assert!(out.ok(), "connect failed: {}", out.describe());
    let client = lab.host(2).clone();

    // 64 MiB of random bytes there and back, byte-exact, with half-close.
    let payload = Arc::new(random_bytes(64 * MIB));
    let secs = echo_via(&client, 9000, payload, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("64 MiB echo over {transport}: {e}"));
    lab.log(format!(
        "64 MiB echo over {transport}: {secs:.2} s ({:.1} MiB/s each way)",
        64.0 / secs
    ));

    // 50 connections open at once, then all exchange data at once.
    let n = 50;
    let barrier = Arc::new(Barrier::new(n));
    let t = Instant::now();
    let socks: Vec<Result<TcpStream, String>> = (0..n)
        .map(|_| {
            client
                .local(9000, Duration::from_secs(5))
                .map_err(|e| e.to_string())
        })
        .collect();
    let handles: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(k, s)| {
            let b = barrier.clone();
            thread::spawn(move || {
                b.wait();
                let s = s.map_err(|e| format!("conn {k}: connect: {e}"))?;
                let p = Arc::new(random_bytes(256 * 1024 + k));
                echo_exchange(s, p, Duration::from_secs(60)).map_err(|e| format!("conn {k}: {e}"))
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())).err())
        .collect();
    lab.log(format!(
        "{n} concurrent connections over {transport}: {} failed, {:.2} s",
        failures.len(),
        t.elapsed().as_secs_f64()
    ));
    assert!(
        failures.is_empty(),
        "{} of {n} concurrent connections over {transport} failed: {failures:#?}",
        failures.len()
    );
}

#[test]
fn echo_64mib_and_50_concurrent_tcp() {
    echo_and_concurrency("tcp");
}

#[test]
fn echo_64mib_and_50_concurrent_quic() {
    echo_and_concurrency("quic");
}

// ---------------------------------------------------------------- refusals

/// What a raw stream asking for `service` got back.
#[derive(Debug, PartialEq)]
enum RawOutcome {
    /// The owner accepted and `data` came back (first byte is the accept).
    Accepted(Vec<u8>),
    /// Reset, with the error text.
    Refused(String),
    /// Ended without any data.
    ClosedEmpty,
    Timeout,
}

/// A probe (fresh key, on no allow list) opens a stream for `service` on
/// the owner and sends a few bytes.
async fn raw_service_stream(
    chan: &vx6_net::channel::Channel,
    service: &str,
) -> Result<RawOutcome, String> {
    use vx6_proto::name::ServiceName;
    use vx6_proto::nodemsg::Purpose;
    let purpose = Purpose::Service(ServiceName::new(service).map_err(|e| e.to_string())?);
    let (mut send, mut recv) = chan
        .open(bytes::Bytes::from(purpose.encode()))
        .await
        .map_err(|e| format!("open: {e}"))?;
    let _ = send.send(bytes::Bytes::from_static(b"hello")).await;
    let _ = send.finish().await;
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match recv.recv().await {
                Ok(Some(b)) => got.extend_from_slice(&b),
                Ok(None) => return None,
                Err(e) => return Some(e.to_string()),
            }
        }
    })
    .await;
    Ok(match r {
        Err(_) if got.is_empty() => RawOutcome::Timeout,
        Err(_) => RawOutcome::Accepted(got),
        Ok(_) if !got.is_empty() => RawOutcome::Accepted(got),
        Ok(Some(e)) => RawOutcome::Refused(e),
        Ok(None) => RawOutcome::ClosedEmpty,
    })
}

fn refusals(transport: &str) {
    let Some(lab) = Lab::new(&format!("refuse-{transport}"), 2) else {
        return;
    };
    lab.init(1, "owner", &lab.host(1).sockaddr(), &[]);
    lab.init(2, "client", &lab.host(2).sockaddr(), &[]);
    let client_id = lab.node_id(2);
    let stranger = vx6_proto::NodeKeypair::generate().node_id().to_string();
    lab.echo_server(1, 8080);
    lab.echo_server(1, 8081);
    let theirs_rec = lab.recording_listener(1, 8082);
    let secret_rec = lab.recording_listener(1, 8083);
    lab.vx6_ok(1, &["service", "add", "web", "127.0.0.1:8080"]);
    lab.vx6_ok(
        1,
        &[
            "service",
            "add",
            "mine",
            "127.0.0.1:8081",
            "--allow",
            &client_id,
        ],
    );
    lab.vx6_ok(
        1,
        &[
            "service",
            "add",
            "theirs",
            "127.0.0.1:8082",
            "--allow",
            &stranger,
        ],
    );
    lab.vx6_ok(
        1,
        &[
            "service",
            "add",
            "secret",
            "127.0.0.1:8083",
            "--private",
            "--allow",
            &stranger,
        ],
    );
    lab.start_node(1);
    lab.start_node(2);
    let owner = lab.node_id(1);
    let client = lab.host(2).clone();
    let small = Arc::new(random_bytes(64 * 1024));

    // A wrong --node is refused before anything listens.
    let out = connect_addr(&lab, 2, 1, "web", 9001, Some(&stranger), transport);
    assert_one_line_error(&out, "wrong --node");
    let short: String = stranger.chars().take(12).collect();
    assert!(
        out.stderr.contains(&short),
        "wrong --node: the message should name the expected node id: {}",
        out.stderr.trim()
    );
    assert_no_forward(&lab, 2, 9001, "wrong --node");
    lab.log(format!("wrong --node refused: {}", out.stderr.trim()));

    // Control: the right node id works.
    let out = connect_addr(&lab, 2, 1, "web", 9002, Some(&owner), transport);
    assert!(out.ok(), "connect to web: {}", out.describe());
    echo_via(&client, 9002, small.clone(), Duration::from_secs(30)).expect("echo via web");

    // An undeclared service is refused.
    let out = connect_addr(&lab, 2, 1, "nosuch", 9003, Some(&owner), transport);
    assert_one_line_error(&out, "undeclared service");
    assert!(
        out.stderr.contains("nosuch"),
        "undeclared service: the message should name the service: {}",
        out.stderr.trim()
    );
    assert_no_forward(&lab, 2, 9003, "undeclared service");
    let nosuch_msg = out.stderr.trim().to_string();
    lab.log(format!("undeclared service refused: {nosuch_msg}"));

    // Allowed by id: works.
    let out = connect_addr(&lab, 2, 1, "mine", 9004, Some(&owner), transport);
    assert!(
        out.ok(),
        "connect to a service that allows this client: {}",
        out.describe()
    );
    echo_via(&client, 9004, small.clone(), Duration::from_secs(30)).expect("echo via mine");

    // Not on --allow: refused, and the target never sees a connection.
    for (svc, port, rec) in [
        ("theirs", 9005u16, &theirs_rec),
        ("secret", 9006u16, &secret_rec),
    ] {
        let out = connect_addr(&lab, 2, 1, svc, port, Some(&owner), transport);
        if out.ok() {
            // The forward exists: a connection through it must close
            // without data.
            let s = client
                .local(port, Duration::from_secs(5))
                .expect("connect to forward");
            let mut w = s.try_clone().expect("clone");
            let _ = w.write_all(b"hello");
            let (n, how, secs) = drain(s, Duration::from_secs(20));
            assert!(
                n == 0 && how != "timeout",
                "service {svc} (client not allowed): connection should close without data; got {n} bytes, ended by {how} after {secs:.1} s"
            );
        } else {
            assert_one_line_error(&out, &format!("service {svc}, client not allowed"));
        }
        thread::sleep(Duration::from_millis(500));
        assert_eq!(
            rec.connections(),
            0,
            "service {svc}: the owner connected to the target of a client that is not allowed"
        );
        lab.log(format!(
            "{svc} (not allowed): {}",
            if out.ok() {
                "forward created; connection closed without data".to_string()
            } else {
                out.stderr.trim().to_string()
            }
        ));
    }
    // A private service refuses exactly like a missing one.
    let out = connect_addr(&lab, 2, 1, "secret", 9007, Some(&owner), transport);
    if !out.ok() {
        assert_eq!(
            out.stderr.trim().replace("secret", "nosuch"),
            nosuch_msg,
            "a private service must be refused exactly like a missing one"
        );
    }

    // The owner itself, asked on a raw stream by a key on no allow list:
    // no open proxy, no allow-list bypass (the client-side catalog check is
    // not what protects the service).
    let owner_addr: SocketAddr = lab.host(1).sockaddr().parse().expect("addr");
    let kind = transport_kind(transport);
    let results = client.run_async(move || async move {
        let probe = Probe::new().await;
        let chan = probe.channel(kind, owner_addr).await?;
        let mut out = Vec::new();
        for svc in ["web", "nosuch", "mine", "theirs", "secret"] {
            out.push((svc, raw_service_stream(&chan, svc).await?));
        }
        Ok::<_, String>(out)
    });
    let results = results.unwrap_or_else(|e| panic!("raw streams: {e}"));
    lab.log(format!(
        "raw service streams from a stranger key: {results:?}"
    ));
    for (svc, r) in &results {
        match (*svc, r) {
            ("web", RawOutcome::Accepted(d)) => {
                assert_eq!(d.first(), Some(&vx6_proto::nodemsg::SERVICE_ACCEPTED));
            }
            ("web", other) => panic!("raw stream to public web should be accepted: {other:?}"),
            (_, RawOutcome::Refused(_)) | (_, RawOutcome::ClosedEmpty) => {}
            (svc, other) => {
                panic!("raw stream to {svc} from a stranger must be refused: {other:?}")
            }
        }
    }
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        theirs_rec.connections(),
        0,
        "target of 'theirs' was reached"
    );
    assert_eq!(
        secret_rec.connections(),
        0,
        "target of 'secret' was reached"
    );
}

#[test]
fn refusals_tcp() {
    refusals("tcp");
}

#[test]
fn refusals_quic() {
    refusals("quic");
}

// ---------------------------------------------------------------- kill -9

/// Reads `s` (a download) until it ends, counting bytes; reports how it
/// ended and when.
fn start_download(s: TcpStream, progress: Arc<AtomicU64>) -> mpsc::Receiver<(String, Instant)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = s;
        let _ = r.set_read_timeout(Some(Duration::from_secs(120)));
        let mut buf = vec![0u8; 64 * 1024];
        let how = loop {
            match r.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    progress.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) => break format!("error: {e}"),
            }
        };
        let _ = tx.send((how, Instant::now()));
    });
    rx
}

fn owner_kill9_and_restart(transport: &str) {
    let Some((lab, owner)) = two_hosts(&format!("kill9-{transport}"), 0) else {
        return;
    };
    lab.source_server(1, 8090);
    lab.vx6_ok(1, &["service", "add", "source", "127.0.0.1:8090"]);
    let client = lab.host(2).clone();
    let out = connect_addr(&lab, 2, 1, "web", 9000, Some(&owner), transport);
    assert!(out.ok(), "connect web: {}", out.describe());
    let out = connect_addr(&lab, 2, 1, "source", 9001, Some(&owner), transport);
    assert!(out.ok(), "connect source: {}", out.describe());
    let small = Arc::new(random_bytes(64 * 1024));
    echo_via(&client, 9000, small.clone(), Duration::from_secs(30)).expect("warm-up echo");
    let before = lab.status(1);
    let known_before = num(&before, "/discovery/known_nodes");
    let mut failures: Vec<String> = Vec::new();

    // A download in full flow when the owner dies.
    let progress = Arc::new(AtomicU64::new(0));
    let s = client
        .local(9001, Duration::from_secs(5))
        .expect("connect forward");
    let ended = start_download(s, progress.clone());
    wait_until(
        Duration::from_secs(30),
        "8 MiB downloaded before the kill",
        || {
            let p = progress.load(Ordering::SeqCst);
            if p >= 8 * MIB as u64 {
                Ok(())
            } else {
                Err(format!("{p} bytes so far"))
            }
        },
    );
    let killed_at = Instant::now();
    lab.kill9(1);
    match ended.recv_timeout(Duration::from_secs(20)) {
        Ok((how, at)) => {
            let secs = at.duration_since(killed_at).as_secs_f64();
            lab.log(format!(
                "{transport}: the client's download ended by {how} {secs:.2} s after kill -9, {} bytes received",
                progress.load(Ordering::SeqCst)
            ));
            if how == "eof" {
                failures.push(format!(
                    "the owner died mid-download but the client's connection ended with a plain EOF ({secs:.2} s after kill -9), which looks like a complete transfer; an abort should reach the client as an error (connection reset)"
                ));
            }
        }
        Err(_) => failures.push(
            "the client's download did not end within 20 s of kill -9 of the owner (it hangs)"
                .to_string(),
        ),
    }

    // The owner comes back with the same identity, services and registry.
    lab.start_node(1);
    let restarted = Instant::now();
    assert_eq!(
        lab.node_id(1),
        owner,
        "the restarted owner has another node id"
    );
    let after = lab.status(1);
    assert_eq!(
        after["node_id"].as_str(),
        Some(owner.as_str()),
        "status after restart"
    );
    let svcs: Vec<(String, String)> = after["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_string(),
                s["target"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [("web", "127.0.0.1:8080"), ("source", "127.0.0.1:8090")] {
        if !svcs.contains(&(want.0.to_string(), want.1.to_string())) {
            failures.push(format!("service {want:?} missing after restart: {svcs:?}"));
        }
    }
    let known_after = num(&after, "/discovery/known_nodes");
    if known_after < known_before {
        failures.push(format!(
            "registry lost records over kill -9: knew {known_before} nodes, now {known_after}"
        ));
    }

    // The forward the client already has, and a brand-new connect.
    let old = poll_until(Duration::from_secs(20), || {
        echo_via(&client, 9000, small.clone(), Duration::from_secs(10))
    });
    let old_secs = restarted.elapsed().as_secs_f64();
    let mut attempts = 0;
    let fresh = poll_until(Duration::from_secs(20), || {
        attempts += 1;
        let port = 9100 + attempts;
        let out = connect_addr(&lab, 2, 1, "web", port, Some(&owner), transport);
        if !out.ok() {
            return Err(format!("connect: {}", out.stderr.trim()));
        }
        echo_via(&client, port, small.clone(), Duration::from_secs(10))
    });
    lab.log(format!(
        "{transport}: after restart: existing forward {old:?} ({old_secs:.1} s), new connect {fresh:?} ({attempts} attempts, {:.1} s)",
        restarted.elapsed().as_secs_f64()
    ));
    if let Err(e) = &fresh {
        failures.push(format!(
            "a new connect to the restarted owner failed for 20 s: {e}"
        ));
    }
    if let Err(e) = &old {
        failures.push(format!(
            "the client's existing forward never worked again within 20 s of the owner's restart: {e}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{transport}: kill -9 of the owner:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn owner_kill9_and_restart_tcp() {
    owner_kill9_and_restart("tcp");
}

#[test]
fn owner_kill9_and_restart_quic() {
    owner_kill9_and_restart("quic");
}

// ---------------------------------------------------------------- hostile

/// A TLS record header announcing 512 bytes of handshake, and the first
/// ~80 of them (a ClientHello cut short).
fn half_client_hello() -> Vec<u8> {
    let mut v = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    v.extend(random_bytes(32));
    v.push(32);
    v.extend(random_bytes(32));
    v.extend([0x00, 0x08, 0x13, 0x01]);
    v
}

/// A QUIC v1 Initial-looking datagram (long header, random CIDs, garbage
/// payload) padded to 1200 bytes.
fn fake_quic_initial() -> Vec<u8> {
    let mut v = vec![0xc3, 0, 0, 0, 1, 8];
    v.extend(random_bytes(8));
    v.push(8);
    v.extend(random_bytes(8));
    v.push(0); // token length
    v.extend([0x44, 0x9e]); // length varint
    let rest = 1200 - v.len();
    v.extend(random_bytes(rest));
    v
}

fn frame(cmd: u8, stream: u32, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![cmd];
    v.extend(0u32.to_be_bytes());
    v.extend(stream.to_be_bytes());
    v.extend(len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Keeps `n` TCP connections to `addr` open from `host` that never finish
/// a handshake (half of them silent, half with half a ClientHello),
/// reopening any the node closes, until `stop`.
fn slowloris(
    host: Host,
    addr: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let open = |k: usize| -> Option<TcpStream> {
            let s = host.tcp_connect(addr, Duration::from_secs(2)).ok()?;
            if k % 2 == 1 {
                let mut w = &s;
                let _ = w.write_all(&half_client_hello());
            }
            opened.fetch_add(1, Ordering::Relaxed);
            Some(s)
        };
        let mut socks: Vec<Option<TcpStream>> = (0..n).map(open).collect();
        while !stop.load(Ordering::Relaxed) {
            for (k, slot) in socks.iter_mut().enumerate() {
                let dead = match slot {
                    None => true,
                    Some(s) => {
                        let _ = s.set_nonblocking(true);
                        let mut b = [0u8; 1];
                        match s.peek(&mut b) {
                            Ok(0) => true,
                            Ok(_) => false,
                            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                        }
                    }
                };
                if dead {
                    *slot = open(k);
                }
            }
            thread::sleep(Duration::from_millis(300));
        }
    })
}

/// Raw hostile bytes on authenticated connections (a fresh key that passes
/// TLS, then breaks the link protocol). Returns, per case, a description,
/// whether the node must close the connection (a frame no correct peer
/// sends), and whether it did within 5 s.
async fn authenticated_garbage(
    kind: TransportKind,
    owner: SocketAddr,
) -> Vec<(String, bool, bool)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = Probe::new().await;
    let web_open = vx6_proto::nodemsg::Purpose::Service(
        vx6_proto::name::ServiceName::new("web").expect("name"),
    )
    .encode();
    let mut cases: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "DATA frame with length 0xffffffff",
            true,
            frame(2, 1, u32::MAX, &random_bytes(100)),
        ),
        (
            "OPEN frame with length 0x7fffffff",
            true,
            frame(1, 1, 0x7fff_ffff, b"x"),
        ),
        ("unknown command", true, frame(0xee, 1, 4, b"abcd")),
        ("random garbage", true, random_bytes(4096)),
        (
            "DATA on a stream never opened",
            false,
            frame(2, 99, 4, b"abcd"),
        ),
    ];
    let mut opens = Vec::new();
    for k in 0..1000u32 {
        opens.extend(frame(1, 2 * k + 1, 1, &[2]));
    }
    cases.push(("1000 OPENs never used", false, opens));
    let mut windows = Vec::new();
    for _ in 0..1000 {
        windows.extend(frame(3, 0, 4, &u32::MAX.to_be_bytes()));
    }
    cases.push((
        "1000 channel WINDOW increments of 0xffffffff",
        false,
        windows,
    ));
    let mut flood = frame(1, 1, web_open.len() as u32, &web_open);
    let chunk = random_bytes(32 * 1024);
    for _ in 0..(8 * 1024 * 1024 / chunk.len()) {
        flood.extend(frame(2, 1, chunk.len() as u32, &chunk));
    }
    cases.push((
        "8 MiB DATA on one stream, never reading (window overrun)",
        false,
        flood,
    ));
    cases.push((
        "a truncated frame header, then silence",
        false,
        vec![2, 0, 0, 0],
    ));

    let mut report = Vec::new();
    for (what, must_close, bytes) in cases {
        let conn = match probe.conn(kind, owner).await {
            Ok(c) => c,
            Err(e) => {
                report.push((format!("{what}: cannot connect: {e}"), must_close, false));
                continue;
            }
        };
        let mut io = conn.io;
        let w = tokio::time::timeout(Duration::from_secs(10), async {
            io.write_all(&bytes).await?;
            io.flush().await
        })
        .await;
        let mut buf = vec![0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok();
        report.push((
            format!(
                "{what}: write {}, node {}",
                match w {
                    Ok(Ok(())) => "ok".to_string(),
                    Ok(Err(e)) => format!("failed ({e})"),
                    Err(_) => "blocked".to_string(),
                },
                if closed {
                    "closed the connection"
                } else {
                    "kept it open"
                }
            ),
            must_close,
            closed,
        ));
    }
    report
}

#[test]
fn hostile_input() {
    // Host 1 owner, host 2 client with a forward (and the attacker), hosts
    // 3 and 4 fresh clients that must get in during the attack.
    let Some((lab, owner)) = two_hosts("hostile", 2) else {
        return;
    };
    let owner_addr: SocketAddr = lab.host(1).sockaddr().parse().expect("addr");
    let out = connect_addr(&lab, 2, 1, "web", 9000, Some(&owner), "tcp");
    assert!(out.ok(), "connect: {}", out.describe());
    let small = Arc::new(random_bytes(64 * 1024));
    let attacker = lab.host(2).clone();
    echo_via(&attacker, 9000, small.clone(), Duration::from_secs(30)).expect("warm-up echo");
    thread::sleep(Duration::from_secs(1));
    let pid = lab.daemon_pid(1).expect("owner pid");
    let baseline = rss_kib(pid).expect("owner RSS");
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
    }
    lab.log(format!("owner RSS baseline {} MiB", baseline / 1024));

    // 1. Garbage over TCP before TLS: random bytes, oversized TLS records,
    //    truncated ClientHellos.
    let mut rng = Rng::seeded().0;
    let mut tcp_garbage = 0;
    for k in 0..150 {
        let Ok(mut s) = attacker.tcp_connect(owner_addr, Duration::from_secs(2)) else {
            continue;
        };
        let bytes = match k % 3 {
            0 => random_bytes(1 + rng.below(16 * 1024)),
            1 => {
                let mut v = vec![0x16, 0x03, 0x03, 0xff, 0xff];
                v.extend(random_bytes(1000));
                v
            }
            _ => half_client_hello(),
        };
        let _ = s.write_all(&bytes);
        tcp_garbage += 1;
    }
    // 2. Garbage over UDP: random datagrams and fake QUIC Initials from
    //    300 different sockets.
    let udp = attacker.udp_socket().expect("udp");
    for _ in 0..500 {
        let _ = udp.send_to(&random_bytes(1 + rng.below(1400)), owner_addr);
    }
    let mut udp_socks = Vec::new();
    for _ in 0..300 {
        if let Ok(u) = attacker.udp_socket() {
            let _ = u.send_to(&fake_quic_initial(), owner_addr);
            udp_socks.push(u);
        }
    }
    lab.log(format!(
        "sent TCP garbage on {tcp_garbage} connections, 500 random datagrams, 300 fake QUIC Initials"
    ));
    // 3. Authenticated garbage, both transports.
    let mut must_close_failures = Vec::new();
    for kind in [TransportKind::Tcp, TransportKind::Quic] {
        let report = attacker.run_async(move || authenticated_garbage(kind, owner_addr));
        for (line, must_close, closed) in report {
            lab.log(format!("authenticated garbage over {kind}: {line}"));
            if must_close && !closed {
                must_close_failures.push(format!("{kind}: {line}"));
            }
        }
    }
    assert!(
        lab.daemon_alive(1),
        "the owner daemon died on hostile input"
    );
    assert!(
        lab.try_status(1).is_some(),
        "the owner stopped answering its control socket"
    );
    echo_via(&attacker, 9000, small.clone(), Duration::from_secs(30))
        .expect("existing forward after garbage");

    // 4. 300 never-finished handshakes, kept at 300 while fresh clients
    //    connect.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let loris = slowloris(
        attacker.clone(),
        owner_addr,
        300,
        stop.clone(),
        opened.clone(),
    );
    wait_until(Duration::from_secs(30), "300 idle handshakes open", || {
        let o = opened.load(Ordering::Relaxed);
        if o >= 300 {
            Ok(())
        } else {
            Err(format!("{o} open"))
        }
    });
    lab.log("300 never-finished handshakes open");
    let existing = echo_via(&attacker, 9000, small.clone(), Duration::from_secs(30));
    // Fresh clients (other addresses, no channel to the owner yet) connect
    // at the same time; a few retries a second apart are fine, waiting for
    // the flood's handshakes to time out is not.
    let fresh: Vec<(&str, Result<f64, String>)> = thread::scope(|sc| {
        let handles: Vec<_> = [(3usize, "tcp"), (4usize, "quic")]
            .into_iter()
            .map(|(i, t)| {
                let (lab, owner, small) = (&lab, &owner, small.clone());
                sc.spawn(move || {
                    let start = Instant::now();
                    let mut errors = Vec::new();
                    for attempt in 1..=3u16 {
                        let port = 9000 + attempt;
                        let out = connect_addr(lab, i, 1, "web", port, Some(owner), t);
                        let r = if out.ok() {
                            echo_via(lab.host(i), port, small.clone(), Duration::from_secs(10))
                        } else {
                            Err(out.stderr.trim().to_string())
                        };
                        match r {
                            Ok(_) => {
                                lab.log(format!(
                                    "fresh client over {t} during the handshake flood: connected on attempt {attempt}, {:.1} s",
                                    start.elapsed().as_secs_f64()
                                ));
                                return (t, Ok(start.elapsed().as_secs_f64()));
                            }
                            Err(e) => errors.push(format!("attempt {attempt}: {e}")),
                        }
                        thread::sleep(Duration::from_secs(1));
                    }
                    lab.log(format!(
                        "fresh client over {t} during the handshake flood: failed: {errors:?}"
                    ));
                    (t, Err(errors.join("; ")))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("fresh client thread"))
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    let _ = loris.join();
    lab.log(format!(
        "slowloris opened {} connections in total",
        opened.load(Ordering::Relaxed)
    ));
    thread::sleep(Duration::from_secs(1));
    sampling.store(false, Ordering::Relaxed);
    let after = rss_kib(pid).unwrap_or(0);
    let peak = peak.load(Ordering::Relaxed);
    lab.log(format!(
        "owner RSS: baseline {} MiB, peak {} MiB, after {} MiB",
        baseline / 1024,
        peak / 1024,
        after / 1024
    ));
    let st = lab.try_status(1);
    if let Some(st) = &st {
        lab.log(format!(
            "owner counters after the attack: {}",
            st["counters"]
        ));
    }

    assert!(
        lab.daemon_alive(1),
        "the owner daemon died under the attack"
    );
    assert!(
        st.is_some(),
        "the owner stopped answering its control socket"
    );
    assert!(
        existing.is_ok(),
        "an existing forward stopped working during the handshake flood: {existing:?}"
    );
    for (t, r) in &fresh {
        assert!(
            r.is_ok(),
            "a legitimate new client over {t} could not connect (3 attempts, 1 s apart) while another address held 300 unfinished handshakes: {r:?}"
        );
    }
    assert!(
        must_close_failures.is_empty(),
        "the node kept connections open after frames that break the link protocol: {must_close_failures:#?}"
    );
    assert!(
        peak < baseline + 64 * 1024,
        "owner memory grew from {} MiB to {} MiB under hostile input (cap: +64 MiB)",
        baseline / 1024,
        peak / 1024
    );
    echo_via(&attacker, 9000, small, Duration::from_secs(30)).expect("forward after the attack");
    drop(udp_socks);
}

// ---------------------------------------------------------------- partition

fn partition_then_heal(transport: &str) {
    let Some((lab, owner)) = two_hosts(&format!("partition-{transport}"), 0) else {
        return;
    };
    let client = lab.host(2).clone();
    let small = Arc::new(random_bytes(64 * 1024));
    let out = connect_addr(&lab, 2, 1, "web", 9000, Some(&owner), transport);
    assert!(out.ok(), "connect: {}", out.describe());
    echo_via(&client, 9000, small.clone(), Duration::from_secs(30)).expect("echo before");

    // Cut the owner off: a connect fails with one clear line, in bounded time.
    lab.link(1, false);
    let t = Instant::now();
    let out = connect_addr(&lab, 2, 1, "web", 9001, Some(&owner), transport);
    let secs = t.elapsed().as_secs_f64();
    lab.log(format!(
        "{transport}: connect while partitioned: {} after {secs:.1} s",
        out.describe()
    ));
    let mut failures = Vec::new();
    if out.ok() {
        failures.push(format!(
            "connect to a partitioned owner succeeded: {}",
            out.describe()
        ));
    } else {
        let short: String = owner.chars().take(12).collect();
        let addr = lab.host(1).addr.to_string();
        let err = out.stderr.trim();
        if err.lines().count() != 1 {
            failures.push(format!("the error should be one line: {err:?}"));
        }
        if !(err.contains(&addr) || err.contains(&short)) {
            failures.push(format!(
                "the error for an unreachable owner should say what could not be reached ({addr} or node {short}): {err:?}"
            ));
        }
    }
    if secs >= 15.0 {
        failures.push(format!(
            "connect to a partitioned owner took {secs:.1} s to fail"
        ));
    }

    // Heal: a new connect works again.
    lab.link(1, true);
    let healed = Instant::now();
    let mut attempt = 0;
    let r = poll_until(Duration::from_secs(20), || {
        attempt += 1;
        let port = 9100 + attempt;
        let out = connect_addr(&lab, 2, 1, "web", port, Some(&owner), transport);
        if !out.ok() {
            return Err(out.stderr.trim().to_string());
        }
        echo_via(&client, port, small.clone(), Duration::from_secs(10))
    });
    lab.log(format!(
        "{transport}: after healing: {r:?} ({attempt} attempts, {:.1} s)",
        healed.elapsed().as_secs_f64()
    ));
    if let Err(e) = r {
        failures.push(format!(
            "no new connection within 20 s of the partition healing: {e}"
        ));
    }
    assert!(
        failures.is_empty(),
        "{transport}: partition:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn partition_then_heal_tcp() {
    partition_then_heal("tcp");
}

#[test]
fn partition_then_heal_quic() {
    partition_then_heal("quic");
}
