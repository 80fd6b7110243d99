//! The VX6 node: daemon, local state, forwarding and the control API.
//!
//! - [`home`]: the node's directory, identity file, daemon lock, atomic writes;
//! - [`config`]: config.toml and the user-curated TOML state (services, pins);
//! - [`db`]: the embedded database of what the daemon learns;
//! - [`control`]: the local control API (Unix socket, newline-delimited JSON);
//! - [`node`]: the running node (the embeddable SDK entry point).

pub mod config;
pub mod db;
pub mod home;
