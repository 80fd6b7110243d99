//! The one identity-binding mechanism shared by both transports.
//!
//! Owns: the TLS 1.3 client and server configurations (rustls, aws-lc-rs provider)
//! that prove and check Ed25519 node keys with RFC 7250 raw public keys, the
//! single verifier used for both directions and both transports, and the
//! mapping between a presented SubjectPublicKeyInfo and a [`NodeId`].
//!
//! How a dial is bound to a node: the expected node id travels in the TLS
//! server name as `<base32 id>.vx6.invalid` (or `any.vx6.invalid` for an
//! explicit trust-on-first-use dial), so the verifier is stateless. The name
//! is never sent on the wire (SNI is off): it would tell a passive observer
//! which node is being dialled, while the certificate itself is encrypted in
//! TLS 1.3.
//!
//! Must never: parse X.509, accept TLS 1.2 signatures, accept a key other
//! than Ed25519, or panic on anything a peer presents.

use std::fmt;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use vx6_proto::{NodeId, NodeKeypair};

use crate::transport::Expect;
use crate::{NetError, Result};

/// The ALPN protocol id both transports negotiate.
pub const ALPN: &[u8] = b"vx6/1";
/// Suffix of every TLS server name VX6 uses. `.invalid` is reserved (RFC
/// 6761), so these names can never collide with real DNS.
pub const SERVER_NAME_SUFFIX: &str = ".vx6.invalid";
/// The server name of an explicit "any key" (trust on first use) dial.
pub const ANY_KEY_SERVER_NAME: &str = "any.vx6.invalid";
/// Length of an Ed25519 SubjectPublicKeyInfo in DER.
pub const ED25519_SPKI_LEN: usize = 44;

/// DER of `SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) ... }`:
/// everything of an Ed25519 SPKI except the 32 key bytes (RFC 8410 §4).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER of a PKCS#8 v1 `PrivateKeyInfo` for Ed25519 up to the 32 seed bytes
/// (RFC 8410 §7): version 0, algorithm id, OCTET STRING { OCTET STRING seed }.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// Marker the verifier puts in its error when the key is not the expected
/// one. QUIC only hands the dialer the TLS error as text (quinn turns it into
/// a transport error reason), so the presented id is recovered by parsing.
const WRONG_NODE_MARKER: &str = "vx6-wrong-node:";

/// The Ed25519 SubjectPublicKeyInfo (the raw-public-key "certificate") of `id`.
pub fn ed25519_spki(id: &NodeId) -> [u8; ED25519_SPKI_LEN] {
    let mut spki = [0u8; ED25519_SPKI_LEN];
    let (prefix, key) = spki.split_at_mut(ED25519_SPKI_PREFIX.len());
    prefix.copy_from_slice(&ED25519_SPKI_PREFIX);
    key.copy_from_slice(id.as_bytes());
    spki
}

/// The node id an Ed25519 SPKI names. Strict: exactly 44 bytes with the
/// fixed prefix; anything else (other algorithms, trailing bytes, other DER
/// spellings) is refused.
pub fn node_id_from_spki(spki: &[u8]) -> Result<NodeId> {
    let key = spki
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| NetError::Protocol("peer key is not an Ed25519 public key".into()))?;
    Ok(NodeId::from_bytes(key))
}

/// The peer's node id from a completed handshake's `peer_certificates()`.
pub fn peer_node_id(certs: Option<&[CertificateDer<'_>]>) -> Result<NodeId> {
    match certs {
        Some([spki]) => node_id_from_spki(spki.as_ref()),
        Some(_) => Err(NetError::Protocol(
            "peer presented a certificate chain".into(),
        )),
        None => Err(NetError::Protocol("peer presented no key".into())),
    }
}

/// The TLS server name that carries `expect` to the verifier.
pub fn server_name(expect: Expect) -> String {
    match expect {
        Expect::Node(id) => format!("{id}{SERVER_NAME_SUFFIX}"),
        Expect::AnyKey => ANY_KEY_SERVER_NAME.to_owned(),
    }
}

/// Inverse of [`server_name`]; `None` for any name VX6 does not produce.
pub fn expect_from_server_name(name: &str) -> Option<Expect> {
    if name.eq_ignore_ascii_case(ANY_KEY_SERVER_NAME) {
        return Some(Expect::AnyKey);
    }
    // The suffix is ASCII, so a byte split cannot land inside a character.
    let split = name.len().checked_sub(SERVER_NAME_SUFFIX.len())?;
    let (label, suffix) = (name.get(..split)?, name.get(split..)?);
    if !suffix.eq_ignore_ascii_case(SERVER_NAME_SUFFIX) {
        return None;
    }
    label.parse().ok().map(Expect::Node)
}

/// The node id a verifier named as "presented instead of the expected one"
/// in an error's text, if any.
pub fn wrong_node_in(message: &str) -> Option<NodeId> {
    let at = message.find(WRONG_NODE_MARKER)? + WRONG_NODE_MARKER.len();
    message
        .get(at..at + vx6_proto::id::NODE_ID_TEXT_LEN)?
        .parse()
        .ok()
}

/// The verifier's error for a valid key that is not the expected node.
struct WrongNodeKey(NodeId);

impl fmt::Display for WrongNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{WRONG_NODE_MARKER}{}", self.0)
    }
}

/// rustls formats `CertificateError::Other` with `Debug`, so `Debug` must
/// carry the marker and the full id too.
impl fmt::Debug for WrongNodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for WrongNodeKey {}

/// Checks raw Ed25519 keys against node ids, for servers (client side) and
/// clients (server side) alike.
#[derive(Debug)]
pub struct NodeKeyVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl NodeKeyVerifier {
    pub fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// The node id a presented raw key proves, if it is a usable Ed25519 key.
    fn presented_node(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<NodeId, rustls::Error> {
        let bad = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
        if !intermediates.is_empty() {
            return Err(bad());
        }
        let id = node_id_from_spki(end_entity.as_ref()).map_err(|_| bad())?;
        // An id that is not a point, or is of small order, names no one: any
        // party could produce signatures under it.
        match VerifyingKey::from_bytes(id.as_bytes()) {
            Ok(key) if !key.is_weak() => Ok(id),
            _ => Err(bad()),
        }
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only Ed25519 is advertised; refuse anything else before looking
        // up the algorithm so no other scheme can slip through the provider.
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        Self::presented_node(cert, &[])?;
        let spki = SubjectPublicKeyInfoDer::from(cert.as_ref());
        rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algorithms)
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("vx6 accepts TLS 1.3 only".into())
}

impl ServerCertVerifier for NodeKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expect = match server_name {
            ServerName::DnsName(name) => expect_from_server_name(name.as_ref()),
            _ => None,
        }
        .ok_or_else(|| rustls::Error::General("dialled without a vx6 server name".into()))?;
        let got = Self::presented_node(end_entity, intermediates)?;
        match expect {
            Expect::AnyKey => Ok(ServerCertVerified::assertion()),
            Expect::Node(want) if want == got => Ok(ServerCertVerified::assertion()),
            Expect::Node(_) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(WrongNodeKey(got))),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for NodeKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    /// Any usable Ed25519 key is accepted: the client's id is whatever its
    /// key proves (the TLS 1.3 CertificateVerify signature, checked next).
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::presented_node(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The client and server TLS configurations of one node key, shared by the
/// TCP and QUIC transports.
#[derive(Clone, Debug)]
pub struct TlsConfigs {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl TlsConfigs {
    pub fn new(key: &NodeKeypair) -> Result<Self> {
        let provider = Arc::new(provider());
        let certified = Arc::new(certified_key(key, &provider)?);
        let verifier = Arc::new(NodeKeyVerifier::new(&provider));
        let tls13_only = [&rustls::version::TLS13];
        let config_err = |e: rustls::Error| NetError::Config(format!("TLS setup: {e}"));

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&tls13_only)
            .map_err(config_err)?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(
                certified.clone(),
            )));
        server.alpn_protocols = vec![ALPN.to_vec()];
        // No resumption: every connection proves both keys afresh, and no
        // ticket state has to be reasoned about or bounded.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        server.max_early_data_size = 0;
        // Over TCP rustls runs the handshake and hands the traffic keys to
        // our record layer (`tcplink`); QUIC ignores this.
        server.enable_secret_extraction = true;

        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&tls13_only)
            .map_err(config_err)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(certified)));
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = Resumption::disabled();
        // The server name is the expected node id: keep it off the wire.
        client.enable_sni = false;
        client.enable_secret_extraction = true;

        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// The node key as rustls wants it: the SPKI as the (raw key) certificate and
/// the seed as PKCS#8, both built by hand so no X.509 code is involved.
/// aws-lc-rs' provider with AES-128-GCM first: TLS 1.3's mandatory suite,
/// and about a quarter cheaper per byte than AES-256-GCM, which every
/// relayed byte pays on every link. Both ends use this order, so it is what
/// they agree on; a peer offering only the others still gets them. The
/// hybrid X25519MLKEM768 group comes first so a recorded link cannot be
/// decrypted later by whoever breaks X25519; the classical groups remain
/// for a peer without it.
fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, SECP384R1, X25519, X25519MLKEM768};
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![X25519MLKEM768, X25519, SECP256R1, SECP384R1],
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
}

fn certified_key(key: &NodeKeypair, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let spki = ed25519_spki(&key.node_id());
    let seed = key.secret_bytes();
    let mut pkcs8 = Vec::with_capacity(ED25519_PKCS8_PREFIX.len() + seed.len());
    pkcs8.extend_from_slice(&ED25519_PKCS8_PREFIX);
    pkcs8.extend_from_slice(seed.as_ref());
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
        .map_err(|e| NetError::Config(format!("loading the node key into TLS: {e}")))?;
    // rustls' own consistency check parses X.509; compare the SPKIs directly.
    match signing.public_key() {
        Some(public) if public.as_ref() == spki.as_slice() => {}
        _ => {
            return Err(NetError::Config(
                "TLS key does not match the node id".into(),
            ));
        }
    }
    Ok(CertifiedKey::new(
        vec![CertificateDer::from(spki.to_vec())],
        signing,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trip_and_strictness() {
        let id = NodeKeypair::from_secret_bytes(&[9u8; 32]).node_id();
        let spki = ed25519_spki(&id);
        assert_eq!(node_id_from_spki(&spki).unwrap(), id);
        assert!(node_id_from_spki(&spki[..43]).is_err());
        let mut long = spki.to_vec();
        long.push(0);
        assert!(node_id_from_spki(&long).is_err());
        let mut other_alg = spki;
        other_alg[8] = 0x71; // Ed448's OID ends in 0x71
        assert!(node_id_from_spki(&other_alg).is_err());
        assert!(node_id_from_spki(&[]).is_err());
    }

    #[test]
    fn two_nodes_agree_on_hybrid_post_quantum_and_aes_128_gcm() {
        use rustls::pki_types::ServerName;
        let (a, b) = (NodeKeypair::generate(), NodeKeypair::generate());
        let (ca, cb) = (TlsConfigs::new(&a).unwrap(), TlsConfigs::new(&b).unwrap());
        let name = ServerName::try_from(server_name(Expect::Node(b.node_id()))).unwrap();
        let mut client = rustls::ClientConnection::new(ca.client, name).unwrap();
        let mut server = rustls::ServerConnection::new(cb.server).unwrap();
        // Pump the flights in memory until both ends finish.
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        for (group, suite) in [
            (
                client.negotiated_key_exchange_group(),
                client.negotiated_cipher_suite(),
            ),
            (
                server.negotiated_key_exchange_group(),
                server.negotiated_cipher_suite(),
            ),
        ] {
            assert_eq!(
                group.map(|g| g.name()),
                Some(rustls::NamedGroup::X25519MLKEM768)
            );
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[test]
    fn spki_matches_what_the_provider_derives() {
        // certified_key() compares our hand-built SPKI with the provider's.
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        certified_key(&NodeKeypair::generate(), &provider).unwrap();
    }

    #[test]
    fn server_names_round_trip() {
        let id = NodeKeypair::generate().node_id();
        let name = server_name(Expect::Node(id));
        assert_eq!(expect_from_server_name(&name), Some(Expect::Node(id)));
        assert_eq!(
            expect_from_server_name(&name.to_ascii_uppercase()),
            Some(Expect::Node(id))
        );
        assert_eq!(
            expect_from_server_name(&server_name(Expect::AnyKey)),
            Some(Expect::AnyKey)
        );
        assert!(ServerName::try_from(name).is_ok());
        for bad in [
            "",
            "vx6.invalid",
            ".vx6.invalid",
            "any.vx6.example",
            "x.any.vx6.invalid",
        ] {
            assert_eq!(expect_from_server_name(bad), None, "{bad}");
        }
        let mut truncated = server_name(Expect::Node(id));
        truncated.remove(0);
        assert_eq!(expect_from_server_name(&truncated), None);
    }

    #[test]
    fn wrong_node_marker_parses() {
        let id = NodeKeypair::generate().node_id();
        let err = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            WrongNodeKey(id),
        ))));
        assert_eq!(wrong_node_in(&err.to_string()), Some(id));
        assert_eq!(wrong_node_in("vx6-wrong-node:short"), None);
        assert_eq!(wrong_node_in("nothing here"), None);
    }
}
