//! The HTTP API for backend services (`/v1`): writes go through the same ingest path as a
//! WebSocket push (the same group commit, conflict policies, references, schema checks, row
//! scopes and quotas), and reads apply the same read roles, modes and scopes as a
//! subscription.
//!
//! - **Authentication:** `Authorization: Bearer <API key>` (`syncgate admin api-keys create`);
//!   the key is looked up at every request, so a revoked key stops at once.
//! - **Exactly once:** like a WebSocket client, a service names its client id
//!   (`Syncgate-Client-Id`, or `client_id` in a batch) and numbers its mutations, strictly
//!   increasing per client id. A request sent again gets the stored answer, however late.
//! - **Formats:** JSON, or MessagePack with `Content-Type: application/msgpack`; the answer
//!   is in the request's format (`Accept` for a `GET`). Bodies and mutations have the wire
//!   protocol's shape (PROTOCOL.md).
//! - **Errors:** `application/problem+json` with the stable `code` and `name` of PROTOCOL.md.
//!   A mutation's own rejection is not an HTTP error: it is a result, as in `push_ack`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use syncgate_protocol::limits::is_valid_id;
use syncgate_protocol::{Body, ErrorCode, Mutation, MutationOp, MutationResult};
use tokio::sync::oneshot;

use super::HttpState;
use crate::auth::Identity;
use crate::auth::scope::Access;
use crate::config::SyncMode;
use crate::error::GatewayError;
use crate::ingest::IngestRequest;
use crate::ingest::plan::PushJob;
use crate::shared::Shared;
use crate::storage::ClientClaim;

/// MessagePack's media type.
const MSGPACK: &str = "application/msgpack";

/// The `/v1` routes.
pub(super) fn routes() -> Router<HttpState> {
    Router::new().route("/v1/batch", post(batch)).route(
        "/v1/collections/{collection}/documents/{id}",
        get(read).put(write).patch(write).delete(write),
    )
}

/// A request's or answer's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Msgpack,
}

impl Format {
    /// The format a header names (`Content-Type` or `Accept`): MessagePack if it says so.
    fn of(headers: &HeaderMap, name: header::HeaderName) -> Format {
        let msgpack = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains(MSGPACK) || v.contains("application/x-msgpack"));
        if msgpack {
            Format::Msgpack
        } else {
            Format::Json
        }
    }

    /// Decodes a request body; MessagePack is first scanned like a frame (lengths, nesting
    /// within `max_depth`), JSON nests at most 128 deep (`serde_json`).
    fn decode<T: for<'de> Deserialize<'de>>(
        self,
        bytes: &[u8],
        max_depth: u32,
    ) -> Result<T, Problem> {
        let parsed = match self {
            Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            Format::Msgpack => syncgate_protocol::codec::scan(bytes, max_depth)
                .and_then(|()| syncgate_protocol::codec::from_msgpack(bytes))
                .map_err(|e| e.to_string()),
        };
        parsed.map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::MalformedFrame,
                format!("the request body is not a valid {self:?} request: {e}"),
            )
        })
    }

    fn respond<T: Serialize>(self, status: StatusCode, value: &T) -> Response {
        let (bytes, kind) = match self {
            Format::Json => (
                serde_json::to_vec(value).unwrap_or_default(),
                "application/json",
            ),
            Format::Msgpack => (syncgate_protocol::codec::to_msgpack(value), MSGPACK),
        };
        (status, [(header::CONTENT_TYPE, kind)], bytes).into_response()
    }
}

/// An error answer: `application/problem+json` (RFC 9457) with the protocol's error code.
#[derive(Debug, Serialize)]
struct Problem {
    #[serde(skip)]
    status: StatusCode,
    /// `about:blank`: the `code` is the stable identifier.
    r#type: &'static str,
    /// The code's name (`unknown_collection` ...).
    title: &'static str,
    /// The HTTP status, repeated in the body.
    #[serde(rename = "status")]
    status_code: u16,
    /// The protocol's numeric error code.
    code: u16,
    /// The code's name again, as in a WebSocket `error` frame.
    name: &'static str,
    /// Why, for a person (not stable).
    detail: String,
}

impl Problem {
    fn new(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            r#type: "about:blank",
            title: code.name(),
            status_code: status.as_u16(),
            code: code.code(),
            name: code.name(),
            detail: detail.into(),
        }
    }

    /// The problem for a gateway error: its code, and the status its kind calls for.
    fn from_error(e: &GatewayError) -> Problem {
        let code = e.code();
        let status = match code {
            ErrorCode::Unauthorized | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::ClientIdTaken | ErrorCode::ReplayRequired => StatusCode::CONFLICT,
            ErrorCode::ClientQuotaExceeded => StatusCode::FORBIDDEN,
            ErrorCode::ReadForbidden | ErrorCode::NotDownloadable | ErrorCode::OutOfScope => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::UnknownCollection | ErrorCode::DocumentNotFound => StatusCode::NOT_FOUND,
            ErrorCode::BatchOutputTooLarge | ErrorCode::FrameTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            c if c.code() >= 500 => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        };
        Problem::new(status, code, e.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"syncgate\""),
            );
        }
        r
    }
}

/// `POST /v1/batch`: mutations applied in one group commit, like a WebSocket push.
#[derive(Debug, Deserialize)]
struct BatchRequest {
    /// The service's client id (its exactly-once key, with the mutation ids).
    client_id: String,
    /// The mutations, strictly increasing `mutation_id`.
    mutations: Vec<Mutation>,
}

/// The answer to a write: one result per mutation, as in `push_ack`.
#[derive(Debug, Serialize)]
struct WriteAnswer {
    results: Vec<MutationResult>,
    /// Every effect of the request is visible to a subscription whose cursor reached it.
    visible_at: u64,
}

/// `GET` of one document.
#[derive(Debug, Serialize)]
struct DocAnswer {
    collection: String,
    id: String,
    /// The seq of the change that last wrote it.
    version: u64,
    body: Body,
}

/// The identity an `Authorization: Bearer` API key grants.
async fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Identity, Problem> {
    let unauthorized =
        |detail: &str| Problem::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, detail);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("send Authorization: Bearer <API key>"))?;
    let (key_id, secret) = crate::auth::api_key::parse(token.trim())
        .ok_or_else(|| unauthorized("the bearer token is not an API key (sgk_...)"))?;
    match shared.store.api_key(key_id).await {
        Ok(key) => key
            .and_then(|k| k.identity(secret))
            .ok_or_else(|| unauthorized("unknown or revoked API key")),
        Err(e) => {
            tracing::error!(error = %e, "reading an API key failed");
            Err(Problem::from_error(&GatewayError::Storage(
                crate::error::Step::Handshake,
            )))
        }
    }
}

/// A request body, at most `max_frame_bytes` (like a WebSocket frame).
async fn read_body(shared: &Shared, body: axum::body::Body) -> Result<Bytes, Problem> {
    let limit = shared.config.limits.max_frame_bytes as usize;
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::FrameTooLarge,
            format!("the request body is over {limit} bytes (max_frame_bytes)"),
        )
    })
}

async fn batch(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let format = Format::of(&headers, header::CONTENT_TYPE);
    let shared = &state.shared;
    let identity = match authenticate(shared, &headers).await {
        Ok(i) => i,
        Err(p) => return p.into_response(),
    };
    let body = match read_body(shared, body).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let request: BatchRequest = match format.decode(&body, shared.config.limits.max_depth) {
        Ok(r) => r,
        Err(p) => return p.into_response(),
    };
    submit(
        shared,
        identity,
        request.client_id,
        request.mutations,
        body.len(),
    )
    .await
    .map_or_else(IntoResponse::into_response, |a| {
        format.respond(StatusCode::OK, &a)
    })
}

/// `PUT` / `PATCH` / `DELETE /v1/collections/{collection}/documents/{id}`: one mutation,
/// numbered by `Syncgate-Mutation-Id` for the client id `Syncgate-Client-Id`, based on
/// `Syncgate-Base-Version` if given.
async fn write(
    State(state): State<HttpState>,
    method: Method,
    Path((collection, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let format = Format::of(&headers, header::CONTENT_TYPE);
    let shared = &state.shared;
    let identity = match authenticate(shared, &headers).await {
        Ok(i) => i,
        Err(p) => return p.into_response(),
    };
    let body = match read_body(shared, body).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let number = |name: &str| -> Result<Option<u64>, Problem> {
        text(name)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::InvalidMutation,
                        format!("{name} must be a whole number"),
                    )
                })
            })
            .transpose()
    };
    let Some(client_id) = text("syncgate-client-id").map(str::to_owned) else {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidClientId,
            "send Syncgate-Client-Id: the service's client id (with Syncgate-Mutation-Id, \
             its exactly-once key)",
        )
        .into_response();
    };
    let (mutation_id, base_version) = match (
        number("syncgate-mutation-id"),
        number("syncgate-base-version"),
    ) {
        (Ok(Some(m)), Ok(b)) => (m, b),
        (Ok(None), _) => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMutation,
                "send Syncgate-Mutation-Id: strictly increasing per client id",
            )
            .into_response();
        }
        (Err(p), _) | (_, Err(p)) => return p.into_response(),
    };
    let op = match method {
        Method::PUT => MutationOp::Put,
        Method::PATCH => MutationOp::Patch,
        _ => MutationOp::Delete,
    };
    let doc = if op == MutationOp::Delete {
        None
    } else {
        match format.decode::<Body>(&body, shared.config.limits.max_depth) {
            Ok(b) => Some(b),
            Err(p) => return p.into_response(),
        }
    };
    let m = Mutation {
        mutation_id,
        collection,
        id,
        op,
        body: doc,
        base_version,
        resolves: None,
    };
    submit(shared, identity, client_id, vec![m], body.len())
        .await
        .map_or_else(IntoResponse::into_response, |a| {
            format.respond(StatusCode::OK, &a)
        })
}

/// Hands mutations to ingest as one job of `client_id`, as a WebSocket push does, and waits
/// for the answer.
async fn submit(
    shared: &Shared,
    identity: Identity,
    client_id: String,
    mutations: Vec<Mutation>,
    size: usize,
) -> Result<WriteAnswer, Problem> {
    let limits = &shared.config.limits;
    if !is_valid_id(&client_id, limits.max_id_bytes) {
        return Err(Problem::from_error(&GatewayError::InvalidClientId {
            max_id_bytes: limits.max_id_bytes,
        }));
    }
    // A body may nest as deep as in a push frame, where it sits four levels down: what is
    // stored must fit in every subscriber's frames.
    let body_depth = limits.max_depth.saturating_sub(4);
    for m in &mutations {
        if let Some(b) = &m.body
            && syncgate_protocol::codec::scan(&syncgate_protocol::codec::to_msgpack(b), body_depth)
                .is_err()
        {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NestingTooDeep,
                format!(
                    "mutation {}: the body nests deeper than {body_depth} levels",
                    m.mutation_id
                ),
            ));
        }
    }
    if mutations.len() > limits.max_mutations_per_batch as usize {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BatchTooLarge,
            format!(
                "{} mutations; at most {} per request",
                mutations.len(),
                limits.max_mutations_per_batch
            ),
        ));
    }
    match shared.claim_client(&client_id, &identity.user).await {
        Ok(ClientClaim::Owned { .. }) => {}
        Ok(ClientClaim::Taken) => return Err(Problem::from_error(&GatewayError::ClientIdTaken)),
        Ok(ClientClaim::OverQuota) => {
            return Err(Problem::from_error(&GatewayError::ClientQuota {
                limit: shared.config.max_client_ids_per_user,
            }));
        }
        Err(()) => {
            return Err(Problem::from_error(&GatewayError::Storage(
                crate::error::Step::Handshake,
            )));
        }
    }
    let started = Instant::now();
    let n = u32::try_from(size).unwrap_or(u32::MAX);
    let Ok(permit) = shared.push_bytes.clone().acquire_many_owned(n).await else {
        return Err(Problem::from_error(&GatewayError::Draining));
    };
    let access = Arc::new(Access::new(&identity, &shared.config.collections));
    let (reply, rx) = oneshot::channel();
    let req = IngestRequest {
        job: PushJob {
            client_id,
            user: identity.user,
            access,
            batch: 0,
            mutations,
        },
        reply,
        permit,
    };
    if shared.ingest.send(req).await.is_err() {
        return Err(Problem::from_error(&GatewayError::Draining));
    }
    match rx.await {
        Ok(Ok(outcome)) => {
            shared
                .metrics
                .push_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(WriteAnswer {
                results: outcome.results,
                visible_at: outcome.visible_at,
            })
        }
        Ok(Err(e)) => Err(Problem::from_error(&e)),
        Err(_) => Err(Problem::from_error(&GatewayError::IngestStopped)),
    }
}

/// `GET /v1/collections/{collection}/documents/{id}`: the document as the server holds it, if
/// the key may read it (read roles, mode, row scope); `ETag` is its version.
async fn read(
    State(state): State<HttpState>,
    Path((collection, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let format = Format::of(&headers, header::ACCEPT);
    let shared = &state.shared;
    let identity = match authenticate(shared, &headers).await {
        Ok(i) => i,
        Err(p) => return p.into_response(),
    };
    let access = Access::new(&identity, &shared.config.collections);
    if let Some(e) = shared.read_refusal(&collection, &access, SyncMode::fetchable) {
        return Problem::from_error(&e).into_response();
    }
    let doc = match shared.store.document(&collection, &id).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "reading a document failed");
            return Problem::from_error(&GatewayError::Storage(crate::error::Step::Fetch))
                .into_response();
        }
    };
    let scope = access.scope(&collection);
    // Deleted, missing and out of scope look the same: nothing about it is said.
    let Some((body, version)) = doc
        .filter(|d| !d.deleted)
        .and_then(|d| Some((d.body?, d.version)))
        .filter(|(b, _)| scope.is_none_or(|s| s.matches(b)))
    else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            ErrorCode::DocumentNotFound,
            format!("{collection}/{id} does not exist"),
        )
        .into_response();
    };
    let mut r = format.respond(
        StatusCode::OK,
        &DocAnswer {
            collection,
            id,
            version,
            body,
        },
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, etag);
    }
    r
}
