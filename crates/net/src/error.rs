//! The net crate's error type, sorted by what the caller should do next.

use vx6_proto::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    // --- the peer is not who we expected, or misbehaved: do not retry it blindly
    #[error("peer presented node id {got}, expected {expected}")]
    WrongNode { expected: NodeId, got: NodeId },
    #[error("peer violated the protocol: {0}")]
    Protocol(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),

    // --- transient: retry later or elsewhere
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("connection closed")]
    Closed,
    #[error("stream reset by peer (code {0})")]
    Reset(u32),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),

    // --- local configuration
    #[error("configuration error: {0}")]
    Config(String),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;
