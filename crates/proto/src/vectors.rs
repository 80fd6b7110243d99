//! Deterministic test vectors for PROTOCOL.md, generated from the code.
