//! The HTTP API (axum), with Elkeid's paths, JSON shapes and envelope
//! (spec §5.6), so an Elkeid manager can drive this center.
//!
//! # Layout
//! - this file: router, shared state, the `{"code","msg","data"}` envelope.
//! - `auth.rs`: AK/SK HMAC-SHA256 signing and the middleware.
//! - `handlers.rs`: `/command/`, `/conn/*`, `/ping`, `/metrics`.
//! - `cluster/http.rs` also has `POST /cluster/drain` (signed; any center,
//!   clustered or not) and the `--sd-listen` router ([`sd_router`]).
//! - `limits.rs`: request body size cap and receive deadline.
//! - `cluster/http.rs` (in the cluster module): `/registry/detail` and the
//!   cluster side of `/command/` and `/conn/*` (only with `--etcd`).
//! - `tls.rs`: HTTPS (`http.tls = true`, the default, as Elkeid's), with the
//!   server certificate of the gRPC side.
//! - `serve.rs`: the HTTP/1.1 accept loop (connection cap, handshake and
//!   header deadlines), over TLS or, with `http.tls = false`, plain TCP.
//!
//! HTTPS by default; `/ping` and `/metrics` are unauthenticated, as in Elkeid.

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
pub(crate) mod limits;
pub(crate) mod serve;
pub(crate) mod tls;

/// State shared by the handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: Arc<Pool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) sinks: Sinks,
    pub(crate) aksk: Arc<AkSk>,
    pub(crate) auth: bool,
    /// Acknowledgement counters (appended to `/metrics`).
    pub(crate) acks: Arc<crate::ack::AckMetrics>,
    /// Signatures of state-changing requests already accepted.
    pub(crate) replays: Arc<auth::ReplayGuard>,
    /// Cluster membership (`--etcd`); `None` for a single center.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Registration into an Elkeid SD (`--elkeid-sd`).
    pub(crate) elkeid_sd: Option<Arc<crate::cluster::elkeid_sd::ElkeidSd>>,
    /// Forwarded (center-to-center) requests must come over a connection
    /// that presented a client certificate of the cluster CA (HTTPS API
    /// in a cluster).
    pub(crate) peer_mtls: bool,
}

/// Request extension set by the accept loop: the TLS connection presented
/// a client certificate that verified against the cluster CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientCert;

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

/// The router of the plain-HTTP service-discovery listener
/// (`--sd-listen`): `GET /registry/detail` and nothing else (read-only,
/// unauthenticated, as Elkeid's SD).
pub(crate) fn sd_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/registry/detail",
            get(crate::cluster::http::registry_detail),
        )
        .with_state(state)
}

/// The router.
pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/command/", post(handlers::command))
        .route("/conn/list", get(handlers::conn_list))
        .route("/conn/count", get(handlers::conn_count))
        .route("/conn/stat", get(handlers::conn_stat))
        .route("/conn/reset", post(handlers::conn_reset))
        .route("/cluster/drain", post(crate::cluster::http::drain))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::middleware,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::body,
        ));
    let mut root = Router::new();
    if state.cluster.is_some() {
        // Elkeid's service-discovery read, unauthenticated as Elkeid's SD.
        root = root.route(
            "/registry/detail",
            get(crate::cluster::http::registry_detail),
        );
    }
    root.route("/ping", get(handlers::ping))
        .route("/metrics", get(handlers::metrics))
        .route("/command", post(handlers::command_redirect))
        .merge(api)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CommandConfig;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::time::Duration;

    async fn start(auth: bool) -> (String, Arc<Pool>) {
        let metrics = Arc::new(Metrics::default());
        let commands = CommandConfig {
            queue_len: 4,
            send_timeout: Duration::from_secs(2),
            result_timeout: Duration::from_secs(2),
            queue_bytes: 1 << 20,
            total_queue_bytes: 1 << 20,
        };
        let pool = Pool::new(10, commands, 1 << 20, metrics.clone());
        let sinks = Sinks::new(
            vec![Arc::new(crate::sinks::null::NullSink::default())],
            metrics.clone(),
        );
        let aksk: AkSk = [("myak".to_string(), "mysk".to_string())]
            .into_iter()
            .collect();
        let state = AppState {
            pool: pool.clone(),
            metrics,
            sinks,
            aksk: Arc::new(aksk),
            auth,
            acks: Default::default(),
            replays: Default::default(),
            cluster: None,
            elkeid_sd: None,
            peer_mtls: false,
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(l, router(state)).await });
        (addr, pool)
    }

    async fn call(
        addr: &str,
        method: &str,
        path: &str,
        signed: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        if let Some(ts) = signed {
            let (p, q) = path.split_once('?').unwrap_or((path, ""));
            let sig = auth::sign("mysk", method, p, q, "MyAK", ts, body.as_bytes());
            req = req
                .header("AccessKey", "MyAK")
                .header("Signature", sig)
                .header("TimeStamp", ts);
        }
        let resp = client
            .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn api_shapes_and_auth() {
        let (addr, pool) = start(true).await;
        let now = crate::now_unix().to_string();
        let ts = Some(now.as_str());
        assert_eq!(
            call(&addr, "GET", "/ping", None, "").await,
            (200, r#"{"message":"pong"}"#.into())
        );
        assert_eq!(
            call(&addr, "GET", "/conn/list", None, "").await,
            (200, r#"{"code":1,"msg":"auth failed","data":"header missed: AccessKey|Signature|TimeStamp"}"#.into())
        );
        let (_reg, _rx) = pool.register("a1", "1.2.3.4:5".into(), pool.try_slot().unwrap());
        assert_eq!(
            call(&addr, "GET", "/conn/list?x=1", ts, "").await,
            (200, r#"{"code":0,"msg":"success","data":["a1"]}"#.into())
        );
        assert_eq!(
            call(&addr, "GET", "/conn/count", ts, "").await.1,
            r#"{"code":0,"msg":"success","data":1}"#
        );
        let old = Some("1000");
        assert!(
            call(&addr, "GET", "/conn/count", old, "")
                .await
                .1
                .contains(r#""data":"timestamp error""#)
        );
        // binding failure: HTTP 400, code 2
        let (st, body) = call(&addr, "POST", "/command/", ts, "{not json").await;
        assert_eq!(st, 400, "{body}");
        assert!(
            body.starts_with(r#"{"code":2,"msg":"param invalid""#),
            "{body}"
        );
        // an empty command is refused (it would wipe the agent's plugins)
        let (st, body) = call(
            &addr,
            "POST",
            "/command/",
            ts,
            r#"{"agent_id":"a1","command":{}}"#,
        )
        .await;
        assert_eq!(st, 200);
        assert!(body.starts_with(r#"{"code":2,"#), "{body}");
        let (_, body) = call(
            &addr,
            "POST",
            "/command/",
            ts,
            r#"{"agent_id":"zz","command":{"task":{}}}"#,
        )
        .await;
        assert_eq!(
            body,
            r#"{"code":3,"msg":"some errors occurred","data":"agentID not found"}"#
        );
        let (_, body) = call(&addr, "POST", "/conn/reset", ts, r#"{"type":"all"}"#).await;
        assert_eq!(
            body,
            r#"{"code":2,"msg":"param invalid","data":"type only support strict|random"}"#
        );
        let (_, body) = call(
            &addr,
            "POST",
            "/conn/reset",
            ts,
            r#"{"type":"random","count":5}"#,
        )
        .await;
        assert_eq!(
            body,
            r#"{"code":0,"msg":"success","data":{"count":1,"detail":{"a1":"ok"}}}"#
        );
        let (_, metrics) = call(&addr, "GET", "/metrics", None, "").await;
        assert!(
            metrics.contains("elkeid_ac_grpc_conn_count 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("elkeid_center_http_auth_failures_total 2\n"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn auth_off_lets_everything_in() {
        let (addr, _pool) = start(false).await;
        assert_eq!(
            call(&addr, "GET", "/conn/count", None, "").await.1,
            r#"{"code":0,"msg":"success","data":0}"#
        );
    }
}
