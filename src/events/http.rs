//! The HTTP server: the device page, `GET /status`, `GET /metrics`, `GET /labels`, `POST /labels`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the device page ([`super::page`]): live scores against thresholds, events, status |
//! | `GET /events` | Server-Sent Events: each detection as it starts, rises and ends (`event: detection`, data: the detection as JSON); 503 when 16 streams are open |
//! | `GET /status` | [`Status`](super::Status) as JSON |
//! | `GET /metrics` | Prometheus text format ([`render_prometheus`]) |
//! | `GET /labels` | [`LabelsDoc`](super::LabelsDoc) as JSON: the set in use, thresholds, scores |
//! | `GET /tuning` | [`TuningDoc`]: a person's per-label settings ([`crate::tuning`]) and whether this server takes changes |
//! | `POST /tuning` | one change, a [`TuningEdit`] as JSON (`{"label": "waves", "threshold": 0.6}`, `"enabled": false`, `"reset": true`): saved, then applied between two frames; answers the new [`TuningDoc`], 422 with `{"error"}` when refused, 403 when this server takes no changes |
//! | `DELETE /tuning` | drops every setting (labels back to their set's thresholds, all enabled) |
//! | `GET /snapshot` | the next frame as an image (PNG, at most 320 px wide; JPEG as an MJPEG camera sent it); 503 when none comes within 2 s |
//! | `POST /labels` | a challenge request or a signed label-set update (bodies as on MQTT, see [`super::remote`]); answers [`UpdateReply`] JSON, 200 with the challenge or when accepted, 422 when refused, 503 when the device's budget for unauthenticated bytes is spent, 411 without `Content-Length`; 403 unless the server was started with updates allowed |
//!
//! With [`BasicAuth`], every route but `POST /labels` (authenticated by its signature) asks
//! for the device's credentials: 401 without them. Changes to `/tuning` are taken only behind
//! credentials or on a loopback address ([`ServeOptions::allow_edits`]).
//!
//! HTTP/1.1 only, with hyper; each connection is served on its own task. A client that does
//! not finish its request headers in time is dropped, and so is one whose body outlasts the
//! device's `body_timeout`; at most `max_connections` are open, a new one displacing the
//! oldest idle one ([`Slots`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::metrics::render_prometheus;
use super::page::{EventStream, LiveFeed, PAGE_HTML};
use super::remote::{apply_update, UpdateReply};
use super::DeviceView;
use crate::tuning::{LabelTuning, TuningEdit, TuningError};
use crate::update::Slots;

/// The Prometheus text format's content type.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Largest `POST /labels` body for a device that takes sets of up to `max_set` bytes: COBS,
/// frame headers and CRCs add well under 10 %.
pub fn max_update_body(max_set: usize) -> usize {
    max_set + max_set / 10 + 64 * 1024
}

/// Largest `POST /tuning` body: one label's change.
const MAX_TUNING_BODY: usize = 4096;

/// What a server allows and asks for.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Take signed label sets by `POST /labels` (only with a device key: updates from a
    /// network must be signed, which the device's [`UpdateGate`](crate::update::UpdateGate)
    /// enforces).
    pub accept_updates: bool,
    /// Ask for these credentials on every route but `POST /labels`.
    pub auth: Option<BasicAuth>,
    /// Take changes to the per-label settings (`POST`/`DELETE /tuning`).
    pub allow_edits: bool,
}

/// `GET /tuning` and the answer to a change.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TuningDoc {
    /// Whether this server takes changes (`POST /tuning`).
    pub editable: bool,
    /// Label name → its settings.
    pub labels: std::collections::BTreeMap<String, LabelTuning>,
}

/// The credentials a server asks for (HTTP Basic, RFC 7617).
#[derive(Clone)]
pub struct BasicAuth {
    /// `Basic <base64 of user:password>`, as a client sends it.
    expected: Vec<u8>,
}

impl BasicAuth {
    /// Credentials `user` / `password` (`user` without `:`).
    pub fn new(user: &str, password: &str) -> Self {
        let mut expected = b"Basic ".to_vec();
        expected.extend(base64(format!("{user}:{password}").as_bytes()).bytes());
        Self { expected }
    }

    /// Whether `request` carries these credentials (compared in constant time).
    fn admits<B>(&self, request: &Request<B>) -> bool {
        let given = request.headers().get(hyper::header::AUTHORIZATION).map_or(&b""[..], |v| v.as_bytes());
        given.len() == self.expected.len()
            && given.iter().zip(&self.expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasicAuth(..)")
    }
}

/// Standard base64 with padding (RFC 4648), as HTTP Basic credentials are sent.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Serves `view` on `listener` until the task is dropped or aborted.
/// as `options` allow. `/events` streams what is published on `feed`.
pub async fn serve(listener: TcpListener, view: Arc<dyn DeviceView>, options: ServeOptions, feed: Arc<LiveFeed>) {
    let slots = Slots::new(view.update_gate().config().limits.max_connections);
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
        let Some(slot) = slots.admit() else {
            tracing::debug!(%peer, "HTTP: every connection is busy; refused");
            continue;
        };
        let view = view.clone();
        let options = options.clone();
        let feed = feed.clone();
        tokio::spawn(async move {
            let busy = slot.busy_flag();
            let service = service_fn(move |request: Request<Incoming>| {
                let view = view.clone();
                let busy = busy.clone();
                let feed = feed.clone();
                let options = options.clone();
                // A label-set update carries its own authentication, its signature.
                let signed = request.method() == Method::POST && request.uri().path() == "/labels";
                let admitted = signed || options.auth.as_ref().is_none_or(|auth| auth.admits(&request));
                async move {
                    if !admitted {
                        return Ok::<_, Infallible>(unauthorized().map(Either::Left));
                    }
                    if request.method() == Method::GET {
                        match request.uri().path() {
                            "/" => return Ok(page().map(Either::Left)),
                            "/events" => return Ok(events(&feed)),
                            _ => {}
                        }
                    }
                    busy.store(true, std::sync::atomic::Ordering::Relaxed);
                    let response = route(request, view, &options).await;
                    busy.store(false, std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, Infallible>(response.map(Either::Left))
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                // hyper's default lets each connection buffer ~400 KB; bodies are read as they
                // come (and counted against the update budget), so a small buffer does.
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, "HTTP connection: {e}");
                    }
                }
                () = slot.displaced() => tracing::debug!(%peer, "HTTP connection displaced by a newer one"),
            }
        });
    }
}

async fn route(request: Request<Incoming>, view: Arc<dyn DeviceView>, options: &ServeOptions) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    tracing::debug!(%method, %path, "HTTP request");
    match (path.as_str(), &method) {
        ("/status", &Method::GET) => json(StatusCode::OK, &view.status()),
        ("/labels", &Method::GET) => json(StatusCode::OK, &view.labels()),
        ("/metrics", &Method::GET) => {
            let mut response = Response::new(Full::new(Bytes::from(render_prometheus(&view.metrics()))));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE));
            response
        }
        ("/labels", &Method::POST) => {
            if !options.accept_updates {
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
            let gate = view.update_gate().clone();
            let limits = gate.config().limits.clone();
            let refuse = |status, reason: String| json(status, &UpdateReply::Rejected { transfer_id: None, reason });
            let max = max_update_body(limits.max_buffered_bytes);
            let length = request
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            let Some(length) = length else {
                return refuse(StatusCode::LENGTH_REQUIRED, "POST /labels needs a Content-Length".into());
            };
            if length > max {
                return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("an update of {length} bytes exceeds this device's limit of {max} (`[updates] max_buffered_bytes`)"));
            }
            // Held before a byte is read: unauthenticated bodies share one budget.
            let _held = match gate.hold_bytes(length) {
                Ok(held) => held,
                Err(e) => {
                    gate.log_rejection(None, &e.to_string());
                    return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                }
            };
            let body = match tokio::time::timeout(limits.body_timeout, read_body(request.into_body(), length)).await {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => return refuse(StatusCode::BAD_REQUEST, format!("reading the update: {e}")),
                Err(_) => {
                    return refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the update's body took longer than {:?} (`[updates] body_timeout_s`)",
                            limits.body_timeout
                        ),
                    )
                }
            };
            let reply = tokio::task::spawn_blocking(move || apply_update(&gate, &body)).await.unwrap_or_else(|e| {
                UpdateReply::Rejected { transfer_id: None, reason: format!("the update handler failed: {e}") }
            });
            let status = match reply {
                UpdateReply::Accepted { .. } | UpdateReply::Challenge { .. } => StatusCode::OK,
                UpdateReply::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            };
            json(status, &reply)
        }
        ("/tuning", &Method::GET) => match view.tuning() {
            Some(tuning) => json(StatusCode::OK, &TuningDoc { editable: options.allow_edits, labels: tuning.labels }),
            None => error(StatusCode::NOT_FOUND, "this device keeps no per-label settings".into()),
        },
        ("/tuning", &Method::POST | &Method::DELETE) => {
            if !options.allow_edits {
                return error(
                    StatusCode::FORBIDDEN,
                    "per-label settings are changed only behind the device's credentials (`[http] auth`, \
                     `password_file`) or on a loopback address"
                        .into(),
                );
            }
            let edit = if method == Method::POST {
                let body = match tokio::time::timeout(
                    view.update_gate().config().limits.body_timeout,
                    Limited::new(request.into_body(), MAX_TUNING_BODY).collect(),
                )
                .await
                {
                    Ok(Ok(body)) => body.to_bytes(),
                    Ok(Err(e)) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("reading the change (at most {MAX_TUNING_BODY} bytes): {e}"),
                        )
                    }
                    Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "the change's body took too long".into()),
                };
                match serde_json::from_slice::<TuningEdit>(&body) {
                    Ok(edit) => Some(edit),
                    Err(e) => {
                        return error(StatusCode::UNPROCESSABLE_ENTITY, TuningError::Body(e.to_string()).to_string())
                    }
                }
            } else {
                None
            };
            // Saving the settings fsyncs a file: off the async threads.
            let changed = {
                let view = view.clone();
                tokio::task::spawn_blocking(move || view.edit_tuning(edit.as_ref())).await
            };
            match changed {
                Ok(Ok(tuning)) => json(StatusCode::OK, &TuningDoc { editable: true, labels: tuning.labels }),
                Ok(Err(e)) => {
                    let status = match e {
                        TuningError::UnknownLabel { .. } | TuningError::BadThreshold { .. } | TuningError::Body(_) => {
                            StatusCode::UNPROCESSABLE_ENTITY
                        }
                        TuningError::NotAllowed(_) => StatusCode::FORBIDDEN,
                        TuningError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
                        TuningError::Save { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    tracing::warn!("per-label settings: change refused: {e}");
                    error(status, e.to_string())
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("the change failed: {e}")),
            }
        }
        ("/snapshot", &Method::GET) => {
            let shot = tokio::task::spawn_blocking(move || view.snapshot().map(|s| s.encode())).await;
            match shot {
                Ok(Some(Ok((content_type, image)))) => {
                    let mut response = Response::new(Full::new(Bytes::from(image)));
                    let headers = response.headers_mut();
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                    headers.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    response
                }
                Ok(Some(Err(e))) => {
                    error(StatusCode::INTERNAL_SERVER_ERROR, format!("the last frame is not an image: {e}"))
                }
                Ok(None) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "no frame came in time (is the source stalled?)".into())
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("taking the snapshot failed: {e}")),
            }
        }
        ("/status" | "/metrics" | "/snapshot", _) => not_allowed("GET"),
        ("/tuning", _) => not_allowed("GET, POST, DELETE"),
        ("/labels", _) => not_allowed("GET, POST"),
        _ => {
            let mut response = text(
                StatusCode::NOT_FOUND,
                format!("no route {path}: try /, /status, /metrics, /labels, /tuning or /snapshot\n"),
            );
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

fn page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE_HTML.as_bytes())));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response
}

/// `GET /events`: a stream that stays open (an idle one may be displaced by a newer
/// connection; the page's EventSource reconnects).
fn events(feed: &LiveFeed) -> Response<Either<Full<Bytes>, EventStream>> {
    let Some(stream) = feed.subscribe() else {
        let busy = text(StatusCode::SERVICE_UNAVAILABLE, "too many /events streams are open\n".into());
        return busy.map(Either::Left);
    };
    let mut response = Response::new(Either::Right(stream));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Reads a body of `length` bytes into one buffer of that size (no second copy: the bytes held
/// are the bytes counted against the budget).
async fn read_body(body: Incoming, length: usize) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let mut body = Limited::new(body, length);
    let mut bytes = Vec::with_capacity(length);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `{"error": message}`.
fn error(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "this device asks for its credentials (`[http] username`, `password_file`)\n".into(),
    );
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"clipact\", charset=\"UTF-8\""),
    );
    response
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed; allowed: {allow}\n"));
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}

// ---------------------------------------------------------------------------------------------
// Host side

/// Why a push over HTTP failed before the device answered.
#[derive(Debug, thiserror::Error)]
pub enum HttpPushError {
    /// The device could not be reached, or its answer was not HTTP.
    #[error("HTTP {host}:{port}: {message}")]
    Connection {
        /// Device host.
        host: String,
        /// Device port.
        port: u16,
        /// What went wrong.
        message: String,
    },
    /// The device answered with something that is not an update reply.
    #[error("HTTP {host}:{port} answered {status}: {body}")]
    Unexpected {
        /// Device host.
        host: String,
        /// Device port.
        port: u16,
        /// HTTP status.
        status: u16,
        /// The body, as text.
        body: String,
    },
}

/// Sends `sender`'s transfer to the device's `POST /labels` at `host:port`, in two requests
/// (the challenge request, then the transfer signed for the device's challenge), each within
/// `timeout`, and returns the device's verdict.
pub async fn push_over_http(
    host: &str,
    port: u16,
    sender: &crate::update::Sender,
    timeout: Duration,
) -> Result<UpdateReply, HttpPushError> {
    let challenge = post_update(host, port, &super::remote::encode_challenge_request(sender), timeout).await?;
    let Some((nonce, device)) = challenge.challenge() else { return Ok(challenge) };
    let payload = super::remote::encode_transfer(sender, &nonce, device);
    post_update(host, port, &payload, timeout).await
}

/// One `POST /labels` over HTTP/1.1 (`Connection: close`), its JSON answer decoded.
async fn post_update(host: &str, port: u16, body: &[u8], timeout: Duration) -> Result<UpdateReply, HttpPushError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |message: String| HttpPushError::Connection { host: host.to_owned(), port, message };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| fail(e.to_string()))?;
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let head = format!(
            "POST /labels HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(|e| fail(e.to_string()))?;
        stream.write_all(body).await.map_err(|e| fail(e.to_string()))?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map_err(|e| fail(e.to_string()))?;
        Ok::<_, HttpPushError>(answer)
    };
    let answer =
        tokio::time::timeout(timeout, exchange).await.map_err(|_| fail(format!("no answer within {timeout:?}")))??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| fail("the answer is not HTTP".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| fail(format!("no HTTP status in {:?}", head.lines().next().unwrap_or(""))))?;
    // hyper sends a fixed Content-Length for these answers: the body is not chunked.
    serde_json::from_str::<UpdateReply>(body.trim()).map_err(|_| HttpPushError::Unexpected {
        host: host.to_owned(),
        port,
        status,
        body: body.trim().chars().take(300).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        // RFC 7617's example.
        assert_eq!(BasicAuth::new("Aladdin", "open sesame").expected, b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }
}
