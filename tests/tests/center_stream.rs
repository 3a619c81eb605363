//! The real `elkeid-center` driven as an agent (mTLS, snappy, `Transfer`
//! streams) and as a manager (signed HTTP API): connection pool, stored
//! heartbeats, NDJSON output, config push, commands, reconnects, limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use elkeid_tests::Center;
use elkeid_tests::center::{AgentStream, eventually, heartbeat, packet, record, unix_now};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

async fn listed(center: &Center, id: &str) {
    let c = center;
    eventually(T, || async move {
        c.conn_list().await.iter().any(|x| x == id).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{id} listed in /conn/list"));
}

async fn stat_of(center: &Center, id: &str, want: impl Fn(&Value) -> bool) -> Value {
    let c = center;
    let want = &want;
    eventually(T, || async move {
        let (status, v) = c.api("GET", "/conn/stat", b"").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["code"], 0, "{v}");
        v["data"]
            .as_array()?
            .iter()
            .find(|e| e["agent_info"]["agent_id"] == id && want(e))
            .cloned()
    })
    .await
    .unwrap_or_else(|| panic!("/conn/stat entry for {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_lists_the_agent_and_stat_holds_typed_detail() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let now = unix_now();
    let s = center.open_stream("agent-hb-1", vec![heartbeat(now)]).await;
    listed(&center, "agent-hb-1").await;

    let (status, v) = center.api("GET", "/conn/count", b"").await;
    assert_eq!(
        (status, &v["code"], &v["data"]),
        (200, &json!(0), &json!(1)),
        "{v}"
    );

    let e = stat_of(&center, "agent-hb-1", |e| {
        e["agent_info"]["cpu"].is_number()
    })
    .await;
    let a = &e["agent_info"];
    // Numbers become JSON numbers, the listed exceptions stay strings (§5.3).
    // (Go marshals float64 12345678 as `12345678`: compare values, not text.)
    assert_eq!(a["cpu"].as_f64(), Some(0.25), "{a}");
    assert_eq!(a["rss"].as_f64(), Some(12_345_678.0), "{a}");
    assert_eq!(a["nproc"].as_f64(), Some(2.0), "{a}");
    assert_eq!(a["platform_version"], json!("12"));
    assert_eq!(a["host_serial"], json!("000123"));
    assert_eq!(a["kernel_version"], json!("6.1.0-13-amd64"));
    // Packet metadata, arrays even when empty.
    assert_eq!(a["hostname"], json!("host-agent-hb-1"));
    assert_eq!(a["version"], json!("1.9.1.4"));
    assert_eq!(a["product"], json!("elkeid-rs-test"));
    assert_eq!(a["intranet_ipv4"], json!(["10.9.8.7", "192.168.1.2"]));
    assert_eq!(a["extranet_ipv4"], json!(["203.0.113.5"]));
    assert_eq!(a["intranet_ipv6"], json!(["fd00::7"]));
    assert_eq!(a["extranet_ipv6"], json!([]));
    assert!(
        a["agent_addr"]
            .as_str()
            .is_some_and(|s| s.starts_with("127.0.0.1:")),
        "{a}"
    );
    let lh = a["last_heartbeat_time"]
        .as_f64()
        .expect("last_heartbeat_time number");
    assert!((lh - now as f64).abs() < 600.0, "{a}");
    assert!(a["create_at"].is_number(), "{a}");

    // Plugin heartbeat (1001): per plugin, `pversion` stays a string.
    s.send(vec![record(
        1001,
        now,
        &[
            ("name", "collector"),
            ("pversion", "1.0.5"),
            ("cpu", "0.5"),
            ("rss", "2048"),
        ],
    )])
    .await;
    let e = stat_of(&center, "agent-hb-1", |e| {
        e["plugins_info"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "collector"))
    })
    .await;
    let p = e["plugins_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "collector")
        .unwrap();
    assert_eq!(p["pversion"], json!("1.0.5"));
    assert_eq!(p["cpu"].as_f64(), Some(0.5), "{p}");
    assert_eq!(p["rss"].as_f64(), Some(2048.0), "{p}");
    assert!(p["last_heartbeat_time"].is_number(), "{p}");

    // /ping: raw, no envelope, no auth.
    let r = elkeid_tests::center::http(center.api_target(), "GET", "/ping", &[], b"").await;
    assert_eq!((r.status, r.json()), (200, json!({"message": "pong"})));
    // /metrics: no auth, Elkeid's gauge name.
    let r = elkeid_tests::center::http(center.api_target(), "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    let gauge = text
        .lines()
        .find(|l| l.starts_with("elkeid_ac_grpc_conn_count"))
        .unwrap_or_else(|| panic!("elkeid_ac_grpc_conn_count in /metrics:\n{text}"));
    assert_eq!(gauge.split_whitespace().last(), Some("1"), "{gauge}");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_in_ndjson_in_the_stable_line_format() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let now = unix_now();
    let s = center
        .open_stream("agent-nd-1", vec![heartbeat(now - 1)])
        .await;
    let mut bad = record(5003, now, &[]);
    bad.data = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]); // not a Payload
    s.send(vec![
        record(
            5003,
            now,
            &[("exe", "/bin/sh"), ("pid", "42"), ("argv", "sh -c \"x\"\n")],
        ),
        record(6000, now + 1, &[("token", "t-1"), ("status", "succeed")]),
        bad,
    ])
    .await;
    let c = &center;
    let lines = eventually(T, || async move {
        let l: Vec<Value> = c
            .ndjson_records()
            .into_iter()
            .filter(|x| x["agent_id"] == "agent-nd-1")
            .collect();
        (l.len() >= 4).then_some(l)
    })
    .await
    .expect("4 NDJSON lines for agent-nd-1");
    assert_eq!(lines.len(), 4, "one line per record: {lines:#?}");
    let keys = [
        "data_type",
        "agent_time",
        "svr_time",
        "agent_id",
        "hostname",
        "version",
        "product",
        "intranet_ipv4",
        "extranet_ipv4",
        "intranet_ipv6",
        "extranet_ipv6",
        "tag",
    ];
    for l in &lines {
        let o = l.as_object().unwrap();
        for k in keys {
            assert!(o.contains_key(k), "key {k} in {l}");
        }
        assert_eq!(
            o.len(),
            keys.len() + 1,
            "exactly the documented keys plus fields|body: {l}"
        );
        assert_eq!(l["hostname"], "host-agent-nd-1");
        assert_eq!(l["version"], "1.9.1.4");
        assert_eq!(l["product"], "elkeid-rs-test");
        assert_eq!(l["intranet_ipv4"], json!(["10.9.8.7", "192.168.1.2"]));
        assert_eq!(l["extranet_ipv4"], json!(["203.0.113.5"]));
        assert_eq!(l["intranet_ipv6"], json!(["fd00::7"]));
        assert_eq!(l["extranet_ipv6"], json!([]));
        assert_eq!(l["tag"], "");
        let svr = l["svr_time"].as_i64().expect("svr_time integer");
        assert!((svr - now).abs() < 600, "{l}");
    }
    let by_type = |t: i64| {
        lines
            .iter()
            .filter(|l| l["data_type"] == t)
            .collect::<Vec<_>>()
    };
    let hb = by_type(1000);
    assert_eq!(hb.len(), 1);
    assert_eq!(hb[0]["agent_time"], json!(now - 1));
    assert_eq!(
        hb[0]["fields"]["cpu"], "0.25",
        "fields stay strings: {}",
        hb[0]
    );
    let execs = by_type(5003);
    assert_eq!(execs.len(), 2);
    let good = execs
        .iter()
        .find(|l| l.get("fields").is_some())
        .expect("decoded 5003");
    assert_eq!(
        good["fields"],
        json!({"exe": "/bin/sh", "pid": "42", "argv": "sh -c \"x\"\n"})
    );
    assert_eq!(good["agent_time"], json!(now));
    let raw = execs
        .iter()
        .find(|l| l.get("body").is_some())
        .expect("undecodable body kept");
    assert_eq!(raw["body"], "////", "base64 of ff ff ff");
    assert!(raw.get("fields").is_none());
    assert_eq!(
        by_type(6000)[0]["fields"],
        json!({"token": "t-1", "status": "succeed"})
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_push_follows_the_first_heartbeat_with_per_agent_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let components = json!({
        "default": [
            {"name": "collector", "type": "plugin", "version": "1.0.0", "sha256": "aa11",
             "signature": "bb22", "download_url": ["http://10.0.0.1/c-1.0.0.tar.gz", "http://10.0.0.2/c.tgz"],
             "detail": "{\"k\":1}"},
            {"name": "elkeid-agent", "type": "agent", "version": "1.9.1", "sha256": "cc33",
             "signature": "dd44", "download_url": ["http://10.0.0.1/agent.deb"], "detail": ""}
        ],
        "agents": {
            "agent-cfg-2": [{"name": "collector", "type": "plugin", "version": "1.0.1", "sha256": "ee55",
                             "signature": "ff66", "download_url": ["http://10.0.0.1/c-1.0.1.tar.gz"], "detail": ""}]
        }
    });
    std::fs::write(
        dir.path().join("components.json"),
        serde_json::to_vec(&components).unwrap(),
    )
    .unwrap();
    let center = Center::start(dir.path(), &[]);

    // No config before a heartbeat: the first packet carries only a record.
    let mut a = center
        .open_stream(
            "agent-cfg-1",
            vec![record(5003, unix_now(), &[("pid", "1")])],
        )
        .await;
    a.send(vec![heartbeat(unix_now())]).await;
    let cmd = a.expect_command(T).await;
    assert!(
        cmd.task.is_none(),
        "configs and tasks travel in separate Commands: {cmd:?}"
    );
    let mut cfgs = cmd.configs.clone();
    cfgs.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(cfgs.len(), 2, "{cmd:?}");
    assert_eq!(
        (
            &*cfgs[0].name,
            &*cfgs[0].r#type,
            &*cfgs[0].version,
            &*cfgs[0].sha256,
            &*cfgs[0].signature
        ),
        ("collector", "plugin", "1.0.0", "aa11", "bb22")
    );
    assert_eq!(
        cfgs[0].download_urls,
        ["http://10.0.0.1/c-1.0.0.tar.gz", "http://10.0.0.2/c.tgz"]
    );
    assert_eq!(cfgs[0].detail, "{\"k\":1}");
    assert_eq!(
        (&*cfgs[1].name, &*cfgs[1].r#type, &*cfgs[1].version),
        ("elkeid-agent", "agent", "1.9.1")
    );

    // The override replaces the default entry of the same name.
    let mut b = center
        .open_stream("agent-cfg-2", vec![heartbeat(unix_now())])
        .await;
    let cmd = b.expect_command(T).await;
    let col = cmd
        .configs
        .iter()
        .find(|c| c.name == "collector")
        .expect("collector config");
    assert_eq!((&*col.version, &*col.sha256), ("1.0.1", "ee55"));
    assert!(
        cmd.configs.iter().any(|c| c.name == "elkeid-agent"),
        "{cmd:?}"
    );
    assert_eq!(cmd.configs.len(), 2);

    // Only the first heartbeat of a connection triggers a push; a command
    // sent afterwards is the next thing on the stream.
    a.send(vec![heartbeat(unix_now())]).await;
    let body = json!({"agent_id": "agent-cfg-1", "command": {"task": {"data_type": 1050, "name": "collector", "data": "after", "token": "t"}}});
    assert_eq!(center.command(&body).await["code"], 0);
    let next = a.expect_command(T).await;
    assert_eq!(
        next.task.as_ref().map(|t| t.data.as_str()),
        Some("after"),
        "no second config push: {next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_components_means_no_empty_config_push() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let mut a = center
        .open_stream("agent-nocfg", vec![heartbeat(unix_now())])
        .await;
    listed(&center, "agent-nocfg").await;
    // An empty Command would make a Go agent delete every plugin. The first
    // thing the stream carries must be the task we post.
    let body = json!({"agent_id": "agent-nocfg", "command": {"task": {"data_type": 1060, "name": "x", "data": "d", "token": "tk"}}});
    assert_eq!(center.command(&body).await["code"], 0);
    let first = a.expect_command(T).await;
    assert!(first.configs.is_empty());
    assert_eq!(first.task.map(|t| t.data_type), Some(1060));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_commands_reach_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let mut s = center
        .open_stream("agent-cmd-1", vec![record(5003, unix_now(), &[("a", "b")])])
        .await;
    listed(&center, "agent-cmd-1").await;

    let task = json!({"agent_id": "agent-cmd-1", "command": {"agent_ctrl": 0,
        "task": {"data_type": 1050, "name": "collector", "data": "{\"path\":\"/etc\"}", "token": "tok-9"}}});
    let v = center.command(&task).await;
    assert_eq!((&v["code"], &v["data"]), (&json!(0), &json!("")), "{v}");
    let cmd = s.expect_command(T).await;
    let t = cmd.task.expect("task");
    assert_eq!(
        (t.data_type, &*t.object_name, &*t.data, &*t.token),
        (1050, "collector", "{\"path\":\"/etc\"}", "tok-9")
    );
    assert!(cmd.configs.is_empty());

    let cfg = json!({"agent_id": "agent-cmd-1", "command": {"config": [
        {"name": "scanner", "type": "plugin", "version": "2.0", "sha256": "abc", "signature": "def",
         "download_url": ["http://a/b"], "detail": "d"}]}});
    assert_eq!(center.command(&cfg).await["code"], 0);
    let cmd = s.expect_command(T).await;
    assert!(cmd.task.is_none());
    assert_eq!(cmd.configs.len(), 1);
    let c = &cmd.configs[0];
    assert_eq!(
        (
            &*c.name,
            &*c.r#type,
            &*c.version,
            &*c.sha256,
            &*c.signature,
            &c.download_urls[..],
            &*c.detail
        ),
        (
            "scanner",
            "plugin",
            "2.0",
            "abc",
            "def",
            &["http://a/b".to_string()][..],
            "d"
        )
    );

    // Unknown agent: code 3 with the error text.
    let v = center
        .command(&json!({"agent_id": "nobody", "command": {"task": {"data_type": 1}}}))
        .await;
    assert_eq!(v["code"], 3, "{v}");
    assert!(
        v["data"].as_str().is_some_and(|d| d.contains("not found")),
        "{v}"
    );
    // Binding failure (agent_id missing): HTTP 400, envelope code 2.
    let (ak, sk) = center.api_key();
    let body = br#"{"command":{}}"#;
    let h = elkeid_tests::center::signed_headers(&ak, &sk, "POST", "/command/", body, unix_now());
    let r = elkeid_tests::center::http(center.api_target(), "POST", "/command/", &h, body).await;
    assert_eq!(
        (r.status, &r.json()["code"]),
        (400, &json!(2)),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_agent_replaces_its_stale_stream() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let mut old = center
        .open_stream("agent-dup", vec![heartbeat(unix_now())])
        .await;
    listed(&center, "agent-dup").await;
    // Same id while the old stream is still open: Elkeid refused this
    // ("agentID conflict"); the newer stream must win.
    let mut new = center
        .open_stream("agent-dup", vec![heartbeat(unix_now())])
        .await;
    match old.next(T).await {
        Some(Ok(None)) | Some(Err(_)) => {}
        other => panic!("old stream must be closed, got {other:?}"),
    }
    let c = &center;
    eventually(T, || async move {
        let l = c.conn_list().await;
        (l.iter().filter(|x| *x == "agent-dup").count() == 1).then_some(())
    })
    .await
    .expect("listed exactly once");
    let v = center
        .command(&json!({"agent_id": "agent-dup", "command": {"task": {"data_type": 1051, "data": "to-new", "token": "n"}}}))
        .await;
    assert_eq!(v["code"], 0, "{v}");
    let cmd = new.expect_command(T).await;
    assert_eq!(cmd.task.map(|t| t.data), Some("to-new".into()));
    // The new stream keeps working.
    new.send(vec![record(5003, unix_now(), &[("after", "replace")])])
        .await;
    eventually(T, || async move {
        c.ndjson_records()
            .iter()
            .any(|l| l["fields"]["after"] == "replace")
            .then_some(())
    })
    .await
    .expect("record from the new stream stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_refuses_extra_streams_and_frees_slots() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &["--conn-limit", "2"]);
    let a = center
        .open_stream("lim-a", vec![heartbeat(unix_now())])
        .await;
    let _b = center
        .open_stream("lim-b", vec![heartbeat(unix_now())])
        .await;
    listed(&center, "lim-b").await;
    let third = AgentStream::open(
        center.agent().await,
        packet("lim-c", vec![heartbeat(unix_now())]),
    )
    .await;
    let err = third.expect_err("a third stream is refused");
    assert!(
        err.message().contains("connection limit"),
        "clear status: {err:?}"
    );
    assert!(!center.conn_list().await.iter().any(|x| x == "lim-c"));

    drop(a);
    let c = &center;
    eventually(T, || async move {
        (!c.conn_list().await.iter().any(|x| x == "lim-a")).then_some(())
    })
    .await
    .expect("closed stream unregistered");
    let again = eventually(T, || async move {
        AgentStream::open(
            c.agent().await,
            packet("lim-c", vec![heartbeat(unix_now())]),
        )
        .await
        .ok()
    })
    .await
    .expect("a freed slot takes a new agent");
    listed(&center, "lim-c").await;
    drop(again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_agent_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let err = AgentStream::open(
        center.agent().await,
        packet("", vec![heartbeat(unix_now())]),
    )
    .await
    .expect_err("empty agent_id refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("agent_id"), "{err:?}");
}
