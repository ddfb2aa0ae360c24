//! The HTTP server around the API's router: accepting connections within a cap, HTTP/1 and
//! HTTP/2 on each, the header timeout, and a graceful drain at shutdown. It lives here, beside
//! the router, so that hyper's connection state machine is compiled with the serving crate.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Bounds on the API's connections, so that no client can hold the process.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; one beyond is closed at once (file descriptors are shared
    /// with the consumers, whose commits must not fail for want of one).
    pub max_connections: usize,
    /// The longest a client may take to send a request's headers (and, between requests on a
    /// kept-alive connection, to start the next).
    pub header_timeout: Duration,
    /// How long in-flight requests may finish after shutdown begins.
    pub drain_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`: HTTP/1 and HTTP/2, at most
/// `limits.max_connections` connections, headers within `limits.header_timeout`; then lets
/// in-flight requests finish for up to `limits.drain_timeout`.
pub async fn serve(
    app: axum::Router,
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: too many open");
            continue;
        };
        // Answers go out in several writes (head, shared rows, tail): without this, Nagle's
        // algorithm holds each one for the client's delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY could not be set");
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection_with_upgrades(
                TokioIo::new(crate::sendfile::SendfileIo::new(stream)),
                service,
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the drain timeout were cut");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: ConnectionLimits) -> (std::net::SocketAddr, CancellationToken) {
        let app = axum::Router::new().route("/livez", axum::routing::get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(app, listener, limits, token.clone()));
        (address, token)
    }

    /// Reads until the server closes the connection or `wait` passes: whether it closed.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn livez(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_let_go() {
        let (address, token) = start(ConnectionLimits {
            header_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut slow = TcpStream::connect(address).await.unwrap();
        slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut slow, Duration::from_secs(5)).await);
        let mut fine = TcpStream::connect(address).await.unwrap();
        assert!(livez(&mut fine).await.starts_with("HTTP/1.1 200"));
        token.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_and_the_others_served() {
        let (address, token) = start(ConnectionLimits {
            max_connections: 2,
            ..Default::default()
        })
        .await;
        let mut first = TcpStream::connect(address).await.unwrap();
        let mut second = TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut third = TcpStream::connect(address).await.unwrap();
        assert!(closed_within(&mut third, Duration::from_secs(5)).await);
        assert!(livez(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(livez(&mut second).await.starts_with("HTTP/1.1 200"));
        // A closed connection frees its place.
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut fourth = TcpStream::connect(address).await.unwrap();
        assert!(livez(&mut fourth).await.starts_with("HTTP/1.1 200"));
        token.cancel();
    }
}
