//! `maintgate`: the thin command-line front of the library.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use maintgate::agent::{AgentOverrides, AgentSettings};
use maintgate::broker::Broker;
use maintgate::config::{read_toml, BrokerFile};
use maintgate::logwriter;
use maintgate::manage;
use maintgate::store::{self, sqlite::SqliteStore};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(Parser)]
#[command(
    name = "maintgate",
    version,
    about = "Remote-support broker and site agent"
)]
struct Cli {
    /// Config file (broker config for serve and store commands, agent
    /// config for agent).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory holding the store [default: ./data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve {
        /// Proxy/PAC/agent listener [default: 0.0.0.0:6443].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin listener [default: 127.0.0.1:7080].
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// The maint domain [default: maint.localhost].
        #[arg(long)]
        domain: Option<String>,
        /// Certificate directory [default: ./certs].
        #[arg(long)]
        certs_dir: Option<PathBuf>,
    },
    /// Run the site agent.
    Agent {
        /// wss://host:port/agent
        #[arg(long)]
        broker: Option<String>,
        /// File holding the agent token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// CA certificate to trust instead of the system roots.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Manage proxy accounts.
    #[command(subcommand)]
    Account(manage::AccountCmd),
    /// Manage customers.
    #[command(subcommand)]
    Customer(manage::CustomerCmd),
    /// Manage systems and agent tokens.
    #[command(subcommand)]
    System(manage::SystemCmd),
    /// List audit records (tunnels, refused CONNECTs, agent sessions,
    /// admin actions), oldest first.
    Audit(maintgate::audit::AuditArgs),
    /// Run a broker, an agent and demo targets in one process, with
    /// temporary data, and print commands to try.
    Demo {
        /// Proxy listener, loopback only [default: 127.0.0.1:6443, or a
        /// free port when 6443 is taken].
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Print ready-to-paste instructions for reaching a destination
    /// through the broker: ssh, PuTTY, plink, RDP, browser URLs, curl.
    /// Credentials appear only as placeholders or PROXYUSER/PROXYPASS.
    ConnectInfo {
        /// Customer id (letters and digits).
        customer: String,
        /// Named system [default: the customer's primary system].
        #[arg(long)]
        system: Option<String>,
        /// Co-located server behind the system (dotted decimal IPv4).
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Service port [default: 22 for ssh, PuTTY and plink; RDP and
        /// curl use 3389 and 443 unless this is given].
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Print JSON instead of text (same content).
        #[arg(long)]
        json: bool,
        /// The maint domain [default: from --config, else maint.localhost].
        #[arg(long)]
        domain: Option<String>,
        /// Host name clients connect to [default: the domain].
        #[arg(long)]
        proxy_host: Option<String>,
        /// Port clients connect to [default: public_port, else the listen
        /// port from --config, else 6443].
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        proxy_port: Option<u16>,
    },
}

/// Logs go to stderr through [`logwriter`]: off the runtime's workers, in
/// batches. The guard must live until the end of `main`: dropping it
/// writes out what is pending.
fn init_logs(format: LogFormat) -> Option<logwriter::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // rustls warns on every IP-literal SNI (proxytunnel sends one when
        // `-p` is an IP), which is normal for us.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = match logwriter::start(std::io::stderr(), logwriter::Limits::default()) {
        Ok((w, guard)) => (BoxMakeWriter::new(move || w.clone()), Some(guard)),
        // No thread for the writer: write from the logging thread.
        Err(_) => (BoxMakeWriter::new(std::io::stderr), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn broker_file(cli: &Cli) -> Result<BrokerFile> {
    Ok(match &cli.config {
        Some(p) => read_toml(p)?,
        None => BrokerFile::default(),
    })
}

fn data_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(d) = &cli.data_dir {
        return Ok(d.clone());
    }
    Ok(broker_file(cli)?
        .data_dir
        .unwrap_or_else(|| PathBuf::from("data")))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let _logs = init_logs(cli.log_format);
    match &cli.cmd {
        Cmd::Serve {
            listen,
            admin_listen,
            domain,
            certs_dir,
        } => {
            let mut file = broker_file(&cli)?;
            file.listen = listen.or(file.listen);
            file.admin_listen = admin_listen.or(file.admin_listen);
            file.domain = domain.clone().or(file.domain);
            file.certs_dir = certs_dir.clone().or(file.certs_dir);
            file.data_dir = cli.data_dir.clone().or(file.data_dir);
            let settings = file.into_settings()?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let broker = Broker::bind(settings).await?;
                println!("maintgate: listening on {}", broker.local_addr());
                if let Some(plain) = broker.plain_addr() {
                    println!("maintgate: plain test listener (no TLS) on {plain}");
                }
                println!(
                    "maintgate: admin API on {} (bearer token in {})",
                    broker.admin_addr(),
                    broker.state().admin_token().path().display()
                );
                // The accept loop runs on a worker, not on this thread: a
                // connection spawned from a worker starts in that worker's
                // own queue; spawned from here, every one went through the
                // shared queue and a futex wake-up of a worker.
                tokio::spawn(broker.run(shutdown_signal())).await?;
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Cmd::Agent {
            broker,
            token_file,
            ca,
        } => {
            let settings = AgentSettings::load(
                cli.config.as_deref(),
                &AgentOverrides {
                    broker: broker.clone(),
                    token_file: token_file.clone(),
                    ca: ca.clone(),
                },
            )?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let cancel = CancellationToken::new();
                let run = tokio::spawn(maintgate::agent::run(settings, cancel.clone()));
                shutdown_signal().await;
                cancel.cancel();
                let _ = run.await;
            });
        }
        Cmd::Account(cmd) => {
            let s = open_store(&cli)?;
            manage::run_account(
                cmd,
                &s,
                &mut std::io::stdin().lock(),
                &mut std::io::stdout(),
            )?;
        }
        Cmd::Customer(cmd) => {
            let s = open_store(&cli)?;
            manage::run_customer(
                cmd,
                &s,
                &mut std::io::stdin().lock(),
                &mut std::io::stdout(),
            )?;
        }
        Cmd::System(cmd) => {
            let s = open_store(&cli)?;
            manage::run_system(
                cmd,
                &s,
                &mut std::io::stdin().lock(),
                &mut std::io::stdout(),
            )?;
        }
        Cmd::Audit(args) => {
            let s = open_store(&cli)?;
            maintgate::audit::run_audit(args, &s, &mut std::io::stdout())?;
        }
        Cmd::Demo { listen } => {
            let opts = maintgate::demo::DemoOptions { listen: *listen };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(maintgate::demo::run(
                opts,
                shutdown_signal(),
                &mut std::io::stdout(),
            ))?;
        }
        Cmd::ConnectInfo {
            customer,
            system,
            ip,
            port,
            json,
            domain,
            proxy_host,
            proxy_port,
        } => {
            use maintgate::connect_info::{self, BrokerInfo, ConnectRequest};
            let mut file = broker_file(&cli)?;
            file.domain = domain.clone().or(file.domain);
            let settings = file.into_settings()?;
            let broker = BrokerInfo {
                proxy_host: proxy_host
                    .clone()
                    .unwrap_or_else(|| settings.domain.clone()),
                proxy_port: proxy_port.unwrap_or(settings.client_port(settings.listen)),
                domain: settings.domain,
            };
            let req = ConnectRequest {
                customer: customer.clone(),
                system: system.clone(),
                ip: *ip,
                port: *port,
            };
            let info = connect_info::render(&req, &broker)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
        }
    }
    Ok(())
}

fn open_store(cli: &Cli) -> Result<SqliteStore> {
    let dir = data_dir(cli)?;
    let path = store::db_path(&dir);
    SqliteStore::open(&path).with_context(|| format!("opening store {}", path.display()))
}
