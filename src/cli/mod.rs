//! The subcommands of the `kvstore` binary, one module per group, and what
//! the client subcommands share: the server URL, output, exit codes.

pub(crate) mod bench;
pub(crate) mod dump;
pub(crate) mod kv;
pub(crate) mod lease;
pub(crate) mod security;
pub(crate) mod serve;
pub(crate) mod watch;

use std::fmt;
use std::io::{IsTerminal as _, Write};
use std::process::ExitCode;

use hyper::StatusCode;
use indicatif::{ProgressBar, ProgressStyle};
use kvstore::client::{Client, ClientError, ClientOptions};
use kvstore::storage::LeaseId;
use kvstore::types::{check_ttl_ms, parse_lease_id};
use serde::Serialize;

/// The server that a client subcommand talks to.
#[derive(clap::Args)]
pub(crate) struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "KVSTORE_URL", default_value = "http://127.0.0.1:7070",
          value_parser = http_url)]
    url: String,
    /// Bearer token for a server with --auth-file; prefer the environment
    /// variable, which other users cannot see in the process list.
    #[arg(long, env = "KVSTORE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificate that an https:// server's certificate must chain
    /// to; without it, the system's trusted roots.
    #[arg(long, env = "KVSTORE_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
}

impl ServerArgs {
    fn client(&self) -> Result<Client, Failure> {
        let ca_cert_pem = self
            .ca_cert
            .as_deref()
            .map(|path| {
                std::fs::read(path)
                    .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))
            })
            .transpose()?;
        let mut options = ClientOptions::default();
        options.token = self.token.clone();
        options.ca_cert_pem = ca_cert_pem;
        Client::with_options(&self.url, &options).map_err(|err| Failure::usage(err.to_string()))
    }
}

/// Refuses a URL that the client cannot use while clap can still say so.
fn http_url(url: &str) -> Result<String, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_owned())
    } else {
        Err("expected an http:// or https:// URL such as http://127.0.0.1:7070".to_owned())
    }
}

/// A range of keys: a prefix, or bounds (neither: every key).
#[derive(clap::Args)]
pub(crate) struct RangeArgs {
    /// Only keys that begin with this.
    #[arg(long, conflicts_with_all = ["start", "end"])]
    prefix: Option<String>,
    /// First key (inclusive).
    #[arg(long)]
    start: Option<String>,
    /// Last key (exclusive).
    #[arg(long)]
    end: Option<String>,
}

/// How a subcommand prints its result.
#[derive(clap::Args)]
pub(crate) struct OutputArgs {
    /// Print JSON for scripts instead of text for people.
    #[arg(long)]
    json: bool,
}

/// Exit codes of the client subcommands (documented in docs/cli.md).
mod exit {
    /// Not found, a failed condition, or another failure.
    pub(super) const FAILED: u8 = 1;
    /// Bad arguments or input, including what the server rejected as such.
    pub(super) const USAGE: u8 = 2;
    /// The server cannot be reached, failed (5xx), or answered nonsense.
    pub(super) const SERVER: u8 = 3;
    /// A watch starts (or fell) before the history the server keeps.
    pub(super) const COMPACTED: u8 = 4;
}

/// Why a subcommand failed, and the exit code that says so.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    /// Empty when there is nothing to say (the reader of stdout went away).
    message: String,
}

impl Failure {
    /// Exit code 1, e.g. for `serve`.
    pub(crate) fn general(message: impl Into<String>) -> Self {
        Failure {
            code: exit::FAILED,
            message: message.into(),
        }
    }

    /// The failure of a command on a key that does not exist.
    fn absent_key(key: &str) -> Self {
        Failure::general("the key does not exist").about_key(key)
    }

    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: exit::USAGE,
            message: message.into(),
        }
    }

    /// A failed write to stdout. When its reader went away (`| head`),
    /// stopping quietly is what a pipeline expects.
    fn output(err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            Failure {
                code: 0,
                message: String::new(),
            }
        } else {
            Failure::general(format!("cannot write the output: {err}"))
        }
    }

    /// The same failure, its message prefixed with the key it was about.
    fn about_key(self, key: &str) -> Self {
        self.context(format_args!("key '{key}'"))
    }

    /// The same failure, its message prefixed with what it was about.
    fn context(mut self, about: impl fmt::Display) -> Self {
        if !self.message.is_empty() {
            self.message = format!("{about}: {}", self.message);
        }
        self
    }

    /// Prints the message to stderr; the exit code.
    pub(crate) fn report(self) -> ExitCode {
        if !self.message.is_empty() {
            eprintln!("kvstore: {}", self.message);
        }
        ExitCode::from(self.code)
    }
}

impl From<ClientError> for Failure {
    /// The server's own message, then its status, code and details, e.g.
    /// "the condition failed: the key is at version 2 (412 version_mismatch,
    /// current_version: 2)".
    fn from(err: ClientError) -> Self {
        match &err {
            ClientError::Api { status, error } => {
                let mut message = format!("{} ({} {}", error.message, status.as_u16(), error.code);
                for (name, value) in &error.details {
                    message.push_str(&format!(", {name}: {value}"));
                }
                message.push(')');
                let code = match *status {
                    StatusCode::NOT_FOUND | StatusCode::PRECONDITION_FAILED => exit::FAILED,
                    s if s.is_server_error() => exit::SERVER,
                    _ => exit::USAGE,
                };
                Failure { code, message }
            }
            ClientError::Transport(_) | ClientError::Protocol(_) => Failure {
                code: exit::SERVER,
                message: err.to_string(),
            },
            ClientError::Compacted { .. } => Failure {
                code: exit::COMPACTED,
                message: err.to_string(),
            },
            ClientError::LeaseNotFound { .. } => Failure {
                code: exit::FAILED,
                message: err.to_string(),
            },
        }
    }
}

/// A ttl as people write it (`30s`, `1500ms`, `2m`, `1h`), in the whole
/// milliseconds that the API takes (rounded to the nearest).
fn ttl_ms(text: &str) -> Result<u64, String> {
    let duration = crate::loadgen::parse_duration(text)?;
    let ms =
        u64::try_from(duration.as_nanos().saturating_add(500_000) / 1_000_000).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(format!(
            "'{text}' is shorter than a millisecond, the shortest ttl"
        ));
    }
    check_ttl_ms(ms).map_err(|err| err.to_string())
}

/// A ttl in milliseconds as people read it: `10s`, or `1500ms` when it is
/// not a whole number of seconds.
fn ttl_text(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A lease id as `kvstore lease grant` printed it (16 hex digits).
fn lease_id(text: &str) -> Result<LeaseId, String> {
    parse_lease_id(text).map_err(|err| err.to_string())
}

/// An entry's deadline for people (`expires at T`, `expires at T, lease L`),
/// or `None` when the key has none.
fn deadline_text(expires_at: Option<&str>, lease: Option<&str>) -> Option<String> {
    match (expires_at, lease) {
        (None, None) => None,
        (Some(at), None) => Some(format!("expires at {at}")),
        (Some(at), Some(lease)) => Some(format!("expires at {at}, lease {lease}")),
        (None, Some(lease)) => Some(format!("lease {lease}")),
    }
}

/// Writes `value` as one line of JSON to `out`.
fn write_json(out: &mut (impl Write + ?Sized), value: &impl Serialize) -> Result<(), Failure> {
    serde_json::to_writer(&mut *out, value).map_err(|err| Failure::output(err.into()))?;
    out.write_all(b"\n").map_err(Failure::output)
}

/// Runs `write` on a locked, buffered stdout and flushes it.
fn with_stdout(write: impl FnOnce(&mut dyn Write) -> Result<(), Failure>) -> Result<(), Failure> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    write(&mut out)?;
    out.flush().map_err(Failure::output)
}

/// A progress bar on stderr in indicatif's `template`, drawn only when
/// stderr is a terminal (so that logs and CI output get no control
/// characters); `len` unknown gives a spinner.
fn progress_bar(len: Option<u64>, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = len.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
    match ProgressStyle::with_template(template) {
        Ok(style) => bar.with_style(style),
        Err(_) => bar,
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when
/// this is called, not when the future is first polled: until then either
/// signal would still end the process at once, and a server that has said
/// it is listening must shut down gracefully on the first SIGTERM.
fn stop_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = signal(SignalKind::interrupt()).and_then(|interrupt| {
            signal(SignalKind::terminate()).map(|terminate| (interrupt, terminate))
        });
        async move {
            match handlers {
                Ok((mut interrupt, mut terminate)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Reads a whole input: a file, or stdin for `-`.
fn read_input(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    let result = if path.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes).map(|_| bytes)
    } else {
        std::fs::read(path)
    };
    result.map_err(|err| Failure::usage(format!("cannot read {}: {err}", path.display())))
}

#[cfg(test)]
mod tests {
    use kvstore::types::{ErrorBody, ErrorCode};

    use super::*;

    fn api_error(status: StatusCode, code: ErrorCode) -> ClientError {
        ClientError::Api {
            status,
            error: ErrorBody {
                code,
                message: "why".into(),
                details: serde_json::Map::from_iter([("current_version".into(), 3.into())]),
            },
        }
    }

    #[test]
    fn exit_codes_of_client_errors() {
        let code = |err: ClientError| Failure::from(err).code;
        assert_eq!(
            code(api_error(StatusCode::NOT_FOUND, ErrorCode::NotFound)),
            1
        );
        assert_eq!(
            code(api_error(
                StatusCode::PRECONDITION_FAILED,
                ErrorCode::VersionMismatch
            )),
            1
        );
        assert_eq!(
            code(api_error(StatusCode::BAD_REQUEST, ErrorCode::InvalidKey)),
            2
        );
        assert_eq!(
            code(api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge
            )),
            2
        );
        assert_eq!(
            code(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable
            )),
            3
        );
        assert_eq!(
            code(api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal
            )),
            3
        );
        assert_eq!(code(ClientError::Transport("refused".into())), 3);
        assert_eq!(code(ClientError::Protocol("garbage".into())), 3);
        assert_eq!(
            code(ClientError::Compacted {
                compact_revision: 5,
                revision: 9
            }),
            4
        );
    }

    #[test]
    fn ttls_in_whole_milliseconds() {
        assert_eq!(ttl_ms("30s"), Ok(30_000));
        assert_eq!(ttl_ms("1500ms"), Ok(1500));
        assert_eq!(ttl_ms("2m"), Ok(120_000));
        assert_eq!(ttl_ms("1.1s"), Ok(1100));
        assert!(ttl_ms("0").unwrap_err().contains("not a positive duration"));
        assert!(
            ttl_ms("0.1ms")
                .unwrap_err()
                .contains("shorter than a millisecond")
        );
        assert!(ttl_ms("abc").unwrap_err().contains("not a duration"));
        assert!(ttl_ms("1000000h").unwrap_err().contains("from 1 to"));
        assert_eq!(
            (ttl_text(30_000), ttl_text(1500)),
            ("30s".into(), "1500ms".into())
        );
    }

    #[test]
    fn lease_not_found_fails_like_a_missing_key() {
        let failure = Failure::from(ClientError::LeaseNotFound {
            message: "lease 00000000000000ab does not exist or has expired; grant a new one".into(),
        });
        assert_eq!(failure.code, 1);
        assert!(
            failure.message.ends_with("(404 lease_not_found)"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn messages_carry_the_servers_words_and_details() {
        let failure = Failure::from(api_error(
            StatusCode::PRECONDITION_FAILED,
            ErrorCode::VersionMismatch,
        ));
        assert_eq!(
            failure.about_key("a").message,
            "key 'a': why (412 version_mismatch, current_version: 3)"
        );
    }
}
