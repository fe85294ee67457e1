//! `loadgen`: the load generator for maintgate's benchmarks.
//!
//! Build with `cargo build --release --example loadgen`; `benches/run.sh`
//! drives it. Every client mode prints one JSON line of results, including
//! the CPU time the load generator itself used (from `/proc/self/stat`),
//! so a table can show it was not the bottleneck, and the CPU and RSS of
//! processes named with `--watch name=pid,...`.
//!
//! Modes:
//! - `serve --echo A --sink B --source C`: the targets.
//! - `bulk`: N streams for a fixed time; bytes checked against a pattern;
//!   MB/s.
//! - `echo`: small messages at a fixed rate, round trip p50/p99/max;
//!   with `--bulk-streams` beside bulk streams on the same path (fairness).
//! - `setup`: connect (TLS + CONNECT on the broker path) to the first
//!   echoed byte, at concurrency C; p50/p99 and rate.
//! - `hold`: open N idle tunnels, print when all are up, keep them until a
//!   signal, then check each is still alive.
//! - `agents`: N in-process site agents (the library's reconnect loop).
//! - `provision`: N systems with tokens, straight into a broker's store.
//! - `metric`: wait for a broker metric to reach a value.
//! - `cpu`: CPU and RSS of processes over a time.
//! - `ports`: free loopback ports.
//! - `ingest-iperf`: `iperf3 -J` on stdin to one result line.
//! - `report`: result lines to a markdown table.
#![forbid(unsafe_code)]

mod agents;
mod modes;
mod net;
mod procfs;
mod report;
mod serve;
mod verify;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use modes::{Dir, Out};
use net::{Dialer, PathArgs};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator for maintgate benchmarks")]
struct Cli {
    /// `key=value` added to the JSON result line (repeatable).
    #[arg(long = "tag", global = true)]
    tags: Vec<String>,
    /// Processes to report CPU and RSS for: `name=pid,name=pid`.
    #[arg(long, global = true)]
    watch: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the targets until a signal.
    Serve {
        #[arg(long)]
        echo: Option<String>,
        #[arg(long)]
        sink: Option<String>,
        #[arg(long)]
        source: Option<String>,
    },
    /// Bulk transfer over N streams.
    Bulk {
        #[command(flatten)]
        path: PathArgs,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long, value_enum, default_value_t = Dir::Down)]
        dir: Dir,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Seconds of transfer before the measurement starts.
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
    /// Round trips of small messages at a fixed rate.
    Echo {
        #[command(flatten)]
        path: PathArgs,
        /// Messages per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Bulk streams to run beside the echo on the same path.
        #[arg(long, default_value_t = 0)]
        bulk_streams: usize,
        /// Where the bulk streams go (TCP address) [default: --addr].
        #[arg(long)]
        bulk_addr: Option<String>,
        /// Their CONNECT destination [default: --connect].
        #[arg(long)]
        bulk_connect: Option<String>,
        #[arg(long, value_enum, default_value_t = Dir::Down)]
        bulk_dir: Dir,
        /// Seconds of bulk transfer before the echo measurement starts.
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
    },
    /// Connect to first echoed byte, repeatedly.
    Setup {
        #[command(flatten)]
        path: PathArgs,
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Setups before the measurement (auth cache, TLS tickets).
        #[arg(long, default_value_t = 20)]
        warmup_ops: usize,
    },
    /// Open N idle tunnels and keep them.
    Hold {
        #[command(flatten)]
        path: PathArgs,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Hold this long instead of until a signal.
        #[arg(long)]
        hold_secs: Option<f64>,
    },
    /// Run N in-process agents until a signal.
    Agents {
        /// One token per line.
        #[arg(long)]
        tokens: PathBuf,
        /// `wss://localhost:PORT/agent`.
        #[arg(long)]
        broker: String,
        #[arg(long)]
        ca: PathBuf,
        /// Ports the agents allow.
        #[arg(long, value_delimiter = ',', default_value = "22")]
        services: Vec<u16>,
        /// How many (default: every token in the file).
        #[arg(long)]
        count: Option<usize>,
        /// Agents started per second.
        #[arg(long, default_value_t = 2000.0)]
        ramp_per_sec: f64,
        #[arg(long, default_value_t = 1000)]
        reconnect_min_ms: u64,
        #[arg(long, default_value_t = 60_000)]
        reconnect_max_ms: u64,
    },
    /// Add N systems to a customer straight in the store.
    Provision {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        customer: String,
        #[arg(long, default_value = "a")]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        tokens_out: PathBuf,
    },
    /// Wait until a broker metric reaches a value.
    Metric {
        /// Admin listener, `127.0.0.1:PORT`.
        #[arg(long)]
        admin: String,
        #[arg(long, default_value = "maintgate_agents_connected")]
        name: String,
        #[arg(long, default_value_t = 1.0)]
        at_least: f64,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// CPU and RSS of the --watch processes over a time.
    Cpu {
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
    },
    /// Print N free loopback ports, one per line.
    Ports {
        #[arg(default_value_t = 1)]
        n: usize,
    },
    /// Read `iperf3 -J` output on stdin; print one result line.
    IngestIperf,
    /// Read result lines; write the markdown report.
    Report {
        /// The JSON lines file.
        input: PathBuf,
        /// Extra notes (markdown) to include.
        #[arg(long)]
        notes: Option<PathBuf>,
        /// The command line that made the results.
        #[arg(long, default_value = "benches/run.sh")]
        command: String,
    },
}

/// `--tag` values, added to every printed line.
static TAGS: std::sync::OnceLock<Vec<(String, Value)>> = std::sync::OnceLock::new();

fn parse_tags(tags: &[String]) -> Vec<(String, Value)> {
    tags.iter()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| {
            let v = v
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map_or_else(|| Value::from(v), Value::from);
            (k.to_string(), v)
        })
        .collect()
}

/// Print one JSON line (with the `--tag`s) and flush, so scripts can wait
/// for it.
pub fn print_json(out: &Out) {
    use std::io::Write;
    let mut out = out.clone();
    for (k, v) in TAGS.get().into_iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    let line = serde_json::to_string(&out).unwrap_or_else(|_| "{}".into());
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Resolve on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn with_path(p: &PathArgs, addr: Option<&String>, connect: Option<&String>) -> PathArgs {
    let mut q = p.clone();
    if let Some(a) = addr {
        q.addr = a.clone();
    }
    if let Some(c) = connect {
        q.connect = Some(c.clone());
    }
    q
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = TAGS.set(parse_tags(&cli.tags));
    let watch = cli.watch.as_deref();
    let out: Out = match cli.cmd {
        Cmd::Serve { echo, sink, source } => {
            serve::serve(echo, sink, source).await?;
            return Ok(());
        }
        Cmd::Bulk {
            path,
            streams,
            dir,
            seconds,
            warmup,
        } => modes::bulk(&Dialer::new(&path)?, streams, dir, seconds, warmup, watch).await?,
        Cmd::Echo {
            path,
            rate,
            seconds,
            size,
            bulk_streams,
            bulk_addr,
            bulk_connect,
            bulk_dir,
            warmup,
        } => {
            let d = Dialer::new(&path)?;
            let bd = Dialer::new(&with_path(&path, bulk_addr.as_ref(), bulk_connect.as_ref()))?;
            let bulk = (bulk_streams > 0).then_some((&bd, bulk_streams, bulk_dir));
            modes::echo(&d, rate, seconds, size, bulk, warmup, watch).await?
        }
        Cmd::Setup {
            path,
            count,
            concurrency,
            warmup_ops,
        } => modes::setup(&Dialer::new(&path)?, count, concurrency, warmup_ops, watch).await?,
        Cmd::Hold {
            path,
            count,
            concurrency,
            hold_secs,
        } => modes::hold(&Dialer::new(&path)?, count, concurrency, hold_secs, watch).await?,
        Cmd::Agents {
            tokens,
            broker,
            ca,
            services,
            count,
            ramp_per_sec,
            reconnect_min_ms,
            reconnect_max_ms,
        } => {
            agents::agents(agents::AgentsOpts {
                tokens,
                broker,
                ca,
                services,
                count,
                ramp_per_sec,
                reconnect_min_ms,
                reconnect_max_ms,
            })
            .await?
        }
        Cmd::Provision {
            data_dir,
            customer,
            prefix,
            count,
            tokens_out,
        } => agents::provision(&data_dir, &customer, &prefix, count, &tokens_out)?,
        Cmd::Metric {
            admin,
            name,
            at_least,
            timeout,
        } => agents::metric_wait(&admin, &name, at_least, timeout).await?,
        Cmd::Cpu { seconds } => {
            agents::cpu(watch.context("cpu needs --watch name=pid,...")?, seconds).await
        }
        Cmd::Ports { n } => {
            // Hold all listeners until every port is chosen, so the n
            // ports differ.
            let mut ls = Vec::new();
            for _ in 0..n {
                ls.push(std::net::TcpListener::bind("127.0.0.1:0")?);
            }
            for l in &ls {
                println!("{}", l.local_addr()?.port());
            }
            return Ok(());
        }
        Cmd::IngestIperf => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            agents::ingest_iperf(&text)?
        }
        Cmd::Report {
            input,
            notes,
            command,
        } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let notes = match notes {
                Some(p) => std::fs::read_to_string(&p).unwrap_or_default(),
                None => String::new(),
            };
            print!("{}", report::render(&text, &notes, &command));
            return Ok(());
        }
    };
    print_json(&out);
    Ok(())
}
