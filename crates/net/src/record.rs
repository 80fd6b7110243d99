//! TLS 1.3 record protection (RFC 8446 §5.2–5.4) for TCP links, sans-IO.
//!
//! Owns sealing and opening one record in place with the traffic keys rustls
//! derived in the handshake (see `tcplink`): the per-record nonce (`iv` XOR
//! the sequence number), the additional data (the record header), the inner
//! content type and its zero padding, the sequence number itself, and the
//! size limits a record must keep. It does not read or write sockets.
//!
//! Why not let rustls do this: its buffered API copies every byte three times
//! on the way in (socket buffer → its deframer → its plaintext queue → the
//! caller) and allocates a buffer per record; here a record is decrypted where
//! it was read and a frame is parsed straight out of it. rustls still runs the
//! handshake and derives every key, including after a KeyUpdate (rustls'
//! `kernel` API, made for kTLS, which does what this module does in the
//! kernel). The bytes on the wire are plain TLS 1.3: a rustls peer reads them
//! (tests/transport.rs checks both directions and key updates).

use std::ops::Range;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext in one record (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Record header: outer type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Authentication tag of every AEAD TLS 1.3 uses.
pub const TAG_LEN: usize = 16;
/// Largest ciphertext a peer may send (2^14 + 256, RFC 8446 §5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Largest whole record.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;

/// Outer type of every protected record, and the inner type of data.
const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [0x03, 0x03];

/// What a record carries once opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    Alert,
    Handshake,
    ApplicationData,
}

impl ContentType {
    fn byte(self) -> u8 {
        match self {
            ContentType::Alert => 21,
            ContentType::Handshake => 22,
            ContentType::ApplicationData => APPLICATION_DATA,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            21 => Some(ContentType::Alert),
            22 => Some(ContentType::Handshake),
            APPLICATION_DATA => Some(ContentType::ApplicationData),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record header is not a TLS 1.3 protected record")]
    BadHeader,
    #[error("record length {0} is out of range")]
    BadLength(usize),
    #[error("record failed authentication")]
    BadRecord,
    #[error("record has no or an unknown inner content type")]
    BadContentType,
    #[error("record sequence number exhausted")]
    SequenceExhausted,
    #[error("negotiated cipher suite is not supported by the record layer")]
    UnsupportedSuite,
}

/// The traffic key of one direction and its sequence number.
pub struct RecordKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKey")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl RecordKey {
    /// The key rustls handed over, starting at sequence number `seq`.
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Records protected with this key so far (its next sequence number).
    pub fn records(&self) -> u64 {
        self.seq
    }

    /// The next record's nonce; the sequence number never wraps.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let mut nonce = self.iv;
        for (n, s) in nonce
            .iter_mut()
            .skip(NONCE_LEN - 8)
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(RecordError::SequenceExhausted)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Starts a record at the end of `out`: reserves its header. Append at
    /// most [`MAX_PLAINTEXT`] bytes of plaintext, then call [`Self::seal`]
    /// with what this returned.
    pub fn begin(out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        start
    }

    /// Protects the record begun at `start` (everything after its header up
    /// to the end of `out` is its plaintext) as `ty`.
    pub fn seal(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        ty: ContentType,
    ) -> Result<(), RecordError> {
        let plain = out.len().saturating_sub(start + HEADER_LEN);
        if plain > MAX_PLAINTEXT {
            return Err(RecordError::BadLength(plain));
        }
        out.push(ty.byte());
        let len = plain + 1 + TAG_LEN;
        let header = header(len);
        let nonce = self.next_nonce()?;
        let (head, body) = out.split_at_mut(start + HEADER_LEN);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::BadRecord)?;
        if let Some(h) = head.get_mut(start..) {
            h.copy_from_slice(&header);
        }
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens one whole record (header included) in place; returns its type
    /// and where its plaintext now is within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(ContentType, Range<usize>), RecordError> {
        let header: [u8; HEADER_LEN] = record
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::BadHeader)?;
        let len = record_len(&header)?;
        let total = record.len();
        let body = record
            .get_mut(HEADER_LEN..)
            .filter(|b| b.len() == len)
            .ok_or(RecordError::BadLength(total))?;
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::BadRecord)?;
        // The inner type is the last non-zero byte; zeros after it are padding.
        let type_at = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::BadContentType)?;
        let ty = plain
            .get(type_at)
            .and_then(|&b| ContentType::from_byte(b))
            .ok_or(RecordError::BadContentType)?;
        if type_at > MAX_PLAINTEXT {
            return Err(RecordError::BadLength(type_at));
        }
        Ok((ty, HEADER_LEN..HEADER_LEN + type_at))
    }
}

fn header(len: usize) -> [u8; HEADER_LEN] {
    let [hi, lo] = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
    [
        APPLICATION_DATA,
        LEGACY_VERSION[0],
        LEGACY_VERSION[1],
        hi,
        lo,
    ]
}

/// The ciphertext length a record header announces, checked against the
/// limits before anything waits for or reads that many bytes.
pub fn record_len(header: &[u8; HEADER_LEN]) -> Result<usize, RecordError> {
    let [ty, v0, v1, hi, lo] = *header;
    if ty != APPLICATION_DATA || [v0, v1] != LEGACY_VERSION {
        return Err(RecordError::BadHeader);
    }
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if !(TAG_LEN + 1..=MAX_CIPHERTEXT).contains(&len) {
        return Err(RecordError::BadLength(len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(byte: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([byte; 32]),
            iv: Iv::from([byte ^ 0x5a; 12]),
        }
    }

    fn sealed(key: &mut RecordKey, plain: &[u8], ty: ContentType) -> Vec<u8> {
        let mut out = Vec::new();
        let start = RecordKey::begin(&mut out);
        out.extend_from_slice(plain);
        key.seal(&mut out, start, ty).unwrap();
        out
    }

    #[test]
    fn round_trip_in_order() {
        let mut tx = RecordKey::new(&secrets(1), 7).unwrap();
        let mut rx = RecordKey::new(&secrets(1), 7).unwrap();
        for (i, ty) in [
            ContentType::ApplicationData,
            ContentType::Handshake,
            ContentType::Alert,
        ]
        .into_iter()
        .enumerate()
        {
            let plain = vec![i as u8 + 1; 100 * (i + 1)];
            let mut rec = sealed(&mut tx, &plain, ty);
            assert_eq!(rec.len(), HEADER_LEN + plain.len() + 1 + TAG_LEN);
            let (got_ty, range) = rx.open(&mut rec).unwrap();
            assert_eq!(got_ty, ty);
            assert_eq!(&rec[range], &plain[..]);
        }
        assert_eq!(tx.records(), 10);
        assert_eq!(rx.records(), 10);
    }

    #[test]
    fn wrong_sequence_tamper_and_wrong_key_fail() {
        let mut tx = RecordKey::new(&secrets(1), 0).unwrap();
        let rec = sealed(&mut tx, b"hello", ContentType::ApplicationData);
        // Replayed or reordered: the receiver is one record further along.
        let mut rx = RecordKey::new(&secrets(1), 1).unwrap();
        assert_eq!(rx.open(&mut rec.clone()), Err(RecordError::BadRecord));
        let mut rx = RecordKey::new(&secrets(2), 0).unwrap();
        assert_eq!(rx.open(&mut rec.clone()), Err(RecordError::BadRecord));
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 1;
            let mut rx = RecordKey::new(&secrets(1), 0).unwrap();
            assert!(rx.open(&mut bad).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn padding_is_stripped_and_all_zero_is_refused() {
        // Seal plaintext that ends in the type byte and zero padding by hand.
        let mut tx = RecordKey::new(&secrets(3), 0).unwrap();
        let mut rx = RecordKey::new(&secrets(3), 0).unwrap();
        let mut out = Vec::new();
        let start = RecordKey::begin(&mut out);
        out.extend_from_slice(b"data\x17\0\0\0");
        // seal() appends the given type after the padding; use Alert so the
        // last non-zero byte is the alert type.
        tx.seal(&mut out, start, ContentType::Alert).unwrap();
        let (ty, range) = rx.open(&mut out).unwrap();
        assert_eq!(ty, ContentType::Alert);
        assert_eq!(&out[range], b"data\x17\0\0\0");

        // A record whose plaintext is all zeros has no type: sealed with the
        // raw AEAD, since seal() always adds one.
        let mut rx = RecordKey::new(&secrets(3), 0).unwrap();
        let key = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &[3; 32]).unwrap());
        let mut body = vec![0u8; 10];
        let hdr = header(body.len() + TAG_LEN);
        let nonce = [3 ^ 0x5a; 12]; // sequence 0: the iv itself
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(hdr),
                &mut body,
            )
            .unwrap();
        let mut rec = hdr.to_vec();
        rec.extend_from_slice(&body);
        rec.extend_from_slice(tag.as_ref());
        assert_eq!(rx.open(&mut rec), Err(RecordError::BadContentType));
    }

    #[test]
    fn header_limits() {
        assert_eq!(record_len(&[23, 3, 3, 0, 17]), Ok(17));
        assert_eq!(
            record_len(&[23, 3, 3, 0, 16]),
            Err(RecordError::BadLength(16))
        );
        let max = MAX_CIPHERTEXT as u16;
        assert_eq!(
            record_len(&[23, 3, 3, (max >> 8) as u8, max as u8]),
            Ok(MAX_CIPHERTEXT)
        );
        let over = max + 1;
        assert_eq!(
            record_len(&[23, 3, 3, (over >> 8) as u8, over as u8]),
            Err(RecordError::BadLength(MAX_CIPHERTEXT + 1))
        );
        assert_eq!(record_len(&[22, 3, 3, 0, 17]), Err(RecordError::BadHeader));
        assert_eq!(record_len(&[23, 3, 1, 0, 17]), Err(RecordError::BadHeader));
        let mut tx = RecordKey::new(&secrets(1), 0).unwrap();
        let mut out = Vec::new();
        let start = RecordKey::begin(&mut out);
        out.resize(start + HEADER_LEN + MAX_PLAINTEXT + 1, 0);
        assert_eq!(
            tx.seal(&mut out, start, ContentType::ApplicationData),
            Err(RecordError::BadLength(MAX_PLAINTEXT + 1))
        );
    }

    #[test]
    fn sequence_never_wraps() {
        let mut tx = RecordKey::new(&secrets(1), u64::MAX).unwrap();
        let mut out = Vec::new();
        let start = RecordKey::begin(&mut out);
        assert_eq!(
            tx.seal(&mut out, start, ContentType::ApplicationData),
            Err(RecordError::SequenceExhausted)
        );
    }
}
