//! What makes a stored value valid: the admission rules that do not depend
//! on the holder's state.
//!
//! Owns the mapping from a value's family to its record type, the key check
//! (the key must be the hash of the record's subject) and the time and
//! signature checks, each mapped to a typed [`RejectReason`]. Used by the
//! record store before admitting a value and by lookups before believing
//! one. Checks run cheapest first, so a forged record costs no signature
//! check unless its key and times are right.

use vx6_proto::dhtmsg::{DhtKey, MAX_VALUE_LEN, RecordFamily, RejectReason};
use vx6_proto::record::{NameClaim, NodeRecord, RecordBody, ServiceRecord, Signed};
use vx6_proto::{NodeId, UnixTime};

use crate::contact::{RecordVerifier, check_times};

/// What the store needs to know about a valid value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueMeta {
    /// The node that signed it (the subject for node and service records).
    pub signer: NodeId,
    pub seq: u64,
    pub expires: UnixTime,
}

/// The key a record of this family must be stored under.
pub fn key_of_node_record(r: &NodeRecord) -> DhtKey {
    DhtKey::for_node(&r.node)
}
/// See [`key_of_node_record`].
pub fn key_of_name_claim(r: &NameClaim) -> DhtKey {
    DhtKey::for_name(&r.name)
}
/// See [`key_of_node_record`].
pub fn key_of_service_record(r: &ServiceRecord) -> DhtKey {
    DhtKey::for_service(&r.node, &r.service)
}

/// The key a value of `family` belongs under, from its content (structural
/// decode only; use [`check_value`] to validate it).
pub fn key_of_value(family: RecordFamily, bytes: &[u8]) -> Result<DhtKey, RejectReason> {
    let malformed = |_| RejectReason::Malformed;
    match family {
        RecordFamily::NodeRecord => Signed::<NodeRecord>::decode(bytes)
            .map(|r| key_of_node_record(&r.body))
            .map_err(malformed),
        RecordFamily::NameClaim => Signed::<NameClaim>::decode(bytes)
            .map(|r| key_of_name_claim(&r.body))
            .map_err(malformed),
        RecordFamily::ServiceRecord => Signed::<ServiceRecord>::decode(bytes)
            .map(|r| key_of_service_record(&r.body))
            .map_err(malformed),
        RecordFamily::HiddenDescriptor => Err(RejectReason::UnsupportedFamily),
    }
}

/// Checks `bytes` as a value of `family` under `key` at `now`. With a
/// verifier, signatures it has already checked are not checked again.
pub fn check_value(
    key: &DhtKey,
    family: RecordFamily,
    bytes: &[u8],
    now: UnixTime,
    verifier: Option<&mut RecordVerifier>,
) -> Result<ValueMeta, RejectReason> {
    if bytes.len() > MAX_VALUE_LEN {
        return Err(RejectReason::TooLarge);
    }
    match family {
        RecordFamily::NodeRecord => {
            check_typed::<NodeRecord>(key, bytes, now, verifier, key_of_node_record)
        }
        RecordFamily::NameClaim => {
            check_typed::<NameClaim>(key, bytes, now, verifier, key_of_name_claim)
        }
        RecordFamily::ServiceRecord => {
            // Private services are served only by their owner to allowed
            // clients; a copy a client received must never be republished
            // where anyone could learn the service exists.
            let rec =
                Signed::<ServiceRecord>::decode(bytes).map_err(|_| RejectReason::Malformed)?;
            if rec.body.visibility != vx6_proto::record::Visibility::Public {
                return Err(RejectReason::UnsupportedFamily);
            }
            check_typed::<ServiceRecord>(key, bytes, now, verifier, key_of_service_record)
        }
        RecordFamily::HiddenDescriptor => Err(RejectReason::UnsupportedFamily),
    }
}

fn check_typed<T: RecordBody>(
    key: &DhtKey,
    bytes: &[u8],
    now: UnixTime,
    verifier: Option<&mut RecordVerifier>,
    key_of: fn(&T) -> DhtKey,
) -> Result<ValueMeta, RejectReason> {
    let rec = Signed::<T>::decode(bytes).map_err(|_| RejectReason::Malformed)?;
    if key_of(&rec.body) != *key {
        return Err(RejectReason::KeyMismatch);
    }
    check_times(&rec.body, now).map_err(reason_of)?;
    match verifier {
        Some(v) => v.verify(&rec, now),
        None => rec.verify(now).map(|_| ()),
    }
    .map_err(reason_of)?;
    Ok(ValueMeta {
        signer: rec.body.signer(),
        seq: rec.body.seq(),
        expires: rec.body.expires(),
    })
}

fn reason_of(e: vx6_proto::Error) -> RejectReason {
    use vx6_proto::Error;
    match e {
        Error::Expired => RejectReason::Expired,
        Error::FromTheFuture | Error::Invalid { .. } => RejectReason::BadLifetime,
        Error::BadSignature | Error::KeyMismatch => RejectReason::BadSignature,
        _ => RejectReason::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn every_family_checks_key_time_and_signature() {
        let k = keypair(1);
        let now = UnixTime(2000);
        let node = signed_node(&k, 1, UnixTime(1000), UnixTime(5000)).encode();
        let claim = name_claim(&k, "alice", 1, UnixTime(1000), UnixTime(5000)).encode();
        let svc = service_record(&k, "web", 1, UnixTime(1000), UnixTime(5000)).encode();
        let nk = DhtKey::for_node(&k.node_id());
        let ck = DhtKey::for_name(&name("alice"));
        let sk = DhtKey::for_service(&k.node_id(), &service("web"));
        assert_eq!(
            check_value(&nk, RecordFamily::NodeRecord, &node, now, None)
                .unwrap()
                .signer,
            k.node_id()
        );
        assert_eq!(
            check_value(&ck, RecordFamily::NameClaim, &claim, now, None)
                .unwrap()
                .seq,
            1
        );
        assert_eq!(
            check_value(&sk, RecordFamily::ServiceRecord, &svc, now, None)
                .unwrap()
                .expires,
            UnixTime(5000)
        );
        // a private service record is never admitted, even correctly signed
        let mut private = service_record(&k, "web", 2, UnixTime(1000), UnixTime(5000)).body;
        private.visibility = vx6_proto::record::Visibility::Private;
        let private = private.sign(&k).unwrap().encode();
        assert_eq!(
            check_value(&sk, RecordFamily::ServiceRecord, &private, now, None),
            Err(RejectReason::UnsupportedFamily)
        );
        // wrong key, wrong family, reserved family
        assert_eq!(
            check_value(&ck, RecordFamily::NodeRecord, &node, now, None),
            Err(RejectReason::KeyMismatch)
        );
        assert_eq!(
            check_value(&nk, RecordFamily::NameClaim, &node, now, None),
            Err(RejectReason::Malformed)
        );
        assert_eq!(
            check_value(&nk, RecordFamily::HiddenDescriptor, &node, now, None),
            Err(RejectReason::UnsupportedFamily)
        );
        assert_eq!(
            check_value(
                &nk,
                RecordFamily::NodeRecord,
                &vec![0; MAX_VALUE_LEN + 1],
                now,
                None
            ),
            Err(RejectReason::TooLarge)
        );
        // times
        assert_eq!(
            check_value(&nk, RecordFamily::NodeRecord, &node, UnixTime(5000), None),
            Err(RejectReason::Expired)
        );
        let future = signed_node(&k, 1, UnixTime(100_000), UnixTime(100_500)).encode();
        assert_eq!(
            check_value(&nk, RecordFamily::NodeRecord, &future, now, None),
            Err(RejectReason::BadLifetime)
        );
        // signature, with and without the cache
        let mut forged = name_claim(&k, "alice", 1, UnixTime(1000), UnixTime(5000));
        forged.body.seq = 9;
        let mut v = RecordVerifier::new(16);
        assert_eq!(
            check_value(
                &ck,
                RecordFamily::NameClaim,
                &forged.encode(),
                now,
                Some(&mut v)
            ),
            Err(RejectReason::BadSignature)
        );
        assert_eq!(
            check_value(&ck, RecordFamily::NameClaim, &forged.encode(), now, None),
            Err(RejectReason::BadSignature)
        );
        assert!(check_value(&ck, RecordFamily::NameClaim, &claim, now, Some(&mut v)).is_ok());
        // keys from content
        assert_eq!(key_of_value(RecordFamily::NodeRecord, &node), Ok(nk));
        assert_eq!(key_of_value(RecordFamily::NameClaim, &claim), Ok(ck));
        assert_eq!(key_of_value(RecordFamily::ServiceRecord, &svc), Ok(sk));
        assert_eq!(
            key_of_value(RecordFamily::ServiceRecord, &claim),
            Err(RejectReason::Malformed)
        );
    }
}
