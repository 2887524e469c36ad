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
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use syncgate_protocol::limits::is_valid_id;
use syncgate_protocol::{
    Body, Change, ChangeOp, Doc, ErrorCode, Filter, Mutation, MutationOp, MutationResult, Value,
};
use tokio::sync::oneshot;

use super::HttpState;
use crate::auth::Identity;
use crate::auth::scope::Access;
use crate::config::SyncMode;
use crate::error::GatewayError;
use crate::ingest::IngestRequest;
use crate::ingest::plan::PushJob;
use crate::shared::Shared;
use crate::storage::{ClientClaim, StoreError};

/// MessagePack's media type.
const MSGPACK: &str = "application/msgpack";

/// The `/v1` routes.
pub(super) fn routes() -> Router<HttpState> {
    Router::new()
        .route("/v1/batch", post(batch))
        .route("/v1/changes", get(changes))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/collections/{collection}/documents", get(list))
        .route(
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
    /// The service's client id (its exactly-once key, with the mutation ids); absent with an
    /// `Idempotency-Key`.
    #[serde(default)]
    client_id: Option<String>,
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
    authenticate_key(shared, headers)
        .await
        .map(|(identity, _)| identity)
}

/// [`authenticate`], with the key's id.
async fn authenticate_key(
    shared: &Shared,
    headers: &HeaderMap,
) -> Result<(Identity, String), Problem> {
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
            .map(|identity| (identity, key_id.to_owned()))
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
) -> Result<Response, Problem> {
    let format = Format::of(&headers, header::CONTENT_TYPE);
    let shared = &state.shared;
    let (identity, key_id) = authenticate_key(shared, &headers).await?;
    let body = read_body(shared, body).await?;
    let mut request: BatchRequest = format.decode(&body, shared.config.limits.max_depth)?;
    let client_id = match (idempotency_key(&headers), request.client_id.take()) {
        (Some(key), None) => keyed(shared, &key_id, &key, &mut request.mutations).await?,
        (None, Some(c)) => ClientId::Named(c),
        (Some(_), Some(_)) | (None, None) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidClientId,
                "name either a client_id (and number the mutations) or an Idempotency-Key",
            ));
        }
    };
    let answer = submit(shared, identity, client_id, request.mutations, body.len()).await?;
    Ok(format.respond(StatusCode::OK, &answer))
}

/// `PUT` / `PATCH` / `DELETE /v1/collections/{collection}/documents/{id}`: one mutation,
/// numbered by `Syncgate-Mutation-Id` for the client id `Syncgate-Client-Id` — or made
/// exactly-once by an `Idempotency-Key` instead — based on `Syncgate-Base-Version` if given.
async fn write(
    State(state): State<HttpState>,
    method: Method,
    Path((collection, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, Problem> {
    let format = Format::of(&headers, header::CONTENT_TYPE);
    let shared = &state.shared;
    let (identity, key_id) = authenticate_key(shared, &headers).await?;
    let body = read_body(shared, body).await?;
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
    // Who the mutation is of: a client id the service names, or an idempotency key.
    let by_key = match (text("syncgate-client-id"), idempotency_key(&headers)) {
        (Some(named), None) => Err(named.to_owned()),
        (None, Some(key)) => Ok(key),
        _ => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidClientId,
                "send either Syncgate-Client-Id with Syncgate-Mutation-Id (the service's client \
                 id and its mutation's number: the exactly-once key) or an Idempotency-Key",
            ));
        }
    };
    let base_version = number("syncgate-base-version")?;
    let mutation_id = match (number("syncgate-mutation-id")?, by_key.is_ok()) {
        (Some(m), _) => m,
        // Numbered by `keyed`.
        (None, true) => 1,
        (None, false) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMutation,
                "send Syncgate-Mutation-Id: strictly increasing per client id",
            ));
        }
    };
    let op = match method {
        Method::PUT => MutationOp::Put,
        Method::PATCH => MutationOp::Patch,
        _ => MutationOp::Delete,
    };
    let doc = if op == MutationOp::Delete {
        None
    } else {
        Some(format.decode::<Body>(&body, shared.config.limits.max_depth)?)
    };
    let mut mutations = vec![Mutation {
        mutation_id,
        collection,
        id,
        op,
        body: doc,
        base_version,
        resolves: None,
    }];
    let client_id = match by_key {
        Err(named) => ClientId::Named(named),
        Ok(key) => keyed(shared, &key_id, &key, &mut mutations).await?,
    };
    let answer = submit(shared, identity, client_id, mutations, body.len()).await?;
    Ok(format.respond(StatusCode::OK, &answer))
}

/// The request's `Idempotency-Key`, if it sent one.
fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Exactly once by `Idempotency-Key`: the request's mutations are numbered 1, 2, ... for a
/// client id of its own, derived from the API key and the idempotency key, so a repeated
/// request is a replay with the stored answers. The mutations' hash is kept with the key: the
/// same key for another request is refused (415), nothing applied.
async fn keyed(
    shared: &Shared,
    key_id: &str,
    key: &str,
    mutations: &mut [Mutation],
) -> Result<ClientId, Problem> {
    use sha2::Digest;
    if key.is_empty() || key.len() > 255 || key.chars().any(char::is_control) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidClientId,
            "an Idempotency-Key is 1 to 255 characters, none of them a control character",
        ));
    }
    for (m, n) in mutations.iter_mut().zip(1u64..) {
        m.mutation_id = n;
    }
    let digest = sha2::Sha256::digest(format!("{key_id}\n{key}").as_bytes());
    let client_id = format!(
        "{KEYED_PREFIX}{}",
        hex::encode(digest).get(..32).unwrap_or_default()
    );
    let request = hex::encode(sha2::Sha256::digest(syncgate_protocol::codec::to_msgpack(
        &mutations,
    )));
    match shared.store.remember_request(&client_id, &request).await {
        Ok(true) => Ok(ClientId::Keyed(client_id)),
        Ok(false) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used for a different request; nothing was applied",
        )),
        Err(e) => {
            tracing::error!(error = %e, "recording an idempotency key failed");
            Err(Problem::from_error(&GatewayError::Storage(
                crate::error::Step::Push,
            )))
        }
    }
}

/// Whose mutations a request carries.
enum ClientId {
    /// A client id the service named (claimed like a WebSocket hello's).
    Named(String),
    /// The client id of an `Idempotency-Key` ([`keyed`]).
    Keyed(String),
}

/// How the client ids of idempotency keys begin (reserved: a service cannot name one).
const KEYED_PREFIX: &str = "idem-";

/// Hands mutations to ingest as one job of `client_id`, as a WebSocket push does, and waits
/// for the answer.
async fn submit(
    shared: &Shared,
    identity: Identity,
    client_id: ClientId,
    mutations: Vec<Mutation>,
    size: usize,
) -> Result<WriteAnswer, Problem> {
    // A client id of an idempotency key is the API key's own (derived from its id): it does
    // not count against `max_client_ids_per_user`; the group commit records its owner on
    // first use (and refuses it to anyone else).
    let (client_id, claim) = match client_id {
        ClientId::Named(c) if c.starts_with(KEYED_PREFIX) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidClientId,
                format!("client ids starting with {KEYED_PREFIX:?} are those of idempotency keys"),
            ));
        }
        ClientId::Named(c) => (c, true),
        ClientId::Keyed(c) => (c, false),
    };
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
    match if claim {
        shared.claim_client(&client_id, &identity.user).await
    } else {
        Ok(ClientClaim::Owned { last_applied: 0 })
    } {
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
) -> Result<Response, Problem> {
    let format = Format::of(&headers, header::ACCEPT);
    let shared = &state.shared;
    let identity = authenticate(shared, &headers).await?;
    let access = Access::new(&identity, &shared.config.collections);
    if let Some(e) = shared.read_refusal(&collection, &access, SyncMode::fetchable) {
        return Err(Problem::from_error(&e));
    }
    let doc = match shared.store.document(&collection, &id).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "reading a document failed");
            return Err(Problem::from_error(&GatewayError::Storage(
                crate::error::Step::Fetch,
            )));
        }
    };
    let scope = access.scope(&collection);
    // Deleted, missing and out of scope look the same: nothing about it is said.
    let Some((body, version)) = doc
        .filter(|d| !d.deleted)
        .and_then(|d| Some((d.body?, d.version)))
        .filter(|(b, _)| scope.is_none_or(|s| s.matches(b)))
    else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            ErrorCode::DocumentNotFound,
            format!("{collection}/{id} does not exist"),
        ));
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
    Ok(r)
}

/// The pairs of a query string, percent-decoded (`+` is a space).
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (b, hex) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A query parameter that must be a whole number (`None`: absent).
fn number_param(pairs: &[(String, String)], name: &str) -> Result<Option<u64>, Problem> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| {
            v.parse().map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidFilter,
                    format!("{name} must be a whole number"),
                )
            })
        })
        .transpose()
}

/// A page of documents.
#[derive(Debug, Serialize)]
struct ListAnswer {
    /// The log position this node had published when the page was read: a reader that lists
    /// every page and then follows `GET /v1/changes?after=` from the first page's `as_of`
    /// misses nothing (changes after it may repeat documents it listed).
    as_of: u64,
    /// The documents, in id order.
    documents: Vec<Doc>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// At most this many documents (or changes) per answer.
const MAX_LIST: u64 = 1000;

/// `GET /v1/collections/{collection}/documents?where.FIELD=VALUE&after=ID&limit=N`: the
/// documents the key may read whose fields equal the filter (a value is JSON if it parses as
/// JSON, else a string), in id order, `limit` (default 100, at most 1,000) per page.
async fn list(
    State(state): State<HttpState>,
    Path(collection): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let format = Format::of(&headers, header::ACCEPT);
    let shared = &state.shared;
    let identity = authenticate(shared, &headers).await?;
    let access = Access::new(&identity, &shared.config.collections);
    if let Some(e) = shared.read_refusal(&collection, &access, SyncMode::fetchable) {
        return Err(Problem::from_error(&e));
    }
    let pairs = query_pairs(query.as_deref());
    let limit = number_param(&pairs, "limit")?
        .unwrap_or(100)
        .clamp(1, MAX_LIST);
    let mut after = pairs
        .iter()
        .find(|(k, _)| k == "after")
        .map(|(_, v)| v.clone());
    let terms: Body = pairs
        .iter()
        .filter_map(|(k, v)| {
            let field = k.strip_prefix("where.")?;
            let value =
                serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::from(v.as_str()));
            Some((field.to_owned(), value))
        })
        .collect();
    let filter = match Filter::new(&terms) {
        Ok(f) => f,
        Err(m) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidFilter,
                m,
            ));
        }
    };
    let scope = access.scope(&collection);
    let budget = shared.config.outbound_buffer_bytes;
    // Read before the documents: every change after it is either in them or still to come.
    let as_of = shared.hub.published();
    let mut documents: Vec<Doc> = Vec::new();
    let mut next = None;
    // A selective filter may scan many documents for a few: at most ten pages' worth per
    // request, then the answer says where to go on.
    let mut scanned = 0u64;
    loop {
        let page = match shared
            .store
            .documents_page(&collection, after.as_deref(), limit, budget)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "listing documents failed");
                return Err(Problem::from_error(&GatewayError::Storage(
                    crate::error::Step::Fetch,
                )));
            }
        };
        scanned += page.items.len() as u64;
        after = page.items.last().map(|d| d.id.clone()).or(after);
        for d in page.items {
            if filter.matches(&d.body) && scope.is_none_or(|s| s.matches(&d.body)) {
                documents.push(d);
            }
        }
        if !page.more {
            break;
        }
        if documents.len() as u64 >= limit || scanned >= 10 * limit {
            next = after;
            break;
        }
    }
    if documents.len() as u64 > limit {
        let cut = usize::try_from(limit).unwrap_or(usize::MAX);
        next = cut
            .checked_sub(1)
            .and_then(|i| documents.get(i))
            .map(|d| d.id.clone());
        documents.truncate(cut);
    }
    Ok(format.respond(
        StatusCode::OK,
        &ListAnswer {
            as_of,
            documents,
            next,
        },
    ))
}

/// A page of the change feed.
#[derive(Debug, Serialize)]
struct ChangesAnswer {
    /// The database's epoch: if it differs from the one you stored, start again from 0.
    epoch: String,
    /// Changes after `after`, in seq order.
    changes: Vec<Change>,
    /// Pass as `after` next time.
    next: u64,
}

/// Longest long-poll a request may ask for.
const MAX_WAIT_MS: u64 = 30_000;

/// `GET /v1/changes?collection=C&after=SEQ&limit=N&timeout_ms=T`: the changes of a collection
/// after `after` that the key may read, in seq order (a document leaving the key's scope
/// arrives as a delete), `limit` (default 100, at most 1,000) at a time. With `timeout_ms`
/// (at most 30,000) and nothing new, the answer waits until a change is published or the
/// time is up. Only published changes are answered: a later request never finds an earlier
/// seq it did not get.
async fn changes(
    State(state): State<HttpState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let format = Format::of(&headers, header::ACCEPT);
    let shared = &state.shared;
    let identity = authenticate(shared, &headers).await?;
    let pairs = query_pairs(query.as_deref());
    let Some(collection) = pairs
        .iter()
        .find(|(k, _)| k == "collection")
        .map(|(_, v)| v.clone())
    else {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::UnknownCollection,
            "name the collection: /v1/changes?collection=C&after=SEQ",
        ));
    };
    let access = Access::new(&identity, &shared.config.collections);
    if let Some(e) = shared.read_refusal(&collection, &access, SyncMode::subscribable) {
        return Err(Problem::from_error(&e));
    }
    let after = number_param(&pairs, "after")?.unwrap_or(0);
    let limit = number_param(&pairs, "limit")?
        .unwrap_or(100)
        .clamp(1, MAX_LIST);
    let wait = number_param(&pairs, "timeout_ms")?
        .unwrap_or(0)
        .min(MAX_WAIT_MS);
    let mut published = shared.hub.watch_published();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait);
    let scope = access.scope(&collection);
    let mut cursor = after;
    let mut out = Vec::new();
    // Until a change of this collection (that the key may see) is published, or time is up:
    // changes elsewhere move the cursor on without an answer.
    loop {
        let mut timed_out = false;
        while *published.borrow_and_update() <= cursor {
            tokio::select! {
                changed = published.changed() => if changed.is_err() { timed_out = true; break },
                _ = tokio::time::sleep_until(deadline) => { timed_out = true; break },
                _ = shared.shutdown.cancelled() => { timed_out = true; break },
            }
        }
        let upto = *published.borrow();
        if upto <= cursor {
            break;
        }
        let page = match shared
            .store
            .read_changes(
                &collection,
                cursor,
                upto,
                limit,
                shared.config.outbound_buffer_bytes,
                scope.is_some(),
            )
            .await
        {
            Ok(p) => p,
            Err(StoreError::CursorTooOld { horizon, .. }) => {
                return Err(Problem::new(
                    StatusCode::GONE,
                    ErrorCode::CursorTooOld,
                    format!(
                        "changes after {cursor} of {collection:?} were compacted (the horizon \
                         is {horizon}): list the collection again and follow the changes from \
                         the first page's as_of"
                    ),
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "reading changes failed");
                return Err(Problem::from_error(&GatewayError::Storage(
                    crate::error::Step::Fetch,
                )));
            }
        };
        cursor = if page.more {
            page.items.last().map_or(upto, |e| e.change.seq)
        } else {
            upto
        };
        for e in page.items {
            let c = &e.change;
            let Some(scope) = scope else {
                out.push(c.clone());
                continue;
            };
            let now_in = c.body.as_ref().is_some_and(|b| scope.matches(b));
            let was_in = e.prev_body.as_ref().is_some_and(|b| scope.matches(b));
            if now_in {
                out.push(c.clone());
            } else if was_in {
                // It left the key's scope: to this reader it is gone.
                out.push(Change {
                    op: ChangeOp::Delete,
                    body: None,
                    ..c.clone()
                });
            }
        }
        if !out.is_empty() || page.more || timed_out || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    let next = cursor;
    Ok(format.respond(
        StatusCode::OK,
        &ChangesAnswer {
            epoch: shared.store.epoch().to_owned(),
            changes: out,
            next,
        },
    ))
}

/// `GET /v1/openapi.json`: this API, described (OpenAPI 3.1). It needs no key.
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec_pretty(&openapi_document()).unwrap_or_default(),
    )
        .into_response()
}

/// The OpenAPI document of `/v1` (tested against the routes: every operation it lists
/// answers, and no other method does).
fn openapi_document() -> serde_json::Value {
    use serde_json::json;
    let problem = json!({"description": "the request was refused: application/problem+json with the protocol's error code",
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let both = |schema: &str| {
        json!({
            "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
            "application/msgpack": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
        })
    };
    let write_headers = json!([
        {"name": "Syncgate-Client-Id", "in": "header", "required": false, "schema": {"type": "string"},
         "description": "the service's client id: with the mutation id, the exactly-once key (or send an Idempotency-Key)"},
        {"name": "Syncgate-Mutation-Id", "in": "header", "required": false, "schema": {"type": "integer", "minimum": 1},
         "description": "strictly increasing per client id; a request sent again gets the stored answer"},
        {"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255},
         "description": "instead of a client id and mutation id: the same key again gets the stored answer; for another request, 422 idempotency_key_reused"},
        {"name": "Syncgate-Base-Version", "in": "header", "required": false, "schema": {"type": "integer", "minimum": 0},
         "description": "the version the write is based on (conflict policies decide on it); absent: a blind write"},
    ]);
    let doc_path = json!([
        {"name": "collection", "in": "path", "required": true, "schema": {"type": "string"}},
        {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
    ]);
    let written = json!({"200": {"description": "one result per mutation, as in push_ack", "content": both("WriteAnswer")},
        "default": problem});
    let write_op = |summary: &str, with_body: bool| {
        let mut op = json!({"summary": summary, "parameters": write_headers, "responses": written});
        if with_body && let Some(o) = op.as_object_mut() {
            o.insert(
                "requestBody".into(),
                json!({"required": true, "content": both("Body")}),
            );
        }
        op
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "syncgate HTTP API", "version": env!("CARGO_PKG_VERSION"),
            "description": "Writes go through the gateway's group commit like WebSocket pushes; see README, 'Backend services'."},
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/batch": {"post": {"summary": "apply mutations atomically, like a push",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "instead of client_id: the mutations are numbered by the gateway and the same key again gets the stored answer"}],
                "requestBody": {"required": true, "content": both("BatchRequest")},
                "responses": written}},
            "/v1/collections/{collection}/documents/{id}": {
                "parameters": doc_path,
                "get": {"summary": "read a document", "responses": {
                    "200": {"description": "the document; ETag is its version", "content": both("Doc")},
                    "default": problem}},
                "put": write_op("create or replace a document", true),
                "patch": write_op("set fields of a document (null removes one)", true),
                "delete": write_op("delete a document", false),
            },
            "/v1/collections/{collection}/documents": {"get": {"summary": "list documents, paged, with an equality filter",
                "parameters": [
                    {"name": "collection", "in": "path", "required": true, "schema": {"type": "string"}},
                    {"name": "after", "in": "query", "schema": {"type": "string"}, "description": "the `next` of the previous page"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                    {"name": "where.FIELD", "in": "query", "schema": {"type": "string"},
                     "description": "FIELD must equal the value (JSON if it parses as JSON, else a string); repeatable"},
                ],
                "responses": {"200": {"description": "a page", "content": both("ListAnswer")}, "default": problem}}},
            "/v1/changes": {"get": {"summary": "the change feed of a collection (long-poll)",
                "parameters": [
                    {"name": "collection", "in": "query", "required": true, "schema": {"type": "string"}},
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                    {"name": "timeout_ms", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 30000, "default": 0}},
                ],
                "responses": {"200": {"description": "changes after `after`", "content": both("ChangesAnswer")},
                    "410": {"description": "`after` is older than the collection's compaction horizon (cursor_too_old, 308): list the collection again",
                        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
                    "default": problem}}},
            "/v1/openapi.json": {"get": {"summary": "this document", "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}}}},
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                "description": "an API key (`syncgate admin api-keys create`)"}},
            "schemas": {
                "Body": {"type": "object", "description": "a document: field -> value"},
                "Mutation": {"type": "object", "required": ["mutation_id", "collection", "id", "op"], "properties": {
                    "mutation_id": {"type": "integer", "minimum": 1}, "collection": {"type": "string"},
                    "id": {"type": "string"}, "op": {"enum": ["put", "patch", "delete"]},
                    "body": {"$ref": "#/components/schemas/Body"}, "base_version": {"type": ["integer", "null"]},
                    "resolves": {"type": "string"}}},
                "BatchRequest": {"type": "object", "required": ["mutations"], "properties": {
                    "client_id": {"type": "string"},
                    "mutations": {"type": "array", "items": {"$ref": "#/components/schemas/Mutation"}}}},
                "MutationResult": {"type": "object", "required": ["mutation_id", "status"], "properties": {
                    "mutation_id": {"type": "integer"}, "status": {"enum": ["applied", "rejected"]},
                    "version": {"type": ["integer", "null"]}, "code": {"type": ["integer", "null"]},
                    "reason": {"type": ["string", "null"]},
                    "conflict": {"type": "object", "properties": {"id": {"type": "string"},
                        "version": {"type": "integer"}, "body": {"$ref": "#/components/schemas/Body"}}}}},
                "WriteAnswer": {"type": "object", "required": ["results", "visible_at"], "properties": {
                    "results": {"type": "array", "items": {"$ref": "#/components/schemas/MutationResult"}},
                    "visible_at": {"type": "integer"}}},
                "Doc": {"type": "object", "required": ["id", "version", "body"], "properties": {
                    "collection": {"type": "string"}, "id": {"type": "string"}, "version": {"type": "integer"},
                    "body": {"$ref": "#/components/schemas/Body"}}},
                "ListAnswer": {"type": "object", "required": ["as_of", "documents"], "properties": {
                    "as_of": {"type": "integer", "description": "follow /v1/changes from the first page's as_of after listing every page"},
                    "documents": {"type": "array", "items": {"$ref": "#/components/schemas/Doc"}},
                    "next": {"type": "string"}}},
                "Change": {"type": "object", "required": ["seq", "collection", "id", "op"], "properties": {
                    "seq": {"type": "integer"}, "collection": {"type": "string"}, "id": {"type": "string"},
                    "op": {"enum": ["upsert", "delete"]}, "body": {"$ref": "#/components/schemas/Body"}}},
                "ChangesAnswer": {"type": "object", "required": ["epoch", "changes", "next"], "properties": {
                    "epoch": {"type": "string"},
                    "changes": {"type": "array", "items": {"$ref": "#/components/schemas/Change"}},
                    "next": {"type": "integer"}}},
                "Problem": {"type": "object", "required": ["type", "title", "status", "code", "name", "detail"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "code": {"type": "integer", "description": "the protocol's error code (PROTOCOL.md)"},
                    "name": {"type": "string"}, "detail": {"type": "string"}}},
            },
        },
    })
}
