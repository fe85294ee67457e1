//! The markdown report: medians and ranges over rounds, share of direct,
//! ratios to each peer, CPU and RSS per process, load average.
//!
//! Input: one JSON object per line, as the modes print them, tagged by
//! `benches/run.sh` with `scenario`, `path` and `round`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

type Rec = serde_json::Map<String, Value>;

fn get<'a>(r: &'a Rec, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = r.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

fn num(r: &Rec, path: &str) -> Option<f64> {
    get(r, path).and_then(Value::as_f64)
}

fn text<'a>(r: &'a Rec, key: &str) -> &'a str {
    r.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Median, min, max.
#[derive(Clone, Copy)]
struct Stat {
    med: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        med,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_stat(s: Option<Stat>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => fmt_num(s.med),
        Some(s) => format!("{} ({}–{})", fmt_num(s.med), fmt_num(s.min), fmt_num(s.max)),
    }
}

/// Records of one scenario, grouped by path in first-seen order.
fn by_path<'a>(recs: &'a [Rec], scenario: &str) -> Vec<(String, Vec<&'a Rec>)> {
    let mut out: Vec<(String, Vec<&Rec>)> = Vec::new();
    for r in recs.iter().filter(|r| text(r, "scenario") == scenario) {
        let p = text(r, "path").to_string();
        match out.iter_mut().find(|(q, _)| *q == p) {
            Some((_, v)) => v.push(r),
            None => out.push((p, vec![r])),
        }
    }
    out
}

fn collect(rs: &[&Rec], key: &str) -> Option<Stat> {
    stat(rs.iter().filter_map(|r| num(r, key)).collect())
}

/// Median CPU of each watched process plus the load generator, as text.
fn cpu_text(rs: &[&Rec]) -> String {
    let mut names: Vec<String> = Vec::new();
    for r in rs {
        if let Some(Value::Object(p)) = r.get("procs") {
            for k in p.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
    }
    let mut parts = Vec::new();
    for n in names {
        if let Some(s) = collect(rs, &format!("procs.{n}.cpu_pct")) {
            parts.push(format!("{n} {:.0}", s.med));
        }
    }
    if let Some(s) = collect(rs, "loadgen_cpu_pct") {
        parts.push(format!("loadgen {:.0}", s.med));
    }
    parts.join(", ")
}

fn errors(rs: &[&Rec]) -> u64 {
    rs.iter()
        .map(|r| {
            num(r, "errors").unwrap_or(0.0) as u64
                + u64::from(r.get("verified").and_then(Value::as_bool) == Some(false))
        })
        .sum()
}

const PEERS: [&str; 3] = ["socat2", "rathole", "bore"];

fn throughput_table(out: &mut String, recs: &[Rec], scenario: &str, title: &str) {
    let groups = by_path(recs, scenario);
    if groups.is_empty() {
        return;
    }
    let med = |p: &str| {
        groups
            .iter()
            .find(|(q, _)| q == p)
            .and_then(|(_, rs)| collect(rs, "mbyte_s"))
            .map(|s| s.med)
    };
    let direct = med("direct");
    let ours = med("maintgate");
    let _ = writeln!(out, "\n### {title}\n");
    let _ = writeln!(
        out,
        "| path | MB/s median (range) | rounds | share of direct | maintgate ÷ this | CPU % of one core (median) | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (p, rs) in &groups {
        let s = collect(rs, "mbyte_s");
        let share = match (s, direct) {
            (Some(s), Some(d)) if d > 0.0 => format!("{:.0}%", 100.0 * s.med / d),
            _ => "–".into(),
        };
        let ratio = match (s, ours) {
            (Some(s), Some(o)) if s.med > 0.0 => format!("{:.2}×", o / s.med),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "| {p} | {} | {} | {share} | {ratio} | {} | {} |",
            fmt_stat(s),
            s.map_or(0, |s| s.n),
            cpu_text(rs),
            errors(rs)
        );
    }
}

fn setup_table(out: &mut String, recs: &[Rec], scenario: &str, title: &str) {
    let groups = by_path(recs, scenario);
    if groups.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n### {title}\n");
    let _ = writeln!(
        out,
        "| path | p50 ms | p99 ms | max ms | setups/s | rounds | CPU % | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (p, rs) in &groups {
        let _ = writeln!(
            out,
            "| {p} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_stat(collect(rs, "latency.p50_ms")),
            fmt_stat(collect(rs, "latency.p99_ms")),
            fmt_stat(collect(rs, "latency.max_ms")),
            fmt_stat(collect(rs, "rate_per_s")),
            rs.len(),
            cpu_text(rs),
            errors(rs)
        );
    }
}

fn fairness_table(out: &mut String, recs: &[Rec], scenario: &str, title: &str) {
    let groups = by_path(recs, scenario);
    if groups.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n### {title}\n");
    let _ = writeln!(
        out,
        "| path | echo p50 ms | echo p99 ms | echo max ms | bulk MB/s beside it | rounds | CPU % | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for (p, rs) in &groups {
        let _ = writeln!(
            out,
            "| {p} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_stat(collect(rs, "rtt.p50_ms")),
            fmt_stat(collect(rs, "rtt.p99_ms")),
            fmt_stat(collect(rs, "rtt.max_ms")),
            fmt_stat(collect(rs, "bulk.mbyte_s")),
            rs.len(),
            cpu_text(rs),
            errors(rs)
                + rs.iter()
                    .map(|r| num(r, "bulk.errors").unwrap_or(0.0) as u64)
                    .sum::<u64>()
        );
    }
}

fn step<'a>(recs: &'a [Rec], scenario: &str, step: &str) -> Vec<&'a Rec> {
    recs.iter()
        .filter(|r| text(r, "scenario") == scenario && text(r, "step") == step)
        .collect()
}

/// KiB per tunnel for process `name`: RSS once settled (else when all
/// were up) minus RSS before the first tunnel, over the tunnels up.
fn tunnel_rss(up: &Rec, settled: Option<&Rec>, name: &str) -> Option<f64> {
    let key = format!("procs.{name}.rss_kib");
    let after = settled
        .and_then(|s| num(s, &key))
        .or_else(|| num(up, &key))?;
    let before = num(up, &format!("procs.{name}.rss_kib_before"))?;
    let ok = num(up, "ok")?;
    (ok > 0.0).then(|| (after - before) / ok)
}

fn scale_section(out: &mut String, recs: &[Rec]) {
    let holds: Vec<&Rec> = recs
        .iter()
        .filter(|r| text(r, "scenario") == "tunnels" && text(r, "event") == "up")
        .collect();
    let ends: Vec<&Rec> = recs
        .iter()
        .filter(|r| text(r, "scenario") == "tunnels" && text(r, "event") == "end")
        .collect();
    let settled = step(recs, "tunnels", "settled");
    if !holds.is_empty() {
        let _ = writeln!(out, "\n### Idle tunnels over one agent\n");
        let _ = writeln!(
            out,
            "| tunnels asked | up | errors | time to all up s | setups/s | p99 setup ms | alive at end | broker KiB/tunnel | agent KiB/tunnel | together KiB/tunnel |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for (i, r) in holds.iter().enumerate() {
            let ok = num(r, "ok").unwrap_or(0.0);
            let per = |name: &str| tunnel_rss(r, settled.get(i).copied(), name);
            let (b, a) = (per("broker"), per("agent"));
            let f = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.1}"));
            let alive = ends
                .get(i)
                .and_then(|e| num(e, "alive"))
                .map_or("–".into(), |a| format!("{a:.0}"));
            let _ = writeln!(
                out,
                "| {} | {ok:.0} | {} | {} | {} | {} | {alive} | {} | {} | {} |",
                num(r, "count").unwrap_or(0.0),
                num(r, "errors").unwrap_or(0.0),
                fmt_num(num(r, "wall_s").unwrap_or(0.0)),
                fmt_num(num(r, "rate_per_s").unwrap_or(0.0)),
                fmt_num(num(r, "latency.p99_ms").unwrap_or(0.0)),
                f(b),
                f(a),
                f(b.zip(a).map(|(b, a)| b + a)),
            );
        }
    }

    let before = step(recs, "agents", "before");
    let connect = step(recs, "agents", "connect");
    let idle = step(recs, "agents", "idle");
    let storm = step(recs, "agents", "storm");
    if !connect.is_empty() {
        let _ = writeln!(out, "\n### Idle agents on one broker\n");
        let _ = writeln!(
            out,
            "| agents | all connected after s | broker KiB/agent | broker CPU % over the idle minute | reconnect storm: all back after s (broker up after s) |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for (i, c) in connect.iter().enumerate() {
            let n = num(c, "agents").unwrap_or(0.0);
            let rss_per = match (
                before.get(i).and_then(|r| num(r, "procs.broker.rss_kib")),
                idle.get(i).and_then(|r| num(r, "procs.broker.rss_kib")),
            ) {
                (Some(b), Some(a)) if n > 0.0 => format!("{:.1}", (a - b) / n),
                _ => "–".into(),
            };
            let cpu = idle
                .get(i)
                .and_then(|r| num(r, "procs.broker.cpu_pct"))
                .map_or("–".into(), |c| format!("{c:.2}"));
            let st = storm.get(i).map_or("–".into(), |s| {
                format!(
                    "{}{} ({})",
                    fmt_num(num(s, "elapsed_s").unwrap_or(0.0)),
                    if s.get("reached").and_then(Value::as_bool) == Some(true) {
                        ""
                    } else {
                        " (NOT all)"
                    },
                    num(s, "broker_up_s").map_or("–".into(), fmt_num)
                )
            });
            let reached = if c.get("reached").and_then(Value::as_bool) == Some(true) {
                ""
            } else {
                " (NOT all)"
            };
            let _ = writeln!(
                out,
                "| {n:.0} | {}{reached} | {rss_per} | {cpu} | {st} |",
                fmt_num(num(c, "elapsed_s").unwrap_or(0.0))
            );
        }
    }
}

/// Targets from performance.md, checked against the medians.
fn targets(out: &mut String, recs: &[Rec]) {
    let med = |scenario: &str, path: &str, key: &str| -> Option<f64> {
        by_path(recs, scenario)
            .into_iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, rs)| collect(&rs, key))
            .map(|s| s.med)
    };
    let mut rows: Vec<(String, String, String, Option<bool>)> = Vec::new();
    let pct =
        |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
    let one = med("bulk1", "maintgate", "mbyte_s");
    let direct = med("bulk1", "direct", "mbyte_s");
    let share = pct(one, direct);
    rows.push((
        "1. one stream ≥ 30% of direct".into(),
        share.map_or("–".into(), |s| format!("{:.0}%", 100.0 * s)),
        "≥ 30%".into(),
        share.map(|s| s >= 0.30),
    ));
    let rat = med("bulk1", "rathole", "mbyte_s");
    rows.push((
        "1. one stream ahead of rathole".into(),
        pct(one, rat).map_or("– (rathole not run)".into(), |r| format!("{r:.2}×")),
        "> 1×".into(),
        pct(one, rat).map(|r| r > 1.0),
    ));
    if let Some(plain) = pct(med("bulk1", "maintgate-plain", "mbyte_s"), direct) {
        rows.push((
            "1. one stream, both legs plain (test mode) ≥ 40% of direct".into(),
            format!("{:.0}%", 100.0 * plain),
            "≥ 40%".into(),
            Some(plain >= 0.40),
        ));
    }
    let eight = med("bulk8", "maintgate", "mbyte_s");
    rows.push((
        "2. eight streams ≥ 0.9× one".into(),
        pct(eight, one).map_or("–".into(), |r| format!("{r:.2}×")),
        "≥ 0.9×".into(),
        pct(eight, one).map(|r| r >= 0.9),
    ));
    let fair = med("fair", "maintgate", "rtt.p99_ms");
    rows.push((
        "3. echo p99 beside bulk, unshaped".into(),
        fair.map_or("–".into(), |v| format!("{v:.2} ms")),
        "≤ 2 ms".into(),
        fair.map(|v| v <= 2.0),
    ));
    let shaped = med("fair_shaped", "maintgate", "rtt.p99_ms");
    let shaped_direct = med("fair_shaped", "direct", "rtt.p99_ms");
    rows.push((
        "3. echo p99 beside bulk, 100 Mbit/s tbf agent link".into(),
        match (shaped, shaped_direct) {
            (Some(s), Some(d)) => format!("{s:.1} ms vs {d:.1} ms for two TCP flows"),
            _ => "– (not run)".into(),
        },
        "≤ 2× two flows".into(),
        pct(shaped, shaped_direct).map(|r| r <= 2.0),
    ));
    for (path, limit, label) in [
        ("maintgate-resume", 1.0, "reused TLS session"),
        ("maintgate", 2.0, "full TLS 1.3 handshake"),
    ] {
        let v = med("setup_seq", path, "latency.p99_ms");
        rows.push((
            format!("4. setup p99, {label}"),
            v.map_or("–".into(), |v| format!("{v:.2} ms")),
            format!("≤ {limit} ms"),
            v.map(|v| v <= limit),
        ));
    }
    let rate = med("setup_c64", "maintgate", "rate_per_s");
    rows.push((
        "4. new TLS tunnels/s at 64 concurrent".into(),
        rate.map_or("–".into(), |v| format!("{v:.0}/s")),
        "≥ 3000/s".into(),
        rate.map(|v| v >= 3000.0),
    ));
    let hold = recs
        .iter()
        .find(|r| text(r, "scenario") == "tunnels" && text(r, "event") == "up");
    if let Some(h) = hold {
        let ok = num(h, "ok").unwrap_or(0.0);
        let count = num(h, "count").unwrap_or(0.0);
        let secs = num(h, "wall_s").unwrap_or(f64::NAN);
        let settled = step(recs, "tunnels", "settled");
        let per = |n: &str| tunnel_rss(h, settled.first().copied(), n);
        let tot = per("broker").zip(per("agent")).map(|(a, b)| a + b);
        rows.push((
            format!("5. {count:.0} idle tunnels, no failures, up in ≤ 5 s"),
            format!(
                "{ok:.0} up in {secs:.1} s, {} errors",
                num(h, "errors").unwrap_or(0.0)
            ),
            "all, ≤ 5 s".into(),
            Some(ok == count && secs <= 5.0),
        ));
        rows.push((
            "5. memory per tunnel, broker + agent".into(),
            tot.map_or("–".into(), |t| format!("{t:.1} KiB")),
            "≤ 32 KiB".into(),
            tot.map(|t| t <= 32.0),
        ));
    }
    let before = step(recs, "agents", "before");
    let idle = step(recs, "agents", "idle");
    let connect = step(recs, "agents", "connect");
    let storm = step(recs, "agents", "storm");
    if let (Some(b), Some(i), Some(c)) = (before.first(), idle.first(), connect.first()) {
        let n = num(c, "agents").unwrap_or(0.0);
        let per = num(i, "procs.broker.rss_kib")
            .zip(num(b, "procs.broker.rss_kib"))
            .map(|(a, b)| (a - b) / n.max(1.0));
        rows.push((
            format!("5. {n:.0} idle agents: broker memory per agent"),
            per.map_or("–".into(), |p| format!("{p:.1} KiB")),
            "≤ 32 KiB".into(),
            per.map(|p| p <= 32.0),
        ));
        let cpu = num(i, "procs.broker.cpu_pct");
        rows.push((
            "5. keepalive CPU of those agents on the broker".into(),
            cpu.map_or("–".into(), |c| format!("{c:.2}% of a core")),
            "< 1%".into(),
            cpu.map(|c| c < 1.0),
        ));
    }
    if let Some(s) = storm.first() {
        let t = num(s, "elapsed_s");
        let reached = s.get("reached").and_then(Value::as_bool) == Some(true);
        rows.push((
            "5. reconnect storm after a broker restart".into(),
            t.map_or("–".into(), |t| {
                format!("{t:.1} s{}", if reached { "" } else { " (not all back)" })
            }),
            "≤ 10 s".into(),
            t.map(|t| reached && t <= 10.0),
        ));
    }
    let _ = writeln!(out, "\n## Targets\n");
    let _ = writeln!(out, "| target | measured (median) | wanted | met |");
    let _ = writeln!(out, "|---|---|---|---|");
    for (what, got, want, ok) in rows {
        let mark = match ok {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(out, "| {what} | {got} | {want} | {mark} |");
    }
}

pub fn render(input: &str, notes: &str, command: &str) -> String {
    let recs: Vec<Rec> = input
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "# maintgate benchmark results\n");
    let _ = writeln!(out, "Command: `{command}`\n");
    let meta = recs.iter().find(|r| text(r, "mode") == "meta");
    if let Some(m) = meta {
        for (k, v) in m {
            if k == "mode" {
                continue;
            }
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            let _ = writeln!(out, "- {k}: {v}");
        }
    }
    let loads: Vec<&str> = recs
        .iter()
        .filter_map(|r| r.get("loadavg").and_then(Value::as_str))
        .collect();
    if let (Some(first), Some(last)) = (loads.first(), loads.last()) {
        let peak = loads
            .iter()
            .filter_map(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<f64>().ok())
            })
            .fold(0.0f64, f64::max);
        let _ = writeln!(
            out,
            "- /proc/loadavg: first run {first}; last run {last}; highest 1-minute load seen {peak:.2}"
        );
    }
    let mut tw: Vec<u64> = recs
        .iter()
        .filter(|r| r.get("mode").and_then(Value::as_str) == Some("setup"))
        .filter_map(|r| r.get("tcp_timewait_start").and_then(Value::as_u64))
        .collect();
    tw.sort_unstable();
    if let (Some(lo), Some(hi)) = (tw.first(), tw.last()) {
        let _ = writeln!(
            out,
            "- TCP sockets in TIME_WAIT when a setup run started: {lo}–{hi} (median {}), \
             left by earlier runs' connections",
            tw[tw.len() / 2]
        );
    }
    let _ = writeln!(
        out,
        "\nMedians over rounds, range in parentheses. MB/s is 10^6 bytes/s of checked payload. \
         CPU is per cent of one core over the measured interval, from /proc/<pid>/stat \
         (the load generator's own included, to show it is not the bottleneck)."
    );
    if !notes.trim().is_empty() {
        let _ = writeln!(out, "\n## Notes\n\n{}", notes.trim());
    }
    targets(&mut out, &recs);
    let _ = writeln!(out, "\n## Throughput");
    throughput_table(&mut out, &recs, "bulk1", "One stream, target → client");
    throughput_table(&mut out, &recs, "bulk1_up", "One stream, client → target");
    throughput_table(
        &mut out,
        &recs,
        "bulk8",
        "Eight streams over one agent link",
    );
    throughput_table(
        &mut out,
        &recs,
        "iperf3",
        "iperf3, one stream (client → server)",
    );
    throughput_table(
        &mut out,
        &recs,
        "shaped_bulk1",
        "One stream, the agent link (or the direct flow) through a 100 Mbit/s tbf",
    );
    let _ = writeln!(out, "\n## Setup: connect to first echoed byte");
    setup_table(&mut out, &recs, "setup_seq", "Sequential");
    setup_table(&mut out, &recs, "setup_c64", "64 concurrent");
    let _ = writeln!(
        out,
        "\n## Fairness: 64-byte echo at 200/s beside one bulk stream"
    );
    fairness_table(&mut out, &recs, "echo_alone", "Echo alone (no bulk)");
    fairness_table(&mut out, &recs, "fair", "Beside a bulk stream, unshaped");
    fairness_table(
        &mut out,
        &recs,
        "fair_shaped",
        "Beside a bulk stream, agent link through a 100 Mbit/s tbf (direct: two independent TCP flows through it)",
    );
    let _ = writeln!(out, "\n## Scale");
    scale_section(&mut out, &recs);
    let mut peers_seen: BTreeMap<&str, bool> = BTreeMap::new();
    for p in PEERS {
        peers_seen.insert(p, recs.iter().any(|r| text(r, "path") == p));
    }
    let missing: Vec<&str> = peers_seen
        .iter()
        .filter(|(_, seen)| !**seen)
        .map(|(p, _)| *p)
        .collect();
    let compared = recs.iter().any(|r| {
        matches!(
            text(r, "scenario"),
            "bulk1" | "bulk8" | "setup_seq" | "fair"
        )
    });
    if compared && !missing.is_empty() {
        let _ = writeln!(
            out,
            "\nPeers not measured in this run: {}.",
            missing.join(", ")
        );
    }
    out
}
