//! The HTTP listener: liveness (`/healthz`), readiness (`/readyz`: not draining and the
//! database answers) and Prometheus metrics (`/metrics`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    match shared.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n"),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    let free = shared.push_bytes.available_permits();
    let inflight = shared.config.node_inflight_push_bytes.saturating_sub(free);
    shared
        .metrics
        .inflight_push_bytes
        .set(i64::try_from(inflight).unwrap_or(i64::MAX));
    shared.metrics.render()
}
