//! The protocol crate's one error type, grouped by what the caller does next.

/// Errors from decoding, validating and verifying protocol data.
///
/// Every variant means "the bytes (or the peer that sent them) are wrong";
/// none of them is a local bug or a retryable condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("input truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("{0} trailing bytes after a complete message")]
    TrailingBytes(usize),
    #[error("{what} is {len} bytes, over its limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid {what}: {why}")]
    Invalid {
        what: &'static str,
        why: &'static str,
    },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u64 },
    #[error("bad signature")]
    BadSignature,
    #[error("signing key does not match the node id")]
    KeyMismatch,
    #[error("record expired")]
    Expired,
    #[error("record issued too far in the future")]
    FromTheFuture,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
