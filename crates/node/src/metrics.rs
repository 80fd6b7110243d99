//! Opt-in Prometheus metrics: aggregate counters in the text exposition
//! format on `metrics_listen` (keep it on loopback). Never per-peer labels,
//! addresses or keys: only totals.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::node::Node;

/// Renders the node's counters in the Prometheus text format.
pub fn render(node: &Node) -> String {
    let c = &node.inner().counters;
    let ts = node.pool().transports().stats();
    let mut out = String::new();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let l = &node.inner().links;
    let counters: [(&str, &str, u64); 16] = [
        (
            "service_streams_total",
            "Service streams opened by peers.",
            load(&c.service_streams),
        ),
        (
            "service_refused_total",
            "Service streams refused (undeclared service).",
            load(&c.service_refused),
        ),
        (
            "service_not_allowed_total",
            "Service streams refused by an allow list.",
            load(&c.service_not_allowed),
        ),
        (
            "target_failed_total",
            "Local targets that could not be reached.",
            load(&c.target_failed),
        ),
        (
            "forward_connections_total",
            "Local connections accepted by forwards.",
            load(&c.forward_connections),
        ),
        (
            "forward_failures_total",
            "Forwarded connections that failed or aborted.",
            load(&c.forward_failures),
        ),
        (
            "records_accepted_total",
            "Peer records verified and stored.",
            load(&c.records_accepted),
        ),
        (
            "records_rejected_total",
            "Peer records that failed verification.",
            load(&c.records_rejected),
        ),
        (
            "handshakes_ok_total",
            "Inbound handshakes completed.",
            ts.handshakes_ok,
        ),
        (
            "handshakes_failed_total",
            "Inbound handshakes failed.",
            ts.handshakes_failed,
        ),
        (
            "handshakes_timed_out_total",
            "Inbound handshakes timed out.",
            ts.handshakes_timed_out,
        ),
        (
            "link_bytes_in_total",
            "Bytes read from channels, headers included.",
            load(&l.bytes_in),
        ),
        (
            "link_bytes_out_total",
            "Bytes written to channels, headers included.",
            load(&l.bytes_out),
        ),
        (
            "link_streams_refused_total",
            "Streams peers opened that were refused (too many, queue full).",
            load(&l.streams_refused),
        ),
        (
            "link_protocol_errors_total",
            "Channels closed because the peer broke the protocol.",
            load(&l.protocol_errors),
        ),
        (
            "link_circuits_overflowed_total",
            "Circuits ended for overrunning their queue or their share of queue memory.",
            load(&l.circuits_overflowed),
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP vx6_{name} {help}\n# TYPE vx6_{name} counter\nvx6_{name} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP vx6_channels Live channels.\n# TYPE vx6_channels gauge\nvx6_channels {}",
        node.pool().channels().len()
    );
    let _ = writeln!(
        out,
        "# HELP vx6_queued_cell_bytes Cell bytes waiting in circuit queues.\n# TYPE vx6_queued_cell_bytes gauge\nvx6_queued_cell_bytes {}",
        node.inner().cell_memory.used()
    );
    out
}

/// Serves `/metrics` (any path) on `addr`; logs and returns if it cannot bind.
pub async fn serve(node: Node, addr: SocketAddr) {
    match TcpListener::bind(addr).await {
        Ok(l) => serve_on(node, l).await,
        Err(e) => tracing::warn!(%addr, error = %e, "cannot serve metrics"),
    }
}

/// Scrapes answered at once; more wait for a slot (each takes at most 4 s).
const MAX_SCRAPES: usize = 8;

/// Serves `/metrics` (any path) on a bound listener, forever.
pub async fn serve_on(node: Node, listener: TcpListener) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Read (and ignore) the request head, bounded in size and time.
            let mut buf = [0u8; 2048];
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
            let body = render(&node);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                s.write_all(head.as_bytes()).await?;
                s.write_all(body.as_bytes()).await
            })
            .await;
        });
    }
}
