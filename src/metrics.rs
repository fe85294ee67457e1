//! Broker metrics: a small registry of atomics rendered in the Prometheus
//! text exposition format (version 0.0.4) at the admin listener's
//! `/metrics`.
//!
//! Every label set is bounded: the only label is the HTTP status of a
//! CONNECT outcome, from the fixed list [`STATUSES`] (anything else counts
//! as `other`), and the histogram's fixed buckets. No account, customer or
//! address ever becomes a label.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `maintgate_tunnels_active` | gauge | tunnels running now |
//! | `maintgate_tunnels_total{status}` | counter | CONNECT outcomes by status |
//! | `maintgate_tunnel_bytes_client_to_target_total` | counter | bytes, live tunnels included |
//! | `maintgate_tunnel_bytes_target_to_client_total` | counter | bytes, live tunnels included |
//! | `maintgate_agents_connected` | gauge | live agent sessions |
//! | `maintgate_auth_failures_total` | counter | proxy credentials given and refused |
//! | `maintgate_lockouts_total` | counter | account or source lockouts imposed |
//! | `maintgate_tls_handshake_failures_total` | counter | failed or timed-out handshakes |
//! | `maintgate_audit_write_failures_total` | counter | audit writes that failed |
//! | `maintgate_connect_duration_seconds` | histogram | CONNECT head to 200 |
//!
//! Counters only go up; gauges and the byte totals are read from the
//! registry at scrape time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// CONNECT outcome statuses that get their own label value.
pub const STATUSES: [u16; 10] = [200, 400, 403, 404, 405, 407, 429, 502, 503, 504];

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; rendering sums them). The
    /// last slot is for observations above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of observations in microseconds (integer, so atomics suffice).
    sum_us: AtomicU64,
    /// Number of observations.
    count: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The broker's counters. Shared by every connection through
/// `BrokerState`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// CONNECT outcomes, one slot per [`STATUSES`] entry plus `other`.
    tunnels_by_status: [Counter; STATUSES.len() + 1],
    /// TLS handshakes on the proxy port that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// Audit writes that failed (each one refuses a tunnel or loses an
    /// event record).
    pub audit_write_failures: Counter,
    /// Time from a complete CONNECT head to the 200 being sent.
    pub connect_latency: Histogram,
}

/// Values read from live state at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Live {
    /// Tunnels running now.
    pub tunnels_active: u64,
    /// Agent sessions now.
    pub agents_connected: u64,
    /// Bytes client → target, finished and live tunnels.
    pub bytes_client_to_target: u64,
    /// Bytes target → client, finished and live tunnels.
    pub bytes_target_to_client: u64,
    /// Failed credential checks (wrong, locked, throttled), from the
    /// authenticator's counters. A 407 answered to a request without
    /// credentials is the normal challenge and not counted.
    pub auth_failures: u64,
    /// Lockouts imposed, from the authenticator's counters.
    pub lockouts: u64,
}

impl Metrics {
    /// Count one CONNECT outcome.
    pub fn tunnel_outcome(&self, status: u16) {
        let slot = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.tunnels_by_status[slot].inc();
    }

    /// CONNECT outcomes counted for `status` (for tests).
    pub fn outcomes(&self, status: u16) -> u64 {
        STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.tunnels_by_status[i].get())
    }

    /// Render everything in the Prometheus text format.
    pub fn render(&self, live: &Live) -> String {
        let mut out = String::with_capacity(4096);
        gauge(
            &mut out,
            "maintgate_tunnels_active",
            "Tunnels running now.",
            live.tunnels_active,
        );
        header(
            &mut out,
            "maintgate_tunnels_total",
            "CONNECT requests by the HTTP status answered.",
            "counter",
        );
        for (i, c) in self.tunnels_by_status.iter().enumerate() {
            let label = STATUSES
                .get(i)
                .map_or_else(|| "other".to_owned(), u16::to_string);
            let _ = writeln!(
                out,
                "maintgate_tunnels_total{{status=\"{label}\"}} {}",
                c.get()
            );
        }
        counter(
            &mut out,
            "maintgate_tunnel_bytes_client_to_target_total",
            "Bytes carried from clients to targets, live tunnels included.",
            live.bytes_client_to_target,
        );
        counter(
            &mut out,
            "maintgate_tunnel_bytes_target_to_client_total",
            "Bytes carried from targets to clients, live tunnels included.",
            live.bytes_target_to_client,
        );
        gauge(
            &mut out,
            "maintgate_agents_connected",
            "Agent sessions now.",
            live.agents_connected,
        );
        counter(
            &mut out,
            "maintgate_auth_failures_total",
            "Proxy credentials given and refused.",
            live.auth_failures,
        );
        counter(
            &mut out,
            "maintgate_lockouts_total",
            "Lockouts imposed on accounts or sources.",
            live.lockouts,
        );
        counter(
            &mut out,
            "maintgate_tls_handshake_failures_total",
            "TLS handshakes on the proxy port that failed or timed out.",
            self.tls_handshake_failures.get(),
        );
        counter(
            &mut out,
            "maintgate_audit_write_failures_total",
            "Audit records that could not be written.",
            self.audit_write_failures.get(),
        );
        let name = "maintgate_connect_duration_seconds";
        header(
            &mut out,
            name,
            "Time from a complete CONNECT head to the 200.",
            "histogram",
        );
        let h = &self.connect_latency;
        // `_count` is rendered from the same bucket sum as `+Inf`, so the
        // two agree even while observations race with the scrape.
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += h.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        // Integer microseconds to seconds; precision loss is irrelevant.
        #[allow(clippy::cast_precision_loss)]
        let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {v}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.tunnel_outcome(200);
        m.tunnel_outcome(200);
        m.tunnel_outcome(407);
        m.tunnel_outcome(418);
        m.connect_latency.observe(Duration::from_millis(3));
        m.connect_latency.observe(Duration::from_millis(30));
        m.connect_latency.observe(Duration::from_secs(100));
        assert_eq!(m.outcomes(200), 2);
        assert_eq!(m.outcomes(418), 0);
        let text = m.render(&Live {
            tunnels_active: 1,
            agents_connected: 2,
            bytes_client_to_target: 10,
            bytes_target_to_client: 20,
            auth_failures: 1,
            lockouts: 0,
        });
        for line in [
            "maintgate_tunnels_active 1",
            "maintgate_tunnels_total{status=\"200\"} 2",
            "maintgate_tunnels_total{status=\"407\"} 1",
            "maintgate_tunnels_total{status=\"other\"} 1",
            "maintgate_agents_connected 2",
            "maintgate_tunnel_bytes_client_to_target_total 10",
            "maintgate_tunnel_bytes_target_to_client_total 20",
            "maintgate_auth_failures_total 1",
            "maintgate_connect_duration_seconds_bucket{le=\"0.005\"} 1",
            "maintgate_connect_duration_seconds_bucket{le=\"0.05\"} 2",
            "maintgate_connect_duration_seconds_bucket{le=\"30\"} 2",
            "maintgate_connect_duration_seconds_bucket{le=\"+Inf\"} 3",
            "maintgate_connect_duration_seconds_count 3",
            "maintgate_connect_duration_seconds_sum 100.033",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
        }
        assert!(text.ends_with('\n'));
    }
}
