//! The operations port: `/metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (it accepts work: 503 while draining).

use crate::shutdown::CancelToken;
use crate::state::State;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            state.refresh_gauges();
            respond(StatusCode::OK, "text/plain; version=0.0.4", state.metrics.encode())
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if state.is_draining() => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n"),
        "/readyz" => respond(StatusCode::OK, "text/plain", "ready\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n"),
    })
}

/// Serves the operations port until `stop` fires (over TLS when `tls` is given).
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    stop: CancelToken,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let http = hyper::server::conn::http1::Builder::new();
            // Bounded: a client that never finishes its handshake or request is dropped.
            let limit = std::time::Duration::from_secs(30);
            match tls {
                None => {
                    let _ = tokio::time::timeout(limit, http.serve_connection(TokioIo::new(stream), svc)).await;
                }
                Some(acceptor) => {
                    let _ = tokio::time::timeout(limit, async {
                        if let Ok(s) = acceptor.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    })
                    .await;
                }
            }
        });
    }
}
