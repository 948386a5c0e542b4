//! Bearer tokens with read and write rights on key prefixes.
//!
//! The token file (`--auth-file`, TOML, or JSON when its name ends in
//! `.json`) lists tokens, each stored as the SHA-256 of the token (or, for
//! development, as the plain token) with the key prefixes it may read and
//! write. [`admit`] resolves the `Authorization: Bearer` header once
//! per request and puts the [`Access`] it grants in the request's extensions;
//! handlers ask it about every key they touch.
//!
//! Tokens are compared as SHA-256 digests, in constant time and against every
//! stored digest, so neither the time an answer takes nor the file tells a
//! token. The rules live in an [`ArcSwap`]: [`Auth::reload`] (on SIGHUP)
//! replaces them without touching a connection, and a file that does not
//! load keeps the rules in force.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::error::ApiError;

/// The SHA-256 of a token, as the token file stores it (lowercase hex).
pub fn token_sha256_hex(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        let (hi, lo) = (digit(pair[0])?, digit(pair[1])?);
        *byte = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// What one token may do: read and write keys under its prefixes (the empty
/// prefix is every key). Writing does not imply reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    /// The token's name in the file, for logs.
    pub name: String,
    /// The key prefixes it may read.
    pub read: Vec<Vec<u8>>,
    /// The key prefixes it may write.
    pub write: Vec<Vec<u8>>,
}

impl Rights {
    /// Whether the token may read `key`.
    pub fn can_read(&self, key: &[u8]) -> bool {
        self.read.iter().any(|p| key.starts_with(p))
    }

    /// Whether the token may write `key`.
    pub fn can_write(&self, key: &[u8]) -> bool {
        self.write.iter().any(|p| key.starts_with(p))
    }
}

/// One `[[token]]` of the file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// Why a token file did not load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The token file.
        path: PathBuf,
        /// What reading it failed with.
        source: std::io::Error,
    },
    /// The text does not parse, or a token in it is wrong; the message names
    /// the token and what is wrong with it.
    #[error("{0}")]
    Invalid(String),
    /// The file at `path` is invalid.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<AuthError>,
    },
}

/// Every token of one load of the file.
#[derive(Debug, Default)]
pub struct TokenRules {
    tokens: Vec<([u8; 32], Arc<Rights>)>,
}

impl TokenRules {
    /// Parses a token file; `json` picks JSON over TOML.
    ///
    /// # Errors
    /// A message that names the token and what is wrong with it.
    pub fn parse(text: &str, json: bool) -> Result<Self, AuthError> {
        Self::parse_text(text, json).map_err(AuthError::Invalid)
    }

    fn parse_text(text: &str, json: bool) -> Result<Self, String> {
        let file: TokenFile = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string())?
        };
        let mut tokens: Vec<([u8; 32], Arc<Rights>)> = Vec::with_capacity(file.token.len());
        for entry in file.token {
            let name = entry.name;
            let digest = match (entry.sha256, entry.token) {
                (Some(hash), None) => unhex(hash.trim()).ok_or_else(|| {
                    format!("token '{name}': sha256 must be 64 hex digits (kvstore token hash)")
                })?,
                (None, Some(plain)) if !plain.is_empty() => Sha256::digest(plain.as_bytes()).into(),
                (None, Some(_)) => return Err(format!("token '{name}': the token is empty")),
                _ => {
                    return Err(format!(
                        "token '{name}': give exactly one of sha256 and token"
                    ));
                }
            };
            if tokens.iter().any(|(d, _)| *d == digest) {
                return Err(format!("token '{name}': the same token is listed twice"));
            }
            let prefixes = |list: Vec<String>, what: &str| -> Result<Vec<Vec<u8>>, String> {
                list.into_iter()
                    .map(|p| {
                        if p.as_bytes().contains(&0) {
                            Err(format!(
                                "token '{name}': a {what} prefix contains a NUL byte"
                            ))
                        } else {
                            Ok(p.into_bytes())
                        }
                    })
                    .collect()
            };
            let rights = Rights {
                read: prefixes(entry.read, "read")?,
                write: prefixes(entry.write, "write")?,
                name,
            };
            tokens.push((digest, Arc::new(rights)));
        }
        Ok(TokenRules { tokens })
    }

    /// Reads and parses a token file (JSON when its name ends in `.json`).
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Self::parse(&text, json).map_err(|err| AuthError::InFile {
            path: path.to_owned(),
            source: Box::new(err),
        })
    }

    /// How many tokens are listed.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is listed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The rights of `token`, if it is listed. Every stored digest is compared,
    /// in constant time, whichever matches.
    pub(crate) fn resolve(&self, token: &str) -> Option<Arc<Rights>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (stored, rights) in &self.tokens {
            if bool::from(stored.ct_eq(&digest)) {
                found = Some(Arc::clone(rights));
            }
        }
        found
    }
}

/// The token rules in force, and where they come from.
pub struct Auth {
    path: PathBuf,
    rules: ArcSwap<TokenRules>,
    /// Whether `GET /metrics` is served without a token.
    pub metrics_open: bool,
}

impl Auth {
    /// Loads the token file at `path`.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn load(path: impl Into<PathBuf>, metrics_open: bool) -> Result<Self, AuthError> {
        let path = path.into();
        let rules = TokenRules::load(&path)?;
        Ok(Auth {
            path,
            rules: ArcSwap::from_pointee(rules),
            metrics_open,
        })
    }

    /// Rules given directly (tests, embedding).
    pub fn from_rules(rules: TokenRules, metrics_open: bool) -> Self {
        Auth {
            path: PathBuf::new(),
            rules: ArcSwap::from_pointee(rules),
            metrics_open,
        }
    }

    /// Reads the file again; on failure the rules in force stay.
    ///
    /// # Errors
    /// Why the file did not load.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let rules = TokenRules::load(&self.path)?;
        let count = rules.len();
        self.rules.store(Arc::new(rules));
        Ok(count)
    }

    /// The token file (empty for [`Auth::from_rules`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rights of `token` under the rules in force, if it is listed.
    pub(crate) fn resolve(&self, token: &str) -> Option<Arc<Rights>> {
        self.rules.load().resolve(token)
    }

    /// Reloads the file on every SIGHUP, for as long as the runtime runs.
    /// Connections and requests in flight are not touched.
    #[cfg(unix)]
    pub fn reload_on_sighup(self: &Arc<Self>) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let auth = Arc::clone(self);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match auth.reload() {
                    Ok(tokens) => tracing::info!(
                        file = %auth.path.display(),
                        tokens,
                        "SIGHUP: token file reloaded"
                    ),
                    Err(err) => tracing::error!(
                        error = %err,
                        "SIGHUP: the token file did not load; the previous tokens stay in force"
                    ),
                }
            }
        });
        Ok(())
    }
}

/// What the request may do, put in its extensions by [`admit`].
#[derive(Debug, Clone)]
pub(crate) enum Access {
    /// Auth is off: everything is allowed.
    Open,
    Token(Arc<Rights>),
}

/// A key range: lower bound included (or none), upper bound excluded (or none).
pub(crate) type Range = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The overlap of two ranges, if not empty.
fn intersect(a: &Range, b: &Range) -> Option<Range> {
    let lower = match (&a.0, &b.0) {
        (Some(x), Some(y)) => Some(x.max(y).clone()),
        (x, y) => x.clone().or_else(|| y.clone()),
    };
    let upper = match (&a.1, &b.1) {
        (Some(x), Some(y)) => Some(x.min(y).clone()),
        (x, y) => x.clone().or_else(|| y.clone()),
    };
    match (&lower, &upper) {
        (Some(l), Some(u)) if l >= u => None,
        _ => Some((lower, upper)),
    }
}

fn forbidden_key(rights: &Rights, verb: &str, key: &[u8], at: &str) -> ApiError {
    ApiError::forbidden(format!(
        "{at}token '{}' may not {verb} key '{}'",
        rights.name,
        String::from_utf8_lossy(key)
    ))
}

impl Access {
    /// `Ok` when the key may be read; `at` prefixes the message (`keys[2]: `).
    pub fn check_read(&self, key: &[u8], at: &str) -> Result<(), ApiError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(r) if r.can_read(key) => Ok(()),
            Access::Token(r) => Err(forbidden_key(r, "read", key, at)),
        }
    }

    pub fn check_write(&self, key: &[u8], at: &str) -> Result<(), ApiError> {
        match self {
            Access::Open => Ok(()),
            Access::Token(r) if r.can_write(key) => Ok(()),
            Access::Token(r) => Err(forbidden_key(r, "write", key, at)),
        }
    }

    /// The part of `range` that the request may list. A range is served when
    /// it meets exactly one of the token's readable prefixes (prefixes inside
    /// another readable prefix count as that one), and it is clipped to that
    /// prefix; a range that meets none or several is refused.
    pub fn clip(&self, range: Range) -> Result<Range, ApiError> {
        let Access::Token(rights) = self else {
            return Ok(range);
        };
        // Drop prefixes that another readable prefix already covers.
        let outer: Vec<&Vec<u8>> = rights
            .read
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                !rights.read.iter().enumerate().any(|(j, q)| {
                    p.starts_with(q) && (p.len() > q.len() || (p.len() == q.len() && j < *i))
                })
            })
            .map(|(_, p)| p)
            .collect();
        let mut overlaps = outer.iter().filter_map(|p| {
            let readable = (
                (!p.is_empty()).then(|| p.to_vec()),
                crate::storage::changes::prefix_end(p),
            );
            intersect(&range, &readable).map(|r| (p, r))
        });
        let names = || {
            outer
                .iter()
                .map(|p| format!("'{}'", String::from_utf8_lossy(p)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (overlaps.next(), overlaps.next()) {
            (Some((_, clipped)), None) => Ok(clipped),
            (None, _) => Err(ApiError::forbidden(format!(
                "token '{}' may read no key in this range; it may read keys under: {}",
                rights.name,
                names()
            ))),
            (Some(_), Some(_)) => Err(ApiError::forbidden(format!(
                "this range spans several prefixes that token '{}' may read ({}); \
                 list one prefix at a time",
                rights.name,
                names()
            ))),
        }
    }
}

/// The bearer token of a request, if it has a well-formed one.
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Paths served to anyone: liveness and readiness probes carry no token, and
/// the console's files are static (its API calls carry the user's token).
fn is_open_path(path: &str, auth: &Auth, ui: bool) -> bool {
    matches!(path, "/healthz" | "/readyz")
        || (path == "/metrics" && auth.metrics_open)
        || (ui && (path == "/ui" || path.starts_with(super::console::ROOT)))
}

/// Resolves the token once per request and gives `request` the [`Access`]
/// it grants, in its extensions; or, when it has no known token and its path
/// is not open, the 401 `unauthenticated` answer refusing it. With auth off
/// it does nothing: [`access_of`] then answers open.
pub(crate) fn admit(state: &AppState, request: &mut Request) -> Option<Response> {
    let access = match &state.auth {
        None => return None,
        Some(auth) => match bearer(request).and_then(|t| auth.resolve(t)) {
            Some(rights) => Access::Token(rights),
            None if is_open_path(request.uri().path(), auth, state.ui) => Access::Open,
            None => {
                let message = if request.headers().contains_key(header::AUTHORIZATION) {
                    "the token is not known (or the Authorization header is not 'Bearer TOKEN')"
                } else {
                    "this server requires a token: send 'Authorization: Bearer TOKEN'"
                };
                let mut response = ApiError::unauthenticated(message).into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"kvstore\""),
                );
                return Some(response);
            }
        },
    };
    request.extensions_mut().insert(access);
    None
}

/// The access of a request: open when the server has no token rules, else
/// what [`admit`] granted, refusing, never allowing, when it is missing.
pub(crate) fn access_of(
    state: &AppState,
    extensions: &axum::http::Extensions,
) -> Result<Access, ApiError> {
    if state.auth.is_none() {
        return Ok(Access::Open);
    }
    extensions
        .get::<Access>()
        .cloned()
        .ok_or_else(|| ApiError::internal("the request was not authenticated"))
}

/// A lower bound from an optional included key, for scans.
pub(crate) fn lower_bound(key: Option<Vec<u8>>) -> Bound<Vec<u8>> {
    key.map_or(Bound::Unbounded, Bound::Included)
}

/// An upper bound from an optional excluded key, for scans.
pub(crate) fn upper_bound(key: Option<Vec<u8>>) -> Bound<Vec<u8>> {
    key.map_or(Bound::Unbounded, Bound::Excluded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rights(read: &[&str], write: &[&str]) -> Access {
        Access::Token(Arc::new(Rights {
            name: "t".into(),
            read: read.iter().map(|p| p.as_bytes().to_vec()).collect(),
            write: write.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }))
    }

    fn r(lo: Option<&str>, hi: Option<&str>) -> Range {
        (
            lo.map(|s| s.as_bytes().to_vec()),
            hi.map(|s| s.as_bytes().to_vec()),
        )
    }

    #[test]
    fn parses_toml_and_json_and_resolves_in_both_forms() {
        let hash = token_sha256_hex("s3cret");
        let toml = format!(
            "[[token]]\nname = \"app\"\nsha256 = \"{hash}\"\nread = [\"users/\"]\nwrite = [\"users/\"]\n\
             [[token]]\nname = \"dev\"\ntoken = \"plain\"\nread = [\"\"]\n"
        );
        let rules = TokenRules::parse(&toml, false).unwrap();
        assert_eq!(rules.len(), 2);
        let app = rules.resolve("s3cret").unwrap();
        assert_eq!(app.name, "app");
        assert!(app.can_read(b"users/1") && app.can_write(b"users/1"));
        assert!(!app.can_read(b"config/x"));
        let dev = rules.resolve("plain").unwrap();
        assert!(dev.can_read(b"anything") && !dev.can_write(b"anything"));
        assert!(rules.resolve("wrong").is_none());
        assert!(rules.resolve("").is_none());

        let json = format!(r#"{{"token": [{{"name": "a", "sha256": "{hash}", "read": ["x/"]}}]}}"#);
        let rules = TokenRules::parse(&json, true).unwrap();
        assert_eq!(rules.resolve("s3cret").unwrap().read, vec![b"x/".to_vec()]);
    }

    #[test]
    fn refuses_bad_files() {
        for bad in [
            "[[token]]\nname = \"a\"\n",
            "[[token]]\nname = \"a\"\ntoken = \"x\"\nsha256 = \"00\"\n",
            "[[token]]\nname = \"a\"\nsha256 = \"zz\"\n",
            "[[token]]\nname = \"a\"\ntoken = \"\"\n",
            "[[token]]\nname = \"a\"\ntoken = \"x\"\nwirte = [\"a\"]\n",
            "[[token]]\nname = \"a\"\ntoken = \"x\"\n[[token]]\nname = \"b\"\ntoken = \"x\"\n",
            "not toml at all [",
        ] {
            assert!(TokenRules::parse(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_rights() {
        let a = rights(&["users/"], &["users/tmp/"]);
        assert!(a.check_read(b"users/1", "").is_ok());
        assert_eq!(a.check_read(b"user", "").unwrap_err().code, "forbidden");
        assert!(a.check_write(b"users/tmp/1", "").is_ok());
        let err = a.check_write(b"users/1", "ops[2]: ").unwrap_err();
        assert_eq!(err.status, 403);
        assert!(err.message.starts_with("ops[2]: "), "{}", err.message);
        assert!(Access::Open.check_write(b"x", "").is_ok());
    }

    #[test]
    fn ranges_are_clipped_to_one_readable_prefix_or_refused() {
        let a = rights(&["users/", "users/admin/", "config/"], &[]);
        // Everything: meets two prefixes.
        assert!(a.clip(r(None, None)).is_err());
        // Within one prefix: unchanged.
        assert_eq!(
            a.clip(r(Some("users/a"), Some("users/b"))).unwrap(),
            r(Some("users/a"), Some("users/b"))
        );
        // Wider than one prefix and meeting only it: clipped.
        assert_eq!(
            a.clip(r(Some("u"), Some("v"))).unwrap(),
            r(Some("users/"), Some("users0"))
        );
        assert_eq!(
            a.clip(r(Some("d"), None)).unwrap(),
            r(Some("users/"), Some("users0"))
        );
        // Meets nothing readable.
        assert_eq!(
            a.clip(r(Some("a"), Some("b"))).unwrap_err().code,
            "forbidden"
        );
        // The empty prefix reads everything.
        let all = rights(&["", "x/"], &[]);
        assert_eq!(all.clip(r(None, None)).unwrap(), r(None, None));
        let dup = rights(&["a/", "a/"], &[]);
        assert_eq!(dup.clip(r(None, None)).unwrap(), r(Some("a/"), Some("a0")));
        assert!(rights(&[], &[]).clip(r(None, None)).is_err());
    }

    #[test]
    fn hex_round_trip() {
        let hash = token_sha256_hex("abc");
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex(&unhex(&hash).unwrap()), hash);
        assert!(unhex(&hash[1..]).is_none());
    }
}
