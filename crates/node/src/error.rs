//! The node crate's error type. Messages are one sentence a user can act on;
//! the CLI prints them as they are.

use vx6_proto::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    State(#[from] crate::home::StateError),
    #[error("{0}")]
    Net(#[from] vx6_net::NetError),
    #[error("{0}")]
    Proto(#[from] vx6_proto::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the node at {addr} is {got}, but {expected} was expected (pinned or given with --node); if its key changed on purpose, run 'vx6 peer forget {addr}'"
    )]
    PinMismatch {
        addr: String,
        expected: NodeId,
        got: NodeId,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unreachable(String),
}

impl NodeError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;
