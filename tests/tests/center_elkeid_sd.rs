//! Registration into an existing Elkeid service discovery (`--elkeid-sd`),
//! for fleets migrating from Elkeid, against a stand-in SD written from the
//! spec (§5.8 registration, §2.4 discovery, §5.6 signing): it checks each
//! call's AK/SK signature, records registrations and heartbeats, serves
//! `GET /registry/detail`, and forgets on `/registry/evict`. A real agent
//! that only knows the SD finds the center through it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elkeid_tests::Center;
use elkeid_tests::center::{eventually, sign, unix_now};
use elkeid_tests::plugin::{Agent, wait_connected};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AK: &str = "sd-ak";
const SK: &str = "sd-secret";

/// One call the stand-in received.
#[derive(Debug, Clone)]
struct Call {
    path: String,
    body: Value,
    signed_ok: bool,
}

#[derive(Debug, Default)]
struct SdState {
    calls: Vec<Call>,
    /// name -> "ip:port" -> weight
    services: BTreeMap<String, BTreeMap<String, u64>>,
    detail_queries: usize,
}

/// A minimal Elkeid SD: `POST /registry/register`, `POST /registry/evict`,
/// `GET /registry/detail?name=…`.
struct StandInSd {
    addr: SocketAddr,
    state: Arc<Mutex<SdState>>,
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.trim())
}

impl StandInSd {
    async fn start() -> StandInSd {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SdState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // read the head, then Content-Length bytes of body
                    let (head, mut body) = loop {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..p]).into_owned();
                            break (head, buf[p + 4..].to_vec());
                        }
                    };
                    let len: usize = header(&head, "content-length").parse().unwrap_or(0);
                    while body.len() < len {
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        body.extend_from_slice(&chunk[..n]);
                    }
                    let line = head.lines().next().unwrap_or("");
                    let mut parts = line.split(' ');
                    let method = parts.next().unwrap_or("").to_string();
                    let target = parts.next().unwrap_or("").to_string();
                    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                    let answer = {
                        let mut g = st.lock().unwrap();
                        match (method.as_str(), path) {
                            ("POST", "/registry/register" | "/registry/evict") => {
                                let ts = header(&head, "timestamp");
                                let want = sign(SK, "POST", path, query, AK, ts, &body);
                                let signed_ok = header(&head, "accesskey") == AK
                                    && header(&head, "signature") == want
                                    && ts.parse::<i64>().is_ok_and(|t| (unix_now() - t).abs() < 60);
                                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                g.calls.push(Call {
                                    path: path.to_string(),
                                    body: v.clone(),
                                    signed_ok,
                                });
                                let name = v["name"].as_str().unwrap_or("").to_string();
                                let key =
                                    format!("{}:{}", v["ip"].as_str().unwrap_or(""), v["port"]);
                                if !signed_ok {
                                    json!({"code": 1, "msg": "auth failed"})
                                } else if path == "/registry/register" {
                                    g.services
                                        .entry(name)
                                        .or_default()
                                        .insert(key, v["weight"].as_u64().unwrap_or(0));
                                    json!({"code": 0, "msg": "ok"})
                                } else {
                                    if let Some(m) = g.services.get_mut(&name) {
                                        m.remove(&key);
                                    }
                                    json!({"code": 0, "msg": "ok"})
                                }
                            }
                            ("GET", "/registry/detail") => {
                                g.detail_queries += 1;
                                let name = query
                                    .split('&')
                                    .find_map(|kv| kv.strip_prefix("name="))
                                    .unwrap_or("");
                                let data: Vec<Value> = g
                                    .services
                                    .get(name)
                                    .map(|m| {
                                        m.iter()
                                            .map(|(k, w)| {
                                                let (ip, port) = k.rsplit_once(':').unwrap();
                                                json!({"ip": ip, "port": port.parse::<u16>().unwrap(), "weight": w})
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                json!({"code": 0, "msg": "ok", "data": data})
                            }
                            _ => json!({"code": 2, "msg": "not found"}),
                        }
                    };
                    let text = answer.to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        StandInSd { addr, state }
    }

    fn calls(&self, path: &str) -> Vec<Call> {
        let g = self.state.lock().unwrap();
        g.calls.iter().filter(|c| c.path == path).cloned().collect()
    }

    fn service(&self, name: &str) -> BTreeMap<String, u64> {
        let g = self.state.lock().unwrap();
        g.services.get(name).cloned().unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_registers_in_an_elkeid_sd_and_an_agent_finds_it_there() {
    let sd = StandInSd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(
        dir.path(),
        &[
            "--elkeid-sd",
            &format!("http://{}", sd.addr),
            "--elkeid-sd-ak",
            AK,
            "--elkeid-sd-sk",
            SK,
            "--elkeid-sd-interval-secs",
            "1",
            "--sink",
            "ndjson",
        ],
    );
    let grpc_key = format!("127.0.0.1:{}", center.grpc.port());
    let http_key = format!("127.0.0.1:{}", center.http.port());

    // Registered under both names with weight 0 first, every call signed.
    let t = Duration::from_secs(30);
    let (s, gk, hk) = (&sd, grpc_key.clone(), http_key.clone());
    eventually(t, || {
        let (gk, hk) = (gk.clone(), hk.clone());
        async move {
            (s.service("hids_svr_grpc").contains_key(&gk)
                && s.service("hids_svr_http").contains_key(&hk))
            .then_some(())
        }
    })
    .await
    .expect("the center registered hids_svr_grpc and hids_svr_http");
    let first = sd.calls("/registry/register");
    assert_eq!(
        first[0].body,
        json!({"name": "hids_svr_grpc", "ip": "127.0.0.1", "port": center.grpc.port(), "weight": 0, "extra": null}),
        "the registration body of spec §5.8"
    );
    // Heartbeats: re-registered every interval.
    eventually(t, || async {
        (s.calls("/registry/register").len() >= 6).then_some(())
    })
    .await
    .expect("re-registrations every second");
    assert!(
        sd.calls("/registry/register").iter().all(|c| c.signed_ok),
        "every registration is signed with the SD's AK/SK: {:?}",
        sd.calls("/registry/register")
    );
    assert!(
        center
            .metric("elkeid_center_elkeid_sd_registrations_total")
            .await
            >= 3
    );
    assert_eq!(center.metric("elkeid_center_elkeid_sd_up").await, 1);

    // An agent that knows only the SD (no --server) finds the center.
    let work = tempfile::tempdir().unwrap();
    let id = "elkeid-sd-agent";
    let sd_addr = sd.addr.to_string();
    let _agent = Agent::start_via_sd(
        &center,
        work.path(),
        id,
        &sd_addr,
        &["--heartbeat-secs", "1"],
    );
    wait_connected(&center, id, t).await;
    assert!(sd.state.lock().unwrap().detail_queries >= 1);
    // Its heartbeat says it came through service discovery.
    let c = &center;
    eventually(t, || async move {
        c.ndjson_records()
            .iter()
            .any(|r| {
                r["agent_id"] == id && r["data_type"] == 1000 && r["fields"]["net_mode"] == "sd"
            })
            .then_some(())
    })
    .await
    .expect("a heartbeat with net_mode sd");
    // The next heartbeats carry the load: weight 1.
    let gk = grpc_key.clone();
    eventually(t, || {
        let gk = gk.clone();
        async move { (s.service("hids_svr_grpc").get(&gk) == Some(&1)).then_some(()) }
    })
    .await
    .expect("weight = connected agents");

    // Drain: evicted from the SD (both names), the agent's stream ends.
    let (st, v) = center.api("POST", "/cluster/drain", b"").await;
    assert_eq!((st, v["code"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(v["data"]["streams_closed"], 1, "{v}");
    let evicts = sd.calls("/registry/evict");
    let names: Vec<&str> = evicts
        .iter()
        .filter_map(|c| c.body["name"].as_str())
        .collect();
    assert_eq!(names, ["hids_svr_grpc", "hids_svr_http"], "{evicts:?}");
    assert!(evicts.iter().all(|c| c.signed_ok), "{evicts:?}");
    assert!(sd.service("hids_svr_grpc").is_empty());
    assert!(sd.service("hids_svr_http").is_empty());
    // No more heartbeats after the drain.
    let n = sd.calls("/registry/register").len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sd.calls("/registry/register").len(),
        n,
        "re-registration stopped"
    );
    assert_eq!(center.metric("elkeid_center_elkeid_sd_up").await, 0);
}
