//! "503 before memory runs out": the broker watches its own resident
//! memory and, above a limit, answers new CONNECTs 503 while the tunnels
//! it already carries keep running.
//!
//! The limit is `limits.max_memory_mb`, or by default 90% of the tightest
//! cgroup memory limit over the broker's cgroup and its ancestors (v2
//! `memory.max`, v1 `memory.limit_in_bytes`: systemd's `MemoryMax=`, a
//! container limit); with neither, only the connection and tunnel caps
//! apply. The reading is `VmRSS` from `/proc/self/status`, sampled every
//! [`SAMPLE_EVERY`]; the broker is back under the limit once it is below
//! 95% of it, so the state does not flap on every sample.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often resident memory is read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The default limit as a share of the cgroup's limit, in per cent.
const CGROUP_SHARE_PCT: u64 = 90;

/// The watched limit and whether the broker is over it.
#[derive(Debug)]
pub struct MemoryGuard {
    limit: u64,
    over: AtomicBool,
    last_rss: AtomicU64,
}

impl MemoryGuard {
    /// A guard for `limit` bytes of resident memory.
    #[must_use]
    pub fn new(limit: u64) -> MemoryGuard {
        let g = MemoryGuard {
            limit,
            over: AtomicBool::new(false),
            last_rss: AtomicU64::new(0),
        };
        g.sample();
        g
    }

    /// The limit in bytes.
    #[must_use]
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether the last sample was over the limit (and has not yet come
    /// back below 95% of it).
    #[must_use]
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Read resident memory now and update the state; logs transitions.
    pub fn sample(&self) {
        let Some(rss) = read_rss() else { return };
        self.last_rss.store(rss, Ordering::Relaxed);
        let was = self.is_over();
        let now = next_state(was, rss, self.limit);
        if now != was {
            self.over.store(now, Ordering::Relaxed);
            let (rss_mb, limit_mb) = (rss >> 20, self.limit >> 20);
            if now {
                warn!(
                    rss_mb,
                    limit_mb, "memory over the limit: new CONNECTs get 503 until it drops"
                );
            } else {
                info!(rss_mb, limit_mb, "memory back under the limit");
            }
        }
    }

    /// Sample every [`SAMPLE_EVERY`] until `cancel`.
    pub async fn watch(&self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(SAMPLE_EVERY) => self.sample(),
            }
        }
    }
}

/// Over the limit from above it; back under only below 95% of it.
fn next_state(was_over: bool, rss: u64, limit: u64) -> bool {
    if was_over {
        rss.saturating_mul(100) >= limit.saturating_mul(95)
    } else {
        rss > limit
    }
}

/// The limit to watch: `configured_mb` (0 turns the guard off), else 90%
/// of the cgroup limit if there is one.
#[must_use]
pub fn effective_limit(configured_mb: Option<u64>) -> Option<u64> {
    match configured_mb {
        Some(0) => None,
        Some(mb) => Some(mb.saturating_mul(1 << 20)),
        None => cgroup_limit().map(|max| max / 100 * CGROUP_SHARE_PCT),
    }
}

/// The tightest cgroup v2 `memory.max` over this process's cgroup and its
/// ancestors (a systemd unit's own `MemoryMax=`, or its slice's), if any.
/// On cgroup v1 (the `memory` controller) the file is
/// `memory.limit_in_bytes`.
fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |file: String| std::fs::read_to_string(file).ok();
    let v2 =
        cgroup_dirs(&own, "0::").filter_map(|dir| read(format!("/sys/fs/cgroup{dir}/memory.max")));
    let v1 = cgroup_dirs(&own, "memory:")
        .filter_map(|dir| read(format!("/sys/fs/cgroup/memory{dir}/memory.limit_in_bytes")));
    v2.chain(v1).filter_map(|t| parse_cgroup_max(&t)).min()
}

/// The cgroup path from `/proc/self/cgroup` (the line whose hierarchy
/// part starts with `prefix`: `0::` for v2, `memory:` for v1's memory
/// controller) and each of its ancestors, leaf first: `/a/b`, `/a`, and
/// `` for the root.
fn cgroup_dirs(proc_cgroup: &str, prefix: &str) -> impl Iterator<Item = String> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| {
            if prefix == "0::" {
                l.strip_prefix(prefix)
            } else {
                // `N:memory:/path`
                l.split_once(':')
                    .and_then(|(_, rest)| rest.strip_prefix(prefix))
            }
        })
        .map(|p| p.trim().trim_end_matches('/').to_owned())
        .filter(|p| p.is_empty() || (p.starts_with('/') && !p.contains("..")));
    let mut next = path;
    std::iter::from_fn(move || {
        let cur = next.take()?;
        next = cur.rfind('/').map(|i| cur[..i].to_owned());
        Some(cur)
    })
}

/// This process's resident memory in bytes, from `/proc/self/status`.
#[must_use]
pub fn read_rss() -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `VmRSS:   12345 kB` from a `/proc/<pid>/status` text, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// cgroup `memory.max` (v2: a byte count, or `max`) or
/// `memory.limit_in_bytes` (v1: "no limit" is a number near 2^63).
fn parse_cgroup_max(text: &str) -> Option<u64> {
    text.trim()
        .parse()
        .ok()
        .filter(|&n| n > 0 && n < NO_LIMIT_V1)
}

/// cgroup v1 reports "no limit" as the largest page-aligned `i64`; any
/// figure from 2^60 (an exbibyte) up is no limit.
const NO_LIMIT_V1: u64 = 1 << 60;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss_and_cgroup_limits() {
        let status = "Name:\tmaintgate\nVmPeak:\t  99 kB\nVmRSS:\t   5120 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(5120 * 1024));
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None, "unknown unit");
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_cgroup_max("max\n"), None);
        assert_eq!(parse_cgroup_max("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_cgroup_max("0\n"), None);
        assert_eq!(
            parse_cgroup_max("9223372036854771712\n"),
            None,
            "v1: no limit"
        );
        let dirs: Vec<String> =
            cgroup_dirs("0::/system.slice/maintgate-broker.service\n", "0::").collect();
        assert_eq!(
            dirs,
            [
                "/system.slice/maintgate-broker.service",
                "/system.slice",
                ""
            ]
        );
        assert_eq!(cgroup_dirs("0::/\n", "0::").collect::<Vec<_>>(), [""]);
        assert_eq!(cgroup_dirs("12:cpu:/x\n", "0::").count(), 0);
        assert_eq!(cgroup_dirs("0::/a/../../etc\n", "0::").count(), 0);
        let v1 = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
        assert_eq!(
            cgroup_dirs(v1, "memory:").collect::<Vec<_>>(),
            ["/process_api/abc", "/process_api", ""]
        );
        assert_eq!(cgroup_dirs(v1, "0::").collect::<Vec<_>>(), [""]);
        // This process has a resident size.
        assert!(read_rss().is_some_and(|r| r > 0));
    }

    #[test]
    fn over_above_the_limit_and_back_below_95_percent() {
        let limit = 1000;
        assert!(!next_state(false, 1000, limit));
        assert!(next_state(false, 1001, limit));
        assert!(
            next_state(true, 960, limit),
            "still over between 95% and 100%"
        );
        assert!(next_state(true, 950, limit));
        assert!(!next_state(true, 949, limit));
    }

    #[test]
    fn configured_limit_wins_and_zero_turns_it_off() {
        assert_eq!(effective_limit(Some(0)), None);
        assert_eq!(effective_limit(Some(512)), Some(512 << 20));
        // A tiny limit is over at once; a huge one is not.
        assert!(MemoryGuard::new(1 << 20).is_over());
        assert!(!MemoryGuard::new(u64::MAX).is_over());
    }
}
