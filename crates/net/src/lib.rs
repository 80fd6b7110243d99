#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
//! VX6 transports and the link multiplexer.
//!
//! Owns everything between a socket and a stream of bytes between two proven
//! node identities:
//! - [`tls`]: the one identity-binding mechanism (RFC 7250 raw Ed25519 public
//!   keys, expected node id in the server name) shared by both transports;
//! - [`transport`]: TLS 1.3 over TCP and QUIC behind one trait; over TCP,
//!   rustls runs the handshake and `tcplink`/`record` move the records;
//! - [`channel`]: the channel → circuit → stream framing with per-stream flow
//!   control over any authenticated connection; [`circuit_queue`] holds the
//!   cells it hands to circuits, within a memory budget;
//! - [`pool`]: one pooled channel per peer.
//!
//! It knows nothing of services, names, the DHT or relays.

pub mod channel;
pub mod circuit_queue;
mod error;
pub mod pool;
mod record;
mod tcplink;
pub mod tls;
pub mod transport;

pub use error::{NetError, Result};
