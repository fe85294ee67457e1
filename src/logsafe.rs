//! Making client-supplied text safe to log.
//!
//! Anything a client sent (a target, a user name, a method) is escaped so
//! that CR, LF, ANSI escapes and other control characters cannot forge log
//! lines or drive a terminal, and truncated so that it cannot flood logs.

use std::fmt::Write;

/// Escape control characters, backslashes and non-ASCII as `\xNN` /
/// `\u{..}`, and cut to at most `max` input characters (marking the cut
/// with `...`).
pub fn escape(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 8);
    for (i, c) in s.chars().enumerate() {
        if i >= max {
            out.push_str("...");
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_truncates() {
        assert_eq!(escape("a\r\nb", 10), "a\\x0d\\x0ab");
        assert_eq!(escape("\x1b[31mred", 20), "\\x1b[31mred");
        assert_eq!(escape("é\\", 5), "\\xe9\\\\");
        assert_eq!(escape("abcdef", 3), "abc...");
        assert!(escape(&"\n".repeat(1000), 100).len() < 500);
    }
}
