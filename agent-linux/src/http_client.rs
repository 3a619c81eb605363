//! Tiny HTTP/1.1 GET client (plain HTTP) for service discovery: one request
//! per connection, a whole-request timeout and a response size cap.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// HTTP client errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// The URL is not `http://host:port/path`.
    #[error("unsupported url {0:?}")]
    Url(String),
    /// TCP connect failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Protocol error.
    #[error("http: {0}")]
    Http(String),
    /// Non-2xx status.
    #[error("http status {0}")]
    Status(u16),
    /// The body is larger than the cap.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The whole request took longer than the timeout.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
}

/// GETs `url` (`http://host:port/path?query`), returning the body (at most
/// `max` bytes) within `timeout`.
pub(crate) async fn get(url: &str, timeout: Duration, max: usize) -> Result<Bytes, HttpError> {
    match tokio::time::timeout(timeout, get_inner(url, max)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout(timeout)),
    }
}

async fn get_inner(url: &str, max: usize) -> Result<Bytes, HttpError> {
    let uri: http::Uri = url.parse().map_err(|_| HttpError::Url(url.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(HttpError::Url(url.to_string()));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| HttpError::Url(url.to_string()))?
        .clone();
    let addr = format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80));
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|source| HttpError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| HttpError::Http(e.to_string()))?;
    let conn_task = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = http::Request::get(path)
        .header(http::header::HOST, auth.as_str())
        .header(http::header::USER_AGENT, "elkeid-agent")
        .body(Empty::<Bytes>::new())
        .map_err(|e| HttpError::Http(e.to_string()))?;
    let result = async {
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| HttpError::Http(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(HttpError::Status(resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge(max)
                } else {
                    HttpError::Http(e.to_string())
                }
            })?;
        Ok(body.to_bytes())
    }
    .await;
    conn_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve_once(resp: &'static [u8]) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::task::spawn_local(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(resp).await;
        });
        a
    }

    #[tokio::test(flavor = "current_thread")]
    async fn get_ok_status_and_cap() {
        let ls = tokio::task::LocalSet::new();
        ls.run_until(async {
            let a = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
            let b = get(&format!("http://{a}/x?y=1"), Duration::from_secs(5), 100)
                .await
                .unwrap();
            assert_eq!(&b[..], b"hello");
            let a = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
            assert!(matches!(
                get(&format!("http://{a}/"), Duration::from_secs(5), 100).await,
                Err(HttpError::Status(404))
            ));
            let a = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
            assert!(matches!(
                get(&format!("http://{a}/"), Duration::from_secs(5), 3).await,
                Err(HttpError::TooLarge(3))
            ));
            assert!(matches!(
                get("ftp://x/", Duration::from_secs(5), 3).await,
                Err(HttpError::Url(_))
            ));
        })
        .await;
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn silent_server_times_out() {
        let ls = tokio::task::LocalSet::new();
        ls.run_until(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let _keep = tokio::task::spawn_local(async move {
                let (_s, _) = l.accept().await.unwrap();
                std::future::pending::<()>().await;
            });
            let r = get(&format!("http://{a}/"), Duration::from_secs(5), 10).await;
            assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        })
        .await;
    }
}
