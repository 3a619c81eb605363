//! The HTTP API (axum), with Elkeid's paths, JSON shapes and envelope
//! (spec §5.6), so an Elkeid manager can drive this center.
//!
//! # Layout
//! - this file: router, shared state, the `{"code","msg","data"}` envelope.
//! - `auth.rs`: AK/SK HMAC-SHA256 signing and the middleware.
//! - `handlers.rs`: `/command/`, `/conn/*`, `/ping`, `/metrics`.
//! - `tls.rs`: optional HTTPS (`http.tls = true`, Elkeid's default), with the
//!   server certificate of the gRPC side.
//!
//! Plain HTTP by default; `/ping` and `/metrics` are unauthenticated, as in Elkeid.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::Value;

use crate::config::AkSk;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::sinks::Sinks;

pub(crate) mod auth;
pub(crate) mod handlers;
pub(crate) mod tls;

/// State shared by the handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: Arc<Pool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sinks: Sinks,
    pub(crate) aksk: Arc<AkSk>,
    pub(crate) auth: bool,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Elkeid's response envelope; keys in gin's order.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Envelope {
    code: i64,
    msg: String,
    data: Value,
}

/// `{"code": code, "msg": msg, "data": data}` with HTTP 200.
pub(crate) fn envelope(code: i64, msg: &str, data: Value) -> (StatusCode, Json<Envelope>) {
    (
        StatusCode::OK,
        Json(Envelope {
            code,
            msg: msg.to_string(),
            data,
        }),
    )
}

/// Success envelope.
pub(crate) fn ok(data: Value) -> (StatusCode, Json<Envelope>) {
    envelope(0, "success", data)
}

/// JSON binding failure: HTTP 400, code 2.
pub(crate) fn bad_request(msg: String) -> (StatusCode, Json<Envelope>) {
    let data = Value::String(msg);
    (
        StatusCode::BAD_REQUEST,
        Json(Envelope {
            code: 2,
            msg: "param invalid".into(),
            data,
        }),
    )
}

/// The router.
pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/command/", post(handlers::command))
        .route("/conn/list", get(handlers::conn_list))
        .route("/conn/count", get(handlers::conn_count))
        .route("/conn/stat", get(handlers::conn_stat))
        .route("/conn/reset", post(handlers::conn_reset))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ));
    Router::new()
        .route("/ping", get(handlers::ping))
        .route("/metrics", get(handlers::metrics))
        .route("/command", post(handlers::command_redirect))
        .merge(api)
        .with_state(state)
}
