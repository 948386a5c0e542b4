//! The security flags of `kvstore serve` (tokens, TLS, the cursor secret,
//! the header-read timeout), and `kvstore token`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvstore::server::{Auth, CursorKey, Security, token_sha256_hex};

use super::Failure;

#[derive(clap::Args)]
pub(crate) struct SecurityArgs {
    /// Token file (TOML, or JSON when it ends in .json): the tokens and the
    /// key prefixes each may read and write. Reloaded on SIGHUP. Without it,
    /// auth is off.
    #[arg(long, env = "KVSTORE_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// Serve GET /metrics without a token when auth is on.
    #[arg(long, env = "KVSTORE_METRICS_OPEN", default_value_t = false, action = clap::ArgAction::Set)]
    metrics_open: bool,
    /// PEM certificate chain (the server's certificate first): serve HTTPS.
    #[arg(long, env = "KVSTORE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "KVSTORE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a client has to send a request's headers (and to finish the
    /// TLS handshake) before its connection is closed.
    #[arg(long, env = "KVSTORE_HEADER_READ_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_secs: u64,
    /// File holding the secret that signs range cursors (at least 16 bytes;
    /// surrounding white space is ignored). Servers sharing a secret accept
    /// each other's cursors. Default: DATA_DIR/cursor-secret, created with
    /// mode 0600.
    #[arg(
        long,
        env = "KVSTORE_CURSOR_SECRET_FILE",
        conflicts_with = "cursor_secret"
    )]
    cursor_secret_file: Option<PathBuf>,
    /// The cursor secret itself; prefer the environment variable, which
    /// other users cannot see in the process list.
    #[arg(long, env = "KVSTORE_CURSOR_SECRET", hide_env_values = true)]
    cursor_secret: Option<String>,
}

/// The name of the cursor secret made in the data directory.
const CURSOR_SECRET_FILE: &str = "cursor-secret";

impl SecurityArgs {
    pub(crate) fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    /// Whether the cursor secret is given rather than kept in the data directory.
    pub(crate) fn has_cursor_secret(&self) -> bool {
        self.cursor_secret.is_some() || self.cursor_secret_file.is_some()
    }

    /// Loads what the flags name; `data_dir` holds the default cursor secret.
    pub(crate) fn load(&self, data_dir: &Path) -> Result<Security, String> {
        let auth = match &self.auth_file {
            Some(path) => {
                let auth =
                    Arc::new(Auth::load(path, self.metrics_open).map_err(|e| e.to_string())?);
                #[cfg(unix)]
                auth.reload_on_sighup()
                    .map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
                Some(auth)
            }
            None => None,
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(kvstore::tls::server_config(cert, key).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        let secret = match (&self.cursor_secret, &self.cursor_secret_file) {
            (Some(secret), _) => secret.trim().as_bytes().to_vec(),
            (None, Some(path)) => read_secret(path)?,
            (None, None) => default_secret(&data_dir.join(CURSOR_SECRET_FILE))?,
        };
        let mut security = Security::default();
        security.auth = auth;
        security.tls = tls;
        security.cursor_key = Some(CursorKey::new(&secret).map_err(|e| e.to_string())?);
        Ok(security)
    }
}

fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the cursor secret can be read by other users; chmod 600 it");
        }
    }
    Ok(text.trim_ascii().to_vec())
}

/// The secret in `path`, made (random, mode 0600) when missing.
fn default_secret(path: &Path) -> Result<Vec<u8>, String> {
    if path.exists() {
        return read_secret(path);
    }
    let secret = CursorKey::write_random_secret(path).map_err(|e| e.to_string())?;
    tracing::info!(file = %path.display(), "made a new cursor secret");
    Ok(secret)
}

#[derive(clap::Args)]
pub(crate) struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand)]
enum TokenCommand {
    /// Read a token on stdin and print its SHA-256, for the sha256 field of
    /// the token file.
    Hash,
    /// Make a random token; print it, then its SHA-256.
    New,
}

pub(crate) fn token(args: TokenArgs) -> Result<(), Failure> {
    let (token, hash) = match args.command {
        TokenCommand::Hash => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Failure::usage(format!("cannot read stdin: {e}")))?;
            let token = text.strip_suffix('\n').unwrap_or(&text);
            let token = token.strip_suffix('\r').unwrap_or(token);
            if token.is_empty() {
                return Err(Failure::usage("no token on stdin"));
            }
            (None, token_sha256_hex(token))
        }
        TokenCommand::New => {
            use base64::Engine as _;
            let secret = CursorKey::random_secret().map_err(|e| Failure::general(e.to_string()))?;
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
            let hash = token_sha256_hex(&token);
            (Some(token), hash)
        }
    };
    let mut out = std::io::stdout().lock();
    if let Some(token) = token {
        writeln!(out, "{token}").map_err(Failure::output)?;
    }
    writeln!(out, "{hash}").map_err(Failure::output)
}
