//! The DHT crate's one error type, grouped by what the caller does next.
//!
//! STORE rejections are not errors of this crate: they are an expected answer
//! and travel as [`vx6_proto::dhtmsg::RejectReason`].

/// Errors from the DHT core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The peer sent something invalid (bad encoding, bad signature, a record
    /// that is not about the node that proved its key). Drop it; count it.
    #[error("peer sent invalid data: {0}")]
    Peer(#[from] vx6_proto::Error),
    /// The record does not describe the node the transport authenticated.
    #[error("record is about a different node than the authenticated peer")]
    IdMismatch,
    /// Local misconfiguration: fix the config.
    #[error("invalid DHT configuration: {0}")]
    Config(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
