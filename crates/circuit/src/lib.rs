#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod cell;
pub mod client;
pub mod flow;
pub mod handshake;
pub mod msg;
pub mod path;
pub mod relay;
pub mod vectors;

mod error;
mod layer;

pub use cell::{
    CellBody, CellSize, Create, Created, HandshakeType, LinkCell, LinkCellKind, Reason,
};
pub use client::{ClientCircuit, HopIndex, MAX_HOPS, PendingCreate};
pub use error::{CircuitError, Result};
pub use flow::{RecvWindow, SendWindow};
pub use msg::{
    BODY_OVERHEAD, Direction, FlowScope, LARGE_DATA_MAX, RECOGNIZED_LEN, RelayMsg, SMALL_DATA_MAX,
    TAG_LEN,
};
pub use relay::{Forward, NextHop, RelayHop};

/// Builds an onion keypair from a seed, for tests and simulations that
/// run relays in memory. A node derives and stores its real onion secret
/// itself; never use a guessable seed outside tests.
pub fn onion_keypair_from_seed(
    seed: [u8; 32],
) -> (x25519_dalek::StaticSecret, vx6_proto::id::OnionKey) {
    let s = x25519_dalek::StaticSecret::from(seed);
    let pk = vx6_proto::id::OnionKey(x25519_dalek::PublicKey::from(&s).to_bytes());
    (s, pk)
}
