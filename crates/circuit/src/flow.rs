//! Flow-control windows (PROTOCOL.md §9.8): plain counters the
//! driver keeps per circuit and per stream, at both ends of the data path
//! (the client and the last hop). Relays in the middle keep none: their
//! queues are bounded because the ends never have more than a window of DATA
//! cells in flight.
//!
//! Only DATA cells count. The receiver sends a SENDME each time it has
//! *delivered* (handed to the application / the local TCP socket) another
//! increment of cells, so a slow reader slows the writer. A sender that gets
//! a SENDME crediting more than it sent, or a receiver that gets more DATA
//! than the window, sees a protocol violation: tear the circuit down.
//!
//! Circuit SENDMEs are also authenticated (`SendmeAuth`, kept inside the
//! circuit state rather than by the driver, since only the circuit sees the
//! AEAD tags): each echoes the tag of the DATA cell it acknowledges.

use crate::cell::CellBody;
use crate::layer::{DirLayer, plaintext, plaintext_mut, tag};
use crate::msg::{FlowScope, RelayMsg, TAG_LEN};
use crate::{CircuitError, Result};

/// DATA cells a circuit may have in flight per direction.
pub const CIRCUIT_WINDOW: u32 = 256;
/// DATA cells delivered per circuit-level SENDME.
pub const CIRCUIT_SENDME_INCREMENT: u32 = 32;
/// DATA cells a stream may have in flight per direction.
pub const STREAM_WINDOW: u32 = 128;
/// DATA cells delivered per stream-level SENDME.
pub const STREAM_SENDME_INCREMENT: u32 = 16;

/// Bytes of the tag a circuit-level SENDME carries.
pub const SENDME_TAG_LEN: usize = TAG_LEN;

/// SENDMEs the data ends can owe each other at once: a window's worth.
const SENDMES_IN_FLIGHT: usize = (CIRCUIT_WINDOW / CIRCUIT_SENDME_INCREMENT) as usize;

/// Authenticated circuit-level SENDMEs (PROTOCOL.md §9.8), kept by the
/// circuit state of each data end for the other.
///
/// A circuit SENDME carries the AEAD tag of the DATA cell that completed
/// the increment it acknowledges (the 32nd, 64th, … received). The tag
/// depends on the cell's content and is only seen once the cell has passed
/// every layer, so an end cannot acknowledge cells it never received: it
/// cannot make the other end send faster than it reads.
#[derive(Default)]
pub(crate) struct SendmeAuth {
    sent: u64,
    /// Tags of the DATA cells sent that a SENDME must echo, oldest first.
    expected: std::collections::VecDeque<[u8; SENDME_TAG_LEN]>,
    received: u64,
    /// Tags the next SENDMEs sent will carry, oldest first.
    owed: std::collections::VecDeque<[u8; SENDME_TAG_LEN]>,
}

impl SendmeAuth {
    /// Whether the next DATA cell sent completes an increment.
    fn next_sent_completes(&self) -> bool {
        self.sent
            .saturating_add(1)
            .is_multiple_of(u64::from(CIRCUIT_SENDME_INCREMENT))
    }

    /// A DATA cell was sealed with `tag`.
    fn on_data_sealed(&mut self, tag: [u8; SENDME_TAG_LEN]) {
        if self.next_sent_completes() {
            self.expected.push_back(tag);
        }
        self.sent = self.sent.saturating_add(1);
    }

    /// A DATA cell sealed with `tag` was opened.
    fn on_data_opened(&mut self, tag: [u8; SENDME_TAG_LEN]) -> Result<()> {
        self.received = self.received.saturating_add(1);
        if self
            .received
            .is_multiple_of(u64::from(CIRCUIT_SENDME_INCREMENT))
        {
            if self.owed.len() >= SENDMES_IN_FLIGHT {
                return Err(CircuitError::WindowViolation);
            }
            self.owed.push_back(tag);
        }
        Ok(())
    }

    /// Encodes `msg`, gives a circuit SENDME its tag and seals the cell for
    /// the other data end with `layer`; notes a DATA cell's tag.
    pub(crate) fn seal(&mut self, layer: &mut DirLayer, msg: &RelayMsg) -> Result<CellBody> {
        // Misuse is refused before anything moves.
        if msg.is_data() && self.next_sent_completes() && self.expected.len() >= SENDMES_IN_FLIGHT {
            return Err(CircuitError::Usage("DATA beyond the circuit window"));
        }
        let sendme = matches!(msg, RelayMsg::Sendme(FlowScope::Circuit));
        if sendme && self.owed.is_empty() {
            return Err(CircuitError::Usage(
                "circuit SENDME before its cells arrived",
            ));
        }
        let mut body = CellBody::zeroed(msg.cell_size()?);
        msg.encode_into(plaintext_mut(body.as_mut_bytes()))?;
        if sendme && let Some(tag) = self.owed.pop_front() {
            RelayMsg::put_sendme_tag(plaintext_mut(body.as_mut_bytes()), &tag)?;
        }
        layer.seal(body.as_mut_bytes())?;
        if msg.is_data() {
            self.on_data_sealed(tag(body.as_bytes())?);
        }
        Ok(body)
    }

    /// `msg` was opened from `body`, sent by the other data end: notes a
    /// DATA cell's tag, checks a circuit SENDME's.
    pub(crate) fn opened(&mut self, body: &CellBody, msg: &RelayMsg) -> Result<()> {
        match msg {
            RelayMsg::Data { .. } => self.on_data_opened(tag(body.as_bytes())?),
            RelayMsg::Sendme(FlowScope::Circuit) => {
                self.check_received(RelayMsg::sendme_tag(plaintext(body.as_bytes())))
            }
            _ => Ok(()),
        }
    }

    /// A circuit SENDME carrying `tag` arrived.
    fn check_received(&mut self, tag: &[u8]) -> Result<()> {
        use subtle::ConstantTimeEq;
        let want = self
            .expected
            .pop_front()
            .ok_or(CircuitError::WindowViolation)?;
        if !bool::from(want.as_slice().ct_eq(tag)) {
            return Err(CircuitError::Protocol("SENDME with a wrong tag"));
        }
        Ok(())
    }
}

/// The sending side of a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendWindow {
    available: u32,
    max: u32,
    increment: u32,
}

impl SendWindow {
    /// A window of `max` cells refilled `increment` cells per SENDME.
    pub const fn new(max: u32, increment: u32) -> Self {
        Self {
            available: max,
            max,
            increment,
        }
    }
    /// The v1 circuit window.
    pub const fn circuit() -> Self {
        Self::new(CIRCUIT_WINDOW, CIRCUIT_SENDME_INCREMENT)
    }
    /// The v1 stream window.
    pub const fn stream() -> Self {
        Self::new(STREAM_WINDOW, STREAM_SENDME_INCREMENT)
    }
    /// DATA cells that may be sent now.
    pub fn available(&self) -> u32 {
        self.available
    }
    pub fn can_send(&self) -> bool {
        self.available > 0
    }
    /// Records one DATA cell sent. Sending on an empty window is a local bug
    /// (check [`SendWindow::can_send`] first): a non-fatal usage error.
    pub fn on_data_sent(&mut self) -> Result<()> {
        self.available = self
            .available
            .checked_sub(1)
            .ok_or(CircuitError::Usage("DATA sent on an exhausted window"))?;
        Ok(())
    }
    /// Records a SENDME from the receiver. Fatal
    /// [`CircuitError::WindowViolation`] if it credits cells never sent.
    pub fn on_sendme(&mut self) -> Result<()> {
        match self.available.checked_add(self.increment) {
            Some(n) if n <= self.max => {
                self.available = n;
                Ok(())
            }
            _ => Err(CircuitError::WindowViolation),
        }
    }
}

/// The receiving side of a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    /// DATA cells the peer may still send.
    remaining: u32,
    /// Received but not yet delivered.
    undelivered: u32,
    /// Delivered since the last SENDME.
    delivered: u32,
    increment: u32,
}

impl RecvWindow {
    pub const fn new(max: u32, increment: u32) -> Self {
        Self {
            remaining: max,
            undelivered: 0,
            delivered: 0,
            increment,
        }
    }
    pub const fn circuit() -> Self {
        Self::new(CIRCUIT_WINDOW, CIRCUIT_SENDME_INCREMENT)
    }
    pub const fn stream() -> Self {
        Self::new(STREAM_WINDOW, STREAM_SENDME_INCREMENT)
    }
    /// Received DATA cells not yet delivered (what the driver is buffering).
    pub fn buffered(&self) -> u32 {
        self.undelivered
    }
    /// Records one DATA cell received. Fatal
    /// [`CircuitError::WindowViolation`] if the peer overran the window.
    pub fn on_data_received(&mut self) -> Result<()> {
        self.remaining = self
            .remaining
            .checked_sub(1)
            .ok_or(CircuitError::WindowViolation)?;
        self.undelivered = self.undelivered.saturating_add(1);
        Ok(())
    }
    /// Records one received DATA cell as delivered. Returns `true` when a
    /// SENDME must be sent now (the window was reopened by one increment).
    pub fn on_data_delivered(&mut self) -> Result<bool> {
        self.undelivered = self
            .undelivered
            .checked_sub(1)
            .ok_or(CircuitError::Usage("delivered more DATA than received"))?;
        self.delivered += 1;
        if self.delivered >= self.increment {
            self.delivered = 0;
            self.remaining = self.remaining.saturating_add(self.increment);
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sender_stops_at_window_and_resumes_on_sendme() {
        let mut w = SendWindow::circuit();
        for _ in 0..CIRCUIT_WINDOW {
            w.on_data_sent().unwrap();
        }
        assert!(!w.can_send());
        assert!(matches!(w.on_data_sent(), Err(CircuitError::Usage(_))));
        w.on_sendme().unwrap();
        assert_eq!(w.available(), CIRCUIT_SENDME_INCREMENT);
    }

    #[test]
    fn unearned_sendme_is_a_violation() {
        let mut w = SendWindow::stream();
        assert_eq!(w.on_sendme().unwrap_err(), CircuitError::WindowViolation);
        for _ in 0..STREAM_SENDME_INCREMENT - 1 {
            w.on_data_sent().unwrap();
        }
        assert!(w.on_sendme().unwrap_err().is_fatal());
    }

    #[test]
    fn receiver_rejects_overrun() {
        let mut r = RecvWindow::stream();
        for _ in 0..STREAM_WINDOW {
            r.on_data_received().unwrap();
        }
        assert_eq!(
            r.on_data_received().unwrap_err(),
            CircuitError::WindowViolation
        );
    }

    #[test]
    fn slow_reader_sends_no_sendme() {
        let mut r = RecvWindow::circuit();
        for _ in 0..CIRCUIT_WINDOW {
            r.on_data_received().unwrap();
        }
        assert_eq!(r.buffered(), CIRCUIT_WINDOW);
        let mut sendmes = 0;
        for _ in 0..CIRCUIT_WINDOW {
            if r.on_data_delivered().unwrap() {
                sendmes += 1;
            }
        }
        assert_eq!(sendmes, CIRCUIT_WINDOW / CIRCUIT_SENDME_INCREMENT);
        assert!(r.on_data_delivered().is_err());
    }

    proptest! {
        /// Any interleaving of an honest sender and receiver never violates
        /// the window, and the sender is never credited beyond its maximum.
        #[test]
        fn honest_peers_never_violate(ops in proptest::collection::vec(0u8..3, 0..3000)) {
            let mut s = SendWindow::new(20, 5);
            let mut r = RecvWindow::new(20, 5);
            let mut in_flight = 0u32;
            let mut sendmes = 0u32;
            for op in ops {
                match op {
                    0 if s.can_send() => { s.on_data_sent().unwrap(); in_flight += 1; }
                    1 if in_flight > 0 => { r.on_data_received().unwrap(); in_flight -= 1; }
                    2 if r.buffered() > 0 => { if r.on_data_delivered().unwrap() { sendmes += 1; } }
                    _ => if sendmes > 0 { s.on_sendme().unwrap(); sendmes -= 1; },
                }
                prop_assert!(s.available() <= 20);
            }
        }
    }
}
