//! Operators' view, end to end: the audit log (exact bytes from a real
//! curl, refused CONNECTs, fail-closed, crash recovery with the real
//! binary and SIGKILL), the admin API over real HTTP (401 without the
//! token, kill, live control), `/metrics` checked against the Prometheus
//! exposition rules, and log lines that client text cannot forge.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maintgate::agent::AgentSettings;
use maintgate::policy::Policy;
use maintgate::secret::{self, Secret};
use maintgate::store::sqlite::SqliteStore;
use serde_json::{json, Value};
use support::stack::{self, basic, open_tunnel, Stack, DOMAIN, PASS, USER};
use support::{
    find_socket_addr, poll_until_async, require_tool, wait_for_line, ChildGuard, EchoServer,
    LineReader,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(90);

// ------------------------------------------------------------ helpers

/// An answer from the admin listener.
#[derive(Debug)]
struct HttpReply {
    status: u16,
    head: String,
    body: String,
}

impl HttpReply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One raw HTTP/1.1 request over a fresh TCP connection; reads until the
/// server closes.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpReply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    // The server may answer (413) before taking a whole oversized body.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("admin answer within 30 s")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {text:?}"));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    HttpReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The admin API with the right token.
struct Admin {
    addr: SocketAddr,
    token: String,
}

impl Admin {
    fn of(stack: &Stack) -> Admin {
        Admin {
            addr: stack.admin,
            token: stack.admin_token(),
        }
    }

    fn from_data_dir(addr: SocketAddr, data_dir: &Path) -> Admin {
        let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
        Admin {
            addr,
            token: token.trim().to_string(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> HttpReply {
        let body = body.map(|b| b.to_string());
        http(self.addr, method, path, Some(&self.token), body.as_deref()).await
    }

    /// A call that must answer `want`; returns its JSON.
    async fn expect(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let r = self.call(method, path, body).await;
        assert_eq!(r.status, want, "{method} {path}: {} {}", r.head, r.body);
        r.json()
    }

    async fn get(&self, path: &str) -> Value {
        self.expect("GET", path, None, 200).await
    }

    async fn metrics(&self) -> HashMap<String, f64> {
        let r = http(self.addr, "GET", "/metrics", None, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        check_exposition(&r.body)
    }
}

async fn echo_roundtrip<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

/// Send a request head over TLS and return the response head only (a 407
/// keeps the connection open; we do not wait for it to close).
async fn answer(stack: &Stack, req: &str) -> String {
    let mut tls = stack::tls_connect(stack).await;
    tls.write_all(req.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), stack::read_response_head(&mut tls))
        .await
        .expect("an answer")
}

/// The tunnel's client side sees the close (EOF or reset) within 5 s.
async fn sees_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S, what: &str) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: tunnel still open after 5 s"));
        match r {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

/// Audit records matching `query` (the admin API's `/audit`).
async fn audit(admin: &Admin, query: &str) -> Vec<Value> {
    match admin.get(&format!("/audit?{query}")).await {
        Value::Array(v) => v,
        other => panic!("audit is not an array: {other}"),
    }
}

/// Polls `/audit?query` until a record satisfies `pred`.
async fn audit_until(admin: &Admin, query: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let pred = &pred;
    poll_until_async(&format!("an audit record for {query}"), T, || async move {
        audit(admin, query).await.into_iter().find(|r| pred(r))
    })
    .await
}

/// `maintgate audit --json ...` against a data directory.
fn cli_audit(data_dir: &Path, args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_maintgate"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("audit")
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "maintgate audit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(v) => v,
        other => panic!("not an array: {other}"),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A stack with system 1234-ipo1 online behind an agent allowing `ports`.
async fn online(ports: &[u16]) -> Stack {
    let mut stack = Stack::start().await;
    let token = stack.add_system("1234", "ipo1", true).await;
    stack.start_agent(&token, stack::services(ports));
    stack.wait_agent("1234", "ipo1").await;
    stack
}

// ------------------------------------------- Prometheus exposition check

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `{a="x",b="y"}` (escapes `\\`, `\"`, `\n`); returns the labels
/// and the rest of the line.
fn parse_labels(s: &str) -> (Vec<(String, String)>, &str) {
    let mut labels = Vec::new();
    let b = s.as_bytes();
    assert_eq!(b[0], b'{');
    let mut i = 1;
    loop {
        if b[i] == b'}' {
            return (labels, &s[i + 1..]);
        }
        let eq = s[i..].find('=').expect("label without =") + i;
        let name = &s[i..eq];
        assert!(is_label_name(name), "bad label name {name:?}");
        assert_eq!(b[eq + 1], b'"', "label value must be quoted");
        let mut j = eq + 2;
        let mut value = String::new();
        loop {
            match b[j] {
                b'\\' => {
                    value.push(match b[j + 1] {
                        b'\\' => '\\',
                        b'"' => '"',
                        b'n' => '\n',
                        other => panic!("bad escape \\{}", other as char),
                    });
                    j += 2;
                }
                b'"' => break,
                b'\n' => panic!("raw newline in label value"),
                _ => {
                    let ch = s[j..].chars().next().unwrap();
                    value.push(ch);
                    j += ch.len_utf8();
                }
            }
        }
        labels.push((name.to_string(), value));
        i = j + 1;
        if b[i] == b',' {
            i += 1;
        }
    }
}

/// Checks `text` against the Prometheus text exposition format (0.0.4)
/// and returns every sample as `name{sorted labels}` → value.
///
/// Rules checked: lines end with LF; `# TYPE` with a known type, at most
/// once per family and before its samples; `# HELP` at most once; metric
/// and label names well formed; label values quoted and escaped; values
/// are floats; a family's samples are contiguous; no duplicate series;
/// counters are non-negative; histograms have `le` buckets that are
/// cumulative and end in `+Inf` equal to `_count`, and a `_sum`.
fn check_exposition(text: &str) -> HashMap<String, f64> {
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    assert!(!text.contains('\r'), "no CR allowed");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, ()> = HashMap::new();
    let mut samples: HashMap<String, f64> = HashMap::new();
    let mut finished_families: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    // family → (le, value) in order, plus count and sum
    let mut buckets: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    let mut sums: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kw = parts.next().unwrap();
            let name = parts.next().unwrap_or("");
            let arg = parts.next().unwrap_or("");
            match kw {
                "TYPE" => {
                    assert!(is_metric_name(name), "bad name {name:?}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg),
                        "bad type {arg:?}"
                    );
                    assert!(
                        types.insert(name.to_string(), arg.to_string()).is_none(),
                        "second TYPE for {name}"
                    );
                    assert!(
                        !samples
                            .keys()
                            .any(|k| family_of(k.split('{').next().unwrap(), &types) == name),
                        "TYPE for {name} after its samples"
                    );
                }
                "HELP" => {
                    assert!(is_metric_name(name), "bad name {name:?}");
                    assert!(
                        helps.insert(name.to_string(), ()).is_none(),
                        "second HELP for {name}"
                    );
                }
                _ => {}
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("sample without value");
        let name = &line[..name_end];
        assert!(is_metric_name(name), "bad metric name {name:?}");
        let (mut labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])
        } else {
            (Vec::new(), &line[name_end..])
        };
        let mut fields = rest.trim_start_matches(' ').split(' ');
        let value = fields.next().and_then(parse_value).expect("bad value");
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().expect("bad timestamp");
        }
        assert!(fields.next().is_none(), "trailing text in {line:?}");
        labels.sort();
        let mut names: Vec<&String> = labels.iter().map(|(k, _)| k).collect();
        names.dedup();
        assert_eq!(names.len(), labels.len(), "duplicate label in {line:?}");
        let family = family_of(name, &types);
        if current.as_deref() != Some(family.as_str()) {
            assert!(
                !finished_families.contains(&family),
                "samples of {family} are not contiguous"
            );
            if let Some(c) = current.take() {
                finished_families.push(c);
            }
            current = Some(family.clone());
        }
        let kind = types.get(&family).map_or("untyped", String::as_str);
        if kind == "counter" || kind == "histogram" {
            assert!(value >= 0.0, "{line}: negative");
        }
        if kind == "histogram" {
            if name.ends_with("_bucket") {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .map(|(_, v)| parse_value(v).expect("le is a float"))
                    .expect("bucket without le");
                buckets.entry(family.clone()).or_default().push((le, value));
            } else if name.ends_with("_count") {
                counts.insert(family.clone(), value);
            } else if name.ends_with("_sum") {
                sums.insert(family.clone(), value);
            } else {
                panic!("{name}: not a histogram sample name");
            }
        }
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        assert!(samples.insert(key, value).is_none(), "duplicate {line}");
    }
    for (family, kind) in &types {
        if kind == "histogram" {
            let b = buckets.get(family).expect("histogram without buckets");
            assert!(
                b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}: buckets not cumulative: {b:?}"
            );
            let last = b.last().unwrap();
            assert!(last.0.is_infinite(), "{family}: no +Inf bucket");
            assert_eq!(Some(&last.1), counts.get(family), "{family}: +Inf != count");
            assert!(sums.contains_key(family), "{family}: no _sum");
        }
    }
    assert!(!samples.is_empty(), "no samples at all");
    samples
}

/// The family a sample belongs to: histogram suffixes stripped when the
/// base name is typed as a histogram.
fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram") {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

#[test]
fn the_exposition_checker_rejects_what_it_should() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{s=\"1\"} 2\na_total{s=\"q\\\"\"} 3\n\
              # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let m = check_exposition(ok);
    assert_eq!(m["a_total{s=\"1\"}"], 2.0);
    assert_eq!(m["h_count"], 2.0);
    for bad in [
        "a 1",                                       // no final newline
        "# TYPE a counter\n# TYPE a counter\na 1\n", // two TYPEs
        "a 1\n# TYPE a counter\n",                   // TYPE after samples
        "1a 1\n",                                    // bad name
        "a{1x=\"v\"} 1\n",                           // bad label name
        "a{x=v} 1\n",                                // unquoted
        "a one\n",                                   // bad value
        "a 1\nb 1\na 2\n",                           // not contiguous
        "a 1\na 1\n",                                // duplicate series
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        "# TYPE c counter\nc -1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| check_exposition(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}

// ------------------------------------------------------------ audit

/// A one-connection HTTP target that counts exactly what it receives and
/// answers `response`. Returns the bytes received.
async fn exact_target(listener: tokio::net::TcpListener, response: Vec<u8>) -> u64 {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "client closed before its request was complete");
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(&response).await.unwrap();
    s.shutdown().await.unwrap();
    // Count anything else the client sends until it closes.
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_tunnel_is_audited_with_exact_bytes_both_ways() {
    tokio::time::timeout(T, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = "exactly counted body\n".repeat(100);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        let sent_down = response.len() as u64;
        let target = tokio::spawn(exact_target(listener, response));
        let stack = online(&[port]).await;

        let mut curl = tokio::process::Command::new(require_tool("curl"));
        curl.arg("-sS")
            .arg("--max-time")
            .arg("20")
            .arg("--proxy")
            .arg(format!("https://{}", stack.proxy()))
            .arg("--proxy-cacert")
            .arg(stack.ca())
            .arg("--proxy-user")
            .arg(format!("{USER}:{PASS}"))
            .arg("--proxytunnel")
            .arg(format!("http://1234.{DOMAIN}:{port}/exact"))
            .kill_on_drop(true);
        let out = curl.output().await.unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), body);
        let received_up = target.await.unwrap();
        assert!(received_up > 50, "curl sent a request: {received_up} bytes");

        let admin = Admin::of(&stack);
        let rec = audit_until(&admin, "kind=tunnel&customer=1234", |r| !r["end"].is_null()).await;
        assert_eq!(rec["bytes_client_to_target"], received_up, "{rec:#}");
        assert_eq!(rec["bytes_target_to_client"], sent_down, "{rec:#}");
        assert_eq!(rec["account"], USER);
        assert_eq!(rec["customer"], "1234");
        assert_eq!(rec["system"], "ipo1");
        assert_eq!(rec["target"], format!("self:{port}"));
        assert_eq!(rec["dest"], format!("1234.{DOMAIN}:{port}"));
        assert_eq!(rec["status"], 200);
        assert_eq!(rec["reason"], "closed");
        let client: SocketAddr = rec["client"].as_str().unwrap().parse().unwrap();
        assert!(client.ip().is_loopback());
        assert!(rec["end_ms"].as_i64() >= rec["start_ms"].as_i64());

        // The CLI shows the same record.
        let cli = cli_audit(&stack.settings.data_dir, &["--account", USER, "--kind", "tunnel"]);
        assert_eq!(cli.len(), 1, "{cli:#?}");
        assert_eq!(cli[0]["id"], rec["id"]);
        assert_eq!(cli[0]["bytes_client_to_target"], received_up);
        assert_eq!(cli[0]["bytes_target_to_client"], sent_down);
        assert_eq!(cli[0]["start"], rec["start"]);
    })
    .await
    .expect("timed out");
}

/// Most TLS clients (OpenSSL's among them) close a tunnel by closing the
/// socket, without a TLS close_notify. That is an ordinary end: the
/// target gets the bytes and then an EOF (not a reset), and the record
/// says `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_without_close_notify_ends_the_tunnel_cleanly() {
    tokio::time::timeout(T, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            // Ok(0) is an EOF; a reset would be an Err and fail here.
            s.read_to_end(&mut got).await.map(|_| got)
        });
        let stack = online(&[port]).await;
        let mut tls = stack::open_tunnel(&stack, &format!("1234.{DOMAIN}:{port}")).await;
        tls.write_all(b"last words").await.unwrap();
        tls.flush().await.unwrap();
        // Close the TCP connection under the TLS session: no close_notify.
        let (tcp, _) = tls.into_inner();
        drop(tcp);
        let got = target.await.unwrap().expect("an EOF, not a reset");
        assert_eq!(got, b"last words");

        let admin = Admin::of(&stack);
        let rec = audit_until(&admin, "kind=tunnel&customer=1234", |r| !r["end"].is_null()).await;
        assert_eq!(rec["reason"], "closed", "{rec:#}");
        assert_eq!(rec["bytes_client_to_target"], 10, "{rec:#}");
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_leave_records_with_their_status() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = online(&[echo.port()]).await;
        let store = stack.state.store();
        let hash = secret::hash_password("bobs-password").unwrap();
        store.add_account("bob", &hash).await.unwrap();
        store.add_customer("5678", "bob", None).await.unwrap();
        store
            .add_system(
                "5678",
                "ipo1",
                true,
                &secret::token_hash(&secret::generate_token()),
            )
            .await
            .unwrap();
        let since = now_secs().saturating_sub(1).to_string();

        let connect = |dest: String, user: &str, pass: &str| {
            format!(
                "CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
                basic(user, pass)
            )
        };
        let cases = [
            (
                connect(format!("1234.{DOMAIN}:{}", echo.port()), USER, "Wr0ngPass!"),
                407,
            ),
            (
                connect(format!("5678.{DOMAIN}:{}", echo.port()), USER, PASS),
                404,
            ),
            (
                connect(
                    format!("5678.{DOMAIN}:{}", echo.port()),
                    "bob",
                    "bobs-password",
                ),
                503,
            ),
            (
                connect(format!("1234.{DOMAIN}:{}", echo.port() ^ 1), USER, PASS),
                403,
            ),
            (connect(format!("1234.{DOMAIN}:0x16"), USER, PASS), 400),
        ];
        for (req, status) in &cases {
            let text = answer(&stack, req).await;
            assert!(
                text.starts_with(&format!("HTTP/1.1 {status} ")),
                "{req:?} → {text}"
            );
        }

        let rows = cli_audit(
            &stack.settings.data_dir,
            &["--kind", "rejected", "--since", &since],
        );
        let statuses: Vec<u64> = rows.iter().map(|r| r["status"].as_u64().unwrap()).collect();
        assert_eq!(statuses, [407, 404, 503, 403, 400], "{rows:#?}");
        let by = |s: u64| rows.iter().find(|r| r["status"] == s).unwrap();
        assert_eq!(by(407)["account"], USER);
        assert_eq!(by(407)["customer"], "1234");
        assert_eq!(by(404)["customer"], "5678");
        assert_eq!(by(503)["account"], "bob");
        assert_eq!(by(403)["target"], format!("self:{}", echo.port() ^ 1));
        assert_eq!(by(400)["dest"], format!("1234.{DOMAIN}:0x16"));
        for r in &rows {
            assert!(!r["reason"].as_str().unwrap().is_empty(), "{r:#}");
            assert!(r["bytes_client_to_target"].is_null());
            assert_eq!(r["start"], r["end"]);
            assert!(!r.to_string().contains("Wr0ngPass!"), "no password in {r}");
        }
        // No tunnel record: nothing was opened.
        assert!(cli_audit(&stack.settings.data_dir, &["--kind", "tunnel"]).is_empty());
        // The account filter is case-insensitive; the customer filter works.
        assert_eq!(
            cli_audit(
                &stack.settings.data_dir,
                &["--account", "BOB", "--kind", "rejected"]
            )
            .len(),
            1
        );
        assert_eq!(
            cli_audit(
                &stack.settings.data_dir,
                &["--customer", "5678", "--kind", "rejected"]
            )
            .len(),
            2
        );
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audit_record_means_no_tunnel() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = online(&[echo.port()]).await;
        // Another connection (as a failing disk would) makes every tunnel
        // record insert fail; rejected records still work.
        let db = rusqlite::Connection::open(maintgate::store::db_path(&stack.settings.data_dir))
            .unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.execute_batch(
            "CREATE TRIGGER fail_tunnels BEFORE INSERT ON audit WHEN NEW.kind = 'tunnel'
             BEGIN SELECT RAISE(ABORT, 'simulated disk full'); END;",
        )
        .unwrap();
        let req = format!(
            "CONNECT 1234.{DOMAIN}:{} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\npipelined",
            echo.port(),
            basic(USER, PASS)
        );
        let reply = stack::raw_exchange(&stack, req.as_bytes()).await;
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "HTTP/1.1 503 Audit store unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let opens: u64 = stack
            .state
            .registry()
            .agents()
            .iter()
            .map(|a| a.mux.opens())
            .sum();
        assert_eq!(opens, 0, "the agent was never asked to open anything");
        let admin = Admin::of(&stack);
        let m = admin.metrics().await;
        assert_eq!(m["maintgate_tunnels_total{status=\"503\"}"], 1.0);
        assert_eq!(m["maintgate_audit_write_failures_total"], 1.0);

        db.execute_batch("DROP TRIGGER fail_tunnels").unwrap();
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut t, b"audited again").await;
    })
    .await
    .expect("timed out");
}

// ------------------------------------------------------------ admin API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token() {
    tokio::time::timeout(T, async {
        let stack = Stack::start().await;
        let addr = stack.admin;
        assert_ne!(addr.port(), stack.addr.port(), "its own listener");
        let token = stack.admin_token();
        assert!(token.starts_with("mga_"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(stack.settings.data_dir.join("admin.token"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        for (method, path, tok) in [
            ("GET", "/accounts", None),
            ("GET", "/accounts", Some("mga_wrong-token-of-some-length")),
            ("GET", "/tunnels", Some("")),
            ("POST", "/accounts/alice/disable", None),
            ("GET", "/no/such/endpoint", None),
            ("GET", "/audit", Some(&token[..token.len() - 1])),
        ] {
            let r = http(addr, method, path, tok, None).await;
            assert_eq!(r.status, 401, "{method} {path}: {}", r.head);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"maintgate-admin\"")
            );
            assert_eq!(r.json()["error"], "admin token required");
        }
        // Basic instead of Bearer is no token either.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET /accounts HTTP/1.1\r\nAuthorization: Basic {token}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 401 "), "{out}");
        // Nothing changed.
        assert!(
            stack
                .state
                .store()
                .account_by_name(USER)
                .await
                .unwrap()
                .unwrap()
                .enabled
        );

        // Health, readiness and metrics need no token.
        let r = http(addr, "GET", "/healthz", None, None).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
        let r = http(addr, "GET", "/readyz", None, None).await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
        assert_eq!(http(addr, "GET", "/metrics", None, None).await.status, 200);

        // With the token.
        let admin = Admin::of(&stack);
        let accounts = admin.get("/accounts").await;
        assert_eq!(accounts[0]["name"], USER);
        assert_eq!(accounts[0]["customers"], json!(["1234"]));
        // A GET never changes state: 405 with Allow, and nothing happens.
        let r = admin.call("GET", "/accounts/alice/disable", None).await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("POST"));
        assert!(
            stack
                .state
                .store()
                .account_by_name(USER)
                .await
                .unwrap()
                .unwrap()
                .enabled
        );
        assert_eq!(http(addr, "POST", "/healthz", None, None).await.status, 405);
        assert_eq!(admin.call("GET", "/nope", None).await.status, 404);
        // Limits: a body over 64 KiB, a malformed body.
        let big = format!("{{\"name\":\"{}\"}}", "x".repeat(70 * 1024));
        assert_eq!(
            admin
                .call("POST", "/accounts", Some(json!(big)))
                .await
                .status,
            413
        );
        let r = admin
            .call("POST", "/accounts", Some(json!({"nmae": "x"})))
            .await;
        assert_eq!(r.status, 400, "{}", r.body);
        let r = admin.call("GET", "/audit?since=yesterday", None).await;
        assert_eq!(r.status, 400, "{}", r.body);
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_manages_accounts_customers_systems_and_agents() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = Stack::start().await;
        let admin = Admin::of(&stack);

        // An account with a generated password, returned once.
        let carol = admin
            .expect("POST", "/accounts", Some(json!({"name": "carol"})), 201)
            .await;
        let password = carol["password"].as_str().unwrap().to_string();
        assert_eq!(password.len(), secret::GENERATED_PASSWORD_LEN);
        let again = admin
            .call(
                "POST",
                "/accounts",
                Some(json!({"name": "CAROL", "password": "x"})),
            )
            .await;
        assert_eq!(again.status, 409, "{}", again.body);
        let got = admin.get("/accounts/carol").await;
        assert_eq!(
            got,
            json!({"name": "carol", "enabled": true, "customers": []})
        );

        // A customer and a system; the token comes back once.
        admin
            .expect(
                "POST",
                "/customers",
                Some(json!({"id": "777", "account": "carol", "name": "Site 7"})),
                201,
            )
            .await;
        let sys = admin
            .expect(
                "POST",
                "/customers/777/systems",
                Some(json!({"name": "pbx"})),
                201,
            )
            .await;
        let token = sys["token"].as_str().unwrap().to_string();
        assert_eq!(sys["primary"], true);
        let settings = stack.agent_settings(&token, stack::services(&[echo.port()]));
        let link = tokio::spawn(maintgate::agent::connect_and_serve(
            Arc::new(settings),
            CancellationToken::new(),
        ));
        stack.wait_agent("777", "pbx").await;

        // The engineer's view works with the API-made credentials.
        let mut tls = stack::tls_connect(&stack).await;
        let req = format!(
            "CONNECT 777.{DOMAIN}:{} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            echo.port(),
            basic("carol", &password)
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(
            stack::read_response_head(&mut tls).await,
            "HTTP/1.1 200 Connection established\r\n\r\n"
        );
        echo_roundtrip(&mut tls, b"hello").await;

        let agents = admin.get("/agents").await;
        assert_eq!(agents.as_array().unwrap().len(), 1, "{agents:#}");
        let a = &agents[0];
        assert_eq!(a["customer"], "777");
        assert_eq!(a["system"], "pbx");
        assert_eq!(a["streams_open"], 1);
        assert_eq!(a["policy"]["services"], json!([echo.port()]));
        assert!(a["version"].as_str().is_some_and(|v| !v.is_empty()));
        assert!(a["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(a["connected_since"].as_str().unwrap().ends_with('Z'));
        let customer = admin.get("/customers/777").await;
        assert_eq!(customer["systems"][0]["online"], true);
        assert_eq!(customer["accounts"], json!(["carol"]));

        // Connect info for it, as `maintgate connect-info` prints it.
        let info = admin.get("/connect-info/777?system=pbx&port=2222").await;
        assert_eq!(info["host"], format!("777-pbx.{DOMAIN}"));
        assert_eq!(info["port"], 2222);
        assert_eq!(info["proxy"]["port"], stack.port());
        assert!(!info.to_string().contains(&password));
        let text = admin
            .call("GET", "/connect-info/777?system=pbx&format=text", None)
            .await;
        assert_eq!(text.status, 200);
        assert!(
            text.body.contains(&format!("777-pbx.{DOMAIN}")),
            "{}",
            text.body
        );
        assert_eq!(
            admin.call("GET", "/connect-info/999", None).await.status,
            404
        );
        assert_eq!(
            admin.call("GET", "/connect-info/7-7", None).await.status,
            400
        );

        // Grant and revoke another account.
        let g = admin
            .expect("PUT", "/customers/777/accounts/alice", None, 200)
            .await;
        assert_eq!(g["changed"], true);
        admin
            .expect("DELETE", "/customers/777/accounts/alice", None, 200)
            .await;

        // Revoking the token ends the agent session at once, and its tunnel.
        admin
            .expect("POST", "/customers/777/systems/pbx/revoke-token", None, 200)
            .await;
        tokio::time::timeout(Duration::from_secs(5), link)
            .await
            .expect("agent session closed within 5 s")
            .unwrap()
            .unwrap();
        sees_close(&mut tls, "tunnel over the revoked agent").await;
        let again = maintgate::agent::connect_and_serve(
            Arc::new(stack.agent_settings(&token, stack::services(&[echo.port()]))),
            CancellationToken::new(),
        )
        .await;
        assert!(again.is_err(), "revoked token still works: {again:?}");
        // Rotation issues a working one.
        let rotated = admin
            .expect("POST", "/customers/777/systems/pbx/rotate-token", None, 200)
            .await;
        let new_token = rotated["token"].as_str().unwrap();
        assert_ne!(new_token, token);
        let link = tokio::spawn(maintgate::agent::connect_and_serve(
            Arc::new(stack.agent_settings(new_token, stack::services(&[echo.port()]))),
            CancellationToken::new(),
        ));
        stack.wait_agent("777", "pbx").await;
        link.abort();

        // A new password replaces the old one.
        admin
            .expect(
                "PUT",
                "/accounts/carol/password",
                Some(json!({"password": "n3w-password"})),
                200,
            )
            .await;
        assert!(answer(&stack, &req).await.starts_with("HTTP/1.1 407 "));

        // Every change is in the audit log, with its status.
        let actions: Vec<(String, u64)> = audit(&admin, "kind=admin")
            .await
            .iter()
            .map(|r| {
                (
                    r["detail"].as_str().unwrap().to_string(),
                    r["status"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, u64)> = [
            ("account.create", 201),
            ("account.create", 409),
            ("customer.create", 201),
            ("system.create", 201),
            ("customer.grant", 200),
            ("customer.revoke", 200),
            ("system.revoke-token", 200),
            ("system.rotate-token", 200),
            ("account.password", 200),
        ]
        .iter()
        .map(|(a, s)| (a.to_string(), *s))
        .collect();
        assert_eq!(actions, want);
        let records = audit(&admin, "customer=777").await;
        for r in &records {
            assert!(!r.to_string().contains(&token), "token in the audit log");
            assert!(
                !r.to_string().contains(&password),
                "password in the audit log"
            );
        }
        let kinds: Vec<&str> = records
            .iter()
            .map(|r| r["kind"].as_str().unwrap())
            .collect();
        for k in ["agent-connect", "agent-disconnect", "tunnel"] {
            assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
        }
        let refused = audit(&admin, "kind=agent-refused").await;
        assert!(
            !refused.is_empty(),
            "the revoked token's attempt is audited"
        );
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_tunnel_through_the_api_closes_it() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = online(&[echo.port()]).await;
        let admin = Admin::of(&stack);
        let mut t = open_tunnel(&stack, &format!("1234.{DOMAIN}:{}", echo.port())).await;
        echo_roundtrip(&mut t, &[7u8; 1000]).await;

        let tunnels = admin.get("/tunnels").await;
        let list = tunnels.as_array().unwrap();
        assert_eq!(list.len(), 1, "{tunnels:#}");
        let tun = &list[0];
        assert_eq!(tun["account"], USER);
        assert_eq!(tun["customer"], "1234");
        assert_eq!(tun["system"], "ipo1");
        assert_eq!(tun["target"], format!("self:{}", echo.port()));
        assert_eq!(tun["bytes_client_to_target"], 1000);
        assert_eq!(tun["bytes_target_to_client"], 1000);
        let id = tun["id"].as_u64().unwrap();

        let r = admin
            .expect("POST", &format!("/tunnels/{id}/kill"), None, 200)
            .await;
        assert_eq!(r["killed"], id);
        let took = sees_close(&mut t, "killed tunnel").await;
        eprintln!("client saw the kill after {took:?}");

        let rec = audit_until(&admin, "kind=tunnel", |r| {
            r["id"] == id && !r["end"].is_null()
        })
        .await;
        assert_eq!(rec["reason"], "killed");
        assert_eq!(rec["bytes_client_to_target"], 1000);
        assert_eq!(admin.get("/tunnels").await, json!([]));
        let again = admin
            .call("POST", &format!("/tunnels/{id}/kill"), None)
            .await;
        assert_eq!(again.status, 404);
        let kills = audit(&admin, "kind=admin").await;
        assert_eq!(kills[0]["detail"], format!("tunnel.kill {id}"));
        assert_eq!(kills[0]["status"], 200);
        assert_eq!(kills[1]["status"], 404);
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_account_through_the_api_ends_its_live_tunnel() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = online(&[echo.port()]).await;
        let admin = Admin::of(&stack);
        let dest = format!("1234.{DOMAIN}:{}", echo.port());
        let mut t = open_tunnel(&stack, &dest).await;
        echo_roundtrip(&mut t, b"live").await;

        admin
            .expect("POST", &format!("/accounts/{USER}/disable"), None, 200)
            .await;
        let took = sees_close(&mut t, "tunnel of the disabled account").await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        eprintln!("tunnel ended {took:?} after the API answered");
        let req = format!(
            "CONNECT {dest} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            basic(USER, PASS)
        );
        assert!(answer(&stack, &req).await.starts_with("HTTP/1.1 407 "));
        let rec = audit_until(&admin, "kind=tunnel", |r| !r["end"].is_null()).await;
        assert_eq!(rec["reason"], "access-revoked");

        // Enabled again; then removing the customer from the account also
        // ends a live tunnel at once.
        admin
            .expect("POST", &format!("/accounts/{USER}/enable"), None, 200)
            .await;
        let mut t = open_tunnel(&stack, &dest).await;
        echo_roundtrip(&mut t, b"back").await;
        admin
            .expect(
                "DELETE",
                &format!("/customers/1234/accounts/{USER}"),
                None,
                200,
            )
            .await;
        let took = sees_close(&mut t, "tunnel to the revoked customer").await;
        assert!(took < Duration::from_secs(5), "{took:?}");

        let actions: Vec<Value> = audit(&admin, "kind=admin")
            .await
            .iter()
            .map(|r| json!([r["detail"], r["account"], r["status"]]))
            .collect();
        assert_eq!(
            actions,
            [
                json!(["account.disable", USER, 200]),
                json!(["account.enable", USER, 200]),
                json!(["customer.revoke", USER, 200]),
            ]
        );
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_prometheus_format_and_count_what_happened() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let stack = online(&[echo.port()]).await;
        let admin = Admin::of(&stack);
        let before = admin.metrics().await;
        assert_eq!(before["maintgate_agents_connected"], 1.0);
        assert_eq!(before["maintgate_tunnels_total{status=\"200\"}"], 0.0);

        // One TLS handshake failure: plain HTTP on the TLS port.
        let mut plain = TcpStream::connect(stack.addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut sink)).await;
        // One CONNECT without credentials (the normal 407 challenge) and
        // one with a wrong password (an auth failure).
        let dest = format!("1234.{DOMAIN}:{}", echo.port());
        for auth in [
            String::new(),
            format!("Proxy-Authorization: {}\r\n", basic(USER, "nope")),
        ] {
            let req = format!("CONNECT {dest} HTTP/1.1\r\n{auth}\r\n");
            assert!(answer(&stack, &req).await.starts_with("HTTP/1.1 407 "));
        }
        // One tunnel carrying exactly N bytes each way, then closed.
        const N: usize = 12_345;
        let t = open_tunnel(&stack, &dest).await;
        let (mut rd, mut wr) = tokio::io::split(t);
        wr.write_all(&vec![b'm'; N]).await.unwrap();
        wr.shutdown().await.unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), N);

        let m = poll_until_async(
            "the tunnel to end and the handshake failure to count",
            T,
            || {
                let admin = &admin;
                async move {
                    let m = admin.metrics().await;
                    (m["maintgate_tunnels_active"] == 0.0
                        && m["maintgate_tls_handshake_failures_total"] == 1.0)
                        .then_some(m)
                }
            },
        )
        .await;
        let n = N as f64;
        for (key, want) in [
            ("maintgate_tunnels_active", 0.0),
            ("maintgate_tunnels_total{status=\"200\"}", 1.0),
            ("maintgate_tunnels_total{status=\"407\"}", 2.0),
            ("maintgate_tunnels_total{status=\"503\"}", 0.0),
            ("maintgate_tunnels_total{status=\"other\"}", 0.0),
            ("maintgate_tunnel_bytes_client_to_target_total", n),
            ("maintgate_tunnel_bytes_target_to_client_total", n),
            ("maintgate_agents_connected", 1.0),
            ("maintgate_auth_failures_total", 1.0),
            ("maintgate_lockouts_total", 0.0),
            ("maintgate_tls_handshake_failures_total", 1.0),
            ("maintgate_audit_write_failures_total", 0.0),
            ("maintgate_connect_duration_seconds_count", 1.0),
            (
                "maintgate_connect_duration_seconds_bucket{le=\"+Inf\"}",
                1.0,
            ),
        ] {
            assert_eq!(m.get(key), Some(&want), "{key}");
        }
        let sum = m["maintgate_connect_duration_seconds_sum"];
        assert!(sum > 0.0 && sum < 30.0, "{sum}");
        // Bounded labels: only statuses and buckets.
        for key in m.keys() {
            assert!(!key.contains(USER) && !key.contains("1234"), "{key}");
        }
        // While a tunnel runs, its live bytes are counted.
        let mut t = open_tunnel(&stack, &dest).await;
        echo_roundtrip(&mut t, &[1u8; 100]).await;
        let live = admin.metrics().await;
        assert_eq!(live["maintgate_tunnels_active"], 1.0);
        assert_eq!(
            live["maintgate_tunnel_bytes_client_to_target_total"],
            n + 100.0
        );
    })
    .await
    .expect("timed out");
}

// ------------------------------------------------- the real binary

/// `maintgate serve` as a child process on port 0, with its stdout and
/// stderr readers.
struct Served {
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    stderr: LineReader,
    _stdout: LineReader,
}

fn serve(root: &Path, extra: &[&str]) -> Served {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_maintgate"));
    cmd.args(extra)
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--admin-listen")
        .arg("127.0.0.1:0")
        .arg("--domain")
        .arg(DOMAIN)
        .arg("--certs-dir")
        .arg(root.join("certs"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let stderr = LineReader::new(child.stderr.take().unwrap());
    let (line, mut stdout) = wait_for_line(
        child.stdout.take().unwrap(),
        |l| l.contains("listening on"),
        Duration::from_secs(30),
    );
    let addr = find_socket_addr(&line).expect("address in the listening line");
    let admin_line = stdout.wait_for(|l| l.contains("admin API on"), Duration::from_secs(10));
    let admin = find_socket_addr(&admin_line).expect("admin address");
    Served {
        child,
        addr,
        admin,
        stderr,
        _stdout: stdout,
    }
}

/// Account alice (customer 1234, system ipo1) in a fresh store; returns
/// the agent token.
fn seed(root: &Path) -> String {
    let store = SqliteStore::open(&maintgate::store::db_path(&root.join("data"))).unwrap();
    store
        .add_account(USER, &secret::hash_password(PASS).unwrap())
        .unwrap();
    store.add_customer("1234", USER, None).unwrap();
    let token = secret::generate_token();
    store
        .add_system("1234", "ipo1", true, &secret::token_hash(&token))
        .unwrap();
    token
}

fn agent_for(addr: SocketAddr, root: &Path, token: &str, policy: Policy) -> AgentSettings {
    let file: maintgate::agent::config::AgentFile =
        toml::from_str("reconnect_min_ms = 50\nreconnect_max_ms = 500\n").unwrap();
    let mut s = AgentSettings::from_parts(
        file,
        format!("wss://localhost:{}/agent", addr.port()),
        Secret::new(token.to_string()),
        Some(root.join("certs").join("ca.pem")),
    )
    .unwrap();
    s.policy = policy;
    s
}

async fn tls_to(
    addr: SocketAddr,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = maintgate::tls::client_config(Some(ca)).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_leaves_the_record_open_and_the_next_start_closes_it_as_interrupted() {
    tokio::time::timeout(T, async {
        let echo = EchoServer::start();
        let root = tempfile::tempdir().unwrap();
        let token = seed(root.path());
        let mut first = tokio::task::block_in_place(|| serve(root.path(), &[]));
        let cancel = CancellationToken::new();
        let agent = tokio::spawn(maintgate::agent::run(
            agent_for(
                first.addr,
                root.path(),
                &token,
                stack::services(&[echo.port()]),
            ),
            cancel.clone(),
        ));
        let admin = Admin::from_data_dir(first.admin, &root.path().join("data"));
        let admin_ref = &admin;
        poll_until_async("the agent online at the child broker", T, || async move {
            let a = admin_ref.get("/agents").await;
            (a.as_array().map_or(0, Vec::len) == 1).then_some(())
        })
        .await;

        let mut tls = tls_to(first.addr, &root.path().join("certs").join("ca.pem")).await;
        let req = format!(
            "CONNECT 1234.{DOMAIN}:{} HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            echo.port(),
            basic(USER, PASS)
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        assert_eq!(
            stack::read_response_head(&mut tls).await,
            "HTTP/1.1 200 Connection established\r\n\r\n"
        );
        echo_roundtrip(&mut tls, b"before the crash").await;
        let data = root.path().join("data");
        // The status after the 200 is a deferred write: it shares the
        // next commit, or waits at most 50 ms for one.
        let data_ref = &data;
        let open = poll_until_async("the tunnel's status recorded", T, || async move {
            let v = tokio::task::block_in_place(|| cli_audit(data_ref, &["--kind", "tunnel"]));
            (v.len() == 1 && v[0]["status"] == 200).then_some(v)
        })
        .await;
        assert!(open[0]["end"].is_null(), "open while the tunnel runs");

        // SIGKILL: no drain, no chance to write the end.
        let pid = first.child.id();
        let st = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let exit =
            tokio::task::block_in_place(|| first.child.wait_timeout(Duration::from_secs(10)));
        assert!(!exit.success());
        sees_close(&mut tls, "tunnel through the killed broker").await;
        cancel.cancel();
        let _ = agent.await;
        let still_open = tokio::task::block_in_place(|| cli_audit(&data, &["--kind", "tunnel"]));
        assert!(still_open[0]["end"].is_null(), "the crash left it open");

        // The next start closes it.
        let mut second = tokio::task::block_in_place(|| serve(root.path(), &[]));
        let rows = tokio::task::block_in_place(|| cli_audit(&data, &["--kind", "tunnel"]));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["reason"], "interrupted", "{:#}", rows[0]);
        assert!(!rows[0]["end"].is_null());
        assert_eq!(rows[0]["id"], open[0]["id"]);
        let warned = tokio::task::block_in_place(|| {
            second
                .stderr
                .wait_for(|l| l.contains("interrupted"), Duration::from_secs(10))
        });
        assert!(warned.contains("records=1"), "{warned}");
        // The same admin token still works on the new listener.
        let admin = Admin::from_data_dir(second.admin, &data);
        assert_eq!(
            audit(&admin, "kind=tunnel").await[0]["reason"],
            "interrupted"
        );
    })
    .await
    .expect("timed out");
}

/// Every stderr line so far, after `pred` has matched one (blocking).
fn lines_after(r: &mut LineReader, pred: impl FnMut(&str) -> bool) -> Vec<String> {
    r.wait_for(pred, Duration::from_secs(20));
    r.lines().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_injection_gives_one_escaped_line_in_json_and_human_formats() {
    tokio::time::timeout(T, async {
        // CR/LF, forged log records and ANSI escapes in the user name;
        // quotes, braces and a backslash in the target (raw control bytes
        // cannot reach a target: the head parser refuses them).
        // (Basic splits at the first ':', so the user name has none.)
        let user =
            "mallory\r\nINFO maintgate forged line\r\n{\"level\"=\"ERROR\"}\x1b[2J\x1b[31mRED";
        let target = "evil\"}{\"forged\":\\x1b[31m}.maint.test:22";
        let ctl_target = "1234.maint.test:22\x1b[31m";
        for format in ["json", "human"] {
            let root = tempfile::tempdir().unwrap();
            seed(root.path());
            let mut served =
                tokio::task::block_in_place(|| serve(root.path(), &["--log-format", format]));
            let ca = root.path().join("certs").join("ca.pem");
            for (t, u) in [
                ("1234.maint.test:22", user),
                (target, "alice"),
                (ctl_target, user),
            ] {
                let mut tls = tls_to(served.addr, &ca).await;
                let creds = {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{u}:the-password-xyz"))
                };
                let req =
                    format!("CONNECT {t} HTTP/1.1\r\nProxy-Authorization: Basic {creds}\r\n\r\n");
                tls.write_all(req.as_bytes()).await.unwrap();
                let out = tokio::time::timeout(
                    Duration::from_secs(20),
                    stack::read_response_head(&mut tls),
                )
                .await
                .expect("an answer");
                assert!(
                    out.starts_with("HTTP/1.1 407 ") || out.starts_with("HTTP/1.1 400 "),
                    "{out}"
                );
            }
            let lines = tokio::task::block_in_place(|| {
                // Each refusal is logged before it is answered, and the
                // requests went one after another: the last one's line
                // means every line is in.
                lines_after(&mut served.stderr, |l| l.contains("bad request head"))
            });
            let all = lines.join("\n");
            assert!(
                !all.contains('\x1b'),
                "{format}: raw ESC in the log:\n{all}"
            );
            assert!(!all.contains('\r'), "{format}: raw CR in the log:\n{all}");
            assert!(
                !all.contains("the-password-xyz"),
                "{format}: password logged"
            );
            let mallory: Vec<&String> = lines.iter().filter(|l| l.contains("mallory")).collect();
            assert_eq!(
                mallory.len(),
                1,
                "{format}: one line for the forged user:\n{all}"
            );
            let evil: Vec<&String> = lines.iter().filter(|l| l.contains("evil")).collect();
            assert_eq!(
                evil.len(),
                1,
                "{format}: one line for the forged target:\n{all}"
            );
            assert!(
                lines.iter().filter(|l| l.contains("forged line")).count() == 1
                    && !lines
                        .iter()
                        .any(|l| l.starts_with("INFO maintgate") || l.starts_with("{\"level\"")),
                "{format}: a forged record became a line:\n{all}"
            );
            // Escaped, and cut at 64 characters.
            let escaped_user = maintgate::logsafe::escape(user, 64);
            assert!(
                escaped_user
                    .starts_with("mallory\\x0d\\x0aINFO maintgate forged line\\x0d\\x0a{\"level\"")
                    && escaped_user.ends_with("..."),
                "{escaped_user}"
            );
            let escaped_user = escaped_user.as_str();
            if format == "json" {
                for l in &lines {
                    serde_json::from_str::<Value>(l)
                        .unwrap_or_else(|e| panic!("not one JSON record ({e}): {l}"));
                }
                let rec: Value = serde_json::from_str(mallory[0]).unwrap();
                assert_eq!(rec["fields"]["message"], "CONNECT refused");
                assert_eq!(rec["fields"]["user"], escaped_user);
                assert_eq!(rec["fields"]["status"], 407);
                let rec: Value = serde_json::from_str(evil[0]).unwrap();
                assert_eq!(rec["fields"]["target"], target.replace('\\', "\\\\"));
                assert_eq!(rec["fields"]["status"], 400);
            } else {
                assert!(mallory[0].contains(escaped_user), "{}", mallory[0]);
                assert!(mallory[0].contains("CONNECT refused"));
            }
            // The audit log holds the same escaped text.
            let data = root.path().join("data");
            let rows = tokio::task::block_in_place(|| cli_audit(&data, &["--kind", "rejected"]));
            assert_eq!(rows[0]["account"], escaped_user);
            assert!(!rows.iter().any(|r| r.to_string().contains('\x1b')));
        }
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_closed_records_past_it_and_says_so() {
    use maintgate::store::audit::{AuditEnd, AuditFilter, AuditKind, NewAudit};
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = stack::test_settings(dir.path());
        settings.audit_retention = Some(Duration::from_secs(30 * 86_400));
        let day_ms = 86_400_000;
        let now = maintgate::timefmt::now_ms();
        let tunnel = |started_ms| NewAudit {
            kind: Some(AuditKind::Tunnel),
            account: Some(USER.into()),
            customer: Some("1234".into()),
            started_ms,
            ..NewAudit::default()
        };
        let closed = |ended_ms| AuditEnd {
            ended_ms,
            status: Some(200),
            bytes: Some((1, 1)),
            reason: "closed".into(),
        };
        // Before the broker starts: a record from 400 days ago, one from
        // 400 days ago still open (a crash; closed as interrupted at start,
        // so it ended today), and one from yesterday.
        let (old, crashed, recent) = {
            std::fs::create_dir_all(&settings.data_dir).unwrap();
            let store = SqliteStore::open(&maintgate::store::db_path(&settings.data_dir)).unwrap();
            let old = store.audit_insert(&tunnel(now - 400 * day_ms)).unwrap();
            store
                .audit_finish(old, &closed(now - 400 * day_ms + 5))
                .unwrap();
            let crashed = store.audit_insert(&tunnel(now - 400 * day_ms)).unwrap();
            let recent = store.audit_insert(&tunnel(now - day_ms)).unwrap();
            store
                .audit_finish(recent, &closed(now - day_ms + 5))
                .unwrap();
            (old, crashed, recent)
        };
        let stack = Stack::start_with(dir, settings).await;
        let all = AuditFilter::default();
        let note = poll_until_async("the retention record", T, || async {
            let records = stack.state.store().audit_query(all.clone()).await.unwrap();
            records.into_iter().find(|r| {
                r.kind == AuditKind::Admin.as_str()
                    && r.detail
                        .as_deref()
                        .is_some_and(|d| d.starts_with("audit.retention"))
            })
        })
        .await;
        assert!(
            note.detail
                .as_deref()
                .unwrap()
                .contains("deleted 1 records"),
            "{note:?}"
        );
        let ids: Vec<i64> = stack
            .state
            .store()
            .audit_query(all.clone())
            .await
            .unwrap()
            .iter()
            .filter(|r| r.kind == AuditKind::Tunnel.as_str())
            .map(|r| r.id)
            .collect();
        assert_eq!(
            ids,
            [crashed, recent],
            "only the old closed record went (old was {old})"
        );
    })
    .await
    .expect("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_data_directory_is_refused_and_touches_nothing() {
    use maintgate::store::audit::{AuditFilter, AuditKind, NewAudit};
    tokio::time::timeout(T, async {
        let dir = tempfile::tempdir().unwrap();
        let settings = stack::test_settings(dir.path());
        let first = Stack::start_with(dir, settings.clone()).await;
        // A running tunnel's record, as the first broker keeps it.
        let open = first
            .state
            .store()
            .audit_insert(NewAudit {
                kind: Some(AuditKind::Tunnel),
                account: Some(USER.into()),
                started_ms: maintgate::timefmt::now_ms(),
                ..NewAudit::default()
            })
            .await
            .unwrap();
        let second = maintgate::broker::Broker::bind(settings.clone()).await;
        let err = second.err().expect("the second broker is refused");
        let text = err.to_string();
        assert!(
            matches!(err, maintgate::broker::BrokerError::DataDirInUse { .. }),
            "{text}"
        );
        assert!(
            text.contains("in use by another broker")
                && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // It did not close the first broker's open record as interrupted.
        let records = first
            .state
            .store()
            .audit_query(AuditFilter::default())
            .await
            .unwrap();
        let rec = records.iter().find(|r| r.id == open).unwrap();
        assert_eq!(rec.end_ms, None, "{rec:?}");
        // Once the first has stopped, the directory is free again.
        let restarted = first.restart().await;
        assert!(restarted
            .state
            .store()
            .audit_query(AuditFilter::default())
            .await
            .is_ok());
    })
    .await
    .expect("timed out");
}
