//! A real browser: Debian's headless Chromium, configured only with the
//! broker's PAC URL, reaches an HTTPS target behind the agent; the proxy's
//! 407 is answered through the DevTools protocol (`Fetch.authRequired`).
//!
//! Set-up, and why:
//! - `--proxy-pac-url=https://127.0.0.1:<broker>/proxy.pac`: Chromium
//!   fetches the PAC DIRECT, over TLS, and accepts it once the broker's CA
//!   is trusted (without that trust the fetch fails and Chromium silently
//!   falls back to DIRECT).
//! - Trust: an NSS db in a temporary `$HOME` (`certutil`), holding the
//!   broker's CA (for the PAC and the `HTTPS` proxy) and the target's own
//!   CA (for the page, which is end to end TLS inside the tunnel). This is
//!   what an engineer does with `/ca.pem`. `--ignore-certificate-errors-
//!   spki-list` would also work for the proxy, but the target would then
//!   need its leaf listed too.
//! - The stack's domain is `maint.test` and `--host-resolver-rules` maps
//!   exactly `maint.test` (the proxy host in the PAC) to 127.0.0.1; target
//!   names like `1234-web.maint.test` resolve nowhere, so a page can only
//!   load through the proxy. A `*.localhost` domain cannot be used:
//!   Chromium never proxies `localhost` names (implicit bypass rules,
//!   which a PAC cannot override) and resolves them to loopback itself.
//! - The PAC names the proxy port through a counting relay in front of the
//!   broker (`public_port`), so a test can prove whether the browser used
//!   the proxy at all. The `Network.Response.remotePort` of the document
//!   tells the same from the browser's side.

mod support;

use std::time::Duration;

use maintgate::config::BrokerSettings;
use support::browser::{AuthAnswer, Chromium, ChromiumOptions, ConnCounter, Page};
use support::stack::{self, Stack, DOMAIN, PASS, USER};
use support::{within, HttpsServer};

const T: Duration = Duration::from_secs(120);
const NAV: Duration = Duration::from_secs(45);

const MAINT_BODY: &str = "<!doctype html><html><body><h1>maint web page 7f3a</h1></body></html>";
const MAINT_TEXT: &str = "maint web page 7f3a";

struct Fixture {
    stack: Stack,
    relay: ConnCounter,
    web: HttpsServer,
    browser: Chromium,
    page: Page,
}

impl Fixture {
    /// Broker (domain `maint.test`) behind a counting relay, customer 1234
    /// with system `web` whose agent allows the HTTPS target's port, and a
    /// Chromium that trusts the broker's CA plus `extra_trust`.
    async fn start(extra_trust: &[&HttpsServer], extra_rules: &str) -> Fixture {
        let relay = ConnCounter::start();
        let dir = tempfile::tempdir().unwrap();
        let settings = BrokerSettings {
            public_port: Some(relay.port()),
            ..stack::test_settings(dir.path())
        };
        let mut stack = Stack::start_with(dir, settings).await;
        relay.set_upstream(stack.addr);
        let web = HttpsServer::start(&[&format!("1234-web.{DOMAIN}")], MAINT_BODY);
        let token = stack.add_system("1234", "web", true).await;
        stack.start_agent(&token, stack::services(&[web.port()]));
        stack.wait_agent("1234", "web").await;

        let mut trust = vec![stack.ca(), web.ca_pem_path()];
        trust.extend(extra_trust.iter().map(|s| s.ca_pem_path()));
        let opts = ChromiumOptions {
            pac_url: format!("https://127.0.0.1:{}/proxy.pac", stack.port()),
            host_rules: format!("MAP {DOMAIN} 127.0.0.1{extra_rules}"),
            trust,
        };
        let browser = tokio::task::spawn_blocking(move || Chromium::launch(&opts))
            .await
            .unwrap();
        let page = Page::open(&browser.ws_url).await;
        Fixture {
            stack,
            relay,
            web,
            browser,
            page,
        }
    }

    fn maint_url(&self) -> String {
        format!("https://1234-web.{DOMAIN}:{}/", self.web.port())
    }
}

fn right(_: usize) -> AuthAnswer {
    AuthAnswer::Provide {
        username: USER.into(),
        password: PASS.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_maint_page_through_the_pac_and_proxy_auth() {
    within("browser test", T, async {
        let mut f = Fixture::start(&[], "").await;
        let url = f.maint_url();
        let nav = f.page.navigate(&url, NAV, right).await;
        let text = f.page.body_text().await;
        let log = f.browser.log();
        assert!(
            nav.error_text.is_none() && text.contains(MAINT_TEXT),
            "{url}: {nav:#?}\npage text: {text:?}\nchromium: {:?}\n{log}",
            f.browser.args
        );
        // The 407 came from our broker, and was answered through DevTools.
        assert!(!nav.challenges.is_empty(), "{nav:#?}");
        for c in &nav.challenges {
            assert_eq!(c["source"], "Proxy", "{c}");
            assert_eq!(
                c["scheme"].as_str().map(str::to_ascii_lowercase).as_deref(),
                Some("basic")
            );
            assert_eq!(c["realm"], "maintgate", "{c}");
            assert_eq!(
                c["origin"],
                format!("https://{DOMAIN}:{}", f.relay.port()),
                "the PAC's HTTPS proxy"
            );
        }
        // The document came through the proxy (the relay), not directly.
        assert_eq!(nav.status(), Some(200), "{nav:#?}");
        assert_eq!(
            nav.remote_port(),
            Some(u64::from(f.relay.port())),
            "{nav:#?}"
        );
        assert!(f.relay.count() >= 1);
        // The target saw a real TLS request for its own name.
        let seen = f.web.requests();
        assert!(
            seen.iter().any(|r| r.request_line.starts_with("GET / ")
                && r.sni.as_deref() == Some("1234-web.maint.test")
                && r.host.as_deref() == Some(&url["https://".len()..url.len() - 1])),
            "{seen:#?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_with_a_wrong_password_is_refused_then_the_right_one_works() {
    within("browser test", T, async {
        let mut f = Fixture::start(&[], "").await;
        let url = f.maint_url();
        // Answer every challenge with a wrong password, at most 3 times,
        // then cancel: the broker must keep asking, and nothing loads.
        let nav = f
            .page
            .navigate(&url, NAV, |n| {
                if n <= 3 {
                    AuthAnswer::Provide {
                        username: USER.into(),
                        password: "not-the-password".into(),
                    }
                } else {
                    AuthAnswer::Cancel
                }
            })
            .await;
        let text = f.page.body_text().await;
        assert!(
            nav.challenges.len() >= 2,
            "a wrong password is challenged again: {nav:#?}"
        );
        assert!(nav.challenges.len() <= 4, "retries are bounded: {nav:#?}");
        assert!(
            !text.contains(MAINT_TEXT) && (nav.error_text.is_some() || nav.status() == Some(407)),
            "{nav:#?}\npage text: {text:?}"
        );
        assert!(
            f.web.requests().is_empty(),
            "the target must not be reached: {:#?}",
            f.web.requests()
        );
        assert!(f.stack.state.registry().tunnels().is_empty());

        // Same browser, right password: the page loads, so the refusal
        // above was the password's doing.
        let nav = f.page.navigate(&url, NAV, right).await;
        let text = f.page.body_text().await;
        assert!(
            text.contains(MAINT_TEXT) && !nav.challenges.is_empty(),
            "{nav:#?}\npage text: {text:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_sends_non_maint_urls_direct() {
    within("browser test", T, async {
        let direct = HttpsServer::start(
            &["direct.test"],
            "<!doctype html><html><body><p>direct page 51c0</p></body></html>",
        );
        let mut f = Fixture::start(&[&direct], ", MAP direct.test 127.0.0.1").await;
        let url = format!("https://direct.test:{}/", direct.port());
        let nav = f
            .page
            .navigate(&url, NAV, |_| panic!("no proxy auth for a direct URL"))
            .await;
        let text = f.page.body_text().await;
        assert!(
            nav.error_text.is_none() && text.contains("direct page 51c0"),
            "{nav:#?}\npage text: {text:?}"
        );
        assert_eq!(
            nav.remote_port(),
            Some(u64::from(direct.port())),
            "{nav:#?}"
        );
        assert!(nav.challenges.is_empty());
        assert!(direct
            .requests()
            .iter()
            .any(|r| r.sni.as_deref() == Some("direct.test")));
        // Nothing connected to the proxy port the PAC names: the broker
        // never saw this URL.
        assert_eq!(f.relay.count(), 0, "the browser used the proxy");

        // Control: a maint URL in the same browser does go through it, so
        // the relay would have counted a proxied request.
        let maint = f.maint_url();
        let nav = f.page.navigate(&maint, NAV, right).await;
        let text = f.page.body_text().await;
        assert!(text.contains(MAINT_TEXT), "{nav:#?}\npage text: {text:?}");
        assert!(f.relay.count() >= 1);
        assert_eq!(nav.remote_port(), Some(u64::from(f.relay.port())));
    })
    .await;
}
