//! The targets: echo, sink and source servers, and the byte pattern that
//! bulk transfers carry and check.
//!
//! - **echo**: writes back whatever it reads.
//! - **source**: reads an 8-byte big-endian count (0 = endless), then
//!   sends that many pattern bytes and closes.
//! - **sink**: reads pattern bytes, checking them, until EOF; then writes
//!   the 8-byte count it received and one byte (1 = every byte matched).

use std::sync::OnceLock;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Period of the pattern: a prime, so it never lines up with buffer or
/// frame sizes, and a shifted, dropped or repeated chunk fails the check.
pub const PERIOD: usize = 65_521;

/// The pattern twice over, so any `PERIOD`-long window is one slice.
pub fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let one: Vec<u8> = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut two = one.clone();
        two.extend_from_slice(&one);
        two
    })
}

/// Checks a stream of bytes against the pattern.
#[derive(Debug, Default, Clone)]
pub struct Checker {
    /// Bytes seen so far.
    pub offset: u64,
    /// Whether every byte matched.
    pub ok: bool,
}

impl Checker {
    pub fn new() -> Checker {
        Checker {
            offset: 0,
            ok: true,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        let p = pattern();
        while !data.is_empty() {
            let at = (self.offset % PERIOD as u64) as usize;
            let n = data.len().min(PERIOD);
            if self.ok && data[..n] != p[at..at + n] {
                self.ok = false;
            }
            self.offset += n as u64;
            data = &data[n..];
        }
    }
}

/// The slice of pattern to send at stream offset `offset`, at most `max`.
pub fn pattern_at(offset: u64, max: usize) -> &'static [u8] {
    let at = (offset % PERIOD as u64) as usize;
    &pattern()[at..at + max.min(PERIOD)]
}

pub async fn serve(
    echo: Option<String>,
    sink: Option<String>,
    source: Option<String>,
) -> Result<()> {
    let mut tasks = Vec::new();
    for (addr, kind) in [
        (echo, Kind::Echo),
        (sink, Kind::Sink),
        (source, Kind::Source),
    ] {
        let Some(addr) = addr else { continue };
        let l = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        println!("{} {}", kind.name(), l.local_addr()?);
        tasks.push(tokio::spawn(accept_loop(l, kind)));
    }
    if tasks.is_empty() {
        anyhow::bail!("nothing to serve: give --echo, --sink and/or --source");
    }
    crate::wait_for_signal().await;
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Echo,
    Sink,
    Source,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Sink => "sink",
            Kind::Source => "source",
        }
    }
}

async fn accept_loop(l: TcpListener, kind: Kind) {
    loop {
        let (s, _) = match l.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = match kind {
                Kind::Echo => echo(s).await,
                Kind::Sink => sink(s).await,
                Kind::Source => source(s).await,
            };
        });
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    // Small to start: ten thousand idle echo connections stay cheap.
    let mut buf = vec![0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        s.write_all(&buf[..n]).await?;
        if n == buf.len() && buf.len() < 256 * 1024 {
            buf.resize(buf.len() * 4, 0);
        }
    }
}

async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut check = Checker::new();
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        check.feed(&buf[..n]);
    }
    let mut verdict = [0u8; 9];
    verdict[..8].copy_from_slice(&check.offset.to_be_bytes());
    verdict[8] = u8::from(check.ok);
    s.write_all(&verdict).await?;
    s.shutdown().await
}

async fn source(mut s: TcpStream) -> std::io::Result<()> {
    let mut req = [0u8; 8];
    s.read_exact(&mut req).await?;
    let limit = match u64::from_be_bytes(req) {
        0 => u64::MAX,
        n => n,
    };
    let mut sent = 0u64;
    while sent < limit {
        let want = (limit - sent).min(PERIOD as u64) as usize;
        let chunk = pattern_at(sent, want);
        s.write_all(chunk).await?;
        sent += chunk.len() as u64;
    }
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_accepts_the_pattern_in_any_cut_and_rejects_a_slip() {
        let mut c = Checker::new();
        let mut off = 0u64;
        for n in [1usize, 7, 4096, 65_521, 100_000, 3] {
            let mut left = n;
            while left > 0 {
                let s = pattern_at(off, left);
                c.feed(s);
                off += s.len() as u64;
                left -= s.len();
            }
        }
        assert!(c.ok);
        assert_eq!(c.offset, off);
        let mut bad = Checker::new();
        bad.feed(pattern_at(1, 100));
        assert!(!bad.ok);
    }
}
