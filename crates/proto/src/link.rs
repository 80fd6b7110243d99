//! Link frames: the channel → circuit → stream framing (PROTOCOL.md §5).
