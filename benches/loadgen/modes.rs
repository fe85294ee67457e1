//! Client modes: bulk, echo (optionally beside bulk streams), setup, hold.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::net::{echo_one, Conn, Dialer};
use crate::procfs::{round1, round3, Watch};
use crate::serve::{pattern_at, Checker};

/// Which way bulk bytes flow.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Dir {
    /// Target → client (the target is a source).
    Down,
    /// Client → target (the target is a sink that checks and reports).
    Up,
}

/// A histogram of microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// p50/p90/p99/p99.9/max/mean in milliseconds, and the count.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| round3(us as f64 / 1000.0);
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": round3(h.mean() / 1000.0),
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Results of one mode run, printed as one JSON line.
pub type Out = BTreeMap<String, Value>;

// ---------------------------------------------------------------- bulk

/// Bulk streams running in the background of a measurement.
pub struct Bulk {
    counters: Vec<Arc<AtomicU64>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<StreamEnd>>>,
}

struct StreamEnd {
    bytes: u64,
    verified: bool,
}

impl Bulk {
    /// Dial `n` streams, then start them all at once.
    pub async fn start(dialer: &Dialer, n: usize, dir: Dir) -> Result<Bulk> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(dialer.dial().await.context("dialing a bulk stream")?);
        }
        let stop = CancellationToken::new();
        let mut counters = Vec::new();
        let mut tasks = Vec::new();
        for conn in conns {
            let c = Arc::new(AtomicU64::new(0));
            counters.push(c.clone());
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                match dir {
                    Dir::Down => download(conn, c, stop).await,
                    Dir::Up => upload(conn, c, stop).await,
                }
            }));
        }
        Ok(Bulk {
            counters,
            stop,
            tasks,
        })
    }

    /// Bytes moved so far, per stream.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stop every stream and check what they carried.
    pub async fn finish(self) -> (bool, usize, Option<String>) {
        self.stop.cancel();
        let mut verified = true;
        let mut errors = 0;
        let mut first = None;
        for t in self.tasks {
            match t.await {
                Ok(Ok(end)) => verified &= end.verified && end.bytes > 0,
                Ok(Err(e)) => {
                    errors += 1;
                    verified = false;
                    first.get_or_insert(format!("{e:#}"));
                }
                Err(e) => {
                    errors += 1;
                    verified = false;
                    first.get_or_insert(e.to_string());
                }
            }
        }
        (verified, errors, first)
    }
}

async fn download(
    mut conn: Conn,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<StreamEnd> {
    conn.write_all(&0u64.to_be_bytes()).await?;
    conn.flush().await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut check = Checker::new();
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break,
            r = conn.read(&mut buf) => r?,
        };
        if n == 0 {
            bail!("source closed the stream early");
        }
        check.feed(&buf[..n]);
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(StreamEnd {
        bytes: check.offset,
        verified: check.ok,
    })
}

async fn upload(
    mut conn: Conn,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<StreamEnd> {
    let mut sent = 0u64;
    loop {
        let chunk = pattern_at(sent, 64 * 1024);
        tokio::select! {
            _ = stop.cancelled() => break,
            r = conn.write_all(chunk) => r?,
        }
        sent += chunk.len() as u64;
        count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    // A write cut short by the stop may have sent a prefix of its chunk,
    // so the sink may count up to one chunk more than `sent`.
    conn.shutdown().await?;
    let mut verdict = [0u8; 9];
    let mut got = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while got < 9 {
            let n = conn.read(&mut verdict[got..]).await?;
            if n == 0 {
                bail!("no verdict from the sink");
            }
            got += n;
        }
        Ok(())
    })
    .await
    .context("waiting for the sink's verdict")??;
    let received = u64::from_be_bytes(verdict[..8].try_into().unwrap_or_default());
    let ok = verdict[8] == 1 && received >= sent && received <= sent + 64 * 1024;
    Ok(StreamEnd {
        bytes: received,
        verified: ok,
    })
}

pub async fn bulk(
    dialer: &Dialer,
    streams: usize,
    dir: Dir,
    seconds: f64,
    warmup: f64,
    watch: Option<&str>,
) -> Result<Out> {
    let b = Bulk::start(dialer, streams, dir).await?;
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let w = Watch::start(watch);
    let before = b.snapshot();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let after = b.snapshot();
    let mut out = w.finish();
    let wall = out["wall_s"].as_f64().unwrap_or(seconds);
    let per: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = per.iter().sum();
    let (verified, errors, first) = b.finish().await;
    out.insert("mode".into(), json!("bulk"));
    out.insert("dir".into(), json!(format!("{dir:?}").to_lowercase()));
    out.insert("streams".into(), json!(streams));
    out.insert("bytes".into(), json!(total));
    out.insert("mbyte_s".into(), json!(round1(total as f64 / wall / 1e6)));
    out.insert(
        "per_stream_mbyte_s".into(),
        json!(per
            .iter()
            .map(|b| round1(*b as f64 / wall / 1e6))
            .collect::<Vec<_>>()),
    );
    out.insert("verified".into(), json!(verified));
    out.insert("errors".into(), json!(errors));
    if let Some(e) = first {
        out.insert("error".into(), json!(e));
    }
    Ok(out)
}

// ---------------------------------------------------------------- echo

#[allow(clippy::too_many_arguments)]
pub async fn echo(
    dialer: &Dialer,
    rate: f64,
    seconds: f64,
    size: usize,
    bulk: Option<(&Dialer, usize, Dir)>,
    warmup: f64,
    watch: Option<&str>,
) -> Result<Out> {
    let mut conn = dialer.dial().await.context("dialing the echo stream")?;
    // Warm the path before the background load starts.
    echo_one(&mut conn).await?;
    let bg = match bulk {
        Some((d, n, dir)) if n > 0 => Some(Bulk::start(d, n, dir).await?),
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let w = Watch::start(watch);
    let before = bg.as_ref().map(Bulk::snapshot);
    let mut h = histogram();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut back = vec![0u8; size];
    let mut offset = 0u64;
    let mut mismatches = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let msg = pattern_at(offset, size);
        offset += msg.len() as u64;
        let t0 = Instant::now();
        conn.write_all(msg).await?;
        conn.read_exact(&mut back[..msg.len()])
            .await
            .context("reading the echo")?;
        h.record(micros(t0.elapsed()))?;
        if back[..msg.len()] != *msg {
            mismatches += 1;
        }
    }
    let after = bg.as_ref().map(Bulk::snapshot);
    let mut out = w.finish();
    let wall = out["wall_s"].as_f64().unwrap_or(seconds);
    out.insert("mode".into(), json!("echo"));
    out.insert("size".into(), json!(size));
    out.insert("rate".into(), json!(rate));
    out.insert("rtt".into(), latency_json(&h));
    out.insert("verified".into(), json!(mismatches == 0));
    if let (Some(b), Some(before), Some(after)) = (bg, before, after) {
        let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        let streams = after.len();
        let (verified, errors, first) = b.finish().await;
        out.insert(
            "bulk".into(),
            json!({
                "streams": streams,
                "mbyte_s": round1(total as f64 / wall / 1e6),
                "verified": verified,
                "errors": errors,
                "error": first,
            }),
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------- setup

/// One setup: connect (TLS + CONNECT on the broker path) to the first
/// echoed byte.
async fn setup_once(dialer: &Dialer) -> Result<(Conn, Duration)> {
    let t0 = Instant::now();
    let mut conn = dialer.dial().await?;
    echo_one(&mut conn).await?;
    Ok((conn, t0.elapsed()))
}

struct Ops {
    hist: Mutex<Histogram<u64>>,
    errors: AtomicUsize,
    first_error: Mutex<Option<String>>,
    next: AtomicUsize,
}

impl Ops {
    fn new() -> Arc<Ops> {
        Arc::new(Ops {
            hist: Mutex::new(histogram()),
            errors: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            next: AtomicUsize::new(0),
        })
    }
    fn error(&self, e: anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = self.first_error.lock() {
            f.get_or_insert(format!("{e:#}"));
        }
    }
}

/// Run `count` setups with `concurrency` workers; keep the connections
/// when `keep` is given.
async fn run_setups(
    dialer: &Dialer,
    count: usize,
    concurrency: usize,
    keep: Option<Arc<Mutex<Vec<Conn>>>>,
) -> Arc<Ops> {
    let ops = Ops::new();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let ops = ops.clone();
        let dialer = dialer.clone();
        let keep = keep.clone();
        workers.push(tokio::spawn(async move {
            let mut local = histogram();
            while ops.next.fetch_add(1, Ordering::Relaxed) < count {
                match setup_once(&dialer).await {
                    Ok((conn, d)) => {
                        let _ = local.record(micros(d));
                        if let Some(k) = &keep {
                            if let Ok(mut v) = k.lock() {
                                v.push(conn);
                            }
                        }
                    }
                    Err(e) => ops.error(e),
                }
            }
            if let Ok(mut h) = ops.hist.lock() {
                let _ = h.add(&local);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    ops
}

fn ops_json(out: &mut Out, ops: &Ops, wall: f64) {
    let h = ops
        .hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    out.insert("ok".into(), json!(h.len()));
    out.insert("rate_per_s".into(), json!(round1(h.len() as f64 / wall)));
    out.insert("latency".into(), latency_json(&h));
    out.insert("errors".into(), json!(ops.errors.load(Ordering::Relaxed)));
    if let Some(e) = ops.first_error.lock().ok().and_then(|f| f.clone()) {
        out.insert("error".into(), json!(e));
    }
}

pub async fn setup(
    dialer: &Dialer,
    count: usize,
    concurrency: usize,
    warmup_ops: usize,
    watch: Option<&str>,
) -> Result<Out> {
    // Warm-up: the broker's password cache, TLS tickets, code paths.
    for _ in 0..warmup_ops {
        setup_once(dialer).await.context("warm-up setup")?;
    }
    let w = Watch::start(watch);
    let ops = run_setups(dialer, count, concurrency, None).await;
    let mut out = w.finish();
    let wall = out["wall_s"].as_f64().unwrap_or(1.0);
    out.insert("mode".into(), json!("setup"));
    out.insert("count".into(), json!(count));
    out.insert("concurrency".into(), json!(concurrency));
    ops_json(&mut out, &ops, wall);
    Ok(out)
}

// ---------------------------------------------------------------- hold

pub async fn hold(
    dialer: &Dialer,
    count: usize,
    concurrency: usize,
    hold_secs: Option<f64>,
    watch: Option<&str>,
) -> Result<Out> {
    setup_once(dialer).await.context("warm-up setup")?;
    let keep = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let w = Watch::start(watch);
    let ops = run_setups(dialer, count, concurrency, Some(keep.clone())).await;
    let mut up = w.finish();
    let wall = up["wall_s"].as_f64().unwrap_or(1.0);
    up.insert("mode".into(), json!("hold"));
    up.insert("event".into(), json!("up"));
    up.insert("count".into(), json!(count));
    up.insert("concurrency".into(), json!(concurrency));
    ops_json(&mut up, &ops, wall);
    crate::print_json(&up);

    match hold_secs {
        Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
        None => crate::wait_for_signal().await,
    }

    // Are they all still there? One echoed byte on each.
    let conns = std::mem::take(&mut *keep.lock().unwrap_or_else(|p| p.into_inner()));
    let held = conns.len();
    let t0 = Instant::now();
    let alive = Arc::new(AtomicUsize::new(0));
    let dead_msg = Arc::new(Mutex::new(None::<String>));
    let mut chunks: Vec<Vec<Conn>> = (0..64).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        chunks[i % 64].push(c);
    }
    let stopped = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for chunk in chunks {
        let alive = alive.clone();
        let dead_msg = dead_msg.clone();
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            for mut c in chunk {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(5), echo_one(&mut c)).await {
                    Ok(Ok(())) => {
                        alive.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        if let Ok(mut m) = dead_msg.lock() {
                            m.get_or_insert(format!("{e:#}"));
                        }
                    }
                    Err(_) => {
                        if let Ok(mut m) = dead_msg.lock() {
                            m.get_or_insert("no echo within 5 s".into());
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut out = Out::new();
    out.insert("mode".into(), json!("hold"));
    out.insert("event".into(), json!("end"));
    out.insert("held".into(), json!(held));
    out.insert("alive".into(), json!(alive.load(Ordering::Relaxed)));
    out.insert("check_s".into(), json!(round3(t0.elapsed().as_secs_f64())));
    if let Some(m) = dead_msg.lock().ok().and_then(|m| m.clone()) {
        out.insert("dead_error".into(), json!(m));
    }
    Ok(out)
}
