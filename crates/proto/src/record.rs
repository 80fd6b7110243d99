//! Signed records: what a node says about itself, its services and its name.
//!
//! A record is a body plus an Ed25519 signature by the node it describes,
//! over the body's canonical encoding under the record's domain tag
//! (PROTOCOL.md §4). Decoding is structural only; [`Signed::verify`] checks
//! signature, expiry, issue time and lifetime. The highest valid `seq` wins
//! everywhere a record replaces another.
//!
//! A ServiceRecord never carries the localhost target: that stays in the
//! owner's config.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::bytes::{Reader, Writer};
use crate::id::{NodeId, OnionKey, Signature};
use crate::identity::{self, NodeKeypair, UnixTime};
use crate::name::{NodeName, ServiceName};
use crate::{Error, Result};

/// How far in the future a record's issue time may be (clock skew allowance).
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// The longest lifetime (expires - issued) any record may claim.
pub const MAX_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// The most endpoints one NodeRecord may list.
pub const MAX_ENDPOINTS: usize = 16;
/// Upper bound on any encoded signed record.
pub const MAX_RECORD_LEN: usize = 1024;

/// The transport an endpoint speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportKind {
    Tcp,
    Quic,
}

impl TransportKind {
    pub fn code(self) -> u8 {
        match self {
            Self::Tcp => 1,
            Self::Quic => 2,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(Self::Tcp),
            2 => Ok(Self::Quic),
            t => Err(Error::UnknownTag {
                what: "transport",
                tag: t.into(),
            }),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Quic => "quic",
        }
    }
}

impl std::str::FromStr for TransportKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "quic" => Ok(Self::Quic),
            _ => Err(Error::Invalid {
                what: "transport",
                why: "expected tcp or quic",
            }),
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport plus a socket address a node can be dialed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub transport: TransportKind,
    pub addr: SocketAddr,
}

impl Endpoint {
    /// The rules [`Endpoint::decode`] enforces, for endpoints built in memory:
    /// a non-zero port, and no IPv6 flow label or scope id (the encoding has
    /// no room for them, and a scope id means nothing to a remote peer).
    pub fn validate(&self) -> Result<()> {
        if self.addr.port() == 0 {
            return Err(Error::Invalid {
                what: "endpoint",
                why: "port 0",
            });
        }
        if let SocketAddr::V6(a) = self.addr
            && (a.flowinfo() != 0 || a.scope_id() != 0)
        {
            return Err(Error::Invalid {
                what: "endpoint",
                why: "IPv6 flow label or scope id set",
            });
        }
        Ok(())
    }
    pub fn encode(&self, w: &mut Writer) {
        w.u8(self.transport.code());
        match self.addr.ip() {
            IpAddr::V6(ip) => w.u8(6).raw(&ip.octets()),
            IpAddr::V4(ip) => w.u8(4).raw(&ip.octets()),
        };
        w.u16(self.addr.port());
    }
    pub fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let transport = TransportKind::from_code(r.u8()?)?;
        let ip = match r.u8()? {
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            t => {
                return Err(Error::UnknownTag {
                    what: "address family",
                    tag: t.into(),
                });
            }
        };
        let port = r.u16()?;
        if port == 0 {
            return Err(Error::Invalid {
                what: "endpoint",
                why: "port 0",
            });
        }
        Ok(Self {
            transport,
            addr: SocketAddr::new(ip, port),
        })
    }
}

/// Capability bits a node advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Capabilities(pub u32);

impl Capabilities {
    pub const RELAY: u32 = 1;
    pub const DHT: u32 = 2;
    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
}

/// Whether a service is listed publicly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Visibility {
    Public,
    Private,
}

impl Visibility {
    fn code(self) -> u8 {
        match self {
            Self::Public => 1,
            Self::Private => 2,
        }
    }
    fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(Self::Public),
            2 => Ok(Self::Private),
            t => Err(Error::UnknownTag {
                what: "visibility",
                tag: t.into(),
            }),
        }
    }
}

/// Fields every record body has, in the same place.
pub trait RecordBody: Sized + Clone {
    /// Domain tag the signature is made under.
    const TAG: &'static str;
    fn signer(&self) -> NodeId;
    fn seq(&self) -> u64;
    fn issued(&self) -> UnixTime;
    fn expires(&self) -> UnixTime;
    fn encode_body(&self, w: &mut Writer);
    fn decode_body(r: &mut Reader<'_>) -> Result<Self>;

    /// Checks the rules a decoded body always satisfies but an in-memory one
    /// might not (e.g. endpoint count and ports), so that [`RecordBody::sign`]
    /// never signs a body that would not decode back to itself.
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    fn body_bytes(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        self.encode_body(&mut w);
        w.into_vec()
    }

    /// Signs this body with `key`, which must be the signer's key.
    ///
    /// Refuses ([`Error::KeyMismatch`]) a key that is not the signer's, and
    /// refuses a body that no receiver would accept whatever the time: an
    /// empty or over-long lifetime, or one that fails [`RecordBody::validate`].
    fn sign(self, key: &NodeKeypair) -> Result<Signed<Self>> {
        if key.node_id() != self.signer() {
            return Err(Error::KeyMismatch);
        }
        check_lifetime(&self)?;
        self.validate()?;
        let sig = key.sign(Self::TAG, &self.body_bytes());
        Ok(Signed { body: self, sig })
    }
}

/// A record body with its signature. Construct through [`RecordBody::sign`]
/// or [`Signed::decode`] followed by [`Signed::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed<T> {
    pub body: T,
    pub sig: Signature,
}

impl<T: RecordBody> Signed<T> {
    /// `body || signature(64)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(192);
        self.body.encode_body(&mut w);
        w.raw(&self.sig.0);
        w.into_vec()
    }

    /// Structural decode; does not verify. Rejects over-long input and
    /// trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(Error::TooLong {
                what: "record",
                len: bytes.len(),
                max: MAX_RECORD_LEN,
            });
        }
        let mut r = Reader::new(bytes);
        let body = T::decode_body(&mut r)?;
        let sig = Signature(r.array::<64>()?);
        r.finish()?;
        Ok(Self { body, sig })
    }

    /// Checks issue time, lifetime, expiry at `now`, the body's structural
    /// rules and the signature, in the order of PROTOCOL.md §4.6.
    pub fn verify(&self, now: UnixTime) -> Result<&T> {
        let b = &self.body;
        if b.issued().0 > now.0.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(Error::FromTheFuture);
        }
        check_lifetime(b)?;
        if b.expires() <= now {
            return Err(Error::Expired);
        }
        b.validate()?;
        identity::verify(&b.signer(), T::TAG, &b.body_bytes(), &self.sig)?;
        Ok(b)
    }

    /// Decode then verify: the one call to use on anything from a peer.
    pub fn decode_verified(bytes: &[u8], now: UnixTime) -> Result<Self> {
        let s = Self::decode(bytes)?;
        s.verify(now)?;
        Ok(s)
    }
}

/// `issued < expires <= issued + MAX_LIFETIME_SECS`.
fn check_lifetime<T: RecordBody>(b: &T) -> Result<()> {
    let (issued, expires) = (b.issued().0, b.expires().0);
    if expires <= issued || expires - issued > MAX_LIFETIME_SECS {
        return Err(Error::Invalid {
            what: "record",
            why: "lifetime out of range",
        });
    }
    Ok(())
}

fn encode_common(w: &mut Writer, seq: u64, issued: UnixTime, expires: UnixTime) {
    w.u64(seq).u64(issued.0).u64(expires.0);
}

fn decode_common(r: &mut Reader<'_>) -> Result<(u64, UnixTime, UnixTime)> {
    Ok((r.u64()?, UnixTime(r.u64()?), UnixTime(r.u64()?)))
}

fn decode_name<T: std::str::FromStr<Err = Error>>(
    r: &mut Reader<'_>,
    what: &'static str,
) -> Result<T> {
    let raw = r.bytes8(crate::name::MAX_NAME_LEN, what)?;
    let s = std::str::from_utf8(raw).map_err(|_| Error::Invalid {
        what,
        why: "not UTF-8",
    })?;
    let v: T = s.parse()?;
    Ok(v)
}

/// What a node says about itself: how to reach it and what it offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub node: NodeId,
    pub name: Option<NodeName>,
    pub endpoints: Vec<Endpoint>,
    pub onion_key: OnionKey,
    pub caps: Capabilities,
    pub seq: u64,
    pub issued: UnixTime,
    pub expires: UnixTime,
}

impl RecordBody for NodeRecord {
    const TAG: &'static str = "vx6/v1/node-record";
    fn signer(&self) -> NodeId {
        self.node
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn issued(&self) -> UnixTime {
        self.issued
    }
    fn expires(&self) -> UnixTime {
        self.expires
    }
    fn encode_body(&self, w: &mut Writer) {
        w.u8(1).raw(self.node.as_bytes());
        w.bytes8(
            self.name
                .as_ref()
                .map(|n| n.as_str().as_bytes())
                .unwrap_or_default(),
        );
        let n = self.endpoints.len().min(MAX_ENDPOINTS);
        w.u8(n as u8);
        for e in self.endpoints.iter().take(n) {
            e.encode(w);
        }
        w.raw(&self.onion_key.0).u32(self.caps.0);
        encode_common(w, self.seq, self.issued, self.expires);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        expect_version(r)?;
        let node = NodeId::from_bytes(r.array()?);
        let name_raw = r.bytes8(crate::name::MAX_NAME_LEN, "node name")?;
        let name = if name_raw.is_empty() {
            None
        } else {
            let s = std::str::from_utf8(name_raw).map_err(|_| Error::Invalid {
                what: "node name",
                why: "not UTF-8",
            })?;
            let n = NodeName::new(s)?;
            if n.as_str() != s {
                return Err(Error::Invalid {
                    what: "node name",
                    why: "not canonical lowercase",
                });
            }
            Some(n)
        };
        let count = r.u8()? as usize;
        if count > MAX_ENDPOINTS {
            return Err(Error::TooLong {
                what: "endpoint list",
                len: count,
                max: MAX_ENDPOINTS,
            });
        }
        let mut endpoints = Vec::with_capacity(count);
        for _ in 0..count {
            endpoints.push(Endpoint::decode(r)?);
        }
        let onion_key = OnionKey(r.array()?);
        let caps = Capabilities(r.u32()?);
        let (seq, issued, expires) = decode_common(r)?;
        Ok(Self {
            node,
            name,
            endpoints,
            onion_key,
            caps,
            seq,
            issued,
            expires,
        })
    }
    fn validate(&self) -> Result<()> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(Error::TooLong {
                what: "endpoint list",
                len: self.endpoints.len(),
                max: MAX_ENDPOINTS,
            });
        }
        for e in &self.endpoints {
            e.validate()?;
        }
        Ok(())
    }
}

/// A service a node offers. Never carries the localhost target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub node: NodeId,
    pub service: ServiceName,
    pub visibility: Visibility,
    pub seq: u64,
    pub issued: UnixTime,
    pub expires: UnixTime,
}

impl RecordBody for ServiceRecord {
    const TAG: &'static str = "vx6/v1/service-record";
    fn signer(&self) -> NodeId {
        self.node
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn issued(&self) -> UnixTime {
        self.issued
    }
    fn expires(&self) -> UnixTime {
        self.expires
    }
    fn encode_body(&self, w: &mut Writer) {
        w.u8(1).raw(self.node.as_bytes());
        w.bytes8(self.service.as_str().as_bytes());
        w.u8(self.visibility.code());
        encode_common(w, self.seq, self.issued, self.expires);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        expect_version(r)?;
        let node = NodeId::from_bytes(r.array()?);
        let service: ServiceName = decode_canonical_name(r, "service name")?;
        let visibility = Visibility::from_code(r.u8()?)?;
        let (seq, issued, expires) = decode_common(r)?;
        Ok(Self {
            node,
            service,
            visibility,
            seq,
            issued,
            expires,
        })
    }
}

/// Binds a human name to a node id. Two valid claims on one name by
/// different ids are a clash the user must resolve; they are never merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameClaim {
    pub name: NodeName,
    pub node: NodeId,
    pub seq: u64,
    pub issued: UnixTime,
    pub expires: UnixTime,
}

impl RecordBody for NameClaim {
    const TAG: &'static str = "vx6/v1/name-claim";
    fn signer(&self) -> NodeId {
        self.node
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn issued(&self) -> UnixTime {
        self.issued
    }
    fn expires(&self) -> UnixTime {
        self.expires
    }
    fn encode_body(&self, w: &mut Writer) {
        w.u8(1)
            .bytes8(self.name.as_str().as_bytes())
            .raw(self.node.as_bytes());
        encode_common(w, self.seq, self.issued, self.expires);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        expect_version(r)?;
        let name: NodeName = decode_canonical_name(r, "node name")?;
        let node = NodeId::from_bytes(r.array()?);
        let (seq, issued, expires) = decode_common(r)?;
        Ok(Self {
            name,
            node,
            seq,
            issued,
            expires,
        })
    }
}

fn expect_version(r: &mut Reader<'_>) -> Result<()> {
    match r.u8()? {
        1 => Ok(()),
        v => Err(Error::UnknownTag {
            what: "record version",
            tag: v.into(),
        }),
    }
}

/// Decodes a name and insists it is already in canonical (lowercase) form,
/// so one record has exactly one encoding.
fn decode_canonical_name<T>(r: &mut Reader<'_>, what: &'static str) -> Result<T>
where
    T: std::str::FromStr<Err = Error> + std::fmt::Display,
{
    let mut probe = r.clone();
    let raw = probe.bytes8(crate::name::MAX_NAME_LEN, what)?;
    let v: T = decode_name(r, what)?;
    if v.to_string().as_bytes() != raw {
        return Err(Error::Invalid {
            what,
            why: "not canonical lowercase",
        });
    }
    Ok(v)
}
