//! Link frames: the channel → circuit → stream framing (PROTOCOL.md §5).
//!
//! A channel is one authenticated connection. Everything on it is a frame:
//!
//! ```text
//! u8 cmd | u32 circ | u32 stream | u32 len | payload[len]
//! ```
//!
//! Circuit 0 is the direct (zero-hop) circuit between the two channel ends;
//! its streams carry forwarded connections and node RPCs. Other circuit ids
//! belong to relayed circuits (fixed-size cells; PROTOCOL.md §9). Every frame
//! length is checked against the per-command maximum *before* the payload is
//! read, so a peer cannot make a reader allocate more than
//! [`MAX_FRAME_PAYLOAD`] bytes per frame.

use crate::bytes::{Reader, Writer};
use crate::{Error, Result};

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 13;
/// Largest DATA payload. Large frames on direct circuits keep per-frame costs
/// (header, syscalls, AEAD calls in TLS) low; see BENCHMARKS.md.
pub const MAX_DATA_PAYLOAD: usize = 32 * 1024;
/// Largest OPEN payload (what the stream is for).
pub const MAX_OPEN_PAYLOAD: usize = 1024;
/// Largest payload of any frame.
pub const MAX_FRAME_PAYLOAD: usize = MAX_DATA_PAYLOAD;
/// The two relay cell sizes (PROTOCOL.md §9): small for control and
/// interactive data, large for bulk. A relay learns only the size class.
pub const CELL_SMALL_LEN: usize = 512;
pub const CELL_LARGE_LEN: usize = 16384;
/// CREATE payload: `u16 handshake type || X25519 public key`.
pub const CREATE_LEN: usize = 2 + 32;
/// CREATED payload: `X25519 public key || 32-byte auth`.
pub const CREATED_LEN: usize = 32 + 32;
/// DESTROY payload: one reason byte.
pub const DESTROY_LEN: usize = 1;

/// Stream ids opened by the channel's dialer are odd, the acceptor's even, so
/// the two ends never pick the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

/// Circuit id, chosen per channel. 0 is the direct circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircId(pub u32);

impl CircId {
    pub const DIRECT: CircId = CircId(0);
}

/// Frame commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Opens `stream`; payload says what for (≤ [`MAX_OPEN_PAYLOAD`]).
    Open,
    /// Stream bytes (≤ [`MAX_DATA_PAYLOAD`]); consumes the receiver's window.
    Data,
    /// Payload `u32` increment: the sender may send that many more bytes on
    /// `stream`, or on the whole channel when `stream` is 0.
    Window,
    /// The sender will send no more data on `stream` (half-close).
    Fin,
    /// Payload `u32` code: abort `stream` in both directions.
    Reset,
    /// Payload 8 opaque bytes, echoed in a Pong.
    Ping,
    Pong,
    /// Payload `u32` code: the sender is closing the channel.
    GoAway,
    /// Relay circuits (circuit id ≠ 0, stream 0; PROTOCOL.md §9): open a
    /// circuit to the channel peer with a handshake.
    Create,
    /// The handshake answer to a Create.
    Created,
    /// One fixed-size onion-encrypted relay cell.
    Relay,
    /// Tear the circuit down; one reason byte.
    Destroy,
}

impl Cmd {
    pub fn code(self) -> u8 {
        match self {
            Cmd::Open => 1,
            Cmd::Data => 2,
            Cmd::Window => 3,
            Cmd::Fin => 4,
            Cmd::Reset => 5,
            Cmd::Ping => 6,
            Cmd::Pong => 7,
            Cmd::GoAway => 8,
            Cmd::Create => 9,
            Cmd::Created => 10,
            Cmd::Relay => 11,
            Cmd::Destroy => 12,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            1 => Cmd::Open,
            2 => Cmd::Data,
            3 => Cmd::Window,
            4 => Cmd::Fin,
            5 => Cmd::Reset,
            6 => Cmd::Ping,
            7 => Cmd::Pong,
            8 => Cmd::GoAway,
            9 => Cmd::Create,
            10 => Cmd::Created,
            11 => Cmd::Relay,
            12 => Cmd::Destroy,
            t => {
                return Err(Error::UnknownTag {
                    what: "frame command",
                    tag: t.into(),
                });
            }
        })
    }
    /// Allowed payload length range for this command.
    fn payload_len_ok(self, len: usize) -> bool {
        match self {
            Cmd::Open => len <= MAX_OPEN_PAYLOAD,
            Cmd::Data => (1..=MAX_DATA_PAYLOAD).contains(&len),
            Cmd::Window | Cmd::Reset | Cmd::GoAway => len == 4,
            Cmd::Fin => len == 0,
            Cmd::Ping | Cmd::Pong => len == 8,
            Cmd::Create => len == CREATE_LEN,
            Cmd::Created => len == CREATED_LEN,
            Cmd::Relay => len == CELL_SMALL_LEN || len == CELL_LARGE_LEN,
            Cmd::Destroy => len == DESTROY_LEN,
        }
    }

    /// Commands that belong to a relay circuit rather than a stream.
    pub fn is_circuit(self) -> bool {
        matches!(self, Cmd::Create | Cmd::Created | Cmd::Relay | Cmd::Destroy)
    }
}

/// A decoded, length-checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub cmd: Cmd,
    pub circ: CircId,
    pub stream: StreamId,
    pub len: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut w = Writer::with_capacity(FRAME_HEADER_LEN);
        w.u8(self.cmd.code())
            .u32(self.circ.0)
            .u32(self.stream.0)
            .u32(self.len);
        let mut out = [0u8; FRAME_HEADER_LEN];
        out.copy_from_slice(w.as_slice());
        out
    }

    /// Decodes and validates a header: known command, payload length allowed
    /// for it, stream 0 only where the command permits it.
    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> Result<Self> {
        let mut r = Reader::new(b);
        let cmd = Cmd::from_code(r.u8()?)?;
        let circ = CircId(r.u32()?);
        let stream = StreamId(r.u32()?);
        let len = r.u32()?;
        r.finish()?;
        if !cmd.payload_len_ok(len as usize) {
            return Err(Error::Invalid {
                what: "frame",
                why: "payload length not allowed for command",
            });
        }
        if cmd.is_circuit() {
            if circ.0 == 0 || stream.0 != 0 {
                return Err(Error::Invalid {
                    what: "frame",
                    why: "circuit frame needs a circuit id and stream 0",
                });
            }
            return Ok(Self {
                cmd,
                circ,
                stream,
                len,
            });
        }
        if circ.0 != 0 {
            return Err(Error::Invalid {
                what: "frame",
                why: "stream frames belong to circuit 0",
            });
        }
        let channel_level = matches!(cmd, Cmd::Ping | Cmd::Pong | Cmd::GoAway);
        let stream_zero_ok = channel_level || cmd == Cmd::Window;
        if stream.0 == 0 && !stream_zero_ok {
            return Err(Error::Invalid {
                what: "frame",
                why: "stream 0 is not a stream",
            });
        }
        if channel_level && (stream.0 != 0 || circ.0 != 0) {
            return Err(Error::Invalid {
                what: "frame",
                why: "channel-level frame on a stream",
            });
        }
        Ok(Self {
            cmd,
            circ,
            stream,
            len,
        })
    }
}

/// Reads the `u32` carried by Window, Reset and GoAway frames.
pub fn decode_u32_payload(p: &[u8]) -> Result<u32> {
    let mut r = Reader::new(p);
    let v = r.u32()?;
    r.finish()?;
    Ok(v)
}

/// Reset and GoAway codes. They say what happened in one word and never
/// carry local error text (no oracle for a prober).
pub mod code {
    /// Ordinary cancellation.
    pub const CANCEL: u32 = 0;
    /// The receiver refused the stream: a purpose it does not serve, or a
    /// service that does not exist for the opener (a private service the
    /// opener may not use answers exactly like a missing one).
    pub const REFUSED: u32 = 1;
    /// Too many streams or a full accept queue; try later.
    pub const BUSY: u32 = 2;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 3;
    /// The target behind the stream failed (could not connect, or it closed abruptly).
    pub const TARGET_FAILED: u32 = 4;
    /// The client is not allowed to use this service.
    pub const NOT_ALLOWED: u32 = 5;
    /// The sender closes the channel on purpose (GOAWAY): it is shutting
    /// down, retiring a channel replaced by a newer one, or giving up on it.
    pub const SHUTDOWN: u32 = 6;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(cmd: Cmd, circ: u32, stream: u32, len: u32) -> FrameHeader {
        FrameHeader {
            cmd,
            circ: CircId(circ),
            stream: StreamId(stream),
            len,
        }
    }

    #[test]
    fn header_round_trip() {
        for h in [
            hdr(Cmd::Open, 0, 1, 10),
            hdr(Cmd::Data, 0, 2, MAX_DATA_PAYLOAD as u32),
            hdr(Cmd::Window, 0, 0, 4),
            hdr(Cmd::Ping, 0, 0, 8),
            hdr(Cmd::Fin, 0, 7, 0),
        ] {
            assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn header_rejects() {
        for h in [
            hdr(Cmd::Data, 0, 1, MAX_DATA_PAYLOAD as u32 + 1),
            hdr(Cmd::Data, 0, 1, 0),
            hdr(Cmd::Open, 0, 1, MAX_OPEN_PAYLOAD as u32 + 1),
            hdr(Cmd::Data, 0, 0, 5),
            hdr(Cmd::Ping, 0, 1, 8),
            hdr(Cmd::Fin, 0, 1, 1),
            hdr(Cmd::Window, 0, 1, 3),
            hdr(Cmd::Data, 5, 1, 10),
            hdr(Cmd::Relay, 0, 0, CELL_SMALL_LEN as u32),
            hdr(Cmd::Relay, 5, 1, CELL_SMALL_LEN as u32),
            hdr(Cmd::Relay, 5, 0, CELL_SMALL_LEN as u32 + 1),
            hdr(Cmd::Create, 5, 0, CREATE_LEN as u32 - 1),
            hdr(Cmd::Created, 5, 0, CREATED_LEN as u32 + 1),
            hdr(Cmd::Destroy, 5, 0, 0),
        ] {
            assert!(FrameHeader::decode(&h.encode()).is_err(), "{h:?}");
        }
        for h in [
            hdr(Cmd::Relay, 5, 0, CELL_SMALL_LEN as u32),
            hdr(Cmd::Relay, 5, 0, CELL_LARGE_LEN as u32),
            hdr(Cmd::Create, 5, 0, CREATE_LEN as u32),
            hdr(Cmd::Created, 5, 0, CREATED_LEN as u32),
            hdr(Cmd::Destroy, 5, 0, DESTROY_LEN as u32),
        ] {
            assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }
        let mut raw = hdr(Cmd::Data, 0, 1, 1).encode();
        raw[0] = 99;
        assert!(FrameHeader::decode(&raw).is_err());
        let mut raw = hdr(Cmd::Data, 0, 1, 1).encode();
        raw[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(FrameHeader::decode(&raw).is_err());
    }
}
