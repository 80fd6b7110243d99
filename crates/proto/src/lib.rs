//! VX6 protocol core (sans-IO).
//!
//! Owns identities, names, signed records, the canonical byte encoding, wire
//! messages and the cryptography that protects them. It never touches a socket,
//! a clock or a global RNG: time is passed in as [`UnixTime`], randomness comes
//! from callers (or [`identity::fill_random`] at the edges), so every function
//! here is deterministic and fuzzable. The byte layouts are specified in
//! `docs/PROTOCOL.md`; tests cite its sections.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod bytes;
pub mod dhtmsg;
pub mod id;
pub mod identity;
pub mod link;
pub mod name;
pub mod nodemsg;
pub mod record;
pub mod vectors;

mod error;
pub use error::{Error, Result};
pub use id::NodeId;
pub use identity::{NodeKeypair, UnixTime};
