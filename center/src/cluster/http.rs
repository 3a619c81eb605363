//! The cluster side of the HTTP API (only with `--etcd`):
//! `GET /registry/detail`, forwarding of `POST /command/` and strict
//! `POST /conn/reset` to the center holding the agent, and the cluster-wide
//! answers of `/conn/list`, `/conn/count`, `/conn/stat` (`?cluster=true`).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::peer::FORWARDED_HEADER;
use super::{CenterInfo, Cluster};
use crate::http::{AppState, envelope, ok};

/// `?cluster=true|1` on `/conn/*`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ClusterQuery {
    #[serde(default)]
    cluster: Option<String>,
}

impl ClusterQuery {
    fn wanted(&self) -> bool {
        matches!(self.cluster.as_deref(), Some("true" | "1" | "yes"))
    }
}

/// `?name=<sd name>&count=n` of Elkeid's service discovery.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct DetailQuery {
    #[serde(default)]
    name: String,
}

fn split_host_port(a: &str) -> (String, u16) {
    match a.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse().unwrap_or(0),
        ),
        None => (a.to_string(), 0),
    }
}

/// The `data` of `/registry/detail`: `[{"ip","port","weight"}]`, least
/// loaded first (Elkeid agents dial in order). `<name>_http` lists API
/// addresses, anything else gRPC ones.
pub(crate) fn detail(centers: &[CenterInfo], name: &str) -> Value {
    let http = name.ends_with("_http");
    Value::Array(
        centers
            .iter()
            .map(|c| {
                let (ip, port) = split_host_port(if http { &c.http } else { &c.grpc });
                json!({ "ip": ip, "port": port, "weight": c.weight })
            })
            .collect(),
    )
}

/// `GET /registry/detail?name=hids_svr_grpc`: live centers from etcd's view
/// (this center alone when that view is still empty).
pub(crate) async fn registry_detail(
    State(s): State<AppState>,
    Query(q): Query<DetailQuery>,
) -> Response {
    let Some(c) = &s.cluster else {
        return envelope(
            3,
            "some errors occurred",
            Value::String("not clustered".into()),
        )
        .into_response();
    };
    let mut centers = c.centers();
    let draining = s.pool.is_draining();
    if draining {
        // A drained center sends agents to the others only.
        let me = c.id();
        centers.retain(|x| x.id != me);
    }
    // Least loaded first (agents dial in order); equal loads in random
    // order so that a burst of agents does not all pick the same center.
    let mut ties = vec![0u8; centers.len()];
    {
        use ring::rand::SecureRandom;
        let _ = ring::rand::SystemRandom::new().fill(&mut ties);
    }
    let mut keyed: Vec<(u64, u8, CenterInfo)> = centers
        .drain(..)
        .zip(ties)
        .map(|(c, r)| (c.load(), r, c))
        .collect();
    keyed.sort_by_key(|(l, r, _)| (*l, *r));
    centers.extend(keyed.into_iter().map(|(_, _, c)| c));
    if centers.is_empty() && !draining {
        let mut me = c.me.lock().unwrap_or_else(|e| e.into_inner()).clone();
        me.weight = s.pool.count() as u64;
        centers.push(me);
    }
    ok(detail(&centers, &q.name)).into_response()
}

/// How long a drain waits between leaving etcd and closing its streams:
/// the other centers refresh their view of live centers every 2 s, so the
/// agents told to reconnect are no longer sent back here.
const DRAIN_SETTLE: std::time::Duration = std::time::Duration::from_millis(2500);

/// `POST /cluster/drain` (signed): take this center out of service without
/// stopping it. New agent streams are refused from now on (`UNAVAILABLE`);
/// the center leaves etcd (lease revoked: gone from every center's SD
/// answer within 2 s) and the Elkeid SD (`/registry/evict`), waits for the
/// other centers to notice, then ends every agent stream cleanly (status
/// OK), so the agents reconnect to the others and re-send whatever was not
/// acknowledged. The API keeps serving. Idempotent; `data`:
/// `{"draining":true,"was_draining":bool,"left_etcd":bool,"streams_closed":n}`.
pub(crate) async fn drain(State(s): State<AppState>) -> Response {
    let first = s.pool.start_draining();
    if first {
        tracing::warn!(
            "drain requested: refusing new agents, leaving the cluster, closing agent streams"
        );
    }
    let mut left_etcd = false;
    if let Some(c) = &s.cluster {
        match c.drain().await {
            Ok(()) => left_etcd = true,
            Err(e) => {
                tracing::warn!(error = %e, "drain: could not revoke the etcd lease; it expires by itself")
            }
        }
    }
    if let Some(sd) = &s.elkeid_sd {
        sd.leave().await;
    }
    if first && (s.cluster.is_some() || s.elkeid_sd.is_some()) {
        tokio::time::sleep(DRAIN_SETTLE).await;
    }
    let closed = s.pool.close_all();
    tracing::info!(streams = closed, "drain: agent streams closed");
    ok(json!({
        "draining": true,
        "was_draining": !first,
        "left_etcd": left_etcd,
        "streams_closed": closed,
    }))
    .into_response()
}

fn forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED_HEADER)
}

fn raw(status: u16, body: Bytes) -> Response {
    let status =
        axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// For `POST /command/` to an agent this center does not hold: the answer
/// of the center that holds it, or `None` to answer locally (not
/// clustered, a forwarded request, or no center has the agent).
pub(crate) async fn forward_command(
    s: &AppState,
    headers: &HeaderMap,
    agent_id: &str,
    body: &Bytes,
) -> Option<Response> {
    let c = s.cluster.as_ref()?;
    if forwarded(headers) || s.pool.get(agent_id).is_some() {
        return None;
    }
    let peer = match c.locate(agent_id).await {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(agent_id, error = %e, "cluster: cannot look the agent up in etcd");
            return None;
        }
    };
    Some(
        match c.call_peer(&peer, "POST", "/command/", body.clone()).await {
            Ok((status, body)) => raw(status, body),
            Err(e) => envelope(
                3,
                "some errors occurred",
                Value::String(format!(
                    "the agent is on center {}, which did not answer: {e}",
                    peer.id
                )),
            )
            .into_response(),
        },
    )
}

/// `/conn/list?cluster=true`: every agent id in etcd.
pub(crate) async fn list(s: &AppState, q: &ClusterQuery, headers: &HeaderMap) -> Option<Response> {
    let c = cluster_wanted(s, q, headers)?;
    Some(match c.all_agents().await {
        Ok(ids) => ok(json!(ids)).into_response(),
        Err(e) => etcd_error(e),
    })
}

/// `/conn/count?cluster=true`: agents in etcd.
pub(crate) async fn count(s: &AppState, q: &ClusterQuery, headers: &HeaderMap) -> Option<Response> {
    let c = cluster_wanted(s, q, headers)?;
    Some(match c.agent_count().await {
        Ok(n) => ok(json!(n)).into_response(),
        Err(e) => etcd_error(e),
    })
}

/// `/conn/stat?cluster=true`: the other centers' `/conn/stat` entries
/// appended to `local` (a center that does not answer is skipped and counted).
pub(crate) async fn stat(
    s: &AppState,
    q: &ClusterQuery,
    headers: &HeaderMap,
    mut local: Vec<Value>,
) -> Vec<Value> {
    let Some(c) = cluster_wanted(s, q, headers) else {
        return local;
    };
    let me = c.id();
    for peer in c.centers().into_iter().filter(|p| p.id != me) {
        if let Ok((200, body)) = c.call_peer(&peer, "GET", "/conn/stat", Bytes::new()).await
            && let Ok(v) = serde_json::from_slice::<Value>(&body)
            && let Some(items) = v.get("data").and_then(Value::as_array)
        {
            local.extend(items.iter().cloned());
        }
    }
    local
}

/// Strict `/conn/reset` ids not held here: each forwarded to its center;
/// returns the per-id results (ids no center holds are left out).
pub(crate) async fn reset_remote(
    s: &AppState,
    headers: &HeaderMap,
    ids: &[String],
) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let Some(c) = s.cluster.as_ref() else {
        return out;
    };
    if forwarded(headers) {
        return out;
    }
    let mut by_center: BTreeMap<String, (CenterInfo, Vec<String>)> = BTreeMap::new();
    for id in ids {
        if let Ok(Some(p)) = c.locate(id).await {
            by_center
                .entry(p.id.clone())
                .or_insert_with(|| (p, Vec::new()))
                .1
                .push(id.clone());
        }
    }
    for (peer, list) in by_center.into_values() {
        let body = json!({ "type": "strict", "id_list": list }).to_string();
        if let Ok((200, resp)) = c
            .call_peer(&peer, "POST", "/conn/reset", Bytes::from(body))
            .await
            && let Ok(v) = serde_json::from_slice::<Value>(&resp)
            && let Some(d) = v["data"]["detail"].as_object()
        {
            out.extend(d.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    out
}

fn cluster_wanted<'a>(
    s: &'a AppState,
    q: &ClusterQuery,
    headers: &HeaderMap,
) -> Option<&'a Cluster> {
    if !q.wanted() || forwarded(headers) {
        return None;
    }
    s.cluster.as_deref()
}

fn etcd_error(e: super::etcd::EtcdError) -> Response {
    envelope(3, "some errors occurred", Value::String(e.to_string())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_shape_is_elkeids() {
        let c = CenterInfo {
            id: "a".into(),
            grpc: "10.0.0.1:6751".into(),
            http: "[::1]:6752".into(),
            https: false,
            weight: 7,
            capacity: 10,
        };
        assert_eq!(
            detail(std::slice::from_ref(&c), "hids_svr_grpc"),
            json!([{"ip":"10.0.0.1","port":6751,"weight":7}])
        );
        assert_eq!(
            detail(&[c], "hids_svr_http"),
            json!([{"ip":"::1","port":6752,"weight":7}])
        );
    }
}
