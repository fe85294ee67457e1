//! Account lockout: a threshold of failures within a window locks the
//! account for a duration that doubles with each lockout, up to a cap.
//!
//! Time is passed in, so the rules are tested without sleeping. Only
//! existing accounts get entries (the caller checks), so a flood of random
//! user names does not grow memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lockout rules.
#[derive(Debug, Clone)]
pub struct LockoutPolicy {
    /// Failures within `window` that lock the account.
    pub threshold: u32,
    /// The window failures are counted in.
    pub window: Duration,
    /// First lockout duration; each further lockout doubles it.
    pub base: Duration,
    /// Longest lockout.
    pub max: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        LockoutPolicy {
            threshold: 10,
            window: Duration::from_secs(300),
            base: Duration::from_secs(60),
            max: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// Start of the current counting window.
    window_start: Instant,
    /// Failures in the current window.
    failures: u32,
    /// Locked until then, if locked.
    locked_until: Option<Instant>,
    /// Lockouts so far (for the growing duration); reset by a success.
    lockouts: u32,
}

/// Failure counters per account (lowercased name).
#[derive(Debug, Default)]
pub struct Lockouts {
    policy: LockoutPolicy,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Lockouts {
    /// Lockouts with `policy`.
    pub fn new(policy: LockoutPolicy) -> Lockouts {
        Lockouts {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `user` is locked at `now`.
    pub fn is_locked(&self, user: &str, now: Instant) -> bool {
        self.lock()
            .get(&user.to_ascii_lowercase())
            .and_then(|e| e.locked_until)
            .is_some_and(|until| until > now)
    }

    /// Count a failure; returns the lockout duration if this failure
    /// started a lockout.
    pub fn record_failure(&self, user: &str, now: Instant) -> Option<Duration> {
        let mut map = self.lock();
        let e = map.entry(user.to_ascii_lowercase()).or_insert(Entry {
            window_start: now,
            failures: 0,
            locked_until: None,
            lockouts: 0,
        });
        if e.locked_until.is_some_and(|u| u > now) {
            return None;
        }
        if now.duration_since(e.window_start) > self.policy.window {
            e.window_start = now;
            e.failures = 0;
        }
        e.failures += 1;
        if e.failures < self.policy.threshold {
            return None;
        }
        let factor = 1u32.checked_shl(e.lockouts.min(16)).unwrap_or(u32::MAX);
        let dur = self
            .policy
            .base
            .checked_mul(factor)
            .unwrap_or(self.policy.max)
            .min(self.policy.max);
        e.lockouts += 1;
        e.failures = 0;
        e.window_start = now;
        e.locked_until = Some(now + dur);
        Some(dur)
    }

    /// A successful login clears the account's failures and history.
    pub fn record_success(&self, user: &str) {
        self.lock().remove(&user.to_ascii_lowercase());
    }

    /// Drop entries with nothing left to remember (periodic cleanup).
    pub fn prune(&self, now: Instant) {
        let window = self.policy.window;
        let max = self.policy.max;
        self.lock().retain(|_, e| {
            let locked = e.locked_until.is_some_and(|u| u > now);
            let recent = now.duration_since(e.window_start) <= window.max(max);
            locked || recent
        });
    }

    /// Number of accounts with state (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no account has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LockoutPolicy {
        LockoutPolicy {
            threshold: 3,
            window: Duration::from_secs(60),
            base: Duration::from_secs(10),
            max: Duration::from_secs(35),
        }
    }

    #[test]
    fn threshold_window_and_growing_duration() {
        let l = Lockouts::new(policy());
        let t0 = Instant::now();
        assert_eq!(l.record_failure("Bob", t0), None);
        assert_eq!(l.record_failure("bob", t0), None);
        assert_eq!(l.record_failure("BOB", t0), Some(Duration::from_secs(10)));
        assert!(l.is_locked("bob", t0 + Duration::from_secs(9)));
        assert!(!l.is_locked("bob", t0 + Duration::from_secs(11)));
        // Failures while locked do not extend or count.
        assert_eq!(l.record_failure("bob", t0 + Duration::from_secs(5)), None);
        let t1 = t0 + Duration::from_secs(11);
        l.record_failure("bob", t1);
        l.record_failure("bob", t1);
        assert_eq!(l.record_failure("bob", t1), Some(Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(21);
        l.record_failure("bob", t2);
        l.record_failure("bob", t2);
        // Capped at max.
        assert_eq!(l.record_failure("bob", t2), Some(Duration::from_secs(35)));
    }

    #[test]
    fn window_expiry_and_success_reset() {
        let l = Lockouts::new(policy());
        let t0 = Instant::now();
        l.record_failure("a", t0);
        l.record_failure("a", t0);
        // Outside the window: counting restarts.
        assert_eq!(l.record_failure("a", t0 + Duration::from_secs(61)), None);
        l.record_success("a");
        assert!(l.is_empty());
        l.record_failure("b", t0);
        l.prune(t0 + Duration::from_secs(3600));
        assert!(l.is_empty());
    }
}
