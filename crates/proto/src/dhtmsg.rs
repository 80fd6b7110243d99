//! DHT wire messages (PROTOCOL.md §7).
