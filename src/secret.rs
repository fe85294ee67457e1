//! Password and token primitives.
//!
//! * Proxy-account passwords are hashed with Argon2id at OWASP's minimum
//!   (m = 19456 KiB, t = 2, p = 1) and stored as PHC strings. Their length is
//!   capped *before* hashing, because Argon2 is itself a denial-of-service
//!   lever; an over-long password is rejected, never truncated.
//! * Agent tokens are 256 random bits. They are high entropy, so a fast hash
//!   (SHA-256) is the right storage form, and the store looks systems up by
//!   that hash.
//! * [`Secret`] keeps credentials out of `Debug`/`Display` output and so out
//!   of the logs.
//!
//! Invariant: nothing in this module logs or formats a password or a token.

use std::fmt;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use rand::distributions::{Alphanumeric, Distribution};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Longest password accepted, in bytes. Checked before hashing; longer
/// passwords are rejected, never truncated.
pub const MAX_PASSWORD_BYTES: usize = 128;

/// Longest account user name, in bytes.
pub const MAX_USER_NAME_BYTES: usize = 64;

/// Length of a generated proxy password. 20 characters from a 62-symbol
/// alphabet is about 119 bits, and stays far below proxytunnel's limits
/// (80 characters per field, 117 bytes for `user:pass`).
pub const GENERATED_PASSWORD_LEN: usize = 20;

/// Prefix of every agent token, so a leaked token is recognisable (secret
/// scanners, operators reading a file).
pub const TOKEN_PREFIX: &str = "mgt_";

/// Argon2 memory cost in KiB (OWASP minimum for Argon2id).
const ARGON2_M_COST_KIB: u32 = 19_456;
/// Argon2 iterations.
const ARGON2_T_COST: u32 = 2;
/// Argon2 lanes.
const ARGON2_P_COST: u32 = 1;
/// Salt length in bytes (the PHC recommendation).
const SALT_BYTES: usize = 16;
/// Random bytes in an agent token.
const TOKEN_BYTES: usize = 32;

/// A valid Argon2id PHC string with the production parameters, used only if
/// computing the dummy hash at run time fails (it should not). Its password
/// is unknown and irrelevant; it exists so that [`dummy_hash`] can never
/// return something that verifies quickly.
const FALLBACK_DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$bWFpbnRnYXRlLWR1bW15$+Dlp2o6DZ6ZsFYqJ7J3cN6C1U1c4lq0r0bNfJ5c9bXY";

/// Errors from hashing a password.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The password is longer than [`MAX_PASSWORD_BYTES`].
    #[error("password is longer than {MAX_PASSWORD_BYTES} bytes")]
    PasswordTooLong,
    /// The password is empty.
    #[error("password is empty")]
    PasswordEmpty,
    /// The Argon2 implementation failed (bad parameters, salt encoding).
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// A credential (password or token) that must not end up in logs.
///
/// `Debug` and `Display` print `MASKED`; use [`Secret::expose`] at the one
/// place that needs the value.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The credential itself. Call this only where the value is used, never
    /// to format it into a log line.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// The Argon2id instance with our parameters.
fn argon2() -> Result<Argon2<'static>, SecretError> {
    let params = Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None)
        .map_err(|e| SecretError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password with Argon2id (m=19456 KiB, t=2, p=1) and a fresh
/// random salt, returning the PHC string.
///
/// This is deliberately slow (tens of milliseconds in release builds); run
/// it off the async executor (`spawn_blocking`) and bound concurrency.
///
/// # Errors
/// [`SecretError::PasswordEmpty`] for an empty password,
/// [`SecretError::PasswordTooLong`] above [`MAX_PASSWORD_BYTES`], and
/// [`SecretError::Hash`] if Argon2 itself fails.
pub fn hash_password(pw: &str) -> Result<String, SecretError> {
    if pw.is_empty() {
        return Err(SecretError::PasswordEmpty);
    }
    if pw.len() > MAX_PASSWORD_BYTES {
        return Err(SecretError::PasswordTooLong);
    }
    let mut salt_bytes = [0u8; SALT_BYTES];
    OsRng.fill_bytes(&mut salt_bytes);
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| SecretError::Hash(e.to_string()))?;
    let hash = argon2()?
        .hash_password(pw.as_bytes(), &salt)
        .map_err(|e| SecretError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Checks a password against a PHC string.
///
/// Returns `false` for a wrong password, an over-long password (checked
/// before any hashing, so it costs nothing) and a malformed PHC string. The
/// Argon2 parameters are taken from the PHC string.
#[must_use]
pub fn verify_password(pw: &str, phc: &str) -> bool {
    if pw.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    // `Argon2::default()` only supplies the algorithm family; the verifier
    // re-hashes with the parameters recorded in `parsed`.
    Argon2::default()
        .verify_password(pw.as_bytes(), &parsed)
        .is_ok()
}

/// A password verifier that owns its Argon2 memory.
///
/// [`verify_password`] allocates the whole Argon2 memory (19 MiB at our
/// parameters) on every call. Under a login flood those allocations spread
/// over malloc arenas and are kept. A `Verifier` allocates once and reuses
/// the buffer, so a hashing thread's memory stays the same however many
/// checks it runs.
#[derive(Default)]
pub struct Verifier {
    /// Argon2 working memory, grown to the largest `m_cost` seen.
    blocks: Vec<argon2::Block>,
}

impl Verifier {
    /// A verifier with no memory yet (it grows on first use).
    #[must_use]
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// Check `pw` against the PHC string `phc`; same answers as
    /// [`verify_password`]. The comparison is constant-time.
    #[must_use]
    pub fn verify(&mut self, pw: &str, phc: &str) -> bool {
        use subtle::ConstantTimeEq;
        if pw.len() > MAX_PASSWORD_BYTES {
            return false;
        }
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        let (Ok(algorithm), Ok(params)) = (
            argon2::Algorithm::try_from(parsed.algorithm),
            argon2::Params::try_from(&parsed),
        ) else {
            return false;
        };
        let version = parsed
            .version
            .and_then(|v| argon2::Version::try_from(v).ok())
            .unwrap_or_default();
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return false;
        };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        let want = expected.as_bytes();
        let mut out = [0u8; 64];
        if want.len() > out.len() {
            return false;
        }
        let needed = params.block_count();
        if self.blocks.len() < needed {
            self.blocks.resize(needed, argon2::Block::default());
        }
        let ctx = Argon2::new(algorithm, version, params);
        let out = &mut out[..want.len()];
        if ctx
            .hash_password_into_with_memory(pw.as_bytes(), salt, out, &mut self.blocks[..needed])
            .is_err()
        {
            return false;
        }
        out.ct_eq(want).into()
    }
}

/// A valid Argon2id PHC string with the production parameters, computed once
/// per process.
///
/// Verify against it when the user name is unknown, so that an unknown user
/// costs the same time as a wrong password and timing does not reveal which
/// accounts exist. No password is known to match it.
#[must_use]
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        // A random password nobody ever sees: the hash cannot be matched.
        hash_password(&generate_password()).unwrap_or_else(|_| FALLBACK_DUMMY_HASH.to_owned())
    })
}

/// Generates a strong proxy password: [`GENERATED_PASSWORD_LEN`] characters
/// from `[A-Za-z0-9]`, drawn from the OS random source.
///
/// The alphabet is safe to paste into proxytunnel's `-P user:pass`, PuTTY's
/// proxy settings and shell commands without quoting.
#[must_use]
pub fn generate_password() -> String {
    Alphanumeric
        .sample_iter(OsRng)
        .take(GENERATED_PASSWORD_LEN)
        .map(char::from)
        .collect()
}

/// Generates an agent token: `mgt_` followed by 32 random bytes in URL-safe
/// base64 without padding (47 characters in all).
#[must_use]
pub fn generate_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    OsRng.fill_bytes(&mut bytes);
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 43);
    token.push_str(TOKEN_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
    token
}

/// The storage and lookup form of an agent token: lowercase hex SHA-256 of
/// the whole token string (64 characters).
///
/// A fast hash is right here because tokens carry 256 bits of entropy; the
/// store finds a system by this value.
#[must_use]
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `s` looks like a [`token_hash`] output: 64 lowercase hex digits.
#[must_use]
pub fn is_token_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `name` is a valid proxy-account user name: `[A-Za-z0-9._-]{1,64}`.
///
/// The alphabet keeps names usable in proxytunnel's `-P user:pass` (no `:`,
/// no spaces) and in shell commands without quoting.
#[must_use]
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify_round_trip() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("correct horsE", &phc));
        assert!(!verify_password("", &phc));
    }

    #[test]
    fn salts_differ() {
        let a = hash_password("pw").unwrap();
        let b = hash_password("pw").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn length_cap_rejects_not_truncates() {
        let max = "a".repeat(MAX_PASSWORD_BYTES);
        let over = "a".repeat(MAX_PASSWORD_BYTES + 1);
        assert!(matches!(
            hash_password(&over),
            Err(SecretError::PasswordTooLong)
        ));
        let phc = hash_password(&max).unwrap();
        assert!(verify_password(&max, &phc));
        // The over-long variant is refused outright, not truncated to `max`.
        assert!(!verify_password(&over, &phc));
        assert!(matches!(hash_password(""), Err(SecretError::PasswordEmpty)));
    }

    #[test]
    fn bad_phc_is_false() {
        assert!(!verify_password("x", ""));
        assert!(!verify_password("x", "not a phc"));
        assert!(!verify_password("x", "$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn dummy_hash_is_valid_and_stable() {
        let d = dummy_hash();
        assert!(d.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{d}");
        assert!(PasswordHash::new(d).is_ok());
        assert!(std::ptr::eq(d, dummy_hash()));
        assert!(!verify_password("", d));
        assert!(!verify_password("password", d));
    }

    #[test]
    fn fallback_dummy_hash_parses_with_production_params() {
        let parsed = PasswordHash::new(FALLBACK_DUMMY_HASH).unwrap();
        assert_eq!(parsed.algorithm.as_str(), "argon2id");
        let params = Params::try_from(&parsed).unwrap();
        assert_eq!(params.m_cost(), ARGON2_M_COST_KIB);
        assert_eq!(params.t_cost(), ARGON2_T_COST);
        assert_eq!(params.p_cost(), ARGON2_P_COST);
        assert_eq!(parsed.hash.map(|h| h.len()), Some(32));
        assert!(!verify_password("", FALLBACK_DUMMY_HASH));
    }

    #[test]
    fn generated_passwords() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.len(), GENERATED_PASSWORD_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn generated_tokens() {
        let t = generate_token();
        assert!(t.starts_with(TOKEN_PREFIX));
        assert_eq!(t.len(), 47);
        let body = &t[TOKEN_PREFIX.len()..];
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(raw.len(), TOKEN_BYTES);
        assert_ne!(t, generate_token());
    }

    #[test]
    fn token_hash_is_hex_sha256() {
        // Known vector: SHA-256 of "abc".
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = token_hash(&generate_token());
        assert!(is_token_hash(&h));
        assert!(!is_token_hash("ABC"));
        assert!(!is_token_hash(&h.to_uppercase()));
    }

    #[test]
    fn secret_is_masked() {
        let s = Secret::from("hunter2");
        assert_eq!(format!("{s:?}"), "MASKED");
        assert_eq!(format!("{s}"), "MASKED");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn user_names() {
        for ok in ["a", "acme", "Acme.Support_1-x", &"a".repeat(64)] {
            assert!(valid_user_name(ok), "{ok}");
        }
        for bad in ["", "a:b", "a b", "ä", "a/b", &"a".repeat(65), "a\n"] {
            assert!(!valid_user_name(bad), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod verifier_tests {
    use super::*;

    #[test]
    fn verifier_agrees_with_verify_password() {
        let phc = hash_password("correct horse").unwrap();
        let mut v = Verifier::new();
        for (pw, want) in [
            ("correct horse", true),
            ("correct hors", false),
            ("", false),
        ] {
            assert_eq!(v.verify(pw, &phc), want, "{pw}");
            assert_eq!(verify_password(pw, &phc), want, "{pw}");
        }
        assert!(!v.verify("x", "not a phc"));
        assert!(!v.verify("x", dummy_hash()));
        assert!(!v.verify(&"a".repeat(MAX_PASSWORD_BYTES + 1), &phc));
        // The buffer is reused, not regrown.
        let cap = v.blocks.capacity();
        assert!(v.verify("correct horse", &phc));
        assert_eq!(v.blocks.capacity(), cap);
    }
}
