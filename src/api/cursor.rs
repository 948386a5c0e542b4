//! Opaque range cursors, signed by the server.
//!
//! A cursor names the last key a page returned (keyset pagination, never an
//! offset) and whether the walk is reversed. It carries an HMAC-SHA256 over
//! those and over the range it was issued for (start, end, prefix), under a
//! secret of the server ([`CursorKey`]). A client can read a cursor but not
//! change it: one that was edited, made up, or passed back with other bounds
//! is refused instead of reading from another place. On top of the signature,
//! [`CursorScope::decode`] checks that the key lies inside the range.
//!
//! Layout before base64url: `format (1) | flags (1) | last key | tag (16)`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use std::path::{Path, PathBuf};

const FORMAT_V2: u8 = 2;
const FLAG_REVERSE: u8 = 1;
const HEADER_LEN: usize = 2;
/// 128 bits of HMAC-SHA256: far beyond what guessing over HTTP can reach.
const TAG_LEN: usize = 16;
/// The shortest secret accepted.
pub const MIN_SECRET_BYTES: usize = 16;

/// The secret that signs cursors. Servers that share it accept each other's
/// cursors (several servers behind one load balancer).
#[derive(Clone)]
pub struct CursorKey(Hmac<Sha256>);

/// Why a cursor secret could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CursorKeyError {
    /// The secret is shorter than `MIN_SECRET_BYTES` (16).
    #[error("the cursor secret is {0} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort(usize),
    /// HMAC-SHA256 refused the secret.
    #[error("HMAC-SHA256 refuses a secret of {0} bytes")]
    Refused(usize),
    /// The system's random source failed.
    #[error("the system's random source failed")]
    NoRandomness,
    /// A new secret could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The secret's file.
        path: PathBuf,
        /// What writing it failed with.
        source: std::io::Error,
    },
}

impl CursorKey {
    /// A key from a secret of at least `MIN_SECRET_BYTES` (16) bytes.
    ///
    /// # Errors
    /// When the secret is shorter.
    pub fn new(secret: &[u8]) -> Result<Self, CursorKeyError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(CursorKeyError::TooShort(secret.len()));
        }
        Hmac::<Sha256>::new_from_slice(secret)
            .map(CursorKey)
            .map_err(|_| CursorKeyError::Refused(secret.len()))
    }

    /// A fresh random key, for a server whose cursors need not outlive it.
    ///
    /// # Errors
    /// When the system's random source fails.
    pub fn random() -> Result<Self, CursorKeyError> {
        Self::new(&Self::random_secret()?)
    }

    /// 32 bytes from the operating system's random source: a secret for
    /// [`CursorKey::new`] that servers can share.
    ///
    /// # Errors
    /// When the random source fails.
    pub fn random_secret() -> Result<[u8; 32], CursorKeyError> {
        let mut secret = [0u8; 32];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut secret)
            .map_err(|_| CursorKeyError::NoRandomness)?;
        Ok(secret)
    }

    /// Makes a random secret and writes it to `path` as 64 hex digits (mode
    /// 0600 on Unix), atomically and durably: a power cut must not leave a
    /// torn secret, nor lose one whose cursors were already handed out.
    /// Returns the secret as written, to give to [`CursorKey::new`].
    ///
    /// # Errors
    /// When the random source fails or the file cannot be written.
    pub fn write_random_secret(path: &Path) -> Result<Vec<u8>, CursorKeyError> {
        let secret = Self::random_secret()?;
        let text: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        crate::files::write_atomically(path, format!("{text}\n").as_bytes(), 0o600).map_err(
            |source| CursorKeyError::Write {
                path: path.to_owned(),
                source,
            },
        )?;
        Ok(text.into_bytes())
    }
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(..)")
    }
}

/// The range a cursor belongs to, as the client named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CursorScope<'a> {
    pub start: Option<&'a [u8]>,
    pub end: Option<&'a [u8]>,
    pub prefix: Option<&'a [u8]>,
    pub reverse: bool,
}

impl CursorScope<'_> {
    fn flags(&self) -> u8 {
        if self.reverse { FLAG_REVERSE } else { 0 }
    }

    /// The MAC over the scope and `body` (format, flags, key). Every part is
    /// length-prefixed, so no two scopes sign the same bytes.
    fn mac(&self, key: &CursorKey, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = key.0.clone();
        for part in [self.start, self.end, self.prefix] {
            match part {
                Some(bytes) => {
                    mac.update(&[1]);
                    mac.update(&(bytes.len() as u64).to_le_bytes());
                    mac.update(bytes);
                }
                None => mac.update(&[0]),
            }
        }
        mac.update(body);
        mac
    }

    pub fn encode(&self, key: &CursorKey, last_key: &[u8]) -> String {
        let mut raw = Vec::with_capacity(HEADER_LEN + last_key.len() + TAG_LEN);
        raw.push(FORMAT_V2);
        raw.push(self.flags());
        raw.extend_from_slice(last_key);
        let tag = self.mac(key, &raw).finalize().into_bytes();
        raw.extend_from_slice(tag.get(..TAG_LEN).unwrap_or_default());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Whether `key` lies in the range of this scope.
    fn contains(&self, key: &[u8]) -> bool {
        self.prefix.is_none_or(|p| key.starts_with(p))
            && self.start.is_none_or(|s| key >= s)
            && self.end.is_none_or(|e| key < e)
    }

    /// The last key of the page the cursor continues after, or `None` when
    /// this server (or one sharing its secret) did not issue the cursor for
    /// this scope.
    pub fn decode(&self, key: &CursorKey, cursor: &str) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        let body_len = raw.len().checked_sub(TAG_LEN)?;
        let (body, tag) = raw.split_at_checked(body_len)?;
        let (header, last_key) = body.split_at_checked(HEADER_LEN)?;
        // Constant-time check of the (truncated) tag.
        self.mac(key, body).verify_truncated_left(tag).ok()?;
        (header == [FORMAT_V2, self.flags()] && !last_key.is_empty() && self.contains(last_key))
            .then(|| last_key.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CursorKey {
        CursorKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn scope(prefix: Option<&[u8]>, reverse: bool) -> CursorScope<'_> {
        CursorScope {
            start: None,
            end: None,
            prefix,
            reverse,
        }
    }

    #[test]
    fn round_trips_within_its_scope() {
        let s = scope(Some(b"users/"), false);
        let cursor = s.encode(&key(), b"users/42");
        assert_eq!(s.decode(&key(), &cursor), Some(b"users/42".to_vec()));
    }

    #[test]
    fn refuses_other_scopes_and_garbage() {
        let k = key();
        let cursor = scope(Some(b"users/"), false).encode(&k, b"users/42");
        assert_eq!(scope(Some(b"users/"), true).decode(&k, &cursor), None);
        assert_eq!(scope(Some(b"user"), false).decode(&k, &cursor), None);
        assert_eq!(scope(None, false).decode(&k, &cursor), None);
        assert_eq!(scope(None, false).decode(&k, "not base64!"), None);
        assert_eq!(scope(None, false).decode(&k, ""), None);
        assert_eq!(scope(None, false).decode(&k, "AQA"), None);
    }

    #[test]
    fn start_and_end_are_not_interchangeable() {
        let a = CursorScope {
            start: Some(b"a"),
            end: None,
            prefix: None,
            reverse: false,
        };
        let b = CursorScope {
            start: None,
            end: Some(b"a"),
            prefix: None,
            reverse: false,
        };
        assert_eq!(b.decode(&key(), &a.encode(&key(), b"k")), None);
    }

    #[test]
    fn an_edited_cursor_or_another_secret_is_refused() {
        let s = scope(None, false);
        let cursor = s.encode(&key(), b"users/42");
        let mut raw = URL_SAFE_NO_PAD.decode(&cursor).unwrap();
        // Point the cursor at another key, keeping the tag.
        raw[HEADER_LEN] = b'a';
        assert_eq!(s.decode(&key(), &URL_SAFE_NO_PAD.encode(&raw)), None);
        let other = CursorKey::new(b"another secret of 32 bytes......").unwrap();
        assert_eq!(s.decode(&other, &cursor), None);
        assert!(CursorKey::new(b"short").is_err());
    }

    #[test]
    fn a_signed_key_outside_the_range_is_refused() {
        // Signed for this very scope, but not inside it (a server bug or an
        // old secret must not widen a range).
        let s = CursorScope {
            start: Some(b"b"),
            end: Some(b"c"),
            prefix: None,
            reverse: false,
        };
        assert_eq!(s.decode(&key(), &s.encode(&key(), b"a")), None);
        assert_eq!(s.decode(&key(), &s.encode(&key(), b"c")), None);
        assert_eq!(
            s.decode(&key(), &s.encode(&key(), b"bz")),
            Some(b"bz".to_vec())
        );
    }
}
