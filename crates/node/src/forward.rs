//! Moving bytes between a local TCP connection and a stream.
//!
//! Owns the copy loops used on both ends of a forwarded connection: the
//! owner side (stream → its localhost target) and the client side (a local
//! listener → a stream to the owner). Backpressure comes from the stream's
//! flow control on one side and from TCP on the other; a clean end of input
//! becomes a half-close on the other side, and an abort becomes a reset.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vx6_net::channel::{RecvHalf, SendHalf};
use vx6_proto::link::code;
use vx6_proto::nodemsg::SERVICE_ACCEPTED;

/// Read size from the local socket: one read fills two DATA frames.
const READ_CHUNK: usize = 64 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct PumpResult {
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// True when either side ended abnormally (reset, channel lost, socket error).
    pub aborted: bool,
}

/// Copies `tcp` ⇄ stream until both directions are done or one aborts.
/// `initial` holds stream bytes already received (written to `tcp` first).
/// With `expect_status` (the client side), the stream must begin with the
/// owner's accept byte; anything else aborts before a byte reaches `tcp`.
pub async fn pump(
    mut tcp: TcpStream,
    mut send: SendHalf,
    mut recv: RecvHalf,
    initial: bytes::Bytes,
    expect_status: bool,
    meter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> PumpResult {
    use std::sync::atomic::Ordering;
    let meter2 = meter.clone();
    let _ = tcp.set_nodelay(true);
    // Borrowed halves: unlike owned ones they do not send a FIN when dropped,
    // so an aborted connection can end with a reset (below).
    let (mut rd, mut wr) = tcp.split();
    let up = async move {
        let mut n = 0u64;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    return (n, send.finish().await.is_err(), send);
                }
                Ok(k) => {
                    n += k as u64;
                    meter.fetch_add(k as u64, Ordering::Relaxed);
                    if send.send(buf.split().freeze()).await.is_err() {
                        return (n, true, send);
                    }
                }
                Err(_) => {
                    send.reset(code::TARGET_FAILED);
                    return (n, true, send);
                }
            }
        }
    };
    let down = async move {
        let mut n = initial.len() as u64;
        if !initial.is_empty() && wr.write_all(&initial).await.is_err() {
            return (n, true);
        }
        let mut need_status = expect_status;
        loop {
            match recv.recv().await {
                Ok(Some(mut b)) => {
                    if need_status {
                        if b.first() != Some(&SERVICE_ACCEPTED) {
                            return (n, true);
                        }
                        need_status = false;
                        let _ = b.split_to(1);
                        if b.is_empty() {
                            continue;
                        }
                    }
                    n += b.len() as u64;
                    meter2.fetch_add(b.len() as u64, Ordering::Relaxed);
                    if wr.write_all(&b).await.is_err() {
                        return (n, true);
                    }
                }
                // An end of stream before the owner's accept byte is a refusal.
                Ok(None) if need_status => {
                    return (n, true);
                }
                Ok(None) => {
                    let _ = wr.shutdown().await;
                    return (n, false);
                }
                Err(_) => {
                    return (n, true);
                }
            }
        }
    };
    let res = join_directions(up, down).await;
    if res.aborted {
        // The local application must see an abort (connection reset), never
        // a clean end that looks like a complete transfer.
        let _ = tcp.set_zero_linger();
    }
    res
}

async fn join_directions(
    up: impl std::future::Future<Output = (u64, bool, SendHalf)>,
    down: impl std::future::Future<Output = (u64, bool)>,
) -> PumpResult {
    tokio::pin!(up);
    tokio::pin!(down);
    // Either direction failing ends the whole connection; a clean finish of
    // one direction lets the other run to its own end (half-close).
    let mut res = PumpResult::default();
    tokio::select! {
        (n, aborted, mut s) = &mut up => {
            res.bytes_up = n;
            if aborted {
                s.reset(code::CANCEL);
                res.aborted = true;
            } else {
                let (d, a) = down.await;
                res.bytes_down = d;
                res.aborted = a;
            }
        }
        (d, aborted) = &mut down => {
            res.bytes_down = d;
            if aborted {
                res.aborted = true;
            } else {
                let (n, a, _s) = up.await;
                res.bytes_up = n;
                res.aborted = a;
            }
        }
    }
    res
}
