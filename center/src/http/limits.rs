//! Request body bounds of the API: at most [`MAX_BODY`] bytes, received
//! within [`BODY_TIMEOUT`]. An oversized body is answered HTTP 413, a slow
//! one HTTP 408, both with Elkeid's envelope (code 2, `param invalid`) and a
//! message saying which bound was hit; both are counted in
//! `elkeid_center_http_bodies_refused_total`. Runs before authentication,
//! so the signature check reads an already buffered body.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::inc;

/// Largest request body (a config push with many components is a few KiB).
pub(crate) const MAX_BODY: usize = 4 * 1024 * 1024;
/// The whole body must arrive within this, once the headers are in.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(10);

fn refuse(state: &AppState, status: StatusCode, msg: String) -> Response {
    inc(&state.metrics.http_bodies_refused);
    tracing::info!(%msg, "http api: request body refused");
    let (_, json) = super::bad_request(msg);
    (status, json).into_response()
}

/// Buffers the body under both bounds.
pub(crate) async fn body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return refuse(
            &state,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes"),
        );
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return refuse(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY} bytes or malformed"),
            );
        }
        Err(_) => {
            return refuse(
                &state,
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            );
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
