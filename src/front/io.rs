//! A client connection's byte stream: TLS on the proxy port, or plain TCP
//! on the loopback-only test listener (`plain_test_listen`, for the
//! benchmark's "both legs plain" path).
//!
//! An enum, not a trait object: one branch per poll, no allocation, and
//! everything after the handshake (heads, tunnels, the agent link) is
//! written once for both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The stream under a [`crate::front::conn::Conn`].
// The TLS variant is the product and by far the common one; boxing it to
// shrink the rare plain variant would cost every connection an allocation.
#[allow(clippy::large_enum_variant)]
pub enum ClientIo {
    /// TLS on the proxy port.
    Tls(TlsStream<TcpStream>),
    /// Plain TCP on the loopback test listener.
    Plain(TcpStream),
}

impl ClientIo {
    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientIo::Tls(s) => s.get_ref().0,
            ClientIo::Plain(s) => s,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Tls(s) => s.is_write_vectored(),
            ClientIo::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tls(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
