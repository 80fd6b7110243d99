//! The test vectors of PROTOCOL.md §9.9, made by the code that implements
//! §9.3–§9.5, so that the document cannot drift from it
//! (`crates/circuit/tests/vectors.rs` checks every `circuit-vector` line).
//!
//! A two-hop circuit with fixed inputs. Hop 1: onion secret 32 bytes `0x22`,
//! node id 32 bytes `0x33`, client ephemeral `0x11…`, relay ephemeral
//! `0x44…`. Hop 2: onion secret `0x55…`, node id `0x66…`, client ephemeral
//! `0x77…`, relay ephemeral `0x88…`.

use vx6_proto::NodeId;
use vx6_proto::link::StreamId;

use crate::client::{ClientCircuit, HopIndex};
use crate::handshake::relay_key_material;
use crate::relay::{Forward, RelayHop};
use crate::{CircuitError, Result, onion_keypair_from_seed};
use crate::{cell::CellBody, msg::FlowScope, msg::RelayMsg};

/// One vector: its name in the document and its bytes.
#[derive(Debug)]
pub struct Vector {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

fn fill(byte: u8) -> impl FnMut(&mut [u8]) {
    move |b: &mut [u8]| b.fill(byte)
}

/// The circuit behind the vectors: the client and its two hops, built,
/// plus what the build put on the wire.
pub struct Fixture {
    pub client: ClientCircuit,
    pub hop1: RelayHop,
    pub hop2: RelayHop,
    build: Vec<Vector>,
}

/// Builds the two-hop circuit of the vectors.
pub fn fixture() -> Result<Fixture> {
    let (b1, key1) = onion_keypair_from_seed([0x22; 32]);
    let id1 = NodeId::from_bytes([0x33; 32]);
    let (b2, key2) = onion_keypair_from_seed([0x55; 32]);
    let id2 = NodeId::from_bytes([0x66; 32]);

    let (pending, create) = ClientCircuit::begin_create(id1, &key1, &mut fill(0x11));
    let (okm, created) = relay_key_material(&b1, &id1, &create, &mut fill(0x44))?;
    let (mut hop1, _) = RelayHop::handle_create(&b1, &id1, &create, &mut fill(0x44))?;
    let mut client = pending.complete(&created)?;

    let extend = client.extend_to(id2, &key2, &mut fill(0x77))?;
    let Forward::ForMe(RelayMsg::Extend { create: c2, .. }) =
        hop1.handle_forward(extend.clone())?
    else {
        return Err(CircuitError::Protocol("hop 1 did not take the EXTEND"));
    };
    let (hop2, created2) = RelayHop::handle_create(&b2, &id2, &c2, &mut fill(0x88))?;
    let extended = hop1.extend_succeeded(&created2)?;
    client.open(extended.clone())?;

    let build = vec![
        Vector {
            name: "circuit-onion-key",
            bytes: key1.0.to_vec(),
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
            name: "circuit-extend-cell",
            bytes: extend.into_vec(),
        },
        Vector {
            name: "circuit-extended-cell",
            bytes: extended.into_vec(),
        },
    ];
    Ok(Fixture {
        client,
        hop1,
        hop2,
        build,
    })
}

/// The DATA message of `circuit-forward-cell`.
pub fn forward_message() -> RelayMsg {
    RelayMsg::Data {
        stream: StreamId(1),
        data: b"hello".to_vec(),
    }
}

/// Every vector, in the order PROTOCOL.md lists them.
pub fn generate() -> Result<Vec<Vector>> {
    let Fixture {
        mut client,
        mut hop1,
        mut hop2,
        mut build,
    } = fixture()?;
    let forward = client.seal(HopIndex(1), &forward_message())?;
    let back: CellBody = hop1.handle_backward(hop2.originate(&RelayMsg::Connected {
        stream: StreamId(1),
    })?)?;
    build.push(Vector {
        name: "circuit-forward-cell",
        bytes: forward.into_vec(),
    });
    client.open(back.clone())?;
    build.push(Vector {
        name: "circuit-backward-cell",
        bytes: back.into_vec(),
    });
    for _ in 0..crate::flow::CIRCUIT_SENDME_INCREMENT {
        client.open(hop1.handle_backward(hop2.originate(&forward_message())?)?)?;
    }
    build.push(Vector {
        name: "circuit-sendme-cell",
        bytes: client
            .seal(HopIndex(1), &RelayMsg::Sendme(FlowScope::Circuit))?
            .into_vec(),
    });
    Ok(build)
}

/// Lowercase hex, as the document writes bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(v: &[Vector], name: &str) -> Vec<u8> {
        v.iter().find(|x| x.name == name).unwrap().bytes.clone()
    }

    #[test]
    fn vectors_mean_what_the_document_says() {
        let v = generate().unwrap();
        // The forward cell: hop 1 removes its layer and passes it on; hop 2
        // recognizes it and opens the DATA.
        let Fixture {
            mut client,
            mut hop1,
            mut hop2,
            ..
        } = fixture().unwrap();
        let cell = CellBody::from_vec(named(&v, "circuit-forward-cell")).unwrap();
        let Forward::Next(at2) = hop1.handle_forward(cell).unwrap() else {
            panic!("hop 1 must pass the cell on")
        };
        assert_eq!(
            hop2.handle_forward(at2).unwrap(),
            Forward::ForMe(forward_message())
        );
        // The backward cell is hop 2's CONNECTED after hop 1's layer, and
        // opens at the client as such.
        let back = CellBody::from_vec(named(&v, "circuit-backward-cell")).unwrap();
        let connected = RelayMsg::Connected {
            stream: StreamId(1),
        };
        assert_eq!(
            hop1.handle_backward(hop2.originate(&connected).unwrap())
                .unwrap(),
            back
        );
        assert_eq!(
            client.open(back).unwrap(),
            (
                HopIndex(1),
                RelayMsg::Connected {
                    stream: StreamId(1)
                }
            )
        );
        // The SENDME opens at hop 2 only once hop 2 has sent 32 DATA cells,
        // and only because it echoes the tag of the 32nd (hop 2 checks).
        for _ in 0..crate::flow::CIRCUIT_SENDME_INCREMENT {
            let cell = hop2.originate(&forward_message()).unwrap();
            client.open(hop1.handle_backward(cell).unwrap()).unwrap();
        }
        let sendme = CellBody::from_vec(named(&v, "circuit-sendme-cell")).unwrap();
        let Forward::Next(at2) = hop1.handle_forward(sendme).unwrap() else {
            panic!("hop 1 must pass the SENDME on")
        };
        assert_eq!(
            hop2.handle_forward(at2).unwrap(),
            Forward::ForMe(RelayMsg::Sendme(FlowScope::Circuit))
        );
        // `recognized` is a keyed marker, never a constant: not in the
        // EXTEND that hop 1 recognizes, nor in the cell for hop 2 after hop 1
        // removed its layer (where hop 1 sees the field in the clear).
        assert_ne!(named(&v, "circuit-extend-cell")[..8], [0u8; 8]);
        assert_ne!(named(&v, "circuit-forward-cell")[..8], [0u8; 8]);
    }
}
