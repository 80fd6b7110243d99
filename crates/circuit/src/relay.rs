//! One relay's state for one circuit (PROTOCOL.md §9.7): its
//! onion layer and whether it has a next hop. The owner of a service is a
//! relay hop too — the last one.
//!
//! Forward, the hop first looks at the cell's `recognized` field. This
//! hop's marker for its next AEAD counter: the cell is for this hop, and its AEAD must open it ([`Forward::ForMe`]; a
//! failed tag ends the circuit). Otherwise the cell is for a later hop: it
//! loses this hop's stream layer and goes to the next hop
//! ([`Forward::Next`]) — or, when there is no next hop, it is an attack and
//! the circuit is torn down. Backward, cells from the next hop gain this
//! hop's stream layer; cells this hop originates are sealed with its AEAD
//! only.
//!
//! This module never opens a connection and never decides policy: an EXTEND
//! is handed to the driver, which resolves the next hop from its own registry
//! (signed records only), applies its budget, and reports back with
//! [`RelayHop::extend_succeeded`] or [`RelayHop::drop_next_hop`].

use std::fmt;

use x25519_dalek::StaticSecret;

use vx6_proto::NodeId;

use crate::cell::{CellBody, Create, Created, Reason};
use crate::error::Life;
use crate::flow::SendmeAuth;
use crate::handshake::relay_handshake;
use crate::layer::{HopKeys, plaintext};
use crate::msg::{Direction, RelayMsg};
use crate::{CircuitError, Result};

/// What a relay hop knows about the hop after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// This hop is the last one (for now).
    None,
    /// An EXTEND was accepted; the driver is dialing / waiting for CREATED.
    Extending,
    /// Cells that are not for this hop go to the next hop.
    Attached,
}

/// The result of [`RelayHop::handle_forward`].
#[derive(Debug, PartialEq, Eq)]
pub enum Forward {
    /// Not for this hop: send this body (its layer removed) as a RELAY cell to the next hop.
    Next(CellBody),
    /// For this hop. An [`RelayMsg::Extend`] has already moved the hop to
    /// [`NextHop::Extending`].
    ForMe(RelayMsg),
}

/// One relay's (or the owner's) state for one circuit. Not `Clone`;
/// zeroizes its keys on drop; `Debug` shows no key material.
pub struct RelayHop {
    keys: HopKeys,
    next: NextHop,
    life: Life,
    /// SENDME tags, for when this hop is the circuit's data end (the owner).
    auth: SendmeAuth,
}

impl fmt::Debug for RelayHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayHop")
            .field("next", &self.next)
            .field("torn_down", &self.life.is_dead())
            .finish()
    }
}

impl RelayHop {
    /// Answers a CREATE that arrived on a new circuit id of one of our
    /// channels. `onion_secret` is this node's onion key (whose public half
    /// is in its signed record, with node id `my_id`); `rng` must be a CSPRNG
    /// and is asked for 32 bytes. Send the [`Created`] back as a CREATED link
    /// cell. An error (low-order key) means: DESTROY with [`Reason::Protocol`].
    pub fn handle_create(
        onion_secret: &StaticSecret,
        my_id: &NodeId,
        create: &Create,
        rng: &mut impl FnMut(&mut [u8]),
    ) -> Result<(RelayHop, Created)> {
        let (keys, created) = relay_handshake(onion_secret, my_id, create, rng)?;
        Ok((
            RelayHop {
                keys,
                next: NextHop::None,
                life: Life::default(),
                auth: SendmeAuth::default(),
            },
            created,
        ))
    }

    pub fn next_hop(&self) -> NextHop {
        self.next
    }

    pub fn is_torn_down(&self) -> bool {
        self.life.is_dead()
    }

    /// Marks the hop dead (DESTROY arrived, a link closed). Every later call
    /// fails with [`CircuitError::TornDown`].
    pub fn tear_down(&mut self) {
        self.life.end();
    }

    fn alive(&self) -> Result<()> {
        self.life.alive()
    }

    fn check<T>(&mut self, r: Result<T>) -> Result<T> {
        self.life.ends_on(&r);
        r
    }

    /// Handles a RELAY cell from the previous hop (towards the client).
    ///
    /// Fatal errors: a cell this hop cannot open while it has no attached
    /// next hop (tampered, replayed, reordered: at the last hop nothing else
    /// can explain it), a message that may not travel forward, an EXTEND while
    /// a next hop exists or is being set up, a malformed plaintext.
    pub fn handle_forward(&mut self, body: CellBody) -> Result<Forward> {
        self.alive()?;
        let r = self.forward_inner(body);
        self.check(r)
    }

    fn forward_inner(&mut self, mut body: CellBody) -> Result<Forward> {
        if !self.keys.fwd.recognized(body.as_bytes()) {
            return match self.next {
                NextHop::Attached => {
                    self.keys.fwd.apply_stream(body.as_mut_bytes())?;
                    Ok(Forward::Next(body))
                }
                NextHop::None | NextHop::Extending => Err(CircuitError::BadCell),
            };
        }
        self.keys.fwd.open(body.as_mut_bytes())?;
        let msg = RelayMsg::decode_padded(plaintext(body.as_bytes()))?;
        if !msg.allowed(Direction::Forward) {
            return Err(CircuitError::Protocol(
                "backward-only message travelling forward",
            ));
        }
        self.auth.opened(&body, &msg)?;
        if matches!(msg, RelayMsg::Extend { .. }) {
            if self.next != NextHop::None {
                return Err(CircuitError::Protocol(
                    "EXTEND on a hop that has a next hop",
                ));
            }
            self.next = NextHop::Extending;
        }
        Ok(Forward::ForMe(msg))
    }

    /// Handles a RELAY cell from the next hop: adds this hop's backward
    /// layer. Send the result to the previous hop. Fatal when no next hop is
    /// attached (nothing may arrive from it).
    pub fn handle_backward(&mut self, body: CellBody) -> Result<CellBody> {
        self.alive()?;
        let r = self.backward_inner(body);
        self.check(r)
    }

    fn backward_inner(&mut self, mut body: CellBody) -> Result<CellBody> {
        if self.next != NextHop::Attached {
            return Err(CircuitError::Protocol("backward cell without a next hop"));
        }
        self.keys.bwd.apply_stream(body.as_mut_bytes())?;
        Ok(body)
    }

    /// Seals a message from this hop to the client. Send the result to the
    /// previous hop. EXTENDED and TRUNCATED are sent through
    /// [`RelayHop::extend_succeeded`] and [`RelayHop::drop_next_hop`], which
    /// keep the next-hop state right; forward-only messages are refused.
    pub fn originate(&mut self, msg: &RelayMsg) -> Result<CellBody> {
        self.alive()?;
        if matches!(msg, RelayMsg::Extended(_) | RelayMsg::Truncated { .. }) {
            return Err(CircuitError::Usage(
                "EXTENDED/TRUNCATED are sent with extend_succeeded/drop_next_hop",
            ));
        }
        if !msg.allowed(Direction::Backward) {
            return Err(CircuitError::Usage("message may not travel backward"));
        }
        let r = self.seal_backward(msg);
        self.check(r)
    }

    #[cfg(test)]
    pub(crate) fn seal_backward_for_test(&mut self, msg: &RelayMsg) -> CellBody {
        self.seal_backward(msg).unwrap()
    }

    fn seal_backward(&mut self, msg: &RelayMsg) -> Result<CellBody> {
        self.auth.seal(&mut self.keys.bwd, msg)
    }

    /// The next hop answered our CREATE with `created` (relay it verbatim;
    /// only the client can check it). The hop becomes
    /// [`NextHop::Attached`]; send the returned EXTENDED body backward.
    pub fn extend_succeeded(&mut self, created: &Created) -> Result<CellBody> {
        self.alive()?;
        if self.next != NextHop::Extending {
            return Err(CircuitError::Usage("no extension in progress"));
        }
        let r = self.seal_backward(&RelayMsg::Extended(*created));
        let body = self.check(r)?;
        self.next = NextHop::Attached;
        Ok(body)
    }

    /// The next hop is gone or never came: the extension failed (budget,
    /// unknown node, dial failure → [`Reason::Busy`], [`Reason::Refused`],
    /// [`Reason::Unreachable`]), its link closed ([`Reason::LinkClosed`]), or
    /// the client asked with TRUNCATE ([`Reason::Done`]). The hop becomes
    /// [`NextHop::None`] (the driver sends DESTROY to the old next hop if
    /// there was one); send the returned TRUNCATED body backward.
    pub fn drop_next_hop(&mut self, reason: Reason) -> Result<CellBody> {
        self.alive()?;
        let r = self.seal_backward(&RelayMsg::Truncated { reason });
        let body = self.check(r)?;
        self.next = NextHop::None;
        Ok(body)
    }
}
