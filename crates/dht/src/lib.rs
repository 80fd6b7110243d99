#![doc = include_str!("../README.md")]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod config;
pub mod contact;
pub mod engine;
pub mod error;
pub mod lookup;
pub mod ratelimit;
pub mod republish;
pub mod sim;
pub mod store;
pub mod table;
pub mod value;

#[cfg(test)]
mod testutil;

pub use config::{DhtConfig, RateLimit};
pub use contact::{Contact, RecordVerifier};
pub use engine::{CoreStats, DhtCore};
pub use error::{Error, Result};
pub use lookup::{
    Action, FoundValue, Lookup, LookupKind, LookupResult, LookupStats, ResponseHandling,
};
pub use ratelimit::{AddrPrefix, addr_prefix};
pub use republish::{RepublishItem, Republisher};
pub use store::{Admitted, RecordStore, RestoreReport, StoreStats};
pub use table::{IgnoreReason, Observed, RoutingTable};
pub use vx6_proto::dhtmsg::{DhtKey, RecordFamily, RejectReason, Request, Response};
