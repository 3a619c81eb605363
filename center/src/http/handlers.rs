//! Handlers of the HTTP API.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use elkeid_proto::grpc::{Command, Task};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{AppState, bad_request, envelope, ok};
use crate::cluster::http::{self as cluster, ClusterQuery};
use crate::manager::Component;

/// `GET /ping`: raw `{"message":"pong"}`.
pub(crate) async fn ping() -> Json<Value> {
    Json(json!({ "message": "pong" }))
}

/// `GET /metrics`: Prometheus text.
pub(crate) async fn metrics(State(s): State<AppState>) -> Response {
    let mut body = s
        .metrics
        .render(s.pool.count(), &s.sinks.lag(), &s.sinks.counters());
    s.acks.render(&mut body);
    if let Some(c) = &s.cluster {
        c.render_metrics(&mut body);
    }
    if let Some(sd) = &s.elkeid_sd {
        sd.render_metrics(&mut body);
    }
    if s.pool.is_draining() {
        use std::fmt::Write as _;
        let _ = write!(
            body,
            "# HELP elkeid_center_draining 1 after POST /cluster/drain: new agent streams are refused.\n\
             # TYPE elkeid_center_draining gauge\nelkeid_center_draining 1\n\
             # HELP elkeid_center_conn_refused_draining_total Agent streams refused while draining.\n\
             # TYPE elkeid_center_conn_refused_draining_total counter\n\
             elkeid_center_conn_refused_draining_total {}\n",
            s.pool
                .refused_draining
                .load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// `POST /command` (no slash): gin's 307 to `/command/`.
pub(crate) async fn command_redirect() -> Response {
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, "/command/")],
    )
        .into_response()
}

/// `GET /conn/list` (`?cluster=true`: every center's, from etcd).
pub(crate) async fn conn_list(
    State(s): State<AppState>,
    Query(q): Query<ClusterQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = cluster::list(&s, &q, &headers).await {
        return r;
    }
    ok(json!(s.pool.list())).into_response()
}

/// `GET /conn/count` (`?cluster=true`: every center's, from etcd).
pub(crate) async fn conn_count(
    State(s): State<AppState>,
    Query(q): Query<ClusterQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = cluster::count(&s, &q, &headers).await {
        return r;
    }
    ok(json!(s.pool.count())).into_response()
}

/// `GET /conn/stat` (`?cluster=true`: every center's).
pub(crate) async fn conn_stat(
    State(s): State<AppState>,
    Query(q): Query<ClusterQuery>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let list: Vec<Value> = s
        .pool
        .conns()
        .iter()
        .map(|c| {
            let agent = c
                .detail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            let plugins: Vec<Value> = c
                .plugins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|p| Value::Object(p.clone()))
                .collect();
            json!({ "agent_info": Value::Object(agent), "plugins_info": plugins })
        })
        .collect();
    ok(Value::Array(cluster::stat(&s, &q, &headers, list).await))
}

#[derive(Deserialize)]
struct ResetReq {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    count: usize,
    #[serde(default)]
    id_list: Vec<String>,
}

/// `POST /conn/reset` (strict ids held by another center are reset there).
pub(crate) async fn conn_reset(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let req: ResetReq = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e.to_string()),
    };
    if req.kind.is_empty() {
        return bad_request("type is required".into());
    }
    let mut detail = Map::new();
    match req.kind.as_str() {
        "random" => {
            for id in s.pool.list().into_iter().take(req.count) {
                let r = if s.pool.close(&id) {
                    "ok".to_string()
                } else {
                    "agentID not found".to_string()
                };
                detail.insert(id, Value::String(r));
            }
        }
        "strict" => {
            let mut elsewhere = Vec::new();
            for id in req.id_list {
                if s.pool.close(&id) {
                    detail.insert(id, Value::String("ok".into()));
                } else {
                    elsewhere.push(id);
                }
            }
            let mut remote = cluster::reset_remote(&s, &headers, &elsewhere).await;
            for id in elsewhere {
                let r = remote
                    .remove(&id)
                    .unwrap_or_else(|| Value::String("agentID not found".into()));
                detail.insert(id, r);
            }
        }
        _ => {
            return envelope(
                2,
                "param invalid",
                Value::String("type only support strict|random".into()),
            );
        }
    }
    ok(json!({ "count": detail.len(), "detail": detail }))
}

#[derive(Deserialize)]
struct CommandReq {
    agent_id: String,
    #[serde(default)]
    command: CommandBody,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CommandBody {
    #[allow(dead_code)]
    agent_ctrl: i32,
    task: Option<TaskBody>,
    config: Vec<Component>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TaskBody {
    data_type: i32,
    name: String,
    data: String,
    token: String,
}

/// `POST /command/`: one agent; configs and a task go as separate Commands
/// (configs first); a command with neither is refused, because an empty
/// Command makes a Go agent remove every plugin. `agent_ctrl` is not sent
/// (agents ignore it).
pub(crate) async fn command(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: CommandReq = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(e.to_string()).into_response(),
    };
    if req.agent_id.is_empty() {
        return bad_request("agent_id is required".into()).into_response();
    }
    // An agent held by another center of the cluster: that center answers.
    if let Some(r) = cluster::forward_command(&s, &headers, &req.agent_id, &body).await {
        return r;
    }
    let mut cmds = Vec::new();
    if !req.command.config.is_empty() {
        cmds.push(Command {
            agent_ctrl: 0,
            task: None,
            configs: req.command.config.into_iter().map(Into::into).collect(),
            ..Default::default()
        });
    }
    if let Some(t) = req.command.task {
        cmds.push(Command {
            agent_ctrl: 0,
            task: Some(Task {
                data_type: t.data_type,
                object_name: t.name,
                data: t.data,
                token: t.token,
            }),
            configs: Vec::new(),
            ..Default::default()
        });
    }
    if cmds.is_empty() {
        return envelope(
            2,
            "param invalid",
            Value::String("command has neither task nor config (an empty command makes the agent remove every plugin)".into()),
        ).into_response();
    }
    for cmd in cmds {
        if let Err(e) = s.pool.post_command(&req.agent_id, cmd).await {
            tracing::info!(agent_id = %req.agent_id, error = %e, "command not delivered");
            return envelope(3, "some errors occurred", Value::String(e.to_string()))
                .into_response();
        }
    }
    ok(Value::String(String::new())).into_response()
}
