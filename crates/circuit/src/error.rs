//! The circuit crate's one error type, grouped by what the caller does next.

/// Errors from the circuit state machines and codecs.
///
/// Two groups, told apart by [`CircuitError::is_fatal`]:
///
/// - **fatal** (the peer or the path misbehaved, or the state machine was
///   already dead): the circuit is torn down. The state machine that returned
///   the error refuses every later call with [`CircuitError::TornDown`]; the
///   driver sends DESTROY on every link of the circuit and forgets it.
/// - **not fatal** (a local misuse such as a message that does not fit, or a
///   hop index that does not exist): nothing was consumed, no counter moved,
///   the circuit is still usable.
///
/// Error values never carry peer-controlled text, so they are safe to log;
/// they must still never be echoed to a peer (send a [`crate::Reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CircuitError {
    /// A link cell or a decrypted relay message is malformed.
    #[error("malformed circuit data: {0}")]
    Decode(#[from] vx6_proto::Error),
    /// The handshake failed: wrong onion key or node id, forged or tampered
    /// CREATED, or a low-order (all-zero shared secret) public key.
    #[error("circuit handshake failed")]
    Handshake,
    /// A cell could not be authenticated by the hop it had to be for:
    /// tampered, replayed, reordered or forged.
    #[error("cell failed authentication (tampered, replayed or reordered)")]
    BadCell,
    /// The peer sent something that is well-formed but not allowed now
    /// (e.g. EXTEND on a hop that already has a next hop, a backward-only
    /// message in the forward direction).
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// The peer sent more DATA cells than the flow-control window allows, or
    /// a SENDME that credits more than was sent.
    #[error("flow-control window violated")]
    WindowViolation,
    /// A per-direction cell counter reached its end (2^64 cells; never in practice).
    #[error("cell counter exhausted")]
    CounterExhausted,
    /// The circuit was torn down by an earlier fatal error.
    #[error("circuit already torn down")]
    TornDown,
    /// Local misuse; the circuit is unchanged.
    #[error("invalid use of the circuit: {0}")]
    Usage(&'static str),
    /// Local misuse: the message does not fit in the largest cell.
    #[error("relay message of {len} bytes is over the maximum of {max}")]
    TooLarge { len: usize, max: usize },
}

impl CircuitError {
    /// True when the circuit must be torn down (DESTROY on every link).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, CircuitError::Usage(_) | CircuitError::TooLarge { .. })
    }
}

pub type Result<T, E = CircuitError> = std::result::Result<T, E>;

/// Whether a circuit end (client or hop) is still usable. Every call checks
/// it first, and a fatal error ends it for good (see [`CircuitError`]).
#[derive(Debug, Default)]
pub(crate) struct Life {
    dead: bool,
}

impl Life {
    pub(crate) fn is_dead(&self) -> bool {
        self.dead
    }

    pub(crate) fn end(&mut self) {
        self.dead = true;
    }

    /// `Err(TornDown)` once ended.
    pub(crate) fn alive(&self) -> Result<()> {
        if self.dead {
            Err(CircuitError::TornDown)
        } else {
            Ok(())
        }
    }

    /// Ends on a fatal error; true when `r` just ended it.
    pub(crate) fn ends_on<T>(&mut self, r: &Result<T>) -> bool {
        let fatal = r.as_ref().err().is_some_and(CircuitError::is_fatal);
        self.dead |= fatal;
        fatal
    }
}
