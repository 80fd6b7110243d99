//! The local control API: newline-delimited JSON over a Unix socket in the
//! node's home (mode 0600; file permissions are the access control).
//!
//! Owns the request/response types, the client used by the CLI, and the
//! server loop. Each line is one [`Request`]; each answer one [`Response`]
//! line. A foreground `connect` keeps its forward only while its control
//! connection stays open, so a CLI that dies (even by `kill -9`) never leaves
//! a stray listener behind.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::error::{NodeError, Result};

/// Longest request line accepted (a request is small; this bounds a buggy client).
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Identity,
    Reload,
    PeerAdd { addr: String },
    PeerList,
    Resolve { name: String },
    Connect(ConnectSpec),
    ForwardClose { id: u64 },
    Shutdown,
}

/// Everything `vx6 connect` can ask for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectSpec {
    /// `user.service` or a hidden alias (named modes).
    pub name: Option<String>,
    /// Direct mode: the owner's socket address.
    pub addr: Option<String>,
    /// Direct mode: the service name on that node.
    pub service: Option<String>,
    /// Local address to listen on.
    pub listen: String,
    /// Expected node id (direct mode); without it the first key seen is pinned.
    pub node: Option<String>,
    /// "tcp" or "quic"; default tcp.
    pub transport: Option<String>,
    /// "direct" (default) or "relay".
    pub via: Option<String>,
    pub hops: Option<u8>,
    /// Keep the forward in the daemon after this control connection closes.
    pub detach: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            data: serde_json::Value::Null,
        }
    }
}

/// What the server needs from the node.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. `conn_id` identifies the control connection, so
    /// forwards can be tied to it.
    fn handle(
        self: Arc<Self>,
        conn_id: u64,
        req: Request,
    ) -> impl std::future::Future<Output = Response> + Send;
    /// The control connection `conn_id` closed.
    fn disconnected(&self, conn_id: u64);
}

/// Binds the control socket (replacing a stale one: the caller holds the
/// daemon lock, so no live daemon owns it) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(NodeError::io(
                format!("cannot remove stale control socket {}", path.display()),
                e,
            ));
        }
    }
    let l = UnixListener::bind(path)
        .map_err(|e| NodeError::io(format!("cannot bind control socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::io(format!("cannot set mode on {}", path.display()), e))?;
    Ok(l)
}

/// Serves control connections until the listener fails.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    let mut next_id = 1u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let id = next_id;
        next_id += 1;
        let h = handler.clone();
        tokio::spawn(async move {
            serve_conn(stream, id, h.clone()).await;
            h.disconnected(id);
        });
    }
}

async fn serve_conn<H: Handler>(stream: UnixStream, id: u64, handler: Arc<H>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut rd).take(MAX_LINE as u64 + 1);
        use tokio::io::AsyncReadExt;
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = if line.len() > MAX_LINE {
            Response::err("control request too long")
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handler.clone().handle(id, req).await,
                Err(e) => Response::err(format!("bad control request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// The CLI side of the control API.
pub struct Client {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to the daemon of the home whose socket is `path`.
    pub async fn connect(path: &Path, home_display: &str) -> Result<Self> {
        let s = UnixStream::connect(path).await.map_err(|_| {
            NodeError::NotFound(format!(
                "no node running in {home_display}: start it with 'vx6 node'"
            ))
        })?;
        let (rd, wr) = s.into_split();
        Ok(Self {
            rd: BufReader::new(rd),
            wr,
        })
    }

    pub async fn call(&mut self, req: &Request) -> Result<Response> {
        let mut out = serde_json::to_vec(req).map_err(|e| NodeError::Invalid(e.to_string()))?;
        out.push(b'\n');
        self.wr
            .write_all(&out)
            .await
            .map_err(|e| NodeError::io("control socket write", e))?;
        let mut line = String::new();
        let n = self
            .rd
            .read_line(&mut line)
            .await
            .map_err(|e| NodeError::io("control socket read", e))?;
        if n == 0 {
            return Err(NodeError::Unreachable(
                "the node closed the control connection".into(),
            ));
        }
        serde_json::from_str(&line)
            .map_err(|e| NodeError::Invalid(format!("bad control response: {e}")))
    }

    /// Waits until the daemon closes this control connection.
    pub async fn wait_closed(&mut self) {
        let mut buf = String::new();
        loop {
            buf.clear();
            match self.rd.read_line(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}
