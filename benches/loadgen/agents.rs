//! Many agents in one process, systems to give them, and waiting on a
//! broker metric.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use maintgate::agent::config::AgentFile;
use maintgate::agent::AgentSettings;
use maintgate::secret::{self, Secret};
use maintgate::store::sqlite::SqliteStore;

use crate::modes::Out;
use crate::procfs::{round1, round3, Watch};

/// Add `count` systems `<prefix><i>` to `customer` straight in the store,
/// writing one token per line to `tokens_out`.
pub fn provision(
    data_dir: &std::path::Path,
    customer: &str,
    prefix: &str,
    count: usize,
    tokens_out: &std::path::Path,
) -> Result<Out> {
    let t0 = Instant::now();
    let store = SqliteStore::open(&maintgate::store::db_path(data_dir))
        .map_err(|e| anyhow!("opening the store: {e}"))?;
    let mut tokens = String::with_capacity(count * 50);
    for i in 0..count {
        let token = secret::generate_token();
        store
            .add_system(
                customer,
                &format!("{prefix}{i}"),
                false,
                &secret::token_hash(&token),
            )
            .map_err(|e| anyhow!("adding system {prefix}{i}: {e}"))?;
        tokens.push_str(&token);
        tokens.push('\n');
    }
    std::fs::write(tokens_out, tokens)
        .with_context(|| format!("writing {}", tokens_out.display()))?;
    let mut out = Out::new();
    out.insert("mode".into(), json!("provision"));
    out.insert("count".into(), json!(count));
    out.insert(
        "elapsed_s".into(),
        json!(round3(t0.elapsed().as_secs_f64())),
    );
    Ok(out)
}

pub struct AgentsOpts {
    pub tokens: std::path::PathBuf,
    pub broker: String,
    pub ca: std::path::PathBuf,
    pub services: Vec<u16>,
    pub count: Option<usize>,
    pub ramp_per_sec: f64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

/// Run one in-process agent (the library's reconnect loop) per token until
/// a signal.
pub async fn agents(o: AgentsOpts) -> Result<Out> {
    let text = std::fs::read_to_string(&o.tokens)
        .with_context(|| format!("reading {}", o.tokens.display()))?;
    let mut tokens: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(n) = o.count {
        if n > tokens.len() {
            bail!("{} tokens in the file, {n} asked for", tokens.len());
        }
        tokens.truncate(n);
    }
    let services = o
        .services
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let file_text = format!(
        "remote_access = true\nservices = [{services}]\nreconnect_min_ms = {}\nreconnect_max_ms = {}\n",
        o.reconnect_min_ms, o.reconnect_max_ms
    );
    let cancel = CancellationToken::new();
    let w = Watch::start(None);
    let mut tasks = Vec::with_capacity(tokens.len());
    let step = Duration::from_secs_f64(1.0 / o.ramp_per_sec.max(1.0));
    let start = tokio::time::Instant::now();
    for (i, token) in tokens.iter().enumerate() {
        let file: AgentFile = toml::from_str(&file_text)?;
        let settings = AgentSettings::from_parts(
            file,
            o.broker.clone(),
            Secret::new((*token).to_string()),
            Some(o.ca.clone()),
        )
        .map_err(|e| anyhow!("agent settings: {e}"))?;
        tasks.push(tokio::spawn(maintgate::agent::run(
            settings,
            cancel.clone(),
        )));
        tokio::time::sleep_until(start + step * (i as u32 + 1)).await;
    }
    let mut started = w.finish();
    started.insert("mode".into(), json!("agents"));
    started.insert("event".into(), json!("started"));
    started.insert("count".into(), json!(tasks.len()));
    crate::print_json(&started);

    crate::wait_for_signal().await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    let mut out = w.finish();
    out.insert("mode".into(), json!("agents"));
    out.insert("event".into(), json!("end"));
    Ok(out)
}

/// Fetch `/metrics` from the admin listener and read one sample.
async fn read_metric(addr: &str, name: &str) -> Result<f64> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("metric {name} not found"))
}

/// Poll a broker metric until it reaches `at_least` or `timeout` passes.
pub async fn metric_wait(addr: &str, name: &str, at_least: f64, timeout: f64) -> Result<Out> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(timeout);
    let mut last = None;
    let mut first_seen = None;
    loop {
        if let Ok(v) = read_metric(addr, name).await {
            if first_seen.is_none() {
                first_seen = Some(t0.elapsed().as_secs_f64());
            }
            last = Some(v);
            if v >= at_least {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = Out::new();
    out.insert("mode".into(), json!("metric"));
    out.insert("metric".into(), json!(name));
    out.insert("value".into(), json!(last));
    out.insert("reached".into(), json!(last.is_some_and(|v| v >= at_least)));
    out.insert(
        "elapsed_s".into(),
        json!(round3(t0.elapsed().as_secs_f64())),
    );
    out.insert("broker_up_s".into(), json!(first_seen.map(round3)));
    Ok(out)
}

/// CPU and RSS of processes over `seconds`.
pub async fn cpu(watch: &str, seconds: f64) -> Out {
    let w = Watch::start(Some(watch));
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let mut out = w.finish();
    out.insert("mode".into(), json!("cpu"));
    out
}

/// Turn `iperf3 -J` output into one result line.
pub fn ingest_iperf(text: &str) -> Result<Out> {
    let v: serde_json::Value = serde_json::from_str(text).context("iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let recv = &end["sum_received"];
    let bps = recv["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received"))?;
    let mut out = Out::new();
    out.insert("mode".into(), json!("iperf3"));
    out.insert("mbyte_s".into(), json!(round1(bps / 8.0 / 1e6)));
    out.insert("gbit_s".into(), json!(round3(bps / 1e9)));
    out.insert("seconds".into(), recv["seconds"].clone());
    out.insert(
        "streams".into(),
        json!(end["streams"].as_array().map_or(0, Vec::len)),
    );
    out.insert(
        "iperf_cpu".into(),
        json!({
            "host_total_pct": end["cpu_utilization_percent"]["host_total"],
            "remote_total_pct": end["cpu_utilization_percent"]["remote_total"],
        }),
    );
    Ok(out)
}
