//! Test harness shared by the integration tests (`mod support;`).
//!
//! It does not depend on the `maintgate` library. Pieces:
//! - [`process`]: `require_tool`, `ChildGuard`, `wait_for_line`, bounded polling.
//! - [`sshd`]: a real OpenSSH sshd in inetd mode behind a harness-owned
//!   `127.0.0.1:0` listener, plus plink (.ppk key, `-hostkey` fingerprint).
//! - [`netns`]: a private network namespace with a veth pair in 10.233.0.0/16.
//! - [`targets`]: echo, HTTPS hello and sha256 sink/source servers.
//! - [`browser`]: headless Chromium with an NSS db, a DevTools client, and
//!   a connection-counting relay.
//!
//! Rules it follows: loopback and self-made namespaces only; every listener
//! binds port 0; no readiness sleeps (poll with a deadline); everything is
//! cleaned up on Drop, also when a test panics.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod netns;
pub mod process;
pub mod sshd;
pub mod stack;
pub mod targets;

pub use netns::{clean_stale_namespaces, Netns};
pub use process::{
    command, connect_with_retry, find_socket_addr, kill_group, poll_until, poll_until_async,
    require_tool, run_with_timeout, wait_for_line, within, ChildGuard, LineReader,
};
pub use sshd::Sshd;
pub use targets::{
    harness_runtime, make_pki, pattern_sha256, EchoServer, Hasher, HttpsServer, Pattern,
    SeenRequest, SinkReport, SinkServer, TestPki,
};
