//! A tiny checked Reader/Writer for the canonical wire encoding.
//!
//! All integers are big-endian. Variable-length fields carry an explicit
//! length prefix (`u8`, `u16` or `u32`) and every read checks it against the
//! bytes remaining and the caller's limit. Decoders finish with
//! [`Reader::finish`], so trailing bytes are always an error. Nothing in this
//! module can panic on any input.

use crate::{Error, Result};

/// Appends canonical encodings to a growable buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Raw bytes with no length prefix (fixed-size fields).
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Bytes with a `u8` length prefix. Callers validate lengths before
    /// encoding; an over-long input is truncated to keep the encoding
    /// well-formed and is a caller bug caught by round-trip tests.
    pub fn bytes8(&mut self, v: &[u8]) -> &mut Self {
        let n = v.len().min(u8::MAX as usize);
        self.u8(n as u8);
        self.raw(v.get(..n).unwrap_or_default())
    }
    /// Bytes with a `u16` length prefix (see [`Writer::bytes8`]).
    pub fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        let n = v.len().min(u16::MAX as usize);
        self.u16(n as u16);
        self.raw(v.get(..n).unwrap_or_default())
    }
    /// Bytes with a `u32` length prefix (see [`Writer::bytes8`]).
    pub fn bytes32(&mut self, v: &[u8]) -> &mut Self {
        let n = v.len().min(u32::MAX as usize);
        self.u32(n as u32);
        self.raw(v.get(..n).unwrap_or_default())
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
    pub fn into_vec(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a canonical encoding from a byte slice, checking every length.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The unread bytes, without consuming them.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Takes exactly `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(Error::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(u8::from_be_bytes(self.array()?))
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn limited(&mut self, len: usize, max: usize, what: &'static str) -> Result<&'a [u8]> {
        if len > max {
            return Err(Error::TooLong { what, len, max });
        }
        self.take(len)
    }

    /// Bytes with a `u8` length prefix, at most `max` long.
    pub fn bytes8(&mut self, max: usize, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u8()? as usize;
        self.limited(len, max, what)
    }
    /// Bytes with a `u16` length prefix, at most `max` long.
    pub fn bytes16(&mut self, max: usize, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u16()? as usize;
        self.limited(len, max, what)
    }
    /// Bytes with a `u32` length prefix, at most `max` long.
    pub fn bytes32(&mut self, max: usize, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        self.limited(len, max, what)
    }

    /// Ends decoding: any unread byte is an error.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut w = Writer::new();
        w.u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .bytes8(b"abc")
            .bytes16(b"de")
            .bytes32(b"");
        let v = w.into_vec();
        let mut r = Reader::new(&v);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 2);
        assert_eq!(r.u32().unwrap(), 3);
        assert_eq!(r.u64().unwrap(), 4);
        assert_eq!(r.bytes8(3, "x").unwrap(), b"abc");
        assert!(matches!(
            r.clone().bytes16(1, "x"),
            Err(Error::TooLong { .. })
        ));
        assert_eq!(r.bytes16(2, "x").unwrap(), b"de");
        assert_eq!(r.bytes32(0, "x").unwrap(), b"");
        r.finish().unwrap();
    }

    #[test]
    fn truncation_and_trailing() {
        let mut r = Reader::new(&[0, 5, 1]);
        assert!(matches!(
            r.bytes16(100, "x"),
            Err(Error::Truncated { needed: 4 })
        ));
        let mut r = Reader::new(&[1, 2]);
        r.u8().unwrap();
        assert_eq!(r.finish(), Err(Error::TrailingBytes(1)));
    }
}
