//! The API's accept loop: HTTP/1.1 over TLS (default) or plain TCP
//! (`http.tls = false`), at most [`MAX_CONNECTIONS`] at once, a TLS
//! handshake deadline (`tls_handshake_timeout_secs`, 10 s) and a
//! request-header deadline on every connection (a client that opens
//! connections and sends nothing cannot hold them). Handshakes that time
//! out or fail are counted in
//! `elkeid_center_tls_handshakes_refused_total{listener="http",reason}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Request headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent API connections.
const MAX_CONNECTIONS: usize = 1024;

async fn serve_conn<S>(io: S, router: Router, peer: std::net::SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(error) = conn.await {
        tracing::debug!(%peer, %error, "http api connection ended with an error");
    }
}

/// Serves `router` (over TLS when `tls` is set) until `shutdown` resolves
/// (then stops accepting; open connections end with the process).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "http api: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small answers, written as soon as they are ready (TLS session
        // tickets and the response go out in separate writes).
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "http api: too many connections");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                serve_conn(tcp, router, peer).await;
                return;
            };
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // A client certificate is only ever present here when
                    // it verified (the verifier refuses the handshake
                    // otherwise); requests on this connection carry that.
                    let router = if tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty())
                    {
                        router.layer(axum::Extension(super::ClientCert))
                    } else {
                        router
                    };
                    serve_conn(tls, router, peer).await
                }
                Ok(Err(error)) => {
                    metrics.tls_refused("http", false);
                    tracing::debug!(%peer, %error, "http api: TLS handshake failed");
                }
                Err(_) => {
                    metrics.tls_refused("http", true);
                    tracing::debug!(%peer, "http api: TLS handshake timed out");
                }
            }
        });
    }
}
