//! The HTTP listener: liveness (`/healthz`), readiness (`/readyz`: not draining and the
//! database answers), Prometheus metrics (`/metrics`) and the API for backend services
//! (`/v1`, [`api`]).
//!
//! Hardened against clients that misuse it: at most [`MAX_HTTP_CONNECTIONS`] connections are
//! served at once (more are closed at accept), a connection that sends nothing for
//! [`HTTP_IDLE`] is closed, and readiness asks the database at most once per
//! [`READINESS_TTL`] however often it is polled (concurrent polls share one ping).

mod api;
mod idle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// Most HTTP connections served at once; the WebSocket listener's file descriptors are never
/// spent on silent HTTP sockets.
pub(crate) const MAX_HTTP_CONNECTIONS: usize = 256;
/// A connection that sends nothing for this long is closed (between requests too).
pub(crate) const HTTP_IDLE: Duration = Duration::from_secs(10);
/// How long a readiness answer is reused.
const READINESS_TTL: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct HttpState {
    shared: Arc<Shared>,
    /// The last readiness answer and when it was found; the lock makes concurrent polls wait
    /// for one database ping instead of each sending one.
    readiness: Arc<tokio::sync::Mutex<Option<(Instant, bool)>>>,
}

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let tls = shared.tls.clone();
    let state = HttpState {
        shared,
        readiness: Arc::new(tokio::sync::Mutex::new(None)),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/clients", get(admin_clients))
        .merge(api::routes())
        .layer(axum::middleware::from_fn(idle::busy))
        .with_state(state);
    let listener = idle::Bounded::new(listener, MAX_HTTP_CONNECTIONS, HTTP_IDLE, tls);
    let app = app.into_make_service_with_connect_info::<idle::Busy>();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

/// `GET /admin/clients` (`Authorization: Bearer <auth.admin_key>`): every session of this
/// node — client id, user, agent, address, since when, its subscriptions with their queued
/// position and lag behind the published head, outbound bytes held, last push, and the
/// highest mutation id handled. 404 without an admin key configured, 401 with a wrong one.
async fn admin_clients(
    State(state): State<HttpState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use sha2::Digest;
    use std::sync::atomic::Ordering::Relaxed;
    let shared = &state.shared;
    let key = &shared.config.auth.admin_key;
    if key.is_empty() {
        return (StatusCode::NOT_FOUND, "no admin key configured\n").into_response();
    }
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Digests of equal length compared, not the keys: no early exit on the first difference.
    if sha2::Sha256::digest(given.as_bytes()) != sha2::Sha256::digest(key.as_bytes()) {
        return (StatusCode::UNAUTHORIZED, "wrong or missing admin key\n").into_response();
    }
    let published = shared.hub.published();
    let clients: Vec<serde_json::Value> = shared
        .clients
        .iter()
        .map(|c| {
            let subs: Vec<serde_json::Value> = c
                .subs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .map(|e| {
                    serde_json::json!({"sub": e.sub, "collection": e.collection,
                        "live": e.is_live(), "position": e.position(),
                        "lag": published.saturating_sub(e.position())})
                })
                .collect();
            serde_json::json!({"session": format!("{:016x}", c.key()),
                "client_id": c.client_id, "user": c.user, "agent": c.agent,
                "peer": c.peer.to_string(), "connected_at_ms": c.connected_at_ms,
                "subscriptions": subs, "outbound_bytes": c.out.queued_bytes(),
                "last_push_at_ms": c.last_push_ms.load(Relaxed),
                "applied_mutation": c.applied.load(Relaxed)})
        })
        .collect();
    let body = serde_json::json!({"published": published, "clients": clients}).to_string();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    match readiness(&state).await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Whether the node takes clients: not draining, and its database answered a ping within
/// the last [`READINESS_TTL`]. `Err` says why not.
async fn readiness(state: &HttpState) -> Result<(), &'static str> {
    if state.shared.draining.is_cancelled() {
        return Err("draining\n");
    }
    let ready = {
        let mut last = state.readiness.lock().await;
        match *last {
            Some((at, ready)) if at.elapsed() < READINESS_TTL => ready,
            _ => {
                state.shared.metrics.readiness_checks.inc();
                let ready = state.shared.store.ping().await.is_ok();
                *last = Some((Instant::now(), ready));
                ready
            }
        }
    };
    if ready {
        Ok(())
    } else {
        Err("database unavailable\n")
    }
}

async fn metrics(State(state): State<HttpState>) -> String {
    let shared = &state.shared;
    let free = shared.push_bytes.available_permits();
    let inflight = shared.config.node_inflight_push_bytes.saturating_sub(free);
    shared
        .metrics
        .inflight_push_bytes
        .set(i64::try_from(inflight).unwrap_or(i64::MAX));
    let ready = readiness(&state).await.is_ok();
    shared.metrics.ready.set(i64::from(ready));
    let (open, idle, max) = shared.store.pool_stats();
    let m = &shared.metrics;
    m.db_pool
        .with_label_values(&["in_use"])
        .set(i64::from(open.saturating_sub(idle)));
    m.db_pool.with_label_values(&["idle"]).set(i64::from(idle));
    m.db_pool_max.set(i64::from(max));
    // Every subscription's lag, bucketed: a handful of bounded series whatever the count.
    let published = shared.hub.published();
    let mut counts = [0i64; crate::metrics::LAG_BUCKETS.len()];
    for c in shared.clients.iter() {
        for e in c.subs.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let bucket = crate::metrics::lag_bucket(published.saturating_sub(e.position()));
            if let Some(i) = crate::metrics::LAG_BUCKETS
                .iter()
                .position(|(_, l)| *l == bucket)
                && let Some(n) = counts.get_mut(i)
            {
                *n += 1;
            }
        }
    }
    for ((_, label), n) in crate::metrics::LAG_BUCKETS.iter().zip(counts) {
        m.subscriber_lag.with_label_values(&[*label]).set(n);
    }
    m.render()
}
