//! The client-facing front: TLS accept, CONNECT head, auth, status mapping.

pub mod auth;
pub mod basic;
pub mod conn;
pub mod head;
pub mod io;
pub mod lockout;
pub mod status;
