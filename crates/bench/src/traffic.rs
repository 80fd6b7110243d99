//! The traffic every case carries: one target server, the measuring client,
//! and the plain userspace forward used as a baseline.
//!
//! The target speaks a one-byte mode prefix so that one service serves every
//! measurement:
//!
//! - `E`: echo — the mode byte itself is echoed, then everything after it;
//! - `U`: upload sink — reads to EOF, then answers the byte count (u64 BE);
//! - `D` + u64 BE length: download — sends that many bytes, then EOF.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Read and write size of the bench client and target.
pub const CHUNK: usize = 256 * 1024;
/// Buffer size of the plain userspace forward (the same read size VX6's
/// forwarder uses, so the baseline is not handicapped by tokio's 8 KiB default).
pub const PROXY_BUF: usize = 64 * 1024;
/// Longest a single measurement may take before the run is declared stuck.
const STUCK: Duration = Duration::from_secs(600);

/// A buffer of pseudo-random bytes (no compressible runs), written repeatedly.
fn payload() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

async fn accept_loop<F, Fut>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve(s));
            }
            // Out of descriptors or similar: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Starts the target server on an ephemeral loopback port.
pub async fn spawn_target() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the target server")?;
    let addr = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, serve_target));
    Ok(addr)
}

async fn serve_target(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    match mode[0] {
        b'E' => {
            s.write_all(&mode).await?;
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await?;
        }
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut n = 0u64;
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            s.write_all(&n.to_be_bytes()).await?;
            s.shutdown().await?;
        }
        b'D' => {
            let mut len = [0u8; 8];
            s.read_exact(&mut len).await?;
            write_n(&mut s, u64::from_be_bytes(len)).await?;
            s.shutdown().await?;
        }
        _ => {}
    }
    Ok(())
}

async fn write_n(s: &mut TcpStream, mut left: u64) -> std::io::Result<()> {
    let buf = payload();
    while left > 0 {
        let k = (left as usize).min(buf.len());
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// Starts a plain userspace forward (`copy_bidirectional`) to `target`.
pub async fn spawn_proxy(target: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the plain forward")?;
    let addr = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, move |mut a: TcpStream| async move {
        let mut b = TcpStream::connect(target).await?;
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, PROXY_BUF, PROXY_BUF).await?;
        Ok(())
    }));
    Ok(addr)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(STUCK, f).await {
        Ok(r) => r,
        Err(_) => bail!("{what} made no progress for {} s", STUCK.as_secs()),
    }
}

/// Sends `bytes` to the sink through `addr`; the time runs from connect until
/// the sink has confirmed receiving every byte.
pub async fn upload(addr: SocketAddr, bytes: u64) -> Result<Duration> {
    bounded("upload", async {
        let t0 = Instant::now();
        let mut s = connect(addr).await?;
        s.write_all(b"U").await?;
        write_n(&mut s, bytes).await.context("upload write")?;
        s.shutdown().await?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .await
            .context("upload: no byte count from the sink")?;
        let took = t0.elapsed();
        let got = u64::from_be_bytes(count);
        if got != bytes {
            bail!("upload through {addr}: sink received {got} of {bytes} bytes");
        }
        Ok(took)
    })
    .await
}

/// Fetches `bytes` from the target through `addr`; connect until EOF.
pub async fn download(addr: SocketAddr, bytes: u64) -> Result<Duration> {
    bounded("download", async {
        let t0 = Instant::now();
        let mut s = connect(addr).await?;
        let mut req = [0u8; 9];
        req[0] = b'D';
        req[1..].copy_from_slice(&bytes.to_be_bytes());
        s.write_all(&req).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let k = s.read(&mut buf).await.context("download read")?;
            if k == 0 {
                break;
            }
            got += k as u64;
        }
        let took = t0.elapsed();
        if got != bytes {
            bail!("download through {addr}: received {got} of {bytes} bytes");
        }
        Ok(took)
    })
    .await
}

/// Connect → first byte: a fresh TCP connection to `addr`, one byte sent,
/// timed until its echo is back.
pub async fn first_byte(addr: SocketAddr) -> Result<Duration> {
    bounded("connect→first byte", async {
        let t0 = Instant::now();
        let mut s = connect(addr).await?;
        s.write_all(b"E").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .await
            .with_context(|| format!("no echo through {addr}"))?;
        let took = t0.elapsed();
        if b[0] != b'E' {
            bail!("wrong echo byte through {addr}");
        }
        Ok(took)
    })
    .await
}

/// Waits until something accepts TCP connections at `addr`.
pub async fn wait_listening(addr: SocketAddr, within: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if t0.elapsed() > within {
            bail!("nothing listens on {addr} after {} s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
