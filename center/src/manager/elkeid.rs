//! The `elkeid` manager backend: the plain-HTTP, unsigned calls an Elkeid
//! agent center makes to its manager (spec §5.4), each with a timeout
//! (`manager.timeout_ms`) and a bounded number of retries
//! (`manager.retries`, exponential back-off from 200 ms), addresses tried
//! round-robin.
//!
//! - config push: `POST /api/v6/component/GetComponentInstances` (body = the
//!   1000 detail) -> `{"code":0,"data":[component…]}`;
//! - task results: `POST /api/v1/agent/updateSubTask` (JSON array of
//!   string->string objects) -> `{"code":0}`;
//! - extra info: `POST /api/v1/agent/queryInfo` `{"id_list":[id]}` on each new
//!   stream -> `{"code":0,"data":{"<id>":{"tags":…}}}`; `tags` becomes the
//!   records' `tag`; every 240 s (+ up to 30 s) one call for all connected
//!   ids replaces the cache, as Elkeid does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

use super::{BoxFuture, Component, Manager, ManagerError, TaskItem};

/// Largest manager response read.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// Cap of the tag cache.
const MAX_TAGS: usize = 1_000_000;

/// The Elkeid manager client.
#[derive(Debug)]
pub(crate) struct ElkeidManager {
    client: Client<HttpConnector, Full<Bytes>>,
    addrs: Vec<String>,
    next: AtomicUsize,
    timeout: Duration,
    retries: u32,
    tags: Arc<Mutex<HashMap<String, String>>>,
}

#[derive(serde::Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    msg: String,
    data: Option<T>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct ExtraInfo {
    tags: String,
}

impl ElkeidManager {
    /// A client for `addrs` (`host:port`).
    pub(crate) fn new(addrs: Vec<String>, timeout: Duration, retries: u32) -> Arc<ElkeidManager> {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Arc::new(ElkeidManager {
            client,
            addrs,
            next: AtomicUsize::new(0),
            timeout,
            retries,
            tags: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    async fn post_once(&self, path: &str, body: &Bytes) -> Result<Bytes, ManagerError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let addr = self
            .addrs
            .get(i % self.addrs.len().max(1))
            .ok_or_else(|| ManagerError::Unreachable("no manager address".into()))?;
        let req = http::Request::post(format!("http://{addr}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| ManagerError::Unreachable(e.to_string()))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ManagerError::Unreachable(e.to_string()))?;
            let status = resp.status();
            let limited = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE);
            let bytes = limited
                .collect()
                .await
                .map_err(|e| ManagerError::Unreachable(e.to_string()))?
                .to_bytes();
            if !status.is_success() {
                return Err(ManagerError::Refused(format!(
                    "{addr}{path}: HTTP {status}"
                )));
            }
            Ok(bytes)
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ManagerError::Unreachable(format!("{addr}{path}: timed out")))?
    }

    /// POSTs JSON and decodes the `{"code","msg","data"}` envelope, retrying
    /// transport failures and non-2xx answers.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Bytes,
    ) -> Result<Option<T>, ManagerError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match self.post_once(path, &body).await {
                Ok(bytes) => {
                    let env: Envelope<T> = serde_json::from_slice(&bytes)
                        .map_err(|e| ManagerError::Refused(format!("{path}: bad response: {e}")))?;
                    if env.code != 0 {
                        return Err(ManagerError::Refused(format!(
                            "{path}: code {} {}",
                            env.code, env.msg
                        )));
                    }
                    return Ok(env.data);
                }
                Err(e) if attempt >= self.retries => return Err(e),
                Err(error) => {
                    tracing::debug!(%error, path, attempt, "manager call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }
}

fn json(v: &impl serde::Serialize) -> Result<Bytes, ManagerError> {
    serde_json::to_vec(v)
        .map(Bytes::from)
        .map_err(|e| ManagerError::Refused(e.to_string()))
}

impl Manager for ElkeidManager {
    fn configs<'a>(
        &'a self,
        _agent_id: &'a str,
        detail: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Vec<Component>, ManagerError>> {
        Box::pin(async move {
            let data: Option<Vec<Component>> = self
                .call("/api/v6/component/GetComponentInstances", json(detail)?)
                .await?;
            Ok(data.unwrap_or_default())
        })
    }

    fn push_task_results<'a>(
        &'a self,
        items: &'a [TaskItem],
    ) -> BoxFuture<'a, Result<(), ManagerError>> {
        Box::pin(async move {
            let list: Vec<&Map<String, Value>> = items.iter().map(|i| &i.fields).collect();
            self.call::<Value>("/api/v1/agent/updateSubTask", json(&list)?)
                .await
                .map(|_| ())
        })
    }

    fn agent_connected(&self, agent_id: &str) {
        let Ok(body) = json(&serde_json::json!({ "id_list": [agent_id] })) else {
            return;
        };
        let me = ElkeidManager {
            client: self.client.clone(),
            addrs: self.addrs.clone(),
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
            timeout: self.timeout,
            retries: self.retries,
            tags: self.tags.clone(),
        };
        tokio::spawn(async move {
            match me
                .call::<HashMap<String, ExtraInfo>>("/api/v1/agent/queryInfo", body)
                .await
            {
                Ok(Some(info)) => {
                    let mut tags = me.tags.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, i) in info {
                        if tags.len() < MAX_TAGS || tags.contains_key(&id) {
                            tags.insert(id, i.tags);
                        }
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "manager extra-info lookup failed"),
            }
        });
    }

    fn refresh<'a>(&'a self, agent_ids: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if agent_ids.is_empty() {
                return;
            }
            let Ok(body) = json(&serde_json::json!({ "id_list": agent_ids })) else {
                return;
            };
            match self
                .call::<HashMap<String, ExtraInfo>>("/api/v1/agent/queryInfo", body)
                .await
            {
                Ok(info) => {
                    let fresh: HashMap<String, String> = info
                        .unwrap_or_default()
                        .into_iter()
                        .take(MAX_TAGS)
                        .map(|(id, i)| (id, i.tags))
                        .collect();
                    *self.tags.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                }
                Err(error) => tracing::warn!(%error, "manager extra-info refresh failed"),
            }
        })
    }

    fn tag(&self, agent_id: &str) -> String {
        self.tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent_id)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Json;
    use axum::routing::post;
    use std::sync::atomic::AtomicU32;

    #[derive(Default)]
    struct Fake {
        calls: AtomicU32,
        bodies: Mutex<Vec<Value>>,
    }

    /// A real HTTP server speaking the manager's side of §5.4.
    async fn fake_manager() -> (String, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let f1 = fake.clone();
        let f2 = fake.clone();
        let f3 = fake.clone();
        let app = axum::Router::new()
            .route(
                "/api/v6/component/GetComponentInstances",
                post(move |Json(body): Json<Value>| {
                    let f = f1.clone();
                    async move {
                        // the first call fails with HTTP 500: the client retries
                        if f.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                            return (http::StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({})));
                        }
                        f.bodies.lock().unwrap().push(body);
                        (
                            http::StatusCode::OK,
                            Json(serde_json::json!({"code": 0, "msg": "success", "data": [
                                {"name": "collector", "type": "plugin", "version": "1.0", "sha256": "aa",
                                 "signature": "bb", "download_url": ["http://d/c.tgz"], "detail": ""}]})),
                        )
                    }
                }),
            )
            .route(
                "/api/v1/agent/updateSubTask",
                post(move |Json(body): Json<Value>| {
                    let f = f2.clone();
                    async move {
                        f.bodies.lock().unwrap().push(body);
                        Json(serde_json::json!({"code": 0, "msg": "success"}))
                    }
                }),
            )
            .route(
                "/api/v1/agent/queryInfo",
                post(move |Json(body): Json<Value>| {
                    let _f = f3.clone();
                    async move {
                        if body["id_list"].as_array().is_some_and(|l| !l.is_empty()) {
                            Json(serde_json::json!({"code": 0, "msg": "success",
                                "data": {"a1": {"tags": "prod", "psm_name": "", "psm_path": ""}}}))
                        } else {
                            Json(serde_json::json!({"code": 1, "msg": "no such agent"}))
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, fake)
    }

    #[tokio::test]
    async fn configs_tasks_retry_and_refusal() {
        let (addr, fake) = fake_manager().await;
        let m = ElkeidManager::new(vec![addr], Duration::from_secs(5), 2);
        let mut detail = Map::new();
        detail.insert("agent_id".into(), "a1".into());
        let list = m.configs("a1", &detail).await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].download_url, vec!["http://d/c.tgz".to_string()]);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        let mut fields = Map::new();
        fields.insert("token".into(), "t".into());
        fields.insert("data_type".into(), "5100".into());
        m.push_task_results(&[TaskItem {
            agent_id: "a1".into(),
            fields,
        }])
        .await
        .unwrap();
        let bodies = fake.bodies.lock().unwrap().clone();
        assert_eq!(bodies[0]["agent_id"], "a1");
        assert_eq!(
            bodies[1],
            serde_json::json!([{"token": "t", "data_type": "5100"}])
        );
        let e = m
            .call::<Value>("/api/v1/agent/queryInfo", Bytes::from_static(b"{}"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("code 1"), "{e}");
        assert_eq!(m.tag("a1"), "");
        m.refresh(&["a1".to_string()]).await;
        assert_eq!(m.tag("a1"), "prod");
    }

    #[tokio::test]
    async fn unreachable_after_bounded_retries() {
        // a bound-then-closed port: connection refused
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let m = ElkeidManager::new(vec![addr], Duration::from_secs(2), 1);
        let e = m.configs("a", &Map::new()).await.unwrap_err();
        assert!(matches!(e, ManagerError::Unreachable(_)), "{e}");
    }
}
