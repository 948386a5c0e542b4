//! Where a read is served: by the primary unless the request opts into a
//! read replica with `consistency=replica`, which may lag. `min_revision`
//! bounds the lag for a client that knows a revision it must see (its own
//! write's, from any server): a replica serves the read only once it holds
//! that revision, else the primary does. The store decides whether a
//! replica can serve (see [`ReplicaReads`]); a store without replicas (the
//! embedded engine) serves every read itself, which is as fresh as reads get.

use std::sync::Arc;

use axum::http::HeaderValue;
use axum::response::Response;

use super::AppState;
use super::error::ApiError;
use super::request::Query;
use super::watch::revision_param;
use crate::error::StoreResult;
use crate::storage::ReplicaReads;

/// The query parameters of a read that say where it may be served.
pub(crate) const READ_PARAMS: [&str; 2] = ["consistency", "min_revision"];

/// The header that says who served a read that opted into a replica:
/// `replica` or `primary`.
const SERVED_BY: &str = "kv-served-by";

/// Where a read may be served.
pub(crate) struct ReadFrom {
    /// The request opted into a replica.
    replica: bool,
    /// The revision the replica must hold (0: any).
    min_revision: u64,
}

impl ReadFrom {
    /// `consistency` (`primary`, the default, or `replica`) and
    /// `min_revision` (a revision; on the primary it always holds).
    pub(crate) fn parse(query: &Query) -> Result<Self, ApiError> {
        let replica = match query.get("consistency") {
            None | Some("primary") => false,
            Some("replica") => true,
            Some(other) => {
                return Err(ApiError::invalid_request(format!(
                    "consistency must be primary or replica, not '{other}'"
                )));
            }
        };
        Ok(ReadFrom {
            replica,
            min_revision: revision_param(query, "min_revision")?.unwrap_or(0),
        })
    }

    /// The replicas the read may go to, and the revision they must hold:
    /// `None` unless the request opted in and the store has replicas.
    pub(crate) fn replicas(&self, state: &AppState) -> Option<(Arc<dyn ReplicaReads>, u64)> {
        self.replica
            .then(|| state.store.replicas())
            .flatten()
            .map(|replicas| (replicas, self.min_revision))
    }

    /// What a replica served, else what `primary` (the read on the store,
    /// not started until then) gives; with who served it.
    pub(crate) async fn or_primary<T>(
        &self,
        from_replica: Option<T>,
        primary: impl Future<Output = StoreResult<T>>,
    ) -> Result<(T, Served), ApiError> {
        if let Some(value) = from_replica {
            return Ok((value, Served::Replica));
        }
        let served = if self.replica {
            Served::Primary
        } else {
            Served::Default
        };
        Ok((primary.await?, served))
    }
}

/// Who served a read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// The store, for a read that did not opt into a replica.
    Default,
    /// The store, for a read that opted into a replica.
    Primary,
    /// A replica.
    Replica,
}

impl Served {
    fn name(self) -> Option<&'static str> {
        match self {
            Served::Default => None,
            Served::Primary => Some("primary"),
            Served::Replica => Some("replica"),
        }
    }

    /// `response` with the header that says who served it, for a read that
    /// opted into a replica.
    pub(crate) fn mark(self, mut response: Response) -> Response {
        if let Some(by) = self.name() {
            response
                .headers_mut()
                .insert(SERVED_BY, HeaderValue::from_static(by));
        }
        response
    }

    /// `error` (a 404 of the read) with a `served_by` detail, for a read
    /// that opted into a replica: a key absent on a replica may be one it
    /// has not replayed yet.
    pub(crate) fn mark_error(self, error: ApiError) -> ApiError {
        match self.name() {
            Some(by) => error.with_detail("served_by", serde_json::json!(by)),
            None => error,
        }
    }
}
