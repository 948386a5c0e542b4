//! Every route of the API, and the one dispatcher that answers them.
//!
//! A path names at most one [`Route`] ([`route`] is the only place paths are
//! matched), and a route lists its methods with their handlers: the metric
//! label, the `Allow` header of a 405 and the handler all come from that one
//! entry. Every request takes the same way: matched, authenticated, handled,
//! then timed and counted by [`super::observe::observed`].
//!
//! The matching is written out rather than left to a general router: a
//! request's path is compared with a handful of fixed strings, the hottest
//! (`/v1/kv/{key}`) first. Routing a read through axum's router and its
//! middleware stack cost a quarter of the reads per second at 16
//! connections.

use std::pin::Pin;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, auth, console, handlers, leases, observe, watch};

/// A handler's answer, boxed so that every handler's has one type.
type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

type Handler = fn(AppState, Request) -> Answer;

/// One route: how metrics and logs name it, whether it waits for changes on
/// purpose, and its handler for each method it takes (HEAD is answered by
/// GET's, without the body).
pub(crate) struct Route {
    pub(crate) label: &'static str,
    /// A watch or a long poll: never a slow request.
    pub(crate) waits: bool,
    methods: &'static [(Method, Handler)],
    pub(crate) metrics: observe::RouteMetrics,
}

fn boxed<R: IntoResponse>(answer: impl Future<Output = R> + Send + 'static) -> Answer {
    Box::pin(async move { answer.await.into_response() })
}

const fn route(label: &'static str, methods: &'static [(Method, Handler)]) -> Route {
    new_route(label, false, methods)
}

/// A route that waits for changes on purpose.
const fn waiting_route(label: &'static str, methods: &'static [(Method, Handler)]) -> Route {
    new_route(label, true, methods)
}

const fn new_route(
    label: &'static str,
    waits: bool,
    methods: &'static [(Method, Handler)],
) -> Route {
    Route {
        label,
        waits,
        methods,
        metrics: observe::RouteMetrics::new(),
    }
}

static KEY: Route = route(
    "/v1/kv/{key}",
    &[
        (Method::GET, |s, r| boxed(handlers::get_key(State(s), r))),
        (Method::PUT, |s, r| boxed(handlers::put_key(State(s), r))),
        (Method::DELETE, |s, r| {
            boxed(handlers::delete_key(State(s), r))
        }),
    ],
);
static KEYS: Route = route(
    "/v1/kv",
    &[(Method::GET, |s, r| boxed(handlers::list(State(s), r)))],
);
static BATCH: Route = route(
    "/v1/batch",
    &[(Method::POST, |s, r| boxed(handlers::batch(State(s), r)))],
);
static BATCH_GET: Route = route(
    "/v1/batch/get",
    &[(Method::POST, |s, r| boxed(handlers::batch_get(State(s), r)))],
);
static LEASES: Route = route(
    "/v1/leases",
    &[(Method::POST, |s, r| boxed(leases::grant(State(s), r)))],
);
static LEASE: Route = route(
    "/v1/leases/{id}",
    &[
        (Method::GET, |s, r| boxed(leases::get(State(s), r))),
        (Method::DELETE, |s, r| boxed(leases::revoke(State(s), r))),
    ],
);
static KEEPALIVE: Route = route(
    "/v1/leases/{id}/keepalive",
    &[(Method::POST, |s, r| boxed(leases::keepalive(State(s), r)))],
);
static WATCH: Route = waiting_route(
    "/v1/watch",
    &[(Method::GET, |s, r| boxed(watch::watch(State(s), r)))],
);
static CHANGES: Route = waiting_route(
    "/v1/changes",
    &[(Method::GET, |s, r| boxed(watch::changes(State(s), r)))],
);
static HEALTHZ: Route = route(
    "/healthz",
    &[(Method::GET, |_, _| boxed(handlers::healthz()))],
);
static READYZ: Route = route(
    "/readyz",
    &[(Method::GET, |s, _| boxed(handlers::readyz(State(s))))],
);
static METRICS: Route = route(
    "/metrics",
    &[(Method::GET, |s, _| boxed(observe::metrics(State(s))))],
);
static CONSOLE: Route = route("/ui", &[(Method::GET, |_, _| boxed(console::redirect()))]);
static CONSOLE_INDEX: Route = route("/ui", &[(Method::GET, |_, r| boxed(console::index(r)))]);
static CONSOLE_FILE: Route = route("/ui", &[(Method::GET, |_, r| boxed(console::file(r)))]);
/// Where a path no route takes is counted.
pub(crate) static UNMATCHED: Route = route("unmatched", &[]);

/// The route of `path`; the console's only when it is served (`ui`).
fn route_of(path: &str, ui: bool) -> Option<&'static Route> {
    if path.starts_with("/v1/kv/") {
        return Some(&KEY);
    }
    match path {
        "/v1/kv" => Some(&KEYS),
        "/v1/batch" => Some(&BATCH),
        "/v1/batch/get" => Some(&BATCH_GET),
        "/v1/leases" => Some(&LEASES),
        "/v1/watch" => Some(&WATCH),
        "/v1/changes" => Some(&CHANGES),
        "/healthz" => Some(&HEALTHZ),
        "/readyz" => Some(&READYZ),
        "/metrics" => Some(&METRICS),
        "/ui" if ui => Some(&CONSOLE),
        console::ROOT if ui => Some(&CONSOLE_INDEX),
        _ => {
            // One segment each: a lease's id, or a console file's name.
            let segment = |prefix: &str| {
                path.strip_prefix(prefix)
                    .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            };
            let keepalive = path
                .strip_suffix("/keepalive")
                .and_then(|lease| lease.strip_prefix("/v1/leases/"))
                .filter(|id| !id.is_empty() && !id.contains('/'));
            if keepalive.is_some() {
                Some(&KEEPALIVE)
            } else if segment("/v1/leases/").is_some() {
                Some(&LEASE)
            } else if ui && segment(console::ROOT).is_some() {
                Some(&CONSOLE_FILE)
            } else {
                None
            }
        }
    }
}

/// Answers `request`: the one way every request takes.
pub(crate) async fn dispatch(state: AppState, mut request: Request) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let route = route_of(uri.path(), state.ui);
    let answer = async {
        // Before the route is known to exist, so that a client without a
        // token learns nothing about the paths.
        if let Some(refusal) = auth::admit(&state, &mut request) {
            return refusal;
        }
        let Some(route) = route else {
            return handlers::no_route(&request).into_response();
        };
        let wanted = if method == Method::HEAD {
            &Method::GET
        } else {
            &method
        };
        match route.methods.iter().find(|(m, _)| m == wanted) {
            Some((_, handler)) => handler(state.clone(), request).await,
            None => not_allowed(route),
        }
    };
    observe::observed(&state, route.unwrap_or(&UNMATCHED), &method, &uri, answer).await
}

/// 405 `method_not_allowed`, with the methods the route takes in `Allow`.
fn not_allowed(route: &Route) -> Response {
    let mut allowed: Vec<&str> = route.methods.iter().map(|(m, _)| m.as_str()).collect();
    if allowed.contains(&"GET") {
        allowed.push("HEAD");
    }
    let mut response = ApiError::method_not_allowed().into_response();
    if let Ok(allow) = HeaderValue::from_str(&allowed.join(",")) {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_routes() {
        let label = |path: &str, ui: bool| route_of(path, ui).map(|route| route.label);
        for (path, expected) in [
            ("/v1/kv/a", Some("/v1/kv/{key}")),
            ("/v1/kv/a/b/c", Some("/v1/kv/{key}")),
            ("/v1/kv/", Some("/v1/kv/{key}")),
            ("/v1/kv", Some("/v1/kv")),
            ("/v1/kvx", None),
            ("/v1/batch", Some("/v1/batch")),
            ("/v1/batch/get", Some("/v1/batch/get")),
            ("/v1/batch/put", None),
            ("/v1/leases", Some("/v1/leases")),
            ("/v1/leases/", None),
            ("/v1/leases/12", Some("/v1/leases/{id}")),
            ("/v1/leases/12/keepalive", Some("/v1/leases/{id}/keepalive")),
            ("/v1/leases//keepalive", None),
            ("/v1/leases/12/other", None),
            ("/v1/leases/1/2/keepalive", None),
            ("/v1/watch", Some("/v1/watch")),
            ("/v1/changes", Some("/v1/changes")),
            ("/healthz", Some("/healthz")),
            ("/healthz/x", None),
            ("/readyz", Some("/readyz")),
            ("/metrics", Some("/metrics")),
            ("/ui", Some("/ui")),
            ("/ui/", Some("/ui")),
            ("/ui/app.js", Some("/ui")),
            ("/ui/a/b.js", None),
            ("/", None),
        ] {
            assert_eq!(label(path, true), expected, "{path}");
        }
        for path in ["/ui", "/ui/", "/ui/app.js"] {
            assert_eq!(label(path, false), None, "{path} without the console");
        }
        assert!(route_of("/v1/watch", true).is_some_and(|r| r.waits));
        assert!(route_of("/v1/kv/a", true).is_some_and(|r| !r.waits));
    }
}
