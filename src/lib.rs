//! # maintgate
//!
//! A remote-support broker. Support engineers' tools speak HTTP `CONNECT`
//! over TLS to the broker; each customer site runs an agent that keeps one
//! outbound WebSocket to the broker, over which many tunnels are multiplexed.
//!
//! ## Layout — the map of modules
//! (see ARCHITECTURE.md for the full code map and invariants)
#![forbid(unsafe_code)]
