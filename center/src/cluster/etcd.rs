//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/...`, keys and
//! values base64, 64-bit integers as decimal strings).
//!
//! Why not the `etcd-client` crate: its build script runs
//! `tonic_prost_build::compile_protos`, which needs a `protoc` binary that a
//! fresh build machine does not have (our own protos go through `protox`).
//! The gateway is part of every etcd v3 server (3.4 and later serve `/v3/`),
//! is plain HTTP/1.1 through the hyper client the center already has, and
//! covers what the cluster needs: leases (grant, keep-alive, revoke),
//! put/range/delete, and transactions to batch puts.
//!
//! Every call has a timeout and every response body is read with a size cap.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Largest etcd response read (a range over every agent key of a large
/// cluster: 100k keys of ~100 bytes, base64).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// etcd's default limit of operations in one transaction (`--max-txn-ops`).
pub(crate) const MAX_TXN_OPS: usize = 128;

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    /// No endpoint answered (connection refused, timeout, ...).
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// An endpoint answered with an error status or an unexpected body.
    #[error("etcd error: {0}")]
    Server(String),
}

/// One key-value pair of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kv {
    pub(crate) key: String,
    pub(crate) value: Vec<u8>,
}

/// A client for a list of etcd endpoints (`http://host:port`), tried in turn.
#[derive(Debug, Clone)]
pub(crate) struct Etcd {
    endpoints: Vec<String>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The key just after every key starting with `prefix` (etcd's prefix range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An int64 the gateway may print as a string or a number.
fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

impl Etcd {
    /// A client; endpoints without a scheme get `http://`.
    pub(crate) fn new(endpoints: &[String], timeout: Duration) -> Etcd {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| {
                    let e = e.trim().trim_end_matches('/');
                    if e.contains("://") {
                        e.to_string()
                    } else {
                        format!("http://{e}")
                    }
                })
                .collect(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn call_one(&self, endpoint: &str, path: &str, body: &[u8]) -> Result<Value, EtcdError> {
        let req = http::Request::post(format!("{endpoint}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| EtcdError::Server(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| EtcdError::Unreachable(format!("{endpoint}: {e}")))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| EtcdError::Unreachable(format!("{endpoint}: {e}")))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| EtcdError::Server(format!("{endpoint}{path}: bad JSON: {e}")))?;
            if !status.is_success() {
                return Err(EtcdError::Server(format!("{endpoint}{path}: {status} {v}")));
            }
            Ok(v)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| EtcdError::Unreachable(format!("{endpoint}: timed out")))?
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let body = body.to_string().into_bytes();
        let mut last = EtcdError::Unreachable("no endpoint configured".into());
        for e in &self.endpoints {
            match self.call_one(e, path, &body).await {
                Ok(v) => return Ok(v),
                // A server-side error is an answer: do not retry elsewhere.
                Err(err @ EtcdError::Server(_)) => return Err(err),
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub(crate) async fn lease_grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let v = self
            .call("/v3/lease/grant", json!({ "TTL": ttl.to_string() }))
            .await?;
        int(&v["ID"]).ok_or_else(|| EtcdError::Server(format!("lease grant: no ID in {v}")))
    }

    /// Refreshes a lease; `Ok(false)` when the lease no longer exists (expired).
    pub(crate) async fn lease_keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let v = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        // One streamed message: {"result":{"ID":..,"TTL":..}}; TTL absent or 0 = gone.
        let r = if v.get("result").is_some() {
            &v["result"]
        } else {
            &v
        };
        Ok(int(&r["TTL"]).is_some_and(|t| t > 0))
    }

    /// Revokes a lease (every key bound to it disappears).
    pub(crate) async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .await
            .map(|_| ())
    }

    /// Puts `key = value`, bound to `lease` when non-zero.
    pub(crate) async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/kv/put", put_body(key, value, lease))
            .await
            .map(|_| ())
    }

    /// Puts many keys in transactions of at most [`MAX_TXN_OPS`] operations.
    pub(crate) async fn put_many(
        &self,
        items: &[(String, Vec<u8>)],
        lease: i64,
    ) -> Result<(), EtcdError> {
        for chunk in items.chunks(MAX_TXN_OPS) {
            let ops: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({ "requestPut": put_body(k, v, lease) }))
                .collect();
            self.call("/v3/kv/txn", json!({ "success": ops })).await?;
        }
        Ok(())
    }

    /// Deletes `key` only while its value is `value` (one transaction).
    pub(crate) async fn delete_if_value(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        let k = b64(key.as_bytes());
        self.call(
            "/v3/kv/txn",
            json!({
                "compare": [{ "key": k, "target": "VALUE", "result": "EQUAL", "value": b64(value) }],
                "success": [{ "requestDeleteRange": { "key": k } }],
            }),
        )
        .await
        .map(|_| ())
    }

    /// The value of one key.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        let v = self
            .call("/v3/kv/range", json!({ "key": b64(key.as_bytes()) }))
            .await?;
        Ok(kvs(&v)?.into_iter().next().map(|kv| kv.value))
    }

    /// Every key starting with `prefix` (values too unless `keys_only`).
    pub(crate) async fn range_prefix(
        &self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<Vec<Kv>, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({
                    "key": b64(prefix.as_bytes()),
                    "range_end": b64(&prefix_end(prefix)),
                    "keys_only": keys_only,
                }),
            )
            .await?;
        kvs(&v)
    }

    /// How many keys start with `prefix`.
    pub(crate) async fn count_prefix(&self, prefix: &str) -> Result<u64, EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({
                    "key": b64(prefix.as_bytes()),
                    "range_end": b64(&prefix_end(prefix)),
                    "count_only": true,
                }),
            )
            .await?;
        Ok(int(&v["count"])
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0))
    }
}

fn put_body(key: &str, value: &[u8], lease: i64) -> Value {
    let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
    if lease != 0 {
        body["lease"] = Value::String(lease.to_string());
    }
    body
}

fn kvs(v: &Value) -> Result<Vec<Kv>, EtcdError> {
    let Some(list) = v.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(list.len());
    for kv in list {
        let dec = |field: &str| -> Result<Vec<u8>, EtcdError> {
            match kv.get(field).and_then(Value::as_str) {
                None => Ok(Vec::new()),
                Some(s) => B64
                    .decode(s)
                    .map_err(|e| EtcdError::Server(format!("bad base64 in {field}: {e}"))),
            }
        };
        let key = String::from_utf8(dec("key")?)
            .map_err(|_| EtcdError::Server("a key is not UTF-8".into()))?;
        out.push(Kv {
            key,
            value: dec("value")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn decodes_gateway_ranges() {
        let v =
            json!({"header":{},"kvs":[{"key":"L2EvMQ==","value":"eA==","lease":"7"}],"count":"1"});
        assert_eq!(
            kvs(&v).unwrap(),
            vec![Kv {
                key: "/a/1".into(),
                value: b"x".to_vec()
            }]
        );
        assert!(kvs(&json!({"kvs":[{"key":"!!"}]})).is_err());
        assert_eq!(int(&json!("12")), Some(12));
        assert_eq!(int(&json!(12)), Some(12));
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_an_error_not_a_hang() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = Etcd::new(&[addr.to_string()], Duration::from_millis(500));
        assert!(matches!(
            e.lease_grant(5).await,
            Err(EtcdError::Unreachable(_))
        ));
    }
}
