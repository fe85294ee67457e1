//! `Proxy-Authorization: Basic` decoder (RFC 7617).
//!
//! Pure and bounded: the encoded length is capped before anything is
//! decoded, so a hostile header cannot make us allocate or hash much. The
//! password never appears in `Debug` output, so a stray `{:?}` in a log
//! line cannot leak it (security.md point 13).
//!
//! Only decoding happens here; comparing the credentials (in constant time)
//! is the job of the account store.

use std::fmt;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

/// Cap on the decoded `user:password`, in bytes. Also bounds the work the
/// password hash does for one request (security.md point 5).
pub const MAX_CREDENTIAL_BYTES: usize = 256;

/// Cap on the base64 text: the longest encoding of
/// [`MAX_CREDENTIAL_BYTES`] bytes, padding included.
const MAX_ENCODED_BYTES: usize = MAX_CREDENTIAL_BYTES.div_ceil(3) * 4;

/// Standard alphabet; padding optional, since some clients drop it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decoded Basic credentials.
///
/// Deliberately not `PartialEq`: checking a password must go through the
/// store's constant-time comparison, never `==`.
#[derive(Clone)]
pub struct Credentials {
    /// Account name; non-empty, no `:` and no control characters.
    pub user: String,
    /// Password as sent; may contain `:`. Never printed by `Debug`.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"MASKED")
            .finish()
    }
}

/// Why a `Proxy-Authorization` value is not usable Basic credentials. All
/// of them lead to a `407`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BasicError {
    /// The scheme is not `Basic`, or no credentials follow it.
    #[error("authorization scheme is not Basic")]
    NotBasic,
    /// The credentials are not valid standard base64.
    #[error("credentials are not valid base64")]
    BadBase64,
    /// The decoded credentials are not UTF-8.
    #[error("credentials are not UTF-8")]
    NotUtf8,
    /// No `:` between user and password.
    #[error("credentials have no ':' separator")]
    NoColon,
    /// The credentials exceed [`MAX_CREDENTIAL_BYTES`].
    #[error("credentials too long")]
    TooLong,
    /// The user name is empty.
    #[error("empty user name")]
    EmptyUser,
    /// The user name contains a control character.
    #[error("control character in user name")]
    ControlChar,
}

impl BasicError {
    /// A short ASCII HTTP reason phrase for the `407` answer.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotBasic => "Proxy authentication required: use Basic",
            Self::BadBase64 => "Proxy authentication required: bad base64",
            Self::NotUtf8 => "Proxy authentication required: credentials not UTF-8",
            Self::NoColon => "Proxy authentication required: expected user:password",
            Self::TooLong => "Proxy authentication required: credentials too long",
            Self::EmptyUser => "Proxy authentication required: empty user",
            Self::ControlChar => "Proxy authentication required: control character in user",
        }
    }
}

/// Decodes a `Proxy-Authorization` header value of the form
/// `Basic <base64(user:password)>`.
///
/// The scheme is matched case-insensitively and may be followed by one or
/// more spaces; surrounding whitespace is ignored. The decoded text is
/// split at the first `:`, so the password may contain `:`.
///
/// # Errors
///
/// [`BasicError::NotBasic`] for another scheme or a missing token,
/// [`BasicError::TooLong`] when the token or the decoded text exceeds the
/// cap, [`BasicError::BadBase64`], [`BasicError::NotUtf8`],
/// [`BasicError::NoColon`], [`BasicError::EmptyUser`] and
/// [`BasicError::ControlChar`] for the other defects they name.
pub fn decode_basic(header_value: &str) -> Result<Credentials, BasicError> {
    let value = header_value.trim_matches([' ', '\t']);
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(BasicError::NotBasic);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(BasicError::NotBasic);
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Err(BasicError::NotBasic);
    }
    if token.len() > MAX_ENCODED_BYTES {
        return Err(BasicError::TooLong);
    }
    let decoded = BASE64.decode(token).map_err(|_| BasicError::BadBase64)?;
    if decoded.len() > MAX_CREDENTIAL_BYTES {
        return Err(BasicError::TooLong);
    }
    let text = String::from_utf8(decoded).map_err(|_| BasicError::NotUtf8)?;
    let (user, password) = text.split_once(':').ok_or(BasicError::NoColon)?;
    if user.is_empty() {
        return Err(BasicError::EmptyUser);
    }
    if user.chars().any(char::is_control) {
        return Err(BasicError::ControlChar);
    }
    Ok(Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    use proptest::prelude::*;

    fn basic(raw: &str) -> String {
        format!("Basic {}", STANDARD.encode(raw))
    }

    #[test]
    fn good_values() {
        let cases: &[(&str, &str, &str)] = &[
            ("Basic dXNlcjpwYXNz", "user", "pass"),
            ("basic dXNlcjpwYXNz", "user", "pass"),
            ("BASIC dXNlcjpwYXNz", "user", "pass"),
            ("Basic    dXNlcjpwYXNz", "user", "pass"),
            ("  Basic dXNlcjpwYXNz \t", "user", "pass"),
            // user:pa:ss — the password keeps its colons.
            ("Basic dXNlcjpwYTpzcw==", "user", "pa:ss"),
            // Missing padding tolerated.
            ("Basic dXNlcjpwYTpzcw", "user", "pa:ss"),
            // Empty password.
            ("Basic dXNlcjo=", "user", ""),
        ];
        for (input, user, password) in cases {
            let c = decode_basic(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(&c.user, user, "{input:?}");
            assert_eq!(&c.password, password, "{input:?}");
        }
        let c = decode_basic(&basic("jürgen:pässwort")).unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_str()),
            ("jürgen", "pässwort")
        );
        assert_eq!(cases.len(), 8);
    }

    #[test]
    fn bad_values() {
        use BasicError as E;
        let long_ok = format!("u:{}", "p".repeat(MAX_CREDENTIAL_BYTES - 2));
        assert!(decode_basic(&basic(&long_ok)).is_ok());
        let long_bad = basic(&format!("u:{}", "p".repeat(MAX_CREDENTIAL_BYTES - 1)));
        let long_token = format!("Basic {}", "A".repeat(100_000));
        let cases: Vec<(String, BasicError)> = vec![
            (String::new(), E::NotBasic),
            ("Basic".into(), E::NotBasic),
            ("Basic ".into(), E::NotBasic),
            ("Bearer dXNlcjpwYXNz".into(), E::NotBasic),
            ("Digest username=x".into(), E::NotBasic),
            ("Basicx dXNlcjpwYXNz".into(), E::NotBasic),
            ("Basic\tdXNlcjpwYXNz".into(), E::NotBasic),
            ("Basic dXNlcjpwYXNz!".into(), E::BadBase64),
            ("Basic dXNlcjpw YXNz".into(), E::BadBase64),
            ("Basic dXNlcjpwYXNz====".into(), E::BadBase64),
            ("Basic dXNlcjpwYXN-".into(), E::BadBase64),
            ("Basic /w==".into(), E::NotUtf8),
            (basic("userpass"), E::NoColon),
            (basic(""), E::NotBasic),
            (basic(":pass"), E::EmptyUser),
            (basic("us\ter:pass"), E::ControlChar),
            (basic("us\u{7f}er:pass"), E::ControlChar),
            (basic("us\u{85}er:pass"), E::ControlChar),
            (long_bad, E::TooLong),
            (long_token, E::TooLong),
        ];
        for (input, want) in &cases {
            assert_eq!(decode_basic(input).err().as_ref(), Some(want), "{input:?}");
        }
        assert_eq!(cases.len(), 20);
    }

    #[test]
    fn debug_masks_password() {
        let c = decode_basic(&basic("alice:s3cret-value")).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(shown.contains("MASKED"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn reasons_are_ascii() {
        use BasicError as E;
        let all = [
            E::NotBasic,
            E::BadBase64,
            E::NotUtf8,
            E::NoColon,
            E::TooLong,
            E::EmptyUser,
            E::ControlChar,
        ];
        for e in &all {
            assert!(e.reason().bytes().all(|b| (0x20..0x7f).contains(&b)));
        }
        assert_eq!(all.len(), 7);
    }

    proptest! {
        #[test]
        fn round_trip(user in "[^:\\p{Cc}]{1,20}", password in ".{0,40}", pad in any::<bool>()) {
            let raw = format!("{user}:{password}");
            prop_assume!(raw.len() <= MAX_CREDENTIAL_BYTES);
            let token = if pad { STANDARD.encode(&raw) } else { STANDARD_NO_PAD.encode(&raw) };
            let c = decode_basic(&format!("Basic {token}")).unwrap();
            prop_assert_eq!(c.user, user);
            prop_assert_eq!(c.password, password);
        }

        #[test]
        fn never_panics(s in any::<String>()) {
            let _ = decode_basic(&s);
            let _ = decode_basic(&format!("Basic {s}"));
        }
    }
}
