//! Relay circuit decoders (PROTOCOL.md §9): link cells and the relay-side
//! state machine fed hostile cell bodies. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vx6_circuit::{CellBody, Create, LinkCell, LinkCellKind, RelayHop};

fuzz_target!(|data: &[u8]| {
    for kind in [LinkCellKind::Create, LinkCellKind::Created, LinkCellKind::Relay, LinkCellKind::Destroy] {
        let _ = LinkCell::decode(kind, data);
    }
    // A relay hop with a fixed key must reject (never panic on) any body.
    let (secret, _) = vx6_circuit::onion_keypair_from_seed([7; 32]);
    let me = vx6_proto::NodeId::from_bytes([9; 32]);
    let mut rng = |b: &mut [u8]| b.fill(3);
    let Some(split) = data.first().map(|b| usize::from(*b) % 35) else { return };
    let mut ck = [0u8; 34];
    ck[1] = 1;
    if let Some(x) = data.get(1..1 + split.min(32)) {
        ck[2..2 + x.len()].copy_from_slice(x);
    }
    if let Ok(create) = Create::decode(&ck)
        && let Ok((mut hop, _)) = RelayHop::handle_create(&secret, &me, &create, &mut rng)
        && let Ok(body) = CellBody::from_slice(data.get(1..).unwrap_or(&[]))
    {
        let _ = hop.handle_forward(body.clone());
        let _ = hop.handle_backward(body);
    }
});
