//! Link cells: what travels in a channel frame whose circuit id is not 0
//! (PROTOCOL.md §9.2), and the fixed-size encrypted cell body.
//!
//! This module owns byte layouts only. It never decrypts anything and never
//! decides what a cell means for a circuit; that is [`crate::client`] and
//! [`crate::relay`]. Every decoder checks exact lengths and rejects trailing
//! bytes.

use std::fmt;

use vx6_proto::bytes::{Reader, Writer};
use vx6_proto::link::{self, Cmd};

use crate::{CircuitError, Result};

/// Bytes in an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes in the CREATED authenticator.
pub const AUTH_LEN: usize = 32;
/// Bytes of a CREATE payload: `u16 htype | [32] X`.
pub const CREATE_LEN: usize = link::CREATE_LEN;
/// Bytes of a CREATED payload: `[32] Y | [32] auth`.
pub const CREATED_LEN: usize = link::CREATED_LEN;
/// Bytes of a DESTROY payload: `u8 reason`.
pub const DESTROY_LEN: usize = link::DESTROY_LEN;

/// The two cell body sizes every onion circuit uses.
///
/// Small cells carry everything except bulk data; large cells carry DATA that
/// does not fit in a small one. A relay sees the size class of each cell and
/// nothing else (see the crate docs for why two sizes and not one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CellSize {
    /// [`CellSize::SMALL_LEN`] bytes.
    Small,
    /// [`CellSize::LARGE_LEN`] bytes.
    Large,
}

impl CellSize {
    /// Body bytes of a small cell.
    pub const SMALL_LEN: usize = link::CELL_SMALL_LEN;
    /// Body bytes of a large cell.
    pub const LARGE_LEN: usize = link::CELL_LARGE_LEN;

    /// Body length in bytes.
    pub const fn body_len(self) -> usize {
        match self {
            CellSize::Small => Self::SMALL_LEN,
            CellSize::Large => Self::LARGE_LEN,
        }
    }

    /// The size class of a body of `len` bytes, if it is one.
    pub const fn from_len(len: usize) -> Option<Self> {
        match len {
            Self::SMALL_LEN => Some(CellSize::Small),
            Self::LARGE_LEN => Some(CellSize::Large),
            _ => None,
        }
    }
}

/// One encrypted cell body: exactly [`CellSize::SMALL_LEN`] or
/// [`CellSize::LARGE_LEN`] opaque bytes. This is the whole payload of a RELAY
/// link cell. The constructor checks the length, so every `CellBody` in the
/// program has a valid size.
#[derive(Clone, PartialEq, Eq)]
pub struct CellBody(Vec<u8>);

impl CellBody {
    /// Wraps received bytes; any length other than the two cell sizes is an error.
    pub fn from_vec(v: Vec<u8>) -> Result<Self> {
        if CellSize::from_len(v.len()).is_none() {
            return Err(vx6_proto::Error::Invalid {
                what: "relay cell",
                why: "body is not 512 or 16384 bytes",
            }
            .into());
        }
        Ok(Self(v))
    }

    /// Copies received bytes (see [`CellBody::from_vec`]).
    pub fn from_slice(b: &[u8]) -> Result<Self> {
        Self::from_vec(b.to_vec())
    }

    /// An all-zero body of the given size (to be filled by the crypto layer).
    pub(crate) fn zeroed(size: CellSize) -> Self {
        Self(vec![0u8; size.body_len()])
    }

    pub fn size(&self) -> CellSize {
        // The constructors guarantee one of the two lengths.
        if self.0.len() == CellSize::LARGE_LEN {
            CellSize::Large
        } else {
            CellSize::Small
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Mutable access for the crypto layer (length-preserving only).
    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for CellBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CellBody({:?}, ..)", self.size())
    }
}

/// Handshake types a CREATE may name. Only one exists in v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeType {
    /// The ntor-style handshake of §9.3 (`vx6/v1/circuit-ntor`).
    NtorV1,
}

impl HandshakeType {
    pub const fn code(self) -> u16 {
        match self {
            HandshakeType::NtorV1 => 1,
        }
    }
    pub fn from_code(c: u16) -> Result<Self> {
        match c {
            1 => Ok(HandshakeType::NtorV1),
            t => Err(vx6_proto::Error::UnknownTag {
                what: "handshake type",
                tag: t.into(),
            }
            .into()),
        }
    }
}

/// CREATE: the client's half of the handshake with the channel peer (or,
/// inside EXTEND, with the next hop). Payload `u16 htype | [32] X`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Create {
    pub htype: HandshakeType,
    /// The client's ephemeral X25519 public key.
    pub client_pk: [u8; PUBLIC_KEY_LEN],
}

impl fmt::Debug for Create {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Create({:?}, ..)", self.htype)
    }
}

impl Create {
    pub fn encode(&self) -> [u8; CREATE_LEN] {
        let mut out = [0u8; CREATE_LEN];
        let mut w = Writer::with_capacity(CREATE_LEN);
        self.write(&mut w);
        out.copy_from_slice(w.as_slice());
        out
    }
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u16(self.htype.code()).raw(&self.client_pk);
    }
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self> {
        let htype = HandshakeType::from_code(r.u16()?)?;
        let client_pk = r.array()?;
        Ok(Self { htype, client_pk })
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b);
        let c = Self::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }
}

/// CREATED: the relay's half of the handshake. Payload `[32] Y | [32] auth`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Created {
    /// The relay's ephemeral X25519 public key.
    pub relay_pk: [u8; PUBLIC_KEY_LEN],
    /// Proof that the relay holds the onion secret (§9.3).
    pub auth: [u8; AUTH_LEN],
}

impl fmt::Debug for Created {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Created(..)")
    }
}

impl Created {
    pub fn encode(&self) -> [u8; CREATED_LEN] {
        let mut out = [0u8; CREATED_LEN];
        let mut w = Writer::with_capacity(CREATED_LEN);
        self.write(&mut w);
        out.copy_from_slice(w.as_slice());
        out
    }
    pub(crate) fn write(&self, w: &mut Writer) {
        w.raw(&self.relay_pk).raw(&self.auth);
    }
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Self {
            relay_pk: r.array()?,
            auth: r.array()?,
        })
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b);
        let c = Self::read(&mut r)?;
        r.finish()?;
        Ok(c)
    }
}

/// Why a circuit, a hop or a stream ended. One byte on the wire (DESTROY,
/// END, TRUNCATED). Deliberately coarse: a reason never carries local error
/// text, so a prober learns nothing about what is behind a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Ordinary close; nothing went wrong.
    Done,
    /// The peer broke the protocol (includes failed cell authentication).
    Protocol,
    /// Refused by policy: an undeclared service, a target that is not a VX6
    /// node, relaying turned off. Says nothing more on purpose.
    Refused,
    /// Over a budget (circuits, bandwidth, streams); try later or elsewhere.
    Busy,
    /// The next hop could not be reached (no usable record, dial failed).
    Unreachable,
    /// The service behind the last hop failed or closed abruptly.
    TargetFailed,
    /// A link of the circuit went away (channel closed, hop died).
    LinkClosed,
    /// The node is shutting down.
    Shutdown,
}

impl Reason {
    pub const fn code(self) -> u8 {
        match self {
            Reason::Done => 0,
            Reason::Protocol => 1,
            Reason::Refused => 2,
            Reason::Busy => 3,
            Reason::Unreachable => 4,
            Reason::TargetFailed => 5,
            Reason::LinkClosed => 6,
            Reason::Shutdown => 7,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            0 => Reason::Done,
            1 => Reason::Protocol,
            2 => Reason::Refused,
            3 => Reason::Busy,
            4 => Reason::Unreachable,
            5 => Reason::TargetFailed,
            6 => Reason::LinkClosed,
            7 => Reason::Shutdown,
            t => {
                return Err(vx6_proto::Error::UnknownTag {
                    what: "reason",
                    tag: t.into(),
                }
                .into());
            }
        })
    }
}

/// The four link-cell commands (link [`Cmd`] codes 9..=12, §9.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkCellKind {
    Create,
    Created,
    Relay,
    Destroy,
}

impl LinkCellKind {
    /// The channel frame command that carries this cell.
    pub const fn cmd(self) -> Cmd {
        match self {
            LinkCellKind::Create => Cmd::Create,
            LinkCellKind::Created => Cmd::Created,
            LinkCellKind::Relay => Cmd::Relay,
            LinkCellKind::Destroy => Cmd::Destroy,
        }
    }

    /// The kind of a circuit frame command; `None` for stream/channel commands.
    pub const fn from_cmd(cmd: Cmd) -> Option<Self> {
        match cmd {
            Cmd::Create => Some(LinkCellKind::Create),
            Cmd::Created => Some(LinkCellKind::Created),
            Cmd::Relay => Some(LinkCellKind::Relay),
            Cmd::Destroy => Some(LinkCellKind::Destroy),
            _ => None,
        }
    }

    /// The channel-frame command code (same as `self.cmd().code()`).
    pub const fn code(self) -> u8 {
        match self {
            LinkCellKind::Create => 9,
            LinkCellKind::Created => 10,
            LinkCellKind::Relay => 11,
            LinkCellKind::Destroy => 12,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            9 => LinkCellKind::Create,
            10 => LinkCellKind::Created,
            11 => LinkCellKind::Relay,
            12 => LinkCellKind::Destroy,
            t => {
                return Err(vx6_proto::Error::UnknownTag {
                    what: "link cell command",
                    tag: t.into(),
                }
                .into());
            }
        })
    }
    /// True when `len` is a payload length this command allows; a channel
    /// reader checks this on the frame header before reading the payload.
    pub const fn payload_len_ok(self, len: usize) -> bool {
        match self {
            LinkCellKind::Create => len == CREATE_LEN,
            LinkCellKind::Created => len == CREATED_LEN,
            LinkCellKind::Relay => CellSize::from_len(len).is_some(),
            LinkCellKind::Destroy => len == DESTROY_LEN,
        }
    }
}

/// A decoded link cell: the payload of one channel frame on a circuit id ≠ 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkCell {
    Create(Create),
    Created(Created),
    Relay(CellBody),
    Destroy(Reason),
}

impl LinkCell {
    pub fn kind(&self) -> LinkCellKind {
        match self {
            LinkCell::Create(_) => LinkCellKind::Create,
            LinkCell::Created(_) => LinkCellKind::Created,
            LinkCell::Relay(_) => LinkCellKind::Relay,
            LinkCell::Destroy(_) => LinkCellKind::Destroy,
        }
    }

    /// The frame payload. The frame command is [`LinkCell::kind`]`().code()`.
    pub fn encode_payload(&self) -> Vec<u8> {
        match self {
            LinkCell::Create(c) => c.encode().to_vec(),
            LinkCell::Created(c) => c.encode().to_vec(),
            LinkCell::Relay(b) => b.as_bytes().to_vec(),
            LinkCell::Destroy(r) => vec![r.code()],
        }
    }

    /// Like [`LinkCell::encode_payload`] but consumes the cell, so a RELAY
    /// body is moved, not copied.
    pub fn into_payload(self) -> Vec<u8> {
        match self {
            LinkCell::Relay(b) => b.into_vec(),
            other => other.encode_payload(),
        }
    }

    /// Decodes the payload of a frame whose command is `kind`.
    pub fn decode(kind: LinkCellKind, payload: &[u8]) -> Result<Self> {
        if !kind.payload_len_ok(payload.len()) {
            return Err(CircuitError::Decode(vx6_proto::Error::Invalid {
                what: "link cell",
                why: "payload length not allowed for command",
            }));
        }
        Ok(match kind {
            LinkCellKind::Create => LinkCell::Create(Create::decode(payload)?),
            LinkCellKind::Created => LinkCell::Created(Created::decode(payload)?),
            LinkCellKind::Relay => LinkCell::Relay(CellBody::from_slice(payload)?),
            LinkCellKind::Destroy => {
                let mut r = Reader::new(payload);
                let reason = Reason::from_code(r.u8()?)?;
                r.finish()?;
                LinkCell::Destroy(reason)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cells() -> Vec<LinkCell> {
        vec![
            LinkCell::Create(Create {
                htype: HandshakeType::NtorV1,
                client_pk: [7; 32],
            }),
            LinkCell::Created(Created {
                relay_pk: [1; 32],
                auth: [2; 32],
            }),
            LinkCell::Relay(CellBody::zeroed(CellSize::Small)),
            LinkCell::Relay(CellBody::zeroed(CellSize::Large)),
            LinkCell::Destroy(Reason::Busy),
        ]
    }

    #[test]
    fn link_cells_round_trip() {
        for c in cells() {
            let p = c.encode_payload();
            assert!(c.kind().payload_len_ok(p.len()));
            assert_eq!(LinkCellKind::from_code(c.kind().code()).unwrap(), c.kind());
            assert_eq!(LinkCell::decode(c.kind(), &p).unwrap(), c);
            assert_eq!(c.clone().into_payload(), p);
        }
    }

    #[test]
    fn link_cells_reject_truncated_and_trailing() {
        for c in cells() {
            let p = c.encode_payload();
            assert!(LinkCell::decode(c.kind(), &p[..p.len() - 1]).is_err());
            let mut longer = p.clone();
            longer.push(0);
            assert!(LinkCell::decode(c.kind(), &longer).is_err());
        }
        // Direct decoders too (used inside EXTEND/EXTENDED).
        let c = Create {
            htype: HandshakeType::NtorV1,
            client_pk: [7; 32],
        }
        .encode();
        assert!(Create::decode(&c[..33]).is_err());
        assert!(Create::decode(&[c.as_slice(), &[0]].concat()).is_err());
        let d = Created {
            relay_pk: [1; 32],
            auth: [2; 32],
        }
        .encode();
        assert!(Created::decode(&d[..63]).is_err());
        assert!(Created::decode(&[d.as_slice(), &[0]].concat()).is_err());
    }

    #[test]
    fn unknown_codes_rejected() {
        assert!(LinkCellKind::from_code(8).is_err());
        assert!(LinkCellKind::from_code(13).is_err());
        assert!(Reason::from_code(8).is_err());
        assert!(LinkCell::decode(LinkCellKind::Destroy, &[200]).is_err());
        let mut c = Create {
            htype: HandshakeType::NtorV1,
            client_pk: [7; 32],
        }
        .encode();
        c[1] = 2;
        assert!(Create::decode(&c).is_err());
        for r in 0..8u8 {
            assert_eq!(Reason::from_code(r).unwrap().code(), r);
        }
    }

    #[test]
    fn agrees_with_link_frames() {
        for k in [
            LinkCellKind::Create,
            LinkCellKind::Created,
            LinkCellKind::Relay,
            LinkCellKind::Destroy,
        ] {
            assert_eq!(k.cmd().code(), k.code());
            assert!(k.cmd().is_circuit());
            assert_eq!(LinkCellKind::from_cmd(k.cmd()), Some(k));
        }
        assert_eq!(LinkCellKind::from_cmd(Cmd::Data), None);
        assert_eq!(CREATE_LEN, 2 + PUBLIC_KEY_LEN);
        assert_eq!(CREATED_LEN, PUBLIC_KEY_LEN + AUTH_LEN);
        assert_eq!((CellSize::SMALL_LEN, CellSize::LARGE_LEN), (512, 16384));
    }

    #[test]
    fn relay_body_sizes() {
        for n in [0, 1, 511, 513, 8192, 16383, 16385, 65536] {
            assert!(CellBody::from_vec(vec![0; n]).is_err(), "{n}");
            assert!(LinkCell::decode(LinkCellKind::Relay, &vec![0; n]).is_err());
        }
        assert_eq!(
            CellBody::from_vec(vec![0; 512]).unwrap().size(),
            CellSize::Small
        );
        assert_eq!(
            CellBody::from_vec(vec![0; 16384]).unwrap().size(),
            CellSize::Large
        );
    }

    proptest! {
        #[test]
        fn link_decode_never_panics(code in 0u8..16, payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(kind) = LinkCellKind::from_code(code)
                && let Ok(c) = LinkCell::decode(kind, &payload)
            {
                prop_assert_eq!(c.encode_payload(), payload);
            }
        }
    }
}
