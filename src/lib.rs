//! # maintgate
//!
//! A remote-support broker. Support engineers' tools speak HTTP `CONNECT`
//! over TLS to the broker; each customer site runs an agent that keeps one
//! outbound WebSocket to the broker, over which many tunnels are multiplexed.
//!
//! ## Layout — the map of modules
//! (see ARCHITECTURE.md for the full code map and invariants)
#![forbid(unsafe_code)]
pub mod admin;
pub mod agent;
pub mod audit;
pub mod broker;
pub mod config;
pub mod connect_info;
pub mod demo;
pub mod dest;
pub mod front;
#[doc(hidden)]
pub mod fuzz_logic;
pub mod logsafe;
pub mod logwriter;
pub mod manage;
pub mod memguard;
pub mod metrics;
pub mod mux;
pub mod pac;
pub mod policy;
pub mod registry;
pub mod secret;
pub mod store;
pub mod timefmt;
pub mod tls;
