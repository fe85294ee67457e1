//! Headless Chromium driven over the DevTools protocol, for browser tests.
//!
//! - [`Chromium::launch`]: Debian's `/usr/bin/chromium` with a fresh
//!   profile and a fresh `$HOME` whose NSS database (`certutil`, package
//!   `libnss3-tools`) trusts the given CA files. Chromium on Linux reads
//!   locally trusted anchors from `$HOME/.pki/nssdb` (not from the
//!   `--user-data-dir`), and that trust covers an `https://` PAC URL too.
//!   `--remote-debugging-port=0`; the `DevTools listening on ws://…` line
//!   on stderr gives the endpoint. The process group is killed on drop.
//! - [`Cdp`]: a minimal DevTools client over tokio-tungstenite: commands
//!   with bounded waits, events on a channel.
//! - [`Page`]: one page target (flattened session) with `Fetch` enabled to
//!   answer proxy `407`s (`Fetch.authRequired`) and to continue paused
//!   requests, plus `Network` events to see where a document came from
//!   (`remotePort`: the proxy's port when proxied, the server's when
//!   direct).
//! - [`ConnCounter`]: a counting TCP relay, to put in front of a server
//!   and prove whether anything connected to it.
//!
//! Every wait is bounded; nothing sleeps for readiness.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use super::process::{require_tool, run_with_timeout, ChildGuard, LineReader};
use super::targets::harness_runtime;

/// How long Chromium may take to print its DevTools endpoint.
const LAUNCH: Duration = Duration::from_secs(60);
/// Deadline of one DevTools command.
const CALL: Duration = Duration::from_secs(30);

/// What to start Chromium with.
pub struct ChromiumOptions {
    /// `--proxy-pac-url`.
    pub pac_url: String,
    /// `--host-resolver-rules`, e.g. `MAP maint.test 127.0.0.1`.
    pub host_rules: String,
    /// CA certificates (PEM files) to trust, through the NSS db.
    pub trust: Vec<PathBuf>,
}

/// A running headless Chromium; killed (with its process group) on drop.
pub struct Chromium {
    child: ChildGuard,
    stderr: LineReader,
    /// Holds `home/` (with `.pki/nssdb`) and `profile/`.
    _dir: tempfile::TempDir,
    /// The browser's DevTools WebSocket URL.
    pub ws_url: String,
    /// The command line used (for diagnostics).
    pub args: Vec<String>,
}

fn certutil(args: &[&str]) {
    let out = run_with_timeout(
        Command::new(require_tool("certutil")).args(args),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "certutil {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates `$home/.pki/nssdb` trusting every file in `cas` as a CA for TLS
/// servers (`-t C,,`).
pub fn nss_db_trusting(home: &Path, cas: &[PathBuf]) {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db = format!("sql:{}", db.display());
    certutil(&["-N", "-d", &db, "--empty-password"]);
    for (i, ca) in cas.iter().enumerate() {
        let name = format!("maintgate-test-ca-{i}");
        certutil(&[
            "-A",
            "-d",
            &db,
            "-n",
            &name,
            "-t",
            "C,,",
            "-i",
            ca.to_str().unwrap(),
        ]);
    }
    // The db lists what it trusts (a broken import fails above already).
    let out = run_with_timeout(
        Command::new(require_tool("certutil")).args(["-L", "-d", &db]),
        Duration::from_secs(30),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    for i in 0..cas.len() {
        assert!(
            listing.contains(&format!("maintgate-test-ca-{i}")),
            "{listing}"
        );
    }
}

impl Chromium {
    /// Starts Chromium (blocking: call it from `spawn_blocking` in async
    /// tests) and waits for its DevTools endpoint.
    pub fn launch(opts: &ChromiumOptions) -> Chromium {
        let chromium = require_tool("/usr/bin/chromium");
        let dir = tempfile::Builder::new()
            .prefix("mgt-chromium-")
            .tempdir()
            .unwrap();
        let home = dir.path().join("home");
        let profile = dir.path().join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        nss_db_trusting(&home, &opts.trust);
        let args: Vec<String> = vec![
            "--headless=new".into(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", profile.display()),
            "--remote-debugging-port=0".into(),
            "--remote-debugging-address=127.0.0.1".into(),
            format!("--proxy-pac-url={}", opts.pac_url),
            format!("--host-resolver-rules={}", opts.host_rules),
            "about:blank".into(),
        ];
        let mut cmd = Command::new(chromium);
        cmd.args(&args)
            .env("HOME", &home)
            // No desktop session: keep Chromium from looking for one.
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let mut stderr = LineReader::new(child.stderr.take().unwrap());
        let line = stderr.wait_for(|l| l.starts_with("DevTools listening on ws://"), LAUNCH);
        let ws_url = line
            .trim_start_matches("DevTools listening on ")
            .trim()
            .to_string();
        Chromium {
            child,
            stderr,
            _dir: dir,
            ws_url,
            args,
        }
    }

    /// Chromium's stderr so far (for failure messages).
    pub fn log(&mut self) -> String {
        self.stderr.lines().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

// ---------------------------------------------------------------- CDP

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A DevTools connection (cheap to clone).
#[derive(Clone)]
pub struct Cdp {
    out: mpsc::UnboundedSender<String>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

impl Cdp {
    /// Connects to a `ws://127.0.0.1:PORT/devtools/browser/…` URL. Returns
    /// the client and the stream of events (messages without an `id`).
    pub async fn connect(ws_url: &str) -> (Cdp, mpsc::UnboundedReceiver<Value>) {
        let authority = ws_url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .expect("ws:// URL");
        let addr: SocketAddr = authority.parse().expect("DevTools on an IP:port");
        let tcp = tokio::time::timeout(CALL, tokio::net::TcpStream::connect(addr))
            .await
            .expect("DevTools connect timed out")
            .expect("DevTools connect");
        let (ws, _) = tokio::time::timeout(CALL, tokio_tungstenite::client_async(ws_url, tcp))
            .await
            .expect("DevTools handshake timed out")
            .expect("DevTools handshake");
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let p2 = pending.clone();
        tokio::spawn(async move {
            let mut ws = ws;
            loop {
                tokio::select! {
                    msg = out_rx.recv() => match msg {
                        Some(text) => {
                            if ws.send(Message::Text(text.into())).await.is_err() {
                                break;
                            }
                        }
                        None => break,
                    },
                    msg = ws.next() => {
                        let text = match msg {
                            Some(Ok(Message::Text(t))) => t.to_string(),
                            Some(Ok(_)) => continue,
                            _ => break,
                        };
                        let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                        match v.get("id").and_then(Value::as_u64) {
                            Some(id) => {
                                if let Some(tx) = p2.lock().unwrap().remove(&id) {
                                    let _ = tx.send(v);
                                }
                            }
                            None => {
                                let _ = ev_tx.send(v);
                            }
                        }
                    }
                }
            }
            // Dropping the senders fails every pending call at once.
            p2.lock().unwrap().clear();
        });
        (
            Cdp {
                out: out_tx,
                pending,
                next_id: Arc::new(AtomicU64::new(0)),
            },
            ev_rx,
        )
    }

    fn message(&self, method: &str, params: Value, session: Option<&str>) -> (u64, String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        (id, msg.to_string())
    }

    /// Sends a command and returns its `result`, or `Err(error)`. Panics
    /// when no answer arrives within the deadline.
    pub async fn call(
        &self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, Value> {
        let (id, text) = self.message(method, params, session);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out.send(text).expect("DevTools connection is gone");
        let reply = tokio::time::timeout(CALL, rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no DevTools answer within {CALL:?}"))
            .unwrap_or_else(|_| panic!("{method}: DevTools connection closed"));
        match reply.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(reply.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Sends a command without waiting for its answer (for replies to
    /// events, which must not stall the event loop).
    pub fn send(&self, method: &str, params: Value, session: Option<&str>) {
        let (_, text) = self.message(method, params, session);
        let _ = self.out.send(text);
    }
}

// ---------------------------------------------------------------- page

/// How to answer the `n`-th (1-based) proxy auth challenge of a navigation.
#[derive(Clone, Debug)]
pub enum AuthAnswer {
    Provide { username: String, password: String },
    Cancel,
}

/// What one navigation did.
#[derive(Clone, Debug, Default)]
pub struct Navigation {
    /// `Page.navigate`'s `errorText`, if the navigation failed.
    pub error_text: Option<String>,
    /// Every `Fetch.authRequired` challenge (`authChallenge` objects).
    pub challenges: Vec<Value>,
    /// The main document's `Network.Response` (status, remotePort, ...).
    pub document: Option<Value>,
    /// `Network.loadingFailed` error texts seen.
    pub failures: Vec<String>,
    /// Whether `Page.loadEventFired` arrived.
    pub loaded: bool,
}

impl Navigation {
    pub fn status(&self) -> Option<u64> {
        self.document.as_ref()?.get("status")?.as_u64()
    }
    pub fn remote_port(&self) -> Option<u64> {
        self.document.as_ref()?.get("remotePort")?.as_u64()
    }
}

/// One page target with Fetch (auth), Network and Page enabled.
pub struct Page {
    cdp: Cdp,
    events: mpsc::UnboundedReceiver<Value>,
    session: String,
}

impl Page {
    /// Opens a new page target over the browser connection and attaches
    /// to it (flattened session).
    pub async fn open(ws_url: &str) -> Page {
        let (cdp, events) = Cdp::connect(ws_url).await;
        let target = cdp
            .call("Target.createTarget", json!({ "url": "about:blank" }), None)
            .await
            .expect("Target.createTarget");
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
                None,
            )
            .await
            .expect("Target.attachToTarget");
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        let s = Some(session.as_str());
        cdp.call(
            "Fetch.enable",
            json!({ "handleAuthRequests": true, "patterns": [{ "urlPattern": "*" }] }),
            s,
        )
        .await
        .expect("Fetch.enable");
        cdp.call("Network.enable", json!({}), s)
            .await
            .expect("Network.enable");
        cdp.call("Page.enable", json!({}), s)
            .await
            .expect("Page.enable");
        Page {
            cdp,
            events,
            session,
        }
    }

    /// Handles one event of this page; records into `nav`.
    fn handle(
        &self,
        ev: &Value,
        url: &str,
        nav: &mut Navigation,
        auth: &mut dyn FnMut(usize) -> AuthAnswer,
    ) {
        if ev.get("sessionId").and_then(Value::as_str) != Some(self.session.as_str()) {
            return;
        }
        let s = Some(self.session.as_str());
        let params = &ev["params"];
        match ev["method"].as_str().unwrap_or("") {
            "Fetch.requestPaused" => {
                self.cdp.send(
                    "Fetch.continueRequest",
                    json!({ "requestId": params["requestId"] }),
                    s,
                );
            }
            "Fetch.authRequired" => {
                nav.challenges.push(params["authChallenge"].clone());
                let response = match auth(nav.challenges.len()) {
                    AuthAnswer::Provide { username, password } => json!({
                        "response": "ProvideCredentials",
                        "username": username,
                        "password": password,
                    }),
                    AuthAnswer::Cancel => json!({ "response": "CancelAuth" }),
                };
                self.cdp.send(
                    "Fetch.continueWithAuth",
                    json!({ "requestId": params["requestId"], "authChallengeResponse": response }),
                    s,
                );
            }
            "Network.responseReceived"
                if params["type"] == "Document" && params["response"]["url"] == url =>
            {
                nav.document = Some(params["response"].clone());
            }
            "Network.loadingFailed" => {
                if let Some(e) = params["errorText"].as_str() {
                    nav.failures.push(e.to_string());
                }
            }
            "Page.loadEventFired" => nav.loaded = true,
            _ => {}
        }
    }

    /// Navigates to `url`, answering auth challenges with `auth`, and
    /// waits for the load event (or the navigation's failure), at most
    /// `timeout`.
    pub async fn navigate(
        &mut self,
        url: &str,
        timeout: Duration,
        mut auth: impl FnMut(usize) -> AuthAnswer,
    ) -> Navigation {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut nav = Navigation::default();
        let cdp = self.cdp.clone();
        let session = self.session.clone();
        let call = async move {
            cdp.call("Page.navigate", json!({ "url": url }), Some(&session))
                .await
        };
        tokio::pin!(call);
        let mut answered = false;
        // After a failed navigation, how long to wait for the error page's
        // load event (so the next navigation starts from a quiet page).
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let until = grace.map_or(deadline, |g| g.min(deadline));
            tokio::select! {
                r = &mut call, if !answered => {
                    answered = true;
                    let r = r.expect("Page.navigate");
                    if let Some(e) = r.get("errorText").and_then(Value::as_str) {
                        nav.error_text = Some(e.to_string());
                        grace = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                }
                ev = self.events.recv() => {
                    let ev = ev.expect("DevTools connection closed");
                    self.handle(&ev, url, &mut nav, &mut auth);
                }
                _ = tokio::time::sleep_until(until) => {
                    if grace.is_some() {
                        return nav;
                    }
                    panic!("navigation to {url} did not finish within {timeout:?}: {nav:#?}");
                }
            }
            if answered && nav.loaded {
                return nav;
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value; keeps
    /// answering paused requests meanwhile.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let cdp = self.cdp.clone();
        let session = self.session.clone();
        let call = async move {
            cdp.call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
                Some(&session),
            )
            .await
        };
        tokio::pin!(call);
        let mut ignored = Navigation::default();
        loop {
            tokio::select! {
                r = &mut call => {
                    let r = r.expect("Runtime.evaluate");
                    assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
                    return r["result"]["value"].clone();
                }
                ev = self.events.recv() => {
                    let ev = ev.expect("DevTools connection closed");
                    self.handle(&ev, "", &mut ignored, &mut |_| AuthAnswer::Cancel);
                }
            }
        }
    }

    /// `document.body.innerText`.
    pub async fn body_text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

// ---------------------------------------------------------------- relay

/// A TCP relay on `127.0.0.1:0` that counts the connections it accepts and
/// forwards each to the upstream set with [`ConnCounter::set_upstream`]
/// (connections before that are counted and closed).
pub struct ConnCounter {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnCounter {
    pub fn start() -> ConnCounter {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let upstream: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (c2, u2) = (count.clone(), upstream.clone());
        let task = harness_runtime().spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    acc = listener.accept() => {
                        let Ok((mut down, _)) = acc else { continue };
                        c2.fetch_add(1, Ordering::SeqCst);
                        let up = *u2.lock().unwrap();
                        conns.spawn(async move {
                            let Some(up) = up else { return };
                            let Ok(mut up) = tokio::net::TcpStream::connect(up).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        ConnCounter {
            addr,
            count,
            upstream,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap() = Some(addr);
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for ConnCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}
