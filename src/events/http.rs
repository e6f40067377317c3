//! The HTTP server: `GET /status`, `GET /metrics`, `GET /labels`, `POST /labels`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /status` | [`Status`](super::Status) as JSON |
//! | `GET /metrics` | Prometheus text format ([`render_prometheus`]) |
//! | `GET /labels` | [`LabelsDoc`](super::LabelsDoc) as JSON: the set in use, thresholds, scores |
//! | `POST /labels` | a signed label-set update (body as on MQTT, see [`super::remote`]); answers [`UpdateReply`] JSON, 200 when accepted, 422 when refused; 403 unless the server was started with updates allowed |
//!
//! HTTP/1.1 only, with hyper; each connection is served on its own task, and a client that
//! does not finish its request headers in time is dropped.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::metrics::render_prometheus;
use super::remote::UpdateReply;
use super::DeviceView;
use crate::update::MAX_SET_LEN;

/// The Prometheus text format's content type.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Largest `POST /labels` body: the largest label set plus framing overhead.
const MAX_BODY: usize = MAX_SET_LEN as usize + MAX_SET_LEN as usize / 10 + 64 * 1024;

/// Serves `view` on `listener` until the task is dropped or aborted.
///
/// `accept_updates` allows `POST /labels` (only with a device key: updates from a network
/// must be signed, which [`DeviceView::apply_update`] enforces).
pub async fn serve(listener: TcpListener, view: Arc<dyn DeviceView>, accept_updates: bool) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("HTTP: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let view = view.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let view = view.clone();
                async move { Ok::<_, Infallible>(route(request, view, accept_updates).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "HTTP connection: {e}");
            }
        });
    }
}

async fn route(
    request: Request<Incoming>,
    view: Arc<dyn DeviceView>,
    accept_updates: bool,
) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    tracing::debug!(%method, %path, "HTTP request");
    match (path.as_str(), &method) {
        ("/status", &Method::GET) => json(StatusCode::OK, &view.status()),
        ("/labels", &Method::GET) => json(StatusCode::OK, &view.labels()),
        ("/metrics", &Method::GET) => {
            let mut response =
                Response::new(Full::new(Bytes::from(render_prometheus(&view.metrics()))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            );
            response
        }
        ("/labels", &Method::POST) => {
            if !accept_updates {
                return json(
                    StatusCode::FORBIDDEN,
                    &UpdateReply::Rejected {
                        transfer_id: None,
                        reason: "this device takes no label sets over HTTP (`[updates] http = \
                                 true` allows it)"
                            .into(),
                    },
                );
            }
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return json(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &UpdateReply::Rejected {
                            transfer_id: None,
                            reason: format!("reading the update: {e}"),
                        },
                    )
                }
            };
            let reply = tokio::task::spawn_blocking(move || view.apply_update(&body))
                .await
                .unwrap_or_else(|e| UpdateReply::Rejected {
                    transfer_id: None,
                    reason: format!("the update handler failed: {e}"),
                });
            let status = match reply {
                UpdateReply::Accepted { .. } => StatusCode::OK,
                UpdateReply::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            };
            json(status, &reply)
        }
        ("/status" | "/metrics", _) => not_allowed("GET"),
        ("/labels", _) => not_allowed("GET, POST"),
        _ => {
            let mut response = text(
                StatusCode::NOT_FOUND,
                format!("no route {path}: try /status, /metrics or /labels\n"),
            );
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; allowed: {allow}\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}
