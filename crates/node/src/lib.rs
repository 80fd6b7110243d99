#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
//! The VX6 node: daemon, local state, discovery, forwarding and the control API.
//!
//! - [`home`]: the node's directory, identity file, daemon lock, atomic writes;
//! - [`config`]: config.toml and the user-curated TOML state (services, pins);
//! - [`db`]: the embedded database of what the daemon learns;
//! - [`control`]: the local control API (Unix socket, newline-delimited JSON);
//! - [`node`]: the running node (the embeddable SDK entry point);
//! - [`discovery`]: own records, peer sync, entry peers, name resolution;
//! - [`dht`]: the DHT driver over channels;
//! - [`forward`]: copying bytes between local sockets and streams;
//! - [`metrics`]: opt-in Prometheus text metrics.

pub mod circuits;
pub mod config;
pub mod control;
pub mod cstream;
pub mod db;
pub mod dht;
pub mod discovery;
mod error;
pub mod forward;
pub mod home;
pub mod metrics;
pub mod node;
pub mod relay;

pub use error::{NodeError, Result};
pub use node::Node;
