//! The client-facing front: TLS accept, CONNECT head, auth, status mapping.

pub mod basic;
pub mod head;
pub mod auth;
pub mod conn;
pub mod status;
