//! The admin bearer token.
//!
//! Generated on first run into `<data_dir>/admin.token` (mode 0600): 256
//! random bits as `mga_` + base64url. Operators pass it as
//! `Authorization: Bearer <token>`. The broker keeps only its SHA-256 in
//! memory and compares digests in constant time (`subtle`), so neither the
//! comparison's timing nor a stray `{:?}` reveals it; it is never logged.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// File name of the token inside the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Prefix of admin tokens, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "mga_";

/// Longest token accepted from the file or a request.
const MAX_TOKEN_LEN: usize = 256;

/// Errors loading or creating the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing the file failed.
    #[error("admin token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file exists but holds no usable token.
    #[error("admin token file {0}: expected one line of 16-256 printable ASCII characters")]
    Invalid(PathBuf),
}

/// The admin token, as its digest.
#[derive(Clone)]
pub struct AdminToken {
    /// SHA-256 of the token; the token itself is not kept.
    digest: [u8; 32],
    /// Where it is stored, for operators' messages.
    path: PathBuf,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("digest", &"MASKED")
            .field("path", &self.path)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn valid(token: &str) -> bool {
    (16..=MAX_TOKEN_LEN).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

impl AdminToken {
    /// A token from its value (tests, or an operator-supplied token).
    #[must_use]
    pub fn from_value(token: &str, path: PathBuf) -> AdminToken {
        AdminToken {
            digest: digest(token),
            path,
        }
    }

    /// Reads `<data_dir>/admin.token`, or creates it (0600) with a fresh
    /// token. Returns the token and whether it was created.
    ///
    /// # Errors
    /// [`TokenError::Io`] if the file cannot be read or created,
    /// [`TokenError::Invalid`] if it holds something that is not a token.
    pub fn load_or_create(data_dir: &Path) -> Result<(AdminToken, bool), TokenError> {
        let path = data_dir.join(TOKEN_FILE);
        let io = |source| TokenError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        match opts.open(&path) {
            Ok(mut f) => {
                let mut raw = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut raw);
                let token = format!(
                    "{TOKEN_PREFIX}{}",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
                );
                f.write_all(format!("{token}\n").as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(io)?;
                Ok((AdminToken::from_value(&token, path.clone()), true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut text = String::new();
                std::fs::File::open(&path)
                    .map_err(io)?
                    .take(MAX_TOKEN_LEN as u64 + 2)
                    .read_to_string(&mut text)
                    .map_err(|_| TokenError::Invalid(path.clone()))?;
                let token = text.trim_end_matches(['\n', '\r']);
                if !valid(token) {
                    return Err(TokenError::Invalid(path));
                }
                Ok((AdminToken::from_value(token, path.clone()), false))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Whether `presented` is the token, compared in constant time.
    #[must_use]
    pub fn verify(&self, presented: &str) -> bool {
        if presented.len() > MAX_TOKEN_LEN {
            return false;
        }
        digest(presented).ct_eq(&self.digest).into()
    }

    /// The token file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_owner_only_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, created) = AdminToken::load_or_create(dir.path()).unwrap();
        assert!(created);
        let text = std::fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap();
        let token = text.trim();
        assert!(
            token.starts_with(TOKEN_PREFIX) && token.len() == 47,
            "{token}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        assert!(t1.verify(token));
        assert!(!t1.verify(&token[..token.len() - 1]));
        assert!(!t1.verify(""));
        assert!(!format!("{t1:?}").contains(token));
        let (t2, created) = AdminToken::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert!(t2.verify(token));
    }

    #[test]
    fn a_broken_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "short\n").unwrap();
        assert!(matches!(
            AdminToken::load_or_create(dir.path()),
            Err(TokenError::Invalid(_))
        ));
    }
}
