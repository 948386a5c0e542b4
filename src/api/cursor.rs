//! Opaque range cursors.
//!
//! A cursor names the last key a page returned (keyset pagination, never an
//! offset), whether the walk is reversed, and a fingerprint of the range it was
//! issued for, so a cursor passed back with other bounds, or one the server
//! never made, is refused instead of silently reading another range.
//! Layout before base64url: `format (1) | flags (1) | fingerprint (8) | last key`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const FORMAT_V1: u8 = 1;
const FLAG_REVERSE: u8 = 1;
const HEADER_LEN: usize = 10;

/// The range a cursor belongs to, as the client named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CursorScope<'a> {
    pub start: Option<&'a [u8]>,
    pub end: Option<&'a [u8]>,
    pub prefix: Option<&'a [u8]>,
    pub reverse: bool,
}

impl CursorScope<'_> {
    /// FNV-1a over the scope: stable across releases and platforms, which the
    /// standard library's hasher does not promise.
    fn fingerprint(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for part in [self.start, self.end, self.prefix] {
            match part {
                Some(bytes) => {
                    eat(&[1]);
                    eat(&(bytes.len() as u64).to_le_bytes());
                    eat(bytes);
                }
                None => eat(&[0]),
            }
        }
        hash
    }

    pub fn encode(&self, last_key: &[u8]) -> String {
        let mut raw = Vec::with_capacity(HEADER_LEN + last_key.len());
        raw.push(FORMAT_V1);
        raw.push(if self.reverse { FLAG_REVERSE } else { 0 });
        raw.extend_from_slice(&self.fingerprint().to_le_bytes());
        raw.extend_from_slice(last_key);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The last key of the page the cursor continues after, or `None` when the
    /// cursor was not issued for this scope.
    pub fn decode(&self, cursor: &str) -> Option<Vec<u8>> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        let (header, key) = raw.split_at_checked(HEADER_LEN)?;
        let (format, rest) = header.split_first()?;
        let (flags, fingerprint) = rest.split_first()?;
        let expected_flags = if self.reverse { FLAG_REVERSE } else { 0 };
        let fingerprint = u64::from_le_bytes(fingerprint.try_into().ok()?);
        (*format == FORMAT_V1
            && *flags == expected_flags
            && fingerprint == self.fingerprint()
            && !key.is_empty())
        .then(|| key.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let cursor = s.encode(b"users/42");
        assert_eq!(s.decode(&cursor), Some(b"users/42".to_vec()));
    }

    #[test]
    fn refuses_other_scopes_and_garbage() {
        let cursor = scope(Some(b"users/"), false).encode(b"users/42");
        assert_eq!(scope(Some(b"users/"), true).decode(&cursor), None);
        assert_eq!(scope(Some(b"user"), false).decode(&cursor), None);
        assert_eq!(scope(None, false).decode(&cursor), None);
        assert_eq!(scope(None, false).decode("not base64!"), None);
        assert_eq!(scope(None, false).decode(""), None);
        assert_eq!(scope(None, false).decode("AQA"), None);
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
        assert_eq!(b.decode(&a.encode(b"k")), None);
    }
}
