//! The web console at `/ui/`: static files compiled into the binary (from
//! `console/` in the repository), served with a strict Content-Security-Policy.
//!
//! The files are plain ES modules and CSS, so there is no build step: what is
//! in `console/` is what the browser runs. They are few and small, and
//! `include_bytes!` keeps them in the binary with no dependency and no
//! difference between debug and release builds.
//!
//! The console is static: it holds no secret and is served to anyone (with
//! auth on, too). Every API call it makes carries the user's bearer token and
//! is checked as any client's is.

use std::sync::LazyLock;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest as _, Sha256};

use super::error::ApiError;
use super::request::percent_decode_strict;

/// The path the console is served under.
pub(crate) const ROOT: &str = "/ui/";

/// What a browser may do on a console page: run and style with the console's
/// own files only (no inline script or style, no `eval`), talk to this server
/// only, show no frame and be shown in none.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One file of the console.
struct Asset {
    name: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal) => {
        Asset {
            name: $name,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/", $name)),
        }
    };
}

static ASSETS: &[Asset] = &[
    asset!("index.html"),
    asset!("style.css"),
    asset!("favicon.svg"),
    asset!("app.js"),
    asset!("api.js"),
    asset!("sse.js"),
    asset!("dom.js"),
    asset!("keys.js"),
    asset!("entry.js"),
    asset!("live.js"),
    asset!("metrics.js"),
    asset!("chart.js"),
    asset!("server.js"),
];

/// Each file's ETag: a digest of its bytes, so that a new binary's files are
/// fetched again and an unchanged file is answered 304.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            let tag: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{tag}\"")).unwrap_or(HeaderValue::from_static("\"\""))
        })
        .collect()
});

/// `GET /ui`: the console lives at `/ui/`, where its relative links resolve.
pub(crate) async fn redirect() -> Redirect {
    // Relative, so that behind a proxy that adds a path prefix it still
    // lands on the console.
    Redirect::permanent("ui/")
}

/// `GET /ui/`: the console's page.
pub(crate) async fn index(request: Request) -> Response {
    serve("index.html", request.headers())
}

/// `GET /ui/{file}`: one of the console's files, or 404 in the API's error
/// shape (a name that is not UTF-8 once decoded is no file's either).
pub(crate) async fn file(request: Request) -> Response {
    let name = request.uri().path().strip_prefix(ROOT).unwrap_or_default();
    match percent_decode_strict(name, false) {
        Some(name) => serve(&name, request.headers()),
        None => ApiError::not_found("the console has no such file").into_response(),
    }
}

/// The media type of a console file, by its extension (the table holds no other).
fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, extension)| extension) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|asset| asset.name == name) else {
        return ApiError::not_found(format!("the console has no file '{name}'")).into_response();
    };
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    // The names do not change between versions, so the browser asks again
    // each time (no-cache) and an unchanged file costs a 304 with no body.
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|seen| seen.as_bytes() == etag.as_bytes());
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = asset.body.into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(asset.name)),
        );
        response
    };
    let out = response.headers_mut();
    out.insert(header::ETAG, etag.clone());
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_that_a_file_imports_is_served() {
        for asset in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let text = std::str::from_utf8(asset.body).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let target = line
                    .rsplit_once("from './")
                    .and_then(|(_, rest)| rest.split_once('\''))
                    .map(|(name, _)| name)
                    .unwrap_or_else(|| panic!("{}: an import not of './x.js': {line}", asset.name));
                assert!(
                    ASSETS.iter().any(|a| a.name == target),
                    "{} imports {target}, which is not served",
                    asset.name
                );
            }
        }
    }

    #[test]
    fn the_policy_allows_no_inline_code_and_no_other_origin() {
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert!(!CONTENT_SECURITY_POLICY.contains('*'));
        assert!(!CONTENT_SECURITY_POLICY.contains("http"));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let page = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(!page.contains("<script>") && !page.contains("style="));
        // An inline event handler: ` on` and letters, then `=`.
        let handler = page.match_indices(" on").any(|(at, _)| {
            let rest = &page[at + 3..];
            let name = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_lowercase())
                    .len();
            name > 0 && rest[name..].starts_with('=')
        });
        assert!(!handler, "an inline event handler");
    }
}
