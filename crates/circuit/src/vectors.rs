//! The test vectors of PROTOCOL.md §9.9, made by the code that implements
//! §9.3–§9.5, so that the document cannot drift from it
//! (`crates/circuit/tests/vectors.rs` checks every `circuit-vector` line).
//!
//! Fixed inputs: the relay's onion secret is 32 bytes of `0x22`, its node id
//! 32 bytes of `0x33`; the client's ephemeral secret is 32 bytes of `0x11`,
//! the relay's 32 bytes of `0x44`.

use vx6_proto::NodeId;
use vx6_proto::link::StreamId;

use crate::client::{ClientCircuit, HopIndex};
use crate::handshake::relay_key_material;
use crate::msg::{FlowScope, RelayMsg};
use crate::relay::RelayHop;
use crate::{Result, onion_keypair_from_seed};

/// One vector: its name in the document and its bytes.
#[derive(Debug)]
pub struct Vector {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

fn fill(byte: u8) -> impl FnMut(&mut [u8]) {
    move |b: &mut [u8]| b.fill(byte)
}

/// Every vector, in the order PROTOCOL.md lists them.
pub fn generate() -> Result<Vec<Vector>> {
    let (b, onion_key) = onion_keypair_from_seed([0x22; 32]);
    let id = NodeId::from_bytes([0x33; 32]);
    let (pending, create) = ClientCircuit::begin_create(id, &onion_key, &mut fill(0x11));
    let (okm, created) = relay_key_material(&b, &id, &create, &mut fill(0x44))?;
    let (mut hop, _) = RelayHop::handle_create(&b, &id, &create, &mut fill(0x44))?;
    let mut client = pending.complete(&created)?;
    let stream = StreamId(1);
    let first = client.seal(
        HopIndex(0),
        &RelayMsg::Data {
            stream,
            data: b"hello".to_vec(),
        },
    )?;
    let second = client.seal(HopIndex(0), &RelayMsg::Sendme(FlowScope::Circuit))?;
    let back = hop.originate(&RelayMsg::Connected { stream })?;
    Ok(vec![
        Vector {
            name: "circuit-onion-key",
            bytes: onion_key.0.to_vec(),
        },
        Vector {
            name: "circuit-create",
            bytes: create.encode().to_vec(),
        },
        Vector {
            name: "circuit-created",
            bytes: created.encode().to_vec(),
        },
        Vector {
            name: "circuit-key-material",
            bytes: okm.to_vec(),
        },
        Vector {
            name: "circuit-forward-cell-0",
            bytes: first.into_vec(),
        },
        Vector {
            name: "circuit-forward-cell-1",
            bytes: second.into_vec(),
        },
        Vector {
            name: "circuit-backward-cell-0",
            bytes: back.into_vec(),
        },
    ])
}

/// Lowercase hex, as the document writes bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::{CellBody, Create};
    use crate::relay::Forward;

    #[test]
    fn vectors_are_what_the_hop_accepts() {
        let v = generate().unwrap();
        let (b, _) = onion_keypair_from_seed([0x22; 32]);
        let id = NodeId::from_bytes([0x33; 32]);
        let create = Create::decode(&v[1].bytes).unwrap();
        let (mut hop, _) = RelayHop::handle_create(&b, &id, &create, &mut fill(0x44)).unwrap();
        let cell = CellBody::from_vec(v[4].bytes.clone()).unwrap();
        assert_eq!(
            hop.handle_forward(cell).unwrap(),
            Forward::ForMe(RelayMsg::Data {
                stream: StreamId(1),
                data: b"hello".to_vec()
            })
        );
    }
}
