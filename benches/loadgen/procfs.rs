//! CPU time and memory of processes, read from `/proc`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};

/// Clock ticks per second for `/proc/<pid>/stat` (USER_HZ). It is 100 on
/// every Linux we run on; `getconf CLK_TCK` confirms it when available.
fn ticks_per_sec() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of `pid` ("self" for this process).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may
    // contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13
    // after the name (state is field 3).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec())
}

/// `VmRSS` of `pid`, in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `/proc/loadavg`, first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// TCP sockets in TIME_WAIT on this host (`tw` in `/proc/net/sockstat`):
/// the setup runs leave tens of thousands behind for the next ones. Runs
/// of one build starting at 12,700 and at 44,500 of them gave the same
/// rates, but the report shows the count so it can be checked.
pub fn tcp_timewait() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = s.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = tcp.split_whitespace();
    while let Some(k) = it.next() {
        if k == "tw" {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// CPU of this process and of watched ones over a measurement.
pub struct Watch {
    start: Instant,
    self_cpu: f64,
    procs: Vec<(String, String, Option<f64>, Option<u64>)>,
    load_start: String,
    tw_start: Option<u64>,
}

impl Watch {
    /// Start watching; `spec` is `name=pid,name=pid`.
    pub fn start(spec: Option<&str>) -> Watch {
        let procs = spec
            .unwrap_or("")
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(n, pid)| {
                let pid = pid.trim().to_string();
                let cpu = cpu_seconds(&pid);
                let rss = rss_kib(&pid);
                (n.trim().to_string(), pid, cpu, rss)
            })
            .collect();
        Watch {
            start: Instant::now(),
            self_cpu: cpu_seconds("self").unwrap_or(0.0),
            procs,
            load_start: loadavg(),
            tw_start: tcp_timewait(),
        }
    }

    /// Seconds since start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// JSON fields: `loadgen_cpu_s`, `loadgen_cpu_pct` (of one core),
    /// `procs` {name: {cpu_s, cpu_pct, rss_kib, rss_kib_before}}, `loadavg`,
    /// `tcp_timewait_start`.
    pub fn finish(&self) -> BTreeMap<String, Value> {
        let wall = self.elapsed().max(1e-9);
        let me = cpu_seconds("self").unwrap_or(0.0) - self.self_cpu;
        let mut out = BTreeMap::new();
        out.insert("wall_s".into(), json!(round3(wall)));
        out.insert("loadgen_cpu_s".into(), json!(round3(me)));
        out.insert("loadgen_cpu_pct".into(), json!(round1(100.0 * me / wall)));
        let mut procs = serde_json::Map::new();
        for (name, pid, cpu0, rss0) in &self.procs {
            let cpu = match (cpu_seconds(pid), cpu0) {
                (Some(b), Some(a)) => Some(b - a),
                _ => None,
            };
            procs.insert(
                name.clone(),
                json!({
                    "cpu_s": cpu.map(round3),
                    "cpu_pct": cpu.map(|c| round1(100.0 * c / wall)),
                    "rss_kib": rss_kib(pid),
                    "rss_kib_before": rss0,
                }),
            );
        }
        out.insert("procs".into(), Value::Object(procs));
        out.insert(
            "loadavg".into(),
            json!(format!("{} -> {}", self.load_start, loadavg())),
        );
        out.insert("tcp_timewait_start".into(), json!(self.tw_start));
        out
    }
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
