//! Timestamps for the audit log: RFC 3339 out, RFC 3339 or Unix seconds
//! in.
//!
//! The store keeps times as Unix milliseconds (`INTEGER`), which sort and
//! compare cheaply. Operators see RFC 3339 in UTC with milliseconds, e.g.
//! `2024-05-01T12:00:00.123Z`, and may filter with either form:
//!
//! * Unix seconds: `1714564800`;
//! * RFC 3339: `2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`,
//!   `2024-05-01T12:00:00.5Z` (a space or lowercase `t`/`z` are accepted, as
//!   RFC 3339 allows).
//!
//! Pure, no dependencies: the civil-date arithmetic is Howard Hinnant's
//! `days_from_civil` / `civil_from_days`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Why a time filter could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Neither Unix seconds nor RFC 3339.
    #[error("expected Unix seconds or RFC 3339 (e.g. 2024-05-01T12:00:00Z)")]
    Format,
    /// A field is out of range (month 13, minute 60, ...).
    #[error("date or time field out of range")]
    Range,
}

/// Milliseconds since the Unix epoch, now. A clock before 1970 reads 0.
#[must_use]
pub fn now_ms() -> i64 {
    system_time_ms(SystemTime::now())
}

/// Milliseconds since the Unix epoch of `t` (0 before 1970, saturating).
#[must_use]
pub fn system_time_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01: `(year, month, day)`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `unix_ms` as RFC 3339 in UTC with milliseconds:
/// `2024-05-01T12:00:00.123Z`.
#[must_use]
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Reads exactly `n` ASCII digits at `s[at..]`.
fn digits(s: &[u8], at: usize, n: usize) -> Result<i64, TimeError> {
    let part = s.get(at..at + n).ok_or(TimeError::Format)?;
    part.iter().try_fold(0i64, |acc, &b| {
        if b.is_ascii_digit() {
            Ok(acc * 10 + i64::from(b - b'0'))
        } else {
            Err(TimeError::Format)
        }
    })
}

fn expect(s: &[u8], at: usize, allowed: &[u8]) -> Result<(), TimeError> {
    match s.get(at) {
        Some(b) if allowed.contains(b) => Ok(()),
        _ => Err(TimeError::Format),
    }
}

/// Parses a time filter: Unix seconds (ASCII digits) or RFC 3339 with an
/// explicit offset. Returns Unix milliseconds.
///
/// # Errors
/// [`TimeError::Format`] for anything else, [`TimeError::Range`] for a
/// field out of range (leap seconds, `60`, are refused too).
pub fn parse_time(s: &str) -> Result<i64, TimeError> {
    let s = s.trim();
    if !s.is_empty() && s.len() <= 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s.parse().map_err(|_| TimeError::Format)?;
        return secs.checked_mul(1000).ok_or(TimeError::Range);
    }
    let b = s.as_bytes();
    if b.len() > 40 {
        return Err(TimeError::Format);
    }
    let year = digits(b, 0, 4)?;
    expect(b, 4, b"-")?;
    let month = digits(b, 5, 2)?;
    expect(b, 7, b"-")?;
    let day = digits(b, 8, 2)?;
    expect(b, 10, b"Tt ")?;
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b":")?;
    let minute = digits(b, 14, 2)?;
    expect(b, 16, b":")?;
    let second = digits(b, 17, 2)?;
    let mut at = 19;
    let mut millis = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        let n = at - start;
        if n == 0 {
            return Err(TimeError::Format);
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() => {
            let oh = digits(b, at + 1, 2)?;
            expect(b, at + 3, b":")?;
            let om = digits(b, at + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(TimeError::Range);
            }
            let off = oh * 60 + om;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return Err(TimeError::Format),
    };
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(TimeError::Range);
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    Ok(secs * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_714_564_800_123),
            "2024-05-01T12:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(parse_time("1714564800"), Ok(1_714_564_800_000));
        assert_eq!(parse_time("2024-05-01T12:00:00Z"), Ok(1_714_564_800_000));
        assert_eq!(
            parse_time("2024-05-01T14:00:00+02:00"),
            Ok(1_714_564_800_000)
        );
        assert_eq!(
            parse_time("2024-05-01t11:30:00.5-00:30"),
            Ok(1_714_564_800_500)
        );
        assert_eq!(
            parse_time("2024-05-01 12:00:00.123456z"),
            Ok(1_714_564_800_123)
        );
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Ok(951_782_400_000));
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "yesterday",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00Z",
            "2024-5-01T12:00:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+0200",
            "2024-05-01T12:00:00Zx",
            "-5",
            "1714564800.5",
            "9999999999999",
        ] {
            assert_eq!(parse_time(bad), Err(TimeError::Format), "{bad:?}");
        }
        for bad in [
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:60:00Z",
            "2024-05-01T12:00:60Z",
            "2024-05-01T12:00:00+24:00",
        ] {
            assert_eq!(parse_time(bad), Err(TimeError::Range), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(ms in 0i64..253_402_300_799_999) {
            prop_assert_eq!(parse_time(&format_rfc3339_ms(ms)), Ok(ms));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,48}") {
            let _ = parse_time(&s);
        }
    }
}
