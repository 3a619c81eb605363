//! Elkeid's AK/SK request signing (spec §5.6), bit for bit.
//!
//! Headers `AccessKey`, `Signature`, `TimeStamp` (decimal Unix seconds,
//! |now - ts| < 60). String to sign: METHOD, PATH (surrounding spaces and one
//! trailing `/` removed), RAWQUERY (without `?`), AK, TIMESTAMP, BODYHASH
//! (lowercase hex SHA-256 of the body, or "" for an empty body) joined by
//! the two characters backslash and `n`. Signature: lowercase hex
//! HMAC-SHA256 keyed by the secret key. Access keys are matched lowercased.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, envelope};
use crate::metrics::inc;

/// Largest signed body read by the middleware.
pub(crate) const MAX_BODY: usize = 4 * 1024 * 1024;
/// Allowed clock skew, seconds (exclusive).
const WINDOW: i64 = 60;

/// Lowercase hex SHA-256 of `body`, or "" when it is empty (Elkeid's quirk).
pub(crate) fn body_hash(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    hex::encode(ring::digest::digest(&ring::digest::SHA256, body))
}

/// The string to sign.
pub(crate) fn string_to_sign(
    method: &str,
    path: &str,
    raw_query: &str,
    ak: &str,
    ts: &str,
    body: &[u8],
) -> String {
    let p = path.trim();
    let p = p.strip_suffix('/').unwrap_or(p);
    [method, p, raw_query, ak, ts, &body_hash(body)].join("\\n")
}

/// The signature of a request.
pub(crate) fn sign(
    sk: &str,
    method: &str,
    path: &str,
    raw_query: &str,
    ak: &str,
    ts: &str,
    body: &[u8],
) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sk.as_bytes());
    hex::encode(ring::hmac::sign(
        &key,
        string_to_sign(method, path, raw_query, ak, ts, body).as_bytes(),
    ))
}

fn eq_ct(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn header<'a>(req: &'a Request, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn refuse(state: &AppState, reason: String) -> Response {
    inc(&state.metrics.auth_failures);
    tracing::info!(%reason, "http api: auth failed");
    envelope(1, "auth failed", serde_json::Value::String(reason)).into_response()
}

/// Checks a request; the reason text on failure is Elkeid's.
pub(crate) async fn middleware(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if !state.auth {
        return next.run(req).await;
    }
    let ak = header(&req, "AccessKey").to_string();
    let sig = header(&req, "Signature").to_string();
    let ts = header(&req, "TimeStamp").to_string();
    if ak.is_empty() || sig.is_empty() || ts.is_empty() {
        return refuse(
            &state,
            "header missed: AccessKey|Signature|TimeStamp".into(),
        );
    }
    let t: i64 = match ts.parse() {
        Ok(t) => t,
        Err(_) => {
            return refuse(
                &state,
                format!("TimeStamp Error strconv.ParseInt: parsing {ts:?}: invalid syntax"),
            );
        }
    };
    if (crate::now_unix().saturating_sub(t)).abs() >= WINDOW {
        return refuse(&state, "timestamp error".into());
    }
    let Some(sk) = state.aksk.get(&ak.to_lowercase()).cloned() else {
        return refuse(&state, "User not exist".into());
    };
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return refuse(&state, "signature error".into()),
    };
    let want = sign(
        &sk,
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &ak,
        &ts,
        &bytes,
    );
    if !eq_ct(want.as_bytes(), sig.as_bytes()) {
        return refuse(&state, "signature error".into());
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with Python's hmac/hashlib:
    // hmac.new(b"mysk", "\\n".join([...]).encode(), hashlib.sha256).hexdigest()
    #[test]
    fn python_vectors() {
        let body = br#"{"agent_id":"a1"}"#;
        assert_eq!(
            string_to_sign("POST", "/command/", "x=1", "myak", "1700000000", body),
            "POST\\n/command\\nx=1\\nmyak\\n1700000000\\n2463169dcf216dab3e9cdd328ee40451d0cb284d190050c99820fe0470477f81"
        );
        assert_eq!(
            sign(
                "mysk",
                "POST",
                " /command/ ",
                "x=1",
                "myak",
                "1700000000",
                body
            ),
            "fa1c57143dc061001b7b7c96470096eec71f4df683af81adf3bc0db1acec6709"
        );
        assert_eq!(
            sign("mysk", "GET", "/conn/list", "", "myak", "1700000000", b""),
            "3415b41ab365559d2a32c1fe978b21c15cb2b066c3a48747f0541d6135407835"
        );
    }

    #[test]
    fn only_one_trailing_slash_is_removed() {
        assert!(string_to_sign("GET", "/a//", "", "k", "1", b"").starts_with("GET\\n/a/\\n"));
    }
}
