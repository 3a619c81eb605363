//! Elkeid's AK/SK request signing (spec §5.6), bit for bit.
//!
//! Headers `AccessKey`, `Signature`, `TimeStamp` (decimal Unix seconds,
//! |now - ts| < 60). String to sign: METHOD, PATH (surrounding spaces and one
//! trailing `/` removed), RAWQUERY (without `?`), AK, TIMESTAMP, BODYHASH
//! (lowercase hex SHA-256 of the body, or "" for an empty body) joined by
//! the two characters backslash and `n`. Signature: lowercase hex
//! HMAC-SHA256 keyed by the secret key. Access keys are matched lowercased.
//!
//! Beyond Elkeid:
//! - the signature is checked with `ring::hmac::verify` (constant time);
//! - a state-changing request (any method but GET/HEAD) whose signature was
//!   already accepted within the validity window is refused (`"signature
//!   replayed"`, `elkeid_center_http_replays_refused_total`): an observer
//!   cannot re-send a captured `POST /command/`. The set of seen signatures
//!   is bounded ([`MAX_SEEN`]); when it is full of live entries new
//!   state-changing requests are refused rather than let through unchecked.
//!   Read-only requests are exempt (a manager may poll the same `GET` twice
//!   in one second, which yields the same signature).

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, envelope};
use crate::metrics::inc;

/// Allowed clock skew, seconds (exclusive).
const WINDOW: i64 = 60;
/// Most signatures remembered for replay refusal (about 80 bytes each).
pub(crate) const MAX_SEEN: usize = 65_536;

/// Signatures accepted within the validity window (bounded).
#[derive(Debug, Default)]
pub(crate) struct ReplayGuard {
    inner: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// (expiry Unix second, signature)
    by_expiry: BTreeSet<(i64, [u8; 32])>,
    sigs: HashSet<[u8; 32]>,
}

/// Why [`ReplayGuard::admit`] said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Already accepted within the window.
    Seen,
    /// [`MAX_SEEN`] live signatures are remembered.
    Full,
}

impl ReplayGuard {
    /// Remembers `sig` (signed at `ts`) until it can no longer pass the
    /// timestamp check; refuses one already remembered.
    pub(crate) fn admit(&self, sig: [u8; 32], ts: i64, now: i64) -> Result<(), Replay> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(exp, s)) = g.by_expiry.first() {
            if exp > now {
                break;
            }
            g.by_expiry.pop_first();
            g.sigs.remove(&s);
        }
        if g.sigs.contains(&sig) {
            return Err(Replay::Seen);
        }
        if g.sigs.len() >= MAX_SEEN {
            return Err(Replay::Full);
        }
        // |now - ts| < WINDOW: after ts + WINDOW the timestamp check refuses it.
        g.by_expiry.insert((ts.saturating_add(WINDOW), sig));
        g.sigs.insert(sig);
        Ok(())
    }
}

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

/// The signature of a request: the client side (`elkeid-center ctl`); the
/// center itself checks with [`verify`].
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

/// The 32 bytes of a lowercase-hex signature (Elkeid compares the hex
/// text, so uppercase is not the same signature).
fn sig_bytes(sig: &str) -> Option<[u8; 32]> {
    if sig.len() != 64 || !sig.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(sig, &mut out).ok()?;
    Some(out)
}

/// Constant-time check of `sig` over a string to sign (ring).
pub(crate) fn verify(sk: &str, to_sign: &str, sig: &[u8; 32]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sk.as_bytes());
    ring::hmac::verify(&key, to_sign.as_bytes(), sig).is_ok()
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
    // Center-to-center calls: mutual TLS with the cluster CA (on top of
    // the AK/SK signature below).
    if state.peer_mtls
        && req
            .headers()
            .contains_key(crate::cluster::peer::FORWARDED_HEADER)
        && req.extensions().get::<super::ClientCert>().is_none()
    {
        inc(&state.metrics.auth_failures);
        tracing::warn!("http api: forwarded request without a cluster client certificate refused");
        return envelope(
            1,
            "auth failed",
            serde_json::Value::String(
                "forwarded request without a client certificate of the cluster CA".into(),
            ),
        )
        .into_response();
    }
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
    // The body was read (bounded, with a deadline) by `limits::body`.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, super::limits::MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return refuse(&state, "signature error".into()),
    };
    let Some(sig_raw) = sig_bytes(&sig) else {
        return refuse(&state, "signature error".into());
    };
    let to_sign = string_to_sign(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &ak,
        &ts,
        &bytes,
    );
    if !verify(&sk, &to_sign, &sig_raw) {
        return refuse(&state, "signature error".into());
    }
    let read_only =
        parts.method == axum::http::Method::GET || parts.method == axum::http::Method::HEAD;
    if !read_only {
        match state.replays.admit(sig_raw, t, crate::now_unix()) {
            Ok(()) => {}
            Err(Replay::Seen) => {
                inc(&state.metrics.http_replays_refused);
                return refuse(&state, "signature replayed".into());
            }
            Err(Replay::Full) => {
                inc(&state.metrics.http_replays_refused);
                return refuse(&state, "too many signed requests in the window".into());
            }
        }
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
    fn verify_is_the_signature_and_lowercase_only() {
        let sig = sign("mysk", "GET", "/conn/list", "", "myak", "1700000000", b"");
        let raw = sig_bytes(&sig).unwrap();
        let msg = |p| string_to_sign("GET", p, "", "myak", "1700000000", b"");
        assert!(verify("mysk", &msg("/conn/list"), &raw));
        assert!(!verify("mysk", &msg("/conn/lisT"), &raw));
        assert!(!verify("other", &msg("/conn/list"), &raw));
        assert!(sig_bytes(&sig.to_uppercase()).is_none());
        assert!(sig_bytes(&sig[..62]).is_none());
    }

    #[test]
    fn replay_guard_refuses_seen_and_forgets_expired() {
        let g = ReplayGuard::default();
        assert_eq!(g.admit([1; 32], 1000, 1000), Ok(()));
        assert_eq!(g.admit([1; 32], 1000, 1059), Err(Replay::Seen));
        assert_eq!(g.admit([2; 32], 1000, 1001), Ok(()));
        // at ts + WINDOW the timestamp check refuses it anyway: forgotten
        assert_eq!(g.admit([1; 32], 1000, 1060), Ok(()));
        let g = ReplayGuard::default();
        for i in 0..MAX_SEEN {
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&(i as u64).to_le_bytes());
            assert_eq!(g.admit(s, 5000, 5000), Ok(()));
        }
        assert_eq!(g.admit([9; 32], 5000, 5000), Err(Replay::Full));
        assert_eq!(
            g.admit([9; 32], 5000, 5060),
            Ok(()),
            "expired entries make room"
        );
        assert_eq!(g.inner.lock().unwrap().sigs.len(), 1);
    }

    #[test]
    fn only_one_trailing_slash_is_removed() {
        assert!(string_to_sign("GET", "/a//", "", "k", "1", b"").starts_with("GET\\n/a/\\n"));
    }
}
