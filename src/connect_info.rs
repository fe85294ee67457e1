//! `connect-info`: ready-to-paste instructions for reaching one destination
//! through the broker with the tools support engineers already use (ssh,
//! PuTTY, plink, RDP through `proxytunnel --standalone`, browsers, curl).
//!
//! Pure: [`render`] turns a [`ConnectRequest`] and the broker's public
//! address ([`BrokerInfo`]) into a [`ConnectInfo`], which prints as text
//! ([`ConnectInfo::to_text`]) or serialises to JSON with the same content.
//!
//! ## Credentials
//! No command carries a password. Every proxytunnel command leaves out
//! `-P`, so proxytunnel reads the proxy account from the `PROXYUSER` and
//! `PROXYPASS` environment variables (see `man proxytunnel`, ENVIRONMENT);
//! unlike `-P user:pass` this also keeps the password out of `ps` and allows
//! any character in it. curl reads the same variables through the shell.
//! Only the PuTTY GUI uses `-P %user:%pass`: PuTTY fills in the user name
//! from its proxy settings and, with the password field left empty, asks
//! for the password when connecting (PuTTY 0.77 and later). The only other
//! placeholders are [`USER_PLACEHOLDER`] and [`PASS_PLACEHOLDER`] in the
//! lines that set the variables.
//!
//! ## Quoting
//! Host names, the domain and the proxy host are validated to
//! `[a-z0-9._-]`, so they need no quoting anywhere. The fixed parts are
//! quoted for the consumer that reads them:
//! - POSIX shell: single quotes; `~` is left for the shell OpenSSH and
//!   PuTTY run the proxy command with (`$SHELL -c` / `/bin/sh -c`).
//! - Win32-OpenSSH runs `ProxyCommand` without a shell, with
//!   `CreateProcess`; the executable must be an absolute path, and a path
//!   with spaces is quoted with `"` (a leading `"` is passed through as is).
//! - `cmd.exe` lines are quoted with the MSVC runtime's argv rules
//!   (`\"` inside `"…"`), which both `ssh.exe` and `plink.exe` use. They
//!   carry the literal destination rather than `%h`/`%host`, which `cmd.exe`
//!   could expand as variables.
//! - PuTTY interprets backslash escapes (`\t` in `C:\tools`!) and `%`
//!   in its local proxy command, so Windows paths there have `\\`.
//! - proxytunnel on Windows is a Cygwin program; it gets the CA path with
//!   forward slashes.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::dest::{self, DestError, Destination};

/// Where the Windows commands expect proxytunnel.
pub const PROXYTUNNEL_WINDOWS: &str = r"C:\Program Files\proxytunnel\proxytunnel.exe";
/// Where the Windows commands expect the broker's CA (forward slashes: the
/// path is read by the Cygwin build of proxytunnel).
pub const CA_WINDOWS: &str = "C:/Program Files/proxytunnel/ca.pem";
/// Where the Linux/macOS commands expect the broker's CA (expanded by the
/// shell that runs the command).
pub const CA_LINUX: &str = "~/.maint/ca.pem";
/// Placeholder for the proxy account's user name.
pub const USER_PLACEHOLDER: &str = "YOUR-PROXY-USER";
/// Placeholder for the proxy account's password (Windows `set` line only;
/// the Linux line reads it from the terminal).
pub const PASS_PLACEHOLDER: &str = "YOUR-PROXY-PASSWORD";
/// Environment variable proxytunnel reads the proxy user from.
pub const USER_ENV: &str = "PROXYUSER";
/// Environment variable proxytunnel reads the proxy password from.
pub const PASS_ENV: &str = "PROXYPASS";
/// The login user on the target in the ssh examples.
pub const SSH_LOGIN: &str = "root";
/// The local port of the RDP tunnel in the examples; any free port works.
pub const RDP_LOCAL_PORT: u16 = 13389;
/// Service port when `--port` is not given (ssh, PuTTY, plink).
pub const DEFAULT_PORT: u16 = 22;
/// RDP port when `--port` is not given.
pub const RDP_PORT: u16 = 3389;
/// HTTPS port for curl when `--port` is not given.
pub const HTTPS_PORT: u16 = 443;
/// The broker port when nothing else is configured.
pub const DEFAULT_PROXY_PORT: u16 = 6443;

/// What the engineer wants to reach.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectRequest {
    /// Customer id: ASCII letters and digits.
    pub customer: String,
    /// Named system; `None` means the customer's primary system.
    pub system: Option<String>,
    /// Co-located server behind the system; `None` means the system itself.
    pub ip: Option<Ipv4Addr>,
    /// Service port. `None`: 22 for ssh/PuTTY/plink, 3389 for RDP, 443 for
    /// curl.
    pub port: Option<u16>,
}

/// How clients reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    /// The maint domain, e.g. `maint.example.com`.
    pub domain: String,
    /// Host name or IPv4 address clients connect to; usually the domain.
    pub proxy_host: String,
    /// The broker's public port (the one the PAC file names).
    pub proxy_port: u16,
}

impl BrokerInfo {
    /// A broker reached at its own domain name on `proxy_port`.
    #[must_use]
    pub fn new(domain: &str, proxy_port: u16) -> BrokerInfo {
        BrokerInfo {
            domain: domain.to_string(),
            proxy_host: domain.to_string(),
            proxy_port,
        }
    }
}

/// Why no instructions can be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectInfoError {
    /// The customer id is empty, too long, or not letters and digits.
    #[error("customer id {0:?} must be 1 to 64 ASCII letters and digits")]
    BadCustomer(String),
    /// The system name breaks the destination grammar.
    #[error(
        "system name {0:?} must be 1 to 63 ASCII letters, digits, '-' or '_', \
         without a leading, trailing or doubled '-'"
    )]
    BadSystem(String),
    /// Port 0 for the service.
    #[error("port must be between 1 and 65535")]
    BadPort,
    /// The configured domain is not a DNS name.
    #[error("domain {0:?} is not a DNS name")]
    BadDomain(String),
    /// The proxy host is not a DNS name or IPv4 address.
    #[error("proxy host {0:?} is not a DNS name or IPv4 address")]
    BadProxyHost(String),
    /// Proxy port 0.
    #[error("proxy port must be between 1 and 65535")]
    BadProxyPort,
    /// The parts are valid one by one, but the host name is not (too long,
    /// or a label over 63 characters).
    #[error("{host}: {source}")]
    Destination {
        /// The host name that was built.
        host: String,
        /// What the destination grammar says about it.
        source: DestError,
    },
    /// The host name would be read back as a different destination.
    #[error("{0} would be read back as a different destination")]
    Ambiguous(String),
}

/// Everything `connect-info` prints, for humans ([`Self::to_text`]) or
/// as JSON (serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectInfo {
    /// Canonical destination host, e.g. `1234-ipo2.maint.example.com`.
    pub host: String,
    /// Service port used by the ssh, PuTTY and plink instructions.
    pub port: u16,
    /// The broker as clients reach it, and what it serves.
    pub proxy: ProxyInfo,
    /// How the commands get the proxy account.
    pub credentials: Credentials,
    /// OpenSSH on Linux/macOS and on Windows.
    pub ssh: SshInfo,
    /// PuTTY session settings.
    pub putty: PuttyInfo,
    /// plink one-liners.
    pub plink: PlinkInfo,
    /// RDP through a local `proxytunnel --standalone` listener.
    pub rdp: RdpInfo,
    /// Browser URLs (through the PAC file).
    pub browser: BrowserInfo,
    /// curl through the proxy.
    pub curl: CurlInfo,
}

/// The broker's public address and files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyInfo {
    /// Host clients connect to.
    pub host: String,
    /// Port clients connect to.
    pub port: u16,
    /// `https://<host>:<port>/proxy.pac` for browsers.
    pub pac_url: String,
    /// `https://<host>:<port>/ca.pem`, the CA proxytunnel and curl trust.
    pub ca_url: String,
    /// Where the Linux/macOS commands expect the CA.
    pub ca_path_linux: String,
    /// Where the Windows commands expect the CA.
    pub ca_path_windows: String,
    /// Downloads the CA to [`Self::ca_path_linux`].
    pub ca_download_linux: String,
}

/// The environment variables and how to set them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credentials {
    /// `PROXYUSER`.
    pub user_env: String,
    /// `PROXYPASS`.
    pub pass_env: String,
    /// bash/zsh: sets the user from the placeholder, reads the password
    /// without echo.
    pub linux: String,
    /// cmd.exe: two `set` lines with placeholders.
    pub windows: String,
}

/// OpenSSH instructions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SshInfo {
    /// POSIX shell one-liner.
    pub linux: String,
    /// A `~/.ssh/config` block for every host under the domain.
    pub config: String,
    /// The command to use with [`Self::config`].
    pub config_usage: String,
    /// cmd.exe one-liner for Win32-OpenSSH.
    pub windows: String,
}

/// PuTTY session settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PuttyInfo {
    /// Session > Host Name.
    pub host: String,
    /// Session > Port.
    pub port: u16,
    /// Connection > Proxy > Proxy type.
    pub proxy_type: String,
    /// Connection > Proxy > Proxy hostname.
    pub proxy_host: String,
    /// Connection > Proxy > Port.
    pub proxy_port: u16,
    /// Connection > Proxy > Username (a placeholder).
    pub proxy_username: String,
    /// Connection > Proxy > Password: what to do with it.
    pub proxy_password: String,
    /// Connection > Proxy > local proxy command, in PuTTY's escaping.
    pub proxy_command: String,
}

/// plink one-liners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlinkInfo {
    /// POSIX shell (putty-tools).
    pub linux: String,
    /// cmd.exe.
    pub windows: String,
}

/// RDP through a local listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RdpInfo {
    /// The RDP port on the destination.
    pub target_port: u16,
    /// The local port the RDP client connects to.
    pub local_port: u16,
    /// Why the proxytunnel version matters.
    pub warning: String,
    /// proxytunnel 1.12 or later, listening on 127.0.0.1 only.
    pub linux: String,
    /// Any proxytunnel version, 127.0.0.1 only, with socat.
    pub linux_loopback_socat: String,
    /// proxytunnel before 1.12: listens on every interface.
    pub linux_legacy: String,
    /// proxytunnel 1.12 or later on Windows, 127.0.0.1 only.
    pub windows: String,
    /// proxytunnel before 1.12 on Windows: listens on every interface.
    pub windows_legacy: String,
    /// RDP client on Linux.
    pub client_linux: String,
    /// RDP client on Windows.
    pub client_windows: String,
}

/// Browser URLs; the browser must use the PAC file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrowserInfo {
    /// The PAC URL to configure as "automatic proxy configuration URL".
    pub pac_url: String,
    /// IP Office Web Control.
    pub web_control: String,
    /// one-X Portal administration.
    pub one_x_portal: String,
    /// WebLM.
    pub weblm: String,
}

/// curl through the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CurlInfo {
    /// The port in the URL.
    pub port: u16,
    /// POSIX shell one-liner.
    pub linux: String,
}

/// Render the instructions for `req` through `broker`.
///
/// # Errors
///
/// [`ConnectInfoError`] when the customer id, system name, port, domain,
/// proxy host or proxy port is invalid, or when the host name they make
/// does not parse back, with the destination grammar, to the same
/// destination.
pub fn render(req: &ConnectRequest, broker: &BrokerInfo) -> Result<ConnectInfo, ConnectInfoError> {
    let domain = crate::config::normalize_domain(&broker.domain)
        .map_err(|_| ConnectInfoError::BadDomain(broker.domain.clone()))?;
    let proxy_host = crate::config::normalize_domain(&broker.proxy_host)
        .map_err(|_| ConnectInfoError::BadProxyHost(broker.proxy_host.clone()))?;
    if broker.proxy_port == 0 {
        return Err(ConnectInfoError::BadProxyPort);
    }
    let dest = destination(req, &domain)?;
    let host = dest.host(&domain);
    let port = dest.port;
    let proxy = format!("{proxy_host}:{}", broker.proxy_port);
    let base = format!("https://{proxy}");
    let q = Quoted::new();

    let proxy_info = ProxyInfo {
        host: proxy_host.clone(),
        port: broker.proxy_port,
        pac_url: format!("{base}/proxy.pac"),
        ca_url: format!("{base}/ca.pem"),
        ca_path_linux: CA_LINUX.into(),
        ca_path_windows: CA_WINDOWS.into(),
        ca_download_linux: format!("mkdir -p ~/.maint && curl -fsS -o {CA_LINUX} {base}/ca.pem"),
    };

    let credentials = Credentials {
        user_env: USER_ENV.into(),
        pass_env: PASS_ENV.into(),
        linux: format!(
            "export {USER_ENV}={USER_PLACEHOLDER}; printf 'Proxy password: '; \
             read -rs {PASS_ENV}; echo; export {PASS_ENV}"
        ),
        windows: format!("set {USER_ENV}={USER_PLACEHOLDER}\nset {PASS_ENV}={PASS_PLACEHOLDER}"),
    };

    // proxytunnel on Linux/macOS, up to `-d`.
    let pt_linux = format!("proxytunnel -q -E -C {CA_LINUX} -p {proxy}");
    // proxytunnel.exe as CreateProcess and Cygwin read it.
    let pt_windows = format!("{} -q -E -C {} -p {proxy}", q.exe_win, q.ca_win);

    let ssh_proxy_linux = format!("{pt_linux} -d %h:%p");
    let ssh = SshInfo {
        linux: format!(
            "ssh -o {} -p {port} {SSH_LOGIN}@{host}",
            sh_quote(&format!("ProxyCommand={ssh_proxy_linux}"))
        ),
        config: format!("Host *.{domain}\n    ProxyCommand {ssh_proxy_linux}\n"),
        config_usage: format!("ssh -p {port} {SSH_LOGIN}@{host}"),
        windows: format!(
            "ssh -o {} -p {port} {SSH_LOGIN}@{host}",
            crt_quote(&format!("ProxyCommand={pt_windows} -d {host}:{port}"))
        ),
    };

    let putty = PuttyInfo {
        host: host.clone(),
        port,
        proxy_type: "Local".into(),
        proxy_host: proxy_host.clone(),
        proxy_port: broker.proxy_port,
        proxy_username: USER_PLACEHOLDER.into(),
        proxy_password: "leave empty: PuTTY 0.77 or later asks for it when connecting".into(),
        proxy_command: format!(
            "{} -q -E -C {} -p %proxyhost:%proxyport -P %user:%pass -d %host:%port",
            q.exe_putty, q.ca_putty
        ),
    };

    let plink = PlinkInfo {
        linux: format!(
            "plink -P {port} -proxycmd {} {SSH_LOGIN}@{host}",
            sh_quote(&format!("{pt_linux} -d %host:%port"))
        ),
        windows: format!(
            "plink -P {port} -proxycmd {} {SSH_LOGIN}@{host}",
            crt_quote(&format!(
                "{} -q -E -C {} -p {proxy} -d {host}:{port}",
                q.exe_putty, q.ca_putty
            ))
        ),
    };

    let rdp_port = req.port.unwrap_or(RDP_PORT);
    let local = RDP_LOCAL_PORT;
    let rdp_dest = format!("{host}:{rdp_port}");
    let rdp = RdpInfo {
        target_port: rdp_port,
        local_port: local,
        warning: format!(
            "proxytunnel before 1.12 (check with `proxytunnel -V`) cannot listen on \
             127.0.0.1 only: `-a 127.0.0.1:{local}` makes it listen on port 127, and \
             `-a {local}` listens on every interface, so anyone who can reach this \
             computer can use the tunnel, logged in with your proxy account. With an \
             older proxytunnel use the socat line (Linux/macOS), or block inbound \
             connections to port {local} with a firewall (Windows Defender Firewall), \
             and stop the tunnel (Ctrl-C) when you are done."
        ),
        linux: format!("{pt_linux} -a 127.0.0.1:{local} -d {rdp_dest}"),
        linux_loopback_socat: format!(
            "socat TCP-LISTEN:{local},bind=127.0.0.1,reuseaddr,fork {}",
            sh_quote(&format!(
                "SYSTEM:{} -d {}",
                socat_escape(&pt_linux),
                socat_escape(&rdp_dest)
            ))
        ),
        linux_legacy: format!("{pt_linux} -a {local} -d {rdp_dest}"),
        windows: format!("{pt_windows} -a 127.0.0.1:{local} -d {rdp_dest}"),
        windows_legacy: format!("{pt_windows} -a {local} -d {rdp_dest}"),
        client_linux: format!("xfreerdp /v:127.0.0.1:{local}"),
        client_windows: format!("mstsc /v:127.0.0.1:{local}"),
    };

    let browser = BrowserInfo {
        pac_url: proxy_info.pac_url.clone(),
        web_control: format!("https://{host}:7071/login"),
        one_x_portal: format!("https://{host}:9443/onexportal-admin.html"),
        weblm: format!("https://{host}:52233/WebLM/index.jsp"),
    };

    let curl_port = req.port.unwrap_or(HTTPS_PORT);
    let curl = CurlInfo {
        port: curl_port,
        linux: format!(
            "curl --proxy {base} --proxy-user \"${USER_ENV}:${PASS_ENV}\" \
             --proxy-cacert {CA_LINUX} https://{host}:{curl_port}/"
        ),
    };

    Ok(ConnectInfo {
        host,
        port,
        proxy: proxy_info,
        credentials,
        ssh,
        putty,
        plink,
        rdp,
        browser,
        curl,
    })
}

/// Builds the destination from the request's parts and checks it with the
/// destination grammar: the parts one by one (for a clear message), then
/// the whole host name, which must parse back to the same parts.
fn destination(req: &ConnectRequest, domain: &str) -> Result<Destination, ConnectInfoError> {
    let customer = req.customer.to_ascii_lowercase();
    let customer_ok = !customer.is_empty()
        && customer.len() <= dest::MAX_CUSTOMER_LEN
        && customer.bytes().all(|b| b.is_ascii_alphanumeric());
    if !customer_ok {
        return Err(ConnectInfoError::BadCustomer(req.customer.clone()));
    }
    let system = match &req.system {
        None => None,
        Some(s) => {
            let lower = s.to_ascii_lowercase();
            let ok = !lower.is_empty()
                && lower.len() <= dest::MAX_SYSTEM_LEN
                && lower
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !lower.starts_with('-')
                && !lower.ends_with('-')
                && !lower.contains("--");
            if !ok {
                return Err(ConnectInfoError::BadSystem(s.clone()));
            }
            Some(lower)
        }
    };
    let port = req.port.unwrap_or(DEFAULT_PORT);
    if port == 0 {
        return Err(ConnectInfoError::BadPort);
    }
    let want = Destination {
        customer,
        system,
        ip: req.ip,
        port,
    };
    let host = want.host(domain);
    let parsed = dest::parse_target(&format!("{host}:{port}"), domain).map_err(|source| {
        ConnectInfoError::Destination {
            host: host.clone(),
            source,
        }
    })?;
    if parsed != want {
        return Err(ConnectInfoError::Ambiguous(host));
    }
    Ok(want)
}

/// The fixed Windows paths, quoted once for each consumer.
struct Quoted {
    /// `"C:\Program Files\...\proxytunnel.exe"` for CreateProcess.
    exe_win: String,
    /// `"C:/Program Files/.../ca.pem"` for Cygwin's argv parser.
    ca_win: String,
    /// The exe with PuTTY's escaping (`\\`), then quoted.
    exe_putty: String,
    /// The CA with PuTTY's escaping, then quoted.
    ca_putty: String,
}

impl Quoted {
    fn new() -> Quoted {
        Quoted {
            exe_win: format!("\"{PROXYTUNNEL_WINDOWS}\""),
            ca_win: format!("\"{CA_WINDOWS}\""),
            exe_putty: format!("\"{}\"", putty_escape(PROXYTUNNEL_WINDOWS)),
            ca_putty: format!("\"{}\"", putty_escape(CA_WINDOWS)),
        }
    }
}

/// One POSIX shell word: single quotes, with `'` as `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One argument as the MSVC runtime (and PuTTY's `split_into_argv`) reads
/// it back: wrapped in `"`, with `"` as `\"` and the backslashes in front
/// of a `"` (or of the closing quote) doubled.
fn crt_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    out.push('"');
    let mut backslashes = 0usize;
    for c in s.chars() {
        match c {
            '\\' => backslashes += 1,
            '"' => {
                out.extend(std::iter::repeat_n('\\', backslashes * 2 + 1));
                out.push('"');
                backslashes = 0;
            }
            _ => {
                out.extend(std::iter::repeat_n('\\', backslashes));
                out.push(c);
                backslashes = 0;
            }
        }
    }
    out.extend(std::iter::repeat_n('\\', backslashes * 2));
    out.push('"');
    out
}

/// Literal text in a PuTTY local proxy command: PuTTY reads `\` as an
/// escape (`\\`, `\t`, `\n`, `\r`, `\xHH`) and `%` as a substitution.
fn putty_escape(s: &str) -> String {
    s.replace('\\', r"\\").replace('%', "%%")
}

/// Text in a socat address parameter, where `:` and `,` separate fields
/// and `\` escapes.
fn socat_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(
            c,
            ':' | ',' | '\\' | '!' | '"' | '\'' | '(' | ')' | '[' | ']' | '{' | '}'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl ConnectInfo {
    /// The instructions as text for a terminal. Holds the same values as
    /// the JSON form.
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut t = String::new();
        let _ = self.write_text(&mut t);
        t
    }

    fn write_text(&self, t: &mut String) -> std::fmt::Result {
        let p = &self.proxy;
        let c = &self.credentials;
        writeln!(t, "Destination: {}  (port {})", self.host, self.port)?;
        writeln!(t, "Broker:      {}:{}", p.host, p.port)?;
        writeln!(t)?;
        writeln!(t, "== Proxy account ==")?;
        writeln!(
            t,
            "The commands read it from the {} and {} environment variables; no command contains a password.",
            c.user_env, c.pass_env
        )?;
        writeln!(t, "Linux/macOS (bash, zsh):")?;
        writeln!(t, "  {}", c.linux)?;
        writeln!(t, "Windows (cmd.exe):")?;
        for line in c.windows.lines() {
            writeln!(t, "  {line}")?;
        }
        writeln!(t)?;
        writeln!(t, "== Broker CA certificate ==")?;
        writeln!(t, "URL: {}", p.ca_url)?;
        writeln!(
            t,
            "Linux/macOS: {}   Windows: {}",
            p.ca_path_linux, p.ca_path_windows
        )?;
        writeln!(t, "  {}", p.ca_download_linux)?;
        writeln!(
            t,
            "  (If the broker uses its own CA, get ca.pem from your operator or check its fingerprint with them.)"
        )?;
        writeln!(t)?;
        writeln!(t, "== SSH / SFTP ==")?;
        writeln!(t, "Linux/macOS:")?;
        writeln!(t, "  {}", self.ssh.linux)?;
        writeln!(
            t,
            "~/.ssh/config (once, for every system under this broker):"
        )?;
        for line in self.ssh.config.lines() {
            writeln!(t, "  {line}")?;
        }
        writeln!(t, "then:")?;
        writeln!(t, "  {}", self.ssh.config_usage)?;
        writeln!(t, "Windows OpenSSH (cmd.exe):")?;
        writeln!(t, "  {}", self.ssh.windows)?;
        writeln!(
            t,
            "Replace {SSH_LOGIN} with your login on the system; sftp and scp take the same -o option."
        )?;
        writeln!(t)?;
        let pu = &self.putty;
        writeln!(t, "== PuTTY ==")?;
        writeln!(t, "Session: Host Name {}  Port {}  (SSH)", pu.host, pu.port)?;
        writeln!(
            t,
            "Connection > Proxy: Proxy type {}  Proxy hostname {}  Port {}",
            pu.proxy_type, pu.proxy_host, pu.proxy_port
        )?;
        writeln!(t, "  Username: {}", pu.proxy_username)?;
        writeln!(t, "  Password: {}", pu.proxy_password)?;
        writeln!(t, "  Local proxy command:")?;
        writeln!(t, "  {}", pu.proxy_command)?;
        writeln!(t)?;
        writeln!(t, "== plink ==")?;
        writeln!(t, "Linux/macOS:")?;
        writeln!(t, "  {}", self.plink.linux)?;
        writeln!(t, "Windows (cmd.exe):")?;
        writeln!(t, "  {}", self.plink.windows)?;
        writeln!(t)?;
        let r = &self.rdp;
        writeln!(
            t,
            "== RDP (port {} through local port {}) ==",
            r.target_port, r.local_port
        )?;
        writeln!(t, "WARNING: {}", r.warning)?;
        writeln!(t, "Linux/macOS, proxytunnel 1.12 or later:")?;
        writeln!(t, "  {}", r.linux)?;
        writeln!(
            t,
            "Linux/macOS, any proxytunnel (listens on 127.0.0.1 only):"
        )?;
        writeln!(t, "  {}", r.linux_loopback_socat)?;
        writeln!(
            t,
            "Linux/macOS, proxytunnel before 1.12 (listens on EVERY interface):"
        )?;
        writeln!(t, "  {}", r.linux_legacy)?;
        writeln!(t, "Windows (cmd.exe), proxytunnel 1.12 or later:")?;
        writeln!(t, "  {}", r.windows)?;
        writeln!(
            t,
            "Windows (cmd.exe), proxytunnel before 1.12 (listens on EVERY interface):"
        )?;
        writeln!(t, "  {}", r.windows_legacy)?;
        writeln!(t, "Then connect the RDP client to the local port:")?;
        writeln!(t, "  {}", r.client_windows)?;
        writeln!(t, "  {}", r.client_linux)?;
        writeln!(t)?;
        let b = &self.browser;
        writeln!(t, "== Browser ==")?;
        writeln!(t, "Automatic proxy configuration URL (PAC): {}", b.pac_url)?;
        writeln!(t, "The browser asks for the proxy account once.")?;
        writeln!(t, "  Web Control:  {}", b.web_control)?;
        writeln!(t, "  one-X Portal: {}", b.one_x_portal)?;
        writeln!(t, "  WebLM:        {}", b.weblm)?;
        writeln!(t)?;
        writeln!(t, "== curl (port {}) ==", self.curl.port)?;
        writeln!(t, "  {}", self.curl.linux)?;
        writeln!(
            t,
            "  (Add --cacert FILE, or -k, if the system's own certificate is self-signed.)"
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker() -> BrokerInfo {
        BrokerInfo::new("maint.example.com", 6443)
    }

    fn req(
        customer: &str,
        system: Option<&str>,
        ip: Option<[u8; 4]>,
        port: Option<u16>,
    ) -> ConnectRequest {
        ConnectRequest {
            customer: customer.into(),
            system: system.map(str::to_string),
            ip: ip.map(Ipv4Addr::from),
            port,
        }
    }

    fn info(r: &ConnectRequest) -> ConnectInfo {
        render(r, &broker()).expect("renders")
    }

    /// MSVC runtime argv splitting (the documented rules, as in
    /// `CommandLineToArgvW` for arguments after the first).
    fn crt_split(line: &str) -> Vec<String> {
        let mut args = Vec::new();
        let mut cur = String::new();
        let mut in_arg = false;
        let mut quoted = false;
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '\\' {
                let mut n = 0;
                while i < chars.len() && chars[i] == '\\' {
                    n += 1;
                    i += 1;
                }
                in_arg = true;
                if i < chars.len() && chars[i] == '"' {
                    cur.extend(std::iter::repeat_n('\\', n / 2));
                    if n % 2 == 1 {
                        cur.push('"');
                        i += 1;
                    }
                } else {
                    cur.extend(std::iter::repeat_n('\\', n));
                }
                continue;
            }
            if c == '"' {
                quoted = !quoted;
                in_arg = true;
            } else if (c == ' ' || c == '\t') && !quoted {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            } else {
                cur.push(c);
                in_arg = true;
            }
            i += 1;
        }
        if in_arg {
            args.push(cur);
        }
        args
    }

    /// PuTTY's local proxy command processing: backslash escapes and
    /// `%%`; the `%host`-style keywords are left in place.
    fn putty_unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\\' => match it.next() {
                    Some('\\') => out.push('\\'),
                    Some('%') => out.push('%'),
                    Some('t') => out.push('\t'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some(other) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => out.push('\\'),
                },
                '%' if it.peek() == Some(&'%') => {
                    it.next();
                    out.push('%');
                }
                _ => out.push(c),
            }
        }
        out
    }

    #[test]
    fn host_forms_follow_the_grammar() {
        let cases = [
            (req("1234", None, None, None), "1234.maint.example.com", 22),
            (
                req("1234", Some("IPO2"), None, Some(7071)),
                "1234-ipo2.maint.example.com",
                7071,
            ),
            (
                req("1234", None, Some([10, 0, 0, 5]), Some(3389)),
                "1234-10.0.0.5.maint.example.com",
                3389,
            ),
            (
                req("AB12", Some("ipo_2-x"), Some([10, 0, 0, 5]), Some(22)),
                "ab12-ipo_2-x-10.0.0.5.maint.example.com",
                22,
            ),
        ];
        for (r, host, port) in &cases {
            let i = info(r);
            assert_eq!(&i.host, host);
            assert_eq!(i.port, *port);
            assert!(
                i.ssh.linux.ends_with(&format!("-p {port} root@{host}")),
                "{}",
                i.ssh.linux
            );
        }
    }

    #[test]
    fn bad_inputs_are_refused_with_a_clear_error() {
        use ConnectInfoError as E;
        let b = broker();
        type Check = fn(&E) -> bool;
        let cases: Vec<(ConnectRequest, Check)> = vec![
            (req("", None, None, None), |e| {
                matches!(e, E::BadCustomer(_))
            }),
            (req("12_34", None, None, None), |e| {
                matches!(e, E::BadCustomer(_))
            }),
            (req("12 34", None, None, None), |e| {
                matches!(e, E::BadCustomer(_))
            }),
            (req("1234;rm", None, None, None), |e| {
                matches!(e, E::BadCustomer(_))
            }),
            (req(&"a".repeat(65), None, None, None), |e| {
                matches!(e, E::BadCustomer(_))
            }),
            (req("1234", Some(""), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", Some("a.b"), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", Some("-x"), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", Some("x-"), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", Some("a--b"), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", Some("a'b"), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", Some("ä"), None, None), |e| {
                matches!(e, E::BadSystem(_))
            }),
            (req("1234", None, None, Some(0)), |e| {
                matches!(e, E::BadPort)
            }),
            // Valid parts, but one label over 63 characters.
            (req("1234", Some(&"s".repeat(60)), None, None), |e| {
                matches!(
                    e,
                    E::Destination {
                        source: DestError::LabelTooLong,
                        ..
                    }
                )
            }),
        ];
        for (r, want) in &cases {
            let err = render(r, &b).expect_err("must be refused");
            assert!(want(&err), "{r:?}: {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let mut bad = broker();
        bad.domain = "maint..example.com".into();
        assert!(matches!(
            render(&req("1", None, None, None), &bad),
            Err(E::BadDomain(_))
        ));
        let mut bad = broker();
        bad.proxy_host = "proxy host".into();
        assert!(matches!(
            render(&req("1", None, None, None), &bad),
            Err(E::BadProxyHost(_))
        ));
        let mut bad = broker();
        bad.proxy_port = 0;
        assert!(matches!(
            render(&req("1", None, None, None), &bad),
            Err(E::BadProxyPort)
        ));
    }

    #[test]
    fn rust_ipv4_parsing_is_strict() {
        // The CLI parses --ip with `Ipv4Addr::from_str`; it must refuse the
        // forms the destination grammar refuses.
        for bad in [
            "127.1",
            "0x7f.0.0.1",
            "010.0.0.1",
            "1.2.3.256",
            "1.2.3.4.5",
            " 1.2.3.4",
        ] {
            assert!(bad.parse::<Ipv4Addr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn linux_ssh_matches_the_template() {
        let i = info(&req("1234", Some("web01"), None, None));
        assert_eq!(
            i.ssh.linux,
            "ssh -o 'ProxyCommand=proxytunnel -q -E -C ~/.maint/ca.pem -p maint.example.com:6443 -d %h:%p' -p 22 root@1234-web01.maint.example.com"
        );
        assert_eq!(
            i.ssh.config,
            "Host *.maint.example.com\n    ProxyCommand proxytunnel -q -E -C ~/.maint/ca.pem -p maint.example.com:6443 -d %h:%p\n"
        );
        assert_eq!(
            i.ssh.config_usage,
            "ssh -p 22 root@1234-web01.maint.example.com"
        );
    }

    #[test]
    fn windows_ssh_quotes_the_absolute_exe_path() {
        let i = info(&req("1234", Some("web01"), None, None));
        assert_eq!(
            i.ssh.windows,
            r#"ssh -o "ProxyCommand=\"C:\Program Files\proxytunnel\proxytunnel.exe\" -q -E -C \"C:/Program Files/proxytunnel/ca.pem\" -p maint.example.com:6443 -d 1234-web01.maint.example.com:22" -p 22 root@1234-web01.maint.example.com"#
        );
        // What ssh.exe gets in argv, and what Win32-OpenSSH then passes to
        // CreateProcess (the value after `ProxyCommand=`, as is).
        let argv = crt_split(&i.ssh.windows);
        assert_eq!(argv.len(), 6, "{argv:?}");
        assert_eq!(
            argv[2],
            r#"ProxyCommand="C:\Program Files\proxytunnel\proxytunnel.exe" -q -E -C "C:/Program Files/proxytunnel/ca.pem" -p maint.example.com:6443 -d 1234-web01.maint.example.com:22"#
        );
        let cmdline = argv[2].strip_prefix("ProxyCommand=").unwrap();
        let child = crt_split(cmdline);
        assert_eq!(child[0], PROXYTUNNEL_WINDOWS);
        assert_eq!(child[4], CA_WINDOWS);
        assert!(!i.ssh.windows.contains('%'), "cmd.exe would expand %...%");
    }

    #[test]
    fn putty_command_uses_putty_escaping() {
        let i = info(&req("1234", Some("web01"), None, None));
        let pu = &i.putty;
        assert_eq!(pu.host, "1234-web01.maint.example.com");
        assert_eq!(pu.port, 22);
        assert_eq!(pu.proxy_type, "Local");
        assert_eq!(
            (pu.proxy_host.as_str(), pu.proxy_port),
            ("maint.example.com", 6443)
        );
        assert_eq!(
            pu.proxy_command,
            r#""C:\\Program Files\\proxytunnel\\proxytunnel.exe" -q -E -C "C:/Program Files/proxytunnel/ca.pem" -p %proxyhost:%proxyport -P %user:%pass -d %host:%port"#
        );
        // After PuTTY's unescaping, the path is the real one, with no tab
        // or other escape left in it.
        let cmd = putty_unescape(&pu.proxy_command);
        assert!(
            cmd.starts_with(&format!("\"{PROXYTUNNEL_WINDOWS}\" ")),
            "{cmd}"
        );
        assert!(!cmd.contains('\t'));
        // A path with `\t` would have become a tab without the escaping.
        assert_eq!(
            putty_unescape(&putty_escape(r"C:\tools\50%\x")),
            r"C:\tools\50%\x"
        );
    }

    #[test]
    fn plink_lines() {
        let i = info(&req("1234", None, Some([10, 0, 0, 5]), Some(22)));
        assert_eq!(
            i.plink.linux,
            "plink -P 22 -proxycmd 'proxytunnel -q -E -C ~/.maint/ca.pem -p maint.example.com:6443 -d %host:%port' root@1234-10.0.0.5.maint.example.com"
        );
        let argv = crt_split(&i.plink.windows);
        assert_eq!(argv[0], "plink");
        assert_eq!(argv[3], "-proxycmd");
        assert_eq!(
            putty_unescape(&argv[4]),
            r#""C:\Program Files\proxytunnel\proxytunnel.exe" -q -E -C "C:/Program Files/proxytunnel/ca.pem" -p maint.example.com:6443 -d 1234-10.0.0.5.maint.example.com:22"#
        );
        assert_eq!(argv[5], "root@1234-10.0.0.5.maint.example.com");
        assert!(!i.plink.windows.contains('%'));
    }

    #[test]
    fn rdp_lines_and_warning() {
        let i = info(&req("1234", Some("win01"), None, None));
        let r = &i.rdp;
        assert_eq!(r.target_port, 3389);
        assert_eq!(
            r.linux,
            "proxytunnel -q -E -C ~/.maint/ca.pem -p maint.example.com:6443 -a 127.0.0.1:13389 -d 1234-win01.maint.example.com:3389"
        );
        assert_eq!(
            r.linux_legacy,
            "proxytunnel -q -E -C ~/.maint/ca.pem -p maint.example.com:6443 -a 13389 -d 1234-win01.maint.example.com:3389"
        );
        assert_eq!(
            r.linux_loopback_socat,
            r"socat TCP-LISTEN:13389,bind=127.0.0.1,reuseaddr,fork 'SYSTEM:proxytunnel -q -E -C ~/.maint/ca.pem -p maint.example.com\:6443 -d 1234-win01.maint.example.com\:3389'"
        );
        assert!(r
            .windows
            .starts_with(r#""C:\Program Files\proxytunnel\proxytunnel.exe" "#));
        assert!(r.windows.contains(" -a 127.0.0.1:13389 "));
        assert!(r.windows_legacy.contains(" -a 13389 "));
        assert_eq!(r.client_windows, "mstsc /v:127.0.0.1:13389");
        for needle in ["1.12", "every interface", "port 127", "socat", "firewall"] {
            assert!(r.warning.contains(needle), "warning lacks {needle:?}");
        }
        // With --port, RDP and curl use it too.
        let i = info(&req("1234", Some("win01"), None, Some(33890)));
        assert!(i.rdp.linux.ends_with(":33890"));
        assert_eq!(i.curl.port, 33890);
    }

    #[test]
    fn browser_pac_ca_and_curl() {
        let i = info(&req("1234", Some("ipo2"), None, None));
        assert_eq!(
            i.browser.web_control,
            "https://1234-ipo2.maint.example.com:7071/login"
        );
        assert_eq!(
            i.browser.one_x_portal,
            "https://1234-ipo2.maint.example.com:9443/onexportal-admin.html"
        );
        assert_eq!(
            i.browser.weblm,
            "https://1234-ipo2.maint.example.com:52233/WebLM/index.jsp"
        );
        assert_eq!(
            i.browser.pac_url,
            "https://maint.example.com:6443/proxy.pac"
        );
        assert_eq!(i.proxy.ca_url, "https://maint.example.com:6443/ca.pem");
        assert_eq!(
            i.curl.linux,
            r#"curl --proxy https://maint.example.com:6443 --proxy-user "$PROXYUSER:$PROXYPASS" --proxy-cacert ~/.maint/ca.pem https://1234-ipo2.maint.example.com:443/"#
        );
    }

    #[test]
    fn separate_proxy_host() {
        let b = BrokerInfo {
            domain: "Maint.Test.".into(),
            proxy_host: "127.0.0.1".into(),
            proxy_port: 40123,
        };
        let i = render(&req("1234", None, None, None), &b).unwrap();
        assert_eq!(i.host, "1234.maint.test");
        assert!(i.ssh.linux.contains(" -p 127.0.0.1:40123 "));
        assert!(i.ssh.config.starts_with("Host *.maint.test\n"));
        assert_eq!(i.browser.pac_url, "https://127.0.0.1:40123/proxy.pac");
    }

    #[test]
    fn no_password_only_placeholders_and_env() {
        let i = info(&req("1234", Some("ipo2"), None, None));
        let json = serde_json::to_string(&i).unwrap();
        let text = i.to_text();
        for out in [&json, &text] {
            // proxytunnel's -P only in the PuTTY GUI command, with PuTTY's
            // placeholders.
            assert_eq!(out.matches(" -P %user:%pass ").count(), 1, "{out}");
            assert!(!out.contains("-P USER"), "{out}");
            assert!(!out.contains("--proxy-user USER"), "{out}");
            assert!(out.contains(USER_PLACEHOLDER));
        }
        // Every proxytunnel invocation but PuTTY's relies on the env vars.
        for cmd in [
            &i.ssh.linux,
            &i.ssh.config,
            &i.ssh.windows,
            &i.plink.linux,
            &i.plink.windows,
            &i.rdp.linux,
            &i.rdp.linux_legacy,
            &i.rdp.linux_loopback_socat,
            &i.rdp.windows,
            &i.rdp.windows_legacy,
        ] {
            // (plink's own `-P` is its port option, before the proxy
            // command.)
            let at = cmd.find("proxytunnel").expect("runs proxytunnel");
            assert!(!cmd[at..].contains(" -P "), "{cmd}");
            assert!(
                !cmd.contains("-z"),
                "never disable certificate checks: {cmd}"
            );
            assert!(!cmd.contains(" -X"), "-X is not a general flag: {cmd}");
        }
        assert!(i.credentials.linux.contains("read -rs PROXYPASS"));
        assert!(i.credentials.windows.contains(PASS_PLACEHOLDER));
    }

    #[test]
    fn text_and_json_hold_the_same_values() {
        let i = info(&req("1234", Some("ipo2"), Some([10, 0, 0, 5]), Some(22)));
        let text = i.to_text();
        let json = serde_json::to_value(&i).unwrap();
        let mut leaves = Vec::new();
        collect_leaves(&json, &mut leaves);
        assert!(leaves.len() > 30, "{leaves:?}");
        for leaf in &leaves {
            for line in leaf.lines() {
                assert!(text.contains(line.trim()), "text lacks {line:?}:\n{text}");
            }
        }
    }

    fn collect_leaves(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => m.values().for_each(|v| collect_leaves(v, out)),
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect_leaves(v, out)),
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Number(n) => out.push(n.to_string()),
            other => out.push(other.to_string()),
        }
    }

    #[test]
    fn crt_quote_round_trips() {
        for s in [
            "plain",
            "with space",
            r#"a"b"#,
            r"trailing\",
            r#"back\"quote"#,
            r"C:\Program Files\x\",
            r#""quoted" and \\"#,
            "",
        ] {
            let line = format!("prog {}", crt_quote(s));
            assert_eq!(
                crt_split(&line),
                vec!["prog".to_string(), s.to_string()],
                "{s:?} -> {line}"
            );
        }
    }

    #[test]
    fn sh_quote_handles_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(sh_quote("%h:%p ~"), "'%h:%p ~'");
    }
}
