//! Stream multiplexing over one WebSocket.
//!
//! - [`frame`]: the pure wire codec (fuzzed, property-tested).
//! - [`session`]: a live session: stream table, per-stream credit, fair
//!   scheduling of data between streams, keepalive.
//! - [`relay`]: pumps bytes between a local socket and one mux stream,
//!   carrying half-close and returning byte counts.

pub mod frame;
pub mod relay;
pub mod session;

pub use frame::{Frame, OpenErrCode, RstCode, Target};
pub use relay::{expiry, relay, Expiry, RelayEnd, RelayStats};
pub use session::{Incoming, Mux, MuxConfig, MuxStream, OpenError, Role, SessionEnd};

#[cfg(test)]
mod tests;
