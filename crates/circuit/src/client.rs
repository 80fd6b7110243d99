//! The client's end of a circuit (PROTOCOL.md §9.6): builds it one
//! hop at a time, seals cells to any hop, and opens cells from any hop.
//!
//! The client holds every hop's keys. Forward, it seals a message with the
//! destination hop's AEAD key and then adds the stream layers of that hop
//! and of every hop before it, innermost first. Backward, it removes layers
//! from the first hop on and, after each, tries the AEAD of that hop: the
//! first hop whose AEAD opens the cell sent it.
//!
//! This module never sends anything and never decides policy (which hops,
//! when to give up); that is the driver's job. It does enforce the protocol:
//! a cell no hop can open, an EXTENDED nobody asked for, or a message that
//! may not travel backward tears the circuit down.

use std::fmt;

use vx6_proto::NodeId;
use vx6_proto::id::OnionKey;

use crate::cell::{CellBody, Create, Created};
use crate::error::Life;
use crate::flow::SendmeAuth;
use crate::handshake::ClientHandshake;
use crate::layer::{HopKeys, plaintext};
use crate::msg::{Direction, RelayMsg};
use crate::{CircuitError, Result};

/// Most hops a circuit may have (relays plus the owner).
pub const MAX_HOPS: usize = 8;

/// Position of a hop on a client's circuit: `HopIndex(0)` is the first relay
/// (the client's channel peer), `HopIndex(n - 1)` the last hop (the owner of
/// the service, for a complete circuit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopIndex(pub u8);

impl HopIndex {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A CREATE sent to the first relay, waiting for its CREATED. Typestate:
/// the only way to a [`ClientCircuit`] is [`PendingCreate::complete`].
pub struct PendingCreate {
    hs: ClientHandshake,
}

impl fmt::Debug for PendingCreate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PendingCreate(to {:?})", self.hs.relay())
    }
}

impl PendingCreate {
    /// The relay the CREATE is for.
    pub fn relay(&self) -> NodeId {
        self.hs.relay()
    }

    /// Checks the first relay's CREATED and returns a one-hop circuit.
    /// [`CircuitError::Handshake`] means the peer does not hold the onion key
    /// of the record we used (or the reply was tampered with): DESTROY.
    pub fn complete(self, created: &Created) -> Result<ClientCircuit> {
        let relay = self.hs.relay();
        let keys = self.hs.finish(created)?;
        Ok(ClientCircuit {
            hops: vec![ClientHop {
                id: relay,
                keys,
                auth: SendmeAuth::default(),
            }],
            extending: None,
            life: Life::default(),
        })
    }
}

struct ClientHop {
    id: NodeId,
    keys: HopKeys,
    /// SENDME tags, for when this hop is the circuit's data end.
    auth: SendmeAuth,
}

/// The client's state for one circuit. Not `Clone`; zeroizes its keys on
/// drop; its `Debug` shows the path (short ids) and nothing secret.
pub struct ClientCircuit {
    hops: Vec<ClientHop>,
    extending: Option<ClientHandshake>,
    life: Life,
}

impl fmt::Debug for ClientCircuit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCircuit")
            .field("path", &self.hops.iter().map(|h| h.id).collect::<Vec<_>>())
            .field("extending", &self.extending.as_ref().map(|h| h.relay()))
            .field("torn_down", &self.life.is_dead())
            .finish()
    }
}

impl ClientCircuit {
    /// Starts a circuit at `first` (the peer of the channel the CREATE will
    /// go on), using the onion key from its verified record. Send the returned
    /// [`Create`] as a CREATE link cell on a fresh circuit id, and pass the
    /// CREATED reply to [`PendingCreate::complete`]. `rng` must be a CSPRNG;
    /// it is asked for 32 bytes.
    pub fn begin_create(
        first: NodeId,
        onion_key: &OnionKey,
        rng: &mut impl FnMut(&mut [u8]),
    ) -> (PendingCreate, Create) {
        let (hs, create) = ClientHandshake::start(first, onion_key, rng);
        (PendingCreate { hs }, create)
    }

    /// Number of hops with keys (an extension in flight is not counted).
    pub fn hop_count(&self) -> usize {
        self.hops.len()
    }

    /// The last hop with keys.
    pub fn last_hop(&self) -> HopIndex {
        HopIndex(self.hops.len().saturating_sub(1) as u8)
    }

    /// The node at `hop`.
    pub fn hop_id(&self, hop: HopIndex) -> Option<NodeId> {
        self.hops.get(hop.index()).map(|h| h.id)
    }

    /// The node ids of the hops, first relay first.
    pub fn path(&self) -> Vec<NodeId> {
        self.hops.iter().map(|h| h.id).collect()
    }

    /// True while an EXTEND is waiting for its EXTENDED (or TRUNCATED).
    pub fn is_extending(&self) -> bool {
        self.extending.is_some()
    }

    /// True once a fatal error or [`ClientCircuit::tear_down`] ended the circuit.
    pub fn is_torn_down(&self) -> bool {
        self.life.is_dead()
    }

    /// Marks the circuit dead (e.g. a DESTROY arrived or the channel closed).
    /// Every later call fails with [`CircuitError::TornDown`].
    pub fn tear_down(&mut self) {
        self.life.end();
        self.extending = None;
        self.hops.clear();
    }

    fn alive(&self) -> Result<()> {
        self.life.alive()
    }

    /// Records a fatal error: the circuit is dead from now on.
    fn check<T>(&mut self, r: Result<T>) -> Result<T> {
        if self.life.ends_on(&r) {
            self.tear_down();
        }
        r
    }

    /// Asks the current last hop to extend the circuit to `next` (onion key
    /// from `next`'s verified record). Returns the RELAY cell body to send on
    /// the circuit. The answer arrives as EXTENDED (the circuit grows by one
    /// hop inside [`ClientCircuit::open`]) or TRUNCATED (the extension
    /// failed). One extension at a time; a node may not appear twice.
    pub fn extend_to(
        &mut self,
        next: NodeId,
        onion_key: &OnionKey,
        rng: &mut impl FnMut(&mut [u8]),
    ) -> Result<CellBody> {
        self.alive()?;
        if self.extending.is_some() {
            return Err(CircuitError::Usage("an extension is already in flight"));
        }
        if self.hops.len() >= MAX_HOPS {
            return Err(CircuitError::Usage(
                "circuit already has the maximum number of hops",
            ));
        }
        if self.hops.iter().any(|h| h.id == next) {
            return Err(CircuitError::Usage("node already on the circuit"));
        }
        let (hs, create) = ClientHandshake::start(next, onion_key, rng);
        let msg = RelayMsg::Extend { next, create };
        let to = self.last_hop();
        let r = self.seal_unchecked(to, &msg);
        let body = self.check(r)?;
        self.extending = Some(hs);
        Ok(body)
    }

    /// Seals `msg` for hop `to`. Returns the RELAY cell body to send on the
    /// circuit (its size is the smallest that fits: [`RelayMsg::cell_size`]).
    ///
    /// Usage errors (hop out of range, EXTEND — use
    /// [`ClientCircuit::extend_to`] — or a backward-only message, a message
    /// that does not fit) change nothing.
    pub fn seal(&mut self, to: HopIndex, msg: &RelayMsg) -> Result<CellBody> {
        self.alive()?;
        if matches!(msg, RelayMsg::Extend { .. }) {
            return Err(CircuitError::Usage("EXTEND is sent with extend_to"));
        }
        if !msg.allowed(Direction::Forward) {
            return Err(CircuitError::Usage("message may not travel forward"));
        }
        let r = self.seal_unchecked(to, msg);
        self.check(r)
    }

    fn seal_unchecked(&mut self, to: HopIndex, msg: &RelayMsg) -> Result<CellBody> {
        if to.index() >= self.hops.len() {
            return Err(CircuitError::Usage("no such hop"));
        }
        // Checked before anything moves.
        msg.cell_size()?;
        let hops = self
            .hops
            .get_mut(..=to.index())
            .ok_or(CircuitError::Usage("no such hop"))?;
        let (dest, before) = hops
            .split_last_mut()
            .ok_or(CircuitError::Usage("no such hop"))?;
        // The destination's own stream layer is left off: the AEAD already
        // encrypts the cell for it, and it checks `recognized` first.
        // From here on counters move: any error is fatal (and cannot happen
        // short of 2^64 cells, or a SENDME the driver owes no tag for).
        let mut body = dest.auth.seal(&mut dest.keys.fwd, msg)?;
        for hop in before.iter_mut().rev() {
            hop.keys.fwd.apply_stream(body.as_mut_bytes())?;
        }
        Ok(body)
    }

    /// Opens a RELAY cell body that arrived on the circuit: finds the hop
    /// that sent it and decodes its message.
    ///
    /// EXTENDED and TRUNCATED are acted on here before they are returned:
    /// EXTENDED from the last hop completes the pending extension (the
    /// circuit now has one more hop; a bad auth is fatal), TRUNCATED from hop
    /// `i` removes every hop after `i` and cancels a pending extension. Every
    /// other message is for the driver.
    ///
    /// Fatal errors (the circuit is torn down): no hop can open the cell
    /// (tampered, replayed, reordered or forged), a message that may not travel
    /// backward, an unexpected EXTENDED.
    pub fn open(&mut self, body: CellBody) -> Result<(HopIndex, RelayMsg)> {
        self.alive()?;
        let r = self.open_inner(body);
        self.check(r)
    }

    fn open_inner(&mut self, mut body: CellBody) -> Result<(HopIndex, RelayMsg)> {
        let mut origin = None;
        for (i, hop) in self.hops.iter_mut().enumerate() {
            if hop.keys.bwd.recognized(body.as_bytes()) {
                hop.keys.bwd.open(body.as_mut_bytes())?;
                origin = Some(i);
                break;
            }
            hop.keys.bwd.apply_stream(body.as_mut_bytes())?;
        }
        let i = origin.ok_or(CircuitError::BadCell)?;
        let hop = HopIndex(i as u8);
        let msg = RelayMsg::decode_padded(plaintext(body.as_bytes()))?;
        if !msg.allowed(Direction::Backward) {
            return Err(CircuitError::Protocol(
                "forward-only message travelling backward",
            ));
        }
        if let Some(h) = self.hops.get_mut(i) {
            h.auth.opened(&body, &msg)?;
        }
        match &msg {
            RelayMsg::Extended(created) => {
                if hop != self.last_hop() {
                    return Err(CircuitError::Protocol(
                        "EXTENDED from a hop that is not last",
                    ));
                }
                let hs = self
                    .extending
                    .take()
                    .ok_or(CircuitError::Protocol("EXTENDED without EXTEND"))?;
                let id = hs.relay();
                let keys = hs.finish(created)?;
                self.hops.push(ClientHop {
                    id,
                    keys,
                    auth: SendmeAuth::default(),
                });
            }
            RelayMsg::Truncated { .. } => {
                self.hops.truncate(i + 1);
                self.extending = None;
            }
            _ => {}
        }
        Ok((hop, msg))
    }
}

#[cfg(test)]
mod tests {
    //! Misbehaving peers, crafted with crate internals (the public API
    //! refuses to produce these cells).
    use super::*;
    use crate::relay::{Forward, NextHop, RelayHop};
    use vx6_proto::link::StreamId;
    use vx6_proto::name::ServiceName;

    fn rng() -> impl FnMut(&mut [u8]) {
        let mut n = 0u8;
        move |b: &mut [u8]| {
            for x in b {
                n = n.wrapping_add(37);
                *x = n;
            }
        }
    }

    fn one_hop() -> (ClientCircuit, RelayHop) {
        let mut r = rng();
        let (secret, key) = crate::onion_keypair_from_seed([5; 32]);
        let id = NodeId::from_bytes([5; 32]);
        let (p, create) = ClientCircuit::begin_create(id, &key, &mut r);
        let (hop, created) = RelayHop::handle_create(&secret, &id, &create, &mut r).unwrap();
        (p.complete(&created).unwrap(), hop)
    }

    #[test]
    fn second_extend_at_a_hop_is_fatal() {
        let (mut c, mut hop) = one_hop();
        let (_, key) = crate::onion_keypair_from_seed([6; 32]);
        let next = NodeId::from_bytes([6; 32]);
        let body = c.extend_to(next, &key, &mut rng()).unwrap();
        assert!(matches!(
            hop.handle_forward(body).unwrap(),
            Forward::ForMe(RelayMsg::Extend { .. })
        ));
        assert_eq!(hop.next_hop(), NextHop::Extending);
        let (_, create) = ClientHandshake::start(next, &key, &mut rng());
        let again = c
            .seal_unchecked(HopIndex(0), &RelayMsg::Extend { next, create })
            .unwrap();
        let e = hop.handle_forward(again).unwrap_err();
        assert!(matches!(e, CircuitError::Protocol(_)) && e.is_fatal());
        assert!(hop.is_torn_down());
    }

    #[test]
    fn forward_only_message_backward_is_fatal() {
        let (mut c, mut hop) = one_hop();
        let begin = RelayMsg::Begin {
            stream: StreamId(1),
            service: ServiceName::new("web").unwrap(),
        };
        assert!(matches!(hop.originate(&begin), Err(CircuitError::Usage(_))));
        let body = hop.seal_backward_for_test(&begin);
        let e = c.open(body).unwrap_err();
        assert!(matches!(e, CircuitError::Protocol(_)));
        assert!(c.is_torn_down());
    }

    #[test]
    fn backward_only_message_forward_is_fatal() {
        let (mut c, mut hop) = one_hop();
        let body = c
            .seal_unchecked(
                HopIndex(0),
                &RelayMsg::Connected {
                    stream: StreamId(1),
                },
            )
            .unwrap();
        assert!(matches!(
            hop.handle_forward(body),
            Err(CircuitError::Protocol(_))
        ));
    }

    #[test]
    fn unexpected_extended_is_fatal() {
        let (mut c, mut hop) = one_hop();
        let body = hop.seal_backward_for_test(&RelayMsg::Extended(Created {
            relay_pk: [9; 32],
            auth: [0; 32],
        }));
        assert_eq!(
            c.open(body).unwrap_err(),
            CircuitError::Protocol("EXTENDED without EXTEND")
        );
    }

    fn data(n: u8) -> RelayMsg {
        RelayMsg::Data {
            stream: StreamId(1),
            data: vec![n; 100],
        }
    }

    /// A circuit SENDME sealed with `tag` in place of the one owed, as a
    /// client lying about what it received would send.
    fn forged_sendme(c: &mut ClientCircuit, tag: [u8; 16]) -> CellBody {
        let msg = RelayMsg::Sendme(crate::msg::FlowScope::Circuit);
        let mut body = CellBody::zeroed(msg.cell_size().unwrap());
        msg.encode_into(crate::layer::plaintext_mut(body.as_mut_bytes()))
            .unwrap();
        RelayMsg::put_sendme_tag(crate::layer::plaintext_mut(body.as_mut_bytes()), &tag).unwrap();
        c.hops[0].keys.fwd.seal(body.as_mut_bytes()).unwrap();
        body
    }

    #[test]
    fn circuit_sendme_echoes_the_tag_of_the_cell_it_acknowledges() {
        use crate::flow::CIRCUIT_SENDME_INCREMENT;
        let (mut c, mut hop) = one_hop();
        let sendme = RelayMsg::Sendme(crate::msg::FlowScope::Circuit);
        // Nothing received yet: there is no tag to send, and nothing moves.
        assert!(matches!(
            c.seal(HopIndex(0), &sendme),
            Err(CircuitError::Usage(_))
        ));
        assert!(!c.is_torn_down());
        for round in 0..2u8 {
            for i in 0..CIRCUIT_SENDME_INCREMENT as u8 {
                let body = hop.originate(&data(i)).unwrap();
                assert_eq!(c.open(body).unwrap().1, data(i));
            }
            let body = c.seal(HopIndex(0), &sendme).unwrap();
            assert_eq!(
                hop.handle_forward(body).unwrap(),
                Forward::ForMe(sendme.clone()),
                "round {round}"
            );
        }
    }

    #[test]
    fn a_sendme_for_cells_not_received_is_fatal() {
        use crate::flow::CIRCUIT_SENDME_INCREMENT;
        // The owner sent a whole increment; the client read none of it and
        // guesses the tag.
        let (mut c, mut hop) = one_hop();
        for i in 0..CIRCUIT_SENDME_INCREMENT as u8 {
            hop.originate(&data(i)).unwrap();
        }
        let body = forged_sendme(&mut c, [0; 16]);
        assert_eq!(
            hop.handle_forward(body).unwrap_err(),
            CircuitError::Protocol("SENDME with a wrong tag")
        );
        assert!(hop.is_torn_down());
        // Before a whole increment was sent, any circuit SENDME is a lie.
        let (mut c, mut hop) = one_hop();
        hop.originate(&data(0)).unwrap();
        let body = forged_sendme(&mut c, [0; 16]);
        assert_eq!(
            hop.handle_forward(body).unwrap_err(),
            CircuitError::WindowViolation
        );
    }

    #[test]
    fn tags_kept_are_bounded_by_the_window() {
        use crate::flow::{CIRCUIT_SENDME_INCREMENT, CIRCUIT_WINDOW};
        // Without SENDMEs an end never has more than a window of DATA out
        // (its driver's window says so); the tags it keeps stop at a
        // window's worth whatever the driver does.
        let (mut c, mut hop) = one_hop();
        let limit = CIRCUIT_WINDOW + CIRCUIT_SENDME_INCREMENT - 1;
        for i in 0..limit {
            c.open(hop.originate(&data(i as u8)).unwrap()).unwrap();
        }
        assert_eq!(
            hop.originate(&data(0)).unwrap_err(),
            CircuitError::Usage("DATA beyond the circuit window")
        );
    }
}
