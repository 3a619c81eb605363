//! The HTTP API's AK/SK authentication (spec §5.6) against the real center,
//! with requests signed by our own signer (`elkeid_tests::center::sign`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use elkeid_tests::Center;
use elkeid_tests::center::{HttpResponse, http, sign, signed_headers, unix_now};
use serde_json::{Value, json};

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An auth failure: HTTP 200, envelope code 1, and `data` = `why`.
fn assert_auth_failed(r: &HttpResponse, why: &str) {
    let v: Value = r.json();
    assert_eq!(r.status, 200, "{v}");
    assert_eq!(v["code"], 1, "{v}");
    assert_eq!(v["data"], why, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_checked_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let (ak, sk) = center.api_key();
    let now = unix_now();

    // A correct signature, with and without a query string.
    let ok = http(
        center.api_target(),
        "GET",
        "/conn/count",
        &signed_headers(&ak, &sk, "GET", "/conn/count", b"", now),
        b"",
    )
    .await;
    assert_eq!(
        (ok.status, &ok.json()["code"]),
        (200, &json!(0)),
        "{:?}",
        ok.json()
    );
    let ok = http(
        center.api_target(),
        "GET",
        "/conn/list?x=1&y=2",
        &signed_headers(&ak, &sk, "GET", "/conn/list?x=1&y=2", b"", now),
        b"",
    )
    .await;
    assert_eq!(
        ok.json()["code"],
        0,
        "the raw query is part of the signed string: {:?}",
        ok.json()
    );
    // The path is signed with its trailing slash removed.
    let body = br#"{"agent_id":"nobody","command":{"task":{"data_type":1}}}"#;
    let ts = now.to_string();
    let sig = sign(&sk, "POST", "/command", "", &ak, &ts, body);
    let hdr = h(&[("AccessKey", &ak), ("Signature", &sig), ("TimeStamp", &ts)]);
    let r = http(center.api_target(), "POST", "/command/", &hdr, body).await;
    assert_eq!(
        r.json()["code"],
        3,
        "signed fine, unknown agent: {:?}",
        r.json()
    );

    // Missing headers, each in turn.
    let full = signed_headers(&ak, &sk, "GET", "/conn/list", b"", now);
    for skip in ["AccessKey", "Signature", "TimeStamp"] {
        let partial: Vec<_> = full.iter().filter(|(k, _)| k != skip).cloned().collect();
        let r = http(center.api_target(), "GET", "/conn/list", &partial, b"").await;
        assert_auth_failed(&r, "header missed: AccessKey|Signature|TimeStamp");
    }
    assert_auth_failed(
        &http(center.api_target(), "GET", "/conn/stat", &[], b"").await,
        "header missed: AccessKey|Signature|TimeStamp",
    );

    // Stale and future timestamps (window ±60 s), correctly signed.
    for ts in [now - 120, now + 120] {
        let r = http(
            center.api_target(),
            "GET",
            "/conn/list",
            &signed_headers(&ak, &sk, "GET", "/conn/list", b"", ts),
            b"",
        )
        .await;
        assert_auth_failed(&r, "timestamp error");
    }
    // A timestamp that is not a number.
    let sig = sign(&sk, "GET", "/conn/list", "", &ak, "soon", b"");
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list",
        &h(&[
            ("AccessKey", &ak),
            ("Signature", &sig),
            ("TimeStamp", "soon"),
        ]),
        b"",
    )
    .await;
    let v = r.json();
    assert_eq!((r.status, &v["code"]), (200, &json!(1)), "{v}");
    assert!(
        v["data"]
            .as_str()
            .is_some_and(|d| d.starts_with("TimeStamp Error")),
        "{v}"
    );

    // Unknown access key.
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list",
        &signed_headers("no-such-ak", &sk, "GET", "/conn/list", b"", now),
        b"",
    )
    .await;
    assert_auth_failed(&r, "User not exist");

    // Wrong secret, wrong query, tampered body, wrong method, newline separators.
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list",
        &signed_headers(&ak, "wrong-secret", "GET", "/conn/list", b"", now),
        b"",
    )
    .await;
    assert_auth_failed(&r, "signature error");
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list?x=2",
        &signed_headers(&ak, &sk, "GET", "/conn/list?x=1", b"", now),
        b"",
    )
    .await;
    assert_auth_failed(&r, "signature error");
    let signed = signed_headers(&ak, &sk, "POST", "/command/", body, now);
    let tampered = br#"{"agent_id":"other!","command":{"task":{"data_type":1}}}"#;
    assert_auth_failed(
        &http(center.api_target(), "POST", "/command/", &signed, tampered).await,
        "signature error",
    );
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list",
        &signed_headers(&ak, &sk, "POST", "/conn/list", b"", now),
        b"",
    )
    .await;
    assert_auth_failed(&r, "signature error");
    // Real newlines instead of the literal backslash-n separators.
    let to_sign = ["GET", "/conn/list", "", &ak, &ts, ""].join("\n");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sk.as_bytes());
    let sig: String = ring::hmac::sign(&key, to_sign.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list",
        &h(&[("AccessKey", &ak), ("Signature", &sig), ("TimeStamp", &ts)]),
        b"",
    )
    .await;
    assert_auth_failed(&r, "signature error");

    // The empty-body quirk: an empty body hashes to "", not SHA-256("").
    let empty_sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let to_sign = ["GET", "/conn/list", "", &ak, &ts, empty_sha].join("\\n");
    let sig: String = ring::hmac::sign(&key, to_sign.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = http(
        center.api_target(),
        "GET",
        "/conn/list",
        &h(&[("AccessKey", &ak), ("Signature", &sig), ("TimeStamp", &ts)]),
        b"",
    )
    .await;
    assert_auth_failed(&r, "signature error");

    // Open endpoints need no signature.
    assert_eq!(
        http(center.api_target(), "GET", "/ping", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(
        http(center.api_target(), "GET", "/metrics", &[], b"")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &["--auth", "false"]);
    let r = http(center.api_target(), "GET", "/conn/list", &[], b"").await;
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"code": 0, "msg": "success", "data": []}))
    );
}
